"""Fine-tune a model on a lab's own corrected images, within a time budget, on a CPU.

``DIR/images`` and ``DIR/masks`` hold image/mask pairs of the same names (what the napari
corrections widget writes). A share of them is held out; the rest trains the model for
``--minutes`` of wall-clock time, the learning rate falling with the time spent (a cosine
over the budget); the moving average of the weights (``ema``) as training ends is kept,
or as Ctrl-C stops it (``keep="loss"``: the average with the lowest loss on the held-out
crops; ``"score"``: the weights with the best held-out accuracy@0.5, counted). The growth
of its outlines that fits the training corrections best, plus a margin for images it never
saw, goes into the card (:mod:`cellwatch.training.shapes`; measured through the card, so as
the model will count), with the peak threshold below which counting drops a doubtful cell
(``--peak-threshold``). Then the base and the new model are scored on the held-out images
with ``cellwatch evaluate``'s figures; a new model that scores worse than its base is
refused unless ``--force``. The model card records the base's hash, each correction's
sha256, the command, budget and before/after, and the input the model reads: the channel,
and whether the plane is inverted (``--invert``; whether the corrections' cells are darker
than their background is measured and recorded either way,
:mod:`cellwatch.training.provenance`).
"""

from __future__ import annotations

__all__ = [
    "FinetuneSettings",
    "Refused",
    "add_arguments",
    "finetune",
    "holdout_split",
    "run",
]

import argparse
import math
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from cellwatch import familiarity
from cellwatch.config import MAX_OUTLINE_GROWTH_PX
from cellwatch.errors import CellwatchError, ConfigError
from cellwatch.model import BUNDLED_MODEL, read_card, write_card
from cellwatch.postprocess import CARD_GROWTH_KEY, CARD_PEAK_KEY
from cellwatch.scale import CARD_RANGE_KEY
from cellwatch.storage.imageio import find_pairs
from cellwatch.storage.pixels import STAINS
from cellwatch.training.averaging import averaging
from cellwatch.training.crops import (
    Sample,
    TrainSettings,
    crop_batches,
    fixed_crops,
    load_sample,
)
from cellwatch.training.judge import (
    Judge,
    before_after_table,
    familiarity_references,
    score_model,
    with_dtype,
)
from cellwatch.training.provenance import CARD_KEY, measure_polarity, new_card, scoring_card
from cellwatch.training.shapes import settle_growth


@dataclass(frozen=True)
class FinetuneSettings:
    """The recipe for a few corrected images on a few CPU cores (measured: docs/teach.md)."""

    minutes: float = 10.0  # wall-clock budget of the training itself
    max_steps: int = 0  # stop after this many steps even with time left (0: time alone)
    crop: int = 128
    batch_size: int = 4
    steps_per_epoch: int = 10  # a held-out loss checkpoint every this many steps (keep="loss")
    keep: str = "last"  # which model is kept: "last" average, "loss" (held-out crops), "score"
    score_every: int = 50  # keep="score": score the held-out images every this many steps
    learning_rate: float = 1e-3
    final_learning_rate: float = 5e-5  # where the cosine over the budget ends
    warmup_steps: int = 0  # the rate rises linearly from ~0 over these first steps
    freeze_encoder: bool = False
    holdout: float = 0.125  # share of the corrections held out (at least 1 from 4 on)
    seed: int = 0
    bf16: bool = False  # bfloat16 mixed precision (CPUs with AVX-512 BF16 or AMX)
    stain_jitter: float = 0.0  # RGB stains: colour deconvolution with jittered stain colours
    contact_weight: float = 1.0  # cross-entropy weight where two cells meet (1: none)
    ema: float = 0.99  # judge and keep a moving average of the weights (~100 steps); 0: off
    outline_growth: float | None = None  # px at the network's scale; None: measured
    invert: bool | None = None  # the plane inverted for the network; None: when measured dark
    peak_threshold: float = 0.95  # counting drops cells never this sure of (card; 0: none)


class Refused(CellwatchError):
    """The new model scores worse than its base on the held-out corrections."""


def holdout_split(
    pairs: Sequence[tuple[Path, Path]], share: float, seed: int
) -> tuple[list[tuple[Path, Path]], list[tuple[Path, Path]]]:
    """(training, held-out) pairs: ``share`` of them held out, at least one once there
    are 4, none below that.

    >>> pairs = [(Path(f"{i}.tif"), Path(f"m{i}.tif")) for i in range(8)]
    >>> [len(part) for part in holdout_split(pairs, 0.25, seed=0)]
    [6, 2]
    """
    if len(pairs) < 4:
        return list(pairs), []
    n_hold = min(len(pairs) - 1, max(1, round(len(pairs) * share)))
    order = np.random.default_rng(seed).permutation(len(pairs))
    held = sorted(int(i) for i in order[:n_hold])
    return [p for i, p in enumerate(pairs) if i not in held], [pairs[i] for i in held]


