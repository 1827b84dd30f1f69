"""One image in, one ledger row out: read → normalize → rescale → tile → predict →
stitch → label → measure → write.

An image the scale step zooms is never zoomed whole: its tiles are cut from a
:class:`~cellwatch.preprocess.ZoomedSource` and the network's outputs are stitched straight
back onto the image's own grid (:class:`~cellwatch.preprocess.OwnGridStitcher`), where the
cells are labelled. Memory then grows with the image's own size, whatever the zoom.

:class:`Segmenter` holds the model and settings and is pure computation (arrays in,
labels out). :func:`process_image` adds the file I/O around it and never raises for a bad
image: it returns a ``failed`` row instead, so a batch or the daemon keeps going.
A file of several scenes (a microscope file's positions, an OME-TIFF's series) is several images: :func:`scenes_of` lists
them, and each scene gets its own result, row, label image and overlay (``<stem>_s<k>``).
The driver (:func:`cellwatch.service.driver.record`) appends the results to ``cells.csv``
and ``ledger.csv``.
"""

from __future__ import annotations

__all__ = [
    "WRITE_ASIDE_PIXELS",
    "Counted",
    "ImageResult",
    "Segmentation",
    "Segmenter",
    "count_pixels",
    "failed_result",
    "files_writer",
    "process_image",
    "process_images",
    "read",
    "scenes_of",
]

import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cellwatch import quality
from cellwatch.batching import SharedBatches
from cellwatch.config import Config
from cellwatch.errors import BadInputError, CellwatchError, TransientError
from cellwatch.measure import measure_cells, summarize
from cellwatch.segmenter import Segmentation, Segmenter
from cellwatch.storage import imageio, overlay
from cellwatch.timing import Stopwatch

IN_FLIGHT_BYTES = 64 << 20  # process_images admits more images while their files total less
WRITE_ASIDE_PIXELS = 1 << 22  # from 4 MP, an image's files are written while it is measured


@dataclass
class ImageResult:
    """One image's (or one scene's) ledger row and its cells; ``row["scene"]`` is the
    scene of a file of several, else None."""

    row: dict[str, Any]
    cells: pd.DataFrame = field(default_factory=pd.DataFrame)


def scenes_of(path: Path) -> list[int | None]:
    """The images one file holds: ``[0, 1, …]`` for a file of several scenes (a microscope
    file's scenes, an OME-TIFF's positions), ``[None]`` for any other file.

    A file that does not open is ``[None]`` too: processing it then gives its one
    ``failed`` row with the reader's error. A :class:`TransientError` is raised.
    """
    try:
        count = imageio.scene_count(path)
    except BadInputError:
        return [None]
    return list(range(count)) if count > 1 else [None]


def process_image(
    path: Path,
    *,
    config: Config,
    segmenter: Segmenter,
    out_dir: Path,
    job_id: str,
    scene: int | None = None,
) -> ImageResult:
    """Segment and measure one image file (or one scene of it, see :func:`scenes_of`) and
    write its label image and overlay.

    Bad input never raises: it comes back as a ``failed`` row whose ``error`` says why.
    A :class:`TransientError` (a full disk, a share that went away) is raised, so the
    caller can retry; :func:`failed_result` turns it into a row once retries are over.
    """
    started, watch = time.perf_counter(), segmenter.stopwatch
    row: dict[str, Any] = {
        "image": str(path),
        "model": segmenter.model.label,
        "settings_hash": config.settings_hash(),
        "job_id": job_id,
        "scene": scene,
    }
    try:
        with watch("read"):
            data = read(path, config, scene)  # first: it names what is wrong with a bad file
            row["sha256"] = _hash(path)
        pixels, pixel_size = data.pixels, config.scale.pixel_size_um or data.pixel_size_um
        row.update(height=pixels.shape[0], width=pixels.shape[1], pixel_size_um=pixel_size)
        row["channel"] = data.channel
        writing = files_writer(imageio.stem(path, scene), pixels, out_dir, config, watch)
        counted = count_pixels(pixels, pixel_size, segmenter, writing=writing)
        cells = counted.cells
        row.update(counted.fields)
    except TransientError:
        raise
    except (CellwatchError, MemoryError) as exc:
        return failed_result(
            path,
            exc,
            model=segmenter.model.label,
            config=config,
            job_id=job_id,
            started=started,
            row=row,
            scene=scene,
        )
    cells.insert(0, "image", str(path))
    cells.insert(1, "job_id", job_id)
    cells["scene"] = scene
    row.update(
        status="ok",
        duration_s=round(time.perf_counter() - started, 3),
        processed_at=datetime.now(UTC).isoformat(),
    )
    return ImageResult(row, cells)


@dataclass(frozen=True)
class Counted:
    """One image counted: its labels, its per-cell table, and the ledger row's numbers."""

    labels: np.ndarray  # int32, the image's shape, cells 1..n
    cells: pd.DataFrame  # one row per cell (:func:`cellwatch.measure.measure_cells`)
    fields: dict[str, Any]  # size, pixel size, count and areas, scale, familiarity, quality


