"""What one day's report shows: the page (:mod:`cellwatch.reporting.html`) and the CSV
(:mod:`cellwatch.reporting.report`) both read a :class:`DayReport`, so neither imports the
other for it."""

from __future__ import annotations

__all__ = ["DayReport"]

from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from cellwatch.reporting.qc import QcThresholds


@dataclass(frozen=True)
class DayReport:
    """Everything the page and the CSV of one local day show.

    ``images`` is in acquisition order and carries, besides the ledger columns, ``local_time``
    (tz-aware), one column per group key, ``group`` (a readable label), ``flags`` (a list),
    ``typical_count``, ``display`` (short image name), ``overlay_file`` and ``overlay_href``.
    """

    day: date
    timezone: str
    images: pd.DataFrame
    group_names: tuple[str, ...]
    ledger_columns: tuple[str, ...]
    cell_areas: np.ndarray | None
    area_unit: str
    clock_change: str | None
    generated_at: datetime
    ledger_path: Path
    thresholds: QcThresholds
