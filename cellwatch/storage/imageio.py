"""Read microscope images into one 2-D plane, and write label images.

TIFF and OME-TIFF are read with tifffile, PNG and JPEG with Pillow, and the microscope
formats (CZI, ND2, LIF) through bioio (:mod:`cellwatch.storage.vendor`), one scene at a
time. Every input is checked before it is decoded: its declared size must fit
``input.max_pixels`` and a TIFF's pixel data must lie inside the file. Anything that cannot
be read becomes a :class:`~cellwatch.errors.BadInputError` that names the file and says
what is wrong. Input files are only ever opened for reading.
"""

from __future__ import annotations

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "ImageData",
    "atomic_write",
    "find_pairs",
    "is_supported",
    "read_image",
    "scene_count",
    "sha256_file",
    "stem",
    "tiff_incomplete",
    "write_labels",
]

import errno
import hashlib
import io
import math
import os
import stat
import struct
import uuid
import warnings
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import tifffile
from PIL import Image

from cellwatch.config import installed_vendor_suffixes
from cellwatch.errors import (
    BadInputError,
    ConfigError,
    DiskFullError,
    TransientError,
    disk_full,
    io_fault,
)
from cellwatch.storage import vendor

#: What this installation reads: TIFF, OME-TIFF, PNG, JPEG, and each microscope format
#: whose bioio plugin (cellwatch extra) is installed.
SUPPORTED_EXTENSIONS = (
    ".tif",
    ".tiff",
    ".ome.tif",
    ".ome.tiff",
    ".png",
    ".jpg",
    ".jpeg",
    *installed_vendor_suffixes(),
)

_TIFF_SUFFIXES = (".tif", ".tiff")
_CHANNEL_AXES = "CS"
_UM_PER_UNIT = {"µm": 1.0, "μm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0,
                "\\u00b5m": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}  # fmt: skip
_UM_PER_RESUNIT = {2: 25_400.0, 3: 10_000.0, 4: 1_000.0, 5: 1.0}  # inch, cm, mm, µm
_DEFAULT_DPI = (72.0, 96.0)  # what desktop software writes when it knows nothing
_STRIP_BYTES = 1 << 18  # uncompressed bytes per strip of a label TIFF (tifffile's choice)


@dataclass(frozen=True, eq=False)  # eq=False: comparing arrays with == is ambiguous
class ImageData:
    """One image plane ready for segmentation.

    Attributes
    ----------
    pixels : np.ndarray
        2-D (H, W) array in the file's own dtype (bool becomes uint8); never normalized.
    pixel_size_um : float or None
        Physical pixel size in µm from OME or TIFF resolution metadata, else None.
    path : Path
        The file it came from.
    note : str
        What was done to get one plane, for logs ("max projection of 12 planes").
    scene : int or None
        The scene (position) of a multi-scene file it is, from 0; None for a file of one.
    """

    pixels: np.ndarray
    pixel_size_um: float | None
    path: Path
    note: str = ""
    scene: int | None = None


def is_supported(path: Path, extensions: Sequence[str] = SUPPORTED_EXTENSIONS) -> bool:
    """Return True if the file name ends in one of ``extensions`` (case-insensitive).

    Hidden files (name starting with ".") never count: they are temporary files or the
    "._name.tif" resource forks macOS leaves on network shares, not images.
    """
    name = Path(path).name.lower()
    suffixes = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    return not name.startswith(".") and name.endswith(suffixes)


def stem(path: Path, scene: int | None = None) -> str:
    """The file name without its image suffix (``a.ome.tif`` → ``a``), used to pair images
    with masks and to name label images and overlays; ``a_s2`` for scene 2 of a file of
    several scenes."""
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    else:
        name = path.stem
    return name if scene is None else f"{name}_s{scene}"


def scene_count(path: Path) -> int:
    """How many scenes (positions, series) the file holds: 1 unless it is a microscope
    format that holds several.

    Raises
    ------
    BadInputError
        A microscope file does not open, or its reader (cellwatch extra) is not installed.
    TransientError
        The operating system could not open the file for a reason that may pass.
    """
    return vendor.scene_count(path) if vendor.is_vendor(path) else 1


