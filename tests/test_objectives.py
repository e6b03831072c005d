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
  terms = [
    _smoothed_ce(logits[r, c], ids[r, c + 1], s)
    for r in range(b)
    for c in range(t - 1)
    if mask[r, c + 1]
  ]
  loss = obj.itg_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask), s)
  np.testing.assert_allclose(float(loss), np.mean(terms), rtol=1e-5)
  # Predictions of padding targets and the padding ids themselves do not count.
  logits[1, 2:] += rng.normal(size=(t - 2, v)).astype(np.float32)
  ids[1, 3:] = (ids[1, 3:] + 1) % v
  same = obj.itg_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask), s)
  np.testing.assert_allclose(float(same), float(loss), rtol=1e-6)


def test_itg_over_a_padded_vocabulary_smooths_over_the_real_classes_only():
  rng = np.random.default_rng(5)
  b, t, real, v, s = 2, 5, 7, 10, 0.1
  logits = rng.normal(size=(b, t, real)).astype(np.float32)
  ids = rng.integers(0, real, size=(b, t))
  mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
  plain = obj.itg_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask), s)
  # Columns real..v-1 are padding, whatever their values: the loss is the unpadded one.
  padding = rng.normal(size=(b, t, v - real)).astype(np.float32) * 30
  padded = jnp.asarray(np.concatenate([logits, padding], axis=-1))
  got = obj.itg_loss(padded, jnp.asarray(ids), jnp.asarray(mask), s, num_classes=real)
  np.testing.assert_allclose(float(got), float(plain), rtol=1e-6)
  # num_classes equal to the width is the plain loss, to the bit.
  same = obj.itg_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask), s, num_classes=real)
  assert float(same) == float(plain)


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
  patterns = [
    yy,
    xx,
    (np.sin(6 * xx) * np.sin(6 * yy) + 1) / 2,
    np.exp(-((yy - 0.5) ** 2 + (xx - 0.5) ** 2) / 0.05),
  ]
  colours = np.array([[0.9, 0.3, 0.1], [0.2, 0.8, 0.3], [0.3, 0.3, 0.9], [0.8, 0.8, 0.8]])
  target = np.stack([p[..., None] * c for p, c in zip(patterns, colours)]).astype(np.float32)
  # Real token ids only ([DEC] and the vocabulary's padding rows above it are never fed).
  ids = np.random.default_rng(4).integers(5, cfg.model.qformer.dec_token_id, size=(b, t))
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


@pytest.mark.slow  # about 20 s or more here: left out of `make test-fast`
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


# -- duplicate-aware negatives -------------------------------------------------------------------


def _hand_masked_ce(row, label, keep, s):
  """Smoothed CE over the kept classes only (smoothing spread over them)."""
  kept = np.flatnonzero(keep)
  z = row[kept]
  logp = z - z.max() - math.log(np.exp(z - z.max()).sum())
  target = np.full(len(kept), s / len(kept))
  target[list(kept).index(label)] += 1 - s
  return -(target * logp).sum()


def test_duplicate_texts_leave_the_itc_softmax():
  rng = np.random.default_rng(5)
  b, q, e, temp, s = 4, 3, 6, 0.1, 0.1
  images, texts = _normalised(rng, b, q, e), _normalised(rng, b, e)
  ids = jnp.asarray([[2, 7, 9, 0], [2, 8, 0, 0], [2, 7, 9, 0], [2, 5, 6, 3]], jnp.int32)
  dups = np.asarray(obj.duplicate_texts(ids))
  assert dups.tolist() == [[1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]]
  loss, logits = obj.itc_loss(
    jnp.asarray(images), jnp.asarray(texts), jnp.float32(temp), s, duplicates=jnp.asarray(dups)
  )
  logits = np.asarray(logits, np.float64)
  keep = ~(dups & ~np.eye(b, dtype=bool))
  i2t = np.mean([_hand_masked_ce(logits[i], i, keep[i], s) for i in range(b)])
  t2i = np.mean([_hand_masked_ce(logits[:, j], j, keep[:, j], s) for j in range(b)])
  np.testing.assert_allclose(float(loss), (i2t + t2i) / 2, rtol=1e-5)
  plain, _ = obj.itc_loss(jnp.asarray(images), jnp.asarray(texts), jnp.float32(temp), s)
  assert float(loss) != float(plain)
  # An excluded logit is not in the denominator: moving it changes nothing.
  labels, excluded = jnp.arange(b), jnp.asarray(~keep)
  moved = jnp.asarray(logits, jnp.float32) + jnp.where(excluded, 50.0, 0.0)
  np.testing.assert_array_equal(
    obj.masked_smoothed_cross_entropy(moved, labels, excluded, s),
    obj.masked_smoothed_cross_entropy(jnp.asarray(logits, jnp.float32), labels, excluded, s),
  )


