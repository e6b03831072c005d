"""Inception-v3 pool features for FID and KID: the 2015-12-05 graph every FID is measured with.

The weights come from a TorchScript conversion of that graph (`weights/inception_import.py`
reads it into a cache of arrays). Module names mirror the TorchScript ones, so the importer maps
each `ConvBN` to its tensors by path (`mixed_4.tower_1.conv_3.weight` -> `mixed_4/tower_1/
conv_3/conv/kernel`):

  conv .. conv_4, pool0, pool1   stem: 3x3/2, 3x3, 3x3 (pad 1), max 3x3/2, 1x1, 3x3, max 3x3/2
  mixed, mixed_1, mixed_2        `InceptionA` (35x35; 256, 288, 288 channels out)
  mixed_3                        `InceptionB` (35 -> 17; 768)
  mixed_4 .. mixed_7             `InceptionC` (17x17, 1x7 / 7x1 factorised towers; 768)
  mixed_8                        `InceptionD` (17 -> 8; 1280)
  mixed_9, mixed_10              `InceptionE` (8x8; 2048)
  pool2                          8x8 average: the (B, 2048) pool features

Every convolution of the graph is conv (no bias) -> BatchNorm in inference mode with the stored
mean and variance, no scale, a learned shift, eps 1e-3 -> ReLU. The importer folds the
BatchNorm into the convolution's kernel and bias, so a `ConvBN` here is conv + bias + ReLU.

Pooling follows the graph: max pools pad with -inf; the 3x3 stride-1 average pools of the tower
branches pad by 1 and divide by the number of in-image pixels only (padding excluded); the last
block (`mixed_10`) pools its tower branch with a 3x3 max, not an average, as the graph does.

Input protocol (`preprocess`). The TorchScript network itself takes (B, 3, 299, 299) already in
its input range and does nothing to it; the protocol it expects, and which this module applies
to the project's (B, H, W, 3) images in [0, 1], is:

  1. clip to [0, 1] and, with `quantize` (the default), round to the 256 levels of an 8-bit
     image: features then agree whether an image was saved as PNG or scored straight away;
  2. resize to 299 x 299 (aspect ratio not kept) by the 2015 graph's own bilinear resize:
     output pixel j samples input coordinate j * in / out (corner-aligned at the top-left, not
     at pixel centres), interpolating linearly between floor and floor + 1, the last pixel
     repeated past the edge, no antialiasing when shrinking; a 299 x 299 input is unchanged.
     Half-pixel-centre bilinear (most libraries' default) samples a different grid and moves
     the features; FID against statistics computed with the graph's resize needs this one;
  3. map the 8-bit scale to the graph's input range: v -> (v - 128) / 128, so 0 -> -1 and
     255 -> 0.9921875 (the 2015 graph's own scaling of uint8 pixels).

Convolutions run at HIGHEST precision: on GPUs the default float32 convolution may use TF32
(a 10-bit mantissa), far coarser than the ~1e-6 agreement with the original checked on CPU, and
FIDs computed on different hardware would stop being comparable.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

FEATURE_DIM = 2048
INPUT_SIZE = 299
BN_EPS = 1e-3  # the graph's BatchNorm epsilon; the importer folds it into the biases

# (out_channels, (kh, kw), stride, (pad_h, pad_w)) of one conv + BN + ReLU.
ConvSpec = tuple[int, tuple[int, int], int, tuple[int, int]]


def conv_name(i: int) -> str:
  """Name of the i-th convolution of a tower: conv, conv_1, conv_2, ... (as in the graph)."""
  return "conv" if i == 0 else f"conv_{i}"


def preprocess(images: jax.Array, *, quantize: bool = True) -> jax.Array:
  """The graph's input protocol (module docstring): (B, H, W, 3) in [0, 1] -> (B, 299, 299, 3).

  Returns float32 in [-1, 0.9921875].
  """
  x = jnp.clip(images.astype(jnp.float32), 0.0, 1.0) * 255.0
  if quantize:
    x = jnp.round(x)
  x = resize_axis(resize_axis(x, 1, INPUT_SIZE), 2, INPUT_SIZE)
  return jnp.clip((x - 128.0) / 128.0, -1.0, 255.0 / 128.0 - 1.0)


def resize_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
  """The graph's bilinear resize along one axis (module docstring, step 2) -> `size` long."""
  n = x.shape[axis]
  if n == size:
    return x
  # Sample positions are static: computed once in float64 with NumPy at trace time.
  src = np.arange(size) * (n / size)
  lo = np.minimum(np.floor(src).astype(np.int32), n - 1)
  hi = np.minimum(lo + 1, n - 1)
  frac = (src - lo).astype(np.float32).reshape((size,) + (1,) * (x.ndim - axis - 1))
  a, b = jnp.take(x, lo, axis=axis), jnp.take(x, hi, axis=axis)
  return a + (b - a) * frac


