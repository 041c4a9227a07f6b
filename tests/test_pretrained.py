"""load_base: pretrained weights into Linen variables and NNX models, by name, all or nothing."""

import re

import _docs
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deltalora_jax as dl
from deltalora_jax import pretrained

WIDTH, R = 8, 2
X = jnp.asarray(np.random.default_rng(0).standard_normal((2, WIDTH)), jnp.float32)


class MLP(nn.Module):
  dense: type = nn.Dense

  @nn.compact
  def __call__(self, x):
    for i in range(2):
      x = nn.gelu(self.dense(WIDTH, name=f"hidden_{i}")(x))
    return nn.Dense(3, name="head")(x)  # never adapted


def adapted_dense(features, name):
  return dl.DeltaLoRADense(features, rank=R, name=name)


class Encoder(nn.Module):
  dense: type = nn.Dense

  @nn.compact
  def __call__(self, x):
    return nn.gelu(self.dense(WIDTH, name="proj")(nn.LayerNorm(name="norm")(x)))


class Classifier(nn.Module):
  """A pretrained encoder under ``encoder`` and a new head."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="head")(Encoder(adapted_dense, name="encoder")(x))


def _adapted_variables():
  """An adapted MLP's variables with non-zero B and D, as after some training."""
  variables = MLP(adapted_dense).init(jax.random.key(0), X)
  bump = lambda path, v: v + 0.5 if path[-1].key in ("lora_b", "delta") else v  # noqa: E731
  return jax.tree_util.tree_map_with_path(bump, variables)


def _copy(tree):
  return jax.tree.map(np.array, tree)


# Linen ---------------------------------------------------------------------------------------


def test_strict_load_copies_every_base_parameter_and_keeps_the_adapter():
  variables = _adapted_variables()
  before = _copy(variables)
  base = MLP().init(jax.random.key(42), X)
  loaded, report = dl.load_base(variables, base)
  names = ["head/bias", "head/kernel"] + [
    f"hidden_{i}/{p}" for i in (0, 1) for p in ("bias", "kernel")
  ]
  assert report == {"loaded": sorted(names), "skipped": [], "missing": []}
  for name in ("hidden_0", "hidden_1", "head"):
    for p in ("kernel", "bias"):
      np.testing.assert_array_equal(loaded["params"][name][p], base["params"][name][p])
  for p in ("lora_a", "lora_b"):
    np.testing.assert_array_equal(loaded["params"]["hidden_0"][p], before["params"]["hidden_0"][p])
  chex.assert_trees_all_equal(loaded["delta"], before["delta"])
  chex.assert_trees_all_equal(_copy(variables), before)  # the argument is left as it was


def test_strict_refuses_missing_and_unknown_parameters_and_changes_nothing():
  variables = _adapted_variables()
  before = _copy(variables)
  base = MLP().init(jax.random.key(42), X)
  del base["params"]["head"]
  with pytest.raises(
    ValueError,
    match=r"missing from base: \['head/bias', 'head/kernel'\], unknown in the target: \[\]",
  ):
    dl.load_base(variables, base)
  base = MLP().init(jax.random.key(42), X)
  base["params"]["pooler"] = {"kernel": jnp.ones((WIDTH, WIDTH))}
  with pytest.raises(
    ValueError, match=r"missing from base: \[\], unknown in the target: \['pooler/kernel'\]"
  ):
    dl.load_base(variables, base)
  chex.assert_trees_all_equal(_copy(variables), before)


@pytest.mark.parametrize("strict", [True, False])
def test_a_shape_or_dtype_mismatch_always_raises_naming_both_and_changes_nothing(strict):
  variables = _adapted_variables()
  before = _copy(variables)
  base = MLP().init(jax.random.key(42), X)
  base["params"]["hidden_1"]["kernel"] = jnp.ones((WIDTH, WIDTH + 1))
  base["params"]["head"]["bias"] = jnp.ones(3, jnp.bfloat16)
  message = (
    r"'head/bias' must have shape \(3,\) and dtype float32 \(the target's\), got shape \(3,\) "
    r"and dtype bfloat16; 'hidden_1/kernel' must have shape \(8, 8\) and dtype float32 "
    r"\(the target's\), got shape \(8, 9\) and dtype float32"
  )
  with pytest.raises(ValueError, match=message):
    dl.load_base(variables, base, strict=strict)
  chex.assert_trees_all_equal(_copy(variables), before)


