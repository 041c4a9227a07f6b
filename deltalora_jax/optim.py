"""Optax transformations of the Delta-LoRA rule.

:func:`scale_by_delta_momentum` is the EMA velocity of the delta gradient,
:func:`delta_momentum` adds the learning rate, and :func:`delta_lora` is the
one optimizer for a whole variables tree: the delta rule on ``D``, a chosen
optimizer on the LoRA factors, and nothing on a frozen base.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from deltalora_jax import core, paths

DELTA = "delta"
LORA = "lora"
BASE = "base"
OTHER = "other"
LORA_NAMES = frozenset({"lora_a", "lora_b"})
BASE_NAMES = frozenset({"kernel", "bias"})


class ScaleByDeltaMomentumState(NamedTuple):
  """State of :func:`scale_by_delta_momentum`."""

  count: jax.Array  # int32 scalar
  velocity: optax.Updates


def scale_by_delta_momentum(
  momentum: float = 0.9, velocity_dtype: Any = None
) -> optax.GradientTransformationExtraArgs:
  r"""EMA velocity of the gradient: the direction of the Delta-LoRA rule.

  .. math::

    V_t = \mu V_{t-1} + (1 - \mu) g_t, \qquad u_t = V_t

  Unlike :func:`optax.trace`, the gradient is weighted by ``1 - mu``; unlike
  :func:`optax.ema`, there is no bias correction, and the state names its
  accumulator ``velocity`` so that :func:`optax.tree_utils.tree_get` finds it.

  Args:
    momentum: ``mu``, with ``0 <= mu < 1``.
    velocity_dtype: dtype of the velocity; None follows the parameters.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp
    >>> tx = scale_by_delta_momentum(0.5)
    >>> state = tx.init(jnp.zeros(2))
    >>> u, state = tx.update(jnp.array([2.0, 4.0]), state)
    >>> u
    Array([1., 2.], dtype=float32)
  """
  core.check_momentum(momentum)
  velocity_dtype = None if velocity_dtype is None else jnp.dtype(velocity_dtype)

  def init_fn(params):
    return ScaleByDeltaMomentumState(
      count=jnp.zeros([], jnp.int32),
      velocity=optax.tree.zeros_like(params, dtype=velocity_dtype),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args

    def ema(g, v):  # in the velocity's dtype, which may be wider than g's
      mu, one_minus_mu = (jnp.asarray(c).astype(v.dtype) for c in (momentum, 1 - momentum))
      return mu * v + one_minus_mu * g.astype(v.dtype)

    velocity = jax.tree.map(ema, updates, state.velocity)
    updates = jax.tree.map(lambda v, g: v.astype(g.dtype), velocity, updates)
    count = optax.safe_increment(state.count)
    return updates, ScaleByDeltaMomentumState(count=count, velocity=velocity)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def delta_momentum(
  learning_rate: optax.ScalarOrSchedule,
  momentum: float = 0.9,
  velocity_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""The seed's delta rule: EMA velocity, then a step against it.

  .. math::

    V_t = \mu V_{t-1} + (1 - \mu) g_t, \qquad D_t = D_{t-1} - \eta_t V_t

  After one step from ``V = 0``, ``D = -eta (1 - mu) g``.

  Args:
    learning_rate: ``eta``, a float or an optax schedule of the step.
    momentum: ``mu``, with ``0 <= mu < 1`` (``0`` is plain SGD).
    velocity_dtype: dtype of the velocity; None follows the parameters.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (a chain of
    :func:`scale_by_delta_momentum` and :func:`optax.scale_by_learning_rate`).

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> tx = delta_momentum(learning_rate=0.1, momentum=0.9)
    >>> d = jnp.zeros(2)
    >>> state = tx.init(d)
    >>> u, state = tx.update(jnp.array([1.0, -2.0]), state)
    >>> optax.apply_updates(d, u)  # -0.1 * (1 - 0.9) * g
    Array([-0.01,  0.02], dtype=float32)
  """
  core.check_learning_rate(learning_rate)
  return optax.chain(
    scale_by_delta_momentum(momentum, velocity_dtype),
    optax.scale_by_learning_rate(learning_rate),
  )


def leaf_labels(variables) -> Any:
  """Labels each leaf of a variables tree ``'delta'``, ``'lora'``, ``'base'`` or ``'other'``.

  * ``'delta'``: a leaf named ``delta`` in the ``'delta'`` collection (Linen)
    or beside a ``lora_a`` (NNX): the ``D`` of an adapted layer;
  * ``'lora'``: a leaf named ``lora_a`` or ``lora_b``;
  * ``'base'``: ``kernel`` or ``bias`` beside a ``lora_a`` (the base of an
    adapted layer);
  * ``'other'``: everything else (layers that are not adapted, a new head).

  Works on Linen variable dicts and on NNX states alike: only the names on
  each leaf's path matter.

  Example:
    >>> import jax.numpy as jnp
    >>> tree = {"params": {"dense": {"kernel": 1.0, "lora_a": 1.0, "lora_b": 1.0},
    ...                    "head": {"kernel": 1.0}},
    ...         "delta": {"dense": {"delta": 1.0}}}
    >>> labels = leaf_labels(tree)
    >>> labels["params"]["dense"]["kernel"], labels["params"]["head"]["kernel"]
    ('base', 'other')
  """
  leaf_paths = [paths.key_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(variables)[0]]
  adapted = {p[:-1] for p in leaf_paths if p and p[-1] in LORA_NAMES}

  def label(path, _):
    names = paths.key_path(path)
    name = names[-1] if names else None
    if name == DELTA and (names[0] == DELTA or names[:-1] in adapted):
      return DELTA
    if name in LORA_NAMES:
      return LORA
    if name in BASE_NAMES and names[:-1] in adapted:
      return BASE
    return OTHER

  return jax.tree_util.tree_map_with_path(label, variables)


