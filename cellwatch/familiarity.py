"""How familiar an image looks to the model: a 0–1 score that says when a count may be
wrong although it looks right.

A model answers every image, also one it was never made for (a brightfield image given to
a fluorescence model, a badly out-of-focus one). These signals, measured on the image and
on what the model found in it, tell such images apart:

- ``brightness``: the median of the normalized image (0 at its 1st, 1 at its 99.8th
  percentile). Fluorescence is a dark background with bright nuclei, so the median sits
  near 0; dark nuclei on a light background (brightfield, an inverted image) put it near 1.
- ``edge_blur_px``: how blurred the edges of the found cells are at the network's scale,
  as the sigma (pixels) of a Gaussian blur. It comes from the ratio of the steepest slopes
  at the cells' outer rim after smoothing by 1 and by 3 pixels, which does not depend on
  the contrast: an edge blurred by sigma keeps sqrt((sigma² + 1) / (sigma² + 9)) of its
  slope (a sharp one a third).
- ``confidence``: the share of the found cells' pixels that the network calls interior
  with a probability of at least :data:`CORE_PROBABILITY` (:func:`core_share`).
- ``at_bound``: the automatic size estimate stopped at ``scale.min_scale`` or
  ``scale.max_scale``: what the model sees are not nuclei of any size it knows.
- ``pattern``: the image is a pattern, not cells (:func:`is_pattern`): it repeats itself
  (stripes, a checkerboard, a grid: ``periodicity``, the highest autocorrelation beyond
  the central peak, at least :data:`PERIODICITY_MAX`), or what the network found are
  arcs and bands, not round nuclei (interference rings: ``solidity``, the median solidity
  of the found cells, under :data:`SOLIDITY_MIN`), or the network is sure of almost
  none of them (``confidence`` under :data:`CONFIDENCE_MIN`).

Each measured signal is compared with where it lay over the images the model was trained
on, which the model card records (:func:`reference_from_card`): its score is twice the
share of training images that lay at least as far out on the unfamiliar side, so a
typical image scores 1 and one beyond every training image 0. The familiarity is the
lowest of these scores, and 0 at a scale bound or on a pattern. A model whose card records no references
gives no familiarity (None). The report flags rows below ``report.familiarity_min`` as
``unfamiliar``. ``benchmarks/familiarity.py`` chose the signals and the threshold and
writes the references (docs/familiarity.json).
"""

from __future__ import annotations

__all__ = [
    "CARD_KEY",
    "CARD_SIGNALS",
    "CORE_PROBABILITY",
    "SIGNALS",
    "TAILS",
    "Familiarity",
    "Reference",
    "card_references",
    "core_share",
    "is_pattern",
    "measure",
    "periodicity",
    "reference_from_card",
    "score",
]

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import fft
from scipy import ndimage as ndi
from scipy.fft import next_fast_len
from skimage.measure import regionprops_table

from cellwatch.preprocess import Normalization, rescale, resize_to

CORE_PROBABILITY = 0.97  # interior probability of a pixel the network is sure of
WINDOW = 512  # side, in network pixels, of the central window the image signals are measured on
MAX_WINDOW = 2048  # ... and at most this many original pixels
SMOOTHING = (1.0, 3.0)  # the two smoothings (network pixels) whose slopes give the blur
MAX_BLUR = 100.0  # blur reported when smoothing no longer lowers the slopes

#: An image whose autocorrelation beyond its central peak reaches this repeats itself: a
#: pattern. Over 197 ``train`` and ``val`` images (every third of ``train``, all of
#: ``val``) it was at most 0.71 (median 0.21); stripes and checkerboards reach 0.99.
PERIODICITY_MAX = 0.9
#: Found cells whose median solidity is under this are arcs and bands, not nuclei: over
#: the same 197 images it was at least 0.92; interference rings gave 0.66–0.76.
SOLIDITY_MIN = 0.85
#: At most this many cells' solidity is measured for the median.
SOLIDITY_CELLS = 64
#: Found cells of which the network is this unsure (``confidence``) are not nuclei: over
#: the same 197 images the confidence was at least 0.46; rings and stripes gave 0.002–0.39.
CONFIDENCE_MIN = 0.2

