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

from medunifier_jax.training import tree_paths


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
  logical: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh, rules: Mapping[str, Any]
) -> PartitionSpec:
  """Maps one array's logical axis names to a `PartitionSpec` on `mesh`.

  A dimension stays replicated when its rule says `None` or when its mesh axis is already used
  by an earlier dimension. A dimension its mesh axes do not divide is an error, not a silent
  replication: a replicated vocabulary (513 rows on a model axis of 2, say) costs every device
  the whole table and its gradient, so the config should pad it instead.

  Raises:
    ValueError: a logical name with no rule, a rule naming an axis the mesh lacks, or a
      dimension whose size the mesh axes of its rule do not divide (the message names the fix).
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
    axes = (
      ()
      if mesh_axis is None
      else (tuple(mesh_axis) if isinstance(mesh_axis, tuple | list) else (mesh_axis,))
    )
    for a in axes:
      if a not in mesh.shape:
        raise ValueError(
          f"config.sharding_rules maps {name!r} to mesh axis {a!r}, but the mesh has axes "
          f"{tuple(mesh.shape)}; fix the rule or config.mesh."
        )
    if not axes or used.intersection(axes):
      spec.append(None)
      continue
    size = _axis_size(mesh, mesh_axis)
    if dim % size:
      raise ValueError(_indivisible(name, mesh_axis, dim, size))
    used.update(axes)
    spec.append(mesh_axis)
  return PartitionSpec(*spec)


# Where the size of a logical axis is set, for the error's fix.
_SIZE_FIELDS = {
  "vocab": "for the Q-Former's vocabulary: model.qformer.vocab_size, which the configs pad to "
  "a multiple of 128"
}


def _indivisible(name: str, mesh_axis: Any, dim: int, size: int) -> str:
  """The error for a dimension of `dim` on mesh axes `mesh_axis` of `size` devices."""
  padded = -(-dim // size) * size
  field = _SIZE_FIELDS.get(name, "in the config field that sets it")
  return (
    f"logical axis {name!r} has size {dim}, which its rule ({name!r}, {mesh_axis!r}) in "
    f"config.sharding_rules cannot split: mesh axis {mesh_axis!r} has size {size} and "
    f"{dim} % {size} = {dim % size}. Fix: pad the dimension to a multiple of {size}, e.g. "
    f"{padded} ({field}), or map the logical axis to None (('{name}', None) in "
    f"config.sharding_rules) to replicate it."
  )


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

  def one(path, x):
    if isinstance(x, nnx.Variable):
      shape = np.shape(x.get_value())
      try:
        spec = logical_to_spec(_logical_names(x), shape, mesh, rd)
      except ValueError as e:
        raise ValueError(f"{tree_paths.path_str(path)} {tuple(shape)}: {e}") from e
      return x.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


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


def global_batch(
  host_batch: dict[str, np.ndarray], mesh: Mesh, rules: Sequence[tuple[str, Any]] = ()
) -> dict[str, jax.Array]:
  """Host batches -> global `jax.Array`s, leading axis split over the batch's mesh axes.

  Every process passes its own host batch (B_host, ...); the global arrays have leading size
  B_host * process_count and are replicated over the other mesh axes.
  """
  sharding = batch_sharding(mesh, rules)
  axes = batch_axes(mesh, rules)
  n = _axis_size(mesh, axes) if axes else 1

  def put(x):
    x = np.asarray(x)
    size = x.shape[0] * jax.process_count()
    if size % n:
      raise ValueError(
        f"the global batch of {size} does not split over the {n} devices of mesh axes "
        f"{axes}; make config.batch_size a multiple of {n}"
      )
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree.map(put, host_batch)
