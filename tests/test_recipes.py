"""The training-loop recipes (TrainState, nnx.Optimizer) train and equal the plain step.

Each recipe is run from its guide (``docs/guides/training_loops.md``) as written: its
setup block, then its loop block; the test keeps the state between the two and replays
the loop with the library's own plain step (``tx.update`` and ``optax.apply_updates``
on the whole tree), which must give exactly the same parameters.
"""

import _docs
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

STEPS = 30  # the guide's loops


def _run(code, namespace, name):
  # A user runs with JAX's default (standard) dtype promotion; optax.adam's bias
  # correction mixes a float with its int32 count, which strict mode refuses.
  with jax.numpy_dtype_promotion("standard"):
    exec(compile(code, f"training_loops.md: {name}", "exec"), namespace)


def _mse(apply, x, y):
  return float(jnp.mean((apply(x) - y) ** 2))


@pytest.fixture(scope="module")
def recipes():
  blocks = _docs.code_blocks("training_loops.md", "Linen: TrainState")
  blocks += _docs.code_blocks("training_loops.md", "NNX: nnx.Optimizer")
  assert len(blocks) == 4, "TrainState setup and loop, nnx.Optimizer setup and loop"
  assert blocks == _docs.code_blocks("training_loops.md")
  return blocks


def test_train_state_recipe_trains_and_equals_the_plain_step(recipes, capsys):
  setup, loop = recipes[:2]
  ns = {}
  _run(setup, ns, "train-state")
  model, tx, x, y = ns["model"], ns["tx"], ns["x"], ns["y"]
  start = ns["state"]
  assert start.params is ns["variables"]  # the whole tree: 'params' and 'delta'
  _run(loop, ns, "train-state-loop")
  assert "TrainState: loss" in capsys.readouterr().out
  end = ns["state"]
  assert int(end.step) == STEPS

  # It trains: D, the factors and the head move, the frozen base does not.
  before, after = start.params, end.params
  assert float(jnp.linalg.norm(after["delta"]["hidden"]["delta"])) > 0
  for name in ("lora_a", "lora_b"):
    assert not np.array_equal(after["params"]["hidden"][name], before["params"]["hidden"][name])
  for name in ("kernel", "bias"):
    np.testing.assert_array_equal(after["params"]["hidden"][name], before["params"]["hidden"][name])
  assert not np.array_equal(after["params"]["head"]["kernel"], before["params"]["head"]["kernel"])
  first = _mse(lambda x: model.apply(before, x), x, y)
  assert _mse(lambda x: model.apply(after, x), x, y) < 0.5 * first

  # Exactly the library's own plain step on the whole tree.
  @jax.jit
  def plain_step(variables, opt_state):
    grads = jax.grad(lambda v: jnp.mean((model.apply(v, x) - y) ** 2))(variables)
    updates, opt_state = tx.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state

  variables, opt_state = ns["variables"], tx.init(ns["variables"])
  with jax.numpy_dtype_promotion("standard"):
    for _ in range(STEPS):
      variables, opt_state = plain_step(variables, opt_state)
  chex.assert_trees_all_equal(end.params, variables)
  chex.assert_trees_all_equal(end.opt_state, opt_state)


def test_train_state_with_params_alone_is_refused_by_name(recipes):
  ns = {}
  _run(recipes[0], ns, "train-state")
  with pytest.raises(ValueError, match=r"'delta'"):
    train_state.TrainState.create(
      apply_fn=ns["model"].apply, params=ns["variables"]["params"], tx=ns["tx"]
    )


def test_nnx_optimizer_recipe_trains_and_equals_the_plain_step(recipes, capsys):
  setup, loop = recipes[2:]
  ns = {}
  _run(setup, ns, "nnx-optimizer")
  model, tx, x, y = ns["model"], ns["tx"], ns["x"], ns["y"]
  start = nnx.clone(model)
  _run(loop, ns, "nnx-optimizer-loop")
  assert "nnx.Optimizer: loss" in capsys.readouterr().out
  assert int(ns["optimizer"].step[...]) == STEPS

  # It trains: D, the factors and the head move, the frozen base does not.
  assert float(jnp.linalg.norm(model.hidden.delta[...])) > 0
  for name in ("lora_a", "lora_b"):
    assert not np.array_equal(getattr(model.hidden, name)[...], getattr(start.hidden, name)[...])
  for name in ("kernel", "bias"):
    np.testing.assert_array_equal(
      getattr(model.hidden, name)[...], getattr(start.hidden, name)[...]
    )
  assert not np.array_equal(model.head.kernel[...], start.head.kernel[...])
  assert _mse(model, x, y) < 0.5 * _mse(start, x, y)

  # Exactly the library's own plain step on the model's parameters.
  graphdef, params, rest = nnx.split(start, nnx.Param, ...)

  @jax.jit
  def plain_step(params, opt_state):
    loss_fn = lambda p: jnp.mean((nnx.merge(graphdef, p, rest)(x) - y) ** 2)  # noqa: E731
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  with jax.numpy_dtype_promotion("standard"):
    for _ in range(STEPS):
      params, opt_state = plain_step(params, opt_state)
  chex.assert_trees_all_equal(
    nnx.to_pure_dict(nnx.state(model, nnx.Param)), nnx.to_pure_dict(params)
  )
