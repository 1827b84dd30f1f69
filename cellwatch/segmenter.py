"""The segmenter: one loaded model and the settings, turning an image's pixels into labels.
It chooses the zoom (from the settings, the pixel size or the size-estimate pyramid), tiles
and predicts, and separates touching cells; :mod:`cellwatch.pipeline` reads, counts,
measures and writes around it."""

from __future__ import annotations

__all__ = ["Segmentation", "Segmenter", "tiling_for"]


import dataclasses
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from cellwatch import familiarity
from cellwatch.batching import SharedBatches
from cellwatch.config import Config, ScaleConfig
from cellwatch.errors import ConfigError, ModelError
from cellwatch.model import LoadedModel
from cellwatch.postprocess import (
    grow_outlines,
    labels_from_masked_interior,
    labels_from_probabilities,
    masked_distance,
    masked_interior,
    outline_growth,
    peak_threshold,
    tidy,
)
from cellwatch.preprocess import Normalization, ZoomedSource, own_grid_stitcher
from cellwatch.scale import (
    AGREEMENT,
    PYRAMID,
    Reading,
    ScaleChoice,
    choose_reading,
    choose_scale,
    diameter_range,
    is_close,
    large_nuclei_growth,
    typical_diameter,
)
from cellwatch.tiling import (
    MakeStitcher,
    PredictBatch,
    Prepare,
    TileQueue,
    TileSettings,
    TileSource,
    predict_tiled,
    tile_settings,
    tile_side_for_memory,
)
from cellwatch.timing import Stopwatch

_Labelled = tuple[np.ndarray, float | None]  # labels, and the network's confidence in them

ESTIMATE_WINDOW = 768  # side of the window the cell size is estimated on, in model pixels

ESTIMATE_WINDOW_MAX = 2048  # ... and at most this many of the image's pixels

PYRAMID_MIN_SIDE = 32  # a pyramid level that would show the network less than this is skipped

