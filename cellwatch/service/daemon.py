"""``cellwatch watch``: the daemon that turns every new image into exactly one ledger row.

Three threads, each owning its own database connection:

- the **watcher** (:mod:`cellwatch.service.watcher`) finds files that are stable and complete and
  adds them to the job queue (:mod:`cellwatch.service.jobs`);
- the **worker** (:class:`Worker`) claims queued jobs, runs the pipeline on up to
  ``BATCH_IMAGES`` at a time, appends the results to ``cells.csv`` and ``ledger.csv`` and
  marks the jobs done;
- the **main** thread handles signals (the handlers only set flags), talks to systemd
  (:mod:`cellwatch.service.sdnotify`) and exits with status 1 if another thread dies, so systemd
  restarts the service.

Exactly one ledger row per image, through ``kill -9`` at any moment: the ledger row is
written (one ``write`` + ``fsync``) before the job is marked done, and at start-up a torn
last line is cut, every job whose ``job_id`` is in the ledger is marked finished, and jobs
found running are run again. Before a row is appended its ``(job_id, scene)`` is checked
against the ledger's (kept in memory). A job run again after a crash may have appended some
of its cells already: readers of ``cells.csv`` keep, for each ``(job_id, scene)`` with a
ledger row, the last row of each ``(job_id, scene, label)`` (see docs/daemon.md).

A microscope file of several scenes is one job and several images: one ledger row per
``(job_id, scene)``. Its scenes are processed and recorded a group at a time, so after a
crash in the middle of the file only the scenes without a row are run again.
"""

from __future__ import annotations

__all__ = [
    "BATCH_IMAGES",
    "HEARTBEAT_S",
    "PROBLEM_EVERY_S",
    "RECONNECT_S",
    "RETRY_BASE_S",
    "STOP_DRAIN_S",
    "ClusterWorker",
    "Daemon",
    "Engine",
    "Paths",
    "Worker",
    "add_arguments",
    "checked",
    "load_engine",
    "override_compute",
    "run",
    "settings_from_args",
]

import argparse
import dataclasses
import fcntl
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from types import FrameType
from typing import IO, Any

from cellwatch.config import Config, local_today, override
from cellwatch.errors import BadInputError, CellwatchError, ConfigError
from cellwatch.errors import describe as _describe
from cellwatch.reporting.qc import UNFAMILIAR_MESSAGE
from cellwatch.reporting.report import check_settings, reports_for_config
from cellwatch.service.crash import crash_point
from cellwatch.service.jobs import DB_NAME, FileVersion, Job, JobQueue, state_dir
from cellwatch.service.metrics import Metrics, MetricsServer, serve
from cellwatch.service.schedule import ReportSchedule
from cellwatch.service.sdnotify import Notifier
from cellwatch.service.watcher import Watcher, refusal
from cellwatch.storage import ledger

log = logging.getLogger("cellwatch.watch")

