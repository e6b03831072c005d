"""The configuration mechanics: the loader, variant tables, derived fields, the geometry rules."""

import json

import ml_collections
import pytest
from absl import flags
from configs_util import CONFIG_DIR, load_config
from flax import nnx
from ml_collections import config_flags

from medunifier_jax import config_lib
from medunifier_jax.models import vqvae as vq
from medunifier_jax.models.medunifier import MedUnifier

PRETRAIN_VARIANTS = tuple(config_lib.load_module(CONFIG_DIR / "pretrain.py").VARIANTS)
PRIOR_VARIANTS = tuple(config_lib.load_module(CONFIG_DIR / "prior.py").VARIANTS)


def parse_flags(*args: str) -> ml_collections.ConfigDict:
  """The config `train.py`'s `--config` flag yields for these command-line arguments."""
  argv = ["train", *args]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file(
    "config", None, "config file", flag_values=values, lock_config=True, sys_argv=argv
  )
  values(argv)
  return values.config


# -- derived fields --------------------------------------------------------------------------


def test_command_line_override_moves_the_derived_fields():
  config = parse_flags(
    f"--config={CONFIG_DIR / 'pretrain.py'}:tiny",
    "--config.model.vit.image_size=96",
    "--config.model.max_text_len=40",
    "--config.model.qformer.dec_token_id=600",
  )
  assert config.model.vit.image_size == config.data.image_size == 96
  assert config.model.max_text_len == config.data.max_text_len == 40
  assert config.data.tokenizer_vocab_size == 600
  assert config.evals.report_gen.max_length == 40  # min(95, max_text_len)
  assert config.to_dict()["data"]["image_size"] == 96


def test_setting_a_derived_field_leaves_its_source():
  config = parse_flags(f"--config={CONFIG_DIR / 'pretrain.py'}:tiny", "--config.data.image_size=64")
  assert (config.model.vit.image_size, config.data.image_size) == (48, 64)


def test_loader_overrides_propagate_and_report_length_is_capped():
  config = config_lib.load("tiny", {"model.vit.image_size": 96, "model.max_text_len": 128})
  assert config.data.image_size == 96 and config.data.max_text_len == 128
  assert config.evals.report_gen.max_length == config_lib.REPORT_MAX_LENGTH
  paper_rows = config_lib.load("configs/eval_paper.py:all", {"model.max_text_len": 40})
  assert paper_rows.evals.mimic_report_gen.max_length == 40


def test_json_round_trip_is_linked_again_by_the_loader():
  saved = config_lib.load("tiny").to_json_best_effort(indent=2, sort_keys=True)
  restored = ml_collections.ConfigDict(json.loads(saved))
  assert restored.to_dict() == json.loads(saved)  # plain values, no references in the file
  config = config_lib.load(restored, {"model.vit.image_size": 24})
  assert config is restored and config.data.image_size == 24


def test_loader_accepts_every_spec_form(tmp_path, monkeypatch):
  expected = load_config("tiny").to_dict()
  assert config_lib.load("tiny").to_dict() == expected
  monkeypatch.chdir(tmp_path)  # relative paths fall back to the repository root
  assert config_lib.load("configs/pretrain.py:tiny").to_dict() == expected
  assert config_lib.load(str(CONFIG_DIR / "pretrain.py")).variant == "demo"
  assert config_lib.load().variant == "demo"
  assert config_lib.load("configs/prior.py:tiny").task == "prior"
  with pytest.raises(ValueError, match="unknown variant 'huge'"):
    config_lib.load("huge")
  with pytest.raises(FileNotFoundError):
    config_lib.load("configs/nope.py:tiny")
  with pytest.raises(KeyError, match="model.vit.img_size"):
    config_lib.load("tiny", {"model.vit.img_size": 96})
  with pytest.raises(ValueError, match="full configuration"):
    config_lib.load(load_config("tiny").model)


def test_a_run_s_saved_config_is_a_config_file(tmp_path):
  from medunifier_jax.training import checkpoint

  trained = parse_flags(
    f"--config={CONFIG_DIR / 'pretrain.py'}:tiny",
    "--config.model.qformer.num_queries=4",  # an override the run was trained with
    "--config.data.tokenizer_dir=/some/bert",
  )
  checkpoint.save_config(tmp_path, trained)
  config = parse_flags(
    f"--config={CONFIG_DIR / 'workdir.py'}:{tmp_path}",
    "--config.model.vit.image_size=96",  # overrides still apply, derived fields follow
    "--config.evals.zero_shot.datasets=('phantom_pneumonia',)",  # tuples, as in config files
  )
  assert config.model.qformer.num_queries == 4 and config.data.tokenizer_dir == "/some/bert"
  assert config.data.image_size == 96 and config.evals.zero_shot.datasets == ("phantom_pneumonia",)
  assert config.mesh == tuple(tuple(axis) for axis in trained.mesh)
  expected = trained.to_dict()
  got = config.to_dict()
  expected["model"]["vit"]["image_size"] = expected["data"]["image_size"] = 96
  expected["evals"]["zero_shot"]["datasets"] = ("phantom_pneumonia",)
  assert json.dumps(got, sort_keys=True) == json.dumps(expected, sort_keys=True)
  with pytest.raises(FileNotFoundError, match="config.json"):
    config_lib.load(f"configs/workdir.py:{tmp_path / 'nothing'}")
  with pytest.raises(ValueError, match="workdir.py:WORKDIR"):
    config_lib.load("configs/workdir.py")