def test_pretrained_encoder_under_a_new_head_loads_non_strict_with_a_mapping():
  variables = Classifier().init(jax.random.key(0), X)
  encoder = Encoder().init(jax.random.key(7), X)  # the plain pretrained encoder
  loaded, report = dl.load_base(variables, encoder, strict=False, mapping={r"(.*)": r"encoder/\1"})
  assert report == {
    "loaded": sorted(
      f"encoder/{p}" for p in ("norm/scale", "norm/bias", "proj/kernel", "proj/bias")
    ),
    "skipped": [],
    "missing": ["head/bias", "head/kernel"],
  }
  chex.assert_trees_all_equal(
    {k: v for k, v in loaded["params"]["encoder"]["proj"].items() if not k.startswith("lora")},
    encoder["params"]["proj"],
  )
  chex.assert_trees_all_equal(loaded["params"]["encoder"]["norm"], encoder["params"]["norm"])
  chex.assert_trees_all_equal(loaded["params"]["head"], variables["params"]["head"])  # its init
  np.testing.assert_array_equal(
    loaded["params"]["encoder"]["proj"]["lora_a"], variables["params"]["encoder"]["proj"]["lora_a"]
  )
  # Strict, the head's absence is an error, named.
  with pytest.raises(ValueError, match=r"missing from base: \['head/bias', 'head/kernel'\]"):
    dl.load_base(variables, encoder, mapping={r"(.*)": r"encoder/\1"})


def test_mapping_renames_by_regex_groups_skips_none_and_first_match_wins():
  variables = Classifier().init(jax.random.key(0), X)
  checkpoint = {  # another library's names, a pooler the model has not
    "bert/ln/gamma": jnp.full((WIDTH,), 2.0),
    "bert/ln/beta": jnp.full((WIDTH,), 3.0),
    "bert/dense/kernel": jnp.ones((WIDTH, WIDTH)),
    "bert/dense/bias": jnp.zeros((WIDTH,)),
    "pooler/kernel": jnp.ones((WIDTH, WIDTH)),
    "classifier/kernel": jnp.ones((WIDTH, 3)),
    "classifier/bias": jnp.ones((3,)),
  }
  base = {"params": {k: v for k, v in checkpoint.items()}}
  mapping = {
    r"bert/ln/gamma": "encoder/norm/scale",
    r"bert/ln/beta": "encoder/norm/bias",
    r"bert/dense/(?P<leaf>.*)": r"encoder/proj/\g<leaf>",
    r"pooler/.*": None,
    r"classifier/(.*)": r"head/\1",
    r"classifier/kernel": "never used: the pattern above matched first",
  }
  with pytest.raises(ValueError, match=r"patterns \['classifier/kernel'\] rename no base"):
    dl.load_base(variables, base, mapping=mapping)
  del mapping["classifier/kernel"]
  loaded, report = dl.load_base(variables, base, mapping=mapping)  # strict: None is a choice
  assert report["skipped"] == ["pooler/kernel"] and report["missing"] == []
  np.testing.assert_array_equal(loaded["params"]["encoder"]["norm"]["scale"], 2.0)
  np.testing.assert_array_equal(loaded["params"]["head"]["bias"], 1.0)


def test_mapping_as_a_callable():
  variables = Classifier().init(jax.random.key(0), X)
  encoder = Encoder().init(jax.random.key(7), X)
  rename = lambda n: None if n.startswith("norm/") else f"encoder/{n}"  # noqa: E731
  loaded, report = dl.load_base(variables, encoder, strict=False, mapping=rename)
  assert report["loaded"] == ["encoder/proj/bias", "encoder/proj/kernel"]
  assert report["skipped"] == ["norm/bias", "norm/scale"]
  assert report["missing"] == [
    "encoder/norm/bias",
    "encoder/norm/scale",
    "head/bias",
    "head/kernel",
  ]
  chex.assert_trees_all_equal(
    loaded["params"]["encoder"]["norm"], variables["params"]["encoder"]["norm"]
  )


