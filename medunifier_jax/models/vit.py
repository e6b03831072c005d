"""BLIP-2 / EVA vision transformer, optionally ending in `ln_vision` (here `post_layernorm`).

Module names follow Hugging Face's `Blip2VisionModel` (the weight importer relies on it):

  ours                                    Hugging Face `vision_model.`
  embeddings.stem  (Conv, optional)       - (none: a stem is trained from scratch)
  embeddings.patch_embedding  (Conv)      embeddings.patch_embedding (OIHW -> HWIO)
  embeddings.class_embedding  (1, 1, D)   embeddings.class_embedding
  embeddings.position_embedding (1,1+N,D) embeddings.position_embedding
  layers[i].layer_norm1 / layer_norm2     encoder.layers[i].layer_norm1 / layer_norm2
  layers[i].self_attn.qkv  (no bias)      encoder.layers[i].self_attn.qkv.weight
  layers[i].self_attn.q_bias, v_bias      encoder.layers[i].self_attn.qkv.bias[:D], [2D:]
  layers[i].self_attn.projection          encoder.layers[i].self_attn.projection
  layers[i].mlp.fc1 / fc2                 encoder.layers[i].mlp.fc1 / fc2
  post_layernorm                          post_layernorm (LAVIS' `ln_vision`)

MedUnifier builds it with `final_norm=False` and holds `ln_vision` itself (`MedUnifier.ln_vision`):
BLIP-2 trains that LayerNorm even when the ViT is frozen, and freezing goes by path (`vit`).

As in EVA, the fused qkv projection has learned query and value biases and no key bias (a key
bias would cancel in the softmax anyway).
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from medunifier_jax.models import layers, stack


class VisionEmbeddings(nnx.Module):
  """Strided-conv patches, a class token and learned absolute positions.

  With `cfg.stem_channels` C > 0 (beyond BLIP-2; 0 by default), a 3 x 3 convolution to C
  channels and a GELU come first, (B, S, S, 3) -> (B, S, S, C), and the patches are cut from
  those features. A ViT trained from scratch on few images learns faster with such an early
  convolution (docs/PAPER_NOTES.md); pretrained BLIP-2 / EVA weights have no stem.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs, dtype=None):
    d, p = cfg.width, cfg.patch_size
    self.grid = cfg.image_size // p
    c = int(cfg.get("stem_channels", 0))
    if c < 0:
      raise ValueError(f"vit.stem_channels must be 0 (no stem) or positive, got {c}")
    self.stem = nnx.data(
      nnx.Conv(
        3,
        c,
        kernel_size=(3, 3),
        padding="SAME",
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=layers.partitioned(layers.DENSE_INIT, (None, None, None, None)),
        bias_init=layers.partitioned(nnx.initializers.zeros, (None,)),
        rngs=rngs,
      )
      if c
      else None
    )
    self.patch_embedding = nnx.Conv(
      c or 3,
      d,
      kernel_size=(p, p),
      strides=(p, p),
      padding="VALID",
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=layers.partitioned(layers.DENSE_INIT, (None, None, None, "embed")),
      bias_init=layers.partitioned(nnx.initializers.zeros, ("embed",)),
      rngs=rngs,
    )
    # N(0, 0.02) as every other weight here (BLIP-2 truncates at 2 std; no practical difference,
    # and one initializer keeps start-up compilation short).
    init = nnx.initializers.normal(layers.INIT_STD)
    self.class_embedding = layers.param(rngs, init, (1, 1, d), (None, None, "embed"))
    self.position_embedding = layers.param(
      rngs, init, (1, 1 + self.grid**2, d), (None, None, "embed")
    )
    self.dtype = dtype

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    """(B, S, S, 3) -> (B, 1 + N, D)."""
    x = pixel_values if self.stem is None else layers.gelu(self.stem(pixel_values))
    x = self.patch_embedding(x)
    b = x.shape[0]
    x = x.reshape(b, -1, x.shape[-1])
    cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (b, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1)
    return x + self.position_embedding[...].astype(x.dtype)


