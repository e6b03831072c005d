"""Training system on a toy model: mesh and batch checks, sharding rules, the optimizer's
masks, frozen parameters, retracing, checkpoints, the non-finite-loss stop."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs.pretrain import get_config
from medunifier_jax import pretraining, supervised
from medunifier_jax.models.medunifier import MedUnifier
from medunifier_jax.training import checkpoint as ckpt
from medunifier_jax.training import logging as log_lib
from medunifier_jax.training import loop
from medunifier_jax.training import mesh as mesh_lib
from medunifier_jax.training import optimizer as opt_lib
from medunifier_jax.training import sharding as sharding_lib
from medunifier_jax.training import state as state_lib
from medunifier_jax.training import step as step_lib
from medunifier_jax.training.task import Task


class Toy(nnx.Module):
  """A stand-in with the parts the training system cares about: a `vit` subtree, logical axis
  names, an embedding table, a LayerNorm and a BatchNorm (batch statistics)."""

  def __init__(self, config, rngs):
    part = lambda axes: nnx.with_partitioning(nnx.initializers.lecun_normal(), axes)
    self.vit = nnx.Linear(3, 8, kernel_init=part(("embed", "mlp")), rngs=rngs)
    self.emb = nnx.Embed(config.model.qformer.vocab_size, 8, rngs=rngs)
    self.ln = nnx.LayerNorm(8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.out = nnx.Linear(8, 2, kernel_init=part(("mlp", "vocab")), rngs=rngs)


def toy_loss(model, batch, rng):
  h = model.vit(batch["image"].mean((1, 2)))
  h = model.bn(model.ln(h + model.emb(batch["input_ids"]).mean(1)), use_running_average=False)
  h = h + 0.01 * jax.random.normal(rng, h.shape)
  loss = jnp.mean((model.out(h) - batch["target_image"].mean((1, 2, 3))[:, None]) ** 2)
  return loss, {k: loss for k in ("loss", "loss_itc", "loss_itm", "loss_itg", "loss_tig")}


def toy_model_fn(config, rngs):
  return Toy(config, rngs)


def tiny(**overrides):
  config = get_config("tiny")
  with config.unlocked():
    for key, value in overrides.items():
      target = config
      *parents, leaf = key.split(".")
      for p in parents:
        target = target[p]
      target[leaf] = value
  return config


def synthetic_data(config, workdir=None):
  i = 0
  while True:
    yield pretraining.random_batch(config, seed=i)
    i += 1


def train_toy(
  config,
  workdir,
  *,
  model_fn=toy_model_fn,
  loss_fn=toy_loss,
  data_fn=synthetic_data,
  show_progress=False,
):
  task = Task(
    model_fn=model_fn, loss_fn=loss_fn, batch_keys=pretraining.BATCH_KEYS, data_fn=data_fn
  )
  return loop.train(config, workdir, task, show_progress=show_progress)


# ------------------------------------------------------------------------------------ mesh


def test_mesh_fills_in_minus_one():
  mesh = mesh_lib.make_mesh([("data", -1), ("model", 2)])
  assert dict(mesh.shape) == {"data": 4, "model": 2}
  assert mesh_lib.resolve_mesh_shape([("data", 2), ("model", 4)], 8) == (("data", "model"), (2, 4))


@pytest.mark.parametrize(
  "axes, fix",
  [
    ([("data", 16), ("model", 1)], "asks for 16 devices but 8 are available"),
    ([("data", -1), ("model", 3)], "does not divide the 8 devices"),
    ([("data", -1), ("model", -1)], "at most one may be -1"),
    ([("data", 0), ("model", -1)], "must be positive or -1"),
  ],
)
def test_mis_sized_mesh_says_what_to_change(axes, fix):
  with pytest.raises(ValueError, match=fix):
    mesh_lib.make_mesh(axes)


def test_batch_not_divisible_fails_before_training(tmp_path):
  config = tiny(batch_size=6, mesh=[("data", 4), ("model", 2)])
  calls = []
  with pytest.raises(ValueError, match=r"batch_size=6 is not divisible by the data-parallel"):
    train_toy(
      config,
      str(tmp_path),
      model_fn=toy_model_fn,
      loss_fn=toy_loss,
      data_fn=lambda c, w: calls.append(1),
    )
  assert not calls and not (tmp_path / "checkpoints").exists()


# -------------------------------------------------------------------------------- sharding


def test_logical_rules_map_to_mesh_axes():
  mesh = mesh_lib.make_mesh([("data", 2), ("model", 4)])
  rules = sharding_lib.rules_dict(get_config("tiny").sharding_rules)
  spec = lambda names, shape: sharding_lib.logical_to_spec(names, shape, mesh, rules)
  assert spec(("embed", "mlp"), (32, 64)) == P(None, "model")
  assert spec(("vocab", "embed"), (512, 32)) == P("model", None)
  # Not divisible by the model axis (an unpadded 513-token vocabulary): an error naming the
  # logical axis, the rule, both sizes and the fixes, not a silent replication.
  with pytest.raises(
    ValueError,
    match=r"logical axis 'vocab' has size 513, which its rule "
    r"\('vocab', 'model'\) .* mesh axis 'model' has size 4 .* pad the dimension "
    r"to a multiple of 4, e.g. 516 \(for the Q-Former's vocabulary: "
    r"model.qformer.vocab_size.*\), or map the logical axis to None",
  ):
    spec(("vocab", "embed"), (513, 32))
  # One mesh axis is used at most once per array, and a later dimension it would not divide
  # stays replicated rather than failing: that axis is taken.
  assert spec(("heads", "mlp"), (8, 64)) == P("model", None)
  assert spec(("mlp", "vocab"), (64, 513)) == P("model", None)
  with pytest.raises(ValueError, match="no entry in config.sharding_rules"):
    spec(("nonsense",), (4,))


def test_state_shardings_follow_the_rules():
  config = tiny()
  mesh = mesh_lib.make_mesh([("data", 2), ("model", 4)])
  _, abstract, shardings = state_lib.abstract_train_state(config, mesh, toy_model_fn)
  assert shardings["model"]["vit"]["kernel"].get_value().spec == P(None, "model")
  assert shardings["model"]["out"]["kernel"].get_value().spec == P("model", None)
  # Adam's moments shard like their parameter.
  mu = shardings["optimizer"]["opt_state"][1][0]["mu"]["out"]["kernel"].get_value()
  assert mu.spec == P("model", None)
  assert abstract["model"]["vit"]["kernel"].get_value().sharding.spec == P(None, "model")


def test_an_unpadded_vocabulary_on_a_model_axis_fails_naming_the_weight():
  config = tiny(**{"model.qformer.vocab_size": 513}, mesh=[("data", 4), ("model", 2)])
  mesh = mesh_lib.make_mesh(config.mesh)
  with pytest.raises(
    ValueError,
    match=r"^model/qformer/embeddings/word_embeddings/embedding "
    r"\(513, 32\): logical axis 'vocab' has size 513",
  ):
    state_lib.abstract_train_state(config, mesh, pretraining.model_fn)


# ------------------------------------------------------------------------------- optimizer


def test_decay_mask_spares_biases_norms_and_embeddings():
  model = state_lib.build_model(tiny(), toy_model_fn)
  mask = nnx.to_pure_dict(opt_lib.decay_mask(nnx.state(model, nnx.Param)))
  assert mask["vit"]["kernel"] and mask["out"]["kernel"]
  assert not mask["vit"]["bias"] and not mask["out"]["bias"]
  assert not mask["ln"]["scale"] and not mask["bn"]["scale"]
  assert not mask["emb"]["embedding"]


def test_schedule_warms_up_then_decays_to_the_end_value():
  config = tiny(warmup_steps=10, num_steps=100, learning_rate=1e-3, end_learning_rate=1e-6)
  lr = opt_lib.learning_rate_schedule(config)
  assert float(lr(0)) == 0.0
  np.testing.assert_allclose(float(lr(5)), 5e-4, rtol=1e-6)
  np.testing.assert_allclose(float(lr(10)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(lr(100)), 1e-6, rtol=1e-4)
  assert float(lr(55)) < float(lr(30))


def test_lr_multiplier_scales_one_submodules_updates_and_refuses_unknown_names():
  """Factor 2 on `out` doubles AdamW's update of its parameters (weight decay included) and
  leaves every other update as it is; a name no parameter has is an error."""
  params = nnx.state(state_lib.build_model(tiny(), toy_model_fn), nnx.Param)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)

  def first_update(**multipliers):
    tx = opt_lib.make_tx(tiny(learning_rate=1e-2, warmup_steps=0, lr_multipliers=multipliers))
    updates, _ = tx.update(grads, tx.init(params), params)
    return nnx.to_pure_dict(updates)

  plain, doubled = first_update(), first_update(out=2.0)
  assert jax.tree.all(jax.tree.map(np.array_equal, first_update(out=1.0), plain))
  for name in plain:
    factor = 2.0 if name == "out" else 1.0
    for a, b in zip(jax.tree.leaves(plain[name]), jax.tree.leaves(doubled[name])):
      np.testing.assert_allclose(b, factor * a, rtol=1e-6)
  assert float(jnp.abs(plain["out"]["kernel"]).max()) > 0
  with pytest.raises(ValueError, match="'vqvae'"):
    first_update(vqvae=2.0)


def test_lr_multiplier_for_the_vqvae_reaches_its_parameters_only():
  """The MedUnifier's `vqvae` multiplier marks the VQ-VAE's parameters and nothing else, and the
  supervised ViT trained beside it (the fidelity classifier) leaves the multipliers out."""
  config = tiny(**{"lr_multipliers.vqvae": 2.0})
  model = nnx.eval_shape(lambda: MedUnifier(config.model, rngs=nnx.Rngs(0)))
  mask = nnx.to_pure_dict(opt_lib.under_module("vqvae")(nnx.state(model, nnx.Param)))
  assert all(jax.tree.leaves(mask["vqvae"]))
  assert not any(jax.tree.leaves({k: v for k, v in mask.items() if k != "vqvae"}))
  nnx.eval_shape(lambda: supervised.new_encoder(config))


# ---------------------------------------------------------------- frozen parameters, retrace


@pytest.fixture(scope="module")
def frozen_run():
  """Three jitted steps of the toy with `model.vit.frozen=True` on a (4, 2) mesh."""
  config = tiny(**{"model.vit.frozen": True, "mesh": [("data", 4), ("model", 2)]})
  mesh = mesh_lib.make_mesh(config.mesh)
  graphdef, _, shardings = state_lib.abstract_train_state(config, mesh, toy_model_fn)
  state = state_lib.init_train_state(config, shardings, toy_model_fn)
  before = jax.device_get(nnx.to_pure_dict(state))
  # Fails with an AssertionError if the step is traced a second time.
  fn = chex.assert_max_traces(step_lib.make_train_step(graphdef, config, toy_loss), n=1)
  train_step = step_lib.jit_train_step(fn, shardings, mesh, config.sharding_rules)
  data, rng, losses = synthetic_data(config), jax.random.key(0), []
  for _ in range(3):
    state, metrics = train_step(state, loop.to_global(next(data), mesh, config.sharding_rules), rng)
    losses.append(float(metrics["loss"]))
  return before, jax.device_get(nnx.to_pure_dict(state)), losses, train_step


def test_frozen_vit_gets_no_update_and_no_optimizer_state(frozen_run):
  before, after, losses, _ = frozen_run
  for name in ("kernel", "bias"):
    np.testing.assert_array_equal(after["model"]["vit"][name], before["model"]["vit"][name])
  assert not np.array_equal(after["model"]["out"]["kernel"], before["model"]["out"]["kernel"])
  adam = after["optimizer"]["opt_state"][1][0]
  assert "vit" not in adam["mu"] and "vit" not in adam["nu"]
  assert set(adam["mu"]) == {"emb", "ln", "bn", "out"}
  # Batch statistics moved (they are state, not parameters).
  assert not np.array_equal(after["model"]["bn"]["mean"], before["model"]["bn"]["mean"])
  assert int(after["optimizer"]["step"]) == 3 and all(np.isfinite(losses))


def test_step_is_not_retraced(frozen_run):
  *_, train_step = frozen_run
  # chex.assert_max_traces(n=1) inside the step raised if any call had retraced; the jit
  # cache holds exactly one executable.
  assert train_step._cache_size() == 1


# ------------------------------------------------------- bounded temperature, ln_vision


class TempToy(Toy):
  """The toy with MedUnifier's temperature: its parameter, bounds and both methods."""

  temperature = MedUnifier.temperature
  constrain_parameters = MedUnifier.constrain_parameters

  def __init__(self, config, rngs):
    super().__init__(config, rngs)
    self.temp = nnx.Param(jnp.asarray(2.0, jnp.float32))  # above temperature_max
    self.temperature_min = float(config.model.temperature_min)
    self.temperature_max = float(config.model.temperature_max)


