"""Whole-model utilities: count, flatten, reset, merge and diagnose the adapted layers.

Every function here takes either an NNX model, or Linen variables with
their ``layers`` (``{name: layer}`` from :func:`adapted_layers`, or a
:class:`~deltalora_jax.DeltaLoRAModel`), and gives back the kind it was
given: a function that changes an NNX model changes it in place (as NNX
code does) and returns it; a Linen one returns new variables and leaves its
argument as it was. A single layer is the model whose only adapted layer sits
at the root path ``()``, so every function works for one layer and for a
whole model alike.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx, traverse_util
from flax.typing import PathParts

from deltalora_jax import core, optim, paths
from deltalora_jax.config import LayerConfig, layer_configs
from deltalora_jax.linen import (
  DELTA_COLLECTION,
  QUANTIZED_COLLECTION,
  SNAPSHOT_COLLECTION,
  DeltaLoRADense,
  DeltaLoRAGeneral,
  collection_of,
)
from deltalora_jax.nnx import DeltaLoRALinear, DeltaLoRALinearGeneral

Path = paths.Path
#: A Linen layers mapping ``{name: layer}`` or a :class:`~deltalora_jax.DeltaLoRAModel`.
Layers = Any
#: An adapted layer: a Linen or an NNX one.
AdaptedLayer = DeltaLoRADense | DeltaLoRAGeneral | DeltaLoRALinear | DeltaLoRALinearGeneral
#: The arrays of an adapted layer, in the seed's order, then the snapshot of the paper's rule.
ARRAY_NAMES = (
  "kernel",
  "bias",
  "lora_a",
  "lora_b",
  "delta",
  *core.SNAPSHOT_NAMES,
  core.KERNEL_SCALE,
)


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def adapted_layers(model: Any, *args: Any, **kwargs: Any) -> dict[str, AdaptedLayer]:
  """Finds every adapted layer of a model, by path: the ``layers`` of the other functions.

  A Linen model is traced once with ``jax.eval_shape`` (no computation) on
  the same arguments as ``model.init`` takes after its key, and its
  :class:`DeltaLoRADense` and :class:`DeltaLoRAGeneral` layers are found;
  an NNX model's :class:`~deltalora_jax.DeltaLoRALinear` and
  :class:`~deltalora_jax.DeltaLoRALinearGeneral` modules are found in it
  (no arguments then).

  Args:
    model: a Linen module (or a single adapted layer), or an NNX model.
    *args: Linen: sample inputs, as for ``model.init(key, *args)``.
    **kwargs: Linen: keyword arguments of the model's ``__call__``.

  Returns:
    ``{name: layer}``: Linen in call order, NNX in ``nnx.iter_modules``
    order. A layer's name is its path joined by ``'/'`` (``'blocks/0/attn'``,
    the root layer's ``''``): the one form in which every function of this
    library gives a layer (reports, figures, adapter and PEFT files,
    targets); each also takes a path tuple (:mod:`deltalora_jax.paths`).

  Raises:
    ValueError: when the model holds no adapted layer.

  Example:
    >>> import jax.numpy as jnp, flax.linen as nn
    >>> class MLP(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     x = nn.relu(DeltaLoRADense(8, rank=2, name="hidden")(x))
    ...     return nn.Dense(1, name="head")(x)
    >>> list(adapted_layers(MLP(), jnp.ones((1, 4))))
    ['hidden']
  """
  if isinstance(model, nnx.Module):
    if args or kwargs:
      raise TypeError("adapted_layers takes no inputs with an NNX model (its layers are in it)")
    return {paths.name(path): module for path, module in _nnx_layers(model)}
  found: dict[str, AdaptedLayer] = {}

  def record(
    next_fun: Callable[..., Any],
    call_args: tuple[Any, ...],
    call_kwargs: dict[str, Any],
    context: nn.module.InterceptorContext,
  ) -> Any:
    module = context.module
    if isinstance(module, DeltaLoRADense | DeltaLoRAGeneral) and context.method_name == "__call__":
      found.setdefault(paths.name(module.path), module)
    return next_fun(*call_args, **call_kwargs)

  key = jax.random.key(0)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.init({"params": key, "dropout": key}, *args, **kwargs))
  if not found:
    raise ValueError(f"model {type(model).__name__} has no adapted layer")
  return found


# --------------------------------------------------------------------------
# One view of the adapted layers of an NNX model or of Linen variables.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Layer:
  """An adapted layer's path, config and arrays (those it has, of :data:`ARRAY_NAMES`)."""

  path: Path
  config: LayerConfig
  arrays: dict[str, jax.Array]

  @property
  def name(self) -> str:
    return paths.name(self.path)

  @property
  def stack(self) -> int:
    """The number of leading stack axes (``nn.scan``, ``nnx.vmap``) of the kernel."""
    return self.arrays["kernel"].ndim - self.config.projection.kernel_ndim

  def trainable(self) -> dict[str, jax.Array]:
    """The arrays that train, in the seed's order: the base only when not frozen.

    The snapshot factors of the paper's rule never train (the optimizer writes them).
    """
    frozen = (
      *core.SNAPSHOT_NAMES,
      core.KERNEL_SCALE,
      *(("kernel", "bias") if self.config.freeze_base else ()),
    )
    return {n: a for n, a in self.arrays.items() if n not in frozen}


def _nnx_layers(
  model: nnx.Module,
) -> list[tuple[PathParts, DeltaLoRALinear | DeltaLoRALinearGeneral]]:
  """The adapted layers of an NNX model with their NNX paths; raises when there is none."""
  found = [
    (path, module)
    for path, module in nnx.iter_modules(model)
    if isinstance(module, DeltaLoRALinear | DeltaLoRALinearGeneral)
  ]
  if not found:
    raise ValueError(f"model {type(model).__name__} has no adapted layer")
  return found


def _nnx_adapters(model: nnx.Module) -> dict[Path, DeltaLoRALinear | DeltaLoRALinearGeneral]:
  """:func:`adapted_layers` of an NNX model, by path of strings, sorted."""
  found = {paths.as_path(path): module for path, module in _nnx_layers(model)}
  return dict(sorted(found.items(), key=lambda item: item[0]))


def _check_variables(variables: Any) -> None:
  if not isinstance(variables, Mapping) or "params" not in variables:
    got = list(variables) if isinstance(variables, Mapping) else type(variables).__name__
    raise TypeError(
      f"model_or_variables must be an NNX model or Linen variables {{'params': ...}}, got {got}"
    )


def _linen_layers(variables: Mapping[str, Any], layers: Layers) -> list[_Layer]:
  _check_variables(variables)
  if layers is None:
    raise TypeError(
      "layers is required with Linen variables: pass {name: adapted layer}, e.g. "
      "adapted_layers(model, x), or the DeltaLoRAModel of adapt_linen"
    )
  flat = {
    c: traverse_util.flatten_dict(variables.get(c, {}))
    for c in ("params", DELTA_COLLECTION, SNAPSHOT_COLLECTION, QUANTIZED_COLLECTION)
  }
  found = []
  for path, config in layer_configs(layers).items():
    quantized = (*path, "kernel") in flat[QUANTIZED_COLLECTION]
    names = ["kernel", *(["bias"] if config.use_bias else []), "lora_a", "lora_b"]
    names += ["delta"] if config.use_delta else []
    names += list(core.SNAPSHOT_NAMES) if config.paper_lambda is not None else []
    names += [core.KERNEL_SCALE] if quantized else []
    arrays = {}
    for name in names:
      collection = QUANTIZED_COLLECTION if quantized and name == "kernel" else collection_of(name)
      source = flat[collection]
      if (*path, name) not in source:
        raise ValueError(
          f"variables[{collection!r}] has no {paths.name((*path, name))!r}: is the layer at "
          f"{paths.name(path)!r} of layers a layer of this model?"
        )
      arrays[name] = source[(*path, name)]
    found.append(_Layer(path, config, arrays))
  return found


def _layers(model_or_variables: Any, layers: Layers = None) -> list[_Layer]:
  """The adapted layers of an NNX model, or of Linen variables with their ``layers``."""
  if isinstance(model_or_variables, nnx.Module):
    if layers is not None:
      raise TypeError("layers must be None with an NNX model (its layers are found in it)")
    return [
      _Layer(
        path,
        module.config,
        {n: getattr(module, n)[...] for n in ARRAY_NAMES if getattr(module, n, None) is not None},
      )
      for path, module in _nnx_adapters(model_or_variables).items()
    ]
  return _linen_layers(model_or_variables, layers)


def layer_arrays(
  model_or_variables: Any, layers: Layers = None
) -> dict[str, tuple[LayerConfig, dict[str, jax.Array]]]:
  """``{name: (config, arrays)}`` of every adapted layer; the arrays are shared, not copied.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> layer = DeltaLoRADense(features=3, rank=2)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> config, arrays = layer_arrays(variables, {(): layer})[""]
    >>> config.rank, sorted(arrays)
    (2, ['bias', 'delta', 'kernel', 'lora_a', 'lora_b'])
  """
  return {
    layer.name: (layer.config, dict(layer.arrays)) for layer in _layers(model_or_variables, layers)
  }


def with_float_bases(
  found: Mapping[str, tuple[LayerConfig, Mapping[str, jax.Array]]], sample: Any = None
) -> dict[str, tuple[LayerConfig, dict[str, jax.Array]]]:
  """:func:`layer_arrays`'s ``found``, each quantized base dequantized (float32), scales dropped.

  For readers that take the kernel as the base's weights (a merged PEFT
  export). With a ``sample`` (an export that runs the model with written
  kernels) a quantized base is refused: its layer cannot hold a float kernel.
  """
  out: dict[str, tuple[LayerConfig, dict[str, jax.Array]]] = {}
  for name, (config, arrays) in found.items():
    arrays = dict(arrays)
    if core.KERNEL_SCALE in arrays:
      if sample is not None:
        raise ValueError(
          f"adapted layer {name!r} has an {core.base_quantization_of(arrays['kernel'])} base: "
          "sample= runs the model with float kernels written into it, which a quantized base "
          "cannot hold; leave sample out"
        )
      scale = arrays.pop(core.KERNEL_SCALE)
      arrays["kernel"] = core.dequantize(arrays["kernel"], scale, config.projection)
    out[name] = (config, arrays)
  return out


def with_arrays(model_or_variables: Any, new: Mapping[Path, Mapping[str, Any]]) -> Any:
  """The model with the adapted layers' arrays ``{path: {name: array}}`` put in.

  NNX: the model, changed in place; Linen: new variables (``D`` goes to the
  ``'delta'`` collection, the snapshot factors to ``'snapshot'``, the rest to
  ``'params'``). The arrays are not checked.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> layer = DeltaLoRADense(features=3, rank=2)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> new = with_arrays(variables, {(): {"delta": jnp.ones((4, 3))}})
    >>> float(new["delta"]["delta"].sum()), float(variables["delta"]["delta"].sum())
    (12.0, 0.0)
  """
  if isinstance(model_or_variables, nnx.Module):
    modules = _nnx_adapters(model_or_variables)
    for path, arrays in new.items():
      for name, value in arrays.items():
        getattr(modules[path], name)[...] = value
    return model_or_variables
  flat = {c: traverse_util.flatten_dict(v) for c, v in model_or_variables.items()}
  for path, arrays in new.items():
    for name, value in arrays.items():
      flat.setdefault(collection_of(name), {})[(*path, name)] = value
  return {c: traverse_util.unflatten_dict(v) for c, v in flat.items()}


# --------------------------------------------------------------------------
# Count, flatten, read, reset.
# --------------------------------------------------------------------------


def parameter_counts(model_or_variables: Any, layers: Layers = None) -> dict[str, int]:
  """Trainable parameter count of each adapted layer, and their ``'total'``.

  Per layer: ``r (in + out) + in out`` (``A``, ``B`` and ``D``), plus ``in
  out + out`` for a base that is not frozen (``in out`` without bias).

  Args:
    model_or_variables: an NNX model, or Linen variables.
    layers: for Linen, the layers mapping or the ``DeltaLoRAModel``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> layer = DeltaLoRADense(features=3, rank=2)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> parameter_counts(variables, {(): layer})  # 2 * (4 + 3) + 4 * 3
    {'': 26, 'total': 26}
  """
  counts = {
    layer.name: sum(math.prod(a.shape) for a in layer.trainable().values())
    for layer in _layers(model_or_variables, layers)
  }
  counts["total"] = sum(counts.values())
  return counts


def flatten_parameters(model_or_variables: Any, layers: Layers = None) -> jax.Array:
  """All trainable numbers of the adapted layers as one vector, in the seed's order.

  Per layer, in the order of ``layers`` (NNX: sorted by path): ``[kernel,
  bias]`` (only when the base is not frozen), ``lora_a``, ``lora_b``,
  ``delta``, each row-major. Given a Linen gradient tree of the same
  structure, it packs the gradients in the same order (the seed's
  ``GetParameterGradients``).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> layer = DeltaLoRADense(features=3, rank=2)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> flatten_parameters(variables, {(): layer}).shape
    (26,)
  """
  found = _layers(model_or_variables, layers)
  return jnp.concatenate([jnp.ravel(a) for layer in found for a in layer.trainable().values()])


def unflatten_parameters(model_or_variables: Any, vector: jax.Array, layers: Layers = None) -> Any:
  """The inverse of :func:`flatten_parameters`: the model with ``vector``'s values.

  Each value keeps its array's dtype. NNX: the model is updated in place
  and returned; Linen: new variables (the given ones are not modified).

  Raises:
    ValueError: when ``vector`` is not 1-D of the expected length (nothing
      is changed then).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> layer = DeltaLoRADense(features=3, rank=2)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> new = unflatten_parameters(variables, jnp.arange(26.0), {(): layer})
    >>> new["delta"]["delta"][0]
    Array([14., 15., 16.], dtype=float32)
  """
  found = _layers(model_or_variables, layers)
  expected = sum(math.prod(a.shape) for layer in found for a in layer.trainable().values())
  shape = jnp.shape(vector)
  if len(shape) != 1 or shape[0] != expected:
    raise ValueError(
      f"vector must be 1-D with {expected} values (the trainable parameters of "
      f"{len(found)} layer(s)), got shape {shape}"
    )
  new: dict[Path, dict[str, jax.Array]] = {}
  offset = 0
  for layer in found:
    new[layer.path] = {}
    for name, array in layer.trainable().items():
      size = math.prod(array.shape)
      value = jnp.reshape(vector[offset : offset + size], array.shape).astype(array.dtype)
      new[layer.path][name] = value
      offset += size
  return with_arrays(model_or_variables, new)


def current_delta(model_or_variables: Any, path: str | tuple[Any, ...] = ()) -> jax.Array:
  """A copy of the delta matrix ``D`` (the kernel's shape) of the layer at ``path``.

  Args:
    model_or_variables: an NNX model, or Linen variables.
    path: the layer's path, as a tuple or a name ``'a/b'``; ``()`` is the root.

  Raises:
    ValueError: when there is no adapted layer with ``D`` at ``path``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> layer = DeltaLoRADense(features=3, rank=2)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> current_delta(variables).shape
    (4, 3)
  """
  path = paths.as_path(path)
  if isinstance(model_or_variables, nnx.Module):
    deltas = {p: m.delta for p, m in _nnx_adapters(model_or_variables).items() if m.delta}
  else:
    _check_variables(model_or_variables)
    flat = traverse_util.flatten_dict(model_or_variables.get(DELTA_COLLECTION, {}))
    deltas = {p[:-1]: v for p, v in flat.items() if p[-1] == "delta"}
  if path not in deltas:
    raise ValueError(
      f"path must name an adapted layer with D, got path={paths.name(path)!r}; the layers "
      f"with D are {[paths.name(p) for p in deltas]}"
    )
  return jnp.array(deltas[path][...], copy=True)


def _velocities(model_or_variables: Any, opt_state: Any) -> dict[Path, jax.Array]:
  """``{layer path: V}`` of the velocity held in ``opt_state`` (an ``nnx.Optimizer`` too)."""
  if isinstance(opt_state, nnx.Optimizer):
    opt_state = opt_state.opt_state
  leaves = jax.tree_util.tree_flatten_with_path(optim.velocity(opt_state), is_leaf=_is_variable)[0]
  linen = not isinstance(model_or_variables, nnx.Module)
  found = {}
  for entry, leaf in leaves:
    names = paths.key_path(entry)
    value = leaf.get_value() if _is_variable(leaf) else leaf
    if names and names[-1] == "delta" and isinstance(value, jax.Array):
      found[names[1 if linen else 0 : -1]] = value
  return found


def reset(model_or_variables: Any, opt_state: Any = None) -> tuple[Any, Any]:
  """Zeroes every delta matrix ``D`` and every velocity; keeps everything else.

  Args:
    model_or_variables: an NNX model (zeroed in place), or Linen variables
      (a new tree is returned). A model without ``D`` is returned unchanged.
    opt_state: None, an optimizer state holding the velocity (a new state
      is returned), or an ``nnx.Optimizer`` (zeroed in place).

  Returns:
    ``(model_or_variables, opt_state)``.

  Example:
    >>> import jax.numpy as jnp
    >>> variables = {"params": {"kernel": jnp.ones(2)}, "delta": {"delta": jnp.ones(2)}}
    >>> reset(variables)[0]["delta"]["delta"]
    Array([0., 0.], dtype=float32)
  """
  if isinstance(model_or_variables, nnx.Module):
    for module in _nnx_adapters(model_or_variables).values():
      if module.delta is not None:
        module.delta[...] = jnp.zeros_like(module.delta[...])
  else:
    _check_variables(model_or_variables)
    model_or_variables = dict(model_or_variables)
    if DELTA_COLLECTION in model_or_variables:
      zeros = jax.tree.map(jnp.zeros_like, model_or_variables[DELTA_COLLECTION])
      model_or_variables[DELTA_COLLECTION] = zeros
  if isinstance(opt_state, nnx.Optimizer):
    for leaf in jax.tree.leaves(optim.velocity(opt_state.opt_state), is_leaf=_is_variable):
      if _is_variable(leaf) and isinstance(leaf.get_value(), jax.Array):  # not a MaskedNode
        leaf[...] = jnp.zeros_like(leaf[...])
  elif opt_state is not None:
    opt_state = optim.reset_velocity(opt_state)
  return model_or_variables, opt_state


# --------------------------------------------------------------------------
# Merge.
# --------------------------------------------------------------------------


def _merged_kernel(layer: _Layer) -> jax.Array:
  """``W + s A B + ds D`` in the kernel's layout and dtype, formed in at least float32.

  A quantized base gives a kernel in its scales' dtype (float32): the
  dequantized base plus the adapter's change, which int8 or NF4 could not hold.
  """
  config, arrays = layer.config, layer.arrays
  scale = arrays.get(core.KERNEL_SCALE)
  return core.merged_kernel(
    arrays["kernel"],
    arrays["lora_a"],
    arrays["lora_b"],
    arrays.get("delta"),
    scaling=config.scaling,
    delta_scaling=config.delta_scaling,
    precision=jax.lax.Precision.HIGHEST,
    projection=config.projection,
    snapshot=_snapshot(layer),
    paper_lambda=config.paper_lambda,
    kernel_scale=scale,
  ).astype(arrays["kernel"].dtype if scale is None else scale.dtype)


def _snapshot(layer: _Layer) -> core.Snapshot | None:
  """``(A^, B^)`` of a layer of the paper's telescoped form, else None."""
  if layer.config.paper_lambda is None:
    return None
  return layer.arrays[core.SNAPSHOT_A], layer.arrays[core.SNAPSHOT_B]


def _unloaded(module: DeltaLoRALinear | DeltaLoRALinearGeneral, kernel: jax.Array) -> nnx.Module:
  """The base layer's own class, rebuilt from its graph definition with ``kernel``.

  The kernel and bias go back under the base's own names (tunix's ``Einsum``: ``w``).
  """
  state = {module.kernel_name: module.kernel.copy(kernel)}
  if module.bias is not None and module.bias_name is not None:
    state[module.bias_name] = module.bias.copy()
  base: nnx.Module = nnx.merge(module.base_graphdef, nnx.State(state))
  return base


def merge(model_or_variables: Any, layers: Layers = None) -> Any:
  """The model written with its base layers in place of each adapter, with merged kernels.

  Each adapted layer's ``kernel`` becomes ``W + s A B + ds D`` (a layer of
  the paper's telescoped form: ``W + s (1 + lambda) A B - lambda s A^ B^``,
  the kernel Algorithm 1 would have written) in its own layout (each layer
  of a stack on its own), formed at ``Precision.HIGHEST`` in at least
  float32 and stored in the kernel's dtype (a bfloat16 kernel rounds the
  adapter's contribution; a quantized base gives a float32 kernel, the
  dequantized base plus the change, and its ``kernel_scale`` goes); its bias
  is unchanged. The argument is not modified.

  Args:
    model_or_variables: an NNX model, or Linen variables.
    layers: for Linen, the layers mapping or the ``DeltaLoRAModel``.

  Returns:
    NNX: a copy of the model (``nnx.clone``; the arrays of layers that are
    not adapted are shared) whose adapters are their base layers' own
    classes again (a model that is a single adapter gives that base layer).
    Linen: the variables of the same model written with its base layers
    (for a ``DeltaLoRAModel``, its ``.model``): ``lora_a``, ``lora_b`` and
    the ``'delta'`` and ``'snapshot'`` collections dropped, other collections kept.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> layer = DeltaLoRADense(features=3, rank=2)
    >>> x = jnp.ones((2, 4))
    >>> variables = layer.init(jax.random.key(0), x)
    >>> merged = merge(variables, {(): layer})
    >>> bool(jnp.allclose(nn.Dense(3).apply(merged, x), layer.apply(variables, x)))
    True
  """
  found = _layers(model_or_variables, layers)
  if isinstance(model_or_variables, nnx.Module):
    kernels = {layer.path: _merged_kernel(layer) for layer in found}
    if () in kernels and isinstance(model_or_variables, DeltaLoRALinear | DeltaLoRALinearGeneral):
      return _unloaded(model_or_variables, kernels[()])
    merged = nnx.clone(model_or_variables)
    paths.replace_modules(
      merged,
      {
        path: _unloaded(module, kernels[paths.as_path(path)])
        for path, module in _nnx_layers(merged)
      },
    )
    return merged
  params = traverse_util.flatten_dict(model_or_variables["params"])
  quantized = traverse_util.flatten_dict(model_or_variables.get(QUANTIZED_COLLECTION, {}))
  for layer in found:
    params[(*layer.path, "kernel")] = _merged_kernel(layer)
    del params[(*layer.path, "lora_a")], params[(*layer.path, "lora_b")]
    for name in ("kernel", core.KERNEL_SCALE):
      quantized.pop((*layer.path, name), None)
  merged_variables = {
    c: v
    for c, v in model_or_variables.items()
    if c not in ("params", DELTA_COLLECTION, SNAPSHOT_COLLECTION, QUANTIZED_COLLECTION)
  }
  merged_variables["params"] = traverse_util.unflatten_dict(params)
  if quantized:  # quantized bases of layers that are not adapted stay
    merged_variables[QUANTIZED_COLLECTION] = traverse_util.unflatten_dict(quantized)
  return merged_variables


def quantize_base(
  model_or_variables: Any, layers: Layers = None, *, base_quantization: str = "int8"
) -> Any:
  """The adapted layers' float base kernels quantized: int8 per output channel, or NF4.

  Each adapted layer's kernel becomes :func:`deltalora_jax.core.quantize_kernel`'s
  values and float32 scales: ``'int8'``, int8 values with one scale per output
  channel (``|W - s q| <= s / 2`` per channel); ``'nf4'``, QLoRA's NF4 codes
  (uint4) with one scale per block of 64 along the input (needs qwix). The
  adapter (``A``, ``B``, ``D``, the snapshot), the bias and every other layer
  are left as they are. The base is then read and never
  written: the layers need ``freeze_base=True``, and the in-place form of
  :func:`deltalora_jax.paper_delta_lora` refuses it (use ``paper_lambda``).
  A base that is quantized already stays.

  Args:
    model_or_variables: an NNX model (changed in place: each adapter's
      ``kernel`` Variable holds the quantized values, ``kernel_scale`` the
      scales), or Linen variables.
    layers: for Linen, the layers mapping or the ``DeltaLoRAModel``.
    base_quantization: ``'int8'`` or ``'nf4'`` (:data:`deltalora_jax.core.BASE_QUANTIZATIONS`).

  Returns:
    NNX: the model. Linen: new variables whose adapted layers' ``kernel``
    (quantized) and ``kernel_scale`` are in the ``'quantized'`` collection, out of
    ``'params'``: differentiate the other collections only (the input is
    not modified).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> layer = DeltaLoRADense(features=3, rank=2, use_delta=False)
    >>> x = jnp.ones((2, 4))
    >>> variables = layer.init(jax.random.key(0), x)
    >>> quantized = quantize_base(variables, {(): layer})
    >>> jax.tree.map(lambda a: str(a.dtype), quantized["quantized"])
    {'kernel': 'int8', 'kernel_scale': 'float32'}
    >>> bool(jnp.allclose(layer.apply(quantized, x), layer.apply(variables, x), atol=0.02))
    True
  """
  core.check_base_quantization(base_quantization)
  found = _layers(model_or_variables, layers)
  for layer in found:
    if not layer.config.freeze_base and core.KERNEL_SCALE not in layer.arrays:
      raise ValueError(
        f"adapted layer {layer.name!r} has freeze_base=False: a quantized base is read, never "
        "trained; build it with freeze_base=True to quantize its base"
      )
  if isinstance(model_or_variables, nnx.Module):
    for module in _nnx_adapters(model_or_variables).values():
      module.quantize_base(base_quantization)
    return model_or_variables
  flat = {c: traverse_util.flatten_dict(v) for c, v in model_or_variables.items()}
  quantized = flat.setdefault(QUANTIZED_COLLECTION, {})
  for layer in found:
    if core.KERNEL_SCALE in layer.arrays:
      continue
    values, scale = core.quantize_kernel(
      layer.arrays["kernel"],
      base_quantization,
      layer.config.projection,
      layer=f"adapted layer {layer.name!r}",
    )
    del flat["params"][(*layer.path, "kernel")]
    quantized[(*layer.path, "kernel")] = values
    quantized[(*layer.path, core.KERNEL_SCALE)] = scale
  return {c: traverse_util.unflatten_dict(v) for c, v in flat.items()}


# --------------------------------------------------------------------------
# Diagnostics.
# --------------------------------------------------------------------------


def _norm(x: jax.Array) -> float:
  return float(jnp.linalg.norm(jnp.ravel(x).astype(jnp.float32)))


def _lora_norm(layer: _Layer, *, paper_change: bool = False) -> float:
  """``||s A B||_F`` without forming ``A B`` (over every layer of a stack).

  ``paper_change``: ``||lambda s (A B - A^ B^)||_F`` instead, the change of
  the kernel that the paper's telescoped form carries, as the product of
  ``[A, A^]`` and ``[B; -B^]``.
  """
  config = layer.config
  a, b = layer.arrays["lora_a"], layer.arrays["lora_b"]
  scaling = config.scaling
  if paper_change:
    axis = layer.stack + config.projection.rank_axis_of_b()
    a = jnp.concatenate([a, layer.arrays[core.SNAPSHOT_A]], axis=-1)
    b = jnp.concatenate([b, -layer.arrays[core.SNAPSHOT_B]], axis=axis)
    scaling *= config.paper_lambda or 0.0

  def norm(a: jax.Array, b: jax.Array) -> jax.Array:
    return core.lora_product_norm(a, b, scaling, config.projection)

  for _ in range(layer.stack):
    norm = jax.vmap(norm)
  return float(jnp.sqrt(jnp.sum(norm(a, b) ** 2)))


def _figures(layer: _Layer) -> dict[str, Any]:
  kernel, config = layer.arrays["kernel"], layer.config
  per_rank = math.prod(kernel.shape[: layer.stack]) * config.rank
  return (
    {
      "kind": config.projection.name,
      "kernel_shape": [int(n) for n in kernel.shape],
      "in_features": layer.arrays["lora_a"].size // per_rank,
      "out_features": layer.arrays["lora_b"].size // per_rank,
      "rank": config.rank,
      "scaling": config.scaling,
      "delta_scaling": config.delta_scaling,
      "freeze_base": config.freeze_base,
      "parameter_count": sum(math.prod(a.shape) for a in layer.trainable().values()),
    }
    | ({} if config.paper_lambda is None else {"paper_lambda": config.paper_lambda})
    | (
      {}
      if core.KERNEL_SCALE not in layer.arrays
      else {"base_quantization": core.base_quantization_of(kernel)}
    )
  )


def layer_figures(model_or_variables: Any, layers: Layers = None) -> dict[str, dict[str, Any]]:
  """What each adapted layer is, by name: the figures of :func:`diagnostics` without norms.

  ``kind``, ``kernel_shape``, ``in_features``, ``out_features``, ``rank``,
  ``scaling``, ``delta_scaling``, ``freeze_base`` and ``parameter_count``;
  nothing is computed on the arrays but their shapes.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> layer = DeltaLoRADense(features=3, rank=2)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> layer_figures(variables, {(): layer})[""]["kernel_shape"]
    [4, 3]
  """
  return {layer.name: _figures(layer) for layer in _layers(model_or_variables, layers)}


def diagnostics(
  model_or_variables: Any, layers: Layers = None, opt_state: Any = None
) -> dict[str, dict[str, Any]]:
  """Figures for each adapted layer and in total (the seed's diagnostics).

  Per layer: ``kind`` (``general_dense``, ``einsum`` or ``conv``),
  ``kernel_shape`` (a stack's leading axes included), ``in_features`` and
  ``out_features`` (the sizes of one layer's kernel as the matrix that
  ``A B`` factors), ``rank``, ``scaling``, ``delta_scaling``,
  ``freeze_base``, ``parameter_count``, and the Frobenius norms
  ``delta_norm`` (``||D||``, 0 without ``D``), ``lora_norm`` (``||s A B||``,
  without forming ``A B``) and, when ``opt_state`` is given,
  ``velocity_norm`` (``||V||``). A layer of the paper's telescoped form
  adds ``paper_lambda`` and ``paper_change_norm``
  (``||lambda s (A B - A^ B^)||``, the kernel's change that Algorithm 1
  would have written, without forming it). ``'total'`` holds the layer count, the
  parameter count and the global norms.

  Args:
    model_or_variables: an NNX model, or Linen variables.
    layers: for Linen, the layers mapping or the ``DeltaLoRAModel``.
    opt_state: None, the optimizer state, or an ``nnx.Optimizer``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> layer = DeltaLoRADense(features=3, rank=2)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> diagnostics(variables, {(): layer})["layers"][""]["delta_norm"]
    0.0
  """
  found = _layers(model_or_variables, layers)
  velocities = None if opt_state is None else _velocities(model_or_variables, opt_state)
  report = {}
  for layer in found:
    entry = _figures(layer)
    delta = layer.arrays.get("delta")
    entry["delta_norm"] = 0.0 if delta is None else _norm(delta)
    entry["lora_norm"] = _lora_norm(layer)
    if layer.config.paper_lambda is not None:
      entry["paper_change_norm"] = _lora_norm(layer, paper_change=True)
    if velocities is not None and layer.path in velocities:
      entry["velocity_norm"] = _norm(velocities[layer.path])
    report[layer.name] = entry
  norms = ["delta_norm", "lora_norm"] + ([] if velocities is None else ["velocity_norm"])
  total = {
    "layers": len(report),
    "parameter_count": sum(e["parameter_count"] for e in report.values()),
  }
  for key in norms:
    total[key] = math.sqrt(sum(e.get(key, 0.0) ** 2 for e in report.values()))
  return {"layers": report, "total": total}
