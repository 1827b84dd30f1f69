from __future__ import annotations

import math

import numpy as np
import pytest

from cellwatch.training.matching import (
    DEFAULT_THRESHOLDS,
    MatchCounts,
    count_errors,
    iou_matrix,
    match,
    pixel_dice,
    summarize,
)


def _image(*boxes: tuple[int, int, int, int, int], shape=(20, 40)) -> np.ndarray:
    """Label image from (label, row0, row1, col0, col1) boxes; later boxes overwrite."""
    out = np.zeros(shape, dtype=np.int32)
    for label, r0, r1, c0, c1 in boxes:
        out[r0:r1, c0:c1] = label
    return out


def _at(results: list[MatchCounts], threshold: float) -> MatchCounts:
    (found,) = [m for m in results if m.threshold == threshold]
    return found


def _counts(m: MatchCounts) -> tuple[int, int, int]:
    return m.tp, m.fp, m.fn


TWO_SQUARES = _image((1, 0, 10, 0, 10), (2, 10, 20, 20, 30))


def test_identical_images_match_perfectly():
    results = match(TWO_SQUARES, TWO_SQUARES)
    assert [m.threshold for m in results] == list(DEFAULT_THRESHOLDS)
    for m in results:
        assert (_counts(m), m.n_true, m.n_pred) == ((2, 0, 0), 2, 2)
        assert m.accuracy == m.precision == m.recall == m.f1 == 1.0
        assert m.sum_matched_iou == 2.0
        assert m.mean_matched_iou == m.panoptic_quality == 1.0


def test_relabelling_does_not_change_anything():
    relabelled = np.select([TWO_SQUARES == 1, TWO_SQUARES == 2], [70000, 3], 0)
    assert match(TWO_SQUARES, TWO_SQUARES) == match(relabelled, TWO_SQUARES)
    iou, true_ids, pred_ids = iou_matrix(TWO_SQUARES, relabelled)
    np.testing.assert_array_equal(iou, [[0, 1], [1, 0]])
    np.testing.assert_array_equal(true_ids, [1, 2])
    np.testing.assert_array_equal(pred_ids, [3, 70000])


def test_shifted_square_has_iou_one_third():
    true = _image((1, 0, 10, 0, 10))
    pred = _image((1, 0, 10, 5, 15))  # overlap 50 px, union 150 px
    iou, _, _ = iou_matrix(true, pred)
    assert iou[0, 0] == pytest.approx(1 / 3)
    low, high = match(true, pred, thresholds=(0.3, 0.5))
    assert _counts(low) == (1, 0, 0)
    assert low.sum_matched_iou == pytest.approx(1 / 3)
    assert _counts(high) == (0, 1, 1)
    assert high.accuracy == 0.0
    assert high.mean_matched_iou == 0.0


def test_split_object_matches_one_half_at_exactly_one_half():
    true = _image((1, 0, 10, 0, 10))
    pred = _image((4, 0, 10, 0, 5), (9, 0, 10, 5, 10))
    np.testing.assert_array_equal(iou_matrix(true, pred)[0], [[0.5, 0.5]])
    at_half, above = match(true, pred, thresholds=(0.5, 0.55))
    assert _counts(at_half) == (1, 1, 0)
    assert at_half.accuracy == 0.5
    assert at_half.precision == 0.5
    assert at_half.recall == 1.0
    assert at_half.panoptic_quality == pytest.approx(0.5 / 1.5)
    assert _counts(above) == (0, 2, 1)


def test_merged_objects_match_one_true_object():
    true = _image((1, 0, 10, 0, 5), (2, 0, 10, 5, 10))
    pred = _image((1, 0, 10, 0, 10))
    (m,) = match(true, pred, thresholds=(0.5,))
    assert _counts(m) == (1, 0, 1)
    assert (m.n_true, m.n_pred) == (2, 1)


def test_empty_prediction_scores_zero():
    m = match(TWO_SQUARES, np.zeros_like(TWO_SQUARES))[0]
    assert (_counts(m), m.n_pred) == ((0, 0, 2), 0)
    assert m.precision == m.recall == m.f1 == m.accuracy == m.panoptic_quality == 0.0


