"""The layer kinds an adapter can sit on: pure math of each projection, no Flax.

A *projection* is a layer's product ``y = P(x, W)``: linear in the input
``x`` and in the kernel ``W``. Flax's projection layers are three kinds:

* :class:`GeneralDense`: ``nn.Dense``, ``nn.DenseGeneral``, ``nnx.Linear``,
  ``nnx.LinearGeneral`` (``x``'s ``axis`` contracted with the kernel's
  leading axes, ``features`` the kernel's trailing axes);
* :class:`Einsum`: ``nn.Einsum``, ``nnx.Einsum`` (any two-operand equation);
* :class:`Conv`: ``nn.Conv``, ``nnx.Conv`` (1-D, 2-D, 3-D, channels last).

Each kind gives the four products a Delta-LoRA layer needs, in the kernel's
own layout, so that ``D`` has exactly the kernel's shape and the merged
kernel ``W + s A B + ds D`` is a kernel the base layer loads:

============  =====================  =====================  ==========================
kind          ``A``                  ``B``                  ``x`` through A, then B
============  =====================  =====================  ==========================
GeneralDense  ``[*in, r]``           ``[r, *features]``     ``P(x, A)``, then dense
Einsum        ``[*batch, *in, r]``   ``[*batch, r, *out]``  two einsums
Conv          ``[*window, in, r]``   ``[r, out]``           conv, then 1x1 (dense)
============  =====================  =====================  ==========================

For ``btd,ndh->btnh`` the contracted kernel axis is ``d`` and the output
axes ``n, h``: ``A [d, r]``, ``B [r, n, h]`` (qwix's layout). A kernel axis
that is also in the input and the output (``bnd,ndh->bnh``: ``n``) is a
*batch* axis: each index along it has its own rank-``r`` factors.

All three are frozen dataclasses: hashable, so a Linen module can hold one
as an attribute, and an NNX module as static metadata.
"""

from __future__ import annotations

import dataclasses
import math
import string
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Shape = tuple[int, ...]


def _ints(name: str, value: Any, *, allow_empty: bool = False) -> tuple[int, ...]:
  values = (value,) if isinstance(value, int | np.integer) else tuple(value)
  if (not values and not allow_empty) or not all(
    isinstance(v, int | np.integer) and not isinstance(v, bool) for v in values
  ):
    raise TypeError(f"{name} must be an int or a tuple of ints, got {name}={value!r}")
  return tuple(int(v) for v in values)


def _matmul(
  x: jax.Array, kernel: jax.Array, n_in: int, precision: jax.lax.PrecisionLike
) -> jax.Array:
  """Contracts the last ``n_in`` axes of ``x`` with the first ``n_in`` of ``kernel``.

  Both are reshaped to matrices first (free reshapes): the gradients then
  contract one axis, not several, which XLA's CPU backend runs up to 3
  times faster for the thin low-rank products.
  """
  lead, inner = x.shape[: x.ndim - n_in], x.shape[x.ndim - n_in :]
  outer = kernel.shape[n_in:]
  rows = jnp.reshape(x, (math.prod(lead), math.prod(inner)))
  matrix = jnp.reshape(kernel, (math.prod(inner), math.prod(outer)))
  y = jax.lax.dot_general(rows, matrix, (((1,), (0,)), ((), ())), precision=precision)
  return jnp.reshape(y, (*lead, *outer))


def dense(x: jax.Array, kernel: jax.Array, precision: jax.lax.PrecisionLike = None) -> jax.Array:
  """``x @ kernel`` over the last axis of ``x``, any leading axes kept.

  >>> dense(jnp.ones((2, 3, 4)), jnp.ones((4, 5))).shape
  (2, 3, 5)
  """
  return _matmul(x, kernel, 1, precision)


class _MatrixB:
  """The kinds whose ``B [r, *out]`` is a matrix on the rank axis: ``x A`` then ``(x A) B``."""

  def lora_out(
    self, h: jax.Array, lora_b: jax.Array, precision: jax.lax.PrecisionLike = None
  ) -> jax.Array:
    return _matmul(h, lora_b, 1, precision)

  def lora_kernel(
    self, lora_a: jax.Array, lora_b: jax.Array, precision: jax.lax.PrecisionLike = None
  ) -> jax.Array:
    return _matmul(lora_a, lora_b, 1, precision)

  def rank_axis_of_b(self) -> int:
    return 0

  def add_bias(self, y: jax.Array, bias: jax.Array) -> jax.Array:
    """``y`` plus the bias, on the output's trailing axes (the output channels)."""
    return y + _trailing(y, bias)

  def scale_output(self, y: jax.Array, scale: jax.Array) -> jax.Array:
    """``y`` times a per-output-channel ``scale`` (shaped as the bias)."""
    return y * _trailing(y, scale)


