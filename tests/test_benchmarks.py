"""The benchmarks' own arithmetic: products found and counted in compiled HLO.

The benchmarks themselves are timed by hand, never in the suite; what they
compute from XLA's output can be checked.
"""

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
