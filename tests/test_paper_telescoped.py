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
    layer = dl.DeltaLoRADense(
      3, rank=R, use_delta=False, paper_lambda=LAMBDA, alpha=4.0, param_dtype=jnp.float64
    )
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


class NnxMLP(nnx.Module):
  """The base NNX model: a dense and an einsum layer."""

  def __init__(self, dtype=jnp.float64):
    rngs = nnx.Rngs(0)
    self.dense = nnx.Linear(IN, HIDDEN, param_dtype=dtype, rngs=rngs)
    shape = (HEADS, HIDDEN, HEAD_DIM)
    self.einsum = nnx.Einsum(
      EINSUM.equation, shape, (HEADS, HEAD_DIM), param_dtype=dtype, rngs=rngs
    )

  def __call__(self, x):
    return self.einsum(jnp.tanh(self.dense(x)))


def nnx_model(paper_lambda, dtype=jnp.float64):
  """NnxMLP adapted; B drawn (the same for every call), A^ = A, B^ = B."""
  model, _ = dl.adapt_nnx(
    NnxMLP(dtype), rank=R, use_delta=False, paper_lambda=paper_lambda, rngs=nnx.Rngs(1)
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


# --------------------------------------------------------------------------
# A bfloat16 base: read, never written, and nothing of W's change lost.
# --------------------------------------------------------------------------


def kernel_changes(variables, model, x):
  """``{layer: lambda s (A B - A^ B^)}``, the change of W a telescoped model holds, float64."""
  changes = {}
  for name, kind in KINDS.items():
    p, snap = variables["params"][name], variables["snapshot"][name]
    changes[name] = (
      LAMBDA
      * SCALING[name]
      * (low(p["lora_a"], p["lora_b"], kind) - low(snap["snapshot_a"], snap["snapshot_b"], kind))
    )
  return changes


def test_bfloat16_base_is_bit_identical_and_loses_nothing_of_the_change():
  """12 AdamW steps on a bfloat16 base against Algorithm 1 in float64 from the same start.

  The in-place form rounds each step's change of W to bfloat16 (measured: 0.4% and 1.1%
  relative error of the change on these two layers); the telescoped form keeps the change
  in its float32 factors (5e-6, the float32 trajectory's own distance from float64).
  """
  steps, optimizer = 12, optax.adamw(0.02)
  x, y = jnp.asarray(X, jnp.float32), jnp.asarray(Y, jnp.float32)
  telescoped, in_place, tv, iv = linen_pair(jnp.bfloat16)
  start = tv
  for name in KINDS:
    assert tv["params"][name]["kernel"].dtype == jnp.bfloat16
    for key in ("lora_a", "lora_b"):
      assert tv["params"][name][key].dtype == jnp.float32
      assert tv["snapshot"][name][key.replace("lora", "snapshot")].dtype == jnp.float32
  tx_t, t_step = trainer(telescoped, optimizer, 0, x, y)
  tx_i, i_step = trainer(in_place, optimizer, 0, x, y)
  t_state, i_state = tx_t.init(tv), tx_i.init(iv)
  for _ in range(steps):
    tv, t_state = t_step(tv, t_state)
    iv, i_state = i_step(iv, i_state)
  with jax.enable_x64(True):  # the oracle: Algorithm 1 in float64 from the same numbers
    ov = {"params": jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), start["params"])}
    model = Net(paper_lambda=None)
    tx_o, o_step = trainer(model, optimizer, 0, jnp.asarray(X), jnp.asarray(Y))
    o_state = tx_o.init(ov)
    for _ in range(steps):
      ov, o_state = o_step(ov, o_state)
    t_changes = kernel_changes(tv, telescoped, x)
    errors = {}
    for name in KINDS:
      np.testing.assert_array_equal(tv["params"][name]["kernel"], start["params"][name]["kernel"])
      assert tv["params"][name]["kernel"].dtype == jnp.bfloat16
      want = np.asarray(ov["params"][name]["kernel"]) - np.asarray(
        start["params"][name]["kernel"], np.float64
      )
      got_in_place = np.asarray(iv["params"][name]["kernel"], np.float64) - np.asarray(
        start["params"][name]["kernel"], np.float64
      )
      norm = np.linalg.norm(want)
      assert norm > 1e-2
      errors[name] = (
        np.linalg.norm(t_changes[name] - want) / norm,
        np.linalg.norm(got_in_place - want) / norm,
      )
  for name, (telescoped_error, in_place_error) in errors.items():
    assert telescoped_error < 1e-4, (name, errors)
    assert in_place_error > max(1e-3, 100 * telescoped_error), (name, errors)  # what it fixes


