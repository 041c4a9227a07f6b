"""An int8 weight-only frozen base, one float32 scale per output channel.

The base is quantized by abs-max per output channel, rounded to nearest
(``|W - s q| <= s / 2``, checked per channel in closed form); the adapted
layer equals a float64 reference computed from the dequantized kernel
(factored: the scales multiply the product's output; merged: the float32
merged kernel); the int8 values and scales stay bit-identical while plain
LoRA, the seed rule and the telescoped paper rule train, Linen and NNX;
merge gives a float32 kernel whose model equals the adapted one; the
in-place paper rule, a trained base and unknown quantizations are refused
by name.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import deltalora_jax as dl
from deltalora_jax import core
from deltalora_jax.projections import Conv, Einsum, GeneralDense

IN, OUT, R, ROWS = 6, 5, 2, 4
EINSUM = Einsum("btd,ndh->btnh", (2, IN, 3))  # kernel [n, d, h]: channels (n, h)
_rng = np.random.default_rng(0)
X = _rng.standard_normal((ROWS, IN)).astype(np.float32)
Y = _rng.standard_normal((ROWS, OUT)).astype(np.float32)
STEPS = 5


@pytest.mark.parametrize(
  ("projection", "shape", "scale_shape"),
  [
    (None, (IN, OUT), (OUT,)),
    (GeneralDense(features=(2, 3)), (IN, 2, 3), (2, 3)),
    (EINSUM, (2, IN, 3), (2, 3)),
    (Conv(features=4, kernel_size=(3,)), (3, IN, 4), (4,)),
    (GeneralDense(features=(OUT,)), (3, IN, OUT), (3, OUT)),  # a stack: each its own scales
  ],
  ids=["dense", "dense_general", "einsum", "conv", "stack"],
)
def test_quantize_error_is_at_most_half_a_step_per_channel(projection, shape, scale_shape):
  """Closed form: s_j = max_i |W_ij| / 127, |W_ij - s_j q_ij| <= s_j / 2, |q| <= 127."""
  w = jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)
  values, scale = core.quantize_int8(w, projection)
  assert values.dtype == jnp.int8 and scale.dtype == jnp.float32
  assert scale.shape == scale_shape
  per_weight = np.asarray(core.dequantize(jnp.ones(shape, jnp.int8), scale, projection))
  dequantized = np.asarray(core.dequantize(values, scale, projection), np.float64)
  error = np.abs(np.asarray(w, np.float64) - dequantized)
  assert np.all(error <= per_weight / 2 * (1 + 1e-6))
  # each channel's largest weight maps to +-127: s_j = max_i |W_ij| / 127
  magnitude = np.abs(np.asarray(w, np.float64))
  np.testing.assert_allclose(
    np.abs(dequantized)[magnitude == magnitude.max()], magnitude.max(), rtol=1e-6
  )
  assert int(jnp.abs(values.astype(jnp.int32)).max()) == 127
  assert int(jnp.max(jnp.abs(values.astype(jnp.int32)))) == 127


def test_an_all_zero_channel_has_zero_scale_and_zero_values():
  w = jnp.zeros((IN, OUT), jnp.float32).at[:, 1].set(1.0)
  values, scale = core.quantize_int8(w)
  np.testing.assert_allclose(scale, np.eye(OUT)[1] / 127, rtol=1e-7, atol=0)
  np.testing.assert_array_equal(values, np.asarray(w, np.int8) * 127)


def reference(x, w, bias, a, b, delta, s, ds, kind):
  """The layer in float64, from the dequantized kernel: P(x, W) + b + s P(x, A B) + ds P(x, D)."""
  f64 = lambda t: jnp.asarray(t, jnp.float64)  # noqa: E731
  kernel = f64(w) + s * kind.lora_kernel(f64(a), f64(b))
  if delta is not None:
    kernel = kernel + ds * f64(delta)
  y = kind.apply(f64(x), kernel)
  return y if bias is None else kind.add_bias(y, f64(bias))


@pytest.mark.parametrize("evaluation", ["factored", "merged"])
@pytest.mark.parametrize("kind", ["dense", "einsum", "conv"])
def test_adapted_output_equals_float64_reference_on_the_dequantized_kernel(kind, evaluation):
  rng = np.random.default_rng(2)
  projection, x_shape = {
    "dense": (GeneralDense(features=(OUT,)), (ROWS, IN)),
    "einsum": (EINSUM, (ROWS, 3, IN)),
    "conv": (Conv(features=4, kernel_size=(3,)), (ROWS, 7, IN)),
  }[kind]
  shape = projection.kernel_shape(x_shape)
  w = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  values, scale = core.quantize_int8(w, projection)
  a_shape, b_shape = projection.factor_shapes(shape, R)
  a, b = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (a_shape, b_shape))
  bias = jnp.asarray(rng.standard_normal(projection.bias_shape(shape)), jnp.float32)
  delta = jnp.asarray(0.1 * rng.standard_normal(shape), jnp.float32)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  y = core.delta_lora_apply(
    x,
    values,
    bias,
    a,
    b,
    delta,
    scaling=1.5,
    delta_scaling=0.5,
    projection=projection,
    evaluation=evaluation,
    kernel_scale=scale,
    precision=jax.lax.Precision.HIGHEST,
  )
  assert y.dtype == jnp.float32
  with jax.enable_x64(True):
    dequantized = core.dequantize(values, scale.astype(jnp.float64), projection)
    expected = reference(x, dequantized, bias, a, b, delta, 1.5, 0.5, projection)
    np.testing.assert_allclose(y, expected, rtol=2e-6, atol=2e-6)


# --------------------------------------------------------------------------
# Training: the base stays bit-identical; merge equals the forward.
# --------------------------------------------------------------------------

RULES = {  # layer options of each rule
  "lora": {"use_delta": False},
  "seed": {"use_delta": True},
  "paper": {"use_delta": False, "paper_lambda": 2.0},
}


class MLP(nn.Module):
  """A plain two-layer model, adapted and quantized by adapt_linen."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(OUT, name="down")(nn.tanh(nn.Dense(8, name="up")(x)))


