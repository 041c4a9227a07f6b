"""bfloat16 compute with float32 parameters, ``D`` and velocity.

The layer's ``dtype`` is the compute dtype and ``param_dtype`` the storage
dtype; :func:`deltalora_jax.delta_lora`'s ``velocity_dtype`` keeps the EMA in
float32. A bf16-compute training run must stay close to the float32 run:
after 150 steps, the final loss within 2% and each ``D`` within 3% (relative
Frobenius distance) of the float32 run's.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import deltalora_jax as dl
from deltalora_jax import core

BF16 = jnp.bfloat16
STEPS = 150
LOSS_RTOL = 2e-2  # the stated distance of the final losses
DELTA_RTOL = 3e-2  # ... and of each D, relative Frobenius norm


def _relative(a, b) -> float:
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("evaluation", ["merged", "factored"])
def test_bf16_compute_is_close_to_float32_and_keeps_float32_gradients(evaluation):
  ks = jax.random.split(jax.random.key(0), 6)
  x = jax.random.normal(ks[0], (64, 32))
  w, d = jax.random.normal(ks[1], (32, 16)) / 6, jax.random.normal(ks[2], (32, 16)) / 6
  a, b = jax.random.normal(ks[3], (32, 4)) / 6, jax.random.normal(ks[4], (4, 16)) / 2
  bias = jax.random.normal(ks[5], (16,))

  def layer(dtype, a, b, d):
    return core.delta_lora_apply(
      x, w, bias, a, b, d, scaling=2.0, delta_scaling=0.5, evaluation=evaluation, dtype=dtype
    )

  @jax.jit
  def outputs_and_gradients(a, b, d):
    out = {}
    for name, dtype in (("bfloat16", BF16), ("float32", None)):
      loss = lambda *p, dtype=dtype: jnp.sum(jnp.square(layer(dtype, *p).astype(jnp.float32)))  # noqa: E731
      out[name] = (layer(dtype, a, b, d), jax.grad(loss, argnums=(0, 1, 2))(a, b, d))
    return out

  out = outputs_and_gradients(a, b, d)
  (y16, g16), (y32, g32) = out["bfloat16"], out["float32"]
  assert y16.dtype == BF16
  assert y32.dtype == jnp.float32
  assert _relative(y16.astype(jnp.float32), y32) <= 1e-2  # bf16 has an 8-bit mantissa
  for got, want in zip(g16, g32, strict=True):
    assert got.dtype == jnp.float32  # the gradient of a float32 parameter
    assert _relative(got, want) <= 3e-2


class _Net(nn.Module):
  dtype: object = None

  @nn.compact
  def __call__(self, x):
    x = nn.tanh(dl.DeltaLoRADense(32, rank=4, delta_scaling=1.0, dtype=self.dtype)(x))
    return dl.DeltaLoRADense(1, rank=1, delta_scaling=1.0, dtype=self.dtype)(x)


def _train(dtype):
  kx, kt, kp = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (128, 16))
  target = jnp.sin(x @ jax.random.normal(kt, (16, 1)))
  model = _Net(dtype)
  variables = model.init(kp, x)
  layers = dl.adapted_layers(model, x)
  tx = dl.delta_lora(
    0.05, 0.9, layers=layers, lora_optimizer=optax.sgd(0.05), velocity_dtype=jnp.float32
  )

  def loss_fn(v):
    return jnp.mean(jnp.square(model.apply(v, x).astype(jnp.float32) - target))

  def step(carry, _):
    v, s = carry
    loss, grads = jax.value_and_grad(loss_fn)(v)
    updates, s = tx.update(grads, s, v)
    return (optax.apply_updates(v, updates), s), loss

  (variables, opt_state), losses = jax.jit(lambda v, s: jax.lax.scan(step, (v, s), length=STEPS))(
    variables, tx.init(variables)
  )
  return variables, opt_state, losses


@pytest.fixture(scope="module")
def runs():
  return {"float32": _train(None), "bfloat16": _train(BF16)}


def test_bf16_run_keeps_parameters_delta_and_velocity_in_float32(runs):
  variables, opt_state, _ = runs["bfloat16"]
  for leaf in jax.tree.leaves((variables, dl.velocity(opt_state))):
    assert leaf.dtype == jnp.float32


def test_bf16_training_run_stays_close_to_the_float32_run(runs):
  v32, _, losses32 = runs["float32"]
  v16, _, losses16 = runs["bfloat16"]
  # Both runs learn: the check below cannot pass by two runs that stand still.
  assert losses32[-1] <= 0.5 * losses32[0]
  np.testing.assert_allclose(losses16[-1], losses32[-1], rtol=LOSS_RTOL)
  for name in ("DeltaLoRADense_0", "DeltaLoRADense_1"):
    got, want = v16["delta"][name]["delta"], v32["delta"][name]["delta"]
    assert float(jnp.linalg.norm(want)) > 0.0
    assert _relative(got, want) <= DELTA_RTOL
