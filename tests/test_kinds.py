"""Every layer kind, in both front ends, on models built only from Flax's own layers.

The cases: a block on ``nn.MultiHeadDotProductAttention`` / ``nnx.MultiHeadAttention``
(their projections are ``DenseGeneral`` / ``LinearGeneral``), a stack of ``Einsum``
layers (a permuted equation ``btd,ndh->btnh``, one with a batch axis and one with
``...``), ``Conv`` in 1-D, 2-D and 3-D (strides, ``'SAME'``, ``'CIRCULAR'`` and
explicit padding pairs, kernel dilation), and ``DenseGeneral`` / ``LinearGeneral``
contracting non-trailing axes, one layer a user's subclass.

For each case, computed once by a module fixture: the output right after
adapting, the output and gradients of the adapted model after giving ``A``,
``B``, ``D`` nonzero values, those of the merged model (``dl.merge``), the output
after export and attach on a fresh copy of the base, and a few training steps.
The adapted layers evaluate ``'factored'`` (separate products), so that the
comparison with the merged model checks each kind's factor layout against its
merged kernel. A second fixture builds each case with a bfloat16 pretrained
kernel and compares ``evaluation='merged'`` with ``'factored'``; a guard test keeps
the defect of 948381e (a merged kernel formed in bfloat16) from coming back.

For speed, weights and inputs are drawn by NumPy (``jax.random`` compiles per shape
when eager) and every computation runs in a few shared compiled functions.
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util
from flax.core import unfreeze

import deltalora_jax as dl
from deltalora_jax.nnx import DeltaParam

BF16 = jnp.bfloat16
EPS_BF16 = float(jnp.finfo(BF16).eps)  # 2**-7
RANK = 2
DELTA_SCALING = 0.5
STEPS = 4
ADAPTER = ("lora_a", "lora_b", "delta")
TRAINABLE = nnx.Any(nnx.LoRAParam, DeltaParam)

# ------------------------------------------------------------------ the models

# Conv layers per number of spatial axes: (in, out, options).
CONVS = {
  1: (
    (3, 4, dict(kernel_size=(3,), strides=(2,), padding="CIRCULAR")),
    (4, 3, dict(kernel_size=(2,), kernel_dilation=(2,), padding=((1, 2),))),
  ),
  2: (
    (2, 4, dict(kernel_size=(3, 3), strides=(2, 1), padding=((1, 0), (2, 1)))),
    (4, 3, dict(kernel_size=(2, 3), kernel_dilation=(2, 1), padding="CIRCULAR")),
  ),
  3: (
    (2, 3, dict(kernel_size=(2, 3, 2), strides=(1, 2, 1), kernel_dilation=(1, 1, 2))),
    (3, 2, dict(kernel_size=(2, 1, 2), padding=((0, 1), (1, 0), (1, 1)), kernel_dilation=2)),
  ),
}


class LinenAttention(nn.Module):
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return x + nn.MultiHeadDotProductAttention(2, param_dtype=self.param_dtype, name="attn")(x)


class LinenEinsum(nn.Module):
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    einsum = functools.partial(nn.Einsum, param_dtype=self.param_dtype)
    h = einsum((3, 6, 3), "btd,ndh->btnh", name="heads")(x)  # permuted: d contracted
    h = einsum((3, 3, 4), "btnh,nhf->btnf", name="per_head")(jnp.tanh(h))  # n: a batch axis
    h = jnp.reshape(h, (*h.shape[:-2], 12))
    return einsum((12, 5), "...d,df->...f", name="out")(h)


class LinenConv(nn.Module):
  dims: int
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i, (_, out, options) in enumerate(CONVS[self.dims]):
      x = nn.Conv(out, **options, param_dtype=self.param_dtype, name=f"conv{i}")(x)
      x = jnp.tanh(x)
    return x


class MyDenseGeneral(nn.DenseGeneral):
  """A user's subclass of a supported layer: adapted like its parent."""


