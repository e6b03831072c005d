"""Image-text retrieval on a 5x200-style set: every image against every report.

Similarity = max over query embeddings of the cosine with the report's text embedding, for all
pairs at once (`common.similarity_matrix`, jitted, in image chunks). Both directions are scored:
`i2t_*` (each image queries the reports) and `t2i_*` (each report queries the images).

  R@K        the paired item (the image's own report, the report's own image) is in the top K.
  P@K        the MedUnifier/MGCA code's definition: mean over the relevant hits within the top K
             of the precision at that hit, 0 when there is none (`metrics.hit_precision_at_k`);
             relevant = same class.
  plain_P@K  ordinary precision@K: relevant items in the top K / K.

Diagnostics of the embedding space beside them: `image_emb_rank` and `text_emb_rank`, the
effective number of directions the image embeddings (averaged over queries) and the report
embeddings spread over (`metrics.effective_rank`; up to the embedding width), and per class,
`per_class/NAME/i2t_P@1` (P@1 over the class's images) and `per_class/NAME/i2t_top1_share` (the
share of all images whose top report is of the class: 1 / C when no class's reports crowd out
the others).

Ties are ranked by item index (stable sort). With `itm_rerank_k` > 0, the top k items of every
query are re-scored with the matching head as BLIP-2 does (match logit + similarity) and
ranked above the rest; those figures are reported again with the prefix `itm_`.
"""

from collections.abc import Iterator

import numpy as np

from medunifier_jax.evaluators import common, metrics


class RetrievalEvaluator(common.Evaluator):
  """Settings (`config.evals.retrieval`): datasets, split, batch_size, ks, itm_rerank_k,
  itm_batch_size."""

  task = "retrieval"

  def evaluate(self, dataset: str, graphdef, state) -> Iterator[tuple[str, float]]:
    cfg, fns = self.cfg, self.fns(graphdef)
    source = self.source(dataset, cfg.split)
    rerank = int(cfg.itm_rerank_k)
    keys = ("image_emb", "image_tokens") if rerank else ("image_emb",)
    batches = common.EvalBatches(self.config, self.tokenizer, source, int(cfg.batch_size))
    feats = common.collect_features(
      fns, state, batches, image_keys=keys, text=True, desc=f"retrieval {dataset}"
    )
    if "label" not in feats:
      raise ValueError(
        f"data set {dataset!r} has no `label` per record; retrieval needs the "
        "class of each pair to judge relevance"
      )
    labels = feats["label"]
    n = labels.shape[0]
    sim = np.asarray(common.similarity_matrix(feats["image_emb"], feats["text_emb"]))
    relevant = labels[:, None] == labels[None, :]
    targets = np.arange(n)
    ks = tuple(int(k) for k in cfg.ks)
    self.outputs[dataset] = {"similarity": sim, "labels": labels, "index": feats["index"]}
    yield from metrics.retrieval_metrics(sim, targets, relevant, ks, prefix="i2t_").items()
    yield from metrics.retrieval_metrics(sim.T, targets, relevant.T, ks, prefix="t2i_").items()
    yield "image_emb_rank", metrics.effective_rank(feats["image_emb"].mean(axis=1))
    yield "text_emb_rank", metrics.effective_rank(feats["text_emb"])
    class_names = getattr(source, "class_names", None)
    if class_names:
      top_class = labels[metrics.rank_items(sim, 1)[:, 0]]
      for c, name in enumerate(class_names):
        mine = labels == c
        yield (
          f"per_class/{name}/i2t_P@1",
          float(np.mean(top_class[mine] == c)) if mine.any() else np.nan,
        )
        yield f"per_class/{name}/i2t_top1_share", float(np.mean(top_class == c))
    if rerank:
      i2t = self._rerank(fns, state, sim, feats, rerank, image_queries=True)
      t2i = self._rerank(fns, state, sim.T, feats, rerank, image_queries=False)
      yield from metrics.retrieval_metrics(i2t, targets, relevant, ks, prefix="itm_i2t_").items()
      yield from metrics.retrieval_metrics(t2i, targets, relevant.T, ks, prefix="itm_t2i_").items()

  def _rerank(self, fns, state, scores: np.ndarray, feats, k: int, image_queries: bool):
    """(Q, I) scores -> scores where each query's top k are ITM match logit + similarity."""
    k = min(k, scores.shape[1])
    top = metrics.rank_items(scores, k)  # (Q, k)
    query = np.repeat(np.arange(scores.shape[0]), k)
    item = top.reshape(-1)
    img, txt = (query, item) if image_queries else (item, query)
    logits = np.concatenate(
      common.run_in_chunks(
        lambda img, txt: fns.itm_logits(
          state, feats["image_tokens"][img], feats["input_ids"][txt], feats["attention_mask"][txt]
        ),
        {"img": img, "txt": txt},
        int(self.cfg.itm_batch_size),
      )
    )
    # Items outside the top k keep their order but rank below every re-scored one.
    out = scores - (np.abs(scores).max() + np.abs(logits[:, 1]).max() + 1.0) * 2.0
    rows = np.arange(scores.shape[0])[:, None]
    out[rows, top] = logits[:, 1].reshape(-1, k) + scores[rows, top]
    return out
