"""Report-generation n-gram scores with the COCO caption evaluation package (pycocoevalcap).

BLEU-1..4, METEOR, ROUGE-L and CIDEr(-D), the field's standard. Text is lower-cased and
punctuation dropped by a small Python tokenizer (the package's PTB tokenizer needs Java and
would make every score depend on it); METEOR alone runs on Java and is skipped with a warning
when no `java` is on the PATH.

References follow the paper's code: each reference report is split into sentences and every
sentence becomes one reference for that image.
"""

import re
import shutil
import warnings
from collections.abc import Callable, Sequence

_NON_WORD = re.compile(r"[^a-z0-9\s]+")


def tokenize(text: str) -> str:
  """Lower-cases, drops punctuation, collapses whitespace: 'No  effusion.' -> 'no effusion'."""
  return " ".join(_NON_WORD.sub(" ", text.lower()).split())


def default_sentence_splitter() -> Callable[[str], list[str]]:
  from medunifier_jax.data.text import split_sentences

  return split_sentences


def caption_scores(
  hypotheses: Sequence[str],
  references: Sequence[str | Sequence[str]],
  *,
  split_references: bool = True,
  sentence_splitter: Callable[[str], list[str]] | None = None,
  meteor: "bool | MeteorScorer" = True,
) -> dict[str, float]:
  """Corpus-level BLEU-1..4, METEOR, ROUGE-L and CIDEr.

  Args:
    hypotheses: N generated reports.
    references: N reference reports (str), or N lists of reference strings.
    split_references: split each reference string into sentences, each one a reference.
    sentence_splitter: str -> sentences (default: `medunifier_jax.data.text.split_sentences`).
    meteor: compute METEOR (needs Java; skipped with a warning if `java` is missing); pass a
      `MeteorScorer` to reuse one Java process across calls.
  Returns:
    {"BLEU-1", ..., "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}; METEOR is absent when skipped.
  """

  if len(hypotheses) != len(references):
    raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
  if not hypotheses:
    raise ValueError("no hypotheses to score")
  if split_references and sentence_splitter is None:
    sentence_splitter = default_sentence_splitter()
  gts, res = {}, {}
  for i, (hyp, ref) in enumerate(zip(hypotheses, references)):
    refs = [ref] if isinstance(ref, str) else list(ref)
    if split_references:
      refs = [s for r in refs for s in sentence_splitter(r)]
    refs = [t for t in (tokenize(r) for r in refs) if t]
    # An empty string would break the scorers' n-gram counts; "" scores 0 against anything.
    gts[i] = refs or ["<empty>"]
    res[i] = [tokenize(hyp) or "<empty>"]
  return coco_scores(gts, res, meteor=meteor)


def coco_scores(gts: dict, res: dict, *, meteor: "bool | MeteorScorer" = True) -> dict[str, float]:
  """pycocoevalcap on already tokenised {id: [refs]} / {id: [hyp]} dicts."""
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.rouge.rouge import Rouge

  out = {}
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  for n, value in enumerate(bleu, start=1):
    out[f"BLEU-{n}"] = float(value)
  if isinstance(meteor, MeteorScorer):
    value = meteor(gts, res)
  elif meteor:
    with MeteorScorer() as scorer:
      value = scorer(gts, res)
  else:
    value = None
  if value is not None:
    out["METEOR"] = value
  out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
  out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
  return out


class MeteorScorer:
  """METEOR 1.5 through pycocoevalcap's Java wrapper, one Java process for many calls.

  Use as a context manager (the process is stopped on exit). Without `java` on the PATH it
  warns once and every call returns None.
  """

  def __init__(self):
    self._scorer = None
    self.available = shutil.which("java") is not None
    if not self.available:
      warnings.warn(
        "METEOR skipped: no `java` on the PATH (install a Java runtime, e.g. "
        "openjdk-17-jre, to get METEOR)",
        stacklevel=2,
      )

  def __call__(self, gts: dict, res: dict) -> float | None:
    if not self.available:
      return None
    if self._scorer is None:
      from pycocoevalcap.meteor.meteor import Meteor

      self._scorer = Meteor()
    return float(self._scorer.compute_score(gts, res)[0])

  def close(self) -> None:
    if self._scorer is not None:
      # The wrapper's own __del__ does this too, but only whenever it gets collected.
      process = self._scorer.meteor_p
      process.stdin.close()
      process.kill()
      process.wait()
      self._scorer = None

  def __enter__(self) -> "MeteorScorer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
