"""Intensity normalization and rescaling, shared by prediction and training.

Training and prediction must see images the same way, so both call these functions.
A :class:`Normalization` is the map :func:`normalize` applies; prediction applies it tile by
tile as tiles are cut, so a large image is never copied whole to float32. Percentiles of
8- and 16-bit images come from a histogram: the same values as :func:`numpy.percentile`
without sorting a float copy of the image.

A zoomed image is never made whole either. :class:`ZoomedSource` gives any window of
``rescale(normalize(image), scale)`` from the part of the image it needs, and
:class:`OwnGridStitcher` puts the network's output for each zoomed tile straight back on
the image's own grid, as ``resize_to(stitched, image.shape, order=1)`` would. Both apply
the same linear maps as scikit-image's ``resize`` (:func:`axis_operator`), one axis at a
time, restricted to the rows and columns a window needs.
"""

from __future__ import annotations

__all__ = [
    "Normalization",
    "OwnGridStitcher",
    "ZoomedSource",
    "axis_operator",
    "finite_float32",
    "normalize",
    "own_grid_stitcher",
    "rescale",
    "resize_to",
    "scaled_shape",
]

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import sparse
from skimage.transform import resize

from cellwatch.errors import BadInputError
from cellwatch.storage.pixels import HISTOGRAM_DTYPES, percentiles
from cellwatch.tiling import Stitcher, TileGrid


@dataclass(frozen=True)
class Normalization:
    """The map ``(x - low) / span`` (float32) that puts an image's percentiles at 0 and 1.

    ``span`` is 0 for a flat image, which maps to zeros, and negative for an inverted map
    (dark cells on a light background made bright on dark). Non-finite pixels count as 0.
    """

    low: np.float32
    span: np.float32

    @classmethod
    def of(
        cls, image: np.ndarray, low: float = 1.0, high: float = 99.8, *, invert: bool = False
    ) -> Normalization:
        """The normalization of a 2-D ``image`` by its ``low`` and ``high`` percentiles.

        ``invert``: the map of the negated image, ``normalize(-image)``, without negating
        it: the ``100 - high`` percentile goes to 1 and the ``100 - low`` to 0.

        >>> inverted = Normalization.of(np.array([[0, 50, 100]]), 0, 100, invert=True)
        >>> inverted.apply(np.array([0, 50, 100])).tolist() == [1.0, 0.5, 0.0]
        True
        """
        if image.ndim != 2:
            raise BadInputError(f"expected a 2-D image, got shape {image.shape}")
        pixels = image if image.dtype in HISTOGRAM_DTYPES else finite_float32(image)
        lo, hi = percentiles(pixels, [100 - high, 100 - low] if invert else [low, high])
        span = float(hi - lo) if hi > lo else 0.0
        return (
            cls(np.float32(hi), np.float32(-span))
            if invert
            else cls(np.float32(lo), np.float32(span))
        )

    def apply(self, values: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
        """Normalized float32 values; ``out`` (float32, ``values``' shape, may be ``values``
        itself) receives them instead of a new array."""
        if out is None:
            out = np.array(values, dtype=np.float32)
        elif out is not values:
            out[...] = values
        if out.dtype != np.float32:
            raise ValueError(f"out must be float32, got {out.dtype}")
        if np.dtype(values.dtype).kind == "f":
            np.nan_to_num(out, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        if self.span != 0:
            np.subtract(out, self.low, out=out)
            np.divide(out, self.span, out=out)
        else:
            out[...] = 0
        return out

    def apply_in_place(self, values: np.ndarray) -> np.ndarray:
        """Normalize float32 ``values`` in place (tiles as they are cut, for example)."""
        return self.apply(values, out=values)


def finite_float32(image: np.ndarray) -> np.ndarray:
    """``image`` as float32 with NaN and ±inf set to 0 (not a copy when it already is)."""
    pixels = image.astype(np.float32, copy=False)
    if not np.isfinite(pixels).all():
        pixels = np.nan_to_num(pixels, nan=0.0, posinf=0.0, neginf=0.0)
    return pixels


def normalize(
    image: np.ndarray, low: float = 1.0, high: float = 99.8, *, invert: bool = False
) -> np.ndarray:
    """Map the ``low``/``high`` percentiles of ``image`` to 0/1 (float32, not clipped);
    with ``invert``, those of ``-image`` (dark cells become bright).

    A flat image (both percentiles equal) maps to zeros rather than dividing by zero.

    >>> normalize(np.array([[0, 50, 100]]), 0, 100).tolist()
    [[0.0, 0.5, 1.0]]
    """
    return Normalization.of(image, low, high, invert=invert).apply(image)


def scaled_shape(shape: tuple[int, int], scale: float) -> tuple[int, int]:
    """The shape of an image of ``shape`` zoomed by ``scale`` (at least 1×1)."""
    return (max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale)))


