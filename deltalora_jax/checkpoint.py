"""Checkpoints of a whole training state, with orbax-checkpoint.

A *training state* is any pytree of arrays: the variables (LoRA factors,
``D``, the base), the optimizer state (the velocity and the step counts
included), PRNG keys (typed keys from ``jax.random.key`` are stored as their
key data and come back typed), the data position, the step. Beside it a
checkpoint holds two JSON items: the *layout* (path, shape and dtype of every
leaf) and the *hyperparameters* (of the layers, see
:func:`layer_hyperparameters`, and of the optimizer, as the caller gives them).

Guarantees:

* **Atomic.** orbax writes a step into a temporary directory and renames it
  when complete; a process killed while saving leaves the previous steps
  readable, and the unfinished one is ignored (and cleaned up on the next start).
* **Checked before loading.** :meth:`TrainingCheckpointer.restore` compares the
  checkpoint's layout and hyperparameters with the caller's before reading any
  array, and refuses a mismatch with :class:`CheckpointMismatchError` naming
  each difference. Nothing of the caller's is modified: restoring returns new arrays.
* **Sharded.** Arrays are restored straight into the shardings of the ``like``
  tree (another mesh than at saving time is fine).
* **No pickle.** Arrays are read by tensorstore, metadata as JSON.
* **Sub-byte arrays** (the uint4 codes of an NF4 base, int4), which tensorstore
  cannot store, are written one value a byte (uint8, int8) and restored in
  their own dtype, bit for bit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from deltalora_jax import paths
from deltalora_jax.config import layer_configs

STATE = "state"
LAYOUT = "layout"
HYPERPARAMETERS = "hyperparameters"
_MAX_LISTED = 20


class CheckpointMismatchError(ValueError):
  """A checkpoint whose layout or hyperparameters differ from the caller's."""


#: Dtypes tensorstore cannot store, and the byte-wide dtype each is written as.
_WIDENED = {
  np.dtype(jax.numpy.uint4): np.dtype(np.uint8),
  np.dtype(jax.numpy.int4): np.dtype(np.int8),
}


def _widened(dtype: Any) -> np.dtype[Any] | None:
  """The byte-wide dtype a sub-byte ``dtype`` is written as, or None."""
  return _WIDENED.get(np.dtype(dtype))


def _is_key(leaf: Any) -> bool:
  dtype = getattr(leaf, "dtype", None)
  return dtype is not None and jax.numpy.issubdtype(dtype, jax.dtypes.prng_key)


