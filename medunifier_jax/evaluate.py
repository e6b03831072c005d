r"""Downstream evaluation entry point.

  python -m medunifier_jax.evaluate --config configs/pretrain.py:demo --workdir workdirs/demo \
      [--tasks zero_shot,retrieval,finetune,report_gen] [--config.evals.report_gen.num_beams=1]

`--config configs/workdir.py:WORKDIR` evaluates a run with the configuration it saved (its
training overrides included).

Loads the latest checkpoint of the workdir (`api.load(workdir)`; `--random_init` evaluates a
freshly initialised model instead, the chance baseline), runs the `config.evals` entries named
by `--tasks` (default: all), prints a table per entry and writes WORKDIR/eval/results.json:

  {"results":  {entry: {data set: {metric: value}}},
   "protocol": {entry: the settings it ran with},
   "meta":     {"variant", "source", "seconds", ...}}

plus WORKDIR/eval/outputs/ with what figures need (zero-shot probabilities, the retrieval
similarity matrix, generated reports beside the references).

`--decode_benchmark` instead times report decoding (3 beams) at several lengths on a freshly
initialised model of the configured size and prints one JSON line per length and decoder:
generated tokens per second stay flat as length grows with the key/value cache, and fall with
length for the uncached reference that recomputes the prefix at every step.

This module only parses the flags; the work is `medunifier_jax.evaluation`'s.
"""

from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

from medunifier_jax import compilation_cache, evaluation, host_memory

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Config file with an optional variant, e.g. configs/pretrain.py:demo.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory; results go to its eval/.")
_TASKS = flags.DEFINE_list(
  "tasks", None, "config.evals entries (or task names) to run; default: all of them."
)
_RANDOM_INIT = flags.DEFINE_bool(
  "random_init",
  False,
  "Evaluate a freshly initialised model (no checkpoint needed): the chance-level reference.",
)
_DECODE_BENCHMARK = flags.DEFINE_bool(
  "decode_benchmark", False, "Time 3-beam report decoding at several lengths instead of evaluating."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  compilation_cache.enable()
  config = _CONFIG.value
  if _DECODE_BENCHMARK.value:
    max_len = int(config.model.max_text_len)
    lengths = sorted({min(max_len, n) for n in (16, 32, 64, 95)})
    for row in evaluation.decode_benchmark(config, lengths):
      print(json.dumps(row))
    return
  model, tokenizer, source = evaluation.load_model(config, _WORKDIR.value, _RANDOM_INIT.value)
  evaluation.evaluate(
    config, _WORKDIR.value, _TASKS.value, model=model, tokenizer=tokenizer, source=source
  )


if __name__ == "__main__":
  host_memory.reexec_with_huge_pages()
  app.run(main)
