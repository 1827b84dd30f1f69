"""The CSV ledger: one row per processed image, appended, never rewritten.

The header is written once, when the file is created. Each append writes whole lines and
then calls ``fsync``; it writes all of them or none: when the disk fills part-way (a short
``write``, or ``ENOSPC``), the file is cut back to its length before the append and a
:class:`~cellwatch.errors.TransientError` is raised, so the job is tried again later. A
crash can still leave one torn last line: :func:`repair` removes it at start-up, and each
append cuts one it finds before adding its own lines. The ``job_id`` column lets the
daemon check whether a job's row already landed before it appends again.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from cellwatch.errors import TransientError

__all__ = [
    "CELL_COLUMNS",
    "COLUMNS",
    "append_rows",
    "format_rows",
    "job_statuses",
    "read",
    "repair",
]

_TAIL_CHUNK = 1 << 16  # bytes read at a time when looking back for the last newline

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
    path: Path,
    rows: Iterable[Mapping[str, Any]],
    columns: tuple[str, ...] = COLUMNS,
    *,
    write: Callable[[int, bytes], int] = os.write,
) -> None:
    """Append rows to the CSV at ``path``, writing the header first if the file is new.

    All the rows land, or none: if the file system takes only part of them, the file is
    cut back to its length before the append.

    Parameters
    ----------
    path : pathlib.Path
        The CSV file (``ledger.csv`` or ``cells.csv``); created if missing.
    rows : iterable of mapping
        One mapping per row; missing keys become empty cells.
    columns : tuple of str
        The header, in order.
    write : callable, optional
        ``os.write`` or a stand-in with its contract (tests pass one that writes short).

    Raises
    ------
    TransientError
        The rows could not all be written (a full disk, a file-size limit, a share gone).
    """
    text = format_rows(rows, columns)
    if not text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = _whole_lines_length(fd)
        if start < os.fstat(fd).st_size:
            _cut(fd, start)  # a torn line left by a crash: never bury it mid-file
        if start == 0:
            text = ",".join(columns) + "\n" + text
        data = text.encode("utf-8")
        try:
            _write_all(fd, data, write)
            os.fsync(fd)
        except OSError as exc:
            _give_back(path, fd, start, len(data), exc)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes, write: Callable[[int, bytes], int]) -> None:
    """Write ``data`` whole; a short write is retried with the rest, as POSIX expects (the
    retry then reports why, such as ``ENOSPC``). A write that makes no progress is an error."""
    view = memoryview(data)
    while view:
        done = write(fd, view)
        if done <= 0:
            raise OSError(f"the file system accepted none of the last {len(view)} bytes")
        view = view[done:]


def _give_back(path: Path, fd: int, start: int, size: int, exc: OSError) -> None:
    """Cut ``path`` back to ``start`` bytes and raise the append's failure as transient."""
    reason = exc.strerror or str(exc)
    try:
        _cut(fd, start)
    except OSError as cut_exc:
        raise TransientError(
            f"could not append {size} bytes to {path} ({reason}; disk full?), and could not "
            f"cut it back to {start} bytes either ({cut_exc.strerror or cut_exc}); the next "
            "start-up removes the half-written line. Free some space on that disk."
        ) from exc
    raise TransientError(
        f"could not append {size} bytes to {path} ({reason}; disk full?); the file is "
        f"unchanged ({start} bytes). Free some space on that disk and try again."
    ) from exc


def _cut(fd: int, length: int) -> None:
    os.ftruncate(fd, length)
    os.fsync(fd)


def _whole_lines_length(fd: int) -> int:
    """The length of the file up to and including its last newline (0 if it has none).

    Reads backwards from the end in small chunks, so a large ledger costs little.
    """
    end = os.fstat(fd).st_size
    position = end
    while position > 0:
        begin = max(0, position - _TAIL_CHUNK)
        chunk = os.pread(fd, position - begin, begin)
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            return begin + newline + 1
        position = begin
    return 0


def repair(path: Path) -> bool:
    """Cut a torn last line (one without its newline) left by a crash; True if cut."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        length = _whole_lines_length(fd)
        if length == os.fstat(fd).st_size:
            return False
        _cut(fd, length)
        return True
    finally:
        os.close(fd)


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