def finetune(
    pairs: Sequence[tuple[Path, Path]],
    out: Path,
    settings: FinetuneSettings,
    *,
    base: Path,
    channel: str | None = None,
    command: str = "",
    force: bool = False,
    verbose: int = 2,
    say: Any = print,
) -> dict[str, Any]:
    """Fine-tune ``base`` on ``pairs`` for ``settings.minutes``; write ``out`` and its card.

    Returns the card. Raises :class:`Refused` (the model is kept beside ``out`` as
    ``NAME.refused.keras``) when the held-out accuracy@0.5 falls below the base's and not
    ``force``.
    """
    import keras

    keras.utils.set_random_seed(settings.seed)
    if settings.keep == "score":  # checkpoints are judged by their score, not averaged
        settings = replace(settings, ema=0.0)
    started = datetime.now(UTC)
    base_card = read_card(base)
    channel = channel or (base_card.get("input") or {}).get("channel")
    train_pairs, held_pairs = holdout_split(pairs, settings.holdout, settings.seed)
    polarity = measure_polarity(train_pairs, channel)
    invert = polarity.dark_cells if settings.invert is None else settings.invert
    say(polarity.describe(invert, {None: "auto", True: "yes", False: "no"}[settings.invert]))
    recipe = TrainSettings(
        diameter_px=float(base_card.get("diameter_px") or 20.0),
        crop=settings.crop,
        batch_size=settings.batch_size,
        steps_per_epoch=settings.steps_per_epoch,
        seed=settings.seed,
        stain_jitter=settings.stain_jitter,
        contact_weight=settings.contact_weight,
        invert=invert,
        **_normalize_of(base_card),
    )
    samples = [load_sample(i, m, recipe, channel=channel) for i, m in train_pairs]
    monitored = [load_sample(i, m, recipe, channel=channel) for i, m in held_pairs] or samples
    if settings.bf16:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        network = _trainable_copy(base, settings)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    classes = network.output_shape[-1]
    if classes != 3:
        raise ConfigError(
            f"{base} gives {classes} output channels; finetune works on three-class models "
            "(background, interior, boundary) such as the bundled one"
        )
    from cellwatch.training.train import make_losses

    loss, dice = make_losses("ce+dice", weighted=settings.contact_weight != 1.0)
    network.compile(
        optimizer=keras.optimizers.Adam(settings.learning_rate), loss=loss, metrics=[dice]
    )
    card = new_card(
        base,
        base_card,
        out,
        asdict(settings),
        reads={"channel": channel, "invert": invert},
        command=command,
        pairs=pairs,
        held=held_pairs,
    )
    card[CARD_KEY]["polarity"] = {**asdict(polarity), "measured_on": "training corrections"}
    card[CARD_PEAK_KEY] = settings.peak_threshold  # the checkpoints are counted with it too
    judge = Judge(held_pairs, channel, scoring_card(card), say) if held_pairs else None
    budget, interrupted = _fit(
        network, samples, monitored, recipe, settings, out, say, verbose, judge
    )
    card[CARD_KEY].update(
        started=started.isoformat(timespec="seconds"),
        steps=budget.steps,
        training_seconds=round(budget.elapsed(), 1),
        interrupted=interrupted,
    )
    if judge is not None and settings.keep == "score":
        card[CARD_KEY]["checkpoints"] = judge.history
        card[CARD_KEY]["kept_step"] = judge.best_step
    if settings.outline_growth is None:  # chosen on the training corrections, not held out
        card[CARD_KEY]["outline_growth"] = settle_growth(out, card, train_pairs, channel)
    else:
        card[CARD_GROWTH_KEY] = settings.outline_growth
    say(f"outlines grown by {card[CARD_GROWTH_KEY]:g} px at the network's scale")
    write_card(out, card)
    scored = held_pairs or train_pairs
    before, after = score_model(base, scored, channel), score_model(out, scored, channel)
    card[CARD_KEY]["scores"] = {
        "on": "held-out corrections" if held_pairs else "training corrections (none held out)",
        "images": [p.name for p, _ in scored],
        "base": before,
        "new": after,
    }
    card[familiarity.CARD_KEY] = familiarity_references(out, [p for p, _ in train_pairs], channel)
    write_card(out, card)
    say(before_after_table(before, after, card[CARD_KEY]["scores"]["on"]))
    if held_pairs and after["accuracy_0.5"] < before["accuracy_0.5"] and not force:
        refused = out.with_suffix(".refused.keras")
        out.replace(refused)
        write_card(refused, card)
        out.with_suffix(".json").unlink()
        raise Refused(
            f"the new model finds fewer cells correctly than its base on the held-out "
            f"corrections (accuracy@0.5 {after['accuracy_0.5']:.3f} < "
            f"{before['accuracy_0.5']:.3f}), so it was not saved as {out}; it is kept as "
            f"{refused} for a look. Add more or better corrections, or pass --force to keep it"
        )
    return card


