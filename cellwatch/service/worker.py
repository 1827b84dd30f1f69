"""What runs inside a Dask worker process: one image per task, with the model loaded once.

The driver (``cellwatch predict`` or the daemon) submits :func:`run_task` for each image.
The worker reads the image, runs the network, labels, measures, writes the label image and
overlay (each atomically) and returns the ledger row and the cells; it never touches
``ledger.csv`` or ``cells.csv``. The loaded model is kept in this process for the next
task with the same model and settings, so a worker loads it once.

:func:`warm_up` runs once per worker at start: it checks that the worker sees the folders
the driver named (remote workers need them on shared storage, at the same paths), loads
the model and runs one batch, and names the device the network runs on.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
import sys
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from cellwatch.config import Config
from cellwatch.errors import ClusterError
from cellwatch.service.crash import crash_point
from cellwatch.service.memory import HeapTrace, Trimmer

if TYPE_CHECKING:
    from cellwatch.pipeline import ImageResult, Segmenter

__all__ = ["Done", "Task", "check_folders", "run_task", "warm_up"]

KEEP_MODELS = 2  # models kept per process (the daemon's new one after a reload, and the old)

_segmenters: OrderedDict[tuple[str | None, str, str], Segmenter] = OrderedDict()
_loading = threading.Lock()
_device: str | None = None
_trim = Trimmer()  # freed pages back to the system after each image
# CELLWATCH_TRACEMALLOC=FILE: each worker appends its heap's growth to FILE.worker-PID
_heap_trace = HeapTrace.from_environ(suffix=f".worker-{os.getpid()}")
_tasks_done = 0
_counting = threading.Lock()


@dataclass(frozen=True)
class Task:
    """One image to process: the job the driver holds, and how to process it."""

    path: str  # absolute, as the workers see it
    job_id: str
    out_dir: str  # absolute
    config: Config
    model: str = ""  # the model's name@hash the driver expects: a new file is loaded anew
    scene: int | None = None  # which scene of a microscope file; None for a one-image file


@dataclass
class Done:
    """A task's result and where it ran."""

    result: ImageResult
    worker: str  # the Dask worker's address
    device: str
    stages: dict[str, float] = field(default_factory=dict)  # seconds per pipeline stage


def run_task(task: Task) -> Done:
    """Process one image (:func:`cellwatch.pipeline.process_image`) in this worker.

    Bad input comes back as a ``failed`` row; a :class:`~cellwatch.errors.TransientError`
    or an unexpected error is raised, and the driver decides whether to try again.
    """
    from cellwatch.pipeline import process_image

    logging.getLogger("tifffile").setLevel(logging.ERROR)  # the row says what is wrong
    # A worker that cannot see the shared folders must not record the image as unreadable.
    check_folders([(str(Path(task.path).parent), False), (task.out_dir, False)])
    segmenter = _segmenter(task.config, task.model)
    before = dict(segmenter.stopwatch.totals)
    result = process_image(
        Path(task.path),
        config=segmenter.config,  # with the runtime and precision that ran
        segmenter=segmenter,
        out_dir=Path(task.out_dir),
        job_id=task.job_id,
        scene=task.scene,
    )
    crash_point("after-labels", task.path)
    _trim()
    _count_task()
    # With several threads per worker the stages of images side by side mix: a share each.
    stages = {k: v - before.get(k, 0.0) for k, v in segmenter.stopwatch.totals.items()}
    return Done(result, _worker_address(), _device or "unknown", stages)


def _count_task() -> None:
    """One more image done in this worker (for the optional heap trace)."""
    global _tasks_done
    with _counting:
        _tasks_done += 1
        if _heap_trace is not None:
            _heap_trace(_tasks_done)


