"""Where the network's time goes on the CPU, layer type by layer type, with and without
the graph rewrites of :mod:`cellwatch.ov_graph` (OpenVINO's own per-layer counters).

One tile of a real nucleus image (``--side``, default the 1,456 px tiles a 4096² image
gets) through the bundled model as ``predict`` compiles it, and through the same IR
compiled as converted. The two take turns; wall time per tile is the best and median of
``--repeats`` calls, the layer times are OpenVINO's counters of the last call. Prints one
JSON line per case and a last line comparing their outputs, with the network's
multiply-adds per pixel (counted from the graph) and the rate of its convolutions.

Usage::

    python benchmarks/network_layers.py [--precision bf16] [--side 1456] [--repeats 8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from network_speed import SAMPLE, tile_of

from cellwatch import ov_graph
from cellwatch.config import Config
from cellwatch.model import BUNDLED_MODEL
from cellwatch.runtime import OV_PRECISION_HINT, cached_ir, default_cache_dir


def compiled(precision: str, rewrite: bool) -> Any:
    import openvino as ov

    folder, _ = cached_ir(BUNDLED_MODEL, precision, default_cache_dir())
    core = ov.Core()
    network = core.read_model(folder / "model.xml")
    if rewrite:
        ov_graph.faster(network, ov.opset13)
    properties = {"INFERENCE_PRECISION_HINT": OV_PRECISION_HINT[precision], "PERF_COUNT": True}
    return core.compile_model(network, "CPU", properties).create_infer_request()


def multiply_adds_per_px(side: int) -> float:
    """The network's multiply-adds per input pixel, counted from its (converted) graph."""
    import openvino as ov

    folder, _ = cached_ir(BUNDLED_MODEL, "f32", default_cache_dir())
    network = ov.Core().read_model(folder / "model.xml")
    network.reshape({0: [1, side, side, 1]})
    total = 0
    for node in network.get_ordered_ops():
        kind = node.get_type_name()
        if kind in ("Convolution", "ConvolutionBackpropData"):
            kernel = node.input_value(1).get_shape()
            # a convolution's work goes with its output pixels, a transposed one's with its input's
            at = (
                node.get_output_shape(0)
                if kind == "Convolution"
                else node.input_value(0).get_shape()
            )
            total += at[2] * at[3] * int(np.prod(kernel))
    return total / side**2


def layer_ms(request: Any) -> dict[str, float]:
    by_type: Counter[str] = Counter()
    for layer in request.get_profiling_info():
        by_type[f"{layer.node_type} ({layer.exec_type})"] += layer.real_time.total_seconds() * 1e3
    return {name: round(ms, 1) for name, ms in by_type.most_common() if ms >= 0.5}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--precision", default="bf16", choices=("f32", "bf16"))
    parser.add_argument("--side", type=int, default=1456)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--image", type=Path, default=SAMPLE)
    args = parser.parse_args(argv)
    Config()  # the defaults load: the same cache as predict
    batch = tile_of(args.image, args.side)
    cases = {"as converted": compiled(args.precision, False)}
    cases["rewritten (predict)"] = compiled(args.precision, True)
    walls: dict[str, list[float]] = {name: [] for name in cases}
    outputs = {name: np.array(request.infer({0: batch})[0]) for name, request in cases.items()}
    for _ in range(args.repeats):
        for name, request in cases.items():
            start = time.perf_counter()
            request.infer({0: batch})
            walls[name].append(time.perf_counter() - start)
    for name, request in cases.items():
        best = min(walls[name])
        layers = layer_ms(request)
        print(json.dumps({
            "case": name,
            "precision": args.precision,
            "tile_px": args.side,
            "best_ms": round(1000 * best, 1),
            "median_ms": round(1000 * float(np.median(walls[name])), 1),
            "mp_per_s": round(args.side**2 / 1e6 / best, 2),
            "layers_ms": layers,
            "layers_total_ms": round(sum(layers.values()), 1),
        }))  # fmt: skip
    first, second = outputs.values()
    macs = multiply_adds_per_px(args.side)
    conv_ms = sum(
        ms for name, ms in layer_ms(cases["rewritten (predict)"]).items() if "Convolution" in name
    )
    print(json.dumps({
        "multiply_adds_per_px": macs,
        "gflop_per_tile": round(2 * macs * args.side**2 / 1e9, 1),
        "convolutions_gflop_per_s (rewritten)": round(2 * macs * args.side**2 / 1e6 / conv_ms, 1),
        "max_diff": float(np.abs(first - second).max()),
        "argmax_equal_share": round(float((first.argmax(-1) == second.argmax(-1)).mean()), 6),
        "cores": os.cpu_count(),
        "load_average": os.getloadavg(),
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
