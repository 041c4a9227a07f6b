"""``python -m deltalora_jax demo|study [flags]``: the library's demo and study (``--help``)."""

from __future__ import annotations

import sys

USAGE = "usage: python -m deltalora_jax {demo,study} [--help] [flags]"


def main(argv: list[str] | None = None) -> int:
  """Dispatches the sub-command; returns the exit status."""
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help"):
    print(
      f"{USAGE}\n\nsub-commands:\n  demo   fine-tune MiniLM-L6 on airline sentiment\n"
      "  study  sweep each method's settings, then compare them over several seeds"
    )
    return 0 if argv else 2
  if argv[0] not in ("demo", "study"):
    print(f"{USAGE}\nunknown sub-command {argv[0]!r}; among 'demo', 'study'", file=sys.stderr)
    return 2
  from deltalora_jax.demo import cli

  return cli.main(argv[1:]) if argv[0] == "demo" else cli.study_main(argv[1:])


if __name__ == "__main__":
  sys.exit(main())
