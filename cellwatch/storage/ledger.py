"""The CSV ledger: one row per processed image (or scene of a file), appended, never rewritten.

The header is written once, when the file is created. Each append writes whole lines and
then calls ``fsync``; it writes all of them or none: when the disk fills part-way (a short
``write``, or ``ENOSPC``), the file is cut back to its length before the append and a
:class:`~cellwatch.errors.TransientError` is raised, so the job is tried again later. A
crash can still leave one torn last line: :func:`repair` removes it at start-up, and each
append cuts one it finds before adding its own lines. The ``job_id`` and ``scene`` columns
let the daemon check whether a row already landed before it appends again.

New columns are only ever added at the end. A file an older cellwatch began has the
shorter header; before the first append its header line is extended, once (the file is
copied with the longer header and renamed into place; its rows stay as they were, one
field short, which CSV readers fill with empty values). Appenders hold an exclusive
``flock`` on the file while they write, so a ``cellwatch predict`` next to the daemon does
not append to the old copy.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import io
import logging
import math
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cellwatch.errors import CellwatchError, DiskFullError, TransientError, disk_full

__all__ = [
    "CELL_COLUMNS",
    "COLUMNS",
    "COLUMN_TYPES",
    "TEXT_COLUMNS",
    "LedgerError",
    "append_rows",
    "format_rows",
    "read",
    "recorded",
    "repair",
    "row_name",
    "scene_key",
]

_TAIL_CHUNK = 1 << 16  # bytes read at a time when looking back for the last newline

log = logging.getLogger("cellwatch.ledger")

#: Every ledger column, in file order, and the type :func:`read` parses it as (``str``:
#: text, kept as written; ``float``: a number, empty as NaN). New columns go at the end.
COLUMN_TYPES: dict[str, type] = {
    "processed_at": str,
    "image": str,
    "sha256": str,
    "height": float,
    "width": float,
    "pixel_size_um": float,
    "cell_count": float,
    "mean_area_px": float,
    "median_area_px": float,
    "mean_area_um2": float,
    "confluence": float,
    "status": str,
    "error": str,
    "labels": str,
    "overlay": str,
    "model": str,
    "settings_hash": str,
    "scale": float,
    "diameter_px": float,
    "scale_source": str,
    "duration_s": float,
    "saturated_fraction": float,
    "focus_score": float,
    "job_id": str,
    "scene": str,
    "familiarity": float,
    "channel": str,
}

COLUMNS: tuple[str, ...] = tuple(COLUMN_TYPES)
TEXT_COLUMNS: frozenset[str] = frozenset(c for c, kind in COLUMN_TYPES.items() if kind is str)

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
    "scene",
)


#: Columns added after ledgers were in use; :func:`read` gives older ledgers them, empty.
_LATER_COLUMNS: tuple[str, ...] = ("scene", "familiarity", "channel")


class LedgerError(CellwatchError):
    """A ledger file cannot be appended to as it is (its header is not cellwatch's)."""


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

    A file with an older, shorter header (its columns a prefix of ``columns``) gets the
    longer header first (see the module's notes).

    Raises
    ------
    TransientError
        The rows could not all be written (a full disk, a file-size limit, a share gone).
    LedgerError
        The file's header is not a prefix of ``columns``: it is not a cellwatch file of
        this kind, or a newer cellwatch wrote it.
    """
    text = format_rows(rows, columns)
    if not text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            _lock(fd)
            st = os.fstat(fd)
            if not _still_at(path, st):  # an upgrade renamed a new copy into place
                continue
            start = _whole_lines_length(fd)
            if start < st.st_size:
                _cut(fd, start)  # a torn line left by a crash: never bury it mid-file
            out = text
            if start == 0:
                out = ",".join(columns) + "\n" + text
            elif (st.st_dev, st.st_ino, columns) not in _CHECKED:
                header = _header(path)
                if header != columns:
                    _extend_header(path, header, columns)
                    continue
                _CHECKED.add((st.st_dev, st.st_ino, columns))
            data = out.encode("utf-8")
            try:
                _write_all(fd, data, write)
                os.fsync(fd)
            except OSError as exc:
                _give_back(path, fd, start, len(data), exc)
            return
        finally:
            os.close(fd)


#: (device, inode, columns) of files whose header was found to be ``columns``; a header
#: never changes in place, so it is read once per file.
_CHECKED: set[tuple[int, int, tuple[str, ...]]] = set()


def _lock(fd: int) -> None:
    """An exclusive lock until ``fd`` is closed; skipped where the file system has none."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as exc:
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise


def _still_at(path: Path, st: os.stat_result) -> bool:
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def _header(path: Path) -> tuple[str, ...]:
    with path.open(newline="", encoding="utf-8") as handle:
        line = handle.readline()
    if not line.endswith("\n"):
        raise LedgerError(
            f"{path} has no complete header line (a write cut short?). `cellwatch watch` "
            "cuts a half-written line at start; or move the file aside to start a new one"
        )
    return tuple(next(csv.reader([line])))


def _extend_header(path: Path, old: tuple[str, ...], new: tuple[str, ...]) -> None:
    """Give the file the longer header ``new``; its rows are copied unchanged."""
    if len(old) >= len(new) or new[: len(old)] != old:
        raise LedgerError(
            f"{path} has the columns {', '.join(old)}, which are not those this cellwatch "
            f"writes ({', '.join(new)}). Move the file aside (cellwatch starts a new one), "
            "or point output.dir at another folder"
        )
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with path.open("rb") as src, tmp.open("xb") as dst:
            src.readline()
            dst.write((",".join(new) + "\n").encode("utf-8"))
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        shutil.copymode(path, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_folder(path.parent)
    added = ", ".join(new[len(old) :])
    log.warning("%s: added the new column(s) %s to its header; its rows are unchanged", path, added)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
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
        raise (DiskFullError if disk_full(exc) else TransientError)(
            f"could not append {size} bytes to {path} ({reason}; disk full?), and could not "
            f"cut it back to {start} bytes either ({cut_exc.strerror or cut_exc}); the next "
            "start-up removes the half-written line. Free some space on that disk."
        ) from exc
    kind = DiskFullError if disk_full(exc) else TransientError
    raise kind(
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
    """The ledger as a DataFrame (empty, with the right columns, if there is no file).

    A ledger an older cellwatch wrote gets the columns it lacks (such as ``scene``,
    ``familiarity`` and ``channel``), empty. ``channel`` is text (a name, or a number). ``scene`` is text: ``<NA>`` for a file of one image, else ``"0"``, ``"1"``, ….
    """
    if not path.exists() or path.stat().st_size == 0:
        return pd.DataFrame(columns=list(COLUMNS))
    rows = pd.read_csv(path, dtype=dict.fromkeys(TEXT_COLUMNS, "string"), low_memory=False)
    for name in _LATER_COLUMNS:
        if name not in rows:
            rows[name] = (
                pd.Series(pd.NA, index=rows.index, dtype="string")
                if name in TEXT_COLUMNS
                else pd.Series(np.nan, index=rows.index, dtype="float64")
            )
    return rows


def scene_key(scene: Any) -> str:
    """A row's ``scene`` as the ledger writes it: ``""`` for a file of one image (None,
    empty or missing), else the scene number as text (``"0"``, ``"1"``, …).

    Examples
    --------
    >>> scene_key(None), scene_key(2), scene_key("3"), scene_key(float("nan"))
    ('', '2', '3', '')
    """
    if scene is None or scene is pd.NA or (isinstance(scene, float) and math.isnan(scene)):
        return ""
    return str(scene).strip()


def row_name(row: Mapping[str, Any]) -> str:
    """The image a row is about, as logs and messages name it: its file, and the scene.

    Examples
    --------
    >>> row_name({"image": "/in/plate.czi", "scene": 2})
    '/in/plate.czi scene 2'
    >>> row_name({"image": "/in/a.tif", "scene": None})
    '/in/a.tif'
    """
    scene = row.get("scene")
    return (
        f"{row['image']} scene {scene}"
        if scene is not None and scene == scene
        else str(row["image"])
    )


def recorded(path: Path) -> dict[tuple[str, str], str]:
    """``(job_id, scene) → status`` of every ledger row that has a job id (a later row
    wins); ``scene`` is :func:`scene_key`'s text, ``""`` for a file of one image.

    Read as plain CSV, one row at a time, so the daemon can check a large ledger at
    start-up without loading it into a DataFrame. Ledgers without a ``scene`` column read
    as files of one image each.
    """
    try:
        handle = path.open(newline="", encoding="utf-8")
    except FileNotFoundError:
        return {}
    with handle:
        return {
            (row["job_id"], scene_key(row.get("scene"))): row.get("status") or ""
            for row in csv.DictReader(handle)
            if row.get("job_id")
        }


def job_statuses(path: Path) -> dict[str, str]:
    """``job_id → status`` of the ledger rows of files of one image (no ``scene``).

    A file of several scenes has one row per scene; whether all of them landed only the
    file can tell, so its rows are left out here (see :func:`recorded`).
    """
    return {job: status for (job, scene), status in recorded(path).items() if not scene}


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value
