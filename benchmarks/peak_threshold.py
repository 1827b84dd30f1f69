"""Dropping doubtful cells: fine-tuned models counted with ``postprocess.peak_threshold``.

A cell is doubtful when the network's interior probability stays below the threshold
everywhere in it. Each run folder is one ``benchmarks/teach_he.py`` output (``he.keras``,
its card, its ``config.yaml`` naming the channel, ``corrections/``, ``other-train/`` and
``val/``). For each threshold the model's card is finished as ``cellwatch finetune`` now
finishes it (a copy of the model, the threshold in its card, the outline growth measured
on its training corrections through that card: :func:`cellwatch.training.shapes.settle_growth`);
the model is then counted through the pipeline (``cellwatch evaluate``'s scoring) on its
other training images (where the threshold is chosen) and on val (reported). The model as
saved (its card untouched) is counted too, and the means of each group of runs printed:

    python benchmarks/peak_threshold.py --json docs/teach-he-round12.json \\
        he=/tmp/teach10/base0 he=/tmp/teach10/base1 gray=/tmp/bf/no-s0 ...
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from statistics import mean
from typing import Any

from cellwatch.config import load_config
from cellwatch.model import load_model, read_card, write_card
from cellwatch.pipeline import Segmenter
from cellwatch.postprocess import CARD_PEAK_KEY
from cellwatch.storage.imageio import find_pairs
from cellwatch.storage.pixels import STAINS
from cellwatch.training.evaluate import evaluate
from cellwatch.training.judge import counting_config
from cellwatch.training.shapes import settle_growth

SETS = ("other-train", "val")


def finished(run: Path, threshold: float, folder: Path) -> Path:
    """A copy of ``run``'s model in ``folder`` with its card finished for ``threshold``."""
    model = folder / f"he-peak{threshold:g}.keras"
    shutil.copyfile(run / "he.keras", model)
    card = read_card(run / "he.keras")
    card[CARD_PEAK_KEY] = threshold
    corrections = run / "corrections"
    held = {Path(c["image"]).name for c in card["finetune"]["corrections"] if c["held_out"]}
    training = [
        (image, mask)
        for image, mask in find_pairs(corrections / "images", corrections / "masks")
        if image.name not in held
    ]
    settle_growth(model, card, training, _channel(run))
    write_card(model, card)
    return model


def _channel(run: Path) -> str | None:
    """The channel ``finetune`` was given: the config's when it names a stain."""
    configured = load_config(run / "config.yaml").input.channel
    return configured if configured in STAINS else None


def score(run: Path, model_path: Path) -> dict[str, Any]:
    """accuracy@0.5 and count MAPE of the model at ``model_path`` on each of ``run``'s
    sets, counted as its card says."""
    model = load_model(model_path)
    found: dict[str, Any] = {"outline_growth_px": model.card.get("outline_growth_px")}
    for name in SETS:
        pairs = find_pairs(run / name / "images", run / name / "masks")
        config = counting_config(model, pairs[0][0], _channel(run))
        summary, _ = evaluate(pairs, Segmenter(config, model), config)
        found[name] = {
            "accuracy_0.5": round(summary["thresholds"]["0.50"]["accuracy"], 4),
            "count_mape_percent": round(summary["count_mape_percent"], 2),
            "cells": int(summary["thresholds"]["0.50"]["tp"] + summary["thresholds"]["0.50"]["fp"]),
        }
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="GROUP=DIR: a teach_he.py output folder")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.9, 0.95, 0.97])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict = {"thresholds": args.thresholds, "runs": {}}
    for item in args.runs:
        group, _, folder = item.partition("=")
        run = Path(folder)
        scores = {"as saved": score(run, run / "he.keras")}
        with tempfile.TemporaryDirectory() as work:
            for t in args.thresholds:
                scores[f"{t:g}"] = score(run, finished(run, t, Path(work)))
        results["runs"][str(run)] = {"group": group, "scores": scores}
        cells = " | ".join(
            " · ".join(
                f"{s[n]['accuracy_0.5']:.3f} / {s[n]['count_mape_percent']:.1f}" for n in SETS
            )
            + f" (growth {s['outline_growth_px']})"
            for s in scores.values()
        )
        print(f"| {group} | {run} | {cells} |", flush=True)
    groups = sorted({r["group"] for r in results["runs"].values()})
    results["means"] = {}
    print("\nmeans (accuracy@0.5 / count MAPE %, other training images · val):")
    for group in groups:
        runs = [r["scores"] for r in results["runs"].values() if r["group"] == group]
        means = {
            t: {
                n: {k: round(mean(r[t][n][k] for r in runs), 4) for k in runs[0][t][n]}
                for n in SETS
            }
            for t in runs[0]
        }
        results["means"][group] = means
        for t, m in means.items():
            line = " · ".join(
                f"{m[n]['accuracy_0.5']:.3f} / {m[n]['count_mape_percent']:.1f}" for n in SETS
            )
            print(f"  {group} ({len(runs)} runs), peak_threshold {t}: {line}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
