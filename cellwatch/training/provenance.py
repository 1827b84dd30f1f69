"""The card of a fine-tuned model: what it learnt from, and how it reads images.

``cellwatch finetune`` starts the new card from its base's and records under
:data:`CARD_KEY` the base's hash, each correction's sha256 (and whether it was held out),
the command, the budget and the settings. Under ``input`` it names the channel the model
was taught on and whether it sees that plane inverted, at training and at counting alike
(``--invert``). The bundled model was made for fluorescence (bright nuclei on a dark
background); :func:`measure_polarity` finds from the corrections themselves whether their
cells are darker than their background (brightfield), which ``--invert auto`` follows and
the card records whatever the flag.
"""

from __future__ import annotations

__all__ = ["CARD_KEY", "Polarity", "measure_polarity", "new_card", "scoring_card"]

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellwatch import familiarity
from cellwatch.postprocess import CARD_GROWTH_KEY
from cellwatch.scale import CARD_RANGE_KEY
from cellwatch.storage import imageio
from cellwatch.training.crops import cells_are_darker
from cellwatch.training.shapes import corrections_diameters

CARD_KEY = "finetune"  # where the card keeps the provenance and the before/after table


@dataclass(frozen=True)
class Polarity:
    """How many corrections show cells darker than their background, of those measured
    (with cells and background both)."""

    dark: int
    measured: int

    @property
    def dark_cells(self) -> bool:
        """Most corrections measured have dark cells (none measured: no).

        >>> Polarity(dark=5, measured=7).dark_cells, Polarity(dark=1, measured=2).dark_cells
        (True, False)
        """
        return 2 * self.dark > self.measured

    def describe(self, invert: bool, flag: str) -> str:
        """One line for the log: what was measured, and what the model will see by
        ``--invert FLAG``."""
        bright = self.measured - self.dark
        found = (
            f"cells are darker than their background in {self.dark} of {self.measured} "
            f"training corrections (brighter in {bright})"
            if self.measured
            else "no training correction has both cells and background to compare"
        )
        sees = (
            "the model sees the plane inverted, dark cells made bright"
            if invert
            else "the model sees the plane as it is"
        )
        return f"{found}; {sees} (--invert {flag}: input.invert {str(invert).lower()})"


def measure_polarity(pairs: Sequence[tuple[Path, Path]], channel: str | None) -> Polarity:
    """:class:`Polarity` of image/mask ``pairs``, each image read as training reads it
    (``channel``: the stain an RGB image is turned into)."""
    found = [cells_are_darker(image, mask, channel=channel) for image, mask in pairs]
    return Polarity(dark=sum(f is True for f in found), measured=sum(f is not None for f in found))


def new_card(
    base: Path,
    base_card: Mapping[str, Any],
    out: Path,
    settings: Mapping[str, Any],
    *,
    reads: Mapping[str, Any],
    command: str,
    pairs: Sequence[tuple[Path, Path]],
    held: Sequence[tuple[Path, Path]],
) -> dict[str, Any]:
    """The card of the model fine-tuned from ``base`` into ``out`` with ``settings`` (the
    recipe, as a mapping), reading images as ``reads`` says (``channel``, ``invert``), on
    ``pairs`` of which ``held`` were held out. Nothing the base's network learnt or was
    measured on (its familiarity references, size range, outline growth, precision check)
    is carried over."""
    held_names = {p.name for p, _ in held}
    card = {k: v for k, v in base_card.items() if k not in (familiarity.CARD_KEY, CARD_KEY)}
    card["name"] = out.stem
    card["input"] = dict(reads)
    card[CARD_KEY] = {
        "base": {"path": str(base), "name": base.stem, "sha256": imageio.sha256_file(base)},
        "corrections": [
            {
                "image": str(image),
                "image_sha256": imageio.sha256_file(image),
                "mask_sha256": imageio.sha256_file(mask),
                "held_out": image.name in held_names,
            }
            for image, mask in pairs
        ],
        "command": command,
        "budget_minutes": settings["minutes"],
        "settings": dict(settings),
    }
    card.pop(CARD_RANGE_KEY, None)  # a fine-tuned base's range is its corrections', not these
    card.pop(CARD_GROWTH_KEY, None)  # and its outlines' growth was measured for its network
    card.pop("precision_check", None)  # so was bf16/int8 accuracy: these weights run f32
    sizes = corrections_diameters(pairs)
    if sizes is not None:
        card[CARD_RANGE_KEY] = sizes
    return card


def scoring_card(card: Mapping[str, Any]) -> dict[str, Any]:
    """The card a checkpoint is counted with: the base's scale and the new input, nothing
    learnt."""
    return {k: v for k, v in card.items() if k not in (familiarity.CARD_KEY, CARD_KEY)}
