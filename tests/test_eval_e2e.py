"""Every evaluator end to end on a tiny random MedUnifier and small phantom sets.

The model's weights are drawn directly from NumPy (scale 1/sqrt(fan-in), unit norms, zero
biases) into the abstract state, which skips compiling one XLA program per initialiser; the
evaluators cannot tell, and an untrained model must score chance.
"""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs.pretrain import get_config
from medunifier_jax import evaluation, generation, inference
from medunifier_jax.data import findings
from medunifier_jax.data import registry as data_registry
from medunifier_jax.data import tokenizer as tokenizer_lib
from medunifier_jax.evaluators import EVALUATORS, build_evaluators, finetune, make_eval_fn
from tests.models_util import random_model

ZS_CLASSES = findings.CLASSES_5X200


@pytest.fixture(scope="module")
def config():
  c = get_config("tiny")
  c.data.num_per_class_5x200 = 10  # 50 images
  c.data.cls_num_train, c.data.cls_num_val, c.data.cls_num_test = 24, 12, 12
  e = c.evals
  e.zero_shot.prompts = "paper"  # the phantom variants' default is the project vocabulary
  with c.unlocked():
    e.zero_shot_itm = dict(
      e.zero_shot.to_dict(),
      task="zero_shot",
      itm_rescore=True,
      datasets=("phantom_pneumonia",),
      itm_batch_size=16,
    )
  e.retrieval.update(itm_rerank_k=3, itm_batch_size=16)
  e.finetune.datasets = ("phantom_pneumothorax", "phantom_covidx")
  e.report_gen.update(datasets=("phantom_5x200",), meteor=False)
  return c