def find_pairs(images: Path, masks: Path) -> list[tuple[Path, Path]]:
    """Pair images and masks by file stem; name every image or mask without a partner."""

    def by_stem(folder: Path) -> dict[str, Path]:
        if not folder.is_dir():
            raise ConfigError(f"{folder} is not a folder")
        return {stem(p): p for p in sorted(folder.iterdir()) if is_supported(p)}

    image_files, mask_files = by_stem(images), by_stem(masks)
    lonely_images = sorted(set(image_files) - set(mask_files))
    lonely_masks = sorted(set(mask_files) - set(image_files))
    if lonely_images or lonely_masks:
        lines = [f"images and masks must pair up by file name ({images} / {masks}):"]
        if lonely_images:
            lines.append("  images without a mask: " + ", ".join(lonely_images[:20]))
        if lonely_masks:
            lines.append("  masks without an image: " + ", ".join(lonely_masks[:20]))
        raise ConfigError("\n".join(lines))
    if not image_files:
        raise ConfigError(f"no supported images found in {images}")
    return [(image_files[s], mask_files[s]) for s in sorted(image_files)]


def read_image(
    path: Path,
    *,
    channel: int | str | None = None,
    stack: Literal["max", "plane"] = "max",
    plane: int = 0,
    max_pixels: int = 400_000_000,
    scene: int | None = None,
) -> ImageData:
    """Read a TIFF, OME-TIFF, PNG, JPEG, CZI, ND2 or LIF file and reduce it to one 2-D plane.

    Parameters
    ----------
    path : Path
        The image file.
    channel : int, str or None
        Channel to use, by number (from 0) or by the name the file gives it (``"DAPI"``,
        any case; OME-TIFF and the microscope formats name their channels). None accepts
        gray images, and colour images whose channels are equal.
    stack : {"max", "plane"}
        "max" projects all Z/T/other planes; "plane" keeps plane number ``plane``.
    plane : int
        Flat index over all stack axes, used when ``stack="plane"``.
    max_pixels : int
        Refuse images that declare more pixels (height × width × planes) than this.
    scene : int or None
        The scene (position) of a microscope file that holds several (from 0; see
        :func:`scene_count`). None for any other file.

    Returns
    -------
    ImageData

    Raises
    ------
    BadInputError
        The file is missing, empty, corrupt, too large, or its channels/planes do not fit
        the settings. Retrying will not help.
    TransientError
        The operating system could not open the file for a reason that may pass.
    """
    path = Path(path)
    notes = []
    if vendor.is_vendor(path):
        data, axes, pixel_size, names, note = _read_vendor(path, scene, max_pixels)
        n_alpha = 0
        notes.append(note)
    elif scene is not None:
        raise BadInputError(f"{path} holds one image, so scene {scene} does not exist")
    else:
        with _open_input(path) as fh:
            if path.name.lower().endswith(_TIFF_SUFFIXES):
                data, axes, n_alpha, pixel_size, names = _read_tiff(fh, path, max_pixels)
            elif path.name.lower().endswith((".png", ".jpg", ".jpeg")):
                data, axes, n_alpha, pixel_size = _read_pillow(fh, path, max_pixels)
                names = None
            else:
                raise BadInputError(
                    f"{path} has an unsupported file type; use {SUPPORTED_EXTENSIONS}"
                )
    if data.size == 0:
        raise BadInputError(f"{path} contains an image with no pixels (shape {data.shape})")
    if isinstance(channel, str):
        channel = _channel_by_name(path, channel, names, _channel_count(data.shape, axes))
        notes.append(f"channel {_name_of(names, channel)!r}")
    pixels, note = _reduce_to_plane(data, axes, n_alpha, path, channel, stack, plane, names)
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8)
    return ImageData(pixels, pixel_size, path, "; ".join(n for n in [*notes, note] if n), scene)