def test_duplicates_are_never_drawn_as_itm_negatives():
  # Rows 0, 1 and 2 carry one text; their logits would win nearly every draw if allowed.
  ids = jnp.asarray([[7, 1], [7, 1], [7, 1], [3, 1], [4, 1]], jnp.int32)
  dups = obj.duplicate_texts(ids)
  b = ids.shape[0]
  logits = jnp.asarray(np.random.default_rng(6).normal(size=(b, b)), jnp.float32)
  logits = logits + 20.0 * dups
  keys = jax.random.split(jax.random.key(1), 500)
  neg_image, neg_text = jax.vmap(lambda k: obj.sample_hard_negatives(logits, k, dups))(keys)
  for draws in (np.asarray(neg_image), np.asarray(neg_text)):
    assert (draws >= 0).all()
    assert not np.asarray(dups)[draws, np.arange(b)].any()  # never a duplicate, nor itself
  # The stand-in model says "match" when the image's value equals the text's first id: a
  # duplicate drawn as a negative would be a mislabelled pair and raise the loss.
  images = jnp.asarray([7, 7, 7, 3, 4], jnp.float32)[:, None, None] * jnp.ones((1, 2, 2))
  loss = obj.itm_loss(
    _PairChecker(), images, ids, jnp.ones_like(ids), logits, jax.random.key(2), duplicates=dups
  )
  np.testing.assert_allclose(float(loss), math.log1p(math.exp(-2.0)), rtol=1e-5)
  naive = obj.itm_loss(_PairChecker(), images, ids, jnp.ones_like(ids), logits, jax.random.key(2))
  assert float(naive) > float(loss) + 0.1

  # A batch of one text: no row has a negative left. No NaN: the positives alone count.
  same = jnp.asarray([[7, 1]] * 3, jnp.int32)
  dups = obj.duplicate_texts(same)
  neg_image, neg_text = obj.sample_hard_negatives(jnp.zeros((3, 3)), jax.random.key(3), dups)
  assert np.asarray(neg_image).tolist() == np.asarray(neg_text).tolist() == [-1, -1, -1]
  loss = obj.itm_loss(
    _PairChecker(),
    images[:3],
    same,
    jnp.ones_like(same),
    jnp.zeros((3, 3)),
    jax.random.key(3),
    duplicates=dups,
  )
  np.testing.assert_allclose(float(loss), math.log1p(math.exp(-2.0)), rtol=1e-5)


def test_without_duplicates_the_losses_are_exactly_the_plain_ones():
  rng = np.random.default_rng(7)
  b, q, e = 5, 3, 4
  images, texts = jnp.asarray(_normalised(rng, b, q, e)), jnp.asarray(_normalised(rng, b, e))
  ids = jnp.asarray(rng.integers(5, 50, size=(b, 6)), jnp.int32)
  dups = obj.duplicate_texts(ids)
  assert (np.asarray(dups) == np.eye(b, dtype=bool)).all()
  aware, logits = obj.itc_loss(images, texts, jnp.float32(0.07), 0.1, duplicates=dups)
  plain, _ = obj.itc_loss(images, texts, jnp.float32(0.07), 0.1)
  assert float(aware) == float(plain)
  grad = lambda d: jax.grad(lambda t: obj.itc_loss(images, t, 0.07, 0.1, duplicates=d)[0])(texts)
  np.testing.assert_array_equal(grad(dups), grad(None))
  pixels = jnp.arange(b, dtype=jnp.float32)[:, None, None] * jnp.ones((1, 2, 2))
  itm = lambda d: obj.itm_loss(
    _PairChecker(), pixels, ids, jnp.ones_like(ids), logits, jax.random.key(4), duplicates=d
  )
  assert float(itm(dups)) == float(itm(None))


