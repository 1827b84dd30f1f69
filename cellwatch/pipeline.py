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

import dataclasses
import math
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

from cellwatch import familiarity, quality
from cellwatch.batching import SharedBatches
from cellwatch.config import Config, ScaleConfig
from cellwatch.errors import BadInputError, CellwatchError, ConfigError, ModelError, TransientError
from cellwatch.measure import measure_cells, summarize
from cellwatch.model import LoadedModel
from cellwatch.postprocess import (
    labels_from_masked_interior,
    labels_from_probabilities,
    masked_distance,
    masked_interior,
    tidy,
)
from cellwatch.preprocess import Normalization, ZoomedSource, own_grid_stitcher
from cellwatch.scale import (
    PYRAMID,
    Reading,
    ScaleChoice,
    choose_reading,
    choose_scale,
    is_close,
    large_nuclei_growth,
    typical_diameter,
)
from cellwatch.storage import imageio, overlay
from cellwatch.tiling import (
    MakeStitcher,
    PredictBatch,
    Prepare,
    TileQueue,
    TileSettings,
    TileSource,
    predict_tiled,
    tile_settings,
)
from cellwatch.timing import Stopwatch

_Labelled = tuple[np.ndarray, float | None]  # labels, and the network's confidence in them
ESTIMATE_WINDOW = 768  # side of the window the cell size is estimated on, in model pixels
ESTIMATE_WINDOW_MAX = 2048  # ... and at most this many of the image's pixels
PYRAMID_MIN_SIDE = 32  # a pyramid level that would show the network less than this is skipped
REFINE_PASSES = 2  # network passes that refine the size the pyramid found
IN_FLIGHT_BYTES = 64 << 20  # process_images admits more images while their files total less
WRITE_ASIDE_PIXELS = 1 << 22  # from 4 MP, an image's files are written while it is measured


