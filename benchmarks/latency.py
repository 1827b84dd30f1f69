"""How long after an image becomes stable does its ledger row appear?

Runs the real ``cellwatch watch`` on a temporary inbox, drops images into it one at a
time (written as ``.part`` and renamed, as microscopes do) and times, for each, the moment
its row lands in ``ledger.csv`` against the moment the file became stable (rename +
``watch.stable_time_s``: the earliest the daemon may touch it). The row's own
``duration_s`` is the pipeline time (reading, inference, measuring, writing outputs); the
rest is the daemon's overhead (noticing, hashing, queueing, handing over), which the issue
asks to keep under 1 s. A burst of images dropped at once measures throughput.

Usage::

    python benchmarks/latency.py                      # the bundled model if present
    python benchmarks/latency.py --model unet         # an untrained U-Net: real CPU cost
    python benchmarks/latency.py --model threshold    # a 1×1 conv: daemon overhead only
    python benchmarks/latency.py --model path/to/model.keras --images 30 --size 1024
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import tifffile
import yaml

from cellwatch.model import BUNDLED_MODEL, build_unet, write_card


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bundled", help="bundled, unet, threshold or a path")
    parser.add_argument("--images", type=int, default=20, help="images dropped one at a time")
    parser.add_argument("--burst", type=int, default=16, help="images dropped at once")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--stable-time", type=float, default=1.0, help="watch.stable_time_s")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="cellwatch-latency-") as tmp:
        root = Path(tmp)
        config = write_config(root, model_path(args.model, root), args.stable_time)
        with Daemon(root, config) as daemon:
            print(f"daemon ready after {daemon.ready_s:.1f} s (model loaded and warmed up)")
            singles = [drop_one(daemon, i, args.size, args.stable_time) for i in range(args.images)]
            burst_s = drop_burst(daemon, args.burst, args.size)
        report(singles, burst_s, args)
    return 0


def model_path(choice: str, root: Path) -> Path | None:
    if choice == "bundled":
        if BUNDLED_MODEL.is_file():
            return None
        print("no bundled model yet: using an untrained U-Net of the same shape", file=sys.stderr)
        choice = "unet"
    if choice == "unet":
        path = root / "unet.keras"
        build_unet().save(path)
        write_card(path, {"name": "untrained-unet"})
        return path
    if choice == "threshold":
        import keras

        inputs = keras.Input((None, None, 1))
        conv = keras.layers.Conv2D(3, 1, activation="softmax")
        outputs = conv(inputs)
        conv.set_weights([np.array([[[[-40.0, 40.0, 0.0]]]]), np.array([20.0, -20.0, -50.0])])
        path = root / "threshold.keras"
        keras.Model(inputs, outputs).save(path)
        return path
    return Path(choice).resolve()


def write_config(root: Path, model: Path | None, stable_time: float) -> Path:
    settings = {
        "model": {"path": str(model) if model else None},
        "watch": {"stable_time_s": stable_time, "rescan_interval_s": 30.0},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


class Daemon:
    """``cellwatch watch`` in a subprocess, with a stand-in for systemd's notify socket."""

    def __init__(self, root: Path, config: Path) -> None:
        self.root, self.inbox, self.out = root, root / "inbox", root / "out"
        self.inbox.mkdir()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        name = f"cellwatch-bench-{uuid.uuid4().hex}"
        self.sock.bind("\0" + name)
        self.ready = threading.Event()
        self.closed = threading.Event()
        self.reader = threading.Thread(target=self._read)
        self.reader.start()
        env = dict(os.environ, NOTIFY_SOCKET="@" + name, TF_CPP_MIN_LOG_LEVEL="3")
        cellwatch = shutil.which("cellwatch", path=str(Path(sys.executable).parent))
        command = [cellwatch or "cellwatch", "watch", "--config", str(config)]
        command += ["--inbox", str(self.inbox), "--out", str(self.out)]
        self.log = (root / "daemon.log").open("wb")
        started = time.monotonic()
        self.proc = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        while not self.ready.wait(0.1):
            if self.proc.poll() is not None:
                raise SystemExit(f"cellwatch exited:\n{(root / 'daemon.log').read_text()}")
        self.ready_s = time.monotonic() - started

    def _read(self) -> None:
        self.sock.settimeout(0.1)
        while not self.closed.is_set():
            try:
                if b"READY=1" in self.sock.recv(4096).split(b"\n"):
                    self.ready.set()
            except TimeoutError:
                continue

    def rows(self) -> list[dict[str, str]]:
        try:
            with (self.out / "ledger.csv").open(newline="") as handle:
                return list(csv.DictReader(handle))
        except FileNotFoundError:
            return []

    def wait_rows(self, n: int, timeout: float = 600) -> tuple[float, list[dict[str, str]]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.rows()
            if len(rows) >= n:
                return time.monotonic(), rows
            time.sleep(0.005)
        raise SystemExit(f"no row {n} within {timeout} s; see {self.root / 'daemon.log'}")

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)
        self.closed.set()
        self.reader.join()
        self.sock.close()
        self.log.close()


