"""The local runner: the daemon's worker thread when the network runs in this process.

A fake pipeline stands in for :func:`cellwatch.pipeline.process_images` and a fake clock
for the queue's, with a real :class:`JobQueue` in ``tmp_path``; no TensorFlow.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from test_daemon import fake_engine, write_tiff

from cellwatch.config import Config, override
from cellwatch.errors import TransientError
from cellwatch.pipeline import ImageResult
from cellwatch.service.engine import Paths
from cellwatch.service.jobs import FileVersion, JobQueue
from cellwatch.service.local_runner import LocalRunner
from cellwatch.service.recorder import RETRY_BASE_S, Recorder
from cellwatch.storage import ledger


class FakePipeline:
    """Stands in for process_images: ``plan[name]`` lists what each call does to that
    image — "ok", an exception to raise, or "changed" (a different sha256)."""

    def __init__(self, plan: dict[str, list]) -> None:
        self.plan = plan
        self.calls: list[list[str]] = []

    def __call__(self, paths, *, config, segmenter, out_dir, job_ids, scenes):
        self.calls.append(
            [
                p.name + (f"#{s}" if s is not None else "")
                for p, s in zip(paths, scenes, strict=True)
            ]
        )
        results = []
        for path, job_id, scene in zip(paths, job_ids, scenes, strict=True):
            name = path.name + (f"#{scene}" if scene is not None else "")
            todo = self.plan[name].pop(0) if self.plan.get(name) else "ok"
            if isinstance(todo, Exception):
                raise todo
            sha = "changed" if todo == "changed" else f"sha-{path.name}"
            row = {"image": str(path), "job_id": job_id, "status": "ok", "cell_count": 1,
                   "sha256": sha, "model": segmenter.model.label, "scene": scene}  # fmt: skip
            cells = pd.DataFrame({"image": [str(path)], "job_id": [job_id], "label": [1],
                                  "scene": [scene]})  # fmt: skip
            results.append(ImageResult(row, cells))
        return results


@pytest.fixture
def worker_setup(tmp_path: Path):
    paths = Paths(tmp_path / "inbox", tmp_path / "out", tmp_path / "state")
    paths.inbox.mkdir()
    clock = SimpleNamespace(now=1000.0)
    queue = JobQueue(paths.db, clock=lambda: clock.now)

    def make(plan: dict[str, list], recorded: dict | None = None, scenes: dict | None = None,
             config: Config | None = None):  # fmt: skip
        """``scenes[name]``: the file's scenes (default: one image); plan keys of a
        multi-scene file are ``name#scene``."""
        scenes = scenes or {}
        names = sorted({name.split("#")[0] for name in plan} | set(scenes))
        for name in names:
            (paths.inbox / name).write_bytes(b"x")
        queue.add([FileVersion(name, 1, 1, f"sha-{name}") for name in names])
        fake = FakePipeline(plan)
        recorder = Recorder(paths, recorded if recorded is not None else {},
                            scenes=lambda path: scenes.get(path.name, [None]))  # fmt: skip
        worker = LocalRunner(paths, fake_engine(config or Config()), recorder,
                             stop=threading.Event(), wake=threading.Event(), process=fake)  # fmt: skip
        return worker, fake

    yield SimpleNamespace(paths=paths, clock=clock, queue=queue, make=make)
    queue.close()


def ledger_rows(paths: Paths) -> dict[str, dict[str, str]]:
    """Rows by image name (``name#scene`` for a scene of a file of several)."""
    rows = ledger.read(paths.ledger)
    rows["scene"] = rows["scene"].fillna("")
    assert not rows[["job_id", "scene"]].duplicated().any()
    return {Path(r["image"]).name + (f"#{r['scene']}" if r["scene"] else ""): r
            for _, r in rows.iterrows()}  # fmt: skip


def test_worker_retries_a_transient_fault_without_holding_up_the_batch(worker_setup):
    s = worker_setup
    gone = TransientError("share went away")
    worker, fake = s.make({"a.tif": [], "b.tif": [gone, gone], "c.tif": []})
    assert worker.work(s.queue)
    assert fake.calls == [["a.tif", "b.tif", "c.tif"], ["a.tif"], ["b.tif"], ["c.tif"]]
    assert set(ledger_rows(s.paths)) == {"a.tif", "c.tif"}
    [b] = s.queue.jobs(("pending",))
    assert (b.rel_path, b.last_error) == ("b.tif", "share went away")
    assert not worker.work(s.queue)  # not due before the retry delay
    s.clock.now += RETRY_BASE_S + 1
    assert worker.work(s.queue)
    assert ledger_rows(s.paths)["b.tif"]["status"] == "ok"
    assert s.queue.counts() == {"pending": 0, "running": 0, "done": 3, "failed": 0}


