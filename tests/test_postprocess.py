from __future__ import annotations

import numpy as np
import pytest

from cellwatch.errors import ModelError
from cellwatch.measure import measure_cells, summarize
from cellwatch.postprocess import labels_from_probabilities, tidy
from cellwatch.targets import as_instances, median_diameter, three_class


def one_hot(classes: np.ndarray) -> np.ndarray:
    return np.eye(3, dtype=np.float32)[classes]


def test_touching_cells_are_separated_by_their_boundaries():
    truth = np.zeros((40, 60), np.int32)
    truth[10:30, 10:30] = 1
    truth[10:30, 30:50] = 2  # shares an edge with cell 1
    labels = labels_from_probabilities(one_hot(three_class(truth)))
    assert labels.max() == 2
    # each cell keeps its full outline, boundary pixels included
    for i in (1, 2):
        ids = np.unique(labels[truth == i])
        assert len(ids) == 1 and ids[0] > 0
        assert (labels == ids[0]).sum() == (truth == i).sum()


def test_small_fragments_are_dropped_and_ids_are_consecutive():
    labels = np.zeros((20, 20), np.int32)
    labels[1:6, 1:6] = 7  # 25 px
    labels[10, 10] = 3  # 1 px debris
    labels[12:18, 12:18] = 9  # 36 px
    out = tidy(labels, min_area=4)
    assert sorted(np.unique(out)) == [0, 1, 2]
    assert out.dtype == np.int32


def test_one_class_model_splits_two_overlapping_discs():
    yy, xx = np.mgrid[:60, :90]
    fg = ((yy - 30) ** 2 + (xx - 30) ** 2 <= 15**2) | ((yy - 30) ** 2 + (xx - 58) ** 2 <= 15**2)
    labels = labels_from_probabilities(fg[..., None].astype(np.float32))
    assert labels.max() == 2
    assert (labels > 0).sum() == fg.sum()


def test_empty_probabilities_give_no_cells():
    probs = np.zeros((32, 32, 3), np.float32)
    probs[..., 0] = 1
    assert labels_from_probabilities(probs).max() == 0


def test_wrong_output_shape_is_a_model_error():
    with pytest.raises(ModelError, match=r"must be \(H, W, 1\) or \(H, W, 3\)"):
        labels_from_probabilities(np.zeros((8, 8, 2), np.float32))


def test_binary_masks_become_instances_and_boundaries_sit_inside_cells():
    mask = np.zeros((30, 30), np.uint8)
    mask[2:10, 2:10] = 255
    mask[15:25, 15:25] = 255
    instances = as_instances(mask)
    assert instances.max() == 2
    classes = three_class(instances)
    assert set(np.unique(classes)) == {0, 1, 2}
    assert ((classes > 0) == (mask > 0)).all()
    assert median_diameter(instances) == pytest.approx(
        np.sqrt(4 * (64 + 100) / 2 / np.pi), rel=0.05
    )


def test_measurements_in_pixels_and_micrometres():
    labels = np.zeros((50, 50), np.int32)
    labels[10:20, 10:20] = 1  # 100 px square
    intensity = np.where(labels > 0, 100, 5).astype(np.uint16)
    cells = measure_cells(labels, intensity, pixel_size_um=0.5)
    assert len(cells) == 1
    row = cells.iloc[0]
    assert row["area_px"] == 100
    assert row["area_um2"] == pytest.approx(25.0)
    assert row["mean_intensity"] == pytest.approx(100)
    assert (row["centroid_y"], row["centroid_x"]) == pytest.approx((14.5, 14.5))
    summary = summarize(cells, labels.shape, 0.5)
    assert summary["cell_count"] == 1
    assert summary["confluence"] == pytest.approx(100 / 2500)
    assert summary["mean_area_um2"] == pytest.approx(25.0)
    unknown = measure_cells(labels, intensity, pixel_size_um=None)
    assert np.isnan(unknown.iloc[0]["area_um2"])
    assert summarize(unknown, labels.shape, None)["mean_area_um2"] is None
