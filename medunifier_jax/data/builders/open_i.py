"""Open-i (Indiana University chest X-ray collection): XML reports + PNG images.

One example per image named by a report's `parentImage` ids; the report text is FINDINGS +
IMPRESSION (cleaned), the sections and the MeSH terms are stored too. The collection has no
official split; reports (with all their images) are assigned by a hash of the report file
name and the seed: 80% train, 10% validation, 10% test (`openi.report_split`, the rule the
phantom Open-i sets use too). The assignment of a report does not
depend on which other files are present, and `manifest.csv` lists it.

Manual directory (NLMCXR_reports.tgz and NLMCXR_png.tgz from https://openi.nlm.nih.gov/faq):

  ecgen-radiology/1.xml ...          (or the NLMCXR_reports.tgz archive itself)
  NLMCXR_png/CXR1_1_IM-0001-3001.png ...   (any folder below --manual-dir; found by name)
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import tensorflow_datasets as tfds

from medunifier_jax.data.builders import common

REPORT_DIR = "ecgen-radiology"
REPORT_ARCHIVE = "NLMCXR_reports.tgz"
EMPTY_REPORT = "empty report: no FINDINGS or IMPRESSION text"

INSTRUCTIONS = """\
Download NLMCXR_reports.tgz and NLMCXR_png.tgz (https://openi.nlm.nih.gov/faq, "What is the
Indiana University chest X-ray collection?") and unpack both into the folder passed as
--manual-dir (the reports archive may also stay packed there).
"""


def iter_report_files(root: Path) -> Iterator[tuple[str, bytes]]:
  """(file name, XML bytes) of every report: from ecgen-radiology/ or the packed archive."""
  folder = Path(root) / REPORT_DIR
  if folder.is_dir():
    for path in sorted(folder.glob("*.xml"), key=lambda p: (len(p.name), p.name)):
      yield path.name, path.read_bytes()
    return
  archive = Path(root) / REPORT_ARCHIVE
  if not archive.is_file():
    raise common.LayoutError(
      f"Open-i reports: neither {folder} nor {archive} exists; see docs/DATASETS.md"
    )
  with tarfile.open(archive) as tar:
    members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".xml")]
    for m in sorted(members, key=lambda m: (len(m.name), m.name)):
      yield Path(m.name).name, tar.extractfile(m).read()


class OpenI(common.RadiographBuilder):
  """Open-i reports paired with each of their images."""

  name = "open_i"
  HOMEPAGE = "https://openi.nlm.nih.gov/"
  DESCRIPTION = "Indiana University chest X-ray collection: PNG images with their reports."
  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS
  STORES_REPORTS = True
  # Bump also when `openi.parse_report` changes what it reads from the XML.
  FORMAT_VERSION = 1
  LAYOUT = (
    ((f"{REPORT_DIR}/*.xml", REPORT_ARCHIVE), "the XML reports (NLMCXR_reports.tgz)"),
    (("**/*.png",), "the PNG images, in any folder (NLMCXR_png.tgz)"),
  )

  def _features(self):
    text = tfds.features.Text
    return {
      "report": text(),
      "findings": text(),
      "impression": text(),
      "indication": text(),
      "comparison": text(),
      "mesh": text(),  # JSON list of the report's MeSH terms (major, then minor)
      "report_id": text(),
    }

  def _split_generators(self, dl_manager):
    from medunifier_jax.data import openi  # the shared Open-i XML parser

    root = self._manual(dl_manager)
    pngs = {p.stem: p for p in root.rglob("*.png")}
    items: dict[str, list] = {split: [] for split, _ in openi.SPLIT_PERCENT}
    manifest = []
    for file_name, xml in iter_report_files(root):
      try:
        report = openi.parse_report(xml, file_name)
      except openi.OpenIFormatError as e:
        self._skip("all", root / REPORT_DIR / file_name, str(e).split(": ", 1)[-1])
        continue
      split = openi.report_split(file_name, self.builder_config.seed)
      if not (report.findings or report.impression):
        self._skip(split, root / REPORT_DIR / file_name, EMPTY_REPORT)
        continue
      if not report.images:
        self._skip(split, root / REPORT_DIR / file_name, "report names no image")
      for image_id in report.images:
        items[split].append((file_name, report, image_id, pngs.get(image_id)))
        manifest.append({"image_id": image_id, "report_file": file_name, "split": split})
    self._write_manifest(("image_id", "report_file", "split"), manifest)
    # A split no report falls into (only in small subsets) is left out rather than empty.
    return {
      split: self._generate_examples(root, split, rows) for split, rows in items.items() if rows
    }

  def _generate_examples(self, root: Path, split: str, rows):
    def make(item):
      file_name, report, image_id, path = item
      pixels = self._load_image(path or Path(root) / f"{image_id}.png")
      return image_id, {
        "image": self._image(pixels),
        "id": image_id,
        "report": common.clean_report(f"{report.findings} {report.impression}"),
        "findings": report.findings,
        "impression": report.impression,
        "indication": report.indication,
        "comparison": report.comparison,
        "mesh": json.dumps(list(report.mesh)),
        "report_id": file_name,
      }

    return self._examples(split, rows, make)