#: Each signal's unfamiliar side: +1 when high values are unusual, -1 when low ones are.
SIGNALS: dict[str, int] = {"brightness": 1, "edge_blur_px": 1, "confidence": -1}

#: Tail shares the reference quantiles are stored at, the most unusual first.
TAILS: tuple[float, ...] = (0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5)

#: The two tail shares whose quantiles set how fast the tail falls beyond the training
#: images (chosen by benchmarks/familiarity.py with all 391 ``train`` images; with 40, the
#: quantiles nearer the extreme were too uncertain and (0.05, 0.25) was kept).
TAIL_FIT: tuple[float, float] = (0.005, 0.02)

CARD_KEY = "familiarity_reference"  # where a model card keeps its references

#: The signals a model card keeps references of: brightness and edge blur flagged every
#: held-out inverted and blurred image, and the confidence added nothing to them
#: (benchmarks/familiarity.py, docs/familiarity.md).
CARD_SIGNALS: tuple[str, ...] = ("brightness", "edge_blur_px")


@dataclass(frozen=True)
class Reference:
    """Where a signal lay over the training images: ``values[i]`` is the value beyond
    which (on the signal's unfamiliar side) a share ``TAILS[i]`` of them lay."""

    signal: str
    values: tuple[float, ...]

    @classmethod
    def of(cls, signal: str, samples: np.ndarray) -> Reference:
        """The reference of ``signal`` from its values on a set of familiar images.

        Raises
        ------
        ValueError
            When ``signal`` is unknown or ``samples`` holds no finite value.
        """
        if signal not in SIGNALS:
            raise ValueError(f"unknown signal {signal!r}; known: {', '.join(SIGNALS)}")
        samples = np.asarray(samples, dtype=float)
        samples = samples[np.isfinite(samples)]
        if samples.size == 0:
            raise ValueError(f"no finite values of {signal} to make a reference from")
        side = SIGNALS[signal]
        quantiles = np.quantile(samples, [0.5 + side * (0.5 - t) for t in TAILS])
        return cls(signal, tuple(round(float(q), 6) for q in quantiles))

    def tail(self, value: float) -> float:
        """The share of training images at least as far out as ``value`` (0.5 at or inside
        the median), interpolated between the stored quantiles. Beyond the most unusual
        one it falls off exponentially (an exponential tail), at the rate of the fall
        between the quantiles at :data:`TAIL_FIT`, so an image a little beyond the
        training images scores a little lower than the most unusual of them, and one far
        beyond scores near 0."""
        side = SIGNALS[self.signal]
        # np.interp needs rising x: flip the axis for signals whose low values are unusual
        xs = np.asarray(self.values, dtype=float) * -side
        x = value * -side
        if x >= xs[0]:
            return float(np.interp(x, xs, TAILS, right=0.5))
        near, far = (TAILS.index(t) for t in TAIL_FIT)
        # the tail share shrinks by TAILS[far] / TAILS[near] over the span of those quantiles
        span = max(xs[far] - xs[near], 1e-9)
        rate = math.log(TAILS[far] / TAILS[near]) / span
        return TAILS[0] * math.exp(-rate * (xs[0] - x))


