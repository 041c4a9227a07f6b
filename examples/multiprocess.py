"""Delta-LoRA training on a device mesh that spans several JAX processes.

Each process runs this file: it joins the others with
``jax.distributed.initialize``, builds a ``('data', 'fsdp')`` mesh over every
process's devices (``'data'`` across processes, ``'fsdp'`` within one), feeds
its own rows of each batch with ``jax.make_array_from_process_local_data``,
trains a small adapted MLP and saves collective checkpoints with
``dl.TrainingCheckpointer``. Started again on the same directory, it resumes
from the latest complete step.

A laptop run, 2 processes of 4 simulated CPU devices each (the launcher picks
a free port, starts the processes, and kills them all if one fails)::

  python examples/multiprocess.py --num-processes 2 --devices-per-process 4 \
      --steps 12 --save-every 4 --checkpoint-dir /tmp/ckpt

One process of a run you start yourself (every host, its own ``--process-id``)::

  python examples/multiprocess.py --coordinator 10.0.0.1:1234 \
      --num-processes 2 --process-id 0

On SLURM or Cloud TPU, ``--auto`` lets JAX find the coordinator, the number
of processes and this process's id (``jax.distributed.initialize()``)::

  srun python examples/multiprocess.py --auto --checkpoint-dir /shared/ckpt

Rank 0's last line is ``final step=S loss=L checksum=C``: the same numbers,
within float32 rounding, whatever the number of processes and devices
(the data are a fixed stream of global batches, each process taking the rows
of its own devices).

Bounded failure. ``--heartbeat-timeout`` (JAX's ``heartbeat_timeout_seconds``)
bounds how long a process keeps going once a peer has died: JAX's coordination
service notices the missing heartbeats and terminates every survivor with an
error naming the dead task, so none hangs in a collective.
``--init-timeout`` (``initialization_timeout``) bounds the wait for every
process to join, and ``shutdown_timeout_seconds`` the wait at exit.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

IN, HIDDEN, OUT, GLOBAL_BATCH = 16, 32, 8, 16
LEARNING_RATE, MOMENTUM = 0.05, 0.9
LORA_LEARNING_RATE, LORA_MOMENTUM = 0.1, 0.5
PAPER_START_STEP = 3


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rule", choices=("seed", "paper"), default="seed")
  parser.add_argument("--steps", type=int, default=12)
  parser.add_argument("--save-every", type=int, default=4, help="0: never save")
  parser.add_argument("--checkpoint-dir", default=None)
  parser.add_argument("--output", default=None, help="rank 0 writes the final parameters (.npz)")
  parser.add_argument("--num-processes", type=int, default=1)
  parser.add_argument("--devices-per-process", type=int, default=None)
  parser.add_argument("--process-id", type=int, default=None, help="set: run as one worker")
  parser.add_argument("--coordinator", default=None, help="host:port of process 0")
  parser.add_argument("--auto", action="store_true", help="jax.distributed.initialize() alone")
  parser.add_argument("--heartbeat-timeout", type=int, default=10)
  parser.add_argument("--init-timeout", type=int, default=60)
  parser.add_argument("--launch-timeout", type=float, default=300.0)
  parser.add_argument("--step-delay", type=float, default=0.0, help="seconds of sleep per step")
  parser.add_argument(
    "--stall-commit-at",
    type=int,
    default=None,
    help="tests only: process 0 writes this step's arrays, then hangs before the commit",
  )
  args = parser.parse_args(argv)
  for name in ("steps", "num_processes"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
  if args.save_every < 0:
    parser.error(f"--save-every must be 0 or more, got {args.save_every}")
  return args


# ----------------------------------------------------------------- launcher


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def with_devices(xla_flags: str, count: int) -> str:
  """``xla_flags`` with ``count`` simulated CPU devices (replacing any count already there)."""
  kept = [
    f for f in xla_flags.split() if not f.startswith("--xla_force_host_platform_device_count")
  ]
  return " ".join([*kept, f"--xla_force_host_platform_device_count={count}"])


def launch(args: argparse.Namespace, argv: list[str]) -> int:
  """Starts ``--num-processes`` local workers, waits (bounded) and returns their status."""
  coordinator = f"127.0.0.1:{free_port()}"
  env = dict(os.environ)
  if args.devices_per_process:
    env["XLA_FLAGS"] = with_devices(env.get("XLA_FLAGS", ""), args.devices_per_process)
  env.setdefault("JAX_PLATFORMS", "cpu")
  children = [
    subprocess.Popen(
      [sys.executable, __file__, *argv, "--process-id", str(i), "--coordinator", coordinator],
      env=env,
      stdout=subprocess.PIPE if i == 0 else subprocess.DEVNULL,
      text=True,
    )
    for i in range(args.num_processes)
  ]
  deadline = time.monotonic() + args.launch_timeout
  status = 0
  # Killed itself (SIGTERM), the launcher still kills its workers in the ``finally`` below.
  signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
  try:
    while any(c.poll() is None for c in children) and time.monotonic() < deadline:
      failed = [c for c in children if c.returncode not in (None, 0)]
      if failed:
        # A peer died: the others stop within the heartbeat timeout; give them that, then kill.
        deadline = min(deadline, time.monotonic() + args.heartbeat_timeout + 10)
      time.sleep(0.1)
  finally:
    for child in children:
      if child.poll() is None:
        child.kill()
        status = status or 124
    for child in children:
      child.wait(timeout=30)
  rank0_out = children[0].stdout.read() if children[0].stdout else ""
  sys.stdout.write(rank0_out)
  sys.stdout.flush()
  codes = [c.returncode for c in children]
  if any(codes) or status:
    print(f"launcher: worker exit codes {codes}", file=sys.stderr)
    return status or 1
  return 0


# ------------------------------------------------------------------ worker


def worker(args: argparse.Namespace) -> None:
  import jax

  # CPU collectives across processes (gloo, also the default of jax 0.10).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  timeouts = {
    "initialization_timeout": args.init_timeout,
    "heartbeat_timeout_seconds": args.heartbeat_timeout,
    "shutdown_timeout_seconds": max(args.heartbeat_timeout, 10),
  }
  if args.auto:
    jax.distributed.initialize(**timeouts)
  elif args.num_processes > 1 or args.coordinator:
    jax.distributed.initialize(
      coordinator_address=args.coordinator,
      num_processes=args.num_processes,
      process_id=args.process_id,
      **timeouts,
    )
  train(args)


def build(rule: str):
  import flax.linen as nn
  import jax.numpy as jnp
  import optax

  import deltalora_jax as dl

  use_delta = rule == "seed"

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.tanh(dl.DeltaLoRADense(HIDDEN, rank=4, use_delta=use_delta, name="hidden")(x))
      return dl.DeltaLoRADense(OUT, rank=2, use_delta=use_delta, name="out")(x)

  model = MLP()
  sample = jnp.zeros((1, IN))
  layers = dl.adapted_layers(model, sample)
  lora = optax.sgd(LORA_LEARNING_RATE, momentum=LORA_MOMENTUM)
  if use_delta:
    tx = dl.delta_lora(LEARNING_RATE, MOMENTUM, layers=layers, lora_optimizer=lora)
    optimizer = {"learning_rate": LEARNING_RATE, "momentum": MOMENTUM}
  else:
    tx = dl.paper_delta_lora(
      layers=layers, lambda_=2.0, start_step=PAPER_START_STEP, lora_optimizer=lora
    )
    optimizer = {"lambda": 2.0, "start_step": PAPER_START_STEP}
  optimizer["lora_optimizer"] = {"sgd": LORA_LEARNING_RATE, "momentum": LORA_MOMENTUM}
  hyperparameters = {
    "rule": rule,
    "layers": dl.layer_hyperparameters(layers),
    "optimizer": optimizer,
  }
  return model, sample, tx, hyperparameters


def global_batch(position: int):
  """The batch at a data position: a fixed stream, whatever the processes and devices."""
  import numpy as np

  rng = np.random.default_rng([1234, position])
  x = rng.standard_normal((GLOBAL_BATCH, IN), dtype=np.float32)
  y = np.sin(2.0 * x[:, :OUT]) + 0.1 * rng.standard_normal((GLOBAL_BATCH, OUT), dtype=np.float32)
  return x, y.astype(np.float32)


def local_rows(sharding, shape) -> slice:
  """The rows of a global batch that this process's devices hold (one contiguous block)."""
  indices = sharding.addressable_devices_indices_map(shape).values()
  starts = sorted({(i[0].start or 0, i[0].stop or shape[0]) for i in indices})
  lo, hi = starts[0][0], starts[-1][1]
  if sum(b - a for a, b in starts) != hi - lo:
    raise RuntimeError(f"this process's rows are not contiguous: {starts}")
  return slice(lo, hi)


