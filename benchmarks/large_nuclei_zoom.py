"""How far to zoom large nuclei down: ``scale.large_nuclei_growth`` against the masks.

    python benchmarks/large_nuclei_zoom.py --images DIR --masks DIR [--every N]
        [--growth G ...] [--csv PATH] [--folds K] [--largest-first]

For each image (read as ``cellwatch evaluate`` reads it) the size estimate runs once; then
for each growth (:func:`cellwatch.scale.working_diameter`) the image is counted at the zoom
that growth gives, with the estimate's passes replayed so that a pass the pipeline would
reuse is reused here too. Images whose estimated nuclei are no larger than the model's
working diameter get the same zoom from every growth and are counted once. Rows go to
``--csv`` as they are made and images already there are skipped (a run can be resumed).

One summary line per growth: accuracy@0.5 summed over the images as ``cellwatch
evaluate`` sums it, count MAPE and bias, over all images and by the true median nucleus
diameter (< 15, 15–30, > 30 px). ``--folds K`` chooses a growth on K-1 folds and scores it on
the held-out fold (the cross-validated figure), by two rules: the lowest count MAPE; and
the lowest count MAPE among the growths whose accuracy@0.5 is at least growth 0's. ``--report`` reads ``--csv`` only (no network).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from common import dataset_parser

from cellwatch.config import Config
from cellwatch.model import load_model
from cellwatch.pipeline import Segmenter, read
from cellwatch.preprocess import Normalization
from cellwatch.scale import working_diameter
from cellwatch.storage import imageio
from cellwatch.storage.imageio import find_pairs
from cellwatch.training import matching
from cellwatch.training.targets import as_instances, median_diameter

GROWTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
GROUPS = (("<15", 0.0, 15.0), ("15-30", 15.0, 30.0), (">30", 30.0, np.inf))


class ReplayedEstimate(Segmenter):
    """A segmenter whose size estimate runs once per image and is then replayed, passes
    included (their labels copied: the pipeline tidies a reused pass in place)."""

    memo: tuple[float | None, dict[float, Any]] | None = None

    def estimate_diameter(
        self,
        image: np.ndarray,
        passes: dict[float, Any] | None = None,
        normalization: Normalization | None = None,
    ) -> float | None:
        if self.memo is None:
            found = super().estimate_diameter(image, passes, normalization)
            self.memo = (found, copy.deepcopy(passes or {}))
            return found
        found, saved = self.memo
        if passes is not None:
            passes.update(copy.deepcopy(saved))
        return found


def with_growth(config: Config, growth: float) -> Config:
    return dataclasses.replace(
        config, scale=dataclasses.replace(config.scale, large_nuclei_growth=growth)
    )


def score(result: Any, truth: np.ndarray) -> dict[str, Any]:
    at_half = next(c for c in matching.match(truth, result.labels) if round(c.threshold, 2) == 0.5)
    return {
        "pred_count": int(result.labels.max()),
        "estimated_diameter_px": result.scale.diameter_px,
        "scale": round(result.scale.scale, 4),
        "tp": at_half.tp,
        "fp": at_half.fp,
        "fn": at_half.fn,
    }


def image_rows(
    segmenter: ReplayedEstimate,
    base: Config,
    growths: tuple[float, ...],
    pixels: np.ndarray,
    truth: np.ndarray,
    name: str,
) -> list[dict[str, Any]]:
    """One row per growth for one image."""
    target = segmenter.model.working_diameter_px or 20.0
    common = {
        "image": name,
        "true_count": int(len(np.unique(truth)) - (truth == 0).any()),
        "true_diameter_px": median_diameter(truth),
    }
    segmenter.memo = None
    segmenter.config = with_growth(base, 0.0)
    started = time.perf_counter()
    first = score(segmenter.segment(pixels), truth)
    rows = [{"growth": 0.0, **common, **first, "seconds": time.perf_counter() - started}]
    estimate = segmenter.memo[0] if segmenter.memo else None
    for growth in growths:
        if growth == 0.0:
            continue
        if estimate is None or working_diameter(estimate, target, growth) == target:
            rows.append({**rows[0], "growth": growth, "seconds": 0.0})
            continue
        segmenter.config = with_growth(base, growth)
        started = time.perf_counter()
        scored = score(segmenter.segment(pixels), truth)
        rows.append(
            {"growth": growth, **common, **scored, "seconds": time.perf_counter() - started}
        )
    return rows


def summary(rows: pd.DataFrame) -> dict[str, Any]:
    """accuracy@0.5 (summed), count MAPE and bias, overall and by true nucleus size."""
    figures: dict[str, Any] = {}
    for group, low, high in (("all", 0.0, np.inf), *GROUPS):
        part = rows[(rows["true_diameter_px"] >= low) & (rows["true_diameter_px"] < high)]
        counted = part[part["true_count"] > 0]
        error = counted["pred_count"] / counted["true_count"] - 1
        tp, fp, fn = (int(part[c].sum()) for c in ("tp", "fp", "fn"))
        figures[group] = (
            f"n {len(part)} acc {tp / max(tp + fp + fn, 1):.4f} "
            f"mape {100 * float(error.abs().mean()) if len(error) else 0:.2f}% "
            f"bias {100 * float(error.mean()) if len(error) else 0:+.2f}%"
        )
    return figures


def mape(rows: pd.DataFrame) -> float:
    counted = rows[rows["true_count"] > 0]
    return float((counted["pred_count"] / counted["true_count"] - 1).abs().mean())


def accuracy(rows: pd.DataFrame) -> float:
    tp, fp, fn = (int(rows[c].sum()) for c in ("tp", "fp", "fn"))
    return tp / max(tp + fp + fn, 1)


def choose(rows: pd.DataFrame, rule: str) -> float:
    """The growth ``rule`` picks on ``rows``: ``mape``, the lowest count MAPE (then the
    highest accuracy); ``keep-accuracy``, the same among the growths whose accuracy@0.5 is
    at least growth 0's (fewer counting errors, not bought with worse outlines)."""
    growths = sorted(rows["growth"].unique())
    if rule == "keep-accuracy":
        floor = accuracy(rows[rows["growth"] == 0.0])
        growths = [g for g in growths if accuracy(rows[rows["growth"] == g]) >= floor - 1e-9]
    return float(
        min(
            growths,
            key=lambda g: (
                round(mape(rows[rows["growth"] == g]), 6),
                -accuracy(rows[rows["growth"] == g]),
            ),
        )
    )


