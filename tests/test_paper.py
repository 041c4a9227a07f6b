"""paper_delta_lora: the published Delta-LoRA rule (Zi et al., arXiv 2309.02411), in place.

The layers here have no ``paper_lambda``: the rule writes the kernel (Algorithm 1 as
written); ``tests/test_paper_telescoped.py`` proves the telescoped form against it. Each
identity of the in-place form in the "Which rule?" guide (``docs/guides/which_rule.md``)
is proved here: the one-step rule by hand, the paper's start condition ``t > K``, the
telescoping sum and its rank, the equivalence with plain LoRA at alpha * (1 + lambda)
under Adam, the wrappers, the absence of a base kernel gradient in the compiled step,
and the absence of any full-size product before the start step.
"""

import re

import _docs
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import deltalora_jax as dl
from deltalora_jax import paper

IN, HIDDEN, OUT, R, ROWS = 8, 12, 6, 2, 10
ALPHA_HIDDEN = 4.0  # s = 2 for the hidden layer; s = 1 for the output layer
LAMBDA = 2.0
_rng = np.random.default_rng(0)
X = jnp.asarray(_rng.standard_normal((ROWS, IN)), jnp.float32)
Y = jnp.asarray(_rng.standard_normal((ROWS, OUT)), jnp.float32)


class MLP(nn.Module):
  """Two adapted layers with different scalings, and a plain (unadapted) layer."""

  alpha_factor: float = 1.0
  freeze_base: bool = True
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    def adapted(features, alpha, name):
      return dl.DeltaLoRADense(
        features,
        rank=R,
        alpha=alpha * self.alpha_factor,
        use_delta=False,
        freeze_base=self.freeze_base,
        param_dtype=self.param_dtype,
        name=name,
      )

    h = nn.tanh(adapted(HIDDEN, ALPHA_HIDDEN, "hidden")(x))
    h = nn.Dense(HIDDEN, param_dtype=self.param_dtype, name="plain")(h)
    return adapted(OUT, float(R), "out")(h)


MODEL = MLP()
LAYERS = dl.adapted_layers(MODEL, X)  # the rule reads each layer's scaling from these
SCALING = {name: layer.scaling for name, layer in LAYERS.items()}  # {'hidden': 2, 'out': 1}


def init(model=MODEL, seed=0, lora_b_scale=0.3):
  """Random variables of ``model`` (B too, so that A B and the rule are not trivial).

  Drawn with NumPy into the shapes of ``model.init``: nothing to compile.
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0), X.astype(model.param_dtype))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    scale = {"kernel": leaf.shape[0] ** -0.5, "bias": 0.1, "lora_a": R**-0.5}.get(
      name, lora_b_scale
    )
    return jnp.asarray(scale * rng.standard_normal(leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


VARIABLES = init()  # shared, read-only (JAX arrays are immutable)


def loss_fn(model):
  def loss(variables, x=X, y=Y):
    pred = model.apply(variables, x.astype(model.param_dtype))
    return jnp.mean((pred - y.astype(model.param_dtype)) ** 2)

  return loss


GRAD = jax.jit(jax.grad(loss_fn(MODEL)))


def jit_update(tx, standard=False):
  """``jax.jit(tx.update)``; ``standard`` promotion for optax's Adam and MultiSteps."""

  @jax.jit
  def update(grads, state, params):
    if not standard:
      return tx.update(grads, state, params)
    with jax.numpy_dtype_promotion("standard"):
      return tx.update(grads, state, params)

  return update


def make_step(model, tx):
  """A jitted training step; Adam's bias correction needs standard promotion."""
  loss = loss_fn(model)

  @jax.jit
  def step(variables, opt_state):
    grads = jax.grad(loss)(variables)
    with jax.numpy_dtype_promotion("standard"):
      updates, opt_state = tx.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state

  return step


def layer_arrays(variables, name):
  p = variables["params"][name]
  return p["kernel"], p["lora_a"], p["lora_b"]


def product(variables, name, dtype=np.float64):
  _, a, b = layer_arrays(variables, name)
  return np.asarray(a, dtype) @ np.asarray(b, dtype)


def plain_lora(learning_rate_or_tx):
  """Plain LoRA: the optimizer on the factors, everything else frozen."""
  return optax.multi_transform(
    {"lora": learning_rate_or_tx, "base": optax.set_to_zero(), "other": optax.set_to_zero()},
    dl.leaf_labels,
  )


# --------------------------------------------------------------------------
# Pure math.
# --------------------------------------------------------------------------


def test_public_names_import():
  for name in ("paper_delta_lora", "PaperDeltaLoRAState"):
    assert name in dl.__all__
    assert getattr(dl, name) is getattr(paper, name)


def test_factor_product_change_is_the_change_of_the_product_float64():
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    a, ua = rng.standard_normal((2, 7, 3))
    b, ub = rng.standard_normal((2, 3, 5))
    got = paper.factor_product_change(*map(jnp.asarray, (a, b, ua, ub)))
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, (a + ua) @ (b + ub) - a @ b, rtol=0, atol=1e-13)
    np.testing.assert_allclose(got, ua @ b + a @ ub + ua @ ub, rtol=0, atol=1e-13)


