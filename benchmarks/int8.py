"""Can int8 count as well as f32? NNCF post-training quantization of the bundled model,
calibrated on ``train`` images, scored on ``val`` against the same pipeline at f32.

Calibration data are the very tiles the pipeline gives the network (normalized, zoomed
to the working diameter, with their margins), recorded while f32 OpenVINO segments
``--calibration`` train images. Variants: NNCF's defaults; the first and last
convolutions kept in f32; and both with ``preset=mixed`` (asymmetric activations).

Usage::

    python benchmarks/int8.py --train ../shared/data/dsb2018-fluo/train \\
        --images ../shared/data/dsb2018-fluo/val/images --masks ../shared/data/dsb2018-fluo/val/masks

Prints one JSON line per variant (accuracy@0.5 and its loss against f32, the share of
val cells f32 finds that int8 finds at IoU >= 0.99) and a last line with the f32 figures.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]

from common import dataset_parser  # noqa: E402

from cellwatch.config import Config, override  # noqa: E402
from cellwatch.model import BUNDLED_MODEL  # noqa: E402
from cellwatch.pipeline import Segmenter, read  # noqa: E402
from cellwatch.runtime import cached_ir, default_cache_dir, load  # noqa: E402
from cellwatch.storage.imageio import find_pairs  # noqa: E402
from cellwatch.training.evaluate import evaluate  # noqa: E402


def calibration_tiles(segmenter: Segmenter, images: list[Path], config: Config) -> list[Any]:
    """The batches the network is given while ``segmenter`` counts ``images``."""
    seen: list[np.ndarray] = []
    predict = segmenter.predict_batch

    def recording(batch: np.ndarray) -> np.ndarray:
        seen.append(np.array(batch, dtype=np.float32))
        return predict(batch)

    recorder = Segmenter(config, segmenter.model, predict_batch=recording)
    for path in images:
        recorder.segment(read(path, config).pixels)
    return seen


def main(argv: list[str]) -> int:
    parser = dataset_parser(__doc__ or "")
    parser.add_argument("--train", type=Path, required=True, help="train folder (images/)")
    parser.add_argument("--calibration", type=int, default=60, help="train images to calibrate on")
    parser.add_argument("--variants", default="", help="comma-separated names (default: all)")
    args = parser.parse_args(argv)
    import nncf
    import openvino as ov

    config = override(Config(), **{"inference.runtime": "openvino", "inference.precision": "f32"})
    f32 = load(config)
    segmenter = Segmenter(config, f32)
    train = sorted((args.train / "images").glob("*"))
    step = max(1, len(train) // args.calibration)
    started = time.perf_counter()
    tiles = calibration_tiles(segmenter, train[::step][: args.calibration], config)
    print(f"# {len(tiles)} calibration tiles in {time.perf_counter() - started:.0f} s",
          file=sys.stderr)  # fmt: skip
    pairs = find_pairs(args.images, args.masks)[:: args.every]
    reference, _ = evaluate(pairs, segmenter, config)
    f32_acc = reference["thresholds"]["0.50"]["accuracy"]

    folder, _ = cached_ir(BUNDLED_MODEL, "f32", default_cache_dir())
    core = ov.Core()
    ir = core.read_model(folder / "model.xml")
    convs = [
        op.get_friendly_name()
        for op in ir.get_ordered_ops()
        if op.get_type_name() in ("Convolution", "ConvolutionBackpropData")
    ]
    variants: dict[str, dict[str, Any]] = {
        "default": {},
        "first+last f32": {"ignored_scope": nncf.IgnoredScope(names=[convs[0], convs[-1]])},
        "mixed, first+last f32": {
            "preset": nncf.QuantizationPreset.MIXED,
            "ignored_scope": nncf.IgnoredScope(names=[convs[0], convs[-1]]),
        },
    }
    chosen = set(filter(None, args.variants.split(","))) or set(variants)
    for name, options in variants.items():
        if name not in chosen:
            continue
        started = time.perf_counter()
        quantized = nncf.quantize(ir, nncf.Dataset(tiles), subset_size=len(tiles), **options)
        compiled = core.compile_model(quantized, "CPU")
        request = compiled.create_infer_request()

        def predict(batch: np.ndarray, request: Any = request) -> np.ndarray:
            return np.array(request.infer({0: batch})[0], dtype=np.float32)

        took = time.perf_counter() - started
        summary, _ = evaluate(pairs, Segmenter(config, f32, predict_batch=predict), config)
        acc = summary["thresholds"]["0.50"]["accuracy"]
        print(json.dumps({
            "variant": name,
            "accuracy_0.5": round(acc, 4),
            "loss_vs_f32": round(f32_acc - acc, 4),
            "count_mape_percent": round(summary["count_mape_percent"], 2),
            "quantize_s": round(took, 1),
            "images": len(pairs),
            "calibration_tiles": len(tiles),
        }), flush=True)  # fmt: skip
    print(json.dumps({"variant": "f32", "accuracy_0.5": round(f32_acc, 4),
                      "count_mape_percent": round(reference["count_mape_percent"], 2)}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
