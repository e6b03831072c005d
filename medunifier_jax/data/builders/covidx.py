"""COVIDx: the published split text files (patient id, filename, class, source).

Two label conventions exist: COVIDx CXR-2 and later releases label COVID-19 `positive` /
`negative` (class set `binary`); the earlier releases (COVIDx v5-v9, as used by MGCA) label
`normal` / `pneumonia` / `COVID-19` (class set `three_class`, the default). Each line is
`patientid filename class source`; filenames may contain spaces, so the first field is the
patient, the last two are class and source, and the rest is the file name.

Manual directory (the archive unpacked):

  train.txt, val.txt (CXR-3 and later), test.txt      or   train_COVIDx9A.txt, test_COVIDx9A.txt
  train/<filename>, val/<filename>, test/<filename>

Where a release publishes no validation split, 10% of the train patients (by a stable hash of
seed and patient id, so a patient's images stay together) form it; `manifest.csv` lists all.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import tensorflow_datasets as tfds

from medunifier_jax.data import findings as findings_lib
from medunifier_jax.data.builders import common

CLASS_SETS = {
  "three_class": tuple(findings_lib.CLASSES_COVIDX),  # Normal, Pneumonia, COVID-19
  "binary": ("Negative", "Positive"),  # COVID-19 negative / positive
}
SPLIT_FILES = {
  "train": ("train.txt", "train_COVIDx*.txt"),
  "validation": ("val.txt", "val_COVIDx*.txt"),
  "test": ("test.txt", "test_COVIDx*.txt"),
}
IMAGE_DIRS = {"train": "train", "validation": "val", "test": "test"}
LINE_FIELDS = ("patientid", "filename", "class", "source")
VALIDATION_PERCENT = 10  # of the train patients, where no validation split is published

INSTRUCTIONS = """\
Download COVIDx (https://github.com/lindawangg/COVID-Net, docs/COVIDx.md; the CXR releases are
on Kaggle as andyczhao/covidx-cxr2) and unpack it so that the split files (train.txt, test.txt,
and val.txt where published) and the image folders train/, test/ (val/) lie in --manual-dir.
"""


def parse_split_file(path: Path) -> list[dict[str, str]]:
  """Lines of a split file as dicts with LINE_FIELDS; LayoutError names a malformed line."""
  rows = []
  for n, line in enumerate(common.read_text(path).splitlines(), 1):
    fields = line.split()
    if not fields:
      continue
    if len(fields) < 4:
      raise common.LayoutError(
        f"{path}:{n}: unknown layout, expected space-separated fields {list(LINE_FIELDS)}, "
        f"found {line!r}; fix or delete the line, or re-download the file"
      )
    rows.append(dict(zip(LINE_FIELDS, (fields[0], " ".join(fields[1:-2]), *fields[-2:]))))
  return rows


def held_out(patient_id: str, seed: int = 0) -> bool:
  """Whether a train patient goes to validation (10%, stable hash of seed and patient id)."""
  digest = hashlib.sha256(f"{seed}:{patient_id}".encode()).hexdigest()
  return int(digest, 16) % 100 < VALIDATION_PERCENT


class Covidx(common.RadiographBuilder):
  """COVIDx chest radiographs with their published train / (val) / test split."""

  name = "covidx"
  CLASS_SETS = CLASS_SETS
  HOMEPAGE = "https://github.com/lindawangg/COVID-Net"
  DESCRIPTION = "COVIDx chest radiographs, published splits."
  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS
  LAYOUT = (
    (SPLIT_FILES["train"], "patientid filename class source, one image per line"),
    (SPLIT_FILES["test"], "the same for the test split"),
    (("train/",), "the train images"),
    (("test/",), "the test images (and val/ with the validation images, where published)"),
  )

  def _features(self):
    return {
      "label": tfds.features.ClassLabel(names=list(self.class_names)),
      "patient_id": tfds.features.Text(),
      "source": tfds.features.Text(),
      "report": tfds.features.Text(),
    }

  def _class_index(self, path: Path, label: str) -> int:
    lookup = {name.lower(): i for i, name in enumerate(self.class_names)}
    if label.lower() not in lookup:
      other = next(s for s in CLASS_SETS if s != self.builder_config.class_set)
      raise common.LayoutError(
        f"{path}: class {label!r} is not in class set {self.builder_config.class_set!r} "
        f"{list(self.class_names)}; this release may need --class-set {other}"
      )
    return lookup[label.lower()]

  def _split_generators(self, dl_manager):
    root = self._manual(dl_manager)
    rows_of: dict[str, list[dict]] = {}
    for split, patterns in SPLIT_FILES.items():
      hits = [p for pattern in patterns for p in sorted(root.glob(pattern))]
      if not hits:
        if split == "validation":
          continue  # carved from train below
        raise common.LayoutError(
          f"COVIDx {split} split: no file matching {list(patterns)} in {root}"
        )
      rows = parse_split_file(hits[0])
      for row in rows:
        row["label"] = self._class_index(hits[0], row["class"])
        row["image_dir"] = IMAGE_DIRS[split]
      rows_of[split] = rows
    if "validation" not in rows_of:
      # Releases without val.txt: hold out the train patients that `held_out` picks.
      seed = self.builder_config.seed
      train = rows_of["train"]
      rows_of["validation"] = [r for r in train if held_out(r["patientid"], seed)]
      rows_of["train"] = [r for r in train if not held_out(r["patientid"], seed)]
    manifest = [{**r, "split": split} for split, rows in rows_of.items() for r in rows]
    self._write_manifest(("patientid", "filename", "class", "source", "split"), manifest)
    return {
      split: self._generate_examples(root, split, rows) for split, rows in rows_of.items() if rows
    }

  def _generate_examples(self, root: Path, split: str, rows):
    def make(row):
      pixels = self._load_image(root / row["image_dir"] / row["filename"])
      return row["filename"], {
        "image": self._image(pixels),
        "id": row["filename"],
        "label": row["label"],
        "patient_id": row["patientid"],
        "source": row["source"],
        "report": "",
      }

    return self._examples(split, rows, make)
