"""A small Delta-LoRA training run shared by the sharding, checkpoint, fault and determinism tests.

Run as a script, ``python tests/_training.py resume DIR`` is the other process
of the checkpoint tests: it restores the latest step of DIR, trains
``RESUME_STEPS`` more steps and saves them; then it trains one more step,
starts saving it, writes the path of its temporary directory to ``DIR.saving``
once the arrays are written, and hangs there, before the commit, until killed.
"""

from __future__ import annotations

import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import deltalora_jax as dl

IN, HIDDEN, OUT, BATCH = 16, 32, 8, 16
LEARNING_RATE, MOMENTUM = 0.05, 0.9
LORA_LEARNING_RATE, LORA_MOMENTUM = 0.1, 0.5
MAX_CONSECUTIVE_ERRORS = 3
RESUME_STEPS = 10


class MLP(nn.Module):
  """Two adapted layers with a nonlinearity between them."""

  @nn.compact
  def __call__(self, x):
    x = nn.tanh(dl.DeltaLoRADense(HIDDEN, rank=4, name="hidden")(x))
    return dl.DeltaLoRADense(OUT, rank=2, delta_scaling=0.5, name="out")(x)


MODEL = MLP()
SAMPLE = jnp.zeros((1, IN))


def optimizer(max_consecutive_errors: int = MAX_CONSECUTIVE_ERRORS):
  """The guarded optimizer: Delta-LoRA with SGD and momentum (a state) on the LoRA factors."""
  lora_optimizer = optax.sgd(LORA_LEARNING_RATE, momentum=LORA_MOMENTUM)
  layers = dl.adapted_layers(MODEL, SAMPLE)
  inner = dl.delta_lora(LEARNING_RATE, MOMENTUM, layers=layers, lora_optimizer=lora_optimizer)
  return optax.apply_if_finite(inner, max_consecutive_errors)


TX = optimizer()
HYPERPARAMETERS = {
  "layers": dl.layer_hyperparameters(dl.adapted_layers(MODEL, SAMPLE)),
  "optimizer": {
    "learning_rate": LEARNING_RATE,
    "momentum": MOMENTUM,
    "lora_optimizer": {"sgd": LORA_LEARNING_RATE, "momentum": LORA_MOMENTUM},
    "max_consecutive_errors": MAX_CONSECUTIVE_ERRORS,
  },
}


@jax.jit
def batch(position):
  """The batch at a data position: a fixed stream, the same in every process."""
  kx, ky = jax.random.split(jax.random.fold_in(jax.random.key(1234), position))
  x = jax.random.normal(kx, (BATCH, IN))
  y = jnp.sin(2.0 * x[:, :OUT]) + 0.1 * jax.random.normal(ky, (BATCH, OUT))
  return x, y


def fresh_state(seed) -> dict:
  """Variables, optimizer state, PRNG key, data position and step of a fresh run."""
  init_key, rng = jax.random.split(jax.random.key(seed))
  variables = MODEL.init(init_key, SAMPLE)
  return {
    "variables": variables,
    "opt_state": TX.init(variables),
    "rng": rng,
    "data_position": jnp.zeros([], jnp.int32),
    "step": jnp.zeros([], jnp.int32),
  }


_FRESH_STATE = jax.jit(fresh_state)


def init_state(seed: int = 0) -> dict:
  """:func:`fresh_state`, compiled once for every seed."""
  return _FRESH_STATE(jnp.int32(seed))


def loss_fn(variables, x, y):
  return jnp.mean((MODEL.apply(variables, x) - y) ** 2)


def train_step(state: dict, x, y, tx=TX):
  """One step: input noise from the state's key, the gradient, the guarded update."""
  rng, noise_key = jax.random.split(state["rng"])
  x = x + 0.05 * jax.random.normal(noise_key, x.shape)
  loss, grads = jax.value_and_grad(loss_fn)(state["variables"], x, y)
  updates, opt_state = tx.update(grads, state["opt_state"], state["variables"])
  new = {
    "variables": optax.apply_updates(state["variables"], updates),
    "opt_state": opt_state,
    "rng": rng,
    "data_position": state["data_position"] + 1,
    "step": state["step"] + 1,
  }
  return new, loss


STEP = jax.jit(train_step)


def step(state: dict, x, y):
  """:data:`STEP` with every argument committed to the first device (one compilation for all)."""
  return STEP(*jax.device_put((state, x, y), jax.devices()[0]))


def train(state: dict, steps: int) -> dict:
  """``steps`` steps, each on the batch at the state's data position, on the first device."""
  for _ in range(steps):
    state, _ = step(state, *batch(state["data_position"]))
  return state


def numpy_leaves(tree) -> list:
  """The leaves of ``tree`` as NumPy arrays; a PRNG key becomes its key data."""

  def plain(leaf):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    return np.asarray(leaf)

  return [plain(leaf) for leaf in jax.tree.leaves(tree)]


def assert_bit_identical(got, want) -> None:
  """Same structure, and every leaf equal bit for bit (dtype included)."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(numpy_leaves(got), numpy_leaves(want), strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8))


def _resume_then_hang_while_saving(directory: str) -> None:
  from orbax.checkpoint._src.path import atomicity

  def hang(self):
    # The step's arrays are written in its temporary directory: signal, then never commit.
    with open(directory + ".saving", "w") as signal:
      signal.write(str(self.get()))
    while True:
      time.sleep(1.0)

  with dl.TrainingCheckpointer(directory) as checkpoints:
    state = checkpoints.restore(jax.eval_shape(init_state), hyperparameters=HYPERPARAMETERS)
    state = train(state, RESUME_STEPS)
    checkpoints.save(int(state["step"]), state, hyperparameters=HYPERPARAMETERS)
    checkpoints.wait_until_finished()
    atomicity.AtomicRenameTemporaryPath.finalize = hang
    state = train(state, 1)
    checkpoints.save(int(state["step"]), state, hyperparameters=HYPERPARAMETERS)
    checkpoints.wait_until_finished()


if __name__ == "__main__":
  jax.config.update("jax_numpy_rank_promotion", "raise")
  jax.config.update("jax_numpy_dtype_promotion", "strict")
  if sys.argv[1:2] != ["resume"] or len(sys.argv) != 3:
    raise SystemExit("usage: python tests/_training.py resume DIRECTORY")
  _resume_then_hang_while_saving(sys.argv[2])
