"""The calibration set that lets a model run at int8: tiles the network is given for
training images, kept beside the model so a PC without the training data can convert it.

OpenVINO's int8 needs the range of every layer's activations, measured on inputs like the
ones it will count (NNCF post-training quantization). The set is recorded while the
whole pipeline segments ``train`` images at f32 (normalized, zoomed to the working
diameter, with the tiles' margins) and stored whole as 8 bits per pixel with each tile's
range: ``NAME.calibration.npz`` beside ``NAME.keras``. Never ``val`` images:
they judge the result.

Usage::

    python -m cellwatch.training.calibration --model my.keras --images train/images
"""

from __future__ import annotations

__all__ = ["main", "pack_tiles", "record_tiles", "write_calibration"]

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cellwatch.config import Config, override, with_card_input
from cellwatch.pipeline import Segmenter, read
from cellwatch.runtime import calibration_path, load


def record_tiles(model_path: Path, images: Sequence[Path]) -> list[np.ndarray]:
    """The batches ``(B, H, W, C)`` the network is given while the pipeline counts
    ``images`` with ``model_path`` at f32 (default settings otherwise)."""
    config = override(
        Config(),
        **{
            "model.path": str(model_path),
            "inference.runtime": "openvino",
            "inference.precision": "f32",
        },
    )
    model = load(config)
    config = with_card_input(config, model.card)
    seen: list[np.ndarray] = []
    plain = Segmenter(config, model).predict_batch

    def recording(batch: np.ndarray) -> np.ndarray:
        seen.append(np.array(batch, dtype=np.float32))
        return plain(batch)

    segmenter = Segmenter(config, model, predict_batch=recording)
    for path in images:
        segmenter.segment(read(path, config).pixels)
    return seen


def pack_tiles(batches: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """The recorded tiles, whole, as 8 bits per pixel: ``pixels`` (all tiles, flat),
    ``shapes`` ``(N, 3)`` (height, width, channels) and the ``low`` and ``high`` each
    tile's 0 and 255 stand for (:func:`cellwatch.runtime.read_calibration` reads them)."""
    planes = [np.asarray(tile, np.float32) for batch in batches for tile in batch]
    if not planes:
        raise ValueError("no tiles were recorded: were the calibration images empty?")
    low = np.array([p.min() for p in planes], np.float32)
    high = np.maximum(np.array([p.max() for p in planes], np.float32), low + 1e-6)
    flat = [
        np.round((p - lo) / (hi - lo) * 255).astype(np.uint8).ravel()
        for p, lo, hi in zip(planes, low, high, strict=True)
    ]
    shapes = np.array([p.shape for p in planes], np.int64)
    return {"pixels": np.concatenate(flat), "shapes": shapes, "low": low, "high": high}


def write_calibration(model_path: Path, images: Sequence[Path]) -> Path:
    """Record the tiles of ``images`` and write them beside the model
    (``NAME.calibration.npz``); returns its path."""
    if not images:
        raise ValueError("no calibration images given: pass a folder of training images")
    tiles = pack_tiles(record_tiles(model_path, images))
    path = calibration_path(model_path)
    tmp = path.with_name(path.name + ".tmp.npz")
    names = np.array([p.name for p in images])
    np.savez_compressed(tmp, images=names, **tiles)
    tmp.replace(path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="the .keras model")
    parser.add_argument("--images", type=Path, required=True, help="folder of training images")
    parser.add_argument("--limit", type=int, default=40, help="images to use, spread evenly")
    args = parser.parse_args(argv)
    found = sorted(p for p in args.images.iterdir() if p.is_file() and not p.name.startswith("."))
    if not found:
        print(f"no images in {args.images}: pass the folder of training images", file=sys.stderr)
        return 2
    step = max(1, len(found) // args.limit)
    path = write_calibration(args.model, found[::step][: args.limit])
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
