"""Quality checks that point a biologist at the images worth a second look.

Pure measures run in the pipeline on every image and land in the ledger as the optional
columns ``saturated_fraction``, ``focus_score`` and ``familiarity``
(:mod:`cellwatch.familiarity`); :func:`flag_images` turns a day's ledger rows into
readable flags for the report. Every flag is cheap: no image is
re-read when the report is built.
"""

from __future__ import annotations

__all__ = [
    "FAILED",
    "FLAG_ORDER",
    "UNFAMILIAR",
    "UNFAMILIAR_MESSAGE",
    "QcThresholds",
    "flag_images",
    "robust_outliers",
]

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cellwatch.config import ReportConfig
from cellwatch.errors import ConfigError

FAILED = "failed"
EMPTY = "empty"
HIGH = "high count"
LOW = "low count"
SATURATED = "saturated"
BLURRED = "out of focus"
UNFAMILIAR = "unfamiliar"
UNFAMILIAR_MESSAGE = "the model was not made for images like this: check, or train your own"

#: Flags in the order a reader should look at them.
FLAG_ORDER: tuple[str, ...] = (FAILED, UNFAMILIAR, EMPTY, BLURRED, SATURATED, HIGH, LOW)

# 1.4826 · MAD estimates the standard deviation of normally distributed values.
_MAD_TO_SD = 1.4826


@dataclass(frozen=True)
class QcThresholds:
    """When an image is flagged.

    Parameters
    ----------
    outlier_k : float
        A count is an outlier when it is more than ``outlier_k`` robust standard deviations
        from the typical count (median) of its group, or of the day.
    saturated_max_fraction : float
        Flag an image when more than this fraction of its pixels sit at the maximum value.
    focus_min_ratio : float
        Flag an image as out of focus when its focus score is below this fraction of the
        day's median focus score.
    familiarity_min : float
        Flag an image as unfamiliar when its familiarity (0–1) is below this (0: never).
    min_reference_n : int
        How many good images a group (or day) needs before counts are compared with it.
    """

    outlier_k: float = ReportConfig.outlier_k  # the defaults are the config file's
    saturated_max_fraction: float = ReportConfig.saturated_max_fraction
    focus_min_ratio: float = ReportConfig.focus_min_ratio
    familiarity_min: float = ReportConfig.familiarity_min
    min_reference_n: int = 5

    @classmethod
    def from_settings(cls, settings: ReportConfig) -> QcThresholds:
        """The thresholds of a config file's ``report`` section."""
        return cls(
            outlier_k=settings.outlier_k,
            saturated_max_fraction=settings.saturated_max_fraction,
            focus_min_ratio=settings.focus_min_ratio,
            familiarity_min=settings.familiarity_min,
        )

    def __post_init__(self) -> None:
        if not self.outlier_k > 0:
            raise ConfigError(f"report.outlier_k must be positive, got {self.outlier_k}")
        if not 0 <= self.saturated_max_fraction < 1:
            raise ConfigError(
                "report.saturated_max_fraction must be between 0 and 1, "
                f"got {self.saturated_max_fraction}"
            )
        if not 0 <= self.focus_min_ratio < 1:
            raise ConfigError(
                f"report.focus_min_ratio must be between 0 and 1, got {self.focus_min_ratio}"
            )
        if not 0 <= self.familiarity_min < 1:
            raise ConfigError(
                f"report.familiarity_min must be between 0 and 1, got {self.familiarity_min}"
            )
        if self.min_reference_n < 2:
            raise ConfigError(f"min_reference_n must be at least 2, got {self.min_reference_n}")


def robust_outliers(
    counts: pd.Series, reference: pd.Series, *, k: float
) -> tuple[pd.Series, float, float]:
    """Mark values far from the median of ``reference``.

    The spread is the larger of the scaled MAD and the Poisson noise of a count
    (``sqrt(median)``), so a few identical counts do not make every other one an outlier.

    Returns
    -------
    tuple
        ``(signed, median, spread)`` where ``signed`` is +1 above, -1 below, 0 inside.
    """
    ref = reference.dropna().to_numpy(dtype=float)
    median = float(np.median(ref))
    mad = float(np.median(np.abs(ref - median)))
    spread = max(_MAD_TO_SD * mad, float(np.sqrt(median)), 1.0)
    deviation = (counts.astype(float) - median) / spread
    signed = np.sign(deviation).where(deviation.abs() > k, 0.0).fillna(0.0)
    return signed.astype(int), median, spread


def flag_images(
    images: pd.DataFrame, group_keys: pd.Series, thresholds: QcThresholds
) -> tuple[pd.Series, pd.Series]:
    """QC flags for one day's images.

    Parameters
    ----------
    images : pandas.DataFrame
        Ledger rows of one day (``status``, ``cell_count`` and, when the pipeline wrote
        them, ``saturated_fraction``, ``focus_score`` and ``familiarity``; an empty
        familiarity, as older rows have, is never flagged).
    group_keys : pandas.Series
        The experiment group of each row (same index), or all-empty when not grouped.
    thresholds : QcThresholds
        When to flag.

    Returns
    -------
    tuple
        ``(flags, typical)``: for each row the list of flags (in :data:`FLAG_ORDER`), and
        the typical count it was compared with (NaN when there were too few images).
    """
    flags: dict[object, list[str]] = {index: [] for index in images.index}
    typical = pd.Series(np.nan, index=images.index, dtype=float)
    ok = images["status"].eq("ok")
    counts = pd.to_numeric(images["cell_count"], errors="coerce")
    for index in images.index[~ok]:
        flags[index].append(FAILED)
    if "familiarity" in images:
        familiarity = pd.to_numeric(images["familiarity"], errors="coerce").where(ok)
        for index in images.index[familiarity < thresholds.familiarity_min]:
            flags[index].append(UNFAMILIAR)
    for index in images.index[ok & counts.eq(0)]:
        flags[index].append(EMPTY)
    if "focus_score" in images:
        focus = pd.to_numeric(images["focus_score"], errors="coerce").where(ok)
        if focus.notna().sum() >= thresholds.min_reference_n:
            limit = thresholds.focus_min_ratio * float(focus.median())
            for index in images.index[focus < limit]:
                flags[index].append(BLURRED)
    if "saturated_fraction" in images:
        saturated = pd.to_numeric(images["saturated_fraction"], errors="coerce").where(ok)
        for index in images.index[saturated > thresholds.saturated_max_fraction]:
            flags[index].append(SATURATED)
    _flag_count_outliers(counts.where(ok), group_keys, thresholds, flags, typical)
    ordered = {i: sorted(f, key=FLAG_ORDER.index) for i, f in flags.items()}
    return pd.Series(ordered, index=images.index, dtype=object), typical


def _flag_count_outliers(
    counts: pd.Series,
    group_keys: pd.Series,
    thresholds: QcThresholds,
    flags: dict[object, list[str]],
    typical: pd.Series,
) -> None:
    """Compare each count with its group when the group is big enough, else with the day."""
    day_ref = counts.dropna()
    day_ok = len(day_ref) >= thresholds.min_reference_n
    for _, members in counts.groupby(group_keys, sort=False, dropna=False):
        reference = members.dropna()
        if len(reference) < thresholds.min_reference_n:
            if not day_ok:
                continue
            reference = day_ref
        signed, median, _ = robust_outliers(members, reference, k=thresholds.outlier_k)
        typical.loc[members.dropna().index] = median
        for index, sign in signed.items():
            if sign > 0:
                flags[index].append(HIGH)
            elif sign < 0 and EMPTY not in flags[index]:
                flags[index].append(LOW)
