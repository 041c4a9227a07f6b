"""The results files of the demos (``demo``, ``study``, ``llm``): counts, figures, writing.

One writer and one figure layout for the three commands, so that their
``results.json``/``.md``/``.png`` are written the same way.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def count(n: int) -> str:
  """A parameter count as the tables print it: ``1.2 k``, ``0.15 M``.

  >>> count(512), count(1234), count(150_000)
  ('512', '1.2 k', '0.15 M')
  """
  return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n / 1e3:.1f} k" if n >= 1e3 else str(n)


def write(
  results: dict, output: pathlib.Path, names: dict[str, str], table: Callable, plot: Callable
) -> dict[str, pathlib.Path]:
  """Writes ``results`` as JSON, ``table(results)`` and ``plot(results, path)`` under ``output``.

  ``names`` gives the file name of each (keys ``'json'``, ``'table'``, ``'png'``);
  returns their paths.
  """
  output.mkdir(parents=True, exist_ok=True)
  paths = {kind: output / name for kind, name in names.items()}
  paths["json"].write_text(json.dumps(results, indent=1) + "\n")
  paths["table"].write_text(table(results) + "\n")
  plot(results, paths["png"])
  return paths


def two_panels(size: tuple[float, float], width_ratios: tuple[float, float]) -> tuple[Any, ...]:
  """``(figure, left, right)``: a matplotlib figure of two axes side by side."""
  from matplotlib.figure import Figure

  figure = Figure(figsize=size, dpi=100, layout="constrained")
  left, right = figure.subplots(1, 2, width_ratios=width_ratios)
  return figure, left, right


def learning_curves(axes: Any, curves: dict[str, Sequence[Sequence[float]]], ylabel: str) -> None:
  """One line per method (``{method: runs}``, each run its losses from step 1), in the colours
  of the bars: the mean of the runs, and their range shaded when there are several."""
  seeds = max((len(runs) for runs in curves.values()), default=1)
  for i, (method, runs) in enumerate(curves.items()):
    losses = np.asarray(runs, dtype=float)
    if losses.size:
      steps = np.arange(1, losses.shape[1] + 1)
      axes.plot(steps, losses.mean(0), label=method, color=f"C{i}")
      if len(losses) > 1:
        axes.fill_between(steps, losses.min(0), losses.max(0), color=f"C{i}", alpha=0.15)
  title = "Learning curves" + (f" (mean, range of {seeds} seeds)" if seeds > 1 else "")
  axes.set(xlabel="step", ylabel=ylabel, title=title)
  axes.legend()
  axes.grid(alpha=0.3)


def labelled_bars(
  axes: Any, names: Sequence[str], values: Sequence[float], errors: Sequence[float] | None = None
) -> None:
  """A bar per method, its value written on top (three decimals), one colour each."""
  colors = [f"C{i}" for i in range(len(names))]
  axes.bar(names, values, yerr=errors, color=colors, capsize=3 if errors is not None else 0)
  for i, value in enumerate(values):
    axes.text(i, value, f"{value:.3f}", ha="center", va="bottom")


def save_peft_method(
  path: pathlib.Path,
  rule: str,
  model_or_variables: Any,
  layers: Any = None,
  *,
  initial: Any,
  seed_rank: int,
  **options: Any,
) -> dict[str, Any]:
  """Writes one method's PEFT LoRA directory ``path``; returns what the results record.

  :func:`deltalora_jax.save_peft` with ``rule``, the rank ``seed_rank`` for the seed
  rule's truncated SVD and the pretrained ``initial`` weights as the paper rule's
  base; ``options`` are its other keywords (``module_names``, ...).

  Returns:
    ``{'directory', 'rule', 'rank', 'max_relative_error'}``: the largest rank and the
    largest relative weight error of a layer (0.0 when exact).
  """
  import deltalora_jax as dl

  written = dl.save_peft(
    path,
    model_or_variables,
    layers,
    rule=rule,  # type: ignore[arg-type]
    rank=seed_rank if rule == "seed" else None,
    base=initial if rule == "paper" else None,
    **options,
  )
  entries = written["layers"].values()
  return {
    "directory": str(path),
    "rule": rule,
    "rank": max(e["rank"] for e in entries),
    "max_relative_error": max(e["relative_error"] for e in entries),
  }
