"""The pure math of a Delta-LoRA dense layer: plain functions of arrays.

Nothing here imports Flax. The Linen and NNX modules own parameters and call
these functions; any JAX code can call them directly.

Notation (Flax layout, inputs multiply kernels from the left)::

    x [..., in]   W [in, out]   b [out]   A [in, r]   B [r, out]   D [in, out]

    y = x W + b + s (x A) B + ds (x D),     s = alpha / r

where ``s`` is the LoRA ``scaling`` and ``ds`` the ``delta_scaling``.
"""

from __future__ import annotations

import functools
import importlib
import math
import string
from typing import Any, Literal, Protocol, TypeVar, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from deltalora_jax import projections
from deltalora_jax.projections import dense  # noqa: F401  (re-exported: core.dense)

Evaluation = Literal["auto", "merged", "factored"]
#: The names of the snapshot factors ``A^``, ``B^`` of a layer with ``paper_lambda``.
SNAPSHOT_A, SNAPSHOT_B = "snapshot_a", "snapshot_b"
SNAPSHOT_NAMES = (SNAPSHOT_A, SNAPSHOT_B)
#: ``(A^, B^)``: the snapshot factors of a layer of the published rule's telescoped form.
Snapshot = tuple[jax.Array, jax.Array]
EVALUATIONS = ("auto", "merged", "factored")
_T = TypeVar("_T")


# --------------------------------------------------------------------------
# Validation: every hyperparameter is checked where it enters.
# --------------------------------------------------------------------------


def as_float(name: str, value: object, *, schedule_ok: bool = False) -> float | None:
  """``float(value)``; None for a traced value (or a schedule, when allowed).

  Raises ``TypeError`` for anything that is not a real scalar.
  """
  if isinstance(value, jax.core.Tracer) or (schedule_ok and callable(value)):
    return None
  if isinstance(value, bool) or not isinstance(
    value, (int, float, np.number, np.ndarray, jax.Array)
  ):
    raise TypeError(f"{name} must be a real number, got {name}={value!r}")
  if np.ndim(value) != 0:
    raise ValueError(f"{name} must be a scalar, got shape {np.shape(value)}")
  return float(value)


def check_features(name: str, value: object) -> int:
  """Raises unless ``value`` (a layer size called ``name``) is a positive int; returns it.

  >>> check_features("features", 4)
  4
  >>> check_features("features", 4.0)
  Traceback (most recent call last):
  TypeError: features must be a positive int, got features=4.0
  """
  if isinstance(value, bool) or not isinstance(value, int | np.integer):
    raise TypeError(f"{name} must be a positive int, got {name}={value!r}")
  if value <= 0:
    raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
  return int(value)


def check_rank(
  rank: object, in_features: int | None = None, out_features: int | None = None
) -> int:
  """Raises unless ``rank`` is an integer with ``0 < rank <= min(in, out)``.

  Args:
    rank: the LoRA rank to check.
    in_features: input size of the layer, when known.
    out_features: output size of the layer, when known.

  Returns:
    ``rank`` as a Python ``int``.

  >>> check_rank(4, 16, 8)
  4
  >>> check_rank(9, 16, 8)
  Traceback (most recent call last):
  ValueError: rank must satisfy 0 < rank <= min(in, out) = 8, got rank=9
  """
  if isinstance(rank, bool) or not isinstance(rank, int | np.integer):
    raise TypeError(f"rank must be a positive int, got rank={rank!r}")
  sizes = [n for n in (in_features, out_features) if n is not None]
  bound = min(sizes) if sizes else None
  if rank <= 0 or (bound is not None and rank > bound):
    allowed = "0 < rank" + (f" <= min(in, out) = {bound}" if bound else "")
    raise ValueError(f"rank must satisfy {allowed}, got rank={rank}")
  return int(rank)


def check_layer_rank(
  rank: object, projection: projections.Projection, layer_shape: Any, where: str
) -> int:
  """Raises unless ``rank`` fits one kernel ``layer_shape`` of ``projection``; returns it.

  The one bound of every front: ``where`` names the layer in the message (the
  Linen path, the NNX layer's class, the name ``adapt_*`` gives it).

  >>> projection = projections.GeneralDense(features=(1,))
  >>> check_layer_rank(2, projection, (8, 1), "the layer 'head'")
  Traceback (most recent call last):
  ValueError: rank must satisfy 0 < rank <= 1 for the kernel (8, 1) of the layer 'head', got rank=2
  """
  checked = check_rank(rank)
  shape = tuple(int(n) for n in layer_shape)
  bound = projection.rank_bound(shape)
  if checked > bound:
    raise ValueError(
      f"rank must satisfy 0 < rank <= {bound} for the kernel {shape} of {where}, got rank={checked}"
    )
  return checked


def check_einsum_str(einsum_str: str | None, projection: projections.Projection) -> None:
  """Raises unless ``einsum_str`` is None or the equation of the einsum ``projection``.

  What an adapted layer's call checks of the ``einsum_str`` it is given (Flax's
  ``Einsum`` takes one per call), in Linen and NNX.

  >>> check_einsum_str("bi, io->bo", projections.Einsum("bi,io->bo", (2, 3)))
  >>> check_einsum_str("bi,io->bo", projections.GeneralDense(features=(3,)))
  Traceback (most recent call last):
  ValueError: einsum_str='bi,io->bo' differs from the adapted layer's equation None
  """
  if einsum_str is not None and (
    not isinstance(projection, projections.Einsum)
    or einsum_str.replace(" ", "") != projection.equation
  ):
    raise ValueError(
      f"einsum_str={einsum_str!r} differs from the adapted layer's equation "
      f"{getattr(projection, 'equation', None)!r}"
    )


def check_bool(name: str, value: object) -> bool:
  """Raises unless ``value`` (the argument ``name``) is a bool; returns it.

  >>> check_bool("use_delta", 1)
  Traceback (most recent call last):
  TypeError: use_delta must be a bool, got use_delta=1
  """
  if not isinstance(value, bool):
    raise TypeError(f"{name} must be a bool, got {name}={value!r}")
  return value


def check_delta_scaling(delta_scaling: _T) -> _T:
  """Raises unless ``delta_scaling`` is finite and positive; returns it.

  >>> check_delta_scaling(0.1)
  0.1
  >>> check_delta_scaling(float("nan"))
  Traceback (most recent call last):
  ValueError: delta_scaling must be finite and > 0, got delta_scaling=nan
  """
  value = as_float("delta_scaling", delta_scaling)
  if value is not None and not (math.isfinite(value) and value > 0):
    raise ValueError(f"delta_scaling must be finite and > 0, got delta_scaling={delta_scaling!r}")
  return delta_scaling


def check_momentum(momentum: _T) -> _T:
  """Raises unless ``0 <= momentum < 1`` (NaN is refused); returns it.

  A traced value (under ``optax.inject_hyperparams``) cannot be checked and
  passes through.

  >>> check_momentum(0.9)
  0.9
  >>> check_momentum(1.0)
  Traceback (most recent call last):
  ValueError: momentum must satisfy 0 <= momentum < 1, got momentum=1.0
  """
  value = as_float("momentum", momentum)
  if value is not None and not 0.0 <= value < 1.0:
    raise ValueError(f"momentum must satisfy 0 <= momentum < 1, got momentum={momentum!r}")
  return momentum


def check_paper_lambda(paper_lambda: object, use_delta: bool = False) -> float | None:
  """Raises unless ``paper_lambda`` is None or a finite number ``>= 0`` on a layer without ``D``.

  Returns it as a float (None for None). A traced value is refused: the
  telescoped form needs one ``lambda`` for the whole run.

  >>> check_paper_lambda(2), check_paper_lambda(None)
  (2.0, None)
  >>> check_paper_lambda(-1.0)
  Traceback (most recent call last):
  ValueError: paper_lambda must be None or finite and >= 0, got paper_lambda=-1.0
  """
  if paper_lambda is None:
    return None
  value = as_float("paper_lambda", paper_lambda)
  if value is None:
    raise TypeError(
      "paper_lambda must be a concrete number (a layer option, fixed for the run), got a "
      f"traced value {paper_lambda!r}"
    )
  if not (math.isfinite(value) and value >= 0):
    raise ValueError(f"paper_lambda must be None or finite and >= 0, got paper_lambda={value!r}")
  if use_delta:
    raise ValueError(
      "paper_lambda (the published rule's snapshot) needs use_delta=False: the seed's D and "
      f"the paper's rule do not mix; got paper_lambda={value!r} with use_delta=True"
    )
  return value


