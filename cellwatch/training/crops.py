"""Training samples and crops: the recipe's settings, an image and its mask brought to the
training diameter, and random augmented crops of them (scale jitter, flips, 90° turns,
contrast, gamma, noise, blur; with ``shot_noise``, photon-limited exposures too) as Keras
batches. ``cellwatch train`` and ``cellwatch finetune`` share them.
"""

from __future__ import annotations

__all__ = [
    "Sample",
    "TrainSettings",
    "cells_are_darker",
    "crop_batches",
    "fixed_crops",
    "load_sample",
    "random_crop",
    "random_crop_maps",
    "stain_jittered",
    "targets",
]

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from cellwatch.errors import BadInputError, ConfigError
from cellwatch.preprocess import normalize, resize_to, scaled_shape
from cellwatch.storage import imageio
from cellwatch.training.targets import (
    as_instances,
    contact_band,
    inner_distance,
    median_diameter,
    three_class,
)


@dataclass(frozen=True)
class TrainSettings:
    """Everything that shapes a training run; saved in the model card so a model travels with its recipe."""

    arch: str = "unet"
    depth: int = 4
    filters: int = 16
    loss: str = "ce+dice"
    contact_weight: float = 1.0  # cross-entropy weight where two cells meet (1: none)
    shot_noise: float = 0.0  # share of crops seen as photon-limited exposures (0: none)
    seed_head: bool = False  # also learn the inner distance (a fourth output channel)
    diameter_px: float = 20.0  # 0: train at the images' own scale
    crop: int = 256
    batch_size: int = 4
    epochs: int = 40
    steps_per_epoch: int = 200
    learning_rate: float = 1e-3
    patience: int = 10
    val_fraction: float = 0.15
    seed: int = 0
    low_percentile: float = 1.0
    high_percentile: float = 99.8
    invert: bool = False  # dark cells on a light background: the plane is inverted
    stain_jitter: float = 0.0  # RGB stains: how far each crop's stain colours stray (0: none)


@dataclass
class Sample:
    """One training image and its instance labels, normalized and rescaled to the training diameter."""

    name: str
    image: np.ndarray  # normalized float32 at the training scale
    labels: np.ndarray  # int32 instance labels at the training scale
    scale: float
    distance: np.ndarray | None = None  # float32 inner distance of ``labels`` (seed head)
    # an RGB image's three stain amounts (H, W, 3: hematoxylin, eosin, DAB) at the training
    # scale, and which of them is the plane: for stain jitter (``TrainSettings.stain_jitter``)
    stains: np.ndarray | None = None
    stain: int = 0
    inverted: bool = False  # the image is the inverted plane (``TrainSettings.invert``)


def load_sample(
    image_path: Path, mask_path: Path, settings: TrainSettings, *, channel: str | None = None
) -> Sample:
    """Read one pair, normalize the image and rescale both to the training diameter.

    ``channel``: a stain (:data:`~cellwatch.storage.pixels.STAINS`) that an RGB image is
    turned into; an image that is already one plane is used as it is. With
    ``settings.stain_jitter`` and a deconvolved stain (not gray), the sample keeps all three
    stain amounts so that each crop can be seen with other stain colours.
    """
    pixels, labels = _read_pair(image_path, mask_path, channel)
    image = normalize(
        pixels, settings.low_percentile, settings.high_percentile, invert=settings.invert
    )
    diameter = median_diameter(labels)
    scale = settings.diameter_px / diameter if settings.diameter_px and diameter else 1.0
    shape = scaled_shape(image.shape, scale)
    labels = resize_to(labels, shape, order=0)
    stains, stain = None, 0
    if settings.stain_jitter and channel in HED and pixels.ndim == 2:
        try:
            planes = [imageio.read_image(image_path, channel=name).pixels for name in HED]
        except BadInputError:  # already one plane: nothing to jitter
            planes = []
        if planes:
            stains = np.stack([resize_to(p, shape, order=1) for p in planes], axis=-1)
            stain = HED.index(channel)
    return Sample(
        imageio.stem(image_path),
        resize_to(image, shape, order=1),
        labels,
        scale,
        inner_distance(labels) if settings.seed_head else None,
        stains,
        stain,
        settings.invert,
    )


HED = ("hematoxylin", "eosin", "dab")


