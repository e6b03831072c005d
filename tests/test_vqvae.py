"""The two-level VQ-VAE and its quantizer: behaviour, geometry, parameter counts."""

import copy
import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from medunifier_jax.models import quantizer as qz
from medunifier_jax.models import vqvae as vq

CONFIG_PATH = pathlib.Path(__file__).resolve().parents[1] / "configs" / "pretrain.py"
AXIS_VOCABULARY = {"embed", "mlp", "heads", "kv", "vocab", "codebook", "conv_in", "conv_out", None}


def _load_config(variant):
  spec = importlib.util.spec_from_file_location("pretrain_config", CONFIG_PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def _widths(config):
  m = config.model
  return dict(
    query_width=m.qformer.hidden_size,
    vision_width=m.vit.width,
    text_width=m.qformer.hidden_size,
    image_size=m.vit.image_size,
  )


def _vq_cfg(config, **overrides):
  cfg = copy.deepcopy(config.model.vqvae)
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


def _inputs(config, batch, seed=0):
  m = config.model
  g = m.vqvae.grid
  rng = np.random.default_rng(seed)
  shapes = [
    (batch, m.qformer.num_queries, m.qformer.hidden_size),
    (batch, g * g, m.vit.width),
    (batch, m.qformer.hidden_size),
  ]
  return [jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in shapes]


def _target(batch, size, seed=0):
  """Smooth [0, 1] images: a bright disc at a random place per sample."""
  centres = np.random.default_rng(seed).uniform(0.3, 0.7, size=(batch, 2)) * size
  yy, xx = np.mgrid[:size, :size]
  r2 = (yy[None] - centres[:, :1, None]) ** 2 + (xx[None] - centres[:, 1:, None]) ** 2
  disc = np.exp(-r2 / (2 * (size / 6) ** 2))
  return jnp.asarray(np.repeat(disc[..., None], 3, axis=-1), jnp.float32)


@pytest.fixture(scope="module")
def tiny():
  return _load_config("tiny")


@pytest.fixture(scope="module")
def paper():
  return _load_config("paper")


@pytest.fixture(scope="module")
def tiny_model(tiny):
  """A tiny VQ-VAE built once (in one compiled program); tests that change it take clones."""
  # The RBG generator compiles much faster than threefry on CPU; the values do not matter here.
  build = lambda: vq.VQVAE(
    _vq_cfg(tiny), **_widths(tiny), rngs=nnx.Rngs(jax.random.key(0, impl="rbg"))
  )
  return nnx.jit(build)()


@nnx.jit
def _evaluate(model, queries, patches, text):
  """Evaluation pass and the decoding of its own codes."""
  out = model(queries, patches, text, train=False)
  return out, model.decode_codes(out.codes_top, out.codes_bottom)


@nnx.jit
def _train_grads(model, queries, patches, text, target, vq_weight):
  """Training pass: (reconstruction, TIG metrics, gradients of MSE + vq_weight * VQ losses).

  vq_weight 1 is the TIG loss; 0 leaves the reconstruction MSE alone. One compiled function
  serves every training-mode test.
  """

  def loss_fn(model):
    out = model(queries, patches, text, train=True)
    loss, metrics = vq.tig_loss(out, target)
    loss = loss - (1.0 - vq_weight) * (out.loss_top + out.loss_bottom)
    return loss, (out.recon, metrics)

  grads, (recon, metrics) = nnx.grad(loss_fn, has_aux=True)(model)
  return recon, metrics, grads


@nnx.jit
def _adam_update(optimizer, model, grads):
  optimizer.update(model, grads)


# ----------------------------------------------------------------------------- quantizer


def _quantizer(num_codes, width, **kwargs):
  return qz.VectorQuantizer(num_codes, width, rngs=nnx.Rngs(0), **kwargs)


@nnx.jit(static_argnames="train")
def _quantize(q, z, train, rngs=None):
  return q(z, train=train, rngs=rngs)


def test_codebook_init_and_nearest_code_match_numpy():
  q = _quantizer(32, 16)
  init = np.asarray(q.codebook[...])
  assert np.abs(init).max() <= 1 / 32 and np.abs(init).max() > 0.9 / 32  # uniform(-1/K, 1/K)
  rng = np.random.default_rng(0)
  codebook = rng.normal(size=(32, 16)).astype(np.float32)
  q.codebook[...] = jnp.asarray(codebook)
  z = rng.normal(size=(3, 5, 7, 16)).astype(np.float32)
  out = _quantize(q, jnp.asarray(z), train=False)
  dist = ((z.reshape(-1, 1, 16) - codebook[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(np.asarray(out.codes), dist.argmin(-1).reshape(3, 5, 7))
  assert out.codes.dtype == jnp.int32
  np.testing.assert_allclose(
    np.asarray(out.z_q), codebook[dist.argmin(-1)].reshape(z.shape), atol=1e-6
  )
  # Paper weights: commitment 1.0 + codebook 0.5; both terms have the same value.
  np.testing.assert_allclose(float(out.loss), 1.5 * dist.min(-1).mean() / 16, rtol=1e-5)


def test_perplexity_and_usage_on_a_fixed_assignment():
  q = _quantizer(8, 8)
  codebook = 10.0 * np.eye(8, dtype=np.float32)
  q.codebook[...] = jnp.asarray(codebook)
  assign = np.array([0, 0, 0, 1, 1, 2, 5, 5, 5, 5, 5, 7])
  noise = np.random.default_rng(1).normal(scale=0.1, size=(len(assign), 8))
  out = _quantize(q, jnp.asarray(codebook[assign] + noise, jnp.float32), train=False)
  np.testing.assert_array_equal(np.asarray(out.codes), assign)
  p = np.bincount(assign, minlength=8) / len(assign)
  p = p[p > 0]
  np.testing.assert_allclose(float(out.perplexity), np.exp(-(p * np.log(p)).sum()), rtol=1e-5)
  assert float(out.usage) == pytest.approx(5 / 8)


def test_codebook_term_moves_the_codes_and_commitment_term_the_encoder():
  n, c, k = 40, 8, 16
  z = jnp.asarray(np.random.default_rng(2).normal(size=(n, c)), jnp.float32)

  @nnx.jit
  def grads(q, z):
    return nnx.grad(lambda q, z: q(z, train=True).loss, argnums=(0, 1))(q, z)

  q = _quantizer(k, c, commitment_weight=0.0, codebook_weight=1.0)
  g_q, g_z = grads(q, z)
  g_code = np.asarray(g_q["codebook"][...])
  assert float(jnp.abs(g_z).max()) == 0.0  # the codebook term does not reach the encoder
  codebook = np.asarray(q.codebook[...])
  codes = np.asarray(_quantize(q, z, train=False).codes)
  # d/de_k mean((e_code - z)^2) = 2 n_k (e_k - mean of its vectors) / (N C); 0 for unused codes.
  expected = np.zeros_like(codebook)
  for j in np.unique(codes):
    members = np.asarray(z)[codes == j]
    expected[j] = 2 * len(members) * (codebook[j] - members.mean(0)) / (n * c)
  np.testing.assert_allclose(g_code, expected, rtol=1e-4, atol=1e-8)
  stepped = codebook - (n * c / 8) * g_code  # one SGD step
  dist = lambda book: np.mean(np.sum((book[codes] - np.asarray(z)) ** 2, -1))
  assert dist(stepped) < 0.9 * dist(codebook)

  q = _quantizer(k, c, commitment_weight=1.0, codebook_weight=0.0)
  g_q, g_z = grads(q, z)
  assert float(jnp.abs(g_q["codebook"][...]).max()) == 0.0  # commitment does not move codes
  assert float(jnp.abs(g_z).max()) > 0.0


def test_ema_codebook_follows_the_assigned_means_without_gradients():
  decay, k, c = 0.9, 8, 4
  q = _quantizer(k, c, ema=True, ema_decay=decay)
  assert not jax.tree.leaves(nnx.state(q, nnx.Param))  # nothing for an optimizer to touch
  init = np.asarray(q.codebook[...])
  z = np.random.default_rng(3).normal(size=(30, c)).astype(np.float32) * 0.01
  out_eval = _quantize(q, jnp.asarray(z), train=False)
  np.testing.assert_array_equal(np.asarray(q.codebook[...]), init)  # eval leaves it alone
  out = _quantize(q, jnp.asarray(z), train=True)
  np.testing.assert_array_equal(np.asarray(out.codes), np.asarray(out_eval.codes))
  # Only the commitment term: loss = mean((z_q - z)^2) with weight 1.
  np.testing.assert_allclose(
    float(out.loss), ((init[np.asarray(out.codes)] - z) ** 2).mean(), rtol=1e-5
  )

  one_hot = np.eye(k)[np.asarray(out.codes)]
  count = decay * 1.0 + (1 - decay) * one_hot.sum(0)
  total = decay * init + (1 - decay) * one_hot.T @ z
  n = count.sum()
  expected = total / ((count + 1e-5) / (n + k * 1e-5) * n)[:, None]
  np.testing.assert_allclose(np.asarray(q.codebook[...]), expected, rtol=1e-5, atol=1e-7)
  used = np.unique(np.asarray(out.codes))
  # Used codes moved towards the mean of their vectors, unused ones (almost) stayed put.
  for j in used:
    mean = z[np.asarray(out.codes) == j].mean(0)
    assert np.linalg.norm(expected[j] - mean) < np.linalg.norm(init[j] - mean)
  unused = np.setdiff1d(np.arange(k), used)
  np.testing.assert_allclose(np.asarray(q.codebook[...])[unused], init[unused], rtol=1e-3)


@pytest.mark.parametrize("ema", [False, True])
def test_dead_code_restarts_are_deterministic_and_draw_encoder_outputs(ema):
  z = jnp.asarray(np.random.default_rng(4).normal(size=(6, 4)), jnp.float32)

  def run(seed, train=True):
    q = _quantizer(16, 4, restart_dead_codes=True, ema=ema)
    before, params = np.asarray(q.vectors()), jax.tree.map(np.asarray, nnx.state(q, nnx.Param))
    out = _quantize(q, z, train=train, rngs=nnx.Rngs(codes=seed))
    # Restarts write only non-gradient state: they survive a step that carries back only that.
    jax.tree.map(np.testing.assert_array_equal, nnx.state(q, nnx.Param), params)
    return before, np.asarray(q.vectors()), np.asarray(out.codes)

  before, after, codes = run(0)
  live = np.unique(codes)
  dead = np.setdiff1d(np.arange(16), live)
  assert len(dead) >= 10
  if not ema:  # (EMA moves the live codes too)
    np.testing.assert_array_equal(after[live], before[live])
  for j in dead:  # each restarted code is one of the batch's encoder outputs
    assert np.min(np.abs(np.asarray(z) - after[j]).max(-1)) < 1e-6
  np.testing.assert_array_equal(run(0)[1], after)
  assert not np.array_equal(run(1)[1], after)
  np.testing.assert_array_equal(run(0, train=False)[1], before)
  with pytest.raises(ValueError, match="pass rngs"):
    _quantize(_quantizer(16, 4, restart_dead_codes=True, ema=ema), z, train=True)


# ----------------------------------------------------------------------------- geometry


def test_transposed_conv_doubles_like_pytorch():
  """PyTorch ConvTranspose2d(4, stride=2, padding=1): out[2i - 1 + a] += x[i] w[a]."""
  rng = np.random.default_rng(5)
  x = rng.normal(size=(2, 5, 3, 3)).astype(np.float32)
  w = rng.normal(size=(3, 2, 4, 4)).astype(np.float32)  # PyTorch layout (in, out, kh, kw)
  b = rng.normal(size=(2,)).astype(np.float32)
  full = np.zeros((2, 2 * 5 + 2, 2 * 3 + 2, 2), np.float32)
  for i in range(5):
    for j in range(3):
      full[:, 2 * i : 2 * i + 4, 2 * j : 2 * j + 4] += np.einsum("bc,cohw->bhwo", x[:, i, j], w)
  expected = full[:, 1:-1, 1:-1] + b

  conv = vq._upsample_conv(3, 2, rngs=nnx.Rngs(0), dtype=None)
  # Flax convolves the dilated input without flipping the kernel; PyTorch's scatter flips it.
  conv.kernel[...] = jnp.asarray(w.transpose(2, 3, 0, 1)[::-1, ::-1])
  conv.bias[...] = jnp.asarray(b)
  out = np.asarray(conv(jnp.asarray(x)))
  assert out.shape == (2, 10, 6, 2)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def _torch_transposed_conv(x, w, b):
  """NumPy ConvTranspose2d(4, stride=2, padding=1): x (B, H, W, Ci), w (Ci, Co, 4, 4), b (Co,)."""
  batch, height, width, _ = x.shape
  full = np.zeros((batch, 2 * height + 2, 2 * width + 2, w.shape[1]), np.float64)
  for i in range(height):
    for j in range(width):
      full[:, 2 * i : 2 * i + 4, 2 * j : 2 * j + 4] += np.einsum("bc,cohw->bhwo", x[:, i, j], w)
  return full[:, 1:-1, 1:-1] + b


def _dilated_transposed_conv(x, kernel, bias):
  """The layer as a convolution of the 2x-dilated input (Flax's ConvTranspose formulation)."""
  return jax.lax.conv_transpose(x, kernel, (2, 2), ((2, 2), (2, 2))) + bias


@pytest.mark.parametrize("height,width,c_in,c_out", [(5, 4, 3, 2), (4, 7, 1, 5)])
def test_phase_decomposed_upsampling_equals_dilated_convolution(height, width, c_in, c_out):
  rng = np.random.default_rng(height * 100 + width)
  x_np = rng.normal(size=(2, height, width, c_in)).astype(np.float32)
  w = rng.normal(size=(c_in, c_out, 4, 4)).astype(np.float32)  # PyTorch layout (in, out, kh, kw)
  b = rng.normal(size=(c_out,)).astype(np.float32)
  conv = vq._upsample_conv(c_in, c_out, rngs=nnx.Rngs(0), dtype=None)
  kernel = jnp.asarray(w.transpose(2, 3, 0, 1)[::-1, ::-1])
  conv.kernel[...] = kernel
  conv.bias[...] = jnp.asarray(b)
  x = jnp.asarray(x_np)
  out = conv(x)
  reference = _dilated_transposed_conv(x, kernel, jnp.asarray(b))
  assert out.shape == (2, 2 * height, 2 * width, c_out)
  np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out, _torch_transposed_conv(x_np, w, b), rtol=1e-5, atol=1e-5)

  # Same gradients w.r.t. input, kernel and bias under a non-trivial cotangent.
  cotangent = jnp.asarray(rng.normal(size=out.shape).astype(np.float32))
  g_conv, g_x = nnx.grad(lambda m, x: jnp.sum(m(x) * cotangent), argnums=(0, 1))(conv, x)
  want = jax.grad(lambda *a: jnp.sum(_dilated_transposed_conv(*a) * cotangent), argnums=(0, 1, 2))(
    x, kernel, jnp.asarray(b)
  )
  for got, expected in zip((g_x, g_conv["kernel"][...], g_conv["bias"][...]), want):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_phase_decomposed_upsampling_keeps_compute_dtype():
  conv = vq._upsample_conv(3, 2, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
  assert conv.kernel.dtype == jnp.float32 and conv.kernel.shape == (4, 4, 3, 2)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 3, 5, 3)), jnp.float32)
  out = conv(x)
  assert out.dtype == jnp.bfloat16
  reference = _dilated_transposed_conv(x, conv.kernel[...], conv.bias[...])
  np.testing.assert_allclose(np.asarray(out, np.float32), reference, rtol=3e-2, atol=3e-2)


def test_resize_nearest_matches_pytorch_rule():
  x = jnp.arange(2 * 4 * 8).reshape(1, 2, 4, 8).transpose(0, 2, 3, 1)  # (1, 4, 8, 2)
  out = np.asarray(vq.resize_nearest(x, (8, 8)))
  np.testing.assert_array_equal(out[0, :, :, 0], np.asarray(x)[0, [0, 0, 1, 1, 2, 2, 3, 3], :, 0])
  down = np.asarray(vq.resize_nearest(x, (2, 4)))
  np.testing.assert_array_equal(down[0, :, :, 1], np.asarray(x)[0, [0, 2]][:, [0, 2, 4, 6], 1])


def test_geometry_errors_are_clear(tiny, tiny_model):
  w = _widths(tiny)
  with pytest.raises(ValueError, match=r"valid sizes for grid 8: 12, 24, 48, 96"):
    vq.VQVAE(_vq_cfg(tiny), **{**w, "image_size": 50}, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"k=3 .* needs k-1=2 entries"):
    vq.VQVAE(_vq_cfg(tiny, decoder_channels=(32,)), **w, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"k=4 .* needs k-1=3 entries"):
    vq.VQVAE(_vq_cfg(tiny), **{**w, "image_size": 96}, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="grid must be even"):
    vq.VQVAE(_vq_cfg(tiny, grid=7), **w, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="multiple of 4"):
    vq.VQVAE(_vq_cfg(tiny, latent_dim=18), **w, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="bottom_depth .* at least 1, got 0"):
    vq.VQVAE(_vq_cfg(tiny, bottom_depth=0), **w, rngs=nnx.Rngs(0))

  queries, patches, text = _inputs(tiny, 2)
  with pytest.raises(ValueError, match="2x4 grid"):
    _evaluate(tiny_model, queries[:, :6], patches, text)
  with_cls = jnp.concatenate([patches[:, :1], patches], axis=1)
  with pytest.raises(ValueError, match="drop the class token"):
    _evaluate(tiny_model, queries, with_cls, text)
  codes = jnp.zeros((2, 8, 8), jnp.int32)
  with pytest.raises(ValueError, match=r"\(B, 4, 4\)"):
    tiny_model.decode_codes(codes, codes)
  zero = jnp.zeros(())
  out = vq.VQOutput(jnp.zeros((2, 48, 48, 3)), *[zero] * 6, codes[:, :4, :4], codes)
  with pytest.raises(ValueError, match="TIG target"):
    vq.tig_loss(out, jnp.zeros((2, 24, 24, 3)))


# ----------------------------------------------------------------------------- parameter counts


def _res(c):
  h = c // 2
  return c * h + 9 * h * h + h * c + 2 * (h + h + c)  # three bias-free convs + three BNs


def expected_params(q_w, v_w, t_w, d, k, depth, channels, ema=False, bottom_depth=1):
  """Closed-form parameter count of the VQ-VAE (DESIGN.md section 1.4); `bottom_depth`
  bottom codebooks."""
  linear = lambda a, b: a * b + b
  deconv = lambda a, b: 16 * a * b + b
  top = linear(q_w, 2 * d) + linear(2 * d, d) + depth * _res(d)
  bottom = linear(v_w + t_w, d) + linear(d, d) + depth * _res(d)
  codebooks = 0 if ema else k * d + bottom_depth * k * 2 * d
  top_to_bottom = _res(d) + deconv(d, d)
  upsample_top = deconv(d, d)
  widths = [3 * d, *channels, 3]
  decoder = 9 * (3 * d) ** 2 + 3 * d + _res(3 * d)
  decoder += sum(deconv(a, b) for a, b in zip(widths[:-1], widths[1:]))
  decoder += sum(2 * c for c in widths[1:-1])
  return top + bottom + codebooks + top_to_bottom + upsample_top + decoder


def _count(state):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


def _check_count(model, config, ema=False, cfg=None):
  w, cfg = _widths(config), cfg or config.model.vqvae
  count = _count(nnx.state(model, nnx.Param))
  assert count == expected_params(
    w["query_width"],
    w["vision_width"],
    w["text_width"],
    cfg.latent_dim,
    cfg.codebook_size,
    cfg.num_res_layers,
    cfg.decoder_channels,
    ema=ema,
    bottom_depth=cfg.get("bottom_depth", 1),
  )
  return count


@pytest.mark.parametrize(
  "variant,ema,depth",
  [("tiny", False, 1), ("tiny", True, 1), ("tiny", False, 3), ("paper", True, 1)],
)
def test_parameter_count_matches_formula(variant, ema, depth, request):
  """(The paper configuration without EMA is counted in the next test.)"""
  config = request.getfixturevalue(variant)
  cfg = _vq_cfg(config, ema=ema, bottom_depth=depth)
  model = nnx.eval_shape(lambda: vq.VQVAE(cfg, **_widths(config), rngs=nnx.Rngs(0)))
  _check_count(model, config, ema=ema, cfg=cfg)


def test_paper_config_builds_abstractly_in_bf16(paper):
  w = _widths(paper)
  model = nnx.eval_shape(
    lambda: vq.VQVAE(_vq_cfg(paper), **w, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
  )
  print(f"paper VQ-VAE parameters: {_check_count(model, paper):,}")
  params = nnx.state(model, nnx.Param)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  # Every weight carries logical axis names from the sharding vocabulary, one per dimension.
  for path, var in nnx.to_flat_state(params):
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == len(var.shape), path
    assert set(names) <= AXIS_VOCABULARY, (path, names)

  graphdef, state = nnx.split(model)
  b, g = 2, paper.model.vqvae.grid
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)

  def forward(state, queries, patches, text):
    return nnx.merge(graphdef, state)(queries, patches, text, train=True)

  out = jax.eval_shape(forward, state, spec(b, 32, 768), spec(b, g * g, 1408), spec(b, 768))
  assert out.recon.shape == (b, 224, 224, 3) and out.recon.dtype == jnp.bfloat16
  assert out.codes_top.shape == (b, 8, 8) and out.codes_bottom.shape == (b, 16, 16)
  assert out.loss_top.dtype == jnp.float32


# ----------------------------------------------------------------------------- the whole VQ-VAE


def test_straight_through_reaches_the_bridges_and_not_the_codebooks(tiny, tiny_model):
  queries, patches, text = _inputs(tiny, 4)
  target = _target(4, tiny.model.vit.image_size)
  _, _, grads = _train_grads(nnx.clone(tiny_model), queries, patches, text, target, 0.0)
  for bridge in ("top_bridge", "bottom_bridge"):
    for layer in ("fc1", "fc2"):
      g = grads[bridge]["mlp"][layer]["kernel"][...]
      assert float(jnp.abs(g).max()) > 0, (bridge, layer)
  for level in ("quantizer_top", "quantizer_bottom"):
    assert float(jnp.abs(grads[level]["codebook"][...]).max()) == 0.0


def test_batchnorm_uses_batch_statistics_only_in_training(tiny, tiny_model):
  model = nnx.clone(tiny_model)
  queries, patches, text = _inputs(tiny, 4)
  other = _inputs(tiny, 4, seed=1)
  # The same first sample with different companions.
  mixed = [jnp.concatenate([a[:1], b[1:]]) for a, b in zip((queries, patches, text), other)]
  target = _target(4, tiny.model.vit.image_size)
  stats = lambda: jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))

  initial = stats()
  eval_a = _evaluate(model, queries, patches, text)[0].recon
  eval_b = _evaluate(model, *mixed)[0].recon
  jax.tree.map(np.testing.assert_array_equal, stats(), initial)  # eval leaves them alone
  np.testing.assert_allclose(eval_a[0], eval_b[0], rtol=1e-5, atol=1e-6)

  train_a = _train_grads(model, queries, patches, text, target, 1.0)[0]
  moved = jax.tree.map(lambda x, y: not np.array_equal(x, y), stats(), initial)
  assert all(jax.tree.leaves(moved))  # every running mean and variance was updated
  train_b = _train_grads(model, *mixed, target, 1.0)[0]
  assert float(jnp.abs(train_a[0] - train_b[0]).max()) > 1e-4  # depends on the batch
  assert float(jnp.abs(train_a - eval_a).max()) > 1e-4