def test_factor_product_change_computes_in_float32_for_bfloat16():
  rng = np.random.default_rng(4)
  arrays = [jnp.asarray(rng.standard_normal(s), jnp.bfloat16) for s in ((7, 3), (3, 5)) * 2]
  a, b, ua, ub = arrays
  got = paper.factor_product_change(a, b, ua, ub)
  assert got.dtype == jnp.float32
  a, b, ua, ub = (np.asarray(x, np.float64) for x in arrays)
  np.testing.assert_allclose(got, ua @ b + a @ ub + ua @ ub, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# The rule, step by step.
# --------------------------------------------------------------------------


def test_one_step_by_hand_float64():
  """SGD on the factors: the kernel moves by lambda s (A'B' - AB) at the steps t > K only."""
  lr, start = 0.05, 1
  with jax.enable_x64(True):
    model = MLP(param_dtype=jnp.float64)
    variables = init(model)
    tx = dl.paper_delta_lora(
      lora_optimizer=optax.sgd(lr), layers=LAYERS, lambda_=LAMBDA, start_step=start
    )
    state = tx.init(variables)
    assert state.count.dtype == jnp.int32
    grad, update = jax.jit(jax.grad(loss_fn(model))), jax.jit(tx.update)
    for t in range(3):
      grads = grad(variables)
      updates, state = update(grads, state, variables)
      new = optax.apply_updates(variables, updates)
      for name, s in SCALING.items():
        w, a, b = layer_arrays(variables, name)
        w1, a1, b1 = layer_arrays(new, name)
        g = grads["params"][name]
        np.testing.assert_allclose(a1, a - lr * g["lora_a"], rtol=0, atol=1e-15)
        np.testing.assert_allclose(b1, b - lr * g["lora_b"], rtol=0, atol=1e-15)
        np.testing.assert_array_equal(
          new["params"][name]["bias"], variables["params"][name]["bias"]
        )
        if t <= start:  # the paper's condition is t > K
          np.testing.assert_array_equal(w1, w)
        else:
          want = LAMBDA * s * (np.asarray(a1) @ np.asarray(b1) - np.asarray(a) @ np.asarray(b))
          assert np.abs(want).max() > 1e-4
          np.testing.assert_allclose(w1 - w, want, rtol=0, atol=1e-13)
      # Layers that are not adapted are frozen without an other_optimizer.
      for leaf in ("kernel", "bias"):
        np.testing.assert_array_equal(
          new["params"]["plain"][leaf], variables["params"]["plain"][leaf]
        )
      variables = new
    assert int(state.count) == 3


@pytest.mark.parametrize("start_step", [0, 1, 2])
def test_start_step_is_the_papers_k_and_w_first_moves_at_t_k_plus_1(start_step):
  """Algorithm 1 of the paper: ``for t = 0, ..., T - 1: ...; if t > K: W += lambda s (A'B' - AB)``.

  By hand: one 1 x 1 layer (s = alpha / r = 2 / 1), W_0 = 0, A_0 = 1, B_0 = 0, SGD at
  rate 1 on the constant gradients g_A = 0, g_B = -1. Then A_t = 1 and B_t = t, so
  A_{t+1} B_{t+1} - A_t B_t = 1 and each step t > K adds lambda s = 4 to W. W after the
  steps t = 0, 1, 2, 3, 4 (``t`` is the number of steps taken before, the state's count):
  K = 0: 0 4 8 12 16; K = 1: 0 0 4 8 12; K = 2: 0 0 0 4 8. W first moves at t = K + 1.
  """
  one = jnp.ones((1, 1), jnp.float32)
  layer = dl.DeltaLoRADense(1, rank=1, alpha=2.0, use_delta=False)
  tx = dl.paper_delta_lora(
    lora_optimizer=optax.sgd(1.0),
    layers=dl.adapted_layers(layer, one),
    lambda_=2.0,
    start_step=start_step,
  )
  zero, bias = jnp.zeros((1, 1), jnp.float32), jnp.zeros((1,), jnp.float32)
  variables = {"params": {"kernel": zero, "bias": bias, "lora_a": one, "lora_b": zero}}
  # The kernel's and the bias's gradients are ignored: the rule and a frozen bias.
  grads = {"params": {"kernel": one, "bias": bias + 1, "lora_a": zero, "lora_b": -one}}
  state, update, kernels = tx.init(variables), jax.jit(tx.update), []
  for t in range(5):
    updates, state = update(grads, state, variables)
    variables = optax.apply_updates(variables, updates)
    p = variables["params"]
    assert (float(p["lora_a"][0, 0]), float(p["lora_b"][0, 0]), float(p["bias"][0])) == (
      1.0,
      t + 1.0,
      0.0,
    )
    kernels.append(float(p["kernel"][0, 0]))
  want = {0: [0, 4, 8, 12, 16], 1: [0, 0, 4, 8, 12], 2: [0, 0, 0, 4, 8]}[start_step]
  assert kernels == want
  assert int(state.count) == 5


def test_other_optimizer_trains_the_other_layers():
  tx = dl.paper_delta_lora(
    lora_optimizer=optax.sgd(0.1), layers=LAYERS, other_optimizer=optax.sgd(0.1)
  )
  variables = VARIABLES
  grads = GRAD(variables)
  updates, _ = jax.jit(tx.update)(grads, tx.init(variables), variables)
  np.testing.assert_allclose(
    updates["params"]["plain"]["kernel"], -0.1 * grads["params"]["plain"]["kernel"], rtol=1e-6
  )
  # Before the start step (default 500) the adapted kernels do not move.
  assert not jnp.any(updates["params"]["hidden"]["kernel"])


T_STEPS, K_START = 20, 4


@pytest.fixture(scope="module")
def adamw_run():
  """Default AdamW on the factors, K = 4, 20 steps: the trajectory of variables.

  ``trajectory[t]`` holds the variables before step ``t``; W first moves at step
  ``t = K + 1``, so ``trajectory[K + 1]`` is the last with the initial W.
  """
  tx = dl.paper_delta_lora(1e-2, layers=LAYERS, lambda_=LAMBDA, start_step=K_START)
  variables = VARIABLES
  state = tx.init(variables)
  step = make_step(MODEL, tx)
  trajectory = [variables]
  for _ in range(T_STEPS):
    variables, state = step(variables, state)
    trajectory.append(variables)
  return trajectory, state, step


def test_telescoping_sum_and_rank_at_most_2r(adamw_run):
  trajectory, state, _ = adamw_run
  assert int(state.count) == T_STEPS
  first, start, last = trajectory[0], trajectory[K_START + 1], trajectory[-1]
  for name, s in SCALING.items():
    w0, wk, wt = (np.asarray(layer_arrays(v, name)[0], np.float64) for v in (first, start, last))
    np.testing.assert_array_equal(wk, w0)  # K + 1 plain LoRA steps first: t = 0, ..., K
    want = LAMBDA * s * (product(last, name) - product(start, name))
    np.testing.assert_allclose(wt - wk, want, rtol=0, atol=2e-6)
    singular = np.linalg.svd(wt - w0, compute_uv=False)
    assert singular[2 * R - 1] > 1e-3 * singular[0]  # the change is of rank 2r exactly ...
    assert singular[2 * R] < 1e-5 * singular[0]  # ... and not more, up to float32 rounding


def test_each_adamw_step_moves_the_kernel_by_the_product_change(adamw_run):
  trajectory, _, _ = adamw_run
  before, after = trajectory[K_START + 1], trajectory[K_START + 2]  # step t = K + 1
  for name, s in SCALING.items():
    change = np.asarray(layer_arrays(after, name)[0], np.float64) - layer_arrays(before, name)[0]
    want = LAMBDA * s * (product(after, name) - product(before, name))
    assert np.abs(want).max() > 1e-4
    np.testing.assert_allclose(change, want, rtol=0, atol=2e-7)


def test_second_call_does_not_recompile(adamw_run):
  trajectory, state, step = adamw_run
  size = step._cache_size()
  step(trajectory[-1], state)
  assert step._cache_size() == size == 1


def test_merge_counts_and_diagnostics_after_training(adamw_run):
  trajectory, _, _ = adamw_run
  variables = trajectory[-1]
  merged = dl.merge(variables, LAYERS)
  for name, s in SCALING.items():
    w, a, b = (np.asarray(v, np.float64) for v in layer_arrays(variables, name))
    np.testing.assert_allclose(merged["params"][name]["kernel"], w + s * a @ b, rtol=0, atol=1e-6)
    assert set(merged["params"][name]) == {"kernel", "bias"}

  class Plain(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.tanh(nn.Dense(HIDDEN, name="hidden")(x))
      return nn.Dense(OUT, name="out")(nn.Dense(HIDDEN, name="plain")(h))

  np.testing.assert_allclose(
    Plain().apply(merged, X), MODEL.apply(variables, X), rtol=1e-5, atol=1e-5
  )
  counts = dl.parameter_counts(variables, LAYERS)
  assert counts == {
    "hidden": R * (IN + HIDDEN),
    "out": R * (HIDDEN + OUT),
    "total": R * (IN + 2 * HIDDEN + OUT),
  }
  report = dl.diagnostics(variables, LAYERS)
  for name, s in SCALING.items():
    entry = report["layers"][name]
    assert entry["delta_norm"] == 0.0
    np.testing.assert_allclose(
      entry["lora_norm"], np.linalg.norm(s * product(variables, name)), rtol=1e-5
    )


def test_tracks_plain_lora_with_alpha_times_one_plus_lambda():
  """Under Adam with a small eps, the rule at K = 0 is plain LoRA at alpha (1 + lambda).

  W first moves at step t = K + 1 = 1, so W_T = W_1 + lambda s (A_T B_T - A_1 B_1). A
  warmup whose first learning rate is 0 keeps A_1 = A_0 and B_1 = B_0 = 0 (Adam's
  moments still see the first gradients, (1 + lambda) times larger in the scaled run);
  then the forward weight is W_0 + (1 + lambda) s A_t B_t throughout, and Adam ignores
  the constant factor (1 + lambda) in the factors' gradients. Measured after 25 AdamW
  steps (eps 1e-12): outputs agree to 3e-7 and factors to 6e-7 of their largest
  magnitude (tolerance 1e-5 for both); plain LoRA at the unscaled alpha differs by 55 %
  (asserted > 1 %).
  """
  adam = optax.adamw(optax.linear_schedule(0.0, 1e-2, transition_steps=1), eps=1e-12)
  scaled = MLP(alpha_factor=1.0 + LAMBDA)
  variables = init(seed=5, lora_b_scale=0.0)  # B = 0, as the paper starts
  runs = {
    "paper": (MODEL, dl.paper_delta_lora(lora_optimizer=adam, layers=LAYERS, start_step=0)),
    "scaled": (scaled, plain_lora(adam)),
    "unscaled": (MODEL, plain_lora(adam)),
  }
  final = {}
  for key, (model, tx) in runs.items():
    v, state, step = variables, tx.init(variables), make_step(model, tx)
    for _ in range(25):
      v, state = step(v, state)
    final[key] = (model.apply(v, X), v)
  y, scale = final["scaled"][0], float(jnp.abs(final["scaled"][0]).max())
  np.testing.assert_allclose(final["paper"][0], y, rtol=0, atol=1e-5 * scale)
  for name in ("hidden", "out"):
    for leaf in ("lora_a", "lora_b"):
      np.testing.assert_allclose(
        final["paper"][1]["params"][name][leaf],
        final["scaled"][1]["params"][name][leaf],
        rtol=0,
        atol=1e-5 * float(jnp.abs(final["scaled"][1]["params"][name][leaf]).max()),
      )
  assert float(jnp.abs(final["unscaled"][0] - y).max()) > 1e-2 * scale


# --------------------------------------------------------------------------
# Inside optax wrappers.
# --------------------------------------------------------------------------

SGD = 0.05


def sgd_rule(start_step=0):
  return dl.paper_delta_lora(lora_optimizer=optax.sgd(SGD), layers=LAYERS, start_step=start_step)


def at_step(state, t):
  """``state`` with the rule's step count set to ``t``, wherever a wrapper nests it.

  With ``start_step=0`` the kernel first moves at ``t = 1``: ``at_step(state, 1)`` is a
  state from which the next step moves it.
  """

  def put(node):
    if isinstance(node, paper.PaperDeltaLoRAState):
      return node._replace(count=jnp.asarray(t, jnp.int32))
    return node

  return jax.tree.map(put, state, is_leaf=lambda node: isinstance(node, paper.PaperDeltaLoRAState))


def test_inject_hyperparams_lambda_and_start_step_are_traceable():
  tx = optax.inject_hyperparams(dl.paper_delta_lora)(
    lora_optimizer=optax.sgd(SGD), layers=LAYERS, lambda_=LAMBDA, start_step=500
  )
  variables = VARIABLES
  state = tx.init(variables)
  step = make_step(MODEL, tx)
  new, state = step(variables, state)
  np.testing.assert_array_equal(
    new["params"]["out"]["kernel"], variables["params"]["out"]["kernel"]
  )
  state.hyperparams["start_step"] = jnp.zeros_like(state.hyperparams["start_step"])
  state.hyperparams["lambda_"] = jnp.asarray(0.5, state.hyperparams["lambda_"].dtype)
  newer, state = step(new, state)  # t = 1 > K = 0
  assert step._cache_size() == 1
  for name, s in SCALING.items():
    change = np.asarray(layer_arrays(newer, name)[0], np.float64) - layer_arrays(new, name)[0]
    np.testing.assert_allclose(
      change, 0.5 * s * (product(newer, name) - product(new, name)), rtol=0, atol=2e-7
    )


def test_learning_rate_can_be_injected_and_layers_stay_static():
  """The layers are no hyperparameter: each layer's own scaling is used."""
  tx = optax.inject_hyperparams(dl.paper_delta_lora)(
    learning_rate=1e-2, layers=LAYERS, start_step=0
  )
  state = at_step(tx.init(VARIABLES), 1)
  # lambda_ left out is None (2.0 for these in-place layers), which is not a number to inject
  assert set(state.hyperparams) == {"learning_rate", "start_step"}
  updates, _ = jit_update(tx, standard=True)(GRAD(VARIABLES), state, VARIABLES)
  new = optax.apply_updates(VARIABLES, updates)
  for name, s in SCALING.items():
    change = np.asarray(layer_arrays(new, name)[0], np.float64) - layer_arrays(VARIABLES, name)[0]
    want = LAMBDA * s * (product(new, name) - product(VARIABLES, name))
    np.testing.assert_allclose(change, want, rtol=0, atol=1e-6)


def test_inside_chain_with_gradient_clipping():
  max_norm = 1e-3
  variables = VARIABLES
  grads = GRAD(variables)
  chained = optax.chain(optax.clip_by_global_norm(max_norm), sgd_rule())
  got, _ = jax.jit(chained.update)(grads, at_step(chained.init(variables), 1), variables)
  clipped, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
  rule = sgd_rule()
  want, _ = jax.jit(rule.update)(clipped, at_step(rule.init(variables), 1), variables)
  assert float(optax.tree.norm(grads)) > 10 * max_norm  # the clipping does something
  assert jnp.any(got["params"]["hidden"]["kernel"] != 0)  # the rule does something
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-9), got, want)


