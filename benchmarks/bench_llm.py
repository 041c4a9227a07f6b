"""One LLM training step: this library (JAX) against PEFT + PyTorch, on the same CPU.

Both sides build SmolLM2-135M's shape (a Llama: 30 blocks, width 576, 9 query
and 3 key/value heads, MLP 1536, vocabulary 49,152, tied embeddings) with the
SAME random weights (PyTorch's initialisation, copied into the JAX model of
``deltalora_jax/demo/llm/model.py``), take the same batch (4 x 128 random
tokens, float32, loss on every next token) and train with AdamW (same learning
rate, betas, epsilon, no weight decay). Before timing, the two sides must give
the same loss (relative 1e-4). Then every variant runs ``--steps`` steps per
round, the variants interleaved (this library's block, a one-second pause,
PyTorch's block: PyTorch's OpenMP threads spin on after its last operation), for
``--rounds`` rounds, after one warm-up step; the figure is the median step, as
tokens per second.

Variants (``jax-*`` this library, NNX, one jitted step with donated state):

* ``jax-lora``: LoRA rank 8 (alpha 16) on q, k, v, o (``use_delta=False``);
* ``jax-delta-lora``: the seed's rule on the same layers (LoRA + full-size D);
* ``jax-paper``: the published rule, telescoped (``paper_lambda=2``, snapshot
  factors, ``wrt=nnx.LoRAParam``; the base is never written);
* ``jax-full``: every weight;
* ``peft-lora``: PEFT ``LoraConfig(r=8, lora_alpha=16, target_modules=q,k,v,o)``
  on transformers' ``LlamaForCausalLM`` (``attn_implementation="sdpa"``);
* ``torch-full``: the same model, every weight.

PyTorch runs each method eagerly with the per-tensor AdamW (its CPU default),
eagerly with ``AdamW(fused=True)``, and (unless ``--no-compile``) with
``fused=True`` under ``torch.compile``; the ratios divide by the fastest
(``fastest_torch`` in the JSON says which). Peak memory: JAX, XLA's
``memory_analysis`` of the compiled step (arguments + outputs - donated +
temporaries); PyTorch, which has no allocator statistics on a CPU, the bytes of
the parameters, gradients, AdamW moments and the tensors autograd saves for the
backward pass (a lower bound of its peak), and the process's peak RSS at the end.

Run (about 10 minutes on 2 cores)::

    python benchmarks/bench_llm.py --out benchmarks/reference/llm_cpu.json
    python benchmarks/bench_llm.py --tiny --no-compile   # a 2-block toy, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import resource
import statistics
import sys
import time
from typing import Any

if __package__ in (None, ""):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax
import numpy as np
import optax
from flax import nnx

import deltalora_jax as dl
from deltalora_jax.demo import report
from deltalora_jax.demo import train as demo_train
from deltalora_jax.demo.llm import train
from deltalora_jax.demo.llm.model import LlamaConfig, from_tensors

RANK, ALPHA, LAMBDA, START = 8, 16.0, 2.0, 0
LR, EPS = 1e-4, 1e-8
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
SMOLLM2 = LlamaConfig()  # the defaults are SmolLM2-135M
TINY = LlamaConfig(
  vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2
)
JAX_METHODS = ("lora", "delta-lora", "paper", "full")
TORCH_METHODS = ("lora", "full")
TORCH_VARIANTS = {"": (False, False), "-fused": (True, False), "-compiled": (True, True)}


def make_batch(config: LlamaConfig, batch: int, length: int):
  """``(ids, valid, target)`` int32: random tokens, every position valid and scored."""
  ids = np.random.default_rng(0).integers(0, config.vocab_size, (batch, length)).astype(np.int32)
  return ids, np.ones_like(ids), np.ones_like(ids)


# --------------------------------------------------------------------------
# PyTorch + PEFT.
# --------------------------------------------------------------------------


def torch_model(config: LlamaConfig, seed: int = 0):
  """transformers' ``LlamaForCausalLM`` of ``config``, random (seeded), float32, tied head."""
  import torch
  from transformers import LlamaConfig as HFConfig
  from transformers import LlamaForCausalLM

  torch.manual_seed(seed)
  hf = HFConfig(
    vocab_size=config.vocab_size,
    hidden_size=config.hidden_size,
    intermediate_size=config.intermediate_size,
    num_hidden_layers=config.num_layers,
    num_attention_heads=config.num_heads,
    num_key_value_heads=config.num_kv_heads,
    rope_theta=config.rope_theta,
    rms_norm_eps=config.rms_norm_eps,
    tie_word_embeddings=True,
    max_position_embeddings=2048,
    attention_dropout=0.0,
  )
  model = LlamaForCausalLM._from_config(hf, attn_implementation="sdpa", dtype=torch.float32)
  return model.float()


