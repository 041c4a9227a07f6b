"""Adapting an existing NNX model: its chosen layers replaced by adapters, in place."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Unpack

from flax import nnx

from deltalora_jax import core, paths
from deltalora_jax import nnx as nnx_front
from deltalora_jax.adapt.targets import (
  ADAPTABLE_KINDS,
  ADAPTED,
  check_layer_rank,
  check_options,
  layer_options,
  report,
  select_excluded,
  select_targets,
)
from deltalora_jax.config import Options
from deltalora_jax.nnx import DeltaLoRALinear, DeltaLoRALinearGeneral


def kind(module: Any) -> str:
  """A module's kind: its projection's name when it can be adapted (``'general_dense'``,
  ``'einsum'``, ``'conv'``), ``'adapted'``, or its type name (with the reason)."""
  if isinstance(module, DeltaLoRALinear | DeltaLoRALinearGeneral | nnx.LoRALinear):
    return ADAPTED
  try:
    described = nnx_front.describe(module)
  except TypeError as error:
    reason = f" ({error})" if projection_like(module) else ""
    return type(module).__name__ + reason
  return described.projection.name


def projection_like(module: Any) -> bool:
  """Whether a module that cannot be adapted looks like a projection (then it is reported).

  One of: an instance of a registered kind (Flax's ``Linear``,
  ``LinearGeneral``, ``Einsum``, ``Conv``, or a kind of
  :func:`~deltalora_jax.register_projection`) that its describer refused;
  Flax's ``ConvTranspose``; a module with an ``einsum_str`` attribute; a
  module of a class outside Flax with its own ``__call__`` that holds an
  ``nnx.Param`` of two axes or more itself (a weight its call may multiply
  by: a mixture of experts' stacked kernels). Flax's other modules (its
  norms, ``Embed``, even stacked by ``nnx.vmap``) are not, nor is a module
  without ``__call__`` (tunix's ``Embedder``: ``encode`` and ``decode``).
  """
  if isinstance(module, (*nnx_front._DESCRIBERS, nnx.ConvTranspose)) or hasattr(
    module, "einsum_str"
  ):
    return True
  if type(module).__module__.startswith("flax.") or not any(
    "__call__" in vars(cls) for cls in type(module).__mro__ if cls not in _MODULE_BASES
  ):
    return False
  return any(isinstance(v, nnx.Param) and v.ndim >= 2 for v in vars(module).values())


#: The classes of every NNX module (their ``__call__``, if any, is not the module's own).
_MODULE_BASES = frozenset(nnx.Module.__mro__)


def adapter(
  module: Any, options: Mapping[str, Any], rngs: nnx.Rngs
) -> DeltaLoRALinear | DeltaLoRALinearGeneral:
  """The adapter of an NNX layer: :class:`DeltaLoRALinear` for one ``nnx.Linear``, else general."""
  if type(module) is nnx.Linear and module.kernel.ndim == 2:
    return DeltaLoRALinear.from_linear(module, rngs=rngs, **options)
  return DeltaLoRALinearGeneral(module, rngs=rngs, **options)


def modules(model: Any) -> dict[str, tuple[tuple[Any, ...], nnx.Module]]:
  """``{name: (NNX path, module)}`` of every module of ``model`` but the root."""
  if not isinstance(model, nnx.Module):
    raise TypeError(f"model must be an nnx.Module, got {type(model).__name__}")
  if kind(model) != type(model).__name__:
    raise TypeError(
      f"model must hold the layers to adapt, got a single {type(model).__name__}: use "
      "DeltaLoRALinear.from_linear(linear, rank=..., rngs=...) or "
      "DeltaLoRALinearGeneral(layer, rank=..., rngs=...) for one layer"
    )
  return {paths.name(p): (p, m) for p, m in nnx.iter_modules(model) if p}


def adapt_nnx(
  model: nnx.Module,
  targets: str | Sequence[str] | None = None,
  *,
  rngs: nnx.Rngs,
  exclude: str | Sequence[str] | None = None,
  overrides: Mapping[str, Mapping[str, Any]] | None = None,
  verbose: bool = False,
  base_quantization: str | None = None,
  **options: Unpack[Options],
) -> tuple[nnx.Module, dict[str, Any]]:
  """Adapts the chosen projection layers of an NNX model, in place.

  The layers that can be adapted are ``nnx.Linear``, ``nnx.LinearGeneral``
  (the projections of ``nnx.MultiHeadAttention``), ``nnx.Einsum`` and
  ``nnx.Conv``, their subclasses, the kinds taught with
  :func:`~deltalora_jax.register_projection`, modules like tunix's
  ``Einsum`` (:func:`~deltalora_jax.nnx.describe`), and stacks of them created with
  ``nnx.vmap`` (applied with ``nnx.scan``). An ``nnx.Linear`` is replaced by
  :meth:`DeltaLoRALinear.from_linear
  <deltalora_jax.nnx.DeltaLoRALinear.from_linear>` of it, the others by
  :class:`~deltalora_jax.nnx.DeltaLoRALinearGeneral`: same kernel and bias,
  ``B = D = 0``, so the model's output is unchanged until training. All
  layers are checked and built before any is replaced: on an error the
  model is left as it was.

  Args:
    model: any ``nnx.Module`` tree holding such layers.
    targets: regular expression on the layer path (``re.fullmatch``), list
      of layer names, or None for every layer that can be adapted
      (:mod:`deltalora_jax.adapt.targets`).
    rngs: draws each layer's ``A``.
    exclude: layers to leave out, in the same forms as ``targets``.
    overrides: ``{regex: {option: value}}``, per-layer values of the
      options; the first regex that matches a layer's path wins, and each
      regex must match an adapted layer.
    verbose: print the table of what was adapted.
    base_quantization: ``'int8'`` makes the adapted layers' bases int8 with
      one float32 scale per output channel; ``'nf4'`` QLoRA's NF4 codes with
      one per block of 64 along the input (needs qwix; an input axis 64 does
      not divide is refused, naming the layer)
      (:meth:`~deltalora_jax.nnx.DeltaLoRALinearGeneral.quantize_base`; their
      report entries say ``'base_quantization': 'int8'``); None keeps them.
    **options: the adapters' options (:class:`~deltalora_jax.config.Options`):
      ``rank`` (required), ``alpha``, ``delta_scaling``, ``freeze_base``,
      ``use_delta``, ``evaluation``, ``adapter_dtype``, ``use_rslora``
      (``s = alpha / sqrt(rank)``), ``paper_lambda``, ``lora_a_init``; the
      defaults are the layers' own.

  Returns:
    ``(model, report)``: the model itself, and ``{'layers': {name: figures},
    'total': {'layers', 'parameter_count'}, 'skipped': {name: reason}}`` for
    the layers adapted by this call (the figures of
    :func:`deltalora_jax.diagnostics`). With ``targets=None``, ``'skipped'``
    names every projection-like module (:func:`projection_like`) that cannot
    be adapted and is not excluded, with the reason, and a ``UserWarning``
    lists them: nothing is left alone silently. With targets it is empty (a
    chosen module that cannot be adapted raises).

  Raises:
    ValueError: when the targets choose nothing (the message lists the
      layers that can be adapted), or a chosen layer is already adapted.
    TypeError: when a chosen module cannot be adapted (its type and the
      supported kinds are named), or an option is unknown.

  Example:
    >>> from flax import nnx
    >>> class MLP(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.up = nnx.Linear(4, 8, rngs=rngs)
    ...     self.down = nnx.Linear(8, 4, rngs=rngs)
    >>> model, report = adapt_nnx(MLP(nnx.Rngs(0)), ["up"], rank=2, rngs=nnx.Rngs(1))
    >>> type(model.up).__name__, type(model.down).__name__, report["total"]["parameter_count"]
    ('DeltaLoRALinear', 'Linear', 56)
  """
  checked = check_options(options)
  core.check_base_quantization(base_quantization)
  found = modules(model)
  kinds = {name: kind(m) for name, (_, m) in found.items()}
  chosen = select_targets(kinds, targets, exclude)
  per_layer = layer_options(chosen, checked, overrides)
  for name in chosen:  # before any layer is built, naming the layer
    module = found[name][1]  # of an adaptable kind: a description names its kernel
    described = nnx_front.describe(module)
    shape = tuple(getattr(module, described.kernel).shape)
    layer_shape = shape[len(shape) - described.projection.kernel_ndim :]  # stack axes lead
    check_layer_rank(name, described.projection, layer_shape, per_layer[name]["rank"])
    core.check_quantizable(f"layer {name!r}", base_quantization, shape, described.projection)
  quantization = {} if base_quantization is None else {"base_quantization": base_quantization}
  new = {
    name: adapter(found[name][1], {**per_layer[name], **quantization}, rngs) for name in chosen
  }
  skipped = {} if targets is not None else _skipped(kinds, found, exclude)
  paths.replace_modules(model, {found[name][0]: layer for name, layer in new.items()})
  if skipped:
    warnings.warn(
      f"adapt_nnx adapted {len(chosen)} layers and left alone {len(skipped)} projection-like "
      f"module(s) it cannot adapt: {skipped} (report['skipped']; teach a kind with "
      "deltalora_jax.register_projection, or exclude=... to leave it out knowingly)",
      stacklevel=2,
    )
  return model, report(model, None, chosen, verbose, skipped=skipped)


def _skipped(
  kinds: Mapping[str, str],
  found: Mapping[str, tuple[tuple[Any, ...], nnx.Module]],
  exclude: str | Sequence[str] | None,
) -> dict[str, str]:
  """``{name: reason}`` of the projection-like modules that cannot be adapted, less ``exclude``."""
  excluded = set(select_excluded(list(kinds), exclude))
  return {
    name: kinds[name]
    for name, (_, module) in found.items()
    if kinds[name] not in ADAPTABLE_KINDS | {ADAPTED}
    and name not in excluded
    and not _inside_adapted(name, kinds)
    and projection_like(module)
  }


def _inside_adapted(name: str, kinds: Mapping[str, str]) -> bool:
  """Whether ``name`` lies inside an adapted layer (its base's submodules are not the model's)."""
  parts = name.split("/")
  return any(kinds.get("/".join(parts[:i])) == ADAPTED for i in range(1, len(parts)))
