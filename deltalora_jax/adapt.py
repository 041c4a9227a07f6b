"""Adapt an existing model: choose dense layers by target, adapt, merge, export.

A user has a pretrained model that was not written for this library. These
functions adapt some of its dense layers in one call, and turn the trained
result back into the original architecture:

* NNX: :func:`adapt_nnx` replaces the chosen ``nnx.Linear`` layers of any
  ``nnx.Module`` tree, in place, with :class:`~deltalora_jax.nnx.DeltaLoRALinear`
  adapters that keep their pretrained weights;
  :func:`merge_and_unload` gives back a copy with plain ``nnx.Linear`` layers.
* Linen: :func:`adapt_linen` wraps an existing ``nn.Module`` (its source is
  not edited) in a :class:`DeltaLoRAModel` that runs the chosen ``nn.Dense``
  layers as :class:`~deltalora_jax.DeltaLoRADense` through
  ``flax.linen.intercept_methods``, and adds the adapter variables to the
  pretrained ones at the paths of the layers they adapt;
  :func:`merge_and_unload` gives back the original model and variables it loads.
* Both: :func:`export_adapter` splits the small trained part (LoRA factors,
  ``D`` and their hyperparameters) from the frozen base;
  :func:`attach_adapter_nnx` and :func:`attach_adapter_linen` put it back on
  a fresh copy of the same base.

Targets (like PEFT's ``target_modules``) are matched against each module's
path written ``'a/b/c'`` (``'blocks/0/attn/q'`` in NNX, ``'blocks_0/attn/q'``
in Linen): a string is a regular expression that must match the whole path
(``re.fullmatch``); a list of names matches a path equal to a name or ending
with ``'/' + name``; None means every dense layer.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx, traverse_util
from flax.core import unfreeze

from deltalora_jax import core, paths, projections, tree
from deltalora_jax import linen as linen_front
from deltalora_jax import nnx as nnx_front
from deltalora_jax.linen import DELTA_COLLECTION, DeltaLoRADense, DeltaLoRAGeneral
from deltalora_jax.nnx import DeltaLoRALinear, DeltaLoRALinearGeneral

Path = tuple[str, ...]
#: Per-layer options that ``overrides`` may set.
LORA_OPTIONS = frozenset(
  {
    "rank",
    "alpha",
    "delta_scaling",
    "freeze_base",
    "use_delta",
    "evaluation",
    "lora_a_init",
    "adapter_dtype",
  }
)
_EXPORTED_OPTIONS = ("rank", "alpha", "delta_scaling", "freeze_base", "use_delta", "evaluation")
#: What ``targets`` may choose, in the words of the error messages.
ADAPTABLE = (
  "a layer that can be adapted (Dense, DenseGeneral/LinearGeneral, Einsum, Conv, or a subclass)"
)


# --------------------------------------------------------------------------
# Target selection, shared by both APIs.
# --------------------------------------------------------------------------


def _check_spec(arg: str, spec):
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


def _matches(spec, name: str) -> bool:
  if isinstance(spec, str):
    return re.fullmatch(spec, name) is not None
  return any(name == s or name.endswith("/" + s) for s in spec)


def select_targets(
  modules: Mapping[str, str], targets=None, exclude=None, *, dense: str, adapted: str
) -> list[str]:
  """The names of the modules that ``targets`` chooses and ``exclude`` keeps.

  Args:
    modules: ``{path name: kind}`` of every module but the root, where kind
      is ``dense`` (can be adapted), ``adapted`` (already adapted), or the
      module's type name (with the reason it cannot be adapted, if any).
    targets: regular expression, list of names, or None (every layer that
      can be adapted).
    exclude: regular expression, list of names, or None.
    dense: the kind of the dense layers, as ``modules`` spells it.
    adapted: the kind of the already adapted layers.

  Returns:
    The chosen names, in the order of ``modules``.

  Raises:
    ValueError: when nothing is chosen, a listed name matches no module, or
      a chosen layer is already adapted; the message lists the layers that
      can be adapted.
    TypeError: when a chosen module cannot be adapted (the message names
      its type and the supported kinds).

  Example:
    >>> modules = {"attn": "Attention", "attn/q": "dense", "mlp": "dense"}
    >>> select_targets(modules, r"attn/.*", dense="dense", adapted="adapted")
    ['attn/q']
  """
  targets = _check_spec("targets", targets)
  exclude = _check_spec("exclude", exclude)
  dense_names = [n for n, kind in modules.items() if kind == dense]
  adapted_names = [n for n, kind in modules.items() if kind == adapted]
  known = f"the layers that can be adapted are {dense_names}, the adapted ones {adapted_names}"
  if isinstance(targets, tuple):
    unknown = [s for s in targets if not any(_matches((s,), n) for n in modules)]
    if unknown:
      raise ValueError(f"targets {unknown} match no layer of the model; {known}")
  chosen = dense_names if targets is None else [n for n in modules if _matches(targets, n)]
  if exclude is not None:
    chosen = [n for n in chosen if not _matches(exclude, n)]
  if not chosen:
    raise ValueError(
      f"targets={targets!r} with exclude={exclude!r} match no layer of the model; {known}"
    )
  twice = [n for n in chosen if modules[n] == adapted]
  if twice:
    raise ValueError(
      f"layers {twice} are already adapted: each layer can be adapted once "
      "(merge_and_unload first to adapt it again)"
    )
  wrong = [f"{n!r} is a {modules[n]}" for n in chosen if modules[n] != dense]
  if wrong:
    raise TypeError(
      f"targets={targets!r} must choose layers that can be adapted, but {', '.join(wrong)}, "
      f"not {ADAPTABLE}; {known}"
    )
  return chosen


def _layer_options(chosen: Sequence[str], options: dict, overrides) -> dict[str, dict]:
  """The options of each chosen layer: ``options`` updated by the first matching override."""
  if overrides is None:
    return {name: dict(options) for name in chosen}
  if not isinstance(overrides, Mapping):
    raise TypeError(f"overrides must be a mapping {{regex: {{option: value}}}}, got {overrides!r}")
  for pattern, values in overrides.items():
    if not isinstance(pattern, str):
      raise TypeError(f"overrides keys must be regular expressions (str), got {pattern!r}")
    _check_spec("overrides key", pattern)
    if not isinstance(values, Mapping) or not set(values) <= LORA_OPTIONS:
      raise ValueError(
        f"overrides[{pattern!r}] must map options among {sorted(LORA_OPTIONS)} to values, "
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


def _report(variables, layers, names: Sequence[str]) -> dict:
  """What was adapted: the :func:`deltalora_jax.tree.layer_figures` of ``names``."""
  figures = tree.layer_figures(variables, layers)
  entries = {name: e for name, e in figures.items() if name in names}
  total = {
    "layers": len(entries),
    "parameter_count": sum(e["parameter_count"] for e in entries.values()),
  }
  return {"layers": entries, "total": total}


def format_report(report: Mapping) -> str:
  """A table of a report of :func:`adapt_nnx` or :func:`adapt_linen` (or :func:`diagnostics`).

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
  return "\n".join(
    f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}".rstrip()
    for r in rows
  )