def test_inside_multi_steps_the_kernel_moves_once_per_accumulated_step():
  variables = VARIABLES
  multi = optax.MultiSteps(sgd_rule(), every_k_schedule=2)
  state = at_step(multi.init(variables), 1)
  halves = (X[: ROWS // 2], Y[: ROWS // 2]), (X[ROWS // 2 :], Y[ROWS // 2 :])
  v = variables
  for i, (x, y) in enumerate(halves):
    grads = GRAD(v, x, y)
    updates, state = jit_update(multi, standard=True)(grads, state, v)
    v = optax.apply_updates(v, updates)
    if i == 0:
      jax.tree.map(np.testing.assert_array_equal, v, variables)  # nothing moves mid-way
  # Two accumulated half batches are one step on their mean gradient.
  mean = jax.tree.map(lambda g, h: (g + h) / 2, *(GRAD(variables, x, y) for x, y in halves))
  rule = sgd_rule()
  updates, _ = jax.jit(rule.update)(mean, at_step(rule.init(variables), 1), variables)
  want = optax.apply_updates(variables, updates)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=0, atol=1e-6), v, want)
  for name, s in SCALING.items():
    change = np.asarray(layer_arrays(v, name)[0], np.float64) - layer_arrays(variables, name)[0]
    want_change = LAMBDA * s * (product(v, name) - product(variables, name))
    np.testing.assert_allclose(change, want_change, rtol=0, atol=2e-7)