class LinenDenseGeneral(nn.Module):
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):  # [b, 5, 4]
    h = nn.DenseGeneral((3, 2), axis=1, param_dtype=self.param_dtype, name="mix")(x)
    h = jnp.tanh(h)  # [b, 4, 3, 2]
    return MyDenseGeneral(5, axis=(1, 3), param_dtype=self.param_dtype, name="sub")(h)


class NNXAttention(nnx.Module):
  def __init__(self, rngs, param_dtype=jnp.float32):
    self.attn = nnx.MultiHeadAttention(2, 8, decode=False, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x):
    return x + self.attn(x)


class NNXEinsum(nnx.Module):
  def __init__(self, rngs, param_dtype=jnp.float32):
    einsum = functools.partial(nnx.Einsum, param_dtype=param_dtype, rngs=rngs)
    self.heads = einsum("btd,ndh->btnh", (3, 6, 3), (3, 3))
    self.per_head = einsum("btnh,nhf->btnf", (3, 3, 4), (3, 4))
    self.out = einsum("...d,df->...f", (12, 5), (5,))

  def __call__(self, x):
    h = self.per_head(jnp.tanh(self.heads(x)))
    return self.out(jnp.reshape(h, (*h.shape[:-2], 12)))


class NNXConv(nnx.Module):
  def __init__(self, rngs, dims, param_dtype=jnp.float32):
    self.convs = nnx.List(
      [nnx.Conv(i, o, **kw, param_dtype=param_dtype, rngs=rngs) for i, o, kw in CONVS[dims]]
    )

  def __call__(self, x):
    for conv in self.convs:
      x = jnp.tanh(conv(x))
    return x


class MyLinearGeneral(nnx.LinearGeneral):
  """A user's subclass of a supported layer: adapted like its parent."""


class NNXLinearGeneral(nnx.Module):
  def __init__(self, rngs, param_dtype=jnp.float32):
    self.mix = nnx.LinearGeneral(5, (3, 2), axis=1, param_dtype=param_dtype, rngs=rngs)
    self.sub = MyLinearGeneral((4, 2), 5, axis=(1, 3), param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x):
    return self.sub(jnp.tanh(self.mix(x)))


def _normal(seed, shape, scale=1.0, dtype=jnp.float32) -> jax.Array:
  """Normal numbers drawn by NumPy: no compilation per shape, as ``jax.random`` has eagerly."""
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), dtype)


def _numpy_init(key, shape, dtype=jnp.float32):
  """``lora_a_init``: the seed's N(0, 1/r), drawn by NumPy (``A`` is redrawn by the tests)."""
  del key
  return _normal(0, shape, 1.0 / np.sqrt(shape[-1]), dtype)


def _pretrained(shape, dtype, seed, scale=0.3) -> jax.Array:
  """A "pretrained" weight: kernels ~ N(0, scale^2), biases ~ N(0, 0.1^2) (not zero)."""
  return _normal(seed, shape, scale if len(shape) > 1 else 0.1, dtype)


def _linen_pretrained(model, x, scale=0.3):
  """``model``'s variables, drawn by NumPy on its abstract ones (no initializer runs)."""
  leaves, treedef = jax.tree.flatten(jax.eval_shape(model.init, jax.random.key(0), x))
  return jax.tree.unflatten(
    treedef, [_pretrained(a.shape, a.dtype, i, scale) for i, a in enumerate(leaves)]
  )


def _nnx_pretrained(build, scale=0.3):
  """The NNX model ``build()`` with weights drawn by NumPy (no initializer runs)."""
  model = nnx.eval_shape(build)
  state = nnx.state(model)
  for i, (_, variable) in enumerate(sorted(nnx.to_flat_state(state), key=str)):
    abstract = variable.get_value()
    if isinstance(variable, nnx.Param):
      variable.set_value(_pretrained(abstract.shape, abstract.dtype, i, scale))
    elif jnp.issubdtype(abstract.dtype, jax.dtypes.prng_key):
      variable.set_value(jax.random.key(i))
    else:
      variable.set_value(jnp.zeros(abstract.shape, abstract.dtype))
  nnx.update(model, state)
  return model


