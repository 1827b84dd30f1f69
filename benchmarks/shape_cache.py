"""Does the daemon's memory grow with every new tile shape? OpenVINO's per-shape cache.

Tiles shrink to fit each image and the zoom is chosen per image, so a daemon that runs
for months meets new tile shapes all the time (the soak, ``benchmarks/soak.py``, drops
the same images again and again, so it does not). OpenVINO's CPU plugin keeps the
kernels and buffers it prepared for each input shape, by default for 5,000 shapes.

``memory``: in a fresh process per cache size, the bundled model (default runtime and
precision) predicts one tile of each of ``--shapes`` distinct shapes (sides 96-512 px in
steps of 16, spread out), then the same shapes again; RSS (after ``malloc_trim``) is
printed every 50 shapes. ``speed``: in one process, the default cache and
``cellwatch.runtime.OV_SHAPE_CACHE`` side by side (alternating, so the load of the
machine falls on both alike), over a cycle of ``--cycle`` shapes (the images in hand):
milliseconds per tile once each cache is warm.

Usage::

    python benchmarks/shape_cache.py memory --shapes 180
    python benchmarks/shape_cache.py speed --cycle 8 --rounds 6
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import numpy as np

OPENVINO_DEFAULT = 5000  # CPU_RUNTIME_CACHE_CAPACITY when nobody sets it


def shapes(count: int) -> list[tuple[int, int]]:
    """``count`` distinct (height, width) tile shapes, spread over 96-512 px."""
    sides = range(96, 513, 16)
    every = [(h, w) for h in sides for w in sides]
    return every[:: max(1, len(every) // count)][:count]


def predictor(capacity: int):  # noqa: ANN201 - a PredictFn
    """The bundled model's predict function, compiled with ``capacity`` shapes cached."""
    from cellwatch import runtime
    from cellwatch.config import Config

    runtime.OV_SHAPE_CACHE = capacity
    return runtime.predict_fn(runtime.load(Config()))


def memory_one(capacity: int, count: int) -> None:
    from cellwatch.service.memory import rss_mb, trim

    predict = predictor(capacity)
    todo = shapes(count)
    rng = np.random.default_rng(0)
    trim()
    print(f"cache {capacity}: {len(todo)} shapes; RSS after loading {rss_mb():.0f} MB", flush=True)
    for round_ in ("new", "again"):
        started = time.monotonic()
        for i, (h, w) in enumerate(todo, 1):
            predict(rng.random((1, h, w, 1), dtype=np.float32))
            if i % 50 == 0 or i == len(todo):
                trim()
                print(f"  {round_:5s} {i:4d} shapes: RSS {rss_mb():5.0f} MB", flush=True)
        seconds = time.monotonic() - started
        print(f"  {round_} shapes: {seconds / len(todo) * 1000:.0f} ms per tile", flush=True)


def speed(cycle: int, rounds: int) -> None:
    from cellwatch import runtime

    capped = runtime.OV_SHAPE_CACHE
    fns = {OPENVINO_DEFAULT: predictor(OPENVINO_DEFAULT), capped: predictor(capped)}
    todo = shapes(cycle * 7)[::7][:cycle]  # sizes apart, like the images in hand
    rng = np.random.default_rng(0)
    tiles = [rng.random((1, h, w, 1), dtype=np.float32) for h, w in todo]
    spent = dict.fromkeys(fns, 0.0)
    for round_ in range(rounds + 1):
        for capacity, predict in fns.items():
            started = time.monotonic()
            for tile in tiles:
                predict(tile)
            if round_:  # round 0 fills the caches
                spent[capacity] += time.monotonic() - started
    sides = ", ".join(f"{h}x{w}" for h, w in todo)
    print(f"{cycle} shapes in turn ({sides}), {rounds} rounds after one to warm up:")
    for capacity, seconds in spent.items():
        print(f"  cache {capacity:5d}: {seconds / (rounds * cycle) * 1000:.0f} ms per tile")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["memory", "speed"])
    parser.add_argument("--shapes", type=int, default=180, help="distinct shapes (memory)")
    parser.add_argument("--cycle", type=int, default=8, help="shapes in turn (speed)")
    parser.add_argument("--rounds", type=int, default=6, help="rounds of the cycle (speed)")
    parser.add_argument("--capacity", type=int, nargs="*", help="cache sizes (memory)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.what == "speed":
        speed(args.cycle, args.rounds)
        return 0
    if args.one is not None:
        memory_one(args.one, args.shapes)
        return 0
    from cellwatch.runtime import OV_SHAPE_CACHE

    for capacity in args.capacity or [OPENVINO_DEFAULT, OV_SHAPE_CACHE]:
        command = [sys.executable, __file__, "memory", "--shapes", str(args.shapes)]
        subprocess.run([*command, "--one", str(capacity)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
