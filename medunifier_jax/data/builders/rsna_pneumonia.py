"""RSNA Pneumonia Detection Challenge (Kaggle stage 2): binary pneumonia, 70/15/15 by patient.

`stage_2_train_labels.csv` has one row per box (or one row with empty box and Target 0);
rows are grouped by patient (one image per patient), the label is Target, and the split is
GLoRIA's: scikit-learn `train_test_split` of the patients sorted by id, 30% held out with
`random_state=0`, the held-out half test, half validation (`random_state=0` again). With the
published label file this reproduces the GLoRIA / MGCA split exactly.

Manual directory (the Kaggle archive unpacked):

  stage_2_train_labels.csv       patientId, x, y, width, height, Target
  stage_2_train_images/<patientId>.dcm
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sklearn.model_selection import train_test_split

from medunifier_jax.data import findings as findings_lib
from medunifier_jax.data.builders import common

LABELS_CSV = "stage_2_train_labels.csv"
IMAGE_DIR = "stage_2_train_images"
COLUMNS = ("patientId", "x", "y", "width", "height", "Target")
HELD_OUT = 0.15  # per held-out split

INSTRUCTIONS = """\
Download the RSNA Pneumonia Detection Challenge data
(https://www.kaggle.com/c/rsna-pneumonia-detection-challenge/data) and unzip it, so that
stage_2_train_labels.csv and stage_2_train_images/ lie in the folder passed as --manual-dir.
"""


def patient_labels(rows: Sequence[dict[str, str]]) -> dict[str, int]:
  """patientId -> 1 if any of its rows has Target 1 (a pneumonia box), else 0; sorted by id."""
  return common.labels_by_key(rows, "patientId", lambda row: int(row["Target"]))


def split_patients(patients: Sequence[str], seed: int = 0) -> dict[str, str]:
  """patientId -> "train" / "validation" / "test" (70/15/15, GLoRIA's two-step split)."""
  patients = sorted(patients)
  train, held_out = train_test_split(patients, test_size=2 * HELD_OUT, random_state=seed)
  test, validation = train_test_split(held_out, test_size=0.5, random_state=seed)
  return common.split_of(train, validation, test)


class RsnaPneumonia(common.RadiographBuilder):
  """RSNA Pneumonia: DICOM images, label Normal (Target 0) / Pneumonia (Target 1).

  Target 0 covers both "Normal" and "No Lung Opacity / Not Normal"; the class is named Normal
  after the zero-shot prompts (Pneumonia vs Normal).
  """

  name = "rsna_pneumonia"
  HOMEPAGE = "https://www.kaggle.com/c/rsna-pneumonia-detection-challenge"
  DESCRIPTION = "RSNA Pneumonia stage 2 training images, binary, split 70/15/15 by patient."
  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS
  LAYOUT = (
    ((LABELS_CSV,), ",".join(COLUMNS)),
    ((f"{IMAGE_DIR}/",), "the DICOM images, <patientId>.dcm"),
  )
  CLASS_NAMES = tuple(findings_lib.CLASSES_PNEUMONIA)

  def _features(self):
    return common.class_label_features(self.CLASS_NAMES)

  def _split_generators(self, dl_manager):
    root = self._manual(dl_manager)
    labels = patient_labels(common.read_csv(root / LABELS_CSV, COLUMNS, self._bad_row))
    split = split_patients(list(labels), seed=self.builder_config.seed)
    return self._keyed_splits(root, "patientId", labels, split)

  def _generate_examples(self, root: Path, split: str, items):
    def make(item):
      patient, label = item
      pixels = common.load_dicom(root / IMAGE_DIR / f"{patient}.dcm")
      return patient, {"image": self._image(pixels), "id": patient, "label": label, "report": ""}

    return self._examples(split, items, make)