@dataclasses.dataclass(frozen=True)
class Case:
  """One model: its front end, input shape, targets and the optimizer of its factors."""

  kind: str
  front: str
  shape: tuple[int, ...]
  build: Any  # Linen: (param_dtype) -> module; NNX: (rngs, param_dtype) -> module
  targets: str | None = None
  factors: str = "sgd"

  @property
  def id(self) -> str:
    return f"{self.front}-{self.kind}"

  def base(self, param_dtype=jnp.float32, x=None):
    """The base with its "pretrained" weights: Linen ``(module, variables)``, or an NNX model.

    The weights are drawn by NumPy on the abstract model (no initializer runs), the same
    on every call: a fresh copy of the same base.
    """
    if self.front == "linen":
      model = self.build(param_dtype)
      return model, _linen_pretrained(model, x)
    return _nnx_pretrained(lambda: self.build(nnx.Rngs(0), param_dtype)), None


def _conv(front, dims):
  if front == "linen":
    return lambda dtype: LinenConv(dims, dtype)
  return lambda rngs, dtype: NNXConv(rngs, dims, dtype)


CASES = [
  Case("attention", "linen", (2, 3, 8), LinenAttention, targets=r"attn/.*"),
  Case("attention", "nnx", (2, 3, 8), NNXAttention, targets=r"attn/.*", factors="adam"),
  Case("einsum", "linen", (2, 3, 6), LinenEinsum, factors="adam"),
  Case("einsum", "nnx", (2, 3, 6), NNXEinsum),
  Case("conv1d", "linen", (2, 9, 3), _conv("linen", 1)),
  Case("conv1d", "nnx", (2, 9, 3), _conv("nnx", 1), factors="adam"),
  Case("conv2d", "linen", (2, 6, 5, 2), _conv("linen", 2), factors="adam"),
  Case("conv2d", "nnx", (2, 6, 5, 2), _conv("nnx", 2)),
  Case("conv3d", "linen", (1, 4, 5, 4, 2), _conv("linen", 3)),
  Case("conv3d", "nnx", (1, 4, 5, 4, 2), _conv("nnx", 3), factors="adam"),
  Case("dense_general", "linen", (2, 5, 4), LinenDenseGeneral, factors="adam"),
  Case("dense_general", "nnx", (2, 5, 4), NNXLinearGeneral),
]

# ------------------------------------------------- one functional view of both


def _linen_call(model, data, x):
  return model.apply(data[0], x)


def _nnx_call(graphdef, data, x):
  return nnx.merge(graphdef, *data)(x)


def _split(case, model, variables=None):
  """``(call, static, data)``: ``call(static, data, x)`` runs the model, ``data[0]`` its params."""
  if case.front == "linen":
    return _linen_call, model, (variables,)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return _nnx_call, graphdef, (params, rest)


def _mse(y, target):
  return jnp.mean(jnp.square(y.astype(jnp.float32) - target))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward_and_grad(call, static, data, x, target):
  """The output, and the gradient of the MSE with respect to the parameters ``data[0]``."""

  def loss(params):
    y = call(static, (params, *data[1:]), x)
    return _mse(y, target), y

  (_, y), grads = jax.value_and_grad(loss, has_aux=True)(data[0])
  return y, grads


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _merged_and_factored(call, merged, factored, data, inputs):
  """The outputs of the same adapter evaluated ``'merged'`` and ``'factored'``, per input."""
  return [(call(merged, data, x), call(factored, data, x)) for x in inputs]


def _flat(case, tree) -> dict[tuple, jax.Array]:
  """``{(*layer path, name): array}`` without Linen's collection names or NNX's Variables."""
  if case.front == "linen":
    return {k[1:]: v for k, v in traverse_util.flatten_dict(unfreeze(tree)).items()}
  return traverse_util.flatten_dict(nnx.to_pure_dict(tree))