# --------------------------------------------------------------------------
# The whole model travels: merge, export and attach, PEFT files, checkpoints.
# --------------------------------------------------------------------------


def trained_linen(steps=6):
  """A telescoped Linen model adapted by adapt_linen and trained past K (float32)."""

  class Plain(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.tanh(nn.Dense(HIDDEN, name="dense")(x))
      return nn.Einsum((HEADS, HIDDEN, HEAD_DIM), EINSUM.equation, name="einsum")(h)

  x, y = jnp.asarray(X, jnp.float32), jnp.asarray(Y, jnp.float32)
  pretrained = Plain().init(jax.random.key(0), x)
  model, variables, _ = dl.adapt_linen(
    Plain(), pretrained, x, rank=R, use_delta=False, paper_lambda=LAMBDA, key=jax.random.key(1)
  )
  tx, step = trainer(model, optax.adamw(0.05), 1, x, y)
  state = tx.init(variables)
  for _ in range(steps):
    variables, state = step(variables, state)
  return Plain(), pretrained, model, variables, x


def test_linen_merge_export_attach_and_checkpoint_give_the_trained_model():
  plain, pretrained, model, variables, x = trained_linen()
  out = model.apply(variables, x)
  assert float(jnp.abs(out - plain.apply(pretrained, x)).max()) > 1e-2
  for name in ("dense", "einsum"):  # trained past K = 1: A^ is no longer A
    assert (
      float(
        jnp.abs(
          variables["snapshot"][name]["snapshot_a"] - variables["params"][name]["lora_a"]
        ).max()
      )
      > 1e-3
    )
  merged = dl.merge(variables, model)
  assert "snapshot" not in merged
  np.testing.assert_allclose(plain.apply(merged, x), out, rtol=0, atol=2e-6)
  adapter = dl.export_adapter(variables, model)
  assert sorted(adapter["weights"]["dense"]) == ["lora_a", "lora_b", "snapshot_a", "snapshot_b"]
  assert adapter["config"]["dense"]["paper_lambda"] == LAMBDA
  again, restored, _ = dl.attach_adapter_linen(plain, pretrained, adapter)
  np.testing.assert_array_equal(again.apply(restored, x), out)
  hyperparameters = {"layers": dl.layer_hyperparameters(model)}
  assert hyperparameters["layers"]["dense"]["paper_lambda"] == LAMBDA
  with (
    tempfile.TemporaryDirectory() as directory,
    dl.TrainingCheckpointer(directory) as checkpoints,
  ):
    checkpoints.save(1, {"variables": variables}, hyperparameters=hyperparameters)
    checkpoints.wait_until_finished()
    like = jax.tree.map(jnp.zeros_like, {"variables": variables})
    back = checkpoints.restore(like, hyperparameters=hyperparameters)["variables"]
  np.testing.assert_array_equal(model.apply(back, x), out)


def test_peft_export_is_exact_at_rank_2r_without_the_base():
  plain, pretrained, model, variables, x = trained_linen()
  with tempfile.TemporaryDirectory() as directory:
    names = {"dense": "fc", "einsum": "attn"}
    report = dl.save_peft(directory, variables, model, module_names=names, rule="paper")
    assert {n: (e["rank"], e["relative_error"]) for n, e in report["layers"].items()} == {
      "dense": (2 * R, 0.0),
      "einsum": (2 * R, 0.0),
    }
    adapter = dl.load_peft(directory, plain, x, module_names=names, variables=pretrained)
    with pytest.raises(ValueError, match=r"telescoped form .paper_lambda=2.0.: use rule='paper'"):
      dl.save_peft(directory, variables, model, module_names=names, rule="lora")
  again, restored, _ = dl.attach_adapter_linen(plain, pretrained, adapter)
  np.testing.assert_allclose(again.apply(restored, x), model.apply(variables, x), atol=2e-6)


def test_nnx_export_attach_merge_counts_and_diagnostics():
  with jax.enable_x64(True):
    model = nnx_model(LAMBDA)
    x = jnp.asarray(X)
    rng = np.random.default_rng(3)
    for layer in (model.dense, model.einsum):  # as if trained past K: A, B moved from A^, B^
      for key in ("lora_a", "lora_b"):
        getattr(layer, key)[...] += 0.1 * rng.standard_normal(getattr(layer, key).shape)
    out = model(x)
    np.testing.assert_allclose(dl.merge(model)(x), out, rtol=0, atol=1e-12)
    adapter = dl.export_adapter(model)
    assert sorted(adapter["weights"]["dense"]) == ["lora_a", "lora_b", "snapshot_a", "snapshot_b"]
    fresh, _ = dl.attach_adapter_nnx(NnxMLP(), adapter)
    np.testing.assert_array_equal(fresh(x), out)
    counts = dl.parameter_counts(model)
    lora_counts = dl.parameter_counts(nnx_model(None))
    assert counts == lora_counts  # the snapshot is not trained
    report = dl.diagnostics(model)["layers"]
    for name, kind in KINDS.items():
      layer = getattr(model, name)
      want = (
        LAMBDA
        * layer.scaling
        * np.linalg.norm(
          low(layer.lora_a[...], layer.lora_b[...], kind)
          - low(layer.snapshot_a[...], layer.snapshot_b[...], kind)
        )
      )
      assert report[name]["paper_lambda"] == LAMBDA
      np.testing.assert_allclose(report[name]["paper_change_norm"], want, rtol=1e-6)


class ScanMLP(nn.Module):
  """Three dense blocks stacked by nn.scan (kernels [3, d, d])."""

  @nn.compact
  def __call__(self, x):
    class Block(nn.Module):
      @nn.compact
      def __call__(self, h, _):
        return jnp.tanh(nn.Dense(IN, name="dense")(h)), None

    blocks = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)(
      name="blocks"
    )
    return blocks(x, None)[0]


