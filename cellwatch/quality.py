"""Image-quality measures the pipeline records for every image: how much of it is
saturated, and how sharp it is. The report's flags (:mod:`cellwatch.reporting.qc`) compare
them across a day."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from cellwatch.preprocess import finite_float32

__all__ = ["focus_score", "saturated_fraction"]

_BAND_PIXELS = 1 << 16  # pixels per band of the focus score's Laplacian


def saturated_fraction(pixels: np.ndarray, *, max_value: float | None = None) -> float:
    """Fraction of pixels at (or above) the brightest value the camera can record.

    Parameters
    ----------
    pixels : numpy.ndarray
        The raw image as read from the file, before normalization.
    max_value : float, optional
        The saturation level, e.g. 4095 for a 12-bit camera. Defaults to the largest value
        of an integer dtype (255 for 8-bit, 65535 for 16-bit); for floating-point images,
        whose range is not fixed, to the image's own maximum (clipping shows as many
        pixels sharing it).

    Returns
    -------
    float
        A value in [0, 1]; 0 for an empty array.

    Examples
    --------
    >>> saturated_fraction(np.array([[0, 255], [255, 10]], dtype=np.uint8))
    0.5
    """
    pixels = np.asarray(pixels)
    if pixels.size == 0:
        return 0.0
    if max_value is None:
        if pixels.dtype == bool:
            raise ValueError("saturated_fraction needs pixel values, got a boolean mask")
        if np.issubdtype(pixels.dtype, np.integer):
            max_value = float(np.iinfo(pixels.dtype).max)
        elif np.issubdtype(pixels.dtype, np.floating):
            max_value = float(np.nanmax(pixels)) if np.isfinite(pixels).any() else np.inf
        else:
            raise ValueError(f"saturated_fraction needs numeric pixels, got dtype {pixels.dtype}")
    return float(np.count_nonzero(pixels >= max_value)) / pixels.size


def focus_score(image: np.ndarray) -> float:
    """Sharpness of a 2-D image: variance of its Laplacian after normalization.

    The image is first scaled so its 1st and 99th percentiles map to 0 and 1, so the score
    does not depend on exposure or bit depth. In-focus images score high; blurred ones
    score low. Compare scores within one experiment, not across microscopes.

    Parameters
    ----------
    image : numpy.ndarray
        One 2-D plane (raw or normalized). Non-finite pixels count as 0.

    Returns
    -------
    float
        Zero for a flat image.
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"focus_score needs one 2-D plane, got an array of shape {image.shape}")
    if image.size == 0:
        return 0.0
    # Percentiles of a ~512 x 512 grid of pixels are as good and much cheaper on big images.
    step_y, step_x = (max(1, n // 512) for n in image.shape)
    low, high = np.percentile(finite_float32(image[::step_y, ::step_x]), (1.0, 99.0))
    if high <= low:
        return 0.0
    # The Laplacian is linear, so scaling its variance equals normalizing the image first.
    total = squares = 0.0
    for laplacian in _laplacian_bands(image):
        total += float(laplacian.sum(dtype=np.float64))
        squares += float(np.square(laplacian, dtype=np.float64).sum())
    mean = total / image.size
    return max(0.0, squares / image.size - mean * mean) / float(high - low) ** 2


def _laplacian_bands(image: np.ndarray) -> Iterator[np.ndarray]:
    """``scipy.ndimage.laplace(image, mode="reflect")`` in float32, in bands of rows, so no
    float copy of the whole image is made (small bands also stay in the CPU cache)."""
    height, width = image.shape
    rows = max(1, _BAND_PIXELS // width)
    for top in range(0, height, rows):
        bottom = min(top + rows, height)
        first, last = max(top - 1, 0), min(bottom + 1, height)
        padded = np.empty((last - first + 2, width + 2), np.float32)
        padded[1:-1, 1:-1] = finite_float32(image[first:last])
        padded[0], padded[-1] = padded[1], padded[-2]  # "reflect" repeats the edge pixel
        padded[:, 0], padded[:, -1] = padded[:, 1], padded[:, -2]
        centre = padded[1:-1, 1:-1]
        laplacian = padded[:-2, 1:-1] + padded[2:, 1:-1] - 2 * centre
        laplacian += padded[1:-1, :-2] + padded[1:-1, 2:] - 2 * centre
        yield laplacian[top - first : bottom - first]
