"""The public face: every name in __all__ imports and is documented."""

import inspect

import deltalora_jax as dl


def test_every_public_name_imports_and_has_a_docstring():
  assert dl.__all__ == sorted(dl.__all__), "keep __all__ sorted"
  for name in dl.__all__:
    obj = getattr(dl, name)
    assert inspect.getdoc(obj), f"{name} has no docstring"


def test_public_functions_have_runnable_examples():
  # Doctests run the examples; here we only check that each function has one.
  for name in dl.__all__:
    obj = getattr(dl, name)
    if inspect.isfunction(obj):
      assert ">>>" in (obj.__doc__ or ""), f"{name} has no example in its docstring"