def test_scanned_stack_trains_with_the_snapshot_and_exports():
  """adapt_linen on nn.scan: the snapshot goes through the stack (one per layer), K = 0."""
  x = jnp.asarray(X[:, 0], jnp.float32)
  y = jnp.asarray(np.sin(X[:, 0]), jnp.float32)
  pretrained = ScanMLP().init(jax.random.key(0), x)
  model, variables, _ = dl.adapt_linen(
    ScanMLP(), pretrained, x, rank=R, use_delta=False, paper_lambda=LAMBDA, key=jax.random.key(1)
  )
  shapes = jax.tree.map(jnp.shape, variables["snapshot"])
  assert shapes == {"blocks": {"dense": {"snapshot_a": (3, IN, R), "snapshot_b": (3, R, IN)}}}
  tx, step = trainer(model, optax.adamw(0.05), 0, x, y)
  state = tx.init(variables)
  for _ in range(4):
    variables, state = step(variables, state)
  p, snap = variables["params"]["blocks"]["dense"], variables["snapshot"]["blocks"]["dense"]
  np.testing.assert_array_equal(p["kernel"], pretrained["params"]["blocks"]["dense"]["kernel"])
  # K = 0: the snapshot is A_1, B_1, the factors after the first step, then frozen
  assert float(jnp.abs(snap["snapshot_a"] - p["lora_a"]).max()) > 1e-3
  out = model.apply(variables, x)
  ab = np.einsum("lir,lro->lio", np.asarray(p["lora_a"], np.float64), p["lora_b"])
  ab0 = np.einsum("lir,lro->lio", np.asarray(snap["snapshot_a"], np.float64), snap["snapshot_b"])
  merged = dl.merge(variables, model)
  np.testing.assert_allclose(
    merged["params"]["blocks"]["dense"]["kernel"],
    np.asarray(p["kernel"], np.float64) + (1 + LAMBDA) * ab - LAMBDA * ab0,
    rtol=0,
    atol=1e-6,
  )
  np.testing.assert_allclose(ScanMLP().apply(merged, x), out, rtol=0, atol=2e-6)
  again, restored, _ = dl.attach_adapter_linen(
    ScanMLP(), pretrained, dl.export_adapter(variables, model)
  )
  np.testing.assert_array_equal(again.apply(restored, x), out)


