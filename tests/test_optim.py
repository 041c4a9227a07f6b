"""The delta rule and the whole-tree optimizer against hand-written references."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import deltalora_jax as dl

IN, OUT, R, N = 5, 4, 2, 8
LR, MU, ALPHA, DS = 0.05, 0.9, 3.0, 0.5
STEPS = 20


# --------------------------------------------------------------------------
# delta_momentum: golden values of the seed rule, V <- mu V + (1 - mu) g, D <- D - lr V from
# V = D = 0: D_1 = -lr (1 - mu) g_1, D_2 = -lr [(1 - mu) g_1 + mu (1 - mu) g_1 + (1 - mu) g_2].
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
  """The seed rule's training step, written out in float64 numpy.

  SGD on A and B (and on W, b when the base trains), then V <- mu V + (1 - mu) dD and
  D <- D - lr V.
  """
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
  layers = dl.adapted_layers(layer, jnp.zeros((N, IN), dtype))
  base = None if freeze_base else optax.sgd(LR)
  tx = dl.delta_lora(LR, MU, layers=layers, lora_optimizer=optax.sgd(LR), base_optimizer=base)

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
LAYERS = dl.adapted_layers(LAYER, X)


def _delta_lora(learning_rate=LR, momentum=MU, **kwargs):
  """``delta_lora`` on :data:`LAYER`, the seed's shared rate on the factors unless given."""
  kwargs.setdefault("lora_optimizer", optax.sgd(learning_rate))
  return dl.delta_lora(learning_rate, momentum, layers=LAYERS, **kwargs)


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
  tx = _delta_lora()
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
  tx = optax.chain(optax.clip_by_global_norm(1.0), _delta_lora())
  step, _ = _make_step(tx)
  variables = _variables()
  new, _ = step(variables, tx.init(variables), 1.0)
  norm = float(optax.tree.norm(GRADS))
  assert norm > 1.0  # the clip is active in this case
  _assert_params(new, _expected_after_one_step(GRADS, factor=1.0 / norm))


def test_inject_hyperparams_changes_learning_rate_and_momentum_inside_jit():
  tx = optax.inject_hyperparams(dl.delta_lora)(
    learning_rate=LR, momentum=MU, layers=LAYERS, lora_optimizer=optax.sgd(LR)
  )
  step, traces = _make_step(tx)
  variables = _variables()
  opt_state = tx.init(variables)
  # Values unlike the defaults (LR = 0.05, MU = 0.9), changed again between steps.
  (lr1, mu1), (lr2, mu2) = (0.2, 0.5), (0.1, 0.25)
  tol = {"rtol": 1e-5, "atol": 1e-7}
  opt_state.hyperparams["learning_rate"] = jnp.asarray(lr1, jnp.float32)
  opt_state.hyperparams["momentum"] = jnp.asarray(mu1, jnp.float32)
  v1, opt_state = step(variables, opt_state, 1.0)
  g1 = GRADS["delta"]["delta"]
  velocity1 = (1 - mu1) * g1  # V <- mu V + (1 - mu) g, from V = 0
  d1 = -lr1 * velocity1  # D <- D - lr V, from D = 0
  np.testing.assert_allclose(v1["delta"]["delta"], d1, **tol)
  np.testing.assert_allclose(dl.velocity(opt_state)["delta"]["delta"], velocity1, **tol)
  # The factors keep their own optimizer: the injected rate is D's alone.
  want_a = variables["params"]["lora_a"] - LR * GRADS["params"]["lora_a"]
  np.testing.assert_allclose(v1["params"]["lora_a"], want_a, **tol)

  opt_state.hyperparams["learning_rate"] = jnp.asarray(lr2, jnp.float32)
  opt_state.hyperparams["momentum"] = jnp.asarray(mu2, jnp.float32)
  g2 = jax.grad(_loss)(v1)["delta"]["delta"]
  v2, opt_state = step(v1, opt_state, 1.0)
  velocity2 = mu2 * velocity1 + (1 - mu2) * g2
  np.testing.assert_allclose(dl.velocity(opt_state)["delta"]["delta"], velocity2, **tol)
  np.testing.assert_allclose(v2["delta"]["delta"], d1 - lr2 * velocity2, **tol)
  assert len(traces) == 1  # a new value is not a new trace


