"""The training-step benchmark on a GPU, with model flops utilisation.

Run from the repository root on a machine with a CUDA build of jax::

  python benchmarks/gpu.py                       # peak looked up from the device name
  python benchmarks/gpu.py --peak-tflops 989     # or given

It runs the variants of ``bench_step.py`` (plus bf16 full fine-tuning and
bf16 LoRA, the usual GPU settings) on larger shapes, and reports for each the
median step time and the flops utilisation

.. math::

  \\mathrm{MFU} = \\frac{\\text{XLA CPU flops of the step}}{\\text{median step time} \\times
  \\text{peak flops}}

against the device's dense bf16 peak for ``_bf16`` variants and its TF32 peak
for float32 ones (XLA's default float32 matmul on recent NVIDIA GPUs). Not
used by the tests or CI; without a GPU it says so and exits (``--allow-cpu``
runs it on the CPU anyway, to check the script).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax

from benchmarks import common

# Dense (no sparsity) peaks in TFLOP/s: (bf16, tf32), from the vendors' data sheets.
PEAKS = {
  "H200": (989.0, 494.5),
  "H100 PCIe": (756.0, 378.0),
  "H100": (989.0, 494.5),  # SXM
  "A100": (312.0, 156.0),
  "L40S": (362.0, 183.0),
  "L4": (121.0, 60.0),
}

VARIANTS = (*common.ALL_VARIANTS, "full_sgdm_bf16", "lora_adamw_bf16")


def peak_flops(kind: str, bf16: bool, override: float | None) -> float | None:
  """Peak flops per second of a device, or None when its name is not known."""
  if override:
    return override * 1e12
  for name, (p16, p32) in PEAKS.items():  # the longest names come first
    if name.lower() in kind.lower():
      return (p16 if bf16 else p32) * 1e12
  return None


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--peak-tflops", type=float, default=None, help="device peak, TFLOP/s")
  parser.add_argument("--widths", nargs="+", type=int, default=[1024, 2048, 4096])
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument("--rows", type=int, default=8192)
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
  parser.add_argument("--models", nargs="+", default=list(common.MODELS), choices=common.MODELS)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--allow-cpu", action="store_true", help="run even without a GPU")
  parser.add_argument("--out", default="benchmarks/results")
  args = parser.parse_args(argv)
  device = jax.devices()[0]
  if device.platform != "gpu" and not args.allow_cpu:
    print(f"no GPU here (jax sees {device.platform}: {device.device_kind}); nothing to do")
    return 0
  configs = [
    common.Config(model, w, args.rank, args.rows, seq=512, sweep="width")
    for model in args.models
    for w in args.widths
  ]
  records = []
  start = time.perf_counter()
  for cfg in configs:
    print(f"{cfg.model} width={cfg.width} rank={cfg.rank} rows={cfg.rows} ...", flush=True)
    variants = common.model_variants(cfg.model, tuple(args.variants))
    records += common.measure(
      cfg, variants, repeats=args.repeats, steps=args.steps, min_seconds=0.02
    )
  for r in records:
    bf16 = r["variant"].endswith("_bf16")
    peak = peak_flops(device.device_kind, bf16, args.peak_tflops)
    r["peak_flops"] = peak
    r["peak_kind"] = "override" if args.peak_tflops else ("bf16" if bf16 else "tf32")
    r["mfu"] = None if peak is None else r["flops_cpu"] / r["step_s_median"] / peak
  for r in records:  # the targets compare XLA's CPU counts: see common.cpu_flops
    r["flops_device"], r["flops"] = r["flops"], r["flops_cpu"]
  targets = common.check_targets(records)
  print()
  print(common.table(records))
  print()
  print(f"{'model':<11} {'width':>5} {'variant':<16} {'TFLOP/s':>8} {'MFU':>6}  peak")
  for r in records:
    achieved = r["flops_cpu"] / r["step_s_median"] / 1e12
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:5.1f}%"
    print(f"{r['model']:<11} {r['width']:>5} {r['variant']:<16} {achieved:8.2f} {mfu:>6}  "
          f"{r['peak_kind']}")  # fmt: skip
  print()
  print(common.targets_table(targets))
  out = Path(args.out)
  common.write_json(str(out / "gpu.json"), records, targets, {"arguments": vars(args)})
  try:
    common.plot(records, str(out / "gpu.png"))
  except ImportError:
    print("matplotlib is missing (pip install -e '.[bench]'): no plot")
  print(f"\nwrote {out}/gpu.json and gpu.png in {time.perf_counter() - start:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
