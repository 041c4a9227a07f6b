"""Where a layer sits in a model: paths and their names, in one place.

A *path* is a tuple of strings, one per level (``('blocks_0', 'attn',
'query')``; NNX's integer keys are written as strings); its *name* joins them
with ``'/'`` (``'blocks_0/attn/query'``), the root layer's name being ``''``.
Every module of this library that turns a path into a name, a name into a
path, or a ``jax.tree_util`` key path into either, calls this module; so
does every module that reads or replaces the module at a path of an NNX
model (:func:`module_at`, :func:`replace_modules`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import jax
from flax import nnx

Path = tuple[str, ...]


def name(path: Iterable[Any]) -> str:
  """``'a/0/b'`` for the path ``('a', 0, 'b')``; ``''`` for the root ``()``.

  >>> name(("blocks", 0, "attn")), name(())
  ('blocks/0/attn', '')
  """
  return "/".join(map(str, path))


def as_path(key: str | Sequence[Any]) -> Path:
  """A path from a name ``'a/b'`` or any sequence of keys; ``''`` and ``()`` are the root.

  >>> as_path("blocks/0/attn"), as_path(("blocks", 0)), as_path("")
  (('blocks', '0', 'attn'), ('blocks', '0'), ())
  """
  if isinstance(key, str):
    return tuple(key.split("/")) if key else ()
  if isinstance(key, Sequence):
    return tuple(map(str, key))
  raise TypeError(f"a layer path must be a name 'a/b' or a tuple of keys, got {key!r}")


def _entry_name(entry: Any) -> str | None:
  # An NNX Variable is a pytree node whose child is its ``.value``: the
  # variable's name is the key above it, so that attribute step is skipped.
  if isinstance(entry, jax.tree_util.GetAttrKey) and entry.name == "value":
    return None
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return None


def key_path(entries: Iterable[Any]) -> Path:
  """The path of a ``jax.tree_util`` key path, NNX's ``.value`` step left out.

  Example:
    >>> import jax
    >>> tree = {"params": {"dense": {"kernel": 0.0}}, "opt": (0.0,)}
    >>> [key_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    [('opt', '0'), ('params', 'dense', 'kernel')]
  """
  return tuple(n for n in map(_entry_name, entries) if n is not None)


def key_name(entries: Iterable[Any]) -> str:
  """The name of a ``jax.tree_util`` key path: ``name(key_path(entries))``."""
  return name(key_path(entries))


def _child(parent: Any, key: Any) -> Any:
  """The child of an NNX node under one path entry (attribute or item)."""
  if isinstance(key, str) and not isinstance(parent, nnx.Dict) and hasattr(parent, key):
    return getattr(parent, key)
  return parent[key]


def module_at(model: nnx.Module, path: Sequence[Any]) -> Any:
  """The module at ``path`` (NNX path entries, as ``nnx.iter_modules`` gives) of ``model``.

  >>> from flax import nnx
  >>> class Block(nnx.Module):
  ...   def __init__(self, rngs):
  ...     self.layers = nnx.List([nnx.Linear(2, 2, rngs=rngs)])
  >>> type(module_at(Block(nnx.Rngs(0)), ("layers", 0))).__name__
  'Linear'
  """
  node: Any = model
  for key in path:
    node = _child(node, key)
  return node


def _put(model: nnx.Module, path: Sequence[Any], module: Any) -> None:
  parent, key = module_at(model, path[:-1]), path[-1]
  if isinstance(key, str) and not isinstance(parent, nnx.Dict) and hasattr(parent, key):
    setattr(parent, key, module)
  else:
    parent[key] = module


def replace_modules(model: nnx.Module, replacements: dict[tuple[Any, ...], Any]) -> None:
  """Puts each module of ``{path: module}`` into ``model``, in place: all of them or none.

  Paths are NNX path entries, never the root. A container that refuses
  assignment (a tuple, say) raises after some modules may already be in
  place: those are put back before the error propagates, so the model is
  left as it was.
  """
  done: list[tuple[tuple[Any, ...], Any]] = []
  try:
    for path, module in replacements.items():
      old = module_at(model, path)
      _put(model, path, module)
      done.append((path, old))
  except Exception:
    for path, old in reversed(done):
      _put(model, path, old)
    raise
