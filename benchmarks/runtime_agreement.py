"""Does OpenVINO count what Keras counts? Every image of a folder through the whole
pipeline (default config) with the Keras runtime and with OpenVINO at each precision;
the cells of the Keras labels matched in the OpenVINO labels at IoU >= 0.99.

Usage::

    python benchmarks/runtime_agreement.py --images ../shared/data/dsb2018-fluo/val/images

Prints one JSON line per precision: images whose labels are identical, cells matched at
IoU >= 0.99 (of the Keras cells), cells missed or added, and the worst image.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from cellwatch.config import Config, override
from cellwatch.pipeline import Segmenter, read
from cellwatch.runtime import load
from cellwatch.training import matching


def segmenter(runtime: str, precision: str, model: Path | None) -> Segmenter:
    settings = {"inference.runtime": runtime, "inference.precision": precision}
    if model is not None:
        settings["model.path"] = str(model)
    config = override(Config(), **settings)
    return Segmenter(config, load(config))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--model", type=Path, help="model file (default: the bundled model)")
    parser.add_argument("--precisions", default="f32,bf16", help="OpenVINO precisions to compare")
    parser.add_argument("--every", type=int, default=1, help="use every N-th image")
    args = parser.parse_args(argv)
    paths = sorted(p for p in args.images.iterdir() if p.is_file())[:: args.every]
    reference = segmenter("keras", "f32", args.model)
    others = {p: segmenter("openvino", p, args.model) for p in args.precisions.split(",")}
    tally = {p: {"identical": 0, "cells": 0, "matched": 0, "missed": 0, "added": 0} for p in others}
    worst = {p: (1.0, "") for p in others}
    for path in paths:
        pixels = read(path, reference.config).pixels
        expected = reference.segment(pixels).labels
        for precision, seg in others.items():
            got = seg.segment(pixels).labels
            t = tally[precision]
            t["cells"] += int(expected.max())
            if np.array_equal(got, expected):
                t["identical"] += 1
                t["matched"] += int(expected.max())
                continue
            at = matching.match(expected, got, thresholds=(0.99,))[0]
            t["matched"] += at.tp
            t["missed"] += at.fn
            t["added"] += at.fp
            share = at.tp / max(1, int(expected.max()))
            if share < worst[precision][0]:
                worst[precision] = (share, path.name)
    for precision, t in tally.items():
        print(json.dumps({
            "precision": precision,
            "images": len(paths),
            **t,
            "matched_share": round(t["matched"] / max(1, t["cells"]), 5),
            "worst_image": {"name": worst[precision][1], "matched_share": round(worst[precision][0], 4)},
        }))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
