"""Writing a PEFT LoRA directory (or merged PyTorch weights): :func:`save_peft`."""

from __future__ import annotations

import collections
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx, traverse_util
from safetensors import numpy as safetensors_numpy

from deltalora_jax import core, paths, tree
from deltalora_jax import nnx as nnx_front
from deltalora_jax.adapt import linen as linen_adapt
from deltalora_jax.adapt import nnx as nnx_adapt
from deltalora_jax.adapt import targets
from deltalora_jax.adapt.peft import layout
from deltalora_jax.adapt.peft.layout import (
  CONFIG_FILE,
  LORA_CONFIG_DEFAULTS,
  MERGED_FILE,
  PREFIX,
  RULES,
  WEIGHTS_FILE,
  ModuleNames,
  Rule,
)
from deltalora_jax.config import LayerConfig

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
    change = change + config.delta_scaling * layout.matrix(projection, arrays["delta"])
  if base_kernel is not None:
    change = (
      change + layout.matrix(projection, arrays["kernel"]) - layout.matrix(projection, base_kernel)
    )
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
  found = tree.with_float_bases(tree.layer_arrays(model_or_variables, layers), sample)  # int8
  names = _written_names(found, module_names)
  configs = {name: found[name][0] for name in names}
  _check_rule(rule, rank, merged, base, configs)
  for name, config in configs.items():
    layout.check_layer(name, config.projection, found[name][1]["kernel"].shape)
    layout.check_fused(name, config.projection, found[name][1]["kernel"].shape, len(names[name]))
  needs_base = any(
    not c.freeze_base or (rule == "paper" and c.paper_lambda is None) for c in configs.values()
  )
  kernels0 = _base_kernels(base, list(names)) if base is not None and needs_base else {}
  layers_written = {name: (*found[name], kernels0.get(name)) for name in names}
  os.makedirs(directory, exist_ok=True)
  if merged:
    return _save_merged(directory, rule, layers_written, names)
  report, applied = _save_adapters(
    directory,
    rule,
    rank,
    layers_written,
    names,
    (task_type, base_model_name_or_path),
    keep_kernels=sample is not None,
  )
  if sample is not None:
    inputs = sample if isinstance(sample, tuple) else (sample,)
    report["output_error"] = (
      _output_error(model_or_variables, layers, inputs, applied) if applied else 0.0
    )
  return report


#: A layer to write: its config, its arrays and its pretrained kernel (None: not needed).
_Layer = tuple[LayerConfig, Mapping[str, Any], np.ndarray | None]


def _written_names(
  found: Mapping[str, Any], module_names: ModuleNames
) -> dict[str, tuple[str, ...]]:
  """``{layer name: PyTorch module names}`` of the layers ``module_names`` names, each once."""
  names: dict[str, tuple[str, ...]] = {}
  for name in found:
    modules = layout.module_name(module_names, name)
    if modules is not None:
      names[name] = modules
  if not names:
    raise ValueError(f"module_names names none of the adapted layers {sorted(found)}")
  every = [module for modules in names.values() for module in modules]
  if len(set(every)) != len(every):
    counts = collections.Counter(every)
    raise ValueError(f"module_names gives one module to several layers: {counts.most_common(1)}")
  return names


def _save_merged(
  directory: str | os.PathLike[str],
  rule: str,
  layers: Mapping[str, _Layer],
  names: Mapping[str, tuple[str, ...]],
) -> dict[str, Any]:
  """``merged=True``: the merged weights ``W + change``, PyTorch's layout, ``model.safetensors``."""
  state = {}
  report: dict[str, Any] = {"rule": rule, "layers": {}}
  for name, modules in names.items():
    config, arrays, kernel0 = layers[name]
    projection = config.projection
    change = _change(rule, config, arrays, kernel0)
    kernel = np.asarray(arrays["kernel"] if kernel0 is None else kernel0, np.float64)
    full = layout.unmatrix(projection, layout.matrix(projection, kernel) + change, kernel.shape)
    weights = np.split(layout.torch_weight(projection, full), len(modules))  # a fused kernel's rows
    biases = (
      np.split(layout.torch_bias(projection, np.asarray(arrays["bias"])), len(modules))
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


def _factors(
  rule: str, rank: int | None, layer: _Layer
) -> tuple[np.ndarray, np.ndarray, int, float, float, np.ndarray | None]:
  """``(A, B, k, scaling, error, change)`` written for one layer by ``rule``.

  ``change`` is the kernel's change ``U V`` of a truncated (or rank-``2r``) export, for the
  output error; None when the factors are written as they are.
  """
  config, arrays, kernel0 = layer
  if rule == "lora":
    a, b = np.asarray(arrays["lora_a"], np.float32), np.asarray(arrays["lora_b"], np.float32)
    return a, b, config.rank, config.scaling, 0.0, None
  if rule == "paper" and config.paper_lambda is not None and config.freeze_base:
    a, b = _telescoped_factors(config, arrays)  # exact at rank 2r
    return a, b, 2 * config.rank, config.scaling, 0.0, None
  change = _change(rule, config, arrays, kernel0)
  k = min(2 * config.rank if rule == "paper" else int(rank or 0), *change.shape)
  u, v, error = _truncated(change, k)
  a_shape, b_shape = config.projection.factor_shapes(tuple(arrays["kernel"].shape), k)
  kernel_change = u.astype(np.float64) @ v.astype(np.float64)
  return np.reshape(u, a_shape), np.reshape(v, b_shape), k, 1.0, error, kernel_change


def _save_adapters(
  directory: str | os.PathLike[str],
  rule: str,
  rank: int | None,
  layers: Mapping[str, _Layer],
  names: Mapping[str, tuple[str, ...]],
  written_as: tuple[str | None, str | None],
  *,
  keep_kernels: bool,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """The adapter: ``adapter_config.json`` and ``adapter_model.safetensors``.

  ``written_as`` is ``(task_type, base_model_name_or_path)``. Returns the report and, with
  ``keep_kernels``, for the layers whose written change is not their own factors, the
  kernel each would merge to (for :func:`_output_error`).
  """
  report: dict[str, Any] = {"rule": rule, "layers": {}}
  written: dict[str, tuple[str, int, float]] = {}
  tensors: dict[str, np.ndarray] = {}
  applied: dict[str, np.ndarray] = {}
  use_rslora = rule == "lora" and all(layers[n][0].use_rslora for n in names)
  for name, modules in names.items():
    config, arrays, kernel0 = layers[name]
    a, b, k, scaling, error, kernel_change = _factors(rule, rank, layers[name])
    torch_a, torch_b = layout.torch_factors(config.projection, a, b)
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
    if keep_kernels and kernel_change is not None:
      kernel = np.asarray(arrays["kernel"] if kernel0 is None else kernel0, np.float64)
      shape = tuple(arrays["kernel"].shape)
      merged = layout.matrix(config.projection, kernel) + kernel_change
      applied[name] = layout.unmatrix(config.projection, merged, shape)
  config_json = _config_json(written, use_rslora, *written_as)
  with open(os.path.join(directory, CONFIG_FILE), "w") as file:
    json.dump(config_json, file, indent=2, sort_keys=True)
  safetensors_numpy.save_file(
    tensors, os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"}
  )
  report["files"] = [CONFIG_FILE, WEIGHTS_FILE]
  return report, applied


def _reported(modules: tuple[str, ...]) -> str | list[str]:
  """A layer's module name in the report: the name, or a fused kernel's list of names."""
  return modules[0] if len(modules) == 1 else list(modules)
