"""Choosing the zoom that brings an image's cells to the size the model was trained at.

In order of precedence: an explicit ``scale`` or ``diameter_px`` in the config; the
nucleus diameter in µm (``nucleus_diameter_um``) over the image's pixel size, when both are
known; the image's pixel size against the model's (when both are known); an estimate of the typical cell
diameter from first passes of the network over the image; or, when the model records no
diameter, the image's own scale. Estimates are clamped to ``[min_scale, max_scale]``.

The estimate's first passes run over a pyramid: the image at 1, ½, ¼, ⅛ and 1/16 of its
size (:data:`PYRAMID`). A network shown nuclei much larger than it was trained on breaks
them into pieces of about its own size, so the size found at one zoom alone can be the
pieces' size: a pass at half the zoom then finds pieces of twice the size (in the image's
pixels), where whole nuclei keep theirs. :func:`choose_reading` keeps the first level
(from the image's own scale down) whose size the next level confirms; the estimate is
then refined at the zoom that size asks for.
"""

from __future__ import annotations

__all__ = [
    "AGREEMENT",
    "PYRAMID",
    "Reading",
    "ScaleChoice",
    "choose_reading",
    "choose_scale",
    "diameter_range",
    "is_close",
    "large_nuclei_growth",
    "single_cells",
    "typical_diameter",
    "working_diameter",
]

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np
from skimage.measure import regionprops_table
from skimage.segmentation import clear_border

from cellwatch.config import ScaleConfig

#: Zooms of the estimate's first passes, from the image's own scale down: each level costs
#: at most what the first does, and the smallest bring nuclei of about 250 px to the size
#: a model trained at 20 px knows.
PYRAMID: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125, 0.0625)

#: Two neighbouring levels agree when their sizes (in the image's pixels) differ by less
#: than this factor. Whole nuclei seen at two levels differed by at most 1.3× on zoomed
#: ``val`` images; pieces of nuclei, whose size follows the zoom, by 1.9× or more.
AGREEMENT = 1.5

#: What :func:`typical_diameter` reports of the single cells' diameters: a low quantile,
#: because the network, zoomed so that the typical nucleus has the model's working size,
#: merges touching nuclei that are larger (benchmarks/scale_estimate.py chose it on
#: ``train``).
QUANTILE = 0.5
#: The largest working diameter :func:`working_diameter` grows to, as a multiple of the
#: model's: a network shown nuclei much larger than it was trained on breaks them into
#: pieces (see :func:`choose_reading`).
LARGEST_WORKING = 2.0

#: The model card's entry with the nuclei sizes of the corrections a model was fine-tuned
#: on (``cellwatch finetune`` writes it): ``low``, ``median`` and ``high`` of the
#: corrections' median diameters, in their pixels.
CARD_RANGE_KEY = "corrections_diameter_px"

#: Objects under this share of the area-weighted median diameter are specks ...
SPECK_RATIO = 0.5
#: ... set aside when they are at least this share of the objects (fewer hardly move the
#: median, and setting them aside would only shift the zoom by a hair).
SPECK_SHARE = 0.25
#: Objects of lower solidity are clumps of touching nuclei.
SOLIDITY_MIN = 0.0
#: Objects over this many times the median diameter of the rest are clumps.
CLUMP_RATIO = 100.0


@dataclass(frozen=True)
class Reading:
    """What one first pass of the estimate found: at zoom ``level``, cells of a typical
    ``diameter_px`` (in the image's own pixels)."""

    level: float
    diameter_px: float


