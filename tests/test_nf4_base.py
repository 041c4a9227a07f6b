"""An NF4 frozen base (QLoRA's 4-bit NormalFloat, by qwix), blocks of 64 along the input.

The codes are qwix's: the 16 levels of Dettmers et al. (2023, Appendix E),
stored as uint4 indices, one float32 abs-max scale per block of 64 weights
along the kernel's innermost contracted axis. Each weight is within half the
largest gap between adjacent levels, times its block's abs-max, of ``W``
(closed form, per block); the adapted layer equals a float64 reference on
the dequantized kernel (factored and merged); codes and scales stay
bit-identical while plain LoRA, the seed rule and the telescoped paper rule
train (Linen and NNX, stacks of nn.scan and nnx.vmap included); merge gives a
float32 kernel whose model equals the adapted one; the input's gradient is the
float kernel's, and a jitted step holds one dequantized kernel at a time; a
block axis that 64 does not divide, a trained base, the in-place paper rule
and a missing qwix are refused by name. The int8 base's helpers are reused
(tests/test_quantized_base.py).
"""

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import test_quantized_base as int8
from flax import nnx

import deltalora_jax as dl
from deltalora_jax import core
from deltalora_jax.projections import Conv, Einsum, GeneralDense

qwix = pytest.importorskip("qwix")

IN, HIDDEN, OUT, R, ROWS = 128, 64, 5, 2, 4  # inputs of 128 and 64: two blocks and one
EINSUM = Einsum("btd,ndh->btnh", (2, IN, 3))  # kernel [n, d, h]: blocks along d
_rng = np.random.default_rng(0)
X = (0.25 * _rng.standard_normal((ROWS, IN))).astype(np.float32)  # |x| ~ 3
Y = _rng.standard_normal((ROWS, OUT)).astype(np.float32)
STEPS = 5
#: NF4's levels as published (QLoRA, Appendix E).
PUBLISHED_LEVELS = (
  -1.0,
  -0.6961928009986877,
  -0.5250730514526367,
  -0.39491748809814453,
  -0.28444138169288635,
  -0.18477343022823334,
  -0.09105003625154495,
  0.0,
  0.07958029955625534,
  0.16093020141124725,
  0.24611230194568634,
  0.33791524171829224,
  0.44070982933044434,
  0.5626170039176941,
  0.7229568362236023,
  1.0,
)


def qwix_levels():
  """The 16 levels qwix dequantizes the codes 0..15 to, at scale 1 (its public API only)."""
  codes = jnp.arange(16, dtype=jnp.uint4)
  return np.asarray(qwix.dequantize(qwix.QArray(qvalue=codes, scale=jnp.ones(1), qtype="nf4")))


def test_the_codes_are_qwix_levels_which_are_qloras():
  np.testing.assert_array_equal(qwix_levels(), np.asarray(PUBLISHED_LEVELS, np.float32))
  codes, scale = core.quantize_kernel(jnp.asarray(PUBLISHED_LEVELS * 4).reshape(64, 1), "nf4")
  np.testing.assert_array_equal(codes[:16, 0], np.arange(16))  # each level is its own code
  np.testing.assert_array_equal(scale, [[1.0]])


