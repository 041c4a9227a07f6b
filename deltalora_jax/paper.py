r"""The published Delta-LoRA rule (Zi et al., 2023) as an optax transformation.

The paper's method keeps no delta matrix ``D`` and computes no gradient for
the base kernel ``W``. After each optimizer step of the LoRA factors, ``W``
moves by the change of their product, at the steps ``t > K`` (``t`` from 0):

.. math::

  W_{t+1} = W_t + \lambda\, s\,(A_{t+1} B_{t+1} - A_t B_t)

:func:`paper_delta_lora` wraps the factors' optimizer (AdamW by default, as in
the paper), reading each layer's scaling, projection and ``paper_lambda`` from the
adapted layers it is given. Those are built with ``use_delta=False`` (base
frozen) and may be of any kind of :mod:`deltalora_jax.projections` (dense,
dense-general, einsum, convolution), stacked or not.

The sum telescopes, ``W_T = W_0 + lambda s (A_T B_T - A_{K+1} B_{K+1})``: a
layer built with ``paper_lambda`` holds a snapshot ``(A^, B^)`` of its factors
and adds ``lambda s (A B - A^ B^)`` in its forward
(:func:`deltalora_jax.core.delta_lora_apply`), and the rule writes the snapshot
(the factors' update while ``t <= K``, then nothing), never ``W``: the
telescoped form, the default. A layer without ``paper_lambda`` gets the
in-place form, Algorithm 1 as written: the rule emits the kernel update above
from the factors' own updates and the current ``params``, in the kernel's own
layout.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from deltalora_jax import config, core, optim, paths, projections
from deltalora_jax.linen import QUANTIZED_COLLECTION, SNAPSHOT_COLLECTION

KERNEL = "kernel"
LORA_A = "lora_a"
LORA_B = "lora_b"
SNAPSHOT_A, SNAPSHOT_B = core.SNAPSHOT_NAMES
_NAMES = (KERNEL, LORA_A, LORA_B, SNAPSHOT_A, SNAPSHOT_B)

_T = TypeVar("_T")
#: One in-place layer of a params tree: its leaf indices, ``s``, projection and stack axes.
_Plan = tuple[dict[str, int], float, projections.Projection, int]


class _LayerSettings(NamedTuple):
  """What the rule reads of one adapted layer."""

  scaling: float
  projection: projections.Projection
  paper_lambda: float | None  # None: the in-place form


class PaperDeltaLoRAState(NamedTuple):
  """State of :func:`paper_delta_lora`.

  Attributes:
    count: the number of optimizer steps taken, an int32 scalar (``t`` of
      :func:`paper_delta_lora`).
    inner_state: the state of the factors' (and the other parameters')
      optimizers.
  """

  # int32 scalar: optimizer steps taken. The name is optax's (its states' step counts), which
  # shadows tuple.count for the type checker only.
  count: jax.Array  # type: ignore[assignment]
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
    projection: the layer's product (:mod:`deltalora_jax.projections`); None is
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
    >>> projection = projections.Einsum("btd,ndh->btnh", (2, 5, 3))  # A [d, r], B [r, n, h]
    >>> a, b = jnp.ones((5, 1)), jnp.ones((1, 2, 3))
    >>> factor_product_change(a, b, a, b, projection=projection).shape  # the kernel's [n, d, h]
    (2, 5, 3)
  """
  wide = any(jnp.dtype(x.dtype) == jnp.float64 for x in (lora_a, lora_b, update_a, update_b))
  dtype = jnp.float64 if wide else jnp.float32
  a, b, ua, ub = (x.astype(dtype) for x in (lora_a, lora_b, update_a, update_b))
  rank_axis_of_b = stack + (0 if projection is None else projection.rank_axis_of_b())
  left = jnp.concatenate([ua, a + ua], axis=-1)
  right = jnp.concatenate([b, ub], axis=rank_axis_of_b)
  kernel_of = projections.dense if projection is None else projection.lora_kernel
  product: Callable[[jax.Array, jax.Array], jax.Array] = functools.partial(
    kernel_of, precision=jax.lax.Precision.HIGHEST
  )
  for _ in range(stack):
    product = jax.vmap(product)
  return product(left, right)


