"""MedUnifier's four pre-training objectives as pure functions, and all four in one pass.

  ITC  image-text contrastive: max over queries of the cosine, / temperature, symmetric CE.
  ITM  image-text matching on positives and ITC-sampled hard negatives (3B pairs).
  ITG  image-grounded text generation: next-token CE under the generation mask.
  TIG  text-grounded image generation: the VQ-VAE's reconstruction and quantizer losses.

Cross-entropies with label smoothing follow PyTorch's `label_smoothing`: the target is
(1 - s) * one_hot + s / C (for ITG, C counts the real token ids: a padded vocabulary's extra
rows are no classes). Negatives span the batch the function sees; under `jax.jit` with a
sharded batch that is the global batch.

Duplicate-aware negatives (beyond the paper; `compute_losses(duplicate_aware=True)`, the
config's `duplicate_aware_negatives`): two examples whose texts are token for token the same
(the same report, e.g. two images of one study, or a common normal report) are not each other's
negatives. Their off-diagonal ITC logits are left out of both softmaxes (masked, not made extra
positives: the image of the other pair may show something the shared text does not say), label
smoothing spreads over the remaining classes, and ITM never draws them as hard negatives. A
batch without duplicates gives exactly the plain losses.

The alignment text (beyond the paper; config.data.alignment_text = "affirmed"): a batch may
carry `align_ids` / `align_mask`, the report without its negated sentences. ITC, ITM (positives
and negatives alike), duplicate detection and TIG's text condition then read it, while ITG
still learns to write the whole report (`input_ids`). Without them every objective reads
`input_ids`, as in the paper.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from medunifier_jax.models.layers import split_examples
from medunifier_jax.models.qformer import gather_kvs
from medunifier_jax.models.vqvae import tig_loss

OBJECTIVES = ("itc", "itm", "itg", "tig")
METRIC_KEYS = (
  "loss",
  "loss_itc",
  "loss_itm",
  "loss_itg",
  "loss_tig",
  "tig_mse",
  "vq_loss_top",
  "vq_loss_bottom",
  "vq_perplexity_top",
  "vq_perplexity_bottom",
  "vq_usage_top",
  "vq_usage_bottom",
  "temperature",
  "duplicate_fraction",
)
# Stands in for -inf in masked logits: exp() of it is 0, yet 0 * it is 0 (no NaN) in the
# cross-entropy and its gradient. ITC logits are bounded by 1 / temperature_min.
_MASKED_LOGIT = -1e9


def smoothed_cross_entropy(
  logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
) -> jax.Array:
  """Per-example CE of logits (..., C) against integer labels (...), float32 (...)."""
  return _smoothed_ce(logits.astype(jnp.float32), labels, None, label_smoothing)


def _smoothed_ce(
  logits: jax.Array, labels: jax.Array, keep: jax.Array | None, label_smoothing: float
) -> jax.Array:
  """Smoothed CE over the kept classes (all where `keep` is None), in closed form.

  With target (1 - s) on the label and s / C_i on each of the C_i kept classes,
  -sum(target * log_softmax) = logsumexp(kept) - (1 - s) z_label - s / C_i * sum(kept z).
  The log-softmax (N, C) is never formed: forward and backward of the demo's ITG loss over
  (32, 47, 2176) logits take 4.3 ms instead of 7.2 on 2 CPU cores. The label's logit is read
  through a one-hot mask, not a gather, so a vocabulary sharded over the model axis stays so.
  """
  iota = jnp.arange(logits.shape[-1])
  picked = jnp.sum(jnp.where(iota == labels[..., None], logits, 0.0), axis=-1)
  if keep is None:
    lse = jax.nn.logsumexp(logits, axis=-1)
    kept = jnp.float32(logits.shape[-1])
    kept_sum = jnp.sum(logits, axis=-1)
  else:
    lse = jax.nn.logsumexp(jnp.where(keep, logits, _MASKED_LOGIT), axis=-1)
    kept = jnp.sum(keep, axis=-1).astype(jnp.float32)  # broadcasts against lse's shape
    kept_sum = jnp.sum(jnp.where(keep, logits, 0.0), axis=-1)
  return lse - (1.0 - label_smoothing) * picked - label_smoothing * kept_sum / kept


def itc_similarity(image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
  """Image-to-text similarity (B_i, B_t): max over queries of <image_q, text>.

  image_embeds: (B_i, Q, E) and text_embeds: (B_t, E), both L2-normalised.
  """
  return jnp.einsum("iqe,te->itq", image_embeds, text_embeds).max(axis=-1)


def duplicate_texts(input_ids: jax.Array) -> jax.Array:
  """(B, T) token ids -> (B, B) bool: True where rows i and j hold the same ids (the diagonal
  included).

  Same ids mean the same cleaned, truncated report: what the model sees of two texts is then
  identical. Under `jax.jit` with a sharded batch the comparison spans the global batch (XLA
  gathers the ids, B x T integers).
  """
  return jnp.all(input_ids[:, None, :] == input_ids[None, :, :], axis=-1)


def other_duplicates(duplicates: jax.Array) -> jax.Array:
  """(B, B) `duplicate_texts` -> the same without the diagonal: the pairs that must not be
  negatives of each other."""
  return duplicates & ~jnp.eye(duplicates.shape[0], dtype=bool)


def masked_smoothed_cross_entropy(
  logits: jax.Array, labels: jax.Array, exclude: jax.Array, label_smoothing: float = 0.0
) -> jax.Array:
  """`smoothed_cross_entropy` over the classes not in `exclude` only.

  logits (N, C), labels (N,), exclude (N, C) bool (never the label itself) -> (N,) float32; any
  leading shape works in place of N, and `exclude` may be anything that broadcasts, e.g. (C,).
  Excluded classes leave the softmax's denominator, and the smoothing mass s is spread over
  the C_i classes a row keeps: target (1 - s) * one_hot + s / C_i on them, 0 elsewhere.
  """
  return _smoothed_ce(logits.astype(jnp.float32), labels, ~exclude, label_smoothing)


def itc_loss(
  image_embeds: jax.Array,
  text_embeds: jax.Array,
  temperature: jax.Array,
  label_smoothing: float = 0.1,
  *,
  duplicates: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Symmetric contrastive loss; pair i is (image i, text i).

  Args:
    image_embeds: (B, Q, E) normalised query projections.
    text_embeds: (B, E) normalised [CLS] projections.
    temperature: scalar (`MedUnifier.temperature()`).
    duplicates: (B, B) bool, `duplicate_texts(input_ids)`, or None. Pairs (i, j), i != j, with
      the same text are left out of image i's softmax over texts and of text j's softmax over
      images (and symmetrically).
  Returns:
    (scalar loss, the (B, B) image-to-text logits sim / temperature, nothing masked; their
    transpose is text-to-image).
  """
  logits = itc_similarity(image_embeds, text_embeds) / temperature
  labels = jnp.arange(logits.shape[0])
  i2t = smoothed_cross_entropy(logits, labels, label_smoothing).mean()
  t2i = smoothed_cross_entropy(logits.T, labels, label_smoothing).mean()
  plain = (i2t + t2i) / 2
  if duplicates is None:
    return plain, logits
  others = other_duplicates(duplicates)
  i2t = masked_smoothed_cross_entropy(logits, labels, others, label_smoothing).mean()
  t2i = masked_smoothed_cross_entropy(logits.T, labels, others.T, label_smoothing).mean()
  # Both are computed (a B x B softmax costs nothing next to the model); the plain one is taken
  # when the batch has no duplicates, so the option changes nothing there, to the bit.
  return jnp.where(jnp.any(others), (i2t + t2i) / 2, plain), logits