@dataclasses.dataclass(frozen=True)
class GeneralDense(_MatrixB):
  """``nn.DenseGeneral``'s product: ``x``'s ``axis`` contracted with the kernel's leading axes.

  The kernel is ``[*x.shape[axis], *features]``; the output keeps ``x``'s
  other axes in order, then ``features``. ``nn.Dense`` is
  ``GeneralDense(features=(n,), axis=(-1,))``.

  Attributes:
    features: the output feature axes (the kernel's trailing axes).
    axis: the input axes contracted, negative or not.

  Example:
    >>> projection = GeneralDense(features=(4, 5), axis=(-1,))
    >>> projection.kernel_shape((2, 3)), projection.factor_shapes((3, 4, 5), 2)
    ((3, 4, 5), ((3, 2), (2, 4, 5)))
  """

  features: tuple[int, ...]
  axis: tuple[int, ...] = (-1,)

  def __post_init__(self) -> None:
    object.__setattr__(self, "features", _ints("features", self.features))
    object.__setattr__(self, "axis", _ints("axis", self.axis))
    if any(f <= 0 for f in self.features):
      raise ValueError(f"features must be positive, got features={self.features}")

  @property
  def name(self) -> str:
    return "general_dense"

  @property
  def kernel_ndim(self) -> int:
    """The kernel's rank (a stack of layers adds leading axes)."""
    return len(self.axis) + len(self.features)

  def _axes(self, ndim: int) -> tuple[int, ...]:
    axes = tuple(a % ndim if -ndim <= a < ndim else None for a in self.axis)
    if None in axes or len(set(axes)) != len(axes):
      raise ValueError(f"axis={self.axis} must be distinct axes of an input of rank {ndim}")
    return tuple(sorted(axes))  # type: ignore[arg-type]  # as Flax: in the input's order

  def kernel_shape(self, x_shape: Shape) -> Shape:
    return tuple(x_shape[a] for a in self._axes(len(x_shape))) + self.features

  def bias_shape(self, kernel_shape: Shape) -> Shape:
    return self.features

  def split(self, kernel_shape: Shape) -> tuple[Shape, Shape]:
    """``(contracted axes, output axes)`` of the kernel's shape."""
    n_in = len(kernel_shape) - len(self.features)
    return tuple(kernel_shape[:n_in]), tuple(kernel_shape[n_in:])

  def factor_shapes(self, kernel_shape: Shape, rank: int) -> tuple[Shape, Shape]:
    inner, outer = self.split(kernel_shape)
    return (*inner, rank), (rank, *outer)

  def rank_bound(self, kernel_shape: Shape) -> int:
    return min(map(math.prod, self.split(kernel_shape)))

  def rows(self, x_shape: Shape) -> int:
    return math.prod(x_shape) // max(1, math.prod(self.kernel_shape(x_shape)[: len(self.axis)]))

  def _apply(
    self, x: jax.Array, kernel: jax.Array, n_out: int, precision: jax.lax.PrecisionLike
  ) -> jax.Array:
    n_in = kernel.ndim - n_out
    axes = self._axes(x.ndim)
    if axes == tuple(range(x.ndim - n_in, x.ndim)):
      return _matmul(x, kernel, n_in, precision)
    dims = ((axes, tuple(range(n_in))), ((), ()))
    return jax.lax.dot_general(x, kernel, dims, precision=precision)

  def apply(
    self, x: jax.Array, kernel: jax.Array, precision: jax.lax.PrecisionLike = None
  ) -> jax.Array:
    return self._apply(x, kernel, len(self.features), precision)

  def lora_in(
    self, x: jax.Array, lora_a: jax.Array, precision: jax.lax.PrecisionLike = None
  ) -> jax.Array:
    return self._apply(x, lora_a, 1, precision)

  def channel_letters(self) -> tuple[str, str]:
    """``(kernel's letters, output channels' letters)``: the channels are the bias's axes."""
    letters = string.ascii_lowercase[: self.kernel_ndim]
    return letters, letters[len(letters) - len(self.features) :]


