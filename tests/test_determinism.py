"""Determinism: the same seed gives bit-identical parameters after N steps on CPU."""

import _training as training
import numpy as np

STEPS = 6


def test_same_seed_same_bits_and_another_seed_other_bits():
  first = training.train(training.init_state(seed=3), STEPS)
  second = training.train(training.init_state(seed=3), STEPS)
  training.assert_bit_identical(first, second)
  other = training.train(training.init_state(seed=4), STEPS)
  differs = [
    not np.array_equal(a, b)
    for a, b in zip(
      training.numpy_leaves(first["variables"]),
      training.numpy_leaves(other["variables"]),
      strict=True,
    )
  ]
  # Every leaf moves with the seed except the zero-initialised, frozen biases.
  assert sum(differs) == len(differs) - 2
