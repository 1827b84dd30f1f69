"""Cells of any size: `val` images and masks zoomed 0.5×, 2× and 4×, scored against 1×.

    python benchmarks/zoom.py --images DIR --masks DIR [--model PATH] [--every N]
        [--zooms 1 0.5 2 4] [--config PATH] [--json PATH]

Each image is read as ``cellwatch evaluate`` reads it, zoomed with
``skimage.transform.rescale`` (linear, anti-aliased when shrinking) and its mask by nearest
neighbour; the pipeline segments it with the given config (default: the default config,
automatic scale, nothing told about the images), and it is scored as ``cellwatch evaluate``
scores (:func:`cellwatch.training.evaluate.summarize`: accuracy summed over all images,
count MAPE, size groups). One line per zoom: accuracy at IoU 0.5, count MAPE, and how far
the automatic diameter estimate lies from the true median diameter (zoomed with the
image); then each zoom's difference from 1× against the targets of issue 17 (accuracy
within 0.03, count MAPE within 2 points). ``--every N`` uses every N-th image.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from common import dataset_parser
from skimage.transform import rescale

from cellwatch.config import Config, load_config
from cellwatch.model import load_model
from cellwatch.pipeline import Segmenter, read
from cellwatch.storage import imageio
from cellwatch.storage.imageio import find_pairs
from cellwatch.training import evaluate, matching
from cellwatch.training.targets import as_instances, median_diameter

ACCURACY_WITHIN = 0.03  # issue 17's targets: each zoom's accuracy@0.5 within this of 1×
MAPE_WITHIN = 2.0  # ... and its count MAPE within this many points


def zoomed(pixels: np.ndarray, mask: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Image (float32, its own range) and instance mask zoomed by ``factor``."""
    if factor == 1:
        return pixels, mask
    image = rescale(
        pixels.astype(np.float32), factor, anti_aliasing=factor < 1, preserve_range=True
    )
    labels = rescale(mask, factor, order=0, preserve_range=True, anti_aliasing=False)
    return image.astype(np.float32), labels.astype(np.int32)


def score(
    pairs: list[tuple[np.ndarray, np.ndarray, str]], segmenter: Segmenter, factor: float
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Segment every image zoomed by ``factor`` and score it as ``cellwatch evaluate`` does."""
    rows, per_image = [], []
    for pixels, mask, name in pairs:
        image, truth = zoomed(pixels, mask, factor)
        started = time.perf_counter()
        result = segmenter.segment(image)
        seconds = time.perf_counter() - started
        counts = matching.match(truth, result.labels)
        per_image.append(counts)
        at_half = next(c for c in counts if round(c.threshold, 2) == 0.5)
        rows.append(
            {
                "image": name,
                "zoom": factor,
                "true_count": int(len(np.unique(truth)) - (truth == 0).any()),  # ids may go
                "pred_count": int(result.labels.max()),
                "true_diameter_px": median_diameter(truth),
                "scale": result.scale.scale,
                "estimated_diameter_px": result.scale.diameter_px,
                "accuracy_0.5": at_half.accuracy,
                "pixel_dice": matching.pixel_dice(truth, result.labels),
                "seconds": round(seconds, 3),
            }
        )
    table = pd.DataFrame(rows)
    summary = evaluate.summarize(table, per_image)
    errors = [
        abs(e / t - 1)
        for t, e in zip(table["true_diameter_px"], table["estimated_diameter_px"], strict=True)
        if pd.notna(t) and pd.notna(e) and t > 0 and e > 0  # None (nothing found) reads NaN
    ]
    return {
        "accuracy_0.5": round(summary["thresholds"]["0.50"]["accuracy"], 4),
        "accuracy_0.7": round(summary["thresholds"]["0.70"]["accuracy"], 4),
        "count_mape_pct": round(summary["count_mape_percent"], 2),
        "diameter_error_median_pct": round(100 * float(np.median(errors)), 1) if errors else None,
        "diameter_within_30pct": int(np.sum(np.array(errors) <= 0.3)),
        "size_groups": {
            name: round(g["accuracy_0.5"], 4) for name, g in summary["size_groups"].items()
        },
        "images": len(pairs),
        "seconds_per_image": round(summary["seconds_per_image"], 2),
    }, table


def main() -> None:
    parser = dataset_parser(__doc__)
    parser.add_argument("--zooms", type=float, nargs="+", default=[1.0, 0.5, 2.0, 4.0])
    parser.add_argument("--config", type=Path, help="configuration file (default settings)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--per-image", type=Path, help="write every image's row here (CSV)")
    args = parser.parse_args()
    config = load_config(args.config) if args.config else Config()
    segmenter = Segmenter(config, load_model(args.model or config.model.path))
    pairs = [
        (read(image, config).pixels, as_instances(imageio.read_image(mask).pixels), image.name)
        for image, mask in find_pairs(args.images, args.masks)[:: args.every]
    ]
    results: dict[str, Any] = {
        "model": segmenter.model.label,
        "settings_hash": config.settings_hash(),
        "every": args.every,
        "zooms": {},
    }
    tables = []
    for factor in args.zooms:
        figures, table = score(pairs, segmenter, factor)
        results["zooms"][f"{factor:g}x"] = figures
        tables.append(table)
        print(f"zoom {factor:g}x: " + " ".join(f"{k} {v}" for k, v in figures.items()), flush=True)
    base = results["zooms"].get("1x")
    if base is not None:
        for name, figures in results["zooms"].items():
            accuracy = round(figures["accuracy_0.5"] - base["accuracy_0.5"], 4)
            mape = round(figures["count_mape_pct"] - base["count_mape_pct"], 2)
            figures["vs_1x"] = {
                "accuracy_0.5": accuracy,
                "count_mape_points": mape,
                "within_targets": accuracy >= -ACCURACY_WITHIN and mape <= MAPE_WITHIN,
            }
            print(f"{name} against 1x: {figures['vs_1x']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.per_image:
        pd.concat(tables).to_csv(args.per_image, index=False)


if __name__ == "__main__":
    main()
