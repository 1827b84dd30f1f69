"""Peak resident memory of ``cellwatch predict``, as a user runs it.

Runs the real command line (``cellwatch.cli.main``) in this process, then reads the
kernel's peak resident set size (VmHWM), which counts TensorFlow's, Pillow's and
scikit-image's memory as well as Python's. The settings are the defaults unless
``--config`` or other ``predict`` options are passed through.

Usage::

    cellwatch bench --out work --skip seed,naive,backlog   # keeps work/big.tif, 8192² 16-bit
    python benchmarks/predict_peak_rss.py work/big.tif --out out

Prints one JSON line: exit status, peak RSS in MB, wall seconds, and the ledger row's
count and scale.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

from cellwatch.cli import main as cellwatch


def peak_rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def main(argv: list[str]) -> int:
    if "--out" not in argv:
        raise SystemExit("give --out DIR: the ledger row is read from there")
    out = Path(argv[argv.index("--out") + 1])
    started = time.perf_counter()
    code = cellwatch(["predict", *argv, "--quiet"])
    wall = time.perf_counter() - started
    with (out / "ledger.csv").open(newline="") as handle:
        row = list(csv.DictReader(handle))[-1]
    print(
        json.dumps(
            {
                "exit_status": code,
                "peak_rss_mb": round(peak_rss_mb(), 1),
                "wall_s": round(wall, 1),
                "cell_count": row["cell_count"],
                "scale": row["scale"],
                "scale_source": row["scale_source"],
            }
        )
    )
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