def choose_reading(readings: Sequence[Reading], *, agreement: float = AGREEMENT) -> Reading | None:
    """The reading to refine the estimate from.

    The first reading, from the largest zoom down, whose size the reading at the next
    level (half the zoom) confirms within ``agreement``: nuclei seen whole keep their size
    from one level to the next, pieces of nuclei too large for the network double with
    it. When no two neighbouring readings agree, the one at the largest zoom (the old
    single-pass estimate); None when there are no readings.

    Parameters
    ----------
    readings : sequence of Reading
        At most one per level, levels of a pyramid of halvings (any order). A level
        where too few cells were found has no reading, which breaks the chain there.
    agreement : float
        Largest ratio (> 1) of two sizes that still agree.

    Examples
    --------
    >>> pieces = Reading(1.0, 21.0)  # 90 px nuclei broken into pieces of the model's size
    >>> choose_reading([pieces, Reading(0.5, 43.0), Reading(0.25, 96.0), Reading(0.125, 103.0)])
    Reading(level=0.25, diameter_px=96.0)
    >>> choose_reading([Reading(1.0, 6.0)])  # small nuclei: nothing at smaller zooms
    Reading(level=1.0, diameter_px=6.0)
    """
    if not agreement > 1:
        raise ValueError(f"agreement must be above 1, got {agreement}")
    ordered = sorted(readings, key=lambda r: r.level, reverse=True)
    for high, low in pairwise(ordered):
        neighbours = math.isclose(high.level, 2 * low.level, rel_tol=1e-6)
        if neighbours and abs(math.log(high.diameter_px / low.diameter_px)) < math.log(agreement):
            return high
    return ordered[0] if ordered else None


@dataclass(frozen=True)
class ScaleChoice:
    """The zoom applied to an image before the network, and why."""

    scale: float
    diameter_px: float | None  # typical cell diameter in the original image, if known
    source: str  # "config", "pixel_size", "estimated" or "none"


def choose_scale(
    settings: ScaleConfig,
    *,
    model_diameter_px: float | None,
    model_pixel_size_um: float | None,
    image_pixel_size_um: float | None,
    estimate_diameter: Callable[[], float | None],
    growth: float = 0.0,
    diameter_range: tuple[float, float] | None = None,
) -> ScaleChoice:
    """Decide the zoom for one image (``estimate_diameter`` is only called when needed).

    A known pixel size (``settings.pixel_size_um``, else ``image_pixel_size_um``) sets the
    zoom when the nuclei's size in µm is known too: from ``settings.nucleus_diameter_um``,
    or from the model's own pixel size. Otherwise the size is estimated from the image.
    Wherever the zoom comes from a nucleus diameter (``diameter_px``,
    ``nucleus_diameter_um`` or the estimate), nuclei larger than the model's diameter are
    brought to :func:`working_diameter` with ``growth`` (see :func:`large_nuclei_growth`).
    An estimated diameter outside ``diameter_range`` (see :func:`diameter_range`) is
    brought to the range's nearest end; sizes the settings give are taken as they are.
    """
    if settings.scale is not None:
        return ScaleChoice(settings.scale, _diameter(model_diameter_px, settings.scale), "config")
    if settings.mode == "none" or model_diameter_px is None:
        return ScaleChoice(1.0, None, "none")
    if settings.diameter_px is not None:
        return _towards(settings, model_diameter_px, growth, settings.diameter_px, "config")
    pixel_size = settings.pixel_size_um or image_pixel_size_um
    if pixel_size and settings.nucleus_diameter_um is not None:
        diameter = settings.nucleus_diameter_um / pixel_size
        return _towards(settings, model_diameter_px, growth, diameter, "pixel_size")
    if pixel_size and model_pixel_size_um:
        scale = pixel_size / model_pixel_size_um
        return _clamped(settings, scale, model_diameter_px / scale, "pixel_size")
    diameter = estimate_diameter()
    if diameter is None:  # nothing found: an empty image; keep its own scale
        return ScaleChoice(1.0, None, "estimated")
    if diameter_range is not None:
        diameter = min(max(diameter, diameter_range[0]), diameter_range[1])
    return _towards(settings, model_diameter_px, growth, diameter, "estimated")


