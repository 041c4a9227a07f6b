"""Adapting existing models: a small transformer written in Linen and in NNX.

Each model is adapted by a regex on its attention projections, trained 20
jitted steps with ``delta_lora``, merged back into the original architecture
and exported / re-attached. The trained state is shared by module fixtures.
"""

import json
import math

import _docs
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util

import deltalora_jax as dl
from deltalora_jax.nnx import DeltaParam

WIDTH, HEADS, SEQ, BATCH, OUT = 8, 2, 4, 2, 3
ATTENTION = r".*attn/(q|k|v|o)"
STEPS = 20
LEARNING_RATE = 0.05


def attention(q, k, v, heads):
  """Multi-head softmax attention of ``[batch, seq, width]`` projections."""
  split = lambda t: t.reshape(*t.shape[:-1], heads, t.shape[-1] // heads)  # noqa: E731
  logits = jnp.einsum("bthd,bshd->bhts", split(q), split(k)) / math.sqrt(q.shape[-1] // heads)
  out = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, axis=-1), split(v))
  return out.reshape(q.shape)


# ----------------------------------------------------------------- Linen model


class LinenAttention(nn.Module):
  @nn.compact
  def __call__(self, x):
    q, k, v = (nn.Dense(WIDTH, name=name)(x) for name in "qkv")
    return nn.Dense(WIDTH, name="o")(attention(q, k, v, HEADS))


class LinenBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x + LinenAttention(name="attn")(nn.LayerNorm(name="ln1")(x))
    h = nn.gelu(nn.Dense(2 * WIDTH, name="up")(nn.LayerNorm(name="ln2")(x)))
    return x + nn.Dense(WIDTH, name="down")(h)


