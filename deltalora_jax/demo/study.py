"""The study: which rule, at which settings, with error bars.

``python -m deltalora_jax study`` runs on the demo's task (MiniLM-L6, airline
tweets, the same five methods of :mod:`deltalora_jax.demo.train`):

1. **Sweeps** on a validation split carved from the training split (short
   runs, one seed): LoRA's learning rate; then, with that rate, the seed rule's
   ``delta_lr`` x ``delta_scaling`` and the paper rule's ``lambda`` x ``K``.
   Each method's setting is the one with the best validation accuracy.
2. **Final runs**: every method at its chosen setting, for each seed, over
   ``epochs`` of the rest of the training split, scored on the whole test
   split: mean and standard deviation over seeds of accuracy and macro-F1,
   trainable and stored parameters, median step time.

The seed rule's ``delta_lr`` is swept through the rate it gives the effective
weight, ``eta = delta_lr * delta_scaling**2`` (D moves ``W + ds D`` like SGD
with momentum at rate ``eta``; see :func:`deltalora_jax.delta_lora`): the
grid is ``delta_rates`` x ``delta_scalings`` with ``delta_lr = eta / ds**2``,
so the runs that share an ``eta`` show whether ``ds`` matters apart from it.

Every run is saved to ``cache/<stage>-<method>-<hash>.json`` as it ends; a
study started again with the same options reads the runs it has and trains
only the rest, so a killed study continues where it stopped. The hash covers
the run's options, the data sizes and the code that produces the numbers
(:func:`code_version`: the package's version and the text of
:data:`STUDY_CODE`), so a run cached by older code is trained again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

import deltalora_jax as dl
from deltalora_jax.demo import data, report, train
from deltalora_jax.demo.checks import check_ints

STAGES = ("sweep", "final")

#: The files, relative to the package, whose code produces a run's numbers: the library's
#: layers, optimizers, merge and figures, and the demo's model, data, training and rows.
STUDY_CODE = (
  "config.py",
  "core.py",
  "linen.py",
  "optim.py",
  "paper.py",
  "paths.py",
  "pretrained.py",
  "projections.py",
  "tree.py",
  "demo/bert.py",
  "demo/data.py",
  "demo/study.py",
  "demo/train.py",
  "demo/weights.py",
)


def code_version(root: pathlib.Path | None = None) -> str:
  """``'<package version>-<hash>'``, the hash of the text of :data:`STUDY_CODE` under ``root``.

  ``root`` defaults to the installed package; a cached run with another code version is
  not read.
  """
  root = pathlib.Path(__file__).parents[1] if root is None else root
  digest = hashlib.sha256()
  for name in STUDY_CODE:
    digest.update(name.encode() + b"\0" + (root / name).read_bytes() + b"\0")
  return f"{dl.__version__}-{digest.hexdigest()[:16]}"


@dataclasses.dataclass(frozen=True)
class StudyOptions:
  """Settings of a study; the defaults took about 70 minutes on a 2-core CPU.

  Attributes:
    methods: names of :data:`~deltalora_jax.demo.train.METHODS` in the final runs.
    seeds: seeds of the final runs (initialisation and batch order).
    epochs: passes over the training split (without the validation split) of
      each final run.
    steps: steps of each final run instead of ``epochs`` (0: from ``epochs``).
    sweep_steps: steps of each sweep run.
    sweep_seed: the seed of the sweep runs.
    validation_size: tweets carved from the training split to choose settings.
    train_size: training tweets used (0: all but the validation split).
    test_size: test tweets scored (0: the whole test split).
    lora_lrs: LoRA's learning rates swept (every adapted method uses the chosen one).
    delta_rates: the seed rule's ``eta = delta_lr * delta_scaling**2`` swept.
    delta_scalings: the seed rule's ``delta_scaling`` swept.
    paper_lambdas: the paper rule's ``lambda`` swept.
    paper_starts: the paper rule's ``K`` swept.
    demo: the demo's options for everything not swept (batch size, length, rank,
      head and full fine-tuning rates, momentum).
  """

  methods: tuple[str, ...] = ("frozen", "lora", "delta-lora", "paper", "full")
  seeds: tuple[int, ...] = (0, 1, 2)
  epochs: float = 1.0
  steps: int = 0
  sweep_steps: int = 120
  sweep_seed: int = 0
  validation_size: int = 1000
  train_size: int = 0
  test_size: int = 0
  lora_lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3)
  delta_rates: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)
  delta_scalings: tuple[float, ...] = (0.1, 1.0)
  paper_lambdas: tuple[float, ...] = (0.5, 2.0)
  paper_starts: tuple[int, ...] = (0, 40)
  demo: train.Options = dataclasses.field(default_factory=lambda: train.Options(progress=False))

  def __post_init__(self):
    check_ints(self, ("sweep_steps", "validation_size"))
    check_ints(self, ("steps", "train_size", "test_size"), at_least=0)
    if not (self.epochs > 0 or self.steps):
      raise ValueError(f"epochs must be > 0 when steps is 0, got epochs={self.epochs!r}")
    unknown = [m for m in self.methods if m not in train.METHODS]
    if unknown or not self.methods:
      raise ValueError(f"methods must be among {sorted(train.METHODS)}, got methods={self.methods}")
    for name in ("seeds", "lora_lrs", "delta_rates", "delta_scalings", "paper_lambdas"):
      if not getattr(self, name):
        raise ValueError(f"{name} must not be empty, got {name}={getattr(self, name)!r}")
    for name in ("lora_lrs", "delta_rates", "delta_scalings"):
      bad = [v for v in getattr(self, name) if not v > 0]
      if bad:
        raise ValueError(f"{name} must be > 0, got {name}={getattr(self, name)!r}")
    bad_starts = [k for k in self.paper_starts if not isinstance(k, int) or k < 0]
    if bad_starts or not self.paper_starts:
      raise ValueError(f"paper_starts must be ints >= 0, got paper_starts={self.paper_starts!r}")
    if len(set(self.seeds)) != len(self.seeds):
      raise ValueError(f"seeds must differ, got seeds={self.seeds!r}")


def split_validation(
  rows: Sequence[tuple[str, int]], size: int
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
  """``(train, validation)``: ``size`` rows carved from ``rows`` by a fixed seeded shuffle."""
  if size >= len(rows):
    raise ValueError(
      f"validation_size must be smaller than the training split ({len(rows)} tweets), got {size}"
    )
  order = np.random.default_rng(data.SPLIT_SEED + 1).permutation(len(rows))
  return [rows[i] for i in order[size:]], [rows[i] for i in order[:size]]


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of the study: a method, its settings and its data."""

  stage: str
  method: str
  options: train.Options
  data: str  # 'validation' or 'test': the split it is scored on

  def settings(self) -> dict:
    """The options this run's method depends on (what the tables show)."""
    o = self.options
    common = {"steps": o.steps, "seed": o.seed}
    if self.method == "frozen":
      return common | {"head_lr": o.head_lr}
    if self.method == "full":
      return common | {"full_lr": o.full_lr}
    adapted = common | {"lora_lr": o.lora_lr}
    if self.method == "delta-lora":
      return adapted | {
        "delta_lr": o.delta_lr,
        "delta_scaling": o.delta_scaling,
        "eta": o.delta_lr * o.delta_scaling**2,
      }
    if self.method == "paper":
      return adapted | {"paper_lambda": o.paper_lambda, "paper_start_step": o.paper_start_step}
    return adapted

  def key(self, sizes: dict, code: str | None = None) -> str:
    """The cache file's name: stage, method and a hash of everything that changes the result.

    ``code`` is the :func:`code_version` (None: the installed code's).
    """
    options = dataclasses.asdict(self.options)
    del options["progress"]
    code = code_version() if code is None else code
    blob = json.dumps([self.stage, self.method, self.data, options, sizes, code], sort_keys=True)
    return f"{self.stage}-{self.method}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def _best(rows: list[dict]) -> dict:
  """The row with the best validation accuracy (then macro-F1; the first on a tie)."""
  return max(rows, key=lambda r: (r["accuracy"], r["macro_f1"]))