def test_apply_if_finite_skips_a_non_finite_step():
  """A skipped step is no step t: W still waits for the second good step (t = 1 > K = 0)."""
  variables = VARIABLES
  tx = optax.apply_if_finite(sgd_rule(), max_consecutive_errors=3)
  state = tx.init(variables)
  grads = GRAD(variables)
  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads)
  updates, state = jax.jit(tx.update)(bad, state, variables)
  skipped = optax.apply_updates(variables, updates)
  jax.tree.map(np.testing.assert_array_equal, skipped, variables)
  assert int(state.notfinite_count) == 1
  assert int(state.inner_state.count) == 0
  updates, state = jax.jit(tx.update)(grads, state, skipped)
  first = optax.apply_updates(skipped, updates)  # t = 0
  np.testing.assert_array_equal(
    first["params"]["hidden"]["kernel"], variables["params"]["hidden"]["kernel"]
  )
  updates, state = jax.jit(tx.update)(GRAD(first), state, first)
  moved = optax.apply_updates(first, updates)  # t = 1
  assert not np.array_equal(
    moved["params"]["hidden"]["kernel"], first["params"]["hidden"]["kernel"]
  )
  assert int(state.inner_state.count) == 2


def test_kernel_update_keeps_a_bfloat16_kernel_dtype():
  model = MLP(param_dtype=jnp.bfloat16)
  # The adapted layers compute in float32 (their factors are float32) and the
  # plain bfloat16 layer after them mixes the two: standard promotion.
  with jax.numpy_dtype_promotion("standard"):
    variables = init(model)
    grads = jax.jit(jax.grad(loss_fn(model)))(variables)
  rule = sgd_rule()
  updates, _ = jax.jit(rule.update)(grads, at_step(rule.init(variables), 1), variables)
  assert updates["params"]["hidden"]["kernel"].dtype == jnp.bfloat16
  assert jnp.any(updates["params"]["hidden"]["kernel"] != 0)


