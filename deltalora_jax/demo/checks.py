"""The checks the demo's option and config dataclasses share."""

from __future__ import annotations

from collections.abc import Iterable


def check_ints(options: object, names: Iterable[str], *, at_least: int = 1) -> None:
  """Raises ``ValueError`` unless each attribute ``names`` of ``options`` is an int ``>= at_least``.

  A bool is not taken for an int; the message names the attribute and what it may be.

  >>> import types
  >>> check_ints(types.SimpleNamespace(steps=3, seed=0), ["steps"])
  >>> check_ints(types.SimpleNamespace(steps=3, seed=0), ["steps", "seed"])
  Traceback (most recent call last):
  ValueError: seed must be a positive int, got seed=0
  >>> check_ints(types.SimpleNamespace(seed=True), ["seed"], at_least=0)
  Traceback (most recent call last):
  ValueError: seed must be an int >= 0, got seed=True
  """
  allowed = "a positive int" if at_least == 1 else f"an int >= {at_least}"
  for name in names:
    value = getattr(options, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < at_least:
      raise ValueError(f"{name} must be {allowed}, got {name}={value!r}")


def check_divides(options: object, divisor: str, total: str, *, when: str = "") -> None:
  """Raises ``ValueError`` unless the attribute ``divisor`` of ``options`` divides ``total``.

  ``when`` says when the rule holds (``' when head_dim is None'``), for the message.

  >>> import types
  >>> check_divides(types.SimpleNamespace(num_heads=5, hidden_size=384), "num_heads", "hidden_size")
  Traceback (most recent call last):
  ValueError: num_heads must divide hidden_size, got num_heads=5, hidden_size=384
  """
  size, whole = getattr(options, divisor), getattr(options, total)
  if whole % size:
    raise ValueError(f"{divisor} must divide {total}{when}, got {divisor}={size}, {total}={whole}")
