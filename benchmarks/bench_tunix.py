"""Step time of a tunix model adapted by this library against plain LoRA through qwix.

The same tunix Qwen 3 (random weights), the same batch, rank 8 on every projection of
every decoder layer and the LM head (attention ``Einsum`` and MLP ``nnx.Linear``), AdamW
on the LoRA factors in each variant:

* ``qwix_lora``: ``qwix.LoraProvider`` + ``qwix.apply_lora_to_model``, what tunix uses;
* ``lora``: this library's plain LoRA, ``adapt_nnx(..., use_delta=False)``;
* ``seed``: this library's seed rule, ``adapt_nnx`` + :func:`deltalora_jax.delta_lora`
  (a full-size ``D`` per projection, trained by the delta rule).

Each variant's step (``nnx.jit``: forward, backward with respect to ``nnx.LoRAParam``,
the optimizer's update, as tunix's ``PeftTrainer`` steps) is compiled once, then timed
``--steps`` times, the variants interleaved so that a noisy machine hurts them alike; the
median is reported. Needs the ``tunix`` extra. Run from the repository root::

  python benchmarks/bench_tunix.py              # writes benchmarks/reference/tunix_cpu.json
  python benchmarks/bench_tunix.py --quick      # a smaller model, seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import deltalora_jax as dl
from benchmarks import common

with warnings.catch_warnings():  # tunix imports JAX names JAX deprecates
  warnings.simplefilter("ignore", DeprecationWarning)
  import qwix
  from tunix.models.qwen3 import model as qwen3

RANK, ALPHA = 8, 16.0
VARIANTS = ("qwix_lora", "lora", "seed")


def config(quick: bool) -> qwen3.ModelConfig:
  sizes = (
    {"num_layers": 2, "embed_dim": 128, "hidden_dim": 384, "num_heads": 4, "head_dim": 32}
    if quick
    else {"num_layers": 4, "embed_dim": 512, "hidden_dim": 1536, "num_heads": 8, "head_dim": 64}
  )
  return qwen3.ModelConfig(
    vocab_size=1024,
    num_kv_heads=sizes["num_heads"] // 2,
    rope_theta=10_000,
    norm_eps=1e-6,
    **sizes,
  )


def inputs(batch: int, length: int) -> dict[str, jax.Array]:
  tokens = jax.random.randint(jax.random.key(0), (batch, length), 0, 1024)
  return {
    "input_tokens": tokens,
    "positions": jnp.broadcast_to(jnp.arange(length), (batch, length)),
    "cache": None,
    "attention_mask": jnp.broadcast_to(
      jnp.tril(jnp.ones((length, length), bool)), (batch, length, length)
    ),
  }


def build(variant: str, cfg: qwen3.ModelConfig, batch: dict) -> tuple[nnx.Module, nnx.Optimizer]:
  model = qwen3.Qwen3(cfg, rngs=nnx.Rngs(0))
  adamw = optax.adamw(1e-3)
  if variant == "qwix_lora":
    provider = qwix.LoraProvider(module_path=".*", rank=RANK, alpha=ALPHA)
    model = qwix.apply_lora_to_model(model, provider, **batch, rngs=nnx.Rngs(1))
    tx = adamw
  else:
    dl.adapt_nnx(model, None, rank=RANK, alpha=ALPHA, use_delta=variant == "seed", rngs=nnx.Rngs(1))
    tx = (
      adamw if variant == "lora" else dl.delta_lora(10.0, 0.9, layers=model, lora_optimizer=adamw)
    )
  return model, nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)


def loss_fn(model: nnx.Module, batch: dict) -> jax.Array:
  logits = model(**batch)[0][:, :-1]
  targets = batch["input_tokens"][:, 1:]
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


@nnx.jit
def step(model: nnx.Module, optimizer: nnx.Optimizer, batch: dict) -> jax.Array:
  loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, batch)
  optimizer.update(model, grads)
  return loss


def count(model: nnx.Module, kind: type) -> int:
  return sum(v.size for v in jax.tree.leaves(nnx.state(model, kind)))


def cpu_model() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return common.environment()["processor"]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--length", type=int, default=128)
  parser.add_argument("--out", default="benchmarks/reference/tunix_cpu.json")
  args = parser.parse_args()
  warnings.simplefilter("ignore", DeprecationWarning)  # tunix's and qwix's, not ours
  cfg = config(args.quick)
  batch = inputs(args.batch, args.length)
  runs, figures = {}, {}
  for variant in VARIANTS:
    model, optimizer = build(variant, cfg, batch)
    start = time.perf_counter()
    first = float(step(model, optimizer, batch))  # compiles
    figures[variant] = {
      "first_step_with_compile_s": time.perf_counter() - start,
      "first_loss": first,
      "lora_parameters": count(model, nnx.All(nnx.LoRAParam, nnx.Not(dl.DeltaParam))),
      "delta_parameters": count(model, dl.DeltaParam),
      "times_s": [],
    }
    runs[variant] = (model, optimizer)
  for _ in range(args.steps):
    for variant, (model, optimizer) in runs.items():
      start = time.perf_counter()
      loss = step(model, optimizer, batch)
      loss.block_until_ready()
      figures[variant]["times_s"].append(time.perf_counter() - start)
      figures[variant]["last_loss"] = float(loss)
  for entry in figures.values():
    entry["median_step_s"] = statistics.median(entry["times_s"])
  base = figures["qwix_lora"]["median_step_s"]
  result = {
    "model": {
      k: getattr(cfg, k)
      for k in (
        "num_layers",
        "vocab_size",
        "embed_dim",
        "hidden_dim",
        "num_heads",
        "head_dim",
        "num_kv_heads",
      )
    },
    "batch": args.batch,
    "length": args.length,
    "rank": RANK,
    "steps": args.steps,
    "cpu_model": cpu_model(),
    "environment": common.environment(),
    "variants": figures,
  }
  print(
    f"tunix Qwen3 {result['model']}, batch {args.batch} x {args.length}, rank {RANK}, "
    f"on {result['cpu_model']} ({result['environment']['cpu_count']} cores)"
  )
  print(f"{'variant':<10} {'median step':>12} {'vs qwix':>8} {'LoRA params':>12} {'D params':>10}")
  for variant, entry in figures.items():
    print(
      f"{variant:<10} {entry['median_step_s'] * 1e3:>10.1f}ms "
      f"{entry['median_step_s'] / base:>7.2f}x {entry['lora_parameters']:>12,} "
      f"{entry['delta_parameters']:>10,}"
    )
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
  main()