# --------------------------------------------------------------------------
# NNX.
# --------------------------------------------------------------------------


def _nnx_kind(module) -> str:
  if isinstance(module, DeltaLoRALinear | DeltaLoRALinearGeneral | nnx.LoRALinear):
    return "adapted"
  try:
    nnx_front.projection_of(module)
  except TypeError as error:
    kinds = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv)
    reason = f" ({error})" if isinstance(module, kinds) else ""
    return type(module).__name__ + reason
  return "dense"


def _nnx_adapter(module, options: dict, rngs: nnx.Rngs):
  """The adapter of an NNX layer: :class:`DeltaLoRALinear` for one ``nnx.Linear``, else general."""
  if type(module) is nnx.Linear and module.kernel.ndim == 2:
    return DeltaLoRALinear.from_linear(module, rngs=rngs, **options)
  return DeltaLoRALinearGeneral(module, rngs=rngs, **options)


def _nnx_modules(model) -> dict[str, tuple[tuple, nnx.Module]]:
  if not isinstance(model, nnx.Module):
    raise TypeError(f"model must be an nnx.Module, got {type(model).__name__}")
  if _nnx_kind(model) != type(model).__name__:
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
  rank: int,
  alpha: float | None = None,
  delta_scaling: float = 0.1,
  freeze_base: bool = True,
  use_delta: bool = True,
  evaluation: core.Evaluation = "auto",
  lora_a_init: Any = None,
  adapter_dtype: Any = None,
  exclude: str | Sequence[str] | None = None,
  overrides: Mapping[str, Mapping[str, Any]] | None = None,
  rngs: nnx.Rngs,
  verbose: bool = False,
) -> dict:
  """Adapts the chosen projection layers of an NNX model, in place.

  The layers that can be adapted are ``nnx.Linear``, ``nnx.LinearGeneral``
  (the projections of ``nnx.MultiHeadAttention``), ``nnx.Einsum`` and
  ``nnx.Conv``, their subclasses, and stacks of them created with
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
      of layer names, or None for every layer that can be adapted.
    rank: LoRA rank of every chosen layer.
    alpha: LoRA alpha (None: ``alpha = rank``).
    delta_scaling: ``ds`` of the delta term.
    freeze_base: the base kernels get no gradient.
    use_delta: create ``D`` (False: plain LoRA).
    evaluation: see :func:`deltalora_jax.core.choose_evaluation`.
    lora_a_init: initializer of ``A`` (None: ``N(0, 1/rank)``).
    adapter_dtype: dtype of ``A``, ``B`` and ``D`` (None: float32, or the
      kernel's dtype when wider).
    exclude: layers to leave out, in the same forms as ``targets``.
    overrides: ``{regex: {option: value}}``, per-layer values of the options
      above (``rank``, ``alpha``, ...); the first regex that matches a
      layer's path wins, and each regex must match an adapted layer.
    rngs: draws each layer's ``A``.
    verbose: print the table of what was adapted.

  Returns:
    ``{'layers': {path: figures}, 'total': {'layers', 'parameter_count'}}``
    for the layers adapted by this call: shapes, rank, scaling and trainable
    parameter count of each (the figures of :func:`deltalora_jax.diagnostics`).

  Raises:
    ValueError: when the targets choose nothing (the message lists the
      layers that can be adapted), or a chosen layer is already adapted.
    TypeError: when a chosen module cannot be adapted (its type and the
      supported kinds are named).

  Example:
    >>> from flax import nnx
    >>> class MLP(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.up = nnx.Linear(4, 8, rngs=rngs)
    ...     self.down = nnx.Linear(8, 4, rngs=rngs)
    >>> model = MLP(nnx.Rngs(0))
    >>> report = adapt_nnx(model, ["up"], rank=2, rngs=nnx.Rngs(1))
    >>> type(model.up).__name__, type(model.down).__name__, report["total"]["parameter_count"]
    ('DeltaLoRALinear', 'Linear', 56)
  """
  modules = _nnx_modules(model)
  kinds = {name: _nnx_kind(m) for name, (_, m) in modules.items()}
  chosen = select_targets(kinds, targets, exclude, dense="dense", adapted="adapted")
  options = {
    "rank": rank,
    "alpha": alpha,
    "delta_scaling": delta_scaling,
    "freeze_base": freeze_base,
    "use_delta": use_delta,
    "evaluation": evaluation,
    "lora_a_init": lora_a_init,
    "adapter_dtype": adapter_dtype,
  }
  per_layer = _layer_options(chosen, options, overrides)
  new = {name: _nnx_adapter(modules[name][1], per_layer[name], rngs) for name in chosen}
  nnx_front.replace_modules(model, {modules[name][0]: layer for name, layer in new.items()})
  report = _report(model, None, chosen)
  if verbose:
    print(format_report(report))
  return report