def cross_validated(table: pd.DataFrame, folds: int, rule: str) -> tuple[list[float], pd.DataFrame]:
    """Choose a growth on all folds but one, score it on that one; held-out rows pooled."""
    images = sorted(table["image"].unique())
    fold_of = {image: i % folds for i, image in enumerate(images)}
    fold = table["image"].map(fold_of)
    held_out, chosen = [], []
    for k in range(folds):
        best = choose(table[fold != k], rule)
        chosen.append(best)
        held_out.append(table[(fold == k) & (table["growth"] == best)])
    return chosen, pd.concat(held_out)


def report(table: pd.DataFrame, folds: int) -> None:
    complete = table.groupby("image")["growth"].transform("count") == table["growth"].nunique()
    table = table[complete]
    for growth, rows in table.groupby("growth"):
        print(f"growth {growth}: " + " | ".join(f"{k} {v}" for k, v in summary(rows).items()))
    for rule in ("mape", "keep-accuracy") if folds > 1 else ():
        chosen, held_out = cross_validated(table, folds, rule)
        figures = summary(held_out)
        print(f"cross-validated ({folds} folds, rule {rule}), chosen {chosen}: ", end="")
        print(" | ".join(f"{k} {v}" for k, v in figures.items()))
        print(f"  on all images, rule {rule} chooses {choose(table, rule)}")


def main() -> None:
    parser = dataset_parser(__doc__)
    parser.add_argument("--growth", type=float, nargs="+", default=list(GROWTHS))
    parser.add_argument("--csv", type=Path, help="rows, appended as made; resumed from")
    parser.add_argument("--folds", type=int, default=0, help="cross-validate over K folds")
    parser.add_argument(
        "--largest-first", action="store_true", help="images of the largest nuclei first"
    )
    parser.add_argument("--report", action="store_true", help="summarise --csv only")
    args = parser.parse_args()
    growths = tuple(sorted(set(args.growth) | {0.0}))
    done = pd.read_csv(args.csv) if args.csv and args.csv.exists() else pd.DataFrame()
    if not args.report:
        config = Config()
        segmenter = ReplayedEstimate(config, load_model(args.model or config.model.path))
        pairs = find_pairs(args.images, args.masks)[:: args.every]
        seen = set(done["image"]) if len(done) else set()
        work = []
        for image, mask in pairs:
            if image.name in seen:
                continue
            truth = as_instances(imageio.read_image(mask).pixels)
            work.append((median_diameter(truth) or 0.0, image, truth))
        if args.largest_first:
            work.sort(key=lambda w: -w[0])
        for _, image, truth in work:
            rows = pd.DataFrame(
                image_rows(
                    segmenter, config, growths, read(image, config).pixels, truth, image.name
                )
            )
            if args.csv:
                rows.to_csv(args.csv, mode="a", header=not args.csv.exists(), index=False)
            done = pd.concat([done, rows])
            print(
                image.name,
                " ".join(f"{r.growth}:{r.pred_count}/{r.true_count}" for r in rows.itertuples()),
                flush=True,
            )
    report(done, args.folds)


if __name__ == "__main__":
    main()
