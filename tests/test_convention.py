"""The one convention: every whole-model function takes an NNX model or Linen variables.

The same weights, held by an NNX model and by Linen variables, give the same
counts, vectors, deltas, diagnostics and merges; the NNX functions that
change the model change it in place and return it, the Linen ones return new
variables and leave theirs as they were.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import deltalora_jax as dl

IN, HIDDEN, OUT, RANK = 4, 6, 3, 2
X = jnp.arange(2 * IN, dtype=jnp.float32).reshape(2, IN) / 8


class NNXMLP(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(IN, HIDDEN, rngs=rngs)
    self.down = nnx.Linear(HIDDEN, OUT, rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.relu(self.up(x)))


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(OUT, name="down")(jax.nn.relu(nn.Dense(HIDDEN, name="up")(x)))


def _pair():
  """An adapted NNX model and the Linen variables holding the very same arrays."""
  model, _ = dl.adapt_nnx(NNXMLP(nnx.Rngs(0)), rank=RANK, rngs=nnx.Rngs(1))
  for i, (_, layer) in enumerate(sorted(dl.adapted_layers(model).items())):
    key = jax.random.key(10 + i)
    layer.lora_b[...] = jax.random.normal(key, layer.lora_b.shape)
    layer.delta[...] = jax.random.normal(jax.random.fold_in(key, 1), layer.delta.shape)
  base = LinenMLP().init(jax.random.key(0), X)
  adapted, variables, _ = dl.adapt_linen(LinenMLP(), base, X, rank=RANK, key=jax.random.key(1))
  params, deltas = dict(variables["params"]), dict(variables["delta"])
  for name in ("up", "down"):
    layer = getattr(model, name)
    params[name] = {k: getattr(layer, k)[...] for k in ("kernel", "bias", "lora_a", "lora_b")}
    deltas[name] = {"delta": layer.delta[...]}
  return model, adapted, {"params": params, "delta": deltas}


def test_nnx_and_linen_give_the_same_figures_for_the_same_weights():
  model, adapted, variables = _pair()
  np.testing.assert_array_equal(model(X), adapted.apply(variables, X))
  assert dl.parameter_counts(model) == dl.parameter_counts(variables, adapted)
  up, down = RANK * (IN + HIDDEN) + IN * HIDDEN, RANK * (HIDDEN + OUT) + HIDDEN * OUT
  assert dl.parameter_counts(model) == {"down": down, "up": up, "total": up + down}
  np.testing.assert_array_equal(
    dl.flatten_parameters(model), dl.flatten_parameters(variables, adapted)
  )
  np.testing.assert_array_equal(dl.current_delta(model, "up"), dl.current_delta(variables, ("up",)))
  assert dl.diagnostics(model) == dl.diagnostics(variables, adapted)
  merged_nnx = dl.merge(model)
  merged_linen = dl.merge(variables, adapted)
  np.testing.assert_array_equal(merged_nnx.up.kernel[...], merged_linen["params"]["up"]["kernel"])
  # the merged kernel is W + s A B + ds D, computed here in float64
  up = model.up
  want = (
    np.float64(up.kernel[...])
    + up.scaling * np.float64(up.lora_a[...]) @ np.float64(up.lora_b[...])
    + up.delta_scaling * np.float64(up.delta[...])
  )
  np.testing.assert_allclose(merged_nnx.up.kernel[...], want, rtol=1e-6, atol=1e-6)


def test_nnx_unflatten_and_reset_change_the_model_in_place_and_return_it():
  model, adapted, variables = _pair()
  vector = jnp.arange(dl.parameter_counts(model)["total"], dtype=jnp.float32)
  before = jax.tree.map(jnp.copy, variables)
  assert dl.unflatten_parameters(model, vector) is model
  new = dl.unflatten_parameters(variables, vector, adapted)
  np.testing.assert_array_equal(dl.flatten_parameters(model), vector)
  np.testing.assert_array_equal(dl.flatten_parameters(new, adapted), vector)
  jax.tree.map(np.testing.assert_array_equal, variables, before)  # Linen: not modified

  tx = dl.delta_lora(0.1, layers=model, lora_optimizer=optax.sgd(0.1))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  grads = nnx.grad(lambda m: jnp.sum(m(X) ** 2), argnums=nnx.DiffState(0, nnx.Param))(model)
  optimizer.update(model, grads)
  assert dl.diagnostics(model, opt_state=optimizer)["total"]["velocity_norm"] > 0
  assert dl.reset(model, optimizer) == (model, optimizer)
  total = dl.diagnostics(model, opt_state=optimizer)["total"]
  assert total["delta_norm"] == total["velocity_norm"] == 0.0
  assert dl.diagnostics(model)["total"]["lora_norm"] > 0  # the factors are kept


def test_nnx_merge_returns_a_copy_and_keeps_the_model():
  model, _, _ = _pair()
  y = model(X)
  merged = dl.merge(model)
  assert type(merged.up) is nnx.Linear and type(model.up) is dl.DeltaLoRALinear
  np.testing.assert_allclose(merged(X), y, rtol=1e-5, atol=1e-5)
  assert type(dl.merge(model.up)) is nnx.Linear  # a single adapter gives its base layer


def test_the_wrong_kind_of_argument_is_named():
  model, adapted, variables = _pair()
  with pytest.raises(TypeError, match="layers must be None with an NNX model"):
    dl.parameter_counts(model, adapted)
  with pytest.raises(TypeError, match="layers is required with Linen variables"):
    dl.parameter_counts(variables)
  with pytest.raises(TypeError, match=r"an NNX model or Linen variables \{'params'"):
    dl.reset([1, 2])
  with pytest.raises(ValueError, match=r"path must name an adapted layer with D.*\['down', 'up'\]"):
    dl.current_delta(model, "middle")
