"""Microscope formats through bioio: CZI on real files, ND2 and LIF through a reader stub.

CZI files are written here with pylibCZIrw (Zeiss's own library), several scenes of known
discs each, with channel names and a pixel size in their metadata, the way Zen writes
them. The ND2 and LIF plugins ship no sample files and nothing here writes those formats,
so cellwatch's handling of them is tested through the same bioio reader interface with a
small stub (:class:`StubReader`) standing in for the plugin.
"""

from __future__ import annotations

import csv
import importlib.machinery
import os
import sys
import threading
import time
import types
import xml.etree.ElementTree as ET
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from conftest import discs
from test_daemon import Cellwatch, check_files_whole, write_config

from cellwatch import cli
from cellwatch.config import Config, OutputConfig, installed_vendor_suffixes, load_config
from cellwatch.errors import BadInputError
from cellwatch.model import load_model
from cellwatch.pipeline import ImageResult, Segmenter
from cellwatch.reporting.report import build_reports
from cellwatch.service import status
from cellwatch.service.driver import record
from cellwatch.service.engine import Engine, Paths
from cellwatch.service.jobs import FileVersion, JobQueue
from cellwatch.service.local_runner import LocalRunner
from cellwatch.service.recorder import Recorder
from cellwatch.service.watcher import looks_complete
from cellwatch.storage import imageio, ledger, vendor

pyczi = pytest.importorskip("pylibCZIrw.czi", reason="pylibczirw writes the CZI test files")

PIXEL_UM = 0.65
# Scene k has k + 2 discs of radius 6 in channel DAPI; channel GFP is a gradient.
SCENE_DISCS = [[(20 + 24 * i, 20 + 20 * i) for i in range(k + 2)] for k in range(3)]


def write_czi(
    path: Path,
    scenes: list[list[tuple[int, int]]] = SCENE_DISCS,
    *,
    shape: tuple[int, int] = (96, 112),
    radius: int = 6,
    pixel_size_um: float = PIXEL_UM,
) -> Path:
    """A CZI with one scene per list of disc centres, channels DAPI (the discs) and GFP,
    the scenes named ``A1``, ``A2``, … in the metadata as a Zen plate acquisition."""
    gfp = np.tile(np.arange(shape[1], dtype=np.uint16) * 50, (shape[0], 1))
    with pyczi.create_czi(str(path), exist_ok=True) as czi:
        for s, centres in enumerate(scenes):
            _, labels = discs(shape, centres, radius)
            dapi = np.where(labels > 0, 4000, 100).astype(np.uint16)
            for c, plane in enumerate((dapi, gfp)):
                czi.write(plane, plane={"C": c, "T": 0, "Z": 0}, scene=s, location=(s * 5000, 0))
        czi.write_metadata(
            document_name=path.stem,
            channel_names={0: "DAPI", 1: "GFP"},
            scale_x=pixel_size_um * 1e-6,
            scale_y=pixel_size_um * 1e-6,
        )
    # pylibCZIrw records the scenes' tiles but not their names; Zen lists them under
    # Dimensions/S/Scenes, which is where readers find them.
    with pyczi.edit_czi(str(path)) as editor:
        root = ET.fromstring(editor.read_metadata_xml())
        dims = root.find("./Metadata/Information/Image/Dimensions")
        listed = ET.SubElement(ET.SubElement(dims, "S"), "Scenes")
        for s in range(len(scenes)):
            ET.SubElement(listed, "Scene", Index=str(s), Name=f"A{s + 1}")
        with editor.edit_session() as builder:
            builder.set_xml(ET.tostring(root, encoding="unicode"))
    return path


# --- the ND2 / LIF stand-in ----------------------------------------------------------------


def write_stub(path: Path, scenes: list[np.ndarray], channels: list[str], pixel_size_um: float):
    """A file the stub reader reads: each scene a TCZYX array, as bioio gives them."""
    with path.open("wb") as handle:
        np.savez(handle, n=len(scenes), channels=np.array(channels), px=pixel_size_um,
                 **{f"s{k}": a for k, a in enumerate(scenes)})  # fmt: skip
    return path


