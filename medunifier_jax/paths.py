"""Paths a user gives (workdirs, data and cache folders), resolved once where they enter.

A local path, relative or absolute (`~` expanded), becomes absolute against the current
directory at the moment it enters: orbax refuses relative checkpoint paths, and a path resolved
later could be read against another directory. A remote path (`gs://bucket/run`, any
`scheme://`) passes through unchanged; `etils.epath` reads both kinds.

Entry points (the command-line programs, `api.load`, `pretraining.train`,
`evaluation.evaluate`, `demo.run_demo`) call `resolve` on their workdir and `resolve_config` on
their config; code below them receives absolute paths.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import ml_collections

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

# Config fields that hold a local or remote folder ("" means unset).
CONFIG_PATHS = ("data.data_dir", "data.tokenizer_dir")
# Config fields of the form "KIND:DIR" (weight sources), or mappings of names to such strings
# (`init_from.vision`, `init_from.qformer`).
CONFIG_SOURCES = ("init_from",)


def user_cache_dir(*parts: str, env: Mapping[str, str] | None = None) -> str:
  """`$XDG_CACHE_HOME/medunifier_jax/PARTS...` (`~/.cache` without the variable): what the
  project keeps once per user, not per workdir (converted weights, compiled programs)."""
  env = os.environ if env is None else env
  base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "medunifier_jax", *parts)


def is_remote(path: str | os.PathLike) -> bool:
  """True for `scheme://...` paths (gs://, s3://, ...)."""
  return bool(_SCHEME.match(os.fspath(path)))


def resolve(path: str | os.PathLike) -> str:
  """An absolute local path (`~` expanded, `..` collapsed) or the remote path unchanged.

  Raises:
    ValueError: for an empty path, which would otherwise mean the current directory.
  """
  path = os.fspath(path)
  if not path:
    raise ValueError("empty path: give a folder, e.g. workdirs/run")
  if is_remote(path):
    return path
  return os.path.abspath(os.path.expanduser(path))


def resolve_source(source: str) -> str:
  """`KIND:DIR` (e.g. `hf-bert:models/bert`) with DIR resolved; other strings unchanged."""
  kind, sep, folder = str(source).partition(":")
  if not sep or not folder or is_remote(source) or os.sep in kind:
    return source
  return f"{kind}:{resolve(folder)}"


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Resolves the path fields of `config` in place (those it has and that are set); returns it.

  Works on locked configs: only existing fields change.
  """
  for dotted in CONFIG_PATHS + CONFIG_SOURCES:
    *parents, name = dotted.split(".")
    node = config
    for parent in parents:
      node = node.get(parent) if node is not None else None
    if node is None or not node.get(name):
      continue
    value = node[name]
    if dotted in CONFIG_SOURCES and hasattr(value, "items"):
      for key, source in list(value.items()):
        if source:
          value[key] = resolve_source(str(source))
      continue
    value = str(value)
    node[name] = resolve_source(value) if dotted in CONFIG_SOURCES else resolve(value)
  return config
