"""The training step: a pure function `(state, batch, rng) -> (state, metrics)`.

`make_train_step` builds the Python function; `jit_train_step` compiles it once with explicit
in/out shardings and the state donated. The step's randomness (dropout, ITM negative sampling)
comes from `fold_in(rng, step)`, so a resumed run reproduces the uninterrupted one.

Mixed precision: `config.compute_dtype = "bfloat16"` builds the model with a bf16 compute dtype
(`model_io.build`): its layers cast the fp32 parameters at use, so the optimizer keeps
fp32 master weights and gradients arrive in fp32. Losses are reduced in fp32.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from medunifier_jax import compile_options
from medunifier_jax.training import optimizer as optimizer_lib
from medunifier_jax.training import sharding as sharding_lib
from medunifier_jax.training import tracing
from medunifier_jax.training.task import LossFn

Batch = dict[str, jax.Array]


def make_train_step(
  graphdef: nnx.GraphDef, config: ml_collections.ConfigDict, loss_fn: LossFn
) -> Callable[[nnx.State, Batch, jax.Array], tuple[nnx.State, dict[str, jax.Array]]]:
  """Returns the pure step for the train state described by `graphdef`.

  Args:
    graphdef: from `state.abstract_train_state`.
    config: the run config (`model.vit.frozen`, optimizer values).
    loss_fn: `(model, batch, rng) -> (total, metrics)` (the task's).

  The returned function maps `(state, batch, rng)` to `(new_state, metrics)`, where metrics
  are scalars: the loss function's, plus `learning_rate` (used for this update) and
  `grad_norm` (before clipping). After the update it calls the model's
  `constrain_parameters()` when the model has one (MedUnifier clamps its temperature there).
  """
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
  `{"xla_backend_optimization_level": 0}` trades step time for compile time), on top of the
  project's (`compile_options.for_jit`).
  """
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(
    step_fn,
    in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh, rules), replicated),
    out_shardings=(state_shardings, replicated),
    donate_argnums=0,
    compiler_options=compile_options.for_jit(compiler_options),
  )


def abstract_batch(shapes: dict[str, jax.ShapeDtypeStruct], mesh: Mesh, rules: Any) -> Batch:
  """A task's batch shapes (`Task.abstract_batch`) with the batch sharding of `rules`."""
  sh = sharding_lib.batch_sharding(mesh, rules)
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh) for k, v in shapes.items()}
