"""tunix's decoders (Gemma, Gemma 3, Llama 3, Qwen 2, Qwen 3): adapted in full, trained, merged.

Tiny configurations (2 layers, small dimensions, random float32 weights): every projection
of every decoder layer (attention included, fused kernels as one adapter) is adapted; the
output is unchanged right after adapting; both rules train in an ``nnx.Optimizer`` loop; the
seed rule writes no pretrained weight; the merged model is tunix's own class with the
original parameter tree and gives the adapted output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from tunix.models.gemma import model as gemma
from tunix.models.gemma3 import model as gemma3
from tunix.models.llama3 import model as llama3
from tunix.models.qwen2 import model as qwen2
from tunix.models.qwen3 import model as qwen3

import deltalora_jax as dl

SIZES = {"num_layers": 2, "embed_dim": 16, "hidden_dim": 24, "num_heads": 2, "head_dim": 8}
ROPE = {"rope_theta": 10_000, "norm_eps": 1e-6}


def _random_mlp(model: nnx.Module) -> nnx.Module:
  """Gemma's MLP kernels start at zero in tunix: random ones, as a pretrained model has."""
  keys = iter(jax.random.split(jax.random.key(5), 3 * len(model.layers)))
  for layer in model.layers:
    for name in ("gate_proj", "up_proj", "down_proj"):
      kernel = getattr(layer.mlp, name).kernel
      kernel[...] = 0.3 * jax.random.normal(next(keys), kernel.shape, kernel.dtype)
  return model


def _gemma(kv_heads: int = 1) -> nnx.Module:
  config = gemma.ModelConfig(
    num_embed=32, num_kv_heads=kv_heads, final_logit_softcap=None, use_post_attn_norm=True,
    use_post_ffw_norm=True, attention_types=[gemma.AttentionType.GLOBAL] * 2, **SIZES,
  )
  return _random_mlp(gemma.Gemma(config, rngs=nnx.Rngs(0)))


def _gemma3(kv_heads: int) -> nnx.Module:
  config = gemma3.ModelConfig(
    num_embed=32, num_kv_heads=kv_heads, sliding_window_size=4, param_dtype=jnp.float32,
    **SIZES,
  )
  return _random_mlp(gemma3.Gemma3(config, rngs=nnx.Rngs(0)))


def _llama3() -> nnx.Module:
  config = llama3.ModelConfig(vocab_size=32, num_kv_heads=1, **ROPE, **SIZES)
  return llama3.Llama3(config, rngs=nnx.Rngs(0))


def _qwen2() -> nnx.Module:
  config = qwen2.ModelConfig(vocab_size=32, num_kv_heads=1, **ROPE, **SIZES)
  model = qwen2.Qwen2(config, rngs=nnx.Rngs(0))
  keys = iter(jax.random.split(jax.random.key(7), 6))
  for layer in model.layers:  # tunix starts the q/k/v biases at zero: make them count
    for name in ("q_bias", "k_bias", "v_bias"):
      bias = getattr(layer.attn, name)
      bias[...] = jax.random.normal(next(keys), bias.shape)
  return model


def _qwen3() -> nnx.Module:
  config = qwen3.ModelConfig(vocab_size=32, num_kv_heads=1, **ROPE, **SIZES)
  return qwen3.Qwen3(config, rngs=nnx.Rngs(0))


#: family -> (constructor, the projections of one decoder layer, the others of the model)
FAMILIES = {
  "gemma": (_gemma, ["attn/q_einsum", "attn/kv_einsum", "attn/attn_vec_einsum"], []),
  "gemma3": (lambda: _gemma3(1), ["attn/q_einsum", "attn/kv_einsum", "attn/attn_vec_einsum"], []),
  "gemma3_fused_qkv": (lambda: _gemma3(2), ["attn/qkv_einsum", "attn/attn_vec_einsum"], []),
  "llama3": (_llama3, ["attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj"], ["lm_head"]),
  "qwen2": (_qwen2, ["attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj"], ["lm_head"]),
  "qwen3": (_qwen3, ["attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj"], ["lm_head"]),
}
MLP = ["mlp/gate_proj", "mlp/up_proj", "mlp/down_proj"]