def test_empty_truth_scores_zero():
    m = match(np.zeros_like(TWO_SQUARES), TWO_SQUARES)[0]
    assert (_counts(m), m.n_true) == ((0, 2, 0), 0)
    assert m.precision == m.recall == m.f1 == m.accuracy == 0.0


def test_both_empty_is_perfect_by_convention():
    empty = np.zeros((5, 5), dtype=np.uint8)
    iou, true_ids, pred_ids = iou_matrix(empty, empty)
    assert iou.shape == (0, 0) and true_ids.size == pred_ids.size == 0
    m = match(empty, empty)[0]
    assert _counts(m) == (0, 0, 0)
    assert m.precision == m.recall == m.f1 == m.accuracy == 1.0
    assert m.mean_matched_iou == m.panoptic_quality == 1.0


def test_non_consecutive_negative_and_mixed_dtype_ids():
    true = _image((7, 0, 10, 0, 10), (1000, 10, 20, 20, 30), (-2, 0, 5, 35, 40))
    pred = np.select([true == 7, true == 1000], [2**40, 3], 0).astype(np.int64)
    iou, true_ids, pred_ids = iou_matrix(true, pred)
    np.testing.assert_array_equal(true_ids, [-2, 7, 1000])
    np.testing.assert_array_equal(pred_ids, [3, 2**40])
    np.testing.assert_array_equal(iou, [[0, 0], [0, 1], [1, 0]])
    m = match(np.where(true > 0, true, 0).astype(np.uint16), pred)[0]
    assert _counts(m) == (2, 0, 0)


def _greedy_tp(iou: np.ndarray, threshold: float) -> int:
    """Match the highest-IoU pair first, repeatedly: what a naive implementation does."""
    iou = np.where(iou >= threshold, iou, 0.0)
    tp = 0
    while iou.max(initial=0.0) > 0:
        i, j = np.unravel_index(np.argmax(iou), iou.shape)
        iou[i, :] = iou[:, j] = 0.0
        tp += 1
    return tp


def test_optimal_matching_beats_greedy_below_one_half():
    # Columns 0-3: A and P2; 4-11: A and P1; 12-17: B and P1.
    true = _image((1, 0, 5, 0, 12), (2, 0, 5, 12, 18))  # A, B
    pred = _image((2, 0, 5, 0, 4), (1, 0, 5, 4, 18))  # P2, P1
    iou, _, _ = iou_matrix(true, pred)
    np.testing.assert_allclose(iou, [[8 / 18, 4 / 12], [6 / 14, 0]])
    assert _greedy_tp(iou, 0.3) == 1  # takes A-P1 (0.44), stranding B and P2
    low, high = match(true, pred, thresholds=(0.3, 0.5))
    assert _counts(low) == (2, 0, 0)
    assert low.sum_matched_iou == pytest.approx(4 / 12 + 6 / 14)
    assert _counts(high) == (0, 2, 2)


def _brute_force_iou(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    true_ids = [i for i in np.unique(true) if i != 0]
    pred_ids = [j for j in np.unique(pred) if j != 0]
    out = np.zeros((len(true_ids), len(pred_ids)))
    for a, i in enumerate(true_ids):
        for b, j in enumerate(pred_ids):
            t, p = true == i, pred == j
            out[a, b] = (t & p).sum() / (t | p).sum()
    return out


@pytest.mark.parametrize("seed", range(5))
def test_iou_matrix_agrees_with_brute_force(seed):
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(1, 30)), int(rng.integers(1, 30)))
    pool = rng.choice(np.arange(-50, 5000), size=int(rng.integers(1, 12)), replace=False)
    true = rng.choice(np.append(pool, 0), size=shape)
    pred = rng.choice(np.append(rng.permutation(pool)[:5], [0, 0]), size=shape)
    iou, true_ids, pred_ids = iou_matrix(true, pred)
    np.testing.assert_allclose(iou, _brute_force_iou(true, pred))
    np.testing.assert_array_equal(true_ids, sorted(set(np.unique(true)) - {0}))
    np.testing.assert_array_equal(pred_ids, sorted(set(np.unique(pred)) - {0}))


