"""Memory switches of the training step: the VQ-VAE decoder's remat and one-conv upsampling,
and the objectives' example splitting. Each must leave the values as they were."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from configs_util import load_config
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from medunifier_jax import objectives
from medunifier_jax.models import vqvae as vq
from medunifier_jax.training import mesh as mesh_lib

BATCH = 4


@pytest.fixture(scope="module")
def tiny():
  return load_config("tiny")


def _build(tiny, **switches):
  """The tiny VQ-VAE with `switches` set in its config (`remat_decoder`, `upsample_one_conv`)."""
  cfg = tiny.model.vqvae.copy_and_resolve_references()
  cfg.update(switches)
  m = tiny.model
  # The RBG generator compiles much faster than threefry on CPU; the values do not matter here.
  return vq.VQVAE(
    cfg,
    query_width=m.qformer.hidden_size,
    vision_width=m.vit.width,
    text_width=m.qformer.hidden_size,
    image_size=m.vit.image_size,
    rngs=nnx.Rngs(jax.random.key(0, impl="rbg")),
  )


@pytest.fixture(scope="module")
def plain(tiny):
  """The tiny VQ-VAE with both switches off, built once (in one compiled program)."""
  return nnx.jit(lambda: _build(tiny))()


def _switched(model, *, remat=False, one_conv=False):
  """A copy of `model` with the switches set as `VQVAE` sets them from its config."""
  model = nnx.clone(model)
  model.decoder.remat = remat
  for up in (model.top_to_bottom.up, model.upsample_top, *model.decoder.ups):
    up.one_conv = one_conv
  return model


def test_config_fields_reach_the_modules(tiny):
  model = nnx.eval_shape(lambda: _build(tiny, remat_decoder=True, upsample_one_conv=True))
  assert model.decoder.remat
  assert all(up.one_conv for up in (model.top_to_bottom.up, model.upsample_top, *model.decoder.ups))
  model = nnx.eval_shape(lambda: _build(tiny))
  assert not model.decoder.remat and not any(up.one_conv for up in model.decoder.ups)


def _inputs(tiny, seed=0):
  """queries (B, Q, Hq), patch tokens (B, g*g, Dv), text (B, Ht), target (B, S, S, 3)."""
  m = tiny.model
  g, s = m.vqvae.grid, m.vit.image_size
  rng = np.random.default_rng(seed)
  shapes = [
    (BATCH, m.qformer.num_queries, m.qformer.hidden_size),
    (BATCH, g * g, m.vit.width),
    (BATCH, m.qformer.hidden_size),
  ]
  arrays = [jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in shapes]
  return *arrays, jnp.asarray(rng.uniform(size=(BATCH, s, s, 3)), jnp.float32)


@nnx.jit
def _train_step(model, queries, patches, text, target):
  """One training pass: (reconstruction, TIG loss, gradients); updates the batch statistics."""

  def loss_fn(model):
    out = model(queries, patches, text, train=True)
    loss, _ = vq.tig_loss(out, target)
    return loss, out.recon

  (loss, recon), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  return recon, loss, grads


def _run(model, inputs):
  recon, loss, grads = _train_step(model, *inputs)
  stats = nnx.state(model, nnx.BatchStat)
  return jax.tree.map(np.asarray, (recon, loss, nnx.to_pure_dict(grads), nnx.to_pure_dict(stats)))


def _assert_trees_close(a, b, rtol, atol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def _assert_trees_close_to_scale(a, b, rtol):
  """|a - b| <= rtol * max|b|, leaf by leaf, with max|b| taken as at least 1e-3: gradients that
  are zero up to rounding (a convolution's bias before a BatchNorm: about 1e-9 here) have no
  scale of their own."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=0, atol=rtol * max(np.abs(y).max(), 1e-3))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_hand_written_batch_norm_relu_matches_the_library(dtype, tol):
  """`_batch_norm_relu_train` against `relu(nnx.BatchNorm(x))`: values, running averages and
  gradients, in bfloat16 (the paper's compute dtype) and float32."""
  keys = jax.random.split(jax.random.key(1), 4)
  x = (3.0 + 2.0 * jax.random.normal(keys[0], (4, 6, 6, 8))).astype(dtype)
  cotangent = jax.random.normal(keys[1], x.shape).astype(dtype)
  norm = vq._batch_norm(8, 0.9, rngs=nnx.Rngs(0), dtype=dtype)
  norm.scale[...] = 1.0 + 0.3 * jax.random.normal(keys[2], (8,))
  norm.bias[...] = 0.5 * jax.random.normal(keys[3], (8,))
  graphdef, params, stats = nnx.split(norm, nnx.Param, nnx.BatchStat)
  as_f32 = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float32), tree)

  def run(hand_written):
    def forward(params, stats, x):
      module = nnx.merge(graphdef, params, stats)
      if hand_written:
        y = vq._batch_norm_relu_train(module, x)
      else:
        y = jax.nn.relu(module(x, use_running_average=False))
      return y, nnx.to_pure_dict(nnx.state(module, nnx.BatchStat))

    # The statistics go in as arguments so that the call may update them (their cotangent,
    # unused, is zero).
    y, vjp, new_stats = jax.vjp(forward, params, stats, x, has_aux=True)
    grads, _, dx = vjp(cotangent)
    return as_f32(y), as_f32((dx, nnx.to_pure_dict(grads))), as_f32(new_stats)

  (y0, grads0, stats0), (y1, grads1, stats1) = run(False), run(True)
  np.testing.assert_array_equal(y1, y0)
  _assert_trees_close_to_scale(grads1, grads0, tol)
  _assert_trees_close(stats1, stats0, rtol=1e-6, atol=1e-7)


