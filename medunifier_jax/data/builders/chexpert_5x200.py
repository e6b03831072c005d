"""CheXpert 5x200: per class, N frontal images positive for it and negative on the other four.

The construction (GLoRIA / MGCA, here seeded and saved as `manifest.csv`): from the frontal rows
of CheXpert's `train.csv`, the candidates of a class are the rows whose label is 1.0 for that
class and 0.0 or blank (not mentioned) for each of the other four classes; uncertain (-1.0) rows
are never candidates. Sampling uses only the label file, so the manifest is the same for
everyone with the same file, seed and class set, whatever images are on disk. `held_out.csv`
lists the drawn studies and patients (`subject_id, study_id, path`; the patient and study are
CheXpert's folders, `patient00001` and `patient00001/study1`), for keeping them out of any
training set built from CheXpert.

Manual directory (the CheXpert zip unpacked; the small or the full-size release):

  CheXpert-v1.0-small/train.csv       Path, Sex, Age, Frontal/Lateral, AP/PA, 14 observations
  CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg   (Path is relative to here)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from medunifier_jax.data import findings as findings_lib
from medunifier_jax.data.builders import common

TRAIN_CSV_PATTERNS = ("CheXpert-v1.0*/train.csv",)
HELD_OUT_FILE = "held_out.csv"
HELD_OUT_COLUMNS = ("subject_id", "study_id", "path")
COLUMNS = ("Path", "Frontal/Lateral", *common.CHEXPERT_OBSERVATIONS)

# GLoRIA's five classes, and the paper's code's choice (Pneumonia in place of Consolidation).
CLASS_SETS = {
  "gloria": tuple(findings_lib.CLASSES_5X200),
  "pneumonia": tuple(
    "Pneumonia" if c == "Consolidation" else c for c in findings_lib.CLASSES_5X200
  ),
}

INSTRUCTIONS = """\
Download CheXpert (https://stanfordmlgroup.github.io/competitions/chexpert/), the small or the
full-size release, and unzip it so that CheXpert-v1.0-small/train.csv (or CheXpert-v1.0/train.csv)
lies in the folder passed as --manual-dir.
"""


def candidates(labels: np.ndarray, c: int) -> np.ndarray:
  """Row indices positive (1) for class c and negative (0 or NaN) on every other class.

  Args:
    labels: float32 (R, C) values 1, 0, -1 or NaN, one column per class.
    c: the class column.
  """
  others = np.delete(labels, c, axis=1)
  negative = np.all((others == 0) | np.isnan(others), axis=1)
  return np.flatnonzero((labels[:, c] == 1) & negative)


def draw_5x200(
  keys: Sequence[str], labels: np.ndarray, class_names: Sequence[str], *, seed: int, per_class: int
) -> list[tuple[str, int]]:
  """Seeded draw of `per_class` rows per class; returns (key, class index), class by class.

  Args:
    keys: R row identifiers, in the label file's order (sorted here, so file order is moot).
    labels: float32 (R, C), the rows' labels for `class_names` (1, 0, -1 or NaN).
    class_names: the C classes.
    seed: numpy Generator seed.
    per_class: images per class.

  Raises:
    ValueError: a class has fewer than `per_class` candidates (names the class and the count).
  """
  order = np.argsort(np.asarray(keys, dtype=object), kind="stable")
  keys = [keys[i] for i in order]
  labels = np.asarray(labels, np.float32)[order]
  rng = np.random.default_rng(seed)
  drawn = []
  for c, name in enumerate(class_names):
    pool = candidates(labels, c)
    if len(pool) < per_class:
      raise ValueError(
        f"only {len(pool)} candidate images for {name!r} (positive for it, negative on "
        f"{[n for n in class_names if n != name]}); need {per_class}. Use a smaller per_class."
      )
    picked = np.sort(rng.choice(pool, size=per_class, replace=False))
    drawn.extend((keys[i], c) for i in picked)
  return drawn


def held_out_rows(manifest: Sequence[dict]) -> list[dict[str, str]]:
  """The held-out list of a manifest: patient, study and image of each drawn row.

  CheXpert names no ids in its label file; the image path's folders are the patient
  (`patient00001`) and, within it, the study (`study1`), so the study id keeps both.
  """
  rows = []
  for row in manifest:
    parts = Path(row["Path"]).parts
    patient, study = (parts[-3], parts[-2]) if len(parts) >= 3 else ("", "")
    rows.append({"subject_id": patient, "study_id": f"{patient}/{study}", "path": row["Path"]})
  return rows


def label_matrix(rows: Sequence[dict[str, str]], class_names: Sequence[str]) -> np.ndarray:
  """float32 (R, C) of the rows' labels for the classes; blank -> NaN."""
  columns = [np.array([r.get(c, "") for r in rows], dtype=object) for c in class_names]
  values = [np.where(col == "", "nan", col).astype(np.float32) for col in columns]
  return np.stack(values, axis=1) if values else np.zeros((len(rows), 0), np.float32)


def chexpert_manifest(
  rows: Sequence[dict[str, str]], class_names: Sequence[str], *, seed: int, per_class: int
) -> list[dict]:
  """The 5x200 manifest of CheXpert `train.csv` rows: dicts with Path, label, class_name."""
  frontal = [r for r in rows if r["Frontal/Lateral"] == "Frontal"]
  drawn = draw_5x200(
    [r["Path"] for r in frontal],
    label_matrix(frontal, class_names),
    class_names,
    seed=seed,
    per_class=per_class,
  )
  by_path = {r["Path"]: r for r in frontal}
  return [{**by_path[p], "label": c, "class_name": class_names[c]} for p, c in drawn]


class Chexpert5x200(common.RadiographBuilder):
  """CheXpert 5x200 zero-shot classification set (one split, `test`)."""

  name = "chexpert_5x200"
  CLASS_SETS = CLASS_SETS
  HOMEPAGE = "https://stanfordmlgroup.github.io/competitions/chexpert/"
  DESCRIPTION = "CheXpert 5x200: seeded, 200 frontal images per class, single-positive."
  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS
  # 2: held_out.csv, the drawn patients and studies.
  FORMAT_VERSION = 2
  LAYOUT = (
    (TRAIN_CSV_PATTERNS, "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,..."),
    (("CheXpert-v1.0*/train/",), "the JPEG images, patientNNNNN/studyN/viewN_*.jpg"),
  )

  def _features(self):
    return {
      "label": tfds.features.ClassLabel(names=list(self.class_names)),
      "chexpert": tfds.features.Tensor(
        shape=(len(common.CHEXPERT_OBSERVATIONS),), dtype=np.float32
      ),
      "report": tfds.features.Text(),
    }

  def _split_generators(self, dl_manager):
    root = self._manual(dl_manager)
    train_csv = common.find_one(root, TRAIN_CSV_PATTERNS, "CheXpert train.csv")
    rows = common.read_csv(train_csv, COLUMNS, self._bad_row)
    cfg = self.builder_config
    manifest = chexpert_manifest(rows, self.class_names, seed=cfg.seed, per_class=cfg.per_class)
    self._write_manifest(("Path", "label", "class_name"), manifest)
    held = held_out_rows(manifest)
    common.write_csv(Path(self.data_dir) / HELD_OUT_FILE, HELD_OUT_COLUMNS, held)
    self._note(
      f"held out: {len({r['study_id'] for r in held})} studies of "
      f"{len({r['subject_id'] for r in held})} patients ({HELD_OUT_FILE})"
    )
    return {"test": self._generate_examples(root, manifest)}

  def _generate_examples(self, root: Path, manifest: list[dict]):
    def make(row):
      pixels = self._load_image(root / row["Path"])
      return row["Path"], {
        "image": self._image(pixels),
        "id": row["Path"],
        "label": row["label"],
        "chexpert": common.chexpert_vector(row),
        "report": "",  # CheXpert's reports are not public
      }

    return self._examples("test", manifest, make)
