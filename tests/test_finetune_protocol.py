"""The fine-tune protocols on a tiny random MedUnifier: the paper's end-to-end Q-Former fine-tune
trains the Q-Former and its queries but not the ViT; the linear probe trains a head only. The
caller's weights survive both (the paper step donates its own copy)."""

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from test_eval_e2e import random_model

from configs.pretrain import get_config
from medunifier_jax.data import registry as data_registry
from medunifier_jax.data import tokenizer as tokenizer_lib
from medunifier_jax.evaluators import finetune

DATASET = "phantom_pneumothorax"


@pytest.fixture(scope="module")
def config():
  c = get_config("tiny")
  c.data.cls_num_train, c.data.cls_num_val, c.data.cls_num_test = 12, 8, 8
  c.evals.finetune.update(
    datasets=(DATASET,),
    label_fractions=(0.5, 1.0),
    epochs=1,
    batch_size=4,
    feature_batch_size=8,
    hidden_dim=16,
  )
  return c


@pytest.fixture(scope="module")
def tokenizer(config, tmp_path_factory):
  corpus = list(data_registry.get_source(DATASET, "train", config.data).reports)
  return tokenizer_lib.get_tokenizer(config.data, corpus, str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def model(config):
  return random_model(config.model)


def evaluator(config, tokenizer, **settings):
  cfg = ml_collections.ConfigDict(config.evals.finetune.to_dict())
  cfg.update(settings)
  return finetune.FinetuneEvaluator(config, cfg, tokenizer)


def flat(state) -> dict:
  """{path as strings: array} of an nnx.State."""
  leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]
  return {tuple(str(getattr(k, "key", k)) for k in path): np.array(x) for path, x in leaves}


@pytest.fixture(scope="module")
def paper(config, tokenizer, model):
  """The paper protocol at a rate that moves weights visibly in 3 steps, run once."""
  graphdef, state = model
  before = flat(state)
  ev = evaluator(config, tokenizer, protocol="paper", learning_rate=1e-3, end_learning_rate=1e-4)
  sources = {
    r: data_registry.get_source(DATASET, r, config.data) for r in ("train", "validation", "test")
  }
  fit = ev.fit_end_to_end(
    graphdef, state, sources["train"], sources["validation"], sources["test"], num_classes=2
  )
  results = dict(ev.run(nnx.merge(*model)))  # evaluators take a module
  return ev, fit, before, results


def test_paper_protocol_trains_the_qformer_not_the_vit(paper, model):
  ev, fit, before, _ = paper
  trained = flat(fit.params)
  assert trained and not any("vit" in path for path in trained)
  assert any("head" in path for path in trained)
  changed = [
    p for p, v in trained.items() if p[0] == "model" and not np.array_equal(v, before[p[1:]])
  ]
  assert any("qformer" in p for p in changed) and any("query_tokens" in p for p in changed)
  # The caller's state is intact (the step donated a copy); its ViT is what the classifier ran.
  after = flat(model[1])
  assert after.keys() == before.keys()
  assert all(np.array_equal(after[p], before[p]) for p in before)
  assert 1 <= fit.best_epoch <= 1 and 0.0 <= fit.metrics["auc"] <= 1.0


def test_paper_protocol_compiles_one_step_and_reports_per_fraction(paper):
  ev, _, _, results = paper
  assert {"phantom_pneumothorax/50%/num_train", "phantom_pneumothorax/100%/auc"} <= set(results)
  assert results["phantom_pneumothorax/100%/num_train"] == 12
  # One fit, then two fractions: every update ran through one compilation.
  ((step, head_logits),) = ev._end_to_end.values()
  assert step._cache_size() == 1 and head_logits._cache_size() == 1
  assert ev.outputs[DATASET]["protocol"] == "paper"
  assert ev.describe().startswith("protocol paper")


