"""`python -m medunifier_jax.predict`: the `predict` function on a tiny in-memory model, the
command-line parsing helpers, and the one-line errors of the command itself.

The model is the tiny configuration initialised in memory (no training, no workdir); running the
command on a trained workdir is left to the training CLI tests.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_runs import ROOT
from configs_util import load_config
from flax import nnx
from PIL import Image

from medunifier_jax import api, model_io, prediction
from medunifier_jax.data import tokenizer as tokenizer_lib

DECODING = dict(method="greedy", max_length=8)  # short greedy decoding: a quick compilation
TEXTS = ["no acute cardiopulmonary process", "small right pleural effusion"]


def numpy_weights(config):
  """The configured MedUnifier with weights drawn in NumPy into its abstract state: no
  initialiser is compiled (seconds saved). Norm scales and variances 1, biases and means 0,
  the temperature at its initial value, other weights N(0, 1 / fan-in)."""
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


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  config = load_config("tiny")
  corpus = TEXTS + ["the heart size is normal", "the lungs are clear", "mild cardiomegaly"]
  tokenizer = tokenizer_lib.get_tokenizer(config.data, corpus, str(tmp_path_factory.mktemp("t")))
  return api.Model(numpy_weights(config), config, tokenizer)


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory):
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  paths = []
  for i, shape in enumerate([(60, 50), (48, 48), (40, 70)]):
    path = root / f"image{i}.png"
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    paths.append(str(path))
  return paths


def test_predict_reports_similarities_and_match_probabilities(model, image_paths):
  # 3 images in batches of 2: the last batch is padded, the padding dropped.
  out = prediction.predict(model, image_paths, TEXTS, batch_size=2, **DECODING)
  assert [p["image"] for p in out] == image_paths
  assert all(isinstance(p["report"], str) for p in out)
  assert [[t["text"] for t in p["texts"]] for p in out] == [TEXTS] * 3

  # The same calls on the same batches (shapes (2, ...)) give the same numbers exactly.
  pixels = model.preprocess_images(image_paths)
  batches = [pixels[:2], pixels[[2, 2]]]
  tokens = model.tokenize(TEXTS)
  ids, mask = tokens["input_ids"], tokens["attention_mask"]
  similarity = np.concatenate([model.similarity(b, ids, mask) for b in batches])[:3]
  got = np.array([[t["similarity"] for t in p["texts"]] for p in out], np.float32)
  np.testing.assert_array_equal(got, similarity)
  reports = model.generate_reports(batches[0], **DECODING)
  assert [p["report"] for p in out[:2]] == reports

  # Matching probability: softmax of the row-aligned ITM logits, column 1 (match).
  n, m = len(image_paths), len(TEXTS)
  logits = model.itm_logits(
    np.repeat(pixels, m, axis=0), np.tile(ids, (n, 1)), np.tile(mask, (n, 1))
  ).astype(np.float64)
  expected = (np.exp(logits[:, 1]) / np.exp(logits).sum(-1)).reshape(n, m)
  prob = np.array([[t["match_probability"] for t in p["texts"]] for p in out])
  assert ((prob >= 0) & (prob <= 1)).all()
  np.testing.assert_allclose(prob, expected, atol=1e-5)

  table = prediction.format_table(out)
  assert f"== {image_paths[0]} ==" in table and f"report: {out[0]['report']}" in table
  assert f"{out[1]['texts'][1]['similarity']:10.4f}" in table


def test_predict_without_texts_gives_reports_only(model, image_paths):
  out = prediction.predict(model, image_paths[:2], batch_size=2, **DECODING)
  assert len(out) == 2 and all(p["texts"] == [] for p in out)
  with pytest.raises(TypeError, match="list of texts"):
    prediction.predict(model, image_paths, "one text")


def test_list_flags_take_the_following_values():
  argv = [
    "predict",
    "--workdir",
    "w",
    "--images",
    "a.png",
    "b.dcm",
    "--texts",
    "no acute",
    "effusion, small",
    "--json=out.json",
    "--images=c.jpg",
  ]
  assert prediction.expand_list_flags(argv) == [
    "predict",
    "--workdir",
    "w",
    "--images=a.png",
    "--images=b.dcm",
    "--texts=no acute",
    "--texts=effusion, small",
    "--json=out.json",
    "--images=c.jpg",
  ]


def test_missing_images_are_named(tmp_path, monkeypatch):
  present = tmp_path / "present.png"
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(present)
  monkeypatch.chdir(tmp_path)  # relative paths resolve against the current directory
  assert prediction.resolve_images(["present.png"]) == [str(present)]
  with pytest.raises(
    FileNotFoundError,
    match=f"1 of 2 image files do not exist: {tmp_path / 'absent.png'}; check the paths",
  ):
    prediction.resolve_images(["present.png", "absent.png"])


def _run_cli(cwd, *args):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  return subprocess.run(
    [sys.executable, "-m", "medunifier_jax.predict", *args],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )


def test_command_errors_are_one_line(tmp_path):
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png")
  (tmp_path / "empty_workdir").mkdir()
  # A missing image: named with its absolute path, before any model is loaded.
  run = _run_cli(tmp_path, "--workdir", "empty_workdir", "--images", "x.png", "absent.png")
  assert run.returncode != 0 and "Traceback" not in run.stderr
  assert f"predict: 1 of 2 image files do not exist: {tmp_path / 'absent.png'}" in run.stderr
  # A workdir without a checkpoint.
  run = _run_cli(tmp_path, "--workdir", "empty_workdir", "--images", "x.png")
  assert run.returncode != 0 and "Traceback" not in run.stderr
  assert "predict: " in run.stderr and "empty_workdir" in run.stderr
  assert not list(tmp_path.glob("*.json"))  # nothing written without --json
