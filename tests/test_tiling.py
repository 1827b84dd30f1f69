"""Tests for cellwatch.tiling: split-and-reassemble, tiled equals untiled, fixed batches."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from cellwatch.errors import ModelError
from cellwatch.tiling import (
    Stitcher,
    TileGrid,
    TileSettings,
    predict_tiled,
    predict_tiled_many,
    tile_settings,
)

SIZES = [(1, 1), (7, 300), (255, 257), (256, 256), (257, 256), (3000, 17), (600, 900)]
TILE_OVERLAPS = [(t, o) for t in (32, 64, 256) for o in sorted({0, 8, t // 4, t // 2 - 1})]


def _image(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def identity(batch: np.ndarray) -> np.ndarray:
    return batch.copy()


class Recorder:
    """A fake model that records the shape and dtype of every batch it is given."""

    def __init__(self, model=identity) -> None:
        self.model = model
        self.calls: list[tuple[tuple[int, ...], np.dtype]] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append((batch.shape, batch.dtype))
        return self.model(batch)


def conv_model(kernel: np.ndarray):
    """A translation-equivariant 2-channel 'network': a correlation and its square."""

    def model(batch: np.ndarray) -> np.ndarray:
        out = np.empty((*batch.shape[:3], 2), dtype=np.float32)
        for i, tile in enumerate(batch[..., 0]):
            response = ndimage.correlate(tile, kernel, mode="constant")
            out[i, ..., 0] = response
            out[i, ..., 1] = response**2
        return out

    return model


@pytest.mark.parametrize("shape", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize(("tile", "overlap"), TILE_OVERLAPS)
def test_split_and_reassemble_is_identity(shape, tile, overlap):
    image = _image(shape)
    out = predict_tiled(image, identity, TileSettings(tile, overlap), batch_size=8)
    assert out.shape == (*shape, 1)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[..., 0], image)


@pytest.mark.parametrize("shape", [(1, 1), (7, 300), (3000, 17)])
def test_small_axes_are_reflect_padded(shape):
    image = _image(shape)
    grid = TileGrid.for_shape(shape, tile=32, overlap=8)
    tile = grid.extract(image, [0])[0]
    mode = "edge" if shape == (1, 1) else "reflect"
    expected = np.pad(image, [(0, max(0, 32 - n)) for n in shape], mode=mode)[:32, :32]
    np.testing.assert_array_equal(tile, expected)


@pytest.mark.parametrize("shape", [(1, 1), (1, 40), (2, 3), (7, 300), (603, 1272), (3000, 17)])
@pytest.mark.parametrize(("tile", "align"), [(32, 1), (32, 16), (64, 16), (256, 16)])
def test_the_canvas_is_the_image_reflected_to_the_grid_and_a_tile(shape, tile, align):
    image = _image(shape)
    grid = TileGrid.for_shape(shape, tile=tile, overlap=8, align=align)
    height, width = grid.canvas_shape
    assert height % align == 0 and width % align == 0
    assert height == max(-(-shape[0] // align) * align, tile)
    assert width == max(-(-shape[1] // align) * align, tile)
    expected = image
    for axis, (size, target) in enumerate(zip(shape, (height, width), strict=True)):
        widths = [(0, 0), (0, 0)]
        widths[axis] = (0, target - size)
        expected = np.pad(expected, widths, mode="edge" if size == 1 else "reflect")
    canvas = grid.canvas(image)
    np.testing.assert_array_equal(canvas, expected)
    for index, (y0, x0) in enumerate(grid.boxes()):  # tiles are cut from the canvas
        np.testing.assert_array_equal(
            grid.extract(image, [index])[0], canvas[y0 : y0 + tile, x0 : x0 + tile]
        )


@pytest.mark.parametrize(
    ("length", "tile", "overlap", "align", "starts"),
    [
        (1, 32, 0, 1, [0]),
        (32, 32, 8, 1, [0]),
        (100, 32, 8, 1, [0, 24, 48, 68]),
        (72, 32, 8, 1, [0, 24, 40]),
        # on a 16-px grid the image is padded to 608 instead of the last tile starting at 344
        (600, 256, 48, 16, [0, 208, 352]),
        (600, 256, 126, 16, [0, 128, 256, 352]),  # a step of 130 rounds down to 128
        (100, 64, 16, 16, [0, 48]),
    ],
)
def test_grid_origins_step_and_end_flush(length, tile, overlap, align, starts):
    grid = TileGrid.for_shape((length, 5), tile=tile, overlap=overlap, align=align)
    assert [y for y, _ in grid.boxes()] == starts
    assert len(grid) == len(starts)


@pytest.mark.parametrize("length", [1, 15, 16, 17, 255, 256, 257, 603, 1000, 1272])
@pytest.mark.parametrize(
    ("tile", "overlap", "align"),
    [(256, 48, 16), (256, 192, 16), (512, 192, 16), (256, 130, 16), (64, 20, 8), (32, 8, 1)],
)
def test_origins_lie_on_the_grid_and_kept_pixels_keep_the_margin(length, tile, overlap, align):
    grid = TileGrid.for_shape((length, 3), tile=tile, overlap=overlap, align=align)
    canvas = grid.canvas_shape[0]
    margin = (tile - grid.step) // 2
    assert margin >= overlap // 2
    assert grid.rows[-1][0] + tile == canvas
    kept = []
    for start, keep_from, keep_to in grid.rows:
        assert start % align == 0
        assert start <= keep_from < keep_to <= start + tile
        if start > 0:  # an edge inside the canvas: the network sees zeros past it
            assert keep_from - start >= margin
        if start + tile < canvas:
            assert start + tile - keep_to >= margin
        kept += range(keep_from, keep_to)
    assert kept == list(range(length))  # the kept spans partition the image


@pytest.mark.parametrize("shape", [(300, 500), (257, 1000), (40, 40)])
@pytest.mark.parametrize(("tile", "overlap"), [(64, 4), (64, 16), (96, 30)])
def test_tiled_equals_untiled_for_a_local_operator(shape, tile, overlap):
    radius = 2  # 5×5 kernel; overlap // 2 >= radius in every case here
    kernel = np.random.default_rng(1).normal(size=(5, 5)).astype(np.float32)
    model = conv_model(kernel)
    image = _image(shape)
    tiled = predict_tiled(image, model, TileSettings(tile, overlap), batch_size=3)
    untiled = model(image[None, ..., None])[0]
    inner = np.s_[radius:-radius, radius:-radius]
    np.testing.assert_allclose(tiled[inner], untiled[inner], rtol=1e-5, atol=1e-5)


def test_too_small_overlap_shows_seams():
    """Guards the previous test: with overlap // 2 < radius the tiles do disagree."""
    kernel = np.ones((5, 5), dtype=np.float32)
    model = conv_model(kernel)
    image = _image((300, 300))
    tiled = predict_tiled(image, model, TileSettings(64, 2), batch_size=4)
    untiled = model(image[None, ..., None])[0]
    assert not np.allclose(tiled[2:-2, 2:-2], untiled[2:-2, 2:-2], atol=1e-3)


