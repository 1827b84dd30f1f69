"""Corrections: a label image fixed by hand, saved beside the plane cellwatch counted as a
training pair, ``images/<stem>.tif`` and ``masks/<stem>.tif``.

The napari widget "cellwatch: corrections" calls :func:`save_correction`; everything it
does is here, so it runs, and is tested, without a display. Results folders are never
written: corrections go to a folder of their own, by default ``corrections/`` beside the
results folder (:func:`default_folder`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tifffile
from skimage.segmentation import relabel_sequential

from cellwatch import pipeline
from cellwatch.config import Config
from cellwatch.errors import CellwatchError
from cellwatch.storage import imageio, ledger

__all__ = [
    "Correction",
    "CorrectionError",
    "channel_of",
    "counted_plane",
    "default_folder",
    "input_file",
    "instance_mask",
    "save_correction",
    "write_pair",
]

log = logging.getLogger("cellwatch.corrections")

FOLDER = "corrections"  # the default folder's name, beside the results folder


class CorrectionError(CellwatchError):
    """A correction cannot be saved as asked (which file, what is wrong, what to do)."""


@dataclass(frozen=True)
class Correction:
    """A saved pair: the image, its instance mask, and how many cells the mask holds."""

    image: Path
    mask: Path
    cells: int


def default_folder(results: str | Path) -> Path:
    """``corrections/`` beside (not inside) the results folder ``results``."""
    return Path(results).absolute().parent / FOLDER


def channel_of(row: Mapping[str, Any], config: Config | None = None) -> int | str | None:
    """The channel cellwatch counted: the row's ``channel`` when the ledger has one, else
    ``input.channel`` of ``config`` (the defaults when None).

    >>> channel_of({"channel": "DAPI"}), channel_of({"channel": 1.0}), channel_of({})
    ('DAPI', 1, 'auto')
    """
    value = row.get("channel")
    if _blank(value):
        return (config or Config()).input.channel
    if isinstance(value, int | float):
        return int(value)
    text = str(value).strip()
    return int(text) if text.isdigit() else text


def input_file(row: Mapping[str, Any], results: str | Path) -> Path | None:
    """The row's input image on disk (a relative path is tried from the working folder,
    then from the results folder's parent), or None when it is not there any more."""
    image = Path(str(row["image"]))
    candidates = [image] if image.is_absolute() else [image, Path(results).parent / image]
    return next((p for p in candidates if p.is_file()), None)


def counted_plane(
    row: Mapping[str, Any], results: str | Path, config: Config | None = None
) -> np.ndarray:
    """The 2-D plane cellwatch counted for a ledger row: its file, its scene, its channel
    (:func:`channel_of`), stacks reduced as ``config``'s ``input`` settings say.

    Raises
    ------
    CorrectionError
        The input image has moved or cannot be read with these settings.
    """
    config = config or Config()
    path = input_file(row, results)
    if path is None:
        raise CorrectionError(
            f"{row['image']}: the input image is not there any more, and a correction needs "
            "the image beside its mask. Put the file back where it was counted and try again."
        )
    scene = _scene(row.get("scene"))
    channel = channel_of(row, config)
    settings = dataclasses.replace(config, input=dataclasses.replace(config.input, channel=channel))
    try:
        return pipeline.read(path, settings, scene).pixels
    except CellwatchError as exc:
        raise CorrectionError(
            f"cannot read the plane cellwatch counted from {path} (channel {channel!r}, scene "
            f"{scene}): {exc}. Choose the config.yaml it was counted with."
        ) from exc


