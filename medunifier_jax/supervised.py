"""The configuration's image encoder trained directly on finding labels: the supervised
reference that `python -m medunifier_jax.supervised_reference` runs, and its parts.

`SupervisedEncoder` (the configured ViT with a linear head on its mean-pooled tokens),
`update_step` (one optimizer update, shared by every nnx.Optimizer user: the fine-tuning probes
too), `train_step`, `new_encoder`, `auc_per_finding`, and `run`, the whole reference run. The
image-generation evaluator trains the same encoder as its fidelity classifier.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from medunifier_jax.data import findings as findings_lib
from medunifier_jax.data import pipeline, registry
from medunifier_jax.models import vit as vit_lib
from medunifier_jax.training import optimizer as optimizer_lib


class SupervisedEncoder(nnx.Module):
  """The configuration's ViT and a linear head: (B, S, S, 3) -> (B, F) finding logits."""

  def __init__(self, vit_config, num_labels: int, *, rngs: nnx.Rngs):
    self.vit = vit_lib.VisionTransformer(vit_config, rngs=rngs)
    self.head = nnx.Linear(vit_config.width, num_labels, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    return self.head(self.vit(images).mean(axis=1))


def update_step(
  loss_fn: Callable[..., jax.Array], wrt: nnx.filterlib.Filter = nnx.Param
) -> Callable[..., jax.Array]:
  """One optimizer update, the training routine every nnx.Optimizer user here shares.

  Args:
    loss_fn: (model, *batch) -> scalar loss.
    wrt: the parameters to differentiate, the optimizer's own `wrt` (only these get a backward
      pass: a frozen encoder's is never built).
  Returns:
    step(model, optimizer, *batch, **update_args) -> loss, updating model and optimizer in
    place; `update_args` go to `optimizer.update` (e.g. a `learning_rate=` the transformation
    takes per call). Not compiled: wrap it in `nnx.jit`, or call it inside a jitted function
    on merged modules.
  """

  def step(model, optimizer, *batch, **update_args):
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model, *batch)
    optimizer.update(model, grads, **update_args)
    return loss

  return step


def finding_loss(model, images: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean multi-label sigmoid cross-entropy of the model's (B, F) logits for images (B, S, S, 3)
  against 0/1 finding labels (B, F)."""
  return optax.sigmoid_binary_cross_entropy(model(images), labels).mean()


# Compiled once per model graph; the reference run and the fidelity classifier share it.
train_step = nnx.jit(update_step(finding_loss))


def new_encoder(config) -> tuple[SupervisedEncoder, nnx.Optimizer]:
  """A fresh `SupervisedEncoder` over the findings (seeded by config.seed) and its optimizer:
  the configuration's (`training.optimizer.make_tx`: rate, warm-up, decay, clipping; not the
  pre-training's per-submodule `lr_multipliers`, which name parts of a MedUnifier)."""
  model = SupervisedEncoder(
    config.model.vit, findings_lib.NUM_FINDINGS, rngs=nnx.Rngs(int(config.seed))
  )
  tx = optimizer_lib.make_tx(config, multipliers=False)
  return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def auc_per_finding(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
  """ROC AUC of each `findings.FINDINGS` column of labels (N, F) by logits (N, F); findings
  with only one class among the N examples have none and are left out."""
  from sklearn.metrics import roc_auc_score

  out = {}
  for k, name in enumerate(findings_lib.FINDINGS):
    column = labels[:, k]
    if 0 < column.sum() < len(column):  # AUC needs both classes
      out[name] = float(roc_auc_score(column, logits[:, k]))
  return out


def run(config, workdir: str, eval_every: int = 100, log=print) -> dict[str, float]:
  """Trains config.num_steps supervised steps; returns the last validation AUC per finding."""
  from medunifier_jax import paths

  workdir = paths.resolve(workdir)
  paths.resolve_config(config)
  os.makedirs(workdir, exist_ok=True)
  tokenizer = pipeline.build_tokenizer(config, os.path.join(workdir, "tokenizer"))
  val_source = registry.get_source(config.data.name, "validation", config.data)
  val = [
    b
    for b in pipeline.eval_dataset(
      config, tokenizer, source=val_source, shard_index=0, shard_count=1
    )
  ]
  if "labels" not in val[0]:
    raise ValueError(f"data set {config.data.name!r} has no finding labels to supervise with")
  val_labels = np.concatenate([b["labels"][b["mask"]] for b in val])

  model, optimizer = new_encoder(config)
  predict = nnx.jit(lambda model, images: model(images))

  def evaluate() -> dict[str, float]:
    logits = np.concatenate([np.asarray(predict(model, b["image"]))[b["mask"]] for b in val])
    return auc_per_finding(val_labels, logits)

  batches = iter(pipeline.train_dataset(config, tokenizer, shard_index=0, shard_count=1))
  start, aucs = time.perf_counter(), {}
  for step in range(1, int(config.num_steps) + 1):
    batch = next(batches)
    loss = train_step(model, optimizer, jnp.asarray(batch["image"]), jnp.asarray(batch["labels"]))
    if step % eval_every == 0 or step == config.num_steps:
      aucs = evaluate()
      log(
        f"step {step}: loss {float(loss):.4f}, validation AUC mean "
        f"{np.mean(list(aucs.values())):.3f} ({time.perf_counter() - start:.0f} s)\n  "
        + ", ".join(f"{k} {v:.3f}" for k, v in aucs.items())
      )
  with open(os.path.join(workdir, "supervised.json"), "w") as f:
    json.dump(
      {
        "steps": int(config.num_steps),
        "data": config.data.name,
        "validation_examples": int(len(val_labels)),
        "auc": aucs,
      },
      f,
      indent=1,
    )
  return aucs