# --------------------------------------------------------------------------
# No gradient of the base kernel in the compiled step.
# --------------------------------------------------------------------------


def _sub_jaxprs(params):
  for value in params.values():
    for item in value if isinstance(value, list | tuple) else (value,):
      if hasattr(item, "eqns"):
        yield item
      elif hasattr(getattr(item, "jaxpr", None), "eqns"):
        yield item.jaxpr


def _dot_output_shapes(jaxpr) -> list[tuple[int, ...]]:
  """Output shapes of every dot_general in a jaxpr, nested jaxprs included."""
  shapes = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      shapes.append(tuple(eqn.outvars[0].aval.shape))
    for sub in _sub_jaxprs(eqn.params):
      shapes.extend(_dot_output_shapes(sub))
  return shapes


@pytest.mark.parametrize("freeze_base", [True, False])
def test_gradient_has_no_dot_of_kernel_shape(freeze_base):
  model = MLP(freeze_base=freeze_base)
  variables = init(model)
  jaxpr = jax.make_jaxpr(jax.grad(loss_fn(model)))(variables).jaxpr
  kernel_shapes = {(IN, HIDDEN), (HIDDEN, OUT)}
  found = kernel_shapes & set(_dot_output_shapes(jaxpr))
  # The positive control (a trainable base) shows that the check can fail.
  assert found == (set() if freeze_base else kernel_shapes)


