"""Training-step benchmark: every variant side by side, on CPU by default.

Run from the repository root::

  python benchmarks/bench_step.py            # the full sweep (a few minutes on 2 cores)
  python benchmarks/bench_step.py --quick    # one small point of each model, seconds

Sweeps (MLP of 4 layers; transformer block of 6 projections, sequence 128;
attention block: the same block in Flax's own ``nn.MultiHeadDotProductAttention``
and ``nn.Dense``, adapted with ``adapt_linen``):

* MLP against width: 256, 512, 1024, 2048 at rank 8, 512 rows;
* MLP against rank: 4, 16, 64 at width 1024, 512 rows;
* MLP against rows (batch): 128, 2048 at width 1024, rank 8;
* transformer against width: 256, 512, 1024 at rank 8, 512 rows;
* attention against width: 256, 512, 1024 at rank 8, 512 rows (no ``naive``
  variant: it is a layer of this file's own).

Writes ``<out>/bench_step.json`` (every figure, versions, machine),
``<out>/bench_step.png`` (step time and memory against width, rank and rows),
``<out>/bench_step.md`` (the tables of ``docs/guides/performance.md``) and prints a
table and the issue's targets.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common


def sweep(args) -> list[common.Config]:
  """The configurations of a run."""
  if args.quick:
    return [
      common.Config("mlp", 256, 8, 256, sweep="width"),
      common.Config("transformer", 256, 8, 256, sweep="width"),
      common.Config("attention", 256, 8, 256, sweep="width"),
    ]
  configs = []
  if "mlp" in args.models:
    configs += [common.Config("mlp", w, 8, 512, sweep="width") for w in args.widths]
    configs += [common.Config("mlp", 1024, r, 512, sweep="rank") for r in args.ranks if r != 8]
    configs += [common.Config("mlp", 1024, 8, n, sweep="batch") for n in args.rows if n != 512]
  if "transformer" in args.models:
    configs += [
      common.Config("transformer", w, 8, 512, sweep="width") for w in args.widths if w <= 1024
    ]
  if "attention" in args.models:
    configs += [
      common.Config("attention", w, 8, 512, sweep="width") for w in args.widths if w <= 1024
    ]
  return configs


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="one small point per model")
  parser.add_argument("--models", nargs="+", default=list(common.MODELS))
  parser.add_argument("--widths", nargs="+", type=int, default=[256, 512, 1024, 2048])
  parser.add_argument("--ranks", nargs="+", type=int, default=[4, 8, 16, 64])
  parser.add_argument("--rows", nargs="+", type=int, default=[128, 512, 2048])
  parser.add_argument("--variants", nargs="+", default=list(common.ALL_VARIANTS))
  parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
  parser.add_argument("--steps", type=int, default=1, help="least steps per round")
  parser.add_argument("--out", default="benchmarks/results", help="folder of JSON and PNG")
  parser.add_argument("--name", default="bench_step", help="file name stem of the outputs")
  args = parser.parse_args(argv)
  variants = tuple(args.variants)
  records = []
  start = time.perf_counter()
  for cfg in sweep(args):
    print(f"{cfg.model} width={cfg.width} rank={cfg.rank} rows={cfg.rows} ...", flush=True)
    records += common.measure(
      cfg, common.model_variants(cfg.model, variants), repeats=args.repeats, steps=args.steps
    )
  targets = common.check_targets(records)
  print()
  print(common.table(records))
  print()
  print(common.targets_table(targets))
  out = Path(args.out)
  common.write_json(
    str(out / f"{args.name}.json"),
    records,
    targets,
    {"arguments": vars(args), "wall_s": time.perf_counter() - start},
  )
  points = [
    ("mlp", 1024, 8, 512),
    ("transformer", 1024, 8, 512),
    ("attention", 1024, 8, 512),
    ("mlp", 256, 8, 256),
    ("attention", 256, 8, 256),
  ]
  (out / f"{args.name}.md").write_text(common.markdown(records, targets, points))
  try:
    common.plot(records, str(out / f"{args.name}.png"))
  except ImportError:
    print("matplotlib is missing (pip install -e '.[bench]'): no plot")
  print(f"\nwrote {out / args.name}.json, .md and .png in {time.perf_counter() - start:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