def _fit(
    network: Any,
    samples: Sequence[Sample],
    monitored: Sequence[Sample],
    recipe: TrainSettings,
    settings: FinetuneSettings,
    out: Path,
    say: Any,
    verbose: int,
    judge: Judge | None = None,
) -> tuple[Any, bool]:
    """Train until the budget is spent or Ctrl-C; save the model ``settings.keep`` names
    at ``out`` in float32 (held-out score needs a ``judge``: held-out images; else held-out
    loss). Returns (the budget callback, whether it was interrupted)."""
    import keras

    classes = network.output_shape[-1]
    budget = _budget(settings, time.monotonic)
    work = out.with_suffix(".training.keras")
    by_score = settings.keep == "score" and judge is not None
    averaged = None
    if judge is not None and by_score:
        judge.start(work, settings.score_every)
        callbacks, validation = [budget, judge.callback()], {}
    elif settings.keep == "last":  # the average (or, ema 0, the weights) as training ends
        averaged = averaging(work, settings.ema, None, settings.batch_size)
        callbacks, validation = [budget, averaged], {}
    else:
        val_x, val_y = fixed_crops(
            monitored,
            settings.crop,
            classes,
            settings.seed + 1,
            per_sample=4,
            contact_weight=settings.contact_weight,
        )
        if settings.ema:  # the averaged weights are judged and kept, not the last step's
            averaged = averaging(work, settings.ema, (val_x, val_y), settings.batch_size)
            callbacks, validation = [budget, averaged], {}
        else:
            callbacks = [
                budget,
                keras.callbacks.ModelCheckpoint(work, monitor="val_loss", save_best_only=True),
            ]
            validation = {
                "validation_data": (val_x, val_y),
                "validation_batch_size": settings.batch_size,
            }
    interrupted = False
    try:
        network.fit(
            crop_batches(samples, recipe, classes, settings.seed),
            epochs=1_000_000,
            callbacks=callbacks,
            verbose=verbose,
            **validation,
        )
    except KeyboardInterrupt:
        interrupted = True
        say(f"interrupted: keeping the model so far (--keep {settings.keep})")
        if judge is not None and by_score and judge.steps > judge.checked:
            judge.check(network, judge.steps)  # the model as it stopped is a candidate too
        if averaged is not None:
            averaged.check(network)  # the average as it stopped is a candidate too
    if not work.exists():
        raise CellwatchError("stopped before the first checkpoint: no model was written")
    if by_score:  # already float32 and weights only
        work.replace(out)
        work.with_suffix(".json").unlink(missing_ok=True)
        return budget, interrupted
    trained = keras.saving.load_model(work, compile=False)
    # float32 whatever it trained in, and weights only (the checkpoint holds the optimizer's)
    with_dtype(trained, "float32").save(out)
    work.unlink()
    return budget, interrupted


def _normalize_of(card: dict[str, Any]) -> dict[str, float]:
    normalize = card.get("normalize") or {}
    return {
        key: float(normalize[key])
        for key in ("low_percentile", "high_percentile")
        if normalize.get(key) is not None
    }


def _trainable_copy(base: Path, settings: FinetuneSettings) -> Any:
    """The base network, rebuilt under the current dtype policy, encoder frozen if asked."""
    import keras

    source = keras.saving.load_model(base, compile=False, safe_mode=True)
    network = with_dtype(source, keras.mixed_precision.global_policy().name)
    if settings.freeze_encoder:
        for layer in network.layers:
            # the contracting path and the bottleneck: every layer before the first upsampling
            if isinstance(layer, keras.layers.Conv2DTranspose | keras.layers.UpSampling2D):
                break
            layer.trainable = False
    return network


