"""Objectives: hand-computed ITC/ITG, ITM negative sampling and pairing, switches, overfitting."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from configs_util import load_config
from flax import nnx

from medunifier_jax import objectives as obj
from medunifier_jax.models.medunifier import MedUnifier


def _normalised(rng, *shape):
  x = rng.normal(size=shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _smoothed_ce(logits, label, s):
  logp = logits - logits.max() - math.log(np.exp(logits - logits.max()).sum())
  target = np.full(len(logits), s / len(logits))
  target[label] += 1 - s
  return -(target * logp).sum()


def test_itc_equals_hand_computation():
  rng = np.random.default_rng(0)
  b, q, e, temp, s = 3, 4, 5, 0.07, 0.1
  images, texts = _normalised(rng, b, q, e), _normalised(rng, b, e)
  sim = np.zeros((b, b))
  for i in range(b):
    for j in range(b):
      sim[i, j] = max(float(images[i, k] @ texts[j]) for k in range(q))
  logits = sim / temp
  i2t = np.mean([_smoothed_ce(logits[i], i, s) for i in range(b)])
  t2i = np.mean([_smoothed_ce(logits[:, j], j, s) for j in range(b)])
  loss, got_logits = obj.itc_loss(jnp.asarray(images), jnp.asarray(texts), jnp.float32(temp), s)
  np.testing.assert_allclose(got_logits, logits, rtol=1e-5)
  np.testing.assert_allclose(float(loss), (i2t + t2i) / 2, rtol=1e-5)


def test_itg_equals_hand_computation_and_ignores_padding():
  rng = np.random.default_rng(1)
  b, t, v, s = 2, 5, 7, 0.1
  logits = rng.normal(size=(b, t, v)).astype(np.float32)
  ids = rng.integers(0, v, size=(b, t))
  mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
  terms = [_smoothed_ce(logits[r, c], ids[r, c + 1], s)
           for r in range(b) for c in range(t - 1) if mask[r, c + 1]]
  loss = obj.itg_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask), s)
  np.testing.assert_allclose(float(loss), np.mean(terms), rtol=1e-5)
  # Predictions of padding targets and the padding ids themselves do not count.
  logits[1, 2:] += rng.normal(size=(t - 2, v)).astype(np.float32)
  ids[1, 3:] = (ids[1, 3:] + 1) % v
  same = obj.itg_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask), s)
  np.testing.assert_allclose(float(same), float(loss), rtol=1e-6)


def test_hard_negatives_skip_the_positive_and_follow_the_rng():
  b = 5
  logits = jnp.asarray(np.random.default_rng(2).normal(size=(b, b)) * 2, jnp.float32)
  logits = logits + 10.0 * jnp.eye(b)  # the positive would win almost every draw if allowed
  keys = jax.random.split(jax.random.key(0), 4000)
  neg_image, neg_text = jax.vmap(lambda k: obj.sample_hard_negatives(logits, k))(keys)
  assert not np.any(np.asarray(neg_image) == np.arange(b))
  assert not np.any(np.asarray(neg_text) == np.arange(b))
  # Same key, same negatives; other keys, other draws.
  again = obj.sample_hard_negatives(logits, keys[0])
  np.testing.assert_array_equal(again[0], neg_image[0])
  np.testing.assert_array_equal(again[1], neg_text[0])
  assert len({tuple(np.asarray(n)) for n in neg_text[:50]}) > 1
  # Frequencies follow the softmax of the logits with the positive removed.
  for row, draws in ((logits[0], neg_text[:, 0]), (logits[:, 0], neg_image[:, 0])):
    p = np.exp(np.asarray(row[1:]) - np.max(row[1:]))
    p /= p.sum()
    freq = np.bincount(np.asarray(draws), minlength=b)[1:] / len(draws)
    np.testing.assert_allclose(freq, p, atol=0.03)


class _PairChecker:
  """A stand-in model: ITM logits say "match" exactly when image id == text id.

  Its one "layer" of cross keys/values is the image tokens themselves, so the ITM loss's
  gathering of each pair's image keys/values is checked as well.
  """

  def cross_kvs(self, image_tokens):
    return [None, (image_tokens, image_tokens)]

  def itm_logits(self, image_tokens, input_ids, attention_mask, *, image_kvs=None, rngs=None):
    if image_kvs is not None:
      image_tokens = image_kvs[1][0]
    match = image_tokens[:, 0, 0] == input_ids[:, 0].astype(jnp.float32)
    return jnp.stack([jnp.where(match, -1.0, 1.0), jnp.where(match, 1.0, -1.0)], axis=-1)


def test_itm_pairs_positives_with_match_and_negatives_with_no_match():
  b = 4
  ids = jnp.arange(b)[:, None] * jnp.ones((1, 3), jnp.int32)
  images = jnp.arange(b, dtype=jnp.float32)[:, None, None] * jnp.ones((1, 2, 2))
  logits = jnp.zeros((b, b))
  loss = obj.itm_loss(_PairChecker(), images, ids, jnp.ones_like(ids), logits, jax.random.key(3))
  # Every pair labelled as the checker sees it: the loss is that of margin-2 logits (a single
  # mislabelled pair of the 12 would add 4/12 to it).
  np.testing.assert_allclose(float(loss), math.log1p(math.exp(-2.0)), rtol=1e-5)


# -- the whole model -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cfg():
  config = load_config("tiny")
  config.unlock()
  # At width 32, dropout 0.1 hides most of the signal of a four-pair batch; overfitting is a
  # check of the objectives' gradients, so it runs without dropout (still in training mode).
  config.model.qformer.hidden_dropout = config.model.qformer.attention_dropout = 0.0
  config.model.vit.frozen = True  # a shorter backward pass to compile; the images stay distinct
  return config


@pytest.fixture(scope="module")
def model(cfg):
  return MedUnifier(cfg.model, rngs=nnx.Rngs(0))


def _key(i):
  # The rbg generator compiles much faster than threefry on CPU; the objectives accept any key.
  return jax.random.key(i, impl="rbg")


@pytest.fixture(scope="module")
def batch(cfg):
  return blob_batch(cfg)


def blob_batch(cfg):
  """Four smooth, globally different images and distinct token sequences, some padded."""
  s, t, b = cfg.model.vit.image_size, 12, 4
  yy, xx = np.mgrid[0:s, 0:s] / s
  patterns = [yy, xx, (np.sin(6 * xx) * np.sin(6 * yy) + 1) / 2,
              np.exp(-((yy - 0.5) ** 2 + (xx - 0.5) ** 2) / 0.05)]
  colours = np.array([[0.9, 0.3, 0.1], [0.2, 0.8, 0.3], [0.3, 0.3, 0.9], [0.8, 0.8, 0.8]])
  target = np.stack([p[..., None] * c for p, c in zip(patterns, colours)]).astype(np.float32)
  ids = np.random.default_rng(4).integers(5, cfg.model.qformer.vocab_size - 1, size=(b, t))
  ids[:, 0] = cfg.model.qformer.cls_token_id
  mask = np.ones((b, t), np.int32)
  mask[1, 9:] = mask[3, 7:] = 0
  return {
      "image": jnp.asarray((target - 0.5) / 0.25),
      "target_image": jnp.asarray(target),
      "input_ids": jnp.asarray(ids, jnp.int32),
      "attention_mask": jnp.asarray(mask),
  }


def test_weight_zero_skips_the_objective(model, batch):
  stats = lambda: jax.tree.map(np.asarray, nnx.state(model.vqvae, nnx.BatchStat))
  before = stats()

  @nnx.jit
  def itc_only(m, batch, rng):
    return obj.compute_losses(m, batch, rng, weights={"itc": 1.0, "tig": 0.0})

  total, metrics = itc_only(model, batch, _key(0))
  assert set(metrics) == set(obj.METRIC_KEYS)
  assert float(metrics["loss_itc"]) > 0 and float(total) == float(metrics["loss_itc"])
  for name in ("loss_itm", "loss_itg", "loss_tig", "vq_perplexity_top"):
    assert float(metrics[name]) == 0.0
  # The VQ-VAE never ran: its BatchNorm running statistics are untouched.
  jax.tree.map(np.testing.assert_array_equal, stats(), before)
  with pytest.raises(ValueError, match="unknown objectives"):
    obj.compute_losses(model, batch, jax.random.key(0), weights={"itx": 1.0})


def test_overfitting_one_batch_halves_every_loss(cfg, model, batch):
  optimizer = nnx.Optimizer(model, optax.adamw(5e-3, b2=0.95, weight_decay=0.0), wrt=nnx.Param)
  weights = dict(cfg.loss_weights)

  @nnx.jit
  def step(model, optimizer, batch, rng):
    loss_fn = lambda m: obj.compute_losses(m, batch, rng, weights=weights)
    (_, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return metrics

  history = [step(model, optimizer, batch, _key(i)) for i in range(60)]
  for name in ("loss_itc", "loss_itm", "loss_itg", "loss_tig"):
    first = float(history[0][name])
    last = float(np.mean([h[name] for h in history[-3:]]))
    assert last < first / 2, f"{name}: {first:.3f} -> {last:.3f}"