REFINE_PASSES = 2  # network passes that refine the size the pyramid found


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
        self.tiling = tiling_for(config, model)  # the largest tiles: tiles_for sizes them
        self._tilings = {self.tiling.tile: self.tiling}
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
            normalization = Normalization.of(
                pixels,
                norm.low_percentile,
                norm.high_percentile,
                invert=bool(self.config.input.invert),
            )
        passes: dict[float, _Labelled] = {}  # whole-image labels the estimate already made
        choice = choose_scale(
            self.config.scale,
            model_diameter_px=self.model.working_diameter_px,
            model_pixel_size_um=self.model.working_pixel_size_um,
            image_pixel_size_um=pixel_size_um,
            estimate_diameter=lambda: self.estimate_diameter(pixels, passes, normalization),
            growth=large_nuclei_growth(self.config.scale, self.model.card),
            diameter_range=diameter_range(self.config.scale, self.model.card),
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
        growth = outline_growth(self.config.postprocess.outline_growth_px, self.model.card)
        with watch("postprocess"):
            labels = tidy(labels, _min_area(self.config, choice.scale), out=labels)
            if growth:  # the network's pixels, as the image's
                labels = grow_outlines(labels, growth / choice.scale)
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
        peak = peak_threshold(p.peak_threshold, self.model.card)  # doubtful cells dropped
        with self.stopwatch("postprocess"):
            if self.model.classes == 3:  # the stitched plane's memory becomes the labels
                confidence = familiarity.core_share(probs[..., 0])
                labels = labels_from_masked_interior(
                    probs[..., 0],
                    interior_threshold=p.interior_threshold,
                    overwrite=True,
                    split_threshold=p.split_threshold,
                    split_min_area=area,
                    peak_threshold=peak,
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
                    peak_threshold=0.0 if seed_map else peak,
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
        settings = self.tiles_for(image.size)
        shared: SharedBatches | None = getattr(self._local, "shared", None)
        if shared is not None and not raw:  # in process_images: batches shared with others
            return shared.predict(source, prepare, stitcher=stitcher, settings=settings)
        return predict_tiled(
            source,
            self.predict_batch if raw else self.predict_plane,
            settings,
            batch_size=self.config.tiling.batch_size,
            stopwatch=self.stopwatch,
            prepare=prepare,
            stitcher=stitcher,
        )

    def tiles_for(self, image_px: int) -> TileSettings:
        """How an image of ``image_px`` pixels is tiled: tiles up to ``tiling.tile_size``,
        smaller for a large image, so the memory of counting it stays within budget
        (:func:`~cellwatch.tiling.tile_side_for_memory`). Labels do not depend on it."""
        t = self.tiling
        if not t.fit:  # a network whose input size is fixed
            return t
        side = tile_side_for_memory(t.tile, image_px, self.model.precision, align=t.align)
        if side not in self._tilings:
            self._tilings[side] = tiling_for(self.config, self.model, side)
        return self._tilings[side]

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
            if _confirmed(readings):  # choose_reading stops here: no smaller level counts
                break
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
    ) -> Iterator[tuple[float, _Labelled]]:
        """``(level, labels)`` of the estimate's first passes, each labelled on its own
        network grid, largest zoom first. The first two levels' tiles go through the
        network together (or through the batches ``process_images`` shares), then the
        rest's, so the small levels fill the batches a larger one leaves part empty instead
        of each running a padded batch of its own, and the rest are never run when the
        caller stops after the first two (they confirm each other: :func:`_confirmed`)."""
        jobs = []
        for level in PYRAMID:
            window = _window(image, _estimate_window(level))
            if level < 1.0 and min(window.shape) * level < PYRAMID_MIN_SIDE:
                break
            jobs.append((level, self._network_input(window, level, normalization, own_grid=False)))
        for group in (jobs[:2], jobs[2:]):
            if group:
                yield from self._levels_labelled(group)

    def _levels_labelled(
        self,
        jobs: list[
            tuple[float, tuple[np.ndarray | TileSource, Prepare | None, MakeStitcher | None]]
        ],
    ) -> list[tuple[float, _Labelled]]:
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


def tiling_for(config: Config, model: LoadedModel, tile: int | None = None) -> TileSettings:
    """The tiles ``config`` asks for, aligned to the model's pooling grid; with
    ``tiling.overlap: auto``, an overlap that covers the model's receptive field. Tiles are
    at most ``tiling.tile_size`` (or ``tile``) and shrink to fit each image. A network whose
    input size is fixed (the seed architecture) gets tiles of that size."""
    t = config.tiling
    tile = model.input_px or tile or t.tile_size
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


def _confirmed(readings: list[Reading]) -> bool:
    """Whether the last two readings are of neighbouring levels and agree: the pair
    :func:`~cellwatch.scale.choose_reading` takes when it is the first such pair from the
    largest zoom down, as it is while the readings are made largest zoom first."""
    if len(readings) < 2:
        return False
    high, low = readings[-2:]
    neighbours = math.isclose(high.level, 2 * low.level, rel_tol=1e-6)
    return neighbours and abs(math.log(high.diameter_px / low.diameter_px)) < math.log(AGREEMENT)


def _estimate_window(scale: float) -> int:
    """Side, in the image's pixels, of the window a pass of the estimate at ``scale``
    sees: ``ESTIMATE_WINDOW`` network pixels, within ``[64, ESTIMATE_WINDOW_MAX]``."""
    return min(max(64, round(ESTIMATE_WINDOW / scale)), ESTIMATE_WINDOW_MAX)


def _window(image: np.ndarray, size: int) -> np.ndarray:
    """The central ``size``×``size`` part of ``image`` (all of it when smaller)."""
    y0 = max(0, (image.shape[0] - size) // 2)
    x0 = max(0, (image.shape[1] - size) // 2)
    return image[y0 : y0 + size, x0 : x0 + size]
