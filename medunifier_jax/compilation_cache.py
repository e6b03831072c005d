"""JAX's persistent compilation cache for the command-line programs.

Compiled programs are kept on disk, so that a rerun, a resume or a later program of the same
config loads them instead of compiling them again. On 2 CPU cores the demo's step compiles in
about 57 s and loads back in 6 s, its initialisation in 26 s and 4.5 s (docs/PERFORMANCE.md,
"Where the demo step's compile goes").

The programs that train, evaluate and generate (`train`, `evaluate`, `demo`, `generate`,
`predict`, `supervised_reference`) call `enable()` before they compile anything:
- a cache the user chose is left as it is: `JAX_COMPILATION_CACHE_DIR` set, even to "" (none);
- otherwise JAX gets a folder per user and chip type, `$XDG_CACHE_HOME/medunifier_jax/xla/TAG`
  (by default under `~/.cache`; TAG names the CPU's instruction set, `machine_tag`), capped at
  `MAX_BYTES`: beyond it JAX drops the programs used least recently, and with a cap it also
  locks each entry while it reads or writes it, so that programs running at the same time can
  share the folder;
- `MEDUNIFIER_COMPILATION_CACHE=0` turns that default off.
Only programs that took at least a second to compile are kept (JAX's default threshold).

JAX keys an entry by the program, jaxlib's version, the XLA flags, the compile options and the
devices, not by the CPU, though compiled CPU code targets the instruction set of the chip that
compiled it. Hence TAG: a home folder shared by machines of several chip types gives each type
its own folder. In a folder shared anyway (`JAX_COMPILATION_CACHE_DIR`), XLA compares an entry's
instruction set with the running chip's when it loads it and refuses one built for features the
chip lacks; JAX then warns ("Error reading persistent compilation cache entry") and compiles the
program itself. An entry that cannot be read (a corrupt or truncated file) is handled the same
way, so a shared or damaged folder costs compiles, never a run. JAX does not replace such an
entry: the warning comes back in every run until the folder (or the file it names) is deleted.

The programs that print compile times (`benchmark`, `compile_report`) call `disable()`, so that
those are compiles, never reads. Library use (`import medunifier_jax`) changes no JAX setting.
"""

from __future__ import annotations

import hashlib
import os
import platform
from collections.abc import Mapping

from medunifier_jax import paths

ENV = "JAX_COMPILATION_CACHE_DIR"
OPT_OUT = "MEDUNIFIER_COMPILATION_CACHE"
# The demo's step and initialisation take about 3 MB on the CPU; a paper-size step for an
# accelerator, a few hundred.
MAX_BYTES = 4 << 30


def machine_tag(cpuinfo: str = "/proc/cpuinfo") -> str:
  """`ARCH-HASH`: the machine's architecture and 12 hex digits of a hash of its CPU's features
  (the `flags` line of `cpuinfo` on x86, `Features` on ARM; the processor's name where the file
  cannot be read), e.g. "x86_64-3f2a9c0d41b7"."""
  features = ""
  try:
    with open(cpuinfo) as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
          features = " ".join(sorted(value.split()))
          break
  except OSError:
    pass
  arch = platform.machine() or "unknown"
  basis = f"{arch} {features or platform.processor()}"
  return f"{arch}-{hashlib.sha256(basis.encode()).hexdigest()[:12]}"


def default_dir(env: Mapping[str, str] = os.environ, cpuinfo: str = "/proc/cpuinfo") -> str:
  """`$XDG_CACHE_HOME/medunifier_jax/xla/TAG` (`~/.cache` without the variable), TAG =
  `machine_tag(cpuinfo)`."""
  return paths.user_cache_dir("xla", machine_tag(cpuinfo), env=env)


def enable(env: Mapping[str, str] = os.environ) -> str | None:
  """Points JAX's persistent compilation cache at the default folder unless the user chose one
  or opted out (module docstring). Call before the first compile.

  Returns:
    the folder JAX will use, or None when the cache is off.
  """
  if ENV in env:
    return env[ENV] or None  # JAX read the user's choice at import
  if env.get(OPT_OUT, "1").strip() == "0":
    return None
  import jax  # here, not at the top: the programs import this module before they start JAX

  folder = default_dir(env)
  jax.config.update("jax_compilation_cache_dir", folder)
  if "JAX_COMPILATION_CACHE_MAX_SIZE" not in env:
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
  return folder


def disable() -> None:
  """No reads or writes of the persistent cache in this process, whatever the environment."""
  import jax

  jax.config.update("jax_enable_compilation_cache", False)
