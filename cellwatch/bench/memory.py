"""Memory, measured in fresh processes: the peak for one very large image, and resident
memory along a backlog of small images."""

from __future__ import annotations

__all__ = ["MB", "memory", "memory_child"]

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from cellwatch.bench.inputs import Sizes
from cellwatch.bench.workloads import bench_segmenter, in_groups, say

MB = 1e6


def memory(
    models: dict[str, dict[str, Any]],
    data: dict[str, Any],
    work: Path,
    sizes: Sizes,
    skip: set[str],
) -> dict[str, Any]:
    """Peak resident memory for the big image with the default model, and resident memory
    along a backlog of small images with the stub network (the network's memory does not
    depend on the backlog; the stub keeps the run short)."""
    out: dict[str, Any] = {}
    if "memory" not in skip:
        say(f"peak memory for one {sizes.big}² image")
        spec = {
            "model": str(models["default"]["path"]),
            "paths": [str(data["big"])],
            "out": str(work / "out-big"),
            "intervals": True,
        }
        out["big_image"] = {"side": sizes.big, **_child(spec)}
        say(f"peak memory for one {sizes.big}² image under the default settings")
        spec = {**spec, "out": str(work / "out-big-default"), "default_config": True}
        out["big_image_default_config"] = {"side": sizes.big, **_child(spec)}
    if "backlog" not in skip:
        say(f"memory along a backlog of {sizes.backlog} images")
        burst = [str(p) for p in data["burst"]]
        paths = [burst[i % len(burst)] for i in range(sizes.backlog)]
        spec = {
            "model": str(models["stub"]["path"]),
            "paths": paths,
            "out": str(work / "out-backlog"),
            "intervals": False,  # as in the daemon: nothing kept per image
        }
        out["backlog"] = {"images": sizes.backlog, "network": "stub", **_child(spec)}
    return out


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    code = "import sys; from cellwatch.bench.memory import memory_child; memory_child(sys.argv[1])"
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"memory measurement failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def _rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / MB
    return float("nan")


class _Sampler:
    """Samples this process's resident memory every few milliseconds in a thread."""

    def __init__(self, period_s: float = 0.005) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period_s,), daemon=True)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self, period_s: float) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), _rss_mb()))
            time.sleep(period_s)


def memory_child(spec_json: str) -> None:
    """Entry point of the memory subprocess: process the images as the daemon does (groups
    of ``tiling.batch_size``) and print one JSON line of memory figures."""
    from cellwatch import pipeline
    from cellwatch.config import Config
    from cellwatch.service import driver

    spec = json.loads(spec_json)
    out, paths = Path(spec["out"]), [Path(p) for p in spec["paths"]]
    segmenter, _ = bench_segmenter(
        Path(spec["model"]),
        Config().tiling.batch_size,
        intervals=spec["intervals"],
        default_config=spec.get("default_config", False),
    )
    ready = _rss_mb()
    along = []
    scales = []
    started = time.perf_counter()
    with _Sampler() as sampler:
        for n, group in enumerate(in_groups(paths, 8), start=1):
            ids = [f"mem-{i}" for i in range(len(group))]
            results = pipeline.process_images(
                group, config=segmenter.config, segmenter=segmenter, out_dir=out, job_ids=ids
            )
            for result in results:
                driver.record(result, out)
                scales.append(result.row.get("scale"))
            along.append((min(n * 8, len(paths)), _rss_mb()))
    figures = {
        "peak_rss_mb": round(_rss_mb("VmHWM"), 1),
        "ready_rss_mb": round(ready, 1),
        "peak_by_stage_mb": _peak_by_stage(sampler.samples, segmenter.stopwatch),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    if len(scales) == 1:
        figures["scale"] = scales[0]
    if len(along) > 1:
        tenth = along[max(0, len(along) // 10 - 1)]
        figures.update(
            rss_at_mb={str(k): round(v, 1) for k, v in (tenth, along[len(along) // 2], along[-1])},
            growth_mb=round(along[-1][1] - tenth[1], 1),
        )
    print(json.dumps(figures))


def _peak_by_stage(samples: list[tuple[float, float]], watch: Any) -> dict[str, float]:
    intervals = getattr(watch, "intervals", None)
    if not intervals or not samples:
        return {}
    times = np.array([t for t, _ in samples])
    rss = np.array([r for _, r in samples])
    peaks: dict[str, float] = {}
    for stage, start, end in intervals:
        lo, hi = np.searchsorted(times, [start, end])
        if hi > lo:
            peaks[stage] = max(peaks.get(stage, 0.0), float(rss[lo:hi].max()))
    return {s: round(v, 1) for s, v in sorted(peaks.items(), key=lambda kv: -kv[1])}
