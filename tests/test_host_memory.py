"""Huge pages for large host buffers: when the programs restart with the glibc tunable, and that
the restarted process gets large blocks with a few hundred faults instead of one per 4 KiB."""

import json
import os
import subprocess
import sys

import pytest

from medunifier_jax import host_memory

LINUX = {"system": "Linux", "glibc": (2, 36), "mode": "madvise"}

# Writes a 256 MiB block from malloc (mmap-served, as XLA's step temporaries are; not numpy,
# which asks for huge pages itself) and reports the page faults it took, after restarting as the
# programs do.
_CHILD = """
import ctypes, json, os, resource
from medunifier_jax import host_memory
host_memory.reexec_with_huge_pages()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 1 << 28
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = libc.malloc(size)
ctypes.memset(block, 1, size)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
libc.free(ctypes.c_void_p(block))
tunables = os.environ.get("GLIBC_TUNABLES")
print(json.dumps({"tunables": tunables, "faults": faults, "pid": os.getpid()}))
"""


def _child(env_extra: dict[str, str]) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.OPT_OUT)}
  proc = subprocess.Popen(
    [sys.executable, "-c", _CHILD], env={**env, **env_extra}, stdout=subprocess.PIPE, text=True
  )
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0
  result = json.loads(out.strip().splitlines()[-1])
  result["spawned_pid"] = proc.pid
  return result


def test_the_tunable_is_added_only_where_it_helps():
  assert host_memory.tunables_with_huge_pages({}, **LINUX) == host_memory.TUNABLE
  # Other tunables are kept.
  assert (
    host_memory.tunables_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, **LINUX)
    == "glibc.malloc.arena_max=2:" + host_memory.TUNABLE
  )
  # Already set (the restarted process itself, or the user's own choice): nothing to do.
  for value in (host_memory.TUNABLE, "glibc.malloc.hugetlb=0"):
    assert host_memory.tunables_with_huge_pages({"GLIBC_TUNABLES": value}, **LINUX) is None
  assert host_memory.tunables_with_huge_pages({host_memory.OPT_OUT: "0"}, **LINUX) is None
  for change in (
    {"system": "Darwin"},
    {"glibc": None},  # musl or another libc
    {"glibc": (2, 34)},  # before the tunable
    {"mode": "always"},  # every large mapping has huge pages already
    {"mode": "never"},
    {"mode": None},
  ):
    assert host_memory.tunables_with_huge_pages({}, **{**LINUX, **change}) is None


def test_thp_mode_reads_the_bracketed_mode(tmp_path):
  path = tmp_path / "enabled"
  path.write_text("always [madvise] never\n")
  assert host_memory.thp_mode(str(path)) == "madvise"
  path.write_text("[always] madvise never\n")
  assert host_memory.thp_mode(str(path)) == "always"
  assert host_memory.thp_mode(str(tmp_path / "missing")) is None


def test_restart_sets_the_tunable_keeps_the_process_and_cuts_page_faults():
  qualifies = host_memory.tunables_here({}) is not None
  if not qualifies:
    pytest.skip("no glibc >= 2.35 with transparent huge pages in madvise mode here")
  on = _child({})
  off = _child({host_memory.OPT_OUT: "0"})
  assert on["tunables"] == host_memory.TUNABLE
  assert off["tunables"] is None
  # execve keeps the process id: launchers and signals still reach the same process.
  assert on["pid"] == on["spawned_pid"]
  # 256 MiB is 65,536 pages of 4 KiB: one fault each without huge pages, a few hundred with.
  assert off["faults"] > 30000
  assert on["faults"] < off["faults"] / 10
