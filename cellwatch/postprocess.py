"""From probability maps to a label image: one positive id per cell.

For a three-class model (background, interior, boundary) the interiors are confident
cores that touching cells do not share; each connected interior becomes a seed and grows
by watershed over the foreground, so touching cells end up separate and each keeps its
full outline. Two touching cells whose interiors still meet at the seed threshold are
told apart one level up: a seed that holds two or more *cores* (parts above a higher
``split_threshold``, each of at least ``split_min_area`` pixels) is split between them.
A cell whose interior probability never reaches ``peak_threshold`` (doubtful) is dropped.
A one-class (foreground) model has no such signal, so its seeds come from maxima of the
distance transform instead.

A model with a seed head gives a fourth channel, the learned inner distance (1 at each
cell's centre, falling to 0 at its outline, also where two cells touch with no gap): its
seeds are the connected parts above ``distance_threshold`` (optionally split between cores
above ``distance_split_threshold``), and they are flooded over the inner distance within
the foreground (:func:`masked_distance`), so touching cells part along the map's valley
between them whatever the interior probability says.

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

__all__ = [
    "CARD_PEAK_KEY",
    "grow_outlines",
    "labels_from_masked_interior",
    "labels_from_probabilities",
    "masked_distance",
    "masked_interior",
    "outline_growth",
    "peak_threshold",
    "tidy",
    "watershed_by_part",
]

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from scipy.sparse import coo_matrix, csgraph
from skimage.measure import label as connected_components
from skimage.segmentation import expand_labels, relabel_sequential, watershed

from cellwatch.config import MAX_OUTLINE_GROWTH_PX
from cellwatch.errors import ModelError

#: The model card's entry with how far (pixels at the network's working scale) the cells'
#: outlines are grown after labelling; ``cellwatch finetune`` measures it on the corrections.
CARD_GROWTH_KEY = "outline_growth_px"
#: The model card's entry with the interior probability a cell must reach somewhere to be
#: kept; ``cellwatch finetune`` writes it (docs/teach.md, "Twelfth round").
CARD_PEAK_KEY = "peak_threshold"

_CROSS = ndi.generate_binary_structure(2, 1)  # the watershed's default connectivity
_BAND_PIXELS = 1 << 20  # pixels per band when a pass over the image needs temporaries


def labels_from_probabilities(
    probs: np.ndarray,
    *,
    interior_threshold: float = 0.5,
    foreground_threshold: float = 0.5,
    min_area: int = 0,
    split_threshold: float | None = None,
    split_min_area: int = 0,
    distance_threshold: float = 0.5,
    distance_split_threshold: float | None = None,
    peak_threshold: float = 0.0,
) -> np.ndarray:
    """Turn (H, W, C) probabilities into an int32 label image, ids 1..n with no gaps.

    Parameters
    ----------
    probs : (H, W, 3) background/interior/boundary, (H, W, 4) the same and the inner
        distance of a seed head, or (H, W, 1) foreground probabilities.
    interior_threshold : interior probability above which a pixel seeds a cell (three
        classes).
    foreground_threshold : foreground probability above which a pixel belongs to a cell.
    min_area : cells smaller than this many pixels are dropped.
    split_threshold, split_min_area : a seed holding two or more parts above
        ``split_threshold`` of at least ``split_min_area`` pixels each is split between
        them (three-class maps; None or 1: no splitting).
    distance_threshold : inner distance above which a pixel seeds a cell (four channels;
        ``interior_threshold`` and ``split_threshold`` are then not used).
    distance_split_threshold : four channels: a seed holding two or more parts above this
        inner distance of at least ``split_min_area`` pixels is split between them (None
        or 1: no splitting).
    peak_threshold : three classes: a cell whose interior probability stays below this
        everywhere is dropped (0: none is).

    Examples
    --------
    Two touching squares that the classes see as one clump, with a seed map that dips
    where they meet:

    >>> probs = np.zeros((6, 10, 4), np.float32)
    >>> probs[..., 0] = 1.0
    >>> probs[1:5, 1:9, :2] = (0.0, 1.0)  # one clump of interior
    >>> probs[1:5, 1:9, 3] = [0.3, 0.7, 0.9, 0.4, 0.4, 0.9, 0.7, 0.3]
    >>> labels_from_probabilities(probs, foreground_threshold=0.5, distance_threshold=0.5)[2]
    array([0, 1, 1, 1, 1, 2, 2, 2, 2, 0], dtype=int32)
    """
    if probs.ndim != 3 or probs.shape[-1] not in (1, 3, 4):
        raise ModelError(
            f"model output must be (H, W, 1), (H, W, 3) or (H, W, 4), got {probs.shape}"
        )
    if probs.shape[-1] == 4:
        plane = masked_distance(probs, foreground_threshold=foreground_threshold)
        return labels_from_masked_interior(
            plane,
            interior_threshold=distance_threshold,
            min_area=min_area,
            split_threshold=distance_split_threshold,
            split_min_area=split_min_area,
        )
    if probs.shape[-1] == 3:
        plane = masked_interior(
            probs,
            interior_threshold=interior_threshold,
            foreground_threshold=foreground_threshold,
        )
        return labels_from_masked_interior(
            plane,
            interior_threshold=interior_threshold,
            min_area=min_area,
            split_threshold=split_threshold,
            split_min_area=split_min_area,
            peak_threshold=peak_threshold,
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


def masked_distance(probs: np.ndarray, *, foreground_threshold: float = 0.5) -> np.ndarray:
    """Reduce ``(..., 4)`` background/interior/boundary/inner-distance maps to one float32
    plane, which :func:`labels_from_masked_interior` labels with ``interior_threshold``
    set to the seed threshold (``postprocess.distance_threshold``).

    A pixel belongs to a cell when its background probability is below
    ``1 - foreground_threshold``; such pixels keep their inner distance, all others become
    NaN, so seeds (inner distance above the seed threshold) lie within the foreground the
    classes see. (Unlike :func:`masked_interior`, a high seed value alone does not make a
    pixel a cell's: the sigmoid seed map is not exclusive with the background class, and a
    half-trained map is high on some backgrounds.) Works on a batch of tiles as well as on
    a whole map.
    """
    if probs.shape[-1] != 4:
        raise ModelError(f"a seed-head output has 4 channels, got shape {probs.shape}")
    inside = probs[..., 0] < 1.0 - foreground_threshold
    return np.where(inside, probs[..., 3], np.float32(np.nan)).astype(np.float32, copy=False)


def labels_from_masked_interior(
    plane: np.ndarray,
    *,
    interior_threshold: float = 0.5,
    min_area: int = 0,
    overwrite: bool = False,
    split_threshold: float | None = None,
    split_min_area: int = 0,
    peak_threshold: float = 0.0,
) -> np.ndarray:
    """Label a :func:`masked_interior` plane: seeds are connected interiors above
    ``interior_threshold``, grown by watershed over the non-NaN pixels.

    With a ``split_threshold`` (above ``interior_threshold``; None or 1: none), a seed
    that holds two or more cores, connected parts above it of at least ``split_min_area``
    pixels, is split between them first: each core takes the part of the seed it floods.
    With a ``peak_threshold`` above ``interior_threshold``, cells whose plane stays below
    it everywhere are then dropped (their pixels become background).

    With ``overwrite`` (and a C-contiguous float32 plane, as stitching makes), the labels
    are written into the plane's own memory, which is lost: besides the plane this needs a
    boolean mask, the cells' probabilities and band-sized temporaries, so a large image
    is labelled in less than twice the plane's memory. Otherwise the plane is copied first.
    """
    if plane.ndim != 2:
        raise ModelError(f"expected a 2-D masked interior plane, got shape {plane.shape}")
    if not (overwrite and plane.dtype == np.float32 and plane.flags.c_contiguous):
        plane = np.array(plane, dtype=np.float32, order="C")
    if split_threshold is not None and not interior_threshold < split_threshold:
        raise ValueError(
            f"split_threshold ({split_threshold}) must lie above interior_threshold "
            f"({interior_threshold})"
        )
    # probabilities never exceed 1, so a threshold of 1 or more splits nothing: skip the pass
    off = split_threshold is None or split_threshold >= 1
    split = None if off else (split_threshold, split_min_area)
    peak = peak_threshold if peak_threshold > interior_threshold else None
    labels = _label_in_place(plane, interior_threshold, split, peak)
    return tidy(labels, min_area, out=labels)


def _label_in_place(
    plane: np.ndarray,
    interior_threshold: float,
    split: tuple[float, int] | None = None,
    peak: float | None = None,
) -> np.ndarray:
    """The watershed's labels (int32, not yet renumbered), in the memory of ``plane``.

    The plane's values are first kept only where they are needed, the non-NaN pixels in
    raster order (:class:`_Heights`); the mask's connected parts are then labelled into the
    plane's memory. Seeds are labelled band by band (:func:`_seed_parts`), and each clump
    is flooded on its bounding box with its heights put back from the kept values.
    With ``split`` = (threshold, min_area), parts holding two or more cores are flooded
    too, their seeds split first (:func:`_split_seeds`). With ``peak``, cells whose
    heights stay below it are labelled 0.
    """
    heights = _Heights.of(plane)
    parts = plane.view(np.int32)
    n_parts = ndi.label(heights.mask, structure=_CROSS, output=parts)
    heights.mask = None  # the parts say where the cells are from now on
    part_of_seed, _, seed_peak = _seed_parts(parts, heights, interior_threshold)
    seeds_in_part, lut = _lone_seeds(part_of_seed, n_parts)
    if peak is not None:  # a lone seed's cell is its part: its peak is the seed's
        lut[seed_peak[lut] < peak] = 0
    flood = seeds_in_part >= 2
    if split is not None:
        part_of_core, core_area, _ = _seed_parts(parts, heights, split[0])
        big_cores = part_of_core[(core_area >= split[1]) & (part_of_core > 0)]
        flood |= np.bincount(big_cores, minlength=n_parts + 1) >= 2
    # seed ids grouped by part, ascending within each part
    by_part = np.argsort(part_of_seed[1:], kind="stable").astype(np.int32) + 1
    first_of_part = np.concatenate([[0], np.cumsum(seeds_in_part)])
    next_id = len(part_of_seed)  # for the pieces of split seeds
    floods = []
    boxes = ndi.find_objects(parts)
    for part in np.flatnonzero(flood):
        box = boxes[part - 1]
        inside = parts[box] == part
        height = np.negative(heights.box(parts, box))
        # the same seeds as on the whole image, numbered in the same (raster) order
        markers, n = ndi.label((height < -interior_threshold) & inside, structure=_CROSS)
        if n != seeds_in_part[part]:
            raise RuntimeError(f"part {part}: {n} seeds in its box, {seeds_in_part[part]} found")
        ids = by_part[first_of_part[part] : first_of_part[part] + n]
        if split is not None:
            markers, extra = _split_seeds(markers, n, height, -split[0], split[1])
            ids = np.concatenate([ids, np.arange(next_id, next_id + extra)])
            next_id += extra
        ids = np.concatenate([[0], ids])
        flooded = watershed(height, markers, mask=inside)
        if peak is not None:  # each cell's highest value, wherever in it (split or not)
            lowest = ndi.minimum(height, flooded, np.arange(1, len(ids)))
            ids[1:][np.asarray(lowest) > -peak] = 0
        floods.append((box, inside, ids.astype(np.int32)[flooded]))
    labels = _take(lut, parts, out=parts)
    for box, inside, flooded in floods:
        labels[box][inside] = flooded[inside]
    return labels


def _lone_seeds(part_of_seed: np.ndarray, n_parts: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeds per part, and a part → label table that gives each part with a single seed
    that seed's id (0 for parts with none or several, which are flooded box by box)."""
    seeds_in_part = np.bincount(part_of_seed, minlength=n_parts + 1)
    seeds_in_part[0] = 0
    lut = np.zeros(n_parts + 1, np.int32)
    alone = seeds_in_part[part_of_seed] == 1
    alone[0] = False
    lut[part_of_seed[alone]] = np.flatnonzero(alone).astype(np.int32)
    return seeds_in_part, lut


