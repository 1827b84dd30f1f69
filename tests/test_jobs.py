"""The durable job queue: states, dedupe, new content, attempts, recovery after a crash."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from cellwatch.config import Config, WatchConfig
from cellwatch.service.jobs import FileVersion, JobQueue, QueueError, job_id_for, state_dir


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def version(
    name: str = "a.tif", content: str = "c1", size: int = 10, mtime: int = 1
) -> FileVersion:
    return FileVersion(name, size, mtime, f"sha-{content}")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def queue(tmp_path: Path, clock: Clock):
    with JobQueue(tmp_path / "state" / "jobs.sqlite3", clock=clock) as q:
        yield q


def test_database_is_durable(queue: JobQueue):
    mode = queue._db.execute("PRAGMA journal_mode").fetchone()[0]
    sync = queue._db.execute("PRAGMA synchronous").fetchone()[0]
    assert (mode, sync) == ("wal", 2)  # 2 = FULL


def test_pending_running_done(queue: JobQueue):
    [job_id] = queue.add([version()])
    assert queue.counts()["pending"] == 1
    [job] = queue.claim(8)
    assert (job.job_id, job.state, job.attempts, job.rel_path) == (job_id, "running", 1, "a.tif")
    assert queue.claim(8) == []  # a running job is not handed out twice
    queue.finish({job_id: "done"})
    assert queue.counts() == {"pending": 0, "running": 0, "done": 1, "failed": 0}


def test_claim_takes_oldest_first_up_to_limit(queue: JobQueue):
    queue.add([version(f"{i}.tif", str(i)) for i in range(5)])
    assert [j.rel_path for j in queue.claim(3)] == ["0.tif", "1.tif", "2.tif"]
    assert [j.rel_path for j in queue.claim(3)] == ["3.tif", "4.tif"]


def test_state_survives_reopening(tmp_path: Path, clock: Clock):
    path = tmp_path / "jobs.sqlite3"
    with JobQueue(path, clock=clock) as q:
        [job_id] = q.add([version()])
        q.claim(1)
    with JobQueue(path, clock=clock) as q:
        [job] = q.jobs()
        assert (job.job_id, job.state, job.attempts) == (job_id, "running", 1)


def test_same_file_unchanged_is_not_queued_again(queue: JobQueue):
    assert len(queue.add([version()])) == 1
    assert queue.add([version()]) == []
    assert queue.seen("a.tif", 10, 1)
    assert not queue.seen("a.tif", 10, 2)
    assert len(queue.jobs()) == 1


def test_touched_file_with_same_content_is_the_same_job(queue: JobQueue):
    queue.add([version(mtime=1)])
    assert queue.add([version(mtime=5)]) == []  # same name, same content: same image
    assert queue.seen("a.tif", 10, 5)  # ...and the next rescan need not hash it again
    assert len(queue.jobs()) == 1


def test_replaced_content_under_same_name_is_a_new_job(queue: JobQueue):
    [first] = queue.add([version(content="c1")])
    queue.claim(1)
    queue.finish({first: "done"})
    [second] = queue.add([version(content="c2", mtime=2)])
    assert second != first
    assert [j.state for j in queue.jobs()] == ["done", "pending"]


def test_same_content_under_another_name_is_another_image(queue: JobQueue):
    assert len(queue.add([version("a.tif"), version("b.tif")])) == 2


def test_job_id_is_derived_from_path_and_content():
    assert job_id_for("a.tif", "sha-x") == version("a.tif", "x").job_id
    assert job_id_for("a.tif", "x") != job_id_for("a.tif", "y")
    assert job_id_for("a.tif", "x") != job_id_for("b.tif", "x")
    assert len(job_id_for("a.tif", "x")) == 32


def test_retry_waits_then_counts_attempts(queue: JobQueue, clock: Clock):
    [job_id] = queue.add([version()])
    assert queue.claim(1)[0].attempts == 1
    queue.retry(job_id, "share went away", delay_s=30)
    assert queue.claim(1) == []  # not due yet
    clock.now += 31
    [job] = queue.claim(1)
    assert (job.attempts, job.last_error) == (2, "share went away")
    queue.retry(job_id, "still gone", delay_s=0)
    assert queue.claim(1)[0].attempts == 3
    queue.finish({job_id: "failed"})
    assert queue.counts()["failed"] == 1
    assert queue.claim(1) == []  # failed is final: never retried


def test_transitions_from_the_wrong_state_are_refused(queue: JobQueue):
    [job_id] = queue.add([version()])
    with pytest.raises(QueueError, match="from running to done: it is pending"):
        queue.finish({job_id: "done"})
    with pytest.raises(QueueError, match="no such job"):
        queue.retry("nope", "x", 0)
    queue.claim(1)
    with pytest.raises(QueueError, match="only finish as done or failed"):
        queue.finish({job_id: "pending"})  # type: ignore[dict-item]


def test_recover_finishes_jobs_already_in_the_ledger(queue: JobQueue):
    ids = queue.add([version(f"{i}.tif", str(i)) for i in range(4)])
    queue.claim(3)  # 0, 1, 2 running; 3 pending
    recovery = queue.recover({ids[0]: "ok", ids[1]: "failed", ids[3]: "ok"})
    assert (recovery.already_recorded, recovery.requeued) == (3, 1)
    states = {j.job_id: j.state for j in queue.jobs()}
    assert states == {ids[0]: "done", ids[1]: "failed", ids[2]: "pending", ids[3]: "done"}


def test_recovered_job_runs_alone_first(queue: JobQueue):
    ids = queue.add([version(f"{i}.tif", str(i)) for i in range(4)])
    queue.claim(2)
    queue.recover({})
    first = queue.claim(8)
    assert [j.job_id for j in first] == [ids[0]] and first[0].recovered
    assert [j.job_id for j in queue.claim(8)] == [ids[1]]
    assert [j.job_id for j in queue.claim(8)] == ids[2:]


def test_attempts_include_runs_cut_short_by_a_crash(queue: JobQueue):
    queue.add([version()])
    for attempt in (1, 2, 3):
        [job] = queue.claim(1)
        assert job.attempts == attempt
        queue.recover({})  # the daemon died while the job was running
    assert queue.claim(1)[0].attempts == 4  # the worker sees 4 > max_attempts and gives up


def test_meta_round_trip(queue: JobQueue):
    queue.set_meta(model="m@1", pid="12")
    queue.set_meta(model="m@2")
    assert queue.meta() == {"model": "m@2", "pid": "12"}


def test_readonly_reader_sees_writes_of_the_daemon(queue: JobQueue):
    queue.add([version()])
    with JobQueue(queue.path, readonly=True) as reader:
        assert reader.counts()["pending"] == 1
        queue.claim(1)
        assert reader.counts()["running"] == 1
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            reader._db.execute("DELETE FROM jobs")


def test_readonly_without_database_says_what_to_do(tmp_path: Path):
    with pytest.raises(QueueError, match="has `cellwatch watch` run"):
        JobQueue(tmp_path / "missing.sqlite3", readonly=True)


def test_unwritable_location_is_a_readable_error(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(QueueError, match="cannot open the job database"):
        JobQueue(blocker / "jobs.sqlite3")


def test_newer_schema_is_refused(tmp_path: Path):
    path = tmp_path / "jobs.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(QueueError, match="newer cellwatch"):
        JobQueue(path)


def test_state_dir_defaults_under_the_output_folder():
    assert state_dir(Config()) == Path("results") / ".state"
    config = Config(watch=WatchConfig(state_dir="/var/lib/cellwatch"))
    assert state_dir(config) == Path("/var/lib/cellwatch")
