"""Daily reports: exact numbers in the CSV and HTML, time zones, QC flags, scale, browser."""

from __future__ import annotations

import argparse
import dataclasses
import html as htmllib
import re
import shutil
import subprocess
import time
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from cellwatch.config import Config, OutputConfig, ReportConfig, local_today, override
from cellwatch.errors import CellwatchError, ConfigError
from cellwatch.quality import focus_score, saturated_fraction
from cellwatch.reporting import html as report_html
from cellwatch.reporting import report as report_module
from cellwatch.reporting.qc import QcThresholds, robust_outliers
from cellwatch.reporting.report import (
    add_report_arguments,
    build_reports,
    check_settings,
    report_cli,
)
from cellwatch.storage import ledger

BERLIN = "Europe/Berlin"
PATTERN = r"(?P<plate>P\d+)/(?P<well>[A-H]\d{2})_(?P<condition>[a-z]+)_"
INBOX = "/data/inbox"
NOW = datetime(2026, 10, 28, 7, 0, tzinfo=UTC)


# --- test data ------------------------------------------------------------------------------


def ledger_row(processed_at: str, image: str, count: int | None, **extra: object) -> dict:
    """A ledger row with plausible defaults; ``count=None`` makes a failed row."""
    failed = count is None
    row: dict[str, object] = {
        "processed_at": processed_at,
        "image": f"{INBOX}/{image}",
        "sha256": "0" * 64,
        "height": 512,
        "width": 512,
        "pixel_size_um": 0.5,
        "cell_count": count,
        "mean_area_px": None if failed else 150.0,
        "mean_area_um2": None if failed else 37.5,
        "confluence": None if failed else 0.25,
        "status": "failed" if failed else "ok",
        "model": "unet-2026-10",
        "settings_hash": "a1b2c3d4e5f6",
        "saturated_fraction": None if failed else 0.0,
        "focus_score": None if failed else 0.05,
        "job_id": f"job-{image}",
    }
    row.update(extra)
    return row


def lab_ledger(results: Path, *, overlays: bool = False) -> Path:
    """Four days in Berlin around the end of summer time (Sunday 2026-10-25, 03:00 → 02:00).

    Local day 25 has 11 images (one job logged twice after a crash; the last row counts):
    well A01 (ctrl) with one high count, one saturated and one blurred image; well B01
    (drug) with a failure, an empty image and two counts far below the day's median; and a
    calibration image outside the naming scheme. Rows near midnight have a UTC date that is
    not their local date. Day 27 has no images.
    """
    rows = [
        ledger_row("2026-10-24T21:30:00+00:00", "P1/A01_ctrl_0.tif", 95),  # 24th 23:30 CEST
        ledger_row("2026-10-24T22:30:00+00:00", "P1/A01_ctrl_1.tif", 100),  # 25th 00:30 CEST
        ledger_row("2026-10-24T23:00:00+00:00", "P1/A01_ctrl_2.tif", 102, saturated_fraction=0.05),
        ledger_row("2026-10-25T00:30:00+00:00", "P1/A01_ctrl_3.tif", 98, focus_score=0.01),
        ledger_row("2026-10-25T01:00:00+00:00", "P1/A01_ctrl_4.tif", 999),  # crashed, redone
        ledger_row(
            "2026-10-25T01:30:00+00:00",
            "P1/B01_drug_1.tif",
            None,
            error="could not read <P1/B01_drug_1.tif> & co: file is truncated",
        ),
        ledger_row("2026-10-25T01:45:00+00:00", "P1/A01_ctrl_4.tif", 101),
        ledger_row("2026-10-25T08:00:00+00:00", "P1/A01_ctrl_5.tif", 99),
        ledger_row("2026-10-25T09:00:00+00:00", "P1/A01_ctrl_6.tif", 160),
        ledger_row("2026-10-25T10:00:00+00:00", "P1/B01_drug_2.tif", 50),
        ledger_row("2026-10-25T11:00:00+00:00", "P1/B01_drug_3.tif", 52),
        ledger_row("2026-10-25T12:00:00+00:00", "P1/B01_drug_4.tif", 0),
        ledger_row(
            "2026-10-25T22:59:00+00:00",
            "calibration.tif",
            97,
            pixel_size_um=None,
            mean_area_um2=None,
        ),  # 25th 23:59 CET
        ledger_row("2026-10-25T23:30:00+00:00", "P1/A01_ctrl_7.tif", 105),  # 26th 00:30 CET
    ]
    for row in rows:
        if overlays and row["status"] == "ok":
            stem = Path(str(row["image"])).stem
            row["overlay"] = str(results / "overlays" / f"{stem}.png")
            _write_overlay(
                results / "overlays" / f"{stem}.png", seed=len(stem) + int(row["cell_count"])
            )
    path = results / "ledger.csv"
    ledger.append_rows(path, rows)
    cells = []
    for row in rows:
        if row["status"] == "ok" and row["cell_count"]:
            um2 = row["pixel_size_um"] is not None
            for label, area in ((1, 100.0), (2, 200.0)):
                cells.append(
                    {
                        "image": row["image"],
                        "job_id": row["job_id"],
                        "label": label,
                        "area_px": area,
                        "area_um2": area / 4 if um2 else None,
                    }
                )
    ledger.append_rows(results / "cells.csv", cells, ledger.CELL_COLUMNS)
    return path


