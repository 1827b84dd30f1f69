"""Choose the post-processing thresholds: predict every image once, then score grids of
settings on the cached probabilities.

    python benchmarks/threshold_sweep.py --images DIR --masks DIR [--model PATH] [--every N]

Prints accuracy at IoU 0.5 and 0.7, F1 and count MAPE for each (interior_threshold,
foreground_threshold) pair, with seed splitting as config.yaml sets it; then for each
(split_threshold, split_min_area_px) pair at the configured interior and foreground
thresholds (split_threshold 1: no splitting). This is how the defaults in config.yaml
were chosen on `val` and checked on `train` (`--every 4`: a quarter of its images),
docs/model.md.

Each image's scale is chosen once, with the default config. In the real pipeline the
thresholds also shape the automatic cell-size estimate, so confirm a setting with
``cellwatch evaluate --config`` before adopting it: 0.9 / 0.8 led the first sweep for the
bundled model (0.850) but scored 0.830 through the pipeline (docs/model.md).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
from common import dataset_parser

from cellwatch.config import Config
from cellwatch.model import load_model
from cellwatch.pipeline import Segmenter
from cellwatch.postprocess import labels_from_probabilities, tidy
from cellwatch.preprocess import normalize, resize_to
from cellwatch.scale import choose_scale
from cellwatch.storage import imageio
from cellwatch.storage.imageio import find_pairs
from cellwatch.training import matching
from cellwatch.training.targets import as_instances

GRID = (0.6, 0.7, 0.8, 0.9)  # the first sweep, 0.3–0.9, found a plateau at 0.7–0.9
SPLIT_THRESHOLDS = (0.95, 0.97, 0.98, 0.99, 1.0)
SPLIT_AREAS = (30, 50, 80)

Cached = list[tuple[np.ndarray, np.ndarray]]  # (true labels, float16 probabilities)


def main() -> None:
    parser = dataset_parser(__doc__)
    args = parser.parse_args()
    config = Config()
    cached = predict_all(find_pairs(args.images, args.masks)[:: args.every], config, args.model)
    p = config.postprocess
    for interior, foreground in itertools.product(GRID, GRID):
        split = p.split_threshold if p.split_threshold > interior else 1.0
        figures = score(cached, config, interior, foreground, split, p.split_min_area_px)
        print(f"interior {interior:.1f} foreground {foreground:.1f}: {figures}")
    for split, area in itertools.product(SPLIT_THRESHOLDS, SPLIT_AREAS):
        figures = score(cached, config, p.interior_threshold, p.foreground_threshold, split, area)
        print(f"split {split:.2f} min area {area}: {figures}")


def predict_all(pairs: list[tuple[Path, Path]], config: Config, model_path: Path | None) -> Cached:
    """Each image's probabilities at the scale the default config chooses for it."""
    model = load_model(model_path)
    segmenter = Segmenter(config, model)
    cached = []
    for image_path, mask_path in pairs:
        image = normalize(imageio.read_image(image_path).pixels)
        truth = as_instances(imageio.read_image(mask_path).pixels)
        choice = choose_scale(
            config.scale,
            model_diameter_px=model.diameter_px,
            model_pixel_size_um=model.pixel_size_um,
            image_pixel_size_um=None,
            estimate_diameter=lambda image=image: segmenter.estimate_diameter(image),
        )
        probs = segmenter.probabilities(image, choice.scale, raw=True)  # as the pipeline tiles
        cached.append((truth, probs.astype(np.float16)))
    return cached


def score(
    cached: Cached,
    config: Config,
    interior: float,
    foreground: float,
    split: float,
    split_area: int,
) -> str:
    """Accuracy at IoU 0.5 and 0.7, F1 and count MAPE with these settings."""
    per_image, true_counts, pred_counts = [], [], []
    for truth, probs in cached:
        labels = labels_from_probabilities(
            probs.astype(np.float32),
            interior_threshold=interior,
            foreground_threshold=foreground,
            split_threshold=split,
            split_min_area=split_area,
        )
        labels = tidy(resize_to(labels, truth.shape, order=0), config.postprocess.min_cell_area_px)
        per_image.append(matching.match(truth, labels, thresholds=(0.5, 0.7)))
        true_counts.append(len(np.unique(truth)) - 1)
        pred_counts.append(int(labels.max()))
    at5, at7 = matching.summarize(per_image)
    return (
        f"accuracy@0.5 {at5.accuracy:.3f} accuracy@0.7 {at7.accuracy:.3f} F1 {at5.f1:.3f} "
        f"MAPE {matching.count_errors(true_counts, pred_counts)['mape']:.1f} %"
    )


if __name__ == "__main__":
    main()
