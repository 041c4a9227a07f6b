"""``python -m deltalora_jax demo|study|llm [flags]``: the demos and the study (``--help``)."""

from __future__ import annotations

import sys

USAGE = "usage: python -m deltalora_jax {demo,study,llm} [--help] [flags]"


def main(argv: list[str] | None = None) -> int:
  """Dispatches the sub-command; returns the exit status."""
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help"):
    print(
      f"{USAGE}\n\nsub-commands:\n  demo   fine-tune MiniLM-L6 on airline sentiment\n"
      "  study  sweep each method's settings, then compare them over several seeds\n"
      "  llm    fine-tune SmolLM2-135M-Instruct (a decoder LLM) on questions about countries"
    )
    return 0 if argv else 2
  if argv[0] not in ("demo", "study", "llm"):
    print(
      f"{USAGE}\nunknown sub-command {argv[0]!r}; among 'demo', 'study', 'llm'", file=sys.stderr
    )
    return 2
  from deltalora_jax.demo import cli

  commands = {"demo": cli.main, "study": cli.study_main, "llm": cli.llm_main}
  return commands[argv[0]](argv[1:])


if __name__ == "__main__":
  sys.exit(main())
