"""Corrections: a label image fixed by hand, saved with the plane cellwatch counted.

The saving is a library function (:mod:`cellwatch.interop.corrections`), tested here
without a display; one test edits a Labels layer in a real ``napari.Viewer`` under Xvfb
and saves it through the "cellwatch: corrections" dock widget.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
from conftest import discs

from cellwatch.cli import main
from cellwatch.config import load_config
from cellwatch.interop.corrections import (
    CorrectionError,
    default_folder,
    instance_mask,
    save_correction,
    write_pair,
)
from cellwatch.storage import imageio, ledger

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "cellwatch" / "napari.yaml"
CENTRES = {"one.tif": [(20, 20)], "two.tif": [(20, 20), (44, 44)]}


def counted(root: Path, model: Path, config: dict, images: dict[str, np.ndarray]) -> Path:
    """``cellwatch predict`` on ``images`` written to ``root/inbox``; the results folder."""
    inbox = root / "inbox"
    inbox.mkdir(parents=True)
    for name, image in images.items():
        tifffile.imwrite(inbox / name, image)
    settings = root / "config.yaml"
    settings.write_text(yaml.safe_dump({"tiling": {"tile_size": 64, "overlap": 8}, **config}))
    argv = ["predict", str(inbox), "--out", str(root / "results"), "--quiet"]
    assert main([*argv, "--model", str(model), "--config", str(settings)]) == 0
    return root / "results"


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, threshold_model: Path) -> Path:
    """A results folder of two gray disc images (1 and 2 cells)."""
    images = {name: discs((64, 64), c, 5)[0] for name, c in CENTRES.items()}
    return counted(tmp_path_factory.mktemp("corrections"), threshold_model, {}, images)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` and the sha256 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def row_of(results: Path, name: str) -> dict:
    rows = ledger.read(results / "ledger.csv")
    return rows[rows["image"].str.endswith(name)].iloc[0].to_dict()


def test_instance_mask_numbers_the_cells_from_1_as_uint16():
    painted = np.array([[0, 70000, 70000], [5, 0, 2**40], [5, 0, 0]], np.int64)
    mask = instance_mask(painted)
    assert mask.dtype == np.uint16
    assert mask.tolist() == [[0, 2, 2], [1, 0, 3], [1, 0, 0]]
    assert instance_mask(np.zeros((3, 4), np.int32)).tolist() == [[0] * 4] * 3
    assert instance_mask(np.eye(2, dtype=bool)).tolist() == [[1, 0], [0, 1]]
    with pytest.raises(CorrectionError, match="negative values"):
        instance_mask(np.array([[0, -1]]))
    with pytest.raises(CorrectionError, match="whole numbers"):
        instance_mask(np.zeros((2, 2), np.float32))
    with pytest.raises(CorrectionError, match="at most 65,535"):
        instance_mask(np.arange(70_000).reshape(1, -1))


def test_a_correction_is_saved_beside_the_results_folder_which_is_left_as_it_was(
    results: Path,
):
    before = snapshot(results)
    labels = tifffile.imread(results / "labels" / "two.tif").astype(np.int32)
    labels[labels == 1] = 0  # a cell deleted
    labels[50:58, 5:13] = 40  # a cell painted with a label of its own
    saved = save_correction(labels, row_of(results, "two.tif"), results)
    folder = results.parent / "corrections"
    assert default_folder(results) == folder
    assert saved.image == folder / "images" / "two.tif"
    assert saved.mask == folder / "masks" / "two.tif" and saved.cells == 2
    image = tifffile.imread(saved.image)
    assert np.array_equal(image, tifffile.imread(results.parent / "inbox" / "two.tif"))
    mask = tifffile.imread(saved.mask)
    assert mask.dtype == np.uint16 and mask.shape == image.shape
    assert np.array_equal(mask, instance_mask(labels))
    assert set(np.unique(mask)) == {0, 1, 2} and (mask[50:58, 5:13] == 2).all()
    assert imageio.find_pairs(folder / "images", folder / "masks") == [(saved.image, saved.mask)]
    # saved again after more edits: the pair is replaced; an empty mask is a correction
    again = save_correction(np.zeros_like(labels), row_of(results, "two.tif"), results)
    assert again == saved.__class__(saved.image, saved.mask, 0)
    assert not tifffile.imread(saved.mask).any()
    assert snapshot(results) == before


def test_results_folders_are_never_written(results: Path, tmp_path: Path):
    labels = tifffile.imread(results / "labels" / "one.tif")
    row = row_of(results, "one.tif")
    before = snapshot(results)
    for inside in (results, results / "corrections", results / "labels" / "deeper"):
        with pytest.raises(CorrectionError, match="results folders are never written"):
            save_correction(labels, row, results, inside)
    # a folder inside another results folder (one holding a ledger.csv) is refused too
    other = tmp_path / "other-results"
    other.mkdir()
    (other / "ledger.csv").write_text(",".join(ledger.COLUMNS) + "\n")
    with pytest.raises(
        CorrectionError, match=f"lies in the results folder {re.escape(str(other))}"
    ):
        write_pair(np.zeros((4, 4)), np.zeros((4, 4), int), other / "fixes", "x")
    assert snapshot(results) == before
    chosen = save_correction(labels, row, results, tmp_path / "my corrections")
    assert chosen.mask == tmp_path / "my corrections" / "masks" / "one.tif"


def test_what_cannot_be_saved_says_why(results: Path, tmp_path: Path):
    labels = tifffile.imread(results / "labels" / "one.tif")
    with pytest.raises(CorrectionError, match=r"the image is \(64, 64\) but the labels are"):
        save_correction(labels[:10], row_of(results, "one.tif"), results, tmp_path)
    moved = {**row_of(results, "one.tif"), "image": str(tmp_path / "gone" / "one.tif")}
    with pytest.raises(CorrectionError, match="is not there any more"):
        save_correction(labels, moved, results, tmp_path)
    assert not (tmp_path / "images").exists() and not (tmp_path / "masks").exists()


def test_the_channel_counted_comes_from_the_ledger_else_from_the_settings(
    threshold_model: Path, tmp_path: Path
):
    """An RGB image whose cells are in green (channel 1), counted with input.channel: 1."""
    image, truth = discs((64, 64), [(20, 20), (44, 40)], 6)
    rng = np.random.default_rng(0)
    rgb = np.stack([rng.integers(0, 255, image.shape, np.uint8), image, image // 2], axis=-1)
    results = counted(tmp_path, threshold_model, {"input": {"channel": 1}}, {"rgb.tif": rgb})
    labels = tifffile.imread(results / "labels" / "rgb.tif")
    row = {k: v for k, v in row_of(results, "rgb.tif").items() if k != "channel"}
    assert row["cell_count"] == 2
    # a ledger without a channel column, and the default settings: the channel is not known
    with pytest.raises(CorrectionError, match=r"Choose the config\.yaml it was counted with"):
        save_correction(labels, row, results)
    config = load_config(tmp_path / "config.yaml")
    saved = save_correction(labels, row, results, config=config)
    assert np.array_equal(tifffile.imread(saved.image), image)  # green
    assert np.array_equal(tifffile.imread(saved.mask) > 0, truth > 0)
    # a ledger channel column wins over the settings
    for recorded in (2, "2", 2.0):
        saved = save_correction(labels, {**row, "channel": recorded}, results, config=config)
        assert np.array_equal(tifffile.imread(saved.image), image // 2)  # blue


def test_a_scene_of_a_multi_scene_file_is_saved_as_that_scene(
    threshold_model: Path, tmp_path: Path
):
    pytest.importorskip("pylibCZIrw.czi", reason="pylibczirw writes the CZI test files")
    from test_formats import SCENE_DISCS, write_czi

    czi = write_czi(tmp_path / "in" / "plate.czi")
    config = tmp_path / "c.yaml"
    config.write_text("input:\n  channel: DAPI\ntiling:\n  tile_size: 64\n  overlap: 8\n")
    results = tmp_path / "out"
    argv = ["predict", str(czi.parent), "--out", str(results), "--model", str(threshold_model)]
    assert main([*argv, "--config", str(config), "--quiet"]) == 0
    rows = ledger.read(results / "ledger.csv")
    row = rows[rows["scene"] == "2"].iloc[0].to_dict()
    labels = tifffile.imread(results / "labels" / "plate_s2.tif")
    saved = save_correction(labels, row, results, config=load_config(config))
    assert saved.image.name == saved.mask.name == "plate_s2.tif"
    _, truth = discs((96, 112), SCENE_DISCS[2], 6)
    assert np.array_equal(tifffile.imread(saved.image), np.where(truth > 0, 4000, 100))
    assert saved.cells == len(SCENE_DISCS[2])


#: Run under Xvfb in a process of its own: opens a results folder through the plugin,
#: docks "cellwatch: corrections", edits two.tif's labels with the Labels layer's own
#: tools (erase a cell with the fill tool, paint a new one), clicks Save, then saves
#: one.tif with every cell deleted; prints what the widget reported as JSON.
VIEWER_SCRIPT = """
import json, sys, warnings
warnings.filterwarnings("ignore")
import napari, npe2

