"""Score every image of a set at a grid of fixed zooms, and record the size estimate's
first passes: the raw material to study the automatic size estimate offline.

For each image it writes, to one JSON file:

* the true nuclei's median diameter (the masks'), and their count;
* each pyramid level's objects (equivalent diameters, all and without those cut by the
  border), so that other readings, quantiles or agreement rules can be tried without the
  network;
* at each zoom of ``--grid``: the objects the estimate's refining pass would see there,
  and the counting's result (true positives, false positives and negatives at IoU 0.5,
  cells found).

Any rule that picks a zoom per image can then be scored by looking up the grid's nearest
zoom (``benchmarks/scale_rules.py``); the best zoom per image gives the ceiling a perfect
size estimate would reach.

    python benchmarks/scale_grid.py --model /tmp/teach-he/he.keras \
        --config /tmp/teach-he/config.yaml --images DIR/images --masks DIR/masks --out grid.json

Costly: the grid's passes add up to about 17 passes of the image at its own scale.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from skimage.segmentation import clear_border

from cellwatch.config import load_config, override, with_card_input
from cellwatch.pipeline import read
from cellwatch.postprocess import tidy
from cellwatch.preprocess import Normalization
from cellwatch.runtime import load, resolve
from cellwatch.segmenter import Segmenter, _min_area
from cellwatch.storage import imageio
from cellwatch.storage.imageio import find_pairs
from cellwatch.training import matching
from cellwatch.training.targets import as_instances, median_diameter

GRID = tuple(round(2 ** (k / 3), 4) for k in range(-7, 5))  # 0.198 … 2.52


def diameters(labels: np.ndarray) -> list[float]:
    """Equivalent diameters of the objects in ``labels``, in label order."""
    areas = np.bincount(labels.reshape(-1))[1:]
    return [round(float(d), 2) for d in np.sqrt(4 * areas[areas > 0] / math.pi)]


def objects(labels: np.ndarray) -> dict[str, list[float]]:
    """The objects' diameters, all and those not cut by the border."""
    return {"all": diameters(labels), "inner": diameters(clear_border(labels))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--masks", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--grid", type=float, nargs="+", default=list(GRID))
    args = parser.parse_args()
    config = override(load_config(args.config), **{"model.path": str(args.model)})
    config = resolve(config, measuring=True)  # as cellwatch evaluate runs
    model = load(config, measuring=True)
    config = with_card_input(config, model.card)
    segmenter = Segmenter(config, model)
    norm = config.normalize
    images: list[dict[str, Any]] = []
    for image_path, mask_path in find_pairs(args.images, args.masks):
        started = time.perf_counter()
        pixels = read(image_path, config).pixels
        truth = as_instances(imageio.read_image(mask_path).pixels)
        normalization = Normalization.of(pixels, norm.low_percentile, norm.high_percentile)
        pyramid = {
            str(level): objects(labelled[0])
            for level, labelled in segmenter._pyramid_labels(pixels, normalization)
        }
        automatic = segmenter.segment(pixels).scale
        grid = {}
        for scale in args.grid:
            labels, _ = segmenter._labelled(pixels, scale, normalization)
            seen = objects(labels)  # what a refining pass at this zoom labels (before tidy)
            labels = tidy(labels, _min_area(config, scale), out=labels)
            at = {round(c.threshold, 2): c for c in matching.match(truth, labels)}[0.5]
            grid[str(scale)] = {
                "refine": seen,
                "tp": at.tp,
                "fp": at.fp,
                "fn": at.fn,
                "count": int(labels.max()),
            }
        images.append(
            {
                "image": image_path.name,
                "true_count": int(len(np.unique(truth)) - (truth == 0).any()),
                "true_diameter_px": median_diameter(truth),
                "true_diameters": diameters(truth),
                "shape": list(pixels.shape),
                "automatic": {
                    "scale": automatic.scale,
                    "diameter_px": automatic.diameter_px,
                    "source": automatic.source,
                },
                "pyramid": pyramid,
                "grid": grid,
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
        print(
            f"{image_path.name}: true {images[-1]['true_diameter_px']:.1f} px, estimated "
            f"{automatic.diameter_px} px, {images[-1]['seconds']} s",
            flush=True,
        )
        args.out.write_text(
            json.dumps({"model": str(args.model), "grid": args.grid, "images": images}) + "\n"
        )


if __name__ == "__main__":
    main()