def test_many_objects():
    # 2500 squares of 20x20 on a 1000x1000 image; prediction shifted right by 2 columns, so
    # IoU is 360/440 except in the last column of squares (cut to 18 columns: 360/400), and
    # each shifted square spills 40 px into its neighbour (IoU 40/760 = 0.053).
    true = (np.arange(1000)[:, None] // 20 * 50 + np.arange(1000)[None, :] // 20 + 1).astype(
        np.int32
    )
    pred = np.zeros_like(true)
    pred[:, 2:] = true[:, :-2]
    iou, _, _ = iou_matrix(true, pred)
    assert iou.shape == (2500, 2500)
    assert np.count_nonzero(iou) == 2500 + 2450
    results = match(true, pred, thresholds=(0.05, 0.8, 0.85, 0.95))
    assert [m.tp for m in results] == [2500, 2500, 50, 0]


def test_summarize_sums_counts_per_threshold():
    true = _image((1, 0, 10, 0, 10))
    first = match(true, true, thresholds=(0.3, 0.5))
    second = match(true, _image((1, 0, 10, 5, 15)), thresholds=(0.3, 0.5))
    low, high = summarize([first, second])
    assert (_counts(low), low.n_true, low.n_pred) == ((2, 0, 0), 2, 2)
    assert low.sum_matched_iou == pytest.approx(1 + 1 / 3)
    assert (_counts(high), high.accuracy) == ((1, 1, 1), pytest.approx(1 / 3))


def test_summarize_rejects_mismatched_thresholds():
    true = _image((1, 0, 10, 0, 10))
    with pytest.raises(ValueError, match="same thresholds"):
        summarize([match(true, true, (0.5,)), match(true, true, (0.6,))])
    with pytest.raises(ValueError, match="same thresholds"):
        summarize([match(true, true, (0.5, 0.6)), match(true, true, (0.5,))])
    with pytest.raises(ValueError, match="at least one image"):
        summarize([])


def test_pixel_dice():
    true = _image((1, 0, 10, 0, 10))
    assert pixel_dice(true, _image((5, 0, 10, 5, 15))) == 0.5  # 2*50 / (100+100)
    assert pixel_dice(true, np.zeros_like(true)) == 0.0
    assert pixel_dice(np.zeros_like(true), np.zeros_like(true)) == 1.0


def test_count_errors():
    out = count_errors([10, 0, 4], [12, 3, 3])
    np.testing.assert_array_equal(out["error"], [2, 3, -1])
    np.testing.assert_array_equal(out["abs_error"], [2, 3, 1])
    np.testing.assert_allclose(out["abs_pct_error"], [20, np.nan, 25])
    assert out["mae"] == 2.0
    assert out["mape"] == pytest.approx(22.5)
    assert math.isnan(count_errors([0, 0], [1, 0])["mape"])


@pytest.mark.parametrize(
    ("true", "pred", "message"),
    [
        ([1, 2], [1], "equal length"),
        ([], [], "non-empty"),
        ([[1]], [[1]], "1-D"),
        ([-1], [1], "non-negative"),
        ([1], [np.nan], "finite"),
    ],
)
def test_count_errors_rejects_bad_input(true, pred, message):
    with pytest.raises(ValueError, match=message):
        count_errors(true, pred)


def test_bad_images_are_rejected():
    with pytest.raises(ValueError, match="same shape"):
        match(np.zeros((4, 5), int), np.zeros((5, 4), int))
    with pytest.raises(ValueError, match="same shape"):
        pixel_dice(np.zeros((4, 5)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="2-D"):
        iou_matrix(np.zeros((2, 2, 2), int), np.zeros((2, 2, 2), int))
    with pytest.raises(TypeError, match="integer label image"):
        iou_matrix(np.zeros((4, 4)), np.zeros((4, 4), int))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        match(TWO_SQUARES, TWO_SQUARES, thresholds=(0.0, 0.5))
    with pytest.raises(ValueError, match="must not be empty"):
        match(TWO_SQUARES, TWO_SQUARES, thresholds=())
