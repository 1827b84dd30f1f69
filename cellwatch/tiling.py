"""Cut an image into overlapping tiles, predict them in fixed-size batches, stitch the outputs.

Every batch handed to the model has exactly ``batch_size`` tiles, so a compiled graph is
reused: the last batch is padded with zero tiles whose outputs are dropped. Tiles of several
images may share one batch (:func:`predict_tiled_many`), and an image is read one tile at a
time, so memory is the (H, W, C) output plus one batch.

Stitching keeps, for every output pixel, the tile in which that pixel lies farthest from the
tile edge: each tile contributes its central region, overlaps are split at their midpoint,
and border tiles contribute up to the image border. We prefer this to a blending window
because it is exact: the tiles partition the image (identity in, identity out), there is no
weight array to normalise, and tiled equals untiled prediction whenever ``overlap // 2`` is
at least the network's edge-effect margin.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import islice, pairwise
from typing import TypeVar

import numpy as np

from cellwatch.errors import ModelError

T = TypeVar("T")
PredictBatch = Callable[[np.ndarray], np.ndarray]


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Yield lists of ``size`` consecutive items; the last list may be shorter."""
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


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

    def extract(self, image: np.ndarray, indices: Sequence[int]) -> np.ndarray:
        """Return the tiles at ``indices`` as an ``(n, tile, tile)`` float32 array."""
        if image.shape != (self.height, self.width):
            grid = (self.height, self.width)
            raise ValueError(f"image shape {image.shape} does not match the grid's {grid}")
        out = np.empty((len(indices), self.tile, self.tile), dtype=np.float32)
        for slot, index in enumerate(indices):
            (y0, _, _), (x0, _, _) = self.spans(index)
            crop = image[y0 : y0 + self.tile, x0 : x0 + self.tile]
            for axis, size in enumerate(crop.shape):
                if size < self.tile:  # only when the whole axis is shorter than a tile
                    widths = [(0, 0), (0, 0)]
                    widths[axis] = (0, self.tile - size)
                    crop = np.pad(crop, widths, mode="reflect" if size > 1 else "edge")
            out[slot] = crop
        return out


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


def _check_image(image: np.ndarray) -> None:
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {image.shape}")
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"expected a float image, got {image.dtype} — forgot to normalise?")


def _predict(batch: np.ndarray, predict_batch: PredictBatch) -> np.ndarray:
    outputs = np.asarray(predict_batch(batch))
    if outputs.ndim != 4 or outputs.shape[:3] != batch.shape[:3]:
        raise ModelError(
            f"model returned shape {outputs.shape} for input {batch.shape}; "
            "expected (batch, tile, tile, channels)"
        )
    return outputs


def predict_tiled_many(
    images: Iterable[np.ndarray],
    predict_batch: PredictBatch,
    *,
    tile: int = 256,
    overlap: int = 48,
    batch_size: int = 8,
) -> Iterator[np.ndarray]:
    """Like :func:`predict_tiled` for several images whose tiles share batches.

    Images are read lazily; each ``(H, W, C)`` result is yielded, in input order, as soon
    as its last tile is predicted. A bad image raises when it is reached.
    """
    TileGrid(1, 1, tile, overlap)  # fail now, not on the first next()
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return _predict_many(images, predict_batch, tile, overlap, batch_size)


@dataclass
class _Job:
    image: np.ndarray
    grid: TileGrid
    stitcher: Stitcher | None = None  # created once the model's channel count is known


def _predict_many(
    images: Iterable[np.ndarray], predict_batch: PredictBatch, tile: int, overlap: int, size: int
) -> Iterator[np.ndarray]:
    jobs: deque[_Job] = deque()  # in input order; the front one finishes first

    def work() -> Iterator[tuple[_Job, int]]:
        for image in images:
            _check_image(image)
            job = _Job(image, TileGrid.for_shape(image.shape, tile, overlap))
            jobs.append(job)
            yield from ((job, index) for index in range(len(job.grid)))

    for chunk in batched(work(), size):
        batch = np.zeros((size, tile, tile, 1), dtype=np.float32)
        for slot, (job, index) in enumerate(chunk):
            batch[slot, ..., 0] = job.grid.extract(job.image, [index])[0]
        outputs = _predict(batch, predict_batch)
        for slot, (job, index) in enumerate(chunk):
            if job.stitcher is None:
                job.stitcher = Stitcher(job.grid, outputs.shape[3])
            job.stitcher.add(index, outputs[slot])
        while jobs and (done := jobs[0].stitcher) is not None and done.complete:
            jobs.popleft()
            yield done.result()


def predict_tiled(
    image: np.ndarray,
    predict_batch: PredictBatch,
    *,
    tile: int = 256,
    overlap: int = 48,
    batch_size: int = 8,
) -> np.ndarray:
    """Predict one 2-D image tile by tile and return the stitched ``(H, W, C)`` float32 map.

    Parameters
    ----------
    image : np.ndarray
        2-D normalised float image of any size; smaller than a tile is fine.
    predict_batch : callable
        Takes ``(batch_size, tile, tile, 1)`` float32 on every call, the last batch padded
        with zeros, and returns ``(batch_size, tile, tile, C)``.
    tile, overlap : int
        Tile side and overlap in pixels; ``0 <= overlap < tile / 2``. Tiled equals untiled
        prediction when ``overlap // 2`` covers the model's edge-effect margin.
    batch_size : int
        Tiles per model call.

    Returns
    -------
    np.ndarray
        ``(H, W, C)`` float32, the shape of ``image``.

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
    _check_image(image)
    return next(
        predict_tiled_many(
            [image], predict_batch, tile=tile, overlap=overlap, batch_size=batch_size
        )
    )
