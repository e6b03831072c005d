"""MedUnifier: BLIP-2 ViT + Q-Former + contrastive/matching heads + text-grounded VQ-VAE.

Shapes: B batch, S image size, N = (S / patch)^2 patch tokens, Dv ViT width, Q queries, H Q-Former
width, T text length, E embed_dim, V vocabulary (padding rows included). The model holds only
`nnx.Param` and `nnx.BatchStat` state; dropout draws from the `rngs` passed at call time (None:
deterministic).
"""

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from medunifier_jax import config_lib
from medunifier_jax.models import layers
from medunifier_jax.models.qformer import KV, CrossKVs, QFormer
from medunifier_jax.models.vit import VisionTransformer
from medunifier_jax.models.vqvae import VQVAE


class MedUnifier(nnx.Module):
  """The whole model. Attribute names are a contract (weight import and freezing use them):
  `vit` (frozen as a whole with `vit.frozen`), `ln_vision` (always trained), `qformer`,
  `query_tokens`, `vision_proj`, `text_proj`, `itm_head`, `temp`, `vqvae`."""

  def __init__(
    self,
    cfg: ml_collections.ConfigDict,
    *,
    rngs: nnx.Rngs,
    dtype: str | jnp.dtype | None = None,
    remat: bool | None = None,
  ):
    """Builds the model from `config.model`.

    Args:
      cfg: `config.model` (configs/pretrain.py).
      rngs: initialisation randomness (`params` stream).
      dtype: compute dtype ("float32", "bfloat16"); parameters stay float32. Default:
        `cfg.dtype` if present, else float32.
      remat: rematerialise each transformer block in the backward pass. Default: `cfg.remat`
        if present, else False.
    """
    config_lib.check_geometry(cfg)  # one error listing every part that does not fit
    dtype = jnp.dtype(dtype or cfg.get("dtype", "float32"))
    remat = bool(cfg.get("remat", False) if remat is None else remat)
    # Scanned layer stacks compile each kind of layer once (models/stack.py).
    scan = bool(cfg.get("scan_layers", False))
    self.dtype = dtype
    self.vit_frozen = bool(cfg.vit.frozen)
    self.image_size = cfg.vit.image_size
    self.vocab_size = cfg.qformer.vocab_size  # V, padding rows included
    # The real token ids 0..dec_token_id: the classes of the LM head's softmax (ITG).
    self.num_text_classes = cfg.qformer.dec_token_id + 1
    self.max_positions = cfg.qformer.max_position_embeddings
    self.temperature_min = float(cfg.temperature_min)
    self.temperature_max = float(cfg.temperature_max)
    h, e, dv = cfg.qformer.hidden_size, cfg.embed_dim, cfg.vit.width

    # `ln_vision` lives beside the ViT, not inside it: BLIP-2 trains it even when the ViT is
    # frozen, and freezing goes by path (`vit`). Built right after the ViT, so the parameter
    # initialisation draws its keys in the order it did when the ViT held it.
    self.vit = VisionTransformer(
      cfg.vit, rngs=rngs, dtype=dtype, remat=remat, final_norm=False, scan=scan
    )
    self.ln_vision = layers.layer_norm(dv, cfg.vit.layer_norm_eps, rngs=rngs, dtype=dtype)
    self.qformer = QFormer(cfg.qformer, dv, rngs=rngs, dtype=dtype, remat=remat, scan=scan)
    self.query_tokens = layers.param(
      rngs,
      nnx.initializers.normal(layers.INIT_STD),
      (1, cfg.qformer.num_queries, h),
      (None, None, "embed"),
    )
    self.vision_proj = layers.dense(h, e, ("embed", None), rngs=rngs, dtype=dtype)
    self.text_proj = layers.dense(h, e, ("embed", None), rngs=rngs, dtype=dtype)
    self.itm_head = layers.dense(h, 2, ("embed", None), rngs=rngs, dtype=dtype)
    self.temp = nnx.Param(jnp.asarray(cfg.temperature_init, jnp.float32))
    self.vqvae = VQVAE(
      cfg=cfg.vqvae,
      query_width=h,
      vision_width=dv,
      text_width=h,
      image_size=cfg.vit.image_size,
      rngs=rngs,
      dtype=dtype,
    )

  # -- encoders ------------------------------------------------------------------------------

  def image_tokens(self, pixel_values: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """(B, S, S, 3) normalised pixels -> (B, 1 + N, Dv) after `ln_vision`.

    A frozen ViT's blocks get no gradient (no backward pass through them is built); `ln_vision`
    after them always does, as in BLIP-2.
    """
    vit = layers.frozen(self.vit) if self.vit_frozen else self.vit
    tokens = vit(pixel_values.astype(self.dtype), rngs=rngs)
    if self.vit_frozen:
      tokens = jax.lax.stop_gradient(tokens)
    return self.ln_vision(tokens)

  def _queries(self, batch: int) -> jax.Array:
    q = self.query_tokens[...]
    return jnp.broadcast_to(q, (batch,) + q.shape[1:]).astype(self.dtype)

  def image_queries(self, image_tokens: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Q-Former image mode: (B, 1 + N, Dv) -> (B, Q, H)."""
    return self.image_queries_with_kv(image_tokens, rngs=rngs)[0]

  def image_queries_with_kv(
    self,
    image_tokens: jax.Array,
    *,
    image_kvs: CrossKVs | None = None,
    rngs: nnx.Rngs | None = None,
  ) -> tuple[jax.Array, list[KV]]:
    """Image mode, also returning each layer's query keys/values for the generation mode.

    image_kvs: `cross_kvs(image_tokens)` when already computed (they are not computed again).
    """
    return self.qformer.image_mode_with_kv(
      self._queries(image_tokens.shape[0]), image_tokens, image_kvs=image_kvs, rngs=rngs
    )

  def cross_kvs(self, image_tokens: jax.Array) -> CrossKVs:
    """(B, 1 + N, Dv) -> the Q-Former's cross-attention keys/values per layer (None where a
    layer has no cross-attention); computed once, shared by the image and matching passes."""
    return self.qformer.cross_kvs(image_tokens)

  def text_hidden(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    cls_only: bool = False,
    rngs: nnx.Rngs | None = None,
  ) -> jax.Array:
    """Q-Former text mode: (B, T) ids and mask -> (B, T, H); position 0 ([CLS]) is the feature.

    cls_only: (B, 1, H), [CLS] alone; the last layer then skips the other positions' work.
    """
    self._check_text(input_ids, attention_mask)
    rows = 1 if cls_only else None
    return self.qformer(None, input_ids, attention_mask, None, mode="text", rows=rows, rngs=rngs)

  def image_embeddings(self, queries: jax.Array) -> jax.Array:
    """(B, Q, H) -> (B, Q, E) float32, L2-normalised."""
    return l2_normalize(self.vision_proj(queries).astype(jnp.float32))

  def text_embeddings(self, text_hidden: jax.Array) -> jax.Array:
    """(B, T, H) -> (B, E) float32 from the [CLS] position, L2-normalised."""
    return l2_normalize(self.text_proj(text_hidden[:, 0]).astype(jnp.float32))

  def temperature(self) -> jax.Array:
    """The ITC temperature: the stored `temp`, whose gradient always reaches it.

    The training step keeps `temp` inside [temperature_min, temperature_max]
    (`constrain_parameters` after every update), so this is the stored value. A value from
    elsewhere (an imported checkpoint, `temperature_init`) that lies outside is used clamped,
    as BLIP-2 clamps before its forward pass, but the clamp is straight-through: a plain clip
    would zero the gradient outside the bounds, and a temperature stuck there could never come
    back.
    """
    t = self.temp[...]
    return t + jax.lax.stop_gradient(jnp.clip(t, self.temperature_min, self.temperature_max) - t)

  def constrain_parameters(self) -> None:
    """Projects parameters back onto their allowed sets; the training step calls it after each
    optimizer update. Here: `temp` clamped to [temperature_min, temperature_max] (BLIP-2 clamps
    it in place, without gradient, at every step)."""
    self.temp.set_value(jnp.clip(self.temp.get_value(), self.temperature_min, self.temperature_max))

  # -- matching and generation ---------------------------------------------------------------

  def itm_logits(
    self,
    image_tokens: jax.Array,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    image_kvs: CrossKVs | None = None,
    rngs: nnx.Rngs | None = None,
  ) -> jax.Array:
    """Matching mode on row-aligned pairs -> (B, 2) float32 (no-match, match), query-averaged.

    image_tokens: (B, 1 + N, Dv), or None with `image_kvs`: `cross_kvs` rows aligned with the
    texts (e.g. `qformer.gather_kvs` of each image's keys/values).
    """
    # Only the queries feed the head: the last layer computes no text positions (`rows`).
    queries, _ = self._joint_pass(
      "matching",
      image_tokens,
      input_ids,
      attention_mask,
      image_kvs=image_kvs,
      rows=self.query_tokens.shape[1],
      rngs=rngs,
    )
    return self.itm_head(queries).astype(jnp.float32).mean(axis=1)

  def lm_logits(
    self,
    image_tokens: jax.Array,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    rngs: nnx.Rngs | None = None,
  ) -> jax.Array:
    """Generation mode, one joint pass -> (B, T, V) float32; logits[:, t] predicts token t + 1.

    The first token is replaced by [DEC] inside. Ids >= `num_text_classes` (vocabulary padding)
    get `qformer.PADDING_LOGIT`.
    """
    _, text = self._joint_pass("generation", image_tokens, input_ids, attention_mask, rngs=rngs)
    return self.qformer.lm_logits(text)

  def _joint_pass(
    self,
    mode: str,
    image_tokens: jax.Array | None,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    image_kvs: CrossKVs | None = None,
    rows: int | None = None,
    rngs: nnx.Rngs | None = None,
  ) -> tuple[jax.Array, jax.Array]:
    """The queries and the text in one Q-Former pass in `mode` ("matching" or "generation")
    -> their hidden states (B, Q, H) and (B, T, H); with `rows` only the first `rows`
    positions are computed (the text part is then (B, rows - Q, H), empty for rows = Q)."""
    self._check_text(input_ids, attention_mask)
    q = self.query_tokens.shape[1]
    hidden = self.qformer(
      self._queries(input_ids.shape[0]),
      input_ids,
      attention_mask,
      image_tokens,
      mode=mode,
      image_kvs=image_kvs,
      rows=rows,
      rngs=rngs,
    )
    return hidden[:, :q], hidden[:, q:]

  def lm_logits_from_query_kv(
    self,
    query_kvs: list[KV],
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    rngs: nnx.Rngs | None = None,
  ) -> jax.Array:
    """As `lm_logits`, reusing the image pass's query keys/values (`image_queries_with_kv`)."""
    self._check_text(input_ids, attention_mask)
    hidden = self.qformer.generate_text(query_kvs, input_ids, attention_mask, rngs=rngs)
    return self.qformer.lm_logits(hidden)

  def init_decode_cache(
    self, image_tokens: jax.Array, batch_size: int, max_len: int
  ) -> dict[str, jax.Array]:
    """Decoding state for `batch_size` sequences of at most `max_len` tokens ([DEC] included).

    image_tokens: (B, 1 + N, Dv); batch_size must be a multiple of B: each image's state is
    repeated batch_size // B times in a row (e.g. one row per beam).
    """
    b = image_tokens.shape[0]
    if batch_size % b:
      raise ValueError(f"batch_size={batch_size} must be a multiple of the {b} images")
    _, kvs = self.image_queries_with_kv(image_tokens)
    r = batch_size // b
    kvs = [(jnp.repeat(k, r, axis=0), jnp.repeat(v, r, axis=0)) for k, v in kvs]
    return self.qformer.init_decode_cache(kvs, max_len)

  def decode_step(
    self, cache: dict[str, jax.Array], token_ids: jax.Array, position: jax.Array
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """token_ids (B,) at text position `position` (int32 scalar; feed [DEC] at 0).

    Returns next-token logits (B, V) float32 and the updated cache; equal to `lm_logits`
    row `position` for the same prefix.
    """
    return self.qformer.decode_step(cache, token_ids, jnp.asarray(position, jnp.int32))

  def _check_text(self, input_ids: jax.Array, attention_mask: jax.Array) -> None:
    if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
      raise ValueError(
        f"expected input_ids and attention_mask of one shape (B, T), got "
        f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
      )
    if input_ids.shape[1] > self.max_positions:
      raise ValueError(
        f"text length {input_ids.shape[1]} exceeds the {self.max_positions} positions of the "
        f"Q-Former; truncate to model.max_text_len"
      )


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) over the last axis (torch.nn.functional.normalize)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)
