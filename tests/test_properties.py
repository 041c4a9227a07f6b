"""Bad input, swept with hypothesis: every call works and matches float64, or raises clearly.

Shapes, ranks, dtypes (integer inputs and mixed precisions included), the
hyperparameters and JAX's dtype-promotion mode are drawn together. A call
either returns what the float64 reference gives, within the rounding of the
dtypes involved, or raises ``ValueError``/``TypeError`` naming one of the
arguments that are wrong. Rank promotion is set to raise (conftest.py).
"""

import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, event, given, settings

import deltalora_jax as dl

SETTINGS = settings(
  max_examples=60,
  deadline=None,
  derandomize=True,
  suppress_health_check=[HealthCheck.too_slow],
)
FLOATS = [jnp.float32, jnp.bfloat16, jnp.float16]
NAN, INF = float("nan"), float("inf")


def _eps(*dtypes) -> float:
  return max(float(jnp.finfo(d).eps) for d in dtypes)


def _f64(x) -> np.ndarray:
  return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _expected_errors(case) -> dict[str, type]:
  """The arguments of ``case`` that are wrong, with the error each deserves."""
  bad = {}
  rank = case["rank"]
  if isinstance(rank, bool) or not isinstance(rank, int):
    bad["rank"] = TypeError
  elif not 0 < rank <= min(case["in_features"], case["features"]):
    bad["rank"] = ValueError
  alpha = case["alpha"]
  if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
    bad["alpha"] = ValueError
  if not (math.isfinite(case["delta_scaling"]) and case["delta_scaling"] > 0):
    bad["delta_scaling"] = ValueError
  if case["evaluation"] not in ("auto", "merged", "factored"):
    bad["evaluation"] = ValueError
  if case["dtype"] is not None and not jnp.issubdtype(case["dtype"], jnp.floating):
    bad["dtype"] = TypeError
  return bad


BREAKABLE = ("rank", "alpha", "delta_scaling", "evaluation", "dtype")


@st.composite
def layer_cases(draw):
  """A layer call; the names in ``broken`` get a bad value (about half the cases have none)."""
  in_features, features = draw(st.integers(1, 4)), draw(st.integers(1, 4))
  broken = draw(st.sets(st.sampled_from(BREAKABLE), max_size=2))

  def pick(name, good, bad):
    return draw(bad if name in broken else good)

  largest = min(in_features, features)
  return {
    "in_features": in_features,
    "features": features,
    "rank": pick(
      "rank", st.integers(1, largest), st.sampled_from([-1, 0, largest + 1, 2.0, True, "2"])
    ),
    "lead": tuple(draw(st.lists(st.integers(1, 3), max_size=2))),
    "x_dtype": draw(st.sampled_from([*FLOATS, jnp.int32])),
    "param_dtype": draw(st.sampled_from(FLOATS)),
    "dtype": pick("dtype", st.sampled_from([None, None, jnp.float32]), st.just(jnp.int32)),
    "alpha": pick(
      "alpha", st.sampled_from([None, 0.5, 4.0]), st.sampled_from([NAN, INF, 0.0, -1.0])
    ),
    "delta_scaling": pick(
      "delta_scaling", st.sampled_from([0.1, 1.0, 3.0]), st.sampled_from([0.0, -0.5, NAN, INF])
    ),
    "evaluation": pick(
      "evaluation", st.sampled_from(["auto", "merged", "factored"]), st.just("fused")
    ),
    "promotion": draw(st.sampled_from(["standard", "standard", "strict"])),
    "seed": draw(st.integers(0, 2**16)),
  }


def _random(rng, shape, dtype):
  """NumPy values in ``dtype`` (small integers for an integer dtype): no XLA compilation."""
  if jnp.issubdtype(dtype, jnp.integer):
    return jnp.asarray(rng.integers(-3, 4, shape), dtype)
  return jnp.asarray(np.asarray(rng.standard_normal(shape), jnp.dtype(dtype)))


def _run_layer(case):
  """Builds the layer, gives every parameter a random value, returns y and the gradients.

  The shapes of the variables come from tracing ``init``; the forward and the
  gradient are one compiled function, so each drawn case compiles once.
  """
  layer = dl.DeltaLoRADense(
    features=case["features"],
    rank=case["rank"],
    alpha=case["alpha"],
    delta_scaling=case["delta_scaling"],
    evaluation=case["evaluation"],
    dtype=case["dtype"],
    param_dtype=case["param_dtype"],
  )
  rng = np.random.default_rng(case["seed"])
  x = _random(rng, (*case["lead"], case["in_features"]), case["x_dtype"])
  shapes = jax.eval_shape(layer.init, jax.random.key(0), x)
  variables = jax.tree.map(lambda v: _random(rng, v.shape, v.dtype), shapes)
  g = _random(rng, (*case["lead"], case["features"]), jnp.float32)

  def loss(v):
    y = layer.apply(v, x)
    return jnp.sum(y.astype(jnp.float32) * g), y

  grads, y = jax.jit(jax.grad(loss, has_aux=True))(variables)
  return layer, x, variables, y, g, grads


