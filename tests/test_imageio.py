"""Tests for cellwatch.storage.imageio: every reader path, every error path, and the writers."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import imagej_header, ome_header, write_pages
from PIL import Image

from cellwatch.errors import BadInputError, TransientError
from cellwatch.storage import imageio, overlay
from cellwatch.storage.imageio import (
    ImageData,
    is_supported,
    read_image,
    sha256_file,
    tiff_incomplete,
    write_labels,
)
from cellwatch.storage.overlay import OUTLINE_RGB, write_overlay


def _ramp(shape: tuple[int, ...], dtype: type = np.uint8) -> np.ndarray:
    values = np.arange(int(np.prod(shape))) % 200
    return values.reshape(shape).astype(dtype)


def _png_bytes(width: int, height: int) -> bytes:
    """A PNG whose header declares width × height, with almost no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 10))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def rgb_differs() -> np.ndarray:
    rgb = np.zeros((6, 5, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 20, 30
    return rgb


# --- plain gray images -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_gray_tiff_keeps_dtype_and_values(tmp_path, dtype):
    data = _ramp((7, 9), dtype)
    tifffile.imwrite(tmp_path / "a.tif", data)
    image = read_image(tmp_path / "a.tif")
    assert isinstance(image, ImageData)
    assert image.pixels.dtype == dtype
    np.testing.assert_array_equal(image.pixels, data)
    assert image.pixel_size_um is None
    assert image.path == tmp_path / "a.tif"
    assert image.note == ""


def test_big_endian_tiff_reads_same_values(tmp_path):
    data = _ramp((4, 5), np.uint16)
    tifffile.imwrite(tmp_path / "be.tiff", data, byteorder=">")
    np.testing.assert_array_equal(read_image(tmp_path / "be.tiff").pixels, data)


def test_bool_tiff_becomes_uint8(tmp_path):
    data = _ramp((4, 4)) > 100
    tifffile.imwrite(tmp_path / "mask.tif", data)
    image = read_image(tmp_path / "mask.tif")
    assert image.pixels.dtype == np.uint8
    np.testing.assert_array_equal(image.pixels, data.astype(np.uint8))


def test_one_pixel_tiff(tmp_path):
    tifffile.imwrite(tmp_path / "one.tif", np.array([[7]], np.uint8))
    assert read_image(tmp_path / "one.tif").pixels.shape == (1, 1)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_gray_png(tmp_path, dtype):
    data = _ramp((6, 8), dtype) * (300 if dtype == np.uint16 else 1)
    Image.fromarray(data).save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png")
    assert image.pixels.dtype == dtype
    np.testing.assert_array_equal(image.pixels, data)
    assert image.pixel_size_um is None


def test_gray_jpeg_upper_case_name(tmp_path):
    data = np.full((16, 16), 128, np.uint8)
    Image.fromarray(data).save(tmp_path / "A.JPG", quality=95)
    image = read_image(tmp_path / "A.JPG")
    assert image.pixels.shape == (16, 16)
    assert image.pixels.dtype == np.uint8
    assert np.abs(image.pixels.astype(int) - 128).max() <= 2


# --- channels ----------------------------------------------------------------------------


def test_rgb_with_equal_channels_is_gray(tmp_path):
    gray = _ramp((6, 5))
    Image.fromarray(np.stack([gray] * 3, axis=-1)).save(tmp_path / "rgb.png")
    tifffile.imwrite(tmp_path / "rgb.tif", np.stack([gray] * 3, axis=-1), photometric="rgb")
    for name in ("rgb.png", "rgb.tif"):
        image = read_image(tmp_path / name)
        np.testing.assert_array_equal(image.pixels, gray)
        assert "3 equal channels" in image.note


def test_jpeg_colour_with_equal_channels_is_gray(tmp_path):
    rgb = np.full((16, 16, 3), 90, np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.jpeg")
    assert read_image(tmp_path / "c.jpeg").pixels.shape == (16, 16)


@pytest.mark.parametrize("name", ["c.png", "c.tif"])
def test_rgb_with_different_channels_needs_a_channel(tmp_path, rgb_differs, name):
    if name.endswith(".png"):
        Image.fromarray(rgb_differs).save(tmp_path / name)
    else:
        tifffile.imwrite(tmp_path / name, rgb_differs, photometric="rgb")
    with pytest.raises(
        BadInputError, match=r"c\.(png|tif) has 3 channels that differ.*input\.channel"
    ):
        read_image(tmp_path / name)
    image = read_image(tmp_path / name, channel=1)
    np.testing.assert_array_equal(image.pixels, np.full((6, 5), 20, np.uint8))
    assert image.note == "channel 1 of 3"


def test_channel_out_of_range_names_the_count(tmp_path, rgb_differs):
    Image.fromarray(rgb_differs).save(tmp_path / "c.png")
    with pytest.raises(BadInputError, match=r"has 3 channel\(s\), so input\.channel = 3.*0 to 2"):
        read_image(tmp_path / "c.png", channel=3)


def test_rgba_drops_alpha(tmp_path):
    gray = _ramp((6, 5))
    alpha = np.full_like(gray, 255)
    Image.fromarray(np.stack([gray, gray, gray, alpha], axis=-1)).save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png")
    np.testing.assert_array_equal(image.pixels, gray)
    assert "alpha dropped" in image.note


def test_rgba_tiff_drops_alpha_and_counts_three_channels(tmp_path, rgb_differs):
    rgba = np.concatenate([rgb_differs, np.full((6, 5, 1), 255, np.uint8)], axis=-1)
    tifffile.imwrite(tmp_path / "a.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    with pytest.raises(BadInputError, match="3 channels that differ"):
        read_image(tmp_path / "a.tif")
    assert read_image(tmp_path / "a.tif", channel=2).pixels.max() == 30


def test_gray_alpha_png(tmp_path):
    gray = _ramp((4, 4))
    Image.fromarray(np.stack([gray, gray], axis=-1), mode="LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(tmp_path / "la.png").pixels, gray)


def test_palette_png_is_read(tmp_path):
    gray = _ramp((5, 5))
    Image.fromarray(gray).convert("P").save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").pixels.shape == (5, 5)


# --- stacks ------------------------------------------------------------------------------


@pytest.fixture
def zstack(tmp_path) -> tuple[Path, np.ndarray]:
    stack = np.stack([_ramp((6, 7), np.uint16) * k for k in range(1, 5)])
    stack[1, 0, 0] = 9999  # the max projection must find a value from a middle plane
    tifffile.imwrite(tmp_path / "z.tif", stack, metadata={"axes": "ZYX"})
    return tmp_path / "z.tif", stack


def test_zstack_max_projection(zstack):
    path, stack = zstack
    image = read_image(path)
    np.testing.assert_array_equal(image.pixels, stack.max(axis=0))
    assert image.pixels[0, 0] == 9999
    assert image.note == "max projection of 4 planes"


def test_zstack_choose_plane(zstack):
    path, stack = zstack
    image = read_image(path, stack="plane", plane=2)
    np.testing.assert_array_equal(image.pixels, stack[2])
    assert image.note == "plane 2 of 4"


def test_zstack_plane_out_of_range(zstack):
    path, _ = zstack
    with pytest.raises(BadInputError, match=r"z\.tif has 4 plane\(s\), so input\.plane = 4"):
        read_image(path, stack="plane", plane=4)


def test_unknown_stack_mode_is_a_programming_error(zstack):
    with pytest.raises(ValueError, match="stack must be"):
        read_image(zstack[0], stack="mean")  # type: ignore[arg-type]


def test_time_and_channel_hyperstack(tmp_path):
    data = _ramp((2, 3, 2, 5, 6), np.uint16)  # T, Z, C, Y, X
    tifffile.imwrite(tmp_path / "h.tif", data, imagej=True, metadata={"axes": "TZCYX"})
    image = read_image(tmp_path / "h.tif", channel=1)
    np.testing.assert_array_equal(image.pixels, data[:, :, 1].max(axis=(0, 1)))
    assert image.note == "channel 1 of 2; max projection of 6 planes"
    plane = read_image(tmp_path / "h.tif", channel=0, stack="plane", plane=4)
    np.testing.assert_array_equal(plane.pixels, data[1, 1, 0])  # flat index 4 = (t=1, z=1)


def test_plain_multipage_tiff_is_a_stack(tmp_path):
    data = _ramp((3, 5, 6))
    tifffile.imwrite(tmp_path / "pages.tif", data, photometric="minisblack", metadata=None)
    np.testing.assert_array_equal(read_image(tmp_path / "pages.tif").pixels, data.max(axis=0))


# --- pixel size --------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "unit", "expected"), [(0.65, "µm", 0.65), (325.0, "nm", 0.325)])
def test_ome_physical_size(tmp_path, value, unit, expected):
    meta = {"axes": "ZYX", "PhysicalSizeX": value, "PhysicalSizeXUnit": unit}
    tifffile.imwrite(tmp_path / "a.ome.tif", _ramp((2, 8, 8)), ome=True, metadata=meta)
    image = read_image(tmp_path / "a.ome.tif")
    assert image.pixel_size_um == pytest.approx(expected)
    assert image.pixels.shape == (8, 8)


@pytest.mark.parametrize(
    ("resolution", "unit", "expected"),
    [
        ((1 / 0.5, 1 / 0.5), "micrometer", 0.5),
        ((20_000, 20_000), "centimeter", 0.5),
        ((1 / 0.5, 1 / 0.5), "centimeter", 5_000.0),
        ((50_800, 50_800), "inch", 0.5),
        ((72, 72), "inch", None),  # desktop-software default, not a measurement
        ((1, 1), "none", None),
        ((3, 3), "none", None),
    ],
)
def test_tiff_resolution_tags(tmp_path, resolution, unit, expected):
    tifffile.imwrite(tmp_path / "r.tif", _ramp((4, 4)), resolution=resolution, resolutionunit=unit)
    size = read_image(tmp_path / "r.tif").pixel_size_um
    assert size == (pytest.approx(expected) if expected else None)


@pytest.mark.parametrize("unit", ["um", "micron", "\\u00B5m"])
def test_imagej_unit_counts_as_micrometre(tmp_path, unit):
    meta = {"axes": "ZYX", "unit": unit}
    tifffile.imwrite(
        tmp_path / "ij.tif", _ramp((2, 4, 4)), imagej=True, resolution=(2.5, 2.5), metadata=meta
    )
    assert read_image(tmp_path / "ij.tif").pixel_size_um == pytest.approx(0.4)


def test_broken_ome_xml_costs_the_pixel_size_not_the_image(tmp_path):
    broken = '<?xml version="1.0"?><OME xmlns="x"><Image></OME>'
    tifffile.imwrite(tmp_path / "b.tif", _ramp((4, 4)), description=broken, metadata=None)
    image = read_image(tmp_path / "b.tif")
    assert image.pixel_size_um is None
    np.testing.assert_array_equal(image.pixels, _ramp((4, 4)))


def test_zero_resolution_is_unknown(tmp_path):
    zero = ((0, 1), (0, 1))
    tifffile.imwrite(tmp_path / "z.tif", _ramp((4, 4)), resolution=zero, resolutionunit=3)
    assert read_image(tmp_path / "z.tif").pixel_size_um is None


# --- broken and hostile files ------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(BadInputError, match=r"nope\.tif does not exist"):
        read_image(tmp_path / "nope.tif")


def test_folder_is_not_a_file(tmp_path):
    (tmp_path / "dir.tif").mkdir()
    with pytest.raises(BadInputError, match=r"dir\.tif is not a file"):
        read_image(tmp_path / "dir.tif")


@pytest.mark.parametrize(
    ("error", "expected", "pattern"),
    [
        (PermissionError(13, "Permission denied"), BadInputError, "permission denied"),
        (OSError(5, "Input/output error"), TransientError, "could not be opened.*try again"),
    ],
)
def test_os_errors_on_open(tmp_path, monkeypatch, error, expected, pattern):
    tifffile.imwrite(tmp_path / "a.tif", _ramp((4, 4)))

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(Path, "open", fail)
    with pytest.raises(expected, match=pattern):
        read_image(tmp_path / "a.tif")


@pytest.mark.parametrize("name", ["e.tif", "e.png", "e.jpg"])
def test_empty_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(BadInputError, match=r"is empty \(0 bytes\)"):
        read_image(tmp_path / name)


def test_text_file_named_tif(tmp_path):
    (tmp_path / "notes.tif").write_text("exposure 200 ms, gain 2\n")
    with pytest.raises(BadInputError, match=r"notes\.tif is not a readable TIFF: not a TIFF"):
        read_image(tmp_path / "notes.tif")


@pytest.mark.parametrize("name", ["junk.tif", "junk.png", "junk.jpg"])
def test_random_bytes(tmp_path, name):
    (tmp_path / name).write_bytes(np.random.default_rng(0).bytes(500))
    with pytest.raises(BadInputError, match=r"junk\.(tif|png|jpg) is (not a readable|truncated)"):
        read_image(tmp_path / name)


def test_unsupported_extension(tmp_path):
    (tmp_path / "a.bmp").write_bytes(b"BM....")
    with pytest.raises(BadInputError, match="unsupported file type"):
        read_image(tmp_path / "a.bmp")


def test_truncated_tiff(tmp_path):
    tifffile.imwrite(tmp_path / "t.tif", _ramp((64, 64)))
    whole = (tmp_path / "t.tif").read_bytes()
    (tmp_path / "t.tif").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(BadInputError, match=r"t\.tif is truncated or corrupt.*Copy the file again"):
        read_image(tmp_path / "t.tif")


def _stack() -> np.ndarray:
    return np.stack([_ramp((40, 48)) + i for i in range(3)]).astype(np.uint8)


def _snapshots(tmp_path: Path, name: str, header: str) -> list[bytes]:
    """The file's bytes after each page a page-by-page writer adds."""
    path = tmp_path / name
    with path.open("wb") as fh:
        return [path.read_bytes() for _ in write_pages(fh, _stack(), header)]


def _incomplete(data: bytes) -> str | None:
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        return tiff_incomplete(tif, len(data))


@pytest.mark.parametrize(
    ("name", "header", "source"),
    [
        ("s.ome.tif", ome_header(_stack()), r"OME-XML declares \(SizeZ 3 × SizeC 1 × SizeT 1\)"),
        ("s.tif", imagej_header(3), r"ImageJ header declares \(images=3\)"),
    ],
)
def test_stack_with_fewer_planes_than_declared_is_incomplete(tmp_path, name, header, source):
    first, second, whole = _snapshots(tmp_path, name, header)
    assert re.fullmatch(f"it has 1 of the 3 planes its {source}", _incomplete(first))
    assert re.fullmatch(f"it has 2 of the 3 planes its {source}", _incomplete(second))
    assert _incomplete(whole) is None
    path = tmp_path / name
    path.write_bytes(first)
    with pytest.raises(BadInputError, match=f"{name} is incomplete: it has 1 of the 3 planes"):
        read_image(path)
    path.write_bytes(whole)
    np.testing.assert_array_equal(read_image(path).pixels, _stack().max(axis=0))


def test_stack_cut_before_its_next_page_is_incomplete(tmp_path):
    """tifffile writes the pages' headers after all the pixels: cut after plane 1, the
    first page points past the end of the file (and its OME-XML is not there yet)."""
    tifffile.imwrite(tmp_path / "s.ome.tif", _stack(), ome=True, metadata={"axes": "ZYX"})
    whole = (tmp_path / "s.ome.tif").read_bytes()
    with tifffile.TiffFile(io.BytesIO(whole)) as tif:
        end = tif.pages[0].dataoffsets[0] + tif.pages[0].databytecounts[0]
    reason = _incomplete(whole[:end])
    assert (
        reason == "it stops after page 1: the pointer to the next page is past the end of the file"
    )
    (tmp_path / "s.ome.tif").write_bytes(whole[:end])
    with pytest.raises(BadInputError, match=r"s\.ome\.tif is incomplete: it stops after page 1"):
        read_image(tmp_path / "s.ome.tif")


@pytest.mark.parametrize(
    ("data", "kwargs"),
    [
        (np.zeros((2, 3, 16, 16), np.uint16), {"ome": True, "metadata": {"axes": "TCYX"}}),
        (np.zeros((2, 16, 16, 3), np.uint8), {"ome": True, "metadata": {"axes": "ZYXS"}}),
        (np.zeros((4, 16, 16), np.uint8), {"imagej": True, "metadata": {"axes": "ZYX"}}),
        (np.zeros((16, 16), np.uint8), {}),
        (np.zeros((3, 16, 16), np.uint8), {}),
    ],
)
def test_whole_files_are_complete(tmp_path, data, kwargs):
    """Channels, time points and RGB samples as tifffile stores them: no false alarms."""
    tifffile.imwrite(tmp_path / "w.tif", data, **kwargs)
    assert _incomplete((tmp_path / "w.tif").read_bytes()) is None


def test_tiff_cut_inside_header(tmp_path):
    tifffile.imwrite(tmp_path / "t.tif", _ramp((8, 8)))
    (tmp_path / "t.tif").write_bytes((tmp_path / "t.tif").read_bytes()[:20])
    with pytest.raises(BadInputError, match=r"t\.tif is not a readable TIFF"):
        read_image(tmp_path / "t.tif")


def test_corrupt_compressed_tiff(tmp_path):
    tifffile.imwrite(tmp_path / "z.tif", _ramp((32, 32)), compression="zlib")
    with tifffile.TiffFile(tmp_path / "z.tif") as tif:
        offset = tif.pages[0].dataoffsets[0]
    raw = bytearray((tmp_path / "z.tif").read_bytes())
    raw[offset : offset + 8] = b"\xff" * 8
    (tmp_path / "z.tif").write_bytes(bytes(raw))
    with pytest.raises(BadInputError, match=r"z\.tif is not a readable TIFF"):
        read_image(tmp_path / "z.tif")


@pytest.mark.parametrize("name", ["t.png", "t.jpg"])
def test_truncated_png_and_jpeg(tmp_path, name):
    Image.fromarray(_ramp((64, 64))).save(tmp_path / name)
    whole = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(whole[: len(whole) // 2])
    with pytest.raises(BadInputError, match=r"t\.(png|jpg) is truncated or corrupt"):
        read_image(tmp_path / name)


def test_small_max_pixels_refuses_before_decoding(tmp_path, zstack):
    path, _ = zstack  # 4 planes of 6 × 7
    with pytest.raises(BadInputError, match=r"declares 6 × 7 pixels × 4 planes.*max_pixels = 100"):
        read_image(path, max_pixels=100)
    Image.fromarray(_ramp((6, 7))).save(tmp_path / "a.png")
    with pytest.raises(BadInputError, match=r"a\.png declares 6 × 7 pixels"):
        read_image(tmp_path / "a.png", max_pixels=10)
    assert read_image(path, max_pixels=6 * 7 * 4).pixels.shape == (6, 7)


def test_many_channels_count_towards_the_byte_limit(tmp_path):
    tifffile.imwrite(tmp_path / "c.tif", _ramp((50, 4, 4)), metadata={"axes": "CYX"})
    with pytest.raises(BadInputError, match="declares 4 × 4 pixels × 1 planes"):
        read_image(tmp_path / "c.tif", channel=0, max_pixels=100)


def test_hostile_tiff_header_is_refused_without_reading(tmp_path):
    """A 4×4 file whose header claims 100000×100000 pixels (10 GB)."""
    path = tmp_path / "bomb.tif"
    tifffile.imwrite(path, np.zeros((4, 4), np.uint8))
    raw = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags
        for name in ("ImageWidth", "ImageLength", "RowsPerStrip"):
            struct.pack_into("<I", raw, tags[name].valueoffset, 100_000)
    path.write_bytes(bytes(raw))
    with pytest.raises(
        BadInputError, match=r"declares 100,000 × 100,000 pixels.*input\.max_pixels"
    ):
        read_image(path)


def test_hostile_png_header_is_refused(tmp_path):
    """Pillow itself refuses this before we see its size; it must still be BadInputError."""
    (tmp_path / "bomb.png").write_bytes(_png_bytes(100_000, 100_000))
    with pytest.raises(
        BadInputError,
        match=r"bomb\.png is too large.*10000000000 pixels.*max_pixels is 400,000,000",
    ):
        read_image(tmp_path / "bomb.png")


def test_pillow_size_warning_does_not_leak(tmp_path):
    """10000² passes input.max_pixels but trips Pillow's warning; then the data is short."""
    (tmp_path / "big.png").write_bytes(_png_bytes(10_000, 10_000))
    with pytest.raises(BadInputError, match=r"big\.png is truncated or corrupt"):
        read_image(tmp_path / "big.png")
    with pytest.raises(BadInputError, match=r"declares 10,000 × 10,000.*max_pixels = 1,000,000"):
        read_image(tmp_path / "big.png", max_pixels=1_000_000)


@pytest.mark.parametrize("name", ["a.tif", "a.png"])
def test_reading_leaves_the_input_untouched(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".tif"):
        tifffile.imwrite(path, _ramp((5, 5)))
    else:
        Image.fromarray(_ramp((5, 5))).save(path)
    os.utime(path, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    before, mtime = path.read_bytes(), path.stat().st_mtime_ns
    read_image(path)
    sha256_file(path)
    assert path.read_bytes() == before
    assert path.stat().st_mtime_ns == mtime


# --- helpers and writers -----------------------------------------------------------------


def test_sha256_file(tmp_path):
    data = np.random.default_rng(1).bytes(3 * (1 << 20) + 17)  # more than one read block
    (tmp_path / "x.bin").write_bytes(data)
    assert sha256_file(tmp_path / "x.bin") == hashlib.sha256(data).hexdigest()
    with pytest.raises(FileNotFoundError):
        sha256_file(tmp_path / "missing.bin")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.tif", True),
        ("A.TIFF", True),
        ("x.ome.tif", True),
        ("b.png", True),
        ("c.JPEG", True),
        ("d.vsi", False),  # Olympus VSI: not read
        ("e.tif.part", False),
        (".a.tif", False),
        ("._a.tif", False),
    ],
)
def test_is_supported(name, expected):
    assert is_supported(Path("/data") / name) is expected


def test_is_supported_with_custom_extensions():
    assert is_supported(Path("a.TIF"), ["tif"])
    assert not is_supported(Path("a.png"), (".tif",))


@pytest.mark.parametrize(("top", "dtype"), [(65_535, np.uint16), (70_000, np.uint32)])
def test_write_labels_round_trip(tmp_path, top, dtype):
    labels = np.zeros((20, 30), np.int64)
    labels[2:5, 3:9] = 1
    labels[10:15, 10:20] = top
    path = tmp_path / "deep" / "er" / "labels.tif"
    write_labels(path, labels)
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        back = tif.asarray()
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, labels)
    assert [p.name for p in path.parent.iterdir()] == ["labels.tif"]  # no temporary left


def test_write_labels_replaces_existing_file(tmp_path):
    path = tmp_path / "labels.tif"
    path.write_bytes(b"old")
    write_labels(path, np.ones((3, 3), np.uint8))
    np.testing.assert_array_equal(tifffile.imread(path), np.ones((3, 3)))


def test_write_labels_rejects_bad_arrays(tmp_path):
    with pytest.raises(ValueError, match="2-D integer"):
        write_labels(tmp_path / "l.tif", np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="negative"):
        write_labels(tmp_path / "l.tif", -np.ones((3, 3), np.int32))
    assert not list(tmp_path.iterdir())


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tifffile, "imwrite", explode)
    with pytest.raises(TransientError, match=r"could not write .*l\.tif \(disk full"):
        write_labels(tmp_path / "l.tif", np.ones((3, 3), np.uint16))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_write_overlay(tmp_path, dtype):
    image = _ramp((40, 50), dtype)
    labels = np.zeros((40, 50), np.uint16)
    labels[10:20, 10:30] = 1
    write_overlay(tmp_path / "o" / "overlay.png", image, labels)
    with Image.open(tmp_path / "o" / "overlay.png") as png:
        assert png.format == "PNG"
        assert png.mode == "RGB"
        assert png.size == (50, 40)
        rgb = np.asarray(png)
    assert tuple(rgb[10, 15]) == OUTLINE_RGB  # cell edge
    assert tuple(rgb[0, 0]) == (0, 0, 0)  # darkest pixel, no outline
    gray = rgb[15, 20]
    assert gray[0] == gray[1] == gray[2]  # cell interior stays gray


def test_write_overlay_constant_and_nan_images(tmp_path):
    labels = np.zeros((5, 5), np.uint16)
    write_overlay(tmp_path / "flat.png", np.full((5, 5), 7.0), labels)
    write_overlay(tmp_path / "nan.png", np.full((5, 5), np.nan), labels)
    for name in ("flat.png", "nan.png"):
        with Image.open(tmp_path / name) as png:
            assert png.size == (5, 5)


def test_write_overlay_shape_mismatch(tmp_path):
    with pytest.raises(ValueError, match="equal 2-D shapes"):
        write_overlay(tmp_path / "o.png", np.zeros((4, 4)), np.zeros((4, 5), np.uint16))


def reference_overlay(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The overlay as first written: a float copy stretched by np.percentile, and
    skimage's inner boundaries."""
    from skimage.segmentation import find_boundaries

    values = image.astype(np.float32)
    finite = values[np.isfinite(values)]
    gray = np.zeros(image.shape, np.uint8)
    if finite.size:
        lo, hi = np.percentile(finite, (1.0, 99.8))
        if hi <= lo:
            lo, hi = float(finite.min()), float(finite.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        scaled = np.nan_to_num((values - lo) * scale, nan=0.0, posinf=255.0, neginf=0.0)
        gray = np.clip(scaled, 0, 255).astype(np.uint8)
    rgb = np.repeat(gray[:, :, np.newaxis], 3, axis=2)
    rgb[find_boundaries(labels, mode="inner")] = OUTLINE_RGB
    return rgb


def _overlay_cases() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(3)
    labels = np.kron(rng.integers(0, 5, (15, 20)), np.ones((3, 4), np.int32))  # 45 x 80
    labels[rng.random(labels.shape) < 0.03] = 0
    wide = rng.integers(0, 65535, labels.shape).astype(np.uint16)
    floats = rng.normal(100, 30, labels.shape)
    floats[2:5, 2:5], floats[0, 0], floats[1, 1] = np.nan, np.inf, -np.inf
    return [
        (wide, labels),
        ((wide // 300).astype(np.uint8), labels),
        (floats, labels),
        (floats.astype(np.float32), labels),
        (wide.astype(np.int32) - 1000, labels),
        (np.full((5, 7), 3, np.uint16), np.ones((5, 7), np.int32)),
        (np.full((5, 5), np.nan), np.zeros((5, 5), np.int32)),
        (wide[:1], labels[:1]),
        (wide[:, :1], labels[:, :1]),
        (wide[:1, :1], labels[:1, :1]),
    ]


@pytest.mark.parametrize("band_pixels", [1, 50, 1 << 20])
@pytest.mark.parametrize("case", range(10))
def test_overlay_equals_the_float_stretch_and_find_boundaries(
    tmp_path, monkeypatch, case, band_pixels
):
    monkeypatch.setattr(overlay, "_BAND_PIXELS", band_pixels)  # rows cut into bands
    image, labels = _overlay_cases()[case]
    write_overlay(tmp_path / "o.png", image, labels)
    with Image.open(tmp_path / "o.png") as png:
        png.load()  # decodes every chunk: checks the CRCs and the zlib stream
        assert (png.format, png.mode, png.size) == ("PNG", "RGB", image.shape[::-1])
        rgb = np.asarray(png)
    np.testing.assert_array_equal(rgb, reference_overlay(image, labels))


def test_write_overlay_refuses_an_empty_image(tmp_path):
    with pytest.raises(ValueError, match="empty image"):
        write_overlay(tmp_path / "o.png", np.zeros((0, 4)), np.zeros((0, 4), np.int32))


@pytest.mark.parametrize("strip_bytes", [1, 100, 1 << 18])
def test_label_tiff_written_strip_by_strip_reads_back(tmp_path, monkeypatch, strip_bytes):
    monkeypatch.setattr(imageio, "_STRIP_BYTES", strip_bytes)
    labels = np.random.default_rng(0).integers(0, 70_000, (37, 23)).astype(np.int32)
    write_labels(tmp_path / "l.tif", labels)
    back = read_image(tmp_path / "l.tif")
    assert back.pixels.dtype == np.uint32
    np.testing.assert_array_equal(back.pixels, labels)


# --- one rule for I/O errors: retried while opening, hashing and decoding alike ---------


class _FlakyRaw(io.RawIOBase):
    """A file that fails once a read reaches byte ``fail_at``: with ``error`` raised, or
    (``error`` None) coming back short, as a network share does when it hiccups."""

    def __init__(self, path: Path, fail_at: int, error: OSError | None) -> None:
        super().__init__()
        self._fh = io.FileIO(path, "r")
        self.name, self._fail_at, self._error = str(path), fail_at, error

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def fileno(self) -> int:
        return self._fh.fileno()

    def readinto(self, buffer) -> int:
        start, n = self._fh.tell(), memoryview(buffer).nbytes
        if start + n > self._fail_at:
            if self._error is not None:
                raise self._error
            return self._fh.readinto(memoryview(buffer).cast("B")[: self._fail_at - start])
        return self._fh.readinto(buffer)

    def close(self) -> None:
        self._fh.close()
        super().close()


def _flaky_open(monkeypatch, fail_at: int, error: OSError | None) -> None:
    def open_flaky(self, mode="r", *args, **kwargs):
        return io.BufferedReader(_FlakyRaw(Path(self), fail_at, error), buffer_size=4096)

    monkeypatch.setattr(Path, "open", open_flaky)


_IO_ERRORS = [
    OSError(errno.EIO, "Input/output error"),
    OSError(errno.ESTALE, "Stale file handle"),
    OSError(errno.ETIMEDOUT, "Connection timed out"),
    None,  # a short read of a file whose size has not changed
]


@pytest.mark.parametrize("error", _IO_ERRORS, ids=["EIO", "ESTALE", "ETIMEDOUT", "short"])
@pytest.mark.parametrize("name", ["a.tif", "a.png"])
def test_io_error_while_decoding_is_retried_not_failed(tmp_path, monkeypatch, name, error):
    path = tmp_path / name
    pixels = np.random.default_rng(0).integers(0, 255, (256, 256), dtype=np.uint8)
    if name.endswith(".tif"):
        tifffile.imwrite(path, pixels)
    else:
        Image.fromarray(pixels).save(path)
    size = path.stat().st_size
    _flaky_open(monkeypatch, size // 2, error)  # the header reads fine, the pixels do not
    with pytest.raises(TransientError, match=r"a\.(tif|png) could not be read.*will try again"):
        read_image(path)
    monkeypatch.undo()
    assert np.array_equal(read_image(path).pixels, pixels)  # once the share is back


def test_a_truncated_file_is_still_bad_input(tmp_path):
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, _ramp((256, 256)))
    path.write_bytes(path.read_bytes()[:-1000])  # short because it is short: no retry helps
    with pytest.raises(BadInputError, match="truncated or corrupt"):
        read_image(path)


@pytest.mark.parametrize("error", _IO_ERRORS, ids=["EIO", "ESTALE", "ETIMEDOUT", "short"])
def test_io_error_while_hashing_is_retried(tmp_path, monkeypatch, error):
    from cellwatch import pipeline

    path = tmp_path / "x.bin"
    path.write_bytes(bytes(3 << 20))
    _flaky_open(monkeypatch, 2 << 20, error)
    with pytest.raises(OSError, match="short read" if error is None else ".") as caught:
        sha256_file(path)
    assert caught.value.errno == (error.errno if error else errno.EIO)
    with pytest.raises(TransientError, match=r"x\.bin could not be read.*will try again"):
        pipeline._hash(path)


def test_content_errors_are_not_io_faults():
    from cellwatch.errors import io_fault

    assert io_fault("a.png", OSError("image file is truncated")) is None  # Pillow's words
    assert io_fault("a.tif", ValueError("failed to read 100 bytes, got 10")) is None
    assert io_fault("a.tif", FileNotFoundError(errno.ENOENT, "gone")) is None
    wrapped = ValueError("decoder failed")
    wrapped.__cause__ = OSError(errno.EIO, "Input/output error")
    assert isinstance(io_fault("a.tif", wrapped), TransientError)


def test_atomic_write_syncs_the_folder_after_the_rename(tmp_path, monkeypatch):
    """Without the folder's fsync, a power cut after the rename can lose the new name."""
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync folder" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync file")
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_labels(tmp_path / "l.tif", np.ones((3, 3), np.uint16))
    assert events == ["fsync file", "rename", "fsync folder"]


def test_a_folder_that_cannot_be_synced_is_no_error(tmp_path, monkeypatch):
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EINVAL, "Invalid argument")  # what some SMB mounts answer
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_labels(tmp_path / "l.tif", np.ones((3, 3), np.uint16))
    assert tifffile.imread(tmp_path / "l.tif").sum() == 9
