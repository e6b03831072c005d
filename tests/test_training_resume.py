"""Kill the training CLI with SIGKILL mid-run, start it again with the same command: every
step's losses equal an uninterrupted run's (bitwise: same program, same inputs, same CPU), and
every checkpoint on disk stays readable."""

import shutil
import signal
import subprocess
import time
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
from cli_runs import ROOT, cached_env, finished_checkpoints, records, train_command
from flax import nnx

from configs.pretrain import get_config
from medunifier_jax import api, pretraining
from medunifier_jax.training import checkpoint as ckpt
from medunifier_jax.training import mesh as mesh_lib
from medunifier_jax.training import state as state_lib

# End to end (kills and restarts the training CLI in subprocesses): left out of `make test-fast`.
pytestmark = pytest.mark.slow

NUM_STEPS, EVERY = 16, 4
OVERRIDES = (
  f"--config.num_steps={NUM_STEPS}",
  f"--config.checkpoint_every={EVERY}",
  "--config.log_every=1",
  "--config.model.vit.frozen=True",
  # A frozen random ViT on purpose (a shorter backward pass); without it the run refuses.
  "--config.init_from.vision=random",
)
LOSSES = ("loss", "loss_itc", "loss_itm", "loss_itg", "loss_tig", "learning_rate")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  # The three runs share compiled programs through JAX's persistent cache: the restart must
  # run the very same executable anyway, and the later runs skip recompiling it.
  return cached_env(tmp_path_factory.mktemp("xla_cache"))


def command(workdir: Path) -> list[str]:
  return train_command(workdir, OVERRIDES)


def run_to_end(workdir: Path, env: dict) -> None:
  done = subprocess.run(
    command(workdir), env=env, cwd=ROOT, capture_output=True, text=True, timeout=900
  )
  assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, env):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  run_to_end(workdir, env)
  return workdir


@pytest.fixture(scope="module")
def reference(reference_run):
  return records(reference_run)


