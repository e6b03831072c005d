"""One way to build the model: training, `evaluate --random_init` and the API build alike;
the training engine imports nothing above itself."""

import ast
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from medunifier_jax import evaluation, model_io, pretraining
from medunifier_jax.training import mesh as mesh_lib
from medunifier_jax.training import state as state_lib
from tests.configs_util import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow  # about 20 s or more here: left out of `make test-fast`
def test_evaluate_random_init_builds_the_model_training_starts_from():
  config = load_config("tiny")
  mesh = mesh_lib.make_mesh([("data", 1), ("model", 1)], devices=jax.devices()[:1])
  _, _, shardings = state_lib.abstract_train_state(config, mesh, pretraining.model_fn)
  trained = nnx.to_pure_dict(
    jax.device_get(state_lib.init_train_state(config, shardings, pretraining.model_fn))["model"]
  )
  module, _, how = evaluation.load_model(config, "unused", random_init=True)
  evaluated = nnx.to_pure_dict(nnx.state(module))
  assert "random initialisation" in how
  assert jax.tree.structure(evaluated) == jax.tree.structure(trained)
  # Same seed, streams and initialisers: equal up to float rounding (the training state is
  # initialised by one jitted program, the evaluation model op by op).
  for a, b in zip(jax.tree.leaves(evaluated), jax.tree.leaves(trained), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  # The abstract build (what restores and imports fill) has the same tree and shapes.
  abstract = nnx.to_pure_dict(nnx.state(model_io.build_abstract(config)))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract) == jax.tree.map(
    lambda x: (x.shape, x.dtype), evaluated
  )


# Packages the engine may not import: it knows a model only through its Task.
ABOVE = (
  "evaluators",
  "weights",
  "data",
  "api",
  "report",
  "models",
  "objectives",
  "prior",
  "pretraining",
  "model_io",
  "inference",
)


def test_the_training_engine_imports_nothing_above_itself():
  offenders = []
  for path in sorted((ROOT / "medunifier_jax" / "training").glob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      names = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module:
        names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
      for name in names:
        parts = name.split(".")
        if parts[0] == "medunifier_jax" and len(parts) > 1 and parts[1] in ABOVE:
          offenders.append(f"{path.name}:{node.lineno} imports {name}")
  assert not offenders, offenders


def test_the_tracer_diagnostics_hook_still_exists_in_this_jax():
  """The engine blanks a private JAX diagnostic while tracing (training/tracing.py); a JAX
  upgrade that removes it must fail here rather than slow every large trace silently."""
  from medunifier_jax.training import tracing

  assert tracing.is_active()


def test_a_saved_config_without_a_later_model_field_loads_as_it_was_built(tmp_path):
  """A run saved before `vit.stem_channels` / `vqvae.bottom_depth` existed had no stem and one
  bottom code, whatever today's variant sets; fields the run saved are kept as they are."""
  import json

  from medunifier_jax.training import checkpoint as ckpt

  config = load_config("demo")
  # The demo variant sets other values today, so taking the variant's would fail below.
  assert config.model.vit.stem_channels != 0 and config.model.vqvae.bottom_depth != 1
  old, kept = tmp_path / "old", tmp_path / "kept"
  for workdir in (old, kept):
    ckpt.save_config(workdir, config)
  saved = json.loads((old / "config.json").read_text())
  del saved["model"]["vit"]["stem_channels"], saved["model"]["vqvae"]["bottom_depth"]
  (old / "config.json").write_text(json.dumps(saved))

  loaded = model_io.load_config(old)
  assert loaded.model.vit.stem_channels == 0
  assert loaded.model.vqvae.bottom_depth == 1
  again = model_io.load_config(kept)
  assert again.model.vit.stem_channels == config.model.vit.stem_channels
  assert again.model.vqvae.bottom_depth == config.model.vqvae.bottom_depth
