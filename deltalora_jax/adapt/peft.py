"""Hugging Face PEFT LoRA adapter directories: write them, and read them back.

A PEFT LoRA directory holds ``adapter_config.json`` (a ``LoraConfig``) and
``adapter_model.safetensors`` with, for each adapted PyTorch module ``m``,
``base_model.model.<m>.lora_A.weight`` and ``.lora_B.weight``. PEFT adds
``scaling * lora_B(lora_A(x))`` to the module's output, ``scaling =
lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``).

* :func:`save_peft` writes the adapted layers of an NNX model (or of Linen
  variables with their ``layers``) as such a directory, by one of three rules:
  ``'lora'`` (plain LoRA layers, ``use_delta=False``: exact), ``'paper'``
  (the published Delta-LoRA rule: the change ``W_T + s A_T B_T - W_0`` of
  rank at most ``2r``, written at rank ``2r``), ``'seed'`` (``s A B + ds D``,
  full rank: its rank-``k`` truncated SVD, or the merged weights);
* :func:`load_peft` reads one into this library's adapter format (that of
  :func:`~deltalora_jax.export_adapter`, ``use_delta=False``), which
  :func:`~deltalora_jax.attach_adapter_nnx` and
  :func:`~deltalora_jax.attach_adapter_linen` put on the base model.

Nothing here imports PyTorch: the files are written and read with
``safetensors.numpy``; a pickled ``adapter_model.bin`` is refused, never read.

Layer names. ``module_names`` maps this library's layer names ``'a/b'`` to
the PyTorch module names (``'model.layers.0.self_attn.q_proj'``): a mapping
(only the layers it names are written or read) or a callable.

Layouts (Flax kernels multiply from the left, PyTorch weights from the right):

=========================  ========================  ================================
Flax layer (kernel)        PyTorch module            ``lora_A.weight`` / ``lora_B.weight``
=========================  ========================  ================================
Dense ``[in, out]``        ``nn.Linear``             ``[r, in]`` = ``A.T`` / ``[out, r]`` = ``B.T``
DenseGeneral               ``nn.Linear``             ``[r, prod(in)]`` / ``[prod(out), r]``
``[*in, *features]``
Einsum, no batch axis      ``nn.Linear``             as DenseGeneral, axes in the kernel's order
Conv ``[*win, in, out]``   ``nn.Conv{1,2,3}d``       ``[r, in, *win]`` / ``[out, r, 1, ...]``
=========================  ========================  ================================

A DenseGeneral's (or Einsum's) several input axes are flattened in
row-major order, the contracted kernel axes in the kernel's order (the
order they have in the input), and so are its output axes: the PyTorch
``nn.Linear`` whose ``weight [out, in]`` is the Flax kernel reshaped to
``[prod(in), prod(out)]`` and transposed. A convolution's kernel is
transposed (PyTorch's ``[out, in, *win]``), not flipped: both frameworks
correlate. An Einsum with batch axes (its own factors per index), a layer
stacked by ``nn.scan``/``nnx.vmap`` and a kernel of another kind have no
PEFT module and are refused by name.

Example:
  >>> import tempfile
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> import deltalora_jax as dl
  >>> names = {"up": "mlp.up_proj"}  # Flax layer name -> PyTorch module name
  >>> model = nnx.Dict(up=nnx.Linear(4, 8, rngs=nnx.Rngs(0)))
  >>> model, _ = dl.adapt_nnx(model, rank=2, use_delta=False, rngs=nnx.Rngs(1))
  >>> model["up"].lora_b[...] = jnp.ones((2, 8))  # as if trained
  >>> directory = tempfile.mkdtemp()
  >>> report = save_peft(directory, model, module_names=names)
  >>> report["layers"]["up"]["module"], report["layers"]["up"]["rank"]
  ('mlp.up_proj', 2)
  >>> fresh = nnx.Dict(up=nnx.Linear(4, 8, rngs=nnx.Rngs(0)))
  >>> fresh, _ = dl.attach_adapter_nnx(fresh, load_peft(directory, fresh, module_names=names))
  >>> x = jnp.ones((1, 4))
  >>> bool(jnp.allclose(fresh["up"](x), model["up"](x), rtol=1e-6))
  True
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import numpy as np
import safetensors
from flax import nnx, traverse_util
from safetensors import numpy as safetensors_numpy

from deltalora_jax import core, paths, projections, tree
from deltalora_jax import nnx as nnx_front
from deltalora_jax.adapt import linen as linen_adapt
from deltalora_jax.adapt import nnx as nnx_adapt
from deltalora_jax.adapt import targets
from deltalora_jax.config import LayerConfig

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


def _einsum_axes(projection: projections.Einsum) -> tuple[list[int], list[int], list[int]]:
  """``(batch, contracted, output)`` positions of the kernel's axes of an Einsum."""
  lhs, rhs = projection.equation.split("->")[0].split(",")
  out = projection.equation.split("->")[1]
  batch = [i for i, c in enumerate(rhs) if c in lhs and c in out]
  inner = [i for i, c in enumerate(rhs) if c in lhs and c not in out]
  outer = [i for i, c in enumerate(rhs) if c in out and c not in lhs]
  return batch, inner, outer


