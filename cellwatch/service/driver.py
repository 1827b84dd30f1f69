"""The driver's one write: each finished image's cells, then its ledger row.

Workers (threads in this process, or Dask worker processes) only return results; the
process that owns the job queue (``cellwatch predict`` or the daemon) appends them here,
once per job, so ``ledger.csv`` and ``cells.csv`` have a single writer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cellwatch.service.crash import crash_point
from cellwatch.storage import ledger

if TYPE_CHECKING:
    import pandas as pd

    from cellwatch.pipeline import ImageResult

__all__ = ["record", "record_all"]


def record(result: ImageResult, out_dir: Path) -> None:
    """Append the image's cells, then its ledger row (the row marks the job as done)."""
    if len(result.cells):
        ledger.append_rows(out_dir / "cells.csv", _records(result.cells), ledger.CELL_COLUMNS)
    crash_point("after-cells")
    ledger.append_rows(out_dir / "ledger.csv", [result.row])
    crash_point("after-ledger")


def record_all(results: Sequence[ImageResult], out_dir: Path) -> None:
    """:func:`record` for several images at once: all their cells in one append, then all
    their ledger rows in one (two ``fsync`` calls however many images there are)."""
    if not results:
        return
    cells = [cell for result in results if len(result.cells) for cell in _records(result.cells)]
    if cells:
        ledger.append_rows(out_dir / "cells.csv", cells, ledger.CELL_COLUMNS)
    crash_point("after-cells")
    ledger.append_rows(out_dir / "ledger.csv", [result.row for result in results])
    crash_point("after-ledger")


def _records(table: pd.DataFrame) -> list[dict[str, Any]]:
    """``table.to_dict("records")`` (Python scalars), a few times faster on small tables."""
    columns = list(table.columns)
    values = zip(*(table[c].tolist() for c in columns), strict=True)
    return [dict(zip(columns, row, strict=True)) for row in values]
