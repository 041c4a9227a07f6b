"""Sharding a Delta-LoRA training state over a device mesh, with JAX's own SPMD.

The recipe is data parallelism over the batch and FSDP-style sharding of the
large matrices over a second mesh axis:

* a mesh with axes ``('data', 'fsdp')`` (:func:`make_mesh`);
* every variable gets a :class:`jax.sharding.PartitionSpec`
  (:func:`variable_shardings`): by default each adapted layer's kernel is
  split over ``'fsdp'`` along one of its input axes, ``D`` gets exactly the
  kernel's spec and the factors follow the axes they share with it, whatever
  the layer's kind (dense, attention projection, einsum, conv, a stack of
  layers); or your own rules, regular expressions over each leaf's path;
  everything else is replicated;
* the optimizer state follows: every leaf of it that holds a copy of a
  variable (the velocity of ``D``, Adam's moments of ``A`` and ``B``) gets that
  variable's sharding, found by path, and the rest (step counts) is replicated
  (:func:`optimizer_shardings`, :func:`follow_shardings`);
* the batch's leading axis is split over every mesh axis (:func:`batch_sharding`).

``jax.jit`` with these ``in_shardings``/``out_shardings`` does the rest: XLA
gathers each kernel where it is used and reduce-scatters its gradient.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from deltalora_jax import paths, projections
from deltalora_jax.config import layer_configs
from deltalora_jax.linen import DELTA_COLLECTION, SNAPSHOT_COLLECTION

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"

Rules = Sequence[tuple[str, PartitionSpec]]

DENSE_RULES: Rules = (
  (r"(^|/)(kernel|delta)$", PartitionSpec(FSDP_AXIS, None)),
  (r"(^|/)(lora|snapshot)_a$", PartitionSpec(FSDP_AXIS, None)),
  (r"(^|/)(lora|snapshot)_b$", PartitionSpec(None, FSDP_AXIS)),
)
"""Path rules for 2-D ``nn.Dense`` kernels only: ``(regex over the leaf's path, PartitionSpec)``.

``W [in, out]``, ``D [in, out]`` and ``A [in, r]`` are split along their first
axis, ``B [r, out]`` along its second (the paper rule's snapshot ``A^``,
``B^`` as ``A``, ``B``). They know nothing of a layer's kind: on
a conv kernel ``[*window, in, out]`` they split the window, on a stacked
kernel ``[layers, in, out]`` the layer axis. ``rules=None`` (the default of
:func:`partition_specs`) gives the same specs on dense layers and follows
every other kernel's layout.
"""

#: The name :data:`DENSE_RULES` had when they were the default; kept for code that names them.
DEFAULT_RULES: Rules = DENSE_RULES

_ADAPTER_NAMES = ("kernel", "delta", "lora_a", "lora_b", "snapshot_a", "snapshot_b")
#: The collection of each Linen leaf kept outside ``'params'``: ``D`` and the snapshot.
_COLLECTIONS = {"delta": DELTA_COLLECTION, "snapshot_a": SNAPSHOT_COLLECTION}
_COLLECTIONS["snapshot_b"] = SNAPSHOT_COLLECTION


def make_mesh(
  data: int | None = None, fsdp: int = 1, *, devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """A ``('data', 'fsdp')`` mesh over all devices, with automatic (GSPMD) axes.

  Args:
    data: size of the data-parallel axis; None uses ``devices // fsdp``.
    fsdp: size of the axis the large matrices are split over.
    devices: the devices to use; None means ``jax.devices()`` (all processes'
      devices after ``jax.distributed.initialize()``).

  Returns:
    A :class:`jax.sharding.Mesh` of shape ``(data, fsdp)``.

  Example:
    >>> mesh = make_mesh(fsdp=2)
    >>> dict(mesh.shape) == {"data": jax.device_count() // 2, "fsdp": 2}
    True
  """
  devices = list(jax.devices() if devices is None else devices)
  count = len(devices)
  for name, value in (("fsdp", fsdp), ("data", data)):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
      raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
  if count % fsdp:
    raise ValueError(f"fsdp must divide the number of devices {count}, got fsdp={fsdp}")
  data = count // fsdp if data is None else data
  if data * fsdp != count:
    raise ValueError(
      f"data * fsdp must equal the number of devices {count}, got data={data}, fsdp={fsdp}"
    )
  auto = jax.sharding.AxisType.Auto
  return jax.make_mesh((data, fsdp), (DATA_AXIS, FSDP_AXIS), (auto, auto), devices=devices)


def _axis_size(mesh: Mesh, axes: str | tuple[str, ...]) -> int:
  axes = axes if isinstance(axes, tuple) else (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def _fit(
  spec: PartitionSpec, shape: Sequence[int], mesh: Mesh, path: str, pattern: str
) -> PartitionSpec:
  """``spec`` checked against the mesh, with axes that do not divide a dimension dropped."""
  if len(spec) > len(shape):
    raise ValueError(
      f"rule {pattern!r} gives {spec} ({len(spec)} axes) to {path!r} of shape {shape}"
    )
  fitted: list[str | tuple[str, ...] | None] = []
  for size, axes in zip(shape, spec, strict=False):
    if axes is None:
      fitted.append(None)
      continue
    for axis in axes if isinstance(axes, tuple) else (axes,):
      if axis not in mesh.shape:
        raise ValueError(
          f"rule {pattern!r} names mesh axis {axis!r}; the mesh has axes {tuple(mesh.shape)}"
        )
    fitted.append(axes if size % _axis_size(mesh, axes) == 0 else None)
  return PartitionSpec(*fitted)


def partition_specs(
  tree: Any, mesh: Mesh, rules: Rules | None = None, *, layers: Any = None
) -> Any:
  """A ``PartitionSpec`` for each leaf of ``tree``: each kernel's layout, or your rules.

  **Default** (``rules=None``). An adapted layer is the ``kernel``,
  ``lora_a`` and ``lora_b`` leaves under one path, with its ``D``: the
  ``delta`` beside them (NNX), or at the same path in the ``'delta'``
  collection (Linen: ``params/attn/query/kernel`` and
  ``delta/attn/query/delta``). For each one:

  * the kernel's *input axes* are the axes it shares with ``A`` (the
    contracted axes: ``d`` of a query kernel ``[d, heads, head_dim]``,
    ``heads, head_dim`` of an output kernel ``[heads, head_dim, d]``, the
    window and ``in`` of a conv kernel ``[*window, in, out]``, the contracted
    and batch axes of an einsum kernel), less the leading layer axes of a
    ``nn.scan`` / ``nnx.vmap`` stack, which are never split; its *output
    axes* are the axes it shares with ``B`` alone;
  * the kernel is split over ``'fsdp'`` along its innermost input axis
    whose size the ``'fsdp'`` size divides (none: replicated);
  * ``D`` gets exactly the kernel's spec;
  * ``A`` is split along the kernel's split axis (the rank axis never);
  * ``B`` is split along the kernel's split axis when it holds it (an
    einsum's batch axis), else along its innermost output axis that the
    ``'fsdp'`` size divides, as FSDP splits every matrix (``B`` is small;
    the rank axis is never split).

  The axes are read from the leaves' shapes: a kernel ``[*lead, *in, *out]``
  with ``A [*lead, *in, r]`` and ``B [*lead, r, *out]``, which is the layout
  of dense, dense-general and conv layers (``lead``: a stack's layer axes, or
  an einsum's batch axes in front). An einsum whose kernel lists its axes in
  another order needs ``layers``, which gives each layer's projection, and
  with it the exact axes. A ``kernel`` or ``delta`` outside an adapted layer,
  and an adapted layer whose layout neither reveals, is split as a Dense's:
  ``kernel`` and ``D`` along their second-to-last axis, ``A`` along its
  second-to-last, ``B`` along its last (each only if the ``'fsdp'`` size
  divides it). Every other leaf (biases, embeddings, norms) is replicated.
  On ``nn.Dense`` layers this gives the specs of :data:`DENSE_RULES`.

  **Rules.** Each rule is ``(pattern, spec)``; ``re.search(pattern, path)``
  is tried on the leaf's path (:func:`deltalora_jax.paths.key_name`, e.g.
  ``'params/hidden/kernel'``) in order, and the first match gives the spec.
  A leaf no rule matches is replicated (``PartitionSpec()``). A mesh axis
  that does not divide the dimension it is given to is dropped for that
  dimension (that dimension is replicated).

  Args:
    tree: arrays or ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``):
      a Linen variables dict, an NNX state, or a tree holding one. Give it
      whole (``nnx.state(model)``, not a filtered part): a kernel alone, without
      its factors, is split as a Dense's, which need not be ``D``'s spec;
      ``nnx.split_state`` splits the result as it splits the state.
    mesh: the mesh the specs refer to (the default needs an ``'fsdp'`` axis).
    rules: ``(regex, PartitionSpec)`` pairs; None means the default above.
    layers: for the default, the adapted layers by path, each with a
      ``.projection`` (``adapted.layers`` of :func:`~deltalora_jax.adapt_linen`,
      ``dict(deltalora_jax.nnx.adapters(model))``), or the adapted NNX model
      itself. A layer whose path ends a leaf's layer path gives its layout.
      None: layouts are read from the shapes.

  Returns:
    A tree of ``PartitionSpec`` with the structure of ``tree``.

  Raises:
    ValueError: a spec has more axes than its leaf, or names an axis the
      mesh lacks; ``layers`` gives a layer a projection its shapes do not
      have; ``layers`` is given with ``rules``.
    TypeError: a rule is not a ``(regex, PartitionSpec)`` pair, or ``layers``
      is not a mapping of layers with a projection.

  Example:
    >>> import jax.numpy as jnp
    >>> tree = {"params": {"kernel": jnp.zeros((16, 4)), "bias": jnp.zeros(4)}}
    >>> partition_specs(tree, make_mesh(fsdp=2))["params"]
    {'bias': P(), 'kernel': P('fsdp', None)}
    >>> conv = {"kernel": jnp.zeros((3, 3, 8, 16)), "lora_a": jnp.zeros((3, 3, 8, 2)),
    ...         "lora_b": jnp.zeros((2, 16)), "delta": jnp.zeros((3, 3, 8, 16))}
    >>> specs = partition_specs(conv, make_mesh(fsdp=2))  # split along `in`, not the window
    >>> specs["kernel"], specs["delta"] == specs["kernel"]
    (P(None, None, 'fsdp', None), True)
    >>> specs["lora_a"], specs["lora_b"]
    (P(None, None, 'fsdp', None), P(None, 'fsdp'))
  """
  if rules is None:
    return _layout_specs(tree, mesh, _projections(layers))
  if layers is not None:
    raise ValueError(
      "layers is read by the default (rules=None) only; got rules and "
      f"layers={type(layers).__name__}: drop one"
    )
  rules = tuple(rules)
  compiled = []
  for rule in rules:
    if not (isinstance(rule, tuple) and len(rule) == 2 and isinstance(rule[1], PartitionSpec)):
      raise TypeError(f"rules must be (regex, PartitionSpec) pairs, got {rule!r}")
    compiled.append((re.compile(rule[0]), rule[0], rule[1]))

  def spec(path: tuple[Any, ...], leaf: Any) -> PartitionSpec:
    name = paths.key_name(path)
    for regex, pattern, rule_spec in compiled:
      if regex.search(name):
        return _fit(rule_spec, jax.numpy.shape(leaf), mesh, name, pattern)
    return PartitionSpec()

  return jax.tree_util.tree_map_with_path(spec, tree)


# --------------------------------------------------------------------------
# The default: each adapted layer's specs from its kernel's layout.
# --------------------------------------------------------------------------

Names = tuple[str, ...]
Shape = tuple[int, ...]
#: For each kernel axis: its axis in ``A`` (None: not in ``A``), its axis in
#: ``B``, and the kernel's input axes that may be split (stack axes left out).
Layout = tuple[tuple[int | None, ...], tuple[int | None, ...], tuple[int, ...]]


def _projections(layers: Any) -> dict[Names, projections.Projection]:
  """``layers`` as ``{path names: projection}``."""
  if layers is None:
    return {}
  if isinstance(layers, nnx.Module) or hasattr(layers, "layers"):
    layers = {p: c.projection for p, c in layer_configs(layers).items()}
  if not isinstance(layers, Mapping):
    raise TypeError(
      "layers must be a mapping of layer path to adapted layer (adapted.layers, "
      f"{{path: projection}}) or an NNX model, got layers={type(layers).__name__}"
    )
  found = {}
  for path, layer in layers.items():
    projection = getattr(layer, "projection", layer)
    if not isinstance(projection, projections.GeneralDense | projections.Einsum | projections.Conv):
      raise TypeError(
        f"layers must map paths to layers with a .projection, got {type(layer).__name__} "
        f"at {path!r}"
      )
    key = tuple(path.split("/")) if isinstance(path, str) else tuple(map(str, path))
    found[key] = projection
  return found


def _shape_layout(kernel: Shape, a: Shape, b: Shape) -> Layout | None:
  """The layout of a kernel ``[*lead, *in, *out]``, ``A [*lead, *in, r]``, ``B [*lead, r, *out]``.

  None when the shapes do not fit it. ``lead`` (a stack's layer axes, an
  einsum's batch axes) is never split.
  """
  lead = len(a) + len(b) - 2 - len(kernel)
  n_in = len(a) - 1 - lead
  if lead < 0 or n_in < 0 or kernel != (*a[:-1], *b[lead + 1 :]) or a[:lead] != b[:lead]:
    return None
  axes = range(len(kernel))
  a_axes = tuple(k if k < lead + n_in else None for k in axes)
  b_axes = tuple(k if k < lead else k - n_in + 1 if k >= lead + n_in else None for k in axes)
  return a_axes, b_axes, tuple(range(lead, lead + n_in))


def _einsum_layout(projection: projections.Einsum, stack: int) -> Layout:
  """The layout of an einsum kernel from its letters: batch axes are input axes."""
  inputs, out = projection.equation.split("->")
  lhs, rhs = inputs.split(",")
  a_letters = [c for c in rhs if c in lhs]  # batch and contracted, in the kernel's order
  batch = [c for c in rhs if c in lhs and c in out]
  b_letters = [*batch, None, *(c for c in rhs if c in out and c not in lhs)]
  layers = tuple(range(stack))
  a_axes = layers + tuple(stack + a_letters.index(c) if c in a_letters else None for c in rhs)
  b_axes = layers + tuple(stack + b_letters.index(c) if c in b_letters else None for c in rhs)
  return a_axes, b_axes, tuple(stack + i for i, c in enumerate(rhs) if c in lhs)


def _layout(
  name: str, kernel: Shape, a: Shape, b: Shape, projection: projections.Projection | None
) -> Layout | None:
  if projection is None:
    return _shape_layout(kernel, a, b)
  stack = len(kernel) - projection.kernel_ndim
  if stack >= 0:
    a_one, b_one = projection.factor_shapes(kernel[stack:], a[-1] if a else 0)
    expected = ((*kernel[:stack], *a_one), (*kernel[:stack], *b_one))
  if stack < 0 or (a, b) != expected:
    raise ValueError(
      f"layers gives {name!r} the projection {projection}, which does not fit its kernel "
      f"{kernel}, lora_a {a} and lora_b {b}"
    )
  if isinstance(projection, projections.Einsum):
    return _einsum_layout(projection, stack)
  return _shape_layout(kernel, a, b)


def _innermost(axes: Iterable[int], shape: Shape, size: int) -> int | None:
  """The last of ``axes`` whose size ``size`` divides."""
  return next((k for k in reversed(tuple(axes)) if shape[k] % size == 0), None)


def _split(ndim: int, axis: int | None) -> PartitionSpec:
  return PartitionSpec(*(FSDP_AXIS if k == axis else None for k in range(ndim)))


def _dense_spec(name: str, shape: Shape, size: int) -> PartitionSpec:
  """A leaf outside a readable layout, split as a Dense's (see :func:`partition_specs`)."""
  axis = len(shape) - (1 if name in ("lora_b", "snapshot_b") else 2)
  return _split(len(shape), axis if axis >= 0 and shape[axis] % size == 0 else None)


def _layer_specs(
  name: str, leaves: dict[str, Shape], size: int, projection: projections.Projection | None
) -> dict[str, PartitionSpec]:
  """``{leaf name: spec}`` for one adapted layer's ``kernel``, ``delta``, ``lora_a``, ``lora_b``."""
  kernel = leaves.get("kernel", leaves.get("delta"))
  a, b = leaves.get("lora_a"), leaves.get("lora_b")
  if (
    kernel is None
    or a is None
    or b is None
    or (layout := _layout(name, kernel, a, b, projection)) is None
  ):
    return {leaf: _dense_spec(leaf, shape, size) for leaf, shape in leaves.items()}
  a_axes, b_axes, inputs = layout
  axis = _innermost(inputs, kernel, size)
  outputs = [
    in_b for in_b, in_a in zip(b_axes, a_axes, strict=True) if in_b is not None and in_a is None
  ]
  b_axis = b_axes[axis] if axis is not None and b_axes[axis] is not None else None
  specs = {
    "kernel": _split(len(kernel), axis),
    "delta": _split(len(kernel), axis),
    "lora_a": _split(len(a), None if axis is None else a_axes[axis]),
    "lora_b": _split(len(b), _innermost(outputs, b, size) if b_axis is None else b_axis),
  }
  specs["snapshot_a"], specs["snapshot_b"] = specs["lora_a"], specs["lora_b"]
  return {leaf: specs[leaf] for leaf in leaves}


def _layer_of(names: Names, present: set[Names]) -> Names:
  """The layer a ``kernel``/``delta``/``lora_*``/``snapshot_*`` leaf belongs to.

  Linen's ``D`` and snapshot belong to their kernel's layer.
  """
  layer = names[:-1]
  collection = _COLLECTIONS.get(names[-1])
  if collection is None or (*layer, "kernel") in present or (*layer, "lora_a") in present:
    return layer
  for i, name in enumerate(layer):  # 'delta/attn/q/delta' belongs to 'params/attn/q'
    params = (*layer[:i], "params", *layer[i + 1 :])
    if name == collection and any((*params, n) in present for n in _ADAPTER_NAMES):
      return params
  return layer


def _layout_specs(tree: Any, mesh: Mesh, layers: dict[Names, projections.Projection]) -> Any:
  """The default of :func:`partition_specs`."""
  if FSDP_AXIS not in mesh.shape:
    raise ValueError(
      f"the default rules split over mesh axis {FSDP_AXIS!r}; the mesh has axes "
      f"{tuple(mesh.shape)}: use make_mesh, or pass rules="
    )
  size = mesh.shape[FSDP_AXIS]
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  names = [paths.key_path(path) for path, _ in flat]
  present = {n for n in names if n and n[-1] in _ADAPTER_NAMES}
  groups: dict[Names, dict[str, Names]] = {}
  for n in sorted(present):
    groups.setdefault(_layer_of(n, present), {})[n[-1]] = n
  shapes = {n: tuple(jax.numpy.shape(leaf)) for n, (_, leaf) in zip(names, flat, strict=True)}
  specs: dict[Names, PartitionSpec] = {}
  for layer, members in groups.items():
    by_suffix = [k for k in layers if len(k) <= len(layer) and layer[len(layer) - len(k) :] == k]
    projection = layers[max(by_suffix, key=len)] if by_suffix else None
    leaves = {leaf: shapes[n] for leaf, n in members.items()}
    found = _layer_specs("/".join(layer), leaves, size, projection)
    specs.update({members[leaf]: spec for leaf, spec in found.items()})
  return jax.tree_util.tree_unflatten(treedef, [specs.get(n, PartitionSpec()) for n in names])


def variable_shardings(
  tree: Any, mesh: Mesh, rules: Rules | None = None, *, layers: Any = None
) -> Any:
  """A ``NamedSharding`` for each leaf of a variables tree (see :func:`partition_specs`).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import deltalora_jax as dl
    >>> layer = dl.DeltaLoRADense(features=8, rank=2)
    >>> abstract = jax.eval_shape(layer.init, jax.random.key(0), jnp.ones((1, 16)))
    >>> shardings = variable_shardings(abstract, make_mesh(fsdp=2))
    >>> shardings["delta"]["delta"].spec
    P('fsdp', None)
  """
  specs = partition_specs(tree, mesh, rules, layers=layers)
  return jax.tree.map(
    lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, PartitionSpec)
  )


