"""MIMIC-CXR-JPG 2.x with MIMIC-CXR reports: frontal images, FINDINGS + IMPRESSION, official split.

Manual directory (as PhysioNet publishes it):

  mimic-cxr-2.0.0-split.csv.gz       dicom_id, study_id, subject_id, split     (or unzipped .csv)
  mimic-cxr-2.0.0-metadata.csv.gz    dicom_id, subject_id, study_id, ViewPosition, ...
  mimic-cxr-2.0.0-chexpert.csv.gz    subject_id, study_id, 14 CheXpert observations
  files/p10/p10000032/s50414267/02aa804e-....jpg     images (MIMIC-CXR-JPG)
  mimic-cxr-reports.zip                              reports (MIMIC-CXR), packed, or unpacked as
    mimic-cxr-reports/files/p10/p10000032/s50414267.txt   (the archive's own folder), or
    files/p10/p10000032/s50414267.txt                     (next to the image folders)

The patients of the MIMIC 5x200 evaluation set are held out of the train and validation splits
(`held_out.py`; prepare's `--held-out`).
"""

from __future__ import annotations

import dataclasses
import re
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from medunifier_jax.data.builders import common
from medunifier_jax.data.builders import held_out as held_out_lib

# The label tables as published (gzipped); the unzipped `.csv` is read as well.
SPLIT_CSV = "mimic-cxr-2.0.0-split.csv.gz"
METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv.gz"
CHEXPERT_CSV = "mimic-cxr-2.0.0-chexpert.csv.gz"
FRONTAL_VIEWS = ("PA", "AP")
REPORTS_ZIP = "mimic-cxr-reports.zip"
REPORTS_DIR = "mimic-cxr-reports"  # the folder the reports archive unpacks to
REPORT_LAYOUT = "files/pNN/pNNNNNNNN/sNNNNNNNN.txt"
IMAGE_LAYOUT = "files/pNN/pNNNNNNNN/sNNNNNNNN/DICOM_ID.jpg"

# Version of the records `mimic_example` makes (report sections, fields); mimic_5x200 stores
# the same records, so both fingerprints carry it. Bump it when they change.
RECORD_FORMAT_VERSION = 1


def _either(gz_name: str) -> tuple[str, str]:
  """The published `.csv.gz` name and its unzipped `.csv` twin."""
  return gz_name, gz_name.removesuffix(".gz")


MANUAL_LAYOUT = (
  (_either(SPLIT_CSV), "dicom_id,study_id,subject_id,split"),
  (_either(METADATA_CSV), "dicom_id,subject_id,study_id,...,ViewPosition,..."),
  (_either(CHEXPERT_CSV), "subject_id,study_id,Atelectasis,...,Support Devices"),
  (
    (REPORTS_ZIP, f"{REPORTS_DIR}/files/p*/p*/s*.txt", "files/p*/p*/s*.txt"),
    "the reports (mimic-cxr-reports.zip, packed or unzipped here)",
  ),
  (("files/p*/p*/s*/*.jpg",), "the JPEG images"),
)

SPLIT_COLUMNS = ("dicom_id", "study_id", "subject_id", "split")
METADATA_COLUMNS = ("dicom_id", "subject_id", "study_id", "ViewPosition")
CHEXPERT_COLUMNS = ("subject_id", "study_id", *common.CHEXPERT_OBSERVATIONS)

INSTRUCTIONS = """\
Download MIMIC-CXR-JPG 2.x (https://physionet.org/content/mimic-cxr-jpg/) and the report
archive mimic-cxr-reports.zip of MIMIC-CXR (https://physionet.org/content/mimic-cxr/); put the
archive into the MIMIC-CXR-JPG folder (packed, or unzipped there: mimic-cxr-reports/files/...)
and pass that folder as --manual-dir. The label tables may be gzipped (as published) or not.
"""