def max_pool(x: jax.Array, size: int, stride: int, pad: int = 0) -> jax.Array:
  """(B, H, W, C) max pool; padding counts as -inf, so it never wins."""
  pads = ((0, 0), (pad, pad), (pad, pad), (0, 0))
  return jax.lax.reduce_window(
    x, -jnp.inf, jax.lax.max, (1, size, size, 1), (1, stride, stride, 1), pads
  )


def avg_pool_3x3(x: jax.Array) -> jax.Array:
  """(B, H, W, C) 3x3 stride-1 average, padded by 1, divided by the in-image pixel count."""
  window, strides, pads = (1, 3, 3, 1), (1, 1, 1, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
  sums = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pads)
  counts = jax.lax.reduce_window(
    jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype), 0.0, jax.lax.add, window, strides, pads
  )
  return sums / counts


class ConvBN(nnx.Module):
  """Convolution with the inference BatchNorm folded into kernel and bias, then ReLU."""

  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    kernel: tuple[int, int],
    stride: int = 1,
    padding: tuple[int, int] = (0, 0),
    *,
    rngs: nnx.Rngs,
  ):
    ph, pw = padding
    self.conv = nnx.Conv(
      in_channels,
      out_channels,
      kernel_size=kernel,
      strides=(stride, stride),
      padding=((ph, ph), (pw, pw)),
      use_bias=True,
      precision=jax.lax.Precision.HIGHEST,
      param_dtype=jnp.float32,
      rngs=rngs,
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, H, W, Cin) -> (B, H', W', Cout)."""
    return jax.nn.relu(self.conv(x))


def conv_bn(in_channels: int, spec: ConvSpec, *, rngs: nnx.Rngs) -> ConvBN:
  out, kernel, stride, pad = spec
  return ConvBN(in_channels, out, kernel, stride, pad, rngs=rngs)


class Tower(nnx.Module):
  """One branch of a block: an optional 3x3 pool, then `ConvBN`s named conv, conv_1, ..."""

  def __init__(
    self, in_channels: int, specs: Sequence[ConvSpec], *, pool: str | None = None, rngs: nnx.Rngs
  ):
    self.pool = pool  # None, "avg" (3x3 stride 1, padding excluded) or "max" (3x3 stride 1)
    self.depth = len(specs)
    for i, spec in enumerate(specs):
      # Attribute names as in the graph, so weights map by path without a table.
      setattr(self, conv_name(i), conv_bn(in_channels, spec, rngs=rngs))
      in_channels = spec[0]

  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, H, W, Cin) -> (B, H', W', Cout of the last conv)."""
    if self.pool == "avg":
      x = avg_pool_3x3(x)
    elif self.pool == "max":
      x = max_pool(x, 3, 1, pad=1)
    for i in range(self.depth):
      x = getattr(self, conv_name(i))(x)
    return x


def c1(out: int) -> ConvSpec:
  """1x1 convolution."""
  return (out, (1, 1), 1, (0, 0))