def _write_overlay(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    picture = np.zeros((300, 300, 3), np.uint8)
    picture[..., 1] = ndimage.gaussian_filter(rng.random((300, 300)), 6) * 255 * 3
    for y, x in rng.integers(20, 280, size=(25, 2)):
        picture[y - 8 : y + 8, x - 8 : x + 8, 0] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(path)


def build_lab(tmp_path: Path, **kwargs: object) -> list[Path]:
    results = tmp_path / "results"
    lab_ledger(results, overlays=bool(kwargs.pop("overlays", False)))
    options: dict[str, object] = {
        "start": date(2026, 10, 24),
        "end": date(2026, 10, 27),
        "timezone": BERLIN,
        "group_pattern": PATTERN,
        "cells_path": results / "cells.csv",
        "now": NOW,
    }
    options.update(kwargs)
    return build_reports(results / "ledger.csv", results, **options)  # type: ignore[arg-type]


# --- HTML helpers ---------------------------------------------------------------------------


def by_id(page: str, key: str) -> str:
    match = re.search(rf'id="{key}">([^<]*)<', page)
    if match is None:
        raise AssertionError(f"no element with id {key!r}")
    return htmllib.unescape(match.group(1))


def cells_of(row_html: str) -> list[str]:
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row_html, flags=re.S)
    return [" ".join(htmllib.unescape(re.sub(r"<[^>]+>", " ", c)).split()) for c in cells]


def image_rows(page: str) -> list[tuple[str, list[str]]]:
    body = page.split('<table id="images">', 1)[1].split("</table>", 1)[0]
    rows = re.findall(r'<tr class="(clean|flagged|failed)">(.*?)</tr>', body, flags=re.S)
    return [(cls, cells_of(row)) for cls, row in rows]


# --- the lab ledger: exact numbers ----------------------------------------------------------


def test_one_page_and_one_csv_per_local_day(tmp_path):
    paths = build_lab(tmp_path)
    names = [p.name for p in paths]
    assert names == [f"2026-10-{d}.{ext}" for d in (24, 25, 26, 27) for ext in ("html", "csv")]
    assert all(p.parent == tmp_path / "results" / "reports" for p in paths)
    per_day = {p.stem: pd.read_csv(p) for p in paths if p.suffix == ".csv"}
    assert per_day["2026-10-24"]["image"].tolist() == [f"{INBOX}/P1/A01_ctrl_0.tif"]
    assert per_day["2026-10-24"]["time"].tolist() == ["2026-10-24T23:30:00+02:00"]
    assert per_day["2026-10-26"]["time"].tolist() == ["2026-10-26T00:30:00+01:00"]
    assert len(per_day["2026-10-25"]) == 11
    assert len(per_day["2026-10-27"]) == 0


