"""The daemon's pause while its results disk is full.

A write that finds no room (``ENOSPC``, or the quota: :func:`cellwatch.errors.disk_full`),
whether of a label image, an overlay, ``cells.csv`` or ``ledger.csv``, is not the image's
fault: the runner holds the work in hand and tries the write again after a delay that
doubles from :data:`FIRST_WAIT_S` to :data:`MOST_WAIT_S`, without spending the job's
attempts, until it succeeds. Meanwhile it takes no new jobs. The pause is logged once when
it starts and once when it ends; the main thread shows it in the sd_notify ``STATUS``, in
the heartbeat that ``cellwatch status`` reads (``paused`` in the meta) and in the metric
``cellwatch_paused{reason="disk_full"}``.

A label image or overlay whose write failed is written again by processing its image
again, so a ledger row is never written without its files.
"""

from __future__ import annotations

__all__ = ["FIRST_WAIT_S", "MOST_WAIT_S", "Pause", "Stopped"]

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

from cellwatch.errors import disk_full
from cellwatch.service.metrics import Metrics

log = logging.getLogger("cellwatch.watch")

FIRST_WAIT_S = 1.0  # the first wait before a write that found the disk full is tried again
MOST_WAIT_S = 30.0  # the longest wait between two tries, however long the disk stays full

DISK_FULL = "disk_full"  # the metric's reason label

T = TypeVar("T")


class Stopped(Exception):
    """The daemon was asked to stop while paused: the work in hand is handed back."""


class Pause:
    """Whether the worker is paused, and why; shared by the worker thread (which pauses
    and resumes) and the main thread (which reports it).

    Parameters
    ----------
    stop : threading.Event
        Set when the daemon stops; a pause then ends with :class:`Stopped`.
    metrics : Metrics, optional
        Where ``cellwatch_paused`` is set.
    first_s, most_s : float
        The first and the longest wait between two tries.
    """

    def __init__(
        self,
        stop: threading.Event,
        metrics: Metrics | None = None,
        *,
        first_s: float = FIRST_WAIT_S,
        most_s: float = MOST_WAIT_S,
    ) -> None:
        self.stop = stop
        self.metrics = metrics
        self.first_s, self.most_s = first_s, most_s
        self.reason: str | None = None  # "disk_full" while paused
        self.message: str | None = None  # what the write said, for a person
        self.since: str | None = None  # when the pause began (ISO 8601, UTC)
        self.changes = 0  # counts pauses and resumptions, so the main thread sees each
        self._wait = first_s

    @property
    def paused(self) -> bool:
        """Whether the worker is waiting for room on the results disk."""
        return self.reason is not None

    def describe(self) -> str | None:
        """One line for ``cellwatch status`` and the sd_notify STATUS; None when not paused."""
        if self.reason is None:
            return None
        return (
            f"paused since {self.since}: the results disk is full ({self.message}); "
            "free some space there and cellwatch resumes by itself"
        )

    def hold(self, error: BaseException) -> None:
        """A write failed because the disk is full: pause (logged the first time) and wait
        before the caller tries again.

        Raises
        ------
        Stopped
            The daemon is stopping.
        """
        if self.reason is None:
            self.reason, self.message = DISK_FULL, str(error)
            self.since = datetime.now(UTC).isoformat(timespec="seconds")
            self.changes += 1
            if self.metrics is not None:
                self.metrics.paused(DISK_FULL, True)
            log.error(
                "pausing: the results disk is full (%s). No image is given up; cellwatch "
                "tries the write again, every %g s at most, and resumes by itself once "
                "space is freed",
                error,
                self.most_s,
            )
        wait, self._wait = self._wait, min(self._wait * 2, self.most_s)
        if self.stop.wait(wait):
            raise Stopped("stopping while paused for a full disk")

    def resume(self) -> None:
        """A write succeeded: end the pause, if there was one (logged)."""
        self._wait = self.first_s
        if self.reason is None:
            return
        log.warning("resuming: the results disk has room again (paused since %s)", self.since)
        self.reason = self.message = self.since = None
        self.changes += 1
        if self.metrics is not None:
            self.metrics.paused(DISK_FULL, False)

    def writing(self, write: Callable[[], T]) -> T:
        """``write()``, tried again after each wait while it finds the disk full.

        Raises
        ------
        Stopped
            The daemon is stopping while the disk is full; nothing was written.
        """
        while True:
            try:
                done = write()
            except Exception as exc:
                if not disk_full(exc):
                    raise
                self.hold(exc)
                continue
            self.resume()
            return done
