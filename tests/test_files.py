"""What microscopes really write: every series of a TIFF, vendor files bioio's plugins
cannot read, and the nuclear channel found by name.

Files are written here with the writers that exist (tifffile for OME-TIFF, pylibCZIrw for
CZI); the Nikon ND2 in ``../shared/data/vendor/`` is a real file; Leica's λ- and XZ-scans,
for which no writer exists, come through bioio's reader interface (a stand-in reader).
"""

from __future__ import annotations

import importlib.machinery
import struct
import sys
import threading
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from conftest import discs
from pylibCZIrw import czi as pyczi  # the test extra installs it; so does cellwatch[czi]

from cellwatch import cli
from cellwatch.config import Config, load_config
from cellwatch.errors import BadInputError
from cellwatch.model import load_model
from cellwatch.pipeline import Segmenter, scenes_of
from cellwatch.service.engine import Engine, Paths
from cellwatch.service.jobs import FileVersion, JobQueue
from cellwatch.service.local_runner import LocalRunner
from cellwatch.service.recorder import Recorder
from cellwatch.service.watcher import looks_complete
from cellwatch.storage import imageio, ledger, vendor
from cellwatch.storage.channels import choose_channel, is_nuclear

ND2 = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "vendor" / "example-multichannel.nd2"
)
# Position k has k + 2 discs; GFP is a gradient, so the channel matters.
POSITIONS = [[(16 + 22 * i, 14 + 18 * i) for i in range(k + 2)] for k in range(3)]
SHAPE = (96, 100)


def position(k: int) -> np.ndarray:
    """(C=2, Y, X): DAPI discs, GFP gradient."""
    dapi = discs(SHAPE, POSITIONS[k], 6, value=200, background=10)[0]
    gfp = np.tile(np.linspace(0, 250, SHAPE[1]).astype(np.uint8), (SHAPE[0], 1))
    return np.stack([dapi, gfp])


def write_positions(path: Path, n: int = 3) -> Path:
    """An OME-TIFF of ``n`` stage positions, one OME Image (series) each, as
    Micro-Manager and bfconvert write them."""
    with tifffile.TiffWriter(path, ome=True) as tif:
        for k in range(n):
            tif.write(position(k), metadata={"axes": "CYX", "Name": f"Pos{k}",
                      "Channel": {"Name": ["DAPI 405", "GFP"]}, "PhysicalSizeX": 0.5})  # fmt: skip
    return path


def predict(folder: Path, out: Path, model: Path, *extra: str) -> pd.DataFrame:
    config = out.parent / "c.yaml"
    config.write_text("tiling:\n  tile_size: 64\n  overlap: 8\n")
    argv = ["predict", str(folder), "--out", str(out), "--model", str(model), "--quiet"]
    cli.main([*argv, "--config", str(config), *extra])
    return ledger.read(out / "ledger.csv")


# --- every position of a TIFF --------------------------------------------------------------


def test_each_position_of_an_ome_tiff_is_a_scene_counted_as_if_saved_alone(
    threshold_model, tmp_path: Path
):
    inbox = tmp_path / "in"
    inbox.mkdir()
    write_positions(inbox / "plate.ome.tif")
    for k in range(3):  # each position saved as its own TIFF
        tifffile.imwrite(inbox / f"alone{k}.ome.tif", position(k), metadata={
            "axes": "CYX", "Channel": {"Name": ["DAPI 405", "GFP"]}})  # fmt: skip
    assert imageio.scene_count(inbox / "plate.ome.tif") == 3
    assert scenes_of(inbox / "plate.ome.tif") == [0, 1, 2]
    rows = predict(inbox, tmp_path / "out", threshold_model).set_index("image")
    plate = rows.loc[str(inbox / "plate.ome.tif")]
    assert list(plate["scene"]) == ["0", "1", "2"]
    assert list(plate["status"]) == ["ok"] * 3
    alone = [rows.loc[str(inbox / f"alone{k}.ome.tif"), "cell_count"] for k in range(3)]
    assert list(plate["cell_count"]) == alone == [len(c) for c in POSITIONS]
    assert (plate["pixel_size_um"] == 0.5).all() and (plate["channel"] == "DAPI 405").all()
    for k in range(3):
        labels = tifffile.imread(tmp_path / "out" / "labels" / f"plate_s{k}.tif")
        assert labels.max() == len(POSITIONS[k])
    with pytest.raises(BadInputError, match=r"holds 3 series.*one scene must be named"):
        imageio.read_image(inbox / "plate.ome.tif")
    second = imageio.read_image(inbox / "plate.ome.tif", scene=1)
    assert "series 1 (Pos1) of 3" in second.note and second.scene == 1


