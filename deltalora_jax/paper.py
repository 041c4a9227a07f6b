r"""The published Delta-LoRA rule (Zi et al., 2023) as an optax transformation.

The paper's method keeps no delta matrix ``D`` and computes no gradient for
the base kernel ``W``. After each optimizer step of the LoRA factors, ``W``
moves by the change of their product (from the start step ``K`` on):

.. math::

  W_{t+1} = W_t + \lambda\, s\,(A_{t+1} B_{t+1} - A_t B_t)

:func:`paper_delta_lora` wraps the factors' optimizer (AdamW by default, as in
the paper) and emits that kernel update from the factors' own updates and the
current ``params``; the model's adapted layers are built with
``use_delta=False`` (plain LoRA layers, base frozen): any kind of
:mod:`deltalora_jax.projections` (dense, dense-general, einsum, convolution),
stacked or not, with ``W`` updated in the kernel's own layout.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deltalora_jax import core, optim, paths, projections

KERNEL = "kernel"
LORA_A = "lora_a"
LORA_B = "lora_b"


class PaperDeltaLoRAState(NamedTuple):
  """State of :func:`paper_delta_lora`."""

  count: jax.Array  # int32 scalar: optimizer steps taken
  inner_state: optax.OptState  # state of the factors' (and others') optimizers


def factor_product_change(
  lora_a: jax.Array,
  lora_b: jax.Array,
  update_a: jax.Array,
  update_b: jax.Array,
  *,
  projection: projections.Projection | None = None,
  stack: int = 0,
) -> jax.Array:
  r"""The change of ``A B`` when the factors move by ``uA`` and ``uB``, in the kernel's layout.

  .. math::

    (A + u_A)(B + u_B) - A B = u_A B + A u_B + u_A u_B = [u_A,\ A + u_A]\,[B;\ u_B]

  computed without a copy of the old factors, as one product of the factors
  concatenated along their rank axes (``A``'s last, ``B``'s
  ``projection.rank_axis_of_b()``), taken by ``projection.lora_kernel`` so
  that the result has the kernel's layout (an einsum kernel may interleave
  contracted and output axes), at ``HIGHEST`` precision in at least float32
  (float64 inputs stay float64).

  Args:
    lora_a: ``A`` before the step (dense: ``[in, r]``).
    lora_b: ``B`` before the step (dense: ``[r, out]``).
    update_a: ``uA``, the optimizer's update of ``A`` (``A``'s shape).
    update_b: ``uB``, the optimizer's update of ``B`` (``B``'s shape).
    projection: the layer kind (:mod:`deltalora_jax.projections`); None is
      the dense-like layout ``A [*in, r]``, ``B [r, *out]``, kernel ``[*in, *out]``.
    stack: the number of leading layer axes (``nn.scan``, ``nnx.vmap``)
      of ``A``, ``B`` and the kernel; each layer of the stack has its own product.

  Returns:
    The change, shaped as the kernel (dense: ``[in, out]``), in float32
    (float64 when any input is float64).

  Example:
    >>> a, b = jnp.ones((2, 1)), jnp.zeros((1, 3))
    >>> factor_product_change(a, b, jnp.ones((2, 1)), jnp.ones((1, 3)))  # (2 * 1) - 0
    Array([[2., 2., 2.],
           [2., 2., 2.]], dtype=float32)
    >>> kind = projections.Einsum("btd,ndh->btnh", (2, 5, 3))  # A [d, r], B [r, n, h]
    >>> a, b = jnp.ones((5, 1)), jnp.ones((1, 2, 3))
    >>> factor_product_change(a, b, a, b, projection=kind).shape  # the kernel's [n, d, h]
    (2, 5, 3)
  """
  wide = any(jnp.dtype(x.dtype) == jnp.float64 for x in (lora_a, lora_b, update_a, update_b))
  dtype = jnp.float64 if wide else jnp.float32
  a, b, ua, ub = (x.astype(dtype) for x in (lora_a, lora_b, update_a, update_b))
  rank_axis_of_b = stack + (0 if projection is None else projection.rank_axis_of_b())
  left = jnp.concatenate([ua, a + ua], axis=-1)
  right = jnp.concatenate([b, ub], axis=rank_axis_of_b)
  product = projections.dense if projection is None else projection.lora_kernel
  product = functools.partial(product, precision=jax.lax.Precision.HIGHEST)
  for _ in range(stack):
    product = jax.vmap(product)
  return product(left, right)


def _normalize_path(key) -> tuple[str, ...]:
  if isinstance(key, str):
    return tuple(n for n in key.split("/") if n)
  if isinstance(key, tuple):
    return tuple(str(k) for k in key)
  raise TypeError(
    "scaling's keys must be layer paths (a tuple of names such as "
    f"adapted_layers(...) returns, or 'a/b' strings), got key {key!r}"
  )


def _check_scaling_value(name: str, value) -> tuple[Any, projections.Projection | None]:
  """``(s, projection)`` of a number (projection None) or a layer object."""
  projection = getattr(value, "projection", None)
  if projection is not None and not isinstance(projection, projections.Projection):
    raise TypeError(
      f"{name}.projection must be a GeneralDense, Einsum or Conv of deltalora_jax.projections, "
      f"got {projection!r}"
    )
  value = getattr(value, "scaling", value)
  concrete = core._as_float(name, value)
  if concrete is not None and not (math.isfinite(concrete) and concrete > 0):
    raise ValueError(f"{name} must be finite and > 0, got {name}={value!r}")
  return value, projection


def _check_scaling(scaling) -> Any:
  """``(s, projection)`` for a number, or ``{path tuple: (s, projection)}`` from a mapping."""
  if isinstance(scaling, Mapping):
    if not scaling:
      raise ValueError("scaling must not be an empty mapping")
    return {
      _normalize_path(k): _check_scaling_value(f"scaling[{k!r}]", v) for k, v in scaling.items()
    }
  return _check_scaling_value("scaling", scaling)


def _check_lambda(lambda_):
  value = core._as_float("lambda_", lambda_)
  if value is not None and not (math.isfinite(value) and value >= 0):
    raise ValueError(f"lambda_ must be finite and >= 0, got lambda_={lambda_!r}")
  return lambda_


def _check_start_step(start_step):
  if isinstance(start_step, jax.core.Tracer):
    return start_step
  integer = isinstance(start_step, int | np.integer) or (
    isinstance(start_step, np.ndarray | jax.Array) and jnp.issubdtype(start_step.dtype, jnp.integer)
  )
  if isinstance(start_step, bool) or not integer or np.ndim(start_step) != 0:
    raise TypeError(f"start_step must be a scalar int >= 0, got start_step={start_step!r}")
  if int(start_step) < 0:
    raise ValueError(f"start_step must be >= 0, got start_step={start_step!r}")
  return start_step


def _adapted_layers(tree) -> dict[tuple[str, ...], dict[str, int]]:
  """``{layer path: {'kernel': i, 'lora_a': j, 'lora_b': k}}``, indices into the leaves.

  Raises ValueError for a ``delta`` leaf, for no adapted layer at all, and for
  a layer whose kernel or factors are missing.
  """
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  groups: dict[tuple[str, ...], dict[str, int]] = {}
  for i, (path, _) in enumerate(flat):
    names = paths.key_path(path)
    if names and names[-1] == optim.DELTA:
      raise ValueError(
        "paper_delta_lora is the rule without D: build the layers with "
        f"use_delta=False; the tree has a 'delta' leaf at {'/'.join(names)!r}"
      )
    if names and names[-1] in (KERNEL, LORA_A, LORA_B):
      groups.setdefault(names[:-1], {})[names[-1]] = i
  layers = {p: g for p, g in groups.items() if LORA_A in g or LORA_B in g}
  if not layers:
    raise ValueError(
      "paper_delta_lora found no adapted layer (leaves named 'lora_a', 'lora_b' "
      "beside a 'kernel') in the params"
    )
  for path, group in layers.items():
    if len(group) != 3:
      raise ValueError(
        f"adapted layer {'/'.join(path)!r} must have 'kernel', 'lora_a' and 'lora_b', "
        f"got {sorted(group)}"
      )
  return layers


def _stack_axes(path, kernel, lora_a, lora_b, projection) -> int:
  """The number of leading stack axes of one adapted layer, its shapes checked.

  Without a projection, the dense-like layout: ``A [*stack, *in, r]``,
  ``B [*stack, r, *out]``, kernel ``[*stack, *in, *out]``.
  """
  name = "/".join(path)
  if projection is not None:
    try:
      core.check_layer_shapes(kernel, None, lora_a, lora_b, None, projection)
    except ValueError as error:
      raise ValueError(f"adapted layer {name!r}: {error}") from None
    return jnp.ndim(kernel) - projection.kernel_ndim
  k, a, b = (tuple(jnp.shape(x)) for x in (kernel, lora_a, lora_b))
  n = len(a) + len(b) - 2 - len(k)
  stacked = n >= 0 and min(len(a), len(b)) > n + 1 and a[:n] == b[:n] == k[:n]
  if stacked and a[-1] == b[n] and a[n:-1] + b[n + 1 :] == k[n:]:
    return n
  raise ValueError(
    f"adapted layer {name!r}: lora_a {a} and lora_b {b} do not multiply into its kernel {k} "
    "in the dense-like layout that a numeric scaling assumes (lora_a [*stack, *in, r], "
    "lora_b [*stack, r, *out], kernel [*stack, *in, *out]); pass scaling as the layers "
    "mapping {path: layer} (dl.adapted_layers(...), DeltaLoRAModel.layers, or "
    "dict(deltalora_jax.nnx.adapters(model))), whose layers know their projection"
  )


def _layer_scalings(layers, scaling) -> dict[tuple[str, ...], Any]:
  """``(s, projection)`` of each adapted layer (by its path in the params tree)."""
  if not isinstance(scaling, dict):
    return dict.fromkeys(layers, scaling)

  def lookup(path):
    for candidate in (path, path[1:] if path[:1] == ("params",) else None):
      if candidate is not None and candidate in scaling:
        return candidate
    raise ValueError(
      f"scaling has no entry for the adapted layer {'/'.join(path)!r}; "
      f"its keys are {sorted(scaling)}"
    )

  found = {path: lookup(path) for path in layers}
  unused = set(scaling) - set(found.values())
  if unused:
    raise ValueError(
      f"scaling has keys that name no adapted layer: {sorted(unused)}; the adapted "
      f"layers are {sorted(found)}"
    )
  return {path: scaling[key] for path, key in found.items()}


def paper_delta_lora(
  learning_rate: optax.ScalarOrSchedule | None = None,
  *,
  scaling: float | Mapping[Any, Any],
  lambda_: float = 2.0,
  start_step: int = 500,
  lora_optimizer: optax.GradientTransformation | None = None,
  other_optimizer: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""The published Delta-LoRA rule: the base kernel follows the change of ``A B``.

  Leaves are routed by :func:`deltalora_jax.leaf_labels`: the LoRA factors
  get ``lora_optimizer``; the adapted layers' kernels get the rule below (their
  gradient is ignored: build the layers with ``freeze_base=True``, the default,
  and XLA computes none); their biases stay frozen; every other parameter gets
  ``other_optimizer`` (None freezes it). For step ``t`` (counted from 0):

  .. math::

    (u_A, u_B) = \mathrm{opt}(g_A, g_B), \qquad A_{t+1} = A_t + u_A, \quad
    B_{t+1} = B_t + u_B

    u_W = \lambda s\,(u_A B_t + A_t u_B + u_A u_B) = \lambda s\,(A_{t+1} B_{t+1} - A_t B_t)
    \quad \text{if } t \ge K, \text{ else } 0

  So ``W_T = W_K + lambda s (A_T B_T - A_K B_K)``: the total change of ``W``
  has rank at most ``2 r``, and the forward weight is
  ``(W_K - lambda s A_K B_K) + (1 + lambda) s A_t B_t``. The change is
  computed in float32 (float64 for float64 factors) from the factors' updates
  and ``params``, with no copy of the old factors
  (:func:`factor_product_change`), in the kernel's own layout, then cast to
  the kernel's dtype. Layers stacked by ``nn.scan`` or ``nnx.vmap`` (extra
  leading axes on the kernel and the factors) get one product per layer.

  ``K`` is the number of plain LoRA steps before the rule starts (the paper's
  ``t > K`` with ``t`` from 0 is ``start_step = K + 1``). The paper also
  removes LoRA dropout from the branch; this library has no LoRA dropout. A
  tree with a ``delta`` leaf (layers with ``use_delta=True``) is refused: use
  :func:`deltalora_jax.delta_lora` for the seed's rule.

  Args:
    learning_rate: learning rate of the default ``optax.adamw`` on the
      factors, a float or a schedule; give it or ``lora_optimizer``, not both.
    scaling: the LoRA scaling ``s = alpha / rank`` of the adapted layers: one
      number for all, or a mapping from a layer's path (a tuple of names, or
      an ``'a/b'`` string) to its scaling or to an object with a ``scaling``
      attribute, such as the mapping :func:`deltalora_jax.adapted_layers`
      returns. Paths are those of the params tree, without a leading
      ``'params'`` collection name; every adapted layer needs an entry. A
      layer object's ``projection`` says how ``A B`` lays out in its kernel;
      a plain number assumes the dense-like layout (``A [*stack, *in, r]``,
      ``B [*stack, r, *out]``, kernel ``[*stack, *in, *out]``), which does
      not hold for an einsum kernel whose contracted and output axes
      interleave (``btd,ndh->btnh``): pass the layers mapping for those (a
      number is refused when the shapes show the mismatch, and cannot see
      it when they happen to fit, as with ``n == d``).
    lambda_: the paper's update ratio ``lambda``, finite and ``>= 0``.
    start_step: ``K``, an int ``>= 0``; ``0`` applies the rule from the first
      step.
    lora_optimizer: optimizer of ``lora_a`` and ``lora_b``; None is
      ``optax.adamw(learning_rate)``.
    other_optimizer: optimizer of every leaf that is neither a factor nor an
      adapted layer's base (a new head, ...); None freezes them.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
    ``params``. ``lambda_``, ``start_step``, a numeric ``scaling`` and the
    learning rate may be traced, so ``optax.inject_hyperparams`` works.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import deltalora_jax as dl
    >>> layer = dl.DeltaLoRADense(features=3, rank=2, use_delta=False)
    >>> x = jnp.ones((4, 5))
    >>> variables = layer.init(jax.random.key(0), x)
    >>> tx = dl.paper_delta_lora(
    ...     lora_optimizer=optax.sgd(0.1), scaling=layer.scaling, start_step=0)
    >>> opt_state = tx.init(variables)
    >>> grads = jax.grad(lambda v: jnp.sum((layer.apply(v, x) - 1.0) ** 2))(variables)
    >>> updates, opt_state = tx.update(grads, opt_state, variables)
    >>> new = optax.apply_updates(variables, updates)
    >>> p, q = variables["params"], new["params"]
    >>> change = 2.0 * (q["lora_a"] @ q["lora_b"] - p["lora_a"] @ p["lora_b"])
    >>> bool(jnp.allclose(q["kernel"] - p["kernel"], change, atol=1e-6))
    True

  References:
    Zi et al., `Delta-LoRA: Fine-Tuning High-Rank Parameters with the Delta of
    Low-Rank Matrices <https://arxiv.org/abs/2309.02411>`_, 2023 (Algorithm 1).
  """
  for name, tx in (("lora_optimizer", lora_optimizer), ("other_optimizer", other_optimizer)):
    if tx is not None and not isinstance(tx, optax.GradientTransformation):
      raise TypeError(f"{name} must be an optax.GradientTransformation or None, got {tx!r}")
  if (learning_rate is None) == (lora_optimizer is None):
    raise ValueError(
      "give exactly one of learning_rate (for the default AdamW on the factors) and "
      f"lora_optimizer, got learning_rate={learning_rate!r}, lora_optimizer={lora_optimizer!r}"
    )
  if learning_rate is not None:
    core.check_learning_rate(learning_rate)
    lora_optimizer = optax.adamw(learning_rate)
  scaling = _check_scaling(scaling)
  _check_lambda(lambda_)
  _check_start_step(start_step)
  inner = optax.multi_transform(
    {
      optim.LORA: lora_optimizer,
      optim.BASE: optax.set_to_zero(),
      optim.OTHER: other_optimizer or optax.set_to_zero(),
    },
    optim.leaf_labels,
  )

  def layer_plans(params):
    """``{path: (leaf indices, s, projection, stack)}``, every layer's shapes checked."""
    layers = _adapted_layers(params)
    leaves = jax.tree.leaves(params)
    plans = {}
    for path, (s, projection) in _layer_scalings(layers, scaling).items():
      arrays = (leaves[layers[path][n]] for n in (KERNEL, LORA_A, LORA_B))
      plans[path] = layers[path], s, projection, _stack_axes(path, *arrays, projection)
    return plans

  def init_fn(params):
    layer_plans(params)
    return PaperDeltaLoRAState(count=jnp.zeros([], jnp.int32), inner_state=inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(
        "paper_delta_lora needs the current parameters: call "
        "tx.update(grads, opt_state, params), params being the tree given to tx.init"
      )
    plans = layer_plans(params)
    updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    leaves, treedef = jax.tree.flatten(updates)
    param_leaves = treedef.flatten_up_to(params)
    started = state.count >= jnp.asarray(start_step).astype(jnp.int32)
    for group, s, projection, stack in plans.values():
      a, b = param_leaves[group[LORA_A]], param_leaves[group[LORA_B]]
      ua, ub = leaves[group[LORA_A]], leaves[group[LORA_B]]
      change = factor_product_change(a, b, ua, ub, projection=projection, stack=stack)
      coef = jnp.asarray(lambda_, change.dtype) * jnp.asarray(s, change.dtype)
      kernel = param_leaves[group[KERNEL]]
      leaves[group[KERNEL]] = jnp.where(started, coef * change, 0).astype(kernel.dtype)
    count = optax.safe_increment(state.count)
    return treedef.unflatten(leaves), PaperDeltaLoRAState(count=count, inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
