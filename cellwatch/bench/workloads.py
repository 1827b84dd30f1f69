"""End-to-end workloads: images processed as the daemon processes them, every stage
timed."""

from __future__ import annotations

__all__ = [
    "STAGES",
    "add_network_alone",
    "bench_segmenter",
    "in_groups",
    "run_workload",
    "say",
    "workloads",
]

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

STAGES = (
    "read", "normalize", "rescale", "tile", "inference", "stitch", "tile_stitch",
    "postprocess", "measure", "write", "ledger",
)  # fmt: skip


def say(what: str) -> None:
    print(f"bench: {time.strftime('%H:%M:%S')} {what}", file=sys.stderr, flush=True)


class Counting:
    """A predict function that counts the batches and tiles it is given."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray]) -> None:
        self.fn, self.batches, self.tiles = fn, 0, 0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.batches += 1
        self.tiles += len(batch)
        return self.fn(batch)


def workloads(
    models: dict[str, dict[str, Any]], data: dict[str, Any], out: Path, skip: set[str]
) -> dict[str, dict[str, Any]]:
    """Each workload with the default model (shared batches), the seed model, and the
    default model one tile at a time, one image after another."""
    from cellwatch.config import Config

    batch = Config().tiling.batch_size
    runs = [("default", "default", batch, True)]
    if "seed" not in skip:
        runs.append(("seed", "seed", batch, True))
    if "naive" not in skip:
        runs.append(("naive", "default", 1, False))
    results: dict[str, dict[str, Any]] = {"mosaic": {}, "burst": {}}
    for label, model_name, batch_size, shared in runs:
        for workload, paths in (("mosaic", [data["mosaic"]]), ("burst", data["burst"])):
            say(f"{workload} with the {label} setup")
            results[workload][label] = run_workload(
                models[model_name]["path"],
                paths,
                out / f"{workload}-{label}",
                batch_size=batch_size,
                shared=shared,
            )
    return results


def add_network_alone(work: dict[str, dict[str, Any]], network: dict[str, Any]) -> None:
    """Add to each run the time its batches take the network alone (median rate), and
    the share of wall time that leaves to everything else: the strict measure of how
    close the pipeline runs to the network's speed."""
    cases = {"default": "default", "seed": "seed", "naive": "default_one_tile"}
    for runs in work.values():
        for label, r in runs.items():
            alone = r["tiles"] * network[cases[label]]["s_per_tile"]
            r["network_alone_s"] = round(alone, 3)
            r["non_network_share"] = round(max(0.0, 1 - alone / r["wall_s"]), 4)


def bench_segmenter(
    model_path: Path, batch_size: int, *, intervals: bool = True, default_config: bool = False
) -> tuple[Any, Counting]:
    from cellwatch.config import Config, override
    from cellwatch.pipeline import Segmenter
    from cellwatch.runtime import load, predict_fn, resolve

    fixed = None if default_config else 1.0  # None: the default, automatic scale
    settings = {"scale.scale": fixed, "tiling.batch_size": batch_size}
    config = resolve(override(Config(), **settings, **{"model.path": str(model_path)}))
    model = load(config)
    counter = Counting(predict_fn(model))
    segmenter = Segmenter(config, model, counter, stopwatch=_stopwatch(intervals))
    tile = segmenter.tiling.tile
    segmenter.predict_batch(np.zeros((batch_size, tile, tile, 1), np.float32))
    counter.batches = counter.tiles = 0
    segmenter.stopwatch.reset()
    return segmenter, counter


def _stopwatch(intervals: bool) -> Any:
    from cellwatch.timing import Stopwatch

    if not intervals:
        return Stopwatch()
    try:
        return Stopwatch(keep_intervals=True)
    except TypeError:  # an older cellwatch, benchmarked for a before/after comparison
        return Stopwatch()


def run_workload(
    model_path: Path, paths: Sequence[Path], out: Path, *, batch_size: int, shared: bool
) -> dict[str, Any]:
    """Process ``paths`` as the daemon does (``process_images`` on groups of
    ``tiling.images_at_once``, ``batch_size`` tiles per inference call),
    or one image at a time with ``process_image``; time every stage."""
    from cellwatch import pipeline
    from cellwatch.service import driver

    segmenter, counter = bench_segmenter(model_path, batch_size)
    watch, config = segmenter.stopwatch, segmenter.config
    groups = in_groups(paths, config.tiling.images_at_once if shared else 1)
    rows = []
    start = time.perf_counter()
    for group in groups:
        ids = [f"bench-{p.stem}" for p in group]
        if shared:
            results = pipeline.process_images(
                group, config=config, segmenter=segmenter, out_dir=out, job_ids=ids
            )
        else:
            results = [
                pipeline.process_image(
                    p, config=config, segmenter=segmenter, out_dir=out, job_id=ids[0]
                )
                for p in group
            ]
        with watch("ledger"):
            for result in results:
                driver.record(result, out)
        rows += [r.row for r in results]
    wall = time.perf_counter() - start
    return _summary(rows, wall, watch, counter, start)


def in_groups(paths: Sequence[Path], size: int) -> Iterator[list[Path]]:
    for i in range(0, len(paths), size):
        yield list(paths[i : i + size])


def _summary(
    rows: list[dict[str, Any]], wall: float, watch: Any, counter: Counting, start: float
) -> dict[str, Any]:
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        raise RuntimeError(f"benchmark image failed: {failed[0].get('error')}")
    pixels = sum(r["height"] * r["width"] for r in rows)
    totals = {s: watch.totals[s] for s in STAGES if watch.totals.get(s)}
    busy = watch.busy("inference", start) if hasattr(watch, "busy") else totals["inference"]
    return {
        "images": len(rows),
        "megapixels": round(pixels / 1e6, 3),
        "cells": int(sum(r["cell_count"] for r in rows)),
        "wall_s": round(wall, 3),
        "mp_per_s": round(pixels / 1e6 / wall, 4),
        "batches": counter.batches,
        "tiles": counter.tiles,
        "stage_s": {s: round(v, 3) for s, v in totals.items()},
        "stage_share": {s: round(v / wall, 4) for s, v in totals.items()},
        "network_busy_share": round(busy / wall, 4),
    }
