r"""The newcomer's job: pre-train on phantom radiographs, evaluate every task, write the report.

  python -m medunifier_jax.demo --workdir workdirs/demo [--config configs/pretrain.py:demo] \
      [--config.num_steps=1700] [--skip_train] [--noimage_gen] [--uncond_prior] \
      [--prior_config configs/prior.py:demo]

Stages (each with its own progress display):
  1. pre-training with all four objectives on phantoms paired with the real Open-i reports
     (resumes if the workdir already holds a checkpoint; a finished run is not repeated);
  2. every `config.evals` entry but `image_gen` on the phantom test sets (among them the
     `reconstruction` entry: PSNR and code usage on `--recon_images` test phantoms) ->
     WORKDIR/eval/results.json and WORKDIR/eval/outputs/;
  3. unless --noimage_gen: the text-conditioned image prior on the frozen model's codes
     (`--prior_config`, WORKDIR/prior; with --uncond_prior also a prior with
     condition="none", WORKDIR/prior_uncond), then the `image_gen` entry (FID/KID, finding
     fidelity), merged into results.json;
  4. figures and WORKDIR/report.md + report.html, from WORKDIR/eval and the training log only.

Priors resume like pre-training; a finished one is not trained again.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags, logging
from ml_collections import config_flags

from medunifier_jax import compilation_cache, host_memory

_DEFAULT_CONFIG = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "pretrain.py"
)
_CONFIG = config_flags.DEFINE_config_file(
  "config", f"{_DEFAULT_CONFIG}:demo", "Config file and variant.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/demo", "Run directory.")
_SKIP_TRAIN = flags.DEFINE_bool(
  "skip_train",
  False,
  "Evaluate and report on the workdir's latest checkpoint without training further.",
)
_RECON_IMAGES = flags.DEFINE_integer(
  "recon_images", 256, "Test phantoms used to measure reconstruction PSNR and code usage."
)
_PRIOR_CONFIG = config_flags.DEFINE_config_file(
  "prior_config",
  os.path.join(os.path.dirname(_DEFAULT_CONFIG), "prior.py") + ":demo",
  "The image prior's config file and variant (stage 3).",
  lock_config=True,
)
# On by default: on 2 CPU cores it adds about 4.5 minutes (the prior ~2, its evaluation ~2.5)
# to the ~12 of the rest (README, "Status of the demo").
_IMAGE_GEN = flags.DEFINE_bool(
  "image_gen",
  True,
  "Train the image prior after pre-training and "
  "score the images it draws from held-out reports (stage 3; "
  "about 4.5 minutes on 2 CPU cores; --noimage_gen skips it).",
)
_UNCOND_PRIOR = flags.DEFINE_bool(
  "uncond_prior",
  False,
  "Also train an unconditional prior "
  "(condition=none) as the baseline of stage 3; without it the "
  "text prior's learned null condition stands in.",
)

IMAGE_GEN = "image_gen"  # the config.evals entry stage 3 runs
RECONSTRUCTION = "reconstruction"  # the entry `--recon_images` sizes (run in stage 2)


def default_prior_config():
  """configs/prior.py:demo of this checkout."""
  import importlib.util

  path = os.path.join(os.path.dirname(_DEFAULT_CONFIG), "prior.py")
  spec = importlib.util.spec_from_file_location("prior_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("demo")


def train_priors(prior_config, workdir: str, *, uncond: bool, log=print) -> dict[str, float]:
  """Stage 3a: the text prior in WORKDIR/prior and, with `uncond`, a condition="none" prior in
  WORKDIR/prior_uncond (sharing the first one's code cache), both on the MedUnifier of
  `workdir`; returns the seconds each took."""
  import ml_collections

  from medunifier_jax.prior import train as prior_train

  timings = {}
  runs = [("prior", "text")] + ([("prior_uncond", "none")] if uncond else [])
  for name, condition in runs:
    config = ml_collections.ConfigDict(prior_config.to_dict())
    config.medunifier_workdir = workdir
    config.model.condition = condition
    if name != "prior" and not config.codes.dir:
      # Same frozen model, same settings: the codes extracted for the text prior serve.
      config.codes.dir = os.path.join(workdir, "prior", "codes")
    log(
      f"  {name}: condition={condition}, {config.num_steps} steps x {config.batch_size} code "
      f"grids ({config.variant})"
    )
    start = time.perf_counter()
    prior_train.train_prior(config, os.path.join(workdir, name))
    timings[f"{name} training"] = time.perf_counter() - start
  return timings


def merge_results(path: str, earlier: dict | None) -> None:
  """Puts the entries of an earlier results.json payload (stage 2) back into the one at `path`
  (stage 3 wrote only image_gen), so that one file holds every evaluation."""
  if not earlier:
    return
  with open(path) as f:
    later = json.load(f)
  merged = {
    "results": {**earlier["results"], **later["results"]},
    "protocol": {**earlier.get("protocol", {}), **later.get("protocol", {})},
    "meta": dict(earlier.get("meta", {}), image_gen=later.get("meta", {})),
  }
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(merged, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def run_demo(
  config,
  workdir: str,
  *,
  train: bool = True,
  recon_images: int | None = None,
  image_gen: bool = True,
  prior_config=None,
  uncond_prior: bool = False,
  log=print,
) -> dict[str, float]:
  """Trains (unless `train` is False), evaluates and writes the report; returns stage times.

  With `image_gen` (and a `config.evals.image_gen` entry), stage 3 trains the prior(s) of
  `prior_config` (default configs/prior.py:demo) and scores image generation. `recon_images`,
  when given, replaces `config.evals.reconstruction.num_images`.
  """
  from medunifier_jax import api, evaluation, paths, pretraining
  from medunifier_jax.report import build

  timings: dict[str, float] = {}
  workdir = paths.resolve(workdir)
  paths.resolve_config(config)
  os.makedirs(workdir, exist_ok=True)
  if image_gen and IMAGE_GEN not in config.evals:
    log(f"(--image_gen: this config has no config.evals.{IMAGE_GEN} entry; the stage is skipped)")
  image_gen = image_gen and IMAGE_GEN in config.evals
  stages = 4 if image_gen else 3
  if train:
    # Stage 2 runs every evaluation on the final model; evaluating during training too would
    # only repeat the zero-shot and retrieval entries.
    for entry in config.evals.values():
      entry.periodic = False
    log(
      f"[1/{stages}] pre-training {config.variant}: {config.num_steps} steps x "
      f"{config.batch_size} examples of {config.data.name}"
    )
    start = time.perf_counter()
    pretraining.train(config, workdir)
    timings["pre-training"] = time.perf_counter() - start

  log(f"[2/{stages}] evaluating every task on the phantom test sets")
  start = time.perf_counter()
  model = api.load(workdir, config=config)
  tasks = [name for name in config.evals if name != IMAGE_GEN]
  if RECONSTRUCTION not in config.evals:
    log(
      f"(this config has no config.evals.{RECONSTRUCTION} entry: the report will have no "
      "reconstructions, PSNR or code usage)"
    )
  elif recon_images is not None:
    config.evals[RECONSTRUCTION].num_images = int(recon_images)
  evaluation.evaluate(
    config,
    workdir,
    tasks,
    model=model.module,
    tokenizer=model.tokenizer,
    source=f"checkpoint in {workdir}",
    log=log,
  )
  timings["evaluation"] = time.perf_counter() - start

  if image_gen:
    if prior_config is None:
      prior_config = default_prior_config()
    log(
      f"[3/{stages}] images from reports: the prior on the model's codes, then FID/KID and "
      "finding fidelity"
    )
    timings.update(train_priors(prior_config, workdir, uncond=uncond_prior, log=log))
    start = time.perf_counter()
    results_path = os.path.join(workdir, "eval", "results.json")
    earlier = None
    if os.path.exists(results_path):
      with open(results_path) as f:
        earlier = json.load(f)
    evaluation.evaluate(
      config,
      workdir,
      [IMAGE_GEN],
      model=model.module,
      tokenizer=model.tokenizer,
      source=f"checkpoint in {workdir}",
      log=log,
    )
    merge_results(results_path, earlier)
    timings["image_gen evaluation"] = time.perf_counter() - start
  elif IMAGE_GEN in config.evals:
    log(
      "(images from reports skipped (--noimage_gen): without it the demo trains the image "
      "prior and scores it, about 4.5 more minutes on 2 CPU cores)"
    )

  log(f"[{stages}/{stages}] figures and the report")
  start = time.perf_counter()
  md = build.write_report(config, workdir, timings=timings)
  timings["report"] = time.perf_counter() - start
  log(f"report: {md} (and {os.path.join(workdir, 'report.html')})")
  log("time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
  return timings


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  compilation_cache.enable()
  run_demo(
    _CONFIG.value,
    _WORKDIR.value,
    train=not _SKIP_TRAIN.value,
    recon_images=_RECON_IMAGES.value,
    image_gen=_IMAGE_GEN.value,
    prior_config=_PRIOR_CONFIG.value,
    uncond_prior=_UNCOND_PRIOR.value,
  )


if __name__ == "__main__":
  host_memory.reexec_with_huge_pages()
  app.run(main)
