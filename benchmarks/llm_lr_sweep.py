"""Learning rates of the LLM demo's methods, chosen on the TRAINING split only.

The training split of ``python -m deltalora_jax llm`` (the countries not held
out) is cut again by country: ``--validation`` of its countries (both their
questions) are set aside, and each method trains on the rest with the demo's
default settings (steps, batch, length, rank, lambda, K, seed) at each learning
rate of its grid; the figure is the loss on the set-aside answers (float32,
the merged model). The held-out countries of the demo are never read. The
chosen values are :class:`deltalora_jax.demo.llm.train.Options`' defaults.

Run: ``python benchmarks/llm_lr_sweep.py --out benchmarks/reference/llm_lr_sweep.json``
(about 8 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time

import numpy as np

import deltalora_jax as dl
from deltalora_jax.demo.llm import data, train
from deltalora_jax.demo.llm.model import from_tensors

LORA_GRID = (2.5e-4, 5e-4, 1e-3, 2e-3)
GRIDS = {
  "lora": LORA_GRID,
  "delta-lora": LORA_GRID,
  "paper": LORA_GRID,
  "lora-scaled": LORA_GRID,
  "full": (1e-5, 3e-5, 1e-4),
}


def split_training(items: list[data.Example], count: int, seed: int = 1):
  """``(train, validation)``: ``count`` countries of ``items`` (both questions) set aside."""
  countries = sorted({e.country for e in items})
  chosen = set(np.random.default_rng(seed).permutation(countries)[:count].tolist())
  return [e for e in items if e.country not in chosen], [e for e in items if e.country in chosen]


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", type=pathlib.Path, default=None)
  parser.add_argument("--model", default="smollm2", help="smollm2 (default) or gemma3-270m")
  parser.add_argument("--methods", default=",".join(GRIDS))
  parser.add_argument("--validation", type=int, default=40, help="countries set aside (40)")
  parser.add_argument("--steps", type=int, default=None, help="(the demo's default)")
  parser.add_argument("--lrs", default=None, help="comma-separated: these rates, not the grids")
  parser.add_argument(
    "--field",
    default=None,
    help="the option swept (an Options field, e.g. delta_lr); default: the method's learning rate",
  )
  parser.add_argument("--append", action="store_true", help="add to the runs already in --out")
  args = parser.parse_args(argv)
  options = train.default_options(args.model, progress=False)
  if args.steps is not None:
    options = dataclasses.replace(options, steps=args.steps)
  pretrained = train.load_pretrained(options.model)
  tok, tmpl = pretrained.tokenizer, pretrained.template
  items, _ = data.split(data.load_countries())  # the demo's training split; held-out unread
  items, _ = data.fitting(tok, tmpl, items, options.max_length)
  fit, validation = split_training(items, args.validation)
  encoded_fit = data.encode(tok, tmpl, fit, options.max_length)
  encoded_val = data.encode(tok, tmpl, validation, options.max_length)
  base = from_tensors(pretrained.config, pretrained.tensors)
  steps: dict = {}
  rows = []
  for name in args.methods.split(","):
    method = train.METHODS[name]
    for lr in GRIDS[name] if args.lrs is None else [float(x) for x in args.lrs.split(",")]:
      run_options = dataclasses.replace(options, **{args.field or method.learning_rate: lr})
      start = time.perf_counter()
      model, figures = train.train_method(
        method, run_options, pretrained, base, encoded_fit, options.seed, steps
      )
      merged = model if method.adapter is None else dl.merge(model)
      loss = train.heldout_loss(merged, encoded_val)
      rows.append(
        {
          "method": name,
          "field": args.field or method.learning_rate,
          "learning_rate": lr,
          "validation_loss": loss,
          "final_train_loss": figures["losses"][-1],
          "seconds": time.perf_counter() - start,
        }
      )
      print(f"{name:>11} lr {lr:.1e}: validation loss {loss:.4f}", flush=True)
  if args.append and args.out is not None and args.out.exists():
    rows = json.loads(args.out.read_text())["runs"] + rows
  best = {}
  for name in dict.fromkeys(r["method"] for r in rows):
    mine = [r for r in rows if r["method"] == name and np.isfinite(r["validation_loss"])]
    best[name] = min(mine, key=lambda r: r["validation_loss"])["learning_rate"]
  results = {
    "environment": train.demo_train.environment(),
    "split": "the demo's training split only: "
    f"{len(fit)} exchanges trained on, {len(validation)} exchanges of {args.validation} "
    "other training countries scored",
    "options": {k: v for k, v in dataclasses.asdict(options).items() if k != "progress"},
    "grids": {
      name: sorted({r["learning_rate"] for r in rows if r["method"] == name})
      for name in dict.fromkeys(r["method"] for r in rows)
    },
    "runs": rows,
    "best": best,
  }
  print("best:", best)
  if args.out is not None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
  return results


if __name__ == "__main__":
  main()
