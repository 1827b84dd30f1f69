"""Open cellwatch results in napari: each counted image as an Image layer, with its label
image as a Labels layer whose features are the image's cells from ``cells.csv``.

napari finds the reader through the plugin manifest ``cellwatch/napari.yaml`` (installed
with ``pip install 'cellwatch[napari]'``). The functions here return napari's LayerData
tuples ``(data, kwargs, layer_type)`` and import nothing from napari, so they run, and are
tested, without a display.

What opens:

- **a results folder, or its** ``ledger.csv``: the last day's counted images (those
  processed in the 24 hours up to the newest ledger row), the newest :data:`MAX_IMAGES` of
  them, so a folder of 10,000 images opens in seconds;
- **a label image from its** ``labels/`` **folder**: that image as Labels (not as a picture,
  as napari's own TIFF reader would show it), with its input image, and the
  :data:`NEIGHBOURS` images counted before and after it, hidden until ticked.

Input images are read as cellwatch counted them: the row's scene, and its channel where
the ledger records one (else the default ``input`` settings); an input that has moved or
cannot be read leaves its labels without a picture.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tifffile

from cellwatch.errors import CellwatchError
from cellwatch.interop import corrections
from cellwatch.storage import ledger

__all__ = [
    "MAX_IMAGES",
    "NEIGHBOURS",
    "RESULTS_KEY",
    "LayerData",
    "Target",
    "find_target",
    "napari_get_reader",
    "read_results",
]

log = logging.getLogger("cellwatch.napari")

MAX_IMAGES = 12  # images a results folder opens with: the newest of the last day
NEIGHBOURS = 2  # images opened on each side of a label image in the ledger
#: The layers' metadata key naming the results folder they came from (the ledger row is
#: under ``"cellwatch"``); the corrections widget reads both.
RESULTS_KEY = "cellwatch_results"
DAY = pd.Timedelta(hours=24)
_CHUNK_ROWS = 200_000  # cells.csv is read in pieces this long, keeping the images' cells

#: napari's LayerData: the array, the layer's keyword arguments, the layer type.
LayerData = tuple[Any, dict[str, Any], str]


@dataclass(frozen=True)
class Target:
    """What a path opens: a results folder, and the label image asked for, if any."""

    results: Path
    label_file: Path | None = None


def napari_get_reader(path: str | Sequence[str]) -> Callable[..., list[LayerData]] | None:
    """The npe2 reader hook: a function that reads ``path``, or None if it is not
    cellwatch's (napari then offers its other readers)."""
    paths = [path] if isinstance(path, str | Path) else list(path)
    if len(paths) != 1:
        return None
    target = find_target(Path(paths[0]))
    if target is None:
        return None
    return partial(_read, target)


def find_target(path: Path) -> Target | None:
    """The :class:`Target` ``path`` names, or None when it is not cellwatch's.

    A results folder is a folder holding ``ledger.csv``. A TIFF is cellwatch's label image
    when it lies in the ``labels`` folder of a results folder and a ledger row names it.
    """
    path = Path(path)
    if path.is_dir():
        return Target(path) if (path / "ledger.csv").is_file() else None
    if path.name == "ledger.csv" and path.is_file():
        return Target(path.parent)
    results = path.parent.parent
    if (
        path.suffix.lower() in (".tif", ".tiff")
        and path.parent.name == "labels"
        and (results / "ledger.csv").is_file()
        and _row_of(_counted(results), path.name) is not None
    ):
        return Target(results, path)
    return None


def read_results(
    path: str | Path, *, max_images: int = MAX_IMAGES, neighbours: int = NEIGHBOURS
) -> list[LayerData]:
    """Layers for a results folder, its ``ledger.csv`` or one of its label images.

    Parameters
    ----------
    path : str or Path
        The results folder, its ``ledger.csv``, or a TIFF in its ``labels/`` folder.
    max_images : int
        For a folder or ledger: how many of the last day's images, the newest first kept.
    neighbours : int
        For a label image: how many images before and after it in the ledger.

    Returns
    -------
    list of (data, kwargs, layer_type)
        An ``"image"`` then a ``"labels"`` layer for each image, oldest first. Only the
        newest image (or the label image opened) is visible.

    Raises
    ------
    CellwatchError
        When ``path`` is none of these.
    """
    target = find_target(Path(path))
    if target is None:
        raise CellwatchError(
            f"{path} is not a cellwatch results folder, ledger.csv or label image (a TIFF "
            "in the labels/ folder beside ledger.csv, named in the ledger)"
        )
    return _read(target, max_images=max_images, neighbours=neighbours)


