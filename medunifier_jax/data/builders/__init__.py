"""TFDS builders for the real data sets, registered as sources by name.

  name               builder class                      splits
  mimic_cxr          mimic_cxr.MimicCxr                 train, validation, test (official)
  open_i             open_i.OpenI                       train, validation, test (by report)
  chexpert_5x200     chexpert_5x200.Chexpert5x200       test
  mimic_5x200        mimic_5x200.Mimic5x200             test
  rsna_pneumonia     rsna_pneumonia.RsnaPneumonia       train, validation, test (70/15/15)
  siim_pneumothorax  siim_pneumothorax.SiimPneumothorax train, validation, test (81/9/10)
  covidx             covidx.Covidx                      train, (validation,) test

Prepare one with `python -m medunifier_jax.data.prepare NAME --manual-dir DIR --data-dir DIR`;
then `registry.get_source(NAME, split, config.data)` reads it from `config.data.data_dir`
(`config.data.builder_config` picks a configuration when several are prepared).
"""

from __future__ import annotations

from typing import Any

from medunifier_jax.data import registry
from medunifier_jax.data.builders.chexpert_5x200 import Chexpert5x200
from medunifier_jax.data.builders.common import (
  LayoutError,
  RadiographBuilder,
  StalePreparedError,
  make_config,
)
from medunifier_jax.data.builders.covidx import Covidx
from medunifier_jax.data.builders.mimic_5x200 import Mimic5x200
from medunifier_jax.data.builders.mimic_cxr import MimicCxr
from medunifier_jax.data.builders.open_i import OpenI
from medunifier_jax.data.builders.rsna_pneumonia import RsnaPneumonia
from medunifier_jax.data.builders.siim_pneumothorax import SiimPneumothorax
from medunifier_jax.data.builders.source import TfdsSource, choose_config

BUILDERS: dict[str, type[RadiographBuilder]] = {
  b.name: b
  for b in (MimicCxr, OpenI, Chexpert5x200, Mimic5x200, RsnaPneumonia, SiimPneumothorax, Covidx)
}


def get_builder(name: str) -> type[RadiographBuilder]:
  """The builder class for `name`; a KeyError lists the known names."""
  try:
    return BUILDERS[name]
  except KeyError:
    raise KeyError(f"unknown real data set {name!r}; known: {', '.join(BUILDERS)}") from None


def _factory(builder_cls: type[RadiographBuilder]):
  def factory(split: str, data_config: Any) -> TfdsSource:
    if not data_config.get("data_dir", ""):
      raise ValueError(
        f"config.data.data_dir is empty; set it to the --data-dir where {builder_cls.name} "
        "was prepared"
      )
    config = choose_config(builder_cls.name, data_config, builder_cls)
    return TfdsSource(builder_cls, config, split, data_config.data_dir)

  return factory


for _name, _cls in BUILDERS.items():
  registry.register(_name, _factory(_cls))

__all__ = [
  "BUILDERS",
  "LayoutError",
  "StalePreparedError",
  "TfdsSource",
  "get_builder",
  "make_config",
  *(cls.__name__ for cls in BUILDERS.values()),
]