def sample_hard_negatives(
  logits_i2t: jax.Array, rng: jax.Array, duplicates: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """One hard negative per text and per image, drawn from the softmax of the ITC logits.

  The positive (the diagonal) is masked out, so it is never drawn; with `duplicates`, neither
  are the pairs whose texts equal the positive's (their sampling weight is 0).

  Args:
    logits_i2t: (B, B) ITC logits, row = image, column = text (no gradient flows through).
    rng: PRNG key.
    duplicates: (B, B) bool, `duplicate_texts(input_ids)`, or None.
  Returns:
    neg_image_for_text (B,), neg_text_for_image (B,): int32 indices; -1 for a row that has no
    candidate left (every other text in the batch is a duplicate of its own).
  """
  b = logits_i2t.shape[0]
  if b < 2:
    raise ValueError(f"ITM hard negatives need a batch of at least 2 pairs, got {b}")
  logits = jax.lax.stop_gradient(logits_i2t).astype(jnp.float32)
  excluded = jnp.eye(b, dtype=bool)
  if duplicates is not None:
    excluded = excluded | duplicates
  masked = jnp.where(excluded, -jnp.inf, logits)
  key_image, key_text = jax.random.split(rng)
  neg_image_for_text = jax.random.categorical(key_image, masked.T, axis=-1).astype(jnp.int32)
  neg_text_for_image = jax.random.categorical(key_text, masked, axis=-1).astype(jnp.int32)
  if duplicates is not None:
    # categorical() over all -inf returns an arbitrary index; mark those rows instead.
    some = ~jnp.all(excluded, axis=-1)  # excluded is symmetric: rows and columns alike
    neg_image_for_text = jnp.where(some, neg_image_for_text, -1)
    neg_text_for_image = jnp.where(some, neg_text_for_image, -1)
  return neg_image_for_text, neg_text_for_image


def itm_loss(
  model,
  image_tokens: jax.Array,
  input_ids: jax.Array,
  attention_mask: jax.Array,
  logits_i2t: jax.Array,
  rng: jax.Array,
  *,
  image_kvs=None,
  rngs: nnx.Rngs | None = None,
  duplicates: jax.Array | None = None,
) -> jax.Array:
  """Matching loss on 3B pairs: (image i, text i) match; (hard negative image, text j) and
  (image i, hard negative text) do not. Two-way CE on the query-averaged ITM logits.

  image_tokens: (B, 1 + N, Dv); input_ids, attention_mask: (B, T); logits_i2t: (B, B) ITC.
  image_kvs: `model.cross_kvs(image_tokens)` when already computed: each image's cross-attention
  keys/values are then gathered for its pairs rather than projected again for each of them.
  duplicates: (B, B) bool (`duplicate_texts`) or None: duplicates are never drawn as negatives;
  a row left without any candidate contributes its positive pair only (its negative pairs get
  weight 0 in the mean).
  """
  neg_image, neg_text = sample_hard_negatives(logits_i2t, rng, duplicates)
  b = input_ids.shape[0]
  rows = jnp.arange(b)
  has_image, has_text = neg_image >= 0, neg_text >= 0
  # A row without a negative (-1) is run with its own pair, then weighted out.
  neg_image, neg_text = jnp.where(has_image, neg_image, rows), jnp.where(has_text, neg_text, rows)
  image_index = jnp.concatenate([rows, neg_image, rows])
  if image_kvs is None:
    image_kvs = model.cross_kvs(image_tokens)
  ids = jnp.concatenate([input_ids, input_ids, input_ids[neg_text]], axis=0)
  mask = jnp.concatenate([attention_mask, attention_mask, attention_mask[neg_text]], axis=0)
  labels = jnp.concatenate([jnp.ones((b,), jnp.int32), jnp.zeros((2 * b,), jnp.int32)])
  # The 3B pairs are gathered from the whole batch: split them over the devices again.
  ids, mask, pair_kvs = split_examples((ids, mask, gather_kvs(image_kvs, image_index)), input_ids)
  logits = model.itm_logits(None, ids, mask, image_kvs=pair_kvs, rngs=rngs)
  logits = split_examples(logits, input_ids)
  ce = smoothed_cross_entropy(logits, labels)
  if duplicates is None:
    return ce.mean()
  weights = jnp.concatenate([jnp.ones((b,), bool), has_image, has_text]).astype(jnp.float32)
  weighted = jnp.sum(ce * weights) / jnp.sum(weights)
  # Every row had a negative: the plain mean, to the bit.
  return jnp.where(jnp.all(weights > 0), ce.mean(), weighted)


def itg_loss(
  lm_logits: jax.Array,
  input_ids: jax.Array,
  attention_mask: jax.Array,
  label_smoothing: float = 0.1,
  num_classes: int | None = None,
) -> jax.Array:
  """Next-token CE: lm_logits[:, t] predicts input_ids[:, t + 1]; padding targets are ignored.

  lm_logits: (B, T, V) from the generation mode ([DEC] in place of the first token);
  input_ids, attention_mask: (B, T). Mean over the non-padding target tokens.
  num_classes: the real token ids are 0..num_classes - 1 (`model.num_text_classes`); columns
  beyond are vocabulary padding, left out of the softmax and of the label smoothing, so a
  padded model's loss is the unpadded one's. None: every column is a class.
  """
  targets = input_ids[:, 1:]
  weights = (attention_mask[:, 1:] > 0).astype(jnp.float32)
  logits = lm_logits[:, :-1]
  v = logits.shape[-1]
  if num_classes is None or num_classes == v:
    ce = smoothed_cross_entropy(logits, targets, label_smoothing)
  else:
    # Masked, not sliced: slicing would regather a vocabulary sharded over the model axis.
    padding = jnp.arange(v) >= num_classes
    ce = masked_smoothed_cross_entropy(logits, targets, padding, label_smoothing)
  return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _weights(weights: Mapping[str, float]) -> dict[str, float]:
  unknown = set(weights) - set(OBJECTIVES)
  if unknown:
    raise ValueError(f"unknown objectives {sorted(unknown)} in weights; known: {OBJECTIVES}")
  return {k: float(weights[k]) if k in weights else 0.0 for k in OBJECTIVES}


def check_itm_itg_tig_batch(sub: int, batch_size: int) -> int:
  """`itm_itg_tig_batch` as an int, refused unless it lies in [0, batch_size]."""
  sub = int(sub)
  if not 0 <= sub <= batch_size:
    raise ValueError(
      f"config.itm_itg_tig_batch is {sub}, but the batch holds {batch_size} examples; set it to "
      "at most the batch size, or 0 to train every objective on the whole batch"
    )
  return sub


def compute_losses(
  model,
  batch: Mapping[str, jax.Array],
  rng: jax.Array,
  *,
  weights: Mapping[str, float],
  label_smoothing: float = 0.1,
  train: bool = True,
  duplicate_aware: bool = True,
  dropout_prng: str | None = None,
  itm_itg_tig_batch: int = 0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """All objectives in one pass, sharing the ViT pass, the image-mode queries and the text pass.

  Args:
    model: a `MedUnifier`.
    batch: `image` (B, S, S, 3) normalised, `target_image` (B, S, S, 3) in [0, 1], `input_ids`
      and `attention_mask` (B, T); optionally `align_ids` and `align_mask` (B, T), the text
      ITC, ITM and TIG read instead (the report without its negated sentences, from
      config.data.alignment_text), while ITG still learns to write `input_ids`.
    rng: the step's PRNG key (dropout, ITM negatives, VQ code restarts).
    weights: Python floats for `itc`, `itm`, `itg`, `tig`; 0 (or absent) skips the objective.
    train: dropout on, BatchNorm batch statistics (and their running-average updates).
    duplicate_aware: examples with identical token ids are not each other's ITC / ITM
      negatives (module docstring); `duplicate_fraction` reports the share of the batch whose
      text occurs more than once (computed either way).
    dropout_prng: the PRNG implementation of dropout's bits: "rbg" or "unsafe_rbg" (a key of
      that kind drawn from `rng`), or None / "threefry2x32" (a split of `rng` itself, the
      stream before the option). ITM negatives and code restarts always split `rng`.
    itm_itg_tig_batch: b > 0: ITM, ITG and TIG use only the batch's first b examples (ITM's
      negatives drawn among them), while ITC contrasts the whole batch, so the contrastive
      objective sees more pairs per step at the cost of one more image and text pass per extra
      example (beyond the paper, which trains every objective on the whole batch). 0: all.
  Returns:
    (weighted total, metrics with the keys of `METRIC_KEYS`; skipped terms report 0).
  """
  w = _weights(weights)
  on = {k: v != 0.0 for k, v in w.items()}
  key_dropout, key_itm, key_codes = jax.random.split(rng, 3)
  if dropout_prng not in (None, "threefry2x32"):
    # Dropout draws millions of bits a step; threefry makes them with a long chain of integer
    # ops (a loop on CPU), the "rbg" generators with one RngBitGenerator. Seeded from the step
    # key, so the run stays reproducible and the checkpointed key keeps its own generator.
    key_dropout = jax.random.wrap_key_data(
      jax.random.bits(key_dropout, (4,), jnp.uint32), impl=dropout_prng
    )
  rngs = nnx.Rngs(dropout=key_dropout, codes=key_codes) if train else None
  ids, mask = batch["input_ids"], batch["attention_mask"]
  # The text ITC, ITM and TIG read (the report itself unless the batch carries another); ITG
  # learns to write `ids`.
  align_ids, align_mask = batch.get("align_ids", ids), batch.get("align_mask", mask)
  sub = check_itm_itg_tig_batch(itm_itg_tig_batch, ids.shape[0])
  whole = sub in (0, ids.shape[0])

  def head(tree):
    """The first `sub` examples of every array in `tree` (ITM, ITG and TIG's share)."""
    return tree if whole else jax.tree.map(lambda x: x[:sub], tree)

  zero = jnp.zeros((), jnp.float32)
  metrics = {k: zero for k in METRIC_KEYS}
  metrics["temperature"] = model.temperature()
  losses = {}

  image_tokens = model.image_tokens(batch["image"], rngs=rngs)
  queries = query_kvs = text_hidden = None
  if on["itc"] or on["itm"] or on["itg"] or on["tig"]:
    # The image tokens' cross-attention projections, shared by the image and matching passes.
    image_kvs = model.cross_kvs(image_tokens)
    queries, query_kvs = model.image_queries_with_kv(image_tokens, image_kvs=image_kvs, rngs=rngs)
  if on["itc"] or on["itm"] or on["tig"]:
    # ITC and TIG read [CLS] alone (B, 1, H): the last layer skips the other positions.
    text_hidden = split_examples(
      model.text_hidden(align_ids, align_mask, cls_only=True, rngs=rngs), ids
    )

  if on["itc"] or on["itm"]:
    same_text = duplicate_texts(align_ids)
    metrics["duplicate_fraction"] = jnp.mean(
      jnp.any(other_duplicates(same_text), axis=-1).astype(jnp.float32)
    )
    duplicates = same_text if duplicate_aware else None
    loss, logits_i2t = itc_loss(
      model.image_embeddings(queries),
      model.text_embeddings(text_hidden),
      model.temperature(),
      label_smoothing,
      duplicates=duplicates,
    )
    if on["itc"]:
      losses["itc"] = loss
    if on["itm"]:
      square = (lambda x: x) if whole else (lambda x: x[:sub, :sub])  # (B, B) -> (b, b)
      losses["itm"] = itm_loss(
        model,
        head(image_tokens),
        head(align_ids),
        head(align_mask),
        square(logits_i2t),
        key_itm,
        image_kvs=head(image_kvs),
        rngs=rngs,
        duplicates=None if duplicates is None else square(duplicates),
      )
  if on["itg"]:
    lm_logits = model.lm_logits_from_query_kv(head(query_kvs), head(ids), head(mask), rngs=rngs)
    losses["itg"] = itg_loss(
      lm_logits, head(ids), head(mask), label_smoothing, num_classes=model.num_text_classes
    )
  if on["tig"]:
    out = model.vqvae(
      head(queries), head(image_tokens)[:, 1:], head(text_hidden)[:, 0], train=train, rngs=rngs
    )
    losses["tig"], tig_metrics = tig_loss(out, head(batch["target_image"]))
    metrics.update({k: v.astype(jnp.float32) for k, v in tig_metrics.items()})

  total = zero
  for name, loss in losses.items():
    metrics[f"loss_{name}"] = loss.astype(jnp.float32)
    total = total + w[name] * loss.astype(jnp.float32)
  metrics["loss"] = total
  return total, metrics
