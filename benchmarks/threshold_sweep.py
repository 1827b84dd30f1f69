"""Choose the post-processing thresholds: predict every image once, then score grids of
settings on the cached probabilities.

    python benchmarks/threshold_sweep.py --images DIR --masks DIR [--model PATH] [--every N]
        [--offset K]

Prints accuracy at IoU 0.5 and 0.7, F1 and count MAPE for each (interior_threshold,
foreground_threshold) pair, with seed splitting as config.yaml sets it; then for each
(split_threshold, split_min_area_px) pair at the configured interior and foreground
thresholds (split_threshold 1: no splitting). This is how the defaults in config.yaml
were chosen on `val` and checked on `train` (`--every 4`: a quarter of its images;
``--offset K`` picks which quarter, so ``--every 4 --offset 0`` … ``3`` are four folds),
docs/model.md.

For a model with a seed head (four output channels) it first scores the model's three
classes alone with the configured three-class settings, then each (distance_threshold,
foreground_threshold) pair (seeds: the inner distance above the first, no splitting), then
each (distance_split_threshold, split_min_area_px) pair at the best of those, and prints the
best setting last.

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
DISTANCE_GRID = (0.3, 0.4, 0.5, 0.6, 0.7)
DISTANCE_SPLITS = (0.7, 0.8, 0.9, 1.0)

Cached = list[tuple[np.ndarray, np.ndarray]]  # (true labels, float16 probabilities)


def main() -> None:
    parser = dataset_parser(__doc__)
    parser.add_argument("--offset", type=int, default=0, help="start at this pair (a fold)")
    args = parser.parse_args()
    config = Config()
    pairs = find_pairs(args.images, args.masks)[args.offset :: args.every]
    cached = predict_all(pairs, config, args.model)
    p = config.postprocess
    print(f"{len(cached)} images", flush=True)
    if cached and cached[0][1].shape[-1] == 4:
        sweep_seed_head(cached, config)
        return
    for interior, foreground in itertools.product(GRID, GRID):
        split = p.split_threshold if p.split_threshold > interior else 1.0
        figures, _ = score(cached, config, interior, foreground, split, p.split_min_area_px)
        print(f"interior {interior:.1f} foreground {foreground:.1f}: {figures}")
    for split, area in itertools.product(SPLIT_THRESHOLDS, SPLIT_AREAS):
        figures, _ = score(
            cached, config, p.interior_threshold, p.foreground_threshold, split, area
        )
        print(f"split {split:.2f} min area {area}: {figures}")


def sweep_seed_head(cached: Cached, config: Config) -> None:
    """The seed head's sweep (four-channel probabilities), printed line by line."""
    p = config.postprocess
    classes = [(truth, probs[..., :3]) for truth, probs in cached]
    figures = score(
        classes,
        config,
        p.interior_threshold,
        p.foreground_threshold,
        p.split_threshold,
        p.split_min_area_px,
    )
    print(f"three classes alone, configured settings: {figures[0]}", flush=True)
    results = []
    for distance, foreground in itertools.product(DISTANCE_GRID, GRID):
        figures = score(cached, config, 0.5, foreground, 1.0, 0, distance=distance)
        results.append((figures[1], distance, foreground, 1.0, 0))
        print(f"distance {distance:.1f} foreground {foreground:.1f}: {figures[0]}", flush=True)
    _, distance, foreground, _, _ = max(results)
    for split, area in itertools.product(DISTANCE_SPLITS, SPLIT_AREAS):
        if split <= distance:
            continue
        figures = score(cached, config, 0.5, foreground, split, area, distance=distance)
        results.append((figures[1], distance, foreground, split, area))
        print(
            f"distance {distance:.1f} foreground {foreground:.1f} "
            f"split {split:.2f} min area {area}: {figures[0]}",
            flush=True,
        )
    accuracy, distance, foreground, split, area = max(results)
    print(
        f"best: distance_threshold {distance} foreground_threshold {foreground} "
        f"distance_split_threshold {split} split_min_area_px {area} (accuracy@0.5 {accuracy:.3f})"
    )


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
    *,
    distance: float = 0.5,
) -> tuple[str, float]:
    """Accuracy at IoU 0.5 and 0.7, F1 and count MAPE with these settings, as a line and
    accuracy@0.5 alone. For four-channel probabilities ``split`` is the
    ``distance_split_threshold`` and ``interior`` is not used."""
    per_image, true_counts, pred_counts = [], [], []
    for truth, probs in cached:
        seed_head = probs.shape[-1] == 4
        labels = labels_from_probabilities(
            probs.astype(np.float32),
            interior_threshold=interior,
            foreground_threshold=foreground,
            split_threshold=None if seed_head else split,
            split_min_area=split_area,
            distance_threshold=distance,
            distance_split_threshold=split if seed_head else None,
        )
        labels = tidy(resize_to(labels, truth.shape, order=0), config.postprocess.min_cell_area_px)
        per_image.append(matching.match(truth, labels, thresholds=(0.5, 0.7)))
        true_counts.append(len(np.unique(truth)) - 1)
        pred_counts.append(int(labels.max()))
    at5, at7 = matching.summarize(per_image)
    line = (
        f"accuracy@0.5 {at5.accuracy:.3f} accuracy@0.7 {at7.accuracy:.3f} F1 {at5.f1:.3f} "
        f"MAPE {matching.count_errors(true_counts, pred_counts)['mape']:.1f} %"
    )
    return line, float(at5.accuracy)


if __name__ == "__main__":
    main()
