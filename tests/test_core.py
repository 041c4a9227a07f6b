"""The pure math against closed forms, in float64.

The forward is ``y = x W + b + s (x A) B + ds (x D)`` (W, D ``[in, out]``, A ``[in, r]``,
B ``[r, out]``); with ``g = dL/dy`` summed over the leading axes, its gradients are
``dD = ds x^T g``, ``dA = s x^T (g B^T)``, ``dB = s (x A)^T g`` and
``dx = g W^T + s g B^T A^T + ds g D^T``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deltalora_jax import core

IN, OUT, R = 5, 4, 2
S, DS = 1.5, 0.3


def _arrays(dtype, seed=0):
  rng = np.random.default_rng(seed)
  shapes = {
    "x": (2, 3, IN),  # two leading axes
    "kernel": (IN, OUT),
    "bias": (OUT,),
    "lora_a": (IN, R),
    "lora_b": (R, OUT),
    "delta": (IN, OUT),
    "g": (2, 3, OUT),
  }
  return {k: jnp.asarray(rng.standard_normal(s), dtype) for k, s in shapes.items()}


def _closed_form_gradients(a):
  """The gradients of sum(y * g) (the module docstring's formulas), summed over leading axes."""
  x = np.asarray(a["x"]).reshape(-1, IN)
  g = np.asarray(a["g"]).reshape(-1, OUT)
  w, la, lb, d = (np.asarray(a[k]) for k in ("kernel", "lora_a", "lora_b", "delta"))
  return {
    "x": (g @ w.T + S * g @ lb.T @ la.T + DS * g @ d.T).reshape(a["x"].shape),
    "kernel": x.T @ g,
    "bias": g.sum(0),
    "lora_a": S * x.T @ (g @ lb.T),
    "lora_b": S * (x @ la).T @ g,
    "delta": DS * x.T @ g,
  }


NAMES = ("x", "kernel", "bias", "lora_a", "lora_b", "delta")


def _gradients(a, *, freeze_base, evaluation):
  def loss(*args):
    kw = dict(zip(NAMES, args, strict=True))
    y = core.delta_lora_apply(
      **kw, scaling=S, delta_scaling=DS, freeze_base=freeze_base, evaluation=evaluation
    )
    return jnp.sum(y * a["g"])

  grads = jax.grad(loss, argnums=tuple(range(len(NAMES))))(*(a[k] for k in NAMES))
  return dict(zip(NAMES, grads, strict=True))


@pytest.mark.parametrize("evaluation", ["merged", "factored", "auto"])
@pytest.mark.parametrize("freeze_base", [True, False])
def test_gradients_equal_closed_forms_float64(evaluation, freeze_base):
  with jax.enable_x64(True):
    a = _arrays(jnp.float64)
    # B = 0 would hide the dA and dx terms: every factor is random here.
    got = _gradients(a, freeze_base=freeze_base, evaluation=evaluation)
    want = _closed_form_gradients(a)
    if freeze_base:
      want["kernel"] = np.zeros((IN, OUT))
      want["bias"] = np.zeros(OUT)
    for name in NAMES:
      np.testing.assert_allclose(got[name], want[name], rtol=1e-12, atol=1e-12, err_msg=name)


def test_forward_equals_reference_formula_float64():
  with jax.enable_x64(True):
    a = _arrays(jnp.float64, seed=1)
    x, w, b, la, lb, d = (
      np.asarray(a[k]) for k in ("x", "kernel", "bias", "lora_a", "lora_b", "delta")
    )
    want = x @ w + b + S * (x @ la) @ lb + DS * (x @ d)
    for evaluation in ("merged", "factored"):
      got = core.delta_lora_apply(
        *(a[k] for k in NAMES), scaling=S, delta_scaling=DS, evaluation=evaluation
      )
      np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_merged_kernel_golden_values():
  w = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  a = jnp.array([[1.0], [2.0]])
  b = jnp.array([[3.0, -1.0]])
  d = jnp.array([[0.0, 10.0], [-10.0, 0.0]])
  # s A B = 0.5 * [[3, -1], [6, -2]]; ds D = 0.1 * D
  want = np.array([[2.5, 0.5], [2.0, 0.0]])
  got = core.merged_kernel(w, a, b, d, scaling=0.5, delta_scaling=0.1)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  got_no_delta = core.merged_kernel(w, a, b, None, scaling=0.5, delta_scaling=0.1)
  np.testing.assert_allclose(got_no_delta, [[2.5, -0.5], [3.0, 0.0]], rtol=1e-6)


def test_lora_product_norm_equals_norm_of_product():
  a = _arrays(jnp.float32, seed=2)
  want = np.linalg.norm(S * np.asarray(a["lora_a"]) @ np.asarray(a["lora_b"]))
  np.testing.assert_allclose(core.lora_product_norm(a["lora_a"], a["lora_b"], S), want, rtol=1e-5)


def test_lora_a_init_has_variance_one_over_rank():
  a = core.lora_a_init(4)(jax.random.key(0), (4000, 4))
  np.testing.assert_allclose(np.var(np.asarray(a)), 0.25, rtol=0.05)


@pytest.mark.parametrize(
  ("rows", "has_delta", "base_trainable", "want"),
  [
    (512, True, False, "merged"),
    (2, True, False, "factored"),  # rows <= rank: two thin products are cheaper
    (512, False, False, "factored"),  # plain LoRA: no full weight gradient at all
    (512, False, True, "merged"),
  ],
)
def test_choose_evaluation(rows, has_delta, base_trainable, want):
  got = core.choose_evaluation("auto", rows, 4, has_delta=has_delta, base_trainable=base_trainable)
  assert got == want
  assert core.choose_evaluation("factored", rows, 4, has_delta=True, base_trainable=True) == (
    "factored"
  )


def test_wrong_input_features_is_an_error_naming_shapes():
  a = _arrays(jnp.float32)
  with pytest.raises(ValueError, match=r"x must have 5 input features.*x.shape=\(2, 3\)"):
    core.delta_lora_apply(jnp.ones((2, 3)), *(a[k] for k in NAMES[1:]), scaling=S, delta_scaling=DS)


@pytest.mark.parametrize(
  ("call", "error", "match"),
  [
    (lambda: core.check_rank(0), ValueError, r"0 < rank, got rank=0"),
    (lambda: core.check_rank(5, 4, 8), ValueError, r"<= min\(in, out\) = 4, got rank=5"),
    (lambda: core.check_rank(2.0), TypeError, r"rank must be a positive int, got rank=2.0"),
    (lambda: core.check_rank(True), TypeError, r"rank=True"),
    (lambda: core.check_delta_scaling(0.0), ValueError, r"delta_scaling=0.0"),
    (lambda: core.check_delta_scaling(-1), ValueError, r"> 0, got delta_scaling=-1"),
    (lambda: core.check_delta_scaling(float("inf")), ValueError, r"delta_scaling=inf"),
    (lambda: core.check_delta_scaling(float("nan")), ValueError, r"delta_scaling=nan"),
    (lambda: core.check_delta_scaling("0.1"), TypeError, r"delta_scaling='0.1'"),
    (lambda: core.check_momentum(1.0), ValueError, r"0 <= momentum < 1, got momentum=1.0"),
    (lambda: core.check_momentum(-0.1), ValueError, r"momentum=-0.1"),
    (lambda: core.check_momentum(float("nan")), ValueError, r"momentum=nan"),
    (lambda: core.check_momentum(np.ones(2) * 0.5), ValueError, r"momentum must be a scalar"),
    (lambda: core.check_learning_rate(float("nan")), ValueError, r"learning_rate=nan"),
    (lambda: core.lora_scaling(float("nan"), 4), ValueError, r"alpha=nan"),
    (lambda: core.lora_scaling(0, 4), ValueError, r"alpha must be a finite number > 0 or None"),
    (lambda: core.lora_scaling(-1.0, 4), ValueError, r"> 0 or None \(None: alpha = rank\)"),
    (lambda: core.check_learning_rate(-0.1), ValueError, r">= 0, or a schedule, got learning_rate"),
    (lambda: core.check_evaluation("fast"), ValueError, r"evaluation='fast'"),
  ],
)
def test_bad_hyperparameters_raise_naming_argument_and_value(call, error, match):
  with pytest.raises(error, match=match):
    call()


def test_valid_edge_values_pass():
  assert core.check_momentum(0.0) == 0.0
  assert core.check_rank(4, 4, 4) == 4
  assert core.check_learning_rate(optax_schedule := (lambda step: 0.1)) is optax_schedule
  assert core.lora_scaling(None, 4) == 1.0
  assert core.check_learning_rate(0.0) == 0.0
  assert core.lora_scaling(8, 4) == 2.0