def warm_up(config: Config, folders: list[tuple[str, bool]], model: str = "") -> dict[str, Any]:
    """Check the folders, load the model, run one batch; what the driver logs.

    Parameters
    ----------
    config : Config
        The settings the tasks will use (the model among them).
    folders : list of (path, writable)
        Folders this worker must see; ``writable`` ones it must be able to write to.

    Raises
    ------
    ClusterError
        A folder is missing or not writable here (it names the folder and this worker).
    """
    check_folders(folders)
    _segmenter(config, model)
    return {
        "worker": _worker_address(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "device": _device,
    }


def check_folders(folders: list[tuple[str, bool]], *, where: str | None = None) -> None:
    """Raise :class:`ClusterError` naming the first folder this process cannot see (or
    write to, when it must)."""
    where = where or f"the Dask worker on {socket.gethostname()} ({_worker_address()})"
    for folder, writable in folders:
        path = Path(folder)
        if not path.is_dir():
            raise ClusterError(
                f"{where} cannot see the folder {path}: remote workers need the inbox, the "
                "images and the output folder on shared storage (NFS/SMB) mounted at the "
                "same path on every machine (docs/scale-out.md)"
            )
        if writable:
            try:
                path.mkdir(parents=True, exist_ok=True)
                with tempfile.NamedTemporaryFile(dir=path, prefix=".cellwatch-check-"):
                    pass
            except OSError as exc:
                raise ClusterError(
                    f"{where} cannot write to {path}: {exc.strerror or exc}; the output "
                    "folder must be writable by the workers' user on every machine"
                ) from exc


def _segmenter(config: Config, model: str) -> Segmenter:
    """The segmenter for this model (file and ``name@hash``) and these settings, loaded on
    first use."""
    global _device
    key = (config.model.path, model, config.settings_hash())
    with _loading:
        segmenter = _segmenters.get(key)
        if segmenter is not None:
            _segmenters.move_to_end(key)
            return segmenter
        import numpy as np

        from cellwatch.pipeline import Segmenter
        from cellwatch.runtime import device_name, load, resolve

        config = resolve(config)
        segmenter = Segmenter(config, load(config))
        # One batch now, so the first image does not pay for compiling, of the tiles an image
        # too large to grow them gets (tiles_for): larger ones would hold working memory
        # that a worker counting small images never needs.
        side = segmenter.tiles_for(image_px=1 << 40).tile
        batch = config.tiling.batch_size
        segmenter.predict_batch(np.zeros((batch, side, side, 1), np.float32))
        if _device is None:
            _device = device_name(segmenter.model)
            _exit_without_waiting()
        _segmenters[key] = segmenter
        while len(_segmenters) > KEEP_MODELS:
            _segmenters.popitem(last=False)
        return segmenter


_exit_status = 0  # what this process is exiting with, once it is


def _exit_without_waiting() -> None:
    """End the process as soon as Python is done, with the exit status it was ending with.

    TensorFlow can keep a finished worker process from exiting for seconds (until the
    nanny kills it); everything it had to give has been returned by then. Python does not
    tell an exit handler the status, so ``sys.exit`` and the hook of uncaught exceptions
    note it on the way out: a worker that failed must not look like one that finished.
    """
    real_exit, real_hook = sys.exit, sys.excepthook

    def noting_exit(status: object = None) -> NoReturn:
        global _exit_status
        _exit_status = _status_of(status)
        real_exit(status)

    def noting_hook(*args: Any) -> None:
        global _exit_status
        _exit_status = 1
        real_hook(*args)

    def end() -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                stream.flush()  # closed or gone: nothing to flush
        os._exit(_exit_status)

    sys.exit, sys.excepthook = noting_exit, noting_hook  # type: ignore[assignment]
    atexit.register(end)


def _status_of(status: object) -> int:
    """The exit status ``sys.exit(status)`` gives: None is 0, a number itself, else 1."""
    if status is None:
        return 0
    return status if isinstance(status, int) else 1


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except ValueError:  # not inside a Dask worker (a test calling run_task directly)
        return f"pid {os.getpid()}"