# --------------------------------------------------------------------------
# Linen.
# --------------------------------------------------------------------------


class DeltaLoRAModel(nn.Module):
  """An existing Linen model whose chosen projection layers run with Delta-LoRA.

  The model's source is not edited: while the model runs, an interceptor
  (``flax.linen.intercept_methods``) replaces the call of each chosen
  ``nn.Dense``, ``nn.DenseGeneral``, ``nn.Einsum`` or ``nn.Conv`` by a
  :class:`~deltalora_jax.DeltaLoRAGeneral` on the same scope, so
  ``lora_a``/``lora_b`` sit beside ``kernel``/``bias`` in ``params`` and
  ``D`` at the same path in the ``'delta'`` collection, and the wrapper adds
  no level to the variables (``nn.share_scope``). Build it with
  :func:`adapt_linen` or :func:`attach_adapter_linen`.

  Layers stacked by ``nn.scan`` or ``nn.vmap`` (``variable_axes={'params':
  0}``) work as they are: those transforms lift the collections they are
  told of, ``'params'`` but not ``'delta'``, so while the model runs each
  ``D`` is moved into ``'params'`` beside its kernel (``nn.map_variables``),
  where the stack slices it as it slices the kernel, and moved back to
  ``'delta'`` on the way out (for ``mutable`` collections and gradients).
  The variables the user sees keep ``D`` in ``'delta'``, with the stack's
  leading axes.

  Attributes:
    model: the original Linen model.
    adapters: ``((path, ((option, value), ...)), ...)``: each adapted
      layer's path and the :class:`~deltalora_jax.DeltaLoRAGeneral`
      arguments that are not taken from the base layer itself (its
      ``projection``, ``use_bias``, rank, alpha, ...). Hashable, as a Linen
      attribute must be.
  """

  model: nn.Module
  adapters: tuple = ()

  def setup(self):
    nn.share_scope(self, self.model)

  @property
  def layers(self) -> dict[Path, DeltaLoRAGeneral]:
    """``{path: DeltaLoRAGeneral}``, the layers mapping of :mod:`deltalora_jax.tree`."""
    return {path: DeltaLoRAGeneral(**dict(options), parent=None) for path, options in self.adapters}

  def __call__(self, *args, **kwargs):
    configs = dict(self.adapters)
    prefix = tuple(self.path)

    def intercept(next_fun, call_args, call_kwargs, context):
      module = context.module
      path = tuple(module.path)
      if context.method_name != "__call__" or path[: len(prefix)] != prefix:
        return next_fun(*call_args, **call_kwargs)
      options = configs.get(path[len(prefix) :])
      if options is None or isinstance(module, DeltaLoRAGeneral):
        return next_fun(*call_args, **call_kwargs)
      name = "/".join(path)
      try:
        kind = linen_front.projection_of(module, _einsum_str(call_args, call_kwargs))
      except TypeError as error:
        raise TypeError(f"the adapter at {name!r} cannot run on this layer: {error}") from None
      options = dict(options)
      if (kind, module.use_bias) != (options["projection"], options["use_bias"]):
        raise ValueError(
          f"the {type(module).__name__} at {name!r} is {kind} with use_bias={module.use_bias}; "
          f"its adapter was made for {options['projection']} with use_bias={options['use_bias']}"
        )
      layer = DeltaLoRAGeneral(
        **options,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        precision=module.precision,
        kernel_init=module.kernel_init,
        bias_init=module.bias_init,
        delta_collection="params",  # where run() below puts D
        parent=module.scope,
      )
      return layer(*call_args, **call_kwargs)

    def run(wrapper, *args, **kwargs):
      with nn.intercept_methods(intercept):
        return wrapper.model(*args, **kwargs)

    adapted_paths = list(configs)
    run = nn.map_variables(
      run,
      ("params", DELTA_COLLECTION),
      trans_in_fn=functools.partial(_move_deltas, adapted_paths, DELTA_COLLECTION, "params"),
      trans_out_fn=functools.partial(_move_deltas, adapted_paths, "params", DELTA_COLLECTION),
      mutable=True,
    )
    return run(self, *args, **kwargs)


