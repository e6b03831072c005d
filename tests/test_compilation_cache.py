"""The programs' persistent compilation cache (`compilation_cache`): the folder it picks, the
user's choice and opt-out respected, and a damaged folder costing a compile, never a run."""

import ast
import os
import subprocess
import sys
import textwrap

import jax
import pytest
from cli_runs import ROOT

from medunifier_jax import compilation_cache


@pytest.fixture
def restored_jax_config():
  names = ("jax_compilation_cache_dir", "jax_compilation_cache_max_size")
  before = {n: getattr(jax.config, n) for n in names}
  yield
  for n, v in before.items():
    jax.config.update(n, v)


def write_cpuinfo(path, flags):
  path.write_text(f"processor\t: 0\nmodel name\t: a chip\nflags\t\t: {flags}\n\n")
  return str(path)


def test_the_default_folder_is_per_user_and_per_chip_type(tmp_path):
  a = write_cpuinfo(tmp_path / "a", "fpu sse2 avx2 avx512f")
  same = write_cpuinfo(tmp_path / "same", "avx512f avx2 sse2 fpu")  # another order
  other = write_cpuinfo(tmp_path / "other", "fpu sse2 avx2")
  env = {"XDG_CACHE_HOME": "/caches"}
  folder = compilation_cache.default_dir(env, a)
  assert os.path.dirname(folder) == "/caches/medunifier_jax/xla"
  assert folder == compilation_cache.default_dir(env, same)
  assert folder != compilation_cache.default_dir(env, other)
  missing = compilation_cache.machine_tag(str(tmp_path / "absent"))
  assert missing.startswith(f"{os.uname().machine}-") and len(missing.split("-")[-1]) == 12
  home = compilation_cache.default_dir({}, a)
  assert home.startswith(os.path.join(os.path.expanduser("~"), ".cache", "medunifier_jax"))


def test_enable_leaves_a_users_choice_and_honours_the_opt_out(restored_jax_config):
  before = jax.config.jax_compilation_cache_dir
  assert compilation_cache.enable({compilation_cache.ENV: "/mine"}) == "/mine"
  assert compilation_cache.enable({compilation_cache.ENV: ""}) is None
  assert compilation_cache.enable({compilation_cache.OPT_OUT: "0"}) is None
  assert jax.config.jax_compilation_cache_dir == before  # none of them touched JAX


def test_enable_points_jax_at_the_default_folder(restored_jax_config, tmp_path):
  folder = compilation_cache.enable({"XDG_CACHE_HOME": str(tmp_path)})
  assert folder == compilation_cache.default_dir({"XDG_CACHE_HOME": str(tmp_path)})
  assert jax.config.jax_compilation_cache_dir == folder
  assert jax.config.jax_compilation_cache_max_size == compilation_cache.MAX_BYTES
  # A size the user set is JAX's to read (at import): enable leaves the setting as it is.
  jax.config.update("jax_compilation_cache_max_size", 123)
  kept = compilation_cache.enable(
    {"XDG_CACHE_HOME": str(tmp_path), "JAX_COMPILATION_CACHE_MAX_SIZE": "123"}
  )
  assert kept == folder
  assert jax.config.jax_compilation_cache_max_size == 123


PROGRAM = textwrap.dedent(
  """
  from medunifier_jax import compilation_cache
  compilation_cache.enable()
  import jax, jax.numpy as jnp
  print(float(jax.jit(lambda x: jnp.sin(x) @ x.T + 1.0)(jnp.ones((32, 32))).sum()))
  """
)


def test_programs_fill_the_folder_and_survive_damaged_entries(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != compilation_cache.ENV}
  # Every program cached, however quick its compile.
  env.update(XDG_CACHE_HOME=str(tmp_path), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  env["PYTHONPATH"] = str(ROOT)

  def run():
    done = subprocess.run(
      [sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return float(done.stdout.split()[-1]), done.stderr

  first, _ = run()
  folder = compilation_cache.default_dir(env)
  entries = [p for p in os.listdir(folder) if p.endswith("-cache")]
  assert entries, os.listdir(folder)
  for i, name in enumerate(entries):  # half cut short, half overwritten
    path = os.path.join(folder, name)
    if i % 2:
      os.truncate(path, 16)
    else:
      with open(path, "wb") as f:
        f.write(os.urandom(64))
  again, stderr = run()
  assert again == first
  assert "Error reading persistent compilation cache entry" in stderr


# The programs that train, evaluate or generate use the cache; those that print compile times
# turn it off.
USES_CACHE = ("train", "evaluate", "demo", "generate", "predict", "supervised_reference")
NO_CACHE = ("benchmark", "compile_report")


def calls_in_main(name: str) -> set[str]:
  tree = ast.parse((ROOT / "medunifier_jax" / f"{name}.py").read_text(encoding="utf-8"))
  main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
  return {
    f"{n.func.value.id}.{n.func.attr}"
    for n in ast.walk(main)
    if isinstance(n, ast.Call)
    and isinstance(n.func, ast.Attribute)
    and isinstance(n.func.value, ast.Name)
  }


@pytest.mark.parametrize("name", USES_CACHE + NO_CACHE)
def test_each_program_enables_or_disables_the_cache(name):
  calls = calls_in_main(name)
  want, unwanted = "compilation_cache.enable", "compilation_cache.disable"
  if name in NO_CACHE:
    want, unwanted = unwanted, want
  assert want in calls and unwanted not in calls, sorted(calls)
