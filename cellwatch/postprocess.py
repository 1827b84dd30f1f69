"""From probability maps to a label image: one positive id per cell.

For a three-class model (background, interior, boundary) the interiors are confident
cores that touching cells do not share; each connected interior becomes a seed and grows
by watershed over the foreground, so touching cells end up separate and each keeps its
full outline. A one-class (foreground) model has no such signal, so its seeds come from
maxima of the distance transform instead.

The watershed only runs where it has a choice to make. Flooding never leaves a connected
part of the mask, so every part is independent: a part holding no seed stays background,
a part holding one seed becomes that cell, and only clumps with several seeds are flooded,
each on its bounding box. Most nuclei stand alone, so this is several times faster than
flooding the whole image and needs no float64 copy of it (the results are the same).

A three-class map is first reduced to one float32 plane, :func:`masked_interior`: the
interior probability where a pixel belongs to a cell and NaN elsewhere. It carries all that
labelling needs at a third of the memory, and tiles can be reduced before stitching.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.measure import label as connected_components
from skimage.segmentation import relabel_sequential, watershed

from cellwatch.errors import ModelError

_CROSS = ndi.generate_binary_structure(2, 1)  # the watershed's default connectivity
_BAND_PIXELS = 1 << 20  # pixels per band when a pass over the image needs temporaries


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
        plane = masked_interior(
            probs,
            interior_threshold=interior_threshold,
            foreground_threshold=foreground_threshold,
        )
        return labels_from_masked_interior(
            plane, interior_threshold=interior_threshold, min_area=min_area
        )
    foreground = probs[..., 0] > foreground_threshold
    seeds, depth = _distance_seeds(foreground)
    labels = watershed_by_part(depth, seeds, foreground | (seeds > 0))
    return tidy(labels, min_area)


def masked_interior(
    probs: np.ndarray, *, interior_threshold: float = 0.5, foreground_threshold: float = 0.5
) -> np.ndarray:
    """Reduce ``(..., 3)`` background/interior/boundary probabilities to one float32 plane.

    A pixel belongs to a cell when its background probability is below
    ``1 - foreground_threshold`` or its interior probability is above
    ``interior_threshold`` (a seed); such pixels keep their interior probability, all
    others become NaN. Works on a batch of tiles as well as on a whole map.
    """
    interior = probs[..., 1]
    inside = (probs[..., 0] < 1.0 - foreground_threshold) | (interior > interior_threshold)
    return np.where(inside, interior, np.float32(np.nan)).astype(np.float32, copy=False)


def labels_from_masked_interior(
    plane: np.ndarray, *, interior_threshold: float = 0.5, min_area: int = 0
) -> np.ndarray:
    """Label a :func:`masked_interior` plane: seeds are connected interiors above
    ``interior_threshold``, grown by watershed over the non-NaN pixels."""
    if plane.ndim != 2:
        raise ModelError(f"expected a 2-D masked interior plane, got shape {plane.shape}")
    seeds, _ = ndi.label(plane > interior_threshold, structure=_CROSS)
    parts, n_parts = ndi.label(~np.isnan(plane), structure=_CROSS)
    labels = _flood_clumps(plane, seeds, parts, n_parts, negate=True)
    del seeds
    return tidy(labels, min_area, out=labels)


def watershed_by_part(
    depth: np.ndarray, seeds: np.ndarray, mask: np.ndarray, *, negate: bool = False
) -> np.ndarray:
    """``watershed(depth, seeds, mask=mask)`` (4-connected), flooding only clumps.

    ``seeds`` must lie inside ``mask``. With ``negate`` the flood runs over ``-depth``
    (so callers need not hold a negated copy). Returns int32 labels.
    """
    parts, n_parts = ndi.label(mask, structure=_CROSS)
    return _flood_clumps(depth, seeds, parts, n_parts, negate=negate)


def _flood_clumps(
    depth: np.ndarray, seeds: np.ndarray, parts: np.ndarray, n_parts: int, *, negate: bool
) -> np.ndarray:
    """The watershed's labels, written over ``parts`` (the mask's 4-connected parts)."""
    part_of_seed = _part_of_each_seed(seeds, parts)
    seeds_in_part = np.bincount(part_of_seed, minlength=n_parts + 1)
    seeds_in_part[0] = 0
    lut = np.zeros(n_parts + 1, np.int32)
    alone = seeds_in_part[part_of_seed] == 1
    alone[0] = False
    lut[part_of_seed[alone]] = np.flatnonzero(alone).astype(np.int32)
    floods = []
    boxes = ndi.find_objects(parts)
    for part in np.flatnonzero(seeds_in_part >= 2):
        box = boxes[part - 1]
        inside = parts[box] == part
        height = -depth[box] if negate else depth[box]
        markers = np.where(inside, seeds[box], 0)
        floods.append((box, inside, watershed(height, markers, mask=inside)))
    labels = _take(lut, parts, out=parts)
    for box, inside, flooded in floods:
        labels[box][inside] = flooded[inside]
    return labels


def _bands(array: np.ndarray) -> list[slice]:
    """Row slices of about :data:`_BAND_PIXELS` pixels each, covering ``array``."""
    rows = max(1, _BAND_PIXELS // max(1, array[0].size)) if array.ndim and len(array) else 1
    return [slice(top, top + rows) for top in range(0, max(1, len(array)), rows)]


def _take(lut: np.ndarray, labels: np.ndarray, *, out: np.ndarray) -> np.ndarray:
    """``out[...] = lut[labels]`` band by band (``out`` may be ``labels`` itself), so no
    full-size temporary is made."""
    for rows in _bands(labels):
        np.take(lut, labels[rows], out=out[rows], mode="clip")
    return out


def _part_of_each_seed(seeds: np.ndarray, parts: np.ndarray) -> np.ndarray:
    """``part[s]``: the mask part seed ``s`` lies in (0 for the background, index 0)."""
    n_seeds = int(seeds.max()) if seeds.size else 0
    part_of_seed = np.zeros(n_seeds + 1, np.int32)
    for rows in _bands(seeds):
        band, band_parts = seeds[rows], parts[rows]
        where = band > 0
        part_of_seed[band[where]] = band_parts[where]
    part_of_seed[0] = 0
    return part_of_seed


def tidy(labels: np.ndarray, min_area: int, *, out: np.ndarray | None = None) -> np.ndarray:
    """Drop cells under ``min_area`` pixels and renumber the rest 1..n (int32).

    Returns ``labels`` itself when it is already int32 and nothing changes. Pass
    ``out=labels`` (int32) to renumber in place instead of into a new array.
    """
    top = int(labels.max()) if labels.size else 0
    if labels.ndim != 2 or top > labels.size or (labels.size and labels.min() < 0):
        return _tidy_sparse(labels, min_area)  # odd ids: the general path
    counts = np.zeros(top + 1, np.intp)
    for rows in _bands(labels):  # bincount copies its input to int64: keep that small
        counts += np.bincount(labels[rows].ravel(), minlength=top + 1)
    keep = counts > 0
    keep[0] = False
    if min_area > 1:
        keep &= counts >= min_area
    lut = np.where(keep, np.cumsum(keep), 0).astype(np.int32)
    if labels.dtype == np.int32 and np.array_equal(lut, np.arange(top + 1)):
        return labels
    if out is None or out.dtype != np.int32 or out.shape != labels.shape:
        out = np.empty(labels.shape, np.int32)
    return _take(lut, labels, out=out)


def _tidy_sparse(labels: np.ndarray, min_area: int) -> np.ndarray:
    if min_area > 1 and labels.any():
        ids, counts = np.unique(labels, return_counts=True)
        small = ids[(counts < min_area) & (ids != 0)]
        labels = np.where(np.isin(labels, small), 0, labels)
    relabelled, _, _ = relabel_sequential(labels)
    return relabelled.astype(np.int32, copy=False)


def _distance_seeds(foreground: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Seeds at the centres of blobs: plateaus of the smoothed distance transform."""
    distance = ndi.gaussian_filter(ndi.distance_transform_edt(foreground), 1.0)
    peaks = (distance == ndi.maximum_filter(distance, size=5)) & (distance > 1.0) & foreground
    return connected_components(peaks), -distance
