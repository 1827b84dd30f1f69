"""``cellwatch watch``: the daemon's life — start-up, signals, reload, heartbeat, reports.

Three threads, each owning its own database connection:

- the **watcher** (:mod:`cellwatch.service.watcher`) finds files that are stable and complete and
  adds them to the job queue (:mod:`cellwatch.service.jobs`);
- the **worker**, a runner (:mod:`cellwatch.service.local_runner`, or
  :mod:`cellwatch.service.dask_runner` with ``compute``), claims queued jobs and runs their
  images; its :class:`~cellwatch.service.recorder.Recorder` appends the results to
  ``cells.csv`` and ``ledger.csv`` once per ``(job_id, scene)`` before the jobs are marked done;
- the **main** thread handles signals (the handlers only set flags), talks to systemd
  (:mod:`cellwatch.service.sdnotify`) and exits with status 1 if another thread dies, so systemd
  restarts the service.

Exactly one ledger row per image, through ``kill -9`` at any moment: the ledger row is
written (one ``write`` + ``fsync``) before the job is marked done, and at start-up a torn
last line is cut, every job whose ``job_id`` is in the ledger is marked finished, and jobs
found running are run again. A job run again after a crash may have appended some of its
cells already: readers of ``cells.csv`` keep, for each ``(job_id, scene)`` with a ledger
row, the last row of each ``(job_id, scene, label)`` (see docs/daemon.md).
"""

from __future__ import annotations

__all__ = [
    "HEARTBEAT_S",
    "Daemon",
    "Runner",
    "add_arguments",
    "checked",
    "run",
    "settings_from_args",
]

import argparse
import fcntl
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import IO, Any, Protocol

from cellwatch.config import Config, override
from cellwatch.errors import CellwatchError
from cellwatch.reporting.report import check_settings, reports_for_config
from cellwatch.service.dask_runner import DaskRunner
from cellwatch.service.engine import Engine, Paths, load_engine, override_compute, stopwatch_of
from cellwatch.service.jobs import FileVersion, JobQueue
from cellwatch.service.local_runner import LocalRunner
from cellwatch.service.memory import HeapTrace, limit_arenas
from cellwatch.service.metrics import Metrics, MetricsServer, serve
from cellwatch.service.pause import Pause
from cellwatch.service.recorder import Key, Recorder
from cellwatch.service.schedule import ReportSchedule
from cellwatch.service.sdnotify import Notifier
from cellwatch.service.watcher import Watcher
from cellwatch.storage import ledger

log = logging.getLogger("cellwatch.watch")

HEARTBEAT_S = 10.0  # how often the daemon tells `cellwatch status` it is alive


class Runner(Protocol):
    """What the daemon needs of its worker thread's object (a local or a Dask runner)."""

    engine: Engine
    error: str | None  # why the thread stopped, once it has

    @property
    def done(self) -> int: ...

    @property
    def failed(self) -> int: ...

    def run(self) -> None: ...

    def use(self, engine: Engine) -> None: ...  # SIGHUP: count with this from the next image

    def compute_status(self) -> dict[str, Any]: ...


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
    limit_arenas()  # before any thread starts: memory that stays flat for months
    return Daemon(lambda: checked(settings_from_args(args))).serve()


