"""Test set-up: eight simulated CPU devices, set before JAX is imported anywhere."""

import os

from cli_runs import FAST_COMPILE  # no JAX import: the flags below still come first

# FAST_COMPILE (LLVM's backend optimisations off) saves about half of XLA's CPU compile time,
# which most tests spend more on than on running what they compile. Subprocesses inherit it.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count=8 {FAST_COMPILE}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
  """Files holding tests marked `slow` run first, each file's tests in their order.

  `make test` runs two processes (pytest-xdist, a file per process, `--no-loadscope-reorder`):
  the long files start early and the short ones fill in around them, instead of one process
  ending the run alone on the last long file.
  """
  slow_files = {item.path for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.path not in slow_files)  # stable: the order within a file