def _adapt(case, model, variables, x, **options):
  """``(adapted, variables)``; NNX adapts ``model`` in place (variables None)."""
  options = dict(rank=RANK, delta_scaling=DELTA_SCALING, lora_a_init=_numpy_init, **options)
  if case.front == "linen":
    key = jax.random.key(1)
    adapted, variables, _ = dl.adapt_linen(
      model, variables, x, targets=case.targets, key=key, **options
    )
    return adapted, variables
  dl.adapt_nnx(model, case.targets, rngs=nnx.Rngs(1), **options)
  return model, None


def _adapter_paths(case, adapted) -> list[tuple]:
  """The adapted layers' paths as the flat params' keys spell them (NNX: list items are ints)."""
  if case.front == "linen":
    return [tuple(name.split("/")) for name in sorted(adapted.layers)]
  return [
    tuple(int(k) if k.isdigit() else k for k in name.split("/"))
    for name in dl.adapted_layers(adapted)
  ]


def _with_adapter(case, adapted, variables, make):
  """The adapter's ``A``, ``B``, ``D`` replaced by ``make(i, name, array)``.

  Linen: returns new variables; NNX: updates ``adapted`` in place and returns None.
  """
  if case.front == "linen":
    flat = traverse_util.flatten_dict(unfreeze(variables))
  else:
    state = nnx.state(adapted, TRAINABLE)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
  keys = [k for k in sorted(flat, key=str) if k[-1] in ADAPTER]
  flat.update({k: make(i, k[-1], flat[k]) for i, k in enumerate(keys)})
  if case.front == "linen":
    return traverse_util.unflatten_dict(flat)
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat))
  nnx.update(adapted, state)
  return None


def _normal_adapter(seed, scales):
  """``make`` for :func:`_with_adapter`: normal ``A``, ``B``, ``D`` with ``scales[name]``."""

  def make(i, name, array):
    return _normal((seed, i), array.shape, scales[name], array.dtype)

  return make


def _zero_adapter(i, name, array):
  """``make`` for :func:`_with_adapter`: ``B = D = 0``, so the adapter adds nothing."""
  return array if name == "lora_a" else np.zeros(array.shape, array.dtype)


def _max(a) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64))))


def _shapes_and_dtypes(tree):
  return jax.tree.map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype)), tree)


def _structure(case, model, variables=None):
  """What ``dl.merge`` must give back: module classes and ``{path: (shape, dtype)}``."""
  if case.front == "linen":
    return type(model), _shapes_and_dtypes(unfreeze(variables))
  modules = [(path, type(m)) for path, m in nnx.iter_modules(model)]
  return modules, _shapes_and_dtypes(nnx.to_pure_dict(nnx.state(model)))


def _merge(case, adapted, variables):
  """``dl.merge`` of the adapted model, as ``(model, variables)`` (one compiled function)."""
  if case.front == "nnx":
    return nnx.jit(dl.merge)(adapted), None
  return adapted.model, jax.jit(lambda v: dl.merge(v, adapted))(variables)


def _train(case, adapted, variables, x, target):
  """``STEPS`` steps of ``dl.delta_lora``: ``(trained variables or None, losses)``.

  The gradients come from :func:`_forward_and_grad`, already compiled for this model;
  only the optimizer's update is compiled here. NNX steps with ``nnx.Optimizer``.
  The losses are those before each step and after the last.
  """
  lora = {"sgd": optax.sgd(0.2), "adam": optax.adam(0.02)}[case.factors]
  tx = dl.delta_lora(0.2, momentum=0.5, layers=adapted, lora_optimizer=lora)
  # optax.adam's bias correction raises a Python float to its int32 count, which
  # strict promotion refuses: the optimizer runs in the standard mode, as a user's does.
  standard = functools.partial(jax.numpy_dtype_promotion, "standard")
  if case.front == "linen":
    opt_state = jax.jit(tx.init)(variables)

    @jax.jit
    def update(grads, opt_state, variables):
      updates, opt_state = tx.update(grads, opt_state, variables)
      return optax.apply_updates(variables, updates), opt_state

  else:
    optimizer = nnx.Optimizer(adapted, tx, wrt=TRAINABLE)

    @nnx.jit
    def nnx_update(model, optimizer, grads):
      optimizer.update(model, grads)

  losses = []
  for _ in range(STEPS + 1):
    y, grads = _forward_and_grad(*_split(case, adapted, variables), x, target)
    losses.append(np.mean(np.square(np.asarray(y, np.float64) - np.asarray(target))))
    with standard():
      if case.front == "linen":
        variables, opt_state = update(grads, opt_state, variables)
      else:
        nnx_update(adapted, optimizer, nnx.filter_state(grads, TRAINABLE))
  return variables, np.asarray(losses)