@pytest.mark.parametrize(
  ("projection", "shape", "scale_shape", "block_axis"),
  [
    (None, (IN, OUT), (2, OUT), 0),
    (GeneralDense(features=(2, 3)), (IN, 2, 3), (2, 2, 3), 0),
    (EINSUM, (2, IN, 3), (2, 2, 3), 1),
    (Conv(features=4, kernel_size=(3,)), (3, IN, 4), (3, 2, 4), 1),  # blocks along `in`
    (GeneralDense(features=(OUT,)), (3, IN, OUT), (3, 2, OUT), 1),  # a stack: its own scales
  ],
  ids=["dense", "dense_general", "einsum", "conv", "stack"],
)
def test_quantize_error_is_within_the_nf4_bound_per_block(
  projection, shape, scale_shape, block_axis
):
  """Closed form: s_b = max_b |W|, |W - s_b v_q| <= s_b max_k (v_k+1 - v_k) / 2."""
  w = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
  codes, scale = core.quantize_kernel(jnp.asarray(w), "nf4", projection)
  assert codes.dtype == jnp.uint4 and codes.shape == shape
  assert scale.dtype == jnp.float32 and scale.shape == scale_shape
  assert core.base_quantization_of(codes) == "nf4"
  # the blocks: split the block axis into (blocks, 64)
  blocked = np.moveaxis(w, block_axis, -1).reshape(
    *np.moveaxis(w, block_axis, -1).shape[:-1], -1, 64
  )
  absmax = np.moveaxis(np.abs(blocked).max(-1), -1, block_axis)
  np.testing.assert_array_equal(scale, absmax)
  half_gap = np.max(np.diff(qwix_levels().astype(np.float64))) / 2
  per_weight = np.repeat(absmax.astype(np.float64), 64, axis=block_axis)
  dequantized = np.asarray(core.dequantize(codes, scale, projection), np.float64)
  assert np.all(np.abs(w - dequantized) <= per_weight * half_gap * (1 + 1e-6))
  # each block's largest weight is a level +-1: exact
  at_max = np.abs(w) == per_weight
  np.testing.assert_array_equal(np.abs(dequantized)[at_max], np.abs(w)[at_max])


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
  codes, scale = core.quantize_kernel(
    jnp.asarray(rng.standard_normal(shape), jnp.float32), "nf4", projection
  )
  a_shape, b_shape = projection.factor_shapes(shape, R)
  a, b = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (a_shape, b_shape))
  bias = jnp.asarray(rng.standard_normal(projection.bias_shape(shape)), jnp.float32)
  delta = jnp.asarray(0.1 * rng.standard_normal(shape), jnp.float32)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  y = core.delta_lora_apply(
    x,
    codes,
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
    dequantized = core.dequantize(codes, scale.astype(jnp.float64), projection)
    assert dequantized.dtype == jnp.float64
    expected = int8.reference(x, dequantized, bias, a, b, delta, 1.5, 0.5, projection)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-4)  # |y| up to ~50


def test_bfloat16_input_computes_in_bfloat16_from_the_float32_dequantized_kernel():
  codes, scale = core.quantize_kernel(
    jnp.asarray(_rng.standard_normal((IN, OUT)), jnp.float32), "nf4"
  )
  a, b = jnp.ones((IN, R)), jnp.zeros((R, OUT))
  x = jnp.asarray(X, jnp.bfloat16)
  y = core.delta_lora_apply(
    x, codes, None, a, b, None, scaling=1.0, delta_scaling=1.0, kernel_scale=scale, dtype=None
  )
  assert y.dtype == jnp.float32  # the scales are the base's dtype: float32, as for int8
  y16 = core.delta_lora_apply(
    x,
    codes,
    None,
    a,
    b,
    None,
    scaling=1.0,
    delta_scaling=1.0,
    kernel_scale=scale,
    dtype=jnp.bfloat16,
  )
  assert y16.dtype == jnp.bfloat16
  expected = X.astype(np.float64) @ np.asarray(core.dequantize(codes, scale), np.float64)
  np.testing.assert_allclose(np.asarray(y16, np.float64), expected, rtol=0.05, atol=0.15)


# --------------------------------------------------------------------------
# Training: the base stays bit-identical; merge equals the forward.
# --------------------------------------------------------------------------


