"""The vendors' own libraries, for files their bioio plugin does not read.

bioio's plugins are the first choice (:mod:`cellwatch.storage.vendor`); when one fails on a
file, the vendor's library may still read it: Zeiss's pylibCZIrw a CZI whose calibration
bioio-czi does not understand, Nikon's ``nd2`` and ``liffile`` what their plugins miss.
Each reader here gives the file's scenes in the shape :func:`vendor.open_scene` does, with
the pixel size left empty when the file records no calibration. :func:`damage` says when
the bytes themselves show a file is damaged or cut short, so a good file is never called
corrupt.
"""

from __future__ import annotations

__all__ = ["OpenFile", "VendorScene", "check_plane", "damage", "open_native", "unsupported_dims"]

import struct
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellwatch.errors import BadInputError

_CZI_MAGIC = b"ZISRAWFILE"
_ND2_MAGIC = bytes.fromhex("dacebe0a")
_ND2_MAP_SIGNATURE = b"ND2 CHUNK MAP SIGNATURE 0000001!"
_LIF_MAGIC = 0x70
_CZI_DTYPES = {"Gray8": ("u1", 1), "Gray16": ("<u2", 1), "Gray32Float": ("<f4", 1),
               "Bgr24": ("u1", 3), "Bgr48": ("<u2", 3)}  # fmt: skip
# Axes of a LIF image cellwatch cannot make one YX plane of, in words
_LIF_AXES = {"λ": "a λ-scan (emission wavelengths)", "Λ": "a λ-scan (excitation wavelengths)",
             "H": "a FLIM histogram", "A": "a rotation series"}  # fmt: skip


@dataclass(frozen=True)
class VendorScene:
    """One scene of a vendor file, not yet read.

    Attributes
    ----------
    data : dask.array.Array
        The scene's pixels, lazily, in the order of ``axes``.
    axes : str
        One letter per axis of ``data``: ``T``, ``C``, ``Z``, ``Y``, ``X`` and ``S``.
    pixel_size_um : float or None
        The X pixel size from the file's metadata, in µm; None if it records none.
    channel_names : tuple of str, or None
        The channels' names as the file gives them, None if it names none.
    index, count : int
        Which scene this is (from 0) and how many the file holds.
    name : str
        The scene's name in the file (bioio's scene id, e.g. a well or position).
    reader : str
        The vendor's library that read it when the bioio plugin could not; empty for the
        plugin.
    """

    data: Any
    axes: str
    pixel_size_um: float | None
    channel_names: tuple[str, ...] | None
    index: int
    count: int
    name: str
    reader: str = ""


@dataclass(frozen=True)
class OpenFile:
    """A file opened by one reader: the reader's name, the scenes' names, and a way to get
    each scene (:class:`VendorScene`)."""

    reader: str
    names: tuple[str, ...]
    scene: Callable[[int], VendorScene]


def open_native(path: Path) -> OpenFile | None:
    """The file through its vendor's library, or None if that library is not installed.

    Raises whatever the library raises on a file it cannot read.
    """
    suffix = path.suffix.lower()
    opener = {".czi": _open_czi, ".nd2": _open_nd2, ".lif": _open_lif}.get(suffix)
    try:
        return opener(path) if opener else None
    except ImportError:
        return None


def _lazy(read: Callable[[], np.ndarray], shape: tuple[int, ...], dtype: Any) -> Any:
    import dask
    import dask.array as da

    return da.from_delayed(dask.delayed(read, pure=True)(), shape, dtype=np.dtype(dtype))


# --- Zeiss CZI: pylibCZIrw ------------------------------------------------------------------