# ------------------------------------------------------------- float32 cases


@pytest.fixture(scope="module", params=CASES, ids=lambda case: case.id)
def run(request):
  """Everything the float32 tests of one case compare, computed once."""
  case = request.param
  x = _normal(10, case.shape)
  model, base = case.base(x=x)
  call, static, data = _split(case, model, base)
  target = _normal(11, jax.eval_shape(lambda d: call(static, d, x), data).shape)
  out = dict(case=case, model=model, structure=_structure(case, model, base))
  out["y_base"], _ = _forward_and_grad(call, static, data, x, target)
  out["base_params"] = _flat(case, data[0])

  if case.front == "nnx":
    model, _ = case.base()  # adapt_nnx works in place: keep the base apart
  adapted, variables = _adapt(case, model, base, x, evaluation="factored")
  out["paths"] = _adapter_paths(case, adapted)
  out["y_init"], _ = _forward_and_grad(*_split(case, adapted, variables), x, target)

  # A, B, D nonzero: the adapted model, its merge, its export
  scales = {"lora_a": 0.5, "lora_b": 0.3, "delta": 0.3}
  variables = _with_adapter(case, adapted, variables, _normal_adapter(2, scales))
  call, static, data = _split(case, adapted, variables)
  out["y_adapted"], grads = _forward_and_grad(call, static, data, x, target)
  out["grads"] = _flat(case, grads)
  out["params"] = _flat(case, data[0])
  if case.front == "linen":
    out["counts"] = dl.parameter_counts(variables, adapted.layers)
  else:
    out["counts"] = dl.parameter_counts(adapted)

  merged = _merge(case, adapted, variables)
  out["unloaded"] = _structure(case, *merged)
  out["unloaded_model"] = merged[0]
  merged_data = _split(case, *merged)
  out["y_merged"], merged_grads = _forward_and_grad(*merged_data, x, target)
  out["merged_grads"] = _flat(case, merged_grads)

  fresh, fresh_variables = case.base(x=x)
  if case.front == "linen":
    adapter = dl.export_adapter(variables, adapted)
    again, restored, _ = dl.attach_adapter_linen(fresh, fresh_variables, adapter)
    out["y_attached"], _ = _forward_and_grad(*_split(case, again, restored), x, target)
  else:
    dl.attach_adapter_nnx(fresh, dl.export_adapter(adapted))
    out["y_attached"], _ = _forward_and_grad(*_split(case, fresh), x, target)

  trained, out["losses"] = _train(case, adapted, variables, x, target)
  trained = _flat(case, trained if case.front == "linen" else nnx.state(adapted, nnx.Param))
  out["trained"] = trained
  return out


def test_output_right_after_adapting_equals_the_pretrained_models(run):
  np.testing.assert_allclose(run["y_init"], run["y_base"], rtol=0, atol=1e-6)


def test_gradient_of_delta_is_delta_scaling_times_the_merged_kernels(run):
  assert run["paths"]
  for path in run["paths"]:
    want = DELTA_SCALING * run["merged_grads"][(*path, "kernel")]
    got = run["grads"][(*path, "delta")]
    assert got.shape == want.shape == run["params"][(*path, "kernel")].shape
    assert _max(want) > 0, path
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * _max(want), err_msg=str(path))


