"""The study (``python -m deltalora_jax study``): its statistics, its choices, its resumption.

The smoke test runs the whole path on the real model and tweets (two steps, two
seeds, tiny splits), as CI does with the packages installed; without them it
skips, and fails instead under ``DELTALORA_REQUIRE_REAL=1``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib

import numpy as np
import pytest

pytest.importorskip("tokenizers")

import deltalora_jax as dl
from deltalora_jax.demo import cli, data, study, train, weights

HAS_REAL = all(
  importlib.util.find_spec(m) is not None for m in (weights.MODEL_MODULE, weights.DATA_MODULE)
)
REQUIRE_REAL = os.environ.get("DELTALORA_REQUIRE_REAL") == "1"


# ------------------------------------------------------------------ statistics
def test_macro_f1_equals_the_confusion_matrix_definition():
  rng = np.random.default_rng(0)
  targets, predictions = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
  confusion = np.zeros((3, 3))
  np.add.at(confusion, (targets, predictions), 1)
  precision = np.diag(confusion) / confusion.sum(0)
  recall = np.diag(confusion) / confusion.sum(1)
  expected = np.mean(2 * precision * recall / (precision + recall))
  assert train.macro_f1(targets, predictions, 3) == pytest.approx(expected, rel=1e-12)
  assert train.macro_f1(targets, targets, 3) == 1.0
  # A class never predicted scores 0: always answering 0 on [0, 1, 2] gives (2/3 * ... ) / 3.
  assert train.macro_f1(np.array([0, 1, 2]), np.array([0, 0, 0]), 3) == pytest.approx(
    (2 * 1 / (2 * 1 + 2)) / 3
  )


def _final(method, seed, accuracy, f1):
  return {
    "method": method,
    "settings": {"seed": seed},
    "accuracy": accuracy,
    "macro_f1": f1,
    "trainable_params": 10,
    "stored_params": 20,
    "median_step_s": 0.1 * (seed + 1),
  }


def test_summary_and_differences_by_hand():
  finals = [
    _final("a", 0, 0.80, 0.70),
    _final("a", 1, 0.82, 0.72),
    _final("a", 2, 0.84, 0.74),
    _final("b", 0, 0.70, 0.71),
    _final("b", 1, 0.71, 0.73),
    _final("b", 2, 0.75, 0.72),
  ]
  summary = study.summarize(finals, ["a", "b"])
  assert summary["a"]["accuracy"] == pytest.approx(0.82)
  assert summary["a"]["accuracy_std"] == pytest.approx(0.02)  # sample std, ddof = 1
  assert summary["b"]["accuracy_std"] == pytest.approx(np.std([0.70, 0.71, 0.75], ddof=1))
  assert summary["a"]["median_step_s"] == pytest.approx(0.2)
  assert (summary["a"]["seeds"], summary["a"]["trainable_params"]) == (3, 10)
  (pair,) = study.differences(finals, ["a", "b"])
  assert (pair["a"], pair["b"]) == ("a", "b")
  accuracy, f1 = pair["accuracy"], pair["macro_f1"]
  assert accuracy["difference"] == pytest.approx(0.82 - 0.72)
  assert accuracy["paired_std"] == pytest.approx(np.std([0.10, 0.11, 0.09], ddof=1))
  # 0.10 apart with std 0.02 and 0.026: the bars do not overlap; macro-F1's do.
  assert accuracy["separated"] and not f1["separated"]
  assert f1["difference"] == pytest.approx(0.0)


def test_validation_is_carved_from_training_disjoint_and_fixed():
  rows = [(str(i), i % 3) for i in range(50)]
  rest, validation = study.split_validation(rows, 10)
  assert len(validation) == 10 and len(rest) == 40
  assert sorted(rest + validation) == sorted(rows)
  assert study.split_validation(rows, 10) == (rest, validation)
  message = r"must be smaller than the training split \(50 tweets\), got 50"
  with pytest.raises(ValueError, match=message):
    study.split_validation(rows, 50)


@pytest.mark.parametrize(
  "field, value, match",
  [
    ("sweep_steps", 0, "sweep_steps must be a positive int, got sweep_steps=0"),
    ("test_size", -1, "test_size must be an int >= 0, got test_size=-1"),
    ("methods", ("lora", "nope"), "methods must be among"),
    ("delta_rates", (0.1, 0.0), r"delta_rates must be > 0, got delta_rates=\(0.1, 0.0\)"),
    ("paper_starts", (-1,), r"paper_starts must be ints >= 0, got paper_starts=\(-1,\)"),
    ("seeds", (1, 1), r"seeds must differ, got seeds=\(1, 1\)"),
    ("seeds", (), r"seeds must not be empty"),
  ],
)
def test_bad_options_are_refused_by_name(field, value, match):
  with pytest.raises(ValueError, match=match):
    study.StudyOptions(**{field: value})


def test_final_steps_cover_the_epochs():
  options = study.StudyOptions(epochs=1.0)
  assert study.final_steps(options, 10_710) == 670  # ceil(10,710 / 16)
  assert study.final_steps(dataclasses.replace(options, epochs=2.5), 32) == 5
  assert study.final_steps(dataclasses.replace(options, steps=3), 10_710) == 3


def test_the_cache_key_follows_every_setting():
  base = train.Options(progress=False)
  run = study.Run("sweep", "lora", base, "validation")
  sizes = {"train": 10, "validation": 5, "test": 5}
  assert run.key(sizes) == study.Run("sweep", "lora", base, "validation").key(sizes)
  assert run.key(sizes) == study.Run(
    "sweep", "lora", dataclasses.replace(base, progress=True), "validation"
  ).key(sizes)  # the progress bar changes nothing
  others = [
    study.Run("sweep", "lora", dataclasses.replace(base, lora_lr=1e-3), "validation"),
    study.Run("sweep", "lora", dataclasses.replace(base, seed=1), "validation"),
    study.Run("final", "lora", base, "validation"),
    study.Run("sweep", "lora", base, "test"),
  ]
  keys = {run.key(sizes)} | {o.key(sizes) for o in others} | {run.key(sizes | {"train": 11})}
  assert len(keys) == 6


def test_the_cache_key_follows_the_code(tmp_path, monkeypatch):
  package = pathlib.Path(study.__file__).parents[1]
  for name in study.STUDY_CODE:  # a copy of the code that produces the numbers
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_bytes((package / name).read_bytes())
  today = study.code_version(tmp_path)
  assert today == study.code_version() and today.startswith(dl.__version__ + "-")
  core = tmp_path / "core.py"
  core.write_text(core.read_text() + "\n# a changed line\n")
  changed = study.code_version(tmp_path)
  monkeypatch.setattr(dl, "__version__", "9.9.9")
  assert len({today, changed, study.code_version()}) == 3
  run = study.Run("sweep", "lora", train.Options(progress=False), "validation")
  sizes = {"train": 10, "validation": 5, "test": 5}
  assert len({run.key(sizes, today), run.key(sizes, changed), run.key(sizes)}) == 3


def test_command_line_flags(capsys):
  from deltalora_jax.__main__ import main

  args = cli.study_parser().parse_args(
    ["--seeds", "3,4", "--lora-lrs", "1e-4,2e-4", "--paper-starts", "0,5", "--steps", "2"]
  )
  assert (args.seeds, args.lora_lrs, args.paper_starts, args.steps) == (
    (3, 4),
    (1e-4, 2e-4),
    (0, 5),
    2,
  )
  # Every option but the sweeps' seed has its flag, and the flags reach the options.
  names = {f.name for f in dataclasses.fields(study.StudyOptions)} - {"demo", "sweep_seed"}
  assert set(cli._fields(args, study.StudyOptions)) == names
  demo = cli.parser().parse_args(["--lora-lr", "0.5", "--seed", "3"])
  options = train.Options(**cli._fields(demo, train.Options))
  assert (options.lora_lr, options.seed, options.steps) == (0.5, 3, train.Options().steps)
  with pytest.raises(SystemExit):
    cli.study_parser().parse_args(["--seeds", "a,b"])
  assert "expected comma-separated ints, got 'a,b'" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cli.study_main(["--seeds", "1,1"])
  assert "seeds must differ" in capsys.readouterr().err
  assert main(["--help"]) == 0
  assert "study" in capsys.readouterr().out


# ------------------------------------------------------------------ smoke test
@pytest.fixture(scope="module")
def real():
  if not HAS_REAL:
    message = f"the model or data package is not installed: {weights.install_line()}"
    if REQUIRE_REAL:
      pytest.fail(f"DELTALORA_REQUIRE_REAL=1 and {message}")
    pytest.skip(message)
  train_rows, test_rows = data.split(data.load_corpus())
  return train.load_pretrained(max_length=8), train_rows, test_rows


SMOKE = study.StudyOptions(
  methods=("frozen", "lora", "delta-lora", "paper", "full"),
  seeds=(0, 1),
  steps=2,
  sweep_steps=2,
  validation_size=16,
  train_size=48,
  test_size=24,
  lora_lrs=(1e-3, 3e-3),
  delta_rates=(0.5,),
  delta_scalings=(0.1, 1.0),
  paper_lambdas=(2.0,),
  paper_starts=(0,),
  demo=train.Options(max_length=8, batch_size=4, rank=2, progress=False),
)


@pytest.fixture(scope="module")
def smoke(real, tmp_path_factory):
  pretrained, train_rows, test_rows = real
  cache = tmp_path_factory.mktemp("cache")
  results = study.run(SMOKE, pretrained, train_rows, test_rows, cache, progress=False)
  return results, cache


def test_smoke_runs_every_stage_and_chooses_the_best(smoke):
  results, _ = smoke
  assert results["sizes"] == {"train": 48, "validation": 16, "test": 24}
  assert results["steps"] == 2 and results["trained_runs"] == 2 + 2 + 1 + 2 * 5
  sweeps = results["sweeps"]
  assert [r["method"] for r in sweeps] == ["lora"] * 2 + ["delta-lora"] * 2 + ["paper"]
  assert {r["data"] for r in sweeps} == {"validation"}
  lora = max(sweeps[:2], key=lambda r: (r["accuracy"], r["macro_f1"]))
  chosen = results["chosen"]
  assert chosen["lora"]["lora_lr"] == lora["settings"]["lora_lr"]
  for row in sweeps[2:]:
    assert row["settings"]["lora_lr"] == lora["settings"]["lora_lr"]  # the rules build on it
  seed_rule = max(sweeps[2:4], key=lambda r: (r["accuracy"], r["macro_f1"]))
  assert chosen["delta-lora"]["delta_scaling"] == seed_rule["settings"]["delta_scaling"]
  assert chosen["delta-lora"]["steps"] == 2
  finals = results["finals"]
  assert [(r["method"], r["settings"]["seed"]) for r in finals] == [
    (m, s) for s in (0, 1) for m in SMOKE.methods
  ]
  assert {r["data"] for r in finals} == {"test"}
  for method in SMOKE.methods:
    scores = [r["accuracy"] for r in finals if r["method"] == method]
    assert results["summary"][method]["accuracy"] == pytest.approx(np.mean(scores))
  assert len(results["differences"]) == 10
  assert results["environment"]["cpu_model"]


def test_only_eta_moves_the_seed_rule(smoke):
  """``delta_lr`` and ``delta_scaling`` at the same ``eta = delta_lr ds^2`` train alike."""
  results, _ = smoke
  small, large = (r for r in results["sweeps"] if r["method"] == "delta-lora")
  assert small["settings"]["delta_lr"] == pytest.approx(50.0)  # 0.5 / 0.1^2
  assert large["settings"]["delta_lr"] == pytest.approx(0.5)
  assert small["final_train_loss"] == pytest.approx(large["final_train_loss"], rel=1e-5)
  assert small["accuracy"] == large["accuracy"]


def test_a_study_started_again_trains_only_what_is_missing(smoke, real):
  results, cache = smoke
  pretrained, train_rows, test_rows = real
  again = study.run(SMOKE, pretrained, train_rows, test_rows, cache, progress=False)
  assert again["trained_runs"] == 0
  assert again["finals"] == results["finals"] and again["sweeps"] == results["sweeps"]
  victim = sorted(cache.glob("final-paper-*.json"))[0]
  kept = json.loads(victim.read_text())
  victim.unlink()  # as if the study had been killed during this run
  resumed = study.run(SMOKE, pretrained, train_rows, test_rows, cache, progress=False)
  assert resumed["trained_runs"] == 1
  retrained = json.loads(victim.read_text())
  timing = ("seconds", "median_step_s")
  assert {k: v for k, v in retrained.items() if k not in timing} == {
    k: v for k, v in kept.items() if k not in timing
  }  # the same run gives the same result
  assert not list(cache.glob("*.partial"))


def test_save_writes_json_markdown_and_plot(smoke, tmp_path):
  results, _ = smoke
  paths = study.save(results, tmp_path)
  assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(results))
  text = paths["table"].read_text()
  for method, s in results["summary"].items():
    assert f"| {method} | {s['accuracy']:.3f} +- {s['accuracy_std']:.3f} |" in text
  assert text.count("| delta-lora | lora_lr") == 2  # the two sweep rows
  assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------- committed run
def test_the_committed_study_agrees_with_its_tables_and_the_readme():
  """docs/study.md is what study.markdown writes from docs/study.json; the README quotes it."""
  docs = pathlib.Path(__file__).parents[1] / "docs"
  results = json.loads((docs / "study.json").read_text())
  assert (docs / "study.md").read_text() == study.markdown(results) + "\n"
  assert results["sizes"]["test"] == 2928 and len(results["options"]["seeds"]) >= 3
  assert results["steps"] * results["options"]["demo"]["batch_size"] >= results["sizes"]["train"]
  readme = (docs.parent / "README.md").read_text()
  for method, s in results["summary"].items():
    row = (
      f"| {method} | {s['accuracy']:.3f} +- {s['accuracy_std']:.3f} | "
      f"{s['macro_f1']:.3f} +- {s['macro_f1_std']:.3f} |"
    )
    assert row in readme, row
