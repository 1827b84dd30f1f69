"""Cut an image into overlapping tiles, predict them in fixed-size batches, stitch the outputs.

Every batch handed to the model has exactly ``batch_size`` tiles, so a compiled graph is
reused: the last batch is padded with zero tiles whose outputs are dropped. Tiles of several
images share batches: :func:`predict_tiled_many` for a sequence of images in one thread,
:class:`cellwatch.batching.SharedBatches` for images that several threads segment at once (the network then
runs while other images are read, labelled and written). Tiles are cut from the image as
their batch is filled, so memory is the stitched output plus one batch.

Stitching keeps, for every output pixel, the tile in which that pixel lies farthest from the
tile edge: each tile contributes its central region, overlaps are split at their midpoint,
and border tiles contribute up to the image border. We prefer this to a blending window
because it is exact: the tiles partition the image (identity in, identity out), there is no
weight array to normalize, and tiled equals untiled prediction whenever ``overlap // 2`` is
at least the network's edge-effect margin.
"""

from __future__ import annotations

__all__ = [
    "Stitcher",
    "StitcherLike",
    "TileGrid",
    "TileJob",
    "TileQueue",
    "TileSource",
    "predict_tiled",
    "predict_tiled_many",
]

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from itertools import pairwise
from typing import TYPE_CHECKING, Protocol

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from cellwatch.errors import ModelError

if TYPE_CHECKING:
    from cellwatch.timing import Stopwatch

PredictBatch = Callable[[np.ndarray], np.ndarray]
Prepare = Callable[[np.ndarray], object]  # turns cut tiles (float32) into network input, in place


class TileSource(Protocol):
    """An image the tiler cuts tiles from without holding it whole (a zoomed image:
    :class:`cellwatch.preprocess.ZoomedSource`). ``window`` returns network input, float32
    ``(height, width)``, for a region inside ``shape``."""

    shape: tuple[int, int]

    def window(self, y0: int, x0: int, height: int, width: int) -> np.ndarray: ...


class StitcherLike(Protocol):
    """What the tiler needs of a stitcher (:class:`Stitcher`, or one that resamples)."""

    def add_run(self, first: int, outputs: np.ndarray) -> None: ...

    @property
    def complete(self) -> bool: ...

    def result(self) -> np.ndarray: ...


MakeStitcher = Callable[["TileGrid", int], StitcherLike]  # (grid, channels) → stitcher


