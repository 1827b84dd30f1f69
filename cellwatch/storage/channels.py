"""Which channel of a multi-channel image shows the nuclei.

``input.channel`` names it by number or by name; ``auto`` (the default) takes the only
channel there is, or the one whose name is a nuclear stain of ``input.nuclear_channels``
("DAPI 405", "Hoechst 33342", "SiR-DNA"...). Anything else is a bad input whose message
lists the channels and the setting to change.
"""

from __future__ import annotations

__all__ = ["AUTO", "choose_channel", "is_nuclear"]

import re
from collections.abc import Sequence
from pathlib import Path

from cellwatch.errors import BadInputError

AUTO = "auto"


def is_nuclear(name: str, stains: Sequence[str]) -> bool:
    """True if the channel ``name`` names one of ``stains`` (case-insensitive).

    A stain matches as a word of its own: "DAPI 405", "Hoechst33342" and "TO-PRO-3" match,
    "SYTOX" does not match SYTO. A stain of two letters or fewer (PI) must stand alone:
    "PI" and "PI (red)" match, "PIEZO1" and "PI3K" do not.

    >>> is_nuclear("Hoechst 33342", ["DAPI", "Hoechst"]), is_nuclear("EPIC", ["PI"])
    (True, False)
    """
    return any(_pattern(stain).search(name) for stain in stains if stain.strip())


def _pattern(stain: str) -> re.Pattern[str]:
    parts = [re.escape(p) for p in re.split(r"[-_\s]+", stain.strip()) if p]
    body = r"[-_\s]?\d*[-_\s]?".join(parts)  # SPY650-DNA, SiR700-DNA
    after = r"(?![A-Za-z0-9])" if len(stain.strip()) <= 2 else r"(?![A-Za-z])"
    return re.compile(rf"(?<![A-Za-z0-9]){body}{after}", re.IGNORECASE)


def choose_channel(
    path: Path,
    setting: int | str | None,
    names: tuple[str, ...] | None,
    n_chan: int,
    *,
    samples: bool = False,
    stains: Sequence[str] = (),
) -> int | None:
    """The index of the channel to count, or None to accept equal channels as gray.

    Parameters
    ----------
    path : Path
        The file, for messages.
    setting : int, str or None
        ``input.channel``: a number, a channel's name, ``"auto"``, or None (gray images,
        colour images whose channels are equal).
    names : tuple of str or None
        The channels' names as the file gives them.
    n_chan : int
        How many channels the image has.
    samples : bool
        The channels are the colour samples of an RGB image (auto then keeps them, as
        None does).
    stains : sequence of str
        ``input.nuclear_channels``.

    Raises
    ------
    BadInputError
        The channel named or numbered is not there, or ``auto`` finds no single nuclear
        channel among several.
    """
    named = names if names and len(names) == n_chan else None
    if isinstance(setting, int):
        if not 0 <= setting < n_chan:
            raise BadInputError(
                f"{path} has {n_chan} channel(s), so input.channel = {setting} does not exist; "
                f"use 0 to {n_chan - 1} in config.yaml"
            )
        return setting
    if setting is None or (setting == AUTO and (samples or (n_chan > 1 and not named))):
        return None  # gray, RGB, or channels nobody named: equal channels are accepted
    if setting == AUTO:
        return 0 if n_chan == 1 else _nuclear(path, named or (), stains)
    return _by_name(path, setting, named, n_chan)


def _nuclear(path: Path, names: tuple[str, ...], stains: Sequence[str]) -> int:
    matches = [i for i, n in enumerate(names) if is_nuclear(n, stains)]
    if len(matches) == 1:
        return matches[0]
    listed = ", ".join(repr(n) for n in names)
    if matches:
        what = "several nuclear channels (" + ", ".join(repr(names[i]) for i in matches) + ")"
    else:
        what = "no channel named after a nuclear stain of input.nuclear_channels"
    raise BadInputError(
        f"{path} has {what}; its channels are {listed}. Set input.channel in config.yaml "
        f"to the channel that shows the nuclei (its name, or its number 0 to {len(names) - 1}), "
        "or add its name to input.nuclear_channels"
    )


def _by_name(path: Path, name: str, names: tuple[str, ...] | None, n_chan: int) -> int:
    """The index of the channel called ``name`` (any case, surrounding spaces ignored)."""
    if not names:
        numbers = f"a channel number (0 to {n_chan - 1})" if n_chan > 1 else "auto (one channel)"
        raise BadInputError(
            f"{path} does not name its channels, so input.channel = {name!r} cannot be "
            f"found; set input.channel to {numbers} in config.yaml"
        )
    wanted = name.strip().casefold()
    matches = [i for i, n in enumerate(names) if n.strip().casefold() == wanted]
    if len(matches) != 1:
        what = "no channel" if not matches else "more than one channel"
        raise BadInputError(
            f"{path} has {what} named {name!r}; its channels are "
            f"{', '.join(repr(n) for n in names)}. Set input.channel to one of these names "
            f"or to a number (0 to {n_chan - 1}) in config.yaml"
        )
    return matches[0]
