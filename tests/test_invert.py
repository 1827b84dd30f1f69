"""Dark cells on a light background (brightfield): the plane inverted for the network, as
a fine-tuned model's card says (``input.invert``), at counting, scoring and training alike.

The threshold model calls a pixel "interior" when its normalized intensity is above 0.5,
so what it finds shows exactly which way round it saw the image."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from conftest import discs

import cellwatch
from cellwatch.cli import main
from cellwatch.config import Config, load_config, override, with_card_input
from cellwatch.errors import ConfigError
from cellwatch.model import read_card, write_card
from cellwatch.preprocess import Normalization, normalize
from cellwatch.runtime import resolve
from cellwatch.training.crops import cells_are_darker
from cellwatch.training.judge import score_model
from cellwatch.training.provenance import measure_polarity

CENTRES = [(30, 30), (30, 90), (90, 60)]
DEFAULT_HASH = "29ca34b2d3ff"  # Config().settings_hash() before input.invert existed


def dark_cells() -> tuple[np.ndarray, np.ndarray]:
    """Three dark nuclei on a bright background, and their labels."""
    bright, labels = discs((120, 120), CENTRES, 10)
    return (255 - bright).astype(np.uint8), labels


@pytest.fixture(scope="module")
def inverted_model(threshold_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The threshold model with the card ``cellwatch finetune`` writes for dark cells."""
    path = tmp_path_factory.mktemp("inverted") / "brightfield.keras"
    shutil.copy(threshold_model, path)
    write_card(path, {**read_card(threshold_model), "input": {"channel": None, "invert": True}})
    return path


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_the_inverted_map_is_that_of_the_negated_image(dtype):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 250, (60, 70)).astype(dtype)
    inverted = Normalization.of(image, 1.0, 99.8, invert=True).apply(image)
    negated = normalize(-image.astype(np.float32), 1.0, 99.8)
    np.testing.assert_allclose(inverted, negated, atol=1e-5)
    flat = np.full((8, 8), 7, dtype)
    assert not Normalization.of(flat, invert=True).apply(flat).any()  # flat: zeros


def test_which_way_round_the_cells_are_is_measured_on_the_plane_training_reads(tmp_path):
    dark, labels = dark_cells()
    rgb = np.where((labels > 0)[..., None], [70, 40, 140], [250, 250, 250]).astype(np.uint8)
    files = {"dark": dark, "bright": 255 - dark, "rgb": rgb}
    for name, image in files.items():
        tifffile.imwrite(tmp_path / f"{name}.tif", image)
    masks = {"cells": labels, "none": np.zeros_like(labels), "all": np.ones_like(labels)}
    for name, mask in masks.items():
        tifffile.imwrite(tmp_path / f"{name}-mask.tif", mask.astype(np.uint16))

    def darker(image: str, mask: str = "cells", channel: str | None = None) -> bool | None:
        return cells_are_darker(
            tmp_path / f"{image}.tif", tmp_path / f"{mask}-mask.tif", channel=channel
        )

    assert darker("dark") is True and darker("bright") is False
    assert darker("dark", "none") is None and darker("dark", "all") is None
    # purple nuclei on glass: bright in the hematoxylin plane, dark in the luminance
    assert darker("rgb", channel="hematoxylin") is False
    assert darker("rgb", channel="gray") is True
    pairs = [(tmp_path / f"{n}.tif", tmp_path / f"{m}-mask.tif") for n, m in
             [("dark", "cells"), ("dark", "none"), ("bright", "cells"), ("dark", "cells")]]  # fmt: skip
    polarity = measure_polarity(pairs, None)
    assert (polarity.dark, polarity.measured, polarity.dark_cells) == (2, 3, True)


def test_a_model_taught_on_dark_cells_counts_them_inverted(threshold_model, inverted_model):
    dark, labels = dark_cells()
    plain = cellwatch.count(dark, model=threshold_model)
    assert plain.cell_count != 3  # the bright background is what it finds
    taught = cellwatch.count(dark, model=inverted_model)
    assert taught.cell_count == 3
    assert np.array_equal(taught.labels > 0, labels > 0)
    # the row says it counted inverted; an unchanged config keeps the hash it always had
    assert Config().settings_hash() == DEFAULT_HASH
    assert plain.row["settings_hash"] == resolve(Config()).settings_hash()
    inverted = resolve(override(Config(), **{"input.invert": True})).settings_hash()
    assert taught.row["settings_hash"] == inverted != plain.row["settings_hash"]
    # the config's input.invert: false wins over the card
    kept = cellwatch.count(
        dark, model=inverted_model, config=override(Config(), **{"input.invert": False})
    )
    assert kept.cell_count == plain.cell_count


def test_predict_and_the_fine_tunes_scoring_read_the_card(tmp_path, inverted_model):
    dark, labels = dark_cells()
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    tifffile.imwrite(tmp_path / "images" / "a.tif", dark)
    tifffile.imwrite(tmp_path / "masks" / "a.tif", labels.astype(np.uint16))
    out = tmp_path / "out"
    argv = ["predict", str(tmp_path / "images"), "--out", str(out), "--quiet"]
    assert main([*argv, "--model", str(inverted_model)]) == 0
    assert pd.read_csv(out / "ledger.csv")["cell_count"].tolist() == [3]
    pair = [(tmp_path / "images" / "a.tif", tmp_path / "masks" / "a.tif")]
    assert score_model(inverted_model, pair, None)["accuracy_0.5"] == 1.0


def test_input_invert_in_the_config(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("input:\n  invert: true\n")
    assert load_config(config).input.invert is True
    assert with_card_input(load_config(config), {"input": {"invert": False}}).input.invert is True
    assert with_card_input(Config(), {"input": {"invert": True}}).input.invert is True
    assert with_card_input(Config(), {"input": {"channel": "gray"}}).input.invert is None
    config.write_text("input:\n  invert: sometimes\n")
    with pytest.raises(ConfigError, match=r"input\.invert must be bool"):
        load_config(config)