def linen_optimizer(rule, adapted):
  lora = optax.sgd(0.1)
  if rule == "seed":
    return dl.delta_lora(0.05, 0.9, layers=adapted, lora_optimizer=lora)
  if rule == "paper":
    return dl.paper_delta_lora(lora_optimizer=lora, layers=adapted, start_step=1)
  labels = lambda tree: jax.tree.map(str, dl.leaf_labels(tree))  # noqa: E731
  return optax.multi_transform({"lora": lora, "base": optax.set_to_zero()}, labels)


@pytest.mark.parametrize("rule", list(RULES))
def test_linen_training_leaves_the_int8_base_bit_identical_and_merge_equals_forward(rule):
  x, y = jnp.asarray(X), jnp.asarray(Y)
  variables = MLP().init(jax.random.key(0), x)
  adapted, variables, report = dl.adapt_linen(
    MLP(), variables, x, rank=R, key=jax.random.key(1), base_quantization="int8", **RULES[rule]
  )
  assert {e["base_quantization"] for e in report["layers"].values()} == {"int8"}
  quantized = variables.pop("quantized")
  assert jax.tree.map(lambda a: str(a.dtype), quantized["up"]) == {
    "kernel": "int8",
    "kernel_scale": "float32",
  }
  assert "kernel" not in variables["params"]["up"]
  tx = linen_optimizer(rule, adapted)
  opt_state = tx.init(variables)

  @jax.jit
  def step(trainable, opt_state):
    loss = lambda v: jnp.mean((adapted.apply({**v, "quantized": quantized}, x) - y) ** 2)  # noqa: E731
    value, grads = jax.value_and_grad(loss)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, value

  trainable = variables
  losses = []
  for _ in range(STEPS):
    trainable, opt_state, value = step(trainable, opt_state)
    losses.append(float(value))
  assert losses[-1] < losses[0]
  whole = {**trainable, "quantized": quantized}
  if rule == "seed":
    assert float(jnp.abs(trainable["delta"]["up"]["delta"]).max()) > 0
  if rule == "paper":  # the snapshot stopped at K = 1 while the factors moved on
    moved = trainable["params"]["up"]["lora_b"] - trainable["snapshot"]["up"]["snapshot_b"]
    assert float(jnp.abs(moved).max()) > 0
  # the base, read only: the same int8 values and scales, bit for bit
  after = dl.tree.layer_arrays(whole, adapted)
  for name in ("up", "down"):
    np.testing.assert_array_equal(after[name][1]["kernel"], quantized[name]["kernel"])
    np.testing.assert_array_equal(after[name][1]["kernel_scale"], quantized[name]["kernel_scale"])
  merged = dl.merge(whole, adapted)
  assert "quantized" not in merged
  assert merged["params"]["up"]["kernel"].dtype == jnp.float32
  np.testing.assert_allclose(MLP().apply(merged, x), adapted.apply(whole, x), rtol=0, atol=2e-6)