def test_the_daemon_counts_each_position_once(threshold_model, tmp_path: Path):
    """The daemon's worker with the real pipeline: one row per position, the file's job
    done once, and nothing appended again when the job comes round a second time."""
    paths = Paths(tmp_path / "inbox", tmp_path / "out", tmp_path / "state")
    paths.inbox.mkdir()
    write_positions(paths.inbox / "plate.ome.tif")
    assert looks_complete(paths.inbox / "plate.ome.tif")
    config = Config()
    engine = Engine(config, Segmenter(config, load_model(threshold_model)))
    version = FileVersion("plate.ome.tif", 1, 1, imageio.sha256_file(paths.inbox / "plate.ome.tif"))
    with JobQueue(paths.db) as queue:
        queue.add([version])
        recorder = Recorder(paths, {})
        worker = LocalRunner(
            paths, engine, recorder, stop=threading.Event(), wake=threading.Event()
        )
        assert worker.work(queue)
        assert queue.counts()["done"] == 1
        assert not worker.work(queue)  # nothing left to do
    rows = ledger.read(paths.ledger)
    assert sorted(rows["scene"]) == ["0", "1", "2"]
    assert list(rows.sort_values("scene")["cell_count"]) == [len(c) for c in POSITIONS]


def test_pyramid_levels_and_slide_side_images_are_not_scenes(tmp_path: Path):
    base = discs((128, 128), [(40, 40), (90, 90)], 10)[0]
    pyramid = tmp_path / "pyramid.ome.tif"
    with tifffile.TiffWriter(pyramid, ome=True) as tif:
        tif.write(base, subifds=2, metadata={"axes": "YX", "Name": "slide"})
        tif.write(base[::2, ::2], subfiletype=1)
        tif.write(base[::4, ::4], subfiletype=1)
        tif.write(base[::8, ::8], subfiletype=1, metadata=None)  # a thumbnail series
        tif.write(np.zeros((20, 30), np.uint8), metadata={"Name": "label image"})
        tif.write(np.zeros((20, 40), np.uint8), metadata={"Name": "macro image"})
    with tifffile.TiffFile(pyramid) as tif:
        assert len(tif.series) == 4 and len(tif.series[0].levels) == 3
    assert imageio.scene_count(pyramid) == 1
    image = imageio.read_image(pyramid)
    assert image.pixels.shape == (128, 128) and np.array_equal(image.pixels, base)


def test_every_series_must_be_whole(tmp_path: Path):
    whole = write_positions(tmp_path / "whole.ome.tif")
    cut = tmp_path / "cut.ome.tif"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size - 3000])  # in the last series
    assert looks_complete(whole) and not looks_complete(cut)
    with pytest.raises(BadInputError, match=r"(incomplete|truncated)"):
        imageio.read_image(cut, scene=0)


# --- the nuclear channel found by name ------------------------------------------------------


STAINS = Config().input.nuclear_channels


@pytest.mark.parametrize(
    "name",
    [
        "DAPI",
        "dapi 405",
        "Hoechst 33342",
        "Hoechst33342",
        "DRAQ5",
        "SiR-DNA",
        "SiR DNA",
        "TO-PRO-3",
        "PI",
        "PI (red)",
        "propidium iodide",
        "H2B-GFP",
        "NucBlue Live",
        "SYTO 16",
        "SPY650-DNA",
    ],
)
def test_nuclear_channel_names(name: str):
    assert is_nuclear(name, STAINS)


@pytest.mark.parametrize(
    "name",
    [
        "Mono",
        "FITC BP",
        "GFP",
        "EPI",
        "PIEZO1",
        "PI3K",
        "Alexa 647",
        "SYTOX Green",
        "Brightfield",
        "TRITC BP",
        "pHrodo",
    ],
)
def test_names_that_are_not_nuclear(name: str):
    assert not is_nuclear(name, STAINS)