class LinenTransformer(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(2):
      x = LinenBlock(name=f"blocks_{i}")(x)
    return nn.Dense(OUT, name="head")(nn.LayerNorm(name="ln")(x))


# ------------------------------------------------------------------- NNX model


class NNXAttention(nnx.Module):
  def __init__(self, rngs):
    self.q, self.k, self.v, self.o = (nnx.Linear(WIDTH, WIDTH, rngs=rngs) for _ in range(4))

  def __call__(self, x):
    return self.o(attention(self.q(x), self.k(x), self.v(x), HEADS))


class NNXBlock(nnx.Module):
  def __init__(self, rngs):
    self.ln1 = nnx.LayerNorm(WIDTH, rngs=rngs)
    self.attn = NNXAttention(rngs)
    self.ln2 = nnx.LayerNorm(WIDTH, rngs=rngs)
    self.up = nnx.Linear(WIDTH, 2 * WIDTH, rngs=rngs)
    self.down = nnx.Linear(2 * WIDTH, WIDTH, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.ln1(x))
    return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class NNXTransformer(nnx.Module):
  def __init__(self, rngs):
    self.blocks = nnx.List([NNXBlock(rngs) for _ in range(2)])
    self.ln = nnx.LayerNorm(WIDTH, rngs=rngs)
    self.head = nnx.Linear(WIDTH, OUT, rngs=rngs)

  def __call__(self, x):
    for block in self.blocks:
      x = block(x)
    return self.head(self.ln(x))


def nnx_base():
  return NNXTransformer(nnx.Rngs(0))  # the same "pretrained" weights on every call


X = jax.random.normal(jax.random.key(10), (BATCH, SEQ, WIDTH))
Y = jax.random.normal(jax.random.key(11), (BATCH, SEQ, OUT))
LINEN_ATTENTION = [f"blocks_{i}/attn/{p}" for i in range(2) for p in "qkvo"]
NNX_ATTENTION = [f"blocks/{i}/attn/{p}" for i in range(2) for p in "qkvo"]


# One compiled forward per Linen model (modules are hashable, hence static).
apply = jax.jit(lambda module, variables: module.apply(variables, X), static_argnums=0)


def mse(pred):
  return jnp.mean((pred - Y) ** 2)


def relative_error(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


# ---------------------------------------------------------------- Linen tests


@pytest.fixture(scope="module")
def linen_base():
  """The Linen model and its "pretrained" variables (jitted init: one compile)."""
  model = LinenTransformer()
  return model, jax.jit(model.init)(jax.random.key(0), X)


@pytest.fixture(scope="module")
def linen_run(linen_base):
  model, base = linen_base
  adapted, variables, _ = dl.adapt_linen(
    model, base, X, targets=ATTENTION, rank=2, key=jax.random.key(1)
  )
  initial = variables
  tx = dl.delta_lora(LEARNING_RATE, layers=adapted, lora_optimizer=optax.sgd(LEARNING_RATE))
  opt_state = tx.init(variables)

  @jax.jit
  def step(variables, opt_state):
    loss, grads = jax.value_and_grad(lambda v: mse(apply(adapted, v)))(variables)
    updates, opt_state = tx.update(grads, opt_state, variables)
    return jax.tree.map(jnp.add, variables, updates), opt_state, loss

  losses = []
  for _ in range(STEPS):
    variables, opt_state, loss = step(variables, opt_state)
    losses.append(float(loss))
  return dict(
    model=model, base=base, adapted=adapted, initial=initial, trained=variables, losses=losses
  )


def test_linen_adapts_exactly_the_attention_projections(linen_run):
  adapted, variables = linen_run["adapted"], linen_run["initial"]
  assert sorted(adapted.layers) == sorted(LINEN_ATTENTION)
  params = traverse_util.flatten_dict(variables["params"])
  with_lora = sorted("/".join(k[:-1]) for k in params if k[-1] == "lora_a")
  assert with_lora == sorted(LINEN_ATTENTION)
  deltas = traverse_util.flatten_dict(variables["delta"])
  assert sorted("/".join(k[:-1]) for k in deltas) == sorted(LINEN_ATTENTION)
  # the pretrained parameters are kept, at the same paths
  base = traverse_util.flatten_dict(linen_run["base"]["params"])
  for key, value in base.items():
    np.testing.assert_array_equal(params[key], value)


def test_linen_output_at_init_equals_base(linen_run):
  model, adapted = linen_run["model"], linen_run["adapted"]
  np.testing.assert_allclose(
    apply(adapted, linen_run["initial"]), apply(model, linen_run["base"]), rtol=0, atol=1e-6
  )


def test_linen_training_lowers_the_loss_and_keeps_the_base(linen_run):
  losses = linen_run["losses"]
  assert losses[-1] < 0.8 * losses[0], losses
  trained = traverse_util.flatten_dict(linen_run["trained"]["params"])
  for key, value in traverse_util.flatten_dict(linen_run["base"]["params"]).items():
    np.testing.assert_array_equal(trained[key], value)


def test_linen_merge_and_unload_gives_the_original_model(linen_run):
  adapted, trained = linen_run["adapted"], linen_run["trained"]
  model, merged = adapted.model, dl.merge(trained, adapted)
  assert model is linen_run["model"]
  assert jax.tree.structure(merged) == jax.tree.structure(linen_run["base"])
  assert relative_error(apply(model, merged), apply(adapted, trained)) < 1e-5
  # the merge moved the adapted kernels
  q = ("blocks_0", "attn", "q", "kernel")
  delta = (
    merged["params"]["blocks_0"]["attn"]["q"]["kernel"]
    - traverse_util.flatten_dict(linen_run["base"]["params"])[q]
  )
  assert float(jnp.abs(delta).max()) > 0


def reference_kernel(kernel, bias, lora_a, lora_b, delta, scaling=3.0, delta_scaling=0.25):
  """``(W + s A B + ds D, b)`` in float64 NumPy: the merge's reference, computed apart from it."""
  w, a, b, d = (np.asarray(v, np.float64) for v in (kernel, lora_a, lora_b, delta))
  return w + scaling * a @ b + delta_scaling * d, np.asarray(bias)


def test_linen_merged_kernels_are_w_plus_s_ab_plus_ds_d(linen_base):
  model, base = linen_base
  adapted, variables, _ = dl.adapt_linen(
    model, base, X, targets=ATTENTION, rank=2, alpha=6.0, delta_scaling=0.25, key=jax.random.key(1)
  )  # s = 6 / 2 = 3
  params = traverse_util.flatten_dict(variables["params"])
  deltas = traverse_util.flatten_dict(variables["delta"])
  rng, want = np.random.default_rng(0), {}
  for name in LINEN_ATTENTION:  # B and D set by hand, so every term counts
    path = tuple(name.split("/"))
    for source, leaf in ((params, (*path, "lora_b")), (deltas, (*path, "delta"))):
      source[leaf] = jnp.asarray(rng.normal(size=source[leaf].shape), jnp.float32)
    arrays = [params[(*path, n)] for n in ("kernel", "bias", "lora_a", "lora_b")]
    want[path] = reference_kernel(*arrays, deltas[(*path, "delta")])
  variables = dict(
    variables,
    params=traverse_util.unflatten_dict(params),
    delta=traverse_util.unflatten_dict(deltas),
  )
  merged = dl.merge(variables, adapted)
  flat = traverse_util.flatten_dict(merged["params"])
  for path, (kernel, bias) in want.items():
    np.testing.assert_allclose(flat[(*path, "kernel")], kernel, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(flat[(*path, "bias")], bias)
    assert (*path, "lora_a") not in flat
  assert relative_error(apply(model, merged), apply(adapted, variables)) < 1e-5


def test_linen_export_and_reattach_gives_identical_outputs(linen_run):
  adapted, trained = linen_run["adapted"], linen_run["trained"]
  adapter = dl.export_adapter(trained, adapted)
  assert sorted(adapter["weights"]) == sorted(LINEN_ATTENTION)
  assert json.loads(json.dumps(adapter["config"])) == adapter["config"]
  assert sorted(adapter["weights"]["blocks_1/attn/o"]) == ["delta", "lora_a", "lora_b"]
  fresh = jax.tree.map(jnp.copy, linen_run["base"])
  again, variables, _ = dl.attach_adapter_linen(LinenTransformer(), fresh, adapter)
  np.testing.assert_array_equal(apply(again, variables), apply(adapted, trained))


def test_linen_per_target_options_and_exclusions(linen_base):
  model, base = linen_base
  adapted, variables, _ = dl.adapt_linen(
    model,
    base,
    X,
    targets=["q", "up"],
    exclude=r"blocks_1/.*",
    rank=2,
    overrides={r".*/q": {"rank": 4, "alpha": 8.0}},
    key=jax.random.key(1),
  )
  layers = adapted.layers
  assert sorted(layers) == ["blocks_0/attn/q", "blocks_0/up"]
  assert (layers["blocks_0/attn/q"].rank, layers["blocks_0/attn/q"].scaling) == (4, 2.0)
  assert (layers["blocks_0/up"].rank, layers["blocks_0/up"].scaling) == (2, 1.0)
  assert variables["params"]["blocks_0"]["attn"]["q"]["lora_a"].shape == (WIDTH, 4)


def test_linen_adapt_reports_what_it_adapted(linen_base, capsys):
  model, base = linen_base
  dl.adapt_linen(model, base, X, targets=["head"], rank=1, key=jax.random.key(1), verbose=True)
  # head: 8 -> 3, rank 1: 1 * (8 + 3) + 8 * 3 = 35 trainable numbers
  assert capsys.readouterr().out == HEAD_TABLE


# What verbose=True prints when only ``head`` (8 -> 3) is adapted at rank 1.
HEAD_TABLE = """\
layer  shape  rank  trainable
head   8x3       1         35
total                      35
"""


def test_linen_errors(linen_base):
  model, base = linen_base
  adapt = lambda m, v, **kw: dl.adapt_linen(m, v, X, rank=2, key=jax.random.key(1), **kw)  # noqa: E731
  with pytest.raises(ValueError, match=r"match no layer.*blocks_0/attn/q.*blocks_1/down"):
    adapt(model, base, targets=r".*/nothing")
  with pytest.raises(TypeError, match=r"'blocks_0/ln1' is a LayerNorm.*not a layer that can be"):
    adapt(model, base, targets=["ln1", "q"])
  with pytest.raises(ValueError, match="match no layer"):
    adapt(model, base, targets=["typo"])
  adapted, variables, _ = adapt(model, base, targets=ATTENTION)
  with pytest.raises(ValueError, match=r"\['blocks_0/attn/q'\] are already adapted"):
    adapt(adapted, variables, targets=["blocks_0/attn/q"])
  with pytest.raises(ValueError, match="overrides key"):
    adapt(model, base, targets=ATTENTION, overrides={"mlp": {"rank": 1}})
  with pytest.raises(TypeError, match="targets must be"):
    adapt(model, base, targets=3)


class LinenWithDropout(nn.Module):
  @nn.compact
  def __call__(self, x, *, train: bool):
    x = nn.Dropout(0.5, deterministic=not train)(nn.Dense(4, name="hidden")(x))
    return nn.Dense(1, name="out")(x)


def test_linen_trace_takes_call_keyword_arguments():
  model, x = LinenWithDropout(), jnp.ones((2, 3))
  base = model.init(jax.random.key(0), x, train=False)
  adapted, variables, _ = dl.adapt_linen(
    model, base, x, rank=1, key=jax.random.key(1), call_kwargs={"train": True}
  )
  assert sorted(adapted.layers) == ["hidden", "out"]
  np.testing.assert_allclose(
    adapted.apply(variables, x, train=False), model.apply(base, x, train=False), atol=1e-6
  )


def test_linen_adapting_more_layers_of_an_adapted_model(linen_base):
  model, base = linen_base
  first, variables, _ = dl.adapt_linen(
    model, base, X, targets=ATTENTION, rank=2, key=jax.random.key(1)
  )
  both, variables, _ = dl.adapt_linen(
    first, variables, X, targets=["head"], rank=1, key=jax.random.key(2)
  )
  assert len(both.layers) == len(LINEN_ATTENTION) + 1
  np.testing.assert_allclose(apply(both, variables), apply(model, base), rtol=0, atol=1e-6)


# ------------------------------------------------------------------ NNX tests


@pytest.fixture(scope="module")
def nnx_run():
  model = nnx_base()
  _, report = dl.adapt_nnx(model, ATTENTION, rank=2, rngs=nnx.Rngs(1))
  initial_output = model(X)
  kernels = {name: jnp.copy(layer.kernel[...]) for name, layer in _adapters(model).items()}
  tx = dl.delta_lora(LEARNING_RATE, layers=model, lora_optimizer=optax.sgd(LEARNING_RATE))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Any(nnx.LoRAParam, DeltaParam))
  traces = []

  @nnx.jit
  def step(model, optimizer, x, y):
    traces.append(1)
    trainable = nnx.DiffState(0, nnx.Any(nnx.LoRAParam, DeltaParam))
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2), argnums=trainable)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer, X, Y)) for _ in range(STEPS)]
  return dict(
    model=model,
    report=report,
    initial_output=initial_output,
    kernels=kernels,
    optimizer=optimizer,
    losses=losses,
    traces=len(traces),
  )


