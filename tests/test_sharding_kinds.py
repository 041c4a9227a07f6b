"""The default sharding follows each layer kind's kernel: specs, sharded training, memory.

On 8 simulated CPU devices: attention projections, conv, einsum and stacked
kernels get specs that split an input axis of the kernel (never a stack's layer
axis), ``D`` gets exactly its kernel's spec, and sharded training of Flax's own
attention (Linen and NNX) and of an NNX stack equals the single-device run.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import deltalora_jax as dl
from deltalora_jax.projections import Conv, Einsum, GeneralDense

F = "fsdp"
RANK = 2
STEPS = 3
D_MODEL, HEADS, BATCH, LENGTH = 16, 2, 8, 4
FSDP = 4  # the training mesh: data=2 x fsdp=4


def adapted_layer(projection, kernel, stack=()):
  """One adapted layer's leaves (shapes only), NNX-style: ``D`` beside the kernel."""
  a, b = projection.factor_shapes(kernel, RANK)
  shaped = lambda shape: jax.ShapeDtypeStruct((*stack, *shape), jnp.float32)  # noqa: E731
  return {
    "kernel": shaped(kernel),
    "delta": shaped(kernel),
    "lora_a": shaped(a),
    "lora_b": shaped(b),
    "bias": shaped(projection.bias_shape(kernel)),
  }


QUERY = GeneralDense(features=(2, 4))
OUT = GeneralDense(features=(8,), axis=(-2, -1))
BATCHED = Einsum("bnd,ndh->bnh", (4, 3, 3))
OUTPUT_FIRST = Einsum("btd,hd->bth", (4, 6))

# (projection, kernel, stack, kernel spec, A spec, B spec, specs without `layers` if they differ)
CASES = {
  "attention q/k/v [d, heads, head_dim]": (
    QUERY, (8, 2, 4), (), P(F, None, None), P(F, None), P(None, None, F), None,
  ),
  "attention out [heads, head_dim, d]": (
    OUT, (2, 4, 8), (), P(None, F, None), P(None, F, None), P(None, F), None,
  ),
  "conv [*window, in, out]: in, not the window": (
    Conv(8, (3, 3)), (3, 3, 4, 8), (), P(None, None, F, None), P(None, None, F, None),
    P(None, F), None,
  ),
  "conv whose in does not divide: the window": (
    Conv(8, (4, 4)), (4, 4, 3, 8), (), P(None, F, None, None), P(None, F, None, None),
    P(None, F), None,
  ),
  "einsum btd,dnh->btnh": (
    Einsum("btd,dnh->btnh", (8, 2, 4)), (8, 2, 4), (), P(F, None, None), P(F, None),
    P(None, None, F), None,
  ),
  "einsum with a batch axis, from its letters": (
    BATCHED, (4, 3, 3), (), P(F, None, None), P(F, None, None), P(F, None, None),
    # from shapes alone a leading shared axis may be a stack's: not split
    (P(None, None, None), P(None, None, None), P(None, None, None)),
  ),
  "einsum listing its output axis first": (
    OUTPUT_FIRST, (4, 6), (), P(None, F), P(F, None), P(None, F),
    (P(F, None), P(F, None), P(None, F)),  # shapes alone: split as a Dense's
  ),
  "stacked dense [layers, in, out]": (
    GeneralDense(features=(8,)), (8, 8), (4,), P(None, F, None), P(None, F, None),
    P(None, None, F), None,
  ),
  "stacked conv": (
    Conv(8, (3,)), (3, 4, 8), (2,), P(None, None, F, None), P(None, None, F, None),
    P(None, None, F), None,
  ),
  "stacked, in does not divide: layer axis still whole": (
    GeneralDense(features=(6,)), (3, 6), (4,), P(None, None, None), P(None, None, None),
    P(None, None, F), None,
  ),
}  # fmt: skip


@pytest.fixture(scope="module")
def spec_mesh():
  assert jax.device_count() == 8, "conftest.py must set 8 simulated CPU devices"
  return dl.make_mesh(data=4, fsdp=2)


@pytest.fixture(scope="module")
def mesh():
  return dl.make_mesh(data=2, fsdp=FSDP)


@pytest.mark.parametrize("case", list(CASES))
def test_default_specs_follow_the_kernel_layout(spec_mesh, case):
  projection, kernel, stack, want_kernel, want_a, want_b, from_shapes = CASES[case]
  tree = {"block": {"layer": adapted_layer(projection, kernel, stack)}}
  with_layers = dl.partition_specs(tree, spec_mesh, layers={"block/layer": projection})
  without = dl.partition_specs(tree, spec_mesh)
  for specs, want in ((with_layers, (want_kernel, want_a, want_b)), (without, from_shapes)):
    want = want or (want_kernel, want_a, want_b)
    got = specs["block"]["layer"]
    assert (got["kernel"], got["lora_a"], got["lora_b"]) == want
    assert got["delta"] == got["kernel"]
    assert got["bias"] == P()


