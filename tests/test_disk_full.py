"""A full results disk pauses the daemon; it never gives a good image up.

The real ``cellwatch watch`` process writes its results to a small tmpfs of its own (a
private mount namespace: ``unshare -rm``), which the test fills with a ballast file while
images arrive, then empties. The test reaches that folder through ``/proc/PID/root``.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_daemon import (
    NotifySocket,
    by_image,
    check_files_whole,
    status_json,
    write_config,
    write_tiff,
)
from test_metrics import free_port, scrape, value

from cellwatch.service.jobs import DB_NAME, JobQueue

CELLWATCH = Path(sys.executable).with_name("cellwatch")
SIZE = "2m"  # the tmpfs: room for the first images' files, ledger and cells


def can_mount_tmpfs(where: Path) -> str | None:
    """Why a private tmpfs cannot be mounted here, or None if it can."""
    if shutil.which("unshare") is None:
        return "no unshare command"
    probe = subprocess.run(
        ["unshare", "-rm", "mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    return probe.stderr.strip() or "mount failed" if probe.returncode else None


def fill(path: Path) -> None:
    """Take every free block of the file system ``path`` is on."""
    with path.open("wb", buffering=0) as handle:
        block = b"\0" * 4096
        try:
            while True:
                handle.write(block)
        except OSError:
            pass


def wait_until(check, what: str, proc: subprocess.Popen, log: Path, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"cellwatch exited with {proc.returncode}:\n{log.read_text()}")
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n{log.read_text()[-4000:]}")


def test_a_full_results_disk_pauses_and_every_image_gets_one_ok_row(
    tmp_path: Path, threshold_model: Path
):
    out, state, inbox = tmp_path / "out", tmp_path / "state", tmp_path / "inbox"
    for folder in (out, state, inbox):
        folder.mkdir()
    if why := can_mount_tmpfs(out):
        pytest.skip(f"cannot mount a tmpfs without privileges here ({why})")
    config = write_config(tmp_path / "config.yaml", threshold_model)
    settings = yaml.safe_load(config.read_text())
    port = free_port()
    settings["metrics"] = {"address": "127.0.0.1", "port": port}
    settings["compute"] = {"workers": 0}
    # The report only at start: a rewrite replaces the old file and so frees its blocks,
    # which would let an image through the "full" disk and make the pause come and go.
    settings["report"] = {"refresh_interval_s": 3600.0}
    config.write_text(yaml.safe_dump(settings))
    notify = NotifySocket()
    env = dict(os.environ, NOTIFY_SOCKET=notify.name, TF_CPP_MIN_LOG_LEVEL="3")
    env.update(PYTHONUNBUFFERED="1")
    command = [CELLWATCH, "watch", "--config", config, "--inbox", inbox, "--out", out]
    command += ["--state", state]  # the job database on another disk
    mount = f"mount -t tmpfs -o size={SIZE} tmpfs {out}"
    log = tmp_path / "daemon.log"
    with log.open("wb") as handle:
        proc = subprocess.Popen(
            ["unshare", "-rm", "sh", "-c", f'{mount} && exec "$@"', "sh", *map(str, command)],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    seen = out  # the results folder as the daemon sees it: its own tmpfs
    try:
        notify.wait_for("READY=1")
        seen = Path(f"/proc/{proc.pid}/root") / out.relative_to("/")
        pid = proc.pid
        status_args = ["--config", str(config), "--out", str(seen), "--state", str(state)]

        def rows() -> dict[str, list[dict[str, str]]]:
            path = seen / "ledger.csv"
            if not path.exists():
                return {}
            with path.open(newline="") as f:
                return by_image([r for r in csv.DictReader(f) if r.get("job_id")])

        def paused() -> float:
            return value(scrape(port)[1], "cellwatch_paused", reason="disk_full")

        before = {f"before-{i}.tif" for i in range(2)}
        for name in before:
            write_tiff(inbox / name, [(20, 20), (40, 40)])
        wait_until(lambda: before <= set(rows()), "the first rows", proc, log)
        assert paused() == 0

        fill(seen / "ballast")
        during = {f"during-{i}.tif" for i in range(4)}
        for name in during:
            write_tiff(inbox / name, [(20, 20), (40, 40)])
        wait_until(lambda: paused() == 1, "cellwatch_paused 1", proc, log)
        report = wait_until(
            lambda: (r := status_json(status_args))["paused"] and r, "status: paused", proc, log
        )
        assert report["daemon"]["running"] and report["daemon"]["pid"] == pid
        assert "disk is full" in report["paused"]
        statuses = [m for m in notify.poll() if m.startswith("STATUS=")]
        assert any("paused since" in m and "disk is full" in m for m in statuses), statuses
        time.sleep(3.0)  # several tries while the disk stays full: none gives up an image
        assert not set(rows()) & during
        assert proc.poll() is None

        (seen / "ballast").unlink()
        every = before | during
        wait_until(lambda: every <= set(rows()), "every row", proc, log)
        time.sleep(1.0)  # room for a duplicate to show up, were there one
        found = rows()
        assert set(found) == every
        assert all(len(r) == 1 and r[0]["status"] == "ok" for r in found.values()), found
        for [row] in found.values():  # never a row without its files
            assert (seen / "labels" / Path(row["labels"]).name).exists(), row
        wait_until(lambda: paused() == 0, "cellwatch_paused 0", proc, log)
        report = status_json(status_args)
        assert report["paused"] is None and report["daemon"]["pid"] == pid
        check_files_whole(seen)
        with JobQueue(state / DB_NAME, readonly=True) as queue:
            attempts = {job.rel_path: job.attempts for job in queue.jobs(("done",))}
        assert attempts == dict.fromkeys(every, 1), attempts  # no attempt spent on the pause
        text = log.read_text()
        assert text.count("pausing: the results disk is full") == 1, text
        assert text.count("resuming: the results disk has room again") == 1, text
        assert proc.pid == pid and proc.poll() is None  # never restarted
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        notify.close()
