"""Optax transformations of the Delta-LoRA rule.

:func:`scale_by_delta_momentum` is the EMA velocity of the delta gradient,
:func:`delta_momentum` adds the learning rate, and :func:`delta_lora` is the
one optimizer for a whole variables tree: the delta rule on ``D``, a chosen
optimizer on the LoRA factors, and nothing on a frozen base.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import DTypeLike

from deltalora_jax import config, core, paths


class Label(enum.StrEnum):
  """The label of a leaf in :func:`delta_lora`'s routing: which optimizer moves it.

  A ``StrEnum``: each member compares and hashes as its string, so a labels
  tree of plain strings (``'delta'``, ...) works as well as one of members.

  Example:
    >>> Label.DELTA == "delta", [str(label) for label in Label]
    (True, ['delta', 'lora', 'base', 'other'])
  """

  DELTA = "delta"  # the D of an adapted layer: the delta rule
  LORA = "lora"  # lora_a, lora_b: lora_optimizer
  BASE = "base"  # an adapted layer's kernel and bias: base_optimizer
  OTHER = "other"  # every other parameter: other_optimizer


DELTA, LORA, BASE, OTHER = Label.DELTA, Label.LORA, Label.BASE, Label.OTHER
LORA_NAMES = frozenset({"lora_a", "lora_b"})
BASE_NAMES = frozenset({"kernel", "bias"})


class ScaleByDeltaMomentumState(NamedTuple):
  """State of :func:`scale_by_delta_momentum`.

  Attributes:
    count: the number of updates taken, an int32 scalar.
    velocity: the EMA velocity ``V``, a tree of the parameters' structure.
  """

  # int32 scalar. The name is optax's (its states' step counts), which shadows tuple.count for
  # the type checker only.
  count: jax.Array  # type: ignore[assignment]
  velocity: optax.Updates


def scale_by_delta_momentum(
  momentum: float = 0.9, velocity_dtype: DTypeLike | None = None
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

  def init_fn(params: optax.Params) -> ScaleByDeltaMomentumState:
    return ScaleByDeltaMomentumState(
      count=jnp.zeros([], jnp.int32),
      velocity=optax.tree.zeros_like(params, dtype=velocity_dtype),
    )

  def update_fn(
    updates: optax.Updates,
    state: ScaleByDeltaMomentumState,
    params: optax.Params | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, ScaleByDeltaMomentumState]:
    del params, extra_args

    def ema(g: jax.Array, v: jax.Array) -> jax.Array:
      # in the velocity's dtype, which may be wider than g's
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
  velocity_dtype: DTypeLike | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""The seed's delta rule: EMA velocity, then a step against it.

  .. math::

    V_t = \mu V_{t-1} + (1 - \mu) g_t, \qquad D_t = D_{t-1} - \eta_t V_t

  After one step from ``V = 0``, ``D = -eta (1 - mu) g``. Under a constant gradient the
  velocity fills up, ``V_n = (1 - mu^n) g``, so the step approaches ``-eta g``: in steady state the
  rule moves ``D`` as SGD at ``eta`` does, and its first step is ``1 - mu`` of that. On an adapted
  layer's ``D`` the effective weight moves ``delta_scaling**2`` times as much (see
  :func:`delta_lora`).

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
    >>> for _ in range(200):
    ...   u, state = tx.update(jnp.array([1.0, -2.0]), state)
    >>> [round(float(v), 4) for v in u]  # steady state: -0.1 * g
    [-0.1, 0.2]
  """
  core.check_learning_rate(learning_rate)
  return optax.chain(
    scale_by_delta_momentum(momentum, velocity_dtype),
    optax.scale_by_learning_rate(learning_rate),
  )


def leaf_labels(variables: Any) -> Any:
  """Labels each leaf of a variables tree with a :class:`Label`, by the names on its path.

  * ``Label.DELTA``: a leaf named ``delta`` in the ``'delta'`` collection
    (Linen) or beside a ``lora_a`` (NNX): the ``D`` of an adapted layer;
  * ``Label.LORA``: a leaf named ``lora_a`` or ``lora_b``;
  * ``Label.BASE``: ``kernel`` or ``bias`` beside a ``lora_a`` (the base of an
    adapted layer);
  * ``Label.OTHER``: everything else (layers that are not adapted, a new head).

  Works on Linen variable dicts and on NNX states alike: only the names on
  each leaf's path matter. The default routing of :func:`delta_lora`.

  Example:
    >>> tree = {"params": {"dense": {"kernel": 1.0, "lora_a": 1.0, "lora_b": 1.0},
    ...                    "head": {"kernel": 1.0}},
    ...         "delta": {"dense": {"delta": 1.0}}}
    >>> labels = leaf_labels(tree)
    >>> labels["params"]["dense"]["kernel"], labels["params"]["head"]["kernel"]
    (<Label.BASE: 'base'>, <Label.OTHER: 'other'>)
    >>> labels["delta"]["dense"]["delta"] == "delta"
    True
  """
  leaf_paths = [paths.key_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(variables)[0]]
  adapted = {p[:-1] for p in leaf_paths if p and p[-1] in LORA_NAMES}

  def label(path: tuple[Any, ...], _: Any) -> Label:
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


