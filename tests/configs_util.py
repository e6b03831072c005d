"""Loads configs/*.py files by path, as the command-line tools do (configs/ is not a package)."""

import ml_collections

from medunifier_jax import config_lib

CONFIG_DIR = config_lib.CONFIG_DIR


def load_config(variant: str | None = None, name: str = "pretrain") -> ml_collections.ConfigDict:
  """`configs/<name>.py:get_config(variant)`, through the one loader."""
  return config_lib.load(f"{CONFIG_DIR / name}.py:{variant or ''}")
