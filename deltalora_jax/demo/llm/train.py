"""The LLM demo: supervised fine-tuning of SmolLM2-135M-Instruct with several methods.

Each method of :data:`METHODS` starts from the same pretrained weights, the
same LoRA initialisation (the seed's draw) and sees the same batches. The
adapted methods adapt the model's projections in place with
:func:`deltalora_jax.adapt_nnx` (the seven ``nnx.Linear`` of each block by
default) and train with an ``nnx.Optimizer`` whose ``wrt`` filter says what
receives gradients:

* ``frozen``: no training (the pretrained model's figures);
* ``lora``: plain LoRA, AdamW on ``A``, ``B``;
* ``delta-lora``: the seed's rule (:func:`deltalora_jax.delta_lora`): AdamW on
  ``A``, ``B`` and the EMA-velocity rule on the full-size ``D``;
* ``paper``: the published rule (:func:`deltalora_jax.paper_delta_lora`),
  ``W`` follows ``lambda s`` times the change of ``A B`` after ``K`` steps, in
  its telescoped form: the layers hold ``paper_lambda`` and a snapshot
  ``(A^, B^)`` (``PaperSnapshot``, an ``nnx.LoRAParam``), the optimizer's
  ``wrt`` is ``nnx.LoRAParam`` and the base kernel is never written;
* ``lora-scaled``: plain LoRA with ``alpha`` times ``1 + lambda``, the control
  of ``paper`` (a larger LoRA scaling, no change of ``W``);
* ``full``: AdamW on every parameter.

After training, an adapted model is merged (plain ``nnx.Linear``, the
pretrained model's structure, so every method shares one compiled
evaluation); the held-out loss (mean negative log-likelihood of the answers'
tokens) and perplexity are measured in float32, greedy answers to every
held-out question are generated (KV cache, float32) and checked, and the
unmerged adapted model must predict every one of those greedy tokens (its
teacher-forced argmax on the prompt and the merged model's answer: the same
greedy tokens).

Methods whose models and optimizers have the same structure share one compiled
training step (the seeds of a method, the learning rates of a sweep: the
learning rate is a leaf of the optimizer's state, ``optax.inject_hyperparams``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import deltalora_jax as dl
from deltalora_jax.demo import report
from deltalora_jax.demo import train as demo_train
from deltalora_jax.demo.checks import check_ints
from deltalora_jax.demo.llm import data, weights
from deltalora_jax.demo.llm.model import Llama, LlamaConfig, forward, from_tensors, generate

#: The projections of a Llama block, transformers' names (and this model's).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Options:
  """Settings of an LLM demo run; the defaults fit about 5 minutes on a 2-core CPU.

  Attributes:
    model: a key of :data:`~deltalora_jax.demo.llm.weights.MODELS`.
    methods: names of :data:`METHODS`, in order.
    steps: optimizer steps per method.
    batch_size: exchanges per step.
    max_length: tokens per exchange (padded).
    rank: LoRA rank.
    alpha: LoRA alpha (None: ``rank``).
    targets: the adapted projections (names of :data:`PROJECTIONS`).
    delta_scaling: ``ds`` of the seed's rule.
    delta_lr: learning rate of the seed's delta rule.
    momentum: ``mu`` of the seed's delta rule.
    lora_lr: AdamW learning rate of the LoRA factors of ``lora`` and ``delta-lora``.
    paper_lr: AdamW learning rate of the LoRA factors of ``paper``.
    scaled_lr: AdamW learning rate of the LoRA factors of ``lora-scaled``.
    full_lr: AdamW learning rate of full fine-tuning.
    paper_lambda: ``lambda`` of the published rule (and of ``lora-scaled``).
    paper_start_step: ``K`` of the published rule.
    seed: seed of the LoRA initialisation and the batch order.
    seeds: runs per method, seeds ``seed, seed + 1, ...`` (mean and sd of the held-out loss).
    dtype: compute dtype of training, ``'float32'`` or ``'bfloat16'`` (evaluation
      and samples are always float32).
    eval_size: held-out questions scored (loss, accuracy); 0: all.
    samples: held-out questions whose greedy answers are in the results.
    new_tokens: greedy tokens generated per answer.
    progress: show progress bars.
  """

  model: str = "smollm2"
  methods: tuple[str, ...] = ("frozen", "lora", "delta-lora", "paper", "lora-scaled", "full")
  steps: int = 12
  batch_size: int = 4
  max_length: int = 48
  rank: int = 8
  alpha: float | None = None
  targets: tuple[str, ...] = PROJECTIONS
  delta_scaling: float = 0.1
  delta_lr: float = 1.0
  momentum: float = 0.9
  # Learning rates: the best of a sweep on the TRAINING split only (benchmarks/llm_lr_sweep.py,
  # benchmarks/reference/llm_lr_sweep.json: 40 training countries set aside and scored, the
  # other defaults, seed 0). Loss on those answers by rate (6.25e-5, 1.25e-4, 2.5e-4, 5e-4, 1e-3,
  # 2e-3): lora -, .487, .434, .440, .490, .641; delta-lora -, .458, .438, .460, .492, .669;
  # paper .493, .410, .426, .517, .733, 1.366; lora-scaled .448, .431, .455, .600, .783, 1.340;
  # full (1e-5, 3e-5, 1e-4, 3e-4) .569, .432, .414, .556.
  lora_lr: float = 2.5e-4
  paper_lr: float = 1.25e-4
  scaled_lr: float = 1.25e-4
  full_lr: float = 1e-4
  paper_lambda: float = 2.0
  paper_start_step: int = 4
  seed: int = 0
  seeds: int = 1
  dtype: str = "float32"
  eval_size: int = 32
  samples: int = 4
  new_tokens: int = 16
  progress: bool = True

  def __post_init__(self):
    check_ints(self, ("steps", "batch_size", "max_length", "rank", "seeds", "new_tokens"))
    check_ints(self, ("samples", "eval_size"), at_least=0)
    if self.model not in weights.MODELS:
      raise ValueError(f"model must be among {sorted(weights.MODELS)}, got model={self.model!r}")
    unknown = [m for m in self.methods if m not in METHODS]
    if unknown or not self.methods:
      raise ValueError(f"methods must be among {list(METHODS)}, got methods={self.methods}")
    bad = [t for t in self.targets if t not in PROJECTIONS]
    if bad or not self.targets:
      raise ValueError(f"targets must be among {PROJECTIONS}, got targets={self.targets}")
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype must be among {sorted(DTYPES)}, got dtype={self.dtype!r}")

  @property
  def target_pattern(self) -> str:
    """The ``targets`` of :func:`deltalora_jax.adapt_nnx`: a regex on the layer paths."""
    return rf"layers/\d+/(self_attn|mlp)/({'|'.join(self.targets)})"


#: Per model, the defaults of :class:`Options` that differ from SmolLM2's: Gemma 3 270M's
#: 262,144-token head makes a token about 2.5 times SmolLM2's work on a CPU. Gemma's
#: ``delta_lr`` is the best of a sweep on its training split (benchmarks/llm_lr_sweep.py
#: --model gemma3-270m --field delta_lr; reference/llm_lr_sweep_gemma.json): loss on the
#: set-aside answers by rate (1, 0.3, 0.1, 0.01, 0.003, 0.001) 3.23, 1.72, 1.42, 1.239,
#: 1.227, 1.223; plain LoRA 1.222. SmolLM2's 1.0 diverges on Gemma.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
  "smollm2": {},
  "gemma3-270m": {"steps": 8, "eval_size": 16, "max_length": 48, "delta_lr": 1e-3},
}


def default_options(model: str = "smollm2", **given: Any) -> Options:
  """:class:`Options` for ``model`` with its :data:`MODEL_DEFAULTS`, then ``given``."""
  if model not in MODEL_DEFAULTS:
    raise ValueError(f"model must be among {sorted(MODEL_DEFAULTS)}, got model={model!r}")
  return Options(**{"model": model, **MODEL_DEFAULTS[model], **given})


def _adamw(learning_rate: float) -> optax.GradientTransformation:
  """AdamW without weight decay; the learning rate is a leaf of its state (one compile for all)."""
  return optax.inject_hyperparams(optax.adamw)(learning_rate=learning_rate, weight_decay=0.0)


@dataclasses.dataclass(frozen=True)
class Method:
  """A fine-tuning method.

  Attributes:
    name: its name on the command line.
    description: one line for the results.
    adapter: ``options -> keyword arguments of adapt_nnx`` or None (no adapter).
    optimizer: ``(options, model) -> optax transformation`` (None: no training).
    wrt: ``(model) -> nnx filter`` of the parameters that get gradients.
    learning_rate: the field of :class:`Options` holding its (AdamW) learning rate.
  """

  name: str
  description: str
  adapter: Callable[[Options], dict[str, Any]] | None
  optimizer: Callable[[Options, nnx.Module], optax.GradientTransformation] | None
  wrt: Callable[[nnx.Module], Any]
  learning_rate: str | None = None


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
  """Adds ``method`` to :data:`METHODS` (replacing one of the same name); returns it."""
  METHODS[method.name] = method
  return method


def _lora_args(options: Options, *, use_delta: bool = False, alpha_factor: float = 1.0) -> dict:
  alpha = options.rank if options.alpha is None else options.alpha
  args = dict(rank=options.rank, alpha=alpha * alpha_factor, use_delta=use_delta)
  if use_delta:
    args["delta_scaling"] = options.delta_scaling
  return args


def _factors(model: nnx.Module) -> Any:
  """LoRA's factors and the published rule's snapshot (``PaperSnapshot``: a LoRAParam)."""
  return nnx.LoRAParam


register(Method("frozen", "the pretrained model, not trained", None, None, lambda m: nnx.Nothing))
register(
  Method(
    "lora",
    "plain LoRA (AdamW on A, B)",
    lambda o: _lora_args(o),
    lambda o, m: _adamw(o.lora_lr),
    _factors,
    "lora_lr",
  )
)
register(
  Method(
    "delta-lora",
    "the seed's Delta-LoRA: LoRA (AdamW) + full-size D with the EMA-velocity rule",
    lambda o: _lora_args(o, use_delta=True),
    lambda o, m: dl.delta_lora(o.delta_lr, o.momentum, layers=m, lora_optimizer=_adamw(o.lora_lr)),
    lambda m: nnx.Any(nnx.LoRAParam, dl.DeltaParam),
    "lora_lr",
  )
)
register(
  Method(
    "paper",
    "Delta-LoRA of Zi et al. (2023): LoRA (AdamW), W follows lambda s (change of A B) after K "
    "(telescoped: the base is never written)",
    lambda o: dict(_lora_args(o), paper_lambda=o.paper_lambda),
    lambda o, m: dl.paper_delta_lora(
      layers=m,
      lambda_=o.paper_lambda,
      start_step=o.paper_start_step,
      lora_optimizer=_adamw(o.paper_lr),
    ),
    _factors,
    "paper_lr",
  )
)
register(
  Method(
    "lora-scaled",
    "control of paper: plain LoRA with alpha times (1 + lambda)",
    lambda o: _lora_args(o, alpha_factor=1.0 + o.paper_lambda),
    lambda o, m: _adamw(o.scaled_lr),
    _factors,
    "scaled_lr",
  )
)
register(
  Method(
    "full",
    "full fine-tuning of every weight (AdamW)",
    None,
    lambda o, m: _adamw(o.full_lr),
    lambda m: nnx.Param,
    "full_lr",
  )
)


@dataclasses.dataclass
class Pretrained:
  """A model to fine-tune: sizes, float32 weights, tokenizer, chat template."""

  name: str
  config: LlamaConfig
  tensors: dict[str, np.ndarray]
  tokenizer: Any
  template: weights.ChatTemplate
  gguf: pathlib.Path
  end_of_turn: int
  pad_id: int


def load_pretrained(model: str = "smollm2", cache: str | None = None) -> Pretrained:
  """The model of ``model`` from its installed package (dequantized through the cache)."""
  path = weights.gguf_path(model, cache)
  tensors, meta = weights.cached_weights(path, cache)
  tokenizer = weights.tokenizer_from_gguf(path)
  template = weights.chat_template(meta)
  end = tokenizer.token_to_id(template.end_of_turn)
  pad = int(meta.get("tokenizer.ggml.padding_token_id", end))
  return Pretrained(
    weights.MODELS[model].name,
    LlamaConfig.from_gguf(meta),
    tensors,
    tokenizer,
    template,
    path,
    end,
    pad,
  )


def with_dtype(model: nnx.Module, dtype: Any) -> nnx.Module:
  """Sets the compute ``dtype`` of the model and its projections, in place; returns it."""
  for _, module in nnx.iter_modules(model):
    if hasattr(module, "dtype"):
      module.dtype = dtype
  return model


def copy(model: nnx.Module) -> nnx.Module:
  """A copy of ``model`` with copies of its arrays (the training step donates its inputs)."""
  model = nnx.clone(model)
  nnx.update(model, jax.tree.map(jnp.copy, nnx.state(model)))
  return model


def float32_copy(model: nnx.Module) -> nnx.Module:
  """A float32-compute copy of ``model`` (its parameters are float32 already)."""
  return with_dtype(nnx.clone(model), jnp.float32)


@jax.jit
def _nll(logits, ids, target):
  labels = ids[:, 1:]
  weight = target[:, 1:].astype(jnp.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], labels)
  return jnp.sum(nll * weight), jnp.sum(weight)


def loss_sums(model: Llama, ids, valid, target) -> tuple[jax.Array, jax.Array]:
  """``(sum of NLL, number)`` over the scored tokens (``target``) of a batch."""
  return _nll(forward(model, ids, valid), ids, target)


def _loss(model: Llama, ids, valid, target) -> jax.Array:
  total, count = loss_sums(model, ids, valid, target)
  return total / jnp.maximum(count, 1.0)


@functools.partial(jax.jit, static_argnames="graphdef")
def _eval_sums(graphdef, state, ids, valid, target):
  return loss_sums(nnx.merge(graphdef, state), ids, valid, target)


def heldout_loss(model: Llama, encoded: data.Encoded, batch: int = 32) -> float:
  """Mean NLL of the held-out answers' tokens (end of turn included), float32."""
  model = float32_copy(model)
  graphdef, state = nnx.split(model)
  n = len(encoded.ids)
  pad = (-n) % batch
  arrays = [
    np.concatenate([a, np.zeros((pad, a.shape[1]), a.dtype)])
    for a in (encoded.ids, encoded.valid, encoded.target)
  ]
  total = count = 0.0
  for i in range(0, n + pad, batch):
    s, c = _eval_sums(graphdef, state, *(a[i : i + batch] for a in arrays))
    total, count = total + float(s), count + float(c)
  return total / count


