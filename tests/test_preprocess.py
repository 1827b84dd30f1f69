"""Tests for cellwatch.preprocess: histogram percentiles and the normalization applied tile
by tile give exactly what numpy and a whole-image float copy give; a zoom made window by
window, and outputs stitched back onto the image's own grid, give what scikit-image's
resize of the whole image gives."""

from __future__ import annotations

import numpy as np
import pytest

from cellwatch.errors import BadInputError
from cellwatch.preprocess import (
    Normalization,
    OwnGridStitcher,
    ZoomedSource,
    axis_operator,
    normalize,
    own_grid_stitcher,
    rescale,
    resize_to,
)
from cellwatch.storage import pixels
from cellwatch.storage.pixels import percentiles
from cellwatch.tiling import TileGrid, TileSettings, predict_tiled

QS = [(1.0, 99.8), (0.0, 100.0), (50.0,), (1.5, 99.0, 37.123456789), (99.99, 0.01)]


def reference_normalize(image: np.ndarray, low: float = 1.0, high: float = 99.8) -> np.ndarray:
    """The whole-image normalization as first written: a float copy, then np.percentile."""
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
def test_normalizing_in_place_piece_by_piece_equals_normalizing_the_whole(index):
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


# --- zoom by windows ----------------------------------------------------------------------

SHAPES = [(151, 129), (64, 90), (7, 5), (1, 40), (40, 1)]
SCALES = [1.33, 1.94, 2.5, 5.0, 0.6, 0.2, 1.07]
TOLERANCE = 5e-7  # float32 rounding of values in [0, 1]