def label_file(root: Path, gz_name: str) -> Path:
  """The label table `gz_name` in `root`: the published `.csv.gz`, else its unzipped `.csv`
  (the `.gz` name when neither exists, for the message that it is missing)."""
  for name in _either(gz_name):
    if (Path(root) / name).is_file():
      return Path(root) / name
  return Path(root) / gz_name


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
  split_csv, chexpert_csv, metadata_csv = (
    label_file(root, name) for name in (SPLIT_CSV, CHEXPERT_CSV, METADATA_CSV)
  )
  on_bad_row = None
  damaged: dict[tuple[str, str], common.BadRow] = {}
  if skip is not None:

    def on_bad_row(bad: common.BadRow) -> None:
      skip("all", f"{bad.path}:{bad.line}", bad.reason)
      if bad.path == chexpert_csv and "study_id" in bad.fields:
        damaged[bad.fields["subject_id"], bad.fields["study_id"]] = bad

  splits = {r["dicom_id"]: r for r in common.read_csv(split_csv, SPLIT_COLUMNS, on_bad_row)}
  labels = {
    (r["subject_id"], r["study_id"]): common.chexpert_vector(r)
    for r in common.read_csv(chexpert_csv, CHEXPERT_COLUMNS, on_bad_row)
  }
  blank = np.full(len(common.CHEXPERT_OBSERVATIONS), np.nan, np.float32)
  images = []
  for row in common.read_csv(metadata_csv, METADATA_COLUMNS, on_bad_row):
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
      reason = f"its study's row {chexpert_csv.name}:{line} is damaged"
      skip(split, root / image.image_path, reason)
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


# A report's path inside the archive, whatever folder the archive puts around `files/`.
_REPORT_MEMBER = re.compile(r"(?:^|/)(files/p\d+/p\d+/s\d+\.txt)$")


class Reports:
  """Where the reports of a manual directory are, and reading one.

  Looked for in this order (the first that exists is used; they hold the same files):
  `mimic-cxr-reports/files/` (the archive unzipped where it lies), `mimic-cxr-reports.zip`
  (read without unpacking), `files/` next to the image folders (the archive unzipped into the
  MIMIC-CXR-JPG folder).
  """

  def __init__(self, root: Path):
    self.root = Path(root)
    self._archive: zipfile.ZipFile | None = None
    self._lock = threading.Lock()  # one ZipFile is read from the decoding threads
    if (self.root / REPORTS_DIR / "files").is_dir():
      self.where = self.root / REPORTS_DIR
    elif (self.root / REPORTS_ZIP).is_file():
      self.where = self.root / REPORTS_ZIP
      try:
        self._archive = zipfile.ZipFile(self.where)
      except (OSError, zipfile.BadZipFile) as e:
        raise common.LayoutError(
          f"{self.where}: not a readable zip archive ({e}); download it again"
        ) from None
      self._members = {}
      for name in self._archive.namelist():
        match = _REPORT_MEMBER.search(name)
        if match:
          self._members.setdefault(match[1], name)
    else:
      self.where = self.root

  def describe(self) -> str:
    """Where the reports are read from, relative to the manual directory, in words."""
    if self._archive is not None:
      return f"{REPORTS_ZIP} (read without unpacking)"
    if self.where == self.root:
      return "files/ next to the image folders"
    return f"{REPORTS_DIR}/files/"

  def path(self, image: MimicImage) -> Path:
    """The report's file (for a packed archive: ARCHIVE/its path inside)."""
    if self._archive is not None:
      return self.where / self._members.get(image.report_path, image.report_path)
    return self.where / image.report_path

  def read(self, image: MimicImage) -> str:
    """The report's text; SkipExample if missing or not UTF-8 (as `common.read_report`)."""
    if self._archive is None:
      return common.read_report(self.path(image))
    member = self._members.get(image.report_path)
    if member is None:
      raise common.SkipExample("report file missing", self.path(image))
    try:
      with self._lock:
        data = self._archive.read(member)
    except (OSError, zipfile.BadZipFile, EOFError) as e:
      raise common.SkipExample(f"report damaged in the archive ({e})", self.path(image)) from None
    return common.decode_report(data, self.path(image))

  def missing_hint(self, image: MimicImage) -> str:
    """Where a split's first report and image were looked for and the layout expected there,
    for the error when every input of the split was skipped."""
    if self._archive is not None:
      reports = (
        f"reports were looked for inside {self.where} as [FOLDER/]{REPORT_LAYOUT} (it holds "
        f"{len(self._members)} such files; e.g. {image.report_path})"
      )
    else:
      reports = f"reports were looked for in {self.where} as {REPORT_LAYOUT} (e.g. "
      reports += f"{self.path(image)})"
      if self.where == self.root:  # the other places, which were not there
        reports += f"; they may also lie there as {REPORTS_ZIP} or unzipped as {REPORTS_DIR}/"
    return (
      f"{reports}; images under {self.root / 'files'} as {IMAGE_LAYOUT} (e.g. "
      f"{self.root / image.image_path}); see docs/DATASETS.md, section mimic_cxr"
    )