def _move_deltas(layer_paths: Sequence[Path], source: str, target: str, variables: Mapping) -> dict:
  """``variables`` with the ``D`` (``delta``) of the layers at ``paths`` moved to ``target``.

  Example:
    >>> variables = {"params": {"up": {"kernel": 1}}, "delta": {"up": {"delta": 2}}}
    >>> _move_deltas([("up",)], "delta", "params", variables)
    {'params': {'up': {'kernel': 1, 'delta': 2}}}
  """
  variables = dict(variables)
  moved = traverse_util.flatten_dict(unfreeze(variables.pop(source, {})))
  kept = traverse_util.flatten_dict(unfreeze(variables.pop(target, {})))
  for path in layer_paths:
    if (*path, "delta") in moved:
      kept[(*path, "delta")] = moved.pop((*path, "delta"))
  for name, flat in ((source, moved), (target, kept)):
    if flat:
      variables[name] = traverse_util.unflatten_dict(flat)
  return variables


_LINEN_KINDS = (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv)


def _einsum_str(args, kwargs) -> str | None:
  """The ``einsum_str`` given to an ``nn.Einsum`` call, by keyword or in second place."""
  return kwargs.get("einsum_str", args[1] if len(args) > 1 else None)


def _trace_linen(model: nn.Module, variables, inputs, call_kwargs) -> dict[str, dict]:
  """Every module that runs in ``model.apply(variables, *inputs)``, by path name.

  Each entry has the module's ``kind`` (``'dense'`` for a layer that can be
  adapted, with its ``module`` and ``projection``; ``'adapted'``; or its type
  name, with the reason when it is a projection layer that cannot be
  adapted). Runs under ``jax.eval_shape``: nothing is computed.
  """
  found: dict[str, dict] = {}

  def record(next_fun, args, kwargs, context):
    module = context.module
    if module.path:
      entry = found.setdefault("/".join(module.path), {"kind": type(module).__name__})
      if isinstance(module, DeltaLoRADense | DeltaLoRAGeneral):
        entry["kind"] = "adapted"
      elif entry["kind"] != "adapted" and context.method_name == "__call__":
        try:
          kind = linen_front.projection_of(module, _einsum_str(args, kwargs))
          entry.update(kind="dense", module=module, projection=kind)
        except TypeError as error:
          if isinstance(module, _LINEN_KINDS):
            entry["kind"] = f"{type(module).__name__} ({error})"
    return next_fun(*args, **kwargs)

  def run(variables):
    return model.apply(
      variables, *inputs, **call_kwargs, mutable=True, rngs={"dropout": jax.random.key(0)}
    )

  with nn.intercept_methods(record):
    jax.eval_shape(run, variables)
  return found


def _linen_parts(model, variables) -> tuple[nn.Module, dict, dict, dict]:
  """``(base model, existing adapters, flat params, variables as dicts)``."""
  if not isinstance(model, nn.Module):
    raise TypeError(f"model must be a flax.linen Module, got {type(model).__name__}")
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise ValueError(
      "variables must be the model's variables {'params': ...}, got "
      f"{list(variables) if isinstance(variables, Mapping) else type(variables).__name__}"
    )
  variables = unfreeze(variables) if not isinstance(variables, dict) else dict(variables)
  base, existing = model, {}
  if isinstance(model, DeltaLoRAModel):
    base, existing = model.model, dict(model.adapters)
  return base, existing, traverse_util.flatten_dict(unfreeze(variables["params"])), variables


def _with_adapters(variables: dict, params_flat: dict, new: dict[Path, dict]) -> dict:
  """``variables`` with each ``new[path]``'s arrays stored at ``path``."""
  deltas = traverse_util.flatten_dict(unfreeze(variables.get(DELTA_COLLECTION, {})))
  for path, arrays in new.items():
    for name, value in arrays.items():
      if name == "delta":
        deltas[(*path, name)] = value
      else:
        params_flat[(*path, name)] = value
  out = dict(variables)
  out["params"] = traverse_util.unflatten_dict(params_flat)
  if deltas:
    out[DELTA_COLLECTION] = traverse_util.unflatten_dict(deltas)
  return out


