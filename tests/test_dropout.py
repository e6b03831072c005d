"""Dropout's mask (`layers.keep_mask`, 16 bits an element) and the dropout PRNG option."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from configs_util import load_config
from flax import nnx

from medunifier_jax.models import layers


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 9), (4, 2, 33, 17)])
def test_keep_mask_shape_and_determinism(shape):
  a = layers.keep_mask(jax.random.key(1), 0.1, shape)
  b = layers.keep_mask(jax.random.key(1), 0.1, shape)
  assert a.shape == shape and a.dtype == jnp.bool_
  np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_keep_mask_rate_and_independence(impl):
  key = jax.random.key(0, impl=impl)
  keep = np.asarray(layers.keep_mask(key, 0.1, (16, 4, 64, 65)))
  # 266,240 draws: the kept share's standard error is 6e-4.
  assert abs(keep.mean() - 0.9) < 3e-3
  # The low and high halves of a word decide rows t and t + 32 of axis -2: uncorrelated.
  lo, hi = keep[:, :, :32].ravel(), keep[:, :, 32:64].ravel()
  assert abs(np.corrcoef(lo, hi)[0, 1]) < 0.02


def test_dropout_keeps_the_mean_and_is_off_without_rngs():
  x = jnp.ones((32, 64, 128))
  drop = layers.new_dropout(0.1)
  y = drop(x, rngs=nnx.Rngs(dropout=jax.random.key(3)))
  assert abs(float(y.mean()) - 1.0) < 5e-3
  assert abs(float((y == 0).mean()) - 0.1) < 3e-3
  np.testing.assert_array_equal(drop(x), x)
  np.testing.assert_array_equal(layers.new_dropout(0.0)(x, rngs=nnx.Rngs(dropout=0)), x)


def test_the_dropout_prng_option_names_a_generator():
  config = load_config("tiny")
  key = jax.random.key(0, impl=config.dropout_prng)
  assert layers.keep_mask(key, 0.5, (4, 4)).shape == (4, 4)
