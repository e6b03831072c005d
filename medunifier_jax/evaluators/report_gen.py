"""Report generation: decode a report per image, score it against the study's report.

Decoding (`medunifier_jax.generation`): beam search with 3 beams, max length 95, min length 3,
no repetition penalty by default (the paper's settings); greedy and nucleus sampling by
setting `method`. N-gram scores: BLEU-1..4, METEOR, ROUGE-L, CIDEr with the COCO caption code
(`captioning.py`), references = the cleaned report's sentences.

Clinical efficacy (`ce_*`): a labeler (setting `labeler`, by name from `labeler.LABELERS`;
default "rule", the negation-aware `labeler.RuleLabeler`; or any `labeler.Labeler` passed to
the constructor) reads the findings each generated report states; precision, recall and F1
(micro and macro, plus F1 per finding) against the study's labels, over the findings the
labeler and the data set's label vector share. A data set without labels is compared with the
labeler's reading of the reference report instead (stated in the settings as `ce_reference`).

With `baseline`, the same scores are computed for a model-free baseline that returns the most
frequent training report for every image (`baseline/*`).
"""

import contextlib
from collections import Counter
from collections.abc import Iterator

import jax
import numpy as np

from medunifier_jax import generation
from medunifier_jax.evaluators import captioning, common
from medunifier_jax.evaluators import labeler as labeler_lib
from medunifier_jax.evaluators import metrics as metrics_lib

_nothing = contextlib.nullcontext


class ReportGenEvaluator(common.Evaluator):
  """Settings (`config.evals.report_gen`): datasets, split, train_split, batch_size,
  max_examples (0: all), decoding (method, num_beams, max_length, min_length, length_penalty,
  repetition_penalty, early_stopping, top_p, temperature), seed, meteor, split_references,
  baseline, labeler."""

  task = "report_gen"

  def __init__(
    self, config, task_config, tokenizer, labeler: labeler_lib.Labeler | None = None, **kwargs
  ):
    super().__init__(config, task_config, tokenizer, **kwargs)
    self.labeler = labeler or labeler_lib.get_labeler(task_config.get("labeler", "rule"))
    self.decoding = generation.DecodingConfig.from_mapping(task_config)
    self._generators: dict = {}

  def generator(self, graphdef) -> generation.ReportGenerator:
    """The report generator for this graph (its compiled decoders are kept and reused)."""
    if graphdef not in self._generators:
      self._generators[graphdef] = generation.ReportGenerator(
        graphdef, self.tokenizer, int(self.config.model.qformer.dec_token_id)
      )
    return self._generators[graphdef]

  def generate(self, graphdef, state, source, desc: str = "") -> dict[str, np.ndarray | list]:
    """Generated reports for every record of `source`, with indices and labels."""
    from tqdm.auto import tqdm

    generator = self.generator(graphdef)
    rng = jax.random.key(int(self.cfg.seed))
    texts, index, labels = [], [], []
    batches = common.EvalBatches(self.config, self.tokenizer, source, int(self.cfg.batch_size))
    for b, batch in enumerate(
      tqdm(batches, desc=desc or "generating", leave=False, disable=not desc)
    ):
      keep = batch["mask"].astype(bool)
      decoded = generator(state, batch["image"], self.decoding, jax.random.fold_in(rng, b))
      texts += [t for t, k in zip(decoded, keep) if k]
      index.append(batch["index"][keep])
      if "labels" in batch:
        labels.append(batch["labels"][keep])
    return {
      "texts": texts,
      "index": np.concatenate(index),
      "labels": np.concatenate(labels) if labels else None,
    }

  def evaluate(self, dataset: str, graphdef, state) -> Iterator[tuple[str, float]]:
    from medunifier_jax.data import pipeline
    from medunifier_jax.data import text as text_lib

    cfg = self.cfg
    source = self.source(dataset, cfg.split)
    if int(cfg.max_examples) > 0:
      source = common.Subset(source, int(cfg.max_examples))
    gen = self.generate(graphdef, state, source, desc=f"report generation {dataset}")
    clean = lambda t: text_lib.clean_report(t, self.config.data.get("max_words", 95))
    all_reports = pipeline.source_reports(source)
    references = [clean(all_reports[i]) for i in gen["index"]]
    self.outputs[dataset] = {
      "generated": gen["texts"],
      "references": references,
      "index": gen["index"],
    }
    with captioning.MeteorScorer() if cfg.meteor else _nothing() as meteor:
      yield from self._scores(gen["texts"], references, gen["labels"], meteor).items()
      if cfg.baseline:
        train_reports = pipeline.source_reports(self.source(dataset, cfg.train_split))
        mode = Counter(clean(r) for r in train_reports).most_common(1)[0][0]
        self.outputs[dataset]["baseline_report"] = mode
        for metric, value in self._scores(
          [mode] * len(references), references, gen["labels"], meteor
        ).items():
          yield f"baseline/{metric}", value

  def _scores(self, hypotheses, references, labels, meteor) -> dict[str, float]:
    out = captioning.caption_scores(
      hypotheses,
      references,
      split_references=bool(self.cfg.split_references),
      meteor=meteor or False,
    )
    for metric, value in self.clinical_efficacy(hypotheses, references, labels).items():
      out[f"ce_{metric}"] = value
    return out

  def clinical_efficacy(self, hypotheses, references, labels) -> dict[str, float]:
    """Labeler findings of the hypotheses against the study labels (or the references)."""
    predicted = self.labeler(hypotheses)
    if labels is None:
      return metrics_lib.multilabel_prf(predicted, self.labeler(references), self.labeler.findings)
    from medunifier_jax.data import findings as findings_lib

    by_name = {n.lower(): i for i, n in enumerate(findings_lib.FINDINGS)}
    shared = [
      (j, by_name[f.lower()]) for j, f in enumerate(self.labeler.findings) if f.lower() in by_name
    ]
    if not shared:
      raise ValueError(
        f"the labeler's findings {self.labeler.findings} share none with the "
        f"data set's labels {findings_lib.FINDINGS}"
      )
    cols, label_cols = zip(*shared)
    reference = (np.asarray(labels)[:, list(label_cols)] > 0.5).astype(np.int64)
    names = [self.labeler.findings[j] for j in cols]
    return metrics_lib.multilabel_prf(predicted[:, list(cols)], reference, names)

  def settings(self) -> dict:
    out = super().settings()
    out["labeler_class"] = type(self.labeler).__name__
    out["ce_reference"] = "study labels (labeler on the reference report where none)"
    return out
