"""Where the tiles of an image lie, and how their outputs are stitched back.

Stitching keeps, for every output pixel, the tile in which that pixel lies farthest from the
tile edge: each tile contributes its central region, overlaps are split at their midpoint,
and border tiles contribute up to the image border. We prefer this to a blending window
because it is exact: the tiles partition the image (identity in, identity out), and there is
no weight array to normalize.

Tiled prediction equals the network's prediction on the whole image, padded to the
network's pooling grid (:meth:`TileGrid.canvas`), when two things hold. Every tile origin
lies on that grid (``align``): a 2× max-pooling is not shift-invariant, so a tile that meets
the poolings at another phase than the whole image gives other outputs everywhere, however
much context it has. And every kept pixel lies at least the network's receptive-field
radius inside each tile edge that is not an edge of the padded image: a ``padding="same"``
convolution sees zeros past a tile edge where the whole image has pixels.
:func:`tile_settings` chooses the overlap that guarantees it. A zoomed image
(:class:`TileSource`) is tiled the same way on its zoomed grid.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_OVERLAP",
    "MakeStitcher",
    "Stitcher",
    "TileGrid",
    "TileSettings",
    "TileSource",
    "tile_settings",
]

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import pairwise
from typing import Protocol

import numpy as np


class TileSource(Protocol):
    """An image the tiler cuts tiles from without holding it whole (a zoomed image:
    :class:`cellwatch.preprocess.ZoomedSource`). ``window`` returns network input, float32
    ``(height, width)``, for a region inside ``shape``."""

    shape: tuple[int, int]

    def window(self, y0: int, x0: int, height: int, width: int) -> np.ndarray: ...


MakeStitcher = Callable[["TileGrid", int], "Stitcher"]  # (grid, channels) → stitcher


def _axis_spans(
    length: int, tile: int, overlap: int, align: int = 1, fit: bool = False
) -> tuple[tuple[int, int, int], ...]:
    """Return ``(start, keep_from, keep_to)`` per tile along one axis, in image coordinates.

    Origins step by ``side - overlap`` rounded down to a multiple of ``align``; the last
    tile ends flush with the canvas (:func:`_canvas_length`), so every origin is a multiple
    of ``align``. The tiles are ``tile`` long, or with ``fit`` :func:`_tile_side` long.
    Neighbours split their overlap at its midpoint.
    """
    canvas = _canvas_length(length, tile, align, fit)
    side = _tile_side(length, tile, overlap, align, fit)
    step = side - (tile - (tile - overlap) // align * align)  # > 0 unless one tile
    starts = [*range(0, canvas - side, max(step, 1)), canvas - side]
    cuts = [0, *((a + b + side) // 2 for a, b in pairwise(starts)), length]
    return tuple(zip(starts, cuts[:-1], cuts[1:], strict=True))


def _canvas_length(length: int, tile: int, align: int, fit: bool = False) -> int:
    """The axis padded to a multiple of ``align``, and without ``fit`` to one tile."""
    aligned = -(-length // align) * align
    return aligned if fit else max(aligned, tile)


def _tile_side(length: int, tile: int, overlap: int, align: int, fit: bool) -> int:
    """The tiles' side along an axis of ``length`` px: ``tile``, or with ``fit`` the least
    multiple of ``align`` that covers the canvas with as few tiles as ``tile`` would, at the
    same overlap (a canvas no longer than a tile is one tile of its own length)."""
    if not fit:
        return tile
    canvas = _canvas_length(length, tile, align, fit)
    if canvas <= tile:
        return canvas
    step = (tile - overlap) // align * align
    lap = tile - step  # the overlap, rounded up to the grid
    count = 1 + -(-(canvas - tile) // step)
    share = -(-(canvas + (count - 1) * lap) // count)
    return min(tile, -(-share // align) * align)


def _source_index(length: int, canvas: int) -> np.ndarray:
    """Image index of every canvas position: the axis reflected past its end (as
    ``np.pad(mode="reflect")``; a single pixel is repeated)."""
    position = np.arange(canvas, dtype=np.intp)
    if length == 1:
        return np.zeros(canvas, dtype=np.intp)
    period = 2 * (length - 1)
    folded = position % period
    return np.where(folded < length, folded, period - folded)


DEFAULT_OVERLAP = 48  # px; "auto" for a model whose receptive field is unknown


@dataclass(frozen=True)
class TileSettings:
    """Tile side, overlap and origin alignment for one model (:func:`tile_settings`), and
    whether tiles shrink to fit an image (``fit``, see :class:`TileGrid`)."""

    tile: int
    overlap: int
    align: int = 1
    fit: bool = False

    def __post_init__(self) -> None:
        TileGrid(1, 1, self.tile, self.overlap, self.align)  # raises on a bad combination

    @property
    def margin(self) -> int:
        """The least distance from a kept pixel to an edge of its tile (inside the canvas)."""
        return (self.tile - (self.tile - self.overlap) // self.align * self.align) // 2


def tile_settings(
    tile: int,
    overlap: int | str,
    *,
    context_px: int | None,
    grid_px: int = 1,
    fixed_size: bool = False,
) -> TileSettings:
    """How to tile for a network with the given receptive field and pooling grid.

    Tile origins lie on the pooling grid (``align = grid_px``) unless the step
    ``tile - overlap`` is shorter than the grid (a network that pools down to one pixel),
    where they cannot. ``overlap="auto"`` is the least overlap that gives every kept pixel
    ``context_px`` of context on each side (at least 1 px, what resampling a zoomed
    image's tiles needs), its step rounded down to the grid; :data:`DEFAULT_OVERLAP` when
    the receptive field is unknown. ``tile`` is then the
    largest tile: aligned tiles shrink to fit each image (``fit``), unless the network's
    input size is fixed (``fixed_size``).

    Raises
    ------
    ValueError
        When ``tile`` cannot give a kept pixel ``context_px`` on each side, or the overlap
        is not a number of pixels in ``[0, tile - align]``.

    Examples
    --------
    >>> tile_settings(512, "auto", context_px=92, grid_px=16)
    TileSettings(tile=512, overlap=192, align=16, fit=True)
    >>> tile_settings(256, 48, context_px=92, grid_px=16).margin
    24
    """
    if overlap == "auto":
        if context_px is None:
            overlap = min(DEFAULT_OVERLAP, tile // 4)
        else:
            # at least 1 px: a zoomed image's tile is resampled onto the image's own grid
            # (preprocess.OwnGridStitcher), which reads one sample past the kept region
            context_px = max(context_px, 1)
            step = (tile - 2 * context_px) // grid_px * grid_px
            if step < grid_px:
                least = 2 * context_px + grid_px
                raise ValueError(
                    f"tiles of {tile} px are too small for this model: it needs "
                    f"{context_px} px of context on each side of a kept pixel, so tiles of "
                    f"at least {-(-least // grid_px) * grid_px} px (or a fixed overlap)"
                )
            overlap = tile - step
    if not isinstance(overlap, int) or isinstance(overlap, bool):
        raise ValueError(f"overlap must be a number of pixels or 'auto', got {overlap!r}")
    align = grid_px if tile - overlap >= grid_px and tile % grid_px == 0 else 1
    TileGrid(1, 1, tile, overlap, align)  # raises on a bad tile or overlap
    return TileSettings(tile, overlap, align, fit=align == grid_px and not fixed_size)


@dataclass(frozen=True)
class TileGrid:
    """Tiles covering a ``height`` × ``width`` image, row-major, with ``overlap`` px.

    The tiles cover the *canvas*: the image padded at its bottom and right, reflected, to a
    multiple of ``align`` px and, unless ``fit``, to at least one tile along each axis (a
    single pixel is repeated). Tile origins step by the tile's side less ``overlap``,
    rounded down to a multiple of ``align`` (so the overlap may grow), and the last tile on
    each axis ends flush with the canvas: every origin is a multiple of ``align``.

    Without ``fit`` the tiles are ``tile`` × ``tile``. With ``fit`` ``tile`` is the largest
    side: along each axis the tiles take the fewest a side of ``tile`` needs and the least
    side (a multiple of ``align``) that covers the canvas with that many at the same
    overlap (:attr:`tile_shape`). An image no larger than a tile is then one tile, its
    canvas, which is the whole-image prediction; a larger one wastes less than full tiles
    would, whose last tile overlaps its neighbour by up to a whole step. With a network's pooling grid as
    ``align`` (16 for four 2× poolings), each tile meets the poolings at the phase the
    whole canvas does, so the stitched output equals the network's output on the canvas
    wherever a kept pixel lies at least the network's receptive-field radius inside every
    tile edge that is not a canvas edge: wherever ``(tile - step) // 2`` covers that radius.
    """

    height: int
    width: int
    tile: int
    overlap: int
    align: int = 1
    fit: bool = False

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"image is empty: shape ({self.height}, {self.width})")
        if self.tile < 1:
            raise ValueError(f"tile must be at least 1 px, got {self.tile}")
        if self.align < 1 or self.tile % self.align:
            raise ValueError(
                f"tile ({self.tile} px) must be a multiple of align, got align={self.align}"
            )
        if not 0 <= self.overlap <= self.tile - self.align:
            raise ValueError(
                f"overlap must be in [0, tile - align] = [0, {self.tile - self.align}], "
                f"got overlap={self.overlap} for tile={self.tile}, align={self.align}"
            )

    @classmethod
    def for_shape(
        cls,
        shape: tuple[int, int],
        tile: int,
        overlap: int,
        align: int = 1,
        *,
        fit: bool = False,
    ) -> TileGrid:
        """Build the grid for an image of the given ``(height, width)``."""
        if len(shape) != 2:
            raise ValueError(f"expected a 2-D image shape, got {tuple(shape)}")
        return cls(int(shape[0]), int(shape[1]), int(tile), int(overlap), int(align), bool(fit))

    @property
    def step(self) -> int:
        """Distance between neighbouring origins of full-size tiles (the last step may be
        shorter); fitted tiles step by their side less ``tile - step``."""
        return (self.tile - self.overlap) // self.align * self.align

    @property
    def canvas_shape(self) -> tuple[int, int]:
        """``(height, width)`` of the padded image the tiles cover."""
        return (
            _canvas_length(self.height, self.tile, self.align, self.fit),
            _canvas_length(self.width, self.tile, self.align, self.fit),
        )

    @cached_property
    def tile_shape(self) -> tuple[int, int]:
        """``(height, width)`` of every tile: ``(tile, tile)``, or smaller with ``fit``."""
        return (
            _tile_side(self.height, self.tile, self.overlap, self.align, self.fit),
            _tile_side(self.width, self.tile, self.overlap, self.align, self.fit),
        )

    @cached_property
    def rows(self) -> tuple[tuple[int, int, int], ...]:
        """``(y0, keep_from, keep_to)`` for each row of tiles."""
        return _axis_spans(self.height, self.tile, self.overlap, self.align, self.fit)

    @cached_property
    def cols(self) -> tuple[tuple[int, int, int], ...]:
        """``(x0, keep_from, keep_to)`` for each column of tiles."""
        return _axis_spans(self.width, self.tile, self.overlap, self.align, self.fit)

    @cached_property
    def origins(self) -> tuple[np.ndarray, np.ndarray]:
        """``(y0, x0)`` of every tile as two index arrays, row-major."""
        ys = np.array([r[0] for r in self.rows], dtype=np.intp)
        xs = np.array([c[0] for c in self.cols], dtype=np.intp)
        return np.repeat(ys, len(xs)), np.tile(xs, len(ys))

    @cached_property
    def _sources(self) -> tuple[np.ndarray, np.ndarray]:
        """Image row (column) of each pixel row (column) of each row (column) of tiles:
        ``(rows, tile)`` and ``(cols, tile)`` index arrays."""
        canvas_y, canvas_x = self.canvas_shape
        ys, xs = _source_index(self.height, canvas_y), _source_index(self.width, canvas_x)
        side_y, side_x = self.tile_shape
        return (
            ys[np.array([r[0] for r in self.rows])[:, None] + np.arange(side_y, dtype=np.intp)],
            xs[np.array([c[0] for c in self.cols])[:, None] + np.arange(side_x, dtype=np.intp)],
        )

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

    def canvas(self, image: np.ndarray) -> np.ndarray:
        """``image`` padded to :attr:`canvas_shape` as the tiles see it (a copy): what the
        network would be given for a whole-image prediction."""
        self._check(image)
        canvas_y, canvas_x = self.canvas_shape
        ys, xs = _source_index(self.height, canvas_y), _source_index(self.width, canvas_x)
        return image[ys[:, None], xs[None, :]]

    def cut(
        self,
        image: np.ndarray | TileSource,
        indices: np.ndarray,
        *,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """The tiles at ``indices`` (an index array) of the canvas of ``image`` as ``(n,
        *tile_shape)``, in the image's dtype (float32 from a :class:`TileSource`) or written
        into ``out``.

        No padded copy of the image is made: a tile inside the image is one slice (one
        ``window`` of a source), one that reaches into the padding reads the block of the
        image its reflected rows and columns come from and gathers them.
        """
        self._check(image)
        rows, cols = divmod(np.asarray(indices, dtype=np.intp).reshape(-1), len(self.cols))
        th, tw = self.tile_shape
        if out is None:
            dtype = image.dtype if isinstance(image, np.ndarray) else np.float32
            out = np.empty((len(rows), th, tw), dtype=dtype)
        source_y, source_x = self._sources
        for k, (row, col) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True)):
            y0, x0 = self.rows[row][0], self.cols[col][0]
            if y0 + th <= self.height and x0 + tw <= self.width:
                out[k] = _block(image, y0, x0, th, tw)
            else:
                ys, xs = source_y[row], source_x[col]
                y, x = int(ys.min()), int(xs.min())
                block = _block(image, y, x, int(ys.max()) + 1 - y, int(xs.max()) + 1 - x)
                out[k] = block[np.ix_(ys - y, xs - x)]
        return out

    def extract(self, image: np.ndarray | TileSource, indices: Sequence[int]) -> np.ndarray:
        """Return the tiles at ``indices`` as an ``(n, *tile_shape)`` float32 array."""
        index = np.asarray(indices, dtype=np.intp).reshape(-1)
        bad = index[(index < 0) | (index >= len(self))]
        if bad.size:
            raise IndexError(f"tile index {bad[0]} out of range for a grid of {len(self)} tiles")
        return self.cut(image, index).astype(np.float32, copy=False)

    def _check(self, image: np.ndarray | TileSource) -> None:
        if tuple(image.shape) != (self.height, self.width):
            grid = (self.height, self.width)
            raise ValueError(f"image shape {tuple(image.shape)} does not match the grid's {grid}")


def _block(image: np.ndarray | TileSource, y0: int, x0: int, height: int, width: int) -> np.ndarray:
    """Rows ``y0:y0+height``, columns ``x0:x0+width`` of an array or a source."""
    if isinstance(image, np.ndarray):
        return image[y0 : y0 + height, x0 : x0 + width]
    return image.window(y0, x0, height, width)


class Stitcher:
    """Write each tile's kept region into one ``(H, W, C)`` float32 array.

    The bookkeeping (which tiles have come, the output's shape) is here; where a tile's
    kept region goes is :meth:`place`. This class copies it to the same place in an array
    of the grid's size; :class:`cellwatch.preprocess.OwnGridStitcher` resamples it onto a
    zoomed image's own grid (``shape``).
    """

    def __init__(self, grid: TileGrid, channels: int, shape: tuple[int, int] | None = None) -> None:
        if channels < 1:
            raise ValueError(f"channels must be at least 1, got {channels}")
        self.grid = grid
        self.shape = (grid.height, grid.width) if shape is None else (int(shape[0]), int(shape[1]))
        self._out = np.zeros((*self.shape, channels), dtype=np.float32)
        self._added = np.zeros(len(grid), dtype=bool)

    def add(self, index: int, output: np.ndarray) -> None:
        """Store the model output ``(*tile_shape, C)`` of tile ``index``."""
        spans = self.grid.spans(index)
        expected = (*self.grid.tile_shape, self._out.shape[2])
        if output.shape != expected:
            raise ValueError(f"tile output has shape {output.shape}, expected {expected}")
        self.place(*spans, output)
        self._added[index] = True

    def place(
        self, rows: tuple[int, int, int], cols: tuple[int, int, int], output: np.ndarray
    ) -> None:
        """Write the kept region of one tile's ``output``; ``rows`` and ``cols`` are its
        ``(origin, keep_from, keep_to)`` spans (:meth:`TileGrid.spans`)."""
        (y0, y1, y2), (x0, x1, x2) = rows, cols
        self._out[y1:y2, x1:x2] = output[y1 - y0 : y2 - y0, x1 - x0 : x2 - x0]

    def add_run(self, first: int, outputs: np.ndarray) -> None:
        """Store the outputs ``(n, *tile_shape, C)`` of tiles ``first … first + n - 1``.

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