def _check_has_delta(labels, variables) -> None:
  if DELTA in jax.tree.leaves(labels):
    return
  found = list(variables) if isinstance(variables, Mapping) else type(variables).__name__
  raise ValueError(
    "delta_lora needs the variables tree with the 'delta' collection (leaves "
    f"named 'delta'), e.g. model.init(...) whole; got a tree with keys {found}"
  )


def delta_lora(
  learning_rate: optax.ScalarOrSchedule,
  momentum: float = 0.9,
  *,
  lora_optimizer: optax.GradientTransformation | None = None,
  base_optimizer: optax.GradientTransformation | None = None,
  other_optimizer: optax.GradientTransformation | None = None,
  velocity_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""The Delta-LoRA optimizer for a whole variables tree.

  Each leaf is routed by :func:`leaf_labels`:

  * ``D``: :func:`delta_momentum` (``V <- mu V + (1 - mu) g``, ``D <- D - eta V``);
  * LoRA factors: ``lora_optimizer``, by default ``optax.sgd(learning_rate)``
    as in the seed;
  * base kernel and bias of adapted layers: ``base_optimizer``; None (the
    default) freezes them, whatever their gradient;
  * all other parameters (layers not adapted, a new head): ``other_optimizer``;
    None freezes them.

  A frozen part is never updated, so a frozen base cannot be trained by
  mistake: training it needs both ``freeze_base=False`` on the layer (or it
  receives a zero gradient) and a ``base_optimizer`` here.

  Args:
    learning_rate: ``eta`` of the delta rule (and of the default LoRA SGD), a
      float or a schedule.
    momentum: ``mu`` of the velocity, ``0 <= mu < 1``.
    lora_optimizer: optimizer of ``lora_a`` and ``lora_b``.
    base_optimizer: optimizer of the adapted layers' ``kernel``/``bias``.
    other_optimizer: optimizer of every other parameter.
    velocity_dtype: dtype of the velocity; None follows ``D``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``. Its ``init`` raises
    ``ValueError`` when the tree holds no ``delta`` leaf.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import deltalora_jax as dl
    >>> layer = dl.DeltaLoRADense(features=3, rank=2)
    >>> x = jnp.ones((4, 5))
    >>> variables = layer.init(jax.random.key(0), x)
    >>> tx = dl.delta_lora(learning_rate=1e-2)
    >>> opt_state = tx.init(variables)
    >>> loss = lambda v: jnp.sum(layer.apply(v, x) ** 2)
    >>> grads = jax.grad(loss)(variables)
    >>> updates, opt_state = tx.update(grads, opt_state, variables)
    >>> variables = optax.apply_updates(variables, updates)
    >>> bool(jnp.any(variables["delta"]["delta"] != 0))
    True

  References:
    The seed document of ``DeltaLoRAAdapter`` (AiDotNet); see REFERENCE.md.
  """
  core.check_learning_rate(learning_rate)
  core.check_momentum(momentum)
  for name, tx in (
    ("lora_optimizer", lora_optimizer),
    ("base_optimizer", base_optimizer),
    ("other_optimizer", other_optimizer),
  ):
    if tx is not None and not isinstance(tx, optax.GradientTransformation):
      raise TypeError(f"{name} must be an optax.GradientTransformation or None, got {tx!r}")
  inner = optax.multi_transform(
    {
      DELTA: delta_momentum(learning_rate, momentum, velocity_dtype),
      LORA: lora_optimizer or optax.sgd(learning_rate),
      BASE: base_optimizer or optax.set_to_zero(),
      OTHER: other_optimizer or optax.set_to_zero(),
    },
    leaf_labels,
  )

  def init_fn(params):
    _check_has_delta(leaf_labels(params), params)
    return inner.init(params)

  return optax.GradientTransformationExtraArgs(init_fn, inner.update)


def velocity(opt_state) -> Any:
  """The velocity tree held in an optimizer state (any nesting of wrappers).

  Leaves that are not delta leaves are ``optax.MaskedNode``.

  Example:
    >>> import jax.numpy as jnp
    >>> tx = delta_momentum(0.1, momentum=0.5)
    >>> _, state = tx.update(jnp.array([2.0]), tx.init(jnp.zeros(1)))
    >>> velocity(state)  # (1 - 0.5) * 2
    Array([1.], dtype=float32)

  Raises:
    ValueError: when the state holds no velocity.
  """
  found = optax.tree_utils.tree_get_all_with_path(opt_state, "velocity")
  if not found:
    raise ValueError(
      "opt_state holds no velocity: expected the state of delta_lora or delta_momentum"
    )
  if len(found) > 1:
    raise ValueError(f"opt_state holds {len(found)} velocities; expected one")
  return found[0][1]


def reset_velocity(opt_state) -> Any:
  """A copy of ``opt_state`` with every velocity set to zero, the rest kept.

  Example:
    >>> import jax.numpy as jnp
    >>> tx = delta_momentum(0.1)
    >>> _, state = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)))
    >>> velocity(reset_velocity(state))
    Array([0., 0.], dtype=float32)
  """

  def zero(state):
    if isinstance(state, ScaleByDeltaMomentumState):
      return state._replace(velocity=optax.tree.zeros_like(state.velocity))
    return state

  is_state = lambda s: isinstance(s, ScaleByDeltaMomentumState)  # noqa: E731
  return jax.tree.map(zero, opt_state, is_leaf=is_state)
