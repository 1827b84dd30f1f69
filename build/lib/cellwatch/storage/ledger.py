"""The CSV ledger: one row per processed image, appended, never rewritten.

The header is written once, when the file is created. Each append is one ``write`` of whole
lines followed by ``fsync``, so a crash leaves at most one torn last line, which
:func:`repair` removes at start-up before anything else is appended. The ``job_id`` column
lets the daemon check whether a job's row already landed before it appends again.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

COLUMNS: tuple[str, ...] = (
    "processed_at",
    "image",
    "sha256",
    "height",
    "width",
    "pixel_size_um",
    "cell_count",
    "mean_area_px",
    "median_area_px",
    "mean_area_um2",
    "confluence",
    "status",
    "error",
    "labels",
    "overlay",
    "model",
    "settings_hash",
    "scale",
    "diameter_px",
    "scale_source",
    "duration_s",
    "saturated_fraction",
    "focus_score",
    "job_id",
)

CELL_COLUMNS: tuple[str, ...] = (
    "image",
    "job_id",
    "label",
    "centroid_y",
    "centroid_x",
    "area_px",
    "perimeter_px",
    "equivalent_diameter_px",
    "eccentricity",
    "mean_intensity",
    "area_um2",
    "perimeter_um",
    "equivalent_diameter_um",
)


def format_rows(rows: Iterable[Mapping[str, Any]], columns: tuple[str, ...]) -> str:
    """Render rows as CSV text in ``columns`` order; missing values become empty cells."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="raise", lineterminator="\n")
    for row in rows:
        writer.writerow({key: _cell(row.get(key)) for key in columns})
    return buffer.getvalue()


def append_rows(
    path: Path, rows: Iterable[Mapping[str, Any]], columns: tuple[str, ...] = COLUMNS
) -> None:
    """Append rows to the CSV at ``path``, writing the header first if the file is new."""
    text = format_rows(rows, columns)
    if not text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size == 0:
            text = ",".join(columns) + "\n" + text
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def repair(path: Path) -> bool:
    """Cut a torn last line (one without its newline) left by a crash; True if cut."""
    try:
        with path.open("rb+") as handle:
            data = handle.read()
            if not data or data.endswith(b"\n"):
                return False
            handle.truncate(data.rfind(b"\n") + 1)
            handle.flush()
            os.fsync(handle.fileno())
            return True
    except FileNotFoundError:
        return False


def read(path: Path) -> pd.DataFrame:
    """The ledger as a DataFrame (empty, with the right columns, if there is no file)."""
    if not path.exists() or path.stat().st_size == 0:
        return pd.DataFrame(columns=list(COLUMNS))
    text = (
        "image",
        "sha256",
        "status",
        "error",
        "labels",
        "overlay",
        "model",
        "settings_hash",
        "scale_source",
        "job_id",
        "processed_at",
    )
    return pd.read_csv(path, dtype={name: "string" for name in text}, low_memory=False)


def job_statuses(path: Path) -> dict[str, str]:
    """``job_id → status`` of every ledger row that has a job id (a later row wins).

    Read as plain CSV, one row at a time, so the daemon can check a large ledger at
    start-up without loading it into a DataFrame.
    """
    try:
        handle = path.open(newline="", encoding="utf-8")
    except FileNotFoundError:
        return {}
    with handle:
        return {
            row["job_id"]: row.get("status") or ""
            for row in csv.DictReader(handle)
            if row.get("job_id")
        }


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value
