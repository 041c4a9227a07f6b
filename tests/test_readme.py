"""The README's quickstart runs as written and trains."""

import pathlib
import re

import jax
import numpy as np

README = pathlib.Path(__file__).parents[1] / "README.md"


def test_quickstart_runs_and_loss_falls(capsys):
  text = README.read_text()
  section = text.split("## Quickstart", 1)[1]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  namespace = {}
  # A user runs with JAX's default (standard) dtype promotion; optax.adam's bias
  # correction mixes a float with its int32 count, which strict mode refuses.
  with jax.numpy_dtype_promotion("standard"):
    exec(compile(code, "README-quickstart", "exec"), namespace)
  assert float(namespace["loss"]) < 0.2  # starts near 1.0
  assert "delta" not in namespace["merged"]
  assert "loss after 200 steps" in capsys.readouterr().out


def _section_blocks(heading):
  section = README.read_text().split(heading, 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```python\n(.*?)```", section, re.S)


def test_adapting_attention_einsum_conv_section_runs(capsys):
  attention, einsum_conv = _section_blocks(
    "## Adapting attention, Einsum, Conv and scanned models"
  )[:2]
  ns = {}
  with jax.numpy_dtype_promotion("standard"):  # optax.adam mixes its int32 count
    exec(compile(attention, "README-attention", "exec"), ns)
  x, y = ns["x"], ns["y"]
  start = jax.numpy.mean((ns["Block"]().apply(ns["pretrained"], x) - y) ** 2)
  assert float(ns["loss"]) < 0.5 * float(start)
  # The merged plain model computes what the adapted one does.
  np.testing.assert_allclose(
    ns["model"].apply(ns["merged"], x),
    ns["adapted"].apply(ns["variables"], x),
    rtol=1e-4,
    atol=1e-5,
  )
  out = capsys.readouterr().out
  assert "attn/query" in out and "(4, 4, 8)" in out
  ns = {}
  exec(compile(einsum_conv, "README-einsum-conv", "exec"), ns)
  out = capsys.readouterr().out
  assert "DeltaLoRALinearGeneral (16, 2) (2, 2, 8)" in out
  assert "DeltaLoRALinearGeneral (3, 16, 2) (2, 4)" in out
  assert type(ns["merged"].proj).__name__ == "Einsum"
  assert type(ns["merged"].conv).__name__ == "Conv"


def test_adapting_scanned_stack_section_runs(capsys):
  stack = _section_blocks("## Adapting attention, Einsum, Conv and scanned models")[2]
  ns = {}
  exec(compile(stack, "README-scan", "exec"), ns)
  out = capsys.readouterr().out
  assert "(4, 16, 2)" in out and "(4, 16, 16)" in out
  assert ns["grads"]["delta"]["blocks"]["mlp"]["delta"].shape == (4, 16, 16)
  np.testing.assert_allclose(
    ns["model"].apply(ns["merged"], ns["x"]), ns["adapted"].apply(ns["variables"], ns["x"])
  )