def stub_module(name: str) -> types.ModuleType:
    """A module standing in for a bioio plugin (``bioio_nd2``): its ``Reader`` is bioio's
    ArrayLikeReader over the arrays of a :func:`write_stub` file."""
    from bioio.array_like_reader import ArrayLikeReader
    from bioio_base.types import PhysicalPixelSizes

    class StubReader(ArrayLikeReader):
        def __init__(self, image: object, fs_kwargs: object = None, **kwargs: object) -> None:
            with np.load(str(image)) as f:
                n, arrays = int(f["n"]), [f[f"s{k}"] for k in range(int(f["n"]))]
                names, px = [str(c) for c in f["channels"]], float(f["px"])
            self._stub_sizes = PhysicalPixelSizes(1.0, px, px)
            super().__init__(arrays, dim_order=["TCZYX"] * n, channel_names=[names] * n)

        @property
        def physical_pixel_sizes(self) -> PhysicalPixelSizes:
            return self._stub_sizes  # ArrayLikeReader forgets its sizes on set_scene

    module = types.ModuleType(name)
    module.Reader = StubReader  # type: ignore[attr-defined]
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return module


@pytest.fixture
def nd2_and_lif_stubs(monkeypatch):
    for name in ("bioio_nd2", "bioio_lif"):
        monkeypatch.setitem(sys.modules, name, stub_module(name))


def stack_of(centres: list[tuple[int, int]], *, shape=(80, 96), planes: int = 3) -> np.ndarray:
    """(T=1, C=2, Z=planes, Y, X): channel 0 noise, channel 1 the discs, each disc bright
    in one Z plane only, so only a max projection shows them all."""
    rng = np.random.default_rng(0)
    out = np.zeros((1, 2, planes, *shape), np.uint16)
    out[0, 0] = rng.integers(0, 3000, (planes, *shape))
    for i, centre in enumerate(centres):
        disc, _ = discs(shape, [centre], 6, value=3000, background=0)
        out[0, 1, i % planes] = np.maximum(out[0, 1, i % planes], disc)
    out[0, 1] += 50
    return out


# --- reading ---------------------------------------------------------------------------------


def test_czi_scenes_channels_and_pixel_size_come_from_the_file(tmp_path: Path):
    path = write_czi(tmp_path / "plate.czi")
    assert imageio.scene_count(path) == 3
    for k, centres in enumerate(SCENE_DISCS):
        data = imageio.read_image(path, scene=k, channel="dapi")  # by name, any case
        _, truth = discs((96, 112), centres, 6)
        assert np.array_equal(data.pixels > 1000, truth > 0)
        assert data.pixel_size_um == pytest.approx(PIXEL_UM)
        assert data.scene == k and f"scene {k} (A{k + 1}) of 3" in data.note
    assert np.array_equal(
        imageio.read_image(path, scene=1, channel=1).pixels,
        imageio.read_image(path, scene=1, channel="GFP").pixels,
    )
    with pytest.raises(BadInputError, match=r"2 channels that differ.*DAPI, GFP"):
        imageio.read_image(path, scene=0, channel=None)
    found = imageio.read_image(path, scene=0)  # auto: the channel named after a nuclear stain
    assert found.channel == "DAPI"
    assert np.array_equal(found.pixels, imageio.read_image(path, scene=0, channel=0).pixels)
    with pytest.raises(BadInputError, match=r"no channel named 'RFP'; its channels are 'DAPI'"):
        imageio.read_image(path, scene=0, channel="RFP")
    with pytest.raises(BadInputError, match=r"holds 3 scenes"):
        imageio.read_image(path, channel=0)
    with pytest.raises(BadInputError, match=r"has 3 scene\(s\), so scene 3 does not exist"):
        imageio.read_image(path, scene=3, channel=0)
    with pytest.raises(BadInputError, match=r"declares .* more than input.max_pixels"):
        imageio.read_image(path, scene=0, channel=0, max_pixels=1000)