def stain_jittered(
    sample: Sample,
    rng: np.random.Generator,
    jitter: float,
    percentiles: tuple[float, float],
) -> np.ndarray:
    """``sample``'s plane as colour deconvolution would give it had the slide's stains had
    slightly other colours and strengths: each stain's optical-density vector (Ruifrok &
    Johnston's, as :func:`skimage.color.rgb2hed` assumes) moves by up to about ``jitter``
    per component and its amount by a factor 1 ± ``jitter``, and the image is deconvolved
    with the standard vectors again, so some eosin and DAB leak into the hematoxylin plane
    (and back) as they do on real slides. Normalized with ``percentiles``."""
    from skimage.color import hed_from_rgb, rgb_from_hed

    if sample.stains is None:
        return sample.image
    vectors = rgb_from_hed + rng.normal(0.0, jitter / 2, rgb_from_hed.shape)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    amounts = rng.uniform(1 - jitter, 1 + jitter, 3)
    mixing = (amounts[:, None] * vectors) @ hed_from_rgb  # stains → density → stains
    plane = np.clip(sample.stains @ mixing[:, sample.stain], 0.0, None)
    return normalize(plane.astype(np.float32), *percentiles, invert=sample.inverted)


def cells_are_darker(image_path: Path, mask_path: Path, *, channel: str | None) -> bool | None:
    """Whether the cells of one corrected image are darker than its background (the
    plane training sees, before normalization): their median against the background's.
    None when the mask holds no cells, or nothing but cells.

    Brightfield nuclei are dark on a light background; fluorescent ones, and the
    hematoxylin plane of an H&E image, are bright on dark.
    """
    pixels, labels = _read_pair(image_path, mask_path, channel)
    cells = labels > 0
    if cells.all() or not cells.any():
        return None
    return bool(np.median(pixels[cells]) < np.median(pixels[~cells]))


def _read_pair(
    image_path: Path, mask_path: Path, channel: str | None
) -> tuple[np.ndarray, np.ndarray]:
    """The image's plane (:func:`_read_plane`) and its mask's instance labels."""
    pixels = _read_plane(image_path, channel)
    labels = as_instances(imageio.read_image(mask_path).pixels)
    if labels.shape != pixels.shape:
        raise ConfigError(
            f"{mask_path} is {labels.shape[1]}×{labels.shape[0]} pixels but its image is "
            f"{pixels.shape[1]}×{pixels.shape[0]}"
        )
    return pixels, labels


def _read_plane(path: Path, stain: str | None) -> np.ndarray:
    """The image as one plane: an RGB image through ``stain``, any other as it is."""
    try:
        return imageio.read_image(path).pixels
    except BadInputError:
        if stain is None:
            raise
        return imageio.read_image(path, channel=stain).pixels


def targets(
    labels: np.ndarray,
    classes: int,
    contact_weight: float = 1.0,
    *,
    distance: np.ndarray | None = None,
) -> np.ndarray:
    """Training targets (H, W, channels) for a crop of instance labels.

    One-hot classes (``classes`` channels); with ``distance`` (a seed head's target, the
    crop of the whole image's :func:`~cellwatch.training.targets.inner_distance`), one
    more channel holding it; with a ``contact_weight`` other than 1, a last channel
    holding each pixel's loss weight (``contact_weight`` where cells meet, 1 elsewhere).
    """
    if classes == 1:
        channels = [(labels > 0)[..., None].astype(np.float32)]
    else:
        channels = [np.eye(3, dtype=np.float32)[three_class(labels)]]
    if distance is not None:
        if distance.shape != labels.shape:
            raise ValueError(f"distance {distance.shape} and labels {labels.shape} differ")
        channels.append(distance.astype(np.float32, copy=False)[..., None])
    if contact_weight != 1.0:
        weight = np.where(contact_band(labels), np.float32(contact_weight), np.float32(1.0))
        channels.append(weight[..., None])
    return channels[0] if len(channels) == 1 else np.concatenate(channels, axis=-1)


def random_crop(
    sample: Sample,
    rng: np.random.Generator,
    crop: int,
    augment: bool,
    *,
    shot_noise: float = 0.0,
    percentiles: tuple[float, float] = (
        TrainSettings.low_percentile,
        TrainSettings.high_percentile,
    ),
) -> tuple[np.ndarray, np.ndarray]:
    """One augmented (image, labels) crop of ``crop``×``crop`` pixels; a ``shot_noise``
    share of them are first turned into photon-limited exposures (:func:`_photon_limited`),
    normalized again with ``percentiles``."""
    image, labels, _ = random_crop_maps(
        sample, rng, crop, augment, shot_noise=shot_noise, percentiles=percentiles
    )
    return image, labels


