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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

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
from cellwatch.storage.imageio import find_pairs
from cellwatch.training.crops import (  # the samples and crops live there; names kept here
    Sample,
    TrainSettings,
    _photon_limited,  # noqa: F401 (tests reach it here)
    crop_batches,
    fixed_crops,
    load_sample,
    random_crop,
    random_crop_maps,
    targets,
)

FAMILIARITY_IMAGES = 40  # training images a new model's familiarity references come from

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
