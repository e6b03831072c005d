"""Building blocks shared by the ViT, the Q-Former and the VQ-VAE.

Weights carry logical axis names (see docs/ARCHITECTURE.md); the training code maps them to mesh
axes with `config.sharding_rules`. Parameters are stored in float32; `dtype` is the compute dtype.
Numerics follow the Hugging Face PyTorch modules so that imported weights reproduce their outputs:
exact (erf) GELU, attention logits scaled by 1/sqrt(head_dim), LayerNorm eps from the config.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

Axes = Sequence[str | None]
# The mesh axis the engine splits examples over (the "batch" rule of config.sharding_rules).
BATCH_MESH_AXIS = "data"

# Embeddings, learned queries and position tables start as N(0, 0.02) (BERT / BLIP-2).
INIT_STD = 0.02
# Dense kernels start as N(0, 1 / fan_in). At BERT-base width that is N(0, 0.036), close to
# BERT's 0.02; at the small widths trained from scratch, 0.02 would make every sublayer's
# contribution vanish against the residual stream (the queries would barely see the image).
DENSE_INIT = nnx.initializers.variance_scaling(1.0, "fan_in", "normal")


def partitioned(init, axes: Axes):
  """`init` annotated with logical axis names, sharded later by the training code's rules."""
  return nnx.with_partitioning(init, tuple(axes), eager_sharding=False)


def param(rngs: nnx.Rngs, init, shape: Sequence[int], axes: Axes) -> nnx.Param:
  """A float32 `nnx.Param` initialised by `init` and annotated with logical axes."""
  return nnx.Param(
    init(rngs.params(), tuple(shape), jnp.float32), out_sharding=tuple(axes), eager_sharding=False
  )


def dense(
  in_features: int,
  out_features: int,
  axes: tuple[str | None, str | None],
  *,
  rngs: nnx.Rngs,
  dtype=None,
  use_bias: bool = True,
) -> nnx.Linear:
  """`nnx.Linear` with an N(0, 1/in) kernel (in, out), zero bias, and logical axes `axes`."""
  return nnx.Linear(
    in_features,
    out_features,
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=partitioned(DENSE_INIT, axes),
    bias_init=partitioned(nnx.initializers.zeros, axes[1:]),
    rngs=rngs,
  )


def layer_norm(features: int, eps: float, *, rngs: nnx.Rngs, dtype=None) -> nnx.LayerNorm:
  """LayerNorm over the last axis (two-pass variance, as PyTorch)."""
  return nnx.LayerNorm(
    features,
    epsilon=eps,
    dtype=dtype,
    param_dtype=jnp.float32,
    use_fast_variance=False,
    scale_init=partitioned(nnx.initializers.ones, ("embed",)),
    bias_init=partitioned(nnx.initializers.zeros, ("embed",)),
    rngs=rngs,
  )


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, x * Phi(x): Hugging Face's "gelu" activation (same shape and dtype).

  Written with erf, as PyTorch computes it, rather than `jax.nn.gelu`'s erfc: XLA expands erfc
  into two rational approximations, an exp and a select (two loop fusions on CPU), erf into
  one polynomial. Forward and backward of a (24, 64, 1024) activation take 0.56x the time
  on CPU; the values differ from erfc's by at most 1e-6 over [-10, 10] (float32 noise).
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * 0.7071067811865476))


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
  """(B, T, h*d) -> (B, h, T, d)."""
  b, t, _ = x.shape
  return x.reshape(b, t, num_heads, -1).transpose(0, 2, 1, 3)


def merge_heads(x: jax.Array) -> jax.Array:
  """(B, h, T, d) -> (B, T, h*d)."""
  b, _, t, _ = x.shape
  return x.transpose(0, 2, 1, 3).reshape(b, t, -1)


def dot_product_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  mask: jax.Array | None,
  dropout: nnx.Dropout | None = None,
  rngs: nnx.Rngs | None = None,
) -> jax.Array:
  """Scaled dot-product attention.

  Args:
    q: (B, h, Tq, d); k, v: (B, h, Tk, d).
    mask: bool, broadcastable to (B, h, Tq, Tk); True where a query may attend. None: all.
    dropout: applied to the attention probabilities when `rngs` is given.
  Returns:
    (B, h, Tq, d), in q's dtype.
  """
  scale = q.shape[-1] ** -0.5
  # Logits and softmax in float32 whatever the compute dtype (bf16 logits lose the ranking).
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    # finfo.min rather than -inf, as the PyTorch reference: a fully masked row stays finite.
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  if dropout is not None and rngs is not None:
    probs = dropout(probs, rngs=rngs)
  return jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v)