def test_bad_mappings_are_named():
  variables = Classifier().init(jax.random.key(0), X)
  encoder = Encoder().init(jax.random.key(7), X)
  with pytest.raises(
    ValueError, match=r"'proj/kernel' and 'proj/bias'|'proj/bias' and 'proj/kernel'"
  ):
    dl.load_base(variables, encoder, strict=False, mapping={r"proj/.*": "encoder/proj/kernel"})
  with pytest.raises(ValueError, match=r"mapping pattern '\(' is not a valid regex"):
    dl.load_base(variables, encoder, mapping={"(": "x"})
  with pytest.raises(ValueError, match=r"mapping\['\(\.\*\)'\] = '\\\\2' cannot rename"):
    dl.load_base(variables, encoder, mapping={"(.*)": r"\2"})
  with pytest.raises(TypeError, match=r"regex strings to target names \(str\) or None, got 'a': 3"):
    dl.load_base(variables, encoder, mapping={"a": 3})
  with pytest.raises(
    TypeError, match=r"mapping\('norm/bias'\) must return a target name \(str\) or None, got 3"
  ):
    dl.load_base(variables, encoder, mapping=lambda n: 3)
  with pytest.raises(TypeError, match=r"mapping must be None, a dict .* got list"):
    dl.load_base(variables, encoder, mapping=["encoder"])


def test_wrong_kinds_of_target_and_base_are_named():
  variables = _adapted_variables()
  base = MLP().init(jax.random.key(42), X)
  with pytest.raises(
    TypeError,
    match=r"base must be the Linen variables \{'params': \.\.\.\}.*"
    r"keys \['head', 'hidden_0', 'hidden_1'\]",
  ):
    dl.load_base(variables, base["params"])
  with pytest.raises(ValueError, match=r"only the 'params' collection, got also \['batch_stats'\]"):
    dl.load_base(variables, {**base, "batch_stats": {}})
  with pytest.raises(
    TypeError,
    match=r"target must be an NNX model or the Linen variables .* got a dict with keys \['head'",
  ):
    dl.load_base(variables["params"], base)
  with pytest.raises(TypeError, match=r"strict must be True or False, got 'yes'"):
    dl.load_base(variables, base, strict="yes")


class OwnLoRA(nn.Module):
  """A layer of the user's own whose parameter happens to be named ``lora_a``."""

  @nn.compact
  def __call__(self, x):
    return x * self.param("lora_a", nn.initializers.ones, (1, WIDTH))


class WithOwnLoRA(nn.Module):
  @nn.compact
  def __call__(self, x):
    return OwnLoRA(name="own")(dl.DeltaLoRADense(WIDTH, rank=R, name="dense")(x))


def test_layers_tell_which_lora_names_are_the_adapters():
  model = WithOwnLoRA()
  variables = model.init(jax.random.key(0), X)
  base = {
    "params": {
      "dense": {"kernel": jnp.ones((WIDTH, WIDTH)), "bias": jnp.ones(WIDTH)},
      "own": {"lora_a": jnp.full((1, WIDTH), 2.0)},
    }
  }
  with pytest.raises(ValueError, match=r"unknown in the target: \['own/lora_a'\]"):
    dl.load_base(variables, base)  # by name, every lora_a is an adapter's
  loaded, report = dl.load_base(variables, base, layers=dl.adapted_layers(model, X))
  assert report["loaded"] == ["dense/bias", "dense/kernel", "own/lora_a"]
  np.testing.assert_array_equal(loaded["params"]["own"]["lora_a"], 2.0)
  with pytest.raises(TypeError, match=r"layers must be an NNX model, a Linen layers mapping"):
    dl.load_base(variables, base, layers=[("dense",)])


def test_loads_under_jit_and_onto_the_targets_sharding():
  variables = _adapted_variables()
  base = MLP().init(jax.random.key(42), X)
  mesh = jax.make_mesh((8,), ("x",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "x"))
  variables["params"]["hidden_0"]["kernel"] = jax.device_put(
    variables["params"]["hidden_0"]["kernel"], sharding
  )
  loaded, _ = dl.load_base(variables, base)
  assert loaded["params"]["hidden_0"]["kernel"].sharding == sharding
  # A copy: deleting (donating) the result leaves the base usable.
  loaded["params"]["head"]["kernel"].delete()
  assert float(jnp.sum(base["params"]["head"]["kernel"])) == pytest.approx(
    float(np.sum(np.asarray(base["params"]["head"]["kernel"])))
  )
  jitted = jax.jit(lambda v, b: dl.load_base(v, b)[0])(variables, base)
  chex.assert_trees_all_equal(jitted["params"]["head"], base["params"]["head"])


