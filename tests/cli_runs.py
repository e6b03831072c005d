"""Shared by the tests that run the training CLI in subprocesses: the command, an environment
that shares compiled programs through JAX's persistent cache, and the run's metrics and
checkpoints on disk."""

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train_command(workdir: Path, overrides: tuple[str, ...], variant: str = "tiny") -> list[str]:
  return [
    sys.executable,
    "-m",
    "medunifier_jax.train",
    "--config",
    f"{ROOT}/configs/pretrain.py:{variant}",
    "--workdir",
    str(workdir),
    *overrides,
  ]


# LLVM's backend optimisations off roughly halves XLA's CPU compile time, which dominates these
# short runs; every run of a comparison is compiled with the same flags.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def cached_env(cache: Path, **extra: str) -> dict[str, str]:
  """This process's environment, with JAX's persistent compilation cache in `cache` (every
  program cached, however quick to compile), fast compilation and the project importable.
  `extra` replaces variables; XLA_FLAGS given there get FAST_COMPILE added."""
  env = dict(
    os.environ,
    JAX_COMPILATION_CACHE_DIR=str(cache),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
    PYTHONPATH=str(ROOT),
  )
  env.update(extra)
  env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
  return env


def records(workdir: Path) -> dict[int, dict]:
  """The last record of each step (a restarted run logs the steps after its checkpoint again)."""
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return {}
  out = {}
  for line in path.read_text().splitlines():
    if line.strip():
      r = json.loads(line)
      out[r["step"]] = r
  return out


def finished_checkpoints(workdir: Path) -> list[int]:
  """Steps whose checkpoint is complete (orbax writes to a temporary name, then renames)."""
  folder = workdir / "checkpoints"
  if not folder.exists():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())