@dataclass(frozen=True)
class Segmentation:
    """One image's labels, the scale they were found at and how familiar the image looks
    to the model (:mod:`cellwatch.familiarity`)."""

    labels: np.ndarray  # int32, the input's shape, ids 1..n
    scale: ScaleChoice
    familiarity: familiarity.Familiarity


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
        from cellwatch.runtime import predict_fn  # the runtime that loaded the model runs it

        self.predict_batch = self.stopwatch.timed("inference", predict_batch or predict_fn(model))
        self._local = threading.local()  # .shared: the SharedBatches of a process_images worker
        try:
            self._familiar_reference = familiarity.reference_from_card(model.card)
        except ValueError as exc:
            raise ModelError(f"{model.name}: {exc}") from exc

        def predict_plane(batch: np.ndarray) -> np.ndarray:
            # A three-class output is reduced tile by tile to the one plane labelling
            # needs, so a large image is stitched into a third of the memory. A seed
            # head's output becomes two planes: the masked inner distance, which labels
            # the cells, and the masked interior, which the size estimate labels.
            out = np.asarray(self.predict_batch(batch))
            if model.classes not in (3, 4):
                return out
            if out.ndim != 4 or out.shape[-1] != model.classes:
                raise ModelError(
                    f"model returned shape {out.shape}; a {model.classes}-channel model "
                    f"must give (batch, tile, tile, {model.classes})"
                )
            p = self.config.postprocess
            with self.stopwatch("postprocess"):
                if model.classes == 4:  # seeds and flooding from the learned inner distance
                    seeded = masked_distance(out, foreground_threshold=p.foreground_threshold)
                    interior = masked_interior(
                        out[..., :3],
                        interior_threshold=p.interior_threshold,
                        foreground_threshold=p.foreground_threshold,
                    )
                    return np.stack([seeded, interior], axis=-1)
                plane = masked_interior(
                    out,
                    interior_threshold=p.interior_threshold,
                    foreground_threshold=p.foreground_threshold,
                )
            return plane[..., None]

        self.predict_plane = predict_plane

    def segment(self, pixels: np.ndarray, pixel_size_um: float | None = None) -> Segmentation:
        """Labels of a 2-D image (raw pixels), the scale they were found at and the
        image's familiarity."""
        norm, watch = self.config.normalize, self.stopwatch
        with watch("normalize"):  # tiles are normalized as they are cut (labels_at)
            normalization = Normalization.of(pixels, norm.low_percentile, norm.high_percentile)
        passes: dict[float, _Labelled] = {}  # whole-image labels the estimate already made
        choice = choose_scale(
            self.config.scale,
            model_diameter_px=self.model.working_diameter_px,
            model_pixel_size_um=self.model.working_pixel_size_um,
            image_pixel_size_um=pixel_size_um,
            estimate_diameter=lambda: self.estimate_diameter(pixels, passes, normalization),
            growth=large_nuclei_growth(self.config.scale, self.model.card),
        )
        at_bound = _at_bound(choice, self.config.scale)
        # The model was trained with ±40 % scale jitter, so a pass already made within 15 %
        # of the chosen scale is as good as a new one.
        reuse = next((s for s in passes if is_close(s, choice.scale)), None)
        if reuse is not None:
            choice = dataclasses.replace(choice, scale=reuse)
            labels, confidence = passes.pop(reuse)
        else:
            labels, confidence = self._labelled(pixels, choice.scale, normalization)
        passes.clear()
        with watch("postprocess"):
            labels = tidy(labels, _min_area(self.config, choice.scale), out=labels)
        with watch("familiarity"):
            familiar = familiarity.measure(
                pixels,
                labels,
                normalization,
                scale=choice.scale,
                confidence=confidence,
                at_bound=at_bound,
                reference=self._familiar_reference,
            )
        return Segmentation(labels, choice, familiar)

    def labels_at(
        self,
        image: np.ndarray,
        scale: float,
        normalization: Normalization | None = None,
        *,
        seed_map: bool = True,
    ) -> np.ndarray:
        """Labels of ``image`` as the network sees it zoomed by ``scale``, on the image's
        own grid (int32, ``image.shape``, not yet tidied).

        A model with a seed head labels cells from its seed map, or with ``seed_map``
        False from its three classes as a three-class model does (what the size estimate
        uses: the seed map is normalized per cell, so at the wrong scale it breaks a large
        nucleus into pieces of the trained size, and the estimate would settle on them).

        ``image`` is raw pixels that ``normalization`` normalizes, or without it an image
        normalized already. No float copy of the whole image is made: at scale 1 the tiles
        are normalized as they are cut, at any other scale they are also zoomed as they are
        cut, and their outputs are resampled onto the image's grid as they are stitched.
        """
        return self._labelled(image, scale, normalization, seed_map=seed_map)[0]

    def _labelled(
        self,
        image: np.ndarray,
        scale: float,
        normalization: Normalization | None = None,
        *,
        seed_map: bool = True,
    ) -> _Labelled:
        """:meth:`labels_at`'s labels, and the network's confidence in them
        (:func:`cellwatch.familiarity.core_share`; None for a one-class model)."""
        probs = self.probabilities(image, scale, normalization)
        # a size at the network's scale, as the image's own pixels
        area = self.config.postprocess.split_min_area_px / scale**2
        return self._label(probs, split_min_area=area, seed_map=seed_map)

    def _label(
        self, probs: np.ndarray, *, split_min_area: float, seed_map: bool = True
    ) -> _Labelled:
        """Labels of a stitched network output (the plane labelled is overwritten), and
        the network's confidence in them; ``seed_map`` as for :meth:`labels_at`."""
        p = self.config.postprocess
        area = max(1, round(split_min_area))
        with self.stopwatch("postprocess"):
            if self.model.classes == 3:  # the stitched plane's memory becomes the labels
                confidence = familiarity.core_share(probs[..., 0])
                labels = labels_from_masked_interior(
                    probs[..., 0],
                    interior_threshold=p.interior_threshold,
                    overwrite=True,
                    split_threshold=p.split_threshold,
                    split_min_area=area,
                )
                return labels, confidence
            if self.model.classes == 4:  # planes: the masked inner distance, the masked interior
                confidence = familiarity.core_share(probs[..., 1])
                if seed_map:
                    plane, threshold, split = 0, p.distance_threshold, p.distance_split_threshold
                else:
                    plane, threshold, split = 1, p.interior_threshold, p.split_threshold
                labels = labels_from_masked_interior(
                    np.ascontiguousarray(probs[..., plane]),
                    interior_threshold=threshold,
                    overwrite=True,
                    split_threshold=split,
                    split_min_area=area,
                )
                return labels, confidence
            labels = labels_from_probabilities(
                probs,
                interior_threshold=p.interior_threshold,
                foreground_threshold=p.foreground_threshold,
            )
            return labels, None

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
        source, prepare, stitcher = self._network_input(image, scale, normalization)
        shared: SharedBatches | None = getattr(self._local, "shared", None)
        if shared is not None and not raw:  # in process_images: batches shared with others
            return shared.predict(source, prepare, stitcher=stitcher)
        return predict_tiled(
            source,
            self.predict_batch if raw else self.predict_plane,
            self.tiling,
            batch_size=self.config.tiling.batch_size,
            stopwatch=self.stopwatch,
            prepare=prepare,
            stitcher=stitcher,
        )

    def _network_input(
        self,
        image: np.ndarray,
        scale: float,
        normalization: Normalization | None,
        *,
        own_grid: bool = True,
    ) -> tuple[np.ndarray | TileSource, Prepare | None, MakeStitcher | None]:
        """What the tiles are cut from, what turns them into network input, and what
        stitches the outputs (None: the tiler's own stitcher, on the network's grid; with
        ``own_grid``, a zoomed image's outputs are resampled onto the image's grid)."""
        if scale == 1.0:
            prepare = normalization.apply_in_place if normalization is not None else None
            return image, prepare, None
        # Zooming each tile counts as cutting it ("tile"), resampling back as "stitch".
        stitcher = own_grid_stitcher(image.shape) if own_grid else None
        return ZoomedSource(image, scale, normalization), None, stitcher

    def estimate_diameter(
        self,
        image: np.ndarray,
        passes: dict[float, _Labelled] | None = None,
        normalization: Normalization | None = None,
    ) -> float | None:
        """Typical cell diameter (original pixels) from network passes over the centre
        of the image.

        First a pass at each zoom of the pyramid (:data:`~cellwatch.scale.PYRAMID`, each
        over a window of ``ESTIMATE_WINDOW`` network pixels, at most
        ``ESTIMATE_WINDOW_MAX`` of the image's), their tiles sharing batches; the size of
        the first level the next one confirms (:func:`~cellwatch.scale.choose_reading`)
        is then refined at the zoom it asks for, until the correction settles (at most
        ``REFINE_PASSES`` more passes). None when no pass finds enough cells.

        ``image`` and ``normalization`` are as for :meth:`labels_at`. Passes that covered
        the whole image on its own grid are stored in ``passes`` by scale for reuse.
        """
        target, s = self.model.working_diameter_px, self.config.scale
        if target is None:
            return None
        passes = {} if passes is None else passes
        readings = []
        for level, labelled in self._pyramid_labels(image, normalization):
            labels = labelled[0]
            if level == 1.0 and labels.shape == image.shape and self.model.classes != 4:
                passes[level] = labelled  # a seed head's cells come from its map: not these
            found = typical_diameter(labels, min_diameter=target / 4)  # network pixels
            if found is not None:
                readings.append(Reading(level, found / level))
        best = choose_reading(readings)
        if best is None:
            return None
        scale, diameter = best.level, best.diameter_px
        for _ in range(REFINE_PASSES):
            corrected = min(max(target / diameter, s.min_scale), s.max_scale)
            if is_close(corrected, scale):
                break
            scale = corrected
            found = typical_diameter(  # labels on the image's grid: diameters in its pixels
                self._window_labelled(image, _estimate_window(scale), scale, passes, normalization)[
                    0
                ],
                min_diameter=target / 4 / scale,
            )
            if found is None:
                break
            diameter = found
        return diameter

    def _pyramid_labels(
        self, image: np.ndarray, normalization: Normalization | None
    ) -> list[tuple[float, _Labelled]]:
        """``(level, labels)`` of the estimate's first passes, each labelled on its own
        network grid. All levels' tiles go through the network together (or through the
        batches ``process_images`` shares), so the small levels fill the batches the
        first one leaves part empty instead of each running a padded batch of its own."""
        jobs = []
        for level in PYRAMID:
            window = _window(image, _estimate_window(level))
            if level < 1.0 and min(window.shape) * level < PYRAMID_MIN_SIDE:
                break
            jobs.append((level, self._network_input(window, level, normalization, own_grid=False)))
        shared: SharedBatches | None = getattr(self._local, "shared", None)
        if shared is not None:
            outputs = [shared.predict(src, prep, stitcher=st) for _, (src, prep, st) in jobs]
        else:
            queue = TileQueue(
                self.tiling, batch_size=self.config.tiling.batch_size, stopwatch=self.stopwatch
            )
            queued = [queue.add(src, prep, stitcher=st) for _, (src, prep, st) in jobs]
            while queue.pending:
                queue.step(self.predict_plane)
            outputs = [job.result() for job in queued]
        split_min_area = self.config.postprocess.split_min_area_px  # the network's grid
        return [
            (level, self._label(probs, split_min_area=split_min_area, seed_map=False))
            for (level, _), probs in zip(jobs, outputs, strict=True)
        ]

    def _window_labelled(
        self,
        image: np.ndarray,
        size: int,
        scale: float,
        passes: dict[float, _Labelled],
        normalization: Normalization | None,
    ) -> _Labelled:
        window = _window(image, size)
        labelled = self._labelled(window, scale, normalization, seed_map=False)
        if window.shape == image.shape and self.model.classes != 4:
            passes[scale] = labelled  # a seed head's cells come from its map: not these
        return labelled


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


