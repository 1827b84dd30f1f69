"""Throughput of the whole pipeline on a GPU, in float32 and mixed precision.

Keras 3 runs the same ``.keras`` model on its JAX or PyTorch backend where TensorFlow is
not installed (``KERAS_BACKEND=jax``). For each workload of ``cellwatch bench`` (a 16-bit
mosaic, a burst of small images) and each precision, this prints end-to-end megapixels per
second, the share of wall time the network's batches take, and the share of time the GPU
is busy (``nvidia-smi`` utilisation sampled every 100 ms while the workload runs).

Usage::

    KERAS_BACKEND=jax python benchmarks/gpu.py --data ../shared/data/dsb2018-fluo \\
        --json gpu.json [--model M.keras] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from common import DATA

from cellwatch.bench.inputs import QUICK, Sizes, make_inputs
from cellwatch.bench.workloads import run_workload
from cellwatch.model import BUNDLED_MODEL, build_unet


def mixed_precision_copy(path: Path, out: Path) -> Path:
    """``path``'s U-Net rebuilt with the ``mixed_bfloat16`` policy, same weights."""
    import keras

    card = json.loads(path.with_suffix(".json").read_text())
    settings = card["settings"]
    network = keras.saving.load_model(path, compile=False)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        mixed = build_unet(settings["depth"], settings["filters"], len(card["classes"]))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    mixed.set_weights(network.get_weights())
    mixed.save(out)
    shutil.copy(path.with_suffix(".json"), out.with_suffix(".json"))
    return out


class GpuBusy:
    """Mean ``utilization.gpu`` while the ``with`` block runs (None without nvidia-smi)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.share: float | None = None

    def __enter__(self) -> GpuBusy:
        if shutil.which("nvidia-smi") is None:
            return self
        query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        self.process = subprocess.Popen([*query, "-lms", "100"], stdout=subprocess.PIPE, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        return self

    def _read(self) -> None:
        for line in self.process.stdout:  # type: ignore[union-attr]
            if line.strip().isdigit():
                self.samples.append(float(line))

    def __exit__(self, *exc: object) -> None:
        if hasattr(self, "process"):
            self.process.terminate()
            self.process.wait()
            self.reader.join(timeout=2)
            if self.samples:
                self.share = round(sum(self.samples) / len(self.samples) / 100, 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true", help="tiny workloads: a smoke test")
    args = parser.parse_args()
    import keras

    work = Path(tempfile.mkdtemp(prefix="cellwatch-gpu-"))
    sizes = QUICK if args.quick else Sizes(big=Sizes.small)  # no 8192²
    data = make_inputs(work / "inputs", sizes, args.data)
    models = {
        "float32": args.model,
        "mixed_bfloat16": mixed_precision_copy(args.model, work / "mixed.keras"),
    }
    results: dict[str, Any] = {"backend": keras.backend.backend(), "inputs": data["source"]}
    for precision, model in models.items():
        for workload, paths in (("mosaic", [data["mosaic"]]), ("burst", data["burst"])):
            # a first pass compiles the network for the batch shape; the second is timed
            run_workload(model, paths[:8], work / "warm", batch_size=args.batch_size, shared=True)
            with GpuBusy() as busy:
                r = run_workload(
                    model, paths, work / f"{workload}-{precision}",
                    batch_size=args.batch_size, shared=True,
                )  # fmt: skip
            r["gpu_busy_share"] = busy.share
            results[f"{workload}/{precision}"] = r
            print(
                f"{workload:7s} {precision:15s} {r['mp_per_s']:7.2f} MP/s  "
                f"network busy {r['network_busy_share']:.0%}  GPU busy {busy.share}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
