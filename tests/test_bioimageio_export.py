"""``cellwatch export``: the bundled model as a bioimage.io package that ``bioimageio test``
(bioimageio.core, from PyPI) passes."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml

from cellwatch.config import TilingConfig
from cellwatch.errors import ConfigError
from cellwatch.interop.bioimageio_export import SAMPLE, export_model, halo_px
from cellwatch.model import BUNDLED_MODEL, read_card

BIOIMAGEIO = Path(sys.executable).with_name("bioimageio")
CELLWATCH = Path(sys.executable).with_name("cellwatch")
ENV = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3", NO_COLOR="1")
needs_bioimageio = pytest.mark.skipif(
    importlib.util.find_spec("bioimageio.core") is None or not BIOIMAGEIO.exists(),
    reason="bioimageio.core is not installed (pip install 'cellwatch[bioimageio]' bioimageio.core)",
)


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec("bioimageio.spec") is None:
        pytest.skip("bioimageio.spec is not installed (pip install 'cellwatch[bioimageio]')")
    return export(tmp_path_factory.mktemp("export") / "cellwatch-nuclei.zip")


def export(out: Path, *args: str) -> Path:
    """``cellwatch export`` as a user runs it, in a process of its own."""
    run = subprocess.run(
        [CELLWATCH, "export", "--out", str(out), *args],
        env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert f"wrote {out}" in run.stdout
    return out


@needs_bioimageio
def test_bioimageio_test_passes_on_the_exported_bundled_model(package: Path):
    run = subprocess.run(
        [BIOIMAGEIO, "test", str(package), "--summary", "display"],
        env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-6000:]
    assert "status           passed" in report or "status  passed" in " ".join(report.split())
    for weights in ("keras_v3", "onnx"):  # both formats reproduce cellwatch's test output
        assert f"Reproduce test outputs from test inputs ({weights})" in " ".join(report.split())


def test_the_package_describes_the_model_as_its_card_does(package: Path):
    card = read_card(BUNDLED_MODEL)
    with zipfile.ZipFile(package) as archive:
        rdf = yaml.safe_load(archive.read("rdf.yaml"))
        names = set(archive.namelist())
        test_input = np.load(archive.open(rdf["inputs"][0]["test_tensor"]["source"]))
        test_output = np.load(archive.open(rdf["outputs"][0]["test_tensor"]["source"]))
    assert rdf["format_version"].startswith("0.5.")
    assert rdf["description"] == card["description"]
    assert [c["doi"] for c in rdf["cite"]] == [c["doi"] for c in card["cite"]]
    assert rdf["training_data"]["description"].startswith(card["data"]["source"])
    (image,) = rdf["inputs"]
    scale_range = [p for p in image["preprocessing"] if p["id"] == "scale_range"]
    assert scale_range[0]["kwargs"]["min_percentile"] == card["normalize"]["low_percentile"]
    assert scale_range[0]["kwargs"]["max_percentile"] == card["normalize"]["high_percentile"]
    assert [a["type"] for a in image["axes"]] == ["batch", "space", "space", "channel"]
    (probabilities,) = rdf["outputs"]
    halos = [a.get("halo") for a in probabilities["axes"] if a["type"] == "space"]
    assert halos == [halo_px(card, TilingConfig())] * 2
    channels = next(a for a in probabilities["axes"] if a["type"] == "channel")
    assert channels["channel_names"] == card["classes"]
    assert set(rdf["weights"]) == {"onnx", "keras_v3"}
    assert {rdf["weights"][w]["source"] for w in rdf["weights"]} <= names
    assert rdf["covers"] and rdf["documentation"]["source"] in names
    # the test pair: raw pixels in, probabilities that sum to one out
    assert test_input.shape[:1] == test_output.shape[:1] == (1,) and test_input.shape[-1] == 1
    assert test_output.shape[1:3] == test_input.shape[1:3] and test_output.shape[-1] == 3
    assert test_input.max() > 1.5  # raw intensities: normalizing is the package's job
    assert np.allclose(test_output.sum(axis=-1), 1, atol=1e-4)
    # the bundled model's card drops no doubtful cell and grows no outline
    post = rdf["config"]["cellwatch"]["postprocess"]
    assert (post["peak_threshold"], post["outline_growth_px"]) == (0.0, 0.0)


def test_halo_comes_from_the_model_card_when_it_records_one():
    tiling = TilingConfig(overlap=48)
    assert halo_px({}, tiling) == 24  # half the overlap, as tiling discards
    assert halo_px({"receptive_field_px": 93}, tiling) == 47
    assert halo_px({"halo_px": 30, "receptive_field_px": 93}, tiling) == 30
    # the measured field as `cellwatch train` records it: its radius is the context
    measured = {"receptive_field": {"radius_px": 92, "tolerance": 0.001, "grid_px": 16}}
    assert halo_px(measured, tiling) == 92
    assert halo_px(measured, TilingConfig(overlap="auto")) == 92
    assert halo_px({}, TilingConfig(overlap="auto")) == 24  # no field known: the old margin


def test_out_must_be_a_zip(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"a bioimage.io package is a \.zip file"):
        export_model(None, tmp_path / "package.yaml")


@pytest.fixture(scope="module")
def users_package(tmp_path_factory: pytest.TempPathFactory, package: Path) -> Path:
    """The package of a model a lab fine-tuned on brightfield: its card has no
    description or citations, says it sees its input inverted (dark cells), and carries
    the peak threshold and outline growth ``finetune`` writes."""
    folder = tmp_path_factory.mktemp("users")
    model = shutil.copy(BUNDLED_MODEL, folder / "mine.keras")
    card = read_card(BUNDLED_MODEL)
    for key in ("description", "cite", "authors", "license", "data"):
        card.pop(key)
    card["input"] = {"channel": None, "invert": True}
    card.update(peak_threshold=0.95, outline_growth_px=1.25)
    (folder / "mine.json").write_text(json.dumps(card))
    with pytest.raises(ConfigError, match=r"taught on dark cells .* --sample"):
        export_model(model, folder / "no-sample.zip")
    bright = tifffile.imread(SAMPLE)
    tifffile.imwrite(folder / "dark.tif", np.iinfo(bright.dtype).max - bright)
    return export(folder / "mine.zip", "--model", str(model), "--sample", str(folder / "dark.tif"))


def test_a_model_of_another_card_exports_without_citation_or_data(users_package: Path):
    """Its package (checked by bioimageio.spec as it is built) cites the U-Net paper and
    describes the model from what its card says."""
    with zipfile.ZipFile(users_package) as archive:
        rdf = yaml.safe_load(archive.read("rdf.yaml"))
    assert rdf["name"] == "cellwatch mine"
    assert "20 px across" in rdf["description"]
    assert [c["doi"] for c in rdf["cite"]] == ["10.1007/978-3-319-24574-4_28"]
    assert rdf.get("training_data") is None
    post = rdf["config"]["cellwatch"]["postprocess"]  # what labelling needs beyond tensors
    assert (post["peak_threshold"], post["outline_growth_px"]) == (0.95, 1.25)


def test_a_model_taught_on_dark_cells_inverts_in_its_package(users_package: Path):
    """The package maps the 0.2nd and 99th percentiles to 1 and 0, as cellwatch's
    inverted normalization does."""
    card = read_card(BUNDLED_MODEL)["normalize"]
    with zipfile.ZipFile(users_package) as archive:
        rdf = yaml.safe_load(archive.read("rdf.yaml"))
    steps = [s for s in rdf["inputs"][0]["preprocessing"] if s["id"] != "ensure_dtype"]
    assert [s["id"] for s in steps] == ["scale_range", "scale_linear"]
    assert steps[0]["kwargs"]["min_percentile"] == pytest.approx(100 - card["high_percentile"])
    assert steps[0]["kwargs"]["max_percentile"] == pytest.approx(100 - card["low_percentile"])
    assert (steps[1]["kwargs"]["gain"], steps[1]["kwargs"]["offset"]) == (-1.0, 1.0)


@needs_bioimageio
def test_bioimageio_test_passes_on_a_model_taught_on_dark_cells(users_package: Path):
    """``bioimageio test`` reproduces the test output through the package's inverting
    preprocessing (it fails when the inversion is missing)."""
    run = subprocess.run(
        [BIOIMAGEIO, "test", str(users_package), "--summary", "display"],
        env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    report = " ".join((run.stdout + run.stderr).split())
    assert run.returncode == 0, report[-6000:]
    assert "Reproduce test outputs from test inputs (onnx)" in report
