"""Tests for cellwatch.preprocess: histogram percentiles and the normalisation applied tile
by tile give exactly what numpy and a whole-image float copy give."""

from __future__ import annotations

import numpy as np
import pytest

from cellwatch.errors import BadInputError
from cellwatch.preprocess import Normalization, normalize
from cellwatch.storage import pixels
from cellwatch.storage.pixels import percentiles

QS = [(1.0, 99.8), (0.0, 100.0), (50.0,), (1.5, 99.0, 37.123456789), (99.99, 0.01)]


def reference_normalize(image: np.ndarray, low: float = 1.0, high: float = 99.8) -> np.ndarray:
    """The whole-image normalisation as first written: a float copy, then np.percentile."""
    pixels = image.astype(np.float32, copy=False)
    if not np.isfinite(pixels).all():
        pixels = np.nan_to_num(pixels, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = np.percentile(pixels, [low, high])
    span = float(hi - lo)
    if span <= 0:
        return np.zeros(image.shape, np.float32)
    return (pixels - np.float32(lo)) / np.float32(span)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("seed", range(40))
def test_percentiles_equal_numpy_bit_for_bit(dtype, seed, monkeypatch):
    rng = np.random.default_rng(seed)
    monkeypatch.setattr(pixels, "_BAND_PIXELS", int(rng.integers(1, 500)))
    n = int(rng.integers(1, 20)) if seed % 4 == 0 else int(rng.integers(1, 3000))
    top = int(rng.integers(1, np.iinfo(dtype).max + 1))
    image = rng.integers(0, top, (n, int(rng.integers(1, 4)))).astype(dtype)
    if seed % 5 == 0:
        image[:] = image.flat[0]  # flat
    q = QS[seed % len(QS)] if seed % 3 else tuple(rng.uniform(0, 100, 3))
    got = percentiles(image, q)
    expected = np.percentile(image.astype(np.float32), q)
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)


def test_percentiles_of_other_dtypes_go_through_numpy():
    values = np.array([[-5, 3, 1000, 7]], np.int32)
    np.testing.assert_array_equal(
        percentiles(values, (10, 90)), np.percentile(values.astype(np.float32), (10, 90))
    )


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    floats = rng.random((40, 30)) * 1000
    floats[3, 4], floats[5, 6], floats[7, 8] = np.nan, np.inf, -np.inf
    return [
        rng.integers(0, 65535, (50, 60)).astype(np.uint16),
        rng.integers(0, 255, (13, 7)).astype(np.uint8),
        rng.integers(-100, 100_000, (20, 20)).astype(np.int32),
        floats,
        floats.astype(np.float32),
        np.full((4, 4), 7, np.uint16),  # flat: zeros
        np.array([[3]], np.uint16),
    ]


@pytest.mark.parametrize("index", range(7))
def test_normalize_equals_the_whole_image_float_copy(index):
    image = _images()[index]
    expected = reference_normalize(image)
    np.testing.assert_array_equal(normalize(image), expected)
    np.testing.assert_array_equal(normalize(image, 5.0, 95.0), reference_normalize(image, 5, 95))


@pytest.mark.parametrize("index", range(7))
def test_normalising_in_place_piece_by_piece_equals_normalising_the_whole(index):
    image = _images()[index]
    norm = Normalization.of(image)
    pieces = np.empty(image.shape, np.float32)
    for rows in (slice(0, 1), slice(1, None)):
        pieces[rows] = image[rows]  # what cutting a tile does
        piece = pieces[rows]
        assert norm.apply_in_place(piece) is piece
    np.testing.assert_array_equal(pieces, reference_normalize(image))


def test_normalization_needs_a_plane_and_float32_out():
    with pytest.raises(BadInputError, match="expected a 2-D image"):
        Normalization.of(np.zeros((2, 3, 4), np.uint8))
    norm = Normalization.of(np.arange(12, dtype=np.uint8).reshape(3, 4))
    with pytest.raises(ValueError, match="out must be float32"):
        norm.apply(np.zeros((2, 2), np.uint8), out=np.zeros((2, 2), np.float64))