def answers(pretrained: Pretrained, model: Llama, prompts: list[list[int]], new_tokens: int):
  """Greedy completions (float32, KV cache) of ``prompts``, cut after the end-of-turn token."""
  ids, valid = data.left_padded(prompts, pretrained.pad_id)
  out = generate(float32_copy(model), ids, valid, new_tokens)
  completions = []
  for row in out.tolist():
    if pretrained.end_of_turn in row:
      row = row[: row.index(pretrained.end_of_turn) + 1]
    completions.append(row)
  return completions, out


def evaluate(pretrained, model, heldout, encoded, options) -> dict:
  """Held-out loss, perplexity, greedy answers, accuracy and samples of ``model``."""
  loss = heldout_loss(model, encoded)
  completions, raw = answers(pretrained, model, encoded.prompts, options.new_tokens)
  texts = [pretrained.tokenizer.decode(c, skip_special_tokens=True) for c in completions]
  right = [data.correct(e, t) for e, t in zip(heldout, texts, strict=True)]
  by_kind = {}
  for kind in sorted({e.kind for e in heldout}):
    scored = [r for e, r in zip(heldout, right, strict=True) if e.kind == kind]
    by_kind[kind] = float(np.mean(scored))
  samples = [
    {
      "question": heldout[i].question,
      "expected": heldout[i].fact,
      "prompt_ids": encoded.prompts[i],
      "completion_ids": completions[i],
      "completion": texts[i],
      "correct": right[i],
    }
    for i in range(min(options.samples, len(heldout)))
  ]
  return {
    "heldout_loss": loss,
    "heldout_perplexity": math.exp(loss),
    "heldout_accuracy": float(np.mean(right)),
    "heldout_accuracy_by_kind": by_kind,
    "samples": samples,
    "_raw": raw,
  }