def _check_labels(labels: Any, variables: Any, *, default: bool) -> None:
  """Each label is a :class:`Label`, and one at least is ``'delta'``."""
  allowed = [str(label) for label in Label]
  leaves = jax.tree.leaves(labels)
  unknown = sorted(
    {repr(leaf) for leaf in leaves if not (isinstance(leaf, str) and leaf in allowed)}
  )
  if unknown:
    raise ValueError(
      f"labels must give each leaf one of the labels {allowed} (deltalora_jax.Label), "
      f"got {', '.join(unknown)}"
    )
  if DELTA in leaves:
    return
  if not default:
    raise ValueError(
      f"labels gave no leaf the label 'delta' (the D of the delta rule), only "
      f"{sorted(set(map(str, leaves)))}; the labels allowed are {allowed}"
    )
  found = list(variables) if isinstance(variables, Mapping) else type(variables).__name__
  raise ValueError(
    "delta_lora needs the variables tree with the 'delta' collection (leaves "
    f"named 'delta'), e.g. model.init(...) whole; got a tree with keys {found}"
  )


def _strip_collection(path: paths.Path) -> paths.Path:
  """A layer's path in a Linen variables tree, less its ``'params'``/``'delta'`` collection."""
  return path[1:] if path[:1] in (("params",), (DELTA,)) else path


#: The internal label of a frozen layer's ``kernel``/``bias`` under the default routing: never
#: updated, so that ``base_optimizer`` (its weight decay) sees only the bases that train.
_FROZEN_BASE = "frozen-base"


def _default_labels(configs: Mapping[paths.Path, config.LayerConfig]) -> Callable[[Any], Any]:
  """:func:`leaf_labels`, with the bases of the ``freeze_base=True`` layers set apart."""
  frozen = {path for path, layer in configs.items() if layer.freeze_base}

  def labels(variables: Any) -> Any:
    def relabel(path: Any, label: Label) -> str:
      layer = paths.key_path(path)[:-1]
      layer = layer if layer in configs else _strip_collection(layer)
      return _FROZEN_BASE if label == BASE and layer in frozen else label

    return jax.tree_util.tree_map_with_path(relabel, leaf_labels(variables))

  return labels


def _check_layers(variables: Any, configs: Mapping[paths.Path, config.LayerConfig]) -> None:
  """The variables tree's adapted layers are those of ``layers``, no more, no fewer.

  A tree's adapted layer is where a ``lora_a``/``lora_b`` leaf sits, or a
  ``delta`` leaf in the ``'delta'`` collection; a leading ``'params'`` or
  ``'delta'`` collection is ignored when the path without it is in ``layers``.
  """
  leaf_paths = [paths.key_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(variables)[0]]
  found = {p[:-1] for p in leaf_paths if p and p[-1] in LORA_NAMES}
  found |= {p[:-1] for p in leaf_paths if len(p) > 1 and p[0] == DELTA and p[-1] == DELTA}
  matched: set[paths.Path] = set()
  unmatched: list[paths.Path] = []
  for path in found:
    candidate = path if path in configs else _strip_collection(path)
    if candidate in configs:
      matched.add(candidate)
    else:
      unmatched.append(path)
  if unmatched or matched != set(configs):
    tree_layers = sorted({paths.name(p if p in configs else _strip_collection(p)) for p in found})
    raise ValueError(
      "the adapted layers of the variables tree differ from those of `layers`: the tree has "
      f"{tree_layers}, layers has {sorted(map(paths.name, configs))} (a leading 'params' or "
      "'delta' collection is ignored); pass the layers of the model that made these variables"
    )


def _check_base_optimizer(
  configs: Mapping[paths.Path, config.LayerConfig],
  base_optimizer: optax.GradientTransformation | None,
) -> None:
  """``base_optimizer`` is given exactly when some layer trains its base."""
  trained = [paths.name(path) for path, layer in configs.items() if not layer.freeze_base]
  if trained and base_optimizer is None:
    which = f"layer {trained[0]!r} has" if len(trained) == 1 else f"layers {trained} have"
    raise ValueError(
      f"{which} freeze_base=False but base_optimizer is None: pass base_optimizer=..., "
      "or build the layer with freeze_base=True"
    )
  if not trained and base_optimizer is not None:
    raise ValueError(
      "base_optimizer is given but every layer has freeze_base=True, so "
      "no base is trained (a frozen base gets a zero gradient): drop base_optimizer, or build "
      "the layers whose base should train with freeze_base=False"
    )