def working_diameter(diameter: float, target: float, growth: float) -> float:
    """The size (px) that nuclei of ``diameter`` px are zoomed to for a model that works
    at ``target`` px.

    Nuclei up to ``target`` are brought to ``target``. Larger ones are brought to
    ``target · (diameter / target) ** growth``, at most :data:`LARGEST_WORKING` times
    ``target``: with ``growth`` 0 every nucleus reaches the network at ``target``; with 1,
    nuclei up to twice ``target`` are not zoomed down at all. Zooming a field of touching
    large nuclei all the way down to ``target`` shrinks their smaller neighbours to
    specks and merges touching pairs; a network trained with size jitter still parts
    nuclei somewhat larger than ``target``.

    Examples
    --------
    >>> working_diameter(10.0, 20.0, 0.5)  # small nuclei: zoomed up to the target
    20.0
    >>> working_diameter(45.0, 20.0, 0.5)  # 45 px nuclei reach the network at 30 px
    30.0
    >>> working_diameter(45.0, 20.0, 0.0)  # growth 0: every nucleus at the target
    20.0
    >>> working_diameter(200.0, 20.0, 1.0)  # never more than twice the target
    40.0
    """
    if not 0 <= growth <= 1:
        raise ValueError(f"growth must be between 0 and 1, got {growth}")
    if diameter <= target:
        return target
    return min(target * (diameter / target) ** growth, LARGEST_WORKING * target)


def large_nuclei_growth(settings: ScaleConfig, card: Mapping[str, Any]) -> float:
    """The ``growth`` of :func:`working_diameter`: ``scale.large_nuclei_growth`` when set,
    else the model card's ``large_nuclei_growth``, else 0 (every nucleus at the model's
    working diameter)."""
    if settings.large_nuclei_growth is not None:
        return settings.large_nuclei_growth
    recorded = card.get("large_nuclei_growth")
    return float(recorded) if isinstance(recorded, int | float) and 0 <= recorded <= 1 else 0.0


def diameter_range(settings: ScaleConfig, card: Mapping[str, Any]) -> tuple[float, float] | None:
    """The sizes (px) an estimated nucleus diameter is kept within: ``scale.diameter_range_px``
    when set (``false``: none); else the model card's corrections' range (:data:`CARD_RANGE_KEY`,
    from the lowest to the highest of their median diameters, as recorded: widening it by
    1.25× or 1.5× did worse on the H&E training images not among the corrections,
    ``benchmarks/scale_rules.py``); else None, as for the bundled model.

    A lab's microscope shows its nuclei at a stable size, and the corrections a model was
    fine-tuned on are a sample of them: an estimate far outside their sizes is the estimate
    gone wrong (small nuclei merged into blobs at the pyramid's small zooms, large ones
    broken into pieces), not nuclei of another size.

    Examples
    --------
    >>> from cellwatch.config import ScaleConfig
    >>> diameter_range(ScaleConfig(), {})  # no corrections: no range
    >>> diameter_range(ScaleConfig(), {"corrections_diameter_px": {"low": 17.0, "high": 41.5}})
    (17.0, 41.5)
    >>> diameter_range(ScaleConfig(diameter_range_px=(12.0, 30.0)), {})
    (12.0, 30.0)
    """
    if settings.diameter_range_px is False:
        return None
    if settings.diameter_range_px is not None:
        low, high = settings.diameter_range_px
        return float(low), float(high)
    recorded = card.get(CARD_RANGE_KEY)
    if not isinstance(recorded, Mapping):
        return None
    low, high = recorded.get("low"), recorded.get("high")
    if not (isinstance(low, int | float) and isinstance(high, int | float) and 0 < low <= high):
        return None
    return float(low), float(high)