def _sweep_runs(options: StudyOptions, lora_lr: float | None) -> list[Run]:
  """The sweep's runs; without ``lora_lr`` only LoRA's, else the two rules' at that rate."""
  base = dataclasses.replace(
    options.demo, steps=options.sweep_steps, seed=options.sweep_seed, progress=False
  )
  if lora_lr is None:
    return [
      Run("sweep", "lora", dataclasses.replace(base, methods=("lora",), lora_lr=lr), "validation")
      for lr in options.lora_lrs
    ]
  runs = []
  if "delta-lora" in options.methods:
    runs += [
      Run(
        "sweep",
        "delta-lora",
        dataclasses.replace(
          base, methods=("delta-lora",), lora_lr=lora_lr, delta_lr=eta / ds**2, delta_scaling=ds
        ),
        "validation",
      )
      for ds in options.delta_scalings
      for eta in options.delta_rates
    ]
  if "paper" in options.methods:
    runs += [
      Run(
        "sweep",
        "paper",
        dataclasses.replace(
          base, methods=("paper",), lora_lr=lora_lr, paper_lambda=lam, paper_start_step=k
        ),
        "validation",
      )
      for lam in options.paper_lambdas
      for k in options.paper_starts
    ]
  return runs


def _final_runs(options: StudyOptions, chosen: dict[str, train.Options], steps: int) -> list[Run]:
  return [
    Run(
      "final",
      method,
      dataclasses.replace(chosen[method], methods=(method,), steps=steps, seed=seed),
      "test",
    )
    for seed in options.seeds
    for method in options.methods
  ]


