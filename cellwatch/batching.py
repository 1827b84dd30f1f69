"""Inference batches shared across threads, and surviving GPU out-of-memory errors.

:class:`SharedBatches` lets threads that segment different images fill one batch
together, so a burst of small images runs the network on full batches while other images
are read, labelled and written. :func:`split_on_out_of_memory` halves the batch when the
GPU runs out of memory and retries, so no tile is lost.
"""

from __future__ import annotations

__all__ = ["SharedBatches", "split_on_out_of_memory"]

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from cellwatch.errors import TransientError
from cellwatch.tiling import (
    MakeStitcher,
    PredictBatch,
    Prepare,
    TileQueue,
    TileSettings,
    TileSource,
    _predict,
)

if TYPE_CHECKING:
    from cellwatch.timing import Stopwatch

log = logging.getLogger(__name__)


class SharedBatches:
    """Dynamic batching: threads that segment different images share inference batches.

    Workers are counted in (:meth:`add_workers`, before they start, so none is missed) and
    out (:meth:`remove_worker`), and call :meth:`predict` where they would call
    :func:`predict_tiled`. A batch holds tiles of one shape (with ``fit``, images of
    different sizes have tiles of different shapes; a burst of one size shares batches), and
    runs as soon as it is full. A partial batch runs, padded
    with zeros, once no other worker can add tiles (all wait for the network, are
    :meth:`paused` or have left), or once no tile has arrived for ``max_wait_s`` (a worker
    busy measuring and writing its last image should not hold the network idle). The
    network runs in whichever waiting thread finds it idle, outside the lock, so other
    threads keep queuing images, labelling and writing meanwhile. Results are those of
    :func:`predict_tiled` on each image alone.
    """

    def __init__(
        self,
        predict_batch: PredictBatch,
        settings: TileSettings,
        *,
        batch_size: int = 8,
        max_wait_s: float = 0.05,
        stopwatch: Stopwatch | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._predict = predict_batch
        self._queue = TileQueue(settings, batch_size=batch_size, stopwatch=stopwatch)
        self._cond = threading.Condition()
        self._busy = 0  # workers that may queue tiles: not waiting, paused or gone
        self._running = False
        self._max_wait, self._clock = max_wait_s, clock
        self._changed = clock()  # when a tile last arrived or a batch last ran

    def add_workers(self, n: int = 1) -> None:
        """Count ``n`` workers in; call before starting them."""
        with self._cond:
            self._busy += n

    def remove_worker(self) -> None:
        """Count the calling worker out (in a ``finally``)."""
        with self._cond:
            self._busy -= 1
            self._cond.notify_all()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """The calling worker will queue nothing while inside (it waits for something)."""
        self.remove_worker()
        try:
            yield
        finally:
            self.add_workers()

    def predict(
        self,
        image: np.ndarray | TileSource,
        prepare: Prepare | None = None,
        *,
        stitcher: MakeStitcher | None = None,
        settings: TileSettings | None = None,
    ) -> np.ndarray:
        """The stitched ``(H, W, C)`` network output for ``image`` (see
        :func:`~cellwatch.tiling.predict_tiled` for ``prepare`` and ``stitcher``; ``settings``
        tile it instead of the shared ones); blocks until ready."""
        with self._cond:
            job = self._queue.add(image, prepare, stitcher=stitcher, settings=settings)
            self._changed = self._clock()
            self._busy -= 1
            try:
                while not job.done:
                    wait = self._wait_before_run()
                    if wait > 0:
                        self._cond.wait(None if wait == float("inf") else wait)
                    else:
                        self._run_one()
            finally:
                self._busy += 1
        return job.result()

    def _wait_before_run(self) -> float:
        """Seconds until a batch should run (0: now, inf: until something changes)."""
        queue = self._queue
        if self._running or not queue.pending:
            return float("inf")
        if queue.full or self._busy <= 0:
            return 0.0
        return max(0.0, self._changed + self._max_wait - self._clock())

    def _run_one(self) -> None:
        """Run one batch with the lock released around the network; lock held on entry."""
        batch = self._queue.take()
        self._running = True
        self._cond.release()
        try:
            outputs: np.ndarray | None = _predict(batch.tiles, self._predict)
            error: BaseException | None = None
        except BaseException as exc:  # handed to every image of the batch
            outputs, error = None, exc
        finally:
            self._cond.acquire()
            self._running = False
            self._changed = self._clock()
        if outputs is not None:
            self._queue.put(batch, outputs)
        else:
            self._queue.fail(batch, error or RuntimeError("batch failed"))
        self._cond.notify_all()
        if error is not None and not isinstance(error, Exception):
            raise error  # KeyboardInterrupt and the like stop this thread too


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says an accelerator (or the host) ran out of memory, on any backend:
    TensorFlow's ``ResourceExhaustedError``, JAX's ``RESOURCE_EXHAUSTED``, PyTorch's
    ``OutOfMemoryError``."""
    if isinstance(exc, MemoryError):
        return True
    name, text = type(exc).__name__, str(exc)
    return (
        name in ("ResourceExhaustedError", "OutOfMemoryError")
        or "RESOURCE_EXHAUSTED" in text
        or "out of memory" in text.lower()
    )


def split_on_out_of_memory(
    predict_batch: PredictBatch,
    *,
    is_oom: Callable[[BaseException], bool] = is_out_of_memory,
) -> PredictBatch:
    """``predict_batch`` that survives running out of accelerator memory.

    On an out-of-memory error the batch is predicted again in halves (zero-padded to equal
    size, so a compiled graph is reused), and the smaller size is kept for later calls:
    no tile is lost. Below one tile there is nothing left to halve, and the error becomes a
    :class:`~cellwatch.errors.TransientError` (the memory may be free on a retry).
    """
    state = {"size": 0}  # 0: whole batches
    lock = threading.Lock()

    def predict(batch: np.ndarray) -> np.ndarray:
        n = len(batch)
        size = min(n, state["size"] or n)
        while True:
            try:
                return _in_chunks(predict_batch, batch, size)
            except Exception as exc:
                if not is_oom(exc):
                    raise
                if size == 1:
                    raise TransientError(
                        "out of accelerator memory even for one tile; free the GPU or "
                        f"lower tiling.tile_size ({exc})"
                    ) from exc
                size //= 2
                with lock:
                    state["size"] = min(state["size"] or n, size)
                log.warning("out of accelerator memory; predicting %d tiles per call", size)

    return predict


def _in_chunks(predict_batch: PredictBatch, batch: np.ndarray, size: int) -> np.ndarray:
    if size >= len(batch):
        return np.asarray(predict_batch(batch))
    outputs = []
    for start in range(0, len(batch), size):
        chunk = batch[start : start + size]
        if len(chunk) < size:  # keep the compiled shape
            pad = np.zeros((size - len(chunk), *chunk.shape[1:]), chunk.dtype)
            chunk = np.concatenate([chunk, pad])
        outputs.append(np.asarray(predict_batch(chunk)))
    return np.concatenate(outputs)[: len(batch)]
