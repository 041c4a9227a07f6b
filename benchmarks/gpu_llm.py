"""LLM training steps on a GPU in bfloat16: tokens/s, MFU and memory per method.

Random-initialised decoders of real shapes (no weights are read), built by the
LLM demo's model (``deltalora_jax/demo/llm/model.py``) and trained by the
demo's methods (``deltalora_jax/demo/llm/train.py``: ``lora``, ``delta-lora``,
``paper`` telescoped, ``lora-scaled`` is ``lora``'s program, ``full``) with
rank 8 on the seven projections of every block; compute in bfloat16, float32
parameters and AdamW moments, one jitted step with donated state.

Configs (``--configs``):

* ``gemma3-270m``: Gemma 3 270M (``model.gemma3_270m_config()``: 18 blocks,
  width 640, MLP 2048, 4 query heads and 1 key/value head of 256, vocabulary
  262,144, sliding window 512 on five layers of six, QK norms);
* ``llama-1b``: Llama 3.2 1B's sizes (16 blocks, width 2048, MLP 8192, 32/8
  heads, vocabulary 128,256, tied embeddings);
* ``tiny``, ``gemma3-tiny``: 2-block toys of each family, for ``--allow-cpu``.

Per method: the compile time, the median of ``--steps`` timed steps (after
two warm-up steps), tokens/s, MFU = flops of the step / (median step x the
device's dense bf16 peak), the flops being XLA's ``cost_analysis`` of the
lowered (not yet compiled) step: on a GPU the compiled step's count leaves out
the products handed to cuBLAS (``flops_compiled`` keeps it, for the record),
XLA's ``memory_analysis`` peak
(arguments + outputs - donated + temporaries) and the device's
``peak_bytes_in_use`` so far. Results are written to ``--out`` after every
method (a run cut short keeps what it measured).

On the GPU (about 3 minutes on an H200)::

    python benchmarks/gpu_llm.py --out gpu_llm.json

Here, to check the script: ``python benchmarks/gpu_llm.py --allow-cpu --out /tmp/g.json``
(the ``tiny`` config).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import pathlib
import statistics
import sys
import time

if __package__ in (None, ""):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import deltalora_jax as dl
from deltalora_jax.demo.llm import train
from deltalora_jax.demo.llm.model import Llama, LlamaConfig, gemma3_270m_config

CONFIGS = {
  "gemma3-270m": gemma3_270m_config(),
  "llama-1b": LlamaConfig(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_layers=16,
    num_heads=32,
    num_kv_heads=8,
    rope_theta=5e5,
  ),
  "gemma3-tiny": dataclasses.replace(
    gemma3_270m_config(num_layers=2),
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    head_dim=32,
    sliding_window=8,
  ),
  "tiny": LlamaConfig(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2
  ),
}
METHODS = ("lora", "delta-lora", "paper", "full")
# Dense (no sparsity) bf16 peaks in TFLOP/s, from the vendors' data sheets.
PEAKS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}


def peak_flops(kind: str, override: float | None) -> float | None:
  """Dense bf16 flops per second of a device, or None when its name is not known."""
  if override:
    return override * 1e12
  for name, peak in PEAKS.items():  # the longer names first
    if name.lower() in kind.lower():
      return peak * 1e12
  return None


def _flops(stage) -> float | None:
  cost = stage.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  return None if cost.get("flops") is None else float(cost["flops"])


def measure(config: LlamaConfig, method: str, batch: int, length: int, steps: int) -> dict:
  """One method on one config: compile, warm up, time ``steps`` steps."""
  options = train.Options(
    methods=(method,), batch_size=batch, max_length=length, paper_start_step=0, progress=False
  )
  spec = train.METHODS[method]
  model = Llama(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  train.with_dtype(model, jnp.bfloat16)
  if spec.adapter is not None:
    dl.adapt_nnx(model, options.target_pattern, rngs=nnx.Rngs(1), **spec.adapter(options))
  wrt = spec.wrt(model)
  optimizer = nnx.Optimizer(model, spec.optimizer(options, model), wrt=wrt)
  graphdef, state = nnx.split((model, optimizer))
  trainable = int(sum(x.size for x in jax.tree.leaves(nnx.state(model, wrt))))
  del model, optimizer
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, config.vocab_size, (batch, length)), jnp.int32)
  data = (ids, jnp.ones_like(ids), jnp.ones_like(ids))
  start = time.perf_counter()
  lowered = train.make_step(graphdef, wrt).lower(state, *data)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  flops = _flops(lowered)
  device_flops = _flops(compiled)
  for _ in range(2):
    state, loss = compiled(state, *data)
  loss.block_until_ready()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, loss = compiled(state, *data)
    loss.block_until_ready()
    times.append(time.perf_counter() - start)
  stats = jax.devices()[0].memory_stats() or {}
  median = statistics.median(times)
  record = {
    "method": method,
    "trainable_params": trainable,
    "compile_s": compile_s,
    "median_step_s": median,
    "step_times_s": times,
    "tokens_per_s": batch * length / median,
    "flops": flops,
    "flops_compiled": device_flops,
    "xla_peak_bytes": train.demo_train._peak_bytes(compiled),
    "device_peak_bytes_in_use": stats.get("peak_bytes_in_use"),
    "final_loss": float(loss),
  }
  del state, compiled
  gc.collect()
  return record


def arguments(doc: str, methods: tuple[str, ...]) -> argparse.ArgumentParser:
  """The arguments of this script and of ``gpu_llm_torch.py``, its PyTorch counterpart."""
  parser = argparse.ArgumentParser(description=doc.split("\n")[0])
  parser.add_argument("--configs", default=None, help="comma-separated, among " + ",".join(CONFIGS))
  parser.add_argument("--methods", default=",".join(methods))
  parser.add_argument("--batch", type=int, default=None, help="(8 on a GPU, 2 on a CPU)")
  parser.add_argument("--length", type=int, default=None, help="(1024 on a GPU, 32 on a CPU)")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--allow-cpu", action="store_true", help="run without a GPU (tiny configs)")
  parser.add_argument("--out", type=pathlib.Path, required=True)
  return parser


def sizes(
  parser: argparse.ArgumentParser, args: argparse.Namespace, on_gpu: bool
) -> tuple[list[str], int, int]:
  """``(config names, batch, length)`` of ``args``: the real shapes on a GPU, toys on a CPU."""
  configs = (args.configs or ("gemma3-270m,llama-1b" if on_gpu else "tiny,gemma3-tiny")).split(",")
  unknown = [c for c in configs if c not in CONFIGS]
  if unknown:
    parser.error(f"--configs must be among {list(CONFIGS)}, got {unknown}")
  return configs, args.batch or (8 if on_gpu else 2), args.length or (1024 if on_gpu else 32)


def main(argv: list[str] | None = None) -> int:
  parser = arguments(__doc__, METHODS)
  parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak")
  args = parser.parse_args(argv)
  device = jax.devices()[0]
  on_gpu = device.platform == "gpu"
  if not on_gpu and not args.allow_cpu:
    print(f"no GPU here (jax sees {device.platform}: {device.device_kind}); --allow-cpu to check")
    return 2
  configs, batch, length = sizes(parser, args, on_gpu)
  peak = peak_flops(device.device_kind, args.peak_tflops)
  results = {
    "device": {
      "platform": device.platform,
      "kind": device.device_kind,
      "count": jax.device_count(),
    },
    "jax": jax.__version__,
    "peak_flops": peak,
    "batch": batch,
    "length": length,
    "dtype": "bfloat16 compute, float32 parameters and AdamW moments",
    "rank": train.Options().rank,
    "targets": list(train.PROJECTIONS),
    "configs": {},
  }
  start = time.perf_counter()
  for name in configs:
    config = CONFIGS[name]
    entry = {"config": dataclasses.asdict(config), "methods": {}}
    results["configs"][name] = entry
    for method in args.methods.split(","):
      print(f"{name} {method} ...", flush=True)
      try:
        record = measure(config, method, batch, length, args.steps)
      except Exception as error:  # out of memory on one method: keep the rest
        record = {"method": method, "error": f"{type(error).__name__}: {error}"[:2000]}
        print(f"  failed: {record['error'][:300]}", flush=True)
      else:
        record["mfu"] = (
          None
          if peak is None or not record["flops"]
          else (record["flops"] / record["median_step_s"] / peak)
        )
        mfu = "n/a" if record["mfu"] is None else f"{100 * record['mfu']:.1f}%"
        print(
          f"  {record['tokens_per_s']:.0f} tokens/s, MFU {mfu}, step "
          f"{1e3 * record['median_step_s']:.1f} ms, XLA peak "
          f"{(record['xla_peak_bytes'] or 0) / 2**30:.2f} GiB, compile {record['compile_s']:.0f} s",
          flush=True,
        )
      entry["methods"][method] = record
      results["seconds"] = time.perf_counter() - start
      args.out.parent.mkdir(parents=True, exist_ok=True)
      args.out.write_text(json.dumps(results, indent=1))
  print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