def rescale(image: np.ndarray, scale: float) -> np.ndarray:
    """Zoom a float image by ``scale`` with linear interpolation (anti-aliased when shrinking)."""
    if scale == 1.0:
        return image
    shape = scaled_shape(image.shape[:2], scale)
    out = resize(
        image,
        shape + image.shape[2:],
        order=1,
        mode="reflect",
        anti_aliasing=scale < 1,
        preserve_range=True,
    )
    return out.astype(np.float32, copy=False)


def resize_to(array: np.ndarray, shape: tuple[int, int], *, order: int) -> np.ndarray:
    """Resize to an exact ``shape`` (labels use ``order=0`` so ids stay ids)."""
    if array.shape[:2] == tuple(shape):
        return array
    out = resize(
        array,
        tuple(shape) + array.shape[2:],
        order=order,
        mode="edge",
        anti_aliasing=False,
        preserve_range=True,
    )
    return out.astype(array.dtype, copy=False)


def axis_operator(
    n_in: int,
    n_out: int,
    start: int,
    stop: int,
    *,
    mode: Literal["mirror", "nearest"],
    sigma: float = 0.0,
) -> tuple[int, np.ndarray]:
    """Rows ``start:stop`` of the linear map that resizes one axis from ``n_in`` to
    ``n_out`` samples as :func:`skimage.transform.resize` does with ``order=1``.

    Output sample ``o`` interpolates linearly at input position ``(o + 0.5) · n_in / n_out
    - 0.5`` (scipy's grid mode); positions outside the axis are mirrored about the end
    samples (``mode="mirror"``, resize's ``"reflect"``) or clamped (``"nearest"``,
    resize's ``"edge"``). With ``sigma`` the input is first smoothed by scipy's Gaussian
    filter (truncated at 4 σ, same mode), the anti-aliasing resize applies when shrinking.

    Returns
    -------
    first : int
        The first input sample the rows use.
    weights : np.ndarray
        float64, ``(stop - start, width)``: output ``start + i`` is ``weights[i] @
        samples[first : first + width]``.

    Examples
    --------
    >>> first, w = axis_operator(2, 4, 0, 4, mode="mirror")
    >>> first, (w @ np.array([0.0, 1.0])).tolist()
    (0, [0.25, 0.25, 0.75, 0.75])
    """
    if n_in < 1 or n_out < 1 or not 0 <= start <= stop <= n_out:
        raise ValueError(f"rows {start}:{stop} of a resize from {n_in} to {n_out} samples")
    position = (np.arange(start, stop) + 0.5) * (n_in / n_out) - 0.5
    low = np.floor(position)
    frac = position - low
    taps = np.stack([low, low + 1], axis=1).astype(np.intp)  # (rows, 2)
    weights = np.stack([1 - frac, frac], axis=1)
    fold = _mirror if mode == "mirror" else _clamp
    taps = fold(taps, n_in)
    if sigma > 0:
        radius = int(4.0 * sigma + 0.5)
        offsets = np.arange(-radius, radius + 1)
        kernel = np.exp(-0.5 * offsets**2 / sigma**2)
        kernel /= kernel.sum()
        taps = fold(taps[:, :, None] + offsets, n_in).reshape(len(taps), -1)
        weights = (weights[:, :, None] * kernel).reshape(len(weights), -1)
    first = int(taps.min()) if taps.size else 0
    width = int(taps.max()) - first + 1 if taps.size else 0
    dense = np.zeros((len(taps), width))
    rows = np.broadcast_to(np.arange(len(taps))[:, None], taps.shape)
    np.add.at(dense, (rows, taps - first), weights)
    return first, dense


