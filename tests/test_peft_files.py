"""Hugging Face PEFT LoRA directories: written and read with numpy and safetensors alone.

Each test builds small models (a dense, a dense-general and a 2-D conv
layer), fills the adapters with random values as if trained, and checks
the files against PEFT's format and closed-form references (float64).
"""

import json
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import numpy as safetensors_numpy
from safetensors import safe_open

import deltalora_jax as dl
from deltalora_jax import core
from deltalora_jax.adapt import peft
from deltalora_jax.config import LayerConfig
from deltalora_jax.projections import GeneralDense

IN, HIDDEN, HEADS, HEAD, CH = 6, 8, 2, 4, 3
NAMES = {"up": "model.up_proj", "heads": "model.heads", "conv": "model.conv"}


class Net(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(IN, HIDDEN, rngs=rngs)
    self.heads = nnx.LinearGeneral(HIDDEN, (HEADS, HEAD), rngs=rngs)
    self.conv = nnx.Conv(CH, 4, kernel_size=(3, 3), rngs=rngs)

  def __call__(self, x, image):
    h = self.heads(jnp.tanh(self.up(x)))
    return h.reshape(*h.shape[:-2], -1), self.conv(image)


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x, image):
    h = nn.DenseGeneral((HEADS, HEAD), name="heads")(jnp.tanh(nn.Dense(HIDDEN, name="up")(x)))
    return h.reshape(*h.shape[:-2], -1), nn.Conv(4, (3, 3), name="conv")(image)


X = jax.random.normal(jax.random.key(10), (2, IN))
IMAGE = jax.random.normal(jax.random.key(11), (2, 5, 5, CH))
OVERRIDES = {"heads": {"rank": 3, "alpha": 6.0}}


def _trained(arrays, seed):
  """Random values for every adapter array (as if trained)."""
  keys = jax.random.split(jax.random.key(seed), len(arrays))
  return {
    name: 0.3 * jax.random.normal(key, value.shape, value.dtype)
    for key, (name, value) in zip(keys, sorted(arrays.items()), strict=True)
  }


def _nnx_model(use_delta=False, use_rslora=False, seed=0):
  model, _ = dl.adapt_nnx(
    Net(nnx.Rngs(0)),
    rank=2,
    alpha=4.0,
    use_delta=use_delta,
    use_rslora=use_rslora,
    overrides=OVERRIDES,
    rngs=nnx.Rngs(1),
  )
  for i, name in enumerate(NAMES):
    layer = getattr(model, name)
    arrays = {"lora_a": layer.lora_a[...], "lora_b": layer.lora_b[...]}
    if layer.delta is not None:
      arrays["delta"] = layer.delta[...]
    for key, value in _trained(arrays, seed + i).items():
      getattr(layer, key)[...] = value
  return model


def _close(got, want, rtol=1e-5, atol=1e-6):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol)


# ----------------------------------------------------------------- round trips


@pytest.mark.parametrize("use_rslora", [False, True])
def test_nnx_round_trip_gives_the_same_outputs(tmp_path, use_rslora):
  model = _nnx_model(use_rslora=use_rslora)
  report = peft.save_peft(tmp_path, model, module_names=NAMES)
  assert {n: e["relative_error"] for n, e in report["layers"].items()} == dict.fromkeys(NAMES, 0.0)
  fresh = Net(nnx.Rngs(0))
  adapter = peft.load_peft(tmp_path, fresh, module_names=NAMES)
  assert {n: c["use_delta"] for n, c in adapter["config"].items()} == dict.fromkeys(NAMES, False)
  fresh, _ = dl.attach_adapter_nnx(fresh, adapter)
  assert fresh.heads.config.rank == 3 and fresh.heads.config.use_rslora is use_rslora
  _close(fresh(X, IMAGE), model(X, IMAGE))


