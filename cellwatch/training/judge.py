"""Scoring a model being fine-tuned on held-out corrections through the real counting
pipeline (``cellwatch evaluate``'s figures), keeping the best checkpoint, the before/after
table, and a new model's familiarity references."""

from __future__ import annotations

__all__ = [
    "Judge",
    "before_after_table",
    "counting_config",
    "familiarity_references",
    "reading_channel",
    "score_model",
    "with_dtype",
]

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from cellwatch import familiarity
from cellwatch.config import Config, InputConfig, with_card_input
from cellwatch.errors import BadInputError
from cellwatch.model import LoadedModel, load_model, write_card
from cellwatch.storage import imageio


def reading_channel(path: Path, stain: str | None) -> str | None:
    """The ``input.channel`` that reads ``path`` as the training did: None when the file
    is already one plane (the corrections widget saves the plane it counted), else ``stain``."""
    try:
        imageio.read_image(path)
    except BadInputError:
        if stain is None:
            raise
        return stain
    return None


def counting_config(
    model: LoadedModel, image: Path, channel: str | None, **sections: Any
) -> Config:
    """The config ``model`` counts corrections with: the plane read as training read it
    (``image`` is one of them), the input its card names (inverted or not), and
    ``sections`` (e.g. ``postprocess``) laid over the defaults."""
    input_ = InputConfig(channel=reading_channel(image, channel))
    return with_card_input(replace(Config(), input=input_, **sections), model.card)


def with_dtype(network: Any, policy: str) -> Any:
    """``network`` rebuilt with every layer but the input and the last (the probabilities,
    float32 always) in ``policy`` ("float32", "mixed_bfloat16"); the same weights."""
    import keras

    config = network.get_config()
    layers = [la for la in config["layers"][:-1] if la["class_name"] != "InputLayer"]

    def name(dtype: Any) -> Any:  # a layer's dtype: a policy name, or a serialized policy
        return dtype["config"]["name"] if isinstance(dtype, dict) else dtype

    if all(name(la["config"].get("dtype")) in (policy, None) for la in layers):
        return network
    for layer in layers:
        layer["config"]["dtype"] = policy
    rebuilt = keras.Model.from_config(config)
    rebuilt.set_weights(network.get_weights())
    return rebuilt


def score_model(
    model_path: Path, pairs: Sequence[tuple[Path, Path]], channel: str | None
) -> dict[str, Any]:
    """``cellwatch evaluate``'s headline figures for one model on ``pairs``."""
    from cellwatch.pipeline import Segmenter
    from cellwatch.training.evaluate import evaluate

    model = load_model(model_path)
    config = counting_config(model, pairs[0][0], channel)
    summary, _ = evaluate(pairs, Segmenter(config, model), config)
    at = summary["thresholds"]["0.50"]
    return {
        "accuracy_0.5": round(at["accuracy"], 4),
        "f1_0.5": round(at["f1"], 4),
        "precision_0.5": round(at["precision"], 4),
        "recall_0.5": round(at["recall"], 4),
        "pixel_dice": round(summary["pixel_dice"], 4),
        "count_mape_percent": round(summary["count_mape_percent"], 2),
    }


class Judge:
    """Scores the model being trained on the held-out images through the real counting
    pipeline every ``every`` steps (and when training ends), and keeps the best one at
    ``work``: the highest accuracy@0.5, then the lowest count error. ``history`` holds
    every checkpoint's step and scores."""

    def __init__(
        self,
        held: Sequence[tuple[Path, Path]],
        channel: str | None,
        card: dict[str, Any],
        say: Any,
    ) -> None:
        self.held, self.channel, self.say = list(held), channel, say
        self.card = card  # what a checkpoint is counted with
        self.history: list[dict[str, Any]] = []
        self.best: tuple[float, float] | None = None
        self.best_step = 0
        self.work = Path()
        self.every = 1
        self.steps = self.checked = 0  # steps trained, and the step last scored

    def start(self, work: Path, every: int) -> None:
        self.work, self.every = work, max(1, every)

    def check(self, network: Any, step: int) -> None:
        candidate = self.work.with_suffix(".candidate.keras")
        with_dtype(network, "float32").save(candidate)
        write_card(candidate, self.card)
        try:
            scores = score_model(candidate, self.held, self.channel)
        finally:
            candidate.with_suffix(".json").unlink(missing_ok=True)
        self.checked = step
        key = (scores["accuracy_0.5"], -scores["count_mape_percent"])
        kept = self.best is None or key > self.best
        self.history.append({"step": step, "kept": kept, **scores})
        self.say(
            f"step {step}: held-out accuracy@0.5 {scores['accuracy_0.5']:.3f}, count MAPE "
            f"{scores['count_mape_percent']:.1f} %" + (" (best so far, kept)" if kept else "")
        )
        if kept:
            self.best, self.best_step = key, step
            candidate.replace(self.work)
        else:
            candidate.unlink()

    def callback(self) -> Any:
        import keras

        judge = self

        class Scoring(keras.callbacks.Callback):
            def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
                judge.steps += 1
                if judge.steps % judge.every == 0:
                    judge.check(self.model, judge.steps)

            def on_train_end(self, logs: Any = None) -> None:
                if judge.steps > judge.checked:
                    judge.check(self.model, judge.steps)

        return Scoring()


def familiarity_references(
    model_path: Path, images: Sequence[Path], channel: str | None
) -> dict[str, Any]:
    """The new model's familiarity references, measured on its training corrections."""
    from cellwatch.pipeline import Segmenter, read

    if not images:
        return {}
    model = load_model(model_path)
    config = counting_config(model, images[0], channel)
    segmenter = Segmenter(config, model)
    measured = []
    for path in images:
        data = read(path, config)
        measured.append(segmenter.segment(data.pixels, data.pixel_size_um).familiarity)
    return familiarity.card_references(measured)


def before_after_table(before: dict[str, Any], after: dict[str, Any], on: str) -> str:
    """The before/after table ``finetune`` prints (Markdown)."""
    rows = [
        ("accuracy@0.5", "accuracy_0.5", "{:.3f}"),
        ("F1@0.5", "f1_0.5", "{:.3f}"),
        ("pixel dice", "pixel_dice", "{:.3f}"),
        ("count MAPE %", "count_mape_percent", "{:.1f}"),
    ]
    lines = [f"scores on the {on}:", "| | base | new |", "| --- | --- | --- |"]
    for title, key, fmt in rows:
        lines.append(f"| {title} | {fmt.format(before[key])} | {fmt.format(after[key])} |")
    return "\n".join(lines)
