"""cellwatch on one GPU box: 1, 4, 8 and 14 Dask worker processes sharing one GPU.

For each number of worker processes (all on GPU 0, ``compute.gpu_sharing: shared``, each
allowed its share of the GPU's memory), and for today's in-process path as the baseline,
this measures end-to-end megapixels per second for

* a stream of eight 4096² 16-bit mosaics,
* the burst of ``cellwatch bench`` (200 × 256² 16-bit images),
* one 4096² mosaic alone (one image is one worker's job, whatever the pool's size),

with the GPU's busy share (``nvidia-smi`` utilisation sampled every 100 ms while each
workload runs). Each pool is started and warmed up before its clock starts; start-up is
reported apart. It stops starting new pools when ``--budget-s`` is spent, so one call
on a lent GPU (8 minutes) is enough. Target: ≥ 30 MP/s end to end on both workloads.

Usage (JAX with CUDA installed, ``pip install -e '.[gpu]'``)::

    python benchmarks/gpu_scaleout.py --json docs/benchmarks-scaleout-gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpu import GpuBusy
from scaleout import dask_rates, in_process_rate, inputs, settings

from cellwatch.bench.report import machine
from cellwatch.model import BUNDLED_MODEL, choose_backend, visible_gpus


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL)
    parser.add_argument("--workers", default="1,4,8,14", help="worker processes to try")
    parser.add_argument("--mosaics", type=int, default=8)
    parser.add_argument("--mosaic", type=int, default=4096, help="the mosaics' side")
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8, help="tiling.batch_size")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting pools after")
    args = parser.parse_args(argv)
    started = time.monotonic()
    backend = choose_backend() or os.environ.get("KERAS_BACKEND", "tensorflow")
    report: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "gpus": visible_gpus(),
        "keras_backend": backend,
        "runs": {},
    }
    with tempfile.TemporaryDirectory(prefix="cellwatch-gpu-scaleout-") as tmp:
        work = Path(tmp)
        data = inputs(
            work / "images", burst=args.burst, side=256, mosaics=args.mosaics, mosaic=args.mosaic
        )
        workloads = {
            "mosaics": data["mosaics"],
            "burst": data["burst"],
            "one_mosaic": data["mosaics"][:1],
        }
        report["data"] = (
            f"{args.mosaics} × {args.mosaic}² and {args.burst} × 256², 16-bit, {data['source']}"
        )
        base = {"tiling.batch_size": args.batch_size}
        from cellwatch.config import override

        for n in (int(x) for x in args.workers.split(",")):
            if time.monotonic() - started > args.budget_s:
                report["runs"][f"{n}_processes"] = "skipped: time budget spent"
                continue
            print(f"{n} worker process(es) on one GPU", file=sys.stderr)
            config = override(
                settings(args.model, workers=n, threads_per_worker=1, gpu_sharing="shared"),
                **base,
            )
            try:
                report["runs"][f"{n}_processes"] = dask_rates(
                    config, workloads, work / f"p{n}", args.repeats, busy=GpuBusy
                )
            except Exception as exc:  # out of GPU memory with many processes, say
                report["runs"][f"{n}_processes"] = f"failed: {type(exc).__name__}: {exc}"
            _save(report, args.json)
        # last: once this process has the GPU, its memory stays taken until it exits
        print("in this process (today's path)", file=sys.stderr)
        config = override(settings(args.model, workers=0), **base)
        report["runs"]["in_process"] = {
            name: in_process_rate(config, paths, work / "p0", args.repeats, busy=GpuBusy)
            for name, paths in workloads.items()
        }
    report["total_s"] = round(time.monotonic() - started, 1)
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    _save(report, args.json)
    print(json.dumps(report, indent=1))
    return 0


def _save(report: dict[str, Any], path: Path | None) -> None:
    """Write what is measured so far: a run cut short still leaves its figures."""
    if path is not None:
        path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
