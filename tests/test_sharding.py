"""Sharded training on 8 simulated CPU devices: rules, optimizer state, equality, memory."""

import _training as training
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import deltalora_jax as dl

STEPS = 3


def state_shardings(mesh, rules=None):
  """Shardings of the whole training state of ``_training``: variables, optimizer state, rest."""
  abstract = jax.eval_shape(training.init_state)
  variables = dl.variable_shardings(abstract["variables"], mesh, rules)
  replicated = NamedSharding(mesh, P())
  return {
    "variables": variables,
    "opt_state": dl.optimizer_shardings(training.TX, abstract["variables"], variables),
    "rng": replicated,
    "data_position": replicated,
    "step": replicated,
  }


def sharded_step(mesh, shardings):
  batch = dl.batch_sharding(mesh)
  return jax.jit(
    training.train_step,
    in_shardings=(shardings, batch, batch),
    out_shardings=(shardings, NamedSharding(mesh, P())),
  )


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8, "conftest.py must set 8 simulated CPU devices"
  return dl.make_mesh(data=2, fsdp=4)


@pytest.fixture(scope="module")
def shardings(mesh):
  return state_shardings(mesh)


def test_default_rules_split_the_large_matrices_over_fsdp(shardings):
  variables = shardings["variables"]
  for layer in ("hidden", "out"):
    params = variables["params"][layer]
    assert params["kernel"].spec == P("fsdp", None)
    assert params["lora_a"].spec == P("fsdp", None)
    assert params["lora_b"].spec == P(None, "fsdp")
    assert params["bias"].spec == P()
    assert variables["delta"][layer]["delta"].spec == P("fsdp", None)


def test_default_rules_match_an_nnx_state_too(mesh):
  # NNX paths hold a '.value' step inside each Variable; the rules must not see it.
  from flax import nnx

  layer = dl.DeltaLoRALinear(8, 8, rank=4, rngs=nnx.Rngs(0))
  specs = dl.partition_specs(nnx.state(layer), mesh)
  assert specs["kernel"].get_value() == P("fsdp", None)
  assert specs["delta"].get_value() == P("fsdp", None)
  assert specs["lora_b"].get_value() == P(None, "fsdp")


def test_optimizer_state_follows_the_variables(shardings):
  variables, opt_state = shardings["variables"], shardings["opt_state"]
  velocity = dl.velocity(opt_state)["delta"]
  for layer in ("hidden", "out"):
    assert velocity[layer]["delta"] == variables["delta"][layer]["delta"]
  lora_trace = optax.tree_utils.tree_get(opt_state, "lora").inner_state[0].trace["params"]
  for layer in ("hidden", "out"):
    for name in ("lora_a", "lora_b"):
      assert lora_trace[layer][name] == variables["params"][layer][name]
  counts = [s for p, s in optax.tree_utils.tree_get_all_with_path(opt_state, "count")]
  counts.append(opt_state.notfinite_count)
  assert counts and all(s.spec == P() for s in counts)


def test_sharded_run_equals_single_device_run(mesh, shardings):
  single = training.train(training.init_state(), STEPS)
  init = jax.jit(training.fresh_state, out_shardings=shardings)
  state = init(jnp.int32(0))
  step = sharded_step(mesh, shardings)
  batch = dl.batch_sharding(mesh)
  for _ in range(STEPS):
    x, y = jax.device_put(training.batch(state["data_position"]), batch)
    state, _ = step(state, x, y)
  delta = state["variables"]["delta"]["hidden"]["delta"]
  assert delta.sharding == shardings["variables"]["delta"]["hidden"]["delta"]
  assert {s.data.shape for s in delta.addressable_shards} == {(training.IN // 4, training.HIDDEN)}
  assert float(jnp.max(jnp.abs(delta))) > 0
  assert jax.tree.structure(state) == jax.tree.structure(single)
  pairs = zip(training.numpy_leaves(state), training.numpy_leaves(single), strict=True)
  for got, want in pairs:
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("fsdp", [1, 2, 4, 8])
def test_bytes_of_delta_and_velocity_per_device_shrink_with_shards(fsdp):
  mesh = dl.make_mesh(fsdp=fsdp)
  state = jax.device_put(training.init_state(), state_shardings(mesh))
  delta = state["variables"]["delta"]
  velocity = dl.velocity(state["opt_state"])["delta"]
  total = training.IN * training.HIDDEN * 4 + training.HIDDEN * training.OUT * 4
  for tree in (delta, velocity):
    per_device = dl.bytes_per_device(tree)
    assert sorted(per_device) == sorted(d.id for d in jax.devices())
    assert set(per_device.values()) == {total // fsdp}


def test_user_rules_and_followed_state(mesh):
  rules = [(r"delta$", P(None, "fsdp")), (r"lora_b$", P(None, ("data", "fsdp")))]
  shardings = state_shardings(mesh, rules)
  d = shardings["variables"]["delta"]["out"]["delta"]
  assert d.spec == P(None, "fsdp")
  assert dl.velocity(shardings["opt_state"])["delta"]["out"]["delta"] == d
  assert shardings["variables"]["params"]["hidden"]["kernel"].spec == P()
  assert shardings["variables"]["params"]["hidden"]["lora_b"].spec == P(None, ("data", "fsdp"))
  # An axis that does not divide a dimension is dropped (that dimension is replicated):
  assert shardings["variables"]["params"]["out"]["lora_b"].spec == P(None, ("data", "fsdp"))
  odd = dl.partition_specs({"kernel": jnp.zeros((6, 8))}, mesh)
  assert odd["kernel"] == P(None, None)


@pytest.mark.parametrize(
  ("rules", "error", "match"),
  [
    ([(r"kernel", P("model", None))], ValueError, "mesh axis 'model'"),
    ([(r"bias", P("fsdp", None))], ValueError, "bias.*2 axes.*shape \\(32,\\)"),
    ([(r"kernel", ("fsdp", None))], TypeError, "rules must be"),
  ],
)
def test_bad_rules_are_refused(mesh, rules, error, match):
  abstract = jax.eval_shape(training.init_state)["variables"]
  with pytest.raises(error, match=match):
    dl.variable_shardings(abstract, mesh, rules)


def test_batch_sharding_and_mesh_checks(mesh):
  assert dl.batch_sharding(mesh).spec == P(("data", "fsdp"))
  assert dl.batch_sharding(mesh, "data").spec == P(("data",))
  with pytest.raises(ValueError, match="axes must be axes of the mesh"):
    dl.batch_sharding(mesh, "model")
  with pytest.raises(ValueError, match="fsdp must divide the number of devices 8, got fsdp=3"):
    dl.make_mesh(fsdp=3)
  with pytest.raises(ValueError, match="data \\* fsdp must equal"):
    dl.make_mesh(data=2, fsdp=2)
  with pytest.raises(ValueError, match="fsdp must be a positive int"):
    dl.make_mesh(fsdp=0)
  with pytest.raises(ValueError, match="one NamedSharding per leaf"):
    dl.follow_shardings({}, {"a": jnp.zeros(2)}, {})