BATCH_IMAGES = 8  # images claimed together, so their tiles can share inference batches
HEARTBEAT_S = 10.0  # how often the daemon tells `cellwatch status` it is alive
RETRY_BASE_S = 30.0  # first delay before a transient failure is retried; doubles each time
RECONNECT_S = 5.0  # how often a lost Dask scheduler is tried again
PROBLEM_EVERY_S = 60.0  # how often a lasting problem (no scheduler, no workers) is logged again
STOP_DRAIN_S = 30.0  # on stop, how long the images in flight on Dask workers are waited for


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``cellwatch watch``."""
    parser.add_argument("--config", type=Path, help="configuration file (YAML)")
    parser.add_argument("--inbox", type=Path, help="folder to watch (default: watch.inbox)")
    parser.add_argument("--out", type=Path, help="output folder (default: output.dir)")
    parser.add_argument(
        "--state", type=Path, help="folder for the job database (default: OUT/.state)"
    )
    parser.add_argument("--model", type=Path, help="model file (.keras); default: bundled")


def settings_from_args(args: argparse.Namespace) -> Config:
    """The configuration file with the command-line flags laid over it."""
    from cellwatch.config import config_from_args

    return override(
        config_from_args(args),
        **{
            "watch.inbox": str(args.inbox) if getattr(args, "inbox", None) else None,
            "watch.state_dir": str(args.state) if getattr(args, "state", None) else None,
        },
    )


def run(args: argparse.Namespace) -> int:
    """Run the daemon until SIGTERM or SIGINT; 0 on a clean stop, 1 if a thread died."""
    return Daemon(lambda: checked(settings_from_args(args))).serve()


def checked(config: Config) -> Config:
    """``config`` once the report section's column-dependent checks pass too, so a bad
    ``report.group_pattern`` stops the daemon at start rather than at the first report."""
    check_settings(config.report)
    return config


@dataclass(frozen=True)
class Paths:
    """The folders the daemon works with, made absolute once at start."""

    inbox: Path
    out: Path
    state: Path

    @classmethod
    def of(cls, config: Config) -> Paths:
        """The folders ``config`` names; the inbox must exist."""
        inbox = Path(os.path.abspath(config.watch.inbox))
        if not inbox.is_dir():
            raise ConfigError(
                f"the inbox folder {inbox} does not exist (or is not a folder); create it, "
                "or set --inbox / watch.inbox"
            )
        out = Path(os.path.abspath(config.output.dir))
        return cls(inbox, out, Path(os.path.abspath(state_dir(config))))

    @property
    def ledger(self) -> Path:
        """The ledger, ``OUT/ledger.csv``."""
        return self.out / "ledger.csv"

    @property
    def cells(self) -> Path:
        """The cell table, ``OUT/cells.csv``."""
        return self.out / "cells.csv"

    @property
    def db(self) -> Path:
        """The job database in the state folder."""
        return self.state / DB_NAME


@dataclass(frozen=True)
class Engine:
    """The settings and the loaded model the worker uses; replaced whole on SIGHUP."""

    config: Config
    segmenter: Any  # cellwatch.pipeline.Segmenter; None when Dask workers hold the model
    label: str = ""  # the model's name@hash, when there is no segmenter here
    device: str = ""  # what the network runs on in this process

    @property
    def model_label(self) -> str:
        """The model's ``name@hash``, as the ledger's ``model`` column writes it."""
        return self.label or str(self.segmenter.model.label)


def load_engine(config: Config) -> Engine:
    """Load the model and run one dummy batch, so the first image does not pay for graph
    compilation and a broken model fails before the daemon reports READY. With Dask
    workers (``compute``), they load it (:mod:`cellwatch.service.worker`) and this process
    only notes its name and hash."""
    import numpy as np

    from cellwatch.model import choose_backend, model_label
    from cellwatch.pipeline import Segmenter
    from cellwatch.runtime import device_name, load, resolve
    from cellwatch.service.cluster import uses_dask

    choose_backend()
    if uses_dask(config.compute):
        return Engine(config, None, label=model_label(config.model.path))
    config = resolve(config)  # the runtime and precision that run, in every row's hash
    segmenter = Segmenter(config, load(config))
    size, tile = config.tiling.batch_size, segmenter.tiling.tile
    segmenter.predict_batch(np.zeros((size, tile, tile, 1), np.float32))
    return Engine(config, segmenter, device=device_name(segmenter.model))


class Daemon:
    """Start-up, the main loop and shutdown of ``cellwatch watch``.

    Parameters
    ----------
    load_config : callable
        Reads the configuration; called at start and again on SIGHUP.
    notifier : Notifier, optional
        Where sd_notify messages go (from ``NOTIFY_SOCKET`` by default).
    """

    def __init__(self, load_config: Callable[[], Config], notifier: Notifier | None = None) -> None:
        self.load_config = load_config
        self.config = load_config()
        self.paths = Paths.of(self.config)
        self.notifier = notifier or Notifier()
        self.stop = threading.Event()  # tells the threads to finish
        self.wake = threading.Event()  # tells the worker new jobs are queued
        self.watcher: Watcher | None = None
        self.watcher_error: str | None = None
        self._stop_requested = False  # set by signal handlers: plain flags, no locks
        self._reload_requested = False
        self._next_ping = 0.0
        self.reports = ReportSchedule(
            self.config.report.timezone, self.config.report.refresh_interval_s
        )
        self._report_thread: threading.Thread | None = None
        self.metrics = Metrics()
        self.metrics_server: MetricsServer | None = None

    def serve(self) -> int:
        """Run until SIGTERM or SIGINT; 0 on a clean stop, 1 if a thread died."""
        for folder in (self.paths.out, self.paths.state):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CellwatchError(
                    f"cannot create {folder}: {exc.strerror or exc}; check the path and "
                    "that this user may write there"
                ) from exc
        lock = _lock(self.paths.state)
        previous = _install_signals(self._on_signal)
        try:
            with JobQueue(self.paths.db) as queue:
                recorded = self._recover(queue)
                self._serve_metrics(queue)
                return self._serve(queue, recorded)
        finally:
            if self.metrics_server is not None:
                self.metrics_server.close()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            lock.close()

    def _recover(self, queue: JobQueue) -> dict[tuple[str, str], str]:
        for path in (self.paths.ledger, self.paths.cells):
            if ledger.repair(path):
                log.warning("cut a half-written last line from %s (left by a crash)", path)
        recorded = ledger.recorded(self.paths.ledger)
        # scenes: only the worker, which lists a file's scenes, can tell if all rows landed
        recovery = queue.recover(
            {job: status for (job, scene), status in recorded.items() if not scene}
        )
        if recovery.already_recorded or recovery.requeued:
            log.warning(
                "recovered from an unclean stop: %d job(s) already in the ledger, %d to run again",
                recovery.already_recorded,
                recovery.requeued,
            )
        return recorded

    def _serve_metrics(self, queue: JobQueue) -> None:
        """Answer Prometheus at ``/metrics`` if ``metrics.port`` is set (before the model
        loads, so a taken port stops the daemon at once)."""
        self.metrics.queue(queue.counts())
        m = self.config.metrics
        if m.port is not None:
            self.metrics_server = serve(self.metrics, m.address, m.port)
            log.info("metrics at http://%s:%d/metrics", m.address, self.metrics_server.port)

    def _serve(self, queue: JobQueue, recorded: dict[tuple[str, str], str]) -> int:
        self.notifier.status("loading the model")
        engine = load_engine(self.config)
        self.metrics.use_model(engine.model_label, _stopwatch(engine))
        if self._stop_requested:
            self.notifier.send("STOPPING=1")
            return 0
        worker = self._worker(engine, recorded)
        threads = [
            threading.Thread(target=self._watch, name="watcher", daemon=True),
            threading.Thread(target=worker.run, name="worker", daemon=True),
        ]
        for thread in threads:
            thread.start()
        queue.set_meta(pid=str(os.getpid()), started_at=_now(), state="running")
        self._beat(queue, worker)
        self.notifier.send("READY=1", f"STATUS={self._summary(queue, worker)}")
        log.info(
            "watching %s; results in %s; model %s; %s",
            self.paths.inbox,
            self.paths.out,
            engine.model_label,
            f"network on {engine.device} in this process" if engine.device else "Dask workers",
        )
        code = self._loop(queue, worker, threads)
        self.notifier.send("STOPPING=1", "STATUS=stopping: finishing the images in hand")
        self.stop.set()
        self.wake.set()
        for thread in threads:
            while thread.is_alive():
                thread.join(timeout=self._tick)
                if code == 0:  # alive and finishing; after a thread died, no more pings
                    self._ping()
        if self._report_thread is not None:
            self._report_thread.join()
        queue.set_meta(state="stopped", heartbeat=_now())
        log.info("stopped: %d image(s) counted, %d failed", worker.done, worker.failed)
        return code

    def _worker(self, engine: Engine, recorded: dict[tuple[str, str], str]) -> Worker:
        """The worker thread's object: images in threads of this process, or on Dask."""
        if engine.segmenter is not None:
            return Worker(
                self.paths, engine, recorded, stop=self.stop, wake=self.wake, metrics=self.metrics
            )
        from cellwatch.service.cluster import Pool

        pool = Pool(engine.config.compute)
        worker = ClusterWorker(
            self.paths,
            engine,
            recorded,
            stop=self.stop,
            wake=self.wake,
            pool=pool,
            metrics=self.metrics,
        )
        try:
            worker.connect(at_start=True)
        except BaseException:
            pool.close()  # the local workers, before the error stops the daemon
            raise
        return worker

    @property
    def _tick(self) -> float:
        interval = self.notifier.watchdog_interval_s
        return min(0.2, interval) if interval else 0.2

    def _loop(self, queue: JobQueue, worker: Worker, threads: list[threading.Thread]) -> int:
        next_beat = time.monotonic() + HEARTBEAT_S
        while not self._stop_requested:
            time.sleep(self._tick)  # a signal handler runs during the sleep and sets a flag
            if self._reload_requested:
                self._reload_requested = False
                self._reload(queue, worker)
            dead = [t.name for t in threads if not t.is_alive()]
            if dead:
                why = worker.error if "worker" in dead else self.watcher_error
                log.error(
                    "the %s thread stopped (%s); exiting so that systemd restarts cellwatch",
                    dead[0],
                    why or "no reason given",
                )
                return 1
            self._ping()
            self._refresh_reports()
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + HEARTBEAT_S
                self._beat(queue, worker)
        return 0

    def _refresh_reports(self) -> None:
        """Rebuild the daily reports that are due, in the background: a slow report must
        not hold up the watchdog pings."""
        if self._report_thread is not None and self._report_thread.is_alive():
            return
        days = self.reports.due(datetime.now(UTC), time.monotonic())
        if days is None:
            return
        config = self.config

        def build() -> None:
            try:
                reports_for_config(config, start=days[0], end=days[1])
            except Exception as exc:  # a report problem must never stop the counting
                log.error("could not write the daily report: %s", exc)

        self._report_thread = threading.Thread(target=build, name="report", daemon=True)
        self._report_thread.start()

    def _ping(self) -> None:
        """WATCHDOG=1, at most every half watchdog period; only called while the watcher
        and worker threads are alive (or finishing)."""
        interval = self.notifier.watchdog_interval_s
        if interval is not None and time.monotonic() >= self._next_ping:
            self._next_ping = time.monotonic() + interval
            self.notifier.send("WATCHDOG=1")

    def _beat(self, queue: JobQueue, worker: Worker) -> None:
        queue.set_meta(
            heartbeat=_now(),
            model=worker.engine.model_label,
            compute=json.dumps(worker.compute_status()),
        )
        self.metrics.queue(queue.counts())
        self.notifier.status(self._summary(queue, worker))

    def _summary(self, queue: JobQueue, worker: Worker) -> str:
        counts = queue.counts()
        writing = self.watcher.pending() if self.watcher is not None else 0
        return (
            f"{counts['pending'] + counts['running']} queued, {writing} being written, "
            f"{worker.done} counted, {worker.failed} failed since start; "
            f"model {worker.engine.model_label}"
        )

    def _reload(self, queue: JobQueue, worker: Worker) -> None:
        self.notifier.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            config = self.load_config()
            paths = Paths.of(config)
            if config.compute != self.config.compute:
                log.warning("new compute settings take effect only after a restart")
                config = override_compute(config, self.config)
            engine = load_engine(config)
        except Exception as exc:  # a bad new model or config must not stop a working daemon
            log.error("reload failed, still using the previous settings and model: %s", exc)
        else:
            if paths != self.paths:
                log.warning(
                    "a new inbox, output or state folder takes effect only after a restart; "
                    "still watching %s",
                    self.paths.inbox,
                )
            if config.metrics != self.config.metrics:
                log.warning("new metrics settings take effect only after a restart")
            self.config = config
            self.metrics.use_model(engine.model_label, _stopwatch(engine))
            worker.engine = engine
            if self.watcher is not None:
                self.watcher.update(config.watch)
            log.info("reloaded %s; model %s", config.source, engine.model_label)
        self._beat(queue, worker)
        self.notifier.send("READY=1")

    def _watch(self) -> None:
        """The watcher thread: its own connection to the queue, and the watcher loop."""
        try:
            with JobQueue(self.paths.db) as queue:

                def enqueue(files: list[FileVersion]) -> None:
                    new = set(queue.add(files))
                    for f in files:
                        if f.job_id in new:
                            log.info("queued %s", f.rel_path)
                    if new:
                        self.metrics.queue(queue.counts())
                        self.wake.set()

                skip = [self.paths.state, self.paths.out / "labels", self.paths.out / "overlays"]
                self.watcher = Watcher(
                    self.paths.inbox,
                    self.config.watch,
                    is_known=queue.seen,
                    on_stable=enqueue,
                    skip=skip,
                )
                self.watcher.run(self.stop)
        except Exception as exc:  # reported by the main loop, which then exits with 1
            self.watcher_error = f"{type(exc).__name__}: {exc}"
            log.exception("the watcher failed")

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._reload_requested = True
        else:
            self._stop_requested = True


