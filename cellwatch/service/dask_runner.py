"""The daemon's worker thread when Dask worker processes run the images (``compute``).

It claims jobs while fewer than :attr:`Pool.window <cellwatch.service.cluster.Pool.window>`
are in flight, submits one task per image, and hands the results to the
:class:`~cellwatch.service.recorder.Recorder` as they come back: the rows of all results at
hand in one append, then their jobs finished in one commit. A worker that died holding a job
costs that job one attempt and it runs again on another (:data:`cellwatch.errors.WORKER_DIED`
in its row after ``watch.max_attempts``). When the scheduler is out of reach, or has no
workers, the jobs wait in the queue (the ones in flight go back to it, their attempt not
counted), the log says so once (and again once a minute while it lasts), ``cellwatch
status`` shows it, the scheduler is tried again after 1 s, 2 s, 4 s, … (at most every
:data:`RECONNECT_S`), and the work resumes when the scheduler is back (a scheduler
restarted at the same address included).
"""

from __future__ import annotations

__all__ = [
    "PROBLEM_EVERY_S",
    "RECONNECT_FIRST_S",
    "RECONNECT_S",
    "STATUS_EVERY_S",
    "STOP_DRAIN_S",
    "DaskRunner",
]

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from cellwatch.errors import disk_full
from cellwatch.service.crash import crash_point
from cellwatch.service.engine import Engine, Paths
from cellwatch.service.jobs import Job, JobQueue
from cellwatch.service.pause import Pause, Stopped
from cellwatch.service.recorder import Recorder
from cellwatch.storage import ledger

log = logging.getLogger("cellwatch.watch")

RECONNECT_FIRST_S = 1.0  # the first wait before a lost Dask scheduler is tried again
RECONNECT_S = 30.0  # the longest wait between two tries (the wait doubles up to it)
PROBLEM_EVERY_S = 60.0  # how often a lasting problem (no scheduler, no workers) is logged again
STOP_DRAIN_S = 30.0  # on stop, how long the images in flight on Dask workers are waited for
STATUS_EVERY_S = 2.5  # how often the workers' list for `cellwatch status` is refreshed


@dataclass
class _InFlight:
    """A job whose images are on Dask: how many are still out, and what went wrong."""

    job: Job
    scenes: list[int | None]
    waiting: int
    fault: Exception | None = None  # the first error an image of it raised
    lost: bool = False  # a task went with the scheduler or a stop: not the image's fault


