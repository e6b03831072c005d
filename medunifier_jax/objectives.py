"""MedUnifier's four pre-training objectives as pure functions, and all four in one pass.

  ITC  image-text contrastive: max over queries of the cosine, / temperature, symmetric CE.
  ITM  image-text matching on positives and ITC-sampled hard negatives (3B pairs).
  ITG  image-grounded text generation: next-token CE under the generation mask.
  TIG  text-grounded image generation: the VQ-VAE's reconstruction and quantizer losses.

Cross-entropies with label smoothing follow PyTorch's `label_smoothing`: the target is
(1 - s) * one_hot + s / C. Negatives span the batch the function sees; under `jax.jit` with a
sharded batch that is the global batch.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from medunifier_jax.models.qformer import gather_kvs
from medunifier_jax.models.vqvae import tig_loss

OBJECTIVES = ("itc", "itm", "itg", "tig")
METRIC_KEYS = (
    "loss", "loss_itc", "loss_itm", "loss_itg", "loss_tig", "tig_mse", "vq_loss_top",
    "vq_loss_bottom", "vq_perplexity_top", "vq_perplexity_bottom", "vq_usage_top",
    "vq_usage_bottom", "temperature",
)


def smoothed_cross_entropy(
    logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
) -> jax.Array:
  """Per-example CE of logits (..., C) against integer labels (...), float32 (...)."""
  logits = logits.astype(jnp.float32)
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def itc_similarity(image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
  """Image-to-text similarity (B_i, B_t): max over queries of <image_q, text>.

  image_embeds: (B_i, Q, E) and text_embeds: (B_t, E), both L2-normalised.
  """
  return jnp.einsum("iqe,te->itq", image_embeds, text_embeds).max(axis=-1)


def itc_loss(
    image_embeds: jax.Array,
    text_embeds: jax.Array,
    temperature: jax.Array,
    label_smoothing: float = 0.1,
) -> tuple[jax.Array, jax.Array]:
  """Symmetric contrastive loss; pair i is (image i, text i).

  Args:
    image_embeds: (B, Q, E) normalised query projections.
    text_embeds: (B, E) normalised [CLS] projections.
    temperature: scalar (already clamped).
  Returns:
    (scalar loss, the (B, B) image-to-text logits sim / temperature; their transpose is text-to-
    image).
  """
  logits = itc_similarity(image_embeds, text_embeds) / temperature
  labels = jnp.arange(logits.shape[0])
  i2t = smoothed_cross_entropy(logits, labels, label_smoothing).mean()
  t2i = smoothed_cross_entropy(logits.T, labels, label_smoothing).mean()
  return (i2t + t2i) / 2, logits


def sample_hard_negatives(logits_i2t: jax.Array, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One hard negative per text and per image, drawn from the softmax of the ITC logits.

  The positive (the diagonal) is masked out, so it is never drawn.

  Args:
    logits_i2t: (B, B) ITC logits, row = image, column = text (no gradient flows through).
    rng: PRNG key.
  Returns:
    neg_image_for_text (B,), neg_text_for_image (B,): int32 indices.
  """
  b = logits_i2t.shape[0]
  if b < 2:
    raise ValueError(f"ITM hard negatives need a batch of at least 2 pairs, got {b}")
  logits = jax.lax.stop_gradient(logits_i2t).astype(jnp.float32)
  masked = jnp.where(jnp.eye(b, dtype=bool), -jnp.inf, logits)
  key_image, key_text = jax.random.split(rng)
  neg_image_for_text = jax.random.categorical(key_image, masked.T, axis=-1)
  neg_text_for_image = jax.random.categorical(key_text, masked, axis=-1)
  return neg_image_for_text.astype(jnp.int32), neg_text_for_image.astype(jnp.int32)


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
) -> jax.Array:
  """Matching loss on 3B pairs: (image i, text i) match; (hard negative image, text j) and
  (image i, hard negative text) do not. Two-way CE on the query-averaged ITM logits.

  image_tokens: (B, 1 + N, Dv); input_ids, attention_mask: (B, T); logits_i2t: (B, B) ITC.
  image_kvs: `model.cross_kvs(image_tokens)` when already computed: each image's cross-attention
  keys/values are then gathered for its pairs rather than projected again for each of them.
  """
  neg_image, neg_text = sample_hard_negatives(logits_i2t, rng)
  b = input_ids.shape[0]
  image_index = jnp.concatenate([jnp.arange(b), neg_image, jnp.arange(b)])
  if image_kvs is None:
    image_kvs = model.cross_kvs(image_tokens)
  ids = jnp.concatenate([input_ids, input_ids, input_ids[neg_text]], axis=0)
  mask = jnp.concatenate([attention_mask, attention_mask, attention_mask[neg_text]], axis=0)
  labels = jnp.concatenate([jnp.ones((b,), jnp.int32), jnp.zeros((2 * b,), jnp.int32)])
  logits = model.itm_logits(None, ids, mask, image_kvs=gather_kvs(image_kvs, image_index),
                            rngs=rngs)
  return smoothed_cross_entropy(logits, labels).mean()