def test_linear_probe_leaves_the_model_untouched(config, tokenizer, model):
  ev = evaluator(config, tokenizer)  # the tiny variant's protocol
  assert ev.protocol == "linear_probe" and "linear_probe" in ev.describe()
  before = flat(model[1])
  results = dict(ev.run(nnx.merge(*model)))  # evaluators take a module
  after = flat(model[1])
  assert all(np.array_equal(after[p], before[p]) for p in before)
  assert 0.0 <= results["phantom_pneumothorax/100%/auc"] <= 1.0
  assert ev.outputs[DATASET]["protocol"] == "linear_probe" and not ev._end_to_end


def test_heads_and_settings():
  head = finetune.ClassifierHead(4, 6, 5, 3, pooling="mean", rngs=nnx.Rngs(0))
  assert head(np.ones((2, 4, 6), np.float32)).shape == (2, 3)
  assert head.hidden.in_features == 6
  flat_head = finetune.ClassifierHead(4, 6, 5, 1, rngs=nnx.Rngs(0))
  assert flat_head.hidden.in_features == 24  # Q*H, the authors' flattening
  cfg = ml_collections.ConfigDict(
    dict(learning_rate=1e-5, end_learning_rate=1e-8, schedule="cosine")
  )
  rates = [finetune.learning_rate_at(cfg, s, 10) for s in (0, 5, 10)]
  assert rates == pytest.approx([1e-5, (1e-5 + 1e-8) / 2, 1e-8])
  with pytest.raises(ValueError, match="protocol"):
    evaluator(get_config("tiny"), None, protocol="end_to_end")


def test_variants_choose_their_protocol():
  paper = get_config("paper").evals.finetune
  assert paper.protocol == "paper" and tuple(paper.label_fractions) == (0.01, 0.1, 1.0)
  assert (paper.learning_rate, paper.batch_size, paper.epochs) == (1e-5, 8, 5)
  assert (paper.adam_b1, paper.adam_b2, paper.schedule) == (0.9, 0.95, "cosine")
  for variant in ("demo", "tiny"):  # cheap: the probe
    assert get_config(variant).evals.finetune.protocol == "linear_probe"


def separable(n: int, num_classes: int, rng) -> tuple[np.ndarray, np.ndarray]:
  """(n, 8) features whose class c is shifted by 3 along axis c, and their (n,) labels."""
  y = np.arange(n) % num_classes
  x = rng.normal(size=(n, 8)) + 3.0 * np.eye(8)[y]
  return x.astype(np.float32), y.astype(np.int32)


@pytest.mark.parametrize("num_classes", [2, 3])
def test_probe_head_learns_separable_features(config, tokenizer, num_classes):
  ev = evaluator(config, tokenizer, epochs=6, learning_rate=3e-3)
  rng = np.random.default_rng(0)
  train, val, test = (separable(n, num_classes, rng) for n in (48, 24, 48))
  test_metrics, best_epoch = ev._fit(train, val, test, num_classes)
  assert test_metrics["auc"] > 0.9 and 1 <= best_epoch <= 6


def test_padded_batches_fill_the_last_batch_at_weight_zero():
  got = list(finetune.padded_batches(np.array([4, 2, 0, 3, 1]), 2))
  assert [idx.tolist() for idx, _ in got] == [[4, 2], [0, 3], [1, 1]]
  assert [w.tolist() for _, w in got] == [[1, 1], [1, 1], [1, 0]]


def test_head_probs_are_the_sigmoid_or_the_softmax():
  binary = finetune.head_probs(np.array([[0.0], [np.log(3.0)]], np.float32), binary=True)
  np.testing.assert_allclose(binary, [[0.5, 0.5], [0.25, 0.75]], rtol=1e-6)
  multi = finetune.head_probs(np.log(np.array([[1.0, 1.0, 2.0]], np.float32)), binary=False)
  np.testing.assert_allclose(multi, [[0.25, 0.25, 0.5]], rtol=1e-6)


def test_unknown_settings_are_refused_by_name():
  with pytest.raises(ValueError, match=r"finetune\.pooling is 'max'"):
    evaluator(get_config("tiny"), None, pooling="max")
  with pytest.raises(ValueError, match=r"finetune\.schedule is 'linear'"):
    evaluator(get_config("tiny"), None, schedule="linear")
