"""Choosing the layers to adapt, and the report of what was adapted.

Targets (like PEFT's ``target_modules``) are matched against each module's
path written ``'a/b/c'`` (``'blocks/0/attn/q'`` in NNX, ``'blocks_0/attn/q'``
in Linen): a string is a regular expression that must match the whole path
(``re.fullmatch``); a list of names matches a path equal to a name or ending
with ``'/' + name``; None means every layer that can be adapted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from deltalora_jax import core, projections, tree
from deltalora_jax.config import Options

#: What ``targets`` may choose, in the words of the error messages.
ADAPTABLE = (
  "a layer that can be adapted (Dense, DenseGeneral/LinearGeneral, Einsum, Conv, or a subclass; "
  "NNX: a kind registered with register_projection, or a module like tunix's Einsum)"
)
#: The names of the options of :class:`~deltalora_jax.config.Options`: what ``**options`` and
#: ``overrides`` may set.
ADAPTER_OPTIONS = frozenset(Options.__annotations__)
#: The kinds of the layers that can be adapted: the ``name`` of each projection of
#: :mod:`deltalora_jax.projections`, the ``kind`` of :func:`deltalora_jax.diagnostics`.
ADAPTABLE_KINDS = frozenset({"general_dense", "einsum", "conv"})
#: The kind of a module that is already an adapter.
ADAPTED = "adapted"


#: A ``targets`` or ``exclude`` value: a regular expression, layer names, or None.
Spec = str | Sequence[str] | None


def _check_spec(arg: str, spec: object) -> str | tuple[str, ...] | None:
  if spec is None:
    return None
  if isinstance(spec, str):
    try:
      re.compile(spec)
    except re.error as error:
      raise ValueError(
        f"{arg} must be a valid regular expression, got {arg}={spec!r}: {error}"
      ) from None
    return spec
  if isinstance(spec, Sequence) and spec and all(isinstance(s, str) for s in spec):
    return tuple(spec)
  raise TypeError(
    f"{arg} must be a regular expression (str), a non-empty list of layer names or None, "
    f"got {arg}={spec!r}"
  )


def _matches(spec: str | tuple[str, ...], name: str) -> bool:
  if isinstance(spec, str):
    return re.fullmatch(spec, name) is not None
  return any(name == s or name.endswith("/" + s) for s in spec)


def select_targets(
  modules: Mapping[str, str],
  targets: Spec = None,
  exclude: Spec = None,
) -> list[str]:
  """The names of the modules that ``targets`` chooses and ``exclude`` keeps.

  Args:
    modules: ``{path name: kind}`` of every module but the root, where kind
      is one of :data:`ADAPTABLE_KINDS` (a layer that can be adapted, by its
      projection's name: ``'general_dense'``, ``'einsum'``, ``'conv'``),
      :data:`ADAPTED` (already adapted), or the module's type name (with the
      reason it cannot be adapted, if any).
    targets: regular expression, list of names, or None (every layer that
      can be adapted).
    exclude: regular expression, list of names, or None.

  Returns:
    The chosen names, in the order of ``modules``.

  Raises:
    ValueError: when nothing is chosen, a name of ``targets`` or ``exclude``
      (or the ``exclude`` regular expression) matches no module, or a chosen
      layer is already adapted; the message lists the layers that can be
      adapted.
    TypeError: when a chosen module cannot be adapted (the message names
      its type and the supported kinds).

  Example:
    >>> modules = {"attn": "Attention", "attn/q": "general_dense", "mlp": "conv"}
    >>> select_targets(modules, r"attn/.*")
    ['attn/q']
  """
  targets = _check_spec("targets", targets)
  exclude = _check_spec("exclude", exclude)
  adaptable_names = [n for n, kind in modules.items() if kind in ADAPTABLE_KINDS]
  adapted_names = [n for n, kind in modules.items() if kind == ADAPTED]
  known = f"the layers that can be adapted are {adaptable_names}, the adapted ones {adapted_names}"
  for arg, spec in (("targets", targets), ("exclude", exclude)):  # a typo chooses nothing
    if isinstance(spec, tuple):
      unknown = [s for s in spec if not any(_matches((s,), n) for n in modules)]
      if unknown:
        raise ValueError(f"{arg} {unknown} match no layer of the model; {known}")
  if isinstance(exclude, str) and not any(_matches(exclude, n) for n in modules):
    raise ValueError(f"exclude={exclude!r} matches no layer of the model; {known}")
  chosen = adaptable_names if targets is None else [n for n in modules if _matches(targets, n)]
  if exclude is not None:
    chosen = [n for n in chosen if not _matches(exclude, n)]
  if not chosen:
    raise ValueError(
      f"targets={targets!r} with exclude={exclude!r} match no layer of the model; {known}"
    )
  twice = [n for n in chosen if modules[n] == ADAPTED]
  if twice:
    raise ValueError(
      f"layers {twice} are already adapted: each layer can be adapted once "
      "(deltalora_jax.merge first to adapt it again)"
    )
  wrong = [f"{n!r} is a {modules[n]}" for n in chosen if modules[n] not in ADAPTABLE_KINDS]
  if wrong:
    raise TypeError(
      f"targets={targets!r} must choose layers that can be adapted, but {', '.join(wrong)}, "
      f"not {ADAPTABLE}; {known}"
    )
  return chosen


def check_layer_rank(
  name: str, projection: projections.Projection, layer_shape: Sequence[int], rank: object
) -> int:
  """Raises unless ``rank`` fits one kernel ``layer_shape`` of the layer ``name``; returns it.

  The one check of both fronts' ``adapt_*``, so that the message names the layer.

  Example:
    >>> projection = projections.GeneralDense(features=(1,))
    >>> check_layer_rank("head", projection, (8, 1), 2)
    Traceback (most recent call last):
    ValueError: rank must satisfy 0 < rank <= 1 for the kernel (8, 1) of the layer 'head', ...
  """
  return core.check_layer_rank(rank, projection, layer_shape, f"the layer {name!r}")


def select_excluded(names: Sequence[str], exclude: Spec) -> list[str]:
  """The names among ``names`` that ``exclude`` matches (none for None).

  >>> select_excluded(["attn/q", "mlp"], r"attn/.*")
  ['attn/q']
  """
  exclude = _check_spec("exclude", exclude)
  return [] if exclude is None else [n for n in names if _matches(exclude, n)]


def layer_options(
  chosen: Sequence[str], options: Mapping[str, Any], overrides: Any
) -> dict[str, dict[str, Any]]:
  """The options of each chosen layer: ``options`` updated by the first matching override."""
  if overrides is None:
    return {name: dict(options) for name in chosen}
  if not isinstance(overrides, Mapping):
    raise TypeError(f"overrides must be a mapping {{regex: {{option: value}}}}, got {overrides!r}")
  for pattern, values in overrides.items():
    if not isinstance(pattern, str):
      raise TypeError(f"overrides keys must be regular expressions (str), got {pattern!r}")
    _check_spec("overrides key", pattern)
    if not isinstance(values, Mapping) or not set(values) <= ADAPTER_OPTIONS:
      raise ValueError(
        f"overrides[{pattern!r}] must map options among {sorted(ADAPTER_OPTIONS)} to values, "
        f"got {values!r}"
      )
    if not any(re.fullmatch(pattern, name) for name in chosen):
      raise ValueError(
        f"overrides key {pattern!r} matches none of the adapted layers {list(chosen)}"
      )
  result = {}
  for name in chosen:
    result[name] = dict(options)
    for pattern, values in overrides.items():
      if re.fullmatch(pattern, name):
        result[name].update(values)
        break
  return result


def check_options(options: Mapping[str, Any]) -> dict[str, Any]:
  """``options`` as a dict, after checking its names (``rank`` is required)."""
  if unknown := sorted(set(options) - ADAPTER_OPTIONS):
    raise TypeError(f"unknown options {unknown}; the options are {sorted(ADAPTER_OPTIONS)}")
  if "rank" not in options:
    raise TypeError("rank is required: the LoRA rank of the adapted layers, e.g. rank=8")
  return dict(options)


def report(
  model_or_variables: Any,
  layers: Any,
  names: Sequence[str],
  verbose: bool,
  *,
  skipped: Mapping[str, str] | None = None,
) -> dict[str, Any]:
  """What was adapted: the :func:`deltalora_jax.tree.layer_figures` of ``names`` and a total.

  With ``skipped`` (``{name: reason}`` of the projection-like modules left
  alone), the report has it as ``'skipped'``. Printed as a table
  (:func:`format_report`) when ``verbose``.
  """
  figures = tree.layer_figures(model_or_variables, layers)
  entries = {name: e for name, e in figures.items() if name in names}
  total = {
    "layers": len(entries),
    "parameter_count": sum(e["parameter_count"] for e in entries.values()),
  }
  result: dict[str, Any] = {"layers": entries, "total": total}
  if skipped is not None:
    result["skipped"] = dict(skipped)
  if verbose:
    print(format_report(result))
  return result


def format_report(report: Mapping[str, Any]) -> str:
  """A table of a report of :func:`~deltalora_jax.adapt_nnx` or :func:`~deltalora_jax.adapt_linen`.

  Example:
    >>> report = {"layers": {"attn/q": {"kernel_shape": [8, 8], "rank": 2,
    ...           "parameter_count": 96}}, "total": {"layers": 1, "parameter_count": 96}}
    >>> print(format_report(report))
    layer   shape  rank  trainable
    attn/q  8x8       2         96
    total                       96
  """
  rows = [("layer", "shape", "rank", "trainable")]
  for name, e in report["layers"].items():
    rows.append(
      (name, "x".join(map(str, e["kernel_shape"])), str(e["rank"]), f"{e['parameter_count']:,}")
    )
  rows.append(("total", "", "", f"{report['total']['parameter_count']:,}"))
  widths = [max(len(r[i]) for r in rows) for i in range(4)]
  table = "\n".join(
    f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}".rstrip()
    for r in rows
  )
  skipped = report.get("skipped") or {}
  return "\n".join([table, *(f"left alone: {name}: {why}" for name, why in skipped.items())])