def itg_loss(
    lm_logits: jax.Array,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    label_smoothing: float = 0.1,
) -> jax.Array:
  """Next-token CE: lm_logits[:, t] predicts input_ids[:, t + 1]; padding targets are ignored.

  lm_logits: (B, T, V) from the generation mode ([DEC] in place of the first token);
  input_ids, attention_mask: (B, T). Mean over the non-padding target tokens.
  """
  targets = input_ids[:, 1:]
  weights = (attention_mask[:, 1:] > 0).astype(jnp.float32)
  ce = smoothed_cross_entropy(lm_logits[:, :-1], targets, label_smoothing)
  return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _weights(weights: Mapping[str, float]) -> dict[str, float]:
  unknown = set(weights) - set(OBJECTIVES)
  if unknown:
    raise ValueError(f"unknown objectives {sorted(unknown)} in weights; known: {OBJECTIVES}")
  return {k: float(weights[k]) if k in weights else 0.0 for k in OBJECTIVES}


def compute_losses(
    model,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
    *,
    weights: Mapping[str, float],
    label_smoothing: float = 0.1,
    train: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """All objectives in one pass, sharing the ViT pass, the image-mode queries and the text pass.

  Args:
    model: a `MedUnifier`.
    batch: `image` (B, S, S, 3) normalised, `target_image` (B, S, S, 3) in [0, 1], `input_ids`
      and `attention_mask` (B, T).
    rng: the step's PRNG key (dropout, ITM negatives, VQ code restarts).
    weights: Python floats for `itc`, `itm`, `itg`, `tig`; 0 (or absent) skips the objective.
    train: dropout on, BatchNorm batch statistics (and their running-average updates).
  Returns:
    (weighted total, metrics with the keys of `METRIC_KEYS`; skipped terms report 0).
  """
  w = _weights(weights)
  on = {k: v != 0.0 for k, v in w.items()}
  key_dropout, key_itm, key_codes = jax.random.split(rng, 3)
  rngs = nnx.Rngs(dropout=key_dropout, codes=key_codes) if train else None
  ids, mask = batch["input_ids"], batch["attention_mask"]
  zero = jnp.zeros((), jnp.float32)
  metrics = {k: zero for k in METRIC_KEYS}
  metrics["temperature"] = model.temperature()
  losses = {}

  image_tokens = model.image_tokens(batch["image"], rngs=rngs)
  queries = query_kvs = text_hidden = None
  if on["itc"] or on["itm"] or on["itg"] or on["tig"]:
    # The image tokens' cross-attention projections, shared by the image and matching passes.
    image_kvs = model.cross_kvs(image_tokens)
    queries, query_kvs = model.image_queries_with_kv(image_tokens, image_kvs=image_kvs,
                                                     rngs=rngs)
  if on["itc"] or on["itm"] or on["tig"]:
    text_hidden = model.text_hidden(ids, mask, rngs=rngs)

  if on["itc"] or on["itm"]:
    loss, logits_i2t = itc_loss(
        model.image_embeddings(queries), model.text_embeddings(text_hidden),
        model.temperature(), label_smoothing,
    )
    if on["itc"]:
      losses["itc"] = loss
    if on["itm"]:
      losses["itm"] = itm_loss(model, image_tokens, ids, mask, logits_i2t, key_itm,
                               image_kvs=image_kvs, rngs=rngs)
  if on["itg"]:
    lm_logits = model.lm_logits_from_query_kv(query_kvs, ids, mask, rngs=rngs)
    losses["itg"] = itg_loss(lm_logits, ids, mask, label_smoothing)
  if on["tig"]:
    out = model.vqvae(queries, image_tokens[:, 1:], text_hidden[:, 0], train=train, rngs=rngs)
    losses["tig"], tig_metrics = tig_loss(out, batch["target_image"])
    metrics.update({k: v.astype(jnp.float32) for k, v in tig_metrics.items()})

  total = zero
  for name, loss in losses.items():
    metrics[f"loss_{name}"] = loss.astype(jnp.float32)
    total = total + w[name] * loss.astype(jnp.float32)
  metrics["loss"] = total
  return total, metrics
