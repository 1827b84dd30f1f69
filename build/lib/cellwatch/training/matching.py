"""Object-level and pixel-level accuracy of a segmentation against ground truth.

Objects are matched one-to-one by intersection over union (IoU), as StarDist defines it: a
predicted object is a true positive when it is paired with a true object with IoU at or
above the threshold, and the pairing is the one with the most such pairs (ties broken by
the largest total IoU). Above 0.5 each object has at most one candidate partner, so the
optimisation only matters at 0.5 and below.

Zero denominators follow StarDist (the ratio is 0.0), except when both images are empty:
there was nothing to find and nothing was wrongly found, so every score is 1.0.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_THRESHOLDS",
    "MatchCounts",
    "count_errors",
    "iou_matrix",
    "match",
    "pixel_dice",
    "summarize",
]

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import linear_sum_assignment

DEFAULT_THRESHOLDS: tuple[float, ...] = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)


@dataclass(frozen=True)
class MatchCounts:
    """Matching outcome at one IoU threshold, for one image or summed over many."""

    threshold: float
    tp: int
    fp: int
    fn: int
    n_true: int
    n_pred: int
    sum_matched_iou: float

    def _ratio(self, num: float, den: float) -> float:
        if den == 0:
            return 1.0 if self.n_true == 0 and self.n_pred == 0 else 0.0
        return num / den

    @property
    def precision(self) -> float:
        """TP / (TP + FP): the share of found objects that match a true one."""
        return self._ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        """TP / (TP + FN): the share of true objects that were found."""
        return self._ratio(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> float:
        """The harmonic mean of precision and recall, 2·TP / (2·TP + FP + FN)."""
        return self._ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def accuracy(self) -> float:
        """StarDist's "accuracy", TP / (TP + FP + FN) (average precision in the DSB 2018)."""
        return self._ratio(self.tp, self.tp + self.fp + self.fn)

    @property
    def mean_matched_iou(self) -> float:
        """The mean IoU of the matched pairs (0 when none matched)."""
        return self._ratio(self.sum_matched_iou, self.tp)

    @property
    def panoptic_quality(self) -> float:
        """Panoptic quality: summed matched IoU / (TP + (FP + FN) / 2)."""
        return self._ratio(self.sum_matched_iou, self.tp + (self.fp + self.fn) / 2)