def _check_layer(
  name: str, projection: projections.Projection, kernel_shape: Sequence[int]
) -> None:
  """Raises unless the layer at ``name`` is one PEFT module (not stacked, no batch axes)."""
  stack = len(kernel_shape) - projection.kernel_ndim
  if stack:
    raise ValueError(
      f"the layer {name!r} is a stack of {tuple(kernel_shape[:stack])} layers (nn.scan, "
      "nnx.vmap); a PEFT file holds one PyTorch module per layer: unstack it first"
    )
  if isinstance(projection, projections.Einsum) and _einsum_axes(projection)[0]:
    raise ValueError(
      f"the layer {name!r} is an Einsum {projection.equation!r} with batch axes (factors per "
      "index); "
      "PEFT has no such module: only Linear-like Einsums (no batch axis) are written"
    )
  if isinstance(projection, projections.Conv) and len(projection.kernel_size) > 3:
    raise ValueError(
      f"the layer {name!r} is a {len(projection.kernel_size)}-D Conv; PyTorch has 1-3-D"
    )


def _matrix(projection: projections.Projection, kernel: Any) -> np.ndarray:
  """A kernel (or ``D``) as the matrix ``[prod(in), prod(out)]`` the factors multiply to."""
  kernel = np.asarray(kernel, np.float64)
  if isinstance(projection, projections.Einsum):
    _, inner, outer = _einsum_axes(projection)
    kernel = np.transpose(kernel, inner + outer)
    n_in = len(inner)
  elif isinstance(projection, projections.Conv):
    n_in = kernel.ndim - 1
  else:
    n_in = kernel.ndim - len(projection.features)
  return np.reshape(kernel, (math.prod(kernel.shape[:n_in]), -1))


def _unmatrix(
  projection: projections.Projection, matrix: np.ndarray, shape: Sequence[int]
) -> np.ndarray:
  """The kernel of :func:`_matrix`'s ``matrix``: its inverse."""
  if not isinstance(projection, projections.Einsum):
    return np.reshape(matrix, tuple(shape))
  _, inner, outer = _einsum_axes(projection)
  order = inner + outer
  permuted = np.reshape(matrix, tuple(shape[i] for i in order))
  return np.transpose(permuted, np.argsort(order))


