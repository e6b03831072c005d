"""Two-level VQ-VAE of MedUnifier's text-grounded image generation (TIG).

Shapes below use B batch, g = cfg.grid (the ViT patch grid), d = cfg.latent_dim, K =
cfg.codebook_size, S the image size, (qh, qw) = cfg.query_grid. Arrays are NHWC.

  queries (B, qh*qw, Hq) -> top bridge -> (B, g/2, g/2, d) -> top quantizer (K x d)
  patch tokens (B, g*g, Dv) + text [CLS] (B, Ht) -> bottom bridge -> (B, g, g, d)
  quantized top -> residual layer -> x2 transposed conv -> (B, g, g, d), concatenated with the
      bottom encoding -> (B, g, g, 2d) -> bottom quantizer (K x 2d), or with
      `bottom_depth` R > 1 a residual quantizer: R codes per cell (below)
  decoder: quantized top -> its own x2 transposed conv (d) ++ quantized bottom (2d) -> 3d
      -> 3x3 valid conv (g -> g-2) -> residual layer -> k x2 transposed convs -> (B, S, S, 3)
      with S = (g - 2) * 2^k.

The bottom level carries most of an image's detail, one code of K per g x g cell in the paper.
With `bottom_depth` R > 1 (beyond the paper, off by default) each cell gets R codes from R
codebooks, each quantizing what the ones before left (residual quantization, as RQ-VAE):
r_0 = x, c_j = nearest code of r_j in codebook j, r_{j+1} = r_j - e_j(c_j); the quantized
vector is the sum of the R chosen codes (straight-through to x as a whole), and each codebook's
loss is its own quantizer's on r_j (so the commitment terms pull x towards every partial sum).
The codes of a cell are then (B, g, g, R); R = 1 keeps the paper's (B, g, g).

Weights are float32 `nnx.Param`s with logical axis names; `dtype` is the compute dtype (the
quantizers always work in float32). BatchNorm uses batch statistics when `train=True` (and
updates its running averages), running averages when `train=False`. Transposed convolutions
double the size exactly, as PyTorch's ConvTranspose2d(kernel 4, stride 2, padding 1).
Initialisation follows Flax's defaults (LeCun-normal kernels, zero biases); the codebooks are
uniform(-1/K, 1/K) as in the paper's code.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

from medunifier_jax import config_lib
from medunifier_jax.models.layers import partitioned, sinusoidal_position_encoding_2d
from medunifier_jax.models.quantizer import VectorQuantizer

CONV_AXES = (None, None, "conv_in", "conv_out")


@struct.dataclass
class VQOutput:
  """One VQ-VAE pass.

  recon: (B, S, S, 3) reconstruction (compute dtype), to be compared with the [0, 1] image.
  loss_top, loss_bottom: scalar quantizer losses (commitment + codebook terms as configured).
  perplexity_top, perplexity_bottom: exp(entropy) of the batch's code histogram per level.
  usage_top, usage_bottom: fraction of the K codes selected at least once in the batch.
  codes_top: (B, g/2, g/2) int32; codes_bottom: (B, g, g) int32, or (B, g, g, R) with
    `bottom_depth` R > 1 (the perplexity and usage are then the first codebook's).
  """

  recon: jax.Array
  loss_top: jax.Array
  loss_bottom: jax.Array
  perplexity_top: jax.Array
  perplexity_bottom: jax.Array
  usage_top: jax.Array
  usage_bottom: jax.Array
  codes_top: jax.Array
  codes_bottom: jax.Array


def valid_image_sizes(grid: int, count: int = 5) -> list[int]:
  """The first `count` image sizes a bottom grid `grid` can decode to: (grid - 2) * 2^k, k >= 1."""
  return [(grid - 2) * 2**k for k in range(1, count + 1)]


def check_geometry(cfg, image_size: int) -> int:
  """Checks the VQ-VAE config against the image size; returns k, the number of x2 upsamplings.

  The rules and their messages are `config_lib.check_geometry`'s (this is the part of them the
  VQ-VAE can check from its own config).

  Raises:
    ValueError: listing every broken rule with the values that would work.
  """
  return config_lib.check_vqvae_geometry(cfg, image_size)


def resize_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """(B, H, W, C) -> (B, h, w, C), PyTorch's `F.interpolate(mode="nearest")`: src = floor(i*H/h)."""
  _, height, width, _ = x.shape
  rows = (jnp.arange(size[0]) * height) // size[0]
  cols = (jnp.arange(size[1]) * width) // size[1]
  return x[:, rows][:, :, cols]


