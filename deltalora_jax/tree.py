"""Whole-model utilities over variables trees: find, count, flatten, merge, reset.

A *layers* mapping ``{path: layer}`` (a :class:`DeltaLoRADense` or
:class:`~deltalora_jax.DeltaLoRAGeneral`) says where a model's adapted
layers are and how each is configured; :func:`adapted_layers` builds it by
tracing the model once (no computation). A single layer is the model whose
only adapted layer sits at the root path ``()``, so every function here works
for one layer and for a whole model alike.

An NNX model (with ``layers`` left out) is accepted by :func:`parameter_counts`,
:func:`diagnostics` and :func:`merge`; the other functions take Linen variables
and raise ``TypeError`` for anything else.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx, traverse_util

from deltalora_jax import core, optim, paths
from deltalora_jax import nnx as nnx_front
from deltalora_jax.linen import DELTA_COLLECTION, DeltaLoRADense, DeltaLoRAGeneral

Path = tuple[str, ...]
Layers = Mapping[Path, DeltaLoRADense | DeltaLoRAGeneral]


def adapted_layers(
  model: nn.Module, *args, **kwargs
) -> dict[Path, DeltaLoRADense | DeltaLoRAGeneral]:
  """Finds every adapted layer (DeltaLoRADense, DeltaLoRAGeneral) of a Linen model, by path.

  The model is traced once with ``jax.eval_shape`` (no computation) on the
  same arguments as ``model.init`` takes after its key.

  Args:
    model: a Linen module, or a single adapted layer.
    *args: sample inputs, as for ``model.init(key, *args)``.
    **kwargs: keyword arguments of the model's ``__call__``.

  Returns:
    ``{path: layer}`` in call order; the root layer's path is ``()``.

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
    [('hidden',)]
  """
  found: dict[Path, DeltaLoRADense | DeltaLoRAGeneral] = {}

  def record(next_fun, call_args, call_kwargs, context):
    module = context.module
    adapted = isinstance(module, DeltaLoRADense | DeltaLoRAGeneral)
    if adapted and context.method_name == "__call__":
      found.setdefault(tuple(module.path), module)
    return next_fun(*call_args, **call_kwargs)

  key = jax.random.key(0)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.init({"params": key, "dropout": key}, *args, **kwargs))
  if not found:
    raise ValueError(f"model {type(model).__name__} has no adapted layer")
  return found


def _resolve(variables, layers, opt_state=None):
  """``(variables, layers, opt_state)``; an NNX model stands for all three.

  An NNX model's adapters are read into the Linen layout by
  :func:`deltalora_jax.nnx.linen_view`, so one implementation serves both APIs.
  """
  if isinstance(variables, nnx.Module):
    if layers is not None:
      raise TypeError("layers must be None for an NNX model (its layers are found in it)")
    return nnx_front.linen_view(variables, opt_state)
  if layers is None:
    raise TypeError(
      "layers is required with a Linen variables tree: pass {path: adapted layer}, "
      f"e.g. adapted_layers(model, x); got variables of type {type(variables).__name__}"
    )
  return variables, layers, opt_state


def _check_mapping(tree) -> None:
  if not isinstance(tree, Mapping):
    raise TypeError(
      "variables must be a Linen variables dict {collection: tree}; this function does "
      f"not take an NNX model yet, got {type(tree).__name__}"
    )


def _flat(tree: Mapping, collection: str) -> dict[Path, Any]:
  _check_mapping(tree)
  if collection not in tree:
    raise ValueError(
      f"variables must hold the {collection!r} collection, got collections {list(tree)}"
    )
  return traverse_util.flatten_dict(tree[collection])


def _layer_params(params_flat, path: Path, name: str):
  key = (*path, name)
  if key not in params_flat:
    raise ValueError(
      f"variables have no {'/'.join(key)!r}: is layers[{path!r}] a layer of this model?"
    )
  return params_flat[key]


def _layer_arrays(variables: Mapping, path: Path, layer: DeltaLoRADense) -> dict[str, Any]:
  """The named arrays of one adapted layer, in the seed's flat order."""
  params = _flat(variables, "params")
  arrays = {}
  if not layer.freeze_base:
    arrays["kernel"] = _layer_params(params, path, "kernel")
    if layer.use_bias:
      arrays["bias"] = _layer_params(params, path, "bias")
  arrays["lora_a"] = _layer_params(params, path, "lora_a")
  arrays["lora_b"] = _layer_params(params, path, "lora_b")
  if layer.use_delta:
    arrays["delta"] = _layer_params(_flat(variables, DELTA_COLLECTION), path, "delta")
  return arrays


