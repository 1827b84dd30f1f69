"""Accuracy against cost for the cell diameter a model is run at (its working diameter).

    python benchmarks/working_diameter.py --images DIR --masks DIR [--model PATH]
        [--diameters 20 17 16 15] [--split-areas 50 36 23 14] [--every N]
        [--cost-side 4096] [--repeats 2] [--json PATH]

A model trained with scale jitter counts cells of somewhat other sizes too; run at a
smaller diameter, an image is zoomed less and the network sees fewer pixels. For each
diameter, a copy of the model whose card says ``working_diameter_px`` is that diameter
segments every image pair with the default config (automatic scale), except
``postprocess.split_min_area_px`` (at the network's scale, so it shrinks with the cells:
``--split-areas``, one per diameter; left out, the default scaled by the squared ratio of
the diameters). The pairs are scored as ``cellwatch evaluate`` scores them. With
``--cost-side``, a whole ``cellwatch predict`` process is timed on a mosaic of real nuclei
of that side, as ``benchmarks/auto_scale_cost.py`` does (best of ``--repeats``): input
megapixels per second, against the first diameter's. Each arm's counts are also compared
with the first arm's image by image (mean change and paired t). Prints one JSON object.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tifffile
import yaml
from auto_scale_cost import run_once
from common import DATA, dataset_parser

from cellwatch.bench.inputs import crops, mosaic
from cellwatch.config import Config, load_config, override
from cellwatch.model import (
    BUNDLED_MODEL,
    card_path,
    load_model,
    model_label,
    read_card,
    write_card,
)
from cellwatch.pipeline import Segmenter
from cellwatch.storage.imageio import find_pairs
from cellwatch.training.evaluate import evaluate


def at_diameter(model: Path, diameter: float, folder: Path) -> Path:
    """A copy of ``model`` in ``folder`` whose card sets ``working_diameter_px``."""
    copy = folder / f"{model.stem}-at-{diameter:g}px.keras"
    shutil.copyfile(model, copy)
    card = read_card(model) if card_path(model).is_file() else {}
    write_card(copy, {**card, "working_diameter_px": float(diameter)})
    return copy


def scores(summary: dict[str, Any], table: pd.DataFrame) -> dict[str, Any]:
    """An arm's figures; ``counted_minus_true`` is the net count error over all images
    (negative: nuclei lost, most often neighbours merged)."""
    at_half = summary["thresholds"]["0.50"]
    return {
        "accuracy_0.5": round(at_half["accuracy"], 4),
        "f1_0.5": round(at_half["f1"], 4),
        "tp_fp_fn": [at_half["tp"], at_half["fp"], at_half["fn"]],
        "count_mae": round(summary["count_mae"], 3),
        "count_mape_pct": round(summary["count_mape_percent"], 2),
        "counted_minus_true": int((table["pred_count"] - table["true_count"]).sum()),
        "size_groups": {k: round(v["accuracy_0.5"], 3) for k, v in summary["size_groups"].items()},
    }


def paired(first: pd.DataFrame, other: pd.DataFrame) -> dict[str, float]:
    """How another arm's per-image counts differ from the first arm's on the same images:
    the mean change of the count (and of its absolute error), with its paired t."""
    out = {}
    for name, of in (
        ("count", lambda t: t["pred_count"]),
        ("absolute_error", lambda t: (t["pred_count"] - t["true_count"]).abs()),
    ):
        change = (of(other) - of(first)).to_numpy(dtype=float)
        spread = change.std(ddof=1) / np.sqrt(len(change)) if len(change) > 1 else float("nan")
        out[f"{name}_change_per_image"] = round(float(change.mean()), 3)
        out[f"{name}_change_t"] = round(float(change.mean() / spread), 2) if spread else None
    return out


def main() -> None:
    parser = dataset_parser(__doc__)
    parser.add_argument("--diameters", type=float, nargs="+", default=[20.0, 17.0, 16.0, 15.0])
    parser.add_argument("--split-areas", type=int, nargs="+", help="one per diameter")
    parser.add_argument("--config", type=Path, help="configuration file (default settings)")
    parser.add_argument("--cost-side", type=int, default=4096, help="0: do not time predict")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    model = args.model or BUNDLED_MODEL
    base = load_config(args.config) if args.config else Config()
    reference = load_model(model).working_diameter_px or args.diameters[0]
    areas = args.split_areas or [
        round(base.postprocess.split_min_area_px * (d / reference) ** 2) for d in args.diameters
    ]
    if len(areas) != len(args.diameters):
        raise SystemExit("give one --split-areas value per --diameters value")
    pairs = find_pairs(args.images, args.masks)[:: args.every]
    arms, tables = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        mosaic_path = folder / "mosaic.tif"
        if args.cost_side:
            tifffile.imwrite(mosaic_path, mosaic(crops(256, DATA / "val"), args.cost_side))
        for diameter, area in zip(args.diameters, areas, strict=True):
            copy = at_diameter(model, diameter, folder)
            settings = {"postprocess": {"split_min_area_px": area}}
            config = override(base, **{"postprocess.split_min_area_px": area})
            summary, table = evaluate(pairs, Segmenter(config, load_model(copy)), config)
            arm: dict[str, Any] = {"diameter_px": diameter, "split_min_area_px": area}
            arm |= scores(summary, table)
            tables.append(table)
            if len(tables) > 1:
                arm["vs_first"] = paired(tables[0], table)
            if args.cost_side:
                config_file = folder / f"at-{diameter:g}.yaml"
                config_file.write_text(yaml.safe_dump(settings))
                walls = [
                    run_once(mosaic_path, folder / f"out-{diameter:g}-{k}", copy, config_file)[0]
                    for k in range(args.repeats)
                ]
                arm["predict_wall_s"] = [round(w, 1) for w in walls]
                arm["input_mp_per_s"] = round(args.cost_side**2 / 1e6 / min(walls), 3)
            arms.append(arm)
            print(json.dumps(arm), flush=True)
    if args.cost_side:
        for arm in arms:
            arm["cost_vs_first"] = round(arms[0]["input_mp_per_s"] / arm["input_mp_per_s"], 3)
    out = {
        "model": model_label(model),
        "images": str(args.images),
        "pairs": len(pairs),
        "every": args.every,
        "cost_side": args.cost_side,
        "arms": arms,
    }
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