def reference_from_card(card: Mapping[str, object]) -> dict[str, Reference]:
    """The references a model card records under :data:`CARD_KEY` (empty when it has none).

    Raises
    ------
    ValueError
        When the entry is not a mapping of known signals to ``len(TAILS)`` numbers that
        run from the most extreme value towards the median.
    """
    raw = card.get(CARD_KEY)
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"the model card's {CARD_KEY} must map signal names to numbers")
    references = {}
    for name, values in raw.items():
        if name not in SIGNALS:
            raise ValueError(
                f"the model card's {CARD_KEY} names an unknown signal {name!r}; "
                f"known: {', '.join(SIGNALS)}"
            )
        if (
            not isinstance(values, list | tuple)
            or len(values) != len(TAILS)
            or not all(isinstance(v, int | float) and math.isfinite(v) for v in values)
        ):
            raise ValueError(
                f"the model card's {CARD_KEY}[{name!r}] must hold {len(TAILS)} numbers"
            )
        steps = np.diff(np.asarray(values, dtype=float)) * SIGNALS[name]
        if (steps > 0).any():
            raise ValueError(
                f"the model card's {CARD_KEY}[{name!r}] must run from the most unusual "
                "value towards the median"
            )
        references[name] = Reference(name, tuple(float(v) for v in values))
    return references


@dataclass(frozen=True)
class Familiarity:
    """The signals measured on one image and the familiarity they give (None: the model
    records no references to compare with)."""

    brightness: float | None
    edge_blur_px: float | None
    confidence: float | None
    at_bound: bool
    score: float | None
    periodicity: float | None = None
    solidity: float | None = None
    pattern: bool = False

    def signals(self) -> dict[str, float | None]:
        """The measured signals by name (None where there was nothing to measure)."""
        return {name: getattr(self, name) for name in SIGNALS}


def card_references(
    measured: Iterable[Familiarity], signals: Sequence[str] = CARD_SIGNALS
) -> dict[str, list[float]]:
    """A model card's :data:`CARD_KEY` entry, made from the signals measured on images the
    model knows (its training images): each signal's :meth:`Reference.of` their values.
    A signal measured on none of them (no cells found, say) is left out.

    Examples
    --------
    >>> seen = [Familiarity(b, None, None, False, None) for b in (0.01, 0.02, 0.03, 0.04)]
    >>> card_references(seen)
    {'brightness': [0.03985, 0.0397, 0.0394, 0.0385, 0.037, 0.0325, 0.025]}
    """
    measured = list(measured)
    entry = {}
    for name in signals:
        values = [value for f in measured if (value := f.signals()[name]) is not None]
        values = [v for v in values if math.isfinite(v)]
        if values:
            entry[name] = list(Reference.of(name, np.array(values)).values)
    return entry


def score(
    signals: Mapping[str, float | None],
    *,
    at_bound: bool = False,
    pattern: bool = False,
    reference: Mapping[str, Reference],
) -> float:
    """The familiarity (0–1) of an image with these signals.

    Parameters
    ----------
    signals : mapping
        Values of the signals in :data:`SIGNALS`; missing, None or non-finite ones are
        left out.
    at_bound : bool
        Whether the automatic size estimate stopped at a bound (the familiarity is 0).
    pattern : bool
        Whether the image is a pattern, not cells (:func:`is_pattern`; the familiarity is 0).
    reference : mapping
        Each signal's :class:`Reference`; signals without one are left out.

    Returns
    -------
    float
        The lowest of the signals' scores, each twice its :meth:`Reference.tail`
        (rounded to 6 decimals); 1 when no signal could be compared.

    Examples
    --------
    >>> ref = {"brightness": Reference("brightness", (0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.03))}
    >>> score({"brightness": 0.03}, reference=ref)
    1.0
    >>> score({"brightness": 0.45}, reference=ref)
    0.015
    >>> score({"brightness": 0.6}, reference=ref)
    0.005
    >>> score({"brightness": 0.03}, at_bound=True, reference=ref)
    0.0
    """
    if at_bound or pattern:
        return 0.0
    found = 1.0
    for name, value in signals.items():
        if value is None or name not in reference or not math.isfinite(value):
            continue
        found = min(found, 2.0 * reference[name].tail(value))
    return round(found, 6)


