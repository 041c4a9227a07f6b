"""Load pretrained weights into an adapted model: by name, checked, all or nothing.

:func:`load_base` copies the parameters of a pretrained model (the plain one,
written with ``nn.Dense`` / ``nnx.Linear``) into an adapted model, or into
any model that shares part of its structure: a pretrained encoder under a new
head, a checkpoint whose names differ. Parameters are matched by *name*, the
path joined with ``'/'`` (``'encoder/layer_0/query/kernel'``, see
:mod:`deltalora_jax.paths`), optionally renamed by a ``mapping``; every shape
and dtype is checked before anything is written.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util

from deltalora_jax import optim, paths
from deltalora_jax.config import layer_configs
from deltalora_jax.nnx import DeltaParam

#: ``{regex: replacement or None}`` or ``base name -> target name or None``.
NameMapping = Mapping[str, str | None] | Callable[[str], str | None]
#: The NNX variables :func:`load_base` loads: parameters, not the adapter's.
BASE_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.Any(nnx.LoRAParam, DeltaParam)))
#: ``base names -> {base name: target name or None}``: a ``mapping`` made one function.
_Renamer = Callable[[list[str]], dict[str, str | None]]


def load_base(
  target: Any,
  base: Any,
  *,
  strict: bool = True,
  mapping: NameMapping | None = None,
  layers: Any = None,
) -> tuple[Any, dict[str, list[str]]]:
  r"""Loads pretrained parameters into an adapted model, by name, checking each one.

  The *base parameters* of ``target`` are all its parameters but the
  adapter's: the LoRA factors ``lora_a``/``lora_b`` and ``D`` keep their
  values. Each parameter of ``base`` is renamed by ``mapping`` and copied onto
  the target's parameter of that name.

  ``mapping`` is either

  * a dict ``{regex: replacement}``: the first pattern (in the dict's order)
    that matches the whole base name (``re.fullmatch``, as ``targets`` of
    :func:`~deltalora_jax.adapt_linen`) renames it to
    ``match.expand(replacement)`` (``\1`` and ``\g<name>`` refer to groups),
    or skips it when the replacement is None; a name no pattern matches keeps
    its name. ``{r"(.*)": r"encoder/\1"}`` puts a pretrained encoder under the
    ``encoder`` of a model with a new head; ``{r"pooler/.*": None}`` leaves the
    checkpoint's pooler out. A pattern that renames no base name (none
    matches, or earlier patterns took them all) is an error;
  * a callable ``base name -> target name``, or None to skip that parameter.

  Args:
    target: the model to load into. Linen: its variables ``{'params': ...,
      'delta': ...}`` (a new tree is returned; the argument is left as it
      was). NNX: the model itself, adapted or not, updated in place and
      returned; its ``nnx.Param`` variables but ``nnx.LoRAParam`` and
      :class:`~deltalora_jax.DeltaParam` are its base parameters.
    base: the pretrained parameters. Linen: variables ``{'params': ...}`` as
      ``model.init`` returns them (a bare params dict is refused: wrap it as
      ``{'params': params}``); names are those inside ``'params'``. NNX: an
      ``nnx.Module`` (its base parameters), or an ``nnx.State`` or nested
      dict of arrays (every leaf is a given parameter).
    strict: True: every base parameter of ``target`` must be loaded and every
      parameter of ``base`` used (names the mapping sends to None excepted),
      else ``ValueError``. False: load what matches and report the rest (a
      new head keeps its initial values).
    mapping: renames base names to target names, as above; None keeps them.
    layers: Linen only, optional: the layers mapping of
      :func:`~deltalora_jax.adapted_layers` or the ``DeltaLoRAModel``. Given,
      only the ``lora_a``/``lora_b`` of these layers count as the adapter's;
      None: every parameter named ``lora_a`` or ``lora_b`` does.

  Returns:
    ``(target, report)``: the loaded Linen variables or the NNX model, and
    ``{'loaded': [...], 'skipped': [...], 'missing': [...]}``, sorted lists of
    names: the target names loaded, the base names not used, and the target's
    base parameters not loaded. The loaded arrays are copies placed as the
    target's arrays were (their sharding), so donating the result leaves
    ``base`` intact.

  Raises:
    ValueError: when a shape or dtype differs (always: nothing is cast), two
      base names map to one target name, a mapping pattern is bad or matches
      nothing, or ``strict`` and a name is missing or unknown. Nothing is
      changed then: everything is checked before an NNX model is written to.
    TypeError: for a ``target``, ``base``, ``mapping`` or ``layers`` of the
      wrong kind.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from deltalora_jax.linen import DeltaLoRADense
    >>> class Classifier(nn.Module):  # a pretrained encoder and a new head
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return nn.Dense(2, name="head")(DeltaLoRADense(3, rank=2, name="encoder")(x))
    >>> x = jnp.ones((1, 4))
    >>> encoder = nn.Dense(3).init(jax.random.key(1), x)  # {'params': {'kernel', 'bias'}}
    >>> variables = Classifier().init(jax.random.key(0), x)
    >>> variables, report = load_base(
    ...   variables, encoder, strict=False, mapping={r"(.*)": r"encoder/\1"})
    >>> report["loaded"], report["missing"]
    (['encoder/bias', 'encoder/kernel'], ['head/bias', 'head/kernel'])
    >>> bool(jnp.all(variables["params"]["encoder"]["kernel"] == encoder["params"]["kernel"]))
    True
  """
  if not isinstance(strict, bool):
    raise TypeError(f"strict must be True or False, got {strict!r}")
  rename = _renamer(mapping)
  if isinstance(target, nnx.Module):
    if layers is not None:
      raise TypeError(
        "layers is for Linen variables only (an NNX model knows its adapters by their "
        f"Variable types), got {type(layers).__name__}"
      )
    return _load_nnx(target, base, strict, rename)
  if isinstance(target, Mapping) and isinstance(target.get("params"), Mapping):
    return _load_linen(target, base, strict, rename, layers)
  raise TypeError(
    "target must be an NNX model or the Linen variables {'params': ...} of an adapted "
    f"model, got {_kind(target)}"
  )


def _kind(value: Any) -> str:
  if isinstance(value, Mapping):
    return f"a {type(value).__name__} with keys {sorted(map(str, value))}"
  return type(value).__name__


def _renamer(mapping: object) -> _Renamer:
  """``names -> {base name: target name or None}`` for the given ``mapping``."""
  if mapping is None:
    return lambda names: {n: n for n in names}
  if isinstance(mapping, Mapping):
    return _regex_renamer(mapping)
  if callable(mapping):

    def call(names: list[str]) -> dict[str, str | None]:
      renamed: dict[str, str | None] = {}
      for n in names:
        new = mapping(n)
        if new is not None and not isinstance(new, str):
          raise TypeError(f"mapping({n!r}) must return a target name (str) or None, got {new!r}")
        renamed[n] = new
      return renamed

    return call
  raise TypeError(
    "mapping must be None, a dict {regex: target name or None} or a callable "
    f"base name -> target name or None, got {type(mapping).__name__}"
  )


def _regex_renamer(mapping: Mapping[object, object]) -> _Renamer:
  rules: list[tuple[str, re.Pattern[str], str | None]] = []
  for pattern, replacement in mapping.items():
    if not isinstance(pattern, str) or not (replacement is None or isinstance(replacement, str)):
      raise TypeError(
        "mapping must map regex strings to target names (str) or None, got "
        f"{pattern!r}: {replacement!r}"
      )
    try:
      rules.append((pattern, re.compile(pattern), replacement))
    except re.error as error:
      raise ValueError(f"mapping pattern {pattern!r} is not a valid regex: {error}") from None

  def rename(names: list[str]) -> dict[str, str | None]:
    renamed: dict[str, str | None] = {}
    used: set[str] = set()
    for n in names:
      renamed[n] = n
      for pattern, regex, replacement in rules:
        match = regex.fullmatch(n)
        if match is None:
          continue
        used.add(pattern)
        try:
          renamed[n] = None if replacement is None else match.expand(replacement)
        except (re.error, IndexError) as error:
          raise ValueError(
            f"mapping[{pattern!r}] = {replacement!r} cannot rename {n!r}: {error}"
          ) from None
        break
    unused = [pattern for pattern, _, _ in rules if pattern not in used]
    if unused:
      raise ValueError(
        f"mapping patterns {unused} rename no base parameter (each must match a whole "
        f"name, re.fullmatch, that no earlier pattern took); the base names are "
        f"{sorted(names)[:8]}" + (" ..." if len(names) > 8 else "")
      )
    return renamed

  return rename


def _leaves(tree: Any) -> dict[str, Any]:
  """``{name: leaf}`` of a nested dict or ``nnx.State``."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {paths.key_name(path): leaf for path, leaf in flat}


