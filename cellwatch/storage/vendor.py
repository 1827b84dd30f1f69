"""Microscope formats (Zeiss CZI, Nikon ND2, Leica LIF) through bioio and its plugins.

Each format has its own bioio reader plugin, installed by a cellwatch extra
(``pip install 'cellwatch[czi]'``; :data:`~cellwatch.config.VENDOR_FORMATS` lists them).
The plugin is chosen by the file's suffix and imported only when such a file is read:
bioio is heavy. Without the plugin, reading raises a :class:`BadInputError` that names the
extra to install. Nothing here parses a format by hand.

A file may hold several scenes (positions, series). :func:`open_scene` gives one of them as
a lazy array with its axes (bioio's ``TCZYX``, plus ``S`` for RGB samples), its pixel size
and its channel names; :mod:`cellwatch.storage.imageio` checks the size and picks the plane.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellwatch.config import VENDOR_FORMATS
from cellwatch.errors import BadInputError, TransientError, io_fault

__all__ = [
    "VendorScene",
    "install_hint",
    "is_vendor",
    "open_scene",
    "opens_whole",
    "plugin_installed",
    "scene_count",
]

log = logging.getLogger("cellwatch.vendor")


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
    """

    data: Any
    axes: str
    pixel_size_um: float | None
    channel_names: tuple[str, ...] | None
    index: int
    count: int
    name: str


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
    return len(_open(Path(path)).scenes)


def open_scene(path: Path, scene: int | None) -> VendorScene:
    """Scene ``scene`` of the file, lazily; ``None`` asks for the only scene there is.

    Raises
    ------
    BadInputError
        The plugin is missing, the file does not open, the scene does not exist, or
        ``scene`` is None for a file of several scenes (each must be counted on its own).
    TransientError
        The operating system could not open the file for a reason that may pass.
    """
    path = Path(path)
    image = _open(path)
    scenes = image.scenes
    if scene is None and len(scenes) > 1:
        raise BadInputError(
            f"{path} holds {len(scenes)} scenes (positions); each is counted as its own image, "
            "so one scene must be named"
        )
    index = scene or 0
    if not 0 <= index < len(scenes):
        raise BadInputError(f"{path} has {len(scenes)} scene(s), so scene {index} does not exist")
    try:
        image.set_scene(index)
        axes, data = image.dims.order, image.dask_data
        sizes = image.physical_pixel_sizes
        names = image.channel_names
    except (MemoryError, TransientError):
        raise
    except Exception as exc:  # a plugin may fail in any way on a corrupt file
        raise _unreadable(path, exc) from exc
    x = sizes.X if sizes is not None else None
    pixel_size = float(x) if x is not None and x > 0 else None
    channel_names = tuple(str(n) for n in names) if names else None
    return VendorScene(
        data, axes, pixel_size, channel_names, index, len(scenes), str(scenes[index])
    )


def opens_whole(path: Path) -> bool:
    """The plugin's own check that a file is complete: it opens, and every scene's
    dimensions can be read from its metadata (no pixels are read).

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
        log.debug("%s does not open whole yet: %s", path, exc)
        return False
    return True


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
            raise _unreadable(path, exc) from exc
        raise TransientError(f"{path} could not be opened: {exc}; will try again") from exc
    except Exception as exc:  # bioio wraps what the plugin raised
        raise _unreadable(path, exc) from exc


def _is_plugin_error(exc: OSError) -> bool:
    """An OSError a plugin raised about the content (no errno), not the OS about access."""
    return exc.errno is None


def _unreadable(path: Path, exc: BaseException) -> BadInputError | TransientError:
    """Why a plugin failed: an I/O error behind it is retried, a content error is not."""
    if fault := io_fault(path, exc):
        return fault
    name, module, _ = VENDOR_FORMATS[path.suffix.lower()]
    reason = " ".join(str(exc).split()) or type(exc).__name__
    attempted = "Readers attempted: - "  # bioio's wrapping of the plugin's own message
    if attempted in reason:
        reason = reason.split(attempted, 1)[1].split(": ", 1)[-1]
    return BadInputError(
        f"{path} is not a readable {name} file (truncated, corrupt or not {name}); "
        f"{module.replace('_', '-')} says: {reason}"
    )
