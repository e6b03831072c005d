r"""Downstream evaluation entry point.

  python -m medunifier_jax.evaluate --config configs/pretrain.py:demo --workdir workdirs/demo \
      [--tasks zero_shot,retrieval,finetune,report_gen] [--config.evals.report_gen.num_beams=1]

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
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from absl import app, flags
from ml_collections import config_flags


def _define_flags() -> None:
  """Command-line flags, defined only when this module runs as a program: it is also a
  library (the demo imports `evaluate`), and absl flags may be defined only once."""
  global _CONFIG, _WORKDIR, _TASKS, _RANDOM_INIT, _DECODE_BENCHMARK
  _CONFIG = config_flags.DEFINE_config_file(
      "config", None, "Config file with an optional variant, e.g. configs/pretrain.py:demo.",
      lock_config=True,
  )
  _WORKDIR = flags.DEFINE_string("workdir", None,
                                 "Training run directory; results go to its eval/.")
  _TASKS = flags.DEFINE_list("tasks", None, "config.evals entries (or task names) to run; "
                             "default: all of them.")
  _RANDOM_INIT = flags.DEFINE_bool("random_init", False, "Evaluate a freshly initialised model "
                                   "(no checkpoint needed): the chance-level reference.")
  _DECODE_BENCHMARK = flags.DEFINE_bool("decode_benchmark", False, "Time 3-beam report decoding "
                                        "at several lengths instead of evaluating.")
  flags.mark_flags_as_required(["config", "workdir"])


def select_entries(config, tasks) -> list[str]:
  """Entry names of `config.evals` matching `tasks` by entry name or by task."""
  entries = dict(config.evals.items())
  if not tasks:
    return list(entries)
  chosen = [n for n, e in entries.items() if n in tasks or e.get("task", n) in tasks]
  missing = [t for t in tasks if not any(t == n or t == entries[n].get("task", n)
                                         for n in entries)]
  if missing:
    from medunifier_jax.evaluators import EVALUATORS

    raise ValueError(f"--tasks names {', '.join(missing)}, which config.evals does not "
                     f"configure; configured entries: {', '.join(entries) or '(none)'}; "
                     f"evaluators: {', '.join(EVALUATORS)}")
  return chosen


def fresh_model(config):
  """A MedUnifier with freshly initialised weights (seed `config.seed`)."""
  from flax import nnx

  from medunifier_jax.models.medunifier import MedUnifier

  return MedUnifier(config.model, rngs=nnx.Rngs(int(config.seed)))


def load_model(config, workdir: str, random_init: bool = False):
  """(module, tokenizer or None, description)."""
  if random_init:
    return fresh_model(config), None, f"random initialisation (seed {config.seed})"
  from medunifier_jax import api

  loaded = api.load(workdir, config=config)
  return loaded.module, loaded.tokenizer, f"checkpoint in {workdir}"


def evaluate(config, workdir: str, tasks=None, *, model=None, tokenizer=None,
             evaluators=None, source: str = "", log=print) -> dict[str, Any]:
  """Runs the selected `config.evals` entries on `model`; writes and returns the results.

  Args:
    config: the full configuration.
    workdir: results go to WORKDIR/eval/; a trained tokenizer is cached in WORKDIR/tokenizer.
    tasks: entry or task names (default: every entry).
    model: an nnx MedUnifier, an api.Model or a (graphdef, state) pair; default: loaded from
      the workdir.
    tokenizer: default: the loaded model's, else `pipeline.build_tokenizer` as training does.
    evaluators: already built evaluators (`evaluators.build_evaluators`) to reuse, with their
      compiled functions; `tasks` is then ignored.
  Returns:
    {entry: {data set: {metric: value}}}.
  """
  from medunifier_jax import paths
  from medunifier_jax.data import pipeline
  from medunifier_jax.evaluators import registry

  workdir = paths.resolve(workdir)
  paths.resolve_config(config)
  if model is None:
    model, loaded_tokenizer, source = load_model(config, workdir)
    tokenizer = tokenizer or loaded_tokenizer
  tokenizer = tokenizer or getattr(model, "tokenizer", None)
  if tokenizer is None:
    tokenizer = pipeline.build_tokenizer(config, cache_dir=os.path.join(workdir, "tokenizer"))
  if evaluators is None:
    evaluators = registry.build_evaluators(config, tokenizer, select_entries(config, tasks))
  registry.bind_workdir(evaluators, workdir)
  start = time.perf_counter()
  results = registry.run_evaluators(evaluators, model, log=log)
  out_dir = os.path.join(workdir, "eval")
  meta = {"variant": config.get("variant", ""), "source": source or "model passed in",
          "seconds": round(time.perf_counter() - start, 1)}
  registry.write_results(os.path.join(out_dir, "results.json"), results, evaluators, meta)
  write_outputs(os.path.join(out_dir, "outputs"), evaluators)
  log(format_table(results, {name: ev.describe() for name, ev in evaluators.items()}))
  return results


def write_outputs(folder: str, evaluators) -> None:
  """Per entry and data set: arrays as .npz, texts as .json (for reports and figures)."""
  import numpy as np

  os.makedirs(folder, exist_ok=True)
  for name, evaluator in evaluators.items():
    for dataset, outputs in evaluator.outputs.items():
      arrays = {k: v for k, v in outputs.items() if isinstance(v, np.ndarray)}
      other = {k: v for k, v in outputs.items() if not isinstance(v, np.ndarray)}
      stem = os.path.join(folder, f"{name}_{dataset}")
      if arrays:
        np.savez_compressed(f"{stem}.npz", **arrays)
      if other:
        with open(f"{stem}.json", "w") as f:
          json.dump(other, f, indent=1, default=str)


def format_table(results: dict[str, Any], protocols: dict[str, str] | None = None) -> str:
  """One table per entry: a row per metric, a column per data set; `protocols[entry]`, when
  given and not empty, is printed under the entry's heading (which protocol made the figures)."""
  lines = []
  protocols = protocols or {}
  for name, by_set in results.items():
    datasets = list(by_set)
    metrics = list(dict.fromkeys(m for d in datasets for m in by_set[d]))
    width = max([len(m) for m in metrics] + [6])
    cols = [max(len(d), 8) for d in datasets]
    lines.append("")
    lines.append(f"== {name} ==")
    if protocols.get(name):
      lines.append(f"({protocols[name]})")
    lines.append(" " * width + "  " + "  ".join(d.rjust(c) for d, c in zip(datasets, cols)))
    for m in metrics:
      cells = []
      for d, c in zip(datasets, cols):
        v = by_set[d].get(m)
        cells.append(("-" if v is None else _fmt(m, v)).rjust(c))
      lines.append(m.ljust(width) + "  " + "  ".join(cells))
  return "\n".join(lines)


