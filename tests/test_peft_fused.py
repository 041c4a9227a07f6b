"""save_peft of a fused kernel (tunix's kv_einsum): one PEFT module per part, exactly."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors import numpy as safetensors_numpy

import deltalora_jax as dl

K, D, H, R = 2, 6, 3, 2  # key-value heads, model width, head size, rank
NAMES = {"kv": ("attn.k_proj", "attn.v_proj")}


class Model(nnx.Module):
  def __init__(self, rngs):
    # Gemma's kv_einsum as Flax's Einsum: the kernel (2, K, D, H), keys then values.
    self.kv = nnx.Einsum("BSD,CKDH->CBSKH", (2, K, D, H), rngs=rngs)


def adapted(use_delta: bool) -> nnx.Module:
  model, _ = dl.adapt_nnx(Model(nnx.Rngs(0)), rank=R, alpha=4.0, use_delta=use_delta,
                          rngs=nnx.Rngs(1))
  model.kv.lora_b[...] = jax.random.normal(jax.random.key(2), model.kv.lora_b.shape)
  if use_delta:
    model.kv.delta[...] = jax.random.normal(jax.random.key(3), model.kv.delta.shape)
  return model


def torch_layout(part: np.ndarray) -> np.ndarray:
  """A part's kernel (K, D, H) as PyTorch's k_proj/v_proj weight [K * H, D]."""
  return np.transpose(part, (0, 2, 1)).reshape(K * H, D)


def test_the_parts_share_a_and_split_b_exactly(tmp_path):
  model = adapted(use_delta=False)
  report = dl.save_peft(tmp_path, model, module_names=NAMES)
  assert report["layers"]["kv"]["module"] == ["attn.k_proj", "attn.v_proj"]
  tensors = safetensors_numpy.load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  assert config["target_modules"] == ["attn.k_proj", "attn.v_proj"]
  scaling = config["lora_alpha"] / config["r"]
  a = np.asarray(model.kv.lora_a[...], np.float64)
  b = np.asarray(model.kv.lora_b[...], np.float64)
  change = 2.0 * np.einsum("dr,rckh->ckdh", a, b)  # s A B in the kernel's layout, s = 4 / 2
  for index, module in enumerate(NAMES["kv"]):
    lora_a = tensors[f"base_model.model.{module}.lora_A.weight"].astype(np.float64)
    lora_b = tensors[f"base_model.model.{module}.lora_B.weight"].astype(np.float64)
    assert lora_a.shape == (R, D) and lora_b.shape == (K * H, R)
    np.testing.assert_allclose(lora_a, a.T, rtol=1e-6)  # shared
    np.testing.assert_allclose(
      scaling * lora_b @ lora_a, torch_layout(change[index]), rtol=1e-5, atol=1e-6
    )


def test_the_merged_weights_split_by_part(tmp_path):
  model = adapted(use_delta=True)
  dl.save_peft(tmp_path, model, module_names=NAMES, rule="seed", merged=True)
  state = safetensors_numpy.load_file(os.path.join(tmp_path, "model.safetensors"))
  merged = np.asarray(dl.merge(model).kv.kernel[...], np.float64)  # W + s A B + ds D
  for index, module in enumerate(NAMES["kv"]):
    np.testing.assert_allclose(
      state[f"{module}.weight"], torch_layout(merged[index]), rtol=1e-5, atol=1e-6
    )


def test_a_wrong_number_of_parts_or_reading_them_back_is_refused(tmp_path):
  model = adapted(use_delta=False)
  with pytest.raises(ValueError, match=r"gives 3 modules for the layer 'kv'.*has size 2"):
    dl.save_peft(tmp_path, model, module_names={"kv": ("q", "k", "v")})
  with pytest.raises(TypeError, match="a non-empty tuple of them"):
    dl.save_peft(tmp_path, model, module_names={"kv": ("k", "")})
  dl.save_peft(tmp_path, model, module_names=NAMES)
  with pytest.raises(ValueError, match="load_peft reads one module per layer"):
    dl.load_peft(tmp_path, Model(nnx.Rngs(0)), module_names=NAMES)