def check_learning_rate(learning_rate: _T) -> _T:
  """Raises unless ``learning_rate`` is a finite number ``>= 0`` or a schedule.

  A negative rate would climb the loss; ``0`` freezes. A traced value (under
  ``optax.inject_hyperparams``) and a schedule's values cannot be checked.

  >>> check_learning_rate(1e-3)
  0.001
  >>> check_learning_rate(-1e-3)
  Traceback (most recent call last):
  ValueError: learning_rate must be finite and >= 0, or a schedule, got learning_rate=-0.001
  """
  value = as_float("learning_rate", learning_rate, schedule_ok=True)
  if value is not None and not (math.isfinite(value) and value >= 0):
    raise ValueError(
      f"learning_rate must be finite and >= 0, or a schedule, got learning_rate={learning_rate!r}"
    )
  return learning_rate


def check_evaluation(evaluation: object) -> Evaluation:
  """Raises unless ``evaluation`` is one of ``'auto'``, ``'merged'``, ``'factored'``."""
  if evaluation not in EVALUATIONS:
    raise ValueError(f"evaluation must be one of {EVALUATIONS}, got evaluation={evaluation!r}")
  return cast(Evaluation, evaluation)  # one of EVALUATIONS, checked above


def lora_scaling(alpha: float | None, rank: int, use_rslora: bool = False) -> float:
  """The LoRA scaling ``s = alpha / rank`` (rsLoRA: ``alpha / sqrt(rank)``).

  ``alpha`` unset (None) means ``alpha = rank``; a given alpha must be
  finite and ``> 0`` (0 or less is refused, not read as unset). Rank-stabilised LoRA
  (Kalajdzievski, 2023), PEFT's ``use_rslora``, divides by ``sqrt(rank)``
  instead of ``rank``.

  Args:
    alpha: the LoRA alpha, or None.
    rank: the LoRA rank.
    use_rslora: divide by ``sqrt(rank)`` (rsLoRA) instead of ``rank``.

  Returns:
    The scaling as a Python float (1.0, or ``sqrt(rank)`` with rsLoRA, when
    alpha defaults to rank).

  >>> lora_scaling(None, 8), lora_scaling(16, 8)
  (1.0, 2.0)
  >>> lora_scaling(0, 8)
  Traceback (most recent call last):
  ValueError: alpha must be a finite number > 0 or None (None: alpha = rank), got alpha=0
  >>> lora_scaling(16, 4, use_rslora=True), lora_scaling(None, 4, use_rslora=True)
  (8.0, 2.0)

  References:
    Kalajdzievski, *A Rank Stabilization Scaling Factor for Fine-Tuning with
    LoRA*, 2023 (arXiv:2312.03732).
  """
  check_rank(rank)
  if not isinstance(use_rslora, bool):
    raise TypeError(f"use_rslora must be a bool, got use_rslora={use_rslora!r}")
  denominator = math.sqrt(rank) if use_rslora else float(rank)
  if alpha is None:
    return rank / denominator
  value = as_float("alpha", alpha)
  if value is None or not (math.isfinite(value) and value > 0):
    raise ValueError(
      f"alpha must be a finite number > 0 or None (None: alpha = rank), got alpha={alpha!r}"
    )
  return value / denominator


# --------------------------------------------------------------------------
# Initialisation.
# --------------------------------------------------------------------------


def lora_a_init(rank: int) -> jax.nn.initializers.Initializer:
  """The seed's initializer for ``A``: N(0, 1/rank), as a JAX initializer.

  >>> a = lora_a_init(4)(jax.random.key(0), (16, 4))
  >>> a.shape
  (16, 4)
  """
  return jax.nn.initializers.normal(stddev=1.0 / math.sqrt(check_rank(rank)))


_seed_a_init = lora_a_init  # what new_adapter's argument of the same name hides


def kaiming_uniform_init(batch_axis: int | tuple[int, ...] = ()) -> jax.nn.initializers.Initializer:
  """PEFT's default initializer of ``A``: Kaiming-uniform with ``a = sqrt(5)``.

  PyTorch's ``kaiming_uniform_(weight, a=sqrt(5))`` on PEFT's ``lora_A``
  weight ``[r, in]`` (``[r, in, *window]`` for a convolution) draws
  ``U(-bound, bound)`` with ``bound = sqrt(6 / ((1 + a^2) fan_in)) =
  1 / sqrt(fan_in)``, ``fan_in`` the input size (times the window). In this
  library's layout ``A [*in, r]`` (``[*window, in, r]``) that fan-in is the
  product of every axis but the last, less the ``batch_axis`` (a stack of
  layers: pass its leading axes).

  >>> a = kaiming_uniform_init()(jax.random.key(0), (16, 4))
  >>> a.shape, bool(jnp.abs(a).max() <= 1 / 4)
  ((16, 4), True)
  """
  return jax.nn.initializers.variance_scaling(
    1.0 / 3.0, "fan_in", "uniform", in_axis=-2, out_axis=-1, batch_axis=batch_axis
  )


def gaussian_init(rank: int) -> jax.nn.initializers.Initializer:
  """PEFT's ``init_lora_weights='gaussian'`` for ``A``: ``N(0, 1/rank^2)`` (std ``1/rank``).

  >>> a = gaussian_init(4)(jax.random.key(0), (4096, 4))
  >>> round(float(a.std()), 2)
  0.25
  """
  return jax.nn.initializers.normal(stddev=1.0 / check_rank(rank))


# --------------------------------------------------------------------------
# Forward.
# --------------------------------------------------------------------------


def new_adapter(
  keys: tuple[jax.Array, jax.Array],
  projection: projections.Projection,
  kernel_shape: Any,
  rank: int,
  dtype: DTypeLike,
  *,
  lora_a_init: jax.nn.initializers.Initializer | None = None,
  lora_b_init: jax.nn.initializers.Initializer = jax.nn.initializers.zeros,
  use_delta: bool = False,
  snapshot: bool = False,
) -> dict[str, jax.Array]:
  """Fresh adapter arrays beside a kernel of ``kernel_shape`` (stacked or not).

  ``lora_a`` from ``keys[0]`` (``lora_a_init``; None is :func:`lora_a_init`,
  the seed's ``N(0, 1/r)``), ``lora_b`` from ``keys[1]`` (zeros by default),
  ``delta`` zeros of the kernel's shape when ``use_delta``, and the paper
  rule's snapshot (``snapshot_a``, ``snapshot_b``: copies of the factors in
  buffers of their own, since a step may donate both) when ``snapshot``.
  Leading stack axes (``nn.scan``, ``nnx.vmap``) give every layer its own
  factors. The one constructor of NNX's adapter and ``adapt_linen``.

  >>> projection = projections.GeneralDense(features=(3,))
  >>> new = new_adapter(tuple(jax.random.split(jax.random.key(0))), projection, (2, 4, 3), 2,
  ...                   jnp.float32, use_delta=True)
  >>> {name: array.shape for name, array in new.items()}
  {'lora_a': (2, 4, 2), 'lora_b': (2, 2, 3), 'delta': (2, 4, 3)}
  """
  shape = tuple(int(n) for n in kernel_shape)
  stack = shape[: len(shape) - projection.kernel_ndim]
  a_shape, b_shape = projection.factor_shapes(shape[len(stack) :], rank)
  a_init = lora_a_init or _seed_a_init(rank)
  arrays = {
    "lora_a": a_init(keys[0], (*stack, *a_shape), dtype),
    "lora_b": lora_b_init(keys[1], (*stack, *b_shape), dtype),
  }
  if use_delta:
    arrays["delta"] = jnp.zeros(shape, dtype)
  if snapshot:
    arrays[SNAPSHOT_A] = jnp.array(arrays["lora_a"], copy=True)
    arrays[SNAPSHOT_B] = jnp.array(arrays["lora_b"], copy=True)
  return arrays