@functools.partial(jax.jit, static_argnames="graphdef")
def _teacher_forced(graphdef, state, ids, valid):
  return jnp.argmax(forward(nnx.merge(graphdef, state), ids, valid), axis=-1)


def greedy_agreement(pretrained: Pretrained, model: Llama, prompts, tokens: np.ndarray) -> dict:
  """Whether ``model`` predicts every one of the greedy ``tokens`` (another model's answers).

  ``model`` reads each prompt followed by its answer ``tokens [n, new]`` (one
  float32 forward, no cache); an answer agrees when the argmax after each of
  its prefixes is its next token, that is when greedy decoding with ``model``
  gives the same tokens. Returns ``{'same_tokens', 'answers', 'identical'}``.
  """
  ids, valid = data.left_padded(prompts, pretrained.pad_id)
  full = np.concatenate([ids, tokens.astype(ids.dtype)], axis=1)
  full_valid = np.concatenate([valid, np.ones(tokens.shape, valid.dtype)], axis=1)
  graphdef, state = nnx.split(float32_copy(model))
  predicted = np.asarray(_teacher_forced(graphdef, state, full, full_valid))
  predicted = predicted[:, ids.shape[1] - 1 : -1]
  same = int(np.sum(np.all(predicted == tokens, axis=1)))
  return {"same_tokens": same, "answers": len(tokens), "identical": same == len(tokens)}


