"""Choose a fine-tuned model's post-processing thresholds on images it was not trained on.

Loads one model once and runs ``cellwatch evaluate``'s scoring for each variant of the
``postprocess`` settings on a *choosing* set (H&E training images not among the corrections),
then scores the default and the chosen variant on the validation images, which played no part
in the choice.

    python benchmarks/teach_postprocess.py --model /tmp/teach-he/he.keras \
        --choose /tmp/teach-he/other-train --val /tmp/teach-he/val --every 3
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from cellwatch.config import Config, InputConfig, PostprocessConfig
from cellwatch.model import load_model
from cellwatch.pipeline import Segmenter
from cellwatch.storage.imageio import find_pairs
from cellwatch.training.evaluate import evaluate

VARIANTS: dict[str, dict[str, float]] = {
    "default 0.8/0.8 split 0.97": {},
    "0.7/0.7 split 0.97": {"interior_threshold": 0.7, "foreground_threshold": 0.7},
    "0.6/0.6 split 0.97": {"interior_threshold": 0.6, "foreground_threshold": 0.6},
    "0.5/0.5 split 0.97": {"interior_threshold": 0.5, "foreground_threshold": 0.5},
    "0.8/0.8 no split": {"split_threshold": 1.0},
    "0.8/0.8 split 0.9": {"split_threshold": 0.9},
    "0.6/0.6 no split": {
        "interior_threshold": 0.6,
        "foreground_threshold": 0.6,
        "split_threshold": 1.0,
    },
    "0.8/0.8 min area 40": {"min_cell_area_px": 40},
    "0.85/0.85 split 0.97": {"interior_threshold": 0.85, "foreground_threshold": 0.85},
    "0.9/0.9 split 0.97": {"interior_threshold": 0.9, "foreground_threshold": 0.9},
    "0.8/0.8 split 0.99": {"split_threshold": 0.99},
    "0.9/0.8 split 0.97": {"interior_threshold": 0.9},
    "0.8/0.6 split 0.97": {"foreground_threshold": 0.6},
    "0.8/0.8 min area 25": {"min_cell_area_px": 25},
    "0.8/0.8 min area 60": {"min_cell_area_px": 60},
    "0.9/0.9 min area 40": {
        "interior_threshold": 0.9,
        "foreground_threshold": 0.9,
        "min_cell_area_px": 40,
    },
}


def score(model: object, pairs: list, channel: str, changes: dict) -> dict[str, float]:
    config = replace(
        Config(),
        input=InputConfig(channel=channel),
        postprocess=replace(PostprocessConfig(), **changes),
    )
    summary, _ = evaluate(pairs, Segmenter(config, model), config)
    at = summary["thresholds"]["0.50"]
    return {
        "accuracy_0.5": round(at["accuracy"], 3),
        "f1_0.5": round(at["f1"], 3),
        "count_mape_percent": round(summary["count_mape_percent"], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--choose", type=Path, required=True)
    parser.add_argument("--val", type=Path, required=True)
    parser.add_argument("--every", type=int, default=3, help="use every Nth choosing image")
    parser.add_argument("--channel", default="hematoxylin")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", nargs="*", help="run only these variants (and the default)")
    args = parser.parse_args()
    model = load_model(args.model)
    choose = find_pairs(args.choose / "images", args.choose / "masks")[:: args.every]
    val = find_pairs(args.val / "images", args.val / "masks")
    results: dict = {"model": str(args.model), "choose_images": len(choose), "choose": {}}
    print(f"| variant | choosing set ({len(choose)}) acc@0.5 | F1 | MAPE % | s |", flush=True)
    names = ["default 0.8/0.8 split 0.97", *(args.only or [])] if args.only else list(VARIANTS)
    for name in dict.fromkeys(names):
        changes = VARIANTS[name]
        started = time.perf_counter()
        s = score(model, choose, args.channel, changes)
        results["choose"][name] = s
        print(
            f"| {name} | {s['accuracy_0.5']:.3f} | {s['f1_0.5']:.3f} | "
            f"{s['count_mape_percent']:.1f} | {time.perf_counter() - started:.0f} |",
            flush=True,
        )
    best = max(results["choose"], key=lambda n: results["choose"][n]["accuracy_0.5"])
    results["chosen"] = best
    results["val"] = {}
    for name in dict.fromkeys(["default 0.8/0.8 split 0.97", best]):
        s = score(model, val, args.channel, VARIANTS[name])
        results["val"][name] = s
        print(
            f"| val {len(val)}: {name} | {s['accuracy_0.5']:.3f} | {s['f1_0.5']:.3f} | "
            f"{s['count_mape_percent']:.1f} |",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
