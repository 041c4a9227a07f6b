"""Faults in training: bad input is refused where it enters, naming what was given.

What happens to a non-finite gradient is ``optax.apply_if_finite``'s doing, not
this library's; that the delta rule's state goes through that wrapper is checked
in ``tests/test_optim.py``.
"""

import re

import _training as training
import jax.numpy as jnp
import pytest


def test_a_batch_of_the_wrong_width_is_refused_by_the_first_layer():
  x, y = training.batch(jnp.int32(0))
  # The adapted layer's own check, on the first layer (16 -> 32), not a later broadcast.
  message = (
    "inputs must have 16 features in their last axis (the kernel is 16x32), "
    "got inputs.shape=(16, 15)"
  )
  with pytest.raises(ValueError, match=f"^{re.escape(message)}($|\n)"):  # JAX may add a note
    training.step(training.init_state(), x[:, :15], y)