class MLP(nn.Module):
  """Two layers whose inputs (128, 64) are whole NF4 blocks."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(OUT, name="down")(nn.tanh(nn.Dense(HIDDEN, name="up")(x)))


@pytest.mark.parametrize("rule", list(int8.RULES))
def test_linen_training_leaves_the_nf4_base_bit_identical_and_merge_equals_forward(rule):
  x, y = jnp.asarray(X), jnp.asarray(Y)
  variables = MLP().init(jax.random.key(0), x)
  adapted, variables, report = dl.adapt_linen(
    MLP(), variables, x, rank=R, key=jax.random.key(1), base_quantization="nf4", **int8.RULES[rule]
  )
  assert {e["base_quantization"] for e in report["layers"].values()} == {"nf4"}
  quantized = variables.pop("quantized")
  assert jax.tree.map(lambda a: (str(a.dtype), a.shape), quantized) == {
    "up": {"kernel": ("uint4", (IN, HIDDEN)), "kernel_scale": ("float32", (2, HIDDEN))},
    "down": {"kernel": ("uint4", (HIDDEN, OUT)), "kernel_scale": ("float32", (1, OUT))},
  }
  assert "kernel" not in variables["params"]["up"]
  tx = int8.linen_optimizer(rule, adapted)
  opt_state = tx.init(variables)

  @jax.jit
  def step(trainable, opt_state):
    loss = lambda v: jnp.mean((adapted.apply({**v, "quantized": quantized}, x) - y) ** 2)  # noqa: E731
    value, grads = jax.value_and_grad(loss)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, value

  trainable, losses = variables, []
  for _ in range(STEPS):
    trainable, opt_state, value = step(trainable, opt_state)
    losses.append(float(value))
  assert losses[-1] < losses[0]
  whole = {**trainable, "quantized": quantized}
  if rule == "seed":
    assert float(jnp.abs(trainable["delta"]["up"]["delta"]).max()) > 0
  if rule == "paper":
    moved = trainable["params"]["up"]["lora_b"] - trainable["snapshot"]["up"]["snapshot_b"]
    assert float(jnp.abs(moved).max()) > 0
  after = dl.tree.layer_arrays(whole, adapted)
  for name in ("up", "down"):
    assert after[name][1]["kernel"].dtype == jnp.uint4
    np.testing.assert_array_equal(after[name][1]["kernel"], quantized[name]["kernel"])
    np.testing.assert_array_equal(after[name][1]["kernel_scale"], quantized[name]["kernel_scale"])
  merged = dl.merge(whole, adapted)
  assert "quantized" not in merged
  assert merged["params"]["up"]["kernel"].dtype == jnp.float32
  np.testing.assert_allclose(MLP().apply(merged, x), adapted.apply(whole, x), rtol=0, atol=1e-5)


class NNXMLP(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(IN, HIDDEN, rngs=rngs)
    self.down = nnx.Einsum("bd,dn->bn", (HIDDEN, OUT), (OUT,), rngs=rngs)

  def __call__(self, x):
    return self.down(nnx.tanh(self.up(x)))


@pytest.mark.parametrize("rule", list(int8.RULES))
def test_nnx_training_leaves_the_nf4_base_bit_identical_and_merge_equals_forward(rule):
  x, y = jnp.asarray(X), jnp.asarray(Y)
  model, report = dl.adapt_nnx(
    NNXMLP(nnx.Rngs(0)), rank=R, rngs=nnx.Rngs(1), base_quantization="nf4", **int8.RULES[rule]
  )
  assert report["layers"]["down"]["base_quantization"] == "nf4"
  assert model.up.kernel.dtype == jnp.uint4 and model.up.kernel_scale.shape == (2, HIDDEN)
  assert model.down.kernel_scale.shape == (1, OUT)
  dequantized = core.dequantize(model.up.kernel[...], model.up.kernel_scale[...])
  np.testing.assert_allclose(
    model.up(x), x @ dequantized + model.up.bias[...][None], rtol=1e-5, atol=1e-5
  )
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
    assert layer.kernel.dtype == jnp.uint4
    np.testing.assert_array_equal(layer.kernel[...], kernel)
    np.testing.assert_array_equal(layer.kernel_scale[...], kernel_scale)
  merged = dl.merge(model)
  assert type(merged.up) is nnx.Linear and merged.up.kernel.dtype == jnp.float32
  np.testing.assert_allclose(merged(x), model(x), rtol=0, atol=1e-5)


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


def test_linen_scanned_stack_carries_its_nf4_base_and_scales_per_layer():
  x = jnp.asarray(X)
  variables = Scanned().init(jax.random.key(0), x)
  adapted, new, _ = dl.adapt_linen(
    Scanned(),
    variables,
    x,
    rank=R,
    key=jax.random.key(1),
    base_quantization="nf4",
    use_delta=False,
    paper_lambda=2.0,
  )
  quantized = new["quantized"]["blocks"]["up"]
  assert (quantized["kernel"].dtype, quantized["kernel_scale"].shape) == (jnp.uint4, (3, 2, IN))
  for i in range(3):  # each layer of the stack has its own scales
    _, scale = core.quantize_kernel(variables["params"]["blocks"]["up"]["kernel"][i], "nf4")
    np.testing.assert_array_equal(quantized["kernel_scale"][i], scale)
  trainable = {c: v for c, v in new.items() if c != "quantized"}
  grads = jax.grad(lambda v: jnp.sum(adapted.apply({**v, "quantized": new["quantized"]}, x) ** 2))(
    trainable
  )
  trained = jax.tree.map(lambda p, g: p - 0.1 * g, trainable, grads)
  whole = {**trained, "quantized": new["quantized"]}
  merged = dl.merge(whole, adapted)
  np.testing.assert_allclose(Scanned().apply(merged, x), adapted.apply(whole, x), atol=5e-5)


class NNXBlock(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(HIDDEN, HIDDEN, rngs=rngs)

  def __call__(self, x):
    return nnx.tanh(self.up(x))


class NNXScan(nnx.Module):
  """Three blocks created by ``nnx.vmap``, applied by ``nnx.scan``: a stacked kernel."""

  def __init__(self, rngs):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return NNXBlock(rngs)

    self.blocks = create(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def forward(x, block):
      return block(x)

    return forward(x, self.blocks)


def test_nnx_vmapped_stack_carries_its_nf4_base_and_scales_per_layer():
  model = NNXScan(nnx.Rngs(0))
  kernels = model.blocks.up.kernel[...]
  model, report = dl.adapt_nnx(
    model, rank=R, rngs=nnx.Rngs(1), base_quantization="nf4", use_delta=False, paper_lambda=2.0
  )
  assert report["layers"]["blocks/up"]["base_quantization"] == "nf4"
  up = model.blocks.up
  assert (up.kernel.dtype, up.kernel.shape, up.kernel_scale.shape) == (
    jnp.uint4,
    (3, HIDDEN, HIDDEN),
    (3, 1, HIDDEN),
  )
  for i in range(3):  # each layer of the stack has its own codes and scales
    codes, scale = core.quantize_kernel(kernels[i], "nf4")
    np.testing.assert_array_equal(up.kernel[...][i], codes)
    np.testing.assert_array_equal(up.kernel_scale[...][i], scale)
  up.lora_b[...] = jnp.full(up.lora_b.shape, 0.1)
  x = jnp.asarray(X[:, :HIDDEN])
  np.testing.assert_allclose(dl.merge(model)(x), model(x), rtol=0, atol=1e-5)


def test_from_linear_quantizes_the_linears_own_variable_as_nf4():
  linear = nnx.Linear(IN, OUT, rngs=nnx.Rngs(0))
  layer = dl.DeltaLoRALinear.from_linear(linear, rank=R, rngs=nnx.Rngs(1), base_quantization="nf4")
  assert (layer.kernel.dtype, layer.kernel_scale.shape) == (jnp.uint4, (2, OUT))
  codes, _ = core.quantize_kernel(linear.kernel[...], "nf4")
  np.testing.assert_array_equal(layer.kernel[...], codes)


def test_checkpoint_restores_the_nf4_codes_and_scales_bit_for_bit(tmp_path):
  layer = dl.DeltaLoRADense(OUT, rank=R, use_delta=False, base_quantization="nf4")
  variables = layer.init(jax.random.key(0), jnp.asarray(X))
  with dl.TrainingCheckpointer(str(tmp_path)) as checkpoints:
    checkpoints.save(1, variables)
    checkpoints.wait_until_finished()
    restored = checkpoints.restore(jax.tree.map(jnp.zeros_like, variables))
  assert jax.tree.map(lambda a: a.dtype, restored) == jax.tree.map(lambda a: a.dtype, variables)
  assert restored["quantized"]["kernel"].dtype == jnp.uint4
  jax.tree.map(np.testing.assert_array_equal, restored, variables)


def test_sharding_splits_the_nf4_codes_on_their_input_axis_and_replicates_the_scales():
  mesh = jax.make_mesh((1,), ("fsdp",))
  layer = dl.DeltaLoRADense(OUT, rank=R, use_delta=False, base_quantization="nf4")
  specs = dl.partition_specs(layer.init(jax.random.key(0), jnp.asarray(X)), mesh)
  P = jax.sharding.PartitionSpec
  assert specs["quantized"] == {"kernel": P("fsdp", None), "kernel_scale": P()}
  nnx_layer = dl.DeltaLoRALinear(IN, OUT, rank=R, base_quantization="nf4", rngs=nnx.Rngs(0))
  specs = nnx.to_pure_dict(dl.partition_specs(nnx.state(nnx_layer), mesh))
  assert (specs["kernel"], specs["kernel_scale"]) == (P("fsdp", None), P())


# --------------------------------------------------------------------------
# Refusals, each naming what is wrong.
# --------------------------------------------------------------------------


class Ragged(nn.Module):
  """'down' takes 8 inputs: no whole block of 64."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(OUT, name="down")(nn.Dense(8, name="up")(x))