def widest_dtype(*dtypes: DTypeLike | None, at_least: DTypeLike | None = None) -> np.dtype[Any]:
  """The dtype every one of ``dtypes`` (and ``at_least``) promotes to, whatever the promotion mode.

  >>> widest_dtype(jnp.bfloat16, jnp.float32), widest_dtype(jnp.bfloat16, at_least=jnp.float32)
  (dtype('float32'), dtype('float32'))
  """
  given = [d for d in (*dtypes, at_least) if d is not None]
  with jax.numpy_dtype_promotion("standard"):
    return np.dtype(jnp.result_type(*given))


def _projection(
  projection: projections.Projection | None, kernel: ArrayLike
) -> projections.Projection:
  """``projection``, or the dense one (``kernel [in, out]``) when None."""
  if projection is not None:
    return projection
  if jnp.ndim(kernel) != 2:
    raise ValueError(f"kernel must be 2-D [in, out], got kernel.shape={jnp.shape(kernel)}")
  return projections.GeneralDense(features=(int(jnp.shape(kernel)[1]),))


def check_layer_shapes(
  kernel: ArrayLike,
  bias: ArrayLike | None,
  lora_a: ArrayLike,
  lora_b: ArrayLike,
  delta: ArrayLike | None,
  projection: projections.Projection | None = None,
) -> None:
  """Raises ``ValueError`` unless the arrays of one layer have consistent shapes.

  ``D`` has the kernel's shape, ``A`` and ``B`` the shapes of
  ``projection.factor_shapes`` (dense: ``lora_a [in, r]``, ``lora_b [r,
  out]``), the bias ``projection.bias_shape``. Checked here because a wrong
  ``D`` or ``B`` would otherwise broadcast silently.

  >>> check_layer_shapes(jnp.ones((3, 4)), None, jnp.ones((3, 2)), jnp.ones((2, 4)), None)
  >>> check_layer_shapes(jnp.ones((3, 4)), None, jnp.ones((3, 2)), jnp.ones((2, 4)),
  ...                    jnp.ones((3, 1)))
  Traceback (most recent call last):
  ValueError: delta must have shape (3, 4) (the kernel's), got delta.shape=(3, 1)
  """
  projection = _projection(projection, kernel)
  full = tuple(jnp.shape(kernel))
  if len(full) < projection.kernel_ndim:
    raise ValueError(
      f"kernel must have {projection.kernel_ndim} axes for a {projection.name} layer, got "
      f"kernel.shape={full}"
    )
  stack, shape = (
    full[: len(full) - projection.kernel_ndim],
    full[len(full) - projection.kernel_ndim :],
  )
  rank = jnp.shape(lora_a)[-1] if jnp.ndim(lora_a) else 0
  a_shape, b_shape = projection.factor_shapes(shape, rank)
  expected = {
    "bias": (*stack, *projection.bias_shape(shape)),
    "lora_a": (*stack, *a_shape),
    "lora_b": (*stack, *b_shape),
    "delta": full,
  }
  given = {"bias": bias, "lora_a": lora_a, "lora_b": lora_b, "delta": delta}
  notes = {"bias": "the bias", "lora_a": "A", "lora_b": "B", "delta": "the kernel's"}
  if isinstance(projection, projections.GeneralDense) and len(shape) == 2:
    notes.update(bias="[out]", lora_a="[in, r]", lora_b="[r, out]")
  for name, value in given.items():
    if value is not None and tuple(jnp.shape(value)) != tuple(expected[name]):
      raise ValueError(
        f"{name} must have shape {tuple(expected[name])} ({notes[name]}), "
        f"got {name}.shape={jnp.shape(value)}"
      )


def merged_kernel(
  kernel: jax.Array,
  lora_a: jax.Array,
  lora_b: jax.Array,
  delta: jax.Array | None,
  *,
  scaling: float,
  delta_scaling: float,
  precision: jax.lax.PrecisionLike = None,
  projection: projections.Projection | None = None,
  snapshot: Snapshot | None = None,
  paper_lambda: float | None = None,
  kernel_scale: jax.Array | None = None,
) -> jax.Array:
  """The single kernel ``W + s A B + ds D`` that the layer is equivalent to.

  With a ``snapshot`` ``(A^, B^)`` (a layer of the published rule's telescoped
  form, :func:`delta_lora_apply`) it is ``W + s (1 + lambda) A B - lambda s A^ B^``,
  the extra ``lambda`` part under ``stop_gradient`` (so the gradients of
  ``A`` and ``B`` through it are those of ``s A B``, as in the forward).

  Formed in at least float32 (the widest of float32 and the inputs' dtypes),
  so that a small ``D`` or ``A B`` is not rounded away against a bfloat16
  ``W``; cast the result to the dtype you compute or store in.

  Args:
    kernel: base kernel ``W`` (``[in, out]`` for a dense layer).
    lora_a: ``A`` (``[in, r]``).
    lora_b: ``B`` (``[r, out]``).
    delta: ``D`` (the kernel's shape), or None when the layer has no delta.
    scaling: LoRA scaling ``s = alpha / r``.
    delta_scaling: scaling ``ds`` of the delta term.
    precision: precision of the ``A B`` product.
    projection: the layer's product (:mod:`deltalora_jax.projections`); None is
      a dense layer with a 2-D kernel.
    snapshot: ``(A^, B^)``, the snapshot factors (the shapes of ``A`` and
      ``B``), or None.
    paper_lambda: ``lambda``, given exactly when ``snapshot`` is.
    kernel_scale: the scales of a quantized ``kernel`` (:func:`quantize_kernel`:
      int8, or the uint4 codes of NF4), or None for a float kernel; ``W`` is
      then the dequantized kernel (:func:`dequantize`).

  Returns:
    An array of the kernel's shape, in float32 or wider (a quantized base:
    float32, the scales' dtype, with float32 factors).

  >>> w, a, b, d = jnp.eye(2), jnp.ones((2, 1)), jnp.ones((1, 2)), jnp.eye(2)
  >>> merged_kernel(w, a, b, d, scaling=2.0, delta_scaling=0.5)
  Array([[3.5, 2. ],
         [2. , 3.5]], dtype=float32)
  """
  projection = _projection(projection, kernel)
  _check_scale_given(kernel, kernel_scale)
  if kernel_scale is not None:
    kernel = dequantize(kernel, kernel_scale, projection)
  check_layer_shapes(kernel, None, lora_a, lora_b, delta, projection)
  check_snapshot(lora_a, lora_b, snapshot, paper_lambda)
  stack = jnp.ndim(kernel) - projection.kernel_ndim
  if stack > 0:  # a stack of layers (nn.scan, nnx.vmap): merge each
    merge = functools.partial(
      merged_kernel,
      scaling=scaling,
      delta_scaling=delta_scaling,
      precision=precision,
      projection=projection,
      paper_lambda=paper_lambda,
    )

    def merge_one(
      w: jax.Array, a: jax.Array, b: jax.Array, d: jax.Array | None, snap: Snapshot | None
    ) -> jax.Array:
      return merge(w, a, b, d, snapshot=snap)  # vmap passes arrays by position only

    stacked: Any = merge_one
    for _ in range(stack):
      stacked = jax.vmap(stacked)
    merged: jax.Array = stacked(kernel, lora_a, lora_b, delta, snapshot)
    return merged
  parts = (kernel, lora_a, lora_b) + (() if delta is None else (delta,))
  parts += () if snapshot is None else tuple(snapshot)
  wide = widest_dtype(*(p.dtype for p in parts), at_least=jnp.float32)

  def low(a: jax.Array, b: jax.Array) -> jax.Array:
    return projection.lora_kernel(a.astype(wide), b.astype(wide), precision)

  out = kernel.astype(wide) + jnp.asarray(scaling, wide) * low(lora_a, lora_b)
  if delta is not None:
    out = out + jnp.asarray(delta_scaling, wide) * delta.astype(wide)
  if snapshot is not None:
    frozen = low(jax.lax.stop_gradient(lora_a), jax.lax.stop_gradient(lora_b))
    coef = jnp.asarray(paper_lambda, wide) * jnp.asarray(scaling, wide)
    out = out + coef * (frozen - low(*snapshot))
  return out


