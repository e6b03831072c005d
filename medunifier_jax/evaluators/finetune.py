"""Fine-tuned classification on frozen features (the paper's linear-probe-style protocol).

The frozen model's Q-Former query outputs (Q, H) are flattened and fed to two linear layers
(Q*H -> hidden_dim -> classes, a ReLU between them: without it the pair would collapse to one
linear map). Features are computed once per split; only the head trains: AdamW (lr 1e-5,
batch 8, 5 epochs by default), binary cross-entropy on one logit for two-class sets (RSNA- and
SIIM-like), cross-entropy for more classes (COVIDx-like). For each label fraction (1%, 10%,
100% of the training split, drawn per class with a fixed seed, at least one example per class)
the head is trained from the same initialisation; the epoch with the best validation
`select_metric` is evaluated on the test split.

Metrics are reported as `{fraction}%/{metric}` (e.g. `10%/auc`), plus `{fraction}%/num_train`
and `{fraction}%/best_epoch`.
"""

from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medunifier_jax.evaluators import common, metrics


def init_head(rng: jax.Array, in_dim: int, hidden_dim: int, out_dim: int) -> dict:
  """Two linear layers: w1 (in, hidden), b1, w2 (hidden, out), b2 (Glorot-uniform weights)."""
  k1, k2 = jax.random.split(rng)
  init = jax.nn.initializers.glorot_uniform()
  return {"w1": init(k1, (in_dim, hidden_dim)), "b1": jnp.zeros((hidden_dim,)),
          "w2": init(k2, (hidden_dim, out_dim)), "b2": jnp.zeros((out_dim,))}


def head_logits(params: dict, x: jax.Array) -> jax.Array:
  """(B, in) features -> (B, out) logits."""
  h = jax.nn.relu(x @ params["w1"] + params["b1"])
  return h @ params["w2"] + params["b2"]


def head_loss(params: dict, x, y, weight, binary: bool) -> jax.Array:
  """Weighted mean BCE (binary: one logit) or CE (multi-class); weight 0 marks padding."""
  logits = head_logits(params, x)
  if binary:
    losses = optax.sigmoid_binary_cross_entropy(logits[:, 0], y.astype(jnp.float32))
  else:
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  return jnp.sum(losses * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def head_probs(logits: np.ndarray, binary: bool) -> np.ndarray:
  """Logits -> (N, C) class probabilities."""
  if binary:
    p1 = 1.0 / (1.0 + np.exp(-logits[:, 0]))
    return np.stack([1.0 - p1, p1], axis=1)
  return common.softmax(logits, axis=1)


def sample_fraction(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """Sorted indices of a per-class `fraction` of the examples (at least one per class)."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"label fractions must lie in (0, 1], got {fraction}")
  rng = np.random.default_rng(seed)
  chosen = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    take = max(1, int(round(fraction * members.size)))
    chosen.append(rng.permutation(members)[:take])
  return np.sort(np.concatenate(chosen))


class FinetuneEvaluator(common.Evaluator):
  """Settings (`config.evals.finetune`): datasets, train_split, val_split, test_split,
  label_fractions, learning_rate, weight_decay, batch_size, epochs, hidden_dim, select_metric,
  feature_batch_size, seed."""

  task = "finetune"

  def __init__(self, config, task_config, tokenizer, **kwargs):
    super().__init__(config, task_config, tokenizer, **kwargs)
    self._steps: dict = {}

  def evaluate(self, dataset: str, graphdef, state) -> Iterator[tuple[str, float]]:
    cfg, fns = self.cfg, self.fns(graphdef)
    splits = {}
    for role in ("train", "val", "test"):
      source = self.source(dataset, cfg[f"{role}_split"])
      if role == "train":
        class_names = common.source_class_names(source, dataset)
      batches = common.EvalBatches(self.config, self.tokenizer, source,
                                    int(cfg.feature_batch_size))
      feats = common.collect_features(fns, state, batches, image_keys=("queries",),
                                      desc=f"finetune {dataset} {role}")
      splits[role] = (feats["queries"].reshape(feats["queries"].shape[0], -1).astype(np.float32),
                      feats["label"].astype(np.int32))
    results = {}
    for fraction in cfg.label_fractions:
      name = f"{float(fraction) * 100:g}%"
      keep = sample_fraction(splits["train"][1], float(fraction), int(cfg.seed))
      train = (splits["train"][0][keep], splits["train"][1][keep])
      test_metrics, best_epoch = self._fit(train, splits["val"], splits["test"],
                                           len(class_names))
      results[name] = test_metrics
      yield f"{name}/num_train", float(keep.size)
      yield f"{name}/best_epoch", float(best_epoch)
      for metric, value in test_metrics.items():
        yield f"{name}/{metric}", value
    self.outputs[dataset] = {"class_names": list(class_names), "results": results}

  def _train_fns(self, in_dim: int, out_dim: int, binary: bool):
    key = (in_dim, out_dim, binary)
    if key not in self._steps:
      tx = optax.adamw(float(self.cfg.learning_rate), weight_decay=float(self.cfg.weight_decay))

      @jax.jit
      def step(params, opt_state, x, y, w):
        loss, grads = jax.value_and_grad(head_loss)(params, x, y, w, binary)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

      self._steps[key] = (tx, step, jax.jit(head_logits))
    return self._steps[key]

  def _fit(self, train, val, test, num_classes: int) -> tuple[dict[str, float], int]:
    """Trains a head on (features (N, D), labels (N,)); returns test metrics, best epoch."""
    cfg = self.cfg
    x, y = train
    binary = num_classes == 2
    out_dim = 1 if binary else num_classes
    tx, step, logits_fn = self._train_fns(x.shape[1], out_dim, binary)
    params = init_head(jax.random.key(int(cfg.seed)), x.shape[1], int(cfg.hidden_dim), out_dim)
    opt_state = tx.init(params)
    bs = int(cfg.batch_size)
    predict = lambda p, feats: head_probs(np.concatenate(common.run_in_chunks(
        lambda f: logits_fn(p, f), {"f": feats}, 256)), binary)
    best, best_params, best_epoch = -np.inf, params, 0
    for epoch in range(1, int(cfg.epochs) + 1):
      order = np.random.default_rng((int(cfg.seed), epoch)).permutation(len(y))
      for start in range(0, len(order), bs):
        idx = order[start:start + bs]
        w = np.zeros((bs,), np.float32)
        w[:idx.size] = 1.0
        idx = np.concatenate([idx, np.repeat(idx[:1], bs - idx.size)])  # fixed batch shape
        params, opt_state, _ = step(params, opt_state, x[idx], y[idx], w)
      score = metrics.classification_metrics(val[1], predict(params, val[0]))[cfg.select_metric]
      score = score if np.isfinite(score) else -np.inf  # e.g. AUC with one class in val
      if score > best or best_epoch == 0:
        best, best_params, best_epoch = score, params, epoch
    return metrics.classification_metrics(test[1], predict(best_params, test[0])), best_epoch
