"""paper_delta_lora on every layer kind and on stacked layers, W updated in the kernel's layout.

Each layer of :class:`Kinds` is a :class:`deltalora_jax.DeltaLoRAGeneral` of one
kind; one compiled AdamW run of the whole model is shared by the tests. The
kernel's change is checked against a float64 NumPy reference written here, per
kind, with the kernel's axis order spelled out (``REFERENCE``), not against the
library's own ``lora_kernel``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import deltalora_jax as dl
from deltalora_jax import paper
from deltalora_jax.projections import Conv, Einsum, GeneralDense

BATCH, T, D, N, H, C, F, L, R = 2, 5, 6, 3, 4, 3, 4, 2, 2  # N != D: the einsum is not dense-like
LAMBDA, K_START, STEPS = 2.0, 2, 8
_rng = np.random.default_rng(0)


def _normal(*shape):
  return jnp.asarray(_rng.standard_normal(shape), jnp.float32)


# name: (projection, alpha, input, float64 reference of A B in the kernel's layout)
SPECS = {
  "attention_in": (GeneralDense(features=(N, H)), 1.0, _normal(BATCH, T, D), "dr,rnh->dnh"),
  "attention_out": (
    GeneralDense(features=(D,), axis=(-2, -1)),
    3.0,
    _normal(BATCH, T, N, H),
    "nhr,rd->nhd",
  ),
  "einsum_interleaved": (
    Einsum("btd,ndh->btnh", (N, D, H)),
    4.0,
    _normal(BATCH, T, D),
    "dr,rnh->ndh",
  ),
  "einsum_batch": (Einsum("bnd,ndh->bnh", (N, D, H)), 6.0, _normal(BATCH, N, D), "ndr,nrh->ndh"),
  "conv": (Conv(features=F, kernel_size=(3, 3)), 2.0, _normal(BATCH, 5, 5, C), "ijcr,rf->ijcf"),
  "stacked": (GeneralDense(features=(N, H)), 5.0, _normal(BATCH, T, D), "ldr,lrnh->ldnh"),
}
NAMES = list(SPECS)
INPUTS = {name: spec[2] for name, spec in SPECS.items()}
REFERENCE = {name: spec[3] for name, spec in SPECS.items()}


def _layer(name):
  projection, alpha, _, _ = SPECS[name]
  return dl.DeltaLoRAGeneral(projection, rank=R, alpha=alpha, use_delta=False)


# The layers mapping: each layer's scaling and projection (a stack's layer is one of its layers).
LAYERS = {(name,): _layer(name) for name in NAMES}


class Kinds(nn.Module):
  """One adapted layer per kind; ``stacked`` is ``L`` layers (``nn.vmap``: kernel ``[L, ...]``)."""

  @nn.compact
  def __call__(self, inputs):
    outputs = {}
    for name in NAMES:
      projection, alpha, _, _ = SPECS[name]
      cls = dl.DeltaLoRAGeneral
      if name == "stacked":
        cls = nn.vmap(
          cls,
          variable_axes={"params": 0},
          split_rngs={"params": True},
          in_axes=None,
          axis_size=L,
        )
      layer = cls(projection, rank=R, alpha=alpha, use_delta=False, name=name)
      outputs[name] = layer(inputs[name])
    return outputs


MODEL = Kinds()
SHAPES = jax.eval_shape(MODEL.init, jax.random.key(0), INPUTS)
TARGETS = jax.tree.map(lambda s: _normal(*s.shape), jax.eval_shape(MODEL.apply, SHAPES, INPUTS))


def _init(seed=1):
  """Random kernels, biases and factors (B too, so that A B and the rule are not trivial)."""
  rng = np.random.default_rng(seed)

  def draw(leaf):
    return jnp.asarray(0.5 * rng.standard_normal(leaf.shape), leaf.dtype)

  return jax.tree.map(draw, SHAPES)


def _loss(variables):
  outputs = MODEL.apply(variables, INPUTS)
  errors = jax.tree.map(lambda y, t: jnp.mean((y - t) ** 2), outputs, TARGETS)
  return sum(jax.tree.leaves(errors))


GRAD = jax.jit(jax.grad(_loss))


def _jit_update(tx):
  @jax.jit
  def update(grads, state, params):
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam
      return tx.update(grads, state, params)

  return update


def _arrays(variables, name, dtype=np.float64):
  p = variables["params"][name]
  return tuple(np.asarray(p[n], dtype) for n in ("kernel", "lora_a", "lora_b"))


def _product(variables, name):
  """``A B`` in the kernel's layout, by the hand-written float64 einsum."""
  _, a, b = _arrays(variables, name)
  return np.einsum(REFERENCE[name], a, b)


