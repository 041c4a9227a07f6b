"""Checkpoints and reset of models adapted on attention, Einsum and Conv layers.

The rest of the per-kind checks are in ``test_kinds.py``; these take the
whole training state (variables, optimizer state, layer hyperparameters).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import deltalora_jax as dl


class Block(nn.Module):
  """Flax's attention, an einsum projection and a convolution."""

  @nn.compact
  def __call__(self, x):
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(x)
    y = nn.Einsum((8, 2, 4), "btd,dnh->btnh", name="proj")(x)
    return nn.Conv(3, kernel_size=(3,), name="conv")(jnp.reshape(y, (*y.shape[:2], 8)))


X = jax.random.normal(jax.random.key(0), (2, 5, 8))


@pytest.fixture(scope="module")
def trained():
  """The adapted block after 3 steps of the seed rule: ``(adapted, variables, opt_state, tx)``."""
  model = Block()
  adapted, variables, _ = dl.adapt_linen(
    model, model.init(jax.random.key(1), X), X, rank=2, key=jax.random.key(2)
  )
  tx = dl.delta_lora(0.1, layers=adapted, lora_optimizer=optax.sgd(0.1))

  @jax.jit
  def step(variables, opt_state):
    grads = jax.grad(lambda v: jnp.mean(adapted.apply(v, X) ** 2))(variables)
    updates, opt_state = tx.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state

  state = (variables, tx.init(variables))
  for _ in range(3):
    state = step(*state)
  return adapted, *state, tx


def test_checkpoint_round_trip_keeps_every_kind(trained, tmp_path):
  adapted, variables, opt_state, _ = trained
  hp = {"layers": dl.layer_hyperparameters(adapted.layers)}
  assert hp["layers"]["conv"]["projection"]["kind"] == "conv"
  assert hp["layers"]["attn/query"]["projection"]["features"] == [2, 4]
  state = {"variables": variables, "opt_state": opt_state}
  with dl.TrainingCheckpointer(tmp_path) as checkpoints:
    checkpoints.save(3, state, hyperparameters=hp)
    checkpoints.wait_until_finished()
    restored = checkpoints.restore(state, hyperparameters=hp)
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  assert float(dl.diagnostics(restored["variables"], adapted.layers)["total"]["delta_norm"]) > 0
  # A layer of another kind in the caller's model is a mismatch, named.
  other = {"layers": {**hp["layers"], "conv": {**hp["layers"]["conv"], "projection": {}}}}
  with (
    dl.TrainingCheckpointer(tmp_path) as checkpoints,
    pytest.raises(dl.CheckpointMismatchError, match="conv"),
  ):
    checkpoints.restore(state, hyperparameters=other)


def test_reset_zeroes_every_kinds_delta_and_velocity(trained):
  adapted, variables, opt_state, _ = trained
  assert all(float(jnp.abs(d).max()) > 0 for d in jax.tree.leaves(variables["delta"]))
  new, new_state = dl.reset(variables, opt_state)
  assert all(float(jnp.abs(d).max()) == 0 for d in jax.tree.leaves(new["delta"]))
  assert all(float(jnp.abs(v).max()) == 0 for v in jax.tree.leaves(dl.velocity(new_state)))
  jax.tree.map(np.testing.assert_array_equal, new["params"], variables["params"])
  # Without D the adapter is plain LoRA: the output is the LoRA model's.
  lora_only = dl.merge(new, adapted.layers)
  np.testing.assert_allclose(
    adapted.model.apply(lora_only, X), adapted.apply(new, X), rtol=1e-5, atol=1e-6
  )
