"""Whole processes, one run: ``cellwatch predict`` (default config: OpenVINO on a CPU) and
the same with ``inference.runtime: keras``, against StarDist trained on the same split.

Each is started as a user starts it (a new Python process: imports, model loading,
reading, writing included) on the inputs ``cellwatch bench`` builds: a 4096² 16-bit
mosaic of real nuclei, and a burst of 200 small images. StarDist runs
``predict_instances`` with tiles of 1,024 px (``n_tiles`` = side / 1024), after
csbdeep's percentile normalization, and writes its labels as a TIFF. Wall seconds
depend on what else runs on the machine; CPU seconds (user + system, the process and
its children) much less so: both are printed, and the ratios of each.

Usage::

    python benchmarks/stardist_peer.py --work /tmp/peer [--stardist ../shared/peers/stardist_dsb]
    git worktree add --detach /tmp/before fb45532   # cellwatch as it was before OpenVINO
    python benchmarks/stardist_peer.py --work /tmp/peer --before /tmp/before

With ``--before``, an earlier checkout runs too, as it was (its own defaults): the
"today's rate" the speed targets are set against. With ``--int8`` the same runs are made
once more with ``inference.precision: int8`` (OpenVINO), to compare with the default.

Prints one JSON line per run and a last line of ratios. StarDist is optional: without it
(``pip install stardist``) or its model folder, only the two cellwatch runs are made.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import DATA

from cellwatch.bench.inputs import QUICK, Sizes, make_inputs

PEER = Path(__file__).resolve().parents[2] / "shared" / "peers" / "stardist_dsb"

STARDIST = """
import sys, numpy as np, tifffile
from csbdeep.utils import normalize
from stardist.models import StarDist2D
from pathlib import Path
model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
model = StarDist2D(None, name=model_dir.name, basedir=str(model_dir.parent))
out.mkdir(parents=True, exist_ok=True)
for path in sys.argv[3:]:
    image = tifffile.imread(path)
    tiles = tuple(max(1, -(-side // 1024)) for side in image.shape)
    labels, _ = model.predict_instances(normalize(image, 1, 99.8), n_tiles=tiles, show_tile_progress=False)
    tifffile.imwrite(out / Path(path).name, labels.astype(np.int32))
    print(Path(path).name, int(labels.max()))
"""


def timed(command: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a command; its wall and CPU seconds and its peak RSS (MB)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{command[:4]} failed:\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "tail": done.stdout[-200:]}


def median_run(tries: list[dict[str, Any]]) -> dict[str, Any]:
    """One case's runs as one: the median wall and CPU seconds, and every wall time.

    >>> median_run([{"wall_s": 3.0, "cpu_s": 5.0, "tail": ""}, {"wall_s": 1.0, "cpu_s": 2.0, "tail": ""},
    ...             {"wall_s": 2.0, "cpu_s": 9.0, "tail": "x"}])
    {'wall_s': 2.0, 'cpu_s': 5.0, 'tail': 'x', 'walls': [3.0, 1.0, 2.0]}
    """
    return {
        "wall_s": statistics.median(t["wall_s"] for t in tries),
        "cpu_s": statistics.median(t["cpu_s"] for t in tries),
        "tail": tries[-1]["tail"],
        "walls": [t["wall_s"] for t in tries],
    }


#: The cellwatch runs: their names and the ``inference`` settings each runs with.
SETTINGS = {
    "auto": "runtime: auto",
    "keras": "runtime: keras",
    "int8": "runtime: openvino\n  precision: int8",
}


def cellwatch(
    inputs: list[Path], out: Path, runtime: str, work: Path, source: Path | None = None
) -> dict[str, Any]:
    """``cellwatch predict`` as a new process, in an emptied ``out`` (a rerun would skip
    the images counted there); with ``source``, the cellwatch of that checkout (an
    earlier version, run with its own defaults) instead of this one."""
    # -P: the working folder is not put first on the path, so the cellwatch that runs is
    # the one PYTHONPATH (``source``) or the install names, not a checkout one stands in
    command = [sys.executable, "-P", "-m", "cellwatch", "predict", *map(str, inputs)]
    command += ["--out", str(out), "--quiet"]
    shutil.rmtree(out, ignore_errors=True)
    if source is not None:
        env = dict(os.environ, PYTHONPATH=str(source.resolve()))
        return timed(command, env=env)
    config = work / f"{runtime}.yaml"
    config.write_text(f"inference:\n  {SETTINGS[runtime]}\n")
    return timed([*command, "--config", str(config)])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for inputs and outputs")
    parser.add_argument("--stardist", type=Path, default=PEER, help="StarDist model folder")
    parser.add_argument("--quick", action="store_true", help="tiny inputs: a smoke test")
    parser.add_argument("--skip", default="", help="comma-separated: keras, stardist, burst")
    parser.add_argument(
        "--before",
        type=Path,
        help="a checkout of an earlier cellwatch (git worktree add --detach DIR REV), run "
        "as it was, default config, on the same inputs: the 'before' of a before/after",
    )
    parser.add_argument("--int8", action="store_true", help="also run precision int8")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run every case this many times, the cases taking turns, and report the "
        "median (wall times on a shared machine move by about 10 %% from run to run)",
    )
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    sizes = QUICK if args.quick else Sizes()
    data = make_inputs(args.work / "inputs", sizes, DATA)
    workloads = {"mosaic": [data["mosaic"]]}
    if "burst" not in skip:
        workloads["burst"] = data["burst"]
    runtimes = ["auto"] + (["keras"] if "keras" not in skip else [])
    runtimes += ["int8"] if args.int8 else []
    for runtime in [r for r in runtimes if r != "keras"]:  # each converts once
        cellwatch(data["burst"][:1], args.work / f"warm-{runtime}", runtime, args.work)
    if args.before is not None:  # its first start compiles its .pyc files, like ours did
        cellwatch(data["burst"][:1], args.work / "warm-before", "", args.work, args.before)
    stardist = "stardist" not in skip and args.stardist.is_dir()
    try:
        import stardist as _  # noqa: F401
    except ImportError:
        stardist = False
    runs: dict[str, list[dict[str, Any]]] = {}
    for _turn in range(args.repeats):
        for name, inputs in workloads.items():
            for runtime in runtimes:
                r = cellwatch(inputs, args.work / f"out-{name}-{runtime}", runtime, args.work)
                runs.setdefault(f"{name} cellwatch {runtime}", []).append(r)
            if args.before is not None:
                out = args.work / f"out-{name}-before"
                r = cellwatch(inputs, out, "", args.work, args.before)
                runs.setdefault(f"{name} cellwatch before", []).append(r)
            if stardist and name == "mosaic":
                env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
                command = [sys.executable, "-c", STARDIST, str(args.stardist)]
                out = str(args.work / f"out-{name}-stardist")
                r = timed([*command, out, *map(str, inputs)], env=env)
                runs.setdefault(f"{name} stardist", []).append(r)
    results = {}
    for label, tries in runs.items():
        name = label.split()[0]
        pixels = sizes.mosaic**2 if name == "mosaic" else len(workloads[name]) * sizes.small**2
        results[label] = median_run(tries) | {"mp": pixels / 1e6}
    for label, r in results.items():
        r["mp_per_s_wall"] = round(r["mp"] / r["wall_s"], 3)
        print(json.dumps({"run": label, **r}), flush=True)
    ratios = {}
    for name in workloads:
        for base in ("auto", "int8"):
            ours = results.get(f"{name} cellwatch {base}")
            others = ("cellwatch keras", "cellwatch before", "stardist")
            for other in [f"{name} {o}" for o in others] + [f"{name} cellwatch int8"]:
                if ours is not None and other in results and not other.endswith(base):
                    ratios[f"{name}: {other.split(' ', 1)[1]} / cellwatch {base}"] = {
                        "wall": round(results[other]["wall_s"] / ours["wall_s"], 2),
                        "cpu": round(results[other]["cpu_s"] / ours["cpu_s"], 2),
                    }
    print(json.dumps({"ratios": ratios, "load_average": os.getloadavg()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
