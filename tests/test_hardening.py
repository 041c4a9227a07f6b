"""What a new user hit (issue 26): each bad input is refused where it enters, by name.

Each test fails on the code before the fix: either the input was accepted
silently, or it failed deep inside JAX, Flax or safetensors with a message
that named neither the argument nor what is allowed.
"""

import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors import numpy as safetensors_numpy

import deltalora_jax as dl
from deltalora_jax.adapt import peft


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


# ------------------------------------------------- 6, 7. adapter files

PEFT_NAMES = {"up": "model.up_proj", "down": "model.down_proj"}


def _trained_nnx(use_delta: bool = False) -> MLP:
  """An adapted MLP whose ``B`` (and ``D``) are random, as if trained."""
  model, _ = dl.adapt_nnx(MLP(nnx.Rngs(0)), rank=1, use_delta=use_delta, rngs=nnx.Rngs(1))
  rng = np.random.default_rng(0)
  for layer in (model.up, model.down):
    layer.lora_b[...] = jnp.asarray(rng.standard_normal(layer.lora_b.shape), jnp.float32)
    if use_delta:
      layer.delta[...] = jnp.asarray(rng.standard_normal(layer.delta.shape), jnp.float32)
  return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  directory = tmp_path_factory.mktemp("peft")
  peft.save_peft(directory, _trained_nnx(), module_names=PEFT_NAMES)
  return directory


def _copy(saved, tmp_path, *, config=None, weights=None):
  """``saved`` copied to ``tmp_path``, with ``config`` (a dict) or ``weights`` (bytes) replaced."""
  text = (saved / peft.CONFIG_FILE).read_text() if config is None else json.dumps(config)
  (tmp_path / peft.CONFIG_FILE).write_text(text)
  data = (saved / peft.WEIGHTS_FILE).read_bytes() if weights is None else weights
  (tmp_path / peft.WEIGHTS_FILE).write_bytes(data)
  return tmp_path


