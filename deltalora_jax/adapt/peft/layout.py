"""The PEFT LoRA format: its file and field names, and the layouts of each layer kind.

Shared by :mod:`~deltalora_jax.adapt.peft.export` (writing) and
:mod:`~deltalora_jax.adapt.peft.load` (reading); the layouts are in the
docstring of :mod:`deltalora_jax.adapt.peft`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from deltalora_jax import projections

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
MERGED_FILE = "model.safetensors"
PREFIX = "base_model.model."
RULES = ("lora", "paper", "seed")

#: A layer's PyTorch module name, or the names of the parts of a fused kernel
#: (tunix's ``kv_einsum``: ``("k_proj", "v_proj")``).
ModuleName = str | Sequence[str]
ModuleNames = Mapping[str, ModuleName] | Callable[[str], ModuleName | None]
Rule = Literal["lora", "paper", "seed"]

#: The ``LoraConfig`` fields PEFT writes, with its defaults (those every PEFT
#: release since 0.9 reads); :func:`save_peft` fills in the others.
LORA_CONFIG_DEFAULTS: dict[str, Any] = {
  "alpha_pattern": {},
  "auto_mapping": None,
  "base_model_name_or_path": None,
  "bias": "none",
  "fan_in_fan_out": False,
  "inference_mode": True,
  "init_lora_weights": True,
  "layer_replication": None,
  "layers_pattern": None,
  "layers_to_transform": None,
  "loftq_config": {},
  "lora_alpha": 8,
  "lora_dropout": 0.0,
  "megatron_config": None,
  "megatron_core": "megatron.core",
  "modules_to_save": None,
  "peft_type": "LORA",
  "r": 8,
  "rank_pattern": {},
  "revision": None,
  "target_modules": None,
  "task_type": None,
  "use_dora": False,
  "use_rslora": False,
}

#: Fields whose non-default value this library cannot honour: ``{field: allowed}``.
UNSUPPORTED = {
  "use_dora": (False, None),
  "lora_bias": (False, None),
  "bias": ("none", None),
  "fan_in_fan_out": (False, None),
  "modules_to_save": (None, ()),
  "layer_replication": (None, ()),
  "layers_to_transform": (None, ()),
  "layers_pattern": (None, ()),  # PEFT reads it only with layers_to_transform
  "trainable_token_indices": (None, ()),
  "target_parameters": (None, ()),
}


# --------------------------------------------------------------------------
# Layouts: a layer's kernel and factors as matrices, and PyTorch's weights.
# --------------------------------------------------------------------------


def einsum_axes(projection: projections.Einsum) -> tuple[list[int], list[int], list[int]]:
  """``(batch, contracted, output)`` positions of the kernel's axes of an Einsum."""
  lhs, rhs = projection.equation.split("->")[0].split(",")
  out = projection.equation.split("->")[1]
  batch = [i for i, c in enumerate(rhs) if c in lhs and c in out]
  inner = [i for i, c in enumerate(rhs) if c in lhs and c not in out]
  outer = [i for i, c in enumerate(rhs) if c in out and c not in lhs]
  return batch, inner, outer


def check_layer(name: str, projection: projections.Projection, kernel_shape: Sequence[int]) -> None:
  """Raises unless the layer at ``name`` is one PEFT module (not stacked, no batch axes)."""
  stack = len(kernel_shape) - projection.kernel_ndim
  if stack:
    raise ValueError(
      f"the layer {name!r} is a stack of {tuple(kernel_shape[:stack])} layers (nn.scan, "
      "nnx.vmap); a PEFT file holds one PyTorch module per layer: unstack it first"
    )
  if isinstance(projection, projections.Einsum) and einsum_axes(projection)[0]:
    raise ValueError(
      f"the layer {name!r} is an Einsum {projection.equation!r} with batch axes (factors per "
      "index); "
      "PEFT has no such module: only Linear-like Einsums (no batch axis) are written"
    )
  if isinstance(projection, projections.Conv) and len(projection.kernel_size) > 3:
    raise ValueError(
      f"the layer {name!r} is a {len(projection.kernel_size)}-D Conv; PyTorch has 1-3-D"
    )


def matrix(projection: projections.Projection, kernel: Any) -> np.ndarray:
  """A kernel (or ``D``) as the matrix ``[prod(in), prod(out)]`` the factors multiply to."""
  kernel = np.asarray(kernel, np.float64)
  if isinstance(projection, projections.Einsum):
    _, inner, outer = einsum_axes(projection)
    kernel = np.transpose(kernel, inner + outer)
    n_in = len(inner)
  elif isinstance(projection, projections.Conv):
    n_in = kernel.ndim - 1
  else:
    n_in = kernel.ndim - len(projection.features)
  return np.reshape(kernel, (math.prod(kernel.shape[:n_in]), -1))


def unmatrix(
  projection: projections.Projection, matrix: np.ndarray, shape: Sequence[int]
) -> np.ndarray:
  """The kernel of :func:`matrix`'s ``matrix``: its inverse."""
  if not isinstance(projection, projections.Einsum):
    return np.reshape(matrix, tuple(shape))
  _, inner, outer = einsum_axes(projection)
  order = inner + outer
  permuted = np.reshape(matrix, tuple(shape[i] for i in order))
  return np.transpose(permuted, np.argsort(order))


