"""What exact tiling costs: tiled against whole-image prediction, and the network stage's
speed, for tilings old and new, on real nuclei.

    python benchmarks/tiling.py [--repeats 3] [--mosaic 2048] [--burst 64] [--no-agreement]
                                [--settings 256/48/1 512/auto/full 768/auto ...]

For each image (the `val` image cb4df20a83b2, 603 × 1272, and a mosaic of 256 × 256 crops of
the dsb2018-fluo images, as ``cellwatch bench`` builds it) and each tiling ``tile/overlap/
align`` (align 1 with 256/48 is the tiling before origins were put on the pooling grid;
``auto`` is ``tiling.overlap: auto`` for the bundled model, whose tiles shrink to fit the
image as the pipeline's do; ``auto/full`` keeps them ``tile`` × ``tile``, the tiling of
the first exact version), it prints:

* the network stage's speed: image megapixels ÷ the seconds ``predict_tiled`` takes
  (cutting, the network, stitching; median of ``--repeats``, the settings taking turns so
  that drift in the machine's load hits all alike), and the tile pixels the network
  computes per image pixel. Batches hold the pixels of 8 × 256² tiles (2 of 512², one of
  larger tiles), as ``tiling.batch_size`` pairs with ``tile_size`` in config.yaml;
* agreement with the network on the whole image, padded to the 16-px grid as the tiles see
  it: the share of pixels whose probabilities (every class) lie within 0.02, the largest
  difference, the share more than 0.05 apart 100 px or more from the border (the figure of
  issue 16), and the label images: identical or not, the cell counts, and the cells of the
  whole-image labels without a match at IoU 0.95 and 0.99.

With ``--burst N``, the network stage is also timed on N of the 256 × 256 crops, their
tiles sharing batches (``predict_tiled_many``), as a burst of small images meets it: each
crop is one tile at any tile size, a whole tile without ``fit``, a 256² one with it.

``--no-agreement`` times the mosaic alone (a 4096² whole-image prediction would take
several GB).

The automatic scale is off (scale 1), as in the issue.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import tifffile
from common import DATA

from cellwatch.bench.inputs import crops as nucleus_crops
from cellwatch.bench.inputs import mosaic
from cellwatch.config import Config
from cellwatch.model import load_model
from cellwatch.pipeline import Segmenter
from cellwatch.postprocess import labels_from_masked_interior
from cellwatch.preprocess import Normalization
from cellwatch.runtime import predict_fn
from cellwatch.tiling import (
    TileGrid,
    TileSettings,
    predict_tiled,
    predict_tiled_many,
    tile_settings,
)
from cellwatch.training import matching

Predict = Callable[[np.ndarray], np.ndarray]
Setting = tuple[int, int, int, bool]  # tile, overlap, align, fit
VAL_IMAGE = DATA / "val" / "images" / "cb4df20a83b2.tif"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mosaic", type=int, default=2048, help="side of the mosaic (0: none)")
    parser.add_argument("--burst", type=int, default=0, help="256² crops to time (0: none)")
    parser.add_argument(
        "--agreement",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also compare with the whole image (--no-agreement: speed only, for large mosaics)",
    )
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["256/48/1", "512/auto/full", "512/auto", "768/auto", "1024/auto"],
    )
    args = parser.parse_args()
    model = load_model()
    segmenter = Segmenter(Config(), model)
    predict = predict_fn(model)
    settings = [_setting(s, model.context_px, model.grid_px) for s in args.settings]
    for tile, *_ in settings:  # trace before timing (two traces cover every shape)
        predict(np.zeros((_batch(tile), tile, tile, 1), np.float32))
    predict(np.zeros((1, 256, 256, 1), np.float32))
    images = (
        {"cb4df20a83b2": tifffile.imread(VAL_IMAGE)} if args.agreement or not args.mosaic else {}
    )
    crops = nucleus_crops(256, DATA) if args.mosaic or args.burst else []
    if args.mosaic:
        images[f"mosaic{args.mosaic}"] = mosaic(crops, args.mosaic)
    print(json.dumps({"context_px": model.context_px, "grid_px": model.grid_px}))
    if args.burst:
        burst = [Normalization.of(c).apply(c) for c in crops[: args.burst]]
        seconds = _median_seconds(
            lambda s: list(predict_tiled_many(burst, predict, **_kwargs(s))), settings, args
        )
        pixels = sum(c.size for c in burst)
        for s in settings:
            row = {"image": f"burst of {len(burst)} × 256²", "tile/overlap/align": s}
            network = sum(_network_px(c.shape, s) for c in burst)
            row |= {"batch_size": _batch(s[0]), "network_px_per_px": round(network / pixels, 2)}
            row |= {
                "seconds": round(seconds[s], 3),
                "mp_per_s": round(pixels / 1e6 / seconds[s], 3),
            }
            print(json.dumps(row), flush=True)
    for name, raw in images.items():
        image = Normalization.of(raw).apply(raw)
        seconds = _median_seconds(
            lambda s, image=image: predict_tiled(image, predict, **_kwargs(s)), settings, args
        )
        whole = _whole(image, segmenter, predict) if args.agreement else None
        for s in settings:
            row = {"image": name, "shape": list(image.shape), "tile/overlap/align": s}
            row.update(_speed(image, s, seconds[s]))
            if whole is not None:
                row.update(_agreement(image, s, segmenter, predict, *whole))
            print(json.dumps(row), flush=True)


def _setting(text: str, context: int | None, grid: int) -> Setting:
    tile, overlap, *rest = text.split("/")
    if overlap == "auto":
        t = tile_settings(int(tile), "auto", context_px=context, grid_px=grid)
        return t.tile, t.overlap, t.align, t.fit and rest != ["full"]
    return int(tile), int(overlap), int(rest[0]) if rest else grid, False


def _network_px(shape: tuple[int, ...], s: Setting) -> int:
    grid = TileGrid.for_shape(shape, s[0], s[1], s[2], fit=s[3])
    return len(grid) * grid.tile_shape[0] * grid.tile_shape[1]


def _median_seconds(
    run: Callable[[Setting], object], settings: list[Setting], args: argparse.Namespace
) -> dict[Setting, float]:
    """Median seconds of ``run`` per setting, the settings taking turns."""
    seconds: dict[Setting, list[float]] = {s: [] for s in settings}
    for _ in range(args.repeats):
        for s in settings:
            start = time.perf_counter()
            run(s)
            seconds[s].append(time.perf_counter() - start)
    return {s: statistics.median(t) for s, t in seconds.items()}


def _kwargs(s: Setting) -> dict[str, TileSettings | int]:
    return {"settings": TileSettings(*s), "batch_size": _batch(s[0])}


def _batch(tile: int) -> int:
    return max(1, 8 * 256**2 // tile**2)


def _whole(image: np.ndarray, segmenter: Segmenter, predict: Predict) -> tuple[np.ndarray, ...]:
    """The network's probabilities and labels on the whole image, padded to the grid."""
    h, w = image.shape
    canvas = np.pad(image, [(0, -h % 16), (0, -w % 16)], mode="reflect")[None, ..., None]
    probs = predict(canvas)[0, :h, :w]
    return probs, _labels(segmenter.predict_plane(canvas)[0, :h, :w, 0], segmenter)