def _layer_settings(layers: Any) -> dict[paths.Path, _LayerSettings]:
  """``{layer path: _LayerSettings}`` of the adapted layers; refuses a layer with ``D``."""
  configs = config.layer_configs(layers)
  with_delta = [paths.name(path) for path, layer in configs.items() if layer.use_delta]
  if with_delta:
    raise ValueError(
      "paper_delta_lora is the rule without D: build the adapted layers with use_delta=False; "
      f"layers has use_delta=True at {with_delta}"
    )
  return {
    path: _LayerSettings(layer.scaling, layer.projection, layer.paper_lambda)
    for path, layer in configs.items()
  }


def _check_lambda(lambda_: _T, settings: Mapping[paths.Path, _LayerSettings]) -> _T:
  """Checks ``lambda_``; with snapshot layers it must be None or their ``paper_lambda``."""
  if lambda_ is None:
    return lambda_
  value = core.as_float("lambda_", lambda_)
  if value is not None and not (math.isfinite(value) and value >= 0):
    raise ValueError(f"lambda_ must be finite and >= 0, got lambda_={lambda_!r}")
  telescoped = {p: s.paper_lambda for p, s in settings.items() if s.paper_lambda is not None}
  if not telescoped:
    return lambda_
  if value is None:
    raise TypeError(
      "lambda_ is traced (optax.inject_hyperparams or a schedule), but the layers "
      f"{sorted(map(paths.name, telescoped))} take the telescoped form, whose lambda is the "
      "layers' paper_lambda, fixed for the run (a lambda that changes after K does not "
      "telescope): leave lambda_ out, or build layers without paper_lambda for the in-place form"
    )
  differ = {paths.name(p): v for p, v in telescoped.items() if v != value}
  if differ:
    raise ValueError(
      f"lambda_={value!r} differs from the paper_lambda of the layers {differ}: leave "
      "lambda_ out (the layers' paper_lambda is used)"
    )
  return lambda_


def _check_start_step(start_step: _T) -> _T:
  if isinstance(start_step, jax.core.Tracer):
    return start_step
  value = start_step if isinstance(start_step, int | np.integer | np.ndarray | jax.Array) else None
  integer = isinstance(value, int | np.integer) or (
    isinstance(value, np.ndarray | jax.Array) and jnp.issubdtype(value.dtype, jnp.integer)
  )
  if value is None or isinstance(value, bool) or not integer or np.ndim(value) != 0:
    raise TypeError(f"start_step must be a scalar int >= 0, got start_step={start_step!r}")
  if int(value) < 0:
    raise ValueError(f"start_step must be >= 0, got start_step={start_step!r}")
  return start_step


def _adapted_layers(tree: Any) -> dict[paths.Path, dict[str, int]]:
  """``{layer path in the tree: {'kernel': i, 'lora_a': j, ...}}``, indices into the leaves.

  A Linen snapshot (``('snapshot', *layer, 'snapshot_a')``) joins the layer
  ``('params', *layer)``. Raises ValueError for a ``delta`` leaf, for no
  adapted layer at all, for a layer without both factors, and for snapshot
  factors beside no factors.
  """
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  groups: dict[paths.Path, dict[str, int]] = {}
  for i, (path, _) in enumerate(flat):
    names = paths.key_path(path)
    if names and names[-1] == optim.DELTA:
      raise ValueError(
        "paper_delta_lora is the rule without D: build the layers with "
        f"use_delta=False; the tree has a 'delta' leaf at {paths.name(names)!r}"
      )
    if names and names[-1] in _NAMES:
      groups.setdefault(names[:-1], {})[names[-1]] = i
  for path in list(groups):
    linen = ("params", *path[1:])
    beside = path[:1] in ((SNAPSHOT_COLLECTION,), (QUANTIZED_COLLECTION,))  # an int8 base too
    if beside and LORA_A not in groups[path] and linen in groups:
      groups[linen].update(groups.pop(path))
  layers = {p: g for p, g in groups.items() if {LORA_A, LORA_B, SNAPSHOT_A, SNAPSHOT_B} & set(g)}
  if not layers:
    raise ValueError(
      "paper_delta_lora found no adapted layer (leaves named 'lora_a', 'lora_b' "
      "beside a 'kernel') in the params"
    )
  for path, group in layers.items():
    if not {LORA_A, LORA_B} <= set(group):
      raise ValueError(
        f"adapted layer {paths.name(path)!r} must have 'lora_a' and 'lora_b', got {sorted(group)}"
      )
  return layers


