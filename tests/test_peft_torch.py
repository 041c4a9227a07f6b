"""PEFT directories traded with PyTorch: Hugging Face ``peft`` reads what ``save_peft`` writes.

A tiny random ``transformers.BertModel`` (no download) is saved, and its
weights are loaded into the demo's Flax BERT by the demo's loader
(:func:`deltalora_jax.demo.weights.load_hf`); the demo's name map
(:func:`~deltalora_jax.demo.weights.hf_module_name`) gives the PyTorch
module of each Flax layer. Each test compares last hidden states (and the
pooler's output) of both frameworks and prints its measured agreement, the
largest absolute difference over the largest absolute value
(``pytest -s`` shows them).
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

with warnings.catch_warnings():
  # Imports of PyTorch and the Hugging Face libraries may warn about their own
  # optional parts; the tests run with warnings as errors.
  warnings.simplefilter("ignore")
  import peft
  import torch
  import transformers

import deltalora_jax as dl
from deltalora_jax.demo import bert, weights

# peft 0.21 reads transformers 5's deprecated alias (their warning, not ours).
pytestmark = pytest.mark.filterwarnings(
  "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
)

HF_CONFIG = dict(
  vocab_size=100,
  hidden_size=32,
  num_hidden_layers=2,
  num_attention_heads=2,
  intermediate_size=64,
  max_position_embeddings=64,
)
RANK, ALPHA, STEPS = 4, 8.0, 6
TOLERANCE = 1e-4


def _relative(got, want) -> float:
  """``max |got - want| / max |want|`` over every array of the two trees."""
  got = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(got)])
  want = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(want)])
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _frobenius(got, want) -> float:
  """``|got - want| / |want|`` (Frobenius) over every array of the two trees."""
  got = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(got)])
  want = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(want)])
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.fixture(scope="module")
def hf_bert(tmp_path_factory):
  """``(directory, config, variables)``: a random BertModel saved, and loaded for Flax."""
  torch.manual_seed(0)
  model = transformers.BertModel(transformers.BertConfig(**HF_CONFIG)).eval()
  directory = tmp_path_factory.mktemp("bert")
  model.save_pretrained(directory)
  config, variables = weights.load_hf(directory)
  return directory, config, variables


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  ids = rng.integers(0, HF_CONFIG["vocab_size"], (3, 9)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 6:] = 0  # padding
  return ids, mask


def _torch_bert(directory):
  return transformers.BertModel.from_pretrained(directory).eval()


def _torch_outputs(model, inputs):
  ids, mask = inputs
  with torch.no_grad():
    out = model(
      input_ids=torch.tensor(ids, dtype=torch.long),
      attention_mask=torch.tensor(mask, dtype=torch.long),
    )
  return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def _adapted(hf_bert, inputs, **options):
  """The demo's BERT with every dense layer adapted by ``adapt_linen``."""
  _, config, variables = hf_bert
  return dl.adapt_linen(
    bert.BertEncoder(config), variables, *inputs, rank=RANK, alpha=ALPHA, key=jax.random.key(1),
    **options,
  )[:2]  # fmt: skip


def _train(model, variables, inputs, tx):
  """``STEPS`` steps of ``tx`` on a squared error to random targets."""
  target = jax.random.normal(jax.random.key(2), (*inputs[0].shape, HF_CONFIG["hidden_size"]))

  def loss(variables):
    hidden, _ = model.apply(variables, *inputs)
    return jnp.mean((hidden - target) ** 2)

  # optax's Adam mixes a Python float with an int32 count, which strict dtype
  # promotion (conftest.py) refuses.
  with jax.numpy_dtype_promotion("standard"):
    state = tx.init(variables)
    for _ in range(STEPS):
      grads = jax.grad(loss)(variables)
      updates, state = tx.update(grads, state, variables)
      variables = optax.apply_updates(variables, updates)
  return variables


def test_the_loader_gives_pytorchs_outputs(hf_bert, inputs):
  directory, config, variables = hf_bert
  got = bert.BertEncoder(config).apply(variables, *inputs)
  agreement = _relative(got, _torch_outputs(_torch_bert(directory), inputs))
  print(f"\nbase BertModel, Flax vs PyTorch: {agreement:.1e}")
  assert agreement < TOLERANCE