def read_report(reports: Reports, image: MimicImage) -> tuple[str, str, str]:
  """(cleaned report, findings, impression); SkipExample if missing, not UTF-8 or without either
  section. The report is stored whole: the cut to `max_words` happens when it is tokenised."""
  findings, impression = findings_and_impression(reports.read(image))
  if not findings and not impression:
    raise common.SkipExample("empty report: no FINDINGS or IMPRESSION text", reports.path(image))
  return common.clean_report(f"{findings} {impression}"), findings, impression


def report_features() -> dict:
  return {
    "report": tfds.features.Text(),
    "findings": tfds.features.Text(),
    "impression": tfds.features.Text(),
    "chexpert": tfds.features.Tensor(shape=(len(common.CHEXPERT_OBSERVATIONS),), dtype=np.float32),
    "subject_id": tfds.features.Text(),
    "study_id": tfds.features.Text(),
    "view": tfds.features.Text(),
  }


def mimic_example(
  builder: common.RadiographBuilder, reports: Reports, image: MimicImage
) -> tuple[str, dict]:
  """(key, stored record) of one image; raises SkipExample (report checked before the image)."""
  report, findings, impression = read_report(reports, image)
  pixels = builder._load_image(reports.root / image.image_path)
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
  """MIMIC-CXR-JPG frontal images with their reports and CheXpert labels; official split, with
  the patients of the MIMIC 5x200 evaluation set left out of train and validation."""

  name = "mimic_cxr"
  HOMEPAGE = "https://physionet.org/content/mimic-cxr-jpg/"
  DESCRIPTION = "MIMIC-CXR-JPG frontal (PA/AP) radiographs, FINDINGS + IMPRESSION, official split."
  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS
  # 2: the MIMIC 5x200 patients held out of train and validation (excluded.csv).
  FORMAT_VERSION = 2
  STORES_REPORTS = True
  LAYOUT = MANUAL_LAYOUT
  # prepare settles what is held out (`held_out.resolve`, --held-out) and sets `held_out`
  # before building or checking; a builder made only to read a prepared set leaves it None.
  EXCLUDES_HELD_OUT = True
  held_out: held_out_lib.Exclusion | None = None

  def _features(self):
    return report_features()

  def _format_versions(self):
    return {**super()._format_versions(), "mimic_cxr records": RECORD_FORMAT_VERSION}

  # -- held-out patients in the fingerprint ----------------------------------------------------

  def _stored_held_out(self) -> tuple[object, dict]:
    """(the held-out fingerprint part, the held-out record) the prepared set was built with."""
    stored = self.stored_fingerprint()
    parts = stored.get("parts") if isinstance(stored.get("parts"), dict) else {}
    record = stored.get("held_out") if isinstance(stored.get("held_out"), dict) else {}
    return parts.get("held_out"), record

  def fingerprint_parts(self):
    parts = super().fingerprint_parts()
    if self.held_out is not None:
      parts["held_out"] = self.held_out.part()
    else:
      # Reading a prepared set: prepare's --held-out is not known here, so the exclusion it
      # was built with stands; check_fingerprint checks it still covers every held-out set.
      parts["held_out"] = self._stored_held_out()[0]
    return parts

  def _fingerprint_record(self):
    record = super()._fingerprint_record()
    if self.held_out is not None:
      record["held_out"] = {
        "named": list(self.held_out.named),
        "files": [str(s.path.resolve()) for s in self.held_out.sets],
      }
    return record

  def rebuild_command(self, manual_dir, data_dir) -> str:
    if self.held_out is not None:
      extra = self.held_out.args()
    else:
      named = self._stored_held_out()[1].get("named", [])
      extra = [arg for value in named for arg in ("--held-out", value)]
    return common.rebuild_command(
      self.name, self.builder_config, manual_dir, data_dir, extra_args=extra
    )

  def check_fingerprint(self, data_dir, manual_dir=None) -> None:
    """As the base class; when reading (no `held_out` set), also refused when a MIMIC 5x200
    set prepared under `data_dir` is not held out of it (one prepared after it)."""
    super().check_fingerprint(data_dir, manual_dir)
    if self.held_out is not None:
      return  # prepare's exclusion is in the compared parts
    missing = held_out_lib.uncovered(self._stored_held_out()[0], Path(data_dir))
    if missing:
      sets = ", ".join(f"{s.label} ({s.path})" for s in missing)
      manual = manual_dir or self.stored_fingerprint().get("manual_dir")
      raise common.StalePreparedError(
        f"{self.name}/{self.builder_config.name} at {self.data_dir} does not hold out the "
        f"patients of {sets}, prepared after it: pre-training on it would let MIMIC 5x200 "
        "zero-shot classification and retrieval score studies the model trained on, so it is "
        "not used. Rebuild it (the held-out sets under --data-dir are found by themselves) "
        f"with:\n  {self.rebuild_command(manual, data_dir)}"
      )

  # -- generation ------------------------------------------------------------------------------

  def _split_generators(self, dl_manager):
    root = self._manual(dl_manager)
    if self.held_out is None:
      raise held_out_lib.HeldOutError(
        "mimic_cxr is built by `python -m medunifier_jax.data.prepare mimic_cxr`, which "
        "settles what is held out of pre-training (--held-out; docs/DATASETS.md)"
      )
    self._reports = Reports(root)
    images = read_tables(root, self._skip)
    for image in images:
      if image.split not in common.SPLIT_NAMES:
        raise common.LayoutError(
          f"{label_file(root, SPLIT_CSV)}: unknown split {image.split!r}; expected one of "
          f"{sorted(common.SPLIT_NAMES)}"
        )
    self._note(f"reports: read from {self._reports.describe()}")
    kept, excluded = self._hold_out(images)
    by_split: dict[str, list[MimicImage]] = {}
    for image in kept:
      by_split.setdefault(common.SPLIT_NAMES[image.split], []).append(image)
    self._write_manifest(
      ("dicom_id", "subject_id", "study_id", "view", "split"),
      (dataclasses.asdict(im) for im in kept),
    )
    return {split: self._generate_examples(split, ims) for split, ims in by_split.items()}

  def _hold_out(self, images: list[MimicImage]) -> tuple[list[MimicImage], list[MimicImage]]:
    """(kept, excluded) images; writes excluded.csv and the summary's held-out lines."""
    exclusion = self.held_out
    named_by = {}
    for s in exclusion.sets:
      for subject in s.subjects:
        named_by.setdefault(subject, s.label)
    kept, excluded = [], []
    for image in images:
      (excluded if exclusion.excludes(image.subject_id, image.split) else kept).append(image)
    held_out_lib.write_excluded(
      Path(self.data_dir) / held_out_lib.EXCLUDED_FILE,
      ({**dataclasses.asdict(im), "held_out_by": named_by[im.subject_id]} for im in excluded),
    )
    self._note(f"held out: {exclusion.describe()}")
    if exclusion.disabled:
      self._note(
        "excluded: nothing; MIMIC 5x200 zero-shot and retrieval of a model pre-trained on this "
        "set would score studies it has seen"
      )
      return kept, excluded
    splits = " and ".join(held_out_lib.EXCLUDED_SPLITS)
    studies = {(im.subject_id, im.study_id) for im in excluded}
    self._note(
      f"excluded: {len(studies)} studies ({len(excluded)} images) of those patients from "
      f"{splits} ({held_out_lib.EXCLUDED_FILE}); test is kept whole"
    )
    absent = exclusion.subjects - {im.subject_id for im in images}
    if absent:  # a held-out list made from other label tables than these
      self._note(
        f"warning: {len(absent)} held-out patients are not in these label tables; was the "
        "MIMIC 5x200 set prepared from another copy of MIMIC-CXR?"
      )
    return kept, excluded

  def _generate_examples(self, split: str, images: list[MimicImage]) -> Iterator:
    return self._examples(split, images, lambda image: mimic_example(self, self._reports, image))

  def _empty_split_hint(self, items) -> str:
    return self._reports.missing_hint(items[0]) if items else ""