def test_a_config_saved_before_new_fields_gets_them_from_its_variant(tmp_path):
  """A workdir from an earlier version lacks fields added since; it loads with today's values
  for its variant, its own values kept, and no evaluation set added."""
  from medunifier_jax import model_io

  saved = json.loads(load_config("tiny").to_json_best_effort())
  del saved["evals"]["image_gen"]["candidates"]  # a field added later
  del saved["dropout_prng"]
  del saved["evals"]["finetune"]  # a set this run did not have
  saved["evals"]["image_gen"]["temperature"] = 0.5  # the run's own value
  (tmp_path / "config.json").write_text(json.dumps(saved))
  config = model_io.load_config(tmp_path)
  today = load_config("tiny")
  assert config.evals.image_gen.candidates == today.evals.image_gen.candidates
  assert config.dropout_prng == today.dropout_prng
  assert config.evals.image_gen.temperature == 0.5 and "finetune" not in config.evals
  assert config.data.image_size == config.model.vit.image_size  # derived fields linked
  config.model.vit.image_size = 96
  assert config.data.image_size == 96


# -- geometry --------------------------------------------------------------------------------


def _with(config: ml_collections.ConfigDict, **model_changes) -> ml_collections.ConfigDict:
  bad = config.copy_and_resolve_references()
  bad.unlock()
  return config_lib.override(bad, {f"model.{k}": v for k, v in model_changes.items()})


def _message(fn) -> str:
  with pytest.raises(ValueError) as error:
    fn()
  return str(error.value)


def test_a_wrong_geometry_has_one_message_wherever_it_is_found(tmp_path):
  transformers = pytest.importorskip("transformers")
  from medunifier_jax.weights import hf_import

  bad = _with(load_config("tiny"), **{"vqvae.decoder_channels": (32,)})
  m = bad.model
  direct = _message(lambda: config_lib.check_geometry(m))
  from_model = _message(lambda: MedUnifier(m, rngs=nnx.Rngs(0)))
  from_vqvae = _message(
    lambda: vq.VQVAE(
      m.vqvae,
      query_width=m.qformer.hidden_size,
      vision_width=m.vit.width,
      text_width=m.qformer.hidden_size,
      image_size=m.vit.image_size,
      rngs=nnx.Rngs(0),
    )
  )
  transformers.Blip2Config(
    vision_config=dict(image_size=48, patch_size=6),
    qformer_config=dict(use_qformer_text_input=True),
    num_query_tokens=8,
  ).save_pretrained(tmp_path)
  from_import = _message(lambda: hf_import.blip2_config(str(tmp_path), bad))
  assert direct == from_model == from_vqvae == from_import
  assert direct.count("\n  - ") == 1 and "needs k-1=2 entries" in direct


def test_every_broken_rule_is_listed_with_its_fix():
  bad = _with(
    load_config("tiny"),
    **{
      "vit.patch_size": 5,
      "vqvae.query_grid": (2, 2),
      "vqvae.latent_dim": 18,
      "max_text_len": 100,
    },
  )
  message = _message(lambda: config_lib.check_geometry(bad.model))
  assert message.startswith("the model's geometry does not fit together (4 problems")
  for fix in (
    "not a multiple of model.vit.patch_size=5",
    "set model.vqvae.query_grid=(2, 4)",
    "multiple of 4",
    "exceeds model.qformer.max_position_embeddings=64",
  ):
    assert fix in message


@pytest.mark.parametrize("variant", PRETRAIN_VARIANTS)
def test_every_pretrain_variant_fits(variant):
  config = load_config(variant)
  k = config_lib.check_geometry(config.model)
  assert len(config.model.vqvae.decoder_channels) == k - 1


@pytest.mark.parametrize("variant", PRIOR_VARIANTS)
def test_every_prior_variant_fits_its_medunifier(variant):
  """The prior models the codes of the pre-training variant of the same name."""
  prior, medunifier = load_config(variant, "prior"), load_config(variant)
  config_lib.check_geometry(medunifier.model)
  vqvae = medunifier.model.vqvae
  assert (prior.model.grid, prior.model.codebook_size, prior.model.text_width) == (
    vqvae.grid,
    vqvae.codebook_size,
    medunifier.model.qformer.hidden_size,
  )
  assert prior.model.null_length <= medunifier.model.max_text_len
