"""Classification and retrieval metrics on NumPy arrays.

Classification metrics come from scikit-learn; retrieval metrics are a few lines of ranking
arithmetic written out here because both P@K definitions in use are non-standard.

Ranking convention (ties): items are ranked by descending score with a stable sort, so among
equal scores the lower item index ranks first. Every retrieval metric below uses that order.
"""

from collections.abc import Sequence

import numpy as np
from sklearn import metrics as skm


def _check_probs(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  labels = np.asarray(labels).astype(np.int64).reshape(-1)
  probs = np.asarray(probs, dtype=np.float64)
  if probs.ndim == 1:  # binary: the probability of class 1
    probs = np.stack([1.0 - probs, probs], axis=1)
  if probs.ndim != 2 or probs.shape[0] != labels.shape[0]:
    raise ValueError(
      f"expected probs of shape (N, C) or (N,) with N = {labels.shape[0]} labels, got {probs.shape}"
    )
  if labels.size and (labels.min() < 0 or labels.max() >= probs.shape[1]):
    raise ValueError(
      f"labels must lie in [0, {probs.shape[1]}), got [{labels.min()}, {labels.max()}]"
    )
  return labels, probs


def classification_metrics(labels, probs) -> dict[str, float]:
  """Accuracy, macro F1, AUC, sensitivity, specificity, PPV and NPV.

  Args:
    labels: (N,) int class indices.
    probs: (N, C) class probabilities (rows need not sum to 1), or (N,) the probability of
      class 1 for a binary task.

  Binary tasks (C == 2) report the positive class (1): `auc` is the ROC AUC of probs[:, 1] and
  sensitivity/specificity/PPV/NPV are those of class 1 at the argmax decision. Multi-class tasks
  report one-vs-rest values macro-averaged over classes (`auc` is sklearn's macro OvR AUC).
  A metric that is undefined on the data (e.g. AUC with one class present) is NaN.
  """
  labels, probs = _check_probs(labels, probs)
  num_classes = probs.shape[1]
  preds = probs.argmax(axis=1)
  out = {
    "accuracy": float(skm.accuracy_score(labels, preds)),
    "f1_macro": float(
      skm.f1_score(labels, preds, average="macro", labels=np.arange(num_classes), zero_division=0)
    ),
  }
  present = np.unique(labels)
  if num_classes == 2:
    out["auc"] = float(skm.roc_auc_score(labels, probs[:, 1])) if present.size == 2 else np.nan
  elif present.size == num_classes:
    scores = probs / np.clip(probs.sum(axis=1, keepdims=True), 1e-12, None)
    out["auc"] = float(skm.roc_auc_score(labels, scores, multi_class="ovr", average="macro"))
  else:
    out["auc"] = np.nan
  cm = skm.confusion_matrix(labels, preds, labels=np.arange(num_classes))
  tp = np.diag(cm).astype(np.float64)
  fp = cm.sum(axis=0) - tp
  fn = cm.sum(axis=1) - tp
  tn = cm.sum() - tp - fp - fn
  ratio = lambda a, b: np.divide(a, b, out=np.full_like(a, np.nan), where=b > 0)
  per_class = dict(
    sensitivity=ratio(tp, tp + fn),
    specificity=ratio(tn, tn + fp),
    ppv=ratio(tp, tp + fp),
    npv=ratio(tn, tn + fn),
  )
  for name, values in per_class.items():
    if num_classes == 2:
      out[name] = float(values[1])
    else:
      out[name] = float(np.nanmean(values)) if np.isfinite(values).any() else np.nan
  return out


def per_class_metrics(labels, probs, class_names: Sequence[str]) -> dict[str, float]:
  """Each class's own figures, for what a macro average hides.

  Args:
    labels: (N,) int class indices.
    probs: (N, C) class probabilities (or scores).
    class_names: C names, used as key prefixes.
  Returns:
    `{name}/recall` (the share of the class's items whose argmax is the class) and `{name}/auc`
    (the ROC AUC of probs[:, c], the class against the rest); NaN where undefined.
  """
  labels, probs = _check_probs(labels, probs)
  if len(class_names) != probs.shape[1]:
    raise ValueError(f"{len(class_names)} class names for {probs.shape[1]} classes")
  preds = probs.argmax(axis=1)
  out = {}
  for c, name in enumerate(class_names):
    mine = labels == c
    out[f"{name}/recall"] = float(np.mean(preds[mine] == c)) if mine.any() else np.nan
    both = mine.any() and (~mine).any()
    out[f"{name}/auc"] = float(skm.roc_auc_score(mine, probs[:, c])) if both else np.nan
  return out


def effective_rank(x) -> float:
  """How many directions a set of embeddings spreads over: exp of the entropy of the shares
  of variance along the principal axes (1 for points on a line, D for isotropic ones).

  Args:
    x: (N, D) embeddings.
  """
  x = np.asarray(x, dtype=np.float64)
  x = x - x.mean(axis=0)
  var = np.linalg.svd(x, compute_uv=False) ** 2
  if var.sum() <= 0:
    return 0.0
  share = var / var.sum()
  share = share[share > 0]
  return float(np.exp(-(share * np.log(share)).sum()))


def confusion_matrix(labels, probs) -> np.ndarray:
  """(C, C) counts, rows = true class, columns = predicted (argmax) class."""
  labels, probs = _check_probs(labels, probs)
  return skm.confusion_matrix(labels, probs.argmax(axis=1), labels=np.arange(probs.shape[1]))


def rank_items(scores: np.ndarray, k: int | None = None) -> np.ndarray:
  """(Q, I) scores -> (Q, k) item indices, best first; ties go to the lower index."""
  scores = np.asarray(scores)
  order = np.argsort(-scores, axis=1, kind="stable")
  return order if k is None else order[:, :k]


def recall_at_k(scores, targets, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
  """Share of queries whose paired item is among the top k.

  Args:
    scores: (Q, I) query-item scores.
    targets: (Q,) index of each query's paired item.
  """
  scores, targets = np.asarray(scores), np.asarray(targets).reshape(-1)
  if targets.shape[0] != scores.shape[0]:
    raise ValueError(f"targets has {targets.shape[0]} entries, scores has {scores.shape[0]} rows")
  top = rank_items(scores, max(ks))
  hits = top == targets[:, None]
  return {k: float(hits[:, :k].any(axis=1).mean()) for k in ks}


def precision_at_k(scores, relevant, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
  """Plain precision@K: the mean over queries of (relevant items in the top K) / K.

  Args:
    scores: (Q, I) query-item scores.
    relevant: (Q, I) bool, True where the item is relevant to the query (e.g. same class).
  """
  rel_top = _relevance_of_ranking(scores, relevant, max(ks))
  return {k: float(rel_top[:, :k].sum(axis=1).mean() / k) for k in ks}


def hit_precision_at_k(scores, relevant, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
  """P@K as the MedUnifier/MGCA retrieval code computes it.

  For each query, the precision at every rank r <= K that holds a relevant item,
  (relevant items in the top r) / r, averaged over those hits; 0 when the top K hold none.
  Then the mean over queries. This is average precision truncated at K and normalised by the
  number of hits found, so it rewards putting hits first but not finding many of them: a single
  relevant item at rank 1 scores 1.0 for every K. It equals plain precision@K at K = 1.
  """
  rel_top = _relevance_of_ranking(scores, relevant, max(ks)).astype(np.float64)
  ranks = np.arange(1, rel_top.shape[1] + 1)
  prec_at_rank = np.cumsum(rel_top, axis=1) / ranks
  out = {}
  for k in ks:
    hits = rel_top[:, :k].sum(axis=1)
    summed = (prec_at_rank[:, :k] * rel_top[:, :k]).sum(axis=1)
    out[k] = float(np.where(hits > 0, summed / np.maximum(hits, 1), 0.0).mean())
  return out


def _relevance_of_ranking(scores, relevant, k: int) -> np.ndarray:
  scores, relevant = np.asarray(scores), np.asarray(relevant, dtype=bool)
  if scores.shape != relevant.shape:
    raise ValueError(f"relevant {relevant.shape} must have the shape of scores {scores.shape}")
  top = rank_items(scores, k)
  return np.take_along_axis(relevant, top, axis=1)


def retrieval_metrics(
  scores, targets, relevant, ks: Sequence[int] = (1, 5, 10), prefix: str = ""
) -> dict[str, float]:
  """R@K, P@K (paper definition, `hit_precision_at_k`) and plain precision@K in one dict.

  Names: `{prefix}R@{k}`, `{prefix}P@{k}` (paper) and `{prefix}plain_P@{k}`.
  """
  out = {}
  for k, v in recall_at_k(scores, targets, ks).items():
    out[f"{prefix}R@{k}"] = v
  for k, v in hit_precision_at_k(scores, relevant, ks).items():
    out[f"{prefix}P@{k}"] = v
  for k, v in precision_at_k(scores, relevant, ks).items():
    out[f"{prefix}plain_P@{k}"] = v
  return out


def multilabel_prf(predicted, reference, names: Sequence[str]) -> dict[str, float]:
  """Precision, recall and F1 of predicted binary findings against reference findings.

  Args:
    predicted, reference: (N, F) 0/1 arrays.
    names: the F finding names (per-finding F1 is reported as `f1/{name}`).
  Returns micro- and macro-averaged precision/recall/F1 (scikit-learn, zero_division=0) and the
  per-finding F1.
  """
  predicted = np.asarray(predicted).astype(np.int64)
  reference = np.asarray(reference).astype(np.int64)
  if predicted.shape != reference.shape or predicted.shape[1] != len(names):
    raise ValueError(
      f"predicted {predicted.shape} and reference {reference.shape} must both be (N, {len(names)})"
    )
  out = {}
  for avg in ("micro", "macro"):
    p, r, f, _ = skm.precision_recall_fscore_support(
      reference, predicted, average=avg, zero_division=0
    )
    out[f"precision_{avg}"], out[f"recall_{avg}"], out[f"f1_{avg}"] = float(p), float(r), float(f)
  per = skm.f1_score(reference, predicted, average=None, zero_division=0)
  for name, value in zip(names, per):
    out[f"f1/{name}"] = float(value)
  return out
