"""A Flax Linen BERT encoder (MiniLM-L6 layout) whose dense layers can be adapted.

Every dense layer of the encoder is built by :meth:`Adapter.dense`, which
returns ``nn.Dense`` or :class:`deltalora_jax.DeltaLoRADense` according to the
layer's role, so the same module serves the frozen encoder, plain LoRA, the
seed's Delta-LoRA and full fine-tuning, and the pretrained checkpoint loads
into each without renaming (an adapted layer keeps ``kernel`` and ``bias``).

Layout of the parameters (``params``), per layer ``layer_{i}``::

    embeddings/{word,position,token_type}_embeddings/embedding, embeddings/norm
    layer_{i}/{query,key,value,attention_output}/{kernel,bias}, layer_{i}/attention_norm
    layer_{i}/{intermediate,output}/{kernel,bias}, layer_{i}/output_norm
    pooler/{kernel,bias}
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from deltalora_jax.demo.checks import check_divides, check_ints
from deltalora_jax.linen import DeltaLoRADense

ATTENTION = ("query", "key", "value", "attention_output")
MLP = ("intermediate", "output")
ROLES = (*ATTENTION, *MLP, "pooler")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Sizes of a BERT encoder; the defaults are MiniLM-L6 (all-MiniLM-L6-v2).

  Attributes:
    vocab_size: number of token ids.
    hidden_size: width of the residual stream.
    num_layers: number of transformer layers.
    num_heads: attention heads; must divide ``hidden_size``.
    intermediate_size: width of the feed-forward layer.
    max_position: number of position embeddings.
    type_vocab_size: number of token types (segments).
    layer_norm_eps: epsilon of every LayerNorm.
  """

  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12

  def __post_init__(self):
    sizes = [f.name for f in dataclasses.fields(self) if f.name != "layer_norm_eps"]
    check_ints(self, sizes)
    if not self.layer_norm_eps > 0:
      raise ValueError(f"layer_norm_eps must be > 0, got layer_norm_eps={self.layer_norm_eps!r}")
    check_divides(self, "num_heads", "hidden_size")


@dataclasses.dataclass(frozen=True)
class Adapter:
  """Which dense layers of the encoder become :class:`~deltalora_jax.DeltaLoRADense`.

  Attributes:
    rank: LoRA rank ``r``.
    alpha: LoRA alpha (None: ``alpha = r``).
    delta_scaling: ``ds`` of the delta term.
    use_delta: create ``D`` (the seed's rule); False gives plain LoRA.
    targets: roles to adapt, a subset of :data:`ROLES`; by default the four
      attention projections.
    extra: further keyword arguments of ``DeltaLoRADense``, as ``(name, value)``
      pairs (kept hashable), for modes that later rules add.

  Example:
    >>> Adapter(rank=4).dense("query", 8, "query").rank
    4
    >>> type(Adapter(rank=4).dense("intermediate", 8, "intermediate")).__name__
    'Dense'
  """

  rank: int = 8
  alpha: float | None = None
  delta_scaling: float = 0.1
  use_delta: bool = True
  targets: tuple[str, ...] = ATTENTION
  extra: tuple[tuple[str, object], ...] = ()

  def __post_init__(self):
    unknown = sorted(set(self.targets) - set(ROLES))
    if unknown or not self.targets:
      raise ValueError(f"targets must be a non-empty subset of {ROLES}, got targets={self.targets}")

  def dense(self, role: str, features: int, name: str) -> nn.Module:
    """The layer for ``role``: adapted when ``role`` is a target, else ``nn.Dense``."""
    if role not in self.targets:
      return nn.Dense(features, name=name)
    return DeltaLoRADense(
      features,
      rank=self.rank,
      alpha=self.alpha,
      delta_scaling=self.delta_scaling,
      use_delta=self.use_delta,
      name=name,
      **dict(self.extra),
    )


def _dense(adapter: Adapter | None, role: str, features: int) -> nn.Module:
  if adapter is None:
    return nn.Dense(features, name=role)
  return adapter.dense(role, features, role)


def gelu(x: jax.Array) -> jax.Array:
  r"""BERT's exact GELU, :math:`x \Phi(x) = x (1 + \operatorname{erf}(x / \sqrt 2)) / 2`.

  The same function as ``jax.nn.gelu(x, approximate=False)`` and written as
  PyTorch writes it. ``jax.nn.gelu`` goes through ``erfc``, which XLA's CPU
  backend evaluates about 3 times slower than ``erf`` (1.7 against 0.6 ms
  for a ``[1024, 1536]`` forward pass); in the MiniLM training step this form
  saved 30 to 37 ms a step (``benchmarks/README.md``). The two differ by at
  most 1e-6 (for very negative ``x``, where both are within 1e-6 of 0).

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.linspace(-6.0, 6.0, 101)
    >>> bool(jnp.max(jnp.abs(gelu(x) - jax.nn.gelu(x, approximate=False))) < 1e-6)
    True
  """
  return x * (0.5 + 0.5 * jax.lax.erf(x * (1 / math.sqrt(2))))


