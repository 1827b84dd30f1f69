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


class ClusterError(CellwatchError):
    """The Dask scheduler or its workers cannot be reached or cannot see the files
    (exit status 2 for a command; the daemon waits and retries)."""


WORKER_DIED = (
    "a worker process died while processing this image (killed for memory, or a crash in a "
    "library?)"
)


def describe(exc: BaseException) -> str:
    """An exception from processing one image, in words for the ledger's ``error`` column."""
    if type(exc).__name__ == "KilledWorker":  # distributed's, without importing it here
        return WORKER_DIED
    if isinstance(exc, CellwatchError):
        return str(exc)
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror or exc}{where}"
    return (
        f"unexpected error ({type(exc).__name__}: {exc}); please report it to the cellwatch "
        "maintainers with the image"
    )