def test_layers_that_do_not_fit_are_refused(spec_mesh):
  tree = {"layer": adapted_layer(QUERY, (8, 2, 4))}
  with pytest.raises(ValueError, match=r"'layer'.*does not fit its kernel \(8, 2, 4\)"):
    dl.partition_specs(tree, spec_mesh, layers={"layer": OUT})
  with pytest.raises(TypeError, match=r"layers must map paths to layers with a \.projection"):
    dl.partition_specs(tree, spec_mesh, layers={"layer": "dense"})
  with pytest.raises(ValueError, match="layers is read by the default"):
    dl.partition_specs(tree, spec_mesh, [("kernel", P())], layers={"layer": QUERY})
  with pytest.raises(ValueError, match="mesh axis 'fsdp'; the mesh has axes \\('data',\\)"):
    dl.partition_specs(tree, jax.make_mesh((8,), ("data",)))


# --------------------------------------------------------------------------
# Flax's own attention and an nn.scan stack, adapted with adapt_linen.
# --------------------------------------------------------------------------


class Block(nn.Module):
  """Flax's attention as it is, then a plain head."""

  @nn.compact
  def __call__(self, x):
    attention = nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attn")
    x = x + attention(x)
    return nn.Dense(1, name="head")(x.mean(axis=1))


class ScanLayer(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return jnp.tanh(nn.Dense(D_MODEL, name="dense")(x)), None


class Stack(nn.Module):
  @nn.compact
  def __call__(self, x):
    scan = nn.scan(ScanLayer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    return scan(name="layers")(x, None)[0]


def data():
  kx, ky = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (BATCH, LENGTH, D_MODEL))
  y = jnp.sin(x.sum(axis=(1, 2)))[:, None] + 0.1 * jax.random.normal(ky, (BATCH, 1))
  return x, y


def make_tx(layers):
  return dl.delta_lora(0.05, 0.9, layers=layers, lora_optimizer=optax.sgd(0.1, momentum=0.5))


def train(apply, variables, layers, shardings=None, mesh=None):
  """``STEPS`` steps of Delta-LoRA; sharded when ``shardings`` is given, else on one device."""
  tx = make_tx(layers)

  def step(variables, opt_state, x, y):
    loss = lambda v: jnp.mean((apply(v, x) - y) ** 2)  # noqa: E731
    grads = jax.grad(loss)(variables)
    updates, opt_state = tx.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state

  x, y = data()
  if shardings is None:
    opt_state, jitted = tx.init(variables), jax.jit(step)
  else:
    opt = dl.optimizer_shardings(tx, variables, shardings)
    batch = dl.batch_sharding(mesh)
    variables = jax.device_put(variables, shardings)
    opt_state = jax.jit(tx.init, out_shardings=opt)(variables)
    x, y = jax.device_put((x, y), batch)
    jitted = jax.jit(
      step, in_shardings=(shardings, opt, batch, batch), out_shardings=(shardings, opt)
    )
  for _ in range(STEPS):
    variables, opt_state = jitted(variables, opt_state, x, y)
  return variables, opt_state


def assert_same_run(sharded, single):
  assert jax.tree.structure(sharded) == jax.tree.structure(single)
  for got, want in zip(jax.tree.leaves(sharded), jax.tree.leaves(single), strict=True):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=1e-6)


