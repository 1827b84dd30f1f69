"""Test-time augmentation on the counting pass only: each image counted with the 8 flips
and rotations averaged, at the zoom a plain run's size estimate chose.

``inference.augment: true`` augments every pass of the network, the size estimate's
passes as well. This scores the other split: the estimate as without augmentation (the
zooms read from a plain ``cellwatch evaluate --per-image`` table), the counting pass
augmented. Prints ``cellwatch evaluate``'s headline figures, and writes the per-image
table and the summary.

    python benchmarks/tta_at_plain_scale.py --model M.keras --config C.yaml \
        --images DIR/images --masks DIR/masks --plain plain.csv --out tta-count-only.json
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from cellwatch.config import load_config, override, with_card_input
from cellwatch.runtime import load, predict_fn
from cellwatch.segmenter import Segmenter
from cellwatch.storage.imageio import find_pairs
from cellwatch.training.evaluate import evaluate, format_summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--masks", type=Path, required=True)
    parser.add_argument("--plain", type=Path, required=True, help="per-image CSV of a plain run")
    parser.add_argument("--out", type=Path, required=True, help="summary JSON (CSV beside it)")
    parser.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--no-augment: the check that this reproduces the plain run's figures",
    )
    args = parser.parse_args()
    zooms = {row["image"]: float(row["scale"]) for row in csv.DictReader(args.plain.open())}
    config = override(
        load_config(args.config),
        **{"model.path": str(args.model), "inference.augment": args.augment},
    )
    model = load(config, measuring=True)
    config = with_card_input(config, model.card)
    predict = predict_fn(model)  # augmented when the model was loaded to augment
    pairs = find_pairs(args.images, args.masks)
    order = iter([zooms[image.name] for image, _ in pairs])

    class AtPlainZoom:
        """Counts each image (in ``pairs``' order) at the plain run's zoom."""

        def segment(self, pixels: Any, pixel_size_um: float | None) -> Any:
            fixed = replace(config, scale=replace(config.scale, scale=next(order)))
            return Segmenter(fixed, model, predict).segment(pixels, pixel_size_um)

    summary, table = evaluate(pairs, AtPlainZoom(), config)  # type: ignore[arg-type]
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    table.to_csv(args.out.with_suffix(".csv"), index=False)
    print(format_summary(summary))
    print(f"accuracy@0.5 {summary['thresholds']['0.50']['accuracy']:.4f}")


if __name__ == "__main__":
    main()
