"""Reading Hugging Face model folders: config.json and weights, without a GPU.

A folder saved by `save_pretrained` holds its weights in one of four layouts, looked for in this
order: `model.safetensors`, `model.safetensors.index.json` (shards), `pytorch_model.bin`,
`pytorch_model.bin.index.json` (shards). Every tensor comes back as a NumPy array on the host;
floating-point tensors are widened to float32 (the model keeps float32 master weights), so
bfloat16 and float16 checkpoints load too.
"""

from __future__ import annotations

import json
import os

import numpy as np

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH = "pytorch_model.bin"
PYTORCH_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, PYTORCH, PYTORCH_INDEX)


def read_config(folder: str) -> dict:
  """The folder's `config.json` as a dict; a clear error when the folder or file is missing."""
  _check_folder(folder)
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"{folder!r} has no config.json; expected a folder written by transformers' "
      "save_pretrained (config.json plus the weight files)."
    )
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); re-save it with save_pretrained") from e


def weight_files(folder: str) -> list[str]:
  """Paths of the weight files of a Hugging Face folder (several when sharded)."""
  _check_folder(folder)
  for name in WEIGHT_FILES:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      continue
    if not name.endswith(".index.json"):
      return [path]
    with open(path) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise ValueError(f"{path} has no 'weight_map'; the shard index is corrupt.")
    shards = sorted(set(weight_map.values()))
    paths = [os.path.join(folder, s) for s in shards]
    absent = [p for p in paths if not os.path.isfile(p)]
    if absent:
      raise FileNotFoundError(f"{path} names shards that are not in the folder: {absent}")
    return paths
  raise FileNotFoundError(
    f"no weights in {folder!r}: expected one of {', '.join(WEIGHT_FILES)} "
    f"(found: {sorted(os.listdir(folder))})."
  )


def read_weights(folder: str) -> dict[str, np.ndarray]:
  """All tensors of a Hugging Face folder, by their state-dict names."""
  tensors: dict[str, np.ndarray] = {}
  for path in weight_files(folder):
    shard = _read_safetensors(path) if path.endswith(".safetensors") else _read_torch(path)
    duplicate = sorted(set(shard) & set(tensors))
    if duplicate:
      raise ValueError(f"{path} repeats tensors already read from another shard: {duplicate}")
    tensors.update(shard)
  return tensors


def _check_folder(folder: str) -> None:
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{folder!r} is not a directory; pass the folder save_pretrained wrote")


def _widen(array: np.ndarray) -> np.ndarray:
  if np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16":
    return np.asarray(array, dtype=np.float32)
  return np.asarray(array)


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import safe_open

  out, bf16 = {}, []
  with safe_open(path, framework="numpy") as f:
    for key in f.keys():
      # NumPy has no bfloat16; those tensors go through the JAX reader below.
      if f.get_slice(key).get_dtype() == "BF16":
        bf16.append(key)
      else:
        out[key] = _widen(f.get_tensor(key))
  if bf16:
    with safe_open(path, framework="flax") as f:
      for key in bf16:
        out[key] = _widen(np.asarray(f.get_tensor(key)))
  return out


def _read_torch(path: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as e:
    raise ImportError(
      f"{path} is a PyTorch pickle; reading it needs the CPU build of torch "
      "(pip install torch), or convert the folder to safetensors."
    ) from e
  # weights_only: a checkpoint is data; never run code from it.
  state = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(state, dict):
    raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict.")
  return {k: _widen((v.float() if v.is_floating_point() else v).numpy()) for k, v in state.items()}
