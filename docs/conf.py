"""Sphinx configuration of the deltalora_jax documentation.

Build (warnings are errors), from the repository root:

  python -m sphinx -W --keep-going -b html docs docs/_build/html

Nothing is fetched at build time (no intersphinx mappings): the build runs offline.
"""

import inspect

import sphinx.util.inspect

import deltalora_jax

project = "deltalora_jax"
author = "deltalora_jax authors"
copyright = "the deltalora_jax authors"
release = deltalora_jax.__version__
version = release

extensions = [
  "myst_parser",
  "sphinx.ext.autodoc",
  "sphinx.ext.napoleon",
  "sphinx.ext.viewcode",
]

# Markdown pages (MyST); the results file next to the demo's figure is data, not a page.
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
# study.md is written by `python -m deltalora_jax study` and included by guides/demo.md.
exclude_patterns = ["_build", "study.md"]
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

# The docstrings are the single source of the API reference: Google style, with Sphinx roles.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_preserve_defaults = True
# A method without a docstring (DeltaLoRAModel.setup) is not given its Flax base's.
autodoc_inherit_docstrings = False
# Annotations are strings (``from __future__ import annotations``): these aliases are shown by
# name instead of expanded into their unions.
autodoc_type_aliases = {
  "ArrayLike": "jax.typing.ArrayLike",
  "DTypeLike": "jax.typing.DTypeLike",
  "Initializer": "flax.typing.Initializer",
  "PrecisionLike": "flax.typing.PrecisionLike",
  "jax.lax.PrecisionLike": "jax.lax.PrecisionLike",
  "optax.OptState": "optax.OptState",
  "optax.Params": "optax.Params",
  "optax.ScalarOrSchedule": "optax.ScalarOrSchedule",
  "optax.Updates": "optax.Updates",
}
# Sphinx writes such an alias inside a union (``DTypeLike | None``) by its placeholder's repr,
# ``TypeAliasForwardRef('jax.typing.DTypeLike')`` (seen with Sphinx 9.0); the placeholder's
# name is what the alias stands for.
if hasattr(sphinx.util.inspect, "TypeAliasForwardRef"):
  sphinx.util.inspect.TypeAliasForwardRef.__repr__ = lambda self: self.name
# Napoleon escapes the trailing underscore of an argument named ``lambda_`` only with this
# option on (else reStructuredText reads ``lambda_`` as a link and shows ``lambda``).
strip_signature_backslash = True

html_theme = "sphinx_book_theme"
html_title = "deltalora_jax"
html_theme_options = {"show_toc_level": 2}


def _init_signature(app, what, name, obj, options, signature, return_annotation):
  """An NNX class's signature: its ``__init__``'s.

  NNX's metaclass defines ``__call__(cls, *args, **kwargs)``, which autodoc (as
  ``inspect.signature``) takes for the constructor's signature.
  """
  del app, name, options
  if what != "class" or signature != "(*args, **kwargs)":
    return None
  init = inspect.signature(obj.__init__)
  init = init.replace(parameters=list(init.parameters.values())[1:])
  return sphinx.util.inspect.stringify_signature(init, show_annotation=False), return_annotation


def setup(app):
  app.connect("autodoc-process-signature", _init_signature)