def _torch_factors(
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


def _flax_factors(
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


def _torch_shapes(
  projection: projections.Projection, kernel_shape: Sequence[int], rank: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """The shapes of ``lora_A.weight`` and ``lora_B.weight`` for a layer of ``kernel_shape``."""
  a_shape, b_shape = projection.factor_shapes(tuple(kernel_shape), rank)
  if isinstance(projection, projections.Conv):
    n = len(projection.kernel_size)
    return (rank, a_shape[n], *a_shape[:n]), (b_shape[1], rank, *(1,) * n)
  return (rank, math.prod(a_shape[:-1])), (math.prod(b_shape[1:]), rank)


def _torch_weight(projection: projections.Projection, kernel: np.ndarray) -> np.ndarray:
  """A Flax kernel as PyTorch's ``weight``: ``[out, in]`` or ``[out, in, *window]``."""
  if isinstance(projection, projections.Conv):
    n = len(projection.kernel_size)
    return np.transpose(kernel, (n + 1, n, *range(n)))
  return _matrix(projection, kernel).T


def _torch_bias(projection: projections.Projection, bias: np.ndarray) -> np.ndarray:
  """A Flax bias as PyTorch's ``bias [out]`` (an Einsum's in its kernel's axis order)."""
  if isinstance(projection, projections.Einsum):
    rhs, out = projection.equation.split("->")[0].split(",")[1], projection.equation.split("->")[1]
    letters = [c for c in out if c in rhs]
    bias = np.transpose(bias, np.argsort([rhs.index(c) for c in letters]))
  return np.reshape(bias, (-1,))


# --------------------------------------------------------------------------
# Names.
# --------------------------------------------------------------------------


def _module_name(module_names: ModuleNames, name: str) -> tuple[str, ...] | None:
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


def _check_fused(
  name: str, projection: projections.Projection, shape: Sequence[int], parts: int
) -> None:
  """Raises unless a layer given ``parts`` module names has a fused leading output axis of them.

  The fused axis is the first output axis in the kernel's order (tunix's ``kv_einsum``
  ``'BSD,CKDH->CBSKH'``: ``C``), the rows of PyTorch's ``[prod(out), ...]`` layout in blocks.
  """
  if parts == 1:
    return
  if isinstance(projection, projections.Einsum):
    size = shape[_einsum_axes(projection)[2][0]]
  elif isinstance(projection, projections.GeneralDense):
    size = projection.features[0]
  else:
    size = None
  if size != parts:
    raise ValueError(
      f"module_names gives {parts} modules for the layer {name!r} (a fused kernel's parts), "
      f"but its first output axis has size {size}: it must have one index per module"
    )


def _pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
  """The key of PEFT's ``rank_pattern``/``alpha_pattern`` that applies to ``module``.

  As PEFT matches them: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", module)``.
  """
  for key in patterns:
    if re.match(rf"(.*\.)?({key})$", module):
      return key
  return None


def _targeted(target_modules: Any, module: str, field: str = "target_modules") -> bool:
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


# --------------------------------------------------------------------------
# Writing.
# --------------------------------------------------------------------------


def _kernel_of(module: Any) -> Any:
  """An NNX layer's kernel: an adapter's ``kernel``, or the one its base kind names (``w``)."""
  if nnx_adapt.kind(module) in targets.ADAPTABLE_KINDS:
    return getattr(module, nnx_front.describe(module).kernel)[...]
  return module.kernel[...]


def _base_kernels(base: Any, names: Sequence[str]) -> dict[str, np.ndarray]:
  """The pretrained kernel of each layer of ``names``, from an NNX model or Linen variables."""
  if isinstance(base, nnx.Module):
    modules = nnx_adapt.modules(base)
    found = {n: _kernel_of(modules[n][1]) for n in names if n in modules}
  elif isinstance(base, Mapping) and "params" in base:
    flat = traverse_util.flatten_dict(dict(base["params"]))
    found = {n: flat[key] for n in names if (key := (*paths.as_path(n), "kernel")) in flat}
  else:
    raise TypeError(
      "base must be the pretrained NNX model or Linen variables {'params': ...}, got "
      f"base={type(base).__name__}"
    )
  if missing := [n for n in names if n not in found]:
    raise ValueError(f"base has no kernel for the layers {missing}")
  return {n: np.asarray(v, np.float64) for n, v in found.items()}


def _truncated(change: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
  """``(U, V, relative Frobenius error)`` of the rank-``rank`` SVD of ``change``, ``U V ~ change``.

  The error is that of the float32 factors written, against the float64 change.
  """
  left, values, right = np.linalg.svd(change, full_matrices=False)
  root = np.sqrt(values[:rank])
  u = (left[:, :rank] * root).astype(np.float32)
  v = (root[:, None] * right[:rank]).astype(np.float32)
  norm = float(np.linalg.norm(change))
  error = float(np.linalg.norm(change - u.astype(np.float64) @ v.astype(np.float64)))
  return u, v, error / norm if norm else 0.0


def _change(
  rule: str, config: LayerConfig, arrays: Mapping[str, Any], base_kernel: np.ndarray | None
) -> np.ndarray:
  """The layer's trained change of its kernel, ``[prod(in), prod(out)]``, float64."""
  projection = config.projection
  a = np.asarray(arrays["lora_a"], np.float64)
  b = np.asarray(arrays["lora_b"], np.float64)
  change = config.scaling * np.reshape(a, (-1, config.rank)) @ np.reshape(b, (config.rank, -1))
  if config.paper_lambda is not None:  # the paper's telescoped form: + lambda s (A B - A^ B^)
    a0 = np.asarray(arrays[core.SNAPSHOT_A], np.float64)
    b0 = np.asarray(arrays[core.SNAPSHOT_B], np.float64)
    frozen = np.reshape(a0, (-1, config.rank)) @ np.reshape(b0, (config.rank, -1))
    change = (1 + config.paper_lambda) * change - config.paper_lambda * config.scaling * frozen
  if rule == "seed" and config.use_delta:
    change = change + config.delta_scaling * _matrix(projection, arrays["delta"])
  if base_kernel is not None:
    change = change + _matrix(projection, arrays["kernel"]) - _matrix(projection, base_kernel)
  return change


def _telescoped_factors(
  config: LayerConfig, arrays: Mapping[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
  r"""``([A, A^], [(1 + lambda) B; -lambda B^])``: a telescoped paper layer's change at rank ``2r``.

  With the scaling ``s`` their product is the layer's whole change of its kernel,
  :math:`s (1 + \lambda) A B - \lambda s \hat A \hat B`, exactly (float32, as trained).
  """
  lam = config.paper_lambda or 0.0
  a = np.concatenate([np.asarray(arrays["lora_a"]), np.asarray(arrays[core.SNAPSHOT_A])], -1)
  b = np.concatenate(
    [(1 + lam) * np.asarray(arrays["lora_b"]), -lam * np.asarray(arrays[core.SNAPSHOT_B])],
    axis=config.projection.rank_axis_of_b(),
  )
  return a.astype(np.float32), b.astype(np.float32)


def _check_rule(
  rule: object, rank: object, merged: object, base: Any, configs: Mapping[str, LayerConfig]
) -> None:
  if rule not in RULES:
    raise ValueError(f"rule must be one of {RULES}, got rule={rule!r}")
  if not isinstance(merged, bool):
    raise TypeError(f"merged must be a bool, got merged={merged!r}")
  if rank is not None and (rule != "seed" or merged):
    raise ValueError(
      f"rank is the truncation rank of the seed rule's export (without merged), got rank={rank!r} "
      f"with rule={rule!r}, merged={merged}"
    )
  if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
    raise ValueError(f"rank must be a positive int, got rank={rank!r}")
  if rule == "seed" and rank is None and not merged:
    raise ValueError(
      "rule='seed' adapters (s A B + ds D) are full rank: pass rank=k to write their rank-k "
      "truncated SVD (the report gives each layer's error), or merged=True to write the merged "
      "weights; a PEFT adapter of the seed rule is never truncated silently"
    )
  for name, config in configs.items():
    if rule in ("lora", "paper") and config.use_delta:
      raise ValueError(
        f"rule={rule!r} is for plain LoRA layers (use_delta=False); the layer {name!r} has D "
        "(use_delta=True): use rule='seed'"
      )
    if rule == "lora" and not config.freeze_base and not merged:
      raise ValueError(
        f"rule='lora' writes the factors alone; the layer {name!r} trained its base "
        "(freeze_base=False): use rule='paper' with base=, or merged=True"
      )
    if rule == "lora" and config.paper_lambda is not None and not merged:
      raise ValueError(
        f"rule='lora' writes the factors alone; the layer {name!r} is of the paper's "
        f"telescoped form (paper_lambda={config.paper_lambda}): use rule='paper', or merged=True"
      )
  in_place = [n for n, c in configs.items() if c.paper_lambda is None]
  if rule == "paper" and base is None and in_place:
    raise ValueError(
      "rule='paper' needs base=, the pretrained model or variables (W_0), for the layers "
      f"trained in place (without paper_lambda): {sorted(in_place)}"
    )


def _number(value: float) -> float | int:
  """``value`` as an int when it is one (PEFT's ``lora_alpha`` is an int by default)."""
  return int(value) if float(value).is_integer() else float(value)


def _config_json(
  layers: Mapping[str, tuple[str, int, float]],
  use_rslora: bool,
  task_type: str | None,
  base_model_name_or_path: str | None,
) -> dict[str, Any]:
  """The ``adapter_config.json`` of ``{name: (module, rank, alpha)}``: most common r and alpha."""
  ranks = collections.Counter(rank for _, rank, _ in layers.values())
  alphas = collections.Counter(alpha for _, _, alpha in layers.values())
  r, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
  return {
    **LORA_CONFIG_DEFAULTS,
    "r": r,
    "lora_alpha": _number(alpha),
    "use_rslora": use_rslora,
    "target_modules": sorted(module for module, _, _ in layers.values()),
    "rank_pattern": {m: k for m, k, _ in layers.values() if k != r},
    "alpha_pattern": {m: _number(a) for m, _, a in layers.values() if a != alpha},
    "task_type": task_type,
    "base_model_name_or_path": base_model_name_or_path,
  }


def _output_error(
  model_or_variables: Any,
  layers: Any,
  sample: Any,
  kernels: Mapping[str, np.ndarray],
) -> float:
  """The relative output error on ``sample`` of the model with ``kernels`` and no adapter."""
  linen = not isinstance(model_or_variables, nnx.Module)
  if linen and not isinstance(layers, linen_adapt.DeltaLoRAModel):
    raise TypeError(
      "sample with Linen variables needs layers= to be the DeltaLoRAModel (to run the model), "
      f"got {type(layers).__name__}"
    )
  arrays = tree.layer_arrays(model_or_variables, layers if linen else None)
  new: dict[paths.Path, dict[str, Any]] = {}
  for name, kernel in kernels.items():
    current = arrays[name][1]
    new[paths.as_path(name)] = {
      "kernel": kernel.astype(current["kernel"].dtype),
      **{n: np.zeros_like(current[n]) for n in ("lora_b", "delta") if n in current},
    }
  if linen:
    want = layers.apply(model_or_variables, *sample)
    got = layers.apply(tree.with_arrays(model_or_variables, new), *sample)
  else:
    want = model_or_variables(*sample)
    got = tree.with_arrays(nnx.clone(model_or_variables), new)(*sample)
  want_flat = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(want)])
  got_flat = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(got)])
  norm = float(np.linalg.norm(want_flat))
  error = float(np.linalg.norm(got_flat - want_flat))
  return error / norm if norm else error


def save_peft(
  directory: str | os.PathLike[str],
  model_or_variables: Any,
  layers: Any = None,
  *,
  module_names: ModuleNames,
  base: Any = None,
  rule: Rule = "lora",
  rank: int | None = None,
  merged: bool = False,
  task_type: str | None = None,
  base_model_name_or_path: str | None = None,
  sample: Any = None,
) -> dict[str, Any]:
  r"""Writes the adapted layers as a Hugging Face PEFT LoRA directory (or merged weights).

  Writes ``adapter_config.json`` and ``adapter_model.safetensors`` as PEFT's
  ``save_pretrained`` does (``safetensors`` metadata ``{"format": "pt"}``,
  keys ``base_model.model.<module>.lora_A.weight`` and ``.lora_B.weight``,
  float32). The config has PEFT's ``LoraConfig`` fields
  (:data:`LORA_CONFIG_DEFAULTS`): ``r`` and ``lora_alpha`` the most common
  of the layers, the others in ``rank_pattern``/``alpha_pattern`` by
  module name; ``target_modules`` the module names written.

  What is written, per ``rule`` (``s`` the LoRA scaling, ``ds`` the delta scaling):

  * ``'lora'``: plain LoRA layers (``use_delta=False``, frozen base): the
    factors as they are, with each layer's alpha and ``use_rslora`` (exact).
  * ``'paper'``: a layer of the telescoped form (``paper_lambda``) holds its
    whole change :math:`\Delta = s (1 + \lambda) A B - \lambda s \hat A \hat B`:
    it is written exactly at rank ``2r``, ``lora_A = [A, A^]``, ``lora_B =
    [(1 + lambda) B; -lambda B^]`` with the layer's scaling (no ``base``
    needed). A layer trained in place wrote ``W`` too,
    :math:`W_T = W_0 + \lambda s (A_T B_T - A_{K+1} B_{K+1})`, so the change
    :math:`\Delta = W_T - W_0 + s A_T B_T` has rank at most ``2r``; it is
    written at rank ``min(2r, in, out)`` from its SVD (float64), scaling 1
    (``lora_alpha = r``), with the error of the float32 factors in the report.
  * ``'seed'``: :math:`\Delta = s A B + ds D` (plus ``W_T - W_0`` when
    ``base`` is given) is full rank: with ``rank=k`` its rank-``k``
    truncated SVD is written (the error is reported per layer, and on
    ``sample``); with ``merged=True`` see below. Neither: an error.

  With ``merged=True`` (any rule) ``model.safetensors`` is written instead:
  the merged weights ``W + s A B (+ ds D)`` of the adapted layers in
  PyTorch's layout, ``<module>.weight`` (and ``<module>.bias``): a partial
  state dict (``load_state_dict(..., strict=False)``), no adapter config.

  Args:
    directory: where to write (created if needed; files are overwritten).
    model_or_variables: an adapted NNX model, or Linen variables.
    layers: for Linen, the :class:`~deltalora_jax.DeltaLoRAModel` or the
      layers mapping.
    module_names: ``{layer name 'a/b': PyTorch module name}`` (the layers
      it leaves out are not written) or a callable of the layer name. A
      fused kernel (tunix's ``kv_einsum`` ``(2, K, D, H)``, ``qkv_einsum``)
      takes a tuple of names, one per index of its first output axis
      (``('self_attn.k_proj', 'self_attn.v_proj')``): the parts share ``A``
      and each gets its block of ``B`` (exact), or of the merged weight.
    base: the pretrained NNX model or Linen variables (``W_0``): required
      by ``'paper'``; with ``'seed'``, adds a trained base's change.
    rule: ``'lora'``, ``'paper'`` or ``'seed'``.
    rank: the seed rule's truncation rank ``k``.
    merged: write the merged weights instead of an adapter.
    task_type: PEFT's ``task_type`` (``'CAUSAL_LM'``, ...), written as given.
    base_model_name_or_path: written as given.
    sample: a tuple of the model's inputs: the report then has the
      relative output error of the written adapter on it
      (``output_error``; a Linen model needs ``layers`` the DeltaLoRAModel).

  Returns:
    ``{'rule', 'files', 'layers': {name: {'module', 'rank', 'alpha',
    'relative_error'}}, 'output_error'?}``; the relative Frobenius error of
    each layer's written change (0.0 for an exact export).

  Raises:
    ValueError: for an unknown rule, a seed export without ``rank`` or
      ``merged``, a layer PEFT cannot hold (a stack, an Einsum with batch
      axes), a missing ``base``, or two layers with one module name.
    TypeError: for ``module_names`` of another kind.

  Example:
    >>> import os, tempfile
    >>> from flax import nnx
    >>> import deltalora_jax as dl
    >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)))
    >>> model, _ = dl.adapt_nnx(model, rank=2, rngs=nnx.Rngs(1))  # the seed's rule: D
    >>> directory = tempfile.mkdtemp()
    >>> report = save_peft(directory, model, module_names={"layers/0": "fc"}, rule="seed",
    ...                    rank=2)
    >>> sorted(os.listdir(directory)), report["layers"]["layers/0"]["relative_error"]
    (['adapter_config.json', 'adapter_model.safetensors'], 0.0)
  """
  found = tree.layer_arrays(model_or_variables, layers)
  names: dict[str, tuple[str, ...]] = {}
  for name in found:
    modules = _module_name(module_names, name)
    if modules is not None:
      names[name] = modules
  if not names:
    raise ValueError(f"module_names names none of the adapted layers {sorted(found)}")
  every = [module for modules in names.values() for module in modules]
  if len(set(every)) != len(every):
    counts = collections.Counter(every)
    raise ValueError(f"module_names gives one module to several layers: {counts.most_common(1)}")
  configs = {name: found[name][0] for name in names}
  _check_rule(rule, rank, merged, base, configs)
  for name, config in configs.items():
    _check_layer(name, config.projection, found[name][1]["kernel"].shape)
    _check_fused(name, config.projection, found[name][1]["kernel"].shape, len(names[name]))
  needs_base = any(
    not c.freeze_base or (rule == "paper" and c.paper_lambda is None) for c in configs.values()
  )
  kernels0 = _base_kernels(base, list(names)) if base is not None and needs_base else {}
  os.makedirs(directory, exist_ok=True)
  report: dict[str, Any] = {"rule": rule, "layers": {}}
  if merged:
    state = {}
    for name, modules in names.items():
      config, arrays = found[name]
      projection = config.projection
      change = _change(rule, config, arrays, kernels0.get(name))
      kernel = np.asarray(kernels0.get(name, arrays["kernel"]), np.float64)
      full = _unmatrix(projection, _matrix(projection, kernel) + change, kernel.shape)
      weights = np.split(_torch_weight(projection, full), len(modules))  # a fused kernel's rows
      biases = (
        np.split(_torch_bias(projection, np.asarray(arrays["bias"])), len(modules))
        if "bias" in arrays
        else [None] * len(modules)
      )
      for module, weight, bias in zip(modules, weights, biases, strict=True):
        state[f"{module}.weight"] = np.ascontiguousarray(weight, np.float32)
        if bias is not None:
          state[f"{module}.bias"] = np.ascontiguousarray(bias, np.float32)
      report["layers"][name] = {"module": _reported(modules), "rank": None, "alpha": None}
      report["layers"][name]["relative_error"] = 0.0
    safetensors_numpy.save_file(
      state, os.path.join(directory, MERGED_FILE), metadata={"format": "pt"}
    )
    report["files"] = [MERGED_FILE]
    return report
  written: dict[str, tuple[str, int, float]] = {}
  tensors: dict[str, np.ndarray] = {}
  applied: dict[str, np.ndarray] = {}
  use_rslora = rule == "lora" and all(c.use_rslora for c in configs.values())
  for name, modules in names.items():
    config, arrays = found[name]
    projection = config.projection
    shape = tuple(arrays["kernel"].shape)
    if rule == "lora":
      a, b = np.asarray(arrays["lora_a"], np.float32), np.asarray(arrays["lora_b"], np.float32)
      k, scaling, error = config.rank, config.scaling, 0.0
      kernel_change = None
    elif rule == "paper" and config.paper_lambda is not None and config.freeze_base:
      a, b = _telescoped_factors(config, arrays)  # exact at rank 2r
      k, scaling, error = 2 * config.rank, config.scaling, 0.0
      kernel_change = None
    else:
      change = _change(rule, config, arrays, kernels0.get(name))
      k = min(2 * config.rank if rule == "paper" else int(rank or 0), *change.shape)
      u, v, error = _truncated(change, k)
      a_shape, b_shape = projection.factor_shapes(shape, k)
      a, b, scaling = np.reshape(u, a_shape), np.reshape(v, b_shape), 1.0
      kernel_change = u.astype(np.float64) @ v.astype(np.float64)
    torch_a, torch_b = _torch_factors(projection, a, b)
    alpha = scaling * (math.sqrt(k) if use_rslora else k)
    # A fused kernel's parts share A; each takes its block of B's rows (exact: the rows of
    # s A B are the parts' own).
    for module, part_b in zip(modules, np.split(torch_b, len(modules)), strict=True):
      tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(torch_a, np.float32)
      tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(part_b, np.float32)
      written[module] = (module, k, alpha)
    report["layers"][name] = {
      "module": _reported(modules),
      "rank": k,
      "alpha": _number(alpha),
      "relative_error": error,
    }
    if sample is not None and kernel_change is not None:
      kernel = np.asarray(kernels0.get(name, arrays["kernel"]), np.float64)
      applied[name] = _unmatrix(projection, _matrix(projection, kernel) + kernel_change, shape)
  config_json = _config_json(written, use_rslora, task_type, base_model_name_or_path)
  with open(os.path.join(directory, CONFIG_FILE), "w") as file:
    json.dump(config_json, file, indent=2, sort_keys=True)
  safetensors_numpy.save_file(
    tensors, os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"}
  )
  report["files"] = [CONFIG_FILE, WEIGHTS_FILE]
  if sample is not None:
    inputs = sample if isinstance(sample, tuple) else (sample,)
    report["output_error"] = (
      _output_error(model_or_variables, layers, inputs, applied) if applied else 0.0
    )
  return report


def _reported(modules: tuple[str, ...]) -> str | list[str]:
  """A layer's module name in the report: the name, or a fused kernel's list of names."""
  return modules[0] if len(modules) == 1 else list(modules)


# --------------------------------------------------------------------------
# Reading.
# --------------------------------------------------------------------------


def _read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"directory={os.fspath(directory)!r} has no {CONFIG_FILE}")
  with open(path) as file:
    try:
      config = json.load(file)
    except json.JSONDecodeError as error:  # a truncated or hand-edited file
      raise ValueError(f"{path} is not valid JSON (truncated or corrupt?): {error}") from None
  if not isinstance(config, dict):
    raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}")
  if config.get("peft_type", "LORA") != "LORA":
    raise ValueError(
      f"{CONFIG_FILE} field peft_type must be 'LORA', got peft_type={config['peft_type']!r}"
    )
  for field, allowed in UNSUPPORTED.items():
    value = config.get(field)
    if value is not None and value not in allowed and value != []:
      raise ValueError(
        f"{CONFIG_FILE} field {field}={value!r} is not supported by deltalora_jax (allowed: "
        f"{[a for a in allowed if a != ()]}, or absent)"
      )
  for field in ("r", "lora_alpha"):
    value = config.get(field, LORA_CONFIG_DEFAULTS[field])
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
      raise ValueError(f"{CONFIG_FILE} field {field} must be a positive number, got {value!r}")
  if not isinstance(config.get("use_rslora", False), bool):
    raise ValueError(f"{CONFIG_FILE} field use_rslora must be a bool, got {config['use_rslora']!r}")
  return config