class NNXRagged(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(IN, 8, rngs=rngs)
    self.down = nnx.Linear(8, OUT, rngs=rngs)

  def __call__(self, x):
    return self.down(self.up(x))


def test_an_input_axis_64_does_not_divide_is_refused_naming_the_layer_and_its_size():
  x = jnp.asarray(X)
  ragged = r"'down' \(kernel shape \(8, 5\)\) cannot have base_quantization='nf4'.*of size 8"
  with pytest.raises(ValueError, match=ragged):
    dl.adapt_linen(
      Ragged(),
      Ragged().init(jax.random.key(0), x),
      x,
      rank=R,
      key=jax.random.key(1),
      base_quantization="nf4",
    )
  with pytest.raises(ValueError, match=ragged):
    dl.adapt_nnx(NNXRagged(nnx.Rngs(0)), rank=R, rngs=nnx.Rngs(1), base_quantization="nf4")
  with pytest.raises(ValueError, match=r"DeltaLoRADense at <root> \(kernel shape \(8, 5\)\)"):
    dl.DeltaLoRADense(OUT, rank=R, base_quantization="nf4").init(jax.random.key(0), x[:, :8])
  # int8 takes any size, and only the ragged layer need stay float
  _, report = dl.adapt_nnx(
    NNXRagged(nnx.Rngs(0)), ["up"], rank=R, rngs=nnx.Rngs(1), base_quantization="nf4"
  )
  assert report["layers"]["up"]["base_quantization"] == "nf4"


def test_a_trained_base_and_the_in_place_paper_rule_are_refused():
  with pytest.raises(ValueError, match="needs freeze_base=True, got freeze_base=False"):
    dl.DeltaLoRALinear(
      IN, OUT, rank=R, freeze_base=False, base_quantization="nf4", rngs=nnx.Rngs(0)
    )
  model, _ = dl.adapt_nnx(
    NNXMLP(nnx.Rngs(0)), ["up"], rank=R, rngs=nnx.Rngs(1), use_delta=False, base_quantization="nf4"
  )
  tx = dl.paper_delta_lora(lora_optimizer=optax.sgd(0.1), layers=model)
  with pytest.raises(ValueError, match=r"'up' has an nf4 base.*paper_lambda"):
    nnx.Optimizer(model, tx, wrt=nnx.Param)
  layer = dl.DeltaLoRADense(OUT, rank=R, use_delta=False, base_quantization="nf4")
  variables = layer.init(jax.random.key(0), jnp.asarray(X))
  tx = dl.paper_delta_lora(lora_optimizer=optax.sgd(0.1), layers={(): layer})
  with pytest.raises(ValueError, match=r"has an nf4 base .*paper_lambda"):
    tx.init(variables)
  codes, scale = core.quantize_kernel(jnp.ones((IN, OUT)), "nf4")
  a, b = jnp.ones((IN, R)), jnp.zeros((R, OUT))
  with pytest.raises(ValueError, match=r"an nf4 base .* needs freeze_base=True"):
    core.delta_lora_apply(
      jnp.asarray(X),
      codes,
      None,
      a,
      b,
      None,
      scaling=1.0,
      delta_scaling=1.0,
      freeze_base=False,
      kernel_scale=scale,
    )


def test_codes_without_their_scales_or_with_per_channel_scales_are_refused():
  codes, scale = core.quantize_kernel(jnp.ones((IN, OUT)), "nf4")
  a, b = jnp.ones((IN, R)), jnp.zeros((R, OUT))
  x = jnp.asarray(X)
  with pytest.raises(TypeError, match="give its kernel_scale"):
    core.delta_lora_apply(x, codes, None, a, b, None, scaling=1.0, delta_scaling=1.0)
  with pytest.raises(ValueError, match=r"kernel_scale must have shape \(2, 5\) \(one per block"):
    core.delta_lora_apply(
      x, codes, None, a, b, None, scaling=1.0, delta_scaling=1.0, kernel_scale=jnp.ones(OUT)
    )
  with pytest.raises(TypeError, match=r"must be int8 .* or uint4"):
    core.dequantize(jnp.ones((IN, OUT), jnp.int4), scale)


def test_without_qwix_nf4_is_refused_where_it_enters_saying_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "qwix", None)  # import qwix raises ImportError
  install = r"base_quantization='nf4' needs qwix.*pip install qwix.*deltalora-jax\[nf4\]"
  with pytest.raises(ImportError, match=install):
    dl.DeltaLoRADense(OUT, rank=R, base_quantization="nf4")
  with pytest.raises(ImportError, match=install):
    dl.adapt_nnx(NNXMLP(nnx.Rngs(0)), rank=R, rngs=nnx.Rngs(1), base_quantization="nf4")
  layer = dl.DeltaLoRADense(OUT, rank=R, base_quantization="int8")  # int8 needs no qwix
  layer.init(jax.random.key(0), jnp.asarray(X))


