"""``python -m dskd``: the command table and the parsers live in :mod:`dskd.cli`."""

from __future__ import annotations

import sys

from dskd.cli import COMMANDS, main

__all__ = ["COMMANDS", "main"]

if __name__ == "__main__":
    sys.exit(main())
