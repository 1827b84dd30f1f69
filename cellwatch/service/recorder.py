"""The exactly-once gate: which images of a job still need a row, and the one place the
daemon appends rows to ``ledger.csv`` and ``cells.csv``, once per ``(job_id, scene)``.

Both runners (:mod:`cellwatch.service.local_runner` and :mod:`cellwatch.service.dask_runner`)
hold a :class:`Recorder`; they run images and hand it the results. It keeps the
``(job_id, scene)`` of every ledger row in memory (read from the ledger at start-up), so a
job run again after a crash appends only the rows that had not landed. A microscope file of
several scenes is one job and several images: one row per scene.
"""

from __future__ import annotations

__all__ = ["RETRY_BASE_S", "Recorder", "retry_delay"]

import logging
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from cellwatch.config import local_today
from cellwatch.errors import BadInputError
from cellwatch.errors import describe as _describe
from cellwatch.reporting.qc import UNFAMILIAR_MESSAGE
from cellwatch.service.driver import record_all
from cellwatch.service.engine import Engine, Paths
from cellwatch.service.jobs import Job, JobQueue
from cellwatch.service.metrics import Metrics
from cellwatch.service.pause import Pause
from cellwatch.service.watcher import refusal
from cellwatch.storage import ledger

log = logging.getLogger("cellwatch.watch")

RETRY_BASE_S = 30.0  # first delay before a transient failure is retried; doubles each time

#: ``(job_id, scene key)`` of a ledger row, as :func:`cellwatch.storage.ledger.recorded` keys it.
Key = tuple[str, str]
#: The job's images (``None`` for a one-image file) and those of them still to run.
Plan = tuple[list[int | None], list[int | None]]


def retry_delay(attempts: int) -> float:
    """Seconds before a job that failed its ``attempts``-th try is due again."""
    return RETRY_BASE_S * 2 ** (attempts - 1)


