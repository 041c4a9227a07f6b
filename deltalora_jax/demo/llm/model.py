"""A compact Llama in Flax NNX whose projections are ``nnx.Linear``, with a KV cache.

The seven projections of a block (``q_proj``, ``k_proj``, ``v_proj``,
``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``) are plain
``nnx.Linear`` without bias, named as in transformers' ``LlamaForCausalLM``,
so :func:`deltalora_jax.adapt_nnx` adapts them as they are and the adapted
layers' paths (``layers/3/self_attn/q_proj``) map one to one to transformers'
module names (:func:`hf_module_name`). The model computes: grouped-query
attention with rotary position embeddings (transformers' ``rotate_half``
layout), RMSNorm, a SwiGLU MLP and an output head tied to the token
embedding.

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


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Sizes of a Llama decoder; the defaults are SmolLM2-135M.

  Attributes:
    vocab_size: token ids.
    hidden_size: width of the residual stream ``d``.
    intermediate_size: width of the SwiGLU MLP.
    num_layers: decoder blocks.
    num_heads: query heads; ``head_dim = hidden_size / num_heads``.
    num_kv_heads: key and value heads (grouped-query attention); divides ``num_heads``.
    rope_theta: base of the rotary frequencies.
    rms_norm_eps: epsilon of every RMSNorm.
  """

  vocab_size: int = 49152
  hidden_size: int = 576
  intermediate_size: int = 1536
  num_layers: int = 30
  num_heads: int = 9
  num_kv_heads: int = 3
  rope_theta: float = 100000.0
  rms_norm_eps: float = 1e-5

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
    if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"num_heads must divide hidden_size and num_kv_heads num_heads, got hidden_size="
        f"{self.hidden_size}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}"
      )

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @classmethod
  def from_gguf(cls, meta: dict[str, Any]) -> LlamaConfig:
    """The config of a llama GGUF's metadata (``llama.*`` keys)."""
    head_dim = meta["llama.embedding_length"] // meta["llama.attention.head_count"]
    rope = meta.get("llama.rope.dimension_count", head_dim)
    if rope != head_dim:
      raise ValueError(f"partial rotary embeddings are not computed: rope {rope}, head {head_dim}")
    return cls(
      vocab_size=int(meta["llama.vocab_size"]),
      hidden_size=int(meta["llama.embedding_length"]),
      intermediate_size=int(meta["llama.feed_forward_length"]),
      num_layers=int(meta["llama.block_count"]),
      num_heads=int(meta["llama.attention.head_count"]),
      num_kv_heads=int(meta["llama.attention.head_count_kv"]),
      rope_theta=float(meta["llama.rope.freq_base"]),
      rms_norm_eps=float(meta["llama.attention.layer_norm_rms_epsilon"]),
    )


class RMSNorm(nnx.Module):
  """``x / sqrt(mean(x^2) + eps) * weight``, computed in float32 (as transformers)."""

  def __init__(self, size: int, eps: float):
    self.weight = nnx.Param(jnp.ones((size,), jnp.float32))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    weight = self.weight[...].reshape((1,) * (x.ndim - 1) + (-1,))
    return (weight * x32).astype(x.dtype)


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
  def __init__(self, config: LlamaConfig, dtype: Any, rngs: nnx.Rngs, init: Any = None):
    d, hd = config.hidden_size, config.head_dim
    self.config = config
    self.q_proj = _linear(d, config.num_heads * hd, dtype, rngs, init)
    self.k_proj = _linear(d, config.num_kv_heads * hd, dtype, rngs, init)
    self.v_proj = _linear(d, config.num_kv_heads * hd, dtype, rngs, init)
    self.o_proj = _linear(config.num_heads * hd, d, dtype, rngs, init)

  def __call__(self, x, positions, mask, cache, start):
    """``mask [b, s, t]``: may query ``s`` see key ``t``; ``cache``: ``(k, v)`` or None."""
    c = self.config
    b, s, _ = x.shape
    q = self.q_proj(x).reshape(b, s, c.num_heads, c.head_dim)
    k = self.k_proj(x).reshape(b, s, c.num_kv_heads, c.head_dim)
    v = self.v_proj(x).reshape(b, s, c.num_kv_heads, c.head_dim)
    q, k = rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta)
    if cache is not None:
      k_cache, v_cache = cache
      k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, start, 0, 0))
      v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, start, 0, 0))
      cache = (k, v)
    groups = c.num_heads // c.num_kv_heads
    q = q.reshape(b, s, c.num_kv_heads, groups, c.head_dim)
    scores = jnp.einsum("bskgd,btkd->bkgst", q, k.astype(q.dtype)).astype(jnp.float32)
    scores = scores / np.sqrt(c.head_dim).astype(np.float32)
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

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
  def __init__(self, config: LlamaConfig, dtype: Any, rngs: nnx.Rngs, init: Any = None):
    self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
    self.self_attn = Attention(config, dtype, rngs, init)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
    self.mlp = MLP(config, dtype, rngs, init)

  def __call__(self, x, positions, mask, cache, start):
    h, cache = self.self_attn(self.input_layernorm(x), positions, mask, cache, start)
    x = x + h
    return x + self.mlp(self.post_attention_layernorm(x)), cache


class Llama(nnx.Module):
  """The decoder: token embedding, ``num_layers`` blocks, a final RMSNorm, the tied head.

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
    self.layers = nnx.List([Block(config, dtype, rngs, init) for _ in range(config.num_layers)])
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

  def __call__(self, ids, positions, mask, cache=None, start=0):
    """Logits ``[b, s, vocab]`` (float32) and the updated cache (a list of ``(k, v)`` or None)."""
    x = self.embed_tokens.embedding[...][ids].astype(self.dtype)
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
