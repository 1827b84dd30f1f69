"""Exactly once through ``kill -9`` in each named window (``CELLWATCH_CRASH_AT``).

A random kill seldom lands between the ledger append and the queue commit. Here the real
``cellwatch watch`` kills itself at a named point (:mod:`cellwatch.service.crash`); each
test first checks that the files show the crash really happened in that window, then
restarts the daemon without the setting and checks that every image has exactly one row.
The same points serve the Dask driver and its workers (tests/test_distributed.py).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml
from test_daemon import by_image, check_files_whole, run_cellwatch, write_config, write_tiff

from cellwatch.service.crash import crash_point
from cellwatch.service.jobs import JobQueue
from cellwatch.storage import ledger

IMAGES = 10
__all__ = ["run_cellwatch"]  # the fixture, from tests/test_daemon.py


def write_compute_config(path: Path, model: Path, workers: int, **watch: float) -> Path:
    """tests/test_daemon.py's configuration with ``compute.workers`` set."""
    settings = yaml.safe_load(write_config(path, model, **watch).read_text())
    settings["compute"] = {"workers": workers}
    path.write_text(yaml.safe_dump(settings))
    return path


def burst(inbox: Path, n: int = IMAGES) -> dict[str, int]:
    """``n`` small images of 1–4 discs; name → number of cells."""
    expected = {}
    for i in range(n):
        cells = 1 + i % 4
        centres = [(16 + 30 * (k // 2), 16 + 30 * (k % 2)) for k in range(cells)]
        write_tiff(inbox / f"b{i:02d}.tif", centres, shape=(64, 64), radius=6)
        expected[f"b{i:02d}.tif"] = cells
    return expected


def window_was_hit(point: str, out: Path) -> str:
    """What the files left by a crash at ``point`` show (the test fails if the crash was
    anywhere else)."""
    rows = ledger.read(out / "ledger.csv")
    in_ledger = set(rows["job_id"])
    with JobQueue(out / ".state" / "jobs.sqlite3", readonly=True) as queue:
        states = {job.job_id: job.state for job in queue.jobs()}
    if point == "after-labels":  # label images written for an image with no row
        labels = {p.stem for p in (out / "labels").glob("*.tif")}
        rowless = labels - {Path(i).stem for i in rows["image"]}
        assert rowless, "no label image without a row"
        return f"label images without a row: {sorted(rowless)}"
    if point == "after-cells":  # cells appended for a job with no ledger row
        cells = pd.read_csv(out / "cells.csv", dtype={"job_id": str})
        orphans = set(cells["job_id"]) - in_ledger
        assert orphans, "no cells without a ledger row"
        assert all(states[j] == "running" for j in orphans)
        return f"{len(orphans)} job(s) with cells and no row"
    if point == "after-ledger":  # a row in the ledger for a job still running in the queue
        uncommitted = [j for j in in_ledger if states[j] == "running"]
        assert uncommitted, "every ledger row was committed"
        return f"{len(uncommitted)} row(s) not committed"
    assert point == "after-commit"
    assert in_ledger and all(states[j] in ("done", "failed") for j in in_ledger)
    left = [j for j, s in states.items() if s in ("pending", "running")]
    assert left, "nothing was left to do after the crash"
    return f"{len(in_ledger)} committed, {len(left)} left"


def restart_and_check(cw, expected: dict[str, int]) -> None:
    cw.start()
    cw.wait_rows(lambda rows: set(expected) <= set(by_image(rows)), timeout=120)
    time.sleep(0.5)  # room for a duplicate to show up, were there one
    assert cw.stop() == 0
    rows = by_image(cw.rows())
    assert set(rows) == set(expected)
    for name, n in expected.items():
        assert [(r["status"], r["cell_count"]) for r in rows[name]] == [("ok", str(n))], name
    check_files_whole(cw.out)
    with JobQueue(cw.out / ".state" / "jobs.sqlite3", readonly=True) as queue:
        assert queue.counts() == {"pending": 0, "running": 0, "done": len(expected), "failed": 0}


def test_crash_point_fires_only_where_and_when_named(tmp_path: Path):
    """In a child process: a point it is not told about, or an image it does not hold,
    or a pass before the N-th, leaves it alive; the named one kills it with SIGKILL."""
    import multiprocessing

    def child(env: dict[str, str], calls: list[tuple[str, str]]) -> int:
        context = multiprocessing.get_context("fork")
        process = context.Process(target=_passes, args=(env, calls))
        process.start()
        process.join(30)
        return process.exitcode

    env = {"CELLWATCH_CRASH_AT": "after-ledger@b07:2"}
    assert (
        child(env, [("after-cells", "b07"), ("after-ledger", "b01"), ("after-ledger", "b07")]) == 0
    )
    assert child(env, [("after-ledger", "b07"), ("after-ledger", "x/b07.tif")]) == -signal.SIGKILL
    counts = {**env, "CELLWATCH_CRASH_DIR": str(tmp_path)}  # counted across processes
    assert child(counts, [("after-ledger", "b07")]) == 0
    assert child(counts, [("after-ledger", "b07")]) == -signal.SIGKILL
    assert child(counts, [("after-ledger", "b07")]) == 0  # the 3rd pass: not the 2nd
    with pytest.raises(ValueError, match="unknown crash point 'after-lables'"):
        crash_point("after-lables")


def _passes(env: dict[str, str], calls: list[tuple[str, str]]) -> None:
    for name, subject in calls:
        crash_point(name, subject, environ=env)


def test_in_process_daemon_killed_at_each_named_point_counts_each_image_once(
    run_cellwatch, tmp_path: Path, threshold_model: Path, monkeypatch
):
    """The daemon with images processed in its own threads dies in each window in turn;
    a clean start then finishes the backlog."""
    config = write_compute_config(
        tmp_path / "config.yaml", threshold_model, 0, stable_time_s=0.2, rescan_interval_s=0.5
    )
    cw = run_cellwatch(config)
    expected = burst(cw.inbox, 24)
    # each after some work is recorded in that run; jobs found running after a crash are
    # claimed one at a time, so every run has at least two passes to make
    for point, nth in (("after-commit", 1), ("after-labels", 2), ("after-cells", 2),
                       ("after-ledger", 2)):  # fmt: skip
        monkeypatch.setenv("CELLWATCH_CRASH_AT", f"{point}:{nth}")
        cw.start()
        assert cw.proc.wait(120) == -signal.SIGKILL, cw.log()
        print(f"\n{point}: {window_was_hit(point, cw.out)}")
    monkeypatch.delenv("CELLWATCH_CRASH_AT")
    restart_and_check(cw, expected)


def test_dask_driver_killed_at_each_named_point_counts_each_image_once(
    run_cellwatch, tmp_path: Path, threshold_model: Path, monkeypatch
):
    """The daemon with a Dask worker process: the driver dies in each window in turn (its
    worker process goes with it, no orphan), then a clean start finishes the backlog."""
    config = write_compute_config(
        tmp_path / "config.yaml", threshold_model, 1, stable_time_s=0.2, rescan_interval_s=0.5
    )
    cw = run_cellwatch(config)
    expected = burst(cw.inbox, 14)
    for point, nth in (("after-cells", 2), ("after-ledger", 2), ("after-commit", 1)):
        monkeypatch.setenv("CELLWATCH_CRASH_AT", f"{point}:{nth}")
        cw.start()
        children = _children_when_working(cw.proc.pid)
        assert cw.proc.wait(120) == -signal.SIGKILL, cw.log()
        print(f"\n{point}: {window_was_hit(point, cw.out)}")
        _, alive = psutil.wait_procs(children, timeout=20)
        assert not alive, f"worker processes outlived the killed driver: {alive}"
    monkeypatch.delenv("CELLWATCH_CRASH_AT")
    restart_and_check(cw, expected)


def _children_when_working(pid: int, timeout: float = 60) -> list[psutil.Process]:
    """The daemon's child processes once its Dask worker is there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            children = psutil.Process(pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        if children:
            return children
        time.sleep(0.05)
    return []
