"""Downstream evaluation as a library: what `python -m medunifier_jax.evaluate` runs.

`evaluate` runs the `config.evals` entries on a model and writes WORKDIR/eval/results.json and
WORKDIR/eval/outputs/ (the layout is in the evaluate program's docstring); `load_model` gives
the model to evaluate (a checkpoint, or the random initialisation training starts from);
`decode_benchmark` times report decoding with and without the key/value cache. The demo and
the tests call these directly; the command-line program only parses flags and calls them.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any


def select_entries(config, tasks) -> list[str]:
  """Entry names of `config.evals` matching `tasks` by entry name or by task."""
  entries = dict(config.evals.items())
  if not tasks:
    return list(entries)
  chosen = [n for n, e in entries.items() if n in tasks or e.get("task", n) in tasks]
  missing = [t for t in tasks if not any(t == n or t == entries[n].get("task", n) for n in entries)]
  if missing:
    from medunifier_jax.evaluators import EVALUATORS

    raise ValueError(
      f"--tasks names {', '.join(missing)}, which config.evals does not "
      f"configure; configured entries: {', '.join(entries) or '(none)'}; "
      f"evaluators: {', '.join(EVALUATORS)}"
    )
  return chosen


def load_model(config, workdir: str, random_init: bool = False):
  """(module, tokenizer or None, description). `random_init` builds the model training starts
  from (`model_io.build`: same seed, dtype and parameters)."""
  from medunifier_jax import api, model_io

  if random_init:
    return model_io.build(config), None, f"random initialisation (seed {config.seed})"

  loaded = api.load(workdir, config=config)
  return loaded.module, loaded.tokenizer, f"checkpoint in {workdir}"


def evaluate(
  config,
  workdir: str,
  tasks=None,
  *,
  model=None,
  tokenizer=None,
  evaluators=None,
  source: str = "",
  log=print,
) -> dict[str, Any]:
  """Runs the selected `config.evals` entries on `model`; writes and returns the results.

  Args:
    config: the full configuration.
    workdir: results go to WORKDIR/eval/; a trained tokenizer is cached in WORKDIR/tokenizer.
    tasks: entry or task names (default: every entry).
    model: an nnx MedUnifier or an api.Model; default: loaded from
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
  meta = {
    "variant": config.get("variant", ""),
    "source": source or "model passed in",
    "seconds": round(time.perf_counter() - start, 1),
  }
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


# Metrics that count things (examples, epochs, steps): printed as integers, not as 12.0000.
COUNT_METRICS = (
  "num_train",
  "best_epoch",
  "n_real",
  "n_generated",
  "n_reports",
  "n_prompts",
  "n_validation",
  "train_steps",
  "num_images",
)


def _fmt(metric: str, value: float) -> str:
  """A table cell: counts as integers, everything else to four decimals."""
  if value != value:  # NaN
    return "nan"
  if metric.rsplit("/", 1)[-1] in COUNT_METRICS:
    return str(int(value))
  return f"{value:.4f}"


def decode_benchmark(
  config, lengths=(16, 32, 64), batch_size: int = 4, num_beams: int = 3, repeats: int = 5
) -> list[dict[str, float]]:
  """Tokens per second of cached beam decoding at each length (fresh model, random images)."""
  import jax
  from flax import nnx

  from medunifier_jax import generation, inference, model_io

  graphdef, state = nnx.split(model_io.build(config))
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
    decoding = generation.DecodingConfig(
      method="beam", num_beams=num_beams, max_length=length, min_length=length
    )
    for cached in (True, False):
      fn = inference.model_fns(graphdef).report_tokens(special, decoding, cached=cached)
      row = generation.measure_decoding_speed(fn, state, pixels, decoding, repeats)
      out.append(dict(row, cache="kv" if cached else "none (full recomputation)"))
  return out