TOKENS = jnp.array([[1, 5, 7, 3, 2, 9, 4, 6], [2, 8, 1, 1, 5, 3, 7, 0]])
POSITIONS = jnp.broadcast_to(jnp.arange(8), (2, 8))
MASK = jnp.broadcast_to(jnp.tril(jnp.ones((8, 8), bool)), (2, 8, 8))


def logits(model: nnx.Module) -> jax.Array:
  return model(TOKENS, POSITIONS, None, MASK)[0]


def loss_fn(model: nnx.Module) -> jax.Array:
  """Next-token cross-entropy on ``TOKENS``."""
  out = logits(model)[:, :-1]
  return optax.softmax_cross_entropy_with_integer_labels(out, TOKENS[:, 1:]).mean()


def expected_projections(family: str) -> list[str]:
  _, attention, others = FAMILIES[family]
  per_layer = sorted(attention + MLP)
  return sorted([f"layers/{i}/{name}" for i in range(2) for name in per_layer] + others)


def flat_state(model: nnx.Module) -> dict[tuple, jax.Array]:
  return {k: v[...] for k, v in nnx.to_flat_state(nnx.state(model))}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_projection_adapted_and_the_output_unchanged(family):
  model = FAMILIES[family][0]()
  before = logits(model)
  _, report = dl.adapt_nnx(model, None, rank=2, rngs=nnx.Rngs(1))
  assert sorted(report["layers"]) == expected_projections(family)
  assert report["skipped"] == {}
  np.testing.assert_allclose(logits(model), before, rtol=0, atol=1e-6)


def test_fused_kernels_are_one_adapter_each():
  """kv_einsum (2, K, D, H) and qkv_einsum (3, N, D, H): A [D, r] shared, B [r, C, K, H]."""
  model = _gemma3(1)
  dl.adapt_nnx(model, None, rank=2, rngs=nnx.Rngs(1))
  kv = model.layers[0].attn.kv_einsum
  assert (kv.lora_a.shape, kv.lora_b.shape, kv.delta.shape) == ((16, 2), (2, 2, 1, 16 // 2), (
    2, 1, 16, 8))
  fused = _gemma3(2)
  dl.adapt_nnx(fused, None, rank=2, rngs=nnx.Rngs(1))
  qkv = fused.layers[0].attn.qkv_einsum
  assert (qkv.lora_a.shape, qkv.lora_b.shape) == ((16, 2), (2, 3, 2, 8))


def test_the_adapter_stands_in_for_tunix_einsum():
  """tunix's attention reads ``.shape`` and ``.w`` of its projections, and calls ``(x)``."""
  model = _llama3()
  base = model.layers[0].attn.q_proj
  heads = (model.layers[0].attn.num_heads, model.layers[0].attn.head_dim)  # read from .shape
  dl.adapt_nnx(model, None, rank=2, rngs=nnx.Rngs(1))
  adapted = model.layers[0].attn.q_proj
  assert isinstance(adapted, dl.DeltaLoRALinearGeneral)
  assert adapted.shape == base.shape and adapted.einsum_str == base.einsum_str
  assert adapted.w is adapted.kernel
  np.testing.assert_array_equal(adapted.w[...], base.w[...])
  assert (model.layers[0].attn.num_heads, model.layers[0].attn.head_dim) == heads


