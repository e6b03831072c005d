r"""How learnable are the pre-training images for the configured ViT? A supervised reference.

  python -m medunifier_jax.supervised_reference --config configs/pretrain.py:demo \
      --workdir /tmp/supervised [--config.num_steps=600] [--eval_every=100]

Trains the configuration's image encoder from scratch, with a linear head on its mean-pooled
tokens, directly on the pre-training data's finding labels (multi-label cross-entropy), with
the configuration's optimiser, batch size and step count. Prints the validation-split AUC of
every finding every `--eval_every` steps, and writes the last ones to WORKDIR/supervised.json.

Pre-training never sees these labels: it learns the same encoder from the reports alone. This
run is the upper reference for what the encoder can pick up from the same images in the same
number of steps; the demo's fine-tuned figures (`medunifier_jax.demo`) sit below it.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

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
  val = [b for b in pipeline.eval_dataset(config, tokenizer, source=val_source,
                                          shard_index=0, shard_count=1)]
  if "labels" not in val[0]:
    raise ValueError(f"data set {config.data.name!r} has no finding labels to supervise with")
  val_labels = np.concatenate([b["labels"][b["mask"]] for b in val])

  model = SupervisedEncoder(config.model.vit, len(findings_lib.FINDINGS),
                            rngs=nnx.Rngs(int(config.seed)))
  optimizer = nnx.Optimizer(model, optimizer_lib.make_tx(config), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, images, labels):
    def loss_fn(model):
      return optax.sigmoid_binary_cross_entropy(model(images), labels).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  predict = nnx.jit(lambda model, images: model(images))

  def evaluate() -> dict[str, float]:
    logits = np.concatenate([np.asarray(predict(model, b["image"]))[b["mask"]] for b in val])
    return auc_per_finding(val_labels, logits)

  batches = iter(pipeline.train_dataset(config, tokenizer, shard_index=0, shard_count=1))
  start, aucs = time.perf_counter(), {}
  for step in range(1, int(config.num_steps) + 1):
    batch = next(batches)
    loss = train_step(model, optimizer, jnp.asarray(batch["image"]),
                      jnp.asarray(batch["labels"]))
    if step % eval_every == 0 or step == config.num_steps:
      aucs = evaluate()
      log(f"step {step}: loss {float(loss):.4f}, validation AUC mean "
          f"{np.mean(list(aucs.values())):.3f} ({time.perf_counter() - start:.0f} s)\n  "
          + ", ".join(f"{k} {v:.3f}" for k, v in aucs.items()))
  with open(os.path.join(workdir, "supervised.json"), "w") as f:
    json.dump({"steps": int(config.num_steps), "data": config.data.name,
               "validation_examples": int(len(val_labels)), "auc": aucs}, f, indent=1)
  return aucs


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run(_CONFIG.value, _WORKDIR.value, _EVAL_EVERY.value)


if __name__ == "__main__":
  _CONFIG = config_flags.DEFINE_config_file("config", None, "e.g. configs/pretrain.py:demo",
                                            lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", None, "Where the tokenizer and results go.")
  _EVAL_EVERY = flags.DEFINE_integer("eval_every", 100, "Steps between validation AUCs.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
