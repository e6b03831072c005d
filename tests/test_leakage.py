"""No MIMIC 5x200 patient in MIMIC-CXR pre-training, and the MIMIC-CXR layouts users have.

The trees follow the MIMIC-CXR-JPG release: `files/pNN/pNNNNNNNN/sNNNNNNNN/*.jpg`, the
`mimic-cxr-2.0.0-{split,metadata,chexpert}.csv.gz` tables, reports as
`files/pNN/pNNNNNNNN/sNNNNNNNN.txt` (or packed in `mimic-cxr-reports.zip`, whose own folder is
`mimic-cxr-reports/`). Sets are prepared through the command line, as a user would, and read
back through the source registry, as training and evaluation do.
"""

import csv
import gzip
import json
import re
import shutil
import zipfile
from pathlib import Path

import pytest
from test_builders import (
  MIMIC_CHEXPERT,
  MIMIC_METADATA,
  MIMIC_REPORT,
  MIMIC_SPLIT,
  SIZE,
  data_config,
  make_mimic_tree,
  radiograph,
  write_csv,
  write_image,
)

from medunifier_jax.data import registry
from medunifier_jax.data.builders import common, held_out, mimic_cxr
from medunifier_jax.data.preparation import prepare, run_command

CLASSES = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
# Patient k's split. The first study of patients 0-9 is positive for class k % 5 (two
# candidates per class); patient 10's is not a candidate, so validation is never emptied.
PATIENT_SPLITS = ["train"] * 7 + ["validate", "test", "test", "validate"]


def make_patient_tree(root: Path) -> list[dict]:
  """Eleven patients of two studies each: the first positive for one of the five classes (a
  5x200 candidate; a PA and an AP image, and a lateral one; patient 10: Lung Opacity, not a
  candidate), the second "No Finding" (never drawn; one AP image). Returns one dict per frontal
  image: subject, study, dicom, split."""
  split_rows, meta_rows, label_rows, frontal = [], [], [], []
  for k, split in enumerate(PATIENT_SPLITS):
    subject = f"1000{k:04d}"
    for n, views in ((1, ("PA", "AP", "LATERAL")), (2, ("AP",))):
      study = f"5{k:03d}000{n}"
      study_dir = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
      for v, view in enumerate(views):
        dicom = f"{k:08x}-{n:08x}-{v:08x}-0000abcd-9abc0def"
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
        write_image(study_dir / f"{dicom}.jpg", radiograph(20 * k + 2 * n + v))
        if view != "LATERAL":
          frontal.append(dict(subject=subject, study=study, dicom=dicom, split=split))
      labels = {name: "" for name in MIMIC_CHEXPERT[2:]}
      finding = "No Finding" if n == 2 else CLASSES[k % 5] if k < 10 else "Lung Opacity"
      labels[finding] = "1.0"
      label_rows.append([subject, study, *labels.values()])
      study_dir.parent.joinpath(f"s{study}.txt").write_text(
        MIMIC_REPORT.format(finding=f"{finding.lower()} in study {study}", impression=f"{finding}.")
      )
  write_csv(root / mimic_cxr.SPLIT_CSV, MIMIC_SPLIT, split_rows, gz=True)
  write_csv(root / mimic_cxr.METADATA_CSV, MIMIC_METADATA, meta_rows, gz=True)
  write_csv(root / mimic_cxr.CHEXPERT_CSV, MIMIC_CHEXPERT, label_rows, gz=True)
  return frontal


