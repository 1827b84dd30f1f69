"""Image file names: which files cellwatch reads, their stems, and image/mask pairs.

:mod:`cellwatch.storage.imageio` re-exports these names.
"""

from __future__ import annotations

__all__ = ["SUPPORTED_EXTENSIONS", "find_pairs", "is_supported", "stem"]

from collections.abc import Sequence
from pathlib import Path

from cellwatch.config import installed_vendor_suffixes
from cellwatch.errors import ConfigError

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
