"""The image prior (medunifier_jax/prior): masked-code training on the training engine, exact
resume, parallel decoding, code extraction from a MedUnifier workdir, `generate_images`.

Sizes are the tiny variants. The learning and resume runs use a synthetic code cache whose
codes are a function of the text condition (4 classes), so the loss can fall far below log K;
the MedUnifier for extraction and generation is the tiny model with drawn weights, saved as a
workdir without training.
"""

import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from configs.pretrain import get_config as pretrain_config
from configs.prior import get_config
from medunifier_jax import api, inference, model_io
from medunifier_jax.data import pipeline, registry
from medunifier_jax.prior import codes as codes_lib
from medunifier_jax.prior import export, objective
from medunifier_jax.prior import model as model_lib
from medunifier_jax.prior import sample as sample_lib
from medunifier_jax.prior import train as train_lib
from medunifier_jax.training import checkpoint as ckpt

NUM_STEPS, HALF = 120, 60
CLASSES, EXAMPLES = 4, 64


def prior_config(**overrides):
  config = get_config("tiny")
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def records(workdir) -> dict[int, dict]:
  """The last training record of each step (a resumed run logs the later steps again)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      if "loss" in r:
        out[r["step"]] = r
  return out


# ---------------------------------------------------------------- a learnable code set


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
  """A cache of 64 examples in 4 classes: each class has its own codes and text states."""
  config = get_config("tiny")
  m = config.model
  rng = np.random.default_rng(0)
  g, k, t, h = m.grid, m.codebook_size, 24, m.text_width
  top = rng.integers(0, k, (CLASSES, g // 2, g // 2))
  bottom = rng.integers(0, k, (CLASSES, g, g))
  states = rng.normal(size=(CLASSES, t, h)).astype(np.float32)
  label = np.arange(EXAMPLES) % CLASSES
  mask = (np.arange(t)[None, :] < 6 + label[:, None]).astype(np.int8)
  arrays = {
    "index": np.arange(EXAMPLES, dtype=np.int32),
    "codes_top": top[label].astype(np.int16),
    "codes_bottom": bottom[label].astype(np.int16),
    "input_ids": np.where(mask, 5 + label[:, None], 0).astype(np.int32),
    "attention_mask": mask,
    "text_states": states[label] * mask[..., None],
  }
  folder = tmp_path_factory.mktemp("codes")
  codes_lib.write_cache(
    folder, arrays, {"grid": g, "codebook_size": k, "cache_text_states": True}, shard_size=24
  )
  return {"dir": str(folder), "arrays": arrays, "top": top, "bottom": bottom}


def synthetic_config(codes_dir, **overrides):
  return prior_config(
    **{
      "codes.dir": codes_dir,
      "num_steps": NUM_STEPS,
      "log_every": 1,
      "checkpoint_every": HALF,
      "warmup_steps": 10,
      "learning_rate": 1e-2,
      **overrides,
    }
  )


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synthetic):
  """NUM_STEPS uninterrupted steps on the synthetic cache."""
  workdir = str(tmp_path_factory.mktemp("prior_ref"))
  train_lib.train_prior(synthetic_config(synthetic["dir"]), workdir, show_progress=False)
  return workdir


def test_loss_falls_far_below_log_k(reference):
  losses = [r["loss"] for _, r in sorted(records(reference).items())]
  log_k = math.log(get_config("tiny").model.codebook_size)
  assert len(losses) == NUM_STEPS and losses[0] > 0.8 * log_k
  assert np.mean(losses[-5:]) < 0.25 * log_k, losses


def test_resume_reproduces_the_uninterrupted_run(tmp_path, synthetic, reference):
  # The run stopped after HALF steps: the reference's config and its checkpoint of step HALF
  # (state, base key and the data iterator's position), nothing of the later steps.
  shutil.copy(os.path.join(reference, "config.json"), tmp_path)
  shutil.copytree(
    os.path.join(reference, "checkpoints", str(HALF)), tmp_path / "checkpoints" / str(HALF)
  )
  resumed = train_lib.train_prior(
    synthetic_config(synthetic["dir"]), str(tmp_path), show_progress=False
  )
  assert resumed["start"] == f"resumed from step {HALF}" and resumed["step"] == NUM_STEPS
  want, got = records(reference), records(tmp_path)
  assert sorted(got) == list(range(HALF + 1, NUM_STEPS + 1))
  for step in got:
    assert got[step]["loss"] == want[step]["loss"], step
    assert got[step]["accuracy"] == want[step]["accuracy"], step


# ------------------------------------------------------------------------ decoding


@pytest.fixture(scope="module")
def trained(reference, synthetic):
  prior = sample_lib.load_prior(reference)
  a = synthetic["arrays"]
  rows = np.arange(CLASSES)  # one example of each class
  sample = jax.jit(sample_lib.sample_codes, static_argnames=("steps",))

  def draw(seed, guidance):
    keys = sample_lib.row_keys(seed, len(rows))
    return np.asarray(
      sample(
        prior.module,
        jnp.asarray(a["text_states"][rows]),
        jnp.asarray(a["attention_mask"][rows]),
        keys,
        steps=8,
        guidance=guidance,
      )
    )

  return prior, draw


def test_same_seed_same_codes_other_seed_other_codes(trained):
  _, draw = trained
  a, b, c = draw(0, 1.0), draw(0, 1.0), draw(1, 1.0)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert a.dtype == np.int32 and a.min() >= 0 and a.max() < get_config("tiny").model.codebook_size


def test_guidance_zero_is_the_conditional_path(trained):
  _, draw = trained
  np.testing.assert_array_equal(draw(3, 0.0), draw(3, None))


def test_samples_follow_the_text(trained, synthetic):
  _, draw = trained
  codes = draw(0, 1.0)
  want = np.asarray(model_lib.flatten_codes(synthetic["top"], synthetic["bottom"]))
  # Each class's text gives (mostly) that class's codes.
  assert np.mean(codes == want) > 0.9


def test_mask_schedule_reveals_at_least_one_code_per_step_and_ends_unmasked():
  for n, steps in ((80, 12), (320, 16), (5, 12)):
    counts = sample_lib.mask_schedule(n, steps)
    assert counts[-1] == 0 and np.all(np.diff(np.concatenate([[n], counts])) <= 0)
    assert counts[0] == min(n - 1, math.ceil(n * math.cos(math.pi / 2 / steps)))


def test_unconditional_prior_ignores_the_text():
  config = prior_config(**{"model.condition": "none"})
  build = lambda: model_lib.ConditionedPrior(config, rngs=nnx.Rngs(0), with_text_encoder=False)
  graphdef, _ = nnx.split(nnx.eval_shape(build))
  state = jax.jit(lambda: nnx.state(build()))()
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(0, 33, (2, 80)), jnp.int32)  # codes and [MASK] (32)
  mask = jnp.ones((2, 24), jnp.int32)
  texts = [jnp.asarray(rng.normal(size=(2, 24, 32)), jnp.float32) for _ in range(2)]
  codes = tokens % 32
  batch = {
    "codes_top": codes[:, :16].reshape(2, 4, 4),
    "attention_mask": mask,
    "codes_bottom": codes[:, 16:].reshape(2, 8, 8),
    "text_states": texts[0],
  }

  @jax.jit
  def run(state):
    model = nnx.merge(graphdef, state)
    _, metrics = objective.masked_token_loss(model, batch, jax.random.key(0), cond_drop=0.1)
    return [model.prior(tokens, t, mask) for t in texts], metrics["null_fraction"]

  (one, two), null_fraction = run(state)
  np.testing.assert_array_equal(one, two)
  # The training loss gives every example the null condition.
  assert float(null_fraction) == 1.0


def test_masking_draws_the_cosine_share_and_at_least_one():
  masks = np.asarray(objective.random_mask(jax.random.key(0), 4096, 80))
  counts = masks.sum(1)
  assert counts.min() >= 1 and counts.max() <= 80
  # E[cos(pi/2 u)] = 2/pi over u ~ U(0, 1).
  assert abs(counts.mean() / 80 - 2 / math.pi) < 0.02


# ------------------------------------------- a MedUnifier workdir: extraction, generation


def drawn_weights(config):
  """The configured MedUnifier with weights drawn in NumPy into its abstract state (no
  initialiser is compiled): norm scales and variances 1, biases and means 0, other weights
  N(0, 1 / fan-in)."""
  graphdef, state = nnx.split(model_io.build_abstract(config))
  rng = np.random.default_rng(0)

  def draw(path, x):
    name = next(str(k.key) for k in reversed(path) if hasattr(k, "key"))
    if name in ("scale", "var"):
      value = np.ones(x.shape)
    elif name in ("bias", "mean", "q_bias", "v_bias"):
      value = np.zeros(x.shape)
    elif name == "temp":
      value = np.full(x.shape, config.model.temperature_init)
    else:
      fan_in = int(np.prod(x.shape[:-1])) if len(x.shape) > 1 else 1
      value = rng.normal(0.0, 1.0 / np.sqrt(fan_in), x.shape)
    return jnp.asarray(value, x.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


def save_medunifier(workdir, config, module, step: int) -> None:
  ckpt.save_config(workdir, config)
  manager = ckpt.make_manager(workdir, config)
  ckpt.save(manager, step, nnx.State({"model": nnx.state(module)}), jax.random.key(0), force=True)
  manager.wait_until_finished()
  manager.close()


@pytest.fixture(scope="module")
def medunifier(tmp_path_factory):
  """A tiny MedUnifier workdir (drawn weights, step 3, tokenizer trained on its reports)."""
  workdir = str(tmp_path_factory.mktemp("medunifier"))
  config = pretrain_config("tiny")
  pipeline.build_tokenizer(config, cache_dir=os.path.join(workdir, "tokenizer"))
  save_medunifier(workdir, config, drawn_weights(config), step=3)
  return workdir


EXTRACT = dict(
  cache_text_states=True, shard_size=16, batch_size=16, max_examples=40, show_progress=False
)


@pytest.fixture(scope="module")
def extracted(medunifier, tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("mu_codes"))
  model = api.load(medunifier)
  index = codes_lib.extract_codes(medunifier, folder, load_model=lambda: model, **EXTRACT)
  return folder, index, model


def test_extraction_writes_each_example_in_source_order(extracted):
  folder, index, model = extracted
  assert index["complete"] and index["medunifier_step"] == 3 and index["num_examples"] == 40
  assert sorted(p for p in os.listdir(folder) if p.endswith(".npz")) == [
    codes_lib.shard_name(i) for i in range(3)
  ]
  cached = codes_lib.CodeSource(folder).take(np.arange(40))
  np.testing.assert_array_equal(cached["index"], np.arange(40))
  # Examples read as pre-training reads them, encoded in another batch composition (the one
  # compiled shape of 16): the same codes, tokens and text states.
  cfg = model.config
  read = pipeline.ExampleProcessor.from_config(
    registry.get_source(cfg.data.name, "train", cfg.data), model.tokenizer, cfg.data
  )
  rows = [39, 17, 0, 33, 5, 16, 15, 31, 32, 1, 2, 3, 4, 6, 7, 8]
  examples = [read(i) for i in rows]
  stack = lambda key: np.stack([e[key] for e in examples])
  top, bottom, states = jax.device_get(
    model.fns.codes_and_text(
      model.state, stack("image"), stack("input_ids"), stack("attention_mask")
    )
  )
  np.testing.assert_array_equal(cached["codes_top"][rows], top)
  np.testing.assert_array_equal(cached["codes_bottom"][rows], bottom)
  np.testing.assert_array_equal(cached["input_ids"][rows], stack("input_ids"))
  np.testing.assert_allclose(cached["text_states"][rows], states, rtol=1e-5, atol=1e-6)


def test_extraction_rerun_reuses_complete_shards_and_redoes_missing_ones(extracted, medunifier):
  folder, _, model = extracted

  def must_not_load():
    raise AssertionError("a complete cache was encoded again")

  codes_lib.extract_codes(medunifier, folder, load_model=must_not_load, **EXTRACT)
  before = codes_lib.CodeSource(folder).arrays
  os.remove(os.path.join(folder, codes_lib.shard_name(1)))
  index = json.load(open(os.path.join(folder, codes_lib.INDEX)))
  index["complete"] = False  # as a run killed while writing shard 1 leaves it
  json.dump(index, open(os.path.join(folder, codes_lib.INDEX), "w"))
  codes_lib.extract_codes(medunifier, folder, load_model=lambda: model, **EXTRACT)
  after = codes_lib.CodeSource(folder).arrays
  for key in before:
    np.testing.assert_array_equal(after[key], before[key])


def test_extraction_refuses_a_cache_of_another_checkpoint(extracted, medunifier, tmp_path):
  folder, _, _ = extracted
  # The same run one step further on.
  later = tmp_path / "medunifier"
  shutil.copytree(medunifier, later, ignore=shutil.ignore_patterns("prior"))
  os.rename(later / "checkpoints" / "3", later / "checkpoints" / "4")
  with pytest.raises(codes_lib.StaleCodesError, match="medunifier_step: cache 3, wanted 4"):
    codes_lib.extract_codes(str(later), folder, **EXTRACT)


@pytest.fixture(scope="module")
def with_prior(medunifier, extracted):
  """A prior trained 2 steps on the MedUnifier's codes, text states computed each step by
  the frozen Q-Former; then `api.load` of the MedUnifier (which attaches WORKDIR/prior)."""
  # The cache extracted above (its text states unused here): nothing is encoded again.
  config = prior_config(
    **{
      "medunifier_workdir": medunifier,
      "num_steps": 2,
      "codes.cache_text_states": False,
      "codes.dir": extracted[0],
      "codes.shard_size": 16,
      "codes.batch_size": 16,
      "codes.max_examples": 40,
      "checkpoint_every": 2,
    }
  )
  result = train_lib.train_prior(config, os.path.join(medunifier, "prior"), show_progress=False)
  return result, api.load(medunifier)


def test_prior_trains_with_the_frozen_text_encoder(with_prior, medunifier):
  result, model = with_prior
  assert result["step"] == 2 and result["start"].startswith("initialised from the Q-Former")
  assert np.isfinite(result["metrics"]["loss"])
  saved = json.load(open(os.path.join(medunifier, "prior", "config.json")))
  assert saved["medunifier_step"] == 3 and saved["model"]["codebook_size"] == 32
  # The frozen encoder is the MedUnifier's Q-Former, untouched by the two updates.
  config = ckpt.load_config(os.path.join(medunifier, "prior"))
  abstract = nnx.state(
    nnx.eval_shape(
      lambda: model_lib.ConditionedPrior(config, rngs=nnx.Rngs(0), with_text_encoder=True)
    )
  )
  state, _ = ckpt.restore_model_state(os.path.join(medunifier, "prior"), abstract)
  want = nnx.to_pure_dict(nnx.state(model.module.qformer))
  got = nnx.to_pure_dict(state)["text_encoder"]
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_generate_images_shape_range_and_seed(with_prior):
  _, model = with_prior
  assert model.prior is not None and model.prior.step == 2
  texts = ["large right pleural effusion", "no acute findings"]
  images = model.generate_images(texts, num_per_text=2, steps=4, seed=0)
  assert images.shape == (4, 48, 48, 3) and images.dtype == np.float32
  assert images.min() >= 0.0 and images.max() <= 1.0
  np.testing.assert_array_equal(
    images, model.generate_images(texts, num_per_text=2, steps=4, seed=0)
  )


def test_best_of_candidates_is_the_draw_the_matching_head_scores_highest(with_prior):
  _, model = with_prior
  k, texts = 3, ["large right pleural effusion", "no acute findings"]
  tokens = model.tokenize(texts)
  ids, mask = (jnp.asarray(tokens[key]) for key in ("input_ids", "attention_mask"))
  stats = sample_lib.pixel_stats(model.config)
  prior = model.prior
  settings = sample_lib.SamplingSettings(jnp.float32(1.0), jnp.float32(1.0), jnp.float32(4.5))

  def draw(ids, mask, keys, candidates):
    return inference.generate_images(
      model.graphdef,
      model.state,
      prior.graphdef,
      prior.state,
      ids,
      mask,
      keys,
      settings,
      steps=4,
      guided=True,
      candidates=candidates,
      pixel_stats=stats,
    )[0]

  keys = sample_lib.row_keys(0, 2)
  best = np.asarray(draw(ids, mask, keys, k))
  # Every candidate drawn alone: row i's candidate j is row i k + j here.
  every = draw(jnp.repeat(ids, k, 0), jnp.repeat(mask, k, 0), sample_lib.candidate_keys(keys, k), 1)
  scores = jax.jit(
    lambda state, images: sample_lib.match_scores(
      nnx.merge(model.graphdef, state), images, jnp.repeat(ids, k, 0), jnp.repeat(mask, k, 0), stats
    )
  )(model.state, every)
  chosen = np.argmax(np.asarray(scores).reshape(2, k), axis=1)
  every = np.asarray(every).reshape((2, k) + every.shape[1:])
  np.testing.assert_allclose(best, every[np.arange(2), chosen], atol=1e-6)
  # The first candidate is the single draw of the same key; the drafts differ.
  np.testing.assert_allclose(every[:, 0], np.asarray(draw(ids, mask, keys, 1)), atol=1e-6)
  assert not np.allclose(every[:, 0], every[:, 1])
  # Drafts without the normalisation the judge needs: an error naming it, before any drawing.
  with pytest.raises(ValueError, match="pixel_stats"):
    prior.generate(
      model.graphdef,
      model.state,
      tokens["input_ids"],
      tokens["attention_mask"],
      steps=4,
      candidates=2,
    )


def test_generate_writes_pngs_and_a_grid(with_prior, tmp_path):
  _, model = with_prior
  prompts = ["small left effusion", "cardiomegaly"]  # the shapes of the test above: compiled
  written = export.generate(model, prompts, str(tmp_path), num=2, steps=4, seed=1)
  assert [os.path.basename(p) for p in written] == [
    f"prompt{p}_sample{s}.png" for p in range(2) for s in range(2)
  ] + ["grid.png"]
  assert Image.open(written[0]).size == (48, 48)
  assert Image.open(written[-1]).size == (2 + 2 * 50, 2 + 2 * 50)
  assert json.load(open(tmp_path / "prompts.json"))["prompts"] == prompts


def test_generate_images_without_a_prior_names_the_training_command(extracted):
  _, _, model = extracted
  bare = api.Model(model.module, model.config, model.tokenizer)
  with pytest.raises(ValueError, match=r"configs/prior.py:demo .*medunifier_workdir="):
    bare.generate_images(["effusion"])


# ------------------------------------------- several codes per bottom cell (bottom_depth R)


def test_bottom_depth_embeds_and_predicts_each_depth_from_its_own_block():
  config = prior_config(**{"model.bottom_depth": 2})
  prior = model_lib.CodePrior(config.model, rngs=nnx.Rngs(0))
  k, g = prior.codebook_size, prior.grid
  assert prior.num_positions == (g // 2) ** 2 + g * g * 2
  assert prior.code_embedding_bottom.num_embeddings == 2 * k + 1
  # Position p of the bottom sequence is depth p % 2; [MASK] is the last row at every depth.
  ids = prior._bottom_ids(jnp.asarray([[0, 1, k, k, 3, 3]], jnp.int32))
  np.testing.assert_array_equal(ids, [[0, k + 1, 2 * k, 2 * k, 3, k + 3]])
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, config.model.width)), jnp.float32)
  every_block = prior.head_bottom(x)  # (2, 6, 2K)
  want = jnp.stack([every_block[:, p, (p % 2) * k : (p % 2 + 1) * k] for p in range(6)], axis=1)
  np.testing.assert_allclose(prior._bottom_logits(x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # about 20 s or more here: left out of `make test-fast`
def test_two_codes_per_bottom_cell_from_extraction_to_images(tmp_path):
  """A MedUnifier with vqvae.bottom_depth 2: its codes cache as (m, g, g, 2), a prior trains
  on them with the depth copied from the run, and images are drawn and decoded."""
  workdir, config = str(tmp_path / "medunifier"), pretrain_config("tiny")
  config.model.vqvae.bottom_depth = 2
  pipeline.build_tokenizer(config, cache_dir=os.path.join(workdir, "tokenizer"))
  save_medunifier(workdir, config, drawn_weights(config), step=1)
  model = api.load(workdir)
  g = config.model.vqvae.grid
  codes = dict(EXTRACT, max_examples=16)
  index = codes_lib.extract_codes(
    workdir, str(tmp_path / "codes"), load_model=lambda: model, **codes
  )
  assert index["bottom_depth"] == 2
  cached = codes_lib.CodeSource(str(tmp_path / "codes")).take(np.arange(16))
  assert cached["codes_bottom"].shape == (16, g, g, 2)
  config = prior_config(
    **{
      "medunifier_workdir": workdir,
      "num_steps": 2,
      "codes.dir": str(tmp_path / "codes"),
      "codes.shard_size": 16,
      "codes.batch_size": 16,
      "codes.max_examples": 16,
      "checkpoint_every": 2,
    }
  )
  result = train_lib.train_prior(config, os.path.join(workdir, "prior"), show_progress=False)
  assert result["step"] == 2 and np.isfinite(result["metrics"]["loss"])
  saved = json.load(open(os.path.join(workdir, "prior", "config.json")))
  assert saved["model"]["bottom_depth"] == 2
  model = api.load(workdir)
  tokens = model.tokenize(["no acute findings", "cardiomegaly"])
  drawn = model.prior.generate(
    model.graphdef, model.state, tokens["input_ids"], tokens["attention_mask"], steps=3
  )
  assert drawn["codes_top"].shape == (2, g // 2, g // 2)
  assert drawn["codes_bottom"].shape == (2, g, g, 2)
  assert drawn["images"].shape == (2, 48, 48, 3)
  # The images are the decoder's reading of the two codebooks' sum at every cell.
  decoded = model.module.vqvae.decode_codes(
    jnp.asarray(drawn["codes_top"]), jnp.asarray(drawn["codes_bottom"])
  )
  np.testing.assert_allclose(drawn["images"], np.clip(decoded, 0, 1), rtol=1e-5, atol=1e-5)