def _trailing(y: jax.Array, per_channel: jax.Array) -> jax.Array:
  """``per_channel`` (the trailing axes of ``y``) with leading axes of size 1 for broadcasting."""
  return jnp.reshape(per_channel, (1,) * (y.ndim - per_channel.ndim) + per_channel.shape)


def _parse_equation(equation: str) -> tuple[str, str, str]:
  equation = equation.replace(" ", "")
  if "->" not in equation or equation.count(",") != 1:
    raise ValueError(
      "einsum_str must be explicit with two operands, 'input,kernel->output', got "
      f"einsum_str={equation!r}"
    )
  inputs, out = equation.split("->")
  lhs, rhs = inputs.split(",")
  if "." in rhs:
    raise ValueError(f"einsum_str's kernel operand cannot hold '...', got einsum_str={equation!r}")
  return lhs, rhs, out


@dataclasses.dataclass(frozen=True)
class Einsum:
  """``nn.Einsum``'s product: ``jnp.einsum(equation, x, kernel)``.

  The kernel's letters are *contracted* (in ``x``, not in the output),
  *output* (in the output, not in ``x``) or *batch* (in both: one set of
  factors per index). A kernel letter in neither ``x`` nor the output is
  refused.

  Attributes:
    equation: ``'input,kernel->output'``, e.g. ``'btd,dnh->btnh'``; ``...``
      may stand in the input and output (not the kernel).
    shape: the kernel's shape.

  Example:
    >>> projection = Einsum("btd,dnh->btnh", (8, 2, 4))
    >>> projection.factor_shapes((8, 2, 4), 3)
    ((8, 3), (3, 2, 4))
  """

  equation: str
  shape: tuple[int, ...]

  def __post_init__(self) -> None:
    object.__setattr__(self, "equation", self.equation.replace(" ", ""))
    object.__setattr__(self, "shape", _ints("shape", self.shape))
    lhs, rhs, out = _parse_equation(self.equation)
    if len(rhs) != len(self.shape) or len(set(rhs)) != len(rhs):
      raise ValueError(
        f"einsum_str's kernel operand {rhs!r} must name the {len(self.shape)} axes of the "
        f"kernel shape {self.shape} once each"
      )
    lonely = [c for c in rhs if c not in lhs and c not in out]
    if lonely:
      raise ValueError(
        f"einsum_str={self.equation!r} sums the kernel over {lonely} alone; every kernel axis "
        "must be in the input or the output to be adapted"
      )

  @property
  def name(self) -> str:
    return "einsum"

  @property
  def kernel_ndim(self) -> int:
    """The kernel's rank (a stack of layers adds leading axes)."""
    return len(self.shape)

  def _letters(self) -> tuple[str, str, str, str, str, str]:
    """``(lhs, rhs, out, A's letters, B's letters, rank letter)``."""
    lhs, rhs, out = _parse_equation(self.equation)
    used = set(lhs + rhs + out)
    r = next(c for c in string.ascii_letters if c not in used)
    batch = [c for c in rhs if c in lhs and c in out]
    inner = [c for c in rhs if c in lhs and c not in out]
    outer = [c for c in rhs if c in out and c not in lhs]
    return lhs, rhs, out, "".join(batch + inner) + r, "".join(batch) + r + "".join(outer), r

  def _sizes(self, kernel_shape: Shape) -> dict[str, int]:
    rhs = _parse_equation(self.equation)[1]
    return dict(zip(rhs, kernel_shape[-len(rhs) :], strict=True))

  def kernel_shape(self, x_shape: Shape) -> Shape:
    return self.shape

  def bias_shape(self, kernel_shape: Shape) -> Shape:
    sizes, out = self._sizes(kernel_shape), _parse_equation(self.equation)[2]
    return tuple(sizes[c] for c in out if c in sizes)

  def factor_shapes(self, kernel_shape: Shape, rank: int) -> tuple[Shape, Shape]:
    sizes = self._sizes(kernel_shape)
    _, _, _, a, b, r = self._letters()
    sizes[r] = rank
    return tuple(sizes[c] for c in a), tuple(sizes[c] for c in b)

  def rank_bound(self, kernel_shape: Shape) -> int:
    sizes = self._sizes(kernel_shape)
    lhs, rhs, out, *_ = self._letters()
    inner = [sizes[c] for c in rhs if c in lhs and c not in out]
    outer = [sizes[c] for c in rhs if c in out and c not in lhs]
    return min(math.prod(inner), math.prod(outer))

  def rows(self, x_shape: Shape) -> int:
    lhs, rhs, _ = _parse_equation(self.equation)
    sizes = self._sizes(self.shape)
    used = math.prod(sizes[c] for c in rhs if c in lhs)
    return math.prod(x_shape) // max(1, used)

  def _plan(self, ndim: int) -> tuple[str, str, str, str, str]:
    """``(input, output, hidden, A, B)`` letters for an input of rank ``ndim``.

    ``...`` is spelled out with free letters; ``hidden`` is ``x`` through
    ``A``: the input's letters less the contracted ones, then the rank's.
    """
    lhs, rhs, out, a, b, r = self._letters()
    inner = {c for c in rhs if c in lhs and c not in out}
    if "..." in lhs:
      used = set(lhs + rhs + out + r)
      free = [c for c in string.ascii_letters if c not in used]
      filler = "".join(free[: ndim - (len(lhs) - 3)])
      lhs, out = lhs.replace("...", filler), out.replace("...", filler)
    hidden = "".join(c for c in lhs if c not in inner) + r
    return lhs, out, hidden, a, b

  def _n_inner(self) -> int:
    lhs, rhs, out = _parse_equation(self.equation)
    return sum(1 for c in rhs if c in lhs and c not in out)

  def apply(
    self, x: jax.Array, kernel: jax.Array, precision: jax.lax.PrecisionLike = None
  ) -> jax.Array:
    return jnp.einsum(self.equation, x, kernel, precision=precision)

  def lora_in(
    self, x: jax.Array, lora_a: jax.Array, precision: jax.lax.PrecisionLike = None
  ) -> jax.Array:
    lhs, _, hidden, a, _ = self._plan(x.ndim)
    return jnp.einsum(f"{lhs},{a}->{hidden}", x, lora_a, precision=precision)

  def lora_out(
    self, h: jax.Array, lora_b: jax.Array, precision: jax.lax.PrecisionLike = None
  ) -> jax.Array:
    _, out, hidden, _, b = self._plan(h.ndim - 1 + self._n_inner())
    return jnp.einsum(f"{hidden},{b}->{out}", h, lora_b, precision=precision)

  def lora_kernel(
    self, lora_a: jax.Array, lora_b: jax.Array, precision: jax.lax.PrecisionLike = None
  ) -> jax.Array:
    _, rhs, _, a, b, _ = self._letters()
    return jnp.einsum(f"{a},{b}->{rhs}", lora_a, lora_b, precision=precision)

  def _in_output(self, y: jax.Array, per_channel: jax.Array) -> jax.Array:
    """``per_channel`` (shaped as the bias) reshaped to broadcast against the output ``y``."""
    _, rhs, out = _parse_equation(self.equation)
    sizes = dict(zip(rhs, self.shape, strict=True))
    head, ellipsis, tail = out.partition("...")
    middle = [1] * (y.ndim - len(head) - len(tail)) if ellipsis else []
    shape = [sizes.get(c, 1) for c in head] + middle + [sizes.get(c, 1) for c in tail]
    return jnp.reshape(per_channel, shape)

  def add_bias(self, y: jax.Array, bias: jax.Array) -> jax.Array:
    return y + self._in_output(y, bias)

  def scale_output(self, y: jax.Array, scale: jax.Array) -> jax.Array:
    """``y`` times a per-output-channel ``scale`` (shaped as the bias)."""
    return y * self._in_output(y, scale)

  def channel_letters(self) -> tuple[str, str]:
    """``(kernel's letters, output channels' letters)``: the channels are the bias's axes."""
    _, rhs, out = _parse_equation(self.equation)
    return rhs, "".join(c for c in out if c in rhs)

  def rank_axis_of_b(self) -> int:
    _, _, _, _, b, r = self._letters()
    return b.index(r)


