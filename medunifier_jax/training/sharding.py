"""Logical axis names on weights -> `NamedSharding`s on the mesh; batch sharding.

Weights carry logical names through `nnx.with_partitioning` (the `out_sharding` metadata of
their `nnx.Variable`), e.g. `("embed", "mlp")`. `config.sharding_rules` maps each logical name
to a mesh axis (or `None`: replicated), as in t5x/MaxText.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def rules_dict(rules: Sequence[tuple[str, Any]]) -> dict[str, Any]:
  """`[(logical, mesh_axis_or_None), ...]` -> dict; the first rule for a name wins."""
  out: dict[str, Any] = {}
  for logical, mesh_axis in rules:
    out.setdefault(str(logical), None if mesh_axis is None else mesh_axis)
  return out


def _axis_size(mesh: Mesh, mesh_axis: Any) -> int:
  names = mesh_axis if isinstance(mesh_axis, tuple | list) else (mesh_axis,)
  return int(np.prod([mesh.shape[n] for n in names]))


def logical_to_spec(
    logical: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Mapping[str, Any],
) -> PartitionSpec:
  """Maps one array's logical axis names to a `PartitionSpec` on `mesh`.

  A dimension stays replicated when its rule says `None`, when its mesh axis is already used
  by an earlier dimension, or when its size is not divisible by the mesh axis size (a tiny
  vocabulary of 513 on a model axis of 2, say), so every config runs on every mesh.

  Raises:
    ValueError: a logical name with no rule, or a rule naming an axis the mesh lacks.
  """
  if not logical:
    return PartitionSpec()
  if len(logical) != len(shape):
    raise ValueError(f"logical axes {tuple(logical)} do not match the array shape {tuple(shape)}")
  used: set[str] = set()
  spec = []
  for name, dim in zip(logical, shape):
    if name is None:
      spec.append(None)
      continue
    if name not in rules:
      raise ValueError(
          f"logical axis {name!r} has no entry in config.sharding_rules ({sorted(rules)}); "
          f"add e.g. ('{name}', None)."
      )
    mesh_axis = rules[name]
    axes = () if mesh_axis is None else (
        tuple(mesh_axis) if isinstance(mesh_axis, tuple | list) else (mesh_axis,))
    for a in axes:
      if a not in mesh.shape:
        raise ValueError(
            f"config.sharding_rules maps {name!r} to mesh axis {a!r}, but the mesh has axes "
            f"{tuple(mesh.shape)}; fix the rule or config.mesh."
        )
    if not axes or used.intersection(axes) or dim % _axis_size(mesh, mesh_axis):
      spec.append(None)
      continue
    used.update(axes)
    spec.append(mesh_axis)
  return PartitionSpec(*spec)


def _logical_names(variable: nnx.Variable) -> Sequence[str | None] | None:
  metadata = variable.get_metadata()
  for key in ("out_sharding", "sharding_names", "sharding"):
    if metadata.get(key):
      return tuple(metadata[key])
  return None


def state_shardings(state: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
  """A tree of `NamedSharding` matching `state` (an `nnx.State`, concrete or abstract).

  Variables without logical names (optimizer step, scalars, batch statistics) are replicated.
  Optimizer moments inherit their parameter's metadata in NNX, so they shard like it.
  """
  rd = rules_dict(rules)

  def one(x):
    if isinstance(x, nnx.Variable):
      shape = np.shape(x.get_value())
      return x.replace(NamedSharding(mesh, logical_to_spec(_logical_names(x), shape, mesh, rd)))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_axes(mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> tuple[str, ...]:
  """The mesh axes the batch dimension is split over (the `batch` rule, default `data`)."""
  axis = rules_dict(rules).get("batch", "data")
  axes = () if axis is None else (tuple(axis) if isinstance(axis, tuple | list) else (axis,))
  return tuple(a for a in axes if a in mesh.shape)


def batch_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> NamedSharding:
  """Leading (batch) dimension over the data axes, everything else replicated."""
  axes = batch_axes(mesh, rules)
  return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def check_batch_divisible(global_batch: int, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> None:
  """Fails early, naming the fix, when the batch does not split evenly over the data axes."""
  axes = batch_axes(mesh, rules)
  n = _axis_size(mesh, axes) if axes else 1
  if global_batch % n:
    lower = global_batch - global_batch % n
    raise ValueError(
        f"config.batch_size={global_batch} is not divisible by the data-parallel size {n} "
        f"(mesh axes {axes} of {dict(mesh.shape)}); set --config.batch_size to a multiple of "
        f"{n} (e.g. {max(lower, n)} or {lower + n}) or change config.mesh."
    )
  processes = jax.process_count()
  if global_batch % processes:
    raise ValueError(
        f"config.batch_size={global_batch} is not divisible by the {processes} processes; each "
        "host feeds an equal slice. Use a multiple of the process count."
    )