def test_auto_picks_the_nuclear_channel_and_says_what_to_set_when_it_cannot(tmp_path: Path):
    path = tmp_path / "x.tif"
    names = ("Mono", "DAPI", "FITC BP", "TRITC BP")
    assert choose_channel(path, "auto", names, 4, stains=STAINS) == 1
    assert choose_channel(path, 2, names, 4, stains=STAINS) == 2  # a number still wins
    assert choose_channel(path, "tritc bp", names, 4, stains=STAINS) == 3  # a name too
    assert choose_channel(path, "auto", ("GFP",), 1, stains=STAINS) == 0  # one channel
    assert choose_channel(path, "auto", None, 3, samples=True, stains=STAINS) is None  # RGB
    with pytest.raises(BadInputError, match=r"no channel named after a nuclear stain.*'Mono', "
                       r"'GFP'.*input.channel.*input.nuclear_channels"):  # fmt: skip
        choose_channel(path, "auto", ("Mono", "GFP"), 2, stains=STAINS)
    with pytest.raises(BadInputError, match=r"several nuclear channels \('DAPI', 'Hoechst'\)"):
        choose_channel(path, "auto", ("DAPI", "Hoechst", "GFP"), 3, stains=STAINS)
    assert choose_channel(path, "auto", ("Mono", "GFP"), 2, stains=("GFP",)) == 1