Padding = str | tuple[tuple[int, int], ...]


def _canonical_padding(padding: Any, rank: int) -> Padding:
  """Flax's ``canonicalize_padding``: a mode string or ``rank`` ``(low, high)`` pairs."""
  if isinstance(padding, str):
    if padding not in ("SAME", "SAME_LOWER", "VALID", "CIRCULAR", "REFLECT", "CAUSAL"):
      raise ValueError(
        "padding must be 'SAME', 'SAME_LOWER', 'VALID', 'CIRCULAR', 'REFLECT', 'CAUSAL', an int or "
        f"(low, high) pairs, got padding={padding!r}"
      )
    if padding == "CAUSAL" and rank != 1:
      raise ValueError(f"padding='CAUSAL' is for 1-D convolutions, got a {rank}-D window")
    return padding
  if isinstance(padding, int | np.integer):
    return ((int(padding), int(padding)),) * rank
  if isinstance(padding, Sequence) and len(padding) == rank:
    pairs: list[tuple[int, int]] = []
    for p in padding:
      if isinstance(p, int | np.integer):
        pairs.append((int(p), int(p)))
      elif isinstance(p, Sequence) and len(p) == 2:
        pairs.append((int(p[0]), int(p[1])))
      else:
        break
    else:
      return tuple(pairs)
  raise ValueError(
    f"padding must be a mode string, an int or {rank} (low, high) pairs, got padding={padding!r}"
  )


