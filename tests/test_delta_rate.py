"""D's learning rate on the effective weight: ``delta_lora`` against full fine-tuning SGD.

``W_eff = W + s A B + ds D``, so ``dL/dD = ds dL/dW_eff``. With the factors held still
(``lora_optimizer=optax.set_to_zero()``, ``B = 0``) and the base frozen, only ``D`` moves, and
the delta rule from ``V = 0`` moves ``W_eff`` at step ``n`` by

  ``-lr (1 - mu^n) ds^2 dL/dW_eff`` for a constant gradient,

so its first step is one SGD step of rate ``lr (1 - mu) ds^2`` on a plain ``nn.Dense`` with the
same kernel, and its steady state is SGD at ``lr ds^2``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import deltalora_jax as dl
from deltalora_jax.nnx import DeltaLoRALinear, DeltaParam

IN, OUT, R, ROWS = 6, 5, 2, 4
DS, LR = 0.5, 2.0
TRAINABLE = nnx.Any(nnx.LoRAParam, DeltaParam)
TOLERANCE = {"float32": {"rtol": 1e-5, "atol": 1e-6}, "float64": {"rtol": 1e-12, "atol": 1e-14}}
STEADY = {"float32": {"rtol": 1e-4, "atol": 1e-5}, "float64": {"rtol": 1e-10, "atol": 1e-12}}


def _batch(dtype):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((ROWS, IN)), dtype)
  target = jnp.asarray(rng.standard_normal((ROWS, OUT)), dtype)
  return x, target


def _squared_error(target):
  return lambda y: jnp.mean((y - target) ** 2)


def _linear(target):
  """A loss whose gradient in ``W_eff`` is ``x^T target``, whatever the weights."""
  return lambda y: jnp.sum(y * target)


def _linen_kernels(loss, x, mu, steps):
  """The base ``(kernel, bias)`` and the merged kernel before and after each step (Linen)."""
  layer = dl.DeltaLoRADense(OUT, rank=R, delta_scaling=DS, param_dtype=x.dtype)
  variables = layer.init(jax.random.key(0), x)
  layers = dl.adapted_layers(layer, x)
  tx = dl.delta_lora(LR, mu, layers=layers, lora_optimizer=optax.set_to_zero())
  opt_state = tx.init(variables)

  @jax.jit
  def step(variables, opt_state):
    grads = jax.grad(lambda v: loss(layer.apply(v, x)))(variables)
    updates, opt_state = tx.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state

  merged = jax.jit(lambda v: dl.merge(v, layers)["params"]["kernel"])
  base = (variables["params"]["kernel"], variables["params"]["bias"])
  kernels = [merged(variables)]
  for _ in range(steps):
    variables, opt_state = step(variables, opt_state)
    kernels.append(merged(variables))
  np.testing.assert_array_equal(variables["params"]["lora_b"], 0.0)
  return base, kernels


def _nnx_kernels(loss, x, mu, steps):
  """The base ``(kernel, bias)`` and the merged kernel before and after each step (NNX)."""
  model = DeltaLoRALinear(IN, OUT, rank=R, delta_scaling=DS, param_dtype=x.dtype, rngs=nnx.Rngs(0))
  tx = dl.delta_lora(LR, mu, layers=model, lora_optimizer=optax.set_to_zero())
  optimizer = nnx.Optimizer(model, tx, wrt=TRAINABLE)

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: loss(m(x)), argnums=nnx.DiffState(0, TRAINABLE))(model)
    optimizer.update(model, grads)

  base = (jnp.copy(model.kernel[...]), jnp.copy(model.bias[...]))
  kernels = [dl.merge(model).kernel[...]]
  for _ in range(steps):
    step(model, optimizer)
    kernels.append(dl.merge(model).kernel[...])
  np.testing.assert_array_equal(model.lora_b[...], 0.0)
  return base, kernels


RUNS = {"linen": _linen_kernels, "nnx": _nnx_kernels}


def _dense_gradient(loss, x, kernel, bias):
  """``dL/dW`` of a plain ``nn.Dense`` holding the effective kernel."""
  params = {"params": {"kernel": kernel, "bias": bias}}
  return jax.grad(lambda p: loss(nn.Dense(OUT, param_dtype=x.dtype).apply(p, x)))(params)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("mu", [0.0, 0.9])
@pytest.mark.parametrize("front_end", ["linen", "nnx"])
def test_first_step_is_full_fine_tuning_sgd_at_lr_one_minus_mu_ds_squared(front_end, mu, dtype):
  with jax.enable_x64(dtype == "float64"):
    x, target = _batch(jnp.dtype(dtype))
    loss = _squared_error(target)
    (kernel, bias), kernels = RUNS[front_end](loss, x, mu, steps=1)
    np.testing.assert_array_equal(kernels[0], kernel)  # B = 0 and D = 0: W_eff = W
    # One step of plain SGD on the Dense kernel, at the rate the docstring of delta_lora states.
    eta_full = LR * (1 - mu) * DS**2
    sgd = optax.sgd(eta_full)
    grad = _dense_gradient(loss, x, kernel, bias)["params"]["kernel"]
    update, _ = sgd.update(grad, sgd.init(kernel))
    np.testing.assert_allclose(
      kernels[1] - kernels[0], optax.apply_updates(kernel, update) - kernel, **TOLERANCE[dtype]
    )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("front_end", ["linen", "nnx"])
def test_steady_state_step_approaches_lr_ds_squared_times_the_gradient(front_end, dtype):
  mu, steps = 0.8, 120
  with jax.enable_x64(dtype == "float64"):
    x, target = _batch(jnp.dtype(dtype))
    loss = _linear(target)
    (kernel, bias), kernels = RUNS[front_end](loss, x, mu, steps=steps)
    g = np.asarray(_dense_gradient(loss, x, kernel, bias)["params"]["kernel"])
    np.testing.assert_allclose(g, np.asarray(x).T @ np.asarray(target), rtol=1e-5)
    changes = np.diff(np.stack([np.asarray(k) for k in kernels]), axis=0)
    # every step follows -lr (1 - mu^n) ds^2 g: the velocity of a constant gradient fills up
    for n in (1, 2, 3, 10, steps):
      want = -LR * (1 - mu**n) * DS**2 * g
      np.testing.assert_allclose(changes[n - 1], want, **STEADY[dtype])
    # ... to full fine-tuning SGD at lr ds^2, which is how to read learning_rate
    np.testing.assert_allclose(changes[-1], -LR * DS**2 * g, **STEADY[dtype])