def instance_mask(labels: np.ndarray) -> np.ndarray:
    """``labels`` as a uint16 instance mask, its cells renumbered 1, 2, … in order of
    their old numbers (painted labels may be any non-negative integer).

    >>> instance_mask(np.array([[0, 7], [300, 7]])).tolist()
    [[0, 1], [2, 1]]
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype.kind not in "iub":
        raise CorrectionError(
            f"the labels to save must be one 2-D image of whole numbers, got {labels.dtype} "
            f"of shape {labels.shape}"
        )
    if labels.size and labels.min() < 0:
        raise CorrectionError(
            f"the labels hold negative values (down to {labels.min()}); paint cells with "
            "label 1 or higher and the background with 0"
        )
    mask, _, _ = relabel_sequential(labels.astype(np.int64, copy=False))
    top = int(mask.max()) if mask.size else 0
    if top > np.iinfo(np.uint16).max:
        raise CorrectionError(f"the labels hold {top} cells; a mask holds at most 65,535")
    return mask.astype(np.uint16)


def write_pair(
    image: np.ndarray,
    labels: np.ndarray,
    folder: str | Path,
    stem: str,
    *,
    results: str | Path | None = None,
) -> Correction:
    """Write ``folder/images/<stem>.tif`` (``image`` as it is) and ``folder/masks/<stem>.tif``
    (:func:`instance_mask` of ``labels``), each atomically; an earlier pair is replaced.

    Raises
    ------
    CorrectionError
        The shapes differ, the labels are not a label image, or ``folder`` lies in a
        results folder (``results``, or any folder holding a ``ledger.csv``).
    """
    image = np.asarray(image)
    if image.ndim != 2 or image.shape != np.shape(labels):
        raise CorrectionError(
            f"{stem}: the image is {image.shape} but the labels are {np.shape(labels)}; a "
            "correction needs one 2-D plane and a label image of the same shape"
        )
    mask = instance_mask(labels)
    folder = _outside_results(Path(folder), results)
    pair = Correction(folder / "images" / f"{stem}.tif", folder / "masks" / f"{stem}.tif", 0)
    for path, data in ((pair.image, image), (pair.mask, mask)):
        imageio.atomic_write(path, lambda fh, d=data: tifffile.imwrite(fh, d, compression="zlib"))
    return Correction(pair.image, pair.mask, int(mask.max()) if mask.size else 0)


def save_correction(
    labels: np.ndarray,
    row: Mapping[str, Any],
    results: str | Path,
    folder: str | Path | None = None,
    *,
    config: Config | None = None,
) -> Correction:
    """Save corrected ``labels`` of a ledger ``row`` with the plane cellwatch counted.

    Parameters
    ----------
    labels : (H, W) integer array
        The label image as corrected (any non-negative labels; all 0 is a valid
        correction of an image without cells).
    row : mapping
        The image's ledger row (``image``, ``scene``, and ``channel`` where the ledger
        has it), as the napari reader puts it in the layer's ``metadata["cellwatch"]``.
    results : Path
        The results folder the row is from; never written.
    folder : Path, optional
        Where ``images/`` and ``masks/`` go; :func:`default_folder` when None.
    config : Config, optional
        The settings the image was counted with, for ``input.channel`` when the ledger has
        no ``channel`` column, and the stack settings; the defaults when None.

    Returns
    -------
    Correction
    """
    scene = _scene(row.get("scene"))
    stem = imageio.stem(Path(str(row["image"])), scene)
    image = counted_plane(row, results, config)
    folder = default_folder(results) if folder is None else Path(folder)
    saved = write_pair(image, labels, folder, stem, results=results)
    log.info("%s: saved a correction of %d cells to %s", stem, saved.cells, saved.mask)
    return saved


def _scene(value: Any) -> int | None:
    key = ledger.scene_key(None if _blank(value) else value)
    return int(float(key)) if key else None


def _blank(value: Any) -> bool:
    """Whether a ledger cell is empty (None, NaN, pandas' NA, or blank text)."""
    if isinstance(value, str):
        return not value.strip()
    return value is None or bool(pd.isna(value))


def _outside_results(folder: Path, results: str | Path | None) -> Path:
    """``folder``, absolute, once it is known to lie in no results folder."""
    folder = folder.absolute()
    inside = [p for p in (folder, *folder.parents) if (p / "ledger.csv").is_file()]
    if results is not None and folder.resolve().is_relative_to(Path(results).resolve()):
        inside.insert(0, Path(results))
    if inside:
        raise CorrectionError(
            f"{folder} lies in the results folder {inside[0]}, and results folders are never "
            f"written. Save corrections beside it instead, e.g. in {default_folder(inside[0])}"
        )
    return folder