def _adapters(model):
  adapted = (dl.DeltaLoRALinear, dl.DeltaLoRALinearGeneral)
  return {dl.paths.name(p): m for p, m in nnx.iter_modules(model) if isinstance(m, adapted)}


def test_nnx_adapts_exactly_the_attention_projections(nnx_run):
  model, report = nnx_run["model"], nnx_run["report"]
  assert sorted(_adapters(model)) == sorted(NNX_ATTENTION)
  assert sorted(report["layers"]) == sorted(NNX_ATTENTION)
  assert report["layers"]["blocks/0/attn/q"]["parameter_count"] == 2 * (8 + 8) + 8 * 8
  assert report["total"]["parameter_count"] == 8 * (2 * 16 + 64)
  for block in model.blocks:
    assert type(block.up) is nnx.Linear and type(block.down) is nnx.Linear
  assert type(model.head) is nnx.Linear
  # only the adapted layers hold LoRA and delta state
  lora = nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.LoRAParam, DeltaParam)))
  assert sorted({"/".join(map(str, p[:-1])) for p, _ in lora}) == sorted(NNX_ATTENTION)


def test_nnx_output_at_init_equals_base(nnx_run):
  np.testing.assert_allclose(nnx_run["initial_output"], nnx_base()(X), rtol=0, atol=1e-6)