def test_worker_gives_up_after_max_attempts_with_the_last_error(worker_setup):
    s = worker_setup
    full = OSError(errno.ENOSPC, "No space left on device", "/out/labels/a.tif")
    worker, fake = s.make({"a.tif": [full, full, ValueError("boom")]})
    for _ in range(3):
        assert worker.work(s.queue)
        s.clock.now += 1000
    row = ledger_rows(s.paths)["a.tif"]
    assert row["status"] == "failed"
    assert "gave up after 3 attempts" in row["error"] and "unexpected error" in row["error"]
    assert not worker.work(s.queue)  # failed is final
    assert len(fake.calls) == 3


def test_worker_records_a_job_already_in_the_ledger_only_once(worker_setup):
    s = worker_setup
    job_id = FileVersion("a.tif", 1, 1, "sha-a.tif").job_id
    worker, fake = s.make({"a.tif": [], "b.tif": []}, recorded={(job_id, ""): "ok"})
    worker.work(s.queue)
    assert fake.calls == [["b.tif"]]  # a's row landed before a crash: not run again
    assert s.queue.counts()["done"] == 2


def test_worker_gives_freed_memory_back_after_each_batch(worker_setup):
    s = worker_setup
    worker, _ = s.make({"a.tif": [], "b.tif": []})
    trims = []
    worker.trim = lambda: trims.append(s.queue.counts()["done"])
    assert worker.work(s.queue)
    assert trims == [2]  # once the batch is recorded and finished
    assert not worker.work(s.queue)
    assert trims == [2]  # an idle poll has nothing to give back


def test_worker_fails_an_image_that_keeps_killing_the_daemon(worker_setup):
    s = worker_setup
    worker, fake = s.make({"a.tif": []})
    for _ in range(3):
        s.queue.claim(1)
        s.queue.recover({})
    worker.work(s.queue)
    assert fake.calls == []
    assert "cellwatch stopped while processing" in ledger_rows(s.paths)["a.tif"]["error"]


def test_worker_does_not_count_content_it_was_not_asked_for(worker_setup):
    s = worker_setup
    worker, _ = s.make({"a.tif": ["changed"]})
    worker.work(s.queue)
    row = ledger_rows(s.paths)["a.tif"]
    assert row["status"] == "failed" and "changed after it was queued" in row["error"]
    assert not (s.paths.cells).exists()


def test_worker_reads_no_file_swapped_for_a_link_out_or_a_fifo_after_it_was_queued(
    worker_setup, tmp_path: Path
):
    s = worker_setup
    secret = write_tiff(tmp_path / "elsewhere" / "private.tif", [(20, 20)])
    worker, fake = s.make({"a.tif": [], "b.tif": [], "c.tif": []})
    (s.paths.inbox / "a.tif").unlink()
    (s.paths.inbox / "a.tif").symlink_to(secret)
    (s.paths.inbox / "b.tif").unlink()
    os.mkfifo(s.paths.inbox / "b.tif")
    worker.work(s.queue)
    assert fake.calls == [["c.tif"]]  # neither a.tif nor b.tif reached the image reader
    rows = ledger_rows(s.paths)
    assert rows["a.tif"]["status"] == "failed"
    assert f"a symbolic link to {secret}, outside the inbox" in rows["a.tif"]["error"]
    assert "did not read it" in rows["a.tif"]["error"]
    assert rows["b.tif"]["status"] == "failed"
    assert "is a FIFO (named pipe), not a regular file" in rows["b.tif"]["error"]
    assert rows["c.tif"]["status"] == "ok"


def test_worker_records_each_scene_once_and_skips_scenes_already_in_the_ledger(worker_setup):
    s = worker_setup
    job_id = FileVersion("p.czi", 1, 1, "sha-p.czi").job_id
    worker, fake = s.make({}, recorded={(job_id, "0"): "ok"}, scenes={"p.czi": [0, 1, 2]})
    assert worker.work(s.queue)
    assert fake.calls == [["p.czi#1", "p.czi#2"]]  # scene 0's row landed before a crash
    rows = ledger_rows(s.paths)
    assert set(rows) == {"p.czi#1", "p.czi#2"} and rows["p.czi#1"]["job_id"] == job_id
    assert s.queue.counts()["done"] == 1
    cells = pd.read_csv(s.paths.cells, dtype=str)
    assert list(cells["scene"]) == ["1", "2"] and tuple(cells.columns) == ledger.CELL_COLUMNS


def test_worker_runs_again_only_the_scenes_without_a_row(worker_setup):
    s = worker_setup
    gone = TransientError("share went away")
    worker, fake = s.make({"p.czi#1": [gone, gone]}, scenes={"p.czi": [0, 1, 2]})
    assert worker.work(s.queue)
    assert set(ledger_rows(s.paths)) == {"p.czi#0", "p.czi#2"}
    [job] = s.queue.jobs(("pending",))  # the file waits for its retry, two scenes counted
    assert job.last_error == "share went away"
    s.clock.now += RETRY_BASE_S + 1
    assert worker.work(s.queue)
    assert fake.calls[-1] == ["p.czi#1"]
    assert set(ledger_rows(s.paths)) == {"p.czi#0", "p.czi#1", "p.czi#2"}
    assert s.queue.counts() == {"pending": 0, "running": 0, "done": 1, "failed": 0}


