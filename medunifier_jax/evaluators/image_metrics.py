"""Image-generation metrics: FID and KID on the FID Inception-v3's 2048-d pool features.

Feature protocol (`inception_features`, `models/inception.py` for the details): images are
(B, H, W, 3) float in [0, 1], the project's convention for data, generated images and
reconstructions; grayscale radiographs are replicated to 3 channels (this module does it for a
(B, H, W, 1) input). Each image is clipped to [0, 1], rounded to 8-bit levels (`quantize`, on by
default, so scores agree with those of the same images saved as PNG), resized to 299 x 299 with
the 2015 Inception graph's own bilinear resize (sample j of the output reads input coordinate
j * in / out; no antialiasing), mapped to the graph's input range by v -> (v - 128) / 128 on the
0..255 scale, and run through the network; the 8x8 average pool gives the (2048,) feature.

- FID (`fid`, `frechet_distance`): the Frechet distance between Gaussians fitted to the two
  feature sets, ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)). It is biased: two
  samples of one distribution score above 0, by an amount that shrinks roughly as 1/N, so a
  FID is only comparable with another computed at the same N. Print N beside every score
  (`image_scores` returns it with them). `fid` takes the trace of the square root exactly from
  factors of the covariances (`trace_sqrt_product`: an SVD of at most min(N, 2048) square, no
  2048 x 2048 matrix square root, which took about a minute per score on 2 CPU cores);
  `frechet_distance` works from given covariances with `scipy.linalg.sqrtm` and, when they are
  singular (N <= 2048), slightly regularised matrices (`eps` on the diagonals).
- KID (`kid`): the unbiased estimate of the squared maximum mean discrepancy with the cubic
  polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets drawn with a fixed
  seed; the spread over subsets comes with it. Unbiased, so usable at small N, but noisy there.

Features are returned in float64 and every statistic is computed in float64 on the host.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import jax
import numpy as np
import scipy.linalg
from flax import nnx

from medunifier_jax import compile_options
from medunifier_jax.models.inception import FEATURE_DIM

# Diagonal offset for singular covariances, and the largest imaginary part (on the diagonal of
# the matrix square root) still taken for rounding noise.
SQRTM_EPS = 1e-6
IMAG_TOLERANCE = 1e-3


def _forward(graphdef, state, images: jax.Array, quantize: bool) -> jax.Array:
  """(B, H, W, 3) in [0, 1] -> (B, 2048); compiled once per graph and batch shape."""
  return nnx.merge(graphdef, state)(images, quantize=quantize)


# With the project's compiler options (`compile_options`: on the CPU, XLA's own convolution,
# twice as fast here as the default's library).
_pool_features = compile_options.jit(_forward, static_argnames=("graphdef", "quantize"))


def _batches(images, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
  """Re-cuts `images` into (batch_size, H, W, 3) float32 batches, the last zero-padded.

  Yields (batch, real rows). A change of image size ends the current batch early (padded), as
  one compiled function serves one shape.
  """
  chunks = [images] if isinstance(images, (np.ndarray, jax.Array)) else images
  pending: list[np.ndarray] = []
  held = 0

  def flush(parts, rows):
    batch = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
    if rows < batch_size:
      pad = np.zeros((batch_size - rows,) + batch.shape[1:], np.float32)
      batch = np.concatenate([batch, pad], axis=0)
    return batch, rows

  for chunk in chunks:
    chunk = np.asarray(chunk, np.float32)
    if chunk.ndim != 4 or chunk.shape[-1] not in (1, 3):
      raise ValueError(f"expected images of shape (B, H, W, 3) or (B, H, W, 1), got {chunk.shape}")
    if chunk.shape[-1] == 1:
      chunk = np.repeat(chunk, 3, axis=-1)
    if pending and pending[0].shape[1:] != chunk.shape[1:]:
      yield flush(pending, held)
      pending, held = [], 0
    while len(chunk):
      take = min(batch_size - held, len(chunk))
      pending.append(chunk[:take])
      held += take
      chunk = chunk[take:]
      if held == batch_size:
        yield flush(pending, held)
        pending, held = [], 0
  if held:
    yield flush(pending, held)


def inception_features(
  model, images: np.ndarray | Iterable[np.ndarray], batch_size: int = 50, *, quantize: bool = True
) -> np.ndarray:
  """Pool features of every image, in order.

  Args:
    model: the FID `InceptionV3` (`weights.inception_import.load_inception`) or its
      `(graphdef, state)`.
    images: an (N, H, W, C) array, or an iterable of (b, H, W, C) arrays (e.g. generated batches),
      float in [0, 1], C = 3 or 1 (replicated).
    batch_size: images per forward pass; every pass has exactly this many (the last is padded
      and its padding dropped), so the forward compiles once per image size.
    quantize: round to 8-bit levels first (module docstring).
  Returns:
    (N, 2048) float64.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  graphdef, state = model if isinstance(model, tuple) else nnx.split(model)
  # Dispatch every batch before reading any back, so the host cuts the next batch while the
  # device runs the previous one.
  outputs = [
    (_pool_features(graphdef, state, batch, quantize), rows)
    for batch, rows in _batches(images, batch_size)
  ]
  if not outputs:
    return np.zeros((0, FEATURE_DIM), np.float64)
  return np.concatenate([np.asarray(out)[:rows] for out, rows in outputs]).astype(np.float64)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(N, D) -> mean (D,) and unbiased covariance (D, D), float64. Needs N >= 2."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"need (N, D) features with N >= 2, got shape {features.shape}")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(
  mu1: np.ndarray,
  sigma1: np.ndarray,
  mu2: np.ndarray,
  sigma2: np.ndarray,
  *,
  eps: float = SQRTM_EPS,
) -> float:
  """Frechet distance of N(mu1, sigma1) and N(mu2, sigma2):
  ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

  Args:
    mu1, mu2: (D,) means; sigma1, sigma2: (D, D) covariances.
    eps: added to both diagonals when the square root of the singular product comes out
      non-finite or clearly complex (covariances of fewer than D + 1 samples).
  Raises:
    ValueError: shapes disagree, or the square root keeps a large imaginary part.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  d = mu1.shape[0]
  if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(
      f"shapes disagree: mu {mu1.shape} {mu2.shape}, sigma {sigma1.shape} {sigma2.shape}"
    )

  def usable(root):
    if not np.all(np.isfinite(root)):
      return False
    return not np.iscomplexobj(root) or np.allclose(np.diagonal(root).imag, 0, atol=IMAG_TOLERANCE)

  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not usable(covmean):
    offset = eps * np.eye(d)
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if not usable(covmean):
      worst = np.max(np.abs(np.diagonal(covmean).imag)) if np.iscomplexobj(covmean) else np.nan
      raise ValueError(
        f"matrix square root failed (largest imaginary part {worst:.3g}) even "
        f"with eps={eps} on the diagonals; try a larger eps or more samples"
      )
  # Rounding leaves tiny imaginary parts on a real square root: keep the real part.
  covmean = np.real(covmean)
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def covariance_factor(features: np.ndarray) -> np.ndarray:
  """(N, D) features -> L (D, r), r = min(N, D), with L L^T their unbiased covariance (float64).

  With N <= D the centred features themselves, scaled by 1 / sqrt(N - 1), are such a factor;
  with more samples than dimensions, the covariance's eigenvectors scaled by the square roots of
  its (clipped non-negative) eigenvalues.
  """
  x = np.asarray(features, np.float64)
  if x.ndim != 2 or x.shape[0] < 2:
    raise ValueError(f"need (N, D) features with N >= 2, got shape {x.shape}")
  centred = x - x.mean(axis=0)
  n, d = x.shape
  if n <= d:
    return centred.T / np.sqrt(n - 1)
  values, vectors = np.linalg.eigh(centred.T @ centred / (n - 1))
  return vectors * np.sqrt(np.clip(values, 0.0, None))


def trace_sqrt_product(factor_a: np.ndarray, factor_b: np.ndarray) -> float:
  """Tr((S_a S_b)^(1/2)) for S_a = L_a L_a^T, S_b = L_b L_b^T, from L_a (D, r_a), L_b (D, r_b).

  The non-zero eigenvalues of S_a S_b are those of L_a^T S_b L_a = (L_a^T L_b)(L_a^T L_b)^T,
  i.e. the squared singular values of L_a^T L_b: the trace is its nuclear norm. Exact for
  singular covariances too (no regularisation), and the SVD is only (r_a, r_b).
  """
  product = np.asarray(factor_a, np.float64).T @ np.asarray(factor_b, np.float64)
  return float(np.linalg.svd(product, compute_uv=False).sum())


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
  """FID between two (N, D) feature sets (N may differ; compare only scores at equal N).

  The same quantity as `frechet_distance` of the two sets' statistics, computed exactly from
  covariance factors (`trace_sqrt_product`).
  """
  a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
    raise ValueError(f"need (N, D) feature sets of equal D, got {a.shape} and {b.shape}")
  factor_a, factor_b = covariance_factor(a), covariance_factor(b)
  diff = a.mean(axis=0) - b.mean(axis=0)
  # Tr(S) = Tr(L L^T) = the squared Frobenius norm of L.
  traces = np.sum(factor_a**2) + np.sum(factor_b**2)
  return float(diff @ diff + traces - 2.0 * trace_sqrt_product(factor_a, factor_b))


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """(m, D), (n, D) -> (m, n): (x.y / D + 1)^3."""
  return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
  """Unbiased MMD^2 of (m, D) and (n, D) samples with `polynomial_kernel` (m, n >= 2)."""
  m, n = x.shape[0], y.shape[0]
  kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
  # The within-set means leave out the diagonal k(x_i, x_i): that is what removes the bias.
  within_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
  within_y = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
  return float(within_x + within_y - 2.0 * kxy.mean())


def kid(
  features_a: np.ndarray,
  features_b: np.ndarray,
  *,
  subsets: int = 100,
  subset_size: int = 1000,
  seed: int = 0,
) -> tuple[float, float]:
  """KID: unbiased polynomial-kernel MMD^2 averaged over random subsets.

  Args:
    features_a, features_b: (N_a, D), (N_b, D).
    subsets: how many subset pairs to draw.
    subset_size: rows per subset, drawn without replacement from each set; capped at
      min(N_a, N_b) (then every subset is the whole smaller set and the spread is smaller).
    seed: the subsets' random seed, so a score is reproducible.
  Returns:
    (mean, standard deviation) over the subsets.
  """
  a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
    raise ValueError(f"need (N, D) feature sets of equal D, got {a.shape} and {b.shape}")
  size = min(subset_size, a.shape[0], b.shape[0])
  if size < 2:
    raise ValueError(f"KID needs at least 2 samples per set, got {a.shape[0]} and {b.shape[0]}")
  if subsets < 1:
    raise ValueError(f"subsets must be positive, got {subsets}")
  rng = np.random.default_rng(seed)
  values = [
    mmd2_unbiased(
      a[rng.choice(a.shape[0], size, replace=False)], b[rng.choice(b.shape[0], size, replace=False)]
    )
    for _ in range(subsets)
  ]
  return float(np.mean(values)), float(np.std(values))


def image_scores(
  features_real: np.ndarray, features_generated: np.ndarray, **kid_args
) -> dict[str, float]:
  """FID and KID with the sample counts to print beside them; `kid_args` are `kid`'s
  (subsets, subset_size, seed).

  Returns: {"fid", "kid_mean", "kid_std", "n_real", "n_generated"}.
  """
  kid_mean, kid_std = kid(features_real, features_generated, **kid_args)
  return {
    "fid": fid(features_real, features_generated),
    "kid_mean": kid_mean,
    "kid_std": kid_std,
    "n_real": float(len(features_real)),
    "n_generated": float(len(features_generated)),
  }