class _Runner:
  """Trains runs (or reads them from the cache), with one progress bar over all of them."""

  def __init__(self, pretrained, encoded: dict, cache: pathlib.Path, total: int, progress: bool):
    from tqdm.auto import tqdm

    self.pretrained, self.encoded, self.cache = pretrained, encoded, cache
    self.sizes = {name: len(split[0]) for name, split in encoded.items()}
    self.code = code_version()
    self.progress = progress
    self.bar = tqdm(
      total=total, desc="study runs", disable=not progress, file=sys.stderr, position=0
    )
    self.trained = 0

  def __call__(self, run: Run) -> dict:
    path = self.cache / f"{run.key(self.sizes, self.code)}.json"
    if path.exists():
      row = json.loads(path.read_text())
    else:
      options = dataclasses.replace(run.options, progress=self.progress)
      train_split, scored = self.encoded["train"], self.encoded[run.data]
      with jax.numpy_dtype_promotion("standard"):
        result = train.run_method(
          train.METHODS[run.method], options, self.pretrained, train_split, scored
        )
      row = {
        "stage": run.stage,
        "method": run.method,
        "data": run.data,
        "settings": run.settings(),
        "accuracy": result["test_accuracy"],
        "macro_f1": result["test_macro_f1"],
        "trainable_params": result["trainable_params"],
        "stored_params": result["stored_params"],
        "median_step_s": result["median_step_s"],
        "final_train_loss": float(np.mean(result["losses"][-50:])),
        "seconds": result["seconds"],
      }
      self.cache.mkdir(parents=True, exist_ok=True)
      partial = path.with_suffix(".partial")
      partial.write_text(json.dumps(row, indent=1))
      partial.replace(path)  # a run killed while writing leaves no half file
      self.trained += 1
    self.bar.update()
    self.bar.set_postfix_str(f"{run.method} {run.data} acc {row['accuracy']:.3f}")
    return row


def final_steps(options: StudyOptions, train_size: int) -> int:
  """Steps of a final run: ``steps``, else ``epochs`` of ``train_size`` tweets (rounded up)."""
  if options.steps:
    return options.steps
  return math.ceil(options.epochs * train_size / options.demo.batch_size)