def _scaling(name):
  return SPECS[name][1] / R


EPS32 = float(np.finfo(np.float32).eps)


def assert_rule(w0, w1, p0, p1, s, ulps):
  """``W1 - W0 == lambda s (P1 - P0)`` to ``ulps`` float32 roundings of the magnitudes involved.

  The kernel is float32, so ``W1 - W0`` carries the roundings of ``W``; the
  factors are float32, so ``P1 - P0`` those of ``lambda s A B``. Returns the
  error in those units.
  """
  change, want = w1 - w0, LAMBDA * s * (p1 - p0)
  scale = np.abs(w1).max() + LAMBDA * s * max(np.abs(p0).max(), np.abs(p1).max())
  assert np.abs(want).max() > 1e3 * EPS32 * scale  # the rule moves W well above rounding
  np.testing.assert_allclose(change, want, rtol=0, atol=ulps * EPS32 * scale)
  return np.abs(change - want).max() / (EPS32 * scale)


@pytest.fixture(scope="module")
def trajectory():
  """AdamW on the factors, ``K = K_START``: the variables before each step ``t`` and at the end.

  W first moves at step ``t = K + 1`` (the paper's ``t > K``).
  """
  tx = dl.paper_delta_lora(1e-2, layers=LAYERS, lambda_=LAMBDA, start_step=K_START)
  update = _jit_update(tx)
  variables = _init()
  state = tx.init(variables)
  run = [variables]
  for _ in range(STEPS):
    updates, state = update(GRAD(variables), state, variables)
    variables = optax.apply_updates(variables, updates)
    run.append(variables)
  assert update._cache_size() == 1
  return run


def test_factor_shapes_are_the_documented_layouts():
  """The layouts that REFERENCE spells out: kernel, A, B of each layer."""
  shapes = jax.tree.map(jnp.shape, SHAPES["params"])
  want = {
    "attention_in": ((D, N, H), (D, R), (R, N, H)),
    "attention_out": ((N, H, D), (N, H, R), (R, D)),
    "einsum_interleaved": ((N, D, H), (D, R), (R, N, H)),
    "einsum_batch": ((N, D, H), (N, D, R), (N, R, H)),
    "conv": ((3, 3, C, F), (3, 3, C, R), (R, F)),
    "stacked": ((L, D, N, H), (L, D, R), (L, R, N, H)),
  }
  got = {name: tuple(shapes[name][n] for n in ("kernel", "lora_a", "lora_b")) for name in want}
  assert got == want


@pytest.mark.parametrize("name", NAMES)
def test_one_step_moves_the_kernel_by_the_product_change(trajectory, name):
  """The first step of the rule, t = K + 1: W_{t+1} - W_t = lambda s (A_{t+1} B_{t+1} - A_t B_t)."""
  before, after = trajectory[K_START + 1], trajectory[K_START + 2]
  w0, w1 = _arrays(before, name)[0], _arrays(after, name)[0]
  assert_rule(w0, w1, _product(before, name), _product(after, name), _scaling(name), ulps=4)


