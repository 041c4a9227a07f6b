"""Whole-model utilities on an MLP and a small transformer written with a dense factory."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import deltalora_jax as dl

WIDTH, HEADS, R = 8, 2, 2


class MLP(nn.Module):
  dense: type = nn.Dense

  @nn.compact
  def __call__(self, x):
    for i in range(3):
      x = nn.gelu(self.dense(WIDTH, name=f"hidden_{i}")(x))
    return nn.Dense(3, name="head")(x)  # never adapted


class Block(nn.Module):
  """A pre-norm transformer block whose projections come from ``dense``."""

  dense: type = nn.Dense

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="ln1")(x)
    q, k, v = (self.dense(WIDTH, name=n)(h) for n in ("query", "key", "value"))
    split = lambda t: t.reshape(*t.shape[:-1], HEADS, WIDTH // HEADS)  # noqa: E731
    att = nn.dot_product_attention(split(q), split(k), split(v))
    x = x + self.dense(WIDTH, name="out")(att.reshape(x.shape))
    h = nn.LayerNorm(name="ln2")(x)
    return x + self.dense(WIDTH, name="mlp_out")(nn.gelu(self.dense(2 * WIDTH, name="mlp_in")(h)))


ADAPTED = functools.partial(dl.DeltaLoRADense, rank=R, alpha=4.0, delta_scaling=0.5)
X = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, WIDTH)), jnp.float32)


@functools.cache
def _trained(model_cls, steps=3):
  """An adapted model after a few steps, so that B, D and the velocity are not zero."""
  model = model_cls(dense=ADAPTED)
  variables = model.init(jax.random.key(0), X)
  tx = dl.delta_lora(0.1, 0.9, layers=dl.adapted_layers(model, X), lora_optimizer=optax.sgd(0.1))
  opt_state = tx.init(variables)

  @jax.jit
  def step(variables, opt_state):
    grads = jax.grad(lambda v: jnp.mean(model.apply(v, X) ** 2))(variables)
    updates, opt_state = tx.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state

  for _ in range(steps):
    variables, opt_state = step(variables, opt_state)
  return model, variables, opt_state


@pytest.fixture(scope="module", params=[MLP, Block], ids=["mlp", "transformer"])
def trained(request):
  return (request.param, *_trained(request.param))


def test_adapted_layers_are_found_by_path(trained):
  model_cls, model, _variables, _ = trained
  layers = dl.adapted_layers(model, X)
  if model_cls is MLP:
    assert list(layers) == ["hidden_0", "hidden_1", "hidden_2"]
  else:
    assert set(layers) == {"query", "key", "value", "out", "mlp_in", "mlp_out"}
  assert all(layer.rank == R for layer in layers.values())


def test_merge_gives_the_plain_model_with_the_same_outputs(trained):
  model_cls, model, variables, _ = trained
  merged = dl.merge(variables, dl.adapted_layers(model, X))
  assert "delta" not in merged
  plain = model_cls()
  # The merged tree has exactly the plain model's structure and shapes.
  chex.assert_trees_all_equal_shapes_and_dtypes(merged, plain.init(jax.random.key(1), X))
  np.testing.assert_allclose(
    plain.apply(merged, X), model.apply(variables, X), rtol=1e-5, atol=1e-5
  )


def test_merge_kernel_is_w_plus_s_ab_plus_ds_d(trained):
  _, model, variables, _ = trained
  merged = dl.merge(variables, dl.adapted_layers(model, X))
  name = next(iter(dl.adapted_layers(model, X)))
  p, d = variables["params"][name], variables["delta"][name]["delta"]
  want = p["kernel"] + 2.0 * p["lora_a"] @ p["lora_b"] + 0.5 * d  # s = alpha / r = 2
  np.testing.assert_allclose(merged["params"][name]["kernel"], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(merged["params"][name]["bias"], p["bias"])


def test_parameter_counts_per_layer_and_total(trained):
  model_cls, model, variables, _ = trained
  counts = dl.parameter_counts(variables, dl.adapted_layers(model, X))
  per_layer = lambda i, o: R * (i + o) + i * o  # noqa: E731
  if model_cls is MLP:
    want = {
      "hidden_0": per_layer(WIDTH, WIDTH),
      "hidden_1": per_layer(WIDTH, WIDTH),
      "hidden_2": per_layer(WIDTH, WIDTH),
    }
  else:
    want = {n: per_layer(WIDTH, WIDTH) for n in ("query", "key", "value", "out")}
    want["mlp_in"] = per_layer(WIDTH, 2 * WIDTH)
    want["mlp_out"] = per_layer(2 * WIDTH, WIDTH)
  want["total"] = sum(want.values())
  assert counts == want


def test_parameter_count_includes_base_when_not_frozen():
  x = jnp.ones((1, 6))
  for use_bias, extra in ((True, 6 * 4 + 4), (False, 6 * 4)):
    layer = dl.DeltaLoRADense(4, rank=2, freeze_base=False, use_bias=use_bias)
    variables = layer.init(jax.random.key(0), x)
    assert dl.parameter_counts(variables, {(): layer})["total"] == 2 * 10 + 24 + extra


def test_diagnostics_report_norms_per_layer_and_total(trained):
  _, model, variables, opt_state = trained
  layers = dl.adapted_layers(model, X)
  report = dl.diagnostics(variables, layers, opt_state)
  assert set(report["layers"]) == set(layers)
  name = next(iter(layers))
  entry = report["layers"][name]
  p, d = variables["params"][name], variables["delta"][name]["delta"]
  np.testing.assert_allclose(entry["delta_norm"], np.linalg.norm(d), rtol=1e-5)
  np.testing.assert_allclose(
    entry["lora_norm"], np.linalg.norm(2.0 * p["lora_a"] @ p["lora_b"]), rtol=1e-4
  )
  v = dl.velocity(opt_state)["delta"][name]["delta"]
  np.testing.assert_allclose(entry["velocity_norm"], np.linalg.norm(v), rtol=1e-5)
  assert entry["velocity_norm"] > 0 and entry["lora_norm"] > 0
  assert (entry["kind"], entry["rank"], entry["scaling"], entry["delta_scaling"]) == (
    "general_dense",
    R,
    2.0,
    0.5,
  )
  total = report["total"]
  assert total["layers"] == len(layers)
  np.testing.assert_allclose(
    total["delta_norm"], np.sqrt(sum(e["delta_norm"] ** 2 for e in report["layers"].values()))
  )


def test_reset_zeroes_delta_and_velocity_and_nothing_else(trained):
  _, _, variables, opt_state = trained
  new_vars, new_state = dl.reset(variables, opt_state)
  for leaf in jax.tree.leaves(new_vars["delta"]):
    np.testing.assert_array_equal(leaf, 0)
  for leaf in jax.tree.leaves(dl.velocity(new_state)):
    np.testing.assert_array_equal(leaf, 0)
  chex.assert_trees_all_equal(new_vars["params"], variables["params"])
  assert any(np.any(leaf != 0) for leaf in jax.tree.leaves(variables["delta"]))  # not a no-op
  # The optimizer's other state (counts) is kept.
  chex.assert_trees_all_equal(
    optax.tree_utils.tree_get_all_with_path(new_state, "count"),
    optax.tree_utils.tree_get_all_with_path(opt_state, "count"),
  )


def test_flat_vector_round_trip_and_seed_order():
  layer = dl.DeltaLoRADense(3, rank=2, freeze_base=False)
  variables = layer.init(jax.random.key(0), jnp.ones((1, 4)))
  layers = {(): layer}
  vector = dl.flatten_parameters(variables, layers)
  p = variables["params"]
  # The seed's order: kernel, bias, A, B, D, each row-major.
  want = np.concatenate(
    [
      np.ravel(a)
      for a in (p["kernel"], p["bias"], p["lora_a"], p["lora_b"], variables["delta"]["delta"])
    ]
  )
  np.testing.assert_array_equal(vector, want)
  new = dl.unflatten_parameters(variables, jnp.arange(vector.size, dtype=jnp.float32), layers)
  np.testing.assert_array_equal(new["params"]["kernel"], np.arange(12).reshape(4, 3))
  np.testing.assert_array_equal(new["delta"]["delta"][0], [29, 30, 31])  # 12 + 3 + 8 + 6
  chex.assert_trees_all_equal(dl.unflatten_parameters(variables, vector, layers), variables)


def test_flat_gradients_use_the_same_order(trained):
  _, model, variables, _ = trained
  layers = dl.adapted_layers(model, X)
  grads = jax.jit(jax.grad(lambda v: jnp.mean(model.apply(v, X) ** 2)))(variables)
  flat = dl.flatten_parameters(grads, layers)
  assert flat.shape == (dl.parameter_counts(variables, layers)["total"],)
  first = next(iter(layers))
  size_a = grads["params"][first]["lora_a"].size
  np.testing.assert_array_equal(flat[:size_a], np.ravel(grads["params"][first]["lora_a"]))


def test_wrong_flat_vector_length_names_both_lengths():
  layer = dl.DeltaLoRADense(3, rank=2)
  variables = layer.init(jax.random.key(0), jnp.ones((1, 4)))
  with pytest.raises(ValueError, match=r"1-D with 26 values .* got shape \(25,\)"):
    dl.unflatten_parameters(variables, jnp.zeros(25), {(): layer})


def test_current_delta_is_a_copy():
  _model, trained, _ = _trained(MLP)
  variables = jax.tree.map(jnp.copy, trained)  # ours to delete; the cached tree stays whole
  source = variables["delta"]["hidden_0"]["delta"]
  want = np.array(source, copy=True)
  assert want.shape == (WIDTH, WIDTH) and np.any(want != 0)
  d = dl.current_delta(variables, ("hidden_0",))
  source.delete()  # as a jitted step that donates the variables does
  np.testing.assert_array_equal(d, want)  # the copy outlives its source
  # NNX: a write to the model's D after the call leaves the copy as it was.
  layer = dl.DeltaLoRALinear(4, 3, rank=2, rngs=nnx.Rngs(0))
  layer.delta[...] = jnp.ones((4, 3))
  d = dl.current_delta(layer)
  layer.delta[...] = jnp.zeros((4, 3))
  np.testing.assert_array_equal(d, np.ones((4, 3)))


def test_merge_refuses_a_base_that_is_not_dense():
  layer = dl.DeltaLoRADense(3, rank=2)
  variables = layer.init(jax.random.key(0), jnp.ones((1, 4)))
  # The variables are right (they merge with their own layer), so only the type is wrong.
  assert dl.merge(variables, {(): layer})["params"]["kernel"].shape == (4, 3)
  with pytest.raises(TypeError, match=r"layers\[\(\)\] must be an adapted layer .* got Dense$"):
    dl.merge(variables, {(): nn.Dense(3)})
  stacked = {**variables, "params": {**variables["params"], "kernel": jnp.ones((4, 3, 1))}}
  with pytest.raises(ValueError, match=r"lora_a must have shape \(4, 3, 2\)"):
    dl.merge(stacked, {(): layer})  # read as a stack of 4 layers: the factors do not fit


def test_adapted_layers_of_a_model_without_adapters_is_an_error():
  with pytest.raises(ValueError, match=r"MLP has no adapted layer"):
    dl.adapted_layers(MLP(), X)
