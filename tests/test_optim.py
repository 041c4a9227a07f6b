"""The delta rule and the whole-tree optimizer against hand-written references."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import deltalora_jax as dl

IN, OUT, R, N = 5, 4, 2, 8
LR, MU, ALPHA, DS = 0.05, 0.9, 3.0, 0.5
STEPS = 20


# --------------------------------------------------------------------------
# delta_momentum: golden values of REFERENCE.md.
# --------------------------------------------------------------------------


def test_delta_momentum_first_two_steps_match_reference():
  tx = dl.delta_momentum(LR, MU)
  g1, g2 = jnp.array([1.0, -2.0]), jnp.array([3.0, 0.5])
  d = jnp.zeros(2)
  state = tx.init(d)
  u, state = tx.update(g1, state)
  d = optax.apply_updates(d, u)
  np.testing.assert_allclose(d, -LR * (1 - MU) * g1, rtol=1e-6)
  u, state = tx.update(g2, state)
  d = optax.apply_updates(d, u)
  want = -LR * ((1 - MU) * g1 + MU * (1 - MU) * g1 + (1 - MU) * g2)
  np.testing.assert_allclose(d, want, rtol=1e-6)
  velocity_state = state[0]
  assert isinstance(velocity_state, dl.ScaleByDeltaMomentumState)
  assert velocity_state.count.dtype == jnp.int32 and int(velocity_state.count) == 2


def test_delta_momentum_zero_momentum_is_sgd():
  tx = dl.delta_momentum(0.5, momentum=0.0)
  u, _ = tx.update(jnp.array([2.0]), tx.init(jnp.zeros(1)))
  np.testing.assert_allclose(u, [-1.0])


def test_delta_momentum_accepts_a_schedule():
  schedule = optax.linear_schedule(1.0, 0.0, transition_steps=4)
  tx = dl.delta_momentum(schedule, momentum=0.0)
  state = tx.init(jnp.zeros(1))
  steps = []
  for _ in range(3):
    u, state = tx.update(jnp.ones(1), state)
    steps.append(float(u[0]))
  np.testing.assert_allclose(steps, [-1.0, -0.75, -0.5])


def test_velocity_dtype_is_kept():
  tx = dl.delta_momentum(LR, MU, velocity_dtype=jnp.float32)
  state = tx.init(jnp.zeros(2, jnp.bfloat16))
  _, state = tx.update(jnp.ones(2, jnp.bfloat16), state)
  assert dl.velocity(state).dtype == jnp.float32


# --------------------------------------------------------------------------
# 20 steps of the whole rule against a float64 numpy reference.
# --------------------------------------------------------------------------


def _batches(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((STEPS, N, IN))
  t = rng.standard_normal((STEPS, N, OUT))
  return x, t


def _reference_run(params, delta, *, freeze_base, use_bias):
  """REFERENCE.md's training step, written out in float64 numpy."""
  p = {k: np.array(v, np.float64) for k, v in params.items()}  # copies, not views
  d = np.array(delta, np.float64)
  v = np.zeros_like(d)
  s = ALPHA / R
  history = []
  for x, t in zip(*_batches(), strict=True):
    b = p.get("bias", 0.0)
    y = x @ p["kernel"] + b + s * (x @ p["lora_a"]) @ p["lora_b"] + DS * x @ d
    g = (y - t) / N  # d/dy of 0.5 * mean_rows ||y - t||^2
    grads = {
      "kernel": x.T @ g,
      "bias": g.sum(0),
      "lora_a": s * x.T @ (g @ p["lora_b"].T),
      "lora_b": s * (x @ p["lora_a"]).T @ g,
    }
    grad_d = DS * x.T @ g
    for k in ("lora_a", "lora_b") + (() if freeze_base else ("kernel", "bias")):
      if k in p:
        p[k] = p[k] - LR * grads[k]
    v = MU * v + (1 - MU) * grad_d
    d = d - LR * v
    history.append(({k: a.copy() for k, a in p.items()}, d.copy(), v.copy()))
  # assert_allclose calls NaN equal to NaN: a diverging run would prove nothing.
  assert all(np.isfinite(a).all() for a in (*p.values(), d, v))
  return history


