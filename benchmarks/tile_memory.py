"""The network's working memory per tile pixel, what :data:`cellwatch.tiling.TILE_BYTES_PER_PX`
models: the bundled model loaded as ``predict`` loads it, one tile predicted twice, and the
growth of the process's resident memory over what it held before the first tile.

Each precision runs in a fresh process (memory a runtime has taken is not given back).

Usage::

    python benchmarks/tile_memory.py [--side 1536] [--precisions bf16,f32,int8]

Prints one JSON line per precision.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

from cellwatch.config import Config, override
from cellwatch.runtime import load, predict_fn


def resident_mb() -> float:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def one(precision: str, side: int) -> dict[str, object]:
    config = override(Config(), **{"inference.precision": precision})
    predict = predict_fn(load(config, measuring=True))  # int8 even where not offered
    tile = np.random.default_rng(0).random((1, side, side, 1), dtype=np.float32)
    before = resident_mb()
    predict(tile)
    predict(tile)
    grown = resident_mb() - before
    return {
        "precision": precision,
        "tile_px": side,
        "grown_mb": round(grown, 1),
        "bytes_per_tile_px": round(grown * 1e6 / side**2),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--side", type=int, default=1536)
    parser.add_argument("--precisions", default="bf16,f32,int8")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process's precision
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.side)))
        return 0
    for precision in args.precisions.split(","):
        child = [sys.executable, __file__, "--one", precision, "--side", str(args.side)]
        subprocess.run(child, check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