def _raw(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random(shape) * 4000).astype(np.uint16)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", SCALES)
def test_zoomed_windows_equal_the_whole_image_zoom(shape, scale):
    image = _raw(shape)
    norm = Normalization.of(image)
    whole = rescale(norm.apply(image), scale)  # scikit-image, the whole image at once
    source = ZoomedSource(image, scale, norm)
    assert source.shape == whole.shape
    height, width = whole.shape
    windows = [
        (0, 0, height, width),
        (height // 3, width // 4, max(1, height // 2), max(1, width // 3)),
        (height - 1, width - 1, 1, 1),
        (0, width - 1, height, 1),
    ]
    for y0, x0, h, w in windows:
        h, w = min(h, height - y0), min(w, width - x0)
        np.testing.assert_allclose(
            source.window(y0, x0, h, w), whole[y0 : y0 + h, x0 : x0 + w], atol=TOLERANCE, rtol=0
        )


def _model(batch: np.ndarray) -> np.ndarray:
    """A pointwise three-channel stand-in for the network."""
    return np.concatenate([batch, batch * batch, 1 - batch], axis=-1)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("align", [1, 16])  # 16: tiles reach into the reflected canvas
def test_tiles_cut_from_the_source_equal_tiles_of_the_zoomed_image(shape, scale, align):
    image = _raw(shape, 1)
    norm = Normalization.of(image)
    zoomed = rescale(norm.apply(image), scale)
    settings = TileSettings(32, 8, align=align)
    expected = predict_tiled(zoomed, _model, settings, batch_size=4)
    streamed = predict_tiled(ZoomedSource(image, scale, norm), _model, settings, batch_size=4)
    np.testing.assert_allclose(streamed, expected, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("align", [1, 16])
def test_outputs_stitched_on_the_own_grid_equal_resizing_the_zoomed_output(shape, scale, align):
    image = _raw(shape, 2)
    norm = Normalization.of(image)
    zoomed_output = _model(rescale(norm.apply(image), scale)[..., None])
    expected = resize_to(zoomed_output, shape, order=1)  # what labelling used to start from
    source = ZoomedSource(image, scale, norm)
    own = predict_tiled(
        source,
        _model,
        TileSettings(32, 8, align=align),
        batch_size=4,
        stitcher=own_grid_stitcher(shape),
    )
    assert own.shape == (*shape, 3)
    np.testing.assert_allclose(own, expected, atol=2e-6, rtol=0)


def _pooling_model(batch: np.ndarray) -> np.ndarray:
    """A one-level U-Net stand-in: 2×2 max-pooling, a 3×3 correlation with zero padding on
    the pooled map, nearest upsampling. Its output depends on the pooling phase."""
    from scipy import ndimage

    x = batch[..., 0]
    n, h, w = x.shape
    pooled = x.reshape(n, h // 2, 2, w // 2, 2).max(axis=(2, 4))
    kernel = np.arange(1, 10, dtype=np.float32).reshape(1, 3, 3) / 45
    smoothed = ndimage.correlate(pooled, kernel, mode="constant")
    return smoothed.repeat(2, axis=1).repeat(2, axis=2)[..., None]


@pytest.mark.parametrize("shape", [(50, 70), (37, 91), (7, 40)])
@pytest.mark.parametrize("scale", [0.6, 1.7])
def test_a_zoomed_image_tiled_on_the_pooling_grid_equals_its_whole_canvas(shape, scale):
    """The zoomed image is tiled as an image is: origins on the pooling grid, the canvas
    reflected past the zoomed image's end, and the stitched output is the network's on
    that whole canvas (resampled to the image's own grid by the own-grid stitcher)."""
    image = _raw(shape, 3)
    norm = Normalization.of(image)
    source = ZoomedSource(image, scale, norm)
    grid = TileGrid.for_shape(source.shape, 32, 14, align=2)  # margin 8 ≥ the 3-px field
    zoomed = rescale(norm.apply(image), scale)
    whole = _pooling_model(grid.canvas(zoomed)[None, ..., None])[0][: grid.height, : grid.width]
    kwargs = {"settings": TileSettings(32, 14, align=2), "batch_size": 3}
    tiled = predict_tiled(source, _pooling_model, **kwargs)
    np.testing.assert_allclose(tiled, whole, atol=TOLERANCE, rtol=0)
    own = predict_tiled(source, _pooling_model, **kwargs, stitcher=own_grid_stitcher(shape))
    np.testing.assert_allclose(own, resize_to(whole, shape, order=1), atol=2e-6, rtol=0)


def test_own_grid_stitcher_keeps_nan_where_most_weight_is_nan():
    """A masked interior plane: NaN outside cells. Zoomed by 2, each original pixel sits
    half-way between two zoomed pixels along each axis."""
    zoomed = np.full((8, 8), np.nan, np.float32)
    zoomed[:, :4] = 0.9
    zoomed[:, 4] = 0.5  # the column next to the NaN ones
    grid = TileGrid.for_shape(zoomed.shape, 8, 0)
    stitcher = OwnGridStitcher(grid, 1, (4, 4))
    stitcher.add(0, zoomed[..., None])
    out = stitcher.result()[..., 0]
    # original column c sits at zoomed position 2c + 0.5: columns 0, 1 take 0.9; column 2
    # averages 0.5 and NaN half and half: the non-NaN half, 0.5; column 3 is all NaN
    np.testing.assert_allclose(out[:, :2], 0.9, rtol=1e-6)
    np.testing.assert_allclose(out[:, 2], 0.5, rtol=1e-6)
    assert np.isnan(out[:, 3]).all()


def test_zoom_errors_name_the_window_and_the_rows():
    source = ZoomedSource(_raw((10, 10)), 2.0, None)
    with pytest.raises(ValueError, match=r"window \(15, 0\) of 10×4 is outside"):
        source.window(15, 0, 10, 4)
    with pytest.raises(ValueError, match="expected a 2-D image"):
        ZoomedSource(np.zeros((2, 2, 2)), 2.0)
    with pytest.raises(ValueError, match="rows 0:5 of a resize from 4 to 4"):
        axis_operator(4, 4, 0, 5, mode="mirror")
    stitcher = OwnGridStitcher(TileGrid.for_shape((20, 20), 8, 2), 1, (10, 10))
    with pytest.raises(RuntimeError, match="tiles missing"):
        stitcher.result()
