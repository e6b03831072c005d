"""The supervised reference (the configured ViT trained on the finding labels) runs and writes
its validation AUCs. Whether it learns is a matter of size and steps: the tiny ViT barely moves
in a test's few steps, the demo size is measured in the README."""

import json

import numpy as np

from configs.pretrain import get_config
from medunifier_jax import supervised_reference
from medunifier_jax.data import findings


def test_supervised_reference_reports_an_auc_per_finding(tmp_path):
  config = get_config("tiny")
  with config.unlocked():
    config.num_steps = 40
    config.batch_size = 16
    config.data.num_val = 64
  lines = []
  aucs = supervised_reference.run(config, str(tmp_path), eval_every=20, log=lines.append)
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
  aucs = supervised_reference.auc_per_finding(labels, logits)
  names = findings.FINDINGS
  assert aucs == {names[0]: 1.0, names[1]: 0.0, names[2]: 0.25}  # the rest: one class only
