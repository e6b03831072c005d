"""The train state: model + optimizer as one NNX module, split once into (graphdef, state).

The state is created directly with its final shardings (`jax.jit(init, out_shardings=...)`),
so no host ever holds a full unsharded copy of a large model.
"""

from typing import Any

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from medunifier_jax.training import optimizer as optimizer_lib
from medunifier_jax.training import sharding as sharding_lib
from medunifier_jax.training import tracing
from medunifier_jax.training.task import ModelFn


class TrainState(nnx.Module):
  """`model` (the task's module) and `optimizer` (`nnx.Optimizer`, holds the step count)."""

  def __init__(self, model: nnx.Module, optimizer: nnx.Optimizer):
    self.model = model
    self.optimizer = optimizer


def build_model(config: ml_collections.ConfigDict, model_fn: ModelFn) -> nnx.Module:
  """`model_fn` from `config.seed`, without eager sharding (shardings are applied by `jit`)."""
  with nnx.use_eager_sharding(False):
    return model_fn(config, nnx.Rngs(int(config.seed)))


def _make_train_state(config: ml_collections.ConfigDict, model_fn: ModelFn) -> TrainState:
  model = build_model(config, model_fn)
  return TrainState(model, optimizer_lib.make_optimizer(model, config))


def abstract_train_state(
  config: ml_collections.ConfigDict, mesh: Mesh, model_fn: ModelFn
) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """Shapes only: `(graphdef, abstract_state, shardings)`; nothing is allocated.

  `abstract_state` leaves are `jax.ShapeDtypeStruct`s that carry their `NamedSharding`, ready
  for `jax.jit(...).lower(...)` or an orbax restore target.
  """
  with tracing.cheap_tracer_diagnostics():
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: _make_train_state(config, model_fn)))
  shardings = sharding_lib.state_shardings(abstract, mesh, config.sharding_rules)
  abstract = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )
  return graphdef, abstract, shardings


def init_train_state(
  config: ml_collections.ConfigDict, shardings: nnx.State, model_fn: ModelFn
) -> nnx.State:
  """A freshly initialised state (from `config.seed`), created with its shardings."""
  init = jax.jit(lambda: nnx.state(_make_train_state(config, model_fn)), out_shardings=shardings)
  with tracing.cheap_tracer_diagnostics():
    lowered = init.lower()
  return lowered.compile()()


def step_of(state: nnx.State) -> int:
  """The optimizer's step count (the number of updates applied) as a Python int."""
  return int(jax.device_get(state["optimizer"]["step"].get_value()))


def count_params(state: nnx.State, filt: Any = nnx.Param) -> int:
  """Number of scalars in the model variables selected by `filt`."""
  sub = nnx.filter_state(state["model"], filt)
  return int(sum(x.size for x in jax.tree.leaves(sub)))