class VisionAttention(nnx.Module):
  """Multi-head self-attention with one fused qkv projection (EVA bias layout)."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs, dtype=None):
    d = cfg.width
    if d % cfg.num_heads:
      raise ValueError(f"vit.width={d} must be divisible by vit.num_heads={cfg.num_heads}")
    self.num_heads = cfg.num_heads
    self.qkv = layers.dense(d, 3 * d, ("embed", "heads"), use_bias=False, rngs=rngs, dtype=dtype)
    if cfg.qkv_bias:
      zeros = nnx.initializers.zeros
      self.q_bias = layers.param(rngs, zeros, (d,), ("heads",))
      self.v_bias = layers.param(rngs, zeros, (d,), ("heads",))
    else:
      self.q_bias = self.v_bias = None
    self.projection = layers.dense(d, d, ("heads", "embed"), rngs=rngs, dtype=dtype)
    self.dropout = layers.new_dropout(cfg.dropout)

  def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
    """(B, T, D) -> (B, T, D)."""
    b, t, d = x.shape
    qkv = self.qkv(x)
    if self.q_bias is not None:
      bias = jnp.concatenate([self.q_bias[...], jnp.zeros_like(self.q_bias[...]), self.v_bias[...]])
      qkv = qkv + bias.astype(qkv.dtype)
    # Hugging Face's layout: (..., 3, heads, head_dim).
    qkv = qkv.reshape(b, t, 3, self.num_heads, d // self.num_heads).transpose(2, 0, 3, 1, 4)
    out = layers.dot_product_attention(qkv[0], qkv[1], qkv[2], None, self.dropout, rngs)
    return self.projection(layers.merge_heads(out))


class VisionMLP(nnx.Module):
  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs, dtype=None):
    self.fc1 = layers.dense(cfg.width, cfg.mlp_dim, ("embed", "mlp"), rngs=rngs, dtype=dtype)
    self.fc2 = layers.dense(cfg.mlp_dim, cfg.width, ("mlp", "embed"), rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(layers.gelu(self.fc1(x)))


class VisionLayer(nnx.Module):
  """Pre-norm block: x + attn(LN(x)), then x + mlp(LN(x))."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs, dtype=None):
    eps = cfg.layer_norm_eps
    self.layer_norm1 = layers.layer_norm(cfg.width, eps, rngs=rngs, dtype=dtype)
    self.self_attn = VisionAttention(cfg, rngs=rngs, dtype=dtype)
    self.layer_norm2 = layers.layer_norm(cfg.width, eps, rngs=rngs, dtype=dtype)
    self.mlp = VisionMLP(cfg, rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
    x = x + self.self_attn(self.layer_norm1(x), rngs)
    return x + self.mlp(self.layer_norm2(x))


class VisionTransformer(nnx.Module):
  """BLIP-2 ViT: (B, S, S, 3) normalised pixels -> (B, 1 + N, D) tokens after the last block,
  then `ln_vision` (`post_layernorm`) unless built with `final_norm=False`."""

  def __init__(
    self,
    cfg: ml_collections.ConfigDict,
    *,
    rngs: nnx.Rngs,
    dtype=None,
    remat: bool = False,
    final_norm: bool = True,
    scan: bool = False,
  ):
    if cfg.image_size % cfg.patch_size:
      raise ValueError(
        f"vit.image_size={cfg.image_size} must be a multiple of vit.patch_size={cfg.patch_size}"
      )
    self.image_size = cfg.image_size
    self.remat = remat
    self.scan = scan  # one lax.scan over the blocks (models/stack.py): one compiled block
    self.embeddings = VisionEmbeddings(cfg, rngs=rngs, dtype=dtype)
    self.layers = nnx.List([VisionLayer(cfg, rngs=rngs, dtype=dtype) for _ in range(cfg.depth)])
    self.post_layernorm = (
      layers.layer_norm(cfg.width, cfg.layer_norm_eps, rngs=rngs, dtype=dtype)
      if final_norm
      else None
    )

  def __call__(self, pixel_values: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    s = self.image_size
    if pixel_values.ndim != 4 or pixel_values.shape[1:] != (s, s, 3):
      raise ValueError(
        f"expected pixel_values of shape (B, {s}, {s}, 3) (NHWC, normalised), "
        f"got {tuple(pixel_values.shape)}; resize images to {s}x{s}"
      )
    x = self.embeddings(pixel_values)
    if self.scan:
      step = lambda layer, x, _, r: (layer(x, r), None)
      x, _ = stack.scan_layers(self.layers, step, x, rngs=rngs, remat=self.remat)
      return x if self.post_layernorm is None else self.post_layernorm(x)
    block = _block_fn(self.remat)
    for layer in self.layers:
      x = block(layer, x, rngs)
    return x if self.post_layernorm is None else self.post_layernorm(x)


@functools.cache
def _block_fn(remat: bool):
  call = lambda layer, x, rngs: layer(x, rngs)
  return nnx.remat(call) if remat else call