def test_merged_model_equals_the_adapted_one(run):
  y, y_merged = run["y_adapted"], run["y_merged"]
  # the adapter moved the output well away from the pretrained model's ...
  assert _max(y - run["y_base"]) > 0.05 * _max(y)
  # ... and the merged kernels W + s A B + ds D give the same output
  np.testing.assert_allclose(y_merged, y, rtol=1e-5, atol=1e-5 * _max(y))


def test_merge_gives_back_the_original_layers(run):
  classes, shapes = run["structure"]
  assert run["unloaded"] == (classes, shapes)  # classes, variable names, shapes and dtypes
  if run["case"].front == "linen":
    assert run["unloaded_model"] is run["model"]  # the model definition, unmodified


def test_export_and_attach_on_a_fresh_base_reproduce_the_outputs(run):
  np.testing.assert_array_equal(run["y_attached"], run["y_adapted"])


def test_training_lowers_the_loss_and_keeps_the_base_bit_for_bit(run):
  losses = run["losses"]
  assert np.all(np.diff(losses) < 0) and losses[-1] < 0.95 * losses[0], losses
  trained, before = run["trained"], run["params"]
  for key, value in run["base_params"].items():
    np.testing.assert_array_equal(trained[key], value, err_msg=str(key))
  for key, value in before.items():
    if key[-1] in ("lora_b", "delta"):  # the delta rule and the factors' optimizer moved them
      assert not np.array_equal(trained[key], value), key


def test_parameter_counts_per_kind(run):
  counts = run["counts"]
  for path in run["paths"]:
    sizes = [run["params"][(*path, k)].size for k in ("lora_a", "lora_b")]
    assert counts["/".join(map(str, path))] == sum(sizes) + run["params"][(*path, "kernel")].size
  assert counts["total"] == sum(v for k, v in counts.items() if k != "total")


# ------------------------------------------------------- bfloat16 pretrained kernels


@pytest.fixture(scope="module", params=CASES, ids=lambda case: case.id)
def mixed(request):
  """One case with a bfloat16 base, adapted twice: ``'merged'`` and ``'factored'``.

  ``A`` is of the size of its initialisation, ``B`` and ``D`` about 1e-3: the adapter
  moves each kernel entry by less than the bfloat16 spacing of the kernel (about 1e-3
  at 0.3), so a merged kernel formed or stored in bfloat16 would lose most of it.
  Flax's own layers promote a float32 input with a bfloat16 kernel by JAX's standard
  rules, which the strict mode of the tests refuses: these run in the standard mode.
  """
  case = request.param
  x = _normal(20, case.shape)
  inputs = (x, x.astype(BF16))
  scales = {"lora_a": 0.7, "lora_b": 1e-3, "delta": 1e-3}
  out = dict(case=case)
  with jax.numpy_dtype_promotion("standard"):
    models, variables = {}, None
    for evaluation in ("merged", "factored"):
      model, base = case.base(BF16, x=x)
      out["base"] = _structure(case, model, base)[1]  # before NNX adapts it in place
      adapted, variables = _adapt(case, model, base, x, evaluation=evaluation)
      variables = _with_adapter(case, adapted, variables, _normal_adapter(3, scales))
      models[evaluation] = _split(case, adapted, variables)
    call, merged, data = models["merged"]
    factored = models["factored"][1]
    out["outputs"] = _merged_and_factored(call, merged, factored, data, inputs)
    zero = _with_adapter(case, adapted, variables, _zero_adapter)
    call, _, zero_data = _split(case, adapted, zero)
    out["base_outputs"] = _merged_and_factored(call, merged, factored, zero_data, inputs)
    out["params"] = _flat(case, data[0])
    if case.front == "linen":
      unloaded = jax.eval_shape(lambda v: dl.merge(v, adapted), variables)
      out["unloaded"] = _shapes_and_dtypes(unfreeze(unloaded))
    else:
      out["unloaded"] = _structure(case, nnx.eval_shape(dl.merge, adapted))[1]
  return out


