"""docs/guides/tunix.md runs as written (its blocks, in the tunix environment)."""

import _docs
import numpy as np


def test_the_guide_adapts_trains_and_merges_a_qwen3(capsys):
  (code,) = _docs.code_blocks("tunix.md", "Adapt, train, merge")
  ns = _docs.run(code, {}, "tunix-guide")
  out = capsys.readouterr().out.split("\n")
  assert out[:3] == ["15 {}", "(16, 2, 8)", "Qwen3"]
  start = ns["loss_fn"](ns["qwen3"].Qwen3(ns["config"], rngs=ns["nnx"].Rngs(0)))
  assert float(ns["loss_fn"](ns["model"])) < 0.99 * float(start)  # it trained
  np.testing.assert_allclose(ns["loss_fn"](ns["merged"]), ns["loss_fn"](ns["model"]), rtol=1e-5)


def test_the_guide_teaches_a_kind_in_a_few_lines(capsys):
  (adapt,) = _docs.code_blocks("tunix.md", "Adapt, train, merge")
  ns = _docs.run(adapt, {}, "tunix-guide")
  (code,) = _docs.code_blocks("tunix.md", "A kind the library does not know")
  ns = _docs.run(code, ns, "tunix-guide-kind")
  assert capsys.readouterr().out.split("\n")[-2] == "['down', 'up'] (8, 16)"
  net = ns["net"]
  x = np.ones((3, 8), np.float32)
  merged = ns["dl"].merge(net)
  assert type(merged.up).__name__ == "Projection"
  np.testing.assert_allclose(merged.up(x), net.up(x), rtol=1e-6)
