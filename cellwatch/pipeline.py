"""One image in, one ledger row out: read → normalize → rescale → tile → predict →
stitch → label → measure → write.

An image the scale step zooms is never zoomed whole: its tiles are cut from a
:class:`~cellwatch.preprocess.ZoomedSource` and the network's outputs are stitched straight
back onto the image's own grid (:class:`~cellwatch.preprocess.OwnGridStitcher`), where the
cells are labelled. Memory then grows with the image's own size, whatever the zoom.

:class:`Segmenter` holds the model and settings and is pure computation (arrays in,
labels out). :func:`process_image` adds the file I/O around it and never raises for a bad
image: it returns a ``failed`` row instead, so a batch or the daemon keeps going.
A microscope file of several scenes (positions) is several images: :func:`scenes_of` lists
them, and each scene gets its own result, row, label image and overlay (``<stem>_s<k>``).
The driver (:func:`cellwatch.service.driver.record`) appends the results to ``cells.csv``
and ``ledger.csv``.
"""

from __future__ import annotations

__all__ = [
    "ESTIMATE_PASSES",
    "ESTIMATE_WINDOW",
    "IN_FLIGHT_BYTES",
    "WRITE_ASIDE_PIXELS",
    "ImageResult",
    "Segmentation",
    "Segmenter",
    "failed_result",
    "process_image",
    "process_images",
    "read",
    "scenes_of",
    "tiling_for",
    "write_images",
]

import dataclasses
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
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
from cellwatch.errors import BadInputError, CellwatchError, ConfigError, ModelError, TransientError
from cellwatch.measure import measure_cells, summarize
from cellwatch.model import LoadedModel
from cellwatch.postprocess import (
    labels_from_masked_interior,
    labels_from_probabilities,
    masked_interior,
    tidy,
)
from cellwatch.preprocess import Normalization, ZoomedSource, own_grid_stitcher
from cellwatch.scale import ScaleChoice, choose_scale, is_close, typical_diameter
from cellwatch.storage import imageio, overlay
from cellwatch.tiling import (
    MakeStitcher,
    PredictBatch,
    Prepare,
    TileSettings,
    TileSource,
    predict_tiled,
    tile_settings,
)
from cellwatch.timing import Stopwatch

ESTIMATE_WINDOW = 768  # side of the window the cell size is estimated on, in model pixels
ESTIMATE_PASSES = 3  # network passes the cell-size estimate may take
IN_FLIGHT_BYTES = 64 << 20  # process_images admits more images while their files total less
WRITE_ASIDE_PIXELS = 1 << 22  # from 4 MP, an image's files are written while it is measured


@dataclass(frozen=True)
class Segmentation:
    """One image's labels and the scale they were found at."""

    labels: np.ndarray  # int32, the input's shape, ids 1..n
    scale: ScaleChoice


