"""The recorder: the exactly-once gate both runners compose (:mod:`cellwatch.service.recorder`).

A real :class:`JobQueue` in ``tmp_path`` with a fake clock, fake results and a fake model;
no pipeline, no TensorFlow.
"""

from __future__ import annotations

import errno
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from cellwatch.config import Config, override
from cellwatch.errors import TransientError
from cellwatch.pipeline import ImageResult
from cellwatch.service.driver import record_all
from cellwatch.service.engine import Engine, Paths
from cellwatch.service.jobs import FileVersion, Job, JobQueue
from cellwatch.service.recorder import RETRY_BASE_S, Recorder, retry_delay
from cellwatch.storage import ledger

ENGINE = Engine(Config(), SimpleNamespace(model=SimpleNamespace(label="fake@0123")))


def ok(job: Job, scene: int | None = None, sha: str | None = None) -> ImageResult:
    row = {"image": job.rel_path, "job_id": job.job_id, "status": "ok", "cell_count": 2,
           "sha256": sha or job.sha256, "scene": scene}  # fmt: skip
    cells = pd.DataFrame({"image": [job.rel_path] * 2, "job_id": [job.job_id] * 2,
                          "label": [1, 2], "scene": [scene] * 2})  # fmt: skip
    return ImageResult(row, cells)


@pytest.fixture
def setup(tmp_path: Path):
    paths = Paths(tmp_path / "inbox", tmp_path / "out", tmp_path / "state")
    paths.inbox.mkdir()
    clock = SimpleNamespace(now=1000.0)
    queue = JobQueue(paths.db, clock=lambda: clock.now)

    def claim(name: str, listed: list[int | None] | None = None, **kwargs) -> tuple[Recorder, Job]:
        """Queue and claim ``name``, a file of the ``listed`` scenes (default: one image)."""
        (paths.inbox / name).write_bytes(b"x")
        queue.add([FileVersion(name, 1, 1, f"sha-{name}")])
        kwargs.setdefault("scenes", lambda path: listed or [None])
        recorder = Recorder(paths, kwargs.pop("recorded", {}), **kwargs)
        [job] = recorder.claim(queue, 8)
        return recorder, job

    yield SimpleNamespace(paths=paths, clock=clock, queue=queue, claim=claim)
    queue.close()


def test_each_job_and_scene_gets_one_row_however_often_it_is_recorded(setup):
    recorder, job = setup.claim("a.tif", [0, 1])
    recorder.record_all([ok(job, 0), ok(job, 0), ok(job, 1)], ENGINE)
    recorder.record(ok(job, 1), ENGINE)  # e.g. run again after a crash
    rows = ledger.read(setup.paths.ledger)
    assert list(rows["scene"]) == ["0", "1"] and recorder.done == 2
    assert len(pd.read_csv(setup.paths.cells)) == 4
    assert recorder.outcome(job, [0, 1]) == "done"


def test_a_failed_write_notes_nothing_so_the_same_rows_can_be_written_again(setup):
    """The seam a full disk needs: the write is the one call that touches the ledger, and a
    key counts as recorded only once it returned."""
    full = {"left": 1}

    def write(results, out_dir):
        if full["left"]:
            full["left"] -= 1
            raise OSError(errno.ENOSPC, "No space left on device", str(out_dir / "ledger.csv"))
        record_all(results, out_dir)

    recorder, job = setup.claim("a.tif", write=write)
    with pytest.raises(OSError, match="No space left"):
        recorder.record(ok(job), ENGINE)
    assert recorder.missing(job, [None]) == [None] and recorder.done == 0
    recorder.record(ok(job), ENGINE)
    assert len(ledger.read(setup.paths.ledger)) == 1 and recorder.missing(job, [None]) == []


def test_the_plan_leaves_out_scenes_already_recorded(setup):
    recorder, job = setup.claim("p.czi", [0, 1, 2])
    recorder.record(ok(job, 1), ENGINE)
    assert recorder.plan(job, ENGINE) == ([0, 1, 2], [0, 2])


def test_a_file_that_cannot_be_opened_is_a_fault_to_retry(setup):
    gone = TransientError("share went away")

    def scenes(path: Path) -> list[int | None]:
        raise gone

    recorder, job = setup.claim("a.tif", scenes=scenes)
    assert recorder.plan(job, ENGINE) is gone
    assert not setup.paths.ledger.exists()


def test_a_job_that_keeps_stopping_the_daemon_gets_failed_rows_and_nothing_to_run(setup):
    recorder, job = setup.claim("p.czi", [0, 1])
    for _ in range(3):  # running at each of three stops
        setup.queue.recover({})
        [job] = setup.queue.claim(1)
    assert job.attempts == 4
    assert recorder.plan(job, ENGINE) == ([0, 1], [])
    rows = ledger.read(setup.paths.ledger)
    assert len(rows) == 2 and set(rows["status"]) == {"failed"}
    assert (
        rows["error"].str.contains("gave up after 3 attempts; last error: cellwatch stopped").all()
    )
    assert recorder.outcome(job, [0, 1]) == "failed" and recorder.failed == 2