def test_nnx_training_lowers_the_loss_compiles_once_and_freezes_the_kernels(nnx_run):
  losses = nnx_run["losses"]
  assert losses[-1] < 0.8 * losses[0], losses
  assert nnx_run["traces"] == 1
  for name, layer in _adapters(nnx_run["model"]).items():
    np.testing.assert_array_equal(layer.kernel[...], nnx_run["kernels"][name])
    assert float(jnp.abs(layer.delta[...]).max()) > 0, name
  # the layers that were not adapted are untouched too
  base = nnx_base()
  np.testing.assert_array_equal(nnx_run["model"].head.kernel[...], base.head.kernel[...])


def test_nnx_whole_model_utilities(nnx_run):
  model, optimizer = nnx_run["model"], nnx_run["optimizer"]
  counts = dl.parameter_counts(model)
  assert counts["total"] == 8 * (2 * 16 + 64)
  report = dl.diagnostics(model, opt_state=optimizer)
  entry = report["layers"]["blocks/1/attn/v"]
  layer = model.blocks[1].attn.v
  np.testing.assert_allclose(
    entry["delta_norm"], float(jnp.linalg.norm(layer.delta[...])), rtol=1e-6
  )
  assert entry["velocity_norm"] > 0
  assert (entry["kind"], entry["rank"], entry["in_features"]) == ("general_dense", 2, WIDTH)


