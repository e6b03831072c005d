"""A negation-aware rule-based report labeler (the clinical-efficacy reader).

On real data the role is usually played by CheXbert; its weights cannot be fetched here, so this
NegEx-style labeler reads the findings a report states. Anything with the `Labeler` interface
(a `findings` tuple and `__call__(reports) -> (N, F)` 0/1 array) can replace it.

How a sentence is read:
  1. Each finding has regular expressions for its mentions ("pleural effusion", "costophrenic
     blunting", "heart is enlarged", ...).
  2. The sentence is cut into clauses at contrastive words ("but", "however", ";", ...).
  3. A mention is negated when a negation cue ("no", "without", "negative for", "free of",
     "resolution of", ...) precedes it in its clause, or a post-negation cue ("has resolved",
     "is not seen", "no longer seen", ...) follows it in its clause.
  4. Hedged mentions ("possible", "cannot be excluded") count as positive by default
     (`uncertain_positive`), as CheXpert's U-ones policy does.
A finding is positive for a report when any sentence states it un-negated. "No finding" is
positive when none of the other findings is, nor any other abnormality (`OTHER_ABNORMAL`:
opacity, pneumonia, granuloma, mass, ...) that the labeler does not label.
"""

import re
from collections.abc import Sequence
from typing import Protocol

import numpy as np

FINDINGS = (
  "atelectasis",
  "cardiomegaly",
  "consolidation",
  "edema",
  "pleural effusion",
  "pneumothorax",
  "nodule",
  "no finding",
)

_SIZE = (
  r"(?:(?:mild|mildly|moderate|moderately|marked|markedly|severe|severely|slight|"
  r"slightly)\s+)?"
)
MENTIONS: dict[str, tuple[str, ...]] = {
  "atelectasis": (r"atelecta\w*", r"collapse[sd]?", r"volume loss"),
  "cardiomegaly": (
    r"cardiomegaly",
    rf"(?:heart|cardiac silhouette|cardiac shadow|heart size|cardiac size)\s+(?:is\s+|are\s+|"
    rf"remains\s+|appears\s+)?{_SIZE}(?:enlarged|increased|prominent)",
    rf"{_SIZE}enlarge(?:d|ment of the)\s+(?:heart|cardiac silhouette|cardiac shadow)",
    rf"{_SIZE}enlarged heart size",
    r"enlargement of the (?:heart|cardiac silhouette)",
  ),
  "consolidation": (r"consolidat\w*",),
  "edema": (
    r"edema",
    r"oedema",
    r"(?:pulmonary|vascular|interstitial) congestion",
    r"chf",
    r"congestive heart failure",
  ),
  "pleural effusion": (
    r"effusions?",
    r"pleural fluid",
    r"(?:blunting of the|blunted)\s+(?:\w+\s+)?costophrenic",
    r"costophrenic (?:angle )?blunting",
    r"hydrothorax",
  ),
  "pneumothorax": (r"pneumothora(?:x|ces)",),
  "nodule": (r"nodul\w*",),
}

# Other abnormalities: not labelled themselves, but stating one clears "no finding" (as any
# positive CheXpert observation but support devices does).
OTHER_ABNORMAL = (
  r"pneumonia",
  r"opacit(?:y|ies)",
  r"infiltrates?",
  r"airspace disease",
  r"granulomas?",
  r"granulomatous",
  r"covid(?:-19)?",
  r"mass(?:es)?",
  r"fractures?",
  r"emphysema",
  r"scarring",
  r"fibrosis",
)

# Cues whose scope runs forward to the end of the clause.
PRE_NEGATION = (
  r"no",
  r"not",
  r"without",
  r"negative for",
  r"free of",
  r"clear of",
  r"absence of",
  r"absent",
  r"resolution of",
  r"resolved",
  r"rather than",
  r"no evidence of",
  r"no signs? of",
  r"neither",
  r"nor",
  r"never",
)
# Cues whose scope runs backward to the start of the clause.
POST_NEGATION = (
  r"(?:has|have)\s+(?:\w+\s+)?resolved",
  r"(?:has|have)\s+(?:\w+\s+)?cleared",
  r"(?:is|are|was|were)\s+(?:no longer|not)\s+(?:seen|present|identified|visualized|"
  r"evident|appreciated|demonstrated)",
  r"no longer (?:seen|present|visualized|evident)",
  r"(?:is|are) absent",
  r"resolved",
)
UNCERTAIN = (
  r"possible",
  r"possibly",
  r"probable",
  r"may",
  r"might",
  r"suspect\w*",
  r"question of",
  r"questionable",
  r"concern(?:ing)? for",
  r"cannot be (?:excluded|ruled out)",
  r"not (?:be )?(?:excluded|ruled out)",
  r"versus",
  r"vs",
  r"suggest\w*",
  r"likely",
)
CLAUSE_BREAK = r"\b(?:but|however|although|though|whereas|while|except|aside from|which)\b|;"

