"""What a user pays per input megapixel under automatic scale: whole ``cellwatch predict``.

Builds a mosaic of real nuclei (256² crops of the DSB 2018 fluorescence images, cycled
with rotations, as ``cellwatch bench`` does), writes it as a 16-bit TIFF, and runs
``python -m cellwatch predict`` on it as a separate process with the default config
(automatic scale on), ``--repeats`` times. Start-up, reading, the first passes of the
size estimate, the network, post-processing and writing are all in the figure.

Prints one JSON object: the best and all wall times, input megapixels per second (best
run), the scale chosen and the cell count from the ledger row. Usage::

    python benchmarks/auto_scale_cost.py [--side 4096] [--model M.keras] [--repeats 1]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tifffile
from common import DATA

from cellwatch.bench.inputs import crops, mosaic


def run_once(
    image: Path, out: Path, model: Path | None, config: Path | None = None
) -> tuple[float, dict[str, str]]:
    """Wall seconds of one ``cellwatch predict`` process, and its ledger row."""
    command = [sys.executable, "-m", "cellwatch", "predict", str(image), "--out", str(out)]
    if model is not None:
        command += ["--model", str(model)]
    if config is not None:
        command += ["--config", str(config)]
    started = time.perf_counter()
    # run from the output's folder: ``-m`` puts the working folder first on sys.path, and
    # the cellwatch measured must be the one PYTHONPATH (or the environment) names
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=out.parent)
    wall = time.perf_counter() - started
    with (out / "ledger.csv").open(newline="") as handle:
        return wall, list(csv.DictReader(handle))[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=4096)
    parser.add_argument("--model", type=Path, default=None, help="default: the bundled one")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--data", type=Path, default=DATA / "val")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "mosaic.tif"
        tifffile.imwrite(image, mosaic(crops(256, args.data), args.side))
        walls, row = [], {}
        for k in range(args.repeats):
            wall, row = run_once(image, Path(tmp) / f"out{k}", args.model)
            walls.append(round(wall, 1))
    megapixels = args.side**2 / 1e6
    print(
        json.dumps(
            {
                "side": args.side,
                "model": row.get("model"),
                "wall_s": walls,
                "input_mp_per_s": round(megapixels / min(walls), 3),
                "scale": row.get("scale"),
                "scale_source": row.get("scale_source"),
                "cell_count": row.get("cell_count"),
                "cpus": os.cpu_count(),
                "load_average_1min": round(os.getloadavg()[0], 1),
            }
        )
    )


if __name__ == "__main__":
    main()
