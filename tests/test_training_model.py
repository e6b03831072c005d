"""The training step on the real (tiny) MedUnifier: sharding parity across meshes, a frozen ViT,
no retracing, and the paper configuration lowered ahead of time for 8 devices."""

import chex
import jax
import numpy as np
import pytest
from flax import nnx

from configs.pretrain import get_config, sharding_rules
from medunifier_jax import pretraining
from medunifier_jax.training import aot, loop
from medunifier_jax.training import mesh as mesh_lib
from medunifier_jax.training import state as state_lib
from medunifier_jax.training import step as step_lib

NUM_STEPS = 3
# (data, model) meshes over the 8 simulated devices; None: a single device; "fsdp": parameters
# and optimizer state also split over the data axis (`pretrain.sharding_rules(fsdp=True)`).
# Each mesh costs a compile (about a minute on 2 cores): pure data parallelism, both axes with
# the model axis the larger, and both axes with FSDP cover the rules without a plain (4, 2).
MESHES = (None, (8, 1), (2, 4), (4, 2, "fsdp"))
# The runs differ only in how XLA partitions the computation: the order of reductions in the
# gradient all-reduce and in the gathered ITC/ITM similarities changes, each op rounding
# differently at float32 (relative 1e-7). Dropout and ITM negatives are identical
# (partitionable threefry: random bits do not depend on sharding). Over three Adam steps the
# differences stay below 1e-5 relative; 1e-4 is a margin that still fails a real error (ITC
# negatives from one device's shard change the ITC loss by several percent).
RTOL = 1e-4


def frozen_tiny():
  config = get_config("tiny")
  with config.unlocked():
    config.model.vit.frozen = True
  return config


def make_mesh(shape):
  if shape is None:
    return mesh_lib.make_mesh([("data", 1), ("model", 1)], devices=jax.devices()[:1])
  return mesh_lib.make_mesh([("data", shape[0]), ("model", shape[1])])


@pytest.fixture(scope="module")
def runs():
  """`{mesh: (state before, state after, metrics per step, jitted step)}`, NUM_STEPS each.

  Every mesh starts from the same initial state (initialised once, then placed with that
  mesh's shardings) and sees the same batches and base key.
  """
  config = frozen_tiny()
  _, _, shardings = state_lib.abstract_train_state(config, make_mesh(None), pretraining.model_fn)
  initial = jax.device_get(state_lib.init_train_state(config, shardings, pretraining.model_fn))
  out = {}
  fsdp = frozen_tiny()
  with fsdp.unlocked():
    fsdp.sharding_rules = sharding_rules(fsdp=True)
  for shape in MESHES:
    mesh = make_mesh(shape)
    config = fsdp if shape is not None and "fsdp" in shape else frozen_tiny()
    graphdef, _, shardings = state_lib.abstract_train_state(config, mesh, pretraining.model_fn)
    state = jax.device_put(initial, shardings)
    # chex raises in here if the step is ever traced a second time (its counter is keyed by
    # the function's code, which every mesh shares).
    chex.clear_trace_counter()
    fn = chex.assert_max_traces(
      step_lib.make_train_step(graphdef, config, pretraining.loss_fn(config)), n=1
    )
    train_step = step_lib.jit_train_step(fn, shardings, mesh, config.sharding_rules)
    rng, metrics = jax.random.key(config.seed), []
    for i in range(NUM_STEPS):
      batch = loop.to_global(pretraining.random_batch(config, seed=i), mesh, config.sharding_rules)
      state, m = train_step(state, batch, rng)
      metrics.append(jax.device_get(m))
    out[shape] = (
      nnx.to_pure_dict(initial),
      jax.device_get(nnx.to_pure_dict(state)),
      metrics,
      train_step,
    )
  return out


