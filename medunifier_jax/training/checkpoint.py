"""Checkpoints with orbax: the train state and the data iterator as two items of one step.

Layout: `WORKDIR/checkpoints/<step>/{state,data}`. The `state` item holds the parameters,
optimizer state (with the step count), batch statistics and the base PRNG key; `data` holds the
grain iterator position (one file per process). Orbax writes each step to a temporary directory
and renames it when complete, so a process killed at any moment leaves every listed step
readable; unfinished temporary directories are removed on the next start.

Nothing is lost when something goes wrong:
- a save that fails in its background thread stops the run at the next step
  (`raise_if_save_failed`, `CheckpointSaveError`) instead of training on without checkpoints;
- a checkpoint that cannot be read back (truncated array files, a missing `_METADATA`) is named,
  moved aside to `WORKDIR/broken_checkpoints/<step>` for inspection, and the previous one is
  used (`restore_newest_readable`); a checkpoint of another model (`CheckpointMismatchError`)
  is a configuration error and stops the run instead.
"""

import json
import os
import signal
import sys
import threading
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from medunifier_jax.training import tree_paths

STATE, DATA = "state", "data"
BROKEN = "broken_checkpoints"


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written; the run stops so that no more steps go unsaved."""


class CheckpointMismatchError(ValueError):
  """The checkpoint holds another model (size or variant) than the config builds."""


class PreemptionFlag:
  """Set by SIGTERM (what TPU VMs and most schedulers send before preempting).

  The loop polls it at step boundaries, saves, and exits cleanly. Multi-host preemption
  notices from JAX's coordination service are honoured through
  `CheckpointManager.reached_preemption` as well.
  """

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
    self._event = threading.Event()
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for s in signals:
        self._previous[s] = signal.signal(s, lambda *_: self._event.set())

  def is_set(self) -> bool:
    return self._event.is_set()

  def restore_handlers(self) -> None:
    for s, h in self._previous.items():
      signal.signal(s, h)
    self._previous = {}


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
  return epath.Path(workdir) / "checkpoints"


def make_manager(
  workdir: str | os.PathLike, config: ml_collections.ConfigDict, *, read_only: bool = False
) -> ocp.CheckpointManager:
  """A manager saving every `config.checkpoint_every` steps and on preemption, keeping the
  latest `config.keep_checkpoints`."""
  policies = ocp.checkpoint_managers
  every = int(config.checkpoint_every)
  save_policy = policies.AnySavePolicy(
    ([policies.FixedIntervalPolicy(every)] if every > 0 else [])
    + [policies.PreemptionCheckpointingPolicy()]
  )
  options = ocp.CheckpointManagerOptions(
    save_decision_policy=save_policy,
    preservation_policy=policies.LatestN(int(config.keep_checkpoints)),
    cleanup_tmp_directories=True,
    enable_async_checkpointing=True,
    read_only=read_only,
    create=not read_only,
  )
  return ocp.CheckpointManager(checkpoint_dir(workdir), item_names=(STATE, DATA), options=options)


def _pack(state: nnx.State, rng: jax.Array) -> dict[str, Any]:
  data = jax.random.key_data(rng)
  if jax.process_count() > 1:
    # The key lives on one local device, and orbax writes only global arrays from several
    # hosts: save a copy replicated over the state's mesh (every process holds the same key).
    host = np.asarray(jax.device_get(data))
    replicated = jax.sharding.NamedSharding(_any_mesh(state), jax.sharding.PartitionSpec())
    data = jax.make_array_from_callback(host.shape, replicated, lambda index: host[index])
  return {"train_state": nnx.to_pure_dict(state), "rng": data}


def save(
  manager: ocp.CheckpointManager,
  step: int,
  state: nnx.State,
  rng: jax.Array,
  data_iter: Any | None = None,
  *,
  force: bool = False,
) -> bool:
  """Saves (asynchronously) when the policies say so or `force`; returns whether it saved."""
  items = {STATE: ocp.args.StandardSave(_pack(state, rng))}
  if data_iter is not None:
    items[DATA] = grain.checkpoint.CheckpointSave(data_iter)
  return manager.save(step, args=ocp.args.Composite(**items), force=force)


def restore(
  manager: ocp.CheckpointManager, step: int, abstract_state: nnx.State, data_iter: Any | None = None
) -> tuple[nnx.State, jax.Array]:
  """Restores step `step` into the shardings of `abstract_state`; the iterator in place.

  Returns:
    `(state, rng)` with `state` an `nnx.State` like `abstract_state`.
  """
  target = {
    "train_state": nnx.to_pure_dict(abstract_state),
    "rng": jax.ShapeDtypeStruct(
      jax.random.key_data(jax.random.key(0)).shape,
      jax.numpy.uint32,
      sharding=jax.sharding.NamedSharding(_any_mesh(abstract_state), jax.sharding.PartitionSpec()),
    ),
  }
  items = {STATE: ocp.args.StandardRestore(target)}
  if data_iter is not None:
    items[DATA] = grain.checkpoint.CheckpointRestore(data_iter)
  check_fits(manager.directory / str(step) / STATE, target, partial=False)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  state = jax.tree.map(lambda x: x, abstract_state)
  nnx.replace_by_pure_dict(state, restored[STATE]["train_state"])
  return state, jax.random.wrap_key_data(restored[STATE]["rng"])


def raise_if_save_failed(manager: ocp.CheckpointManager, step: int, *, wait: bool = False) -> bool:
  """Checks the asynchronous save of `step`; returns True once it is known to have succeeded.

  Without `wait`, returns False while the save is still being written (cheap: call it every
  step). A failed save raises `CheckpointSaveError` naming the step, the cause, the newest
  checkpoint that did get written, and the fix.
  """
  if not wait and manager.is_saving_in_progress():
    return False
  try:
    manager.wait_until_finished()  # re-raises what failed in the background thread
  except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many types
    good = [s for s in manager.all_steps() if s != step]
    raise CheckpointSaveError(
      f"saving the checkpoint of step {step} in {manager.directory} failed: "
      f"{_first_line(e)}\nTraining stopped here so that no more steps go unsaved. The newest "
      f"written checkpoint is {f'step {max(good)}' if good else 'none'}. Fix the cause (free "
      "disk space, write permission, the workdir path) and run the same command again: it "
      "resumes from that checkpoint."
    ) from e
  return True


def restore_newest_readable(
  manager: ocp.CheckpointManager,
  abstract_state: nnx.State,
  data_iter: Any | None = None,
  *,
  log=print,
) -> tuple[nnx.State, jax.Array, int] | None:
  """Restores the newest checkpoint that reads back, or None when no checkpoint does.

  Each unreadable one is named in `log` with the reason and moved to
  `WORKDIR/broken_checkpoints/<step>` (kept for inspection, never deleted) before the next
  older one is tried. A `CheckpointMismatchError` (another model) is raised, not skipped.

  Returns:
    `(state, rng, step)`, or None when the workdir holds no readable checkpoint.
  """
  _silence_late_read_callbacks()
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state, rng = restore(manager, step, abstract_state, data_iter)
    except CheckpointMismatchError:
      raise
    except Exception as e:  # noqa: BLE001 - tensorstore and orbax raise many types
      reason = unreadable_reason(manager.directory / str(step), e)
      aside = _set_aside(manager, step)
      log(
        f"checkpoint of step {step} cannot be restored ({reason}); moved to {aside} for "
        "inspection; trying the previous checkpoint."
      )
      continue
    return state, rng, step
  return None


def _silence_late_read_callbacks() -> None:
  """After a failed restore, the array reads still in flight complete on orbax's closed event
    loop, and each completion reports `RuntimeError: Event loop is closed` through
    `sys.unraisablehook`: hundreds of tracebacks that say nothing about the checkpoint (the
    failure itself is reported once). Drops exactly those; every other one goes to the previous
    hook. Installed once per process, before the first restore (some arrive before the failure
  itself is raised)."""
  previous = sys.unraisablehook
  if getattr(previous, "silences_closed_loop_callbacks", False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
      return
    previous(unraisable)

  hook.silences_closed_loop_callbacks = True
  sys.unraisablehook = hook


def unreadable_reason(step_dir: epath.Path, error: Exception) -> str:
  """Why a checkpoint step does not read, in a line: a missing metadata file, else the error."""
  item = step_dir / STATE
  for name in ("_METADATA", "_CHECKPOINT_METADATA"):
    folder = item if name == "_METADATA" else step_dir
    if not (folder / name).exists():
      return f"{folder / name} is missing"
  return _first_line(error)


def _first_line(error: Exception, limit: int = 300) -> str:
  text = str(error).strip().splitlines()
  line = f"{type(error).__name__}: {text[0] if text else ''}"
  return line if len(line) <= limit else line[: limit - 3] + "..."


def _set_aside(manager: ocp.CheckpointManager, step: int) -> epath.Path:
  """Moves checkpoint `step` to WORKDIR/broken_checkpoints/<step>[.N] (process 0) and makes
  the manager forget it."""
  source = manager.directory / str(step)
  target = manager.directory.parent / BROKEN / str(step)
  n = 1
  while target.exists():
    target = manager.directory.parent / BROKEN / f"{step}.{n}"
    n += 1
  if jax.process_index() == 0:
    target.parent.mkdir(parents=True, exist_ok=True)
    source.rename(target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
  manager.reload()
  return target


def restore_model_state(
  workdir: str | os.PathLike, abstract_model_state: nnx.State, step: int | None = None
) -> tuple[nnx.State, int]:
  """The model part of a training checkpoint (latest unless `step`), for inference.

  Only the `model` subtree is read; optimizer state is skipped. Without `step`, a newest
  checkpoint that does not read back is reported (absl warning) and the one before it is used;
  the workdir is not changed (training sets broken checkpoints aside when it resumes).

  Raises:
    FileNotFoundError: when the workdir has no finished checkpoint, or none that reads.
    CheckpointMismatchError: the checkpoint holds another model than `abstract_model_state`.
  """
  from absl import logging

  directory = checkpoint_dir(workdir)
  manager = ocp.CheckpointManager(
    directory,
    item_names=(STATE, DATA),
    options=ocp.CheckpointManagerOptions(read_only=True, create=False),
  )
  steps = sorted(manager.all_steps(), reverse=True) if step is None else [step]
  if not steps:
    raise FileNotFoundError(
      f"no finished checkpoint under {directory}; train first "
      "(python -m medunifier_jax.train --workdir ...) or pass a directory that has one."
    )
  target = {"train_state": {"model": nnx.to_pure_dict(abstract_model_state)}}
  problems = []
  _silence_late_read_callbacks()
  try:
    for candidate in steps:
      check_fits(directory / str(candidate) / STATE, target, partial=True)
      try:
        restored = manager.restore(
          candidate,
          args=ocp.args.Composite(
            **{
              STATE: ocp.args.PyTreeRestore(
                target,
                restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True,
              )
            }
          ),
        )
      except Exception as e:  # noqa: BLE001 - tensorstore and orbax raise many types
        if step is not None:
          raise
        problems.append(f"step {candidate}: {unreadable_reason(directory / str(candidate), e)}")
        logging.warning(
          "checkpoint of step %d in %s cannot be restored (%s); trying the previous one",
          candidate,
          directory,
          problems[-1],
        )
        continue
      state = jax.tree.map(lambda x: x, abstract_model_state)
      nnx.replace_by_pure_dict(state, restored[STATE]["train_state"]["model"])
      return state, int(candidate)
  finally:
    manager.close()
  raise FileNotFoundError(
    f"no checkpoint under {directory} reads back:\n  "
    + "\n  ".join(problems)
    + "\nRun the training command again on this workdir: it sets the broken checkpoints "
    "aside and resumes from the newest good one, or from the start."
  )


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """ "a/b/0/c" -> shape for every array (list indices are ints in nnx state, strings on disk)."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {tree_paths.path_str(path): tuple(leaf.shape) for path, leaf in leaves}