@dataclasses.dataclass(frozen=True)
class Conv(_MatrixB):
  """``nn.Conv``'s product: a channels-last convolution (``feature_group_count=1``).

  The kernel is ``[*kernel_size, in, features]``. Inputs with more than one
  batch axis are flattened to one, and an input with none gets one, as Flax
  does; ``'CIRCULAR'``, ``'REFLECT'`` and ``'CAUSAL'`` padding pad the input
  first, as Flax does.

  ``A [*kernel_size, in, r]`` is a convolution with the base's window,
  strides, padding and dilation into ``r`` channels; ``B [r, features]`` a
  1x1 convolution (a dense product over channels), as PEFT does for Conv2d.

  Example:
    >>> projection = Conv(features=8, kernel_size=(3, 3))
    >>> projection.kernel_shape((2, 5, 5, 4)), projection.factor_shapes((3, 3, 4, 8), 2)
    ((3, 3, 4, 8), ((3, 3, 4, 2), (2, 8)))
  """

  features: int
  kernel_size: tuple[int, ...]
  strides: tuple[int, ...] | None = None
  padding: Any = "SAME"
  input_dilation: tuple[int, ...] | None = None
  kernel_dilation: tuple[int, ...] | None = None

  def __post_init__(self) -> None:
    size = _ints("kernel_size", self.kernel_size)
    object.__setattr__(self, "kernel_size", size)
    if isinstance(self.features, bool) or not isinstance(self.features, int | np.integer):
      raise TypeError(f"features must be an int, got features={self.features!r}")
    object.__setattr__(self, "features", int(self.features))
    for name in ("strides", "input_dilation", "kernel_dilation"):
      value = getattr(self, name)
      value = 1 if value is None else value
      value = (value,) * len(size) if isinstance(value, int | np.integer) else value
      object.__setattr__(self, name, _ints(name, value))
      if len(getattr(self, name)) != len(size):
        raise ValueError(f"{name} must have {len(size)} entries, got {name}={value!r}")
    object.__setattr__(self, "padding", _canonical_padding(self.padding, len(size)))

  @property
  def name(self) -> str:
    return "conv"

  @property
  def kernel_ndim(self) -> int:
    """The kernel's rank (a stack of layers adds leading axes)."""
    return len(self.kernel_size) + 2

  def kernel_shape(self, x_shape: Shape) -> Shape:
    return (*self.kernel_size, x_shape[-1], self.features)

  def bias_shape(self, kernel_shape: Shape) -> Shape:
    return (kernel_shape[-1],)

  def factor_shapes(self, kernel_shape: Shape, rank: int) -> tuple[Shape, Shape]:
    return (*kernel_shape[:-1], rank), (rank, kernel_shape[-1])

  def rank_bound(self, kernel_shape: Shape) -> int:
    return min(math.prod(kernel_shape[:-1]), kernel_shape[-1])

  def rows(self, x_shape: Shape) -> int:
    return math.prod(x_shape[:-1]) // math.prod(self.window()[0])

  def window(self) -> tuple[Shape, Shape, Shape]:
    """``(strides, input_dilation, kernel_dilation)``, one entry per window axis each.

    >>> Conv(features=2, kernel_size=(3, 3), strides=2).window()
    ((2, 2), (1, 1), (1, 1))
    """
    strides, input_dilation, kernel_dilation = (
      self.strides,
      self.input_dilation,
      self.kernel_dilation,
    )
    # __post_init__ has replaced None (and an int) by a tuple: never None here.
    assert strides is not None and input_dilation is not None and kernel_dilation is not None
    return strides, input_dilation, kernel_dilation

  def _conv(self, x: jax.Array, kernel: jax.Array, precision: jax.lax.PrecisionLike) -> jax.Array:
    n = len(self.kernel_size)
    strides, input_dilation, kernel_dilation = self.window()
    batch = x.shape[: x.ndim - n - 1]
    x = jnp.reshape(x, (-1, *x.shape[x.ndim - n - 1 :]))
    padding = self.padding
    if padding in ("CIRCULAR", "REFLECT"):
      window = [(k - 1) * d + 1 for k, d in zip(self.kernel_size, kernel_dilation, strict=True)]
      pads = [(0, 0), *[((k - 1) // 2, k // 2) for k in window], (0, 0)]
      x = jnp.pad(x, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding])
      padding = "VALID"
    elif padding == "CAUSAL":
      x = jnp.pad(x, [(0, 0), (kernel_dilation[0] * (self.kernel_size[0] - 1), 0), (0, 0)])
      padding = "VALID"
    spec = (0, n + 1, *range(1, n + 1))
    numbers = jax.lax.ConvDimensionNumbers(spec, (n + 1, n, *range(n)), spec)
    y = jax.lax.conv_general_dilated(
      x,
      kernel,
      strides,
      padding,
      lhs_dilation=input_dilation,
      rhs_dilation=kernel_dilation,
      dimension_numbers=numbers,
      precision=precision,
    )
    return jnp.reshape(y, (*batch, *y.shape[1:]))

  def apply(
    self, x: jax.Array, kernel: jax.Array, precision: jax.lax.PrecisionLike = None
  ) -> jax.Array:
    return self._conv(x, kernel, precision)

  def lora_in(
    self, x: jax.Array, lora_a: jax.Array, precision: jax.lax.PrecisionLike = None
  ) -> jax.Array:
    return self._conv(x, lora_a, precision)

  def channel_letters(self) -> tuple[str, str]:
    """``(kernel's letters, output channels' letters)``: the channels are the bias's axes."""
    letters = string.ascii_lowercase[: self.kernel_ndim]
    return letters, letters[-1]


Projection = GeneralDense | Einsum | Conv
KINDS = {"general_dense": GeneralDense, "einsum": Einsum, "conv": Conv}


def to_json(projection: Projection) -> dict[str, Any]:
  """A projection as plain JSON data: ``{'kind': name, field: value, ...}``.

  >>> to_json(GeneralDense(features=(4,)))
  {'kind': 'general_dense', 'features': [4], 'axis': [-1]}
  """
  fields = {f.name: _lists(getattr(projection, f.name)) for f in dataclasses.fields(projection)}
  return {"kind": projection.name, **fields}


def _lists(value: Any) -> Any:
  if isinstance(value, tuple | list):
    return [_lists(v) for v in value]
  return value


def from_json(data: Any) -> Projection:
  """The projection that :func:`to_json` wrote.

  >>> from_json(to_json(Conv(features=2, kernel_size=(3,)))) == Conv(2, (3,))
  True
  """
  if not isinstance(data, dict) or data.get("kind") not in KINDS:
    raise ValueError(f"a projection must be {{'kind': one of {sorted(KINDS)}, ...}}, got {data!r}")
  fields = {k: _tuples(v) for k, v in data.items() if k != "kind"}
  cls: type[Projection] = KINDS[data["kind"]]
  return cls(**fields)


def _tuples(value: Any) -> Any:
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def ints(value: int | np.integer[Any] | Sequence[int], n: int = 1) -> tuple[int, ...]:
  """A Flax layer's size setting as a tuple: an int stands for ``n`` equal entries.

  >>> ints(3), ints(2, n=3), ints([2, 4])
  ((3,), (2, 2, 2), (2, 4))
  """
  if isinstance(value, int | np.integer):
    return (int(value),) * n
  return tuple(value)


def conv_projection(module: Any, features: int) -> Conv:
  """The product of a Linen or NNX ``Conv`` module (they name their settings alike).

  Raises:
    TypeError: for ``feature_group_count != 1`` or a ``mask``.
  """
  name = type(module).__name__
  if module.feature_group_count != 1:
    raise TypeError(
      f"{name} with feature_group_count={module.feature_group_count} cannot be adapted: "
      "only feature_group_count=1"
    )
  if module.mask is not None:
    raise TypeError(f"{name} with a mask cannot be adapted")
  size = ints(module.kernel_size)

  def per_axis(value: int | Sequence[int] | None) -> tuple[int, ...] | None:
    return None if value is None else ints(value, len(size))  # an int: every spatial axis

  return Conv(
    features,
    size,
    strides=per_axis(module.strides),
    padding=module.padding,
    input_dilation=per_axis(module.input_dilation),
    kernel_dilation=per_axis(module.kernel_dilation),
  )