def _check_layer_names(path: paths.Path, group: Mapping[str, int], layer: _LayerSettings) -> None:
  """Raises unless the layer has what its form needs: the kernel (in place) or the snapshot."""
  if layer.paper_lambda is None:
    needed, form = {KERNEL, LORA_A, LORA_B}, "in-place"
    if extra := sorted({SNAPSHOT_A, SNAPSHOT_B} & set(group)):
      raise ValueError(
        f"adapted layer {paths.name(path)!r} has {extra} in the tree, but its layer has no "
        "paper_lambda: pass the layers of the model that made these params"
      )
  else:
    needed, form = {LORA_A, LORA_B, SNAPSHOT_A, SNAPSHOT_B}, "telescoped"
  if missing := sorted(needed - set(group)):
    raise ValueError(
      f"adapted layer {paths.name(path)!r} ({form} form) must have {sorted(needed)}, lacks "
      f"{missing}; got {sorted(group)}"
    )


def _stack_axes(
  path: paths.Path,
  kernel: ArrayLike,
  lora_a: ArrayLike,
  lora_b: ArrayLike,
  projection: projections.Projection,
) -> int:
  """The number of leading stack axes of one adapted layer, its shapes checked."""
  try:
    core.check_layer_shapes(kernel, None, lora_a, lora_b, None, projection)
  except ValueError as error:
    raise ValueError(f"adapted layer {paths.name(path)!r}: {error}") from None
  return jnp.ndim(kernel) - projection.kernel_ndim


def _match_layers(
  found: Mapping[paths.Path, Any], layers: Mapping[paths.Path, Any]
) -> dict[paths.Path, paths.Path]:
  """``{path in the tree: path in layers}``; a leading ``'params'`` collection is ignored.

  Raises ValueError naming both lists when the tree's adapted layers and ``layers`` differ.
  """
  match: dict[paths.Path, paths.Path] = {}
  for path in found:
    for candidate in (path, path[1:] if path[:1] == ("params",) else None):
      if candidate is not None and candidate in layers:
        match[path] = candidate
        break
  if len(match) != len(found) or set(match.values()) != set(layers):
    raise ValueError(
      "the adapted layers of the params tree differ from those of `layers`: the tree has "
      f"{sorted(map(paths.name, found))}, layers has {sorted(map(paths.name, layers))} "
      "(a leading 'params' collection is ignored); pass the layers of the model that "
      "made these params"
    )
  return match