class Segmenter:
    """Segments 2-D images with one model and one configuration."""

    def __init__(
        self,
        config: Config,
        model: LoadedModel,
        predict_batch: PredictBatch | None = None,
        *,
        stopwatch: Stopwatch | None = None,
    ) -> None:
        self.config = config
        self.model = model
        self.tiling = tiling_for(config, model)
        self.stopwatch = stopwatch or Stopwatch()
        self.predict_batch = self.stopwatch.timed("inference", predict_batch or model.predict_fn())
        self._local = threading.local()  # .shared: the SharedBatches of a process_images worker

        def predict_plane(batch: np.ndarray) -> np.ndarray:
            # A three-class output is reduced tile by tile to the one plane labelling needs,
            # so a large image is stitched into a third of the memory.
            out = np.asarray(self.predict_batch(batch))
            if model.classes != 3:
                return out
            if out.ndim != 4 or out.shape[-1] != 3:
                raise ModelError(
                    f"model returned shape {out.shape}; a three-class model must give "
                    "(batch, tile, tile, 3)"
                )
            p = self.config.postprocess
            with self.stopwatch("postprocess"):
                plane = masked_interior(
                    out,
                    interior_threshold=p.interior_threshold,
                    foreground_threshold=p.foreground_threshold,
                )
            return plane[..., None]

        self.predict_plane = predict_plane

    def segment(self, pixels: np.ndarray, pixel_size_um: float | None = None) -> Segmentation:
        """Labels of a 2-D image (raw pixels) and the scale they were found at."""
        norm, watch = self.config.normalize, self.stopwatch
        with watch("normalize"):  # tiles are normalized as they are cut (labels_at)
            normalization = Normalization.of(pixels, norm.low_percentile, norm.high_percentile)
        passes: dict[float, np.ndarray] = {}  # whole-image labels the estimate already made
        choice = choose_scale(
            self.config.scale,
            model_diameter_px=self.model.diameter_px,
            model_pixel_size_um=self.model.pixel_size_um,
            image_pixel_size_um=pixel_size_um,
            estimate_diameter=lambda: self.estimate_diameter(pixels, passes, normalization),
        )
        # The model was trained with ±40 % scale jitter, so a pass already made within 15 %
        # of the chosen scale is as good as a new one.
        reuse = next((s for s in passes if is_close(s, choice.scale)), None)
        if reuse is not None:
            choice = dataclasses.replace(choice, scale=reuse)
            labels = passes.pop(reuse)
        else:
            labels = self.labels_at(pixels, choice.scale, normalization)
        passes.clear()
        with watch("postprocess"):
            labels = tidy(labels, self.config.postprocess.min_cell_area_px, out=labels)
        return Segmentation(labels, choice)

    def labels_at(
        self, image: np.ndarray, scale: float, normalization: Normalization | None = None
    ) -> np.ndarray:
        """Labels of ``image`` as the network sees it zoomed by ``scale``, on the image's
        own grid (int32, ``image.shape``, not yet tidied).

        ``image`` is raw pixels that ``normalization`` normalizes, or without it an image
        normalized already. No float copy of the whole image is made: at scale 1 the tiles
        are normalized as they are cut, at any other scale they are also zoomed as they are
        cut, and their outputs are resampled onto the image's grid as they are stitched.
        """
        p, watch = self.config.postprocess, self.stopwatch
        probs = self.probabilities(image, scale, normalization)
        with watch("postprocess"):
            if self.model.classes == 3:  # the stitched plane's memory becomes the labels
                return labels_from_masked_interior(
                    probs[..., 0],
                    interior_threshold=p.interior_threshold,
                    overwrite=True,
                    split_threshold=p.split_threshold,
                    # a size at the network's scale, as the image's own pixels
                    split_min_area=max(1, round(p.split_min_area_px / scale**2)),
                )
            return labels_from_probabilities(
                probs,
                interior_threshold=p.interior_threshold,
                foreground_threshold=p.foreground_threshold,
            )

    def probabilities(
        self,
        image: np.ndarray,
        scale: float,
        normalization: Normalization | None = None,
        *,
        raw: bool = False,
    ) -> np.ndarray:
        """The tiled network output ``(H, W, C)`` for ``image`` zoomed by ``scale``, on the
        image's own grid (``image`` and ``normalization`` as for :meth:`labels_at`): the
        plane that labelling reads, or with ``raw`` the model's own output, every class.
        """
        t = self.tiling
        source, prepare, stitcher = self._network_input(image, scale, normalization)
        shared: SharedBatches | None = getattr(self._local, "shared", None)
        if shared is not None and not raw:  # in process_images: batches shared with others
            return shared.predict(source, prepare, stitcher=stitcher)
        return predict_tiled(
            source,
            self.predict_batch if raw else self.predict_plane,
            tile=t.tile,
            overlap=t.overlap,
            align=t.align,
            fit=t.fit,
            batch_size=self.config.tiling.batch_size,
            stopwatch=self.stopwatch,
            prepare=prepare,
            stitcher=stitcher,
        )

    def _network_input(
        self, image: np.ndarray, scale: float, normalization: Normalization | None
    ) -> tuple[np.ndarray | TileSource, Prepare | None, MakeStitcher | None]:
        """What the tiles are cut from, what turns them into network input, and what
        stitches the outputs (None: the tiler's own stitcher)."""
        if scale == 1.0:
            prepare = normalization.apply_in_place if normalization is not None else None
            return image, prepare, None
        # Zooming each tile counts as cutting it ("tile"), resampling back as "stitch".
        return ZoomedSource(image, scale, normalization), None, own_grid_stitcher(image.shape)

    def estimate_diameter(
        self,
        image: np.ndarray,
        passes: dict[float, np.ndarray] | None = None,
        normalization: Normalization | None = None,
    ) -> float | None:
        """Typical cell diameter (original pixels) from network passes over a window of
        the image: the first at the image's own scale, then at the corrected scale until
        the correction settles (at most ``ESTIMATE_PASSES`` passes).

        ``image`` and ``normalization`` are as for :meth:`labels_at`. Passes that covered
        the whole image are stored in ``passes`` by scale for reuse.
        """
        target, s = self.model.diameter_px, self.config.scale
        if target is None:
            return None
        passes = {} if passes is None else passes
        scale, diameter = 1.0, None
        for _ in range(ESTIMATE_PASSES):
            size = max(64, round(ESTIMATE_WINDOW / scale))
            found = typical_diameter(  # labels on the image's grid: diameters in its pixels
                self._window_labels(image, size, scale, passes, normalization),
                min_diameter=target / 4 / scale,
            )
            if found is None:
                return diameter
            diameter = found
            corrected = min(max(target / diameter, s.min_scale), s.max_scale)
            if is_close(corrected, scale):
                break
            scale = corrected
        return diameter

    def _window_labels(
        self,
        image: np.ndarray,
        size: int,
        scale: float,
        passes: dict[float, np.ndarray],
        normalization: Normalization | None,
    ) -> np.ndarray:
        window = _window(image, size)
        labels = self.labels_at(window, scale, normalization)
        if window.shape == image.shape:
            passes[scale] = labels
        return labels


