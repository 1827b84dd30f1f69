"""Prometheus metrics of ``cellwatch watch``, served at ``/metrics`` when ``metrics.port`` is set.

Every metric lives in a :class:`~prometheus_client.CollectorRegistry` that the daemon owns
(not the library's global one), so several daemons in one process (as in the tests) never
share or clash over a metric. The daemon calls a handful of methods as things happen: a job
claimed, an image recorded, the queue counted, a model loaded, and each pipeline stage timed
(through :attr:`cellwatch.timing.Stopwatch.listener`). Labels stay few and fixed: a status,
a stage name, the model's name and hash. Nothing is labelled per image.

The process that owns the job queue and writes the ledger (the driver) reports: with
workers elsewhere, what the driver records covers them all.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    start_http_server,
)

from cellwatch.errors import CellwatchError

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from cellwatch.service.jobs import Job
    from cellwatch.timing import Stopwatch

__all__ = ["Metrics", "MetricsServer", "serve"]

#: Seconds one run of a stage takes: from a tile's cut (milliseconds) to a huge image's
#: inference or write (minutes).
STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
#: Seconds a job waits in the queue: from a moment (idle daemon) to hours (a backlog).
WAIT_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)


class Metrics:
    """The daemon's metrics, in a registry of their own.

    Parameters
    ----------
    clock : callable
        Wall-clock seconds (for the last success and the queue wait); tests pass a fake.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.registry = CollectorRegistry()
        r = self.registry
        self.images = Counter(
            "cellwatch_images",
            "Images given a ledger row, by status (ok or failed).",
            ["status"],
            registry=r,
        )
        for status in ("ok", "failed"):  # both series exist from the start, at 0
            self.images.labels(status=status)
        self.cells = Counter("cellwatch_cells", "Cells counted in images recorded ok.", registry=r)
        self.queue_depth = Gauge(
            "cellwatch_queue_depth",
            "Jobs queued and not started (retries waiting for their delay included).",
            registry=r,
        )
        self.in_progress = Gauge(
            "cellwatch_jobs_in_progress", "Jobs claimed and being processed.", registry=r
        )
        self.stage_seconds = Histogram(
            "cellwatch_stage_seconds",
            "Seconds each run of a pipeline stage took (read, normalize, inference, ...).",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "cellwatch_queue_wait_seconds",
            "Seconds from a job becoming due (queued, or its retry delay over) to its start.",
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.last_success = Gauge(
            "cellwatch_last_success_timestamp_seconds",
            "Unix time of the last image recorded ok (0: none since the daemon started).",
            registry=r,
        )
        self.paused_gauge = Gauge(
            "cellwatch_paused",
            "1 while the daemon is paused, by reason (disk_full: the results disk is full).",
            ["reason"],
            registry=r,
        )
        self.paused_gauge.labels(reason="disk_full").set(0)  # the series exists from the start
        self.model = Info("cellwatch_model", "The model in use: name and file hash.", registry=r)
        ProcessCollector(registry=r)  # process_start_time_seconds, memory, CPU

    # --- what the daemon calls --------------------------------------------------------

    def use_model(self, label: str, stopwatch: Stopwatch | None = None) -> None:
        """A model was loaded (at start or on reload): name it, and time its stages.

        Parameters
        ----------
        label : str
            ``name@hash``, as the ledger's ``model`` column writes it.
        stopwatch : Stopwatch, optional
            The stopwatch of the pipeline that runs the model; each stage it times is
            observed in ``cellwatch_stage_seconds``.
        """
        name, _, digest = label.rpartition("@")
        self.model.info({"name": name or label, "hash": digest if name else ""})
        if stopwatch is not None:
            stopwatch.listener = self.observe_stage

    def observe_stage(self, stage: str, seconds: float) -> None:
        """One run of a pipeline stage took ``seconds``."""
        self.stage_seconds.labels(stage=stage).observe(seconds)

    def started(self, jobs: list[Job]) -> None:
        """Jobs were claimed: how long each had waited since it became due."""
        now = self.clock()
        for job in jobs:
            self.queue_wait.observe(max(0.0, now - job.due_at))

    def recorded(self, row: Mapping[str, object]) -> None:
        """An image's ledger row was written."""
        status = "ok" if row.get("status") == "ok" else "failed"
        self.images.labels(status=status).inc()
        if status == "ok":
            cells = row.get("cell_count")
            if isinstance(cells, int | float) and cells > 0:
                self.cells.inc(cells)
            self.last_success.set(self.clock())

    def paused(self, reason: str, on: bool) -> None:
        """The daemon paused (``on``) or resumed, for ``reason`` (``disk_full``)."""
        self.paused_gauge.labels(reason=reason).set(1 if on else 0)

    def queue(self, counts: Mapping[str, int]) -> None:
        """The job queue's counts by state (:meth:`JobQueue.counts`)."""
        self.queue_depth.set(counts.get("pending", 0))
        self.in_progress.set(counts.get("running", 0))


class MetricsServer:
    """The HTTP server answering scrapes at ``/metrics``, on a thread of its own."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server, self._thread = server, thread

    @property
    def port(self) -> int:
        """The port it answers on (useful when 0 asked for any free port)."""
        return int(self._server.server_address[1])

    def close(self) -> None:
        """Stop answering and free the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def serve(metrics: Metrics, address: str, port: int) -> MetricsServer:
    """Serve ``metrics`` at ``http://address:port/metrics`` until :meth:`MetricsServer.close`.

    Raises
    ------
    CellwatchError
        When the address cannot be used (the port is taken, or the address is not this
        machine's).
    """
    try:
        server, thread = start_http_server(port, addr=address, registry=metrics.registry)
    except OSError as exc:
        raise CellwatchError(
            f"cannot serve metrics on {address}:{port}: {exc.strerror or exc}; is another "
            "program (or another cellwatch) using that port? Choose another metrics.port, "
            "or set it to null to turn metrics off"
        ) from exc
    return MetricsServer(server, thread)