def _plan(
  wanted: dict[str, Any], given: dict[str, Any], strict: bool, rename: _Renamer
) -> tuple[dict[str, Any], dict[str, list[str]]]:
  """Checks everything; ``({target name: new array}, report)``. Writes nothing."""
  renamed = rename(list(given))
  loaded: dict[str, str] = {}  # target name -> base name
  unknown: list[str] = []
  dropped: list[str] = []
  errors: list[str] = []
  for base_name, value in given.items():
    name = renamed[base_name]
    if name is None:
      dropped.append(base_name)
      continue
    if name not in wanted:
      unknown.append(base_name)
      continue
    if name in loaded:
      raise ValueError(
        f"base parameters {loaded[name]!r} and {base_name!r} both map to the target's {name!r}; "
        "a mapping must send each base name to a different target name (or None to skip)"
      )
    loaded[name] = base_name
    old = wanted[name]
    shape, dtype = jnp.shape(value), jnp.result_type(value)
    if shape != jnp.shape(old) or dtype != jnp.result_type(old):
      via = "" if name == base_name else f" (from base {base_name!r})"
      errors.append(
        f"{name!r}{via} must have shape {jnp.shape(old)} and dtype {jnp.result_type(old)} "
        f"(the target's), got shape {shape} and dtype {dtype}"
      )
  if errors:
    raise ValueError("base does not fit the target, nothing was loaded: " + "; ".join(errors))
  missing = sorted(set(wanted) - set(loaded))
  if strict and (missing or unknown):
    raise ValueError(
      "load_base(strict=True) needs every base parameter of the target loaded and every "
      f"parameter of base used; missing from base: {missing}, unknown in the target: "
      f"{sorted(unknown)}. Pass strict=False to load what matches, or a mapping to rename"
    )
  report = {"loaded": sorted(loaded), "skipped": sorted(unknown + dropped), "missing": missing}
  return {name: _copy_like(given[b], wanted[name]) for name, b in loaded.items()}, report