def test_duplicates_span_the_global_batch_under_jit():
  """Rows 1 and 6 hold one text on different devices of an 8-way data mesh."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from medunifier_jax.training.mesh import make_mesh

  rng = np.random.default_rng(8)
  b = 8
  ids = rng.integers(5, 50, size=(b, 6)).astype(np.int32)
  ids[6] = ids[1]
  images, texts = _normalised(rng, b, 3, 4), _normalised(rng, b, 4)

  def losses(ids, images, texts):
    dups = obj.duplicate_texts(ids)
    return dups, obj.itc_loss(images, texts, 0.1, 0.1, duplicates=dups)[0]

  mesh = make_mesh([("data", 8), ("model", 1)])  # the training mesh's axis types
  rows = NamedSharding(mesh, P("data"))
  sharded = jax.device_get(jax.jit(losses, in_shardings=(rows, rows, rows))(ids, images, texts))
  single = jax.device_get(jax.jit(losses)(ids, images, texts))
  assert bool(sharded[0][1, 6]) and bool(sharded[0][6, 1])
  np.testing.assert_array_equal(sharded[0], single[0])
  np.testing.assert_allclose(float(sharded[1]), float(single[1]), rtol=1e-6)


def test_compute_losses_with_and_without_the_option(model, batch):
  """No duplicates in the batch: both settings give the same ITC and ITM losses, to the bit.
  With one, ITC changes and nothing becomes NaN."""

  @nnx.jit
  def both(m, batch, rng):
    out = {}
    for aware in (True, False):
      _, out[aware] = obj.compute_losses(
        m, batch, rng, weights={"itc": 1.0, "itm": 1.0}, train=False, duplicate_aware=aware
      )
    return out

  out = both(model, batch, _key(5))
  for name in ("loss_itc", "loss_itm", "loss"):
    assert float(out[True][name]) == float(out[False][name]), name
  assert float(out[True]["duplicate_fraction"]) == 0.0
  repeated = dict(
    batch,
    input_ids=batch["input_ids"].at[2].set(batch["input_ids"][0]),
    attention_mask=batch["attention_mask"].at[2].set(batch["attention_mask"][0]),
  )
  out = both(model, repeated, _key(5))
  assert float(out[True]["duplicate_fraction"]) == 0.5
  assert float(out[True]["loss_itc"]) != float(out[False]["loss_itc"])
  assert all(np.isfinite(float(v)) for v in out[True].values())


def test_itm_itg_tig_on_the_first_examples_itc_on_the_whole_batch(model, batch):
  """itm_itg_tig_batch=2 of 4: ITC is the whole batch's, ITM/ITG/TIG those of the first two
  examples alone (evaluation mode: no dropout, BatchNorm's running statistics)."""
  weights = {"itc": 1.0, "itm": 1.0, "itg": 1.0, "tig": 1.0}
  first = {k: v[:2] for k, v in batch.items()}

  @nnx.jit
  def three(m, batch, first, rng):
    run = lambda b, **kw: obj.compute_losses(m, b, rng, weights=weights, train=False, **kw)[1]
    return run(batch, itm_itg_tig_batch=2), run(batch), run(first)

  split, whole, alone = three(model, batch, first, _key(6))
  np.testing.assert_allclose(split["loss_itc"], whole["loss_itc"], rtol=1e-6)
  for name in ("loss_itm", "loss_itg", "loss_tig", "tig_mse"):
    np.testing.assert_allclose(split[name], alone[name], rtol=1e-5, err_msg=name)
    assert float(split[name]) != float(whole[name]), name
  with pytest.raises(ValueError, match="at most the batch size"):
    obj.compute_losses(model, batch, _key(6), weights=weights, itm_itg_tig_batch=5)


def test_the_alignment_text_feeds_itc_itm_tig_while_itg_writes_the_report(model, batch):
  """align_ids equal to input_ids: every loss as without them. A shorter alignment text changes
  ITC, ITM and TIG and leaves ITG's loss as it was (evaluation mode: no dropout)."""
  weights = {"itc": 1.0, "itm": 1.0, "itg": 1.0, "tig": 1.0}
  ids, mask = batch["input_ids"], batch["attention_mask"]
  short = mask * (jnp.arange(ids.shape[1]) < 5)
  same = dict(batch, align_ids=ids, align_mask=mask)
  shorter = dict(batch, align_ids=jnp.where(short == 1, ids, 0), align_mask=short)

  @nnx.jit
  def three(m, batches, rng):
    return [obj.compute_losses(m, b, rng, weights=weights, train=False)[1] for b in batches]

  plain, with_same, with_shorter = three(model, (batch, same, shorter), _key(7))
  for name in obj.METRIC_KEYS:
    np.testing.assert_allclose(with_same[name], plain[name], rtol=1e-6, err_msg=name)
  np.testing.assert_allclose(with_shorter["loss_itg"], plain["loss_itg"], rtol=1e-6)
  for name in ("loss_itc", "loss_itm", "loss_tig"):
    assert float(with_shorter[name]) != float(plain[name]), name


def test_training_refuses_a_larger_itm_itg_tig_batch_before_compiling(cfg):
  from medunifier_jax import pretraining

  config = cfg.copy_and_resolve_references()
  config.itm_itg_tig_batch = int(config.batch_size) + 1
  with pytest.raises(ValueError, match="config.itm_itg_tig_batch"):
    pretraining.preflight(config, resuming=True)
  config.itm_itg_tig_batch = int(config.batch_size)
  pretraining.preflight(config, resuming=True)


def test_affirmed_alignment_text_enters_the_step_batch(cfg):
  """The task's batch entries, the ahead-of-time shapes and the synthetic batch carry the
  alignment text exactly when config.data.alignment_text asks for it; a typo stops preflight."""
  from medunifier_jax import pretraining

  config = cfg.copy_and_resolve_references()
  assert pretraining.task(config).batch_keys == pretraining.BATCH_KEYS
  config.data.alignment_text = "affirmed"
  keys = pretraining.task(config).batch_keys
  assert keys == pretraining.BATCH_KEYS + pretraining.ALIGN_KEYS
  shapes, host = pretraining.batch_shapes(config, 4), pretraining.random_batch(config, 0, 4)
  assert set(shapes) == set(host) == set(keys)
  for key in keys:
    assert (shapes[key].shape, shapes[key].dtype) == (host[key].shape, host[key].dtype), key
  assert (host["align_mask"].sum(1) < host["attention_mask"].sum(1)).all()
  config.data.alignment_text = "negated"
  with pytest.raises(ValueError, match="config.data.alignment_text is 'negated'"):
    pretraining.preflight(config, resuming=True)


# -- temperature and ln_vision --------------------------------------------------------------------


def test_temperature_outside_its_bounds_keeps_its_gradient(model):
  rng = np.random.default_rng(9)
  images, texts = jnp.asarray(_normalised(rng, 4, 3, 16)), jnp.asarray(_normalised(rng, 4, 16))
  saved = model.temp.get_value()
  try:
    model.temp.set_value(jnp.float32(2.0))  # above temperature_max = 0.5
    assert float(model.temperature()) == 0.5  # used at its bound, as BLIP-2 clamps first
    grads = nnx.grad(
      lambda m: obj.itc_loss(images, texts, m.temperature(), 0.1)[0],
      argnums=nnx.DiffState(0, nnx.PathContains("temp")),
    )(model)
    # A plain clip would give exactly 0 here, and the temperature could never come back.
    assert float(grads["temp"].get_value()) != 0.0
    model.constrain_parameters()  # what the training step does after each update
    assert float(model.temp.get_value()) == 0.5
  finally:
    model.temp.set_value(saved)


def test_ln_vision_learns_while_the_frozen_vit_does_not(model, batch):
  assert model.vit_frozen  # the module's configuration

  @nnx.jit
  def grads(m, x):
    return nnx.grad(lambda m: jnp.sum(m.image_tokens(x)[:, 0] ** 2))(m)

  g = grads(model, batch["image"])
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(g["vit"]))
  assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(g["ln_vision"]))
