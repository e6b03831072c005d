"""Phantom data sets that mirror each downstream task, registered by name.

  phantom_openi         pre-training pairs: phantoms drawn from the real Open-i reports' MeSH
                        terms, paired with those reports (split by report, 80/10/10), mixed with
                        templated-report phantoms (`data.templated_fraction`).
  phantom_5x200         zero-shot / retrieval: `data.num_per_class_5x200` per class, each image
                        positive for exactly one of the five CheXpert 5x200 classes.
  phantom_pneumonia     binary, RSNA-like (Normal / Pneumonia).
  phantom_pneumothorax  binary, SIIM-like (No Pneumothorax / Pneumothorax).
  phantom_covidx        3 classes, COVIDx-like (Normal / Pneumonia / COVID-19).

Sources are random access and cheap to build: nothing is rendered until `__getitem__`, and each
example is a pure function of (data.phantom_seed, set, split, index). Records follow
docs/ARCHITECTURE.md ("Batches"); `example(i)` also returns the drawn findings (side, zone,
severity), and `reports` lists every report without rendering an image.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from medunifier_jax.data import findings as findings_lib
from medunifier_jax.data import openi, phantoms, registry, reports
from medunifier_jax.data.phantoms import Finding

SPLITS = {"train": 0, "val": 1, "validation": 1, "test": 2}
# Defaults for data-config fields a caller's config may lack (configs/pretrain.py sets them all).
DEFAULTS = {
  "image_size": 224,
  "phantom_seed": 0,
  "templated_fraction": 0.5,
  "num_train": 20000,
  "num_val": 500,
  "num_test": 500,
  "openi_split_seed": 0,
  "phantom_normal_fraction": 0.3,
  "num_per_class_5x200": 200,
  "cls_num_train": 2000,
  "cls_num_val": 200,
  "cls_num_test": 500,
  "cls_positive_fraction": 0.5,
  "openi_reports_path": "",  # empty: the archive inside the torchxrayvision package
}


def _cfg(data_config: Any, name: str):
  value = getattr(data_config, name, None) if data_config is not None else None
  return DEFAULTS[name] if value is None else value


def _split_code(split: str) -> int:
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLITS)}")
  return SPLITS[split]


def _split_size(data_config: Any, split: str, prefix: str = "num") -> int:
  code = _split_code(split)
  n = int(_cfg(data_config, f"{prefix}_{('train', 'val', 'test')[code]}"))
  if n < 0:
    raise ValueError(f"data.{prefix}_* sizes must be >= 0, got {n} for split {split!r}")
  return n


def _is_marked(i: int, fraction: float) -> bool:
  """Evenly interleaved selection: exactly round-down(n * fraction) of the first n are marked."""
  return int((i + 1) * fraction + 1e-9) > int(i * fraction + 1e-9)


def _marked_before(i: int, fraction: float) -> int:
  return int(i * fraction + 1e-9)


@dataclasses.dataclass(frozen=True)
class Example:
  """One example with everything known about it; `record()` is what sources return."""

  phantom: phantoms.Phantom
  report: str
  label: int | None
  id: str

  def record(self) -> dict:
    out = {
      "image": self.phantom.image,
      "report": self.report,
      "labels": self.phantom.labels,
      "id": self.id,
    }
    if self.label is not None:
      out["label"] = self.label
    return out


@dataclasses.dataclass(frozen=True)
class _Plan:
  findings: tuple[Finding, ...]
  report: str
  label: int | None
  id: str


class PhantomSource:
  """Random-access phantom source: `len`, `[i]` -> record, `example(i)`, `reports`.

  Subclasses implement `_plan(i, rng)`: the findings, report, label and id of example i, drawn
  from `rng` (seeded by (seed, set, split, i)); the image is rendered from the plan with its own
  stream, so reports can be listed without rendering.
  """

  set_code = 0
  class_names: tuple[str, ...] | None = None

  def __init__(self, name: str, split: str, size: int, length: int, seed: int):
    if size < 16:
      raise ValueError(f"data.image_size must be at least 16 for phantoms, got {size}")
    self.name, self.split, self.size, self.length = name, split, int(size), int(length)
    self.stream = (int(seed), self.set_code, _split_code(split))

  def __len__(self) -> int:
    return self.length

  def _plan(self, i: int, rng: np.random.Generator) -> _Plan:
    raise NotImplementedError

  def plan(self, i: int) -> _Plan:
    if not 0 <= i < self.length:
      raise IndexError(f"index {i} out of range for {self.name}/{self.split} of {self.length}")
    return self._plan(i, np.random.default_rng([*self.stream, i, 1]))

  def example(self, i: int) -> Example:
    i = int(i)
    p = self.plan(i)
    phantom = phantoms.make_phantom(self.stream, i, self.size, p.findings)
    return Example(phantom=phantom, report=p.report, label=p.label, id=p.id)

  def __getitem__(self, i: int) -> dict:
    return self.example(i).record()

  @functools.cached_property
  def reports(self) -> tuple[str, ...]:
    """Every report in index order (no image is rendered)."""
    return tuple(self.plan(i).report for i in range(self.length))

  def __getstate__(self):
    # Caches are rebuilt after unpickling (grain worker processes), not shipped.
    state = dict(self.__dict__)
    for cached in ("reports", "openi_reports"):
      state.pop(cached, None)
    return state

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.name}/{self.split}, n={self.length}, size={self.size})"


class PhantomOpenISource(PhantomSource):
  """Pre-training pairs: Open-i reports with phantoms that show their MeSH findings, mixed
  evenly with templated-report phantoms (`templated_fraction` of them)."""

  set_code = 1

  def __init__(self, split: str, data_config: Any):
    super().__init__(
      "phantom_openi",
      split,
      _cfg(data_config, "image_size"),
      _split_size(data_config, split),
      _cfg(data_config, "phantom_seed"),
    )
    self.templated_fraction = float(_cfg(data_config, "templated_fraction"))
    if not 0.0 <= self.templated_fraction <= 1.0:
      raise ValueError(f"data.templated_fraction must be in [0, 1], got {self.templated_fraction}")
    self.normal_fraction = float(_cfg(data_config, "phantom_normal_fraction"))
    self.split_seed = int(_cfg(data_config, "openi_split_seed"))
    self.reports_path = str(_cfg(data_config, "openi_reports_path")) or None
    self.report_split = {0: "train", 1: "validation", 2: "test"}[self.stream[2]]

  @functools.cached_property
  def openi_reports(self) -> tuple[openi.OpenIReport, ...]:
    """The Open-i reports of this split (parsed once per process)."""
    parsed = openi.load_reports(self.reports_path)
    mine = tuple(
      r for r in parsed.reports if openi.report_split(r.file, self.split_seed) == self.report_split
    )
    if not mine:
      raise ValueError(f"no Open-i reports fall in split {self.split!r}")
    return mine

  def _plan(self, i: int, rng: np.random.Generator) -> _Plan:
    if _is_marked(i, self.templated_fraction):
      found = phantoms.sample_findings(rng, self.normal_fraction)
      return _Plan(
        found, reports.templated_report(found, rng), None, f"{self.name}/{self.split}/{i}:templated"
      )
    j = i - _marked_before(i, self.templated_fraction)
    r = self.openi_reports[j % len(self.openi_reports)]
    found = openi.mesh_to_findings(r.mesh, rng)
    return _Plan(found, r.text, None, f"{self.name}/{self.split}/{i}:{r.uid}")


class ClassSource(PhantomSource):
  """A classification set with templated reports; subclasses draw each class's findings."""

  def __init__(self, name: str, split: str, data_config: Any, length: int):
    super().__init__(
      name, split, _cfg(data_config, "image_size"), length, _cfg(data_config, "phantom_seed")
    )

  def _draw(self, i: int, rng: np.random.Generator) -> tuple[int, tuple[Finding, ...]]:
    raise NotImplementedError

  def _plan(self, i: int, rng: np.random.Generator) -> _Plan:
    label, found = self._draw(i, rng)
    found = tuple(sorted(found, key=lambda f: findings_lib.finding_index(f.name)))
    return _Plan(
      found,
      reports.templated_report(found, rng),
      label,
      f"{self.name}/{self.split}/{i}:{self.class_names[label]}",
    )