def test_a_fault_is_retried_later_until_max_attempts_then_fails_the_missing_scenes(setup):
    recorder, job = setup.claim("p.czi", [0, 1])
    recorder.record(ok(job, 0), ENGINE)
    gone = TransientError("share went away")
    assert recorder.retry_or_give_up(setup.queue, job, ENGINE, gone, [0, 1]) is None
    assert retry_delay(1) == RETRY_BASE_S and retry_delay(3) == 4 * RETRY_BASE_S
    assert setup.queue.claim(1) == []  # not due before the delay
    setup.clock.now += RETRY_BASE_S
    [job] = setup.queue.claim(1)
    engine = Engine(override(Config(), **{"watch.max_attempts": 2}), ENGINE.segmenter)
    assert recorder.retry_or_give_up(setup.queue, job, engine, gone, [0, 1]) == "failed"
    rows = ledger.read(setup.paths.ledger)
    assert list(rows["status"]) == ["ok", "failed"] and list(rows["scene"]) == ["0", "1"]
    assert rows["error"][1] == "gave up after 2 attempts; last error: share went away"


def test_a_retry_can_be_due_at_once(setup):
    recorder, job = setup.claim("a.tif")
    recorder.retry_or_give_up(setup.queue, job, ENGINE, RuntimeError("died"), [None], delay=0.0)
    assert [j.rel_path for j in setup.queue.claim(1)] == ["a.tif"]


def test_content_it_was_not_asked_for_is_a_failed_row(setup):
    recorder, job = setup.claim("a.tif")
    result = recorder.check_content(job, ENGINE, ok(job, sha="other"))
    assert result.row["status"] == "failed" and "changed after it was queued" in result.row["error"]
    assert result.row["model"] == "fake@0123" and result.row["sha256"] == job.sha256
    assert recorder.check_content(job, ENGINE, ok(job)).row["status"] == "ok"


def test_a_file_swapped_for_a_link_out_of_the_inbox_is_refused_unread(setup, tmp_path: Path):
    recorder, job = setup.claim("a.tif")
    (setup.paths.inbox / "a.tif").unlink()
    (setup.paths.inbox / "a.tif").symlink_to(tmp_path / "elsewhere.tif")
    assert recorder.plan(job, ENGINE) == ([None], [])
    [row] = ledger.read(setup.paths.ledger).to_dict("records")
    assert row["status"] == "failed" and "outside the inbox" in row["error"]


def test_a_write_that_finds_the_disk_full_waits_and_lands_once(setup):
    """With the daemon's pause, a full disk costs time, never the row: the write is tried
    again after each wait, the pause shows in the metric while it lasts, and a stop during
    it hands the work back (:class:`Stopped`) with nothing written."""
    import threading

    from cellwatch.service.metrics import Metrics
    from cellwatch.service.pause import Pause, Stopped

    full = {"left": 2}
    seen: list[float] = []
    metrics = Metrics()

    def write(results, out_dir):
        seen.append(metrics.paused_gauge.labels(reason="disk_full")._value.get())
        if full["left"]:
            full["left"] -= 1
            raise TransientError("no room") from OSError(errno.ENOSPC, "No space left on device")
        record_all(results, out_dir)

    stop = threading.Event()
    pause = Pause(stop, metrics, first_s=0.01, most_s=0.02)
    recorder, job = setup.claim("a.tif", write=write, pause=pause, metrics=metrics)
    recorder.record(ok(job), ENGINE)
    assert seen == [0, 1, 1] and not pause.paused
    assert metrics.paused_gauge.labels(reason="disk_full")._value.get() == 0
    assert len(ledger.read(setup.paths.ledger)) == 1 and recorder.done == 1

    full["left"] = 99  # full until the daemon stops
    recorder2, job2 = setup.claim("b.tif", write=write, pause=pause, metrics=metrics)
    threading.Timer(0.1, stop.set).start()
    with pytest.raises(Stopped):
        recorder2.record(ok(job2), ENGINE)
    assert pause.paused and recorder2.missing(job2, [None]) == [None]


def test_other_write_errors_are_not_a_pause(setup):
    import threading

    from cellwatch.service.pause import Pause

    def write(results, out_dir):
        raise TransientError("share gone") from OSError(errno.EIO, "Input/output error")

    pause = Pause(threading.Event(), first_s=0.01)
    recorder, job = setup.claim("a.tif", write=write, pause=pause)
    with pytest.raises(TransientError, match="share gone"):
        recorder.record(ok(job), ENGINE)
    assert not pause.paused
