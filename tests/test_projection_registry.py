"""The NNX projection registry: kinds taught with register_projection, the einsum rule
(tunix-style modules, checked on a probe), and no silent skipping in adapt_nnx."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deltalora_jax as dl
from deltalora_jax.nnx import describe


class Affine(nnx.Module):
  """A projection Flax does not know: ``y = x @ weight + offset``."""

  def __init__(self, n_in, n_out, rngs):
    self.weight = nnx.Param(jax.random.normal(rngs.params(), (n_in, n_out)))
    self.offset = nnx.Param(jax.random.normal(rngs.params(), (n_out,)))

  def __call__(self, x):
    return x @ self.weight[...] + self.offset[...][None]


dl.register_projection(
  Affine,
  lambda m: dl.LayerDescription(
    dl.projections.GeneralDense(features=(m.weight.shape[1],)), kernel="weight", bias="offset"
  ),
)


class TunixEinsum(nnx.Module):
  """tunix's Einsum as its models write it: ``jnp.einsum(einsum_str, x, w)``."""

  def __init__(self, einsum_str, shape, rngs, dtype=None):
    self.einsum_str = einsum_str
    self.shape = shape
    if dtype is not None:
      self.dtype = dtype
    self.w = nnx.Param(jax.random.normal(rngs.params(), shape))

  def __call__(self, x):
    if hasattr(self, "dtype"):
      return jnp.einsum(self.einsum_str, x.astype(self.dtype), self.w[...].astype(self.dtype))
    return jnp.einsum(self.einsum_str, x, self.w[...])


class Shifted(TunixEinsum):
  """An einsum_str and one Param, but the call is not that einsum alone: not adaptable."""

  def __call__(self, x):
    return super().__call__(x) + 1.0


class Experts(nnx.Module):
  """A mixture of experts' stacked kernels: projection-like, no known kind."""

  def __init__(self, rngs):
    self.kernels = nnx.Param(jax.random.normal(rngs.params(), (2, 4, 4)))

  def __call__(self, x):
    return jnp.einsum("bd,edf->bf", x, self.kernels[...])


class Table(nnx.Module):
  """No __call__ (tunix's Embedder: encode, decode): not projection-like."""

  def __init__(self, rngs):
    self.table = nnx.Param(jax.random.normal(rngs.params(), (10, 4)))