class NNXMLP(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(IN, 8, rngs=rngs)
    self.down = nnx.Einsum("bd,dn->bn", (8, OUT), (OUT,), rngs=rngs)

  def __call__(self, x):
    return self.down(nnx.tanh(self.up(x)))


@pytest.mark.parametrize("rule", list(RULES))
def test_nnx_training_leaves_the_int8_base_bit_identical_and_merge_equals_forward(rule):
  x, y = jnp.asarray(X), jnp.asarray(Y)
  model = NNXMLP(nnx.Rngs(0))
  float_out = model(x)
  model, report = dl.adapt_nnx(
    model, rank=R, rngs=nnx.Rngs(1), base_quantization="int8", **RULES[rule]
  )
  assert report["layers"]["down"]["base_quantization"] == "int8"
  assert model.up.kernel.dtype == jnp.int8 and model.down.kernel_scale.shape == (OUT,)
  scale = np.asarray(model.up.kernel_scale[...])
  bound = np.abs(X) @ np.broadcast_to(scale / 2, (IN, 8))  # |x (W - deq)| before the tanh
  assert float(jnp.abs(model.up(x) - nnx.Linear(IN, 8, rngs=nnx.Rngs(0))(x)).max()) <= (
    bound.max() * (1 + 1e-5)
  )
  assert float(jnp.abs(model(x) - float_out).max()) > 0  # quantized: not the float model
  base = {
    n: (m.kernel[...], m.kernel_scale[...]) for n, m in (("up", model.up), ("down", model.down))
  }
  lora = optax.sgd(0.1)
  wrt = nnx.Any(nnx.LoRAParam, dl.DeltaParam) if rule == "seed" else nnx.LoRAParam
  if rule == "lora":
    labels = lambda tree: jax.tree.map(str, dl.leaf_labels(tree))  # noqa: E731
    tx = optax.multi_transform({"lora": lora, "base": optax.set_to_zero()}, labels)
  elif rule == "seed":
    tx = dl.delta_lora(0.05, 0.9, layers=model, lora_optimizer=lora)
  else:
    tx = dl.paper_delta_lora(lora_optimizer=lora, layers=model, start_step=1)
  optimizer = nnx.Optimizer(model, tx, wrt=wrt)

  @nnx.jit
  def step(model, optimizer):
    loss = lambda m: jnp.mean((m(x) - y) ** 2)  # noqa: E731
    value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, wrt))(model)
    optimizer.update(model, grads)
    return value

  losses = [float(step(model, optimizer)) for _ in range(STEPS)]
  assert losses[-1] < losses[0]
  for name, (kernel, kernel_scale) in base.items():
    layer = getattr(model, name)
    np.testing.assert_array_equal(layer.kernel[...], kernel)
    np.testing.assert_array_equal(layer.kernel_scale[...], kernel_scale)
  merged = dl.merge(model)
  assert type(merged.up) is nnx.Linear and merged.up.kernel.dtype == jnp.float32
  np.testing.assert_allclose(merged(x), model(x), rtol=0, atol=2e-6)
  assert dl.parameter_counts(model)["up"] == R * (IN + 8) + (IN * 8 if rule == "seed" else 0)


