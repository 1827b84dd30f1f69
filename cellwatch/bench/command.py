"""``cellwatch bench``: its options, and one run from inputs to report."""

from __future__ import annotations

__all__ = ["add_arguments", "run"]

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import cellwatch
from cellwatch.bench.inputs import QUICK, Sizes, default_data, make_inputs
from cellwatch.bench.memory import memory
from cellwatch.bench.network import network_rates, plain_rates, prepare_models
from cellwatch.bench.report import format_comparison, format_table, machine, targets
from cellwatch.bench.workloads import add_network_alone, say, workloads

SKIPPABLE = {"seed", "naive", "memory", "backlog"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``cellwatch bench`` options."""
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument(
        "--model", type=Path, help="default-architecture model (.keras); default: the bundled one"
    )
    parser.add_argument(
        "--seed-model",
        type=Path,
        help="a trained seed-architecture model (cellwatch train --arch seed); default: an "
        "untrained one, which times the network fairly but finds no cells, so the seed "
        "workloads then skip the labelling, measuring and writing the default pays for",
    )
    parser.add_argument("--out", type=Path, help="keep the images and outputs in this folder")
    parser.add_argument(
        "--data",
        type=Path,
        help="folder with */images/*.tif to build the images from (default: the folder "
        "$CELLWATCH_BENCH_DATA names; without one, synthetic discs)",
    )
    parser.add_argument("--compare", type=Path, help="print ratios against an earlier JSON")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument(
        "--sizes",
        default="",
        metavar="NAME=N,...",
        help="override workload sizes, e.g. mosaic=2048,burst=50 (names: "
        + ", ".join(f.name for f in dataclasses.fields(Sizes))
        + ")",
    )
    parser.add_argument(
        "--skip",
        default="",
        help="comma-separated parts to leave out: seed, naive, memory, backlog",
    )


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; 0 when it completed (targets missed are reported, not errors)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # each workload loads its own model: retracing notes
    sizes = _sizes(QUICK if args.quick else Sizes(), args.sizes)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - SKIPPABLE:
        from cellwatch.errors import ConfigError

        raise ConfigError(f"--skip: unknown part {sorted(skip - SKIPPABLE)[0]!r}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        return _run(args, sizes, skip, args.out)
    with tempfile.TemporaryDirectory(prefix="cellwatch-bench-") as tmp:
        return _run(args, sizes, skip, Path(tmp))


def _command(args: argparse.Namespace) -> str:
    parts = ["cellwatch bench"]
    if args.model is not None:
        parts.append(f"--model {args.model}")
    if args.seed_model is not None:
        parts.append(f"--seed-model {args.seed_model}")
    if args.data is not None:
        parts.append(f"--data {args.data}")
    parts += ["--quick"] * args.quick
    parts += [
        f"--{name} {getattr(args, name)}" for name in ("sizes", "skip") if getattr(args, name)
    ]
    return " ".join(parts)


def _sizes(base: Sizes, spec: str) -> Sizes:
    from cellwatch.errors import ConfigError

    changes = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, value = item.partition("=")
        if name not in {f.name for f in dataclasses.fields(Sizes)} or not value.isdigit():
            raise ConfigError(f"--sizes: expected NAME=N with a known name, got {item!r}")
        changes[name] = int(value)
    return dataclasses.replace(base, **changes)


def _run(args: argparse.Namespace, sizes: Sizes, skip: set[str], work: Path) -> int:
    started = time.perf_counter()
    # read before --json may overwrite it (the same file compares a run with its forerunner)
    earlier = None if args.compare is None else json.loads(args.compare.read_text("utf-8"))
    data = make_inputs(work / "images", sizes, args.data or default_data())
    models = prepare_models(
        work / "models", args.model, sizes, bundled=not args.quick, seed=args.seed_model
    )
    report: dict[str, Any] = {
        "command": _command(args),
        "machine": machine(),
        "sizes": dataclasses.asdict(sizes),
        "data": data["source"],
        "package": str(Path(cellwatch.__file__).resolve().parent),  # a checkout or a wheel
        "models": {name: m["about"] for name, m in models.items()},
    }
    say("plain TensorFlow rates")
    report["peak"] = plain_rates(sizes.repeats)
    say("the network alone")
    report["network"] = network_rates(models, sizes.repeats, report["peak"]["best_gflops"])
    report["workloads"] = workloads(models, data, work / "out", skip)
    add_network_alone(report["workloads"], report["network"])
    report["memory"] = memory(models, data, work, sizes, skip)
    report["total_s"] = round(time.perf_counter() - started, 1)
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["targets"] = targets(report)
    print(format_table(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    if earlier is not None:
        print(format_comparison(report, earlier))
    return 0
