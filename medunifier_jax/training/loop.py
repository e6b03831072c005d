"""`train(config, workdir, task)`: the training engine, testable without the CLI.

The engine knows a model only through its `Task` (`task.py`): model, loss, data, evaluation and
initial weights come from the layer above (`pretraining.task`, `prior.train.task`).

Start-up order: mesh and batch checks and, for a run without a checkpoint, the task's
`preflight` (fail before anything heavy), the abstract train state and its shardings, then the
state itself from, in order, this workdir's newest readable checkpoint, the task's `init_fn`
(weights written into an abstract model; the rest keep their fresh values), or a fresh
initialisation.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
from flax import nnx

from medunifier_jax import paths
from medunifier_jax.training import checkpoint as ckpt
from medunifier_jax.training import logging as log_lib
from medunifier_jax.training import mesh as mesh_lib
from medunifier_jax.training import sharding as sharding_lib
from medunifier_jax.training import state as state_lib
from medunifier_jax.training import step as step_lib
from medunifier_jax.training.task import Task


def to_global(
  batch: dict[str, Any], mesh: jax.sharding.Mesh, rules: Any, keys: Sequence[str] | None = None
) -> dict[str, jax.Array]:
  """Host-local batch slices -> global arrays split over the batch's mesh axes.

  Only `keys` (default: all) travel to the devices (the task's `batch_keys`; labels and indices
  are for evaluation).
  """
  keys = batch.keys() if keys is None else keys
  try:
    picked = {k: batch[k] for k in keys}
  except KeyError:
    # A custom `data_fn` (or one written for another config) meets the step's entries here.
    missing = [k for k in keys if k not in batch]
    raise KeyError(
      f"the training batch lacks {missing}, which the step reads (it reads {list(keys)}; the "
      f"batch has {sorted(batch)}). Make the data function yield them, or change the config "
      "that asks for them (the task's batch_keys follow it)."
    ) from None
  return sharding_lib.global_batch(picked, mesh, rules)


def _checkpointable(it: Any) -> Any | None:
  return it if hasattr(it, "get_state") and hasattr(it, "set_state") else None


def initial_state(
  config: ml_collections.ConfigDict,
  manager: Any,
  abstract: nnx.State,
  shardings: nnx.State,
  data_iter: Any,
  task: Task,
  log: Callable[[str], None] = print,
  workdir: str | None = None,
) -> tuple[nnx.State, jax.Array, str]:
  """`(state, base_rng, source)`: workdir's newest readable checkpoint -> `task.init_fn` ->
  fresh. Unreadable checkpoints are named in `log` and set aside (`checkpoint`).

  Without a readable checkpoint the task's `preflight` runs again (the checkpoints found at
  start-up may all have turned out unreadable), then `task.init_fn` writes its weights into an
  abstract model (nothing initialised on the host, so a billion-parameter ViT is read once and
  never built twice); variables it leaves abstract keep the fresh state's values.
  """
  restored = ckpt.restore_newest_readable(manager, abstract, _checkpointable(data_iter), log=log)
  if restored is not None:
    state, rng, step = restored
    return state, rng, f"resumed from step {step}"
  if task.preflight is not None:
    task.preflight(config, False)
  state = state_lib.init_train_state(config, shardings, task.model_fn)
  rng = jax.random.key(int(config.seed))
  if task.init_fn is None:
    return state, rng, "fresh initialisation"
  model = nnx.eval_shape(lambda: state_lib.build_model(config, task.model_fn))
  source = task.init_fn(model, log, workdir)
  if source is None:
    return state, rng, "fresh initialisation"

  def take(new, fresh):
    # Written weights are arrays; the rest are still shapes (`jax.ShapeDtypeStruct`).
    if isinstance(new, jax.ShapeDtypeStruct):
      return fresh
    return jax.device_put(new.astype(fresh.dtype), fresh.sharding)

  pure = nnx.to_pure_dict(state)
  pure["model"] = jax.tree.map(take, nnx.to_pure_dict(nnx.state(model)), pure["model"])
  nnx.replace_by_pure_dict(state, pure)
  return state, rng, f"initialised from {source}"


def _has_checkpoints(workdir: str) -> bool:
  """Whether the workdir holds a checkpoint step folder (readable or not)."""
  from etils import epath

  folder = epath.Path(ckpt.checkpoint_dir(workdir))
  return folder.exists() and any(p.name.isdigit() for p in folder.iterdir())


def train(
  config: ml_collections.ConfigDict, workdir: str, task: Task, *, show_progress: bool = True
) -> dict[str, Any]:
  """Trains `task` for `config.num_steps` steps in `workdir`, resuming from its newest readable
  checkpoint. Only the batch entries named by `task.batch_keys` travel to the devices.

  Returns:
    `{"step": last step, "metrics": last logged metrics, "start": how the state began}`.

  Raises:
    ValueError: a mesh or batch size that does not fit the devices (before any compilation).
    NonFiniteLossError: the loss became NaN/inf; the latest checkpoint is the last good one.
  """
  if task.data_fn is None:
    raise ValueError("the task has no data_fn: nothing to train on")
  workdir = paths.resolve(workdir)  # orbax needs absolute local paths
  mesh = mesh_lib.make_mesh(config.mesh)
  rules = config.sharding_rules
  sharding_lib.check_batch_divisible(int(config.batch_size), mesh, rules)
  if task.preflight is not None:
    # Before the data pipeline and the compilation: a placeholder path or a frozen random ViT
    # should cost seconds, not a tokenizer training.
    task.preflight(config, _has_checkpoints(workdir))
  ckpt.save_config(workdir, config)
  graphdef, abstract, shardings = state_lib.abstract_train_state(config, mesh, task.model_fn)
  data_iter = task.data_fn(config, workdir)
  eval_fn = task.eval_fn(config, workdir) if task.eval_fn is not None else None
  manager = ckpt.make_manager(workdir, config)
  notes: list[str] = []
  state, rng, source = initial_state(
    config, manager, abstract, shardings, data_iter, task, log=notes.append, workdir=workdir
  )
  start = state_lib.step_of(state)
  train_step = step_lib.jit_train_step(
    step_lib.make_train_step(graphdef, config, task.loss_fn), shardings, mesh, rules
  )
  num_steps = int(config.num_steps)
  logger = log_lib.MetricLogger(
    workdir, num_steps, start, int(config.batch_size), show_progress=show_progress
  )
  for note in notes:
    logger.message(note)
  logger.message(
    f"{source}; mesh {dict(mesh.shape)}; "
    f"{state_lib.count_params(state):,} parameters, "
    f"{state_lib.count_params(state, state_lib.optimizer_lib.trainable_filter(config.model)):,}"
    " trainable"
  )
  batch_keys = tuple(task.batch_keys)
  preempted = ckpt.PreemptionFlag()
  window = log_lib.MetricWindow()
  last: dict[str, Any] = {}
  step = start
  unconfirmed: int | None = None  # a step whose asynchronous save is not known to have succeeded
  error: Exception | None = None
  try:
    for step in range(start + 1, num_steps + 1):
      if unconfirmed is not None and ckpt.raise_if_save_failed(manager, unconfirmed):
        unconfirmed = None
      batch = to_global(next(data_iter), mesh, rules, batch_keys)
      state, metrics = train_step(state, batch, rng)
      window.add(step, metrics)
      stop = preempted.is_set() or manager.reached_preemption(step)
      saving = stop or step == num_steps or manager.should_save(step)
      evaluating = eval_fn is not None and (
        step == num_steps or (config.eval_every and step % int(config.eval_every) == 0)
      )
      if saving or evaluating or step % int(config.log_every) == 0:
        steps, values = window.fetch()
        bad = log_lib.first_non_finite(steps, values)
        if bad is not None:
          raise log_lib.NonFiniteLossError(
            f"non-finite loss at step {bad} (loss={values[steps.index(bad)]['loss']}); "
            "stopped without saving it. The latest checkpoint in "
            f"{ckpt.checkpoint_dir(workdir)} is the last good state. Lower "
            "--config.learning_rate, raise --config.warmup_steps or check the input data."
          )
        last = logger.log(step, log_lib.mean_metrics(values))
      if saving:
        if unconfirmed is not None:  # the previous save must have succeeded before the next
          ckpt.raise_if_save_failed(manager, unconfirmed, wait=True)
        ckpt.save(manager, step, state, rng, _checkpointable(data_iter), force=True)
        unconfirmed = step
      if evaluating:
        model = nnx.merge(graphdef, state).model
        logger.log(step, eval_fn(model, step), prefix="eval")
        logger.reset_clock(step)
      if stop:
        logger.message(f"preemption signal: saved step {step}, exiting.")
        break
  except Exception as e:  # noqa: BLE001 - re-raised after the checkpoints are safe
    error = e
  finally:
    try:
      if unconfirmed is not None:
        ckpt.raise_if_save_failed(manager, unconfirmed, wait=True)
      manager.wait_until_finished()
    except ckpt.CheckpointSaveError as e:
      error = error or e
    manager.close()
    logger.close()
    preempted.restore_handlers()
  if error is not None:
    raise error
  return {"step": step, "metrics": last, "start": source}
