"""Score a model against ground-truth instance masks with the real predict pipeline.

Reports object accuracy TP / (TP + FP + FN) summed over all images (StarDist's
definition) at IoU thresholds 0.5 … 0.9 with precision, recall and F1; pixel dice; count
errors; accuracy per cell-size group; and a per-image table so the worst images are easy
to find.
"""

from __future__ import annotations

__all__ = ["add_arguments", "evaluate", "run", "summarize"]

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cellwatch.config import Config
from cellwatch.pipeline import Segmenter, read
from cellwatch.storage import imageio
from cellwatch.storage.imageio import find_pairs
from cellwatch.training import matching
from cellwatch.training.targets import as_instances, median_diameter

SIZE_GROUPS = ((0.0, 15.0, "< 15 px"), (15.0, 30.0, "15–30 px"), (30.0, float("inf"), "> 30 px"))


def evaluate(
    pairs: Sequence[tuple[Path, Path]],
    segmenter: Segmenter,
    config: Config,
    *,
    progress: bool = False,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Segment every image, match against its mask; return (summary, per-image table)."""
    rows, per_image = [], []
    for n, (image_path, mask_path) in enumerate(pairs, start=1):
        data = read(image_path, config)
        truth = as_instances(imageio.read_image(mask_path).pixels)
        started = time.perf_counter()
        result = segmenter.segment(data.pixels, config.scale.pixel_size_um or data.pixel_size_um)
        seconds = time.perf_counter() - started
        counts = matching.match(truth, result.labels)
        per_image.append(counts)
        at = {round(c.threshold, 2): c for c in counts}
        rows.append(
            {
                "image": image_path.name,
                "true_count": int(len(np.unique(truth)) - (truth == 0).any()),
                "pred_count": int(result.labels.max()),
                "true_diameter_px": median_diameter(truth),
                "scale": result.scale.scale,
                "estimated_diameter_px": result.scale.diameter_px,
                "scale_source": result.scale.source,
                "accuracy_0.5": at[0.5].accuracy,
                "accuracy_0.7": at[0.7].accuracy,
                "f1_0.5": at[0.5].f1,
                "tp_0.5": at[0.5].tp,
                "fp_0.5": at[0.5].fp,
                "fn_0.5": at[0.5].fn,
                "pixel_dice": matching.pixel_dice(truth, result.labels),
                "seconds": round(seconds, 3),
            }
        )
        if progress:
            print(f"\r{n}/{len(pairs)} {image_path.name}", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    table = pd.DataFrame(rows)
    return summarize(table, per_image), table


def summarize(
    table: pd.DataFrame, per_image: Sequence[list[matching.MatchCounts]]
) -> dict[str, Any]:
    """The summary of an evaluation: scores at each IoU threshold, pixel dice, count errors and scores by nucleus size."""
    totals = matching.summarize(per_image)
    errors = matching.count_errors(table["true_count"].to_numpy(), table["pred_count"].to_numpy())
    groups = {}
    for low, high, name in SIZE_GROUPS:
        chosen = [
            i for i, d in enumerate(table["true_diameter_px"]) if d is not None and low <= d < high
        ]
        if chosen:
            at_half = matching.summarize([per_image[i] for i in chosen])[0]
            groups[name] = {
                "images": len(chosen),
                "accuracy_0.5": at_half.accuracy,
                "f1_0.5": at_half.f1,
            }
    return {
        "images": len(table),
        "thresholds": {
            f"{c.threshold:.2f}": {
                "accuracy": c.accuracy,
                "precision": c.precision,
                "recall": c.recall,
                "f1": c.f1,
                "tp": c.tp,
                "fp": c.fp,
                "fn": c.fn,
            }
            for c in totals
        },
        "pixel_dice": float(table["pixel_dice"].mean()),
        "count_mae": float(errors["mae"]),
        "count_mape_percent": float(errors["mape"]),
        "size_groups": groups,
        "seconds_per_image": float(table["seconds"].mean()),
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as the table ``cellwatch evaluate`` prints."""
    lines = [f"{summary['images']} images", "IoU   accuracy  precision  recall  F1"]
    for tau, m in summary["thresholds"].items():
        lines.append(
            f"{tau}  {m['accuracy']:.3f}     {m['precision']:.3f}      {m['recall']:.3f}   {m['f1']:.3f}"
        )
    lines.append(
        f"pixel dice {summary['pixel_dice']:.3f}; count MAE {summary['count_mae']:.2f}, "
        f"MAPE {summary['count_mape_percent']:.1f} %; {summary['seconds_per_image']:.2f} s per image"
    )
    for name, g in summary["size_groups"].items():
        lines.append(f"cells {name:9} {g['images']:3} images  accuracy@0.5 {g['accuracy_0.5']:.3f}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``cellwatch evaluate``."""
    parser.add_argument("--images", type=Path, required=True, help="folder of images")
    parser.add_argument(
        "--masks", type=Path, required=True, help="folder of instance masks (same names)"
    )
    parser.add_argument("--json", type=Path, help="write the summary as JSON here")
    parser.add_argument(
        "--per-image",
        type=Path,
        default=Path("evaluation_per_image.csv"),
        help="per-image table (CSV), worst first (default: %(default)s)",
    )
    parser.add_argument(
        "--runtime",
        choices=("auto", "openvino", "keras"),
        help="what runs the network (default: inference.runtime of the config)",
    )
    parser.add_argument(
        "--precision",
        choices=("auto", "f32", "bf16", "int8"),
        help="the network's precision (default: inference.precision of the config)",
    )


def run(args: argparse.Namespace) -> int:
    """``cellwatch evaluate``: score the model on images with masks; exit status 0."""
    from cellwatch.config import config_from_args, override, with_card_input
    from cellwatch.runtime import load, resolve

    config = override(
        config_from_args(args),
        **{
            "inference.runtime": getattr(args, "runtime", None),
            "inference.precision": getattr(args, "precision", None),
        },
    )
    pairs = find_pairs(args.images, args.masks)
    config = resolve(config, measuring=True)  # int8 runs here to be measured
    model = load(config, measuring=True)
    config = with_card_input(config, model.card)
    summary, table = evaluate(pairs, Segmenter(config, model), config, progress=sys.stderr.isatty())
    summary["model"] = model.label
    summary["runtime"], summary["precision"] = model.runtime, model.precision
    summary["settings_hash"] = config.settings_hash()
    table.sort_values("accuracy_0.5").to_csv(args.per_image, index=False)
    print(format_summary(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0