def test_day_csv_has_local_times_group_keys_and_flags(tmp_path):
    build_lab(tmp_path)
    table = pd.read_csv(tmp_path / "results/reports/2026-10-25.csv", keep_default_na=False)
    assert table.columns[:5].tolist() == ["date", "time", "plate", "well", "condition"]
    assert table.columns[-2:].tolist() == ["qc_flags", "typical_count"]
    assert set(ledger.COLUMNS) <= set(table.columns)
    expected = [  # acquisition order; 02:30 happens twice on this day
        ("00:30:00+02:00", "P1/A01_ctrl_1.tif", "100", "", "100.5"),
        ("01:00:00+02:00", "P1/A01_ctrl_2.tif", "102", "saturated", "100.5"),
        ("02:30:00+02:00", "P1/A01_ctrl_3.tif", "98", "out of focus", "100.5"),
        ("02:30:00+01:00", "P1/B01_drug_1.tif", "", "failed", ""),
        ("02:45:00+01:00", "P1/A01_ctrl_4.tif", "101", "", "100.5"),
        ("09:00:00+01:00", "P1/A01_ctrl_5.tif", "99", "", "100.5"),
        ("10:00:00+01:00", "P1/A01_ctrl_6.tif", "160", "high count", "100.5"),
        ("11:00:00+01:00", "P1/B01_drug_2.tif", "50", "low count", "98.5"),
        ("12:00:00+01:00", "P1/B01_drug_3.tif", "52", "low count", "98.5"),
        ("13:00:00+01:00", "P1/B01_drug_4.tif", "0", "empty", "98.5"),
        ("23:59:00+01:00", "calibration.tif", "97", "", "98.5"),
    ]
    got = [
        (t.removeprefix("2026-10-25T"), i.removeprefix(INBOX + "/"), str(c), f, str(ty))
        for t, i, c, f, ty in zip(
            table["time"],
            table["image"],
            table["cell_count"],
            table["qc_flags"],
            table["typical_count"],
            strict=True,
        )
    ]
    assert got == expected
    assert (table["date"] == "2026-10-25").all()
    assert table.loc[0, ["plate", "well", "condition"]].tolist() == ["P1", "A01", "ctrl"]
    assert table.loc[10, ["plate", "well", "condition"]].tolist() == ["", "", ""]
    assert "file is truncated" in table.loc[3, "error"]


def test_day_page_totals_groups_and_table(tmp_path):
    build_lab(tmp_path)
    page = (tmp_path / "results/reports/2026-10-25.html").read_text(encoding="utf-8")
    assert by_id(page, "n-images") == "11"
    assert by_id(page, "n-failed") == "1"
    assert by_id(page, "n-cells") == "859"
    assert by_id(page, "median-count") == "98.5"
    assert by_id(page, "n-flagged") == "7"
    assert "The clocks changed this day (CEST → CET)" in page
    assert "Sunday 25 October 2026" in page
    groups = dict(re.findall(r'<tr data-group="([^"]*)">(.*?)</tr>', page))
    assert {k: cells_of(v) for k, v in groups.items()} == {
        "(no match)": ["(no match)", "1", "0", "97.0 ± —"],
        "P1 · A01 · ctrl": ["P1", "A01", "ctrl", "6", "0", "110.0 ± 24.5"],
        "P1 · B01 · drug": ["P1", "B01", "drug", "3", "1", "34.0 ± 29.5"],
    }
    rows = image_rows(page)
    assert [cls for cls, _ in rows].count("failed") == 1
    assert [cls for cls, _ in rows].count("flagged") == 6
    first, calibration = rows[0][1], rows[-1][1]
    assert first == [
        "00:30:00 CEST",
        "P1/A01_ctrl_1.tif",
        "P1 · A01 · ctrl",
        "100",
        "37.5 µm²",
        "25.0 %",
        "",
        "ok",
    ]
    assert calibration[:6] == [
        "23:59:00 CET",
        "calibration.tif",
        "(no match)",
        "97",
        "150.0 px",
        "25.0 %",
    ]
    assert rows[3][1][-2].startswith("failed could not read <P1/B01_drug_1.tif> & co")
    models = cells_of(page.split('<table id="models">', 1)[1].split("</table>")[0])
    assert models == ["unet-2026-10", "a1b2c3d4e5f6", "11"]
    assert 'alt="Cell-area histogram of 18 cells (px)"' in page  # calibration has no µm²
    assert page.count("data:image/png;base64,") == 3


def test_other_days_and_the_empty_day(tmp_path):
    build_lab(tmp_path)
    reports = tmp_path / "results/reports"
    day24 = (reports / "2026-10-24.html").read_text(encoding="utf-8")
    assert by_id(day24, "n-images") == "1"
    assert by_id(day24, "median-count") == "95.0"
    assert 'alt="Cell-area histogram of 2 cells (µm²)"' in day24
    assert "clocks changed" not in day24
    empty = (reports / "2026-10-27.html").read_text(encoding="utf-8")
    assert "No images were processed on this day." in empty
    assert "<table" not in empty
    header = (reports / "2026-10-27.csv").read_text(encoding="utf-8").splitlines()
    assert len(header) == 1
    assert header[0].startswith("date,time,plate,well,condition,processed_at,image")


def test_check_list_has_thumbnails_and_links_relative_to_the_report(tmp_path):
    build_lab(tmp_path, overlays=True)
    page = (tmp_path / "results/reports/2026-10-25.html").read_text(encoding="utf-8")
    checks = page.split('id="checks">', 1)[1].split("<h2>Plots", 1)[0]
    assert checks.count('class="check"') == 7
    assert checks.count("data:image/jpeg;base64,") == 6  # the failed image has no overlay
    assert checks.index("B01_drug_1.tif") < checks.index("B01_drug_4.tif")  # failed first
    assert '<a href="../overlays/A01_ctrl_1.png">P1/A01_ctrl_1.tif</a>' in page