results, manifest = sys.argv[1], sys.argv[2]
plugins = npe2.PluginManager.instance()
if "cellwatch" not in plugins:  # the cellwatch installed here is another checkout's
    plugins.register(npe2.PluginManifest.from_file(manifest))
viewer = napari.Viewer(show=False)
viewer.open(results, plugin="cellwatch")
_, widget = viewer.window.add_plugin_dock_widget("cellwatch", "cellwatch: corrections")
names = [layer.name for layer in widget.labels.choices]
shown = widget.labels.value.name  # the layer the reader shows: the newest image's
two = viewer.layers["two.tif labels (2 cells)"]
viewer.layers.selection.active = two
chosen = widget.labels.value.name
folder = str(widget.folder.value)
two.fill((44, 44), 0)  # the fill tool, with the background label: the cell is erased
two.selected_label = two.data.max() + 1  # "new label"
two.brush_size = 7
two.paint((52, 12), two.selected_label)  # the paint brush
widget.save_button.native.click()
first = widget.status.value
one = viewer.layers["one.tif labels (1 cells)"]
one.fill((20, 20), 0)
widget.labels.value = one
saved = widget.save()
widget.folder.value = results + "/fixes"  # inside the results folder: refused, and said so
refused = [widget.save(), widget.status.value]
widget.folder.line_edit.value = ""  # the user empties the box
print(json.dumps({
    "refused": refused, "cleared": str(widget.save().mask),
    "names": names, "shown": shown, "chosen": chosen, "folder": folder,
    "first": first, "second": [str(saved.mask), saved.cells], "status": widget.status.value,
    "painted": two.data[52, 12].item(),
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
def test_labels_edited_in_a_real_napari_viewer_are_saved_by_the_widget(
    threshold_model: Path, tmp_path: Path
):
    images = {name: discs((64, 64), c, 5)[0] for name, c in CENTRES.items()}
    results = counted(tmp_path, threshold_model, {}, images)
    before = snapshot(results)
    env = dict(os.environ, QT_QPA_PLATFORM="xcb", PYTHONPATH=str(REPO))
    env.pop("DISPLAY", None)
    run = subprocess.run(
        ["xvfb-run", "-a", "-s", "-screen 0 1280x1024x24", sys.executable, "-c", VIEWER_SCRIPT,
         str(results), str(MANIFEST)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["names"] == ["one.tif labels (1 cells)", "two.tif labels (2 cells)"]
    assert found["shown"] == "two.tif labels (2 cells)"
    assert found["chosen"] == "two.tif labels (2 cells)"
    folder = tmp_path / "corrections"
    assert found["folder"] == str(folder)
    assert found["first"] == "Saved 2 cell(s): two.tif"
    assert found["second"] == [str(folder / "masks" / "one.tif"), 0]
    assert found["status"] == "Saved 0 cell(s): one.tif"
    refused, message = found["refused"]
    assert refused is None and message.startswith(f"Not saved: {results}/fixes lies in the")
    assert found["cleared"] == found["second"][0]  # an emptied box: the default folder again

    original = tifffile.imread(results / "labels" / "two.tif")
    image = tifffile.imread(folder / "images" / "two.tif")
    assert np.array_equal(image, images["two.tif"])
    mask = tifffile.imread(folder / "masks" / "two.tif")
    assert mask.dtype == np.uint16 and mask.shape == image.shape
    yy, xx = np.mgrid[:64, :64]
    brush = (yy - 52) ** 2 + (xx - 12) ** 2 <= 2**2  # well inside a 7 px brush
    kept = original == original[20, 20]
    assert mask[20, 20] > 0 and np.array_equal(mask == mask[20, 20], kept)  # untouched
    assert mask[52, 12] > 0 and mask[52, 12] != mask[20, 20] and mask[brush].all()
    assert not mask[original == original[44, 44]].any()  # the erased cell is gone
    assert sorted(np.unique(mask)) == [0, 1, 2]
    assert not tifffile.imread(folder / "masks" / "one.tif").any()
    assert np.array_equal(tifffile.imread(folder / "images" / "one.tif"), images["one.tif"])
    assert snapshot(results) == before