class _Heights:
    """A plane's non-NaN values in raster order, and where to find any pixel's among them."""

    _BLOCK = 256  # columns per block of the per-row counts

    def __init__(self, values: np.ndarray, mask: np.ndarray, counts: np.ndarray) -> None:
        self.values = values  # float32, the non-NaN pixels in raster order
        self.mask: np.ndarray | None = mask  # the non-NaN pixels (dropped after labelling)
        self.counts = counts  # [row, block]: non-NaN pixels before that row's block

    @classmethod
    def of(cls, plane: np.ndarray) -> _Heights:
        mask = np.isnan(plane)
        np.logical_not(mask, out=mask)
        height, width = plane.shape
        starts = np.arange(0, width, cls._BLOCK)
        per_block = np.zeros((height, len(starts)), np.int64)
        for rows in _bands(mask):
            per_block[rows] = np.add.reduceat(mask[rows], starts, axis=1, dtype=np.int64)
        counts = np.zeros(per_block.size + 1, np.int64)
        np.cumsum(per_block.reshape(-1), out=counts[1:])
        return cls(plane[mask], mask, counts[:-1].reshape(per_block.shape))

    def offset(self, row: int) -> int:
        """Index in :attr:`values` of the first non-NaN pixel at or after ``row``."""
        if row >= len(self.counts):
            return len(self.values)
        return int(self.counts[row, 0])

    def box(self, parts: np.ndarray, box: tuple[slice, slice]) -> np.ndarray:
        """The plane's values (NaN where it was NaN) on ``box``; ``parts`` is nonzero
        exactly where the plane was not NaN."""
        rows, cols = box
        block = cols.start // self._BLOCK
        skipped = parts[rows, block * self._BLOCK : cols.start] != 0
        before = self.counts[rows, block] + np.count_nonzero(skipped, axis=1)
        found = parts[box] != 0
        index = before[:, np.newaxis] + np.cumsum(found, axis=1) - 1
        out = np.full(found.shape, np.nan, np.float32)
        out[found] = self.values[index[found]]
        return out