def _conv(in_ch, out_ch, kernel, *, padding, use_bias, rngs, dtype) -> nnx.Conv:
  return nnx.Conv(
    in_ch,
    out_ch,
    (kernel, kernel),
    padding=padding,
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=partitioned(nnx.initializers.lecun_normal(), CONV_AXES),
    bias_init=partitioned(nnx.initializers.zeros, CONV_AXES[-1:]),
    rngs=rngs,
  )


class UpsampleConv(nnx.ConvTranspose):
  """4x4 stride-2 transposed convolution, (B, H, W, Cin) -> (B, 2H, 2W, Cout) exactly.

  The operator is `nnx.ConvTranspose` with a (4, 4, Cin, Cout) kernel, strides 2 and padding 2
  (PyTorch's ConvTranspose2d(4, stride=2, padding=1): a convolution of the 2x-dilated input
  padded by kernel - 1 - padding = 2 on each side, (2H - 1) + 4 - 4 + 1 = 2H), and it keeps that
  layer's parameters. Lowered as written it convolves the dilated input, so 3/4 of the
  multiply-adds hit inserted zeros. Each output parity instead sees only one tap of every pair:
  out[2m] = x[m-1] w[0] + x[m] w[2] and out[2m+1] = x[m] w[1] + x[m+1] w[3] per axis. So the
  layer runs four stride-1 convolutions with the 2x2 sub-kernels w[dy::2, dx::2] over the input
  padded by one pixel, and interleaves the four phase outputs (depth-to-space).
  """

  # The VQ-VAE sets it from `vqvae.upsample_one_conv` (see `_upsample_one_conv`).
  one_conv: bool = False

  def __call__(self, inputs: jax.Array) -> jax.Array:
    if inputs.ndim != 4:
      raise ValueError(f"UpsampleConv expects (B, H, W, C) inputs, got shape {inputs.shape}.")
    bias = self.bias[...] if self.bias is not None else None
    x, kernel, bias = self.promote_dtype((inputs, self.kernel[...], bias), dtype=self.dtype)
    conv = _upsample_one_conv if self.one_conv else _upsample_phases
    y = conv(x, kernel, self.precision, self.preferred_element_type)
    if bias is not None:
      y = y + bias
    return y


def _upsample_phases(x, kernel, precision=None, preferred_element_type=None) -> jax.Array:
  """`UpsampleConv` without bias: (B, H, W, Cin), (4, 4, Cin, Cout) -> (B, 2H, 2W, Cout)."""
  batch, height, width, _ = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  # Phase (dy, dx) reads padded rows dy .. dy + H and columns dx .. dx + W.
  rows = []
  for dy in range(2):
    cols = []
    for dx in range(2):
      window = padded[:, dy : dy + height + 1, dx : dx + width + 1]
      cols.append(
        jax.lax.conv_general_dilated(
          window,
          kernel[dy::2, dx::2],
          (1, 1),
          "VALID",
          dimension_numbers=("NHWC", "HWIO", "NHWC"),
          precision=precision,
          preferred_element_type=preferred_element_type,
        )
      )
    rows.append(jnp.stack(cols, axis=3))  # (B, H, W, 2, Cout), dx
  y = jnp.stack(rows, axis=2)  # (B, H, 2, W, 2, Cout): out[:, 2m + dy, 2n + dx]
  return y.reshape(batch, 2 * height, 2 * width, y.shape[-1])


