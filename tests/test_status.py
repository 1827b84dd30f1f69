"""``cellwatch status`` says only what is so: a killed daemon is not running, a daemon
still connecting to Dask has no "scheduler None", nothing is in flight that the queue
does not hold, and the workers are the ones the scheduler has now."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from cellwatch.config import Config, OutputConfig
from cellwatch.service import status
from cellwatch.service.jobs import JobQueue
from cellwatch.service.watcher import FileVersion


def _daemon_was_here(
    out: Path, *, pid: int, compute: dict | None = None, running: int = 0
) -> Config:
    """The job database as a daemon leaves it: its meta, 4 jobs, ``running`` of them claimed."""
    with JobQueue(out / ".state" / "jobs.sqlite3") as queue:
        queue.add([FileVersion(f"{i}.tif", 1, 1, str(i)) for i in range(4)])
        if running:
            queue.claim(running)
        meta = {"pid": str(pid), "heartbeat": datetime.now(UTC).isoformat(), "state": "running"}
        if compute is not None:
            meta["compute"] = json.dumps(compute)
        queue.set_meta(**meta)
    return Config(output=OutputConfig(dir=str(out)))


def _dead_pid() -> int:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


def test_a_killed_daemon_is_not_running_though_its_heartbeat_is_fresh(tmp_path: Path):
    config = _daemon_was_here(tmp_path, pid=_dead_pid())  # kill -9: no "stopped" written
    report = status.collect(config)
    assert report["daemon"]["running"] is False
    assert "daemon      not running" in status.format_text(report)
    alive = _daemon_was_here(tmp_path / "alive", pid=os.getpid())
    assert status.collect(alive)["daemon"]["running"] is True


def test_a_daemon_still_connecting_names_no_scheduler_none(tmp_path: Path):
    config = _daemon_was_here(tmp_path, pid=os.getpid(), compute={"mode": "dask", "workers": []})
    text = status.format_text(status.collect(config))
    assert "None" not in text and "0 worker(s)" not in text, text
    assert "Dask, connecting: scheduler and workers not known yet" in text


def test_nothing_is_in_flight_that_the_queue_does_not_hold(tmp_path: Path):
    compute = {"mode": "dask", "scheduler": "tcp://127.0.0.1:1", "dashboard": None,
               "in_flight": 4, "workers": []}  # fmt: skip
    config = _daemon_was_here(tmp_path / "idle", pid=os.getpid(), compute=compute)
    report = status.collect(config)
    assert report["queue"]["in_progress"] == 0 and report["compute"]["in_flight"] == 0
    assert "0 job(s) in flight" in status.format_text(report)
    busy = _daemon_was_here(tmp_path / "busy", pid=os.getpid(), compute=compute, running=1)
    assert status.collect(busy)["compute"]["in_flight"] == 1
    gone = _daemon_was_here(tmp_path / "gone", pid=_dead_pid(), compute=compute, running=2)
    assert status.collect(gone)["compute"]["in_flight"] == 0  # nobody holds them


def test_the_workers_are_the_ones_the_scheduler_has_now(tmp_path: Path):
    """The daemon's last word said no worker (it was idle, or had just started); the
    scheduler has two."""
    import distributed

    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, protocol="tcp", host="127.0.0.1",
        scheduler_kwargs={"dashboard": False},
    ) as cluster:  # fmt: skip
        compute = {"mode": "dask", "scheduler": cluster.scheduler_address, "dashboard": None,
                   "in_flight": 0, "workers": []}  # fmt: skip
        config = _daemon_was_here(tmp_path, pid=os.getpid(), compute=compute)
        report = status.collect(config)
    assert len(report["compute"]["workers"]) == 2 and report["compute"]["live"] is True
    text = status.format_text(report)
    assert "2 worker(s)" in text and "last saw" not in text, text


def test_a_paused_daemon_says_so_and_a_stopped_one_does_not(tmp_path: Path):
    config = _daemon_was_here(tmp_path, pid=os.getpid())
    why = "paused since 2026-03-02T12:00:00+00:00: the results disk is full (...)"
    with JobQueue(tmp_path / ".state" / "jobs.sqlite3") as queue:
        queue.set_meta(paused=why)
    report = status.collect(config)
    assert report["paused"] == why
    assert f"  paused      {why}" in status.format_text(report).splitlines()
    with JobQueue(tmp_path / ".state" / "jobs.sqlite3") as queue:
        queue.set_meta(state="stopped")  # a pause does not outlive its daemon
    report = status.collect(config)
    assert report["paused"] is None and "  paused " not in status.format_text(report)
