"""The BLIP-2 Q-Former: a BERT encoder with learned queries, four attention modes and an LM head.

The joint sequence is [queries; text]. Every layer runs self-attention over it under the mode's
mask; in layers whose index is divisible by `cross_attention_freq` the query positions (and only
they) then cross-attend to the image tokens; the feed-forward block has separate weights for
query and text positions.

Modes (B batch, Q queries, T text tokens, H width):
  image       queries only, cross-attention on                        -> (B, Q, H)
  text        text only, padding mask, no cross-attention             -> (B, T, H)
  matching    queries + text, bidirectional, queries cross-attend     -> (B, Q + T, H)
  generation  queries see queries; text sees all queries and earlier  -> (B, Q + T, H)
              text (causal); the first text token becomes [DEC]

The image tokens' cross-attention keys/values depend on the image only: `cross_kvs` computes them
once per image and every mode accepts them in place of the tokens (`image_kvs`), so the matching
pass over 3B pairs reuses the image pass's projections of the B images instead of redoing them.

In generation mode the queries never see text, so their per-layer keys/values equal those of the
image pass: `image_mode_with_kv` returns them and `generate_text` / `decode_step` reuse them (the
BLIP-2 recipe) instead of running the queries again.

The vocabulary may be padded: `vocab_size` rows of which ids 0..dec_token_id are real ([DEC] is
the last) and the rest only round the table up to a size the model axis divides. `lm_logits`
gives the padding ids `PADDING_LOGIT`, so they are never predicted.

Module names mirror Hugging Face (`Blip2ForImageTextRetrieval` with `use_qformer_text_input=True`,
and `BertLMHeadModel` for the head), so the weight import is a renaming (torch Linear weights are
transposed: ours are (in, out)):

  ours (under `qformer.`)                      Hugging Face BLIP-2 / BERT
  embeddings.word_embeddings                   embeddings.word_embeddings / bert.embeddings.*
  embeddings.position_embeddings               embeddings.position_embeddings
  embeddings.layernorm                         qformer.layernorm / bert.embeddings.LayerNorm
  layers[i].attention.query / key / value      qformer.encoder.layer.i.attention.attention.query...
  layers[i].attention.output_dense             qformer.encoder.layer.i.attention.output.dense
  layers[i].attention.output_layernorm         qformer.encoder.layer.i.attention.output.LayerNorm
  layers[i].crossattention.*  (i % freq == 0)  qformer.encoder.layer.i.crossattention.* (as above)
  layers[i].intermediate.dense                 qformer.encoder.layer.i.intermediate.dense
  layers[i].output.dense / output.layernorm    qformer.encoder.layer.i.output.dense / .LayerNorm
  layers[i].intermediate_query.dense           qformer.encoder.layer.i.intermediate_query.dense
  layers[i].output_query.dense / .layernorm    qformer.encoder.layer.i.output_query.*
  lm_head.dense / lm_head.layernorm            cls.predictions.transform.dense / .LayerNorm
  lm_head.bias                                 cls.predictions.bias
  (decoder weight)                             tied: embeddings.word_embeddings
"""

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from medunifier_jax.models import layers, stack

Mode = Literal["image", "text", "matching", "generation"]
# The LM logit of a vocabulary padding id (one above [DEC]): finite, so that softmaxes and the
# decoders' score sums never meet -inf - -inf (NaN), yet exp() of it is exactly 0 in float32.
PADDING_LOGIT = -1e9
KV = tuple[jax.Array, jax.Array]  # keys, values: (B, heads, T, head_dim) each
CrossKVs = list[KV | None]  # per layer: the image tokens' cross-attention keys/values, or None