@SETTINGS
@given(layer_cases())
def test_layer_matches_float64_or_raises_clearly(case):
  bad = _expected_errors(case)
  with jax.numpy_dtype_promotion(case["promotion"]):
    if bad:
      with pytest.raises((ValueError, TypeError)) as error:
        _run_layer(case)
      message = str(error.value)
      assert any(name in message for name in bad), (bad, message)
      event(f"refused: {type(error.value).__name__} for {sorted(bad)}")
      return
    layer, x, variables, y, g, grads = _run_layer(case)
    event(f"computed: x {jnp.dtype(case['x_dtype'])}, params {jnp.dtype(case['param_dtype'])}")
    # The base layer's rule, the same under strict promotion: the widest of x and
    # the kernel and bias, whatever the factors' dtype (float32 at least).
    compute = case["dtype"] or dl.core.widest_dtype(case["x_dtype"], case["param_dtype"])
  assert y.dtype == compute and y.shape == (*case["lead"], case["features"])
  p = {k: _f64(v) for k, v in variables["params"].items()}
  d, x64, g64 = _f64(variables["delta"]["delta"]), _f64(x), _f64(g)
  s, ds = layer.scaling, case["delta_scaling"]
  ref = x64 @ p["kernel"] + p["bias"] + s * (x64 @ p["lora_a"]) @ p["lora_b"] + ds * x64 @ d
  size = abs(x64) @ (abs(p["kernel"]) + s * abs(p["lora_a"]) @ abs(p["lora_b"]) + ds * abs(d))
  size = size + abs(p["bias"])
  eps = _eps(compute, case["param_dtype"])
  terms = case["in_features"] + case["rank"] + 2
  np.testing.assert_allclose(_f64(y), ref, rtol=0, atol=float(np.max(4 * terms * eps * size)))

  rows = math.prod(case["lead"])
  x2, g2 = x64.reshape(rows, -1), g64.reshape(rows, -1)
  want = {
    "delta": ds * x2.T @ g2,
    "lora_a": s * x2.T @ (g2 @ p["lora_b"].T),
    "lora_b": s * (x2 @ p["lora_a"]).T @ g2,
  }
  scale = {
    "delta": ds * abs(x2).T @ abs(g2),
    "lora_a": s * abs(x2).T @ (abs(g2) @ abs(p["lora_b"]).T),
    "lora_b": s * (abs(x2) @ abs(p["lora_a"])).T @ abs(g2),
  }
  got = {"delta": grads["delta"]["delta"], **grads["params"]}
  for name, value in want.items():
    atol = float(np.max(4 * (terms + rows) * eps * scale[name]))
    np.testing.assert_allclose(_f64(got[name]), value, rtol=0, atol=atol, err_msg=name)
  for name in ("kernel", "bias"):  # a frozen base gets an exact zero
    np.testing.assert_array_equal(_f64(got[name]), 0.0)


@st.composite
def optimizer_cases(draw):
  return {
    "momentum": draw(
      st.one_of(
        st.floats(0.0, 0.99),
        st.sampled_from([-0.1, 1.0, 1.5, NAN, INF, "0.9", True, None]),
      )
    ),
    "learning_rate": draw(
      st.one_of(st.floats(1e-3, 1.0), st.sampled_from([NAN, -INF, "0.1", "schedule"]))
    ),
    "velocity_dtype": draw(st.sampled_from([None, jnp.float32, jnp.bfloat16])),
    "param_dtype": draw(st.sampled_from([jnp.float32, jnp.bfloat16])),
    "shape": tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2))),
    "promotion": draw(st.sampled_from(["strict", "standard"])),
    "seed": draw(st.integers(0, 2**16)),
  }


def _expected_optimizer_errors(case) -> dict[str, type]:
  bad = {}
  for name, low in (("momentum", 0.0), ("learning_rate", None)):
    value = case[name]
    if value == "schedule":
      continue
    if isinstance(value, bool) or not isinstance(value, float):
      bad[name] = TypeError
    elif not math.isfinite(value) or (low is not None and not low <= value < 1.0):
      bad[name] = ValueError
  # A velocity dtype other than the parameters' is fine in both promotion modes: the EMA
  # runs in the velocity's dtype and the update is cast back to the gradient's.
  return bad


def _run_optimizer(case):
  learning_rate = case["learning_rate"]
  if learning_rate == "schedule":
    learning_rate = optax.constant_schedule(0.25)
  tx = dl.delta_momentum(learning_rate, case["momentum"], case["velocity_dtype"])
  rng = np.random.default_rng(case["seed"])
  d0, *grads = (_random(rng, case["shape"], case["param_dtype"]) for _ in range(3))

  @jax.jit
  def two_steps(d, grads):
    state = tx.init(d)
    for g in grads:
      updates, state = tx.update(g, state, d)
      d = optax.apply_updates(d, updates)
    return d, state

  return d0, grads, *two_steps(d0, grads)