def run(
  options: StudyOptions,
  pretrained: train.Pretrained,
  train_rows: Sequence[tuple[str, int]],
  test_rows: Sequence[tuple[str, int]],
  cache: pathlib.Path,
  progress: bool = True,
) -> dict:
  """Runs the sweeps and the final runs (reading finished runs from ``cache``); the results.

  Returns:
    A JSON-ready dict: ``environment``, ``options``, ``sizes`` (train,
    validation, test tweets), ``steps`` (of a final run), ``sweeps`` (every
    sweep run), ``chosen`` (each method's settings), ``finals`` (every final
    run), ``summary`` (per method: mean and standard deviation over seeds),
    ``differences`` (every pair of methods), ``majority_accuracy``,
    ``trained_runs`` (runs trained by this call, not read from the cache)
    and ``seconds``.
  """
  start = time.perf_counter()
  rows, validation_rows = split_validation(train_rows, options.validation_size)
  if options.train_size:
    rows = rows[: options.train_size]
  if options.test_size:
    test_rows = test_rows[: options.test_size]
  encoded = {
    "train": train.encode_rows(pretrained.tokenizer, rows),
    "validation": train.encode_rows(pretrained.tokenizer, validation_rows),
    "test": train.encode_rows(pretrained.tokenizer, test_rows),
  }
  steps = final_steps(options, len(rows))
  adapted = [m for m in ("lora", "delta-lora", "paper") if m in options.methods]
  n_sweeps = (
    (len(options.lora_lrs) if adapted else 0)
    + len(options.delta_rates) * len(options.delta_scalings) * ("delta-lora" in adapted)
    + len(options.paper_lambdas) * len(options.paper_starts) * ("paper" in adapted)
  )
  runner = _Runner(
    pretrained,
    encoded,
    cache,
    n_sweeps + len(options.seeds) * len(options.methods),
    progress,
  )
  chosen = {m: options.demo for m in options.methods}
  sweeps: list[dict] = []
  if adapted:
    lora_runs = _sweep_runs(options, None)
    lora_rows = [runner(r) for r in lora_runs]
    lora_lr = lora_runs[lora_rows.index(_best(lora_rows))].options.lora_lr
    rule_runs = _sweep_runs(options, lora_lr)
    rule_rows = [runner(r) for r in rule_runs]
    sweeps = lora_rows + rule_rows
    chosen["lora"] = dataclasses.replace(options.demo, lora_lr=lora_lr)
    pairs = list(zip(rule_runs, rule_rows, strict=True))
    for method in ("delta-lora", "paper"):
      candidates = [(r, row) for r, row in pairs if r.method == method]
      if candidates:
        best = _best([row for _, row in candidates])
        chosen[method] = next(r.options for r, row in candidates if row is best)
  finals = [runner(r) for r in _final_runs(options, chosen, steps)]
  runner.bar.close()
  counts = np.bincount(encoded["test"][2], minlength=len(data.LABELS))
  summary = summarize(finals, options.methods)
  chosen_settings = {
    m: Run("final", m, dataclasses.replace(chosen[m], steps=steps), "test").settings()
    for m in options.methods
  }
  for settings in chosen_settings.values():
    del settings["seed"]
  return {
    "environment": train.environment() | {"cpu_model": cpu_model()},
    "options": _jsonable(dataclasses.asdict(options)),
    "model": pretrained.name,
    "sizes": {name: len(split[0]) for name, split in encoded.items()},
    "steps": steps,
    "majority_accuracy": float(counts.max() / counts.sum()),
    "sweeps": sweeps,
    "chosen": chosen_settings,
    "finals": finals,
    "summary": summary,
    "differences": differences(finals, options.methods),
    "trained_runs": runner.trained,
    "seconds": time.perf_counter() - start,
  }


def _jsonable(value: Any) -> Any:
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items() if k != "progress"}
  if isinstance(value, (tuple, list)):
    return [_jsonable(v) for v in value]
  return value