def adapt_linen(
  model: nn.Module,
  variables: Mapping,
  *inputs,
  targets: str | Sequence[str] | None = None,
  rank: int,
  alpha: float | None = None,
  delta_scaling: float = 0.1,
  freeze_base: bool = True,
  use_delta: bool = True,
  evaluation: core.Evaluation = "auto",
  lora_a_init: Any = None,
  adapter_dtype: Any = None,
  exclude: str | Sequence[str] | None = None,
  overrides: Mapping[str, Mapping[str, Any]] | None = None,
  key: jax.Array,
  call_kwargs: Mapping[str, Any] | None = None,
  verbose: bool = False,
) -> tuple[DeltaLoRAModel, dict]:
  """Adapts the chosen projection layers of an existing Linen model and its variables.

  The layers that can be adapted are ``nn.Dense``, ``nn.DenseGeneral`` (the
  projections of ``nn.MultiHeadDotProductAttention``), ``nn.Einsum`` and
  ``nn.Conv``, and their subclasses, also inside ``nn.scan`` / ``nn.vmap``
  stacks (the adapter arrays then get the stack's leading axes).

  The model is traced once on ``inputs`` (``jax.eval_shape``: no compute) to
  find its modules; targets are matched as in :func:`adapt_nnx`. The model
  definition is not edited: the result is a :class:`DeltaLoRAModel` around
  it, and the variables gain ``lora_a``/``lora_b`` beside each adapted
  layer's ``kernel`` and its ``D`` at the same path in ``'delta'``. The
  pretrained arrays are kept as they are: the output is unchanged until
  training.

  Args:
    model: the Linen model (or a :class:`DeltaLoRAModel`, to adapt more layers).
    variables: its pretrained variables, ``{'params': ..., ...}``.
    *inputs: sample inputs of ``model.apply(variables, *inputs)``.
    targets: regular expression, list of names, or None (every layer that
      can be adapted).
    rank: LoRA rank.
    alpha: LoRA alpha (None: ``alpha = rank``).
    delta_scaling: ``ds`` of the delta term.
    freeze_base: the base kernels get no gradient.
    use_delta: create ``D`` (False: plain LoRA).
    evaluation: see :func:`deltalora_jax.core.choose_evaluation`.
    lora_a_init: initializer of ``A`` (None: ``N(0, 1/rank)``).
    adapter_dtype: dtype of ``A``, ``B`` and ``D`` (None: float32, or the
      kernel's dtype when wider).
    exclude: layers to leave out.
    overrides: ``{regex: {option: value}}`` per-layer options, as in :func:`adapt_nnx`.
    key: PRNG key that draws the ``A`` factors.
    call_kwargs: keyword arguments of the model's ``__call__`` for the trace.
    verbose: print the table of what was adapted.

  Returns:
    ``(adapted, variables)``: apply with ``adapted.apply(variables, x)``;
    ``adapted.layers`` is the layers mapping of :mod:`deltalora_jax.tree`.

  Raises:
    ValueError: when the targets choose nothing (the message lists the
      layers that can be adapted), or a chosen layer is already adapted.
    TypeError: when a chosen module cannot be adapted (its type and the
      supported kinds are named).

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> class MLP(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return nn.Dense(4, name="down")(nn.relu(nn.Dense(8, name="up")(x)))
    >>> x = jnp.ones((1, 4))
    >>> variables = MLP().init(jax.random.key(0), x)
    >>> adapted, new = adapt_linen(MLP(), variables, x, targets=["up"], rank=2,
    ...                            key=jax.random.key(1))
    >>> jax.tree.map(jnp.shape, new["delta"])
    {'up': {'delta': (4, 8)}}
    >>> bool(jnp.array_equal(adapted.apply(new, x), MLP().apply(variables, x)))
    True
  """
  base, existing, params, variables = _linen_parts(model, variables)
  found = _trace_linen(model, variables, inputs, dict(call_kwargs or {}))
  for name, entry in found.items():
    if (*name.split("/"), "lora_a") in params:
      entry["kind"] = "adapted"
  kinds = {name: entry["kind"] for name, entry in found.items()}
  chosen = select_targets(kinds, targets, exclude, dense="dense", adapted="adapted")
  options = {
    "rank": rank,
    "alpha": alpha,
    "delta_scaling": delta_scaling,
    "freeze_base": freeze_base,
    "use_delta": use_delta,
    "evaluation": evaluation,
    "lora_a_init": lora_a_init,
    "adapter_dtype": adapter_dtype,
  }
  per_layer = _layer_options(chosen, options, overrides)
  adapters, new = dict(existing), {}
  for name, subkey in zip(chosen, jax.random.split(key, len(chosen)), strict=True):
    module, kind = found[name]["module"], found[name]["projection"]
    path = tuple(name.split("/"))
    layer_options = {"projection": kind, "use_bias": module.use_bias, **per_layer[name]}
    layer = DeltaLoRAGeneral(**layer_options, parent=None)  # checks the options
    new[path] = _new_adapter(name, layer, params[(*path, "kernel")], subkey)
    adapters[path] = tuple(sorted(layer_options.items()))
  adapted = DeltaLoRAModel(base, tuple(sorted(adapters.items())))
  variables = _with_adapters(variables, params, new)
  report = _report(variables, adapted.layers, ["/".join(p) for p in new])
  if verbose:
    print(format_report(report))
  return adapted, variables


