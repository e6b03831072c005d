r"""Compile the training step ahead of time on a device mesh and print XLA's memory figures.

  python -m medunifier_jax.compile_report --config configs/pretrain.py:paper \
      [--simulated_devices 8] [--config.mesh="[('data', -1), ('model', 1)]"]

Nothing is allocated or executed: the state and batch are `ShapeDtypeStruct`s with the run's
shardings. `--simulated_devices N` makes the CPU backend pretend to have N devices (for checking
a pod layout on a workstation); on real accelerators leave it at 0. Prints one JSON line with
the mesh, parameter counts, step FLOPs and the per-device memory figures.
"""

import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "e.g. configs/pretrain.py:paper")
_SIMULATED = flags.DEFINE_integer("simulated_devices", 8,
                                  "Simulated CPU devices (0: use the real devices).")
flags.mark_flag_as_required("config")


def _simulate_devices(argv: list[str]) -> None:
  """Sets XLA_FLAGS before JAX starts (absl parses flags too late for that)."""
  n = 8
  for i, arg in enumerate(argv):
    if arg.startswith("--simulated_devices="):
      n = int(arg.split("=", 1)[1])
    elif arg == "--simulated_devices" and i + 1 < len(argv):
      n = int(argv[i + 1])
  if n > 0:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
    ).strip()


def main(argv):
  del argv
  import jax

  from medunifier_jax.training import aot
  from medunifier_jax.training import mesh as mesh_lib
  from medunifier_jax.training import state as state_lib

  config = _CONFIG.value
  mesh = mesh_lib.make_mesh(config.mesh)
  t0 = time.perf_counter()
  lowered = aot.lower_train_step(config, mesh)
  lower_s = time.perf_counter() - t0
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0 - lower_s
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  _, abstract, _ = state_lib.abstract_train_state(config, mesh)
  report = {
      "config": config.get("variant", ""),
      "mesh": dict(mesh.shape),
      "platform": jax.devices()[0].platform,
      "parameters": state_lib.count_params(abstract),
      "trainable_parameters": state_lib.count_params(
          abstract, state_lib.optimizer_lib.trainable_filter(config.model)),
      "global_batch": int(config.batch_size),
      "step_flops_per_device": float(cost.get("flops", float("nan"))),
      "memory_per_device": aot.memory_report(compiled),
      "lower_s": lower_s,
      "compile_s": compile_s,
  }
  print(json.dumps(report))


if __name__ == "__main__":
  _simulate_devices(sys.argv)
  app.run(main)
