"""Per-cell measurements and the per-image summary that goes into the ledger."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from skimage.measure import regionprops_table

_PROPERTIES = (
    "label",
    "centroid",
    "area",
    "perimeter",
    "equivalent_diameter_area",
    "eccentricity",
    "intensity_mean",
)
_RENAME = {
    "centroid-0": "centroid_y",
    "centroid-1": "centroid_x",
    "area": "area_px",
    "perimeter": "perimeter_px",
    "equivalent_diameter_area": "equivalent_diameter_px",
    "intensity_mean": "mean_intensity",
}


def measure_cells(
    labels: np.ndarray, intensity: np.ndarray, pixel_size_um: float | None
) -> pd.DataFrame:
    """One row per cell: centroid, area, perimeter, shape and mean intensity.

    ``intensity`` is the original image (raw values, not normalised). Physical columns
    (µm, µm²) are filled when ``pixel_size_um`` is known and left empty otherwise.
    """
    table = pd.DataFrame(
        regionprops_table(labels, intensity_image=intensity, properties=_PROPERTIES)
    )
    table = table.rename(columns=_RENAME)
    size = pixel_size_um if pixel_size_um else np.nan
    table["area_um2"] = table["area_px"] * size**2
    table["perimeter_um"] = table["perimeter_px"] * size
    table["equivalent_diameter_um"] = table["equivalent_diameter_px"] * size
    return table


def summarize(
    cells: pd.DataFrame, shape: tuple[int, int], pixel_size_um: float | None
) -> dict[str, Any]:
    """The ledger's per-image numbers from the per-cell table."""
    count = len(cells)
    area = cells["area_px"] if count else pd.Series(dtype=float)
    return {
        "cell_count": count,
        "mean_area_px": float(area.mean()) if count else None,
        "median_area_px": float(area.median()) if count else None,
        "mean_area_um2": float(area.mean()) * pixel_size_um**2 if count and pixel_size_um else None,
        "confluence": float(area.sum()) / (shape[0] * shape[1]),
    }
