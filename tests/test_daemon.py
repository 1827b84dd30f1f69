"""``cellwatch watch`` and ``cellwatch status``.

Most tests here run the real ``cellwatch watch`` process on a temporary inbox, with a tiny
threshold model and short stable times, and look only at what a user sees: ledger rows,
exit status, sd_notify messages. Starting TensorFlow costs seconds, so each of those tests
starts the daemon as few times as it can and checks several things per start. The worker,
sd_notify and status have fast in-process tests too.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import tifffile
import yaml
from conftest import discs, imagej_header, ome_header, write_pages

from cellwatch import cli
from cellwatch.config import Config, OutputConfig, load_config, override
from cellwatch.service import daemon, status
from cellwatch.service.daemon import Daemon
from cellwatch.service.engine import Engine, Paths
from cellwatch.service.jobs import FileVersion, JobQueue, QueueError
from cellwatch.service.local_runner import LocalRunner
from cellwatch.service.sdnotify import Notifier, watchdog_interval
from cellwatch.storage import ledger

CELLWATCH = Path(sys.executable).with_name("cellwatch")


# --- helpers ----------------------------------------------------------------------------


class NotifySocket:
    """A datagram socket in the abstract namespace standing in for systemd; a thread
    keeps reading it, as systemd does (a full socket would make senders drop messages)."""

    def __init__(self) -> None:
        self.name = f"@cellwatch-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.sock.settimeout(0.05)
        self.received: list[str] = []
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read)
        self._reader.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                self.received.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue

    def poll(self) -> list[str]:
        return list(self.received)

    def wait_for(self, line: str, *, after: int = 0, timeout: float = 120.0) -> int:
        """Index of the first message from ``after`` on that has ``line`` in it."""
        deadline = time.monotonic() + timeout
        while True:
            for i, message in enumerate(self.poll()[after:], start=after):
                if line in message.split("\n"):
                    return i
            if time.monotonic() > deadline:
                raise AssertionError(f"no {line} in {timeout} s; got {self.received[after:]}")
            time.sleep(0.02)

    def close(self) -> None:
        self._closed.set()
        self._reader.join()
        self.sock.close()


def write_config(path: Path, model: Path | None, **watch: float) -> Path:
    settings = {
        "model": {"path": str(model) if model else None},
        "tiling": {"tile_size": 64, "overlap": 8, "batch_size": 8},
        "watch": {"stable_time_s": 0.5, "rescan_interval_s": 2.0, "incomplete_timeout_s": 2.0}
        | watch,
        "report": {"refresh_interval_s": 1.0},
    }
    path.write_text(yaml.safe_dump(settings))
    return path


class Cellwatch:
    """The real ``cellwatch watch`` process on ``tmp/inbox`` → ``tmp/out``."""

    def __init__(self, tmp: Path, config: Path) -> None:
        self.tmp, self.config = tmp, config
        self.inbox, self.out = tmp / "inbox", tmp / "out"
        self.inbox.mkdir(exist_ok=True)
        self.notify = NotifySocket()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, wait_ready: bool = True, umask: int = -1) -> float:
        """Start the daemon (with ``umask``, if not -1); return seconds until READY=1."""
        env = dict(os.environ, NOTIFY_SOCKET=self.notify.name, WATCHDOG_USEC="1000000")
        env.update(TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
        env.pop("WATCHDOG_PID", None)
        self.starts += 1
        self.mark = len(self.notify.poll())
        log = (self.tmp / f"daemon-{self.starts}.log").open("wb")
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [CELLWATCH, "watch", "--config", self.config, "--inbox", self.inbox, "--out", self.out],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            umask=umask,
        )
        log.close()
        if wait_ready:
            self.notify.wait_for("READY=1", after=self.mark)
        return time.monotonic() - started

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.tmp.glob("daemon-*.log")))

    def rows(self) -> list[dict[str, str]]:
        path = self.out / "ledger.csv"
        if not path.exists():
            return []
        with path.open(newline="") as handle:
            return [row for row in csv.DictReader(handle) if row.get("job_id")]

    def wait_rows(self, done, timeout: float = 90.0) -> list[dict[str, str]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.rows()
            if done(rows):
                return rows
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"cellwatch exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"timed out; {len(self.rows())} rows\n{self.log()[-3000:]}")

    def close(self) -> None:
        self.kill()
        self.notify.close()


@pytest.fixture
def run_cellwatch(tmp_path: Path):
    runs: list[Cellwatch] = []

    def make(config: Path) -> Cellwatch:
        runs.append(Cellwatch(tmp_path, config))
        return runs[-1]

    yield make
    for run in runs:
        run.close()


def write_tiff(path: Path, centres: list[tuple[int, int]], shape=(64, 64), radius=5) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image, _ = discs(shape, centres, radius)
    tifffile.imwrite(path, image)
    return path


def by_image(rows: list[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    out: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        out.setdefault(Path(row["image"]).name, []).append(row)
    return out


def check_files_whole(out: Path) -> pd.DataFrame:
    """Ledger and cells.csv: every line complete, no job twice in the ledger; cells per
    job (deduplicated as docs/daemon.md tells readers to) match the ledger's count."""
    for name, columns in (("ledger.csv", ledger.COLUMNS), ("cells.csv", ledger.CELL_COLUMNS)):
        text = (out / name).read_text()
        assert text.endswith("\n"), f"{name} ends in a torn line"
        lines = list(csv.reader(text.splitlines()))
        assert tuple(lines[0]) == columns
        assert all(len(line) == len(columns) for line in lines), f"{name} has a torn line"
    rows = ledger.read(out / "ledger.csv")
    rows["scene"] = rows["scene"].fillna("")
    assert not rows[["job_id", "scene"]].duplicated().any(), "an image has two ledger rows"
    cells = pd.read_csv(out / "cells.csv", dtype={"job_id": str, "scene": str})
    cells["scene"] = cells["scene"].fillna("")
    cells = cells[cells["job_id"].isin(set(rows["job_id"]))]
    cells = cells.drop_duplicates(["job_id", "scene", "label"], keep="last")
    per_image = cells.groupby(["job_id", "scene"]).size()
    for _, row in rows[rows["status"].eq("ok")].iterrows():
        assert per_image.get((row["job_id"], row["scene"]), 0) == row["cell_count"], row["image"]
    return rows


