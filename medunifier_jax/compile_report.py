r"""Compile the training step ahead of time on a device mesh and print XLA's memory figures.

  python -m medunifier_jax.compile_report --config configs/pretrain.py:paper \
      [--simulated_devices 8] [--config.mesh="[('data', -1), ('model', 1)]"]

Nothing is allocated or executed: the state and batch are `ShapeDtypeStruct`s with the run's
shardings. `--simulated_devices N` makes the CPU backend pretend to have N devices (for checking
a pod layout on a workstation); on real accelerators leave it at 0. Prints one JSON line with
the mesh, parameter counts, step FLOPs and the per-device memory figures.
"""

import json
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "e.g. configs/pretrain.py:paper")
_SIMULATED = flags.DEFINE_integer(
  "simulated_devices", 8, "Simulated CPU devices (0: use the real devices)."
)
flags.mark_flag_as_required("config")


def _simulate_devices(n: int) -> None:
  """Makes the CPU backend pretend to have `n` devices (0: leave the real devices).

  JAX reads both settings when its backends start, so this runs before anything asks for a
  device; flags are parsed by then, so the count comes from `--simulated_devices` itself.
  """
  import jax

  if n <= 0:
    return
  if not jax.config.jax_platforms:  # a platform the user chose (JAX_PLATFORMS) is kept
    jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", n)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _simulate_devices(_SIMULATED.value)
  import jax

  from medunifier_jax import compilation_cache, pretraining
  from medunifier_jax.training import aot
  from medunifier_jax.training import mesh as mesh_lib
  from medunifier_jax.training import state as state_lib

  compilation_cache.disable()  # compile_s is a compile, never a read from a cache
  config = _CONFIG.value
  mesh = mesh_lib.make_mesh(config.mesh)
  t0 = time.perf_counter()
  task = pretraining.task(config)
  lowered = aot.lower_train_step(config, mesh, task)
  lower_s = time.perf_counter() - t0
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0 - lower_s
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  _, abstract, _ = state_lib.abstract_train_state(config, mesh, task.model_fn)
  report = {
    "config": config.get("variant", ""),
    "mesh": dict(mesh.shape),
    "platform": jax.devices()[0].platform,
    "parameters": state_lib.count_params(abstract),
    "trainable_parameters": state_lib.count_params(
      abstract, state_lib.optimizer_lib.trainable_filter(config.model)
    ),
    "global_batch": int(config.batch_size),
    "step_flops_per_device": float(cost.get("flops", float("nan"))),
    "memory_per_device": aot.memory_report(compiled),
    "lower_s": lower_s,
    "compile_s": compile_s,
  }
  print(json.dumps(report))


if __name__ == "__main__":
  app.run(main)
