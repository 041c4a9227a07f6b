"""The guides' code: their ```python blocks, and the test that runs each section's blocks.

Every ```python block of every guide (``docs/guides/*.md``) runs in a test; shell
commands are ```bash blocks and do not run. A test reads a guide's blocks with
:func:`code_blocks` (all of a guide's, or those of one ``## heading`` section) and runs
every one of them, unpacking them by count (``(code,) = code_blocks(...)``), so that a
block added to a section fails its test until the test runs it too. :data:`COVERED`
names the test of each section; ``tests/test_guides.py`` fails when a guide has a
```python block in a section that no entry covers, or when an entry names a section
without blocks or a test that does not exist.
"""

from __future__ import annotations

import pathlib
import re

import jax

ROOT = pathlib.Path(__file__).parents[1]
GUIDES = ROOT / "docs" / "guides"
README = ROOT / "README.md"

_FENCE = re.compile(r"^```(\S*)")  # ```python, ```bash, ```{include} path, ...


def sections(text: str) -> dict[str | None, list[str]]:
  """The ```python blocks of a Markdown text by ``## heading`` (None: before the first).

  ``### `` subsections belong to their ``## `` section; a line that starts with ``#``
  inside a fenced block is code, not a heading.
  """
  found: dict[str | None, list[str]] = {None: []}
  heading: str | None = None
  block: list[str] | None = None
  language = ""
  for line in text.splitlines():
    fence = _FENCE.match(line)
    if block is None and fence:
      block, language = [], fence.group(1)
    elif block is not None and line.rstrip() == "```":
      if language == "python":
        found[heading].append("".join(f"{code}\n" for code in block))
      block = None
    elif block is not None:
      block.append(line)
    elif line.startswith("## "):
      heading = line[3:].strip()
      if heading in found:
        raise ValueError(f"two sections are headed {heading!r}")
      found[heading] = []
  if block is not None:
    raise ValueError("a fenced block is not closed")
  return found


def python_blocks(text: str, heading: str | None = None) -> list[str]:
  """The ```python blocks of ``text``, or of its ``## heading`` section."""
  found = sections(text)
  if heading is None:
    return [code for blocks in found.values() for code in blocks]
  if heading not in found:
    raise KeyError(f"no section '## {heading}'; the sections: {[h for h in found if h]}")
  return found[heading]


def code_blocks(guide: str, heading: str | None = None) -> list[str]:
  """The ```python blocks of ``docs/guides/<guide>``, or of its ``## heading`` section."""
  return python_blocks((GUIDES / guide).read_text(), heading)


def run(code: str, namespace: dict, name: str) -> dict:
  """Runs a block as a user does: JAX's default (standard) dtype promotion.

  The tests run under strict promotion (``conftest.py``); optax's Adam mixes a float
  with its int32 step count, which strict promotion refuses.
  """
  with jax.numpy_dtype_promotion("standard"):
    exec(compile(code, name, "exec"), namespace)
  return namespace


#: ``(guide, heading)`` -> the tests that together run every ```python block of that
#: ``## heading`` section (heading None: of the whole guide).
COVERED: dict[tuple[str, str | None], tuple[str, ...]] = {
  ("quickstart.md", "A first model"): (
    "tests/test_readme.py::test_quickstart_runs_and_loss_falls",  # the README's, identical
  ),
  ("quickstart.md", "A first NNX model"): (
    "tests/test_readme.py::test_nnx_quickstart_trains_d_and_the_factors_and_leaves_the_base",
  ),
  ("which_rule.md", "The published rule, by example"): (
    "tests/test_paper.py::test_guide_which_rule_example_runs_and_keeps_the_base",
  ),
  ("adapting.md", "An existing Linen model"): (
    "tests/test_adapt.py::test_guide_linen_section_runs",
  ),
  ("adapting.md", "An existing NNX model"): ("tests/test_adapt.py::test_guide_nnx_section_runs",),
  ("adapting.md", "Every layer kind: attention, Einsum, Conv and scanned stacks"): (
    "tests/test_guides.py::test_adapting_attention_einsum_conv_blocks_run",
    "tests/test_guides.py::test_adapting_scanned_stack_block_runs",
  ),
  ("pretrained.md", None): ("tests/test_pretrained.py::test_the_guide_example_runs",),
  ("training_loops.md", "Linen: TrainState"): (
    "tests/test_recipes.py::test_train_state_recipe_trains_and_equals_the_plain_step",
  ),
  ("training_loops.md", "NNX: nnx.Optimizer"): (
    "tests/test_recipes.py::test_nnx_optimizer_recipe_trains_and_equals_the_plain_step",
  ),
  ("peft.md", None): ("tests/test_peft_torch.py::test_the_guide_section_runs",),
  ("mixed_precision.md", None): ("tests/test_guides.py::test_mixed_precision_guide_runs",),
  ("sharding.md", None): (
    "tests/test_checkpoint.py::test_guide_sharding_and_checkpoint_sections_run",
  ),
  ("checkpoints.md", None): (
    "tests/test_checkpoint.py::test_guide_sharding_and_checkpoint_sections_run",
  ),
  ("performance.md", "The cost of a step"): (
    "tests/test_guides.py::test_performance_guide_step_runs",
  ),
  ("tunix.md", "Adapt, train, merge"): (
    "tests/tunix/test_tunix_guide.py::test_the_guide_adapts_trains_and_merges_a_qwen3",
  ),
  ("tunix.md", "A kind the library does not know"): (
    "tests/tunix/test_tunix_guide.py::test_the_guide_teaches_a_kind_in_a_few_lines",
  ),
  ("demo.md", "Options, and a new method"): (
    "tests/test_demo.py::test_the_guide_registers_a_method_in_a_few_lines",
  ),
}