def make_step(graphdef, wrt):
  """The jitted training step on ``state = nnx.state((model, optimizer))``."""

  def step(state, ids, valid, target):
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(_loss, argnums=nnx.DiffState(0, wrt))(
      model, ids, valid, target
    )
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss

  return jax.jit(step, donate_argnums=0)


#: Options that leave the training step's program unchanged (the learning rates are
#: leaves of the optimizer's state): runs that differ only in these share one compile.
_NOT_IN_STEP = frozenset(
  {"methods", "seed", "seeds", "eval_size", "samples", "new_tokens", "progress"}
  | {"lora_lr", "paper_lr", "scaled_lr", "full_lr"}
)


def step_key(method: Method, options: Options, config: Any, batch) -> tuple:
  """What the compiled step of ``method`` depends on: runs with equal keys share it."""
  fields = tuple(
    (f.name, getattr(options, f.name))
    for f in dataclasses.fields(options)
    if f.name not in _NOT_IN_STEP
  )
  return (method.name, fields, config, tuple((a.shape, str(a.dtype)) for a in batch))


def build(pretrained: Pretrained, options: Options, method: Method, seed: int, base=None):
  """The model of ``method``: a copy of the pretrained one, adapted when the method says so."""
  model = copy(base) if base is not None else from_tensors(pretrained.config, pretrained.tensors)
  with_dtype(model, DTYPES[options.dtype])
  if method.adapter is not None:
    dl.adapt_nnx(model, options.target_pattern, rngs=nnx.Rngs(seed), **method.adapter(options))
  return model


