"""Does the daemon's memory stay flat while it runs? A soak of one ``cellwatch watch``.

Runs the real daemon (default config, apart from the folders and a short
``watch.stable_time_s``) on a temporary inbox and drops bursts of real images of mixed
sizes (from ``dsb2018-fluo``) into it, each burst the same images under new names, as a
microscope that keeps imaging would. After each burst it waits for every row, and prints
the daemon's resident memory (RSS, from ``/proc``) every ``--every`` images, with each
Dask worker's RSS in ``--workers N`` mode. At the end it checks that every image has
exactly one row and prints the rise of RSS after warm-up (the first ``--warm-up`` images).

Usage::

    python benchmarks/soak.py --images 5000                # default runtime, in-process
    python benchmarks/soak.py --images 2000 --workers 2    # two local Dask workers
    python benchmarks/soak.py --images 1000 --burst 84 --every 168
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml
from latency import Daemon

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dsb2018-fluo"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000, help="images in all")
    parser.add_argument("--burst", type=int, default=84, help="distinct images per burst")
    parser.add_argument("--every", type=int, default=500, help="print RSS every N images")
    parser.add_argument("--warm-up", type=int, default=500, help="images before RSS should be flat")
    parser.add_argument("--workers", type=int, default=None, help="compute.workers (Dask mode)")
    parser.add_argument("--data", type=Path, default=DATA, help="a dsb2018-fluo folder")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the daemon")
    args = parser.parse_args()

    sources = pick_images(args.data, args.burst)
    print(f"{len(sources)} distinct images per burst, sizes: {sizes(sources)}")
    with tempfile.TemporaryDirectory(prefix="cellwatch-soak-") as tmp:
        root = Path(tmp)
        config = write_config(root, args.workers)
        for item in args.env:
            name, _, value = item.partition("=")
            os.environ[name] = value
        with Daemon(root, config) as daemon:
            print(f"daemon pid {daemon.proc.pid} ready after {daemon.ready_s:.1f} s")
            samples = soak(daemon, sources, args)
            rows = daemon.rows()
        check(rows, args.images)
    summarize(samples, args.warm_up)
    return 0


def pick_images(data: Path, count: int) -> list[Path]:
    """``count`` images spread over train and val, so their sizes are mixed."""
    found = sorted(data.glob("*/images/*.tif")) + sorted(data.glob("*/images/*.png"))
    if not found:
        raise SystemExit(f"no images under {data}/*/images: pass --data")
    step = max(1, len(found) // count)
    return found[::step][:count]


def sizes(paths: list[Path]) -> str:
    import tifffile

    shapes = Counter(tifffile.imread(p).shape[:2] for p in paths)
    return ", ".join(f"{h}x{w}: {n}" for (h, w), n in shapes.most_common())


def write_config(root: Path, workers: int | None) -> Path:
    settings: dict = {"watch": {"stable_time_s": 0.5, "rescan_interval_s": 30.0}}
    if workers is not None:
        settings["compute"] = {"workers": workers}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def rss_mb(pid: int) -> float:
    """Resident memory of one process, in MB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def descendants(pid: int) -> list[int]:
    """Every process under ``pid`` (Dask's nannies and workers)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


Sample = tuple[int, float, list[float]]  # images done, daemon RSS, each worker's RSS (MB)


def soak(daemon: Daemon, sources: list[Path], args: argparse.Namespace) -> list[Sample]:
    """Drop bursts until ``args.images`` are in; the RSS figures at each print."""
    samples: list[Sample] = []
    started, dropped, burst = time.monotonic(), 0, 0
    printed = 0
    while dropped < args.images:
        batch = sources[: args.images - dropped]
        for src in batch:
            part = daemon.inbox / f"b{burst:03d}_{src.stem}.part"
            shutil.copyfile(src, part)
            os.rename(part, part.with_suffix(src.suffix))
        dropped += len(batch)
        burst += 1
        wait_rows(daemon, dropped, timeout=3600)
        if dropped - printed >= args.every or dropped >= args.images:
            printed = dropped
            rss = rss_mb(daemon.proc.pid)
            line = f"{dropped:6d} images  {time.monotonic() - started:7.0f} s  daemon RSS {rss:7.0f} MB"
            workers = [rss_mb(p) for p in sorted(descendants(daemon.proc.pid))]
            workers = [r for r in workers if r > 100]  # the workers, not the helpers
            samples.append((dropped, rss, workers))
            if workers:
                line += "  workers " + " ".join(f"{r:.0f}" for r in workers) + " MB"
            print(line, flush=True)
    return samples


def wait_rows(daemon: Daemon, n: int, timeout: float) -> None:
    """Wait for ``n`` rows, reading the ledger twice a second (not in a busy loop that
    would take CPU from the daemon being measured)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # lines first (cheap), then the real rows (a quoted field may hold a newline)
        if count_rows(daemon.out / "ledger.csv") >= n and len(daemon.rows()) >= n:
            return
        time.sleep(0.5)
    raise SystemExit(f"no row {n} within {timeout} s; see {daemon.root / 'daemon.log'}")


def count_rows(ledger: Path) -> int:
    """Rows in the ledger (lines after the header), without parsing them."""
    try:
        with ledger.open("rb") as handle:
            return max(0, sum(1 for _ in handle) - 1)
    except FileNotFoundError:
        return 0


def check(rows: list[dict[str, str]], expected: int) -> None:
    names = Counter(Path(r["image"]).name for r in rows)
    twice = [n for n, c in names.items() if c > 1]
    failed = sum(r["status"] != "ok" for r in rows)
    print(f"{len(rows)} rows for {expected} images; {len(twice)} counted twice; {failed} failed")


def summarize(samples: list[Sample], warm_up: int) -> None:
    """The rise of each process's RSS after warm-up (a worker restarted by its nanny
    shows as a drop)."""
    after = [(rss, workers) for n, rss, workers in samples if n >= warm_up]
    if len(after) < 2:
        print("too few samples after warm-up to judge", file=sys.stderr)
        return
    series = {"daemon": [rss for rss, _ in after]}
    if all(len(w) == len(after[0][1]) for _, w in after):
        for i in range(len(after[0][1])):
            series[f"worker {i + 1}"] = [w[i] for _, w in after]
    for name, values in series.items():
        print(
            f"{name} after warm-up ({warm_up} images): RSS {values[0]:.0f} → {values[-1]:.0f} MB "
            f"(rise {values[-1] - values[0]:+.0f} MB, range {max(values) - min(values):.0f} MB)"
        )


if __name__ == "__main__":
    sys.exit(main())
