"""The Python API: cellwatch.count and cellwatch.count_file give what `cellwatch predict`
records, through the same code; importing cellwatch stays cheap."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from conftest import discs

import cellwatch
from cellwatch.cli import main
from cellwatch.config import Config, override
from cellwatch.errors import BadInputError
from cellwatch.storage import imageio, ledger

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "images"
GOLDEN = Path(__file__).resolve().parent / "data" / "samples_golden.json"
SAMPLE = SAMPLES / "76c44d1addac.tif"  # 256×256, the quickest of the three
#: Ledger columns that say when and as which job a row was written, not what was counted.
BOOKKEEPING = {"processed_at", "duration_s", "job_id", "labels", "overlay"}


def test_importing_cellwatch_loads_no_framework():
    code = (
        "import sys, cellwatch\n"
        "heavy = [m for m in ('tensorflow', 'keras', 'jax', 'torch', 'distributed', 'pandas')"
        " if m in sys.modules]\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY=\n" in run.stdout, run.stdout + run.stderr[-2000:]


def test_the_public_names_are_the_api():
    assert set(cellwatch.__all__) == {
        "Result",
        "__version__",
        "count",
        "count_file",
        "load_model",
    }


@pytest.fixture(scope="module")
def predicted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `cellwatch predict` records for the sample images, with the bundled model."""
    out = tmp_path_factory.mktemp("predicted")
    assert main(["predict", str(SAMPLES), "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def predicted_f32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same at full (f32) precision, the arithmetic the golden rows were recorded with."""
    out = tmp_path_factory.mktemp("predicted_f32")
    config = out / "f32.yaml"
    config.write_text("inference:\n  precision: f32\n")
    argv = ["predict", str(SAMPLES), "--out", str(out), "--config", str(config), "--quiet"]
    assert main(argv) == 0
    return out


def _missing(value: object) -> bool:
    return (
        value is None
        or value is pd.NA
        or (isinstance(value, str) and value == "")
        or (isinstance(value, float) and math.isnan(value))
    )


def _same(a: object, b: object) -> bool:
    """Equal as the ledger writes them: numbers to 6 significant digits, empty as None."""
    if _missing(a) or _missing(b):
        return _missing(a) and _missing(b)
    if isinstance(a, int | float | np.number) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-5, abs_tol=1e-9)
    return str(a) == str(b)


def test_count_equals_what_predict_records(predicted: Path):
    """The same labels, the same ledger row and the same cells, for an array in."""
    row = ledger.read(predicted / "ledger.csv").set_index("image").loc[str(SAMPLE)]
    result = cellwatch.count(imageio.read_image(SAMPLE).pixels)
    written = tifffile.imread(predicted / "labels" / f"{SAMPLE.stem}.tif")
    np.testing.assert_array_equal(result.labels, written)
    assert result.cell_count == row["cell_count"] > 0
    compared = set(result.row) - BOOKKEEPING
    assert {"cell_count", "scale", "familiarity", "focus_score", "model"} <= compared
    for name in compared:
        assert _same(result.row[name], row[name]), (name, result.row[name], row[name])
    assert set(result.row) <= set(ledger.COLUMNS)
    cells = pd.read_csv(predicted / "cells.csv")
    cells = cells[cells["image"] == str(SAMPLE)].reset_index(drop=True)
    measured = [c for c in result.cells.columns if c in cells.columns]
    assert len(measured) >= 8
    pd.testing.assert_frame_equal(
        result.cells[measured].reset_index(drop=True).astype(float),
        cells[measured].astype(float),
        rtol=1e-5,
    )


def test_count_file_equals_count_and_names_the_file(predicted: Path, tmp_path: Path):
    [result] = cellwatch.count_file(SAMPLE)
    again = cellwatch.count(imageio.read_image(SAMPLE).pixels)
    np.testing.assert_array_equal(result.labels, again.labels)
    assert result.row["image"] == str(SAMPLE) and result.row["scene"] is None
    assert result.row["sha256"] == imageio.sha256_file(SAMPLE)
    assert not list(tmp_path.iterdir())  # nothing written unless asked
    [written] = cellwatch.count_file(SAMPLE, out_dir=tmp_path)
    np.testing.assert_array_equal(tifffile.imread(written.row["labels"]), result.labels)
    assert Path(written.row["overlay"]).is_file()


def test_the_samples_count_as_before(predicted_f32: Path):
    """The three samples give the rows, counts and labels they gave before the API existed
    (recorded with the bundled model by `cellwatch predict` at main fb45532, on Keras in
    f32; OpenVINO in f32 gives the same labels, bf16 moves outlines by a pixel, which
    tests/test_samples.py bounds against the masks)."""
    golden = json.loads(GOLDEN.read_text())
    predicted = predicted_f32
    rows = ledger.read(predicted / "ledger.csv").set_index("image")
    for name, before in golden.items():
        row = rows.loc[str(SAMPLES / name)]
        for column, value in before["row"].items():
            if column == "settings_hash":  # new settings keys give a new hash, rightly
                assert isinstance(row[column], str) and len(row[column]) == len(value)
                continue
            assert _same(value, row[column]), (name, column, value, row[column])
        labels = tifffile.imread(predicted / "labels" / name)
        areas = np.bincount(labels.ravel())[1:]
        assert sorted(areas.tolist()) == before["areas"], name


def test_count_file_gives_one_result_per_scene(threshold_model: Path, tmp_path: Path):
    write_czi = pytest.importorskip("test_formats").write_czi
    from test_formats import PIXEL_UM, SCENE_DISCS

    czi = write_czi(tmp_path / "plate.czi")
    config = override(
        Config(), **{"input.channel": "DAPI", "tiling.tile_size": 64, "tiling.overlap": 8}
    )
    results = cellwatch.count_file(czi, model=threshold_model, config=config)
    assert [r.row["scene"] for r in results] == [0, 1, 2]
    assert [r.cell_count for r in results] == [len(c) for c in SCENE_DISCS]
    assert all(r.row["pixel_size_um"] == pytest.approx(PIXEL_UM) for r in results)
    assert [len(r.cells) for r in results] == [len(c) for c in SCENE_DISCS]


def test_a_model_path_and_a_config_path_are_accepted(threshold_model: Path, tmp_path: Path):
    image, _ = discs((64, 64), [(20, 20), (44, 44)], 6)
    config = tmp_path / "config.yaml"
    config.write_text("scale:\n  pixel_size_um: 0.5\n")
    result = cellwatch.count(image, model=str(threshold_model), config=config)
    assert result.cell_count == 2 and result.row["pixel_size_um"] == 0.5
    assert result.row["mean_area_um2"] == pytest.approx(result.row["mean_area_px"] * 0.25)
    assert result.row["model"].startswith("threshold@")


def test_a_stack_is_refused_with_what_to_do(threshold_model: Path):
    with pytest.raises(BadInputError, match=r"shape \(2, 64, 64\); pick one channel"):
        cellwatch.count(np.zeros((2, 64, 64), np.uint16), model=threshold_model)


def test_count_file_reads_the_channel_the_models_card_names(threshold_model: Path, tmp_path: Path):
    """A model taught on a stain (its card's ``input.channel``) reads that plane, as
    ``cellwatch predict`` and the service do, unless the config names a channel."""
    import shutil

    model = tmp_path / "gray.keras"
    shutil.copy(threshold_model, model)
    card = json.loads(threshold_model.with_suffix(".json").read_text())
    model.with_suffix(".json").write_text(json.dumps({**card, "input": {"channel": "gray"}}))
    image, _ = discs((96, 96), [(30, 30), (60, 66)], 10)
    rgb = np.stack([image, image // 2, image // 3], axis=-1).astype(np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    [result] = cellwatch.count_file(tmp_path / "rgb.tif", model=model)
    assert result.cell_count == 2 and result.row["channel"] == "gray"
