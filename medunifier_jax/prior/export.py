"""Generated images written to disk: what `python -m medunifier_jax.generate` runs.

`generate` draws images for each prompt (`api.Model.generate_images`) and `write_images` writes
them as `prompt{p}_sample{s}.png`, one `grid.png` (a row per prompt) and `prompts.json` (the
prompt of each row and the decoding settings).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np


def to_uint8(images: np.ndarray) -> np.ndarray:
  """(..., S, S, 3) floats in [0, 1] -> uint8."""
  return np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


def grid_image(images: np.ndarray, rows: int, pad: int = 2) -> np.ndarray:
  """(rows * cols, S, S, 3) uint8 -> one (rows (S + pad) + pad, cols (S + pad) + pad, 3) image,
  row-major, on a white background."""
  n, s = images.shape[0], images.shape[1]
  cols = -(-n // rows)
  out = np.full((rows * (s + pad) + pad, cols * (s + pad) + pad, 3), 255, np.uint8)
  for i, image in enumerate(images):
    r, c = divmod(i, cols)
    y, x = pad + r * (s + pad), pad + c * (s + pad)
    out[y : y + s, x : x + s] = image
  return out


def write_images(
  images: np.ndarray, prompts: Sequence[str], out_dir: str, settings: dict | None = None
) -> list[str]:
  """Writes `images` ((len(prompts) * n, S, S, 3) floats in [0, 1], the prompts' samples in
  order) as `prompt{p}_sample{s}.png`, `grid.png` and `prompts.json`; returns the PNG paths."""
  from PIL import Image

  from medunifier_jax import paths

  out_dir = paths.resolve(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  pixels = to_uint8(images)
  per_prompt = len(pixels) // len(prompts)
  written = []
  for i, image in enumerate(pixels):
    p, s = divmod(i, per_prompt)
    path = os.path.join(out_dir, f"prompt{p}_sample{s}.png")
    Image.fromarray(image).save(path)
    written.append(path)
  grid = os.path.join(out_dir, "grid.png")
  Image.fromarray(grid_image(pixels, len(prompts))).save(grid)
  written.append(grid)
  with open(os.path.join(out_dir, "prompts.json"), "w", encoding="utf-8") as f:
    json.dump({"prompts": list(prompts), "per_prompt": per_prompt, **(settings or {})}, f, indent=2)
  return written


def generate(model, prompts: Sequence[str], out_dir: str, *, num: int = 4, **decoding) -> list[str]:
  """`model.generate_images(prompts, num_per_text=num, **decoding)` written to `out_dir`."""
  images = model.generate_images(list(prompts), num_per_text=num, **decoding)
  settings = {k: v for k, v in decoding.items() if v is not None}
  return write_images(images, prompts, out_dir, settings)
