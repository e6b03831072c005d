"""Masked-token training of the prior: a cosine-scheduled share of each example's codes is
replaced by [MASK] and predicted from the rest and the text.

Shapes: B batch, N codes per example (top grid first), K codebook size.
"""

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from medunifier_jax.prior.model import ConditionedPrior, flatten_codes

# What a training batch carries to the devices (`config.batch_keys` of configs/prior.py adds
# "text_states" when the states are cached with the codes).
BATCH_KEYS = ("codes_top", "codes_bottom", "input_ids", "attention_mask")


def mask_ratio(u: jax.Array) -> jax.Array:
  """The cosine schedule: the share of masked codes, cos(pi/2 u) for u in [0, 1]."""
  return jnp.cos(0.5 * math.pi * u)


def random_mask(rng: jax.Array, batch: int, n: int) -> jax.Array:
  """bool (B, N), True where a code is masked: per row ceil(N cos(pi/2 u)) codes, u ~ U(0, 1),
  at least one, at positions drawn uniformly without replacement."""
  k_ratio, k_order = jax.random.split(rng)
  ratio = mask_ratio(jax.random.uniform(k_ratio, (batch,)))
  count = jnp.clip(jnp.ceil(ratio * n), 1, n).astype(jnp.int32)
  # The `count` positions with the lowest random scores: an exact count per row.
  ranks = jnp.argsort(jnp.argsort(jax.random.uniform(k_order, (batch, n)), axis=1), axis=1)
  return ranks < count[:, None]


def masked_token_loss(
  model: ConditionedPrior, batch: dict[str, jax.Array], rng: jax.Array, *, cond_drop: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Cross-entropy on the masked positions only, averaged over every masked code of the batch.

  Args:
    model: the training module (`prior` and, without cached states, `text_encoder`).
    batch: `codes_top` (B, g/2, g/2), `codes_bottom` (B, g, g) or (B, g, g, R), `input_ids`
      and `attention_mask` (B, T), and `text_states` (B, T, H) when cached.
    rng: the step's key (masks, condition dropout, dropout).
    cond_drop: probability that an example sees the null condition instead of its text.
  Returns:
    `(loss, metrics)`: `loss`, `loss_top` / `loss_bottom` (the masked codes of each level),
    `accuracy` (argmax on the masked codes), `mask_ratio`, `null_fraction`.
  """
  prior = model.prior
  codes = flatten_codes(batch["codes_top"], batch["codes_bottom"])
  b, n = codes.shape
  k_mask, k_drop, k_dropout = jax.random.split(rng, 3)
  masked = random_mask(k_mask, b, n)
  tokens = jnp.where(masked, prior.mask_id, codes)
  drop = jax.random.uniform(k_drop, (b,)) < cond_drop
  if prior.condition == "none":
    drop = jnp.ones((b,), bool)
  states, text_mask = model.text_condition(batch)
  logits = prior(tokens, states, text_mask, drop=drop, rngs=nnx.Rngs(dropout=k_dropout))
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, codes)  # (B, N) float32
  weight = masked.astype(jnp.float32)
  level_top = (jnp.arange(n) < prior.num_top)[None, :]

  def mean_over(w):
    return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)

  correct = (jnp.argmax(logits, -1) == codes).astype(jnp.float32)
  loss = mean_over(weight)
  metrics = {
    "loss": loss,
    "loss_top": mean_over(weight * level_top),
    "loss_bottom": mean_over(weight * ~level_top),
    "accuracy": jnp.sum(correct * weight) / jnp.sum(weight),
    "mask_ratio": jnp.mean(weight),
    "null_fraction": jnp.mean(drop.astype(jnp.float32)),
  }
  return loss, metrics
