"""Daily count reports: one HTML page and one CSV per local day, from the ledger.

The ledger holds UTC times; a report covers one calendar day in the lab's time zone, so a
day can be 23 or 25 hours long when the clocks change. Each day's rows get experiment group
keys (from a regular expression with named groups matched against the image path) and QC
flags (:mod:`cellwatch.reporting.qc`), then :mod:`cellwatch.reporting.html` draws the page.
Each scene of a multi-scene file is an image of its own, listed under its file
(``plate.czi · scene 2``).
"""

from __future__ import annotations

__all__ = [
    "add_report_arguments",
    "build_reports",
    "check_settings",
    "report_cli",
    "reports_for_config",
]

import argparse
import os
import re
import sys
from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd

from cellwatch.config import local_today, time_zone
from cellwatch.errors import CellwatchError, ConfigError
from cellwatch.reporting.day import DayReport
from cellwatch.reporting.html import render_day
from cellwatch.reporting.qc import QcThresholds, flag_images
from cellwatch.reporting.switches import SWITCHED, mark_switches
from cellwatch.storage import ledger
from cellwatch.storage.imageio import atomic_write

if TYPE_CHECKING:
    from cellwatch.config import Config, ReportConfig

NO_MATCH = "(no match)"
_REQUIRED = ("processed_at", "image", "status", "cell_count")
# Older ledgers may lack these; the report shows them as unknown.
_OPTIONAL = ("error", "overlay", "model", "settings_hash", "confluence", "scene", "familiarity")
# A group name must not take a ledger column's name, nor one the report adds.
_ADDED = ("date", "time", "qc_flags", "typical_count", "acquired_at")
_INTERNAL = ("local_time", "group", "flags", "display", "overlay_file", "overlay_href", SWITCHED)


def build_reports(
    ledger_path: Path,
    out_dir: Path,
    *,
    start: date,
    end: date,
    timezone: str = "UTC",
    group_pattern: str | None = None,
    cells_path: Path | None = None,
    now: datetime | None = None,
    thresholds: QcThresholds | None = None,
) -> list[Path]:
    """Write ``<out_dir>/reports/YYYY-MM-DD.html`` and ``.csv`` for each local day.

    Parameters
    ----------
    ledger_path, cells_path : pathlib.Path
        The ledger and (optionally) the per-cell table; a missing file means no rows.
    out_dir : pathlib.Path
        Reports go into its ``reports`` folder, created if needed.
    start, end : datetime.date
        First and last local day, inclusive.
    timezone : str
        IANA name of the lab's time zone, e.g. ``"Europe/Berlin"``.
    group_pattern : str, optional
        Regular expression with named groups, searched in each image path.
    now : datetime.datetime, optional
        When the report is made (shown on the page).
    thresholds : QcThresholds, optional
        When images are flagged.

    Returns
    -------
    list of pathlib.Path
        The files written, HTML then CSV for each day.
    """
    zone = time_zone(timezone)
    if end < start:
        raise ConfigError(f"the report period ends ({end}) before it starts ({start})")
    regex = _compile_groups(group_pattern)
    thresholds = thresholds or QcThresholds()
    now = now or datetime.now(UTC)
    rows = _load_ledger(ledger_path, zone)
    columns = tuple(c for c in rows.columns if c not in ("_order", "local_time"))
    rows[SWITCHED] = mark_switches(rows)  # over the whole ledger: a switch at midnight shows
    reports_dir = out_dir / "reports"
    reports_dir.mkdir(parents=True, exist_ok=True)
    days = [start + timedelta(days=i) for i in range((end - start).days + 1)]
    dates = rows["local_time"].dt.date
    wanted = rows[dates.between(start, end)]
    cells = _load_cells(cells_path, wanted)
    written: list[Path] = []
    for day in days:
        images = wanted[dates[wanted.index] == day]
        images = _annotate(images, regex, thresholds, ledger_path.parent, reports_dir)
        areas, unit = _day_cell_areas(images, cells)
        report = DayReport(
            day=day,
            timezone=timezone,
            images=images,
            group_names=tuple(regex.groupindex) if regex else (),
            ledger_columns=columns,
            cell_areas=areas,
            area_unit=unit,
            clock_change=_clock_change(day, zone),
            generated_at=now,
            ledger_path=ledger_path,
            thresholds=thresholds,
        )
        html_path = reports_dir / f"{day.isoformat()}.html"
        csv_path = reports_dir / f"{day.isoformat()}.csv"
        _write_atomic(html_path, render_day(report))
        _write_atomic(csv_path, day_csv(report))
        written += [html_path, csv_path]
    return written


