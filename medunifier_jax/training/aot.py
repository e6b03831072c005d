"""Ahead-of-time lowering of the training step from abstract inputs (nothing allocated)."""

import jax
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from medunifier_jax.training import state as state_lib
from medunifier_jax.training import step as step_lib
from medunifier_jax.training.task import Task


def lower_train_step(
  config: ml_collections.ConfigDict, mesh: Mesh, task: Task, global_batch: int | None = None
) -> jax.stages.Lowered:
  """`jax.jit(step).lower(...)` on `ShapeDtypeStruct`s carrying the run's shardings.

  The model is only traced (`nnx.eval_shape`), so this works for configurations far larger than
  the host's memory; `.compile()` on the result gives XLA's per-device memory figures.
  """
  graphdef, abstract_state, shardings = state_lib.abstract_train_state(config, mesh, task.model_fn)
  train_step = step_lib.jit_train_step(
    step_lib.make_train_step(graphdef, config, task.loss_fn), shardings, mesh, config.sharding_rules
  )
  key = jax.eval_shape(jax.random.key, 0)
  rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, PartitionSpec()))
  shapes = task.abstract_batch(config, int(global_batch or config.batch_size))
  batch = step_lib.abstract_batch(shapes, mesh, config.sharding_rules)
  return train_step.lower(abstract_state, batch, rng)


def memory_report(compiled: jax.stages.Compiled) -> dict[str, int]:
  """XLA's memory analysis of a compiled step, in bytes per device."""
  mem = compiled.memory_analysis()
  fields = (
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "alias_size_in_bytes",
    "temp_size_in_bytes",
    "generated_code_size_in_bytes",
  )
  out = {f: int(getattr(mem, f)) for f in fields if hasattr(mem, f)}
  # Donated state aliases the outputs, so live memory is arguments + temporaries + the
  # outputs that do not alias an argument.
  out["peak_estimate_bytes"] = (
    out.get("argument_size_in_bytes", 0)
    + out.get("temp_size_in_bytes", 0)
    + out.get("output_size_in_bytes", 0)
    - out.get("alias_size_in_bytes", 0)
  )
  return out