def _read(
    target: Target,
    _path: object = None,
    *,
    max_images: int = MAX_IMAGES,
    neighbours: int = NEIGHBOURS,
) -> list[LayerData]:
    rows = _counted(target.results)
    if target.label_file is None:
        chosen = _last_day(rows, max_images)
        shown = chosen.index[-1] if len(chosen) else None
    else:
        shown = _row_of(rows, target.label_file.name)
        at = rows.index.get_loc(shown)
        chosen = rows.iloc[max(0, at - neighbours) : at + neighbours + 1]
    if len(chosen) < len(rows):
        log.info(
            "opening %d of the %d counted images in %s", len(chosen), len(rows), target.results
        )
    cells = _cells_of(target.results / "cells.csv", set(chosen["job_id"]))
    layers: list[LayerData] = []
    for index, row in chosen.iterrows():
        mine = cells.get((row["job_id"], ledger.scene_key(row["scene"])))
        layers += _layers(row, target.results, mine, index == shown)
    return layers


def _counted(results: Path) -> pd.DataFrame:
    """The ledger's ``ok`` rows that name a label image, in ledger order."""
    rows = ledger.read(results / "ledger.csv")
    return rows[rows["status"].eq("ok") & rows["labels"].notna()]


def _row_of(rows: pd.DataFrame, label_name: str) -> Any:
    """The index of the newest row whose label image is called ``label_name``."""
    names = rows["labels"].map(lambda p: Path(str(p)).name)
    found = rows.index[names == label_name]
    return found[-1] if len(found) else None


def _last_day(rows: pd.DataFrame, limit: int) -> pd.DataFrame:
    when = pd.to_datetime(rows["processed_at"], utc=True, errors="coerce", format="ISO8601")
    if when.notna().any():
        rows = rows[when > when.max() - DAY]
    return rows.tail(max(1, limit))


def _cells_of(path: Path, job_ids: set[str]) -> dict[tuple[str, str], pd.DataFrame]:
    """Each image's cells by ``(job_id, scene)`` (the scene as :func:`ledger.scene_key`
    writes it: one job counts every scene of a file, each numbering its cells from 1),
    read piece by piece so a large ``cells.csv`` is never held whole.

    A job run again after a crash may have written some cells twice; the last row of each
    ``(job_id, scene, label)`` is kept, as docs/daemon.md tells readers to.
    """
    if not path.is_file() or not job_ids:
        return {}
    dtypes = {"job_id": str, "scene": str}
    parts = [
        chunk[chunk["job_id"].isin(job_ids)]
        for chunk in pd.read_csv(path, dtype=dtypes, chunksize=_CHUNK_ROWS)
    ]
    cells = pd.concat(parts)
    scene = cells["scene"] if "scene" in cells else pd.Series(None, index=cells.index)
    cells = cells.assign(scene=scene.map(ledger.scene_key))
    cells = cells.drop_duplicates(["job_id", "scene", "label"], keep="last")
    return {(job, scene): table for (job, scene), table in cells.groupby(["job_id", "scene"])}


def _layers(
    row: pd.Series, results: Path, cells: pd.DataFrame | None, visible: bool
) -> list[LayerData]:
    name = Path(str(row["image"])).name
    label_file = results / "labels" / Path(str(row["labels"])).name
    if not label_file.is_file():
        log.warning("%s: its label image %s is missing; skipped", name, label_file)
        return []
    labels = tifffile.imread(label_file)
    count = int(row["cell_count"])
    common: dict[str, Any] = {
        "metadata": {"cellwatch": _plain(row), RESULTS_KEY: str(results.absolute())},
        "visible": visible,
    }
    pixel_size = row.get("pixel_size_um")
    if isinstance(pixel_size, int | float) and math.isfinite(pixel_size) and pixel_size > 0:
        common["scale"] = (float(pixel_size), float(pixel_size))
    features = pd.DataFrame({"index": pd.Series(dtype=np.int64)})
    if cells is not None:
        features = cells.drop(columns=["image", "job_id", "scene"]).rename(
            columns={"label": "index"}
        )
    out: list[LayerData] = []
    pixels = _input_pixels(row, results, labels.shape)
    if pixels is not None:
        out.append((pixels, {**common, "name": f"{name} ({count} cells)"}, "image"))
    kwargs = {**common, "name": f"{name} labels ({count} cells)", "features": features}
    out.append((labels, kwargs, "labels"))
    return out


def _input_pixels(row: pd.Series, results: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The plane cellwatch counted (its scene and channel, see
    :func:`~cellwatch.interop.corrections.counted_plane`), or None (with a warning) when
    the image cannot be found or read, or no longer matches its labels."""
    image = row["image"]
    try:
        pixels = corrections.counted_plane(row.to_dict(), results)
    except CellwatchError as exc:
        log.warning("%s: %s; showing its labels only", image, exc)
        return None
    if pixels.shape != shape:
        log.warning(
            "%s: the input image is %s but its labels are %s (was it read with other input "
            "settings?); showing its labels only",
            image,
            pixels.shape,
            shape,
        )
        return None
    return pixels


def _plain(row: pd.Series) -> dict[str, Any]:
    """The ledger row as plain Python values, empty cells left out."""
    return {key: value.item() if hasattr(value, "item") else value
            for key, value in row.items() if not pd.isna(value)}  # fmt: skip
