"""Zero-shot classification by image-prompt similarity (GLoRIA / MedCLIP protocol).

For each class, `num_prompts` prompts are sampled with a fixed seed from severity x subtype x
location word lists (`prompts.py`). An image's score for a class is the maximum over that
class's prompts of the image-text similarity (itself the maximum over the query embeddings of
the cosine with the prompt's text embedding); scores divided by the model's temperature go
through a softmax over classes. Reported: accuracy, macro F1, one-vs-rest AUC, sensitivity,
specificity, PPV, NPV (`metrics.classification_metrics`; binary sets such as RSNA-like
pneumonia vs normal report the positive class).

With `itm_rescore`, the class score is instead the maximum over the class's prompts of the
image-text matching head's log-probability of "match" (every image against every prompt).
"""

from collections.abc import Iterator

import numpy as np

from medunifier_jax.evaluators import common, metrics, prompts


class ZeroShotEvaluator(common.Evaluator):
  """Settings (`config.evals.zero_shot`): datasets, split, num_prompts, prompt_seed,
  batch_size, itm_rescore, itm_batch_size."""

  task = "zero_shot"

  def evaluate(self, dataset: str, graphdef, state) -> Iterator[tuple[str, float]]:
    cfg, fns = self.cfg, self.fns(graphdef)
    source = self.source(dataset, cfg.split)
    class_names = common.source_class_names(source, dataset)
    class_prompts = prompts.class_prompts(class_names, int(cfg.num_prompts), int(cfg.prompt_seed))
    texts = [p for name in class_names for p in class_prompts[name]]
    owner = np.array([c for c, name in enumerate(class_names) for _ in class_prompts[name]])

    keys = ("image_emb", "image_tokens") if cfg.itm_rescore else ("image_emb",)
    batches = common.EvalBatches(self.config, self.tokenizer, source, int(cfg.batch_size))
    feats = common.collect_features(fns, state, batches, image_keys=keys,
                                    desc=f"zero-shot {dataset}")
    if "label" not in feats:
      raise ValueError(f"data set {dataset!r} has no `label` per record; zero-shot needs one")
    max_len = int(self.config.data.max_text_len)
    tok = self._tokenize(texts, max_len)
    if cfg.itm_rescore:
      prompt_scores = self._itm_scores(fns, state, feats["image_tokens"], tok)
    else:
      text_emb = np.concatenate(common.run_in_chunks(
          lambda input_ids, attention_mask: fns.text_features(state, input_ids, attention_mask),
          tok, int(cfg.batch_size)))
      sim = np.asarray(common.similarity_matrix(feats["image_emb"], text_emb))
      prompt_scores = sim / float(fns.temperature(state))
    class_scores = np.stack([prompt_scores[:, owner == c].max(axis=1)
                             for c in range(len(class_names))], axis=1)
    probs = common.softmax(class_scores, axis=1)
    self.outputs[dataset] = {"labels": feats["label"], "probs": probs,
                             "class_names": list(class_names), "prompts": class_prompts}
    yield from metrics.classification_metrics(feats["label"], probs).items()

  def _tokenize(self, texts, max_len: int) -> dict[str, np.ndarray]:
    from medunifier_jax.data import text as text_lib
    from medunifier_jax.data import tokenizer as tokenizer_lib

    return tokenizer_lib.tokenize(self.tokenizer, [text_lib.clean_report(t) for t in texts],
                                  max_len)

  def _itm_scores(self, fns, state, image_tokens: np.ndarray, tok) -> np.ndarray:
    """(N images, P prompts) log p(match) from the matching head, every pair."""
    n, p = image_tokens.shape[0], tok["input_ids"].shape[0]
    pairs = {"img": np.repeat(np.arange(n), p), "txt": np.tile(np.arange(p), n)}
    logits = common.run_in_chunks(
        lambda img, txt: fns.itm_logits(state, image_tokens[img], tok["input_ids"][txt],
                                        tok["attention_mask"][txt]),
        pairs, int(self.cfg.itm_batch_size))
    logits = np.concatenate(logits)
    log_match = logits[:, 1] - np.logaddexp(logits[:, 0], logits[:, 1])
    return log_match.reshape(n, p)