class QFormerEmbeddings(nnx.Module):
  """Word + absolute position embeddings for text; queries prepended; one LayerNorm + dropout."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs, dtype=None):
    h = cfg.hidden_size
    init = nnx.initializers.normal(layers.INIT_STD)
    self.word_embeddings = nnx.Embed(
      cfg.vocab_size,
      h,
      dtype=dtype,
      param_dtype=jnp.float32,
      embedding_init=layers.partitioned(init, ("vocab", "embed")),
      rngs=rngs,
    )
    self.position_embeddings = nnx.Embed(
      cfg.max_position_embeddings,
      h,
      dtype=dtype,
      param_dtype=jnp.float32,
      embedding_init=layers.partitioned(init, (None, "embed")),
      rngs=rngs,
    )
    self.layernorm = layers.layer_norm(h, cfg.layer_norm_eps, rngs=rngs, dtype=dtype)
    self.dropout = layers.new_dropout(cfg.hidden_dropout)
    self.max_positions = cfg.max_position_embeddings

  def __call__(
    self,
    query_embeds: jax.Array | None,
    input_ids: jax.Array | None,
    *,
    first_position: jax.Array | int = 0,
    rngs: nnx.Rngs | None = None,
  ) -> jax.Array:
    """query_embeds (B, Q, H) and/or input_ids (B, T) -> (B, Q + T, H).

    Text positions run from `first_position` (0 for a whole text; the step index when decoding).
    """
    parts = []
    if query_embeds is not None:
      parts.append(query_embeds)
    if input_ids is not None:
      t = input_ids.shape[1]
      if isinstance(first_position, int) and first_position + t > self.max_positions:
        raise ValueError(
          f"text of {first_position + t} tokens exceeds qformer.max_position_embeddings="
          f"{self.max_positions}; shorten it (max_text_len) or enlarge the position table"
        )
      positions = first_position + jnp.arange(t)
      text = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
      parts.append(text)
    if not parts:
      raise ValueError("need query embeddings, input_ids or both")
    dtype = parts[-1].dtype
    x = jnp.concatenate([p.astype(dtype) for p in parts], axis=1)
    return layers.apply_dropout(self.dropout, self.layernorm(x), rngs)


class QFormerAttention(nnx.Module):
  """BERT attention + output block: LN(x + dropout(dense(attend(x, source))))."""

  def __init__(
    self, cfg: ml_collections.ConfigDict, source_width: int, *, rngs: nnx.Rngs, dtype=None
  ):
    h = cfg.hidden_size
    if h % cfg.num_heads:
      raise ValueError(f"qformer.hidden_size={h} must be divisible by num_heads={cfg.num_heads}")
    self.num_heads = cfg.num_heads
    self.query = layers.dense(h, h, ("embed", "heads"), rngs=rngs, dtype=dtype)
    self.key = layers.dense(source_width, h, ("embed", "heads"), rngs=rngs, dtype=dtype)
    self.value = layers.dense(source_width, h, ("embed", "heads"), rngs=rngs, dtype=dtype)
    self.output_dense = layers.dense(h, h, ("heads", "embed"), rngs=rngs, dtype=dtype)
    self.output_layernorm = layers.layer_norm(h, cfg.layer_norm_eps, rngs=rngs, dtype=dtype)
    self.attention_dropout = layers.new_dropout(cfg.attention_dropout)
    self.dropout = layers.new_dropout(cfg.hidden_dropout)

  def project_query(self, x: jax.Array) -> jax.Array:
    """(B, T, H) -> (B, heads, T, d)."""
    return layers.split_heads(self.query(x), self.num_heads)

  def project_kv(self, source: jax.Array) -> KV:
    """(B, S, W) -> keys, values (B, heads, S, d)."""
    return (
      layers.split_heads(self.key(source), self.num_heads),
      layers.split_heads(self.value(source), self.num_heads),
    )

  def attend(
    self, q: jax.Array, k: jax.Array, v: jax.Array, mask, residual, rngs: nnx.Rngs | None
  ) -> jax.Array:
    """Attention of q over (k, v), then the output block on `residual` (B, T, H)."""
    ctx = layers.dot_product_attention(q, k, v, mask, self.attention_dropout, rngs)
    out = layers.apply_dropout(self.dropout, self.output_dense(layers.merge_heads(ctx)), rngs)
    return self.output_layernorm(out + residual)

  def __call__(
    self,
    x: jax.Array,
    mask: jax.Array | None,
    *,
    prefix_kv: KV | None = None,
    rows: int | None = None,
    rngs: nnx.Rngs | None = None,
  ) -> tuple[jax.Array, KV]:
    """Self-attention (cross-attention goes through `project_kv` and `attend`).

    Args:
      x: (B, T, H).
      mask: bool (B, 1, T or 1, S'), True where attending is allowed; None: everything.
      prefix_kv: keys/values (B, heads, P, d) placed before x's own (S' = P + T).
      rows: only the first `rows` positions attend (all T are still keys and values).
    Returns:
      (B, T, H) output (B, rows, H with `rows`) and the keys/values computed from x.
    """
    k, v = self.project_kv(x)
    kk, vv = k, v
    if prefix_kv is not None:
      kk = jnp.concatenate([prefix_kv[0].astype(k.dtype), k], axis=2)
      vv = jnp.concatenate([prefix_kv[1].astype(v.dtype), v], axis=2)
    if rows is not None:
      x = x[:, :rows]
      if mask is not None and mask.shape[2] > 1:
        mask = mask[:, :, :rows]
    return self.attend(self.project_query(x), kk, vv, mask, x, rngs), (k, v)


class Intermediate(nnx.Module):
  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs, dtype=None):
    self.dense = layers.dense(
      cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), rngs=rngs, dtype=dtype
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    return layers.gelu(self.dense(x))


class Output(nnx.Module):
  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs, dtype=None):
    self.dense = layers.dense(
      cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), rngs=rngs, dtype=dtype
    )
    self.layernorm = layers.layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs=rngs, dtype=dtype)
    self.dropout = layers.new_dropout(cfg.hidden_dropout)

  def __call__(self, h: jax.Array, residual: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
    return self.layernorm(layers.apply_dropout(self.dropout, self.dense(h), rngs) + residual)


class QFormerLayer(nnx.Module):
  """Self-attention, cross-attention for the queries (some layers), query/text feed-forward."""

  def __init__(
    self,
    cfg: ml_collections.ConfigDict,
    index: int,
    vision_width: int,
    *,
    rngs: nnx.Rngs,
    dtype=None,
  ):
    self.attention = QFormerAttention(cfg, cfg.hidden_size, rngs=rngs, dtype=dtype)
    self.has_cross_attention = index % cfg.cross_attention_freq == 0
    self.crossattention = (
      QFormerAttention(cfg, vision_width, rngs=rngs, dtype=dtype)
      if self.has_cross_attention
      else None
    )
    self.intermediate = Intermediate(cfg, rngs=rngs, dtype=dtype)
    self.output = Output(cfg, rngs=rngs, dtype=dtype)
    self.intermediate_query = Intermediate(cfg, rngs=rngs, dtype=dtype)
    self.output_query = Output(cfg, rngs=rngs, dtype=dtype)

  def text_ffn(self, x: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
    return self.output(self.intermediate(x), x, rngs)

  def cross_kv(self, image_tokens: jax.Array) -> KV | None:
    """(B, 1 + N, Dv) -> this layer's cross-attention keys/values (B, heads, 1 + N, d), or None."""
    return self.crossattention.project_kv(image_tokens) if self.has_cross_attention else None

  def __call__(
    self,
    x: jax.Array,
    mask: jax.Array | None,
    image_tokens: jax.Array | None,
    prefix_kv: KV | None,
    rngs: nnx.Rngs | None,
    *,
    num_queries: int,
    image_kv: KV | None = None,
    rows: int | None = None,
  ) -> tuple[jax.Array, KV]:
    """x (B, Q + T, H) with the first `num_queries` positions being queries -> (same, self kv).

    The queries cross-attend to `image_kv` (this layer's `cross_kv`) when given, else to
    `image_tokens` (B, 1 + N, Dv). With `rows`, only the first `rows` positions are computed
    (B, rows, H); all Q + T are still this layer's keys and values.
    """
    a, kv = self.attention(x, mask, prefix_kv=prefix_kv, rows=rows, rngs=rngs)
    if num_queries == 0:
      return self.text_ffn(a, rngs), kv
    q = a[:, :num_queries]
    if self.has_cross_attention:
      if image_kv is None:
        if image_tokens is None:
          raise ValueError("query positions need image tokens for cross-attention")
        image_kv = self.cross_kv(image_tokens)
      cross = self.crossattention
      q = cross.attend(cross.project_query(q), *image_kv, None, q, rngs)
    out = self.output_query(self.intermediate_query(q), q, rngs)
    if a.shape[1] > num_queries:
      out = jnp.concatenate([out, self.text_ffn(a[:, num_queries:], rngs)], axis=1)
    return out, kv


