"""Derived phantom sets: registered names and the record contract, class construction, split
by report, determinism, and report / label agreement."""

import importlib.util
import pickle

import ml_collections
import numpy as np
import pytest

from configs import pretrain
from medunifier_jax.data import findings as F
from medunifier_jax.data import openi, registry, reports, sets

SETS = (
  "phantom_openi",
  "phantom_5x200",
  "phantom_pneumonia",
  "phantom_pneumothorax",
  "phantom_covidx",
)
needs_archive = pytest.mark.skipif(
  importlib.util.find_spec("torchxrayvision") is None,
  reason="torchxrayvision (data only) not installed: pip install --no-deps torchxrayvision",
)


def _config(**overrides):
  c = ml_collections.ConfigDict(pretrain.get_config("tiny").data.to_dict())
  c.image_size = 32
  c.num_per_class_5x200 = 12
  c.cls_num_train, c.cls_num_val, c.cls_num_test = 60, 20, 30
  c.templated_fraction = 1.0  # Open-i tests below opt in
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


@pytest.mark.parametrize("name", SETS)
def test_record_contract(name):
  cfg = _config()
  src = registry.get_source(name, "train", cfg)
  expected = {"phantom_openi": cfg.num_train, "phantom_5x200": 60}.get(name, cfg.cls_num_train)
  assert len(src) == expected
  for i in (0, len(src) - 1):
    r = src[i]
    assert r["image"].shape == (32, 32) and r["image"].dtype == np.uint8
    assert r["labels"].shape == (F.NUM_FINDINGS,) and r["labels"].dtype == np.float32
    assert isinstance(r["report"], str) and r["report"].startswith("FINDINGS:")
    assert isinstance(r["id"], str) and name in r["id"]
    if name == "phantom_openi":
      assert "label" not in r and src.class_names is None
    else:
      assert 0 <= r["label"] < len(src.class_names)
  with pytest.raises(IndexError):
    src[len(src)]


@pytest.mark.parametrize("name", SETS)
def test_deterministic_picklable_and_split_dependent(name):
  cfg = _config()
  a, b = registry.get_source(name, "val", cfg), registry.get_source(name, "val", cfg)
  c = pickle.loads(pickle.dumps(a))
  for i in (3, 1, 3):
    ra, rb, rc = a[i], b[i], c[i]
    np.testing.assert_array_equal(ra["image"], rb["image"])
    np.testing.assert_array_equal(ra["image"], rc["image"])
    assert ra["report"] == rb["report"] == rc["report"] and ra["id"] == rb["id"]
  other = registry.get_source(name, "test", cfg)
  assert not np.array_equal(a[3]["image"], other[3]["image"])


def test_5x200_has_exactly_one_of_five_per_image():
  src = registry.get_source("phantom_5x200", "test", _config())
  idx = [F.finding_index(c) for c in F.CLASSES_5X200]
  counts = np.zeros(5, int)
  for i in range(len(src)):
    r = src.example(i)
    five = r.phantom.labels[idx]
    assert five.sum() == 1 and five[r.label] == 1
    assert F.names_from_labels(r.phantom.labels) == (F.CLASSES_5X200[r.label],)
    counts[r.label] += 1
  assert (counts == 12).all()


@pytest.mark.parametrize(
  "name,target", [("phantom_pneumonia", "Pneumonia"), ("phantom_pneumothorax", "Pneumothorax")]
)
def test_binary_sets(name, target):
  src = registry.get_source(name, "train", _config(cls_positive_fraction=0.25))
  labels = np.array([src.example(i).label for i in range(len(src))])
  targets = np.array([src.example(i).phantom.labels[F.finding_index(target)] for i in range(60)])
  np.testing.assert_array_equal(labels, targets)
  assert labels.sum() == 15  # exactly the configured share, evenly interleaved
  # Negatives are not all normal, so "anything abnormal" does not solve the task.
  negatives = [src.example(i).phantom.labels for i in np.flatnonzero(labels == 0)]
  assert 0 < sum(lab[F.finding_index("No Finding")] == 0 for lab in negatives) < len(negatives)


