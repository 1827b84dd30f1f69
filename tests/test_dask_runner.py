"""The Dask runner (:mod:`cellwatch.service.dask_runner`) with a fake pool in place of Dask.

The fake pool holds the submitted tasks until a test finishes them, and can lose its
scheduler; the job queue is a real one in ``tmp_path`` with a fake clock. No Dask, no
TensorFlow: tests/test_distributed.py runs the real thing.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest

from cellwatch.config import ComputeConfig, Config, override
from cellwatch.errors import ClusterError
from cellwatch.pipeline import ImageResult
from cellwatch.service.cluster import Finished
from cellwatch.service.dask_runner import DaskRunner
from cellwatch.service.engine import Engine, Paths
from cellwatch.service.jobs import FileVersion, JobQueue
from cellwatch.service.recorder import Recorder
from cellwatch.service.worker import Done
from cellwatch.storage import ledger


class KilledWorker(Exception):
    """Named as Dask's: the worker process running the task died."""


class FakePool:
    """Stands in for :class:`cellwatch.service.cluster.Pool`."""

    def __init__(self, threads: int = 1, in_flight_per_worker: int = 2) -> None:
        self.compute = ComputeConfig(scheduler=None, in_flight_per_worker=in_flight_per_worker)
        self.address = "tcp://fake:8786"
        self.dashboard = None
        self.up, self.workers = False, threads
        self.opened = 0
        self.tasks: dict[str, Any] = {}  # key -> Task, in flight
        self.ready: list[Finished] = []
        self.refuse: str | None = None  # open() fails with this, as an absent scheduler does

    @property
    def healthy(self) -> bool:
        return self.up

    def open(self) -> FakePool:
        if self.refuse:
            raise ClusterError(self.refuse)
        self.up, self.opened = True, self.opened + 1
        return self

    def close(self) -> None:
        self.up = False

    def warm_up(self, config: Config, folders: list, label: str) -> list[dict]:
        return [{"device": "CPU", "host": "here"}] * self.workers

    def warm_new(self, config: Config, folders: list, label: str) -> list[str]:
        return []

    def threads(self) -> int:
        return self.workers if self.up else 0

    def describe(self) -> dict[str, Any]:
        return {"scheduler": self.address, "workers": [{"threads": self.workers}]}

    def submit(self, key: str, task: Any) -> None:
        self.tasks[key] = task

    def finished(self, timeout: float) -> list[Finished]:
        ready, self.ready = self.ready, []
        return ready

    def drop_all(self) -> list[str]:
        keys = list(self.tasks)
        self.tasks.clear()
        return keys

    # --- what the tests do -----------------------------------------------------------

    def finish(self, key: str, error: BaseException | None = None, lost: bool = False) -> None:
        task = self.tasks.pop(key)
        if error is not None or lost:
            self.ready.append(Finished(key, None, error, lost=lost))
            return
        row = {"image": task.path, "job_id": task.job_id, "status": "ok", "cell_count": 3,
               "scene": task.scene, "model": task.model}  # fmt: skip
        cells = pd.DataFrame({"image": [task.path], "job_id": [task.job_id], "label": [1],
                              "scene": [task.scene]})  # fmt: skip
        done = Done(
            ImageResult(row, cells), worker="tcp://w1", device="CPU", stages={"labels": 0.1}
        )
        self.ready.append(Finished(key, done, None, lost=False))


@pytest.fixture
def setup(tmp_path: Path):
    paths = Paths(tmp_path / "inbox", tmp_path / "out", tmp_path / "state")
    paths.inbox.mkdir()
    clock = SimpleNamespace(now=1000.0)
    queue = JobQueue(paths.db, clock=lambda: clock.now)
    pool = FakePool()

    def make(names: list[str], scenes: dict | None = None, config: Config | None = None):
        for name in names:
            (paths.inbox / name).write_bytes(b"x")
        queue.add([FileVersion(name, 1, 1, f"sha-{name}") for name in names])
        listing = scenes or {}
        recorder = Recorder(paths, {}, scenes=lambda path: listing.get(path.name, [None]))
        engine = Engine(config or Config(), None, label="fake@0123")
        runner = DaskRunner(paths, engine, recorder, stop=threading.Event(),
                            wake=threading.Event(), pool=pool)  # fmt: skip
        assert runner.connect(at_start=True)
        return runner

    yield SimpleNamespace(paths=paths, clock=clock, queue=queue, pool=pool, make=make)
    queue.close()


