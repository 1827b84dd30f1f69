"""Train or fine-tune the U-Net from a folder of images and a folder of masks.

Every image is normalized like ``predict`` does and rescaled so that its cells reach the
model's cell diameter (the median equivalent diameter of its mask objects), then random
256×256 crops are drawn with augmentation (scale jitter, flips, 90° turns, contrast, gamma,
noise, blur; with ``--shot-noise``, photon-limited exposures too). With ``--seed-head`` the
U-Net also learns each cell's inner distance (:func:`~cellwatch.training.targets.inner_distance`,
computed on the whole image before cropping), a fourth output channel whose peaks seed the
cells; with ``--from`` the head is added to a trained three-class model. The best model on the
validation loss is kept, with a model card and a loss curve beside it, and a
``.last.keras`` checkpoint lets an interrupted run resume.
"""

from __future__ import annotations

__all__ = [
    "Sample",
    "TrainSettings",
    "add_arguments",
    "crop_batches",
    "familiarity_references",
    "fixed_crops",
    "load_sample",
    "make_losses",
    "random_crop",
    "random_crop_maps",
    "run",
    "targets",
    "train",
]

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from cellwatch import familiarity
from cellwatch.errors import ConfigError
from cellwatch.model import (
    LoadedModel,
    build_seed_unet,
    build_unet,
    load_model,
    measure_receptive_field,
    model_from_network,
    with_seed_head,
    write_card,
)
from cellwatch.preprocess import normalize, resize_to, scaled_shape
from cellwatch.storage import imageio
from cellwatch.storage.imageio import find_pairs
from cellwatch.training.targets import (
    as_instances,
    contact_band,
    inner_distance,
    median_diameter,
    three_class,
)

FAMILIARITY_IMAGES = 40  # training images a new model's familiarity references come from


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


@dataclass
class Sample:
    """One training image and its instance labels, normalized and rescaled to the training diameter."""

    name: str
    image: np.ndarray  # normalized float32 at the training scale
    labels: np.ndarray  # int32 instance labels at the training scale
    scale: float
    distance: np.ndarray | None = None  # float32 inner distance of ``labels`` (seed head)


def load_sample(image_path: Path, mask_path: Path, settings: TrainSettings) -> Sample:
    """Read one pair, normalize the image and rescale both to the training diameter."""
    pixels = imageio.read_image(image_path).pixels
    labels = as_instances(imageio.read_image(mask_path).pixels)
    if labels.shape != pixels.shape:
        raise ConfigError(
            f"{mask_path} is {labels.shape[1]}×{labels.shape[0]} pixels but its image is {pixels.shape[1]}×{pixels.shape[0]}"
        )
    image = normalize(pixels, settings.low_percentile, settings.high_percentile)
    diameter = median_diameter(labels)
    scale = settings.diameter_px / diameter if settings.diameter_px and diameter else 1.0
    shape = scaled_shape(image.shape, scale)
    labels = resize_to(labels, shape, order=0)
    return Sample(
        imageio.stem(image_path),
        resize_to(image, shape, order=1),
        labels,
        scale,
        inner_distance(labels) if settings.seed_head else None,
    )


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
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """:func:`random_crop`'s (image, labels) crop and, when the sample has one, the same
    crop of its inner distance (bilinear, like the image), else None. It draws the same
    random numbers either way, so a run with a seed head sees the same crops as one
    without."""
    zoom = math.exp(rng.uniform(math.log(0.7), math.log(1.4))) if augment else 1.0
    size = max(8, round(crop / zoom))
    image, labels = _pad_to(sample.image, size), _pad_to(sample.labels, size)
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


# --- Keras side -----------------------------------------------------------------------


