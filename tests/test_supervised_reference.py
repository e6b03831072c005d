"""The supervised reference (the configured ViT trained on the finding labels) runs and writes
its validation AUCs. Whether it learns is a matter of size and steps: the tiny ViT barely moves
in a test's few steps, the demo size is measured in the README."""

import json

import numpy as np
import optax
from flax import nnx, traverse_util

from configs.pretrain import get_config
from medunifier_jax import supervised
from medunifier_jax.data import findings


def test_supervised_reference_reports_an_auc_per_finding(tmp_path):
  config = get_config("tiny")
  with config.unlocked():
    config.num_steps = 40
    config.batch_size = 16
    config.data.num_val = 64
  lines = []
  aucs = supervised.run(config, str(tmp_path), eval_every=20, log=lines.append)
  assert len(lines) == 2 and "validation AUC" in lines[-1]
  assert set(aucs) <= set(findings.FINDINGS) and len(aucs) >= 5
  assert all(0.0 <= v <= 1.0 for v in aucs.values())
  assert len(set(aucs.values())) > 1  # a model that predicts one value for all scores 0.5
  saved = json.loads((tmp_path / "supervised.json").read_text())
  assert saved["steps"] == 40 and saved["validation_examples"] == 64
  assert np.allclose(list(saved["auc"].values()), list(aucs.values()))


def test_auc_per_finding_ranks_each_column_and_skips_one_class_columns():
  n = len(findings.FINDINGS)
  labels = np.zeros((4, n), np.float32)
  labels[2:, 0] = 1.0  # column 0: separated by its logits -> AUC 1
  labels[2:, 1] = 1.0  # column 1: logits ranked backwards -> AUC 0
  labels[[0, 2], 2] = 1.0  # column 2: one of four pairs ordered right -> AUC 0.25
  logits = np.zeros((4, n), np.float32)
  logits[:, 0] = [0.1, 0.2, 0.8, 0.9]
  logits[:, 1] = [0.9, 0.8, 0.2, 0.1]
  logits[:, 2] = [0.5, 0.6, 0.1, 0.2]
  aucs = supervised.auc_per_finding(labels, logits)
  names = findings.FINDINGS
  assert aucs == {names[0]: 1.0, names[1]: 0.0, names[2]: 0.25}  # the rest: one class only


def test_update_step_trains_only_the_optimizer_filter():
  """The shared step differentiates and updates only `wrt`: here the second layer."""

  class TwoLayers(nnx.Module):
    def __init__(self, rngs):
      self.first = nnx.Linear(3, 2, rngs=rngs)
      self.second = nnx.Linear(2, 1, rngs=rngs)

    def __call__(self, x):
      return self.second(self.first(x))

  model = TwoLayers(nnx.Rngs(0))
  wrt = nnx.All(nnx.Param, nnx.PathContains("second"))
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=wrt)
  step = nnx.jit(supervised.update_step(lambda m, x: (m(x) ** 2).mean(), wrt=wrt))
  flat = lambda: traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model)))
  before = {k: np.array(v) for k, v in flat().items()}
  x = np.ones((4, 3), np.float32)
  first_loss = float(step(model, optimizer, x))
  assert float(step(model, optimizer, x)) < first_loss
  after = flat()
  for path, value in before.items():
    assert np.array_equal(after[path], value) == (path[0] == "first"), path
