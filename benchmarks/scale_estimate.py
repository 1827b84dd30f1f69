"""The automatic size estimate against the masks: estimated vs true median diameter, counts.

    python benchmarks/scale_estimate.py --images DIR --masks DIR [--every N]
        [--kind all|large] [--settings NAME=Q,SPECK,SOLIDITY,CLUMP ...] [--csv PATH]
        [--folds K]

For each image (read as ``cellwatch evaluate`` reads it) and each named setting of the
estimate's single-cell filter (:func:`cellwatch.scale.single_cells`: the quantile reported,
the speck ratio, the least solidity and the clump ratio; see :mod:`cellwatch.scale`), the
pipeline segments it with the default config (automatic scale) and the row records the true
median diameter (from the mask), the estimate, the count, the matches at IoU 0.5 and the
familiarity. One summary line per setting: the median ratio estimate / truth, count MAPE
and bias, accuracy@0.5 summed over the images as ``cellwatch evaluate`` sums it, and how
many images the report would flag ``unfamiliar`` (how many of them as patterns).

``--kind large`` keeps the 360×360 images whose nuclei are 30 px or more across (median,
from the mask): fields of touching large nuclei, where a zoom chosen from clumps merges
neighbours. ``--folds K`` then chooses a setting on K-1 folds (lowest count MAPE, then
highest accuracy) and scores it on the held-out fold: the cross-validated figure.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from common import dataset_parser

from cellwatch import scale as scale_module
from cellwatch.config import Config, ReportConfig
from cellwatch.model import load_model
from cellwatch.pipeline import Segmenter, read
from cellwatch.storage import imageio
from cellwatch.storage.imageio import find_pairs
from cellwatch.training import matching
from cellwatch.training.targets import as_instances, median_diameter

#: The settings compared by default: (quantile, speck ratio, least solidity, clump ratio).
#: "before" is the estimate as it was: the median of all objects over the fragment size.
SETTINGS: dict[str, tuple[float, float, float, float]] = {
    "before": (0.5, 0.0, 0.0, np.inf),
    "specks": (0.5, 0.5, 0.0, np.inf),
    "specks+solid": (0.5, 0.5, 0.85, np.inf),
    "specks+solid+clump": (0.5, 0.5, 0.85, 1.5),
    "q0.35": (0.35, 0.5, 0.85, 1.5),
    "q0.25": (0.25, 0.5, 0.85, 1.5),
}
LARGE_SIDE = (360, 360)  # the kind of image issue text names: 360×360 fields ...
LARGE_DIAMETER = 30.0  # ... of nuclei this large (median, px) or larger


def use_setting(values: tuple[float, float, float, float]) -> None:
    """Set the estimate's single-cell filter (module constants of :mod:`cellwatch.scale`)."""
    names = ("QUANTILE", "SPECK_RATIO", "SOLIDITY_MIN", "CLUMP_RATIO")
    for name, value in zip(names, values, strict=True):
        setattr(scale_module, name, value)


def score_one(
    segmenter: Segmenter, pixels: np.ndarray, truth: np.ndarray, name: str
) -> dict[str, Any]:
    started = time.perf_counter()
    result = segmenter.segment(pixels)
    at_half = next(c for c in matching.match(truth, result.labels) if round(c.threshold, 2) == 0.5)
    true_count = int(len(np.unique(truth)) - (truth == 0).any())
    return {
        "image": name,
        "true_count": true_count,
        "pred_count": int(result.labels.max()),
        "true_diameter_px": median_diameter(truth),
        "estimated_diameter_px": result.scale.diameter_px,
        "scale": round(result.scale.scale, 4),
        "tp": at_half.tp,
        "fp": at_half.fp,
        "fn": at_half.fn,
        "familiarity": result.familiarity.score,
        "pattern": result.familiarity.pattern,
        "seconds": round(time.perf_counter() - started, 3),
    }


def summary(rows: pd.DataFrame) -> dict[str, float]:
    """Figures of a set of per-image rows (as ``cellwatch evaluate`` sums them)."""
    counted = rows[rows["true_count"] > 0]
    error = counted["pred_count"] / counted["true_count"] - 1
    ratio = rows["estimated_diameter_px"] / rows["true_diameter_px"]
    tp, fp, fn = (int(rows[c].sum()) for c in ("tp", "fp", "fn"))
    return {
        "images": len(rows),
        "diameter_ratio_median": round(float(np.nanmedian(ratio)), 3),
        "accuracy_0.5": round(tp / max(tp + fp + fn, 1), 4),
        "count_mape_pct": round(100 * float(error.abs().mean()), 2),
        "count_bias_pct": round(100 * float(error.mean()), 2),
        "unfamiliar": int((rows["familiarity"] < ReportConfig.familiarity_min).sum()),
        "patterns": int(rows["pattern"].sum()),
    }


def cross_validated(table: pd.DataFrame, folds: int) -> dict[str, Any]:
    """Choose a setting on all folds but one, score it on that one; all folds' rows pooled."""
    images = sorted(table["image"].unique())
    fold_of = {image: i % folds for i, image in enumerate(images)}
    held_out, chosen = [], []
    for fold in range(folds):
        inside = table[table["image"].map(fold_of) != fold]
        ranked = sorted(
            inside["setting"].unique(),
            key=lambda s: (
                summary(inside[inside["setting"] == s])["count_mape_pct"],
                -summary(inside[inside["setting"] == s])["accuracy_0.5"],
            ),
        )
        chosen.append(ranked[0])
        out = table[(table["image"].map(fold_of) == fold) & (table["setting"] == ranked[0])]
        held_out.append(out)
    return {"chosen": chosen, **summary(pd.concat(held_out))}


def main() -> None:
    parser = dataset_parser(__doc__)
    parser.add_argument("--kind", choices=("all", "large"), default="all")
    parser.add_argument(
        "--settings", nargs="+", help="NAME=Q,SPECK,SOLIDITY,CLUMP (default: SETTINGS)"
    )
    parser.add_argument("--csv", type=Path, help="write every image's row here")
    parser.add_argument("--folds", type=int, default=0, help="cross-validate over K folds")
    args = parser.parse_args()
    settings = dict(SETTINGS)
    if args.settings:
        settings = {}
        for item in args.settings:
            name, values = item.split("=")
            q, speck, solid, clump = (float(v) for v in values.split(","))
            settings[name] = (q, speck, solid, clump)
    config = Config()
    segmenter = Segmenter(config, load_model(args.model or config.model.path))
    pairs = []
    for image, mask in find_pairs(args.images, args.masks)[:: args.every]:
        truth = as_instances(imageio.read_image(mask).pixels)
        true_diameter = median_diameter(truth) or 0.0
        if args.kind == "large" and (truth.shape != LARGE_SIDE or true_diameter < LARGE_DIAMETER):
            continue
        pairs.append((read(image, config).pixels, truth, image.name))
    tables = []
    for name, values in settings.items():
        use_setting(values)
        rows = pd.DataFrame([score_one(segmenter, *pair) for pair in pairs])
        rows.insert(0, "setting", name)
        tables.append(rows)
        figures = summary(rows)
        print(f"{name} {values}: " + " ".join(f"{k} {v}" for k, v in figures.items()), flush=True)
    table = pd.concat(tables)
    if args.folds > 1:
        figures = cross_validated(table, args.folds)
        print("cross-validated: " + " ".join(f"{k} {v}" for k, v in figures.items()))
    if args.csv:
        table.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