def test_covidx_classes():
  src = registry.get_source("phantom_covidx", "test", _config())
  for i in range(len(src)):
    e = src.example(i)
    names = F.names_from_labels(e.phantom.labels)
    assert names == (("No Finding",), ("Pneumonia",), ("COVID-19",))[e.label]
    if e.label == 2:
      assert e.phantom.findings[0].side == "bilateral"  # peripheral opacities on both sides


def test_set_reports_never_contradict_labels():
  for name in SETS[1:]:
    src = registry.get_source(name, "train", _config())
    for i in range(len(src)):
      e = src.example(i) if i < 5 else None
      plan = src.plan(i)
      positive, negative = reports.mentioned_findings(plan.report)
      drawn = {f.name for f in plan.findings}
      assert positive == drawn and not negative & drawn, plan.report
      if e is not None:
        assert e.report == plan.report
  src = registry.get_source("phantom_covidx", "val", _config())
  assert src.reports == tuple(src[i]["report"] for i in range(len(src)))


def test_templated_fraction_interleaves_exactly():
  src = registry.get_source("phantom_openi", "train", _config(templated_fraction=0.3))
  marked = [sets._is_marked(i, 0.3) for i in range(len(src))]
  assert sum(marked) == int(len(src) * 0.3)
  assert max(map(len, "".join("x" if m else "." for m in marked).split("x"))) <= 3


def test_bad_split_and_config_values_name_the_fix():
  with pytest.raises(ValueError, match="unknown split 'dev'"):
    registry.get_source("phantom_covidx", "dev", _config())
  with pytest.raises(ValueError, match="templated_fraction must be in"):
    registry.get_source("phantom_openi", "train", _config(templated_fraction=1.5))
  with pytest.raises(ValueError, match="image_size must be at least 16"):
    registry.get_source("phantom_covidx", "train", _config(image_size=8))


@needs_archive
def test_openi_split_by_report_and_labels_follow_mesh():
  cfg = _config(templated_fraction=0.5)
  by_split = {}
  for split in ("train", "val", "test"):
    src = registry.get_source("phantom_openi", split, cfg)
    by_split[split] = {r.uid for r in src.openi_reports}
    for i in range(0, min(40, len(src)), 2):  # even indices are Open-i examples at fraction 0.5
      e = src.example(i)
      uid = e.id.rsplit(":", 1)[1]
      report = next(r for r in src.openi_reports if r.uid == uid)
      assert e.report == report.text
      labels = set(F.names_from_labels(e.phantom.labels))
      assert labels - {"No Finding"} == openi.supported_findings(report.mesh)
      np.testing.assert_array_equal(e.phantom.labels, openi.labels_from_mesh(report.mesh))
  assert not by_split["train"] & by_split["val"]
  assert not by_split["train"] & by_split["test"]
  assert not by_split["val"] & by_split["test"]
  total = sum(map(len, by_split.values()))
  assert total == len(openi.load_reports().reports)
  assert abs(len(by_split["train"]) / total - 0.8) < 0.03


def test_contact_sheet_writes_a_png(tmp_path):
  from PIL import Image

  from medunifier_jax.data import rendering

  out = tmp_path / "sheet.png"
  ids = rendering.write_contact_sheet(str(out), "phantom_covidx", "val", n=3, size=32)
  assert ids == [f"phantom_covidx/val/{i}:{c}" for i, c in enumerate(F.CLASSES_COVIDX)]
  with Image.open(out) as im:
    assert im.size[0] > 300 and im.size[1] > 300
  with pytest.raises(ValueError, match="does not fit"):
    rendering.write_contact_sheet(str(out), "phantom_covidx", "val", n=10**6, size=32)
