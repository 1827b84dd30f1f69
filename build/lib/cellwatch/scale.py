"""Choosing the zoom that brings an image's cells to the size the model was trained at.

In order of precedence: an explicit ``scale`` or ``diameter_px`` in the config; the image's
pixel size against the model's (when both are known); an estimate of the typical cell
diameter from a first pass of the network over the image; or, when the model records no
diameter, the image's own scale. Estimates are clamped to ``[min_scale, max_scale]``.
"""

from __future__ import annotations

__all__ = ["ScaleChoice", "choose_scale", "is_close", "typical_diameter"]

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from skimage.measure import regionprops_table
from skimage.segmentation import clear_border

from cellwatch.config import ScaleConfig


@dataclass(frozen=True)
class ScaleChoice:
    """The zoom applied to an image before the network, and why."""

    scale: float
    diameter_px: float | None  # typical cell diameter in the original image, if known
    source: str  # "config", "pixel-size", "estimated" or "none"


def choose_scale(
    settings: ScaleConfig,
    *,
    model_diameter_px: float | None,
    model_pixel_size_um: float | None,
    image_pixel_size_um: float | None,
    estimate_diameter: Callable[[], float | None],
) -> ScaleChoice:
    """Decide the zoom for one image (``estimate_diameter`` is only called when needed)."""
    if settings.scale is not None:
        return ScaleChoice(settings.scale, _diameter(model_diameter_px, settings.scale), "config")
    if settings.mode == "none" or model_diameter_px is None:
        return ScaleChoice(1.0, None, "none")
    if settings.diameter_px is not None:
        return _clamped(
            settings, model_diameter_px / settings.diameter_px, settings.diameter_px, "config"
        )
    pixel_size = settings.pixel_size_um or image_pixel_size_um
    if pixel_size and model_pixel_size_um:
        scale = pixel_size / model_pixel_size_um
        return _clamped(settings, scale, model_diameter_px / scale, "pixel-size")
    diameter = estimate_diameter()
    if diameter is None:  # nothing found: an empty image; keep its own scale
        return ScaleChoice(1.0, None, "estimated")
    return _clamped(settings, model_diameter_px / diameter, diameter, "estimated")


def typical_diameter(
    labels: np.ndarray, *, min_diameter: float = 0.0, min_cells: int = 3
) -> float | None:
    """Median equivalent diameter of the cells in ``labels``, ignoring ones cut by the
    border when enough whole cells remain; None when fewer than ``min_cells`` are found.

    Objects under ``min_diameter`` are left out: a network shown cells much larger than it
    was trained on breaks their texture into small fragments, which would otherwise pull
    the median down and zoom the image the wrong way.
    """
    inner = clear_border(labels)
    use = inner if len(np.unique(inner)) - 1 >= min_cells else labels
    diameters = regionprops_table(use, properties=("equivalent_diameter_area",))[
        "equivalent_diameter_area"
    ]
    diameters = diameters[diameters >= min_diameter]
    if len(diameters) < min_cells:
        return None
    return float(np.median(diameters))


def _clamped(
    settings: ScaleConfig, scale: float, diameter: float | None, source: str
) -> ScaleChoice:
    return ScaleChoice(min(max(scale, settings.min_scale), settings.max_scale), diameter, source)


def _diameter(model_diameter: float | None, scale: float) -> float | None:
    return model_diameter / scale if model_diameter is not None else None


def is_close(a: float, b: float, tolerance: float = 0.15) -> bool:
    """Whether two scales differ by less than ``tolerance`` (relative, symmetric)."""
    return abs(math.log(a / b)) < math.log1p(tolerance)