class FiveBy200Source(ClassSource):
  """Each image positive for exactly one of the 5x200 classes (interleaved: class = i % 5)."""

  set_code = 2
  class_names = findings_lib.CLASSES_5X200

  def __init__(self, split: str, data_config: Any):
    n = int(_cfg(data_config, "num_per_class_5x200")) * len(self.class_names)
    super().__init__("phantom_5x200", split, data_config, n)

  def _draw(self, i, rng):
    c = i % len(self.class_names)
    return c, (phantoms.sample_finding(self.class_names[c], rng),)


class BinarySource(ClassSource):
  """Positives carry `target`; both classes may carry one other finding, so the task cannot be
  solved by "anything abnormal"."""

  target = ""
  others: tuple[str, ...] = ()

  def __init__(self, name: str, split: str, data_config: Any):
    super().__init__(name, split, data_config, _split_size(data_config, split, "cls_num"))
    self.positive_fraction = float(_cfg(data_config, "cls_positive_fraction"))
    if not 0.0 <= self.positive_fraction <= 1.0:
      raise ValueError(
        f"data.cls_positive_fraction must be in [0, 1], got {self.positive_fraction}"
      )

  def _extra(self, rng: np.random.Generator, p: float) -> tuple[Finding, ...]:
    if rng.random() >= p:
      return ()
    return (phantoms.sample_finding(self.others[int(rng.integers(len(self.others)))], rng),)

  def _draw(self, i, rng):
    if _is_marked(i, self.positive_fraction):
      return 1, (phantoms.sample_finding(self.target, rng), *self._extra(rng, 0.3))
    return 0, self._extra(rng, 0.4)