def _axis_spans(length: int, tile: int, overlap: int) -> tuple[tuple[int, int, int], ...]:
    """Return ``(start, keep_from, keep_to)`` per tile along one axis, in image coordinates."""
    padded = max(length, tile)  # shorter axes are padded at the end up to one tile
    starts = [*range(0, padded - tile, tile - overlap), padded - tile]
    cuts = [0, *((a + b + tile) // 2 for a, b in pairwise(starts)), length]
    return tuple(zip(starts, cuts[:-1], cuts[1:], strict=True))


@dataclass(frozen=True)
class TileGrid:
    """Square tiles covering a ``height`` × ``width`` image, row-major, with ``overlap`` px.

    Tile origins step by ``tile - overlap``; the last tile on each axis is flush with the
    edge. An axis shorter than ``tile`` is padded at its end (reflect, or edge for a single
    pixel), so the origin along it is 0.
    """

    height: int
    width: int
    tile: int
    overlap: int

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"image is empty: shape ({self.height}, {self.width})")
        if self.tile < 1:
            raise ValueError(f"tile must be at least 1 px, got {self.tile}")
        if self.overlap < 0 or 2 * self.overlap >= self.tile:
            raise ValueError(
                f"overlap must be in [0, tile/2), got overlap={self.overlap} for tile={self.tile}"
            )

    @classmethod
    def for_shape(cls, shape: tuple[int, int], tile: int, overlap: int) -> TileGrid:
        """Build the grid for an image of the given ``(height, width)``."""
        if len(shape) != 2:
            raise ValueError(f"expected a 2-D image shape, got {tuple(shape)}")
        return cls(int(shape[0]), int(shape[1]), int(tile), int(overlap))

    @cached_property
    def rows(self) -> tuple[tuple[int, int, int], ...]:
        """``(y0, keep_from, keep_to)`` for each row of tiles."""
        return _axis_spans(self.height, self.tile, self.overlap)

    @cached_property
    def cols(self) -> tuple[tuple[int, int, int], ...]:
        """``(x0, keep_from, keep_to)`` for each column of tiles."""
        return _axis_spans(self.width, self.tile, self.overlap)

    @cached_property
    def origins(self) -> tuple[np.ndarray, np.ndarray]:
        """``(y0, x0)`` of every tile as two index arrays, row-major."""
        ys = np.array([r[0] for r in self.rows], dtype=np.intp)
        xs = np.array([c[0] for c in self.cols], dtype=np.intp)
        return np.repeat(ys, len(xs)), np.tile(xs, len(ys))

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)

    def boxes(self) -> list[tuple[int, int]]:
        """Return the ``(y0, x0)`` origin of every tile, row-major."""
        return [(r[0], c[0]) for r in self.rows for c in self.cols]

    def spans(self, index: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """Return the ``(origin, keep_from, keep_to)`` row and column spans of a tile."""
        if not 0 <= index < len(self):
            raise IndexError(f"tile index {index} out of range for a grid of {len(self)} tiles")
        row, col = divmod(index, len(self.cols))
        return self.rows[row], self.cols[col]

    def windows(self, image: np.ndarray) -> np.ndarray:
        """A ``(H', W', tile, tile)`` view of every tile position of ``image`` (padded first
        along axes shorter than a tile, which copies only such small images)."""
        if image.shape != (self.height, self.width):
            grid = (self.height, self.width)
            raise ValueError(f"image shape {image.shape} does not match the grid's {grid}")
        for axis, size in enumerate(image.shape):
            if size < self.tile:  # the whole axis is shorter than a tile
                widths = [(0, 0), (0, 0)]
                widths[axis] = (0, self.tile - size)
                image = np.pad(image, widths, mode="reflect" if size > 1 else "edge")
        return sliding_window_view(image, (self.tile, self.tile))

    def extract(
        self, image: np.ndarray, indices: Sequence[int], *, windows: np.ndarray | None = None
    ) -> np.ndarray:
        """Return the tiles at ``indices`` as an ``(n, tile, tile)`` float32 array.

        ``windows`` is :meth:`windows` of ``image``, when the caller keeps it.
        """
        index = np.asarray(indices, dtype=np.intp).reshape(-1)
        bad = index[(index < 0) | (index >= len(self))]
        if bad.size:
            raise IndexError(f"tile index {bad[0]} out of range for a grid of {len(self)} tiles")
        view = self.windows(image) if windows is None else windows
        ys, xs = self.origins
        return view[ys[index], xs[index]].astype(np.float32, copy=False)


class Stitcher:
    """Write each tile's central region into one ``(H, W, C)`` float32 array."""

    def __init__(self, grid: TileGrid, channels: int) -> None:
        if channels < 1:
            raise ValueError(f"channels must be at least 1, got {channels}")
        self.grid = grid
        self._out = np.zeros((grid.height, grid.width, channels), dtype=np.float32)
        self._added = np.zeros(len(grid), dtype=bool)

    def add(self, index: int, output: np.ndarray) -> None:
        """Store the model output ``(tile, tile, C)`` of tile ``index``."""
        (y0, y1, y2), (x0, x1, x2) = self.grid.spans(index)
        expected = (self.grid.tile, self.grid.tile, self._out.shape[2])
        if output.shape != expected:
            raise ValueError(f"tile output has shape {output.shape}, expected {expected}")
        self._out[y1:y2, x1:x2] = output[y1 - y0 : y2 - y0, x1 - x0 : x2 - x0]
        self._added[index] = True

    def add_run(self, first: int, outputs: np.ndarray) -> None:
        """Store the outputs ``(n, tile, tile, C)`` of tiles ``first … first + n - 1``.

        One slice copy per tile: each is a few hundred kB, so the loop costs microseconds
        against the milliseconds the network spends on the same tile (measured by
        ``cellwatch bench`` as the ``stitch`` stage).
        """
        for offset, output in enumerate(outputs):
            self.add(first + offset, output)

    @property
    def complete(self) -> bool:
        """Whether every tile of the grid has been added."""
        return bool(self._added.all())

    def result(self) -> np.ndarray:
        """Return the stitched ``(H, W, C)`` array; every tile must have been added."""
        if not self.complete:
            missing = int((~self._added).sum())
            raise RuntimeError(f"cannot stitch: {missing} of {len(self.grid)} tiles missing")
        return self._out


def _check_image(image: np.ndarray | TileSource, prepare: Prepare | None = None) -> None:
    if not isinstance(image, np.ndarray):
        if len(image.shape) != 2:
            raise ValueError(f"expected a 2-D tile source, got shape {image.shape}")
        return  # a source gives network input itself
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {image.shape}")
    if prepare is None and not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"expected a float image, got {image.dtype} — forgot to normalize?")