def rows(paths: Paths) -> list[tuple[str, str, str]]:
    table = ledger.read(paths.ledger)
    return [(Path(r["image"]).name, r["scene"] if isinstance(r["scene"], str) else "", r["status"])
            for _, r in table.iterrows()]  # fmt: skip


def test_one_task_per_scene_within_the_window_then_one_row_each(setup):
    s = setup
    runner = s.make(["a.tif", "p.czi", "b.tif"], scenes={"p.czi": [0, 1]})
    assert runner.work(s.queue)
    assert len(s.pool.tasks) == 3  # a.tif, p.czi#0, p.czi#1: the window of 2 jobs
    assert runner.compute_status()["in_flight"] == 3
    for key in list(s.pool.tasks):
        s.pool.finish(key)
    assert runner.work(s.queue)  # records them, and hands Dask b.tif
    assert sorted(rows(s.paths)) == [
        ("a.tif", "", "ok"),
        ("p.czi", "0", "ok"),
        ("p.czi", "1", "ok"),
    ]
    [key] = s.pool.tasks
    s.pool.finish(key)
    runner.work(s.queue)
    assert s.queue.counts() == {"pending": 0, "running": 0, "done": 3, "failed": 0}
    assert runner.done == 4 and len(pd.read_csv(s.paths.cells)) == 4


def test_a_job_whose_worker_died_runs_again_at_once_then_fails_after_max_attempts(setup):
    s = setup
    runner = s.make(["a.tif"], config=override(Config(), **{"watch.max_attempts": 2}))
    assert runner.work(s.queue)
    for attempt in (1, 2):
        [key] = s.pool.tasks
        assert key.endswith(f"-{attempt}")  # a new key for each attempt
        s.pool.finish(key, error=KilledWorker("tcp://w1 died"))
        assert runner.work(s.queue)  # due again at once: claimed and handed out in one go
    assert rows(s.paths) == [("a.tif", "", "failed")]
    assert "gave up after 2 attempts; last error:" in ledger.read(s.paths.ledger)["error"][0]
    assert s.queue.counts()["failed"] == 1 and not s.pool.tasks


def test_a_lost_scheduler_sends_the_jobs_back_without_an_attempt_and_resumes(setup, caplog):
    s = setup
    runner = s.make(["a.tif", "b.tif"])
    runner.work(s.queue)
    assert len(s.pool.tasks) == 2
    s.pool.up, s.pool.refuse = False, "the Dask scheduler at tcp://fake:8786 does not answer"
    runner._next_connect = 0.0  # the reconnect delay has passed
    assert not runner.work(s.queue)
    assert runner.held == {} and s.queue.counts()["pending"] == 2
    assert all(job.attempts == 0 for job in s.queue.jobs(("pending",)))
    assert "does not answer" in (runner.compute_status()["problem"] or "")
    s.pool.refuse = None
    runner._next_connect = 0.0  # the reconnect delay has passed
    runner.work(s.queue)
    assert runner.problem is None and "is back; resuming" in caplog.text
    for key in list(s.pool.tasks):
        s.pool.finish(key)
    runner.work(s.queue)
    assert sorted(rows(s.paths)) == [("a.tif", "", "ok"), ("b.tif", "", "ok")]


def test_a_task_lost_with_the_scheduler_is_not_the_images_fault(setup):
    s = setup
    runner = s.make(["a.tif"])
    runner.work(s.queue)
    [key] = s.pool.tasks
    s.pool.finish(key, lost=True)
    runner.work(s.queue)  # back to the queue, and handed out again
    [job] = s.queue.jobs(("running",))
    assert job.attempts == 1 and not s.paths.ledger.exists()
    assert list(s.pool.tasks) == [key]  # the same attempt: the lost one was not counted


def test_without_workers_the_images_wait_and_status_says_why(setup):
    s = setup
    s.pool.workers = 0
    runner = s.make(["a.tif"])
    assert not runner.work(s.queue)
    assert s.pool.tasks == {} and s.queue.counts()["pending"] == 1
    assert "no Dask worker is connected" in (runner.compute_status()["problem"] or "")