class Worker:
    """Claims jobs, runs the pipeline on them, writes their rows and finishes them.

    Parameters
    ----------
    paths : Paths
        Inbox, output and state folders.
    engine : Engine
        Settings and model; the main thread swaps it on SIGHUP (read once per batch).
    recorded : dict
        ``(job_id, scene) → status`` of every ledger row (:func:`ledger.recorded`); the
        worker adds to it.
    stop, wake : threading.Event
        Set to finish; set when new jobs are queued.
    process : callable, optional
        :func:`cellwatch.pipeline.process_images` (tests pass a fake).
    metrics : Metrics, optional
        Where the worker reports jobs started and images recorded.
    scenes : callable, optional
        :func:`cellwatch.pipeline.scenes_of` (tests pass a fake).
    clock : callable, optional
        The time now, as an aware datetime (tests pass a fake): the warning about
        unfamiliar images is logged once per local day of ``report.timezone``.
    """

    def __init__(
        self,
        paths: Paths,
        engine: Engine,
        recorded: dict[tuple[str, str], str],
        *,
        stop: threading.Event,
        wake: threading.Event,
        process: Callable[..., list[Any]] | None = None,
        metrics: Metrics | None = None,
        scenes: Callable[[Path], list[int | None]] | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.paths, self.engine, self.recorded = paths, engine, recorded
        self.stop, self.wake = stop, wake
        self._process = process
        self.metrics = metrics or Metrics()
        self._scenes_of = scenes
        self._clock = clock or (lambda: datetime.now(UTC))
        self._warned_unfamiliar: date | None = None  # the local day of the last warning
        self.done = self.failed = 0
        self.error: str | None = None

    def run(self) -> None:
        """The worker thread. An error outside one image's processing (the ledger or the
        database cannot be written) ends it; the daemon then exits for systemd to restart
        it, and start-up recovery picks up where it stopped."""
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
        group. A job finishes once every image of it has its row.
        """
        engine = self.engine
        jobs = queue.claim(BATCH_IMAGES)
        if not jobs:
            return False
        self.metrics.started(jobs)
        self.metrics.queue(queue.counts())
        max_attempts = engine.config.watch.max_attempts
        scenes: dict[str, list[int | None]] = {}
        faults: dict[str, Exception] = {}  # the first fault of each job this time
        units: list[tuple[Job, int | None]] = []
        for job in jobs:
            planned = self._plan(job)
            if isinstance(planned, Exception):
                faults[job.job_id] = planned
                continue
            scenes[job.job_id], todo = planned
            units += [(job, scene) for scene in todo]
        group = engine.config.tiling.images_at_once
        for start in range(0, len(units), group):
            for (job, _), outcome in self._run(engine, units[start : start + group]):
                if isinstance(outcome, Exception):
                    faults.setdefault(job.job_id, outcome)
                else:
                    self._record(self._check_content(job, engine, outcome))
        outcomes: dict[str, Any] = {}
        for job in jobs:
            fault = faults.get(job.job_id)
            if fault is not None:
                message = _describe(fault)
                if job.attempts < max_attempts:
                    delay = RETRY_BASE_S * 2 ** (job.attempts - 1)
                    log.warning("%s: %s; trying again in %.0f s", job.rel_path, message, delay)
                    queue.retry(job.job_id, message, delay)
                    continue
                message = f"gave up after {job.attempts} attempts; last error: {message}"
                for scene in self._missing(job, scenes.get(job.job_id, [None])):
                    self._record(self._failed(job, engine, message, scene))
            outcomes[job.job_id] = self._outcome(job, scenes.get(job.job_id, [None]))
        queue.finish(outcomes)
        self.metrics.queue(queue.counts())
        crash_point("after-commit")
        return True

    def compute_status(self) -> dict[str, Any]:
        """Where the images are processed, for ``cellwatch status``."""
        return {"mode": "in-process", "device": self.engine.device or None, "workers": []}

    def _plan(self, job: Job) -> tuple[list[int | None], list[int | None]] | Exception:
        """The job's images and those of them still to run, or the fault that kept its
        file from being opened (a transient one: retried like any other).

        On the way it records what needs no work: a file refused just before reading
        (it may have been swapped for a link since it was queued) gets its failed row,
        and so does every image of a job that was running at each of the last
        ``watch.max_attempts`` stops; neither has anything left to run.
        """
        engine = self.engine
        follow = engine.config.watch.follow_symlinks
        if why := refusal(self.paths.inbox, job.rel_path, follow_symlinks=follow):
            if self._missing(job, [None]):
                self._record(self._failed(job, engine, why))
            return [None], []
        scenes = self._list_scenes(job)
        if isinstance(scenes, Exception):
            return scenes
        todo = self._missing(job, scenes)
        max_attempts = engine.config.watch.max_attempts
        if todo and job.attempts > max_attempts:
            reason = job.last_error or (
                "cellwatch stopped while processing this image (a crash, a power cut or "
                "an out-of-memory kill?)"
            )
            message = f"gave up after {max_attempts} attempts; last error: {reason}"
            self._record_all([self._failed(job, engine, message, scene) for scene in todo])
            return scenes, []
        return scenes, todo

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

    def _missing(self, job: Job, scenes: list[int | None]) -> list[int | None]:
        return [s for s in scenes if (job.job_id, ledger.scene_key(s)) not in self.recorded]

    def _outcome(self, job: Job, scenes: list[int | None]) -> str:
        """``done`` if every image of the job was counted, else ``failed``."""
        statuses = [self.recorded.get((job.job_id, ledger.scene_key(s))) for s in scenes]
        return "done" if all(status == "ok" for status in statuses) else "failed"

    def _run(
        self, engine: Engine, units: list[tuple[Job, int | None]]
    ) -> list[tuple[tuple[Job, int | None], Any]]:
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

    def _check_content(self, job: Job, engine: Engine, result: Any) -> Any:
        """The result, unless the file was replaced after it was queued: then the new
        content is a new job of its own, and this one is recorded as failed."""
        sha = result.row.get("sha256")
        if sha and sha != job.sha256 and not job.sha256.startswith("unreadable-"):
            return self._failed(
                job,
                engine,
                "the file changed after it was queued; its new content is counted as a new image",
                result.row.get("scene"),
            )
        return result

    def _failed(self, job: Job, engine: Engine, message: str, scene: int | None = None) -> Any:
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

    def _record(self, result: Any) -> None:
        """Append the result's rows unless its (job, scene) is already in the ledger."""
        self._record_all([result])

    def _record_all(self, results: list[Any]) -> None:
        """Append the rows of the results whose (job, scene) is not in the ledger yet, in one
        append for all."""
        from cellwatch.service.driver import record_all

        new: dict[tuple[str, str], Any] = {}
        for result in results:
            key = (result.row["job_id"], ledger.scene_key(result.row.get("scene")))
            if key not in self.recorded:
                new.setdefault(key, result)
        record_all(list(new.values()), self.paths.out)
        for key, result in new.items():
            row = result.row
            self.recorded[key] = row["status"]
            self.metrics.recorded(row)
            if row["status"] == "ok":
                self.done += 1
                log.info("%s: %s cells", ledger.row_name(row), row.get("cell_count"))
                self._warn_if_unfamiliar(row)
            else:
                self.failed += 1
                log.warning("%s failed: %s", ledger.row_name(row), row.get("error"))

    def _warn_if_unfamiliar(self, row: dict[str, Any]) -> None:
        """Log a warning for the first image of a local day whose familiarity is below
        ``report.familiarity_min``; the day's report flags every such image."""
        report = self.engine.config.report
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


class ClusterWorker(Worker):
    """The worker thread when Dask worker processes run the images (``compute``).

    It claims jobs while fewer than :attr:`Pool.window <cellwatch.service.cluster.Pool.window>`
    are in flight, submits one task each, and records results as they come back: the
    rows of all results at hand in one append, then their jobs finished in one commit.
    A worker that died holding a job costs that job one attempt and it runs again on
    another (:data:`cellwatch.errors.WORKER_DIED` in its row after
    ``watch.max_attempts``). When the scheduler is out of reach, or has no workers, the
    jobs wait in the queue (the ones in flight go back to it, their attempt not counted),
    the log and ``cellwatch status`` say so once a minute, and the work resumes when the
    scheduler is back.

    Parameters
    ----------
    pool : cellwatch.service.cluster.Pool
        The Dask client (and local cluster) to use; the rest as for :class:`Worker`.
    """

    def __init__(
        self,
        paths: Paths,
        engine: Engine,
        recorded: dict[tuple[str, str], str],
        *,
        stop: threading.Event,
        wake: threading.Event,
        pool: Any,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__(paths, engine, recorded, stop=stop, wake=wake, metrics=metrics)
        self.pool = pool
        self._queue: JobQueue | None = None  # the worker thread's connection, while it runs
        self.held: dict[str, tuple[Job, int | None]] = {}  # Dask key -> (job, scene) it runs
        self._jobs: dict[str, _InFlight] = {}  # job_id -> its scenes still on Dask
        self.problem: str | None = None
        self._said: tuple[str | None, float] = (None, 0.0)
        self._next_connect = 0.0
        self._status: dict[str, Any] = {"mode": "dask", "workers": []}
        self._next_status = 0.0

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
        self._next_connect = time.monotonic() + RECONNECT_S
        self._release_all()
        self.pool.close()
        try:
            self.pool.open()
            folders = [(self.paths.inbox, False), (self.paths.out, True)]
            found = self.pool.warm_up(self.engine.config, folders, self.engine.model_label)
        except ClusterError as exc:
            if at_start and self.pool.compute.scheduler is None:
                raise
            self._trouble(str(exc))
            self.pool.close()
            return False
        log.info("%s", describe_start(self.pool, found))
        if self.problem:
            log.warning("the Dask scheduler at %s is back; resuming", self.pool.address)
        self.problem = None
        return True

    def run(self) -> None:
        """The worker thread (see :meth:`Worker.run`); on stop it waits up to
        :data:`STOP_DRAIN_S` for the images in flight, then closes the local cluster."""
        self._queue: JobQueue | None = None
        try:
            with JobQueue(self.paths.db) as queue:
                self._queue = queue
                while not self.stop.is_set():
                    self.work(queue)
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
            self._trouble(self.problem or f"the Dask scheduler at {self.pool.address} is gone")
            self.wake.wait(1.0)
            return False
        busy = self._settle(queue, self.pool.finished(timeout=0))
        threads = self.pool.threads()
        alone = f"no Dask worker is connected to the scheduler at {self.pool.address}"
        if not threads:
            self._trouble(f"{alone}; the images wait in the queue")
        elif self.problem and self.problem.startswith(alone):
            log.warning("Dask workers are back; resuming")
            self.problem = None
        room = self.pool.compute.in_flight_per_worker * threads - len(self.held)
        while room > 0 and not self.stop.is_set():
            jobs = queue.claim(room)
            if not jobs:
                break
            room -= len(jobs)
            busy = True
            self._submit(queue, jobs)
        if time.monotonic() >= self._next_status:
            self._next_status = time.monotonic() + HEARTBEAT_S / 4
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

        engine = self.engine
        self.metrics.started(jobs)
        outcomes: dict[str, Any] = {}
        for job in jobs:
            planned = self._plan(job)
            if isinstance(planned, Exception):
                self._retry_or_fail(queue, job, planned, [None], outcomes)
                continue
            scenes, todo = planned
            if not todo:  # refused, given up, or every row landed before a crash
                outcomes[job.job_id] = self._outcome(job, scenes)
            else:
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
        engine = self.engine
        results: list[Any] = []
        settled: list[_InFlight] = []
        for fin in finished:
            entry = self.held.pop(fin.key, None)
            if entry is None:
                continue
            job, _ = entry
            state = self._jobs[job.job_id]
            state.waiting -= 1
            if fin.result is not None:
                results.append(self._check_content(job, engine, fin.result.result))
                for stage, seconds in fin.result.stages.items():
                    self.metrics.observe_stage(stage, seconds)
            else:
                error = fin.error or RuntimeError("the task ended with neither result nor error")
                killed = type(error).__name__ == "KilledWorker"
                if fin.lost or (killed and self.stop.is_set()):  # not the image's fault
                    state.lost = True
                elif state.fault is None:
                    state.fault = error
            if state.waiting == 0:
                settled.append(self._jobs.pop(job.job_id))
        self._record_all(results)
        outcomes: dict[str, Any] = {}
        for state in settled:
            job = state.job
            if state.fault is not None:
                self._retry_or_fail(queue, job, state.fault, state.scenes, outcomes)
            elif state.lost and self._missing(job, state.scenes):
                queue.release(job.job_id)
            else:
                outcomes[job.job_id] = self._outcome(job, state.scenes)
        if outcomes:
            queue.finish(outcomes)
            crash_point("after-commit", " ".join(s.job.rel_path for s in settled))
        self.metrics.queue(queue.counts())
        return True

    def _retry_or_fail(
        self,
        queue: JobQueue,
        job: Job,
        error: Exception,
        scenes: list[int | None],
        outcomes: dict[str, Any],
    ) -> None:
        """Try the job again later, or after ``watch.max_attempts`` give its images without
        a row one ``failed`` row each."""
        message = _describe(error)
        if job.attempts < self.engine.config.watch.max_attempts:
            killed = type(error).__name__ == "KilledWorker"
            delay = 0.0 if killed else RETRY_BASE_S * 2 ** (job.attempts - 1)
            log.warning("%s: %s; trying again in %.0f s", job.rel_path, message, delay)
            queue.retry(job.job_id, message, delay)
            return
        message = f"gave up after {job.attempts} attempts; last error: {message}"
        missing = self._missing(job, scenes)
        self._record_all([self._failed(job, self.engine, message, scene) for scene in missing])
        outcomes[job.job_id] = self._outcome(job, scenes)

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

    def _trouble(self, message: str) -> None:
        """Log a problem when it is new, and again once a minute while it lasts."""
        self.problem = message
        said, when = self._said
        if message != said or time.monotonic() - when >= PROBLEM_EVERY_S:
            log.error("%s", message)
            self._said = (message, time.monotonic())


@dataclass
class _InFlight:
    """A job whose images are on Dask: how many are still out, and what went wrong."""

    job: Job
    scenes: list[int | None]
    waiting: int
    fault: Exception | None = None  # the first error an image of it raised
    lost: bool = False  # a task went with the scheduler or a stop: not the image's fault


def _stopwatch(engine: Engine) -> Any:
    """The stopwatch of the pipeline in this process; None when Dask workers run it (their
    stage times come back with each result)."""
    return engine.segmenter.stopwatch if engine.segmenter is not None else None


def override_compute(config: Config, running: Config) -> Config:
    """``config`` with the ``compute`` section of the settings the daemon started with."""
    return dataclasses.replace(config, compute=running.compute)


def _lock(state: Path) -> IO[str]:
    """Hold an exclusive lock on the state folder for the daemon's lifetime (the kernel
    drops it when the process dies, even by kill -9)."""
    handle = (state / "daemon.lock").open("a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        pid = handle.read().strip() or "?"
        handle.close()
        raise CellwatchError(
            f"another `cellwatch watch` (pid {pid}) is already using the state folder "
            f"{state}; stop it first, or give this one its own --state"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _install_signals(handler: Callable[[int, FrameType | None], None]) -> dict[int, Any]:
    previous = {}
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        previous[signum] = signal.signal(signum, handler)
    return previous


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
