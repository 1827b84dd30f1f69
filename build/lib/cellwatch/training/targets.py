"""Training targets derived from masks: background / interior / boundary.

A mask may be an instance label image (one id per cell) or a binary mask (0/1 or 0/255, as
hand-drawn ``image_segment`` folders are); binary masks are split into cells by connected
components first. The boundary class is the inner rim of each cell, so touching cells are
separated by two boundary pixels the network learns to see. Training may weight the
pixels where cells meet (:func:`contact_band`), the mistakes that merge cells.
"""

from __future__ import annotations

__all__ = [
    "BACKGROUND",
    "BOUNDARY",
    "INTERIOR",
    "as_instances",
    "contact_band",
    "median_diameter",
    "three_class",
]

import numpy as np
from scipy import ndimage as ndi
from skimage.measure import label as connected_components
from skimage.measure import regionprops_table

from cellwatch.storage.pixels import inner_rim

BACKGROUND, INTERIOR, BOUNDARY = 0, 1, 2


def as_instances(mask: np.ndarray) -> np.ndarray:
    """An instance label image from either an instance mask or a binary mask."""
    values = np.unique(mask)
    if values.size <= 2:  # binary: 0 and one foreground value
        return connected_components(mask > 0, connectivity=1).astype(np.int32)
    return mask.astype(np.int32, copy=False)


def three_class(labels: np.ndarray) -> np.ndarray:
    """Class map (uint8): 0 background, 1 cell interior, 2 cell boundary."""
    classes = (labels > 0).astype(np.uint8)
    classes[inner_rim(labels)] = BOUNDARY
    return classes


def contact_band(labels: np.ndarray, radius: int = 2) -> np.ndarray:
    """Pixels within ``radius`` (chessboard distance) of two different cells: where
    touching or nearly touching cells meet, background gaps between them included."""
    size = 2 * radius + 1
    none = np.iinfo(np.int32).max
    cells = labels.astype(np.int32, copy=False)
    high = ndi.maximum_filter(cells, size=size, mode="constant", cval=0)
    low = ndi.minimum_filter(
        np.where(cells > 0, cells, none), size=size, mode="constant", cval=none
    )
    return (high > 0) & (low < none) & (high != low)


def median_diameter(labels: np.ndarray) -> float | None:
    """Median equivalent diameter (pixels) of the objects in ``labels``; None if empty."""
    props = regionprops_table(labels, properties=("equivalent_diameter_area",))
    diameters = props["equivalent_diameter_area"]
    return float(np.median(diameters)) if len(diameters) else None
