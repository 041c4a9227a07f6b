"""The benchmarks' own arithmetic: products found and counted in compiled HLO.

The benchmarks themselves are timed by hand, never in the suite; what they
compute from XLA's output can be checked.
"""

import json

import jax
import jax.numpy as jnp
import pytest

pytest.importorskip("safetensors")  # benchmarks.profile_peft imports the demo's loader

from benchmarks import profile_peft


def _entry_flops(fn, *args) -> dict[str, float]:
  return profile_peft.product_flops(jax.jit(fn).lower(*args).compile().as_text())


def test_product_flops_counts_each_product_of_the_entry_once():
  x, w, v = jnp.ones((64, 32)), jnp.ones((32, 16)), jnp.ones((16, 8))
  flops = _entry_flops(lambda x, w, v: jnp.tanh(x @ w) @ v, x, w, v)
  assert sorted(flops.values()) == [2.0 * 64 * 16 * 8, 2.0 * 64 * 32 * 16]


def test_product_flops_reads_contracting_and_batch_shapes():
  # x^T g contracts the rows (dimension 0), as a weight gradient does.
  x, g = jnp.ones((128, 24)), jnp.ones((128, 40))
  flops = _entry_flops(lambda x, g: x.T @ g, x, g)
  assert list(flops.values()) == [2.0 * 24 * 128 * 40]
  # A batched product: 3 batches of [5, 7] x [7, 9].
  a, b = jnp.ones((3, 5, 7)), jnp.ones((3, 7, 9))
  flops = _entry_flops(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), a, b)
  assert list(flops.values()) == [2.0 * 3 * 5 * 9 * 7]


@pytest.mark.parametrize("variant", ["full_sgdm", "seed"])
def test_attention_block_costs_what_the_own_layer_block_costs(variant):
  # Flax's nn.MultiHeadDotProductAttention block, adapted by adapt_linen, is
  # the transformer block of the benchmarks' own layers: the same flops.
  from benchmarks import common

  flops = {}
  for model in ("attention", "transformer"):
    cfg = common.Config(model, 128, 4, 128, seq=64)
    p = common.prepare(cfg, variant)
    flops[model] = p.record["flops"]
    if model == "attention" and variant == "seed":
      delta = p.state[0]["delta"]
      assert sorted(delta) == ["attention", "mlp_down", "mlp_up"]
      assert sorted(delta["attention"]) == ["key", "out", "query", "value"]
  assert flops["attention"] == flops["transformer"]
  assert common.model_variants("attention", common.ALL_VARIANTS) == tuple(
    v for v in common.ALL_VARIANTS if v != "naive"
  )


def test_bench_llm_on_a_tiny_config(tmp_path):
  # Both sides hold the same weights (their losses agree, checked inside), LoRA trains as many
  # parameters on both, and every figure of the JSON is there.
  from benchmarks import bench_llm

  out = tmp_path / "llm.json"
  argv = ["--tiny", "--batch", "2", "--length", "16", "--rounds", "1", "--steps", "1"]
  argv += ["--no-compile", "--jax-methods", "lora,paper", "--torch-methods", "lora"]
  with jax.numpy_dtype_promotion("standard"):  # optax's AdamW, as users run it
    results = bench_llm.main([*argv, "--out", str(out)])
  assert results["loss_check"]["relative_error"] <= 1e-4
  variants = results["variants"]
  assert sorted(variants) == ["jax-lora", "jax-paper", "peft-lora", "peft-lora-fused"]
  assert variants["jax-lora"]["trainable_params"] == variants["peft-lora"]["trainable_params"]
  assert variants["jax-paper"]["trainable_params"] == 2 * variants["jax-lora"]["trainable_params"]
  assert results["ratios"]["jax-paper"]["against"] == results["fastest_torch"]["lora"]
  for record in variants.values():
    assert record["tokens_per_s"] > 0 and len(record["step_times_s"]) == 1
  assert variants["jax-lora"]["peak_bytes"] > 0 and variants["peft-lora"]["peak_bytes_estimate"] > 0
  assert "| jax-paper |" in bench_llm.table(results)
  assert json.loads(out.read_text())["ratios"] == results["ratios"]
