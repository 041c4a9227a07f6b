"""Several JAX processes for real: ``examples/multiprocess.py`` on local CPU processes.

Every run here is a group of real processes joined by ``jax.distributed``
(gloo collectives on CPU). No wait is unbounded: each launcher run has a
timeout and its whole process group is killed on failure, and each worker
started directly is killed in a ``finally``.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import deltalora_jax as dl

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "multiprocess.py"
STEPS, SAVE_EVERY = 12, 4
HEARTBEAT = 5  # seconds: how long a survivor may go on after its peer died
TIMEOUT = 150  # seconds for any one group of processes
DELTA_BYTES = (16 * 32 + 32 * 8) * 4  # the two D matrices of the example, float32


def _env(devices: int | None = None) -> dict:
  """This environment without conftest's 8 devices (the example sets its own)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  flags = [
    f
    for f in env.get("XLA_FLAGS", "").split()
    if not f.startswith("--xla_force_host_platform_device_count")
  ]
  if devices:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  env["XLA_FLAGS"] = " ".join(flags)
  return env


def launch(*args, processes: int, devices: int, timeout: float = TIMEOUT):
  """Runs the launcher; returns (rank 0's final line, stderr); kills the group on timeout."""
  command = [
    sys.executable,
    str(EXAMPLE),
    "--num-processes",
    str(processes),
    "--devices-per-process",
    str(devices),
    "--heartbeat-timeout",
    str(HEARTBEAT),
    "--launch-timeout",
    str(timeout - 20),
    *map(str, args),
  ]
  child = subprocess.Popen(
    command,
    env=_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    start_new_session=True,
  )
  try:
    stdout, stderr = child.communicate(timeout=timeout)
  finally:
    if child.poll() is None:
      os.killpg(child.pid, signal.SIGKILL)
      child.communicate(timeout=30)
  assert child.returncode == 0, stderr[-4000:]
  finals = [line for line in stdout.splitlines() if line.startswith("final ")]
  assert finals, stdout[-2000:] + stderr[-2000:]
  return finals[-1], stderr


def load(path) -> dict:
  with np.load(path) as data:
    return {name: data[name] for name in data.files}


def _port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def start_workers(*args, processes: int, devices: int, logs: pathlib.Path):
  """The workers of one run, started directly so that one of them can be killed."""
  coordinator = f"127.0.0.1:{_port()}"
  workers = []
  for i in range(processes):
    command = [sys.executable, str(EXAMPLE), "--num-processes", str(processes)]
    command += ["--process-id", str(i), "--coordinator", coordinator]
    command += ["--heartbeat-timeout", str(HEARTBEAT), *map(str, args)]
    with open(logs / f"worker{i}.log", "w") as log:
      workers.append(
        subprocess.Popen(command, env=_env(devices), stdout=subprocess.DEVNULL, stderr=log)
      )
  return workers


def wait_for(condition, workers, what: str, timeout: float = TIMEOUT) -> None:
  deadline = time.monotonic() + timeout
  while not condition():
    dead = [w.returncode for w in workers if w.poll() is not None]
    assert not dead, f"a worker exited ({dead}) before {what}"
    assert time.monotonic() < deadline, f"timed out waiting for {what}"
    time.sleep(0.05)


def kill_all(workers) -> None:
  for worker in workers:
    if worker.poll() is None:
      worker.kill()
  for worker in workers:
    worker.wait(timeout=30)


# ---------------------------------------------------------------- equality


@pytest.fixture(scope="module", params=["seed", "paper"])
def runs(request, tmp_path_factory):
  """The same 6 steps as 1 process x 8 devices, 2 x 4 and 4 x 2: final parameters and bytes."""
  rule = request.param
  directory = tmp_path_factory.mktemp(f"equal-{rule}")
  results = {}
  for processes, devices in ((1, 8), (2, 4), (4, 2)):
    output = directory / f"{processes}x{devices}.npz"
    line, _ = launch(
      "--rule",
      rule,
      "--steps",
      6,
      "--save-every",
      0,
      "--output",
      output,
      processes=processes,
      devices=devices,
    )
    memory = [
      json.loads((directory / f"{output.name}.rank{i}.json").read_text()) for i in range(processes)
    ]
    results[processes, devices] = line, load(output), memory
  return rule, results


def test_several_processes_equal_one_process_of_eight_devices(runs):
  _, results = runs
  _, want, _ = results[1, 8]
  assert any(name.endswith("kernel") for name in want)
  for shape in ((2, 4), (4, 2)):
    line, got, _ = results[shape]
    assert line.startswith("final step=6 ")
    assert sorted(got) == sorted(want)
    for name in want:
      np.testing.assert_allclose(got[name], want[name], rtol=2e-5, atol=1e-6, err_msg=name)