def _layer_shape(name: str, kind: projections.Projection, kernel_shape) -> tuple[tuple, tuple]:
  """``(stack axes, one layer's kernel shape)`` of a kernel: ``nn.scan`` stacks lead."""
  stack = len(kernel_shape) - kind.kernel_ndim
  if stack < 0:
    raise ValueError(
      f"the kernel at {name!r} has shape {tuple(kernel_shape)}; a {kind.name} layer needs "
      f"{kind.kernel_ndim} axes"
    )
  return tuple(kernel_shape[:stack]), tuple(kernel_shape[stack:])


def _new_adapter(name: str, layer: DeltaLoRAGeneral, kernel, key) -> dict[str, jax.Array]:
  """Fresh ``lora_a``, ``lora_b`` (and ``D``) for ``layer`` beside ``kernel`` (stacked or not)."""
  kind = layer.projection
  stack, shape = _layer_shape(name, kind, jnp.shape(kernel))
  bound = kind.rank_bound(shape)
  if layer.rank > bound:
    raise ValueError(
      f"rank must satisfy 0 < rank <= {bound} for the kernel {shape} at {name!r}, "
      f"got rank={layer.rank}"
    )
  dtype = linen_front.adapter_dtype(layer.adapter_dtype, kernel.dtype)
  a_shape, b_shape = kind.factor_shapes(shape, layer.rank)
  a_init = layer.lora_a_init or core.lora_a_init(layer.rank)  # as the layer does
  key_a, key_b = jax.random.split(key)  # one key per parameter
  arrays = {
    "lora_a": a_init(key_a, (*stack, *a_shape), dtype),
    "lora_b": layer.lora_b_init(key_b, (*stack, *b_shape), dtype),
  }
  if layer.use_delta:
    arrays["delta"] = jnp.zeros(jnp.shape(kernel), dtype)
  return arrays


# --------------------------------------------------------------------------
# Merge and unload; export and re-attach.
# --------------------------------------------------------------------------


def merge_and_unload(model, variables: Mapping | None = None):
  """The original architecture with merged kernels ``W + s A B + ds D``.

  Args:
    model: an adapted NNX model, or a :class:`DeltaLoRAModel`.
    variables: the Linen variables (None for NNX).

  Returns:
    NNX: a copy of ``model`` whose adapters are plain ``nnx.Linear``
    (``model`` is not modified). Linen: ``(original model, variables)``
    where the variables are those of :func:`deltalora_jax.merge`, which the
    unmodified model definition loads.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> class MLP(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.up = nnx.Linear(4, 8, rngs=rngs)
    >>> model = MLP(nnx.Rngs(0))
    >>> _ = adapt_nnx(model, rank=2, rngs=nnx.Rngs(1))
    >>> type(merge_and_unload(model).up).__name__
    'Linear'
  """
  if isinstance(model, nnx.Module):
    if variables is not None:
      raise TypeError("variables must be None for an NNX model")
    return nnx_front.merged_model(model)
  if not isinstance(model, DeltaLoRAModel):
    raise TypeError(
      f"model must be an adapted NNX model or a DeltaLoRAModel, got {type(model).__name__}"
    )
  if variables is None:
    raise TypeError("variables are required with a DeltaLoRAModel")
  return model.model, tree.merge(variables, model.layers)


def export_adapter(variables, layers=None) -> dict:
  """The trained adapter alone: its arrays and the hyperparameters to use them.

  Args:
    variables: an adapted NNX model, or Linen variables.
    layers: for Linen, a :class:`DeltaLoRAModel` or its ``layers`` mapping.

  Returns:
    ``{'config': {name: {...}}, 'weights': {name: {...}}}`` keyed by layer
    path ``'a/b/c'``. The config of each layer (``projection``, the layer
    kind as :func:`deltalora_jax.projections.to_json` writes it,
    ``kernel_shape`` with any stack axes, ``use_bias`` and the LoRA options)
    holds only Python numbers, bools, strings, lists and None (JSON-ready);
    the weights are
    ``lora_a``, ``lora_b``, ``delta`` (unless ``use_delta=False``), and the
    base ``kernel``/``bias`` only for a layer trained with
    ``freeze_base=False``. Arrays are shared, not copied.

  Example:
    >>> from flax import nnx
    >>> class MLP(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.up = nnx.Linear(4, 8, rngs=rngs)
    >>> model = MLP(nnx.Rngs(0))
    >>> _ = adapt_nnx(model, rank=2, rngs=nnx.Rngs(1))
    >>> adapter = export_adapter(model)
    >>> adapter["config"]["up"]["rank"], sorted(adapter["weights"]["up"])
    (2, ['delta', 'lora_a', 'lora_b'])
  """
  if isinstance(layers, DeltaLoRAModel):
    layers = layers.layers
  variables, layers, _ = tree._resolve(variables, layers)
  params = traverse_util.flatten_dict(unfreeze(variables["params"]))
  deltas = traverse_util.flatten_dict(unfreeze(variables.get(DELTA_COLLECTION, {})))
  config, weights = {}, {}
  for path, layer in layers.items():
    name = paths.name(path)
    kernel = params[(*path, "kernel")]
    config[name] = {
      "projection": projections.to_json(layer.projection),
      "kernel_shape": [int(n) for n in kernel.shape],
      "use_bias": bool(layer.use_bias),
      "rank": int(layer.rank),
      "alpha": None if layer.alpha is None else float(layer.alpha),
      "delta_scaling": float(layer.delta_scaling),
      "freeze_base": bool(layer.freeze_base),
      "use_delta": bool(layer.use_delta),
      "evaluation": str(layer.evaluation),
      "adapter_dtype": None if layer.adapter_dtype is None else jnp.dtype(layer.adapter_dtype).name,
    }
    arrays = {"lora_a": params[(*path, "lora_a")], "lora_b": params[(*path, "lora_b")]}
    if layer.use_delta:
      arrays["delta"] = deltas[(*path, "delta")]
    if not layer.freeze_base:
      arrays["kernel"] = kernel
      if layer.use_bias:
        arrays["bias"] = params[(*path, "bias")]
    weights[name] = arrays
  return {"config": config, "weights": weights}


