"""The network's speed alone: the best rates TensorFlow reaches on plain convolutions and a
matrix product, the FLOPs of each benchmarked model, and its tiles per second."""

from __future__ import annotations

__all__ = ["conv_flops_per_tile", "network_rates", "plain_rates", "prepare_models"]

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cellwatch.bench.inputs import Sizes, saved_model, stub_model


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
        path = saved_model(folder / "unet.keras", build_unet(filters=sizes.unet_filters))
        models["default"] = {"path": path, "about": "untrained build_unet() (no trained model)"}
    if seed is not None:
        models["seed"] = {"path": seed, "about": f"{seed} (trained)"}
    else:
        path = saved_model(folder / "seed.keras", build_seed_unet(filters=sizes.seed_filters))
        models["seed"] = {"path": path, "about": "untrained build_seed_unet() (the architecture)"}
    models["stub"] = {"path": stub_model(folder / "stub.keras"), "about": "1x1 conv threshold"}
    for name, entry in models.items():  # the seed architecture takes 256² tiles only
        entry["tile"] = 256 if name == "seed" else Config().tiling.tile_size
        entry["flops_per_tile"] = conv_flops_per_tile(entry["path"], entry["tile"])
        entry["about"] = {
            "model": entry["about"],
            "tile_px": entry["tile"],
            "gflop_per_tile": entry["flops_per_tile"] / 1e9,
        }
    return models


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
    from cellwatch.runtime import load, predict_fn

    out = {}
    size = Config().tiling.batch_size
    for name, entry in models.items():
        if name == "stub":
            continue
        side = entry["tile"]
        batch = np.random.default_rng(0).random((size, side, side, 1), dtype=np.float32)
        model = load(override(Config(), **{"model.path": str(entry["path"])}))
        cases = {name: (predict_fn(model), batch)}
        if name == "default":
            cases["default_one_tile"] = (predict_fn(model), batch[:1])
        if name == "default":  # TensorFlow's own best on the same network, whatever runs it
            from cellwatch.model import load_model

            net = model.network if model.runtime == "keras" else load_model(entry["path"]).network
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