def _upsample_one_conv(x, kernel, precision=None, preferred_element_type=None) -> jax.Array:
  """`_upsample_phases` as one convolution with the four phases' sub-kernels side by side.

  A 2x2 convolution of the whole padded input with a (2, 2, Cin, 4 Cout) kernel gives every
  phase at (H + 1) x (W + 1) positions, and phase (dy, dx) is its window at offset (dy, dx).
  The multiply-adds grow by (H + 1)(W + 1) / HW (2% at 112 px), but the input is read once:
  the four phase windows are not sliced out (on some backends copied, each the input's size),
  and the backward pass makes one input gradient instead of four that are summed. At the
  decoder's 224 px end these windows and partial gradients are the step's largest buffers.
  Same values as `_upsample_phases` up to the order of the sums.
  """
  batch, height, width, c_in = x.shape
  c_out = kernel.shape[-1]
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  # kernel[2 ty + dy, 2 tx + dx] is tap (ty, tx) of phase (dy, dx): (2, 2, Cin, 4 Cout).
  taps = kernel.reshape(2, 2, 2, 2, c_in, c_out).transpose(0, 2, 4, 1, 3, 5)
  z = jax.lax.conv_general_dilated(
    padded,
    taps.reshape(2, 2, c_in, 4 * c_out),
    (1, 1),
    "VALID",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    precision=precision,
    preferred_element_type=preferred_element_type,
  )
  # Phase (dy, dx) at (m, n) is z[m + dy, n + dx] in its channel group.
  z = z.reshape(batch, height + 1, width + 1, 2, 2, c_out)
  rows = [
    jnp.stack([z[:, dy : dy + height, dx : dx + width, dy, dx] for dx in range(2)], axis=3)
    for dy in range(2)
  ]
  y = jnp.stack(rows, axis=2)  # (B, H, 2, W, 2, Cout)
  return y.reshape(batch, 2 * height, 2 * width, c_out)


def _upsample_conv(in_ch, out_ch, *, rngs, dtype) -> UpsampleConv:
  """4x4 stride-2 transposed convolution, H -> 2H exactly (see `UpsampleConv`)."""
  return UpsampleConv(
    in_ch,
    out_ch,
    (4, 4),
    strides=(2, 2),
    padding=((2, 2), (2, 2)),
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=partitioned(nnx.initializers.lecun_normal(), CONV_AXES),
    bias_init=partitioned(nnx.initializers.zeros, CONV_AXES[-1:]),
    rngs=rngs,
  )


def _batch_norm(channels, momentum, *, rngs, dtype) -> nnx.BatchNorm:
  # Flax's momentum is the running average's decay: 0.9 equals PyTorch's default momentum=0.1.
  # (PyTorch's running variance uses the unbiased batch variance, Flax's the biased one; the
  # difference is a factor n/(n-1) over B*H*W positions, negligible at these sizes.)
  return nnx.BatchNorm(
    channels,
    momentum=momentum,
    epsilon=1e-5,
    dtype=dtype,
    param_dtype=jnp.float32,
    scale_init=partitioned(nnx.initializers.ones, CONV_AXES[-1:]),
    bias_init=partitioned(nnx.initializers.zeros, CONV_AXES[-1:]),
    rngs=rngs,
  )


def _dense(in_f, out_f, axes, *, rngs, dtype) -> nnx.Linear:
  return nnx.Linear(
    in_f,
    out_f,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=partitioned(nnx.initializers.lecun_normal(), axes),
    bias_init=partitioned(nnx.initializers.zeros, axes[1:]),
    rngs=rngs,
  )


class ResidualLayer(nnx.Module):
  """Bottleneck residual layer: relu(x + BN(1x1(relu(BN(3x3(relu(BN(1x1(x))))))))), (B,H,W,C)."""

  def __init__(self, width: int, *, momentum: float, rngs: nnx.Rngs, dtype=None):
    hidden = width // 2
    conv = lambda i, o, k: _conv(i, o, k, padding="SAME", use_bias=False, rngs=rngs, dtype=dtype)
    bn = lambda c: _batch_norm(c, momentum, rngs=rngs, dtype=dtype)
    self.conv1, self.bn1 = conv(width, hidden, 1), bn(hidden)
    self.conv2, self.bn2 = conv(hidden, hidden, 3), bn(hidden)
    self.conv3, self.bn3 = conv(hidden, width, 1), bn(width)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    avg = not train
    h = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=avg))
    h = jax.nn.relu(self.bn2(self.conv2(h), use_running_average=avg))
    h = self.bn3(self.conv3(h), use_running_average=avg)
    return jax.nn.relu(x + h)