def pooling_model(batch: np.ndarray) -> np.ndarray:
    """A one-level 'U-Net': 2×2 max-pooling, a 3×3 correlation with zero padding on the
    pooled map, nearest upsampling. Not shift-invariant: the output depends on the phase
    at which the pooling meets the image."""
    x = batch[..., 0]
    n, h, w = x.shape
    pooled = x.reshape(n, h // 2, 2, w // 2, 2).max(axis=(2, 4))
    kernel = np.arange(1, 10, dtype=np.float32).reshape(1, 3, 3) / 45
    smoothed = ndimage.correlate(pooled, kernel, mode="constant")
    return smoothed.repeat(2, axis=1).repeat(2, axis=2)[..., None]


@pytest.mark.parametrize("shape", [(300, 500), (257, 1000), (40, 41), (603, 1272)])
@pytest.mark.parametrize(("tile", "overlap"), [(64, 12), (64, 21), (96, 30)])
def test_tiled_equals_the_whole_canvas_for_a_pooling_network(shape, tile, overlap):
    # the model's receptive field is 3 px; every overlap here leaves at least 6 each side
    image = _image(shape)
    grid = TileGrid.for_shape(shape, tile, overlap, align=2)
    whole = pooling_model(grid.canvas(image)[None, ..., None])[0][: shape[0], : shape[1]]
    tiled = predict_tiled(image, pooling_model, TileSettings(tile, overlap, align=2))
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-6)  # border pixels included


