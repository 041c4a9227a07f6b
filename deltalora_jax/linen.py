"""Flax Linen front end: :class:`DeltaLoRADense` (for ``nn.Dense``), :class:`DeltaLoRAGeneral`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes as linen_dtypes
from flax.typing import Initializer, PrecisionLike
from jax.typing import DTypeLike

from deltalora_jax import core, projections
from deltalora_jax.config import ConfigMixin, adapter_dtype
from deltalora_jax.projections import conv_projection, ints

if TYPE_CHECKING:
  pass

DELTA_COLLECTION = "delta"
#: The collection of the snapshot factors of a layer with ``paper_lambda`` (the paper's rule).
SNAPSHOT_COLLECTION = "snapshot"
#: The collection of a quantized base (``kernel``: int8, or NF4's uint4 codes; ``kernel_scale``):
#: read, never trained.
QUANTIZED_COLLECTION = "quantized"


def collection_of(name: str) -> str:
  """The Linen collection of an adapted layer's array ``name``.

  >>> collection_of("delta"), collection_of("snapshot_a"), collection_of("lora_a")
  ('delta', 'snapshot', 'params')

  A quantized base's ``kernel`` is in the ``'quantized'`` collection with its
  ``kernel_scale`` (:func:`deltalora_jax.quantize_base`); a float kernel in ``'params'``.
  """
  if name == "delta":
    return DELTA_COLLECTION
  if name == core.KERNEL_SCALE:
    return QUANTIZED_COLLECTION
  return SNAPSHOT_COLLECTION if name in core.SNAPSHOT_NAMES else "params"


class _DeltaLoRALayer(ConfigMixin, nn.Module):
  """The options :class:`DeltaLoRADense` and :class:`DeltaLoRAGeneral` share (keyword-only)."""

  _: dataclasses.KW_ONLY
  # The base layer's settings, as nn.Dense has them,
  use_bias: bool = True
  dtype: DTypeLike | None = None
  param_dtype: DTypeLike = jnp.float32
  precision: PrecisionLike = None
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()
  # and the adapter's.
  rank: int
  alpha: float | None = None
  delta_scaling: float = 0.1
  freeze_base: bool = True
  lora_a_init: Initializer | None = None
  lora_b_init: Initializer = nn.initializers.zeros_init()
  evaluation: core.Evaluation = "auto"
  use_delta: bool = True
  adapter_dtype: DTypeLike | None = None
  use_rslora: bool = False
  paper_lambda: float | None = None
  base_quantization: str | None = None

  def __post_init__(self) -> None:
    self.config  # noqa: B018  (checks the LoRA options)
    core.check_base_quantization(self.base_quantization)
    super().__post_init__()


def _layer(
  module: DeltaLoRADense | DeltaLoRAGeneral,
  inputs: jax.Array,
  shape: tuple[int, ...],
  kernel_init: Initializer,
  bias_init: Initializer,
  collection: str,
) -> jax.Array:
  """Creates (or reads) the variables of ``module`` for a kernel ``shape``, and applies it.

  ``kernel`` and ``bias`` are in ``params``, as are ``lora_a`` and
  ``lora_b``; ``D`` is the variable ``delta`` of ``collection``: the
  ``'delta'`` collection, or ``'params'`` while
  :class:`~deltalora_jax.DeltaLoRAModel` maps it there. The snapshot factors
  of a layer with ``paper_lambda`` (``snapshot_a``, ``snapshot_b``, copies
  of ``A`` and ``B`` at initialisation) are in the ``'snapshot'``
  collection, or in ``collection`` when that is not ``'delta'``.
  """
  projection = module.projection
  layer = "/".join(module.path) or "<root>"
  core.check_layer_rank(module.rank, projection, shape, f"the layer {layer!r}")
  where = f"{module.__class__.__name__} at {'/'.join(module.path) or '<root>'}"
  snapshots = SNAPSHOT_COLLECTION if collection == DELTA_COLLECTION else collection
  for needed, place, name, what, shown in (
    (module.use_delta, collection, "delta", "D", DELTA_COLLECTION),
    (
      module.paper_lambda is not None,
      snapshots,
      core.SNAPSHOT_A,
      "the snapshot",
      SNAPSHOT_COLLECTION,
    ),
  ):
    if not needed or module.has_variable(place, name):
      continue
    lift = (  # what the user sees is the named collection, whatever DeltaLoRAModel maps
      f"inside a hand-written nn.scan or nn.vmap, lift '{shown}' as 'params' is: "
      f"variable_axes={{'params': 0, '{shown}': 0}}"
    )
    if not module.is_initializing():
      raise ValueError(
        f"{where} needs the '{shown}' collection: apply with the whole variables of "
        f"model.init(...), not only variables['params']; {lift}"
      )
    if not module.is_mutable_collection(place):  # Flax's error would not say why
      raise ValueError(
        f"{where} cannot create {what}: the '{shown}' collection is not lifted; {lift}"
      )
  kernel_scale = None
  quantized = QUANTIZED_COLLECTION if collection == DELTA_COLLECTION else collection
  if module.base_quantization is not None or module.has_variable(quantized, core.KERNEL_SCALE):
    kernel, kernel_scale = _quantized_kernel(module, kernel_init, shape, where, quantized)
  else:
    kernel = module.param("kernel", kernel_init, shape, module.param_dtype)
  bias = None
  if module.use_bias:
    bias = module.param("bias", bias_init, projection.bias_shape(shape), module.param_dtype)
  dtype = adapter_dtype(module.adapter_dtype, module.param_dtype)
  a_shape, b_shape = projection.factor_shapes(shape, module.rank)
  a_init = module.lora_a_init or core.lora_a_init(module.rank)
  lora_a = module.param("lora_a", a_init, a_shape, dtype)
  lora_b = module.param("lora_b", module.lora_b_init, b_shape, dtype)
  delta = None
  if module.use_delta:
    delta = module.variable(collection, "delta", jnp.zeros, shape, dtype).value
  snapshot: core.Snapshot | None = None
  if module.paper_lambda is not None:  # A^ = A, B^ = B at initialisation, in buffers of their own

    def copy(array: jax.Array) -> jax.Array:
      return jnp.array(array, copy=True)

    snapshot_a = module.variable(snapshots, core.SNAPSHOT_A, copy, lora_a).value
    snapshot_b = module.variable(snapshots, core.SNAPSHOT_B, copy, lora_b).value
    snapshot = (snapshot_a, snapshot_b)
  arrays = (kernel, bias, lora_a, lora_b, delta)
  return core.delta_lora_layer(module, inputs, arrays, snapshot, kernel_scale)


def _quantized_kernel(
  module: DeltaLoRADense | DeltaLoRAGeneral,
  kernel_init: Initializer,
  shape: tuple[int, ...],
  where: str,
  place: str,
) -> tuple[jax.Array, jax.Array]:
  """The quantized ``kernel`` and its ``kernel_scale`` of the ``'quantized'`` collection.

  ``place`` is that collection, or ``'params'`` while
  :class:`~deltalora_jax.DeltaLoRAModel` maps it there. At initialisation:
  ``kernel_init``'s kernel, quantized (:func:`deltalora_jax.core.quantize_kernel`).
  """
  shown = QUANTIZED_COLLECTION
  if not module.has_variable(place, core.KERNEL_SCALE):
    if not module.is_initializing():
      raise ValueError(
        f"{where} has a quantized base and needs the '{shown}' collection: apply with the whole "
        "variables of model.init(...) (or of quantize_base), not only variables['params']; "
        f"inside a hand-written nn.scan or nn.vmap, lift '{shown}' as 'params' is"
      )
    if module.has_variable("params", "kernel"):
      raise ValueError(
        f"{where} has a float kernel in 'params' but base_quantization="
        f"{module.base_quantization!r}: quantize the variables with quantize_base"
      )
    if not module.is_mutable_collection(place):
      raise ValueError(
        f"{where} cannot create its quantized base: the '{shown}' collection is not lifted"
      )
  made: dict[str, jax.Array] = {}  # at initialisation: the quantized kernel_init
  if module.is_initializing() and not module.has_variable(place, core.KERNEL_SCALE):
    made["kernel"], made[core.KERNEL_SCALE] = core.quantize_kernel(
      kernel_init(module.make_rng("params"), shape, module.param_dtype),
      module.base_quantization or "int8",
      module.projection,
      layer=where,
    )
  kernel = module.variable(place, "kernel", made.__getitem__, "kernel").value
  kernel_scale = module.variable(place, core.KERNEL_SCALE, made.__getitem__, core.KERNEL_SCALE)
  return kernel, kernel_scale.value


class DeltaLoRADense(_DeltaLoRALayer):
  r"""A dense layer adapted with LoRA and a full-size delta matrix.

  .. math::

    y = x W + b + s\,(x A) B + ds\,(x D), \qquad s = \alpha / r

  Parameter names and layout follow ``nn.Dense``: ``kernel [in, out]`` and
  ``bias [out]`` in ``params``, so a pretrained ``nn.Dense`` checkpoint loads
  without renaming. ``lora_a [in, r]`` and ``lora_b [r, out]`` are in
  ``params`` too; ``delta [in, out]`` is in its own collection ``'delta'``,
  so an optimizer (:func:`deltalora_jax.delta_lora`) and a checkpoint can tell
  them apart. At initialisation ``B = 0`` and ``D = 0``: the output equals the
  base layer's exactly. ``features`` is the only positional attribute.

  Attributes:
    features: number of output features.
    use_bias: whether the base layer has a bias.
    dtype: computation dtype (None: as ``nn.Dense``: the widest of the inputs, kernel and bias).
    param_dtype: dtype of the base kernel and bias.
    precision: precision of the matrix products.
    kernel_init: initializer of the base kernel.
    bias_init: initializer of the base bias.
    rank: LoRA rank ``r``, ``0 < r <= min(in, out)``.
    alpha: LoRA alpha, finite and ``> 0``; None means ``alpha = r`` (``s = 1``).
    delta_scaling: ``ds``, finite and ``> 0``.
    freeze_base: the base kernel and bias get no gradient (XLA computes none).
    lora_a_init: initializer of ``A``; None is the seed's ``N(0, 1/r)``.
    lora_b_init: initializer of ``B`` (zeros).
    evaluation: ``'auto'`` picks the cheaper of one merged kernel and separate
      products (:func:`deltalora_jax.core.choose_evaluation`); ``'merged'`` or
      ``'factored'`` force one. Both give the same numbers.
    use_delta: create ``D`` (the seed's rule). ``False`` gives plain LoRA,
      the layer of the paper's rule: no ``'delta'`` collection at all.
    adapter_dtype: dtype of ``A``, ``B`` and ``D``; None is float32, or the
      kernel's dtype when that is wider (:func:`adapter_dtype`).
    use_rslora: rank-stabilised scaling ``s = alpha / sqrt(r)`` (PEFT's ``use_rslora``).
    paper_lambda: the published rule's ``lambda`` for its telescoped form
      (:func:`deltalora_jax.paper_delta_lora`, which then never writes the
      kernel): the layer gets ``snapshot_a``, ``snapshot_b`` in the
      ``'snapshot'`` collection and adds ``lambda s (A B - A^ B^)``, with no
      gradient through that term (:func:`deltalora_jax.core.delta_lora_apply`).
      None: no snapshot. Needs ``use_delta=False``.
    base_quantization: ``'int8'``: the base kernel is created int8 with one
      float32 scale per output channel; ``'nf4'``: as QLoRA's NF4 codes
      (uint4) with one float32 scale per block of 64 along the input (needs
      qwix; :func:`deltalora_jax.core.quantize_kernel`). Either is ``kernel``
      and ``kernel_scale`` in the ``'quantized'`` collection, read and never
      trained (``freeze_base`` must hold); differentiate the other
      collections only. None: a float kernel in ``params``, unless the
      variables already hold a quantized one (:func:`deltalora_jax.quantize_base`).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> layer = DeltaLoRADense(4, rank=2)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((3, 8)))
    >>> jax.tree.map(jnp.shape, variables["params"])
    {'bias': (4,), 'kernel': (8, 4), 'lora_a': (8, 2), 'lora_b': (2, 4)}
    >>> variables["delta"]["delta"].shape
    (8, 4)
  """

  features: int

  def __post_init__(self) -> None:
    core.check_features("features", self.features)
    core.check_rank(self.rank, out_features=self.features)
    super().__post_init__()

  @property
  def projection(self) -> projections.GeneralDense:
    """The layer's product, a dense one (:class:`deltalora_jax.projections.GeneralDense`)."""
    return projections.GeneralDense(features=(self.features,))

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    in_features = jnp.shape(inputs)[-1]
    if self.has_variable("params", "kernel"):
      expected = jnp.shape(self.get_variable("params", "kernel"))[0]
      if in_features != expected:
        raise ValueError(
          f"inputs must have {expected} features in their last axis (the kernel "
          f"is {expected}x{self.features}), got inputs.shape={jnp.shape(inputs)}"
        )
    core.check_rank(self.rank, in_features, self.features)
    shape = (in_features, self.features)
    return _layer(self, inputs, shape, self.kernel_init, self.bias_init, DELTA_COLLECTION)


def projection_of(module: nn.Module, einsum_str: str | None = None) -> projections.Projection:
  """The product of a Linen projection layer, or a ``TypeError`` saying why it cannot be adapted.

  ``nn.Dense``, ``nn.DenseGeneral`` (no ``batch_dims``), ``nn.Einsum`` and
  ``nn.Conv`` (``feature_group_count=1``, no ``mask``), and their
  subclasses, computing with their default product and dtype promotion.
  ``einsum_str`` is the one given at call time to an ``nn.Einsum``.

  Example:
    >>> projection_of(nn.Conv(features=4, kernel_size=3)).kernel_shape((2, 9, 5))
    (3, 5, 4)
  """
  try:
    return _projection_of(module, einsum_str)
  except ValueError as error:  # a setting Flax takes that the adapter cannot reproduce
    raise TypeError(f"{type(module).__name__} cannot be adapted: {error}") from None


def _projection_of(module: nn.Module, einsum_str: str | None = None) -> projections.Projection:
  name = type(module).__name__
  if isinstance(module, DeltaLoRADense | DeltaLoRAGeneral):
    raise TypeError(f"{name} is already adapted")
  projection: projections.Projection
  defaults: list[tuple[str, object]] = []
  if isinstance(module, nn.Dense):
    projection = projections.GeneralDense(features=(module.features,))
    defaults = [("dot_general", None), ("dot_general_cls", None)]
  elif isinstance(module, nn.DenseGeneral):
    if tuple(ints(module.batch_dims)):
      raise TypeError(
        f"{name} with batch_dims={module.batch_dims} cannot be adapted: only DenseGeneral "
        "without batch axes"
      )
    projection = projections.GeneralDense(features=ints(module.features), axis=ints(module.axis))
    defaults = [("dot_general", None), ("dot_general_cls", None)]
  elif isinstance(module, nn.Einsum):
    equation = einsum_str or module.einsum_str
    if equation is None:
      raise TypeError(f"{name} was called without an einsum_str")
    projection = projections.Einsum(equation, tuple(module.shape))
    defaults = [("preferred_element_type", None)]
  elif isinstance(module, nn.Conv):
    projection = conv_projection(module, module.features)
    defaults = [("conv_general_dilated", None), ("conv_general_dilated_cls", None)]
  else:
    raise TypeError(
      f"{name} cannot be adapted: the supported kinds are {SUPPORTED} (and their subclasses)"
    )
  defaults.append(("promote_dtype", linen_dtypes.promote_dtype))
  custom = [f for f, default in defaults if getattr(module, f, default) is not default]
  if custom:
    raise TypeError(
      f"{name} computes with a custom {sorted(set(custom))}: an adapter would compute "
      "something else"
    )
  return projection


SUPPORTED = "nn.Dense, nn.DenseGeneral, nn.Einsum and nn.Conv"


def _flat_init(init: Initializer, n_out: int) -> Initializer:
  """``nn.DenseGeneral``'s initialisation: ``init`` on the ``[in, out]`` matrix, reshaped."""

  def wrapped(key: jax.Array, shape: Sequence[int], dtype: DTypeLike = jnp.float32) -> jax.Array:
    n_in = len(shape) - n_out
    flat: tuple[int, ...] = (math.prod(shape[n_in:]),)
    if n_in:
      flat = (math.prod(shape[:n_in]), *flat)
    return jnp.reshape(init(key, flat, dtype), shape)

  return wrapped


class DeltaLoRAGeneral(_DeltaLoRALayer):
  r"""Delta-LoRA on any projection layer: dense-general, einsum or convolution (Linen).

  .. math::

    y = P(x, W) + b + s\,P_B(P_A(x, A), B) + ds\,P(x, D), \qquad s = \alpha / r

  ``P`` is the base layer's product, described by ``projection``
  (:mod:`deltalora_jax.projections`): :class:`~deltalora_jax.projections.GeneralDense`
  for ``nn.DenseGeneral``, :class:`~deltalora_jax.projections.Einsum` for
  ``nn.Einsum``, :class:`~deltalora_jax.projections.Conv` for ``nn.Conv``.
  ``kernel`` and ``bias`` keep the base layer's names, shapes and layout
  (``D`` has exactly the kernel's shape); ``lora_a`` and ``lora_b`` are in
  ``params``, ``D`` in the ``'delta'`` collection, as in
  :class:`DeltaLoRADense`. :func:`deltalora_jax.adapt_linen` builds these
  for a model's own ``nn.DenseGeneral``, ``nn.Einsum`` and ``nn.Conv``
  layers.

  Attributes:
    projection: the base layer's product (a frozen dataclass), the only
      positional attribute.
    delta_collection: the collection that holds ``D`` (as the variable
      ``delta``): ``'delta'``. :class:`~deltalora_jax.DeltaLoRAModel` sets
      ``'params'`` while it maps the ``'delta'`` collection into ``'params'``,
      so that ``D`` goes through ``nn.scan`` and ``nn.vmap`` stacks that lift
      ``'params'`` only.

  The other attributes are those of :class:`DeltaLoRADense` but ``features``;
  ``rank`` is at most the kernel's matrix rank bound, and ``kernel_init`` draws
  the ``[in, out]`` matrix of a dense-general kernel, as ``nn.DenseGeneral``
  does.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from deltalora_jax.projections import Conv
    >>> layer = DeltaLoRAGeneral(Conv(features=4, kernel_size=(3, 3)), rank=2)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 8, 8, 3)))
    >>> jax.tree.map(jnp.shape, variables["params"])
    {'bias': (4,), 'kernel': (3, 3, 3, 4), 'lora_a': (3, 3, 3, 2), 'lora_b': (2, 4)}
    >>> variables["delta"]["delta"].shape
    (3, 3, 3, 4)
  """

  projection: projections.Projection
  delta_collection: str = dataclasses.field(default=DELTA_COLLECTION, kw_only=True)

  def __post_init__(self) -> None:
    if not isinstance(self.delta_collection, str):
      raise TypeError(
        f"delta_collection must be a collection name (str), got "
        f"delta_collection={self.delta_collection!r}"
      )
    super().__post_init__()

  @nn.compact
  def __call__(self, inputs: jax.Array, einsum_str: str | None = None) -> jax.Array:
    projection = self.projection
    core.check_einsum_str(einsum_str, projection)
    shape = projection.kernel_shape(jnp.shape(inputs))
    if self.has_variable("params", "kernel"):
      stored = tuple(jnp.shape(self.get_variable("params", "kernel")))
      if stored != tuple(shape):
        raise ValueError(
          f"inputs of shape {jnp.shape(inputs)} need a kernel {shape} at "
          f"{'/'.join(self.path) or '<root>'}, but its kernel is {stored}"
        )
    kernel_init, bias_init = self.kernel_init, self.bias_init
    if isinstance(projection, projections.GeneralDense):
      kernel_init = _flat_init(kernel_init, len(projection.features))
      bias_init = _flat_init(bias_init, len(projection.features))
    return _layer(self, inputs, shape, kernel_init, bias_init, self.delta_collection)
