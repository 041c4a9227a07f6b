"""The README's quickstart runs as written and trains."""

import pathlib
import re

import jax

README = pathlib.Path(__file__).parents[1] / "README.md"


def test_quickstart_runs_and_loss_falls(capsys):
  text = README.read_text()
  section = text.split("## Quickstart", 1)[1]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  namespace = {}
  # A user runs with JAX's default (standard) dtype promotion; optax.adam's bias
  # correction mixes a float with its int32 count, which strict mode refuses.
  with jax.numpy_dtype_promotion("standard"):
    exec(compile(code, "README-quickstart", "exec"), namespace)
  assert float(namespace["loss"]) < 0.2  # starts near 1.0
  assert "delta" not in namespace["merged"]
  assert "loss after 200 steps" in capsys.readouterr().out
