"""What the corrections say about their nuclei, for a fine-tuned model's card: their
sizes (:func:`corrections_diameters`, the range the size estimate keeps within) and how
far the new model's outlines fall inside theirs (:func:`measure_growth`).

A model fine-tuned on a few H&E images finds the nuclei but draws their outlines inside
the edges the corrections were drawn on: on the H&E proxy the matched nuclei's area is a
median 0.82–0.94 of the masks' on images never trained on (0.88–0.96 on the training
corrections), and a pixel or two of growth turns many matches just under IoU 0.5 into matches
(docs/teach.md, "Eighth round"). The bundled model's outlines on fluorescence need none.

``cellwatch finetune`` therefore counts the training corrections with the new model,
grows the outlines by each of :data:`CANDIDATES` (pixels at the network's working scale,
so the growth follows the zoom), takes the smallest growth with the best score, adds
:data:`UNSEEN_MARGIN_PX` when it is above 0 (the model fits the images it trained on
better than others: on images it never saw, the best growth was that much larger for
every model of the proxy study) and writes it into the card
(:data:`~cellwatch.postprocess.CARD_GROWTH_KEY`), where the counting finds it. Growing
never adds, removes or merges cells, so the counts are the same at every growth. The
held-out corrections are not used to choose, so the before/after table on them stays a
fair test of the growth as well.
"""

from __future__ import annotations

__all__ = [
    "CANDIDATES",
    "UNSEEN_MARGIN_PX",
    "Counted",
    "choose_growth",
    "corrections_diameters",
    "count_pairs",
    "for_unseen",
    "measure_growth",
    "score",
    "settle_growth",
]

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cellwatch.config import MAX_OUTLINE_GROWTH_PX, Config, PostprocessConfig
from cellwatch.model import write_card
from cellwatch.postprocess import CARD_GROWTH_KEY, grow_outlines
from cellwatch.storage import imageio
from cellwatch.training import matching
from cellwatch.training.targets import as_instances, median_diameter

if TYPE_CHECKING:
    from cellwatch.pipeline import Segmenter

#: Growths tried (pixels at the network's working scale, where nuclei are ~20 px across).
CANDIDATES: tuple[float, ...] = tuple(k / 4 for k in range(13))
#: Added to the growth that fits the training corrections best (when that is above 0):
#: on the H&E proxy the best growth for images never trained on was 0.5 px larger on all 7
#: models that grew (benchmarks/outline_growth.py, docs/teach-he-round8-growth.json).
UNSEEN_MARGIN_PX = 0.5
#: The IoU thresholds a growth is judged at: accuracy averaged over them, so that a growth
#: is judged by how well the outlines fit, not only by which side of 0.5 they fall.
THRESHOLDS: tuple[float, ...] = (0.5, 0.55, 0.6, 0.65, 0.7)


@dataclass(frozen=True)
class Counted:
    """One correction counted by the model: its true instances, the model's labels (not
    grown) and the zoom they were found at."""

    truth: np.ndarray
    labels: np.ndarray
    scale: float


def score(
    counted: Sequence[Counted], growth: float, thresholds: Sequence[float] = THRESHOLDS
) -> float:
    """Accuracy TP / (TP + FP + FN), pooled over the images, averaged over ``thresholds``
    of IoU, with every image's outlines grown by ``growth`` network pixels.

    >>> truth = np.zeros((1, 9), np.int32); truth[0, 2:7] = 1
    >>> found = np.zeros((1, 9), np.int32); found[0, 4] = 1  # one pixel of five
    >>> score([Counted(truth, found, 1.0)], 0.0), score([Counted(truth, found, 1.0)], 2.0)
    (0.0, 1.0)
    """
    per_image = []
    for c in counted:
        distance = growth / c.scale
        labels = grow_outlines(c.labels.copy(), distance) if distance > 0 else c.labels
        per_image.append(matching.match(c.truth, labels, thresholds=thresholds))
    totals = matching.summarize(per_image)
    return float(np.mean([t.accuracy for t in totals]))


def choose_growth(
    counted: Sequence[Counted], candidates: Sequence[float] = CANDIDATES
) -> tuple[float, dict[str, float]]:
    """The growth with the best :func:`score` (the smallest of equals), and every
    candidate's score. No corrections with cells: no growth.

    >>> truth = np.zeros((1, 9), np.int32); truth[0, 2:7] = 1
    >>> found = np.zeros((1, 9), np.int32); found[0, 3:6] = 1  # IoU 0.6: a match to 0.6
    >>> choose_growth([Counted(truth, found, 1.0)], (0.0, 1.0, 2.0))
    (1.0, {'0': 0.6, '1': 1.0, '2': 1.0})
    """
    if not any(c.truth.any() for c in counted):
        return 0.0, {}
    scores = {g: score(counted, g) for g in candidates}
    best = max(scores.values())
    chosen = min(g for g, s in scores.items() if s == best)
    return chosen, {f"{g:g}": round(s, 4) for g, s in scores.items()}


