"""Loads configs/*.py files by path, as the command-line tools do (configs/ is not a package)."""

import importlib.util
import pathlib

import ml_collections

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load_config(variant: str | None = None, name: str = "pretrain") -> ml_collections.ConfigDict:
  """`configs/<name>.py:get_config(variant)`."""
  path = CONFIG_DIR / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)