def checksum(params) -> float:
  import jax
  import numpy as np

  return float(sum(np.sum(np.asarray(leaf, np.float64)) for leaf in jax.tree.leaves(params)))


def _stall_commit(step: int, directory: str) -> None:
  """Tests only: on process 0, hang before committing ``step``, after its arrays are written."""
  import jax
  from orbax.checkpoint._src.path import atomicity

  if jax.process_index() != 0:
    return
  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  def hang(self, *a, **k):
    if os.path.basename(str(self.get())).startswith(f"{step}."):
      with open(os.path.join(directory, os.pardir, "saving"), "w") as out:
        out.write(str(self.get()))
      while True:
        time.sleep(1.0)
    return finalize(self, *a, **k)

  atomicity.AtomicRenameTemporaryPath.finalize = hang


def train(args: argparse.Namespace) -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jax.experimental import multihost_utils
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import deltalora_jax as dl
  from deltalora_jax.paths import key_name

  model, sample, tx, hyperparameters = build(args.rule)
  local = jax.local_device_count()
  mesh = dl.make_mesh(data=jax.process_count(), fsdp=local)
  replicated = NamedSharding(mesh, P())
  batch = dl.batch_sharding(mesh)

  def fresh():
    variables = model.init(jax.random.key(0), sample)
    return {"variables": variables, "opt_state": tx.init(variables), "step": jnp.int32(0)}

  abstract = jax.eval_shape(fresh)
  variables = dl.variable_shardings(abstract["variables"], mesh)
  shardings = {
    "variables": variables,
    "opt_state": dl.optimizer_shardings(tx, abstract["variables"], variables),
    "step": replicated,
  }

  def step_fn(state, x, y):
    def loss_fn(v):
      return jnp.mean((model.apply(v, x) - y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state["variables"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["variables"])
    variables = optax.apply_updates(state["variables"], updates)
    return {"variables": variables, "opt_state": opt_state, "step": state["step"] + 1}, loss

  step = jax.jit(
    step_fn, in_shardings=(shardings, batch, batch), out_shardings=(shardings, replicated)
  )
  like = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )

  checkpoints = None
  if args.checkpoint_dir:
    checkpoints = dl.TrainingCheckpointer(os.path.abspath(args.checkpoint_dir), max_to_keep=None)
    if args.stall_commit_at is not None:
      _stall_commit(args.stall_commit_at, os.path.abspath(args.checkpoint_dir))
  if checkpoints is not None and checkpoints.latest_step() is not None:
    state = checkpoints.restore(like, hyperparameters=hyperparameters)
    log(f"resumed from step {int(state['step'])}")
  else:
    state = jax.jit(fresh, out_shardings=shardings)()

  rows = local_rows(batch, (GLOBAL_BATCH, IN))
  loss = jnp.float32(jnp.nan)
  while int(state["step"]) < args.steps:
    x, y = global_batch(int(state["step"]))
    x = jax.make_array_from_process_local_data(batch, x[rows], (GLOBAL_BATCH, IN))
    y = jax.make_array_from_process_local_data(batch, y[rows], (GLOBAL_BATCH, OUT))
    state, loss = step(state, x, y)
    done = int(state["step"])
    if checkpoints is not None and args.save_every and done % args.save_every == 0:
      checkpoints.save(done, state, hyperparameters=hyperparameters)  # every process calls it
    log(f"step {done} loss {float(loss):.6f}")
    if args.step_delay:
      time.sleep(args.step_delay)
  if checkpoints is not None:
    checkpoints.wait_until_finished()
    checkpoints.close()

  params = multihost_utils.process_allgather(state["variables"], tiled=True)
  memory = {}
  if args.rule == "seed":
    memory = {
      "delta": dl.bytes_per_device(state["variables"]["delta"]),
      "velocity": dl.bytes_per_device(dl.velocity(state["opt_state"])["delta"]),
    }
  if args.output:
    with open(f"{args.output}.rank{jax.process_index()}.json", "w") as out:
      json.dump({k: list(v.values()) for k, v in memory.items()} | {"fsdp": local}, out)
  if jax.process_index() == 0:
    if args.output:
      flat = {
        key_name(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
      }
      np.savez(args.output, **flat)
    print(
      f"final step={int(state['step'])} loss={float(loss):.7f} checksum={checksum(params):.7f}",
      flush=True,
    )


def log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  if args.process_id is None and not args.auto and args.num_processes > 1:
    return launch(args, argv)
  if args.process_id is None and not args.auto and args.devices_per_process:
    # One local process: its simulated devices must be set before JAX starts.
    os.environ["XLA_FLAGS"] = with_devices(
      os.environ.get("XLA_FLAGS", ""), args.devices_per_process
    )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  worker(args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