def test_a_temperature_outside_its_bounds_comes_back_after_one_step():
  config = tiny(mesh=[("data", 8), ("model", 1)])
  mesh = mesh_lib.make_mesh(config.mesh)
  model_fn = lambda config, rngs: TempToy(config, rngs)
  graphdef, _, shardings = state_lib.abstract_train_state(config, mesh, model_fn)
  state = state_lib.init_train_state(config, shardings, model_fn)

  def loss(model, batch, rng):
    base, metrics = toy_loss(model, batch, rng)
    return base + 0.1 * model.temperature(), metrics

  train_step = step_lib.jit_train_step(
    step_lib.make_train_step(graphdef, config, loss), shardings, mesh, config.sharding_rules
  )
  batch = loop.to_global(next(synthetic_data(config)), mesh, config.sharding_rules)
  state, _ = train_step(state, batch, jax.random.key(0))
  after = jax.device_get(nnx.to_pure_dict(state))
  assert after["model"]["temp"] == config.model.temperature_max  # clamped after the update
  # Adam's first moment is (1 - b1) * gradient: the gradient reached the temperature although
  # it lay outside the bounds (a clip in the forward pass would have given exactly 0).
  assert after["optimizer"]["opt_state"][1][0]["mu"]["temp"] != 0


def test_trainable_filter_freezes_the_vit_blocks_but_not_ln_vision():
  config = get_config("tiny")
  with config.unlocked():
    config.model.vit.frozen = True
  model = nnx.eval_shape(lambda: MedUnifier(config.model, rngs=nnx.Rngs(0)))
  trainable = nnx.state(model, opt_lib.trainable_filter(config.model))
  assert "vit" not in trainable and "ln_vision" in trainable and "qformer" in trainable
  assert set(nnx.state(model, nnx.Param)) - set(trainable) == {"vit"}