@pytest.fixture(scope="module")
def tokenizer(config, tmp_path_factory):
  corpus = list(data_registry.get_source("phantom_5x200", "test", config.data).reports)
  return tokenizer_lib.get_tokenizer(config.data, corpus, str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def model(config):
  return random_model(config.model)


@pytest.fixture(scope="module")
def evaluators(config, tokenizer):
  return build_evaluators(config, tokenizer)


@pytest.fixture(scope="module")
def run(config, tokenizer, model, evaluators, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("workdir"))
  lines = []
  results = evaluation.evaluate(
    config,
    workdir,
    model=nnx.merge(*model),
    tokenizer=tokenizer,
    evaluators=evaluators,
    log=lines.append,
  )
  return workdir, results, "\n".join(lines)


def test_every_evaluator_runs_and_writes_results(run, config):
  workdir, results, console = run
  assert set(results) == set(config.evals)
  with open(os.path.join(workdir, "eval", "results.json")) as f:
    saved = json.load(f)
  assert saved["results"] == json.loads(json.dumps(results))
  assert saved["protocol"]["report_gen"]["num_beams"] == 3
  assert saved["protocol"]["finetune"]["label_fractions"] == [0.1, 1.0]
  for entry, by_set in results.items():
    assert f"== {entry} ==" in console
    for metrics in by_set.values():
      assert all(isinstance(v, float) for v in metrics.values())
  outputs = os.listdir(os.path.join(workdir, "eval", "outputs"))
  assert "zero_shot_phantom_5x200.npz" in outputs and "report_gen_phantom_5x200.json" in outputs
  assert saved["protocol"]["finetune"]["protocol"] == "linear_probe"  # the tiny variant's
  assert saved["protocol"]["zero_shot"]["prompts"] == "paper"


def test_zero_shot_uses_the_paper_prompts_and_raw_scores(run, evaluators):
  out = evaluators["zero_shot"].outputs["phantom_5x200"]
  assert out["prompt_set"] == "paper" and out["class_set"] == "gloria"
  assert all(len(p) == 15 for p in out["prompts"].values())
  # Softmax over the pooled raw similarities (cosines, no temperature: within [-1, 1]).
  assert np.abs(out["class_scores"]).max() <= 1.0 + 1e-5
  np.testing.assert_allclose(
    out["probs"],
    np.exp(out["class_scores"]) / np.exp(out["class_scores"]).sum(axis=1, keepdims=True),
    rtol=1e-5,
  )
  assert len(evaluators["zero_shot_itm"].outputs["phantom_pneumonia"]["prompts"]["Normal"]) == 10


def test_untrained_model_scores_chance_on_the_5x200_set(run):
  _, results, _ = run
  zs = results["zero_shot"]["phantom_5x200"]
  assert abs(zs["accuracy"] - 0.2) <= 0.15 and 0.3 <= zs["auc"] <= 0.7
  rt = results["retrieval"]["phantom_5x200"]
  for d in ("i2t", "t2i"):
    # 50 pairs, 10 per class: chance R@K = K / 50, precision 0.2.
    assert rt[f"{d}_R@1"] <= 0.12 and rt[f"{d}_R@10"] <= 0.45
    assert 0.05 <= rt[f"{d}_plain_P@5"] <= 0.4 and rt[f"{d}_P@1"] <= 0.45
    assert rt[f"{d}_P@1"] == pytest.approx(rt[f"{d}_plain_P@1"])  # the definitions meet at K=1
    assert rt[f"{d}_P@10"] >= rt[f"{d}_plain_P@10"]  # hit-averaged precision is never lower
    assert f"itm_{d}_R@5" in rt
  # Per-class figures and the embedding-space diagnostics (5 classes of 10 pairs each).
  assert 1.0 <= rt["image_emb_rank"] and 1.0 <= rt["text_emb_rank"]
  shares = [rt[f"per_class/{name}/i2t_top1_share"] for name in ZS_CLASSES]
  assert sum(shares) == pytest.approx(1.0)
  assert np.mean([rt[f"per_class/{name}/i2t_P@1"] for name in ZS_CLASSES]) == pytest.approx(
    rt["i2t_P@1"]
  )  # 10 images per class: the mean of the classes' P@1 is the overall one
  recalls = [zs[f"per_class/{name}/recall"] for name in ZS_CLASSES]
  assert np.mean(recalls) == pytest.approx(zs["accuracy"])  # balanced classes
  assert all(0.0 <= zs[f"per_class/{name}/auc"] <= 1.0 for name in ZS_CLASSES)


def test_finetune_and_report_generation_figures(run):
  _, results, _ = run
  ft = results["finetune"]
  assert ft["phantom_pneumothorax"]["10%/num_train"] == 2  # 10% of 24, at least one per class
  assert ft["phantom_covidx"]["100%/num_train"] == 24
  assert 0.0 <= ft["phantom_covidx"]["100%/accuracy"] <= 1.0
  rg = results["report_gen"]["phantom_5x200"]
  for prefix in ("", "baseline/"):
    assert 0.0 <= rg[f"{prefix}BLEU-4"] <= rg[f"{prefix}BLEU-1"] <= 1.0
    assert 0.0 <= rg[f"{prefix}ce_f1_micro"] <= 1.0 and f"{prefix}ROUGE-L" in rg
  assert "METEOR" not in rg  # switched off in this test's settings


def test_finetune_head_learns_separable_features(config, tokenizer):
  settings = ml_collections.ConfigDict(config.evals.finetune.to_dict())
  settings.update(epochs=10, learning_rate=3e-3)
  evaluator = finetune.FinetuneEvaluator(config, settings, tokenizer)
  rng = np.random.default_rng(0)

  def split(n):
    y = np.arange(n) % 2
    x = rng.normal(size=(n, 32)).astype(np.float32) + 1.5 * y[:, None]
    return x, y.astype(np.int32)

  test_metrics, best_epoch = evaluator._fit(split(64), split(32), split(64), num_classes=2)
  assert test_metrics["auc"] > 0.95 and 1 <= best_epoch <= 10


def test_cached_beam_search_equals_uncached(run, evaluators, model):
  """The evaluator's compiled decoder (key/value cache) against full recomputation per step."""
  graphdef, state = model
  evaluator = evaluators["report_gen"]
  generator = evaluator.generator(graphdef)  # its decoder was compiled in the end-to-end run
  decoding, special = evaluator.decoding, generator.special
  size, batch = evaluator.config.model.vit.image_size, int(evaluator.cfg.batch_size)
  pixels = np.asarray(jax.random.normal(jax.random.key(1), (batch, size, size, 3)))
  generate = lambda state, pixels, rng: generator.tokens(state, pixels, decoding, rng)
  cached = generate(state, pixels, jax.random.key(0))
  full = inference.model_fns(graphdef).report_tokens(special, decoding, cached=False)(
    state, pixels, jax.random.key(0)
  )
  np.testing.assert_array_equal(cached.tokens, full.tokens)
  np.testing.assert_allclose(cached.scores, full.scores, rtol=1e-4, atol=1e-4)

  # Per image: permuting the batch permutes the reports; and no retracing happened.
  tokens = np.asarray(cached.tokens)
  order = np.roll(np.arange(batch), 1)
  permuted = np.asarray(generate(state, pixels[order], jax.random.key(0)).tokens)
  np.testing.assert_array_equal(permuted, tokens[order])
  assert len({tuple(r) for r in tokens.tolist()}) > 1, "images should yield different reports"
  compiled = inference.compiled(
    inference.report_tokens, special=special, decoding=decoding, cached=True
  )
  assert compiled._cache_size() == 1
  texts = generator(state, pixels, decoding)
  assert len(texts) == batch and all(isinstance(t, str) for t in texts)


def test_periodic_evaluation_for_the_training_loop(config, tokenizer, model, tmp_path, monkeypatch):
  from medunifier_jax.data import pipeline

  c = ml_collections.ConfigDict(config.to_dict())
  for name in c.evals:
    c.evals[name].periodic = name == "zero_shot"
  c.evals.zero_shot.datasets = ("phantom_pneumonia",)
  monkeypatch.setattr(pipeline, "build_tokenizer", lambda config, cache_dir: tokenizer)
  eval_fn = make_eval_fn(c, str(tmp_path))
  flat = eval_fn(nnx.merge(*model), 7)  # the training loop passes the merged module
  assert set(flat) == {
    f"zero_shot/phantom_pneumonia/{m}"
    for m in ("accuracy", "f1_macro", "auc", "sensitivity", "specificity", "ppv", "npv")
  }
  with open(tmp_path / "eval" / "results.json") as f:
    saved = json.load(f)
  assert saved["meta"]["step"] == 7 and list(saved["results"]) == ["zero_shot"]


def test_registry_names_and_errors(config, tokenizer):
  assert set(EVALUATORS) == {
    "zero_shot",
    "retrieval",
    "finetune",
    "report_gen",
    "image_gen",
    "reconstruction",
  }
  with pytest.raises(KeyError, match="known evaluators: zero_shot, retrieval"):
    from medunifier_jax.evaluators import get_evaluator_class

    get_evaluator_class("segmentation")
  with pytest.raises(KeyError, match="configured: "):
    build_evaluators(config, tokenizer, ["captioning"])
  with pytest.raises(ValueError, match="--tasks names fid"):
    evaluation.select_entries(config, ["fid"])
  assert evaluation.select_entries(config, ["zero_shot"]) == ["zero_shot", "zero_shot_itm"]
  # The tiny variant marks nothing periodic: training it runs no evaluation.
  assert make_eval_fn(get_config("tiny"), "/nonexistent") is None


def test_api_generate_reports_and_reconstruct(config, tokenizer, model):
  """The public API decodes with the evaluators' decoder and rebuilds images in [0, 1]."""
  from medunifier_jax import api

  graphdef, state = model
  handle = api.Model(nnx.merge(graphdef, state), config, tokenizer)
  size = config.model.vit.image_size
  pixels = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
  settings = dict(method="greedy", max_length=8, min_length=8)
  reports = handle.generate_reports(pixels, **settings)
  assert isinstance(reports, list) and len(reports) == 2 and all(reports)
  direct = generation.ReportGenerator(graphdef, tokenizer, config.model.qformer.dec_token_id)(
    state, pixels, generation.DecodingConfig(**settings)
  )
  assert reports == direct
  # One image decodes the same alone as in a batch.
  assert handle.generate_reports(pixels[:1], **settings) == reports[:1]
  with pytest.raises(ValueError, match="224|48"):
    handle.generate_reports(pixels[:, :-1])

  text = handle.tokenize(["Small left pleural effusion.", "No acute findings."])
  out = handle.reconstruct(pixels, text["input_ids"], text["attention_mask"])
  assert out["recon"].shape == (2, size, size, 3)
  assert 0.0 <= out["recon"].min() and out["recon"].max() <= 1.0
  grid = config.model.vqvae.grid
  assert out["codes_bottom"].shape == (2, grid, grid)
  assert out["codes_top"].max() < config.model.vqvae.codebook_size
  with pytest.raises(ValueError, match="2 images and 1 texts"):
    handle.reconstruct(pixels, text["input_ids"][:1], text["attention_mask"][:1])
