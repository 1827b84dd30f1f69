"""Tests for cellwatch.measure: the per-label sums give what skimage's regionprops gives."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi
from skimage.measure import perimeter, regionprops, regionprops_table

from cellwatch import measure
from cellwatch.measure import measure_cells, perimeters

COLUMNS = {
    "label": "label",
    "centroid-0": "centroid_y",
    "centroid-1": "centroid_x",
    "area": "area_px",
    "perimeter": "perimeter_px",
    "equivalent_diameter_area": "equivalent_diameter_px",
    "eccentricity": "eccentricity",
    "intensity_mean": "mean_intensity",
}


def reference(labels: np.ndarray, intensity: np.ndarray) -> pd.DataFrame:
    properties = ("label", "centroid", *list(COLUMNS)[3:])
    table = regionprops_table(labels, intensity_image=intensity, properties=properties)
    return pd.DataFrame(table).rename(columns=COLUMNS)


def random_labels(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Blobs that touch each other and the image edge, plus scattered single pixels, lines
    and cells in several pieces."""
    rng = np.random.default_rng(seed)
    labels, n = ndi.label(ndi.gaussian_filter(rng.random(shape), 2) > 0.5)
    labels[rng.random(shape) < 0.02] = rng.integers(0, n + 2)  # specks, some of a cell
    if shape[0] > 4:
        labels[shape[0] // 2, :] = n + 3  # a one-pixel line across the image
    return labels.astype(np.int32)


@pytest.mark.parametrize("band_pixels", [1, 97, 1 << 20])
@pytest.mark.parametrize("seed", range(12))
def test_measurements_equal_regionprops(seed, band_pixels, monkeypatch):
    monkeypatch.setattr(measure, "_BAND_PIXELS", band_pixels)
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(1, 90)), int(rng.integers(1, 90)))
    labels = random_labels(shape, seed)
    intensity = rng.integers(0, 65535, shape).astype(np.uint16)
    got = measure_cells(labels, intensity, pixel_size_um=None)
    expected = reference(labels, intensity)
    assert list(got.columns[: len(COLUMNS)]) == list(COLUMNS.values())
    assert len(got) == len(expected)
    for column in COLUMNS.values():
        assert got[column].dtype == expected[column].dtype, column
        exact = column not in ("perimeter_px", "eccentricity")  # summed in another order
        np.testing.assert_allclose(got[column], expected[column], rtol=0 if exact else 1e-12)


@pytest.mark.parametrize("seed", range(20))
def test_eccentricity_equals_skimage(seed):
    rng = np.random.default_rng(100 + seed)
    labels = random_labels((120, 160), seed)
    labels[rng.integers(0, 120), :] = 999  # a long thin cell: eccentricity near 1
    ours = measure_cells(labels, labels, None)["eccentricity"].to_numpy()
    theirs = [r.eccentricity for r in regionprops(labels)]
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


def test_symmetric_cells_have_zero_eccentricity():
    labels = np.zeros((40, 40), np.int32)
    labels[5:15, 5:15] = 1  # square
    labels[20, 20] = 2  # one pixel
    yy, xx = np.mgrid[:40, :40]
    labels[(yy - 30) ** 2 + (xx - 30) ** 2 <= 16] = 3  # disc
    assert measure_cells(labels, labels, None)["eccentricity"].tolist() == [0.0, 0.0, 0.0]


def test_perimeters_equal_skimage_perimeter_of_each_cell():
    labels = random_labels((70, 90), 5)
    ours = perimeters(labels)
    for cell in range(1, int(labels.max()) + 1):
        assert ours[cell] == pytest.approx(perimeter(labels == cell, 4), rel=1e-12, abs=0)


def test_float_intensity_and_physical_columns():
    labels = random_labels((50, 60), 1)
    intensity = np.random.default_rng(1).random((50, 60)).astype(np.float32)
    got = measure_cells(labels, intensity, pixel_size_um=0.5)
    expected = reference(labels, intensity)
    # skimage averages float32 in float32; here the sums are float64
    np.testing.assert_allclose(got["mean_intensity"], expected["mean_intensity"], rtol=1e-6)
    np.testing.assert_allclose(got["area_um2"], expected["area_px"] * 0.25)
    np.testing.assert_allclose(got["perimeter_um"], expected["perimeter_px"] * 0.5)


def test_sparse_ids_keep_their_values():
    labels = np.zeros((6, 6), np.int64)
    labels[1:3, 1:3] = 10**12
    labels[4, 4] = 7
    got = measure_cells(labels, np.ones((6, 6), np.uint8), None)
    assert got["label"].tolist() == [7, 10**12]
    assert got["area_px"].tolist() == [1.0, 4.0]
    labels[labels == 0] = 10**11  # no background at all
    got = measure_cells(labels, np.ones((6, 6), np.uint8), None)
    assert got["label"].tolist() == [7, 10**11, 10**12]
    assert got["area_px"].tolist() == [1.0, 31.0, 4.0]


def test_no_cells_gives_an_empty_table_with_every_column():
    empty = np.zeros((8, 8), np.int32)
    got = measure_cells(empty, empty, 1.0)
    assert got.empty
    assert list(got.columns) == list(measure_cells(empty + 1, empty, 1.0).columns)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="must be equal 2-D shapes"):
        measure_cells(np.zeros((4, 4), np.int32), np.zeros((4, 5)), None)
    with pytest.raises(ValueError, match="must not be negative"):
        measure_cells(-np.ones((4, 4), np.int32), np.zeros((4, 4)), None)