def test_multi_steps_applies_the_mean_every_k_steps():
  tx = optax.MultiSteps(_delta_lora(), every_k_schedule=2)
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
  tx = optax.apply_if_finite(_delta_lora(), max_consecutive_errors=5)
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
  tx = _delta_lora(lora_optimizer=optax.sgd(0.5))
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
  tree = _variables()
  tree["params"]["head"] = {"kernel": jnp.ones(2)}
  grads = jax.tree.map(jnp.ones_like, tree)
  for other, want in ((None, 1.0), (optax.sgd(0.5), 0.5)):
    tx = _delta_lora(other_optimizer=other)
    updates, _ = tx.update(grads, tx.init(tree), tree)
    np.testing.assert_allclose(optax.apply_updates(tree, updates)["params"]["head"]["kernel"], want)


def test_reset_velocity_zeroes_only_velocity():
  tx = _delta_lora()
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
    (lambda: _delta_lora(momentum=1.0), ValueError, r"momentum=1.0"),
    (lambda: _delta_lora(momentum=float("nan")), ValueError, r"momentum=nan"),
    (lambda: _delta_lora(float("inf")), ValueError, r"learning_rate=inf"),
    (lambda: dl.delta_momentum(LR, momentum=-0.5), ValueError, r"momentum=-0.5"),
    (lambda: _delta_lora(lora_optimizer="adam"), TypeError, r"lora_optimizer.*'adam'"),
    (lambda: _delta_lora(lora_optimizer=None), TypeError, r"lora_optimizer.*None.*no default"),
    (
      lambda: dl.delta_lora(LR, layers=LAYERS),
      TypeError,
      r"missing 1 required keyword-only argument: 'lora_optimizer'",
    ),
    (
      lambda: dl.delta_lora(LR, lora_optimizer=optax.sgd(LR)),
      TypeError,
      r"missing 1 required keyword-only argument: 'layers'",
    ),
    (
      lambda: dl.delta_lora(LR, layers={"x": nn.Dense(2)}, lora_optimizer=optax.sgd(LR)),
      TypeError,
      r"layers\['x'\] must be an adapted layer",
    ),
    (
      lambda: dl.delta_lora(
        LR, layers=dl.adapted_layers(_mlp(use_delta=False), X), lora_optimizer=optax.sgd(LR)
      ),
      ValueError,
      r"every layer of `layers` has use_delta=False \(\['hidden', 'out'\]\)",
    ),
    (
      lambda: _delta_lora().init({"params": _variables()["params"]}),
      ValueError,
      r"needs the variables tree with the 'delta' collection.*\['params'\]",
    ),
    (lambda: dl.velocity(optax.sgd(LR).init(jnp.zeros(1))), ValueError, r"no velocity"),
  ],
)
def test_bad_optimizer_arguments_raise_early(call, error, match):
  with pytest.raises(error, match=match):
    call()


# --------------------------------------------------------------------------
# labels: the routing, replaced.
# --------------------------------------------------------------------------


class _MLP(nn.Module):
  """Two adapted layers and a plain head."""

  freeze_base: tuple[bool, bool] = (True, True)
  use_delta: bool = True

  @nn.compact
  def __call__(self, x):
    options = {"rank": R, "alpha": ALPHA, "delta_scaling": DS, "use_delta": self.use_delta}
    x = dl.DeltaLoRADense(6, freeze_base=self.freeze_base[0], name="hidden", **options)(x)
    x = dl.DeltaLoRADense(OUT, freeze_base=self.freeze_base[1], name="out", **options)(nn.tanh(x))
    return nn.Dense(2, name="head")(x)


def _mlp(**kwargs):
  return _MLP(**kwargs)