def test_a_new_engine_goes_with_the_next_task(setup):
    """The seam a model switch on SIGHUP needs: tasks in flight keep their model, the next
    one carries the new one (each worker keeps both loaded)."""
    s = setup
    s.pool.compute = ComputeConfig(in_flight_per_worker=1)
    runner = s.make(["a.tif", "b.tif"])
    runner.work(s.queue)
    [first] = s.pool.tasks
    runner.use(Engine(Config(), None, label="new@4567"))
    s.pool.finish(first)
    runner.work(s.queue)
    [second] = s.pool.tasks
    s.pool.finish(second)
    runner.work(s.queue)
    models = ledger.read(s.paths.ledger).set_index("image")["model"]
    assert models.rename(lambda p: Path(p).name).to_dict() == {"a.tif": "fake@0123",
                                                               "b.tif": "new@4567"}  # fmt: skip


def test_a_lost_scheduler_is_said_once_and_tried_again_with_a_growing_wait(setup, caplog):
    """While the scheduler stays away, each failed try updates the status, not the log;
    the wait between tries doubles from RECONNECT_FIRST_S up to RECONNECT_S."""
    from cellwatch.service import dask_runner

    s = setup
    runner = s.make(["a.tif"])
    runner.work(s.queue)
    s.pool.up, s.pool.refuse = False, "cannot reach the Dask scheduler at tcp://fake:8786"
    waits = []
    for _ in range(7):
        runner._next_connect = 0.0  # the wait has passed
        before = time.monotonic()
        assert not runner.work(s.queue)
        waits.append(round(runner._next_connect - before))
    assert waits == [1, 2, 4, 8, 16, 30, 30] and dask_runner.RECONNECT_S == 30
    assert caplog.text.count("lost the Dask scheduler at tcp://fake:8786") == 1
    assert "cannot reach" not in caplog.text  # the tries' errors go to the status
    problem = runner.compute_status()["problem"] or ""
    assert problem.startswith("lost the Dask scheduler") and "last try: cannot reach" in problem
    s.pool.refuse = None
    runner._next_connect = 0.0
    runner.work(s.queue)
    assert runner.problem is None and caplog.text.count("is back; resuming") == 1


def test_an_image_whose_files_found_the_disk_full_goes_back_without_an_attempt(setup):
    from cellwatch.errors import DiskFullError
    from cellwatch.service.pause import Pause

    s = setup
    runner = s.make(["a.tif"])
    runner.pause = Pause(runner.stop, first_s=0.01)
    runner.work(s.queue)
    [key] = s.pool.tasks
    s.pool.finish(key, error=DiskFullError("could not write /out/labels/a.tif (No space left)"))
    runner.work(s.queue)  # back to the queue, paused a moment, and handed out again
    assert runner.pause.paused and not s.paths.ledger.exists()
    [job] = s.queue.jobs(("running",))
    assert job.attempts == 1  # the attempt the full disk took was not counted
    [key] = s.pool.tasks
    s.pool.finish(key)
    runner.work(s.queue)
    assert rows(s.paths) == [("a.tif", "", "ok")] and not runner.pause.paused


def test_a_full_disk_found_beside_an_image_that_landed_does_not_pause(setup):
    """A write that failed before space was freed, harvested with one that landed after:
    there is room, so no pause; the image goes back, its attempt unspent."""
    from cellwatch.errors import DiskFullError
    from cellwatch.service.pause import Pause

    s = setup
    runner = s.make(["a.tif", "b.tif"])
    runner.pause = Pause(runner.stop, first_s=60.0)  # a hold would stall the test
    runner.work(s.queue)
    a, b = sorted(s.pool.tasks, key=lambda key: Path(s.pool.tasks[key].path).name)
    s.pool.finish(a, error=DiskFullError("could not write /out/labels/a.tif (No space left)"))
    s.pool.finish(b)
    started = time.monotonic()
    runner.work(s.queue)
    assert time.monotonic() - started < 10 and runner.pause.changes == 0
    assert rows(s.paths) == [("b.tif", "", "ok")]
    [job] = s.queue.jobs(("pending", "running"))
    assert (job.rel_path, job.attempts) == ("a.tif", 1)
