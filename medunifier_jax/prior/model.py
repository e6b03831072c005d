"""The text-conditioned prior over the VQ-VAE's two code grids (DESIGN.md section 1.4).

Shapes: B batch, g the VQ-VAE's bottom grid (`model.grid`), R its codes per bottom cell
(`model.bottom_depth`, 1 in the paper), Nt = (g/2)^2 top codes, Nb = g^2 R bottom codes,
N = Nt + Nb, K the codebook size (both levels), D the prior's width, T text length, H the
Q-Former width, L the null condition's length.

The prior reads one sequence: the top grid in row-major order, then the bottom grid in
row-major order, a cell's R codes side by side (`flatten_codes`). Each position is embedded by
its level's code table (K codes plus a [MASK] id, K; the bottom level has one block of K rows
per depth, each depth's codes being another codebook's), its row and column in that level's grid
(and its depth) and a level embedding; pre-norm
blocks of bidirectional self-attention, cross-attention to the text condition and an MLP
follow, and one output layer per level gives logits over the K codes. The condition is the
frozen Q-Former's text-mode hidden states projected to D (keys masked by the attention mask),
or a learned null sequence (`null_embedding`, L positions, all attended): the training step
swaps it in for a fraction of the examples, so that sampling can contrast the two
(classifier-free guidance). With `condition="none"` the prior always sees the null sequence:
an unconditional prior, as in the original release.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from medunifier_jax import config_lib
from medunifier_jax.models import layers, stack

CONDITIONS = ("text", "none")


def num_codes(grid: int, bottom_depth: int = 1) -> tuple[int, int]:
  """(Nt, Nb): positions of the top (g/2 x g/2) and the bottom (g x g x R) grids."""
  return (grid // 2) ** 2, grid**2 * bottom_depth


def flatten_codes(codes_top: jax.Array, codes_bottom: jax.Array) -> jax.Array:
  """(B, g/2, g/2) and (B, g, g) or (B, g, g, R) -> (B, N) int32, the top grid first
  (row-major)."""
  b = codes_top.shape[0]
  return jnp.concatenate([codes_top.reshape(b, -1), codes_bottom.reshape(b, -1)], axis=1).astype(
    jnp.int32
  )


def unflatten_codes(
  tokens: jax.Array, grid: int, bottom_depth: int = 1
) -> tuple[jax.Array, jax.Array]:
  """(B, N) -> (codes_top (B, g/2, g/2), codes_bottom (B, g, g), or (B, g, g, R) with R > 1);
  the inverse of `flatten_codes`."""
  nt, _ = num_codes(grid)
  b = tokens.shape[0]
  bottom = config_lib.bottom_codes_shape(grid, bottom_depth)
  return tokens[:, :nt].reshape(b, grid // 2, grid // 2), tokens[:, nt:].reshape(b, *bottom)


class Attention(nnx.Module):
  """Multi-head attention; queries from `x`, keys and values from `source` (x itself for
  self-attention)."""

  def __init__(
    self,
    width: int,
    source_width: int,
    num_heads: int,
    *,
    dropout: float,
    rngs: nnx.Rngs,
    dtype=None,
  ):
    if width % num_heads:
      raise ValueError(f"prior width {width} must be divisible by num_heads={num_heads}")
    self.num_heads = num_heads
    self.query = layers.dense(width, width, ("embed", "heads"), rngs=rngs, dtype=dtype)
    self.key = layers.dense(source_width, width, ("embed", "heads"), rngs=rngs, dtype=dtype)
    self.value = layers.dense(source_width, width, ("embed", "heads"), rngs=rngs, dtype=dtype)
    self.output = layers.dense(width, width, ("heads", "embed"), rngs=rngs, dtype=dtype)
    self.dropout = layers.new_dropout(dropout)

  def __call__(
    self, x: jax.Array, source: jax.Array, mask: jax.Array | None, rngs: nnx.Rngs | None
  ) -> jax.Array:
    """x (B, Tq, D), source (B, Tk, Ds), mask bool broadcastable to (B, 1, Tq, Tk) or None
    -> (B, Tq, D)."""
    h = self.num_heads
    q = layers.split_heads(self.query(x), h)
    k = layers.split_heads(self.key(source), h)
    v = layers.split_heads(self.value(source), h)
    out = layers.dot_product_attention(q, k, v, mask, self.dropout, rngs)
    return self.output(layers.merge_heads(out))


class MLP(nnx.Module):
  def __init__(self, width: int, hidden: int, *, rngs: nnx.Rngs, dtype=None):
    self.fc1 = layers.dense(width, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype)
    self.fc2 = layers.dense(hidden, width, ("mlp", "embed"), rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(layers.gelu(self.fc1(x)))


class PriorBlock(nnx.Module):
  """Pre-norm: x + self-attn(LN x), x + cross-attn(LN x, condition), x + MLP(LN x)."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs, dtype=None):
    d, eps = cfg.width, cfg.layer_norm_eps
    self.norm_self = layers.layer_norm(d, eps, rngs=rngs, dtype=dtype)
    self.self_attention = Attention(
      d, d, cfg.num_heads, dropout=cfg.attention_dropout, rngs=rngs, dtype=dtype
    )
    self.norm_cross = layers.layer_norm(d, eps, rngs=rngs, dtype=dtype)
    self.cross_attention = Attention(
      d, d, cfg.num_heads, dropout=cfg.attention_dropout, rngs=rngs, dtype=dtype
    )
    self.norm_mlp = layers.layer_norm(d, eps, rngs=rngs, dtype=dtype)
    self.mlp = MLP(d, cfg.mlp_dim, rngs=rngs, dtype=dtype)
    self.dropout = layers.new_dropout(cfg.dropout)

  def __call__(
    self, x: jax.Array, context: jax.Array, context_mask: jax.Array, rngs: nnx.Rngs | None
  ) -> jax.Array:
    """x (B, N, D), context (B, L, D), context_mask bool (B, L) -> (B, N, D)."""
    drop = lambda y: layers.apply_dropout(self.dropout, y, rngs)
    h = self.norm_self(x)
    x = x + drop(self.self_attention(h, h, None, rngs))
    x = x + drop(
      self.cross_attention(self.norm_cross(x), context, context_mask[:, None, None, :], rngs)
    )
    return x + drop(self.mlp(self.norm_mlp(x)))


