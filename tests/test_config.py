from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cellwatch.config import Config, load_config, override
from cellwatch.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_documented_config_is_the_defaults():
    loaded = load_config(REPO / "config.yaml")
    assert dataclasses.replace(loaded, source="<defaults>") == Config()


def test_values_are_read_and_ints_accepted_for_floats(tmp_path):
    cfg = load_config(write(tmp_path, "tiling:\n  overlap: 16\nnormalize:\n  low_percentile: 2\n"))
    assert cfg.tiling.overlap == 16
    assert cfg.normalize.low_percentile == 2.0
    assert cfg.source == str(tmp_path / "config.yaml")


def test_empty_file_gives_defaults(tmp_path):
    assert dataclasses.replace(load_config(write(tmp_path, "")), source="<defaults>") == Config()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("tilling:\n  overlap: 3\n", r"unknown key 'tilling'"),
        (
            "tiling:\n  overlapp: 3\n",
            r"unknown key 'tiling.overlapp'.*known keys here: batch_size, images_at_once, overlap, tile_size",
        ),
        ("tiling:\n  overlap: many\n", r"tiling.overlap must be int or auto, got 'many'"),
        ("tiling:\n  overlap: true\n", r"tiling.overlap must be int"),
        (
            "tiling:\n  overlap: 1530\n",
            r"tiling.overlap must be auto, or ≥ 0 and at most the tile size less 16 \(1520\)",
        ),
        ("tiling:\n  tile_size: 100\n", r"tiling.tile_size must be a multiple of 16"),
        ("tiling:\n  batch_size: 0\n", r"tiling.batch_size must be at least 1"),
        (
            "postprocess:\n  interior_threshold: -0.1\n",
            r"postprocess.interior_threshold must be between 0 and 1",
        ),
        ("postprocess:\n  min_cell_area_px: -1\n", r"min_cell_area_px must not be negative"),
        (
            "normalize:\n  low_percentile: 99\n  high_percentile: 1\n",
            r"low_percentile < high_percentile",
        ),
        ("scale:\n  diameter_px: -3\n", r"scale.diameter_px must be positive"),
        ("scale:\n  mode: guess\n", r"scale.mode must be one of auto, none"),
        (
            "model:\n  path: /nowhere/model.keras\n",
            r"model.path no model file at /nowhere/model.keras",
        ),
        ("input:\n  extensions: .tif\n", r"input.extensions must be a list"),
        ("metrics:\n  port: 70000\n", r"metrics.port must be a port number from 1 to 65535"),
        ("metrics:\n  port: '9101'\n", r"metrics.port must be int"),
        ("metrics:\n  address: ''\n", r"metrics.address must not be empty"),
        ("- just\n- a list\n", r"must be a mapping"),
        ("tiling: [\n", r"is not valid YAML"),
    ],
)
def test_bad_config_names_key_and_file(tmp_path, text, match):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as info:
        load_config(path)
    assert str(path) in str(info.value) or "YAML" in str(info.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")


def test_override_replaces_and_validates():
    cfg = override(Config(), **{"tiling.overlap": 8, "output.dir": None})
    assert cfg.tiling.overlap == 8
    assert cfg.output.dir == Config().output.dir
    with pytest.raises(ConfigError, match=r"unknown setting .tiling\.nope."):
        override(Config(), **{"tiling.nope": 1})
    with pytest.raises(ConfigError, match=r"tiling\.overlap"):
        override(Config(), **{"tiling.overlap": 1530})


def test_settings_hash_tracks_settings_that_change_counts():
    base = Config()
    assert base.settings_hash() == Config().settings_hash()
    assert (
        override(base, **{"postprocess.min_cell_area_px": 5}).settings_hash()
        != base.settings_hash()
    )
    assert override(base, **{"output.dir": "elsewhere"}).settings_hash() == base.settings_hash()


def test_report_settings_are_checked_at_load(tmp_path):
    path = write(tmp_path, "report:\n  timezone: Mars/Olympus\n")
    with pytest.raises(ConfigError, match=r"config\.yaml: .*Mars/Olympus"):
        load_config(path)