def train_method(method, options, pretrained, base, train, seed, steps=None, progress=None):
  """Trains ``method`` from ``base`` with ``seed``'s LoRA draw and batch order.

  Returns ``(model, figures)``: the trained model and ``{'losses', 'times',
  'compile_seconds', 'peak_step_memory_bytes', 'trainable_params'}``. ``steps``
  (a dict) caches compiled steps by :func:`step_key` across calls.
  """
  model = build(pretrained, options, method, seed, base)
  figures: dict[str, Any] = {"losses": [], "times": [], "compile_seconds": 0.0}
  if method.optimizer is None:
    figures.update(peak_step_memory_bytes=None, trainable_params=0)
    return model, figures
  wrt = method.wrt(model)
  optimizer = nnx.Optimizer(model, method.optimizer(options, model), wrt=wrt)
  graphdef, state = nnx.split((model, optimizer))
  order = demo_train.batches(len(train.ids), options.batch_size, options.steps, seed)
  first = tuple(a[order[0]] for a in (train.ids, train.valid, train.target))
  steps = {} if steps is None else steps
  key = step_key(method, options, pretrained.config, first)
  if key not in steps:
    compile_start = time.perf_counter()
    steps[key] = make_step(graphdef, wrt).lower(state, *first).compile()
    figures["compile_seconds"] = time.perf_counter() - compile_start
  compiled = steps[key]
  figures["peak_step_memory_bytes"] = demo_train._peak_bytes(compiled)
  (state,), figures["losses"], figures["times"] = demo_train.train_steps(
    compiled,
    (state,),
    lambda i: tuple(a[order[i]] for a in (train.ids, train.valid, train.target)),
    options.steps,
    f"{method.name:>11}",
    options.progress if progress is None else progress,
  )
  model, _ = nnx.merge(graphdef, state)
  figures["trainable_params"] = int(sum(x.size for x in jax.tree.leaves(nnx.state(model, wrt))))
  return model, figures