def c3(out: int, stride: int = 1) -> ConvSpec:
  """3x3 convolution: 'same' padding at stride 1, none at stride 2 (as in the graph)."""
  return (out, (3, 3), stride, (1, 1) if stride == 1 else (0, 0))


def c1x7(out: int) -> ConvSpec:
  return (out, (1, 7), 1, (0, 3))


def c7x1(out: int) -> ConvSpec:
  return (out, (7, 1), 1, (3, 0))


class InceptionA(nnx.Module):
  """35x35 block: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg -> 1x1. Out: 224 + pool_channels."""

  def __init__(self, in_channels: int, pool_channels: int, *, rngs: nnx.Rngs):
    self.conv = conv_bn(in_channels, c1(64), rngs=rngs)
    self.tower = Tower(in_channels, [c1(48), (64, (5, 5), 1, (2, 2))], rngs=rngs)
    self.tower_1 = Tower(in_channels, [c1(64), c3(96), c3(96)], rngs=rngs)
    self.tower_2 = Tower(in_channels, [c1(pool_channels)], pool="avg", rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, 35, 35, Cin) -> (B, 35, 35, 224 + pool_channels)."""
    return jnp.concatenate([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], -1)


class InceptionB(nnx.Module):
  """Grid reduction 35 -> 17: 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | max 3x3/2. Out: 480 + Cin."""

  def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
    self.conv = conv_bn(in_channels, c3(384, stride=2), rngs=rngs)
    self.tower = Tower(in_channels, [c1(64), c3(96), c3(96, stride=2)], rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, 35, 35, Cin) -> (B, 17, 17, 480 + Cin)."""
    return jnp.concatenate([self.conv(x), self.tower(x), max_pool(x, 3, 2)], -1)


class InceptionC(nnx.Module):
  """17x17 block with factorised 7x7 towers of width `mid`. Out: 768."""

  def __init__(self, in_channels: int, mid: int, *, rngs: nnx.Rngs):
    self.conv = conv_bn(in_channels, c1(192), rngs=rngs)
    self.tower = Tower(in_channels, [c1(mid), c1x7(mid), c7x1(192)], rngs=rngs)
    self.tower_1 = Tower(
      in_channels, [c1(mid), c7x1(mid), c1x7(mid), c7x1(mid), c1x7(192)], rngs=rngs
    )
    self.tower_2 = Tower(in_channels, [c1(192)], pool="avg", rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, 17, 17, Cin) -> (B, 17, 17, 768)."""
    return jnp.concatenate([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], -1)


class InceptionD(nnx.Module):
  """Grid reduction 17 -> 8: 1x1 -> 3x3/2 | 1x1 -> 1x7 -> 7x1 -> 3x3/2 | max 3x3/2."""

  def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
    self.tower = Tower(in_channels, [c1(192), c3(320, stride=2)], rngs=rngs)
    self.tower_1 = Tower(in_channels, [c1(192), c1x7(192), c7x1(192), c3(192, stride=2)], rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, 17, 17, Cin) -> (B, 8, 8, 512 + Cin)."""
    return jnp.concatenate([self.tower(x), self.tower_1(x), max_pool(x, 3, 2)], -1)


