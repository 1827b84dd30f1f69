"""Outline growth: cells grown outwards after labelling, never into one another, by a
distance a fine-tuned model's card carries (measured on its training corrections) or the
config sets."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import tifffile
from conftest import discs, save_threshold_model
from skimage.segmentation import expand_labels

from cellwatch import postprocess
from cellwatch.config import Config, PostprocessConfig, ScaleConfig, load_config
from cellwatch.errors import ConfigError
from cellwatch.model import load_model, read_card, write_card
from cellwatch.pipeline import Segmenter
from cellwatch.postprocess import grow_outlines, outline_growth
from cellwatch.storage.imageio import find_pairs
from cellwatch.training import shapes
from cellwatch.training.shapes import Counted, choose_growth, measure_growth


def random_labels(rng: np.random.Generator) -> np.ndarray:
    height, width = rng.integers(1, 50, 2)
    labels = np.zeros((height, width), np.int32)
    for k in range(rng.integers(0, 25)):
        y, x = rng.integers(0, height), rng.integers(0, width)
        labels[y : y + rng.integers(1, 6), x : x + rng.integers(1, 6)] = k + 1
    return labels


def test_growing_in_bands_is_expand_labels_on_the_whole_image(monkeypatch):
    rng = np.random.default_rng(0)
    for _ in range(150):
        labels = random_labels(rng)
        distance = float(rng.choice([0.5, 1.0, 1.5, 2.0, 3.7]))
        wanted = expand_labels(labels, distance)
        # bands from one row (thinner than the margin) to the whole image
        monkeypatch.setattr(postprocess, "_BAND_PIXELS", int(rng.integers(1, 300)))
        grown = grow_outlines(labels.copy(), distance)
        np.testing.assert_array_equal(grown, wanted)
        assert set(np.unique(grown)) - {0} == set(np.unique(labels)) - {0}  # the same cells
        cells = labels > 0
        np.testing.assert_array_equal(grown[cells], labels[cells])  # never into another cell


def test_no_growth_leaves_the_labels_as_they_are():
    labels = np.arange(12, dtype=np.int32).reshape(3, 4)
    assert grow_outlines(labels, 0.0) is labels


def test_the_config_wins_over_the_card_and_odd_card_values_grow_nothing():
    assert outline_growth(None, {"outline_growth_px": 2}) == 2.0
    assert outline_growth(1.5, {"outline_growth_px": 2}) == 1.5
    for odd in ("two", True, -1, 99, None):
        assert outline_growth(None, {"outline_growth_px": odd}) == 0.0


def test_the_config_key_is_checked_and_unset_leaves_the_settings_hash_alone(tmp_path):
    assert (
        dataclasses.replace(
            Config(), postprocess=PostprocessConfig(outline_growth_px=None)
        ).settings_hash()
        == Config().settings_hash()
    )
    grown = dataclasses.replace(Config(), postprocess=PostprocessConfig(outline_growth_px=1.0))
    assert grown.settings_hash() != Config().settings_hash()
    path = tmp_path / "config.yaml"
    path.write_text("postprocess:\n  outline_growth_px: 9\n")
    with pytest.raises(ConfigError, match="outline_growth_px"):
        load_config(path)


@pytest.fixture
def grown_model(tmp_path):
    """The threshold model (exact outlines, no size: images keep their own scale) with a
    card asking for 2 px of growth."""
    path = save_threshold_model(tmp_path / "grown.keras")
    write_card(path, {**read_card(path), "outline_growth_px": 2.0})
    return path


@pytest.mark.parametrize("zoom", [None, 0.5])
def test_the_card_grows_the_counted_cells_by_network_pixels(grown_model, zoom):
    image, _ = discs((96, 96), [(24, 24), (24, 70), (70, 40)], 8)
    config = dataclasses.replace(Config(), scale=ScaleConfig(scale=zoom))
    found = Segmenter(config, load_model(grown_model)).segment(image).labels
    plain_config = dataclasses.replace(config, postprocess=PostprocessConfig(outline_growth_px=0))
    plain = Segmenter(plain_config, load_model(grown_model)).segment(image).labels
    assert found.max() == plain.max() == 3  # the same cells
    # 2 px at the network's scale: 2 px of the image at zoom 1, 4 px at zoom 0.5
    step = 2.0 / (zoom or 1.0)
    np.testing.assert_array_equal(found, expand_labels(plain, step))


def test_the_growth_chosen_is_the_one_that_fits_the_masks():
    truth = discs((64, 64), [(16, 16), (16, 46), (46, 30)], 9)[1]
    inner = discs((64, 64), [(16, 16), (16, 46), (46, 30)], 6)[1]  # outlines 3 px inside
    chosen, scores = choose_growth([Counted(truth, inner, 1.0)])
    assert 2.0 <= chosen <= 3.0 and scores[f"{chosen:g}"] == max(scores.values())
    assert scores["0"] < scores[f"{chosen:g}"]
    # the same labels found at zoom 0.5: half the growth, in the network's pixels
    assert choose_growth([Counted(truth, inner, 0.5)])[0] == pytest.approx(chosen / 2, abs=0.25)
    exact, _ = choose_growth([Counted(truth, truth, 1.0)])
    assert exact == 0.0
    assert choose_growth([Counted(np.zeros_like(truth), inner, 1.0)]) == (0.0, {})


def test_the_growth_is_measured_through_the_counting_pipeline(tmp_path):
    """Nuclei with a dim rim the masks include: the threshold model labels only their
    bright cores, and the growth measured brings the outlines out to the masks'."""
    model = save_threshold_model(tmp_path / "threshold.keras")
    for folder in ("images", "masks"):
        (tmp_path / "c" / folder).mkdir(parents=True)
    centres = [(20, 20), (20, 60), (60, 24), (58, 62)]
    for i in range(2):
        _, rims = discs((84, 84), centres, 10)
        _, cores = discs((84, 84), centres, 8)
        image = np.where(cores > 0, 220, np.where(rims > 0, 70, 10)).astype(np.uint8)
        tifffile.imwrite(tmp_path / "c" / "images" / f"n{i}.tif", image)
        tifffile.imwrite(tmp_path / "c" / "masks" / f"n{i}.tif", rims.astype(np.uint16))
    pairs = find_pairs(tmp_path / "c" / "images", tmp_path / "c" / "masks")
    measured = measure_growth(model, pairs, None)
    fits = measured["fits_training"]
    assert 1.0 <= fits <= 2.25 and measured["on"] == ["n0.tif", "n1.tif"]
    assert measured["chosen"] == fits + shapes.UNSEEN_MARGIN_PX  # for images never trained on
    assert measured["scores"]["0"] < measured["scores"][f"{fits:g}"]
    json.dumps(measured)  # goes into the card as it is
    assert set(measured["scores"]) == {f"{g:g}" for g in shapes.CANDIDATES}


def test_the_growth_is_measured_through_the_card_the_model_will_count_with(tmp_path):
    """Dark nuclei on a light background and a model whose card says to invert the plane:
    counted without that card, the model would find the background, not the nuclei."""
    model = save_threshold_model(tmp_path / "brightfield.keras")
    for folder in ("images", "masks"):
        (tmp_path / "c" / folder).mkdir(parents=True)
    centres = [(20, 20), (20, 60), (60, 24), (58, 62)]
    image, labels = discs((84, 84), centres, 9)
    tifffile.imwrite(tmp_path / "c" / "images" / "dark.tif", (255 - image).astype(np.uint8))
    tifffile.imwrite(tmp_path / "c" / "masks" / "dark.tif", labels.astype(np.uint16))
    pairs = find_pairs(tmp_path / "c" / "images", tmp_path / "c" / "masks")
    card = {**read_card(model), "input": {"channel": None, "invert": True}}
    card["outline_growth_px"] = 3.0  # a base's growth is not counted with while measuring
    measured = shapes.settle_growth(model, card, pairs, None)
    assert measured["scores"]["0"] == pytest.approx(1.0)  # every nucleus found exactly
    assert card["outline_growth_px"] == measured["chosen"] == 0.0