def _at_bound(choice: ScaleChoice, settings: ScaleConfig) -> bool:
    """Whether an estimated zoom stopped at ``scale.min_scale`` or ``scale.max_scale``."""
    return (
        choice.source == "estimated"
        and choice.diameter_px is not None
        and not settings.min_scale < choice.scale < settings.max_scale
    )


def _min_area(config: Config, scale: float) -> int:
    """The smallest cell kept, in the image's pixels: ``min_cell_area_px`` at the network's
    scale, so that what counts as debris does not depend on the image's magnification."""
    return max(1, math.ceil(config.postprocess.min_cell_area_px / scale**2))


def _estimate_window(scale: float) -> int:
    """Side, in the image's pixels, of the window a pass of the estimate at ``scale``
    sees: ``ESTIMATE_WINDOW`` network pixels, within ``[64, ESTIMATE_WINDOW_MAX]``."""
    return min(max(64, round(ESTIMATE_WINDOW / scale)), ESTIMATE_WINDOW_MAX)


def _window(image: np.ndarray, size: int) -> np.ndarray:
    """The central ``size``×``size`` part of ``image`` (all of it when smaller)."""
    y0 = max(0, (image.shape[0] - size) // 2)
    x0 = max(0, (image.shape[1] - size) // 2)
    return image[y0 : y0 + size, x0 : x0 + size]


def _message(exc: BaseException) -> str:
    if isinstance(exc, MemoryError):
        return "ran out of memory processing this image; lower input.max_pixels or add memory"
    return str(exc).replace("\n", " ")
