"""Giving freed memory back to the system, so a daemon that runs for months stays flat.

Every image allocates and frees large arrays (the image, its tiles, the network's
activations, labels) from several threads. glibc's ``malloc`` keeps freed pages of its
per-thread arenas resident and hands them out again only to requests that fit, so with
images of mixed sizes the resident set creeps up by the freed-but-kept pages, burst after
burst (a soak with the daemon measured 60-90 MB per 84 images; ``benchmarks/soak.py``).
:func:`trim` asks glibc to return them (``malloc_trim(0)``, which since glibc 2.8 also
releases free pages in the middle of every arena). It costs a few milliseconds and is
called after each batch of jobs (the in-process runner) or each image (a Dask worker).
"""

from __future__ import annotations

__all__ = ["Trimmer", "trim"]

import ctypes
import ctypes.util
import time
from collections.abc import Callable
from functools import cache


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        function = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = [ctypes.c_size_t], ctypes.c_int
    return function


def trim() -> bool:
    """Return the C heap's free pages to the system; True if glibc released any."""
    function = _malloc_trim()
    return bool(function and function(0))


class Trimmer:
    """Calls :func:`trim` at most once every ``interval_s`` seconds.

    Parameters
    ----------
    interval_s : float
        The least time between two trims.
    clock : callable
        Monotonic seconds (tests pass a fake).
    release : callable
        :func:`trim` (tests pass a fake).
    """

    def __init__(
        self,
        interval_s: float = 1.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        release: Callable[[], bool] = trim,
    ) -> None:
        self.interval_s, self.clock, self.release = interval_s, clock, release
        self._last = -float("inf")
        self.trims = 0

    def __call__(self) -> None:
        """Trim, unless the last trim was less than ``interval_s`` ago."""
        now = self.clock()
        if now - self._last >= self.interval_s:
            self._last = now
            self.release()
            self.trims += 1