# --------------------------------------------------------------------------
# A quantized base: int8 weight-only, one float32 scale per output channel;
# or NF4 (QLoRA's), one float32 scale per block of 64 weights along the input.
# --------------------------------------------------------------------------

#: The quantizations a frozen base may have: ``'int8'`` (weight-only, one scale
#: per output channel) and ``'nf4'`` (QLoRA's 4-bit NormalFloat, one scale per
#: block of :data:`NF4_BLOCK` weights along the input; needs qwix).
BASE_QUANTIZATIONS = ("int8", "nf4")
#: The name of the scales beside a quantized ``kernel``.
KERNEL_SCALE = "kernel_scale"
#: The weights of one NF4 block (QLoRA's 64), along the kernel's innermost contracted axis.
NF4_BLOCK = 64
_INT8_MAX = 127
#: The dtype that stores each quantization's kernel: the dtype is the tag.
_STORED = {"int8": np.dtype("int8"), "nf4": np.dtype(jnp.uint4)}


def check_base_quantization(base_quantization: object) -> str | None:
  """Raises unless ``base_quantization`` is None or one of :data:`BASE_QUANTIZATIONS`.

  ``'nf4'`` needs qwix (``pip install qwix``, or the ``nf4`` extra): without
  it, ``ImportError`` here, where the value enters.

  >>> check_base_quantization("int8"), check_base_quantization(None)
  ('int8', None)
  >>> check_base_quantization("int4")
  Traceback (most recent call last):
  ValueError: base_quantization must be None or one of ('int8', 'nf4'), got base_quantization='int4'
  """
  if base_quantization is not None and base_quantization not in BASE_QUANTIZATIONS:
    raise ValueError(
      f"base_quantization must be None or one of {BASE_QUANTIZATIONS}, got "
      f"base_quantization={base_quantization!r}"
    )
  if base_quantization == "nf4":
    _qwix()
  return base_quantization


def base_quantization_of(kernel: ArrayLike) -> str | None:
  """The quantization of a stored base, read from its dtype (None: a float kernel).

  >>> base_quantization_of(jnp.ones(2, jnp.int8)), base_quantization_of(jnp.ones(2, jnp.uint4))
  ('int8', 'nf4')
  """
  dtype = jnp.result_type(kernel)
  return next((name for name, stored in _STORED.items() if stored == dtype), None)


def _described(kernel: ArrayLike) -> str:
  """``'an int8'`` or ``'an nf4'`` (a quantized base), for messages."""
  return f"an {base_quantization_of(kernel) or 'integer'}"


def _qwix() -> Any:
  """qwix, imported when an NF4 base needs it: the library works without it."""
  try:
    return importlib.import_module("qwix")
  except ImportError as error:
    raise ImportError(
      "base_quantization='nf4' needs qwix (QLoRA's NF4 comes from it): pip install qwix, "
      "or the nf4 extra: pip install 'deltalora-jax[nf4]'"
    ) from error


def _channel_plan(
  projection: projections.Projection, ndim: int
) -> tuple[str, str, tuple[int, ...]]:
  """``(kernel letters, scale letters, contracted axes)`` of a kernel of rank ``ndim``.

  The scale has the bias's axes (the output channels) with the stack's leading axes.
  """
  letters, channels = projection.channel_letters()
  stack = ndim - projection.kernel_ndim
  free = [c for c in string.ascii_letters if c not in letters][:stack]
  kernel, scale = "".join(free) + letters, "".join(free) + channels
  return kernel, scale, tuple(i for i, c in enumerate(kernel) if c not in scale)


def _nf4_block_axis(projection: projections.Projection, ndim: int) -> int:
  """The axis NF4's blocks run along: the kernel's innermost contracted (input) axis."""
  return max(_channel_plan(projection, ndim)[2])


def quantize_kernel(
  kernel: jax.Array,
  base_quantization: str = "int8",
  projection: projections.Projection | None = None,
  *,
  layer: str = "the kernel",
) -> tuple[jax.Array, jax.Array]:
  r"""A float kernel as a quantized base: ``(values, scale)`` for ``base_quantization``.

  ``'int8'``: :func:`quantize_int8`, one scale per output channel. ``'nf4'``:
  QLoRA's 4-bit NormalFloat (Dettmers et al., 2023), by ``qwix.quantize``:
  blocks of :data:`NF4_BLOCK` weights along the kernel's innermost contracted
  axis (``in`` of a dense or conv kernel), one float32 abs-max scale per
  block and per index of every other axis, each weight the nearest of the 16
  NF4 levels ``v_k`` of ``[-1, 1]`` times its block's scale:

  .. math::

    s_b = \max_{i \in b} |W_i|, \qquad q_i = \arg\min_k |W_i / s_b - v_k|,
    \qquad |W_i - s_b v_{q_i}| \le s_b \max_k (v_{k+1} - v_k) / 2

  The values are the ``uint4`` level indices (the dtype tags the base as
  NF4); the scale has the kernel's shape with the block axis divided by 64.
  A block axis that 64 does not divide is refused, naming ``layer``. Leading
  stack axes (``nn.scan``, ``nnx.vmap``) are kept: each layer has its own scales.

  Args:
    kernel: the float kernel ``W`` in its layer's layout.
    base_quantization: one of :data:`BASE_QUANTIZATIONS`.
    projection: the layer's product; None is a dense ``[in, out]`` kernel.
    layer: what the kernel is, for the messages (an adapted layer's name).

  Returns:
    ``(values, scale)``: int8 values or uint4 NF4 codes of the kernel's
    shape, and their float32 scales.

  >>> values, scale = quantize_kernel(jnp.ones((128, 3)), "nf4")
  >>> values.dtype, scale.shape, float(dequantize(values, scale)[0, 0])
  (dtype(uint4), (2, 3), 1.0)
  """
  check_base_quantization(base_quantization)
  if base_quantization == "int8":
    return quantize_int8(kernel, projection)
  projection = _projection(projection, kernel)
  _check_floating(kernel)
  check_quantizable(layer, base_quantization, kernel.shape, projection)
  axis = _nf4_block_axis(projection, kernel.ndim)
  wide = widest_dtype(kernel.dtype, at_least=jnp.float32)
  qarray = _qwix().quantize(
    kernel.astype(wide),
    "nf4",
    channelwise_axes=tuple(k for k in range(kernel.ndim) if k != axis),
    tiled_axes={axis: NF4_BLOCK},
    scale_dtype=jnp.float32,
  )
  return qarray.qvalue, qarray.scale


def check_quantizable(
  layer: str,
  base_quantization: str | None,
  shape: tuple[int, ...],
  projection: projections.Projection | None = None,
) -> None:
  """Raises unless a kernel of ``shape`` can have ``base_quantization``, naming ``layer``.

  int8 takes any kernel; NF4 needs its block axis (the innermost contracted
  one) to be a multiple of :data:`NF4_BLOCK`: QLoRA's blocks of 64, no
  ragged block and no silent fallback to another layout.

  >>> check_quantizable("adapted layer 'up'", "nf4", (96, 8))  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ValueError: adapted layer 'up' (kernel shape (96, 8)) cannot have base_quantization='nf4': ...
  """
  if base_quantization != "nf4":
    return
  projection = _projection(projection, np.broadcast_to(np.int8(0), shape))  # a view: no bytes
  axis = _nf4_block_axis(projection, len(shape))
  if shape[axis] % NF4_BLOCK:
    raise ValueError(
      f"{layer} (kernel shape {tuple(shape)}) cannot have base_quantization='nf4': its "
      f"blocks of {NF4_BLOCK} weights run along axis {axis}, of size {shape[axis]}, "
      f"which {NF4_BLOCK} does not divide; leave the layer out, or use 'int8'"
    )


