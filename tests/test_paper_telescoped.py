"""The published rule in its telescoped form: the base kernel is never written.

A layer built with ``paper_lambda`` holds a snapshot ``(A^, B^)`` of its factors
and computes ``W_0 + s A B + lambda s (sg(A) sg(B) - A^ B^)``;
:func:`paper_delta_lora` writes the snapshot while ``t <= K`` and never the kernel.
Algorithm 1 telescopes, so this is the same model as the in-place form
(``W_T = W_0 + lambda s (A_T B_T - A_{K+1} B_{K+1})``): proved here in float64 for
SGD and AdamW, ``K = 0`` and ``K > 0``, a dense and an einsum layer, Linen and NNX;
with the factors' gradients those of ``s A B``; with a bfloat16 base that stays
bit-identical and loses nothing of ``W``'s change; and through merge, export,
attach, PEFT files, diagnostics, sharding and the errors.
"""

import math
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util

import deltalora_jax as dl
from deltalora_jax import core
from deltalora_jax.projections import Einsum

IN, HIDDEN, HEADS, HEAD_DIM, R, ROWS, TIME = 5, 6, 2, 3, 2, 4, 3
LAMBDA = 2.0
STEPS = 50
EINSUM = Einsum("btd,ndh->btnh", (HEADS, HIDDEN, HEAD_DIM))  # kernel [n, d, h]: interleaved
_rng = np.random.default_rng(0)
X = _rng.standard_normal((ROWS, TIME, IN))
Y = _rng.standard_normal((ROWS, TIME, HEADS, HEAD_DIM))


class Net(nn.Module):
  """A dense layer (alpha 4: s = 2) then an einsum layer (s = 1), both adapted."""

  paper_lambda: float | None = LAMBDA
  param_dtype: jnp.dtype = jnp.float64

  @nn.compact
  def __call__(self, x):
    options = {
      "rank": R,
      "use_delta": False,
      "paper_lambda": self.paper_lambda,
      "param_dtype": self.param_dtype,
    }
    h = nn.tanh(dl.DeltaLoRADense(HIDDEN, alpha=4.0, name="dense", **options)(x))
    return dl.DeltaLoRAGeneral(EINSUM, name="einsum", **options)(h)


def draw(shapes, seed=0):
  """Random variables of the shapes given (B too), drawn with NumPy; the snapshot = factors."""
  rng = np.random.default_rng(seed)

  def one(path, leaf):
    name = path[-1].key
    scale = {"kernel": 0.4, "bias": 0.1, "lora_a": R**-0.5}.get(name, 0.3)
    return jnp.asarray(scale * rng.standard_normal(leaf.shape), leaf.dtype)

  variables = jax.tree_util.tree_map_with_path(one, {"params": shapes["params"]})
  if "snapshot" in shapes:
    params = traverse_util.flatten_dict(variables["params"])
    variables["snapshot"] = traverse_util.unflatten_dict(
      {
        (*k[:-1], k[-1]): params[(*k[:-1], k[-1].replace("snapshot", "lora"))]
        for k in traverse_util.flatten_dict(shapes["snapshot"])
      }
    )
  return variables


def linen_pair(dtype=jnp.float64):
  """``(telescoped model, in-place model, telescoped variables, in-place variables)``."""
  telescoped, in_place = Net(param_dtype=dtype), Net(paper_lambda=None, param_dtype=dtype)
  x = jnp.asarray(X, dtype)
  variables = draw(jax.eval_shape(telescoped.init, jax.random.key(0), x))
  return telescoped, in_place, variables, {"params": variables["params"]}


def trainer(model, lora_optimizer, start_step, x, y):
  """``(tx, jitted step)`` of ``paper_delta_lora`` on a Linen model."""
  layers = dl.adapted_layers(model, x)
  tx = dl.paper_delta_lora(lora_optimizer=lora_optimizer, layers=layers, start_step=start_step)

  def loss(variables):
    return jnp.mean((model.apply(variables, x) - y) ** 2)

  @jax.jit
  def step(variables, opt_state):
    grads = jax.grad(loss)(variables)
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam, as a user runs it
      updates, opt_state = tx.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state

  return tx, step


