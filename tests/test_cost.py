"""Structural cost facts of the compiled layer and training step.

No timing: XLA's own cost analysis (flops), the products in the compiled
program, and the trace count of a jitted step.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

import deltalora_jax as dl
from deltalora_jax import core

N, I, O, R = 256, 128, 96, 4  # rows, in, out, rank of the single-layer checks
S, DS = 2.0, 0.1


def _compiled(fn, *args):
  return jax.jit(fn).lower(*args).compile()


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, list | tuple):
    cost = cost[0]
  return float(cost["flops"])


def _full_products(compiled, rows: int, cols: int) -> int:
  """How many dots of the compiled program produce a full ``[rows, cols]`` matrix."""
  return len(re.findall(rf"= f32\[{rows},{cols}\]\{{[0-9,]*\}} dot\(", compiled.as_text()))


@pytest.fixture(scope="module")
def layer_args():
  ks = jax.random.split(jax.random.key(0), 7)
  x = jax.random.normal(ks[0], (N, I))
  w = jax.random.normal(ks[1], (I, O))
  b = jax.random.normal(ks[2], (O,))
  a = jax.random.normal(ks[3], (I, R))
  bb = jax.random.normal(ks[4], (R, O))
  d = jax.random.normal(ks[5], (I, O))
  c = jax.random.normal(ks[6], (N, O))  # dLoss/dy
  return x, w, b, a, bb, d, c


def _layer_grad(evaluation, use_delta, freeze_base=True):
  """Value and gradient of ``sum(c * y)`` w.r.t. x, A, B (and D or W): an inner layer."""

  def loss(x, w, b, a, bb, d, c):
    y = core.delta_lora_apply(
        x, w, b, a, bb, d if use_delta else None,
        scaling=S, delta_scaling=DS, freeze_base=freeze_base, evaluation=evaluation,
    )  # fmt: skip
    return jnp.sum(c * y)

  argnums = (0, 3, 4, 5) if use_delta else (0, 1, 3, 4)
  return jax.value_and_grad(loss, argnums=argnums)


def _expected_flops(evaluation, use_delta):
  """Matrix-product flops of value and gradient (w.r.t. x, A, B, D) of the layer."""
  full, low_in, low_out = 2 * N * I * O, 2 * N * I * R, 2 * N * R * O
  if evaluation == "merged":
    form = 2 * I * R * O  # A B
    # forward x M, input gradient g M^T, weight gradient G = x^T g, then
    # dA = s G B^T and dB = s A^T G.
    return form + 3 * full + 2 * (2 * I * O * R)
  forward = full + low_in + low_out + (full if use_delta else 0)
  # dx = g W^T + s (g B^T) A^T [+ ds g D^T]; dB = s (x A)^T g; dA = s x^T (g B^T)
  backward = full + low_out + low_in + (full if use_delta else 0) + low_out + low_in
  if use_delta:
    backward += full  # dD = ds x^T g
  return forward + backward


@pytest.mark.parametrize(
  "evaluation, use_delta",
  [("merged", True), ("factored", True), ("factored", False)],
)
def test_layer_flops_are_the_expected_products(layer_args, evaluation, use_delta):
  compiled = _compiled(_layer_grad(evaluation, use_delta), *layer_args)
  expected = _expected_flops(evaluation, use_delta)
  # Elementwise work (scalings, sums, the loss) is the rest: under 2%.
  assert expected <= _flops(compiled) <= 1.02 * expected


@pytest.mark.parametrize("use_delta, chosen", [(True, "merged"), (False, "factored")])
def test_auto_picks_the_cheaper_evaluation(layer_args, use_delta, chosen):
  flops = {
    e: _flops(_compiled(_layer_grad(e, use_delta), *layer_args))
    for e in ("auto", "merged", "factored")
  }
  assert flops["auto"] == flops[chosen]
  assert flops["auto"] == min(flops.values())


def test_frozen_base_gets_no_weight_gradient_in_factored_mode(layer_args):
  frozen_lora = _compiled(_layer_grad("factored", False), *layer_args)
  trained_lora = _compiled(_layer_grad("factored", False, freeze_base=False), *layer_args)
  frozen_seed = _compiled(_layer_grad("factored", True), *layer_args)
  assert _full_products(frozen_lora, I, O) == 0  # no [in, out] product at all
  assert _full_products(trained_lora, I, O) == 1  # dW = x^T g
  assert _full_products(frozen_seed, I, O) == 1  # only dD, none for W
  assert _flops(trained_lora) >= _flops(frozen_lora) + 2 * N * I * O


# --------------------------------------------------------------------------
# The whole training step.
# --------------------------------------------------------------------------

WIDTH, ROWS, RANK, LAYERS = 128, 1024, 4, 3


class _MLP(nn.Module):
  kind: str  # "full", "seed", "naive" (three products), "lora" or "paper"

  @nn.compact
  def __call__(self, x):
    for i in range(LAYERS):
      if self.kind == "full":
        x = nn.Dense(WIDTH)(x)
      else:
        x = dl.DeltaLoRADense(
          WIDTH,
          rank=RANK,
          evaluation="factored" if self.kind == "naive" else "auto",
          use_delta=self.kind in ("seed", "naive"),
        )(x)
      if i < LAYERS - 1:
        x = nn.relu(x)
    return x


def _optimizer(kind, layers):
  if kind == "full":
    return optax.sgd(1e-2, momentum=0.9)
  if kind == "lora":
    return optax.multi_transform(
      {"lora": optax.adamw(1e-3), "base": optax.set_to_zero(), "other": optax.set_to_zero()},
      dl.leaf_labels,
    )
  if kind == "paper":
    return dl.paper_delta_lora(1e-3, layers=layers, start_step=0)
  return dl.delta_lora(1e-2, layers=layers, lora_optimizer=optax.sgd(1e-2))


def _make_step(model, tx, traces):
  def step(variables, opt_state, x, y):
    traces.append(1)

    def loss_fn(v):
      return jnp.mean(jnp.square(model.apply(v, x) - y))

    loss, grads = jax.value_and_grad(loss_fn)(variables)
    updates, opt_state = tx.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def _setup(kind):
  model = _MLP(kind)
  kx, ky, kp = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(kx, (ROWS, WIDTH))
  y = jax.random.normal(ky, (ROWS, WIDTH))
  variables = model.init(kp, x)
  tx = _optimizer(kind, dl.adapted_layers(model, x) if kind != "full" else None)
  traces = []
  return _make_step(model, tx, traces), variables, tx.init(variables), x, y, traces


@pytest.fixture(scope="module")
def step_flops():
  out = {}
  # optax.adamw's bias correction mixes a Python float with its int32 count,
  # which strict promotion refuses; a user runs with the standard mode.
  with jax.numpy_dtype_promotion("standard"):
    for kind in ("full", "seed", "naive", "lora", "paper"):
      step, v, s, x, y, _ = _setup(kind)
      out[kind] = _flops(step.lower(v, s, x, y).compile())
  return out


def test_seed_step_flops_at_the_floor_of_full_fine_tuning(step_flops):
  # The floor: forward, input and weight gradients of the same layers, as
  # full fine-tuning; the low-rank extra is about rank / rows of it.
  ratio = step_flops["seed"] / step_flops["full"]
  assert 1.0 <= ratio <= 1.02


def test_three_separate_products_cost_far_more(step_flops):
  # In products of [ROWS, WIDTH] by [WIDTH, WIDTH], over the LAYERS = 3 layers. Full
  # fine-tuning: forward 3, weight gradients 3, input gradients 2 (none for the input): 8.
  # Three separate products: forward x W and x D 6, dD 3, input gradients g W^T and g D^T
  # 4: 13; and 17 of rank / width that size: x A, (x A) B 6, g B^T, dA, dB 9, (g B^T) A^T 2.
  expected = (13 + 17 * RANK / WIDTH) / 8  # 1.69
  assert expected <= step_flops["naive"] / step_flops["full"] <= 1.01 * expected


def test_paper_rule_step_flops_near_plain_lora(step_flops):
  # The rule adds the change of A B to the kernel: a few low-rank products.
  assert step_flops["lora"] < step_flops["paper"] <= 1.15 * step_flops["lora"]
  assert step_flops["lora"] <= 0.8 * step_flops["full"]  # no weight gradient


def test_second_call_neither_retraces_nor_recompiles():
  step, v, s, x, y, traces = _setup("seed")
  compiles = []

  def listen(event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(event)

  v, s, _ = step(v, s, x, y)
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    v, s, loss = step(v, s, x, y)
    v, s, loss = step(v, s, x, y)
    jax.block_until_ready(loss)
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert len(traces) == 1
  assert compiles == []
