"""Training targets derived from masks: background / interior / boundary, and the
inner distance a seed head learns.

A mask may be an instance label image (one id per cell) or a binary mask (0/1 or 0/255, as
hand-drawn ``image_segment`` folders are); binary masks are split into cells by connected
components first. The boundary class is the inner rim of each cell, so touching cells are
separated by two boundary pixels the network learns to see. Training may weight the
pixels where cells meet (:func:`contact_band`), the mistakes that merge cells.

The inner distance (:func:`inner_distance`) is each cell pixel's distance to the nearest
pixel outside its cell, divided by the largest such distance in that cell: 1 at each
cell's centre, falling towards 0 at its outline, also where two cells touch with no gap
between them. A seed head learns it; its peaks seed one cell each where the three classes
see a single clump.
"""

from __future__ import annotations

__all__ = ["as_instances", "contact_band", "inner_distance", "median_diameter", "three_class"]

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


def inner_distance(labels: np.ndarray) -> np.ndarray:
    """Each cell pixel's distance to the nearest pixel outside its cell, divided by the
    largest such distance in that cell.

    A cell's rim (:func:`~cellwatch.storage.pixels.inner_rim`: pixels with a 4-neighbour
    of another label or of the background, the image's edge counting as background) is at
    distance 1; the distance grows inwards by Euclidean steps.

    Parameters
    ----------
    labels : (H, W) instance labels, 0 for the background.

    Returns
    -------
    numpy.ndarray
        float32 (H, W): 0 on the background, 1 at each cell's centre (its deepest pixel),
        ``1 / depth`` on its rim, also where it touches another cell.

    Examples
    --------
    >>> labels = np.zeros((5, 8), np.int32)
    >>> labels[1:4, 1:4], labels[1:4, 4:7] = 1, 2  # two touching cells, no gap
    >>> inner_distance(labels)[2].tolist()
    [0.0, 0.5, 1.0, 0.5, 0.5, 1.0, 0.5, 0.0]
    """
    if labels.ndim != 2:
        raise ValueError(f"inner_distance needs a 2-D label image, got shape {labels.shape}")
    cells = np.pad(labels.astype(np.int32, copy=False), 1)  # the edge counts as outside
    inside = (cells > 0) & ~inner_rim(cells)
    distance = ndi.distance_transform_edt(inside).astype(np.float32)[1:-1, 1:-1]
    cells = cells[1:-1, 1:-1]
    distance[cells > 0] += 1.0
    if not (cells > 0).any():
        return distance
    _, index = np.unique(cells, return_inverse=True)  # dense ids: labels may have gaps
    index = index.reshape(cells.shape)
    depth = ndi.maximum(distance, index, index=np.arange(index.max() + 1))
    depth = np.asarray(depth, dtype=np.float32)
    depth[depth == 0] = 1.0  # the background's (distance 0 there)
    return distance / depth[index]


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