# ------------------------------------------------------------------ checkpoints, NaN stop


def test_checkpoint_round_trip_restores_state_rng_and_shardings(tmp_path):
  config = tiny(mesh=[("data", 2), ("model", 4)])
  mesh = mesh_lib.make_mesh(config.mesh)
  _, abstract, shardings = state_lib.abstract_train_state(config, mesh, toy_model_fn)
  state = state_lib.init_train_state(config, shardings, toy_model_fn)
  rng = jax.random.key(7)
  manager = ckpt.make_manager(tmp_path, config)
  assert ckpt.save(manager, 3, state, rng, force=True)
  manager.wait_until_finished()
  restored, rng2 = ckpt.restore(manager, 3, abstract)
  manager.close()
  chex.assert_trees_all_equal(nnx.to_pure_dict(restored), nnx.to_pure_dict(state))
  np.testing.assert_array_equal(jax.random.key_data(rng2), jax.random.key_data(rng))
  kernel = restored["model"]["vit"]["kernel"].get_value()
  assert kernel.sharding.spec == P(None, "model")


def test_checkpoint_of_another_model_size_names_the_differences_and_the_fix(tmp_path):
  config = tiny(mesh=[("data", 8), ("model", 1)])
  mesh = mesh_lib.make_mesh(config.mesh)
  _, _, shardings = state_lib.abstract_train_state(config, mesh, toy_model_fn)
  manager = ckpt.make_manager(tmp_path, config)
  assert ckpt.save(
    manager,
    2,
    state_lib.init_train_state(config, shardings, toy_model_fn),
    jax.random.key(0),
    force=True,
  )
  manager.wait_until_finished()
  vocab = config.model.qformer.vocab_size
  bigger = tiny(mesh=[("data", 8), ("model", 1)], **{"model.qformer.vocab_size": vocab + 8})
  _, abstract, _ = state_lib.abstract_train_state(bigger, mesh, toy_model_fn)
  expected = rf"model/emb/embedding: checkpoint \({vocab}, 8\), config \({vocab + 8}, 8\)"
  with pytest.raises(ValueError, match=expected) as err:
    ckpt.restore(manager, 2, abstract)
  assert "config.json" in str(err.value) and "fresh --workdir" in str(err.value)
  manager.close()
  # The inference path (api.load) reads only the model and says the same.
  with pytest.raises(ValueError, match=expected):
    ckpt.restore_model_state(tmp_path, abstract["model"])


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  config = tiny(num_steps=12, checkpoint_every=4, log_every=100)

  def exploding_loss(model, batch, rng):
    loss, metrics = toy_loss(model, batch, rng)
    # A corrupt batch (negative mask) turns the loss into NaN, as overflowing logits would.
    loss = jnp.where(batch["attention_mask"].sum() < 0, jnp.nan, loss)
    return loss, {**metrics, "loss": loss}

  def data_fn(config, workdir):
    for i, batch in enumerate(synthetic_data(config)):
      if i >= 5:  # the 6th step sees a corrupt batch
        batch["attention_mask"] = -np.ones_like(batch["attention_mask"])
      yield batch

  with pytest.raises(log_lib.NonFiniteLossError, match="non-finite loss at step 6"):
    train_toy(
      config,
      str(tmp_path),
      model_fn=toy_model_fn,
      loss_fn=exploding_loss,
      data_fn=data_fn,
      show_progress=False,
    )
  manager = ckpt.make_manager(tmp_path, config, read_only=True)
  assert manager.all_steps() == [4]
  mesh = mesh_lib.make_mesh(config.mesh)
  _, abstract, _ = state_lib.abstract_train_state(config, mesh, toy_model_fn)
  restored, _ = ckpt.restore(manager, 4, abstract)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(nnx.to_pure_dict(restored)))
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [4]
  assert {"step", "loss", "loss_itc", "loss_itm", "loss_itg", "loss_tig", "learning_rate"} <= set(
    records[0]
  )