#: Given an image's labels, a context that writes its files (or starts writing them) and
#: yields a function that waits for them and returns their ledger columns.
Writing = Callable[[np.ndarray], AbstractContextManager[Callable[[], dict[str, str]]]]


def count_pixels(
    pixels: np.ndarray,
    pixel_size_um: float | None,
    segmenter: Segmenter,
    *,
    writing: Writing | None = None,
) -> Counted:
    """Segment and measure one 2-D image: the one way every entry point counts (the CLI,
    the daemon and the Dask workers through :func:`process_image`, the Python API
    :func:`cellwatch.count` on arrays).

    ``writing`` writes the image's files once its labels exist (a large image's while its
    cells are measured); their paths join the fields.
    """
    if pixels.ndim != 2:
        raise BadInputError(
            f"expected one 2-D image (height, width), got an array of shape {pixels.shape}; "
            "pick one channel and one plane first"
        )
    result = segmenter.segment(pixels, pixel_size_um)
    labels = result.labels
    fields: dict[str, Any] = {
        "height": pixels.shape[0],
        "width": pixels.shape[1],
        "pixel_size_um": pixel_size_um,
    }
    with (writing or _no_files)(labels) as written:
        with segmenter.stopwatch("measure"):
            cells = measure_cells(labels, pixels, pixel_size_um)
            fields.update(summarize(cells, labels.shape, pixel_size_um))
            fields.update(
                scale=result.scale.scale,
                diameter_px=result.scale.diameter_px,
                scale_source=result.scale.source,
                familiarity=result.familiarity.score,
                saturated_fraction=quality.saturated_fraction(pixels),
                focus_score=quality.focus_score(pixels),
            )
        fields.update(written())
    return Counted(labels, cells, fields)


def files_writer(
    name: str, pixels: np.ndarray, out_dir: Path, config: Config, stopwatch: Stopwatch
) -> Writing:
    """What writes the label image (and overlay, as ``output.overlays`` says) of the image
    called ``name`` into ``out_dir``, for :func:`count_pixels`."""
    return partial(_writing, name, pixels, out_dir, config.output.overlays, stopwatch)


@contextmanager
def _no_files(labels: np.ndarray) -> Iterator[Callable[[], dict[str, str]]]:
    yield dict


def _hash(path: Path) -> str:
    try:
        return imageio.sha256_file(path)
    except OSError as exc:  # read a moment ago: a passing fault, worth a retry
        raise TransientError(f"{path} could not be read: {exc}; will try again") from exc


def read(path: Path, config: Config, scene: int | None = None) -> imageio.ImageData:
    """Read an image file (or one scene of it) as the ``input`` settings say."""
    return imageio.read_image(
        path,
        channel=config.input.channel,
        stack=config.input.stack,
        plane=config.input.plane,
        max_pixels=config.input.max_pixels,
        scene=scene,
        nuclear_channels=config.input.nuclear_channels,
    )


def write_images(
    name: str, pixels: np.ndarray, labels: np.ndarray, out_dir: Path, overlays: bool
) -> dict[str, str]:
    """Write the label image (and overlay) of the image called ``name`` (its
    :func:`~cellwatch.storage.imageio.stem`); returns their paths for the ledger."""
    files = _output_files(name, pixels, labels, out_dir, overlays)
    for write in files.values():
        write()
    return {column: str(write.args[0]) for column, write in files.items()}


def _output_files(
    name: str, pixels: np.ndarray, labels: np.ndarray, out_dir: Path, overlays: bool
) -> dict[str, partial[None]]:
    """The ledger column of each output file, and the call that writes it."""
    files = {"labels": partial(imageio.write_labels, out_dir / "labels" / f"{name}.tif", labels)}
    if overlays:
        overlay_path = out_dir / "overlays" / f"{name}.png"
        files["overlay"] = partial(overlay.write_overlay, overlay_path, pixels, labels)
    return files


@contextmanager
def _writing(
    name: str,
    pixels: np.ndarray,
    out_dir: Path,
    overlays: bool,
    watch: Stopwatch,
    labels: np.ndarray,
) -> Iterator[Callable[[], dict[str, str]]]:
    """Yield a function that writes the image's files (:func:`write_images`), or waits for
    them, and returns their paths.

    A large image's files are written in threads of their own from the start, while the
    caller measures it: the network is idle by then, so on two cores the label image,
    the overlay and the measuring run side by side. Small images are written when asked,
    in the caller's thread: other images keep the cores busy (and a thread costs more).
    """
    if pixels.size < WRITE_ASIDE_PIXELS:

        def write_now() -> dict[str, str]:
            with watch("write"):
                return write_images(name, pixels, labels, out_dir, overlays)

        yield write_now
        return
    files = _output_files(name, pixels, labels, out_dir, overlays)
    with ThreadPoolExecutor(len(files), thread_name_prefix="cellwatch-write") as pool:
        futures = {column: pool.submit(_timed, watch, write) for column, write in files.items()}

        def wait() -> dict[str, str]:
            for future in futures.values():
                future.result()  # raises what the writer raised
            return {column: str(write.args[0]) for column, write in files.items()}

        yield wait


