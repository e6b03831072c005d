r"""The configuration a training run saved (`WORKDIR/config.json`), as a config file.

  python -m medunifier_jax.evaluate --config configs/workdir.py:workdirs/demo \
      --workdir workdirs/demo [--config.evals.zero_shot.split=validation]

The argument after the colon is the run's workdir. The run's settings come back exactly as it
was trained, command-line overrides included (a run started from a trimmed BERT keeps its
Q-Former sizes and tokenizer), so they need not be repeated; `--config.KEY=VALUE` still
overrides on top. Works for every command that takes `--config` (`evaluate`, `train` to resume,
`benchmark`, `compile_report`) and for prior runs too (`configs/workdir.py:W/prior`).
"""

from pathlib import Path

import ml_collections

from medunifier_jax import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if not arg:
    raise ValueError(
      "name the run: --config configs/workdir.py:WORKDIR (the directory holding config.json)"
    )
  from medunifier_jax.training import checkpoint

  config = _tuples(checkpoint.load_config(Path(arg).expanduser()))
  # JSON keeps no links between fields: derive them again, so that an override of a source
  # (`--config.model.vit.image_size`) moves its copies as with the config files.
  return config_lib.derive(config)


def _tuples(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """JSON's lists back to the tuples the config files hold (nested ones too), so that
  command-line overrides, which take tuples, work on them."""

  def fix(value):
    if isinstance(value, ml_collections.ConfigDict):
      return _tuples(value)
    if isinstance(value, list):
      return tuple(fix(v) for v in value)
    return value

  return ml_collections.ConfigDict({k: fix(v) for k, v in config.items()})
