"""PEFT + PyTorch on the GPU, the counterpart of ``gpu_llm.py``: tokens/s and memory.

The same configs as ``gpu_llm.py`` (transformers' ``Gemma3ForCausalLM`` and
``LlamaForCausalLM`` built from the sizes of ``gpu_llm.CONFIGS``, random
initialisation), the same batch and sequence length, the same methods where
PEFT has them: ``lora`` (PEFT ``LoraConfig``, rank 8, on the same seven
projections of every block) and ``full``. PyTorch in the usual GPU setting for
this: float32 parameters and AdamW moments (``fused=True``), the forward and
backward passes under ``torch.autocast(bfloat16)``, ``sdpa`` attention, eager
(``--compile`` adds ``torch.compile`` variants). Per method: the median of
``--steps`` timed steps after two warm-up steps (CUDA synchronised), tokens/s,
and ``torch.cuda.max_memory_allocated``.

On the GPU::

    python benchmarks/gpu_llm_torch.py --out gpu_llm_torch.json

Here, to check the script: ``python benchmarks/gpu_llm_torch.py --allow-cpu --out /tmp/t.json``.
"""

from __future__ import annotations

import gc
import json
import pathlib
import statistics
import sys
import time

if __package__ in (None, ""):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks.bench_llm import torch_model
from benchmarks.gpu_llm import CONFIGS, arguments, sizes
from deltalora_jax.demo.llm import train
from deltalora_jax.demo.llm.model import LlamaConfig

METHODS = ("lora", "full")


def hf_model(config: LlamaConfig, device: str):
  """transformers' model of ``config``'s sizes, random (seed 0), float32, on ``device``.

  A Llama is ``bench_llm.torch_model``'s; a Gemma 3 (the demo's sliding-window
  flags) is ``Gemma3ForCausalLM`` with the same sizes and layer pattern.
  """
  import torch
  import transformers

  if not config.sliding_window:
    return torch_model(config).to(device)
  hf = transformers.Gemma3TextConfig(
    vocab_size=config.vocab_size,
    hidden_size=config.hidden_size,
    intermediate_size=config.intermediate_size,
    num_hidden_layers=config.num_layers,
    num_attention_heads=config.num_heads,
    num_key_value_heads=config.num_kv_heads,
    rms_norm_eps=config.rms_norm_eps,
    tie_word_embeddings=True,
    head_dim=config.head_dim,
    sliding_window=config.sliding_window,
    query_pre_attn_scalar=config.head_dim,
    layer_types=list(config.layer_types),
  )
  torch.manual_seed(0)
  model = transformers.Gemma3ForCausalLM._from_config(
    hf, attn_implementation="sdpa", dtype=torch.float32
  )
  return model.to(device)


def measure(config: LlamaConfig, method: str, batch: int, length: int, steps: int,
            device: str, compiled: bool) -> dict:  # fmt: skip
  """One method: build, warm up twice, time ``steps`` steps."""
  import torch
  from peft import LoraConfig, get_peft_model

  model = hf_model(config, device)
  if method == "lora":
    options = train.Options()  # the demo's rank and alpha, as gpu_llm.py adapts with
    lora = LoraConfig(
      r=options.rank,
      lora_alpha=options.rank if options.alpha is None else options.alpha,
      target_modules=list(train.PROJECTIONS),
      lora_dropout=0.0,
      bias="none",
    )
    model = get_peft_model(model, lora)
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  fused = device != "cpu"
  optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=fused)
  forward = torch.compile(model) if compiled else model
  ids = torch.randint(0, config.vocab_size, (batch, length), device=device)

  def step():
    with torch.autocast(device_type="cuda" if device != "cpu" else "cpu", dtype=torch.bfloat16):
      logits = forward(input_ids=ids).logits
      loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)
      )
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()

  sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
  if device != "cpu":
    torch.cuda.reset_peak_memory_stats()
  start = time.perf_counter()
  for _ in range(2):
    loss = step()
  sync()
  warmup_s = time.perf_counter() - start
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    loss = step()
    sync()
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  record = {
    "method": method + ("-compiled" if compiled else ""),
    "trainable_params": int(sum(p.numel() for p in params)),
    "warmup_s": warmup_s,
    "median_step_s": median,
    "step_times_s": times,
    "tokens_per_s": batch * length / median,
    "max_memory_allocated": torch.cuda.max_memory_allocated() if device != "cpu" else None,
    "final_loss": float(loss),
  }
  return record


def main(argv: list[str] | None = None) -> int:
  import torch
  import transformers

  parser = arguments(__doc__, METHODS)
  parser.add_argument("--compile", action="store_true", help="add torch.compile variants")
  args = parser.parse_args(argv)
  on_gpu = torch.cuda.is_available()
  if not on_gpu and not args.allow_cpu:
    print("no GPU here (torch.cuda.is_available() is False); --allow-cpu to check")
    return 2
  device = "cuda" if on_gpu else "cpu"
  configs, batch, length = sizes(parser, args, on_gpu)
  results = {
    "device": torch.cuda.get_device_name() if on_gpu else "cpu",
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "batch": batch,
    "length": length,
    "dtype": "autocast bfloat16, float32 parameters and AdamW moments (fused)",
    "configs": {},
  }
  start = time.perf_counter()
  for name in configs:
    entry: dict = {"methods": {}}
    results["configs"][name] = entry
    for method in args.methods.split(","):
      for compiled in (False, True) if args.compile else (False,):
        label = method + ("-compiled" if compiled else "")
        print(f"{name} {label} ...", flush=True)
        try:
          record = measure(CONFIGS[name], method, batch, length, args.steps, device, compiled)
          gc.collect()  # the model and optimizer of this method, before the next one's
          if on_gpu:
            torch.cuda.empty_cache()
        except Exception as error:  # out of memory on one method: keep the rest
          record = {"method": label, "error": f"{type(error).__name__}: {error}"[:2000]}
          print(f"  failed: {record['error'][:300]}", flush=True)
        else:
          memory = (record["max_memory_allocated"] or 0) / 2**30
          step_ms = 1e3 * record["median_step_s"]
          rate = record["tokens_per_s"]
          print(f"  {rate:.0f} tokens/s, step {step_ms:.1f} ms, peak {memory:.2f} GiB")
        entry["methods"][label] = record
        results["seconds"] = time.perf_counter() - start
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
  print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