def _read_weights(directory: str | os.PathLike[str]) -> dict[str, dict[str, np.ndarray]]:
  """``{module: {'lora_A': weight, 'lora_B': weight}}`` of ``adapter_model.safetensors``."""
  path = os.path.join(directory, WEIGHTS_FILE)
  if not os.path.isfile(path):
    if os.path.isfile(os.path.join(directory, PICKLE_FILE)):
      raise ValueError(
        f"directory={os.fspath(directory)!r} holds {PICKLE_FILE}, a pickle, which is never "
        f"loaded (it can run code); convert it to {WEIGHTS_FILE} (PEFT: save_pretrained with "
        "safe_serialization=True)"
      )
    raise FileNotFoundError(f"directory={os.fspath(directory)!r} has no {WEIGHTS_FILE}")
  try:
    tensors = safetensors_numpy.load_file(path)
  except safetensors.SafetensorError as error:  # a truncated, empty or corrupt file
    raise ValueError(f"{path} is not a readable safetensors file: {error}") from None
  modules: dict[str, dict[str, np.ndarray]] = {}
  for key, value in tensors.items():
    match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", key)
    if match is None:
      raise ValueError(
        f"{WEIGHTS_FILE} holds {key!r}; deltalora_jax reads LoRA weights "
        "'base_model.model.<module>.lora_A.weight' and '.lora_B.weight' only"
      )
    modules.setdefault(match[1], {})[match[2]] = value
  for module, pair in modules.items():
    if set(pair) != {"lora_A", "lora_B"}:
      raise ValueError(f"{WEIGHTS_FILE} has {sorted(pair)} for {module!r}, not lora_A and lora_B")
  return modules


