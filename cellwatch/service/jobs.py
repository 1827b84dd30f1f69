"""The durable job queue: one SQLite row per image version the daemon has to count.

A job is one version of one file: its path relative to the inbox and the SHA-256 of its
content. Its ``job_id`` is derived from those two, so the same content under the same name
is always the same job, even if the state database is deleted and rebuilt from a rescan,
and the ledger's ``job_id`` column can tell whether the job's row already landed. A file
replaced with new content under the same name is a new job. Size and modification time are
kept too, so a rescan recognises a file it has seen without reading it again.

States move ``pending → running → done | failed``; a transient fault sends a running job
back to ``pending`` with a delay. :meth:`JobQueue.claim` counts an attempt when a job
starts, so an image that keeps killing the daemon (out-of-memory kill, power cut) still
runs out of attempts instead of crash-looping forever.

The database runs in WAL mode with ``synchronous=FULL``: a committed state change survives
``kill -9`` and power cuts, and ``cellwatch status`` can read while the daemon writes. Each
thread opens its own :class:`JobQueue` (SQLite connections are not shared across threads).
"""

from __future__ import annotations

__all__ = [
    "DB_NAME",
    "SCHEMA_VERSION",
    "FileVersion",
    "Job",
    "JobQueue",
    "QueueError",
    "Recovery",
    "job_id_for",
    "state_dir",
]

import hashlib
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cellwatch.config import Config
from cellwatch.errors import CellwatchError

State = Literal["pending", "running", "done", "failed"]
SCHEMA_VERSION = 1
DB_NAME = "jobs.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL UNIQUE,
    rel_path TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'running', 'done', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    not_before REAL NOT NULL DEFAULT 0,
    recovered INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_file ON jobs (rel_path, size, mtime_ns);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, not_before, id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""
_COLUMNS = (
    "job_id, rel_path, size, mtime_ns, sha256, state, attempts, last_error, recovered,"
    " MAX(created_at, not_before)"
)


class QueueError(CellwatchError):
    """The job database cannot be opened or a job is not in the state an action needs."""


def job_id_for(rel_path: str, sha256: str) -> str:
    """The stable id of the job for ``rel_path`` holding content ``sha256``."""
    return hashlib.sha256(f"{rel_path}\0{sha256}".encode()).hexdigest()[:32]


def state_dir(config: Config) -> Path:
    """The state folder: ``watch.state_dir``, or ``.state`` inside the output folder."""
    if config.watch.state_dir is not None:
        return Path(config.watch.state_dir)
    return Path(config.output.dir) / ".state"


@dataclass(frozen=True)
class FileVersion:
    """A file in the inbox as the watcher found it, once stable."""

    rel_path: str  # relative to the inbox, with "/" separators
    size: int
    mtime_ns: int
    sha256: str

    @property
    def job_id(self) -> str:
        """The job's id: a hash of the file's path in the inbox and its content."""
        return job_id_for(self.rel_path, self.sha256)


@dataclass(frozen=True)
class Job:
    """One queued file version and where it stands: state, attempts, last error, when it is due."""

    job_id: str
    rel_path: str
    size: int
    mtime_ns: int
    sha256: str
    state: State
    attempts: int  # attempts started, this one included
    last_error: str | None
    recovered: bool  # was running when the daemon last stopped without finishing it
    due_at: float = 0.0  # when it was queued, or its retry delay ended (clock seconds)


@dataclass(frozen=True)
class Recovery:
    """What :meth:`JobQueue.recover` did at start-up."""

    already_recorded: int  # jobs whose ledger row had landed: marked done / failed
    requeued: int  # jobs found running: back to pending, to run again