@pytest.mark.parametrize("rule", ["seed", "paper"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_both_rules_train_and_the_merged_model_is_tunix_own(family, rule):
  original = FAMILIES[family][0]()
  model = FAMILIES[family][0]()
  original_tree = {k: (v.shape, v.dtype) for k, v in flat_state(original).items()}
  dl.adapt_nnx(model, None, rank=2, use_delta=rule == "seed", rngs=nnx.Rngs(1))
  base = flat_state(model)
  if rule == "seed":
    tx = dl.delta_lora(10.0, 0.9, layers=model, lora_optimizer=optax.adam(5e-2))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)  # D is a LoRAParam
  else:
    tx = dl.paper_delta_lora(layers=model, start_step=0, lora_optimizer=optax.adam(5e-2))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, optimizer.wrt))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(8)]
  assert losses[-1] < 0.99 * losses[0], losses  # the same batch: no training, no change
  pretrained = {
    k: v for k, v in flat_state(model).items()
    if k[-1] not in ("lora_a", "lora_b", "delta") and k in base
  }
  changed = [k for k, v in pretrained.items() if not np.array_equal(v, base[k])]
  if rule == "seed":
    assert changed == []  # not one pretrained weight written
  else:
    assert changed and all(k[-1] == "kernel" for k in changed)  # the rule moves W alone
  merged = dl.merge(model)
  assert type(merged) is type(original)
  assert {k: (v.shape, v.dtype) for k, v in flat_state(merged).items()} == original_tree
  np.testing.assert_allclose(logits(merged), logits(model), rtol=1e-4, atol=1e-5)


class _Tokenizer:
  """A tokenizer of digits for tunix's sampler: '3 1 4' -> [3, 1, 4]."""

  def encode(self, text, **kwargs):
    return [int(t) for t in text.split()]

  def decode(self, ids, **kwargs):
    return " ".join(map(str, ids))

  def bos_id(self):
    return 1

  def eos_id(self):
    return 31

  def pad_id(self):
    return 0


def test_greedy_sampling_gives_the_same_tokens_adapted_and_merged():
  from tunix.generate import sampler as sampler_lib

  model = _qwen3()
  dl.adapt_nnx(model, None, rank=2, rngs=nnx.Rngs(1))
  for module in dl.adapted_layers(model).values():  # a trained-looking adapter
    module.lora_b[...] = 0.3 * jax.random.normal(jax.random.key(3), module.lora_b.shape)
    module.delta[...] = 0.5 * jax.random.normal(jax.random.key(4), module.delta.shape)
  merged = dl.merge(model)
  cache = sampler_lib.CacheConfig(cache_size=32, num_layers=2, num_kv_heads=1, head_dim=8)
  outputs = []
  with jax.numpy_dtype_promotion("standard"):
    for m in (model, merged):
      sampler = sampler_lib.Sampler(m, _Tokenizer(), cache)
      out = sampler(["3 1 4 1 5", "9 2 6"], max_generation_steps=6, max_prompt_length=8)
      outputs.append([np.asarray(t).tolist() for t in out.tokens])
  assert outputs[0] == outputs[1]
  assert any(len(t) for t in outputs[0])


def _peft_inputs(batch):
  """tunix's gen_model_input_fn: positions and the causal mask from the tokens and their mask."""
  from tunix.sft import utils

  tokens, mask = batch.input_tokens, batch.input_mask
  return {
    "input_tokens": tokens,
    "input_mask": mask,
    "positions": utils.build_positions_from_mask(mask),
    "attention_mask": utils.make_causal_attn_mask(mask),
  }


