"""Doubtful cells: a cell whose interior probability never reaches the peak threshold is
dropped, at the threshold a fine-tuned model's card carries (``cellwatch finetune`` writes
it) or the config sets (``postprocess.peak_threshold``).

The threshold model's interior probability rises steeply with the normalized intensity
(about 0.92 at 0.53, above 0.99 at 0.6), so a dim disc is a cell it seeds but doubts, and a
bright disc one it is sure of."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import discs

import cellwatch
from cellwatch.config import Config, PostprocessConfig, load_config
from cellwatch.errors import ConfigError
from cellwatch.model import load_model, read_card, write_card
from cellwatch.pipeline import Segmenter
from cellwatch.postprocess import CARD_PEAK_KEY, peak_threshold


def sure_and_dim() -> np.ndarray:
    """A bright disc and a dim one (normalized about 0.53) on a dark background."""
    _, bright = discs((80, 120), [(40, 30)], 10)
    _, dim = discs((80, 120), [(40, 90)], 10)
    return np.where(bright > 0, 255, np.where(dim > 0, 135, 0)).astype(np.uint8)


@pytest.fixture(scope="module")
def doubting_model(threshold_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The threshold model with the card ``cellwatch finetune`` writes: peak 0.95."""
    path = tmp_path_factory.mktemp("doubting") / "doubting.keras"
    shutil.copy(threshold_model, path)
    write_card(path, {**read_card(threshold_model), CARD_PEAK_KEY: 0.95})
    return path


def counted(model: Path, **postprocess: float | None) -> int:
    config = dataclasses.replace(Config(), postprocess=PostprocessConfig(**postprocess))
    return int(Segmenter(config, load_model(model)).segment(sure_and_dim()).labels.max())


def test_the_card_drops_the_cells_the_network_doubts_and_the_config_wins(
    threshold_model, doubting_model
):
    assert counted(threshold_model) == 2  # the bundled model's way: every seeded cell kept
    assert counted(doubting_model) == 1
    assert counted(doubting_model, peak_threshold=0.0) == 2  # the config wins over the card
    assert counted(threshold_model, peak_threshold=0.95) == 1
    assert counted(threshold_model, peak_threshold=0.9) == 2  # the dim disc peaks above 0.9
    # the Python API counts as the service does
    result = cellwatch.count(sure_and_dim(), model=doubting_model)
    assert result.row["cell_count"] == 1 and result.labels.max() == 1


def test_odd_card_values_drop_nothing():
    assert peak_threshold(None, {}) == 0.0
    assert peak_threshold(None, {CARD_PEAK_KEY: 0.95}) == 0.95
    assert peak_threshold(0.5, {CARD_PEAK_KEY: 0.95}) == 0.5
    for odd in ("high", True, -0.1, 1.0, 3, None):
        assert peak_threshold(None, {CARD_PEAK_KEY: odd}) == 0.0


def test_the_config_key_is_checked_and_unset_leaves_the_settings_hash_alone(tmp_path):
    unset = dataclasses.replace(Config(), postprocess=PostprocessConfig(peak_threshold=None))
    assert unset.settings_hash() == Config().settings_hash() == "29ca34b2d3ff"
    set_ = dataclasses.replace(Config(), postprocess=PostprocessConfig(peak_threshold=0.95))
    assert set_.settings_hash() != Config().settings_hash()
    path = tmp_path / "config.yaml"
    path.write_text("postprocess:\n  peak_threshold: 0.95\n")
    assert load_config(path).postprocess.peak_threshold == 0.95
    for bad in ("1.0", "-0.5", "high"):
        path.write_text(f"postprocess:\n  peak_threshold: {bad}\n")
        with pytest.raises(ConfigError, match="peak_threshold"):
            load_config(path)
