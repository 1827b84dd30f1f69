from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from cellwatch.errors import ModelError
from cellwatch.measure import measure_cells, summarize
from cellwatch.postprocess import labels_from_masked_interior, labels_from_probabilities, tidy
from cellwatch.storage.pixels import inner_rim
from cellwatch.training.targets import as_instances, median_diameter, three_class


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
    with pytest.raises(ModelError, match=r"must be \(H, W, 1\), \(H, W, 3\) or \(H, W, 4\)"):
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


@pytest.mark.parametrize("seed", range(5))
def test_inner_rim_is_find_boundaries_inner(seed: int):
    from skimage.segmentation import find_boundaries

    rng = np.random.default_rng(seed)
    # blocky random labels: touching cells, background gaps and cells on the image edge
    labels = np.kron(rng.integers(0, 6, (12, 15)), np.ones((4, 3), np.int32))
    labels[rng.random(labels.shape) < 0.05] = 0
    expected = find_boundaries(labels, connectivity=1, mode="inner") & (labels > 0)
    assert inner_rim(labels).sum() > 0
    np.testing.assert_array_equal(inner_rim(labels), expected)


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


# --- labelling in the plane's own memory gives the whole-image watershed -----------------


def random_plane(shape: tuple[int, int], seed: int) -> np.ndarray:
    """A masked interior plane: smooth blobs (several seeds in some), NaN around them."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    plane = ndi.gaussian_filter(rng.random(shape), 2.5)
    plane = (plane - plane.min()) / (np.ptp(plane) + 1e-9)
    plane[plane < np.quantile(plane, 0.45)] = np.nan
    return plane.astype(np.float32)


def whole_image_watershed(plane: np.ndarray, threshold: float) -> np.ndarray:
    from scipy import ndimage as ndi
    from skimage.segmentation import relabel_sequential, watershed

    cross = ndi.generate_binary_structure(2, 1)
    seeds, _ = ndi.label(plane > threshold, structure=cross)
    mask = ~np.isnan(plane)
    return relabel_sequential(watershed(-np.nan_to_num(plane), seeds, mask=mask))[0]


@pytest.mark.parametrize("band_pixels", [1, 40, 1 << 20])
@pytest.mark.parametrize("seed", range(10))
def test_labelling_in_place_equals_the_whole_image_watershed(seed, band_pixels, monkeypatch):
    from cellwatch import postprocess

    # small bands: seeds cross band edges; small blocks: boxes start in any block
    monkeypatch.setattr(postprocess, "_BAND_PIXELS", band_pixels)
    monkeypatch.setattr(postprocess._Heights, "_BLOCK", 3)
    rng = np.random.default_rng(seed)
    plane = random_plane((int(rng.integers(1, 120)), int(rng.integers(1, 120))), seed)
    threshold = float(rng.choice([0.6, 0.75, 0.9]))
    expected = whole_image_watershed(plane, threshold)
    kept = plane.copy()
    labels = labels_from_masked_interior(plane, interior_threshold=threshold)
    np.testing.assert_array_equal(plane, kept)  # not overwritten unless asked
    np.testing.assert_array_equal(labels, expected)
    labels = labels_from_masked_interior(plane, interior_threshold=threshold, overwrite=True)
    assert labels.dtype == np.int32 and np.shares_memory(labels, plane)
    np.testing.assert_array_equal(labels, expected)


def whole_image_split_watershed(
    plane: np.ndarray, threshold: float, split_threshold: float, min_area: int
) -> np.ndarray:
    """The reference for seed splitting: seed by seed, on the whole image."""
    from scipy import ndimage as ndi
    from skimage.segmentation import watershed

    cross = ndi.generate_binary_structure(2, 1)
    depth = -np.nan_to_num(plane)
    seeds, n = ndi.label(plane > threshold, structure=cross)
    cores, _ = ndi.label(plane > split_threshold, structure=cross)
    next_id = n + 1
    for seed in range(1, n + 1):
        inside = seeds == seed
        ids, areas = np.unique(cores[inside & (cores > 0)], return_counts=True)
        big = ids[areas >= min_area]
        if len(big) < 2:
            continue
        markers = np.where(np.isin(cores, big) & inside, cores, 0)
        grown = watershed(depth, markers, mask=inside)
        for core in big:
            seeds[grown == core] = next_id
            next_id += 1
    return watershed(depth, seeds, mask=~np.isnan(plane))


def same_cells(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label images draw the same cells, whatever their ids."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return pairs.shape[1] == len(np.unique(a[a > 0])) == len(np.unique(b[b > 0]))


@pytest.mark.parametrize("band_pixels", [40, 1 << 20])
@pytest.mark.parametrize("seed", range(8))
def test_split_seeds_equal_splitting_seed_by_seed_on_the_whole_image(
    seed, band_pixels, monkeypatch
):
    from cellwatch import postprocess

    monkeypatch.setattr(postprocess, "_BAND_PIXELS", band_pixels)
    monkeypatch.setattr(postprocess._Heights, "_BLOCK", 3)
    rng = np.random.default_rng(seed)
    plane = random_plane((int(rng.integers(20, 120)), int(rng.integers(20, 120))), seed)
    threshold, split_threshold = 0.6, float(rng.choice([0.7, 0.8]))
    min_area = int(rng.choice([1, 4, 10]))
    expected = whole_image_split_watershed(plane, threshold, split_threshold, min_area)
    labels = labels_from_masked_interior(
        plane,
        interior_threshold=threshold,
        split_threshold=split_threshold,
        split_min_area=min_area,
    )
    assert same_cells(labels, expected)
    assert labels.max() == len(np.unique(expected)) - 1  # ids 1..n


def test_a_seed_with_two_cores_is_split_and_small_cores_do_not_split():
    yy, xx = np.mgrid[0:40, 0:70]
    peak = lambda y, x, r: np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * r**2))  # noqa: E731
    # two touching cells: one seed at 0.6 (the saddle is 0.73), two cores above 0.9
    plane = (0.99 * np.maximum(peak(20, 22, 7), peak(20, 33, 7))).astype(np.float32)
    plane[plane < 0.2] = np.nan
    assert labels_from_masked_interior(plane, interior_threshold=0.6).max() == 1
    split = labels_from_masked_interior(
        plane, interior_threshold=0.6, split_threshold=0.9, split_min_area=5
    )
    assert split.max() == 2
    assert split[20, 22] != split[20, 33] and split[20, 22] > 0 and split[20, 33] > 0
    # the cut runs through the saddle, and every pixel of the clump keeps a cell
    assert np.array_equal(split > 0, ~np.isnan(plane))
    assert split[20, 25] == split[20, 22] and split[20, 30] == split[20, 33]
    # cores smaller than split_min_area do not split their seed
    assert (
        labels_from_masked_interior(
            plane, interior_threshold=0.6, split_threshold=0.9, split_min_area=500
        ).max()
        == 1
    )
    # a threshold of 1 (config's "off") splits nothing
    off = labels_from_masked_interior(
        plane, interior_threshold=0.6, split_threshold=1.0, split_min_area=5
    )
    assert off.max() == 1
    with pytest.raises(ValueError, match="must lie above interior_threshold"):
        labels_from_masked_interior(plane, interior_threshold=0.6, split_threshold=0.5)


@pytest.mark.parametrize("band_pixels", [1, 40, 1 << 20])
@pytest.mark.parametrize("seed", range(8))
def test_doubtful_cells_are_those_whose_plane_never_reaches_the_peak_threshold(
    seed, band_pixels, monkeypatch
):
    """The reference: label as usual, then drop each cell whose highest value is below
    the peak threshold (its pixels become background, not its neighbours')."""
    from skimage.segmentation import relabel_sequential

    from cellwatch import postprocess

    monkeypatch.setattr(postprocess, "_BAND_PIXELS", band_pixels)  # seeds cross bands
    monkeypatch.setattr(postprocess._Heights, "_BLOCK", 3)
    rng = np.random.default_rng(seed)
    plane = random_plane((int(rng.integers(20, 120)), int(rng.integers(20, 120))), seed)
    threshold, peak = 0.6, float(rng.choice([0.75, 0.85, 0.95]))
    split = float(rng.choice([0.7, 1.0]))
    expected = whole_image_split_watershed(plane, threshold, split, 4)
    tops = ndimage.maximum(np.nan_to_num(plane), expected, np.arange(expected.max() + 1))
    doubtful = np.asarray(tops) < peak
    doubtful[0] = True
    expected = relabel_sequential(np.where(doubtful[expected], 0, expected))[0]
    labels = labels_from_masked_interior(
        plane, interior_threshold=threshold, split_threshold=split, split_min_area=4,
        peak_threshold=peak,
    )  # fmt: skip
    assert 0 < labels.max() < len(tops) - 1  # some cells kept, some dropped
    assert same_cells(labels, expected)
    assert labels.max() == len(np.unique(expected)) - 1  # ids 1..n
    # at or below the seed threshold every seed reaches it: nothing is dropped
    unfiltered = labels_from_masked_interior(
        plane, interior_threshold=threshold, peak_threshold=0.6
    )
    assert same_cells(unfiltered, relabel_sequential(whole_image_watershed(plane, threshold))[0])


def test_a_doubtful_cell_beside_a_sure_one_leaves_background_not_a_bigger_neighbour():
    plane = np.full((10, 20), np.nan, np.float32)
    plane[2:8, 2:17] = 0.5  # one clump: two seeds
    plane[3:7, 3:8], plane[3:7, 11:16] = 0.99, 0.9  # sure, doubtful
    both = labels_from_masked_interior(plane, interior_threshold=0.8)
    sure = labels_from_masked_interior(plane, interior_threshold=0.8, peak_threshold=0.95)
    assert both.max() == 2 and sure.max() == 1
    np.testing.assert_array_equal(sure > 0, both == both[4, 4])
    probs = np.zeros((10, 20, 3), np.float32)
    probs[..., 0] = 1.0
    probs[2:8, 2:17] = (0.0, 0.0, 1.0)  # boundary class around...
    probs[3:7, 3:8], probs[3:7, 11:16] = (0.0, 0.99, 0.01), (0.0, 0.9, 0.1)  # ...two cores
    assert labels_from_probabilities(probs, interior_threshold=0.8, peak_threshold=0.95).max() == 1
    assert labels_from_probabilities(probs, interior_threshold=0.8).max() == 2


def test_labelling_in_place_drops_small_cells_and_handles_edge_cases():
    plane = random_plane((60, 80), 1)
    expected = tidy(whole_image_watershed(plane, 0.7), 30)
    np.testing.assert_array_equal(
        labels_from_masked_interior(plane, interior_threshold=0.7, min_area=30), expected
    )
    assert labels_from_masked_interior(np.full((4, 5), np.nan, np.float32)).max() == 0
    assert labels_from_masked_interior(np.full((1, 1), 0.9, np.float32)).tolist() == [[1]]
    with pytest.raises(ModelError, match="2-D masked interior plane"):
        labels_from_masked_interior(np.zeros((2, 2, 2), np.float32))


@pytest.mark.parametrize("min_area", [0, 1, 5, 40])
def test_tidy_in_place_equals_tidy_into_a_new_array(min_area):
    rng = np.random.default_rng(min_area)
    labels = rng.integers(0, 30, (50, 60)).astype(np.int32) * 3
    expected = tidy(labels.copy(), min_area)
    out = tidy(labels, min_area, out=labels)
    assert out is labels
    np.testing.assert_array_equal(out, expected)
