"""``python -m deltalora_jax demo [flags]``: the library's demo (see ``--help``)."""

from __future__ import annotations

import sys

USAGE = "usage: python -m deltalora_jax demo [--help] [flags]"


def main(argv: list[str] | None = None) -> int:
  """Dispatches the sub-command; returns the exit status."""
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help"):
    print(f"{USAGE}\n\nsub-commands:\n  demo  fine-tune MiniLM-L6 on airline sentiment")
    return 0 if argv else 2
  if argv[0] != "demo":
    print(f"{USAGE}\nunknown sub-command {argv[0]!r}; the only one is 'demo'", file=sys.stderr)
    return 2
  from deltalora_jax.demo.cli import main as demo

  return demo(argv[1:])


if __name__ == "__main__":
  sys.exit(main())
