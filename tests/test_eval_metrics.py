"""Evaluation arithmetic on fixed arrays: classification, retrieval, prompts, label fractions."""

import numpy as np
import pytest
from sklearn import metrics as skm

from medunifier_jax.evaluators import common, finetune, metrics, prompts


def test_binary_metrics_match_a_hand_count():
  labels = np.array([0, 0, 1, 1, 1])
  p1 = np.array([0.1, 0.6, 0.7, 0.4, 0.9])  # predictions 0 1 1 0 1: TP 2, FN 1, FP 1, TN 1
  out = metrics.classification_metrics(labels, p1)
  assert out["accuracy"] == pytest.approx(3 / 5)
  assert out["sensitivity"] == pytest.approx(2 / 3)
  assert out["specificity"] == pytest.approx(1 / 2)
  assert out["ppv"] == pytest.approx(2 / 3)
  assert out["npv"] == pytest.approx(1 / 2)
  assert out["auc"] == pytest.approx(5 / 6)  # 5 of 6 positive-negative pairs ordered right
  assert out["f1_macro"] == pytest.approx((2 / 3 + 1 / 2) / 2)
  # (N,) and (N, 2) inputs agree.
  assert metrics.classification_metrics(labels, np.stack([1 - p1, p1], 1)) == out


def test_multiclass_metrics_agree_with_sklearn():
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(3), 7)
  probs = rng.dirichlet(np.ones(3), size=labels.size) + np.eye(3)[labels] * 0.3
  probs /= probs.sum(1, keepdims=True)
  out = metrics.classification_metrics(labels, probs)
  preds = probs.argmax(1)
  assert out["accuracy"] == pytest.approx(skm.accuracy_score(labels, preds))
  assert out["f1_macro"] == pytest.approx(skm.f1_score(labels, preds, average="macro"))
  assert out["auc"] == pytest.approx(skm.roc_auc_score(labels, probs, multi_class="ovr"))
  assert out["sensitivity"] == pytest.approx(skm.recall_score(labels, preds, average="macro"))
  assert out["ppv"] == pytest.approx(skm.precision_score(labels, preds, average="macro"))
  spec = [skm.recall_score(labels != c, preds != c) for c in range(3)]
  assert out["specificity"] == pytest.approx(np.mean(spec))
  npv = [skm.precision_score(labels != c, preds != c) for c in range(3)]
  assert out["npv"] == pytest.approx(np.mean(npv))


def test_undefined_metrics_are_nan_and_bad_shapes_raise():
  out = metrics.classification_metrics(np.zeros(4, int), np.full(4, 0.2))
  assert np.isnan(out["auc"]) and np.isnan(out["ppv"]) and out["specificity"] == 1.0
  with pytest.raises(ValueError, match="labels must lie"):
    metrics.classification_metrics(np.array([0, 3]), np.full((2, 2), 0.5))
  with pytest.raises(ValueError, match="N = 3"):
    metrics.classification_metrics(np.zeros(3, int), np.full((2, 2), 0.5))


# Three queries over four items. Ties: q0 items 2 and 3 (0.5), q2 all items.
SCORES = np.array([[0.9, 0.1, 0.5, 0.5], [0.2, 0.8, 0.3, 0.1], [0.4, 0.4, 0.4, 0.4]])
TARGETS = np.array([2, 1, 3])
RELEVANT = np.array(
  [
    [1, 0, 1, 0],  # q0: ranking 0 2 3 1 -> relevance 1 1 0 0
    [0, 0, 0, 0],  # q1: nothing relevant
    [0, 0, 0, 1],
  ],  # q2: ranking 0 1 2 3 -> relevance 0 0 0 1
  bool,
)


def test_per_class_metrics_by_hand():
  labels = np.array([0, 0, 1, 1, 2, 2])
  probs = np.array(
    [
      [0.6, 0.3, 0.1],
      [0.2, 0.7, 0.1],
      [0.1, 0.8, 0.1],
      [0.3, 0.6, 0.1],
      [0.5, 0.1, 0.4],
      [0.1, 0.2, 0.7],
    ]
  )
  out = metrics.per_class_metrics(labels, probs, ["a", "b", "c"])
  assert out["a/recall"] == 0.5 and out["b/recall"] == 1.0 and out["c/recall"] == 0.5
  for c, name in enumerate("abc"):
    assert out[f"{name}/auc"] == pytest.approx(skm.roc_auc_score(labels == c, probs[:, c]))
  # A fourth class without items: its recall and AUC are undefined.
  four = metrics.per_class_metrics(labels, np.pad(probs, ((0, 0), (0, 1))), list("abcd"))
  assert np.isnan(four["d/recall"]) and np.isnan(four["d/auc"])
  with pytest.raises(ValueError, match="class names"):
    metrics.per_class_metrics(labels, probs, ["a", "b"])


def test_effective_rank_counts_the_directions():
  rng = np.random.default_rng(0)
  line = np.outer(rng.normal(size=500), rng.normal(size=16))
  assert metrics.effective_rank(line) == pytest.approx(1.0, abs=1e-6)
  plane = np.zeros((4, 16))
  plane[:, :2] = [[1, 0], [-1, 0], [0, 1], [0, -1]]  # equal variance along two axes
  assert metrics.effective_rank(plane) == pytest.approx(2.0)
  assert 15.0 <= metrics.effective_rank(rng.normal(size=(20000, 16))) <= 16.0
  assert metrics.effective_rank(np.ones((5, 3))) == 0.0