def test_a_channel_name_needs_a_file_that_names_channels(tmp_path: Path):
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, np.zeros((2, 20, 20), np.uint8), metadata={"axes": "CYX"})
    with pytest.raises(BadInputError, match=r"does not name its channels.*channel number"):
        imageio.read_image(plain, channel="DAPI")
    ome = tmp_path / "named.ome.tif"
    data = np.stack([np.full((20, 20), 7, np.uint8), np.full((20, 20), 9, np.uint8)])
    tifffile.imwrite(ome, data, metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "GFP"]}})
    assert imageio.read_image(ome, channel="gfp").pixels[0, 0] == 9


def test_a_truncated_czi_is_not_complete_and_fails_with_the_readers_error(tmp_path: Path):
    whole = write_czi(tmp_path / "whole.czi")
    assert looks_complete(whole) and vendor.opens_whole(whole)
    cut = tmp_path / "cut.czi"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    assert not looks_complete(cut)
    with pytest.raises(
        BadInputError, match=r"cut.czi is not a readable Zeiss CZI .*bioio-czi says: .*\S"
    ):
        imageio.scene_count(cut)
    garbage = tmp_path / "garbage.czi"
    garbage.write_bytes(b"ZISRAWFILE" + bytes(300))
    assert not looks_complete(garbage)


def test_the_vendor_suffixes_follow_the_installed_extras(monkeypatch):
    assert set(installed_vendor_suffixes()) == {".czi", ".nd2", ".lif"}  # CI installs all
    assert {".czi", ".nd2", ".lif"} <= set(Config().input.extensions)
    assert {"*.czi", "*.nd2", "*.lif"} <= set(Config().watch.include)
    assert imageio.is_supported(Path("/data/plate.CZI"))
    every_extra = Config().settings_hash()
    monkeypatch.setitem(sys.modules, "bioio_nd2", None)  # as if cellwatch[nd2] were missing
    assert installed_vendor_suffixes() == (".czi", ".lif")
    assert "*.nd2" not in Config().watch.include and ".nd2" not in Config().input.extensions
    assert Config().settings_hash() == every_extra  # the counts' settings did not change


# --- counting: predict -----------------------------------------------------------------------


@pytest.mark.parametrize("workers", ["0", "1"], ids=["in this process", "one Dask worker"])
def test_predict_counts_each_czi_scene_as_an_image(
    threshold_model, tmp_path: Path, capsys, workers: str
):
    czi = write_czi(tmp_path / "in" / "plate.czi")
    tif = tmp_path / "in" / "single.tif"
    tifffile.imwrite(tif, discs((64, 64), [(20, 20), (44, 44)], 6)[0])
    config = tmp_path / "c.yaml"
    config.write_text("input:\n  channel: DAPI\ntiling:\n  tile_size: 64\n  overlap: 8\n")
    out = tmp_path / "out"
    argv = ["predict", str(czi.parent), "--out", str(out), "--model", str(threshold_model)]
    argv += ["--workers", workers]  # a Dask worker gets one task per scene
    # channel DAPI: the TIFF names no channels, so it fails and says why
    assert cli.main([*argv, "--config", str(config), "--quiet"]) == 1
    assert "3 of 4 images counted" in capsys.readouterr().err
    rows = ledger.read(out / "ledger.csv")
    scenes = rows[rows["image"].str.endswith("plate.czi")]
    assert list(scenes["scene"]) == ["0", "1", "2"]
    assert list(scenes["cell_count"]) == [len(c) for c in SCENE_DISCS]
    assert (scenes["pixel_size_um"] == PIXEL_UM).all()  # from the CZI metadata
    assert scenes["job_id"].nunique() == 1  # one file version
    assert np.allclose(scenes["mean_area_um2"] / scenes["mean_area_px"], PIXEL_UM**2)
    single = rows[rows["image"].str.endswith("single.tif")].iloc[0]
    assert pd.isna(single["scene"]) and single["status"] == "failed"
    assert "does not name its channels" in single["error"]
    for k, n in enumerate(len(c) for c in SCENE_DISCS):
        labels = tifffile.imread(out / "labels" / f"plate_s{k}.tif")
        assert len(np.unique(labels)) - 1 == n
        assert (out / "overlays" / f"plate_s{k}.png").is_file()
    cells = pd.read_csv(out / "cells.csv", dtype={"scene": str})
    assert cells.groupby("scene").size().tolist() == [len(c) for c in SCENE_DISCS]