def test_nnx_merge_gives_the_original_architecture(nnx_run):
  model = nnx_run["model"]
  merged = dl.merge(model)
  base = nnx_base()
  assert [(p, type(m)) for p, m in nnx.iter_modules(merged)] == [
    (p, type(m)) for p, m in nnx.iter_modules(base)
  ]
  assert jax.tree.structure(nnx.state(merged)) == jax.tree.structure(nnx.state(base))
  assert relative_error(merged(X), model(X)) < 1e-5
  assert sorted(_adapters(model)) == sorted(NNX_ATTENTION)  # the adapted model is kept


def test_nnx_merged_kernels_are_w_plus_s_ab_plus_ds_d():
  model = nnx_base()
  dl.adapt_nnx(model, ATTENTION, rank=2, alpha=6.0, delta_scaling=0.25, rngs=nnx.Rngs(1))
  rng, want = np.random.default_rng(0), {}
  for name, layer in _adapters(model).items():  # B and D set by hand, so every term counts
    layer.lora_b[...] = jnp.asarray(rng.normal(size=layer.lora_b.shape), jnp.float32)
    layer.delta[...] = jnp.asarray(rng.normal(size=layer.delta.shape), jnp.float32)
    names = ("kernel", "bias", "lora_a", "lora_b", "delta")
    want[name] = reference_kernel(*(getattr(layer, n)[...] for n in names))
  merged = dl.merge(model)
  modules = {dl.paths.name(p): m for p, m in nnx.iter_modules(merged)}
  for name, (kernel, bias) in want.items():
    assert type(modules[name]) is nnx.Linear, name
    np.testing.assert_allclose(modules[name].kernel[...], kernel, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(modules[name].bias[...], bias)
  assert relative_error(merged(X), model(X)) < 1e-5


def test_nnx_export_and_reattach_gives_identical_outputs(nnx_run):
  model = nnx_run["model"]
  adapter = dl.export_adapter(model)
  assert sorted(adapter["config"]) == sorted(NNX_ATTENTION)
  assert json.loads(json.dumps(adapter["config"])) == adapter["config"]
  fresh = nnx_base()
  _, report = dl.attach_adapter_nnx(fresh, adapter)
  assert sorted(report["layers"]) == sorted(NNX_ATTENTION)
  np.testing.assert_array_equal(fresh(X), model(X))
  with pytest.raises(ValueError, match="already adapted"):
    dl.attach_adapter_nnx(fresh, adapter)


def test_nnx_per_target_options_and_exclusions():
  model = nnx_base()
  dl.adapt_nnx(
    model,
    ["q", "up"],
    exclude=["blocks/1/up"],
    rank=2,
    overrides={r".*/q": {"rank": 4, "delta_scaling": 0.5}},
    rngs=nnx.Rngs(1),
  )
  adapters = _adapters(model)
  assert sorted(adapters) == ["blocks/0/attn/q", "blocks/0/up", "blocks/1/attn/q"]
  assert (adapters["blocks/1/attn/q"].rank, adapters["blocks/1/attn/q"].delta_scaling) == (4, 0.5)
  assert (adapters["blocks/0/up"].rank, adapters["blocks/0/up"].delta_scaling) == (2, 0.1)


def test_nnx_export_of_a_trained_base_carries_the_base_weights():
  model = nnx_base()
  dl.adapt_nnx(model, ["head"], rank=1, freeze_base=False, rngs=nnx.Rngs(1))
  model.head.kernel[...] = model.head.kernel[...] + 1.0  # as if trained
  adapter = dl.export_adapter(model)
  assert sorted(adapter["weights"]["head"]) == ["bias", "delta", "kernel", "lora_a", "lora_b"]
  assert adapter["config"]["head"]["freeze_base"] is False
  fresh = nnx_base()
  dl.attach_adapter_nnx(fresh, adapter)
  assert fresh.head.freeze_base is False
  np.testing.assert_array_equal(fresh.head.kernel[...], model.head.kernel[...])


def test_nnx_all_dense_layers_by_default():
  model = nnx_base()
  _, report = dl.adapt_nnx(model, rank=1, rngs=nnx.Rngs(1))
  assert len(report["layers"]) == 2 * 6 + 1


def test_nnx_errors_leave_the_model_unchanged():
  model = nnx_base()
  with pytest.raises(ValueError, match=r"match no layer.*blocks/0/attn/q.*head"):
    dl.adapt_nnx(model, r".*/nothing", rank=2, rngs=nnx.Rngs(1))
  with pytest.raises(TypeError, match=r"'blocks/0/ln1' is a LayerNorm.*not a layer that can be"):
    dl.adapt_nnx(model, r"blocks/0/(attn/q|ln1)", rank=2, rngs=nnx.Rngs(1))
  with pytest.raises(TypeError, match=r"'blocks/0/attn' is a NNXAttention"):
    dl.adapt_nnx(model, r".*attn", rank=2, rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="rank must satisfy"):
    dl.adapt_nnx(model, ATTENTION, rank=2, overrides={r".*/o": {"rank": 9}}, rngs=nnx.Rngs(1))
  assert not _adapters(model)  # nothing was replaced by the failed calls
  dl.adapt_nnx(model, ATTENTION, rank=2, rngs=nnx.Rngs(1))
  with pytest.raises(
    ValueError, match=r"\['blocks/0/attn/k', 'blocks/0/attn/o', .*\] are already adapted"
  ):
    dl.adapt_nnx(model, ATTENTION, rank=2, rngs=nnx.Rngs(1))
  with pytest.raises(TypeError, match="single Linear"):
    dl.adapt_nnx(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), rank=1, rngs=nnx.Rngs(1))


