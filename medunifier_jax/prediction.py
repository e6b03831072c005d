"""Reports and image-text scores for image files, as a library: what
`python -m medunifier_jax.predict` runs.

`predict` gives, for each image, the generated report and, for each text, the similarity and
the matching probability; `format_table` prints them; `resolve_images` checks the paths first;
`expand_list_flags` lets the program's list flags take several values after one flag.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

LIST_FLAGS = ("images", "texts")  # flags that take the values following them


def expand_list_flags(argv: Sequence[str], names: Sequence[str] = LIST_FLAGS) -> list[str]:
  """`--images a b --texts x y` -> `--images=a --images=b --texts=x --texts=y`.

  absl flags take one value each; this lets the list flags take every following argument up to
  the next one that starts with `--`. `--images=a` and repeated flags pass through.
  """
  out, current = [argv[0]], None
  for arg in argv[1:]:
    if arg.startswith("--"):
      name, has_value, _ = arg[2:].partition("=")
      current = name if name in names else None
      if current is None or has_value:
        out.append(arg)
    elif current is not None:
      out.append(f"--{current}={arg}")
    else:
      out.append(arg)
  return out


def resolve_images(paths: Sequence[str]) -> list[str]:
  """Absolute paths of the image files; FileNotFoundError naming every missing one."""
  resolved = [os.path.abspath(p) for p in paths]
  missing = [p for p in resolved if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(
      f"{len(missing)} of {len(resolved)} image files do not exist: {', '.join(missing)}; "
      "check the paths passed to --images"
    )
  return resolved


def _softmax_match(logits: np.ndarray) -> np.ndarray:
  """(..., 2) ITM logits -> (...,) float32 probability of column 1, "match" (the ITM loss's
  label 1); computed in float64."""
  from scipy import special

  return special.softmax(np.asarray(logits, np.float64), axis=-1)[..., 1].astype(np.float32)


def predict(
  model: Any,
  images: Sequence[Any],
  texts: Sequence[str] = (),
  *,
  batch_size: int = 8,
  **decoding: Any,
) -> list[dict[str, Any]]:
  """Reports and, per text, similarity and matching probability for each image.

  Args:
    model: an `api.Model` with a tokenizer.
    images: paths (or anything `api.Model.preprocess_images` takes), N of them.
    texts: M texts (cleaned and tokenised as training reports are); may be empty.
    batch_size: images per model call; with more than `batch_size` images, the last batch is
      padded so every call has one shape (one compilation).
    decoding: `generation.DecodingConfig` fields for the reports (method, num_beams, ...).

  Returns:
    N dicts `{"image": path or "images[i]", "report": str, "texts": [{"text", "similarity",
    "match_probability"}] (M entries)}`; similarity is `model.similarity` (cosine, max over
    queries, no temperature) and match_probability softmax(ITM logits)[1].
  """
  if isinstance(texts, str):
    raise TypeError("texts is a list of texts; wrap a single text in a list")
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  images, texts = list(images), list(texts)
  if not images:
    raise ValueError("no images given")
  tokens = model.tokenize(texts) if texts else None
  rows = min(batch_size, len(images))
  results = []
  for start in range(0, len(images), rows):
    chunk = images[start : start + rows]
    n = len(chunk)
    pixels = model.preprocess_images(chunk)
    if n < rows:  # repeat the last image: the same shapes as the full batches
      pixels = np.concatenate([pixels, np.repeat(pixels[-1:], rows - n, axis=0)])
    reports = model.generate_reports(pixels, **decoding)[:n]
    if tokens is not None:
      ids, mask = tokens["input_ids"], tokens["attention_mask"]
      similarity = model.similarity(pixels, ids, mask)[:n]
      match = _softmax_match(model.fns.itm_all_pairs(model.state, pixels, ids, mask))[:n]
    for i in range(n):
      image = chunk[i]
      name = os.fspath(image) if isinstance(image, str | os.PathLike) else f"images[{start + i}]"
      scores = [
        {
          "text": text,
          "similarity": float(similarity[i, j]),
          "match_probability": float(match[i, j]),
        }
        for j, text in enumerate(texts)
      ]
      results.append({"image": name, "report": reports[i], "texts": scores})
  return results


def format_table(predictions: Sequence[dict[str, Any]]) -> str:
  """The predictions as readable text: per image its report, then one line per text."""
  lines = []
  for p in predictions:
    lines += [f"== {p['image']} ==", f"report: {p['report'] or '(empty)'}"]
    if p["texts"]:
      lines.append(f"  {'similarity':>10}  {'P(match)':>8}  text")
      for t in p["texts"]:
        lines.append(f"  {t['similarity']:10.4f}  {t['match_probability']:8.4f}  {t['text']}")
    lines.append("")
  return "\n".join(lines)