def test_tiles_off_the_pooling_grid_disagree():
    """Guards the previous test: with odd origins (a step of 43) the same network and the
    same ample overlap no longer give the whole canvas's output."""
    image = _image((300, 500))
    grid = TileGrid.for_shape(image.shape, 64, 21, align=2)
    whole = pooling_model(grid.canvas(image)[None, ..., None])[0][:300, :500]
    tiled = predict_tiled(image, pooling_model, TileSettings(64, 21, align=1))
    assert np.abs(tiled - whole).max() > 0.05


def test_pointwise_function_matches_everywhere():
    image = _image((333, 444))

    def model(batch: np.ndarray) -> np.ndarray:
        return np.tanh(3 * batch - 1)

    out = predict_tiled(image, model, TileSettings(64, 10), batch_size=5)
    np.testing.assert_allclose(out[..., 0], np.tanh(3 * image - 1), rtol=1e-6)


@pytest.mark.parametrize("batch_size", [1, 4, 8, 64])
def test_every_batch_has_exactly_batch_size_tiles(batch_size):
    image = _image((250, 130))
    grid = TileGrid.for_shape(image.shape, tile=64, overlap=8)
    assert len(grid) == 15  # not a multiple of 4, 8 or 64: the last batch is padded
    seen_padding: list[np.ndarray] = []

    def model(batch: np.ndarray) -> np.ndarray:
        seen_padding.append(batch)
        return batch.copy()

    recorder = Recorder(model)
    out = predict_tiled(image, recorder, TileSettings(64, 8), batch_size=batch_size)
    assert len(recorder.calls) == -(-len(grid) // batch_size)
    assert all(c == ((batch_size, 64, 64, 1), np.float32) for c in recorder.calls)
    filler = len(recorder.calls) * batch_size - len(grid)
    if filler:
        assert not seen_padding[-1][batch_size - filler :].any()
    np.testing.assert_array_equal(out[..., 0], image)


def test_three_channel_output_stitches_each_channel():
    image = _image((150, 210))

    def model(batch: np.ndarray) -> np.ndarray:
        return np.concatenate([batch, 2 * batch, 1 - batch], axis=-1)

    out = predict_tiled(image, model, TileSettings(32, 8), batch_size=4)
    assert out.shape == (150, 210, 3)
    np.testing.assert_array_equal(out[..., 0], image)
    np.testing.assert_array_equal(out[..., 1], 2 * image)
    np.testing.assert_array_equal(out[..., 2], 1 - image)


def test_several_images_share_batches():
    images = [_image(s, seed=i) for i, s in enumerate([(5, 5), (40, 70), (1, 1), (33, 33)])]
    tiles = sum(len(TileGrid.for_shape(im.shape, 32, 8)) for im in images)
    recorder = Recorder()
    outs = list(predict_tiled_many(images, recorder, TileSettings(32, 8), batch_size=4))
    assert len(recorder.calls) == -(-tiles // 4)  # no batch is wasted between images
    assert len(outs) == len(images)
    for image, out in zip(images, outs, strict=True):
        np.testing.assert_array_equal(out[..., 0], image)


def test_several_images_are_read_lazily_and_yielded_in_order():
    read: list[int] = []

    def images():
        for i in range(5):
            read.append(i)
            yield np.full((8, 8), float(i), dtype=np.float32)

    results = predict_tiled_many(images(), identity, TileSettings(8, 0), batch_size=2)
    assert read == []
    first = next(results)
    assert read == [0, 1] and first[0, 0, 0] == 0.0
    assert [r[0, 0, 0] for r in results] == [1.0, 2.0, 3.0, 4.0]


def test_stitcher_accepts_tiles_in_any_order():
    image = _image((100, 90))
    grid = TileGrid.for_shape(image.shape, tile=32, overlap=6)
    stitcher = Stitcher(grid, channels=1)
    order = np.random.default_rng(2).permutation(len(grid))
    for index in order:
        stitcher.add(int(index), grid.extract(image, [int(index)])[0][..., None])
    np.testing.assert_array_equal(stitcher.result()[..., 0], image)


@pytest.mark.parametrize(
    ("tile", "overlap", "context", "grid", "expected"),
    [
        (512, "auto", 92, 16, (512, 192, 16)),  # margin 96 ≥ 92
        (256, "auto", 92, 16, (256, 192, 16)),  # a step of 64
        (256, "auto", 0, 16, (256, 16, 16)),  # 1 px to resample a zoomed tile, on the grid
        (256, "auto", 0, 1, (256, 2, 1)),
        (64, "auto", 2, 1, (64, 4, 1)),
        (256, 48, 92, 16, (256, 48, 16)),  # a fixed overlap is kept, origins still aligned
        (256, 48, None, 256, (256, 48, 1)),  # a step shorter than the grid: no alignment
        (256, "auto", None, 256, (256, 48, 1)),  # receptive field unknown: the old overlap
    ],
)
def test_tile_settings(tile, overlap, context, grid, expected):
    settings = tile_settings(tile, overlap, context_px=context, grid_px=grid)
    assert (settings.tile, settings.overlap, settings.align) == expected
    if overlap == "auto" and context is not None:
        assert settings.margin >= context


@pytest.mark.parametrize(
    ("tile", "overlap", "match"),
    [
        (192, "auto", r"tiles of 192 px are too small .* 92 px of context .* at least 208 px"),
        (256, "some", r"overlap must be a number of pixels or 'auto', got 'some'"),
        (256, 256, r"overlap must be in \[0, tile - align\] = \[0, 255\]"),
    ],
)
def test_tile_settings_errors(tile, overlap, match):
    with pytest.raises(ValueError, match=match):
        tile_settings(tile, overlap, context_px=92, grid_px=16)


# --- every error path -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tile": 0, "overlap": 0}, r"tile must be at least 1"),
        ({"tile": 64, "overlap": 64}, r"overlap must be in \[0, tile - align\] = \[0, 63\]"),
        ({"tile": 64, "overlap": -1}, r"overlap must be in \[0, tile - align\]"),
        ({"tile": 64, "overlap": 56, "align": 16}, r"= \[0, 48\], got overlap=56"),
        ({"tile": 64, "overlap": 8, "align": 24}, r"tile \(64 px\) must be a multiple of align"),
    ],
)
def test_bad_tile_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TileSettings(**kwargs)


