"""The NNX front end: DeltaLoRALinear against the Linen layer and closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import deltalora_jax as dl
from deltalora_jax.nnx import DeltaLoRALinear, DeltaParam

IN, OUT, RANK, ROWS = 5, 4, 2, 3
TRAINABLE = nnx.Any(nnx.LoRAParam, DeltaParam)


def random_layer(*, seed=0, **kwargs):
  """A layer whose B and D are non-zero, so every term of the forward counts."""
  layer = DeltaLoRALinear(IN, OUT, rank=RANK, rngs=nnx.Rngs(seed), **kwargs)
  keys = jax.random.split(jax.random.key(seed + 100), 3)
  layer.bias[...] = jax.random.normal(keys[0], (OUT,))
  layer.lora_b[...] = jax.random.normal(keys[1], (RANK, OUT))
  layer.delta[...] = jax.random.normal(keys[2], (IN, OUT))
  return layer


def arrays(layer):
  return {k: np.asarray(getattr(layer, k)[...]) for k in ("kernel", "bias", "lora_a", "lora_b")} | {
    "delta": np.asarray(layer.delta[...])
  }


X = jax.random.normal(jax.random.key(7), (2, ROWS, IN))


def test_state_keeps_linear_names_and_separates_the_trainable_types():
  layer = DeltaLoRALinear(IN, OUT, rank=RANK, rngs=nnx.Rngs(0))
  shapes = jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(layer)))
  assert shapes == {
    "kernel": (IN, OUT),
    "bias": (OUT,),
    "lora_a": (IN, RANK),
    "lora_b": (RANK, OUT),
    "delta": (IN, OUT),
  }
  # D is an nnx.LoRAParam too (trained where the factors are, e.g. by tunix's PeftTrainer)
  assert sorted(nnx.to_pure_dict(nnx.state(layer, nnx.LoRAParam))) == ["delta", "lora_a", "lora_b"]
  factors = nnx.All(nnx.LoRAParam, nnx.Not(DeltaParam))
  assert sorted(nnx.to_pure_dict(nnx.state(layer, factors))) == ["lora_a", "lora_b"]
  assert sorted(nnx.to_pure_dict(nnx.state(layer, DeltaParam))) == ["delta"]
  frozen = nnx.state(layer, nnx.Not(TRAINABLE))
  assert sorted(nnx.to_pure_dict(frozen)) == ["bias", "kernel"]
  _, trainable, rest = nnx.split(layer, TRAINABLE, ...)
  assert sorted(nnx.to_pure_dict(trainable)) == ["delta", "lora_a", "lora_b"]
  assert sorted(nnx.to_pure_dict(rest)) == ["bias", "kernel"]
  # B = 0 and D = 0 at construction: the layer is its base
  np.testing.assert_array_equal(layer.lora_b[...], 0.0)
  np.testing.assert_array_equal(layer.delta[...], 0.0)
  # the state of an nnx.Linear of the same sizes loads into it unchanged
  linear = nnx.Linear(IN, OUT, rngs=nnx.Rngs(3))
  nnx.update(layer, nnx.state(linear))
  np.testing.assert_array_equal(layer(X), linear(X))


@pytest.mark.parametrize("evaluation", ["merged", "factored"])
def test_forward_matches_the_closed_form_in_float64(evaluation):
  with jax.enable_x64(True):
    layer = DeltaLoRALinear(
      IN,
      OUT,
      rank=RANK,
      alpha=4.0,
      delta_scaling=0.3,
      evaluation=evaluation,
      param_dtype=jnp.float64,
      rngs=nnx.Rngs(0),
    )
    rng = np.random.default_rng(0)
    for name in ("bias", "lora_b", "delta"):
      getattr(layer, name)[...] = jnp.asarray(rng.normal(size=getattr(layer, name).shape))
    x = rng.normal(size=(2, ROWS, IN))
    a = arrays(layer)
    expected = (
      x @ a["kernel"] + a["bias"] + 2.0 * (x @ a["lora_a"]) @ a["lora_b"] + 0.3 * x @ a["delta"]
    )
    np.testing.assert_allclose(layer(jnp.asarray(x)), expected, rtol=1e-12, atol=1e-12)


def test_same_numbers_and_gradients_as_the_linen_layer():
  layer = random_layer(alpha=3.0, delta_scaling=0.2)
  a = arrays(layer)
  linen = dl.DeltaLoRADense(OUT, rank=RANK, alpha=3.0, delta_scaling=0.2)
  variables = {
    "params": {k: a[k] for k in ("kernel", "bias", "lora_a", "lora_b")},
    "delta": {"delta": a["delta"]},
  }
  np.testing.assert_allclose(layer(X), linen.apply(variables, X), rtol=1e-6, atol=1e-6)
  loss_nnx = lambda m: jnp.sum(jnp.sin(m(X)))  # noqa: E731
  grads = nnx.grad(loss_nnx, argnums=nnx.DiffState(0, TRAINABLE))(layer)
  linen_grads = jax.grad(lambda v: jnp.sum(jnp.sin(linen.apply(v, X))))(variables)
  np.testing.assert_allclose(
    grads["delta"][...], linen_grads["delta"]["delta"], rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(
    grads["lora_a"][...], linen_grads["params"]["lora_a"], rtol=1e-5, atol=1e-6
  )


def test_from_linear_keeps_the_pretrained_weights_and_output():
  linear = nnx.Linear(IN, OUT, kernel_metadata={"source": "checkpoint"}, rngs=nnx.Rngs(1))
  linear.bias[...] = jnp.arange(OUT, dtype=jnp.float32)
  layer = DeltaLoRALinear.from_linear(linear, rank=RANK, delta_scaling=0.5, rngs=nnx.Rngs(2))
  np.testing.assert_array_equal(layer.kernel[...], linear.kernel[...])
  np.testing.assert_array_equal(layer.bias[...], linear.bias[...])
  assert layer.kernel.get_metadata("source") == "checkpoint"  # metadata kept
  assert (layer.in_features, layer.out_features, layer.delta_scaling) == (IN, OUT, 0.5)
  np.testing.assert_array_equal(layer(X), linear(X))
  layer.kernel[...] = jnp.zeros((IN, OUT))  # the adapter owns its own Variables
  assert float(jnp.abs(linear.kernel[...]).sum()) > 0
  no_bias = nnx.Linear(IN, OUT, use_bias=False, rngs=nnx.Rngs(1))
  assert DeltaLoRALinear.from_linear(no_bias, rank=1, rngs=nnx.Rngs(0)).bias is None


def test_merge_gives_a_plain_linear_with_the_closed_form_kernel():
  layer = random_layer(alpha=6.0, delta_scaling=0.3)  # s = 6 / 2 = 3; B, D, bias random
  a = {name: value.astype(np.float64) for name, value in arrays(layer).items()}
  merged = dl.merge(layer)  # a model that is one adapter merges into one Linear
  assert type(merged) is nnx.Linear
  # The reference, in float64 NumPy: W + s A B + ds D, the bias unchanged.
  kernel = a["kernel"] + 3.0 * a["lora_a"] @ a["lora_b"] + 0.3 * a["delta"]
  np.testing.assert_allclose(merged.kernel[...], kernel, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(merged.bias[...], a["bias"])
  x = np.asarray(X, np.float64)
  np.testing.assert_allclose(merged(X), x @ kernel + a["bias"], rtol=1e-5, atol=1e-5)
  # The adapter itself is left as it was.
  for name, value in arrays(layer).items():
    np.testing.assert_array_equal(value, a[name].astype(np.float32))


def test_construction_checks_every_hyperparameter():
  rngs = nnx.Rngs(0)
  with pytest.raises(ValueError, match=r"rank must satisfy 0 < rank <= min\(in, out\) = 4"):
    DeltaLoRALinear(IN, OUT, rank=5, rngs=rngs)
  with pytest.raises(ValueError, match="rank must satisfy"):
    DeltaLoRALinear(IN, OUT, rank=0, rngs=rngs)
  with pytest.raises(ValueError, match="delta_scaling must be finite"):
    DeltaLoRALinear(IN, OUT, rank=1, delta_scaling=float("nan"), rngs=rngs)
  with pytest.raises(ValueError, match="alpha must be a finite"):
    DeltaLoRALinear(IN, OUT, rank=1, alpha=float("inf"), rngs=rngs)
  with pytest.raises(ValueError, match="evaluation must be one of"):
    DeltaLoRALinear(IN, OUT, rank=1, evaluation="fast", rngs=rngs)
  with pytest.raises(ValueError, match="in_features must be a positive int"):
    DeltaLoRALinear(0, OUT, rank=1, rngs=rngs)
  with pytest.raises(TypeError, match="freeze_base must be a bool"):
    DeltaLoRALinear(IN, OUT, rank=1, freeze_base=1, rngs=rngs)
  with pytest.raises(TypeError):  # rngs is keyword-only
    DeltaLoRALinear(IN, OUT, 1, rngs)
  with pytest.raises(TypeError, match=r"rngs must be an nnx\.Rngs"):
    DeltaLoRALinear(IN, OUT, rank=1, rngs=0)
  with pytest.raises(TypeError, match=r"linear must be an nnx\.Linear"):
    DeltaLoRALinear.from_linear(nnx.LayerNorm(IN, rngs=rngs), rank=1, rngs=rngs)
  custom = nnx.Linear(IN, OUT, dot_general=lambda *a, **k: jax.lax.dot_general(*a, **k), rngs=rngs)
  with pytest.raises(TypeError, match=r"custom \['dot_general'\]"):
    DeltaLoRALinear.from_linear(custom, rank=1, rngs=rngs)
  with pytest.raises(TypeError, match="from_linear takes the base layer's settings"):
    DeltaLoRALinear.from_linear(nnx.Linear(IN, OUT, rngs=rngs), rank=1, use_bias=False, rngs=rngs)
  with pytest.raises(ValueError, match="x must have 5 input features"):
    DeltaLoRALinear(IN, OUT, rank=1, rngs=rngs)(jnp.ones((2, 3)))


def test_use_delta_false_is_plain_lora():
  layer = DeltaLoRALinear(IN, OUT, rank=RANK, use_delta=False, rngs=nnx.Rngs(0))
  assert layer.delta is None
  assert not nnx.to_pure_dict(nnx.state(layer, DeltaParam))
  assert dl.parameter_counts(layer)["total"] == RANK * (IN + OUT)


class TwoLayers(nnx.Module):
  def __init__(self, rngs):
    self.hidden = DeltaLoRALinear(IN, OUT, rank=RANK, rngs=rngs)
    self.head = nnx.Linear(OUT, 1, rngs=rngs)

  def __call__(self, x):
    return self.head(jnp.tanh(self.hidden(x)))


def test_leaf_labels_read_nnx_state():
  labels = nnx.to_pure_dict(dl.leaf_labels(nnx.state(TwoLayers(nnx.Rngs(0)))))
  assert labels["hidden"] == {
    "kernel": "base",
    "bias": "base",
    "lora_a": "lora",
    "lora_b": "lora",
    "delta": "delta",
  }
  assert labels["head"] == {"kernel": "other", "bias": "other"}


@pytest.mark.parametrize("wrt", ["trainable", "param"])
def test_one_optimizer_step_follows_the_delta_rule(wrt):
  """nnx.Optimizer + delta_lora: D = -lr (1 - mu) dD, A -= lr dA; base and head frozen."""
  model = TwoLayers(nnx.Rngs(0))
  before = nnx.to_pure_dict(nnx.clone(nnx.state(model)))
  lr, mu = 0.1, 0.9
  tx = dl.delta_lora(lr, mu, layers=model, lora_optimizer=optax.sgd(lr))
  optimizer = nnx.Optimizer(model, tx, wrt=TRAINABLE if wrt == "trainable" else nnx.Param)
  loss = lambda m: jnp.sum(m(X) ** 2)  # noqa: E731
  grads = nnx.grad(loss, argnums=nnx.DiffState(0, optimizer.wrt))(model)
  optimizer.update(model, grads)
  g = nnx.to_pure_dict(grads)["hidden"]
  np.testing.assert_allclose(model.hidden.delta[...], -lr * (1 - mu) * g["delta"], rtol=1e-6)
  np.testing.assert_allclose(
    model.hidden.lora_a[...], before["hidden"]["lora_a"] - lr * g["lora_a"], rtol=1e-6
  )
  for name in ("kernel", "bias"):
    np.testing.assert_array_equal(getattr(model.hidden, name)[...], before["hidden"][name])
    np.testing.assert_array_equal(getattr(model.head, name)[...], before["head"][name])
  report = dl.diagnostics(model, opt_state=optimizer)["layers"]["hidden"]
  np.testing.assert_allclose(
    report["velocity_norm"], (1 - mu) * float(jnp.linalg.norm(g["delta"])), rtol=1e-5
  )
  assert report["parameter_count"] == RANK * (IN + OUT) + IN * OUT


def test_jitted_training_step_compiles_once_and_learns():
  model = TwoLayers(nnx.Rngs(0))
  tx = dl.delta_lora(0.05, layers=model, lora_optimizer=optax.sgd(0.1))
  optimizer = nnx.Optimizer(model, tx, wrt=TRAINABLE)
  target = jnp.ones((2, ROWS, 1))
  traces = []

  @nnx.jit
  def step(model, optimizer, x):
    traces.append(1)
    loss_fn = lambda m: jnp.mean((m(x) - target) ** 2)  # noqa: E731
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, TRAINABLE))(model)
    optimizer.update(model, grads)
    return loss

  kernel = jnp.copy(model.hidden.kernel[...])
  losses = [float(step(model, optimizer, X)) for _ in range(10)]
  assert len(traces) == 1
  assert losses[-1] < 0.9 * losses[0], losses
  np.testing.assert_array_equal(model.hidden.kernel[...], kernel)


def test_nnx_utilities_refuse_a_model_without_adapters():
  with pytest.raises(ValueError, match="has no adapted layer"):
    dl.parameter_counts(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
  with pytest.raises(TypeError, match="layers must be None with an NNX model"):
    dl.parameter_counts(TwoLayers(nnx.Rngs(0)), {})
  with pytest.raises(TypeError, match="layers is required"):
    dl.parameter_counts({"params": {}})