def test_decoder_remat_keeps_outputs_gradients_and_batch_statistics(tiny, plain):
  inputs = _inputs(tiny)
  fresh, model, remat = nnx.clone(plain), nnx.clone(plain), _switched(plain, remat=True)
  start = np.asarray(plain.decoder.norms[0].mean[...])
  # Two steps: the second one starts from the running averages the first one wrote.
  for _ in range(2):
    expected, got = _run(model, inputs), _run(remat, inputs)
    _assert_trees_close(got, expected, rtol=1e-6, atol=1e-7)
  # The recomputation in the backward pass updates nothing: each step moved the averages once.
  # With the same batch twice, mean = m^2 start + (1 - m^2) batch mean: (1 + m) times one
  # step's distance from the start (a third update would make it 1 + m + m^2).
  two_steps = np.abs(got[3]["decoder"]["norms"][0]["mean"] - start).max()
  one_step = np.abs(_run(fresh, inputs)[3]["decoder"]["norms"][0]["mean"] - start).max()
  assert one_step > 0
  np.testing.assert_allclose(two_steps / one_step, 1 + tiny.model.vqvae.batchnorm_momentum, 1e-4)


def test_one_conv_upsampling_matches_the_phase_convolutions(tiny, plain):
  inputs = _inputs(tiny, seed=1)
  expected = _run(nnx.clone(plain), inputs)
  got = _run(_switched(plain, remat=True, one_conv=True), inputs)
  # The same products summed in another order.
  _assert_trees_close(got, expected, rtol=1e-4, atol=1e-5)


def test_one_conv_upsampling_values_and_gradients():
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (2, 3, 5, 4))  # odd and even sizes, Cin 4 -> Cout 3
  kernel = jax.random.normal(keys[1], (4, 4, 4, 3))
  cotangent = jax.random.normal(keys[2], (2, 6, 10, 3))

  @jax.jit
  def values_and_grads(x, kernel):
    out = {}
    for name, conv in (("one", vq._upsample_one_conv), ("phases", vq._upsample_phases)):
      y, vjp = jax.vjp(conv, x, kernel)
      out[name] = (y, *vjp(cotangent))
    return out

  out = values_and_grads(x, kernel)
  _assert_trees_close(out["one"], out["phases"], 1e-5, 1e-5)


def test_split_examples_constrains_under_a_mesh_and_is_inert_without():
  x = jnp.arange(16.0).reshape(8, 2)
  assert objectives.split_examples(x, x) is x  # no mesh: nothing to do
  mesh = mesh_lib.make_mesh([("data", -1), ("model", 1)])
  replicated = NamedSharding(mesh, PartitionSpec())
  rows = NamedSharding(mesh, PartitionSpec("data"))

  @jax.jit
  def gathered(x, index):
    # A gather across the batch, replicated unless the rows are split again.
    y = x[index] * 2.0
    return objectives.split_examples((y, None), index)[0]

  index = jax.device_put(jnp.arange(8)[::-1], rows)
  out = gathered(jax.device_put(x, replicated), index)
  np.testing.assert_array_equal(out, x[::-1] * 2.0)
  if mesh.shape["data"] > 1:
    assert out.sharding.spec[0] == "data"