def test_a_bad_batch_size_raises():
    match = r"batch_size must be at least 1"
    with pytest.raises(ValueError, match=match):
        predict_tiled(_image((10, 10)), identity, TileSettings(8, 2), batch_size=0)
    with pytest.raises(ValueError, match=match):
        predict_tiled_many([], identity, TileSettings(8, 2), batch_size=0)  # before next()


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (np.zeros((4, 4, 1), dtype=np.float32), r"expected a 2-D image, got shape \(4, 4, 1\)"),
        (np.zeros(4, dtype=np.float32), r"expected a 2-D image"),
        (np.zeros((4, 4), dtype=np.uint16), r"expected a float image.*forgot to normalize"),
        (np.zeros((0, 4), dtype=np.float32), r"image is empty"),
    ],
)
def test_bad_images_raise(image, match):
    with pytest.raises(ValueError, match=match):
        predict_tiled(image, identity, TileSettings(8, 2))


def test_bad_image_in_a_stream_raises_when_reached():
    results = predict_tiled_many(
        [_image((8, 8)), np.zeros((8, 8, 3), np.float32)], identity, TileSettings(8, 0)
    )
    with pytest.raises(ValueError, match="expected a 2-D image"):
        list(results)


def test_grid_errors():
    with pytest.raises(ValueError, match="expected a 2-D image shape"):
        TileGrid.for_shape((4, 4, 4), tile=8, overlap=0)  # type: ignore[arg-type]
    grid = TileGrid.for_shape((20, 20), tile=8, overlap=2)
    with pytest.raises(ValueError, match=r"image shape \(21, 20\) does not match"):
        grid.extract(_image((21, 20)), [0])
    with pytest.raises(IndexError, match="tile index 99 out of range"):
        grid.extract(_image((20, 20)), [99])


def test_stitcher_errors():
    grid = TileGrid.for_shape((20, 20), tile=8, overlap=2)
    with pytest.raises(ValueError, match="channels must be at least 1"):
        Stitcher(grid, channels=0)
    stitcher = Stitcher(grid, channels=2)
    with pytest.raises(ValueError, match=r"tile output has shape \(8, 8, 1\), expected"):
        stitcher.add(0, np.zeros((8, 8, 1), np.float32))
    with pytest.raises(IndexError, match="out of range"):
        stitcher.add(-1, np.zeros((8, 8, 2), np.float32))
    stitcher.add(0, np.zeros((8, 8, 2), np.float32))
    with pytest.raises(RuntimeError, match=f"{len(grid) - 1} of {len(grid)} tiles missing"):
        stitcher.result()