def _layer_delta(variables: Mapping, path: Path, layer: DeltaLoRADense):
  """``D`` of the layer at ``path``, or None for a layer without one."""
  if not layer.use_delta:
    return None
  return _layer_params(_flat(variables, DELTA_COLLECTION), path, "delta")


def parameter_counts(variables: Mapping, layers: Layers | None = None) -> dict[str, int]:
  """Trainable parameter count of each adapted layer, and their ``'total'``.

  ``variables`` may be an NNX model instead, with ``layers`` left out.

  Per layer: ``r (in + out) + in out``, plus ``in out + out`` for a base that
  is not frozen (``in out`` without bias).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> layer = DeltaLoRADense(features=3, rank=2)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> parameter_counts(variables, {(): layer})  # 2 * (4 + 3) + 4 * 3
    {'': 26, 'total': 26}
  """
  variables, layers, _ = _resolve(variables, layers)
  counts = {
    paths.name(path): sum(
      math.prod(a.shape) for a in _layer_arrays(variables, path, layer).values()
    )
    for path, layer in layers.items()
  }
  counts["total"] = sum(counts.values())
  return counts


def flatten_parameters(tree: Mapping, layers: Layers) -> jax.Array:
  """All trainable numbers of the adapted layers as one vector, in the seed's order.

  Per layer, in the order of ``layers``: ``[kernel, bias]`` (only when the
  base is not frozen), ``lora_a``, ``lora_b``, ``delta``, each row-major.
  Given a gradient tree of the same structure, it packs the gradients in the
  same order (the seed's ``GetParameterGradients``).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> layer = DeltaLoRADense(features=3, rank=2)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> flatten_parameters(variables, {(): layer}).shape
    (26,)
  """
  parts = [
    jnp.ravel(a)
    for path, layer in layers.items()
    for a in _layer_arrays(tree, path, layer).values()
  ]
  return jnp.concatenate(parts)


def unflatten_parameters(tree: Mapping, layers: Layers, vector: jax.Array) -> dict:
  """The inverse of :func:`flatten_parameters`: a new tree with ``vector``'s values.

  The input tree is not modified. Each value keeps its leaf's dtype.

  Raises:
    ValueError: when ``vector`` is not 1-D of the expected length.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> layer = DeltaLoRADense(features=3, rank=2)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> new = unflatten_parameters(variables, {(): layer}, jnp.arange(26.0))
    >>> new["delta"]["delta"][0]
    Array([14., 15., 16.], dtype=float32)
  """
  expected = parameter_counts(tree, layers)["total"]
  shape = jnp.shape(vector)
  if len(shape) != 1 or shape[0] != expected:
    raise ValueError(
      f"vector must be 1-D with {expected} values (the trainable parameters of "
      f"{len(layers)} layer(s)), got shape {shape}"
    )
  flat = {c: traverse_util.flatten_dict(v) for c, v in tree.items()}
  offset = 0
  for path, layer in layers.items():
    for name, array in _layer_arrays(tree, path, layer).items():
      size = math.prod(array.shape)
      value = jnp.reshape(vector[offset : offset + size], array.shape).astype(array.dtype)
      collection = DELTA_COLLECTION if name == "delta" else "params"
      flat[collection][(*path, name)] = value
      offset += size
  return {c: traverse_util.unflatten_dict(v) for c, v in flat.items()}