def core_share(plane: np.ndarray) -> float | None:
    """The share of a :func:`~cellwatch.postprocess.masked_interior` plane's cell pixels
    (the non-NaN ones) whose interior probability is at least :data:`CORE_PROBABILITY`;
    None when there are none.

    Examples
    --------
    >>> core_share(np.array([[np.nan, 0.99], [0.5, 0.2]], np.float32))
    0.3333333333333333
    """
    cells = int(np.count_nonzero(~np.isnan(plane)))
    if cells == 0:
        return None
    return int(np.count_nonzero(plane >= CORE_PROBABILITY)) / cells


def measure(
    pixels: np.ndarray,
    labels: np.ndarray,
    normalization: Normalization,
    *,
    scale: float,
    confidence: float | None,
    at_bound: bool,
    reference: Mapping[str, Reference],
) -> Familiarity:
    """Measure the signals of one segmented image and score them.

    Parameters
    ----------
    pixels : numpy.ndarray
        The raw 2-D image. ``brightness`` and ``edge_blur_px`` are measured on its central
        part, at most ``WINDOW`` network pixels (and ``MAX_WINDOW`` original pixels) across.
    labels : numpy.ndarray
        Its cells (same shape).
    normalization : Normalization
        How the pipeline normalized ``pixels``.
    scale : float
        The zoom the network saw the image at.
    confidence : float or None
        :func:`core_share` of the network's output, when the model gives one.
    at_bound : bool
        Whether the automatic size estimate stopped at a bound.
    reference : mapping
        As for :func:`score`; when empty, the familiarity is None.

    Returns
    -------
    Familiarity
        The signals and the score.
    """
    side = min(max(64, round(WINDOW / scale)), MAX_WINDOW)
    image = normalization.apply(_central(pixels, side))
    brightness = float(np.median(image)) if image.size else None
    cells = _central(labels, side)
    if scale != 1.0:  # the edges as the network saw them
        image = rescale(image, scale)
        cells = resize_to(cells, image.shape, order=0)
    signals = {
        "brightness": brightness,
        "edge_blur_px": _edge_blur(image, cells),
        "confidence": confidence,
    }
    repeats, solid = periodicity(image), _median_solidity(cells)
    pattern = is_pattern(repeats, solid, confidence)
    value = (
        score(signals, at_bound=at_bound, pattern=pattern, reference=reference)
        if reference
        else None
    )
    return Familiarity(
        brightness=_rounded(brightness),
        edge_blur_px=_rounded(signals["edge_blur_px"]),
        confidence=_rounded(confidence),
        at_bound=at_bound,
        score=value,
        periodicity=_rounded(repeats),
        solidity=_rounded(solid),
        pattern=pattern,
    )


def is_pattern(
    periodicity: float | None, solidity: float | None, confidence: float | None = None
) -> bool:
    """Whether an image with this :func:`periodicity`, median solidity of its found cells
    and network :func:`core_share` is a pattern (stripes, a checkerboard, interference
    rings), not cells. None: not measured (no cells found), which proves nothing.

    Examples
    --------
    >>> is_pattern(0.21, 0.96, 0.6), is_pattern(0.99, 1.0), is_pattern(0.08, 0.76)
    (False, True, True)
    >>> is_pattern(0.33, None, 0.01)  # rings the network found nothing sure in
    True
    """
    repeats = periodicity is not None and periodicity >= PERIODICITY_MAX
    bands = solidity is not None and solidity < SOLIDITY_MIN
    unsure = confidence is not None and confidence < CONFIDENCE_MIN
    return repeats or bands or unsure


