"""Every command-line program has one shape: absl flags defined at module level, `main(argv)`
run by `app.run`, and nothing else worth importing.

absl flags may be defined only once per process, so a program that other code imports clashes
with the next program defining the same flag (`--config`, `--workdir`); and flags defined inside
a function with `global` are invisible to readers and linters. The programs therefore stay
wiring only (flags, main, printing) and their work lives in library modules, which the tests and
the other modules import instead. Read with `ast` only: nothing is imported, no JAX starts.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "medunifier_jax"

# The command-line programs (`python -m NAME`).
CLI_MODULES = (
  "medunifier_jax.benchmark",
  "medunifier_jax.compile_report",
  "medunifier_jax.data.bench_pipeline",
  "medunifier_jax.data.contact_sheet",
  "medunifier_jax.data.prepare",
  "medunifier_jax.demo",
  "medunifier_jax.evaluate",
  "medunifier_jax.generate",
  "medunifier_jax.predict",
  "medunifier_jax.profile_step",
  "medunifier_jax.supervised_reference",
  "medunifier_jax.train",
  "medunifier_jax.trim_bert",
)


def module_name(path: Path) -> str:
  """`ROOT/medunifier_jax/data/prepare.py` -> `medunifier_jax.data.prepare`."""
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_path(name: str) -> Path:
  return ROOT.joinpath(*name.split(".")).with_suffix(".py")


def parse(path: Path) -> ast.Module:
  return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def is_main_guard(node: ast.stmt) -> bool:
  """`if __name__ == "__main__":`."""
  return (
    isinstance(node, ast.If)
    and isinstance(node.test, ast.Compare)
    and isinstance(node.test.left, ast.Name)
    and node.test.left.id == "__name__"
    and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators)
  )


def python_files(*folders: str) -> list[Path]:
  return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def package_of(path: Path) -> str:
  """The package relative imports in `path` resolve against."""
  name = module_name(path)
  return name if path.name == "__init__.py" else name.rpartition(".")[0]


def imported_modules(tree: ast.Module, package: str) -> set[str]:
  """Every module an import statement anywhere in `tree` (functions included) may load:
  `from a import b` counts as importing both `a` and `a.b`, since `b` may be a module.
  `package` is the one relative imports start from."""
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: one level is the package itself, each more its parent
        parts = package.split(".")
        anchor = parts[: len(parts) - node.level + 1]
        base = ".".join([*anchor, *([base] if base else [])])
      out.add(base)
      out.update(f"{base}.{alias.name}" for alias in node.names)
  return out


def test_the_list_names_every_program():
  """A new program (a module with a `__main__` block) is checked too, once listed here."""
  programs = {
    module_name(p)
    for p in python_files(PACKAGE)
    if any(is_main_guard(node) for node in parse(p).body)
  }
  assert programs == set(CLI_MODULES)


@pytest.mark.parametrize("name", CLI_MODULES)
def test_program_uses_absl_flags_at_module_level(name):
  tree = parse(module_path(name))
  problems = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import | ast.ImportFrom):
      modules = (
        [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
      )
      if any(m.split(".")[0] == "argparse" for m in modules):
        problems.append(f"line {node.lineno}: imports argparse (use absl flags)")
      if (
        isinstance(node, ast.ImportFrom)
        and node.module == "sys"
        and any(a.name == "argv" for a in node.names)
      ):
        problems.append(f"line {node.lineno}: imports sys.argv (absl passes argv to main)")
    elif isinstance(node, ast.Global | ast.Nonlocal):
      problems.append(f"line {node.lineno}: `global` (define flags at module level)")
    elif (
      isinstance(node, ast.Attribute)
      and node.attr == "argv"
      and isinstance(node.value, ast.Name)
      and node.value.id == "sys"
    ):
      problems.append(f"line {node.lineno}: reads sys.argv (read flags, or main's argv)")
  for func in ast.walk(tree):
    if isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
      for node in ast.walk(func):
        if (
          isinstance(node, ast.Call)
          and isinstance(node.func, ast.Attribute)
          and node.func.attr.startswith("DEFINE")
        ):
          problems.append(f"line {node.lineno}: defines a flag inside {func.name}()")
  assert not problems, f"{name}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("name", CLI_MODULES)
def test_program_runs_main_through_app_run(name):
  tree = parse(module_path(name))
  assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body), name
  guards = [n for n in tree.body if is_main_guard(n)]
  assert len(guards) == 1, name
  calls = [n for n in ast.walk(guards[0]) if isinstance(n, ast.Call)]
  assert any(
    isinstance(c.func, ast.Attribute)
    and c.func.attr == "run"
    and isinstance(c.func.value, ast.Name)
    and c.func.value.id == "app"
    and c.args
    and isinstance(c.args[0], ast.Name)
    and c.args[0].id == "main"
    for c in calls
  ), f"{name}: its __main__ block does not call app.run(main)"


def test_no_module_imports_a_program():
  """Programs are run (`python -m NAME`, subprocesses name them in strings), never imported:
  importing one would define its flags a second time beside another program's."""
  programs = set(CLI_MODULES)
  offenders = []
  for path in python_files(PACKAGE, "tests", "configs"):
    hits = imported_modules(parse(path), package_of(path)) & programs
    offenders += [f"{path.relative_to(ROOT)} imports {m}" for m in sorted(hits)]
  assert not offenders, "\n".join(offenders)


def test_library_modules_define_no_flags_at_import():
  """Flags defined when a library is imported would clash with a program's own flags."""
  programs = set(CLI_MODULES)
  offenders = []
  for path in python_files(PACKAGE):
    if module_name(path) in programs:
      continue
    for node in parse(path).body:  # module level only; functions may define flags on request
      for call in ast.walk(node):
        if (
          isinstance(call, ast.Call)
          and isinstance(call.func, ast.Attribute)
          and call.func.attr.startswith("DEFINE")
          and not isinstance(node, ast.FunctionDef | ast.ClassDef)
        ):
          offenders.append(f"{path.relative_to(ROOT)}:{call.lineno}")
  assert not offenders, "flags defined at import: " + ", ".join(offenders)


def test_the_checks_see_what_they_look_for():
  """The checks above on small sources: they would catch each shape they forbid."""
  tree = ast.parse(
    "import sys\nfrom .. import evaluate\nfrom medunifier_jax.data import prepare\n"
    "def f():\n  from medunifier_jax import predict\n"
  )
  found = imported_modules(tree, "medunifier_jax.evaluators")
  assert {
    "medunifier_jax.evaluate",
    "medunifier_jax.data.prepare",
    "medunifier_jax.predict",
  } <= found
  assert is_main_guard(ast.parse('if __name__ == "__main__":\n  pass\n').body[0])
