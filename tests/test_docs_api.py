"""The API reference (docs/api/*.md) has one autodoc entry per public name, and no other.

The pages are not built here (that is Sphinx's job, in .ci/run); their autodoc directives are
read as text: ``.. autofunction:: deltalora_jax.delta_lora`` inside an ``{eval-rst}`` block, or
MyST's ``{autofunction} deltalora_jax.delta_lora`` fence.
"""

import inspect
import pathlib
import re

import pytest

import deltalora_jax as dl

API = pathlib.Path(__file__).parents[1] / "docs" / "api"

# Modules shown for their docstring alone (no :members:), as context: the package's overview
# and the notation of the pure math. They add no entry of their own to the API.
CONTEXT_MODULES = {"deltalora_jax", "deltalora_jax.core"}

_DIRECTIVE = re.compile(
  r"^(?P<indent>[ \t]*)(?:\.\.[ \t]+(?P<rst>auto\w+)::|[`:]{3,}\{(?P<myst>auto\w+)\})"
  r"[ \t]*(?P<target>\S+)[ \t]*$"
)
_OPTION = re.compile(r"^[ \t]*:(?P<name>[\w-]+):[ \t]*(?P<value>.*)$")


def parse_entries(text, page="page"):
  """``[(page, line, directive, target, {option: value})]`` of the autodoc directives."""
  lines = text.splitlines()
  entries = []
  for number, line in enumerate(lines, 1):
    match = _DIRECTIVE.match(line)
    if not match:
      continue
    options = {}
    for following in lines[number:]:
      option = _OPTION.match(following)
      if not option:
        break
      options[option["name"]] = option["value"].strip()
    directive = match["rst"] or match["myst"]
    entries.append((page, number, directive, match["target"], options))
  return entries


def api_entries():
  pages = sorted(API.glob("*.md"))
  assert pages, f"no API pages in {API}"
  return [entry for page in pages for entry in parse_entries(page.read_text(), page.name)]


def documented_name(target, options):
  """The public name an entry documents, or None for a context module; fails if not public."""
  if target in CONTEXT_MODULES:
    assert "members" not in options, f"{target} is shown for its docstring only, no :members:"
    return None
  prefix = "deltalora_jax."
  assert target.startswith(prefix), f"{target} is not under deltalora_jax"
  name = target.removeprefix(prefix)
  assert name in dl.__all__, f"{target} is documented but {name!r} is not in deltalora_jax.__all__"
  return name


def check(entries):
  """Every name of ``__all__`` documented exactly once; every entry names a public object."""
  documented = {}
  for page, line, directive, target, options in entries:
    where = f"docs/api/{page}:{line}"
    try:
      name = documented_name(target, options)
    except AssertionError as error:
      raise AssertionError(f"{where}: {error}") from None
    if name is None:
      continue
    assert name not in documented, (
      f"{where}: {name} is documented again (first at {documented[name]})"
    )
    documented[name] = where
    obj = getattr(dl, name)
    if inspect.ismodule(obj):
      assert directive == "automodule", f"{where}: the submodule {name} needs automodule"
      assert "members" in options, f"{where}: automodule {target} needs :members:"
    members = [m.strip() for m in options.get("members", "").split(",") if m.strip()]
    for member in members:
      assert not member.startswith("_"), f"{where}: {target}.{member} is not public"
      assert hasattr(obj, member), f"{where}: {target} has no member {member!r}"
  missing = sorted(set(dl.__all__) - set(documented))
  assert not missing, f"no autodoc entry in docs/api/*.md for: {', '.join(missing)}"


def test_every_public_name_has_exactly_one_entry():
  check(api_entries())


def test_the_check_fails_on_a_missing_a_duplicate_or_a_private_entry():
  entries = api_entries()
  without = [e for e in entries if e[3] != "deltalora_jax.delta_lora"]
  assert len(without) == len(entries) - 1
  with pytest.raises(AssertionError, match=r"no autodoc entry .*: delta_lora\n"):
    check(without)
  twice = [*entries, ("extra.md", 1, "autofunction", "deltalora_jax.merge", {})]
  with pytest.raises(AssertionError, match="merge is documented again"):
    check(twice)
  for target, options in [
    ("deltalora_jax.core.as_float", {}),
    ("deltalora_jax.tree.merge", {}),
    ("deltalora_jax.core", {"members": ""}),
    ("optax.sgd", {}),
  ]:
    with pytest.raises(AssertionError):
      check([*entries, ("extra.md", 1, "autofunction", target, options)])
  private = [("extra.md", 1, "autoclass", "deltalora_jax.DeltaLoRADense", {"members": "_call"})]
  with pytest.raises(AssertionError, match="not public"):
    check(private)


def test_parse_reads_both_directive_forms():
  text = """
```{eval-rst}
.. autoclass:: deltalora_jax.DeltaLoRADense
   :members: config, scaling

.. autofunction:: deltalora_jax.merge
```

```{autofunction} deltalora_jax.reset
```
"""
  assert [(d, t, o) for _, _, d, t, o in parse_entries(text)] == [
    ("autoclass", "deltalora_jax.DeltaLoRADense", {"members": "config, scaling"}),
    ("autofunction", "deltalora_jax.merge", {}),
    ("autofunction", "deltalora_jax.reset", {}),
  ]
