"""Flax NNX front end: :class:`DeltaLoRALinear` (for ``nnx.Linear``) and the general layer.

The layers own their parameters as NNX Variables and call
:func:`deltalora_jax.core.delta_lora_layer` for the math, the same function
as the Linen :class:`~deltalora_jax.DeltaLoRADense`. Their state keeps the
names of the base layer (``kernel``, ``bias``); the LoRA factors are
``nnx.LoRAParam`` and ``D`` is a :class:`DeltaParam`, so that
``nnx.Optimizer(model, tx, wrt=nnx.Any(nnx.LoRAParam, DeltaParam))`` and
``nnx.state(model, DeltaParam)`` select exactly the trainable parts.

:class:`DeltaLoRALinearGeneral` is built around an existing layer;
:class:`DeltaLoRALinear` is the same layer around an ``nnx.Linear`` that it
builds from sizes. Each keeps the graph definition of its base layer
(``base_graphdef``): :func:`deltalora_jax.merge` rebuilds the base layer's
own class from it with the merged kernel.

Which modules are projections is a registry below both layers
(:func:`register_projection`, :func:`describe`): Flax's ``Linear``,
``LinearGeneral``, ``Einsum`` and ``Conv`` are registered, a module like
tunix's ``Einsum`` (an ``einsum_str`` and one ``nnx.Param``) is recognised
and checked, and a user's own kind is taught in a few lines.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Self, Unpack

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes
from flax.typing import Initializer, PrecisionLike
from jax.typing import DTypeLike

from deltalora_jax import core, projections
from deltalora_jax.config import ConfigMixin, Options
from deltalora_jax.config import adapter_dtype as _adapter_dtype
from deltalora_jax.projections import conv_projection, ints

DEFAULT_KERNEL_INIT = nnx.initializers.lecun_normal()  # as nnx.Linear's
ZEROS_INIT = nnx.initializers.zeros_init()


class DeltaParam(nnx.LoRAParam[jax.Array]):
  """The Variable type of the delta matrix ``D`` (the kernel's shape) of an adapted layer.

  A subclass of ``nnx.LoRAParam`` (itself an ``nnx.Param``): ``D`` trains
  wherever the LoRA factors train, so that code which trains
  ``nnx.LoRAParam`` alone (tunix's ``PeftTrainer``: ``nnx.Optimizer(model,
  tx, wrt=nnx.LoRAParam)``) trains ``D`` too; a filter tells it from the
  factors by its own type (``nnx.state(model, DeltaParam)``,
  ``nnx.All(nnx.LoRAParam, nnx.Not(DeltaParam))``).
  """


class PaperSnapshot(nnx.LoRAParam[jax.Array]):
  """The Variable type of the snapshot factors ``A^``, ``B^`` of a layer with ``paper_lambda``.

  Written by :func:`deltalora_jax.paper_delta_lora` (they follow the factors
  up to the paper's step ``K``, then stay), never by a gradient: the forward
  reads them under ``stop_gradient``. A subclass of ``nnx.LoRAParam`` so that
  an ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` (tunix's ``PeftTrainer``)
  hands them to the optax transformation, which can only write what it is
  given; ``nnx.state(model, PaperSnapshot)`` selects them alone.
  """


class LayerOptions(Options, total=False):
  """The LoRA options of :class:`DeltaLoRALinearGeneral` as keyword arguments.

  Those of :class:`~deltalora_jax.config.Options`, ``lora_b_init`` and
  ``base_quantization`` (None, ``'int8'`` or ``'nf4'``).
  """

  lora_b_init: Initializer
  base_quantization: str | None


def _check_rngs(rngs: object) -> None:
  if not isinstance(rngs, nnx.Rngs):
    raise TypeError(f"rngs must be an nnx.Rngs, got rngs={rngs!r}")


def _check_out_sharding(out_sharding: object) -> None:
  """Flax layers take ``out_sharding`` (explicit-sharding mode); adapted layers leave it to XLA."""
  if out_sharding is not None:
    raise NotImplementedError(
      f"adapted layers do not take out_sharding (JAX's explicit sharding mode), got "
      f"out_sharding={out_sharding!r}; use automatic sharding (deltalora_jax.make_mesh)"
    )


def _constant(array: jax.Array | None) -> Initializer:
  """An initializer that returns ``array`` (the weights of an existing layer)."""
  return lambda key, shape, dtype: array


class _AdaptedLayer(ConfigMixin, nnx.Module):
  """What :class:`DeltaLoRALinearGeneral` and :class:`DeltaLoRALinear` share: adapting ``base``."""

  def __init__(
    self,
    base: nnx.Module,
    *,
    rank: int,
    alpha: float | None = None,
    delta_scaling: float = 0.1,
    freeze_base: bool = True,
    lora_a_init: Initializer | None = None,
    lora_b_init: Initializer = ZEROS_INIT,
    evaluation: core.Evaluation = "auto",
    use_delta: bool = True,
    adapter_dtype: DTypeLike | None = None,
    use_rslora: bool = False,
    paper_lambda: float | None = None,
    base_quantization: str | None = None,
    rngs: nnx.Rngs,
  ) -> None:
    description = describe(base)
    self.projection = description.projection
    self.rank = core.check_rank(rank)
    self.use_rslora = core.check_bool("use_rslora", use_rslora)
    core.lora_scaling(alpha, rank, use_rslora)
    self.alpha = None if alpha is None else float(alpha)
    self.delta_scaling = float(core.check_delta_scaling(delta_scaling))
    self.evaluation = core.check_evaluation(evaluation)
    self.freeze_base = core.check_bool("freeze_base", freeze_base)
    self.use_delta = core.check_bool("use_delta", use_delta)
    self.paper_lambda = core.check_paper_lambda(paper_lambda, use_delta)
    _check_rngs(rngs)
    self.adapter_dtype = adapter_dtype
    # The base's names of its kernel and bias: merge writes them back under these names, and
    # reading them on the adapter (tunix's q_proj.w) gives the adapter's kernel and bias.
    self.kernel_name = description.kernel
    self.bias_name = description.bias
    base_bias = None if description.bias is None else getattr(base, description.bias)
    self.use_bias = base_bias is not None
    self.dtype: DTypeLike | None = description.dtype
    self.precision: PrecisionLike = description.precision
    self.base_graphdef = nnx.graphdef(base)
    self.kernel: nnx.Variable[jax.Array] = getattr(base, description.kernel).copy()
    self.bias: nnx.Variable[jax.Array] | None = nnx.data(None)
    if base_bias is not None:
      self.bias = base_bias.copy()
    for name in description.attributes:
      if name in _OWN or name in (self.kernel_name, self.bias_name):
        raise TypeError(
          f"{type(base).__name__}'s description keeps the attribute {name!r}, which is the "
          f"adapter's own; the names it may not keep are {sorted(_OWN)}"
        )
      setattr(self, name, getattr(base, name))
    shape = tuple(self.kernel.shape)
    stack = len(shape) - self.projection.kernel_ndim  # nnx.vmap's layer axes lead
    layer_shape = shape[stack:]
    core.check_layer_rank(rank, self.projection, layer_shape, f"a {type(base).__name__}")
    new = core.new_adapter(
      (rngs.params(), rngs.params()),
      self.projection,
      shape,
      rank,
      _adapter_dtype(adapter_dtype, self.kernel.dtype),
      lora_a_init=lora_a_init,
      lora_b_init=lora_b_init,
      use_delta=use_delta,
      snapshot=self.paper_lambda is not None,  # A^ = A, B^ = B at construction
    )
    self.lora_a = nnx.LoRAParam(new["lora_a"])
    self.lora_b = nnx.LoRAParam(new["lora_b"])
    self.delta: DeltaParam | None = nnx.data(None)
    if use_delta:
      self.delta = DeltaParam(new["delta"])
    self.snapshot_a: PaperSnapshot | None = nnx.data(None)
    self.snapshot_b: PaperSnapshot | None = nnx.data(None)
    if self.paper_lambda is not None:
      self.snapshot_a = PaperSnapshot(new[core.SNAPSHOT_A])
      self.snapshot_b = PaperSnapshot(new[core.SNAPSHOT_B])
    self.kernel_scale: nnx.Param[jax.Array] | None = nnx.data(None)
    if (quantization := core.check_base_quantization(base_quantization)) is not None:
      self.quantize_base(quantization)

  def quantize_base(self, base_quantization: str = "int8") -> None:
    """Makes the base kernel quantized, in place: int8 per output channel, or NF4.

    ``kernel`` keeps its Variable (and metadata) with the values of
    :func:`deltalora_jax.core.quantize_kernel` (int8, or NF4's uint4 codes);
    ``kernel_scale`` (an ``nnx.Param``: shaped as the bias for int8, one per
    block of 64 along the input for NF4) holds the scales. The base is then
    read and never trained: differentiate the adapter's Variables only
    (``wrt=nnx.Any(nnx.LoRAParam, DeltaParam)``). A quantized base stays as it is.
    """
    core.check_base_quantization(base_quantization)
    if self.kernel_scale is not None:
      return
    if not self.freeze_base:
      raise ValueError(
        "a quantized base is read, never trained: base_quantization needs freeze_base=True, "
        "got freeze_base=False"
      )
    values, scale = core.quantize_kernel(self.kernel[...], base_quantization, self.projection)
    self.kernel = self.kernel.copy(values)
    self.kernel_scale = nnx.Param(scale)

  if not TYPE_CHECKING:  # typed code reads .kernel and .bias; the base's names are for its users

    def __getattr__(self, name: str) -> Any:
      """The base's names of its kernel and bias (tunix: ``w``) give the adapter's."""
      own = vars(self)
      if name == own.get("kernel_name"):
        return own["kernel"]
      if name == own.get("bias_name"):  # None when the base has no bias: never a name
        return own["bias"]
      raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

  def _apply(self, inputs: jax.Array, out_sharding: object) -> jax.Array:
    _check_out_sharding(out_sharding)
    bias = None if self.bias is None else self.bias[...]
    delta = None if self.delta is None else self.delta[...]
    lora_a, lora_b = self.lora_a[...], self.lora_b[...]
    snapshot = None
    if self.snapshot_a is not None and self.snapshot_b is not None:
      snapshot = (self.snapshot_a[...], self.snapshot_b[...])
    arrays = (self.kernel[...], bias, lora_a, lora_b, delta)
    kernel_scale = None if self.kernel_scale is None else self.kernel_scale[...]
    return core.delta_lora_layer(self, inputs, arrays, snapshot, kernel_scale)


class DeltaLoRALinearGeneral(_AdaptedLayer):
  r"""Delta-LoRA on any NNX projection layer: Flax's four kinds, tunix's ``Einsum``, your own.

  .. math::

    y = P(x, W) + b + s\,P_B(P_A(x, A), B) + ds\,P(x, D), \qquad s = \alpha / r

  Built around an existing layer (``base``, which is not modified) of a
  kind :func:`describe` knows (Flax's four, those of
  :func:`register_projection`, tunix's ``Einsum``): its kernel and bias
  Variables are kept as ``kernel`` and ``bias`` with their shapes and
  metadata (their arrays are shared), and the base's own names for them
  (tunix's ``w``) and its plain attributes (``shape``, ``einsum_str``) read
  on the adapter as on the base; ``lora_a`` and ``lora_b`` are
  ``nnx.LoRAParam``, ``D`` (exactly the kernel's shape) a :class:`DeltaParam`.
  At construction ``B = 0`` and ``D = 0``: the output equals the base
  layer's exactly. ``P`` is the base's product (:func:`projection_of`); the
  factors' layout is that of :mod:`deltalora_jax.projections`. A layer
  created by ``nnx.vmap`` (a stack, kernel ``[L, ...]``) gets stacked
  factors and ``D``; apply it inside ``nnx.scan`` as the base was.
  :func:`deltalora_jax.merge` gives back the base's own class with the
  merged kernel. The layer keeps the base's ``use_bias``, ``dtype`` and
  ``precision``; ``D`` and the factors are float32 (or ``adapter_dtype``)
  whatever the kernel's dtype.

  Args:
    base: the layer to adapt (see :func:`projection_of` for the kinds).
    rank: LoRA rank ``r``, at most the kernel's matrix rank bound
      (``min(in, out)`` for a dense kernel).
    alpha: LoRA alpha, finite and ``> 0``; None means ``alpha = r`` (``s = 1``).
    delta_scaling: ``ds``, finite and ``> 0``.
    freeze_base: the base kernel and bias get no gradient (XLA computes none).
    lora_a_init: initializer of ``A``; None is the seed's ``N(0, 1/r)``.
    lora_b_init: initializer of ``B`` (zeros).
    evaluation: ``'auto'``, ``'merged'`` or ``'factored'``
      (:func:`deltalora_jax.core.choose_evaluation`); same numbers either way.
    use_delta: create ``D``; ``False`` gives plain LoRA (no :class:`DeltaParam`).
    adapter_dtype: dtype of ``A``, ``B`` and ``D``; None is float32, or the
      kernel's dtype when that is wider.
    use_rslora: rank-stabilised scaling ``s = alpha / sqrt(r)`` (PEFT's ``use_rslora``).
    paper_lambda: the published rule's ``lambda`` for its telescoped form
      (:func:`deltalora_jax.paper_delta_lora` then never writes the kernel):
      the layer gets ``snapshot_a``, ``snapshot_b`` (:class:`PaperSnapshot`,
      copies of ``A`` and ``B``) and adds ``lambda s (A B - A^ B^)``, with
      no gradient through that term. None: no snapshot. Needs ``use_delta=False``.
    base_quantization: ``'int8'``: the base kernel becomes int8 with one
      float32 ``kernel_scale`` per output channel; ``'nf4'``: QLoRA's NF4
      codes with one per block of 64 along the input (needs qwix)
      (:meth:`quantize_base`); read and never trained (needs
      ``freeze_base=True``). None: as the base is.
    rngs: the ``nnx.Rngs`` that draws ``A``.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> conv = nnx.Conv(3, 4, kernel_size=(3, 3), rngs=nnx.Rngs(0))
    >>> layer = DeltaLoRALinearGeneral(conv, rank=2, rngs=nnx.Rngs(1))
    >>> layer.lora_a.shape, layer.lora_b.shape, layer.delta.shape
    ((3, 3, 3, 2), (2, 4), (3, 3, 3, 4))
    >>> x = jnp.ones((1, 8, 8, 3))
    >>> bool(jnp.allclose(layer(x), conv(x), atol=1e-6))
    True
  """

  def __call__(
    self, inputs: jax.Array, einsum_str: str | None = None, out_sharding: object = None
  ) -> jax.Array:
    core.check_einsum_str(einsum_str, self.projection)
    return self._apply(inputs, out_sharding)


class DeltaLoRALinear(_AdaptedLayer):
  r"""A linear layer adapted with LoRA and a full-size delta matrix (NNX).

  .. math::

    y = x W + b + s\,(x A) B + ds\,(x D), \qquad s = \alpha / r

  The same layer as the Linen :class:`~deltalora_jax.DeltaLoRADense` (both
  call :func:`deltalora_jax.core.delta_lora_layer`), built as
  :class:`DeltaLoRALinearGeneral` is, around the ``nnx.Linear`` it makes
  from sizes. State: ``kernel [in, out]`` and ``bias [out]`` as in ``nnx.Linear``
  (``nnx.Param``), ``lora_a [in, r]`` and ``lora_b [r, out]``
  (``nnx.LoRAParam``), ``delta [in, out]`` (:class:`DeltaParam`). Build it
  from sizes, or around a pretrained ``nnx.Linear`` with :meth:`from_linear`;
  :func:`deltalora_jax.merge` gives back a plain ``nnx.Linear`` with the
  merged kernel.

  Args:
    in_features: number of input features.
    out_features: number of output features.
    use_bias, dtype, param_dtype, precision, kernel_init, bias_init: the
      settings of the base ``nnx.Linear``, with its defaults (the attributes
      of the Linen :class:`~deltalora_jax.DeltaLoRADense` of the same names).
    rngs: the ``nnx.Rngs`` that draws the kernel and ``A``.
    **options: the LoRA options of :class:`DeltaLoRALinearGeneral`
      (:class:`LayerOptions`): ``rank`` (required, ``0 < r <= min(in,
      out)``), ``alpha``, ``delta_scaling``, ``freeze_base``,
      ``lora_a_init``, ``lora_b_init``, ``evaluation``, ``use_delta``,
      ``adapter_dtype``, ``use_rslora``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> layer = DeltaLoRALinear(8, 4, rank=2, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((3, 8))).shape
    (3, 4)
    >>> sorted(nnx.to_pure_dict(nnx.state(layer)))
    ['bias', 'delta', 'kernel', 'lora_a', 'lora_b']
    >>> jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(layer, DeltaParam)))
    {'delta': (8, 4)}
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    use_bias: bool = True,
    dtype: DTypeLike | None = None,
    param_dtype: DTypeLike = jnp.float32,
    precision: PrecisionLike = None,
    kernel_init: Initializer = DEFAULT_KERNEL_INIT,
    bias_init: Initializer = ZEROS_INIT,
    rngs: nnx.Rngs,
    **options: Unpack[LayerOptions],
  ) -> None:
    self.in_features = core.check_features("in_features", in_features)
    self.out_features = core.check_features("out_features", out_features)
    core.check_rank(options.get("rank"), in_features, out_features)
    _check_rngs(rngs)
    self.param_dtype = param_dtype
    linear = nnx.Linear(
      in_features,
      out_features,
      rngs=rngs,
      use_bias=core.check_bool("use_bias", use_bias),
      dtype=dtype,
      param_dtype=param_dtype,
      precision=precision,
      kernel_init=kernel_init,
      bias_init=bias_init,
    )
    super().__init__(linear, rngs=rngs, **options)

  @classmethod
  def from_linear(
    cls, linear: nnx.Linear, *, rngs: nnx.Rngs, **options: Unpack[LayerOptions]
  ) -> Self:
    """An adapter around a pretrained ``nnx.Linear``, keeping its kernel and bias.

    The kernel and bias Variables are copied with their metadata (sharding
    annotations included); their arrays are shared, not duplicated. The
    layer's ``dtype``, ``precision`` and ``use_bias`` are kept; ``D`` and the
    factors are float32 (or ``adapter_dtype``) whatever the kernel's dtype.

    Args:
      linear: the ``nnx.Linear`` to adapt; ``linear`` itself is not modified.
      rngs: the ``nnx.Rngs`` that draws ``A``.
      **options: the LoRA options of :class:`DeltaLoRALinearGeneral`
        (``rank`` required).

    Returns:
      A new :class:`DeltaLoRALinear` whose output equals ``linear``'s.

    Raises:
      TypeError: when ``linear`` is not an ``nnx.Linear``, or computes with a
        custom ``dot_general``, ``promote_dtype`` or ``preferred_element_type``
        (the adapter would silently compute something else), or ``options``
        names a base-layer argument.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> linear = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
      >>> layer = DeltaLoRALinear.from_linear(linear, rank=2, rngs=nnx.Rngs(1))
      >>> x = jnp.ones((2, 4))
      >>> bool(jnp.array_equal(layer(x), linear(x)))
      True
    """
    check_linear(linear)
    base_args = {"use_bias", "dtype", "param_dtype", "precision", "kernel_init", "bias_init"}
    if clash := sorted(base_args & set(options)):
      raise TypeError(f"from_linear takes the base layer's settings from linear, got {clash}")
    kernel = linear.kernel[...]
    bias = None if linear.bias is None else linear.bias[...]
    layer = cls(
      linear.in_features,
      linear.out_features,
      use_bias=bias is not None,
      dtype=linear.dtype,
      param_dtype=kernel.dtype,
      precision=linear.precision,
      kernel_init=_constant(kernel),
      bias_init=_constant(bias),
      rngs=rngs,
      **options,
    )
    # The linear's own Variables (with their metadata) and class.
    layer.kernel = linear.kernel.copy()
    if linear.bias is not None:
      layer.bias = linear.bias.copy()
    layer.base_graphdef = nnx.graphdef(linear)
    if layer.kernel_scale is not None:  # quantize the linear's own Variable (its metadata)
      layer.kernel_scale = None
      layer.quantize_base(options.get("base_quantization") or "int8")
    return layer

  def __call__(self, inputs: jax.Array, out_sharding: object = None) -> jax.Array:
    return self._apply(inputs, out_sharding)


def check_linear(linear: object) -> nnx.Linear:
  """Raises unless ``linear`` is an ``nnx.Linear`` whose math the adapter reproduces.

  Returns:
    ``linear``.
  """
  if not isinstance(linear, nnx.Linear) or isinstance(linear, nnx.LoRALinear):
    raise TypeError(f"linear must be an nnx.Linear, got {type(linear).__name__}")
  custom = [
    name
    for name, value, default in (
      ("dot_general", linear.dot_general, jax.lax.dot_general),
      ("promote_dtype", linear.promote_dtype, nnx_dtypes.promote_dtype),
      ("preferred_element_type", linear.preferred_element_type, None),
    )
    if value is not default
  ]
  if custom:
    raise TypeError(
      f"linear must compute with the default dot_general, promote_dtype and "
      f"preferred_element_type to be adapted, got custom {custom}"
    )
  return linear


# --------------------------------------------------------------------------
# Which modules are projections: a registry of describers, below every NNX adapter.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerDescription:
  """What an adapter needs to know of the projection layer it stands in for.

  A describer (:func:`register_projection`) gives one for each module of its
  class; :class:`DeltaLoRALinearGeneral` reads it when it adapts the module,
  and :func:`deltalora_jax.merge` rebuilds the module's own class with the
  merged kernel under the module's own name for it (``kernel``, ``w``).

  Attributes:
    projection: the layer's product ``y = P(x, W)``: a
      :class:`~deltalora_jax.projections.GeneralDense`,
      :class:`~deltalora_jax.projections.Einsum` or
      :class:`~deltalora_jax.projections.Conv`.
    kernel: the name of the module's attribute that holds ``W`` (an
      ``nnx.Variable``): ``'kernel'`` for Flax's layers, ``'w'`` for tunix's ``Einsum``.
    bias: the name of the attribute of the bias the layer adds (an
      ``nnx.Variable`` of ``projection.bias_shape``), or None.
    dtype: the computation dtype (None: the base layer's rule, the widest of the
      input, the kernel and the bias; the factors and ``D`` are cast to it).
    precision: the ``jax.lax.Precision`` of the products.
    attributes: names of the module's other plain attributes that the adapter
      keeps, so that code reading them on the adapted module still works
      (tunix's attention reads ``q_proj.shape``).

  Example:
    >>> from deltalora_jax.projections import Einsum
    >>> LayerDescription(Einsum("btd,dnh->btnh", (8, 2, 4)), kernel="w").bias is None
    True
  """

  projection: projections.Projection
  kernel: str = "kernel"
  bias: str | None = None
  dtype: DTypeLike | None = None
  precision: PrecisionLike = None
  attributes: tuple[str, ...] = ()


#: A describer: a module of its class to its :class:`LayerDescription`, or a
#: ``TypeError`` saying why that module cannot be adapted.
Describer = Callable[[Any], LayerDescription]

_DESCRIBERS: dict[type, Describer] = {}


def register_projection(cls: type, describe: Describer) -> None:
  """Teaches the NNX adapters a projection layer kind: ``cls`` and its subclasses.

  ``describe(module)`` returns the module's :class:`LayerDescription` (its
  product and the names of its kernel and bias), or raises ``TypeError``
  with the reason when that module cannot be adapted (a setting the
  adapter cannot reproduce). :func:`~deltalora_jax.adapt_nnx`,
  :class:`DeltaLoRALinearGeneral` and :func:`deltalora_jax.merge` then adapt
  and merge it like Flax's own layers; registering ``cls`` again replaces its
  describer. The adapter computes ``P(x, W) + b + s P_B(P_A(x, A), B) + ds
  P(x, D)`` with ``P = description.projection``: the describer vouches that
  the module's ``__call__`` is ``P(x, W) (+ b)``.

  Flax's ``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Einsum`` and
  ``nnx.Conv`` are registered; a module that no describer knows is adapted
  when it looks like tunix's ``Einsum`` (see :func:`describe`).

  Args:
    cls: an ``nnx.Module`` subclass.
    describe: ``module -> LayerDescription``.

  Raises:
    TypeError: when ``cls`` is not an ``nnx.Module`` subclass, is an adapter,
      or ``describe`` is not callable.

  Example:
    >>> import jax
    >>> from flax import nnx
    >>> import deltalora_jax as dl
    >>> class Scaled(nnx.Module):  # y = x @ weight, a layer the library does not know
    ...   def __init__(self, n_in, n_out, rngs):
    ...     self.weight = nnx.Param(jax.random.normal(rngs.params(), (n_in, n_out)))
    ...   def __call__(self, x):
    ...     return x @ self.weight[...]
    >>> dl.register_projection(Scaled, lambda m: dl.LayerDescription(
    ...     dl.projections.GeneralDense(features=(m.weight.shape[-1],)), kernel="weight"))
    >>> layer = dl.DeltaLoRALinearGeneral(Scaled(4, 3, nnx.Rngs(0)), rank=2, rngs=nnx.Rngs(1))
    >>> layer.weight.shape, layer.lora_a.shape, type(dl.merge(layer)).__name__
    ((4, 3), (4, 2), 'Scaled')
  """
  if not isinstance(cls, type) or not issubclass(cls, nnx.Module):
    raise TypeError(f"cls must be an nnx.Module subclass, got cls={cls!r}")
  if issubclass(cls, _AdaptedLayer | nnx.LoRALinear):
    raise TypeError(f"cls must be a projection layer, got the adapter {cls.__name__}")
  if not callable(describe):
    raise TypeError(f"describe must be a function module -> LayerDescription, got {describe!r}")
  _DESCRIBERS[cls] = describe


def describe(module: object) -> LayerDescription:
  """The :class:`LayerDescription` of an NNX projection layer, or a ``TypeError`` saying why not.

  The describer of the nearest registered class in the module's MRO
  (:func:`register_projection`), or else, for a module no describer knows,
  the einsum rule: an ``nnx.Module`` with a ``str`` attribute ``einsum_str``
  and exactly one ``nnx.Param`` (any name) is described as
  ``Einsum(einsum_str, param.shape)`` computing in its ``dtype`` attribute
  (when it has one), as tunix's ``Einsum`` is (its ``__call__`` is
  ``jnp.einsum(einsum_str, x, w)``). Because that rule guesses from the
  attributes, it is checked: the module is applied to a small random input
  and must give ``jnp.einsum(einsum_str, x, param)`` (its ``dtype``
  applied), or it is refused.

  Example:
    >>> from flax import nnx
    >>> describe(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
    LayerDescription(projection=GeneralDense(features=(3,), axis=(-1,)), kernel='kernel', \
bias='bias', dtype=None, precision=None, attributes=())
  """
  name = type(module).__name__
  if isinstance(module, nnx.LoRALinear | _AdaptedLayer):
    raise TypeError(f"{name} is already adapted")
  try:
    for cls in type(module).__mro__:
      if cls in _DESCRIBERS:
        description = _DESCRIBERS[cls](module)
        break
    else:
      description = _describe_einsum_module(module)
  except ValueError as error:  # a setting the adapter cannot reproduce
    raise TypeError(f"{name} cannot be adapted: {error}") from None
  if not isinstance(description, LayerDescription):
    raise TypeError(f"the describer of {name} must return a LayerDescription, got {description!r}")
  for role, attribute in (("kernel", description.kernel), ("bias", description.bias)):
    if attribute is not None and not isinstance(getattr(module, attribute, None), nnx.Variable):
      raise TypeError(
        f"{name}'s description names {role}={attribute!r}, which is not an nnx.Variable "
        f"of the module (got {type(getattr(module, attribute, None)).__name__})"
      )
  return description


def projection_of(module: object) -> projections.Projection:
  """The product of an NNX projection layer, or a ``TypeError`` saying why it cannot be adapted.

  ``describe(module).projection`` (:func:`describe`): ``nnx.Linear``,
  ``nnx.LinearGeneral`` (no ``batch_axis``), ``nnx.Einsum`` and
  ``nnx.Conv`` (``feature_group_count=1``, no ``mask``), and their
  subclasses, computing with their default product and dtype promotion;
  the kinds taught with :func:`register_projection`; modules like tunix's ``Einsum``.

  Example:
    >>> from flax import nnx
    >>> projection_of(nnx.LinearGeneral(8, (2, 4), rngs=nnx.Rngs(0)))
    GeneralDense(features=(2, 4), axis=(-1,))
  """
  return describe(module).projection


def _describe_flax(module: Any) -> LayerDescription:
  """Flax's projection layers: ``kernel``, ``bias``, ``dtype`` and ``precision``."""
  name = type(module).__name__
  projection: projections.Projection
  defaults: list[tuple[str, object]] = [
    ("promote_dtype", nnx_dtypes.promote_dtype),
    ("preferred_element_type", None),
  ]
  if isinstance(module, nnx.Linear):
    projection = projections.GeneralDense(features=(module.out_features,))
    defaults.append(("dot_general", jax.lax.dot_general))
  elif isinstance(module, nnx.LinearGeneral):
    if module.batch_axis:
      raise TypeError(
        f"{name} with batch_axis={dict(module.batch_axis)} cannot be adapted: only "
        "LinearGeneral without batch axes"
      )
    projection = projections.GeneralDense(
      features=ints(module.out_features), axis=ints(module.axis)
    )
    defaults += [("dot_general", None), ("dot_general_cls", None)]
  elif isinstance(module, nnx.Einsum):
    if module.einsum_str is None:
      raise TypeError(f"{name} without an einsum_str at construction cannot be adapted")
    projection = projections.Einsum(module.einsum_str, tuple(module.kernel_shape))
    defaults.append(("einsum_op", jnp.einsum))
  else:
    projection = conv_projection(module, module.out_features)
    defaults.append(("conv_general_dilated", jax.lax.conv_general_dilated))
  custom = [
    field
    for field, default in defaults
    if getattr(module, field, default) is not default
    and not (field == "dot_general" and getattr(module, field) is jax.lax.dot_general)
  ]
  if custom:
    raise TypeError(
      f"{name} computes with a custom {custom}: an adapter would compute something else"
    )
  return LayerDescription(
    projection,
    kernel="kernel",
    bias=None if module.bias is None else "bias",
    dtype=module.dtype,
    precision=module.precision,
  )


for _cls in (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv):
  _DESCRIBERS[_cls] = _describe_flax

#: The names of the adapter's own attributes, which a base attribute kept by the adapter
#: (``LayerDescription.attributes``) may not take.
_OWN = frozenset(
  {
    "projection",
    "rank",
    "alpha",
    "delta_scaling",
    "freeze_base",
    "evaluation",
    "use_delta",
    "use_rslora",
    "adapter_dtype",
    "use_bias",
    "dtype",
    "precision",
    "base_graphdef",
    "kernel",
    "bias",
    "lora_a",
    "lora_b",
    "delta",
    "kernel_name",
    "bias_name",
    "config",
    "scaling",
    "paper_lambda",
    "snapshot_a",
    "snapshot_b",
    "kernel_scale",
    "quantize_base",
  }
)


def _describe_einsum_module(module: Any) -> LayerDescription:
  """The einsum rule of :func:`describe`, checked on a small random input."""
  name = type(module).__name__
  supported = (
    f"{name} cannot be adapted: the supported kinds are nnx.Linear, nnx.LinearGeneral, "
    "nnx.Einsum and nnx.Conv (and their subclasses), the kinds registered with "
    "deltalora_jax.register_projection, and modules like tunix's Einsum (a str einsum_str and "
    "one nnx.Param)"
  )
  equation = getattr(module, "einsum_str", None)
  params = {k: v for k, v in vars(module).items() if isinstance(v, nnx.Param)}
  if not isinstance(module, nnx.Module) or not isinstance(equation, str) or len(params) != 1:
    raise TypeError(supported)
  ((kernel_name, kernel),) = params.items()
  dtype = getattr(module, "dtype", None)
  if dtype is not None:
    try:
      dtype = jnp.dtype(dtype)
    except TypeError:
      raise TypeError(f"{supported}; its dtype={dtype!r} is not a dtype") from None
  projection = projections.Einsum(equation, tuple(kernel.shape))
  _check_einsum_call(module, projection, kernel[...], dtype)
  kept = tuple(
    k
    for k, v in vars(module).items()
    if k not in _OWN
    and not k.startswith("_")
    and isinstance(v, str | int | float | tuple | np.dtype | type(None))
  )
  return LayerDescription(projection, kernel=kernel_name, dtype=dtype, attributes=kept)


def _check_einsum_call(
  module: Any, projection: projections.Einsum, kernel: jax.Array, dtype: np.dtype[Any] | None
) -> None:
  """Raises ``TypeError`` unless ``module(x)`` is ``jnp.einsum(equation, x, kernel)`` for a probe.

  ``x`` has the input's letters: the kernel's sizes where they are the
  kernel's, 2 elsewhere, no axes for ``...``; drawn in the computation dtype.
  """
  lhs = projection.equation.split(",")[0].replace("...", "")
  sizes = dict(zip(projection.equation.split(",")[1].split("->")[0], kernel.shape, strict=True))
  compute = dtype or kernel.dtype
  x = jax.random.normal(jax.random.key(0), tuple(sizes.get(c, 2) for c in lhs), compute)
  expected = projection.apply(x, kernel.astype(compute))
  name = type(module).__name__
  try:
    with warnings.catch_warnings():  # the probe is ours: the module's warnings are not the user's
      warnings.simplefilter("ignore")
      got = module(x)
  except Exception as error:
    raise TypeError(
      f"{name} has an einsum_str and one nnx.Param but cannot be adapted: called on an input "
      f"of shape {x.shape} it raised {type(error).__name__}: {error}"
    ) from None
  scale = float(jnp.max(jnp.abs(expected.astype(jnp.float32)))) if expected.size else 0.0
  if (
    not isinstance(got, jax.Array)
    or got.shape != expected.shape
    or not bool(
      jnp.allclose(
        got.astype(jnp.float32), expected.astype(jnp.float32), rtol=1e-2, atol=1e-2 * scale
      )
    )
  ):
    raise TypeError(
      f"{name} has an einsum_str and one nnx.Param but its __call__ is not "
      f"jnp.einsum({projection.equation!r}, x, param): it cannot be adapted (teach it with "
      "deltalora_jax.register_projection)"
    )
