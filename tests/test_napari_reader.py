"""The napari reader: results folders, ledgers and label images as napari layers.

Most tests call the reader function without a display. One opens a results folder in a
real ``napari.Viewer`` (Qt offscreen) when napari and a Qt binding are installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import yaml
from conftest import discs

from cellwatch.cli import main
from cellwatch.errors import CellwatchError
from cellwatch.interop import napari_reader
from cellwatch.interop.napari_reader import MAX_IMAGES, napari_get_reader, read_results
from cellwatch.storage import ledger

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "cellwatch" / "napari.yaml"
CENTRES = {
    "a.tif": [(20, 20)],
    "b.tif": [(20, 20), (44, 44)],
    "c.tif": [(15, 15), (30, 45), (50, 20)],
}
RADII = {"c.tif": [4, 5, 6]}  # cells of different areas, so a cell's row is told from another's


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, threshold_model: Path) -> Path:
    """A results folder from ``cellwatch predict`` on three disc images (1, 2, 3 cells)."""
    root = tmp_path_factory.mktemp("napari")
    inbox = root / "inbox"
    inbox.mkdir()
    for name, centres in CENTRES.items():
        radii = RADII.get(name, [5] * len(centres))
        image = np.maximum.reduce(
            [discs((64, 64), [centre], r)[0] for centre, r in zip(centres, radii, strict=True)]
        )
        tifffile.imwrite(inbox / name, image)
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({"tiling": {"tile_size": 64, "overlap": 8}}))
    argv = ["predict", str(inbox), "--out", str(root / "results"), "--quiet"]
    assert main([*argv, "--model", str(threshold_model), "--config", str(config)]) == 0
    return root / "results"


def layers_by_name(layers: list) -> dict[str, tuple]:
    return {kwargs["name"]: (data, kwargs, kind) for data, kwargs, kind in layers}


def test_a_results_folder_opens_each_image_with_its_labels_and_cells(results: Path):
    layers = read_results(results)
    assert [kind for _, _, kind in layers] == ["image", "labels"] * 3
    named = layers_by_name(layers)
    rows = ledger.read(results / "ledger.csv")
    cells = pd.read_csv(results / "cells.csv", dtype={"job_id": str})
    for name, centres in CENTRES.items():
        n = len(centres)
        image, kwargs, _ = named[f"{name} ({n} cells)"]
        assert np.array_equal(image, tifffile.imread(results.parent / "inbox" / name))
        labels, kwargs, kind = named[f"{name} labels ({n} cells)"]
        assert kind == "labels"
        assert np.array_equal(labels, tifffile.imread(results / "labels" / name))
        features = kwargs["features"]
        row = rows[rows["image"].str.endswith(name)].iloc[0]
        mine = cells[cells["job_id"] == row["job_id"]]
        assert (
            sorted(features["index"]) == sorted(np.unique(labels[labels > 0])) == [*range(1, n + 1)]
        )
        assert np.allclose(
            features.sort_values("index")["area_px"], mine.sort_values("label")["area_px"]
        )
        assert kwargs["metadata"]["cellwatch"]["job_id"] == row["job_id"]
    assert [kwargs["visible"] for _, kwargs, _ in layers] == [False] * 4 + [True] * 2
    # its ledger.csv opens the same
    assert [k["name"] for _, k, _ in read_results(results / "ledger.csv")] == [
        k["name"] for _, k, _ in layers
    ]


def test_a_label_image_opens_as_labels_with_its_neighbours(results: Path):
    reader = napari_get_reader(str(results / "labels" / "b.tif"))
    assert reader is not None
    layers = reader(str(results / "labels" / "b.tif"))
    assert [(k["name"], k["visible"], kind) for _, k, kind in layers] == [
        ("a.tif (1 cells)", False, "image"),
        ("a.tif labels (1 cells)", False, "labels"),
        ("b.tif (2 cells)", True, "image"),
        ("b.tif labels (2 cells)", True, "labels"),
        ("c.tif (3 cells)", False, "image"),
        ("c.tif labels (3 cells)", False, "labels"),
    ]
    alone = read_results(results / "labels" / "b.tif", neighbours=0)
    assert [kind for _, _, kind in alone] == ["image", "labels"]
    assert alone[1][0].dtype.kind == "u" and alone[1][0].max() == 2


def test_other_files_are_left_to_napari(results: Path, tmp_path: Path):
    stray = tmp_path / "labels" / "stray.tif"
    stray.parent.mkdir()
    tifffile.imwrite(stray, np.zeros((8, 8), np.uint16))
    (tmp_path / "ledger.csv").write_text(",".join(ledger.COLUMNS) + "\n")
    for path in (
        results.parent / "inbox" / "a.tif",  # an input image
        stray,  # a TIFF in a labels folder that no ledger row names
        results / "overlays" / "a.png",
        results.parent / "inbox",  # a folder without a ledger
        results / "cells.csv",
    ):
        assert napari_get_reader(str(path)) is None, path
        with pytest.raises(CellwatchError, match="is not a cellwatch results folder"):
            read_results(path)
    assert napari_get_reader([str(results), str(results)]) is None


def test_labels_stay_when_the_input_image_has_gone(results: Path, tmp_path: Path):
    copy = tmp_path / "results"
    shutil.copytree(results, copy)
    rows = ledger.read(copy / "ledger.csv")
    rows["image"] = rows["image"].str.replace(str(results.parent / "inbox"), str(tmp_path / "gone"))
    rows.to_csv(copy / "ledger.csv", index=False)
    layers = read_results(copy)
    assert [kind for _, _, kind in layers] == ["labels"] * 3


def test_a_folder_of_10000_images_opens_only_the_last_days_newest(results: Path, tmp_path: Path):
    """10,000 ledger rows over ten days: the reader reads MAX_IMAGES label images, all
    from the last 24 hours, and the cells of those images only."""
    copy = tmp_path / "results"
    shutil.copytree(results, copy)
    rows = ledger.read(copy / "ledger.csv")
    cells = pd.read_csv(copy / "cells.csv", dtype={"job_id": str})
    start = pd.Timestamp("2026-03-01T08:00:00Z")
    n = 10_000
    big = rows.iloc[np.arange(n) % len(rows)].reset_index(drop=True)
    big["job_id"] = [f"job{i:05d}" for i in range(n)]
    big["processed_at"] = [(start + pd.Timedelta(minutes=1.44 * i)).isoformat() for i in range(n)]
    source = dict(zip(big["job_id"], rows["job_id"].iloc[np.arange(n) % len(rows)], strict=True))
    by_job = dict(tuple(cells.groupby("job_id")))
    all_cells = pd.concat(by_job[source[j]].assign(job_id=j) for j in big["job_id"])
    big.to_csv(copy / "ledger.csv", index=False)
    all_cells.to_csv(copy / "cells.csv", index=False)

    started = time.perf_counter()
    layers = read_results(copy)
    seconds = time.perf_counter() - started
    labels = [k for _, k, kind in layers if kind == "labels"]
    assert len(labels) == MAX_IMAGES
    newest = pd.Timestamp(big["processed_at"].iloc[-1])
    for kwargs in labels:
        row = kwargs["metadata"]["cellwatch"]
        assert newest - pd.Timestamp(row["processed_at"]) < pd.Timedelta(hours=24)
        assert len(kwargs["features"]) == row["cell_count"]
    assert [k["metadata"]["cellwatch"]["job_id"] for k in labels] == list(
        big["job_id"][-MAX_IMAGES:]
    )
    print(f"\n10,000-row results folder opened in {seconds:.2f} s")

    # a quiet last day: only its 5 images open, not the 7 newest before them
    quiet = big.tail(MAX_IMAGES).copy()
    quiet["processed_at"] = [
        (
            newest - pd.Timedelta(days=3 if i < MAX_IMAGES - 5 else 0, minutes=MAX_IMAGES - i)
        ).isoformat()
        for i in range(MAX_IMAGES)
    ]
    quiet.to_csv(copy / "ledger.csv", index=False)
    labels = [k for _, k, kind in read_results(copy) if kind == "labels"]
    assert [k["metadata"]["cellwatch"]["job_id"] for k in labels] == list(quiet["job_id"][-5:])


def test_each_scene_of_a_file_gets_its_own_cells(threshold_model: Path, tmp_path: Path):
    """One job counts every scene of a CZI, and each scene numbers its cells from 1: the
    reader gives each scene's labels its own cells, not those of every scene."""
    pytest.importorskip("pylibCZIrw.czi", reason="pylibczirw writes the CZI test files")
    from test_formats import SCENE_DISCS, write_czi

    czi = write_czi(tmp_path / "in" / "plate.czi")
    config = tmp_path / "c.yaml"
    config.write_text("input:\n  channel: DAPI\ntiling:\n  tile_size: 64\n  overlap: 8\n")
    out = tmp_path / "out"
    argv = ["predict", str(czi.parent), "--out", str(out), "--model", str(threshold_model)]
    assert main([*argv, "--config", str(config), "--quiet"]) == 0
    named = layers_by_name(read_results(out))
    cells = pd.read_csv(out / "cells.csv", dtype={"scene": str})
    for scene, centres in enumerate(SCENE_DISCS):
        n = len(centres)
        labels, kwargs, _ = named[f"plate.czi labels ({n} cells)"]
        assert np.array_equal(labels, tifffile.imread(out / "labels" / f"plate_s{scene}.tif"))
        features = kwargs["features"].sort_values("index")
        mine = cells[cells["scene"] == str(scene)].sort_values("label")
        assert list(features["index"]) == list(mine["label"]) == [*range(1, n + 1)]
        assert list(features["area_px"]) == list(mine["area_px"])
        assert list(features["centroid_y"]) == list(mine["centroid_y"])
    # the ledger records the channel counted: each scene shows its own DAPI plane
    assert (ledger.read(out / "ledger.csv")["channel"] == "DAPI").all()
    for centres in SCENE_DISCS:
        image, kwargs, kind = named[f"plate.czi ({len(centres)} cells)"]
        _, truth = discs((96, 112), centres, 6)
        assert kind == "image" and np.array_equal(image, np.where(truth > 0, 4000, 100))
    # the ledger's channel wins over the settings
    ledger.read(out / "ledger.csv").assign(channel="GFP").to_csv(out / "ledger.csv", index=False)
    image, _, _ = layers_by_name(read_results(out))[f"plate.czi ({len(SCENE_DISCS[0])} cells)"]
    assert np.array_equal(image[0], np.arange(112, dtype=np.uint16) * 50)  # the GFP gradient


