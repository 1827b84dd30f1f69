"""``cellwatch predict``'s jobs, kept in the results folder so a second run does not count
an image twice.

Each image of a run is a job in ``<state folder>/predict.sqlite3`` (a
:class:`~cellwatch.service.jobs.JobQueue` of its own, so a daemon that shares the results
folder never claims them). The job's id is derived from the image's absolute, resolved
path, its content (SHA-256) and the settings hash, so running the same command again finds
the same jobs: an image whose job already has its row in the ledger is skipped, and a run
killed midway (Ctrl-C, ``kill -9``, a power cut) resumes where it stopped, the ledger's
``job_id`` column telling which rows landed (:class:`Gate`). ``--again`` makes a new
generation of jobs, so every image is counted anew.
"""

from __future__ import annotations

__all__ = ["PREDICT_DB", "Gate", "PredictJobs", "Run", "predict_job_id"]

import csv
import fcntl
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cellwatch.config import Config
from cellwatch.errors import ConfigError
from cellwatch.service.driver import record_all
from cellwatch.service.jobs import FileVersion, JobQueue, state_dir
from cellwatch.storage import ledger
from cellwatch.storage.imageio import sha256_file

PREDICT_DB = "predict.sqlite3"


def predict_job_id(path: str, sha256: str, settings_hash: str, generation: int) -> str:
    """The id of ``predict``'s job for the image at ``path`` (absolute, resolved) with
    content ``sha256``, counted with settings ``settings_hash``; ``generation`` grows by one
    each time ``--again`` counts the image anew."""
    text = f"predict\0{path}\0{sha256}\0{settings_hash}\0{generation}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class _Version(FileVersion):
    """A file version whose job id is ``predict``'s, not the inbox's."""

    id: str = ""

    @property
    def job_id(self) -> str:
        return self.id


@dataclass
class Run:
    """What one ``predict`` run has to do: its images and their job ids, in input order."""

    images: list[Path] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)
    skipped: int = 0  # images with a row for the same content and settings already
    resumed: int = 0  # images whose job an earlier run left unfinished


class Gate:
    """The exactly-once gate: appends a result's rows only if its ``(job_id, scene)`` has
    no row in the ledger yet (rows an interrupted run wrote before it was killed)."""

    def __init__(self, out_dir: Path, recorded: dict[tuple[str, str], str]) -> None:
        self.out_dir, self.recorded = out_dir, recorded
        self._by_job: dict[str, dict[str, str]] = {}
        for (job, scene), status in recorded.items():
            self._by_job.setdefault(job, {})[scene] = status

    def record(self, results: Sequence[Any]) -> list[Any]:
        """Append the rows of the results not yet in the ledger; return those results."""
        new: dict[tuple[str, str], Any] = {}
        for result in results:
            key = (result.row["job_id"], ledger.scene_key(result.row.get("scene")))
            if key not in self.recorded:
                new.setdefault(key, result)
        record_all(list(new.values()), self.out_dir)
        for (job, scene), result in new.items():
            self.recorded[job, scene] = result.row["status"]
            self._by_job.setdefault(job, {})[scene] = result.row["status"]
        return list(new.values())

    def outcome(self, job_id: str) -> str:
        """``done`` if every row of the job is ``ok``, else ``failed``."""
        statuses = self._by_job.get(job_id, {}).values()
        return "done" if statuses and all(s == "ok" for s in statuses) else "failed"