class JobQueue:
    """The job table of one state folder.

    Parameters
    ----------
    path : Path
        The SQLite file (created with its folder unless ``readonly``).
    readonly : bool
        Open for reading only, as ``cellwatch status`` does while the daemon runs.
    clock : callable
        Wall-clock seconds, for retry delays and timestamps; tests pass a fake.
    """

    def __init__(
        self, path: Path, *, readonly: bool = False, clock: Callable[[], float] = time.time
    ) -> None:
        self.path = Path(path)
        self.clock = clock
        try:
            if readonly:
                if not self.path.is_file():
                    raise QueueError(
                        f"no job database at {self.path}: has `cellwatch watch` run with this "
                        "state folder? (see --state / watch.state_dir)"
                    )
                uri = f"{self.path.resolve().as_uri()}?mode=ro"
                self._db = sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._create_schema()
        except (sqlite3.Error, OSError) as exc:
            raise QueueError(
                f"cannot open the job database {self.path}: {exc}; check that the state "
                "folder exists and this user may write to it"
            ) from exc

    def close(self) -> None:
        """Close the database connection."""
        self._db.close()

    def __enter__(self) -> JobQueue:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _create_schema(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise QueueError(
                f"{self.path} was written by a newer cellwatch (schema {version}); upgrade "
                "cellwatch or point --state at a new folder"
            )
        with self._transaction():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    # --- the watcher's side ---------------------------------------------------------

    def seen(self, rel_path: str, size: int, mtime_ns: int) -> bool:
        """True if a job already covers this file with this size and modification time."""
        row = self._db.execute(
            "SELECT 1 FROM jobs WHERE rel_path = ? AND size = ? AND mtime_ns = ? LIMIT 1",
            (rel_path, size, mtime_ns),
        ).fetchone()
        return row is not None

    def add(self, files: Iterable[FileVersion]) -> list[str]:
        """Queue the files that are new content; return the job ids of the new jobs.

        A file whose content already has a job (touched, or copied in again unchanged) only
        gets its size and time updated, so it is not hashed again on the next rescan.
        """
        now = self.clock()
        new: list[str] = []
        with self._transaction():
            for f in files:
                exists = self._db.execute(
                    "SELECT 1 FROM jobs WHERE job_id = ?", (f.job_id,)
                ).fetchone()
                if exists:
                    self._db.execute(
                        "UPDATE jobs SET size = ?, mtime_ns = ? WHERE job_id = ?",
                        (f.size, f.mtime_ns, f.job_id),
                    )
                    continue
                self._db.execute(
                    "INSERT INTO jobs (job_id, rel_path, size, mtime_ns, sha256, state,"
                    " created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?)",
                    (f.job_id, f.rel_path, f.size, f.mtime_ns, f.sha256, now, now),
                )
                new.append(f.job_id)
        return new

    # --- the worker's side ----------------------------------------------------------

    def claim(self, limit: int) -> list[Job]:
        """Move up to ``limit`` due pending jobs to ``running``, counting an attempt each.

        A job recovered after a crash is claimed on its own, so if it is the image that
        brought the daemon down it cannot take a batch of good images with it again.
        """
        now = self.clock()
        with self._transaction():
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE state = 'pending' AND not_before <= ?"
                " ORDER BY recovered DESC, id LIMIT ?",
                (now, max(1, limit)),
            ).fetchall()
            if rows and rows[0][8]:
                rows = rows[:1]
            self._db.executemany(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, updated_at = ?"
                " WHERE job_id = ?",
                [(now, row[0]) for row in rows],
            )
        return [_job(row, state="running", attempts=row[6] + 1) for row in rows]

    def start(self, job_ids: Iterable[str]) -> None:
        """Move these pending jobs to ``running``, counting an attempt each (``cellwatch
        predict`` runs the jobs of its own inputs, not whatever is due)."""
        now = self.clock()
        with self._transaction():
            for job_id in job_ids:
                self._move(job_id, "pending", "running", now)
                self._db.execute(
                    "UPDATE jobs SET attempts = attempts + 1 WHERE job_id = ?", (job_id,)
                )

    def finish(self, outcomes: Mapping[str, State]) -> None:
        """Mark running jobs ``done`` or ``failed`` once their ledger rows are written."""
        now = self.clock()
        with self._transaction():
            for job_id, state in outcomes.items():
                if state not in ("done", "failed"):
                    raise QueueError(f"a job can only finish as done or failed, not {state!r}")
                self._move(job_id, "running", state, now, recovered=0)

    def retry(self, job_id: str, error: str, delay_s: float) -> None:
        """Send a running job back to ``pending``, due again after ``delay_s`` seconds."""
        now = self.clock()
        with self._transaction():
            self._move(
                job_id, "running", "pending", now, last_error=error, not_before=now + delay_s
            )

    def release(self, job_id: str) -> None:
        """Send a running job back to ``pending`` with its attempt not counted: it was
        lost through no fault of its own (the Dask scheduler went away, the daemon is
        stopping)."""
        now = self.clock()
        with self._transaction():
            self._move(job_id, "running", "pending", now, not_before=0.0)
            self._db.execute(
                "UPDATE jobs SET attempts = MAX(attempts - 1, 0) WHERE job_id = ?", (job_id,)
            )

    def _move(self, job_id: str, old: State, new: State, now: float, **values: object) -> None:
        sets = ", ".join(f"{key} = ?" for key in values)
        cursor = self._db.execute(
            f"UPDATE jobs SET state = ?, updated_at = ?{', ' + sets if sets else ''}"
            " WHERE job_id = ? AND state = ?",
            (new, now, *values.values(), job_id, old),
        )
        if cursor.rowcount != 1:
            row = self._db.execute("SELECT state FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            found = f"it is {row[0]}" if row else "there is no such job"
            raise QueueError(f"cannot move job {job_id} from {old} to {new}: {found}")

    # --- start-up -------------------------------------------------------------------

    def recover(self, recorded: Mapping[str, str]) -> Recovery:
        """Make the table agree with the ledger after an unclean stop.

        Parameters
        ----------
        recorded : mapping
            ``job_id → status`` of every row already in the ledger.

        Jobs whose row is in the ledger are finished (``done`` for an ``ok`` row, else
        ``failed``); jobs still ``running`` go back to ``pending`` to run again.
        """
        now = self.clock()
        already = requeued = 0
        with self._transaction():
            open_jobs = self._db.execute(
                "SELECT job_id, state FROM jobs WHERE state IN ('pending', 'running')"
            ).fetchall()
            for job_id, state in open_jobs:
                if job_id in recorded:
                    final = "done" if recorded[job_id] == "ok" else "failed"
                    self._db.execute(
                        "UPDATE jobs SET state = ?, recovered = 0, updated_at = ? WHERE job_id = ?",
                        (final, now, job_id),
                    )
                    already += 1
                elif state == "running":
                    self._db.execute(
                        "UPDATE jobs SET state = 'pending', recovered = 1, updated_at = ?"
                        " WHERE job_id = ?",
                        (now, job_id),
                    )
                    requeued += 1
        return Recovery(already, requeued)

    # --- for status and tests -------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Number of jobs in each state (every state present, zero when empty)."""
        counts = dict.fromkeys(("pending", "running", "done", "failed"), 0)
        for state, n in self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
            counts[state] = n
        return counts

    def jobs(self, states: Sequence[State] = ("pending", "running", "done", "failed")) -> list[Job]:
        """Jobs in the given states, oldest first."""
        marks = ", ".join("?" * len(states))
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM jobs WHERE state IN ({marks}) ORDER BY id", tuple(states)
        ).fetchall()
        return [_job(row) for row in rows]

    def set_meta(self, **values: str) -> None:
        """Record facts about the running daemon (model, heartbeat) for ``cellwatch status``."""
        with self._transaction():
            self._db.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                list(values.items()),
            )

    def meta(self) -> dict[str, str]:
        """The daemon's notes for ``cellwatch status`` (pid, heartbeat, model, compute)."""
        return dict(self._db.execute("SELECT key, value FROM meta").fetchall())


def _job(row: tuple, *, state: State | None = None, attempts: int | None = None) -> Job:
    job_id, rel_path, size, mtime_ns, sha256, old_state, old_attempts, error, recovered, due = row
    return Job(
        job_id=job_id,
        rel_path=rel_path,
        size=size,
        mtime_ns=mtime_ns,
        sha256=sha256,
        state=state or old_state,
        attempts=old_attempts if attempts is None else attempts,
        last_error=error,
        recovered=bool(recovered),
        due_at=due,
    )


class _Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (rolled back on error): one writer at a time, and
    the state change is on disk when the block ends."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