class Recorder:
    """Plans each claimed job's images and records their results exactly once.

    Parameters
    ----------
    paths : Paths
        Inbox, output and state folders.
    recorded : dict
        ``(job_id, scene) → status`` of every ledger row (:func:`ledger.recorded`); the
        recorder adds to it as it appends.
    metrics : Metrics, optional
        Where each recorded image is counted.
    scenes : callable, optional
        :func:`cellwatch.pipeline.scenes_of` (tests pass a fake).
    clock : callable, optional
        The time now, as an aware datetime (tests pass a fake): the warning about
        unfamiliar images is logged once per local day of ``report.timezone``.
    write : callable, optional
        :func:`cellwatch.service.driver.record_all`, the one call that touches the ledger
        files (tests pass a fake, e.g. one that fails as a full disk does).
    pause : Pause, optional
        The daemon's pause: a write that finds the disk full is tried again after a wait,
        until it lands (:meth:`Pause.writing`). Without it the error is raised.
    """

    def __init__(
        self,
        paths: Paths,
        recorded: dict[Key, str],
        *,
        metrics: Metrics | None = None,
        scenes: Callable[[Path], list[int | None]] | None = None,
        clock: Callable[[], datetime] | None = None,
        write: Callable[[Sequence[Any], Path], None] = record_all,
        pause: Pause | None = None,
    ) -> None:
        self.paths, self.recorded = paths, recorded
        self.pause = pause
        self.metrics = metrics or Metrics()
        self._scenes_of = scenes
        self._clock = clock or (lambda: datetime.now(UTC))
        self._write = write
        self._warned_unfamiliar: date | None = None  # the local day of the last warning
        self.done = self.failed = 0

    def claim(self, queue: JobQueue, limit: int) -> list[Job]:
        """Up to ``limit`` due jobs, claimed (their attempt counted) and timed."""
        jobs = queue.claim(limit)
        if jobs:
            self.metrics.started(jobs)
        return jobs

    def plan(self, job: Job, engine: Engine) -> Plan | Exception:
        """The job's images and those of them still to run, or the fault that kept its
        file from being opened (a transient one: retried like any other).

        On the way it records what needs no work: a file refused just before reading
        (it may have been swapped for a link since it was queued) gets its failed row,
        and so does every image of a job that was running at each of the last
        ``watch.max_attempts`` stops; neither has anything left to run.
        """
        follow = engine.config.watch.follow_symlinks
        if why := refusal(self.paths.inbox, job.rel_path, follow_symlinks=follow):
            if self.missing(job, [None]):
                self.record(self.failed_result(job, engine, why), engine)
            return [None], []
        scenes = self._list_scenes(job)
        if isinstance(scenes, Exception):
            return scenes
        todo = self.missing(job, scenes)
        max_attempts = engine.config.watch.max_attempts
        if todo and job.attempts > max_attempts:
            reason = job.last_error or (
                "cellwatch stopped while processing this image (a crash, a power cut or "
                "an out-of-memory kill?)"
            )
            message = f"gave up after {max_attempts} attempts; last error: {reason}"
            self.record_all(
                [self.failed_result(job, engine, message, scene) for scene in todo], engine
            )
            return scenes, []
        return scenes, todo

    def retry_or_give_up(
        self,
        queue: JobQueue,
        job: Job,
        engine: Engine,
        error: BaseException,
        scenes: list[int | None],
        *,
        delay: float | None = None,
    ) -> str | None:
        """Send the job back to the queue, due after ``delay`` (default
        :func:`retry_delay`), and return None; or, after ``watch.max_attempts``, give each
        of its images without a row a ``failed`` row and return the job's outcome."""
        message = _describe(error)
        if job.attempts < engine.config.watch.max_attempts:
            wait = retry_delay(job.attempts) if delay is None else delay
            log.warning("%s: %s; trying again in %.0f s", job.rel_path, message, wait)
            queue.retry(job.job_id, message, wait)
            return None
        message = f"gave up after {job.attempts} attempts; last error: {message}"
        missing = self.missing(job, scenes)
        self.record_all(
            [self.failed_result(job, engine, message, scene) for scene in missing], engine
        )
        return self.outcome(job, scenes)

    def missing(self, job: Job, scenes: list[int | None]) -> list[int | None]:
        """The job's images that have no ledger row yet."""
        return [s for s in scenes if (job.job_id, ledger.scene_key(s)) not in self.recorded]

    def outcome(self, job: Job, scenes: list[int | None]) -> str:
        """``done`` if every image of the job was counted, else ``failed``."""
        statuses = [self.recorded.get((job.job_id, ledger.scene_key(s))) for s in scenes]
        return "done" if all(status == "ok" for status in statuses) else "failed"

    def check_content(self, job: Job, engine: Engine, result: Any) -> Any:
        """The result, unless the file was replaced after it was queued: then the new
        content is a new job of its own, and this one is recorded as failed."""
        sha = result.row.get("sha256")
        if sha and sha != job.sha256 and not job.sha256.startswith("unreadable-"):
            return self.failed_result(
                job,
                engine,
                "the file changed after it was queued; its new content is counted as a new image",
                result.row.get("scene"),
            )
        return result

    def failed_result(
        self, job: Job, engine: Engine, message: str, scene: int | None = None
    ) -> Any:
        """A ``failed`` result for one image of the job, with ``message`` as its error."""
        from cellwatch.pipeline import failed_result

        path = self.paths.inbox / job.rel_path
        base = {
            "image": str(path),
            "sha256": job.sha256 if not job.sha256.startswith("unreadable-") else None,
            "model": engine.model_label,
            "settings_hash": engine.config.settings_hash(),
            "job_id": job.job_id,
            "scene": scene,
        }
        return failed_result(
            path,
            BadInputError(message),
            model=engine.model_label,
            config=engine.config,
            job_id=job.job_id,
            row=base,
        )

    def record(self, result: Any, engine: Engine) -> None:
        """Append the result's rows unless its (job, scene) is already in the ledger."""
        self.record_all([result], engine)

    def record_all(self, results: Sequence[Any], engine: Engine) -> None:
        """Append the rows of the results whose (job, scene) is not in the ledger yet, in
        one append for all; a key is noted as recorded only once its row is written.
        ``engine`` is the one the results were counted with."""
        new: dict[Key, Any] = {}
        for result in results:
            key = (result.row["job_id"], ledger.scene_key(result.row.get("scene")))
            if key not in self.recorded:
                new.setdefault(key, result)
        if not new:
            return
        results = list(new.values())
        if self.pause is None:
            self._write(results, self.paths.out)
        else:
            self.pause.writing(lambda: self._write(results, self.paths.out))
        for key, result in new.items():
            row = result.row
            self.recorded[key] = row["status"]
            self.metrics.recorded(row)
            if row["status"] == "ok":
                self.done += 1
                log.info("%s: %s cells", ledger.row_name(row), row.get("cell_count"))
                self._warn_if_unfamiliar(row, engine)
            else:
                self.failed += 1
                log.warning("%s failed: %s", ledger.row_name(row), row.get("error"))

    def _warn_if_unfamiliar(self, row: dict[str, Any], engine: Engine) -> None:
        """Log a warning for the first image of a local day whose familiarity is below
        ``report.familiarity_min``; the day's report flags every such image."""
        report = engine.config.report
        value = row.get("familiarity")
        if value is None or not value < report.familiarity_min:
            return
        today = local_today(report.timezone, self._clock())
        if today == self._warned_unfamiliar:
            return
        self._warned_unfamiliar = today
        log.warning(
            "%s: %s (familiarity %.2g, below report.familiarity_min %g). Further such images "
            'today are flagged "unfamiliar" in the daily report, without another warning',
            ledger.row_name(row),
            UNFAMILIAR_MESSAGE,
            value,
            report.familiarity_min,
        )

    def _list_scenes(self, job: Job) -> list[int | None] | Exception:
        """The images of the job's file (:func:`cellwatch.pipeline.scenes_of`), or the
        fault that kept it from being opened."""
        scenes_of = self._scenes_of
        if scenes_of is None:
            from cellwatch.pipeline import scenes_of
        try:
            return scenes_of(self.paths.inbox / job.rel_path)
        except Exception as exc:  # a transient fault: retried like any other
            return exc