def _open_czi(path: Path) -> OpenFile:
    from pylibCZIrw import czi as pyczi

    with pyczi.open_czi(str(path)) as doc:
        box = doc.total_bounding_box
        rects = doc.scenes_bounding_rectangle or {0: doc.total_bounding_rectangle}
        pixel_types = doc.pixel_types
        root = ET.fromstring(doc.raw_metadata)
    scenes = sorted(rects)
    listed = {s.get("Index"): s.get("Name") for s in root.iter("Scene") if s.get("Index")}
    names = tuple(listed.get(str(s)) or f"S{s}" for s in scenes)
    dtype, samples = _CZI_DTYPES.get(pixel_types.get(0, "Gray16"), ("<u2", 1))
    size = {a: box[a][1] if a in box else 1 for a in "TCZ"}
    start = {a: box[a][0] if a in box else 0 for a in "TCZ"}
    channel_names = _czi_channel_names(root, size["C"])
    pixel_size = _czi_pixel_size(root)

    def scene(index: int) -> VendorScene:
        number, rect = scenes[index], rects[scenes[index]]
        shape = (size["T"], size["C"], size["Z"], rect.h, rect.w, samples)

        def read() -> np.ndarray:
            out = np.empty(shape, dtype)
            with pyczi.open_czi(str(path)) as doc:
                for t in range(size["T"]):
                    for c in range(size["C"]):
                        for z in range(size["Z"]):
                            plane = {"T": start["T"] + t, "C": start["C"] + c, "Z": start["Z"] + z}
                            found = doc.read(
                                plane=plane, scene=number if doc.scenes_bounding_rectangle else None
                            )
                            out[t, c, z] = found[..., ::-1] if samples == 3 else found  # BGR
            return out

        return VendorScene(_lazy(read, shape, dtype), "TCZYXS", pixel_size, channel_names,
                           index, len(scenes), names[index], "pylibCZIrw")  # fmt: skip

    return OpenFile("pylibCZIrw", names, scene)


def _czi_channel_names(root: ET.Element, n: int) -> tuple[str, ...] | None:
    channels = root.findall("./Metadata/Information/Image/Dimensions/Channels/Channel")
    names = tuple(c.get("Name") or "" for c in channels)
    return names if len(names) == n and all(names) else None


def _czi_pixel_size(root: ET.Element) -> float | None:
    """The X distance in µm (the file records metres); None when it records none."""
    value = root.findtext("./Metadata/Scaling/Items/Distance[@Id='X']/Value")
    try:
        metres = float(value) if value else 0.0
    except ValueError:
        return None
    return metres * 1e6 if metres > 0 else None


# --- Nikon ND2: nd2 -------------------------------------------------------------------------


def _open_nd2(path: Path) -> OpenFile:
    import nd2

    with nd2.ND2File(str(path)) as f:
        sizes = dict(f.sizes)
        dtype = f.dtype
        channels = f.metadata.channels or []
        names = tuple(c.channel.name for c in channels)
        volume = channels[0].volume if channels else None
        calibrated = bool(volume and volume.axesCalibrated[0])
        pixel_size = float(volume.axesCalibration[0]) if volume and calibrated else None
    count = sizes.get("P", 1)
    axes = "".join(a for a in sizes if a != "P")
    shape = tuple(n for a, n in sizes.items() if a != "P")
    channel_names = names if names and len(names) == sizes.get("C", 1) else None

    def scene(index: int) -> VendorScene:
        def read() -> np.ndarray:
            with nd2.ND2File(str(path)) as f:
                data = np.asarray(f.asarray())
            return data.take(index, axis=list(sizes).index("P")) if "P" in sizes else data

        return VendorScene(_lazy(read, shape, dtype), axes, pixel_size, channel_names,
                           index, count, f"P{index}", "nd2")  # fmt: skip

    return OpenFile("nd2", tuple(f"P{k}" for k in range(count)), scene)


# --- Leica LIF: liffile ---------------------------------------------------------------------


def _open_lif(path: Path) -> OpenFile:
    import liffile

    with liffile.LifFile(str(path)) as lif:
        images = [(im.name, dict(im.sizes), im.dtype, _lif_pixel_size(im)) for im in lif.images]

    def scene(index: int) -> VendorScene:
        name, sizes, dtype, pixel_size = images[index]
        check_plane(path, index, name, sizes)

        def read() -> np.ndarray:
            with liffile.LifFile(str(path)) as lif:
                return np.asarray(lif.images[index].asarray())

        shape = tuple(sizes.values())
        return VendorScene(_lazy(read, shape, dtype), "".join(sizes), pixel_size, None,
                           index, len(images), name, "liffile")  # fmt: skip

    return OpenFile("liffile", tuple(n for n, *_ in images), scene)


