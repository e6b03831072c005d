"""Matplotlib figures for the run report. Each function writes one PNG and returns its path.

Every figure states its data set and example count in the title, so a picture read on its own
still says what it shows.
"""

import json
import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

LOSS_KEYS = ("loss", "loss_itc", "loss_itm", "loss_itg", "loss_tig")


def read_metrics(path: str) -> list[dict]:
  """The rows of a `metrics.jsonl`, in step order (a resumed run may repeat steps: last wins)."""
  rows = {}
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        row = json.loads(line)
        rows[row["step"]] = row
  return [rows[s] for s in sorted(rows)]


def loss_curves(rows: Sequence[dict], out: str, *, title: str) -> str:
  """One panel per objective: the logged loss against the step."""
  keys = [k for k in LOSS_KEYS if any(k in r for r in rows)]
  fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
  for ax, key in zip(axes[0], keys):
    pts = [(r["step"], r[key]) for r in rows if key in r]
    ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2)
    ax.set_title(key)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return _save(fig, out)


def confusion_matrix(
  matrix: np.ndarray, class_names: Sequence[str], out: str, *, title: str
) -> str:
  """Rows: true class; columns: predicted class; cells: counts."""
  matrix = np.asarray(matrix)
  n = len(class_names)
  fig, ax = plt.subplots(figsize=(1.1 * n + 2.5, 1.1 * n + 1.5))
  ax.imshow(matrix, cmap="Blues")
  for i in range(n):
    for j in range(n):
      color = "white" if matrix[i, j] > matrix.max() / 2 else "black"
      ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", color=color, fontsize=9)
  ax.set_xticks(range(n), class_names, rotation=35, ha="right", fontsize=8)
  ax.set_yticks(range(n), class_names, fontsize=8)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  ax.set_title(title, fontsize=10)
  fig.tight_layout()
  return _save(fig, out)


def image_rows(
  rows: Sequence[tuple[str, np.ndarray]],
  out: str,
  *,
  title: str,
  col_titles: Sequence[str] | None = None,
  cmap: str = "gray",
) -> str:
  """A grid: one labelled row per (name, images (N, H, W[, C])) pair; code maps use `cmap`."""
  n_cols = max(len(imgs) for _, imgs in rows)
  height = 1.7 * len(rows)
  fig, axes = plt.subplots(len(rows), n_cols, figsize=(1.6 * n_cols, height), squeeze=False)
  for r, (name, imgs) in enumerate(rows):
    for c in range(n_cols):
      ax = axes[r, c]
      ax.set_xticks([])
      ax.set_yticks([])
      if c < len(imgs):
        img = np.asarray(imgs[c])
        if img.ndim == 3 and img.shape[-1] == 3 and np.allclose(img[..., 0], img[..., 1]):
          img = img[..., 0]  # grayscale stored as 3 channels
        is_codes = np.issubdtype(img.dtype, np.integer)
        ax.imshow(
          img,
          cmap="tab20" if is_codes else cmap,
          vmin=None if is_codes else 0.0,
          vmax=None if is_codes else 1.0,
          interpolation="nearest",
        )
      if c == 0:
        ax.set_ylabel(name, fontsize=8)
      if r == 0 and col_titles is not None and c < len(col_titles):
        ax.set_title(col_titles[c], fontsize=7)
  fig.suptitle(title, fontsize=10)
  # About 0.4 inch kept for the title: a fraction of the height would crowd tall grids.
  fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / height))
  return _save(fig, out)


def code_usage(counts: dict[str, np.ndarray], out: str, *, title: str) -> str:
  """Per level: how often each code was chosen, codes sorted by frequency."""
  fig, axes = plt.subplots(1, len(counts), figsize=(4.2 * len(counts), 2.8), squeeze=False)
  for ax, (level, c) in zip(axes[0], counts.items()):
    c = np.sort(np.asarray(c))[::-1]
    used = int((c > 0).sum())
    ax.bar(np.arange(len(c)), c, width=1.0)
    ax.set_title(f"{level}: {used}/{len(c)} codes used", fontsize=9)
    ax.set_xlabel("code (sorted by frequency)")
    ax.set_ylabel("count")
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return _save(fig, out)


def _save(fig, out: str) -> str:
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out
