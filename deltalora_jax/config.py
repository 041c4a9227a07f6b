"""One adapted layer's configuration: its kind and LoRA options, with one JSON encoding.

:class:`LayerConfig` is what every part of the library needs to know about
an adapted layer besides its arrays: the optimizers (which layers train
their base, each layer's scaling), merging, adapter files and checkpoints.
Each layer class gives its own as ``layer.config``; :func:`layer_configs`
collects them from a model. :meth:`LayerConfig.to_json` is the one encoding
written to adapter files and checkpoints, :meth:`LayerConfig.from_json`
reads it back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol, Required, TypedDict

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import DTypeLike

from deltalora_jax import core, paths, projections


class Options(TypedDict, total=False):
  """The options an adapter is built with: :func:`~deltalora_jax.adapt_nnx`'s ``**options``.

  The LoRA options of :class:`LayerConfig` (all but ``projection`` and
  ``use_bias``, which come from the base layer) and ``lora_a_init``, the
  initializer of ``A`` (None: the seed's ``N(0, 1/r)``; PEFT's are
  :func:`~deltalora_jax.core.kaiming_uniform_init` and
  :func:`~deltalora_jax.core.gaussian_init`). The defaults are the layers' own.
  """

  rank: Required[int]
  alpha: float | None
  delta_scaling: float
  freeze_base: bool
  use_delta: bool
  evaluation: core.Evaluation
  adapter_dtype: Any
  use_rslora: bool
  paper_lambda: float | None
  lora_a_init: Any


#: The options a :class:`LayerConfig` records (an initializer is not saved).
RECORDED_OPTIONS = tuple(name for name in Options.__annotations__ if name != "lora_a_init")


def dtype_name(dtype: Any) -> str | None:
  """The name of an adapter's floating dtype (``'bfloat16'``), None for None.

  The one check of ``adapter_dtype``: ``A`` is drawn at random and ``D``
  takes small steps, which an integer dtype cannot hold.

  >>> dtype_name(jnp.bfloat16), dtype_name(None)
  ('bfloat16', None)
  >>> dtype_name("int32")
  Traceback (most recent call last):
  TypeError: adapter_dtype must be a floating dtype (...) or None, got adapter_dtype='int32'
  """
  if dtype is None:
    return None
  allowed = "a floating dtype (float16, bfloat16, float32, float64) or None"
  try:
    checked = jnp.dtype(dtype)
  except TypeError:
    raise TypeError(f"adapter_dtype must be {allowed}, got adapter_dtype={dtype!r}") from None
  if not jnp.issubdtype(checked, jnp.floating):
    raise TypeError(f"adapter_dtype must be {allowed}, got adapter_dtype={dtype!r}")
  return str(checked.name)


@dataclasses.dataclass(frozen=True)
class LayerConfig:
  """The configuration of one adapted layer (checked at construction).

  Attributes:
    projection: the base layer's product (:mod:`deltalora_jax.projections`).
    rank: LoRA rank ``r > 0``.
    alpha: LoRA alpha, finite and ``> 0``; None means ``alpha = r``.
    delta_scaling: ``ds``, finite and ``> 0``.
    freeze_base: the base kernel and bias get no gradient.
    use_bias: whether the base layer has a bias.
    use_delta: the layer has ``D`` (the seed's rule); False is plain LoRA.
    evaluation: ``'auto'``, ``'merged'`` or ``'factored'``.
    adapter_dtype: dtype name of ``A``, ``B`` and ``D``, or None (at least
      float32, :func:`deltalora_jax.config.adapter_dtype`).
    use_rslora: rank-stabilised scaling ``s = alpha / sqrt(rank)`` (PEFT's
      ``use_rslora``); :meth:`to_json` writes it only when True, so the JSON
      of a layer without it is as before.
    paper_lambda: the published rule's ``lambda`` (finite, ``>= 0``) for the
      telescoped form of :func:`~deltalora_jax.paper_delta_lora`, which never
      writes the base kernel: the layer gets the snapshot factors
      ``snapshot_a``, ``snapshot_b`` and its forward adds
      ``lambda s (A B - A^ B^)`` (:func:`~deltalora_jax.core.delta_lora_apply`).
      None (the default) is a layer without snapshot. Needs ``use_delta=False``;
      :meth:`to_json` writes it only when set.

  Example:
    >>> from deltalora_jax.projections import GeneralDense
    >>> config = LayerConfig(GeneralDense(features=(8,)), rank=2, alpha=4.0)
    >>> config.scaling
    2.0
    >>> LayerConfig.from_json(config.to_json()) == config
    True
  """

  projection: projections.Projection
  rank: int
  alpha: float | None = None
  delta_scaling: float = 0.1
  freeze_base: bool = True
  use_bias: bool = True
  use_delta: bool = True
  evaluation: core.Evaluation = "auto"
  adapter_dtype: str | None = None
  use_rslora: bool = False
  paper_lambda: float | None = None

  def __post_init__(self) -> None:
    if not isinstance(
      self.projection, projections.GeneralDense | projections.Einsum | projections.Conv
    ):
      raise TypeError(
        "projection must be a deltalora_jax.projections GeneralDense, Einsum or Conv, "
        f"got projection={self.projection!r}"
      )
    core.check_rank(self.rank)
    core.lora_scaling(self.alpha, self.rank, core.check_bool("use_rslora", self.use_rslora))
    core.check_delta_scaling(self.delta_scaling)
    core.check_evaluation(self.evaluation)
    for field in ("freeze_base", "use_bias", "use_delta"):
      core.check_bool(field, getattr(self, field))
    set_ = object.__setattr__  # a frozen dataclass normalises its own fields
    set_(self, "rank", int(self.rank))
    set_(self, "alpha", None if self.alpha is None else float(self.alpha))
    set_(self, "delta_scaling", float(self.delta_scaling))
    set_(self, "adapter_dtype", dtype_name(self.adapter_dtype))
    set_(self, "paper_lambda", core.check_paper_lambda(self.paper_lambda, self.use_delta))

  @property
  def scaling(self) -> float:
    """The LoRA scaling ``s = alpha / rank`` (``alpha / sqrt(rank)`` with ``use_rslora``)."""
    return core.lora_scaling(self.alpha, self.rank, self.use_rslora)

  def options(self) -> dict[str, Any]:
    """The LoRA options (:data:`RECORDED_OPTIONS`) as keyword arguments of a layer."""
    return {name: getattr(self, name) for name in RECORDED_OPTIONS}

  def to_json(self) -> dict[str, Any]:
    """Plain JSON data: the projection as :func:`~deltalora_jax.projections.to_json`."""
    data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    data["projection"] = projections.to_json(self.projection)
    if not self.use_rslora:  # the JSON of a layer without rsLoRA is as it was before it
      del data["use_rslora"]
    if self.paper_lambda is None:  # nor that of a layer without snapshot
      del data["paper_lambda"]
    return data

  @classmethod
  def from_json(cls, data: Mapping[str, Any], *, where: str = "layer config") -> LayerConfig:
    """The config that :meth:`to_json` wrote; ``where`` names it in errors."""
    if not isinstance(data, Mapping):
      raise TypeError(f"{where} must be a JSON object, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    required = {"projection", "rank"}
    if missing := sorted(required - set(data)):
      raise ValueError(f"{where} lacks {missing}; it has {sorted(data)}")
    if unknown := sorted(set(data) - known):
      raise ValueError(f"{where} has unknown fields {unknown}; the fields are {sorted(known)}")
    values = dict(data)
    values["projection"] = projections.from_json(dict(data["projection"]))
    return cls(**values)


def layer_configs(layers: Any) -> dict[paths.Path, LayerConfig]:
  """The config of every adapted layer, by path.

  Args:
    layers: an NNX model, a Linen layers mapping ``{name: layer}`` (from
      :func:`deltalora_jax.adapted_layers`), or a
      :class:`~deltalora_jax.DeltaLoRAModel` (its ``layers``).

  Returns:
    ``{path: LayerConfig}``, paths as tuples of strings (:data:`deltalora_jax.paths.Path`,
    the library's inner form, which looks up variables trees), sorted for NNX and in the
    mapping's order for Linen. Every public function gives a layer by its name
    ``'a/b'`` instead (:func:`deltalora_jax.adapted_layers`).

  Raises:
    TypeError: for anything else, or a mapping entry that is not an adapted layer.
    ValueError: when there is no adapted layer.

  Example:
    >>> from flax import nnx
    >>> from deltalora_jax.nnx import DeltaLoRALinear
    >>> configs = layer_configs(DeltaLoRALinear(4, 3, rank=2, rngs=nnx.Rngs(0)))
    >>> list(configs), configs[()].rank
    ([()], 2)
  """
  if isinstance(layers, nnx.Module):
    found = {
      paths.as_path(path): config
      for path, module in nnx.iter_modules(layers)
      if isinstance(config := getattr(module, "config", None), LayerConfig)
    }
    where = f"model {type(layers).__name__}"
  elif isinstance(getattr(layers, "layers", None), Mapping):  # a DeltaLoRAModel
    return layer_configs(layers.layers)
  elif isinstance(layers, Mapping):
    found = {}
    for path, layer in layers.items():
      config = getattr(layer, "config", None)
      if not isinstance(config, LayerConfig):
        raise TypeError(
          f"layers[{path!r}] must be an adapted layer (DeltaLoRADense, DeltaLoRAGeneral, "
          f"DeltaLoRALinear, DeltaLoRALinearGeneral), got {type(layer).__name__}"
        )
      found[paths.as_path(path)] = config
    where = "layers"
  else:
    raise TypeError(
      "layers must be an NNX model, a Linen layers mapping {name: layer} "
      f"(deltalora_jax.adapted_layers(model, x)) or a DeltaLoRAModel, got {type(layers).__name__}"
    )
  if not found:
    raise ValueError(f"{where} has no adapted layer")
  return found


def adapter_dtype(adapter_dtype: DTypeLike | None, param_dtype: DTypeLike) -> np.dtype[Any]:
  """The dtype of ``A``, ``B`` and ``D``: ``adapter_dtype``, or at least float32.

  By default the factors and ``D`` are float32 (float64 beside a float64
  kernel) whatever the kernel's dtype: a bfloat16 ``D`` would round away
  the small steps the delta rule takes.

  >>> adapter_dtype(None, jnp.bfloat16), adapter_dtype(jnp.bfloat16, jnp.bfloat16)
  (dtype('float32'), dtype(bfloat16))
  """
  if adapter_dtype is not None:
    return jnp.dtype(dtype_name(adapter_dtype))  # a floating dtype, or a TypeError naming it
  return core.widest_dtype(param_dtype, at_least=jnp.float32)


class _Options(Protocol):
  """The attributes of an adapted layer that its :class:`ConfigMixin` properties read."""

  @property
  def rank(self) -> int: ...
  @property
  def alpha(self) -> float | None: ...
  @property
  def use_rslora(self) -> bool: ...


class ConfigMixin:
  """``scaling`` and ``config`` of an adapted layer (Linen or NNX), read from its attributes.

  The layer's attributes carry the names of the
  :class:`~deltalora_jax.config.LayerConfig` fields (``projection``,
  ``rank``, ``alpha``, ...), so ``config`` is built the same way for every
  layer class.
  """

  @property
  def scaling(self: _Options) -> float:
    """The LoRA scaling ``s = alpha / rank`` (``alpha / sqrt(rank)`` with ``use_rslora``)."""
    return core.lora_scaling(self.alpha, self.rank, self.use_rslora)

  @property
  def config(self) -> LayerConfig:
    """The layer's :class:`~deltalora_jax.config.LayerConfig` (which checks the options)."""
    return LayerConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LayerConfig)})