def test_bf16_kernel_merged_and_factored_agree_relative_to_the_adapter(mixed):
  (merged32, factored32), (merged16, factored16) = mixed["outputs"]  # float32, bfloat16 x
  y_base = mixed["base_outputs"][0][1]
  # A float32 input computes in float32, as the base layer would: the adapter's
  # contribution is kept to its own rounding, merged or factored.
  assert merged32.dtype == factored32.dtype == jnp.float32
  term = np.asarray(factored32, np.float64) - np.asarray(y_base, np.float64)
  # the adapter's contribution is small against the output, yet far above float32 noise
  assert 1e3 * 2**-23 * _max(y_base) < _max(term) < 0.05 * _max(y_base)
  np.testing.assert_allclose(merged32, factored32, rtol=0, atol=EPS_BF16 * _max(term))
  # A bfloat16 input computes in bfloat16, as the base layer would (float32 factors and
  # D cast to it): the two evaluations agree to the bfloat16 rounding of the output.
  assert merged16.dtype == factored16.dtype == BF16
  np.testing.assert_allclose(
    np.asarray(merged16, np.float32),
    np.asarray(factored16, np.float32),
    rtol=0,
    atol=2 * EPS_BF16 * _max(y_base),  # measured: at most 1.2 of it
  )


def test_bf16_kernel_adapter_is_float32_and_merge_keeps_the_base_dtype(mixed):
  params = mixed["params"]
  names = {key[-1] for key in params}
  assert set(ADAPTER) <= names
  for key, value in params.items():
    want = jnp.float32 if key[-1] in ADAPTER else BF16
    assert value.dtype == want, key
  assert mixed["unloaded"] == mixed["base"]  # same names, shapes and bfloat16 dtype


class LinenDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(256, param_dtype=BF16, name="dense")(x)


