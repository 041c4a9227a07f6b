"""Issue 26's code-health list: one meaning per word (kinds, option names, layer paths), and
no function longer than the limit."""

import ast
import io
import pathlib
import re
import tokenize

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import deltalora_jax as dl
from deltalora_jax import config, core, projections
from deltalora_jax.adapt import nnx as nnx_adapt
from deltalora_jax.adapt import targets


class Kinds(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(4, 4, rngs=rngs)
    self.general = nnx.LinearGeneral(4, (2, 2), rngs=rngs)
    self.einsum = nnx.Einsum("bi,io->bo", (4, 3), rngs=rngs)
    self.conv = nnx.Conv(4, 2, kernel_size=(3,), rngs=rngs)
    self.norm = nnx.LayerNorm(4, rngs=rngs)


def test_a_module_kind_is_its_projection_name_as_in_diagnostics():
  model = Kinds(nnx.Rngs(0))
  kinds = {name: nnx_adapt.kind(m) for name, (_, m) in nnx_adapt.modules(model).items()}
  assert kinds == {
    "linear": "general_dense",
    "general": "general_dense",
    "einsum": "einsum",
    "conv": "conv",
    "norm": "LayerNorm",
  }
  _, report = dl.adapt_nnx(model, rank=1, rngs=nnx.Rngs(1))
  assert {n: e["kind"] for n, e in report["layers"].items()} == {
    n: k for n, k in kinds.items() if k in targets.ADAPTABLE_KINDS
  }
  assert nnx_adapt.kind(model.conv) == targets.ADAPTED


def test_adaptable_kinds_are_the_projections_names():
  names = {
    projections.GeneralDense(features=(2,)).name,
    projections.Einsum("bi,io->bo", (4, 3)).name,
    projections.Conv(features=2, kernel_size=(3,)).name,
  }
  assert names == targets.ADAPTABLE_KINDS


def test_the_two_option_lists_say_what_they_hold():
  assert "lora_a_init" in targets.ADAPTER_OPTIONS  # may be passed
  assert "lora_a_init" not in config.RECORDED_OPTIONS  # is not saved
  assert set(config.RECORDED_OPTIONS) == targets.ADAPTER_OPTIONS - {"lora_a_init"}
  assert not hasattr(config, "OPTIONS") and not hasattr(targets, "OPTIONS")


def test_linen_trace_reports_the_projection_name():
  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Conv(2, kernel_size=(3,), name="conv")(nn.Dense(4, name="dense")(x))

  x = jnp.ones((1, 5, 4))
  variables = Model().init(jax.random.key(0), x)
  _, _, report = dl.adapt_linen(Model(), variables, x, rank=1, key=jax.random.key(1))
  assert {n: e["kind"] for n, e in report["layers"].items()} == {
    "dense": "general_dense",
    "conv": "conv",
  }


def test_select_targets_takes_projection_names_and_refuses_other_kinds():
  modules = {"q": "einsum", "k": "conv", "o": "Dropout"}
  assert targets.select_targets(modules) == ["q", "k"]
  with pytest.raises(TypeError, match="'o' is a Dropout"):
    targets.select_targets(modules, ["o"])


def test_adapt_nnx_documents_every_option():
  args = dl.adapt_nnx.__doc__.split("**options:")[1].split("Returns:")[0]
  missing = [name for name in targets.ADAPTER_OPTIONS if f"``{name}``" not in args]
  assert not missing, f"adapt_nnx's docstring omits {missing}"


class Stack(nnx.Module):
  def __init__(self, rngs):
    self.layers = nnx.List([dl.DeltaLoRALinear(2, 2, rank=1, rngs=rngs) for _ in range(2)])


def test_every_function_names_a_layer_in_one_form():
  """``'layers/0'``: adapted_layers gave ``('layers', 0)``, parameter_counts ``'layers/0'``."""
  model = Stack(nnx.Rngs(0))
  names = ["layers/0", "layers/1"]
  assert list(dl.adapted_layers(model)) == names
  assert [n for n in dl.parameter_counts(model) if n != "total"] == names
  assert list(dl.layer_hyperparameters(model)) == names
  assert list(dl.diagnostics(model)["layers"]) == names
  assert list(dl.export_adapter(model)["weights"]) == names


def test_linen_layers_are_named_like_nnx_ones_and_a_path_tuple_is_still_taken():
  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return dl.DeltaLoRADense(2, rank=1, name="out")(dl.DeltaLoRADense(3, rank=1, name="h")(x))

  x = jnp.ones((1, 2))
  variables = Model().init(jax.random.key(0), x)
  layers = dl.adapted_layers(Model(), x)
  assert list(layers) == ["h", "out"]
  as_tuples = {tuple(name.split("/")): layer for name, layer in layers.items()}
  assert dl.parameter_counts(variables, as_tuples) == dl.parameter_counts(variables, layers)


#: The longest a function or method of the package may be, in lines of code.
MAX_FUNCTION_LINES = 80
PACKAGE = pathlib.Path(dl.__file__).parent
_NOT_CODE = {
  tokenize.COMMENT,
  tokenize.NL,
  tokenize.NEWLINE,
  tokenize.INDENT,
  tokenize.DEDENT,
  tokenize.ENDMARKER,
}


def function_lengths(source: str) -> list[tuple[str, int, int]]:
  """``(qualified name, first line, lines of code)`` of every function and method in ``source``.

  A function's lines run from its first decorator to its last line; of those,
  blank lines, comment-only lines and the docstring do not count (a nested
  function counts in the function that holds it, and on its own).
  """
  code: set[int] = set()
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type not in _NOT_CODE:
      code.update(range(token.start[0], token.end[0] + 1))
  lengths: list[tuple[str, int, int]] = []

  def visit(node: ast.AST, prefix: str) -> None:
    for child in ast.iter_child_nodes(node):
      name = f"{prefix}{getattr(child, 'name', '')}"
      if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
        first = min([child.lineno] + [d.lineno for d in child.decorator_list])
        lines = set(range(first, (child.end_lineno or child.lineno) + 1)) & code
        doc = child.body[0]
        if isinstance(doc, ast.Expr) and isinstance(getattr(doc.value, "value", None), str):
          lines -= set(range(doc.lineno, (doc.end_lineno or doc.lineno) + 1))
        lengths.append((name, first, len(lines)))
      is_scope = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
      visit(child, f"{name}." if is_scope else prefix)

  visit(ast.parse(source), "")
  return lengths


def test_function_lengths_count_code_lines_only():
  source = '''import functools
@functools.cache
def f(
  x,
):
  """Doc.

  More doc."""
  # a comment

  def g():  # nested
    return """a
# not a comment
"""
  return g
class C:
  def m(self):
    pass
'''
  assert function_lengths(source) == [("f", 2, 9), ("f.g", 11, 4), ("C.m", 17, 2)]


def test_no_function_of_the_package_is_longer_than_the_limit():
  too_long = [
    f"deltalora_jax/{path.relative_to(PACKAGE)}:{name}:{lines}"
    for path in sorted(PACKAGE.rglob("*.py"))
    for name, _, lines in function_lengths(path.read_text())
    if lines > MAX_FUNCTION_LINES
  ]
  assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines of code: {too_long}"


# ------------------------------------------------ one code path per idea


class Head(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2, name="out")(x)


def test_nnx_adapters_and_adapt_linen_make_adapter_arrays_with_core_new_adapter(monkeypatch):
  """The factors, D and snapshot are made in one place (each front had its own way)."""
  made = []
  new_adapter = core.new_adapter

  def spy(*args, **kwargs):
    made.append(tuple(args[2]))  # the kernel's shape
    return new_adapter(*args, **kwargs)

  monkeypatch.setattr(core, "new_adapter", spy)
  dl.DeltaLoRALinear(3, 2, rank=1, rngs=nnx.Rngs(0))
  x = jnp.ones((1, 3))
  variables = Head().init(jax.random.key(0), x)
  dl.adapt_linen(Head(), variables, x, rank=1, key=jax.random.key(1))
  assert made == [(3, 2), (3, 2)]


def test_both_fronts_refuse_another_einsum_str_with_one_check(monkeypatch):
  x = jnp.ones((1, 3))
  base = nnx.Einsum("bi,io->bo", (3, 2), rngs=nnx.Rngs(0))
  adapted = dl.DeltaLoRALinearGeneral(base, rank=1, rngs=nnx.Rngs(1))
  linen = dl.DeltaLoRAGeneral(projections.Einsum("bi,io->bo", (3, 2)), rank=1)
  variables = linen.init(jax.random.key(0), x)
  match = r"einsum_str='bj,jo->bo' differs from the adapted layer's equation 'bi,io->bo'"
  with pytest.raises(ValueError, match=match):
    adapted(x, "bj,jo->bo")
  with pytest.raises(ValueError, match=match):
    linen.apply(variables, x, "bj,jo->bo")
  assert adapted(x, "bi, io->bo").shape == linen.apply(variables, x, "bi,io->bo").shape
  checked = []
  monkeypatch.setattr(core, "check_einsum_str", lambda s, p: checked.append(s))
  adapted(x, "bj,jo->bo")
  linen.apply(variables, x, "bj,jo->bo")
  assert checked == ["bj,jo->bo", "bj,jo->bo"]


def test_both_fronts_refuse_a_module_they_cannot_adapt_in_the_same_words():
  match = r"LayerNorm cannot be adapted: the supported kinds are"
  with pytest.raises(TypeError, match=match):
    dl.nnx.projection_of(nnx.LayerNorm(4, rngs=nnx.Rngs(0)))
  with pytest.raises(TypeError, match=match):
    dl.linen.projection_of(nn.LayerNorm())


@pytest.mark.parametrize("name", ["use_delta", "freeze_base", "use_rslora"])
def test_both_fronts_check_a_bool_option_in_the_same_words(name):
  match = rf"{name} must be a bool, got {name}=1"
  with pytest.raises(TypeError, match=match):
    dl.DeltaLoRADense(2, rank=1, **{name: 1})
  with pytest.raises(TypeError, match=match):
    dl.DeltaLoRALinear(3, 2, rank=1, rngs=nnx.Rngs(0), **{name: 1})


def _source_of(node: ast.AST, source: str) -> str:
  return ast.get_source_segment(source, node) or ""


def test_kind_names_a_string_never_a_projection():
  """A projection object is called ``projection``; ``kind`` is a name such as ``'conv'``."""
  found = []
  for path in sorted(PACKAGE.rglob("*.py")):
    source = path.read_text()
    for node in ast.walk(ast.parse(source)):
      annotated = (isinstance(node, ast.arg) and node.arg == "kind") or (
        isinstance(node, ast.AnnAssign) and _source_of(node.target, source) == "kind"
      )
      if annotated and getattr(node, "annotation", None) is not None:
        held = _source_of(node.annotation, source)
      elif isinstance(node, ast.Assign) and any(
        isinstance(n, ast.Name) and n.id == "kind" for t in node.targets for n in ast.walk(t)
      ):
        held = _source_of(node.value, source)
      else:
        continue
      if re.search(r"projection|Projection|Einsum|GeneralDense|Conv\b", held):
        found.append(f"deltalora_jax/{path.relative_to(PACKAGE)}:{node.lineno}: {held}")
  assert not found, f"'kind' holds a projection at {found}"


def test_no_file_cites_the_missing_reference_file():
  """The reference notes are not in the repository: a formula is stated where it is used."""
  missing = "REFERENCE" + ".md"  # spelled so that this file does not cite it
  root = PACKAGE.parent
  files = [root / "README.md", *PACKAGE.rglob("*.py"), *(root / "tests").rglob("*.py")]
  files += [*(root / "docs").rglob("*.md")]
  citing = [str(f.relative_to(root)) for f in files if missing in f.read_text()]
  assert not citing, f"{citing} cite {missing}, which is not in the repository"


def test_the_demo_configs_check_their_sizes_with_one_rule():
  from deltalora_jax.demo.bert import BertConfig
  from deltalora_jax.demo.llm.model import LlamaConfig

  with pytest.raises(ValueError, match=r"num_kv_heads must be a positive int, got num_kv_heads=0"):
    LlamaConfig(num_kv_heads=0)  # was a ZeroDivisionError
  with pytest.raises(ValueError, match=r"num_heads must divide hidden_size, got num_heads=5"):
    BertConfig(num_heads=5)
  with pytest.raises(ValueError, match=r"num_kv_heads must divide num_heads, got num_kv_heads=2"):
    LlamaConfig(num_kv_heads=2)


def test_no_source_file_holds_control_characters():
  """A backspace where ``\\b`` was meant (``\\bar``, ``\\big``) garbles a docstring's math."""
  root = PACKAGE.parent
  files = [*PACKAGE.rglob("*.py"), *(root / "tests").rglob("*.py")]
  found = [
    f"{f.relative_to(root)}:{number}"
    for f in files
    for number, line in enumerate(f.read_text().split("\n"), 1)
    if re.search(r"[\x00-\x08\x0b-\x1f]", line)
  ]
  assert not found, f"control characters at {found}"


def test_the_nnx_front_imports_nothing_from_the_linen_front():
  # What both fronts need (the adapter dtype, the config mixin, a Conv's product, Flax's
  # int-or-tuple sizes) lives below both: config.py and projections.py.
  source = (pathlib.Path(dl.__file__).parent / "nnx.py").read_text()
  imported = {
    node.module
    for node in ast.walk(ast.parse(source))
    if isinstance(node, ast.ImportFrom) and node.module is not None
  } | {
    alias.name
    for node in ast.walk(ast.parse(source))
    if isinstance(node, ast.Import)
    for alias in node.names
  }
  assert "deltalora_jax.linen" not in imported
  from_package = [
    alias.name
    for node in ast.walk(ast.parse(source))
    if isinstance(node, ast.ImportFrom) and node.module == "deltalora_jax"
    for alias in node.names
  ]
  assert "linen" not in from_package
