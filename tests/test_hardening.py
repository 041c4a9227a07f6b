"""What a new user hit (issue 26): each bad input is refused where it enters, by name.

Each test fails on the code before the fix: either the input was accepted
silently, or it failed deep inside JAX, Flax or safetensors with a message
that named neither the argument nor what is allowed.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import deltalora_jax as dl


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(4, 8, rngs=rngs)
    self.down = nnx.Linear(8, 1, rngs=rngs)

  def __call__(self, x):
    return self.down(nnx.relu(self.up(x)))


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(1, name="down")(nn.relu(nn.Dense(8, name="up")(x)))


X = jnp.ones((2, 4))


def _unchanged(model: MLP) -> bool:
  return type(model.up) is nnx.Linear and type(model.down) is nnx.Linear


# -------------------------------------------------------------- 1. exclude


@pytest.mark.parametrize(
  "exclude, match",
  [
    (["dwn"], r"exclude \['dwn'\] match no layer of the model; the layers that can be adapted "
     r"are \['down', 'up'\]"),
    ("dwn.*", r"exclude='dwn\.\*' matches no layer of the model; the layers that can be adapted"),
  ],
)  # fmt: skip
def test_exclude_that_matches_no_layer_is_refused_nnx(exclude, match):
  model = MLP(nnx.Rngs(0))
  with pytest.raises(ValueError, match=match):
    dl.adapt_nnx(model, exclude=exclude, rank=1, rngs=nnx.Rngs(1))
  assert _unchanged(model)


def test_exclude_that_matches_no_layer_is_refused_linen():
  variables = LinenMLP().init(jax.random.key(0), X)
  with pytest.raises(ValueError, match=r"exclude \['dwn'\] match no layer"):
    dl.adapt_linen(LinenMLP(), variables, X, exclude=["dwn"], rank=1, key=jax.random.key(1))


def test_exclude_of_an_existing_layer_still_leaves_it_out():
  model, _ = dl.adapt_nnx(MLP(nnx.Rngs(0)), exclude=["down"], rank=1, rngs=nnx.Rngs(1))
  assert type(model.up) is dl.nnx.DeltaLoRALinear and type(model.down) is nnx.Linear


# ----------------------------------------------------- 3. rank, by layer


def test_nnx_rank_error_names_the_layer_and_leaves_the_model():
  model = MLP(nnx.Rngs(0))
  with pytest.raises(
    ValueError,
    match=r"rank must satisfy 0 < rank <= 1 for the kernel \(8, 1\) of the layer 'down', "
    r"got rank=2",
  ):
    dl.adapt_nnx(model, rank=2, rngs=nnx.Rngs(1))
  assert _unchanged(model)


def test_linen_rank_error_names_the_layer_in_the_same_words():
  variables = LinenMLP().init(jax.random.key(0), X)
  with pytest.raises(
    ValueError, match=r"rank must satisfy 0 < rank <= 1 for the kernel \(8, 1\) of the layer 'down'"
  ):
    dl.adapt_linen(LinenMLP(), variables, X, rank=2, key=jax.random.key(1))


def test_an_override_rank_is_checked_per_layer():
  with pytest.raises(ValueError, match=r"of the layer 'up', got rank=5"):
    dl.adapt_nnx(MLP(nnx.Rngs(0)), ["up"], rank=1, overrides={"up": {"rank": 5}}, rngs=nnx.Rngs(1))


# ----------------------------------------------------- 2. adapter_dtype


@pytest.mark.parametrize("adapter_dtype", ["int32", jnp.bool_])
def test_an_integer_adapter_dtype_is_refused_by_name(adapter_dtype):
  match = r"adapter_dtype must be a floating dtype .* or None, got adapter_dtype="
  model = MLP(nnx.Rngs(0))
  with pytest.raises(TypeError, match=match):
    dl.adapt_nnx(model, adapter_dtype=adapter_dtype, rank=1, rngs=nnx.Rngs(1))
  assert _unchanged(model)
  with pytest.raises(TypeError, match=match):
    dl.nnx.DeltaLoRALinear(4, 3, rank=1, adapter_dtype=adapter_dtype, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match=match):
    dl.DeltaLoRADense(3, rank=1, adapter_dtype=adapter_dtype)
  variables = LinenMLP().init(jax.random.key(0), X)
  with pytest.raises(TypeError, match=match):
    dl.adapt_linen(
      LinenMLP(), variables, X, adapter_dtype=adapter_dtype, rank=1, key=jax.random.key(1)
    )


# ------------------------------------------------------ 4. learning rates


def test_negative_learning_rates_are_refused():
  layer = dl.DeltaLoRADense(3, rank=1)
  layers = dl.adapted_layers(layer, X)
  match = r"learning_rate must be finite and >= 0, or a schedule, got learning_rate=-0.1"
  with pytest.raises(ValueError, match=match):
    dl.delta_lora(-0.1, layers=layers, lora_optimizer=optax.sgd(0.1))
  with pytest.raises(ValueError, match=match):
    dl.delta_momentum(-0.1)
  plain = dl.adapted_layers(dl.DeltaLoRADense(3, rank=1, use_delta=False), X)
  with pytest.raises(ValueError, match=match):
    dl.paper_delta_lora(-0.1, layers=plain)
  dl.delta_lora(0.0, layers=layers, lora_optimizer=optax.sgd(0.1))  # 0 freezes D: allowed


# ------------------------------------------------------------- 5. alpha


@pytest.mark.parametrize("alpha", [0, 0.0, -2.0])
def test_alpha_zero_or_negative_is_refused_not_read_as_rank(alpha):
  match = rf"alpha must be a finite number > 0 or None \(None: alpha = rank\), got alpha={alpha}"
  with pytest.raises(ValueError, match=match):
    dl.DeltaLoRADense(3, rank=1, alpha=alpha)
  with pytest.raises(ValueError, match=match):
    dl.nnx.DeltaLoRALinear(4, 3, rank=1, alpha=alpha, rngs=nnx.Rngs(0))
  model = MLP(nnx.Rngs(0))
  with pytest.raises(ValueError, match=match):
    dl.adapt_nnx(model, alpha=alpha, rank=1, rngs=nnx.Rngs(1))
  assert _unchanged(model)