def checked(config: Config) -> Config:
    """``config`` once the report section's column-dependent checks pass too, so a bad
    ``report.group_pattern`` stops the daemon at start rather than at the first report."""
    check_settings(config.report)
    return config


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
        self._loading: threading.Thread | None = None  # loads the new model on SIGHUP
        self._loaded: tuple[Config, Paths, Engine] | Exception | None = None
        self._next_ping = 0.0
        self.reports = ReportSchedule(
            self.config.report.timezone, self.config.report.refresh_interval_s
        )
        self._report_thread: threading.Thread | None = None
        self.metrics = Metrics()
        self.metrics_server: MetricsServer | None = None
        self.pause = Pause(self.stop, self.metrics)  # while the results disk is full
        self.heap_trace = HeapTrace.from_environ()  # CELLWATCH_TRACEMALLOC: debugging only

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

    def _serve(self, queue: JobQueue, recorded: dict[Key, str]) -> int:
        self.notifier.status("loading the model")
        engine = load_engine(self.config)
        self.metrics.use_model(engine.model_label, stopwatch_of(engine))
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
        queue.set_meta(
            pid=str(os.getpid()),
            host=socket.gethostname(),
            started_at=_now(),
            state="running",
            last_reload="",
        )
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
        for thread in [*threads, *([self._loading] if self._loading else [])]:
            while thread.is_alive():
                thread.join(timeout=self._tick)
                if code == 0:  # alive and finishing; after a thread died, no more pings
                    self._ping()
        if self._report_thread is not None:
            self._report_thread.join()
        queue.set_meta(state="stopped", heartbeat=_now())
        log.info("stopped: %d image(s) counted, %d failed", worker.done, worker.failed)
        return code

    def _worker(self, engine: Engine, recorded: dict[Key, str]) -> Runner:
        """The worker thread's object: images in threads of this process, or on Dask; the
        one recorder is composed into either."""
        recorder = Recorder(self.paths, recorded, metrics=self.metrics, pause=self.pause)
        if engine.segmenter is not None:
            return LocalRunner(
                self.paths, engine, recorder, stop=self.stop, wake=self.wake, pause=self.pause
            )
        from cellwatch.service.cluster import Pool

        pool = Pool(engine.config.compute)
        runner = DaskRunner(
            self.paths, engine, recorder, stop=self.stop, wake=self.wake, pool=pool,
            pause=self.pause,
        )  # fmt: skip
        try:
            runner.connect(at_start=True)
        except BaseException:
            pool.close()  # the local workers, before the error stops the daemon
            raise
        return runner

    @property
    def _tick(self) -> float:
        interval = self.notifier.watchdog_interval_s
        return min(0.2, interval) if interval else 0.2

    def _loop(self, queue: JobQueue, worker: Runner, threads: list[threading.Thread]) -> int:
        next_beat = time.monotonic() + HEARTBEAT_S
        pauses = self.pause.changes
        while not self._stop_requested:
            time.sleep(self._tick)  # a signal handler runs during the sleep and sets a flag
            if self._reload_requested and self._loading is None:
                self._reload_requested = False  # a SIGHUP while loading: once this one is done
                self._start_reload()
            if self._loading is not None and not self._loading.is_alive():
                self._loading = None
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
            if time.monotonic() >= next_beat or self.pause.changes != pauses:
                next_beat = time.monotonic() + HEARTBEAT_S
                pauses = self.pause.changes  # paused or resumed: say so at once
                self._beat(queue, worker)
                if self.heap_trace is not None:
                    self.heap_trace(worker.done)
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

    def _beat(self, queue: JobQueue, worker: Runner) -> None:
        queue.set_meta(
            heartbeat=_now(),
            model=worker.engine.model_label,
            compute=json.dumps(worker.compute_status()),
            paused=self.pause.describe() or "",
        )
        self.metrics.queue(queue.counts())
        self.notifier.status(self._summary(queue, worker))

    def _summary(self, queue: JobQueue, worker: Runner) -> str:
        counts = queue.counts()
        writing = self.watcher.pending() if self.watcher is not None else 0
        paused = self.pause.describe()
        return (
            (f"{paused}; " if paused else "")
            + f"{counts['pending'] + counts['running']} queued, {writing} being written, "
            f"{worker.done} counted, {worker.failed} failed since start; "
            f"model {worker.engine.model_label}"
        )

    def _start_reload(self) -> None:
        """SIGHUP: read the configuration and load its model in a thread of its own, so
        the main loop goes on telling systemd it is alive (a large model, or a first
        compilation on a GPU, can take longer than the watchdog waits) while the old model
        keeps counting; :meth:`_reload` then puts the new one to work."""
        self.notifier.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        running = self.config

        def load() -> None:
            try:
                config = self.load_config()
                paths = Paths.of(config)
                if config.compute != running.compute:
                    log.warning("new compute settings take effect only after a restart")
                    config = override_compute(config, running)
                self._loaded = (config, paths, load_engine(config))
            except Exception as exc:  # reported by _reload, on the main thread
                self._loaded = exc

        self._loaded = None
        self._loading = threading.Thread(target=load, name="reload", daemon=True)
        self._loading.start()

    def _reload(self, queue: JobQueue, worker: Runner) -> None:
        """Put the model and settings :meth:`_start_reload` loaded to work from the next
        image on, or keep the old ones and say why the new ones cannot be used."""
        loaded = self._loaded
        if loaded is None:
            loaded = RuntimeError("the new settings were not loaded (see the log above)")
        if isinstance(loaded, Exception):  # a bad new model or config must not stop a daemon
            why = str(loaded).rstrip(".")
            log.error(
                "reload failed: %s. Still counting with model %s and the previous settings; "
                "fix %s and reload again (systemctl reload cellwatch)",
                why,
                worker.engine.model_label,
                self.config.source or "the configuration",
            )
            what = f"failed ({why}); still counting with model {worker.engine.model_label}"
        else:
            config, paths, engine = loaded
            if paths != self.paths:
                log.warning(
                    "a new inbox, output or state folder takes effect only after a restart; "
                    "still watching %s",
                    self.paths.inbox,
                )
            if config.metrics != self.config.metrics:
                log.warning("new metrics settings take effect only after a restart")
            self.config = config
            before = worker.engine
            self.metrics.use_model(engine.model_label, stopwatch_of(engine))
            worker.use(engine)
            if self.watcher is not None:
                self.watcher.update(config.watch)
            log.info("reloaded %s; model %s", config.source, engine.model_label)
            what = _log_switch(before, engine)
        queue.set_meta(last_reload=f"{_now()} {what}")  # for `cellwatch status`
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


def _log_switch(before: Engine, after: Engine) -> str:
    """Say what a reload changed in how images are counted (the ledger shows it per row);
    return it in a few words."""
    what = f"ok; model {after.model_label}"
    if after.model_label != before.model_label:
        log.info(
            "model switched from %s to %s: images from the next one on are counted with it",
            before.model_label,
            after.model_label,
        )
        what = f"ok; model switched from {before.model_label} to {after.model_label}"
    old, new = before.config.settings_hash(), after.config.settings_hash()
    if new != old:
        log.info("settings changed (settings hash %s -> %s) from the next image on", old, new)
        what += f"; settings hash {old} -> {new}"
    return what


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
