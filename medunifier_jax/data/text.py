"""Report text: cleaning for the model input and offline sentence splitting for references.

`clean_report` cleans as the paper's code does: the characters ``! " ( ) * # : ; ~`` become
spaces, runs of whitespace collapse to one space, and the text is cut to `max_words` words (95
in the paper). Full stops stay (they end sentences) and case is left to the tokenizer (the
BERT uncased normaliser lower-cases).

Prepared data sets store reports cleaned but whole (`clean_report(text, max_words=None)`); the
cut to `max_words` happens when a report is tokenised, so changing `config.data.max_words` needs
no rebuild. That relies on cleaning being idempotent: cleaning a stored (already cleaned) report
again gives what cleaning the raw report once gives. `cleaning_rule()` describes the rule; the
builders record it in each prepared data set's fingerprint, and `CLEANING_VERSION` is bumped
whenever the rule's behaviour changes in a way its patterns do not show.

De-identified Open-i reports replace names, dates and many ordinary words by ``XXXX``
("Normal chest x-XXXX.", "Comparison XXXX, XXXX."). Such a run carries no information, so
`clean_report` collapses each run of placeholders (with the commas or spaces between them)
into one `deid_token` (``XXXX`` by default; an empty string drops them). A BERT vocabulary then
sees one token where there was one redacted span instead of spending several on nothing.

`split_sentences` uses pysbd (a rule-based segmenter implementing the "Golden Rules" of
sentence boundary detection; its rules ship inside the package, so it works offline).
Differences from NLTK's punkt, which the paper's evaluation code uses:
  * punkt is an unsupervised statistical model whose parameters (abbreviations, collocations,
    frequent sentence starters) are learned from a corpus and must be downloaded
    (``nltk.download("punkt")``); pysbd needs no data files.
  * Enumerations: impressions such as "... disease. 1. Increased opacity ... 2. XXXX opacity"
    come out of pysbd as one sentence per item with its number in front ("1. Increased
    opacity ..."), though now and then the number comes out as a segment of its own ("1.");
    punkt decides case by case whether "1." ends or starts a sentence. `split_sentences`
    strips item numbers (and drops number-only segments) by default, so a reference
    sentence is the finding itself.
  * Abbreviations and numbers ("Dr.", "e.g.", "vs.", "p.m.", "2.5 cm") are handled by fixed
    rules in pysbd (they stay inside the sentence) and by a learned abbreviation list in
    punkt, so rare abbreviations may split differently.
  * pysbd is slower (about 1 ms per report), irrelevant for building evaluation references.
Sentence counts can therefore differ slightly from published pipelines, and with them scores
computed against per-sentence references.
"""

from __future__ import annotations

import functools
import re

DEFAULT_MAX_WORDS = 95
DEID_TOKEN = "XXXX"
# Version of the cleaning code (the order of its steps, say); the patterns below are recorded
# as they are. 2: punctuation is removed before placeholder runs collapse (idempotent cleaning).
CLEANING_VERSION = 2

_PUNCTUATION = re.compile(r"[!\"()*#:;~]")
_WHITESPACE = re.compile(r"\s+")
# A run of de-identification placeholders, e.g. "XXXX", "XXXX XXXX", "XXXX, XXXX".
_DEID_RUN = re.compile(r"\bX{3,}\b(?:[\s,]+X{3,}\b)*")
_ENUMERATION = re.compile(r"^\(?\d{1,2}[.)](?:\s+|$)")
_HAS_WORD = re.compile(r"\w")
# A cleaned report's sentence ends at a full stop followed by white space ("2.5 cm" stays whole).
# Not `split_sentences`: pysbd costs about 1 ms a report, and `affirmed_sentences` runs on every
# training pair in the input pipeline.
_SENTENCE_END = re.compile(r"(?<=\.)\s+")
# Cues that make a sentence state an absence ("No effusion.", "Lungs are free of consolidation.",
# "Negative for pneumothorax.", "Previous opacity has resolved.").
_NEGATION = re.compile(r"\b(?:no|not|without|negative|free of|resolved)\b", re.IGNORECASE)
ALIGNMENT_TEXTS = ("report", "affirmed")