def make_losses(
    kind: str, weighted: bool = False, seed_head: bool = False, seed_weight: float = 1.0
) -> tuple[Any, Any]:
    """The loss to train with and a soft foreground dice metric for the progress bar.

    ``weighted``: the targets' last channel is a per-pixel weight (:func:`targets`), which
    scales the cross-entropy; the dice terms use the classes alone. ``seed_head``: the
    targets' and predictions' fourth channel is the inner distance, learned with binary
    cross-entropy over every pixel (times ``seed_weight``), added to the classes' loss.
    """
    import keras
    from keras import ops

    def classes_and_weight(y_true: Any) -> tuple[Any, Any]:
        weight = y_true[..., -1] if weighted else None
        if seed_head:
            return y_true[..., :3], weight
        return (y_true[..., :-1] if weighted else y_true), weight

    def soft_dice(y_true: Any, y_pred: Any) -> Any:
        axes = (1, 2)
        overlap = ops.sum(y_true * y_pred, axis=axes)
        total = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
        return ops.mean((2 * overlap + 1.0) / (total + 1.0))

    def dice_loss(y_true: Any, y_pred: Any) -> Any:
        return 1.0 - soft_dice(classes_and_weight(y_true)[0], y_pred)

    def cross_entropy(y_true: Any, y_pred: Any) -> Any:
        y_true, weight = classes_and_weight(y_true)
        if y_pred.shape[-1] == 1:
            per_pixel = keras.losses.binary_crossentropy(y_true, y_pred)
        else:
            per_pixel = keras.losses.categorical_crossentropy(y_true, y_pred)
        return ops.mean(per_pixel if weight is None else per_pixel * weight)

    def ce_dice(y_true: Any, y_pred: Any) -> Any:
        return cross_entropy(y_true, y_pred) + dice_loss(y_true, y_pred)

    def dice(y_true: Any, y_pred: Any) -> Any:
        y_true = classes_and_weight(y_true)[0]
        fg_true = 1.0 - y_true[..., :1] if y_true.shape[-1] == 3 else y_true
        fg_pred = 1.0 - y_pred[..., :1] if y_pred.shape[-1] == 3 else y_pred
        return soft_dice(fg_true, fg_pred)

    losses = {"dice": dice_loss, "ce": cross_entropy, "ce+dice": ce_dice}
    if kind not in losses:
        raise ConfigError(f"unknown loss '{kind}': choose one of {', '.join(losses)}")
    if not seed_head:
        return losses[kind], dice
    classes_loss = losses[kind]

    def with_seed_map(y_true: Any, y_pred: Any) -> Any:
        seed_loss = keras.losses.binary_crossentropy(y_true[..., 3:4], y_pred[..., 3:4], axis=-1)
        return classes_loss(y_true, y_pred[..., :3]) + seed_weight * ops.mean(seed_loss)

    def seed_dice(y_true: Any, y_pred: Any) -> Any:
        return dice(y_true, y_pred[..., :3])

    with_seed_map.__name__ = f"{kind}+seed"
    seed_dice.__name__ = "dice"  # the history's column stays "dice"
    return with_seed_map, seed_dice


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