def run(capsys, *argv) -> tuple[int, str, str]:
  code = run_command([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


def records(name: str, data_dir: Path, split: str, **kw) -> list[dict]:
  config = data_config(name, data_dir, **kw)
  source = registry.get_source(name, split, config.data)
  return [{k: v for k, v in source[i].items() if k != "image"} for i in range(len(source))]


def read_csv(path: Path) -> list[dict]:
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# Leakage


def test_mimic_cxr_leaves_out_every_study_of_the_5x200_patients(tmp_path, capsys):
  frontal = make_patient_tree(tmp_path / "mimic")
  out = tmp_path / "tfds"
  common_args = ["--manual-dir", tmp_path / "mimic", "--data-dir", out, "--image-size", SIZE]
  code, text, err = run(capsys, "mimic_5x200", *common_args, "--per-class", 1)
  assert code == 0, err
  assert "held out: 5 studies of 5 patients (held_out.csv)" in text
  code, text, err = run(capsys, "mimic_cxr", *common_args)
  assert code == 0, err
  assert "held out: mimic_5x200/gloria_32px_n1 (5 studies of 5 patients)" in text
  match = re.search(
    r"excluded: (\d+) studies \((\d+) images\) of those patients from train and "
    r"validation \(excluded\.csv\); test is kept whole",
    text,
  )
  assert match, text

  # Read both prepared sets back as training and evaluation do.
  evaluation = records("mimic_5x200", out, "test")
  assert len(evaluation) == 5
  held_studies = {r["study_id"] for r in evaluation}
  held_subjects = {r["subject_id"] for r in evaluation}
  pretraining = records("mimic_cxr", out, "train") + records("mimic_cxr", out, "validation")
  assert pretraining
  assert held_studies.isdisjoint(r["study_id"] for r in pretraining)
  assert held_subjects.isdisjoint(r["subject_id"] for r in pretraining)

  # The count printed is what the tree holds for those patients in train and validation: both
  # studies of each (the second was never a candidate: excluding whole patients took it too).
  left_out = [f for f in frontal if f["subject"] in held_subjects and f["split"] != "test"]
  studies = {(f["subject"], f["study"]) for f in left_out}
  assert (int(match[1]), int(match[2])) == (len(studies), len(left_out))
  assert len(studies) == 2 * len({s for s, _ in studies}) and len(left_out) > len(studies)
  data_path = out / "mimic_cxr" / "32px" / "1.0.0"
  excluded = read_csv(data_path / held_out.EXCLUDED_FILE)
  assert {r["dicom_id"] for r in excluded} == {f["dicom"] for f in left_out}
  assert {r["held_out_by"] for r in excluded} == {"mimic_5x200/gloria_32px_n1"}
  manifest = {r["dicom_id"] for r in read_csv(data_path / "manifest.csv")}
  assert manifest == {f["dicom"] for f in frontal} - {f["dicom"] for f in left_out}
  assert len(pretraining) == len([f for f in frontal if f["split"] != "test"]) - len(left_out)

  # The official test split is kept whole (nothing trains on it), drawn test studies included.
  test = records("mimic_cxr", out, "test")
  assert {r["id"] for r in test} == {f["dicom"] for f in frontal if f["split"] == "test"}

  # The 5x200 set's list: every drawn study with its patient, image and official split.
  listed = read_csv(out / "mimic_5x200" / "gloria_32px_n1" / "1.0.0" / held_out.HELD_OUT_FILE)
  assert list(listed[0]) == list(held_out.COLUMNS)
  assert {r["study_id"] for r in listed} == held_studies
  assert all((tmp_path / "mimic" / r["path"]).is_file() for r in listed)

  # The exclusion is in the fingerprint; the same command reuses the set.
  parts = json.loads((data_path / common.FINGERPRINT_FILE).read_text())["parts"]
  assert parts["held_out"]["unit"] == "patient"
  assert parts["held_out"]["sets"][0].startswith("mimic_5x200/gloria_32px_n1:")
  code, again, _ = run(capsys, "mimic_cxr", *common_args)
  assert code == 0 and "already prepared, reused" in again and match[0] in again


def test_mimic_cxr_without_a_held_out_set_stops_and_says_how_to_go_on(tmp_path, capsys):
  make_patient_tree(tmp_path / "mimic")
  manual = tmp_path / "mimic"
  code, _, err = run(
    capsys,
    "mimic_cxr",
    "--manual-dir",
    manual,
    "--data-dir",
    tmp_path / "tfds",
    "--image-size",
    SIZE,
  )
  assert code == 2 and "Traceback" not in err
  assert f"no prepared mimic_5x200 under --data-dir {tmp_path / 'tfds'}" in err
  assert (
    f"python -m medunifier_jax.data.prepare mimic_5x200 --manual-dir {manual} --data-dir "
    f"{tmp_path / 'tfds'} --image-size {SIZE} --class-set gloria\n"
  ) in err
  assert "--held-out PATH" in err and "--held-out none" in err
  assert not (tmp_path / "tfds" / "mimic_cxr").exists()

  # A set prepared elsewhere, named by its folder; a CheXpert list is not taken for one.
  prepare("mimic_5x200", manual, tmp_path / "eval", image_size=SIZE, per_class=1)
  folder = tmp_path / "eval" / "mimic_5x200" / "gloria_32px_n1" / "1.0.0"
  summary = prepare("mimic_cxr", manual, tmp_path / "tfds", image_size=SIZE, held_out=[folder])
  assert "held out: mimic_5x200/gloria_32px_n1 (5 studies of 5 patients)" in summary.notes
  listed = read_csv(folder / held_out.HELD_OUT_FILE)
  trained = len([r for r in listed if r["split"] != "test"])  # 3 images per patient there
  assert summary.examples["train"] + summary.examples["validation"] == 3 * (9 - trained)
  stray = tmp_path / "chexpert" / held_out.HELD_OUT_FILE
  stray.parent.mkdir()
  stray.write_text("subject_id,study_id,path\npatient00001,patient00001/study1,x.jpg\n")
  with pytest.raises(held_out.HeldOutError, match="not a MIMIC 5x200 held-out list"):
    prepare("mimic_cxr", manual, tmp_path / "other", image_size=SIZE, held_out=[stray])

  # Holding nothing out is a choice the summary states.
  summary = prepare("mimic_cxr", manual, tmp_path / "all", image_size=SIZE, held_out="none")
  assert "held out: nothing (--held-out none)" in summary.notes
  assert summary.examples == {"test": 6, "train": 21, "validation": 6}

  # A 5x200 set prepared before held_out.csv existed: rebuilt first, with its own command.
  (folder / held_out.HELD_OUT_FILE).unlink()
  with pytest.raises(
    held_out.HeldOutError,
    match=r"has no held_out\.csv .* Rebuild it first:\n  "
    r"python -m medunifier_jax.data.prepare mimic_5x200 .* --per-class 1 "
    r"--overwrite$",
  ):
    prepare("mimic_cxr", manual, tmp_path / "eval", image_size=SIZE)


def test_a_5x200_set_prepared_later_is_caught(tmp_path, capsys):
  manual, out = tmp_path / "mimic", tmp_path / "tfds"
  make_patient_tree(manual)
  prepare("mimic_5x200", manual, out, image_size=SIZE, per_class=1)
  prepare("mimic_cxr", manual, out, image_size=SIZE)
  prepare("mimic_5x200", manual, out, image_size=SIZE, per_class=2)  # all ten patients
  # Training reads it: refused, with the command that rebuilds it.
  command = (
    f"python -m medunifier_jax.data.prepare mimic_cxr --manual-dir {manual} --data-dir "
    f"{out} --image-size {SIZE} --overwrite"
  )
  with pytest.raises(common.StalePreparedError) as info:
    registry.get_source("mimic_cxr", "train", data_config("mimic_cxr", out).data)
  assert "does not hold out the patients of mimic_5x200/gloria_32px_n2" in str(info.value)
  assert str(info.value).endswith(f"are found by themselves) with:\n  {command}")
  # Preparing again says what differs.
  with pytest.raises(common.StalePreparedError, match=r"held_out\.sets: prepared with "):
    prepare("mimic_cxr", manual, out, image_size=SIZE)
  code, text, err = run(capsys, *command.split()[3:])
  assert code == 0, err
  assert "(10 studies of 10 patients)" in text  # both sets: every patient
  assert "excluded: 16 studies (24 images)" in text and "  test: 6 examples" in text
  assert "train:" not in text and "  validation: 3 examples" in text  # patient 10 is left
  assert len(records("mimic_cxr", out, "test")) == 6


# ---------------------------------------------------------------------------------------------
# Layouts


def _pack_reports(root: Path, folder: str = "mimic-cxr-reports/", keep_files: bool = True) -> None:
  """Moves the reports into mimic-cxr-reports.zip, under `folder` as the archive has them
  (without their `files/` folder unless `keep_files`)."""
  with zipfile.ZipFile(root / mimic_cxr.REPORTS_ZIP, "w") as archive:
    for report in sorted((root / "files").glob("p*/p*/s*.txt")):
      inside = report.relative_to(root if keep_files else root / "files").as_posix()
      archive.write(report, folder + inside)
      report.unlink()


def _gunzip_tables(root: Path) -> None:
  for name in (mimic_cxr.SPLIT_CSV, mimic_cxr.METADATA_CSV, mimic_cxr.CHEXPERT_CSV):
    gz = root / name
    gz.with_suffix("").write_bytes(gzip.decompress(gz.read_bytes()))
    gz.unlink()


@pytest.mark.parametrize("layout", ["zip", "unzipped", "plain tables"])
def test_mimic_cxr_reads_the_layouts_users_have(tmp_path, layout):
  manual = tmp_path / "manual"
  frontal = make_mimic_tree(manual)
  if layout == "zip":  # packed, as downloaded
    _pack_reports(manual)
    where, empty = (
      "mimic-cxr-reports.zip (read without unpacking)",
      "mimic-cxr-reports.zip/mimic-cxr-reports/files/p10/p10000004/s50000005.txt",
    )
  elif layout == "unzipped":  # the archive unzipped where it lies: mimic-cxr-reports/files/...
    for report in sorted((manual / "files").glob("p*/p*/s*.txt")):
      target = manual / "mimic-cxr-reports" / report.relative_to(manual)
      target.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(report, target)
    where, empty = "mimic-cxr-reports/files/", "mimic-cxr-reports/files/p10/p10000004/s50000005.txt"
  else:  # label tables gunzipped, reports next to the images
    _gunzip_tables(manual)
    where, empty = "files/ next to the image folders", "files/p10/p10000004/s50000005.txt"
  summary = prepare("mimic_cxr", manual, tmp_path / "out", image_size=SIZE, held_out="none")
  assert f"reports: read from {where}" in summary.notes
  assert summary.examples == {"test": 1, "train": 3, "validation": 1}  # as test_mimic_cxr
  reasons = {s.file: s.reason for s in summary.skipped}
  assert reasons[empty] == "empty report: no FINDINGS or IMPRESSION text"
  train = {r["study_id"]: r for r in records("mimic_cxr", tmp_path / "out", "train")}
  assert train["50000002"]["findings"] == (
    "There is cardiomegaly in study 50000002. The cardiomediastinal silhouette is normal."
  )
  assert train["50000002"]["id"] == frontal["50000002"]


def test_non_utf8_report_inside_the_zip_is_skipped_with_its_reason(tmp_path):
  manual = tmp_path / "manual"
  make_mimic_tree(manual)
  report = manual / "files" / "p10" / "p10000001" / "s50000002.txt"
  report.write_bytes(report.read_bytes().replace(b"There is", b"Th\xe9re is"))
  _pack_reports(manual, folder="")  # an archive without the outer folder is read too
  summary = prepare("mimic_cxr", manual, tmp_path / "out", image_size=SIZE, held_out="none")
  reasons = {s.file: s.reason for s in summary.skipped}
  assert reasons["mimic-cxr-reports.zip/files/p10/p10000001/s50000002.txt"].startswith(
    "report is not UTF-8 text (line 10, byte offset"
  )
  assert summary.examples["train"] == 2


def test_every_study_skipped_names_where_reports_and_images_were_looked_for(tmp_path, capsys):
  manual = tmp_path / "manual"
  frontal = make_mimic_tree(manual)
  _pack_reports(manual, keep_files=False)  # mimic-cxr-reports/p10/...: no report found
  code, _, err = run(
    capsys,
    "mimic_cxr",
    "--manual-dir",
    manual,
    "--data-dir",
    tmp_path / "out",
    "--image-size",
    SIZE,
    "--held-out",
    "none",
  )
  assert code == 2 and "Traceback" not in err
  assert "has no usable example" in err and "report file missing" in err
  zip_path = manual / mimic_cxr.REPORTS_ZIP
  assert (
    f"reports were looked for inside {zip_path} as [FOLDER/]files/pNN/pNNNNNNNN/"
    "sNNNNNNNN.txt (it holds 0 such files; e.g. files/p10/p10000000/s50000001.txt)"
  ) in err
  assert f"images under {manual / 'files'} as files/pNN/pNNNNNNNN/sNNNNNNNN/DICOM_ID.jpg" in err
  first = min(frontal.values())  # the first image of the split, in dicom_id order
  assert first in err

  # Images missing: the message names the image folder and an image path it looked for.
  shutil.rmtree(manual / "files")
  (manual / "files" / "p10" / "p10000000" / "s50000001").mkdir(parents=True)
  (manual / "files" / "p10" / "p10000000" / "s50000001" / "stray.jpg").write_bytes(b"")
  _pack_reports_from_strings(manual)
  code, _, err = run(
    capsys,
    "mimic_cxr",
    "--manual-dir",
    manual,
    "--data-dir",
    tmp_path / "out",
    "--image-size",
    SIZE,
    "--held-out",
    "none",
  )
  assert code == 2 and "image file missing" in err
  assert f"images under {manual / 'files'}" in err


def _pack_reports_from_strings(root: Path) -> None:
  """A well-formed reports archive for every study of make_mimic_tree."""
  (root / mimic_cxr.REPORTS_ZIP).unlink()
  with zipfile.ZipFile(root / mimic_cxr.REPORTS_ZIP, "w") as archive:
    for k in range(8):
      study = f"5000000{k + 1}"
      archive.writestr(
        f"mimic-cxr-reports/files/p10/p1000000{k}/s{study}.txt",
        MIMIC_REPORT.format(finding="clear lungs", impression="Normal."),
      )
