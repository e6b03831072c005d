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

This module only parses the flags and prints; the work is `medunifier_jax.prediction`'s.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

from medunifier_jax import compilation_cache, host_memory, prediction

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory with a checkpoint.")
_IMAGES = flags.DEFINE_multi_string(
  "images", None, "Image files (DICOM, PNG, JPEG): --images a.png b.dcm ..."
)
_TEXTS = flags.DEFINE_multi_string(
  "texts",
  None,
  "Texts to score against every image (similarity and matching "
  'probability): --texts "no acute findings" "pleural effusion" ...',
)
_JSON = flags.DEFINE_string(
  "json", None, "Also write the predictions as JSON to this file; without it nothing is written."
)
_METHOD = flags.DEFINE_enum(
  "method", "beam", ["beam", "greedy", "nucleus"], "Report decoding method."
)
_NUM_BEAMS = flags.DEFINE_integer("num_beams", 3, "Beams of beam search.")
_MAX_LENGTH = flags.DEFINE_integer(
  "max_length", None, "Longest report in tokens; default: the model's text length, at most 95."
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Images per model call.")
flags.mark_flags_as_required(["workdir", "images"])


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing after `--images a b` became `--images=a --images=b` (list flags)."""
  return app.parse_flags_with_usage(prediction.expand_list_flags(argv))


def _workdir(path: str) -> str:
  """An absolute path; URLs (gs://...) pass unchanged."""
  return path if "://" in path else os.path.abspath(path)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(
      f"unexpected arguments: {argv[1:]}; put several images or texts after one --images / --texts"
    )
  if not flags.FLAGS["verbosity"].present:
    # Checkpoint-restore INFO lines would bury the table; --verbosity=0 brings them back.
    logging.set_verbosity(logging.WARNING)
  compilation_cache.enable()
  decoding = {"method": _METHOD.value}
  if _METHOD.value == "beam":
    decoding["num_beams"] = _NUM_BEAMS.value
  if _MAX_LENGTH.value is not None:
    decoding["max_length"] = _MAX_LENGTH.value
  json_path = os.path.abspath(_JSON.value) if _JSON.value else None
  try:
    # Cheap checks first: a typo in a path should not wait for the model to load.
    images = prediction.resolve_images(_IMAGES.value)
    workdir = _workdir(_WORKDIR.value)
    from medunifier_jax import api

    model = api.load(workdir)
    if model.tokenizer is None:
      raise ValueError(
        f"{workdir} holds no tokenizer (tokenizer/ or config.data.tokenizer_dir);"
        " reports cannot be generated"
      )
    predictions = prediction.predict(
      model, images, _TEXTS.value or (), batch_size=_BATCH_SIZE.value, **decoding
    )
  except (FileNotFoundError, ValueError) as e:
    # Missing files, a workdir without a checkpoint, unreadable images: one line, no traceback.
    raise SystemExit(f"predict: {e}") from None
  print(prediction.format_table(predictions))
  if json_path:
    content = {
      "workdir": workdir,
      "texts": list(_TEXTS.value or ()),
      "decoding": decoding,
      "predictions": predictions,
    }
    with open(json_path, "w", encoding="utf-8") as f:
      json.dump(content, f, indent=2)
    print(f"wrote {json_path}", file=sys.stderr)


if __name__ == "__main__":
  host_memory.reexec_with_huge_pages()
  app.run(main, flags_parser=_parse_flags)
