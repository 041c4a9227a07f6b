"""Edge cases of adapting Flax layers: Flax's own conventions, reproduced exactly."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deltalora_jax as dl

X = jax.random.normal(jax.random.key(0), (2, 5, 5))


def _randomise(model):
  """Nonzero B and D on every adapted layer of an NNX model."""
  for i, (_, layer) in enumerate(dl.adapted_layers(model).items()):
    for name in ("lora_b", "delta"):
      value = getattr(layer, name)
      value[...] = 0.3 * jax.random.normal(jax.random.key(i), value.shape, value.dtype)


@pytest.mark.parametrize("axis", [(-1, -2), (2, 1)])
def test_dense_general_axes_in_any_order_contract_as_flax_does(axis):
  # Flax sorts the contracted axes; with equal sizes a transposed contraction
  # would run silently.
  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.DenseGeneral(features=3, axis=axis, name="p")(x)

  variables = Model().init(jax.random.key(1), X)
  adapted, new, _ = dl.adapt_linen(Model(), variables, X, rank=2, key=jax.random.key(2))
  np.testing.assert_allclose(adapted.apply(new, X), Model().apply(variables, X), atol=1e-6)
  base = nnx.LinearGeneral((5, 5), 3, axis=axis, rngs=nnx.Rngs(0))
  layer = dl.DeltaLoRALinearGeneral(base, rank=2, evaluation="factored", rngs=nnx.Rngs(1))
  np.testing.assert_allclose(layer(X), base(X), atol=1e-6)


def test_einsum_equation_given_positionally_at_call_time():
  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Einsum((5, 4), name="e")(x, "btd,dh->bth")

  variables = Model().init(jax.random.key(1), X)
  adapted, new, _ = dl.adapt_linen(Model(), variables, X, rank=2, key=jax.random.key(2))
  assert new["params"]["e"]["lora_a"].shape == (5, 2)
  np.testing.assert_allclose(adapted.apply(new, X), Model().apply(variables, X), atol=1e-6)


def test_a_layer_the_adapter_cannot_reproduce_is_refused_only_when_targeted():
  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(4, (3,), padding="SAME_LOWER", name="conv")(x)
      return nn.Einsum((4, 3), "btd,dk->bt", name="odd")(x) + nn.Dense(1, name="head")(x)[..., 0]

  variables = Model().init(jax.random.key(1), X)
  adapted, new, _ = dl.adapt_linen(Model(), variables, X, targets=["head", "conv"], rank=1,
                                key=jax.random.key(2))  # fmt: skip
  np.testing.assert_allclose(adapted.apply(new, X), Model().apply(variables, X), atol=1e-6)
  with pytest.raises(TypeError, match=r"'odd' is a Einsum \(Einsum cannot be adapted: .*sums"):
    dl.adapt_linen(Model(), variables, X, targets=["odd"], rank=1, key=jax.random.key(2))


def test_a_subclass_of_nnx_linear_comes_back_as_itself():
  class MyLinear(nnx.Linear):
    pass

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.up = MyLinear(5, 4, rngs=rngs)

  model = Model(nnx.Rngs(0))
  dl.adapt_nnx(model, rank=2, rngs=nnx.Rngs(1))
  _randomise(model)
  merged = dl.merge(model)
  assert type(merged.up) is MyLinear
  np.testing.assert_allclose(merged.up(X), model.up(X), rtol=1e-5, atol=1e-6)


def test_an_exported_adapter_keeps_its_dtype_through_json():
  class Model(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(5, 4, (3,), param_dtype=jnp.bfloat16, rngs=rngs)

  model = Model(nnx.Rngs(0))
  dl.adapt_nnx(model, rank=2, adapter_dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
  _randomise(model)
  adapter = dl.export_adapter(model)
  adapter["config"] = json.loads(json.dumps(adapter["config"]))  # as a file would hold it
  fresh = Model(nnx.Rngs(0))
  dl.attach_adapter_nnx(fresh, adapter)
  assert fresh.conv.lora_a.dtype == fresh.conv.delta.dtype == jnp.bfloat16
  np.testing.assert_array_equal(fresh.conv(X), model.conv(X))
