"""The public inference API on a tiny BLIP-2 loaded with `api.load("hf-blip2:...")`.

The folder holds a randomly initialised `Blip2ForImageTextRetrieval` (Q-Former with text input)
in the tiny variant's geometry, saved by transformers' `save_pretrained`; every method is checked
against transformers' PyTorch code (fp32, CPU), then the API's own behaviour and errors.
"""

import chex
import jax
import numpy as np
import pytest
import torch
import transformers
from configs_util import load_config

from medunifier_jax import api

TOL = 1e-4


def config(variant: str):
  return load_config(variant)


@pytest.fixture(scope="module")
def blip2(tmp_path_factory):
  torch.manual_seed(0)
  hf_config = transformers.Blip2Config(
    vision_config=dict(
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=2,
      image_size=48,
      patch_size=6,
    ),
    qformer_config=dict(
      hidden_size=32,
      num_hidden_layers=2,
      num_attention_heads=2,
      intermediate_size=64,
      vocab_size=128,
      max_position_embeddings=32,
      use_qformer_text_input=True,
      cross_attention_frequency=2,
    ),
    num_query_tokens=8,
    image_text_hidden_size=16,
  )
  model = transformers.Blip2ForImageTextRetrieval(hf_config).eval()
  # transformers initialises the ViT with std 1e-10 and the queries with zeros: draw every
  # parameter afresh so that each one matters (LayerNorms near (1, 0)).
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layernorm" in name.lower() or "layer_norm" in name.lower():
        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
      else:
        p.copy_(0.2 * torch.randn_like(p))
  folder = str(tmp_path_factory.mktemp("blip2"))
  model.save_pretrained(folder)

  rng = np.random.default_rng(0)
  pixels = rng.standard_normal((2, 48, 48, 3)).astype(np.float32)
  ids = rng.integers(5, 128, size=(3, 10))
  ids[:, 0] = 2
  mask = np.ones_like(ids)
  mask[1, 6:] = 0
  mask[2, 3:] = 0
  tp = torch.from_numpy(pixels.transpose(0, 3, 1, 2))
  tids, tmask = torch.from_numpy(ids), torch.from_numpy(mask)
  with torch.no_grad():
    tokens = model.vision_model(tp).last_hidden_state
    queries = model.qformer(
      query_embeds=model.query_tokens.expand(2, -1, -1), encoder_hidden_states=tokens
    ).last_hidden_state
    itc = model(tp, tids, tmask, use_image_text_matching_head=False)
    itm = model(tp, tids[:2], tmask[:2], use_image_text_matching_head=True)
  reference = dict(
    image_tokens=tokens.numpy(),  # Blip2VisionModel, after post_layernorm
    queries=queries.numpy(),
    text=itc.text_model_output.last_hidden_state.numpy(),
    image_embeds=itc.image_embeds.numpy(),  # normalised vision_projection: (2, 8, 16)
    text_embeds=itc.text_embeds.numpy(),  # normalised text_projection of [CLS]: (3, 16)
    itc=itc.logits_per_image.numpy(),  # cosine, max over queries, no temperature: (2, 3)
    itm=itm.logits_per_image.numpy(),  # query-averaged ITM logits of 2 pairs: (2, 2)
  )
  return dict(folder=folder, pixels=pixels, ids=ids, mask=mask, ref=reference)


@pytest.fixture(scope="module")
def model(blip2):
  return api.load("hf-blip2:" + blip2["folder"], config=config("tiny"))


def assert_close(ours, theirs, what):
  assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
  diff = float(np.abs(ours - theirs).max())
  assert diff < TOL, f"{what} differs from transformers by {diff}"


# -- parity with transformers ---------------------------------------------------------------


def test_image_tokens_match_blip2_vision_model(model, blip2):
  assert_close(model.image_tokens(blip2["pixels"]), blip2["ref"]["image_tokens"], "ViT tokens")


