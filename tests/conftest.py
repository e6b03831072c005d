"""Test set-up: eight simulated CPU devices and a compilation cache shared by the run's
processes, set before JAX is imported anywhere."""

import os
import shutil
import tempfile

from cli_runs import FAST_COMPILE  # no JAX import: the flags below still come first

# FAST_COMPILE (LLVM's backend optimisations off) saves about half of XLA's CPU compile time,
# which most tests spend more on than on running what they compile. Subprocesses inherit it.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count=8 {FAST_COMPILE}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# `make test` runs two processes (pytest-xdist), and several tests run the CLI in subprocesses;
# many compile the same programs (the tiny model's steps and encoders). JAX's persistent cache
# in one folder for the whole run lets each program be compiled once: the processes pytest
# starts inherit this variable, so only the first process (the one that made it) removes it.
# A folder the caller set is used as it is and kept. A size limit makes JAX take a file lock
# around each read and write (without one, a process could read an entry another is writing;
# JAX would then compile the program itself, with a warning).
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE = tempfile.mkdtemp(prefix="medunifier-test-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
  os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))


def pytest_collection_modifyitems(config, items):
  """Files holding tests marked `slow` run first, each file's tests in their order.

  `make test` runs two processes (pytest-xdist, a file per process, `--no-loadscope-reorder`):
  the long files start early and the short ones fill in around them, instead of one process
  ending the run alone on the last long file.
  """
  slow_files = {item.path for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.path not in slow_files)  # stable: the order within a file


def pytest_unconfigure(config):
  if _OWN_CACHE is not None:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)
