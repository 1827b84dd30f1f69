"""The kinds of failure cellwatch distinguishes.

Two kinds matter to the daemon: a bad input (reject it, record a ``failed`` row, never
retry) and a transient fault (retry, up to a limit). Every message is written for the
person who reads the ledger: which file, what is wrong, what to do.
"""

from __future__ import annotations

import errno

__all__ = [
    "BadInputError",
    "CellwatchError",
    "ConfigError",
    "DiskFullError",
    "ModelError",
    "TransientError",
    "disk_full",
    "io_fault",
]


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


class DiskFullError(TransientError):
    """A write found no room on its disk (``ENOSPC``, or the user's quota): the daemon
    pauses until space is freed rather than spend the job's attempts."""


#: The errnos of a disk with no room left for this user.
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error it was raised from) says the disk is full.

    Examples
    --------
    >>> disk_full(TransientError("x"))
    False
    >>> disk_full(DiskFullError("x"))
    True
    """
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, DiskFullError):
            return True
        if isinstance(cause, OSError) and cause.errno in _FULL_ERRNOS:
            return True
        cause = cause.__cause__ or cause.__context__
    return False


class ClusterError(CellwatchError):
    """The Dask scheduler or its workers cannot be reached or cannot see the files
    (exit status 2 for a command; the daemon waits and retries)."""


#: OS errors that say something about the file itself (it is gone, or not ours to read):
#: retrying will not help. Every other OS error (EIO, ESTALE, ETIMEDOUT, ...) may pass.
_LASTING_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM})


def io_fault(path: object, exc: BaseException) -> TransientError | None:
    """A :class:`TransientError` when ``exc`` (or an error it was raised from) is an I/O
    error of the operating system, None when it is about the content.

    The one rule for reading inputs: I/O errors (a network share that hiccupped, a disk
    that timed out, a read that came back short) are retried; a decoder's complaint about
    the bytes it got fails the image at once. An ``OSError`` without an errno is a
    library's complaint about the content (Pillow's "image file is truncated").

    Examples
    --------
    >>> io_fault("a.tif", OSError(errno.EIO, "Input/output error")) is not None
    True
    >>> io_fault("a.tif", OSError("image file is truncated")) is None
    True
    """
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, TransientError):
            return cause
        if isinstance(cause, OSError) and cause.errno and cause.errno not in _LASTING_ERRNOS:
            return TransientError(
                f"{path} could not be read ({cause.strerror or cause}); the disk or network "
                "share may have failed for a moment; will try again"
            )
        cause = cause.__cause__ or cause.__context__
    return None


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