def _mirror(index: np.ndarray, n: int) -> np.ndarray:
    """Fold indices into ``0 … n-1`` by mirroring about the end samples (scipy "mirror")."""
    if n == 1:
        return np.zeros_like(index)
    period = 2 * (n - 1)
    index = np.abs(index) % period
    return np.where(index >= n, period - index, index)


def _clamp(index: np.ndarray, n: int) -> np.ndarray:
    return np.clip(index, 0, n - 1)


def _sparse(weights: np.ndarray) -> sparse.csr_array:
    """A 1-D resize map as a float32 sparse matrix: a few taps per row, so applying it costs
    little, in one thread (a BLAS product of the dense map would spawn threads per tile)."""
    return sparse.csr_array(weights.astype(np.float32))


def _apply(rows: sparse.csr_array, values: np.ndarray, cols: sparse.csr_array) -> np.ndarray:
    """``rows @ values @ cols.T`` for 2-D ``values``: both axes resized (float32)."""
    along_y = rows @ values
    return np.asarray((cols @ along_y.T).T, dtype=np.float32)


def _shrink_sigma(n_in: int, n_out: int, shrinking: bool) -> float:
    """resize's anti-aliasing σ along an axis (it smooths every axis once any shrinks)."""
    return max(0.0, (n_in / n_out - 1) / 2) if shrinking else 0.0


class ZoomedSource:
    """Windows of an image normalized and zoomed by ``scale``, made on demand.

    ``window(y0, x0, h, w)`` equals ``rescale(normalization.apply(image), scale)[y0:y0+h,
    x0:x0+w]`` (within float32 rounding) but reads only the pixels that window needs, so
    a zoomed image is never held whole: the tiler asks for one tile at a time.

    Parameters
    ----------
    image : np.ndarray
        2-D raw pixels (any dtype), or a normalized float image when ``normalization``
        is None.
    scale : float
        The zoom; the zoomed shape is :func:`scaled_shape`.
    normalization : Normalization, optional
        Applied to the pixels a window needs before they are zoomed.
    """

    def __init__(
        self, image: np.ndarray, scale: float, normalization: Normalization | None = None
    ) -> None:
        if image.ndim != 2:
            raise ValueError(f"expected a 2-D image, got shape {image.shape}")
        self.image, self.scale, self.normalization = image, scale, normalization
        self.shape = scaled_shape(image.shape, scale)
        shrinking = any(o < i for o, i in zip(self.shape, image.shape, strict=True))
        self._sigma = tuple(
            _shrink_sigma(i, o, shrinking) for i, o in zip(image.shape, self.shape, strict=True)
        )
        # Tiles of one row share their rows' map, tiles of one column their columns' map.
        self._maps: dict[tuple[int, int, int], tuple[int, sparse.csr_array]] = {}

    def _map(self, axis: int, start: int, size: int) -> tuple[int, sparse.csr_array]:
        key = (axis, start, size)
        if key not in self._maps:
            if len(self._maps) > 4096:
                self._maps.clear()
            first, weights = axis_operator(
                self.image.shape[axis],
                self.shape[axis],
                start,
                start + size,
                mode="mirror",
                sigma=self._sigma[axis],
            )
            self._maps[key] = first, _sparse(weights)
        return self._maps[key]

    def window(self, y0: int, x0: int, height: int, width: int) -> np.ndarray:
        """Rows ``y0:y0+height`` and columns ``x0:x0+width`` of the zoomed image (float32)."""
        z_y, z_x = self.shape
        if not (0 <= y0 < y0 + height <= z_y and 0 <= x0 < x0 + width <= z_x):
            raise ValueError(
                f"window ({y0}, {x0}) of {height}×{width} is outside the zoomed image {self.shape}"
            )
        top, rows = self._map(0, y0, height)
        left, cols = self._map(1, x0, width)
        pixels = self.image[top : top + rows.shape[1], left : left + cols.shape[1]]
        if self.normalization is not None:
            values = self.normalization.apply(pixels)
        else:
            values = finite_float32(pixels)
        return _apply(rows, values, cols)


