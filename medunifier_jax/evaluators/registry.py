"""Evaluator names -> classes, and running the evaluations a configuration asks for.

`config.evals` maps an entry name to its settings; the entry's `task` (default: the name
itself) picks the evaluator class from `EVALUATORS`, so one task can run twice with different
settings (e.g. `zero_shot` and `zero_shot_itm`). Results are nested
`{entry: {data set: {metric: value}}}`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from medunifier_jax.evaluators.common import Evaluator
from medunifier_jax.evaluators.finetune import FinetuneEvaluator
from medunifier_jax.evaluators.image_gen import ImageGenEvaluator
from medunifier_jax.evaluators.reconstruction import ReconstructionEvaluator
from medunifier_jax.evaluators.report_gen import ReportGenEvaluator
from medunifier_jax.evaluators.retrieval import RetrievalEvaluator
from medunifier_jax.evaluators.zero_shot import ZeroShotEvaluator

EVALUATORS: dict[str, type[Evaluator]] = {
  "zero_shot": ZeroShotEvaluator,
  "retrieval": RetrievalEvaluator,
  "finetune": FinetuneEvaluator,
  "report_gen": ReportGenEvaluator,
  "image_gen": ImageGenEvaluator,
  "reconstruction": ReconstructionEvaluator,
}


def get_evaluator_class(task: str) -> type[Evaluator]:
  """The evaluator class for `task`; a KeyError lists the known names."""
  try:
    return EVALUATORS[task]
  except KeyError:
    raise KeyError(
      f"unknown evaluator {task!r}; known evaluators: {', '.join(EVALUATORS)}"
    ) from None


def build_evaluators(
  config, tokenizer, names=None, *, periodic_only: bool = False
) -> dict[str, Evaluator]:
  """Evaluators for the `config.evals` entries in `names` (default: all of them).

  `periodic_only` keeps the entries whose `periodic` setting is true (those the training loop
  runs every `config.eval_every` steps).
  """
  entries = dict(config.evals.items()) if config.get("evals") else {}
  if names is None:
    names = list(entries)
  unknown = [n for n in names if n not in entries]
  if unknown:
    raise KeyError(
      f"no config.evals entry named {', '.join(map(repr, unknown))}; configured: "
      f"{', '.join(entries) or '(none)'}; evaluators: {', '.join(EVALUATORS)}"
    )
  out = {}
  for name in names:
    entry = entries[name]
    if periodic_only and not entry.get("periodic", False):
      continue
    out[name] = get_evaluator_class(entry.get("task", name))(config, entry, tokenizer)
  return out


def bind_workdir(evaluators: dict[str, Evaluator], workdir: str) -> None:
  """Gives the run's workdir to the evaluators that keep or find files there (those with a
  `workdir` attribute still unset, e.g. image_gen: its priors and cached classifier)."""
  for evaluator in evaluators.values():
    if hasattr(evaluator, "workdir") and evaluator.workdir is None:
      evaluator.workdir = workdir


def run_evaluators(evaluators: dict[str, Evaluator], model, log=None) -> dict[str, Any]:
  """Runs each evaluator on `model`; returns `{entry: {data set: {metric: value}}}`.

  `log(message)`, when given, hears a line per finished evaluator with its time.
  """
  results: dict[str, Any] = {}
  for name, evaluator in evaluators.items():
    start = time.perf_counter()
    for key, value in evaluator.run(model):
      dataset, _, metric = key.partition("/")
      results.setdefault(name, {}).setdefault(dataset, {})[metric] = value
    if log is not None:
      log(f"{name}: {time.perf_counter() - start:.1f} s")
  return results


def flatten(results: dict[str, Any]) -> dict[str, float]:
  """`{entry: {data set: {metric: v}}}` -> `{"entry/data set/metric": v}`."""
  return {
    f"{n}/{d}/{m}": v
    for n, by_set in results.items()
    for d, by_metric in by_set.items()
    for m, v in by_metric.items()
  }


def write_results(
  path: str,
  results: dict[str, Any],
  evaluators: dict[str, Evaluator],
  meta: dict[str, Any] | None = None,
) -> None:
  """Writes results.json: `results` (entry -> data set -> metric -> value), `protocol` (the
  settings each entry used) and `meta` (checkpoint step, config variant, ...)."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  payload = {
    "results": results,
    "protocol": {name: ev.settings() for name, ev in evaluators.items()},
    "meta": meta or {},
  }
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True, default=_json_default)
  os.replace(tmp, path)


def _json_default(value):
  if hasattr(value, "tolist"):
    return value.tolist()
  return str(value)


def make_eval_fn(config, workdir: str):
  """`eval_fn(model, step) -> {"entry/data set/metric": value}` for the training loop, or None
  when no `config.evals` entry is marked `periodic`.

  Runs the periodic entries and writes WORKDIR/eval/results.json each time. The tokenizer is
  the one training uses (cached under WORKDIR/tokenizer); evaluators and their compiled
  functions are built on the first call and reused.
  """
  if not any(entry.get("periodic", False) for entry in (config.get("evals") or {}).values()):
    return None
  built: dict[str, dict[str, Evaluator]] = {}

  def eval_fn(model, step: int) -> dict[str, float]:
    if "evaluators" not in built:
      from medunifier_jax.data import pipeline

      tokenizer = pipeline.build_tokenizer(config, cache_dir=os.path.join(workdir, "tokenizer"))
      built["evaluators"] = build_evaluators(config, tokenizer, periodic_only=True)
      bind_workdir(built["evaluators"], workdir)
    evaluators = built["evaluators"]
    results = run_evaluators(evaluators, model)
    write_results(
      os.path.join(workdir, "eval", "results.json"),
      results,
      evaluators,
      {"step": int(step), "variant": config.get("variant", "")},
    )
    return flatten(results)

  return eval_fn
