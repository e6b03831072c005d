"""Zero-shot classification by image-prompt similarity (the paper's protocol, DESIGN.md section 3).

Prompts (`prompts.py`): with `prompts="paper"`, `num_prompts` per class (0: 15 for the CheXpert
vocabulary, 10 for RSNA's) drawn with `prompt_seed` (1: the authors' draw) from the CheXpert
class-prompt vocabulary; `prompts="project"` uses the project's own word lists instead.

Scores: an image's raw similarity to a prompt is the maximum over its query embeddings of the
cosine with the prompt's text embedding, with no temperature. A class's score pools those over
the class's prompts, by `prompt_pooling`: "max" (the authors' code takes the maximum) or "mean";
a softmax over classes gives the probabilities. Reported: accuracy, macro F1, one-vs-rest AUC,
sensitivity, specificity, PPV, NPV (`metrics.classification_metrics`; binary sets such as
RSNA-like pneumonia vs normal report the positive class); sets of more classes also report each
class's recall and one-vs-rest AUC (`per_class/NAME/recall`, `per_class/NAME/auc`).

`class_set` names the 5x200 class set the protocol expects ("pneumonia": the authors' code,
"gloria": Consolidation in place of Pneumonia, "": no check); a data set with the other one is
refused rather than scored under a protocol it does not follow.

With `itm_rescore`, the per-prompt score is instead the image-text matching head's
log-probability of "match" (every image against every prompt), pooled the same way.
"""

from collections.abc import Iterator

import numpy as np
from scipy import special

from medunifier_jax.evaluators import common, metrics, prompts

POOLINGS = ("max", "mean")


def pool_prompt_scores(
  prompt_scores: np.ndarray, owner: np.ndarray, num_classes: int, pooling: str = "max"
) -> np.ndarray:
  """Per-prompt scores -> per-class scores.

  Args:
    prompt_scores: (N, P) score of every image against every prompt.
    owner: (P,) the class index of each prompt.
    num_classes: C; every class must own at least one prompt.
    pooling: "max" or "mean" over a class's prompts.
  Returns:
    (N, C) float.
  """
  if pooling not in POOLINGS:
    raise ValueError(f"unknown prompt_pooling {pooling!r}; choose one of {POOLINGS}")
  pool = np.max if pooling == "max" else np.mean
  return np.stack([pool(prompt_scores[:, owner == c], axis=1) for c in range(num_classes)], axis=1)


def class_probabilities(
  prompt_scores: np.ndarray, owner: np.ndarray, num_classes: int, pooling: str = "max"
) -> np.ndarray:
  """(N, P) per-prompt scores -> (N, C) softmax over the pooled class scores."""
  return special.softmax(pool_prompt_scores(prompt_scores, owner, num_classes, pooling), axis=1)


