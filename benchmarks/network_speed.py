"""The network alone: one tile of the default size (`tiling.tile_size`) of a real nucleus image through
the bundled model, on each runtime and precision, in one process, one after another.

Prints one JSON line per case: best and median wall milliseconds per tile over
``--repeats`` calls, megapixels per second from the best, and the process CPU seconds
per tile (all threads; on a machine shared with other work, CPU time says more than
wall time about what the network costs). Cases run interleaved, so a change in the
machine's load falls on all of them alike.

Usage::

    python benchmarks/network_speed.py [--repeats 8] [--image ../shared/data/.../x.tif]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import tifffile

from cellwatch.config import Config, override
from cellwatch.preprocess import Normalization
from cellwatch.runtime import load, predict_fn

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "images" / "a65bbfc5673e.tif"
CASES = (("keras", "f32"), ("openvino", "f32"), ("openvino", "bf16"), ("openvino", "int8"))


def tile_of(path: Path, side: int) -> np.ndarray:
    """A ``side``² normalized tile: the image reflected to size."""
    raw = tifffile.imread(path)
    image = Normalization.of(raw).apply(raw)
    reps = (-(-side // image.shape[0]), -(-side // image.shape[1]))
    full = np.block([[image, image[:, ::-1]], [image[::-1], image[::-1, ::-1]]])
    full = np.tile(full, reps)[:side, :side]
    return np.ascontiguousarray(full, dtype=np.float32)[None, ..., None]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--image", type=Path, default=SAMPLE)
    args = parser.parse_args(argv)
    side = Config().tiling.tile_size
    batch = tile_of(args.image, side)
    fns = {}
    for runtime, precision in CASES:
        config = override(
            Config(), **{"inference.runtime": runtime, "inference.precision": precision}
        )
        fn = predict_fn(load(config, measuring=True))  # int8 even where not offered
        fn(batch)  # compile, trace
        fns[f"{runtime} {precision}"] = fn
    walls: dict[str, list[float]] = {name: [] for name in fns}
    cpus: dict[str, list[float]] = {name: [] for name in fns}
    outputs = {}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            outputs[name] = fn(batch)
            walls[name].append(time.perf_counter() - t0)
            cpus[name].append(time.process_time() - c0)
    reference = outputs["keras f32"]
    for name in fns:
        best = min(walls[name])
        same = (outputs[name].argmax(-1) == reference.argmax(-1)).mean()
        print(json.dumps({
            "case": name,
            "tile_px": side,
            "best_ms": round(1000 * best, 1),
            "median_ms": round(1000 * float(np.median(walls[name])), 1),
            "mp_per_s": round(side * side / 1e6 / best, 2),
            "cpu_s_per_tile": round(float(np.median(cpus[name])), 3),
            "max_diff_vs_keras": float(np.abs(outputs[name] - reference).max()),
            "argmax_equal_share": round(float(same), 6),
        }))  # fmt: skip
    print(json.dumps({"cores": os.cpu_count(), "load_average": os.getloadavg()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
