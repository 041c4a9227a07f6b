"""Flax Linen front end: :class:`DeltaLoRADense`, a drop-in for ``nn.Dense``."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from deltalora_jax import core

DELTA_COLLECTION = "delta"


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
    param_dtype: dtype of all parameters, ``D`` included.
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

  def __post_init__(self):
    core.check_features("features", self.features)
    core.check_rank(self.rank, out_features=self.features)
    core.lora_scaling(self.alpha, self.rank)
    core.check_delta_scaling(self.delta_scaling)
    core.check_evaluation(self.evaluation)
    for name in ("freeze_base", "use_bias", "use_delta"):
      if not isinstance(getattr(self, name), bool):
        raise TypeError(f"{name} must be a bool, got {name}={getattr(self, name)!r}")
    super().__post_init__()

  @property
  def scaling(self) -> float:
    """The LoRA scaling ``s = alpha / rank``."""
    return core.lora_scaling(self.alpha, self.rank)

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
    if (
      self.use_delta
      and not self.is_initializing()
      and not self.has_variable(DELTA_COLLECTION, "delta")
    ):
      raise ValueError(
        f"{self.__class__.__name__} at {'/'.join(self.path) or '<root>'} needs the "
        f"'{DELTA_COLLECTION}' collection: apply with the whole variables of "
        "model.init(...), not only variables['params']"
      )
    shape = (in_features, self.features)
    kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
    bias = (
      self.param("bias", self.bias_init, (self.features,), self.param_dtype)
      if self.use_bias
      else None
    )
    a_init = self.lora_a_init or core.lora_a_init(self.rank)
    lora_a = self.param("lora_a", a_init, (in_features, self.rank), self.param_dtype)
    lora_b = self.param("lora_b", self.lora_b_init, (self.rank, self.features), self.param_dtype)
    delta = None
    if self.use_delta:
      delta = self.variable(DELTA_COLLECTION, "delta", jnp.zeros, shape, self.param_dtype).value
    return core.delta_lora_dense(
      inputs,
      kernel,
      bias,
      lora_a,
      lora_b,
      delta,
      scaling=self.scaling,
      delta_scaling=self.delta_scaling,
      freeze_base=self.freeze_base,
      evaluation=self.evaluation,
      dtype=self.dtype,
      precision=self.precision,
    )
