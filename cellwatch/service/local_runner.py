"""The daemon's worker thread when the network runs in this process.

It claims up to :data:`BATCH_IMAGES` due jobs, runs the pipeline on their images
``tiling.images_at_once`` at a time (so their tiles share inference batches), hands each
group's results to the :class:`~cellwatch.service.recorder.Recorder` and finishes the jobs.
"""

from __future__ import annotations

__all__ = ["BATCH_IMAGES", "LocalRunner"]

import logging
import threading
from collections.abc import Callable
from typing import Any

from cellwatch.errors import disk_full
from cellwatch.service.crash import crash_point
from cellwatch.service.engine import Engine, Paths
from cellwatch.service.jobs import Job, JobQueue
from cellwatch.service.memory import Trimmer
from cellwatch.service.pause import Pause, Stopped
from cellwatch.service.recorder import Recorder

log = logging.getLogger("cellwatch.watch")

BATCH_IMAGES = 8  # images claimed together, so their tiles can share inference batches

Unit = tuple[Job, int | None]  # one image: a job and a scene of its file (None: the file)


class LocalRunner:
    """Claims jobs, runs the pipeline on them, has their rows recorded and finishes them.

    Parameters
    ----------
    paths : Paths
        Inbox, output and state folders.
    engine : Engine
        Settings and model; the main thread swaps it on SIGHUP (:meth:`use`), and it is
        read once per group of ``tiling.images_at_once`` images.
    recorder : Recorder
        The exactly-once gate that plans each job's images and appends their rows.
    stop, wake : threading.Event
        Set to finish; set when new jobs are queued.
    process : callable, optional
        :func:`cellwatch.pipeline.process_images` (tests pass a fake).
    pause : Pause, optional
        The daemon's pause (:mod:`cellwatch.service.pause`): an image whose label image or
        overlay found the disk full is processed again after a wait, its attempt not
        spent. Without it, that is a fault like any other.
    """

    def __init__(
        self,
        paths: Paths,
        engine: Engine,
        recorder: Recorder,
        *,
        stop: threading.Event,
        wake: threading.Event,
        process: Callable[..., list[Any]] | None = None,
        pause: Pause | None = None,
    ) -> None:
        self.paths, self.engine, self.recorder = paths, engine, recorder
        self.stop, self.wake = stop, wake
        self._process = process
        self.pause = pause
        self.error: str | None = None
        self.trim = Trimmer()  # freed pages back to the system after each batch

    @property
    def done(self) -> int:
        """Images counted since start."""
        return self.recorder.done

    @property
    def failed(self) -> int:
        """Images given a failed row since start."""
        return self.recorder.failed

    def use(self, engine: Engine) -> None:
        """Count with ``engine`` from the next group of images on; the main thread calls
        this on SIGHUP, and the group in hand finishes with the engine it started with."""
        self.engine = engine

    def run(self) -> None:
        """The worker thread. A full results disk pauses it (:attr:`pause`); any other
        error outside one image's processing (the ledger or the database cannot be
        written) ends it; the daemon then exits for systemd to restart it, and start-up
        recovery picks up where it stopped."""
        try:
            with JobQueue(self.paths.db) as queue:
                while not self.stop.is_set():
                    if not self.work(queue):
                        self.wake.wait(1.0)
                        self.wake.clear()
        except OSError as exc:
            self.error = f"cannot write to {exc.filename or self.paths.out}: {exc.strerror or exc}"
            log.error("%s", self.error)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("the worker failed")

    def work(self, queue: JobQueue) -> bool:
        """Process one batch of due jobs; False if there was none.

        Each job's images (its file's scenes, or the file itself) whose rows have not
        landed yet are processed ``tiling.images_at_once`` at a time, and recorded after each
        group. A job finishes once every image of it has its row. While the results disk
        is full, the batch in hand waits (:mod:`cellwatch.service.pause`); a stop then sends
        its jobs back to the queue, their attempt not spent.
        """
        jobs = self.recorder.claim(queue, BATCH_IMAGES)
        if not jobs:
            return False
        try:
            self._work(queue, jobs)
        except Stopped:  # stopping while the disk is full: the jobs go back, attempt unspent
            for job in jobs:
                queue.release(job.job_id)
            log.warning("stopped while paused; %d job(s) back in the queue", len(jobs))
        self.trim()
        return True

    def _work(self, queue: JobQueue, jobs: list[Job]) -> None:
        engine, recorder = self.engine, self.recorder
        recorder.metrics.queue(queue.counts())
        scenes: dict[str, list[int | None]] = {}
        faults: dict[str, Exception] = {}  # the first fault of each job this time
        units: list[Unit] = []
        for job in jobs:
            planned = recorder.plan(job, engine)
            if isinstance(planned, Exception):
                faults[job.job_id] = planned
                continue
            scenes[job.job_id], todo = planned
            units += [(job, scene) for scene in todo]
        start = 0
        while start < len(units):
            engine = self.engine  # a reload (:meth:`use`) counts from the next group on
            group = units[start : start + engine.config.tiling.images_at_once]
            start += len(group)
            while group:
                full: list[tuple[Unit, Exception]] = []  # found the disk full: run again
                for unit, outcome in self._run(engine, group):
                    job = unit[0]
                    if isinstance(outcome, Exception):
                        if self.pause is not None and disk_full(outcome):
                            full.append((unit, outcome))
                        else:
                            faults.setdefault(job.job_id, outcome)
                    else:
                        recorder.record(recorder.check_content(job, engine, outcome), engine)
                if full and len(full) == len(group) and self.pause is not None:
                    self.pause.hold(full[0][1])  # waits; Stopped when the daemon stops
                # Else another image of the group landed (there was room after all: these
                # writes failed before space was freed) or failed for a reason of its own:
                # the images that found the disk full go again at once, and pause only
                # when a whole group finds it full.
                group = [unit for unit, _ in full]
        engine = self.engine
        outcomes: dict[str, Any] = {}
        for job in jobs:
            job_scenes = scenes.get(job.job_id, [None])
            fault = faults.get(job.job_id)
            if fault is None:
                outcomes[job.job_id] = recorder.outcome(job, job_scenes)
            elif final := recorder.retry_or_give_up(queue, job, engine, fault, job_scenes):
                outcomes[job.job_id] = final  # gave up: its images have failed rows
        queue.finish(outcomes)
        recorder.metrics.queue(queue.counts())
        crash_point("after-commit")

    def compute_status(self) -> dict[str, Any]:
        """Where the images are processed, for ``cellwatch status``."""
        return {"mode": "in-process", "device": self.engine.device or None, "workers": []}

    def _run(self, engine: Engine, units: list[Unit]) -> list[tuple[Unit, Any]]:
        """((job, scene), ImageResult or the exception it raised) for each, in order."""
        if not units:
            return []
        process = self._process
        if process is None:
            from cellwatch.pipeline import process_images as process
        try:
            results = process(
                [self.paths.inbox / job.rel_path for job, _ in units],
                config=engine.config,
                segmenter=engine.segmenter,
                out_dir=self.paths.out,
                job_ids=[job.job_id for job, _ in units],
                scenes=[scene for _, scene in units],
            )
            crash_point("after-labels", " ".join(job.rel_path for job, _ in units))
            return list(zip(units, results, strict=True))
        except Exception as exc:  # one image's fault must not cost the others their work
            if len(units) == 1:
                return [(units[0], exc)]
            return [pair for unit in units for pair in self._run(engine, [unit])]
