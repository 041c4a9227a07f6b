"""Strict JAX for every test and doctest, and 8 simulated CPU devices.

XLA_FLAGS must be set before JAX starts, hence here at the repository root.
"""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
