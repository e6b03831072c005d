"""SIIM-ACR Pneumothorax Segmentation: binary pneumothorax from the RLE column, split 81/9/10.

`train-rle.csv` has one row per mask; "-1" in EncodedPixels means no pneumothorax. An image is
positive when any of its rows has a mask. Split as in the paper's code: 10% test, then 10% of
the rest validation, both stratified by the label, scikit-learn `train_test_split` with the
seed over image ids in sorted order. The seed defaults to 5, the paper's code's choice
(`--seed` picks another; the configuration is then named `..._seedS`).

Manual directory (the Kaggle "siim-acr-pneumothorax" archive unpacked):

  train-rle.csv                  ImageId, EncodedPixels   (note the space after the comma)
  dicom-images-train/<StudyInstanceUID>/<SeriesInstanceUID>/<ImageId>.dcm
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sklearn.model_selection import train_test_split

from medunifier_jax.data import findings as findings_lib
from medunifier_jax.data.builders import common

LABELS_CSV = "train-rle.csv"
IMAGE_DIR = "dicom-images-train"
COLUMNS = ("ImageId", "EncodedPixels")
TEST_FRACTION = 0.1
VALIDATION_FRACTION = 0.1  # of what is left after the test split
SPLIT_SEED = 5  # the paper's code splits with random_state=5

INSTRUCTIONS = """\
Download the SIIM-ACR Pneumothorax Segmentation training data (train-rle.csv and the
dicom-images-train folder; https://www.kaggle.com/c/siim-acr-pneumothorax-segmentation) into
the folder passed as --manual-dir.
"""


def image_labels(rows: Sequence[dict[str, str]]) -> dict[str, int]:
  """ImageId -> 1 if any of its rows has an RLE mask (not "-1"), else 0; sorted by id."""
  return common.labels_by_key(
    rows, "ImageId", lambda row: int(row["EncodedPixels"].strip() != "-1")
  )


def split_images(labels: dict[str, int], seed: int = SPLIT_SEED) -> dict[str, str]:
  """ImageId -> "train" / "validation" / "test" (81/9/10, stratified by label)."""
  ids = sorted(labels)
  y = [labels[i] for i in ids]
  rest, test = train_test_split(ids, test_size=TEST_FRACTION, stratify=y, random_state=seed)
  y_rest = [labels[i] for i in rest]
  train, validation = train_test_split(
    rest, test_size=VALIDATION_FRACTION, stratify=y_rest, random_state=seed
  )
  return common.split_of(train, validation, test)


class SiimPneumothorax(common.RadiographBuilder):
  """SIIM-ACR Pneumothorax: DICOM images, label No Pneumothorax / Pneumothorax."""

  name = "siim_pneumothorax"
  HOMEPAGE = "https://www.kaggle.com/c/siim-acr-pneumothorax-segmentation"
  DESCRIPTION = "SIIM-ACR Pneumothorax training images, binary, stratified split 81/9/10."
  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS
  # 2: the default split seed is the paper's 5 (the plain configuration name, `224px`, now
  # means seed 5; seed 0 is `224px_seed0`).
  FORMAT_VERSION = 2
  DEFAULT_SEED = SPLIT_SEED
  LAYOUT = (
    ((LABELS_CSV,), "ImageId, EncodedPixels"),
    ((f"{IMAGE_DIR}/",), "the DICOM images, <StudyUID>/<SeriesUID>/<ImageId>.dcm"),
  )
  CLASS_NAMES = tuple(findings_lib.CLASSES_PNEUMOTHORAX)

  def _features(self):
    return common.class_label_features(self.CLASS_NAMES)

  def _split_generators(self, dl_manager):
    root = self._manual(dl_manager)
    labels = image_labels(common.read_csv(root / LABELS_CSV, COLUMNS, self._bad_row))
    split = split_images(labels, seed=self.builder_config.seed)
    # The DICOMs sit two folders deep under ids that are not in the label file.
    paths = {p.stem: p for p in (root / IMAGE_DIR).rglob("*.dcm")}
    return self._keyed_splits(root, "ImageId", labels, split, lambda i, y: (i, y, paths.get(i)))

  def _generate_examples(self, root: Path, split: str, items):
    def make(item):
      image_id, label, path = item
      pixels = common.load_dicom(path or root / IMAGE_DIR / f"{image_id}.dcm")
      return image_id, {"image": self._image(pixels), "id": image_id, "label": label, "report": ""}

    return self._examples(split, items, make)