def _check_settings(tile: int, overlap: int, batch_size: int) -> None:
    TileGrid(1, 1, tile, overlap)  # raises on a bad tile or overlap
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")


def _cut(job: TileJob, ys: np.ndarray, xs: np.ndarray, tiles: np.ndarray) -> None:
    """Fill ``tiles`` from the job's source, one window per tile, padded as
    :meth:`TileGrid.windows` pads an image shorter than a tile."""
    if job.source is None:
        raise RuntimeError("a tile job without windows needs a source")
    grid, size = job.grid, job.grid.tile
    for tile, y0, x0 in zip(tiles, ys, xs, strict=True):
        height, width = min(size, grid.height - int(y0)), min(size, grid.width - int(x0))
        piece = job.source.window(int(y0), int(x0), height, width)
        for axis, short in enumerate((size - height, size - width)):
            if short:  # the whole axis is shorter than a tile
                widths = [(0, 0), (0, 0)]
                widths[axis] = (0, short)
                edge = piece.shape[axis] == 1
                piece = np.pad(piece, widths, mode="edge" if edge else "reflect")
        tile[...] = piece


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
    windows: np.ndarray | None  # every tile position of the image, a view (None: a source)
    prepare: Prepare | None = None  # applied to the image's tiles as they are cut
    taken: int = 0  # tiles handed to a batch so far
    stitcher: StitcherLike | None = None  # created once the model's channel count is known
    error: BaseException | None = None
    done: bool = False
    source: TileSource | None = None  # cuts the tiles when there are no windows
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
    tiles: np.ndarray  # (batch_size, tile, tile, 1) float32, zero-padded
    runs: list[tuple[TileJob, int, int, int]] = field(default_factory=list)  # job, first, n, slot


