"""Initialisation from several sources, one per part of the model (`config.init_from`).

Tiny checkpoints in the tiny variant's geometry: a transformers BLIP-2 folder and a BERT folder
(saved by `save_pretrained`), and the paper's code's own `.pth` files written with torch in
their exact key layout (EVA ViT: fused qkv weight (3D, D), separate q_bias and v_bias; BLIP-2:
`{"model": state dict}` with `visual_encoder.*`, `ln_vision.*`, `Qformer.bert.*`, ...). The
BLIP-2 `.pth` is the transformers model's tensors under BLIP-2's own names, so importing both
must give the same weights (the transformers path is checked numerically in test_api.py).
"""

import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from absl import flags
from configs_util import CONFIG_DIR, load_config
from ml_collections import config_flags

from medunifier_jax import model_io, pretraining
from medunifier_jax.training import checkpoint as ckpt
from medunifier_jax.training import loop
from medunifier_jax.training import mesh as mesh_lib
from medunifier_jax.training import state as state_lib
from medunifier_jax.weights import init_sources, lavis
from medunifier_jax.weights.mapping import WeightImportError, model_params

# The tiny variant's sizes (configs/pretrain.py).
VISION = dict(
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=2,
  image_size=48,
  patch_size=6,
)
QFORMER = dict(
  hidden_size=32,
  num_hidden_layers=2,
  num_attention_heads=2,
  intermediate_size=64,
  vocab_size=513,
  max_position_embeddings=64,
  use_qformer_text_input=True,
  cross_attention_frequency=2,
)


def randomised(model):
  """Every parameter drawn afresh (transformers initialises some to zeros or near-zeros)."""
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p))
  return model


def hf_blip2(qformer: dict, queries: int, embed: int):
  torch.manual_seed(0)
  return randomised(
    transformers.Blip2ForImageTextRetrieval(
      transformers.Blip2Config(
        vision_config=VISION,
        qformer_config=qformer,
        num_query_tokens=queries,
        image_text_hidden_size=embed,
      )
    )
  )


