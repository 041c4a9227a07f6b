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
