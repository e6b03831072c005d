"""Behaviour of the MedUnifier model: attention modes, cached decoding, freezing, geometry, size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from configs_util import load_config
from flax import nnx

from medunifier_jax import config_lib, generation
from medunifier_jax.models.medunifier import MedUnifier
from medunifier_jax.models.qformer import PADDING_LOGIT
from medunifier_jax.objectives import compute_losses

B, T = 2, 10


@pytest.fixture(scope="module")
def cfg():
  return load_config("tiny")


@pytest.fixture(scope="module")
def model(cfg):
  return MedUnifier(cfg.model, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def inputs(cfg):
  # Real token ids only: those above [DEC] pad the vocabulary and are never fed.
  s, dec = cfg.model.vit.image_size, cfg.model.qformer.dec_token_id
  images = jax.random.normal(jax.random.key(1), (B, s, s, 3))
  ids = jax.random.randint(jax.random.key(2), (B, T), 5, dec).at[:, 0].set(2)
  mask = jnp.ones((B, T), jnp.int32).at[1, 7:].set(0)
  return images, ids, mask


@pytest.fixture(scope="module")
def tokens(model, inputs):
  return _image_tokens(model, inputs[0])


@nnx.jit
def _image_tokens(model, images):
  return model.image_tokens(images)


@nnx.jit
def _lm_logits(model, tokens, ids, mask):
  return model.lm_logits(tokens, ids, mask)


@nnx.jit(static_argnames="mode")
def _qformer(model, tokens, ids, mask, *, mode):
  q = model.query_tokens[...]
  queries = jnp.broadcast_to(q, (ids.shape[0],) + q.shape[1:])
  if mode == "image":
    return model.qformer(queries, None, None, tokens, mode=mode)
  return model.qformer(None if mode == "text" else queries, ids, mask, tokens, mode=mode)


def _other_text(ids, start, seed):
  fresh = jax.random.randint(jax.random.key(seed), ids.shape, 5, 500)
  return ids.at[:, start:].set(fresh[:, start:])


def test_generation_mask_is_causal(model, tokens, inputs):
  _, ids, _ = inputs
  full = jnp.ones_like(ids)
  base = _lm_logits(model, tokens, ids, full)
  k = 4
  changed = _lm_logits(model, tokens, _other_text(ids, k, seed=7), full)
  np.testing.assert_allclose(changed[:, :k], base[:, :k], atol=1e-6)
  assert np.abs(changed[:, k:] - base[:, k:]).max() > 1e-3  # later positions do see the change


def test_queries_never_see_text_in_generation_mode(model, tokens, inputs):
  _, ids, mask = inputs
  q = model.query_tokens.shape[1]
  gen_a = _qformer(model, tokens, ids, mask, mode="generation")[:, :q]
  gen_b = _qformer(model, tokens, _other_text(ids, 0, seed=8), mask, mode="generation")[:, :q]
  np.testing.assert_allclose(gen_a, gen_b, atol=1e-6)
  image_mode = _qformer(model, tokens, ids, mask, mode="image")
  np.testing.assert_allclose(gen_a, image_mode, atol=1e-5)
  # Control: in matching mode the queries do attend to the text.
  match_a = _qformer(model, tokens, ids, mask, mode="matching")[:, :q]
  match_b = _qformer(model, tokens, _other_text(ids, 0, seed=8), mask, mode="matching")[:, :q]
  assert np.abs(match_a - match_b).max() > 1e-3


def test_text_mode_ignores_image_and_padding(model, tokens, inputs):
  _, ids, mask = inputs
  text = _qformer(model, tokens, ids, mask, mode="text")
  other_image = _qformer(model, -tokens[::-1], ids, mask, mode="text")
  np.testing.assert_array_equal(text, other_image)
  # Row 1 is padded from position 7: other ids there change nothing at the real tokens.
  repadded = _qformer(model, tokens, _other_text(ids, 7, seed=9), mask, mode="text")
  np.testing.assert_allclose(repadded[1, :7], text[1, :7], atol=1e-6)


def test_matching_mode_ignores_padding(model, tokens, inputs):
  _, ids, mask = inputs
  q = model.query_tokens.shape[1]
  base = _qformer(model, tokens, ids, mask, mode="matching")
  repadded = _qformer(model, tokens, _other_text(ids, 7, seed=10), mask, mode="matching")
  np.testing.assert_allclose(repadded[1, : q + 7], base[1, : q + 7], atol=1e-6)


def test_cached_query_kv_path_equals_joint_generation_pass(model, tokens, inputs):
  _, ids, mask = inputs

  @nnx.jit
  def reuse(m, t, i, a):
    _, kvs = m.image_queries_with_kv(t)
    return m.lm_logits_from_query_kv(kvs, i, a)

  np.testing.assert_allclose(
    reuse(model, tokens, ids, mask), _lm_logits(model, tokens, ids, mask), atol=1e-5
  )


def test_gathered_cross_kvs_equal_projecting_gathered_tokens(model, tokens, inputs):
  """The training step projects each image once and gathers its keys/values for every pair."""
  from medunifier_jax.models.qformer import gather_kvs

  _, ids, mask = inputs
  index = jnp.array([1, 0, 1])  # image of each pair: one image paired twice
  pair_ids, pair_mask = ids[jnp.array([0, 0, 1])], mask[jnp.array([0, 0, 1])]

  @nnx.jit
  def shared(m, t, i, a):
    kvs = m.cross_kvs(t)
    return (
      m.itm_logits(None, i, a, image_kvs=gather_kvs(kvs, index)),
      m.image_queries_with_kv(t, image_kvs=kvs)[0],
    )

  @nnx.jit
  def separate(m, t, i, a):
    return m.itm_logits(t[index], i, a), m.image_queries(t)

  for got, want in zip(
    shared(model, tokens, pair_ids, pair_mask),
    separate(model, tokens, pair_ids, pair_mask),
    strict=True,
  ):
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_decode_steps_equal_lm_logits(model, tokens, inputs, cfg):
  _, ids, _ = inputs
  beams = 2
  full = _lm_logits(model, tokens, ids, jnp.ones_like(ids))  # (B, T, V)
  fed = jnp.repeat(ids.at[:, 0].set(cfg.model.qformer.dec_token_id), beams, axis=0)
  cache = nnx.jit(lambda m, t: m.init_decode_cache(t, B * beams, 12))(model, tokens)
  step = nnx.jit(lambda m, c, tok, pos: m.decode_step(c, tok, pos))
  for t in range(T):
    logits, cache = step(model, cache, fed[:, t], jnp.int32(t))
    np.testing.assert_allclose(logits, jnp.repeat(full[:, t], beams, axis=0), atol=1e-5)


def unpadded_twin(model, cfg):
  """`model` with its vocabulary cut to the real ids 0..dec_token_id: the same weights but the
  padding rows."""
  real = cfg.model.qformer.dec_token_id + 1
  small = cfg.model.copy_and_resolve_references()
  small.unlock()
  small.qformer.vocab_size = real
  twin = nnx.eval_shape(lambda: MedUnifier(small, rngs=nnx.Rngs(0)))
  state = nnx.state(nnx.clone(model))  # its own variables: `model` keeps its padding rows
  qf = state["qformer"]
  word = qf["embeddings"]["word_embeddings"]["embedding"]
  word.set_value(word.get_value()[:real])
  qf["lm_head"]["bias"].set_value(qf["lm_head"]["bias"].get_value()[:real])
  nnx.update(twin, state)
  return twin


@nnx.jit
def _itg(model, images, ids, mask):
  return compute_losses(
    model,
    {"image": images, "input_ids": ids, "attention_mask": mask},
    jax.random.key(0),
    weights={"itg": 1.0},
    train=False,
  )[1]["loss_itg"]


@pytest.mark.slow  # about 20 s or more here: left out of `make test-fast`
def test_vocabulary_padding_is_never_predicted_and_leaves_itg_unchanged(model, tokens, inputs, cfg):
  images, ids, mask = inputs
  qf = cfg.model.qformer
  real = qf.dec_token_id + 1
  assert qf.vocab_size % 128 == 0 and qf.vocab_size > real  # the tiny vocabulary is padded
  padded = nnx.clone(model)
  # Padding rows that would win every argmax if their logits were not masked.
  bias = padded.qformer.lm_head.bias
  bias.set_value(bias.get_value().at[real:].set(50.0))
  twin = unpadded_twin(padded, cfg)
  assert twin.qformer.lm_head.bias.shape == (real,) and twin.num_text_classes == real

  logits = _lm_logits(padded, tokens, ids, mask)
  assert logits.shape[-1] == qf.vocab_size
  assert bool(jnp.all(logits[..., real:] == PADDING_LOGIT))
  np.testing.assert_allclose(
    logits[..., :real], _lm_logits(twin, tokens, ids, mask), rtol=1e-6, atol=1e-6
  )
  # The head before the mask prefers the padding rows: the mask is what keeps them out.
  hidden = nnx.jit(lambda m, t, i, a: m.qformer.generate_text(m.image_queries_with_kv(t)[1], i, a))(
    padded, tokens, ids, mask
  )
  raw = padded.qformer.lm_head(hidden, padded.qformer.embeddings.word_embeddings)
  assert bool(jnp.all(jnp.argmax(raw, -1) >= real))
  # The cached decoder's step passes through the same mask.
  cache = nnx.jit(lambda m, t: m.init_decode_cache(t, B, 4))(padded, tokens)
  step, _ = nnx.jit(lambda m, c, tok: m.decode_step(c, tok, 0))(
    padded, cache, jnp.full((B,), qf.dec_token_id, jnp.int32)
  )
  assert bool(jnp.all(step[:, real:] == PADDING_LOGIT))

  # Greedy and beam decoding never emit a padding id, and decode as the unpadded model does.
  special = generation.SpecialTokens(bos=qf.dec_token_id, eos=3, pad=qf.pad_token_id)
  for method in ("greedy", "beam"):
    settings = generation.DecodingConfig(method=method, num_beams=2, max_length=8, min_length=8)
    decode = nnx.jit(lambda m, x, c=settings: generation.generate_tokens(m, x, special, c))
    got = np.asarray(decode(padded, images).tokens)
    assert got.max() < real, method
    np.testing.assert_array_equal(got, np.asarray(decode(twin, images).tokens), err_msg=method)

  # ITG smooths over the real classes only: the padded model's loss is the unpadded one's.
  padded_itg = float(_itg(padded, images, ids, mask))
  np.testing.assert_allclose(padded_itg, float(_itg(twin, images, ids, mask)), rtol=1e-6)
  assert padded_itg < 2 * np.log(real)  # the 50.0 padding biases do not reach the loss
  # And the padding rows get no gradient (the LM head is tied to the word embeddings).
  grads = nnx.jit(lambda m, x, i, a: nnx.grad(lambda m: _itg(m, x, i, a))(m))(
    padded, images, ids, mask
  )["qformer"]
  assert not bool(jnp.any(grads["embeddings"]["word_embeddings"]["embedding"][...][real:]))
  assert not bool(jnp.any(grads["lm_head"]["bias"][...][real:]))
  assert bool(jnp.any(grads["lm_head"]["bias"][...][:real]))


def test_frozen_vit_gets_no_gradient(model, inputs):
  images, _, _ = inputs

  @nnx.jit
  def grads(m, x):
    return nnx.grad(lambda m: jnp.sum(m.image_tokens(x)[:, 0] ** 2))(m)

  trainable = grads(model, images)["vit"]
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(trainable["layers"]))
  try:
    model.vit_frozen = True
    frozen = grads(model, images)["vit"]
  finally:
    model.vit_frozen = False
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(frozen))


def test_remat_keeps_gradients(model, inputs):
  _, ids, mask = inputs

  @nnx.jit
  def grads(m, i, a):
    return nnx.grad(lambda m: jnp.sum(m.text_hidden(i, a) ** 2))(m)

  plain = grads(model, ids, mask)
  try:
    model.qformer.remat = True
    rematted = grads(model, ids, mask)
  finally:
    model.qformer.remat = False
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), rematted, plain)


def test_wrong_image_size_is_a_clear_error(model, cfg):
  s = cfg.model.vit.image_size
  with pytest.raises(ValueError, match=f"{s}, {s}, 3"):
    model.image_tokens(jnp.zeros((1, s - 8, s - 8, 3)))
  with pytest.raises(ValueError, match="input_ids and attention_mask"):
    model.text_hidden(jnp.zeros((2, 5), jnp.int32), jnp.zeros((2, 6), jnp.int32))


def test_vit_stem_is_a_convolution_and_gelu_before_the_patches(cfg):
  """vit.stem_channels C > 0: patches of gelu(3x3 conv to C channels); 0: no stem parameters."""
  from medunifier_jax.models import layers, vit

  assert "stem" not in nnx.state(vit.VisionEmbeddings(cfg.model.vit, rngs=nnx.Rngs(0)))
  c = cfg.model.vit.copy_and_resolve_references()
  c.unlock()
  c.stem_channels = 4
  emb = vit.VisionEmbeddings(c, rngs=nnx.Rngs(0))
  s, p, d = c.image_size, c.patch_size, c.width
  assert emb.stem.kernel.shape == (3, 3, 3, 4)
  assert emb.patch_embedding.kernel.shape == (p, p, 4, d)

  x = jax.random.normal(jax.random.key(3), (2, s, s, 3))
  dims = ("NHWC", "HWIO", "NHWC")
  feats = jax.lax.conv_general_dilated(
    x, emb.stem.kernel[...], (1, 1), "SAME", dimension_numbers=dims
  )
  feats = layers.gelu(feats + emb.stem.bias[...])
  patches = jax.lax.conv_general_dilated(
    feats, emb.patch_embedding.kernel[...], (p, p), "VALID", dimension_numbers=dims
  )
  patches = (patches + emb.patch_embedding.bias[...]).reshape(2, -1, d)
  cls = jnp.broadcast_to(emb.class_embedding[...], (2, 1, d))
  expected = jnp.concatenate([cls, patches], axis=1) + emb.position_embedding[...]
  out = emb(x)
  assert out.shape == (2, 1 + (s // p) ** 2, d)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)

  c.stem_channels = -1
  with pytest.raises(ValueError, match="stem_channels"):
    vit.VisionEmbeddings(c, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
  "edit, message",
  [
    (lambda m: setattr(m.vqvae, "grid", 6), "vqvae.grid"),
    (lambda m: setattr(m.vqvae, "query_grid", (2, 2)), "num_queries"),
    (lambda m: setattr(m.vqvae, "decoder_channels", (16,)), "decoder_channels"),
    (lambda m: setattr(m.vit, "patch_size", 5), "patch_size"),
    (lambda m: setattr(m, "max_text_len", 100), "max_position_embeddings"),
  ],
)
def test_geometry_is_checked_at_construction(cfg, edit, message):
  bad = cfg.model.copy_and_resolve_references()
  bad.unlock()
  edit(bad)
  with pytest.raises(ValueError, match=message):
    MedUnifier(bad, rngs=nnx.Rngs(0))


def test_bfloat16_compute_keeps_float32_params(cfg):
  abstract = nnx.eval_shape(lambda: MedUnifier(cfg.model, rngs=nnx.Rngs(0), dtype="bfloat16"))
  graphdef, state = nnx.split(abstract)
  param_dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))}
  assert param_dtypes == {jnp.dtype("float32")}
  s = cfg.model.vit.image_size
  batch = {
    "image": jax.ShapeDtypeStruct((4, s, s, 3), jnp.float32),
    "target_image": jax.ShapeDtypeStruct((4, s, s, 3), jnp.float32),
    "input_ids": jax.ShapeDtypeStruct((4, T), jnp.int32),
    "attention_mask": jax.ShapeDtypeStruct((4, T), jnp.int32),
  }

  def run(state, batch):
    m = nnx.merge(graphdef, state)
    queries = m.image_queries(m.image_tokens(batch["image"]))
    total, _ = compute_losses(m, batch, jax.random.key(0), weights=dict(cfg.loss_weights))
    return queries, total

  queries, total = jax.eval_shape(run, state, batch)
  assert queries.dtype == jnp.bfloat16 and total.dtype == jnp.float32


# -- the paper configuration, built abstractly ---------------------------------------------------


def _residual_layer(w):
  """DESIGN 1.4 bottleneck: 1x1 (w -> w/2), 3x3 (w/2 -> w/2), 1x1 (w/2 -> w), no conv bias
  (each conv feeds a BatchNorm with its own scale and shift)."""
  h = w // 2
  return w * h + 2 * h + 9 * h * h + 2 * h + h * w + 2 * w


def paper_parameter_counts(m) -> dict[str, int]:
  """Closed-form parameter counts from the config sizes (DESIGN.md section 1)."""
  vit, qf, vq = m.vit, m.qformer, m.vqvae
  d, p, mlp = vit.width, vit.patch_size, vit.mlp_dim
  n = (vit.image_size // p) ** 2
  vit_block = 2 * d + (3 * d * d + 2 * d) + (d * d + d) + 2 * d + (d * mlp + mlp) + (mlp * d + d)
  counts = {"vit": p * p * 3 * d + d + d + (n + 1) * d + vit.depth * vit_block}
  counts["ln_vision"] = 2 * d  # beside the ViT: trained even when the ViT is frozen

  h, i, v = qf.hidden_size, qf.intermediate_size, qf.vocab_size
  attention = lambda src: (h * h + h) + 2 * (src * h + h) + (h * h + h) + 2 * h
  ffn = (h * i + i) + (i * h + h) + 2 * h
  layers = 0
  for index in range(qf.num_layers):
    cross = attention(d) if index % qf.cross_attention_freq == 0 else 0
    layers += attention(h) + cross + 2 * ffn
  lm_head = (h * h + h) + 2 * h + v
  counts["qformer"] = v * h + qf.max_position_embeddings * h + 2 * h + layers + lm_head

  e, q = m.embed_dim, qf.num_queries
  counts["heads"] = q * h + 2 * (h * e + e) + (h * 2 + 2) + 1

  z, k, r = vq.latent_dim, vq.codebook_size, vq.num_res_layers
  top = (h * 2 * z + 2 * z) + (2 * z * z + z) + r * _residual_layer(z)
  bottom = ((d + h) * z + z) + (z * z + z) + r * _residual_layer(z)
  codebooks = k * z + k * 2 * z
  up = lambda a, b: 16 * a * b + b  # 4x4 transposed conv with bias
  top_to_bottom = _residual_layer(z) + up(z, z)
  widths = [3 * z, *vq.decoder_channels, 3]
  decoder = (9 * 3 * z * 3 * z + 3 * z) + _residual_layer(3 * z)
  decoder += sum(up(a, b) for a, b in zip(widths[:-1], widths[1:]))
  decoder += sum(2 * c for c in widths[1:-1])  # BatchNorm after every upsampling but the last
  counts["vqvae"] = top + bottom + codebooks + top_to_bottom + up(z, z) + decoder
  return counts


def test_paper_config_builds_abstractly_with_the_expected_size():
  paper = load_config("paper")
  abstract = nnx.eval_shape(lambda: MedUnifier(paper.model, rngs=nnx.Rngs(0)))
  params = nnx.state(abstract, nnx.Param)
  size = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  counted = {
    "vit": size(params["vit"]),
    "ln_vision": size(params["ln_vision"]),
    "qformer": size(params["qformer"]),
    "heads": sum(
      size(params[k]) for k in ("query_tokens", "vision_proj", "text_proj", "itm_head", "temp")
    ),
    "vqvae": size(params["vqvae"]),
  }
  print(
    "paper parameter counts:",
    {k: f"{v:,}" for k, v in counted.items()},
    f"total {sum(counted.values()):,}",
  )
  assert counted == paper_parameter_counts(paper.model)
  assert sum(counted.values()) == size(params)

  # The reconstruction from inputs of the shapes the ViT and Q-Former produce at paper size
  # (the tiny tests run those paths for real).
  graphdef, state = nnx.split(abstract.vqvae)
  m = paper.model
  grid_tokens = (m.vit.image_size // m.vit.patch_size) ** 2
  h, b = m.qformer.hidden_size, 2

  def reconstruct(state, queries, patches, text_cls):
    return nnx.merge(graphdef, state)(queries, patches, text_cls, train=False).recon

  recon = jax.eval_shape(
    reconstruct,
    state,
    jax.ShapeDtypeStruct((b, m.qformer.num_queries, h), jnp.float32),
    jax.ShapeDtypeStruct((b, grid_tokens, m.vit.width), jnp.float32),
    jax.ShapeDtypeStruct((b, h), jnp.float32),
  )
  assert recon.shape == (2, 224, 224, 3)


def test_geometry_check_accepts_every_variant():
  for variant in ("paper", "small", "demo", "tiny", "bench_xs"):
    config_lib.check_geometry(load_config(variant).model)
