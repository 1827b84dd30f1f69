"""Tiles sized by memory: large images get smaller tiles, and the labels never change."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import discs

from cellwatch import tiling
from cellwatch.config import Config, override
from cellwatch.model import load_model
from cellwatch.pipeline import Segmenter, process_images
from cellwatch.tiling import tile_side_for_memory

SIDES = [512, 2048, 4096, 5000, 6144, 7000, 8192, 16384]


@pytest.mark.parametrize("precision", ["f32", "bf16", "int8"])
def test_the_tile_shrinks_as_the_image_grows_and_keeps_the_modelled_peak(precision):
    sides = [tile_side_for_memory(1536, s * s, precision) for s in SIDES]
    assert sides == sorted(sides, reverse=True)
    assert all(side % 16 == 0 and 960 <= side <= 1536 for side in sides)
    assert sides[-1] == 960  # an image too large for the budget keeps the smallest tile
    for s, side in zip(SIDES, sides, strict=True):
        peak = (
            tiling.FIXED_MB
            + tiling.IMAGE_BYTES_PER_PX * s * s / 1e6
            + tiling.TILE_BYTES_PER_PX[precision] * side * side / 1e6
        )
        assert side == 960 or peak <= tiling.MEMORY_BUDGET_MB


def test_the_setting_bounds_the_tile_and_f32_gets_smaller_tiles_than_bf16():
    assert tile_side_for_memory(1536, 2048 * 2048, "bf16") == 1536
    assert tile_side_for_memory(1536, 2048 * 2048, "f32") < 1536
    assert tile_side_for_memory(768, 512 * 512, "bf16") == 768  # never above the setting
    assert tile_side_for_memory(768, 16384 * 16384, "bf16") == 768  # nor below a small one


class Recorder:
    """A network's predict function that remembers the shape of every batch."""

    def __init__(self, model) -> None:
        self.model, self.shapes = model, []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.shapes.append(batch.shape[1:3])
        return np.asarray(self.model.network(batch, training=False))


def _segmenter(model_path: Path) -> tuple[Segmenter, Recorder]:
    config = override(Config(), **{"tiling.tile_size": 256, "tiling.overlap": 16})
    model = load_model(model_path)
    recorder = Recorder(model)
    return Segmenter(config, model, recorder), recorder


def test_a_large_image_gets_smaller_tiles_and_the_same_labels(threshold_model, monkeypatch):
    centres = [(y, x) for y in range(40, 600, 90) for x in range(40, 600, 90)]
    image = discs((600, 600), centres, 12)[0].astype(np.float32) / 255
    whole, seen = _segmenter(threshold_model)
    expected = whole.labels_at(image, 1.0)
    assert max(max(s) for s in seen.shapes) > 128

    import cellwatch.segmenter

    asked = []

    def small(largest: int, image_px: int, precision: str, *, align: int = 16) -> int:
        asked.append((largest, image_px, precision))
        return 128

    monkeypatch.setattr(cellwatch.segmenter, "tile_side_for_memory", small)
    capped, seen = _segmenter(threshold_model)
    np.testing.assert_array_equal(capped.labels_at(image, 1.0), expected)
    assert seen.shapes and max(max(s) for s in seen.shapes) <= 128
    assert asked == [(256, 600 * 600, "f32")]


def test_images_counted_together_are_tiled_by_their_own_size(
    threshold_model, monkeypatch, tmp_path
):
    """Tiles of images that share batches (process_images) are sized per image too."""
    import cellwatch.segmenter

    monkeypatch.setattr(
        cellwatch.segmenter,
        "tile_side_for_memory",
        lambda largest, px, precision, align=16: 128 if px > 100_000 else largest,
    )
    paths = []
    for i, side in enumerate([600, 200, 600]):
        image, _ = discs((side, side), [(50, 50), (150, 150)], 12)
        paths.append(tmp_path / f"{i}.tif")
        tifffile.imwrite(paths[-1], image)
    segmenter, seen = _segmenter(threshold_model)
    config = segmenter.config
    results = process_images(
        paths, config=config, segmenter=segmenter, out_dir=tmp_path / "out", job_ids=["a", "b", "c"]
    )
    assert [r.row["cell_count"] for r in results] == [2, 2, 2]
    assert (200, 200) in seen.shapes  # the small image: one tile of its own canvas
    assert max(max(s) for s in seen.shapes if s != (200, 200)) <= 128