def current_delta(variables: Mapping, path: Path = ()) -> jax.Array:
  """A copy of the delta matrix ``D [in, out]`` of the layer at ``path``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> layer = DeltaLoRADense(features=3, rank=2)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> current_delta(variables).shape
    (4, 3)
  """
  return jnp.array(_layer_params(_flat(variables, DELTA_COLLECTION), path, "delta"), copy=True)


def merge(variables: Mapping, layers: Layers | None = None) -> dict:
  """Variables for the same model written with its base layers in place of each adapter.

  Given an NNX model instead (and no ``layers``), returns a merged copy whose
  adapters are the base layers' classes again
  (:func:`deltalora_jax.nnx.merged_model`).

  Each adapted layer's ``kernel`` becomes ``W + s A B + ds D`` in its own
  layout (each layer of a stack on its own), formed in at least float32 and
  stored in the kernel's dtype (a bfloat16 kernel rounds the adapter's
  contribution); its bias is unchanged; ``lora_a``, ``lora_b`` and the
  ``'delta'`` collection are dropped. Other collections (``batch_stats``,
  ...) are kept.

  Raises:
    TypeError: when a layer of ``layers`` is not an adapted layer.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> layer = DeltaLoRADense(features=3, rank=2)
    >>> x = jnp.ones((2, 4))
    >>> variables = layer.init(jax.random.key(0), x)
    >>> merged = merge(variables, {(): layer})
    >>> bool(jnp.allclose(nn.Dense(3).apply(merged, x), layer.apply(variables, x)))
    True
  """
  if isinstance(variables, nnx.Module):
    _resolve(variables, layers)
    return nnx_front.merged_model(variables)
  _resolve(variables, layers)
  params = _flat(variables, "params")
  for path, layer in layers.items():
    kernel = _layer_params(params, path, "kernel")
    if not hasattr(layer, "projection"):
      raise TypeError(
        f"merge needs an adapted layer at {paths.name(path)!r}, got {type(layer).__name__}"
      )
    params[(*path, "kernel")] = core.merged_kernel(
      kernel,
      params.pop((*path, "lora_a")),
      params.pop((*path, "lora_b")),
      _layer_delta(variables, path, layer),
      scaling=layer.scaling,
      delta_scaling=layer.delta_scaling,
      precision=jax.lax.Precision.HIGHEST,
      projection=layer.projection,
    ).astype(kernel.dtype)
  merged = {c: v for c, v in variables.items() if c not in ("params", DELTA_COLLECTION)}
  merged["params"] = traverse_util.unflatten_dict(params)
  return merged


def reset(variables: Mapping, opt_state: Any = None) -> tuple[dict, Any]:
  """Zeroes every delta matrix ``D`` and every velocity; keeps everything else.

  A model without ``D`` (``use_delta=False``) is returned unchanged.

  Args:
    variables: the model's variables.
    opt_state: the optimizer state holding the velocity, or None.

  Returns:
    ``(variables, opt_state)``, new trees; ``opt_state`` is None when given None.

  Example:
    >>> import jax.numpy as jnp
    >>> variables = {"params": {"kernel": jnp.ones(2)}, "delta": {"delta": jnp.ones(2)}}
    >>> reset(variables)[0]["delta"]["delta"]
    Array([0., 0.], dtype=float32)
  """
  _check_mapping(variables)
  variables = dict(variables)
  if DELTA_COLLECTION in variables:
    variables[DELTA_COLLECTION] = jax.tree.map(jnp.zeros_like, variables[DELTA_COLLECTION])
  if opt_state is not None:
    opt_state = optim.reset_velocity(opt_state)
  return variables, opt_state


def _norm(x) -> float:
  return float(jnp.linalg.norm(jnp.ravel(x).astype(jnp.float32)))


def _lora_norm(lora_a, lora_b, layer, stack: int) -> float:
  """``||s A B||_F`` without forming ``A B`` (over every layer of a stack)."""
  norm = lambda a, b: core.lora_product_norm(a, b, layer.scaling, layer.projection)  # noqa: E731
  for _ in range(stack):
    norm = jax.vmap(norm)
  return float(jnp.sqrt(jnp.sum(norm(lora_a, lora_b) ** 2)))


