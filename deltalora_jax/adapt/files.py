"""The trained adapter alone: export it, and attach it to a fresh copy of the base model.

An adapter is ``{'config': {name: {...}}, 'weights': {name: {...}}}`` keyed by
layer name ``'a/b/c'``: each layer's config is its
:meth:`LayerConfig.to_json <deltalora_jax.config.LayerConfig.to_json>` and its
``kernel_shape`` (JSON-ready), its weights the arrays that trained. The
first format's dense configs (``in_features``/``out_features``, no
``projection``) are read too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from deltalora_jax import core, paths, projections, tree
from deltalora_jax import nnx as nnx_front
from deltalora_jax.adapt import linen as linen_adapt
from deltalora_jax.adapt import nnx as nnx_adapt
from deltalora_jax.adapt import targets
from deltalora_jax.config import LayerConfig
from deltalora_jax.config import adapter_dtype as resolve_adapter_dtype


def export_adapter(model_or_variables: Any, layers: Any = None) -> dict[str, Any]:
  """The trained adapter alone: its arrays and the configuration to use them.

  Args:
    model_or_variables: an adapted NNX model, or Linen variables.
    layers: for Linen, the :class:`~deltalora_jax.DeltaLoRAModel` or the
      layers mapping.

  Returns:
    ``{'config': {name: {...}}, 'weights': {name: {...}}}`` keyed by layer
    name ``'a/b/c'``. Each layer's config is its
    :meth:`LayerConfig.to_json <deltalora_jax.config.LayerConfig.to_json>`
    with its ``kernel_shape`` (stack axes included): Python numbers, bools,
    strings, lists and None (JSON-ready). The weights are ``lora_a``,
    ``lora_b``, ``delta`` (unless ``use_delta=False``), ``snapshot_a`` and
    ``snapshot_b`` for a layer of the paper's telescoped form (``paper_lambda``:
    with them the adapter carries the whole change of the kernel), and the base
    ``kernel``/``bias`` only for a layer trained with ``freeze_base=False``.
    Arrays are shared, not copied. A layer trained by the paper's in-place
    form (no ``paper_lambda``) had its kernel written: its adapter does not
    hold that change (build it with ``paper_lambda``).

  Example:
    >>> from flax import nnx
    >>> import deltalora_jax as dl
    >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu)
    >>> model, _ = dl.adapt_nnx(model, rank=2, freeze_base=False, rngs=nnx.Rngs(1))
    >>> adapter = export_adapter(model)
    >>> adapter["config"]["layers/0"]["kernel_shape"], sorted(adapter["weights"]["layers/0"])
    ([4, 8], ['bias', 'delta', 'kernel', 'lora_a', 'lora_b'])
  """
  config, weights = {}, {}
  for name, layer in tree.layer_arrays(model_or_variables, layers).items():
    layer_config, arrays = layer
    config[name] = {
      **layer_config.to_json(),
      "kernel_shape": [int(n) for n in arrays["kernel"].shape],
    }
    trained: tuple[str, ...] = ("lora_a", "lora_b", "delta", *core.SNAPSHOT_NAMES)
    trained += () if layer_config.freeze_base else tuple(arrays)
    weights[name] = {k: v for k, v in arrays.items() if k in trained}
  return {"config": config, "weights": weights}


def _check_adapter(adapter: Any) -> tuple[dict[str, Any], dict[str, Any]]:
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


#: The fields of a dense layer's config in the first adapter format (before layer kinds).
DENSE_FORMAT = frozenset({"in_features", "out_features"})


def _from_dense_format(entry: Mapping[str, Any]) -> dict[str, Any]:
  """A layer config of the first format (``in_features``/``out_features``) in today's.

  That format had dense layers only, and read ``alpha <= 0`` as ``alpha = r``
  (None today, which refuses ``alpha <= 0``).

  >>> old = {"in_features": 4, "out_features": 8, "rank": 2, "alpha": 0.0}
  >>> new = _from_dense_format(old)
  >>> new["kernel_shape"], new["alpha"], new["projection"]["kind"]
  ([4, 8], None, 'general_dense')
  """
  fields = {k: v for k, v in entry.items() if k not in DENSE_FORMAT}
  alpha = fields.get("alpha")
  if isinstance(alpha, int | float) and not isinstance(alpha, bool) and alpha <= 0:
    fields["alpha"] = None
  dense = projections.GeneralDense(features=(int(entry["out_features"]),))
  fields["projection"] = projections.to_json(dense)
  fields["kernel_shape"] = [int(entry["in_features"]), int(entry["out_features"])]
  return fields


def _layer_config(name: str, entry: object) -> tuple[LayerConfig, tuple[int, ...]]:
  """``(config, kernel shape)`` of one layer of an adapter's config (either format)."""
  if isinstance(entry, Mapping) and set(entry) >= DENSE_FORMAT and "projection" not in entry:
    entry = _from_dense_format(entry)
  if not isinstance(entry, Mapping) or "kernel_shape" not in entry:
    raise ValueError(
      f"adapter config of {name!r} must be a mapping with a kernel_shape and a projection "
      "(export_adapter's format) or with in_features and out_features (the first, dense-only "
      f"format), got {sorted(entry) if isinstance(entry, Mapping) else type(entry).__name__}"
    )
  fields = {k: v for k, v in entry.items() if k != "kernel_shape"}
  config = LayerConfig.from_json(fields, where=f"adapter config of {name!r}")
  return config, tuple(entry["kernel_shape"])