def test_linen_round_trip_gives_the_same_outputs(tmp_path):
  pretrained = LinenNet().init(jax.random.key(0), X, IMAGE)
  adapted, variables, _ = dl.adapt_linen(
    LinenNet(), pretrained, X, IMAGE, rank=2, use_delta=False, key=jax.random.key(1)
  )
  flat = dict(jax.tree_util.tree_flatten_with_path(variables["params"])[0])
  lora = {k: v for k, v in flat.items() if k[-1].key in ("lora_a", "lora_b")}
  trained = _trained({jax.tree_util.keystr(k): v for k, v in lora.items()}, 5)
  params = jax.tree_util.tree_map_with_path(
    lambda k, v: trained.get(jax.tree_util.keystr(k), v), variables["params"]
  )
  variables = {**variables, "params": params}
  names = lambda name: f"model.{name}"  # noqa: E731  (a callable, not a mapping)
  peft.save_peft(tmp_path, variables, adapted, module_names=names)
  adapter = peft.load_peft(tmp_path, LinenNet(), X, IMAGE, variables=pretrained, module_names=names)
  again, restored, _ = dl.attach_adapter_linen(LinenNet(), pretrained, adapter)
  _close(again.apply(restored, X, IMAGE), adapted.apply(variables, X, IMAGE))


# ----------------------------------------------------------------- the format


def test_files_have_peft_keys_shapes_dtypes_and_config(tmp_path):
  model = _nnx_model()
  peft.save_peft(
    tmp_path, model, module_names=NAMES, task_type="CAUSAL_LM", base_model_name_or_path="tiny"
  )
  assert sorted(p.name for p in tmp_path.iterdir()) == [
    "adapter_config.json",
    "adapter_model.safetensors",
  ]
  with safe_open(str(tmp_path / "adapter_model.safetensors"), "numpy") as file:
    assert file.metadata() == {"format": "pt"}
  tensors = safetensors_numpy.load_file(tmp_path / "adapter_model.safetensors")
  shapes = {key: value.shape for key, value in tensors.items()}
  assert shapes == {
    "base_model.model.model.up_proj.lora_A.weight": (2, IN),
    "base_model.model.model.up_proj.lora_B.weight": (HIDDEN, 2),
    "base_model.model.model.heads.lora_A.weight": (3, HIDDEN),
    "base_model.model.model.heads.lora_B.weight": (HEADS * HEAD, 3),
    "base_model.model.model.conv.lora_A.weight": (2, CH, 3, 3),
    "base_model.model.model.conv.lora_B.weight": (4, 2, 1, 1),
  }
  assert {value.dtype for value in tensors.values()} == {np.dtype("float32")}
  # PyTorch layouts: A.T, B.T; the DenseGeneral's features flattened row-major; conv transposed.
  up, heads, conv = model.up, model.heads, model.conv
  got = lambda key: tensors[f"base_model.model.model.{key}.weight"]  # noqa: E731
  np.testing.assert_array_equal(got("up_proj.lora_A"), np.asarray(up.lora_a[...]).T)
  np.testing.assert_array_equal(got("heads.lora_B"), np.asarray(heads.lora_b[...]).reshape(3, 8).T)
  np.testing.assert_array_equal(
    got("conv.lora_A"), np.transpose(np.asarray(conv.lora_a[...]), (3, 2, 0, 1))
  )
  np.testing.assert_array_equal(got("conv.lora_B")[:, :, 0, 0], np.asarray(conv.lora_b[...]).T)
  expected = {
    "alpha_pattern": {"model.heads": 6},
    "auto_mapping": None,
    "base_model_name_or_path": "tiny",
    "bias": "none",
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_lora_weights": True,
    "layer_replication": None,
    "layers_pattern": None,
    "layers_to_transform": None,
    "loftq_config": {},
    "lora_alpha": 4,
    "lora_dropout": 0.0,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "modules_to_save": None,
    "peft_type": "LORA",
    "r": 2,
    "rank_pattern": {"model.heads": 3},
    "revision": None,
    "target_modules": ["model.conv", "model.heads", "model.up_proj"],
    "task_type": "CAUSAL_LM",
    "use_dora": False,
    "use_rslora": False,
  }
  assert json.loads((tmp_path / "adapter_config.json").read_text()) == expected


# ----------------------------------------------------------------- the rules


def _dense_parts(layer):
  s = layer.config.scaling
  a = np.asarray(layer.lora_a[...], np.float64).reshape(-1, layer.config.rank)
  b = np.asarray(layer.lora_b[...], np.float64).reshape(layer.config.rank, -1)
  return s, a, b


def _written_change(tmp_path, module, rank, alpha, conv=False):
  tensors = safetensors_numpy.load_file(tmp_path / "adapter_model.safetensors")
  a = tensors[f"base_model.model.{module}.lora_A.weight"].astype(np.float64)
  b = tensors[f"base_model.model.{module}.lora_B.weight"].astype(np.float64)
  if conv:  # [k, in, *win] -> [*win*in, k]; [out, k, 1, 1] -> [k, out]
    a = np.transpose(a, (2, 3, 1, 0)).reshape(-1, rank).T
    b = b[:, :, 0, 0]
  return (alpha / rank) * (b @ a).T  # [in, out]