def _timed(watch: Stopwatch, write: Callable[[], object]) -> None:
    with watch("write"):
        write()


def failed_result(
    path: Path,
    exc: BaseException,
    *,
    model: str,
    config: Config,
    job_id: str,
    started: float | None = None,
    row: dict[str, Any] | None = None,
    scene: int | None = None,
) -> ImageResult:
    """The ``failed`` ledger row for an image (or one scene of a file), with the reason in
    words."""
    row = dict(
        row
        or {
            "image": str(path),
            "model": model,
            "settings_hash": config.settings_hash(),
            "job_id": job_id,
        }
    )
    row.setdefault("scene", scene)
    row.update(
        status="failed",
        error=_message(exc),
        processed_at=datetime.now(UTC).isoformat(),
        duration_s=round(time.perf_counter() - started, 3) if started is not None else None,
    )
    return ImageResult(row)


def process_images(
    paths: Sequence[Path],
    *,
    config: Config,
    segmenter: Segmenter,
    out_dir: Path,
    job_ids: Sequence[str],
    scenes: Sequence[int | None] | None = None,
) -> list[ImageResult]:
    """:func:`process_image` for several images, results in the same order.

    Without ``scenes``, each file's images are those :func:`scenes_of` lists, so a file of
    several scenes gives one result per scene, in file order then scene order. With
    ``scenes`` (one per path, a path repeated for several of its scenes), exactly those
    are processed: the daemon passes the scenes whose rows have not landed yet.

    Up to ``tiling.images_at_once`` images are processed at once, each in a thread of its own,
    while their files total less than :data:`IN_FLIGHT_BYTES` (one image is always
    admitted; the scenes of one file share its size). Their tiles share inference batches
    (:class:`~cellwatch.batching.SharedBatches`), so a burst of small images fills every
    batch, and one image is read, labelled, measured and written while the network works
    on another. Each result is what :func:`process_image` gives that image alone. As
    there, a :class:`TransientError` (or any unexpected error) is raised, the first in
    input order, once every image is done.
    """
    paths, job_ids = list(paths), list(job_ids)
    if len(paths) != len(job_ids):
        raise ValueError(f"{len(paths)} paths but {len(job_ids)} job ids")
    if scenes is None:
        units = [(p, j, s) for p, j in zip(paths, job_ids, strict=True) for s in scenes_of(p)]
        paths = [p for p, _, _ in units]
        job_ids = [j for _, j, _ in units]
        scenes = [s for _, _, s in units]
    scenes = list(scenes)
    if len(scenes) != len(paths):
        raise ValueError(f"{len(paths)} paths but {len(scenes)} scenes")
    kwargs: dict[str, Any] = {"config": config, "segmenter": segmenter, "out_dir": out_dir}
    if len(paths) <= 1:
        return [
            process_image(p, job_id=j, scene=s, **kwargs)
            for p, j, s in zip(paths, job_ids, scenes, strict=True)
        ]
    t = segmenter.config.tiling
    # tiled as labels_at tiles an image alone
    shared = SharedBatches(
        segmenter.predict_plane,
        segmenter.tiling,
        batch_size=t.batch_size,
        stopwatch=segmenter.stopwatch,
    )
    results: list[ImageResult | None] = [None] * len(paths)
    errors: list[BaseException | None] = [None] * len(paths)
    todo = iter(range(len(paths)))
    shares = Counter(paths)  # each scene of a file counts as an equal share of its size
    admit = _Admission(IN_FLIGHT_BYTES)
    lock = threading.Lock()

    def worker() -> None:
        segmenter._local.shared = shared
        try:
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                size = _file_size(paths[i]) // shares[paths[i]]
                with shared.paused():  # others' batches need not wait for this one
                    admit.acquire(size)
                try:
                    results[i] = process_image(
                        paths[i], job_id=job_ids[i], scene=scenes[i], **kwargs
                    )
                except BaseException as exc:  # re-raised in the caller's thread below
                    errors[i] = exc
                finally:
                    admit.release(size)
        finally:
            shared.remove_worker()

    threads = [
        threading.Thread(target=worker, name=f"cellwatch-image-{k}")
        for k in range(min(len(paths), t.images_at_once))
    ]
    shared.add_workers(len(threads))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for error in errors:
        if error is not None:
            raise error
    return [r for r in results if r is not None]


class _Admission:
    """Admits work while the bytes in flight stay under a limit; one item always fits."""

    def __init__(self, limit: int) -> None:
        self.limit, self.in_flight = limit, 0
        self._cond = threading.Condition()

    def acquire(self, size: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.in_flight == 0 or self.in_flight + size <= self.limit)
            self.in_flight += size

    def release(self, size: int) -> None:
        with self._cond:
            self.in_flight -= size
            self._cond.notify_all()


def _file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:  # process_image reports the file as it finds it
        return 0


def _message(exc: BaseException) -> str:
    if isinstance(exc, MemoryError):
        return "ran out of memory processing this image; lower input.max_pixels or add memory"
    return str(exc).replace("\n", " ")