def _check_floating(kernel: jax.Array) -> None:
  if not jnp.issubdtype(kernel.dtype, jnp.floating):
    raise TypeError(f"kernel must be floating to be quantized, got kernel.dtype={kernel.dtype}")


def quantize_int8(
  kernel: jax.Array, projection: projections.Projection | None = None
) -> tuple[jax.Array, jax.Array]:
  r"""Weight-only int8 quantization of a kernel, one scale per output channel.

  Abs-max per output channel (the bias's axes: ``[out]`` of a dense
  ``[in, out]`` kernel, ``features`` of a dense-general one, the kernel's
  output and batch axes of an einsum), rounded to nearest:

  .. math::

    s_j = \max_i |W_{ij}| / 127, \qquad q_{ij} = \mathrm{round}(W_{ij} / s_j)
    \in [-127, 127], \qquad |W_{ij} - s_j q_{ij}| \le s_j / 2

  (an all-zero channel gets ``s_j = 0``, ``q = 0``). Leading stack axes
  (``nn.scan``, ``nnx.vmap``) are kept: each layer has its own scales.

  Args:
    kernel: the float kernel ``W`` in its layer's layout.
    projection: the layer's product; None is a dense ``[in, out]`` kernel.

  Returns:
    ``(values, scale)``: int8 values of the kernel's shape, and float32
    scales shaped ``(*stack, *projection.bias_shape)``.

  >>> values, scale = quantize_int8(jnp.array([[1.0, -0.5], [-2.0, 0.25]]))
  >>> values
  Array([[  64, -127],
         [-127,   64]], dtype=int8)
  >>> scale * 127
  Array([2. , 0.5], dtype=float32)
  """
  projection = _projection(projection, kernel)
  _check_floating(kernel)
  letters, channels, contracted = _channel_plan(projection, kernel.ndim)
  wide = widest_dtype(kernel.dtype, at_least=jnp.float32)
  magnitude = jnp.max(jnp.abs(kernel.astype(wide)), axis=contracted)
  kept = "".join(c for c in letters if c in channels)
  scale = (jnp.einsum(f"{kept}->{channels}", magnitude) / _INT8_MAX).astype(jnp.float32)
  divisor = jnp.where(scale > 0, scale, 1.0).astype(wide)
  ratio = jnp.einsum(f"{letters},{channels}->{letters}", kernel.astype(wide), 1 / divisor)
  values = jnp.clip(jnp.round(ratio), -_INT8_MAX, _INT8_MAX).astype(jnp.int8)
  return values, scale


def dequantize(
  values: jax.Array,
  scale: jax.Array,
  projection: projections.Projection | None = None,
) -> jax.Array:
  """The float kernel of a quantized base, in the scale's dtype (float32).

  An int8 base: ``s_j q_ij``. NF4 (uint4 codes): each code's level times its
  block's scale, by ``qwix.dequantize``.

  >>> w = jnp.array([[1.0, -0.5], [-2.0, 0.25]])
  >>> values, scale = quantize_int8(w)
  >>> bool(jnp.all(jnp.abs(dequantize(values, scale) - w) <= scale[None, :] / 2))
  True
  """
  projection = _projection(projection, values)
  check_quantized_base(values, scale, projection)
  if base_quantization_of(values) == "nf4":
    qwix = _qwix()
    levels: jax.Array = qwix.dequantize(qwix.QArray(qvalue=values, scale=scale, qtype="nf4"))
    return levels
  letters, channels, _ = _channel_plan(projection, values.ndim)
  return jnp.einsum(f"{letters},{channels}->{letters}", values.astype(scale.dtype), scale)


