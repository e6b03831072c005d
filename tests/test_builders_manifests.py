"""Sample and split definitions checked on the real label files shipped in torchxrayvision.

The package is installed for its data/ folder only; it is located, never imported.
"""

import importlib.util
import zipfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from medunifier_jax.data.builders import chexpert_5x200, common, rsna_pneumonia, siim_pneumothorax


@pytest.fixture(scope="module")
def xrv_data() -> Path:
  spec = importlib.util.find_spec("torchxrayvision")
  if spec is None or not spec.submodule_search_locations:
    pytest.skip("torchxrayvision (data files) is not installed; `make install` adds it")
  return Path(next(iter(spec.submodule_search_locations))) / "data"


@pytest.fixture(scope="module")
def chexpert_rows(xrv_data):
  return common.read_csv(xrv_data / "chexpert_train.csv.gz", chexpert_5x200.COLUMNS)


@pytest.mark.parametrize("class_set", ["gloria", "pneumonia"])
def test_chexpert_5x200_manifest_meets_its_definition(chexpert_rows, class_set):
  classes = chexpert_5x200.CLASS_SETS[class_set]
  manifest = chexpert_5x200.chexpert_manifest(chexpert_rows, classes, seed=0, per_class=200)
  assert Counter(r["class_name"] for r in manifest) == {c: 200 for c in classes}
  assert len({r["Path"] for r in manifest}) == 1000  # no image twice
  by_path = {r["Path"]: r for r in chexpert_rows}
  for row in manifest:
    source = by_path[row["Path"]]  # the row as it is in train.csv
    assert source["Frontal/Lateral"] == "Frontal"
    assert source[classes[row["label"]]] == "1.0"
    for other in classes:
      if other != classes[row["label"]]:
        assert source[other] in ("0.0", ""), (row["Path"], other, source[other])


def test_chexpert_5x200_is_seeded_and_order_free(chexpert_rows):
  classes = chexpert_5x200.CLASS_SETS["gloria"]
  frontal = [r for r in chexpert_rows if r["Frontal/Lateral"] == "Frontal"]
  keys = [r["Path"] for r in frontal]
  labels = chexpert_5x200.label_matrix(frontal, classes)
  draw = lambda keys, labels, seed: chexpert_5x200.draw_5x200(  # noqa: E731
    keys, labels, classes, seed=seed, per_class=200
  )
  first = draw(keys, labels, 0)
  assert draw(keys[::-1], labels[::-1], 0) == first  # file order does not matter
  again = {k for k, _ in draw(keys, labels, 1)}
  assert len(again & {k for k, _ in first}) < 500  # another seed, another sample


def test_draw_5x200_names_the_short_class():
  labels = np.array([[1, 0], [1, np.nan], [0, 1], [-1, 1]], np.float32)
  drawn = chexpert_5x200.draw_5x200(["a", "b", "c", "d"], labels, ["A", "B"], seed=0, per_class=1)
  assert drawn[0][0] in ("a", "b") and drawn[1] == ("c", 1)  # "d" is uncertain for A
  with pytest.raises(ValueError, match="only 1 candidate images for 'B'"):
    chexpert_5x200.draw_5x200(["a", "b", "c", "d"], labels, ["A", "B"], seed=0, per_class=2)


def test_rsna_split_keeps_patients_whole(xrv_data):
  with zipfile.ZipFile(xrv_data / "kaggle_stage_2_train_labels.csv.zip") as z:
    assert z.namelist() == [rsna_pneumonia.LABELS_CSV]
  rows = common.read_csv(xrv_data / "kaggle_stage_2_train_labels.csv.zip", rsna_pneumonia.COLUMNS)
  labels = rsna_pneumonia.patient_labels(rows)
  split = rsna_pneumonia.split_patients(list(labels), seed=0)
  assert split == rsna_pneumonia.split_patients(list(labels)[::-1], seed=0)
  splits_of_patient = defaultdict(set)
  for row in rows:  # every box row of a patient lands in its patient's split
    splits_of_patient[row["patientId"]].add(split[row["patientId"]])
    assert labels[row["patientId"]] >= int(row["Target"])
  assert all(len(s) == 1 for s in splits_of_patient.values())
  sizes = Counter(split.values())
  n = len(labels)
  assert n == 26684 and sum(labels.values()) == 6012
  assert abs(sizes["train"] / n - 0.70) < 0.001
  assert abs(sizes["validation"] / n - 0.15) < 0.001 and abs(sizes["test"] / n - 0.15) < 0.001


def test_siim_labels_follow_the_rle_column_and_split_is_stratified(xrv_data):
  rows = common.read_csv(xrv_data / "siim-pneumothorax-train-rle.csv.gz", siim_pneumothorax.COLUMNS)
  labels = siim_pneumothorax.image_labels(rows)
  masks = defaultdict(list)
  for row in rows:
    masks[row["ImageId"]].append(row["EncodedPixels"])
  for image_id, rle in masks.items():
    assert labels[image_id] == int(any(r != "-1" for r in rle))
    if labels[image_id] == 0:
      assert rle == ["-1"]
  split = siim_pneumothorax.split_images(labels)  # seed 5, as the paper's code
  assert siim_pneumothorax.SPLIT_SEED == 5
  n, positive = len(labels), sum(labels.values())
  assert set(split) == set(labels)
  for name, share in (("train", 0.81), ("validation", 0.09), ("test", 0.10)):
    ids = [i for i, s in split.items() if s == name]
    assert abs(len(ids) / n - share) < 0.002, name
    assert abs(sum(labels[i] for i in ids) / len(ids) - positive / n) < 0.005, name


def test_read_csv_names_file_and_expected_columns(tmp_path):
  path = tmp_path / "stage_2_train_labels.csv"
  path.write_text("patient,x,y,width,height,Target\n1,,,,,0\n")
  with pytest.raises(common.LayoutError) as e:
    common.read_csv(path, rsna_pneumonia.COLUMNS)
  assert str(path) in str(e.value) and "'patientId'" in str(e.value)