def check_settings(settings: ReportConfig) -> None:
    """Raise :class:`ConfigError` for a ``report`` section that cannot make a report.

    :func:`cellwatch.config.load_config` checks what it can alone; this adds what needs
    the report's own columns (a group name must not shadow one). Cheap: the daemon calls it
    at start, so a bad section stops it there.
    """
    time_zone(settings.timezone)
    _compile_groups(settings.group_pattern)
    QcThresholds.from_settings(settings)


def reports_for_config(
    config: Config, *, start: date, end: date, now: datetime | None = None
) -> list[Path]:
    """:func:`build_reports` for the results folder ``output.dir``: it reads the ledger and
    cell table there and writes the pages to its ``reports`` folder."""
    results = Path(config.output.dir)
    rc = config.report
    return build_reports(
        results / "ledger.csv",
        results,
        start=start,
        end=end,
        timezone=rc.timezone,
        group_pattern=rc.group_pattern,
        cells_path=results / "cells.csv",
        now=now,
        thresholds=QcThresholds.from_settings(rc),
    )


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--date``, ``--from``, ``--to`` and ``--out`` to the ``report`` sub-command."""
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--date", type=_parse_date, help="one day, YYYY-MM-DD (default: today)")
    when.add_argument(
        "--from", dest="from_date", type=_parse_date, help="first day of a period, YYYY-MM-DD"
    )
    parser.add_argument(
        "--to", dest="to_date", type=_parse_date, help="last day of the period (default: today)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder: reads DIR/ledger.csv, writes DIR/reports/ (default: output.dir)",
    )


def report_cli(args: argparse.Namespace, config: Config) -> int:
    """Run ``cellwatch report``: write the pages and print where they are.

    ``config`` already holds ``--out`` as ``output.dir`` (see
    :func:`cellwatch.config.config_from_args`): the same results folder as ``predict``,
    ``watch`` and ``status``, so the report reads the ledger those wrote.
    """
    today = local_today(config.report.timezone)
    if args.to_date is not None and args.from_date is None:
        raise ConfigError("--to needs --from: give the first day of the period too")
    if args.from_date is not None:
        start, end = args.from_date, args.to_date or today
    else:
        start = end = args.date or today
    ledger_path = Path(config.output.dir) / "ledger.csv"
    if not ledger_path.exists():
        print(f"note: no ledger at {ledger_path} yet; the reports will be empty", file=sys.stderr)
    paths = reports_for_config(config, start=start, end=end)
    for path in paths[::2]:
        print(path)
    return 0


def day_csv(report: DayReport) -> str:
    """The day's per-image rows with QC flags and group keys, as CSV text."""
    images = report.images
    times = images["local_time"].map(lambda t: t.isoformat())
    table = pd.DataFrame({"date": report.day.isoformat(), "time": times}, index=images.index)
    for name in report.group_names:
        table[name] = images[name]
    table = pd.concat([table, images[list(report.ledger_columns)]], axis=1)
    for column in ("cell_count", "height", "width"):
        if column in table:
            table[column] = pd.to_numeric(table[column], errors="coerce").astype("Int64")
    table["qc_flags"] = images["flags"].map("; ".join)
    table["typical_count"] = images["typical_count"]
    return table.to_csv(index=False, lineterminator="\n")


def _compile_groups(pattern: str | None) -> re.Pattern[str] | None:
    if not pattern:
        return None
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"report.group_pattern is not a valid regular expression: {exc}") from exc
    if not regex.groupindex:
        raise ConfigError(
            "report.group_pattern needs named groups such as (?P<well>[A-H][0-9]{2}); "
            f"{pattern!r} has none"
        )
    clash = sorted(set(regex.groupindex) & {*ledger.COLUMNS, *_ADDED, *_INTERNAL})
    if clash:
        raise ConfigError(
            f"report.group_pattern: the group name {clash[0]!r} is already a report column; "
            "rename the group"
        )
    return regex