def _copy_like(value: Any, old: Any) -> jax.Array:
  """A copy of ``value``, on the devices (the sharding) of ``old`` when it has one."""
  new = jnp.array(value, copy=True)
  concrete = not isinstance(old, jax.core.Tracer) and not isinstance(new, jax.core.Tracer)
  if isinstance(old, jax.Array) and concrete and new.sharding != old.sharding:
    new = jax.device_put(new, old.sharding)
  return new


def _load_linen(
  target: Mapping[str, Any], base: Any, strict: bool, rename: _Renamer, layers: Any
) -> tuple[dict[str, Any], dict[str, list[str]]]:
  if not (isinstance(base, Mapping) and isinstance(base.get("params"), Mapping)):
    raise TypeError(
      "base must be the Linen variables {'params': ...} of the pretrained model (wrap a "
      f"params dict as {{'params': params}}), got {_kind(base)}"
    )
  others = sorted(set(map(str, base)) - {"params"})
  if others:
    raise ValueError(
      f"base may hold only the 'params' collection, got also {others}: load_base loads "
      "parameters; copy other collections (batch statistics) yourself"
    )
  params = traverse_util.flatten_dict(dict(target["params"]), keep_empty_nodes=True)
  adapted = None if layers is None else set(layer_configs(layers))

  def is_adapter(key: paths.Path) -> bool:
    return key[-1] in optim.LORA_NAMES and (adapted is None or key[:-1] in adapted)

  keys = {
    paths.name(k): k
    for k, v in params.items()
    if v is not traverse_util.empty_node and not is_adapter(paths.as_path(k))
  }
  new, report = _plan(
    {n: params[k] for n, k in keys.items()}, _leaves(base["params"]), strict, rename
  )
  for name, value in new.items():
    params[keys[name]] = value
  result = dict(target)
  result["params"] = traverse_util.unflatten_dict(params)
  return result, report


def _load_nnx(
  model: nnx.Module, base: Any, strict: bool, rename: _Renamer
) -> tuple[nnx.Module, dict[str, list[str]]]:
  if isinstance(base, nnx.Module):
    given = _leaves(nnx.state(base, BASE_PARAMS))
  elif isinstance(base, nnx.State | Mapping):
    given = _leaves(base)
  else:
    raise TypeError(
      "base must be an nnx.Module, an nnx.State or a nested dict of arrays for an NNX "
      f"target, got {type(base).__name__}"
    )
  variables = {paths.name(p): v for p, v in nnx.to_flat_state(nnx.state(model, BASE_PARAMS))}
  new, report = _plan({n: v.get_value() for n, v in variables.items()}, given, strict, rename)
  for name, value in new.items():  # everything was checked: assign all
    variables[name].set_value(value)
  return model, report