def test_tiny_vqvae_overfits_one_batch(tiny, tiny_model):
  model = nnx.clone(tiny_model)
  # Adam over one flat vector: the same updates, a much smaller program to compile.
  optimizer = nnx.Optimizer(model, optax.flatten(optax.adam(3e-3)), wrt=nnx.Param)
  queries, patches, text = _inputs(tiny, 4)
  target = _target(4, tiny.model.vit.image_size)

  def step():
    _, metrics, grads = _train_grads(model, queries, patches, text, target, 1.0)
    _adam_update(optimizer, model, grads)
    return metrics

  first = step()
  for _ in range(39):
    last = step()
  assert float(last["tig_mse"]) < 0.5 * float(first["tig_mse"])
  for key in ("vq_perplexity_top", "vq_perplexity_bottom"):
    assert 1.0 <= float(last[key]) <= tiny.model.vqvae.codebook_size
  assert 0.0 < float(last["vq_usage_bottom"]) <= 1.0

  out, decoded = _evaluate(model, queries, patches, text)
  assert out.recon.shape == (4, 48, 48, 3)
  np.testing.assert_allclose(decoded, out.recon, rtol=1e-5, atol=1e-5)


def test_residual_bottom_codes_quantize_what_the_codes_before_left(tiny):
  """bottom_depth 3: each depth's code is the nearest of its codebook to the residual the
  earlier ones leave; the quantized vector is their sum, straight-through to the input."""
  model = vq.VQVAE(_vq_cfg(tiny, bottom_depth=3), **_widths(tiny), rngs=nnx.Rngs(0))
  g, width = tiny.model.vqvae.grid, 2 * tiny.model.vqvae.latent_dim
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, g, g, width)) * 0.02, jnp.float32)
  out = model._quantize_bottom(x, train=False, rngs=None)
  assert out.codes.shape == (2, g, g, 3)
  residual = np.asarray(x).reshape(-1, width)
  codebooks = [model.quantizer_bottom, *model.quantizers_bottom_residual]
  for depth, quantizer in enumerate(codebooks):
    book = np.asarray(quantizer.vectors())
    nearest = np.argmin(((residual[:, None, :] - book[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(out.codes[..., depth].reshape(-1), nearest)
    residual = residual - book[nearest]
  np.testing.assert_allclose(out.z_q, model.lookup_bottom(out.codes), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    np.asarray(x - out.z_q).reshape(-1, width), residual, rtol=1e-4, atol=1e-6
  )
  # One loss per codebook, and the gradient of the identity to x (not 3 times it).
  single = model.quantizer_bottom(x, train=False)
  assert float(out.loss) > float(single.loss)
  grad = jax.grad(lambda x: jnp.sum(model._quantize_bottom(x, train=False, rngs=None).z_q))(x)
  np.testing.assert_allclose(grad, np.ones(x.shape), rtol=0, atol=0)
  with pytest.raises(ValueError, match=r"codes_bottom \(B, 8, 8, 3\)"):
    model.decode_codes(jnp.zeros((1, g // 2, g // 2), jnp.int32), jnp.zeros((1, g, g), jnp.int32))


def test_nearest_codes_is_the_first_nearest_by_squared_distance():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(64, 8)).astype(np.float32)
  codebook = rng.normal(size=(16, 8)).astype(np.float32)
  codebook[9] = codebook[3]  # a duplicated code: ties go to the first index, as argmin's do
  z[:4] = codebook[3]
  distances = ((z[:, None, :] - codebook[None, :, :]) ** 2).sum(-1)
  codes = np.asarray(qz.nearest_codes(jnp.asarray(z), jnp.asarray(codebook)))
  np.testing.assert_array_equal(codes, distances.argmin(-1))
  np.testing.assert_array_equal(codes[:4], 3)
