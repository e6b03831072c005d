"""Large host buffers on transparent huge pages (Linux with glibc).

XLA on the CPU allocates the temporaries of each call of a compiled step as one block, from a
worker thread: 314 MB for the demo's four-objective step, 395 MB for bench_xs ITC+ITM. glibc
serves a block that large from a fresh `mmap` and unmaps it when it is freed, so every step
faults its pages in again, 4 KiB at a time: 80,000 faults and 0.14 s of kernel time in a demo
step of 0.38 s. glibc's tunable `glibc.malloc.hugetlb=1` makes malloc ask for transparent huge
pages on such mappings (`madvise`), and the faults fall to about 550 (2 MiB pages): the demo's
step takes 0.82x the time (docs/PERFORMANCE.md, "Page faults in every step"). Results do not
change: the same computation runs on other pages.

Tunables are read when a process starts. `reexec_with_huge_pages()`, called by the command-line
programs before they parse their flags, starts the same command line again, once, with the
tunable added to `GLIBC_TUNABLES`, where it can help: Linux, glibc 2.35 or newer, transparent
huge pages in "madvise" mode (in "always" mode every large mapping has them already; in "never"
mode nothing can). The process keeps its id, environment and arguments. `MEDUNIFIER_HUGE_PAGES=0`
turns it off; library use (`import medunifier_jax`) never re-executes anything.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "MEDUNIFIER_HUGE_PAGES"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
_MIN_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
  """The kernel's transparent huge page mode ("always", "madvise", "never"), None if unknown."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1 : end] if 0 <= start < end else None


def _glibc_version() -> tuple[int, ...] | None:
  name, version = platform.libc_ver()
  if name != "glibc" or not version:
    return None
  try:
    return tuple(int(p) for p in version.split("."))
  except ValueError:
    return None


def tunables_with_huge_pages(
  env: Mapping[str, str], *, system: str, glibc: tuple[int, ...] | None, mode: str | None
) -> str | None:
  """The `GLIBC_TUNABLES` value to restart with, or None when a restart would gain nothing
  (another system or libc, an old glibc, THP not in "madvise" mode, the tunable already set, or
  `MEDUNIFIER_HUGE_PAGES=0`)."""
  current = env.get("GLIBC_TUNABLES", "")
  if (
    system != "Linux"
    or glibc is None
    or glibc < _MIN_GLIBC
    or mode != "madvise"
    or env.get(OPT_OUT, "1") == "0"
    or "glibc.malloc.hugetlb" in current
  ):
    return None
  return f"{current}:{TUNABLE}" if current else TUNABLE


def tunables_here(env: Mapping[str, str]) -> str | None:
  """`tunables_with_huge_pages` for this machine (its system, glibc and THP mode)."""
  return tunables_with_huge_pages(
    env, system=platform.system(), glibc=_glibc_version(), mode=thp_mode()
  )


def reexec_with_huge_pages() -> None:
  """Restarts this program's command line with `TUNABLE` set (module docstring); returns
  without doing anything when that would gain nothing. Call it from `if __name__ ==
  "__main__"` only: it replaces the running process."""
  tunables = tunables_here(os.environ)
  argv = getattr(sys, "orig_argv", None)
  if tunables is None or not argv or not sys.executable:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *argv[1:]], {**os.environ, "GLIBC_TUNABLES": tunables})