# The `runs` fixture compiles and runs the step on every mesh: these are left out of
# `make test-fast`.
@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES[1:])
def test_meshes_give_the_single_device_losses(runs, shape):
  _, _, reference, _ = runs[None]
  _, _, metrics, _ = runs[shape]
  for key in ("loss", "loss_itc", "loss_itm", "loss_itg", "loss_tig"):
    want = np.array([float(m[key]) for m in reference])
    got = np.array([float(m[key]) for m in metrics])
    assert np.all(want > 0), key
    np.testing.assert_allclose(got, want, rtol=RTOL, err_msg=f"{key} on mesh {shape}")


@pytest.mark.slow
def test_training_moves_the_loss(runs):
  _, _, metrics, _ = runs[None]
  losses = [float(m["loss"]) for m in metrics]
  assert np.all(np.isfinite(losses)) and len(set(losses)) == NUM_STEPS


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES)
def test_frozen_vit_is_bit_identical_and_has_no_optimizer_state(runs, shape):
  before, after, _, _ = runs[shape]
  chex.assert_trees_all_equal(after["model"]["vit"], before["model"]["vit"])
  # The Q-Former did train.
  moved = jax.tree.map(
    lambda a, b: not np.array_equal(a, b), after["model"]["qformer"], before["model"]["qformer"]
  )
  assert any(jax.tree.leaves(moved))
  adam = after["optimizer"]["opt_state"][1][0]
  assert set(adam["mu"]) == set(after["model"]) - {"vit"}
  assert set(adam["nu"]) == set(after["model"]) - {"vit"}
  assert int(after["optimizer"]["step"]) == NUM_STEPS


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES)
def test_step_is_not_retraced(runs, shape):
  # NUM_STEPS calls of the jitted step: chex.assert_max_traces(n=1) would have raised in the
  # fixture on a second trace, and the jit cache holds a single executable.
  assert runs[shape][3]._cache_size() == 1


def test_paper_step_lowers_for_eight_devices_from_abstract_inputs():
  config = get_config("paper")
  mesh = mesh_lib.make_mesh(config.mesh)
  assert dict(mesh.shape) == {"data": 8, "model": 1}
  lowered = aot.lower_train_step(config, mesh, pretraining.task(config))
  text = lowered.as_text(debug_info=False)
  assert "num_partitions = 8" in text
  # The (256, 224, 224, 3) image batch is split 8 ways along its batch dimension.
  assert '<["data"=8, "model"=1]>' in text
  assert 'tensor<256x224x224x3xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"data"}' in text
  state_info, _, _ = lowered.args_info[0]
  # ViT-g/14 is in the state (about 1B parameters) but frozen: no Adam moments for it.
  vit = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(state_info["model"]["vit"]))
  assert 0.9e9 < vit < 1.1e9
  adam = state_info["optimizer"]["opt_state"][1][0]
  assert "vit" not in adam["mu"] and "qformer" in adam["mu"]


def test_fsdp_rules_split_parameters_and_moments_over_the_data_axis():
  config = frozen_tiny()
  with config.unlocked():
    config.sharding_rules = sharding_rules(fsdp=True)
  _, abstract, _ = state_lib.abstract_train_state(config, make_mesh((4, 2)), pretraining.model_fn)
  specs = {
    jax.tree_util.keystr(p): a.sharding.spec
    for p, a in jax.tree_util.tree_leaves_with_path(abstract)
  }
  over_data = [k for k, s in specs.items() if any(x == "data" for x in s)]
  assert any("['model']['qformer']" in k for k in over_data)
  assert any("['opt_state']" in k and "['mu']" in k for k in over_data)
  # Only scalars and vectors without a data-split axis (biases, norms) stay whole.
  whole = [k for k, s in specs.items() if all(x is None for x in s)]
  assert all(
    np.prod(abstract_leaf.shape) < 4096
    for abstract_leaf in (
      a
      for p, a in jax.tree_util.tree_leaves_with_path(abstract)
      if jax.tree_util.keystr(p) in whole
    )
  )