def test_moved_results_folder_keeps_its_overlay_links(tmp_path):
    results = tmp_path / "results"
    lab_ledger(results, overlays=True)
    moved = tmp_path / "copy" / "of" / "results"
    shutil.copytree(results, moved)
    build_reports(
        moved / "ledger.csv",
        tmp_path / "elsewhere",
        start=date(2026, 10, 25),
        end=date(2026, 10, 25),
        timezone=BERLIN,
        now=NOW,
    )
    page = (tmp_path / "elsewhere/reports/2026-10-25.html").read_text(encoding="utf-8")
    assert 'href="../../copy/of/results/overlays/A01_ctrl_1.png"' in page
    assert page.count("data:image/jpeg;base64,") == 6


def test_odd_file_names_are_escaped(tmp_path):
    results = tmp_path / "results"
    odd = "run <1> & \"two\" 'x'#%.tif"
    ledger.append_rows(
        results / "ledger.csv",
        [
            ledger_row(
                "2026-11-27T10:00:00+00:00",
                f"P1/A01_<b>_{odd}",
                7,
                overlay=str(results / "overlays" / "run <1> & #%.png"),
                model="<script>alert(1)</script>",
            ),
            ledger_row(
                "2026-11-27T11:00:00+00:00",
                "P1/A01_x_<i>.tif",
                None,
                error="<script>alert(2)</script> & more",
            ),
        ],
    )
    build_reports(
        results / "ledger.csv",
        results,
        start=date(2026, 11, 27),
        end=date(2026, 11, 27),
        group_pattern=PATTERN.replace("[a-z]", "[^_]"),
    )
    page = (results / "reports/2026-11-27.html").read_text(encoding="utf-8")
    assert "<script" not in page
    assert "<b>_" not in page and "<i>.tif" not in page and "<1>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "A01_&lt;b&gt;_run &lt;1&gt; &amp; &quot;two&quot; &#x27;x&#x27;#%.tif" in page
    assert 'href="../overlays/run%20%3C1%3E%20%26%20%23%25.png"' in page
    table = pd.read_csv(results / "reports/2026-11-27.csv")
    assert table["image"].tolist()[0] == f"{INBOX}/P1/A01_<b>_{odd}"
    assert table["condition"].tolist() == ["<b>", "x"]


# --- time zones, ledger quirks, settings ---------------------------------------------------


def test_acquired_at_column_wins_over_processing_time(tmp_path):
    results = tmp_path / "results"
    rows = [
        ledger_row("2026-11-27T08:00:00+00:00", "late.tif", 3, acquired_at="2026-11-27T07:00:00Z"),
        ledger_row(
            "2026-11-27T08:00:01+00:00", "early.tif", 4, acquired_at="2026-11-26T23:30:00+00:00"
        ),
        ledger_row("2026-11-27T08:00:02+00:00", "unknown.tif", 5, acquired_at=""),
    ]
    ledger.append_rows(results / "ledger.csv", rows, (*ledger.COLUMNS, "acquired_at"))
    build_reports(
        results / "ledger.csv",
        results,
        start=date(2026, 11, 26),
        end=date(2026, 11, 27),
        timezone="America/New_York",
        now=NOW,
    )
    day26 = pd.read_csv(results / "reports/2026-11-26.csv")
    day27 = pd.read_csv(results / "reports/2026-11-27.csv")
    assert day26["image"].str.removeprefix(INBOX + "/").tolist() == ["early.tif"]
    assert day26["time"].tolist() == ["2026-11-26T18:30:00-05:00"]
    assert day27["image"].str.removeprefix(INBOX + "/").tolist() == ["late.tif", "unknown.tif"]
    assert day27["time"].tolist() == ["2026-11-27T02:00:00-05:00", "2026-11-27T03:00:02-05:00"]


def test_spring_forward_day_and_local_today():
    assert local_today(BERLIN, datetime(2026, 3, 28, 23, 30, tzinfo=UTC)) == date(2026, 3, 29)
    assert local_today("UTC", datetime(2026, 3, 28, 23, 30, tzinfo=UTC)) == date(2026, 3, 28)
    assert local_today("Pacific/Auckland", datetime(2026, 3, 28, 12, tzinfo=UTC)) == date(
        2026, 3, 29
    )