def _load_ledger(path: Path, zone: ZoneInfo) -> pd.DataFrame:
    """Ledger rows with a local time; duplicate rows of a job's image (crash recovery) keep
    the last."""
    rows = ledger.read(path).reset_index(drop=True)
    missing = [c for c in _REQUIRED if c not in rows]
    if missing:
        raise CellwatchError(
            f"{path} does not look like a cellwatch ledger: it has no {', '.join(missing)} "
            "column; point the report at the ledger.csv in the output folder"
        )
    rows = rows.reindex(columns=[*rows.columns, *(c for c in _OPTIONAL if c not in rows)])
    rows["_order"] = np.arange(len(rows))
    if "job_id" in rows:
        has_job = rows["job_id"].notna() & rows["job_id"].ne("")
        last = ~rows.duplicated(["job_id", "scene"], keep="last") | ~has_job
        rows = rows[last]
    stamp = _parse_times(rows["processed_at"])
    if "acquired_at" in rows:
        stamp = _parse_times(rows["acquired_at"]).fillna(stamp)
    rows = rows.assign(local_time=stamp.dt.tz_convert(zone)).dropna(subset=["local_time"])
    rows = rows.sort_values(["local_time", "_order"], kind="stable")
    for column in ("image", "overlay", "model", "settings_hash", "status", "error"):
        rows[column] = rows[column].astype("string").astype(object)
    rows["scene"] = rows["scene"].map(ledger.scene_key).astype(object)
    return rows


def _scenes_under_files(images: pd.DataFrame) -> pd.DataFrame:
    """The rows with the scenes of each file together, in scene order, where the file's
    first scene stands."""
    if not images["scene"].astype(bool).any():
        return images
    file_key = images["image"].astype(str)
    if "job_id" in images:  # one job is one version of one file
        file_key = images["job_id"].astype(object).where(images["job_id"].notna(), file_key)
    position = pd.Series(np.arange(len(images)), index=images.index)
    first = position.groupby(file_key.to_numpy()).transform("min")
    scene = pd.to_numeric(images["scene"], errors="coerce").fillna(-1)
    order = pd.DataFrame({"first": first, "scene": scene}).sort_values(
        ["first", "scene"], kind="stable"
    )
    return images.loc[order.index]


def _parse_times(values: pd.Series) -> pd.Series:
    return pd.to_datetime(values, utc=True, errors="coerce", format="ISO8601")


def _annotate(
    images: pd.DataFrame,
    regex: re.Pattern[str] | None,
    thresholds: QcThresholds,
    results_dir: Path,
    reports_dir: Path,
) -> pd.DataFrame:
    """One day's rows plus group keys, QC flags, short names and overlay links."""
    images = _scenes_under_files(images).copy()
    names = tuple(regex.groupindex) if regex else ()
    for name, values in _group_keys(images["image"], regex).items():
        images[name] = values
    images["group"] = _group_labels(images, names)
    images["flags"], images["typical_count"] = flag_images(images, images["group"], thresholds)
    scenes = images["scene"].map(lambda k: f" · scene {k}" if k else "")
    images["display"] = [n + k for n, k in zip(_short_names(images["image"]), scenes, strict=True)]
    files, links = _overlay_links(images["overlay"], results_dir, reports_dir)
    images["overlay_file"] = pd.Series(files, index=images.index, dtype=object)
    images["overlay_href"] = pd.Series(links, index=images.index, dtype=object)
    return images


def _group_keys(paths: pd.Series, regex: re.Pattern[str] | None) -> dict[str, list[str]]:
    if regex is None:
        return {}
    matches = [regex.search(str(p).replace("\\", "/")) for p in paths]
    return {
        name: [(m.group(name) or "") if m else "" for m in matches] for name in regex.groupindex
    }


def _group_labels(images: pd.DataFrame, names: Sequence[str]) -> pd.Series:
    """'plate1 · A01' from the group keys; '' when not grouped, NO_MATCH when unmatched."""
    label = pd.Series("", index=images.index, dtype=object)
    if names and len(images):
        keys = images[list(names)].astype(str)
        label = keys.agg(" · ".join, axis=1).where(keys.ne("").any(axis=1), NO_MATCH)
    return label