# ------------------------------------------------------ relative paths, failed saves, fallback


def test_relative_workdir_trains_saves_and_resumes(tmp_path, monkeypatch):
  """A relative workdir is resolved where it enters (orbax refuses relative paths)."""
  monkeypatch.chdir(tmp_path)
  config = tiny(num_steps=4, checkpoint_every=2, log_every=100)
  run = lambda: train_toy(
    config,
    "workdirs/rel",
    model_fn=toy_model_fn,
    loss_fn=toy_loss,
    data_fn=synthetic_data,
    show_progress=False,
  )
  assert run()["start"] == "fresh initialisation"
  assert sorted(int(p.name) for p in (tmp_path / "workdirs/rel/checkpoints").iterdir()) == [2, 4]
  with config.unlocked():
    config.num_steps = 6
  assert run()["start"] == "resumed from step 4"
  assert json.loads((tmp_path / "workdirs/rel/config.json").read_text())["num_steps"] == 6


def test_failed_save_stops_the_run_at_once(tmp_path, monkeypatch):
  """A save that fails in orbax's background thread stops training at the next step, with the
  cause and the fix, instead of training on without a checkpoint."""
  make_manager = ckpt.make_manager
  # A relative checkpoint path is one way to make every save fail (orbax refuses it).
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(
    loop.ckpt, "make_manager", lambda workdir, config: make_manager("unresolved", config)
  )
  config = tiny(num_steps=40, checkpoint_every=2, log_every=1)
  with pytest.raises(ckpt.CheckpointSaveError, match="step 2") as err:
    train_toy(
      config,
      str(tmp_path / "run"),
      model_fn=toy_model_fn,
      loss_fn=toy_loss,
      data_fn=synthetic_data,
      show_progress=False,
    )
  assert "run the same command again" in str(err.value)
  records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
  # Stopped before the next save was due, not at the end of the run.
  assert max(r["step"] for r in records) <= 4