class ResidualStack(nnx.Module):
  """`depth` independent residual layers.

  The paper's code builds its stacks as `[layer] * n`, which repeats one layer object, so its
  stacked layers share weights; that reads as an accident, and here every layer has its own.
  """

  def __init__(self, width: int, depth: int, *, momentum: float, rngs: nnx.Rngs, dtype=None):
    self.layers = nnx.List(
      [ResidualLayer(width, momentum=momentum, rngs=rngs, dtype=dtype) for _ in range(depth)]
    )

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    for layer in self.layers:
      x = layer(x, train=train)
    return x


class MLP(nnx.Module):
  """Linear -> ReLU -> Linear over the last axis."""

  def __init__(self, in_f: int, hidden: int, out_f: int, *, rngs: nnx.Rngs, dtype=None):
    self.fc1 = _dense(in_f, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype)
    self.fc2 = _dense(hidden, out_f, ("mlp", "embed"), rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.relu(self.fc1(x)))


class TopBridge(nnx.Module):
  """Query outputs (B, qh*qw, Hq) -> top encoding (B, g/2, g/2, d)."""

  def __init__(self, cfg, query_width: int, *, rngs: nnx.Rngs, dtype=None):
    d = cfg.latent_dim
    self.query_grid = tuple(cfg.query_grid)
    self.out_grid = (cfg.grid // 2, cfg.grid // 2)
    self.mlp = MLP(query_width, 2 * d, d, rngs=rngs, dtype=dtype)
    self.res = ResidualStack(
      d, cfg.num_res_layers, momentum=cfg.batchnorm_momentum, rngs=rngs, dtype=dtype
    )

  def __call__(self, queries: jax.Array, *, train: bool) -> jax.Array:
    x = self.mlp(queries)
    b, _, d = x.shape
    # Query i sits at row i // qw, column i % qw (the paper's channel-first view, in NHWC).
    x = x.reshape(b, *self.query_grid, d)
    x = x + sinusoidal_position_encoding_2d(*self.query_grid, d).astype(x.dtype)
    x = resize_nearest(x, self.out_grid)
    return self.res(x, train=train)


class BottomBridge(nnx.Module):
  """Patch tokens (B, g*g, Dv) and text [CLS] (B, Ht) -> bottom encoding (B, g, g, d)."""

  def __init__(self, cfg, vision_width: int, text_width: int, *, rngs: nnx.Rngs, dtype=None):
    d = cfg.latent_dim
    self.grid = cfg.grid
    self.mlp = MLP(vision_width + text_width, d, d, rngs=rngs, dtype=dtype)
    self.res = ResidualStack(
      d, cfg.num_res_layers, momentum=cfg.batchnorm_momentum, rngs=rngs, dtype=dtype
    )

  def __call__(self, patch_tokens: jax.Array, text_cls: jax.Array, *, train: bool) -> jax.Array:
    b, _, _ = patch_tokens.shape
    g = self.grid
    patches = patch_tokens.reshape(b, g, g, -1)
    text = jnp.broadcast_to(text_cls[:, None, None, :], (b, g, g, text_cls.shape[-1]))
    x = self.mlp(jnp.concatenate([patches, text.astype(patches.dtype)], axis=-1))
    x = x + sinusoidal_position_encoding_2d(g, g, x.shape[-1]).astype(x.dtype)
    return self.res(x, train=train)


class TopToBottom(nnx.Module):
  """Quantized top (B, g/2, g/2, d) -> residual layer -> x2 transposed conv -> (B, g, g, d)."""

  def __init__(self, d: int, *, momentum: float, rngs: nnx.Rngs, dtype=None):
    self.res = ResidualLayer(d, momentum=momentum, rngs=rngs, dtype=dtype)
    self.up = _upsample_conv(d, d, rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    return self.up(self.res(x, train=train))


class ImageDecoder(nnx.Module):
  """(B, g, g, 3d) -> 3x3 valid conv -> residual layer -> k x2 transposed convs -> (B, S, S, 3).

  Channels 3d -> channels[0] -> ... -> channels[-1] -> 3; BatchNorm + ReLU after every
  transposed convolution but the last. With `remat`, each stage (transposed convolution,
  BatchNorm, ReLU) keeps only its input for the backward pass and recomputes the rest there
  (the peak of the paper step lies in the backward pass of the 112 px stage;
  docs/PERFORMANCE.md). In training, every stage's BatchNorm + ReLU backward is the
  hand-written `_bn_relu` one, which keeps no float32 copies of the normalised activation or
  the ReLU mask: 1.7 GiB less at the paper step's peak, and a 2 to 5 % faster demo step on CPU.
  """

  def __init__(
    self,
    width: int,
    channels: Sequence[int],
    *,
    momentum: float,
    rngs: nnx.Rngs,
    dtype=None,
    remat: bool = False,
  ):
    self.merge = _conv(width, width, 3, padding="VALID", use_bias=True, rngs=rngs, dtype=dtype)
    self.res = ResidualLayer(width, momentum=momentum, rngs=rngs, dtype=dtype)
    widths = [width, *channels, 3]
    self.ups = nnx.List(
      [_upsample_conv(i, o, rngs=rngs, dtype=dtype) for i, o in zip(widths[:-1], widths[1:])]
    )
    self.norms = nnx.List([_batch_norm(c, momentum, rngs=rngs, dtype=dtype) for c in widths[1:-1]])
    self.remat = remat

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = self.res(self.merge(x), train=train)
    stage, last = _decoder_stage_fns(self.remat, train)
    for i, up in enumerate(self.ups):
      x = stage(up, self.norms[i], x) if i < len(self.norms) else last(up, x)
    return x


@functools.cache
def _decoder_stage_fns(remat: bool, train: bool):
  """The decoder's stage calls `stage(up, norm, x)` and `last(up, x)`, rematerialised or not.

  Under `nnx.remat` the BatchNorm running averages are updated once, by the forward pass (the
  backward pass's recomputation updates nothing), so they equal those without remat.
  """

  def stage(up, norm, x):
    if train:
      return _batch_norm_relu_train(norm, up(x))
    return jax.nn.relu(norm(up(x), use_running_average=True))

  def last(up, x):
    return up(x)

  if not remat:
    return stage, last
  # The last stage has no intermediate worth dropping (its input is saved either way).
  return nnx.remat(stage), last


def _batch_norm_relu_train(norm: nnx.BatchNorm, x: jax.Array) -> jax.Array:
  """relu(norm(x)) with batch statistics, as `nnx.BatchNorm` computes it, for (B, H, W, C) x.

  The values and the running-average update are those of `norm(x, use_running_average=False)`
  followed by ReLU. The backward pass is written by hand (`_bn_relu`): it keeps only x and
  recomputes the normalised activation and the ReLU mask inside two fused passes, where the
  differentiated library call materialises both in float32 (at the paper decoder's 112 px stage,
  two buffers of 3.5 GiB each per device).
  """
  # The library's dtype promotion: the parameters are cast to the compute dtype.
  scale, bias = (jnp.asarray(p[...], norm.dtype or x.dtype) for p in (norm.scale, norm.bias))
  y, mean, var = _bn_relu(x, scale, bias, norm.epsilon)
  mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
  m = norm.momentum
  norm.mean[...] = m * norm.mean[...] + (1 - m) * mean
  norm.var[...] = m * norm.var[...] + (1 - m) * var
  return y


def _bn_relu_stats(x):
  """float32 batch mean and (fast, clipped) variance of x over all axes but the last: (C,)."""
  xf = x.astype(jnp.float32)
  axes = tuple(range(x.ndim - 1))
  mean = xf.mean(axes)
  var = jnp.maximum(0.0, jnp.square(xf).mean(axes) - jnp.square(mean))
  return mean, var


def _bn_relu_pre(x, mean, var, scale, bias, eps):
  """The pre-activation (x - mean) * rsqrt(var + eps) * scale + bias, in x's dtype; and x hat."""
  inv = jax.lax.rsqrt(var + eps)
  centred = x.astype(jnp.float32) - mean
  pre = (centred * (inv * scale) + bias).astype(x.dtype)
  return pre, centred * inv, inv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _bn_relu(x, scale, bias, eps):
  """(relu(BN(x)) in x's dtype, batch mean (C,), batch variance (C,)); no gradient to the
  statistics (the caller stops it)."""
  return _bn_relu_fwd(x, scale, bias, eps)[0]


def _bn_relu_fwd(x, scale, bias, eps):
  mean, var = _bn_relu_stats(x)
  pre, _, _ = _bn_relu_pre(x, mean, var, scale, bias, eps)
  return (jax.nn.relu(pre), mean, var), (x, scale, bias, mean, var)


def _bn_relu_bwd(eps, residuals, cotangents):
  # Training-mode BatchNorm's gradient through the batch statistics, with g the gradient that
  # passes the ReLU and n the positions per channel: dx = scale * inv * (g - mean(g) - x hat *
  # mean(g * x hat)). The statistics' own cotangents are ignored (the caller stops them), as is
  # the variance clip's (zero unless a channel is constant).
  x, scale, bias, mean, var = residuals
  dy = cotangents[0]
  pre, xhat, inv = _bn_relu_pre(x, mean, var, scale, bias, eps)
  g = jnp.where(pre > 0, dy.astype(jnp.float32), 0.0)
  axes = tuple(range(x.ndim - 1))
  dbias, dscale = g.sum(axes), (g * xhat).sum(axes)
  n = x.size // x.shape[-1]
  dx = (scale.astype(jnp.float32) * inv) * (g - (dbias + xhat * dscale) / n)
  return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


_bn_relu.defvjp(_bn_relu_fwd, _bn_relu_bwd)


class VQVAE(nnx.Module):
  """MedUnifier's two-level VQ-VAE (DESIGN.md section 1.4).

  Args:
    cfg: `config.model.vqvae` (latent_dim, codebook_size, grid, query_grid, num_res_layers,
      decoder_channels, commitment_weight, codebook_weight, batchnorm_momentum, ema,
      ema_decay, restart_dead_codes; optional memory switches remat_decoder and
      upsample_one_conv, off when absent).
    query_width: Hq, width of the Q-Former query outputs.
    vision_width: Dv, width of the ViT patch tokens.
    text_width: Ht, width of the text [CLS] feature.
    image_size: S, the reconstructed image size; must be (grid - 2) * 2^k.
    dtype: compute dtype (parameters stay float32).
  """

  def __init__(
    self,
    cfg,
    *,
    query_width: int,
    vision_width: int,
    text_width: int,
    image_size: int,
    rngs: nnx.Rngs,
    dtype=None,
  ):
    check_geometry(cfg, image_size)
    d, k, momentum = cfg.latent_dim, cfg.codebook_size, cfg.batchnorm_momentum
    self.grid = cfg.grid
    self.query_grid = tuple(cfg.query_grid)
    self.image_size = image_size
    self.dtype = dtype
    quantizer = lambda width: VectorQuantizer(
      k,
      width,
      commitment_weight=cfg.commitment_weight,
      codebook_weight=cfg.codebook_weight,
      ema=cfg.ema,
      ema_decay=cfg.ema_decay,
      restart_dead_codes=cfg.restart_dead_codes,
      rngs=rngs,
    )
    self.top_bridge = TopBridge(cfg, query_width, rngs=rngs, dtype=dtype)
    self.bottom_bridge = BottomBridge(cfg, vision_width, text_width, rngs=rngs, dtype=dtype)
    self.quantizer_top = quantizer(d)
    self.top_to_bottom = TopToBottom(d, momentum=momentum, rngs=rngs, dtype=dtype)
    self.quantizer_bottom = quantizer(2 * d)
    # Residual codebooks 2..R of the bottom level (none in the paper's setting).
    self.bottom_depth = config_lib.bottom_depth(cfg)
    self.quantizers_bottom_residual = nnx.List(
      [quantizer(2 * d) for _ in range(self.bottom_depth - 1)]
    )
    self.upsample_top = _upsample_conv(d, d, rngs=rngs, dtype=dtype)
    self.decoder = ImageDecoder(
      3 * d,
      tuple(cfg.decoder_channels),
      momentum=momentum,
      rngs=rngs,
      dtype=dtype,
      remat=bool(cfg.get("remat_decoder", False)),
    )
    if cfg.get("upsample_one_conv", False):
      for up in (self.top_to_bottom.up, self.upsample_top, *self.decoder.ups):
        up.one_conv = True

  def __call__(
    self,
    queries: jax.Array,
    patch_tokens: jax.Array,
    text_cls: jax.Array,
    *,
    train: bool,
    rngs: nnx.Rngs | None = None,
  ) -> VQOutput:
    """Encodes, quantizes and reconstructs.

    Args:
      queries: (B, qh*qw, Hq) Q-Former query outputs.
      patch_tokens: (B, g*g, Dv) ViT patch tokens, class token dropped.
      text_cls: (B, Ht) text [CLS] feature.
      train: batch statistics (and their running averages, EMA codebooks, code restarts) in
        training; running averages and fixed codebooks otherwise.
      rngs: only needed in training with `restart_dead_codes`.
    """
    self._check_inputs(queries, patch_tokens, text_cls)
    z_top = self.top_bridge(queries, train=train)
    z_bottom = self.bottom_bridge(patch_tokens, text_cls, train=train)
    top = self.quantizer_top(z_top, train=train, rngs=rngs)
    bottom_in = jnp.concatenate([z_bottom, self.top_to_bottom(top.z_q, train=train)], axis=-1)
    bottom = self._quantize_bottom(bottom_in, train=train, rngs=rngs)
    return VQOutput(
      recon=self._decode(top.z_q, bottom.z_q, train=train),
      loss_top=top.loss,
      loss_bottom=bottom.loss,
      perplexity_top=top.perplexity,
      perplexity_bottom=bottom.perplexity,
      usage_top=top.usage,
      usage_bottom=bottom.usage,
      codes_top=top.codes,
      codes_bottom=bottom.codes,
    )

  def _quantize_bottom(self, x: jax.Array, *, train: bool, rngs: nnx.Rngs | None):
    """x (B, g, g, 2d) -> the bottom level's `QuantizerOutput` (module docstring)."""
    first = self.quantizer_bottom(x, train=train, rngs=rngs)
    if self.bottom_depth == 1:
      return first
    outs, residual = [first], x
    for quantizer in self.quantizers_bottom_residual:
      # What the codes so far leave; the chosen code is a constant, so the next quantizer's
      # commitment term pulls x towards the partial sum.
      residual = residual - jax.lax.stop_gradient(outs[-1].z_q)
      outs.append(quantizer(residual, train=train, rngs=rngs))
    total = sum(jax.lax.stop_gradient(o.z_q) for o in outs)
    return first._replace(
      z_q=x + jax.lax.stop_gradient(total - x),
      loss=sum(o.loss for o in outs),
      codes=jnp.stack([o.codes for o in outs], axis=-1),
    )

  def lookup_bottom(self, codes_bottom: jax.Array) -> jax.Array:
    """Bottom codes (B, g, g) or (B, g, g, R) -> their quantized vectors (B, g, g, 2d) float32."""
    if self.bottom_depth == 1:
      return self.quantizer_bottom.lookup(codes_bottom)
    quantizers = [self.quantizer_bottom, *self.quantizers_bottom_residual]
    return sum(q.lookup(codes_bottom[..., j]) for j, q in enumerate(quantizers))

  @property
  def bottom_codes_shape(self) -> tuple[int, ...]:
    """One image's bottom codes: (g, g), or (g, g, R) with `bottom_depth` R > 1."""
    return config_lib.bottom_codes_shape(self.grid, self.bottom_depth)

  def decode_codes(
    self, codes_top: jax.Array, codes_bottom: jax.Array, *, train: bool = False
  ) -> jax.Array:
    """Images from code grids (e.g. sampled from a prior).

    Args:
      codes_top: (B, g/2, g/2) integer codes of the top level.
      codes_bottom: (B, g, g) integer codes of the bottom level; (B, g, g, R) with
        `bottom_depth` R > 1.
    Returns:
      (B, S, S, 3) images (BatchNorm running averages unless `train`).
    """
    g = self.grid
    if codes_top.shape[1:] != (g // 2, g // 2) or codes_bottom.shape[1:] != self.bottom_codes_shape:
      want = ", ".join(str(n) for n in self.bottom_codes_shape)
      raise ValueError(
        f"decode_codes expects codes_top (B, {g // 2}, {g // 2}) and codes_bottom (B, {want}),"
        f" got {codes_top.shape} and {codes_bottom.shape}."
      )
    z_top = self.quantizer_top.lookup(codes_top).astype(self.dtype or jnp.float32)
    z_bottom = self.lookup_bottom(codes_bottom).astype(self.dtype or jnp.float32)
    return self._decode(z_top, z_bottom, train=train)

  def _decode(self, z_top: jax.Array, z_bottom: jax.Array, *, train: bool) -> jax.Array:
    x = jnp.concatenate([self.upsample_top(z_top), z_bottom.astype(z_top.dtype)], axis=-1)
    return self.decoder(x, train=train)

  def _check_inputs(self, queries, patch_tokens, text_cls) -> None:
    qh, qw = self.query_grid
    g = self.grid
    if queries.ndim != 3 or queries.shape[1] != qh * qw:
      raise ValueError(
        f"the top bridge reads the queries as a {qh}x{qw} grid, so it needs (B, {qh * qw}, H) "
        f"query outputs, got {queries.shape}; make vqvae.query_grid multiply to "
        f"qformer.num_queries."
      )
    if patch_tokens.ndim != 3 or patch_tokens.shape[1] != g * g:
      hint = " (drop the class token)" if patch_tokens.shape[1] == g * g + 1 else ""
      raise ValueError(
        f"the bottom bridge reads patch tokens as a {g}x{g} grid, so it needs (B, {g * g}, Dv), "
        f"got {patch_tokens.shape}{hint}; vit.image_size / vit.patch_size must equal "
        f"vqvae.grid."
      )
    if text_cls.ndim != 2 or text_cls.shape[0] != queries.shape[0]:
      raise ValueError(f"text_cls must be (B, Ht) with B={queries.shape[0]}, got {text_cls.shape}")


def tig_loss(out: VQOutput, target: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """TIG loss = MSE(recon, target) + top and bottom quantizer losses.

  Args:
    out: a `VQOutput`.
    target: (B, S, S, 3) the image in [0, 1].
  Returns:
    (scalar float32 loss, metrics: tig_mse, vq_loss_top/bottom, vq_perplexity_top/bottom,
    vq_usage_top/bottom).
  """
  if target.shape != out.recon.shape:
    raise ValueError(
      f"TIG target must match the reconstruction {out.recon.shape} (the [0, 1] image at the "
      f"model's image size), got {target.shape}."
    )
  mse = jnp.mean(jnp.square(out.recon.astype(jnp.float32) - target.astype(jnp.float32)))
  loss = mse + out.loss_top + out.loss_bottom
  metrics = {
    "tig_mse": mse,
    "vq_loss_top": out.loss_top,
    "vq_loss_bottom": out.loss_bottom,
    "vq_perplexity_top": out.perplexity_top,
    "vq_perplexity_bottom": out.perplexity_bottom,
    "vq_usage_top": out.usage_top,
    "vq_usage_bottom": out.usage_bottom,
  }
  return loss, metrics
