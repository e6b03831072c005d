r"""The newcomer's job: pre-train on phantom radiographs, evaluate every task, write the report.

  python -m medunifier_jax.demo --workdir workdirs/demo [--config configs/pretrain.py:demo] \
      [--config.num_steps=1200] [--skip_train]

Stages (each with its own progress display):
  1. pre-training with all four objectives on phantoms paired with the real Open-i reports
     (resumes if the workdir already holds a checkpoint; a finished run is not repeated);
  2. every `config.evals` entry on the phantom test sets -> WORKDIR/eval/results.json;
  3. reconstructions of test phantoms, figures and WORKDIR/report.md + report.html.
"""

from __future__ import annotations

import itertools
import os
import time

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "pretrain.py")
_CONFIG = config_flags.DEFINE_config_file(
    "config", f"{_DEFAULT_CONFIG}:demo", "Config file and variant.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/demo", "Run directory.")
_SKIP_TRAIN = flags.DEFINE_bool("skip_train", False, "Evaluate and report on the workdir's "
                                "latest checkpoint without training further.")
_RECON_IMAGES = flags.DEFINE_integer("recon_images", 256, "Test phantoms used to measure "
                                     "reconstruction PSNR and code usage.")


def run_demo(config, workdir: str, *, train: bool = True, recon_images: int = 256,
             log=print) -> dict[str, float]:
  """Trains (unless `train` is False), evaluates and writes the report; returns stage times."""
  from medunifier_jax import api, evaluate, paths
  from medunifier_jax.data import pipeline, registry
  from medunifier_jax.evaluators.common import Subset
  from medunifier_jax.report import build
  from medunifier_jax.training import loop

  timings: dict[str, float] = {}
  workdir = paths.resolve(workdir)
  paths.resolve_config(config)
  os.makedirs(workdir, exist_ok=True)
  if train:
    # Stage 2 runs every evaluation on the final model; evaluating during training too would
    # only repeat the zero-shot and retrieval entries.
    for entry in config.evals.values():
      entry.periodic = False
    log(f"[1/3] pre-training {config.variant}: {config.num_steps} steps x {config.batch_size} "
        f"examples of {config.data.name}")
    start = time.perf_counter()
    loop.train_and_evaluate(config, workdir)
    timings["pre-training"] = time.perf_counter() - start

  log("[2/3] evaluating every task on the phantom test sets")
  start = time.perf_counter()
  model = api.load(workdir, config=config)
  evaluate.evaluate(config, workdir, model=model.module, tokenizer=model.tokenizer,
                    source=f"checkpoint in {workdir}", log=log)
  timings["evaluation"] = time.perf_counter() - start

  log("[3/3] reconstructions and the report")
  start = time.perf_counter()
  source = registry.get_source(config.data.name, "test", config.data)
  source = Subset(source, min(recon_images, len(source)))
  batches = pipeline.eval_dataset(config, model.tokenizer, source=source,
                                  batch_size=min(64, config.batch_size), shard_index=0,
                                  shard_count=1)
  md = build.write_report(config, workdir, model.graphdef, model.state,
                          itertools.islice(batches, None), timings=timings)
  timings["report"] = time.perf_counter() - start
  log(f"report: {md} (and {os.path.join(workdir, 'report.html')})")
  log("time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
  return timings


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  run_demo(_CONFIG.value, _WORKDIR.value, train=not _SKIP_TRAIN.value,
           recon_images=_RECON_IMAGES.value)


if __name__ == "__main__":
  app.run(main)