class LMHead(nnx.Module):
  """BERT prediction head: dense + GELU + LayerNorm; the decoder is the word embedding matrix."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs, dtype=None):
    h = cfg.hidden_size
    self.dense = layers.dense(h, h, ("embed", None), rngs=rngs, dtype=dtype)
    self.layernorm = layers.layer_norm(h, cfg.layer_norm_eps, rngs=rngs, dtype=dtype)
    self.bias = layers.param(rngs, nnx.initializers.zeros, (cfg.vocab_size,), ("vocab",))

  def __call__(self, hidden: jax.Array, word_embeddings: nnx.Embed) -> jax.Array:
    """(..., H) -> (..., V) float32 logits."""
    h = self.layernorm(layers.gelu(self.dense(hidden)))
    return word_embeddings.attend(h).astype(jnp.float32) + self.bias[...]


class QFormer(nnx.Module):
  """BERT Q-Former with the four modes; query embeddings are passed in (they live on the model)."""

  def __init__(
    self,
    cfg: ml_collections.ConfigDict,
    vision_width: int,
    *,
    rngs: nnx.Rngs,
    dtype=None,
    remat: bool = False,
    scan: bool = False,
  ):
    if not 0 <= cfg.dec_token_id < cfg.vocab_size:
      raise ValueError(
        f"qformer.dec_token_id={cfg.dec_token_id} must be a token id below "
        f"qformer.vocab_size={cfg.vocab_size}"
      )
    self.dec_token_id = cfg.dec_token_id
    # [DEC] is the last real id; rows above it pad the vocabulary (to a size the model axis
    # divides) and are never fed nor predicted.
    self.num_text_classes = cfg.dec_token_id + 1
    self.num_heads = cfg.num_heads
    self.remat = remat
    # One lax.scan over groups of `cross_attention_freq` layers (models/stack.py): the layers
    # alternate in structure with that period, and each group is compiled once.
    self.scan = scan
    self.scan_period = int(cfg.cross_attention_freq)
    self.embeddings = QFormerEmbeddings(cfg, rngs=rngs, dtype=dtype)
    self.layers = nnx.List(
      [QFormerLayer(cfg, i, vision_width, rngs=rngs, dtype=dtype) for i in range(cfg.num_layers)]
    )
    self.lm_head = LMHead(cfg, rngs=rngs, dtype=dtype)

  # -- the layer stack -----------------------------------------------------------------------

  def encode(
    self,
    x: jax.Array,
    mask: jax.Array | None,
    image_tokens: jax.Array | None,
    *,
    num_queries: int,
    prefix_kvs: list[KV] | None = None,
    image_kvs: CrossKVs | None = None,
    rows: int | None = None,
    rngs: nnx.Rngs | None = None,
  ) -> tuple[jax.Array, list[KV]]:
    """Runs every layer on embedded x (B, L, H); returns the output and each layer's self kv.

    The queries cross-attend to `image_kvs` (from `cross_kvs`) when given, else to image_tokens.
    With `rows`, the output is only the first `rows` positions (B, rows, H): unrolled, the last
    layer computes nothing else (the other positions are only its keys and values), which saves
    most of its work when a caller reads the queries (matching) or [CLS] (contrastive) alone;
    scanned, they are sliced from the full output (same values).
    """
    n = len(self.layers)
    prefix_kvs = [None] * n if prefix_kvs is None else prefix_kvs
    image_kvs = [None] * n if image_kvs is None else image_kvs
    if self.scan:
      # Scanned, the last layer computes every row and `rows` are sliced from its output. Its
      # group run unrolled after the scan (so that it could compute fewer rows) raised the
      # paper step's peak by 2 GiB per device on 8 devices (33.1 against 31.1 GiB) and its
      # compile by a quarter, to save about 6% of the matching pass's FLOPs at 12 layers.
      x, kvs = self._encode_scanned(x, mask, image_tokens, num_queries, prefix_kvs, image_kvs, rngs)
      return (x if rows is None else x[:, :rows]), kvs
    kvs = []
    for i in range(n):
      block = _layer_fn(self.remat, num_queries, rows if i == n - 1 else None)
      x, kv = block(self.layers[i], x, mask, image_tokens, prefix_kvs[i], image_kvs[i], rngs)
      kvs.append(kv)
    return x, kvs

  def _encode_scanned(self, x, mask, image_tokens, num_queries, prefix_kvs, image_kvs, rngs):
    """Every layer as one lax.scan over groups of `scan_period` layers; the results of running
    them unrolled."""

    def step(layer, x, inputs, r):
      prefix, image_kv = inputs
      return layer(x, mask, image_tokens, prefix, r, num_queries=num_queries, image_kv=image_kv)

    per_layer = list(zip(prefix_kvs, image_kvs, strict=True))
    return stack.scan_layers(
      self.layers, step, x, per_layer, rngs=rngs, period=self.scan_period, remat=self.remat
    )

  def cross_kvs(self, image_tokens: jax.Array) -> CrossKVs:
    """(B, 1 + N, Dv) -> per layer the cross-attention keys/values (B, heads, 1 + N, d) or None.

    Rows can be gathered (`gather_kvs`) to pair one image with several texts without projecting
    it again.
    """
    return [layer.cross_kv(image_tokens) for layer in self.layers]

  # -- the four modes ------------------------------------------------------------------------

  def __call__(
    self,
    query_embeds: jax.Array | None,
    input_ids: jax.Array | None,
    attention_mask: jax.Array | None,
    image_tokens: jax.Array | None,
    *,
    mode: Mode,
    image_kvs: CrossKVs | None = None,
    rows: int | None = None,
    rngs: nnx.Rngs | None = None,
  ) -> jax.Array:
    """One pass in `mode`.

    Args:
      query_embeds: (B, Q, H) learned queries (image, matching, generation modes).
      input_ids, attention_mask: (B, T) text (text, matching, generation modes).
      image_tokens: (B, 1 + N, Dv) ViT output (image, matching, generation modes); may be None
        when `image_kvs` (`cross_kvs` of the tokens, B rows) is given instead.
      rows: return only the first `rows` positions (`encode`: the last layer computes no others).
    Returns:
      (B, Q + T, H) hidden states (Q = 0 in text mode, T = 0 in image mode); (B, rows, H) with
      `rows`.
    """
    if mode == "image":
      x = self.embeddings(query_embeds, None, rngs=rngs)
      return self.encode(
        x, None, image_tokens, num_queries=x.shape[1], image_kvs=image_kvs, rngs=rngs
      )[0]
    if mode == "text":
      x = self.embeddings(None, input_ids, rngs=rngs)
      mask = padding_mask(attention_mask)
      return self.encode(x, mask, None, num_queries=0, rows=rows, rngs=rngs)[0]
    if mode == "matching":
      q = query_embeds.shape[1]
      x = self.embeddings(query_embeds, input_ids, rngs=rngs)
      ones = jnp.ones(attention_mask.shape[:1] + (q,), attention_mask.dtype)
      mask = padding_mask(jnp.concatenate([ones, attention_mask], axis=1))
      return self.encode(
        x, mask, image_tokens, num_queries=q, image_kvs=image_kvs, rows=rows, rngs=rngs
      )[0]
    if mode == "generation":
      q = query_embeds.shape[1]
      x = self.embeddings(query_embeds, self.with_dec_token(input_ids), rngs=rngs)
      mask = generation_mask(q, attention_mask)
      return self.encode(x, mask, image_tokens, num_queries=q, image_kvs=image_kvs, rngs=rngs)[0]
    raise ValueError(f"unknown mode {mode!r}; use image, text, matching or generation")

  def image_mode_with_kv(
    self,
    query_embeds: jax.Array,
    image_tokens: jax.Array | None,
    *,
    image_kvs: CrossKVs | None = None,
    rngs: nnx.Rngs | None = None,
  ) -> tuple[jax.Array, list[KV]]:
    """Image mode; also returns each layer's query keys/values (B, heads, Q, d) for generation."""
    x = self.embeddings(query_embeds, None, rngs=rngs)
    return self.encode(
      x, None, image_tokens, num_queries=x.shape[1], image_kvs=image_kvs, rngs=rngs
    )

  def generate_text(
    self,
    query_kvs: list[KV],
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    rngs: nnx.Rngs | None = None,
  ) -> jax.Array:
    """Text half of the generation mode on top of the queries' cached keys/values -> (B, T, H)."""
    q = query_kvs[0][0].shape[2]
    x = self.embeddings(None, self.with_dec_token(input_ids), rngs=rngs)
    mask = generation_mask(q, attention_mask)[:, :, q:]
    return self.encode(x, mask, None, num_queries=0, prefix_kvs=query_kvs, rngs=rngs)[0]

  def with_dec_token(self, input_ids: jax.Array) -> jax.Array:
    """(B, T): the first token ([CLS]) replaced by [DEC], the generation BOS."""
    return input_ids.at[:, 0].set(self.dec_token_id)

  def lm_logits(self, text_hidden: jax.Array) -> jax.Array:
    """(B, T, H) -> (B, T, V) float32 next-token logits; padding ids get `PADDING_LOGIT`.

    Every LM logit (training, the uncached and the cached decoders) comes from here, so no
    softmax or decoder ever gives a padding id any probability.
    """
    return self.mask_padding_ids(self.lm_head(text_hidden, self.embeddings.word_embeddings))

  def mask_padding_ids(self, logits: jax.Array) -> jax.Array:
    """(..., V) logits -> the same with ids >= `num_text_classes` set to `PADDING_LOGIT`.

    An unpadded vocabulary (V == dec_token_id + 1) is returned untouched, bit for bit.
    """
    v = logits.shape[-1]
    if v == self.num_text_classes:
      return logits
    real = jnp.arange(v) < self.num_text_classes
    return jnp.where(real, logits, jnp.asarray(PADDING_LOGIT, logits.dtype))

  # -- cached incremental decoding -----------------------------------------------------------

  def init_decode_cache(self, query_kvs: list[KV], max_len: int) -> dict[str, jax.Array]:
    """Fixed-shape decoding state: the queries' keys/values per layer and empty text buffers.

    Returns a dict of arrays: `query_k`, `query_v` (L, B, heads, Q, d) and `text_k`, `text_v`
    (L, B, heads, max_len, d), zero until written.
    """
    if max_len > self.embeddings.max_positions:
      raise ValueError(
        f"max_len={max_len} exceeds qformer.max_position_embeddings={self.embeddings.max_positions}"
      )
    query_k = jnp.stack([k for k, _ in query_kvs])
    query_v = jnp.stack([v for _, v in query_kvs])
    text_shape = query_k.shape[:3] + (max_len,) + query_k.shape[4:]
    return {
      "query_k": query_k,
      "query_v": query_v,
      "text_k": jnp.zeros(text_shape, query_k.dtype),
      "text_v": jnp.zeros(text_shape, query_v.dtype),
    }

  def decode_step(
    self, cache: dict[str, jax.Array], token_ids: jax.Array, position: jax.Array
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Feeds token_ids (B,) at text position `position` (int32 scalar; 0 takes [DEC]).

    Returns the next-token logits (B, V) float32 and the cache with this step's keys/values.
    Deterministic (no dropout); shapes do not depend on `position`, so it compiles once.
    """
    max_len = cache["text_k"].shape[3]
    x = self.embeddings(None, token_ids[:, None], first_position=position)  # (B, 1, H)
    visible = jnp.arange(max_len) <= position
    mask = jnp.concatenate([jnp.ones((cache["query_k"].shape[3],), bool), visible])
    mask = mask[None, None, None, :]
    text_k, text_v = [], []
    for i, layer in enumerate(self.layers):
      attn = layer.attention
      k, v = attn.project_kv(x)
      buf_k, buf_v = cache["text_k"][i], cache["text_v"][i]
      buf_k = jax.lax.dynamic_update_slice_in_dim(buf_k, k.astype(buf_k.dtype), position, 2)
      buf_v = jax.lax.dynamic_update_slice_in_dim(buf_v, v.astype(buf_v.dtype), position, 2)
      kk = jnp.concatenate([cache["query_k"][i].astype(k.dtype), buf_k], axis=2)
      vv = jnp.concatenate([cache["query_v"][i].astype(v.dtype), buf_v], axis=2)
      a = attn.attend(attn.project_query(x), kk, vv, mask, x, None)
      x = layer.text_ffn(a, None)
      text_k.append(buf_k)
      text_v.append(buf_v)
    cache = dict(cache, text_k=jnp.stack(text_k), text_v=jnp.stack(text_v))
    return self.lm_logits(x)[:, 0], cache


def gather_kvs(image_kvs: CrossKVs, index: jax.Array) -> CrossKVs:
  """Rows `index` (B',) int of every layer's cross keys/values: image index[i] for pair i."""
  return [None if kv is None else (kv[0][index], kv[1][index]) for kv in image_kvs]


def padding_mask(attention_mask: jax.Array) -> jax.Array:
  """(B, L) 1/0 -> bool (B, 1, 1, L): every position may attend to the non-padding keys."""
  return (attention_mask > 0)[:, None, None, :]


def generation_mask(num_queries: int, attention_mask: jax.Array) -> jax.Array:
  """Generation-mode mask over [queries; text], bool (B, 1, Q + T, Q + T).

  Queries attend to queries only; text token i attends to every query and to the non-padding
  text tokens j <= i.
  """
  b, t = attention_mask.shape
  q = num_queries
  causal = jnp.tril(jnp.ones((t, t), bool))[None] & (attention_mask > 0)[:, None, :]  # (B, T, T)
  query_rows = jnp.concatenate([jnp.ones((q, q), bool), jnp.zeros((q, t), bool)], axis=1)
  text_rows = jnp.concatenate([jnp.ones((b, t, q), bool), causal], axis=2)
  mask = jnp.concatenate([jnp.broadcast_to(query_rows, (b, q, q + t)), text_rows], axis=1)
  return mask[:, None]


@functools.cache
def _layer_fn(remat: bool, num_queries: int, rows: int | None = None):
  def call(layer, x, mask, image_tokens, prefix_kv, image_kv, rngs):
    return layer(
      x, mask, image_tokens, prefix_kv, rngs, num_queries=num_queries, image_kv=image_kv, rows=rows
    )

  return nnx.remat(call) if remat else call
