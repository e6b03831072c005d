"""Templated radiology reports for phantoms, and a small negation-aware finding matcher.

`templated_report(findings, rng)` writes "FINDINGS: ... IMPRESSION: ..." in varied words: each
present finding with its severity and side, a random selection of negations of absent ones, and
an impression that summarises. It never states a finding the labels deny: every sentence is
either purely positive or purely negated, and `mentioned_findings` (the matcher the tests use)
reads that back.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from medunifier_jax.data.findings import FINDINGS
from medunifier_jax.data.phantoms import Finding

_SEVERITY = {
  "default": {
    "mild": ("mild", "minimal", "slight"),
    "moderate": ("moderate",),
    "severe": ("severe", "marked", "extensive"),
  },
  "size": {
    "mild": ("small", "small", "tiny"),
    "moderate": ("moderate", "moderate-sized"),
    "severe": ("large", "large"),
  },
}
_ADVERB = {"mild": ("mildly",), "moderate": ("moderately",), "severe": ("markedly", "severely")}
_NODULE_SIZE = {
  "mild": ("6 mm", "7 mm", "small"),
  "moderate": ("1 cm", "12 mm"),
  "severe": ("2 cm", "large"),
}

_POSITIVE = {
  "Cardiomegaly": (
    "The heart is {adv} enlarged.",
    "{Sev} cardiomegaly.",
    "There is {sev} cardiomegaly.",
    "The cardiac silhouette is {adv} enlarged.",
  ),
  "Pleural Effusion": (
    "{Size} {side} pleural effusion{s}.",
    "There is a {size} {side} pleural effusion{s}.",
    "{Size} {side} pleural effusion{s} blunting the costophrenic angle{s}.",
  ),
  "Consolidation": (
    "Dense consolidation in the {lobe}.",
    "There is {sev} consolidation of the {lobe}.",
    "{Sev} consolidation in the {lobe}.",
  ),
  "Pneumonia": (
    "Patchy airspace opacity in the {lobe}, concerning for pneumonia.",
    "{Sev} patchy opacities in the {lobe} consistent with pneumonia.",
    "Ill-defined opacity in the {lobe} compatible with pneumonia.",
  ),
  "Atelectasis": (
    "Linear atelectasis in the {lobe}.",
    "{Sev} plate-like atelectasis at the {base}.",
    "Streaky {lobe} opacities, likely atelectasis.",
  ),
  "Edema": (
    "{Sev} pulmonary edema with perihilar haziness.",
    "There is {sev} interstitial edema with Kerley B lines.",
    "Perihilar haziness and septal lines consistent with {sev} pulmonary edema.",
  ),
  "Pneumothorax": (
    "{Size} {side} pneumothorax.",
    "There is a {size} {side} apical pneumothorax with a visible visceral pleural line.",
    "A {size} {side} pneumothorax is present.",
  ),
  "Nodule": (
    "A {nodule} nodule{s} in the {lobe}.",
    "There {is} {a}{nodule} pulmonary nodule{s} in the {lobe}.",
    "{A}{nodule} nodular opacit{ies} projecting over the {lobe}.",
  ),
  "Calcified Granuloma": (
    "Calcified granuloma{s} in the {lobe}.",
    "There {is} {a}small calcified granuloma{s} in the {lobe}.",
    "{A}calcified granuloma{s} projecting over the {lobe}.",
  ),
  "COVID-19": (
    "Bilateral peripheral ground-glass opacities, typical of COVID-19.",
    "{Sev} multifocal peripheral opacities in both lower lungs, compatible with COVID-19.",
    "Bilateral patchy peripheral opacities, consistent with COVID-19 infection.",
  ),
}
_DEVICE = {
  "endotracheal tube": (
    "Endotracheal tube in standard position.",
    "The endotracheal tube tip is above the carina.",
  ),
  "central venous catheter": (
    "Right subclavian central venous catheter with tip in the SVC.",
    "A right-sided central venous catheter terminates in the SVC.",
  ),
  "pacemaker": (
    "Left chest wall pacemaker with lead in the right ventricle.",
    "A left-sided pacemaker is in place.",
  ),
  "ecg leads": (
    "ECG leads overlie the chest.",
    "External monitoring leads project over the chest.",
  ),
}
_IMPRESSION = {
  "Cardiomegaly": ("{Sev} cardiomegaly.",),
  "Pleural Effusion": ("{Size} {side} pleural effusion{s}.",),
  "Consolidation": ("Consolidation in the {lobe}.", "{Sev} consolidation of the {lobe}."),
  "Pneumonia": ("Pneumonia in the {lobe}.", "Findings concerning for pneumonia in the {lobe}."),
  "Atelectasis": ("Atelectasis in the {lobe}.", "{Sev} atelectasis."),
  "Edema": ("{Sev} pulmonary edema.",),
  "Pneumothorax": ("{Size} {side} pneumothorax.",),
  "Nodule": ("Pulmonary nodule{s} in the {lobe}; CT recommended.", "Nodule{s} in the {lobe}."),
  "Calcified Granuloma": ("Calcified granuloma{s}, benign.", "Old granulomatous disease."),
  "COVID-19": ("Findings compatible with COVID-19.",),
  "Support Devices": ("Support devices as described.", "Lines and tubes as above."),
}
# Negations of absent findings (one finding per sentence, or two both absent).
_NEGATIVE = {
  "Pleural Effusion": (
    "No pleural effusion.",
    "There is no pleural effusion.",
    "No evidence of pleural effusion.",
  ),
  "Pneumothorax": ("No pneumothorax.", "There is no pneumothorax.", "No evidence of pneumothorax."),
  "Consolidation": ("No focal consolidation.", "There is no focal consolidation."),
  "Edema": ("No pulmonary edema.", "There is no pulmonary edema."),
  "Cardiomegaly": (
    "Heart size is normal.",
    "The cardiac silhouette is within normal limits.",
    "No cardiomegaly.",
  ),
  "Pneumonia": ("No evidence of pneumonia.",),
  "Nodule": ("No suspicious pulmonary nodules.",),
  "Atelectasis": ("No atelectasis.",),
}
_NEGATIVE_PAIR = "No pleural effusion or pneumothorax."
_CLEAR_LUNGS = (
  "The lungs are clear.",
  "Lungs are clear bilaterally.",
  "The lungs are well expanded and clear.",
)
_NORMAL_IMPRESSION = (
  "No acute cardiopulmonary abnormality.",
  "No acute cardiopulmonary process.",
  "Normal chest radiograph.",
  "No active disease.",
)
# Every finding but the heart's, devices and "No Finding" concerns the lungs or pleura.
_LUNG_FINDINGS = set(FINDINGS) - {"No Finding", "Cardiomegaly", "Support Devices"}


class _Draws:
  """Uniform draws taken from `rng` in one call (per-call overhead dominates small draws)."""

  def __init__(self, rng: np.random.Generator, n: int = 64):
    self._rng, self._n = rng, n
    self._u: list[float] = []

  def random(self) -> float:
    if not self._u:
      self._u = self._rng.random(self._n).tolist()
    return self._u.pop()

  def choice(self, options: Sequence[str]) -> str:
    return options[int(self.random() * len(options))]


def _lobe(f: Finding) -> str:
  zone = f.zone or "lower"
  if f.side not in ("right", "left"):
    return {"upper": "both upper lobes", "middle": "mid lungs", "lower": "both lower lobes"}[zone]
  if zone == "middle":
    return "right middle lobe" if f.side == "right" else "lingula"
  return f"{f.side} {zone} lobe"


_FIELD = re.compile(r"{(\w+)}")


def _fill(template: str, f: Finding, d: _Draws) -> str:
  plural = (f.side == "bilateral" and f.name == "Pleural Effusion") or f.count > 1
  kind = "size" if f.name in ("Pleural Effusion", "Pneumothorax") else "default"
  side = f.side if f.side in ("right", "left") else "bilateral"
  words = {
    "sev": lambda: d.choice(_SEVERITY["default"][f.severity]),
    "size": lambda: d.choice(_SEVERITY[kind][f.severity]),
    "adv": lambda: d.choice(_ADVERB[f.severity]),
    "side": lambda: side,
    "lobe": lambda: _lobe(f),
    "base": lambda: {"right": "right base", "left": "left base"}.get(side, "lung bases"),
    "nodule": lambda: d.choice(_NODULE_SIZE[f.severity]),
    "s": lambda: "s" if plural else "",
    "is": lambda: "are" if plural else "is",
    "a": lambda: "" if plural else "a ",
    "ies": lambda: "ies" if plural else "y",
  }

  def word(m: re.Match) -> str:
    key = m.group(1)
    value = words[key.lower()]()
    return value[:1].upper() + value[1:] if key[0].isupper() else value

  text = re.sub(r"\ba ([aeiou])", r"an \1", _FIELD.sub(word, template))
  return text[0].upper() + text[1:]


def templated_report(findings_: Sequence[Finding], rng: np.random.Generator) -> str:
  """A report "FINDINGS: ...\nIMPRESSION: ..." that agrees with `findings_`."""
  d = _Draws(rng)
  present = {f.name for f in findings_}
  findings_text, impression = [], []
  for f in findings_:
    if f.name == "Support Devices":
      findings_text.append(d.choice(_DEVICE[f.device or "endotracheal tube"]))
    else:
      findings_text.append(_fill(d.choice(_POSITIVE[f.name]), f, d))
    impression.append(_fill(d.choice(_IMPRESSION[f.name]), f, d))

  negations = []
  if not present & _LUNG_FINDINGS and d.random() < 0.8:
    negations.append(d.choice(_CLEAR_LUNGS))
  absent = [n for n in _NEGATIVE if n not in present]
  if "Pleural Effusion" in absent and "Pneumothorax" in absent and d.random() < 0.5:
    negations.append(_NEGATIVE_PAIR)
    absent = [n for n in absent if n not in ("Pleural Effusion", "Pneumothorax")]
  absent.sort(key=lambda _: d.random())  # a random subset of 1-3 negations
  for name in absent[: 1 + int(d.random() * 3)]:
    negations.append(d.choice(_NEGATIVE[name]))
  body = findings_text + negations
  if d.random() < 0.3:
    body.sort(key=lambda _: d.random())

  if present <= {"Support Devices"}:
    impression.append(d.choice(_NORMAL_IMPRESSION))
  return f"FINDINGS: {' '.join(body)}\nIMPRESSION: {' '.join(impression)}"


# Negation-aware matcher: keyword patterns per finding, and cues that negate a sentence.
KEYWORDS = {
  "Atelectasis": r"atelecta",
  "Cardiomegaly": r"cardiomegaly|(heart|cardiac silhouette)\b[^.]*\benlarged|enlarged (heart|card)",
  "Consolidation": r"consolidat",
  "Edema": r"edema|vascular congestion|kerley",
  "Pleural Effusion": r"effusion",
  "Pneumonia": r"pneumonia",
  "Pneumothorax": r"pneumothora",
  "Nodule": r"nodul",
  "Calcified Granuloma": r"granulom",
  "Support Devices": r"pacemaker|endotracheal|catheter|support devices?|monitoring leads|"
  r"ecg leads|lines and tubes|\btube\b",
  "COVID-19": r"covid",
}
_NEGATION = re.compile(r"\b(no|not|without|negative for|free of|resolved)\b")


def mentioned_findings(text: str) -> tuple[set[str], set[str]]:
  """(positively mentioned, negated) finding names in `text`, sentence by sentence.

  A sentence that contains a negation cue before a keyword negates that finding; otherwise the
  keyword counts as positive. Good enough for templated text; not a clinical labeler.
  """
  positive, negative = set(), set()
  for sentence in re.split(r"(?<=[.;])\s+|\n", text.lower()):
    for name, pattern in KEYWORDS.items():
      m = re.search(pattern, sentence)
      if m is None:
        continue
      cue = _NEGATION.search(sentence[: m.start()])
      (negative if cue else positive).add(name)
  return positive, negative
