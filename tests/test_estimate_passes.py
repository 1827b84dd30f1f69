"""The size estimate's pyramid stops once its first two levels confirm each other: the
smaller levels are not run, and the estimate is the one every level gives."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
from test_scale import nuclei

from cellwatch import segmenter as segmenter_module
from cellwatch.config import Config
from cellwatch.model import load_model
from cellwatch.pipeline import Segmenter
from cellwatch.preprocess import normalize
from cellwatch.scale import PYRAMID, Reading, choose_reading
from cellwatch.segmenter import _confirmed


@pytest.fixture(scope="module")
def bundled() -> Segmenter:
    return Segmenter(Config(), load_model())


def estimate(segmenter: Segmenter, image: np.ndarray) -> tuple[float | None, list[tuple]]:
    """The estimate, and the shapes of the tile batches the network was given."""
    shapes: list[tuple] = []
    plane = segmenter.predict_plane

    def spy(batch: np.ndarray) -> np.ndarray:
        shapes.append(batch.shape)
        return plane(batch)

    with mock.patch.object(segmenter, "predict_plane", spy):
        return segmenter.estimate_diameter(image), shapes


@pytest.mark.parametrize("diameter", [20, 90])
def test_the_smaller_levels_run_only_without_confirmation(bundled, diameter):
    image = normalize(nuclei(diameter, 512 // round(diameter * 1.5 + 4))[0])
    with mock.patch.object(segmenter_module, "_confirmed", lambda readings: False):
        every_level, all_shapes = estimate(bundled, image)
    found, shapes = estimate(bundled, image)
    assert found == every_level  # the same estimate, to the last bit
    assert all(shapes.count(s) <= all_shapes.count(s) for s in shapes)  # no other passes
    if diameter == 20:  # nuclei the network sees whole at 1 and ½: ¼ and below not run
        assert len(shapes) < len(all_shapes)
        assert min(s[1] for s in shapes) > min(s[1] for s in all_shapes)


def test_stopping_at_the_first_confirmed_pair_keeps_choose_readings_answer():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        levels = [lv for lv in PYRAMID if rng.random() < 0.8]  # a level may find too few
        readings = [Reading(lv, float(rng.choice([10, 11, 14, 20, 29, 40]))) for lv in levels]
        made: list[Reading] = []
        for reading in readings:  # as estimate_diameter makes them: largest zoom first
            made.append(reading)
            if _confirmed(made):
                break
        assert choose_reading(made) == choose_reading(readings), readings