def _check_adapter(adapter) -> tuple[dict, dict]:
  if not isinstance(adapter, Mapping) or set(adapter) != {"config", "weights"}:
    raise ValueError(
      "adapter must be the {'config', 'weights'} mapping of export_adapter, got "
      f"{list(adapter) if isinstance(adapter, Mapping) else type(adapter).__name__}"
    )
  config, weights = adapter["config"], adapter["weights"]
  if set(config) != set(weights) or not config:
    raise ValueError(
      f"adapter config and weights must name the same layers, got {sorted(config)} "
      f"and {sorted(weights)}"
    )
  return dict(config), dict(weights)


def _config_kind(name: str, cfg: Mapping) -> tuple[projections.Projection, tuple, tuple]:
  """``(projection, stack axes, one layer's kernel shape)`` of an adapter's layer config."""
  missing = {"projection", "kernel_shape", "use_bias", *_EXPORTED_OPTIONS} - set(cfg)
  if missing:
    raise ValueError(f"adapter config of {name!r} lacks {sorted(missing)}")
  kind = projections.from_json(dict(cfg["projection"]))
  return kind, *_layer_shape(name, kind, tuple(cfg["kernel_shape"]))


def _expected_shapes(name: str, cfg: Mapping) -> dict[str, tuple[int, ...]]:
  kind, stack, shape = _config_kind(name, cfg)
  a_shape, b_shape = kind.factor_shapes(shape, cfg["rank"])
  shapes = {"lora_a": (*stack, *a_shape), "lora_b": (*stack, *b_shape)}
  if cfg["use_delta"]:
    shapes["delta"] = (*stack, *shape)
  if not cfg["freeze_base"]:
    shapes["kernel"] = (*stack, *shape)
    if cfg["use_bias"]:
      shapes["bias"] = (*stack, *kind.bias_shape(shape))
  return shapes


def _check_weights(name: str, cfg: Mapping, arrays: Mapping) -> dict[str, jax.Array]:
  expected = _expected_shapes(name, cfg)
  if set(arrays) != set(expected):
    raise ValueError(
      f"adapter weights of {name!r} must be {sorted(expected)}, got {sorted(arrays)}"
    )
  for key, shape in expected.items():
    if tuple(jnp.shape(arrays[key])) != shape:
      raise ValueError(
        f"adapter weight {name}/{key} must have shape {shape}, got {jnp.shape(arrays[key])}"
      )
  return {key: jnp.asarray(value) for key, value in arrays.items()}