def test_pages_say_when_the_clocks_change(tmp_path):
    build_reports(
        tmp_path / "ledger.csv",
        tmp_path,
        start=date(2026, 3, 28),
        end=date(2026, 3, 30),
        timezone=BERLIN,
    )
    pages = [
        (tmp_path / f"reports/2026-03-{d}.html").read_text(encoding="utf-8") for d in (28, 29, 30)
    ]
    assert ["clocks changed" in page for page in pages] == [False, True, False]
    assert "(CET → CEST)" in pages[1]


def test_bad_settings_say_what_to_fix(tmp_path):
    ledger_path = tmp_path / "ledger.csv"
    day = {"start": date(2026, 1, 1), "end": date(2026, 1, 1)}
    with pytest.raises(ConfigError, match="unknown time zone 'Europe/Berlim'"):
        build_reports(ledger_path, tmp_path, timezone="Europe/Berlim", **day)
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        build_reports(ledger_path, tmp_path, group_pattern="(?P<well>[A-H", **day)
    with pytest.raises(ConfigError, match="needs named groups"):
        build_reports(ledger_path, tmp_path, group_pattern=r"([A-H]\d\d)", **day)
    with pytest.raises(ConfigError, match="'status' is already a report column"):
        build_reports(ledger_path, tmp_path, group_pattern=r"(?P<status>\w+)", **day)
    with pytest.raises(ConfigError, match=r"ends \(2026-01-01\) before it starts \(2026-01-02\)"):
        build_reports(ledger_path, tmp_path, start=date(2026, 1, 2), end=date(2026, 1, 1))
    with pytest.raises(ConfigError, match=r"report\.outlier_k must be positive"):
        check_settings(ReportConfig(outlier_k=0))
    check_settings(ReportConfig(timezone=BERLIN, group_pattern=PATTERN))
    with pytest.raises(ConfigError, match="saturated_max_fraction must be between 0 and 1"):
        QcThresholds(saturated_max_fraction=2)
    with pytest.raises(ConfigError, match="focus_min_ratio must be between 0 and 1"):
        QcThresholds(focus_min_ratio=-1)
    with pytest.raises(ConfigError, match="min_reference_n must be at least 2"):
        QcThresholds(min_reference_n=1)


def test_missing_ledger_gives_empty_pages(tmp_path):
    paths = build_reports(
        tmp_path / "nope.csv", tmp_path, start=date(2026, 1, 1), end=date(2026, 1, 2)
    )
    assert len(paths) == 4
    assert "No images were processed" in paths[0].read_text(encoding="utf-8")


def test_minimal_and_foreign_ledgers(tmp_path):
    minimal = tmp_path / "minimal.csv"
    minimal.write_text(
        "processed_at,image,status,cell_count\n2026-11-27T10:00:00+00:00,a.tif,ok,12\n",
        encoding="utf-8",
    )
    build_reports(minimal, tmp_path, start=date(2026, 11, 27), end=date(2026, 11, 27))
    page = (tmp_path / "reports/2026-11-27.html").read_text(encoding="utf-8")
    assert by_id(page, "n-cells") == "12"
    assert "checked only when the ledger records them" in page
    foreign = tmp_path / "foreign.csv"
    foreign.write_text("when,file,count\n", encoding="utf-8")
    with pytest.raises(CellwatchError, match="no processed_at, image, status, cell_count column"):
        build_reports(foreign, tmp_path, start=date(2026, 11, 27), end=date(2026, 11, 27))


def test_all_failed_day(tmp_path):
    results = tmp_path / "results"
    ledger.append_rows(
        results / "ledger.csv",
        [
            ledger_row(f"2026-11-27T1{i}:00:00+00:00", f"f{i}.tif", None, error="no pixels")
            for i in range(3)
        ],
    )
    build_reports(
        results / "ledger.csv",
        results,
        start=date(2026, 11, 27),
        end=date(2026, 11, 27),
        cells_path=results / "cells.csv",
    )
    page = (results / "reports/2026-11-27.html").read_text(encoding="utf-8")
    assert (by_id(page, "n-images"), by_id(page, "n-failed")) == ("3", "3")
    assert (by_id(page, "n-cells"), by_id(page, "median-count")) == ("0", "—")
    assert "No cell areas to plot" in page


# --- command line ---------------------------------------------------------------------------


def _cli(tmp_path: Path, *argv: str) -> int:
    """``cellwatch report`` with a config whose output.dir is ``results``; ``--out`` is laid
    over it as the face does (:func:`cellwatch.config.config_from_args`)."""
    parser = argparse.ArgumentParser(prog="cellwatch report")
    add_report_arguments(parser)
    args = parser.parse_args(argv)
    config = dataclasses.replace(
        Config(),
        output=OutputConfig(dir=str(tmp_path / "results")),
        report=ReportConfig(timezone=BERLIN, group_pattern=PATTERN),
    )
    config = override(config, **{"output.dir": str(args.out) if args.out else None})
    return report_cli(args, config)


