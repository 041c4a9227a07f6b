"""DeltaLoRADense: layout, initial state, gradients through the module, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deltalora_jax as dl

IN, OUT, R = 6, 5, 2
X = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4, IN)), jnp.float32)


@pytest.mark.parametrize("use_bias", [True, False])
def test_layout_is_a_drop_in_for_dense(use_bias):
  layer = dl.DeltaLoRADense(OUT, rank=R, use_bias=use_bias)
  variables = layer.init(jax.random.key(0), X)
  shapes = jax.tree.map(jnp.shape, variables)
  want_params = {"kernel": (IN, OUT), "lora_a": (IN, R), "lora_b": (R, OUT)}
  if use_bias:
    want_params["bias"] = (OUT,)
  assert shapes == {"params": want_params, "delta": {"delta": (IN, OUT)}}
  # The same key gives the same base as nn.Dense: a checkpoint loads unchanged.
  dense = nn.Dense(OUT, use_bias=use_bias).init(jax.random.key(0), X)
  np.testing.assert_array_equal(variables["params"]["kernel"], dense["params"]["kernel"])


def test_output_at_initialisation_equals_base_exactly():
  layer = dl.DeltaLoRADense(OUT, rank=R, evaluation="factored")
  variables = layer.init(jax.random.key(1), X)
  base = nn.Dense(OUT).apply({"params": {k: variables["params"][k] for k in ("kernel", "bias")}}, X)
  np.testing.assert_array_equal(layer.apply(variables, X), base)
  assert jnp.all(variables["params"]["lora_b"] == 0)
  assert jnp.all(variables["delta"]["delta"] == 0)


def test_merged_and_factored_evaluations_agree():
  variables = dl.DeltaLoRADense(OUT, rank=R).init(jax.random.key(2), X)
  variables = jax.tree.map(lambda v: v + 0.1 * jnp.ones_like(v), variables)
  y = {
    e: dl.DeltaLoRADense(OUT, rank=R, evaluation=e).apply(variables, X)
    for e in ("merged", "factored")
  }
  np.testing.assert_allclose(y["merged"], y["factored"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("freeze_base", [True, False])
def test_module_gradients_equal_closed_forms_float64(freeze_base):
  with jax.enable_x64(True):
    layer = dl.DeltaLoRADense(
      OUT, rank=R, alpha=3.0, delta_scaling=0.2, freeze_base=freeze_base, param_dtype=jnp.float64
    )
    x = jnp.asarray(X, jnp.float64)
    variables = layer.init(jax.random.key(3), x)
    rng = np.random.default_rng(1)
    variables = jax.tree.map(lambda v: jnp.asarray(rng.standard_normal(v.shape)), variables)
    g = jnp.asarray(rng.standard_normal((3, 4, OUT)))
    grads = jax.grad(lambda v: jnp.sum(layer.apply(v, x) * g))(variables)
    p, d = variables["params"], variables["delta"]["delta"]
    xs, gs = np.asarray(x).reshape(-1, IN), np.asarray(g).reshape(-1, OUT)
    s = 3.0 / R
    np.testing.assert_allclose(grads["delta"]["delta"], 0.2 * xs.T @ gs, rtol=1e-12)
    np.testing.assert_allclose(grads["params"]["lora_a"], s * xs.T @ gs @ p["lora_b"].T, rtol=1e-12)
    np.testing.assert_allclose(grads["params"]["lora_b"], s * (xs @ p["lora_a"]).T @ gs, rtol=1e-12)
    base_scale = 0.0 if freeze_base else 1.0
    np.testing.assert_allclose(grads["params"]["kernel"], base_scale * xs.T @ gs, atol=1e-12)
    np.testing.assert_allclose(grads["params"]["bias"], base_scale * gs.sum(0), atol=1e-12)
    del d


def _grad_flops(freeze_base, evaluation):
  layer = dl.DeltaLoRADense(64, rank=2, freeze_base=freeze_base, evaluation=evaluation)
  x = jnp.ones((128, 64))
  variables = layer.init(jax.random.key(0), x)
  grad = jax.jit(jax.grad(lambda v: jnp.sum(layer.apply(v, x) ** 2)))
  return grad.lower(variables).compile().cost_analysis()["flops"]


def test_frozen_base_costs_no_weight_gradient():
  # Factored form: freezing must remove one 2 * rows * in * out product (dW) and,
  # with D present, its delta gradient stays. Compare with and without freezing.
  rows, width = 128, 64
  saved = _grad_flops(False, "factored") - _grad_flops(True, "factored")
  np.testing.assert_allclose(saved, 2 * rows * width * width, rtol=0.05)


def test_missing_delta_collection_is_a_clear_error():
  layer = dl.DeltaLoRADense(OUT, rank=R)
  variables = layer.init(jax.random.key(0), X)
  with pytest.raises(ValueError, match=r"needs the 'delta' collection"):
    layer.apply({"params": variables["params"]}, X)


def test_without_delta_there_is_no_delta_collection():
  layer = dl.DeltaLoRADense(OUT, rank=R, use_delta=False)
  variables = layer.init(jax.random.key(0), X)
  assert set(variables) == {"params"}
  np.testing.assert_array_equal(layer.apply(variables, X).shape, (3, 4, OUT))


def test_wrong_input_feature_size_names_both_sizes():
  layer = dl.DeltaLoRADense(OUT, rank=R)
  variables = layer.init(jax.random.key(0), X)
  with pytest.raises(ValueError, match=rf"inputs must have {IN} features.*\(3, {IN + 1}\)"):
    layer.apply(variables, jnp.ones((3, IN + 1)))


def test_rank_above_input_size_raises_at_first_call():
  with pytest.raises(ValueError, match=r"min\(in, out\) = 3, got rank=4"):
    dl.DeltaLoRADense(OUT, rank=4).init(jax.random.key(0), jnp.ones((1, 3)))


@pytest.mark.parametrize(
  ("kwargs", "error", "match"),
  [
    ({"rank": 0}, ValueError, r"got rank=0"),
    ({"rank": OUT + 1}, ValueError, rf"min\(in, out\) = {OUT}, got rank={OUT + 1}"),
    ({"rank": 2.5}, TypeError, r"rank=2.5"),
    ({"rank": R, "delta_scaling": 0.0}, ValueError, r"delta_scaling=0.0"),
    ({"rank": R, "delta_scaling": float("nan")}, ValueError, r"delta_scaling=nan"),
    ({"rank": R, "delta_scaling": float("-inf")}, ValueError, r"delta_scaling=-inf"),
    ({"rank": R, "alpha": float("nan")}, ValueError, r"alpha=nan"),
    ({"rank": R, "freeze_base": 1}, TypeError, r"freeze_base=1"),
    ({"rank": R, "evaluation": "fast"}, ValueError, r"evaluation='fast'"),
  ],
)
def test_bad_arguments_raise_at_construction(kwargs, error, match):
  with pytest.raises(error, match=match):
    dl.DeltaLoRADense(OUT, **kwargs)


def test_bad_features_raise_at_construction():
  with pytest.raises(ValueError, match=r"features=0"):
    dl.DeltaLoRADense(0, rank=1)
  with pytest.raises(TypeError, match=r"features must be a positive int, got features=4.0"):
    dl.DeltaLoRADense(4.0, rank=1)
  assert dl.DeltaLoRADense(np.int64(4), rank=1).features == 4  # NumPy ints are ints
