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

from medunifier_jax import model_io


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if not arg:
    raise ValueError(
      "name the run: --config configs/workdir.py:WORKDIR (the directory holding config.json)"
    )
  # As `api.load(WORKDIR)` reads it: tuples back, derived fields linked again, so that an
  # override of a source (`--config.model.vit.image_size`) moves its copies.
  return model_io.load_config(Path(arg).expanduser())
