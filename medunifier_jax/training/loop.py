"""`train_and_evaluate(config, workdir)`: the training loop, testable without the CLI.

Start-up order: mesh and batch checks and, for a run without a checkpoint, the checks of its
weight sources (fail before anything heavy), the abstract train state and its shardings, then
the state itself from, in order, this workdir's latest checkpoint, the caller's `init_fn` or
`config.init_from` (imported weights, one source per part of the model,
`weights.init_sources`), or a fresh initialisation. An import's report (which source filled
which weight, which kept its initial value) is logged and written to
`WORKDIR/import_report.json`.
"""

import importlib.util
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
from flax import nnx

from medunifier_jax.training import checkpoint as ckpt
from medunifier_jax.training import logging as log_lib
from medunifier_jax.training import mesh as mesh_lib
from medunifier_jax.training import sharding as sharding_lib
from medunifier_jax.training import state as state_lib
from medunifier_jax.training import step as step_lib

# `data_fn(config, workdir) -> iterator` of host-local batches (dicts of numpy arrays holding
# this process's slice of the global batch). Grain iterators also checkpoint their position.
DataFn = Callable[[ml_collections.ConfigDict, str], Iterator[dict[str, Any]]]
# `eval_fn(model, step) -> {name: value}` run every `config.eval_every` steps and at the end.
EvalFn = Callable[[nnx.Module, int], dict[str, float]]
# `init_fn(model) -> description`: writes weights into a freshly built host model (e.g. frozen
# parts taken from another run) when the run starts without a checkpoint.
InitFn = Callable[[nnx.Module], str]


def default_data_fn(config: ml_collections.ConfigDict, workdir: str) -> Iterator[dict[str, Any]]:
  """The grain pre-training iterator for `config.data` (this process's shard).

  Without `config.data.tokenizer_dir` the vocabulary trained on the reports is cached in
  `WORKDIR/tokenizer`, so a resumed run tokenises exactly as before.
  """
  from medunifier_jax.data import pipeline

  tokenizer = pipeline.build_tokenizer(config, cache_dir=f"{workdir}/tokenizer")
  return iter(pipeline.train_dataset(config, tokenizer))


def to_global(batch: dict[str, Any], mesh: jax.sharding.Mesh, rules: Any,
              keys: Sequence[str] = step_lib.BATCH_KEYS) -> dict[str, jax.Array]:
  """Host-local batch slices -> global arrays split over the batch's mesh axes.

  Only `keys` travel to the devices (default `step.BATCH_KEYS`, what pre-training reads;
  labels and indices are for evaluation).
  """
  batch = {k: batch[k] for k in keys}
  axes = sharding_lib.batch_axes(mesh, rules)
  if len(axes) == 1:
    from medunifier_jax.data.pipeline import make_global_batch

    return make_global_batch(batch, mesh, axes[0])
  sharding = sharding_lib.batch_sharding(mesh, rules)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def _checkpointable(it: Any) -> Any | None:
  return it if hasattr(it, "get_state") and hasattr(it, "set_state") else None


IMPORT_REPORT = "import_report.json"


def initial_state(
    config: ml_collections.ConfigDict,
    manager: Any,
    abstract: nnx.State,
    shardings: nnx.State,
    data_iter: Any,
    model_fn: state_lib.ModelFn | None = None,
    log: Callable[[str], None] = print,
    init_fn: InitFn | None = None,
    workdir: str | None = None,
) -> tuple[nnx.State, jax.Array, str]:
  """`(state, base_rng, source)`: workdir's newest readable checkpoint -> `init_fn` or
  `config.init_from` -> fresh. Unreadable checkpoints are named in `log` and set aside
  (`checkpoint`).

  Without a checkpoint and without `init_fn`, `config.init_from` is checked first
  (`init_sources.check_fresh_start`: placeholders, missing paths, a frozen ViT no source loads)
  and its import report goes to `log` and, with `workdir`, to `WORKDIR/import_report.json`.
  A caller's `init_fn` is trusted with what it writes (its description is logged).
  """
  restored = ckpt.restore_newest_readable(manager, abstract, _checkpointable(data_iter), log=log)
  if restored is not None:
    state, rng, step = restored
    return state, rng, f"resumed from step {step}"
  sources = {}
  if init_fn is None:
    from medunifier_jax.weights import init_sources

    sources = init_sources.parse(config.get("init_from"))
    init_sources.check_fresh_start(config, sources)
  state = state_lib.init_train_state(config, shardings, model_fn)
  rng = jax.random.key(int(config.seed))
  if init_fn is not None:
    state, source = _import_weights(config, state, shardings, model_fn, init_fn)
    return state, rng, f"initialised from {source}"
  if sources:
    state, source = _import_sources(config, state, model_fn, sources, log, workdir)
    return state, rng, f"initialised from {source}"
  return state, rng, "fresh initialisation"


def _import_weights(
    config: ml_collections.ConfigDict,
    state: nnx.State,
    shardings: nnx.State,
    model_fn: state_lib.ModelFn | None,
    init_fn: InitFn,
) -> tuple[nnx.State, str]:
  """Builds the model on the host, lets `init_fn` write weights into it and puts the result into
  the model part of a fresh state; returns the state and `init_fn`'s description."""
  # The same seed as the fresh state, so weights the source lacks equal their fresh values.
  model = state_lib.build_model(config, model_fn)
  source = init_fn(model)
  pure = nnx.to_pure_dict(state)
  pure["model"] = jax.device_put(
      nnx.to_pure_dict(nnx.state(model)), nnx.to_pure_dict(shardings["model"])
  )
  nnx.replace_by_pure_dict(state, pure)
  return state, source