@pytest.fixture(scope="module")
def blip2_vision_folder(tmp_path_factory):
  """A BLIP-2 folder whose ViT fits the tiny variant and whose Q-Former does not (one layer,
  another vocabulary): taken for the vision part only, its Q-Former tensors go unused."""
  small = dict(QFORMER, num_hidden_layers=1, vocab_size=100, max_position_embeddings=16)
  model = hf_blip2(small, queries=4, embed=8)
  folder = tmp_path_factory.mktemp("blip2_vision")
  model.save_pretrained(folder)
  return str(folder), {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
  torch.manual_seed(1)
  bert = randomised(
    transformers.BertForMaskedLM(
      transformers.BertConfig(
        vocab_size=512,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
      )
    )
  )
  folder = tmp_path_factory.mktemp("bert")
  bert.save_pretrained(folder)
  return str(folder), {k: v.numpy() for k, v in bert.state_dict().items()}


# transformers' BLIP-2 names -> the paper's code's names (first match wins).
RENAMES = [
  (r"vision_model\.embeddings\.patch_embedding\.", "visual_encoder.patch_embed.proj."),
  (r"vision_model\.embeddings\.class_embedding$", "visual_encoder.cls_token"),
  (r"vision_model\.embeddings\.position_embedding$", "visual_encoder.pos_embed"),
  (r"vision_model\.encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"visual_encoder.blocks.\1.norm\2."),
  (
    r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.weight$",
    r"visual_encoder.blocks.\1.attn.qkv.weight",
  ),
  (
    r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.",
    r"visual_encoder.blocks.\1.attn.proj.",
  ),
  (r"vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"visual_encoder.blocks.\1.mlp."),
  (r"vision_model\.post_layernorm\.", "ln_vision."),
  (r"embeddings\.", "Qformer.bert.embeddings."),
  (r"qformer\.layernorm\.", "Qformer.bert.embeddings.LayerNorm."),
  (
    r"qformer\.encoder\.layer\.(\d+)\.(attention|crossattention)\.attention\.",
    r"Qformer.bert.encoder.layer.\1.\2.self.",
  ),
  (r"qformer\.encoder\.", "Qformer.bert.encoder."),
  (r"vision_projection\.", "vision_proj."),
  (r"text_projection\.", "text_proj."),
  (r"(query_tokens|itm_head\..*)$", r"\1"),
]


def lavis_state_dict(hf_state: dict) -> dict:
  """The BLIP-2 `.pth` layout of a transformers BLIP-2 state dict, plus what only the paper's
  code saves: `temp`, the Q-Former's LM head (decoder tied to the word embeddings), the
  position-id buffer, and a third ViT block (the tiny ViT keeps two, as BLIP-2 keeps 39 of 40)."""
  out = {}
  for key, value in hf_state.items():
    bias = re.fullmatch(r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias", key)
    if bias:  # EVA keeps q and v biases apart and has no k bias
      d = value.shape[0] // 3
      out[f"visual_encoder.blocks.{bias.group(1)}.attn.q_bias"] = value[:d].clone()
      out[f"visual_encoder.blocks.{bias.group(1)}.attn.v_bias"] = value[2 * d :].clone()
      continue
    for pattern, repl in RENAMES:
      if re.match(pattern, key):
        out[re.sub("^" + pattern, repl, key)] = value.clone()
        break
    else:
      raise AssertionError(f"no BLIP-2 name for {key}")
  g = torch.Generator().manual_seed(2)
  h, v = 32, 513
  out["temp"] = torch.tensor(0.05)
  head = "Qformer.cls.predictions."
  out[head + "transform.dense.weight"] = torch.randn(h, h, generator=g)
  out[head + "transform.dense.bias"] = torch.randn(h, generator=g)
  out[head + "transform.LayerNorm.weight"] = torch.randn(h, generator=g)
  out[head + "transform.LayerNorm.bias"] = torch.randn(h, generator=g)
  out[head + "bias"] = torch.randn(v, generator=g)
  out[head + "decoder.weight"] = out["Qformer.bert.embeddings.word_embeddings.weight"]
  out[head + "decoder.bias"] = out[head + "bias"]
  out["Qformer.bert.embeddings.position_ids"] = torch.arange(64)[None]
  for name, value in list(out.items()):
    if name.startswith("visual_encoder.blocks.1."):
      out[name.replace("blocks.1.", "blocks.2.")] = torch.randn(value.shape, generator=g)
  return out


@pytest.fixture(scope="module")
def lavis_files(tmp_path_factory):
  """`(blip2_pretrained.pth, eva_vit_g.pth, the transformers folder they were made from)`."""
  model = hf_blip2(QFORMER, queries=8, embed=16)
  folder = tmp_path_factory.mktemp("lavis")
  model.save_pretrained(folder / "hf")
  state = lavis_state_dict(model.state_dict())
  torch.save({"model": state}, folder / "blip2_pretrained.pth")
  eva = {
    k.removeprefix("visual_encoder."): v
    for k, v in state.items()
    if k.startswith("visual_encoder.")
  }
  torch.save(eva, folder / "eva_vit_g.pth")
  return str(folder / "blip2_pretrained.pth"), str(folder / "eva_vit_g.pth"), str(folder / "hf")


def tiny(**overrides):
  config = load_config("tiny")
  with config.unlocked():
    for key, value in overrides.items():
      node = config
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
  return config


def values(model, names) -> dict[str, np.ndarray]:
  """The written weights `names` of a model built abstractly (`api.abstract_model`)."""
  params = model_params(model)
  return {k: np.asarray(params[k].get_value()) for k in names}


# -- the config field -----------------------------------------------------------------------


def parse_command_line(monkeypatch, *overrides):
  """The config as `train.py` would get it from these flags."""
  argv = ["prog", f"--config={CONFIG_DIR}/pretrain.py:tiny", *overrides]
  monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from sys.argv
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True)
  fv(argv)
  return fv.config


def test_init_from_takes_a_string_or_parts_on_the_command_line(monkeypatch):
  config = parse_command_line(
    monkeypatch,
    "--config.init_from.vision=lavis-eva:eva.pth",
    "--config.init_from.qformer=hf-bert:b",
  )
  assert init_sources.parse(config.init_from) == {
    "vision": "lavis-eva:eva.pth",
    "qformer": "hf-bert:b",
  }
  config = parse_command_line(monkeypatch, "--config.init_from=hf-blip2:dir")
  assert init_sources.parse(config.init_from) == {"model": "hf-blip2:dir"}
  assert init_sources.parse(load_config("tiny").init_from) == {}
  assert init_sources.parse("") == {} and init_sources.parse({"vision": ""}) == {}
  with pytest.raises(ValueError, match=r"unknown parts \['vit'\]"):
    init_sources.parse({"vit": "lavis-eva:x"})
  with pytest.raises(ValueError, match="expected KIND:PATH with KIND one of hf-blip2:DIR"):
    init_sources.parse({"vision": "eva_vit_g.pth"})
  with pytest.raises(ValueError, match="a hf-bert checkpoint provides only the qformer part"):
    init_sources.parse({"vision": "hf-bert:b"})


def test_paper_placeholders_and_missing_paths_fail_with_the_fix(tmp_path):
  paper = load_config("paper")
  with pytest.raises(
    init_sources.PlaceholderError,
    match=r"config.init_from.vision='lavis-eva:/path/to/eva_vit_g.pth' is a "
    r"placeholder.*--config.init_from.vision=lavis-eva:/real/path",
  ):
    pretraining.train(paper, str(tmp_path / "run"), data_fn=pytest.fail)
  with pytest.raises(FileNotFoundError, match="is not a .pth file"):
    init_sources.check_fresh_start(tiny(), {"vision": f"lavis-eva:{tmp_path}/absent.pth"})


def test_a_frozen_vit_no_source_loads_is_refused(bert_folder, tmp_path):
  folder, _ = bert_folder
  fix = (
    r"--config.init_from.vision=lavis-eva:/path/to/eva_vit_g.pth .*"
    r"--config.model.vit.frozen=False to train it from scratch"
  )
  frozen = tiny(**{"model.vit.frozen": True, "data.tokenizer_dir": folder})
  for init_from in ({"qformer": f"hf-bert:{folder}"}, f"hf-bert:{folder}", ""):
    with frozen.unlocked():
      frozen.init_from = init_from
    with pytest.raises(ValueError, match=fix):
      # Refused before the data pipeline is built.
      pretraining.train(frozen, str(tmp_path / "run"), data_fn=pytest.fail)
  init_sources.check_fresh_start(frozen, {"vision": "random"})  # on purpose: accepted
  init_sources.check_fresh_start(tiny(), {})  # a ViT trained from scratch may start random
  # BERT's word embeddings with a vocabulary trained afresh would mean nothing.
  with pytest.raises(ValueError, match=r"tokenizer_dir to the vocabulary .* usually "):
    init_sources.check_fresh_start(tiny(), {"qformer": f"hf-bert:{folder}"})


def test_a_vit_stem_with_pretrained_vision_weights_is_refused(tmp_path):
  eva = tmp_path / "eva_vit_g.pth"
  eva.write_bytes(b"")  # only its existence is checked before the stem
  stem = tiny(**{"model.vit.stem_channels": 8})
  for sources in ({"vision": f"lavis-eva:{eva}"}, {"model": f"hf-blip2:{tmp_path}"}):
    with pytest.raises(ValueError, match=r"stem_channels=8 .*--config.model.vit.stem_channels=0"):
      init_sources.check_fresh_start(stem, sources)
  init_sources.check_fresh_start(stem, {"vision": "random"})  # from scratch: accepted


# -- two sources, one report ------------------------------------------------------------------


def test_vision_from_blip2_and_qformer_from_bert_every_weight_accounted_for(
  blip2_vision_folder, bert_folder, tmp_path, monkeypatch
):
  vision_dir, vision = blip2_vision_folder
  bert_dir, bert = bert_folder
  config = tiny(**{"model.vit.frozen": True, "data.tokenizer_dir": bert_dir})
  with config.unlocked():
    config.init_from.vision = f"hf-blip2:{vision_dir}"
    config.init_from.qformer = f"hf-bert:{bert_dir}"
  mesh = mesh_lib.make_mesh(config.mesh)
  _, abstract, shardings = state_lib.abstract_train_state(config, mesh, pretraining.model_fn)
  # The fresh state, all zeros: the real one compiles an initialisation program (tens of
  # seconds on two CPU cores) that this test has no use for.
  zeros = lambda *args: jax.tree.map(
    lambda a: jnp.zeros(a.shape, a.dtype, device=a.sharding), abstract
  )
  monkeypatch.setattr(state_lib, "init_train_state", zeros)
  manager = ckpt.make_manager(tmp_path, config)
  notes = []
  state, _, how = loop.initial_state(
    config,
    manager,
    abstract,
    shardings,
    None,
    pretraining.task(config),
    log=notes.append,
    workdir=str(tmp_path),
  )
  manager.close()
  assert how.startswith("initialised from config.init_from.vision=hf-blip2:")

  report = json.loads((tmp_path / pretraining.IMPORT_REPORT).read_text())
  names = set(model_params(model_io.build_abstract(config)))
  parts = {p["part"]: p for p in report["parts"]}
  loaded = [n for p in report["parts"] for n in p["loaded"]]
  # Every weight is either written by exactly one source or listed as keeping its initial value.
  assert len(loaded) == len(set(loaded))
  assert set(loaded) | set(report["initial_values"]) == names == set(report["weights"])
  assert not set(loaded) & set(report["initial_values"])
  assert report["num_weights"] == len(names)
  vision_part = {n for n in names if n.startswith(("vit/", "ln_vision/"))}
  assert set(parts["vision"]["loaded"]) == vision_part and not parts["vision"]["kept_at_init"]
  # The BLIP-2 folder's Q-Former (another size) is read and left unused, not an error.
  assert "qformer.encoder.layer.0.attention.attention.query.weight" in parts["vision"]["ignored"]
  q = parts["qformer"]
  assert "qformer/layers/1/attention/key/kernel" in q["loaded"]
  assert "qformer/lm_head/dense/kernel" in q["loaded"]
  assert {
    "query_tokens",
    "temp",
    "itm_head/kernel",
    "qformer/layers/0/crossattention/key/kernel",
  } <= set(q["kept_at_init"])
  assert any(n.startswith("vqvae/") for n in report["initial_values"])
  assert report["weights"]["ln_vision/scale"] == f"vision=hf-blip2:{vision_dir}"
  assert report["weights"]["query_tokens"] == "initial value"
  assert any(
    line.startswith("config.init_from.qformer=hf-bert:") and "kept their initial" in line
    for line in notes
  )
  assert any("import report:" in line for line in notes)

  model = jax.device_get(state["model"])
  np.testing.assert_array_equal(
    np.asarray(model["vit"]["layers"][1]["self_attn"]["qkv"]["kernel"].get_value()),
    vision["vision_model.encoder.layers.1.self_attn.qkv.weight"].T,
  )
  np.testing.assert_array_equal(
    np.asarray(model["ln_vision"]["bias"].get_value()), vision["vision_model.post_layernorm.bias"]
  )
  word = np.asarray(model["qformer"]["embeddings"]["word_embeddings"]["embedding"].get_value())
  np.testing.assert_array_equal(word[:512], bert["bert.embeddings.word_embeddings.weight"])
  # A weight no source has keeps the fresh state's value (zeros here), with its sharding.
  query_tokens = state["model"]["query_tokens"].get_value()
  assert not np.asarray(query_tokens).any()
  assert query_tokens.sharding == shardings["model"]["query_tokens"].get_value()


# -- the paper's code's .pth files ------------------------------------------------------------


def test_lavis_blip2_file_gives_the_transformers_folders_weights(lavis_files):
  blip2_pth, _, hf_folder = lavis_files
  config = tiny()
  from_hf, from_pth = model_io.build_abstract(config), model_io.build_abstract(config)
  hf = init_sources.import_sources(from_hf, config.model, {"model": f"hf-blip2:{hf_folder}"})
  pth = init_sources.import_sources(from_pth, config.model, {"model": f"lavis-blip2:{blip2_pth}"})
  assert set(hf.parts[0].loaded) < set(pth.parts[0].loaded)
  ours, theirs = values(from_pth, pth.parts[0].loaded), values(from_hf, hf.parts[0].loaded)
  for name in hf.parts[0].loaded:
    np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
  # What only the paper's code saves: the temperature and the LM head (its decoder tied).
  assert set(pth.parts[0].loaded) - set(hf.parts[0].loaded) == {
    "temp",
    "qformer/lm_head/bias",
    "qformer/lm_head/dense/bias",
    "qformer/lm_head/dense/kernel",
    "qformer/lm_head/layernorm/bias",
    "qformer/lm_head/layernorm/scale",
  }
  np.testing.assert_allclose(ours["temp"], 0.05)
  # The files hold 513 rows ([DEC] included), the tiny model's padded vocabulary 640: the rows
  # beyond are the mean word embedding, as from either source, and their LM bias is 0.
  rows, word = QFORMER["vocab_size"], ours["qformer/embeddings/word_embeddings/embedding"]
  assert word.shape == (config.model.qformer.vocab_size, 32) and rows < word.shape[0]
  np.testing.assert_allclose(
    word[rows:], np.broadcast_to(word[:rows].mean(0), word[rows:].shape), rtol=1e-6
  )
  assert ours["qformer/lm_head/bias"].shape == (word.shape[0],)
  assert not ours["qformer/lm_head/bias"][rows:].any()
  assert pth.parts[0].ignored == [
    "Qformer.bert.embeddings.position_ids",
    *(
      f"visual_encoder.blocks.2.{k}"
      for k in (
        "attn.proj.bias",
        "attn.proj.weight",
        "attn.q_bias",
        "attn.qkv.weight",
        "attn.v_bias",
        "mlp.fc1.bias",
        "mlp.fc1.weight",
        "mlp.fc2.bias",
        "mlp.fc2.weight",
        "norm1.bias",
        "norm1.weight",
        "norm2.bias",
        "norm2.weight",
      )
    ),
  ]
  assert all(n.startswith("vqvae/") for n in pth.initial_values)


def test_a_file_with_more_vocabulary_rows_than_the_model_is_refused(lavis_files):
  blip2_pth, _, hf_folder = lavis_files
  config = tiny(**{"model.qformer.vocab_size": 384, "model.qformer.dec_token_id": 383})
  word = "qformer/embeddings/word_embeddings/embedding"
  expected = {
    f"hf-blip2:{hf_folder}": {word: ((384, 32), (513, 32))},
    f"lavis-blip2:{blip2_pth}": {
      word: ((384, 32), (513, 32)),
      "qformer/lm_head/bias": ((384,), (513,)),
    },
  }
  for source, mismatched in expected.items():
    with pytest.raises(WeightImportError) as info:
      init_sources.import_sources(model_io.build_abstract(config), config.model, {"model": source})
    assert {m[0]: (m[2], m[3]) for m in info.value.mismatched} == mismatched, source


def test_lavis_eva_file_fills_the_vit_and_leaves_ln_vision_at_init(lavis_files):
  blip2_pth, eva_pth, _ = lavis_files
  state = torch.load(eva_pth, weights_only=True)
  config = tiny()
  model = model_io.build_abstract(config)
  report = init_sources.import_sources(model, config.model, {"vision": f"lavis-eva:{eva_pth}"})
  part = report.parts[0]
  assert part.kept_at_init == ["ln_vision/bias", "ln_vision/scale"]  # BLIP-2 makes it fresh
  assert part.ignored and all(k.startswith("blocks.2.") for k in part.ignored)
  assert {n for n in part.loaded} == {n for n in model_params(model) if n.startswith("vit/")}
  got = values(model, part.loaded)
  d = 32
  np.testing.assert_array_equal(
    got["vit/layers/0/self_attn/qkv/kernel"], state["blocks.0.attn.qkv.weight"].numpy().T
  )
  assert got["vit/layers/0/self_attn/qkv/kernel"].shape == (d, 3 * d)
  np.testing.assert_array_equal(
    got["vit/layers/1/self_attn/q_bias"], state["blocks.1.attn.q_bias"].numpy()
  )
  np.testing.assert_array_equal(
    got["vit/layers/1/self_attn/v_bias"], state["blocks.1.attn.v_bias"].numpy()
  )
  np.testing.assert_array_equal(
    got["vit/embeddings/patch_embedding/kernel"],
    state["patch_embed.proj.weight"].numpy().transpose(2, 3, 1, 0),
  )
  np.testing.assert_array_equal(
    got["vit/embeddings/position_embedding"], state["pos_embed"].numpy()
  )

  # The same file can serve the vision part of the BLIP-2 .pth as well: same ViT weights.
  other = model_io.build_abstract(config)
  init_sources.import_sources(other, config.model, {"vision": f"lavis-blip2:{blip2_pth}"})
  again = values(other, part.loaded)
  for name in part.loaded:
    np.testing.assert_array_equal(again[name], got[name], err_msg=name)


def test_lavis_files_that_do_not_fit_are_listed(lavis_files, tmp_path):
  _, eva_pth, _ = lavis_files
  state = torch.load(eva_pth, weights_only=True)
  del state["blocks.1.attn.v_bias"]
  state["blocks.0.attn.k_bias"] = torch.zeros(32)
  broken = tmp_path / "broken.pth"
  torch.save(state, broken)
  config = tiny()
  with pytest.raises(WeightImportError) as info:
    init_sources.import_sources(
      model_io.build_abstract(config), config.model, {"vision": f"lavis-eva:{broken}"}
    )
  assert info.value.missing == ["vit/layers/1/self_attn/v_bias"]
  assert info.value.unexpected == ["blocks.0.attn.k_bias"]
  assert "config.init_from.vision=lavis-eva:" in str(info.value)


def test_reading_pth_without_torch_names_the_install(lavis_files, monkeypatch):
  _, eva_pth, _ = lavis_files
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
  with pytest.raises(ImportError, match=r"pip install torch==2\.13\.0"):
    lavis.read_pth(eva_pth)