def tiling_for(config: Config, model: LoadedModel) -> TileSettings:
    """The tiles ``config`` asks for, aligned to the model's pooling grid; with
    ``tiling.overlap: auto``, an overlap that covers the model's receptive field. Tiles are
    at most ``tiling.tile_size`` and shrink to fit each image. A network whose input size
    is fixed (the seed architecture) gets tiles of that size."""
    t = config.tiling
    tile = model.input_px or t.tile_size
    context = model.context_px if t.overlap == "auto" else None
    try:
        return tile_settings(
            tile,
            t.overlap,
            context_px=context,
            grid_px=model.grid_px,
            fixed_size=model.input_px is not None,
        )
    except ValueError as exc:
        raise ConfigError(f"{config.source}: tiling: {exc}") from exc


@dataclass
class ImageResult:
    """One image's (or one scene's) ledger row and its cells; ``row["scene"]`` is the
    scene of a file of several, else None."""

    row: dict[str, Any]
    cells: pd.DataFrame = field(default_factory=pd.DataFrame)


def scenes_of(path: Path) -> list[int | None]:
    """The images one file holds: ``[0, 1, …]`` for a microscope file of several scenes,
    ``[None]`` for any other file.

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
        result = segmenter.segment(pixels, pixel_size)
        labels, overlays = result.labels, config.output.overlays
        name = imageio.stem(path, scene)
        with _writing(name, pixels, labels, out_dir, overlays, watch) as written:
            with watch("measure"):
                cells = measure_cells(labels, pixels, pixel_size)
                row.update(summarize(cells, labels.shape, pixel_size))
                row.update(
                    scale=result.scale.scale,
                    diameter_px=result.scale.diameter_px,
                    scale_source=result.scale.source,
                    saturated_fraction=quality.saturated_fraction(pixels),
                    focus_score=quality.focus_score(pixels),
                )
            row.update(written())
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
    labels: np.ndarray,
    out_dir: Path,
    overlays: bool,
    watch: Stopwatch,
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

    Up to ``tiling.batch_size`` images are processed at once, each in a thread of its own,
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
    shared = SharedBatches(  # tiled as labels_at tiles an image alone
        segmenter.predict_plane,
        tile=segmenter.tiling.tile,
        overlap=segmenter.tiling.overlap,
        align=segmenter.tiling.align,
        fit=segmenter.tiling.fit,
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
        for k in range(min(len(paths), t.batch_size))
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


def _window(image: np.ndarray, size: int) -> np.ndarray:
    """The central ``size``×``size`` part of ``image`` (all of it when smaller)."""
    y0 = max(0, (image.shape[0] - size) // 2)
    x0 = max(0, (image.shape[1] - size) // 2)
    return image[y0 : y0 + size, x0 : x0 + size]


def _message(exc: BaseException) -> str:
    if isinstance(exc, MemoryError):
        return "ran out of memory processing this image; lower input.max_pixels or add memory"
    return str(exc).replace("\n", " ")
