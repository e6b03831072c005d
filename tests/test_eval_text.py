"""The rule labeler's negation handling and the caption scores against pycocoevalcap."""

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from medunifier_jax.evaluators import captioning, labeler


@pytest.fixture(scope="module")
def rules():
  return labeler.RuleLabeler()


@pytest.mark.parametrize(
  "sentence, expected",
  [
    ("No pleural effusion.", {"pleural effusion": False}),
    ("Without evidence of pneumothorax.", {"pneumothorax": False}),
    ("The effusion has resolved.", {"pleural effusion": False}),
    ("Previously seen nodule is no longer seen.", {"nodule": False}),
    (
      "There is no focal consolidation, pleural effusion or pneumothorax.",
      {"consolidation": False, "pleural effusion": False, "pneumothorax": False},
    ),
    (
      "No pneumothorax, but there is a small left pleural effusion.",
      {"pneumothorax": False, "pleural effusion": True},
    ),
    ("Small right pleural effusion blunting the costophrenic angle.", {"pleural effusion": True}),
    ("The heart is mildly enlarged.", {"cardiomegaly": True}),
    ("Moderate cardiomegaly.", {"cardiomegaly": True}),
    ("Resolution of pulmonary edema.", {"edema": False}),
    ("Streaky right lower lobe opacities, likely atelectasis.", {"atelectasis": True}),
    ("Pneumothorax cannot be excluded.", {"pneumothorax": True}),  # hedged: positive (U-ones)
    ("Heart size is normal.", {}),
  ],
)
def test_negation_and_affirmation(rules, sentence, expected):
  assert rules.sentence_findings(sentence) == expected


def test_report_vector_and_no_finding(rules):
  out = rules(
    ["Moderate cardiomegaly. No pleural effusion.", "The lungs are clear. No pneumothorax.", ""]
  )
  names = rules.findings
  assert out.shape == (3, len(names))
  assert dict(zip(names, out[0]))["cardiomegaly"] == 1
  assert dict(zip(names, out[0]))["pleural effusion"] == 0
  assert dict(zip(names, out[0]))["no finding"] == 0
  assert out[1].tolist() == out[2].tolist() == [0] * (len(names) - 1) + [1]
  # An abnormality the labeler does not label still clears "no finding"; a negated one not.
  other = rules(["Calcified granuloma in the left base.", "No focal opacity."])
  assert other[0].tolist() == [0] * len(names) and other[1, -1] == 1
  assert labeler.RuleLabeler(uncertain_positive=False).sentence_findings(
    "Possible left lower lobe atelectasis."
  ) == {"atelectasis": False}
  with pytest.raises(TypeError, match="sequence of reports"):
    rules("No effusion.")
  assert isinstance(labeler.get_labeler("rule"), labeler.RuleLabeler)
  with pytest.raises(KeyError, match="known labelers: rule"):
    labeler.get_labeler("chexbert")


def test_labeler_reads_the_labels_of_templated_phantom_reports(rules):
  """Templated reports state their findings by construction: the labeler must agree."""
  from medunifier_jax.data import findings as findings_lib
  from medunifier_jax.data import phantoms, reports

  rng = np.random.default_rng(0)
  names = [
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Pleural Effusion",
    "Pneumothorax",
    "Nodule",
  ]
  cols = [rules.findings.index(n.lower()) for n in names]
  agree = total = 0
  for i in range(150):
    chosen = [n for n in names if rng.random() < 0.25]
    drawn = tuple(phantoms.sample_finding(n, rng) for n in chosen)
    drawn = tuple(sorted(drawn, key=lambda f: findings_lib.finding_index(f.name)))
    text = reports.templated_report(drawn, rng)
    got = rules([text])[0][cols]
    want = np.array([n in chosen for n in names], int)
    agree += int((got == want).all())
    total += 1
    if not (got == want).all() and i < 3:
      print(text, got, want)
  assert agree == total, f"labeler disagrees on {total - agree} of {total} templated reports"


def test_identical_text_scores_one_and_matches_the_coco_package():
  refs = ["No pleural effusion. Heart size is normal.", "Small left effusion, unchanged."]
  split = lambda t: [s.strip() for s in t.split(".") if s.strip()]
  same = captioning.caption_scores(refs, refs, split_references=False, meteor=False)
  for n in range(1, 5):
    assert same[f"BLEU-{n}"] == pytest.approx(1.0, abs=1e-6)
  assert same["ROUGE-L"] == pytest.approx(1.0)
  assert "METEOR" not in same

  hyps = ["heart size is normal. no effusion.", "there is a small left effusion."]
  ours = captioning.caption_scores(hyps, refs, sentence_splitter=split, meteor=False)
  gts = {i: [captioning.tokenize(s) for s in split(r)] for i, r in enumerate(refs)}
  res = {i: [captioning.tokenize(h)] for i, h in enumerate(hyps)}
  bleu = Bleu(4).compute_score(gts, res, verbose=0)[0]
  assert [ours[f"BLEU-{n}"] for n in range(1, 5)] == pytest.approx(bleu)
  assert ours["ROUGE-L"] == pytest.approx(Rouge().compute_score(gts, res)[0])
  assert ours["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0])
  assert gts[0] == ["no pleural effusion", "heart size is normal"]  # split, lower-cased
  assert 0.0 < ours["BLEU-1"] < 1.0


def test_meteor_is_skipped_with_a_warning_without_java(monkeypatch):
  # The Java run itself (about 20 s to load METEOR's paraphrase table) is left to the
  # evaluation runs; here: without Java the other scores still come, with a warning.
  refs = ["no pleural effusion", "small left effusion"]
  monkeypatch.setattr(captioning.shutil, "which", lambda name: None)
  with pytest.warns(UserWarning, match="METEOR skipped"):
    out = captioning.caption_scores(refs, refs, split_references=False)
  assert "METEOR" not in out and out["BLEU-1"] == pytest.approx(1.0)
  with pytest.warns(UserWarning, match="METEOR skipped"), captioning.MeteorScorer() as scorer:
    assert scorer({0: refs[:1]}, {0: refs[:1]}) is None
