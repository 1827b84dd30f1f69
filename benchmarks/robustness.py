"""How well the pipeline holds up on images unlike the training data: other bit depths
and intensities, noise, blur, uneven illumination, other magnifications.

    python benchmarks/robustness.py --images DIR --masks DIR [--model PATH] [--every N]
        [--only NAME ...] [--json PATH]

Each perturbation is applied to every image (and, for a zoom, to its mask), the result is
segmented by the real pipeline with the default config (automatic scale, nothing told about
the images) and scored as ``cellwatch evaluate`` scores it. One line per perturbation:
accuracy at IoU 0.5 and 0.7, F1, count MAPE, and how far the automatic diameter estimate
lies from the true median diameter. The perturbations are seeded, so runs repeat.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from common import dataset_parser
from scipy import ndimage as ndi
from skimage.transform import rescale as zoom_image

from cellwatch.config import Config
from cellwatch.model import load_model
from cellwatch.pipeline import Segmenter
from cellwatch.preprocess import percentiles
from cellwatch.storage import imageio
from cellwatch.storage.imageio import find_pairs
from cellwatch.training import matching
from cellwatch.training.targets import as_instances, median_diameter

Pair = tuple[np.ndarray, np.ndarray]  # (image, instance mask)
Perturb = Callable[[np.ndarray, np.ndarray, np.random.Generator], Pair]


def _range(pixels: np.ndarray) -> float:
    low, high = percentiles(pixels, (1.0, 99.8))
    return max(float(high - low), 1.0)


def camera_16bit(pixels: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> Pair:
    """A 16-bit camera: offset 100, 16 counts per 8-bit level, shot noise."""
    photons = rng.poisson(pixels.astype(np.float64) * 4.0)
    return (100 + 4 * photons).astype(np.uint16), mask


def dim(pixels: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> Pair:
    """A dim 8-bit exposure: a tenth of the signal, on a background of 10, rounded."""
    return np.round(10 + pixels.astype(np.float64) / 10).astype(np.uint8), mask


def low_light(peak: float) -> Perturb:
    def photon_limited(pixels: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> Pair:
        expected = 0.25 * peak + peak * pixels.astype(np.float64) / max(float(pixels.max()), 1.0)
        noisy = rng.poisson(expected) + rng.normal(0, 2, pixels.shape)
        return noisy.astype(np.float32), mask

    photon_limited.__doc__ = (
        f"Photon-limited: the brightest nuclei give {peak:g} photons a pixel on a background "
        f"of {0.25 * peak:g}, with shot noise and read noise 2 (a float32 image)."
    )
    return photon_limited


def gaussian_noise(pixels: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> Pair:
    """Additive Gaussian noise, sigma 10 % of the image's 1–99.8 percentile range."""
    noise = rng.normal(0, 0.1 * _range(pixels), pixels.shape)
    return (pixels.astype(np.float64) + noise).astype(np.float32), mask


def blur(pixels: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> Pair:
    """Out of focus: Gaussian blur, sigma 2 px."""
    return ndi.gaussian_filter(pixels.astype(np.float32), 2.0), mask


def uneven(pixels: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> Pair:
    """Uneven illumination: brightness falls from 100 % to 30 % across the image, over a
    background glow of 20 % of the range."""
    ramp = np.linspace(1.0, 0.3, pixels.shape[1])[None, :]
    glow = 0.2 * _range(pixels) * ramp
    return (pixels.astype(np.float64) * ramp + glow).astype(np.float32), mask


def zoom(factor: float) -> Perturb:
    def zoomed(pixels: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> Pair:
        image = zoom_image(pixels.astype(np.float32), factor, anti_aliasing=factor < 1)
        labels = zoom_image(mask, factor, order=0, preserve_range=True, anti_aliasing=False)
        return image.astype(np.float32), labels.astype(mask.dtype)

    zoomed.__doc__ = f"Another magnification: image and mask zoomed {factor}×."
    return zoomed


PERTURBATIONS: dict[str, Perturb] = {
    "none": lambda pixels, mask, rng: (pixels, mask),
    "16-bit camera": camera_16bit,
    "dim 8-bit": dim,
    "low light 50": low_light(50),
    "low light 20": low_light(20),
    "gaussian noise": gaussian_noise,
    "blur": blur,
    "uneven illumination": uneven,
    "zoom 0.5x": zoom(0.5),
    "zoom 2x": zoom(2.0),
}


def score(
    pairs: list[tuple[np.ndarray, np.ndarray]], segmenter: Segmenter, perturb: Perturb
) -> dict[str, float]:
    """Segment each perturbed image and score it (accuracy summed over all images)."""
    rng = np.random.default_rng(0)
    counts, true_counts, pred_counts, diameter_errors = [], [], [], []
    started = time.perf_counter()
    for pixels, mask in pairs:
        image, truth = perturb(pixels, mask, rng)
        result = segmenter.segment(image)
        counts.append(matching.match(truth, result.labels, thresholds=(0.5, 0.7)))
        true_counts.append(len(np.unique(truth)) - 1)  # a zoomed mask may skip ids
        pred_counts.append(int(result.labels.max()))
        true_diameter, estimated = median_diameter(truth), result.scale.diameter_px
        if true_diameter and estimated:
            diameter_errors.append(abs(estimated / true_diameter - 1))
    at5, at7 = matching.summarize(counts)
    return {
        "accuracy_0.5": round(at5.accuracy, 4),
        "accuracy_0.7": round(at7.accuracy, 4),
        "f1_0.5": round(at5.f1, 4),
        "count_mape_pct": round(matching.count_errors(true_counts, pred_counts)["mape"], 2),
        "diameter_error_median_pct": round(100 * float(np.median(diameter_errors)), 1),
        "diameter_within_30pct": int(np.sum(np.array(diameter_errors) <= 0.3)),
        "images": len(pairs),
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = dataset_parser(__doc__)
    parser.add_argument("--only", nargs="+", choices=sorted(PERTURBATIONS), metavar="NAME")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    config = Config()
    segmenter = Segmenter(config, load_model(args.model))
    pairs = [
        (imageio.read_image(image).pixels, as_instances(imageio.read_image(mask).pixels))
        for image, mask in find_pairs(args.images, args.masks)[:: args.every]
    ]
    results = {}
    for name in args.only or PERTURBATIONS:
        results[name] = score(pairs, segmenter, PERTURBATIONS[name])
        figures = " ".join(f"{key} {value}" for key, value in results[name].items())
        print(f"{name}: {figures}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
