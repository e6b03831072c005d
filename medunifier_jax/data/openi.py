"""The Indiana University chest X-ray reports (Open-i): parsing, and MeSH terms -> findings.

The 3,955 report XML files ship inside the PyPI package `torchxrayvision`
(`data/NLMCXR_reports.tgz`, `ecgen-radiology/N.xml`). The package is located with
`importlib.util.find_spec`, which reads its location without executing it (it is installed with
`--no-deps` and cannot be imported here). Each report holds COMPARISON / INDICATION / FINDINGS /
IMPRESSION sections, MeSH major/minor terms such as "Pleural Effusion/right/small", and the ids
of its images (`parentImage`). `mesh_to_findings` turns the terms into phantom `Finding`s;
docs/DATA.md lists the mapping and what it ignores.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from medunifier_jax.data import findings as findings_lib
from medunifier_jax.data.phantoms import SEVERITIES, ZONES, Finding

PACKAGE = "torchxrayvision"
REPORTS_FILE = "NLMCXR_reports.tgz"
INSTALL_HINT = "pip install --no-deps torchxrayvision"


class OpenIFormatError(ValueError):
  """A report file that is not well-formed Open-i XML."""


@dataclasses.dataclass(frozen=True)
class OpenIReport:
  """One Open-i report. `file` is its name inside the archive, e.g. "ecgen-radiology/1.xml"."""

  uid: str
  file: str
  comparison: str
  indication: str
  findings: str
  impression: str
  mesh_major: tuple[str, ...]
  mesh_minor: tuple[str, ...]
  images: tuple[str, ...]  # parentImage ids, e.g. "CXR1_1_IM-0001-3001" (PNG names)

  @property
  def mesh(self) -> tuple[str, ...]:
    return self.mesh_major + self.mesh_minor

  @property
  def text(self) -> str:
    """The report as the model reads it: FINDINGS then IMPRESSION, empty sections left out."""
    parts = [
      f"FINDINGS: {self.findings}" if self.findings else "",
      f"IMPRESSION: {self.impression}" if self.impression else "",
    ]
    return "\n".join(p for p in parts if p)


@dataclasses.dataclass(frozen=True)
class OpenIReports:
  """Parsed archive: usable reports (in file-number order) and the files skipped as empty."""

  reports: tuple[OpenIReport, ...]
  skipped: tuple[str, ...]  # files with neither FINDINGS nor IMPRESSION


def package_data_dir(package: str = PACKAGE) -> Path:
  """The `data/` folder of an installed package, found without importing it."""
  spec = importlib.util.find_spec(package)
  if spec is None or not (spec.origin or spec.submodule_search_locations):
    raise FileNotFoundError(
      f"the Open-i reports and lung masks ship inside the {package!r} package, which is not "
      f"installed. Install its data files (no dependencies needed) with: {INSTALL_HINT}"
    )
  if spec.origin:
    root = Path(spec.origin).parent
  else:
    root = Path(next(iter(spec.submodule_search_locations)))
  data = root / "data"
  if not data.is_dir():
    raise FileNotFoundError(
      f"{package!r} is installed at {root} but has no data/ folder; reinstall it with: "
      f"{INSTALL_HINT} --force-reinstall"
    )
  return data


def default_reports_path() -> Path:
  """Path of `NLMCXR_reports.tgz` inside the installed torchxrayvision package."""
  path = package_data_dir() / REPORTS_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_HINT} --force-reinstall")
  return path


def _text(e: ET.Element | None) -> str:
  return " ".join((e.text or "").split()) if e is not None else ""


def parse_report(data: bytes | str, name: str = "<report>") -> OpenIReport:
  """Parses one report file's XML; `name` (the file name) is used in errors and kept as `file`."""
  try:
    root = ET.fromstring(data)
  except ET.ParseError as e:
    raise OpenIFormatError(f"{name}: malformed Open-i report XML ({e})") from None
  if root.tag != "eCitation":
    raise OpenIFormatError(
      f"{name}: not an Open-i report (root element <{root.tag}>, expected <eCitation>)"
    )
  sections = {a.get("Label", "").upper(): _text(a) for a in root.iter("AbstractText")}
  uid = root.find("uId")
  mesh = root.find("MeSH")
  return OpenIReport(
    uid=uid.get("id", "") if uid is not None else Path(name).stem,
    file=name,
    comparison=sections.get("COMPARISON", ""),
    indication=sections.get("INDICATION", ""),
    findings=sections.get("FINDINGS", ""),
    impression=sections.get("IMPRESSION", ""),
    mesh_major=tuple(_text(m) for m in mesh.iter("major")) if mesh is not None else (),
    mesh_minor=tuple(_text(m) for m in mesh.iter("minor")) if mesh is not None else (),
    images=tuple(p.get("id", "") for p in root.iter("parentImage")),
  )


