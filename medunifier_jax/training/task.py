"""`Task`: what a training run trains. The engine (this package) knows nothing else of it.

The layers above supply tasks: `pretraining.task(config)` (the MedUnifier, its four objectives,
the report-image pipeline, the evaluators, `config.init_from` weight sources) and
`prior.train.task(config, workdir)` (the image prior over a frozen MedUnifier's codes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
from flax import nnx

# `model_fn(config, rngs) -> module`: the model, initialised from `rngs`.
ModelFn = Callable[[ml_collections.ConfigDict, nnx.Rngs], nnx.Module]
# `loss_fn(model, batch, rng) -> (scalar loss, {name: scalar})`.
LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
# `data_fn(config, workdir) -> iterator` of host-local batches (dicts of numpy arrays holding
# this process's slice of the global batch). Grain iterators also checkpoint their position.
DataFn = Callable[[ml_collections.ConfigDict, str], Iterator[dict[str, Any]]]
# `eval_fn(model, step) -> {name: value}`, run every `config.eval_every` steps and at the end.
EvalFn = Callable[[nnx.Module, int], dict[str, float]]
# `init_fn(model, log, workdir) -> description`: writes weights (arrays) into an abstract model
# (`nnx.eval_shape` of `model_fn`) for a run that starts without a checkpoint; variables it
# leaves abstract keep their fresh values. None: fresh initialisation.
InitFn = Callable[[nnx.Module, Callable[[str], None], str | None], str | None]


@dataclasses.dataclass(frozen=True)
class Task:
  """A model, its loss and its data, and the optional hooks of a run.

  Attributes:
    model_fn: builds the model (`ModelFn`).
    loss_fn: the training objective (`LossFn`).
    batch_keys: the batch entries the step reads (only these travel to the devices).
    abstract_batch: `(config, global_batch) -> {key: jax.ShapeDtypeStruct}` without shardings,
      for ahead-of-time lowering.
    data_fn: the training data (`DataFn`); needed by `loop.train`.
    eval_fn: `(config, workdir) -> EvalFn | None`, the periodic evaluation.
    init_fn: weights for a fresh start (`InitFn`).
    preflight: `(config, resuming) -> None`, checks run before the data pipeline and the
      compilation (a bad weight source should cost seconds); raises to stop the run.
  """

  model_fn: ModelFn
  loss_fn: LossFn
  batch_keys: tuple[str, ...]
  abstract_batch: Callable[[ml_collections.ConfigDict, int], dict[str, Any]] | None = None
  data_fn: DataFn | None = None
  eval_fn: Callable[[ml_collections.ConfigDict, str], EvalFn | None] | None = None
  init_fn: InitFn | None = None
  preflight: Callable[[ml_collections.ConfigDict, bool], None] | None = None

  def replace(self, **changes: Any) -> Task:
    """A copy with some fields replaced (tests swap the data or the evaluation)."""
    return dataclasses.replace(self, **changes)