def test_sharding_gives_the_snapshot_the_specs_of_its_factors():
  _, _, model, variables, _ = trained_linen(steps=0)
  specs = dl.partition_specs(variables, dl.make_mesh(fsdp=2), layers=model)
  for name in ("dense", "einsum"):
    for n in "ab":
      assert specs["snapshot"][name][f"snapshot_{n}"] == specs["params"][name][f"lora_{n}"]
  assert specs["snapshot"]["dense"]["snapshot_a"] != jax.sharding.PartitionSpec()


# --------------------------------------------------------------------------
# The pure function, and the errors.
# --------------------------------------------------------------------------


def test_apply_with_the_snapshot_equal_to_the_factors_is_plain_lora():
  rng = np.random.default_rng(4)
  x, w = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((3, 4), (4, 5)))
  a, b = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((4, 2), (2, 5)))
  plain = core.delta_lora_apply(x, w, None, a, b, None, scaling=2.0, delta_scaling=0.1)
  for evaluation in ("factored", "merged"):
    got = core.delta_lora_apply(
      x,
      w,
      None,
      a,
      b,
      None,
      scaling=2.0,
      delta_scaling=0.1,
      snapshot=(a, b),
      paper_lambda=3.0,
      evaluation=evaluation,
    )
    # the extra term's halves cancel, up to the order of the sum over the rank
    np.testing.assert_allclose(got, plain, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
  ("kwargs", "error", "match"),
  [
    ({"paper_lambda": -1.0}, ValueError, "paper_lambda must be None or finite and >= 0"),
    ({"paper_lambda": float("nan")}, ValueError, "paper_lambda must be None or finite"),
    ({"paper_lambda": "2"}, TypeError, "paper_lambda must be a real number"),
    ({"paper_lambda": 2.0, "use_delta": True}, ValueError, "paper_lambda .* needs use_delta=False"),
  ],
)
def test_bad_paper_lambda_raises_at_construction(kwargs, error, match):
  with pytest.raises(error, match=match):
    dl.DeltaLoRADense(3, rank=R, **{"use_delta": False, **kwargs})
  with pytest.raises(error, match=match):
    dl.DeltaLoRALinear(4, 3, rank=R, rngs=nnx.Rngs(0), **{"use_delta": False, **kwargs})


def test_snapshot_and_paper_lambda_go_together_and_are_shape_checked():
  x, w, a, b = jnp.ones((2, 4)), jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.ones((2, 3))
  common = {"scaling": 1.0, "delta_scaling": 0.1}
  with pytest.raises(ValueError, match="snapshot and paper_lambda go together"):
    core.delta_lora_apply(x, w, None, a, b, None, **common, paper_lambda=2.0)
  with pytest.raises(ValueError, match=r"snapshot_b must have shape \(2, 3\)"):
    core.delta_lora_apply(x, w, None, a, b, None, **common, snapshot=(a, b.T), paper_lambda=2.0)


def test_lambda_given_to_the_rule_must_be_the_layers_and_cannot_be_traced():
  layer = dl.DeltaLoRADense(3, rank=R, use_delta=False, paper_lambda=LAMBDA)
  layers = {(): layer}
  assert dl.paper_delta_lora(1e-3, layers=layers, lambda_=LAMBDA) is not None  # the same: fine
  with pytest.raises(ValueError, match=r"lambda_=1.0 differs from the paper_lambda .*\{'': 2.0\}"):
    dl.paper_delta_lora(1e-3, layers=layers, lambda_=1.0)
  tx = optax.inject_hyperparams(dl.paper_delta_lora, static_args="layers")(
    learning_rate=1e-3, layers=layers, lambda_=LAMBDA
  )
  x = jnp.ones((2, 4))
  variables = layer.init(jax.random.key(0), x)
  state = tx.init(variables)
  with pytest.raises(TypeError, match=r"lambda_ is traced .* does not telescope"):
    jax.jit(tx.update)(variables, state, variables)