def _json_value(value: Any, where: str) -> Any:
  """``value`` as plain JSON data (dicts, lists, str, float, int, bool, None)."""
  if value is None or isinstance(value, bool | int | float | str):
    return value
  if isinstance(value, np.generic) or (
    isinstance(value, np.ndarray | jax.Array) and not value.shape
  ):
    return np.asarray(value).item()
  if isinstance(value, Mapping):
    return {str(k): _json_value(v, f"{where}/{k}") for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [_json_value(v, f"{where}/{i}") for i, v in enumerate(value)]
  if isinstance(value, np.dtype) or (isinstance(value, type) and issubclass(value, np.generic)):
    return np.dtype(value).name
  raise TypeError(
    f"hyperparameters must hold only JSON data (numbers, str, bool, None, lists, dicts) "
    f"or dtypes, got {type(value).__name__} at {where!r}"
  )


def layer_hyperparameters(layers: Any) -> dict[str, dict[str, Any]]:
  """The JSON hyperparameters of each adapted layer, by name: each layer's config.

  Exactly ``{paths.name(path): config.to_json()}`` for the
  :func:`~deltalora_jax.config.layer_configs` of ``layers``: the one encoding
  of :class:`~deltalora_jax.config.LayerConfig` (kind, rank, alpha,
  ``delta_scaling``, ...; initializers are not saved). The dtypes of the
  parameters need no entry: the checkpoint's layout records each leaf's dtype.

  Args:
    layers: an NNX model, a Linen layers mapping ``{name: layer}`` (from
      :func:`deltalora_jax.adapted_layers`) or a :class:`~deltalora_jax.DeltaLoRAModel`.

  Returns:
    ``{'hidden': {'projection': {...}, 'rank': 2, ...}, ...}``; the root layer is ``''``.

  Example:
    >>> import deltalora_jax as dl
    >>> hp = layer_hyperparameters({(): dl.DeltaLoRADense(features=8, rank=2)})
    >>> hp[""]["rank"], hp[""]["delta_scaling"], hp[""]["projection"]["kind"]
    (2, 0.1, 'general_dense')
  """
  return {paths.name(path): config.to_json() for path, config in layer_configs(layers).items()}


def _layout(tree: Any) -> dict[str, dict[str, Any]]:
  """Path, shape, dtype (and PRNG implementation) of every leaf."""
  layout: dict[str, dict[str, Any]] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if isinstance(leaf, bool | int | float):
      leaf = jax.numpy.asarray(leaf)
    entry = {"shape": list(np.shape(leaf)), "dtype": str(leaf.dtype)}
    if _is_key(leaf) and isinstance(leaf, jax.Array):
      entry["key_impl"] = str(jax.random.key_impl(leaf))
    layout[paths.key_name(path)] = entry
  return layout


def _described(layout: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
  """``{path: 'shape (2, 3) float32'}``: what the restore check compares of a layout."""
  return {path: f"shape {tuple(entry['shape'])} {entry['dtype']}" for path, entry in layout.items()}


def _flat(tree: Mapping[str, Any]) -> dict[str, Any]:
  """Nested JSON objects as ``{'a/b': leaf}``; an empty object is a leaf ``{}``."""
  flat = traverse_util.flatten_dict(dict(tree), keep_empty_nodes=True)
  return {
    paths.name(path): {} if value is traverse_util.empty_node else value
    for path, value in flat.items()
  }


def _same(a: Any, b: Any) -> bool:
  """Equality of JSON values; numbers compare by value (NaN equals NaN), bools only to bools."""
  if isinstance(a, bool) or isinstance(b, bool):
    return type(a) is type(b) and a == b
  if isinstance(a, int | float) and isinstance(b, int | float):
    return a == b or (math.isnan(a) and math.isnan(b))
  return type(a) is type(b) and bool(a == b)


def _differences(
  saved: Mapping[str, Any],
  given: Mapping[str, Any],
  *,
  label: str,
  other: str,
  missing: str,
  show: Callable[[Any], str] = repr,
) -> list[str]:
  """One line for each path whose value differs between the checkpoint and the caller.

  Args:
    saved: the checkpoint's ``{path: value}``.
    given: the caller's ``{path: value}``.
    label: put before each path (``'hyperparameter '``).
    other: the caller's side in the lines (``'like'``).
    missing: said of a path the caller lacks (``'not in like'``).
    show: writes a value.
  """
  problems = []
  for path in sorted(set(saved) | set(given)):
    where = f"{label}{path!r}"
    if path not in given:
      problems.append(f"{where}: checkpoint {show(saved[path])}, {missing}")
    elif path not in saved:
      problems.append(f"{where}: {other} {show(given[path])}, not in the checkpoint")
    elif not _same(saved[path], given[path]):
      problems.append(f"{where}: checkpoint {show(saved[path])}, {other} {show(given[path])}")
  return problems


def _savable(path: tuple[Any, ...], leaf: Any) -> jax.Array | np.ndarray[Any, Any]:
  if _is_key(leaf):
    return jax.random.key_data(leaf)
  if isinstance(leaf, bool | int | float):
    return jax.numpy.asarray(leaf)
  if isinstance(leaf, np.ndarray | jax.Array):
    wide = _widened(leaf.dtype)
    return leaf if wide is None else leaf.astype(wide)
  raise TypeError(
    f"state must hold only arrays, PRNG keys and numbers, got {type(leaf).__name__} "
    f"at {paths.key_name(path)!r}"
  )


def _abstract(leaf: Any, default_sharding: jax.sharding.Sharding) -> jax.ShapeDtypeStruct:
  """The ``ShapeDtypeStruct`` an array of the saved state is restored into."""
  if isinstance(leaf, bool | int | float):
    leaf = jax.numpy.asarray(leaf)
  sharding = getattr(leaf, "sharding", None) or default_sharding
  if _is_key(leaf):
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
  dtype = _widened(leaf.dtype) or leaf.dtype
  return jax.ShapeDtypeStruct(np.shape(leaf), dtype, sharding=sharding)


def _mismatches(
  saved_layout: Mapping[str, Any],
  saved_hyperparameters: Mapping[str, Any],
  like: Any,
  hyperparameters: Mapping[str, Any] | None,
) -> list[str]:
  """What differs between a saved step and ``like`` (and ``hyperparameters``, if given)."""
  problems = _differences(
    _described(saved_layout),
    _described(_layout(like)),
    label="",
    other="like",
    missing="not in like",
    show=str,
  )
  if hyperparameters is not None:
    given = _json_value(dict(hyperparameters), "hyperparameters")
    problems += _differences(
      _flat(saved_hyperparameters),
      _flat(given),
      label="hyperparameter ",
      other="given",
      missing="not given",
    )
  return problems


def _wrapped_keys(like: Any, restored: Any, saved_layout: Mapping[str, Any]) -> Any:
  """``restored`` with each PRNG key of ``like`` wrapped back from its saved key data.

  A sub-byte leaf (written widened) comes back in its own dtype.
  """

  def back(path: tuple[Any, ...], leaf: Any, value: jax.Array) -> jax.Array:
    if _is_key(leaf):
      impl = saved_layout[paths.key_name(path)]["key_impl"]
      key: jax.Array = jax.random.wrap_key_data(value, impl=impl)  # jax leaves it untyped
      return key
    if _widened(getattr(leaf, "dtype", None)) is not None:
      narrow: jax.Array = value.astype(leaf.dtype)
      return narrow
    return value

  return jax.tree_util.tree_map_with_path(back, like, restored)


def _manager(
  directory: str | os.PathLike[str], max_to_keep: int | None, async_save: bool
) -> ocp.CheckpointManager:
  """orbax's manager of the three items of a step: the state, its layout, the hyperparameters."""
  if max_to_keep is not None and (
    isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1
  ):
    raise ValueError(f"max_to_keep must be a positive int or None, got {max_to_keep!r}")
  options = ocp.CheckpointManagerOptions(
    max_to_keep=max_to_keep,
    enable_async_checkpointing=async_save,
    cleanup_tmp_directories=True,
  )
  return ocp.CheckpointManager(
    directory,
    options=options,
    item_handlers={
      STATE: ocp.StandardCheckpointHandler(),
      LAYOUT: ocp.JsonCheckpointHandler(),
      HYPERPARAMETERS: ocp.JsonCheckpointHandler(),
    },
  )


class TrainingCheckpointer:
  """Saves and restores whole training states in a directory, one sub-directory per step.

  A thin layer over :class:`orbax.checkpoint.CheckpointManager` that adds the
  layout and hyperparameter checks and the PRNG key handling.

  Args:
    directory: where the steps are written (created if missing).
    max_to_keep: how many of the newest steps to keep; None keeps all.
    async_save: write in a background thread (orbax's default); :meth:`save`
      returns once the arrays are copied to host memory. Call
      :meth:`wait_until_finished` (or :meth:`close`) before relying on a step.

  Example:
    >>> import tempfile, jax, jax.numpy as jnp
    >>> state = {"delta": jnp.ones((2, 3)), "rng": jax.random.key(0), "step": 1}
    >>> with TrainingCheckpointer(tempfile.mkdtemp()) as checkpoints:
    ...   checkpoints.save(1, state, hyperparameters={"momentum": 0.9})
    ...   checkpoints.wait_until_finished()
    ...   restored = checkpoints.restore(state, hyperparameters={"momentum": 0.9})
    True
    >>> restored["delta"].shape, restored["rng"].dtype, int(restored["step"])
    ((2, 3), key<fry>, 1)
  """

  def __init__(
    self, directory: str | os.PathLike[str], *, max_to_keep: int | None = 3, async_save: bool = True
  ):
    self._manager = _manager(directory, max_to_keep, async_save)
    self.directory = directory

  def save(
    self, step: int, state: Any, *, hyperparameters: Mapping[str, Any] | None = None
  ) -> bool:
    """Saves ``state`` (and ``hyperparameters``) as ``step``.

    Args:
      step: the step number, a non-negative int not saved before.
      state: a pytree of arrays, PRNG keys and numbers.
      hyperparameters: JSON data (nested dicts), e.g.
        ``{"layers": layer_hyperparameters(layers), "optimizer": {...}}``.

    Returns:
      True (orbax's answer to whether the step was saved).
    """
    if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
      raise ValueError(f"step must be a non-negative int, got step={step!r}")
    hyperparameters = _json_value(dict(hyperparameters or {}), "hyperparameters")
    savable = jax.tree_util.tree_map_with_path(_savable, state)
    saved: bool = self._manager.save(
      int(step),
      args=ocp.args.Composite(
        **{
          STATE: ocp.args.StandardSave(savable),
          LAYOUT: ocp.args.JsonSave(_layout(state)),
          HYPERPARAMETERS: ocp.args.JsonSave(hyperparameters),
        }
      ),
    )
    return saved

  def _step(self, step: int | None) -> int:
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f"no finished checkpoint in {self.directory}")
      return steps[-1]
    if step not in steps:
      raise FileNotFoundError(
        f"step must be one of the finished steps {steps} in {self.directory}, got step={step}"
      )
    return step

  def _metadata(self, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
    items = self._manager.restore(
      step,
      args=ocp.args.Composite(
        **{LAYOUT: ocp.args.JsonRestore(), HYPERPARAMETERS: ocp.args.JsonRestore()}
      ),
    )
    return dict(items[LAYOUT]), dict(items[HYPERPARAMETERS])

  def hyperparameters(self, step: int | None = None) -> dict[str, Any]:
    """The hyperparameters saved with ``step`` (default: the latest step)."""
    return self._metadata(self._step(step))[1]

  def restore(
    self,
    like: Any,
    *,
    hyperparameters: Mapping[str, Any] | None = None,
    step: int | None = None,
  ) -> Any:
    """The state saved as ``step``, in the structure and shardings of ``like``.

    Args:
      like: a state of the same structure, shapes and dtypes (arrays or
        ``jax.ShapeDtypeStruct`` with a sharding); each array is restored
        with its leaf's sharding. It is not modified.
      hyperparameters: the caller's hyperparameters; when given they must
        equal the saved ones. None skips the check.
      step: the step to restore; None means the latest finished one.

    Returns:
      A new state with the structure of ``like``.

    Raises:
      FileNotFoundError: there is no finished checkpoint, or not ``step``.
      CheckpointMismatchError: a path, shape, dtype or hyperparameter differs;
        the message lists them. Raised before any array is read.
    """
    step = self._step(step)
    saved_layout, saved_hyperparameters = self._metadata(step)
    problems = _mismatches(saved_layout, saved_hyperparameters, like, hyperparameters)
    if problems:
      listed = "; ".join(problems[:_MAX_LISTED])
      more = f"; and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
      raise CheckpointMismatchError(
        f"checkpoint step {step} in {self.directory} does not match: {listed}{more}"
      )
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda leaf: _abstract(leaf, default), like)
    restored = self._manager.restore(
      step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(target)})
    )[STATE]
    return _wrapped_keys(like, restored, saved_layout)

  def latest_step(self) -> int | None:
    """The newest finished step, or None."""
    step: int | None = self._manager.latest_step()
    return step

  def all_steps(self) -> list[int]:
    """The finished steps, oldest first (an interrupted save is not listed)."""
    return sorted(self._manager.all_steps())

  def wait_until_finished(self) -> None:
    """Blocks until a background save has finished."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for a background save, then releases orbax's resources."""
    self._manager.close()

  def __enter__(self) -> TrainingCheckpointer:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()
