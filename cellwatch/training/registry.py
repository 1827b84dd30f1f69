"""The models a lab has made: ``cellwatch models`` lists the ``.keras`` files in
``models.dir`` with what their cards say (base model, corrections, before/after scores,
date), so the one to give the service can be chosen by its numbers.
"""

from __future__ import annotations

__all__ = ["ModelEntry", "add_arguments", "format_table", "list_models", "models_dir", "run"]

import argparse
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cellwatch.config import Config
from cellwatch.errors import ConfigError, ModelError

# files beside a model that are not models to offer: checkpoints of a run in progress
_NOT_MODELS = (".training.keras", ".last.keras")


@dataclass(frozen=True)
class ModelEntry:
    """One model file and what its card says about where it came from and how it scores."""

    path: Path
    base: str  # name@hash of the model it was fine-tuned from; "" when not fine-tuned
    corrections: int | None  # corrected images it learned from (held-out ones included)
    before: float | None  # the base's accuracy@0.5 on the held-out corrections
    after: float | None  # this model's accuracy@0.5 on them
    channel: str | None  # the input it was trained on (a stain), if the card names one
    date: str  # when it was made (the card's start time, else the file's time), UTC
    refused: bool  # finetune refused it (worse than its base); kept for a look
    note: str = ""  # a card that could not be read


def models_dir(config: Config) -> Path:
    """``models.dir``, or ``models`` inside ``output.dir``."""
    return Path(config.models.dir) if config.models.dir else Path(config.output.dir) / "models"


def list_models(folder: Path) -> list[ModelEntry]:
    """The models in ``folder`` (not its subfolders), newest first."""
    from cellwatch.model import read_card

    if not folder.is_dir():
        raise ConfigError(
            f"{folder} is not a folder: set models.dir in the config, or pass --dir, to the "
            "folder where cellwatch finetune saved its models"
        )
    entries = []
    for path in sorted(folder.glob("*.keras")):
        if path.name.endswith(_NOT_MODELS):
            continue
        try:
            card, note = read_card(path), ""
        except ModelError as exc:
            card, note = {}, str(exc)
        entries.append(_entry(path, card, note))
    return sorted(entries, key=lambda e: e.date, reverse=True)


def _entry(path: Path, card: dict[str, Any], note: str) -> ModelEntry:
    tuned = card.get("finetune") or {}
    base = tuned.get("base") or {}
    scores = tuned.get("scores") or {}
    made = datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat(timespec="seconds")
    return ModelEntry(
        path=path,
        base=f"{base['name']}@{base['sha256'][:12]}" if base.get("sha256") else "",
        corrections=len(tuned["corrections"]) if "corrections" in tuned else None,
        before=(scores.get("base") or {}).get("accuracy_0.5"),
        after=(scores.get("new") or {}).get("accuracy_0.5"),
        channel=(card.get("input") or {}).get("channel"),
        date=str(tuned.get("started") or made),
        refused=path.name.endswith(".refused.keras"),
        note=note,
    )


def format_table(entries: list[ModelEntry], in_use: Path | None = None) -> str:
    """The table ``cellwatch models`` prints; ``*`` marks the model the config names."""
    if not entries:
        return "no models"
    header = ("", "model", "base", "corrections", "acc@0.5 before", "after", "input", "date")
    rows = [header]
    for e in entries:
        chosen = in_use is not None and e.path.resolve() == in_use.resolve()
        rows.append(
            (
                "*" if chosen else "",
                e.path.name + (" (refused)" if e.refused else ""),
                e.base or "-",
                "-" if e.corrections is None else str(e.corrections),
                "-" if e.before is None else f"{e.before:.3f}",
                "-" if e.after is None else f"{e.after:.3f}",
                e.channel or "-",
                e.date[:16].replace("T", " ") + (f"  ({e.note})" if e.note else ""),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``cellwatch models``."""
    parser.add_argument("--dir", type=Path, help="folder of models (default: models.dir)")
    parser.add_argument("--config", type=Path, help="configuration file (YAML)")


def run(args: argparse.Namespace) -> int:
    """``cellwatch models``: print the table; exit status 0."""
    from cellwatch.config import load_config

    config = load_config(args.config)
    folder = args.dir or models_dir(config)
    in_use = Path(config.model.path) if config.model.path else None
    print(f"models in {folder}:")
    print(format_table(list_models(folder), in_use))
    return 0