def paper_delta_lora(
  learning_rate: optax.ScalarOrSchedule | None = None,
  *,
  layers: Any,
  lambda_: float | None = None,
  start_step: int = 500,
  lora_optimizer: optax.GradientTransformation | None = None,
  other_optimizer: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""The published Delta-LoRA rule: the base kernel follows the change of ``A B``.

  Leaves are routed by :func:`deltalora_jax.leaf_labels`: the LoRA factors
  get ``lora_optimizer``; the snapshot factors (``snapshot_a``, ``snapshot_b``)
  and the kernels of telescoped layers get the updates below; the in-place
  layers' kernels get the rule below (their gradient is ignored: build the
  layers with ``freeze_base=True``, the default, and XLA computes none); their
  biases stay frozen; every other parameter gets ``other_optimizer`` (None
  freezes it). With ``t`` the number of optimizer
  steps taken before this one (the state's ``count``: ``0`` at the first call
  of ``update``; under ``optax.MultiSteps`` it counts the accumulated steps,
  and a step that ``optax.apply_if_finite`` skips is not counted) and
  ``K = start_step``:

  .. math::

    (u_A, u_B) = \mathrm{opt}(g_A, g_B), \qquad A_{t+1} = A_t + u_A, \quad
    B_{t+1} = B_t + u_B

    u_W = \lambda s\,(u_A B_t + A_t u_B + u_A u_B) = \lambda s\,(A_{t+1} B_{t+1} - A_t B_t)
    \quad \text{if } t > K, \text{ else } 0

  as in the paper's Algorithm 1 (``for t = 0, ..., T - 1``; ``if t > K``).
  So steps ``t = 0, ..., K`` (``K + 1`` of them) are plain LoRA, and ``W``
  first moves at ``t = K + 1``, the ``(K + 2)``-th call of ``update``:
  ``start_step=0`` moves it from the second step on, the paper's ``K = 500``
  from the 502nd. Before that no full-size product is computed (the kernel's
  update is zeros, under ``jax.lax.cond``). Then
  ``W_T = W_{K+1} + lambda s (A_T B_T - A_{K+1} B_{K+1})``: the total change
  of ``W`` has rank at most ``2 r``, and the forward weight is
  ``(W_{K+1} - lambda s A_{K+1} B_{K+1}) + (1 + lambda) s A_t B_t``. The
  change is computed in float32 (float64 for float64 factors) from the
  factors' updates and ``params``, with no copy of the old factors
  (:func:`factor_product_change`), in the kernel's own layout, then cast to
  the kernel's dtype. Layers stacked by ``nn.scan`` or ``nnx.vmap`` (extra
  leading axes on the kernel and the factors) get one product per layer.

  **Two forms, chosen by the layers.** A layer built with ``paper_lambda``
  (``DeltaLoRADense(..., use_delta=False, paper_lambda=2.0)``, or that option
  of :func:`~deltalora_jax.adapt_nnx` / :func:`~deltalora_jax.adapt_linen`)
  takes the *telescoped* form: its kernel is never written (its update is
  zero, and it need not even be in the tree, as under
  ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``). With ``W`` frozen
  otherwise the sum telescopes, ``W_T = W_0 + lambda s (A_T B_T - A_{K+1}
  B_{K+1})``, so the layer holds a snapshot ``(A^, B^)`` of the factors and
  computes ``W_0`` plus ``lambda s (A B - A^ B^)`` in its forward
  (:func:`deltalora_jax.core.delta_lora_apply`, the ``lambda`` part under
  ``stop_gradient``). This transformation writes the snapshot: its update is
  the factors' own while ``t <= K``, so that ``A^ = A`` and the extra term is
  zero, and zero from ``t = K + 1`` on, which leaves
  ``A^ = A_{K+1}``, ``B^ = B_{K+1}``. The base is only read (a bfloat16 base
  loses nothing of ``W``'s change), the step holds no
  full-size buffer, and :func:`~deltalora_jax.export_adapter`,
  :func:`~deltalora_jax.merge` and checkpoints carry the whole change.
  ``lambda`` is then the layers' ``paper_lambda``, fixed for the run: a
  lambda that changes after ``K`` does not telescope, so a traced
  ``lambda_`` (``optax.inject_hyperparams``) is refused with these layers.

  A layer without ``paper_lambda`` takes the *in-place* form, Algorithm 1
  as written: the rule writes ``lambda s (A_{t+1} B_{t+1} - A_t B_t)`` into
  its kernel each step (below), with ``lambda_`` (2.0 when None), which may
  be traced. Use it only where a changing ``lambda`` is wanted: a bfloat16
  kernel then rounds part of each step's change away, and an adapter file
  holds the factors but not the kernel's change.

  The paper also removes LoRA dropout from the branch; this library has no
  LoRA dropout. Layers with ``use_delta=True`` are refused: use
  :func:`deltalora_jax.delta_lora` for the seed's rule.

  Args:
    learning_rate: learning rate of the default ``optax.adamw`` on the
      factors, a float or a schedule; give it or ``lora_optimizer``, not both.
    layers: the adapted layers, which give each layer's scaling
      ``s = alpha / rank`` and projection (how ``A B`` lays out in its kernel):
      an NNX model, a Linen layers mapping ``{name: layer}``
      (:func:`deltalora_jax.adapted_layers`) or a
      :class:`~deltalora_jax.DeltaLoRAModel`
      (:func:`deltalora_jax.config.layer_configs` reads them). Each must
      have ``use_delta=False``. ``init`` checks that the params tree has
      exactly these adapted layers (a leading ``'params'`` collection is
      ignored).
    lambda_: the paper's update ratio ``lambda``, finite and ``>= 0``, of
      the in-place layers; None is 2.0. With telescoped layers (those with
      ``paper_lambda``) leave it out, or give their ``paper_lambda``.
    start_step: the paper's ``K``, an int ``>= 0``: ``W`` moves at the steps
      ``t > K`` (``t`` from 0), first at ``t = K + 1``.
    lora_optimizer: optimizer of ``lora_a`` and ``lora_b``; None is
      ``optax.adamw(learning_rate)``.
    other_optimizer: optimizer of every leaf that is neither a factor nor an
      adapted layer's base (a new head, ...); None freezes them.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
    ``params``. ``lambda_``, ``start_step`` and the learning rate may be
    traced, so ``optax.inject_hyperparams`` works (pass
    ``static_args="layers"`` when ``layers`` is a model, which is callable).

  Example:
    The telescoped form (``paper_lambda`` on the layer): the kernel stays,
    the snapshot follows the factors up to ``K`` and then stays.

    >>> import jax, jax.numpy as jnp, optax
    >>> import deltalora_jax as dl
    >>> layer = dl.DeltaLoRADense(features=3, rank=2, use_delta=False, paper_lambda=2.0)
    >>> x = jnp.ones((4, 5))
    >>> variables = layer.init(jax.random.key(0), x)
    >>> sorted(variables["snapshot"])
    ['snapshot_a', 'snapshot_b']
    >>> tx = dl.paper_delta_lora(
    ...     lora_optimizer=optax.sgd(0.1), layers=dl.adapted_layers(layer, x), start_step=0)
    >>> opt_state = tx.init(variables)
    >>> loss = lambda v: jnp.sum((layer.apply(v, x) - 1.0) ** 2)
    >>> def step(v, opt_state):
    ...   updates, opt_state = tx.update(jax.grad(loss)(v), opt_state, v)
    ...   return optax.apply_updates(v, updates), opt_state
    >>> first, opt_state = step(variables, opt_state)  # t = 0 <= K: A^ follows A
    >>> bool(jnp.all(first["snapshot"]["snapshot_b"] == first["params"]["lora_b"]))
    True
    >>> second, opt_state = step(first, opt_state)  # t = 1 > K = 0: A^ stays, W too
    >>> bool(jnp.all(second["snapshot"]["snapshot_b"] == first["params"]["lora_b"]))
    True
    >>> bool(jnp.all(second["params"]["kernel"] == variables["params"]["kernel"]))
    True

    The in-place form (a layer without ``paper_lambda``) writes ``W``:

    >>> layer = dl.DeltaLoRADense(features=3, rank=2, use_delta=False)
    >>> variables = layer.init(jax.random.key(0), x)
    >>> tx = dl.paper_delta_lora(
    ...     lora_optimizer=optax.sgd(0.1), layers=dl.adapted_layers(layer, x), start_step=0)
    >>> opt_state = tx.init(variables)
    >>> first, opt_state = step(variables, opt_state)  # t = 0: W stays
    >>> second, opt_state = step(first, opt_state)  # t = 1 > K = 0: W moves
    >>> p, q = first["params"], second["params"]
    >>> change = 2.0 * (q["lora_a"] @ q["lora_b"] - p["lora_a"] @ p["lora_b"])
    >>> bool(jnp.allclose(q["kernel"] - p["kernel"], change, atol=1e-6))
    True

  References:
    Zi et al., `Delta-LoRA: Fine-Tuning High-Rank Parameters with the Delta of
    Low-Rank Matrices <https://arxiv.org/abs/2309.02411>`_, 2023 (Algorithm 1).
  """
  lora_optimizer = _factors_optimizer(learning_rate, lora_optimizer, other_optimizer)
  settings = _layer_settings(layers)
  _check_lambda(lambda_, settings)
  in_place_lambda = 2.0 if lambda_ is None else lambda_
  _check_start_step(start_step)
  inner = optax.multi_transform(
    {
      optim.LORA: lora_optimizer,
      optim.BASE: optax.set_to_zero(),
      optim.OTHER: other_optimizer or optax.set_to_zero(),
    },
    _leaf_labels,
  )

  def init_fn(params: optax.Params) -> PaperDeltaLoRAState:
    _layer_plans(params, settings)
    return PaperDeltaLoRAState(count=jnp.zeros([], jnp.int32), inner_state=inner.init(params))

  def update_fn(
    updates: optax.Updates,
    state: PaperDeltaLoRAState,
    params: optax.Params | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, PaperDeltaLoRAState]:
    if params is None:
      raise ValueError(
        "paper_delta_lora needs the current parameters: call "
        "tx.update(grads, opt_state, params), params being the tree given to tx.init"
      )
    plans, telescoped = _layer_plans(params, settings)
    updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    leaves, treedef = jax.tree.flatten(updates)
    started = state.count > jnp.asarray(start_step).astype(jnp.int32)  # the paper's t > K
    _follow_snapshots(leaves, telescoped, started)
    if plans:
      # jaxlib ships no stub for its PyTreeDef (jaxlib/_jax.so), so mypy knows none of its methods.
      param_leaves = treedef.flatten_up_to(params)  # type: ignore[attr-defined]
      _follow_products(leaves, param_leaves, plans, in_place_lambda, started)
    count = optax.safe_increment(state.count)
    new_updates = jax.tree.unflatten(treedef, leaves)
    return new_updates, PaperDeltaLoRAState(count=count, inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _factors_optimizer(
  learning_rate: optax.ScalarOrSchedule | None,
  lora_optimizer: optax.GradientTransformation | None,
  other_optimizer: optax.GradientTransformation | None,
) -> optax.GradientTransformation:
  """The factors' optimizer: ``lora_optimizer``, or AdamW at ``learning_rate``; one of them."""
  for name, tx in (("lora_optimizer", lora_optimizer), ("other_optimizer", other_optimizer)):
    if tx is not None and not isinstance(tx, optax.GradientTransformation):
      raise TypeError(f"{name} must be an optax.GradientTransformation or None, got {tx!r}")
  if lora_optimizer is not None and learning_rate is None:
    return lora_optimizer
  if lora_optimizer is None and learning_rate is not None:
    core.check_learning_rate(learning_rate)
    return optax.adamw(learning_rate)
  raise ValueError(
    "give exactly one of learning_rate (for the default AdamW on the factors) and "
    f"lora_optimizer, got learning_rate={learning_rate!r}, lora_optimizer={lora_optimizer!r}"
  )


def _layer_plans(
  params: optax.Params, settings: Mapping[paths.Path, _LayerSettings]
) -> tuple[list[_Plan], list[dict[str, int]]]:
  """The in-place layers' ``[(leaf indices, s, projection, stack)]``, shapes checked, and the
  telescoped layers' leaf indices."""
  found = _adapted_layers(params)
  leaves = jax.tree.leaves(params)
  plans: list[_Plan] = []
  telescoped: list[dict[str, int]] = []
  for path, layer_path in _match_layers(found, settings).items():
    layer, group = settings[layer_path], found[path]
    _check_layer_names(path, group, layer)
    if layer.paper_lambda is not None:
      _check_snapshot(path, *(leaves[group[n]] for n in (LORA_A, LORA_B, SNAPSHOT_A, SNAPSHOT_B)))
      telescoped.append(group)
      continue
    core.check_writable_kernel(paths.name(path), leaves[group[KERNEL]])  # not an int8 base
    kernel, lora_a, lora_b = (leaves[group[n]] for n in (KERNEL, LORA_A, LORA_B))
    stack = _stack_axes(path, kernel, lora_a, lora_b, layer.projection)
    plans.append((group, layer.scaling, layer.projection, stack))
  return plans, telescoped


def _follow_snapshots(
  leaves: list[Any], telescoped: Sequence[Mapping[str, int]], started: jax.Array
) -> None:
  """Sets the snapshot's updates (in ``leaves``): the factors' own while ``t <= K``, then 0."""
  for group in telescoped:
    for factor, snapshot in ((LORA_A, SNAPSHOT_A), (LORA_B, SNAPSHOT_B)):
      update = leaves[group[factor]]
      leaves[group[snapshot]] = jnp.where(started, jnp.zeros_like(update), update)


def _follow_products(
  leaves: list[Any],
  param_leaves: Sequence[Any],
  plans: Sequence[_Plan],
  lambda_: Any,
  started: jax.Array,
) -> None:
  """Sets the in-place kernels' updates (in ``leaves``): ``lambda s (A'B' - AB)`` when
  ``t > K``, else zeros, under ``jax.lax.cond`` (no full-size product before ``K``)."""
  kernels = [param_leaves[group[KERNEL]] for group, *_ in plans]
  factors = [
    tuple(tree[group[n]] for tree in (param_leaves, leaves) for n in (LORA_A, LORA_B))
    for group, *_ in plans
  ]  # (A, B, uA, uB) of each layer

  def follow(factors: list[tuple[jax.Array, ...]]) -> list[jax.Array]:
    changes = []
    for (a, b, ua, ub), (_, s, projection, stack), kernel in zip(
      factors, plans, kernels, strict=True
    ):
      change = factor_product_change(a, b, ua, ub, projection=projection, stack=stack)
      coef = jnp.asarray(lambda_, change.dtype) * jnp.asarray(s, change.dtype)
      changes.append((coef * change).astype(kernel.dtype))
    return changes

  def stay(factors: list[tuple[jax.Array, ...]]) -> list[jax.Array]:
    return [jnp.zeros(kernel.shape, kernel.dtype) for kernel in kernels]

  changes = jax.lax.cond(started, follow, stay, factors)
  for (group, *_), change in zip(plans, changes, strict=True):
    leaves[group[KERNEL]] = change


def _leaf_labels(tree: Any) -> Any:
  """:func:`deltalora_jax.leaf_labels`, with the snapshot factors labelled as a frozen base.

  Their updates are set by :func:`paper_delta_lora` itself, never by an optimizer.
  """
  labels = optim.leaf_labels(tree)
  return jax.tree_util.tree_map_with_path(
    lambda path, label: optim.BASE if paths.key_path(path)[-1:] in _SNAPSHOT_ENDS else label,
    labels,
  )


_SNAPSHOT_ENDS = ((SNAPSHOT_A,), (SNAPSHOT_B,))


def _check_snapshot(
  path: paths.Path, lora_a: Any, lora_b: Any, snapshot_a: Any, snapshot_b: Any
) -> None:
  """Raises unless the snapshot factors have the factors' shapes and dtypes."""
  for name, factor, snapshot in (
    (SNAPSHOT_A, lora_a, snapshot_a),
    (SNAPSHOT_B, lora_b, snapshot_b),
  ):
    if (jnp.shape(snapshot), jnp.result_type(snapshot)) != (
      jnp.shape(factor),
      jnp.result_type(factor),
    ):
      raise ValueError(
        f"adapted layer {paths.name(path)!r}: {name} must have the shape and dtype of its "
        f"factor {jnp.shape(factor)} {jnp.result_type(factor)}, got {jnp.shape(snapshot)} "
        f"{jnp.result_type(snapshot)}"
      )
