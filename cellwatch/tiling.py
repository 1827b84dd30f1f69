"""Cut an image into overlapping tiles, predict them in fixed-size batches, stitch the outputs.

Every batch handed to the model has exactly ``batch_size`` tiles of one shape: the last
batch is padded with zero tiles whose outputs are dropped. With ``fit`` (what the pipeline
uses) tiles shrink to fit each image, so images of different sizes give tiles of
different shapes and batches group tiles by shape; the network's ``tf.function``
(``reduce_retracing``) is traced for the first shape and once more, shape-free, for all
the others. Tiles of several images share batches: :func:`predict_tiled_many` for a
sequence of images in one thread, :class:`cellwatch.batching.SharedBatches` for images
that several threads segment at once (the network then runs while other images are read,
labelled and written). Tiles are cut from the image as
their batch is filled, so memory is the stitched output plus one batch.

Where the tiles lie and how the outputs are stitched is :mod:`cellwatch.tile_grid`'s;
its names are imported here too, so the tiler is used from one module.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_OVERLAP",
    "MakeStitcher",
    "PredictBatch",
    "Prepare",
    "Stitcher",
    "TileGrid",
    "TileQueue",
    "TileSettings",
    "TileSource",
    "predict_tiled",
    "predict_tiled_many",
    "tile_settings",
    "tile_side_for_memory",
]

import math
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from cellwatch.errors import ModelError
from cellwatch.tile_grid import (
    DEFAULT_OVERLAP,
    MakeStitcher,
    Stitcher,
    TileGrid,
    TileSettings,
    TileSource,
    tile_settings,
)

if TYPE_CHECKING:
    from cellwatch.timing import Stopwatch

PredictBatch = Callable[[np.ndarray], np.ndarray]
Prepare = Callable[[np.ndarray], object]  # turns cut tiles (float32) into network input, in place


def _check_image(image: np.ndarray | TileSource, prepare: Prepare | None = None) -> None:
    if not isinstance(image, np.ndarray):
        if len(image.shape) != 2:
            raise ValueError(f"expected a 2-D tile source, got shape {image.shape}")
        return  # a source gives network input itself
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {image.shape}")
    if prepare is None and not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"expected a float image, got {image.dtype} — forgot to normalize?")


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")


def _predict(batch: np.ndarray, predict_batch: PredictBatch) -> np.ndarray:
    outputs = np.asarray(predict_batch(batch))
    if outputs.ndim != 4 or outputs.shape[:3] != batch.shape[:3]:
        raise ModelError(
            f"model returned shape {outputs.shape} for input {batch.shape}; "
            "expected (batch, tile, tile, channels)"
        )
    return outputs


@dataclass(eq=False)
class TileJob:
    """One image on its way through the network."""

    grid: TileGrid
    image: np.ndarray | TileSource  # tiles are cut from it as their batch is filled
    prepare: Prepare | None = None  # applied to the image's tiles as they are cut
    taken: int = 0  # tiles handed to a batch so far
    stitcher: Stitcher | None = None  # created once the model's channel count is known
    error: BaseException | None = None
    done: bool = False
    make_stitcher: MakeStitcher = Stitcher

    def result(self) -> np.ndarray:
        """The stitched ``(H, W, C)`` output; raises the error that stopped the job."""
        if self.error is not None:
            raise self.error
        if self.stitcher is None:
            raise RuntimeError("no tile of this image has been predicted yet")
        return self.stitcher.result()


@dataclass(eq=False)
class _Batch:
    tiles: np.ndarray  # (batch_size, *tile_shape, 1) float32, zero-padded
    runs: list[tuple[TileJob, int, int, int]] = field(default_factory=list)  # job, first, n, slot


#: Peak memory of counting one image, as measured (docs/speed.md, "Memory"): a fixed part
#: (the interpreter, the libraries, the model), a part per pixel of the image (its pixels,
#: the stitched output plane, its labels) and the network's working memory per pixel of a
#: tile, which depends on the precision it runs at (OpenVINO on two cores, bundled model).
MEMORY_BUDGET_MB = 950
FIXED_MB = 210
IMAGE_BYTES_PER_PX = 8
TILE_BYTES_PER_PX = {"f32": 320, "bf16": 200, "int8": 310}  # with cellwatch.ov_graph
#: Tiles of images too large for the budget are not made smaller than this: their margins
#: would then cost more network time than the memory they save is worth.
SMALLEST_TILE = 960


def tile_side_for_memory(largest: int, image_px: int, precision: str, *, align: int = 16) -> int:
    """The tile side for an image of ``image_px`` pixels: the largest multiple of ``align``
    up to ``largest`` whose network memory, with the image's own, keeps the modelled peak
    within :data:`MEMORY_BUDGET_MB`; never below ``min(largest, SMALLEST_TILE)``.

    Tiling is exact (every kept pixel has the context the network needs), so the side
    changes how fast and in how much memory an image is counted, never its labels. A
    larger tile wastes less on the overlap: 1.30 network pixels per image pixel at 1536
    instead of 1.56 at 960.

    Examples
    --------
    >>> tile_side_for_memory(1536, 4096 * 4096, "bf16")  # a 4096² mosaic: the largest
    1536
    >>> tile_side_for_memory(1536, 8192 * 8192, "bf16")  # an 8192² image: little room
    992
    >>> tile_side_for_memory(1536, 6144 * 6144, "bf16")
    1472
    >>> tile_side_for_memory(768, 8192 * 8192, "f32")  # a smaller setting is kept
    768
    """
    per_px = TILE_BYTES_PER_PX.get(precision, max(TILE_BYTES_PER_PX.values()))
    room = MEMORY_BUDGET_MB - FIXED_MB - IMAGE_BYTES_PER_PX * image_px / 1e6
    fits = math.isqrt(max(0, int(room * 1e6 / per_px))) // align * align
    return max(min(largest, SMALLEST_TILE), min(largest, fits))


class TileQueue:
    """Tiles of queued images, cut into fixed-size batches in arrival order.

    A batch holds tiles of one shape (with ``fit``, an image's tiles have a shape of its
    own): the oldest shape that fills a batch goes first, else the oldest image's shape
    (:meth:`take`). A burst of images of one size shares full batches as before.

    Not thread-safe by itself: :class:`SharedBatches` guards it with a lock, and calls
    :meth:`take` and :meth:`put` around the network call so that other threads can queue
    images while the network runs.
    """

    def __init__(
        self,
        settings: TileSettings,
        *,
        batch_size: int,
        stopwatch: Stopwatch | None = None,
    ) -> None:
        _check_batch_size(batch_size)
        self.settings, self.batch_size = settings, batch_size
        self._jobs: deque[TileJob] = deque()  # jobs with tiles left to take
        self.pending = 0  # tiles queued and not yet taken
        self._by_shape: Counter[tuple[int, int]] = Counter()  # pending tiles per tile shape
        self._watch = stopwatch

    @property
    def full(self) -> bool:
        """Whether the tiles of some shape fill a batch."""
        return any(n >= self.batch_size for n in self._by_shape.values())

    @property
    def shapes(self) -> int:
        """How many tile shapes have tiles waiting."""
        return len(self._by_shape)

    def _count(self, shape: tuple[int, int], n: int) -> None:
        self.pending += n
        self._by_shape[shape] += n
        if not self._by_shape[shape]:
            del self._by_shape[shape]

    def _time(self, stage: str) -> AbstractContextManager[None]:
        return self._watch(stage) if self._watch is not None else nullcontext()

    def add(
        self,
        image: np.ndarray | TileSource,
        prepare: Prepare | None = None,
        *,
        stitcher: MakeStitcher | None = None,
        settings: TileSettings | None = None,
    ) -> TileJob:
        """Queue a 2-D float image, or any 2-D image with the ``prepare`` step that turns
        its tiles (cut as float32) into network input in place, or a :class:`TileSource`;
        raises ``ValueError`` for a bad one. ``stitcher`` makes the job's stitcher
        (default :class:`Stitcher`) from the grid and the output's channel count;
        ``settings`` tiles this image other than the queue's own settings do."""
        _check_image(image, prepare)
        t = settings or self.settings
        grid = TileGrid.for_shape(image.shape, t.tile, t.overlap, t.align, fit=t.fit)
        job = TileJob(grid, image, prepare)
        if stitcher is not None:
            job.make_stitcher = stitcher
        self._jobs.append(job)
        self._count(grid.tile_shape, len(grid))
        return job

    def _next_shape(self) -> tuple[int, int]:
        """The oldest tile shape that fills a batch, else the oldest job's."""
        for job in self._jobs:
            if self._by_shape[job.grid.tile_shape] >= self.batch_size:
                return job.grid.tile_shape
        return self._jobs[0].grid.tile_shape

    def take(self) -> _Batch:
        """Cut the next batch: up to ``batch_size`` tiles of one shape (:meth:`_next_shape`)
        from the front jobs of that shape, zero-padded."""
        with self._time("tile"):
            side = self.settings.tile
            shape = self._next_shape() if self._jobs else (side, side)
            batch = _Batch(np.zeros((self.batch_size, *shape, 1), np.float32))
            slot = 0
            for job in [j for j in self._jobs if j.grid.tile_shape == shape]:
                if slot == self.batch_size:
                    break
                n = min(self.batch_size - slot, len(job.grid) - job.taken)
                tiles = batch.tiles[slot : slot + n, ..., 0]
                job.grid.cut(job.image, np.arange(job.taken, job.taken + n), out=tiles)
                if job.prepare is not None:
                    job.prepare(tiles)
                batch.runs.append((job, job.taken, n, slot))
                job.taken += n
                slot += n
                self._count(shape, -n)
                if job.taken == len(job.grid):
                    self._jobs.remove(job)
        return batch

    def put(self, batch: _Batch, outputs: np.ndarray) -> list[TileJob]:
        """Stitch a batch's outputs; returns the jobs it completed."""
        finished = []
        with self._time("stitch"):
            for job, first, n, slot in batch.runs:
                if job.error is not None:
                    continue
                if job.stitcher is None:
                    job.stitcher = job.make_stitcher(job.grid, outputs.shape[3])
                job.stitcher.add_run(first, outputs[slot : slot + n])
                if job.stitcher.complete:
                    job.done = True
                    finished.append(job)
        return finished

    def fail(self, batch: _Batch, error: BaseException) -> list[TileJob]:
        """Mark the jobs of a batch that failed, and drop their remaining tiles."""
        failed = []
        for job, *_ in batch.runs:
            if job.error is None:
                job.error, job.done = error, True
                failed.append(job)
                if job in self._jobs:
                    self._jobs.remove(job)
                    self._count(job.grid.tile_shape, job.taken - len(job.grid))
        return failed

    def step(self, predict_batch: PredictBatch) -> list[TileJob]:
        """Take, predict and stitch one batch in the calling thread."""
        batch = self.take()
        return self.put(batch, _predict(batch.tiles, predict_batch))


