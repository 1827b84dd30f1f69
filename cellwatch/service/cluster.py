"""The driver's side of Dask distributed: start or join a cluster, hand it images, take
their results back.

``compute.workers`` worker processes on this machine are a Dask cluster of our own
(:class:`distributed.SpecCluster` with one :class:`distributed.Nanny` per worker, so each
process gets its own environment: the GPU it may use, its share of that GPU's memory, and
how many CPU threads its libraries may start). ``compute.scheduler`` joins an existing
cluster instead. Either way the driver — ``cellwatch predict`` or the daemon — submits one
task per image (:func:`cellwatch.service.worker.run_task`), keeps at most
:attr:`Pool.window` of them in flight, and appends every result itself
(:func:`cellwatch.service.driver.record`): Dask moves work and results, the driver keeps
the job queue and the ledger.

In a cluster of our own a worker's death fails its task at once
(``distributed.scheduler.allowed-failures: 0``) as :class:`distributed.scheduler.KilledWorker`,
and the driver counts it as one attempt of that image; only one task is sent to a worker
thread at a time (``worker-saturation: 1.0``), so a death costs no other image an attempt.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellwatch.config import ComputeConfig, Config, tcp_host_port
from cellwatch.errors import ClusterError, ModelError
from cellwatch.model import visible_gpus

__all__ = [
    "CONNECT_TIMEOUT_S",
    "GPU_PROCESSES",
    "Finished",
    "Pool",
    "describe_start",
    "greets_like_dask",
    "resolve_workers",
    "uses_dask",
    "worker_environments",
]

log = logging.getLogger("cellwatch.cluster")

CONNECT_TIMEOUT_S = 15.0  # a scheduler that does not answer in this time is unreachable

#: Messages Dask keeps of each stream (scheduler to each worker, client to scheduler) and
#: scheduler transitions, for developers' debugging; Dask's default is 1,000 of each. A
#: message that hands a worker an image holds the whole task, settings included, so the
#: daemon, which hosts the local scheduler, grew 67 MB over 5,000 images with two workers
#: (``benchmarks/soak.py --workers 2``) until each stream's log was full.
DASK_MESSAGE_LOG = 50
GREETING_S = 5.0  # a Dask scheduler greets a new connection at once; a web server waits
GPU_PROCESSES = 8  # worker processes per GPU for workers: auto (see docs/benchmarks.md)
MAX_CHECKED_FOLDERS = 1000  # images whose folders the workers check at start
WARM_RESULT_S = 5.0  # how long a finished warm-up's answer is waited for
GPU_MEMORY_SHARE = 0.9  # of a GPU's memory, divided among the processes that share it


def greets_like_dask(address: str, origin: str) -> None:
    """Raise a :class:`ClusterError` within about 25 s when ``tcp://host:port`` is no Dask
    scheduler: nothing listens, or a web server does (the dashboard's port, 8787, given
    for the scheduler's, 8786), where Dask's client would wait for ever. Other schemes
    (tls://, ws://) are left to Dask."""
    where = tcp_host_port(address)
    if where is None:
        return
    host, port = where
    try:
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
    except OSError as exc:
        raise ClusterError(
            f"cannot reach the Dask scheduler at {address} within {CONNECT_TIMEOUT_S:.0f} s "
            f"({exc.strerror or exc}); is `dask scheduler` running there, and is the address "
            f"({origin}) right?"
        ) from exc
    with sock:
        sock.settimeout(GREETING_S)
        try:
            if sock.recv(1):
                return  # it spoke first, as a Dask scheduler does
            heard = b""
        except TimeoutError:
            sock.sendall(b"HEAD / HTTP/1.0\r\n\r\n")
            try:
                heard = sock.recv(5)
            except (TimeoutError, OSError):
                heard = b""
        except OSError:
            heard = b""
    what = (
        "a web server (HTTP), not a Dask scheduler"
        if heard == b"HTTP/"
        else (f"not a Dask scheduler: it said nothing within {GREETING_S:.0f} s")
    )
    raise ClusterError(
        f"{address} ({origin}) is {what}. Is it the dashboard's port? The scheduler "
        "listens on another port, 8786 unless it was started with --port; `dask scheduler` "
        "prints both addresses when it starts."
    )


def resolve_workers(
    compute: ComputeConfig, *, cpus: int | None = None, gpus: int | None = None
) -> int:
    """The number of local worker processes ``compute`` asks for; 0 means in this process.

    ``auto`` is what measured fastest: on a machine without a GPU the in-process path,
    whose threads already share the network's batches and keep the cores busy; on a GPU
    box :data:`GPU_PROCESSES` processes per GPU (one per GPU with ``gpu_sharing:
    exclusive``), leaving one core to the driver.

    Examples
    --------
    >>> resolve_workers(ComputeConfig(), cpus=2, gpus=0)
    0
    >>> resolve_workers(ComputeConfig(), cpus=16, gpus=1)
    8
    >>> resolve_workers(ComputeConfig(gpu_sharing="exclusive"), cpus=16, gpus=2)
    2
    """
    if compute.workers != "auto":
        return int(compute.workers)
    gpus = visible_gpus() if gpus is None else gpus
    if not gpus:
        return 0
    cpus = (os.cpu_count() or 1) if cpus is None else cpus
    per_gpu = 1 if compute.gpu_sharing == "exclusive" else GPU_PROCESSES
    return max(1, min(gpus * per_gpu, cpus - 1))


def uses_dask(compute: ComputeConfig) -> bool:
    """True when images go to Dask workers rather than to threads of this process."""
    return compute.scheduler is not None or resolve_workers(compute) > 0


def worker_environments(
    n: int, *, threads: int, gpus: int, sharing: str = "shared"
) -> list[dict[str, str]]:
    """The environment of each of ``n`` local worker processes.

    Each may start ``threads`` CPU threads in its numerical libraries (so ``n`` processes
    do not oversubscribe the cores). With GPUs, processes are dealt round-robin, one
    ``CUDA_VISIBLE_DEVICES`` each; processes sharing a GPU allocate its memory as they need
    it, up to their share.

    Examples
    --------
    >>> [e["CUDA_VISIBLE_DEVICES"] for e in worker_environments(3, threads=1, gpus=2)]
    ['0', '1', '0']
    >>> worker_environments(2, threads=1, gpus=1)[0]["XLA_PYTHON_CLIENT_MEM_FRACTION"]
    '0.450'
    """
    per_gpu = [len(range(g, n, gpus)) for g in range(gpus)] if gpus else []
    envs = []
    for i in range(n):
        env = {
            name: str(threads)
            for name in (
                "OMP_NUM_THREADS",
                "MKL_NUM_THREADS",
                "OPENBLAS_NUM_THREADS",
                "TF_NUM_INTRAOP_THREADS",
            )
        }
        env |= {
            "TF_NUM_INTEROP_THREADS": "1",
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "DASK_LOGGING__DISTRIBUTED": "warning",  # Dask's own start/stop chatter
        }
        if gpus:
            gpu = i % gpus if sharing == "shared" else i
            env["CUDA_VISIBLE_DEVICES"] = str(gpu) if gpu < gpus else ""
            share = per_gpu[gpu] if gpu < gpus else 1
            if share > 1:
                env |= {
                    "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
                    "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{GPU_MEMORY_SHARE / share:.3f}",
                    "TF_FORCE_GPU_ALLOW_GROWTH": "true",
                }
        envs.append(env)
    return envs


@dataclass(frozen=True)
class Finished:
    """A task that is over: its key, and its result, or the exception it ended with."""

    key: str
    result: Any  # cellwatch.service.worker.Done, or None
    error: BaseException | None
    lost: bool  # cancelled because the driver lost the scheduler: not the image's fault


class Pool:
    """A Dask client and, for ``compute.workers``, the local cluster it started.

    Parameters
    ----------
    compute : ComputeConfig
        The ``compute`` settings.
    workers : int, optional
        Local worker processes (default: :func:`resolve_workers`); ignored when
        ``compute.scheduler`` is set.
    """

    def __init__(
        self,
        compute: ComputeConfig,
        *,
        workers: int | None = None,
        origin: str = "compute.scheduler",
    ) -> None:
        self.compute = compute
        self.origin = origin  # where compute.scheduler came from, for messages
        self.workers = resolve_workers(compute) if workers is None else workers
        self.cluster: Any = None
        self.client: Any = None
        self.futures: dict[str, Any] = {}  # key -> Future, the tasks in flight
        self.devices: dict[str, str] = {}  # worker address -> device
        self.warming: dict[str, Any] = {}  # worker address -> its warm-up task

    @property
    def address(self) -> str:
        """The scheduler's address (ours, or the one we joined)."""
        if self.compute.scheduler:
            return self.compute.scheduler
        return str(self.cluster.scheduler_address) if self.cluster is not None else "(none)"

    def open(self) -> Pool:
        """Start the local cluster, or connect to ``compute.scheduler``.

        Raises
        ------
        ClusterError
            The scheduler does not answer within :data:`CONNECT_TIMEOUT_S`.
        """
        import dask
        from distributed import Client

        logging.getLogger("distributed").setLevel(logging.WARNING)
        # For this process (its client, and the local scheduler with its streams to the
        # workers, made later as workers join): see DASK_MESSAGE_LOG.
        dask.config.set({"distributed.admin.low-level-log-length": DASK_MESSAGE_LOG})
        if self.compute.scheduler is None:
            self.cluster = self._start_local()
            self.client = Client(self.cluster, set_as_default=False)
            return self
        greets_like_dask(self.compute.scheduler, self.origin)
        try:
            self.client = Client(
                self.compute.scheduler, timeout=CONNECT_TIMEOUT_S, set_as_default=False
            )
        except (OSError, TimeoutError, ValueError) as exc:
            raise ClusterError(
                f"cannot reach the Dask scheduler at {self.compute.scheduler} "
                f"within {CONNECT_TIMEOUT_S:.0f} s ({exc}); is `dask scheduler` running there, "
                f"and is the address ({self.origin}) right?"
            ) from exc
        return self

    def _start_local(self) -> Any:
        import dask
        from distributed import Nanny, Scheduler, SpecCluster

        c, gpus = self.compute, visible_gpus()
        envs = worker_environments(
            self.workers, threads=c.threads_per_worker, gpus=gpus, sharing=c.gpu_sharing
        )
        specs = {
            f"cellwatch-{i}": {
                "cls": Nanny,
                "options": {
                    "nthreads": c.threads_per_worker,
                    "env": env,
                    "host": "127.0.0.1",
                    "memory_limit": 0,  # as in one process: no limit but the machine's
                    "silence_logs": logging.WARNING,
                },
            }
            for i, env in enumerate(envs)
        }
        dashboard: dict[str, Any] = {"dashboard_address": c.dashboard_address}
        if c.dashboard_address is None:
            dashboard = {"dashboard": False}
        settings = {
            "distributed.scheduler.allowed-failures": 0,
            "distributed.scheduler.worker-saturation": 1.0,
            # Dask's statistical profiler samples each worker's threads every 10 ms and
            # keeps what it saw by task and by second: with the pipeline's deep stacks
            # each worker grew ~50 MB per 1,000 images (benchmarks/soak.py --workers 2).
            "distributed.worker.profile.enabled": False,
        }
        with dask.config.set(settings):
            return SpecCluster(
                workers=specs,
                scheduler={
                    "cls": Scheduler,
                    "options": {"host": "127.0.0.1", **dashboard},
                },
                silence_logs=logging.WARNING,
                name="cellwatch",
            )

    @property
    def dashboard(self) -> str | None:
        """Dask's dashboard, where it has one."""
        try:
            if "dashboard" not in self.client.scheduler_info().get("services", {}):
                return None  # dashboard_address: null
            link = str(self.client.dashboard_link)
        except Exception:  # not connected
            return None
        return link if _has_bokeh() else f"{link} (pip install bokeh for its pages)"

    @property
    def healthy(self) -> bool:
        """Connected to the scheduler now."""
        return self.client is not None and self.client.status == "running"

    def threads(self) -> int:
        """Worker threads the scheduler has now (0 while no worker is there)."""
        try:
            return int(sum(self.client.nthreads().values()))
        except Exception:  # the scheduler went away between two calls
            return 0

    @property
    def window(self) -> int:
        """How many tasks may be in flight: ``in_flight_per_worker`` per worker thread."""
        return self.compute.in_flight_per_worker * self.threads()

    def wait_for_workers(self, timeout: float) -> None:
        """Block until a worker is there.

        Raises
        ------
        ClusterError
            None joined within ``timeout`` seconds.
        """
        try:
            self.client.wait_for_workers(1, timeout=timeout)
        except (TimeoutError, OSError) as exc:
            raise ClusterError(
                f"no Dask worker joined the scheduler at {self.address} within {timeout:.0f} s; "
                "start workers (`dask worker ADDRESS`) or raise compute.worker_timeout_s"
            ) from exc

    def warm_up(
        self, config: Config, folders: Iterable[tuple[Path, bool]], model: str = ""
    ) -> list[dict]:
        """Check the folders and load the model on every worker there now; one dict per
        worker (its address, host, pid and device).

        Raises
        ------
        ClusterError
            A worker cannot see or write a folder (the message names both).
        ModelError
            The model does not load.
        """
        from cellwatch.service.worker import warm_up

        listed = [(str(Path(p).absolute()), writable) for p, writable in folders]
        addresses = list(self.client.scheduler_info(n_workers=-1)["workers"])
        futures = [
            self.client.submit(
                warm_up,
                config,
                listed,
                model,
                key=f"cellwatch-warm-up-{i}-{time.monotonic_ns()}",
                workers=[address],
                allow_other_workers=False,
                pure=False,
            )
            for i, address in enumerate(addresses)
        ]
        found = self.client.gather(futures)
        for info in found:
            self.devices[info["worker"]] = str(info["device"])
        return found

    def warm_new(
        self, config: Config, folders: Iterable[tuple[Path, bool]], model: str = ""
    ) -> list[str]:
        """Start warming up workers that joined since (:func:`warm_up`, without waiting),
        and collect the warm-ups that are over; the problems they found, in words."""
        from cellwatch.service.worker import warm_up

        problems = []
        for address, future in list(self.warming.items()):
            if future.status == "pending":
                continue
            del self.warming[address]
            try:
                self.devices[address] = str(future.result(timeout=WARM_RESULT_S)["device"])
            except (ClusterError, ModelError) as exc:
                problems.append(str(exc))
            except Exception as exc:  # the worker died meanwhile: a new one comes anew
                log.debug("warming up %s: %s", address, exc)
            future.release()
        listed = [(str(Path(p).absolute()), writable) for p, writable in folders]
        try:
            addresses = list(self.client.scheduler_info(n_workers=-1)["workers"])
        except Exception:  # the scheduler went away between two calls
            return problems
        for address in set(self.warming) - set(addresses):  # the worker left first
            self.warming.pop(address).release()
        for address in addresses:
            if address in self.devices or address in self.warming:
                continue
            self.warming[address] = self.client.submit(
                warm_up,
                config,
                listed,
                model,
                key=f"cellwatch-warm-up-{address}-{time.monotonic_ns()}",
                workers=[address],
                allow_other_workers=False,
                pure=False,
            )
        return problems

    def submit(self, key: str, task: Any) -> None:
        """Hand one task (:class:`cellwatch.service.worker.Task`) to Dask."""
        from cellwatch.service.worker import run_task

        self.futures[key] = self.client.submit(run_task, task, key=key, pure=False)

    def finished(self, timeout: float) -> list[Finished]:
        """The tasks that are over, waiting up to ``timeout`` seconds for a first one."""
        from distributed import wait

        if not self.futures:
            if timeout:
                time.sleep(timeout)
            return []
        try:
            wait(list(self.futures.values()), timeout=timeout, return_when="FIRST_COMPLETED")
        except TimeoutError:
            return []
        except Exception:  # the connection broke while waiting; the futures say how
            pass
        return list(self._collect())

    def _collect(self) -> Iterator[Finished]:
        for key, future in list(self.futures.items()):
            if future.status == "pending":
                continue
            del self.futures[key]
            if future.status == "finished":
                try:
                    done = future.result(timeout=CONNECT_TIMEOUT_S)
                except Exception as exc:  # lost on the way back: the worker went away
                    yield Finished(key, None, exc, lost=not self.healthy)
                    continue
                self.devices[done.worker] = done.device
                yield Finished(key, done, None, lost=False)
            elif future.status == "cancelled" or not self.healthy:
                yield Finished(key, None, _cancelled(future), lost=True)
            else:
                yield Finished(key, None, future.exception(timeout=CONNECT_TIMEOUT_S), lost=False)

    def drop_all(self) -> list[str]:
        """Forget every task in flight (after the scheduler was lost); their keys."""
        keys = list(self.futures)
        for future in [*self.futures.values(), *self.warming.values()]:
            future.release()
        self.futures.clear()
        self.warming.clear()
        return keys

    def describe(self) -> dict[str, Any]:
        """Workers, their device and jobs in flight, for ``cellwatch status``."""
        info: dict[str, Any] = {
            "scheduler": self.address,
            "dashboard": self.dashboard,
            "in_flight": len(self.futures),
            "workers": [],
        }
        if not self.healthy:
            return info
        try:
            workers = self.client.scheduler_info(n_workers=-1)["workers"]
            processing = self.client.processing()
        except Exception:  # the scheduler went away between two calls
            return info
        for address, w in sorted(workers.items()):
            info["workers"].append(
                {
                    "address": address,
                    "name": str(w.get("name", address)),
                    "threads": int(w.get("nthreads", 0)),
                    "device": self.devices.get(address, "not known yet"),
                    "in_flight": len(processing.get(address, ())),
                }
            )
        return info

    def close(self) -> None:
        """Close the client and stop the local cluster's workers (an external cluster's
        workers keep running)."""
        self.futures.clear()
        self.warming.clear()
        for closing in (self.client, self.cluster):
            if closing is None:
                continue
            try:
                closing.close()
            except Exception as exc:  # already gone; nothing left to stop
                log.debug("closing %s: %s", closing, exc)
        self.client = self.cluster = None

    def __enter__(self) -> Pool:
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def describe_start(pool: Pool, found: list[dict]) -> str:
    """One log line: the scheduler, the dashboard and each worker's device."""
    devices: dict[str, int] = {}
    for info in found:
        key = f"{info['device']} on {info['host']}"
        devices[key] = devices.get(key, 0) + 1
    where = ", ".join(f"{n} × {d}" for d, n in devices.items())
    return (
        f"Dask scheduler {pool.address}, dashboard {pool.dashboard or 'off'}; "
        f"{len(found)} worker(s): {where}"
    )


def _cancelled(future: Any) -> BaseException:
    try:
        return future.exception(timeout=1)  # type: ignore[no-any-return]
    except BaseException as exc:  # CancelledError and friends: that is the answer
        return exc


def _has_bokeh() -> bool:
    import importlib.util

    return importlib.util.find_spec("bokeh") is not None
