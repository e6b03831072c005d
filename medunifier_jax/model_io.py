"""Building and restoring the project's models: the only constructors.

A run config names its model: pre-training configs (configs/pretrain.py) build the
`MedUnifier`, configs with `task = "prior"` (configs/prior.py) the text-conditioned image prior.

- `build(config)`: the module, initialised from `config.seed`, with the run's compute dtype
  and rematerialisation; what training, `evaluate --random_init` and the API build alike.
- `build_abstract(config)`: the same with `jax.ShapeDtypeStruct` leaves (nothing allocated).
- `build_with_weights(config, fill)`: imported weights written into the abstract module; only
  the variables no source filled are initialised.
- `restore(workdir)`: a workdir's model from its newest readable checkpoint (model weights
  only), with its run config.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from absl import logging
from flax import nnx

# Below this many initialised values (on CPU), the initialiser is compiled without optimisation.
SMALL_INIT = 1 << 24

# Fields of a saved run config whose absence means another value than today's variant gives:
# they were added with the model's behaviour of before as their base value, and a variant took
# another since, so a run saved before the field existed was built with the old value.
ABSENT_MEANS = {
  "model.vit.stem_channels": 0,  # no convolutional stem (the demo variant has one now)
  "model.vqvae.bottom_depth": 1,  # one code per bottom cell (the demo variant has two)
}


def is_prior(config: ml_collections.ConfigDict) -> bool:
  """Whether `config` describes an image prior run (configs/prior.py)."""
  return config.get("task") == "prior"


def build(
  config: ml_collections.ConfigDict, *, rngs: nnx.Rngs | None = None, inference: bool = False
) -> nnx.Module:
  """The model of the run config `config`, initialised from `config.seed`.

  Args:
    config: a full run config (`model`, `seed`, `compute_dtype`, `remat`).
    rngs: the initialisation streams; default `nnx.Rngs(config.seed)` (what training passes).
    inference: for the prior, leave out the frozen text encoder that training may carry (its
      weights are the MedUnifier's, which sampling takes from the MedUnifier itself).
  Returns:
    `MedUnifier(config.model)`, or `ConditionedPrior(config)` for a prior config.
  """
  rngs = rngs if rngs is not None else nnx.Rngs(int(config.get("seed", 0)))
  dtype = str(config.get("compute_dtype", "float32"))
  remat = bool(config.get("remat", False))
  if is_prior(config):
    from medunifier_jax.prior.model import ConditionedPrior

    return ConditionedPrior(
      config, rngs=rngs, dtype=dtype, remat=remat, with_text_encoder=False if inference else None
    )
  from medunifier_jax.models.medunifier import MedUnifier

  return MedUnifier(config.model, rngs=rngs, dtype=dtype, remat=remat)


def build_abstract(config: ml_collections.ConfigDict, *, inference: bool = False) -> nnx.Module:
  """`build(config)` with `jax.ShapeDtypeStruct` leaves: shapes only, nothing allocated."""
  return nnx.eval_shape(lambda: build(config, inference=inference))


def with_compute_dtype(config: ml_collections.ConfigDict, dtype: str | None):
  """A copy of `config` with `compute_dtype` set (the same config when `dtype` is None)."""
  if dtype is None or str(config.get("compute_dtype", "float32")) == dtype:
    return config
  config = ml_collections.ConfigDict(config.to_dict())
  config.compute_dtype = dtype
  return config


def build_with_weights(
  config: ml_collections.ConfigDict, fill: Callable[[nnx.Module], Any]
) -> tuple[nnx.Module, Any]:
  """`build(config)` with `fill`'s weights, initialising only the others.

  The model is first built abstractly (nothing allocated); `fill(module)` writes the imported
  weights into it and returns its report; one jitted initialiser then computes just the
  variables still abstract (XLA drops the rest), so a paper-size ViT is never drawn at random to
  be overwritten. Weights no source wrote equal `build(config)`'s.

  Returns:
    `(module, fill's report)`.
  """
  module = build_abstract(config)
  report = fill(module)
  pending = {
    path: var
    for path, var in nnx.iter_graph(module)
    if isinstance(var, nnx.Variable) and isinstance(var.get_value(), jax.ShapeDtypeStruct)
  }
  if pending:
    wanted = set(pending)

    def initial_values():
      return {p: v.get_value() for p, v in nnx.iter_graph(build(config)) if p in wanted}

    size = sum(v.get_value().size for v in pending.values())
    options = None
    if jax.default_backend() == "cpu" and size < SMALL_INIT:
      # Compiling dozens of small samplers dominates here; unoptimised code halves it.
      options = {"xla_backend_optimization_level": "0"}
    for path, value in jax.jit(initial_values).lower().compile(options)().items():
      pending[path].set_value(value)
  return module, report


@dataclasses.dataclass
class Restored:
  """A model restored from a training workdir."""

  module: nnx.Module  # MedUnifier, or ConditionedPrior in its inference form
  config: ml_collections.ConfigDict  # the run's config (or the caller's)
  workdir: str
  step: int  # the checkpoint step the weights come from


def load_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The run config a training workdir was started with (`WORKDIR/config.json`), with tuples
  where the config files have them and its derived fields linked again (`config_lib.derive`).

  A run saved by an earlier version of the project lacks the fields added since (e.g.
  `evals.image_gen.candidates`): they take today's values for the run's variant in its config
  file (configs/pretrain.py, or configs/prior.py for a prior), and are logged by name; the
  model fields in `ABSENT_MEANS` take the value the run was built with instead.
  """
  from medunifier_jax import config_lib
  from medunifier_jax.training import checkpoint as ckpt

  config = config_lib.tuples_from_json(ckpt.load_config(workdir))
  if not is_prior(config):
    before = config_lib.fill_absent(config, ABSENT_MEANS)
    if before:
      logging.info(
        "%s/config.json predates %s; the run was built with %s",
        os.fspath(workdir),
        ", ".join(before),
        ", ".join(f"{k}={ABSENT_MEANS[k]}" for k in before),
      )
  path = config_lib.CONFIG_DIR / ("prior.py" if is_prior(config) else config_lib.DEFAULT_FILE)
  module = config_lib.load_module(path)
  variant = config.get("variant")
  reference = module.get_config(variant if variant in module.VARIANTS else None)
  added = config_lib.fill_missing(config, reference)
  if added:
    logging.info(
      "%s/config.json predates %d field(s); they take the values of %s:%s: %s",
      os.fspath(workdir),
      len(added),
      path.name,
      reference.get("variant"),
      ", ".join(added),
    )
  return config_lib.derive(config)


def restore(
  workdir: str, config: ml_collections.ConfigDict | None = None, *, compute_dtype: str | None = None
) -> Restored:
  """The model of a training workdir, from its newest readable checkpoint.

  Only the model's variables are read (no optimizer state; for a prior, not the frozen text
  encoder). A newest checkpoint that does not read back is reported and the one before it is
  used; the workdir is not changed.

  Args:
    workdir: a training work directory (local or `gs://`).
    config: the run config to build with; default the workdir's own (`config.json`).
    compute_dtype: overrides the config's compute dtype ("float32" / "bfloat16").
  Raises:
    FileNotFoundError: no config.json, or no checkpoint that reads back.
    CheckpointMismatchError: the checkpoint holds another model than the config describes.
  """
  from medunifier_jax.training import checkpoint as ckpt

  config = with_compute_dtype(config if config is not None else load_config(workdir), compute_dtype)
  module = build_abstract(config, inference=True)  # every variable comes from the checkpoint
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), nnx.state(module)
  )
  state, step = ckpt.restore_model_state(workdir, abstract)
  nnx.update(module, state)
  return Restored(module, config, os.fspath(workdir), int(step))