def low(a, b, kind):
  """``A B`` in the kernel's layout, float64 NumPy."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.asarray(kind.lora_kernel(jnp.asarray(a), jnp.asarray(b))) if kind else a @ b


KINDS = {"dense": None, "einsum": EINSUM}
SCALING = {"dense": 2.0, "einsum": 1.0}


# --------------------------------------------------------------------------
# The trajectory is Algorithm 1's.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("start_step", [0, 4])
@pytest.mark.parametrize(
  "optimizer", [optax.sgd(0.1), optax.adamw(0.02, weight_decay=0.1)], ids=["sgd", "adamw"]
)
def test_linen_trajectory_equals_algorithm_1_float64(optimizer, start_step):
  """50 steps: outputs, factors and the kernel Algorithm 1 writes agree to 1e-12 (float64)."""
  with jax.enable_x64(True):
    x, y = jnp.asarray(X), jnp.asarray(Y)
    telescoped, in_place, tv, iv = linen_pair()
    kernels0 = {n: tv["params"][n]["kernel"] for n in KINDS}
    _, t_step = trainer(telescoped, optimizer, start_step, x, y)
    tx_t, i_step = trainer(in_place, optimizer, start_step, x, y)
    t_state = trainer(telescoped, optimizer, start_step, x, y)[0].init(tv)
    i_state = tx_t.init(iv)
    moved, frozen = 0.0, {}
    for t in range(STEPS):
      tv, t_state = t_step(tv, t_state)
      iv, i_state = i_step(iv, i_state)
      np.testing.assert_allclose(telescoped.apply(tv, x), in_place.apply(iv, x), rtol=0, atol=1e-12)
      for name in KINDS:
        p, snap = tv["params"][name], tv["snapshot"][name]
        np.testing.assert_array_equal(p["kernel"], kernels0[name])  # never written
        if t <= start_step:  # the snapshot follows the factors exactly: A^ = A_{t+1}
          np.testing.assert_array_equal(snap["snapshot_a"], p["lora_a"])
          np.testing.assert_array_equal(snap["snapshot_b"], p["lora_b"])
        if t == start_step:
          frozen[name] = {k: np.asarray(v) for k, v in snap.items()}
      moved = max(moved, float(np.abs(iv["params"]["dense"]["kernel"] - kernels0["dense"]).max()))
    assert moved > 1e-2  # Algorithm 1 did move W: the comparison is not trivial
    merged = dl.merge(tv, dl.adapted_layers(telescoped, x))
    for name, kind in KINDS.items():
      p, ip = tv["params"][name], iv["params"][name]
      for factor in ("lora_a", "lora_b"):
        np.testing.assert_allclose(p[factor], ip[factor], rtol=0, atol=1e-12)
      for key, value in frozen[name].items():  # A_{K+1}, B_{K+1}, frozen since
        np.testing.assert_array_equal(tv["snapshot"][name][key], value)
      # Algorithm 1's kernel, W_T = W_0 + lambda s (A_T B_T - A_{K+1} B_{K+1}), and the merge
      s = SCALING[name]
      want = np.asarray(kernels0[name]) + LAMBDA * s * (
        low(p["lora_a"], p["lora_b"], kind)
        - low(frozen[name]["snapshot_a"], frozen[name]["snapshot_b"], kind)
      )
      np.testing.assert_allclose(ip["kernel"], want, rtol=0, atol=1e-12)
      np.testing.assert_allclose(
        merged["params"][name]["kernel"],
        want + s * low(p["lora_a"], p["lora_b"], kind),
        rtol=0,
        atol=1e-12,
      )


def test_factor_gradients_are_those_of_s_a_b_not_one_plus_lambda_times():
  """At a state where A^ != A: the gradients of A, B and x are Algorithm 1's at the same W."""
  with jax.enable_x64(True):
    x, y = jnp.asarray(X), jnp.asarray(Y)
    telescoped, in_place, tv, _ = linen_pair()
    tv["snapshot"] = draw(jax.eval_shape(telescoped.init, jax.random.key(0), x), seed=1)[
      "snapshot"
    ]  # another snapshot: the lambda term is not zero
    # The in-place model at the same weights: W = W_0 + lambda s (A B - A^ B^).
    merged = dl.merge(tv, dl.adapted_layers(telescoped, x))["params"]
    iv = {"params": jax.tree.map(lambda v: v, tv["params"])}
    for name, kind in KINDS.items():
      p = tv["params"][name]
      iv["params"][name]["kernel"] = merged[name]["kernel"] - SCALING[name] * jnp.asarray(
        low(p["lora_a"], p["lora_b"], kind)
      )

    def grads(model, variables):
      return jax.grad(lambda v, x: jnp.mean((model.apply(v, x) - y) ** 2), argnums=(0, 1))(
        variables, x
      )

    (tg, tx_grad), (ig, ix_grad) = grads(telescoped, tv), grads(in_place, iv)
    np.testing.assert_allclose(tx_grad, ix_grad, rtol=0, atol=1e-12)  # the whole layer's
    for name in KINDS:
      for factor in ("lora_a", "lora_b"):
        got, want = tg["params"][name][factor], ig["params"][name][factor]
        assert np.abs(want).max() > 1e-3
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
      for key in ("snapshot_a", "snapshot_b"):
        np.testing.assert_array_equal(tg["snapshot"][name][key], 0.0)


