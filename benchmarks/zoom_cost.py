"""CPU time of zooming an image by tiles against zooming it whole, one thread.

What the pipeline does around the network for a zoomed image, without the network:

* whole (before issue 16): normalize the whole image to float32, zoom it with
  scikit-image's ``resize``, cut every tile from it, and shrink a label image of the zoomed
  size back to the image's own size;
* tiles (since): zoom each tile from the pixels it needs as it is cut
  (:class:`cellwatch.preprocess.ZoomedSource`) and resample each output tile straight onto
  the image's own grid (:class:`cellwatch.preprocess.OwnGridStitcher`); the tile itself,
  NaN where it is dark, stands in for the network's masked-interior output.

The two alternate, so a machine shared with other work slows both alike; the best of the
repeats is reported. Usage::

    python benchmarks/zoom_cost.py [--side 2048] [--scale 1.94] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import time

import numpy as np
from common import DATA

from cellwatch.bench.inputs import crops, mosaic
from cellwatch.preprocess import (
    Normalization,
    ZoomedSource,
    own_grid_stitcher,
    rescale,
    resize_to,
)
from cellwatch.tiling import TileGrid

TILE, OVERLAP, BATCH = 256, 48, 8


def whole(image: np.ndarray, norm: Normalization, scale: float) -> None:
    zoomed = rescale(norm.apply(image), scale)
    grid = TileGrid.for_shape(zoomed.shape, TILE, OVERLAP)
    for i in range(0, len(grid), BATCH):
        grid.cut(zoomed, np.arange(i, min(i + BATCH, len(grid))))
    labels = np.zeros(zoomed.shape, np.int32)  # what labelling the zoomed output gave
    resize_to(labels, image.shape, order=0)


def tiles(image: np.ndarray, norm: Normalization, scale: float) -> None:
    source = ZoomedSource(image, scale, norm)
    grid = TileGrid.for_shape(source.shape, TILE, OVERLAP)
    stitcher = own_grid_stitcher(image.shape)(grid, 1)
    for index in range(len(grid)):
        tile = grid.cut(source, np.array([index]))[0]
        # A masked-interior plane stands in for the network's output: NaN off the cells.
        stitcher.add(index, np.where(tile > 0.3, tile, np.float32(np.nan))[..., None])
    stitcher.result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=2048)
    parser.add_argument("--scale", type=float, default=1.94)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    image = mosaic(crops(256, DATA), args.side)
    norm = Normalization.of(image)
    seconds: dict[str, list[float]] = {"whole": [], "tiles": []}
    for _ in range(args.repeats):
        for name, fn in (("whole", whole), ("tiles", tiles)):
            started = time.process_time()
            fn(image, norm, args.scale)
            seconds[name].append(round(time.process_time() - started, 3))
    n_tiles = len(TileGrid.for_shape(ZoomedSource(image, args.scale).shape, TILE, OVERLAP))
    best = {name: min(values) for name, values in seconds.items()}
    print(
        json.dumps(
            {
                "side": args.side,
                "scale": args.scale,
                "tiles": n_tiles,
                "cpu_s": seconds,
                "tiles_minus_whole_ms_per_tile": round(
                    (best["tiles"] - best["whole"]) / n_tiles * 1e3, 3
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