def image(size: int, seed: int) -> np.ndarray:
    """Bright discs ~16 px across on a dark, slightly noisy background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    pixels = rng.normal(20, 3, (size, size))
    for cy, cx in rng.integers(10, size - 10, (size * size // 2000, 2)):
        pixels[(yy - cy) ** 2 + (xx - cx) ** 2 <= 64] = 200
    return np.clip(pixels, 0, 255).astype(np.uint8)


def drop(inbox: Path, name: str, pixels: np.ndarray) -> None:
    part = inbox / f"{name}.part"
    tifffile.imwrite(part, pixels)
    os.rename(part, inbox / name)


def drop_one(daemon: Daemon, i: int, size: int, stable_time: float) -> tuple[float, float]:
    """(seconds from stable to row, the row's pipeline duration_s) for one image."""
    pixels = image(size, i)
    n = len(daemon.rows())
    drop(daemon.inbox, f"single{i:03d}.tif", pixels)
    stable_at = time.monotonic() + stable_time
    landed, rows = daemon.wait_rows(n + 1)
    time.sleep(0.2)
    return landed - stable_at, float(rows[-1]["duration_s"])


def drop_burst(daemon: Daemon, count: int, size: int) -> float:
    """Seconds from a burst of ``count`` images appearing to their last row."""
    n = len(daemon.rows())
    pixels = [image(size, 1000 + i) for i in range(count)]
    started = time.monotonic()
    for i, p in enumerate(pixels):
        drop(daemon.inbox, f"burst{i:03d}.tif", p)
    landed, _ = daemon.wait_rows(n + count)
    return landed - started


def report(singles: list[tuple[float, float]], burst_s: float, args: argparse.Namespace) -> None:
    latency = [s[0] for s in singles]
    pipeline = [s[1] for s in singles]
    overhead = [lat - dur for lat, dur in singles]

    def line(name: str, values: list[float]) -> str:
        q = statistics.quantiles(values, n=10, method="inclusive") if len(values) > 1 else values
        return (f"{name:<28} median {statistics.median(values):6.3f}  p90 {q[-1]:6.3f}  "
                f"max {max(values):6.3f}")  # fmt: skip

    print(f"\n{args.images} images of {args.size}×{args.size}, stable_time_s={args.stable_time}, "
          f"model {args.model}, {os.cpu_count()} CPUs")  # fmt: skip
    print(line("stable → ledger row (s)", latency))
    print(line("pipeline duration_s (s)", pipeline))
    print(line("daemon overhead (s)", overhead))
    print(f"burst of {args.burst}: {burst_s:.2f} s from the files appearing to the last row "
          f"({args.burst / burst_s:.1f} images/s, stable time included)")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
