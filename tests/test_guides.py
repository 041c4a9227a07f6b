"""The guides (``docs/guides``) run as written: every ```python block runs in some test.

This file runs the blocks that no test of their subject runs (attention, Einsum, Conv
and scanned stacks; mixed precision; a step's cost), and checks that each block of every
guide is covered (``_docs.COVERED``).
"""

import ast
import re

import _docs
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deltalora_jax as dl

GUIDES = sorted(path.name for path in _docs.GUIDES.glob("*.md"))


def test_the_guides_are_the_sites_pages():
  index = (_docs.ROOT / "docs" / "index.md").read_text()
  assert sorted(f"{page}.md" for page in re.findall(r"^guides/(\w+)$", index, re.M)) == GUIDES


def _test_exists(node: str) -> bool:
  file, name = node.split("::")
  tree = ast.parse((_docs.ROOT / file).read_text())
  return any(isinstance(f, ast.FunctionDef) and f.name == name for f in tree.body)


def test_every_python_block_of_every_guide_runs_in_a_test():
  uncovered = []
  for guide in GUIDES:
    for heading, blocks in _docs.sections((_docs.GUIDES / guide).read_text()).items():
      if blocks and (guide, None) not in _docs.COVERED and (guide, heading) not in _docs.COVERED:
        uncovered.append(f"{guide}, section {heading!r}: {len(blocks)} block(s)")
  assert not uncovered, (
    f"```python blocks no test runs (add one, and to _docs.COVERED): {uncovered}"
  )
  for (guide, heading), tests in _docs.COVERED.items():
    assert _docs.code_blocks(guide, heading), f"{guide} {heading!r} has no ```python block"
    missing = [node for node in tests if not _test_exists(node)]
    assert not missing, f"no such test: {missing}"


def test_the_coverage_check_sees_every_block():
  # A block under a '#' code comment, after a bash block, in a ### subsection.
  text = "# T\n\n```python\na = 1\n```\n\n## One\n\n```bash\n# not a heading\n```\n\n"
  text += "### Sub\n\n```python\n# comment\nb = 2\n```\n\n## Two\n\nNo code.\n"
  assert _docs.sections(text) == {None: ["a = 1\n"], "One": ["# comment\nb = 2\n"], "Two": []}
  assert _docs.python_blocks(text) == ["a = 1\n", "# comment\nb = 2\n"]


# ---------------------------------------------------------------- adapting.md

EVERY_KIND = "Every layer kind: attention, Einsum, Conv and scanned stacks"


def test_adapting_attention_einsum_conv_blocks_run(capsys):
  attention, einsum_conv, _ = _docs.code_blocks("adapting.md", EVERY_KIND)
  ns = _docs.run(attention, {}, "adapting-attention")
  x, y = ns["x"], ns["y"]
  start = jnp.mean((ns["Block"]().apply(ns["pretrained"], x) - y) ** 2)
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
  ns = _docs.run(einsum_conv, {}, "adapting-einsum-conv")
  out = capsys.readouterr().out
  assert "DeltaLoRALinearGeneral (16, 2) (2, 2, 8)" in out
  assert "DeltaLoRALinearGeneral (3, 16, 2) (2, 4)" in out
  assert type(ns["merged"].proj).__name__ == "Einsum"
  assert type(ns["merged"].conv).__name__ == "Conv"


def test_adapting_scanned_stack_block_runs(capsys):
  *_, stack = _docs.code_blocks("adapting.md", EVERY_KIND)
  ns = _docs.run(stack, {}, "adapting-scan")
  out = capsys.readouterr().out
  assert "(4, 16, 2)" in out and "(4, 16, 16)" in out
  assert ns["grads"]["delta"]["blocks"]["mlp"]["delta"].shape == (4, 16, 16)
  np.testing.assert_allclose(
    ns["model"].apply(ns["merged"], ns["x"]), ns["adapted"].apply(ns["variables"], ns["x"])
  )


# ---------------------------------------------------------- mixed_precision.md


def _dtypes(tree):
  return jax.tree.map(lambda leaf: jnp.dtype(leaf.dtype).name, tree)