def random_crop_maps(
    sample: Sample,
    rng: np.random.Generator,
    crop: int,
    augment: bool,
    *,
    shot_noise: float = 0.0,
    percentiles: tuple[float, float] = (
        TrainSettings.low_percentile,
        TrainSettings.high_percentile,
    ),
    stain_jitter: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """:func:`random_crop`'s (image, labels) crop and, when the sample has one, the same
    crop of its inner distance (bilinear, like the image), else None. It draws the same
    random numbers either way, so a run with a seed head sees the same crops as one
    without. With ``stain_jitter`` and a sample that kept its stains, the crop is cut from
    :func:`stain_jittered` (drawn first; no draw otherwise)."""
    plane = sample.image
    if augment and stain_jitter and sample.stains is not None:
        plane = stain_jittered(sample, rng, stain_jitter, percentiles)
    zoom = math.exp(rng.uniform(math.log(0.7), math.log(1.4))) if augment else 1.0
    size = max(8, round(crop / zoom))
    image, labels = _pad_to(plane, size), _pad_to(sample.labels, size)
    distance = None if sample.distance is None else _pad_to(sample.distance, size)
    y = rng.integers(0, image.shape[0] - size + 1)
    x = rng.integers(0, image.shape[1] - size + 1)
    image = resize_to(image[y : y + size, x : x + size], (crop, crop), order=1)
    labels = resize_to(labels[y : y + size, x : x + size], (crop, crop), order=0)
    if distance is not None:
        distance = resize_to(distance[y : y + size, x : x + size], (crop, crop), order=1)
    if not augment:
        return image, labels, distance
    turns, flip = rng.integers(4), rng.integers(2)
    image, labels = np.rot90(image, turns), np.rot90(labels, turns)
    if distance is not None:
        distance = np.rot90(distance, turns)
    if flip:
        image, labels = image[:, ::-1], labels[:, ::-1]
        distance = None if distance is None else distance[:, ::-1]
    image = np.ascontiguousarray(image)
    if distance is not None:
        distance = np.ascontiguousarray(distance)
    if shot_noise and rng.random() < shot_noise:  # no draw at 0: the same crops as before
        image = normalize(_photon_limited(image, rng), *percentiles)
    return _augment_intensity(image, rng), np.ascontiguousarray(labels), distance


def _photon_limited(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The same scene seen with few photons: 5–100 at the brightest cells (log-uniform),
    over a background of up to 35 % of that, with Poisson shot noise and Gaussian read
    noise; in photons, not yet normalized."""
    peak = math.exp(rng.uniform(math.log(5.0), math.log(100.0)))
    expected = np.clip(image, 0.0, None) * peak + rng.uniform(0.0, 0.35) * peak
    read_noise = rng.normal(0.0, rng.uniform(0.0, 2.0), image.shape)
    return (rng.poisson(expected) + read_noise).astype(np.float32)


def _augment_intensity(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.3:
        image = ndi.gaussian_filter(image, rng.uniform(0.5, 1.5))
    image = image * rng.uniform(0.6, 1.5) + rng.uniform(-0.15, 0.15)
    if rng.random() < 0.5:
        image = np.sign(image) * np.abs(image) ** rng.uniform(0.6, 1.6)
    if rng.random() < 0.5:
        image = image + rng.normal(0, rng.uniform(0.01, 0.1), image.shape)
    return image.astype(np.float32)


def _pad_to(array: np.ndarray, size: int) -> np.ndarray:
    pad_y, pad_x = max(0, size - array.shape[0]), max(0, size - array.shape[1])
    if not (pad_y or pad_x):
        return array
    return np.pad(array, ((0, pad_y), (0, pad_x)), mode="constant")


def crop_batches(
    samples: Sequence[Sample],
    settings: TrainSettings,
    classes: int,
    seed: int,
    *,
    first_epoch: int = 0,
    workers: int = 1,
) -> Any:
    """A Keras dataset of ``steps_per_epoch`` random augmented batches, drawn fresh each epoch.

    Batch ``i`` of epoch ``e`` is drawn from its own generator seeded with (seed, e, i), so the
    crops are the same however many ``workers`` processes draw them, and a resumed run draws
    what the interrupted one would have.
    """
    import keras

    class RandomCrops(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__(workers=workers, use_multiprocessing=workers > 1)
            self.epoch = first_epoch

        def __len__(self) -> int:
            return settings.steps_per_epoch

        def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
            rng = np.random.default_rng([seed, self.epoch, index])
            xs, ys = [], []
            for _ in range(settings.batch_size):
                sample = samples[rng.integers(len(samples))]
                image, labels, distance = random_crop_maps(
                    sample,
                    rng,
                    settings.crop,
                    augment=True,
                    shot_noise=settings.shot_noise,
                    percentiles=(settings.low_percentile, settings.high_percentile),
                    stain_jitter=settings.stain_jitter,
                )
                xs.append(image[..., None])
                ys.append(targets(labels, classes, settings.contact_weight, distance=distance))
            return np.stack(xs), np.stack(ys)

        def on_epoch_end(self) -> None:
            self.epoch += 1

    return RandomCrops()


def fixed_crops(
    samples: Sequence[Sample],
    crop: int,
    classes: int,
    seed: int,
    per_sample: int = 2,
    contact_weight: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic validation set of unaugmented crops."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for sample in samples:
        for _ in range(per_sample):
            image, labels, distance = random_crop_maps(sample, rng, crop, augment=False)
            xs.append(image[..., None])
            ys.append(targets(labels, classes, contact_weight, distance=distance))
    return np.stack(xs), np.stack(ys)
