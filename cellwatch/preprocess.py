"""Intensity normalisation and rescaling, shared by prediction and training.

Training and prediction must see images the same way, so both call these functions.
"""

from __future__ import annotations

import numpy as np
from skimage.transform import resize

from cellwatch.errors import BadInputError


def normalize(image: np.ndarray, low: float = 1.0, high: float = 99.8) -> np.ndarray:
    """Map the ``low``/``high`` percentiles of ``image`` to 0/1 (float32, not clipped).

    A flat image (both percentiles equal) maps to zeros rather than dividing by zero.

    >>> normalize(np.array([[0, 50, 100]]), 0, 100).tolist()
    [[0.0, 0.5, 1.0]]
    """
    if image.ndim != 2:
        raise BadInputError(f"expected a 2-D image, got shape {image.shape}")
    pixels = image.astype(np.float32, copy=False)
    if not np.isfinite(pixels).all():
        pixels = np.nan_to_num(pixels, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = np.percentile(pixels, [low, high])
    span = float(hi - lo)
    if span <= 0:
        return np.zeros(image.shape, np.float32)
    return (pixels - np.float32(lo)) / np.float32(span)


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