def test_nd2_and_lif_through_the_bioio_interface(
    threshold_model, tmp_path: Path, nd2_and_lif_stubs
):
    """Channel by name, max projection over Z, pixel size from the file, one row per scene;
    a file of one scene has an empty scene."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    wells = [[(20, 20), (50, 60)], [(30, 30), (30, 70), (60, 50)]]
    write_stub(inbox / "run.nd2", [stack_of(c) for c in wells], ["DIC", "Hoechst"], 0.325)
    write_stub(inbox / "one.lif", [stack_of([(40, 40)])], ["Bright", "DAPI"], 0.5)
    assert looks_complete(inbox / "run.nd2") and imageio.scene_count(inbox / "run.nd2") == 2
    out = tmp_path / "out"
    config = tmp_path / "c.yaml"
    config.write_text("input:\n  channel: 1\ntiling:\n  tile_size: 64\n  overlap: 8\n")
    argv = ["predict", str(inbox), "--out", str(out), "--model", str(threshold_model)]
    assert cli.main([*argv, "--config", str(config), "--quiet"]) == 0
    rows = ledger.read(out / "ledger.csv").set_index("image")
    nd2 = rows.loc[str(inbox / "run.nd2")]
    assert list(nd2["scene"]) == ["0", "1"] and list(nd2["cell_count"]) == [2, 3]
    assert (nd2["pixel_size_um"] == 0.325).all()
    lif = rows.loc[str(inbox / "one.lif")]
    assert pd.isna(lif["scene"]) and lif["cell_count"] == 1 and lif["pixel_size_um"] == 0.5
    assert (out / "labels" / "run_s1.tif").is_file() and (out / "labels" / "one.tif").is_file()
    by_name = imageio.read_image(inbox / "run.nd2", scene=1, channel="hoechst")
    assert np.array_equal(by_name.pixels, imageio.read_image(inbox / "run.nd2", scene=1,
                                                              channel=1).pixels)  # fmt: skip
    assert "max projection of 3 planes" in by_name.note
    one_plane = imageio.read_image(inbox / "run.nd2", scene=1, channel=1, stack="plane", plane=2)
    assert np.array_equal(one_plane.pixels, stack_of(wells[1])[0, 1, 2])


def test_a_format_whose_extra_is_missing_gets_a_failed_row_with_the_install_hint(
    threshold_model, tmp_path: Path, monkeypatch
):
    """The daemon's worker with the real pipeline: a failed row naming the extra, the job
    failed (not retried), and the file beside it still counted."""
    monkeypatch.setitem(sys.modules, "bioio_nd2", None)  # as if cellwatch[nd2] were missing
    paths = Paths(tmp_path / "inbox", tmp_path / "out", tmp_path / "state")
    paths.inbox.mkdir()
    (paths.inbox / "run.nd2").write_bytes(b"ND2 bytes the reader never sees")
    assert looks_complete(paths.inbox / "run.nd2")  # no waiting for a file nothing opens
    good = paths.inbox / "good.tif"
    tifffile.imwrite(good, discs((64, 64), [(20, 20), (44, 44)], 6)[0])
    config = Config()
    engine = Engine(config, Segmenter(config, load_model(threshold_model)))
    names = ("run.nd2", "good.tif")
    with JobQueue(paths.db) as queue:
        queue.add([FileVersion(n, 1, 1, imageio.sha256_file(paths.inbox / n)) for n in names])
        worker = LocalRunner(paths, engine, Recorder(paths, {}), stop=threading.Event(),
                             wake=threading.Event())  # fmt: skip
        assert worker.work(queue)
        assert queue.counts() == {"pending": 0, "running": 0, "done": 1, "failed": 1}
    rows = ledger.read(paths.ledger).set_index("image")
    error = rows.loc[str(paths.inbox / "run.nd2"), "error"]
    assert "pip install 'cellwatch[nd2]'" in error and "Nikon ND2" in error
    assert rows.loc[str(good), "cell_count"] == 2


# --- the daemon: exactly once per (file, scene) through a kill -9 ----------------------------


@pytest.fixture
def cellwatch_daemon(tmp_path: Path):
    """``make(config)``: the real ``cellwatch watch`` on tmp/inbox (test_daemon's helper)."""
    runs: list[Cellwatch] = []

    def make(config: Path) -> Cellwatch:
        runs.append(Cellwatch(tmp_path, config))
        return runs[-1]

    yield make
    for run in runs:
        run.close()


def test_daemon_counts_each_scene_once_through_a_kill_in_the_middle_of_a_file(
    cellwatch_daemon, tmp_path: Path, threshold_model: Path
):
    config = write_config(tmp_path / "config.yaml", threshold_model, stable_time_s=0.3)
    settings = load_config(config)
    # a scene per group, so the rows land one by one
    text = config.read_text().replace("batch_size: 8", "batch_size: 1\n  images_at_once: 1")
    config.write_text(text + "input:\n  channel: DAPI\n")
    assert "*.czi" in settings.watch.include
    cw = cellwatch_daemon(config)
    # large scenes (network passes over ~350 small tiles each) so the kill lands mid-file
    big = [[(60 + 90 * i, 60 + 90 * j) for i in range(k + 2) for j in range(3)] for k in range(3)]
    write_czi(tmp_path / "plate.czi", big, shape=(900, 900), radius=20)
    cw.start()
    os.rename(tmp_path / "plate.czi", cw.inbox / "plate.czi")  # moved in whole
    at_kill = cw.wait_rows(lambda rows: len(rows) >= 1, timeout=120)
    cw.kill()
    landed = len(cw.rows())
    assert 1 <= landed < 3, f"the kill came after {landed} of 3 scenes"
    cw.start()
    cw.wait_rows(lambda rows: len(rows) >= 3, timeout=180)
    time.sleep(1.0)  # a doubled row would land now
    assert cw.stop() == 0
    rows = cw.rows()
    assert sorted(r["scene"] for r in rows) == ["0", "1", "2"]
    assert {r["scene"]: int(r["cell_count"]) for r in rows} == {
        str(k): len(c) for k, c in enumerate(big)
    }
    assert all(float(r["pixel_size_um"]) == PIXEL_UM for r in rows)
    check_files_whole(cw.out)
    second = (tmp_path / "daemon-2.log").read_text()
    assert "plate.czi scene 0:" not in second  # its row had landed: not counted again
    assert [r["scene"] for r in at_kill][:1] == ["0"]
    with JobQueue(cw.out / ".state" / "jobs.sqlite3", readonly=True) as queue:
        assert queue.counts()["done"] == 1


def test_daemon_on_a_dask_worker_counts_each_scene_once(
    cellwatch_daemon, tmp_path: Path, threshold_model: Path
):
    """With ``compute.workers: 1`` the driver hands Dask one task per scene and records
    each scene's row once; the file's job is done when all three are in."""
    config = write_config(tmp_path / "config.yaml", threshold_model, stable_time_s=0.3)
    config.write_text(config.read_text() + "input:\n  channel: DAPI\ncompute:\n  workers: 1\n")
    cw = cellwatch_daemon(config)
    write_czi(tmp_path / "plate.czi")
    cw.start()
    os.rename(tmp_path / "plate.czi", cw.inbox / "plate.czi")
    cw.wait_rows(lambda rows: len(rows) >= 3, timeout=180)
    time.sleep(1.0)  # a doubled row would land now
    assert cw.stop() == 0
    rows = cw.rows()
    assert sorted(r["scene"] for r in rows) == ["0", "1", "2"]
    assert {r["scene"]: int(r["cell_count"]) for r in rows} == {
        str(k): len(c) for k, c in enumerate(SCENE_DISCS)
    }
    assert len({r["job_id"] for r in rows}) == 1
    check_files_whole(cw.out)
    with JobQueue(cw.out / ".state" / "jobs.sqlite3", readonly=True) as queue:
        assert queue.counts()["done"] == 1


# --- ledger files from an older cellwatch ------------------------------------------------------


OLD_COLUMNS = ledger.COLUMNS[: ledger.COLUMNS.index("scene")]
OLD_CELL_COLUMNS = ledger.CELL_COLUMNS[: ledger.CELL_COLUMNS.index("scene")]


def old_ledger(out: Path) -> bytes:
    """ledger.csv and cells.csv as cellwatch wrote them before the scene column."""
    out.mkdir(parents=True, exist_ok=True)
    row = {"processed_at": "2026-11-27T09:00:00+00:00", "image": "/in/a.tif", "status": "ok",
           "cell_count": 2, "job_id": "job-a", "model": "m@1", "settings_hash": "abc"}  # fmt: skip
    text = ",".join(OLD_COLUMNS) + "\n" + ledger.format_rows([row], OLD_COLUMNS)
    (out / "ledger.csv").write_text(text)
    cells = [{"image": "/in/a.tif", "job_id": "job-a", "label": k, "area_px": 40.0} for k in (1, 2)]
    (out / "cells.csv").write_text(
        ",".join(OLD_CELL_COLUMNS) + "\n" + ledger.format_rows(cells, OLD_CELL_COLUMNS)
    )
    return text.encode()


def scene_result(k: int, n: int) -> ImageResult:
    row = {"processed_at": f"2026-11-27T10:0{k}:00+00:00", "image": "/in/p.czi", "status": "ok",
           "cell_count": n, "job_id": "job-p", "scene": k, "model": "m@1", "settings_hash": "abc"}  # fmt: skip
    cells = pd.DataFrame({"image": "/in/p.czi", "job_id": "job-p", "label": np.arange(1, n + 1),
                          "area_px": 50.0, "scene": k})  # fmt: skip
    return ImageResult(row, cells)


def test_an_old_ledger_gets_the_scene_column_once_and_keeps_its_rows(tmp_path: Path):
    out = tmp_path / "out"
    before = old_ledger(out)
    old_cells = (out / "cells.csv").read_bytes()
    record(scene_result(0, 3), out)
    record(scene_result(1, 3), out)
    text = (out / "ledger.csv").read_bytes()
    header, rest = text.split(b"\n", 1)
    assert tuple(header.decode().split(",")) == ledger.COLUMNS
    assert rest.startswith(before.split(b"\n", 1)[1])  # the old row, byte for byte
    plain = pd.read_csv(out / "ledger.csv")  # what a lab's own script does
    assert plain["scene"].tolist()[0] != plain["scene"].tolist()[0]  # NaN: the old row
    assert plain["scene"].tolist()[1:] == [0, 1]
    cells = pd.read_csv(out / "cells.csv")
    assert tuple(cells.columns) == ledger.CELL_COLUMNS and len(cells) == 8
    assert (
        (out / "cells.csv").read_bytes().split(b"\n", 1)[1].startswith(old_cells.split(b"\n", 1)[1])
    )
    assert ledger.recorded(out / "ledger.csv") == {
        ("job-a", ""): "ok",
        ("job-p", "0"): "ok",
        ("job-p", "1"): "ok",
    }
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temp files
    build_reports(out / "ledger.csv", out, start=date(2026, 11, 27), end=date(2026, 11, 27),
                  cells_path=out / "cells.csv")  # fmt: skip
    page = (out / "reports" / "2026-11-27.html").read_text()
    assert "Cell-area histogram of 8 cells" in page  # both scenes' cells 1..3, not deduplicated


def test_a_foreign_csv_is_never_appended_to(tmp_path: Path):
    path = tmp_path / "ledger.csv"
    path.write_text("when,file,count\n2026-11-27,a.tif,3\n")
    with pytest.raises(ledger.LedgerError, match=r"not those this cellwatch writes"):
        ledger.append_rows(path, [{"image": "b.tif"}])
    assert path.read_text() == "when,file,count\n2026-11-27,a.tif,3\n"


def test_an_appender_that_waited_for_the_lock_writes_to_the_new_copy(tmp_path: Path):
    """While one process gives the file its longer header (a copy renamed into place),
    another that opened the old file and waited for the lock must not append to the old,
    unlinked copy: its row would be lost."""
    import fcntl

    out = tmp_path / "out"
    old_ledger(out)
    path = out / "ledger.csv"
    holder = os.open(path, os.O_WRONLY | os.O_APPEND)
    fcntl.flock(holder, fcntl.LOCK_EX)  # the other process, in the middle of its upgrade
    waiting = threading.Thread(target=record, args=(scene_result(0, 1), out))
    waiting.start()
    time.sleep(0.3)  # it has opened the old file and waits for the lock
    assert waiting.is_alive()
    text = path.read_text().split("\n", 1)[1]
    fresh = path.with_name("fresh.csv")
    fresh.write_text(",".join(ledger.COLUMNS) + "\n" + text)
    os.replace(fresh, path)  # the upgrade lands
    fcntl.flock(holder, fcntl.LOCK_UN)
    os.close(holder)
    waiting.join(10)
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["job_id"], r["scene"]) for r in rows] == [("job-a", None), ("job-p", "0")]


