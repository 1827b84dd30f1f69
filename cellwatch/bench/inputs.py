"""What the benchmarks run on: images built from nucleus crops (or synthetic discs), and a
stub network. Public, so that the scripts in ``benchmarks/`` build the same inputs as
``cellwatch bench``.

Nothing here knows where a checkout keeps its data: the nucleus images come from the
folder a caller names (``cellwatch bench --data``, or the ``CELLWATCH_BENCH_DATA``
environment variable), and without one the images are synthetic discs.
"""

from __future__ import annotations

__all__ = [
    "DATA_VARIABLE",
    "QUICK",
    "Sizes",
    "crops",
    "default_data",
    "discs",
    "make_inputs",
    "mosaic",
    "saved_model",
    "stub_model",
]

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: The environment variable that names the default folder of nucleus images.
DATA_VARIABLE = "CELLWATCH_BENCH_DATA"


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


def default_data() -> Path | None:
    """The folder of nucleus images named by ``$CELLWATCH_BENCH_DATA``, or None."""
    named = os.environ.get(DATA_VARIABLE)
    return Path(named) if named else None


def make_inputs(folder: Path, sizes: Sizes, source: Path | None = None) -> dict[str, Any]:
    """Write the workloads' 16-bit TIFFs: a mosaic, a burst of small images, a big mosaic,
    from ``source``'s nucleus images (see :func:`crops`)."""
    import tifffile

    folder.mkdir(parents=True, exist_ok=True)
    pieces = crops(sizes.small, source)
    mosaic_path, big = folder / "mosaic.tif", folder / "big.tif"
    tifffile.imwrite(mosaic_path, mosaic(pieces, sizes.mosaic))
    tifffile.imwrite(big, mosaic(pieces, sizes.big))
    burst = []
    for i in range(sizes.burst):
        path = folder / "burst" / f"img{i:04d}.tif"
        path.parent.mkdir(exist_ok=True)
        tifffile.imwrite(path, np.rot90(pieces[i % len(pieces)], i // len(pieces)))
        burst.append(path)
    if source is None:
        about = "synthetic discs (no folder of nucleus images given: --data)"
    elif source.is_dir() and any(source.glob("*/images/*.tif")):
        about = f"{len(pieces)} crops of {source}"
    else:
        about = f"synthetic discs (no images in {source})"
    return {"mosaic": mosaic_path, "burst": burst, "big": big, "source": about}


def crops(side: int, source: Path | None) -> list[np.ndarray]:
    """16-bit ``side``² crops of the images ``source/*/images/*.tif`` (a DSB 2018 layout:
    ``train/images``, ``val/images``), or 16 images of synthetic discs without them."""
    import tifffile

    paths = sorted(source.glob("*/images/*.tif")) if source and source.is_dir() else []
    found = []
    for path in paths:
        image = tifffile.imread(path)
        if image.ndim == 2 and min(image.shape) >= side:
            found.append(image[:side, :side].astype(np.uint16) * 257)
    return found or [discs(side, seed) for seed in range(16)]


def discs(side: int, seed: int) -> np.ndarray:
    """A ``side``² 16-bit image of 40 bright discs (radius 5–12 px) on a noisy background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    image = np.full((side, side), 2000.0)
    for cy, cx, r in zip(*rng.uniform(0, side, (2, 40)), rng.uniform(5, 12, 40), strict=True):
        image[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 30000.0
    return (image + rng.normal(0, 500, image.shape)).clip(0, 65535).astype(np.uint16)


def mosaic(pieces: list[np.ndarray], side: int) -> np.ndarray:
    """A ``side``² mosaic of equal square crops, cycled with rotations.

    >>> mosaic([np.ones((4, 4), np.uint16), np.zeros((4, 4), np.uint16)], 6).shape
    (6, 6)
    """
    tile = pieces[0].shape[0]
    n = -(-side // tile)
    out = np.zeros((n * tile, n * tile), np.uint16)
    for k in range(n * n):
        y, x = divmod(k, n)
        crop = np.rot90(pieces[k % len(pieces)], k // len(pieces))
        out[y * tile : (y + 1) * tile, x * tile : (x + 1) * tile] = crop
    return out[:side, :side]


def saved_model(path: Path, network: Any) -> Path:
    """Save a network with a card for 20 px cells; returns ``path``."""
    from cellwatch.model import write_card

    network.save(path)
    write_card(path, {"diameter_px": 20.0})
    return path


def stub_model(path: Path) -> Path:
    """A three-class 1×1 convolution that calls bright pixels cell interior: a stand-in
    network that costs nothing, for measuring the rest of the pipeline's memory."""
    import keras

    inputs = keras.Input((None, None, 1))
    conv = keras.layers.Conv2D(3, 1, activation="softmax", name="probabilities")
    outputs = conv(inputs)
    conv.set_weights([np.array([[[[-40.0, 40.0, 0.0]]]]), np.array([20.0, -20.0, -50.0])])
    return saved_model(path, keras.Model(inputs, outputs))
