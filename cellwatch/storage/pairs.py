"""Pair training images with their masks by file name (``a.tif`` with ``a.png``)."""

from __future__ import annotations

__all__ = ["find_pairs"]

from pathlib import Path

from cellwatch.errors import ConfigError


def find_pairs(images: Path, masks: Path) -> list[tuple[Path, Path]]:
    """Pair images and masks by file stem; name every image or mask without a partner."""
    from cellwatch.storage.imageio import is_supported, stem  # imageio re-exports find_pairs

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
