"""Prepared TFDS data sets as the project's random-access sources.

`TfdsSource` reads one split of a prepared builder with `tfds.data_source` (ArrayRecord, no
TensorFlow) and returns records in the shared layout (docs/ARCHITECTURE.md, "Batches"):
`{"image": uint8 (S0, S0), "report": str, "id": str, "labels": float32 (F,) (sets with
finding labels), "label": int (classification sets)}` plus the builder's other fields
(text fields as str). Classification sources carry `class_names`. A prepared set whose
`fingerprint.json` does not match the running code (format versions, options, report cleaning
rule) is refused with the command that rebuilds it (`common.StalePreparedError`).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from medunifier_jax.data import findings as findings_lib
from medunifier_jax.data.builders import common

SPLIT_ALIASES = {"val": "validation", "valid": "validation", "validate": "validation"}


def findings_from_chexpert(chexpert: np.ndarray) -> np.ndarray:
  """CheXpert labels (14,) (1, 0, -1, NaN) -> FINDINGS labels float32 (F,); only 1 is positive."""
  names = [
    ours
    for theirs, ours in findings_lib.CHEXPERT_COLUMNS.items()
    if chexpert[common.CHEXPERT_OBSERVATIONS.index(theirs)] == 1
  ]
  return findings_lib.labels_from_names(names)


def prepared_configs(data_dir: str | Path, name: str) -> list[str]:
  """Config names of `name` prepared under `data_dir` (those with a dataset_info.json)."""
  root = Path(data_dir) / name
  if not root.is_dir():
    return []
  return sorted(c.name for c in root.iterdir() if c.is_dir() and any(c.glob("*/dataset_info.json")))


def choose_config(name: str, data_config: Any, builder_cls: type) -> str:
  """The configuration to read: `data_config.builder_config` when set; otherwise the only one
  prepared, or the prepared one of the default class set at `data_config.image_size`."""
  wanted = data_config.get("builder_config", "") or ""
  if wanted:
    return wanted
  prepared = prepared_configs(data_config.data_dir, name)
  if len(prepared) == 1:
    return prepared[0]
  seed = builder_cls.DEFAULT_SEED  # named relative to it: the plain name is the default seed
  default = common.config_name(
    int(data_config.get("image_size", 224)),
    next(iter(builder_cls.CLASS_SETS), ""),
    seed,
    default_seed=seed,
  )
  if default in prepared:
    return default
  if not prepared:
    raise FileNotFoundError(
      f"data set {name!r} is not prepared under {data_config.data_dir!r}; run "
      f"`python -m medunifier_jax.data.prepare {name} --manual-dir DIR "
      f"--data-dir {data_config.data_dir}` (docs/DATASETS.md)"
    )
  raise ValueError(
    f"several configurations of {name!r} are prepared under {data_config.data_dir!r}: "
    f"{prepared}; choose one with config.data.builder_config"
  )


class TfdsSource:
  """One split of a prepared builder; picklable (grain workers reopen the files lazily).

  Args:
    builder_cls: the builder class (e.g. `MimicCxr`).
    config: its configuration name (e.g. "224px").
    split: "train", "validation" (or "val"), "test".
    data_dir: the --data-dir given to prepare.
  """

  def __init__(self, builder_cls: type, config: str, split: str, data_dir: str | Path):
    self.name = builder_cls.name
    self.config = config
    self.split = SPLIT_ALIASES.get(split, split)
    self.data_dir = str(data_dir)
    builder = builder_cls(config=config, data_dir=self.data_dir)
    if not builder.is_prepared():
      raise FileNotFoundError(
        f"{self.name}/{config} is not prepared under {self.data_dir}; run `python -m "
        f"medunifier_jax.data.prepare {self.name} --manual-dir DIR --data-dir {self.data_dir}`"
      )
    # A set prepared by other code or settings (say, another report cleaning rule) would feed
    # training records that a fresh build would not give: refused, with the rebuild command.
    builder.check_fingerprint(self.data_dir)
    if self.split not in builder.info.splits:
      raise ValueError(
        f"{self.name}/{config} has no split {split!r}; splits: {sorted(builder.info.splits)}"
      )
    self.class_names = tuple(builder.class_names)
    self._data = None

  def _source(self):
    if self._data is None:
      # Images stay PNG bytes here and are decoded below: the same PIL decode TFDS would do,
      # without its per-process OpenCV warning, and `reports` skips decoding altogether.
      self._data = tfds.data_source(
        f"{self.name}/{self.config}",
        split=self.split,
        data_dir=self.data_dir,
        download=False,
        decoders={"image": tfds.decode.SkipDecoding()},
      )
    return self._data

  def __getstate__(self):
    return {**self.__dict__, "_data": None}

  def __len__(self) -> int:
    return len(self._source())

  def __getitem__(self, index: int) -> dict[str, Any]:
    raw = self._source()[int(index)]
    record = {
      k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in raw.items() if k != "image"
    }
    with Image.open(io.BytesIO(raw["image"])) as png:
      record["image"] = np.asarray(png, np.uint8)
    record.setdefault("report", "")
    if "chexpert" in raw:
      record["labels"] = findings_from_chexpert(np.asarray(raw["chexpert"]))
    elif "mesh" in record:
      record["labels"] = _openi_labels(record["mesh"])
    if "label" in raw:
      record["label"] = int(raw["label"])
    return record

  @property
  def reports(self) -> list[str]:
    """Every record's report, in order, without decoding any image (for tokenizer training)."""
    data = self._source()
    return [data[i].get("report", b"").decode("utf-8") for i in range(len(data))]

  def __repr__(self) -> str:
    return f"TfdsSource({self.name}/{self.config}, split={self.split!r}, {self.data_dir})"


def _openi_labels(mesh: str) -> np.ndarray:
  from medunifier_jax.data import openi

  return openi.labels_from_mesh(json.loads(mesh))
