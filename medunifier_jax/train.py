r"""Training entry point: pre-training, and the image prior (configs with `task = "prior"`).

  python -m medunifier_jax.train --config configs/pretrain.py:demo --workdir workdirs/demo \
      [--config.num_steps=500 --config.model.vit.frozen=True ...]
  python -m medunifier_jax.train --config configs/prior.py:demo --workdir workdirs/demo/prior \
      --config.medunifier_workdir=workdirs/demo

Running the same command again resumes from the workdir's latest checkpoint. On a multi-host
TPU slice or a multi-node GPU cluster run it on every host; JAX's distributed runtime is
initialised from the environment the launcher sets (see launch/).
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from medunifier_jax import compilation_cache, host_memory

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Config file with an optional variant, e.g. configs/pretrain.py:tiny.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local path or gs://...).")
flags.mark_flags_as_required(["config", "workdir"])


def _is_multi_process() -> bool:
  """True when the environment describes one process of several (TPU pod slice, SLURM,
  Open MPI, or an explicit JAX coordinator)."""
  env = os.environ
  return (
    "," in env.get("TPU_WORKER_HOSTNAMES", "")
    or int(env.get("SLURM_NTASKS", "1")) > 1
    or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    or bool(env.get("JAX_COORDINATOR_ADDRESS"))
  )


def _explicit_coordinator() -> dict:
  """`jax.distributed.initialize` arguments from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID (JAX itself reads only the address); empty when no address is set, so that
  TPU, SLURM and Open MPI environments are detected by JAX."""
  env = os.environ
  if not env.get("JAX_COORDINATOR_ADDRESS"):
    return {}
  missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not env.get(k)]
  if missing:
    raise app.UsageError(
      f"JAX_COORDINATOR_ADDRESS is set but {' and '.join(missing)} not: set JAX_NUM_PROCESSES "
      "to the number of processes and JAX_PROCESS_ID to this process's index (0, 1, ...)"
    )
  return dict(
    coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
    num_processes=int(env["JAX_NUM_PROCESSES"]),
    process_id=int(env["JAX_PROCESS_ID"]),
  )


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # Library INFO lines (checkpoint manager options, backend probing) would bury the
    # progress bar; --verbosity=0 brings them back.
    logging.set_verbosity(logging.WARNING)
  import jax

  compilation_cache.enable()
  if _is_multi_process():
    # JAX detects TPU metadata, SLURM and Open MPI itself; an explicit coordinator comes with
    # the process count and id (`_explicit_coordinator`).
    jax.distributed.initialize(**_explicit_coordinator())
  logging.info(
    "process %d of %d, %d devices", jax.process_index(), jax.process_count(), jax.device_count()
  )
  config = _CONFIG.value
  if config.get("task", "pretrain") == "prior":
    # configs/prior.py: the image prior over a trained MedUnifier's codes, same engine.
    from medunifier_jax.prior.train import train_prior

    train_prior(config, _WORKDIR.value)
    return
  from medunifier_jax import pretraining

  pretraining.train(config, _WORKDIR.value)


if __name__ == "__main__":
  host_memory.reexec_with_huge_pages()
  app.run(main)
