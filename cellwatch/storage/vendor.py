"""Microscope formats (Zeiss CZI, Nikon ND2, Leica LIF) through bioio and its plugins.

Each format has its own bioio reader plugin, installed by a cellwatch extra
(``pip install 'cellwatch[czi]'``; :data:`~cellwatch.config.VENDOR_FORMATS` lists them).
The plugin is chosen by the file's suffix and imported only when such a file is read:
bioio is heavy. Without the plugin, reading raises a :class:`BadInputError` that names the
extra to install. When the plugin fails on a file, the vendor's own library reads it
(:mod:`cellwatch.storage.native`: pylibCZIrw, nd2, liffile); a file is called damaged only
when its bytes show it (:func:`cellwatch.storage.native.damage`), and an acquisition with no
YX plane (a line scan, a λ-scan) is named as such.

A file may hold several scenes (positions, series). :func:`open_scene` gives one of them as
a lazy array with its axes (bioio's ``TCZYX``, plus ``S`` for RGB samples), its pixel size
and its channel names; :mod:`cellwatch.storage.imageio` checks the size and picks the plane.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from cellwatch.config import VENDOR_FORMATS
from cellwatch.errors import BadInputError, TransientError, io_fault
from cellwatch.storage import native
from cellwatch.storage.native import OpenFile, VendorScene

__all__ = [
    "OpenFile",
    "VendorScene",
    "install_hint",
    "is_vendor",
    "open_scene",
    "opens_whole",
    "pixels_unreadable",
    "plugin_installed",
    "read_pixels",
    "scene_count",
]

# Leica's DimensionDescription DimID → axis (liffile's letters); the ones not YX-countable
_LEICA_DIMS = {1: "X", 2: "Y", 3: "Z", 4: "T", 5: "λ", 6: "A", 7: "N", 8: "Q", 9: "Λ", 10: "M"}

log = logging.getLogger("cellwatch.vendor")


def is_vendor(path: Path) -> bool:
    """True if the file's suffix is one of the formats read through bioio."""
    return Path(path).suffix.lower() in VENDOR_FORMATS


def plugin_installed(path: Path) -> bool:
    """True if the bioio plugin for this file's format is installed (not imported)."""
    _, module, _ = VENDOR_FORMATS[Path(path).suffix.lower()]
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def install_hint(path: Path) -> str:
    """What to install to read this file's format, in words."""
    name, module, extra = VENDOR_FORMATS[Path(path).suffix.lower()]
    return (
        f"reading {name} files needs the bioio plugin {module.replace('_', '-')}: install it "
        f"with  pip install 'cellwatch[{extra}]'  (or cellwatch[microscopes] for CZI, ND2 "
        "and LIF), then restart cellwatch"
    )


def scene_count(path: Path) -> int:
    """How many scenes (positions, series) the file holds.

    Raises
    ------
    BadInputError
        The plugin is missing or the file does not open.
    TransientError
        The operating system could not open the file for a reason that may pass.
    """
    return len(_open_any(Path(path)).names)


def open_scene(path: Path, scene: int | None) -> VendorScene:
    """Scene ``scene`` of the file, lazily; ``None`` asks for the only scene there is.

    Raises
    ------
    BadInputError
        The plugin is missing, the file does not open, the scene does not exist, has no
        YX plane (a line scan, a λ-scan), or ``scene`` is None for a file of several
        scenes (each must be counted on its own).
    TransientError
        The operating system could not open the file for a reason that may pass.
    """
    path = Path(path)
    opened = _open_any(path)
    count = len(opened.names)
    if scene is None and count > 1:
        raise BadInputError(
            f"{path} holds {count} scenes (positions); each is counted as its own image, "
            "so one scene must be named"
        )
    index = scene or 0
    if not 0 <= index < count:
        raise BadInputError(f"{path} has {count} scene(s), so scene {index} does not exist")
    return opened.scene(index)


def read_pixels(path: Path, found: VendorScene) -> Any:
    """The scene's pixels as a numpy array: from its reader, else from the vendor's library
    when the bioio plugin fails on them.

    Raises
    ------
    BadInputError
        Neither reads them (:func:`pixels_unreadable` says why).
    """
    import numpy as np

    try:
        # synchronous: no pool of threads left behind, none nested in a Dask worker
        return np.asarray(found.data.compute(scheduler="synchronous"))
    except (BadInputError, TransientError, MemoryError):
        raise
    except Exception as exc:  # a plugin may fail in any way on a file it does not follow
        if fault := io_fault(path, exc):
            raise fault from exc
        if found.reader:
            raise
        first = exc
    try:
        opened = native.open_native(path)
        if opened is None or len(opened.names) != found.count:
            raise first
        again = opened.scene(found.index)
        data = np.asarray(again.data.compute(scheduler="synchronous"))
    except (BadInputError, TransientError, MemoryError):
        raise
    except Exception as exc:
        raise pixels_unreadable(path, found, first, exc) from exc
    log.info("%s: %s could not read scene %d, %s did", path, _plugin(path), found.index,
             opened.reader)  # fmt: skip
    return data