def predict_tiled_many(
    images: Iterable[np.ndarray | TileSource],
    predict_batch: PredictBatch,
    settings: TileSettings,
    *,
    batch_size: int = 8,
    stopwatch: Stopwatch | None = None,
    prepare: Prepare | None = None,
    stitcher: MakeStitcher | None = None,
) -> Iterator[np.ndarray]:
    """Like :func:`predict_tiled` for several images whose tiles share batches.

    Images are read lazily; each ``(H, W, C)`` result is yielded, in input order, as soon
    as its last tile is predicted. A bad image raises when it is reached. With ``fit``,
    images whose tiles differ in shape do not share a batch: the tiles of an older shape
    run, in a partial batch if need be, when an image of another shape arrives, so no
    more images wait for the network than with one shape.
    """
    queue = TileQueue(settings, batch_size=batch_size, stopwatch=stopwatch)
    return _predict_many(images, predict_batch, queue, prepare, stitcher)


def _predict_many(
    images: Iterable[np.ndarray | TileSource],
    predict_batch: PredictBatch,
    queue: TileQueue,
    prepare: Prepare | None,
    stitcher: MakeStitcher | None = None,
) -> Iterator[np.ndarray]:
    jobs: deque[TileJob] = deque()  # in input order; the front one finishes first
    for image in images:
        jobs.append(queue.add(image, prepare, stitcher=stitcher))
        while queue.full or queue.shapes > 1:
            queue.step(predict_batch)
            while jobs and jobs[0].done:
                yield jobs.popleft().result()
    while queue.pending:
        queue.step(predict_batch)
    while jobs:
        yield jobs.popleft().result()