def test_paper_rule_writes_the_rank_2r_change_to_float32_rounding(tmp_path):
  base = Net(nnx.Rngs(0))
  model = _nnx_model()
  # The paper's rule moves W by lam s (A_T B_T - A_0 B_0) (B_0 != 0 here: rank 2r).
  lam = 2.0
  expected = {}
  for i, name in enumerate(NAMES):
    layer = getattr(model, name)
    s, a, b = _dense_parts(layer)
    a0 = np.asarray(jax.random.normal(jax.random.key(40 + i), a.shape), np.float64)
    b0 = np.asarray(jax.random.normal(jax.random.key(50 + i), b.shape), np.float64)
    w0 = np.asarray(layer.kernel[...], np.float64).reshape(a.shape[0], -1)
    wt = (w0 + lam * s * (a @ b - a0 @ b0)).astype(np.float32)
    layer.kernel[...] = jnp.asarray(wt.reshape(layer.kernel.shape))
    expected[name] = wt.astype(np.float64) - w0 + s * a @ b
  report = peft.save_peft(tmp_path, model, module_names=NAMES, base=base, rule="paper")
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  for name, module in NAMES.items():
    r = 2 * getattr(model, name).config.rank
    assert report["layers"][name]["rank"] == r
    alpha = config["alpha_pattern"].get(module, config["lora_alpha"])
    got = _written_change(tmp_path, module, r, alpha, conv=name == "conv")
    want = expected[name]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-6
    assert report["layers"][name]["relative_error"] < 1e-6


def test_seed_rule_truncated_svd_error_is_eckart_young(tmp_path):
  model = _nnx_model(use_delta=True)
  report = peft.save_peft(
    tmp_path, model, module_names=NAMES, rule="seed", rank=2, sample=(X, IMAGE)
  )
  for name, module in NAMES.items():
    layer = getattr(model, name)
    s, a, b = _dense_parts(layer)
    delta = np.asarray(layer.delta[...], np.float64).reshape(a.shape[0], -1)
    change = s * a @ b + layer.config.delta_scaling * delta
    values = np.linalg.svd(change, compute_uv=False)
    eckart_young = math.sqrt(np.sum(values[2:] ** 2)) / np.linalg.norm(change)
    assert eckart_young > 1e-3  # a real truncation
    np.testing.assert_allclose(report["layers"][name]["relative_error"], eckart_young, rtol=1e-4)
    got = _written_change(tmp_path, module, 2, 2, conv=name == "conv")
    np.testing.assert_allclose(
      np.linalg.norm(got - change) / np.linalg.norm(change), eckart_young, rtol=1e-4
    )
  assert 0.0 < report["output_error"] < 1.0


