"""Shared fixtures: tiny models that load through the real model loader, and disc images
with known answers."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest
import tifffile
from allowed_skips import (  # noqa: F401  (hooks: under CI, only the allowed skips)
    pytest_collectreport,
    pytest_runtest_logreport,
    pytest_sessionfinish,
)

from cellwatch.model import write_card

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dsb2018-fluo"


def save_threshold_model(
    path: Path, *, diameter_px: float | None = None, classes: int = 3, threshold: float = 0.5
) -> Path:
    """A Keras model with hand-set weights that calls a pixel "interior" when its normalized
    intensity is above ``threshold`` (0.5): a pointwise rule, so its answers are known
    exactly; two thresholds make two models that count dim cells differently."""
    import keras
    from keras import layers

    inputs = keras.Input((None, None, 1))
    if classes == 3:
        conv = layers.Conv2D(3, 1, activation="softmax", name="probabilities")
        outputs = conv(inputs)
        bias = 40.0 * threshold
        conv.set_weights([np.array([[[[-40.0, 40.0, 0.0]]]]), np.array([bias, -bias, -50.0])])
    else:
        conv = layers.Conv2D(1, 1, activation="sigmoid", name="probabilities")
        outputs = conv(inputs)
        conv.set_weights([np.array([[[[40.0]]]]), np.array([-40.0 * threshold])])
    keras.Model(inputs, outputs).save(path)
    write_card(path, {"name": path.stem, "diameter_px": diameter_px})
    return path


@pytest.fixture(scope="session")
def threshold_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-class threshold model with no trained diameter (images keep their own scale)."""
    return save_threshold_model(tmp_path_factory.mktemp("models") / "threshold.keras")


@pytest.fixture(scope="session")
def sized_threshold_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same rule, declaring it was trained on cells 20 px across."""
    return save_threshold_model(
        tmp_path_factory.mktemp("models") / "threshold20.keras", diameter_px=20.0
    )


def discs(
    shape: tuple[int, int],
    centres: list[tuple[int, int]],
    radius: float,
    value: int = 200,
    background: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """An 8-bit image of bright discs and its true label image."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.int32)
    for i, (cy, cx) in enumerate(centres, start=1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = i
    image = np.where(labels > 0, value, background).astype(np.uint8)
    return image, labels


def ome_header(planes: np.ndarray) -> str:
    """OME-XML declaring ``planes`` (Z, Y, X) as one Z-stack, as a microscope writes it
    into the first page before the planes are acquired."""
    ome = tifffile.OmeXml()
    z, y, x = planes.shape
    ome.addimage(planes.dtype, planes.shape, (z, 1, 1, y, x, 1), axes="ZYX")
    return ome.tostring()


def imagej_header(n_planes: int) -> str:
    """An ImageJ hyperstack description declaring ``n_planes`` Z planes."""
    return f"ImageJ=1.54f\nimages={n_planes}\nslices={n_planes}\n"


def write_pages(fh: BinaryIO, planes: np.ndarray, header: str) -> Iterator[int]:
    """Write ``planes`` into the open file ``fh`` one TIFF page at a time, as a microscope
    writes a stack: ``header`` in the first page, each page linked to the last one and
    flushed to disk before the number of pages written so far is yielded."""
    with tifffile.TiffWriter(fh) as tif:
        for i, plane in enumerate(planes):
            description = header if i == 0 else None
            tif.write(plane, description=description, metadata=None, contiguous=False)
            fh.flush()
            yield i + 1


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Fail a test that leaves threads running behind it."""
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon]
    assert not leaked, f"test leaked threads: {leaked}"


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Converted models (``inference.cache_dir``'s default) go to a folder of this test
    session, shared by its tests and the commands they start, not the user's cache."""
    folder = tmp_path_factory.mktemp("xdg-cache")
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(folder)
    yield folder / "cellwatch"
    if before is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = before


def load_with(model_path: Path | None, runtime: str = "openvino", precision: str = "f32") -> Any:
    """A model loaded as ``predict`` loads it, with this runtime and precision."""
    from cellwatch.config import Config, override
    from cellwatch.runtime import load

    settings = {"inference.runtime": runtime, "inference.precision": precision}
    if model_path is not None:
        settings["model.path"] = str(model_path)
    return load(override(Config(), **settings))
