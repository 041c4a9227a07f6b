"""Where the time of the MiniLM training step goes, from a ``jax.profiler`` trace.

Compiles the step of ``bench_peft.py`` (this library's side only: no PyTorch
needed), records a few steps with :func:`jax.profiler.trace`, and splits the
wall time of a step between the kinds of XLA operations that ran:

* ``dense products``: fusions holding a matrix product of at least 0.1 GFLOP
  (the layers' ``[1024, 384] x [384, 1536]`` and the like);
* ``small products``: the other matrix products (LoRA's rank-8 factors, the
  attention scores of each head);
* ``element-wise and reductions``: everything else (GELU, LayerNorm, softmax,
  the optimizer);
* ``idle``: no operation running (dispatch, synchronisation).

When operations overlap, their shared wall time is split evenly between them,
so the parts add up to the step. Run from the repository root::

    python benchmarks/profile_peft.py              # lora, delta-lora, full
    python benchmarks/profile_peft.py --top 15     # and the 15 costliest operations
"""

from __future__ import annotations

import argparse
import collections
import itertools
import math
import pathlib
import re
import sys
import tempfile

if __package__ in (None, ""):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
from jax.profiler import ProfileData

from benchmarks import bench_peft
from deltalora_jax.demo import weights

DENSE_FLOPS = 1e8
_DTYPE_SIZES = {"f32": 4, "bf16": 2, "f16": 2, "f64": 8}


def product_flops(hlo: str) -> dict[str, float]:
  """Flops of the matrix product in each operation (fusion or dot) of an HLO module's entry."""
  bodies = {}
  for block in re.split(r"\n\n", hlo):
    name = re.match(r"\s*%?(\S+) ", block)
    if name:
      bodies[name.group(1).lstrip("%")] = block
  flops = {}
  entry = re.search(r"^ENTRY .*?^}", hlo, re.M | re.S).group(0)
  for line in entry.splitlines():
    op = re.match(r"\s*(?:ROOT )?%(\S+) = .*?(?:calls=%([^,\s]+)|$)", line)
    if not op:
      continue
    body = bodies.get(op.group(2), line) if op.group(2) else line
    dot = re.search(
      r"= \w+\[([\d,]*)\]\S* dot\(%(\S+), %\S+\).*?lhs_contracting_dims=\{([\d,]*)\}", body
    )
    if not dot:
      continue
    # The left operand is defined in the fusion's body, or in the module for a plain dot.
    lhs_def = r"%" + re.escape(dot.group(2)) + r" = \w+\[([\d,]*)\]"
    lhs = re.search(lhs_def, body) or re.search(lhs_def, hlo)
    lhs_dims = [int(d) for d in lhs.group(1).split(",") if d] if lhs else []
    contracted = math.prod(lhs_dims[int(c)] for c in dot.group(3).split(",") if c and lhs_dims)
    out = math.prod(int(d) for d in dot.group(1).split(",") if d)
    flops[op.group(1)] = 2.0 * out * contracted
  return flops


def breakdown(trace_dir: str, hlo: str, steps: int) -> tuple[dict[str, float], dict[str, float]]:
  """Milliseconds per step of each kind, and of each operation, from a trace."""
  flops = product_flops(hlo)
  names = set(re.findall(r"^\s*(?:ROOT )?%(\S+) = ", hlo, re.M))
  path = next(pathlib.Path(trace_dir).rglob("*.xplane.pb"))
  events = []
  for plane in ProfileData.from_file(str(path)).planes:
    for line in plane.lines:
      events += [(e.start_ns, e.start_ns + e.duration_ns, e.name) for e in line.events]
  events = sorted(e for e in events if e[2] in names)

  def kind(name):
    if name not in flops:
      return "element-wise and reductions"
    return "dense products" if flops[name] >= DENSE_FLOPS else "small products"

  kinds, ops = collections.Counter(), collections.Counter()
  cuts = sorted({t for e in events for t in e[:2]})
  running, i = [], 0
  for start, end in itertools.pairwise(cuts):
    while i < len(events) and events[i][0] <= start:
      running.append(events[i])
      i += 1
    running = [e for e in running if e[1] > start]
    if not running:
      kinds["idle"] += end - start
    for e in running:
      kinds[kind(e[2])] += (end - start) / len(running)
      ops[e[2]] += (end - start) / len(running)
  scale = 1e-6 / steps
  return {k: v * scale for k, v in kinds.items()}, {k: v * scale for k, v in ops.items()}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--methods", nargs="+", default=["lora", "delta-lora", "full"])
  parser.add_argument("--steps", type=int, default=5, help="steps recorded per method")
  parser.add_argument("--top", type=int, default=0, help="also list the costliest operations")
  args = parser.parse_args(argv)

  batch = tuple(jnp.asarray(a) for a in bench_peft.make_batch(32, 32))
  pretrained = weights.load_encoder()["params"]
  for method in args.methods:
    _, trainable, frozen, tx, step, _ = bench_peft.jax_variant(method, pretrained, *batch)
    state = [trainable, tx.init(trainable)]
    hlo = step.lower(*state, frozen, *batch).compile().as_text()

    def run(state=state, step=step, frozen=frozen):
      state[0], state[1], loss = step(*state, frozen, *batch)
      jax.block_until_ready(loss)

    for _ in range(3):
      run()
    with tempfile.TemporaryDirectory() as trace_dir:
      with jax.profiler.trace(trace_dir):
        for _ in range(args.steps):
          run()
      kinds, ops = breakdown(trace_dir, hlo, args.steps)
    dense = sum(f for f in product_flops(hlo).values() if f >= DENSE_FLOPS)
    total = sum(kinds.values())
    print(f"\n{method}: {total:.0f} ms a step (traced)")
    for name, ms in sorted(kinds.items(), key=lambda kv: -kv[1]):
      rate = f"  ({dense / 1e9:.1f} GFLOP, {dense / ms / 1e6:.0f} GFLOP/s)"
      note = rate if name == "dense products" else ""
      print(f"  {name:<30}{ms:7.1f} ms {100 * ms / total:5.1f}%{note}")
    for name, ms in sorted(ops.items(), key=lambda kv: -kv[1])[: args.top]:
      print(f"    {ms:6.2f} ms  {name}")


if __name__ == "__main__":
  main()
