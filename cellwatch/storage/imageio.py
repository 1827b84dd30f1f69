"""Read microscope images into one 2-D plane, and write label images.

TIFF and OME-TIFF are read with tifffile (:mod:`cellwatch.storage.tiff`), PNG and JPEG with
Pillow, and the microscope formats (CZI, ND2, LIF) through bioio
(:mod:`cellwatch.storage.vendor`), one scene at a time: each series of a TIFF that is an
image of its own is a scene, as a CZI's scenes are. The channel is chosen by
:mod:`cellwatch.storage.channels`. Every input is checked before it is decoded: its declared size must fit
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

from cellwatch.config import NUCLEAR_CHANNELS
from cellwatch.errors import BadInputError, DiskFullError, TransientError, disk_full, io_fault
from cellwatch.storage import tiff, vendor
from cellwatch.storage.channels import AUTO, choose_channel
from cellwatch.storage.names import SUPPORTED_EXTENSIONS, find_pairs, is_supported, stem
from cellwatch.storage.pixels import STAINS, stain_plane
from cellwatch.storage.tiff import tiff_incomplete

_TIFF_SUFFIXES = (".tif", ".tiff")
_CHANNEL_AXES = "CS"
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
    channel : str
        The channel counted: its name where the file names it, else its number; empty for
        a gray or colour image read whole.
    """

    pixels: np.ndarray
    pixel_size_um: float | None
    path: Path
    note: str = ""
    scene: int | None = None
    channel: str = ""


def scene_count(path: Path) -> int:
    """How many scenes (positions, series) the file holds: a microscope file's scenes,
    a TIFF's series that are images of their own (:func:`~cellwatch.storage.tiff.scene_series`),
    else 1.

    Raises
    ------
    BadInputError
        The file does not open, or its reader (cellwatch extra) is not installed.
    TransientError
        The operating system could not open the file for a reason that may pass.
    """
    path = Path(path)
    if vendor.is_vendor(path):
        return vendor.scene_count(path)
    if not path.name.lower().endswith(_TIFF_SUFFIXES):
        return 1
    with _open_input(path) as fh:
        try:
            with tifffile.TiffFile(fh) as tif:
                return len(tiff.scene_series(tif))
        except Exception as exc:  # a decoder may fail in any way on a corrupt file
            if fault := io_fault(path, exc):
                raise fault from exc
            raise BadInputError(f"{path} is not a readable TIFF: {exc}") from exc