class BertLayer(nn.Module):
  """One post-LayerNorm transformer layer of BERT."""

  config: BertConfig
  adapter: Adapter | None = None

  @nn.compact
  def __call__(self, hidden: jax.Array, mask: jax.Array) -> jax.Array:
    c = self.config
    batch, length, _ = hidden.shape
    heads, head_dim = c.num_heads, c.hidden_size // c.num_heads

    def project(role):
      out = _dense(self.adapter, role, c.hidden_size)(hidden)
      return jnp.reshape(out, (batch, length, heads, head_dim))

    q, k, v = project("query"), project("key"), project("value")
    attended = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :])
    attended = jnp.reshape(attended, (batch, length, c.hidden_size))
    attended = _dense(self.adapter, "attention_output", c.hidden_size)(attended)
    hidden = nn.LayerNorm(epsilon=c.layer_norm_eps, name="attention_norm")(hidden + attended)
    inner = gelu(_dense(self.adapter, "intermediate", c.intermediate_size)(hidden))
    out = _dense(self.adapter, "output", c.hidden_size)(inner)
    return nn.LayerNorm(epsilon=c.layer_norm_eps, name="output_norm")(hidden + out)


class BertEncoder(nn.Module):
  """BERT encoder: embeddings, ``num_layers`` layers and the pooler.

  Attributes:
    config: the sizes.
    adapter: which dense layers are adapted; None: all are ``nn.Dense``.

  Returns ``(hidden [batch, length, hidden_size], pooled [batch, hidden_size])``
  where ``pooled`` is BERT's pooler (``tanh`` of a dense layer on the first
  token); XLA drops it when only ``hidden`` is used.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> config = BertConfig(vocab_size=10, hidden_size=8, num_layers=1, num_heads=2,
    ...                     intermediate_size=16, max_position=8)
    >>> ids = jnp.ones((2, 5), jnp.int32)
    >>> variables = BertEncoder(config).init(jax.random.key(0), ids, ids)
    >>> hidden, pooled = BertEncoder(config).apply(variables, ids, ids)
    >>> hidden.shape, pooled.shape
    ((2, 5, 8), (2, 8))
  """

  config: BertConfig
  adapter: Adapter | None = None

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    c = self.config
    length = ids.shape[-1]
    if length > c.max_position:
      raise ValueError(
        f"ids must have at most {c.max_position} tokens (max_position), got shape {ids.shape}"
      )
    words = nn.Embed(c.vocab_size, c.hidden_size, name="word_embeddings")(ids)
    positions = nn.Embed(c.max_position, c.hidden_size, name="position_embeddings")(
      jnp.arange(length)[None]
    )
    types = nn.Embed(c.type_vocab_size, c.hidden_size, name="token_type_embeddings")(
      jnp.zeros((1, length), jnp.int32)
    )
    hidden = nn.LayerNorm(epsilon=c.layer_norm_eps, name="embeddings_norm")(
      words + positions + types
    )
    mask = mask.astype(jnp.bool_)
    for i in range(c.num_layers):
      hidden = BertLayer(c, self.adapter, name=f"layer_{i}")(hidden, mask)
    pooled = jnp.tanh(_dense(self.adapter, "pooler", c.hidden_size)(hidden[:, 0]))
    return hidden, pooled


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  r"""Mean of the token vectors over the real (unmasked) tokens.

  .. math::

    e_b = \sum_t m_{bt} h_{bt} / \max(1, \sum_t m_{bt})

  Example:
    >>> import jax.numpy as jnp
    >>> mean_pool(jnp.array([[[1.0], [3.0], [100.0]]]), jnp.array([[1, 1, 0]]))
    Array([[2.]], dtype=float32)
  """
  weights = mask.astype(hidden.dtype)[..., None]
  total = jnp.sum(hidden * weights, axis=-2)
  count = jnp.maximum(jnp.sum(weights, axis=-2), jnp.ones((), hidden.dtype))
  return total / count


class SentenceEncoder(nn.Module):
  """The sentence embedding of all-MiniLM-L6-v2: mean pooling, then unit length."""

  config: BertConfig
  adapter: Adapter | None = None

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    hidden, _ = BertEncoder(self.config, self.adapter, name="encoder")(ids, mask)
    pooled = mean_pool(hidden, mask)
    norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
    return pooled / jnp.maximum(norm, jnp.full((), 1e-12, pooled.dtype))


class SentimentClassifier(nn.Module):
  """BERT encoder, mean pooling and a new linear head of ``num_classes`` logits.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> config = BertConfig(vocab_size=10, hidden_size=8, num_layers=1, num_heads=2,
    ...                     intermediate_size=16, max_position=8)
    >>> model = SentimentClassifier(config, Adapter(rank=2))
    >>> ids = jnp.ones((2, 5), jnp.int32)
    >>> model.apply(model.init(jax.random.key(0), ids, ids), ids, ids).shape
    (2, 3)
  """

  config: BertConfig
  adapter: Adapter | None = None
  num_classes: int = 3

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    hidden, _ = BertEncoder(self.config, self.adapter, name="encoder")(ids, mask)
    return nn.Dense(self.num_classes, name="head")(mean_pool(hidden, mask))