def _lif_pixel_size(image: Any) -> float | None:
    coords = image.coords.get("X")
    if coords is None or len(coords) < 2:
        return None
    step = float(coords[1] - coords[0]) * 1e6  # liffile gives metres
    return step if step > 0 else None


def unsupported_dims(sizes: dict[str, int]) -> str:
    """Why an image of these axes (liffile's letters, or bioio's ``TCZYX``) has no YX plane
    cellwatch can count, in words; empty when it has one."""
    for axis, what in _LIF_AXES.items():
        if sizes.get(axis, 1) > 1:
            return what
    if sizes.get("Y", 1) <= 1 and sizes.get("X", 1) > 1:
        along = "Z" if sizes.get("Z", 1) > 1 else "T" if sizes.get("T", 1) > 1 else ""
        return f"an X{along} line scan: no YX plane"
    return ""


def check_plane(path: Path, index: int, name: str, sizes: dict[str, int]) -> None:
    """Refuse a scene of these axes with no YX plane (:func:`unsupported_dims`), naming it.

    Raises
    ------
    BadInputError
        It is a line scan, a λ-scan, a FLIM histogram or a rotation series.
    """
    why = unsupported_dims(sizes)
    if why:
        raise BadInputError(
            f"{path}: series {index} ({name}) is {why}; cellwatch counts nuclei in YX images, "
            "so it is left out (the file's other series are counted)"
        )


# --- what the bytes show --------------------------------------------------------------------


def damage(path: Path, *, opened: bool = False) -> str | None:
    """How the file's bytes show it is damaged, cut short or not of its format, in words;
    None when its structure looks whole (or cellwatch cannot tell). ``opened``: a reader
    opened it, so only whether it is cut short is asked."""
    try:
        with path.open("rb") as fh:
            head = fh.read(128)
            size = fh.seek(0, 2)
            fh.seek(max(0, size - 40))
            tail = fh.read(40)
    except OSError:
        return None  # the OS error is the reader's to report
    suffix = path.suffix.lower()
    signature = {".czi": head.startswith(_CZI_MAGIC), ".nd2": head.startswith(_ND2_MAGIC),
                 ".lif": _is_lif_header(head)}.get(suffix, True)  # fmt: skip
    if not signature:
        if opened:
            return None  # the reader knows this variant; cellwatch cannot judge its bytes
        name = {".czi": "a Zeiss CZI", ".nd2": "a Nikon ND2", ".lif": "a Leica LIF"}[suffix]
        return f"it does not begin as {name} file does: it is not {name} file"
    if suffix == ".czi":
        return _czi_damage(head, size)
    if suffix == ".nd2":
        return _nd2_damage(tail)
    if suffix == ".lif":
        return _lif_damage(path)
    return None


def _is_lif_header(head: bytes) -> bool:
    return len(head) >= 9 and struct.unpack_from("<i", head)[0] == _LIF_MAGIC and head[8] == 0x2A


def _czi_damage(head: bytes, size: int) -> str | None:
    if len(head) < 100:
        return f"it ends after {size} bytes, inside its file header: it is cut short"
    directory, metadata = struct.unpack_from("<qq", head, 84)
    for what, where in (("subblock directory", directory), ("metadata", metadata)):
        if where >= size:
            return (
                f"its header places the {what} at byte {where:,} but the file has {size:,} "
                "bytes: it is cut short"
            )
    return None


def _nd2_damage(tail: bytes) -> str | None:
    if not tail.startswith(_ND2_MAP_SIGNATURE):
        return "it does not end in the ND2 chunk map: it is cut short"
    return None


def _lif_damage(path: Path) -> str | None:
    try:
        import liffile

        with liffile.LifFile(str(path)) as lif:
            size = path.stat().st_size
            blocks = lif.memory_blocks
            for block in blocks.values():
                if block.offset + block.size > size:
                    return (
                        f"its memory block {block.id} should reach byte "
                        f"{block.offset + block.size:,} but the file has {size:,} bytes: it is "
                        "cut short"
                    )
            for memory in lif.xml_element.iter("Memory"):
                wanted = memory.get("MemoryBlockID")
                if wanted and int(memory.get("Size", "0")) > 0 and wanted not in blocks:
                    return f"its memory block {wanted} is missing: it is cut short"
    except Exception:  # cellwatch cannot tell; the reader's own message says what it can
        return None
    return None