def _target_layers(
  model: Any, inputs: Sequence[Any], variables: Any, call_kwargs: Mapping[str, Any] | None
) -> dict[str, tuple[projections.Projection, tuple[int, ...], bool]]:
  """``{name: (projection, kernel shape, use_bias)}`` of the layers of a base model."""
  if isinstance(model, nnx.Module):
    if variables is not None or inputs:
      raise TypeError("an NNX model takes neither sample inputs nor variables=")
    layers = {}
    for name, (_, candidate) in nnx_adapt.modules(model).items():
      if nnx_adapt.kind(candidate) in targets.ADAPTABLE_KINDS:
        description = nnx_front.describe(candidate)
        kernel = getattr(candidate, description.kernel)
        layers[name] = (description.projection, tuple(kernel.shape), description.bias is not None)
    return layers
  if variables is None:
    raise TypeError(
      "a Linen model needs variables= (its base variables) and sample inputs, as adapt_linen"
    )
  base, _, params, variables = linen_adapt.linen_parts(model, variables)
  found = linen_adapt.trace_linen(base, variables, inputs, dict(call_kwargs or {}))
  return {
    name: (entry["projection"], tuple(params[(*paths.as_path(name), "kernel")].shape),
           bool(entry["module"].use_bias))
    for name, entry in found.items()
    if entry["kind"] in targets.ADAPTABLE_KINDS and (*paths.as_path(name), "kernel") in params
  }  # fmt: skip


