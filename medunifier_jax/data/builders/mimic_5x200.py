"""MIMIC 5x200: the CheXpert 5x200 construction on MIMIC-CXR-JPG labels, with reports.

Units are studies: each frontal study contributes one image (the first PA image by dicom_id,
else the first AP one), so no study appears twice. A study is a candidate for a class when its
MIMIC-CXR CheXpert label is 1.0 for that class and 0.0 or blank on the other four. The draw
pools all official splits, as the published 5x200 sets did; `manifest.csv` lists the official
split of every drawn image, and `held_out.csv` the drawn studies, whose patients `mimic_cxr`
leaves out of pre-training (`held_out.py`). The draw reads only the label tables (never the
files on disk), so it is the same for everyone; a drawn study whose image or report is missing,
corrupt or empty is skipped and reported (and still held out).

Manual directory: as for `mimic_cxr`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from medunifier_jax.data.builders import chexpert_5x200, common, mimic_cxr
from medunifier_jax.data.builders import held_out as held_out_lib


def one_image_per_study(images: list[mimic_cxr.MimicImage]) -> list[mimic_cxr.MimicImage]:
  """The representative frontal image of each study (PA before AP, then by dicom_id)."""
  best: dict[tuple[str, str], mimic_cxr.MimicImage] = {}
  for image in images:
    key = (image.subject_id, image.study_id)
    rank = (image.view != "PA", image.dicom_id)
    if key not in best or rank < (best[key].view != "PA", best[key].dicom_id):
      best[key] = image
  return sorted(best.values(), key=lambda im: im.study_id)


def mimic_manifest(
  images: list[mimic_cxr.MimicImage], class_names, *, seed: int, per_class: int
) -> list[tuple[mimic_cxr.MimicImage, int]]:
  """(image, class index) pairs of the 5x200 draw over `images` (frontal, from read_tables)."""
  studies = one_image_per_study(images)
  column = [common.CHEXPERT_OBSERVATIONS.index(c) for c in class_names]
  labels = np.stack([im.chexpert[column] for im in studies]) if studies else np.zeros((0, 5))
  drawn = chexpert_5x200.draw_5x200(
    [im.study_id for im in studies], labels, class_names, seed=seed, per_class=per_class
  )
  by_study = {im.study_id: im for im in studies}
  return [(by_study[s], c) for s, c in drawn]


class Mimic5x200(common.RadiographBuilder):
  """MIMIC-CXR 5x200 zero-shot classification and retrieval set (one split, `test`)."""

  name = "mimic_5x200"
  CLASS_SETS = chexpert_5x200.CLASS_SETS
  HOMEPAGE = "https://physionet.org/content/mimic-cxr-jpg/"
  DESCRIPTION = "MIMIC-CXR 5x200: seeded, 200 frontal studies per class, single-positive, reports."
  MANUAL_DOWNLOAD_INSTRUCTIONS = mimic_cxr.INSTRUCTIONS
  STORES_REPORTS = True
  LAYOUT = mimic_cxr.MANUAL_LAYOUT
  # 2: held_out.csv, the drawn studies that mimic_cxr leaves out of pre-training.
  FORMAT_VERSION = 2

  def _format_versions(self):
    # The records are mimic_cxr's (`mimic_cxr.mimic_example`): its record format counts too.
    return {**super()._format_versions(), "mimic_cxr records": mimic_cxr.RECORD_FORMAT_VERSION}

  def _features(self):
    return {
      "label": tfds.features.ClassLabel(names=list(self.class_names)),
      **mimic_cxr.report_features(),
    }

  def _split_generators(self, dl_manager):
    root = self._manual(dl_manager)
    self._reports = mimic_cxr.Reports(root)
    images = mimic_cxr.read_tables(root, self._skip)
    cfg = self.builder_config
    drawn = mimic_manifest(images, self.class_names, seed=cfg.seed, per_class=cfg.per_class)
    self._write_manifest(
      ("dicom_id", "subject_id", "study_id", "view", "split", "label", "class_name"),
      (
        {
          "dicom_id": im.dicom_id,
          "subject_id": im.subject_id,
          "study_id": im.study_id,
          "view": im.view,
          "split": im.split,
          "label": c,
          "class_name": self.class_names[c],
        }
        for im, c in drawn
      ),
    )
    # Every drawn study, also one skipped below for a bad file: the list then depends on the
    # label tables only, and holding out one study too many costs nothing.
    held_out_lib.write(
      Path(self.data_dir) / held_out_lib.HELD_OUT_FILE,
      (
        {
          "subject_id": im.subject_id,
          "study_id": im.study_id,
          "dicom_id": im.dicom_id,
          "path": im.image_path,
          "split": im.split,
        }
        for im, _ in drawn
      ),
    )
    patients = len({im.subject_id for im, _ in drawn})
    self._note(f"reports: read from {self._reports.describe()}")
    self._note(
      f"held out: {len(drawn)} studies of {patients} patients ({held_out_lib.HELD_OUT_FILE}); "
      "mimic_cxr prepared into the same --data-dir leaves these patients out of pre-training"
    )
    return {"test": self._generate_examples(drawn)}

  def _generate_examples(self, drawn):
    def make(item):
      image, c = item
      key, example = mimic_cxr.mimic_example(self, self._reports, image)
      return key, {**example, "label": c}

    return self._examples("test", drawn, make)

  def _empty_split_hint(self, items) -> str:
    return self._reports.missing_hint(items[0][0]) if items else ""