def _read_vendor(
    path: Path, scene: int | None, max_pixels: int
) -> tuple[np.ndarray, str, float | None, tuple[str, ...] | None, str]:
    """One scene of a microscope file: pixels, axes, pixel size, channel names, a note."""
    found = vendor.open_scene(path, scene)
    lazy = found.data
    _check_declared_size(path, tuple(lazy.shape), found.axes, np.dtype(lazy.dtype), max_pixels)
    try:
        # synchronous: no pool of threads left behind, none nested in a Dask worker
        data = np.asarray(lazy.compute(scheduler="synchronous"))
    except (BadInputError, TransientError, MemoryError):
        raise
    except Exception as exc:  # a decoder may fail in any way on a corrupt file
        if fault := io_fault(path, exc):
            raise fault from exc
        raise BadInputError(
            f"{path}: scene {found.index} ({found.name}) could not be read; the file may be "
            f"truncated or corrupt ({' '.join(str(exc).split())})"
        ) from exc
    note = f"scene {found.index} ({found.name}) of {found.count}" if found.count > 1 else ""
    return data, found.axes, found.pixel_size_um, found.channel_names, note


def _name_of(names: tuple[str, ...] | None, channel: int) -> str:
    return names[channel] if names and channel < len(names) else str(channel)


def _channel_count(shape: tuple[int, ...], axes: str) -> int:
    return int(shape[axes.index("C")]) if "C" in axes else 1


def _channel_by_name(path: Path, name: str, names: tuple[str, ...] | None, n_chan: int) -> int:
    """The index of the channel called ``name`` (any case, surrounding spaces ignored)."""
    if not names or len(names) != n_chan:
        numbers = f"a channel number (0 to {n_chan - 1})" if n_chan > 1 else "null (one channel)"
        raise BadInputError(
            f"{path} does not name its channels, so input.channel = {name!r} cannot be "
            f"found; set input.channel to {numbers} in config.yaml"
        )
    wanted = name.strip().casefold()
    matches = [i for i, n in enumerate(names) if n.strip().casefold() == wanted]
    if len(matches) != 1:
        what = "no channel" if not matches else "more than one channel"
        raise BadInputError(
            f"{path} has {what} named {name!r}; its channels are "
            f"{', '.join(repr(n) for n in names)}. Set input.channel to one of these names "
            f"or to a number (0 to {n_chan - 1}) in config.yaml"
        )
    return matches[0]


def _open_input(path: Path) -> BinaryIO:
    try:
        st = path.stat()
        regular = stat.S_ISREG(st.st_mode)
        fh = path.open("rb") if regular and st.st_size > 0 else None
    except FileNotFoundError:
        raise BadInputError(f"{path} does not exist (was it moved or deleted?)") from None
    except PermissionError as exc:
        raise BadInputError(f"{path} cannot be read: permission denied ({exc})") from None
    except OSError as exc:
        raise TransientError(f"{path} could not be opened: {exc}; will try again") from exc
    if fh is None:
        what = "is empty (0 bytes); was it saved completely?" if regular else "is not a file"
        raise BadInputError(f"{path} {what}")
    return _WholeReads(fh, st.st_size)  # type: ignore[return-value]


class _WholeReads(io.RawIOBase):
    """A file that raises ``OSError(EIO)`` when a read comes back short of the end of a file
    whose size has not changed: the disk or share failed, the file is not truncated."""

    def __init__(self, fh: BinaryIO, size: int) -> None:
        super().__init__()
        self._fh, self._size, self.name = fh, size, fh.name

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def fileno(self) -> int:
        return self._fh.fileno()

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        start = self._fh.tell()
        got = self._fh.readinto(buffer)  # type: ignore[attr-defined]
        wanted = min(memoryview(buffer).nbytes, max(0, self._size - start))
        if got < wanted and os.fstat(self._fh.fileno()).st_size == self._size:
            raise OSError(
                errno.EIO,
                f"short read: {got:,} of {wanted:,} bytes at byte {start:,} of a "
                f"{self._size:,}-byte file whose size has not changed",
                str(self.name),
            )
        return int(got)

    def close(self) -> None:
        self._fh.close()
        super().close()


