"""VQ reconstruction: the evaluation-mode TIG pass over test images (the image and its report in,
the image back out through the two code levels).

  psnr_db                   peak signal-to-noise ratio in dB of each reconstruction against its
                            target image (both in [0, 1]), averaged over images
  usage_top, usage_bottom   share of each level's codebook chosen at least once over the set
  perplexity_top, _bottom   exp(entropy) of each level's code histogram over the set (how many
                            codes are in effective use; at most the codebook size)
  num_images                images scored

With several codes per bottom cell (`vqvae.bottom_depth` R > 1) the bottom figures and code
maps are those of the first codebook, the one a single-code model would have.

Outputs (`WORKDIR/eval/outputs/{entry}_{data set}.npz`, for the report's figures): the first
`num_examples` inputs and reconstructions as 8-bit images, their code maps, and the code counts
of each level over the whole set.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import numpy as np

from medunifier_jax.evaluators import common

LEVELS = ("top", "bottom")


def psnr_db(recon: np.ndarray, target: np.ndarray) -> np.ndarray:
  """(B, S, S, C) images in [0, 1] -> (B,) PSNR in dB. The MSE is floored at 1e-12 so that an
  exact copy scores a large finite value rather than infinity."""
  err = np.asarray(recon, np.float64) - np.asarray(target, np.float64)
  mse = np.mean(err**2, axis=tuple(range(1, err.ndim)))
  return 10.0 * np.log10(1.0 / np.maximum(mse, 1e-12))


def code_usage(counts: np.ndarray) -> tuple[float, float]:
  """(K,) counts of each code -> (share of the K codes used, perplexity = exp(entropy))."""
  counts = np.asarray(counts, np.float64)
  total = counts.sum()
  if total == 0:
    return 0.0, 0.0
  p = counts[counts > 0] / total
  return float((counts > 0).mean()), float(np.exp(-(p * np.log(p)).sum()))


def first_codes(codes: np.ndarray, level: str) -> np.ndarray:
  """A level's codes, (B, h, w) or (B, g, g, R) -> (B, h, w): the first codebook's."""
  codes = np.asarray(codes)
  return codes[..., 0] if level == "bottom" and codes.ndim == 4 else codes


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Images in [0, 1] -> uint8 (a quarter of the float32 size on disk)."""
  return np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


class ReconstructionEvaluator(common.Evaluator):
  """Settings (`config.evals.reconstruction`): datasets, split, num_images (the first of the
  split; 0: all of it), batch_size, num_examples (images kept for the figures, default 6)."""

  task = "reconstruction"

  def evaluate(self, dataset: str, graphdef, state) -> Iterator[tuple[str, float]]:
    cfg = self.cfg
    source = self.source(dataset, cfg.split)
    if int(cfg.num_images) > 0:
      source = common.Subset(source, int(cfg.num_images))
    batches = common.EvalBatches(self.config, self.tokenizer, source, int(cfg.batch_size))
    scores = self._scan(self.fns(graphdef), state, batches, dataset)
    psnrs, counts = scores.pop("psnr"), scores.pop("counts")
    self.outputs[dataset] = dict(scores, **{f"counts_{level}": counts[level] for level in LEVELS})
    yield "psnr_db", float(np.mean(psnrs))
    for level in LEVELS:
      usage, perplexity = code_usage(counts[level])
      yield f"usage_{level}", usage
      yield f"perplexity_{level}", perplexity
    yield "num_images", float(len(psnrs))

  def _scan(self, fns, state, batches, dataset: str) -> dict:
    """Runs the compiled reconstruction over `batches`; keeps real (unpadded) rows only.

    Returns `psnr` (N,), `counts` {level: (K,) int64}, and the first `num_examples` rows as
    `inputs` / `recons` (n, S, S, 3) uint8, `codes_top` (n, g/2, g/2), `codes_bottom` (n, g, g)
    (the first codebook's with several codes per cell).
    """
    from tqdm.auto import tqdm

    size = int(self.config.model.vqvae.codebook_size)
    keep_n = int(self.cfg.get("num_examples", 6))
    psnrs, counts = [], {level: np.zeros(size, np.int64) for level in LEVELS}
    examples: dict[str, list[np.ndarray]] = {
      k: [] for k in ("inputs", "recons", "codes_top", "codes_bottom")
    }
    kept = 0
    for batch in tqdm(batches, desc=f"reconstruction {dataset}", leave=False):
      real = batch["mask"].astype(bool)
      out = jax.device_get(
        fns.reconstruct(state, batch["image"], batch["input_ids"], batch["attention_mask"])
      )
      recon, target = np.asarray(out["recon"])[real], batch["target_image"][real]
      psnrs.append(psnr_db(recon, target))
      for level in LEVELS:
        counts[level] += np.bincount(
          first_codes(out[f"codes_{level}"], level)[real].ravel(), minlength=size
        )
      take = min(keep_n - kept, len(recon))
      if take > 0:
        examples["inputs"].append(to_uint8(target[:take]))
        examples["recons"].append(to_uint8(recon[:take]))
        for level in LEVELS:
          examples[f"codes_{level}"].append(first_codes(out[f"codes_{level}"], level)[real][:take])
        kept += take
    if not psnrs:
      raise ValueError(f"data set {dataset!r} yielded no images to reconstruct")
    return {
      "psnr": np.concatenate(psnrs),
      "counts": counts,
      **{k: np.concatenate(v) for k, v in examples.items() if v},
    }