def _mlp_setup(model):
  """Variables (nonzero ``B`` so that every factor has a gradient), layers and gradients."""
  variables = model.init(jax.random.key(1), X)
  rng = np.random.default_rng(3)
  for name in ("hidden", "out"):
    shape = variables["params"][name]["lora_b"].shape
    variables["params"][name]["lora_b"] = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  loss = lambda v: jnp.sum(model.apply(v, X) ** 2)  # noqa: E731
  return variables, dl.adapted_layers(model, X), jax.grad(loss)(variables)


def test_labels_constants_are_public_and_strings():
  assert dl.Label.DELTA == "delta" and dl.Label.LORA == "lora"
  assert dl.Label.BASE == "base" and dl.Label.OTHER == "other"
  assert dl.optim.DELTA is dl.Label.DELTA and dl.optim.OTHER is dl.Label.OTHER
  assert {"delta": 1}[dl.Label.DELTA] == 1  # hashes as its string


def test_labels_callable_and_tree_equal_the_default_routing():
  variables, layers, grads = _mlp_setup(_mlp())
  plain = jax.tree.map(str, dl.leaf_labels(variables))  # a tree of plain strings
  assert plain["params"]["out"]["lora_a"] == "lora" and type(plain["delta"]["out"]["delta"]) is str
  results = []
  for labels in (None, dl.leaf_labels, plain):
    tx = dl.delta_lora(
      LR,
      MU,
      layers=layers,
      lora_optimizer=optax.sgd(0.1, momentum=0.5),
      other_optimizer=optax.sgd(0.3),
      labels=labels,
    )
    state = tx.init(variables)
    for _ in range(2):
      updates, state = tx.update(grads, state, variables)
    results.append((updates, state))
  chex.assert_trees_all_equal(results[0], results[1])
  chex.assert_trees_all_equal(results[0], results[2])


def test_labels_prefix_tree_routes_whole_collections():
  # Everything in 'params' goes to other_optimizer, so lora_optimizer moves nothing.
  tx = _delta_lora(
    lora_optimizer=optax.sgd(100.0),
    other_optimizer=optax.sgd(0.5),
    labels={"params": dl.Label.OTHER, "delta": dl.Label.DELTA},
  )
  step, _ = _make_step(tx)
  variables = _variables()
  new, _ = step(variables, tx.init(variables), 1.0)
  want = _expected_after_one_step(GRADS)
  for name in ("lora_a", "lora_b"):
    want[name] = variables["params"][name] - 0.5 * GRADS["params"][name]
  _assert_params(new, want)


def test_labels_callable_freezes_the_factors_of_one_layer():
  variables, layers, grads = _mlp_setup(_mlp())

  def labels(tree):
    def relabel(path, label):
      hidden = dl.paths.key_path(path)[1:2] == ("hidden",)
      return dl.Label.OTHER if hidden and label == dl.Label.LORA else label

    return jax.tree_util.tree_map_with_path(relabel, dl.leaf_labels(tree))

  tx = dl.delta_lora(LR, MU, layers=layers, lora_optimizer=optax.sgd(0.1), labels=labels)
  updates, _ = tx.update(grads, tx.init(variables), variables)
  new = optax.apply_updates(variables, updates)
  for name in ("lora_a", "lora_b"):
    np.testing.assert_array_equal(
      new["params"]["hidden"][name], variables["params"]["hidden"][name]
    )
    want = variables["params"]["out"][name] - 0.1 * grads["params"]["out"][name]
    np.testing.assert_allclose(new["params"]["out"][name], want, rtol=1e-6, atol=1e-7)
  for name in ("hidden", "out"):  # D still follows the delta rule
    want = -LR * (1 - MU) * grads["delta"][name]["delta"]
    np.testing.assert_allclose(new["delta"][name]["delta"], want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
  ("labels", "match"),
  [
    (
      lambda tree: jax.tree.map(lambda _: "head", tree),
      r"labels must give each leaf one of the labels \['delta', 'lora', 'base', 'other'\]"
      r".*, got 'head'",
    ),
    ({"params": "lora", "delta": 3}, r"one of the labels \['delta', 'lora', 'base', 'other'\].*3"),
    (
      {"params": dl.Label.LORA, "delta": dl.Label.OTHER},
      r"labels gave no leaf the label 'delta'.*only \['lora', 'other'\]; the labels allowed "
      r"are \['delta', 'lora', 'base', 'other'\]",
    ),
  ],
)
def test_bad_labels_raise_at_init_naming_the_labels_allowed(labels, match):
  tx = _delta_lora(labels=labels)
  with pytest.raises(ValueError, match=match):
    tx.init(_variables())