# --------------------------------------------------------------------------
# The product's gradient and memory: one dequantized kernel at a time.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dense", "einsum", "conv"])
def test_input_gradient_equals_the_float_kernels_and_an_inf_stays_in_its_row(kind):
  rng = np.random.default_rng(3)
  projection, x_shape = {
    "dense": (GeneralDense(features=(OUT,)), (ROWS, IN)),
    "einsum": (EINSUM, (ROWS, 3, IN)),
    "conv": (Conv(features=4, kernel_size=(3,)), (ROWS, 7, IN)),
  }[kind]
  shape = projection.kernel_shape(x_shape)
  codes, scale = core.quantize_kernel(
    jnp.asarray(rng.standard_normal(shape), jnp.float32), "nf4", projection
  )
  dequantized = core.dequantize(codes, scale, projection)
  a_shape, b_shape = projection.factor_shapes(shape, R)
  a, b = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (a_shape, b_shape))
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  g = jnp.asarray(rng.standard_normal(projection.apply(x, dequantized).shape), jnp.float32)

  def loss(x, kernel, kernel_scale):
    y = core.delta_lora_apply(
      x,
      kernel,
      None,
      a,
      b,
      None,
      scaling=1.5,
      delta_scaling=1.0,
      projection=projection,
      evaluation="factored",
      kernel_scale=kernel_scale,
      precision=jax.lax.Precision.HIGHEST,
    )
    return jnp.sum(y * g)

  grad_nf4 = jax.jit(jax.grad(loss))(x, codes, scale)
  grad_float = jax.grad(loss)(x, dequantized, None)
  np.testing.assert_allclose(grad_nf4, grad_float, rtol=1e-5, atol=1e-5)
  y = core.delta_lora_apply(
    x.at[0].set(jnp.inf),
    codes,
    None,
    a,
    b,
    None,
    scaling=1.0,
    delta_scaling=1.0,
    projection=projection,
    kernel_scale=scale,
  )
  assert bool(jnp.all(jnp.isfinite(y[1:])))  # the tie adds exactly zero, never NaN


def test_a_jitted_step_holds_one_dequantized_kernel_at_a_time():
  """Four 256 x 256 NF4 layers: XLA's peak temp holds one float32 kernel, not four."""
  width, layers = 256, 4
  kernels = [
    core.quantize_kernel(jax.random.normal(jax.random.key(i), (width, width)), "nf4")
    for i in range(layers)
  ]
  a, b = jnp.ones((width, R)), jnp.zeros((R, width))

  def loss(factors, kernels, x):
    for codes, scale in kernels:
      x = jnp.tanh(
        core.delta_lora_apply(
          x, codes, None, *factors, None, scaling=1.0, delta_scaling=1.0, kernel_scale=scale
        )
      )
    return jnp.sum(x)

  x = jnp.ones((8, width))
  step = jax.jit(jax.grad(loss)).lower((a, b), kernels, x).compile()
  kernel_bytes = width * width * 4
  assert step.memory_analysis().temp_size_in_bytes < 2 * kernel_bytes