# NNX -----------------------------------------------------------------------------------------


class NNXEncoder(nnx.Module):
  def __init__(self, rngs, adapted=False):
    self.norm = nnx.LayerNorm(WIDTH, rngs=rngs)
    if adapted:
      self.proj = dl.DeltaLoRALinear(WIDTH, WIDTH, rank=R, rngs=rngs)
    else:
      self.proj = nnx.Linear(WIDTH, WIDTH, rngs=rngs)

  def __call__(self, x):
    return nnx.gelu(self.proj(self.norm(x)))


class NNXClassifier(nnx.Module):
  def __init__(self, rngs):
    self.encoder = NNXEncoder(rngs, adapted=True)
    self.head = nnx.Linear(WIDTH, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(self.encoder(x))


def _nnx_arrays(model):
  return _copy(nnx.to_pure_dict(nnx.state(model)))


def _bumped_classifier():
  model = NNXClassifier(nnx.Rngs(0))
  model.encoder.proj.lora_b[...] = jnp.full((R, WIDTH), 0.5)
  model.encoder.proj.delta[...] = jnp.full((WIDTH, WIDTH), 0.25)
  return model


def test_nnx_pretrained_encoder_under_a_new_head_in_place():
  model = _bumped_classifier()
  before = _nnx_arrays(model)
  encoder = NNXEncoder(nnx.Rngs(7))  # plain, pretrained
  result, report = dl.load_base(model, encoder, strict=False, mapping={r"(.*)": r"encoder/\1"})
  assert result is model
  assert report == {
    "loaded": sorted(
      f"encoder/{p}" for p in ("norm/scale", "norm/bias", "proj/kernel", "proj/bias")
    ),
    "skipped": [],
    "missing": ["head/bias", "head/kernel"],
  }
  np.testing.assert_array_equal(model.encoder.proj.kernel[...], encoder.proj.kernel[...])
  np.testing.assert_array_equal(model.encoder.norm.scale[...], encoder.norm.scale[...])
  after = _nnx_arrays(model)
  chex.assert_trees_all_equal(after["head"], before["head"])
  for name in ("lora_a", "lora_b", "delta"):
    np.testing.assert_array_equal(after["encoder"]["proj"][name], before["encoder"]["proj"][name])
  # The model computes with the loaded weights.
  model.encoder.proj.lora_b[...] = jnp.zeros((R, WIDTH))
  model.encoder.proj.delta[...] = jnp.zeros((WIDTH, WIDTH))
  np.testing.assert_allclose(model.encoder(X), encoder(X), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["module", "state", "pure_dict"])
def test_nnx_strict_load_from_a_module_a_state_or_a_dict(kind):
  model = NNXEncoder(nnx.Rngs(0), adapted=True)
  plain = NNXEncoder(nnx.Rngs(3))
  base = {
    "module": plain,
    "state": nnx.state(plain, nnx.Param),
    "pure_dict": nnx.to_pure_dict(nnx.state(plain, nnx.Param)),
  }[kind]
  _, report = dl.load_base(model, base)
  assert report == {
    "loaded": ["norm/bias", "norm/scale", "proj/bias", "proj/kernel"],
    "skipped": [],
    "missing": [],
  }
  np.testing.assert_array_equal(model.proj.kernel[...], plain.proj.kernel[...])
  with pytest.raises(ValueError, match=r"missing from base: \['head/bias', 'head/kernel'\]"):
    dl.load_base(NNXClassifier(nnx.Rngs(0)), base, mapping={r"(.*)": r"encoder/\1"})


def test_nnx_mismatch_raises_and_leaves_every_array_as_it_was():
  model = _bumped_classifier()
  before = _nnx_arrays(model)
  encoder = NNXEncoder(nnx.Rngs(7))
  base = nnx.to_pure_dict(nnx.state(encoder, nnx.Param))
  base["proj"]["kernel"] = jnp.ones((WIDTH, WIDTH + 1))  # the last name: all others fit
  with pytest.raises(
    ValueError,
    match=r"'encoder/proj/kernel' \(from base 'proj/kernel'\) must have shape \(8, 8\) and "
    r"dtype float32 \(the target's\), got shape \(8, 9\)",
  ):
    dl.load_base(model, base, strict=False, mapping={r"(.*)": r"encoder/\1"})
  chex.assert_trees_all_equal(_nnx_arrays(model), before)
  with pytest.raises(ValueError, match=r"missing from base: \['head/bias', 'head/kernel'\]"):
    dl.load_base(model, nnx.state(encoder, nnx.Param), mapping={r"(.*)": r"encoder/\1"})
  chex.assert_trees_all_equal(_nnx_arrays(model), before)


def test_nnx_refuses_layers_and_a_wrong_base():
  model = NNXEncoder(nnx.Rngs(0), adapted=True)
  with pytest.raises(TypeError, match=r"layers is for Linen variables only"):
    dl.load_base(model, NNXEncoder(nnx.Rngs(3)), layers={})
  with pytest.raises(
    TypeError, match=r"base must be an nnx.Module, an nnx.State or a nested dict .* got list"
  ):
    dl.load_base(model, [1.0])


def test_the_public_name_is_this_module():
  assert dl.load_base is pretrained.load_base
  assert re.search(r"mapping", dl.load_base.__doc__)


# The demo's pretrained encoder -----------------------------------------------------------------


def _demo_encoder():
  from deltalora_jax.demo import bert, train

  config = bert.BertConfig(
    vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, max_position=24
  )
  ids = jnp.array([[2, 5, 6, 3, 0]], jnp.int32)
  mask = jnp.array([[1, 1, 1, 1, 0]], jnp.int32)
  encoder = bert.BertEncoder(config).init(jax.random.key(5), ids, mask)
  model = bert.SentimentClassifier(config, bert.Adapter(rank=2, targets=bert.ROLES))
  return train, train.Pretrained(config, None, encoder), model, (ids, mask)


def test_the_demo_loads_the_encoder_and_draws_only_the_new_parts():
  train, tiny, model, sample = _demo_encoder()
  variables = train.initial_variables(model, tiny, jax.random.key(0), sample)
  loaded, report = dl.load_base(variables, tiny.variables, strict=False, mapping=train.ENCODER)
  assert report["skipped"] == [] and report["missing"] == ["head/bias", "head/kernel"]
  chex.assert_trees_all_equal(loaded, variables)  # the encoder is the checkpoint's
  delta = jax.tree.leaves(variables["delta"])
  assert delta and all(not np.any(d) for d in delta)


@pytest.mark.parametrize("damage", ["extra", "missing"])
def test_the_demo_refuses_a_checkpoint_that_does_not_fit_its_encoder(damage):
  train, tiny, model, sample = _demo_encoder()
  params = dict(tiny.variables["params"])
  if damage == "extra":
    params["classifier"] = {"kernel": jnp.ones((16, 16))}
    match = r"unknown in the model: \['classifier/kernel'\], missing from the checkpoint: \[\]"
  else:
    del params["embeddings_norm"]
    match = r"missing from the checkpoint: \['encoder/embeddings_norm/bias', 'encoder/embed"
  tiny = train.Pretrained(tiny.config, None, {"params": params})
  with pytest.raises(ValueError, match=match):
    train.initial_variables(model, tiny, jax.random.key(0), sample)


def test_the_guide_example_runs(capsys):
  (code,) = _docs.code_blocks("pretrained.md")
  ns = {}
  exec(compile(code, "pretrained.md", "exec"), ns)
  assert capsys.readouterr().out.startswith("['head/bias', 'head/kernel']")
  assert ns["report"]["skipped"] == [] and len(ns["report"]["loaded"]) == 4
  np.testing.assert_array_equal(
    ns["variables"]["params"]["encoder"]["proj"]["kernel"],
    ns["pretrained"]["params"]["proj"]["kernel"],
  )
