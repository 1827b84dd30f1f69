"""Giving freed memory back to the system, so a daemon that runs for months stays flat.

Every image allocates and frees large arrays (the image, its tiles, the network's
activations, labels) from several threads. glibc's ``malloc`` keeps freed pages of its
per-thread arenas resident and hands them out again only to requests that fit, so with
images of mixed sizes the resident set creeps up by the freed-but-kept pages, burst after
burst (a soak with the daemon measured 60-90 MB per 84 images; ``benchmarks/soak.py``).
:func:`trim` asks glibc to return them (``malloc_trim(0)``, which since glibc 2.8 also
releases free pages in the middle of every arena). It costs a few milliseconds and is
called after each batch of jobs (the in-process runner) or each image (a Dask worker).

Trimming is not enough where many threads allocate: glibc gives each new thread an arena
of its own (up to 8 per core), and OpenVINO's, the tiling's and the daemon's threads then
spread the same images' arrays over a dozen arenas, each keeping its own freed pieces. A
soak of the in-process daemon rose 71 MB over 5,000 images, and with
``MALLOC_ARENA_MAX=2`` it used 240 MB less from the first burst on and stayed flat, at the
same speed. :func:`limit_arenas` sets that limit from inside the daemon (glibc's
``mallopt``), before its threads start.
"""

from __future__ import annotations

__all__ = [
    "ARENAS",
    "TRACE_ENV",
    "TRACE_EVERY_ENV",
    "HeapTrace",
    "Trimmer",
    "limit_arenas",
    "rss_mb",
    "trim",
]

import ctypes
import ctypes.util
import os
import time
import tracemalloc
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

from cellwatch.errors import ConfigError

ARENAS = 2  # malloc arenas a daemon keeps (glibc's default: 8 per core)
ARENA_ENV = "MALLOC_ARENA_MAX"  # glibc's own setting, which wins where it is set
_M_ARENA_MAX = -8  # mallopt's parameter for the arena limit (glibc's malloc.h)


@cache
def _libc_function(name: str, *argtypes: Any) -> Callable[..., int] | None:
    """A function of glibc's malloc, or None where the C library has none (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        function = getattr(libc, name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = list(argtypes), ctypes.c_int
    return function


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None."""
    return _libc_function("malloc_trim", ctypes.c_size_t)


def limit_arenas(count: int = ARENAS, environ: Mapping[str, str] = os.environ) -> bool:
    """Let glibc's ``malloc`` use at most ``count`` arenas from now on: threads started
    later share them instead of each getting its own. Call it before starting threads.
    True if the limit was set; False where ``MALLOC_ARENA_MAX`` is set (glibc has
    applied it already: a person's choice wins) or the C library is not glibc."""
    if environ.get(ARENA_ENV):
        return False
    mallopt = _libc_function("mallopt", ctypes.c_int, ctypes.c_int)
    return bool(mallopt and mallopt(_M_ARENA_MAX, count))


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


TRACE_ENV = "CELLWATCH_TRACEMALLOC"  # a file: the daemon appends its heap's growth there
TRACE_EVERY_ENV = "CELLWATCH_TRACEMALLOC_EVERY"  # images between two snapshots (500)


class HeapTrace:
    """A debugging aid for memory that grows: Python's ``tracemalloc`` in the daemon.

    With ``CELLWATCH_TRACEMALLOC=FILE`` in its environment, ``cellwatch watch`` traces every
    Python allocation (NumPy's arrays included) and, every ``CELLWATCH_TRACEMALLOC_EVERY``
    images (default 500), appends to ``FILE`` its resident memory, the traced total, and
    the source lines whose allocations grew most since the previous snapshot and since
    the first one (each Dask worker writes ``FILE.worker-PID``). Memory that grows in RSS
    but not in the traced total is native (the C heap, OpenVINO, TensorFlow). Tracing
    slows the daemon; it is for finding a leak, not for production.

    Parameters
    ----------
    path : Path
        The report file (appended to).
    every : int
        Images between two snapshots.
    frames : int
        Frames kept per allocation.
    top : int
        Lines listed per comparison.
    """

    def __init__(self, path: Path, every: int = 500, *, frames: int = 10, top: int = 15) -> None:
        if every < 1:
            raise ConfigError(
                f"{TRACE_EVERY_ENV}={every} must be a positive number of images; unset it or "
                "give e.g. 500"
            )
        self.path, self.every, self.top = Path(path), every, top
        self._first: tracemalloc.Snapshot | None = None
        self._last: tracemalloc.Snapshot | None = None
        self._next = every
        if not tracemalloc.is_tracing():
            tracemalloc.start(frames)

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] = os.environ, *, suffix: str = ""
    ) -> HeapTrace | None:
        """The trace that ``CELLWATCH_TRACEMALLOC`` asks for, or None (the usual case);
        ``suffix`` is added to the file's name (a Dask worker's own file)."""
        path = environ.get(TRACE_ENV)
        if not path:
            return None
        raw = environ.get(TRACE_EVERY_ENV, "500")
        try:
            every = int(raw)
        except ValueError:
            raise ConfigError(
                f"{TRACE_EVERY_ENV}={raw!r} is not a number of images; unset it or give e.g. 500"
            ) from None
        return cls(Path(path + suffix), every)

    def __call__(self, done: int) -> bool:
        """Snapshot and report if ``every`` more images were done since the last report;
        True if it did."""
        if done < self._next:
            return False
        self._next = done + self.every
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)]
        )
        traced, peak = tracemalloc.get_traced_memory()
        lines = [
            f"== {done} images: RSS {rss_mb():.0f} MB, traced {traced / 1e6:.1f} MB "
            f"(peak {peak / 1e6:.1f} MB)"
        ]
        for title, base in (("previous snapshot", self._last), ("first snapshot", self._first)):
            if base is None:
                continue
            lines.append(f"-- grown most since the {title}:")
            for stat in snapshot.compare_to(base, "lineno")[: self.top]:
                lines.append(f"   {stat}")
        if self._first is None:
            self._first = snapshot
        self._last = snapshot
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
        return True


def rss_mb() -> float:
    """This process's resident memory (VmRSS), in MB; 0 where ``/proc`` has none."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0
