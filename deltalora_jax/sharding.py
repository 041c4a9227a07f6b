"""Sharding a Delta-LoRA training state over a device mesh, with JAX's own SPMD.

The recipe is data parallelism over the batch and FSDP-style sharding of the
large matrices over a second mesh axis:

* a mesh with axes ``('data', 'fsdp')`` (:func:`make_mesh`);
* partition rules, regular expressions over each leaf's path, give every
  variable a :class:`jax.sharding.PartitionSpec` (:func:`variable_shardings`);
  by default (:data:`DEFAULT_RULES`) the base ``kernel``, ``D`` and ``lora_a``
  are split along their input axis and ``lora_b`` along its output axis, over
  ``'fsdp'``; everything else is replicated;
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
from collections.abc import Sequence
from typing import Any

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from deltalora_jax import optim

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"

Rules = Sequence[tuple[str, PartitionSpec]]

DEFAULT_RULES: Rules = (
  (r"(^|/)(kernel|delta)$", PartitionSpec(FSDP_AXIS, None)),
  (r"(^|/)lora_a$", PartitionSpec(FSDP_AXIS, None)),
  (r"(^|/)lora_b$", PartitionSpec(None, FSDP_AXIS)),
)
"""Default partition rules: ``(regex over the leaf's path, PartitionSpec)``.

``W [in, out]``, ``D [in, out]`` and ``A [in, r]`` are split along ``in``;
``B [r, out]`` along ``out`` (``r`` is small). Unmatched leaves are replicated.
"""


def make_mesh(data: int | None = None, fsdp: int = 1, *, devices=None) -> Mesh:
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


def leaf_path(path) -> str:
  """The ``'/'``-joined names of a key path: ``'params/dense/kernel'``.

  NNX's ``.value`` step is left out (:func:`deltalora_jax.optim.path_names`),
  so the same rules match a Linen variables dict and an NNX state.
  """
  return "/".join(optim.path_names(path))


def _axis_size(mesh: Mesh, axes) -> int:
  axes = axes if isinstance(axes, tuple) else (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def _fit(spec: PartitionSpec, shape, mesh: Mesh, path: str, pattern: str) -> PartitionSpec:
  """``spec`` checked against the mesh, with axes that do not divide a dimension dropped."""
  if len(spec) > len(shape):
    raise ValueError(
      f"rule {pattern!r} gives {spec} ({len(spec)} axes) to {path!r} of shape {shape}"
    )
  fitted = []
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


def partition_specs(tree, mesh: Mesh, rules: Rules | None = None) -> Any:
  """A ``PartitionSpec`` for each leaf of ``tree``, by the first rule whose regex matches.

  Each rule is ``(pattern, spec)``; ``re.search(pattern, path)`` is tried on
  the leaf's path (:func:`leaf_path`, e.g. ``'params/hidden/kernel'``) in
  order, and the first match gives the spec. A leaf no rule matches is
  replicated (``PartitionSpec()``). A mesh axis that does not divide the
  dimension it is given to is dropped for that dimension (that dimension is
  replicated), so the default rules fit any layer size.

  Args:
    tree: arrays or ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``).
    mesh: the mesh the specs refer to.
    rules: ``(regex, PartitionSpec)`` pairs; None means :data:`DEFAULT_RULES`.

  Returns:
    A tree of ``PartitionSpec`` with the structure of ``tree``.

  Raises:
    ValueError: a spec has more axes than its leaf, or names an axis the mesh lacks.

  Example:
    >>> import jax.numpy as jnp
    >>> tree = {"params": {"kernel": jnp.zeros((16, 4)), "bias": jnp.zeros(4)}}
    >>> partition_specs(tree, make_mesh(fsdp=2))["params"]
    {'bias': P(), 'kernel': P('fsdp', None)}
  """
  rules = DEFAULT_RULES if rules is None else tuple(rules)
  compiled = []
  for rule in rules:
    if not (isinstance(rule, tuple) and len(rule) == 2 and isinstance(rule[1], PartitionSpec)):
      raise TypeError(f"rules must be (regex, PartitionSpec) pairs, got {rule!r}")
    compiled.append((re.compile(rule[0]), rule[0], rule[1]))

  def spec(path, leaf):
    name = leaf_path(path)
    for regex, pattern, rule_spec in compiled:
      if regex.search(name):
        return _fit(rule_spec, jax.numpy.shape(leaf), mesh, name, pattern)
    return PartitionSpec()

  return jax.tree_util.tree_map_with_path(spec, tree)


def variable_shardings(tree, mesh: Mesh, rules: Rules | None = None) -> Any:
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
  specs = partition_specs(tree, mesh, rules)
  return jax.tree.map(
    lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, PartitionSpec)
  )


def follow_shardings(tree, variables, shardings) -> Any:
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
  sharding_leaves = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, NamedSharding))
  if len(variable_leaves) != len(sharding_leaves) or not sharding_leaves:
    raise ValueError(
      f"shardings must hold one NamedSharding per leaf of variables ({len(variable_leaves)}), "
      f"got {len(sharding_leaves)}"
    )
  replicated = NamedSharding(sharding_leaves[0].mesh, PartitionSpec())
  by_path = {
    optim.path_names(path): (jax.numpy.shape(leaf), sharding)
    for (path, leaf), sharding in zip(variable_leaves, sharding_leaves, strict=True)
  }
  lengths = sorted({len(p) for p in by_path}, reverse=True)

  def follow(path, leaf):
    names = optim.path_names(path)
    for length in lengths:
      match = by_path.get(names[-length:]) if length <= len(names) else None
      if match is not None and match[0] == jax.numpy.shape(leaf):
        return match[1]
    return replicated

  return jax.tree_util.tree_map_with_path(follow, tree)


def optimizer_shardings(
  tx: optax.GradientTransformation, variables, shardings, *args, **kwargs
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
    >>> import jax, jax.numpy as jnp
    >>> import deltalora_jax as dl
    >>> layer = dl.DeltaLoRADense(features=8, rank=2)
    >>> abstract = jax.eval_shape(layer.init, jax.random.key(0), jnp.ones((1, 16)))
    >>> tx = dl.delta_lora(learning_rate=1e-2)
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


def bytes_per_device(tree) -> dict[int, int]:
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
