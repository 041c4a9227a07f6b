"""Adapting an existing Linen model: :class:`DeltaLoRAModel` runs its chosen layers adapted."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias, Unpack

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from flax.core import FrozenDict, unfreeze

from deltalora_jax import core, paths, projections, tree
from deltalora_jax import linen as linen_front
from deltalora_jax.adapt.targets import (
  check_layer_rank,
  check_options,
  layer_options,
  report,
  select_targets,
)
from deltalora_jax.config import Options
from deltalora_jax.config import adapter_dtype as resolve_adapter_dtype
from deltalora_jax.linen import (
  DELTA_COLLECTION,
  QUANTIZED_COLLECTION,
  SNAPSHOT_COLLECTION,
  DeltaLoRADense,
  DeltaLoRAGeneral,
)

Path = paths.Path
#: ``((path, ((option, value), ...)), ...)``: the adapted layers of a :class:`DeltaLoRAModel`.
Adapters = tuple[tuple[Path, tuple[tuple[str, Any], ...]], ...]
#: What ``nn.intercept_methods`` passes an interceptor: the call to go on with, the call's
#: positional and keyword arguments, and the context (the module and method called).
Next: TypeAlias = Callable[..., Any]
CallArgs: TypeAlias = tuple[Any, ...]
CallKwargs: TypeAlias = dict[str, Any]
Context: TypeAlias = nn.module.InterceptorContext


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
  adapters: Adapters = ()

  def setup(self) -> None:
    nn.share_scope(self, self.model)

  @property
  def layers(self) -> dict[str, DeltaLoRAGeneral]:
    """``{name: DeltaLoRAGeneral}``, the layers mapping of :mod:`deltalora_jax.tree`."""
    return {
      paths.name(path): DeltaLoRAGeneral(**dict(options), parent=None)
      for path, options in self.adapters
    }

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    configs = dict(self.adapters)
    prefix = tuple(self.path)

    def intercept(
      next_fun: Next, call_args: CallArgs, call_kwargs: CallKwargs, context: Context
    ) -> Any:
      module = context.module
      path = tuple(module.path)
      if context.method_name != "__call__" or path[: len(prefix)] != prefix:
        return next_fun(*call_args, **call_kwargs)
      options = configs.get(path[len(prefix) :])
      if options is None or isinstance(module, DeltaLoRAGeneral):
        return next_fun(*call_args, **call_kwargs)
      name = "/".join(path)
      try:
        projection = linen_front.projection_of(module, _einsum_str(call_args, call_kwargs))
      except TypeError as error:
        raise TypeError(f"the adapter at {name!r} cannot run on this layer: {error}") from None
      arguments = dict(options)
      made_for = arguments["projection"], arguments["use_bias"]
      if (projection, module.use_bias) != made_for:
        raise ValueError(
          f"the {type(module).__name__} at {name!r} is {projection} with "
          f"use_bias={module.use_bias}; its adapter was made for {made_for[0]} with "
          f"use_bias={made_for[1]}"
        )
      layer = DeltaLoRAGeneral(
        **arguments,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        precision=module.precision,
        kernel_init=module.kernel_init,
        bias_init=module.bias_init,
        delta_collection="params",  # where run() below puts D
        parent=module.scope,  # type: ignore[arg-type]  # Flax takes a Scope; its field omits it
      )
      return layer(*call_args, **call_kwargs)

    def run(wrapper: DeltaLoRAModel, *args: Any, **kwargs: Any) -> Any:
      with nn.intercept_methods(intercept):
        return wrapper.model(*args, **kwargs)

    adapted_paths = list(configs)

    def move_in(variables: Mapping[str, Any]) -> dict[str, Any]:
      variables = _move_deltas(adapted_paths, DELTA_COLLECTION, "params", variables)
      variables = _move_deltas(adapted_paths, QUANTIZED_COLLECTION, "params", variables, _INT8)
      return _move_deltas(
        adapted_paths, SNAPSHOT_COLLECTION, "params", variables, names=core.SNAPSHOT_NAMES
      )

    def move_out(variables: Mapping[str, Any]) -> dict[str, Any]:
      variables = _move_deltas(adapted_paths, "params", DELTA_COLLECTION, variables)
      variables = _move_deltas(adapted_paths, "params", QUANTIZED_COLLECTION, variables, _INT8)
      return _move_deltas(
        adapted_paths, "params", SNAPSHOT_COLLECTION, variables, names=core.SNAPSHOT_NAMES
      )

    mapped = nn.map_variables(
      run,
      ("params", DELTA_COLLECTION, SNAPSHOT_COLLECTION, QUANTIZED_COLLECTION),
      trans_in_fn=move_in,
      trans_out_fn=move_out,
      mutable=True,
    )
    return mapped(self, *args, **kwargs)


def _move_deltas(
  layer_paths: Sequence[Path],
  source: str,
  target: str,
  variables: Mapping[str, Any],
  names: Sequence[str] = ("delta",),
) -> dict[str, Any]:
  """``variables`` with the ``D`` (``delta``; or ``names``) of the layers at ``paths`` moved.

  Example:
    >>> variables = {"params": {"up": {"kernel": 1}}, "delta": {"up": {"delta": 2}}}
    >>> _move_deltas([("up",)], "delta", "params", variables)
    {'params': {'up': {'kernel': 1, 'delta': 2}}}
  """
  variables = dict(variables)
  moved = traverse_util.flatten_dict(unfreeze(variables.pop(source, {})))
  kept = traverse_util.flatten_dict(unfreeze(variables.pop(target, {})))
  for path in layer_paths:
    if names == _INT8 and (*path, core.KERNEL_SCALE) not in moved:
      continue  # a float kernel stays where it is: only an int8 base moves, with its scales
    for name in names:
      if (*path, name) in moved:
        kept[(*path, name)] = moved.pop((*path, name))
  for name, flat in ((source, moved), (target, kept)):
    if flat:
      variables[name] = traverse_util.unflatten_dict(flat)
  return variables


_LINEN_KINDS = (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv)
#: The arrays of an int8 base (the ``'quantized'`` collection), moved together.
_INT8 = ("kernel", core.KERNEL_SCALE)


def _einsum_str(args: Sequence[Any], kwargs: Mapping[str, Any]) -> str | None:
  """The ``einsum_str`` given to an ``nn.Einsum`` call, by keyword or in second place."""
  einsum_str: str | None = kwargs.get("einsum_str", args[1] if len(args) > 1 else None)
  return einsum_str


def trace_linen(
  model: nn.Module,
  variables: Mapping[str, Any],
  inputs: Sequence[Any],
  call_kwargs: Mapping[str, Any],
) -> dict[str, dict[str, Any]]:
  """Every module that runs in ``model.apply(variables, *inputs)``, by path name.

  Each entry has the module's ``kind`` (its projection's name for a layer that
  can be adapted, with its ``module``, ``projection`` and the ``kernel_shape`` one
  call uses; ``'adapted'``; or its type name, with the reason when it is a
  projection layer that cannot be adapted). Runs under ``jax.eval_shape``:
  nothing is computed.
  """
  found: dict[str, dict[str, Any]] = {}

  def record(next_fun: Next, args: CallArgs, kwargs: CallKwargs, context: Context) -> Any:
    module = context.module
    if module.path:
      entry = found.setdefault("/".join(module.path), {"kind": type(module).__name__})
      if isinstance(module, DeltaLoRADense | DeltaLoRAGeneral):
        entry["kind"] = "adapted"
      elif entry["kind"] != "adapted" and context.method_name == "__call__":
        try:
          projection = linen_front.projection_of(module, _einsum_str(args, kwargs))
          inputs = args[0] if args else kwargs.get("inputs")
          shape = None if inputs is None else projection.kernel_shape(jnp.shape(inputs))
          entry.update(
            kind=projection.name, module=module, projection=projection, kernel_shape=shape
          )
        except TypeError as error:
          if isinstance(module, _LINEN_KINDS):
            entry["kind"] = f"{type(module).__name__} ({error})"
    return next_fun(*args, **kwargs)

  def run(variables: Mapping[str, Any]) -> Any:
    return model.apply(
      variables, *inputs, **call_kwargs, mutable=True, rngs={"dropout": jax.random.key(0)}
    )

  with nn.intercept_methods(record):
    jax.eval_shape(run, variables)
  return found


def linen_parts(
  model: Any, variables: Any
) -> tuple[nn.Module, dict[Path, Any], dict[Path, Any], dict[str, Any]]:
  """``(base model, existing adapters, flat params, variables as dicts)``."""
  if not isinstance(model, nn.Module):
    raise TypeError(f"model must be a flax.linen Module, got {type(model).__name__}")
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise ValueError(
      "variables must be the model's variables {'params': ...}, got "
      f"{list(variables) if isinstance(variables, Mapping) else type(variables).__name__}"
    )
  variables = unfreeze(variables) if isinstance(variables, FrozenDict) else dict(variables)
  base: nn.Module = model
  existing: dict[Path, Any] = {}
  if isinstance(model, DeltaLoRAModel):
    base, existing = model.model, dict(model.adapters)
  return base, existing, traverse_util.flatten_dict(unfreeze(variables["params"])), variables


def with_adapters(
  variables: dict[str, Any], params_flat: dict[Path, Any], new: dict[Path, dict[str, jax.Array]]
) -> dict[str, Any]:
  """``variables`` with each ``new[path]``'s arrays stored at ``path``.

  ``D`` goes to the ``'delta'`` collection, the snapshot factors to ``'snapshot'``, the rest
  to ``'params'``.
  """
  flat = {
    c: traverse_util.flatten_dict(unfreeze(variables.get(c, {})))
    for c in (DELTA_COLLECTION, SNAPSHOT_COLLECTION)
  }
  flat["params"] = params_flat
  for path, arrays in new.items():
    for name, value in arrays.items():
      flat[linen_front.collection_of(name)][(*path, name)] = value
  out = dict(variables)
  for collection, leaves in flat.items():
    if leaves or collection == "params":
      out[collection] = traverse_util.unflatten_dict(leaves)
  return out


def adapt_linen(
  model: nn.Module,
  variables: Mapping[str, Any],
  *inputs: Any,
  targets: str | Sequence[str] | None = None,
  key: jax.Array,
  exclude: str | Sequence[str] | None = None,
  overrides: Mapping[str, Mapping[str, Any]] | None = None,
  call_kwargs: Mapping[str, Any] | None = None,
  verbose: bool = False,
  base_quantization: str | None = None,
  **options: Unpack[Options],
) -> tuple[DeltaLoRAModel, dict[str, Any], dict[str, Any]]:
  """Adapts the chosen projection layers of an existing Linen model and its variables.

  The layers that can be adapted are ``nn.Dense``, ``nn.DenseGeneral`` (the
  projections of ``nn.MultiHeadDotProductAttention``), ``nn.Einsum`` and
  ``nn.Conv``, and their subclasses, also inside ``nn.scan`` / ``nn.vmap``
  stacks (the adapter arrays then get the stack's leading axes).

  The model is traced once on ``inputs`` (``jax.eval_shape``: no compute) to
  find its modules. The model definition is not edited: the result is a
  :class:`DeltaLoRAModel` around it, and the variables gain
  ``lora_a``/``lora_b`` beside each adapted layer's ``kernel`` and its ``D``
  at the same path in ``'delta'``. The pretrained arrays are kept as they
  are: the output is unchanged until training.

  Args:
    model: the Linen model (or a :class:`DeltaLoRAModel`, to adapt more layers).
    variables: its pretrained variables, ``{'params': ..., ...}`` (not modified).
    *inputs: sample inputs of ``model.apply(variables, *inputs)``.
    targets: which layers, as in :func:`~deltalora_jax.adapt_nnx`.
    key: PRNG key that draws the ``A`` factors.
    exclude: layers to leave out, as in :func:`~deltalora_jax.adapt_nnx`.
    overrides: per-layer options, as in :func:`~deltalora_jax.adapt_nnx`.
    call_kwargs: keyword arguments of the model's ``__call__`` for the trace.
    verbose: print the table of what was adapted.
    base_quantization: ``'int8'`` moves the adapted layers' kernels, as int8
      with one float32 ``kernel_scale`` per output channel, to the
      ``'quantized'`` collection (:func:`~deltalora_jax.quantize_base`):
      differentiate the other collections only; ``'nf4'`` the same as QLoRA's
      NF4 codes (uint4), one scale per block of 64 along the input (needs
      qwix; an input axis 64 does not divide is refused, naming the layer).
      None keeps them.
    **options: the adapters' options, as in :func:`~deltalora_jax.adapt_nnx`.

  Returns:
    ``(adapted, variables, report)``: apply with ``adapted.apply(variables,
    x)``; ``adapted`` is also the ``layers`` argument of the whole-model
    functions (:mod:`deltalora_jax.tree`); the report is
    :func:`~deltalora_jax.adapt_nnx`'s.

  Raises:
    ValueError, TypeError: as :func:`~deltalora_jax.adapt_nnx` raises them
      (targets that choose nothing or a layer already adapted; a module that
      cannot be adapted or an unknown option).

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> class MLP(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return nn.Dense(4, name="down")(nn.relu(nn.Dense(8, name="up")(x)))
    >>> x = jnp.ones((1, 4))
    >>> variables = MLP().init(jax.random.key(0), x)
    >>> adapted, new, report = adapt_linen(MLP(), variables, x, targets=["up"], rank=2,
    ...                                    key=jax.random.key(1))
    >>> jax.tree.map(jnp.shape, new["delta"]), report["total"]["parameter_count"]
    ({'up': {'delta': (4, 8)}}, 56)
    >>> bool(jnp.array_equal(adapted.apply(new, x), MLP().apply(variables, x)))
    True
  """
  checked = check_options(options)
  core.check_base_quantization(base_quantization)
  base, existing, params, variables = linen_parts(model, variables)
  found = trace_linen(model, variables, inputs, dict(call_kwargs or {}))
  for name, entry in found.items():
    if (*paths.as_path(name), "lora_a") in params:
      entry["kind"] = "adapted"
  kinds = {name: entry["kind"] for name, entry in found.items()}
  chosen = select_targets(kinds, targets, exclude)
  per_layer = layer_options(chosen, checked, overrides)
  adapters, new = dict(existing), {}
  for name, subkey in zip(chosen, jax.random.split(key, len(chosen)), strict=True):
    module, projection = found[name]["module"], found[name]["projection"]
    path = paths.as_path(name)
    _check_stack(name, jnp.shape(params[(*path, "kernel")]), found[name]["kernel_shape"])
    arguments = {"projection": projection, "use_bias": module.use_bias, **per_layer[name]}
    layer = DeltaLoRAGeneral(**arguments, parent=None)  # checks the options
    new[path] = _new_adapter(name, layer, params[(*path, "kernel")], subkey)
    adapters[path] = tuple(sorted(arguments.items()))
  adapted = DeltaLoRAModel(base, tuple(sorted(adapters.items())))
  variables = with_adapters(variables, params, new)
  if base_quantization is not None:
    layers = adapted.layers
    quantized = {p: layers[paths.name(p)] for p in new}
    variables = dict(tree.quantize_base(variables, quantized, base_quantization=base_quantization))
  return adapted, variables, report(variables, adapted, [paths.name(p) for p in new], verbose)


def _check_stack(name: str, stored: Sequence[int], called: Sequence[int] | None) -> None:
  """Raises unless the kernel ``stored`` is a stack of the kernel ``called`` on leading axes.

  ``nn.scan`` / ``nn.vmap`` with ``variable_axes={'params': 1}`` (or any axis
  but 0) put the stack inside the kernel, where the adapter would read the
  wrong axes. (When the sizes coincide the shapes cannot tell.)
  """
  if called is None:  # the inputs were not found in the call: nothing to compare
    return
  stored, called = tuple(stored), tuple(called)
  if stored[len(stored) - len(called) :] != called:
    raise ValueError(
      f"the kernel at {name!r} is stored with shape {stored}, but one call of the layer uses a "
      f"kernel {called}: the stack axes of nn.scan / nn.vmap must lead "
      "(variable_axes={'params': 0}) for the layer to be adapted"
    )


def layer_shape(
  name: str, projection: projections.Projection, kernel_shape: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """``(stack axes, one layer's kernel shape)`` of a kernel: ``nn.scan`` stacks lead."""
  stack = len(kernel_shape) - projection.kernel_ndim
  if stack < 0:
    raise ValueError(
      f"the kernel at {name!r} has shape {tuple(kernel_shape)}; a {projection.name} layer needs "
      f"{projection.kernel_ndim} axes"
    )
  return tuple(kernel_shape[:stack]), tuple(kernel_shape[stack:])


def _new_adapter(
  name: str, layer: DeltaLoRAGeneral, kernel: jax.Array, key: jax.Array
) -> dict[str, jax.Array]:
  """Fresh ``lora_a``, ``lora_b`` (and ``D``) for ``layer`` beside ``kernel`` (stacked or not)."""
  projection = layer.projection
  _, shape = layer_shape(name, projection, jnp.shape(kernel))
  check_layer_rank(name, projection, shape, layer.rank)
  key_a, key_b = jax.random.split(key)  # one key per factor
  return core.new_adapter(
    (key_a, key_b),
    projection,
    jnp.shape(kernel),
    layer.rank,
    resolve_adapter_dtype(layer.adapter_dtype, kernel.dtype),
    lora_a_init=layer.lora_a_init,  # None: as the layer does
    lora_b_init=layer.lora_b_init,
    use_delta=layer.use_delta,
    snapshot=layer.paper_lambda is not None,
  )