def test_an_adapter_made_by_peft_loads_here(hf_bert, inputs, tmp_path):
  directory, config, variables = hf_bert
  model = peft.get_peft_model(
    _torch_bert(directory),
    peft.LoraConfig(
      r=RANK,
      lora_alpha=ALPHA,
      target_modules=["query", "value", "dense"],  # "dense": both outputs, the MLP, the pooler
      rank_pattern={"intermediate.dense": 2},
    ),
  )
  generator = torch.Generator().manual_seed(3)
  for module in model.modules():
    if isinstance(module, peft.tuners.lora.LoraLayer):
      weight = module.lora_B["default"].weight
      weight.data = 0.3 * torch.randn(weight.shape, generator=generator)
  model.eval()
  model.save_pretrained(tmp_path)
  want = _torch_outputs(model, inputs)
  base = bert.BertEncoder(config)
  adapter = dl.load_peft(
    tmp_path, base, *inputs, module_names=weights.hf_module_name, variables=variables
  )
  assert len(adapter["weights"]) == 2 * 5 + 1
  assert adapter["config"]["layer_0/intermediate"]["rank"] == 2
  adapted, restored, _ = dl.attach_adapter_linen(base, variables, adapter)
  got = adapted.apply(restored, *inputs)
  agreement = _relative(got, want)
  print(f"\nPEFT -> load_peft (Linen), hidden states and pooler: {agreement:.1e}")
  assert agreement < TOLERANCE
  assert _relative(base.apply(variables, *inputs), want) > 100 * TOLERANCE  # the adapter counts


@pytest.mark.parametrize("rule", ["lora", "paper"])
def test_adapters_trained_here_load_in_peft(hf_bert, inputs, tmp_path, rule):
  directory, _, variables = hf_bert
  model, start = _adapted(hf_bert, inputs, use_delta=False)
  layers = dl.adapted_layers(model, *inputs)
  # start_step beyond the run: the kernels never move, plain LoRA.
  start_step = 0 if rule == "paper" else 10**6
  tx = dl.paper_delta_lora(layers=layers, start_step=start_step, lora_optimizer=optax.adam(1e-2))
  trained = _train(model, start, inputs, tx)
  report = dl.save_peft(
    tmp_path,
    trained,
    model,
    module_names=weights.hf_module_name,
    rule=rule,
    base=variables if rule == "paper" else None,
  )
  errors = [entry["relative_error"] for entry in report["layers"].values()]
  assert len(errors) == 6 * 2 + 1 and max(errors) < 1e-5
  torch_model = peft.PeftModel.from_pretrained(_torch_bert(directory), tmp_path).eval()
  want = model.apply(trained, *inputs)
  agreement = _relative(_torch_outputs(torch_model, inputs), want)
  print(f"\nsave_peft(rule={rule!r}) -> PeftModel.from_pretrained: {agreement:.1e}")
  assert agreement < TOLERANCE
  assert _relative(model.apply(start, *inputs), want) > 100 * TOLERANCE  # training counts


def test_the_seed_rule_exports_within_its_reported_error(hf_bert, inputs, tmp_path):
  directory = hf_bert[0]
  model, start = _adapted(hf_bert, inputs, use_delta=True, delta_scaling=1.0)
  layers = dl.adapted_layers(model, *inputs)
  tx = dl.delta_lora(0.5, layers=layers, lora_optimizer=optax.adam(1e-2))
  trained = _train(model, start, inputs, tx)
  want = model.apply(trained, *inputs)
  report = dl.save_peft(
    tmp_path / "rank", trained, model, module_names=weights.hf_module_name, rule="seed",
    rank=RANK // 2, sample=inputs,
  )  # fmt: skip
  torch_model = peft.PeftModel.from_pretrained(_torch_bert(directory), tmp_path / "rank").eval()
  got = _torch_outputs(torch_model, inputs)
  measured, reported = _frobenius(got, want), report["output_error"]
  print(
    f"\nsave_peft(rule='seed', rank={RANK // 2}): PyTorch's relative output error {measured:.3e}, "
    f"reported {reported:.3e}; largest relative weight error "
    f"{max(e['relative_error'] for e in report['layers'].values()):.3e}"
  )
  assert reported > 10 * TOLERANCE  # a truncation that shows
  assert abs(measured - reported) <= 1e-3 * reported + 1e-6

  merged = dl.save_peft(
    tmp_path / "merged", trained, model, module_names=weights.hf_module_name, rule="seed",
    merged=True,
  )  # fmt: skip
  assert merged["files"] == ["model.safetensors"]
  from safetensors.torch import load_file

  torch_model = _torch_bert(directory)
  result = torch_model.load_state_dict(load_file(tmp_path / "merged" / "model.safetensors"),
                                       strict=False)  # fmt: skip
  assert not result.unexpected_keys
  assert len(torch_model.state_dict()) - len(result.missing_keys) == 2 * (6 * 2 + 1)
  agreement = _relative(_torch_outputs(torch_model, inputs), want)
  print(f"save_peft(rule='seed', merged=True) -> load_state_dict(strict=False): {agreement:.1e}")
  assert agreement < TOLERANCE