def test_the_run_moves_the_parameters_it_should(runs):
  rule, results = runs
  _, params, _ = results[2, 4]
  if rule == "seed":
    assert float(np.max(np.abs(params["delta/hidden/delta"]))) > 0
  else:
    assert not any(name.startswith("delta/") for name in params)


def test_bytes_of_delta_and_velocity_per_device_are_the_total_over_the_shards(runs):
  rule, results = runs
  for (processes, devices), (_, _, memory) in results.items():
    assert len(memory) == processes
    for per_process in memory:
      assert per_process["fsdp"] == devices
      if rule == "paper":  # the paper rule keeps no D and no velocity
        assert sorted(per_process) == ["fsdp"]
        continue
      for name in ("delta", "velocity"):
        assert per_process[name] == [DELTA_BYTES // devices] * devices, (name, processes)


# ------------------------------------------------------------------ faults


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """Final parameters of an uninterrupted 2 x 4 run that saves every 4 steps."""
  directory = tmp_path_factory.mktemp("uninterrupted")
  output = directory / "final.npz"
  checkpoints = directory / "checkpoints"
  args = ("--steps", STEPS, "--save-every", SAVE_EVERY, "--checkpoint-dir", checkpoints)
  launch(*args, "--output", output, processes=2, devices=4)
  assert sorted(int(p.name) for p in checkpoints.iterdir()) == [4, 8, 12]
  return load(output)


def assert_bit_identical(got: dict, want: dict) -> None:
  assert sorted(got) == sorted(want)
  for name in want:
    assert got[name].dtype == want[name].dtype, name
    np.testing.assert_array_equal(got[name].view(np.uint8), want[name].view(np.uint8), name)


def test_killed_mid_training_then_restarted_resumes_bit_identical(tmp_path, uninterrupted):
  checkpoints = tmp_path / "checkpoints"
  args = ("--steps", STEPS, "--save-every", SAVE_EVERY, "--checkpoint-dir", checkpoints)
  workers = start_workers(*args, "--step-delay", 0.2, processes=2, devices=4, logs=tmp_path)
  try:
    wait_for(lambda: (checkpoints / "4").is_dir(), workers, "step 4 was saved")
    workers[1].kill()
    killed = time.monotonic()
    workers[0].wait(timeout=HEARTBEAT + 60)
    elapsed = time.monotonic() - killed
  finally:
    kill_all(workers)
  log = (tmp_path / "worker0.log").read_text()
  # The survivor stops on its own, non-zero, and says why.
  assert workers[0].returncode != 0, log[-3000:]
  assert "another task died" in log or "unhealthy" in log, log[-3000:]
  assert elapsed < HEARTBEAT + 30
  assert not (checkpoints / str(STEPS)).exists()

  output = tmp_path / "final.npz"
  _, stderr = launch(*args, "--output", output, processes=2, devices=4)
  assert "resumed from step " in stderr
  assert_bit_identical(load(output), uninterrupted)


def test_killed_while_saving_leaves_the_previous_step_restorable(tmp_path, uninterrupted):
  checkpoints = tmp_path / "checkpoints"
  signal_file = tmp_path / "saving"
  args = ("--steps", STEPS, "--save-every", SAVE_EVERY, "--checkpoint-dir", checkpoints)
  workers = start_workers(*args, "--stall-commit-at", 8, processes=2, devices=4, logs=tmp_path)
  try:
    wait_for(signal_file.exists, workers, "process 0 wrote step 8's arrays")
    unfinished = pathlib.Path(signal_file.read_text())
    had_data = unfinished.is_dir() and any(unfinished.iterdir())
    workers[0].kill()
    workers[1].wait(timeout=HEARTBEAT + 60)
  finally:
    kill_all(workers)
  assert had_data, f"the temporary directory of step 8 was empty: {unfinished}"
  assert workers[1].returncode != 0
  assert not (checkpoints / "8").exists()
  with dl.TrainingCheckpointer(checkpoints) as saved:
    assert saved.all_steps() == [4]

  output = tmp_path / "final.npz"
  _, stderr = launch(*args, "--output", output, processes=2, devices=4)
  assert "resumed from step 4" in stderr
  assert_bit_identical(load(output), uninterrupted)
  assert sorted(p.name for p in checkpoints.iterdir()) == ["12", "4", "8"]