class TileQueue:
    """Tiles of queued images, cut into fixed-size batches in arrival order.

    Not thread-safe by itself: :class:`SharedBatches` guards it with a lock, and calls
    :meth:`take` and :meth:`put` around the network call so that other threads can queue
    images while the network runs.
    """

    def __init__(
        self,
        *,
        tile: int,
        overlap: int,
        batch_size: int,
        stopwatch: Stopwatch | None = None,
    ) -> None:
        _check_settings(tile, overlap, batch_size)
        self.tile, self.overlap, self.batch_size = tile, overlap, batch_size
        self._jobs: deque[TileJob] = deque()  # jobs with tiles left to take
        self.pending = 0  # tiles queued and not yet taken
        self._watch = stopwatch

    def _time(self, stage: str) -> AbstractContextManager[None]:
        return self._watch(stage) if self._watch is not None else nullcontext()

    def add(
        self,
        image: np.ndarray | TileSource,
        prepare: Prepare | None = None,
        *,
        stitcher: MakeStitcher | None = None,
    ) -> TileJob:
        """Queue a 2-D float image, or any 2-D image with the ``prepare`` step that turns
        its tiles (cut as float32) into network input in place, or a :class:`TileSource`;
        raises ``ValueError`` for a bad one. ``stitcher`` makes the job's stitcher
        (default :class:`Stitcher`) from the grid and the output's channel count."""
        _check_image(image, prepare)
        grid = TileGrid.for_shape(image.shape, self.tile, self.overlap)
        if isinstance(image, np.ndarray):
            job = TileJob(grid, grid.windows(image), prepare)
        else:
            job = TileJob(grid, None, prepare, source=image)
        if stitcher is not None:
            job.make_stitcher = stitcher
        self._jobs.append(job)
        self.pending += len(grid)
        return job

    def take(self) -> _Batch:
        """Cut the next batch: up to ``batch_size`` tiles from the front jobs, zero-padded."""
        with self._time("tile"):
            batch = _Batch(np.zeros((self.batch_size, self.tile, self.tile, 1), np.float32))
            slot = 0
            while slot < self.batch_size and self._jobs:
                job = self._jobs[0]
                n = min(self.batch_size - slot, len(job.grid) - job.taken)
                index = np.arange(job.taken, job.taken + n)
                ys, xs = job.grid.origins
                tiles = batch.tiles[slot : slot + n, ..., 0]
                if job.windows is not None:
                    tiles[...] = job.windows[ys[index], xs[index]]
                else:
                    _cut(job, ys[index], xs[index], tiles)
                if job.prepare is not None:
                    job.prepare(tiles)
                batch.runs.append((job, job.taken, n, slot))
                job.taken += n
                slot += n
                self.pending -= n
                if job.taken == len(job.grid):
                    self._jobs.popleft()
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
                    self.pending -= len(job.grid) - job.taken
        return failed

    def step(self, predict_batch: PredictBatch) -> list[TileJob]:
        """Take, predict and stitch one batch in the calling thread."""
        batch = self.take()
        return self.put(batch, _predict(batch.tiles, predict_batch))


def predict_tiled_many(
    images: Iterable[np.ndarray | TileSource],
    predict_batch: PredictBatch,
    *,
    tile: int = 256,
    overlap: int = 48,
    batch_size: int = 8,
    stopwatch: Stopwatch | None = None,
    prepare: Prepare | None = None,
    stitcher: MakeStitcher | None = None,
) -> Iterator[np.ndarray]:
    """Like :func:`predict_tiled` for several images whose tiles share batches.

    Images are read lazily; each ``(H, W, C)`` result is yielded, in input order, as soon
    as its last tile is predicted. A bad image raises when it is reached.
    """
    queue = TileQueue(tile=tile, overlap=overlap, batch_size=batch_size, stopwatch=stopwatch)
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
        while queue.pending >= queue.batch_size:
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
    *,
    tile: int = 256,
    overlap: int = 48,
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
        Takes ``(batch_size, tile, tile, 1)`` float32 on every call, the last batch padded
        with zeros, and returns ``(batch_size, tile, tile, C)``.
    tile, overlap : int
        Tile side and overlap in pixels; ``0 <= overlap < tile / 2``. Tiled equals untiled
        prediction when ``overlap // 2`` covers the model's edge-effect margin.
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
    >>> out = predict_tiled(image, lambda b: b, tile=64, overlap=16, batch_size=4)
    >>> bool(np.array_equal(out[..., 0], image))
    True
    """
    _check_image(image, prepare)
    return next(
        predict_tiled_many(
            [image],
            predict_batch,
            tile=tile,
            overlap=overlap,
            batch_size=batch_size,
            stopwatch=stopwatch,
            prepare=prepare,
            stitcher=stitcher,
        )
    )