def _read_tiff(
    fh: BinaryIO, path: Path, max_pixels: int
) -> tuple[np.ndarray, str, int, float | None, tuple[str, ...] | None]:
    try:
        with tifffile.TiffFile(fh) as tif:
            series = tif.series[0]
            axes, keyframe = series.axes, series.keyframe
            _check_declared_size(path, series.shape, axes, series.dtype, max_pixels)
            file_size = os.fstat(fh.fileno()).st_size
            _check_not_truncated(path, series, file_size)
            missing = tiff_incomplete(tif, file_size)
            if missing:
                raise BadInputError(
                    f"{path} is incomplete: {missing}. If the microscope was still writing "
                    "it, it was given up on after watch.incomplete_timeout_s; copy the "
                    "finished file into the inbox again."
                )
            try:
                pixel_size = _tiff_pixel_size(tif)
            except (ET.ParseError, ValueError, TypeError, ZeroDivisionError):
                pixel_size = None  # broken metadata should not cost the pixels
            try:
                names = _ome_channel_names(tif)
            except ET.ParseError:
                names = None
            data = series.asarray()
    except (BadInputError, TransientError, MemoryError):
        raise
    except Exception as exc:  # a decoder may fail in any way on a corrupt file
        if fault := io_fault(path, exc):
            raise fault from exc
        raise BadInputError(f"{path} is not a readable TIFF: {exc}") from exc
    n_alpha = sum(e in (1, 2) for e in keyframe.extrasamples) if "S" in axes else 0
    return data, axes, n_alpha, pixel_size, names


def _ome_channel_names(tif: tifffile.TiffFile) -> tuple[str, ...] | None:
    """The first image's channel names from OME metadata, if every channel has one."""
    if not (tif.is_ome and tif.ome_metadata):
        return None
    pixels = ET.fromstring(tif.ome_metadata).find(".//{*}Image/{*}Pixels")
    if pixels is None:
        return None
    names = tuple(c.get("Name") or "" for c in pixels.findall("{*}Channel"))
    return names if names and all(names) else None


def _read_pillow(
    fh: BinaryIO, path: Path, max_pixels: int
) -> tuple[np.ndarray, str, int, float | None]:
    try:
        with warnings.catch_warnings():
            # We check the size against input.max_pixels ourselves, right below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(fh, formats=["PNG", "JPEG", "MPO"])
        width, height = im.size
        _check_declared_size(path, (height, width), "YX", np.dtype(np.uint8), max_pixels)
        if im.mode not in ("1", "L", "LA", "I", "F", "I;16", "I;16B", "I;16L", "RGB", "RGBA"):
            im = im.convert("RGBA" if "A" in im.getbands() or "transparency" in im.info else "RGB")
        data = np.asarray(im)
    except Image.DecompressionBombError as exc:
        raise BadInputError(
            f"{path} is too large for Pillow to decode safely ({exc}); input.max_pixels is "
            f"{max_pixels:,}. Save very large images as TIFF instead."
        ) from None
    except (BadInputError, TransientError, MemoryError):
        raise
    except Exception as exc:  # UnidentifiedImageError, "image file is truncated", ...
        if fault := io_fault(path, exc):
            raise fault from exc
        raise BadInputError(f"{path} is truncated or corrupt or not a PNG/JPEG: {exc}") from exc
    axes = "YX" if data.ndim == 2 else "YXS"
    return data, axes, int(im.mode in ("LA", "RGBA")), None


def _check_declared_size(
    path: Path, shape: tuple[int, ...], axes: str, dtype: np.dtype, max_pixels: int
) -> None:
    if "Y" not in axes or "X" not in axes or len(shape) != len(axes):
        raise BadInputError(f"{path} has no recognisable image plane (axes {axes!r}, {shape})")
    sizes = dict(zip(axes, shape, strict=True))
    planes = math.prod(n for a, n in sizes.items() if a not in "YX" + _CHANNEL_AXES)
    n_pixels = sizes["Y"] * sizes["X"] * planes
    n_bytes = math.prod(shape) * dtype.itemsize
    if n_pixels > max_pixels or n_bytes > 4 * max_pixels * dtype.itemsize:
        raise BadInputError(
            f"{path} declares {sizes['Y']:,} × {sizes['X']:,} pixels × {planes:,} planes "
            f"({n_pixels:,} pixels, {n_bytes / 1e9:.1f} GB of {dtype}), more than "
            f"input.max_pixels = {max_pixels:,}. If the image is genuine, raise "
            "input.max_pixels in config.yaml (the machine needs that much memory)."
        )