def follow_shardings(tree: Any, variables: Any, shardings: Any) -> Any:
  """Shardings for ``tree`` (an optimizer state) that follow the variables' shardings.

  A leaf of ``tree`` whose path ends with the path of a variable, and whose
  shape is that variable's, gets that variable's sharding: the velocity
  ``.../velocity/delta/layer/delta`` follows ``delta/layer/delta``, Adam's
  ``mu`` and ``nu`` follow the LoRA factors. The longest matching path wins.
  Every other leaf (step counts, flags) is replicated over the mesh.

  Args:
    tree: arrays or ``jax.ShapeDtypeStruct``, e.g. ``jax.eval_shape(tx.init, variables)``.
    variables: the variables tree (arrays or ``ShapeDtypeStruct``).
    shardings: a ``NamedSharding`` for each leaf of ``variables``.

  Returns:
    A tree of ``NamedSharding`` with the structure of ``tree``.

  Example:
    >>> import jax.numpy as jnp
    >>> variables = {"delta": {"delta": jnp.zeros((8, 4))}}
    >>> shardings = variable_shardings(variables, make_mesh(fsdp=2))
    >>> ema = {"ema": variables, "count": jnp.zeros([], jnp.int32)}  # any state holding a copy
    >>> followed = follow_shardings(ema, variables, shardings)
    >>> followed["ema"]["delta"]["delta"].spec, followed["count"].spec
    (P('fsdp', None), P())
  """
  variable_leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
  sharding_leaves: list[NamedSharding] = jax.tree.leaves(
    shardings, is_leaf=lambda s: isinstance(s, NamedSharding)
  )
  if len(variable_leaves) != len(sharding_leaves) or not sharding_leaves:
    raise ValueError(
      f"shardings must hold one NamedSharding per leaf of variables ({len(variable_leaves)}), "
      f"got {len(sharding_leaves)}"
    )
  replicated = NamedSharding(sharding_leaves[0].mesh, PartitionSpec())
  by_path = {
    paths.key_path(path): (jax.numpy.shape(leaf), sharding)
    for (path, leaf), sharding in zip(variable_leaves, sharding_leaves, strict=True)
  }
  lengths = sorted({len(p) for p in by_path}, reverse=True)

  def follow(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
    names = paths.key_path(path)
    for length in lengths:
      match = by_path.get(names[-length:]) if length <= len(names) else None
      if match is not None and match[0] == jax.numpy.shape(leaf):
        return match[1]
    return replicated

  return jax.tree_util.tree_map_with_path(follow, tree)


def optimizer_shardings(
  tx: optax.GradientTransformation, variables: Any, shardings: Any, *args: Any, **kwargs: Any
) -> Any:
  """Shardings of ``tx.init(variables)`` that follow the variables' shardings.

  The state is traced with ``jax.eval_shape`` (nothing is computed), then
  :func:`follow_shardings` matches it to the variables by path.

  Args:
    tx: the optimizer, e.g. :func:`deltalora_jax.delta_lora` (wrappers such as
      ``optax.apply_if_finite`` included).
    variables: the variables tree (arrays or ``ShapeDtypeStruct``).
    shardings: a ``NamedSharding`` for each leaf of ``variables``.
    *args: further arguments of ``tx.init``.
    **kwargs: further keyword arguments of ``tx.init``.

  Returns:
    A tree of ``NamedSharding`` with the structure of ``tx.init(variables)``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import deltalora_jax as dl
    >>> layer = dl.DeltaLoRADense(features=8, rank=2)
    >>> abstract = jax.eval_shape(layer.init, jax.random.key(0), jnp.ones((1, 16)))
    >>> layers = dl.adapted_layers(layer, jnp.ones((1, 16)))
    >>> tx = dl.delta_lora(learning_rate=1e-2, layers=layers, lora_optimizer=optax.sgd(1e-2))
    >>> shardings = variable_shardings(abstract, make_mesh(fsdp=2))
    >>> state_shardings = optimizer_shardings(tx, abstract, shardings)
    >>> dl.velocity(state_shardings)["delta"]["delta"].spec
    P('fsdp', None)
  """
  abstract = jax.eval_shape(lambda v: tx.init(v, *args, **kwargs), variables)
  return follow_shardings(abstract, variables, shardings)


def batch_sharding(mesh: Mesh, axes: str | Sequence[str] | None = None) -> NamedSharding:
  """Sharding of a batch: its leading axis split over ``axes`` (default: every mesh axis).

  Splitting the batch over ``'fsdp'`` as well as ``'data'`` is the FSDP way:
  every device sees its own rows, and the parameters are gathered for the
  matrix products.

  Example:
    >>> batch_sharding(make_mesh(fsdp=2)).spec
    P(('data', 'fsdp'),)
  """
  axes = tuple(mesh.axis_names) if axes is None else axes
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  unknown = [a for a in axes if a not in mesh.shape]
  if unknown:
    raise ValueError(f"axes must be axes of the mesh {tuple(mesh.shape)}, got axes={axes}")
  return NamedSharding(mesh, PartitionSpec(axes))


def bytes_per_device(tree: Any) -> dict[int, int]:
  """Bytes that the arrays of ``tree`` hold on each device, by device id.

  Counts each addressable shard once on the device holding it, so a
  replicated array counts whole on every device and a sharded one by its shard.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> mesh = make_mesh(fsdp=2)
    >>> tree = {"kernel": jnp.zeros((4, 2))}  # 32 bytes
    >>> tree = jax.device_put(tree, variable_shardings(tree, mesh))
    >>> set(bytes_per_device(tree).values())  # split in two
    {16}
  """
  totals: dict[int, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      totals[shard.device.id] = totals.get(shard.device.id, 0) + shard.data.nbytes
  return totals