def train(
    pairs: Sequence[tuple[Path, Path]],
    val_pairs: Sequence[tuple[Path, Path]],
    out: Path,
    settings: TrainSettings,
    *,
    start_from: Path | None = None,
    resume: bool = False,
    verbose: int = 1,
    command: str = "",
    workers: int = 1,
) -> dict[str, Any]:
    """Train, keep the best model at ``out`` and write its model card; returns the card.

    ``command`` is the command line that started training, recorded in the card; ``workers``
    processes draw the augmented crops (it changes the speed, not the crops).
    """
    import keras

    keras.utils.set_random_seed(settings.seed)
    t0 = time.time()
    samples = [load_sample(i, m, settings) for i, m in pairs]
    val_samples = [load_sample(i, m, settings) for i, m in val_pairs]
    classes = 1 if settings.arch == "seed" else 3
    loss, dice = make_losses(
        settings.loss, weighted=settings.contact_weight != 1.0, seed_head=settings.seed_head
    )
    last = out.with_suffix(".last.keras")
    state_path = out.with_suffix(".state.json")
    initial_epoch = 0
    if resume and last.exists():
        network = keras.saving.load_model(last, compile=False)
        initial_epoch = json.loads(state_path.read_text())["epoch"]
    elif start_from is not None:
        network = keras.saving.load_model(start_from, compile=False, safe_mode=True)
        if settings.seed_head and network.output_shape[-1] == 3:
            network = with_seed_head(network, seed=settings.seed)
    elif settings.arch == "seed":
        network = build_seed_unet(tile=settings.crop)
    else:
        network = build_unet(
            settings.depth, settings.filters, classes, seed_head=settings.seed_head
        )
    channels = classes + int(settings.seed_head)
    if network.output_shape[-1] != channels:
        raise ConfigError(
            f"the model gives {network.output_shape[-1]} output channels, but training "
            f"{'with' if settings.seed_head else 'without'} --seed-head needs {channels}"
            + ("" if settings.seed_head else ": add --seed-head to fine-tune a seed-head model")
        )
    schedule = keras.optimizers.schedules.CosineDecay(
        settings.learning_rate, settings.epochs * settings.steps_per_epoch, alpha=0.05
    )
    network.compile(optimizer=keras.optimizers.Adam(schedule), loss=loss, metrics=[dice])
    if resume and initial_epoch:
        network.optimizer.iterations.assign(initial_epoch * settings.steps_per_epoch)

    crops = crop_batches(
        samples, settings, classes, settings.seed, first_epoch=initial_epoch, workers=workers
    )
    val_x, val_y = fixed_crops(
        val_samples,
        settings.crop,
        classes,
        settings.seed + 1,
        contact_weight=settings.contact_weight,
    )
    history_path = out.with_suffix(".history.csv")
    callbacks = [
        keras.callbacks.ModelCheckpoint(out, monitor="val_loss", save_best_only=True),
        keras.callbacks.ModelCheckpoint(last),
        keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, _: state_path.write_text(json.dumps({"epoch": epoch + 1}))
        ),
        keras.callbacks.CSVLogger(history_path, append=resume),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=settings.patience),
    ]
    network.fit(
        crops,
        epochs=settings.epochs,
        initial_epoch=initial_epoch,
        validation_data=(val_x, val_y),
        validation_batch_size=settings.batch_size,
        callbacks=callbacks,
        verbose=verbose,
    )
    # the best checkpoint carries the optimizer's state (3× the weights); ship weights only
    best_network = keras.saving.load_model(out, compile=False)
    best_network.save(out)
    history = _read_history(history_path)
    best = min(history, key=lambda row: row["val_loss"]) if history else {}
    card = {
        "name": out.stem,
        "architecture": settings.arch,
        "classes": ["background", "interior", "boundary"] if classes == 3 else ["foreground"],
        **({"seed_map": "inner_distance"} if settings.seed_head else {}),
        "diameter_px": settings.diameter_px or None,
        "pixel_size_um": None,
        "tile": 256,
        "receptive_field": measure_receptive_field(
            best_network, diameter_px=settings.diameter_px or None
        ),
        "normalize": {
            "low_percentile": settings.low_percentile,
            "high_percentile": settings.high_percentile,
        },
        "settings": asdict(settings),
        "data": {
            "train_images": len(pairs),
            "val_images": len(val_pairs),
            "train_folder": str(pairs[0][0].parent) if pairs else None,
            "val_folder": str(val_pairs[0][0].parent) if val_pairs else None,
        },
        "command": command,
        "training_minutes": round((time.time() - t0) / 60, 1),
        "best_epoch": int(best.get("epoch", -1)) + 1,
        "metrics": {"val_loss": best.get("val_loss"), "val_dice": best.get("val_dice")},
        "parameters": int(network.count_params()),
    }
    trained = model_from_network(best_network, out, card)
    references = familiarity_references(trained, [image for image, _ in pairs])
    if references:  # what the ledger's familiarity compares this model's images with
        card[familiarity.CARD_KEY] = references
    write_card(out, card)
    _plot_history(history, out.with_suffix(".loss.png"))
    return card


def familiarity_references(
    model: LoadedModel | Path, images: Sequence[Path], *, count: int = FAMILIARITY_IMAGES
) -> dict[str, list[float]]:
    """Where the familiarity signals (:mod:`cellwatch.familiarity`) lie on a model's own
    training images, as its card records them: the pipeline (default settings, automatic
    scale) segments up to ``count`` of ``images``, evenly spread, and each signal's
    reference is made from what it measured. Without them the model's ledger rows have no
    ``familiarity`` and the report cannot flag ``unfamiliar`` images. ``model`` is the
    model in memory, or the path of one to load."""
    from cellwatch.config import Config
    from cellwatch.pipeline import Segmenter, read

    config = Config()
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    segmenter = Segmenter(config, loaded)
    measured = []
    for path in images[:: max(1, math.ceil(len(images) / count))]:
        data = read(path, config)
        measured.append(segmenter.segment(data.pixels, data.pixel_size_um).familiarity)
    return familiarity.card_references(measured)


def _read_history(path: Path) -> list[dict[str, float]]:
    import csv

    if not path.exists():
        return []
    with path.open() as handle:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(handle)]