def check_fits(item_dir: epath.Path, target: Any, *, partial: bool) -> None:
  """Raises a ValueError listing the differences when the arrays stored in `item_dir` do not
  match `target` (a model of another size or variant); `partial`: the checkpoint may hold more.

  Runs before a restore, which would otherwise fail deep inside orbax on the first mismatch.
  """
  try:
    stored = _shapes(ocp.PyTreeCheckpointHandler().metadata(item_dir))
  except Exception:  # unreadable metadata: the restore itself reports what is wrong
    return
  wanted = _shapes(target)
  lines = [
    f"  {k}: checkpoint {stored[k]}, config {v}"
    for k, v in wanted.items()
    if k in stored and stored[k] != v
  ]
  lines += [f"  {k}: missing from the checkpoint" for k in wanted if k not in stored]
  if not partial:
    lines += [
      f"  {k}: in the checkpoint, not in the config's model" for k in stored if k not in wanted
    ]
  if not lines:
    return
  shown = "\n".join(lines[:12]) + (f"\n  ... and {len(lines) - 12} more" if len(lines) > 12 else "")
  raise CheckpointMismatchError(
    f"the checkpoint in {item_dir.parent} does not fit the model this config builds "
    f"({len(lines)} differences):\n{shown}\nIt was written with another model config. Use "
    "the config it was trained with (its workdir's config.json, which api.load reads by "
    "default), or start a fresh --workdir for the new config."
  )


def _any_mesh(tree: Any) -> jax.sharding.Mesh:
  for leaf in jax.tree.leaves(tree):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
      return sharding.mesh
  raise ValueError("abstract_state carries no NamedSharding; build it with abstract_train_state")


def save_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
  """Writes `WORKDIR/config.json` (process 0) so the run can be loaded by `api.load(workdir)`."""
  if jax.process_index() != 0:
    return
  path = epath.Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))


def load_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """Reads `WORKDIR/config.json` back into a ConfigDict (tuples come back as lists)."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(
      f"{path} not found: not a training workdir (train.py writes it at the start of a run)."
    )
  return ml_collections.ConfigDict(json.loads(path.read_text()))