def test_seed_rule_merged_weights_are_w_plus_sab_plus_ds_d(tmp_path):
  model = _nnx_model(use_delta=True)
  report = peft.save_peft(tmp_path, model, module_names=NAMES, rule="seed", merged=True)
  assert report["files"] == ["model.safetensors"]
  tensors = safetensors_numpy.load_file(tmp_path / "model.safetensors")
  assert sorted(tensors) == sorted(f"{m}.{p}" for m in NAMES.values() for p in ("bias", "weight"))
  for name, module in NAMES.items():
    layer = getattr(model, name)
    s, a, b = _dense_parts(layer)
    kernel = np.asarray(layer.kernel[...], np.float64)
    merged = (
      kernel
      + (s * a @ b).reshape(kernel.shape)
      + layer.config.delta_scaling * np.asarray(layer.delta[...], np.float64)
    )
    if name == "conv":
      want = np.transpose(merged, (3, 2, 0, 1))
    else:
      want = merged.reshape(a.shape[0], -1).T
    np.testing.assert_allclose(tensors[f"{module}.weight"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(
      tensors[f"{module}.bias"], np.asarray(layer.bias[...]).reshape(-1)
    )


def test_seed_rule_without_rank_or_merged_is_refused(tmp_path):
  with pytest.raises(ValueError, match="never truncated silently"):
    peft.save_peft(tmp_path, _nnx_model(use_delta=True), module_names=NAMES, rule="seed")
  with pytest.raises(ValueError, match="rule='paper' needs base="):
    peft.save_peft(tmp_path, _nnx_model(), module_names=NAMES, rule="paper")
  with pytest.raises(ValueError, match="use_delta=True"):
    peft.save_peft(tmp_path, _nnx_model(use_delta=True), module_names=NAMES)


def test_an_einsum_with_batch_axes_is_refused_by_name(tmp_path):
  class Heads(nnx.Module):
    def __init__(self, rngs):
      self.mix = nnx.Einsum("bnd,ndh->bnh", (HEADS, IN, HEAD), rngs=rngs)

  model, _ = dl.adapt_nnx(Heads(nnx.Rngs(0)), rank=2, use_delta=False, rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="'mix' is an Einsum 'bnd,ndh->bnh' with batch axes"):
    peft.save_peft(tmp_path, model, module_names={"mix": "mix"})


# ----------------------------------------------------------------- reading refusals


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  directory = tmp_path_factory.mktemp("peft")
  peft.save_peft(directory, _nnx_model(), module_names=NAMES)
  return directory


def test_a_pickled_bin_is_refused(tmp_path):
  (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
  (tmp_path / "adapter_model.bin").write_bytes(b"not unpickled")
  with pytest.raises(ValueError, match=r"adapter_model\.bin, a pickle, which is never loaded"):
    peft.load_peft(tmp_path, Net(nnx.Rngs(0)), module_names=NAMES)


@pytest.mark.parametrize(
  ("field", "value"),
  [
    ("use_dora", True),
    ("lora_bias", True),
    ("bias", "all"),
    ("fan_in_fan_out", True),
    ("modules_to_save", ["classifier"]),
  ],
)
def test_each_unsupported_field_is_refused_by_name(saved, tmp_path, field, value):
  config = json.loads((saved / "adapter_config.json").read_text())
  (tmp_path / "adapter_config.json").write_text(json.dumps({**config, field: value}))
  (tmp_path / "adapter_model.safetensors").write_bytes(
    (saved / "adapter_model.safetensors").read_bytes()
  )
  with pytest.raises(ValueError, match=re.escape(f"field {field}={value!r} is not supported")):
    peft.load_peft(tmp_path, Net(nnx.Rngs(0)), module_names=NAMES)


def test_a_module_no_layer_maps_to_is_refused(saved):
  with pytest.raises(ValueError, match=r"adapts the module 'model\.conv'"):
    peft.load_peft(saved, Net(nnx.Rngs(0)), module_names={"up": "model.up_proj"})


# ----------------------------------------------------------------- rsLoRA, initializers


def test_rslora_scaling_is_alpha_over_sqrt_r():
  assert core.lora_scaling(6.0, 9, use_rslora=True) == 2.0
  config = LayerConfig(GeneralDense(features=(8,)), rank=4, alpha=6.0, use_rslora=True)
  assert config.scaling == 3.0
  assert LayerConfig.from_json(config.to_json()) == config
  old = LayerConfig(GeneralDense(features=(8,)), rank=4, alpha=6.0).to_json()
  assert "use_rslora" not in old and LayerConfig.from_json(old).scaling == 1.5
  layer = dl.DeltaLoRADense(8, rank=4, alpha=6.0, use_rslora=True)
  assert layer.scaling == 3.0


def test_peft_initializers_statistics():
  a = core.kaiming_uniform_init()(jax.random.key(0), (3, 3, 64, 512), jnp.float32)
  bound = 1 / math.sqrt(3 * 3 * 64)  # kaiming_uniform_(a=sqrt(5)) on [r, in, 3, 3]
  assert float(jnp.max(jnp.abs(a))) <= bound
  np.testing.assert_allclose(float(jnp.max(jnp.abs(a))), bound, rtol=1e-2)
  np.testing.assert_allclose(float(jnp.std(a)), bound / math.sqrt(3), rtol=2e-2)
  g = core.gaussian_init(8)(jax.random.key(1), (4096, 8), jnp.float32)
  np.testing.assert_allclose(float(jnp.std(g)), 1 / 8, rtol=2e-2)
  model, _ = dl.adapt_nnx(
    Net(nnx.Rngs(0)), "up", rank=2, lora_a_init=core.kaiming_uniform_init(), rngs=nnx.Rngs(1)
  )
  assert float(jnp.max(jnp.abs(model.up.lora_a[...]))) <= 1 / math.sqrt(IN)