def _check_not_truncated(path: Path, series: tifffile.TiffPageSeries, file_size: int) -> None:
    pages = [p for p in series.pages if p is not None]
    ends = (o + n for p in pages for o, n in zip(p.dataoffsets, p.databytecounts, strict=True))
    end = max(ends, default=0)
    if end > file_size:
        raise BadInputError(
            f"{path} is truncated or corrupt: its pixel data should reach byte {end:,} but "
            f"the file has {file_size:,} bytes. Copy the file again from the microscope."
        )


def tiff_incomplete(tif: tifffile.TiffFile, file_size: int) -> str | None:
    """Why an open TIFF is not whole yet, in words; None when it looks whole.

    Cheap enough to ask of a file that is still being written: it reads the page headers
    and the header's metadata, never the pixels. A TIFF is not whole when

    - its last page points to a next page that lies past the end of the file,
    - a page's pixel data reaches past the end of the file, or
    - it has fewer pages than the planes it declares: OME-XML ``SizeZ × SizeC × SizeT``
      (one page per plane; RGB samples share a page), or ImageJ's ``images=``.

    Parameters
    ----------
    tif : tifffile.TiffFile
        The open file.
    file_size : int
        Its size in bytes now.

    Returns
    -------
    str or None
        For example ``"it has 1 of the 3 planes its OME-XML declares (SizeZ 3 × SizeC 1 ×
        SizeT 1)"``.
    """
    pages = tif.pages
    if len(pages) == 0:
        return "it has no image pages yet"
    following = _next_page_pointer(tif)
    if following is None or following >= file_size:
        where = "past the end of the file" if following else "missing"
        return f"it stops after page {len(pages)}: the pointer to the next page is {where}"
    for number, page in enumerate(pages, start=1):
        ends = zip(page.dataoffsets, page.databytecounts, strict=False)
        end = max((offset + count for offset, count in ends), default=0)
        if end > file_size:
            return (
                f"the pixel data of page {number} should reach byte {end:,} but the file "
                f"has {file_size:,} bytes"
            )
    declared = _declared_planes(tif)
    if declared is None:
        return None
    expected, source = declared
    found = _planes_present(tif, file_size, expected)
    if found < expected:
        return f"it has {found} of the {expected} planes its {source}"
    return None


def _next_page_pointer(tif: tifffile.TiffFile) -> int | None:
    """The offset the last page read points to (0: it is the last page); None if the
    pointer itself lies past the end of the file."""
    position = tif.pages.next_page_offset
    if position is None:
        return None
    fh = tif.filehandle
    fh.seek(position)
    raw = fh.read(tif.tiff.offsetsize)
    if len(raw) < tif.tiff.offsetsize:
        return None
    return int(struct.unpack(tif.tiff.offsetformat, raw)[0])


def _declared_planes(tif: tifffile.TiffFile) -> tuple[int, str] | None:
    """(planes, "OME-XML declares (SizeZ …)") from OME-XML or an ImageJ header; None if
    the file does not say how many planes it has."""
    if tif.is_ome and tif.ome_metadata:
        try:
            root = ET.fromstring(tif.ome_metadata)
        except ET.ParseError:
            return None
        name = Path(tif.filename).name
        if any(u.get("FileName") not in (None, "", name) for u in root.iter("{*}UUID")):
            return None  # planes spread over several files: this one holds only some
        samples = tif.pages.first.samplesperpixel
        total, parts = 0, []
        for pixels in root.findall("{*}Image/{*}Pixels"):
            z, c, t = (int(pixels.get(key, "1")) for key in ("SizeZ", "SizeC", "SizeT"))
            pages_c = c // samples if samples > 1 and c % samples == 0 else c
            total += z * pages_c * t
            parts.append(f"SizeZ {z} × SizeC {c} × SizeT {t}")
        return (total, f"OME-XML declares ({'; '.join(parts)})") if total else None
    if tif.is_imagej:
        images = (tif.imagej_metadata or {}).get("images")
        if isinstance(images, int) and images > 1:
            return images, f"ImageJ header declares (images={images})"
    return None