def _short_names(paths: pd.Series) -> list[str]:
    """Image paths without the folders all of the day's images share."""
    parts = [str(p).replace("\\", "/").split("/") for p in paths.fillna("")]
    shared = 0
    for names in zip(*(p[:-1] for p in parts), strict=False):
        if len(set(names)) > 1:
            break
        shared += 1
    return ["/".join(p[shared:]) for p in parts]


def _overlay_links(
    values: pd.Series, results_dir: Path, reports_dir: Path
) -> tuple[list[Path | None], list[str]]:
    """Overlay files and links to them, relative to the report.

    The pipeline writes overlays to ``overlays/`` next to the ledger, so they are looked
    for there: a moved, copied or re-mounted results folder keeps its links. No file is
    touched, which keeps 10,000 rows on a network share fast.
    """
    files: list[Path | None] = []
    links: list[str] = []
    base = reports_dir.absolute()
    for value in values:
        if not isinstance(value, str) or not value:
            files.append(None)
            links.append("")
            continue
        path = Path(value)
        if path.parent.name == "overlays":
            path = results_dir.absolute() / "overlays" / path.name
        elif not path.is_absolute():
            path = results_dir.absolute() / path
        files.append(path)
        try:
            links.append(quote(os.path.relpath(path, base).replace(os.sep, "/")))
        except ValueError:  # another drive on Windows
            links.append(path.as_uri())
    return files, links


def _load_cells(path: Path | None, wanted: pd.DataFrame) -> pd.DataFrame | None:
    """Cell areas of the period's images, keyed by job and scene (or image); read in
    chunks, so a cell table of millions of rows costs little memory."""
    if path is None or not path.is_file() or path.stat().st_size == 0:
        return None
    header = pd.read_csv(path, nrows=0).columns
    key = "job_id" if "job_id" in header and "job_id" in wanted else "image"
    if key not in header or "area_px" not in header:
        return None
    keep = set(_cell_keys(wanted, key).dropna())
    columns = [key] + [c for c in ("scene", "label", "area_px", "area_um2") if c in header]
    dtype = {key: str, "scene": str}
    chunks = pd.read_csv(path, usecols=columns, dtype=dtype, chunksize=500_000)
    parts = []
    for chunk in chunks:
        chunk["_key"] = _cell_keys(chunk, key)
        parts.append(chunk[chunk["_key"].isin(keep)])
    cells = pd.concat(parts)
    cells.attrs["key"] = key
    # A job retried after a crash may have appended its cells twice.
    return cells.drop_duplicates(["_key", "label"], keep="last") if "label" in cells else cells


def _cell_keys(table: pd.DataFrame, key: str) -> pd.Series:
    """What ties a cell to its image's ledger row: the job and scene (or the image)."""
    if key != "job_id":
        return table[key]
    scene = table["scene"].map(ledger.scene_key) if "scene" in table else ""
    return table[key].astype("string") + "#" + scene


def _day_cell_areas(
    images: pd.DataFrame, cells: pd.DataFrame | None
) -> tuple[np.ndarray | None, str]:
    """The day's cell areas in µm² when every cell has one, else in pixels."""
    if cells is None:
        return None, "px"
    ok = images[images["status"].eq("ok")]
    day = cells[cells["_key"].isin(set(_cell_keys(ok, cells.attrs["key"]).dropna()))]
    if len(day) and "area_um2" in day and day["area_um2"].notna().all():
        return day["area_um2"].to_numpy(dtype=float), "µm²"
    return day["area_px"].dropna().to_numpy(dtype=float), "px"


def _clock_change(day: date, zone: ZoneInfo) -> str | None:
    """'CEST → CET' when the clocks change on ``day`` in ``zone``."""
    before = datetime.combine(day, time(0), tzinfo=zone)
    after = datetime.combine(day + timedelta(days=1), time(0), tzinfo=zone)
    if before.utcoffset() == after.utcoffset():
        return None
    return f"{before.tzname()} → {after.tzname()}"


def _parse_date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date like 2026-11-27") from exc


def _write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` in one step, so a page open in a browser is never half written; a
    full disk raises :class:`~cellwatch.errors.TransientError` and leaves the old page."""
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))