def test_rgb_with_auto_is_read_as_before(tmp_path: Path):
    gray = discs((40, 40), [(20, 20)], 6)[0]
    rgb = tmp_path / "he.png"
    from PIL import Image

    Image.fromarray(np.stack([gray] * 3, axis=-1)).save(rgb)
    image = imageio.read_image(rgb)
    assert np.array_equal(image.pixels, gray) and image.channel == ""
    colour = tmp_path / "colour.tif"
    tifffile.imwrite(colour, np.stack([gray, gray // 2, gray], axis=-1), photometric="rgb")
    with pytest.raises(BadInputError, match=r"3 channels that differ"):
        imageio.read_image(colour)


@pytest.mark.skipif(not ND2.exists(), reason="shared data not present")
def test_the_real_nd2_is_counted_on_dapi_at_default_settings(threshold_model, tmp_path: Path):
    inbox = tmp_path / "in"
    inbox.mkdir()
    (inbox / ND2.name).symlink_to(ND2)
    rows = predict(inbox, tmp_path / "out", threshold_model)
    row = rows.iloc[0]
    assert row["status"] == "ok", row["error"]
    assert row["channel"] == "DAPI" and row["pixel_size_um"] == pytest.approx(0.3234, abs=1e-3)
    dapi = imageio.read_image(ND2, channel=1)
    assert np.array_equal(imageio.read_image(ND2).pixels, dapi.pixels)


def test_the_channel_column_comes_last_and_old_ledgers_get_it(tmp_path: Path):
    assert ledger.COLUMNS[-1] == "channel"
    before = ledger.COLUMNS[:-1]  # the header the last cellwatch wrote
    path = tmp_path / "ledger.csv"
    old = {"image": "/in/a.tif", "status": "ok", "cell_count": 3, "job_id": "j1"}
    path.write_text(",".join(before) + "\n" + ledger.format_rows([old], before))
    ledger.append_rows(path, [{"image": "/in/b.nd2", "status": "ok", "job_id": "j2",
                               "channel": "DAPI"}])  # fmt: skip
    assert path.read_text().split("\n", 1)[0] == ",".join(ledger.COLUMNS)
    rows = ledger.read(path)
    assert rows["channel"].isna().tolist() == [True, False] and rows["channel"].iloc[1] == "DAPI"
    assert ledger.recorded(path) == {("j1", ""): "ok", ("j2", ""): "ok"}


def test_the_settings_hash_follows_the_channel_settings(tmp_path: Path):
    config = tmp_path / "c.yaml"
    config.write_text("input:\n  channel: auto\n")
    assert load_config(config).settings_hash() == Config().settings_hash()
    config.write_text("input:\n  nuclear_channels: [DAPI]\n")
    assert load_config(config).settings_hash() != Config().settings_hash()


# --- a good file is never called corrupt ----------------------------------------------------


def write_uncalibrated_czi(path: Path, scenes: list[list[tuple[int, int]]] = POSITIONS) -> Path:
    """A CZI of several scenes, channels DAPI and GFP, saved without a calibration as Zen
    does: its Scaling has Pixel items and no Distance."""
    gfp = np.tile(np.arange(SHAPE[1], dtype=np.uint16) * 50, (SHAPE[0], 1))
    with pyczi.create_czi(str(path), exist_ok=True) as czi:
        for s, centres in enumerate(scenes):
            dapi = np.where(discs(SHAPE, centres, 6)[1] > 0, 4000, 100).astype(np.uint16)
            for c, plane in enumerate((dapi, gfp)):
                czi.write(plane, plane={"C": c, "T": 0, "Z": 0}, scene=s, location=(s * 5000, 0))
        czi.write_metadata(document_name=path.stem, channel_names={0: "DAPI", 1: "GFP"})
    with pyczi.edit_czi(str(path)) as editor:
        root = ET.fromstring(editor.read_metadata_xml())
        dims = root.find("./Metadata/Information/Image/Dimensions")
        listed = ET.SubElement(ET.SubElement(dims, "S"), "Scenes")
        for s in range(len(scenes)):
            ET.SubElement(listed, "Scene", Index=str(s), Name=f"P{s + 1}")
        scaling = root.find("./Metadata/Scaling")
        if scaling is not None:
            root.find("./Metadata").remove(scaling)
        items = ET.SubElement(ET.SubElement(root.find("./Metadata"), "Scaling"), "Items")
        for axis in "XY":
            ET.SubElement(items, "Pixel", Id=axis)
        with editor.edit_session() as builder:
            builder.set_xml(ET.tostring(root, encoding="unicode"))
    return path


def test_a_czi_without_calibration_is_read_with_pylibczirw(threshold_model, tmp_path: Path):
    inbox = tmp_path / "in"
    inbox.mkdir()
    czi = write_uncalibrated_czi(inbox / "zen.czi")
    from bioio import BioImage
    from bioio_czi import Reader

    with pytest.raises(Exception, match=r"distance"):  # what bioio-czi does with it
        image = BioImage(str(czi), reader=Reader)
        image.set_scene(0)
        _ = image.physical_pixel_sizes
    assert looks_complete(czi) and imageio.scene_count(czi) == 3
    data = imageio.read_image(czi, scene=2)
    assert data.pixel_size_um is None and data.channel == "DAPI"
    assert "read with pylibCZIrw" in data.note and "scene 2 (P3) of 3" in data.note
    assert np.array_equal(data.pixels > 1000, discs(SHAPE, POSITIONS[2], 6)[1] > 0)
    rows = predict(inbox, tmp_path / "out", threshold_model)
    assert list(rows["status"]) == ["ok"] * 3, rows["error"].tolist()
    assert list(rows["cell_count"]) == [len(c) for c in POSITIONS]
    assert rows["pixel_size_um"].isna().all() and (rows["channel"] == "DAPI").all()


def test_damaged_czi_files_are_called_damaged_with_each_readers_words(tmp_path: Path):
    whole = write_uncalibrated_czi(tmp_path / "whole.czi")
    cut = tmp_path / "cut.czi"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(BadInputError, match=r"cut short.*bioio-czi says: .*pylibCZIrw says: \S"):
        imageio.scene_count(cut)
    other = tmp_path / "other.czi"
    other.write_bytes(b"PK\x03\x04" + bytes(400))
    with pytest.raises(BadInputError, match=r"not a Zeiss CZI file.*bioio-czi says"):
        imageio.read_image(other)


@pytest.mark.skipif(not ND2.exists(), reason="shared data not present")
def test_an_nd2_the_plugin_fails_on_is_read_with_nd2(tmp_path: Path, monkeypatch):
    plugin_read = imageio.read_image(ND2)
    monkeypatch.setitem(sys.modules, "bioio_nd2", failing_plugin("bioio_nd2"))
    data = imageio.read_image(ND2)
    assert "read with nd2" in data.note and data.channel == "DAPI"
    assert np.array_equal(data.pixels, plugin_read.pixels)
    assert data.pixel_size_um == pytest.approx(plugin_read.pixel_size_um)


def failing_plugin(name: str) -> types.ModuleType:
    class Reader:
        def __init__(self, image: object, **kwargs: object) -> None:
            raise ValueError("this plugin does not follow the file")

    module = types.ModuleType(name)
    module.Reader = Reader  # type: ignore[attr-defined]
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return module


# --- Leica acquisitions with no YX plane, through bioio's reader interface -----------------


def leica_xml(name: str, dims: dict[int, int]) -> ET.Element:
    """The XML bioio-lif gives as ``metadata``: the file's element tree, each image an
    Element with its DimensionDescriptions (DimID 1 X, 2 Y, 3 Z, 5 λ)."""
    root = ET.Element("LMSDataContainerHeader")
    element = ET.SubElement(ET.SubElement(root, "Element", Name="Project"), "Element", Name=name)
    described = ET.SubElement(ET.SubElement(ET.SubElement(element, "Data"), "Image"),
                              "ImageDescription")  # fmt: skip
    holder = ET.SubElement(described, "Dimensions")
    for dim_id, n in dims.items():
        ET.SubElement(holder, "DimensionDescription", DimID=str(dim_id), NumberOfElements=str(n))
    return root


def leica_plugin(shape: tuple[int, ...], name: str, dims: dict[int, int]) -> types.ModuleType:
    """A stand-in for bioio-lif: it reports the dimensions, then every pixel read fails."""
    import dask
    import dask.array as da
    from bioio.array_like_reader import ArrayLikeReader

    def fail() -> np.ndarray:
        raise ValueError("cannot reshape array of size 512 into shape (1,1,40,1,512)")

    class Reader(ArrayLikeReader):
        def __init__(self, image: object, fs_kwargs: object = None, **kwargs: object) -> None:
            lazy = da.from_delayed(dask.delayed(fail)(), shape, dtype=np.uint16)
            super().__init__(lazy, dim_order="TCZYX")

        @property
        def scenes(self) -> tuple[str, ...]:
            return (name,)  # as bioio-lif names them: the image's name

        @property
        def metadata(self) -> ET.Element:
            return leica_xml(name, dims)

    module = types.ModuleType("bioio_lif")
    module.Reader = Reader  # type: ignore[attr-defined]
    module.__spec__ = importlib.machinery.ModuleSpec("bioio_lif", None)
    return module


@pytest.mark.parametrize(
    ("shape", "dims", "words"),
    [
        (
            (1, 1, 40, 1, 512),
            {1: 512, 3: 40},
            r"series 0 \(XZ scan\) is an XZ line scan: no YX plane",
        ),
        ((1, 1, 32, 64, 64), {1: 64, 2: 64, 5: 32}, r"series 0 \(XZ scan\) is a λ-scan"),
    ],
    ids=["XZ", "lambda"],
)
def test_leica_scans_without_a_yx_plane_are_named_not_called_corrupt(
    tmp_path: Path, monkeypatch, shape, dims, words
):
    monkeypatch.setitem(sys.modules, "bioio_lif", leica_plugin(shape, "XZ scan", dims))
    path = tmp_path / "scan.lif"
    path.write_bytes(b"\x70\x00\x00\x00" + bytes(4) + b"\x2a" + bytes(200))
    with pytest.raises(BadInputError, match=words) as caught:
        imageio.read_image(path)
    assert "corrupt" not in str(caught.value) and "truncated" not in str(caught.value)
    assert vendor.scene_count(path) == 1


# --- Leica LIF files written byte by byte, as LAS X lays them out -------------------------


def write_lif(path: Path, images: list[tuple[str, np.ndarray, dict[int, int]]]) -> Path:
    """A LIF file: the XML header, then one memory block per image. ``images`` holds
    (name, 8-bit pixels, {Leica DimID: size}) with the DimIDs from slowest to fastest
    axis (1 X, 2 Y, 3 Z, 5 λ); pixels 0.5 µm apart."""
    elements, blocks = [], []
    for k, (name, array, dims) in enumerate(images):
        step, described = 1, []
        for dim_id, n in reversed(dims.items()):
            described.append(
                f'<DimensionDescription DimID="{dim_id}" NumberOfElements="{n}" Origin="0" '
                f'Length="{0.5e-6 * (n - 1)}" Unit="m" BytesInc="{step}" BitInc="0"/>'
            )
            step *= n
        channel = (
            '<ChannelDescription DataType="0" ChannelTag="0" Resolution="8" '
            'NameOfMeasuredQuantity="" Min="0" Max="255" Unit="" LUTName="Gray" '
            'IsLUTInverted="0" BytesInc="0" BitInc="0"/>'
        )
        data = np.ascontiguousarray(array, np.uint8).tobytes()
        elements.append(
            f'<Element Name="{name}"><Data><Image><ImageDescription><Channels>{channel}'
            f"</Channels><Dimensions>{''.join(described)}</Dimensions></ImageDescription>"
            f'</Image></Data><Memory Size="{len(data)}" MemoryBlockID="MemBlock_{k}"/>'
            "<Children/></Element>"
        )
        blocks.append((f"MemBlock_{k}", data))
    xml = (
        '<LMSDataContainerHeader Version="2"><Element Name="project"><Data><Experiment/>'
        f'</Data><Memory Size="0" MemoryBlockID="MemBlock_root"/><Children>{"".join(elements)}'
        "</Children></Element></LMSDataContainerHeader>"
    )
    out = struct.pack("<IIBI", 0x70, 2 * len(xml) + 5, 0x2A, len(xml)) + xml.encode("utf-16-le")
    for ident, data in [("MemBlock_root", b""), *blocks]:
        out += struct.pack("<IIBQBI", 0x70, 0, 0x2A, len(data), 0x2A, len(ident))
        out += ident.encode("utf-16-le") + data
    path.write_bytes(out)
    return path


def leica_series(path: Path) -> Path:
    """A field of discs, an XZ line scan and a λ-scan, in that order."""
    field = discs((64, 80), [(20, 20), (44, 56), (20, 60)], 7)[0]
    return write_lif(path, [("Field", field, {2: 64, 1: 80}),
                            ("XZ", np.zeros((8, 80)), {3: 8, 1: 80}),
                            ("Lambda", np.zeros((5, 64, 80)), {5: 5, 2: 64, 1: 80})])  # fmt: skip


def test_a_lif_field_is_counted_and_its_scans_without_a_yx_plane_are_named(
    threshold_model, tmp_path: Path
):
    inbox = tmp_path / "in"
    inbox.mkdir()
    lif = leica_series(inbox / "run.lif")
    assert looks_complete(lif) and imageio.scene_count(lif) == 3
    with pytest.raises(BadInputError, match=r"series 1 \(XZ\) is an XZ line scan: no YX plane"):
        imageio.read_image(lif, scene=1)
    with pytest.raises(BadInputError, match=r"series 2 \(Lambda\) is a λ-scan"):
        imageio.read_image(lif, scene=2)
    rows = predict(inbox, tmp_path / "out", threshold_model)
    assert list(rows["status"]) == ["ok", "failed", "failed"]
    assert rows["cell_count"].iloc[0] == 3 and rows["pixel_size_um"].iloc[0] == 0.5
    assert not rows["error"].str.contains("corrupt|truncated|damaged").any()


def test_a_lif_the_plugin_fails_on_is_read_with_liffile(tmp_path: Path, monkeypatch):
    lif = leica_series(tmp_path / "run.lif")
    plugin_read = imageio.read_image(lif, scene=0)
    monkeypatch.setitem(sys.modules, "bioio_lif", failing_plugin("bioio_lif"))
    assert imageio.scene_count(lif) == 3
    data = imageio.read_image(lif, scene=0)
    assert "read with liffile" in data.note and data.pixel_size_um == pytest.approx(0.5)
    assert np.array_equal(data.pixels, plugin_read.pixels)
    with pytest.raises(BadInputError, match=r"series 1 \(XZ\) is an XZ line scan"):
        imageio.read_image(lif, scene=1)


def test_a_cut_lif_is_called_cut_short(tmp_path: Path):
    field = discs((64, 80), [(20, 20), (44, 56)], 7)[0]
    whole = write_lif(tmp_path / "whole.lif", [("Field", field, {2: 64, 1: 80})])
    cut = tmp_path / "cut.lif"
    cut.write_bytes(whole.read_bytes()[:-2000])  # inside the image's memory block
    assert not looks_complete(cut)
    with pytest.raises(BadInputError, match=r"cut short.*bioio-lif says: \S.*liffile says: \S"):
        imageio.read_image(cut)
