"""Stacked layers, as their authors wrote them: Linen ``nn.scan`` / ``nn.vmap``, NNX vmap + scan.

Each stack of ``LAYERS`` blocks is adapted without editing the model, then
checked against the pretrained model (same output), the merged model (the
gradient of ``D`` is ``ds`` times that of the merged kernel; same output),
an exported adapter attached to a fresh base (same output) and a few
training steps (lower loss, base unchanged). The three stacks share one
interface, :class:`LinenStack` or :class:`NNXStack`, so each property is one
test; each stack is built once, with its jitted functions (one compile each).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util

import deltalora_jax as dl

LAYERS, WIDTH, HIDDEN, HEADS, RANK = 3, 4, 8, 2, 2
ALPHA, DELTA_SCALING = 4.0, 0.5
STEPS, LEARNING_RATE = 5, 0.01
X = jax.random.normal(jax.random.key(0), (2, 3, WIDTH))  # [batch, sequence, width]
Y = jnp.sin(jnp.sum(X, axis=-1, keepdims=True))
# 'factored': the adapter computes x W + s (x A) B + ds x D, not the merged kernel's product, so
# comparing it with the merged model compares two computations.
OPTIONS = dict(
  rank=RANK, alpha=ALPHA, delta_scaling=DELTA_SCALING, exclude=["head"], evaluation="factored"
)
NAMES = ("kernel", "lora_a", "lora_b", "delta")


def mse(prediction):
  return jnp.mean((prediction - Y) ** 2)


def randomised(arrays: dict) -> dict:
  """``arrays`` with ``lora_b`` and ``delta`` drawn at random (``lora_a`` already is)."""
  rng = np.random.default_rng(3)  # NumPy: no compile for each shape
  return {
    key: jnp.asarray(0.3 * rng.standard_normal(value.shape), value.dtype)
    if key[-1] in ("lora_b", "delta")
    else value
    for key, value in arrays.items()
  }


# ----------------------------------------------------------------------- Linen


class LinenScanBlock(nn.Module):
  """A pre-norm transformer block, scanned: ``(carry, None) -> (carry, None)``."""

  @nn.compact
  def __call__(self, x, _):
    x = x + nn.MultiHeadDotProductAttention(HEADS, qkv_features=WIDTH, name="attn")(
      nn.LayerNorm(name="ln1")(x)
    )
    h = nn.relu(nn.Dense(HIDDEN, name="up")(nn.LayerNorm(name="ln2")(x)))
    return x + nn.Dense(WIDTH, name="down")(h), None


class LinenScan(nn.Module):
  @nn.compact
  def __call__(self, x):
    blocks = nn.scan(
      LinenScanBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS
    )
    x, _ = blocks(name="blocks")(x, None)
    return nn.Dense(1, name="head")(x)


class LinenMember(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(WIDTH, name="down")(nn.relu(nn.Dense(HIDDEN, name="up")(x)))


class LinenEnsemble(nn.Module):
  @nn.compact
  def __call__(self, x):
    members = nn.vmap(
      LinenMember,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      in_axes=None,
      axis_size=LAYERS,
    )
    return nn.Dense(1, name="head")(jnp.mean(members(name="members")(x), axis=0))


@functools.partial(jax.jit, static_argnums=0)
def linen_apply(model, variables):
  """``model.apply`` with every collection mutable: ``(output, variables out)``."""
  return model.apply(variables, X, mutable=True)


@functools.partial(jax.jit, static_argnums=0)
def linen_grad(model, variables):
  return jax.grad(lambda v: mse(model.apply(v, X)))(variables)


class LinenStack:
  """A Linen model and its pretrained variables, adapted, with its training step.

  ``initial`` holds the variables right after adapting (``B = D = 0``),
  ``perturbed`` the same with random ``B`` and ``D``; the methods take either.
  """

  def __init__(self, model: nn.Module):
    self.model = model
    self.pretrained = jax.jit(model.init)(jax.random.key(1), X)
    self.adapted, self.initial, _ = dl.adapt_linen(
      model, self.pretrained, X, key=jax.random.key(2), **OPTIONS
    )
    self.perturbed = self.with_arrays(self.initial, randomised(self.arrays(self.initial)))
    sgd = optax.sgd(LEARNING_RATE)
    self.tx = dl.delta_lora(LEARNING_RATE, layers=self.adapted, lora_optimizer=sgd)
    self.step = jax.jit(self._step)

  def _step(self, variables, opt_state):
    loss, grads = jax.value_and_grad(lambda v: mse(self.adapted.apply(v, X)))(variables)
    updates, opt_state = self.tx.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state, loss, grads

  def arrays(self, variables) -> dict:
    """``{(layer, name): array}``: each adapted layer's kernel, factors and ``D``."""
    flat = traverse_util.flatten_dict(variables["params"])
    flat.update(traverse_util.flatten_dict(variables["delta"]))
    layers = self.adapted.layers
    return {(p, name): flat[(*p.split("/"), name)] for p in layers for name in NAMES}

  def with_arrays(self, variables, arrays: dict) -> dict:
    flat = {c: traverse_util.flatten_dict(variables[c]) for c in ("params", "delta")}
    for (layer, name), value in arrays.items():
      flat["delta" if name == "delta" else "params"][(*layer.split("/"), name)] = value
    return {c: traverse_util.unflatten_dict(v) for c, v in flat.items()}

  def base_output(self):
    return linen_apply(self.model, self.pretrained)[0]

  def output(self, variables):
    return linen_apply(self.adapted, variables)[0]

  def merged_output(self, variables):
    model, merged = self.adapted.model, dl.merge(variables, self.adapted)
    assert jax.tree.structure(merged) == jax.tree.structure(self.pretrained)
    return linen_apply(model, merged)[0]

  def gradients(self, variables) -> tuple[dict, dict]:
    """``({layer: dL/dD}, {layer: dL/dW'})``, ``W'`` the merged model's kernel."""
    of_delta = traverse_util.flatten_dict(self.step(variables, self.tx.init(variables))[3]["delta"])
    model, merged = self.adapted.model, dl.merge(variables, self.adapted)
    of_kernel = traverse_util.flatten_dict(linen_grad(model, merged)["params"])
    paths = self.adapted.layers
    return (
      {p: of_delta[(*p.split("/"), "delta")] for p in paths},
      {p: of_kernel[(*p.split("/"), "kernel")] for p in paths},
    )

  def attached_output(self, variables):
    adapter = dl.export_adapter(variables, self.adapted)
    fresh = jax.tree.map(jnp.copy, self.pretrained)
    again, restored, _ = dl.attach_adapter_linen(self.model, fresh, adapter)
    return linen_apply(again, restored)[0]

  def train(self) -> tuple[list[float], dict, dict]:
    """``(losses, arrays before, arrays after)`` of ``STEPS`` steps from the adapted start."""
    variables, opt_state, losses = self.initial, self.tx.init(self.initial), []
    for _ in range(STEPS):
      variables, opt_state, loss, _ = self.step(variables, opt_state)
      losses.append(float(loss))
    return losses, self.arrays(self.initial), self.arrays(variables)

  def utilities(self, variables):
    layers = self.adapted.layers
    return dl.parameter_counts(variables, layers), dl.diagnostics(variables, layers)


