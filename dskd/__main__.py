"""The ``dskd`` command: a table from subcommand to the function that runs it."""

from __future__ import annotations

import sys

from dskd.cli import dispatch

COMMANDS: dict[str, tuple[str, str]] = {
    "assets": (
        "dskd.assets:main",
        "Prepare the offline defaults (SmolLM2 teacher, benchmarks, WordNet) under $DSKD_HOME.",
    ),
    "demo": ("dskd.demo:main", "Show the teacher and a truncated student completing a prompt."),
}


def main(argv: list[str] | None = None) -> int:
    return dispatch(COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