def test_the_manifest_validates_and_the_entry_point_names_it():
    npe2 = pytest.importorskip("npe2", reason="npe2 is installed with cellwatch[napari]")
    manifest = npe2.PluginManifest.from_file(MANIFEST)
    manifest.validate_imports()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert manifest.name == project["name"]
    module, _, resource = project["entry-points"]["napari.manifest"]["cellwatch"].partition(":")
    assert (REPO / module / resource) == MANIFEST
    (reader,) = manifest.contributions.readers
    assert reader.accepts_directories and "ledger.csv" in reader.filename_patterns
    commands = {command.id: command for command in manifest.contributions.commands}
    assert commands[reader.command].python_name == f"{napari_reader.__name__}:napari_get_reader"
    (widget,) = manifest.contributions.widgets
    assert widget.display_name == "cellwatch: corrections"
    assert (
        commands[widget.command].python_name == "cellwatch.interop.napari_widget:CorrectionsWidget"
    )
    assert len(commands) == 2


#: Run under Xvfb in a process of its own: opens a results folder and a label image in a
#: real napari.Viewer through the plugin, and prints what it finds as JSON.
VIEWER_SCRIPT = """
import json, sys, warnings
warnings.filterwarnings("ignore")
import napari, npe2

results, manifest = sys.argv[1], sys.argv[2]
plugins = npe2.PluginManager.instance()
if "cellwatch" not in plugins:  # the cellwatch installed here is another checkout's
    plugins.register(npe2.PluginManifest.from_file(manifest))
viewer = napari.Viewer(show=False)
folder = viewer.open(results, plugin="cellwatch")
label_image = viewer.open(results + "/labels/a.tif", plugin="cellwatch")
c = viewer.layers["c.tif labels (3 cells)"]
print(json.dumps({
    "folder": [[type(layer).__name__, layer.name, layer.visible] for layer in folder],
    "label_image": [[type(layer).__name__, layer.name, layer.visible] for layer in label_image],
    "c_features": len(c.features),
    "c_value_at_cell": int(c.get_value((15, 15))),
    "c_area_of_that_cell": float(c.features.set_index("index").loc[c.get_value((15, 15)), "area_px"]),
}))
viewer.close()
"""