def test_worker_records_scenes_a_group_at_a_time(worker_setup):
    """A long file's rows land as it goes: tiling.images_at_once scenes at a time."""
    s = worker_setup
    config = override(Config(), **{"tiling.images_at_once": 2})
    worker, fake = s.make({}, scenes={"p.czi": [0, 1, 2], "q.tif": [None]}, config=config)
    landed = []
    real = fake.__call__

    def spy(paths, **kwargs):
        landed.append(len(ledger.read(s.paths.ledger)))
        return real(paths, **kwargs)

    worker._process = spy
    assert worker.work(s.queue)
    assert fake.calls == [["p.czi#0", "p.czi#1"], ["p.czi#2", "q.tif"]]
    assert landed == [0, 2]  # the first group's rows were written before the second ran


def test_a_new_engine_counts_from_the_next_group_of_images(worker_setup):
    """The seam a model switch on SIGHUP needs: the runner reads its engine per group of
    ``tiling.images_at_once`` images, not once per batch of jobs."""
    s = worker_setup
    config = override(Config(), **{"tiling.images_at_once": 1})
    worker, fake = s.make({"a.tif": [], "b.tif": []}, config=config)
    real = fake.__call__

    def reload_during_the_first_image(paths, **kwargs):
        results = real(paths, **kwargs)
        worker.use(fake_engine(config, label="new@4567"))
        return results

    worker._process = reload_during_the_first_image
    assert worker.work(s.queue)
    rows = ledger_rows(s.paths)
    assert (rows["a.tif"]["model"], rows["b.tif"]["model"]) == ("fake@0123", "new@4567")
    assert s.queue.counts()["done"] == 2


def test_worker_gives_up_on_a_file_of_scenes_with_a_row_for_each_missing_scene(worker_setup):
    s = worker_setup
    job_id = FileVersion("p.czi", 1, 1, "sha-p.czi").job_id
    worker, fake = s.make({}, recorded={(job_id, "0"): "ok"}, scenes={"p.czi": [0, 1, 2]})
    for _ in range(3):
        s.queue.claim(1)
        s.queue.recover({})
    worker.work(s.queue)
    assert fake.calls == []
    rows = ledger_rows(s.paths)
    assert set(rows) == {"p.czi#1", "p.czi#2"}
    assert all("cellwatch stopped while processing" in r["error"] for r in rows.values())
    assert s.queue.counts()["failed"] == 1


def test_worker_thread_reports_why_it_stopped(worker_setup):
    s = worker_setup
    worker, _ = s.make({"a.tif": []})
    s.paths.out.write_text("a file where the output folder should be")
    worker.wake.set()
    thread = threading.Thread(target=worker.run)
    thread.start()
    thread.join(10)
    assert not thread.is_alive() and "cannot write to" in (worker.error or "")


def test_a_label_image_that_finds_the_disk_full_is_run_again_without_an_attempt(worker_setup):
    """The pause (:mod:`cellwatch.service.pause`): an image whose files found no room is
    processed again once the wait is over, and its job ends done at its first attempt; a
    stop while the disk stays full sends the jobs back, their attempt not spent."""
    from cellwatch.errors import DiskFullError
    from cellwatch.service.pause import Pause

    s = worker_setup
    full = DiskFullError("could not write /out/labels/a.tif (No space left on device)")
    worker, fake = s.make({"a.tif": [full, full], "b.tif": []})
    worker.pause = Pause(worker.stop, first_s=0.01, most_s=0.02)
    worker.recorder.pause = worker.pause
    assert worker.work(s.queue)
    assert fake.calls == [["a.tif", "b.tif"], ["a.tif"], ["b.tif"], ["a.tif"]]  # a: once more
    rows = ledger_rows(s.paths)
    assert {name: row["status"] for name, row in rows.items()} == {"a.tif": "ok", "b.tif": "ok"}
    assert {j.rel_path: j.attempts for j in s.queue.jobs(("done",))} == {"a.tif": 1, "b.tif": 1}
    # b landed after a found the disk full, so there was room: a went again at once, no pause
    assert not worker.pause.paused and worker.pause.changes == 0

    worker2, _ = s.make({"c.tif": [full] * 1000})
    worker2.pause = Pause(worker2.stop, first_s=0.01, most_s=0.02)
    threading.Timer(0.2, worker2.stop.set).start()
    assert worker2.work(s.queue)
    [c] = s.queue.jobs(("pending",))
    assert (c.rel_path, c.attempts) == ("c.tif", 0) and "c.tif" not in ledger_rows(s.paths)
    assert worker2.pause.paused and worker2.pause.changes == 1  # paused once, however many tries
