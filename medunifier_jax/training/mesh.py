"""Device mesh from the config: `config.mesh = [("data", -1), ("model", 1)]`."""

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh


def resolve_mesh_shape(
  axes: Sequence[tuple[str, int]], num_devices: int
) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """Fills in the one `-1` axis with the devices left over.

  Args:
    axes: `(name, size)` pairs; at most one size may be -1.
    num_devices: how many devices the mesh must cover exactly.

  Returns:
    `(names, sizes)` with every size positive and `prod(sizes) == num_devices`.

  Raises:
    ValueError: naming the sizes to change when the mesh cannot cover the devices.
  """
  names = tuple(str(name) for name, _ in axes)
  sizes = [int(size) for _, size in axes]
  if len(set(names)) != len(names):
    raise ValueError(f"config.mesh repeats an axis name: {list(axes)}; give each axis one entry.")
  bad = [f"{n}={s}" for n, s in zip(names, sizes) if s == 0 or s < -1]
  if bad:
    raise ValueError(f"config.mesh sizes must be positive or -1, got {', '.join(bad)}.")
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise ValueError(
      f"config.mesh has {len(free)} axes of size -1 ({[names[i] for i in free]}); at most one "
      "may be -1 (it takes the devices left over). Set the others to explicit sizes."
    )
  fixed = int(np.prod([s for s in sizes if s != -1]))
  if free:
    if num_devices % fixed:
      raise ValueError(
        f"config.mesh {list(axes)}: the fixed axes use {fixed} devices, which does not divide "
        f"the {num_devices} devices available; choose fixed sizes whose product divides "
        f"{num_devices}."
      )
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(
      f"config.mesh {list(axes)} asks for {fixed} devices but {num_devices} are available; "
      f"make the product of the sizes {num_devices}, or set one axis to -1 "
      f"(e.g. --config.mesh=\"[('data', -1), ('model', 1)]\")."
    )
  return names, tuple(sizes)


def make_mesh(axes: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the mesh over all (or the given) devices with `Auto` axis types.

  `Auto` keeps sharding propagation inside XLA, so model code needs no explicit-sharding
  annotations; the types are passed because `jax.make_mesh`'s default has changed across
  releases.
  """
  devices = list(jax.devices() if devices is None else devices)
  names, sizes = resolve_mesh_shape(axes, len(devices))
  return jax.make_mesh(sizes, names, axis_types=(AxisType.Auto,) * len(names), devices=devices)