def _budget(settings: FinetuneSettings, clock: Any) -> Any:
    """A Keras callback that stops training when the budget is spent and lowers the learning
    rate along a cosine over the time spent, so a slow machine gets the same schedule in
    fewer steps; over the first ``settings.warmup_steps`` steps the rate is scaled up
    linearly from 1/warmup_steps of it to all of it. Its ``steps`` and ``elapsed()`` say how far it got."""
    import keras

    def warmup(step: int) -> float:
        """The share of the cosine's rate at ``step``: rising linearly to 1 over the
        warm-up, so the first steps do not wreck what the base model knows."""
        return min(1.0, (step + 1) / settings.warmup_steps) if settings.warmup_steps else 1.0

    class Budget(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.steps, self.started = 0, clock()

        def elapsed(self) -> float:
            return float(clock() - self.started)

        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            done = min(1.0, self.elapsed() / (settings.minutes * 60))
            if settings.max_steps:  # the schedule ends at whichever limit comes first
                done = max(done, self.steps / settings.max_steps)
            low, high = settings.final_learning_rate, settings.learning_rate
            rate = low + (high - low) * 0.5 * (1 + math.cos(math.pi * done))
            self.model.optimizer.learning_rate.assign(rate * warmup(self.steps))

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            self.steps += 1
            if self.elapsed() >= settings.minutes * 60 or self.steps == settings.max_steps:
                self.model.stop_training = True

    return Budget()


# --- command line ---------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``cellwatch finetune``."""
    d = FinetuneSettings()
    parser.add_argument(
        "--corrections",
        type=Path,
        required=True,
        metavar="DIR",
        help="folder with images/ and masks/ of the same file names",
    )
    parser.add_argument(
        "--out", type=Path, required=True, metavar="MODEL.keras", help="where to save the model"
    )
    parser.add_argument(
        "--minutes",
        type=float,
        default=d.minutes,
        metavar="N",
        help="training time in minutes (default: %(default)s)",
    )
    parser.add_argument(
        "--from",
        dest="start_from",
        type=Path,
        metavar="MODEL",
        help="model to start from (default: model.path in the config, else the bundled model)",
    )
    parser.add_argument(
        "--channel",
        choices=STAINS,
        help="what a colour image is turned into: hematoxylin, eosin, dab or gray (default: "
        "input.channel in the config, else what the base model's card names)",
    )
    parser.add_argument("--config", type=Path, help="configuration file (YAML)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="keep the new model even when it scores worse than its base on the held-out images",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=d.max_steps,
        help="stop after this many training steps even with time left (0: the time alone); "
        "for comparing recipes on a busy machine",
    )
    parser.add_argument("--crop", type=int, default=d.crop)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--learning-rate", type=float, default=d.learning_rate)
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=d.warmup_steps,
        metavar="N",
        help="raise the learning rate linearly from about 0 over the first N steps "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--holdout",
        type=float,
        default=d.holdout,
        metavar="SHARE",
        help="share of the corrections held out to judge the model (at least 1 image once "
        "there are 4, none below 4; default: %(default)s)",
    )
    parser.add_argument(
        "--freeze-encoder", action="store_true", help="train only the decoder (expanding path)"
    )
    parser.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision")
    parser.add_argument(
        "--keep",
        choices=("last", "loss", "score"),
        default=d.keep,
        help="which model is kept: the average as training ends (last), the lowest loss on "
        "crops of the held-out images (loss) or the best held-out accuracy@0.5 through the "
        "counting pipeline (score, checked every --score-every steps) (default: %(default)s)",
    )
    parser.add_argument("--score-every", type=int, default=d.score_every, metavar="STEPS")
    parser.add_argument(
        "--stain-jitter",
        type=float,
        default=d.stain_jitter,
        metavar="AMOUNT",
        help="RGB stains: train on crops deconvolved as if the stains' colours strayed by "
        "about this much (0.1: a little; default: %(default)s)",
    )
    parser.add_argument(
        "--ema",
        type=float,
        metavar="MOMENTUM",
        help="judge and keep an exponential moving average of the weights with this "
        f"momentum instead of the last step's weights (default: {d.ema}, about the last "
        "100 steps; 0: off; --keep score turns it off)",
    )
    parser.add_argument(
        "--outline-growth",
        type=float,
        metavar="PX",
        help="grow the cells' outlines by PX pixels at the network's scale when counting "
        "with the new model (default: measured on the training corrections, docs/teach.md)",
    )
    parser.add_argument(
        "--contact-weight",
        type=float,
        default=d.contact_weight,
        metavar="W",
        help="weigh the loss W times where two cells meet, so touching cells are split more "
        "often (default: %(default)s, none)",
    )
    parser.add_argument(
        "--invert",
        choices=("no", "yes", "auto"),
        default="auto",
        help="show the network the plane inverted, dark cells made bright; auto: when the "
        "training corrections' cells are darker than their background, as in brightfield "
        "(default: %(default)s; measured in docs/teach.md)",
    )
    parser.add_argument(
        "--peak-threshold",
        type=float,
        default=d.peak_threshold,
        metavar="P",
        help="when counting with the new model, drop cells whose interior probability "
        "never reaches P (doubtful ones; 0: keep all; default: %(default)s, measured in "
        "docs/teach.md)",
    )
    parser.add_argument("--seed", type=int, default=d.seed)


