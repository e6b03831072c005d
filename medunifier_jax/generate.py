r"""Images from reports: the command-line face of `api.Model.generate_images`.

  python -m medunifier_jax.generate --workdir W --prompt "Large right pleural effusion." \
      --num 8 --out W/generated [--prompt "No acute findings." ...] [--guidance 1.0 --steps 12
      --temperature 1.0 --seed 0 --prior DIR]

Loads the MedUnifier of W with the prior trained on its codes (`W/prior`, or `--prior DIR`;
configs/prior.py says how to train one), draws `--num` images per prompt and writes
`OUT/prompt{p}_sample{s}.png` for each and `OUT/grid.png` (one row per prompt), plus
`OUT/prompts.json` naming the prompt of each row and the decoding settings. Relative paths are
resolved against the current directory.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

import numpy as np
from absl import app, flags, logging


def _define_flags() -> None:
  """Command-line flags, defined only when this module runs as a program: it is also a
  library (tests import it), and absl flags may be defined only once per process (`demo`
  defines `workdir` too)."""
  global _WORKDIR, _PROMPT, _NUM, _OUT, _STEPS, _GUIDANCE, _TEMPERATURE, _SEED, _PRIOR
  _WORKDIR = flags.DEFINE_string("workdir", None, "The MedUnifier's training workdir.")
  _PROMPT = flags.DEFINE_multi_string("prompt", None, "A report to draw images for; repeat "
                                      "the flag for several.")
  _NUM = flags.DEFINE_integer("num", 4, "Images per prompt.")
  _OUT = flags.DEFINE_string("out", None, "Folder for the PNG files (created).")
  _STEPS = flags.DEFINE_integer("steps", None, "Parallel decoding steps (default: the prior "
                                "config's, 12).")
  _GUIDANCE = flags.DEFINE_float("guidance", None, "Classifier-free guidance weight: logits = "
                                 "cond + g (cond - uncond); 0 = conditional only (default: the "
                                 "prior config's).")
  _TEMPERATURE = flags.DEFINE_float("temperature", None, "Sampling temperature of the codes "
                                    "(default: the prior config's, 1.0).")
  _SEED = flags.DEFINE_integer("seed", 0, "Random seed: the same seed gives the same images.")
  _PRIOR = flags.DEFINE_string("prior", None, "The prior's training workdir (default: "
                               "WORKDIR/prior).")
  flags.mark_flags_as_required(["workdir", "prompt", "out"])


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
    out[y:y + s, x:x + s] = image
  return out


def write_images(images: np.ndarray, prompts: Sequence[str], out_dir: str,
                 settings: dict | None = None) -> list[str]:
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
    json.dump({"prompts": list(prompts), "per_prompt": per_prompt, **(settings or {})}, f,
              indent=2)
  return written


def generate(model, prompts: Sequence[str], out_dir: str, *, num: int = 4, **decoding) -> list[str]:
  """`model.generate_images(prompts, num_per_text=num, **decoding)` written to `out_dir`."""
  images = model.generate_images(list(prompts), num_per_text=num, **decoding)
  settings = {k: v for k, v in decoding.items() if v is not None}
  return write_images(images, prompts, out_dir, settings)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}; pass each prompt with --prompt")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from medunifier_jax import api, paths

  if _NUM.value < 1:
    raise app.UsageError("--num must be at least 1")
  try:
    model = api.load(paths.resolve(_WORKDIR.value),
                     prior=paths.resolve(_PRIOR.value) if _PRIOR.value else None)
    written = generate(model, _PROMPT.value, _OUT.value, num=_NUM.value, steps=_STEPS.value,
                       guidance=_GUIDANCE.value, temperature=_TEMPERATURE.value,
                       seed=_SEED.value)
  except (FileNotFoundError, ValueError) as e:
    # A workdir without a checkpoint or without a prior: one message, no traceback.
    raise SystemExit(f"generate: {e}") from None
  print(f"wrote {len(written) - 1} images and {written[-1]}", file=sys.stderr)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
