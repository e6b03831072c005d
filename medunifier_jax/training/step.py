"""The training step: a pure function `(state, batch, rng) -> (state, metrics)`.

`make_train_step` builds the Python function; `jit_train_step` compiles it once with explicit
in/out shardings and the state donated. The step's randomness (dropout, ITM negative sampling)
comes from `fold_in(rng, step)`, so a resumed run reproduces the uninterrupted one.

Mixed precision: `config.compute_dtype = "bfloat16"` builds the model with a bf16 compute dtype
(`state.default_model_fn`): its layers cast the fp32 parameters at use, so the optimizer keeps
fp32 master weights and gradients arrive in fp32. Losses are reduced in fp32.
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from medunifier_jax.training import optimizer as optimizer_lib
from medunifier_jax.training import sharding as sharding_lib
from medunifier_jax.training import tracing

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
Batch = dict[str, jax.Array]
# What the pre-training step reads from a batch (docs/ARCHITECTURE.md, "Batches").
BATCH_KEYS = ("image", "target_image", "input_ids", "attention_mask")


def default_loss_fn(config: ml_collections.ConfigDict) -> LossFn:
  """`objectives.compute_losses` with the config's objective weights and label smoothing."""
  from medunifier_jax import objectives

  return functools.partial(
      objectives.compute_losses,
      weights={k: float(v) for k, v in config.loss_weights.items()},
      label_smoothing=float(config.label_smoothing),
      train=True,
      # A config without the key predates the option: it keeps the behaviour it was run with.
      duplicate_aware=bool(config.get("duplicate_aware_negatives", False)),
  )


def make_train_step(
    graphdef: nnx.GraphDef,
    config: ml_collections.ConfigDict,
    loss_fn: LossFn | None = None,
) -> Callable[[nnx.State, Batch, jax.Array], tuple[nnx.State, dict[str, jax.Array]]]:
  """Returns the pure step for the train state described by `graphdef`.

  Args:
    graphdef: from `state.abstract_train_state`.
    config: the run config (`model.vit.frozen`, optimizer values).
    loss_fn: `(model, batch, rng) -> (total, metrics)`; defaults to the four objectives.

  The returned function maps `(state, batch, rng)` to `(new_state, metrics)`, where metrics
  are scalars: the loss function's, plus `learning_rate` (used for this update) and
  `grad_norm` (before clipping). After the update it calls the model's
  `constrain_parameters()` when the model has one (MedUnifier clamps its temperature there).
  """
  loss_fn = loss_fn or default_loss_fn(config)
  trainable = optimizer_lib.trainable_filter(config.model)
  schedule = optimizer_lib.learning_rate_schedule(config)

  def train_step(state: nnx.State, batch: Batch, rng: jax.Array):
    # This body runs only while JAX traces it.
    with tracing.cheap_tracer_diagnostics():
      return _traced_step(state, batch, rng)

  def _traced_step(state: nnx.State, batch: Batch, rng: jax.Array):
    train_state = nnx.merge(graphdef, state)
    model, opt = train_state.model, train_state.optimizer
    step = opt.step.get_value()
    step_rng = jax.random.fold_in(rng, step)
    model_def, params, frozen, rest = nnx.split(model, trainable, nnx.Param, ...)
    # Pure dicts cross the grad boundary: NNX variables may only be mutated (batch statistics)
    # at the trace level that created them.
    params, frozen, rest = map(nnx.to_pure_dict, (params, frozen, rest))

    def objective(params, frozen, rest):
      m = nnx.merge(model_def, params, frozen, rest)
      total, metrics = loss_fn(m, batch, step_rng)
      new_rest = nnx.to_pure_dict(nnx.state(m, nnx.Not(nnx.Param)))
      return total.astype(jnp.float32), (metrics, new_rest)

    (_, (metrics, new_rest)), grads = jax.value_and_grad(objective, has_aux=True)(
        params, frozen, rest
    )
    # Batch statistics keep their own (fp32) dtype whatever dtype the forward pass used.
    new_rest = jax.tree.map(lambda new, old: new.astype(old.dtype), new_rest, rest)
    rest_state = nnx.state(model, nnx.Not(nnx.Param))
    nnx.replace_by_pure_dict(rest_state, new_rest)
    nnx.update(model, rest_state)
    grad_state = nnx.state(model, trainable)
    nnx.replace_by_pure_dict(grad_state, grads)
    opt.update(model, grad_state)
    # Parameters with bounds (the ITC temperature) go back inside them after the update, as
    # BLIP-2 clamps its stored temperature; the forward pass used them unclipped, so their
    # gradient was never cut off at a bound.
    constrain = getattr(model, "constrain_parameters", None)
    if constrain is not None:
      constrain()
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    metrics["learning_rate"] = jnp.asarray(schedule(step), jnp.float32)
    metrics["grad_norm"] = optax.tree.norm(grads).astype(jnp.float32)
    return nnx.state(train_state), metrics

  return train_step


def jit_train_step(
    step_fn: Callable,
    state_shardings: nnx.State,
    mesh: Mesh,
    rules: Any,
    compiler_options: dict[str, Any] | None = None,
):
  """`jax.jit` with the state sharded by its rules, the batch over `data`, the state donated.

  `compiler_options` are XLA debug options for this function only (e.g.
  `{"xla_backend_optimization_level": 0}` trades step time for compile time).
  """
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(
      step_fn,
      in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh, rules), replicated),
      out_shardings=(state_shardings, replicated),
      donate_argnums=0,
      compiler_options=compiler_options,
  )


def abstract_batch(
    config: ml_collections.ConfigDict, mesh: Mesh, global_batch: int | None = None
) -> Batch:
  """`ShapeDtypeStruct`s (with the batch sharding) for one training batch of the config."""
  b = int(global_batch or config.batch_size)
  s, t = int(config.model.vit.image_size), int(config.model.max_text_len)
  sh = sharding_lib.batch_sharding(mesh, config.sharding_rules)
  sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
  return {
      "image": sds((b, s, s, 3), jnp.float32),
      "target_image": sds((b, s, s, 3), jnp.float32),
      "input_ids": sds((b, t), jnp.int32),
      "attention_mask": sds((b, t), jnp.int32),
  }


def random_batch(config: ml_collections.ConfigDict, seed: int = 0, global_batch: int | None = None):
  """A synthetic batch with the training batch's shapes (benchmarks and tests), host numpy."""
  import numpy as np

  rs = np.random.RandomState(seed)
  b = int(global_batch or config.batch_size)
  s, t = int(config.model.vit.image_size), int(config.model.max_text_len)
  qf = config.model.qformer
  target = rs.rand(b, s, s, 3).astype(np.float32)
  mean, std = np.asarray(config.data.image_mean, np.float32), np.asarray(config.data.image_std)
  lengths = rs.randint(t // 4, t + 1, size=b)
  mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int32)
  # Ids avoid the special tokens at the start of the vocabulary and [DEC] at its end.
  ids = rs.randint(5, int(qf.dec_token_id), size=(b, t)).astype(np.int32)
  ids[:, 0] = int(qf.cls_token_id)
  ids = np.where(mask == 1, ids, int(qf.pad_token_id)).astype(np.int32)
  return {
      "image": ((target - mean) / std).astype(np.float32),
      "target_image": target,
      "input_ids": ids,
      "attention_mask": mask,
  }