FLOPS_ROWS = 32


def _step_flops(model, tx) -> float:
  """XLA's flop count of one compiled training step on a batch of FLOPS_ROWS rows."""
  loss = loss_fn(model)

  def step(variables, opt_state, x, y):
    grads = jax.grad(loss)(variables, x, y)
    updates, opt_state = tx.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state

  variables = jax.eval_shape(model.init, jax.random.key(0), X)
  opt_state = jax.eval_shape(tx.init, variables)
  x = jax.ShapeDtypeStruct((FLOPS_ROWS, IN), jnp.float32)
  y = jax.ShapeDtypeStruct((FLOPS_ROWS, OUT), jnp.float32)
  with jax.numpy_dtype_promotion("standard"):
    compiled = jax.jit(step).lower(variables, opt_state, x, y).compile()
  return float(compiled.cost_analysis()["flops"])


def test_compiled_step_flops_close_to_plain_lora():
  """XLA flops of a step: paper rule / plain LoRA measured 1.04, full fine-tuning 1.26.

  The rule adds a fixed ``~4 r in out`` per layer (the product change), independent of
  the batch; a base-kernel gradient would add ``~2 rows in out`` per layer. The
  structural fact (no kernel-shaped dot in the gradient) is asserted above.
  """
  adam = optax.adamw(1e-2)
  plain = _step_flops(MODEL, plain_lora(adam))
  rule = _step_flops(MODEL, dl.paper_delta_lora(lora_optimizer=adam, layers=LAYERS))
  full = _step_flops(MLP(freeze_base=False), optax.adamw(1e-2))
  assert rule <= 1.15 * plain
  assert full > 1.15 * plain  # the bound would catch a base-kernel gradient


# --------------------------------------------------------------------------
# No full-size work before the start step.
# --------------------------------------------------------------------------

KERNEL_SHAPES = {(IN, HIDDEN), (HIDDEN, OUT)}


def _kernel_dots_by_place(jaxpr):
  """Kernel-shaped dot_generals: ``(count outside any cond, [[count per branch] per cond])``."""
  outside, conds = 0, []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general" and tuple(eqn.outvars[0].aval.shape) in KERNEL_SHAPES:
      outside += 1
    if eqn.primitive.name == "cond":
      conds.append(
        [
          len(KERNEL_SHAPES.intersection(_dot_output_shapes(b.jaxpr)))
          for b in eqn.params["branches"]
        ]
      )
      continue
    for sub in _sub_jaxprs(eqn.params):
      sub_outside, sub_conds = _kernel_dots_by_place(sub)
      outside, conds = outside + sub_outside, conds + sub_conds
  return outside, conds