def check_quantized_base(
  kernel: ArrayLike, kernel_scale: ArrayLike, projection: projections.Projection | None = None
) -> None:
  """Raises unless ``kernel`` is a quantized base with a floating ``kernel_scale`` of its shape.

  An int8 kernel has one scale per output channel (the bias's shape, after
  the stack's axes); a uint4 one (NF4) one per block of :data:`NF4_BLOCK`
  along its innermost contracted axis (the kernel's shape, that axis / 64).

  >>> check_quantized_base(jnp.ones((3, 4), jnp.int8), jnp.ones(3))  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ValueError: kernel_scale must have shape (4,) (the output channels of the kernel (3, 4)), got ...
  """
  projection = _projection(projection, kernel)
  quantization = base_quantization_of(kernel)
  if quantization is None:
    raise TypeError(
      "a kernel with a kernel_scale must be int8 (base_quantization='int8') or uint4 (the "
      f"codes of base_quantization='nf4'), got kernel.dtype={jnp.result_type(kernel)}"
    )
  if not jnp.issubdtype(jnp.result_type(kernel_scale), jnp.floating):
    raise TypeError(
      f"kernel_scale must be floating, got kernel_scale.dtype={jnp.result_type(kernel_scale)}"
    )
  full = tuple(jnp.shape(kernel))
  stack = len(full) - projection.kernel_ndim
  expected = (*full[:stack], *projection.bias_shape(full[stack:]))
  what = f"the output channels of the kernel {full}"
  if quantization == "nf4":
    axis = _nf4_block_axis(projection, len(full))
    expected = tuple(n // NF4_BLOCK if k == axis else n for k, n in enumerate(full))
    what = f"one per block of {NF4_BLOCK} along axis {axis} of the NF4 kernel {full}"
    if full[axis] % NF4_BLOCK:
      raise ValueError(f"an NF4 kernel's block axis {axis} must be a multiple of 64, got {full}")
  if tuple(jnp.shape(kernel_scale)) != expected:
    raise ValueError(
      f"kernel_scale must have shape {expected} ({what}), "
      f"got kernel_scale.shape={jnp.shape(kernel_scale)}"
    )


def _check_scale_given(kernel: ArrayLike, kernel_scale: ArrayLike | None) -> None:
  """Raises for an integer kernel without its scales (its values would be read as weights)."""
  if kernel_scale is None and jnp.issubdtype(jnp.result_type(kernel), jnp.integer):
    raise TypeError(
      f"an integer kernel (kernel.dtype={jnp.result_type(kernel)}) is a quantized base: give "
      "its kernel_scale (core.quantize_kernel), or a floating kernel"
    )


def check_writable_kernel(layer: str, kernel: ArrayLike) -> None:
  """Raises unless ``kernel`` can be written: a quantized base is read, never written.

  >>> check_writable_kernel("up", jnp.ones((2, 2), jnp.int8))  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ValueError: adapted layer 'up' has an int8 base...
  """
  if not jnp.issubdtype(jnp.result_type(kernel), jnp.floating):
    raise ValueError(
      f"adapted layer {layer!r} has {_described(kernel)} base (kernel dtype "
      f"{jnp.result_type(kernel)}), "
      "which is read and never written, but the in-place paper rule writes W every step: build "
      "the layer with paper_lambda (the telescoped form, which only reads W)"
    )


def check_snapshot(
  lora_a: ArrayLike,
  lora_b: ArrayLike,
  snapshot: Snapshot | None,
  paper_lambda: float | None,
) -> None:
  """Raises unless ``snapshot`` and ``paper_lambda`` are both None, or a pair shaped as ``A, B``.

  >>> check_snapshot(jnp.ones((3, 2)), jnp.ones((2, 4)), None, None)
  >>> check_snapshot(jnp.ones((3, 2)), jnp.ones((2, 4)), (jnp.ones((3, 2)), jnp.ones((4, 2))), 2.0)
  Traceback (most recent call last):
  ValueError: snapshot_b must have shape (2, 4) (lora_b's), got snapshot_b.shape=(4, 2)
  """
  if (snapshot is None) != (paper_lambda is None):
    raise ValueError(
      "snapshot and paper_lambda go together (a layer of the telescoped paper rule has "
      f"both), got snapshot={'None' if snapshot is None else 'a pair'}, "
      f"paper_lambda={paper_lambda!r}"
    )
  if snapshot is None:
    return
  if not isinstance(snapshot, tuple) or len(snapshot) != 2:
    raise TypeError(f"snapshot must be a pair (snapshot_a, snapshot_b), got {type(snapshot)}")
  for name, factor, value in zip(SNAPSHOT_NAMES, ("lora_a", "lora_b"), snapshot, strict=True):
    expected = jnp.shape(lora_a if factor == "lora_a" else lora_b)
    if jnp.shape(value) != expected:
      raise ValueError(
        f"{name} must have shape {tuple(expected)} ({factor}'s), got "
        f"{name}.shape={jnp.shape(value)}"
      )


def choose_evaluation(
  evaluation: Evaluation, rows: int, rank: int, *, has_delta: bool, base_trainable: bool
) -> Literal["merged", "factored"]:
  """Picks the cheaper way to evaluate the layer, or honours a forced choice.

  One merged kernel costs ``r in out`` flops to form, and its weight gradient
  ``x^T g`` costs ``2 rows in out``. That gradient is needed anyway when ``D``
  exists or the base is trained, so then merging wins as soon as the number
  of rows exceeds the rank. Otherwise (plain LoRA, the paper's rule) the
  separate low-rank products avoid the full weight gradient altogether.

  >>> choose_evaluation("auto", 512, 8, has_delta=True, base_trainable=False)
  'merged'
  >>> choose_evaluation("auto", 512, 8, has_delta=False, base_trainable=False)
  'factored'
  """
  check_evaluation(evaluation)
  if evaluation != "auto":
    return evaluation
  full_gradient_needed = has_delta or base_trainable
  return "merged" if full_gradient_needed and rows > rank else "factored"


def delta_lora_apply(
  x: jax.Array,
  kernel: jax.Array,
  bias: jax.Array | None,
  lora_a: jax.Array,
  lora_b: jax.Array,
  delta: jax.Array | None,
  *,
  scaling: float,
  delta_scaling: float,
  projection: projections.Projection | None = None,
  freeze_base: bool = True,
  evaluation: Evaluation = "auto",
  dtype: DTypeLike | None = None,
  precision: jax.lax.PrecisionLike = None,
  snapshot: Snapshot | None = None,
  paper_lambda: float | None = None,
  kernel_scale: jax.Array | None = None,
) -> jax.Array:
  r"""A Delta-LoRA layer of any kind: ``P(x, W) + b + s P_B(P_A(x, A), B) + ds P(x, D)``.

  ``P`` is the base layer's product (``projection.apply``: a dense,
  dense-general, einsum or convolution product), linear in the kernel, so
  the merged evaluation ``P(x, W + s A B + ds D) + b`` gives the same
  numbers and gradients (up to rounding); see :func:`choose_evaluation`.

  With ``freeze_base`` the base kernel and bias are wrapped in
  ``stop_gradient``: they get a zero gradient and XLA computes none for them.

  The computation dtype is ``dtype``, or else the base layer's own rule
  (Flax's ``promote_dtype`` with ``dtype=None``): the widest dtype of ``x``,
  the kernel and the bias, so a bfloat16 model fed bfloat16 computes and
  returns bfloat16 as it did before it was adapted, whatever the factors' and
  ``D``'s dtype. The factors and ``D`` are cast to it; the merged kernel is
  formed in at least float32, then cast to it.

  With a ``snapshot`` ``(A^, B^)`` and ``paper_lambda`` ``lambda`` (the
  telescoped form of the published rule, :func:`deltalora_jax.paper_delta_lora`),
  the layer adds

  .. math::

    \lambda s\,\big[P_B(P_A(x, \bar A), \bar B) - P_B(P_A(x, \hat A), \hat B)\big],
    \qquad \bar A = \mathrm{sg}(A),\ \bar B = \mathrm{sg}(B)

  (``sg``: ``stop_gradient``): the kernel Algorithm 1 would have written,
  ``W + lambda s (A B - A^ B^)``, with the base only read. The gradients of
  ``A`` and ``B`` stay those of ``s A B``; the snapshot gets none; the input
  gets the whole layer's. Factored, the LoRA path and this term are one
  product at rank ``2 r`` (:func:`telescoped_low_rank`). While ``A^ = A`` and
  ``B^ = B`` the term is zero (its two halves cancel, up to rounding).

  With a ``kernel_scale`` the base is quantized (:func:`quantize_kernel`), read
  and never written (``freeze_base`` must hold). An int8 base: the factored evaluation runs the
  base's product on the int8 values cast to the computation dtype and
  multiplies its output by the per-output-channel scales, ``P(x, q) * s``:
  exactly ``P(x, q * s)`` (the product is linear in the kernel and each scale
  is constant along the contracted axes), at ``rows x out`` multiplies
  instead of ``in x out``, with no dequantized float kernel. The merged
  evaluation (a layer with ``D``) dequantizes into the float32 merged kernel
  it forms anyway. An NF4 base (uint4 codes): its levels are not uniform, so
  the product cannot run on the codes; the factored evaluation dequantizes
  (``qwix.dequantize``, float32) into the computation dtype, then runs the
  base's product; the backward dequantizes again rather than keep the float
  kernel alive from forward to backward, and neither pass dequantizes before
  its layer is reached (one layer's float kernel at a time); the merged
  one dequantizes into its float32 merged kernel. The computation dtype is
  inferred from ``x``, the scales and the bias (the base as it was before
  quantization), not from the stored values.

  Args:
    x: input, with the axes ``projection`` expects.
    kernel: ``W``.
    bias: ``b`` (``projection.bias_shape``) or None.
    lora_a: ``A``, shaped by ``projection.factor_shapes``.
    lora_b: ``B``, shaped by ``projection.factor_shapes``.
    delta: ``D`` (the kernel's shape) or None (no delta term).
    scaling: LoRA scaling ``s``.
    delta_scaling: delta scaling ``ds``.
    projection: the layer's product (:mod:`deltalora_jax.projections`); None is
      the dense product ``x W`` of a kernel ``W [in, out]`` (``A [in, r]``,
      ``B [r, out]``, ``D [in, out]``, ``b [out]``).
    freeze_base: stop the gradient of ``kernel`` and ``bias``.
    evaluation: ``'auto'``, ``'merged'`` or ``'factored'``.
    dtype: computation dtype; None infers it as above.
    precision: ``jax.lax.Precision`` of the products.
    snapshot: ``(A^, B^)`` shaped as ``(A, B)``, or None (no snapshot term).
    paper_lambda: ``lambda``, given exactly when ``snapshot`` is.
    kernel_scale: the scales of a quantized ``kernel`` (:func:`check_quantized_base`
      gives their shape), or None for a float kernel.

  Returns:
    The layer's output.

  >>> from deltalora_jax.projections import Conv
  >>> projection = Conv(features=4, kernel_size=(3,))
  >>> w, a, b = jnp.ones((3, 2, 4)), jnp.ones((3, 2, 1)), jnp.zeros((1, 4))
  >>> delta_lora_apply(jnp.ones((5, 7, 2)), w, None, a, b, jnp.zeros_like(w),
  ...                  projection=projection, scaling=1.0, delta_scaling=0.1).shape
  (5, 7, 4)
  >>> x, w = jnp.ones((3, 2)), jnp.eye(2)  # a dense layer: no projection
  >>> delta_lora_apply(x, w, None, jnp.ones((2, 1)), jnp.zeros((1, 2)), None,
  ...                  scaling=1.0, delta_scaling=0.1).shape
  (3, 2)
  """
  projection = _projection(projection, kernel)
  check_layer_shapes(kernel, bias, lora_a, lora_b, delta, projection)
  check_snapshot(lora_a, lora_b, snapshot, paper_lambda)
  _check_input(x, kernel, projection)
  _check_scale_given(kernel, kernel_scale)
  if kernel_scale is not None:
    _check_quantized_base_frozen(kernel, kernel_scale, projection, freeze_base)
    kernel_scale = jax.lax.stop_gradient(kernel_scale)
  if freeze_base:
    kernel = jax.lax.stop_gradient(kernel)
    bias = None if bias is None else jax.lax.stop_gradient(bias)
  if snapshot is not None:  # written by the optimizer only: no gradient
    snapshot = (jax.lax.stop_gradient(snapshot[0]), jax.lax.stop_gradient(snapshot[1]))
  dtype = _computation_dtype(dtype, x, kernel, bias, kernel_scale)
  how = choose_evaluation(
    evaluation,
    projection.rows(jnp.shape(x)),
    lora_a.shape[-1],
    has_delta=delta is not None,
    base_trainable=not freeze_base,
  )
  x = x.astype(dtype)
  if how == "merged":
    full = merged_kernel(
      kernel,
      lora_a,
      lora_b,
      delta,
      scaling=scaling,
      delta_scaling=delta_scaling,
      precision=precision,
      projection=projection,
      snapshot=snapshot,
      paper_lambda=paper_lambda,
      kernel_scale=kernel_scale,
    )
    y = projection.apply(x, full.astype(dtype), precision)
  else:
    y = _base_product(x, kernel, kernel_scale, projection, precision)
    y = y + _low_rank_term(
      x, lora_a, lora_b, scaling, snapshot, paper_lambda, projection, precision
    )
    if delta is not None:
      y = y + jnp.asarray(delta_scaling, dtype) * projection.apply(
        x, delta.astype(dtype), precision
      )
  if bias is not None:
    y = projection.add_bias(y, bias.astype(dtype))
  return y


def telescoped_low_rank(
  x: jax.Array,
  lora_a: jax.Array,
  lora_b: jax.Array,
  snapshot_a: jax.Array,
  snapshot_b: jax.Array,
  scaling: float,
  paper_lambda: float,
  projection: projections.Projection,
  precision: jax.lax.PrecisionLike = None,
) -> jax.Array:
  r"""A telescoped paper layer's low-rank part, one product at rank ``2 r``.

  .. math::

    s\,\big[P_B(P_A(x, A), B) + \lambda P_B(P_A(x, \bar A), \bar B)
    - \lambda P_B(P_A(x, \hat A), \hat B)\big]
    = s\,P_B\big(P_A(x, [A, \hat A]), [(1 + \lambda) B; -\lambda \hat B]\big)

  with ``sg`` (``\bar A = sg(A)``) on the ``lambda`` part. Its gradients, by a
  custom VJP of that one product: the input's, the whole product's; ``B``'s,
  the first ``r`` rows of the product's (``s P_A(x, A)^T g``, not ``1 + lambda``
  times it); ``A``'s, the first ``r`` columns of the product's divided by
  ``1 + lambda``; the snapshot's, zero. Plain LoRA does one product at rank
  ``r``; spelling the ``sg`` out would take ``3 r``.

  Args:
    x: the input, in the computation dtype.
    lora_a, lora_b: ``A``, ``B``.
    snapshot_a, snapshot_b: ``A^``, ``B^`` (shaped as ``A``, ``B``).
    scaling: ``s``.
    paper_lambda: ``lambda`` (``>= 0``).
    projection: the layer's product (:mod:`deltalora_jax.projections`).
    precision: ``jax.lax.Precision`` of the products.

  Returns:
    The term, shaped as the layer's output.

  >>> x, a, b = jnp.ones((2, 3)), jnp.ones((3, 1)), jnp.ones((1, 4))
  >>> dense = projections.GeneralDense(features=(4,))
  >>> telescoped_low_rank(x, a, b, a, 0 * b, 0.5, 2.0, dense)[0]  # 0.5 * 3 * 3
  Array([4.5, 4.5, 4.5, 4.5], dtype=float32)
  >>> jax.grad(lambda b: telescoped_low_rank(x, a, b, a, b, 0.5, 2.0, dense).sum())(b)
  Array([[3., 3., 3., 3.]], dtype=float32)
  """
  axis = projection.rank_axis_of_b() % lora_b.ndim
  rank = lora_a.shape[-1]

  def pair(
    a: jax.Array, b: jax.Array, a_hat: jax.Array, b_hat: jax.Array
  ) -> tuple[jax.Array, jax.Array]:
    lam = jnp.asarray(paper_lambda, b.dtype)
    return jnp.concatenate([a, a_hat], -1), jnp.concatenate([(1 + lam) * b, -lam * b_hat], axis)

  def product(x: jax.Array, a2: jax.Array, b2: jax.Array) -> jax.Array:
    hidden = projection.lora_in(x, a2, precision)
    return jnp.asarray(scaling, x.dtype) * projection.lora_out(hidden, b2, precision)

  @jax.custom_vjp
  def term(x: jax.Array, a: jax.Array, b: jax.Array, a_hat: jax.Array, b_hat: jax.Array) -> Any:
    return product(x, *pair(a, b, a_hat, b_hat))

  def forward(x: jax.Array, a: jax.Array, b: jax.Array, a_hat: jax.Array, b_hat: jax.Array) -> Any:
    y, vjp = jax.vjp(product, x, *pair(a, b, a_hat, b_hat))
    return y, (vjp, a_hat, b_hat)

  def backward(saved: Any, g: jax.Array) -> tuple[jax.Array, ...]:
    vjp, a_hat, b_hat = saved
    dx, da, db = vjp(g)
    da = da[..., :rank] / (1 + jnp.asarray(paper_lambda, da.dtype))
    db = jax.lax.slice_in_dim(db, 0, rank, axis=axis)
    return dx, da, db, jnp.zeros_like(a_hat), jnp.zeros_like(b_hat)

  term.defvjp(forward, backward)
  return term(x, lora_a, lora_b, snapshot_a, snapshot_b)  # type: ignore[no-any-return]


def _check_quantized_base_frozen(
  kernel: ArrayLike, kernel_scale: ArrayLike, projection: projections.Projection, freeze_base: bool
) -> None:
  """Raises unless a quantized ``kernel`` with its ``kernel_scale`` is a frozen base."""
  check_quantized_base(kernel, kernel_scale, projection)
  if not freeze_base:
    raise ValueError(
      f"{_described(kernel)} base (a kernel with a kernel_scale) is read, never trained: it needs "
      "freeze_base=True, got freeze_base=False"
    )


def _computation_dtype(
  dtype: DTypeLike | None,
  x: jax.Array,
  kernel: jax.Array,
  bias: jax.Array | None,
  kernel_scale: jax.Array | None,
) -> np.dtype[Any]:
  """``dtype``, or the base layer's rule: the widest of ``x``, the kernel and the bias.

  A quantized base counts as its scales' dtype (the base as it was before
  quantization). Raises ``TypeError`` unless the result is floating.
  """
  stored = kernel if kernel_scale is None else kernel_scale
  base = [x, stored] + ([] if bias is None else [bias])  # what the base layer promotes
  chosen = jnp.dtype(dtype) if dtype is not None else widest_dtype(*(p.dtype for p in base))
  if not jnp.issubdtype(chosen, jnp.inexact):
    raise TypeError(
      f"dtype (the computation dtype) must be floating: set a floating dtype, or give x "
      f"or the kernel one; got dtype={chosen} with x.dtype={x.dtype}, "
      f"kernel.dtype={kernel.dtype}"
    )
  return chosen


def _base_product(
  x: jax.Array,
  kernel: jax.Array,
  kernel_scale: jax.Array | None,
  projection: projections.Projection,
  precision: jax.lax.PrecisionLike,
) -> jax.Array:
  """``P(x, W)`` in ``x``'s dtype; int8: ``P(x, q) * s``; NF4: ``P(x, W)`` on the dequantized W."""
  if kernel_scale is not None and base_quantization_of(kernel) == "nf4":
    return _dequantized_product(x, kernel, kernel_scale, projection, precision)
  y = projection.apply(x, kernel.astype(x.dtype), precision)
  if kernel_scale is not None:  # P(x, q * s) = P(x, q) * s: s is per output channel
    y = projection.scale_output(y, kernel_scale.astype(x.dtype))
  return y


def _dequantized_product(
  x: jax.Array,
  codes: jax.Array,
  scale: jax.Array,
  projection: projections.Projection,
  precision: jax.lax.PrecisionLike,
) -> jax.Array:
  """``P(x, W)`` of a frozen NF4 base, ``W`` dequantized in ``x``'s dtype just when it is used.

  Forward and backward each dequantize ``W`` again, each tied to what needs
  it (``x``; the output's cotangent), so that XLA can neither keep ``W`` from
  forward to backward nor dequantize every layer's kernel up front: one
  layer's float kernel is alive at a time (measured: four 1024 x 1024 layers
  hold 4 MiB of dequantized kernel at the peak, not 16). The tie is an
  optimization barrier and, because XLA's CPU pipeline drops barriers before
  it schedules, a data dependence: the scales plus ``0 * t`` for one finite
  element ``t`` of ``x`` (``0`` when it is not finite), which XLA cannot fold
  (``0 * t`` is not ``0`` for every float) and which adds exactly zero. The
  base gets no gradient; ``x`` gets ``P^T(g, W)``.
  """
  x_shape = jax.ShapeDtypeStruct(x.shape, x.dtype)

  def dequantized(after: jax.Array, codes: jax.Array, scale: jax.Array) -> Any:
    tied = (after, codes, scale)
    after, codes, scale = jax.lax.optimization_barrier(tied)  # type: ignore[no-untyped-call]
    if after.size:
      first = jax.lax.stop_gradient(after).ravel()[0].astype(scale.dtype)
      scale = scale + jnp.zeros((), scale.dtype) * jnp.where(jnp.isfinite(first), first, 0)
    return after, dequantize(codes, scale, projection).astype(x.dtype)

  @jax.custom_vjp
  def product(x: jax.Array, codes: jax.Array, scale: jax.Array) -> jax.Array:
    x, kernel = dequantized(x, codes, scale)
    return projection.apply(x, kernel, precision)

  def forward(x: jax.Array, codes: jax.Array, scale: jax.Array) -> Any:
    return product(x, codes, scale), (codes, scale)

  def backward(saved: Any, g: jax.Array) -> tuple[jax.Array, None, None]:
    g, kernel = dequantized(g, *saved)
    transpose = jax.linear_transpose(lambda t: projection.apply(t, kernel, precision), x_shape)
    (dx,) = transpose(g)
    return dx, None, None

  product.defvjp(forward, backward)
  result: jax.Array = product(x, codes, scale)
  return result


def _low_rank_term(
  x: jax.Array,
  lora_a: jax.Array,
  lora_b: jax.Array,
  scaling: float,
  snapshot: Snapshot | None,
  paper_lambda: float | None,
  projection: projections.Projection,
  precision: jax.lax.PrecisionLike,
) -> jax.Array:
  """``s P_B(P_A(x, A), B)`` in ``x``'s dtype; with a snapshot, the telescoped term too.

  A layer with a snapshot computes both in one product (:func:`telescoped_low_rank`).
  """
  dtype = x.dtype
  if snapshot is not None:
    a, b, a_hat, b_hat = (f.astype(dtype) for f in (lora_a, lora_b, *snapshot))
    lam = 0.0 if paper_lambda is None else paper_lambda
    return telescoped_low_rank(x, a, b, a_hat, b_hat, scaling, lam, projection, precision)
  hidden = projection.lora_in(x, lora_a.astype(dtype), precision)
  return jnp.asarray(scaling, dtype) * projection.lora_out(hidden, lora_b.astype(dtype), precision)


def _check_input(x: ArrayLike, kernel: ArrayLike, projection: projections.Projection) -> None:
  """Raises ``ValueError`` unless ``x`` fits the kernel (an einsum checks its own operands)."""
  if isinstance(projection, projections.Einsum):
    return
  shape = tuple(jnp.shape(kernel))
  if isinstance(projection, projections.GeneralDense) and projection.axis == (-1,):
    if jnp.ndim(x) == 0 or jnp.shape(x)[-1] != shape[0]:
      raise ValueError(
        f"x must have {shape[0]} input features (kernel {shape}), got x.shape={jnp.shape(x)}"
      )
    return
  expected = projection.kernel_shape(jnp.shape(x)) if jnp.ndim(x) else None
  if expected != shape:
    raise ValueError(
      f"x must fit the kernel {shape} of this {projection.name} layer (which expects a "
      f"kernel {expected} for this input), got x.shape={jnp.shape(x)}"
    )


class LayerSettings(Protocol):
  """What :func:`delta_lora_layer` reads of an adapted layer (the Linen and NNX layers have it)."""

  @property
  def projection(self) -> projections.Projection: ...
  @property
  def scaling(self) -> float: ...
  @property
  def delta_scaling(self) -> float: ...
  @property
  def freeze_base(self) -> bool: ...
  @property
  def evaluation(self) -> Evaluation: ...
  @property
  def dtype(self) -> DTypeLike | None: ...
  @property
  def precision(self) -> jax.lax.PrecisionLike: ...
  @property
  def paper_lambda(self) -> float | None: ...


#: ``(kernel, bias, lora_a, lora_b, delta)`` of a layer; bias and ``D`` may be None.
LayerArrays = tuple[jax.Array, jax.Array | None, jax.Array, jax.Array, jax.Array | None]


def delta_lora_layer(
  layer: LayerSettings,
  x: jax.Array,
  arrays: LayerArrays,
  snapshot: Snapshot | None = None,
  kernel_scale: jax.Array | None = None,
) -> jax.Array:
  """:func:`delta_lora_apply` with the settings of an adapted ``layer``.

  ``layer`` is any object with the attributes ``projection``, ``scaling``,
  ``delta_scaling``, ``freeze_base``, ``evaluation``, ``dtype``,
  ``precision`` and ``paper_lambda``: the Linen and NNX layers of this
  library call it with their own ``(kernel, bias, lora_a, lora_b, delta)``
  and, when ``paper_lambda`` is set, their snapshot ``(A^, B^)``; a quantized
  base comes with its ``kernel_scale``.
  """
  paper_lambda = layer.paper_lambda
  if (snapshot is None) != (paper_lambda is None):
    raise ValueError(
      f"a layer with paper_lambda={paper_lambda!r} needs its snapshot (snapshot_a, "
      "snapshot_b), and a layer without paper_lambda has none"
    )
  return delta_lora_apply(
    x,
    *arrays,
    projection=layer.projection,
    scaling=layer.scaling,
    delta_scaling=layer.delta_scaling,
    freeze_base=layer.freeze_base,
    evaluation=layer.evaluation,
    dtype=layer.dtype,
    precision=layer.precision,
    snapshot=snapshot,
    paper_lambda=paper_lambda,
    kernel_scale=kernel_scale,
  )


def lora_product_norm(
  lora_a: jax.Array,
  lora_b: jax.Array,
  scaling: float,
  projection: projections.Projection | None = None,
) -> jax.Array:
  """Frobenius norm of ``s A B`` without forming the full-size product.

  Uses ``||A B||_F^2 = sum((A^T A) * (B B^T))``, two ``r x r`` matrices, for
  factors ``A [..., r]`` and ``B [r, ...]``; an einsum kind with batch axes
  forms the product instead.

  >>> a, b = jnp.ones((3, 1)), jnp.ones((1, 4))
  >>> float(lora_product_norm(a, b, 2.0))  # ||2 * ones(3, 4)||_F = 2 sqrt(12)
  6.928...
  """
  if projection is not None and projection.rank_axis_of_b() != 0:
    full = projection.lora_kernel(lora_a, lora_b)
    norm: jax.Array = jnp.linalg.norm(jnp.ravel(full))  # jax types norm's result as Any
    return jnp.abs(scaling) * norm
  a = jnp.reshape(lora_a, (-1, lora_a.shape[-1]))
  b = jnp.reshape(lora_b, (lora_b.shape[0], -1))
  gram_a = a.T @ a
  gram_b = b @ b.T
  return jnp.abs(scaling) * jnp.sqrt(jnp.maximum(jnp.sum(gram_a * gram_b), 0.0))
