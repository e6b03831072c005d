r"""A BERT folder trimmed to the vocabulary of a config's training reports, for `hf-bert:`.

  python -m medunifier_jax.trim_bert --bert DIR --config configs/pretrain.py:demo \
      --out workdirs/bert_trimmed [--layers 2]

Reads the training split's reports of `--config`'s data set, cleans them as training does, and
writes to `--out` the BERT of `--bert` with only the tokens those reports use (and the special
tokens), and with its first `--layers` encoder layers (`weights/trim_bert.py` says how and why).
Prints one JSON line: the sizes before and after, and the overrides that start a run from it:

  python -m medunifier_jax.train --config configs/pretrain.py:demo --workdir W \
      --config.init_from.qformer=hf-bert:OUT --config.data.tokenizer_dir=OUT \
      --config.model.qformer.hidden_size=... (the printed `overrides`)
"""

from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Whose training reports, e.g. configs/pretrain.py:demo"
)
_BERT = flags.DEFINE_string("bert", None, "A Hugging Face BERT folder (config, weights, vocab).")
_OUT = flags.DEFINE_string("out", None, "The folder to write (replaced if it exists).")
_LAYERS = flags.DEFINE_integer("layers", None, "Keep the first N encoder layers (default: all).")
flags.mark_flags_as_required(["config", "bert", "out"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from medunifier_jax.weights import trim_bert

  config = _CONFIG.value
  report = trim_bert.trim_bert(
    _BERT.value, _OUT.value, trim_bert.training_texts(config), num_layers=_LAYERS.value
  )
  overrides = trim_bert.run_overrides(report.folder, config)
  print(json.dumps({**vars(report), "overrides": overrides}))


if __name__ == "__main__":
  app.run(main)