def test_ranking_breaks_ties_by_index():
  np.testing.assert_array_equal(
    metrics.rank_items(SCORES), [[0, 2, 3, 1], [1, 2, 0, 3], [0, 1, 2, 3]]
  )


def test_recall_at_k_by_hand():
  # Target ranks: q0 2nd, q1 1st, q2 4th.
  assert metrics.recall_at_k(SCORES, TARGETS, (1, 2, 4)) == pytest.approx(
    {1: 1 / 3, 2: 2 / 3, 4: 1.0}
  )


def test_both_precision_definitions_by_hand():
  plain = metrics.precision_at_k(SCORES, RELEVANT, (1, 2, 4))
  assert plain == pytest.approx({1: 1 / 3, 2: (1 + 0 + 0) / 3, 4: (2 / 4 + 0 + 1 / 4) / 3})
  paper = metrics.hit_precision_at_k(SCORES, RELEVANT, (1, 2, 4))
  # q0: hits at ranks 1, 2 -> mean(1/1, 2/2) = 1; q1: no hit -> 0; q2: hit at rank 4 -> 1/4.
  assert paper == pytest.approx({1: 1 / 3, 2: 1 / 3, 4: (1 + 0 + 1 / 4) / 3})


def test_retrieval_metrics_names_the_definitions_apart():
  out = metrics.retrieval_metrics(SCORES, TARGETS, RELEVANT, (1, 4), prefix="i2t_")
  assert set(out) == {"i2t_R@1", "i2t_R@4", "i2t_P@1", "i2t_P@4", "i2t_plain_P@1", "i2t_plain_P@4"}
  assert out["i2t_P@4"] == pytest.approx(1.25 / 3) and out["i2t_plain_P@4"] == pytest.approx(0.25)


def test_similarity_matrix_is_the_max_over_queries_in_any_chunking():
  rng = np.random.default_rng(1)
  img = rng.normal(size=(7, 3, 5)).astype(np.float32)
  txt = rng.normal(size=(4, 5)).astype(np.float32)
  expected = np.einsum("nqe,me->nmq", img, txt).max(-1)
  for chunk in (1, 3, 7, 100):
    np.testing.assert_allclose(
      common.similarity_matrix(img, txt, chunk=chunk), expected, rtol=1e-5, atol=1e-6
    )


def test_multilabel_prf_by_hand():
  pred = np.array([[1, 0], [1, 1], [0, 0]])
  ref = np.array([[1, 0], [0, 1], [0, 1]])
  out = metrics.multilabel_prf(pred, ref, ["a", "b"])
  # micro: TP 2 (a0, b1), FP 1 (a1), FN 1 (b2).
  assert out["precision_micro"] == pytest.approx(2 / 3)
  assert out["recall_micro"] == pytest.approx(2 / 3)
  assert out["f1/a"] == pytest.approx(2 / 3)  # a: P 1/2, R 1
  assert out["f1/b"] == pytest.approx(2 / 3)  # b: P 1, R 1/2
  assert out["f1_macro"] == pytest.approx(2 / 3)


def test_prompts_are_seeded_distinct_and_independent_of_other_classes():
  a = prompts.class_prompts(["Atelectasis", "Pleural Effusion"], 5, seed=0)
  b = prompts.class_prompts(["Pleural_Effusion"], 5, seed=0)
  assert a["Pleural Effusion"] == b["Pleural_Effusion"]
  assert a == prompts.class_prompts(["Atelectasis", "Pleural Effusion"], 5, seed=0)
  assert a != prompts.class_prompts(["Atelectasis", "Pleural Effusion"], 5, seed=1)
  for texts in a.values():
    assert len(texts) == 5 and len(set(texts)) == 5
  assert all("effusion" in t for t in a["Pleural Effusion"])
  # A class with fewer combinations than asked for gets all of them.
  few = prompts.class_prompts(["Normal"], 100)["Normal"]
  assert few == prompts.all_prompts(prompts.PROMPT_WORDS["normal"])
  with pytest.raises(KeyError, match="known classes"):
    prompts.class_prompts(["Fracture"], 3)


def test_every_phantom_class_has_prompts():
  from medunifier_jax.data import findings

  for names in (
    findings.CLASSES_5X200,
    findings.CLASSES_PNEUMONIA,
    findings.CLASSES_PNEUMOTHORAX,
    findings.CLASSES_COVIDX,
  ):
    assert all(prompts.canonical_class(n) for n in names)


def test_label_fractions_are_stratified_and_seeded():
  labels = np.array([0] * 90 + [1] * 10)
  ten = finetune.sample_fraction(labels, 0.1, seed=0)
  assert np.bincount(labels[ten]).tolist() == [9, 1]
  assert finetune.sample_fraction(labels, 0.01, seed=0).size == 2  # at least one per class
  np.testing.assert_array_equal(ten, finetune.sample_fraction(labels, 0.1, seed=0))
  assert finetune.sample_fraction(labels, 1.0, seed=3).tolist() == list(range(100))
  with pytest.raises(ValueError, match=r"\(0, 1\]"):
    finetune.sample_fraction(labels, 0.0, seed=0)