# ------------------------------------------------------------------------- NNX


class NNXBlock(nnx.Module):
  def __init__(self, rngs):
    self.norm = nnx.LayerNorm(WIDTH, rngs=rngs)
    self.up = nnx.Linear(WIDTH, HIDDEN, rngs=rngs)
    self.down = nnx.Linear(HIDDEN, WIDTH, rngs=rngs)

  def __call__(self, x):
    return x + self.down(nnx.relu(self.up(self.norm(x))))


class NNXScan(nnx.Module):
  """Flax's "scan over layers": blocks created by ``nnx.vmap``, applied by ``nnx.scan``."""

  def __init__(self, rngs):
    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return NNXBlock(rngs)

    self.blocks = create(rngs)
    self.head = nnx.Linear(WIDTH, 1, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def forward(x, block):
      return block(x)

    return self.head(forward(x, self.blocks))


TRAINABLE = nnx.Any(nnx.LoRAParam, dl.DeltaParam)


@nnx.jit
def nnx_apply(model):
  return model(X)


@nnx.jit
def nnx_step(model, optimizer):
  loss, grads = nnx.value_and_grad(lambda m: mse(m(X)), argnums=nnx.DiffState(0, TRAINABLE))(model)
  optimizer.update(model, grads)
  return loss, grads


@nnx.jit
def nnx_kernel_grad(model):
  return nnx.grad(lambda m: mse(m(X)), argnums=nnx.DiffState(0, nnx.Param))(model)


def nnx_layers(model) -> dict:
  return dict(dl.adapted_layers(model))


class NNXStack:
  """The NNX model, adapted, with the interface of :class:`LinenStack`.

  ``initial`` and ``perturbed`` are adapted models, the second a clone with
  random ``B`` and ``D``.
  """

  def __init__(self):
    self.initial = NNXScan(nnx.Rngs(1))
    self.pretrained_output = nnx_apply(self.initial)
    dl.adapt_nnx(self.initial, rngs=nnx.Rngs(2), **OPTIONS)
    self.perturbed = nnx.clone(self.initial)
    self.with_arrays(self.perturbed, randomised(self.arrays(self.perturbed)))
    sgd = optax.sgd(LEARNING_RATE)
    self.tx = dl.delta_lora(LEARNING_RATE, layers=self.initial, lora_optimizer=sgd)

  def arrays(self, model) -> dict:
    layers = nnx_layers(model)
    return {(n, name): getattr(layers[n], name)[...] for n in layers for name in NAMES}

  def with_arrays(self, model, arrays: dict) -> None:
    layers = nnx_layers(model)
    for (layer, name), value in arrays.items():
      getattr(layers[layer], name)[...] = value

  def base_output(self):
    return self.pretrained_output

  def output(self, model):
    return nnx_apply(model)

  def merged_output(self, model):
    merged = dl.merge(model)
    with pytest.raises(ValueError, match="has no adapted layer"):
      dl.adapted_layers(merged)
    return nnx_apply(merged)

  def train_steps(self, model, steps: int):
    optimizer = nnx.Optimizer(model, self.tx, wrt=TRAINABLE)  # one tx: one compile
    return [nnx_step(model, optimizer) for _ in range(steps)]

  def gradients(self, model) -> tuple[dict, dict]:
    grads = nnx.to_flat_state(self.train_steps(nnx.clone(model), 1)[0][1])
    of_kernel = nnx.to_flat_state(nnx_kernel_grad(dl.merge(model)))
    of_delta = {dl.paths.name(p[:-1]): v[...] for p, v in grads if p[-1] == "delta"}
    of_kernel = {dl.paths.name(p[:-1]): v[...] for p, v in of_kernel if p[-1] == "kernel"}
    return of_delta, {name: of_kernel[name] for name in of_delta}

  def attached_output(self, model):
    fresh = NNXScan(nnx.Rngs(1))
    dl.attach_adapter_nnx(fresh, dl.export_adapter(model))
    return nnx_apply(fresh)

  def train(self) -> tuple[list[float], dict, dict]:
    model = nnx.clone(self.initial)
    losses = [float(loss) for loss, _ in self.train_steps(model, STEPS)]
    return losses, self.arrays(self.initial), self.arrays(model)

  def utilities(self, model):
    return dl.parameter_counts(model), dl.diagnostics(model)


# ----------------------------------------------------------------------- tests

ATTENTION = ["blocks/attn/key", "blocks/attn/out", "blocks/attn/query", "blocks/attn/value"]
LINEN_LAYERS = {
  "linen_scan": [*ATTENTION, "blocks/down", "blocks/up"],
  "linen_vmap": ["members/down", "members/up"],
}
EXPECTED_LAYERS = LINEN_LAYERS | {"nnx_scan": ["blocks/down", "blocks/up"]}


@functools.cache
def make_stack(name: str):
  """One adapted stack per name, shared by the fixtures below."""
  if name == "nnx_scan":
    case = NNXStack()
  else:
    case = LinenStack({"linen_scan": LinenScan(), "linen_vmap": LinenEnsemble()}[name])
  case.expected_layers = EXPECTED_LAYERS[name]
  return case


@pytest.fixture(scope="module", params=sorted(EXPECTED_LAYERS))
def stack(request):
  return make_stack(request.param)


@pytest.fixture(scope="module", params=sorted(LINEN_LAYERS))
def linen_stack(request):
  return make_stack(request.param)


def relative_error(a, b) -> float:
  a, b = np.asarray(a), np.asarray(b)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_adapter_arrays_have_the_stack_axis(stack):
  arrays = stack.arrays(stack.initial)
  assert sorted({layer for layer, _ in arrays}) == stack.expected_layers
  for (layer, name), value in arrays.items():
    assert value.shape[0] == LAYERS, (layer, name, value.shape)
    assert value.dtype == jnp.float32
    if name == "delta":
      assert value.shape == arrays[(layer, "kernel")].shape
    if name in ("lora_b", "delta"):
      np.testing.assert_array_equal(value, 0.0)
  # each layer of the stack draws its own A
  lora_a = np.asarray(arrays[(stack.expected_layers[-1], "lora_a")])
  assert np.abs(lora_a[0] - lora_a[1]).max() > 0


def test_output_right_after_adapting_equals_the_pretrained_model(stack):
  np.testing.assert_array_equal(stack.output(stack.initial), stack.base_output())


def test_delta_gradient_is_delta_scaling_times_the_merged_kernel_gradient(stack):
  of_delta, of_kernel = stack.gradients(stack.perturbed)
  assert sorted(of_delta) == stack.expected_layers
  for name, gradient in of_delta.items():
    assert gradient.shape == of_kernel[name].shape and gradient.shape[0] == LAYERS
    gradient, of_kernel_ = np.asarray(gradient), np.asarray(of_kernel[name])
    assert np.abs(gradient).max() > 0, name
    scale = np.abs(of_kernel_).max()
    np.testing.assert_allclose(
      gradient, DELTA_SCALING * of_kernel_, rtol=1e-4, atol=1e-5 * scale, err_msg=name
    )


def test_merged_equals_unmerged_per_layer_of_the_stack(stack):
  output = stack.output(stack.perturbed)
  assert relative_error(output, stack.base_output()) > 1e-2  # B and D count
  assert relative_error(stack.merged_output(stack.perturbed), output) < 1e-5


def test_export_and_attach_on_a_fresh_base_reproduce_the_outputs(stack):
  np.testing.assert_array_equal(
    stack.attached_output(stack.perturbed), stack.output(stack.perturbed)
  )


def test_training_lowers_the_loss_and_keeps_the_base_kernels(stack):
  losses, before, after = stack.train()
  assert losses[-1] < losses[0], losses
  for key, value in before.items():
    if key[1] == "kernel":
      np.testing.assert_array_equal(after[key], value, err_msg=str(key))
    elif key[1] == "delta":
      assert np.abs(np.asarray(after[key])).max() > 0, key


def test_counts_and_diagnostics_cover_every_layer_of_the_stack(stack):
  counts, report = stack.utilities(stack.perturbed)
  arrays = stack.arrays(stack.perturbed)
  up = stack.expected_layers[-1]  # '.../up' sorts last
  assert counts[up] == LAYERS * (RANK * (WIDTH + HIDDEN) + WIDTH * HIDDEN)
  assert counts["total"] == sum(v.size for (_, name), v in arrays.items() if name != "kernel")
  entry = report["layers"][up]
  assert entry["kernel_shape"] == [LAYERS, WIDTH, HIDDEN]
  assert (entry["in_features"], entry["out_features"]) == (WIDTH, HIDDEN)
  np.testing.assert_allclose(
    entry["delta_norm"], np.linalg.norm(np.asarray(arrays[(up, "delta")])), rtol=1e-6
  )


def test_linen_stack_keeps_delta_in_its_collection_when_mutable_initialised_or_adapted_again(
  linen_stack,
):
  stack = linen_stack
  _, state = linen_apply(stack.adapted, stack.perturbed)  # every collection mutable
  assert jax.tree.structure(state) == jax.tree.structure(stack.perturbed)  # D back in 'delta'
  jax.tree.map(np.testing.assert_array_equal, state, stack.perturbed)
  only_params = jax.eval_shape(lambda v: stack.adapted.apply(v, X, mutable=["params"]), state)[1]
  assert jax.tree.structure(only_params["params"]) == jax.tree.structure(state["params"])
  initialised = jax.eval_shape(stack.adapted.init, jax.random.key(0), X)
  assert jax.tree.map(jnp.shape, initialised) == jax.tree.map(jnp.shape, stack.initial)
  with pytest.raises(ValueError, match="needs the 'delta' collection"):
    stack.adapted.apply({"params": stack.perturbed["params"]}, X)
  more, variables, _ = dl.adapt_linen(
    stack.adapted, stack.perturbed, X, targets=["head"], rank=1, key=jax.random.key(4)
  )
  assert sorted(more.layers) == sorted([*stack.expected_layers, "head"])
  assert jax.tree.map(jnp.shape, variables["delta"]) == {
    **jax.tree.map(jnp.shape, stack.perturbed["delta"]),
    "head": {"delta": (WIDTH, 1)},
  }
  assert jax.eval_shape(more.apply, variables, X).shape == Y.shape