class PredictJobs:
    """``predict``'s job queue in the state folder of ``config``'s results folder."""

    def __init__(self, config: Config) -> None:
        self.out_dir = Path(os.path.abspath(config.output.dir))
        self.settings_hash = config.settings_hash()
        self._lock = _lock(state_dir(config) / (PREDICT_DB + ".lock"), self.out_dir)
        self.queue = JobQueue(state_dir(config) / PREDICT_DB)
        recorded, self._old_rows = _read_ledger(self.out_dir / "ledger.csv")
        self.gate = Gate(self.out_dir, recorded)
        # jobs running when an earlier run was killed: finished if their rows landed
        self.queue.recover({job: status for (job, scene), status in recorded.items() if not scene})

    def close(self) -> None:
        """Close the job database and let another run use this results folder."""
        self.queue.close()
        os.close(self._lock)

    def plan(self, images: Sequence[Path], *, again: bool = False) -> Run:
        """The images of this run still to count, with their job ids (queued, pending).

        ``images`` are absolute, resolved paths. An image whose latest job has its row is
        skipped (unless ``again``); one whose job is still open is resumed.
        """
        jobs = {job.job_id: job for job in self.queue.jobs()}
        in_ledger = {job for job, _ in self.gate.recorded}
        # a file with the size and time of a job's file is not read again to be hashed
        known = {(j.rel_path, j.size, j.mtime_ns): j.sha256 for j in jobs.values()}
        run, new = Run(), []
        for path in images:
            version = _version(path, known)
            if version is None:  # unreadable now: counted (and failed) like any image
                run.images.append(path)
                run.job_ids.append(predict_job_id(str(path), "unreadable", "", -1))
                continue

            def job_id(k: int, v: FileVersion = version) -> str:
                return predict_job_id(v.rel_path, v.sha256, self.settings_hash, k)

            last = -1
            while job_id(last + 1) in jobs or job_id(last + 1) in in_ledger:
                last += 1
            if again or last < 0:
                if not again and (str(path), version.sha256, self.settings_hash) in self._old_rows:
                    run.skipped += 1  # a row from before predict kept its jobs
                    continue
                chosen = job_id(last + 1)
                new.append(_Version(**vars(version), id=chosen))
            else:
                chosen = job_id(last)
                job = jobs.get(chosen)
                if job is None or job.state not in ("pending", "running"):
                    run.skipped += 1
                    continue
                run.resumed += 1
            run.images.append(path)
            run.job_ids.append(chosen)
        self.queue.add(new)
        return run

    def start(self, job_ids: Sequence[str]) -> None:
        """Mark the jobs running (an attempt each) as their images are handed over."""
        self.queue.start(job_ids)

    def record(self, results: Sequence[Any]) -> list[Any]:
        """Append the rows not yet in the ledger (:meth:`Gate.record`); return their results."""
        return self.gate.record(results)

    def finish(self, job_ids: Sequence[str]) -> None:
        """Mark the jobs done or failed by their rows in the ledger."""
        self.queue.finish({job: self.gate.outcome(job) for job in job_ids})


def _lock(path: Path, out_dir: Path) -> int:
    """Hold ``path`` locked while this run lasts: two runs resuming each other's jobs at
    once would count them twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(
            f"another `cellwatch predict` is writing to {out_dir} now; wait for it to end, "
            "or give this one another --out"
        ) from None
    return fd


def _version(path: Path, known: dict[tuple[str, int, int], str]) -> FileVersion | None:
    """The file's path, size, time and content hash (``known`` by its path, size and
    time, else read), or None if it cannot be read now."""
    try:
        st = path.stat()
        sha = known.get((str(path), st.st_size, st.st_mtime_ns)) or sha256_file(path)
        return FileVersion(str(path), st.st_size, st.st_mtime_ns, sha)
    except OSError:
        return None


def _read_ledger(
    path: Path,
) -> tuple[dict[tuple[str, str], str], set[tuple[str, str, str]]]:
    """``(job_id, scene) → status`` of the ledger's rows (as :func:`ledger.recorded`), and
    the ``(image, sha256, settings_hash)`` of every ``ok`` row, for rows written before
    ``predict`` kept its jobs (their job ids were random)."""
    recorded: dict[tuple[str, str], str] = {}
    rows: set[tuple[str, str, str]] = set()
    try:
        handle = path.open(newline="", encoding="utf-8")
    except FileNotFoundError:
        return recorded, rows
    with handle:
        for row in csv.DictReader(handle):
            if row.get("job_id"):
                recorded[(row["job_id"], ledger.scene_key(row.get("scene")))] = (
                    row.get("status") or ""
                )
            if row.get("status") == "ok" and row.get("sha256"):
                rows.add((row.get("image") or "", row["sha256"], row.get("settings_hash") or ""))
    return recorded, rows