def diagnostics(variables: Mapping, layers: Layers | None = None, opt_state: Any = None) -> dict:
  """Figures for each adapted layer and in total (the seed's diagnostics).

  ``variables`` may be an NNX model instead, with ``layers`` left out and
  ``opt_state`` an ``nnx.Optimizer`` (or its ``opt_state``).

  Per layer: ``type``, ``kind`` (``general_dense``, ``einsum`` or
  ``conv``), ``kernel_shape`` (a stack's leading axes included),
  ``in_features`` and ``out_features`` (the sizes of one layer's kernel as
  the matrix that ``A B`` factors), ``rank``, ``scaling``,
  ``delta_scaling``, ``freeze_base``, ``parameter_count``, and
  the Frobenius norms ``delta_norm`` (``||D||``, 0 without ``D``), ``lora_norm``
  (``||s A B||``, without forming ``A B``) and, when ``opt_state`` is given,
  ``velocity_norm`` (``||V||``). ``'total'`` holds the layer count, the
  parameter count and the global norms.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> layer = DeltaLoRADense(features=3, rank=2)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> diagnostics(variables, {(): layer})["layers"][""]["delta_norm"]
    0.0
  """
  variables, layers, opt_state = _resolve(variables, layers, opt_state)
  report = layer_figures(variables, layers)
  params = _flat(variables, "params")
  velocities = None
  if opt_state is not None:
    velocities = traverse_util.flatten_dict(optim.velocity(opt_state)[DELTA_COLLECTION])
  for path, layer in layers.items():
    entry = report[paths.name(path)]
    delta = _layer_delta(variables, path, layer)
    lora_a = _layer_params(params, path, "lora_a")
    lora_b = _layer_params(params, path, "lora_b")
    stack = len(entry["kernel_shape"]) - layer.projection.kernel_ndim
    entry["delta_norm"] = 0.0 if delta is None else _norm(delta)
    entry["lora_norm"] = _lora_norm(lora_a, lora_b, layer, stack)
    if velocities is not None and layer.use_delta:
      entry["velocity_norm"] = _norm(_layer_params(velocities, path, "delta"))
  norms = ["delta_norm", "lora_norm"] + ([] if velocities is None else ["velocity_norm"])
  total = {
    "layers": len(report),
    "parameter_count": sum(e["parameter_count"] for e in report.values()),
  }
  for key in norms:
    total[key] = math.sqrt(sum(e.get(key, 0.0) ** 2 for e in report.values()))
  return {"layers": report, "total": total}


def layer_figures(variables: Mapping, layers: Layers | None = None) -> dict[str, dict]:
  """What each adapted layer is, by name: the figures of :func:`diagnostics` without norms.

  ``type``, ``kind``, ``kernel_shape``, ``in_features``, ``out_features``,
  ``rank``, ``scaling``, ``delta_scaling``, ``freeze_base`` and
  ``parameter_count``; nothing is computed on the arrays but their shapes.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> layer = DeltaLoRADense(features=3, rank=2)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> layer_figures(variables, {(): layer})[""]["kernel_shape"]
    [4, 3]
  """
  variables, layers, _ = _resolve(variables, layers)
  counts = parameter_counts(variables, layers)
  params = _flat(variables, "params")
  figures = {}
  for path, layer in layers.items():
    kernel = _layer_params(params, path, "kernel")
    stack = kernel.ndim - layer.projection.kernel_ndim
    per_rank = math.prod(kernel.shape[:stack]) * layer.rank
    figures[paths.name(path)] = {
      "type": type(layer).__name__,
      "kind": layer.projection.name,
      "kernel_shape": [int(n) for n in kernel.shape],
      "in_features": _layer_params(params, path, "lora_a").size // per_rank,
      "out_features": _layer_params(params, path, "lora_b").size // per_rank,
      "rank": layer.rank,
      "scaling": layer.scaling,
      "delta_scaling": float(layer.delta_scaling),
      "freeze_base": layer.freeze_base,
      "parameter_count": counts[paths.name(path)],
    }
  return figures

