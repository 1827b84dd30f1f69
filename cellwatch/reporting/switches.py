"""Where the model or the settings changed, read from the ledger alone.

Every ledger row names the model (``name@hash``) and the settings hash it was counted with.
The daemon switches both at the next image after ``systemctl reload`` (SIGHUP), so the
first row counted with a new model marks the switch. Rows are taken in the order they were
*processed* (not acquired): a switch is something the service did, at a time it did it.
The daily report shows each switch of its day on the page and in the count plot.
"""

from __future__ import annotations

__all__ = ["SWITCHED", "Switch", "mark_switches"]

from dataclasses import dataclass

import pandas as pd

#: Column the report adds: the :class:`Switch` on the first row counted after one, else None.
SWITCHED = "switched"


@dataclass(frozen=True)
class Switch:
    """A change of model and/or settings hash, seen on the first row counted after it
    (``None`` on the side that did not change)."""

    model: tuple[str, str] | None  # (before, after)
    settings: tuple[str, str] | None

    def sentence(self, at: str) -> str:
        """What the report page says, with ``at`` the local time of the first new row.

        >>> Switch(("unet@aaaa", "mine@bbbb"), None).sentence("14:02")
        'Model switched from unet@aaaa to mine@bbbb at 14:02.'
        >>> Switch(("a@1", "b@2"), ("x", "y")).sentence("14:02")
        'Model switched from a@1 to b@2 at 14:02 (settings hash x → y).'
        >>> Switch(None, ("x", "y")).sentence("09:15")
        'Settings changed (hash x → y) at 09:15; same model.'
        """
        settings = f"{self.settings[0]} → {self.settings[1]}" if self.settings else ""
        if self.model is None:
            return f"Settings changed (hash {settings}) at {at}; same model."
        text = f"Model switched from {self.model[0]} to {self.model[1]} at {at}"
        return text + (f" (settings hash {settings})." if settings else ".")

    @property
    def short(self) -> str:
        """A label for the count plot: the new model's name, or "new settings"."""
        return f"→ {self.model[1]}" if self.model else "→ new settings"


def mark_switches(rows: pd.DataFrame) -> pd.Series:
    """For each row, the :class:`Switch` when it is the first row processed after the
    model or the settings hash changed, else None.

    Parameters
    ----------
    rows : pandas.DataFrame
        Ledger rows with ``processed_at``, ``model`` and ``settings_hash`` (a missing
        value, as older ledgers have, neither starts nor ends a switch) and ``_order``, the
        row's place in the ledger, which breaks ties in ``processed_at``.

    Returns
    -------
    pandas.Series
        A :class:`Switch` or None per row, indexed as ``rows``.

    Examples
    --------
    >>> rows = pd.DataFrame({
    ...     "processed_at": ["2026-12-06T14:02:00+00:00", "2026-12-06T14:00:00+00:00"],
    ...     "model": ["mine@bbbb", "unet@aaaa"], "settings_hash": ["s1", "s1"],
    ...     "_order": [0, 1]})
    >>> mark_switches(rows).tolist()
    [Switch(model=('unet@aaaa', 'mine@bbbb'), settings=None), None]
    """
    marks = pd.Series([None] * len(rows), index=rows.index, dtype=object)
    if rows.empty:
        return marks
    stamp = pd.to_datetime(rows["processed_at"], utc=True, errors="coerce", format="ISO8601")
    order = rows.assign(_stamp=stamp).sort_values(["_stamp", "_order"], kind="stable").index
    last: dict[str, str] = {}
    for index in order:
        changed: dict[str, tuple[str, str]] = {}
        for column in ("model", "settings_hash"):
            value = rows.at[index, column]
            if not isinstance(value, str) or not value:
                continue
            before = last.get(column)
            if before is not None and before != value:
                changed[column] = (before, value)
            last[column] = value
        if changed:
            marks.at[index] = Switch(changed.get("model"), changed.get("settings_hash"))
    return marks
