r"""Training the image prior on the project's training engine.

  python -m medunifier_jax.train --config configs/prior.py:demo --workdir W/prior \
      --config.medunifier_workdir=W

`train.py` sends configs with `task = "prior"` here. `train_prior` reads the frozen MedUnifier's
run config (grid, codebook size, Q-Former width), extracts its code cache once (`codes.py`) and
trains its `task` on the engine (`training.loop.train`): the prior's model, loss, data and
initial weights, with the same mesh, optimizer, checkpoints (with the data iterator's
position), metrics.jsonl and TensorBoard as pre-training. Running the command again resumes.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import ml_collections
from flax import nnx

from medunifier_jax import config_lib, model_io
from medunifier_jax.prior import codes as codes_lib
from medunifier_jax.prior import data as data_lib
from medunifier_jax.prior.model import ConditionedPrior
from medunifier_jax.prior.objective import BATCH_KEYS, masked_token_loss
from medunifier_jax.training.task import Task


def model_fn(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> ConditionedPrior:
  """The training module (`model_io.build`): the prior, plus the frozen Q-Former when the text
  states are not cached."""
  return model_io.build(config, rngs=rngs)


def loss_fn(config: ml_collections.ConfigDict):
  """`(model, batch, rng) -> (loss, metrics)`: masked-token cross-entropy (`objective.py`)."""
  return functools.partial(masked_token_loss, cond_drop=float(config.model.cond_drop))


def codes_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """`config.codes.dir`, or `WORKDIR/codes` when unset."""
  return str(config.codes.dir) if config.codes.dir else os.path.join(workdir, "codes")


def configure(
  config: ml_collections.ConfigDict,
  medunifier_config: ml_collections.ConfigDict | None,
  step: int = -1,
) -> None:
  """Fills, in place, what the frozen MedUnifier dictates: `model.grid`, `model.codebook_size`,
  `model.bottom_depth`, `model.text_width`, the Q-Former config of the text encoder,
  `medunifier_step`."""
  if medunifier_config is not None:
    m = medunifier_config.model
    config.model.grid = int(m.vqvae.grid)
    config.model.codebook_size = int(m.vqvae.codebook_size)
    config.model.bottom_depth = config_lib.bottom_depth(m.vqvae)
    config.model.text_width = int(m.qformer.hidden_size)
    config.text_encoder.qformer = ml_collections.ConfigDict(m.qformer.to_dict())
    config.text_encoder.vision_width = int(m.vit.width)
    config.medunifier_step = int(step)


def batch_keys(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The batch entries the step reads: codes and tokens, and the cached text states."""
  return BATCH_KEYS + (("text_states",) if config.codes.cache_text_states else ())


class _Frozen:
  """The MedUnifier of `workdir` at checkpoint `step`, loaded once on first use (code
  extraction and the text encoder's initial weights share it)."""

  def __init__(self, workdir: str, step: int):
    self.workdir, self.step, self._model = workdir, step, None

  def model(self):
    if self._model is None:
      from medunifier_jax import api

      self._model = api.load(self.workdir)
      loaded = getattr(self._model, "checkpoint_step", self.step)
      if loaded != self.step:
        raise ValueError(
          f"the newest checkpoint of {self.workdir} (step {self.step}) does not "
          f"read back (step {loaded} was loaded); repair or remove it first"
        )
    return self._model


def prepare_codes(
  config: ml_collections.ConfigDict, workdir: str, frozen: _Frozen, show_progress: bool = True
) -> dict[str, Any]:
  """Extracts the code cache of the frozen MedUnifier, or checks that the existing one was
  made from its current checkpoint with these settings (`codes.StaleCodesError` otherwise)."""
  c = config.codes
  return codes_lib.extract_codes(
    frozen.workdir,
    codes_dir(config, workdir),
    cache_text_states=bool(c.cache_text_states),
    shard_size=int(c.shard_size),
    batch_size=int(c.batch_size),
    max_examples=int(c.max_examples),
    show_progress=show_progress,
    load_model=frozen.model,
  )


