"""The kinds of failure cellwatch distinguishes.

Two kinds matter to the daemon: a bad input (reject it, record a ``failed`` row, never
retry) and a transient fault (retry, up to a limit). Every message is written for the
person who reads the ledger: which file, what is wrong, what to do.
"""

from __future__ import annotations

__all__ = ["BadInputError", "CellwatchError", "ConfigError", "ModelError", "TransientError"]


class CellwatchError(Exception):
    """Base class for every error cellwatch raises on purpose."""


class ConfigError(CellwatchError):
    """The configuration file or a command-line option is wrong (exit status 2)."""


class ModelError(CellwatchError):
    """The model file is missing, unsafe or does not follow the model contract."""


class BadInputError(CellwatchError):
    """An input image cannot be processed; retrying will not help."""


class TransientError(CellwatchError):
    """A fault that may go away (a file still being written, a full disk); retry later."""