def _planes_present(tif: tifffile.TiffFile, file_size: int, expected: int) -> int:
    """Pages in the file; for an ImageJ file saved as one page followed by the other
    planes' pixels (ImageJ does this above 4 GB), the planes whose pixels are there."""
    pages = len(tif.pages)
    first = tif.pages.first
    if pages == 1 and tif.is_imagej and first.is_contiguous and first.nbytes:
        start = first.dataoffsets[0]
        return min(expected, max(0, (file_size - start) // first.nbytes))
    return pages


def _tiff_pixel_size(tif: tifffile.TiffFile) -> float | None:
    """Pixel size in µm: OME PhysicalSizeX, else ImageJ unit, else TIFF resolution tags."""
    if tif.is_ome and tif.ome_metadata:
        pixels = ET.fromstring(tif.ome_metadata).find(".//{*}Image/{*}Pixels")
        if pixels is not None and pixels.get("PhysicalSizeX"):
            factor = _UM_PER_UNIT.get(pixels.get("PhysicalSizeXUnit", "µm"))
            size = float(pixels.get("PhysicalSizeX", "nan"))
            return size * factor if factor and size > 0 else None
    tags = tif.pages.first.tags
    xres, unit_tag = tags.get("XResolution"), tags.get("ResolutionUnit")
    if xres is None or not xres.value[0] or not xres.value[1]:
        return None
    px_per_unit = xres.value[0] / xres.value[1]
    unit = int(unit_tag.value) if unit_tag is not None else 2  # TIFF default unit is inch
    imagej_unit = str((tif.imagej_metadata or {}).get("unit", "")).lower()
    if imagej_unit in _UM_PER_UNIT:
        return _UM_PER_UNIT[imagej_unit] / px_per_unit
    if (
        unit not in _UM_PER_RESUNIT
        or px_per_unit == 1
        or (unit == 2 and px_per_unit in _DEFAULT_DPI)
    ):
        return None
    return _UM_PER_RESUNIT[unit] / px_per_unit


def _reduce_to_plane(
    data: np.ndarray,
    axes: str,
    n_alpha: int,
    path: Path,
    channel: int | None,
    stack: str,
    plane: int,
    names: tuple[str, ...] | None = None,
) -> tuple[np.ndarray, str]:
    """Reshape to (planes, channels, H, W), then pick a channel and a plane."""
    stack_idx = [i for i, a in enumerate(axes) if a not in "YX" + _CHANNEL_AXES]
    chan_idx = [i for i, a in enumerate(axes) if a in _CHANNEL_AXES]
    data = np.transpose(data, [*stack_idx, *chan_idx, axes.index("Y"), axes.index("X")])
    data = data.reshape(math.prod(data.shape[: len(stack_idx)]), -1, *data.shape[-2:])
    notes = []
    if n_alpha and "S" in axes and "C" not in axes:
        data = data[:, :-n_alpha]
        notes.append("alpha dropped")
    data = _pick_channel(data, path, channel, notes, names)
    pixels = _pick_plane(data, path, stack, plane, notes)
    return np.ascontiguousarray(pixels), "; ".join(notes)


def _pick_channel(
    data: np.ndarray,
    path: Path,
    channel: int | None,
    notes: list[str],
    names: tuple[str, ...] | None = None,
) -> np.ndarray:
    """(planes, channels, H, W) -> (planes, H, W)."""
    n_chan = data.shape[1]
    if channel is None:
        if any(not np.array_equal(data[:, 0], data[:, k]) for k in range(1, n_chan)):
            named = f", or its name: {', '.join(names)}" if names and len(names) == n_chan else ""
            raise BadInputError(
                f"{path} has {n_chan} channels that differ (a colour or multi-channel image). "
                "Set input.channel in config.yaml to the channel that shows the cells "
                f"(0 to {n_chan - 1}{named})."
            )
        if n_chan > 1:
            notes.append(f"gray from {n_chan} equal channels")
        return data[:, 0]
    if not 0 <= channel < n_chan:
        raise BadInputError(
            f"{path} has {n_chan} channel(s), so input.channel = {channel} does not exist; "
            f"use 0 to {n_chan - 1} in config.yaml"
        )
    notes.append(f"channel {channel} of {n_chan}")
    return data[:, channel]


def _pick_plane(
    data: np.ndarray, path: Path, stack: str, plane: int, notes: list[str]
) -> np.ndarray:
    """(planes, H, W) -> (H, W) by max projection or by choosing one plane."""
    n_planes = data.shape[0]
    if stack == "max":
        if n_planes == 1:
            return data[0]  # no copy of a large single plane
        notes.append(f"max projection of {n_planes} planes")
        return data.max(axis=0)
    if stack != "plane":
        raise ValueError(f"stack must be 'max' or 'plane', got {stack!r}")
    if not 0 <= plane < n_planes:
        raise BadInputError(
            f"{path} has {n_planes} plane(s), so input.plane = {plane} does not exist; "
            f"use 0 to {n_planes - 1} in config.yaml, or set input.stack to max"
        )
    notes.append(f"plane {plane} of {n_planes}")
    return data[plane]


def sha256_file(path: Path) -> str:
    """The SHA-256 hex digest of a file's content, read in 1 MiB blocks.

    The one content hash of cellwatch: the watcher's file identity and the ledger's
    ``sha256`` column. An empty file has one too. OS errors (a missing file, no permission)
    are raised as they are, for the caller to judge; a read that ends before the end of a
    file whose size has not changed is ``OSError(EIO)``.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile() as f:
    ...     sha256_file(Path(f.name))[:8]
    'e3b0c442'
    """
    digest, read = hashlib.sha256(), 0
    with Path(path).open("rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        while block := fh.read(1 << 20):
            digest.update(block)
            read += len(block)
        if read < size and os.fstat(fh.fileno()).st_size == size:  # not a hash of a part
            raise OSError(errno.EIO, f"short read: {read:,} of {size:,} bytes", str(path))
    return digest.hexdigest()


def write_labels(path: Path, labels: np.ndarray) -> None:
    """Write a label image as a deflate-compressed TIFF, atomically.

    uint16 is used, or uint32 when the largest label exceeds 65535. Parent folders are
    created. The file appears complete or not at all. Strips are converted and compressed
    one at a time, so a large label image is not copied whole.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype.kind not in "iub":
        raise ValueError(f"labels must be a 2-D integer array, got {labels.dtype} {labels.shape}")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must not be negative")
    top = int(labels.max()) if labels.size else 0
    dtype = np.dtype(np.uint16 if top <= np.iinfo(np.uint16).max else np.uint32)
    rows = max(1, _STRIP_BYTES // max(1, labels.shape[1] * dtype.itemsize))

    def strips() -> Iterator[bytes]:
        for start in range(0, labels.shape[0], rows):
            yield zlib.compress(labels[start : start + rows].astype(dtype).tobytes())

    atomic_write(
        Path(path),
        lambda fh: tifffile.imwrite(
            fh,
            strips(),
            shape=labels.shape,
            dtype=dtype,
            rowsperstrip=rows,
            compression="zlib",
            photometric="minisblack",
        ),
    )


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through a temporary file in the same folder, then rename it into place.

    Readers never see a half-written file, and a failed write leaves ``path`` as it was;
    the file and then its folder are fsynced, so after a power cut it is there whole.
    ``write`` gets a buffered file, which writes all it is given or raises (it retries a
    short ``write`` itself). OS errors (a full disk, a file-size limit, a lost network
    share) become :class:`~cellwatch.errors.TransientError`, so the job is retried.
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Not tempfile: its files are private (0o600); "x" mode follows the umask like any file.
        with tmp.open("xb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)  # the rename itself survives a power cut
    except OSError as exc:
        raise (DiskFullError if disk_full(exc) else TransientError)(
            f"could not write {path} ({exc.strerror or exc}; disk full?); nothing was "
            "changed there. Free some space on that disk and try again."
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk; a file system that cannot
    sync a folder (some network shares answer EINVAL) is left to its own guarantees."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)