@functools.cache
def _block_fn(remat: bool):
  call = lambda block, x, context, mask, rngs: block(x, context, mask, rngs)
  return nnx.remat(call) if remat else call


class CodePrior(nnx.Module):
  """Bidirectional transformer over [top codes; bottom codes], conditioned on text states.

  Config (`config.model` of configs/prior.py): `grid`, `codebook_size`, `bottom_depth`
  (optional, 1 when absent), `text_width` (those of the frozen MedUnifier), `width`, `depth`,
  `num_heads`, `mlp_dim`, `dropout`, `attention_dropout`, `layer_norm_eps`, `null_length`,
  `condition` ("text" | "none").
  """

  def __init__(
    self,
    cfg: ml_collections.ConfigDict,
    *,
    rngs: nnx.Rngs,
    dtype: str | jnp.dtype | None = None,
    remat: bool = False,
  ):
    if cfg.condition not in CONDITIONS:
      raise ValueError(f"model.condition={cfg.condition!r}; choose one of {CONDITIONS}")
    if cfg.grid < 2 or cfg.grid % 2:
      raise ValueError(f"model.grid must be even (the top grid is grid/2), got {cfg.grid}")
    dtype = jnp.dtype(dtype or "float32")
    self.dtype = dtype
    self.remat = bool(remat)
    # One lax.scan over the blocks (models/stack.py): the block is compiled once.
    self.scan = bool(cfg.get("scan_layers", False))
    self.grid = int(cfg.grid)
    self.codebook_size = int(cfg.codebook_size)
    self.mask_id = self.codebook_size  # the id after the K codes, in both levels' tables
    self.condition = str(cfg.condition)
    self.bottom_depth = config_lib.bottom_depth(cfg)
    if self.bottom_depth < 1:
      raise ValueError(f"model.bottom_depth must be at least 1, got {self.bottom_depth}")
    self.num_top, self.num_bottom = num_codes(self.grid, self.bottom_depth)
    d, k, top = int(cfg.width), self.codebook_size, self.grid // 2
    init = nnx.initializers.normal(layers.INIT_STD)

    def table(n: int) -> nnx.Embed:
      # K codes + [MASK] rows: not a multiple of a model axis, so laid out like the VQ
      # codebooks ("codebook", replicated by default) rather than split as a vocabulary.
      return nnx.Embed(
        n,
        d,
        dtype=dtype,
        param_dtype=jnp.float32,
        embedding_init=layers.partitioned(init, ("codebook", "embed")),
        rngs=rngs,
      )

    # Names containing "embedding" are spared weight decay (training/optimizer.py).
    self.code_embedding_top = table(k + 1)
    # Depth j's code c is row j K + c; [MASK] is the last row (K when R = 1, as the top's).
    self.code_embedding_bottom = table(self.bottom_depth * k + 1)
    self.row_embedding_top = layers.param(rngs, init, (top, d), (None, "embed"))
    self.column_embedding_top = layers.param(rngs, init, (top, d), (None, "embed"))
    self.row_embedding_bottom = layers.param(rngs, init, (self.grid, d), (None, "embed"))
    self.column_embedding_bottom = layers.param(rngs, init, (self.grid, d), (None, "embed"))
    self.level_embedding = layers.param(rngs, init, (2, d), (None, "embed"))
    depth_embedding = None
    if self.bottom_depth > 1:
      depth_embedding = layers.param(rngs, init, (self.bottom_depth, d), (None, "embed"))
    self.depth_embedding_bottom = nnx.data(depth_embedding)
    self.text_projection = layers.dense(
      int(cfg.text_width), d, (None, "embed"), rngs=rngs, dtype=dtype
    )
    self.null_embedding = layers.param(
      rngs, init, (1, int(cfg.null_length), d), (None, None, "embed")
    )
    self.context_norm = layers.layer_norm(d, cfg.layer_norm_eps, rngs=rngs, dtype=dtype)
    self.blocks = nnx.List([PriorBlock(cfg, rngs=rngs, dtype=dtype) for _ in range(cfg.depth)])
    self.final_norm = layers.layer_norm(d, cfg.layer_norm_eps, rngs=rngs, dtype=dtype)
    self.head_top = layers.dense(d, k, ("embed", "vocab"), rngs=rngs, dtype=dtype)
    # One block of K outputs per depth (`_bottom_logits` uses each position's own block).
    self.head_bottom = layers.dense(
      d, self.bottom_depth * k, ("embed", "vocab"), rngs=rngs, dtype=dtype
    )
    self.dropout = layers.new_dropout(cfg.dropout)

  @property
  def num_positions(self) -> int:
    return self.num_top + self.num_bottom

  def _positions(self) -> jax.Array:
    """(N, D): row + column + level embedding of every position of the sequence."""

    def grid_positions(rows, columns, level):
      r, c = rows[...], columns[...]
      pos = (r[:, None, :] + c[None, :, :]).reshape(-1, r.shape[-1])
      return pos + self.level_embedding[level]

    bottom = grid_positions(self.row_embedding_bottom, self.column_embedding_bottom, 1)
    if self.depth_embedding_bottom is not None:
      # A cell's R codes side by side: (g^2, 1, D) + (R, D) -> (g^2 R, D).
      depth = self.depth_embedding_bottom[...]
      bottom = (bottom[:, None, :] + depth[None]).reshape(-1, bottom.shape[-1])
    return jnp.concatenate(
      [grid_positions(self.row_embedding_top, self.column_embedding_top, 0), bottom]
    )

  def _bottom_ids(self, tokens: jax.Array) -> jax.Array:
    """Bottom codes (B, Nb) in [0, K] -> rows of `code_embedding_bottom`: j K + c at depth j,
    [MASK] (K) -> R K."""
    r, k = self.bottom_depth, self.codebook_size
    if r == 1:
      return tokens
    depth = jnp.arange(tokens.shape[1]) % r
    return jnp.where(tokens == self.mask_id, r * k, tokens + depth * k)

  def _bottom_logits(self, x: jax.Array) -> jax.Array:
    """Bottom positions' states (B, Nb, D) -> logits (B, Nb, K), each from its depth's block."""
    r, k = self.bottom_depth, self.codebook_size
    if r == 1:
      return self.head_bottom(x)
    b, n, d = x.shape
    head = self.head_bottom
    kernel = head.kernel[...].reshape(d, r, k).astype(x.dtype)
    bias = head.bias[...].reshape(r, k).astype(x.dtype)
    logits = jnp.einsum("bcjd,djk->bcjk", x.reshape(b, n // r, r, d), kernel) + bias
    return logits.reshape(b, n, k)

  def context(
    self,
    text_states: jax.Array | None,
    text_mask: jax.Array | None,
    drop: jax.Array | None = None,
    batch_size: int | None = None,
  ) -> tuple[jax.Array, jax.Array]:
    """The condition the blocks cross-attend to.

    Args:
      text_states: (B, T, H) the Q-Former's text-mode states, or None: the null condition for
        every row (then `batch_size` gives B).
      text_mask: (B, T) 1 on tokens, 0 on padding.
      drop: bool (B,), True where the row gets the null condition instead of its text.
    Returns:
      context (B, T or L, D) after the context LayerNorm, mask bool (B, T or L).
    """
    null = self.null_embedding[...].astype(self.dtype)
    if text_states is None or self.condition == "none":
      b = batch_size if text_states is None else text_states.shape[0]
      ctx = jnp.broadcast_to(null, (b,) + null.shape[1:])
      return self.context_norm(ctx), jnp.ones(ctx.shape[:2], bool)
    ctx = self.text_projection(text_states.astype(self.dtype))
    mask = text_mask.astype(bool)
    if drop is not None:
      t, n = ctx.shape[1], null.shape[1]
      if n > t:
        raise ValueError(f"model.null_length={n} exceeds the text length {t}")
      null_ctx = jnp.pad(null, ((0, 0), (0, t - n), (0, 0)))
      null_mask = jnp.arange(t) < n
      ctx = jnp.where(drop[:, None, None], null_ctx, ctx)
      mask = jnp.where(drop[:, None], null_mask[None, :], mask)
    return self.context_norm(ctx), mask

  def __call__(
    self,
    tokens: jax.Array,
    text_states: jax.Array | None,
    text_mask: jax.Array | None,
    *,
    drop: jax.Array | None = None,
    rngs: nnx.Rngs | None = None,
  ) -> jax.Array:
    """Logits for every position.

    Args:
      tokens: (B, N) int32, codes in [0, K) or `mask_id` (at every depth), top grid first
        (`flatten_codes`).
      text_states, text_mask, drop: the condition (`context`); None states: unconditional.
      rngs: dropout randomness (None: deterministic).
    Returns:
      (B, N, K) float32: the first Nt rows from the top level's output layer, the rest from the
      bottom level's.
    """
    b, n = tokens.shape
    if n != self.num_positions:
      raise ValueError(
        f"expected {self.num_positions} codes per row ((g/2)^2 + g^2 R with g={self.grid}, "
        f"R={self.bottom_depth}), got {n}"
      )
    nt = self.num_top
    x = jnp.concatenate(
      [
        self.code_embedding_top(tokens[:, :nt]),
        self.code_embedding_bottom(self._bottom_ids(tokens[:, nt:])),
      ],
      axis=1,
    )
    x = layers.apply_dropout(self.dropout, x + self._positions().astype(x.dtype), rngs)
    context, mask = self.context(text_states, text_mask, drop, batch_size=b)
    if self.scan:
      step = lambda blk, x, _, r: (blk(x, context, mask, r), None)
      x, _ = stack.scan_layers(self.blocks, step, x, rngs=rngs, remat=self.remat)
    else:
      block = _block_fn(self.remat)
      for blk in self.blocks:
        x = block(blk, x, context, mask, rngs)
    x = self.final_norm(x)
    logits = [self.head_top(x[:, :nt]), self._bottom_logits(x[:, nt:])]
    return jnp.concatenate(logits, axis=1).astype(jnp.float32)


class ConditionedPrior(nnx.Module):
  """What a prior training run trains: `prior` (a `CodePrior`) and, when the text states are
  not cached with the codes, `text_encoder`: the frozen MedUnifier's Q-Former that computes them
  each step (its parameters are excluded from training by `model.frozen_paths`)."""

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    *,
    rngs: nnx.Rngs,
    dtype: str | jnp.dtype | None = None,
    remat: bool = False,
    with_text_encoder: bool | None = None,
  ):
    """`config` is the full prior config; `with_text_encoder` defaults to
    `not config.codes.cache_text_states` (False builds the inference form)."""
    self.prior = CodePrior(config.model, rngs=rngs, dtype=dtype, remat=remat)
    if with_text_encoder is None:
      with_text_encoder = not config.codes.cache_text_states
    encoder = None
    if with_text_encoder:
      from medunifier_jax.models.qformer import QFormer

      enc = config.text_encoder
      if not enc.get("qformer"):
        raise ValueError(
          "config.text_encoder.qformer is empty: it is copied from the MedUnifier "
          "run (set config.medunifier_workdir)"
        )
      encoder = QFormer(
        enc.qformer, int(enc.vision_width), rngs=rngs, dtype=dtype, scan=self.prior.scan
      )
    self.text_encoder = encoder

  def text_condition(self, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(text states (B, T, H), attention mask (B, T)): cached in the batch, or computed by the
    frozen text encoder in evaluation mode (as the codes were)."""
    if "text_states" in batch:
      return batch["text_states"], batch["attention_mask"]
    if self.text_encoder is None:
      raise ValueError("the batch has no text_states and this prior has no text encoder")
    # Constant weights: a scanned encoder then saves nothing for a backward pass (layers.frozen).
    encoder = layers.frozen(self.text_encoder)
    states = encoder(None, batch["input_ids"], batch["attention_mask"], None, mode="text")
    return jax.lax.stop_gradient(states), batch["attention_mask"]
