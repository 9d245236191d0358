"""The user-facing errors at the bottom of the package: every module may raise them without importing
the configuration (:mod:`dskd.io` does, and :mod:`dskd.config` imports :mod:`dskd.io`).
:mod:`dskd.config` re-exports both, so ``from dskd.config import ConfigError`` stays the usual spelling.
"""

from __future__ import annotations


class DskdError(Exception):
    """Base of every user-facing error: the CLI prints its message (which names the flag or file)."""


class ConfigError(DskdError, ValueError):
    """A user-facing configuration error; the message names the flag or file.

    Args:
        message: The one line shown to the user.
        flag: The dotted field it is about (``distill.lr``), when there is one: the CLI adds the recipe
            file that set it.
    """

    def __init__(self, message: str, flag: str | None = None) -> None:
        super().__init__(message)
        self.flag = flag


__all__ = ["ConfigError", "DskdError"]