@SETTINGS
@given(optimizer_cases())
def test_delta_momentum_matches_float64_or_raises_clearly(case):
  bad = _expected_optimizer_errors(case)
  with jax.numpy_dtype_promotion(case["promotion"]):
    if bad:
      with pytest.raises((ValueError, TypeError)) as error:
        _run_optimizer(case)
      assert any(name in str(error.value) for name in bad), (bad, str(error.value))
      event(f"refused: {type(error.value).__name__} for {sorted(bad)}")
      return
    d0, grads, d, state = _run_optimizer(case)
    event(f"computed: D {jnp.dtype(case['param_dtype'])}, velocity {case['velocity_dtype']}")
  mu = case["momentum"]
  lr = 0.25 if case["learning_rate"] == "schedule" else case["learning_rate"]
  velocity, want = np.zeros(case["shape"]), _f64(d0)
  for g in grads:
    velocity = mu * velocity + (1 - mu) * _f64(g)
    want = want - lr * velocity
  assert d.dtype == case["param_dtype"] and int(state[0].count) == 2
  assert state[0].velocity.dtype == (case["velocity_dtype"] or case["param_dtype"])
  eps = _eps(case["param_dtype"], case["velocity_dtype"] or case["param_dtype"])
  size = abs(_f64(d0)) + lr * sum(abs(_f64(g)) for g in grads)
  np.testing.assert_allclose(_f64(d), want, rtol=0, atol=float(np.max(8 * eps * size)))
  np.testing.assert_allclose(
    _f64(state[0].velocity),
    velocity,
    rtol=0,
    atol=float(np.max(8 * eps * sum(abs(_f64(g)) for g in grads))),
  )


@pytest.mark.parametrize(
  ("x_dtype", "param_dtype", "dtype", "promotion", "outcome"),
  [
    # An integer (or bool) input is promoted with the parameters: computed in float32.
    (jnp.int32, jnp.float32, None, "standard", jnp.float32),
    (jnp.bool_, jnp.float32, None, "standard", jnp.float32),
    # Mixed precisions: the wider dtype computes, unless dtype says otherwise.
    (jnp.bfloat16, jnp.float32, None, "standard", jnp.float32),
    (jnp.float32, jnp.bfloat16, None, "standard", jnp.float32),
    (jnp.float16, jnp.bfloat16, None, "standard", jnp.float32),
    (jnp.float32, jnp.float32, jnp.bfloat16, "strict", jnp.bfloat16),
    (jnp.int32, jnp.float32, jnp.float32, "strict", jnp.float32),
    # The layer picks its computation dtype itself, by the base layer's rule (the
    # widest of the input, the kernel and the bias), the same under strict promotion.
    (jnp.int32, jnp.float32, None, "strict", jnp.float32),
    (jnp.bfloat16, jnp.float32, None, "strict", jnp.float32),
    # A bfloat16 model fed bfloat16 stays bfloat16, as the base layer does (float32
    # factors and D are cast to it): not float32 because the adapter is.
    (jnp.bfloat16, jnp.bfloat16, None, "strict", jnp.bfloat16),
    (jnp.int32, jnp.bfloat16, None, "standard", jnp.bfloat16),
    # An integer computation dtype would truncate every product: refused.
    (jnp.float32, jnp.float32, jnp.int32, "standard", TypeError),
  ],
)
def test_dtype_rules(x_dtype, param_dtype, dtype, promotion, outcome):
  layer = dl.DeltaLoRADense(features=3, rank=2, dtype=dtype, param_dtype=param_dtype)
  x = jnp.asarray(np.arange(8).reshape(2, 4) % 3 - 1, x_dtype)
  rng = np.random.default_rng(0)
  shapes = {
    "params": {
      "kernel": (4, 3),
      "bias": (3,),
      "lora_a": (4, 2),
      "lora_b": (2, 3),
    },
    "delta": {"delta": (4, 3)},
  }
  variables = jax.tree.map(
    lambda shape: _random(rng, shape, param_dtype), shapes, is_leaf=lambda s: isinstance(s, tuple)
  )
  with jax.numpy_dtype_promotion(promotion):
    if issubclass(outcome, Exception):
      with pytest.raises(outcome, match="dtype"):
        layer.apply(variables, x)
      return
    y = layer.apply(variables, x)
  assert y.dtype == outcome
  p = {k: _f64(v) for k, v in variables["params"].items()}
  x64 = _f64(x)
  ref = x64 @ (p["kernel"] + (p["lora_a"] @ p["lora_b"]) + 0.1 * _f64(variables["delta"]["delta"]))
  np.testing.assert_allclose(
    _f64(y), ref + p["bias"], rtol=0, atol=0.1 if outcome != jnp.float32 else 1e-5
  )