@pytest.mark.parametrize("name", NAMES)
def test_kernel_change_telescopes_and_waits_for_the_start_step(trajectory, name):
  """W_T - W_{K+1} = lambda s (A_T B_T - A_{K+1} B_{K+1}); W stays at the steps t <= K."""
  first, start, last = trajectory[0], trajectory[K_START + 1], trajectory[-1]
  w0, wk, wt = (_arrays(v, name)[0] for v in (first, start, last))
  np.testing.assert_array_equal(wk, w0)
  assert_rule(wk, wt, _product(start, name), _product(last, name), _scaling(name), ulps=STEPS)


def test_layer_whose_factors_do_not_fit_its_projection_is_named():
  variables = _init()
  params = dict(variables["params"])
  params["conv"] = {**params["conv"], "lora_b": jnp.zeros((R, F + 1))}
  with pytest.raises(ValueError, match=r"adapted layer 'params/conv': lora_b must have shape"):
    dl.paper_delta_lora(1e-2, layers=LAYERS).init({"params": params})


def test_factor_product_change_of_a_stacked_interleaved_einsum():
  """Stack axes before an einsum's own: one product per layer, in the kernel's [n, d, h]."""
  kind = SPECS["einsum_interleaved"][0]
  a, ua = (_normal(L, D, R) for _ in range(2))
  b, ub = (_normal(L, R, N, H) for _ in range(2))
  got = paper.factor_product_change(a, b, ua, ub, projection=kind, stack=1)
  a, b, ua, ub = (np.asarray(x, np.float64) for x in (a, b, ua, ub))
  product = lambda a, b: np.einsum("ldr,lrnh->lndh", a, b)  # noqa: E731
  np.testing.assert_allclose(got, product(a + ua, b + ub) - product(a, b), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------
# NNX: an nnx.MultiHeadAttention adapted by adapt_nnx.
# --------------------------------------------------------------------------


def test_nnx_attention_adapted_by_adapt_nnx():
  """Query/key/value kernels [d, heads, head_dim], output [heads, head_dim, d]: both identities."""
  attention = nnx.MultiHeadAttention(
    num_heads=N, in_features=D, qkv_features=N * H, decode=False, rngs=nnx.Rngs(0)
  )
  dl.adapt_nnx(attention, rank=R, alpha=3.0, use_delta=False, rngs=nnx.Rngs(1))
  layers = dl.adapted_layers(attention)
  assert sorted(layers) == ["key", "out", "query", "value"]
  rng = np.random.default_rng(2)
  for layer in layers.values():
    layer.lora_b[...] = jnp.asarray(0.1 * rng.standard_normal(layer.lora_b.shape), jnp.float32)
  reference = {"out": "nhr,rd->nhd", "query": "dr,rnh->dnh", "key": "dr,rnh->dnh"}
  reference["value"] = reference["key"]
  tx = dl.paper_delta_lora(lora_optimizer=optax.sgd(0.01), layers=attention, start_step=0)
  optimizer = nnx.Optimizer(attention, tx, wrt=nnx.Param)
  x, y = INPUTS["attention_in"], TARGETS["attention_out"]

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)

  def snapshot():
    return {
      name: tuple(np.asarray(v[...], np.float64) for v in (m.kernel, m.lora_a, m.lora_b))
      for name, m in layers.items()
    }

  def product(arrays, name):
    return np.einsum(reference[name], arrays[name][1], arrays[name][2])

  run = [snapshot()]
  for _ in range(4):
    step(attention, optimizer)
    run.append(snapshot())
  for name in reference:
    s = layers[name].scaling
    np.testing.assert_array_equal(run[1][name][0], run[0][name][0])  # t = 0 <= K = 0
    for start, end, ulps in ((1, 2, 4), (1, 4, 6)):  # step t = 1, then the telescoped sum
      w0, w1 = run[start][name][0], run[end][name][0]
      assert_rule(w0, w1, product(run[start], name), product(run[end], name), s, ulps)
