"""Checkpoints: exact resume in a fresh process, a kill while saving, refusals, sharded restore."""

import pathlib
import pickle
import signal
import subprocess
import sys
import time

import _docs
import _training as training
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deltalora_jax as dl
from deltalora_jax import paths
from deltalora_jax.config import LayerConfig, layer_configs

SCRIPT = pathlib.Path(training.__file__)
HP = training.HYPERPARAMETERS


@pytest.fixture(scope="module")
def runs():
  """The state after 10 steps and after 20 steps of one uninterrupted run."""
  state10 = training.train(training.init_state(), 10)
  return state10, training.train(state10, 10)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A directory holding the fresh state as step 0, and that state."""
  directory = tmp_path_factory.mktemp("saved")
  state = training.init_state()
  with dl.TrainingCheckpointer(directory) as checkpoints:
    checkpoints.save(0, state, hyperparameters=HP)
  return directory, state


@pytest.fixture(scope="module")
def resumed_then_killed(tmp_path_factory, runs):
  """Step 10 saved here; a fresh process resumes it, saves step 20, is killed saving step 21."""
  directory = tmp_path_factory.mktemp("resume")
  with dl.TrainingCheckpointer(directory) as checkpoints:
    checkpoints.save(10, runs[0], hyperparameters=HP)
  signal_file = pathlib.Path(f"{directory}.saving")
  child = subprocess.Popen(
    [sys.executable, str(SCRIPT), "resume", str(directory)],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    deadline = time.monotonic() + 300
    while not signal_file.exists() and child.poll() is None and time.monotonic() < deadline:
      time.sleep(0.1)
    unfinished = pathlib.Path(signal_file.read_text()) if signal_file.exists() else None
    unfinished_had_data = unfinished is not None and any(unfinished.iterdir())
  finally:
    child.kill()
    _, stderr = child.communicate(timeout=60)
  assert unfinished_had_data, f"the child never reached the commit of step 21: {stderr[-3000:]}"
  assert child.returncode == -signal.SIGKILL, stderr[-3000:]
  return directory


def test_resume_in_a_fresh_process_is_bit_identical(resumed_then_killed, runs):
  state10, state20 = runs
  with dl.TrainingCheckpointer(resumed_then_killed) as checkpoints:
    resumed = checkpoints.restore(state20, hyperparameters=HP, step=20)
  training.assert_bit_identical(resumed, state20)
  assert int(resumed["data_position"]) == 20
  velocity = dl.velocity(resumed["opt_state"])["delta"]["hidden"]["delta"]
  assert float(jnp.max(jnp.abs(velocity))) > 0
  before = state10["variables"]["delta"]["hidden"]["delta"]
  assert float(jnp.max(jnp.abs(resumed["variables"]["delta"]["hidden"]["delta"] - before))) > 0


def test_a_process_killed_while_saving_leaves_the_previous_step_readable(resumed_then_killed, runs):
  directory = resumed_then_killed
  assert (directory / "20").is_dir() and not (directory / "21").exists()
  with dl.TrainingCheckpointer(directory) as checkpoints:
    assert checkpoints.all_steps() == [10, 20]
    restored = checkpoints.restore(jax.eval_shape(training.init_state), hyperparameters=HP)
    training.assert_bit_identical(restored, runs[1])
    state21 = training.train(restored, 1)
    checkpoints.save(21, state21, hyperparameters=HP)
    checkpoints.wait_until_finished()
    assert checkpoints.all_steps() == [10, 20, 21]
    training.assert_bit_identical(checkpoints.restore(state21, hyperparameters=HP), state21)
  assert not list(directory.glob("*tmp*"))


def _replace(state, path, value):
  """A copy of ``state`` (nested dicts) with ``value`` at ``path``; None removes the leaf."""
  state = dict(state)
  key, *rest = path
  if rest:
    state[key] = _replace(state[key], rest, value)
  elif value is None:
    del state[key]
  else:
    state[key] = value
  return state


LORA_A = ("variables", "params", "hidden", "lora_a")
DELTA = ("variables", "delta", "out", "delta")
BIAS = ("variables", "params", "out", "bias")


@pytest.mark.parametrize(
  ("path", "value", "match"),
  [
    (
      LORA_A,
      jnp.zeros((16, 3)),
      r"'variables/params/hidden/lora_a': checkpoint "
      r"shape \(16, 4\) float32, like shape \(16, 3\) float32",
    ),
    (
      DELTA,
      jnp.zeros((32, 8), jnp.bfloat16),
      r"'variables/delta/out/delta': checkpoint "
      r"shape \(32, 8\) float32, like shape \(32, 8\) bfloat16",
    ),
    (
      BIAS,
      None,
      r"'variables/params/out/bias': checkpoint shape \(8,\) float32, not in like",
    ),
    (("extra",), jnp.zeros(2), r"'extra': like shape \(2,\) float32, not in the checkpoint"),
  ],
)
def test_a_mismatched_state_is_refused_and_left_as_it_was(saved, path, value, match):
  directory, state = saved
  like = _replace(state, path, value)
  before = training.numpy_leaves(like)
  with (
    dl.TrainingCheckpointer(directory) as checkpoints,
    pytest.raises(dl.CheckpointMismatchError, match=match),
  ):
    checkpoints.restore(like, hyperparameters=HP)
  for got, want in zip(training.numpy_leaves(like), before, strict=True):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
  ("path", "value", "match"),
  [
    (
      ("layers", "hidden", "delta_scaling"),
      0.2,
      r"hyperparameter 'layers/hidden/delta_scaling': checkpoint 0.1, given 0.2",
    ),
    (("layers", "out", "rank"), 3, r"'layers/out/rank': checkpoint 2, given 3"),
    (("layers", "out", "freeze_base"), False, r"'layers/out/freeze_base': checkpoint True"),
    (("optimizer", "momentum"), None, r"'optimizer/momentum': checkpoint 0.9, not given"),
    (("optimizer", "nesterov"), True, r"'optimizer/nesterov': given True, not in the"),
  ],
)
def test_mismatched_hyperparameters_are_refused(saved, path, value, match):
  directory, state = saved
  with dl.TrainingCheckpointer(directory) as checkpoints:
    with pytest.raises(dl.CheckpointMismatchError, match=match):
      checkpoints.restore(state, hyperparameters=_replace(HP, path, value))
    assert checkpoints.hyperparameters() == HP


def test_missing_checkpoints_and_bad_arguments(saved, tmp_path):
  directory, state = saved
  with dl.TrainingCheckpointer(tmp_path / "empty") as checkpoints:
    assert checkpoints.latest_step() is None
    with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
      checkpoints.restore(state)
    with pytest.raises(ValueError, match="step must be a non-negative int, got step=-1"):
      checkpoints.save(-1, state)
    with pytest.raises(TypeError, match="got str at 'name'"):
      checkpoints.save(1, {"name": "x"})
    with pytest.raises(TypeError, match="hyperparameters must hold only JSON data"):
      checkpoints.save(1, {"a": jnp.zeros(2)}, hyperparameters={"schedule": print})
  with (
    dl.TrainingCheckpointer(directory) as checkpoints,
    pytest.raises(FileNotFoundError, match=r"one of the finished steps \[0\].*step=7"),
  ):
    checkpoints.restore(state, step=7)
  with pytest.raises(ValueError, match="max_to_keep must be a positive int"):
    dl.TrainingCheckpointer(tmp_path / "other", max_to_keep=0)


def test_restore_reads_no_pickle(saved, monkeypatch):
  directory, state = saved

  def forbidden(*args, **kwargs):
    raise AssertionError("pickle used on a load path")

  for name in ("load", "loads", "Unpickler"):
    monkeypatch.setattr(pickle, name, forbidden)
  with dl.TrainingCheckpointer(directory) as checkpoints:
    restored = checkpoints.restore(jax.eval_shape(training.init_state), hyperparameters=HP)
  training.assert_bit_identical(restored, state)


def test_sharded_save_and_restore_into_another_mesh(tmp_path):
  from test_sharding import state_shardings

  state = training.train(training.init_state(), 1)
  saving = state_shardings(dl.make_mesh(fsdp=8))
  with dl.TrainingCheckpointer(tmp_path) as checkpoints:
    checkpoints.save(1, jax.device_put(state, saving), hyperparameters=HP)
    checkpoints.wait_until_finished()
    restoring = state_shardings(dl.make_mesh(data=4, fsdp=2))
    like = jax.tree.map(
      lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
      jax.eval_shape(training.init_state),
      restoring,
    )
    restored = checkpoints.restore(like, hyperparameters=HP)
  training.assert_bit_identical(restored, state)
  is_sharding = lambda s: isinstance(s, jax.sharding.Sharding)  # noqa: E731
  got = jax.tree.map(lambda a: a.sharding, restored)
  assert jax.tree.leaves(got, is_leaf=is_sharding) == jax.tree.leaves(
    restoring, is_leaf=is_sharding
  )
  delta = restored["variables"]["delta"]["hidden"]["delta"]
  assert {s.data.shape for s in delta.addressable_shards} == {(training.IN // 2, training.HIDDEN)}


def test_layer_hyperparameters_are_each_layers_config_json():
  layers = dl.adapted_layers(training.MODEL, training.SAMPLE)
  hyperparameters = dl.layer_hyperparameters(layers)
  assert HP["layers"] == hyperparameters
  assert sorted(hyperparameters) == ["hidden", "out"]
  assert hyperparameters["out"] == {
    "projection": {"kind": "general_dense", "features": [8], "axis": [-1]},
    "rank": 2,
    "alpha": None,
    "delta_scaling": 0.5,
    "freeze_base": True,
    "use_bias": True,
    "use_delta": True,
    "evaluation": "auto",
    "adapter_dtype": None,
  }
  for path, config in layer_configs(layers).items():
    assert LayerConfig.from_json(hyperparameters[paths.name(path)]) == config


def test_a_layer_config_differing_in_the_checkpoint_is_named(saved):
  directory, state = saved
  layers = dict(HP["layers"])
  layers["out"] = {**layers["out"], "projection": {}, "adapter_dtype": "bfloat16"}
  with (
    dl.TrainingCheckpointer(directory) as checkpoints,
    pytest.raises(dl.CheckpointMismatchError) as raised,
  ):
    checkpoints.restore(state, hyperparameters={**HP, "layers": layers})
  message = str(raised.value)
  assert "hyperparameter 'layers/out/adapter_dtype': checkpoint None, given 'bfloat16'" in message
  assert "hyperparameter 'layers/out/projection': given {}, not in the checkpoint" in message
  assert "hyperparameter 'layers/out/projection/kind': checkpoint 'general_dense', not given" in (
    message
  )


def test_guide_sharding_and_checkpoint_sections_run(capsys):
  (sharding,) = _docs.code_blocks("sharding.md")
  (checkpoints,) = _docs.code_blocks("checkpoints.md")  # continues the sharding example
  namespace = {}
  exec(compile(sharding, "sharding.md", "exec"), namespace)
  assert np.isfinite(float(namespace["loss"]))
  delta = namespace["variables"]["delta"]
  total = sum(leaf.nbytes for leaf in jax.tree.leaves(delta))
  assert set(dl.bytes_per_device(delta).values()) == {total // jax.device_count()}
  assert str(dl.bytes_per_device(delta)) in capsys.readouterr().out
  exec(compile(checkpoints, "checkpoints.md", "exec"), namespace)
  restored = namespace["state"]
  training.assert_bit_identical(restored["variables"], namespace["variables"])
  assert restored["variables"]["delta"]["up"]["delta"].sharding == delta["up"]["delta"].sharding
  assert int(restored["data_position"]) == 5