def cpu_model() -> str:
  """The CPU's model name (``/proc/cpuinfo`` on Linux, else :func:`platform.processor`)."""
  import platform

  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def summarize(finals: list[dict], methods: Sequence[str]) -> dict[str, dict]:
  """Per method: mean and sample standard deviation over seeds, parameters, median step time."""
  summary = {}
  for method in methods:
    rows = [r for r in finals if r["method"] == method]
    accuracy, accuracy_std = _mean_std([r["accuracy"] for r in rows])
    f1, f1_std = _mean_std([r["macro_f1"] for r in rows])
    summary[method] = {
      "seeds": len(rows),
      "accuracy": accuracy,
      "accuracy_std": accuracy_std,
      "macro_f1": f1,
      "macro_f1_std": f1_std,
      "trainable_params": rows[0]["trainable_params"],
      "stored_params": rows[0]["stored_params"],
      "median_step_s": float(np.median([r["median_step_s"] for r in rows])),
    }
  return summary


def differences(finals: list[dict], methods: Sequence[str]) -> list[dict]:
  """Every pair ``a - b`` of methods: the difference of mean accuracy and macro-F1 over seeds.

  ``separated`` is True when the two methods' error bars (mean +- one standard
  deviation over seeds) do not overlap, for accuracy and for macro-F1.
  ``paired_std`` is the standard deviation over seeds of the per-seed
  difference (the two runs of a seed share their start and their batches).
  """
  by = {m: {r["settings"]["seed"]: r for r in finals if r["method"] == m} for m in methods}
  pairs = []
  for i, a in enumerate(methods):
    for b in methods[i + 1 :]:
      seeds = sorted(set(by[a]) & set(by[b]))
      entry: dict[str, Any] = {"a": a, "b": b}
      for metric in ("accuracy", "macro_f1"):
        diff = [by[a][s][metric] - by[b][s][metric] for s in seeds]
        mean_a, std_a = _mean_std([by[a][s][metric] for s in seeds])
        mean_b, std_b = _mean_std([by[b][s][metric] for s in seeds])
        mean, std = _mean_std(diff)
        entry[metric] = {
          "difference": mean,
          "paired_std": std,
          "separated": bool(abs(mean_a - mean_b) > std_a + std_b),
        }
      pairs.append(entry)
  return pairs


def _setting(settings: dict) -> str:
  shown = {k: v for k, v in settings.items() if k not in ("steps", "seed")}
  return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())


def markdown(results: dict) -> str:
  """The study as Markdown: machine, sizes, chosen settings, final table, differences, sweeps."""
  env, sizes = results["environment"], results["sizes"]
  lines = [
    "# Study: which rule, at which settings",
    "",
    f"{results['model']} on airline-tweet sentiment; {env['date']}, {env['cpu_model']} "
    f"({env['cpu_count']} cores), Python {env['python']}, jax {env['jax']}, flax {env['flax']}, "
    f"optax {env['optax']}, deltalora_jax {env['deltalora_jax']}. "
    f"{sizes['train']} training tweets, {sizes['validation']} validation tweets (carved from the "
    f"training split), {sizes['test']} test tweets (majority class "
    f"{results['majority_accuracy']:.3f}). Final runs: {results['steps']} steps of "
    f"{results['options']['demo']['batch_size']} tweets per method and seed, seeds "
    f"{results['options']['seeds']}. {results['seconds'] / 60:.0f} minutes for the "
    f"{results['trained_runs']} runs trained by the last call.",
    "",
    "## Final runs (test split, mean +- standard deviation over seeds)",
    "",
    "| method | accuracy | macro-F1 | trainable params | stored params | median step | setting |",
    "|---|---:|---:|---:|---:|---:|---|",
  ]
  for method, s in results["summary"].items():
    lines.append(
      f"| {method} | {s['accuracy']:.3f} +- {s['accuracy_std']:.3f} | {s['macro_f1']:.3f} +- "
      f"{s['macro_f1_std']:.3f} | {report.count(s['trainable_params'])} | "
      f"{report.count(s['stored_params'])} | {1e3 * s['median_step_s']:.0f} ms | "
      f"{_setting(results['chosen'][method])} |"
    )
  lines += [
    "",
    "## Differences (a - b; separated: the error bars do not overlap)",
    "",
    "| a | b | accuracy | separated | macro-F1 | separated |",
    "|---|---|---:|---|---:|---|",
  ]
  for d in results["differences"]:
    acc, f1 = d["accuracy"], d["macro_f1"]
    lines.append(
      f"| {d['a']} | {d['b']} | {acc['difference']:+.3f} (paired std {acc['paired_std']:.3f}) | "
      f"{'yes' if acc['separated'] else 'no'} | {f1['difference']:+.3f} (paired std "
      f"{f1['paired_std']:.3f}) | {'yes' if f1['separated'] else 'no'} |"
    )
  lines += [
    "",
    "## Sweeps (validation split, one seed, short runs)",
    "",
    "| method | setting | accuracy | macro-F1 | final train loss |",
    "|---|---|---:|---:|---:|",
  ]
  for row in results["sweeps"]:
    lines.append(
      f"| {row['method']} | {_setting(row['settings'])} | {row['accuracy']:.3f} | "
      f"{row['macro_f1']:.3f} | {row['final_train_loss']:.3f} |"
    )
  return "\n".join(lines)