def _check(
    true: ArrayLike, pred: ArrayLike, *, labels: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    true, pred = np.asarray(true), np.asarray(pred)
    if true.shape != pred.shape:
        raise ValueError(
            f"true and pred must have the same shape, got {true.shape} and {pred.shape}"
        )
    if true.ndim != 2:
        raise ValueError(f"expected 2-D images, got {true.ndim} dimensions")
    for name, image in (("true", true), ("pred", pred)):
        if labels and not np.issubdtype(image.dtype, np.integer):
            raise TypeError(
                f"{name} must be an integer label image (0 = background), got dtype "
                f"{image.dtype} — pass instance labels, not a probability map or mask"
            )
    return true, pred


def _object_index(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted non-zero ids, and each pixel's index into them plus one (0 for background)."""
    values, inverse = np.unique(image.ravel(), return_inverse=True)
    ids = values[values != 0]
    lookup = np.searchsorted(ids, values).astype(np.int64) + 1
    lookup[values == 0] = 0
    return ids, lookup[inverse]


def iou_matrix(true: ArrayLike, pred: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU of every true object with every predicted object.

    Parameters
    ----------
    true, pred : array_like of int, shape (H, W)
        Instance label images; 0 is background, ids need not be consecutive.

    Returns
    -------
    iou : ndarray of float, shape (n_true, n_pred)
        ``iou[i, j]`` is the IoU of object ``true_ids[i]`` with ``pred_ids[j]``.
    true_ids, pred_ids : ndarray
        The sorted non-zero ids of each image.

    Examples
    --------
    >>> a = np.array([[1, 1, 0, 0]])
    >>> iou_matrix(a, np.array([[0, 5, 5, 0]]))[0]
    array([[0.33333333]])
    """
    true, pred = _check(true, pred)
    true_ids, t_idx = _object_index(true)
    pred_ids, p_idx = _object_index(pred)
    n_true, n_pred = true_ids.size, pred_ids.size

    t_area = np.bincount(t_idx, minlength=n_true + 1)
    p_area = np.bincount(p_idx, minlength=n_pred + 1)
    overlap = (t_idx != 0) & (p_idx != 0)
    pairs, inter = np.unique(t_idx[overlap] * (n_pred + 1) + p_idx[overlap], return_counts=True)
    rows, cols = np.divmod(pairs, n_pred + 1)
    iou = np.zeros((n_true, n_pred))
    iou[rows - 1, cols - 1] = inter / (t_area[rows] + p_area[cols] - inter)
    return iou, true_ids, pred_ids


def _assign(iou: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the pairs matched at ``threshold`` (most pairs, then most IoU)."""
    rows, cols = np.nonzero(iou >= threshold)
    # A candidate pair sharing neither object with another candidate is in every optimal
    # matching; only the rest (possible at thresholds <= 0.5) needs the Hungarian solver.
    single = (np.bincount(rows, minlength=iou.shape[0])[rows] == 1) & (
        np.bincount(cols, minlength=iou.shape[1])[cols] == 1
    )
    if single.all():
        return rows, cols
    r_ids, r_sub = np.unique(rows[~single], return_inverse=True)
    c_ids, c_sub = np.unique(cols[~single], return_inverse=True)
    cost = np.zeros((r_ids.size, c_ids.size))
    # -1 per pair dominates: the IoU tie-break term sums to at most 1/2.
    scale = 2 * min(r_ids.size, c_ids.size)
    cost[r_sub, c_sub] = -1.0 - iou[rows[~single], cols[~single]] / scale
    a, b = linear_sum_assignment(cost)
    keep = cost[a, b] < 0
    return (
        np.concatenate([rows[single], r_ids[a[keep]]]),
        np.concatenate([cols[single], c_ids[b[keep]]]),
    )


def match(
    true: ArrayLike, pred: ArrayLike, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
) -> list[MatchCounts]:
    """Match predicted objects to true objects at each IoU threshold.

    Parameters
    ----------
    true, pred : array_like of int, shape (H, W)
        Instance label images; 0 is background.
    thresholds : sequence of float
        IoU thresholds in (0, 1]; a pair matches when its IoU is >= the threshold.

    Returns
    -------
    list of MatchCounts
        One per threshold, in the order given.
    """
    if len(thresholds) == 0:
        raise ValueError("thresholds must not be empty")
    bad = [t for t in thresholds if not 0 < t <= 1]
    if bad:
        raise ValueError(f"IoU thresholds must lie in (0, 1], got {bad}")
    iou, true_ids, pred_ids = iou_matrix(true, pred)
    n_true, n_pred = true_ids.size, pred_ids.size
    out = []
    for t in thresholds:
        rows, cols = _assign(iou, t)
        tp = rows.size
        s = float(iou[rows, cols].sum())
        out.append(MatchCounts(float(t), tp, n_pred - tp, n_true - tp, n_true, n_pred, s))
    return out


def summarize(per_image: Iterable[list[MatchCounts]]) -> list[MatchCounts]:
    """Sum counts over images, per threshold, for dataset-level scores.

    Every image's list must use the same thresholds in the same order (as :func:`match`
    returns them). Dataset accuracy is then ΣTP / (ΣTP + ΣFP + ΣFN), not a mean of ratios.
    """
    lists = list(per_image)
    if not lists:
        raise ValueError("summarize needs at least one image's results")
    thresholds = [m.threshold for m in lists[0]]
    if any([m.threshold for m in counts] != thresholds for counts in lists):
        raise ValueError("all images must be matched at the same thresholds, in order")
    fields = ("tp", "fp", "fn", "n_true", "n_pred", "sum_matched_iou")
    return [
        MatchCounts(column[0].threshold, **{f: sum(getattr(m, f) for m in column) for f in fields})
        for column in zip(*lists, strict=True)
    ]


def pixel_dice(true: ArrayLike, pred: ArrayLike) -> float:
    """Dice coefficient of the foregrounds (non-zero pixels); 1.0 when both are empty."""
    true, pred = _check(true, pred, labels=False)
    a, b = true != 0, pred != 0
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2 * int((a & b).sum()) / total


def count_errors(true_counts: ArrayLike, pred_counts: ArrayLike) -> dict[str, Any]:
    """Per-image and mean errors of predicted cell counts.

    Returns
    -------
    dict
        ``error`` (pred - true), ``abs_error`` and ``abs_pct_error`` (percent of the true
        count; NaN where it is 0) as per-image arrays; ``mae`` and ``mape`` (over images
        with a true count > 0; NaN if there are none) as floats.
    """
    true = np.asarray(true_counts, dtype=float)
    pred = np.asarray(pred_counts, dtype=float)
    if true.ndim != 1 or true.shape != pred.shape or true.size == 0:
        raise ValueError(
            f"expected two non-empty 1-D count sequences of equal length, got shapes "
            f"{true.shape} and {pred.shape}"
        )
    if not (np.isfinite(true).all() and np.isfinite(pred).all()) or (true < 0).any():
        raise ValueError("counts must be finite and true counts non-negative")
    error = pred - true
    abs_error = np.abs(error)
    counted = true > 0
    pct = np.divide(100 * abs_error, true, out=np.full_like(true, np.nan), where=counted)
    mape = float(pct[counted].mean()) if counted.any() else float("nan")
    return {
        "error": error,
        "abs_error": abs_error,
        "abs_pct_error": pct,
        "mae": float(abs_error.mean()),
        "mape": mape,
    }