_WORD = lambda p: re.compile(rf"\b(?:{p})\b", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


class Labeler(Protocol):
  """What the report-generation evaluator needs from a labeler."""

  findings: tuple[str, ...]

  def __call__(self, reports: Sequence[str]) -> np.ndarray:
    """N reports -> (N, len(findings)) 0/1 int array."""
    ...


class RuleLabeler:
  """Negation-aware rule labeler over `FINDINGS` (module docstring gives the rules)."""

  def __init__(self, uncertain_positive: bool = True):
    self.findings = FINDINGS
    self.uncertain_positive = uncertain_positive
    self._mentions = {f: [_WORD(p) for p in pats] for f, pats in MENTIONS.items()}
    self._mentions["other"] = [_WORD("|".join(OTHER_ABNORMAL))]
    self._pre = _WORD("|".join(PRE_NEGATION))
    self._post = _WORD("|".join(POST_NEGATION))
    self._uncertain = _WORD("|".join(UNCERTAIN))
    self._clause = re.compile(CLAUSE_BREAK, re.IGNORECASE)

  def __call__(self, reports: Sequence[str]) -> np.ndarray:
    if isinstance(reports, str):
      raise TypeError("expected a sequence of reports, got one string; wrap it in a list")
    return (
      np.stack([self.label_report(r) for r in reports])
      if len(reports)
      else np.zeros((0, len(self.findings)), np.int64)
    )

  def label_report(self, report: str) -> np.ndarray:
    """One report -> (F,) 0/1 in `self.findings` order."""
    found = set()
    for sentence in _SENTENCE_END.split(report or ""):
      for clause in self._clause.split(sentence):
        found |= self._clause_findings(clause)
    out = np.array([f in found for f in self.findings], np.int64)
    out[self.findings.index("no finding")] = int(not found)  # "other" counts here only
    return out

  def sentence_findings(self, sentence: str) -> dict[str, bool]:
    """Finding -> True (stated) / False (mentioned but negated), for the mentioned findings."""
    out: dict[str, bool] = {}
    for clause in self._clause.split(sentence):
      for finding, positive in self._clause_mentions(clause):
        if finding != "other":
          out[finding] = out.get(finding, False) or positive
    return out

  def _clause_findings(self, clause: str) -> set[str]:
    return {finding for finding, positive in self._clause_mentions(clause) if positive}

  def _clause_mentions(self, clause: str):
    """Yields (finding, positive) for every mention in one clause."""
    # "cannot be excluded", "not ruled out": that "not" hedges, it does not negate.
    hedge_spans = [m.span() for m in self._uncertain.finditer(clause)]
    in_hedge = lambda pos: any(a <= pos < b for a, b in hedge_spans)
    pre = [m.start() for m in self._pre.finditer(clause) if not in_hedge(m.start())]
    post = [m.start() for m in self._post.finditer(clause) if not in_hedge(m.start())]
    for finding, patterns in self._mentions.items():
      for pattern in patterns:
        for m in pattern.finditer(clause):
          if any(p < m.start() for p in pre) or any(p >= m.end() for p in post):
            yield finding, False
          elif hedge_spans:
            yield finding, self.uncertain_positive
          else:
            yield finding, True


# Name -> labeler factory, for `config.evals.report_gen.labeler`. A learned labeler (e.g.
# CheXbert with local weights) registers here under its own name.
LABELERS = {"rule": RuleLabeler}


def get_labeler(name: str) -> Labeler:
  """A labeler by name; a KeyError lists the known names."""
  try:
    return LABELERS[name]()
  except KeyError:
    raise KeyError(f"unknown labeler {name!r}; known labelers: {', '.join(LABELERS)}") from None
