"""Memory and time of one training step: plain LoRA, the paper rule's two forms, the seed rule,
on a float32, bfloat16, int8 or NF4 base.

Run from the repository root::

  python benchmarks/bench_paper_memory.py --allow-cpu          # 1024 x 1024, rank 8, 128 rows
  python benchmarks/bench_paper_memory.py --allow-cpu --quick  # 256 x 256: seconds
  python benchmarks/bench_paper_memory.py --width 4096 --layers 4 --rows 2048 \
      --out gpu_paper_memory.json                               # on a GPU

Without an accelerator the script refuses to run unless ``--allow-cpu`` is given
(CPU figures are not GPU figures). ``--layers N`` stacks N adapted layers
(``in = out = --width``, ``tanh`` between them); ``--layers 1`` is one bare
layer. Each variant is trained by one jitted step ``(variables, opt_state, x,
y) -> (variables, opt_state, loss)`` with the variables and optimizer state
donated (``donate_argnums=(0, 1)``); a quantized base (the ``'quantized'``
collection: read only) is an argument of its own, not donated. Of each
variant, XLA's ``memory_analysis()`` of the compiled step (``total = argument
+ output - alias + temp``, what it holds at its peak), its ``cost_analysis()``
(flops, bytes accessed) and the median step time over ``--repeats``
interleaved rounds:

* ``full_adamw``: ``nn.Dense``, AdamW on the kernel and bias (full fine-tuning);
* ``lora_adamw``: plain LoRA, AdamW on the factors, base frozen;
* ``paper``: :func:`deltalora_jax.paper_delta_lora` on layers with
  ``paper_lambda`` (the telescoped form: the kernel is never written);
* ``paper_in_place``: the same rule on layers without ``paper_lambda``
  (Algorithm 1 as written: the kernel is written every step);
* ``seed``: :func:`deltalora_jax.delta_lora`, ``D`` and its velocity float32;
* ``seed_velocity_bf16``: the same with a bfloat16 velocity (``velocity_dtype``);
* ``*_base_bf16``: the variant with a bfloat16 base kernel (factors, ``D`` and
  velocity float32), computing in float32 (the layers' default: the widest dtype);
* ``*_compute_bf16``: a bfloat16 base kernel and ``dtype=bfloat16`` (the
  products in bfloat16; the factors stay float32 parameters);
* ``*_base_int8``: an int8 base with one float32 scale per output channel
  (``base_quantization='int8'``), computing in float32;
* ``*_base_nf4``: an NF4 base (QLoRA's, by qwix: uint4 codes, one float32
  scale per block of 64 inputs; ``base_quantization='nf4'``), computing in float32.

``K = 0`` for the paper rule, so that the timed steps are past the start step.
Prints a table and the ratios the issue asks for; writes the JSON to ``--out``
(a path ending in ``.json``, or a folder that gets ``bench_paper_memory.json``).
``--repeats`` and ``--steps`` trade time for noise; ``--variants`` picks some.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import deltalora_jax as dl
from benchmarks import common

LEARNING_RATE = 1e-3
LAMBDA = 2.0
VARIANTS = (
  "full_adamw",
  "lora_adamw",
  "paper",
  "paper_in_place",
  "seed",
  "seed_velocity_bf16",
  "lora_adamw_base_bf16",
  "paper_base_bf16",
  "paper_in_place_base_bf16",
  "seed_base_bf16",
  "lora_adamw_compute_bf16",
  "paper_compute_bf16",
  "lora_adamw_base_int8",
  "paper_base_int8",
  "seed_base_int8",
  "lora_adamw_base_nf4",
  "paper_base_nf4",
  "seed_base_nf4",
)
_SUFFIXES = ("_base_bf16", "_compute_bf16", "_base_int8", "_base_nf4")


class Stack(nn.Module):
  """``layers`` dense layers of ``width`` features, ``tanh`` between them."""

  width: int
  layers: int
  options: tuple[tuple[str, Any], ...] | None  # DeltaLoRADense's; None: nn.Dense

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.layers):
      if i:
        x = nn.tanh(x)
      if self.options is None:
        x = nn.Dense(self.width, param_dtype=x.dtype, name=f"layer_{i}")(x)
      else:
        x = dl.DeltaLoRADense(self.width, name=f"layer_{i}", **dict(self.options))(x)
    return x


def build(
  variant: str, width: int, rank: int, layers: int = 1
) -> tuple[nn.Module, optax.GradientTransformation]:
  """The model (one layer, or a :class:`Stack`) and optimizer of a variant."""
  bf16_base = variant.endswith(("_base_bf16", "_compute_bf16"))
  base_dtype = jnp.bfloat16 if bf16_base else jnp.float32
  compute = jnp.bfloat16 if variant.endswith("_compute_bf16") else None
  name = variant
  for suffix in _SUFFIXES:
    name = name.removesuffix(suffix)
  if name == "full_adamw":
    dense = nn.Dense(width, param_dtype=base_dtype)
    model = dense if layers == 1 else Stack(width, layers, None)
    return model, optax.adamw(LEARNING_RATE)
  options: dict[str, Any] = {"rank": rank, "param_dtype": base_dtype, "dtype": compute}
  for quantization in ("int8", "nf4"):
    if variant.endswith(f"_base_{quantization}"):
      options["base_quantization"] = quantization
  if name in ("lora_adamw", "paper_in_place"):
    options["use_delta"] = False
  if name == "paper":
    options.update(use_delta=False, paper_lambda=LAMBDA)
  model: nn.Module = dl.DeltaLoRADense(width, **options)
  if layers > 1:
    model = Stack(width, layers, tuple(sorted(options.items())))
  found = dl.adapted_layers(model, jnp.zeros((1, width)))
  adamw = optax.adamw(LEARNING_RATE)
  if name == "lora_adamw":
    tx = optax.multi_transform(
      {"lora": adamw, "base": optax.set_to_zero(), "other": optax.set_to_zero()},
      dl.leaf_labels,
    )
  elif name.startswith("paper"):
    tx = dl.paper_delta_lora(lora_optimizer=adamw, layers=found, start_step=0)
  else:
    velocity = jnp.bfloat16 if name == "seed_velocity_bf16" else jnp.float32
    tx = dl.delta_lora(LEARNING_RATE, layers=found, lora_optimizer=adamw, velocity_dtype=velocity)
  return model, tx


def prepare(variant: str, width: int, rank: int, rows: int, layers: int = 1) -> dict[str, Any]:
  """Compiles the variant's donated step; its memory and cost, and the state to time it."""
  module, tx = build(variant, width, rank, layers)
  x = jax.random.normal(jax.random.key(1), (rows, width))
  y = jax.random.normal(jax.random.key(2), (rows, width))
  variables = dict(module.init(jax.random.key(0), x))
  frozen = {"quantized": variables.pop("quantized")} if "quantized" in variables else {}
  opt_state = tx.init(variables)

  def step(variables: Any, opt_state: Any, frozen: Any, x: jax.Array, y: jax.Array) -> Any:
    def loss_fn(v: Any) -> jax.Array:
      return jnp.mean((module.apply({**v, **frozen}, x).astype(jnp.float32) - y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(variables)
    with jax.numpy_dtype_promotion("standard"):
      updates, opt_state = tx.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state, loss

  jitted = jax.jit(step, donate_argnums=(0, 1))
  start = time.perf_counter()
  compiled = jitted.lower(variables, opt_state, frozen, x, y).compile()
  record = {
    "variant": variant,
    "compile_s": time.perf_counter() - start,
    "memory": common._memory(compiled),
    **common._cost(compiled),
  }
  variables, opt_state, _ = jitted(variables, opt_state, frozen, x, y)  # warm-up: step t = 0
  return {
    "record": record,
    "step": jitted,
    "state": (variables, opt_state),
    "frozen": frozen,
    "x": x,
    "y": y,
  }


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--width", type=int, default=1024)
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--rows", type=int, default=128)
  parser.add_argument("--layers", type=int, default=1, help="a stack of this many layers")
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
  parser.add_argument("--quick", action="store_true", help="256 x 256, 3 repeats")
  parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
  parser.add_argument("--allow-cpu", action="store_true", help="run without an accelerator")
  parser.add_argument(
    "--out", default="benchmarks/results", help="a .json path, or a folder for the JSON"
  )
  args = parser.parse_args(argv)
  if jax.default_backend() == "cpu" and not args.allow_cpu:
    parser.error("no accelerator found (jax.default_backend() == 'cpu'): pass --allow-cpu")
  if args.quick:
    args.width, args.repeats = 256, 3
  variants = tuple(v for v in args.variants.split(",") if v)
  if unknown := sorted(set(variants) - set(VARIANTS)):
    parser.error(f"--variants: unknown {unknown}; the variants are {list(VARIANTS)}")
  prepared = {v: prepare(v, args.width, args.rank, args.rows, args.layers) for v in variants}
  times: dict[str, list[float]] = {v: [] for v in variants}
  for round_ in range(args.repeats):
    order = variants[round_ % len(variants) :] + variants[: round_ % len(variants)]
    for variant in order:  # interleaved and rotated: a noisy machine hurts all alike
      p = prepared[variant]
      variables, opt_state = p["state"]
      start = time.perf_counter()
      for _ in range(args.steps):
        variables, opt_state, loss = p["step"](variables, opt_state, p["frozen"], p["x"], p["y"])
      loss.block_until_ready()
      times[variant].append((time.perf_counter() - start) / args.steps)
      p["state"] = (variables, opt_state)
  records = []
  for variant in variants:
    record = prepared[variant]["record"]
    record["step_s_median"] = statistics.median(times[variant])
    record["step_s_all"] = times[variant]
    records.append(record)
  by = {r["variant"]: r for r in records}

  def ratio(a: str, b: str, key: str) -> float:
    fa = by[a]["memory"]["total"] if key == "memory" else by[a]["step_s_median"]
    fb = by[b]["memory"]["total"] if key == "memory" else by[b]["step_s_median"]
    return fa / fb

  pairs = [
    ("paper", "lora_adamw"),
    ("paper_in_place", "lora_adamw"),
    ("seed", "full_adamw"),
    ("seed_velocity_bf16", "full_adamw"),
    ("paper_base_bf16", "lora_adamw_base_bf16"),
    ("paper_base_bf16", "paper"),
    ("paper_compute_bf16", "lora_adamw_compute_bf16"),
    ("paper_base_int8", "lora_adamw_base_int8"),
    ("seed_base_int8", "full_adamw"),
    ("lora_adamw_base_int8", "lora_adamw"),
    ("paper_base_int8", "paper"),
    ("seed_base_int8", "seed"),
    ("paper_base_nf4", "lora_adamw_base_nf4"),
    ("seed_base_nf4", "full_adamw"),
    ("lora_adamw_base_nf4", "lora_adamw"),
    ("lora_adamw_base_nf4", "lora_adamw_base_int8"),
    ("paper_base_nf4", "paper"),
    ("seed_base_nf4", "seed"),
  ]
  ratios = {
    f"{a} / {b} {key}": ratio(a, b, key)
    for a, b in pairs
    if a in by and b in by
    for key in ("memory", "time")
  }
  billion = 10**9
  one_billion = {
    "seed D + V float32 (bytes)": 2 * 4 * billion,
    "seed D float32 + V bfloat16 (bytes)": (4 + 2) * billion,
    "full AdamW m + v float32 (bytes)": 2 * 4 * billion,
    "paper snapshot, rank r (bytes)": "2 r (in + out) per layer: 4 r (in + out) float32 bytes",
  }
  header = f"{'variant':28} {'memory MiB':>11} {'temp MiB':>9} {'GFLOP':>7} {'step ms':>8}"
  print(
    f"{args.layers} x ({args.width} x {args.width}) layer(s), rank {args.rank}, {args.rows} rows, "
    f"on {jax.devices()[0].device_kind}"
  )
  print(header)
  for r in records:
    m = r["memory"]
    print(
      f"{r['variant']:28} {m['total'] / 2**20:11.2f} {m['temp'] / 2**20:9.2f} "
      f"{r['flops'] / 1e9:7.3f} {r['step_s_median'] * 1e3:8.3f}"
    )
  for name, value in ratios.items():
    print(f"{name:45} {value:.3f}")
  for name, value in one_billion.items():
    print(f"1B parameters, {name}: {value}")
  result = {
    "config": {
      "width": args.width,
      "rank": args.rank,
      "rows": args.rows,
      "layers": args.layers,
      "lambda": LAMBDA,
      "repeats": args.repeats,
      "steps": args.steps,
    },
    "records": records,
    "ratios": ratios,
    "one_billion_parameters": one_billion,
    "environment": common.environment(),
  }
  out = Path(args.out)
  if out.suffix != ".json":
    out = out / "bench_paper_memory.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2))
  print(f"wrote {out}")
  return result


if __name__ == "__main__":
  main()
