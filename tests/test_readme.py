"""The README, the front page: its quickstart runs as written and trains, its links resolve.

The README's two ```python blocks are the quickstart guide's first model (Linen) and
first NNX model, character for character, so that these tests run both.
"""

import re

import _docs
import jax
import jax.numpy as jnp
import numpy as np
import pytest

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


@pytest.fixture(scope="module")
def quickstart():
  """The README's two blocks, run one after the other as a reader does: Linen, then NNX."""
  linen, nnx = _docs.python_blocks(_docs.README.read_text())
  namespace = {}
  # A user runs with JAX's default (standard) dtype promotion; optax.adam's bias
  # correction mixes a float with its int32 count, which strict mode refuses.
  with jax.numpy_dtype_promotion("standard"):
    exec(compile(linen, "README-quickstart", "exec"), namespace)
    linen_namespace = dict(namespace)
    exec(compile(nnx, "README-quickstart-nnx", "exec"), namespace)
  return linen, nnx, linen_namespace, namespace


def test_quickstart_runs_and_loss_falls(quickstart):
  code, _, namespace, _ = quickstart
  assert [code] == _docs.code_blocks("quickstart.md", "A first model")
  assert float(namespace["loss"]) < 0.2  # starts near 1.0
  assert "delta" not in namespace["merged"]


def test_nnx_quickstart_trains_d_and_the_factors_and_leaves_the_base(quickstart):
  _, code, _, namespace = quickstart
  assert [code] == _docs.code_blocks("quickstart.md", "A first NNX model")
  assert "wrt=nnx.Param" in code
  net = namespace["net"]
  assert float(namespace["nnx_loss"]) < 0.2  # starts near 1.0
  fresh = namespace["NNXMLP"](namespace["nnx"].Rngs(1))
  for name in ("hidden", "out"):
    layer, first = getattr(net, name), getattr(fresh, name)
    np.testing.assert_array_equal(layer.kernel[...], first.kernel[...])  # frozen base
    assert float(jnp.abs(layer.delta[...]).max()) > 0  # D trained
    assert float(jnp.abs(layer.lora_b[...]).max()) > 0  # B trained from 0


def test_the_readme_is_a_front_page_with_a_map_of_every_guide():
  text = _docs.README.read_text()
  assert len(text.splitlines()) <= 180  # the two quickstarts (Linen, NNX) take 70
  linked = {link.split("#")[0] for link in LINK.findall(text) if link.startswith("docs/guides/")}
  assert linked == {f"docs/guides/{path.name}" for path in _docs.GUIDES.glob("*.md")}


def _anchors(markdown: str) -> set[str]:
  """The anchors of a page's headings, as GitHub and MyST write them."""
  headings = re.findall(r"^#{1,6} (.+)$", re.sub(r"```.*?```", "", markdown, flags=re.S), re.M)
  return {re.sub(r"[^\w\- ]", "", h.lower()).strip().replace(" ", "-") for h in headings}


def test_every_relative_link_of_the_readme_and_the_guides_resolves():
  pages = [_docs.README, *sorted(_docs.GUIDES.glob("*.md"))]
  broken = []
  for page in pages:
    for target in LINK.findall(page.read_text()):
      if re.match(r"[a-z]+:", target):
        continue  # https: and the like
      path, _, anchor = target.partition("#")
      file = (page.parent / path).resolve() if path else page
      if not file.exists() or (anchor and anchor not in _anchors(file.read_text())):
        broken.append(f"{page.relative_to(_docs.ROOT)}: {target}")
  assert not broken, broken