def test_one_sgd_step_moves_the_factors_by_the_gradient_of_s_a_b():
  """SGD shows a (1 + lambda) error at once: A_1 = A_0 - lr * s x^T g B^T exactly."""
  with jax.enable_x64(True):
    layer = dl.DeltaLoRADense(3, rank=R, use_delta=False, paper_lambda=LAMBDA, alpha=4.0,
                              param_dtype=jnp.float64)
    x = jnp.asarray(_rng.standard_normal((ROWS, IN)))
    v = draw(jax.eval_shape(layer.init, jax.random.key(0), x))
    lr, s = 0.1, 2.0
    tx = dl.paper_delta_lora(lora_optimizer=optax.sgd(lr), layers={(): layer}, start_step=0)
    loss = lambda v: 0.5 * jnp.sum(layer.apply(v, x) ** 2)  # noqa: E731  (g = y)
    grads = jax.grad(loss)(v)
    new = optax.apply_updates(v, tx.update(grads, tx.init(v), v)[0])
    p = {k: np.asarray(a) for k, a in v["params"].items()}
    g = np.asarray(layer.apply(v, x))  # dLoss/dy
    xs = np.asarray(x)
    np.testing.assert_allclose(
      new["params"]["lora_a"], p["lora_a"] - lr * s * xs.T @ g @ p["lora_b"].T, rtol=0, atol=1e-12
    )
    np.testing.assert_allclose(
      new["params"]["lora_b"], p["lora_b"] - lr * s * (xs @ p["lora_a"]).T @ g, rtol=0, atol=1e-12
    )
    np.testing.assert_array_equal(new["snapshot"]["snapshot_a"], new["params"]["lora_a"])


def nnx_model(paper_lambda, dtype=jnp.float64):
  """A dense and an einsum layer, adapted; B drawn (the same for every call), A^ = A, B^ = B."""

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(IN, HIDDEN, param_dtype=dtype, rngs=rngs)
      shape = (HEADS, HIDDEN, HEAD_DIM)
      self.einsum = nnx.Einsum(
        EINSUM.equation, shape, (HEADS, HEAD_DIM), param_dtype=dtype, rngs=rngs
      )

    def __call__(self, x):
      return self.einsum(jnp.tanh(self.dense(x)))

  model, _ = dl.adapt_nnx(
    MLP(nnx.Rngs(0)), rank=R, use_delta=False, paper_lambda=paper_lambda, rngs=nnx.Rngs(1)
  )
  rng = np.random.default_rng(2)
  for layer in (model.dense, model.einsum):
    b = jnp.asarray(0.3 * rng.standard_normal(layer.lora_b.shape), layer.lora_b.dtype)
    layer.lora_b[...] = b
    if paper_lambda is not None:
      layer.snapshot_b[...] = b
  return model


@pytest.mark.parametrize(
  ("optimizer", "start_step"), [(optax.sgd(0.1), 3), (optax.adamw(0.02), 0)], ids=["sgd", "adamw"]
)
def test_nnx_trajectory_equals_algorithm_1_with_an_optimizer_on_lora_params_only(
  optimizer, start_step
):
  """NNX: nnx.Optimizer(wrt=nnx.LoRAParam), as tunix's PeftTrainer builds it: no kernel in sight."""
  with jax.enable_x64(True):
    x, y = jnp.asarray(X), jnp.asarray(Y)
    telescoped, in_place = nnx_model(LAMBDA), nnx_model(None)
    kernel0 = telescoped.dense.kernel[...]
    opt_t = nnx.Optimizer(
      telescoped,
      dl.paper_delta_lora(lora_optimizer=optimizer, layers=telescoped, start_step=start_step),
      wrt=nnx.LoRAParam,
    )
    opt_i = nnx.Optimizer(
      in_place,
      dl.paper_delta_lora(lora_optimizer=optimizer, layers=in_place, start_step=start_step),
      wrt=nnx.Param,
    )

    @nnx.jit(static_argnums=2)
    def step(model, opt, wrt):
      loss = lambda m: jnp.mean((m(x) - y) ** 2)  # noqa: E731
      grads = nnx.grad(loss, argnums=nnx.DiffState(0, wrt))(model)
      with jax.numpy_dtype_promotion("standard"):
        opt.update(model, grads)

    for _ in range(20):
      step(telescoped, opt_t, nnx.LoRAParam)
      step(in_place, opt_i, nnx.Param)
    np.testing.assert_allclose(telescoped(x), in_place(x), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(telescoped.dense.kernel[...], kernel0)
    assert float(jnp.abs(in_place.dense.kernel[...] - kernel0).max()) > 1e-3
    merged = dl.merge(telescoped)
    np.testing.assert_allclose(merged(x), telescoped(x), rtol=0, atol=1e-12)