def clean_report(
  text: str, max_words: int | None = DEFAULT_MAX_WORDS, deid_token: str = DEID_TOKEN
) -> str:
  """Cleans one report for the model input (DESIGN 2.1).

  Args:
    text: the raw report (any whitespace, any length).
    max_words: keep at most this many whitespace-separated words; None keeps all.
    deid_token: what each run of ``XXXX`` placeholders becomes ("" drops it).

  Returns:
    The cleaned text: single spaces, no leading/trailing space, at most `max_words` words.
  """
  if not isinstance(text, str):
    raise TypeError(f"a report must be a str, got {type(text).__name__}: {text!r:.80}")
  if max_words is not None and max_words < 1:
    raise ValueError(f"max_words must be a positive word count or None, got {max_words}")
  # Punctuation goes first: "XXXX: XXXX" is then one run like "XXXX XXXX", and a second pass
  # over the result (the tokenising pass over a stored report) finds nothing left to change.
  text = _PUNCTUATION.sub(" ", text)
  text = _DEID_RUN.sub(deid_token, text)
  words = _WHITESPACE.sub(" ", text).strip().split(" ")
  if max_words is not None:
    words = words[:max_words]
  return " ".join(words)


def affirmed_sentences(text: str) -> str:
  """A cleaned report without the sentences that carry a negation cue (`_NEGATION`).

  The alignment objectives' text under `config.data.alignment_text = "affirmed"`
  (docs/PAPER_NOTES.md section 9): a text side learned from scratch reads "No cardiomegaly."
  much as "cardiomegaly", and most sentences of the reports are of that kind.
  Sentences end at a full stop followed by white space. A report whose every sentence is
  negated (a normal study) is returned whole, so no pair loses its text.

  Args:
    text: a report cleaned by `clean_report` (full stops kept).

  Returns:
    The kept sentences joined by single spaces, in order.
  """
  sentences = [s for s in _SENTENCE_END.split(text.strip()) if s]
  kept = [s for s in sentences if not _NEGATION.search(s)]
  return " ".join(kept) if kept else " ".join(sentences)


def cleaning_rule() -> dict[str, object]:
  """What `clean_report` does to a stored report, as plain data (for data set fingerprints).

  Any change to the patterns, the placeholder token or `CLEANING_VERSION` changes the result,
  so a data set prepared under another rule is detected instead of silently reused.
  """
  return {
    "version": CLEANING_VERSION,
    "punctuation": _PUNCTUATION.pattern,
    "whitespace": _WHITESPACE.pattern,
    "deid_run": _DEID_RUN.pattern,
    "deid_token": DEID_TOKEN,
  }


@functools.cache
def _segmenter():
  import pysbd  # Imported on first use: loading its rules costs ~0.1 s.

  return pysbd.Segmenter(language="en", clean=False)


def split_sentences(text: str, strip_enumeration: bool = True) -> list[str]:
  """Splits a report into sentences with pysbd (offline; see the module docstring).

  Args:
    text: the raw report.
    strip_enumeration: remove a leading item number ("1. ", "2) ") from each sentence.

  Returns:
    The sentences, stripped, in order; fragments without any word character (a stray ".")
    are dropped. An empty or blank report gives [].
  """
  if not isinstance(text, str):
    raise TypeError(f"a report must be a str, got {type(text).__name__}: {text!r:.80}")
  text = _WHITESPACE.sub(" ", text).strip()
  if not text:
    return []
  sentences = []
  for s in _segmenter().segment(text):
    s = s.strip()
    if strip_enumeration:
      s = _ENUMERATION.sub("", s)
    if _HAS_WORD.search(s):
      sentences.append(s)
  return sentences
