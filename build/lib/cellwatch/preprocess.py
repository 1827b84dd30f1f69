"""Intensity normalisation and rescaling, shared by prediction and training.

Training and prediction must see images the same way, so both call these functions.
A :class:`Normalization` is the map :func:`normalize` applies; prediction applies it tile by
tile as tiles are cut, so a large image is never copied whole to float32. Percentiles of
8- and 16-bit images come from a histogram: the same values as :func:`numpy.percentile`
without sorting a float copy of the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.transform import resize

from cellwatch.errors import BadInputError
from cellwatch.storage.pixels import HISTOGRAM_DTYPES, percentiles


@dataclass(frozen=True)
class Normalization:
    """The map ``(x - low) / span`` (float32) that puts an image's percentiles at 0 and 1.

    ``span`` is 0 for a flat image, which maps to zeros. Non-finite pixels count as 0.
    """

    low: np.float32
    span: np.float32

    @classmethod
    def of(cls, image: np.ndarray, low: float = 1.0, high: float = 99.8) -> Normalization:
        """The normalisation of a 2-D ``image`` by its ``low`` and ``high`` percentiles."""
        if image.ndim != 2:
            raise BadInputError(f"expected a 2-D image, got shape {image.shape}")
        pixels = image if image.dtype in HISTOGRAM_DTYPES else finite_float32(image)
        lo, hi = percentiles(pixels, [low, high])
        span = float(hi - lo)
        return cls(np.float32(lo), np.float32(span if span > 0 else 0.0))

    def apply(self, values: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
        """Normalised float32 values; ``out`` (float32, ``values``' shape, may be ``values``
        itself) receives them instead of a new array."""
        if out is None:
            out = np.array(values, dtype=np.float32)
        elif out is not values:
            out[...] = values
        if out.dtype != np.float32:
            raise ValueError(f"out must be float32, got {out.dtype}")
        if np.dtype(values.dtype).kind == "f":
            np.nan_to_num(out, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        if self.span > 0:
            np.subtract(out, self.low, out=out)
            np.divide(out, self.span, out=out)
        else:
            out[...] = 0
        return out

    def apply_in_place(self, values: np.ndarray) -> np.ndarray:
        """Normalise float32 ``values`` in place (tiles as they are cut, for example)."""
        return self.apply(values, out=values)


def finite_float32(image: np.ndarray) -> np.ndarray:
    """``image`` as float32 with NaN and ±inf set to 0 (not a copy when it already is)."""
    pixels = image.astype(np.float32, copy=False)
    if not np.isfinite(pixels).all():
        pixels = np.nan_to_num(pixels, nan=0.0, posinf=0.0, neginf=0.0)
    return pixels


def normalize(image: np.ndarray, low: float = 1.0, high: float = 99.8) -> np.ndarray:
    """Map the ``low``/``high`` percentiles of ``image`` to 0/1 (float32, not clipped).

    A flat image (both percentiles equal) maps to zeros rather than dividing by zero.

    >>> normalize(np.array([[0, 50, 100]]), 0, 100).tolist()
    [[0.0, 0.5, 1.0]]
    """
    return Normalization.of(image, low, high).apply(image)


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