def run(args: argparse.Namespace) -> int:
    """``cellwatch finetune``: 0 when the new model is saved, 1 when it is refused."""
    from cellwatch.config import load_config

    if not args.minutes > 0:
        raise ConfigError(f"--minutes must be positive, got {args.minutes}")
    if not 0 <= args.stain_jitter < 1:
        raise ConfigError(f"--stain-jitter must be from 0 to below 1, got {args.stain_jitter}")
    if args.warmup_steps < 0:
        raise ConfigError(f"--warmup-steps must be 0 (no warm-up) or more, got {args.warmup_steps}")
    if not 0 <= args.holdout < 1:
        raise ConfigError(
            f"--holdout is the share of the corrections held out, from 0 to below 1; got "
            f"{args.holdout}"
        )
    if args.ema is not None and not 0 <= args.ema < 1:
        raise ConfigError(
            f"--ema is the momentum of the weights' moving average, from 0 (off) to below 1 "
            f"(0.99 averages about the last 100 steps); got {args.ema}"
        )
    if args.ema and args.keep == "score":
        raise ConfigError("--ema keeps an average of the weights: use it with --keep last or loss")
    if args.outline_growth is not None and not 0 <= args.outline_growth <= MAX_OUTLINE_GROWTH_PX:
        raise ConfigError(
            f"--outline-growth is in pixels, from 0 to {MAX_OUTLINE_GROWTH_PX:g}; got "
            f"{args.outline_growth}"
        )
    if args.score_every < 1:
        raise ConfigError(f"--score-every must be at least 1 step, got {args.score_every}")
    if not args.contact_weight > 0:
        raise ConfigError(f"--contact-weight must be positive, got {args.contact_weight}")
    if not 0 <= args.peak_threshold < 1:
        raise ConfigError(f"--peak-threshold is a probability below 1, got {args.peak_threshold}")
    config = load_config(args.config)
    base = args.start_from or (Path(config.model.path) if config.model.path else BUNDLED_MODEL)
    configured = config.input.channel
    channel = args.channel or (configured if configured in STAINS else None)
    corrections = Path(args.corrections)
    pairs = find_pairs(corrections / "images", corrections / "masks")
    settings = FinetuneSettings(
        minutes=args.minutes,
        max_steps=args.steps,
        crop=args.crop,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        holdout=args.holdout,
        freeze_encoder=args.freeze_encoder,
        bf16=args.bf16,
        seed=args.seed,
        keep=args.keep,
        score_every=args.score_every,
        stain_jitter=args.stain_jitter,
        contact_weight=args.contact_weight,
        ema=FinetuneSettings.ema if args.ema is None else args.ema,  # keep score: off
        outline_growth=args.outline_growth,
        invert={"auto": None, "yes": True, "no": False}[args.invert],
        peak_threshold=args.peak_threshold,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        card = finetune(
            pairs,
            args.out,
            settings,
            base=base,
            channel=channel,
            command=shlex.join(getattr(args, "command_line", ["cellwatch", "finetune"])),
            force=args.force,
            verbose=1 if sys.stdout.isatty() else 2,
        )
    except Refused as exc:
        print(f"cellwatch: {exc}", file=sys.stderr)
        return 1
    done = card[CARD_KEY]
    print(
        f"saved {args.out}: {done['steps']} steps in {done['training_seconds'] / 60:.1f} min "
        f"from {len(pairs)} corrections"
    )
    sizes = card.get(CARD_RANGE_KEY)
    if sizes:
        print(
            f"nuclei in the corrections: {sizes['low']:.0f} to {sizes['high']:.0f} px across "
            f"(median {sizes['median']:.0f}); the automatic size estimate keeps within that "
            "range with this model (scale.diameter_range_px in the config changes it)"
        )
    return 0