def attach_adapter_nnx(model: nnx.Module, adapter: Mapping) -> dict:
  """Puts an exported adapter back on a fresh copy of the same NNX base model, in place.

  Each named ``nnx.Linear`` becomes a :class:`~deltalora_jax.nnx.DeltaLoRALinear`
  with the adapter's options and weights. Everything is checked before any
  layer is replaced.

  Args:
    model: the base model (plain ``nnx.Linear`` at the adapter's paths).
    adapter: the result of :func:`export_adapter`.

  Returns:
    The report of the attached layers, as :func:`adapt_nnx` gives.

  Raises:
    ValueError: for a path that is not in the model, a layer already
      adapted, or a shape that differs.
    TypeError: for a path whose module is not an ``nnx.Linear``.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> class MLP(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.up = nnx.Linear(4, 8, rngs=rngs)
    >>> model = MLP(nnx.Rngs(0))
    >>> _ = adapt_nnx(model, rank=2, rngs=nnx.Rngs(1))
    >>> model.up.lora_b[...] = jnp.ones((2, 8))  # as if trained
    >>> fresh = MLP(nnx.Rngs(0))  # the same pretrained base
    >>> _ = attach_adapter_nnx(fresh, export_adapter(model))
    >>> x = jnp.ones((1, 4))
    >>> bool(jnp.array_equal(fresh.up(x), model.up(x)))
    True
  """
  config, weights = _check_adapter(adapter)
  modules = _nnx_modules(model)
  kinds = {name: _nnx_kind(m) for name, (_, m) in modules.items()}
  adaptable = [n for n, kind in kinds.items() if kind == "dense"]
  new = {}
  for name, cfg in config.items():
    if name not in kinds:
      raise ValueError(
        f"adapter layer {name!r} is not in the model; the layers that can be adapted: {adaptable}"
      )
    if kinds[name] == "adapted":
      raise ValueError(f"layer {name!r} is already adapted")
    if kinds[name] != "dense":
      raise TypeError(f"adapter layer {name!r} is a {kinds[name]} in the model, not {ADAPTABLE}")
    module = modules[name][1]
    kind = _config_kind(name, cfg)[0]
    given = (nnx_front.projection_of(module), tuple(module.kernel.shape))
    if given != (kind, tuple(cfg["kernel_shape"])):
      raise ValueError(
        f"the {type(module).__name__} at {name!r} is {given[0]} with kernel {given[1]}; the "
        f"adapter was trained for {kind} with kernel {tuple(cfg['kernel_shape'])}"
      )
    arrays = _check_weights(name, cfg, weights[name])
    options = {k: cfg[k] for k in _EXPORTED_OPTIONS}
    options["adapter_dtype"] = cfg.get("adapter_dtype")
    options["lora_a_init"] = nnx.initializers.zeros_init()  # A is the adapter's, set below
    layer = _nnx_adapter(module, options, nnx.Rngs(0))
    for key, value in arrays.items():
      getattr(layer, key)[...] = value.astype(getattr(layer, key)[...].dtype)
    new[name] = layer
  nnx_front.replace_modules(model, {modules[name][0]: layer for name, layer in new.items()})
  return _report(model, None, list(new))


def attach_adapter_linen(
  model: nn.Module, variables: Mapping, adapter: Mapping
) -> tuple[DeltaLoRAModel, dict]:
  """Puts an exported adapter back on the same Linen base model and its variables.

  No trace is needed: the adapter's paths are checked against the kernels in
  ``variables['params']``; when the model runs, a path whose module is not
  an ``nn.Dense`` is an error.

  Args:
    model: the original Linen model (or a :class:`DeltaLoRAModel`).
    variables: the base variables, ``{'params': ...}``.
    adapter: the result of :func:`export_adapter`.

  Returns:
    ``(adapted, variables)`` as :func:`adapt_linen` gives.

  Raises:
    ValueError: for a path without a kernel, a layer already adapted, or a
      shape that differs.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> class MLP(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return nn.Dense(8, name="up")(x)
    >>> x = jnp.ones((1, 4))
    >>> pretrained = MLP().init(jax.random.key(0), x)
    >>> adapted, variables = adapt_linen(MLP(), pretrained, x, rank=2, key=jax.random.key(1))
    >>> adapter = export_adapter(variables, adapted)
    >>> again, restored = attach_adapter_linen(MLP(), pretrained, adapter)
    >>> bool(jnp.array_equal(again.apply(restored, x), adapted.apply(variables, x)))
    True
  """
  config, weights = _check_adapter(adapter)
  base, existing, params, variables = _linen_parts(model, variables)
  kernels = sorted("/".join(k[:-1]) for k in params if k[-1] == "kernel")
  adapters, new = dict(existing), {}
  for name, cfg in config.items():
    path = tuple(name.split("/"))
    kernel = params.get((*path, "kernel"))
    if kernel is None:
      raise ValueError(
        f"adapter layer {name!r} has no kernel in variables['params']; layers with a "
        f"kernel: {kernels}"
      )
    if path in existing or (*path, "lora_a") in params:
      raise ValueError(f"layer {name!r} is already adapted")
    if tuple(kernel.shape) != tuple(cfg["kernel_shape"]):
      raise ValueError(
        f"the kernel at {name!r} has shape {kernel.shape}; the adapter was trained for "
        f"{tuple(cfg['kernel_shape'])}"
      )
    arrays = _check_weights(name, cfg, weights[name])
    dtype = linen_front.adapter_dtype(cfg.get("adapter_dtype"), kernel.dtype)
    new[path] = {
      key: value.astype(kernel.dtype if key in ("kernel", "bias") else dtype)
      for key, value in arrays.items()
    }
    options = {"projection": _config_kind(name, cfg)[0], "use_bias": cfg["use_bias"]}
    options.update({k: cfg[k] for k in _EXPORTED_OPTIONS})
    options["adapter_dtype"] = cfg.get("adapter_dtype")
    DeltaLoRAGeneral(**options, parent=None)  # checks the options
    adapters[path] = tuple(sorted(options.items()))
  adapted = DeltaLoRAModel(base, tuple(sorted(adapters.items())))
  return adapted, _with_adapters(variables, params, new)