@pytest.mark.parametrize(
    "model",
    [
        lambda b: b[..., 0],  # channel axis dropped
        lambda b: b[:-1],  # extra outputs already dropped
        lambda b: b[:, :-1],  # cropped output
    ],
)
def test_model_with_wrong_output_shape_raises_model_error(model):
    with pytest.raises(ModelError, match=r"model returned shape .* expected \(batch, tile"):
        predict_tiled(_image((20, 20)), model, TileSettings(8, 2), batch_size=2)


# --- shared batches across threads, and running out of accelerator memory ---------------


def test_threads_share_batches_and_get_their_own_results():
    import threading

    from cellwatch.batching import SharedBatches

    images = [_image(s, seed=i) for i, s in enumerate([(20, 20)] * 6 + [(100, 70), (5, 9)])]
    model = conv_model(np.arange(9, dtype=np.float32).reshape(3, 3) / 9)
    recorder = Recorder(model)
    shared = SharedBatches(recorder, TileSettings(32, 8), batch_size=4)
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        try:
            results[i] = shared.predict(images[i])
        finally:
            shared.remove_worker()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(images))]
    shared.add_workers(len(threads))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, image in enumerate(images):
        expected = predict_tiled(image, model, TileSettings(32, 8), batch_size=4)
        np.testing.assert_array_equal(results[i], expected)
    tiles = sum(len(TileGrid.for_shape(im.shape, 32, 8)) for im in images)
    assert all(shape == (4, 32, 32, 1) for shape, _ in recorder.calls)
    assert len(recorder.calls) < tiles  # tiles of different images shared batches


def test_shared_batches_keep_origins_on_the_pooling_grid():
    import threading

    from cellwatch.batching import SharedBatches

    images = [_image(s, seed=i) for i, s in enumerate([(70, 90), (300, 130), (41, 41)])]
    shared = SharedBatches(pooling_model, TileSettings(32, 13, align=2), batch_size=3)
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        try:
            results[i] = shared.predict(images[i])
        finally:
            shared.remove_worker()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(images))]
    shared.add_workers(len(threads))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, image in enumerate(images):
        grid = TileGrid.for_shape(image.shape, 32, 13, align=2)
        whole = pooling_model(grid.canvas(image)[None, ..., None])[0][
            : image.shape[0], : image.shape[1]
        ]
        np.testing.assert_allclose(results[i], whole, rtol=0, atol=1e-6)


def test_a_lone_worker_flushes_a_partial_batch():
    from cellwatch.batching import SharedBatches

    shared = SharedBatches(identity, TileSettings(8, 0), batch_size=16)
    image = _image((8, 16))
    shared.add_workers(1)
    np.testing.assert_array_equal(shared.predict(image)[..., 0], image)


def test_a_partial_batch_waits_for_a_busy_worker_at_most_max_wait():
    import time

    from cellwatch.batching import SharedBatches

    recorder = Recorder()
    shared = SharedBatches(recorder, TileSettings(8, 0), batch_size=4, max_wait_s=0.2)
    shared.add_workers(2)  # the other one stays busy (say, writing) and queues nothing
    started = time.monotonic()
    image = _image((8, 8))
    np.testing.assert_array_equal(shared.predict(image)[..., 0], image)
    assert 0.2 <= time.monotonic() - started < 2
    with shared.paused():  # ... and a paused worker is not waited for at all
        pass
    shared.remove_worker()
    started = time.monotonic()
    shared.predict(image)
    assert time.monotonic() - started < 0.2 and len(recorder.calls) == 2


def test_a_failed_batch_fails_its_images_and_not_the_next():
    from cellwatch.batching import SharedBatches

    calls = []

    def flaky(batch):
        calls.append(1)
        if len(calls) == 1:
            raise ModelError("boom")
        return batch.copy()

    shared = SharedBatches(flaky, TileSettings(8, 0), batch_size=2)
    shared.add_workers(1)
    with pytest.raises(ModelError, match="boom"):
        shared.predict(_image((8, 24)))
    image = _image((8, 8))
    np.testing.assert_array_equal(shared.predict(image)[..., 0], image)


