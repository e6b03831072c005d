"""Each builder built from a tiny directory tree in its data set's published layout.

File names, CSV headers and compression follow the real releases; images are phantom
radiographs written as JPEG, PNG or DICOM (JPEG-baseline and uncompressed) as the real sets
have them. Every tree holds one or more broken inputs, which must be skipped and named.
"""

import csv
import gzip
import importlib.util
import io
import pickle
import re
import tarfile
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import pretrain
from medunifier_jax.data import findings as findings_lib
from medunifier_jax.data import pipeline, registry
from medunifier_jax.data import tokenizer as tokenizer_lib
from medunifier_jax.data.builders import BUILDERS, common, mimic_cxr, siim_pneumothorax
from medunifier_jax.data.phantoms import make_phantom
from medunifier_jax.data.preparation import prepare, run_command

SIZE = 32


def radiograph(index: int, shape=(48, 40)) -> np.ndarray:
  """A non-square uint8 phantom (H, W), distinct per index."""
  image = make_phantom(seed=7, index=index, size=max(shape)).image
  image = np.asarray(image)
  if image.dtype != np.uint8:
    image = np.asarray(np.clip(image * 255 if image.max() <= 1 else image, 0, 255), np.uint8)
  return image[: shape[0], : shape[1]]


def write_image(path: Path, image: np.ndarray, truncate: bool = False) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG" if path.suffix == ".png" else "JPEG")
  data = buffer.getvalue()
  path.write_bytes(data[: len(data) // 2] if truncate else data)


def write_csv(path: Path, header: list[str], rows: list[list], gz: bool = False) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  text = io.StringIO()
  writer = csv.writer(text, lineterminator="\n")
  writer.writerow(header)
  writer.writerows(rows)
  data = text.getvalue().encode()
  path.write_bytes(gzip.compress(data) if gz else data)


def write_dicom(path: Path, image: np.ndarray | None, jpeg: bool = False) -> None:
  """A chest radiograph DICOM (8-bit MONOCHROME2), JPEG-baseline or uncompressed; no pixel
  data when `image` is None."""
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.encaps import encapsulate
  from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = JPEGBaseline8Bit if jpeg else ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID = meta.MediaStorageSOPClassUID
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.PatientID = path.stem
  ds.Modality = "CR"
  ds.BodyPartExamined = "CHEST"
  if image is not None:
    ds.Rows, ds.Columns = image.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if jpeg:
      buffer = io.BytesIO()
      Image.fromarray(image).save(buffer, format="JPEG", quality=95)
      ds.PixelData = encapsulate([buffer.getvalue()])
      ds["PixelData"].VR = "OB"
      ds.LossyImageCompression = "01"
    else:
      ds.PixelData = image.tobytes()
  path.parent.mkdir(parents=True, exist_ok=True)
  ds.save_as(path, enforce_file_format=True)


def _xrv_data() -> Path:
  spec = importlib.util.find_spec("torchxrayvision")
  if spec is None or not spec.submodule_search_locations:
    pytest.skip("torchxrayvision (data files) is not installed; `make install` adds it")
  return Path(next(iter(spec.submodule_search_locations))) / "data"


# ---------------------------------------------------------------------------------------------
# Fake trees

MIMIC_SPLIT = ["dicom_id", "study_id", "subject_id", "split"]
MIMIC_METADATA = [
  "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
  "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
  "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning",
]  # fmt: skip
MIMIC_CHEXPERT = [
  "subject_id", "study_id", "Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
  "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion", "Lung Opacity", "No Finding",
  "Pleural Effusion", "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices",
]  # fmt: skip
MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough  // eval for pneumonia

 COMPARISON:  None.

 FINDINGS:

 There is {finding}.  The cardiomediastinal
 silhouette is normal.

 IMPRESSION:

 {impression}
"""

# (study, split, views, the single positive observation, defect)
MIMIC_STUDIES = [
  ("50000001", "train", ("PA", "LATERAL"), "Atelectasis", None),
  ("50000002", "train", ("AP",), "Cardiomegaly", None),
  ("50000003", "validate", ("PA",), "Consolidation", None),
  ("50000004", "test", ("PA",), "Edema", "truncated"),
  ("50000005", "test", ("PA",), "Pleural Effusion", "empty report"),
  ("50000006", "train", ("PA",), "Pneumonia", "missing image"),
  ("50000007", "train", ("PA",), "Atelectasis+uncertain Edema", None),
  ("50000008", "test", ("AP",), "Pneumothorax", None),
]


def make_mimic_tree(root: Path) -> dict[str, str]:
  """Returns {study_id: dicom_id of its frontal image}."""
  split_rows, meta_rows, label_rows, frontal = [], [], [], {}
  for k, (study, split, views, positive, defect) in enumerate(MIMIC_STUDIES):
    subject = f"1000000{k}"
    study_dir = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
    for v, view in enumerate(views):
      dicom = f"{k:08x}-{v:08x}-0000abcd-1234ef56-9abc0def"
      split_rows.append([dicom, study, subject, split])
      meta_rows.append(
        [
          dicom,
          subject,
          study,
          "CHEST (PA AND LAT)",
          view,
          48,
          40,
          21800506,
          213014.531,
          "CHEST (PA AND LAT)",
          "postero-anterior",
          "Erect",
        ]
      )
      if view != "LATERAL":
        frontal[study] = dicom
      if defect != "missing image":
        write_image(study_dir / f"{dicom}.jpg", radiograph(k), truncate=defect == "truncated")
    labels = {name: "" for name in MIMIC_CHEXPERT[2:]}
    first = positive.split("+")[0]
    labels[first] = "1.0"
    labels["No Finding"] = ""
    if "uncertain" in positive:
      labels["Edema"] = "-1.0"
    labels["Fracture"] = "0.0"
    label_rows.append([subject, study, *labels.values()])
    report = study_dir.parent / f"s{study}.txt"
    report.parent.mkdir(parents=True, exist_ok=True)
    if defect == "empty report":
      report.write_text(" EXAMINATION:  CHEST (PA AND LAT)\n\n INDICATION:  ___\n")
    else:
      report.write_text(
        MIMIC_REPORT.format(
          finding=f"{first.lower()} in study {study}", impression=f"{first}. No pneumothorax."
        )
      )
  write_csv(root / mimic_cxr.SPLIT_CSV, MIMIC_SPLIT, split_rows, gz=True)
  write_csv(root / mimic_cxr.METADATA_CSV, MIMIC_METADATA, meta_rows, gz=True)
  write_csv(root / mimic_cxr.CHEXPERT_CSV, MIMIC_CHEXPERT, label_rows, gz=True)
  return frontal


def make_chexpert_tree(root: Path) -> list[str]:
  """Two candidates per class (gloria set), a lateral and an uncertain row. Returns header."""
  header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *common.CHEXPERT_OBSERVATIONS]
  classes = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
  rows, n = [], 0
  specs = [(c, "Frontal", "1.0") for c in classes for _ in range(2)]
  specs += [("Edema", "Lateral", "1.0"), ("Cardiomegaly", "Frontal", "-1.0")]
  for cls, view, value in specs:
    n += 1
    path = f"CheXpert-v1.0-small/train/patient{n:05d}/study1/view1_{view.lower()}.jpg"
    labels = {o: "" for o in common.CHEXPERT_OBSERVATIONS}
    labels[cls] = value
    labels["Pneumothorax"] = "0.0"
    if value == "-1.0":
      labels["Atelectasis"] = "1.0"  # positive for one class but uncertain for another
    rows.append([path, "Female", 60 + n, view, "AP" if view == "Frontal" else "", *labels.values()])
    write_image(root / path, radiograph(100 + n))
  write_csv(root / "CheXpert-v1.0-small" / "train.csv", header, rows)
  return header


RSNA = [  # patientId, boxes (Target 1 rows), defect
  ("0004cfab-14fd-4e49-80ba-63a80b6bddd6", 0, None),
  ("00313ee0-9eaa-42f4-b0ab-c148ed3241cd", 0, None),
  ("00322d4d-1c29-4943-afc9-b6754be640eb", 2, None),
  ("003d8fa0-6bf1-40ed-b54c-ac657f8495c5", 0, "no pixel data"),
  ("00436515-870c-4b36-a041-de91049b9ab4", 1, None),
  ("00569f44-917d-4c86-a842-81832af98c30", 0, "missing"),
  ("00704310-78a8-4b38-8475-49f4573b2dbb", 1, None),
]


def make_rsna_tree(root: Path) -> None:
  rows = []
  for k, (patient, boxes, defect) in enumerate(RSNA):
    if boxes:
      rows += [[patient, 264.0 + b, 152.0, 213.0, 379.0, 1] for b in range(boxes)]
    else:
      rows.append([patient, "", "", "", "", 0])
    path = root / "stage_2_train_images" / f"{patient}.dcm"
    if defect != "missing":
      write_dicom(path, None if defect else radiograph(200 + k, (40, 40)), jpeg=True)
  write_csv(
    root / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"], rows
  )


def make_siim_tree(root: Path) -> dict[str, int]:
  """20 images (6 positive, one with two masks), one corrupt DICOM. Returns labels."""
  rows, labels = [], {}
  for k in range(20):
    image_id = f"1.2.276.0.7230010.3.1.4.8323329.{1000 + k}.1517875{k:03d}.{k}"
    positive = k % 10 < 3
    labels[image_id] = int(positive)
    rows.append([image_id, f"{1000 + k} 5 1019 7" if positive else "-1"])
    if k == 0:
      rows.append([image_id, "2000 3 1021 3"])
    path = root / "dicom-images-train" / f"1.2.276.0.{k}.2" / f"1.2.276.0.{k}.3" / f"{image_id}.dcm"
    if k == 5:
      path.parent.mkdir(parents=True)
      path.write_bytes(b"\x00" * 64 + b"not a dicom file")
    else:
      write_dicom(path, radiograph(300 + k, (40, 40)))
  header = ["ImageId", " EncodedPixels"]
  write_csv(root / "train-rle.csv", header, rows)
  return labels


def make_covidx_tree(root: Path) -> None:
  lines = {
    "train": [
      ("419639-003251", "MIDRC-RICORD-1C-419639-003251-46647-0.png", "positive", "ricord"),
      ("8cbbd9a9", "8cbbd9a9-a4e4-4a64-8c9d-7d7e8ed2e6c1.png", "negative", "rsna"),
      ("1", "case 1 (frontal).jpg", "negative", "cohen"),
    ],
    "val": [("A0001", "A0001.jpeg", "positive", "sirm")],
    "test": [("b1", "b1.png", "negative", "rsna"), ("b2", "b2-missing.png", "positive", "bimcv")],
  }
  for split, items in lines.items():
    (root / f"{split}.txt").write_text("".join(" ".join(item) + "\n" for item in items))
    for k, (_, name, _, _) in enumerate(items):
      if "missing" not in name:
        write_image(root / split / name, radiograph(400 + k))


# ---------------------------------------------------------------------------------------------
# Fixtures and checks


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  reports = [MIMIC_REPORT.format(finding="no effusion", impression="normal chest")] * 4
  return tokenizer_lib.train_tokenizer(reports, 512, str(tmp_path_factory.mktemp("vocab")))


def data_config(name: str, data_dir: Path, **kw) -> ml_collections.ConfigDict:
  config = pretrain.get_config("tiny")
  config.unlock()
  config.data.name = name
  config.data.data_dir = str(data_dir)
  config.data.builder_config = kw.pop("builder_config", "")
  config.batch_size = 2
  return config


def read_back(config, tokenizer, split: str) -> list[dict]:
  """Every example of a split through the grain evaluation pipeline, as one list of batches."""
  batches = list(
    pipeline.eval_dataset(config, tokenizer, split=split, shard_index=0, shard_count=1)
  )
  for batch in batches:
    s = config.data.image_size
    assert batch["image"].shape == (2, s, s, 3) and batch["target_image"].max() <= 1.0
  return batches


def skipped_files(summary) -> dict[str, str]:
  return {Path(s.file).name: s.reason for s in summary.skipped}


# ---------------------------------------------------------------------------------------------
# Tests


def test_mimic_cxr(tmp_path, data_dir, tokenizer):
  frontal = make_mimic_tree(tmp_path)
  summary = prepare("mimic_cxr", tmp_path, data_dir, image_size=SIZE, held_out="none")
  skipped = skipped_files(summary)
  d4, d6 = frontal["50000004"], frontal["50000006"]
  assert skipped == {
    f"{d4}.jpg": skipped[f"{d4}.jpg"],
    "s50000005.txt": "empty report: no FINDINGS or IMPRESSION text",
    f"{d6}.jpg": "image file missing",
  }
  assert skipped[f"{d4}.jpg"].startswith("corrupt or truncated image")
  assert summary.examples == {"test": 1, "train": 3, "validation": 1}  # no lateral image
  text = summary.format()
  assert f"{d4}.jpg" in text and "s50000005.txt" in text and "image file missing" in text

  source = registry.get_source("mimic_cxr", "train", data_config("mimic_cxr", data_dir).data)
  records = {source[i]["study_id"]: source[i] for i in range(len(source))}
  assert set(records) == {"50000001", "50000002", "50000007"}
  r = records["50000002"]
  assert r["image"].shape == (SIZE, SIZE) and r["image"].dtype == np.uint8
  assert (
    r["findings"] == "There is cardiomegaly in study 50000002. The cardiomediastinal "
    "silhouette is normal."
  )
  assert r["impression"] == "Cardiomegaly. No pneumothorax."
  assert r["report"].startswith("There is cardiomegaly in study 50000002.")
  assert findings_lib.names_from_labels(r["labels"]) == ("Cardiomegaly",)
  assert r["view"] == "AP" and r["id"] == frontal["50000002"]
  # Padding keeps the aspect ratio: the 48x40 image leaves black columns at both sides.
  assert r["image"][:, 0].max() == 0 and r["image"][:, SIZE // 2].max() > 0

  # The source travels to grain worker processes by pickle and reopens its files there.
  clone = pickle.loads(pickle.dumps(source))
  np.testing.assert_array_equal(clone[1]["image"], source[1]["image"])
  assert clone.reports == [source[i]["report"] for i in range(len(source))]
  batches = read_back(data_config("mimic_cxr", data_dir), tokenizer, "train")
  assert sum(int(b["mask"].sum()) for b in batches) == 3
  assert batches[0]["labels"].shape == (2, findings_lib.NUM_FINDINGS)

  # Preparing again reuses the files.
  files = {p: p.stat().st_mtime_ns for p in summary.data_path.iterdir()}
  again = prepare("mimic_cxr", tmp_path, data_dir, image_size=SIZE, held_out="none")
  assert not again.built and again.examples == summary.examples
  assert len(again.skipped) == 3
  assert {p: p.stat().st_mtime_ns for p in summary.data_path.iterdir()} == files


def test_mimic_5x200(tmp_path, data_dir, tokenizer):
  make_mimic_tree(tmp_path)
  summary = prepare("mimic_5x200", tmp_path, data_dir, image_size=SIZE, per_class=1)
  # One study per class; Edema's image is truncated and Pleural Effusion's report is empty.
  assert summary.examples == {"test": 3}
  assert {s.reason.split(" (")[0] for s in summary.skipped} == {
    "corrupt or truncated image",
    "empty report: no FINDINGS or IMPRESSION text",
  }
  manifest = list(csv.DictReader(open(summary.data_path / "manifest.csv")))
  assert [(m["study_id"], m["class_name"]) for m in manifest] == [
    ("50000001", "Atelectasis"),
    ("50000002", "Cardiomegaly"),
    ("50000003", "Consolidation"),
    ("50000004", "Edema"),
    ("50000005", "Pleural Effusion"),
  ]  # 50000007 is uncertain on Edema
  config = data_config("mimic_5x200", data_dir)
  source = registry.get_source("mimic_5x200", "test", config.data)
  assert source.class_names == findings_lib.CLASSES_5X200
  assert sorted(source[i]["label"] for i in range(3)) == [0, 1, 2]
  batches = read_back(config, tokenizer, "test")
  assert sorted(np.concatenate([b["label"][b["mask"]] for b in batches])) == [0, 1, 2]


def test_chexpert_5x200(tmp_path, data_dir):
  make_chexpert_tree(tmp_path)
  a = prepare("chexpert_5x200", tmp_path, data_dir, image_size=SIZE, per_class=1, seed=0)
  b = prepare(
    "chexpert_5x200", tmp_path, data_dir, image_size=SIZE, per_class=1, seed=0, class_set="gloria"
  )
  assert not b.built and a.config == "gloria_32px_n1" and a.examples == {"test": 5}
  manifest = list(csv.DictReader(open(a.data_path / "manifest.csv")))
  assert [m["class_name"] for m in manifest] == list(findings_lib.CLASSES_5X200)
  assert all("frontal" in m["Path"] for m in manifest) and not a.skipped
  # The drawn patients and studies, for keeping them out of a training set.
  held = list(csv.DictReader(open(a.data_path / "held_out.csv")))
  assert [h["path"] for h in held] == [m["Path"] for m in manifest]
  assert all(re.fullmatch(r"patient\d{5}", h["subject_id"]) for h in held)
  assert all(h["study_id"] == f"{h['subject_id']}/study1" for h in held)
  assert "held out: 5 studies of 5 patients (held_out.csv)" in a.notes
  with pytest.raises(ValueError, match="only 0 candidate images for 'Pneumonia'"):
    prepare(
      "chexpert_5x200", tmp_path, data_dir, image_size=SIZE, per_class=1, class_set="pneumonia"
    )


def test_rsna_pneumonia(tmp_path, data_dir, tokenizer):
  make_rsna_tree(tmp_path)
  summary = prepare("rsna_pneumonia", tmp_path, data_dir, image_size=SIZE)
  assert skipped_files(summary) == {
    "003d8fa0-6bf1-40ed-b54c-ac657f8495c5.dcm": "DICOM has no pixel data",
    "00569f44-917d-4c86-a842-81832af98c30.dcm": "DICOM file missing",
  }
  assert sum(summary.examples.values()) == 5
  manifest = list(csv.DictReader(open(summary.data_path / "manifest.csv")))
  assert {m["patientId"]: int(m["label"]) for m in manifest} == {
    p: int(boxes > 0) for p, boxes, _ in RSNA
  }
  config = data_config("rsna_pneumonia", data_dir)
  labels = {}
  for split in ("train", "val", "test"):
    source = registry.get_source("rsna_pneumonia", split, config.data)
    labels.update({source[i]["id"]: source[i]["label"] for i in range(len(source))})
  assert labels == {p: int(boxes > 0) for p, boxes, defect in RSNA if not defect}
  batches = read_back(config, tokenizer, "train")
  assert sum(int(b["mask"].sum()) for b in batches) == summary.examples["train"]


def test_siim_pneumothorax(tmp_path, data_dir):
  labels = make_siim_tree(tmp_path)
  summary = prepare("siim_pneumothorax", tmp_path, data_dir, image_size=SIZE)
  ((name, reason),) = skipped_files(summary).items()
  assert name.endswith(".1005.1517875005.5.dcm") and reason.startswith("not a readable DICOM")
  assert summary.examples == {"test": 2, "train": 15, "validation": 2}  # 20 -> 18 + 2 -> 16 + 2
  # The split seed is the paper's code's, 5, and the plain configuration name means it.
  assert summary.config == "32px"
  rows = csv.DictReader(open(summary.data_path / "manifest.csv"))
  split = {m["ImageId"]: m["split"] for m in rows}
  assert split == siim_pneumothorax.split_images(labels, seed=5)
  assert split != siim_pneumothorax.split_images(labels, seed=0)
  seed0 = prepare("siim_pneumothorax", tmp_path, tmp_path / "out", image_size=SIZE, seed=0)
  assert seed0.config == "32px_seed0" and seed0.built
  builder = siim_pneumothorax.SiimPneumothorax(config="32px_seed0", data_dir=str(data_dir))
  assert builder.builder_config.seed == 0
  assert builder.rebuild_command("M", data_dir).endswith("--image-size 32 --seed 0 --overwrite")
  config = data_config("siim_pneumothorax", data_dir)
  for split in ("train", "validation", "test"):
    source = registry.get_source("siim_pneumothorax", split, config.data)
    for i in range(len(source)):
      assert source[i]["label"] == labels[source[i]["id"]]
      assert source[i]["image"].std() > 0


def test_covidx(tmp_path, data_dir):
  make_covidx_tree(tmp_path)
  with pytest.raises(common.LayoutError, match="--class-set binary"):
    prepare("covidx", tmp_path, data_dir, image_size=SIZE)
  summary = prepare("covidx", tmp_path, data_dir, image_size=SIZE, class_set="binary")
  assert summary.examples == {"test": 1, "train": 3, "validation": 1}
  assert skipped_files(summary) == {"b2-missing.png": "image file missing"}
  config = data_config("covidx", data_dir)
  source = registry.get_source("covidx", "train", config.data)
  records = {source[i]["id"]: source[i] for i in range(len(source))}
  assert records["case 1 (frontal).jpg"]["patient_id"] == "1"
  assert records["MIDRC-RICORD-1C-419639-003251-46647-0.png"]["label"] == 1


def test_wrong_header_stops_with_file_and_columns(tmp_path, data_dir, capsys):
  make_rsna_tree(tmp_path)
  labels = tmp_path / "stage_2_train_labels.csv"
  labels.write_text(labels.read_text().replace("patientId", "PatientID", 1))
  code = run_command(
    [
      "rsna_pneumonia",
      "--manual-dir",
      str(tmp_path),
      "--data-dir",
      str(tmp_path / "out"),
      "--image-size",
      str(SIZE),
    ]
  )
  err = capsys.readouterr().err
  assert code == 2 and str(labels) in err
  assert "expected columns ['patientId', 'x', 'y', 'width', 'height', 'Target']" in err
  assert not (tmp_path / "out" / "rsna_pneumonia" / "32px" / "1.0.0").exists()


def test_open_i(tmp_path, data_dir, tokenizer):
  from medunifier_jax.data import openi

  names = ["1.xml", "2.xml", "3.xml", "4.xml", "16.xml"]  # 16.xml has no FINDINGS/IMPRESSION
  reports = {}
  with tarfile.open(_xrv_data() / "NLMCXR_reports.tgz") as tar:
    for name in names:
      data = tar.extractfile(f"ecgen-radiology/{name}").read()
      (tmp_path / "ecgen-radiology").mkdir(exist_ok=True)
      (tmp_path / "ecgen-radiology" / name).write_bytes(data)
      reports[name] = openi.parse_report(data, name)
  images = [i for n in names for i in reports[n].images]
  missing = reports["2.xml"].images[1]
  for k, image_id in enumerate(images):
    if image_id != missing:
      write_image(tmp_path / "NLMCXR_png" / f"{image_id}.png", radiograph(500 + k, (40, 48)))
  summary = prepare("open_i", tmp_path, data_dir, image_size=SIZE)
  assert skipped_files(summary) == {
    "16.xml": "empty report: no FINDINGS or IMPRESSION text",
    f"{missing}.png": "image file missing",
  }
  assert summary.examples == {"test": 2, "train": 5}  # 4.xml is a test report
  config = data_config("open_i", data_dir)
  source = registry.get_source("open_i", "train", config.data)
  records = {source[i]["id"]: source[i] for i in range(len(source))}
  first = records[reports["1.xml"].images[0]]
  assert first["findings"] == reports["1.xml"].findings and first["report_id"] == "1.xml"
  assert first["report"].startswith("The cardiac silhouette and mediastinum size")
  np.testing.assert_array_equal(first["labels"], openi.labels_from_mesh(reports["1.xml"].mesh))
  batches = read_back(config, tokenizer, "train")
  assert sum(int(b["mask"].sum()) for b in batches) == 5
  assert all(b["input_ids"][0, 0] == 2 for b in batches)  # [CLS] first


def test_covidx_without_val_file_holds_out_train_patients(tmp_path, data_dir):
  from medunifier_jax.data.builders import covidx

  classes = ("normal", "pneumonia", "COVID-19")
  lines = [f"p{k} img{k}.png {classes[k % 3]} rsna\n" for k in range(12)]
  (tmp_path / "train_COVIDx9A.txt").write_text("".join(lines))
  (tmp_path / "test_COVIDx9A.txt").write_text("t0 t0.png normal rsna\n")
  for k in range(12):
    write_image(tmp_path / "train" / f"img{k}.png", radiograph(600 + k))
  write_image(tmp_path / "test" / "t0.png", radiograph(700))
  patients = [f"p{k}" for k in range(12)]
  seed = next(s for s in range(100) if 0 < sum(covidx.held_out(p, s) for p in patients) < 12)
  summary = prepare("covidx", tmp_path, data_dir / "v9", image_size=SIZE, seed=seed)
  held = {p for p in patients if covidx.held_out(p, seed)}
  assert summary.examples == {"test": 1, "train": 12 - len(held), "validation": len(held)}
  manifest = list(csv.DictReader(open(summary.data_path / "manifest.csv")))
  assert {m["patientid"] for m in manifest if m["split"] == "validation"} == held


def test_eval_paper_rows_name_registered_sets_and_evaluators():
  from configs import eval_paper
  from medunifier_jax.evaluators.registry import EVALUATORS

  config = eval_paper.get_config("all")
  assert set(config.evals) == set(eval_paper.ROWS)
  known = set(registry.known_names())
  for entry in config.evals.values():
    assert entry.task in EVALUATORS and set(entry.datasets) <= known
  row = eval_paper.get_config("mimic_5x200_retrieval").evals.mimic_5x200_retrieval
  assert row.itm_rerank_k == 256 and row.datasets == ("mimic_5x200",)


def test_command_line_prints_summary_and_reuses(tmp_path, capsys):
  make_rsna_tree(tmp_path / "manual")
  argv = [
    "rsna_pneumonia",
    "--manual-dir",
    str(tmp_path / "manual"),
    "--data-dir",
    str(tmp_path / "out"),
    "--image-size",
    str(SIZE),
  ]
  assert run_command(argv) == 0
  first = capsys.readouterr().out
  assert "rsna_pneumonia/32px: prepared" in first and "skipped: 2 files" in first
  assert "stage_2_train_images/003d8fa0-6bf1-40ed-b54c-ac657f8495c5.dcm" in first
  assert run_command(argv) == 0
  second = capsys.readouterr().out
  assert "already prepared, reused" in second
  block = lambda out: out[out.index("  test:") :]  # noqa: E731  (TFDS prints lines before)
  assert block(second) == block(first)  # same counts and skips


def test_jpeg_draft_decoding_matches_full_decoding(tmp_path):
  image = np.asarray(Image.fromarray(radiograph(800, (48, 40))).resize((320, 384)))  # (384, 320)
  write_image(tmp_path / "big.jpg", image)
  full = common.load_image(tmp_path / "big.jpg")
  draft = common.load_image(tmp_path / "big.jpg", min_side=SIZE)
  assert full.shape == (384, 320) and draft.shape == (48, 40)  # decoded at 1/8 scale
  a, b = common.to_square(full, SIZE), common.to_square(draft, SIZE)
  assert np.abs(a.astype(int) - b.astype(int)).mean() < 4.0


@pytest.mark.parametrize(
  "text, expected",
  [
    (
      MIMIC_REPORT.format(finding="a small effusion", impression="Effusion."),
      ("There is a small effusion. The cardiomediastinal silhouette is normal.", "Effusion."),
    ),
    # A combined section, and a time of day (not a header: it is not at a line start).
    (
      " WET READ: ___ 8:27 PM\n FINDINGS AND IMPRESSION:  No change since 10:30.\n",
      ("No change since 10:30.", ""),
    ),
    (
      " FINDINGS: Clear lungs.\n\n IMPRESSION: Normal.\n NOTIFICATION: Dr. ___ was told.\n",
      ("Clear lungs.", "Normal."),
    ),
    (" EXAMINATION: CHEST\n INDICATION: cough\n", ("", "")),
    ("Portable chest radiograph without headers.\n", ("", "")),
  ],
)
def test_mimic_report_sections(text, expected):
  assert mimic_cxr.findings_and_impression(text) == expected


# ---------------------------------------------------------------------------------------------
# Bad input: one message naming file, line and fix, or a listed skip; nothing altered silently


def _edit_lines(path: Path, edit) -> None:
  """Rewrites a (possibly gzipped) text file through `edit(list of lines) -> list of lines`."""
  gz = path.suffix == ".gz"
  data = gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
  data = "".join(line + "\n" for line in edit(data.decode().splitlines())).encode()
  path.write_bytes(gzip.compress(data) if gz else data)


def test_short_or_long_csv_row_is_skipped_with_file_and_line(tmp_path, capsys):
  make_rsna_tree(tmp_path / "manual")
  labels = tmp_path / "manual" / "stage_2_train_labels.csv"
  # Line 3 (the second patient's only row) loses its last fields; line 2 gains one.
  _edit_lines(
    labels, lambda lines: [lines[0], lines[1] + ",extra", lines[2].rsplit(",", 3)[0], *lines[3:]]
  )
  argv = [
    "rsna_pneumonia",
    "--manual-dir",
    str(tmp_path / "manual"),
    "--data-dir",
    str(tmp_path / "out"),
    "--image-size",
    str(SIZE),
  ]
  assert run_command(argv) == 0
  out = capsys.readouterr().out
  assert "CSV row with fewer fields than the header: fix or delete the line" in out
  assert "CSV row with more fields than the header" in out
  assert "[all] stage_2_train_labels.csv:3" in out and "[all] stage_2_train_labels.csv:2" in out
  data_path = tmp_path / "out" / "rsna_pneumonia" / "32px" / "1.0.0"
  skipped = list(csv.DictReader(open(data_path / common.SKIPPED_FILE)))
  assert {r["file"] for r in skipped} >= {
    "stage_2_train_labels.csv:2",
    "stage_2_train_labels.csv:3",
  }
  manifest = {m["patientId"] for m in csv.DictReader(open(data_path / "manifest.csv"))}
  assert RSNA[0][0] not in manifest and RSNA[1][0] not in manifest  # never half-read
  # Outside a builder (no one to list the skip), the same row stops the read.
  with pytest.raises(common.LayoutError, match=r"stage_2_train_labels\.csv:2: CSV row with more"):
    common.read_csv(labels, ["patientId", "Target"])


def test_damaged_mimic_label_row_skips_its_study(tmp_path):
  frontal = make_mimic_tree(tmp_path / "manual")
  # Study 50000002's CheXpert row (line 3) is cut: its image is left out, not given blank labels.
  _edit_lines(
    tmp_path / "manual" / mimic_cxr.CHEXPERT_CSV,
    lambda lines: [*lines[:2], lines[2][:30], *lines[3:]],
  )
  summary = prepare(
    "mimic_cxr", tmp_path / "manual", tmp_path / "out", image_size=SIZE, held_out="none"
  )
  reasons = {s.file: s.reason for s in summary.skipped}
  assert reasons[f"{mimic_cxr.CHEXPERT_CSV}:3"].startswith("CSV row with fewer fields")
  image = f"files/p10/p10000001/s50000002/{frontal['50000002']}.jpg"
  assert reasons[image] == f"its study's row {mimic_cxr.CHEXPERT_CSV}:3 is damaged"
  assert summary.examples["train"] == 2


def test_label_file_not_utf8_names_file_line_offset_and_fix(tmp_path, capsys):
  make_rsna_tree(tmp_path / "manual")
  labels = tmp_path / "manual" / "stage_2_train_labels.csv"
  # Far past the reader's first buffered chunk, so the line comes from a rescan, not the chunk.
  _edit_lines(labels, lambda lines: [*lines, *(f"f{k:07d},,,,,0" for k in range(3000))])
  data = labels.read_bytes()
  at = data.index(b"f0002000")
  labels.write_bytes(data[:at] + b"caf\xe9" + data[at + 4 :])  # Latin-1 e-acute on line 2010
  argv = [
    "rsna_pneumonia",
    "--manual-dir",
    str(tmp_path / "manual"),
    "--data-dir",
    str(tmp_path / "out"),
    "--image-size",
    str(SIZE),
  ]
  assert run_command(argv) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "Traceback" not in err  # one message
  assert f"{labels}: not UTF-8 text (line 2010, byte offset {at + 3}: byte 0xe9" in err
  assert "save it as UTF-8" in err

  # A gzipped table: the offset counts decompressed bytes.
  gz = tmp_path / "table.csv.gz"
  gz.write_bytes(gzip.compress(b"a,b\n1,2\n3,\xe94\n"))
  with pytest.raises(
    common.LayoutError,
    match=r"table\.csv\.gz: not UTF-8 text \(line 3, byte "
    r"offset 10: byte 0xe9",
  ):
    common.read_csv(gz, ["a", "b"])

  # COVIDx's split lists are text files read whole.
  (tmp_path / "covidx").mkdir()
  make_covidx_tree(tmp_path / "covidx")
  test_txt = tmp_path / "covidx" / "test.txt"
  test_txt.write_bytes(test_txt.read_bytes().replace(b"bimcv", b"bimc\xe9"))
  at = test_txt.read_bytes().index(b"\xe9")
  with pytest.raises(
    common.LayoutError,
    match=rf"test\.txt: not UTF-8 text \(line 2, byte "
    rf"offset {at}: byte 0xe9.*save it as UTF-8",
  ):
    prepare("covidx", tmp_path / "covidx", tmp_path / "out", image_size=SIZE, class_set="binary")


def test_empty_or_incomplete_manual_dir_is_named_before_tfds_runs(tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  argv = lambda manual: [
    "rsna_pneumonia",
    "--manual-dir",
    str(manual),  # noqa: E731
    "--data-dir",
    str(tmp_path / "out"),
  ]
  assert run_command(argv(tmp_path / "empty")) == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err and "AssertionError" not in err
  assert err.startswith(
    f"error: --manual-dir {tmp_path / 'empty'} is empty. rsna_pneumonia "
    "expects these files there (docs/DATASETS.md, section rsna_pneumonia)"
  )
  assert "stage_2_train_labels.csv" in err and "stage_2_train_images/" in err
  assert run_command(argv(tmp_path / "absent")) == 2
  assert f"--manual-dir {tmp_path / 'absent'} does not exist" in capsys.readouterr().err
  (tmp_path / "partial" / "stage_2_train_images").mkdir(parents=True)
  assert run_command(argv(tmp_path / "partial")) == 2
  assert "lacks stage_2_train_labels.csv. rsna_pneumonia expects" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_builder_lists_its_layout_for_an_empty_manual_dir(tmp_path, name):
  with pytest.raises(common.LayoutError) as info:
    BUILDERS[name].check_manual_dir(tmp_path)
  message = str(info.value)
  assert f"--manual-dir {tmp_path} is empty" in message and f"section {name}" in message
  assert BUILDERS[name].LAYOUT and all(
    pattern in message for patterns, _ in BUILDERS[name].LAYOUT for pattern in patterns
  )


def test_non_utf8_report_is_skipped_with_its_reason(tmp_path):
  make_mimic_tree(tmp_path / "manual")
  report = tmp_path / "manual" / "files" / "p10" / "p10000000" / "s50000001.txt"
  report.write_bytes(report.read_bytes().replace(b"There is", b"Th\xe9re is"))
  summary = prepare(
    "mimic_cxr", tmp_path / "manual", tmp_path / "out", image_size=SIZE, held_out="none"
  )
  reasons = {s.file: s.reason for s in summary.skipped}
  assert reasons["files/p10/p10000000/s50000001.txt"] == (
    "report is not UTF-8 text (line 10, byte offset 171: byte 0xe9 in b' Th\\xe9re is a'); "
    "save it as UTF-8"
  )
  assert summary.examples["train"] == 2  # 50000001's image is left out, not stored with U+FFFD


def test_reports_are_stored_whole_and_cut_when_tokenised(tmp_path, tokenizer):
  from medunifier_jax.data import text as text_lib

  make_mimic_tree(tmp_path / "manual")
  words = " ".join(f"w{k}" for k in range(150))
  report = tmp_path / "manual" / "files" / "p10" / "p10000001" / "s50000002.txt"
  report.write_text(MIMIC_REPORT.format(finding=f"cardiomegaly: {words}", impression="Stable."))
  prepare("mimic_cxr", tmp_path / "manual", tmp_path / "out", image_size=SIZE, held_out="none")
  config = data_config("mimic_cxr", tmp_path / "out")
  source = registry.get_source("mimic_cxr", "train", config.data)
  index = next(i for i in range(len(source)) if source[i]["study_id"] == "50000002")
  stored = source[index]["report"]
  assert (
    stored == f"There is cardiomegaly {words}. The cardiomediastinal silhouette is normal. Stable."
  )
  assert len(stored.split(" ")) > text_lib.DEFAULT_MAX_WORDS
  # The pipeline cuts to config.data.max_words when it tokenises.
  config.data.max_words, config.data.max_text_len = 4, 16
  example = pipeline.ExampleProcessor.from_config(source, tokenizer, config.data)(index)
  expected = tokenizer_lib.tokenize(tokenizer, ["There is cardiomegaly w0"], 16)
  np.testing.assert_array_equal(example["input_ids"], expected["input_ids"][0])
  assert len(common.clean_report("w " * 200).split(" ")) == 200  # Open-i's storage call too


def test_changed_cleaning_rule_is_refused_with_the_rebuild_command(tmp_path, monkeypatch, capsys):
  from medunifier_jax.data import text as text_lib

  make_mimic_tree(tmp_path / "mimic")
  make_rsna_tree(tmp_path / "rsna")
  out = tmp_path / "out"
  prepare("mimic_cxr", tmp_path / "mimic", out, image_size=SIZE, held_out="none")
  prepare("rsna_pneumonia", tmp_path / "rsna", out, image_size=SIZE)
  monkeypatch.setattr(text_lib, "CLEANING_VERSION", text_lib.CLEANING_VERSION + 1)
  command = (
    f"python -m medunifier_jax.data.prepare mimic_cxr --manual-dir {tmp_path / 'mimic'} "
    f"--data-dir {out} --image-size {SIZE} --held-out none --overwrite"
  )
  version = (
    f"report_cleaning.version: prepared with {text_lib.CLEANING_VERSION - 1}, now "
    f"{text_lib.CLEANING_VERSION}"
  )
  with pytest.raises(common.StalePreparedError) as info:
    prepare("mimic_cxr", tmp_path / "mimic", out, image_size=SIZE, held_out="none")
  assert version in str(info.value) and str(info.value).endswith(f"Rebuild it with:\n  {command}")
  # Training reads through the registry: refused too, with the manual dir recorded at prepare.
  config = data_config("mimic_cxr", out)
  with pytest.raises(common.StalePreparedError, match=re.escape(command)):
    registry.get_source("mimic_cxr", "train", config.data)
  # A set without reports does not depend on the cleaning rule: still reused.
  assert not prepare("rsna_pneumonia", tmp_path / "rsna", out, image_size=SIZE).built
  # The printed command rebuilds it.
  assert run_command(command.split()[3:]) == 0
  assert "mimic_cxr/32px: prepared" in capsys.readouterr().out
  assert len(registry.get_source("mimic_cxr", "train", config.data)) == 3
  assert not prepare("mimic_cxr", tmp_path / "mimic", out, image_size=SIZE, held_out="none").built

  # A set prepared before fingerprints were recorded is refused as well.
  (out / "rsna_pneumonia" / "32px" / "1.0.0" / common.FINGERPRINT_FILE).unlink()
  with pytest.raises(
    common.StalePreparedError,
    match="has no fingerprint.json, so it was prepared by an earlier version",
  ):
    prepare("rsna_pneumonia", tmp_path / "rsna", out, image_size=SIZE)


def test_failed_overwrite_keeps_the_prepared_copy(tmp_path, capsys):
  make_rsna_tree(tmp_path / "manual")
  argv = [
    "rsna_pneumonia",
    "--manual-dir",
    str(tmp_path / "manual"),
    "--data-dir",
    str(tmp_path / "out"),
    "--image-size",
    str(SIZE),
  ]
  assert run_command(argv) == 0
  labels = tmp_path / "manual" / "stage_2_train_labels.csv"
  labels.write_bytes(labels.read_bytes().replace(b"Target", b"Targ\xe9t"))
  assert run_command([*argv, "--overwrite"]) == 2
  assert "not UTF-8 text (line 1" in capsys.readouterr().err
  assert run_command(argv) == 0  # the earlier copy is back and still matches
  assert "already prepared, reused" in capsys.readouterr().out
  assert [p.name for p in (tmp_path / "out" / "rsna_pneumonia" / "32px").iterdir()] == ["1.0.0"]