def _import_sources(
    config: ml_collections.ConfigDict,
    state: nnx.State,
    model_fn: state_lib.ModelFn | None,
    sources: dict[str, str],
    log: Callable[[str], None],
    workdir: str | None,
) -> tuple[nnx.State, str]:
  """Writes the `config.init_from` sources, each into its part of the model, over the fresh
  `state`; logs the report and writes it to `WORKDIR/import_report.json` (process 0).

  The sources are written into an abstract model (nothing initialised on the host, so a
  billion-parameter ViT is read once and never built twice); weights no source wrote keep the
  fresh state's values. Weights a source cannot have (e.g. the VQ-VAE) keep their initial
  values; anything else missing, unexpected or mis-shaped raises `WeightImportError` with the
  list, and frozen weights no source wrote are refused.
  """
  from medunifier_jax.weights import init_sources
  from medunifier_jax.weights.mapping import path_str

  model = nnx.eval_shape(lambda: state_lib.build_model(config, model_fn))
  report = init_sources.import_sources(model, config.model, sources)
  trained = nnx.filterlib.to_predicate(state_lib.optimizer_lib.trainable_filter(config.model))
  frozen = [path_str(path) for path, var in nnx.iter_graph(model)
            if isinstance(var, nnx.Param) and not trained(path, var)]
  init_sources.check_frozen_loaded(report, frozen, sources)

  def take(new, fresh):
    # Written weights are arrays; the rest are still shapes (`jax.ShapeDtypeStruct`).
    if isinstance(new, jax.ShapeDtypeStruct):
      return fresh
    return jax.device_put(new.astype(fresh.dtype), fresh.sharding)

  pure = nnx.to_pure_dict(state)
  pure["model"] = jax.tree.map(take, nnx.to_pure_dict(nnx.state(model)), pure["model"])
  nnx.replace_by_pure_dict(state, pure)
  for line in report.summary():
    log(line)
  if workdir is not None and jax.process_index() == 0:
    path = f"{workdir}/{IMPORT_REPORT}"
    report.write(path)
    log(f"import report: {path}")
  return state, ", ".join(f"{init_sources.where(p)}={s}" for p, s in sources.items())


def _has_checkpoints(workdir: str) -> bool:
  """Whether the workdir holds a checkpoint step folder (readable or not)."""
  from etils import epath

  folder = epath.Path(ckpt.checkpoint_dir(workdir))
  return folder.exists() and any(p.name.isdigit() for p in folder.iterdir())


def _evaluators_fn(config: ml_collections.ConfigDict, workdir: str) -> EvalFn | None:
  """Periodic evaluation through `medunifier_jax.evaluators`, when configured and present."""
  if not config.get("evals") or not len(config.evals):
    return None
  if importlib.util.find_spec("medunifier_jax.evaluators.registry") is None:
    return None
  from medunifier_jax.evaluators import registry

  return registry.make_eval_fn(config, workdir)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    model_fn: state_lib.ModelFn | None = None,
    loss_fn: step_lib.LossFn | None = None,
    data_fn: DataFn | None = None,
    eval_fn: EvalFn | None = None,
    init_fn: InitFn | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
  """Trains `config.num_steps` steps in `workdir`, resuming from its latest checkpoint.

  The keyword arguments replace the MedUnifier model, its four-objective loss, the data
  pipeline, the evaluators and the initial weights (`init_fn`, used instead of
  `config.init_from` when there is no checkpoint): custom models (the image prior,
  `prior/train.py`) and tests; by default they come from the config. Only the batch entries
  named by `config.batch_keys` (default `step.BATCH_KEYS`) travel to the devices.

  Returns:
    `{"step": last step, "metrics": last logged metrics, "start": how the state began}`.

  Raises:
    ValueError: a mesh or batch size that does not fit the devices (before any compilation).
    NonFiniteLossError: the loss became NaN/inf; the latest checkpoint is the last good one.
  """
  from medunifier_jax import paths

  workdir = paths.resolve(workdir)  # orbax needs absolute local paths
  paths.resolve_config(config)
  mesh = mesh_lib.make_mesh(config.mesh)
  rules = config.sharding_rules
  sharding_lib.check_batch_divisible(int(config.batch_size), mesh, rules)
  if init_fn is None:
    from medunifier_jax.weights import init_sources

    sources = init_sources.parse(config.get("init_from"))  # syntax errors even when resuming
    if not _has_checkpoints(workdir):
      # Before the data pipeline and the compilation: a placeholder path or a frozen random
      # ViT should cost seconds, not a tokenizer training. (`initial_state` checks again when
      # the checkpoints it finds all turn out unreadable.)
      init_sources.check_fresh_start(config, sources)
  ckpt.save_config(workdir, config)
  graphdef, abstract, shardings = state_lib.abstract_train_state(config, mesh, model_fn)
  data_iter = (data_fn or default_data_fn)(config, workdir)
  eval_fn = eval_fn or _evaluators_fn(config, workdir)
  manager = ckpt.make_manager(workdir, config)
  notes: list[str] = []
  state, rng, source = initial_state(config, manager, abstract, shardings, data_iter, model_fn,
                                     log=notes.append, init_fn=init_fn, workdir=workdir)
  start = state_lib.step_of(state)
  train_step = step_lib.jit_train_step(
      step_lib.make_train_step(graphdef, config, loss_fn), shardings, mesh, rules
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
  batch_keys = tuple(config.get("batch_keys", None) or step_lib.BATCH_KEYS)
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
