"""The README, the front page: its quickstart runs as written and trains, its links resolve.

The README's one ```python block is the quickstart guide's first model, character for
character, so that this test runs both.
"""

import re

import _docs
import jax

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def test_quickstart_runs_and_loss_falls(capsys):
  (code,) = _docs.python_blocks(_docs.README.read_text())
  assert [code] == _docs.code_blocks("quickstart.md", "A first model")
  namespace = {}
  # A user runs with JAX's default (standard) dtype promotion; optax.adam's bias
  # correction mixes a float with its int32 count, which strict mode refuses.
  with jax.numpy_dtype_promotion("standard"):
    exec(compile(code, "README-quickstart", "exec"), namespace)
  assert float(namespace["loss"]) < 0.2  # starts near 1.0
  assert "delta" not in namespace["merged"]
  assert "loss after 200 steps" in capsys.readouterr().out


def test_the_readme_is_a_front_page_with_a_map_of_every_guide():
  text = _docs.README.read_text()
  assert len(text.splitlines()) <= 150
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