def plot(results: dict, path: pathlib.Path) -> None:
  """Test accuracy and macro-F1 with error bars; the seed rule's sweep against ``eta``."""
  figure, bars, sweep = report.two_panels((10, 3.6), (1.4, 1))
  methods = list(results["summary"])
  x = np.arange(len(methods))
  for offset, metric, label in ((-0.2, "accuracy", "accuracy"), (0.2, "macro_f1", "macro-F1")):
    means = [results["summary"][m][metric] for m in methods]
    stds = [results["summary"][m][f"{metric}_std"] for m in methods]
    bars.bar(x + offset, means, 0.4, yerr=stds, capsize=4, label=label)
  bars.axhline(results["majority_accuracy"], color="gray", linestyle="--", label="majority class")
  bars.set_xticks(x, methods)
  scores = [results["summary"][m][k] for m in methods for k in ("accuracy", "macro_f1")]
  low = min(*scores, results["majority_accuracy"]) - 0.03
  bars.set(ylim=(max(0.0, low), min(1.0, max(scores) + 0.08)), ylabel="test score")
  bars.set_title(
    f"Test split ({results['sizes']['test']} tweets), "
    f"{len(results['options']['seeds'])} seeds, mean \u00b1 std"
  )
  bars.legend(loc="upper center", ncol=3)
  seed_rows = [r for r in results["sweeps"] if r["method"] == "delta-lora"]
  scalings = sorted({r["settings"]["delta_scaling"] for r in seed_rows})
  for i, ds in enumerate(scalings):
    points = sorted(
      (r["settings"]["eta"], r["accuracy"])
      for r in seed_rows
      if r["settings"]["delta_scaling"] == ds
    )
    style = {"marker": "ox+"[i % 3], "markersize": 10 - 3 * (i % 3), "fillstyle": "none"}
    sweep.plot(*zip(*points, strict=True), **style, label=f"delta-lora, ds = {ds:g}")
  lora_rows = [r for r in results["sweeps"] if r["method"] == "lora"]
  if lora_rows:
    sweep.axhline(_best(lora_rows)["accuracy"], color="C2", linestyle=":", label="best lora")
  sweep.set(
    xscale="log",
    xlabel="eta = delta_lr * delta_scaling^2",
    ylabel="validation accuracy",
    title="The seed rule's sweep",
  )
  sweep.legend(loc="lower left")
  sweep.grid(alpha=0.3)
  figure.savefig(path)


def save(results: dict, output: pathlib.Path) -> dict[str, pathlib.Path]:
  """Writes ``study.json``, ``study.md`` and ``study.png`` to ``output``."""
  names = {"json": "study.json", "table": "study.md", "png": "study.png"}
  return report.write(results, output, names, markdown, plot)