def test_encoders_match(model, blip2):
  ref = blip2["ref"]
  assert_close(model.encode_image(blip2["pixels"]), ref["queries"], "query outputs")
  assert_close(model.encode_text(blip2["ids"], blip2["mask"]), ref["text"], "text states")
  assert_close(model.image_embeddings(blip2["pixels"]), ref["image_embeds"], "image embeddings")
  assert_close(
    model.text_embeddings(blip2["ids"], blip2["mask"]), ref["text_embeds"], "text embeddings"
  )


def test_similarity_and_itm_match(model, blip2):
  sim = model.similarity(blip2["pixels"], blip2["ids"], blip2["mask"])
  assert sim.shape == (2, 3) and sim.dtype == np.float32
  assert_close(sim, blip2["ref"]["itc"], "similarity")
  itm = model.itm_logits(blip2["pixels"], blip2["ids"][:2], blip2["mask"][:2])
  assert_close(itm, blip2["ref"]["itm"], "ITM logits")
  assert np.abs(itm[0] - itm[1]).max() > 1e-2  # the two pairs really score differently


# -- behaviour --------------------------------------------------------------------------------


def test_similarity_is_max_over_queries_of_embedding_cosines(model, blip2):
  image = model.image_embeddings(blip2["pixels"])
  text = model.text_embeddings(blip2["ids"], blip2["mask"])
  np.testing.assert_allclose(np.linalg.norm(image, axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(text, axis=-1), 1.0, atol=1e-5)
  by_hand = np.einsum("iqe,ne->iqn", image, text).max(axis=1)
  np.testing.assert_allclose(
    model.similarity(blip2["pixels"], blip2["ids"], blip2["mask"]), by_hand, atol=1e-6
  )


def test_itm_pairs_are_row_aligned(model, blip2):
  pixels, ids, mask = blip2["pixels"], blip2["ids"][:2], blip2["mask"][:2]
  straight = model.itm_logits(pixels, ids, mask)
  swapped = model.itm_logits(pixels[::-1], ids[::-1], mask[::-1])
  np.testing.assert_allclose(swapped, straight[::-1], atol=1e-6)


def test_padding_does_not_change_text_states(model, blip2):
  ids, mask = blip2["ids"].copy(), blip2["mask"]
  before = model.encode_text(ids, mask)
  ids[mask == 0] = 7  # other tokens under the padding
  after = model.encode_text(ids, mask)
  np.testing.assert_allclose(after[mask == 1], before[mask == 1], atol=1e-6)


def test_compiled_once_per_shape(model):
  traces = []

  def count(m, queries):
    traces.append(queries.shape)
    return m.image_embeddings(queries)

  queries = np.random.default_rng(2).standard_normal((2, 8, 32)).astype(np.float32)
  first = model.run(count, queries)
  model.run(count, queries + 1.0)
  assert traces == [(2, 8, 32)]
  model.run(count, queries[:1])
  assert traces == [(2, 8, 32), (1, 8, 32)]
  assert isinstance(first, np.ndarray) and first.shape == (2, 8, 16)
  # A second handle on the same architecture reuses the compilation.
  other = api.Model(model.module, model.config)
  chex.assert_trees_all_close(other.run(count, queries), first)
  assert len(traces) == 2


def test_preprocess_images_from_files_and_arrays(model, tmp_path):
  from PIL import Image

  gray = np.random.default_rng(1).integers(0, 256, size=(64, 64), dtype=np.uint8)
  Image.fromarray(gray).save(tmp_path / "x.png")
  resized = np.asarray(Image.fromarray(gray).resize((48, 48), Image.Resampling.BICUBIC))
  mean = np.asarray(model.config.data.image_mean, np.float32)
  std = np.asarray(model.config.data.image_std, np.float32)
  want = (np.repeat(resized[..., None] / np.float32(255), 3, axis=-1) - mean) / std
  batch = model.preprocess_images([str(tmp_path / "x.png"), np.stack([gray] * 3, axis=-1)])
  assert batch.shape == (2, 48, 48, 3) and batch.dtype == np.float32
  np.testing.assert_allclose(batch[0], want, atol=1e-6)
  np.testing.assert_allclose(batch[1], want, atol=1e-6)  # RGB with equal channels: same gray
  with pytest.raises(FileNotFoundError, match="absent.png"):
    model.preprocess_images([str(tmp_path / "absent.png")])


# -- errors -----------------------------------------------------------------------------------


def test_wrong_image_size_names_expected_shape(model, blip2):
  with pytest.raises(ValueError, match=r"\(B, 48, 48, 3\).*\(2, 32, 32, 3\).*resize"):
    model.encode_image(np.zeros((2, 32, 32, 3), np.float32))
  with pytest.raises(ValueError, match="channels-first"):
    model.encode_image(np.zeros((2, 3, 48, 48), np.float32))
  with pytest.raises(ValueError, match="normalise"):
    model.encode_image(np.zeros((2, 48, 48, 3), np.uint8))


def test_token_outside_vocabulary_is_named(model, blip2):
  ids = blip2["ids"].copy()
  ids[1, 4] = 128
  with pytest.raises(ValueError, match=r"token id 128 at input_ids\[1, 4\].*\[0, 128\)"):
    model.encode_text(ids, blip2["mask"])
  ids[1, 4] = -1
  with pytest.raises(ValueError, match="outside the vocabulary"):
    model.similarity(blip2["pixels"], ids, blip2["mask"])
  with pytest.raises(ValueError, match="32 positions"):
    model.encode_text(np.ones((1, 33), np.int32), np.ones((1, 33), np.int32))


def test_batch_mismatch_is_named(model, blip2):
  with pytest.raises(ValueError, match="2 images and 3 texts"):
    model.itm_logits(blip2["pixels"], blip2["ids"], blip2["mask"])
  with pytest.raises(ValueError, match=r"one shape \(B, T\).*\(3, 10\) and \(2, 10\)"):
    model.encode_text(blip2["ids"], blip2["mask"][:2])
  with pytest.raises(ValueError, match="only 0"):
    model.encode_text(blip2["ids"], blip2["mask"] * 2)


def test_load_errors(blip2, tmp_path):
  with pytest.raises(ValueError, match="unknown source 'hf-clip:"):
    api.load("hf-clip:" + blip2["folder"])
  with pytest.raises(FileNotFoundError, match="not a directory"):
    api.load(str(tmp_path / "absent"))
  with pytest.raises(FileNotFoundError, match="not a directory"):
    api.load("hf-blip2:" + str(tmp_path / "absent"))
  with pytest.raises(ValueError, match="hf-bert needs config"):
    api.load("hf-bert:" + blip2["folder"])


def test_load_workdir_restores_the_saved_weights(model, blip2, tmp_path):
  from flax import nnx

  from medunifier_jax.training import checkpoint

  checkpoint.save_config(tmp_path, model.config)
  manager = checkpoint.make_manager(tmp_path, model.config)
  checkpoint.save(manager, 1, nnx.State({"model": model.state}), jax.random.key(0), force=True)
  manager.wait_until_finished()
  manager.close()
  restored = api.load(str(tmp_path))
  np.testing.assert_array_equal(
    restored.image_embeddings(blip2["pixels"]), model.image_embeddings(blip2["pixels"])
  )


def test_load_records_what_kept_its_initial_values(model):
  kept = model.import_report.kept_at_init
  assert kept and all(p.startswith(("vqvae/", "qformer/lm_head/", "temp")) for p in kept)
  assert any(p.startswith("vqvae/") for p in kept) and "temp" in kept
  assert model.temperature() == pytest.approx(config("tiny").model.temperature_init)
  m = model.config.model
  assert (m.vit.width, m.vit.depth, m.vit.mlp_dim, m.vit.image_size) == (32, 2, 64, 48)
  assert (m.qformer.hidden_size, m.qformer.vocab_size, m.qformer.num_queries) == (32, 128, 8)
  assert (m.qformer.dec_token_id, m.embed_dim) == (127, 16)
  assert model.config.data.image_size == 48