def _checked_weights(
  name: str, config: LayerConfig, kernel_shape: tuple[int, ...], arrays: Mapping[str, Any]
) -> dict[str, jax.Array]:
  """The weights of one layer, checked against the shapes its config implies."""
  projection = config.projection
  stack, shape = linen_adapt.layer_shape(name, projection, kernel_shape)
  a_shape, b_shape = projection.factor_shapes(shape, config.rank)
  expected = {"lora_a": (*stack, *a_shape), "lora_b": (*stack, *b_shape)}
  if config.paper_lambda is not None:
    expected[core.SNAPSHOT_A], expected[core.SNAPSHOT_B] = expected["lora_a"], expected["lora_b"]
  if config.use_delta:
    expected["delta"] = kernel_shape
  if not config.freeze_base:
    expected["kernel"] = kernel_shape
    if config.use_bias:
      expected["bias"] = (*stack, *projection.bias_shape(shape))
  if set(arrays) != set(expected):
    raise ValueError(
      f"adapter weights of {name!r} must be {sorted(expected)}, got {sorted(arrays)}"
    )
  for key, want in expected.items():
    if tuple(jnp.shape(arrays[key])) != tuple(want):
      raise ValueError(
        f"adapter weight {name}/{key} must have shape {tuple(want)}, got {jnp.shape(arrays[key])}"
      )
  checked = {key: jnp.asarray(value) for key, value in arrays.items()}
  for key, value in checked.items():
    if jnp.issubdtype(value.dtype, jnp.inexact) and not bool(jnp.isfinite(value).all()):
      bad = int(jnp.size(value) - jnp.isfinite(value).sum())
      raise ValueError(
        f"adapter weight {name}/{key} holds NaN or infinity ({bad} of {jnp.size(value)} "
        "entries): a diverged or corrupt adapter is not attached"
      )
  return checked


def _checked(adapter: Any) -> dict[str, tuple[LayerConfig, tuple[int, ...], dict[str, jax.Array]]]:
  """``{name: (config, kernel shape, weights)}`` of an adapter, all checked."""
  config, weights = _check_adapter(adapter)
  checked = {}
  for name, entry in config.items():
    layer_config, kernel_shape = _layer_config(name, entry)
    arrays = _checked_weights(name, layer_config, kernel_shape, weights[name])
    checked[name] = (layer_config, kernel_shape, arrays)
  return checked