class OwnGridStitcher(Stitcher):
    """Stitch the network's outputs for the tiles of a zoomed image onto the image's own grid.

    Each original pixel takes its value from the tile whose kept region (``grid.spans``)
    holds its position on the zoomed grid, interpolated linearly there as
    ``resize_to(stitched, shape, order=1)`` would; only an ``(H, W, C)`` float32 array of the
    image's own size is kept. NaN marks a pixel outside every cell (a
    :func:`~cellwatch.postprocess.masked_interior` plane): a pixel whose interpolation
    weights fall mostly (≥ half) on NaN stays NaN, the others average their non-NaN
    neighbours. A :class:`cellwatch.tiling.Stitcher` that places each tile's kept region
    by resampling it.

    Parameters
    ----------
    grid : TileGrid
        The zoomed image's tile grid.
    channels : int
        Channels of the network's output.
    shape : tuple of int
        ``(H, W)`` of the image's own grid.
    """

    def __init__(self, grid: TileGrid, channels: int, shape: tuple[int, int]) -> None:
        super().__init__(grid, channels, shape)
        # position of each original row / column on the zoomed grid (resize_to's map)
        self._at = [
            (np.arange(n) + 0.5) * (z / n) - 0.5
            for n, z in zip(self.shape, (grid.height, grid.width), strict=True)
        ]
        self._maps: dict[tuple[int, ...], sparse.csr_array] = {}  # shared by a row or column

    def _range(self, axis: int, keep_from: int, keep_to: int) -> tuple[int, int]:
        """Original samples whose zoomed position lies in ``[keep_from, keep_to)`` (the first
        and last kept spans also take the positions beyond the zoomed image's ends)."""
        at, end = self._at[axis], (self.grid.height, self.grid.width)[axis]
        lo = 0 if keep_from == 0 else int(np.searchsorted(at, keep_from, side="left"))
        hi = len(at) if keep_to >= end else int(np.searchsorted(at, keep_to, side="left"))
        return lo, hi

    def place(
        self, rows: tuple[int, int, int], cols: tuple[int, int, int], output: np.ndarray
    ) -> None:
        """Resample the kept region of one tile's ``output`` onto the image's own grid."""
        (y0, y1, y2), (x0, x1, x2) = rows, cols
        ys, xs = self._range(0, y1, y2), self._range(1, x1, x2)
        if ys[0] == ys[1] or xs[0] == xs[1]:
            return  # a thin kept region between two original samples
        valid = output[: self.grid.height - y0, : self.grid.width - x0]  # drop the padding
        wy = self._operator(0, ys, y0, valid.shape[0])
        wx = self._operator(1, xs, x0, valid.shape[1])
        target = self._out[ys[0] : ys[1], xs[0] : xs[1]]
        for channel in range(valid.shape[2]):
            values = valid[..., channel]
            finite = np.isfinite(values)
            if finite.all():
                target[..., channel] = _apply(wy, values, wx)
                continue
            share = _apply(wy, finite.astype(np.float32), wx)
            total = _apply(wy, np.where(finite, values, np.float32(0)), wx)
            with np.errstate(invalid="ignore", divide="ignore"):
                target[..., channel] = np.where(share >= 0.5, total / share, np.float32(np.nan))

    def _operator(
        self, axis: int, span: tuple[int, int], origin: int, size: int
    ) -> sparse.csr_array:
        """Weights ``(samples, size)`` over the tile's valid part: resize_to's map back."""
        key = (axis, *span, origin, size)
        if key not in self._maps:
            if len(self._maps) > 4096:
                self._maps.clear()
            self._maps[key] = _sparse(self._make_operator(axis, span, origin, size))
        return self._maps[key]

    def _make_operator(
        self, axis: int, span: tuple[int, int], origin: int, size: int
    ) -> np.ndarray:
        n, z = self.shape[axis], (self.grid.height, self.grid.width)[axis]
        first, weights = axis_operator(z, n, span[0], span[1], mode="nearest")
        dense = np.zeros((len(weights), size), np.float32)
        lo = first - origin
        if lo < 0 or lo + weights.shape[1] > size:
            raise RuntimeError(
                f"tile at {origin} (size {size}) does not hold zoomed samples "
                f"{first}…{first + weights.shape[1] - 1}: the overlap is too small"
            )
        dense[:, lo : lo + weights.shape[1]] = weights
        return dense


def own_grid_stitcher(shape: tuple[int, int]) -> Callable[[TileGrid, int], OwnGridStitcher]:
    """A stitcher factory for the tiler: ``factory(grid, channels)`` → :class:`OwnGridStitcher`."""
    return lambda grid, channels: OwnGridStitcher(grid, channels, shape)
