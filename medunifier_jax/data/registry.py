"""Data set name -> random-access source.

A source is any object with `__len__` and `__getitem__(i) -> record`, where a record is
`{"image": uint8 (S0, S0) grayscale, "report": str, "labels": float32 (F,), "label": int,
"id": str}` (docs/ARCHITECTURE.md, "Batches"). Classification sources also carry
`class_names`. Sources register a factory `factory(split, data_config) -> source`:

  from medunifier_jax.data import registry

  @registry.register("phantom_openi")
  def _phantom_openi(split, data_config):
    return PhantomOpenISource(split, data_config)

Importing this module is cheap: the modules that register sources (phantom sets in
`medunifier_jax.data.sets`, real data sets in `medunifier_jax.data.builders`) are imported only
when a name is looked up.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

SourceFactory = Callable[[str, Any], Any]

# Modules imported on the first lookup; each registers its sources when imported.
SOURCE_MODULES = ("medunifier_jax.data.sets", "medunifier_jax.data.builders")

_FACTORIES: dict[str, SourceFactory] = {}


class UnknownDataSetError(KeyError):
  """Raised by `get_source` for a name nothing registered."""

  def __str__(self) -> str:  # KeyError would print the message in quotes.
    return str(self.args[0])


def register(name: str, factory: SourceFactory | None = None):
  """Registers `factory(split, data_config) -> source` under `name`.

  Usable directly (`register("x", make_x)`) or as a decorator (`@register("x")`). Registering
  the same factory twice is a no-op (modules may be re-imported); a different factory under a
  taken name is an error.
  """

  def _add(f: SourceFactory) -> SourceFactory:
    if not callable(f):
      raise TypeError(f"source factory for {name!r} must be callable, got {type(f).__name__}")
    old = _FACTORIES.get(name)
    if old is not None and _qualname(old) != _qualname(f):
      raise ValueError(
        f"data set name {name!r} is already registered by {_qualname(old)}; "
        f"choose another name for {_qualname(f)}"
      )
    _FACTORIES[name] = f
    return f

  if factory is not None:
    return _add(factory)
  return _add


def _qualname(f: Callable) -> str:
  return f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', repr(f))}"


def known_names() -> list[str]:
  """Sorted names of every registered data set (imports the registering modules)."""
  for module in SOURCE_MODULES:
    importlib.import_module(module)
  return sorted(_FACTORIES)


def get_source(name: str, split: str, data_config: Any):
  """Returns the random-access source for data set `name`, split `split` ("train", ...).

  Registering modules are imported in order until one registers `name`, so phantom sets never
  pull in the real-data builders' dependencies.
  """
  for module in SOURCE_MODULES:
    if name in _FACTORIES:
      break
    importlib.import_module(module)
  if name not in _FACTORIES:
    known = ", ".join(sorted(_FACTORIES)) or "(none)"
    raise UnknownDataSetError(
      f"unknown data set {name!r}; known data sets: {known}. Set config.data.name to one of "
      "them, or register a source with medunifier_jax.data.registry.register."
    )
  return _FACTORIES[name](split, data_config)