def code_data_fn(config: ml_collections.ConfigDict, workdir: str):
  """The engine's `data_fn`: the code cache (`codes_dir`) as an endless grain iterator of host
  batches."""
  folder = codes_dir(config, workdir)
  source = codes_lib.CodeSource(folder)
  _check_cache(source.index, config, folder)
  return iter(data_lib.code_dataset(config, source))


def _check_cache(index: dict[str, Any], config: ml_collections.ConfigDict, folder: str) -> None:
  # A cache without bottom_depth predates it: one code per bottom cell.
  found = {"bottom_depth": 1, **index}
  for key in ("grid", "codebook_size", "bottom_depth"):
    if key in found and int(found[key]) != int(config.model.get(key, 1)):
      raise ValueError(
        f"the code cache in {folder} has {key}={found[key]} but "
        f"config.model.{key}={config.model[key]}"
      )
  if config.codes.cache_text_states and not index.get("cache_text_states"):
    raise ValueError(
      f"the code cache in {folder} holds no text states; set "
      "--config.codes.cache_text_states=False to compute them each step"
    )


def make_init_fn(frozen: _Frozen) -> Callable[..., str]:
  """The engine's `init_fn`: the frozen Q-Former's weights into the text encoder of the
  (abstract) training module; the prior itself starts fresh."""

  def init_fn(model: ConditionedPrior, log, workdir) -> str:
    del log, workdir
    nnx.update(model.text_encoder, nnx.state(frozen.model().module.qformer))
    return f"the Q-Former of {frozen.workdir} (step {frozen.step}, frozen)"

  return init_fn


def task(config: ml_collections.ConfigDict, frozen: _Frozen | None = None) -> Task:
  """The prior's training task: its model, masked-token loss and code cache; with the frozen
  MedUnifier when the text states are computed each step."""
  on_the_fly = frozen is not None and not config.codes.cache_text_states
  return Task(
    model_fn=model_fn,
    loss_fn=loss_fn(config),
    batch_keys=batch_keys(config),
    data_fn=code_data_fn,
    # Only the frozen text encoder has weights to take over; the prior starts fresh.
    init_fn=make_init_fn(frozen) if on_the_fly else None,
  )


def train_prior(
  config: ml_collections.ConfigDict, workdir: str, *, data_fn=None, show_progress: bool = True
) -> dict[str, Any]:
  """Trains the prior of `config` (configs/prior.py) in `workdir`; see the module docstring.

  Without `config.medunifier_workdir` the code cache must already exist (`config.codes.dir`,
  e.g. written by `codes.write_cache`) and hold the text states.

  Returns:
    `training.loop.train`'s result.
  """
  from medunifier_jax import paths
  from medunifier_jax.training import loop

  workdir = paths.resolve(workdir)
  if config.codes.dir:
    config.codes.dir = paths.resolve(config.codes.dir)
  frozen = None
  if config.medunifier_workdir:
    config.medunifier_workdir = paths.resolve(config.medunifier_workdir)
    mu = str(config.medunifier_workdir)
    step = codes_lib.latest_checkpoint_step(mu)
    frozen = _Frozen(mu, step)
    # Before anything is written to the workdir: a stale cache stops the run here.
    prepare_codes(config, workdir, frozen, show_progress)
    # As api.load reads it (fields the run predates filled), so the text encoder is built
    # from the same Q-Former config as the frozen model it takes its weights from.
    configure(config, model_io.load_config(mu), step)
  else:
    if not config.codes.cache_text_states:
      raise ValueError(
        "computing the text states each step needs the frozen MedUnifier: set "
        "--config.medunifier_workdir=WORKDIR"
      )
    configure(config, None)
  prior_task = task(config, frozen)
  if data_fn is not None:
    prior_task = prior_task.replace(data_fn=data_fn)
  return loop.train(config, workdir, prior_task, show_progress=show_progress)
