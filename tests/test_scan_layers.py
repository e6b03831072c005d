"""Scanned layer stacks (`model.scan_layers`, models/stack.py) compute what the unrolled loops
compute: the objectives and their gradients, report decoding with cached keys/values, and
the image prior. Layer counts are chosen so that the scan has several steps (three ViT blocks,
four Q-Former layers in two groups of cross-attention + plain layer)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from configs_util import load_config
from flax import nnx
from models_util import random_model

from medunifier_jax.models import stack
from medunifier_jax.models.medunifier import MedUnifier
from medunifier_jax.objectives import compute_losses
from medunifier_jax.prior.model import CodePrior

B, T = 4, 10


@pytest.fixture(scope="module")
def cfg():
  c = load_config("tiny")
  c.model.vit.depth = 3
  c.model.qformer.num_layers = 4
  return c


@pytest.fixture(scope="module")
def models(cfg):
  """(unrolled, scanned): the same weights, the switch set as `MedUnifier` sets it."""
  graphdef, state = random_model(cfg.model)
  plain = nnx.merge(graphdef, state)
  scanned_cfg = cfg.model.copy_and_resolve_references()
  scanned_cfg.scan_layers = True
  scanned = nnx.eval_shape(lambda: MedUnifier(scanned_cfg, rngs=nnx.Rngs(0)))
  nnx.update(scanned, state)
  assert not plain.vit.scan and not plain.qformer.scan
  assert scanned.vit.scan and scanned.qformer.scan and scanned.qformer.scan_period == 2
  return plain, scanned


@pytest.fixture(scope="module")
def batch(cfg):
  s, dec = cfg.model.vit.image_size, cfg.model.qformer.dec_token_id
  ids = jax.random.randint(jax.random.key(2), (B, T), 5, dec).at[:, 0].set(2)
  return {
    "image": jax.random.normal(jax.random.key(1), (B, s, s, 3)),
    "target_image": jax.random.uniform(jax.random.key(3), (B, s, s, 3)),
    "input_ids": ids,
    "attention_mask": jnp.ones((B, T), jnp.int32).at[1, 7:].set(0),
  }


def _close(got, want, rtol=1e-5, atol=1e-6):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol), got, want)


@nnx.jit(static_argnames="train")
def _losses_and_grads(model, batch, *, train):
  # TIG is left out: the VQ-VAE has no scanned layers, and its compile would double the test's.
  def loss_fn(m):
    return compute_losses(
      m, batch, jax.random.key(0), weights={"itc": 1.0, "itm": 1.0, "itg": 1.0}, train=train
    )

  (total, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  return total, metrics, nnx.to_pure_dict(nnx.state(grads, nnx.Param))


@pytest.mark.slow  # about 20 s or more here: left out of `make test-fast`
def test_objectives_and_gradients_match_the_unrolled_layers(models, batch):
  plain, scanned = models
  want = _losses_and_grads(nnx.clone(plain), batch, train=False)
  got = _losses_and_grads(nnx.clone(scanned), batch, train=False)
  _close(got[0], want[0])
  _close(got[1], want[1])
  _close(got[2], want[2], rtol=1e-4, atol=1e-6)
  # Gradients reach every Q-Former layer's own weights through the stacking.
  for layer in got[2]["qformer"]["layers"].values():
    assert float(jnp.abs(layer["attention"]["query"]["kernel"]).max()) > 0


@pytest.mark.slow  # about 20 s or more here: left out of `make test-fast`
def test_training_mode_draws_dropout_per_layer_group(models, batch):
  _, scanned = models
  total, metrics, grads = _losses_and_grads(nnx.clone(scanned), batch, train=True)
  again = _losses_and_grads(nnx.clone(scanned), batch, train=True)[0]
  evaluation = _losses_and_grads(nnx.clone(scanned), batch, train=False)[0]
  assert np.isfinite(float(total)) and float(total) == float(again)
  assert float(total) != float(evaluation)  # dropout is on inside the scan
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_decoding_with_cached_keys_matches(models, batch, cfg):
  plain, scanned = models
  images, ids = batch["image"], batch["input_ids"]
  fed = ids.at[:, 0].set(cfg.model.qformer.dec_token_id)

  @nnx.jit
  def decode(m, images, fed):
    tokens = m.image_tokens(images)
    cache = m.init_decode_cache(tokens, B, T + 2)
    out = []
    for t in range(4):
      logits, cache = m.decode_step(cache, fed[:, t], jnp.int32(t))
      out.append(logits)
    return jnp.stack(out)

  _close(decode(scanned, images, fed), decode(plain, images, fed), atol=1e-5)


def test_prior_blocks_scanned_match(cfg):
  prior_cfg = load_config("tiny", "prior").model
  prior_cfg.depth = 3
  plain = CodePrior(prior_cfg, rngs=nnx.Rngs(0))
  prior_cfg.scan_layers = True
  scanned = nnx.eval_shape(lambda: CodePrior(prior_cfg, rngs=nnx.Rngs(0)))
  nnx.update(scanned, nnx.state(plain))
  n = plain.num_positions
  tokens = jax.random.randint(jax.random.key(0), (2, n), 0, plain.codebook_size + 1)
  states = jax.random.normal(jax.random.key(1), (2, 6, prior_cfg.text_width))
  mask = jnp.ones((2, 6), jnp.int32).at[0, 4:].set(0)
  run = nnx.jit(lambda m, *a: m(*a))
  _close(run(scanned, tokens, states, mask), run(plain, tokens, states, mask), atol=1e-5)


def test_layers_of_other_structure_are_not_scanned(models):
  plain, _ = models
  with pytest.raises(ValueError, match="differs in structure"):
    stack.scan_layers(plain.qformer.layers, lambda m, c, x, r: (c, None), jnp.zeros(()))
  with pytest.raises(ValueError, match="groups of 3"):
    stack.scan_layers(plain.qformer.layers, lambda m, c, x, r: (c, None), jnp.zeros(()), period=3)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_last_layer_rows_equal_the_full_pass(models, batch, scan):
  # The training step asks the text pass for [CLS] alone and the matching pass for the queries
  # alone (`rows`): the same values as slicing the full pass, and nothing else is returned.
  m = models[int(scan)]
  ids, mask = batch["input_ids"], batch["attention_mask"]
  q = m.query_tokens.shape[1]

  @nnx.jit
  def passes(m, images, ids, mask):
    tokens = m.image_tokens(images)
    full = m.qformer(m._queries(B), ids, mask, tokens, mode="matching")
    rows = m.qformer(m._queries(B), ids, mask, tokens, mode="matching", rows=q)
    return m.text_hidden(ids, mask), m.text_hidden(ids, mask, cls_only=True), full, rows

  text, cls, full, rows = passes(m, batch["image"], ids, mask)
  assert cls.shape == (B, 1, text.shape[-1]) and rows.shape == (B, q, full.shape[-1])
  _close(cls, text[:, :1])
  _close(rows, full[:, :q])
