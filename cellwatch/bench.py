"""``cellwatch bench``: how fast and how lean the whole pipeline is on this machine.

One run measures, on the machine it runs on:

* end-to-end throughput (megapixels per second) of ``process_images``, the daemon's path,
  for one large 16-bit image and for a burst of small images; the time of each stage as a
  share of wall time; and the share left to everything but the network: one minus the
  time the run's batches take the network alone, over the wall time;
* the same workloads with the ``seed`` architecture and with naive one-tile-at-a-time
  inference, as ratios to the default;
* the network's FLOPs (convolutions, counted from the layer shapes) and the rate it
  reaches, against the best rate this TensorFlow reaches on a plain convolution and a
  plain matrix product;
* peak memory (VmHWM, in a fresh process) for one very large image, at scale 1 and under
  the default settings (automatic scale, what users run), and resident memory along a
  backlog of small images (with a stub network: the network's memory does not depend on
  the backlog, and the stub keeps the run short).

It prints a table and writes JSON; ``--compare OLD.json`` prints new/old ratios of the
headline figures so regressions show. Images are built from the nucleus images under
``shared/data`` beside the repository (16-bit mosaics of 256×256 crops) or, without
them, from synthetic discs. Every workload uses ``scale.scale: 1`` so the work is fixed,
except the default-settings memory run, which zooms the image as users' runs do.
"""

from __future__ import annotations

__all__ = [
    "DATA",
    "HEADLINES",
    "MB",
    "QUICK",
    "SKIPPABLE",
    "STAGES",
    "TARGETS",
    "Sizes",
    "add_arguments",
    "add_network_alone",
    "conv_flops_per_tile",
    "format_comparison",
    "format_table",
    "machine",
    "make_inputs",
    "memory",
    "memory_child",
    "network_rates",
    "plain_rates",
    "prepare_models",
    "run",
    "run_workload",
    "targets",
    "workloads",
]

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dsb2018-fluo"
STAGES = (
    "read", "normalize", "rescale", "tile", "inference", "stitch", "tile_stitch",
    "postprocess", "measure", "write", "ledger",
)  # fmt: skip
MB = 1e6
SKIPPABLE = {"seed", "naive", "memory", "backlog"}
TARGETS = {
    "non_network_share": 0.15,  # at most, of end-to-end wall time
    "network_share_of_peak": 0.5,  # at least
    "seed_vs_default_time": 1.0,  # the default takes at most as long per megapixel
    "big_image_peak_rss_mb": 1500.0,
    "big_image_default_config_peak_rss_mb": 1500.0,  # automatic scale, as users run it
    "backlog_growth_mb": 50.0,  # resident memory added over the backlog, at most
    "total_s": 600.0,
}


@dataclass(frozen=True)
class Sizes:
    """Workload sizes; :data:`QUICK` is a smoke test, not a measurement."""

    mosaic: int = 4096  # side of the large image
    burst: int = 200  # small images in the burst
    small: int = 256  # their side
    big: int = 8192  # side of the image whose peak memory is measured
    backlog: int = 2000  # images in the backlog memory run
    repeats: int = 5  # timed calls per plain-rate and network measurement
    unet_filters: int = 16  # for the untrained stand-in when no trained model exists
    seed_filters: int = 64


QUICK = Sizes(mosaic=512, burst=4, big=512, backlog=16, repeats=1, unet_filters=4, seed_filters=8)


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
        default=DATA,
        help="folder with */images/*.tif to build the images from (default: %(default)s)",
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


def _say(what: str) -> None:
    print(f"bench: {time.strftime('%H:%M:%S')} {what}", file=sys.stderr, flush=True)


def _command(args: argparse.Namespace) -> str:
    parts = ["cellwatch bench"]
    if args.model is not None:
        parts.append(f"--model {args.model}")
    if args.seed_model is not None:
        parts.append(f"--seed-model {args.seed_model}")
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
    data = make_inputs(work / "images", sizes, args.data)
    models = prepare_models(
        work / "models", args.model, sizes, bundled=not args.quick, seed=args.seed_model
    )
    report: dict[str, Any] = {
        "command": _command(args),
        "machine": machine(),
        "sizes": dataclasses.asdict(sizes),
        "data": data["source"],
        "package": str(Path(__file__).resolve().parent),  # a checkout or an installed wheel
        "models": {name: m["about"] for name, m in models.items()},
    }
    _say("plain TensorFlow rates")
    report["peak"] = plain_rates(sizes.repeats)
    _say("the network alone")
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


# --- inputs ------------------------------------------------------------------------------