def test_out_of_memory_halves_the_batch_and_keeps_every_tile():
    from cellwatch.batching import split_on_out_of_memory
    from cellwatch.errors import TransientError

    sizes = []

    def small_gpu(batch):
        sizes.append(len(batch))
        if len(batch) > 2:
            raise RuntimeError("RESOURCE_EXHAUSTED: OOM when allocating tensor")
        return batch * 2

    predict = split_on_out_of_memory(small_gpu)
    batch = _image((8 * 5, 3)).reshape(8, 5, 3, 1)
    np.testing.assert_array_equal(predict(batch), batch * 2)
    assert sizes == [8, 4, 2, 2, 2, 2]
    sizes.clear()
    np.testing.assert_array_equal(predict(batch[:3]), batch[:3] * 2)  # padded to 2 + 2
    assert sizes == [2, 2]

    def no_gpu(batch):
        raise MemoryError

    with pytest.raises(TransientError, match="out of accelerator memory even for one tile"):
        split_on_out_of_memory(no_gpu)(batch)
    with pytest.raises(ValueError, match="not memory"):
        split_on_out_of_memory(lambda b: (_ for _ in ()).throw(ValueError("not memory")))(batch)


def test_stopwatch_busy_time_merges_overlapping_intervals():
    from cellwatch.timing import Stopwatch

    clock = iter([0.0, 1.0, 2.0, 3.0, 4.0, 10.0])
    watch = Stopwatch(clock=lambda: next(clock), keep_intervals=True)
    with watch("inference"), watch("inference"), watch("inference"):  # 0-10, 1-4, 2-3
        pass
    assert watch.busy("inference") == 10.0
    assert watch.totals["inference"] == 10.0 + 3.0 + 1.0
    assert watch.busy("inference", since=4.0) == 6.0
    with pytest.raises(RuntimeError, match="keeps no intervals"):
        Stopwatch().busy("inference")


# --- raw images normalized tile by tile as they are cut ----------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (7, 300), (255, 257), (3000, 17)])
@pytest.mark.parametrize(("tile", "overlap"), [(32, 8), (64, 0), (256, 48)])
def test_tiles_normalized_as_they_are_cut_equal_a_normalized_image(shape, tile, overlap):
    from cellwatch.preprocess import Normalization, normalize

    raw = np.random.default_rng(1).integers(0, 65535, shape).astype(np.uint16)
    recorder = Recorder()
    norm = Normalization.of(raw)
    got = predict_tiled(raw, recorder, TileSettings(tile, overlap), prepare=norm.apply_in_place)
    expected = predict_tiled(normalize(raw), identity, TileSettings(tile, overlap))
    np.testing.assert_array_equal(got, expected)
    assert all(dtype == np.float32 for _, dtype in recorder.calls)


def test_shared_batches_normalize_tiles_as_they_are_cut():
    from cellwatch.batching import SharedBatches
    from cellwatch.preprocess import Normalization, normalize

    raw = np.random.default_rng(2).integers(0, 255, (40, 70)).astype(np.uint8)
    shared = SharedBatches(identity, TileSettings(16, 4), batch_size=3)
    shared.add_workers(1)
    got = shared.predict(raw, Normalization.of(raw).apply_in_place)
    np.testing.assert_array_equal(got[..., 0], normalize(raw))


# --- tiles that fit the image: no whole tile for a small image, batches of one shape -----


@pytest.mark.parametrize(
    ("shape", "tile", "expected"),
    [((255, 257), 512, (256, 272)), ((520, 696), 768, (528, 704)), ((1, 40), 64, (16, 48))],
)
def test_an_image_smaller_than_a_tile_is_one_tile_of_its_own_canvas(shape, tile, expected):
    image = _image(shape)
    grid = TileGrid.for_shape(shape, tile, 192 if tile > 256 else 16, align=16, fit=True)
    assert len(grid) == 1
    assert grid.tile_shape == grid.canvas_shape == expected  # the grid, not a whole tile
    np.testing.assert_array_equal(grid.extract(image, [0])[0], grid.canvas(image))
    recorder = Recorder()
    out = predict_tiled(image, recorder, TileSettings(tile, 16, align=16, fit=True))
    assert [c[0] for c in recorder.calls] == [(8, *expected, 1)]
    np.testing.assert_array_equal(out[..., 0], image)