def delta_lora(
  learning_rate: optax.ScalarOrSchedule,
  momentum: float = 0.9,
  *,
  layers: Any,
  lora_optimizer: optax.GradientTransformation,
  base_optimizer: optax.GradientTransformation | None = None,
  other_optimizer: optax.GradientTransformation | None = None,
  labels: Any = None,
  velocity_dtype: DTypeLike | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""The Delta-LoRA optimizer for a whole variables tree.

  Each leaf is routed by its :class:`Label` (``labels``, by default
  :func:`leaf_labels`):

  * ``Label.DELTA``, the ``D`` of each layer: :func:`delta_momentum`,

    .. math::

      V \leftarrow \mu V + (1 - \mu) g_D, \qquad D \leftarrow D - \eta V

  * ``Label.LORA``, the factors ``lora_a`` and ``lora_b``: ``lora_optimizer``;
  * ``Label.BASE``, the adapted layers' ``kernel`` and ``bias``:
    ``base_optimizer``; None (the default) freezes them, whatever their gradient;
  * ``Label.OTHER``, every other parameter (layers not adapted, a new head):
    ``other_optimizer``; None freezes them.

  ``learning_rate`` is the rate of ``D`` alone: the factors have their own
  optimizer and rate, and ``lora_optimizer`` has no default because one rate
  cannot suit both. ``D`` enters the effective weight scaled by
  ``ds = delta_scaling``: ``W_eff = W + s A B + ds D``, so
  ``dL/dD = ds dL/dW_eff``, and a step ``-eta V`` on ``D`` moves ``W_eff`` by
  ``ds`` times that. The first step from ``V = 0`` has ``V_1 = (1 - mu) g_D``, so
  ``D``'s share of the change (the factors add their own) is

  .. math::

    \Delta W_\mathrm{eff} = -\,\eta\,(1 - \mu)\,\mathrm{ds}^2\,
      \frac{\partial L}{\partial W_\mathrm{eff}},

  exactly one step of full fine-tuning SGD on ``W_eff`` at rate
  ``eta_full = eta (1 - mu) ds^2``. Under a steady gradient the velocity fills
  up, ``V_n = (1 - mu^n) g_D``, and the step approaches SGD at ``eta ds^2``. To
  match a full fine-tuning SGD rate ``eta_full``, take
  ``learning_rate = eta_full / ds^2`` (steady state; step ``n`` of a constant
  gradient is ``1 - mu^n`` of it). At ``ds = 0.1`` that is ``100 eta_full``: beside AdamW
  at ``3e-4`` on the factors, ``learning_rate=10`` (SGD at 0.1 on ``W_eff``) is
  a fair start (the demo's ``delta_lr``). For the seed's shared rate, pass
  ``lora_optimizer=optax.sgd(learning_rate)``.

  A frozen part is never updated, so a frozen base cannot be trained by
  mistake: training it needs both ``freeze_base=False`` on the layer (or it
  receives a zero gradient) and a ``base_optimizer`` here, and each without
  the other raises. With some layers frozen and some not, the default routing
  gives ``base_optimizer`` only the bases that train: the frozen ones are left
  exactly as they are, weight decay included (your own ``labels`` route as
  they say).

  Args:
    learning_rate: ``eta`` of the delta rule, a float or a schedule.
    momentum: ``mu`` of the velocity, ``0 <= mu < 1``.
    layers: the adapted layers: an NNX model, a Linen layers mapping
      ``{name: layer}`` (:func:`deltalora_jax.adapted_layers`) or a
      :class:`~deltalora_jax.DeltaLoRAModel`
      (:func:`deltalora_jax.config.layer_configs` reads them). Their
      ``freeze_base`` is checked against ``base_optimizer`` here, and ``init``
      checks that the variables tree has exactly these adapted layers.
    lora_optimizer: optimizer of ``lora_a`` and ``lora_b``; required.
    base_optimizer: optimizer of the adapted layers' ``kernel``/``bias``;
      given exactly when some layer has ``freeze_base=False``.
    other_optimizer: optimizer of every other parameter.
    labels: the routing, replacing :func:`leaf_labels`: a tree of labels (the
      variables tree's structure or a prefix of it) or a function of the
      variables tree returning one, as ``param_labels`` of
      :func:`optax.partition`. Each label is a :class:`Label` (or its string);
      one at least must be ``'delta'``.
    velocity_dtype: dtype of the velocity; None follows ``D``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``. Its ``init`` raises
    ``ValueError`` when a label is not a :class:`Label`, when no leaf is
    labelled ``'delta'``, or when the tree's adapted layers differ from
    ``layers``. Under ``optax.inject_hyperparams``, name ``layers`` (when it
    is a model, which is callable) and a ``labels`` function in ``static_args``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import deltalora_jax as dl
    >>> layer = dl.DeltaLoRADense(features=3, rank=2)
    >>> x = jnp.ones((4, 5))
    >>> variables = layer.init(jax.random.key(0), x)
    >>> tx = dl.delta_lora(
    ...     learning_rate=1e-2, layers=dl.adapted_layers(layer, x), lora_optimizer=optax.sgd(1e-2))
    >>> opt_state = tx.init(variables)
    >>> loss = lambda v: jnp.sum(layer.apply(v, x) ** 2)
    >>> grads = jax.grad(loss)(variables)
    >>> updates, opt_state = tx.update(grads, opt_state, variables)
    >>> variables = optax.apply_updates(variables, updates)
    >>> bool(jnp.any(variables["delta"]["delta"] != 0))
    True

  References:
    The seed rule: the API reference of ``DeltaLoRAAdapter`` (AiDotNet). Its
    step, written in Flax's layout (``D`` is ``[in, out]``) and with ``g_D`` the
    gradient of ``D``: ``V <- mu V + (1 - mu) g_D``, ``D <- D - eta V``, from
    ``V = D = 0``; after two steps ``D = -eta [(1 - mu) g_1 + mu (1 - mu) g_1 +
    (1 - mu) g_2]``. The published rule of the same name is
    :func:`~deltalora_jax.paper_delta_lora`.
  """
  core.check_learning_rate(learning_rate)
  core.check_momentum(momentum)
  if not isinstance(lora_optimizer, optax.GradientTransformation):
    raise TypeError(
      f"lora_optimizer must be an optax.GradientTransformation, got {lora_optimizer!r} (there "
      "is no default: D's step on the effective weight is delta_scaling**2 * learning_rate, "
      "so no one rate suits D and the factors)"
    )
  for name, tx in (("base_optimizer", base_optimizer), ("other_optimizer", other_optimizer)):
    if tx is not None and not isinstance(tx, optax.GradientTransformation):
      raise TypeError(f"{name} must be an optax.GradientTransformation or None, got {tx!r}")
  configs = config.layer_configs(layers)
  if not any(layer.use_delta for layer in configs.values()):
    raise ValueError(
      "delta_lora is the rule of D, but every layer of `layers` has use_delta=False "
      f"({sorted(map(paths.name, configs))}): build them with use_delta=True, or use "
      "paper_delta_lora (the published rule) or a plain optimizer for LoRA alone"
    )
  if paper := sorted(paths.name(p) for p, c in configs.items() if c.paper_lambda is not None):
    raise ValueError(
      f"the layers {paper} have paper_lambda (the published rule's snapshot, written by "
      "paper_delta_lora): delta_lora would leave their snapshot to other_optimizer; build "
      "them without paper_lambda"
    )
  _check_base_optimizer(configs, base_optimizer)
  param_labels = _default_labels(configs) if labels is None else labels
  inner = optax.multi_transform(
    {
      DELTA.value: delta_momentum(learning_rate, momentum, velocity_dtype),
      LORA.value: lora_optimizer,
      BASE.value: base_optimizer or optax.set_to_zero(),
      OTHER.value: other_optimizer or optax.set_to_zero(),
      _FROZEN_BASE: optax.set_to_zero(),
    },
    param_labels,
  )

  def init_fn(params: optax.Params) -> optax.OptState:
    if labels is None:
      tree_labels = leaf_labels(params)
    else:
      tree_labels = labels(params) if callable(labels) else labels
    _check_labels(tree_labels, params, default=labels is None)
    _check_layers(params, configs)
    return inner.init(params)

  return optax.GradientTransformationExtraArgs(init_fn, inner.update)


def velocity(opt_state: optax.OptState) -> Any:
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


def reset_velocity(opt_state: optax.OptState) -> optax.OptState:
  """A copy of ``opt_state`` with every velocity set to zero, the rest kept.

  Example:
    >>> import jax.numpy as jnp
    >>> tx = delta_momentum(0.1)
    >>> _, state = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)))
    >>> velocity(reset_velocity(state))
    Array([0., 0.], dtype=float32)
  """

  def zero(state: Any) -> Any:
    if isinstance(state, ScaleByDeltaMomentumState):
      return state._replace(velocity=optax.tree.zeros_like(state.velocity))
    return state

  def is_state(node: Any) -> bool:
    return isinstance(node, ScaleByDeltaMomentumState)

  return jax.tree.map(zero, opt_state, is_leaf=is_state)
