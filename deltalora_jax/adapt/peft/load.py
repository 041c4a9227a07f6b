"""Reading a PEFT LoRA directory into this library's adapter format: :func:`load_peft`."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import safetensors
from flax import nnx
from safetensors import numpy as safetensors_numpy

from deltalora_jax import nnx as nnx_front
from deltalora_jax import paths, projections
from deltalora_jax.adapt import linen as linen_adapt
from deltalora_jax.adapt import nnx as nnx_adapt
from deltalora_jax.adapt import targets
from deltalora_jax.adapt.peft import layout
from deltalora_jax.adapt.peft.layout import (
  CONFIG_FILE,
  LORA_CONFIG_DEFAULTS,
  PICKLE_FILE,
  UNSUPPORTED,
  WEIGHTS_FILE,
  ModuleNames,
)
from deltalora_jax.config import LayerConfig

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
    >>> _ = dl.save_peft(directory, model, module_names={"layers/0": "fc"})
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
    given = layout.module_name(module_names, name)
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
    if target_modules is not None and not layout.targeted(target_modules, module):
      raise ValueError(
        f"{WEIGHTS_FILE} adapts {module!r}, which target_modules={target_modules!r} does not take"
      )
    if exclude_modules and layout.targeted(exclude_modules, module, "exclude_modules"):
      raise ValueError(
        f"{WEIGHTS_FILE} adapts {module!r}, which exclude_modules={exclude_modules!r} leaves out"
      )
    name = by_module[module]
    projection, kernel_shape, use_bias = layers[name]
    layout.check_layer(name, projection, kernel_shape)
    rank_key, alpha_key = (
      layout.pattern_key(rank_pattern, module),
      layout.pattern_key(alpha_pattern, module),
    )
    rank = int(rank_pattern[rank_key] if rank_key is not None else config.get("r", 8))
    alpha = float(
      alpha_pattern[alpha_key] if alpha_key is not None else config.get("lora_alpha", 8)
    )
    want = layout.torch_shapes(projection, kernel_shape, rank)
    for key, expected in zip(("lora_A", "lora_B"), want, strict=True):
      if tuple(pair[key].shape) != expected:
        raise ValueError(
          f"{WEIGHTS_FILE} {module}.{key}.weight has shape {tuple(pair[key].shape)}; the layer "
          f"{name!r} (kernel {kernel_shape}, r={rank}) needs {expected}"
        )
    a, b = layout.flax_factors(
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