def _plot_history(history: list[dict[str, float]], path: Path) -> None:
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    epochs = [row["epoch"] + 1 for row in history]
    ax.plot(epochs, [row["loss"] for row in history], label="training loss")
    ax.plot(epochs, [row.get("val_loss", math.nan) for row in history], label="validation loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --- command line ---------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``cellwatch train``."""
    d = TrainSettings()
    parser.add_argument("--images", type=Path, required=True, help="folder of training images")
    parser.add_argument(
        "--masks", type=Path, required=True, help="folder of masks (same file names)"
    )
    parser.add_argument("--out", type=Path, required=True, help="where to save MODEL.keras")
    parser.add_argument("--val-images", type=Path, help="folder of validation images")
    parser.add_argument("--val-masks", type=Path, help="folder of validation masks")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=d.val_fraction,
        help="share of training pairs held out when no validation folders are given",
    )
    parser.add_argument("--arch", choices=("unet", "seed"), default=d.arch)
    parser.add_argument("--depth", type=int, default=d.depth)
    parser.add_argument("--filters", type=int, default=d.filters)
    parser.add_argument("--loss", choices=("dice", "ce", "ce+dice"), default=d.loss)
    parser.add_argument(
        "--contact-weight",
        type=float,
        default=d.contact_weight,
        help="weight of the cross-entropy where two cells meet, so touching cells are not "
        "merged (1: no weighting)",
    )
    parser.add_argument(
        "--shot-noise",
        type=float,
        default=d.shot_noise,
        help="share of training crops turned into photon-limited (low-light) exposures, "
        "so the model copes with noisy images (0: none)",
    )
    parser.add_argument(
        "--seed-head",
        action="store_true",
        help="also learn each cell's inner distance (1 at its centre, falling to 0 at its "
        "outline) as a fourth output channel, whose peaks seed the cells, so touching cells "
        "split where the three classes see one clump; with --from, the head is added to the "
        "given three-class model (its trunk and classes kept)",
    )
    parser.add_argument(
        "--diameter",
        type=float,
        default=d.diameter_px,
        help="cell diameter (px) images are rescaled to; 0 keeps their own scale",
    )
    parser.add_argument("--crop", type=int, default=d.crop)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--steps", type=int, default=d.steps_per_epoch, help="steps per epoch")
    parser.add_argument("--learning-rate", type=float, default=d.learning_rate)
    parser.add_argument("--patience", type=int, default=d.patience)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--from", dest="start_from", type=Path, help="fine-tune this .keras model")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes drawing augmented crops (use several on a GPU machine)",
    )


def run(args: argparse.Namespace) -> int:
    """``cellwatch train``: train or fine-tune a model and write it with its card, history and loss plot."""
    settings = TrainSettings(
        arch=args.arch,
        depth=args.depth,
        filters=args.filters,
        loss=args.loss,
        contact_weight=args.contact_weight,
        shot_noise=args.shot_noise,
        seed_head=args.seed_head,
        diameter_px=args.diameter,
        crop=args.crop,
        batch_size=args.batch_size,
        epochs=args.epochs,
        steps_per_epoch=args.steps,
        learning_rate=args.learning_rate,
        patience=args.patience,
        val_fraction=args.val_fraction,
        seed=args.seed,
    )
    if not settings.contact_weight > 0:
        raise ConfigError(f"--contact-weight must be positive, got {settings.contact_weight}")
    if not 0 <= settings.shot_noise <= 1:
        raise ConfigError(f"--shot-noise is a share of crops, 0 to 1; got {settings.shot_noise}")
    if settings.seed_head and settings.arch != "unet":
        raise ConfigError("--seed-head needs --arch unet (a three-class model)")
    if settings.arch == "seed" and settings.crop != 256:
        raise ConfigError("--arch seed works on 256×256 crops only (it convolves down to 1×1)")
    pairs = find_pairs(args.images, args.masks)
    if args.val_images or args.val_masks:
        if not (args.val_images and args.val_masks):
            raise ConfigError("give both --val-images and --val-masks, or neither")
        val_pairs = find_pairs(args.val_images, args.val_masks)
    else:
        rng = np.random.default_rng(settings.seed)
        order = rng.permutation(len(pairs))
        n_val = max(1, round(len(pairs) * settings.val_fraction)) if len(pairs) > 1 else 0
        val_pairs = [pairs[i] for i in order[:n_val]] or list(pairs)
        pairs = [pairs[i] for i in order[n_val:]] or list(pairs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    card = train(
        pairs,
        val_pairs,
        args.out,
        settings,
        start_from=args.start_from,
        resume=args.resume,
        verbose=1 if sys.stdout.isatty() else 2,
        command=shlex.join(getattr(args, "command_line", ["cellwatch", "train"])),
        workers=args.workers,
    )
    print(
        f"saved {args.out} (best epoch {card['best_epoch']}, val loss {card['metrics']['val_loss']})"
    )
    return 0