def read_image(
    path: Path,
    *,
    channel: int | str | None = AUTO,
    stack: Literal["max", "plane"] = "max",
    plane: int = 0,
    max_pixels: int = 400_000_000,
    scene: int | None = None,
    nuclear_channels: Sequence[str] = NUCLEAR_CHANNELS,
) -> ImageData:
    """Read a TIFF, OME-TIFF, PNG, JPEG, CZI, ND2 or LIF file and reduce it to one 2-D plane.

    Parameters
    ----------
    path : Path
        The image file.
    channel : int, str or None
        Channel to use, by number (from 0) or by the name the file gives it (``"DAPI"``,
        any case; OME-TIFF and the microscope formats name their channels). ``"auto"``:
        the only channel, else the one named after a stain of ``nuclear_channels``; RGB
        and unnamed channels as None. None accepts gray images, and colour images whose
        channels are equal (:func:`~cellwatch.storage.channels.choose_channel`);
        or a stain of an RGB brightfield image (``STAINS``: hematoxylin, eosin, dab by
        colour deconvolution, gray by luminance).
    stack : {"max", "plane"}
        "max" projects all Z/T/other planes; "plane" keeps plane number ``plane``.
    plane : int
        Flat index over all stack axes, used when ``stack="plane"``.
    max_pixels : int
        Refuse images that declare more pixels (height × width × planes) than this.
    scene : int or None
        The scene (position, series) of a file that holds several (from 0; see
        :func:`scene_count`). None for a file of one.
    nuclear_channels : sequence of str
        The nuclear stains ``"auto"`` looks for in channel names (``input.nuclear_channels``).

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
    if vendor.is_vendor(path):
        raw = _read_vendor(path, scene, max_pixels)
    else:
        with _open_input(path) as fh:
            if path.name.lower().endswith(_TIFF_SUFFIXES):
                raw = _read_tiff(fh, path, max_pixels, scene)
            elif path.name.lower().endswith((".png", ".jpg", ".jpeg")):
                if scene is not None:
                    raise BadInputError(f"{path} holds one image, so scene {scene} does not exist")
                raw = _read_pillow(fh, path, max_pixels)
            else:
                raise BadInputError(
                    f"{path} has an unsupported file type; use {SUPPORTED_EXTENSIONS}"
                )
    if raw.data.size == 0:
        raise BadInputError(f"{path} contains an image with no pixels (shape {raw.data.shape})")
    index: int | str | None
    if isinstance(channel, str) and channel.strip().lower() in STAINS:
        index = used = channel.strip().lower()  # a stain: made from the RGB channels
    else:
        index = choose_channel(
            path, channel, raw.names, raw.n_channels, samples=raw.is_colour, stains=nuclear_channels
        )
        used = raw.label(index)
    named = isinstance(index, int) and used != str(index)
    notes = [raw.note, f"channel {used!r}" if named else ""]
    pixels, note = _reduce_to_plane(
        raw.data, raw.axes, raw.n_alpha, path, index, stack, plane, raw.names
    )
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8)
    note = "; ".join(n for n in [*notes, note] if n)
    return ImageData(pixels, raw.pixel_size, path, note, scene, used)


@dataclass(frozen=True, eq=False)
class _Raw:
    """A file's (or scene's) pixels as decoded, before a channel and a plane are picked."""

    data: np.ndarray
    axes: str
    pixel_size: float | None
    names: tuple[str, ...] | None = None
    n_alpha: int = 0
    note: str = ""

    @property
    def n_channels(self) -> int:
        """Channels after C and S are merged (and alpha dropped), as _reduce_to_plane does."""
        sizes = dict(zip(self.axes, self.data.shape, strict=True))
        merged = math.prod(sizes.get(a, 1) for a in _CHANNEL_AXES)
        return merged - (self.n_alpha if "S" in sizes and "C" not in sizes else 0)

    def label(self, index: int | None) -> str:
        """How the ledger names channel ``index``: its name, else its number ("" for None)."""
        if index is None:
            return ""
        named = self.names is not None and len(self.names) == self.n_channels
        return self.names[index] if self.names is not None and named else str(index)

    @property
    def is_colour(self) -> bool:
        """The channels are the colour samples of an RGB(A) image."""
        return dict(zip(self.axes, self.data.shape, strict=True)).get("S", 1) > 1


def _read_vendor(path: Path, scene: int | None, max_pixels: int) -> _Raw:
    """One scene of a microscope file."""
    found = vendor.open_scene(path, scene)
    lazy = found.data
    _check_declared_size(path, tuple(lazy.shape), found.axes, np.dtype(lazy.dtype), max_pixels)
    try:
        data = vendor.read_pixels(path, found)  # the vendor's library if the plugin fails
    except (BadInputError, TransientError, MemoryError):
        raise
    except Exception as exc:  # a decoder may fail in any way on a corrupt file
        if fault := io_fault(path, exc):
            raise fault from exc
        raise vendor.pixels_unreadable(path, found, exc) from exc
    note = f"scene {found.index} ({found.name}) of {found.count}" if found.count > 1 else ""
    if found.reader:
        note = "; ".join(n for n in (note, f"read with {found.reader}") if n)
    return _Raw(data, found.axes, found.pixel_size_um, found.channel_names, note=note)


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


def _read_tiff(fh: BinaryIO, path: Path, max_pixels: int, scene: int | None) -> _Raw:
    try:
        with tifffile.TiffFile(fh) as tif:
            series, note = tiff.pick_scene(tif, path, scene)
            axes, keyframe = series.axes, series.keyframe
            _check_declared_size(path, series.shape, axes, series.dtype, max_pixels)
            file_size = os.fstat(fh.fileno()).st_size
            tiff.check_not_truncated(path, series, file_size)
            missing = tiff_incomplete(tif, file_size)
            if missing:
                raise BadInputError(
                    f"{path} is incomplete: {missing}. If the microscope was still writing "
                    "it, it was given up on after watch.incomplete_timeout_s; copy the "
                    "finished file into the inbox again."
                )
            try:
                pixel_size = tiff.pixel_size_um(tif, series)
            except (ET.ParseError, ValueError, TypeError, ZeroDivisionError):
                pixel_size = None  # broken metadata should not cost the pixels
            try:
                names = tiff.channel_names(tif, series)
            except ET.ParseError:
                names = None
            data = series.asarray()  # level 0 of a pyramid: the full resolution
    except (BadInputError, TransientError, MemoryError):
        raise
    except Exception as exc:  # a decoder may fail in any way on a corrupt file
        if fault := io_fault(path, exc):
            raise fault from exc
        raise BadInputError(f"{path} is not a readable TIFF: {exc}") from exc
    n_alpha = sum(e in (1, 2) for e in keyframe.extrasamples) if "S" in axes else 0
    return _Raw(data, axes, pixel_size, names, n_alpha, note)


def _read_pillow(fh: BinaryIO, path: Path, max_pixels: int) -> _Raw:
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
    return _Raw(data, axes, None, n_alpha=int(im.mode in ("LA", "RGBA")))


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


def _reduce_to_plane(
    data: np.ndarray,
    axes: str,
    n_alpha: int,
    path: Path,
    channel: int | str | None,
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
    channel: int | str | None,
    notes: list[str],
    names: tuple[str, ...] | None = None,
) -> np.ndarray:
    """(planes, channels, H, W) -> (planes, H, W); a str ``channel`` is one of ``STAINS``."""
    n_chan = data.shape[1]
    if isinstance(channel, str):
        return _pick_stain(data, path, channel, notes)
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
    if n_chan > 1:
        notes.append(f"channel {channel} of {n_chan}")
    return data[:, channel]


def _pick_stain(data: np.ndarray, path: Path, stain: str, notes: list[str]) -> np.ndarray:
    """(planes, 3, H, W) RGB -> (planes, H, W) of one stain (:func:`pixels.stain_plane`)."""
    if data.shape[1] != 3:
        raise BadInputError(
            f"{path} has {data.shape[1]} channel(s), not the 3 of an RGB image, so "
            f"input.channel = {stain!r} (a stain of a brightfield colour image) does not "
            "apply; set input.channel to a channel number or name in config.yaml"
        )
    notes.append(f"{stain} from RGB")
    return np.stack([stain_plane(np.moveaxis(rgb, 0, -1), stain) for rgb in data])


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
