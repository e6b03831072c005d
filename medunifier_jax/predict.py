r"""Reports and image-text scores for image files: the command-line face of `api`.

  python -m medunifier_jax.predict --workdir workdirs/demo --images a.png b.dcm \
      [--texts "no acute findings" "right pleural effusion"] [--json predictions.json]

Loads the workdir's latest checkpoint (`api.load(workdir)`), reads each image as training does
(DICOM, 8- or 16-bit PNG, JPEG; `api.Model.preprocess_images`), and prints for each image the
generated report and, for each text, the similarity (`api.Model.similarity`: cosine of the
projected features, max over queries) and the matching probability (softmax of the ITM logits,
column 1 = match). `--json PATH` writes the same content as JSON:

  {"workdir": str, "texts": [str], "decoding": {...},
   "predictions": [{"image": path, "report": str,
                    "texts": [{"text": str, "similarity": float, "match_probability": float}]}]}

Nothing is written without `--json`. `--images` and `--texts` take several values after one
flag (or the flag repeated); relative paths are resolved against the current directory.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags, logging

LIST_FLAGS = ("images", "texts")  # flags that take the values following them


def _define_flags() -> None:
  """Command-line flags, defined only when this module runs as a program: it is also a
  library (tests import `predict`), and absl flags may be defined only once per process
  (`demo` defines `workdir` too)."""
  global _WORKDIR, _IMAGES, _TEXTS, _JSON, _METHOD, _NUM_BEAMS, _MAX_LENGTH, _BATCH_SIZE
  _WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory with a checkpoint.")
  _IMAGES = flags.DEFINE_multi_string(
      "images", None, "Image files (DICOM, PNG, JPEG): --images a.png b.dcm ...")
  _TEXTS = flags.DEFINE_multi_string(
      "texts", None, "Texts to score against every image (similarity and matching "
      "probability): --texts \"no acute findings\" \"pleural effusion\" ...")
  _JSON = flags.DEFINE_string(
      "json", None, "Also write the predictions as JSON to this file; without it nothing is "
      "written.")
  _METHOD = flags.DEFINE_enum("method", "beam", ["beam", "greedy", "nucleus"],
                              "Report decoding method.")
  _NUM_BEAMS = flags.DEFINE_integer("num_beams", 3, "Beams of beam search.")
  _MAX_LENGTH = flags.DEFINE_integer(
      "max_length", None, "Longest report in tokens; default: the model's text length, at "
      "most 95.")
  _BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Images per model call.")
  flags.mark_flags_as_required(["workdir", "images"])


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
        "check the paths passed to --images")
  return resolved


def _softmax_match(logits: np.ndarray) -> np.ndarray:
  """(..., 2) ITM logits -> (...,) probability of column 1, "match" (the ITM loss's label 1)."""
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(axis=-1, keepdims=True)
  e = np.exp(shifted)
  return (e[..., 1] / e.sum(axis=-1)).astype(np.float32)


def itm_all_pairs_fn(m, pixel_values, input_ids, attention_mask):
  """ITM logits (B, M, 2) of every image (B, S, S, 3) with every text (M, T).

  The ViT runs once per image; its tokens are repeated for the B x M pairs, which are scored as
  the row-aligned pairs of `api.Model.itm_logits` (image-major order).
  """
  import jax.numpy as jnp

  b, n_texts = pixel_values.shape[0], input_ids.shape[0]
  tokens = jnp.repeat(m.image_tokens(pixel_values), n_texts, axis=0)
  ids = jnp.tile(input_ids, (b, 1))
  mask = jnp.tile(attention_mask, (b, 1))
  return m.itm_logits(tokens, ids, mask).reshape(b, n_texts, 2)


def predict(
    model: Any, images: Sequence[Any], texts: Sequence[str] = (), *, batch_size: int = 8,
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
      match = _softmax_match(model.run(itm_all_pairs_fn, pixels, ids, mask))[:n]
    for i in range(n):
      image = chunk[i]
      name = os.fspath(image) if isinstance(image, str | os.PathLike) else f"images[{start + i}]"
      scores = [
          {"text": text, "similarity": float(similarity[i, j]),
           "match_probability": float(match[i, j])}
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


def _workdir(path: str) -> str:
  """An absolute path; URLs (gs://...) pass unchanged."""
  return path if "://" in path else os.path.abspath(path)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}; put several images or texts "
                         "after one --images / --texts")
  if not flags.FLAGS["verbosity"].present:
    # Checkpoint-restore INFO lines would bury the table; --verbosity=0 brings them back.
    logging.set_verbosity(logging.WARNING)
  decoding = {"method": _METHOD.value}
  if _METHOD.value == "beam":
    decoding["num_beams"] = _NUM_BEAMS.value
  if _MAX_LENGTH.value is not None:
    decoding["max_length"] = _MAX_LENGTH.value
  json_path = os.path.abspath(_JSON.value) if _JSON.value else None
  try:
    # Cheap checks first: a typo in a path should not wait for the model to load.
    images = resolve_images(_IMAGES.value)
    workdir = _workdir(_WORKDIR.value)
    from medunifier_jax import api

    model = api.load(workdir)
    if model.tokenizer is None:
      raise ValueError(f"{workdir} holds no tokenizer (tokenizer/ or config.data.tokenizer_dir);"
                       " reports cannot be generated")
    predictions = predict(model, images, _TEXTS.value or (), batch_size=_BATCH_SIZE.value,
                          **decoding)
  except (FileNotFoundError, ValueError) as e:
    # Missing files, a workdir without a checkpoint, unreadable images: one line, no traceback.
    raise SystemExit(f"predict: {e}") from None
  print(format_table(predictions))
  if json_path:
    content = {"workdir": workdir, "texts": list(_TEXTS.value or ()), "decoding": decoding,
               "predictions": predictions}
    with open(json_path, "w", encoding="utf-8") as f:
      json.dump(content, f, indent=2)
    print(f"wrote {json_path}", file=sys.stderr)


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=lambda argv: app.parse_flags_with_usage(expand_list_flags(argv)))