def pixels_unreadable(
    path: Path, found: VendorScene, exc: BaseException, also: BaseException | None = None
) -> BadInputError | TransientError:
    """The error for a scene whose pixels no reader reads: an I/O error is retried; damaged
    when the bytes show it, else an acquisition cellwatch cannot read, with each reader's
    own words."""
    for cause in (exc, also):
        if cause is not None and (fault := io_fault(path, cause)):
            return fault

    said = f"{found.reader or _plugin(path)} says: {_quote(exc)}"
    if also is not None and also is not exc:
        said += f"; {native_library(path)} says: {_quote(also)}"
    where = f"scene {found.index} ({found.name})"
    damaged = native.damage(path)
    if damaged:
        return BadInputError(
            f"{path} is damaged: {damaged} ({where} could not be read; {said}). Copy the "
            "file again from the microscope."
        )
    return BadInputError(
        f"{path}: the pixels of {where} could not be read ({said}). The file's structure "
        "looks whole, so it is not damaged: it is likely a kind of acquisition cellwatch "
        "does not count; export it as OME-TIFF to count it."
    )


def opens_whole(path: Path) -> bool:
    """The plugin's own check that a file is complete: it opens, every scene's dimensions
    can be read from its metadata (no pixels are read), and its bytes show no damage; or,
    when the plugin fails, the vendor's library opens it.

    A file whose plugin is missing counts as whole: reading it then records the install
    hint, rather than waiting for a file that will never open.
    """
    path = Path(path)
    if not plugin_installed(path):
        return True
    try:
        reader = _reader_class(path)(str(path))
        for index in range(len(reader.scenes)):
            reader.set_scene(index)
            _ = reader.dims
    except Exception as exc:  # a half-written file fails in the plugin's own ways
        log.debug("%s does not open whole in its plugin: %s", path, exc)
        return _native_opens(path)
    return native.damage(path, opened=True) is None  # a plugin may skip a missing LIF block


def _native_opens(path: Path) -> bool:
    """The vendor's library opens the file and its bytes show no damage."""
    try:
        opened = native.open_native(path)
    except Exception as exc:  # a half-written file fails in the library's own ways
        log.debug("%s does not open whole yet: %s", path, exc)
        return False
    return opened is not None and native.damage(path) is None


def _open_any(path: Path) -> OpenFile:
    """The file through its bioio plugin; a scene the plugin cannot follow (or the whole
    file, when it cannot open it) through the vendor's library instead."""
    try:
        plugin = _open_bioio(path)
    except _PluginError as exc:
        return _native(path, exc.__cause__ or exc)

    def scene(index: int) -> VendorScene:
        try:
            return plugin.scene(index)
        except _PluginError as exc:
            opened = _native(path, exc.__cause__ or exc)
            if len(opened.names) != len(plugin.names):
                raise _unreadable(path, exc.__cause__ or exc) from exc
            return opened.scene(index)

    return OpenFile(plugin.reader, plugin.names, scene)


def _native(path: Path, first: BaseException) -> OpenFile:
    """The file through the vendor's library, after the plugin failed with ``first``."""
    if fault := io_fault(path, first):
        raise fault from first

    try:
        opened = native.open_native(path)
    except (MemoryError, TransientError):
        raise
    except Exception as exc:  # the library fails in its own ways on a file it cannot read
        raise _unreadable(path, first, exc) from exc
    if opened is None:
        raise _unreadable(path, first) from first
    log.info("%s: %s failed (%s); read with %s", path, _plugin(path), _quote(first), opened.reader)
    return opened


class _PluginError(Exception):
    """The bioio plugin failed on the file's content (its cause says how)."""


def _open_bioio(path: Path) -> OpenFile:
    image = _open(path)
    try:
        names = tuple(str(s) for s in image.scenes)
        image.set_scene(0)  # a file-wide fault (the calibration, say) shows here
        _ = (image.dims, image.physical_pixel_sizes, image.channel_names)
    except (MemoryError, TransientError):
        raise
    except Exception as exc:  # a plugin may fail in any way on a file it does not follow
        raise _PluginError() from exc

    def scene(index: int) -> VendorScene:
        try:  # metadata only: the pixels are read later (read_pixels)
            image.set_scene(index)
            axes, data = image.dims.order, image.dask_data
            sizes, channels = image.physical_pixel_sizes, image.channel_names
            leica = _leica_sizes(image.metadata, names[index]) if _is_lif(path) else None
        except (MemoryError, TransientError):
            raise
        except Exception as exc:  # a plugin may fail in any way on a file it does not follow
            raise _PluginError() from exc
        sizes_found = leica or dict(zip(axes, data.shape, strict=True))
        native.check_plane(path, index, names[index], sizes_found)
        x = sizes.X if sizes is not None else None
        pixel_size = float(x) if x is not None and x > 0 else None
        channel_names = tuple(str(n) for n in channels) if channels else None
        return VendorScene(data, axes, pixel_size, channel_names, index, len(names), names[index])

    return OpenFile(_plugin(path), names, scene)