def torch_factors(
  projection: projections.Projection, lora_a: np.ndarray, lora_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """``(lora_A.weight, lora_B.weight)`` of this library's ``A``, ``B`` (one layer)."""
  rank = lora_a.shape[-1]
  if isinstance(projection, projections.Conv):
    n = len(projection.kernel_size)
    a = np.transpose(lora_a, (n + 1, n, *range(n)))
    b = np.reshape(np.transpose(lora_b), (lora_b.shape[1], rank, *(1,) * n))
    return a, b
  return np.reshape(lora_a, (-1, rank)).T, np.reshape(lora_b, (rank, -1)).T


def flax_factors(
  projection: projections.Projection,
  kernel_shape: Sequence[int],
  weight_a: np.ndarray,
  weight_b: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
  """``(A, B)`` in this library's layout from PEFT's ``lora_A``/``lora_B`` weights."""
  rank = weight_a.shape[0]
  a_shape, b_shape = projection.factor_shapes(tuple(kernel_shape), rank)
  if isinstance(projection, projections.Conv):
    n = len(projection.kernel_size)
    a = np.transpose(weight_a, (*range(2, n + 2), 1, 0))
    b = np.transpose(np.reshape(weight_b, weight_b.shape[:2]))
    return a, b
  return np.reshape(weight_a.T, a_shape), np.reshape(weight_b.T, b_shape)


def torch_shapes(
  projection: projections.Projection, kernel_shape: Sequence[int], rank: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """The shapes of ``lora_A.weight`` and ``lora_B.weight`` for a layer of ``kernel_shape``."""
  a_shape, b_shape = projection.factor_shapes(tuple(kernel_shape), rank)
  if isinstance(projection, projections.Conv):
    n = len(projection.kernel_size)
    return (rank, a_shape[n], *a_shape[:n]), (b_shape[1], rank, *(1,) * n)
  return (rank, math.prod(a_shape[:-1])), (math.prod(b_shape[1:]), rank)


def torch_weight(projection: projections.Projection, kernel: np.ndarray) -> np.ndarray:
  """A Flax kernel as PyTorch's ``weight``: ``[out, in]`` or ``[out, in, *window]``."""
  if isinstance(projection, projections.Conv):
    n = len(projection.kernel_size)
    return np.transpose(kernel, (n + 1, n, *range(n)))
  return matrix(projection, kernel).T


def torch_bias(projection: projections.Projection, bias: np.ndarray) -> np.ndarray:
  """A Flax bias as PyTorch's ``bias [out]`` (an Einsum's in its kernel's axis order)."""
  if isinstance(projection, projections.Einsum):
    rhs, out = projection.equation.split("->")[0].split(",")[1], projection.equation.split("->")[1]
    letters = [c for c in out if c in rhs]
    bias = np.transpose(bias, np.argsort([rhs.index(c) for c in letters]))
  return np.reshape(bias, (-1,))


# --------------------------------------------------------------------------
# Names.
# --------------------------------------------------------------------------


def module_name(module_names: ModuleNames, name: str) -> tuple[str, ...] | None:
  """The PyTorch module names of layer ``name`` (one, or a fused kernel's parts); None when a
  mapping leaves it out."""
  if isinstance(module_names, Mapping):
    value = module_names.get(name)
  elif callable(module_names):
    value = module_names(name)
  else:
    raise TypeError(
      "module_names must be a mapping {layer name: PyTorch module name} or a callable, got "
      f"module_names={module_names!r}"
    )
  if value is None:
    return None
  parts = (value,) if isinstance(value, str) else value
  if (
    not isinstance(parts, Sequence)
    or not parts
    or not all(isinstance(part, str) and part for part in parts)
  ):
    raise TypeError(
      f"module_names gives {value!r} for {name!r}; a module name is a non-empty str (or, for a "
      "fused kernel, a non-empty tuple of them, one per part)"
    )
  return tuple(parts)


def check_fused(
  name: str, projection: projections.Projection, shape: Sequence[int], parts: int
) -> None:
  """Raises unless a layer given ``parts`` module names has a fused leading output axis of them.

  The fused axis is the first output axis in the kernel's order (tunix's ``kv_einsum``
  ``'BSD,CKDH->CBSKH'``: ``C``), the rows of PyTorch's ``[prod(out), ...]`` layout in blocks.
  """
  if parts == 1:
    return
  if isinstance(projection, projections.Einsum):
    size = shape[einsum_axes(projection)[2][0]]
  elif isinstance(projection, projections.GeneralDense):
    size = projection.features[0]
  else:
    size = None
  if size != parts:
    raise ValueError(
      f"module_names gives {parts} modules for the layer {name!r} (a fused kernel's parts), "
      f"but its first output axis has size {size}: it must have one index per module"
    )


def pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
  """The key of PEFT's ``rank_pattern``/``alpha_pattern`` that applies to ``module``.

  As PEFT matches them: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", module)``.
  """
  for key in patterns:
    if re.match(rf"(.*\.)?({key})$", module):
      return key
  return None


def targeted(target_modules: Any, module: str, field: str = "target_modules") -> bool:
  """Whether PEFT's ``target_modules`` (a regex string or a list of names) takes ``module``.

  ``exclude_modules`` (``field``) matches as PEFT matches it, the same way.
  """
  if isinstance(target_modules, str):
    return re.fullmatch(target_modules, module) is not None
  if isinstance(target_modules, Sequence):
    return any(module == t or module.endswith(f".{t}") for t in target_modules)
  raise ValueError(
    f"adapter_config.json field {field} must be a list of names or a regex string, got "
    f"{field}={target_modules!r}"
  )