@functools.cache
def _jitted_run(freeze_base, use_bias, dtype):
  layer = dl.DeltaLoRADense(
    OUT,
    rank=R,
    alpha=ALPHA,
    delta_scaling=DS,
    freeze_base=freeze_base,
    use_bias=use_bias,
    param_dtype=dtype,
  )
  tx = dl.delta_lora(LR, MU, base_optimizer=None if freeze_base else optax.sgd(LR))

  def loss(variables, x, t):
    return 0.5 * jnp.mean(jnp.sum((layer.apply(variables, x) - t) ** 2, axis=-1))

  @jax.jit
  def step(variables, opt_state, x, t):
    grads = jax.grad(loss)(variables, x, t)
    updates, opt_state = tx.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state

  return layer, tx, step


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("freeze_base", [True, False])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_twenty_steps_equal_float64_reference(dtype, freeze_base, use_bias):
  with jax.enable_x64(dtype == "float64"):
    dtype = jnp.dtype(dtype)
    layer, tx, step = _jitted_run(freeze_base, use_bias, dtype)
    x_all, t_all = _batches()
    variables = layer.init(jax.random.key(0), jnp.zeros((N, IN), dtype))
    # Start from a random B and D so that every term moves from step 1.
    rng = np.random.default_rng(7)
    variables["params"]["lora_b"] = jnp.asarray(rng.standard_normal((R, OUT)) * 0.3, dtype)
    variables["delta"]["delta"] = jnp.asarray(rng.standard_normal((IN, OUT)) * 0.3, dtype)
    history = _reference_run(
      variables["params"], variables["delta"]["delta"], freeze_base=freeze_base, use_bias=use_bias
    )
    opt_state = tx.init(variables)
    # float32 accumulates rounding over 20 steps; float64 must agree to ~1e-12.
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == jnp.float64 else {"rtol": 2e-4, "atol": 2e-5}
    for i, (params, delta, velocity) in enumerate(history):
      variables, opt_state = step(
        variables, opt_state, jnp.asarray(x_all[i], dtype), jnp.asarray(t_all[i], dtype)
      )
      for name, want in params.items():
        np.testing.assert_allclose(variables["params"][name], want, **tol, err_msg=f"{name}@{i}")
      np.testing.assert_allclose(variables["delta"]["delta"], delta, **tol, err_msg=f"D@{i}")
      np.testing.assert_allclose(dl.velocity(opt_state)["delta"]["delta"], velocity, **tol)


# --------------------------------------------------------------------------
# A small case for composition with optax wrappers.
# --------------------------------------------------------------------------

LAYER = dl.DeltaLoRADense(OUT, rank=R, alpha=ALPHA, delta_scaling=DS)
X = jnp.asarray(np.random.default_rng(1).standard_normal((N, IN)), jnp.float32)


def _variables():
  variables = LAYER.init(jax.random.key(0), X)
  variables["params"]["lora_b"] = jnp.full((R, OUT), 0.5, jnp.float32)
  return variables


def _loss(variables, scale=1.0):
  return scale * jnp.sum(LAYER.apply(variables, X) ** 2)


GRADS = jax.grad(_loss)(_variables())


def _make_step(tx):
  traces = []

  @jax.jit
  def step(variables, opt_state, scale):
    traces.append(None)
    grads = jax.grad(_loss)(variables, scale)
    updates, opt_state = tx.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state

  return step, traces


def _expected_after_one_step(grads, lr=LR, factor=1.0):
  v0 = _variables()["params"]
  return {
    "lora_a": v0["lora_a"] - lr * factor * grads["params"]["lora_a"],
    "lora_b": v0["lora_b"] - lr * factor * grads["params"]["lora_b"],
    "delta": -lr * (1 - MU) * factor * grads["delta"]["delta"],
  }


def _assert_params(variables, want, rtol=1e-5):
  np.testing.assert_allclose(variables["params"]["lora_a"], want["lora_a"], rtol=rtol, atol=1e-6)
  np.testing.assert_allclose(variables["params"]["lora_b"], want["lora_b"], rtol=rtol, atol=1e-6)
  np.testing.assert_allclose(variables["delta"]["delta"], want["delta"], rtol=rtol, atol=1e-6)


def test_training_step_compiles_once_and_freezes_base():
  tx = dl.delta_lora(LR, MU)
  step, traces = _make_step(tx)
  variables = _variables()
  opt_state = tx.init(variables)
  v1, opt_state = step(variables, opt_state, 1.0)
  v2, opt_state = step(v1, opt_state, 1.0)
  assert len(traces) == 1
  np.testing.assert_array_equal(v2["params"]["kernel"], variables["params"]["kernel"])
  np.testing.assert_array_equal(v2["params"]["bias"], variables["params"]["bias"])
  _assert_params(v1, _expected_after_one_step(GRADS))


def test_chain_with_global_norm_clipping():
  tx = optax.chain(optax.clip_by_global_norm(1.0), dl.delta_lora(LR, MU))
  step, _ = _make_step(tx)
  variables = _variables()
  new, _ = step(variables, tx.init(variables), 1.0)
  norm = float(optax.tree.norm(GRADS))
  assert norm > 1.0  # the clip is active in this case
  _assert_params(new, _expected_after_one_step(GRADS, factor=1.0 / norm))


def test_inject_hyperparams_changes_learning_rate_inside_jit():
  tx = optax.inject_hyperparams(dl.delta_lora)(learning_rate=LR, momentum=MU)
  step, traces = _make_step(tx)
  variables = _variables()
  opt_state = tx.init(variables)
  opt_state.hyperparams["learning_rate"] = jnp.asarray(0.05, jnp.float32)
  new, opt_state = step(variables, opt_state, 1.0)
  _assert_params(new, _expected_after_one_step(GRADS, lr=0.05))
  opt_state.hyperparams["momentum"] = jnp.asarray(0.5, jnp.float32)
  step(new, opt_state, 1.0)
  assert len(traces) == 1  # a new value is not a new trace


