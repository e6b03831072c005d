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


def caption_scores(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]], *,
                   split_references: bool = True,
                   sentence_splitter: Callable[[str], list[str]] | None = None,
                   meteor: bool = True) -> dict[str, float]:
  """Corpus-level BLEU-1..4, METEOR, ROUGE-L and CIDEr.

  Args:
    hypotheses: N generated reports.
    references: N reference reports (str), or N lists of reference strings.
    split_references: split each reference string into sentences, each one a reference.
    sentence_splitter: str -> sentences (default: `medunifier_jax.data.text.split_sentences`).
    meteor: compute METEOR (needs Java; skipped with a warning if `java` is missing).
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


def coco_scores(gts: dict, res: dict, *, meteor: bool = True) -> dict[str, float]:
  """pycocoevalcap on already tokenised {id: [refs]} / {id: [hyp]} dicts."""
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.rouge.rouge import Rouge

  out = {}
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  for n, value in enumerate(bleu, start=1):
    out[f"BLEU-{n}"] = float(value)
  if meteor:
    value = meteor_score(gts, res)
    if value is not None:
      out["METEOR"] = value
  out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
  out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
  return out


def meteor_score(gts: dict, res: dict) -> float | None:
  """METEOR 1.5 through pycocoevalcap's Java wrapper; None (with a warning) without Java."""
  if shutil.which("java") is None:
    warnings.warn("METEOR skipped: no `java` on the PATH (install a Java runtime, e.g. "
                  "openjdk-17-jre, to get METEOR)", stacklevel=2)
    return None
  from pycocoevalcap.meteor.meteor import Meteor
  scorer = Meteor()
  try:
    return float(scorer.compute_score(gts, res)[0])
  finally:
    # The wrapper's own __del__ does this too, but only whenever it gets collected.
    scorer.meteor_p.stdin.close()
    scorer.meteor_p.kill()
    scorer.meteor_p.wait()