# --------------------------------------------------------------------------
# Refusals, each naming what is wrong.
# --------------------------------------------------------------------------


def test_in_place_paper_rule_refuses_an_int8_base_naming_the_layer():
  model, _ = dl.adapt_nnx(
    NNXMLP(nnx.Rngs(0)),
    ["up"],
    rank=R,
    rngs=nnx.Rngs(1),
    use_delta=False,
    base_quantization="int8",
  )
  tx = dl.paper_delta_lora(lora_optimizer=optax.sgd(0.1), layers=model)
  with pytest.raises(ValueError, match=r"'up' has an int8 base.*paper_lambda"):
    nnx.Optimizer(model, tx, wrt=nnx.Param)
  layer = dl.DeltaLoRADense(OUT, rank=R, use_delta=False, base_quantization="int8")
  variables = layer.init(jax.random.key(0), jnp.asarray(X))
  tx = dl.paper_delta_lora(lora_optimizer=optax.sgd(0.1), layers={(): layer})
  with pytest.raises(ValueError, match=r"has an int8 base .*paper_lambda"):
    tx.init(variables)


@pytest.mark.parametrize(
  ("make", "error", "match"),
  [
    (
      lambda: dl.DeltaLoRADense(OUT, rank=R, base_quantization="int4"),
      ValueError,
      r"base_quantization must be None or one of \('int8', 'nf4'\), got base_quantization='int4'",
    ),
    (
      lambda: dl.DeltaLoRALinear(
        IN, OUT, rank=R, freeze_base=False, base_quantization="int8", rngs=nnx.Rngs(0)
      ),
      ValueError,
      "needs freeze_base=True, got freeze_base=False",
    ),
    (
      lambda: dl.adapt_nnx(NNXMLP(nnx.Rngs(0)), rank=R, rngs=nnx.Rngs(1), base_quantization=8),
      ValueError,
      "got base_quantization=8",
    ),
  ],
  ids=["unknown", "trained base", "adapt_nnx"],
)
def test_bad_arguments_are_named(make, error, match):
  with pytest.raises(error, match=match):
    make()


def test_linen_apply_without_the_quantized_collection_says_which_collection():
  layer = dl.DeltaLoRADense(OUT, rank=R, base_quantization="int8")
  x = jnp.asarray(X)
  variables = layer.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="needs the 'quantized' collection"):
    layer.apply({c: v for c, v in variables.items() if c != "quantized"}, x)
  with pytest.raises(ValueError, match="'' has freeze_base=False"):
    unfrozen = dl.DeltaLoRADense(OUT, rank=R, freeze_base=False)
    dl.quantize_base(unfrozen.init(jax.random.key(0), x), {(): unfrozen})
  with pytest.raises(ValueError, match=r"kernel_scale must have shape \(5,\)"):
    core.delta_lora_apply(
      x,
      variables["quantized"]["kernel"],
      None,
      variables["params"]["lora_a"],
      variables["params"]["lora_b"],
      None,
      scaling=1.0,
      delta_scaling=1.0,
      kernel_scale=jnp.ones(3),
    )


def test_sharding_splits_the_int8_kernel_on_its_input_axis_and_replicates_its_scales():
  mesh = jax.make_mesh((1,), ("fsdp",))
  layer = dl.DeltaLoRADense(OUT, rank=R, use_delta=False, base_quantization="int8")
  specs = dl.partition_specs(layer.init(jax.random.key(0), jnp.asarray(X)), mesh)
  P = jax.sharding.PartitionSpec
  assert specs["quantized"] == {"kernel": P("fsdp", None), "kernel_scale": P()}
  nnx_layer = dl.DeltaLoRALinear(IN, OUT, rank=R, base_quantization="int8", rngs=nnx.Rngs(0))
  specs = nnx.to_pure_dict(dl.partition_specs(nnx.state(nnx_layer), mesh))
  assert (specs["kernel"], specs["kernel_scale"]) == (P("fsdp", None), P())


class ScanBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return nn.tanh(nn.Dense(IN, name="up")(x)), None


class Scanned(nn.Module):
  """Three blocks stacked by nn.scan, which lifts 'params' only."""

  @nn.compact
  def __call__(self, x):
    blocks = nn.scan(ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    return blocks(name="blocks")(x, None)[0]


def test_linen_scanned_stack_carries_its_int8_base_and_scales_per_layer():
  x = jnp.asarray(X)
  variables = Scanned().init(jax.random.key(0), x)
  adapted, new, _ = dl.adapt_linen(
    Scanned(),
    variables,
    x,
    rank=R,
    key=jax.random.key(1),
    base_quantization="int8",
    use_delta=False,
    paper_lambda=2.0,
  )
  quantized = new["quantized"]["blocks"]["up"]
  assert (quantized["kernel"].dtype, quantized["kernel_scale"].shape) == (jnp.int8, (3, IN))
  for i in range(3):  # each layer of the stack has its own scales
    _, scale = core.quantize_int8(variables["params"]["blocks"]["up"]["kernel"][i])
    np.testing.assert_array_equal(quantized["kernel_scale"][i], scale)
  trainable = {c: v for c, v in new.items() if c != "quantized"}
  grads = jax.grad(lambda v: jnp.sum(adapted.apply({**v, "quantized": new["quantized"]}, x) ** 2))(
    trainable
  )
  trained = jax.tree.map(lambda p, g: p - 0.1 * g, trainable, grads)
  whole = {**trained, "quantized": new["quantized"]}
  merged = dl.merge(whole, adapted)
  np.testing.assert_allclose(Scanned().apply(merged, x), adapted.apply(whole, x), atol=2e-6)


def test_checkpoint_restores_the_int8_base_and_its_scales_bit_for_bit(tmp_path):
  layer = dl.DeltaLoRADense(OUT, rank=R, use_delta=False, base_quantization="int8")
  variables = layer.init(jax.random.key(0), jnp.asarray(X))
  with dl.TrainingCheckpointer(str(tmp_path)) as checkpoints:
    checkpoints.save(1, variables)
    checkpoints.wait_until_finished()
    restored = checkpoints.restore(jax.tree.map(jnp.zeros_like, variables))
  assert jax.tree.map(lambda a: a.dtype, restored) == jax.tree.map(lambda a: a.dtype, variables)
  jax.tree.map(np.testing.assert_array_equal, restored, variables)


def test_an_int8_kernel_without_its_scales_is_refused():
  values, _ = core.quantize_int8(jnp.ones((IN, OUT), jnp.float32))
  a, b = jnp.ones((IN, R)), jnp.zeros((R, OUT))
  with pytest.raises(TypeError, match="give its kernel_scale"):
    core.delta_lora_apply(jnp.asarray(X), values, None, a, b, None, scaling=1.0, delta_scaling=1.0)
  with pytest.raises(TypeError, match="give its kernel_scale"):
    core.merged_kernel(values, a, b, None, scaling=1.0, delta_scaling=1.0)


def test_merged_peft_export_writes_the_dequantized_base_plus_the_change(tmp_path):
  from safetensors.numpy import load_file

  from deltalora_jax.adapt import peft

  model, _ = dl.adapt_nnx(
    NNXMLP(nnx.Rngs(0)), ["up"], rank=R, rngs=nnx.Rngs(1), base_quantization="int8"
  )
  model.up.lora_b[...] = jnp.ones((R, 8))
  model.up.delta[...] = jnp.full((IN, 8), 0.5)
  dl.save_peft(str(tmp_path), model, module_names={"up": "up"}, rule="seed", merged=True)
  weight = load_file(str(tmp_path / peft.MERGED_FILE))["up.weight"]  # torch's [out, in]
  np.testing.assert_allclose(weight.T, dl.merge(model).up.kernel[...], rtol=0, atol=1e-6)
  with pytest.raises(ValueError, match="'up' has an int8 base: sample="):
    dl.save_peft(str(tmp_path), model, module_names={"up": "up"}, rule="lora", sample=(X,))