def apply_dropout(dropout: nnx.Dropout, x: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
  """Dropout that is active only when call-time `rngs` are given (None: evaluation)."""
  return x if rngs is None else dropout(x, rngs=rngs)


def keep_mask(key: jax.Array, rate: float, shape: Sequence[int]) -> jax.Array:
  """Dropout's keep mask, bool `shape`: True with probability 1 - rate (rate rounded to a
  multiple of 2^-16).

  Each 32-bit word of the key's generator decides two elements, 16 bits each, where
  `jax.random.bernoulli` spends a word (and a float conversion) on every element: on CPU the
  random bits were an eighth of the demo step's op time (docs/PERFORMANCE.md, "Where the
  step's time goes"). The words are drawn for half of axis -2 (the sequence axis of (B, T, D)
  activations and (B, h, Tq, Tk) attention probabilities, never sharded) and their low and high
  halves decide its two halves, so the batch and head axes keep their sharding.
  """
  shape = tuple(shape)
  axis = len(shape) - 2 if len(shape) >= 2 else 0
  n = shape[axis] if shape else 1
  half = list(shape) if shape else [1]
  half[axis] = -(-n // 2)
  words = jax.random.bits(key, tuple(half), jnp.uint32)
  halves = jnp.concatenate([words & 0xFFFF, words >> 16], axis=axis)
  halves = jax.lax.slice_in_dim(halves, 0, n, axis=axis).reshape(shape)
  return halves >= jnp.uint32(round(rate * 2**16))


class Dropout(nnx.Dropout):
  """`nnx.Dropout` with `keep_mask`'s mask (half the random bits); call-time `rngs` only."""

  def __call__(self, inputs: jax.Array, *, rngs: nnx.Rngs | None = None, **_) -> jax.Array:
    """inputs (...) -> the same shape: kept elements scaled by 1 / P(keep), the others 0."""
    if self.rate == 0.0 or rngs is None:
      return inputs
    if self.rate == 1.0:
      return jnp.zeros_like(inputs)
    key = rngs[self.rng_collection]() if isinstance(rngs, nnx.Rngs) else rngs()
    threshold = round(self.rate * 2**16)
    keep = keep_mask(key, self.rate, inputs.shape)
    # The exact keep probability of the rounded threshold keeps E[output] = input.
    scale = jnp.asarray(2**16 / (2**16 - threshold), inputs.dtype)
    return jax.lax.select(keep, inputs * scale, jnp.zeros_like(inputs))


def new_dropout(rate: float) -> Dropout:
  """A stateless dropout layer; its randomness always comes from call-time `rngs`."""
  return Dropout(rate, deterministic=False)


def split_examples(tree, like: jax.Array):
  """`tree`'s arrays with their leading (example) axis split over the batch mesh axis.

  Under a jit with sharded inputs, an array made by gathering rows of the global batch (ITM's
  pairs, with their images' keys/values) or by embedding token ids in a table split over its
  width (FSDP) comes out replicated, and everything computed from it then runs on the whole
  global batch on every device; so may the carry of a scanned layer stack (`stack.py`). The
  constraint keeps each device on its share. `like` is any traced input of the step: its type
  carries the mesh; without one (no mesh, an axis that does not divide the rows) arrays are
  returned as they are.
  """
  mesh = getattr(getattr(jax.typeof(like), "sharding", None), "mesh", None)
  if mesh is None or mesh.empty or BATCH_MESH_AXIS not in mesh.axis_names:
    return tree
  size = mesh.shape[BATCH_MESH_AXIS]
  sharding = NamedSharding(mesh, PartitionSpec(BATCH_MESH_AXIS))

  def constrain(x):
    if x is None or x.ndim == 0 or x.shape[0] % size:
      return x
    return jax.lax.with_sharding_constraint(x, sharding)

  return jax.tree.map(constrain, tree)


def frozen(module: nnx.Module) -> nnx.Module:
  """A copy of `module` whose variables are constants to differentiation (`stop_gradient`).

  Stopping the gradient after a frozen part is not enough once that part holds a `lax.scan`
  (`stack.py`): differentiating the scan with respect to its weights makes the forward loop save
  every layer's activations for a backward pass that is then thrown away, and XLA cannot drop
  a loop's outputs as it drops unused values of unrolled code. With constant weights no backward
  pass is built at all.
  """
  graphdef, state = nnx.split(module)
  return nnx.merge(graphdef, jax.tree.map(jax.lax.stop_gradient, state))


def sinusoidal_position_encoding_2d(height: int, width: int, channels: int) -> jax.Array:
  """Fixed 2D sine/cosine position encoding, (height, width, channels) float32.

  The first half of the channels encodes the row, the second half the column; within each half
  the first quarter is sin(pos * w_i) and the second cos(pos * w_i), w_i = 10000^(-i / (c/4)),
  the transformer encoding applied per axis. `channels` must be divisible by 4.
  """
  if channels % 4:
    raise ValueError(f"2D sinusoidal encoding needs channels divisible by 4, got {channels}")
  quarter = channels // 4
  freqs = 1.0 / (10000.0 ** (jnp.arange(quarter, dtype=jnp.float32) / quarter))

  def encode(n: int) -> jax.Array:  # (n, channels // 2)
    angles = jnp.arange(n, dtype=jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)

  rows = jnp.broadcast_to(encode(height)[:, None, :], (height, width, channels // 2))
  cols = jnp.broadcast_to(encode(width)[None, :, :], (height, width, channels // 2))
  return jnp.concatenate([rows, cols], axis=-1)