def run_method(
  method, options, pretrained, base, train, heldout, encoded_heldout, seed, export, steps=None
):
  """Trains one method with one seed and measures it; returns its row of the results."""
  wall = time.perf_counter()
  model, figures = train_method(method, options, pretrained, base, train, seed, steps)
  times, losses = figures.pop("times"), figures["losses"]
  row: dict[str, Any] = {"method": method.name, "description": method.description, "seed": seed}
  if method.learning_rate is not None:
    row["learning_rate"] = getattr(options, method.learning_rate)
  row["compile_seconds"] = figures.pop("compile_seconds")
  row["step_seconds"] = float(sum(times))
  row["train_seconds"] = time.perf_counter() - wall  # building, compiling and the steps
  evaluated = model if method.adapter is None else dl.merge(model)
  result = evaluate(pretrained, evaluated, heldout, encoded_heldout, options)
  raw = result.pop("_raw")
  row.update(result)
  median = float(np.median(times[1:] if len(times) > 1 else times)) if times else None
  tokens = options.batch_size * options.max_length
  row.update(
    figures,
    losses=losses,
    median_step_s=median,
    tokens_per_s=None if median is None else tokens / median,
  )
  if method.adapter is not None:
    row["adapted_layers"] = len(dl.adapted_layers(model))
    row["merge_check"] = greedy_agreement(pretrained, model, encoded_heldout.prompts, raw)
  row["eval_seconds"] = time.perf_counter() - wall - row["train_seconds"]
  if method.adapter is not None and export is not None:
    export_start = time.perf_counter()
    row["peft"] = export(method.name, model)
    row["export_seconds"] = time.perf_counter() - export_start
  row["seconds"] = time.perf_counter() - wall
  return row


def peft_exporter(directory: pathlib.Path, pretrained: Pretrained, rank: int = 32):
  """The ``export`` of :func:`run`: ``directory/<method>`` for PEFT on transformers'
  ``LlamaForCausalLM`` (module names :func:`hf_module_name`); ``lora`` and
  ``lora-scaled`` exactly, ``paper`` as its rank-``2r`` change from the pretrained
  kernels (exact; the telescoped layers hold ``A^``, ``B^``: no base is needed),
  ``delta-lora`` as the rank-``rank`` truncated SVD of ``s A B + ds D``."""
  rules = {"lora": "lora", "lora-scaled": "lora", "paper": "paper", "delta-lora": "seed"}

  def export(method: str, model) -> dict:
    rule = rules[method]
    return report.save_peft_method(
      directory / method,
      rule,
      model,
      initial=None,  # the telescoped layers hold the paper rule's snapshot: no base is needed
      seed_rank=rank,
      module_names=hf_module_name,
      task_type="CAUSAL_LM",
      base_model_name_or_path=str(pretrained.gguf.parent),
    )

  return export


def hf_module_name(layer: str) -> str | None:
  """transformers' ``LlamaForCausalLM`` module of a layer of :class:`Llama`.

  Example:
    >>> hf_module_name("layers/3/self_attn/q_proj")
    'model.layers.3.self_attn.q_proj'
    >>> hf_module_name("norm") is None
    True
  """
  parts = layer.split("/")
  if len(parts) == 4 and parts[0] == "layers" and parts[3] in PROJECTIONS:
    return "model." + ".".join(parts)
  return None