_HLO_COMPUTATION = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\{$")
_HLO_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_HLO_BRANCHES = re.compile(
  r"(?:branch_computations=\{([^}]*)\}|(?:true|false)_computation=%?([\w.\-]+))"
)


def _hlo_kernel_dots(text):
  """Kernel-shaped dots of compiled HLO: ``(outside any conditional's branch, inside one)``.

  A computation is outside when ENTRY reaches it by calls, fusions, loops and
  reductions without entering a ``conditional``'s branch; inside when a branch does.
  """
  bodies, entry, name = {}, None, None
  for line in text.splitlines():
    if match := _HLO_COMPUTATION.match(line):
      name = match.group(2)
      bodies[name] = []
      entry = name if match.group(1) else entry
    elif line.startswith("}"):
      name = None
    elif name is not None:
      bodies[name].append(line)
  shapes = [f"f32[{a},{b}]" for a, b in KERNEL_SHAPES]

  def dots(computation):
    return sum(
      1 for line in bodies[computation] if " dot(" in line and any(f"= {s}" in line for s in shapes)
    )

  def reached(roots):
    found, stack = set(), list(roots)
    while stack:
      computation = stack.pop()
      if computation not in found:
        found.add(computation)
        stack.extend(c for line in bodies[computation] for c in _HLO_CALLS.findall(line))
    return found

  branches = set()
  for listed, single in _HLO_BRANCHES.findall(text):
    branches.update(n.strip().lstrip("%") for n in listed.split(",") if n.strip())
    branches.update({single} - {""})
  outside = reached([entry])
  assert branches and not branches & outside  # the compiled program kept its conditional
  return sum(map(dots, outside)), sum(map(dots, reached(branches) - outside))


def test_no_full_size_product_before_the_start_step():
  """The product ``lambda s (A'B' - AB)`` lives only in the taken branch of a ``lax.cond``.

  XLA's ``cost_analysis`` counts a conditional's branches whether taken or not (the
  flops of the update are the same for ``start_step=0`` and ``10**9``), so the check
  is structural, in the jaxpr and in the compiled HLO: no kernel-shaped dot outside a
  conditional's branch, and the kernel-shaped dots (one per layer) in exactly one
  branch of one conditional. An update computed every step and masked with
  ``jnp.where`` fails both.
  """
  variables, tx = VARIABLES, sgd_rule(start_step=10**9)
  state, grads = tx.init(variables), GRAD(VARIABLES)
  jaxpr = jax.make_jaxpr(tx.update)(grads, state, variables).jaxpr
  assert _kernel_dots_by_place(jaxpr) == (0, [[0, 2]])
  text = jax.jit(tx.update).lower(grads, state, variables).compile().as_text()
  assert _hlo_kernel_dots(text) == (0, 2)
  # Before the start step the kernels' updates are zeros; from it on, the product.
  updates, _ = jax.jit(tx.update)(grads, at_step(state, 10**9), variables)
  assert not any(jnp.any(updates["params"][name]["kernel"]) for name in ("hidden", "out"))
  updates, _ = jax.jit(tx.update)(grads, at_step(state, 10**9 + 1), variables)
  assert all(jnp.any(updates["params"][name]["kernel"]) for name in ("hidden", "out"))


# --------------------------------------------------------------------------
# NNX state.
# --------------------------------------------------------------------------


def test_works_on_nnx_layers_with_nnx_optimizer():
  """DeltaLoRALinear(use_delta=False) trained by nnx.Optimizer over all nnx.Param."""
  from flax import nnx

  from deltalora_jax.nnx import DeltaLoRALinear

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.hidden = DeltaLoRALinear(
        IN, HIDDEN, rank=R, alpha=ALPHA_HIDDEN, use_delta=False, rngs=rngs
      )
      self.head = nnx.Linear(HIDDEN, OUT, rngs=rngs)

    def __call__(self, x):
      return self.head(nnx.tanh(self.hidden(x)))

  model = Model(nnx.Rngs(0))
  assert nnx.state(model, dl.DeltaParam) == nnx.State({})  # no D in this mode
  layer = model.hidden
  layer.lora_b[...] = jnp.asarray(
    np.random.default_rng(6).standard_normal((R, HIDDEN)), jnp.float32
  )
  tx = dl.paper_delta_lora(lora_optimizer=optax.sgd(SGD), layers=model, start_step=0)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)  # LoRAParam is an nnx.Param
  head = np.asarray(model.head.kernel[...])

  def arrays():
    return tuple(np.asarray(v[...], np.float64) for v in (layer.kernel, layer.lora_a, layer.lora_b))

  @nnx.jit
  def train_step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.mean((m(X) - Y) ** 2))(model)
    optimizer.update(model, grads)
    return grads.hidden.kernel[...]

  w0, a0, b0 = arrays()
  assert not jnp.any(train_step(model, optimizer))  # the frozen base gets a zero gradient
  w, a, b = arrays()
  assert not np.allclose(a @ b, a0 @ b0)
  np.testing.assert_array_equal(w, w0)  # t = 0: K = 0 plain LoRA step first
  train_step(model, optimizer)  # t = 1 > K
  w1, a1, b1 = arrays()
  assert not np.allclose(a1 @ b1, a @ b)
  np.testing.assert_allclose(w1 - w, LAMBDA * layer.scaling * (a1 @ b1 - a @ b), rtol=0, atol=2e-6)
  np.testing.assert_array_equal(model.head.kernel[...], head)  # frozen: no other_optimizer


# --------------------------------------------------------------------------
# Errors, raised where the value enters.
# --------------------------------------------------------------------------


def test_missing_params_is_a_clear_error():
  rule = sgd_rule()
  variables = VARIABLES
  with pytest.raises(ValueError, match="needs the current parameters"):
    rule.update(variables, rule.init(variables))


def test_layers_with_delta_are_refused_at_construction():
  layer = dl.DeltaLoRADense(4, rank=2)  # use_delta=True
  with pytest.raises(ValueError, match=r"use_delta=False; layers has use_delta=True at \[''\]"):
    dl.paper_delta_lora(1e-3, layers=dl.adapted_layers(layer, X))


def test_tree_with_delta_is_refused():
  """Layers given without D, a tree with D: init refuses the tree."""
  variables = dl.DeltaLoRADense(4, rank=2).init(jax.random.key(0), X)
  layers = dl.adapted_layers(dl.DeltaLoRADense(4, rank=2, use_delta=False), X)
  with pytest.raises(ValueError, match=r"use_delta=False; the tree has a 'delta' leaf"):
    dl.paper_delta_lora(1e-3, layers=layers).init(variables)