class NnxMLP(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(6, 16, rngs=rngs)
    self.down = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    return self.down(jnp.tanh(self.up(x)))


NNX_NAMES = {"up": "0", "down": "2"}  # the torch.nn.Sequential's module names


def _torch_mlp(model: NnxMLP):
  """The ``torch.nn`` MLP with the NNX model's weights."""
  mlp = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
  for name, index in NNX_NAMES.items():
    layer = getattr(model, name)
    mlp[int(index)].weight.data = torch.tensor(np.asarray(layer.kernel[...]).T.copy())
    mlp[int(index)].bias.data = torch.tensor(np.asarray(layer.bias[...]))
  return mlp.eval()


def test_an_nnx_model_trades_adapters_with_a_torch_module(tmp_path):
  x = np.asarray(jax.random.normal(jax.random.key(4), (5, 6)))
  # Here -> PEFT: factors set by hand, as if trained.
  model, _ = dl.adapt_nnx(NnxMLP(nnx.Rngs(0)), rank=2, alpha=3.0, use_delta=False,
                          rngs=nnx.Rngs(1))  # fmt: skip
  for i, name in enumerate(NNX_NAMES):
    layer = getattr(model, name)
    layer.lora_b[...] = 0.5 * jax.random.normal(jax.random.key(5 + i), layer.lora_b.shape)
  dl.save_peft(tmp_path / "out", model, module_names=NNX_NAMES)
  torch_model = peft.PeftModel.from_pretrained(_torch_mlp(NnxMLP(nnx.Rngs(0))), tmp_path / "out")
  with torch.no_grad():
    got = torch_model(torch.tensor(x)).numpy()
  out = _relative(got, model(x))
  # PEFT -> here.
  torch_model = peft.get_peft_model(
    _torch_mlp(NnxMLP(nnx.Rngs(0))), peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0", "2"])
  )
  generator = torch.Generator().manual_seed(6)
  for module in torch_model.modules():
    if isinstance(module, peft.tuners.lora.LoraLayer):
      weight = module.lora_B["default"].weight
      weight.data = 0.5 * torch.randn(weight.shape, generator=generator)
  torch_model.save_pretrained(tmp_path / "in")
  with torch.no_grad():
    want = torch_model(torch.tensor(x)).numpy()
  fresh = NnxMLP(nnx.Rngs(0))
  fresh, _ = dl.attach_adapter_nnx(
    fresh, dl.load_peft(tmp_path / "in", fresh, module_names=NNX_NAMES)
  )
  back = _relative(fresh(x), want)
  print(f"\nNNX MLP -> PEFT: {out:.1e}; PEFT -> NNX MLP: {back:.1e}")
  assert out < TOLERANCE and back < TOLERANCE
  assert _relative(NnxMLP(nnx.Rngs(0))(x), want) > 100 * TOLERANCE


def test_the_guide_section_runs(tmp_path, monkeypatch, capsys):
  import _docs

  (code,) = _docs.code_blocks("peft.md")
  monkeypatch.chdir(tmp_path)
  exec(compile(code, "peft.md", "exec"), {})
  first, second = (float(line) for line in capsys.readouterr().out.split())
  print(f"\npeft.md, MiniLM: JAX -> PyTorch {first:.1e}, PyTorch -> JAX {second:.1e} (max abs)")
  assert first < 1e-4 and second < 1e-4
