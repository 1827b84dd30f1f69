"""Freed memory goes back to the system (:mod:`cellwatch.service.memory`): the cause of the
daemon's RSS creeping up burst after burst (``benchmarks/soak.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import pytest

from cellwatch.errors import ConfigError
from cellwatch.service.memory import TRACE_ENV, TRACE_EVERY_ENV, HeapTrace, Trimmer

# Threads allocate and free arrays of mixed sizes, keeping one in 25, as the pipeline does
# image after image; glibc keeps the freed pages of its arenas resident until trimmed.
CHURN = textwrap.dedent(
    """
    import threading, numpy as np
    from cellwatch.service.memory import trim
    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    np.ones(16_000_000, np.uint8)  # a large free raises malloc's mmap threshold, as TF's do
    kept = []
    def work(seed):
        rng = np.random.default_rng(seed)
        made = [np.ones(int(rng.integers(20_000, 1_000_000)), np.uint8) for _ in range(200)]
        kept.extend(made[::25])
    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    [t.start() for t in threads]; [t.join() for t in threads]
    before = rss()
    TRIM
    print(before, rss())
    """
)


def churn(trimmed: bool) -> tuple[float, float]:
    code = CHURN.replace("TRIM", "trim()" if trimmed else "pass")
    # Fixed thresholds, as glibc's dynamic ones end up in a long-running process: arrays
    # under 4 MB come from the arenas, and glibc never trims them by itself. Without them
    # the outcome depends on how the threads happened to interleave.
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": str(4 << 20),
        "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
    }
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    before, after = map(float, done.stdout.split())
    return before, after


def test_trim_gives_freed_arena_pages_back():
    before, after = churn(trimmed=False)
    assert before - after < 20, "without a trim glibc keeps the freed pages (else no test)"
    before, after = churn(trimmed=True)
    assert before - after > 100, f"RSS {before:.0f} MB → {after:.0f} MB after trim()"


def test_trimmer_trims_at_most_once_per_interval():
    clock = [0.0]
    calls = []
    trimmer = Trimmer(1.0, clock=lambda: clock[0], release=lambda: calls.append(clock[0]) or True)
    for t in (0.0, 0.5, 1.0, 1.2, 5.0):
        clock[0] = t
        trimmer()
    assert calls == [0.0, 1.0, 5.0]


def test_heap_trace_reports_the_line_that_grows(tmp_path: Path) -> None:
    """``CELLWATCH_TRACEMALLOC``: every N images the report names the growing line."""
    report = tmp_path / "heap.txt"
    trace = HeapTrace.from_environ({TRACE_ENV: str(report), TRACE_EVERY_ENV: "10"})
    assert trace is not None
    kept: list[bytes] = []
    try:
        assert trace(10)  # the first snapshot
        assert not trace(15)  # not 10 more images yet
        for _ in range(200):
            kept.append(bytes(10_000))  # the leak: 2 MB
        assert trace(20)
    finally:
        tracemalloc.stop()
    text = report.read_text()
    assert "== 10 images: RSS" in text and "== 20 images: RSS" in text
    growth = text.split("-- grown most since the previous snapshot:")[1].splitlines()[1]
    assert "test_memory.py" in growth and "size=" in growth, text


def test_heap_trace_is_off_unless_asked_and_says_what_is_wrong(tmp_path: Path) -> None:
    assert HeapTrace.from_environ({}) is None
    try:  # a Dask worker writes a file of its own
        worker = HeapTrace.from_environ({TRACE_ENV: str(tmp_path / "h")}, suffix=".worker-7")
        assert worker is not None and worker.path == tmp_path / "h.worker-7"
    finally:
        tracemalloc.stop()
    with pytest.raises(ConfigError, match="CELLWATCH_TRACEMALLOC_EVERY='often'"):
        HeapTrace.from_environ({TRACE_ENV: "/tmp/x", TRACE_EVERY_ENV: "often"})


# Threads that each allocate while the others hold their arrays: glibc gives every new
# thread an arena of its own, up to 8 per core, unless the number is limited.
ARENAS = textwrap.dedent(
    """
    import ctypes, threading, numpy as np
    from cellwatch.service import memory
    print(LIMIT)
    ready, go = threading.Barrier(6), threading.Event()
    def work():
        kept = np.ones(100_000, np.uint8)  # from this thread's arena (under mmap's threshold)
        ready.wait(); go.wait()
    threads = [threading.Thread(target=work) for _ in range(6)]
    [t.start() for t in threads]; go.set(); [t.join() for t in threads]
    ctypes.CDLL("libc.so.6").malloc_stats()  # one "Arena N:" block per arena, on stderr
    """
)


def arenas(limited: bool, environ: dict[str, str] | None = None) -> tuple[str, int]:
    code = ARENAS.replace("LIMIT", "memory.limit_arenas()" if limited else "None")
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, **(environ or {})},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip(), done.stderr.count("Arena ")


def test_limit_arenas_makes_threads_share_two_arenas():
    """The daemon's threads share :data:`~cellwatch.service.memory.ARENAS` arenas, so
    freed memory is not kept in a dozen of them (the in-process soak's creep)."""
    from cellwatch.service.memory import ARENAS as LIMIT

    _, unlimited = arenas(limited=False)
    assert unlimited > LIMIT + 2, "each thread gets an arena of its own (else no test)"
    said, limited = arenas(limited=True)
    assert (said, limited) == ("True", LIMIT)
    said, chosen = arenas(limited=True, environ={"MALLOC_ARENA_MAX": "3"})  # a person's choice
    assert (said, chosen) == ("False", 3)


def test_the_daemon_limits_the_arenas_before_it_starts(monkeypatch):
    from cellwatch.service import daemon

    calls: list[str] = []
    monkeypatch.setattr(daemon, "limit_arenas", lambda: calls.append("limit_arenas"))

    class Started:
        def __init__(self, load_config) -> None:
            calls.append("Daemon")

        def serve(self) -> int:
            return 0

    monkeypatch.setattr(daemon, "Daemon", Started)
    assert daemon.run(None) == 0  # type: ignore[arg-type]
    assert calls == ["limit_arenas", "Daemon"]
