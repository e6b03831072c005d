"""The README's commands as a new user runs them: from a scratch directory, with relative paths.

Each command is read from README.md itself (continuation lines joined, optional `[...]` groups
dropped), so the README and this test cannot drift apart. Only the size changes: the `demo`
variant becomes `tiny`, and a few flags shorten the runs. The scratch directory holds a link to
the repository's `configs/` (the commands name `configs/pretrain.py`), two image files and the
relative workdir `workdirs/run`. `make demo` itself is run the same way in tests/test_demo.py.
"""

import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from cli_runs import ROOT, cached_env, finished_checkpoints, records
from PIL import Image

# End to end (runs the README's commands in subprocesses): left out of `make test-fast`.
pytestmark = pytest.mark.slow

README = (ROOT / "README.md").read_text()
WORKDIR = "workdirs/run"  # relative to the scratch directory
TEXTS = ("No acute cardiopulmonary process.", "Right pleural effusion.")


def code_blocks(language: str = "") -> list[str]:
  """The README's fenced code blocks opened with ```LANGUAGE, in order."""
  blocks, current = [], None
  for line in README.splitlines():
    if line.startswith("```"):
      if current is None:
        current = [] if line[3:].strip() == language else False
      else:
        if current is not False:
          blocks.append("\n".join(current) + "\n")
        current = None
    elif isinstance(current, list):
      current.append(line)
  return blocks


def readme_command(program: str, containing: str = "") -> list[str]:
  """The README's first `python -m medunifier_jax.PROGRAM ...` command (holding `containing`),
  shortened to the tiny size."""
  for block in code_blocks():
    for line in block.replace("\\\n", " ").splitlines():
      if line.startswith(f"python -m medunifier_jax.{program} ") and containing in line:
        words = shlex.split(re.sub(r"\[[^\]]*\]", "", line))
        words = [w.replace(".py:demo", ".py:tiny") for w in words]
        return [sys.executable, *words[1:]]
  raise AssertionError(f"README.md shows no `python -m medunifier_jax.{program}` command")


def with_flag(command: list[str], flag: str, value: str) -> list[str]:
  """`command` with `flag`'s value replaced (e.g. the README's workdir by the trained one)."""
  command = list(command)
  command[command.index(flag) + 1] = value
  return command


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
  folder = tmp_path_factory.mktemp("scratch")
  (folder / "configs").symlink_to(ROOT / "configs")
  rng = np.random.default_rng(0)
  # An 8-bit PNG of another aspect ratio and a 16-bit PNG: both are read as the builders read.
  Image.fromarray(rng.integers(0, 256, (200, 300), dtype=np.uint8)).save(folder / "a.png")
  Image.fromarray(rng.integers(0, 4096, (256, 256)).astype(np.uint16)).save(folder / "b.png")
  return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  # As a user's shell has it: one CPU device (the suite simulates eight for itself).
  flags = " ".join(
    f
    for f in os.environ.get("XLA_FLAGS", "").split()
    if not f.startswith("--xla_force_host_platform_device_count")
  )
  return cached_env(tmp_path_factory.mktemp("xla_cache"), XLA_FLAGS=flags)


def run(command: list[str], scratch, env) -> str:
  done = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, f"{shlex.join(command)}\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
  return done.stdout + done.stderr


@pytest.fixture(scope="module")
def trained(scratch, env):
  """The README's train command past a checkpoint (steps 2 and 4), then again to step 6."""
  train = readme_command("train")
  assert train[train.index("--workdir") + 1] == WORKDIR
  first = run(train + ["--config.num_steps=4", "--config.checkpoint_every=2"], scratch, env)
  saved = finished_checkpoints(scratch / WORKDIR)
  second = run(train + ["--config.num_steps=6", "--config.checkpoint_every=2"], scratch, env)
  return first, saved, second


def test_train_saves_checkpoints_in_a_relative_workdir_and_resumes(trained, scratch):
  first, saved, second = trained
  assert "fresh initialisation" in first
  assert saved == [2, 4]
  assert "resumed from step 4" in second
  assert {4, 6} <= set(records(scratch / WORKDIR))  # logged at checkpoints and at the end
  assert finished_checkpoints(scratch / WORKDIR)[-1] == 6


def test_evaluate_writes_results(trained, scratch, env):
  command = with_flag(readme_command("evaluate"), "--workdir", WORKDIR)
  run(command + ["--config.evals.finetune.label_fractions=(1.0,)"], scratch, env)
  results = json.loads((scratch / WORKDIR / "eval" / "results.json").read_text())["results"]
  tasks = command[command.index("--tasks") + 1].split(",")
  assert sorted(results) == sorted(tasks)
  # Rates of the argmax decision are NaN where undefined (metrics.classification_metrics), e.g.
  # NPV when a 6-step model calls every test image positive; every other figure is a number.
  may_be_undefined = {"auc", "sensitivity", "specificity", "ppv", "npv"}
  for entry in results.values():
    for metrics in entry.values():
      assert metrics
      for name, value in metrics.items():
        assert np.isfinite(value) or name in may_be_undefined, (name, value)


def test_api_example_runs_as_written(trained, scratch, env):
  code = next(b for b in code_blocks("python") if "api.load(" in b)
  assert 'api.load("workdirs/demo")' in code
  code = code.replace("workdirs/demo", WORKDIR)
  # The example's last values, checked: every line above ran on the relative workdir.
  code += (
    "\nimport numpy as np\n"
    "assert pixels.shape == (2, model.image_size, model.image_size, 3)\n"
    "assert np.isfinite(model.similarity(pixels, text['input_ids'], "
    "text['attention_mask'])).all()\n"
    "print('api example ok')\n"
  )
  assert "api example ok" in run([sys.executable, "-c", code], scratch, env)


def test_predict_prints_and_writes_json(trained, scratch, env):
  command = with_flag(readme_command("predict"), "--workdir", WORKDIR)
  images = command[command.index("--images") + 1 : command.index("--texts")]
  assert images == ["a.png", "b.png"]
  out = run(command + ["--json", "out.json"], scratch, env)
  predictions = json.loads((scratch / "out.json").read_text())["predictions"]
  assert [p["image"].endswith(name) for p, name in zip(predictions, images)] == [True, True]
  for p in predictions:
    assert isinstance(p["report"], str) and p["report"] in out
    assert [t["text"] for t in p["texts"]] == list(TEXTS)
    for t in p["texts"]:
      assert -1.0 <= t["similarity"] <= 1.0 and 0.0 <= t["match_probability"] <= 1.0


def test_prior_training_and_generate(trained, scratch, env):
  """The README's prior training on the trained workdir, then its generate command."""
  train = readme_command("train", "configs/prior.py")
  train = [w.replace("workdirs/demo", WORKDIR) for w in train]
  run(train + ["--config.num_steps=4"], scratch, env)
  generate = [w.replace("workdirs/demo", WORKDIR) for w in readme_command("generate")]
  run(generate, scratch, env)
  out = scratch / generate[generate.index("--out") + 1]
  pngs = sorted(p.name for p in out.glob("*.png"))
  assert len(pngs) >= int(generate[generate.index("--num") + 1])