def test_cli_date_and_period(tmp_path, capsys):
    lab_ledger(tmp_path / "results")
    assert _cli(tmp_path, "--date", "2026-10-25") == 0
    out = capsys.readouterr().out.split()
    assert out == [str(tmp_path / "results/reports/2026-10-25.html")]
    # --out names the results folder: its ledger is read, its reports/ written.
    shutil.move(tmp_path / "results", tmp_path / "share")
    shutil.rmtree(tmp_path / "share/reports")
    assert (
        _cli(
            tmp_path, "--from", "2026-10-24", "--to", "2026-10-26", "--out", str(tmp_path / "share")
        )
        == 0
    )
    out = capsys.readouterr().out.split()
    assert [Path(p).name for p in out] == ["2026-10-24.html", "2026-10-25.html", "2026-10-26.html"]
    page = (tmp_path / "share/reports/2026-10-25.html").read_text(encoding="utf-8")
    assert by_id(page, "n-cells") == "859"


def test_cli_defaults_to_today_and_rejects_bad_dates(tmp_path, capsys):
    assert _cli(tmp_path) == 0
    captured = capsys.readouterr()
    assert Path(captured.out.strip()).name == f"{local_today(BERLIN).isoformat()}.html"
    assert "no ledger at" in captured.err
    with pytest.raises(ConfigError, match="--to needs --from"):
        _cli(tmp_path, "--to", "2026-10-25")
    with pytest.raises(SystemExit):
        _cli(tmp_path, "--date", "25.10.2026")
    assert "is not a date like 2026-11-27" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli(tmp_path, "--date", "2026-10-25", "--from", "2026-10-24")


# --- QC measures ----------------------------------------------------------------------------


def test_saturated_fraction():
    assert saturated_fraction(np.array([[0, 255], [255, 10]], np.uint8)) == 0.5
    assert saturated_fraction(np.array([1, 65535, 65535, 65535], np.uint16)) == 0.75
    assert saturated_fraction(np.array([1, 4095, 4095, 7], np.uint16), max_value=4095) == 0.5
    assert saturated_fraction(np.array([0.1, 0.7, 0.7, 0.2], np.float32)) == 0.5
    assert saturated_fraction(np.zeros((0, 3), np.uint8)) == 0.0
    with pytest.raises(ValueError, match="boolean mask"):
        saturated_fraction(np.ones((2, 2), bool))
    with pytest.raises(ValueError, match="numeric pixels"):
        saturated_fraction(np.array(["a"]))


def test_focus_score_drops_when_blurred():
    rng = np.random.default_rng(1)
    sharp = np.zeros((128, 128), np.float32)
    for y, x in rng.integers(8, 120, size=(40, 2)):
        sharp[y - 3 : y + 3, x - 3 : x + 3] = 1.0
    blurred = ndimage.gaussian_filter(sharp, 4)
    assert focus_score(blurred) < 0.1 * focus_score(sharp)
    assert focus_score(sharp * 4000 + 100) == pytest.approx(focus_score(sharp), rel=1e-4)
    assert focus_score(np.full((16, 16), 7, np.uint16)) == 0.0
    with pytest.raises(ValueError, match="one 2-D plane"):
        focus_score(np.zeros((2, 16, 16)))