COUNT_METRICS = ("num_train", "best_epoch", "n_real", "n_generated", "n_reports", "n_prompts",
                 "n_validation", "train_steps")


def _fmt(metric: str, value: float) -> str:
  if value != value:  # NaN
    return "nan"
  if metric.rsplit("/", 1)[-1] in COUNT_METRICS:
    return str(int(value))
  return f"{value:.4f}"


def decode_benchmark(config, lengths=(16, 32, 64), batch_size: int = 4, num_beams: int = 3,
                     repeats: int = 5) -> list[dict[str, float]]:
  """Tokens per second of cached beam decoding at each length (fresh model, random images)."""
  import jax
  from flax import nnx

  from medunifier_jax import generation

  model = fresh_model(config)
  graphdef, state = nnx.split(model)
  qf = config.model.qformer
  # EOS stays banned (min_length == max_length), so its id does not matter: [SEP] = 3 in the
  # trained vocabularies ([PAD] [UNK] [CLS] [SEP] [MASK] first).
  special = generation.SpecialTokens(bos=int(qf.dec_token_id), eos=3, pad=int(qf.pad_token_id))
  size = int(config.model.vit.image_size)
  pixels = jax.random.normal(jax.random.key(0), (batch_size, size, size, 3))
  out = []
  for length in lengths:
    if length > int(qf.max_position_embeddings):
      continue
    # min_length = max_length: every row decodes the full length, so lengths compare fairly.
    decoding = generation.DecodingConfig(method="beam", num_beams=num_beams, max_length=length,
                                         min_length=length)
    for cached in (True, False):
      fn = generation.make_generate_fn(graphdef, special, decoding, cached=cached)
      row = generation.measure_decoding_speed(fn, state, pixels, decoding, repeats)
      out.append(dict(row, cache="kv" if cached else "none (full recomputation)"))
  return out


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if _DECODE_BENCHMARK.value:
    max_len = int(config.model.max_text_len)
    lengths = sorted({min(max_len, n) for n in (16, 32, 64, 95)})
    for row in decode_benchmark(config, lengths):
      print(json.dumps(row))
    return
  model, tokenizer, source = load_model(config, _WORKDIR.value, _RANDOM_INIT.value)
  evaluate(config, _WORKDIR.value, _TASKS.value, model=model, tokenizer=tokenizer,
           source=source)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
