"""MIMIC-CXR-JPG 2.x with MIMIC-CXR reports: frontal images, FINDINGS + IMPRESSION, official split.

Manual directory (as PhysioNet publishes it; the reports zip unpacked into the same tree):

  mimic-cxr-2.0.0-split.csv.gz       dicom_id, study_id, subject_id, split
  mimic-cxr-2.0.0-metadata.csv.gz    dicom_id, subject_id, study_id, ViewPosition, ...
  mimic-cxr-2.0.0-chexpert.csv.gz    subject_id, study_id, 14 CheXpert observations
  files/p10/p10000032/s50414267/02aa804e-....jpg     images (MIMIC-CXR-JPG)
  files/p10/p10000032/s50414267.txt                  reports (MIMIC-CXR mimic-cxr-reports.zip)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from medunifier_jax.data.builders import common

SPLIT_CSV = "mimic-cxr-2.0.0-split.csv.gz"
METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv.gz"
CHEXPERT_CSV = "mimic-cxr-2.0.0-chexpert.csv.gz"
FRONTAL_VIEWS = ("PA", "AP")

# Version of the records `mimic_example` makes (report sections, fields); mimic_5x200 stores
# the same records, so both fingerprints carry it. Bump it when they change.
RECORD_FORMAT_VERSION = 1
MANUAL_LAYOUT = (
  ((SPLIT_CSV,), "dicom_id,study_id,subject_id,split"),
  ((METADATA_CSV,), "dicom_id,subject_id,study_id,...,ViewPosition,..."),
  ((CHEXPERT_CSV,), "subject_id,study_id,Atelectasis,...,Support Devices"),
  (("files/p*/p*/s*.txt",), "the reports (mimic-cxr-reports.zip, unzipped into this folder)"),
  (("files/p*/p*/s*/*.jpg",), "the JPEG images"),
)

SPLIT_COLUMNS = ("dicom_id", "study_id", "subject_id", "split")
METADATA_COLUMNS = ("dicom_id", "subject_id", "study_id", "ViewPosition")
CHEXPERT_COLUMNS = ("subject_id", "study_id", *common.CHEXPERT_OBSERVATIONS)

INSTRUCTIONS = """\
Download MIMIC-CXR-JPG 2.x (https://physionet.org/content/mimic-cxr-jpg/) and the report
archive mimic-cxr-reports.zip of MIMIC-CXR (https://physionet.org/content/mimic-cxr/); unzip the
reports into the MIMIC-CXR-JPG folder so that files/pNN/pNNNNNNNN/sNNNNNNNN.txt lie next to the
image folders files/pNN/pNNNNNNNN/sNNNNNNNN/. Pass that folder as --manual-dir.
"""


@dataclasses.dataclass(frozen=True)
class MimicImage:
  """One frontal image of the label tables; paths relative to the manual directory."""

  dicom_id: str
  subject_id: str
  study_id: str
  split: str  # train / validate / test, as published
  view: str
  chexpert: np.ndarray  # float32 (14,), common.CHEXPERT_OBSERVATIONS order, NaN blank

  @property
  def study_dir(self) -> str:
    return f"files/p{self.subject_id[:2]}/p{self.subject_id}/s{self.study_id}"

  @property
  def image_path(self) -> str:
    return f"{self.study_dir}/{self.dicom_id}.jpg"

  @property
  def report_path(self) -> str:
    return f"{self.study_dir}.txt"


def read_tables(
  root: Path, skip: Callable[[str, str | Path, str], None] | None = None
) -> list[MimicImage]:
  """Frontal (PA/AP) images with split, view and study labels, sorted by dicom_id.

  Args:
    root: the manual directory.
    skip: `(split, path, reason)` records an input left out (a builder's `_skip`). A label-file
      row with too few or too many fields is left out and recorded as FILE:LINE; the images of
      a study whose CheXpert row is such a row are left out too (their labels are unknown, and
      blank would read as "not mentioned"). Without `skip`, such a row stops the read with a
      LayoutError naming file and line.
  """
  root = Path(root)
  on_bad_row = None
  damaged: dict[tuple[str, str], common.BadRow] = {}
  if skip is not None:

    def on_bad_row(bad: common.BadRow) -> None:
      skip("all", f"{bad.path}:{bad.line}", bad.reason)
      if bad.path.name == CHEXPERT_CSV and "study_id" in bad.fields:
        damaged[bad.fields["subject_id"], bad.fields["study_id"]] = bad

  splits = {
    r["dicom_id"]: r for r in common.read_csv(root / SPLIT_CSV, SPLIT_COLUMNS, on_bad_row)
  }
  labels = {
    (r["subject_id"], r["study_id"]): common.chexpert_vector(r)
    for r in common.read_csv(root / CHEXPERT_CSV, CHEXPERT_COLUMNS, on_bad_row)
  }
  blank = np.full(len(common.CHEXPERT_OBSERVATIONS), np.nan, np.float32)
  images = []
  for row in common.read_csv(root / METADATA_CSV, METADATA_COLUMNS, on_bad_row):
    if row["ViewPosition"] not in FRONTAL_VIEWS or row["dicom_id"] not in splits:
      continue
    key = (row["subject_id"], row["study_id"])
    image = MimicImage(
      dicom_id=row["dicom_id"],
      subject_id=row["subject_id"],
      study_id=row["study_id"],
      split=splits[row["dicom_id"]]["split"],
      view=row["ViewPosition"],
      chexpert=labels.get(key, blank),
    )
    if key in damaged:
      split = common.SPLIT_NAMES.get(image.split, image.split)
      line = damaged[key].line
      skip(split, root / image.image_path, f"its study's row {CHEXPERT_CSV}:{line} is damaged")
      continue
    images.append(image)
  return sorted(images, key=lambda im: im.dicom_id)


# Section headers are upper-case words at the start of a line, followed by a colon.
_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z /&-]*[A-Z])[ \t]*:", re.MULTILINE)
_FINDINGS_NAMES = ("FINDINGS", "FINDINGS AND IMPRESSION", "FINDINGS/IMPRESSION")
_IMPRESSION_NAMES = ("IMPRESSION", "IMPRESSIONS", "CONCLUSION")


def report_sections(text: str) -> dict[str, str]:
  """Upper-case section header -> its text (whitespace collapsed); later repeats are appended."""
  sections: dict[str, str] = {}
  matches = list(_HEADER.finditer(text))
  for m, nxt in zip(matches, [*matches[1:], None]):
    body = common.normalize_space(text[m.end() : nxt.start() if nxt else len(text)])
    name = m.group(1)
    sections[name] = f"{sections[name]} {body}".strip() if name in sections else body
  return sections


def findings_and_impression(text: str) -> tuple[str, str]:
  """The FINDINGS and IMPRESSION sections of a MIMIC-CXR report ('' where absent)."""
  sections = report_sections(text)
  findings = next((sections[n] for n in _FINDINGS_NAMES if sections.get(n)), "")
  impression = next((sections[n] for n in _IMPRESSION_NAMES if sections.get(n)), "")
  return findings, impression


def read_report(root: Path, image: MimicImage) -> tuple[str, str, str]:
  """(cleaned report, findings, impression); SkipExample if missing, not UTF-8 or without either
  section. The report is stored whole: the cut to `max_words` happens when it is tokenised."""
  path = Path(root) / image.report_path
  findings, impression = findings_and_impression(common.read_report(path))
  if not findings and not impression:
    raise common.SkipExample("empty report: no FINDINGS or IMPRESSION text", path)
  return common.clean_report(f"{findings} {impression}"), findings, impression


def report_features() -> dict:
  return {
    "report": tfds.features.Text(),
    "findings": tfds.features.Text(),
    "impression": tfds.features.Text(),
    "chexpert": tfds.features.Tensor(
      shape=(len(common.CHEXPERT_OBSERVATIONS),), dtype=np.float32
    ),
    "subject_id": tfds.features.Text(),
    "study_id": tfds.features.Text(),
    "view": tfds.features.Text(),
  }


def mimic_example(
  builder: common.RadiographBuilder, root: Path, image: MimicImage
) -> tuple[str, dict]:
  """(key, stored record) of one image; raises SkipExample (report checked before the image)."""
  report, findings, impression = read_report(root, image)
  pixels = builder._load_image(Path(root) / image.image_path)
  return image.dicom_id, {
    "image": builder._image(pixels),
    "id": image.dicom_id,
    "report": report,
    "findings": findings,
    "impression": impression,
    "chexpert": image.chexpert,
    "subject_id": image.subject_id,
    "study_id": image.study_id,
    "view": image.view,
  }


class MimicCxr(common.RadiographBuilder):
  """MIMIC-CXR-JPG frontal images with their reports and CheXpert labels; official split."""

  name = "mimic_cxr"
  HOMEPAGE = "https://physionet.org/content/mimic-cxr-jpg/"
  DESCRIPTION = "MIMIC-CXR-JPG frontal (PA/AP) radiographs, FINDINGS + IMPRESSION, official split."
  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS
  FORMAT_VERSION = RECORD_FORMAT_VERSION
  STORES_REPORTS = True
  LAYOUT = MANUAL_LAYOUT

  def _features(self):
    return report_features()

  def _split_generators(self, dl_manager):
    root = self._manual(dl_manager)
    images = read_tables(root, self._skip)
    by_split: dict[str, list[MimicImage]] = {}
    for image in images:
      if image.split not in common.SPLIT_NAMES:
        raise common.LayoutError(
          f"{root / SPLIT_CSV}: unknown split {image.split!r}; expected one of "
          f"{sorted(common.SPLIT_NAMES)}"
        )
      by_split.setdefault(common.SPLIT_NAMES[image.split], []).append(image)
    self._write_manifest(
      ("dicom_id", "subject_id", "study_id", "view", "split"),
      (dataclasses.asdict(im) for im in images),
    )
    return {split: self._generate_examples(root, split, ims) for split, ims in by_split.items()}

  def _generate_examples(self, root: Path, split: str, images: list[MimicImage]) -> Iterator:
    return self._examples(split, images, lambda image: mimic_example(self, root, image))