class NNXDense(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(256, 256, param_dtype=BF16, rngs=rngs)

  def __call__(self, x):
    return self.dense(x)


@pytest.mark.parametrize("front", ["linen", "nnx"])
def test_bf16_dense_merged_kernel_keeps_a_small_delta(front):
  """Guard of the defect fixed in 7dc30b8, on the simplest path: a bfloat16 dense kernel.

  With ``D`` about 1e-3 and ``delta_scaling=0.1``, ``ds D`` is below half the bfloat16
  spacing of most kernel entries. A merged kernel formed in bfloat16 (as before) drops
  it for about two thirds of the entries, and the ``'merged'`` output then differs from
  the ``'factored'`` one by about the whole delta term.
  """
  x = _normal(30, (8, 256))
  delta = _normal(31, (256, 256), 1e-3)
  outputs, arrays = {}, None
  for evaluation in ("merged", "factored"):
    options = dict(rank=4, delta_scaling=0.1, evaluation=evaluation)
    if front == "nnx":
      model = _nnx_pretrained(lambda: NNXDense(nnx.Rngs(0)), scale=1 / 16)
      dl.adapt_nnx(model, **options, rngs=nnx.Rngs(1))
      layer = model.dense
      layer.delta[...] = delta.astype(layer.delta.dtype)
      outputs[evaluation] = model(x)
      arrays = [getattr(layer, name)[...] for name in ("kernel", "lora_a", "lora_b", "delta")]
    else:
      model = LinenDense()
      base = _linen_pretrained(model, x.astype(BF16), scale=1 / 16)
      adapted, variables, _ = dl.adapt_linen(
        model, base, x.astype(BF16), **options, key=jax.random.key(1)
      )
      variables["delta"]["dense"]["delta"] = delta.astype(
        variables["delta"]["dense"]["delta"].dtype
      )
      outputs[evaluation] = adapted.apply(variables, x)
      params = variables["params"]["dense"]
      arrays = [
        params["kernel"],
        params["lora_a"],
        params["lora_b"],
        variables["delta"]["dense"]["delta"],
      ]
  kernel, lora_a, lora_b, stored_delta = arrays
  assert kernel.dtype == BF16 and stored_delta.dtype == jnp.float32
  term = 0.1 * (np.asarray(x, np.float64) @ np.asarray(delta, np.float64))
  np.testing.assert_allclose(
    outputs["merged"], outputs["factored"], rtol=0, atol=EPS_BF16 * _max(term)
  )
  merged = dl.merged_kernel(kernel, lora_a, lora_b, stored_delta, scaling=1.0, delta_scaling=0.1)
  kept = np.asarray(merged, np.float64) - np.asarray(kernel, np.float64)  # B = 0: only ds D
  assert merged.dtype == jnp.float32
  # entries of D rounded away: about 2/3 in bfloat16; in float32 only the odd tiny one
  assert np.mean(kept == 0) < 1e-3
  want = 0.1 * np.asarray(delta, np.float64)
  np.testing.assert_allclose(kept, want, rtol=1e-3, atol=1e-3 * _max(want))


# ------------------------------------------------------------------- errors


class LinenOthers(nn.Module):
  @nn.compact
  def __call__(self, x):  # [b, 9, 4]
    x = nn.Conv(4, (3,), feature_group_count=2, name="grouped")(x)
    x = nn.LayerNorm(name="norm")(x)
    return nn.MultiHeadDotProductAttention(2, name="attn")(x)


class NNXOthers(nnx.Module):
  def __init__(self, rngs):
    self.grouped = nnx.Conv(4, 4, (3,), feature_group_count=2, rngs=rngs)
    self.norm = nnx.LayerNorm(4, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(2, 4, decode=False, rngs=rngs)

  def __call__(self, x):
    return self.attn(self.norm(self.grouped(x)))


KINDS_LISTED = r"not a layer that can be adapted \(Dense, DenseGeneral/LinearGeneral, Einsum, Conv"


def _adapt_targets(model, x, targets):
  """``adapt_linen`` (on abstract variables: nothing runs) or ``adapt_nnx``, at rank 1."""
  if isinstance(model, nnx.Module):
    return dl.adapt_nnx(model, targets, rank=1, rngs=nnx.Rngs(1))
  base = jax.eval_shape(model.init, jax.random.key(0), x)
  return dl.adapt_linen(model, base, x, targets=targets, rank=1, key=jax.random.key(1))[:2]


@pytest.mark.parametrize("front", ["linen", "nnx"])
def test_errors_name_the_layer_its_type_and_the_supported_kinds(front):
  x = jnp.ones((2, 9, 4))
  model = LinenOthers() if front == "linen" else NNXOthers(nnx.Rngs(0))
  attention = "MultiHeadDotProductAttention" if front == "linen" else "MultiHeadAttention"
  with pytest.raises(TypeError, match=r"'grouped' is a Conv \(.*feature_group_count=2"):
    _adapt_targets(model, x, ["grouped"])
  with pytest.raises(TypeError, match=rf"'norm' is a LayerNorm, {KINDS_LISTED}"):
    _adapt_targets(model, x, ["norm"])
  with pytest.raises(TypeError, match=rf"'attn' is a {attention}, {KINDS_LISTED}"):
    _adapt_targets(model, x, ["attn"])
  if front == "nnx":  # nothing was replaced by the failed calls
    assert type(model.grouped) is nnx.Conv
    with pytest.raises(ValueError, match="has no adapted layer"):
      dl.adapted_layers(model)


@pytest.mark.parametrize("front", ["linen", "nnx"])
def test_a_subclass_of_a_supported_layer_is_adapted(front):
  x = jnp.ones((2, 5, 4))
  if front == "linen":
    adapted, _ = _adapt_targets(LinenDenseGeneral(), x, ["sub"])
    assert sorted(adapted.layers) == ["sub"]
  else:
    model = NNXLinearGeneral(nnx.Rngs(0))
    _adapt_targets(model, x, ["sub"])
    assert type(model.sub) is dl.DeltaLoRALinearGeneral
    assert type(nnx.eval_shape(dl.merge, model).sub) is MyLinearGeneral