def test_multi_steps_applies_the_mean_every_k_steps():
  tx = optax.MultiSteps(dl.delta_lora(LR, MU), every_k_schedule=2)
  step, _ = _make_step(tx)
  variables = _variables()
  # optax.MultiSteps divides a float by its int32 step count: not strict-clean.
  with jax.numpy_dtype_promotion("standard"):
    opt_state = tx.init(variables)
    v1, opt_state = step(variables, opt_state, 1.0)
    chex.assert_trees_all_equal(v1, variables)  # first micro-step: nothing moves
    v2, _ = step(v1, opt_state, 3.0)
  _assert_params(v2, _expected_after_one_step(GRADS, factor=2.0))  # mean of 1x and 3x


def test_apply_if_finite_skips_a_nan_step_and_keeps_state():
  tx = optax.apply_if_finite(dl.delta_lora(LR, MU), max_consecutive_errors=5)
  step, _ = _make_step(tx)
  variables = _variables()
  opt_state = tx.init(variables)
  v1, opt_state = step(variables, opt_state, 1.0)
  v2, opt_state2 = step(v1, opt_state, jnp.nan)
  chex.assert_trees_all_equal(v2, v1)
  chex.assert_trees_all_equal(dl.velocity(opt_state2), dl.velocity(opt_state))
  assert int(opt_state2.notfinite_count) == 1
  v3, _ = step(v2, opt_state2, 1.0)
  assert not np.array_equal(v3["delta"]["delta"], v2["delta"]["delta"])


def test_lora_optimizer_is_used_for_factors_only():
  tx = dl.delta_lora(LR, MU, lora_optimizer=optax.sgd(0.5))
  step, _ = _make_step(tx)
  variables = _variables()
  new, _ = step(variables, tx.init(variables), 1.0)
  want = _expected_after_one_step(GRADS)
  want["lora_a"] = variables["params"]["lora_a"] - 0.5 * GRADS["params"]["lora_a"]
  want["lora_b"] = variables["params"]["lora_b"] - 0.5 * GRADS["params"]["lora_b"]
  _assert_params(new, want)


def test_leaf_labels_route_base_other_lora_and_delta():
  tree = {
    "params": {
      "adapted": {"kernel": 0, "bias": 0, "lora_a": 0, "lora_b": 0},
      "head": {"kernel": 0, "bias": 0},
      "gate": {"delta": 0},  # a user's parameter that happens to be called delta
    },
    "delta": {"adapted": {"delta": 0}},
  }
  labels = dl.leaf_labels(tree)
  assert labels == {
    "params": {
      "adapted": {"kernel": "base", "bias": "base", "lora_a": "lora", "lora_b": "lora"},
      "head": {"kernel": "other", "bias": "other"},
      "gate": {"delta": "other"},
    },
    "delta": {"adapted": {"delta": "delta"}},
  }


def test_head_is_frozen_unless_other_optimizer_given():
  tree = {
    "params": {"head": {"kernel": jnp.ones(2)}},
    "delta": {"a": {"delta": jnp.zeros(2)}},
  }
  grads = jax.tree.map(jnp.ones_like, tree)
  for other, want in ((None, 1.0), (optax.sgd(0.5), 0.5)):
    tx = dl.delta_lora(LR, other_optimizer=other)
    updates, _ = tx.update(grads, tx.init(tree), tree)
    np.testing.assert_allclose(optax.apply_updates(tree, updates)["params"]["head"]["kernel"], want)


def test_reset_velocity_zeroes_only_velocity():
  tx = dl.delta_lora(LR, MU)
  variables = _variables()
  _, opt_state = tx.update(GRADS, tx.init(variables), variables)
  reset = dl.reset_velocity(opt_state)
  assert float(jnp.abs(dl.velocity(opt_state)["delta"]["delta"]).sum()) > 0
  chex.assert_trees_all_equal(dl.velocity(reset)["delta"]["delta"], jnp.zeros((IN, OUT)))
  counts = optax.tree_utils.tree_get_all_with_path(reset, "count")
  assert all(int(c) == 1 for _, c in counts)


@pytest.mark.parametrize(
  ("call", "error", "match"),
  [
    (lambda: dl.delta_lora(LR, momentum=1.0), ValueError, r"momentum=1.0"),
    (lambda: dl.delta_lora(LR, momentum=float("nan")), ValueError, r"momentum=nan"),
    (lambda: dl.delta_lora(float("inf")), ValueError, r"learning_rate=inf"),
    (lambda: dl.delta_momentum(LR, momentum=-0.5), ValueError, r"momentum=-0.5"),
    (lambda: dl.delta_lora(LR, lora_optimizer="adam"), TypeError, r"lora_optimizer"),
    (
      lambda: dl.delta_lora(LR).init({"params": _variables()["params"]}),
      ValueError,
      r"needs the variables tree with the 'delta' collection.*\['params'\]",
    ),
    (lambda: dl.velocity(optax.sgd(LR).init(jnp.zeros(1))), ValueError, r"no velocity"),
  ],
)
def test_bad_optimizer_arguments_raise_early(call, error, match):
  with pytest.raises(error, match=match):
    call()
