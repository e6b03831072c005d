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
  c.evals.finetune.update(datasets=(DATASET,), label_fractions=(0.5, 1.0), epochs=1,
                          batch_size=4, feature_batch_size=8, hidden_dim=16)
  return c


@pytest.fixture(scope="module")
def tokenizer(config, tmp_path_factory):
  corpus = list(data_registry.get_source(DATASET, "train", config.data).reports)
  return tokenizer_lib.get_tokenizer(config.data, corpus, str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def model(config):
  return random_model(config.model)


SHARED_FNS: dict = {}  # the model's compiled encoders, shared by every evaluator here


def evaluator(config, tokenizer, **settings):
  cfg = ml_collections.ConfigDict(config.evals.finetune.to_dict())
  cfg.update(settings)
  return finetune.FinetuneEvaluator(config, cfg, tokenizer, shared_fns=SHARED_FNS)


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
  sources = {r: data_registry.get_source(DATASET, r, config.data)
             for r in ("train", "validation", "test")}
  fit = ev.fit_end_to_end(graphdef, state, sources["train"], sources["validation"],
                          sources["test"], num_classes=2)
  results = dict(ev.run(model))
  return ev, fit, before, results


def test_paper_protocol_trains_the_qformer_not_the_vit(paper, model):
  ev, fit, before, _ = paper
  trained = flat(fit.params)
  assert trained and not any("vit" in path for path in trained)
  assert any("head" in path for path in trained)
  changed = [p for p, v in trained.items() if p[0] == "model"
             and not np.array_equal(v, before[p[1:]])]
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
  results = dict(ev.run(model))
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
  cfg = ml_collections.ConfigDict(dict(learning_rate=1e-5, end_learning_rate=1e-8,
                                       schedule="cosine"))
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