def make_inputs(folder: Path, sizes: Sizes, source: Path = DATA) -> dict[str, Any]:
    """Write the workloads' 16-bit TIFFs: a mosaic, a burst of small images, a big mosaic."""
    import tifffile

    folder.mkdir(parents=True, exist_ok=True)
    crops = _crops(sizes.small, source)
    mosaic, big = folder / "mosaic.tif", folder / "big.tif"
    tifffile.imwrite(mosaic, _mosaic(crops, sizes.mosaic))
    tifffile.imwrite(big, _mosaic(crops, sizes.big))
    burst = []
    for i in range(sizes.burst):
        path = folder / "burst" / f"img{i:04d}.tif"
        path.parent.mkdir(exist_ok=True)
        tifffile.imwrite(path, np.rot90(crops[i % len(crops)], i // len(crops)))
        burst.append(path)
    found = f"{len(crops)} crops of {source}"
    real = source.is_dir() and any(source.glob("*/images/*.tif"))
    about = found if real else f"synthetic discs (no images in {source})"
    return {"mosaic": mosaic, "burst": burst, "big": big, "source": about}


def _crops(side: int, source: Path) -> list[np.ndarray]:
    """16-bit ``side``² crops of the nucleus images, or synthetic discs without them."""
    import tifffile

    paths = sorted(source.glob("*/images/*.tif")) if source.is_dir() else []
    crops = []
    for path in paths:
        image = tifffile.imread(path)
        if image.ndim == 2 and min(image.shape) >= side:
            crops.append(image[:side, :side].astype(np.uint16) * 257)
    return crops or [_discs(side, seed) for seed in range(16)]


def _discs(side: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    image = np.full((side, side), 2000.0)
    for cy, cx, r in zip(*rng.uniform(0, side, (2, 40)), rng.uniform(5, 12, 40), strict=True):
        image[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 30000.0
    return (image + rng.normal(0, 500, image.shape)).clip(0, 65535).astype(np.uint16)


def _mosaic(crops: list[np.ndarray], side: int) -> np.ndarray:
    """A ``side``² mosaic of crops, cycled with rotations."""
    tile = crops[0].shape[0]
    n = -(-side // tile)
    out = np.zeros((n * tile, n * tile), np.uint16)
    for k in range(n * n):
        y, x = divmod(k, n)
        crop = np.rot90(crops[k % len(crops)], k // len(crops))
        out[y * tile : (y + 1) * tile, x * tile : (x + 1) * tile] = crop
    return out[:side, :side]


# --- models ------------------------------------------------------------------------------


def prepare_models(
    folder: Path,
    given: Path | None,
    sizes: Sizes,
    *,
    bundled: bool = True,
    seed: Path | None = None,
) -> dict[str, dict[str, Any]]:
    """The default-architecture model (given, else bundled unless ``bundled`` is False,
    else an untrained stand-in of ``sizes.unet_filters``), the seed network (``seed``,
    else an untrained one) and a stub, each a loadable ``.keras`` file."""
    from cellwatch.config import Config
    from cellwatch.model import BUNDLED_MODEL, build_seed_unet, build_unet

    folder.mkdir(parents=True, exist_ok=True)
    models: dict[str, dict[str, Any]] = {}
    default = given if given is not None else BUNDLED_MODEL if bundled else None
    if default is not None and default.is_file():
        models["default"] = {"path": default, "about": f"{default} (trained)"}
    else:
        path = _saved(folder / "unet.keras", build_unet(filters=sizes.unet_filters))
        models["default"] = {"path": path, "about": "untrained build_unet() (no trained model)"}
    if seed is not None:
        models["seed"] = {"path": seed, "about": f"{seed} (trained)"}
    else:
        path = _saved(folder / "seed.keras", build_seed_unet(filters=sizes.seed_filters))
        models["seed"] = {"path": path, "about": "untrained build_seed_unet() (the architecture)"}
    models["stub"] = {"path": _stub_model(folder / "stub.keras"), "about": "1x1 conv threshold"}
    for name, entry in models.items():  # the seed architecture takes 256² tiles only
        entry["tile"] = 256 if name == "seed" else Config().tiling.tile_size
        entry["flops_per_tile"] = conv_flops_per_tile(entry["path"], entry["tile"])
        entry["about"] = {
            "model": entry["about"],
            "tile_px": entry["tile"],
            "gflop_per_tile": entry["flops_per_tile"] / 1e9,
        }
    return models


def _saved(path: Path, network: Any) -> Path:
    """Save a network with a card for 20 px cells; returns ``path``."""
    from cellwatch.model import write_card

    network.save(path)
    write_card(path, {"diameter_px": 20.0})
    return path


def _stub_model(path: Path) -> Path:
    """A three-class 1×1 convolution that calls bright pixels cell interior: a stand-in
    network that costs nothing, for measuring the rest of the pipeline's memory."""
    import keras

    inputs = keras.Input((None, None, 1))
    conv = keras.layers.Conv2D(3, 1, activation="softmax", name="probabilities")
    outputs = conv(inputs)
    conv.set_weights([np.array([[[[-40.0, 40.0, 0.0]]]]), np.array([20.0, -20.0, -50.0])])
    return _saved(path, keras.Model(inputs, outputs))


def conv_flops_per_tile(path: Path, tile: int) -> float:
    """FLOPs (2 per multiply-add) of every convolution for one ``tile``² input tile,
    from the kernel shapes and the output sizes of one probe pass."""
    import keras

    network = keras.saving.load_model(path, compile=False, safe_mode=True)
    convs = [
        layer
        for layer in network.layers
        if isinstance(layer, keras.layers.Conv2D | keras.layers.Conv2DTranspose)
    ]
    probe = keras.Model(network.inputs, [layer.output for layer in convs])
    outputs = probe.predict_on_batch(np.zeros((1, tile, tile, 1), np.float32))
    total = 0.0
    for layer, out in zip(convs, outputs, strict=True):
        kh, kw, a, b = layer.kernel.shape
        height, width = out.shape[1:3]
        if isinstance(layer, keras.layers.Conv2DTranspose):  # kernel (kh, kw, out, in)
            sy, sx = layer.strides
            total += 2.0 * (height // sy) * (width // sx) * kh * kw * a * b
        else:
            total += 2.0 * height * width * kh * kw * a * b
    return total


# --- rates -------------------------------------------------------------------------------


def plain_rates(repeats: int) -> dict[str, float]:
    """Best GFLOP/s of plain float32 convolutions and a matrix product in TensorFlow."""
    import tensorflow as tf

    def conv(n: int, side: int, c: int) -> tuple[Callable[[], Any], float]:
        x = tf.random.normal((n, side, side, c))
        k = tf.random.normal((3, 3, c, c))
        fn = tf.function(lambda: tf.nn.conv2d(x, k, 1, "SAME")[0, 0, 0, 0])
        return fn, 2.0 * n * side * side * 9 * c * c

    def matmul(n: int) -> tuple[Callable[[], Any], float]:
        a = tf.random.normal((n, n))
        return tf.function(lambda: tf.linalg.matmul(a, a)[0, 0]), 2.0 * n**3

    cases = {
        "conv3x3_16ch_256px": conv(8, 256, 16),
        "conv3x3_64ch_128px": conv(8, 128, 64),
        "conv3x3_128ch_64px": conv(8, 64, 128),
        "matmul_2048": matmul(2048),
    }
    rates = {name: flops / 1e9 / _best_time(fn, repeats) for name, (fn, flops) in cases.items()}
    rates = {k: round(v, 1) for k, v in rates.items()}
    return {**rates, "best_gflops": max(rates.values())}


def _best_time(fn: Callable[[], Any], repeats: int) -> float:
    return min(_times(fn, repeats))


def _times(fn: Callable[[], Any], repeats: int) -> list[float]:
    np.asarray(fn())  # trace and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.asarray(fn())
        times.append(time.perf_counter() - start)
    return times


def network_rates(
    models: dict[str, dict[str, Any]], repeats: int, peak_gflops: float
) -> dict[str, dict[str, float]]:
    """Tiles per second of the network alone on full batches of the tiles the pipeline
    gives it: each model as the pipeline runs it, the default one-tile-at-a-time, and the
    default under XLA."""
    import tensorflow as tf

    from cellwatch.config import Config, override
    from cellwatch.runtime import load

    out = {}
    size = Config().tiling.batch_size
    for name, entry in models.items():
        if name == "stub":
            continue
        side = entry["tile"]
        batch = np.random.default_rng(0).random((size, side, side, 1), dtype=np.float32)
        model = load(override(Config(), **{"model.path": str(entry["path"])}))
        cases = {name: (model.predict_fn(), batch)}
        if name == "default":
            cases["default_one_tile"] = (model.predict_fn(), batch[:1])
        if name == "default" and model.runtime == "keras":
            net = model.network
            xla = tf.function(lambda x, net=net: net(x, training=False), jit_compile=True)
            cases["default_xla"] = (lambda b, f=xla: f(b).numpy(), batch)
        for case, (fn, data) in cases.items():
            times = _times(lambda fn=fn, data=data: fn(data), repeats)
            seconds = float(np.median(times)) / len(data)
            gflops = entry["flops_per_tile"] / 1e9 / seconds
            out[case] = {
                "tile_px": side,
                "s_per_tile": round(seconds, 5),
                "tiles_per_s": round(1 / seconds, 3),
                "best_tiles_per_s": round(len(data) / min(times), 3),
                "gflops": round(gflops, 1),
                "share_of_peak": round(gflops / peak_gflops, 3),
            }
    return out


# --- end-to-end workloads ----------------------------------------------------------------


class _Counting:
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
            _say(f"{workload} with the {label} setup")
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


def _segmenter(
    model_path: Path, batch_size: int, *, intervals: bool = True, default_config: bool = False
) -> tuple[Any, _Counting]:
    from cellwatch.config import Config, override
    from cellwatch.pipeline import Segmenter
    from cellwatch.runtime import load, resolve

    fixed = None if default_config else 1.0  # None: the default, automatic scale
    settings = {"scale.scale": fixed, "tiling.batch_size": batch_size}
    config = resolve(override(Config(), **settings, **{"model.path": str(model_path)}))
    model = load(config)
    counter = _Counting(model.predict_fn())
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

    segmenter, counter = _segmenter(model_path, batch_size)
    watch, config = segmenter.stopwatch, segmenter.config
    groups = _groups(paths, config.tiling.images_at_once if shared else 1)
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


def _groups(paths: Sequence[Path], size: int) -> Iterator[list[Path]]:
    for i in range(0, len(paths), size):
        yield list(paths[i : i + size])


def _summary(
    rows: list[dict[str, Any]], wall: float, watch: Any, counter: _Counting, start: float
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


# --- memory (in fresh processes) ---------------------------------------------------------


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
        _say(f"peak memory for one {sizes.big}² image")
        spec = {
            "model": str(models["default"]["path"]),
            "paths": [str(data["big"])],
            "out": str(work / "out-big"),
            "intervals": True,
        }
        out["big_image"] = {"side": sizes.big, **_child(spec)}
        _say(f"peak memory for one {sizes.big}² image under the default settings")
        spec = {**spec, "out": str(work / "out-big-default"), "default_config": True}
        out["big_image_default_config"] = {"side": sizes.big, **_child(spec)}
    if "backlog" not in skip:
        _say(f"memory along a backlog of {sizes.backlog} images")
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
    code = "import sys; from cellwatch.bench import memory_child; memory_child(sys.argv[1])"
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
    segmenter, _ = _segmenter(
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
        for n, group in enumerate(_groups(paths, 8), start=1):
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


# --- report ------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the figures came from."""
    import keras
    import tensorflow as tf

    from cellwatch.config import Config
    from cellwatch.runtime import resolve

    chosen = resolve(Config()).inference
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        memory_kb = int(Path("/proc/meminfo").read_text(encoding="utf-8").split()[1])
    except OSError:
        memory_kb = 0
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(memory_kb / 1e6, 1),
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "inference": f"{chosen.runtime} {chosen.precision}",  # what the default config runs
        "commit": _commit(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _commit() -> str:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return "unknown"
    return done.stdout.strip() or "unknown"


def targets(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target of the speed-and-memory issue: the measured value and whether it is met."""
    work, net, mem = report["workloads"], report["network"], report["memory"]
    found: dict[str, tuple[float, float, bool]] = {}  # name: (value, limit, at most?)
    for name in ("mosaic", "burst"):
        value = work[name]["default"]["non_network_share"]
        found[f"non_network_share_{name}"] = (value, TARGETS["non_network_share"], True)
        if "seed" in work[name]:  # the default's time per megapixel ÷ the seed's
            value = work[name]["seed"]["mp_per_s"] / work[name]["default"]["mp_per_s"]
            found[f"default_vs_seed_time_{name}"] = (value, TARGETS["seed_vs_default_time"], True)
    value = net["default"]["share_of_peak"]
    found["network_share_of_peak"] = (value, TARGETS["network_share_of_peak"], False)
    for case in ("big_image", "big_image_default_config"):
        if case in mem:
            target = f"{case}_peak_rss_mb"
            found[target] = (mem[case]["peak_rss_mb"], TARGETS[target], True)
    if "growth_mb" in mem.get("backlog", {}):
        value = mem["backlog"]["growth_mb"]
        found["backlog_growth_mb"] = (value, TARGETS["backlog_growth_mb"], True)
    found["total_s"] = (report["total_s"], TARGETS["total_s"], True)
    return {
        name: {
            "value": round(value, 4),
            "target": f"{'≤' if at_most else '≥'} {limit:g}",
            "met": bool(value <= limit if at_most else value >= limit),
        }
        for name, (value, limit, at_most) in found.items()
    }


def format_table(report: dict[str, Any]) -> str:
    """The human-readable summary printed at the end of a run."""
    m = report["machine"]
    lines = [
        f"cellwatch bench — {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, "
        f"TF {m['tensorflow']}, network on {m.get('inference', 'keras f32')}, "
        f"commit {m['commit']}, {m['date']}",
        f"data: {report['data']}",
        "",
        "plain TensorFlow rates (GFLOP/s): "
        + ", ".join(f"{k} {v}" for k, v in report["peak"].items()),
        "",
        f"{'network alone':<22}{'tile':>5}{'GFLOP/tile':>11}{'tiles/s':>9}{'GFLOP/s':>9}"
        f"{'of peak':>9}",
    ]
    for name, r in report["network"].items():
        model = "seed" if name == "seed" else "default"
        gflop = report["models"][model]["gflop_per_tile"]
        lines.append(
            f"{name:<22}{r.get('tile_px', 256):>5}{gflop:>11.2f}{r['tiles_per_s']:>9.2f}"
            f"{r['gflops']:>9.1f}{r['share_of_peak']:>9.0%}"
        )
    lines += ["", _workload_table(report["workloads"]), ""]
    for name, r in report["memory"].items():
        lines.append(
            f"memory {name}: peak {r['peak_rss_mb']:.0f} MB (after loading the model "
            f"{r['ready_rss_mb']:.0f} MB)"
            + (f", at scale {r['scale']:.3g}" if r.get("scale") is not None else "")
            + (f", growth {r['growth_mb']:+.0f} MB over the backlog" if "growth_mb" in r else "")
        )
    lines += ["", f"total {report['total_s']:.0f} s", "", "targets:"]
    for name, t in report["targets"].items():
        lines.append(
            f"  {'met ' if t['met'] else 'MISS'} {name}: {t['value']} (target {t['target']})"
        )
    return "\n".join(lines)


def _workload_table(work: dict[str, dict[str, Any]]) -> str:
    stages = [
        s for s in STAGES if any(s in r["stage_s"] for w in work.values() for r in w.values())
    ]
    head = (
        f"{'workload':<16}{'MP':>7}{'wall s':>8}{'MP/s':>8}{'÷dflt':>7}{'non-net':>8}"
        f"{'net busy':>9}  "
    )
    lines = [head + " ".join(f"{s[:7]:>7}" for s in stages) + "   (stage time ÷ wall)"]
    for workload, runs in work.items():
        base = runs["default"]["mp_per_s"]
        for label, r in runs.items():
            shares = " ".join(f"{r['stage_share'].get(s, 0):>7.1%}" for s in stages)
            lines.append(
                f"{workload + ' ' + label:<16}{r['megapixels']:>7.2f}{r['wall_s']:>8.1f}"
                f"{r['mp_per_s']:>8.3f}{r['mp_per_s'] / base:>7.2f}"
                f"{r.get('non_network_share', float('nan')):>8.1%}"
                f"{r['network_busy_share']:>9.1%}  {shares}"
            )
    lines.append(
        "non-net: 1 − (the run's batches timed on the network alone) ÷ wall; net busy: share"
        " of wall with a batch in the network; stages overlap across threads"
    )
    return "\n".join(lines)


HEADLINES = (
    "workloads.mosaic.default.mp_per_s",
    "workloads.burst.default.mp_per_s",
    "workloads.mosaic.default.non_network_share",
    "workloads.burst.default.non_network_share",
    "network.default.gflops",
    "network.default.share_of_peak",
    "peak.best_gflops",
    "memory.big_image.peak_rss_mb",
    "memory.big_image_default_config.peak_rss_mb",
    "memory.backlog.growth_mb",
    "total_s",
)


def format_comparison(new: dict[str, Any], old: dict[str, Any]) -> str:
    """New/old ratios of the headline figures (and a warning when machines differ)."""
    lines = ["", "compared with the earlier run (new ÷ old):"]
    if new["machine"].get("cpu") != old.get("machine", {}).get("cpu"):
        lines.append("  note: a different CPU; compare ratios of ratios, not times")
    flat_new, flat_old = _flatten(new), _flatten(old)
    for key in HEADLINES:
        a, b = flat_new.get(key), flat_old.get(key)
        if isinstance(a, int | float) and isinstance(b, int | float) and b:
            lines.append(f"  {key:<46} {b:>10.4g} → {a:>10.4g}  ×{a / b:.2f}")
    return "\n".join(lines)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


if __name__ == "__main__":  # python -m cellwatch.bench, e.g. against an older checkout
    parser = argparse.ArgumentParser(prog="python -m cellwatch.bench")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
