"""Observability: tqdm progress, TensorBoard event files and `WORKDIR/metrics.jsonl`.

Only process 0 writes. Step metrics stay on device until a logging step; `MetricWindow`
collects them and fetches the whole window in one transfer.
"""

import json
import math
import os
import time
from typing import Any

import jax
import numpy as np
import tqdm
from tensorboardX import SummaryWriter

# Shown in the progress bar, in this order, when present.
PROGRESS_KEYS = ("loss", "loss_itc", "loss_itm", "loss_itg", "loss_tig")


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite; the message names the first bad step."""


class MetricWindow:
  """Per-step metric dicts (device arrays) since the last logging step."""

  def __init__(self):
    self._steps: list[int] = []
    self._metrics: list[dict[str, jax.Array]] = []

  def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
    self._steps.append(step)
    self._metrics.append(metrics)

  def __len__(self) -> int:
    return len(self._steps)

  def fetch(self) -> tuple[list[int], list[dict[str, float]]]:
    """Host copies of every step's scalars; empties the window."""
    steps, host = self._steps, jax.device_get(self._metrics)
    self._steps, self._metrics = [], []
    return steps, [{k: float(np.asarray(v)) for k, v in m.items()} for m in host]


def first_non_finite(steps: list[int], metrics: list[dict[str, float]], key: str = "loss"):
  """The first step whose `key` is NaN/inf, or None."""
  for step, m in zip(steps, metrics):
    if key in m and not math.isfinite(m[key]):
      return step
  return None


def mean_metrics(metrics: list[dict[str, float]]) -> dict[str, float]:
  """Per-key mean over the window (the learning rate of the last step, not the mean)."""
  out = {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]}
  if "learning_rate" in metrics[-1]:
    out["learning_rate"] = metrics[-1]["learning_rate"]
  return out


class MetricLogger:
  """Writes logged steps to the progress bar, TensorBoard and `metrics.jsonl`.

  Args:
    workdir: run directory; TensorBoard files go to `WORKDIR/tensorboard`.
    total_steps: the run's final step (for the bar and the ETA).
    initial_step: the step the run (re)starts from.
    global_batch: examples per step, for examples/s.
  """

  def __init__(
    self,
    workdir: str,
    total_steps: int,
    initial_step: int,
    global_batch: int,
    *,
    enabled: bool | None = None,
    show_progress: bool = True,
  ):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.global_batch = global_batch
    self._last_time = time.perf_counter()
    self._last_step = initial_step
    self._bar = None
    self._writer = None
    self._jsonl = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")  # noqa: SIM115
    if show_progress:
      self._bar = tqdm.tqdm(
        total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True, desc="train"
      )

  def reset_clock(self, step: int) -> None:
    """Restarts the throughput clock (after compilation, evaluation or a checkpoint wait)."""
    self._last_time, self._last_step = time.perf_counter(), step

  def log(self, step: int, metrics: dict[str, float], prefix: str = "train") -> dict[str, Any]:
    """Logs the metrics of `step` (already host floats); adds `examples_per_s`."""
    now = time.perf_counter()
    record: dict[str, Any] = {"step": int(step), **metrics}
    if prefix == "train" and step > self._last_step:
      dt = now - self._last_time
      record["steps_per_s"] = (step - self._last_step) / dt
      record["examples_per_s"] = record["steps_per_s"] * self.global_batch
      self._last_time, self._last_step = now, step
    if not self.enabled:
      return record
    if prefix != "train":
      record = {"step": int(step), **{f"{prefix}/{k}": v for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for k, v in record.items():
      if k != "step" and isinstance(v, int | float):
        name = k if "/" in k else f"{prefix}/{k}"
        self._writer.add_scalar(name, v, step)
    self._writer.flush()
    if self._bar is not None and prefix == "train":
      shown = {k: f"{record[k]:.4f}" for k in PROGRESS_KEYS if k in record}
      if "examples_per_s" in record:
        shown["ex/s"] = f"{record['examples_per_s']:.1f}"
      self._bar.set_postfix(shown, refresh=False)
      self._bar.update(step - self._bar.n)
    return record

  def message(self, text: str) -> None:
    if self.enabled:
      (self._bar.write if self._bar is not None else print)(text)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._writer is not None:
      self._writer.close()
    if self._jsonl is not None:
      self._jsonl.close()