# --- the daemon, end to end -------------------------------------------------------------


def test_watch_counts_each_new_file_once(run_cellwatch, tmp_path: Path, threshold_model: Path):
    """Slow writers, .part renames, move-ins and bad files; status; SIGHUP; sd_notify;
    SIGTERM — one daemon start."""
    alpha = shutil.copy(threshold_model, tmp_path / "alpha.keras")
    config = write_config(tmp_path / "config.yaml", Path(alpha))
    cw = run_cellwatch(config)
    ready_s = cw.start()
    inbox = cw.inbox

    # bad files: each gets one failed row, and the daemon keeps going
    rng = np.random.default_rng(0)
    (inbox / "corrupt.tif").write_bytes(b"II*\x00" + rng.bytes(3000))
    whole = write_tiff(tmp_path / "whole.tif", [(20, 20)]).read_bytes()
    (inbox / "truncated.tif").write_bytes(whole[: len(whole) // 2])
    (inbox / "empty.tif").write_bytes(b"")
    (inbox / "wrong-type.tif").write_text("plate layout: A1 control, A2 drug\n")
    (inbox / "text.png").write_text("not a picture")
    (inbox / "notes.txt").write_text("not an image name: never a row")

    # written as .part, left there longer than the stable time, then renamed
    write_tiff(inbox / "renamed.tif.part", [(20, 20), (40, 40)])
    time.sleep(1.0)
    os.rename(inbox / "renamed.tif.part", inbox / "renamed.tif")

    # moved in from another folder, into a subfolder of the inbox
    moved = write_tiff(tmp_path / "elsewhere" / "moved.tif", [(15, 15), (30, 45), (50, 20)])
    (inbox / "day2").mkdir()
    os.rename(moved, inbox / "day2" / "moved.tif")

    # written in chunks over ~3 s, with one pause longer than the stable time
    centres = [(40, 40), (40, 200), (128, 128), (200, 60), (210, 200)]
    data = write_tiff(tmp_path / "big.tif", centres, shape=(256, 256), radius=12).read_bytes()
    chunks = [data[i : i + 4096] for i in range(0, len(data), 4096)]
    with (inbox / "slow.tif").open("wb") as handle:
        for i, chunk in enumerate(chunks):
            handle.write(chunk)
            handle.flush()
            time.sleep(1.0 if i == len(chunks) // 2 else 0.15)
    complete = time.time()

    names = {"corrupt.tif", "truncated.tif", "empty.tif", "wrong-type.tif", "text.png"}
    names |= {"renamed.tif", "moved.tif", "slow.tif"}
    rows = cw.wait_rows(lambda rows: names <= set(by_image(rows)))
    time.sleep(1.0)  # room for a duplicate to show up, were there one
    rows = by_image(cw.rows())
    assert set(rows) == names
    assert all(len(r) == 1 for r in rows.values()), rows
    slow = rows["slow.tif"][0]
    assert (slow["status"], slow["cell_count"]) == ("ok", "5")
    assert pd.Timestamp(slow["processed_at"]).timestamp() > complete
    assert rows["renamed.tif"][0]["cell_count"] == "2"
    assert rows["moved.tif"][0]["cell_count"] == "3"
    assert rows["moved.tif"][0]["image"] == str(inbox / "day2" / "moved.tif")
    for name in ("corrupt.tif", "truncated.tif", "empty.tif", "wrong-type.tif", "text.png"):
        assert rows[name][0]["status"] == "failed" and rows[name][0]["error"], name
    assert "empty" in rows["empty.tif"][0]["error"]

    # `cellwatch status` while the daemon runs
    report = status_json(["--config", str(config), "--out", str(cw.out)])
    assert report["daemon"]["running"] and report["daemon"]["pid"] == cw.proc.pid
    assert report["queue"] == {"waiting": 0, "in_progress": 0, "retrying": 0,
                               "last_retry_error": None}  # fmt: skip
    assert (report["today"]["counted"], report["today"]["failed"]) == (3, 5)
    assert report["model"].startswith("alpha@")
    assert Path(report["last_error"]["image"]).name in names
    assert report["images_per_minute"] > 0

    # SIGHUP: reload the configuration and the model
    beta = shutil.copy(threshold_model, tmp_path / "beta.keras")
    write_config(config, Path(beta))
    mark = len(cw.notify.poll())
    cw.proc.send_signal(signal.SIGHUP)
    reloading = cw.notify.wait_for("RELOADING=1", after=mark, timeout=60)
    cw.notify.wait_for("READY=1", after=reloading, timeout=60)
    write_tiff(inbox / "after-reload.tif", [(30, 30)])
    rows = cw.wait_rows(lambda rows: "after-reload.tif" in by_image(rows))
    assert by_image(rows)["after-reload.tif"][0]["model"].startswith("beta@")
    assert by_image(rows)["slow.tif"][0]["model"].startswith("alpha@")

    # SIGTERM: a clean stop, and systemd heard READY, WATCHDOG and STOPPING
    assert cw.stop() == 0
    ready = cw.notify.wait_for("READY=1", timeout=0)
    assert cw.notify.wait_for("WATCHDOG=1", after=ready, timeout=0) > ready
    assert cw.notify.wait_for("STOPPING=1", after=ready, timeout=0) > ready
    assert any(m.startswith("STATUS=") for m in cw.notify.poll())
    assert "Traceback" not in cw.log()
    assert len(cw.rows()) == 9  # no row for the .part file, the .txt file or twice for any
    check_files_whole(cw.out)
    # the daemon keeps today's report page up to date (written at start, then refreshed)
    today = datetime.now(UTC).date().isoformat()  # the test config keeps report.timezone UTC
    assert "slow.tif" in (cw.out / "reports" / f"{today}.html").read_text()
    print(f"\nREADY after {ready_s:.1f} s")


def other_group() -> int | None:
    """A group this process may give files to other than its own, if there is one."""
    if os.geteuid() == 0:
        return 4242  # root may use any group id
    return next((g for g in os.getgroups() if g != os.getegid()), None)


def test_inbox_cannot_be_used_to_read_other_files(
    run_cellwatch, tmp_path: Path, threshold_model: Path
):
    """Links out of the inbox get a failed row and are never read; a FIFO is logged once
    and holds nothing up; links are followed with watch.follow_symlinks: true (SIGHUP);
    under the unit's UMask=0027 results are group-readable and not world-readable."""
    config = write_config(tmp_path / "config.yaml", threshold_model)
    cw = run_cellwatch(config)
    elsewhere = tmp_path / "elsewhere"  # readable by the service, not part of the inbox
    secret = write_tiff(elsewhere / "private.tif", [(20, 20), (44, 44)])
    os.mkfifo(elsewhere / "pipe.tif")  # opening it would block the reader forever
    group = other_group()
    cw.out.mkdir()
    if group is not None:
        os.chown(cw.out, -1, group)
    os.chmod(cw.out, 0o2750)  # setgid, as docs/daemon.md tells a lab to make it

    # waiting at start (found by the first rescan) and dropped in afterwards (events)
    (cw.inbox / "link-out.tif").symlink_to(secret)
    (cw.inbox / "link-to-fifo.tif").symlink_to(elsewhere / "pipe.tif")
    write_tiff(cw.inbox / "day1" / "real.tif", [(30, 30)])
    (cw.inbox / "link-in.tif").symlink_to("day1/real.tif")
    os.mkfifo(cw.inbox / "pipe.tif")
    cw.start(umask=0o027)
    (cw.inbox / "day2").mkdir()
    (cw.inbox / "day2" / "later-out.tif").symlink_to("../../elsewhere/private.tif")
    write_tiff(cw.inbox / "after.tif", [(15, 15), (45, 45), (30, 30)])

    links_out = {"link-out.tif": secret, "link-to-fifo.tif": elsewhere / "pipe.tif",
                 "later-out.tif": Path("../../elsewhere/private.tif")}  # fmt: skip
    names = {"real.tif", "link-in.tif", "after.tif", *links_out}
    cw.wait_rows(lambda rows: names <= set(by_image(rows)))
    time.sleep(4.5)  # two more rescans (every 2 s) find the FIFO again
    rows = by_image(cw.rows())
    assert set(rows) == names  # none for the FIFO
    for name, target in links_out.items():
        [row] = rows[name]
        assert row["status"] == "failed" and Path(row["image"]).name == name
        assert f"{name} is a symbolic link to {target}, outside the inbox" in row["error"]
        assert "cellwatch did not read it" in row["error"] and not row["sha256"]
    assert not [p.name for p in cw.out.rglob("*out*")]  # no label image or overlay of them
    assert [(rows[n][0]["status"], rows[n][0]["cell_count"]) for n in ("link-in.tif", "after.tif")] == [
        ("ok", "1"), ("ok", "3")]  # fmt: skip
    assert cw.log().count("pipe.tif is a FIFO (named pipe), not a regular file") == 1

    # watch.follow_symlinks: true (SIGHUP): a link is followed wherever it points
    settings = yaml.safe_load(config.read_text())
    settings["watch"]["follow_symlinks"] = True
    config.write_text(yaml.safe_dump(settings))
    mark = len(cw.notify.poll())
    cw.proc.send_signal(signal.SIGHUP)
    reloading = cw.notify.wait_for("RELOADING=1", after=mark, timeout=60)
    cw.notify.wait_for("READY=1", after=reloading, timeout=60)
    (cw.inbox / "followed.tif").symlink_to(secret)
    rows = by_image(cw.wait_rows(lambda rows: "followed.tif" in by_image(rows)))
    assert (rows["followed.tif"][0]["status"], rows["followed.tif"][0]["cell_count"]) == ("ok", "2")
    assert cw.stop() == 0
    assert "Traceback" not in cw.log()

    # every result is readable by the results folder's group, and by nobody else
    results = [cw.out, *cw.out.rglob("*")]
    assert any(p.suffix == ".html" for p in results) and any(p.suffix == ".png" for p in results)
    for path in results:
        st = path.stat()
        assert st.st_mode & 0o007 == 0, f"{path} is world-accessible ({oct(st.st_mode)})"
        assert st.st_mode & 0o040, f"{path} is not group-readable ({oct(st.st_mode)})"
        assert group is None or st.st_gid == group, f"{path} has group {st.st_gid}"


def test_a_stack_written_page_by_page_is_counted_once_whole(
    run_cellwatch, tmp_path: Path, threshold_model: Path
):
    """A writer pauses after plane 1 for longer than stable_time_s: the stack is counted
    once, whole; a stack that never gets its other planes fails, naming found/expected."""
    config = write_config(
        tmp_path / "config.yaml", threshold_model, stable_time_s=0.5, incomplete_timeout_s=5.0
    )
    cw = run_cellwatch(config)
    cw.start()
    centres = [[(20, 20), (20, 70)], [(70, 20), (70, 70)], [(45, 45)]]  # 2 + 2 + 1 cells
    planes = np.stack([discs((96, 96), c, 8)[0] for c in centres])
    headers = {
        "stack.ome.tif": ome_header(planes),
        "hyper.tif": imagej_header(3),
        "stopped.ome.tif": ome_header(planes),
    }
    handles = {name: (cw.inbox / name).open("wb") for name in headers}
    writers = {name: write_pages(handles[name], planes, h) for name, h in headers.items()}
    try:
        for pages in writers.values():
            assert next(pages) == 1
        time.sleep(2.0)  # 4 × stable_time_s: the file does not change, yet is not whole
        for name in ("stack.ome.tif", "hyper.tif"):
            assert list(writers[name]) == [2, 3]
            handles[name].close()
        rows = cw.wait_rows(lambda rows: set(headers) <= set(by_image(rows)))
        time.sleep(1.5)  # room for a second row, were there one
    finally:
        for name in headers:
            writers[name].close()
            handles[name].close()
    rows = by_image(cw.rows())
    assert {name: len(r) for name, r in rows.items()} == dict.fromkeys(headers, 1)
    for name in ("stack.ome.tif", "hyper.tif"):
        assert (rows[name][0]["status"], rows[name][0]["cell_count"]) == ("ok", "5"), rows[name]
    stopped = rows["stopped.ome.tif"][0]
    assert stopped["status"] == "failed"
    assert "incomplete: it has 1 of the 3 planes its OME-XML declares (SizeZ 3" in stopped["error"]
    assert cw.stop() == 0
    assert "has not become a complete image" in cw.log()


def test_backlog_of_1000_files_is_counted_once(run_cellwatch, tmp_path: Path, threshold_model):
    """1,000 files waiting at start; a SIGTERM half-way loses nothing; a restart finishes."""
    config = write_config(
        tmp_path / "config.yaml", threshold_model, stable_time_s=0.3, rescan_interval_s=60
    )
    cw = run_cellwatch(config)
    rng = random.Random(1)
    expected = {}
    for i in range(1000):
        n = rng.randint(0, 2)
        centres = [(8, 8), (22, 22)][:n]
        write_tiff(cw.inbox / f"plate{i // 100}" / f"img{i:04d}.tif", centres, (32, 32), 4)
        expected[f"img{i:04d}.tif"] = n

    cw.start()
    first = time.monotonic()
    cw.wait_rows(lambda rows: len(rows) >= 300, timeout=120)
    assert cw.stop() == 0  # SIGTERM mid-backlog: finishes the batch in hand, exits 0
    first_s, first_rows = time.monotonic() - first, len(cw.rows())
    with JobQueue(cw.out / ".state" / "jobs.sqlite3", readonly=True) as queue:
        counts = queue.counts()
        done = {job.job_id for job in queue.jobs(("done",))}
    assert counts["running"] == 0
    assert done == {row["job_id"] for row in cw.rows()}

    cw.start()
    second = time.monotonic()
    rows = cw.wait_rows(lambda rows: len(rows) >= 1000, timeout=180)
    second_s = time.monotonic() - second
    time.sleep(1.0)
    assert cw.stop() == 0
    rows = cw.rows()
    assert len(rows) == 1000
    assert Counter(Path(r["image"]).name for r in rows) == dict.fromkeys(expected, 1)
    assert all(r["status"] == "ok" for r in rows)
    assert {Path(r["image"]).name: int(r["cell_count"]) for r in rows} == expected
    check_files_whole(cw.out)
    rate = 1000 / (first_s + second_s)
    print(f"\nbacklog: {first_rows} rows in {first_s:.1f} s, the rest in {second_s:.1f} s "
          f"after restart ({rate:.0f} images/s, excluding start-up)")  # fmt: skip


def test_kill_9_at_random_moments_never_loses_or_doubles_a_row(
    run_cellwatch, tmp_path: Path, threshold_model
):
    config = write_config(
        tmp_path / "config.yaml",
        threshold_model,
        stable_time_s=0.2,
        rescan_interval_s=0.5,
        incomplete_timeout_s=0.3,
        max_attempts=10,  # each kill can cost the images in hand an attempt
    )
    cw = run_cellwatch(config)
    seed = int(os.environ.get("CELLWATCH_KILL_SEED", "20240611"))
    rng = random.Random(seed)
    good, bad = {}, set()
    for i in range(50):
        name = f"w{i:02d}.tif"
        if i % 10 == 7:
            (cw.inbox / name).write_bytes(
                b"II*\x00" + bytes(rng.getrandbits(8) for _ in range(500))
            )
            bad.add(name)
        else:
            n = 1 + i % 5
            centres = [(20 + 25 * k, 20 + 20 * k) for k in range(n)]
            write_tiff(cw.inbox / name, centres, shape=(128, 128), radius=8)
            good[name] = n
    # the files appear in five waves, one of them while the daemon runs
    hidden = tmp_path / "later"
    hidden.mkdir()
    names = sorted(good | dict.fromkeys(bad))
    waves = [names[i::5] for i in range(5)]
    for name in names:
        if name not in waves[0]:
            os.rename(cw.inbox / name, hidden / name)

    def move_in(wave: list[str]) -> None:
        for name in wave:
            os.rename(hidden / name, cw.inbox / name)

    kills = []  # per round: (rows at the start, rows at the kill, files in the inbox)
    for round_, wave in enumerate(waves):
        while_running = round_ == 2
        if round_ > 0 and not while_running:
            move_in(wave)
        before = len(cw.rows())
        cw.start()
        if while_running:
            move_in(wave)
        present = len(list(cw.inbox.iterdir()))
        if round_ == 0:  # while the start-up scan finds and queues the files
            time.sleep(rng.uniform(0.0, 0.6))
        else:  # in the middle of the run, a few images into it
            target = min(before + rng.randint(1, 6), present)
            cw.wait_rows(lambda rows, target=target: len(rows) >= target, timeout=60)
            time.sleep(rng.uniform(0.0, 0.1))
        cw.kill()
        kills.append((before, len(cw.rows()), present))
    # a crash in the middle of an append, as a power cut could leave it
    with (cw.out / "ledger.csv").open("a") as handle:
        handle.write("2024-06-11T10:00:00+00:00,/inbox/w01.tif,ab")
    with (cw.out / "cells.csv").open("a") as handle:
        handle.write("/inbox/w01.tif,deadbeef,1,20.")

    cw.start()
    expected = set(good) | bad
    cw.wait_rows(lambda rows: expected <= set(by_image(rows)), timeout=120)
    time.sleep(1.0)
    assert cw.stop() == 0
    rows = by_image(cw.rows())
    assert set(rows) == expected
    for name, n in good.items():
        assert [(r["status"], r["cell_count"]) for r in rows[name]] == [("ok", str(n))], name
    for name in bad:
        assert [r["status"] for r in rows[name]] == ["failed"], name
    check_files_whole(cw.out)
    with JobQueue(cw.out / ".state" / "jobs.sqlite3", readonly=True) as queue:
        assert queue.counts() == {"pending": 0, "running": 0, "done": 45, "failed": 5}
    print(f"\nkill -9 seed {seed}: (rows at start, rows at kill, files) per round: {kills}")


# --- the daemon's main loop, in process (fast: no TensorFlow) ----------------------------


def fake_engine(config: Config, label: str = "fake@0123") -> Engine:
    return Engine(config, SimpleNamespace(model=SimpleNamespace(label=label), stopwatch=None))


def test_main_loop_stops_watchdog_and_exits_1_when_a_thread_dies(tmp_path: Path, monkeypatch):
    (tmp_path / "inbox").mkdir()
    config = load_config(write_config(tmp_path / "c.yaml", None))
    config = override(config, **{"watch.inbox": str(tmp_path / "inbox"),
                                 "output.dir": str(tmp_path / "out")})  # fmt: skip
    monkeypatch.setattr(daemon, "load_engine", fake_engine)
    monkeypatch.setattr(LocalRunner, "run", lambda self: time.sleep(0.5))  # the worker dies
    notify = NotifySocket()
    try:
        environ = {"NOTIFY_SOCKET": notify.name, "WATCHDOG_USEC": "100000"}
        code = Daemon(lambda: config, Notifier(environ)).serve()
        time.sleep(0.1)
    finally:
        notify.close()
    messages = notify.poll()
    assert code == 1
    lines = [m.split("\n")[0] for m in messages]
    assert lines.index("READY=1") < lines.index("WATCHDOG=1")
    assert lines[-1] == "STOPPING=1" and "WATCHDOG=1" not in lines[lines.index("STOPPING=1") :]
    assert 2 <= lines.count("WATCHDOG=1") <= 12  # every 50 ms for about half a second


def test_the_daemon_notes_its_host_next_to_its_pid(tmp_path: Path, monkeypatch):
    """`cellwatch status` checks the pid only on the daemon's own machine: the daemon must
    say which machine that is (a state folder on a share is read from others)."""
    (tmp_path / "inbox").mkdir()
    config = load_config(write_config(tmp_path / "c.yaml", None))
    config = override(config, **{"watch.inbox": str(tmp_path / "inbox"),
                                 "output.dir": str(tmp_path / "out")})  # fmt: skip
    monkeypatch.setattr(daemon, "load_engine", fake_engine)
    monkeypatch.setattr(LocalRunner, "run", lambda self: time.sleep(0.3))
    assert Daemon(lambda: config, Notifier({})).serve() == 1
    with JobQueue(Paths.of(config).db, readonly=True) as queue:
        meta = queue.meta()
    assert (meta["pid"], meta["host"]) == (str(os.getpid()), socket.gethostname())


def test_recovery_leaves_a_file_of_scenes_to_the_worker(tmp_path: Path):
    """At start-up a job with some scene rows is not marked done: only the worker knows
    how many scenes the file has."""
    paths = Paths(tmp_path / "inbox", tmp_path / "out", tmp_path / "state")
    paths.inbox.mkdir()
    one, many = FileVersion("a.tif", 1, 1, "sha-a"), FileVersion("p.czi", 1, 1, "sha-p")
    ledger.append_rows(paths.ledger, [{"job_id": one.job_id, "status": "ok"},
                                      {"job_id": many.job_id, "scene": 0, "status": "ok"}])  # fmt: skip
    with JobQueue(paths.db) as queue:
        queue.add([one, many])
        queue.claim(2)
        config = override(Config(), **{"watch.inbox": str(paths.inbox),
                                       "output.dir": str(paths.out),
                                       "watch.state_dir": str(paths.state)})  # fmt: skip
        recorded = Daemon(lambda: config)._recover(queue)
        assert recorded == {(one.job_id, ""): "ok", (many.job_id, "0"): "ok"}
        [job] = queue.jobs(("pending",))
        assert job.rel_path == "p.czi" and queue.counts()["done"] == 1


# --- sd_notify ----------------------------------------------------------------------------


def test_notifier_sends_to_a_path_socket(tmp_path: Path):
    path = tmp_path / "n.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        assert Notifier({"NOTIFY_SOCKET": str(path)}).send("READY=1", "STATUS=two\nlines")
        assert sock.recv(100) == b"READY=1\nSTATUS=two lines"


def test_notifier_without_systemd_does_nothing():
    assert not Notifier({}).enabled and not Notifier({}).send("READY=1")
    assert not Notifier({"NOTIFY_SOCKET": "vsock:2:1"}).enabled


def test_notifier_failure_is_logged_once(tmp_path: Path, caplog):
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert not notifier.send("READY=1") and not notifier.status("x")
    assert caplog.text.count("cannot notify systemd") == 1


def test_watchdog_interval():
    assert watchdog_interval({"WATCHDOG_USEC": "2000000"}) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({}) is None and watchdog_interval({"WATCHDOG_USEC": "0"}) is None


# --- cellwatch status -------------------------------------------------------------------


def status_json(argv: list[str]) -> dict:
    from contextlib import redirect_stdout
    from io import StringIO

    buffer = StringIO()
    with redirect_stdout(buffer):
        assert cli.main(["status", "--json", *argv]) == 0
    return json.loads(buffer.getvalue())


def test_status_reports_queue_today_rate_and_last_error(tmp_path: Path):
    out = tmp_path / "out"
    now = pd.Timestamp("2026-03-02T12:00:00+00:00").to_pydatetime()
    with JobQueue(out / ".state" / "jobs.sqlite3") as queue:
        queue.add([FileVersion(f"{i}.tif", 1, 1, str(i)) for i in range(4)])
        queue.claim(1)
        queue.set_meta(pid=str(os.getpid()), heartbeat="2026-03-02T11:59:55+00:00", state="running",
                       model="unet@abc")  # fmt: skip
    stamps = ["2026-03-01T23:00:00+00:00", "2026-03-02T08:00:00+00:00",
              "2026-03-02T11:55:00+00:00", "2026-03-02T11:58:00+00:00"]  # fmt: skip
    ledger.append_rows(out / "ledger.csv", [
        {"processed_at": stamps[0], "image": "/in/old.tif", "status": "failed", "error": "old"},
        {"processed_at": stamps[1], "image": "/in/x.tif", "status": "failed", "error": "empty"},
        {"processed_at": stamps[2], "image": "/in/y.tif", "status": "ok"},
        {"processed_at": stamps[3], "image": "/in/z.tif", "status": "ok"},
    ])  # fmt: skip
    config = Config(output=OutputConfig(dir=str(out)))
    report = status.collect(config, now=now)
    assert report["daemon"] == {"running": True, "pid": os.getpid(), "heartbeat": "2026-03-02T11:59:55+00:00",
                                "heartbeat_age_s": 5.0}  # fmt: skip
    assert report["model"] == "unet@abc"
    assert report["queue"]["waiting"] == 3 and report["queue"]["in_progress"] == 1
    assert report["today"]["counted"] == 2 and report["today"]["failed"] == 1
    assert report["images_per_minute"] == 0.2  # two rows in the last ten minutes
    assert report["last_error"]["image"] == "/in/x.tif"
    text = status.format_text(report)
    assert f"running, pid {os.getpid()}" in text and "3 waiting, 1 in progress" in text
    assert "/in/x.tif: empty" in text and "0.2 images/min" in text
    later = status.collect(config, now=now + pd.Timedelta(minutes=5).to_pytimedelta())
    assert not later["daemon"]["running"]
    assert "not running (last seen" in status.format_text(later)


def test_status_without_a_daemon_says_what_to_do(tmp_path: Path, capsys):
    assert cli.main(["status", "--out", str(tmp_path)]) == 1
    assert "has `cellwatch watch` run" in capsys.readouterr().err
    with pytest.raises(QueueError):
        status.collect(Config(output=OutputConfig(dir=str(tmp_path))))
