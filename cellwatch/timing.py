"""Where the time goes: a stopwatch that sums wall time per pipeline stage.

Stages may run in several threads at once (:func:`cellwatch.pipeline.process_images`
overlaps one image's labelling with another's inference), so totals can add up to more
than the wall time. A stopwatch made with ``keep_intervals=True`` also keeps every
``(stage, start, end)``, from which :meth:`Stopwatch.busy` gives the wall time during
which a stage was running in any thread.
"""

from __future__ import annotations

__all__ = ["Stopwatch"]

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np


class Stopwatch:
    """Accumulates seconds per named stage; ``with stopwatch("read"): ...``.

    Parameters
    ----------
    clock : callable
        Seconds as a float; :func:`time.perf_counter` unless a test passes a fake.
    keep_intervals : bool
        Also keep each timed interval (a few dozen bytes per call), for :meth:`busy`.
    listener : callable, optional
        Called as ``listener(stage, seconds)`` after each timed interval and each
        :meth:`add`, in the thread that timed it (the daemon's metrics observe stage times
        this way). It may be set later, as the attribute of the same name.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.perf_counter,
        *,
        keep_intervals: bool = False,
        listener: Callable[[str, float], None] | None = None,
    ) -> None:
        self.clock = clock
        self.totals: defaultdict[str, float] = defaultdict(float)
        self.intervals: list[tuple[str, float, float]] | None = [] if keep_intervals else None
        self.listener = listener
        self._lock = threading.Lock()

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        started = self.clock()
        try:
            yield
        finally:
            self._record(stage, started, self.clock())

    def add(self, stage: str, seconds: float) -> None:
        """Count ``seconds`` towards ``stage`` (no interval is kept)."""
        with self._lock:
            self.totals[stage] += seconds
        self._tell(stage, seconds)

    def _record(self, stage: str, started: float, ended: float) -> None:
        with self._lock:
            self.totals[stage] += ended - started
            if self.intervals is not None:
                self.intervals.append((stage, started, ended))
        self._tell(stage, ended - started)

    def _tell(self, stage: str, seconds: float) -> None:
        listener = self.listener
        if listener is not None:
            listener(stage, seconds)

    def timed(
        self, stage: str, fn: Callable[[np.ndarray], np.ndarray]
    ) -> Callable[[np.ndarray], np.ndarray]:
        """``fn`` wrapped so each call's time counts towards ``stage``."""

        def wrapper(batch: np.ndarray) -> np.ndarray:
            with self(stage):
                return fn(batch)

        return wrapper

    def busy(self, stage: str, since: float = float("-inf")) -> float:
        """Wall seconds during which ``stage`` ran in at least one thread (after ``since``).

        Raises
        ------
        RuntimeError
            When the stopwatch was made without ``keep_intervals``.
        """
        if self.intervals is None:
            raise RuntimeError("this stopwatch keeps no intervals; use keep_intervals=True")
        with self._lock:
            spans = sorted(
                (max(a, since), b) for s, a, b in self.intervals if s == stage and b > since
            )
        total, reach = 0.0, float("-inf")
        for start, end in spans:
            if end <= reach:
                continue
            total += end - max(start, reach)
            reach = end
        return total

    def reset(self) -> None:
        """Forget the time measured so far."""
        with self._lock:
            self.totals.clear()
            if self.intervals is not None:
                self.intervals.clear()
