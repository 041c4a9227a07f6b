"""The core install is enough for the library: every package it imports is a core dependency."""

import ast
import importlib.metadata
import pathlib
import re
import sys
import tomllib

ROOT = pathlib.Path(__file__).parents[1]


def _imported_top_names(path: pathlib.Path) -> set[str]:
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names |= {alias.name.split(".")[0] for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names.add(node.module.split(".")[0])
  return names


def _requirement_name(requirement: str) -> str:
  return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_every_import_of_the_library_is_a_core_dependency():
  """The demo has its own extra; the rest of the package must import with the core alone."""
  core = {
    _requirement_name(r)
    for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
  }
  provided = importlib.metadata.packages_distributions()
  library = [p for p in (ROOT / "deltalora_jax").rglob("*.py") if "demo" not in p.parts]
  missing = {}
  for path in library:
    for name in _imported_top_names(path):
      if name in sys.stdlib_module_names or name == "deltalora_jax":
        continue
      distributions = {d.lower().replace("_", "-") for d in provided.get(name, [name])}
      # jax installs numpy.
      if not distributions & (core | {"numpy"}):
        missing.setdefault(name, []).append(str(path.relative_to(ROOT)))
  assert not missing, f"imported by the library but not core dependencies: {missing}"
