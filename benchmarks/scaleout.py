"""Throughput of cellwatch in one process against Dask worker processes, on this machine.

Two measurements (issue: "every core, every GPU, every machine"):

1. **The pipeline's CPU stages** (read, normalize, tile, stitch, label, measure, write):
   a burst of 16-bit images with a stub network (a 1×1 convolution that costs nothing),
   through 1 and then 2 Dask worker processes (one thread each): how far a second
   process multiplies the rate.
2. **End to end with the bundled model**: today's in-process path (``process_images`` on
   groups of ``tiling.batch_size``, as ``cellwatch predict`` runs it), ``compute.workers:
   auto`` (whatever it resolves to here), and 1 and 2 worker processes.

Rates are steady-state images and megapixels per second: each pool is started and
warmed up (model loaded, one batch run) before its clock starts, and its start-up is
reported apart. Every run uses ``scale.scale: 1`` so the work is fixed, and each
configuration runs ``--repeats`` times (the best is kept: the machine may be shared).

Usage::

    python benchmarks/scaleout.py --json docs/benchmarks-scaleout-cpu.json [--burst 64]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from common import DATA

from cellwatch.bench import inputs as bench_inputs
from cellwatch.bench.report import machine
from cellwatch.config import ComputeConfig, Config, override
from cellwatch.model import BUNDLED_MODEL

__all__ = ["dask_rate", "dask_rates", "in_process_rate", "inputs", "main"]


def settings(model: Path, **compute: Any) -> Config:
    """Fixed work: the image's own scale; the ``compute`` values given."""
    config = override(Config(), **{"scale.scale": 1.0, "model.path": str(model)})
    return override(config, **{f"compute.{k}": v for k, v in compute.items()})


def inputs(folder: Path, *, burst: int, side: int, mosaics: int = 0, mosaic: int = 4096) -> dict:
    """``burst`` 16-bit ``side``² crops of the nucleus images (``cellwatch bench``'s), and
    ``mosaics`` copies of one 16-bit ``mosaic``² image."""
    import tifffile

    sizes = bench_inputs.Sizes(mosaic=side, burst=burst, small=side, big=side)
    data = bench_inputs.make_inputs(folder / "burst", sizes, DATA)
    stream = []
    if mosaics:
        image = bench_inputs.mosaic(bench_inputs.crops(256, DATA), mosaic)
        for i in range(mosaics):
            path = folder / "mosaics" / f"mosaic{i}.tif"
            path.parent.mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(path, image)
            stream.append(path)
    return {"burst": data["burst"], "mosaics": stream, "source": data["source"]}


def _pixels(paths: Sequence[Path]) -> float:
    import tifffile

    total = 0
    for path in paths:
        with tifffile.TiffFile(path) as tif:
            total += int(np.prod(tif.pages[0].shape[:2]))
    return total / 1e6


def in_process_rate(
    config: Config, paths: Sequence[Path], out: Path, repeats: int, *, busy: Any = None
) -> dict:
    """Today's path: one process, ``process_images`` on groups, rows recorded by it."""
    from cellwatch.model import load_model
    from cellwatch.pipeline import Segmenter, process_images
    from cellwatch.service.driver import record

    started = time.perf_counter()
    segmenter = Segmenter(config, load_model(config.model.path))
    t = config.tiling
    segmenter.predict_batch(np.zeros((t.batch_size, t.tile_size, t.tile_size, 1), np.float32))
    startup = time.perf_counter() - started

    def once(run: int) -> None:
        size = config.tiling.batch_size
        for i in range(0, len(paths), size):
            group = list(paths[i : i + size])
            ids = [f"r{run}-{p.stem}" for p in group]
            for result in process_images(
                group, config=config, segmenter=segmenter, out_dir=out, job_ids=ids
            ):
                if result.row["status"] != "ok":
                    raise RuntimeError(f"{result.row['image']}: {result.row['error']}")
                record(result, out)

    return _timed(once, paths, repeats, busy=busy) | {"startup_s": round(startup, 2)}


def dask_rate(
    config: Config, paths: Sequence[Path], out: Path, repeats: int, *, busy: Any = None
) -> dict:
    """``paths`` through a Dask pool for ``config.compute``, started and warmed first."""
    return dask_rates(config, {"run": paths}, out, repeats, busy=busy)["run"]