def _split_seeds(
    seeds: np.ndarray, n: int, depth: np.ndarray, level: float, min_area: int
) -> tuple[np.ndarray, int]:
    """Split each seed that holds two or more cores between them.

    ``seeds`` is labelled 1..n; cores are the 4-connected parts where ``depth`` (the
    negated interior probability) is below ``level``, and count when they have
    ``min_area`` pixels. A splitting seed is replaced by its cores, which the watershed
    over ``depth`` then grows; its first core (in raster order) keeps the seed's id, the
    others are numbered n+1, n+2, ... Returns the new markers and how many ids were added.
    """
    cores, n_cores = ndi.label(depth < level, structure=_CROSS)
    if n_cores < 2:
        return seeds, 0
    in_core = cores > 0
    seed_of_core = np.zeros(n_cores + 1, seeds.dtype)
    seed_of_core[cores[in_core]] = seeds[in_core]
    big = np.bincount(cores[in_core], minlength=n_cores + 1) >= min_area
    big[0] = False
    splits = np.bincount(seed_of_core[big], minlength=n + 1) >= 2
    splits[0] = False
    if not splits.any():
        return seeds, 0
    kept = np.flatnonzero(big & splits[seed_of_core])  # ascending: raster order
    owner = seed_of_core[kept]
    order = np.argsort(owner, kind="stable")
    first = np.ones(len(kept), bool)
    first[order[1:]] = owner[order[1:]] != owner[order[:-1]]
    extra = int(np.count_nonzero(~first))
    core_id = np.zeros(n_cores + 1, seeds.dtype)
    core_id[kept[first]] = owner[first]
    core_id[kept[~first]] = np.arange(n + 1, n + 1 + extra)
    # The cores stand in for their seed: the flood that follows reaches every pixel of a
    # seed (all above the seed threshold) before any pixel outside seeds, so each core
    # takes the share of its seed a flood restricted to the seed would give it.
    return np.where(splits[seeds], core_id[cores], seeds), extra