def load_peft(
  directory: str | os.PathLike[str],
  model: Any,
  *inputs: Any,
  module_names: ModuleNames,
  variables: Any = None,
  call_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """Reads a PEFT LoRA directory into this library's adapter (``use_delta=False``).

  The adapter is :func:`~deltalora_jax.export_adapter`'s format: attach it
  with :func:`~deltalora_jax.attach_adapter_nnx` or
  :func:`~deltalora_jax.attach_adapter_linen`. Each layer's kind and kernel
  shape come from the base model (PyTorch's file knows only ``[out, in]``):
  an NNX model is read directly; a Linen model is traced once on sample
  ``inputs`` with its ``variables``, as :func:`~deltalora_jax.adapt_linen`
  does. Each layer gets PEFT's rank and alpha (``r``, ``lora_alpha``,
  ``rank_pattern``, ``alpha_pattern``, as PEFT matches them) and
  ``use_rslora``. Only ``adapter_model.safetensors`` is read: a pickled
  ``adapter_model.bin`` is refused.

  Args:
    directory: the PEFT adapter directory.
    model: the base NNX model, or the Linen model.
    *inputs: for Linen, sample inputs of ``model.apply(variables, *inputs)``.
    module_names: ``{layer name 'a/b': PyTorch module name}`` or a callable
      of the layer name (applied to every layer that can be adapted).
    variables: for Linen, the base variables ``{'params': ...}``.
    call_kwargs: for Linen, keyword arguments of the model's call.

  Returns:
    ``{'config': {name: {...}}, 'weights': {name: {'lora_a', 'lora_b'}}}``.

  Raises:
    ValueError: for a field this library cannot honour (``use_dora``,
      ``lora_bias``, ``bias`` other than ``'none'``, ``fan_in_fan_out``,
      ``modules_to_save``, ``layers_to_transform``, ``layers_pattern``,
      ...; named), a ``.bin`` file, a truncated or corrupt file (named), a
      module of the file that no layer maps to, that ``target_modules``
      does not take or that ``exclude_modules`` leaves out, or a weight
      whose shape is not the layer's.
    FileNotFoundError: for a directory without the two files.

  Example:
    >>> import tempfile
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import deltalora_jax as dl
    >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)))
    >>> model, _ = dl.adapt_nnx(model, rank=2, use_delta=False, rngs=nnx.Rngs(1))
    >>> directory = tempfile.mkdtemp()
    >>> _ = save_peft(directory, model, module_names={"layers/0": "fc"})
    >>> adapter = load_peft(directory, nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0))),
    ...                     module_names={"layers/0": "fc"})
    >>> layer = adapter["weights"]["layers/0"]
    >>> adapter["config"]["layers/0"]["kernel_shape"], layer["lora_a"].shape
    ([4, 8], (4, 2))
  """
  config = _read_config(directory)
  modules = _read_weights(directory)
  layers = _target_layers(model, inputs, variables, call_kwargs)
  by_module: dict[str, str] = {}
  for name in layers:
    given = _module_name(module_names, name)
    if given is not None and len(given) > 1:
      raise ValueError(
        f"module_names gives the layer {name!r} the modules {list(given)} (a fused kernel's "
        "parts): load_peft reads one module per layer; a fused kernel's parts are written by "
        "save_peft, not read back"
      )
    if given is not None:
      by_module[given[0]] = name
  target_modules = config.get("target_modules")
  exclude_modules = config.get("exclude_modules")
  rank_pattern = config.get("rank_pattern") or {}
  alpha_pattern = config.get("alpha_pattern") or {}
  use_rslora = bool(config.get("use_rslora", False))
  adapter: dict[str, Any] = {"config": {}, "weights": {}}
  for module, pair in sorted(modules.items()):
    if module not in by_module:
      raise ValueError(
        f"{WEIGHTS_FILE} adapts the module {module!r}, which module_names gives no layer of the "
        f"model; it gives {sorted(by_module)}"
      )
    if target_modules is not None and not _targeted(target_modules, module):
      raise ValueError(
        f"{WEIGHTS_FILE} adapts {module!r}, which target_modules={target_modules!r} does not take"
      )
    if exclude_modules and _targeted(exclude_modules, module, "exclude_modules"):
      raise ValueError(
        f"{WEIGHTS_FILE} adapts {module!r}, which exclude_modules={exclude_modules!r} leaves out"
      )
    name = by_module[module]
    projection, kernel_shape, use_bias = layers[name]
    _check_layer(name, projection, kernel_shape)
    rank_key, alpha_key = _pattern_key(rank_pattern, module), _pattern_key(alpha_pattern, module)
    rank = int(rank_pattern[rank_key] if rank_key is not None else config.get("r", 8))
    alpha = float(
      alpha_pattern[alpha_key] if alpha_key is not None else config.get("lora_alpha", 8)
    )
    want = _torch_shapes(projection, kernel_shape, rank)
    for key, expected in zip(("lora_A", "lora_B"), want, strict=True):
      if tuple(pair[key].shape) != expected:
        raise ValueError(
          f"{WEIGHTS_FILE} {module}.{key}.weight has shape {tuple(pair[key].shape)}; the layer "
          f"{name!r} (kernel {kernel_shape}, r={rank}) needs {expected}"
        )
    a, b = _flax_factors(
      projection, kernel_shape, pair["lora_A"].astype(np.float32), pair["lora_B"].astype(np.float32)
    )
    layer_config = LayerConfig(
      projection, rank=rank, alpha=alpha, use_bias=use_bias, use_delta=False, use_rslora=use_rslora
    )
    adapter["config"][name] = {**layer_config.to_json(), "kernel_shape": list(kernel_shape)}
    adapter["weights"][name] = {"lora_a": a, "lora_b": b}
  if not modules:
    raise ValueError(f"{WEIGHTS_FILE} in {os.fspath(directory)!r} holds no LoRA weights")
  return adapter