def test_unreadable_checkpoints_are_set_aside_and_the_previous_one_restored(tmp_path):
  config = tiny(mesh=[("data", 8), ("model", 1)], keep_checkpoints=5)
  mesh = mesh_lib.make_mesh(config.mesh)
  _, abstract, shardings = state_lib.abstract_train_state(config, mesh, toy_model_fn)
  state = state_lib.init_train_state(config, shardings, toy_model_fn)
  manager = ckpt.make_manager(tmp_path, config)
  for step in (1, 2, 3):
    ckpt.save(manager, step, state, jax.random.key(step), force=True)
    manager.wait_until_finished()
  for array_file in (tmp_path / "checkpoints/3/state").rglob("d/*"):  # truncated data files
    array_file.write_bytes(array_file.read_bytes()[:10])
  (tmp_path / "checkpoints/2/state/_METADATA").unlink()
  notes = []
  restored, rng, step = ckpt.restore_newest_readable(manager, abstract, log=notes.append)
  assert step == 1
  np.testing.assert_array_equal(jax.random.key_data(rng), jax.random.key_data(jax.random.key(1)))
  chex.assert_trees_all_equal(nnx.to_pure_dict(restored), nnx.to_pure_dict(state))
  assert len(notes) == 2 and "step 3 cannot be restored" in notes[0]
  assert "_METADATA is missing" in notes[1]
  assert manager.all_steps() == [1]
  assert sorted(p.name for p in (tmp_path / "broken_checkpoints").iterdir()) == ["2", "3"]
  manager.close()
  # Inference reads the newest good checkpoint without changing the workdir.
  model_state, step = ckpt.restore_model_state(tmp_path, abstract["model"])
  assert step == 1


def test_a_batch_without_an_entry_the_step_reads_is_refused_by_name():
  # A custom data function that misses an entry (e.g. the alignment text a config asks for)
  # is named before anything travels to the devices, not a bare KeyError.
  mesh = mesh_lib.make_mesh([("data", -1), ("model", 1)])
  batch = {"image": np.zeros((8, 4), np.float32), "input_ids": np.zeros((8, 3), np.int32)}
  with pytest.raises(KeyError, match=r"lacks \['align_ids'\].*batch has \['image', 'input_ids'\]"):
    loop.to_global(batch, mesh, [], ("image", "input_ids", "align_ids"))
