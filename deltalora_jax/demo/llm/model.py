"""A compact Llama / Gemma 3 decoder in Flax NNX whose projections are ``nnx.Linear``.

The seven projections of a block (``q_proj``, ``k_proj``, ``v_proj``,
``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``) are plain
``nnx.Linear`` without bias, named as in transformers' ``LlamaForCausalLM``,
so :func:`deltalora_jax.adapt_nnx` adapts them as they are and the adapted
layers' paths (``layers/3/self_attn/q_proj``) map one to one to transformers'
module names (:func:`hf_module_name`). The model computes: grouped-query
attention with rotary position embeddings (transformers' ``rotate_half``
layout), RMSNorm, a SwiGLU MLP and an output head tied to the token
embedding.

Gemma 3 is the same block with the flags of :class:`LlamaConfig` set
(:func:`gemma3_270m_config`, or :meth:`LlamaConfig.from_gguf` of a ``gemma3``
file): the embedding scaled by ``sqrt(d)``, RMSNorm weights ``1 + w``, RMSNorm
on each head's queries and keys (``q_norm``, ``k_norm``), scores scaled by
``query_pre_attn_scalar ** -0.5``, a gated GELU (tanh) MLP, norms after
attention and after the MLP besides before them (``post_attention_layernorm``,
``pre_feedforward_layernorm``, ``post_feedforward_layernorm``, transformers'
``Gemma3DecoderLayer`` names), and local layers that see the last
``sliding_window`` positions only, with their own rope base. One code path:
every block reads its flags.

:func:`forward` runs a batch of left-padded sequences, with or without a KV
cache; :func:`generate` is greedy decoding compiled once per shape (a prefill,
then a ``lax.fori_loop`` of one-token steps writing the cache in place).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deltalora_jax.demo.checks import check_divides, check_ints

FULL, SLIDING = "full_attention", "sliding_attention"
ACTIVATIONS = ("silu", "gelu_tanh")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Sizes and flags of a Llama or Gemma 3 decoder; the defaults are SmolLM2-135M (Llama).

  Attributes:
    vocab_size: token ids.
    hidden_size: width of the residual stream ``d``.
    intermediate_size: width of the gated MLP.
    num_layers: decoder blocks.
    num_heads: query heads.
    num_kv_heads: key and value heads (grouped-query attention); divides ``num_heads``.
    rope_theta: base of the rotary frequencies (of the global layers).
    rms_norm_eps: epsilon of every RMSNorm.
    head_dim: width of a head; None: ``hidden_size / num_heads``.
    activation: of the gated MLP, ``'silu'`` (SwiGLU) or ``'gelu_tanh'`` (GeGLU).
    norm_offset: an RMSNorm multiplies by ``norm_offset + weight`` (Gemma: 1, weights
      stored centred on 0 as in transformers).
    scale_embedding: multiply the token embedding by ``sqrt(hidden_size)`` (Gemma).
    qk_norm: RMSNorm on each head's queries and keys before the rotary embedding.
    sandwich_norms: RMSNorm on the attention's and the MLP's outputs too (Gemma 2/3).
    query_pre_attn_scalar: scores are scaled by its ``-1/2`` power; None: ``head_dim``.
    layer_types: per layer ``'full_attention'`` or ``'sliding_attention'``; None: all full.
    sliding_window: keys a sliding layer's query sees (itself included).
    local_rope_theta: rope base of the sliding layers.
  """

  vocab_size: int = 49152
  hidden_size: int = 576
  intermediate_size: int = 1536
  num_layers: int = 30
  num_heads: int = 9
  num_kv_heads: int = 3
  rope_theta: float = 100000.0
  rms_norm_eps: float = 1e-5
  head_dim: int = None  # type: ignore[assignment]  # resolved to an int in __post_init__
  activation: str = "silu"
  norm_offset: float = 0.0
  scale_embedding: bool = False
  qk_norm: bool = False
  sandwich_norms: bool = False
  query_pre_attn_scalar: float | None = None
  layer_types: tuple[str, ...] | None = None
  sliding_window: int | None = None
  local_rope_theta: float = 10000.0

  def __post_init__(self):
    check_ints(
      self,
      ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"),
    )
    if self.head_dim is None:
      check_divides(self, "num_heads", "hidden_size", when=" when head_dim is None")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    elif not isinstance(self.head_dim, int) or isinstance(self.head_dim, bool) or self.head_dim < 1:
      raise ValueError(f"head_dim must be a positive int or None, got head_dim={self.head_dim!r}")
    check_divides(self, "num_kv_heads", "num_heads")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation must be among {ACTIVATIONS}, got {self.activation!r}")
    if self.layer_types is not None:
      object.__setattr__(self, "layer_types", tuple(self.layer_types))
      types = self.layer_types
      if len(types) != self.num_layers or any(t not in (FULL, SLIDING) for t in types):
        raise ValueError(
          f"layer_types must hold {self.num_layers} (num_layers) of {FULL!r}, {SLIDING!r}, "
          f"got layer_types={types!r}"
        )
      window = self.sliding_window
      if SLIDING in types and (
        isinstance(window, bool) or not isinstance(window, int) or window <= 0
      ):
        raise ValueError(
          f"sliding_window must be a positive int with sliding layers, got {window!r}"
        )

  def sliding(self, layer: int) -> bool:
    """Whether block ``layer`` attends over the last ``sliding_window`` positions only."""
    return self.layer_types is not None and self.layer_types[layer] == SLIDING

  @classmethod
  def from_gguf(cls, meta: dict[str, Any]) -> LlamaConfig:
    """The config of a ``llama`` or ``gemma3`` GGUF's metadata.

    For ``gemma3``, what the file does not hold is taken as transformers'
    ``Gemma3TextConfig`` takes it when it loads the file: ``query_pre_attn_scalar``
    256, local rope base 10,000, and every sixth layer global (the others sliding).
    """
    arch = meta.get("general.architecture")
    if arch not in ("llama", "gemma3"):
      raise ValueError(f"general.architecture must be 'llama' or 'gemma3', got {arch!r}")
    heads = int(meta[f"{arch}.attention.head_count"])
    width = int(meta[f"{arch}.embedding_length"])
    head_dim = int(meta.get(f"{arch}.attention.key_length", width // heads))
    rope = meta.get(f"{arch}.rope.dimension_count", head_dim)
    if rope != head_dim:
      raise ValueError(f"partial rotary embeddings are not computed: rope {rope}, head {head_dim}")
    layers = int(meta[f"{arch}.block_count"])
    common = dict(
      hidden_size=int(meta[f"{arch}.embedding_length"]),
      intermediate_size=int(meta[f"{arch}.feed_forward_length"]),
      num_layers=layers,
      num_heads=heads,
      num_kv_heads=int(meta[f"{arch}.attention.head_count_kv"]),
      rope_theta=float(meta[f"{arch}.rope.freq_base"]),
      rms_norm_eps=float(meta[f"{arch}.attention.layer_norm_rms_epsilon"]),
      head_dim=head_dim,
    )
    if arch == "llama":
      return cls(vocab_size=int(meta["llama.vocab_size"]), **common)
    pattern = 6  # transformers' Gemma3TextConfig default; the file holds no pattern
    return cls(
      vocab_size=int(meta.get("gemma3.vocab_size", meta["tokenizer.ggml.token_count"])),
      **common,
      **_GEMMA3_FLAGS,
      layer_types=tuple(SLIDING if (i + 1) % pattern else FULL for i in range(layers)),
      sliding_window=int(meta["gemma3.attention.sliding_window"]),
    )


_GEMMA3_FLAGS = dict(
  activation="gelu_tanh",
  norm_offset=1.0,
  scale_embedding=True,
  qk_norm=True,
  sandwich_norms=True,
  query_pre_attn_scalar=256.0,
  local_rope_theta=10000.0,
)


def gemma3_270m_config(num_layers: int = 18) -> LlamaConfig:
  """Gemma 3 270M's sizes (18 layers, d 640, 4 heads / 1 KV head of 256, vocabulary 262,144).

  ``num_layers`` cuts it (the layer pattern kept: every sixth layer global).
  A random-initialised model of these shapes is ``Llama(gemma3_270m_config(), rngs=...)``.

  Example:
    >>> config = gemma3_270m_config()
    >>> config.head_dim, config.layer_types[4:7], config.sliding_window
    (256, ('sliding_attention', 'full_attention', 'sliding_attention'), 512)
  """
  return LlamaConfig(
    vocab_size=262144,
    hidden_size=640,
    intermediate_size=2048,
    num_layers=num_layers,
    num_heads=4,
    num_kv_heads=1,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    head_dim=256,
    **_GEMMA3_FLAGS,
    layer_types=tuple(SLIDING if (i + 1) % 6 else FULL for i in range(num_layers)),
    sliding_window=512,
  )


class RMSNorm(nnx.Module):
  """``x / sqrt(mean(x^2) + eps) * (offset + weight)``, in float32 (as transformers).

  ``offset`` is 0 for Llama (weights start at 1) and 1 for Gemma (weights start at 0).
  """

  def __init__(self, size: int, eps: float, offset: float = 0.0):
    self.weight = nnx.Param(jnp.full((size,), 1.0 - offset, jnp.float32))
    self.eps = eps
    self.offset = offset

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    weight = self.weight[...].reshape((1,) * (x.ndim - 1) + (-1,))
    if self.offset:
      weight = self.offset + weight
    return (weight * x32).astype(x.dtype)


def _norm(config: LlamaConfig, size: int | None = None) -> RMSNorm:
  return RMSNorm(
    config.hidden_size if size is None else size, config.rms_norm_eps, config.norm_offset
  )


def _linear(n_in: int, n_out: int, dtype: Any, rngs: nnx.Rngs, init: Any) -> nnx.Linear:
  extra = {} if init is None else {"kernel_init": init}
  return nnx.Linear(
    n_in, n_out, use_bias=False, dtype=dtype, param_dtype=jnp.float32, rngs=rngs, **extra
  )


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding of ``x [batch, seq, heads, d]`` at ``positions [batch, seq]``.

  Pairs ``(i, i + d/2)`` rotate by ``position * theta^(-2i/d)`` (transformers'
  ``rotate_half``); computed in float32.
  """
  d = x.shape[-1]
  inv = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  angles = positions.astype(jnp.float32)[..., None] * inv[None, None]  # [b, s, d/2]
  cos = jnp.concatenate([jnp.cos(angles)] * 2, -1)[:, :, None, :]
  sin = jnp.concatenate([jnp.sin(angles)] * 2, -1)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  rotated = jnp.concatenate([-x32[..., d // 2 :], x32[..., : d // 2]], -1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


class Attention(nnx.Module):
  def __init__(
    self, config: LlamaConfig, dtype: Any, rngs: nnx.Rngs, init: Any = None, layer: int = 0
  ):
    d, hd = config.hidden_size, config.head_dim
    self.config = config
    self.q_proj = _linear(d, config.num_heads * hd, dtype, rngs, init)
    self.k_proj = _linear(d, config.num_kv_heads * hd, dtype, rngs, init)
    self.v_proj = _linear(d, config.num_kv_heads * hd, dtype, rngs, init)
    self.o_proj = _linear(config.num_heads * hd, d, dtype, rngs, init)
    if config.qk_norm:
      self.q_norm = _norm(config, hd)
      self.k_norm = _norm(config, hd)
    sliding = config.sliding(layer)
    self.window = config.sliding_window if sliding else None
    self.theta = config.local_rope_theta if sliding else config.rope_theta

  def __call__(self, x, positions, mask, cache, start):
    """``mask [b, s, t]``: may query ``s`` see key ``t``; ``cache``: ``(k, v)`` or None.

    Query ``i`` is key ``start + i``; a sliding layer also hides keys ``window``
    or more before it.
    """
    c = self.config
    b, s, _ = x.shape
    q = self.q_proj(x).reshape(b, s, c.num_heads, c.head_dim)
    k = self.k_proj(x).reshape(b, s, c.num_kv_heads, c.head_dim)
    v = self.v_proj(x).reshape(b, s, c.num_kv_heads, c.head_dim)
    if c.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = rope(q, positions, self.theta), rope(k, positions, self.theta)
    if cache is not None:
      k_cache, v_cache = cache
      k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, start, 0, 0))
      v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, start, 0, 0))
      cache = (k, v)
    if self.window is not None:
      query = start + jnp.arange(s)
      near = jnp.arange(mask.shape[-1])[None, :] > query[:, None] - self.window
      mask = mask & near[None]
    groups = c.num_heads // c.num_kv_heads
    q = q.reshape(b, s, c.num_kv_heads, groups, c.head_dim)
    scores = jnp.einsum("bskgd,btkd->bkgst", q, k.astype(q.dtype)).astype(jnp.float32)
    scalar = c.head_dim if c.query_pre_attn_scalar is None else c.query_pre_attn_scalar
    scores = scores * np.float32(scalar**-0.5)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", weights, v.astype(q.dtype))
    return self.o_proj(out.reshape(b, s, c.num_heads * c.head_dim)), cache


class MLP(nnx.Module):
  def __init__(self, config: LlamaConfig, dtype: Any, rngs: nnx.Rngs, init: Any = None):
    d, f = config.hidden_size, config.intermediate_size
    self.gate_proj = _linear(d, f, dtype, rngs, init)
    self.up_proj = _linear(d, f, dtype, rngs, init)
    self.down_proj = _linear(f, d, dtype, rngs, init)
    self.gelu = config.activation == "gelu_tanh"

  def __call__(self, x):
    gate = self.gate_proj(x)
    gate = jax.nn.gelu(gate, approximate=True) if self.gelu else jax.nn.silu(gate)
    return self.down_proj(gate * self.up_proj(x))


class Block(nnx.Module):
  """A decoder block. Llama: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``, the second
  norm named ``post_attention_layernorm`` (transformers' name); with ``sandwich_norms``
  (Gemma) ``x + norm(attn(norm(x)))`` then ``x + norm(mlp(norm(x)))``, the four norms
  named as in ``Gemma3DecoderLayer``."""

  def __init__(
    self, config: LlamaConfig, dtype: Any, rngs: nnx.Rngs, init: Any = None, layer: int = 0
  ):
    self.input_layernorm = _norm(config)
    self.self_attn = Attention(config, dtype, rngs, init, layer)
    self.post_attention_layernorm = _norm(config)
    if config.sandwich_norms:
      self.pre_feedforward_layernorm = _norm(config)
      self.post_feedforward_layernorm = _norm(config)
    self.mlp = MLP(config, dtype, rngs, init)
    self.sandwich = config.sandwich_norms

  def __call__(self, x, positions, mask, cache, start):
    h, cache = self.self_attn(self.input_layernorm(x), positions, mask, cache, start)
    if not self.sandwich:
      x = x + h
      return x + self.mlp(self.post_attention_layernorm(x)), cache
    x = x + self.post_attention_layernorm(h)
    h = self.mlp(self.pre_feedforward_layernorm(x))
    return x + self.post_feedforward_layernorm(h), cache


class Llama(nnx.Module):
  """The decoder (Llama or Gemma 3, by its config): token embedding, ``num_layers`` blocks,
  a final RMSNorm, the tied head.

  ``dtype`` is the compute dtype of the projections and the residual stream
  (parameters stay float32); norms, rotary embeddings, attention softmax and
  the logits are float32. ``init``: the initializer of every weight (None: Flax's
  defaults).
  """

  def __init__(
    self, config: LlamaConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs, init: Any = None
  ):
    self.config = config
    self.dtype = dtype
    self.embed_tokens = nnx.Embed(
      config.vocab_size,
      config.hidden_size,
      param_dtype=jnp.float32,
      rngs=rngs,
      **({} if init is None else {"embedding_init": init}),
    )
    self.layers = nnx.List([Block(config, dtype, rngs, init, i) for i in range(config.num_layers)])
    self.norm = _norm(config)

  def __call__(self, ids, positions, mask, cache=None, start=0):
    """Logits ``[b, s, vocab]`` (float32) and the updated cache (a list of ``(k, v)`` or None)."""
    x = self.embed_tokens.embedding[...][ids].astype(self.dtype)
    if self.config.scale_embedding:  # in the compute dtype, as transformers' Gemma 3
      x = x * jnp.asarray(np.sqrt(self.config.hidden_size), self.dtype)
    new_cache = []
    for i, layer in enumerate(self.layers):
      x, layer_cache = layer(x, positions, mask, None if cache is None else cache[i], start)
      new_cache.append(layer_cache)
    x = self.norm(x)
    embedding = self.embed_tokens.embedding[...].astype(self.dtype)
    logits = jnp.einsum("bsd,vd->bsv", x, embedding, preferred_element_type=jnp.float32)
    return logits, (None if cache is None else new_cache)


def causal_mask(valid: jax.Array) -> jax.Array:
  """``[b, s, s]``: query ``i`` sees key ``j <= i`` where ``valid [b, s]`` (padding hidden).

  A padded query row sees itself, so that no row is all masked.
  """
  s = valid.shape[1]
  causal = jnp.tril(jnp.ones((s, s), bool))[None]
  eye = jnp.eye(s, dtype=bool)[None]
  return (causal & valid[:, None, :].astype(bool)) | eye


def positions_of(valid: jax.Array) -> jax.Array:
  """Positions ``0, 1, ...`` counted over the valid tokens of each row (left padding)."""
  return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)


def forward(model: Llama, ids: jax.Array, valid: jax.Array) -> jax.Array:
  """Logits ``[b, s, vocab]`` of padded sequences ``ids [b, s]`` (``valid``: 1 on tokens)."""
  logits, _ = model(ids, positions_of(valid), causal_mask(valid))
  return logits


@functools.lru_cache(maxsize=8)
def _skeleton(config: LlamaConfig, dtype: str):
  """The graph and abstract state of ``Llama(config)``, built once per process (slow on a CPU)."""
  return nnx.split(nnx.eval_shape(lambda: Llama(config, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0))))


def from_tensors(
  config: LlamaConfig, tensors: dict[str, np.ndarray], dtype: Any = jnp.float32
) -> Llama:
  """A :class:`Llama` holding transformers-named float32 tensors (``[out, in]`` weights).

  Every parameter must come from ``tensors`` and every tensor must be used
  (``lm_head.weight`` is accepted only if equal to the embedding: the head is tied).
  """
  graphdef, abstract = _skeleton(config, np.dtype(dtype).name)
  flat = dict(nnx.to_flat_state(abstract))
  names = {}
  for path in flat:
    parts = [str(p) for p in path]
    if parts[-1] == "kernel":
      names[path] = ("model." + ".".join(parts[:-1]) + ".weight", True)
    elif parts[-1] == "embedding":
      names[path] = ("model.embed_tokens.weight", False)
    else:
      names[path] = ("model." + ".".join(parts), False)
  extra = set(tensors) - {n for n, _ in names.values()}
  if "lm_head.weight" in extra:
    if not np.array_equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]):
      raise ValueError("lm_head.weight differs from the embedding; the head must be tied")
    extra.remove("lm_head.weight")
  missing = sorted(n for n, _ in names.values() if n not in tensors)
  if missing or extra:
    raise ValueError(f"checkpoint mismatch: missing {missing[:5]}, unexpected {sorted(extra)[:5]}")
  for path, (name, transpose) in names.items():
    value = np.asarray(tensors[name], np.float32)
    value = value.T if transpose else value
    if value.shape != flat[path].shape:
      raise ValueError(f"tensor {name!r} has shape {value.shape}, expected {flat[path].shape}")
    flat[path] = flat[path].replace(jnp.asarray(value))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def init_cache(config: LlamaConfig, batch: int, length: int, dtype: Any = jnp.float32) -> list:
  """An empty KV cache: per layer ``(k, v)`` of ``[batch, length, kv_heads, head_dim]``."""
  shape = (batch, length, config.num_kv_heads, config.head_dim)
  return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_layers)]


@functools.partial(jax.jit, static_argnames=("graphdef", "new_tokens"))
def _generate(graphdef, state, ids, valid, new_tokens: int):
  model = nnx.merge(graphdef, state)
  b, p = ids.shape
  total = p + new_tokens
  cache = init_cache(model.config, b, total, model.dtype)
  valid_all = jnp.concatenate([valid, jnp.ones((b, new_tokens), valid.dtype)], axis=1)
  positions = positions_of(valid_all)
  # prefill: the prompt sees its own valid tokens, causally
  keys = jnp.arange(total)
  queries = jnp.arange(p)[None, :, None]
  seen = (keys[None, None, :] <= queries) & valid_all[:, None, :].astype(bool)
  prompt_mask = seen | (keys[None, None, :] == queries)
  logits, cache = model(ids, positions[:, :p], prompt_mask, cache, 0)
  token = jnp.argmax(logits[:, -1], axis=-1).astype(ids.dtype)
  out = jnp.zeros((b, new_tokens), ids.dtype).at[:, 0].set(token)

  def body(i, carry):
    out, cache = carry
    t = p + i - 1  # the position of the token fed now
    mask = (keys <= t)[None, None, :] & valid_all[:, None, :].astype(bool)
    pos = jax.lax.dynamic_slice_in_dim(positions, t, 1, axis=1)
    fed = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1)
    logits, cache = model(fed, pos, mask, cache, t)
    token = jnp.argmax(logits[:, -1], axis=-1).astype(ids.dtype)
    return out.at[:, i].set(token), cache

  out, _ = jax.lax.fori_loop(1, new_tokens, body, (out, cache))
  return out


def generate(model: Llama, ids: np.ndarray, valid: np.ndarray, new_tokens: int) -> np.ndarray:
  """Greedy continuations ``[b, new_tokens]`` of left-padded prompts ``ids [b, p]``.

  Compiled once per model structure and shape; the KV cache holds
  ``p + new_tokens`` positions. Stopping at an end-of-turn token is the
  caller's (every row runs ``new_tokens`` steps).
  """
  if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
    raise ValueError(f"new_tokens must be a positive int, got new_tokens={new_tokens!r}")
  graphdef, state = nnx.split(model)
  return np.asarray(_generate(graphdef, state, jnp.asarray(ids), jnp.asarray(valid), new_tokens))