def test_tree_without_adapted_layer_is_refused():
  with pytest.raises(ValueError, match="no adapted layer"):
    dl.paper_delta_lora(1e-3, layers=LAYERS).init({"params": {"kernel": jnp.ones((2, 2))}})


@pytest.mark.parametrize(
  ("layers", "names"),
  [
    ({("hidden",): LAYERS["hidden"]}, "['hidden']"),  # a path tuple is taken too
    ({**LAYERS, "head": LAYERS["out"]}, "['head', 'hidden', 'out']"),
  ],
)
def test_tree_whose_adapted_layers_differ_from_layers_names_both_lists(layers, names):
  tx = dl.paper_delta_lora(1e-3, layers=layers)
  want = f"the tree has ['params/hidden', 'params/out'], layers has {names}"
  with pytest.raises(ValueError, match=re.escape(want)):
    tx.init(VARIABLES)


def test_layers_as_mapping_path_strings_or_deltalora_model_give_the_same_step():
  class Plain(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(OUT, name="out")(nn.tanh(nn.Dense(HIDDEN, name="hidden")(x)))

  plain = Plain()
  adapted, variables, *_ = dl.adapt_linen(
    plain, plain.init(jax.random.key(0), X), X, rank=R, use_delta=False, key=jax.random.key(1)
  )
  mapping = dl.adapted_layers(adapted, X)
  assert sorted(mapping) == ["hidden", "out"]
  grads = jax.grad(lambda v: jnp.mean((adapted.apply(v, X) - Y) ** 2))(variables)
  results = []
  for layers in (mapping, {("hidden",): mapping["hidden"], ("out",): mapping["out"]}, adapted):
    rule = dl.paper_delta_lora(lora_optimizer=optax.sgd(SGD), layers=layers, start_step=0)
    results.append(jax.jit(rule.update)(grads, at_step(rule.init(variables), 1), variables)[0])
  assert jnp.any(results[0]["params"]["hidden"]["kernel"])
  for other in results[1:]:
    jax.tree.map(np.testing.assert_array_equal, other, results[0])


@pytest.mark.parametrize(
  ("kwargs", "error", "match"),
  [
    ({"lambda_": float("nan")}, ValueError, "lambda_ must be finite and >= 0, got lambda_=nan"),
    ({"lambda_": -1.0}, ValueError, "lambda_ must be finite"),
    ({"start_step": -1}, ValueError, "start_step must be >= 0, got start_step=-1"),
    ({"start_step": 2.5}, TypeError, "start_step must be a scalar int"),
    ({"start_step": True}, TypeError, "start_step must be a scalar int"),
    ({"layers": 1.0}, TypeError, "layers must be an NNX model, a Linen layers mapping"),
    ({"layers": {}}, ValueError, "layers has no adapted layer"),
    ({"layers": {("out",): 1.0}}, TypeError, r"layers\[\('out',\)\] must be an adapted layer"),
    ({"learning_rate": None}, ValueError, "exactly one of learning_rate"),
    ({"lora_optimizer": optax.sgd(0.1)}, ValueError, "exactly one of learning_rate"),
    ({"learning_rate": None, "lora_optimizer": "sgd"}, TypeError, "lora_optimizer must be"),
    ({"other_optimizer": 0.1}, TypeError, "other_optimizer must be"),
  ],
)
def test_bad_arguments_raise_at_construction(kwargs, error, match):
  arguments = {"learning_rate": 1e-3, "layers": LAYERS, **kwargs}
  with pytest.raises(error, match=match):
    dl.paper_delta_lora(**arguments)


# --------------------------------------------------------------------------
# The guide's example.
# --------------------------------------------------------------------------


def test_guide_which_rule_example_runs_and_keeps_the_base():
  (code,) = _docs.code_blocks("which_rule.md")
  namespace = {}
  with jax.numpy_dtype_promotion("standard"):  # optax's Adam, as a user runs it
    exec(compile(code, "which_rule.md", "exec"), namespace)
  model, x, y = namespace["model"], namespace["x"], namespace["y"]
  start = model.init(jax.random.key(1), x)
  first = float(jnp.mean((model.apply(start, x) - y) ** 2))
  assert float(namespace["loss"]) < 0.5 * first
  variables = namespace["variables"]
  for name, layer in namespace["layers"].items():
    p, snap = variables["params"][name], variables["snapshot"][name]
    np.testing.assert_array_equal(p["kernel"], start["params"][name]["kernel"])  # only read
    ab = np.asarray(p["lora_a"], np.float64) @ p["lora_b"]
    frozen = np.asarray(snap["snapshot_a"], np.float64) @ snap["snapshot_b"]
    assert np.abs(ab - frozen).max() > 1e-3  # past K = 20, the snapshot stays
    np.testing.assert_allclose(
      namespace["merged"]["params"][name]["kernel"],
      p["kernel"] + layer.scaling * ((1 + LAMBDA) * ab - LAMBDA * frozen),
      rtol=0,
      atol=1e-5,
    )