def reference_focus_score(image: np.ndarray) -> float:
    """The focus score on a whole-image float64 Laplacian, as first written."""
    data = np.nan_to_num(image.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    step_y, step_x = (max(1, n // 512) for n in data.shape)
    low, high = np.percentile(data[::step_y, ::step_x], (1.0, 99.0))
    if high <= low:
        return 0.0
    return float(np.var(ndimage.laplace(data, mode="reflect"))) / (high - low) ** 2


@pytest.mark.parametrize("band_pixels", [1, 100, 1 << 16])
@pytest.mark.parametrize(
    "shape", [(1, 1), (1, 40), (40, 1), (2, 2), (97, 130), (1100, 30)], ids=str
)
def test_focus_score_in_bands_equals_the_whole_image(monkeypatch, band_pixels, shape):
    from cellwatch import quality
    from cellwatch.preprocess import normalize

    monkeypatch.setattr(quality, "_BAND_PIXELS", band_pixels)
    rng = np.random.default_rng(shape[0])
    raw = ndimage.gaussian_filter(rng.random(shape) * 60000, 1).astype(np.uint16)
    expected = reference_focus_score(raw)
    assert focus_score(raw) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # raw or normalized, the score is the same (the normalized image is rounded to float32)
    assert focus_score(normalize(raw)) == pytest.approx(expected, rel=1e-6, abs=1e-12)
    floats = raw.astype(np.float64)
    floats[0, 0] = np.nan  # counts as 0, as in normalization
    assert focus_score(floats) == pytest.approx(reference_focus_score(floats), rel=1e-6)


def test_robust_outliers_use_at_least_poisson_noise():
    counts = pd.Series([100, 100, 100, 100, 100, 120, 136, 64])
    signed, median, spread = robust_outliers(counts, counts, k=3.5)
    assert (median, spread) == (100.0, 10.0)
    assert signed.tolist() == [0, 0, 0, 0, 0, 0, 1, -1]


# --- scale and the browser ------------------------------------------------------------------


def test_ten_thousand_images_in_a_day(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    n = 10_000
    rng = np.random.default_rng(7)
    start = pd.Timestamp("2026-11-27T00:00:00", tz=BERLIN)
    times = start + pd.to_timedelta(np.sort(rng.uniform(0, 86_399, n)), unit="s")
    wells = [f"{r}{c:02d}" for r in "ABCDEFGH" for c in range(1, 13)]
    counts = rng.poisson(200, n)
    failed = np.arange(n) % 97 == 0
    frame = pd.DataFrame(
        [
            ledger_row(
                t.tz_convert("UTC").isoformat(),
                f"P{i % 4}/{wells[i % 96]}_ctrl_{i}.tif",
                None if failed[i] else int(counts[i]),
                error="broken <file>" if failed[i] else None,
                overlay=str(results / "overlays" / f"img{i}.png"),
            )
            for i, t in enumerate(times)
        ]
    )
    frame.reindex(columns=list(ledger.COLUMNS)).to_csv(results / "ledger.csv", index=False)
    cells = pd.DataFrame(
        {
            "job_id": np.repeat(frame["job_id"].to_numpy(), 50),
            "label": np.tile(np.arange(1, 51), n),
            "area_px": rng.gamma(9, 20, n * 50),
        }
    )
    cells.to_csv(results / "cells.csv", index=False)
    began = time.perf_counter()
    build_reports(
        results / "ledger.csv",
        results,
        start=date(2026, 11, 27),
        end=date(2026, 11, 27),
        timezone=BERLIN,
        group_pattern=PATTERN,
        cells_path=results / "cells.csv",
    )
    seconds = time.perf_counter() - began
    print(f"report for {n:,} images and {len(cells):,} cells built in {seconds:.1f} s")
    assert seconds < 60
    page = (results / "reports/2026-11-27.html").read_text(encoding="utf-8")
    assert by_id(page, "n-images") == "10,000"
    assert by_id(page, "n-failed") == str(failed.sum())
    assert len(image_rows(page)) == n
    assert "<details><summary>All 10,000 images" in page  # collapsed, not open
    assert "…and " in page  # the check list stays short
    assert len(pd.read_csv(results / "reports/2026-11-27.csv")) == n


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_page_renders_in_headless_chromium(tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (CI installs it with apt-get install chromium)")
    build_lab(tmp_path, overlays=True)
    page = tmp_path / "results/reports/2026-10-25.html"
    shot = tmp_path / "shot.png"
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1280,2000",
        page.as_uri(),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape == (2000, 1280, 3)
    assert pixels.std() > 20, "the screenshot is blank"
    # The plots are drawn: their marker colours are on screen.
    for colour in ((31, 119, 180), (255, 127, 14), (44, 160, 44)):  # ok, flagged, histogram
        close = np.abs(pixels - np.array(colour)).sum(axis=2) < 30
        assert close.sum() > 50, f"no pixels of colour {colour}: a plot did not render"


def long_names_lab(tmp_path: Path) -> Path:
    """A day whose two flagged images have 60-character names (after the shared folders)."""
    results = tmp_path / "results"
    names = [f"plate_{k}/2026-10-25_DAPI_high_content_screen_field_{k:04d}_z00.tif" for k in (1, 2)]
    rows = [
        ledger_row(f"2026-10-25T1{k}:00:00+00:00", name, None, error="file is truncated")
        for k, name in enumerate(names)
    ]
    ledger.append_rows(results / "ledger.csv", rows)
    build_reports(
        results / "ledger.csv", results, start=date(2026, 10, 25), end=date(2026, 10, 25), now=NOW
    )
    return results / "reports/2026-10-25.html"


def test_long_image_names_are_elided_on_check_cards_with_the_full_path_on_hover(tmp_path):
    page = long_names_lab(tmp_path).read_text(encoding="utf-8")
    checks = page.split('id="checks">', 1)[1].split("</div></div>", 1)[0]
    names = re.findall(r'<b title="([^"]*)">([^<]*)</b>', page.split('id="checks">', 1)[1])
    assert len(names) == 2, checks
    for k, (title, shown) in enumerate(names, start=1):
        full = f"{INBOX}/plate_{k}/2026-10-25_DAPI_high_content_screen_field_{k:04d}_z00.tif"
        assert htmllib.unescape(title) == full
        shown = htmllib.unescape(shown)
        assert len(shown) <= 26 and "…" in shown, shown
        assert shown.startswith(f"plate_{k}/") and shown.endswith(f"{k:04d}_z00.tif"), shown


def test_check_cards_hold_their_names_in_headless_chromium(tmp_path):
    """Measured by the browser: no name on a "check these" card runs past the card."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (CI installs it with apt-get install chromium)")
    page = long_names_lab(tmp_path)
    probe = (
        "<script>const bad=[...document.querySelectorAll('.check')].filter(c=>"
        "[...c.querySelectorAll('*')].some(e=>e.getBoundingClientRect().right>"
        "c.getBoundingClientRect().right+0.5));"
        "document.body.setAttribute('data-overflowing',String(bad.length));</script></body>"
    )
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text(encoding="utf-8").replace("</body>", probe))
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,1000",
        "--dump-dom",
        probed.as_uri(),
    ]
    run = subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)
    found = re.search(r'data-overflowing="(\d+)"', run.stdout)
    assert found is not None, run.stdout[-2000:]
    assert found.group(1) == "0", "a card's name runs over the next card"


# --- model switches -------------------------------------------------------------------------


def test_report_marks_each_model_switch_where_the_service_made_it(tmp_path, monkeypatch):
    """A switch is the first row *processed* with a new model or settings hash (the ledger
    is not in time order here), also across midnight; rows without a model start none."""
    results = tmp_path / "results"
    a, b, c = "unet@aaaaaaaaaaaa", "mine@bbbbbbbbbbbb", "mine2@cccccccccccc"
    rows = [
        ledger_row("2026-12-05T20:00:00+00:00", "d5.tif", 10, model=a),
        ledger_row("2026-12-06T13:02:00+00:00", "b1.tif", 20, model=b),  # 14:02 CET
        ledger_row("2026-12-06T08:00:00+00:00", "a1.tif", 11, model=a),  # written late
        ledger_row("2026-12-06T13:02:00+00:00", "b2.tif", 21, model=b),
        ledger_row("2026-12-06T14:00:00+00:00", "old.tif", 5, model="", settings_hash=""),
        ledger_row("2026-12-06T15:00:00+00:00", "b3.tif", None, model=b, settings_hash="ffff"),
        ledger_row("2026-12-07T00:30:00+00:00", "c1.tif", 30, model=c, settings_hash="ffff"),
    ]
    ledger.append_rows(results / "ledger.csv", rows)
    seen = {}
    real = report_module.render_day

    def render(day_report):
        seen[day_report.day] = day_report
        return real(day_report)

    monkeypatch.setattr(report_module, "render_day", render)
    build_reports(
        results / "ledger.csv",
        results,
        start=date(2026, 12, 5),
        end=date(2026, 12, 7),
        timezone=BERLIN,
        now=NOW,
    )
    pages = {d: (results / f"reports/2026-12-0{d}.html").read_text("utf-8") for d in (5, 6, 7)}
    assert 'id="switches"' not in pages[5]

    def switches(page: str) -> list[str]:
        body = page.split('id="switches">', 1)[1].split("</ul>", 1)[0]
        return [htmllib.unescape(item) for item in re.findall(r"<li>(.*?)</li>", body)]

    assert switches(pages[6]) == [
        f"Model switched from {a} to {b} at 14:02.",
        "Settings changed (hash a1b2c3d4e5f6 → ffff) at 16:00; same model.",
    ]
    assert switches(pages[7]) == [f"Model switched from {b} to {c} at 01:30."]
    # the day CSV keeps the ledger's columns only
    assert "switched" not in pd.read_csv(results / "reports/2026-12-06.csv").columns
    # the count plot draws a dotted line at each switch, labelled with the new model
    figure, _ = report_html._counts_plot(seen[date(2026, 12, 6)])
    ax = figure.axes[0]
    vertical = [line for line in ax.lines if line.get_linestyle() == ":"]
    assert [pd.Timestamp(line.get_xdata()[0]) for line in vertical] == [
        pd.Timestamp("2026-12-06 14:02"),
        pd.Timestamp("2026-12-06 16:00"),
    ]
    assert [t.get_text() for t in ax.texts] == [f"→ {b}", "→ new settings"]