def test_mixed_precision_guide_runs(capsys):
  linen, velocity, nnx_block, int8, nf4 = _docs.code_blocks("mixed_precision.md")
  bf16, f32 = "bfloat16", "float32"

  # Linen: a bfloat16 base and compute, float32 factors, D and velocity.
  ns = _docs.run(linen, {}, "mixed-precision-linen")
  model, x, y = ns["model"], ns["x"], ns["y"]
  start = model.init(jax.random.key(1), x)
  layer = {"kernel": bf16, "bias": bf16, "lora_a": f32, "lora_b": f32}
  assert _dtypes(ns["variables"]) == {
    "params": {"hidden": layer, "out": layer},
    "delta": {"hidden": {"delta": f32}, "out": {"delta": f32}},
  }
  assert _dtypes(dl.velocity(ns["opt_state"])["delta"]) == _dtypes(ns["variables"]["delta"])
  grads = jax.jit(jax.grad(lambda v: jnp.mean(model.apply(v, x).astype(jnp.float32))))(start)
  assert _dtypes(grads) == _dtypes(start)  # each gradient in its parameter's dtype
  first = float(jnp.mean((model.apply(start, x).astype(jnp.float32) - y) ** 2))
  assert float(ns["loss"]) < 0.5 * first
  assert model.apply(ns["variables"], x).dtype == jnp.bfloat16
  plain = {"kernel": bf16, "bias": bf16}  # the merged model: nn.Dense layers
  assert _dtypes(ns["merged"]) == {"params": {"hidden": plain, "out": plain}}
  out = capsys.readouterr().out
  assert "'kernel': 'bfloat16', 'bias': 'bfloat16', 'lora_a': 'float32'" in out
  assert out.splitlines()[1:] == ["float32", "bfloat16"]

  # A bfloat16 velocity beside a float32 D.
  _docs.run(velocity, ns, "mixed-precision-velocity")
  assert capsys.readouterr().out == "bfloat16\n"
  v = ns["velocity"]["delta"]
  assert (v["hidden"]["delta"].dtype, v["out"]["delta"].dtype) == (jnp.bfloat16, jnp.bfloat16)

  # NNX: an adapted bfloat16 model keeps its kernel's and compute dtypes.
  ns = _docs.run(nnx_block, {}, "mixed-precision-nnx")
  assert capsys.readouterr().out == "bfloat16 float32 float32\n"
  net, x, y = ns["net"], ns["x"], ns["y"]
  assert net(x).dtype == jnp.bfloat16
  assert net.hidden.delta[...].dtype == jnp.float32 and float(jnp.abs(net.hidden.delta[...]).max())
  first = float(jnp.mean((ns["Net"](nnx.Rngs(1))(x).astype(jnp.float32) - y) ** 2))
  assert float(ns["loss"]) < 0.5 * first
  assert type(ns["merged"].hidden) is nnx.Linear
  assert ns["merged"].hidden.kernel.dtype == jnp.bfloat16

  # An int8 base: read, never written; merge gives float32.
  ns = _docs.run(int8, {}, "mixed-precision-int8")
  assert capsys.readouterr().out == "int8 float32 int8\nfloat32\n"
  net = ns["net"]
  assert net.hidden.kernel.dtype == jnp.int8
  assert float(jnp.abs(net.hidden.lora_b[...]).max()) > 0  # B = 0 at the start: it trained
  np.testing.assert_allclose(ns["merged"](ns["x"]), net(ns["x"]), rtol=0, atol=1e-5)

  # An NF4 base (qwix): the codes stay as they were while the adapter trains.
  pytest.importorskip("qwix")
  ns = _docs.run(nf4, {}, "mixed-precision-nf4")
  assert capsys.readouterr().out == "uint4 (1, 32)\nfloat32\n"
  net = ns["net"]
  assert net.hidden.kernel.dtype == jnp.uint4
  assert float(jnp.abs(net.hidden.lora_b[...]).max()) > 0  # B = 0 at the start: it trained


# -------------------------------------------------------------- performance.md


def test_performance_guide_step_runs(capsys):
  (code,) = _docs.code_blocks("performance.md", "The cost of a step")
  ns = _docs.run(code, {}, "performance-step")
  flops = float(capsys.readouterr().out)
  claimed = float(re.search(r"# ~(\S+)", code).group(1))
  assert abs(flops - claimed) <= 0.05 * claimed, (flops, claimed)
  assert ns["variables"]["delta"]["delta"].dtype == jnp.float32  # D stays float32
  assert ns["variables"]["params"]["kernel"].dtype == jnp.float32
  assert jnp.isfinite(ns["loss"]) and float(jnp.abs(ns["variables"]["delta"]["delta"]).max()) > 0