def test_nnx_adapt_prints_on_request(capsys):
  dl.adapt_nnx(nnx_base(), ["head"], rank=1, rngs=nnx.Rngs(1), verbose=True)
  assert capsys.readouterr().out == HEAD_TABLE


def test_attach_refuses_a_mismatched_base(linen_base):
  model = nnx_base()
  dl.adapt_nnx(model, ["head"], rank=1, rngs=nnx.Rngs(1))
  adapter = dl.export_adapter(model)
  adapter["config"]["blocks/0/up"] = adapter["config"].pop("head")
  adapter["weights"]["blocks/0/up"] = adapter["weights"].pop("head")
  with pytest.raises(ValueError, match=r"with kernel \(8, 16\)"):
    dl.attach_adapter_nnx(nnx_base(), adapter)
  with pytest.raises(ValueError, match="has no kernel"):
    dl.attach_adapter_linen(*linen_base, adapter)


# ----------------------------------------------------- docs/guides/adapting.md


def run_guide_section(heading):
  (code,) = _docs.code_blocks("adapting.md", heading)
  namespace = {}
  exec(compile(code, f"adapting.md: {heading}", "exec"), namespace)
  return namespace


def test_guide_linen_section_runs(capsys):
  ns = run_guide_section("An existing Linen model")
  assert "hidden" in capsys.readouterr().out
  model, x, y = ns["model"], ns["x"], ns["y"]
  base_loss = jnp.mean((model.apply(ns["pretrained"], x) - y) ** 2)
  assert float(ns["loss"]) < float(base_loss)
  trained = ns["adapted"].apply(ns["variables"], x)
  assert relative_error(model.apply(ns["merged"], x), trained) < 1e-5
  np.testing.assert_array_equal(ns["again"].apply(ns["restored"], x), trained)


def test_guide_nnx_section_runs(capsys):
  ns = run_guide_section("An existing NNX model")
  assert "hidden" in capsys.readouterr().out
  x, y = ns["x"], ns["y"]
  base_loss = jnp.mean((ns["MLP"](nnx.Rngs(1))(x) - y) ** 2)
  assert float(ns["loss"]) < float(base_loss)
  trained = ns["model"](x)
  assert relative_error(ns["merged"](x), trained) < 1e-5
  np.testing.assert_array_equal(ns["fresh"](x), trained)


def test_adapt_nnx_leaves_the_model_unchanged_when_a_replacement_fails():
  # A Linear inside a tuple cannot be replaced; the List entries adapted before
  # it must be put back, so that the model is left as it was.
  class Model(nnx.Module):
    def __init__(self, rngs):
      self.blocks = nnx.List([nnx.Linear(4, 4, rngs=rngs) for _ in range(2)])
      self.frozen = nnx.data((nnx.Linear(4, 4, rngs=rngs),))

  model = Model(nnx.Rngs(0))
  before = [type(b) for b in model.blocks]
  with pytest.raises(TypeError):
    dl.adapt_nnx(model, None, rank=2, rngs=nnx.Rngs(1))
  assert [type(b) for b in model.blocks] == before == [nnx.Linear, nnx.Linear]
