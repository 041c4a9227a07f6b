"""The tests of tunix's models, part of the suite: they need the ``tunix`` extra, which the
README's test command and ``.ci/run`` install with the others in one environment.

tunix's models read ``Variable.value`` and pass ``sharding=`` to Variables, which Flax
deprecates, and import ``jax.experimental.shard_map``, which JAX deprecates, and more (every
deprecation warning attributed to tunix's lines): those warnings are tunix's, and only they are
let through (every other warning is still an error). Its modules are imported here once, their
import-time warnings ignored.
"""

import importlib
import pathlib
import sys
import warnings

import jax
import pytest

with warnings.catch_warnings():
  warnings.simplefilter("ignore", DeprecationWarning)
  for _name in ("gemma", "gemma3", "llama3", "qwen2", "qwen3"):
    importlib.import_module(f"tunix.models.{_name}.model")
  for _name in ("tunix.generate.sampler", "tunix.sft.peft_trainer", "qwix"):
    importlib.import_module(_name)

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))  # tests/_docs.py


#: The deprecation warnings tunix's own code raises (Flax's and JAX's names it still uses).
TUNIX_WARNINGS = (
  r"ignore::DeprecationWarning:tunix\..*",  # raised in tunix's lines (JAX's deprecated names)
  "ignore:'.value' access is now deprecated:DeprecationWarning",
  "ignore:'sharding' is deprecated, use 'out_sharding' instead:DeprecationWarning",
  "ignore:optax.global_norm is deprecated:DeprecationWarning",  # PeftTrainer's step
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
  for item in items:
    for spec in TUNIX_WARNINGS:
      item.add_marker(pytest.mark.filterwarnings(spec))


@pytest.fixture(autouse=True)
def standard_promotion():
  """tunix's models mix int32 positions with float32 and broadcast a norm's scale ``[D]`` over
  ``[B, T, D]`` (JAX's standard promotion, which users run): the main suite's strict dtype and
  rank promotion refuse tunix's own code."""
  with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
    yield