def _labels(plane: np.ndarray, segmenter: Segmenter) -> np.ndarray:
    p = segmenter.config.postprocess
    return labels_from_masked_interior(
        plane,
        interior_threshold=p.interior_threshold,
        split_threshold=p.split_threshold,
        split_min_area=p.split_min_area_px,
    )


def _speed(image: np.ndarray, s: Setting, seconds: float) -> dict[str, float]:
    grid = TileGrid.for_shape(image.shape, s[0], s[1], s[2], fit=s[3])
    return {
        "batch_size": _batch(s[0]),
        "tiles": len(grid),
        "tile_shape": list(grid.tile_shape),
        "network_px_per_px": round(_network_px(image.shape, s) / image.size, 2),
        "seconds": round(seconds, 3),
        "mp_per_s": round(image.size / 1e6 / seconds, 3),
    }


def _agreement(
    image: np.ndarray,
    s: Setting,
    segmenter: Segmenter,
    predict: Predict,
    whole: np.ndarray,
    whole_labels: np.ndarray,
) -> dict[str, object]:
    probs = predict_tiled(image, predict, **_kwargs(s))
    labels = _labels(predict_tiled(image, segmenter.predict_plane, **_kwargs(s))[..., 0], segmenter)
    apart = np.abs(probs - whole).max(axis=-1)
    at = matching.match(whole_labels, labels, thresholds=(0.95, 0.99))
    cells = int(whole_labels.max())
    return {
        "within_0.02_percent": round(100 * float((apart <= 0.02).mean()), 3),
        "max_apart": float(f"{apart.max():.2g}"),
        "interior_over_0.05_percent": round(
            100 * float((apart[100:-100, 100:-100] > 0.05).mean()), 3
        ),
        "labels_identical": bool(np.array_equal(labels, whole_labels)),
        "cells_whole": cells,
        "cells_tiled": int(labels.max()),
        "unmatched_iou_0.95": cells - at[0].tp,
        "unmatched_iou_0.99": cells - at[1].tp,
    }


if __name__ == "__main__":
    main()