def test_trees_that_lack_the_snapshot_or_have_one_too_many_are_refused():
  layer = dl.DeltaLoRADense(3, rank=R, use_delta=False, paper_lambda=LAMBDA)
  plain = dl.DeltaLoRADense(3, rank=R, use_delta=False)
  variables = layer.init(jax.random.key(0), jnp.ones((2, 4)))
  with pytest.raises(ValueError, match=r"telescoped form\) must have .* lacks \['snapshot_a'"):
    dl.paper_delta_lora(1e-3, layers={(): layer}).init({"params": variables["params"]})
  with pytest.raises(ValueError, match=r"has \['snapshot_a', 'snapshot_b'\] in the tree, but"):
    dl.paper_delta_lora(1e-3, layers={(): plain}).init(variables)
  with pytest.raises(ValueError, match="needs the 'snapshot' collection"):
    layer.apply({"params": variables["params"]}, jnp.ones((2, 4)))


def test_layer_config_json_carries_paper_lambda_and_omits_it_when_unset():
  config = dl.DeltaLoRADense(3, rank=R, use_delta=False, paper_lambda=LAMBDA).config
  assert config.to_json()["paper_lambda"] == LAMBDA
  assert dl.config.LayerConfig.from_json(config.to_json()) == config
  assert "paper_lambda" not in dl.DeltaLoRADense(3, rank=R).config.to_json()


def test_snapshot_is_a_lora_param_of_its_own_type():
  layer = dl.DeltaLoRALinear(4, 3, rank=R, use_delta=False, paper_lambda=LAMBDA, rngs=nnx.Rngs(0))
  assert issubclass(dl.PaperSnapshot, nnx.LoRAParam)
  assert sorted(nnx.to_pure_dict(nnx.state(layer, dl.PaperSnapshot))) == [
    "snapshot_a",
    "snapshot_b",
  ]
  assert sorted(nnx.to_pure_dict(nnx.state(layer, nnx.LoRAParam))) == [
    "lora_a",
    "lora_b",
    "snapshot_a",
    "snapshot_b",
  ]


def test_a_fresh_model_can_be_donated_the_snapshot_has_buffers_of_its_own():
  """A^ = A at init, in another buffer: a step that donates the variables accepts them."""
  layer = dl.DeltaLoRADense(3, rank=R, use_delta=False, paper_lambda=LAMBDA)
  x = jnp.ones((2, 4))
  tx = dl.paper_delta_lora(lora_optimizer=optax.sgd(0.1), layers={(): layer}, start_step=0)

  def step(variables, opt_state):
    grads = jax.grad(lambda v: jnp.sum(layer.apply(v, x) ** 2))(variables)
    updates, opt_state = tx.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state

  variables = layer.init(jax.random.key(0), x)
  jax.jit(step, donate_argnums=0)(variables, tx.init(variables))  # "donate the same buffer twice"
  _, _, _, adapted, _ = trained_linen(steps=0)
  for name in ("dense", "einsum"):
    for n in "ab":
      assert adapted["snapshot"][name][f"snapshot_{n}"] is not adapted["params"][name][f"lora_{n}"]


def test_step_memory_is_plain_loras_and_the_in_place_form_twice_it():
  """XLA's memory_analysis of the donated step (exact, not timed): 512 x 512, rank 8, 64 rows."""
  from benchmarks import bench_paper_memory

  total = {
    variant: bench_paper_memory.prepare(variant, 512, 8, 64)["record"]["memory"]["total"]
    for variant in ("lora_adamw", "paper", "paper_in_place")
  }
  assert total["paper"] <= 1.05 * total["lora_adamw"], total  # measured 1.049
  assert total["paper_in_place"] >= 2.0 * total["lora_adamw"], total  # measured 2.12