def _seed_parts(
    parts: np.ndarray, heights: _Heights, interior_threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``part[s]``: the part that seed ``s`` lies in (index 0: none), the seeds numbered as
    ``ndi.label`` numbers them on the whole image (by their first pixel in raster order);
    ``area[s]``, each seed's pixels; and ``peak[s]``, its highest value (index 0: 0).

    Seeds are labelled band by band, with no full-size label image; pieces of one seed in
    neighbouring bands are joined where the bands meet.
    """
    part_of_piece = [np.zeros(1, np.int32)]  # piece 0: none
    area_of_piece = [np.zeros(1, np.int64)]
    peak_of_piece = [np.zeros(1, np.float32)]
    joins = []  # (piece above, piece below) touching across a band edge
    n_pieces, above = 0, None
    for rows in _bands(parts):
        band = parts[rows]
        found = band != 0
        seeds = np.zeros(band.shape, bool)
        values = heights.values[heights.offset(rows.start) : heights.offset(rows.start + len(band))]
        above_threshold = values > interior_threshold
        seeds[found] = above_threshold
        pieces, n = ndi.label(seeds, structure=_CROSS)
        pieces[seeds] += n_pieces  # numbered after the bands above
        piece = pieces[seeds] - n_pieces - 1  # raster order, as the values above threshold
        part = np.zeros(n, np.int32)
        part[piece] = band[seeds]
        part_of_piece.append(part)
        area_of_piece.append(np.bincount(piece, minlength=n))
        peak = np.zeros(n, np.float32)
        np.maximum.at(peak, piece, values[above_threshold])
        peak_of_piece.append(peak)
        if above is not None:
            touching = (above > 0) & (pieces[0] > 0)
            joins.append(np.stack([above[touching], pieces[0][touching]]))
        above, n_pieces = pieces[-1], n_pieces + n
    part_of_piece = np.concatenate(part_of_piece)
    area_of_piece = np.concatenate(area_of_piece)
    peak_of_piece = np.concatenate(peak_of_piece)
    joined = np.concatenate(joins, axis=1) if joins else np.zeros((2, 0), np.int32)
    if not joined.size:  # every piece is a whole seed, in raster order
        return part_of_piece, area_of_piece, peak_of_piece
    graph = coo_matrix(
        (np.ones(joined.shape[1], np.int8), (joined[0], joined[1])),
        shape=(n_pieces + 1, n_pieces + 1),
    )
    _, seed_of_piece = csgraph.connected_components(graph, directed=False)
    # number the seeds by their first piece, which holds their first pixel
    _, first_piece = np.unique(seed_of_piece[1:], return_index=True)
    first_piece.sort()
    number = np.zeros(seed_of_piece.max() + 1, np.int32)
    number[seed_of_piece[first_piece + 1]] = np.arange(1, len(first_piece) + 1)
    part_of_seed = np.zeros(len(first_piece) + 1, np.int32)
    part_of_seed[number[seed_of_piece[1:]]] = part_of_piece[1:]
    area = np.bincount(number[seed_of_piece[1:]], area_of_piece[1:], len(part_of_seed))
    peak = np.zeros(len(part_of_seed), np.float32)
    np.maximum.at(peak, number[seed_of_piece[1:]], peak_of_piece[1:])
    return part_of_seed, area.astype(np.int64), peak


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
    seeds_in_part, lut = _lone_seeds(part_of_seed, n_parts)
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


def outline_growth(configured: float | None, card: Mapping[str, Any]) -> float:
    """How far (pixels at the network's working scale) cells' outlines are grown:
    ``postprocess.outline_growth_px`` when set (``configured``), else the model card's
    :data:`CARD_GROWTH_KEY`, else 0 (outlines as labelled, as for the bundled model).

    >>> outline_growth(None, {})
    0.0
    >>> outline_growth(None, {"outline_growth_px": 1.25})
    1.25
    >>> outline_growth(0.0, {"outline_growth_px": 1.25})  # the config wins
    0.0
    """
    if configured is not None:
        return float(configured)
    recorded = card.get(CARD_GROWTH_KEY)
    if isinstance(recorded, bool) or not isinstance(recorded, int | float):
        return 0.0
    return float(recorded) if 0 <= recorded <= MAX_OUTLINE_GROWTH_PX else 0.0


def peak_threshold(configured: float | None, card: Mapping[str, Any]) -> float:
    """The interior probability a cell must reach somewhere to be kept:
    ``postprocess.peak_threshold`` when set (``configured``), else the model card's
    :data:`CARD_PEAK_KEY`, else 0 (every cell kept, as for the bundled model).

    >>> peak_threshold(None, {"peak_threshold": 0.95}), peak_threshold(0.0, {"peak_threshold": 0.95})
    (0.95, 0.0)
    """
    if configured is not None:
        return float(configured)
    recorded = card.get(CARD_PEAK_KEY)
    if isinstance(recorded, bool) or not isinstance(recorded, int | float):
        return 0.0
    return float(recorded) if 0 <= recorded < 1 else 0.0


def grow_outlines(labels: np.ndarray, distance: float) -> np.ndarray:
    """Each cell grown outwards by up to ``distance`` pixels into the background, never
    into another cell (scikit-image ``expand_labels``: a background pixel within
    ``distance`` of cells takes the label of the nearest). No cell is added or removed, so
    the count is unchanged; only outlines move.

    Done in place, band by band (``expand_labels`` on the whole image would take two
    int64 index planes of its size), each band with a margin of the original labels
    around it, so the result is ``expand_labels(labels, distance)``.

    Examples
    --------
    >>> labels = np.zeros((1, 7), np.int32)
    >>> labels[0, 1], labels[0, 5] = 1, 2
    >>> grow_outlines(labels, 1.0).tolist()
    [[1, 1, 1, 0, 2, 2, 2]]
    """
    if distance <= 0 or labels.ndim != 2 or not labels.size:
        return labels
    margin = int(np.ceil(distance))
    above: np.ndarray | None = None  # the original rows just above the band being grown
    for rows in _bands(labels):
        top, bottom = rows.start, min(rows.stop, len(labels))
        below = labels[bottom : bottom + margin]
        parts = [part for part in (above, labels[top:bottom], below) if part is not None]
        window = np.concatenate(parts) if len(parts) > 1 else parts[0]
        first, end = (0 if above is None else len(above)), len(window) - len(below)
        above = window[max(0, end - margin) : end].copy()  # originals, for the next band
        labels[top:bottom] = expand_labels(window, distance)[first:end]
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