class InceptionE(nnx.Module):
  """8x8 block with split 1x3 / 3x1 outputs; the graph names its layers flat. Out: 2048."""

  def __init__(self, in_channels: int, pool: str, *, rngs: nnx.Rngs):
    self.pool = pool  # "avg" in mixed_9, "max" in mixed_10 (as the graph has it)
    self.conv = conv_bn(in_channels, c1(320), rngs=rngs)
    self.tower_conv = conv_bn(in_channels, c1(384), rngs=rngs)
    self.tower_mixed_conv = conv_bn(384, (384, (1, 3), 1, (0, 1)), rngs=rngs)
    self.tower_mixed_conv_1 = conv_bn(384, (384, (3, 1), 1, (1, 0)), rngs=rngs)
    self.tower_1_conv = conv_bn(in_channels, c1(448), rngs=rngs)
    self.tower_1_conv_1 = conv_bn(448, c3(384), rngs=rngs)
    self.tower_1_mixed_conv = conv_bn(384, (384, (1, 3), 1, (0, 1)), rngs=rngs)
    self.tower_1_mixed_conv_1 = conv_bn(384, (384, (3, 1), 1, (1, 0)), rngs=rngs)
    self.tower_2_conv = conv_bn(in_channels, c1(192), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, 8, 8, Cin) -> (B, 8, 8, 2048)."""
    a = self.tower_conv(x)
    b = self.tower_1_conv_1(self.tower_1_conv(x))
    pooled = avg_pool_3x3(x) if self.pool == "avg" else max_pool(x, 3, 1, pad=1)
    return jnp.concatenate(
      [
        self.conv(x),
        self.tower_mixed_conv(a),
        self.tower_mixed_conv_1(a),
        self.tower_1_mixed_conv(b),
        self.tower_1_mixed_conv_1(b),
        self.tower_2_conv(pooled),
      ],
      -1,
    )


class InceptionV3(nnx.Module):
  """The FID Inception-v3 up to its 2048-d pool features. Build it with
  `weights.inception_import.load_inception`; freshly initialised weights mean nothing."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv = conv_bn(3, c3(32, stride=2), rngs=rngs)
    self.conv_1 = conv_bn(32, (32, (3, 3), 1, (0, 0)), rngs=rngs)
    self.conv_2 = conv_bn(32, c3(64), rngs=rngs)
    self.conv_3 = conv_bn(64, c1(80), rngs=rngs)
    self.conv_4 = conv_bn(80, (192, (3, 3), 1, (0, 0)), rngs=rngs)
    self.mixed = InceptionA(192, 32, rngs=rngs)
    self.mixed_1 = InceptionA(256, 64, rngs=rngs)
    self.mixed_2 = InceptionA(288, 64, rngs=rngs)
    self.mixed_3 = InceptionB(288, rngs=rngs)
    self.mixed_4 = InceptionC(768, 128, rngs=rngs)
    self.mixed_5 = InceptionC(768, 160, rngs=rngs)
    self.mixed_6 = InceptionC(768, 160, rngs=rngs)
    self.mixed_7 = InceptionC(768, 192, rngs=rngs)
    self.mixed_8 = InceptionD(768, rngs=rngs)
    self.mixed_9 = InceptionE(1280, "avg", rngs=rngs)
    self.mixed_10 = InceptionE(2048, "max", rngs=rngs)

  def pool_features(self, x: jax.Array) -> jax.Array:
    """The network on preprocessed input: (B, 299, 299, 3) in [-1, 1] -> (B, 2048) float32."""
    if x.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
      raise ValueError(f"expected (B, {INPUT_SIZE}, {INPUT_SIZE}, 3) input, got {x.shape}")
    x = self.conv_2(self.conv_1(self.conv(x)))  # 149 -> 147 -> 147
    x = max_pool(x, 3, 2)  # pool0: 73
    x = self.conv_4(self.conv_3(x))  # 73 -> 71
    x = max_pool(x, 3, 2)  # pool1: 35
    x = self.mixed_2(self.mixed_1(self.mixed(x)))
    x = self.mixed_3(x)  # 17
    x = self.mixed_7(self.mixed_6(self.mixed_5(self.mixed_4(x))))
    x = self.mixed_8(x)  # 8
    x = self.mixed_10(self.mixed_9(x))
    return jnp.mean(x, axis=(1, 2))  # pool2: the 8x8 average

  def __call__(self, images: jax.Array, *, quantize: bool = True) -> jax.Array:
    """(B, H, W, 3) float in [0, 1] -> (B, 2048) float32 pool features (`preprocess` first)."""
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(
        f"expected (B, H, W, 3) images, got shape {images.shape}; replicate "
        "grayscale images to 3 channels first"
      )
    return self.pool_features(preprocess(images, quantize=quantize))