def test_sigkill_then_same_command_reproduces_the_uninterrupted_run(tmp_path, env, reference):
  assert sorted(reference) == list(range(1, NUM_STEPS + 1))
  proc = subprocess.Popen(
    command(tmp_path), env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  try:
    deadline = time.time() + 900
    # Kill between checkpoints: after one is complete and at least one more step has run.
    while not (
      finished_checkpoints(tmp_path)
      and max(records(tmp_path), default=0) > finished_checkpoints(tmp_path)[-1]
    ):
      assert proc.poll() is None, "the run ended before it could be killed"
      assert time.time() < deadline
      time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.wait()
  killed_at = max(records(tmp_path))
  assert proc.returncode == -signal.SIGKILL and killed_at < NUM_STEPS

  # Every checkpoint the killed run left is complete and restores.
  config = get_config("tiny")
  with config.unlocked():
    config.model.vit.frozen = True
  manager = ckpt.make_manager(tmp_path, config, read_only=True)
  steps = manager.all_steps()
  assert steps and all(s % EVERY == 0 and s <= killed_at for s in steps)
  _, abstract, _ = state_lib.abstract_train_state(
    config, mesh_lib.make_mesh(config.mesh), pretraining.model_fn
  )
  for step in steps:
    state, _ = ckpt.restore(manager, step, abstract)
    assert state_lib.step_of(state) == step
  manager.close()

  run_to_end(tmp_path, env)
  resumed = records(tmp_path)
  assert sorted(resumed) == list(range(1, NUM_STEPS + 1))
  for step in range(1, NUM_STEPS + 1):
    for key in LOSSES:
      assert resumed[step][key] == reference[step][key], (step, key)
  assert np.isfinite(resumed[NUM_STEPS]["loss"])

  # api.load(workdir) gives the final checkpoint's model, with the run's tokenizer.
  model = api.load(str(tmp_path))
  manager = ckpt.make_manager(tmp_path, config, read_only=True)
  final, _ = ckpt.restore(manager, NUM_STEPS, abstract)
  manager.close()
  chex.assert_trees_all_equal(
    jax.device_get(nnx.to_pure_dict(nnx.state(model.module))),
    jax.device_get(nnx.to_pure_dict(final["model"])),
  )
  assert model.tokenizer is not None


def test_sigterm_saves_the_current_step_and_exits_cleanly(tmp_path, env, reference):
  """Preemption (SIGTERM, as TPU VMs and schedulers send it): the run saves the step it is at,
  even between checkpoint intervals, and exits with status 0. (Resuming from a checkpoint is the
  SIGKILL test's subject; a preemption checkpoint is written by the same code.)"""
  log = tmp_path / "output.txt"
  with open(log, "w") as out:
    proc = subprocess.Popen(
      command(tmp_path), env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
    )
    try:
      deadline = time.time() + 900
      while not records(tmp_path):  # the signal handler is installed before the first step
        assert proc.poll() is None, "the run ended before it could be signalled"
        assert time.time() < deadline
        time.sleep(0.02)
      proc.send_signal(signal.SIGTERM)
      proc.wait(timeout=300)
    finally:
      proc.kill()
      proc.wait()
  assert proc.returncode == 0, log.read_text()[-3000:]
  stopped_at = max(records(tmp_path))
  assert stopped_at < NUM_STEPS, "the run finished before the signal arrived"
  assert f"preemption signal: saved step {stopped_at}" in log.read_text()
  assert finished_checkpoints(tmp_path)[-1] == stopped_at
  for step, record in records(tmp_path).items():
    assert record["loss"] == reference[step]["loss"], step

  config = get_config("tiny")
  with config.unlocked():
    config.model.vit.frozen = True
  manager = ckpt.make_manager(tmp_path, config, read_only=True)
  _, abstract, _ = state_lib.abstract_train_state(
    config, mesh_lib.make_mesh(config.mesh), pretraining.model_fn
  )
  state, _ = ckpt.restore(manager, stopped_at, abstract)
  manager.close()
  assert state_lib.step_of(state) == stopped_at


def test_unreadable_checkpoints_are_set_aside_and_the_run_resumes_from_a_good_one(
  tmp_path, env, reference_run, reference
):
  """The newest checkpoint has truncated array files, the one before lost its `_METADATA`:
  the same command (here with a relative workdir) names both, moves them to
  broken_checkpoints/, resumes from the one before, and every step after it equals the
  uninterrupted run."""
  shutil.copytree(reference_run, tmp_path / "run")
  (tmp_path / "run" / "metrics.jsonl").unlink()  # only what the resumed run logs is compared
  kept = finished_checkpoints(tmp_path / "run")
  assert kept == [NUM_STEPS - 2 * EVERY, NUM_STEPS - EVERY, NUM_STEPS]
  folder = tmp_path / "run" / "checkpoints"
  newest, middle = folder / str(kept[2]), folder / str(kept[1])
  for array_file in (newest / "state").rglob("d/*"):
    array_file.write_bytes(array_file.read_bytes()[:10])
  (middle / "state" / "_METADATA").unlink()

  cmd = command(tmp_path / "run")
  cmd[cmd.index("--workdir") + 1] = "run"
  done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  out = done.stdout + done.stderr
  assert f"checkpoint of step {kept[2]} cannot be restored" in out
  assert f"checkpoint of step {kept[1]} cannot be restored" in out and "_METADATA is missing" in out
  assert f"resumed from step {kept[0]}" in out
  # The hundreds of late "Event loop is closed" reports of the failed reads are silenced.
  assert out.count("Event loop is closed") <= 2
  assert sorted(p.name for p in (tmp_path / "run/broken_checkpoints").iterdir()) == [
    str(kept[1]),
    str(kept[2]),
  ]
  resumed = records(tmp_path / "run")
  assert sorted(resumed) == list(range(kept[0] + 1, NUM_STEPS + 1))
  for step in resumed:
    for key in LOSSES:
      assert resumed[step][key] == reference[step][key], (step, key)