@pytest.mark.parametrize("length", [1, 15, 17, 255, 257, 520, 603, 1000, 1272, 2048, 4100])
@pytest.mark.parametrize(
    ("tile", "overlap", "align"),
    [(512, 192, 16), (768, 192, 16), (1024, 192, 16), (256, 48, 16), (64, 20, 8), (32, 8, 1)],
)
def test_fitted_tiles_keep_the_grid_and_the_margin_with_no_more_tiles(length, tile, overlap, align):
    grid = TileGrid.for_shape((length, 3), tile=tile, overlap=overlap, align=align, fit=True)
    full = TileGrid.for_shape((length, 3), tile=tile, overlap=overlap, align=align)
    side, canvas = grid.tile_shape[0], grid.canvas_shape[0]
    assert canvas == -(-length // align) * align  # the grid alone, never a whole tile
    assert side <= tile and side % align == 0 and len(grid.rows) == len(full.rows)
    assert side <= canvas  # an axis shorter than a tile is one tile of its own length
    margin = (tile - full.step) // 2
    assert grid.rows[-1][0] + side == canvas
    kept = []
    for start, keep_from, keep_to in grid.rows:
        assert start % align == 0 and start <= keep_from < keep_to <= start + side
        if start > 0:
            assert keep_from - start >= margin
        if start + side < canvas:
            assert start + side - keep_to >= margin
        kept += range(keep_from, keep_to)
    assert kept == list(range(length))


@pytest.mark.parametrize("shape", [(300, 500), (40, 41), (603, 1272)])
def test_fitted_tiles_equal_the_whole_canvas_for_a_pooling_network(shape):
    image = _image(shape)
    grid = TileGrid.for_shape(shape, 96, 30, align=2, fit=True)
    assert grid.canvas_shape == tuple(n + n % 2 for n in shape)
    whole = pooling_model(grid.canvas(image)[None, ..., None])[0][: shape[0], : shape[1]]
    tiled = predict_tiled(image, pooling_model, TileSettings(96, 30, align=2, fit=True))
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-6)


def test_fitted_batches_hold_one_shape_and_equal_sizes_share_them():
    sizes = [(20, 20)] * 5 + [(100, 70), (20, 20), (5, 9), (20, 20)]
    images = [_image(s, seed=i) for i, s in enumerate(sizes)]
    model = conv_model(np.arange(9, dtype=np.float32).reshape(3, 3) / 9)
    recorder = Recorder(model)
    outs = list(predict_tiled_many(images, recorder, TileSettings(32, 8, fit=True), batch_size=4))
    for image, out in zip(images, outs, strict=True):
        alone = predict_tiled(image, model, TileSettings(32, 8, fit=True), batch_size=4)
        np.testing.assert_array_equal(out, alone)
    big = TileGrid.for_shape((100, 70), 32, 8, fit=True)
    assert len(big) == 12 and big.tile_shape == (31, 29)
    # four 20² images fill a batch; the fifth waits for the sixth 20² image, not for the
    # 100 × 70 one's three full batches; a lone shape runs when another shape arrives
    assert [c[0][1:3] for c in recorder.calls] == [
        (20, 20), (31, 29), (31, 29), (31, 29), (20, 20), (5, 9), (20, 20)
    ]  # fmt: skip


def test_threads_with_images_of_two_sizes_share_batches_by_shape():
    import threading

    from cellwatch.batching import SharedBatches

    sizes = [(20, 20)] * 8 + [(40, 24)] * 4
    images = [_image(s, seed=i) for i, s in enumerate(sizes)]
    recorder = Recorder()
    shared = SharedBatches(recorder, TileSettings(32, 0, fit=True), batch_size=4, max_wait_s=5)
    results: dict[int, np.ndarray] = {}
    start = threading.Barrier(len(images))

    def work(i: int) -> None:
        try:
            start.wait()
            results[i] = shared.predict(images[i])
        finally:
            shared.remove_worker()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(images))]
    shared.add_workers(len(threads))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, image in enumerate(images):
        np.testing.assert_array_equal(results[i][..., 0], image)
    # 8 one-tile 20² images in 2 full batches; 4 images of 40 × 24 (two 20 × 24 tiles) in 2
    assert sorted(c[0] for c in recorder.calls) == [(4, 20, 20, 1)] * 2 + [(4, 20, 24, 1)] * 2
