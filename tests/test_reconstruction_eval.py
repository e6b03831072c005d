"""The reconstruction evaluator on a tiny random MedUnifier, and the report built from nothing
but the evaluation outputs it leaves in the workdir (no model)."""

import json
import os

import numpy as np
import pytest
from configs_util import load_config
from flax import nnx

from medunifier_jax import evaluation
from medunifier_jax.data import registry as data_registry
from medunifier_jax.data import tokenizer as tokenizer_lib
from medunifier_jax.evaluators import EVALUATORS, reconstruction
from medunifier_jax.report import build
from tests.models_util import random_model

NUM_IMAGES, BATCH, EXAMPLES = 12, 8, 3  # two batches, the second padded: one compilation


@pytest.fixture(scope="module")
def config():
  c = load_config("tiny")
  with c.unlocked():
    c.evals.reconstruction = dict(
      datasets=("phantom_openi",),
      split="test",
      num_images=NUM_IMAGES,
      batch_size=BATCH,
      num_examples=EXAMPLES,
      periodic=False,
    )
  return c


@pytest.fixture(scope="module")
def run(config, tmp_path_factory):
  """The reconstruction entry evaluated as `python -m medunifier_jax.evaluate` does it."""
  corpus = list(data_registry.get_source("phantom_openi", "test", config.data).reports)
  tokenizer = tokenizer_lib.get_tokenizer(config.data, corpus, str(tmp_path_factory.mktemp("tok")))
  workdir = str(tmp_path_factory.mktemp("workdir"))
  results = evaluation.evaluate(
    config,
    workdir,
    ["reconstruction"],
    model=nnx.merge(*random_model(config.model)),
    tokenizer=tokenizer,
    log=lambda line: None,
  )
  return workdir, results


def test_registered():
  assert EVALUATORS["reconstruction"] is reconstruction.ReconstructionEvaluator


def test_psnr_and_code_usage(run, config):
  _, results = run
  scores = results["reconstruction"]["phantom_openi"]
  assert scores["num_images"] == NUM_IMAGES  # padded rows left out
  assert np.isfinite(scores["psnr_db"]) and scores["psnr_db"] > 0.0
  size = config.model.vqvae.codebook_size
  for level in ("top", "bottom"):
    assert 0.0 < scores[f"usage_{level}"] <= 1.0
    assert 1.0 <= scores[f"perplexity_{level}"] <= size * scores[f"usage_{level}"] + 1e-6


def test_outputs_are_written(run, config):
  workdir, _ = run
  arrays = np.load(os.path.join(workdir, "eval", "outputs", "reconstruction_phantom_openi.npz"))
  size, grid = config.model.vit.image_size, config.model.vqvae.grid
  assert arrays["inputs"].shape == arrays["recons"].shape == (EXAMPLES, size, size, 3)
  assert arrays["inputs"].dtype == np.uint8
  assert arrays["codes_top"].shape == (EXAMPLES, grid // 2, grid // 2)
  assert arrays["codes_bottom"].shape == (EXAMPLES, grid, grid)
  # Every code chosen is counted once per position of every real image.
  assert arrays["counts_bottom"].sum() == NUM_IMAGES * grid * grid
  assert arrays["counts_top"].shape == (config.model.vqvae.codebook_size,)


def test_psnr_and_usage_helpers():
  target = np.full((2, 4, 4, 3), 0.5)
  recon = target.copy()
  recon[1] += 0.1  # MSE 0.01: 20 dB
  np.testing.assert_allclose(reconstruction.psnr_db(recon, target), [120.0, 20.0])
  usage, perplexity = reconstruction.code_usage(np.array([5, 5, 0, 0]))
  assert usage == 0.5 and perplexity == pytest.approx(2.0)


def test_report_from_eval_outputs_only(run, config):
  workdir, _ = run
  # Only eval/ is in the workdir: no checkpoint, no training log.
  assert sorted(os.listdir(workdir)) == ["eval"]
  md_path = build.write_report(config, workdir, timings={"evaluation": 1.0})
  md = open(md_path).read()
  assert "## Reconstructions: phantom_openi test split" in md
  assert f"Reconstruction PSNR (dB), phantom_openi test ({NUM_IMAGES} images)" in md
  assert "Codebook usage, bottom level" in md
  assert os.path.exists(os.path.join(workdir, "report", "reconstruction_phantom_openi.png"))
  html = open(os.path.join(workdir, "report.html")).read()
  assert "<table>" in html and "<th>measure</th>" in html
  assert '<img src="data:image/png;base64,' in html
  assert "report/reconstruction_phantom_openi.png" not in html  # embedded, not linked


def test_report_renames_and_escapes(tmp_path, config):
  """An entry with another name runs the task; figures need the saved outputs; texts from the
  data are escaped in the page."""
  payload = {
    "results": {
      "recon_val": {
        "phantom_openi": {
          "psnr_db": 21.0,
          "usage_top": 0.5,
          "usage_bottom": 0.25,
          "perplexity_top": 3.0,
          "perplexity_bottom": 2.0,
          "num_images": 4.0,
        }
      }
    },
    "protocol": {"recon_val": {"task": "reconstruction", "split": "validation"}},
    "meta": {},
  }
  outputs = tmp_path / "eval" / "outputs"
  outputs.mkdir(parents=True)
  (tmp_path / "eval" / "results.json").write_text(json.dumps(payload))
  # Periodic evaluation writes results.json only: the figures are then left out.
  build.write_report(config, str(tmp_path))
  md = (tmp_path / "report.md").read_text()
  assert "Mean PSNR 21.00 dB over 4 images" in md and "![code usage]" not in md
  np.savez(
    outputs / "recon_val_phantom_openi.npz",
    counts_top=np.arange(4),
    counts_bottom=np.ones(4, np.int64),
  )
  (outputs / "report_gen_x.json").write_text(
    json.dumps({"generated": ["<script>alert(1)</script>"], "references": ["a | b"]})
  )
  build.write_report(config, str(tmp_path))
  md = (tmp_path / "report.md").read_text()
  assert "## Reconstructions: phantom_openi validation split" in md
  assert "![code usage](report/recon_val_phantom_openi_codes.png)" in md
  html = (tmp_path / "report.html").read_text()
  assert "<script>" not in html and "&lt;script&gt;" in html
