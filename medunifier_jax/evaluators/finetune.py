"""Fine-tuned classification: the paper's end-to-end Q-Former fine-tune, or a linear probe.

`protocol` (`config.evals.finetune.protocol`) picks how a classifier is trained on the model:

  paper         The authors' code: the Q-Former's query outputs (B, Q, H) are flattened to Q*H
                (`pooling="flatten"`; "mean" averages over the queries to H instead) and go
                through Linear(hidden_dim, 768 there) -> Linear(classes), with no activation in
                between as there (the pair is then one linear map of rank <= hidden_dim). The ViT
                stays frozen; the Q-Former, its learned queries and the head are trained end to
                end with dropout on: AdamW (adam_b1 0.9, adam_b2 0.95, weight_decay 0.01 on every
                trained weight, as the authors' code sets it), learning_rate 1e-5 decayed by a
                cosine to end_learning_rate over all steps (`schedule`), batch 8, 5 epochs.
                Images are read from the data set every epoch; one compiled step serves every
                label fraction and epoch (the learning rate is an argument of the step).
  linear_probe  A cheaper stand-in, named as such: the frozen model's query outputs are computed
                once per split and only a head trains on them: Linear(hidden_dim) -> ReLU ->
                Linear(classes) (the ReLU keeps the pair from collapsing into one linear map;
                Glorot-uniform weights), AdamW (optax defaults for the betas) at a constant
                learning_rate.

Both: binary cross-entropy on one logit for two-class sets (RSNA-, SIIM-like), cross-entropy for
more classes (COVIDx-like). For each label fraction (1%, 10%, 100% of the training split, drawn
per class with a fixed seed, at least one example per class) training starts from the same
initialisation; the epoch with the best validation `select_metric` is evaluated on the test
split. Metrics are reported as `{fraction}%/{metric}` (e.g. `10%/auc`), plus
`{fraction}%/num_train` and `{fraction}%/best_epoch`; the protocol is part of the settings
written to results.json, of `outputs[data set]["protocol"]` and of `describe()`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from scipy import special

from medunifier_jax.evaluators import common, metrics
from medunifier_jax.supervised import update_step

PROTOCOLS = ("paper", "linear_probe")
POOLINGS = ("flatten", "mean")
SCHEDULES = ("cosine", "constant")
# What the paper protocol trains, by path component of `QueryClassifier`: the Q-Former and its
# queries inside `model`, and the `head`. Everything else (the ViT above all) stays as loaded.
END_TO_END_TRAINED = ("qformer", "query_tokens", "head")


def end_to_end_filter() -> nnx.filterlib.Filter:
  """The parameters the paper protocol trains (`END_TO_END_TRAINED`)."""
  return nnx.All(nnx.Param, nnx.Any(*(nnx.PathContains(p) for p in END_TO_END_TRAINED)))


def pool_queries(queries, pooling: str):
  """(B, Q, H) query outputs -> (B, Q*H) ("flatten", the authors' code) or (B, H) ("mean")."""
  if pooling == "flatten":
    return queries.reshape(queries.shape[0], -1)
  if pooling == "mean":
    return queries.mean(axis=1)
  raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")


class MLPHead(nnx.Module):
  """Features (B, in_dim) -> logits (B, out_dim): Linear(hidden_dim), [ReLU], Linear(out_dim).

  kernel_init: the weights' initialiser (None: the layer's default); biases start at 0.
  """

  def __init__(
    self,
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    *,
    activation: bool = False,
    kernel_init=None,
    rngs: nnx.Rngs,
  ):
    self.activation = activation
    init = {} if kernel_init is None else {"kernel_init": kernel_init}
    self.hidden = nnx.Linear(in_dim, hidden_dim, rngs=rngs, **init)
    self.out = nnx.Linear(hidden_dim, out_dim, rngs=rngs, **init)

  def __call__(self, features: jax.Array) -> jax.Array:
    h = self.hidden(features)
    return self.out(nnx.relu(h) if self.activation else h)


class ClassifierHead(MLPHead):
  """Query outputs (B, Q, H) -> logits (B, out): pool (`pool_queries`), then the `MLPHead`."""

  def __init__(
    self,
    num_queries: int,
    width: int,
    hidden_dim: int,
    out_dim: int,
    *,
    pooling: str = "flatten",
    activation: bool = False,
    rngs: nnx.Rngs,
  ):
    if pooling not in POOLINGS:
      raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
    self.pooling = pooling
    in_dim = num_queries * width if pooling == "flatten" else width
    super().__init__(in_dim, hidden_dim, out_dim, activation=activation, rngs=rngs)

  def __call__(self, queries: jax.Array) -> jax.Array:
    return super().__call__(pool_queries(queries.astype(jnp.float32), self.pooling))


class QueryClassifier(nnx.Module):
  """A MedUnifier's image path and a head: pixels (B, S, S, 3) -> logits (B, out)."""

  def __init__(self, model: nnx.Module, head: ClassifierHead):
    self.model = model
    self.head = head

  def __call__(self, pixel_values: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    # The frozen ViT runs without dropout (no rngs); the Q-Former takes the call's rngs.
    tokens = self.model.image_tokens(pixel_values)
    return self.head(self.model.image_queries(tokens, rngs=rngs))


def adamw_rate_argument(
  b1: float, b2: float, weight_decay: float
) -> optax.GradientTransformationExtraArgs:
  """AdamW (decoupled decay on every parameter) whose learning rate is passed to each update as
  `learning_rate=`: the schedule is evaluated outside the compiled step, so label fractions with
  different step counts share one compilation."""

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None, *, learning_rate, **extra):
    del params, extra
    return jax.tree.map(lambda u: -learning_rate * u, updates), state

  return optax.chain(
    optax.scale_by_adam(b1=b1, b2=b2),
    optax.add_decayed_weights(weight_decay),
    optax.GradientTransformationExtraArgs(init, update),
  )


def learning_rate_at(cfg, step: int, total_steps: int) -> float:
  """The paper protocol's rate for update `step` of `total_steps`: a cosine from learning_rate to
  end_learning_rate (the authors' CosineAnnealingLR over every step), or constant."""
  lr = float(cfg.learning_rate)
  if cfg.get("schedule", "cosine") == "constant":
    return lr
  end = float(cfg.get("end_learning_rate", 0.0))
  return end + (lr - end) * 0.5 * (1.0 + np.cos(np.pi * min(step, total_steps) / total_steps))


def classification_loss(
  logits: jax.Array, y: jax.Array, weight: jax.Array, binary: bool
) -> jax.Array:
  """Weighted mean BCE (binary: one logit) or CE (multi-class) of (B, out) logits; weight 0 marks
  padding."""
  if binary:
    losses = optax.sigmoid_binary_cross_entropy(logits[:, 0], y.astype(jnp.float32))
  else:
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  return jnp.sum(losses * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def head_probs(logits: np.ndarray, binary: bool) -> np.ndarray:
  """(N, out) logits -> (N, C) class probabilities: the sigmoid of the one logit of a binary
  head as (1 - p, p), or the softmax over a multi-class head's."""
  if binary:
    p1 = special.expit(logits[:, 0])
    return np.stack([1.0 - p1, p1], axis=1)
  return special.softmax(logits, axis=1)


def validation_score(labels: np.ndarray, probs: np.ndarray, metric: str) -> float:
  """The epoch-selection score: `metric` of (N, C) probs against (N,) labels, -inf where it is
  undefined (e.g. AUC with one class in the validation split), so such an epoch never wins."""
  score = metrics.classification_metrics(labels, probs)[metric]
  return score if np.isfinite(score) else -np.inf


# The linear probe: a head (`MLPHead` with ReLU) trained on cached (N, D) features.


def probe_loss(
  head: MLPHead, x: jax.Array, y: jax.Array, weight: jax.Array, binary: bool
) -> jax.Array:
  """`classification_loss` of the head on features x (B, D), labels y (B,), weights (B,)."""
  return classification_loss(head(x), y, weight, binary)


# One compiled step per kind of loss (binary or not); each compiles once per head and optimizer
# graph. nnx.jit's Python overhead (well under a millisecond a step) is small beside the
# feature extraction the probe runs first.
PROBE_STEPS = {
  binary: nnx.jit(update_step(functools.partial(probe_loss, binary=binary)))
  for binary in (False, True)
}
probe_logits = nnx.jit(lambda head, x: head(x))


def padded_batches(order: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Rows of `order` in batches of exactly `batch_size`: yields (indices (B,), weights (B,));
  the last batch is filled up with its first row at weight 0 (one compiled shape)."""
  for start in range(0, len(order), batch_size):
    idx = order[start : start + batch_size]
    weights = np.zeros((batch_size,), np.float32)
    weights[: idx.size] = 1.0
    yield np.concatenate([idx, np.repeat(idx[:1], batch_size - idx.size)]), weights


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


class Rows:
  """Records `indices` of a source, in that order (keeps `class_names`)."""

  def __init__(self, source, indices):
    self.source, self.indices = source, np.asarray(indices, np.int64)
    if hasattr(source, "class_names"):
      self.class_names = source.class_names

  def __len__(self) -> int:
    return int(self.indices.size)

  def __getitem__(self, i: int):
    return self.source[int(self.indices[i])]


def source_labels(source) -> np.ndarray:
  """(N,) int32 class label of every record of a classification source."""
  labels = []
  for i in range(len(source)):
    label = source[i].get("label")
    if label is None:
      raise ValueError(f"record {i} of {source!r} has no `label`; fine-tuning needs one")
    labels.append(int(label))
  return np.asarray(labels, np.int32)


@dataclasses.dataclass
class EndToEndFit:
  """What one paper-protocol fit leaves: test metrics, the chosen epoch, and the trained
  parameters of that epoch (`end_to_end_filter` of the `QueryClassifier`)."""

  metrics: dict[str, float]
  best_epoch: int
  params: nnx.State


class FinetuneEvaluator(common.Evaluator):
  """Settings (`config.evals.finetune`): datasets, protocol, train_split, val_split, test_split,
  label_fractions, learning_rate, end_learning_rate, schedule, adam_b1, adam_b2, weight_decay,
  batch_size, epochs, hidden_dim, pooling, select_metric, feature_batch_size, seed."""

  task = "finetune"

  def __init__(self, config, task_config, tokenizer, **kwargs):
    super().__init__(config, task_config, tokenizer, **kwargs)
    self.protocol = common.setting_choice(
      task_config, self.task, "protocol", "linear_probe", PROTOCOLS
    )
    self.pooling = common.setting_choice(task_config, self.task, "pooling", "flatten", POOLINGS)
    common.setting_choice(task_config, self.task, "schedule", "cosine", SCHEDULES)
    self._end_to_end: dict = {}  # paper: compiled step and head per classifier graph
    self._trained = end_to_end_filter()
    # One transformation object per protocol for every fit, so the optimizer's graph (and the
    # step's compilation) is shared between label fractions and data sets.
    self._tx = adamw_rate_argument(
      float(task_config.get("adam_b1", 0.9)),
      float(task_config.get("adam_b2", 0.95)),
      float(task_config.weight_decay),
    )
    # The probe: AdamW with optax's default betas at a constant rate.
    self._probe_tx = optax.adamw(
      float(task_config.learning_rate), weight_decay=float(task_config.weight_decay)
    )

  def describe(self) -> str:
    if self.protocol == "paper":
      return (
        "protocol paper: Q-Former fine-tuned end to end, ViT frozen, "
        f"{self.pooling} queries -> Linear -> Linear"
      )
    return f"protocol linear_probe: head on frozen {self.pooling} query outputs"

  def evaluate(self, dataset: str, graphdef, state) -> Iterator[tuple[str, float]]:
    if self.protocol == "paper":
      yield from self._evaluate_end_to_end(dataset, graphdef, state)
    else:
      yield from self._evaluate_probe(dataset, graphdef, state)

  def _report(self, dataset, class_names, fits) -> Iterator[tuple[str, float]]:
    """fits: per fraction (fraction, num_train, test metrics, best epoch)."""
    results = {}
    for fraction, num_train, test_metrics, best_epoch in fits:
      name = f"{float(fraction) * 100:g}%"
      results[name] = test_metrics
      yield f"{name}/num_train", float(num_train)
      yield f"{name}/best_epoch", float(best_epoch)
      for metric, value in test_metrics.items():
        yield f"{name}/{metric}", value
    self.outputs[dataset] = {
      "class_names": list(class_names),
      "results": results,
      "protocol": self.protocol,
      "pooling": self.pooling,
    }

  # -- paper protocol ----------------------------------------------------------------------------

  def _evaluate_end_to_end(self, dataset, graphdef, state) -> Iterator[tuple[str, float]]:
    cfg = self.cfg
    sources = {
      role: self.source(dataset, cfg[f"{role}_split"]) for role in ("train", "val", "test")
    }
    class_names = common.source_class_names(sources["train"], dataset)
    labels = source_labels(sources["train"])

    def fits():
      for fraction in cfg.label_fractions:
        keep = sample_fraction(labels, float(fraction), int(cfg.seed))
        fit = self.fit_end_to_end(
          graphdef,
          state,
          Rows(sources["train"], keep),
          sources["val"],
          sources["test"],
          len(class_names),
        )
        yield fraction, keep.size, fit.metrics, fit.best_epoch

    yield from self._report(dataset, class_names, fits())

  def end_to_end_fns(self, cls_def, opt_def, head_def, binary: bool):
    """(step, head_logits) compiled for one classifier, optimizer and head graph.

    step(params, opt_state, frozen, pixels (B,S,S,3), labels (B,), weights (B,), learning_rate,
    rng) -> (params, opt_state, loss), donating params and opt_state;
    head_logits(head_state, queries (B,Q,H)) -> (B, out). Predictions run the model's shared
    `image_features` (compiled once for every evaluator) and then the head.
    """
    key = (cls_def, opt_def, head_def, binary)
    if key not in self._end_to_end:
      trained = self._trained

      def loss_fn(classifier, pixels, labels, weights, rng):
        logits = classifier(pixels, rngs=nnx.Rngs(dropout=rng))
        return classification_loss(logits, labels, weights, binary)

      # Gradients only for the trained filter: the ViT's backward pass is never built.
      update = update_step(loss_fn, wrt=trained)

      def step(params, opt_state, frozen, pixels, labels, weights, learning_rate, rng):
        classifier = nnx.merge(cls_def, params, frozen)
        optimizer = nnx.merge(opt_def, opt_state)
        loss = update(
          classifier, optimizer, pixels, labels, weights, rng, learning_rate=learning_rate
        )
        return nnx.state(classifier, trained), nnx.state(optimizer), loss

      def head_logits(head_state, queries):
        return nnx.merge(head_def, head_state)(queries)

      self._end_to_end[key] = (jax.jit(step, donate_argnums=(0, 1)), jax.jit(head_logits))
    return self._end_to_end[key]

  def fit_end_to_end(
    self, graphdef, state, train_source, val_source, test_source, num_classes: int
  ) -> EndToEndFit:
    """Fine-tunes a copy of the model (graphdef, state) with a fresh head on `train_source`;
    selects the epoch on `val_source`, scores it on `test_source`. The given state is left as
    it was."""
    cfg = self.cfg
    binary = num_classes == 2
    qf = self.config.model.qformer
    head = ClassifierHead(
      int(qf.num_queries),
      int(qf.hidden_size),
      int(cfg.hidden_dim),
      1 if binary else num_classes,
      pooling=self.pooling,
      rngs=nnx.Rngs(int(cfg.seed)),
    )
    classifier = QueryClassifier(nnx.merge(graphdef, state), head)
    optimizer = nnx.Optimizer(classifier, self._tx, wrt=self._trained)
    cls_def, params, frozen = nnx.split(classifier, self._trained, ...)
    opt_def, opt_state = nnx.split(optimizer)
    head_def = nnx.graphdef(head)
    # The step donates its parameters, and these are still the caller's arrays: copy them.
    params = jax.tree.map(jnp.copy, params)
    step, head_logits = self.end_to_end_fns(cls_def, opt_def, head_def, binary)
    fns = self.fns(graphdef)

    bs = int(cfg.batch_size)
    per_epoch = -(-len(train_source) // bs)
    total = per_epoch * int(cfg.epochs)
    rng = jax.random.key(int(cfg.seed))

    def predict(params, source) -> tuple[np.ndarray, np.ndarray]:
      trained = nnx.merge(cls_def, params, frozen)
      batches = common.EvalBatches(self.config, self.tokenizer, source, int(cfg.feature_batch_size))
      feats = common.collect_features(
        fns, nnx.state(trained.model), batches, image_keys=("queries",)
      )
      head_state = nnx.state(trained.head)
      logits = np.concatenate(
        common.run_in_chunks(lambda q: head_logits(head_state, q), {"q": feats["queries"]}, 256)
      )
      return head_probs(logits, binary), feats["label"]

    best, best_params, best_epoch, count = -np.inf, params, 0, 0
    for epoch in range(1, int(cfg.epochs) + 1):
      order = np.random.default_rng((int(cfg.seed), epoch)).permutation(len(train_source))
      # Fixed-shape batches: the last one is padded, and its padding weighs 0 in the loss.
      for batch in common.EvalBatches(self.config, self.tokenizer, Rows(train_source, order), bs):
        params, opt_state, _ = step(
          params,
          opt_state,
          frozen,
          batch["image"],
          batch["label"],
          batch["mask"].astype(np.float32),
          np.float32(learning_rate_at(cfg, count, total)),
          jax.random.fold_in(rng, count),
        )
        count += 1
      probs, labels = predict(params, val_source)
      score = validation_score(labels, probs, cfg.select_metric)
      if score > best or best_epoch == 0:
        # A copy: the next step donates `params`.
        best, best_params, best_epoch = score, jax.tree.map(jnp.copy, params), epoch
    probs, labels = predict(best_params, test_source)
    return EndToEndFit(metrics.classification_metrics(labels, probs), best_epoch, best_params)

  # -- linear probe ------------------------------------------------------------------------------

  def _evaluate_probe(self, dataset, graphdef, state) -> Iterator[tuple[str, float]]:
    cfg, fns = self.cfg, self.fns(graphdef)
    splits = {}
    for role in ("train", "val", "test"):
      source = self.source(dataset, cfg[f"{role}_split"])
      if role == "train":
        class_names = common.source_class_names(source, dataset)
      batches = common.EvalBatches(self.config, self.tokenizer, source, int(cfg.feature_batch_size))
      feats = common.collect_features(
        fns, state, batches, image_keys=("queries",), desc=f"finetune {dataset} {role}"
      )
      splits[role] = (
        np.asarray(pool_queries(feats["queries"], self.pooling), np.float32),
        feats["label"].astype(np.int32),
      )

    def fits():
      for fraction in cfg.label_fractions:
        keep = sample_fraction(splits["train"][1], float(fraction), int(cfg.seed))
        train = (splits["train"][0][keep], splits["train"][1][keep])
        test_metrics, best_epoch = self._fit(train, splits["val"], splits["test"], len(class_names))
        yield fraction, keep.size, test_metrics, best_epoch

    yield from self._report(dataset, class_names, fits())

  def _fit(self, train, val, test, num_classes: int) -> tuple[dict[str, float], int]:
    """Linear probe: trains a fresh head on train = (features (N, D), labels (N,)), selects the
    epoch on val, scores it on test (both pairs alike); returns test metrics and that epoch."""
    cfg = self.cfg
    x, y = train
    binary = num_classes == 2
    head = MLPHead(
      x.shape[1],
      int(cfg.hidden_dim),
      1 if binary else num_classes,
      activation=True,
      kernel_init=nnx.initializers.glorot_uniform(),
      rngs=nnx.Rngs(int(cfg.seed)),
    )
    optimizer = nnx.Optimizer(head, self._probe_tx, wrt=nnx.Param)
    step = PROBE_STEPS[binary]

    def predict(head, feats):
      logits = common.run_in_chunks(lambda f: probe_logits(head, f), {"f": feats}, 256)
      return head_probs(np.concatenate(logits), binary)

    best, best_head, best_epoch = -np.inf, head, 0
    for epoch in range(1, int(cfg.epochs) + 1):
      order = np.random.default_rng((int(cfg.seed), epoch)).permutation(len(y))
      for idx, weights in padded_batches(order, int(cfg.batch_size)):
        step(head, optimizer, x[idx], y[idx], weights)
      score = validation_score(val[1], predict(head, val[0]), cfg.select_metric)
      if score > best or best_epoch == 0:
        # A copy: the next steps update `head` in place.
        best, best_head, best_epoch = score, nnx.clone(head), epoch
    return metrics.classification_metrics(test[1], predict(best_head, test[0])), best_epoch