@pytest.mark.parametrize("rule", ["seed", "lora"])
def test_tunix_peft_trainer_trains_the_adapters_unchanged(rule):
  """PeftTrainer differentiates and steps ``nnx.LoRAParam`` alone: the factors and D."""
  from tunix.sft import peft_trainer

  model = _qwen3()
  dl.adapt_nnx(model, None, rank=2, use_delta=rule == "seed", rngs=nnx.Rngs(1))
  before = flat_state(model)
  loss_before = float(loss_fn(model))
  if rule == "seed":
    tx = dl.delta_lora(10.0, 0.9, layers=model, lora_optimizer=optax.adam(5e-2))
  else:
    tx = optax.adam(5e-2)
  config = peft_trainer.TrainingConfig(eval_every_n_steps=100, max_steps=6, pbar_description=None)
  trainer = peft_trainer.PeftTrainer(model, tx, config).with_gen_model_input_fn(_peft_inputs)
  batch = peft_trainer.TrainingInput(input_tokens=TOKENS, input_mask=jnp.ones_like(TOKENS, bool))
  trainer.train([batch] * 6)
  after = flat_state(model)
  trained = sorted({k[-1] for k in after if not np.array_equal(after[k], before[k])})
  assert trained == (["delta", "lora_a", "lora_b"] if rule == "seed" else ["lora_a", "lora_b"])
  assert float(loss_fn(model)) < 0.99 * loss_before


def test_gemma3_270m_adapts_in_full_and_one_jitted_step_runs():
  """The real configuration (18 layers, bfloat16 parameters, random weights): 126 projections."""
  model = gemma3.Gemma3(gemma3.ModelConfig.gemma3_270m(), rngs=nnx.Rngs(0))
  _, report = dl.adapt_nnx(model, None, rank=4, rngs=nnx.Rngs(1))
  assert report["total"]["layers"] == 18 * 6 and report["skipped"] == {}
  kv = model.layers[0].attn.kv_einsum
  assert (kv.kernel.dtype, kv.lora_a.dtype, kv.delta.shape) == (jnp.bfloat16, jnp.float32, (
    2, 1, 640, 256))
  tx = dl.delta_lora(10.0, 0.9, layers=model, lora_optimizer=optax.adam(1e-3))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
  tokens = jnp.array([[2, 1000, 2000, 3000]])

  @nnx.jit
  def step(model, optimizer):
    def loss(model):
      out = model(tokens, jnp.arange(4)[None], None, jnp.tril(jnp.ones((1, 4, 4), bool)))[0]
      out = out[:, :-1].astype(jnp.float32)
      return optax.softmax_cross_entropy_with_integer_labels(out, tokens[:, 1:]).mean()

    value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    optimizer.update(model, grads)
    return value

  assert np.isfinite(float(step(model, optimizer)))
  assert float(jnp.abs(kv.delta[...]).max()) > 0  # D took its first step


def test_save_peft_writes_gemma_fused_kv_as_hugging_face_k_and_v(tmp_path):
  """kv_einsum (2, K, D, H) -> k_proj and v_proj; the pretrained tunix model as the base."""
  from safetensors import numpy as safetensors_numpy

  original = _gemma3(1)
  model = _gemma3(1)
  dl.adapt_nnx(model, None, rank=2, use_delta=False, rngs=nnx.Rngs(1))
  for module in dl.adapted_layers(model).values():
    module.lora_b[...] = jax.random.normal(jax.random.key(3), module.lora_b.shape)

  def names(layer):  # tunix's names -> Hugging Face's
    parts = layer.split("/")
    prefix = f"model.layers.{parts[1]}."
    return {
      "q_einsum": prefix + "self_attn.q_proj",
      "kv_einsum": (prefix + "self_attn.k_proj", prefix + "self_attn.v_proj"),
      "attn_vec_einsum": prefix + "self_attn.o_proj",
    }.get(parts[-1], prefix + "mlp." + parts[-1])

  report = dl.save_peft(tmp_path, model, module_names=names, rule="paper", base=original)
  assert max(entry["relative_error"] for entry in report["layers"].values()) < 1e-6
  tensors = safetensors_numpy.load_file(tmp_path / "adapter_model.safetensors")
  k_b = tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"]
  v_a = tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"]
  assert k_b.shape == (1 * 8, 4) and v_a.shape == (4, 16)  # K * H rows; rank 2r = 4
  assert len(tensors) == 2 * 2 * 7  # 7 modules a layer (k and v apart), A and B each
