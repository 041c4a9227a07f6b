"""One meaning per word (issue 26's code-health list): kinds, option names, layer paths."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import deltalora_jax as dl
from deltalora_jax import config, projections
from deltalora_jax.adapt import nnx as nnx_adapt
from deltalora_jax.adapt import targets


class Kinds(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(4, 4, rngs=rngs)
    self.general = nnx.LinearGeneral(4, (2, 2), rngs=rngs)
    self.einsum = nnx.Einsum("bi,io->bo", (4, 3), rngs=rngs)
    self.conv = nnx.Conv(4, 2, kernel_size=(3,), rngs=rngs)
    self.norm = nnx.LayerNorm(4, rngs=rngs)


def test_a_module_kind_is_its_projection_name_as_in_diagnostics():
  model = Kinds(nnx.Rngs(0))
  kinds = {name: nnx_adapt.kind(m) for name, (_, m) in nnx_adapt.modules(model).items()}
  assert kinds == {
    "linear": "general_dense",
    "general": "general_dense",
    "einsum": "einsum",
    "conv": "conv",
    "norm": "LayerNorm",
  }
  _, report = dl.adapt_nnx(model, rank=1, rngs=nnx.Rngs(1))
  assert {n: e["kind"] for n, e in report["layers"].items()} == {
    n: k for n, k in kinds.items() if k in targets.ADAPTABLE_KINDS
  }
  assert nnx_adapt.kind(model.conv) == targets.ADAPTED


def test_adaptable_kinds_are_the_projections_names():
  names = {
    projections.GeneralDense(features=(2,)).name,
    projections.Einsum("bi,io->bo", (4, 3)).name,
    projections.Conv(features=2, kernel_size=(3,)).name,
  }
  assert names == targets.ADAPTABLE_KINDS


def test_the_two_option_lists_say_what_they_hold():
  assert "lora_a_init" in targets.ADAPTER_OPTIONS  # may be passed
  assert "lora_a_init" not in config.RECORDED_OPTIONS  # is not saved
  assert set(config.RECORDED_OPTIONS) == targets.ADAPTER_OPTIONS - {"lora_a_init"}
  assert not hasattr(config, "OPTIONS") and not hasattr(targets, "OPTIONS")


def test_linen_trace_reports_the_projection_name():
  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Conv(2, kernel_size=(3,), name="conv")(nn.Dense(4, name="dense")(x))

  x = jnp.ones((1, 5, 4))
  variables = Model().init(jax.random.key(0), x)
  _, _, report = dl.adapt_linen(Model(), variables, x, rank=1, key=jax.random.key(1))
  assert {n: e["kind"] for n, e in report["layers"].items()} == {
    "dense": "general_dense",
    "conv": "conv",
  }


def test_select_targets_takes_projection_names_and_refuses_other_kinds():
  modules = {"q": "einsum", "k": "conv", "o": "Dropout"}
  assert targets.select_targets(modules) == ["q", "k"]
  with pytest.raises(TypeError, match="'o' is a Dropout"):
    targets.select_targets(modules, ["o"])


def test_adapt_nnx_documents_every_option():
  args = dl.adapt_nnx.__doc__.split("**options:")[1].split("Returns:")[0]
  missing = [name for name in targets.ADAPTER_OPTIONS if f"``{name}``" not in args]
  assert not missing, f"adapt_nnx's docstring omits {missing}"


class Stack(nnx.Module):
  def __init__(self, rngs):
    self.layers = nnx.List([dl.DeltaLoRALinear(2, 2, rank=1, rngs=rngs) for _ in range(2)])


def test_every_function_names_a_layer_in_one_form():
  """``'layers/0'``: adapted_layers gave ``('layers', 0)``, parameter_counts ``'layers/0'``."""
  model = Stack(nnx.Rngs(0))
  names = ["layers/0", "layers/1"]
  assert list(dl.adapted_layers(model)) == names
  assert [n for n in dl.parameter_counts(model) if n != "total"] == names
  assert list(dl.layer_hyperparameters(model)) == names
  assert list(dl.diagnostics(model)["layers"]) == names
  assert list(dl.export_adapter(model)["weights"]) == names


def test_linen_layers_are_named_like_nnx_ones_and_a_path_tuple_is_still_taken():
  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return dl.DeltaLoRADense(2, rank=1, name="out")(dl.DeltaLoRADense(3, rank=1, name="h")(x))

  x = jnp.ones((1, 2))
  variables = Model().init(jax.random.key(0), x)
  layers = dl.adapted_layers(Model(), x)
  assert list(layers) == ["h", "out"]
  as_tuples = {tuple(name.split("/")): layer for name, layer in layers.items()}
  assert dl.parameter_counts(variables, as_tuples) == dl.parameter_counts(variables, layers)