def periodicity(image: np.ndarray) -> float | None:
    """The highest autocorrelation of ``image`` at a shift of at most half its size, beyond
    the central peak (the region around no shift where it stays positive): near 1 when the
    image repeats itself, low for cells at random places. None for an image of one value.

    Examples
    --------
    >>> stripes = np.tile(np.repeat([0.0, 1.0], 8), (64, 4))
    >>> round(periodicity(stripes), 2)
    1.0
    """
    image = np.asarray(image, dtype=np.float64)
    image = image - image.mean()
    h, w = image.shape
    # Shifts d up to half the size are kept. Padded to n > 1.5 times its size, the
    # circular correlation at d is the linear one: it adds the linear one at d - n, which
    # is zero because |d - n| >= size (no pixels overlap). n is a size the FFT is fast at.
    dy, dx = np.arange(-(h // 2), h // 2 + 1), np.arange(-(w // 2), w // 2 + 1)
    padded = (next_fast_len(h + h // 2 + 1, real=True), next_fast_len(w + w // 2 + 1, real=True))
    power = np.abs(fft.rfft2(image, s=padded)) ** 2
    correlation = fft.irfft2(power, s=padded)[np.ix_(dy % padded[0], dx % padded[1])]
    # pixel pairs that overlap at each shift (dy, dx): (h - |dy|)(w - |dx|)
    pairs = np.outer(h - np.abs(dy), w - np.abs(dx)).astype(float)
    correlation = correlation / pairs  # per overlapping pixel pair
    if correlation[h // 2, w // 2] <= 0:
        return None
    correlation /= correlation[h // 2, w // 2]
    lobes, _ = ndi.label(correlation > 0)
    beyond = lobes != lobes[h // 2, w // 2]
    return float(correlation[beyond].max()) if beyond.any() else 0.0


def _median_solidity(labels: np.ndarray) -> float | None:
    """Median solidity (area over convex hull area) of the cells in ``labels``, or of
    :data:`SOLIDITY_CELLS` of them spread over their ids when there are more (a convex
    hull per cell is costly, and the median of that many is as telling)."""
    pixels = np.bincount(labels.reshape(-1))
    pixels[:1] = 0  # background
    ids = np.flatnonzero(pixels)
    if not len(ids):
        return None
    if len(ids) > SOLIDITY_CELLS:
        chosen = ids[np.linspace(0, len(ids) - 1, SOLIDITY_CELLS).round().astype(int)]
        labels = np.where(np.isin(labels, chosen), labels, 0)
    solidity = regionprops_table(labels, properties=("solidity",))["solidity"]
    return float(np.median(solidity))


def _edge_blur(image: np.ndarray, labels: np.ndarray) -> float | None:
    """The blur (Gaussian sigma, pixels of ``image``) of the edges at the cells' outer
    rim, from the median steepest slope there after each smoothing in :data:`SMOOTHING`;
    None without both cells and background."""
    inside = labels > 0
    rim = inside & ndi.binary_dilation(~inside)
    if not rim.any() or inside.all():
        return None
    image = image.astype(np.float32, copy=False)
    slopes = []
    for sigma in SMOOTHING:
        slope = np.hypot(
            ndi.gaussian_filter(image, sigma, order=(1, 0)),
            ndi.gaussian_filter(image, sigma, order=(0, 1)),
        )
        # the rim may sit a pixel off the steepest point
        slopes.append(float(np.median(ndi.maximum_filter(slope, size=3)[rim])))
    fine, coarse = SMOOTHING
    if slopes[0] <= 0:
        return None
    ratio = slopes[1] / slopes[0]
    if ratio >= 1:
        return MAX_BLUR
    # slope ∝ 1 / sqrt(blur² + smoothing²), so ratio² = (blur² + fine²) / (blur² + coarse²)
    blur2 = (coarse**2 * ratio**2 - fine**2) / (1 - ratio**2)
    return min(math.sqrt(max(blur2, 0.0)), MAX_BLUR)


def _central(image: np.ndarray, size: int) -> np.ndarray:
    """The central ``size``×``size`` part of ``image`` (all of it when smaller)."""
    y0 = max(0, (image.shape[0] - size) // 2)
    x0 = max(0, (image.shape[1] - size) // 2)
    return image[y0 : y0 + size, x0 : x0 + size]


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)
