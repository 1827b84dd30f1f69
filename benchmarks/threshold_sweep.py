"""Choose the post-processing thresholds: predict every image once, then score a grid of
(interior_threshold, foreground_threshold) on the cached probabilities.

    python benchmarks/threshold_sweep.py --images DIR --masks DIR [--model PATH]

Prints accuracy at IoU 0.5 and 0.7, F1 and count MAPE per pair. This is how the defaults
in config.yaml were chosen on `val` (docs/model.md).

Each image's scale is chosen once, with the default config. In the real pipeline the
interior threshold also shapes the automatic cell-size estimate, so confirm a pair with
``cellwatch evaluate --config`` before adopting it: 0.9 / 0.8 led this sweep for the
bundled model (0.850) but scored 0.830 through the pipeline (docs/model.md).
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np

from cellwatch import imageio, matching
from cellwatch.config import Config
from cellwatch.model import load_model
from cellwatch.pipeline import Segmenter
from cellwatch.postprocess import labels_from_probabilities, tidy
from cellwatch.preprocess import normalize, rescale, resize_to
from cellwatch.scale import choose_scale
from cellwatch.targets import as_instances
from cellwatch.tiling import predict_tiled
from cellwatch.train import find_pairs

GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--masks", type=Path, required=True)
    parser.add_argument("--model", type=Path)
    args = parser.parse_args()
    config, model = Config(), load_model(args.model)
    segmenter = Segmenter(config, model)
    predict = model.predict_fn()  # one compiled function for every image
    cached = []
    for image_path, mask_path in find_pairs(args.images, args.masks):
        image = normalize(imageio.read_image(image_path).pixels)
        truth = as_instances(imageio.read_image(mask_path).pixels)
        choice = choose_scale(
            config.scale,
            model_diameter_px=model.diameter_px,
            model_pixel_size_um=model.pixel_size_um,
            image_pixel_size_um=None,
            estimate_diameter=lambda image=image: segmenter.estimate_diameter(image),
        )
        probs = predict_tiled(rescale(image, choice.scale), predict, tile=256, overlap=48)
        cached.append((truth, probs.astype(np.float16)))
    for interior, foreground in itertools.product(GRID, GRID):
        per_image, errors = [], []
        for truth, probs in cached:
            labels = labels_from_probabilities(
                probs.astype(np.float32),
                interior_threshold=interior,
                foreground_threshold=foreground,
            )
            labels = tidy(
                resize_to(labels, truth.shape, order=0), config.postprocess.min_cell_area_px
            )
            per_image.append(matching.match(truth, labels, thresholds=(0.5, 0.7)))
            n_true = len(np.unique(truth)) - 1
            errors.append(abs(int(labels.max()) - n_true) / max(n_true, 1))
        at5, at7 = matching.summarize(per_image)
        print(
            f"interior {interior:.1f} foreground {foreground:.1f}: accuracy@0.5 {at5.accuracy:.3f} "
            f"accuracy@0.7 {at7.accuracy:.3f} F1 {at5.f1:.3f} MAPE {100 * np.mean(errors):.1f} %"
        )


if __name__ == "__main__":
    main()