@pytest.mark.skipif(
    importlib.util.find_spec("napari") is None or importlib.util.find_spec("qtpy") is None,
    reason="napari with a Qt binding is not installed (pip install 'cellwatch[napari]')",
)
@pytest.mark.skipif(
    shutil.which("xvfb-run") is None,
    reason="xvfb-run is not installed (apt-get install xvfb): napari's image layers need "
    "OpenGL, which Qt's offscreen platform does not give",
)
def test_a_real_napari_viewer_opens_a_results_folder(results: Path):
    env = dict(os.environ, QT_QPA_PLATFORM="xcb", PYTHONPATH=str(REPO))
    env.pop("DISPLAY", None)
    run = subprocess.run(
        ["xvfb-run", "-a", "-s", "-screen 0 1280x1024x24", sys.executable, "-c", VIEWER_SCRIPT,
         str(results), str(MANIFEST)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["folder"] == [
        ["Image", "a.tif (1 cells)", False],
        ["Labels", "a.tif labels (1 cells)", False],
        ["Image", "b.tif (2 cells)", False],
        ["Labels", "b.tif labels (2 cells)", False],
        ["Image", "c.tif (3 cells)", True],
        ["Labels", "c.tif labels (3 cells)", True],
    ]
    kinds = [kind for kind, _, _ in found["label_image"]]
    assert kinds == ["Image", "Labels"] * 3  # a.tif and the two after it; a.tif shown
    assert [visible for _, _, visible in found["label_image"]] == [True, True] + [False] * 4
    assert found["c_features"] == 3 and found["c_value_at_cell"] > 0
    cells = pd.read_csv(results / "cells.csv")
    c_cells = cells[cells["image"].str.endswith("c.tif")].set_index("label")["area_px"]
    assert c_cells.nunique() == 3  # so the next line can tell the cells apart
    assert found["c_area_of_that_cell"] == c_cells[found["c_value_at_cell"]]
    labels = tifffile.imread(results / "labels" / "c.tif")
    assert found["c_area_of_that_cell"] == (labels == found["c_value_at_cell"]).sum()