@pytest.mark.parametrize("size", ["empty", "truncated"])
def test_a_corrupt_safetensors_file_is_a_value_error_naming_it(saved, tmp_path, size):
  data = (saved / peft.WEIGHTS_FILE).read_bytes()
  directory = _copy(saved, tmp_path, weights=b"" if size == "empty" else data[: len(data) // 2])
  path = re.escape(str(directory / peft.WEIGHTS_FILE))
  with pytest.raises(ValueError, match=rf"{path} is not a readable safetensors file"):
    peft.load_peft(directory, MLP(nnx.Rngs(0)), module_names=PEFT_NAMES)


def test_a_truncated_config_is_a_value_error_naming_it(saved, tmp_path):
  directory = _copy(saved, tmp_path)
  text = (directory / peft.CONFIG_FILE).read_text()
  (directory / peft.CONFIG_FILE).write_text(text[: len(text) // 2])
  path = re.escape(str(directory / peft.CONFIG_FILE))
  with pytest.raises(ValueError, match=rf"{path} is not valid JSON \(truncated or corrupt\?\)"):
    peft.load_peft(directory, MLP(nnx.Rngs(0)), module_names=PEFT_NAMES)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_an_adapter_holding_nan_is_refused_naming_the_layer(value):
  adapter = dl.export_adapter(_trained_nnx(use_delta=True))
  adapter["weights"]["down"]["delta"] = adapter["weights"]["down"]["delta"].at[3, 0].set(value)
  model = MLP(nnx.Rngs(0))
  match = r"adapter weight down/delta holds NaN or infinity \(1 of 8 entries\)"
  with pytest.raises(ValueError, match=match):
    dl.attach_adapter_nnx(model, adapter)
  assert _unchanged(model)
  variables = LinenMLP().init(jax.random.key(0), X)
  with pytest.raises(ValueError, match=match):
    dl.attach_adapter_linen(LinenMLP(), variables, adapter)


def test_a_peft_file_holding_nan_is_refused_when_attached(saved, tmp_path):
  tensors = safetensors_numpy.load_file(saved / peft.WEIGHTS_FILE)
  key = "base_model.model.model.up_proj.lora_B.weight"
  tensors[key] = np.full_like(tensors[key], np.nan)
  safetensors_numpy.save_file(tensors, tmp_path / "w.safetensors")
  directory = _copy(saved, tmp_path, weights=(tmp_path / "w.safetensors").read_bytes())
  adapter = peft.load_peft(directory, MLP(nnx.Rngs(0)), module_names=PEFT_NAMES)
  with pytest.raises(ValueError, match=r"adapter weight up/lora_b holds NaN or infinity \(8 of 8"):
    dl.attach_adapter_nnx(MLP(nnx.Rngs(0)), adapter)


# ------------------------------------ 8. nnx.Optimizer(wrt=nnx.LoRAParam)


def test_the_seed_rule_trains_d_under_an_optimizer_of_lora_params_only():
  """tunix's PeftTrainer builds ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``: D is one."""
  model, _ = dl.adapt_nnx(MLP(nnx.Rngs(0)), rank=1, rngs=nnx.Rngs(1))
  kernel = model.up.kernel[...]
  lr, mu = 0.1, 0.9
  tx = dl.delta_lora(lr, mu, layers=model, lora_optimizer=optax.sgd(lr))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
  loss = lambda m: jnp.sum(m(X) ** 2)  # noqa: E731
  grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
  optimizer.update(model, grads)
  g = nnx.to_pure_dict(grads)["up"]["delta"]
  assert float(jnp.abs(g).max()) > 0
  np.testing.assert_allclose(model.up.delta[...], -lr * (1 - mu) * g, rtol=1e-6)
  np.testing.assert_array_equal(model.up.kernel[...], kernel)


# -------------------------------------------- 10. the first adapter format


def _first_format(model: MLP) -> dict:
  """``model``'s adapter as the first export_adapter wrote it (dense only, no projection)."""
  adapter = dl.export_adapter(model)
  for name, entry in adapter["config"].items():
    fields = {k: entry[k] for k in ("use_bias", "rank", "delta_scaling", "freeze_base")}
    fields.update(use_delta=entry["use_delta"], evaluation=entry["evaluation"], alpha=0.0)
    in_features, out_features = entry["kernel_shape"]
    adapter["config"][name] = {"in_features": in_features, "out_features": out_features, **fields}
  return adapter


def test_an_adapter_of_the_first_format_attaches_with_its_meaning():
  trained = _trained_nnx(use_delta=True)  # alpha None: s = 1, as alpha=0 meant in that format
  adapter = _first_format(trained)
  fresh, _ = dl.attach_adapter_nnx(MLP(nnx.Rngs(0)), adapter)
  assert fresh.up.config == trained.up.config and fresh.down.config.alpha is None
  np.testing.assert_allclose(fresh(X), trained(X), rtol=1e-6, atol=1e-6)
  up = {k: np.asarray(v, np.float64) for k, v in adapter["weights"]["up"].items()}
  w, b = np.asarray(trained.up.kernel[...], np.float64), np.asarray(trained.up.bias[...])
  x = np.asarray(X, np.float64)
  want = x @ w + b + 1.0 * (x @ up["lora_a"]) @ up["lora_b"] + 0.1 * x @ up["delta"]
  np.testing.assert_allclose(np.asarray(fresh.up(X), np.float64), want, rtol=1e-5, atol=1e-5)
  variables = LinenMLP().init(jax.random.key(0), X)
  _, restored, _ = dl.attach_adapter_linen(LinenMLP(), variables, adapter)
  assert restored["delta"]["down"]["delta"].shape == (8, 1)


def test_an_adapter_config_of_neither_format_names_both():
  adapter = dl.export_adapter(_trained_nnx())
  del adapter["config"]["up"]["kernel_shape"]
  with pytest.raises(ValueError, match=r"kernel_shape and a projection .* or with in_features and"):
    dl.attach_adapter_nnx(MLP(nnx.Rngs(0)), adapter)


# ------------------------------ 10. load_peft: exclude_modules, layers_pattern


@pytest.mark.parametrize("exclude_modules", [["up_proj"], r"model\.up.*"])
def test_load_peft_honours_exclude_modules(saved, tmp_path, exclude_modules):
  config = json.loads((saved / peft.CONFIG_FILE).read_text())
  directory = _copy(saved, tmp_path, config={**config, "exclude_modules": exclude_modules})
  with pytest.raises(ValueError, match=r"adapts 'model\.up_proj', which exclude_modules="):
    peft.load_peft(directory, MLP(nnx.Rngs(0)), module_names=PEFT_NAMES)
  config["exclude_modules"] = ["gate_proj"]  # excludes a module the file does not adapt: fine
  adapter = peft.load_peft(_copy(saved, tmp_path, config=config), MLP(nnx.Rngs(0)),
                           module_names=PEFT_NAMES)  # fmt: skip
  assert sorted(adapter["weights"]) == ["down", "up"]


def test_load_peft_refuses_layers_pattern(saved, tmp_path):
  config = json.loads((saved / peft.CONFIG_FILE).read_text())
  directory = _copy(saved, tmp_path, config={**config, "layers_pattern": "layers"})
  with pytest.raises(ValueError, match=r"field layers_pattern='layers' is not supported"):
    peft.load_peft(directory, MLP(nnx.Rngs(0)), module_names=PEFT_NAMES)


# ---------------------------- 10. PEFT: a Linear-like Einsum, and stacks refused


class Projection(nnx.Module):
  """An einsum whose kernel lists an output axis before the contracted one: ``[h, d, k]``."""

  def __init__(self, rngs):
    self.proj = nnx.Einsum("btd,hdk->bthk", (2, 4, 3), rngs=rngs)

  def __call__(self, x):
    return self.proj(x)


def test_a_linear_like_einsum_is_written_as_peft_applies_it(tmp_path):
  base = Projection(nnx.Rngs(0))
  model, _ = dl.adapt_nnx(Projection(nnx.Rngs(0)), rank=2, alpha=3.0, use_delta=False,
                          rngs=nnx.Rngs(1))  # fmt: skip
  rng = np.random.default_rng(1)
  model.proj.lora_b[...] = jnp.asarray(rng.standard_normal(model.proj.lora_b.shape), jnp.float32)
  peft.save_peft(tmp_path, model, module_names={"proj": "attn.proj"})
  tensors = safetensors_numpy.load_file(tmp_path / peft.WEIGHTS_FILE)
  weight_a = tensors["base_model.model.attn.proj.lora_A.weight"].astype(np.float64)
  weight_b = tensors["base_model.model.attn.proj.lora_B.weight"].astype(np.float64)
  assert weight_a.shape == (2, 4) and weight_b.shape == (6, 2)  # [r, d], [h k, r]
  # PEFT's nn.Linear branch: s x lora_A^T lora_B^T, its output axis (h, k) row-major.
  x = np.asarray(jax.random.normal(jax.random.key(2), (2, 5, 4)), np.float64)
  peft_change = 1.5 * x @ weight_a.T @ weight_b.T
  xj = jnp.asarray(x, jnp.float32)
  flax_change = np.asarray(model(xj) - base(xj), np.float64).reshape(2, 5, 6)
  np.testing.assert_allclose(peft_change, flax_change, rtol=1e-5, atol=1e-5)
  fresh = Projection(nnx.Rngs(0))
  adapter = peft.load_peft(tmp_path, fresh, module_names={"proj": "attn.proj"})
  fresh, _ = dl.attach_adapter_nnx(fresh, adapter)
  np.testing.assert_allclose(fresh(xj), model(xj), rtol=1e-5, atol=1e-6)


class ScanBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return nn.Dense(4, name="dense")(x), None


class LinenScan(nn.Module):
  axis: int = 0

  @nn.compact
  def __call__(self, x):
    blocks = nn.scan(
      ScanBlock, variable_axes={"params": self.axis}, split_rngs={"params": True}, length=3
    )
    return blocks(name="blocks")(x, None)[0]


def test_a_stack_of_layers_is_refused_by_save_and_load_peft(tmp_path):
  pretrained = LinenScan().init(jax.random.key(0), X)
  adapted, variables, _ = dl.adapt_linen(
    LinenScan(), pretrained, X, rank=1, use_delta=False, key=jax.random.key(1)
  )
  names = {"blocks/dense": "layers.dense"}
  match = r"the layer 'blocks/dense' is a stack of \(3,\) layers \(nn\.scan, nnx\.vmap\)"
  with pytest.raises(ValueError, match=match):
    peft.save_peft(tmp_path, variables, adapted, module_names=names)
  peft.save_peft(tmp_path, _trained_nnx(), module_names={"up": "layers.dense"})
  with pytest.raises(ValueError, match=match):
    peft.load_peft(tmp_path, LinenScan(), X, variables=pretrained, module_names=names)


# ------------------------------------------------------------ 9, 10. scans


class DeltaBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return dl.DeltaLoRADense(4, rank=1, name="dense")(x), None


class HandScan(nn.Module):
  """A stack of ``DeltaLoRADense`` written by hand with ``nn.scan``."""

  variable_axes: tuple = (("params", 0),)

  @nn.compact
  def __call__(self, x):
    blocks = nn.scan(
      DeltaBlock, variable_axes=dict(self.variable_axes), split_rngs={"params": True}, length=3
    )
    return blocks(name="blocks")(x, None)[0]


def test_a_hand_written_scan_without_delta_says_to_lift_it():
  lift = r"variable_axes=\{'params': 0, 'delta': 0\}"
  with pytest.raises(ValueError, match=rf"blocks/dense cannot create D: .* not lifted; .*{lift}"):
    HandScan().init(jax.random.key(0), X)
  lifted = HandScan((("params", 0), ("delta", 0)))
  variables = lifted.init(jax.random.key(0), X)
  assert variables["delta"]["blocks"]["dense"]["delta"].shape == (3, 4, 4)
  np.testing.assert_array_equal(lifted.apply(variables, X).shape, (2, 4))
  with pytest.raises(ValueError, match=rf"needs the 'delta' collection: .*{lift}"):
    HandScan().apply(variables, X)  # the scan does not lift 'delta' at apply either


@pytest.mark.parametrize("axis", [1, -1])
def test_adapting_a_stack_on_another_axis_than_0_is_refused(axis):
  pretrained = LinenScan(axis).init(jax.random.key(0), X)
  assert pretrained["params"]["blocks"]["dense"]["kernel"].shape != (3, 4, 4)  # not leading
  with pytest.raises(
    ValueError,
    match=r"the kernel at 'blocks/dense' is stored with shape .*, but one call of the layer uses "
    r"a kernel \(4, 4\): the stack axes of nn.scan / nn.vmap must lead",
  ):
    dl.adapt_linen(LinenScan(axis), pretrained, X, rank=1, key=jax.random.key(1))
  dl.adapt_linen(LinenScan(0), LinenScan(0).init(jax.random.key(0), X), X, rank=1,
                 key=jax.random.key(1))  # fmt: skip


# --------------------------------------- 10. bfloat16 model, dtype=None


class BF16MLP(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(4, 8, param_dtype=jnp.bfloat16, rngs=rngs)
    self.down = nnx.Linear(8, 1, param_dtype=jnp.bfloat16, rngs=rngs)

  def __call__(self, x):
    return self.down(nnx.relu(self.up(x)))


class LinenBF16MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(8, param_dtype=jnp.bfloat16, name="up")(x))
    return nn.Dense(1, param_dtype=jnp.bfloat16, name="down")(h)


@pytest.mark.parametrize("evaluation", ["merged", "factored"])
def test_a_bfloat16_model_keeps_the_base_dtype_rule_when_adapted(evaluation):
  x16 = jax.random.normal(jax.random.key(3), (5, 4), jnp.bfloat16)
  base = BF16MLP(nnx.Rngs(0))
  model, _ = dl.adapt_nnx(BF16MLP(nnx.Rngs(0)), rank=1, evaluation=evaluation, rngs=nnx.Rngs(1))
  assert model.up.lora_a.dtype == jnp.float32 and model.up.delta.dtype == jnp.float32
  pretrained = LinenBF16MLP().init(jax.random.key(0), x16)
  adapted, variables, _ = dl.adapt_linen(
    LinenBF16MLP(), pretrained, x16, rank=1, evaluation=evaluation, key=jax.random.key(1)
  )
  # bfloat16 in: bfloat16 out; float32 in: float32 out (Flax's base layer needs standard
  # promotion for that one).
  with jax.numpy_dtype_promotion("standard"):
    for x in (x16, x16.astype(jnp.float32)):
      assert model(x).dtype == base(x).dtype == x.dtype
      np.testing.assert_array_equal(model(x), base(x))  # B = D = 0: the base's very numbers
      want = LinenBF16MLP().apply(pretrained, x)
      assert adapted.apply(variables, x).dtype == want.dtype == x.dtype
      np.testing.assert_array_equal(adapted.apply(variables, x), want)
  layer = dl.DeltaLoRADense(3, rank=1, param_dtype=jnp.bfloat16)  # the layer written by hand
  assert layer.apply(layer.init(jax.random.key(0), x16), x16).dtype == jnp.bfloat16


def test_a_trained_bfloat16_adapter_matches_float64_to_bfloat16_rounding():
  x = jax.random.normal(jax.random.key(3), (5, 4), jnp.bfloat16)
  model, _ = dl.adapt_nnx(BF16MLP(nnx.Rngs(0)), ["up"], rank=2, alpha=4.0, rngs=nnx.Rngs(1))
  rng = np.random.default_rng(2)
  up = model.up
  up.lora_b[...] = jnp.asarray(rng.standard_normal(up.lora_b.shape), jnp.float32)
  up.delta[...] = jnp.asarray(rng.standard_normal(up.delta.shape), jnp.float32)
  got = up(x)
  assert got.dtype == jnp.bfloat16
  f = {k: np.asarray(getattr(up, k)[...], np.float64) for k in ("kernel", "bias", "lora_a",
                                                               "lora_b", "delta")}  # fmt: skip
  x64 = np.asarray(x, np.float64)
  want = x64 @ (f["kernel"] + 2.0 * f["lora_a"] @ f["lora_b"] + 0.1 * f["delta"]) + f["bias"]
  scale = np.abs(x64) @ (np.abs(f["kernel"]) + 2.0 * np.abs(f["lora_a"]) @ np.abs(f["lora_b"])
                         + 0.1 * np.abs(f["delta"])) + np.abs(f["bias"])  # fmt: skip
  eps = float(jnp.finfo(jnp.bfloat16).eps)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=8 * eps * scale.max())