def test_a_registered_kind_adapts_computes_the_rule_and_merges_to_its_class():
  base = Affine(4, 3, nnx.Rngs(0))
  layer = dl.DeltaLoRALinearGeneral(base, rank=2, alpha=4.0, delta_scaling=0.5, rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(2), (5, 4))
  np.testing.assert_allclose(layer(x), base(x), rtol=1e-6, atol=1e-6)
  layer.lora_b[...] = jax.random.normal(jax.random.key(3), (2, 3))
  layer.delta[...] = jax.random.normal(jax.random.key(4), (4, 3))
  f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
  w, b = f64(base.weight[...]), f64(base.offset[...])
  a, bb, d = f64(layer.lora_a[...]), f64(layer.lora_b[...]), f64(layer.delta[...])
  expected = f64(x) @ (w + 2.0 * a @ bb + 0.5 * d) + b
  np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-5)
  assert layer.weight is layer.kernel and layer.offset is layer.bias  # the base's names
  merged = dl.merge(layer)
  assert type(merged) is Affine
  assert sorted(nnx.to_pure_dict(nnx.state(merged))) == ["offset", "weight"]
  np.testing.assert_allclose(merged(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [None, jnp.float32])
def test_the_einsum_rule_adapts_a_tunix_style_module(dtype):
  base = TunixEinsum("BTD,DNH->BTNH", (8, 2, 4), nnx.Rngs(0), dtype)
  description = describe(base)
  assert description.kernel == "w" and description.bias is None
  assert description.projection == dl.projections.Einsum("BTD,DNH->BTNH", (8, 2, 4))
  assert set(description.attributes) == {"einsum_str", "shape"}
  layer = dl.DeltaLoRALinearGeneral(base, rank=2, rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(2), (2, 3, 8))
  np.testing.assert_allclose(layer(x), base(x), rtol=1e-6, atol=1e-6)
  assert (layer.shape, layer.einsum_str) == ((8, 2, 4), "BTD,DNH->BTNH")
  assert layer.w is layer.kernel
  assert layer.lora_b.shape == (2, 2, 4)
  assert sorted(nnx.to_pure_dict(nnx.state(dl.merge(layer)))) == ["w"]


def test_a_module_whose_call_is_not_its_einsum_is_refused():
  with pytest.raises(TypeError, match=re.escape("Shifted has an einsum_str and one nnx.Param")):
    describe(Shifted("BD,DF->BF", (4, 3), nnx.Rngs(0)))


class Net(nnx.Module):
  def __init__(self, rngs):
    self.attn = TunixEinsum("BD,DF->BF", (4, 4), rngs)
    self.shifted = Shifted("BD,DF->BF", (4, 4), rngs)
    self.experts = Experts(rngs)
    self.table = Table(rngs)
    self.embed = nnx.Embed(10, 4, rngs=rngs)
    self.out = Affine(4, 2, rngs)


def test_adapt_nnx_reports_and_warns_about_every_projection_like_module_it_left_alone():
  with pytest.warns(UserWarning, match="left alone 2 projection-like") as record:
    model, report = dl.adapt_nnx(Net(nnx.Rngs(0)), None, rank=2, rngs=nnx.Rngs(1))
  assert sorted(report["layers"]) == ["attn", "out"]
  assert sorted(report["skipped"]) == ["experts", "shifted"]
  assert "its __call__ is not" in report["skipped"]["shifted"]
  assert "register_projection" in str(record[0].message)
  assert isinstance(model.table, Table) and isinstance(model.embed, nnx.Embed)


def test_excluded_or_targeted_modules_are_not_reported():
  _, report = dl.adapt_nnx(
    Net(nnx.Rngs(0)), None, exclude=["experts", "shifted"], rank=2, rngs=nnx.Rngs(1)
  )  # no warning: pytest turns one into an error
  assert report["skipped"] == {}
  _, report = dl.adapt_nnx(Net(nnx.Rngs(0)), ["attn"], rank=2, rngs=nnx.Rngs(1))
  assert report["skipped"] == {} and list(report["layers"]) == ["attn"]
  with pytest.raises(TypeError, match="'experts' is a Experts"):
    dl.adapt_nnx(Net(nnx.Rngs(0)), ["experts"], rank=2, rngs=nnx.Rngs(1))


def test_register_projection_refuses_bad_input():
  with pytest.raises(TypeError, match=r"cls must be an nnx.Module subclass, got cls=3"):
    dl.register_projection(3, describe)  # type: ignore[arg-type]
  with pytest.raises(TypeError, match="got the adapter DeltaLoRALinearGeneral"):
    dl.register_projection(dl.DeltaLoRALinearGeneral, describe)
  with pytest.raises(TypeError, match="describe must be a function"):
    dl.register_projection(Experts, "weight")  # type: ignore[arg-type]


def test_a_describer_that_names_no_variable_is_refused():
  class Odd(nnx.Module):
    def __init__(self):
      self.kernel = jnp.ones((2, 2))  # an array, not a Variable

  dl.register_projection(
    Odd, lambda m: dl.LayerDescription(dl.projections.GeneralDense(features=(2,)))
  )
  with pytest.raises(TypeError, match=r"kernel='kernel', which is not an nnx.Variable"):
    describe(Odd())
  dl.register_projection(Odd, lambda m: "dense")
  with pytest.raises(TypeError, match="must return a LayerDescription, got 'dense'"):
    describe(Odd())


def test_what_is_projection_like():
  from deltalora_jax.adapt.nnx import projection_like

  rngs = nnx.Rngs(0)
  assert projection_like(nnx.ConvTranspose(2, 3, (3,), rngs=rngs))  # Flax's, not adapted
  assert projection_like(Experts(rngs)) and projection_like(Shifted("BD,DF->BF", (4, 4), rngs))
  assert not projection_like(nnx.Embed(10, 4, rngs=rngs))  # a lookup table
  assert not projection_like(Table(rngs))  # no __call__
  assert not projection_like(nnx.LayerNorm(4, rngs=rngs))