class ZeroShotEvaluator(common.Evaluator):
  """Settings (`config.evals.zero_shot`): datasets, split, prompts, class_set, num_prompts,
  prompt_seed, prompt_pooling, batch_size, itm_rescore, itm_batch_size."""

  task = "zero_shot"

  def __init__(self, config, task_config, tokenizer, **kwargs):
    super().__init__(config, task_config, tokenizer, **kwargs)
    self.prompt_set = common.setting_choice(
      task_config, self.task, "prompts", "paper", prompts.PROMPT_SETS
    )
    self.pooling = common.setting_choice(task_config, self.task, "prompt_pooling", "max", POOLINGS)
    # "": no class-set check.
    self.class_set = common.setting_choice(
      task_config, self.task, "class_set", "", (*sorted(prompts.class_sets()), "")
    )

  def describe(self) -> str:
    cfg = self.cfg
    n = int(cfg.get("num_prompts", 0)) or "default"
    return (
      f"prompts {self.prompt_set}, {n} per class, seed {int(cfg.prompt_seed)}, "
      f"{self.pooling} over prompts, {'ITM' if cfg.itm_rescore else 'raw similarity'}"
    )

  def class_prompts(self, class_names, dataset: str = "") -> dict[str, list[str]]:
    """{class name: prompts} for a data set's classes, by this entry's settings."""
    prompts.check_class_set(class_names, self.class_set, dataset)
    return prompts.build_class_prompts(
      self.prompt_set, class_names, int(self.cfg.get("num_prompts", 0)), int(self.cfg.prompt_seed)
    )

  def evaluate(self, dataset: str, graphdef, state) -> Iterator[tuple[str, float]]:
    cfg, fns = self.cfg, self.fns(graphdef)
    source = self.source(dataset, cfg.split)
    class_names = common.source_class_names(source, dataset)
    class_prompts = self.class_prompts(class_names, dataset)
    texts = [p for name in class_names for p in class_prompts[name]]
    owner = np.array([c for c, name in enumerate(class_names) for _ in class_prompts[name]])

    keys = ("image_emb", "image_tokens") if cfg.itm_rescore else ("image_emb",)
    batches = common.EvalBatches(self.config, self.tokenizer, source, int(cfg.batch_size))
    feats = common.collect_features(
      fns, state, batches, image_keys=keys, desc=f"zero-shot {dataset}"
    )
    if "label" not in feats:
      raise ValueError(f"data set {dataset!r} has no `label` per record; zero-shot needs one")
    max_len = int(self.config.data.max_text_len)
    tok = self._tokenize(texts, max_len)
    if cfg.itm_rescore:
      prompt_scores = self._itm_scores(fns, state, feats["image_tokens"], tok)
    else:
      text_emb = np.concatenate(
        common.run_in_chunks(
          lambda input_ids, attention_mask: fns.text_features(state, input_ids, attention_mask)[
            "text_emb"
          ],
          tok,
          int(cfg.batch_size),
        )
      )
      # Raw cosine similarities (max over queries): the authors' code applies no temperature.
      prompt_scores = np.asarray(common.similarity_matrix(feats["image_emb"], text_emb))
    class_scores = pool_prompt_scores(prompt_scores, owner, len(class_names), self.pooling)
    probs = special.softmax(class_scores, axis=1)
    self.outputs[dataset] = {
      "labels": feats["label"],
      "probs": probs,
      "class_scores": class_scores,
      "class_names": list(class_names),
      "prompts": class_prompts,
      "prompt_set": self.prompt_set,
      "prompt_pooling": self.pooling,
      "class_set": prompts.find_class_set(class_names) or "",
    }
    yield from metrics.classification_metrics(feats["label"], probs).items()
    if len(class_names) > 2:  # binary sets already report their positive class
      per_class = metrics.per_class_metrics(feats["label"], probs, class_names)
      yield from ((f"per_class/{k}", v) for k, v in per_class.items())

  def _tokenize(self, texts, max_len: int) -> dict[str, np.ndarray]:
    from medunifier_jax.data import text as text_lib
    from medunifier_jax.data import tokenizer as tokenizer_lib

    return tokenizer_lib.tokenize(
      self.tokenizer, [text_lib.clean_report(t) for t in texts], max_len
    )

  def _itm_scores(self, fns, state, image_tokens: np.ndarray, tok) -> np.ndarray:
    """(N images, P prompts) log p(match) from the matching head, every pair."""
    n, p = image_tokens.shape[0], tok["input_ids"].shape[0]
    pairs = {"img": np.repeat(np.arange(n), p), "txt": np.tile(np.arange(p), n)}
    logits = common.run_in_chunks(
      lambda img, txt: fns.itm_logits(
        state, image_tokens[img], tok["input_ids"][txt], tok["attention_mask"][txt]
      ),
      pairs,
      int(self.cfg.itm_batch_size),
    )
    log_match = special.log_softmax(np.concatenate(logits), axis=1)[:, 1]
    return log_match.reshape(n, p)