def for_unseen(fits: float) -> float:
    """The growth for images the model never saw, from the one that fits its training
    corrections best: :data:`UNSEEN_MARGIN_PX` more, unless that is none.

    >>> for_unseen(1.0), for_unseen(0.0), for_unseen(5.0)
    (1.5, 0.0, 5.0)
    """
    return min(fits + UNSEEN_MARGIN_PX, MAX_OUTLINE_GROWTH_PX) if fits > 0 else 0.0


def count_pairs(
    segmenter: Segmenter, config: Config, pairs: Sequence[tuple[Path, Path]]
) -> list[Counted]:
    """Each image of ``pairs`` counted by ``segmenter`` (whose config grows no outlines),
    with its mask."""
    from cellwatch.pipeline import read

    counted = []
    for image, mask in pairs:
        data = read(image, config)
        found = segmenter.segment(data.pixels, data.pixel_size_um)
        truth = as_instances(imageio.read_image(mask).pixels)
        counted.append(Counted(truth, found.labels, found.scale.scale))
    return counted


def measure_growth(
    model_path: Path, pairs: Sequence[tuple[Path, Path]], channel: str | None
) -> dict[str, Any]:
    """Count ``pairs`` with the model at ``model_path`` (outlines not grown) and choose
    the growth on them: ``{"chosen": g, "fits_training": ..., "scores": {...}, "on": [...],
    "judged_by": ...}`` for the card; ``chosen`` is the best fit plus
    :data:`UNSEEN_MARGIN_PX` (none when the best fit is no growth)."""
    from cellwatch.model import load_model
    from cellwatch.pipeline import Segmenter
    from cellwatch.training.judge import counting_config

    model = load_model(model_path)
    no_growth = PostprocessConfig(outline_growth_px=0.0)
    config = counting_config(model, pairs[0][0], channel, postprocess=no_growth)
    counted = count_pairs(Segmenter(config, model), config, pairs)
    fits, scores = choose_growth(counted)
    return {
        "chosen": for_unseen(fits),
        "fits_training": fits,
        "scores": scores,
        "on": [image.name for image, _ in pairs],
        "judged_by": "accuracy pooled over the training corrections, mean over IoU "
        + ", ".join(f"{t:g}" for t in THRESHOLDS),
    }


def settle_growth(
    model_path: Path, card: dict[str, Any], pairs: Sequence[tuple[Path, Path]], channel: str | None
) -> dict[str, Any]:
    """Measure the growth for the model at ``model_path`` on ``pairs`` (its training
    corrections) as it will count: with ``card`` itself (its scale, input and peak
    threshold; no growth), written beside the model first, since counting reads the card
    from there. Sets ``card``'s growth to the one chosen and returns the measurement
    (:func:`measure_growth`); the caller writes the finished card."""
    card.pop(CARD_GROWTH_KEY, None)
    write_card(model_path, card)
    measured = measure_growth(model_path, pairs, channel)
    card[CARD_GROWTH_KEY] = measured["chosen"]
    return measured


def corrections_diameters(pairs: Sequence[tuple[Path, Path]]) -> dict[str, Any] | None:
    """The nuclei sizes of the corrections, for the model card (:data:`CARD_RANGE_KEY`):
    the lowest, median and highest of their masks' median diameters (px, the corrections'
    own pixels) and how many masks held nuclei; None when none did. The automatic size
    estimate keeps its estimates within this range (:func:`cellwatch.scale.diameter_range`).
    """
    sizes = []
    for _, mask in pairs:
        diameter = median_diameter(as_instances(imageio.read_image(mask).pixels))
        if diameter is not None:  # background only: a valid correction with no size
            sizes.append(diameter)
    if not sizes:
        return None
    return {
        "low": round(min(sizes), 2),
        "median": round(float(np.median(sizes)), 2),
        "high": round(max(sizes), 2),
        "images": len(sizes),
        "use": "the automatic size estimate keeps the nuclei diameters it finds within "
        "low..high (scale.diameter_range_px in the config overrides it; false: not used)",
    }