def predict_tiled(
    image: np.ndarray | TileSource,
    predict_batch: PredictBatch,
    settings: TileSettings,
    *,
    batch_size: int = 8,
    stopwatch: Stopwatch | None = None,
    prepare: Prepare | None = None,
    stitcher: MakeStitcher | None = None,
) -> np.ndarray:
    """Predict one 2-D image tile by tile and return the stitched ``(H, W, C)`` float32 map.

    Parameters
    ----------
    image : np.ndarray or TileSource
        2-D normalized float image of any size; smaller than a tile is fine. With
        ``prepare``, any 2-D image (raw pixels). A :class:`TileSource` gives each tile's
        network input itself, so the image it stands for need not exist whole.
    predict_batch : callable
        Takes ``(batch_size, th, tw, 1)`` float32 on every call, the last batch padded
        with zeros, and returns ``(batch_size, th, tw, C)``; ``(th, tw)`` is ``(tile,
        tile)``, or with ``fit`` the grid's :attr:`TileGrid.tile_shape`.
    settings : TileSettings
        Tile side (the largest, with ``fit``) and overlap in pixels,
        ``0 <= overlap <= tile - align``; tile origins are multiples of ``align`` (see
        :class:`TileGrid`): the network's pooling grid, so that tiled prediction equals the
        network's prediction on the whole padded image (:meth:`TileGrid.canvas`) where
        ``overlap // 2`` covers its receptive field radius (:func:`tile_settings` finds
        that overlap). With ``fit``, tiles shrink to fit the image: one tile of the image's
        own canvas when it is no larger than a tile, for a network that takes any input
        whose sides are multiples of ``align``.
    batch_size : int
        Tiles per model call.
    stopwatch : Stopwatch, optional
        Counts cutting tiles as ``tile`` and stitching as ``stitch``.
    prepare : callable, optional
        Applied, in place, to each run of tiles (float32, ``(n, tile, tile)``) as they are
        cut, e.g. :meth:`cellwatch.preprocess.Normalization.apply_in_place`, so that a
        large image is normalized tile by tile instead of copied whole. It must act on
        each pixel alone.
    stitcher : callable, optional
        ``stitcher(grid, channels)`` makes what assembles the outputs; default
        :class:`Stitcher`. :func:`cellwatch.preprocess.own_grid_stitcher` puts a zoomed
        image's outputs straight back on the image's own grid.

    Returns
    -------
    np.ndarray
        ``(H, W, C)`` float32, the shape of ``image`` (or what ``stitcher`` makes).

    Raises
    ------
    ValueError
        On a non-2-D, empty or non-float image, or bad tile, overlap or batch size.
    ModelError
        When ``predict_batch`` returns the wrong shape.

    Examples
    --------
    >>> image = np.random.default_rng(0).random((300, 500), dtype=np.float32)
    >>> out = predict_tiled(image, lambda b: b, TileSettings(64, 16), batch_size=4)
    >>> bool(np.array_equal(out[..., 0], image))
    True
    """
    _check_image(image, prepare)
    return next(
        predict_tiled_many(
            [image],
            predict_batch,
            settings,
            batch_size=batch_size,
            stopwatch=stopwatch,
            prepare=prepare,
            stitcher=stitcher,
        )
    )