# --------------------------------------------------------------------------
# layers: freeze_base against base_optimizer, and the tree against layers.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
  ("freeze_base", "base_optimizer", "match"),
  [
    (
      (True, False),
      None,
      r"^layer 'out' has freeze_base=False but base_optimizer is None: pass "
      r"base_optimizer=\.\.\., or build the layer with freeze_base=True$",
    ),
    ((False, False), None, r"^layers \['hidden', 'out'\] have freeze_base=False"),
    (
      (True, True),
      optax.sgd(0.1),
      r"base_optimizer is given but every layer has freeze_base=True.*drop base_optimizer",
    ),
  ],
)
def test_freeze_base_and_base_optimizer_must_agree_linen(freeze_base, base_optimizer, match):
  layers = dl.adapted_layers(_mlp(freeze_base=freeze_base), X)
  with pytest.raises(ValueError, match=match):
    dl.delta_lora(LR, layers=layers, lora_optimizer=optax.sgd(LR), base_optimizer=base_optimizer)


def test_base_optimizer_trains_the_base_of_an_unfrozen_layer_only():
  variables, layers, grads = _mlp_setup(_mlp(freeze_base=(True, False)))
  assert float(jnp.abs(grads["params"]["hidden"]["kernel"]).sum()) == 0  # frozen: no gradient
  tx = dl.delta_lora(LR, layers=layers, lora_optimizer=optax.sgd(LR), base_optimizer=optax.sgd(0.1))
  updates, _ = tx.update(grads, tx.init(variables), variables)
  new = optax.apply_updates(variables, updates)
  old = variables["params"]
  np.testing.assert_array_equal(new["params"]["hidden"]["kernel"], old["hidden"]["kernel"])
  want = old["out"]["kernel"] - 0.1 * grads["params"]["out"]["kernel"]
  np.testing.assert_allclose(new["params"]["out"]["kernel"], want, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(new["params"]["head"]["kernel"], old["head"]["kernel"])


DECAYING = optax.chain(optax.add_decayed_weights(0.5), optax.sgd(0.1))  # as AdamW's decay


def test_weight_decay_of_base_optimizer_leaves_frozen_bases_alone_linen():
  """A frozen base has a zero gradient, but decay would still shrink it: it never sees it."""
  variables, layers, grads = _mlp_setup(_mlp(freeze_base=(True, False)))
  tx = dl.delta_lora(LR, layers=layers, lora_optimizer=optax.sgd(LR), base_optimizer=DECAYING)
  updates, _ = tx.update(grads, tx.init(variables), variables)
  new, old = optax.apply_updates(variables, updates)["params"], variables["params"]
  for leaf in ("kernel", "bias"):
    np.testing.assert_array_equal(new["hidden"][leaf], old["hidden"][leaf])
    want = old["out"][leaf] - 0.1 * (grads["params"]["out"][leaf] + 0.5 * old["out"][leaf])
    np.testing.assert_allclose(new["out"][leaf], want, rtol=1e-6, atol=1e-7)


def test_weight_decay_of_base_optimizer_leaves_frozen_bases_alone_nnx():
  model = _NNXModel(freeze_out=False, rngs=nnx.Rngs(0))
  before = {name: getattr(model, name).kernel[...] for name in ("hidden", "out")}
  tx = dl.delta_lora(LR, layers=model, lora_optimizer=optax.sgd(LR), base_optimizer=DECAYING)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  grads = nnx.grad(lambda m: jnp.sum(m(X) ** 2))(model)
  optimizer.update(model, grads)
  np.testing.assert_array_equal(model.hidden.kernel[...], before["hidden"])
  want = before["out"] - 0.1 * (grads["out"]["kernel"][...] + 0.5 * before["out"])
  np.testing.assert_allclose(model.out.kernel[...], want, rtol=1e-6, atol=1e-7)


class _NNXModel(nnx.Module):
  def __init__(self, *, freeze_out=True, rngs):
    self.hidden = dl.DeltaLoRALinear(IN, 6, rank=R, rngs=rngs)
    self.out = dl.DeltaLoRALinear(6, OUT, rank=R, freeze_base=freeze_out, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.hidden(x)))