def _is_lif(path: Path) -> bool:
    return path.suffix.lower() == ".lif"


def _leica_sizes(metadata: Any, scene: str) -> dict[str, int] | None:
    """The axes Leica's XML gives the scene's image (``{"Z": 40, "X": 512}`` for an XZ
    scan), or None when the metadata does not say."""
    if not isinstance(metadata, ET.Element):
        return None
    wanted = scene.rsplit("/", 1)[-1]
    found = [e for e in metadata.iter("Element") if e.get("Name") == wanted
             and e.find("./Data/Image/ImageDescription/Dimensions") is not None]  # fmt: skip
    if len(found) != 1:
        return None
    sizes = {}
    for dim in found[0].iterfind("./Data/Image/ImageDescription/Dimensions/DimensionDescription"):
        axis = _LEICA_DIMS.get(int(dim.get("DimID", "0")))
        if axis:
            sizes[axis] = int(dim.get("NumberOfElements", "1"))
    return sizes or None


def _plugin(path: Path) -> str:
    return VENDOR_FORMATS[path.suffix.lower()][1].replace("_", "-")


def native_library(path: Path) -> str:
    """The vendor's own library for the file's format."""
    return {".czi": "pylibCZIrw", ".nd2": "nd2", ".lif": "liffile"}[path.suffix.lower()]


def _quote(exc: BaseException) -> str:
    reason = " ".join(str(exc).split()) or type(exc).__name__
    attempted = "Readers attempted: - "  # bioio's wrapping of the plugin's own message
    if attempted in reason:
        reason = reason.split(attempted, 1)[1].split(": ", 1)[-1]
    return reason


def _reader_class(path: Path) -> type:
    _, module, _ = VENDOR_FORMATS[path.suffix.lower()]
    try:
        reader: type = importlib.import_module(module).Reader
        return reader
    except ImportError as exc:
        raise BadInputError(f"{path}: {install_hint(path)}") from exc


def _open(path: Path) -> Any:
    """A ``bioio.BioImage`` of the file with its format's plugin as the only reader."""
    reader = _reader_class(path)
    try:
        from bioio import BioImage
    except ImportError as exc:
        raise BadInputError(f"{path}: {install_hint(path)}") from exc
    try:
        if path.stat().st_size == 0:
            raise BadInputError(f"{path} is empty (0 bytes); was it saved completely?")
        return BioImage(str(path), reader=reader)
    except FileNotFoundError:
        raise BadInputError(f"{path} does not exist (was it moved or deleted?)") from None
    except PermissionError as exc:
        raise BadInputError(f"{path} cannot be read: permission denied ({exc})") from None
    except (BadInputError, MemoryError):
        raise
    except OSError as exc:
        if _is_plugin_error(exc):
            raise _PluginError() from exc
        raise TransientError(f"{path} could not be opened: {exc}; will try again") from exc
    except Exception as exc:  # bioio wraps what the plugin raised
        raise _PluginError() from exc


def _is_plugin_error(exc: OSError) -> bool:
    """An OSError a plugin raised about the content (no errno), not the OS about access."""
    return exc.errno is None


def _unreadable(
    path: Path, exc: BaseException, also: BaseException | None = None
) -> BadInputError | TransientError:
    """The error for a file no reader opens: an I/O error behind it is retried; a content
    error is called damaged only when the file's bytes show it."""
    for cause in (exc, also):
        if cause is not None and (fault := io_fault(path, cause)):
            return fault
    name = VENDOR_FORMATS[path.suffix.lower()][0]
    said = f"{_plugin(path)} says: {_quote(exc)}"
    if also is not None:
        said += f"; {native_library(path)} says: {_quote(also)}"
    damaged = native.damage(path)
    if damaged:
        return BadInputError(f"{path} is not a readable {name} file: {damaged} ({said})")
    return BadInputError(
        f"{path} could not be read as a {name} file ({said}). Its structure looks whole, so "
        "it is not called damaged: it may be a kind of acquisition cellwatch does not read; "
        "export it as OME-TIFF to count it."
    )
