"""Named crash points: where tests make a process kill itself, to prove exactly-once.

A kill at a random moment seldom lands in the narrow windows that matter (between the
ledger append and the queue commit, say). Each window has a name, and a process started
with ``CELLWATCH_CRASH_AT`` set to that name sends itself ``SIGKILL`` there — no
clean-up, no ``finally`` blocks, as a power cut or an out-of-memory kill would leave it:

``after-labels``
    in the process that ran the image (a Dask worker, or the daemon's worker thread),
    once its label image and overlay are written and before its result reaches the driver;
``after-cells``
    in the driver, once the image's cells are appended to ``cells.csv`` and before its
    ledger row;
``after-ledger``
    in the driver, once the ledger row is appended and before the job is marked done;
``after-commit``
    in the driver, once the job queue has committed the job as done.

The setting is a comma-separated list of ``POINT[@TEXT][:N]``: ``@TEXT`` fires only for
images whose path contains ``TEXT`` (an image that kills every worker it meets), ``:N``
only the N-th time the point is passed. Passes are counted in this process, or across all
processes when ``CELLWATCH_CRASH_DIR`` names a folder for the counts (a worker that dies
once, whichever worker it is). Only tests set these variables; unset, :func:`crash_point`
is one dictionary look-up.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
from collections.abc import Mapping
from pathlib import Path

__all__ = ["COUNT_DIR_ENV", "ENV", "POINTS", "crash_point"]

ENV = "CELLWATCH_CRASH_AT"
COUNT_DIR_ENV = "CELLWATCH_CRASH_DIR"
POINTS = ("after-labels", "after-cells", "after-ledger", "after-commit")

_passed: dict[str, int] = {}
_lock = threading.Lock()


def crash_point(name: str, subject: str = "", environ: Mapping[str, str] | None = None) -> None:
    """Kill this process with ``SIGKILL`` if ``CELLWATCH_CRASH_AT`` names this point.

    Parameters
    ----------
    name : str
        One of :data:`POINTS`.
    subject : str
        The image (or images, joined) the process holds here, for ``@TEXT``.
    environ : mapping, optional
        Where to read the settings (``os.environ`` by default).

    Raises
    ------
    ValueError
        ``name`` is not a known crash point (a typo in the code would otherwise make a test
        that never crashes pass).
    """
    if name not in POINTS:
        raise ValueError(f"unknown crash point {name!r}; known: {', '.join(POINTS)}")
    environ = os.environ if environ is None else environ
    setting = environ.get(ENV)
    if not setting:
        return
    for entry in setting.split(","):
        point, _, nth = entry.strip().partition(":")
        point, _, text = point.partition("@")
        if point != name or (text and text not in subject):
            continue
        count = _count(entry.strip(), environ.get(COUNT_DIR_ENV))
        if not nth or count == int(nth):
            os.kill(os.getpid(), signal.SIGKILL)


def _count(entry: str, folder: str | None) -> int:
    """How many times ``entry`` has matched, this time included."""
    if not folder:
        with _lock:
            _passed[entry] = _passed.get(entry, 0) + 1
            return _passed[entry]
    path = Path(folder) / hashlib.sha256(entry.encode()).hexdigest()[:16]
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:  # one byte per pass; where our byte landed is our count, whoever else writes
        os.write(fd, b".")
        return os.lseek(fd, 0, os.SEEK_CUR)
    finally:
        os.close(fd)