def test_status_and_report_read_ledgers_with_and_without_scenes(tmp_path: Path):
    out = tmp_path / "out"
    old_ledger(out)
    with JobQueue(out / ".state" / "jobs.sqlite3"):
        pass
    config = Config(output=OutputConfig(dir=str(out)))
    now = pd.Timestamp("2026-11-27T12:00:00+00:00").to_pydatetime()
    assert status.collect(config, now=now)["today"]["counted"] == 1  # the old file, as it is
    build_reports(out / "ledger.csv", out, start=date(2026, 11, 27), end=date(2026, 11, 27))
    for k, n in ((1, 3), (0, 2)):  # scene 1 is written first: scenes run side by side
        record(scene_result(k, n), out)
    ledger.append_rows(out / "ledger.csv", [{
        "processed_at": "2026-11-27T10:00:30+00:00", "image": "/in/b.tif", "status": "ok",
        "cell_count": 5, "job_id": "job-b"}])  # fmt: skip
    assert status.collect(config, now=now)["today"]["counted"] == 4
    build_reports(out / "ledger.csv", out, start=date(2026, 11, 27), end=date(2026, 11, 27))
    page = (out / "reports" / "2026-11-27.html").read_text()
    table = page.split('<table id="images">', 1)[1]
    names = [n for n in ("a.tif", "p.czi · scene 0", "p.czi · scene 1", "b.tif") if n in table]
    assert names == ["a.tif", "p.czi · scene 0", "p.czi · scene 1", "b.tif"]
    positions = [table.index(n) for n in names]
    assert positions == sorted(positions)  # the scenes under their file, in scene order
    day = pd.read_csv(out / "reports" / "2026-11-27.csv", dtype={"scene": str})
    assert day["scene"].fillna("").tolist() == ["", "0", "1", ""]