class DaskRunner:
    """Hands jobs to Dask workers and has their results recorded.

    Parameters
    ----------
    paths : Paths
        Inbox, output and state folders.
    engine : Engine
        Settings and the model's label; the main thread swaps it on SIGHUP (:meth:`use`).
    recorder : Recorder
        The exactly-once gate that plans each job's images and appends their rows.
    stop, wake : threading.Event
        Set to finish; set when new jobs are queued.
    pool : cellwatch.service.cluster.Pool
        The Dask client (and local cluster) to use; tests pass a fake.
    pause : Pause, optional
        The daemon's pause (:mod:`cellwatch.service.pause`): an image whose files found
        the results disk full goes back to the queue, its attempt not spent, and the
        runner waits before it hands Dask more work.
    """

    def __init__(
        self,
        paths: Paths,
        engine: Engine,
        recorder: Recorder,
        *,
        stop: threading.Event,
        wake: threading.Event,
        pool: Any,
        pause: Pause | None = None,
    ) -> None:
        self.paths, self.engine, self.recorder = paths, engine, recorder
        self.stop, self.wake = stop, wake
        self.pool = pool
        self.pause = pause
        self.error: str | None = None
        self._queue: JobQueue | None = None  # the worker thread's connection, while it runs
        self.held: dict[str, tuple[Job, int | None]] = {}  # Dask key -> (job, scene) it runs
        self._jobs: dict[str, _InFlight] = {}  # job_id -> its scenes still on Dask
        self.problem: str | None = None
        self._said: tuple[str | None, float] = (None, 0.0)
        self._next_connect = 0.0
        self._connect_wait = RECONNECT_FIRST_S
        self._lost: str | None = None  # said once when a scheduler we had goes away
        self._up = False  # connected, as far as this runner knows
        self._status: dict[str, Any] = {"mode": "dask", "workers": []}
        self._next_status = 0.0

    @property
    def done(self) -> int:
        """Images counted since start."""
        return self.recorder.done

    @property
    def failed(self) -> int:
        """Images given a failed row since start."""
        return self.recorder.failed

    def use(self, engine: Engine) -> None:
        """Hand Dask ``engine``'s settings and model from the next task on; the main thread
        calls this on SIGHUP. Tasks in flight finish with the model they were sent with
        (each worker keeps the old model and the new one loaded)."""
        self.engine = engine

    def connect(self, *, at_start: bool = False) -> bool:
        """Connected to a scheduler (starting the local cluster, or joining
        ``compute.scheduler``, at most every :data:`RECONNECT_S`), with the workers there
        warmed up; False while it is out of reach.

        Raises
        ------
        ClusterError, ModelError
            At start only: the local cluster does not start, a worker cannot see the
            inbox or the output folder, or the model does not load.
        """
        from cellwatch.errors import ClusterError
        from cellwatch.service.cluster import describe_start

        if self.pool.healthy:
            return True
        if time.monotonic() < self._next_connect:
            return False
        if self._up:  # a scheduler we had just went away
            self._lost = (
                f"lost the Dask scheduler at {self.pool.address}; the {len(self.held)} "
                "image(s) in flight go back to the queue, their attempt not counted; "
                f"trying to reconnect (at most every {RECONNECT_S:.0f} s)"
            )
            self._trouble(self._lost)
            self._up, self._connect_wait = False, RECONNECT_FIRST_S
        self._next_connect = time.monotonic() + self._connect_wait
        self._connect_wait = min(self._connect_wait * 2, RECONNECT_S)
        self._release_all()
        _quiet_cancelled_reconnects()
        self.pool.close()
        try:
            self.pool.open()
            folders = [(self.paths.inbox, False), (self.paths.out, True)]
            found = self.pool.warm_up(self.engine.config, folders, self.engine.model_label)
        except Exception as exc:  # a scheduler going or coming back fails in many ways
            if at_start and (
                self.pool.compute.scheduler is None or not isinstance(exc, ClusterError)
            ):
                raise
            if self._lost is not None:  # said once; the status shows the last try
                self._trouble(f"{self._lost}; last try: {exc}", topic=self._lost)
            else:
                self._trouble(str(exc))
            self.pool.close()
            return False
        log.info("%s", describe_start(self.pool, found))
        if self.problem:
            log.warning("the Dask scheduler at %s is back; resuming", self.pool.address)
        self.problem = self._lost = None
        self._up, self._connect_wait = True, RECONNECT_FIRST_S
        return True

    def run(self) -> None:
        """The worker thread: an error outside one image's processing ends it, as for
        :meth:`LocalRunner.run <cellwatch.service.local_runner.LocalRunner.run>`; on stop it
        waits up to :data:`STOP_DRAIN_S` for the images in flight, then closes the pool."""
        self._queue = None
        try:
            with JobQueue(self.paths.db) as queue:
                self._queue = queue
                while not self.stop.is_set():
                    try:
                        self.work(queue)
                    except Stopped:  # stopping while the disk is full
                        break
                    except Exception:
                        if self.pool.healthy:
                            raise
                        # the scheduler went away in the middle of a call: reconnect
                        log.debug("Dask call failed with the scheduler gone", exc_info=True)
                self._drain(queue)
        except OSError as exc:
            self.error = f"cannot write to {exc.filename or self.paths.out}: {exc.strerror or exc}"
            log.error("%s", self.error)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("the worker failed")
        finally:
            self._queue = None
            self.pool.close()

    def work(self, queue: JobQueue) -> bool:
        """Record what finished, hand Dask more jobs; False when there was nothing to do."""
        self._queue = queue
        if not self.connect():
            if self.problem is None:
                self._trouble(f"the Dask scheduler at {self.pool.address} is gone")
            self.wake.wait(min(1.0, max(0.0, self._next_connect - time.monotonic())))
            return False
        busy = self._settle(queue, self.pool.finished(timeout=0))
        threads = self.pool.threads()
        alone = f"no Dask worker is connected to the scheduler at {self.pool.address}"
        if not threads and self.pool.healthy:  # (none, because the scheduler is gone)
            self._trouble(f"{alone}; the images wait in the queue")
        elif self.problem and self.problem.startswith(alone):
            log.warning("Dask workers are back; resuming")
            self.problem = None
        room = self.pool.compute.in_flight_per_worker * threads - len(self.held)
        while room > 0 and not self.stop.is_set():
            jobs = self.recorder.claim(queue, room)
            if not jobs:
                break
            room -= len(jobs)
            busy = True
            self._submit(queue, jobs)
        if time.monotonic() >= self._next_status:
            self._next_status = time.monotonic() + STATUS_EVERY_S
            folders = [(self.paths.inbox, False), (self.paths.out, True)]
            engine = self.engine
            for problem in self.pool.warm_new(engine.config, folders, engine.model_label):
                self._trouble(problem)
            self._status = {"mode": "dask", **self.pool.describe()}
        if not busy:
            if self.held:
                busy = self._settle(queue, self.pool.finished(timeout=0.2))
            else:
                self.wake.wait(0.5)
                self.wake.clear()
        if not self.pool.healthy:
            self._release_all()
        return busy

    def compute_status(self) -> dict[str, Any]:
        """The Dask workers, their devices and the jobs in flight, for ``cellwatch status``."""
        status = dict(self._status)
        status["problem"] = self.problem
        status["in_flight"] = len(self.held)
        return status

    def _submit(self, queue: JobQueue, jobs: list[Job]) -> None:
        """Hand Dask one task per image of each job (its file, or each scene of it) whose
        row has not landed yet; record at once what needs no work."""
        from cellwatch.service.worker import Task

        engine, recorder = self.engine, self.recorder
        outcomes: dict[str, Any] = {}
        for job in jobs:
            planned = recorder.plan(job, engine)
            if isinstance(planned, Exception):
                self._retry_or_give_up(queue, job, planned, [None], outcomes)
                continue
            scenes, todo = planned
            if not todo:  # refused, given up, or every row landed before a crash
                outcomes[job.job_id] = recorder.outcome(job, scenes)
                continue
            self._jobs[job.job_id] = _InFlight(job, scenes, waiting=len(todo))
            for scene in todo:
                key = f"cellwatch-{job.job_id}-{ledger.scene_key(scene)}-{job.attempts}"
                self.held[key] = (job, scene)
                task = Task(
                    str(self.paths.inbox / job.rel_path),
                    job.job_id,
                    str(self.paths.out),
                    engine.config,
                    engine.model_label,
                    scene,
                )
                self.pool.submit(key, task)
        if outcomes:
            queue.finish(outcomes)
            crash_point("after-commit")

    def _settle(self, queue: JobQueue, finished: list[Any]) -> bool:
        """Record the finished tasks' results; once all of a job's images are back, finish
        the job, or retry or fail it if one of them raised."""
        if not finished:
            return False
        engine, recorder = self.engine, self.recorder
        results: list[Any] = []
        settled: list[_InFlight] = []
        full: Exception | None = None  # an image's files found the results disk full
        for fin in finished:
            entry = self.held.pop(fin.key, None)
            if entry is None:
                continue
            job, _ = entry
            state = self._jobs[job.job_id]
            state.waiting -= 1
            if fin.result is not None:
                results.append(recorder.check_content(job, engine, fin.result.result))
                for stage, seconds in fin.result.stages.items():
                    recorder.metrics.observe_stage(stage, seconds)
            else:
                error = fin.error or RuntimeError("the task ended with neither result nor error")
                killed = type(error).__name__ == "KilledWorker"
                if fin.lost or (killed and self.stop.is_set()):  # not the image's fault
                    state.lost = True
                elif self.pause is not None and disk_full(error):  # nor is a full disk
                    state.lost, full = True, error
                elif state.fault is None:
                    state.fault = error
            if state.waiting == 0:
                settled.append(self._jobs.pop(job.job_id))
        try:
            recorder.record_all(results, engine)
        except Stopped:  # their rows did not land: the jobs go back, attempt unspent
            for job_id in {s.job.job_id for s in settled} | {r.row["job_id"] for r in results}:
                queue.release(job_id)
            raise
        outcomes: dict[str, Any] = {}
        for state in settled:
            job = state.job
            if state.fault is not None:
                self._retry_or_give_up(queue, job, state.fault, state.scenes, outcomes)
            elif state.lost and recorder.missing(job, state.scenes):
                queue.release(job.job_id)
            else:
                outcomes[job.job_id] = recorder.outcome(job, state.scenes)
        if outcomes:
            queue.finish(outcomes)
            crash_point("after-commit", " ".join(s.job.rel_path for s in settled))
        recorder.metrics.queue(queue.counts())
        if results and self.pause is not None:
            # Their files and rows landed: there is room again, and a full disk found by
            # another image of this harvest was found before the space was freed.
            self.pause.resume()
        elif full is not None and self.pause is not None:
            self.pause.hold(full)  # before more work goes out; Stopped when stopping
        return True

    def _retry_or_give_up(
        self,
        queue: JobQueue,
        job: Job,
        error: Exception,
        scenes: list[int | None],
        outcomes: dict[str, Any],
    ) -> None:
        """The recorder's retry or give-up; a job whose worker died is due again at once."""
        killed = type(error).__name__ == "KilledWorker"
        delay = 0.0 if killed else None
        final = self.recorder.retry_or_give_up(queue, job, self.engine, error, scenes, delay=delay)
        if final is not None:
            outcomes[job.job_id] = final

    def _drain(self, queue: JobQueue) -> None:
        deadline = time.monotonic() + STOP_DRAIN_S
        while self.held and self.pool.healthy and time.monotonic() < deadline:
            self._settle(queue, self.pool.finished(timeout=0.2))
        self._release_all()

    def _release_all(self) -> None:
        """Put the jobs in flight back in the queue, their attempt not counted: their tasks
        were lost with the scheduler, or the daemon is stopping."""
        self.pool.drop_all()
        if self.held and self._queue is not None:
            for job_id in {job.job_id for job, _ in self.held.values()}:
                self._queue.release(job_id)
        self.held.clear()
        self._jobs.clear()

    def _trouble(self, message: str, *, topic: str | None = None) -> None:
        """Log a problem when it is new, and again once a minute while it lasts; a
        ``topic`` counts as the same problem however its ``message`` varies."""
        self.problem = message
        said, when = self._said
        topic = topic or message
        if topic != said or time.monotonic() - when >= PROBLEM_EVERY_S:
            log.error("%s", message)
            self._said = (topic, time.monotonic())


class _CancelledReconnect(logging.Filter):
    """Drops the traceback distributed logs when a client we close was still trying to
    reconnect to a lost scheduler (its ``CancelledError``): cellwatch says it in words."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, asyncio.CancelledError)


_FILTER = _CancelledReconnect()


def _quiet_cancelled_reconnects() -> None:
    for name in ("distributed.utils", "distributed.client"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
