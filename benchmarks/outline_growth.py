"""How much growing a fine-tuned model's outlines helps, and whether the growth chosen on
its training corrections is the one images never trained on want.

For each fine-tuned model (a ``teach_he.py`` or ``teach_he_momenta.py`` output folder and
the model in it), every image of each set is counted once with outlines as labelled;
then the outlines are grown by each of :data:`cellwatch.training.shapes.CANDIDATES`
(pixels at the network's scale, as the counting does) and matched to the masks again.
The sets: the model's training corrections (where ``finetune`` chooses), its held-out
corrections (its before/after table), and the run's ``other-train`` and ``val`` folders.

    python benchmarks/outline_growth.py --json docs/teach-he-round8-growth.json \
        --bundled-on ../shared/data/dsb2018-fluo/val \
        /tmp/teach5/default10 /tmp/teach6/dual-s0:he.keras /tmp/teach6/last-s0:he-ema0.99-last.keras

A run folder may give its model file after a colon (default ``he.keras``); which of the
run's corrections were held out is read from that model's card.
Prints, per model, the accuracy@0.5 without growth, with the growth that fits the
training corrections best (:func:`cellwatch.training.shapes.choose_growth`), with the
growth ``finetune`` writes (that plus :data:`cellwatch.training.shapes.UNSEEN_MARGIN_PX`)
and with the best growth for the other training images (an oracle, for comparison only).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from cellwatch.config import Config, InputConfig, PostprocessConfig
from cellwatch.model import load_model, read_card
from cellwatch.pipeline import Segmenter
from cellwatch.storage.imageio import find_pairs
from cellwatch.training import matching
from cellwatch.training.shapes import (
    CANDIDATES,
    Counted,
    choose_growth,
    count_pairs,
    for_unseen,
    score,
)


def area_ratio(counted: list[Counted]) -> list[float]:
    """Median and quartiles of (the cell's area / its mask's) over the pairs of cells and
    masks that overlap at IoU 0.3 or more (each mask with its best cell), not grown."""
    ratios = []
    for c in counted:
        iou, true_ids, found_ids = matching.iou_matrix(c.truth, c.labels)
        if not iou.size:
            continue
        true_area = np.bincount(c.truth.ravel())
        found_area = np.bincount(c.labels.ravel())
        best = iou.argmax(axis=1)
        for i in np.flatnonzero(iou.max(axis=1) >= 0.3):
            ratios.append(found_area[found_ids[best[i]]] / true_area[true_ids[i]])
    return [round(float(q), 3) for q in np.quantile(ratios, [0.25, 0.5, 0.75])] if ratios else []


def study(run: Path, model_name: str) -> dict[str, Any]:
    model_path = run / model_name
    card = read_card(model_path)
    corrections = card["finetune"]["corrections"]
    folder = run / "corrections"
    held = {Path(c["image"]).name for c in corrections if c["held_out"]}
    all_pairs = find_pairs(folder / "images", folder / "masks")
    sets = {
        "training corrections": [p for p in all_pairs if p[0].name not in held],
        "held-out corrections": [p for p in all_pairs if p[0].name in held],
        "other-train": find_pairs(run / "other-train" / "images", run / "other-train" / "masks"),
        "val": find_pairs(run / "val" / "images", run / "val" / "masks"),
    }
    channel = (card.get("input") or {}).get("channel")
    config = replace(
        Config(),
        input=InputConfig(channel=channel),
        postprocess=PostprocessConfig(outline_growth_px=0.0),
    )
    segmenter = Segmenter(config, load_model(model_path))
    started = time.perf_counter()
    counted = {name: count_pairs(segmenter, config, pairs) for name, pairs in sets.items()}
    fits, training_scores = choose_growth(counted["training corrections"])
    table = {
        name: {f"{g:g}": round(score(c, g, thresholds=(0.5,)), 4) for g in CANDIDATES}
        for name, c in counted.items()
    }
    ratios = {name: area_ratio(c) for name, c in counted.items()}
    oracle = max(CANDIDATES, key=lambda g: table["other-train"][f"{g:g}"])
    return {
        "model": str(model_path),
        "fits_training": fits,
        "chosen": for_unseen(fits),
        "choice_scores": training_scores,
        "oracle_other_train": oracle,
        "accuracy_0.5": table,
        "area_ratio_quartiles": ratios,
        "seconds": round(time.perf_counter() - started, 1),
    }


def bundled_on(folder: Path) -> dict[str, Any]:
    """The bundled model on ``folder`` (fluorescence, what it was trained for): its
    outlines' area against the masks', and accuracy@0.5 at each growth."""
    config = replace(Config(), postprocess=PostprocessConfig(outline_growth_px=0.0))
    segmenter = Segmenter(config, load_model())
    counted = count_pairs(segmenter, config, find_pairs(folder / "images", folder / "masks"))
    return {
        "folder": str(folder),
        "area_ratio_quartiles": area_ratio(counted),
        "accuracy_0.5": {
            f"{g:g}": round(score(counted, g, thresholds=(0.5,)), 4) for g in CANDIDATES
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="RUN_FOLDER[:MODEL.keras]")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument(
        "--bundled-on", type=Path, metavar="DIR", help="also the bundled model on DIR's images"
    )
    args = parser.parse_args()
    results: list[dict[str, Any]] = []
    if args.bundled_on:
        results.append(bundled_on(args.bundled_on))
        print(f"bundled model on {args.bundled_on}: {json.dumps(results[-1])}", flush=True)
    print(
        "| model | growth: fits training · chosen | set | no growth | fits training | chosen "
        "| best for other-train |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for spec in args.runs:
        run, _, name = spec.partition(":")
        result = study(Path(run), name or "he.keras")
        results.append(result)
        f, g = f"{result['fits_training']:g}", f"{result['chosen']:g}"
        o = f"{result['oracle_other_train']:g}"
        for set_name, row in result["accuracy_0.5"].items():
            print(
                f"| {spec} | {f} · {g} | {set_name} | {row['0']:.3f} | {row[f]:.3f} | "
                f"{row.get(g, float('nan')):.3f} | {row[o]:.3f} ({o}) |",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