def attach_adapter_nnx(
  model: nnx.Module, adapter: Mapping[str, Any]
) -> tuple[nnx.Module, dict[str, Any]]:
  """Puts an exported adapter back on a fresh copy of the same NNX base model, in place.

  Each named layer becomes an adapter with the exported options and
  weights, as :func:`~deltalora_jax.adapt_nnx` would build it. Everything is
  checked before any layer is replaced: on an error the model is as it was.

  Args:
    model: the base model (plain layers at the adapter's paths).
    adapter: the result of :func:`export_adapter`.

  Returns:
    ``(model, report)`` as :func:`~deltalora_jax.adapt_nnx` gives.

  Raises:
    ValueError: for a path that is not in the model, a layer already
      adapted, a kind or shape that differs, or a weight holding NaN or
      infinity (named).
    TypeError: for a path whose module cannot be adapted.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import deltalora_jax as dl
    >>> class MLP(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.up = nnx.Linear(4, 8, rngs=rngs)
    >>> model, _ = dl.adapt_nnx(MLP(nnx.Rngs(0)), rank=2, rngs=nnx.Rngs(1))
    >>> model.up.lora_b[...] = jnp.ones((2, 8))  # as if trained
    >>> fresh, _ = attach_adapter_nnx(MLP(nnx.Rngs(0)), export_adapter(model))
    >>> x = jnp.ones((1, 4))
    >>> bool(jnp.array_equal(fresh.up(x), model.up(x)))
    True
  """
  checked = _checked(adapter)
  modules = nnx_adapt.modules(model)
  kinds = {name: nnx_adapt.kind(m) for name, (_, m) in modules.items()}
  adaptable = [n for n, kind in kinds.items() if kind in targets.ADAPTABLE_KINDS]
  new = {}
  for name, (config, kernel_shape, arrays) in checked.items():
    if name not in kinds:
      raise ValueError(
        f"adapter layer {name!r} is not in the model; the layers that can be adapted: {adaptable}"
      )
    if kinds[name] == targets.ADAPTED:
      raise ValueError(f"layer {name!r} is already adapted")
    if kinds[name] not in targets.ADAPTABLE_KINDS:
      raise TypeError(
        f"adapter layer {name!r} is a {kinds[name]} in the model, not {targets.ADAPTABLE}"
      )
    module = modules[name][1]  # of an adaptable kind
    description = nnx_front.describe(module)
    given = (description.projection, tuple(getattr(module, description.kernel).shape))
    if given != (config.projection, kernel_shape):
      raise ValueError(
        f"the {type(module).__name__} at {name!r} is {given[0]} with kernel {given[1]}; the "
        f"adapter was trained for {config.projection} with kernel {kernel_shape}"
      )
    options = {**config.options(), "lora_a_init": nnx.initializers.zeros_init()}  # A: below
    layer = nnx_adapt.adapter(module, options, nnx.Rngs(0))
    for key, value in arrays.items():
      getattr(layer, key)[...] = value.astype(getattr(layer, key)[...].dtype)
    new[name] = layer
  paths.replace_modules(model, {modules[name][0]: layer for name, layer in new.items()})
  return model, targets.report(model, None, list(new), False)


def attach_adapter_linen(
  model: nn.Module, variables: Mapping[str, Any], adapter: Mapping[str, Any]
) -> tuple[linen_adapt.DeltaLoRAModel, dict[str, Any], dict[str, Any]]:
  """Puts an exported adapter back on the same Linen base model and its variables.

  No trace is needed: the adapter's paths are checked against the kernels in
  ``variables['params']``; when the model runs, a path whose module is not
  the layer kind the adapter was trained on is an error.

  Args:
    model: the original Linen model (or a :class:`~deltalora_jax.DeltaLoRAModel`).
    variables: the base variables, ``{'params': ...}`` (not modified).
    adapter: the result of :func:`export_adapter`.

  Returns:
    ``(adapted, variables, report)`` as :func:`~deltalora_jax.adapt_linen` gives.

  Raises:
    ValueError: for a path without a kernel, a layer already adapted, a
      shape that differs, or a weight holding NaN or infinity (named).

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import deltalora_jax as dl
    >>> class MLP(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return nn.Dense(8, name="up")(x)
    >>> x = jnp.ones((1, 4))
    >>> pretrained = MLP().init(jax.random.key(0), x)
    >>> adapted, variables, _ = dl.adapt_linen(MLP(), pretrained, x, rank=2,
    ...                                        key=jax.random.key(1))
    >>> adapter = export_adapter(variables, adapted)
    >>> again, restored, _ = attach_adapter_linen(MLP(), pretrained, adapter)
    >>> bool(jnp.array_equal(again.apply(restored, x), adapted.apply(variables, x)))
    True
  """
  checked = _checked(adapter)
  base, existing, params, variables = linen_adapt.linen_parts(model, variables)
  kernels = sorted(paths.name(k[:-1]) for k in params if k[-1] == "kernel")
  adapters, new = dict(existing), {}
  for name, (config, kernel_shape, arrays) in checked.items():
    path = paths.as_path(name)
    kernel = params.get((*path, "kernel"))
    if kernel is None:
      raise ValueError(
        f"adapter layer {name!r} has no kernel in variables['params']; layers with a "
        f"kernel: {kernels}"
      )
    if path in existing or (*path, "lora_a") in params:
      raise ValueError(f"layer {name!r} is already adapted")
    if tuple(kernel.shape) != kernel_shape:
      raise ValueError(
        f"the kernel at {name!r} has shape {kernel.shape}; the adapter was trained for "
        f"{kernel_shape}"
      )
    dtype = resolve_adapter_dtype(config.adapter_dtype, kernel.dtype)
    new[path] = {
      key: value.astype(kernel.dtype if key in ("kernel", "bias") else dtype)
      for key, value in arrays.items()
    }
    arguments = {"projection": config.projection, "use_bias": config.use_bias, **config.options()}
    adapters[path] = tuple(sorted(arguments.items()))
  adapted = linen_adapt.DeltaLoRAModel(base, tuple(sorted(adapters.items())))
  variables = linen_adapt.with_adapters(variables, params, new)
  return adapted, variables, targets.report(variables, adapted, [paths.name(p) for p in new], False)