def _file_number(name: str) -> tuple[int, str]:
  stem = Path(name).stem
  return (int(stem), name) if stem.isdigit() else (1 << 30, name)


def load_reports(path: str | Path | None = None) -> OpenIReports:
  """Parses every `*.xml` in the archive once per process (cached on the resolved path);
  `path=None` reads the archive inside torchxrayvision.

  Reports with neither FINDINGS nor IMPRESSION are skipped and listed in `skipped`.
  """
  path = Path(path) if path is not None else default_reports_path()
  if not path.is_file():
    raise FileNotFoundError(
      f"Open-i report archive {path} not found; the default one ships with "
      f"torchxrayvision ({INSTALL_HINT})"
    )
  stat = path.stat()  # a rewritten file is parsed again
  return _load_reports(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _load_reports(resolved: str, mtime_ns: int, size: int) -> OpenIReports:
  del mtime_ns, size  # cache key only
  path = Path(resolved)
  if not path.is_file():
    raise FileNotFoundError(
      f"Open-i report archive {path} not found; the default one ships with "
      f"torchxrayvision ({INSTALL_HINT})"
    )
  reports, skipped = [], []
  try:
    with tarfile.open(path) as tar:
      for member in tar:
        if not (member.isfile() and member.name.endswith(".xml")):
          continue
        report = parse_report(tar.extractfile(member).read(), member.name)
        (reports if report.findings or report.impression else skipped).append(report)
  except (tarfile.TarError, EOFError, OSError) as e:
    raise OpenIFormatError(
      f"{path}: cannot read the report archive ({e}); reinstall with: "
      f"{INSTALL_HINT} --force-reinstall"
    ) from None
  reports.sort(key=lambda r: _file_number(r.file))
  return OpenIReports(tuple(reports), tuple(sorted((r.file for r in skipped), key=_file_number)))


# MeSH term (the part before the first "/") -> finding. Modifiers give side, zone, severity.
MESH_FINDINGS = {
  "Cardiomegaly": "Cardiomegaly",
  "Cardiac Shadow": "Cardiomegaly",  # only with "enlarged" or "borderline"
  "Pleural Effusion": "Pleural Effusion",
  "Pulmonary Atelectasis": "Atelectasis",
  "Opacity": "Consolidation",  # lung opacities; "round" -> Nodule, "streaky" -> Atelectasis
  "Density": "Consolidation",
  "Airspace Disease": "Consolidation",
  "Infiltrate": "Consolidation",
  "Consolidation": "Consolidation",
  "Pneumonia": "Pneumonia",
  "Pulmonary Edema": "Edema",
  "Pulmonary Congestion": "Edema",
  "Pneumothorax": "Pneumothorax",
  "Hydropneumothorax": "Pneumothorax",
  "Hemopneumothorax": "Pneumothorax",
  "Nodule": "Nodule",
  "Mass": "Nodule",
  "Calcified Granuloma": "Calcified Granuloma",
  "Granuloma": "Calcified Granuloma",
  "Granulomatous Disease": "Calcified Granuloma",
  "Catheters, Indwelling": "Support Devices",
  "Implanted Medical Device": "Support Devices",
  "Tube, Inserted": "Support Devices",
  "Medical Device": "Support Devices",
}
_DEVICE_KIND = {
  "Catheters, Indwelling": "central venous catheter",
  "Implanted Medical Device": "pacemaker",
  "Tube, Inserted": "endotracheal tube",
  "Medical Device": "ecg leads",
}
_OPACITIES = ("Opacity", "Density", "Airspace Disease", "Infiltrate", "Consolidation")
# Modifiers that put a lesion or device outside the lung fields we draw: such terms are ignored.
NON_LUNG_SITES = frozenset(
  {
    "ribs",
    "thoracic vertebrae",
    "lumbar vertebrae",
    "cervical vertebrae",
    "spine",
    "clavicle",
    "sternum",
    "breast",
    "mediastinum",
    "paratracheal",
    "heart",
    "mitral valve",
    "aortic valve",
    "adipose tissue",
    "abdomen",
    "humerus",
    "shoulder",
    "pleura",
    "aorta",
    "trachea",
    "neck",
  }
)
_ZONE_WORDS = {
  "base": "lower",
  "lower lobe": "lower",
  "retrocardiac": "lower",
  "costophrenic angle": "lower",
  "middle lobe": "middle",
  "lingula": "middle",
  "hilum": "middle",
  "upper lobe": "upper",
  "apex": "upper",
}
_SEVERITY_WORDS = {
  "mild": "mild",
  "small": "mild",
  "borderline": "mild",
  "minimal": "mild",
  "trace": "mild",
  "moderate": "moderate",
  "severe": "severe",
  "large": "severe",
  "extensive": "severe",
  "massive": "severe",
}


def map_mesh_term(term: str) -> dict | None:
  """What one MeSH term says in finding terms, or None if the mapping ignores it.

  Returns {"name", "side", "zone", "severity", "count", "device"}, with None where the term does
  not say (side / zone / severity are filled in by `mesh_to_findings`).
  """
  parts = [p.strip().lower() for p in term.split("/")]
  head, mods = term.split("/")[0].strip(), set(parts[1:])
  name = MESH_FINDINGS.get(head)
  if name is None:
    return None
  if head == "Cardiac Shadow" and not mods & {"enlarged", "borderline"}:
    return None
  if mods & NON_LUNG_SITES and name != "Cardiomegaly":
    return None
  if head in _OPACITIES:
    if "interstitial" in mods:
      return None  # interstitial patterns (fibrosis, chronic change) are not drawn
    if (
      head in ("Opacity", "Density")
      and mods - {"round"}
      and not mods & {"lung", "retrocardiac", "pulmonary alveoli"}
    ):
      return None
    if "round" in mods:
      name = "Nodule"
    elif "streaky" in mods:
      name = "Atelectasis"
  sides = [s for s in ("bilateral", "right", "left") if s in mods]
  zones = [_ZONE_WORDS[m] for m in parts[1:] if m in _ZONE_WORDS]
  severities = [_SEVERITY_WORDS[m] for m in parts[1:] if m in _SEVERITY_WORDS]
  if head == "Mass":
    severities = ["severe"]
  return {
    "name": name,
    "side": sides[0] if sides else None,
    "zone": zones[0] if zones else ("lower" if "retrocardiac" in mods else None),
    "severity": severities[0] if severities else None,
    "count": 3 if "multiple" in mods or "scattered" in mods else 1,
    "device": _DEVICE_KIND.get(head),
  }


def mesh_to_findings(terms: Iterable[str], rng: np.random.Generator) -> tuple[Finding, ...]:
  """Phantom findings that show what the MeSH terms state.

  What a term leaves unsaid is drawn from `rng`: severity (mild or moderate), side (right, left
  or bilateral) and zone. Retrocardiac opacities are on the left; edema is bilateral.
  """
  out: list[Finding] = []
  for term in terms:
    m = map_mesh_term(term)
    if m is None:
      continue
    name = m["name"]
    severity = m["severity"] or ("mild", "moderate")[int(rng.integers(2))]
    side, zone = m["side"], m["zone"]
    if name in ("Cardiomegaly", "Support Devices"):
      side, zone = None, None
    elif name == "Edema":
      side, zone = "bilateral", None
    else:
      if "retrocardiac" in term.lower():
        side = "left"
      side = side or ("right", "left", "bilateral")[int(rng.integers(3))]
      if name in ("Pleural Effusion", "Pneumothorax"):
        zone = None
      else:
        zone = zone or ("lower" if name == "Atelectasis" else ZONES[int(rng.integers(3))])
    if name in ("Nodule", "Calcified Granuloma") and side == "bilateral" and m["count"] == 1:
      side = ("right", "left")[int(rng.integers(2))]
    f = Finding(name, side=side, zone=zone, severity=severity, count=m["count"], device=m["device"])
    if f not in out:
      out.append(f)
  return tuple(out)


def supported_findings(terms: Sequence[str]) -> set[str]:
  """Finding names the mapping derives from `terms` (what the rendered labels must include)."""
  return {m["name"] for m in map(map_mesh_term, terms) if m is not None}


def labels_from_mesh(terms: Sequence[str]) -> np.ndarray:
  """CheXpert-style labels float32 (F,) of a report's MeSH terms ("No Finding" when none map)."""
  return findings_lib.labels_from_names(supported_findings(terms))


SPLIT_PERCENT = (("train", 80), ("validation", 90), ("test", 100))


def report_split(report_file: str, seed: int = 0) -> str:
  """train / validation / test (80 / 10 / 10) for a report file name such as "1.xml".

  A stable hash of (seed, name): a report's split does not depend on which others exist, and
  it is the same rule the TFDS Open-i builder uses, so phantom and real splits agree.
  """
  digest = hashlib.sha256(f"{seed}:{Path(report_file).name}".encode()).hexdigest()
  bucket = int(digest, 16) % 100
  return next(split for split, limit in SPLIT_PERCENT if bucket < limit)


assert set(_SEVERITY_WORDS.values()) <= set(SEVERITIES)