def dask_rates(
    config: Config,
    workloads: dict[str, Sequence[Path]],
    out: Path,
    repeats: int,
    *,
    busy: Any = None,
) -> dict:
    """Each workload through one Dask pool for ``config.compute``, started and warmed up
    first (its start-up reported as ``startup_s`` in each)."""
    from cellwatch.service.cluster import Pool
    from cellwatch.service.dask_predict import run_images
    from cellwatch.service.driver import record_all

    started = time.perf_counter()
    pool = Pool(config.compute).open()
    try:
        pool.wait_for_workers(config.compute.worker_timeout_s)
        out.mkdir(parents=True, exist_ok=True)
        found = pool.warm_up(config, [(out, True)])
        startup = time.perf_counter() - started

        def on_results(results: list) -> None:
            for result in results:
                if result.row["status"] != "ok":
                    raise RuntimeError(f"{result.row['image']}: {result.row['error']}")
            record_all(results, out)

        reports = {}
        for name, paths in workloads.items():

            def once(run: int, paths: Sequence[Path] = paths) -> None:
                run_images(paths, config, out, on_results=on_results, pool=pool)

            reports[name] = _timed(once, paths, repeats, busy=busy)
    finally:
        pool.close()
    devices = sorted({str(f["device"]) for f in found})
    extra = {"startup_s": round(startup, 2), "workers": len(found), "devices": devices}
    return {name: report | extra for name, report in reports.items()}


def _timed(
    once: Callable[[int], None], paths: Sequence[Path], repeats: int, busy: Any = None
) -> dict:
    walls, shares = [], []
    for run in range(repeats):
        meter = busy() if busy is not None else None
        start = time.perf_counter()
        if meter is not None:
            with meter:
                once(run)
            shares.append(meter.share)
        else:
            once(run)
        walls.append(time.perf_counter() - start)
    best = min(walls)
    mp = _pixels(paths)
    report = {
        "images": len(paths),
        "megapixels": round(mp, 2),
        "wall_s": [round(w, 3) for w in walls],
        "best_s": round(best, 3),
        "images_per_s": round(len(paths) / best, 2),
        "mp_per_s": round(mp / best, 3),
    }
    if busy is not None:
        report["gpu_busy_share"] = shares
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--burst", type=int, default=64, help="images in the burst")
    parser.add_argument("--side", type=int, default=256, help="their side in pixels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL)
    parser.add_argument("--workers", default="1,2", help="worker processes to try")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.workers.split(",")]
    from cellwatch.service.cluster import resolve_workers

    report: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "auto_resolves_to": resolve_workers(ComputeConfig()),
    }
    with tempfile.TemporaryDirectory(prefix="cellwatch-scaleout-") as tmp:
        work = Path(tmp)
        data = inputs(work / "images", burst=args.burst, side=args.side)
        report["data"] = f"{args.burst} × {args.side}² 16-bit, {data['source']}"
        stub = bench_inputs.stub_model(work / "stub.keras")
        cpu: dict[str, Any] = {}
        for n in counts:
            print(f"stub network, {n} worker process(es)", file=sys.stderr)
            config = settings(stub, workers=n, threads_per_worker=1)
            cpu[f"{n}_processes"] = dask_rate(config, data["burst"], work / f"s{n}", args.repeats)
        cpu["in_process"] = in_process_rate(
            settings(stub, workers=0), data["burst"], work / "s0", args.repeats
        )
        if {"1_processes", "2_processes"} <= set(cpu):
            cpu["speedup_2_over_1"] = round(
                cpu["2_processes"]["mp_per_s"] / cpu["1_processes"]["mp_per_s"], 3
            )
        report["cpu_stages_stub_network"] = cpu
        model: dict[str, Any] = {}
        print("bundled model, in this process", file=sys.stderr)
        model["in_process"] = in_process_rate(
            settings(args.model, workers=0), data["burst"], work / "m0", args.repeats
        )
        auto = settings(args.model, workers="auto")
        if resolve_workers(auto.compute) == 0:
            print("bundled model, auto (in this process here)", file=sys.stderr)
            model["auto"] = in_process_rate(auto, data["burst"], work / "ma", args.repeats)
        else:
            model["auto"] = dask_rate(auto, data["burst"], work / "ma", args.repeats)
        for n in counts:
            print(f"bundled model, {n} worker process(es)", file=sys.stderr)
            config = settings(args.model, workers=n, threads_per_worker=1)
            model[f"{n}_processes"] = dask_rate(config, data["burst"], work / f"m{n}", args.repeats)
        model["auto_over_in_process"] = round(
            model["auto"]["mp_per_s"] / model["in_process"]["mp_per_s"], 3
        )
        report["bundled_model"] = model
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
