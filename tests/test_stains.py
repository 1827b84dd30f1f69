"""RGB brightfield stains: ``input.channel: hematoxylin`` (eosin, dab, gray) makes one plane
out of a colour image, and a model card's input channel fills in for a default config."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tifffile

from cellwatch.config import Config, InputConfig, with_card_input
from cellwatch.errors import BadInputError
from cellwatch.storage.imageio import read_image
from cellwatch.storage.pixels import stain_plane

PURPLE, PINK, WHITE = (70, 40, 140), (235, 140, 200), (255, 255, 255)  # nucleus, cytoplasm, glass


def he_tile() -> np.ndarray:
    """A 2×3 RGB image: a hematoxylin nucleus, eosin cytoplasm and glass, twice over."""
    return np.array([[PURPLE, PINK, WHITE], [PURPLE, PINK, WHITE]], dtype=np.uint8)


def test_hematoxylin_is_bright_on_nuclei_and_eosin_on_cytoplasm():
    tile = he_tile()
    hematoxylin, eosin = stain_plane(tile, "hematoxylin"), stain_plane(tile, "Eosin ")
    assert hematoxylin.dtype == np.float32 and hematoxylin.shape == (2, 3)
    assert hematoxylin[0, 0] > hematoxylin[0, 1] >= hematoxylin[0, 2]  # nucleus, cytoplasm, glass
    assert eosin[0, 1] > eosin[0, 2] and eosin[0, 1] > eosin[0, 0] * 0.5
    gray = stain_plane(tile, "gray")
    assert gray[0, 0] < gray[0, 1] < gray[0, 2]  # luminance: nuclei stay dark
    assert np.isclose(gray[0, 2], 1.0)


def test_unknown_stain_and_non_rgb_are_refused():
    with pytest.raises(ValueError, match=r"unknown stain 'haematoxylin'.*hematoxylin"):
        stain_plane(he_tile(), "haematoxylin")
    with pytest.raises(ValueError, match=r"needs an RGB image .* got shape \(2, 3\)"):
        stain_plane(np.zeros((2, 3)), "dab")


def test_reading_an_rgb_file_as_a_stain(tmp_path):
    path = tmp_path / "he.tif"
    tifffile.imwrite(path, np.tile(he_tile(), (4, 4, 1)), photometric="rgb")
    data = read_image(path, channel="Hematoxylin")
    np.testing.assert_allclose(
        data.pixels, stain_plane(np.tile(he_tile(), (4, 4, 1)), "hematoxylin")
    )
    assert "hematoxylin from RGB" in data.note
    with pytest.raises(BadInputError, match="channels that differ"):
        read_image(path)  # a colour image still needs a channel


def test_a_stain_of_a_gray_image_is_a_clear_error(tmp_path):
    path = tmp_path / "gray.tif"
    tifffile.imwrite(path, np.zeros((8, 8), np.uint8))
    with pytest.raises(BadInputError, match=r"has 1 channel.*not the 3 of an RGB image.*'dab'"):
        read_image(path, channel="dab")


def test_the_card_input_channel_fills_in_for_the_default_only():
    card = {"input": {"channel": "hematoxylin"}}
    assert with_card_input(Config(), card).input.channel == "hematoxylin"
    chosen = dataclasses.replace(Config(), input=InputConfig(channel="eosin"))
    assert with_card_input(chosen, card).input.channel == "eosin"
    assert with_card_input(Config(), {}) == Config()