def run(options: Options, pretrained: Pretrained, export=None) -> dict:
  """Runs every method (and seed) of ``options``; returns the results (JSON-ready)."""
  start = time.perf_counter()
  train_items, heldout = data.split(data.load_countries())
  tok, tmpl = pretrained.tokenizer, pretrained.template
  train_items, long_train = data.fitting(tok, tmpl, train_items, options.max_length)
  heldout, long_heldout = data.fitting(tok, tmpl, heldout, options.max_length)
  left_out = [e.question for e in long_train + long_heldout]
  heldout = heldout[: options.eval_size] if options.eval_size else heldout
  train = data.encode(tok, tmpl, train_items, options.max_length)
  encoded = data.encode(tok, tmpl, heldout, options.max_length)
  base = from_tensors(pretrained.config, pretrained.tensors)
  rows, steps, all_runs = [], {}, []
  for name in options.methods:
    seeds = range(options.seed, options.seed + (1 if name == "frozen" else options.seeds))
    runs = [
      run_method(
        METHODS[name],
        options,
        pretrained,
        base,
        train,
        heldout,
        encoded,
        s,
        export if s == options.seed else None,
        steps,
      )
      for s in seeds
    ]
    all_runs += runs
    row = runs[0]
    row["losses_by_seed"] = [r["losses"] for r in runs]
    heldout_losses = [r["heldout_loss"] for r in runs]
    row["seeds"] = [r["seed"] for r in runs]
    row["heldout_losses"] = heldout_losses
    row["heldout_loss_mean"] = float(np.mean(heldout_losses))
    row["heldout_loss_sd"] = float(np.std(heldout_losses, ddof=1)) if len(runs) > 1 else 0.0
    accuracies = [r["heldout_accuracy"] for r in runs]
    row["heldout_accuracies"] = accuracies
    row["heldout_accuracy_mean"] = float(np.mean(accuracies))
    row["heldout_accuracy_sd"] = float(np.std(accuracies, ddof=1)) if len(runs) > 1 else 0.0
    rows.append(row)
  return {
    "environment": demo_train.environment(),
    "options": {k: v for k, v in dataclasses.asdict(options).items() if k != "progress"},
    "model": pretrained.name,
    "task": "questions about countries (countryinfo): capital and UN subregion",
    "train_size": len(train_items),
    "heldout_size": len(heldout),
    "left_out_too_long": left_out,
    "seconds": time.perf_counter() - start,
    "seconds_by_part": {
      part: float(sum(r.get(f"{part}_seconds", 0.0) for r in all_runs))
      for part in ("compile", "step", "train", "eval", "export")
    },
    "methods": rows,
  }


def table(results: dict) -> str:
  """The results as a Markdown table."""
  multi = results["options"]["seeds"] > 1
  lines = [
    "| method | held-out loss | perplexity | held-out accuracy | trainable params | "
    "median step | tokens/s | merged = unmerged |",
    "|---|---:|---:|---:|---:|---:|---:|---|",
  ]
  for row in results["methods"]:
    if multi and len(row["seeds"]) > 1:
      loss = f"{row['heldout_loss_mean']:.3f} ± {row['heldout_loss_sd']:.3f}"
      acc = f"{row['heldout_accuracy_mean']:.3f} ± {row['heldout_accuracy_sd']:.3f}"
    else:
      loss, acc = f"{row['heldout_loss']:.3f}", f"{row['heldout_accuracy']:.3f}"
    check = row.get("merge_check")
    merged = "n/a"
    if check is not None:
      merged = (
        "yes" if check["identical"] else "NO"
      ) + f" ({check['same_tokens']}/{check['answers']})"
    step = row["median_step_s"]
    lines.append(
      f"| {row['method']} | {loss} | {row['heldout_perplexity']:.2f} | {acc} | "
      f"{report.count(row['trainable_params'])} | "
      f"{'n/a' if step is None else f'{1e3 * step:.0f} ms'} | "
      f"{'n/a' if step is None else format(row['tokens_per_s'], '.0f')} | {merged} |"
    )
  return "\n".join(lines)


def plot(results: dict, path: pathlib.Path) -> None:
  """Saves the learning curves and the held-out losses as a PNG."""
  figure, curves, bars = report.two_panels((9, 3.4), (1.6, 1))
  methods = results["methods"]
  runs = {row["method"]: row.get("losses_by_seed") or [row["losses"]] for row in methods}
  report.learning_curves(curves, runs, "training loss (answer tokens)")
  means = [row["heldout_loss_mean"] for row in methods]
  report.labelled_bars(bars, list(runs), means, [row["heldout_loss_sd"] for row in methods])
  bars.set(ylabel="held-out loss", title=f"Held-out loss ({results['heldout_size']} answers)")
  bars.tick_params(axis="x", labelrotation=25)
  figure.savefig(path)


def save(results: dict, output: pathlib.Path) -> dict[str, pathlib.Path]:
  """Writes ``results.json``, ``results.md`` and ``learning_curves.png`` to ``output``."""
  names = {"json": "results.json", "table": "results.md", "png": "learning_curves.png"}
  return report.write(results, output, names, table, plot)