def test_freeze_base_and_base_optimizer_must_agree_nnx():
  frozen, unfrozen = _NNXModel(rngs=nnx.Rngs(0)), _NNXModel(freeze_out=False, rngs=nnx.Rngs(0))
  sgd = optax.sgd(LR)
  with pytest.raises(ValueError, match=r"^layer 'out' has freeze_base=False but base_optimizer"):
    dl.delta_lora(LR, layers=unfrozen, lora_optimizer=sgd)
  with pytest.raises(ValueError, match=r"every layer has freeze_base=True"):
    dl.delta_lora(LR, layers=frozen, lora_optimizer=sgd, base_optimizer=sgd)
  # Given both, the unfrozen base trains through nnx.Optimizer(wrt=nnx.Param).
  before = {name: getattr(unfrozen, name).kernel[...] for name in ("hidden", "out")}
  optimizer = nnx.Optimizer(
    unfrozen,
    dl.delta_lora(LR, layers=unfrozen, lora_optimizer=sgd, base_optimizer=optax.sgd(0.1)),
    wrt=nnx.Param,
  )
  grads = nnx.grad(lambda m: jnp.sum(m(X) ** 2))(unfrozen)
  optimizer.update(unfrozen, grads)
  np.testing.assert_array_equal(unfrozen.hidden.kernel[...], before["hidden"])
  want = before["out"] - 0.1 * grads["out"]["kernel"][...]
  np.testing.assert_allclose(unfrozen.out.kernel[...], want, rtol=1e-6, atol=1e-7)


def test_layers_must_match_the_variables_tree_linen():
  tx = dl.delta_lora(LR, layers=dl.adapted_layers(_mlp(), X), lora_optimizer=optax.sgd(LR))
  with pytest.raises(
    ValueError,
    match=r"adapted layers of the variables tree differ from those of `layers`: the tree has "
    r"\[''\], layers has \['hidden', 'out'\]",
  ):
    tx.init(_variables())
  # One layer fewer in `layers` than in the tree is refused too.
  variables, layers, _ = _mlp_setup(_mlp())
  del layers["out"]
  tx = dl.delta_lora(LR, layers=layers, lora_optimizer=optax.sgd(LR))
  with pytest.raises(
    ValueError, match=r"the tree has \['hidden', 'out'\], layers has \['hidden'\]"
  ):
    tx.init(variables)


def test_layers_must_match_the_variables_tree_nnx():
  model = _NNXModel(rngs=nnx.Rngs(0))
  other = dl.DeltaLoRALinear(IN, OUT, rank=R, rngs=nnx.Rngs(0))
  tx = dl.delta_lora(LR, layers=other, lora_optimizer=optax.sgd(LR))
  with pytest.raises(ValueError, match=r"the tree has \['hidden', 'out'\], layers has \[''\]"):
    tx.init(nnx.state(model, nnx.Param))
  tx = dl.delta_lora(LR, layers=model, lora_optimizer=optax.sgd(LR))
  tx.init(nnx.state(model, nnx.Param))  # its own layers: accepted
