"""Where the time goes: a stopwatch that sums wall time per pipeline stage."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np


class Stopwatch:
    """Accumulates seconds per named stage; ``with stopwatch("read"): ...``."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.totals: defaultdict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        started = self.clock()
        try:
            yield
        finally:
            self.totals[stage] += self.clock() - started

    def add(self, stage: str, seconds: float) -> None:
        self.totals[stage] += seconds

    def timed(
        self, stage: str, fn: Callable[[np.ndarray], np.ndarray]
    ) -> Callable[[np.ndarray], np.ndarray]:
        """``fn`` wrapped so each call's time counts towards ``stage``."""

        def wrapper(batch: np.ndarray) -> np.ndarray:
            with self(stage):
                return fn(batch)

        return wrapper

    def reset(self) -> None:
        self.totals.clear()