def assert_delta_split_by_fsdp(deltas):
  """Every ``D`` is sharded (and non-zero after training), each device holding total / fsdp."""
  leaves = jax.tree.leaves(deltas)
  assert leaves and all(float(jnp.max(jnp.abs(d))) > 0 for d in leaves)
  total = sum(d.nbytes for d in leaves)
  assert set(dl.bytes_per_device(deltas).values()) == {total // FSDP}


@pytest.fixture(scope="module")
def linen_block():
  x, _ = data()
  model = Block()
  pretrained = model.init(jax.random.key(1), x)
  adapted, variables, _ = dl.adapt_linen(
    model, pretrained, x, targets=r"attn/.*", rank=RANK, key=jax.random.key(2)
  )
  return adapted, variables


def test_linen_attention_and_scan_stack_specs(mesh, linen_block):
  adapted, variables = linen_block
  specs = dl.partition_specs(variables, mesh, layers=adapted.layers)
  params = specs["params"]["attn"]
  for name in ("query", "key", "value"):  # kernel [d, heads, head_dim]: split d
    assert params[name]["kernel"] == P(F, None, None)
    assert params[name]["lora_a"] == P(F, None)
    assert params[name]["lora_b"] == P(None, None, F)  # [r, heads, head_dim=8]
  assert params["out"]["kernel"] == P(None, F, None)  # [heads, head_dim, d]: split head_dim
  assert params["out"]["lora_a"] == P(None, F, None)
  assert params["out"]["lora_b"] == P(None, F)
  for name in ("query", "key", "value", "out"):
    assert specs["delta"]["attn"][name]["delta"] == params[name]["kernel"]
  assert dl.partition_specs(variables, mesh) == specs  # the shapes tell these layouts

  x = jnp.zeros((2, D_MODEL))
  stack = Stack()
  stacked, stack_variables, _ = dl.adapt_linen(
    stack, stack.init(jax.random.key(0), x), x, rank=RANK, key=jax.random.key(1)
  )
  specs = dl.partition_specs(stack_variables, mesh, layers=stacked.layers)
  dense = specs["params"]["layers"]["dense"]
  assert dense["kernel"] == P(None, F, None)  # [layers, in, out]: the layer axis stays whole
  assert dense["lora_a"] == P(None, F, None)
  assert dense["lora_b"] == P(None, None, F)
  assert specs["delta"]["layers"]["dense"]["delta"] == dense["kernel"]


def test_sharded_linen_attention_equals_single_device(mesh, linen_block):
  adapted, variables = linen_block
  shardings = dl.variable_shardings(variables, mesh, layers=adapted.layers)
  single = train(adapted.apply, variables, adapted)
  sharded = train(adapted.apply, variables, adapted, shardings, mesh)
  assert_same_run(sharded, single)
  trained = sharded[0]
  query = trained["params"]["attn"]["query"]["kernel"]
  assert trained["delta"]["attn"]["query"]["delta"].sharding.spec == query.sharding.spec
  assert_delta_split_by_fsdp(trained["delta"])


# --------------------------------------------------------------------------
# NNX: nnx.MultiHeadAttention and an nnx.vmap stack, adapted with adapt_nnx.
# --------------------------------------------------------------------------


class NNXBlock(nnx.Module):
  def __init__(self, rngs):
    self.attn = nnx.MultiHeadAttention(HEADS, D_MODEL, decode=False, rngs=rngs)
    self.head = nnx.Linear(D_MODEL, 1, rngs=rngs)

  def __call__(self, x):
    return self.head((x + self.attn(x)).mean(axis=1))


class NNXStack(nnx.Module):
  def __init__(self, rngs):
    @nnx.split_rngs(splits=4)
    @nnx.vmap(in_axes=0, out_axes=0)
    def layers(rngs):
      return nnx.Linear(D_MODEL, D_MODEL, rngs=rngs)

    self.layers = layers(rngs)
    self.head = nnx.Linear(D_MODEL, 1, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def body(layer, x):
      return jnp.tanh(layer(x))

    return self.head(body(self.layers, x).mean(axis=1))


@pytest.mark.parametrize(
  ("build", "targets", "specs"),
  [
    (NNXBlock, r"attn/.*", {"attn/query": P(F, None, None), "attn/out": P(None, F, None)}),
    (NNXStack, ["layers"], {"layers": P(None, F, None)}),  # the layer axis stays whole
  ],
)
def test_sharded_nnx_equals_single_device(mesh, build, targets, specs):
  model = build(nnx.Rngs(1))
  dl.adapt_nnx(model, targets, rank=RANK, rngs=nnx.Rngs(2))
  graphdef, state = nnx.split(model)
  shardings = dl.variable_shardings(state, mesh, layers=model)
  for path, spec in specs.items():
    layer = shardings
    for name in path.split("/"):
      layer = layer[name]
    assert layer["kernel"].get_value().spec == spec
    assert layer["delta"].get_value().spec == spec
  apply = lambda state, x: nnx.merge(graphdef, state)(x)  # noqa: E731
  single = train(apply, state, model)
  sharded = train(apply, state, model, shardings, mesh)
  assert_same_run(sharded, single)
  assert_delta_split_by_fsdp(nnx.state(nnx.merge(graphdef, sharded[0]), dl.DeltaParam))


def test_optimizer_state_follows_the_kind_aware_specs(mesh, linen_block):
  adapted, variables = linen_block
  shardings = dl.variable_shardings(variables, mesh, layers=adapted.layers)
  state = dl.optimizer_shardings(make_tx(adapted), variables, shardings)
  velocity = dl.velocity(state)["delta"]["attn"]
  for name in ("query", "out"):
    assert velocity[name]["delta"] == shardings["delta"]["attn"][name]["delta"]
  assert isinstance(velocity["out"]["delta"], NamedSharding)
