"""Before and after, in one process: the size estimate's pyramid stopped once two levels
confirm each other, and the familiarity's periodicity with counted pixel pairs.

Counts each image twice, interleaved, with one segmenter (the default config: OpenVINO
bf16 where the CPU has it): as before (every pyramid level run, the overlap of the
autocorrelation by Fourier transforms) and as now. Checks that the labels, the scale and
the familiarity are identical, and prints one JSON object with the CPU seconds
(``time.process_time``, which load from other processes inflates far less than wall
time) of each case and their ratio. Usage::

    python benchmarks/estimate_passes.py [--images DIR] [--limit 40] [--mosaic 1024]

``--mosaic SIDE`` adds a SIDE² mosaic of 256² crops of the images (as ``cellwatch
bench`` builds), 0 for none.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import tifffile
from common import DATA
from scipy import ndimage as ndi

from cellwatch import familiarity, pipeline
from cellwatch import segmenter as segmenter_module
from cellwatch.bench.inputs import crops, mosaic
from cellwatch.config import Config
from cellwatch.runtime import describe, load, resolve


def periodicity_before(image: np.ndarray) -> float | None:
    """The periodicity as it was: the overlapping pairs by Fourier transforms too."""
    image = np.asarray(image, dtype=np.float64)
    image = image - image.mean()
    h, w = image.shape
    power = np.abs(np.fft.rfft2(image, s=(2 * h, 2 * w))) ** 2
    overlap = np.abs(np.fft.rfft2(np.ones_like(image), s=(2 * h, 2 * w))) ** 2
    correlation = np.fft.fftshift(np.fft.irfft2(power, s=(2 * h, 2 * w)))
    pairs = np.fft.fftshift(np.fft.irfft2(overlap, s=(2 * h, 2 * w)))
    correlation = correlation / np.maximum(pairs, 1.0)
    if correlation[h, w] <= 0:
        return None
    correlation = correlation[h - h // 2 : h + h // 2 + 1, w - w // 2 : w + w // 2 + 1]
    correlation /= correlation[h // 2, w // 2]
    lobes, _ = ndi.label(correlation > 0)
    beyond = lobes != lobes[h // 2, w // 2]
    return float(correlation[beyond].max()) if beyond.any() else 0.0


def timed(segment: Callable[[], pipeline.Segmentation]) -> tuple[float, pipeline.Segmentation]:
    started = time.process_time()
    result = segment()
    return time.process_time() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=DATA / "val" / "images")
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--mosaic", type=int, default=1024)
    args = parser.parse_args()
    config = resolve(Config())
    model = load(config)
    segmenter = pipeline.Segmenter(config, model)
    images = [tifffile.imread(p) for p in sorted(args.images.glob("*.tif"))[: args.limit]]
    images = [i if i.ndim == 2 else i[..., 0] for i in images]
    if args.mosaic:
        images.append(mosaic(crops(256, args.images.parent.parent), args.mosaic))
    segmenter.segment(images[0])  # warm-up: the first inference is not either case's
    before = after = 0.0
    small_before = small_after = 0.0
    for k, image in enumerate(images):
        with (
            mock.patch.object(segmenter_module, "_confirmed", lambda readings: False),
            mock.patch.object(familiarity, "periodicity", periodicity_before),
        ):
            cpu_before, old = timed(lambda image=image: segmenter.segment(image))
        cpu_after, new = timed(lambda image=image: segmenter.segment(image))
        if not (np.array_equal(old.labels, new.labels) and old.scale == new.scale):
            raise SystemExit(f"image {k}: labels or scale differ")
        if old.familiarity != new.familiarity:
            raise SystemExit(f"image {k}: familiarity differs: {old.familiarity} {new.familiarity}")
        before, after = before + cpu_before, after + cpu_after
        if k < len(images) - 1 or not args.mosaic:
            small_before, small_after = small_before + cpu_before, small_after + cpu_after
    print(
        json.dumps(
            {
                "network": describe(model),
                "images": len(images),
                "mosaic_side": args.mosaic or None,
                "identical": True,
                "cpu_s_before": round(before, 2),
                "cpu_s_after": round(after, 2),
                "ratio": round(before / after, 3),
                "small_images_cpu_s_before": round(small_before, 2),
                "small_images_cpu_s_after": round(small_after, 2),
                "small_images_ratio": round(small_before / small_after, 3),
                "load_average_1min": round(os.getloadavg()[0], 1),
            }
        )
    )


if __name__ == "__main__":
    main()
