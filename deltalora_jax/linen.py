"""Flax Linen front end: :class:`DeltaLoRADense`, a drop-in for ``nn.Dense``."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes as linen_dtypes

from deltalora_jax import core, projections
from deltalora_jax.config import LayerConfig

DELTA_COLLECTION = "delta"


def adapter_dtype(adapter_dtype, param_dtype):
  """The dtype of ``A``, ``B`` and ``D``: ``adapter_dtype``, or at least float32.

  By default the factors and ``D`` are float32 (float64 beside a float64
  kernel) whatever the kernel's dtype: a bfloat16 ``D`` would round away
  the small steps the delta rule takes.

  >>> adapter_dtype(None, jnp.bfloat16), adapter_dtype(jnp.bfloat16, jnp.bfloat16)
  (dtype('float32'), dtype(bfloat16))
  """
  if adapter_dtype is not None:
    return jnp.dtype(adapter_dtype)
  return core.widest_dtype(param_dtype, at_least=jnp.float32)


def _config(module) -> LayerConfig:
  """The :class:`~deltalora_jax.config.LayerConfig` of a layer (which checks the options)."""
  return LayerConfig(
    module.projection,
    rank=module.rank,
    alpha=module.alpha,
    delta_scaling=module.delta_scaling,
    freeze_base=module.freeze_base,
    use_bias=module.use_bias,
    use_delta=module.use_delta,
    evaluation=module.evaluation,
    adapter_dtype=module.adapter_dtype,
  )


def _adapter_variables(module: nn.Module, kind, shape, collection=DELTA_COLLECTION) -> tuple:
  """Creates (or reads) ``lora_a``, ``lora_b`` and ``D`` of ``module`` for a kernel ``shape``.

  ``D`` is the variable ``delta`` of ``collection``: the ``'delta'``
  collection, or ``'params'`` while :class:`~deltalora_jax.DeltaLoRAModel`
  maps it there.
  """
  core.check_rank(module.rank)
  bound = kind.rank_bound(shape)
  if module.rank > bound:
    raise ValueError(
      f"rank must satisfy 0 < rank <= {bound} for the kernel {shape} of "
      f"{'/'.join(module.path) or '<root>'}, got rank={module.rank}"
    )
  if (
    module.use_delta
    and not module.is_initializing()
    and not module.has_variable(collection, "delta")
  ):
    raise ValueError(
      f"{module.__class__.__name__} at {'/'.join(module.path) or '<root>'} needs the "
      f"'{DELTA_COLLECTION}' collection: apply with the whole variables of "
      "model.init(...), not only variables['params']"
    )
  dtype = adapter_dtype(module.adapter_dtype, module.param_dtype)
  a_shape, b_shape = kind.factor_shapes(shape, module.rank)
  a_init = module.lora_a_init or core.lora_a_init(module.rank)
  lora_a = module.param("lora_a", a_init, a_shape, dtype)
  lora_b = module.param("lora_b", module.lora_b_init, b_shape, dtype)
  delta = None
  if module.use_delta:
    delta = module.variable(collection, "delta", jnp.zeros, shape, dtype).value
  return lora_a, lora_b, delta


class DeltaLoRADense(nn.Module):
  r"""A dense layer adapted with LoRA and a full-size delta matrix.

  .. math::

    y = x W + b + s\,(x A) B + ds\,(x D), \qquad s = \alpha / r

  Parameter names and layout follow ``nn.Dense``: ``kernel [in, out]`` and
  ``bias [out]`` in ``params``, so a pretrained ``nn.Dense`` checkpoint loads
  without renaming. ``lora_a [in, r]`` and ``lora_b [r, out]`` are in
  ``params`` too; ``delta [in, out]`` is in its own collection ``'delta'``,
  so an optimizer (:func:`deltalora_jax.delta_lora`) and a checkpoint can tell
  them apart. At initialisation ``B = 0`` and ``D = 0``: the output equals the
  base layer's exactly.

  Attributes:
    features: number of output features.
    rank: LoRA rank ``r``, ``0 < r <= min(in, out)``.
    alpha: LoRA alpha; None or ``<= 0`` means ``alpha = r`` (``s = 1``).
    delta_scaling: ``ds``, finite and ``> 0``.
    freeze_base: the base kernel and bias get no gradient (XLA computes none).
    use_bias: whether the base layer has a bias.
    dtype: computation dtype (None: inferred from inputs and parameters).
    param_dtype: dtype of the base kernel and bias.
    adapter_dtype: dtype of ``A``, ``B`` and ``D``; None is float32, or the
      kernel's dtype when that is wider (:func:`adapter_dtype`).
    precision: precision of the matrix products.
    kernel_init: initializer of the base kernel.
    bias_init: initializer of the base bias.
    lora_a_init: initializer of ``A``; None is the seed's ``N(0, 1/r)``.
    lora_b_init: initializer of ``B`` (zeros).
    evaluation: ``'auto'`` picks the cheaper of one merged kernel and separate
      products (:func:`deltalora_jax.core.choose_evaluation`); ``'merged'`` or
      ``'factored'`` force one. Both give the same numbers.
    use_delta: create ``D`` (the seed's rule). ``False`` gives plain LoRA,
      the layer of the paper's rule: no ``'delta'`` collection at all.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> layer = DeltaLoRADense(features=4, rank=2)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((3, 8)))
    >>> jax.tree.map(jnp.shape, variables["params"])
    {'bias': (4,), 'kernel': (8, 4), 'lora_a': (8, 2), 'lora_b': (2, 4)}
    >>> variables["delta"]["delta"].shape
    (8, 4)
  """

  features: int
  rank: int
  alpha: float | None = None
  delta_scaling: float = 0.1
  freeze_base: bool = True
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()
  lora_a_init: Any = None
  lora_b_init: Any = nn.initializers.zeros_init()
  evaluation: core.Evaluation = "auto"
  use_delta: bool = True
  adapter_dtype: Any = None

  def __post_init__(self):
    core.check_features("features", self.features)
    core.check_rank(self.rank, out_features=self.features)
    _config(self)  # checks the LoRA options
    super().__post_init__()

  @property
  def projection(self) -> projections.GeneralDense:
    """The layer's product: a dense one (:class:`deltalora_jax.projections.GeneralDense`)."""
    return projections.GeneralDense(features=(self.features,))

  @property
  def scaling(self) -> float:
    """The LoRA scaling ``s = alpha / rank``."""
    return core.lora_scaling(self.alpha, self.rank)

  @property
  def config(self) -> LayerConfig:
    """The layer's :class:`~deltalora_jax.config.LayerConfig`."""
    return _config(self)

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    in_features = jnp.shape(inputs)[-1]
    if self.has_variable("params", "kernel"):
      expected = self.get_variable("params", "kernel").shape[0]
      if in_features != expected:
        raise ValueError(
          f"inputs must have {expected} features in their last axis (the kernel "
          f"is {expected}x{self.features}), got inputs.shape={jnp.shape(inputs)}"
        )
    core.check_rank(self.rank, in_features, self.features)
    shape = (in_features, self.features)
    kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
    bias = (
      self.param("bias", self.bias_init, (self.features,), self.param_dtype)
      if self.use_bias
      else None
    )
    lora_a, lora_b, delta = _adapter_variables(self, self.projection, shape)
    return core.delta_lora_layer(
      self,
      inputs,
      kernel,
      bias,
      lora_a,
      lora_b,
      delta,
    )


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
  defaults: list[tuple[str, Any]] = []
  if isinstance(module, nn.Dense):
    kind = projections.GeneralDense(features=(module.features,))
    defaults = [("dot_general", None), ("dot_general_cls", None)]
  elif isinstance(module, nn.DenseGeneral):
    if tuple(module.batch_dims):
      raise TypeError(
        f"{name} with batch_dims={module.batch_dims} cannot be adapted: only DenseGeneral "
        "without batch axes"
      )
    kind = projections.GeneralDense(features=module.features, axis=module.axis)
    defaults = [("dot_general", None), ("dot_general_cls", None)]
  elif isinstance(module, nn.Einsum):
    equation = einsum_str or module.einsum_str
    if equation is None:
      raise TypeError(f"{name} was called without an einsum_str")
    kind = projections.Einsum(equation, module.shape)
    defaults = [("preferred_element_type", None)]
  elif isinstance(module, nn.Conv):
    if module.feature_group_count != 1:
      raise TypeError(
        f"{name} with feature_group_count={module.feature_group_count} cannot be adapted: "
        "only feature_group_count=1"
      )
    if module.mask is not None:
      raise TypeError(f"{name} with a mask cannot be adapted")
    kernel_size = module.kernel_size
    kind = projections.Conv(
      features=module.features,
      kernel_size=(kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size),
      strides=module.strides,
      padding=module.padding,
      input_dilation=module.input_dilation,
      kernel_dilation=module.kernel_dilation,
    )
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
  return kind


SUPPORTED = "nn.Dense, nn.DenseGeneral, nn.Einsum and nn.Conv"


def _flat_init(init, n_out: int):
  """``nn.DenseGeneral``'s initialisation: ``init`` on the ``[in, out]`` matrix, reshaped."""

  def wrapped(key, shape, dtype=jnp.float32):
    n_in = len(shape) - n_out
    flat = (math.prod(shape[n_in:]),)
    if n_in:
      flat = (math.prod(shape[:n_in]), *flat)
    return jnp.reshape(init(key, flat, dtype), shape)

  return wrapped


class DeltaLoRAGeneral(nn.Module):
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
  layers; the arguments below are those of :class:`DeltaLoRADense`.

  Attributes:
    projection: the base layer's product (a frozen dataclass).
    rank: LoRA rank ``r``, at most the kernel's matrix rank bound.
    alpha: LoRA alpha; None or ``<= 0`` means ``alpha = r``.
    delta_scaling: ``ds``, finite and ``> 0``.
    freeze_base: the base kernel and bias get no gradient.
    use_bias: whether the base layer has a bias.
    dtype: computation dtype (None: inferred).
    param_dtype: dtype of the base kernel and bias.
    adapter_dtype: dtype of ``A``, ``B``, ``D`` (None: at least float32).
    precision: precision of the products.
    kernel_init: initializer of the base kernel (on the ``[in, out]`` matrix
      for a dense-general kernel, as ``nn.DenseGeneral`` does).
    bias_init: initializer of the base bias.
    lora_a_init: initializer of ``A``; None is the seed's ``N(0, 1/r)``.
    lora_b_init: initializer of ``B`` (zeros).
    evaluation: ``'auto'``, ``'merged'`` or ``'factored'``.
    use_delta: create ``D``; False gives plain LoRA.
    delta_collection: the collection that holds ``D`` (as the variable
      ``delta``): ``'delta'``. :class:`~deltalora_jax.DeltaLoRAModel` sets
      ``'params'`` while it maps the ``'delta'`` collection into ``'params'``,
      so that ``D`` goes through ``nn.scan`` and ``nn.vmap`` stacks that lift
      ``'params'`` only.

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

  projection: Any
  rank: int
  alpha: float | None = None
  delta_scaling: float = 0.1
  freeze_base: bool = True
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()
  lora_a_init: Any = None
  lora_b_init: Any = nn.initializers.zeros_init()
  evaluation: core.Evaluation = "auto"
  use_delta: bool = True
  adapter_dtype: Any = None
  delta_collection: str = DELTA_COLLECTION

  def __post_init__(self):
    if not isinstance(self.projection, projections.Projection):
      raise TypeError(
        "projection must be a GeneralDense, Einsum or Conv of deltalora_jax.projections, "
        f"got projection={self.projection!r}"
      )
    core.check_rank(self.rank)
    _config(self)  # checks the LoRA options
    if not isinstance(self.delta_collection, str):
      raise TypeError(
        f"delta_collection must be a collection name (str), got "
        f"delta_collection={self.delta_collection!r}"
      )
    super().__post_init__()

  @property
  def scaling(self) -> float:
    """The LoRA scaling ``s = alpha / rank``."""
    return core.lora_scaling(self.alpha, self.rank)

  @property
  def config(self) -> LayerConfig:
    """The layer's :class:`~deltalora_jax.config.LayerConfig`."""
    return _config(self)

  @nn.compact
  def __call__(self, inputs: jax.Array, einsum_str: str | None = None) -> jax.Array:
    kind = self.projection
    if einsum_str is not None and (
      not isinstance(kind, projections.Einsum) or einsum_str.replace(" ", "") != kind.equation
    ):
      raise ValueError(
        f"einsum_str={einsum_str!r} differs from the adapted layer's equation "
        f"{getattr(kind, 'equation', None)!r}"
      )
    shape = kind.kernel_shape(jnp.shape(inputs))
    if self.has_variable("params", "kernel"):
      stored = self.get_variable("params", "kernel").shape
      if tuple(stored) != tuple(shape):
        raise ValueError(
          f"inputs of shape {jnp.shape(inputs)} need a kernel {shape} at "
          f"{'/'.join(self.path) or '<root>'}, but its kernel is {tuple(stored)}"
        )
    kernel_init, bias_init = self.kernel_init, self.bias_init
    if isinstance(kind, projections.GeneralDense):
      kernel_init = _flat_init(kernel_init, len(kind.features))
      bias_init = _flat_init(bias_init, len(kind.features))
    kernel = self.param("kernel", kernel_init, shape, self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param("bias", bias_init, kind.bias_shape(shape), self.param_dtype)
    lora_a, lora_b, delta = _adapter_variables(self, kind, shape, self.delta_collection)
    return core.delta_lora_layer(
      self,
      inputs,
      kernel,
      bias,
      lora_a,
      lora_b,
      delta,
    )
