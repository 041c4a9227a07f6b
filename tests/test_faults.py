"""Faults in training: a non-finite gradient is skipped whole by ``optax.apply_if_finite``."""

import _training as training
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import deltalora_jax as dl


@pytest.fixture(scope="module")
def trained():
  """A state some steps into training: D, velocity and the LoRA momentum are non-zero."""
  return training.train(training.init_state(), 3)


def _inner(state):
  """What training has learned: the variables and the wrapped optimizer's state."""
  return state["variables"], state["opt_state"].inner_state


def _bad_batch(where, value):
  x, y = training.batch(jnp.int32(3))
  if where == "x":
    return x.at[2, 5].set(value), y
  return x, y.at[0, 1].set(value)


@pytest.mark.parametrize(("where", "value"), [("x", np.nan), ("x", np.inf), ("y", -np.inf)])
def test_a_non_finite_gradient_changes_nothing_and_training_continues(trained, where, value):
  # An infinite input can give a finite loss (tanh saturates) and still a non-finite gradient.
  state, _ = training.step(trained, *_bad_batch(where, value))
  training.assert_bit_identical(_inner(state), _inner(trained))
  assert int(state["opt_state"].notfinite_count) == 1
  assert int(state["opt_state"].total_notfinite) == 1

  # The next good step is the step the state would have taken without the bad batch.
  good = training.batch(state["data_position"])
  after, _ = training.step(state, *good)
  clean = dict(trained, rng=state["rng"], data_position=state["data_position"], step=state["step"])
  expected, _ = training.step(clean, *good)
  training.assert_bit_identical(_inner(after), _inner(expected))
  assert int(after["opt_state"].notfinite_count) == 0
  assert int(after["opt_state"].total_notfinite) == 1
  moved = (
    after["variables"]["delta"]["out"]["delta"] - trained["variables"]["delta"]["out"]["delta"]
  )
  assert float(jnp.max(jnp.abs(moved))) > 0


@jax.jit
def _update(variables, opt_state, grads):
  updates, opt_state = training.TX.update(grads, opt_state, variables)
  return optax.apply_updates(variables, updates), opt_state


@jax.jit
def _gradients(state):
  return jax.grad(training.loss_fn)(state["variables"], *training.batch(state["data_position"]))


def test_one_non_finite_leaf_skips_the_whole_update(trained):
  grads = _gradients(trained)
  grads["delta"]["out"]["delta"] = grads["delta"]["out"]["delta"].at[0, 0].set(jnp.nan)
  variables, opt_state = _update(trained["variables"], trained["opt_state"], grads)
  # The LoRA factors had finite gradients, and are still left as they were.
  training.assert_bit_identical(
    (variables, opt_state.inner_state), (trained["variables"], trained["opt_state"].inner_state)
  )
  assert int(opt_state.notfinite_count) == 1


def test_the_guard_gives_way_after_max_consecutive_errors(trained):
  grads = jax.tree.map(lambda g: jnp.full_like(g, jnp.nan), _gradients(trained))
  variables, opt_state = trained["variables"], trained["opt_state"]
  for skipped in range(1, training.MAX_CONSECUTIVE_ERRORS + 1):
    variables, opt_state = _update(variables, opt_state, grads)
    assert int(opt_state.notfinite_count) == skipped
    training.assert_bit_identical(variables, trained["variables"])
  # optax then applies the update: D and the velocity become NaN. Watch notfinite_count.
  variables, opt_state = _update(variables, opt_state, grads)
  assert bool(jnp.all(jnp.isnan(variables["delta"]["out"]["delta"])))
  assert bool(jnp.all(jnp.isnan(dl.velocity(opt_state)["delta"]["out"]["delta"])))


def test_a_batch_of_the_wrong_width_is_refused_before_any_change(trained):
  x, y = training.batch(jnp.int32(0))
  with pytest.raises(ValueError, match=r"must have 16 .*features.*\(16, 15\)"):
    training.step(trained, x[:, :15], y)
  state, _ = training.step(trained, x, y)
  assert int(state["step"]) == int(trained["step"]) + 1