def typical_diameter(
    labels: np.ndarray, *, min_diameter: float = 0.0, min_cells: int = 3
) -> float | None:
    """Typical diameter of single cells in ``labels``: a low quantile (:data:`QUANTILE`)
    of the equivalent diameters of the cells left once specks and clumps are set aside,
    ignoring cells cut by the border when enough whole ones remain; None when fewer than
    ``min_cells`` are found.

    Objects under ``min_diameter`` are left out: a network shown cells much larger than it
    was trained on breaks their texture into small fragments, which would otherwise pull
    the typical size down and zoom the image the wrong way. Two more kinds of object are
    not single cells (:func:`single_cells`): specks, small bright dots and fragments of
    texture on a field of few, dim nuclei; and clumps, touching nuclei the network did not
    part, which a zoom chosen from them would merge further.
    """
    inner = clear_border(labels)
    use = inner if np.count_nonzero(np.bincount(inner.reshape(-1))[1:]) >= min_cells else labels
    areas = np.bincount(use.reshape(-1))[1:]
    areas = areas[areas > 0]  # in label order, as regionprops_table gives them
    diameters = np.sqrt(4 * areas / math.pi)  # skimage's equivalent_diameter_area
    # Solidity needs a convex hull per object, the costliest part of the estimate; with
    # the clump rule off (SOLIDITY_MIN 0) no solidity can change the result.
    solidity = (
        np.asarray(regionprops_table(use, properties=("solidity",))["solidity"], dtype=float)
        if SOLIDITY_MIN > 0
        else np.ones(len(diameters))
    )
    keep = diameters >= min_diameter
    diameters = single_cells(diameters[keep], solidity[keep])
    if len(diameters) < min_cells:
        return None
    return float(np.quantile(diameters, QUANTILE))


def single_cells(diameters: np.ndarray, solidity: np.ndarray) -> np.ndarray:
    """The diameters of the objects that look like single cells.

    Specks: objects under :data:`SPECK_RATIO` of the area-weighted median diameter (the
    diameter of the object that holds the median pixel of all objects), so a few large
    nuclei outweigh many specks; set aside when they are at least :data:`SPECK_SHARE` of
    the objects. Clumps: objects whose solidity is under
    :data:`SOLIDITY_MIN` (two touching round nuclei make a waisted shape), or whose
    diameter is over :data:`CLUMP_RATIO` times the median of the rest. Each step is skipped
    where it would leave fewer than half of the objects, so a field of one kind of object
    keeps its size.

    Examples
    --------
    >>> single_cells(np.array([3.0, 4, 4, 5, 20, 21, 22]), np.ones(7))  # specks and nuclei
    array([20., 21., 22.])
    >>> single_cells(np.array([4.0, 5, 5, 6]), np.ones(4))  # small nuclei keep their size
    array([4., 5., 5., 6.])
    """
    if len(diameters) == 0:
        return diameters
    order = np.argsort(diameters)
    area = np.cumsum(diameters[order] ** 2)
    weighted_median = diameters[order][np.searchsorted(area, area[-1] / 2)]
    specks = diameters < SPECK_RATIO * weighted_median
    many = np.count_nonzero(specks) >= SPECK_SHARE * len(diameters)
    if many and np.count_nonzero(~specks) >= 3:  # a few nuclei among many specks: those
        diameters, solidity = diameters[~specks], solidity[~specks]
    waisted = solidity < SOLIDITY_MIN
    if np.count_nonzero(~waisted) >= len(diameters) / 2:
        diameters, solidity = diameters[~waisted], solidity[~waisted]
    large = diameters > CLUMP_RATIO * np.median(diameters)
    if np.count_nonzero(~large) >= len(diameters) / 2:
        diameters = diameters[~large]
    return diameters


def _towards(
    settings: ScaleConfig, target: float, growth: float, diameter: float, source: str
) -> ScaleChoice:
    """The zoom that brings nuclei of ``diameter`` px to their working diameter."""
    return _clamped(
        settings, working_diameter(diameter, target, growth) / diameter, diameter, source
    )


def _clamped(
    settings: ScaleConfig, scale: float, diameter: float | None, source: str
) -> ScaleChoice:
    return ScaleChoice(min(max(scale, settings.min_scale), settings.max_scale), diameter, source)


def _diameter(model_diameter: float | None, scale: float) -> float | None:
    return model_diameter / scale if model_diameter is not None else None


def is_close(a: float, b: float, tolerance: float = 0.15) -> bool:
    """Whether two scales differ by less than ``tolerance`` (relative, symmetric)."""
    return abs(math.log(a / b)) < math.log1p(tolerance)