class PneumoniaSource(BinarySource):
  """RSNA-like: Normal / Pneumonia (negatives never show an airspace opacity)."""

  set_code = 3
  class_names = findings_lib.CLASSES_PNEUMONIA
  target = "Pneumonia"
  others = (
    "Atelectasis",
    "Cardiomegaly",
    "Pleural Effusion",
    "Nodule",
    "Calcified Granuloma",
    "Support Devices",
    "Edema",
    "Pneumothorax",
  )

  def __init__(self, split: str, data_config: Any):
    super().__init__("phantom_pneumonia", split, data_config)


class PneumothoraxSource(BinarySource):
  """SIIM-like: No Pneumothorax / Pneumothorax."""

  set_code = 4
  class_names = findings_lib.CLASSES_PNEUMOTHORAX
  target = "Pneumothorax"
  others = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Pleural Effusion",
    "Pneumonia",
    "Nodule",
    "Calcified Granuloma",
    "Support Devices",
    "Edema",
  )

  def __init__(self, split: str, data_config: Any):
    super().__init__("phantom_pneumothorax", split, data_config)


class CovidxSource(ClassSource):
  """COVIDx-like: Normal / Pneumonia (focal) / COVID-19 (bilateral peripheral), class = i % 3."""

  set_code = 5
  class_names = findings_lib.CLASSES_COVIDX

  def __init__(self, split: str, data_config: Any):
    super().__init__(
      "phantom_covidx", split, data_config, _split_size(data_config, split, "cls_num")
    )

  def _draw(self, i, rng):
    c = i % 3
    return c, (() if c == 0 else (phantoms.sample_finding(self.class_names[c], rng),))


registry.register("phantom_openi", PhantomOpenISource)
registry.register("phantom_5x200", FiveBy200Source)
registry.register("phantom_pneumonia", PneumoniaSource)
registry.register("phantom_pneumothorax", PneumothoraxSource)
registry.register("phantom_covidx", CovidxSource)
