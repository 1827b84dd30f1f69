"""From probability maps to a label image: one positive id per cell.

For a three-class model (background, interior, boundary) the interiors are confident
cores that touching cells do not share; each connected interior becomes a seed and grows
by watershed over the foreground, so touching cells end up separate and each keeps its
full outline. A one-class (foreground) model has no such signal, so its seeds come from
maxima of the distance transform instead.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.measure import label as connected_components
from skimage.segmentation import relabel_sequential, watershed

from cellwatch.errors import ModelError


def labels_from_probabilities(
    probs: np.ndarray,
    *,
    interior_threshold: float = 0.5,
    foreground_threshold: float = 0.5,
    min_area: int = 0,
) -> np.ndarray:
    """Turn (H, W, C) probabilities into an int32 label image, ids 1..n with no gaps.

    Parameters
    ----------
    probs : (H, W, 3) background/interior/boundary or (H, W, 1) foreground probabilities.
    interior_threshold : interior probability above which a pixel seeds a cell.
    foreground_threshold : foreground probability above which a pixel belongs to a cell.
    min_area : cells smaller than this many pixels are dropped.
    """
    if probs.ndim != 3 or probs.shape[-1] not in (1, 3):
        raise ModelError(f"model output must be (H, W, 1) or (H, W, 3), got {probs.shape}")
    if probs.shape[-1] == 3:
        foreground = probs[..., 0] < 1.0 - foreground_threshold
        seeds = connected_components(probs[..., 1] > interior_threshold, connectivity=1)
        depth = -probs[..., 1]
    else:
        foreground = probs[..., 0] > foreground_threshold
        seeds, depth = _distance_seeds(foreground)
    labels = watershed(depth, seeds, mask=foreground | (seeds > 0))
    return tidy(labels, min_area)


def tidy(labels: np.ndarray, min_area: int) -> np.ndarray:
    """Drop cells under ``min_area`` pixels and renumber the rest 1..n."""
    if min_area > 1 and labels.any():
        too_small = np.bincount(labels.ravel()) < min_area
        too_small[0] = False
        labels = np.where(too_small[labels], 0, labels)
    relabelled, _, _ = relabel_sequential(labels)
    return relabelled.astype(np.int32, copy=False)


def _distance_seeds(foreground: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Seeds at the centres of blobs: plateaus of the smoothed distance transform."""
    distance = ndi.gaussian_filter(ndi.distance_transform_edt(foreground), 1.0)
    peaks = (distance == ndi.maximum_filter(distance, size=5)) & (distance > 1.0) & foreground
    return connected_components(peaks), -distance