def tensors_of(model) -> dict[str, np.ndarray]:
  """The torch model's weights by transformers' names (the tied head left out)."""
  return {
    k: v.detach().numpy().copy() for k, v in model.state_dict().items() if k != "lm_head.weight"
  }


def torch_variant(method: str, model, fused: bool, compiled: bool):
  """``(model, step)``: PEFT LoRA or full fine-tuning of a copy of ``model``."""
  import copy

  import torch
  from peft import LoraConfig, get_peft_model

  model = copy.deepcopy(model)
  if method == "lora":
    config = LoraConfig(
      r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), lora_dropout=0.0, bias="none"
    )
    model = get_peft_model(model, config)
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(
    params, lr=LR, betas=(0.9, 0.999), eps=EPS, weight_decay=0.0, fused=fused
  )
  forward = torch.compile(model) if compiled else model

  def loss_of(ids):
    logits = forward(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(
      logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    )

  def step(ids):
    loss = loss_of(ids)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()

  def memory(ids) -> int:
    """Parameters + gradients + AdamW moments + the tensors saved for the backward pass."""
    saved = []

    def pack(t):
      saved.append(t.numel() * t.element_size())
      return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
      loss = loss_of(ids)
    loss.backward()
    optimizer.zero_grad(set_to_none=True)
    every = sum(p.numel() * p.element_size() for p in model.parameters())
    trained = sum(p.numel() * p.element_size() for p in params)
    return int(every + 3 * trained + sum(saved))

  return model, step, memory, loss_of


# --------------------------------------------------------------------------
# This library.
# --------------------------------------------------------------------------


def jax_variant(method: str, config: LlamaConfig, tensors: dict, batch):
  """``(compiled step, state, figures)`` of ``method`` on the model of ``tensors``."""
  model = from_tensors(config, tensors)
  targets = rf"layers/\d+/self_attn/({'|'.join(TARGETS)})"
  tx = optax.inject_hyperparams(optax.adamw)(learning_rate=LR, eps=EPS, weight_decay=0.0)
  wrt: Any = nnx.LoRAParam
  lora = dict(rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(0))
  if method == "lora":
    dl.adapt_nnx(model, targets, use_delta=False, **lora)
  elif method == "delta-lora":
    dl.adapt_nnx(model, targets, use_delta=True, delta_scaling=0.1, **lora)
    tx = dl.delta_lora(1.0, 0.9, layers=model, lora_optimizer=tx)
    wrt = nnx.Any(nnx.LoRAParam, dl.DeltaParam)
  elif method == "paper":
    dl.adapt_nnx(model, targets, use_delta=False, paper_lambda=LAMBDA, **lora)
    tx = dl.paper_delta_lora(layers=model, lambda_=LAMBDA, start_step=START, lora_optimizer=tx)
  elif method == "full":
    wrt = nnx.Param
  else:
    raise ValueError(f"method must be among {JAX_METHODS}, got method={method!r}")
  optimizer = nnx.Optimizer(model, tx, wrt=wrt)
  graphdef, state = nnx.split((model, optimizer))
  start = time.perf_counter()
  compiled = train.make_step(graphdef, wrt).lower(state, *batch).compile()
  figures = {
    "compile_s": time.perf_counter() - start,
    "peak_bytes": demo_train._peak_bytes(compiled),
    "flops": (compiled.cost_analysis() or {}).get("flops"),
    "trainable_params": int(sum(x.size for x in jax.tree.leaves(nnx.state(model, wrt)))),
  }
  return compiled, state, figures


def loss_check(config: LlamaConfig, tensors: dict, batch, torch_loss: float) -> dict:
  """The JAX model's loss on ``batch`` against PyTorch's; raises past 1e-4 relative."""
  model = from_tensors(config, tensors)
  loss = float(jax.jit(lambda m, *b: train._loss(m, *b))(model, *batch))
  error = abs(loss - torch_loss) / abs(torch_loss)
  if error > 1e-4:
    raise AssertionError(f"the two sides disagree: loss {loss} (JAX) against {torch_loss}")
  return {"jax_loss": loss, "torch_loss": torch_loss, "relative_error": error}


# --------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
  import torch

  from benchmarks.bench_peft import cpu

  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tiny", action="store_true", help="a 2-block toy config (a smoke test)")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--length", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=2, help="steps per variant per round")
  parser.add_argument("--no-compile", action="store_true", help="no torch.compile variants")
  parser.add_argument("--jax-methods", default=",".join(JAX_METHODS))
  parser.add_argument("--torch-methods", default=",".join(TORCH_METHODS))
  parser.add_argument("--out", type=pathlib.Path, default=None)
  args = parser.parse_args(argv)
  config = TINY if args.tiny else SMOLLM2
  load_start = os.getloadavg()
  machine = cpu()
  print(f"CPU: {machine['model_name']} ({machine}); torch threads {torch.get_num_threads()}")
  batch = make_batch(config, args.batch, args.length)
  tokens = args.batch * args.length
  base = torch_model(config)
  tensors = tensors_of(base)
  ids = torch.from_numpy(batch[0].astype(np.int64))

  variants: dict[str, Any] = {}
  records: dict[str, dict] = {}
  for method in filter(None, args.jax_methods.split(",")):
    compiled, state, figures = jax_variant(method, config, tensors, batch)
    name = f"jax-{method}"
    holder = {"state": state}

    def run(compiled=compiled, holder=holder):
      holder["state"], loss = compiled(holder["state"], *batch)
      return float(loss)

    variants[name] = run
    records[name] = {"side": "jax", "method": method, **figures}
    print(f"{name}: compiled in {figures['compile_s']:.1f} s", flush=True)
  torch_loss = None
  for method in filter(None, args.torch_methods.split(",")):
    for suffix, (fused, compiled) in TORCH_VARIANTS.items():
      if compiled and args.no_compile:
        continue
      name = f"{'peft' if method == 'lora' else 'torch'}-{method}{suffix}"
      model, step, memory, loss_of = torch_variant(method, base, fused, compiled)
      if torch_loss is None:
        with torch.no_grad():
          torch_loss = float(loss_of(ids))
      record: dict[str, Any] = {"side": "torch", "method": method, "fused_adamw": fused}
      record["torch_compile"] = compiled
      record["peak_bytes_estimate"] = memory(ids)
      start = time.perf_counter()
      step(ids)  # warm-up: torch.compile compiles here
      record["first_step_s"] = time.perf_counter() - start
      record["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
      variants[name] = lambda step=step: float(step(ids))
      records[name] = record
      print(f"{name}: first step {record['first_step_s']:.1f} s", flush=True)
  check = None if torch_loss is None else loss_check(config, tensors, batch, torch_loss)
  for name, run in variants.items():
    if records[name]["side"] == "jax":
      run()  # warm-up
  times: dict[str, list[float]] = {name: [] for name in variants}
  for _ in range(args.rounds):
    side = None
    for name, run in variants.items():
      if records[name]["side"] != side:  # PyTorch's OpenMP threads spin on after its last op
        side = records[name]["side"]
        time.sleep(1.0)
      for _ in range(args.steps):
        start = time.perf_counter()
        loss = run()
        times[name].append(time.perf_counter() - start)
        if not np.isfinite(loss):
          raise FloatingPointError(f"{name}: loss {loss}")
  for name, record in records.items():
    record["median_step_s"] = statistics.median(times[name])
    record["tokens_per_s"] = tokens / record["median_step_s"]
    record["step_times_s"] = times[name]
  fastest = {}
  for method in TORCH_METHODS:
    mine = [n for n, r in records.items() if r["side"] == "torch" and r["method"] == method]
    if mine:
      fastest[method] = min(mine, key=lambda n: records[n]["median_step_s"])
  ratios = {}
  for name, record in records.items():
    if record["side"] == "jax":
      against = fastest.get("full" if record["method"] == "full" else "lora")
      if against is not None:
        ratios[name] = {
          "against": against,
          "tokens_per_s_ratio": record["tokens_per_s"] / records[against]["tokens_per_s"],
        }
  results = {
    "machine": {
      "cpu": machine,
      "torch_threads": torch.get_num_threads(),
      "load_average_start": load_start,
      "load_average_end": os.getloadavg(),
    },
    "environment": demo_train.environment(),
    "config": dataclasses.asdict(config) | {"name": "tiny" if args.tiny else "SmolLM2-135M"},
    "batch": args.batch,
    "length": args.length,
    "rounds": args.rounds,
    "steps_per_round": args.steps,
    "rank": RANK,
    "alpha": ALPHA,
    "targets": list(TARGETS),
    "loss_check": check,
    "variants": records,
    "fastest_torch": fastest,
    "ratios": ratios,
    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
  }
  print(table(results))
  if args.out is not None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
  return results


def table(results: dict) -> str:
  """The variants as a Markdown table."""
  lines = [
    "| variant | median step | tokens/s | vs fastest PyTorch | peak memory | trainable |",
    "|---|---:|---:|---:|---:|---:|",
  ]
  for name, r in results["variants"].items():
    ratio = results["ratios"].get(name)
    peak = r.get("peak_bytes") or r.get("peak_bytes_estimate")
    lines.append(
      f"| {name} | {1e3 * r['median_step_s']:.0f} ms | {r['tokens_per_s']:.0f} | "
      f"{'' if ratio is None else format(ratio['tokens_per_s_ratio'], '.2f') + 'x'} | "
      f"{peak / 2**20:.0f} MiB{'' if r['side'] == 'jax' else ' (est.)'} | "
      f"{report.count(r['trainable_params'])} |"
    )
  return "\n".join(lines)


if __name__ == "__main__":
  main()
