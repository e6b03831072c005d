"""Names of pytree paths, shared by the rules that match parameters by name (weight decay,
learning-rate multipliers, sharding) and by the checkpoint's shape checks."""

from collections.abc import Sequence
from typing import Any


def path_names(path: Sequence[Any]) -> list[str]:
  """A `jax.tree_util` key path as its components' names: ["model", "qformer", "0", "bias"]
  (dict keys, attribute names and sequence indices alike)."""
  names = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
    else:
      names.append(str(key))
  return names


def path_str(path: Sequence[Any]) -> str:
  """A key path as `model/qformer/lm_head/bias`."""
  return "/".join(path_names(path))
