"""The daily report page: one self-contained HTML file, plots embedded as PNG.

No scripts and no external files, so the page opens from a file share. The image table
can hold 10,000 rows: it sits in a scrolling box (collapsed for long days), and a
CSS-only checkbox hides the rows without QC flags.
"""

from __future__ import annotations

__all__ = ["render_day"]

import base64
import io
import warnings
from html import escape
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
from matplotlib.dates import DateFormatter
from matplotlib.figure import Figure
from PIL import Image

from cellwatch.reporting.day import DayReport
from cellwatch.reporting.qc import FAILED, FLAG_ORDER, UNFAMILIAR, UNFAMILIAR_MESSAGE
from cellwatch.reporting.switches import SWITCHED, Switch

CHECK_MAX = 12  # thumbnails in the "check these" list
CHECK_NAME_MAX = 26  # characters of an image name that fit on one "check these" card
OPEN_TABLE_MAX = 300  # longer image tables start collapsed
PLOT_GROUPS_MAX = 40

_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;
 margin:0 auto;max-width:1200px;padding:16px 24px}
h1{font-size:26px;margin:4px 0}h2{font-size:19px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.sub{color:#555;margin:0 0 12px}.note{color:#555}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:120px}
.card b{display:block;font-size:24px}.card.bad b{color:#b00020}
table{border-collapse:collapse;font-size:14px}
th,td{padding:3px 8px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
th{background:#f4f4f4;position:sticky;top:0}td.n,th.n{text-align:right}
.scroll{max-height:70vh;overflow:auto;border:1px solid #ddd;width:fit-content;max-width:100%}
.flag{display:inline-block;background:#fde2b8;border-radius:3px;padding:0 5px;margin:1px;
 font-size:12px}.flag.failed{background:#f8c4c4}
.err{color:#b00020;font-size:12px}.switches{color:#6a3d9a;font-weight:600}tr.failed td{background:#fff4f4}
#only:checked~.scroll tr.clean{display:none}
.checks{display:flex;flex-wrap:wrap;gap:12px}
.check{border:1px solid #ddd;border-radius:6px;padding:6px;width:210px;font-size:13px}
.check b{display:block;overflow:hidden;white-space:nowrap;text-overflow:ellipsis}
.check img{display:block;max-width:200px;max-height:200px;margin-bottom:4px}
.plots img{max-width:100%;display:block;margin:6px 0}
summary{cursor:pointer;font-weight:600;margin:6px 0}
"""


def render_day(report: DayReport) -> str:
    """The whole page for one day, as HTML text."""
    images = report.images
    title = f"Cell counts · {report.day:%A %d %B %Y}"
    when = report.generated_at.astimezone(ZoneInfo(report.timezone))
    sub = f"Times in {escape(report.timezone)}."
    if report.clock_change:
        sub += f" The clocks changed this day ({escape(report.clock_change)})."
    sub += f" Made {when:%Y-%m-%d %H:%M} from {escape(str(report.ledger_path))}."
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f'<p class="sub">{sub}</p>',
    ]
    if images.empty:
        parts.append('<p id="no-images"><b>No images were processed on this day.</b></p>')
    else:
        parts += [
            _switches(report),
            _totals(images),
            _checks(report),
            _plots(report),
            _groups(report),
            _image_table(report),
            _models(images),
            _legend(report),
        ]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _day_switches(report: DayReport) -> list[tuple[pd.Timestamp, Switch]]:
    """The day's model and settings switches: the local time each was first used, in order."""
    images = report.images
    if SWITCHED not in images:
        return []
    marked = images[images[SWITCHED].notna()]
    processed = pd.to_datetime(marked["processed_at"], utc=True, errors="coerce", format="ISO8601")
    local = processed.dt.tz_convert(report.timezone).fillna(marked["local_time"])
    return sorted(zip(local, marked[SWITCHED], strict=True), key=lambda pair: pair[0])


def _switches(report: DayReport) -> str:
    """One line per switch of the day, above the totals, so a change in the counts that
    comes from a new model is not read as a change in the cells."""
    lines = [
        f"<li>{escape(switch.sentence(at.strftime('%H:%M')))}</li>"
        for at, switch in _day_switches(report)
    ]
    if not lines:
        return ""
    return (
        '<ul class="switches" id="switches">'
        + "".join(lines)
        + '</ul><p class="note">Counts before and after a switch come from different models '
        "or settings: compare them with care (the dotted lines in the count plot).</p>"
    )


def _totals(images: pd.DataFrame) -> str:
    ok = images["status"].eq("ok")
    counts = pd.to_numeric(images["cell_count"], errors="coerce")[ok]
    median = _num(counts.median(), 1) if ok.any() else "—"
    flagged = int(images["flags"].map(bool).sum())
    cards = [
        ("n-images", f"{len(images):,}", "images processed", ""),
        ("n-failed", f"{int((~ok).sum()):,}", "failed", " bad" if (~ok).any() else ""),
        ("n-cells", f"{int(counts.sum()):,}", "cells counted", ""),
        ("median-count", median, "median cells per image", ""),
        ("n-flagged", f"{flagged:,}", "images to check", " bad" if flagged else ""),
    ]
    html = "".join(
        f'<div class="card{cls}"><b id="{key}">{value}</b>{label}</div>'
        for key, value, label, cls in cards
    )
    return f'<div class="cards">{html}</div>'


def _checks(report: DayReport) -> str:
    images = report.images
    flagged = images[images["flags"].map(bool)]
    if flagged.empty:
        return "<h2>Check these</h2><p>Nothing flagged: no image needs a second look.</p>"
    # One of each kind of problem first, then a second of each, and so on.
    rank = flagged["flags"].map(lambda f: FLAG_ORDER.index(f[0]))
    turn = flagged.groupby(rank).cumcount()
    chosen = flagged.assign(_turn=turn, _rank=rank).sort_values(["_turn", "_rank"], kind="stable")
    cards = [_check_card(row, report) for _, row in chosen.head(CHECK_MAX).iterrows()]
    more = len(flagged) - CHECK_MAX
    tail = (
        f'<p class="note">…and {more:,} more: tick “only flagged” above the image table.</p>'
        if more > 0
        else ""
    )
    return (
        f"<h2>Check these ({len(flagged):,})</h2>"
        f'<div class="checks" id="checks">{"".join(cards)}</div>{tail}'
    )


def _check_card(row: pd.Series, report: DayReport) -> str:
    thumb = _thumbnail(row["overlay_file"])
    picture = f'<img alt="overlay" src="{thumb}">' if thumb else '<p class="note">no overlay</p>'
    if row["overlay_href"] and thumb:
        picture = f'<a href="{escape(row["overlay_href"])}">{picture}</a>'
    detail = _flags_html(row)
    count = "" if FAILED in row["flags"] else f" · {_num(row['cell_count'], 0)} cells"
    return (
        f'<div class="check">{picture}{_card_name(row)}<br>'
        f"{row['local_time'].strftime(_clock(report))}{count}<br>{detail}</div>"
    )


def _card_name(row: pd.Series) -> str:
    """The image's name, elided in the middle to fit its card; the full path on hover."""
    scene = f" · scene {row['scene']}" if row.get("scene") else ""
    full = escape(f"{row['image']}{scene}", quote=True)
    return f'<b title="{full}">{escape(elide_middle(str(row["display"]), CHECK_NAME_MAX))}</b>'


def elide_middle(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters by replacing its middle with an ellipsis, so
    both the folder it starts with and the file name it ends with stay readable.

    >>> elide_middle("plate1/well_A01/2026-11-27_DAPI_field_0042.tif", 26)
    'plate1/well_…ield_0042.tif'
    >>> elide_middle("A01.tif", 26)
    'A01.tif'
    """
    if len(text) <= width:
        return text
    keep = width - 1
    tail = (keep + 1) // 2
    return text[: keep - tail] + "…" + text[len(text) - tail :]


def _thumbnail(path: Path | None) -> str | None:
    """A small JPEG of the overlay as a data URL, or None when there is none to read."""
    if path is None or not path.is_file():
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as picture:
                picture.draft("RGB", (400, 400))
                picture.thumbnail((200, 200))
                small = picture.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _plots(report: DayReport) -> str:
    figures = [_counts_plot(report), _area_plot(report), _group_plot(report)]
    html = "".join(
        f'<img alt="{escape(alt)}" src="{_png(fig)}">' if fig is not None else f"<p>{alt}</p>"
        for fig, alt in figures
    )
    return f'<h2>Plots</h2><div class="plots" id="plots">{html}</div>'


def _counts_plot(report: DayReport) -> tuple[Figure | None, str]:
    images = report.images
    times = images["local_time"].dt.tz_localize(None)
    counts = pd.to_numeric(images["cell_count"], errors="coerce")
    ok = images["status"].eq("ok")
    flagged = images["flags"].map(bool) & ok
    fig = Figure(figsize=(11, 3.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.scatter(times[ok & ~flagged], counts[ok & ~flagged], s=12, color="#1f77b4", label="ok")
    ax.scatter(times[flagged], counts[flagged], s=22, color="#ff7f0e", label="flagged")
    if (~ok).any():
        ax.scatter(
            times[~ok], np.zeros(int((~ok).sum())), marker="x", color="#b00020", label="failed"
        )
    if ok.any():
        ax.axhline(
            float(counts[ok].median()), color="#888", linestyle="--", linewidth=1, label="median"
        )
    for at, switch in _day_switches(report):
        moment = at.tz_localize(None)
        ax.axvline(moment, color="#6a3d9a", linestyle=":", linewidth=1.5)
        ax.annotate(
            switch.short,
            (moment, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -3),
            textcoords="offset points",
            va="top",
            fontsize=8,
            color="#6a3d9a",
        )
    start = pd.Timestamp(report.day)
    ax.set_xlim(start, start + pd.Timedelta(days=1))
    ax.xaxis.set_major_formatter(DateFormatter("%H:%M"))
    ax.set(
        xlabel=f"time ({report.timezone})",
        ylabel="cells per image",
        title="Count per image over the day",
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return fig, "Count per image over the day"


def _area_plot(report: DayReport) -> tuple[Figure | None, str]:
    areas = report.cell_areas
    if areas is None or len(areas) == 0:
        return None, "No cell areas to plot (per-cell table missing or no cells)."
    top = float(np.percentile(areas, 99.5))
    fig = Figure(figsize=(11, 3.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.hist(areas, bins=60, range=(0, top if top > 0 else 1), color="#2ca02c")
    ax.set(
        xlabel=f"cell area ({report.area_unit})",
        ylabel="cells",
        title=f"Cell areas ({len(areas):,} cells; largest 0.5 % not shown)",
    )
    return fig, f"Cell-area histogram of {len(areas):,} cells ({report.area_unit})"


def _group_plot(report: DayReport) -> tuple[Figure | None, str]:
    if not report.group_names:
        return None, "No groups: set report.group_pattern to compare wells or conditions."
    images = report.images[report.images["status"].eq("ok")]
    counts = pd.to_numeric(images["cell_count"], errors="coerce")
    groups = sorted(counts.groupby(images["group"]), key=lambda g: str(g[0]))
    shown = groups[:PLOT_GROUPS_MAX]
    if not shown:
        return None, "No counted images to compare between groups."
    fig = Figure(figsize=(11, 3.8), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for i, (_, values) in enumerate(shown):
        jitter = (np.arange(len(values)) % 7 - 3) * 0.04
        ax.scatter(i + jitter, values, s=10, color="#1f77b4", alpha=0.6)
        ax.errorbar(
            i + 0.3,
            values.mean(),
            yerr=values.std() if len(values) > 1 else 0,
            fmt="o",
            color="black",
            capsize=3,
            markersize=4,
        )
    ax.set_xticks(
        range(len(shown)),
        [str(g) for g, _ in shown],
        rotation=90 if len(shown) > 12 else 45,
        ha="right",
        fontsize=8,
    )
    more = f" (first {PLOT_GROUPS_MAX} of {len(groups)})" if len(groups) > len(shown) else ""
    ax.set(ylabel="cells per image", title=f"Counts per group, mean ± sd{more}")
    return fig, "Counts per group"


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _groups(report: DayReport) -> str:
    if not report.group_names:
        return ""
    images = report.images
    ok = images["status"].eq("ok")
    counts = pd.to_numeric(images["cell_count"], errors="coerce").where(ok)
    head = "".join(f"<th>{escape(n)}</th>" for n in report.group_names)
    rows = []
    for label, members in images.groupby("group", sort=True):
        first = members.iloc[0]
        keys = "".join(f"<td>{escape(str(first[n]))}</td>" for n in report.group_names)
        if not any(first[n] for n in report.group_names):
            keys = f'<td colspan="{len(report.group_names)}">{escape(str(label))}</td>'
        values = counts[members.index].dropna()
        sd = _num(values.std(), 1) if len(values) > 1 else "—"
        mean = f"{_num(values.mean(), 1)} ± {sd}" if len(values) else "—"
        failed = int((~ok[members.index]).sum())
        rows.append(
            f'<tr data-group="{escape(str(label))}">{keys}<td class="n">{len(values)}</td>'
            f'<td class="n">{failed}</td><td class="n">{mean}</td></tr>'
        )
    return (
        '<h2>Groups</h2><div class="scroll"><table id="groups"><thead><tr>'
        f'{head}<th class="n">counted</th><th class="n">failed</th>'
        f'<th class="n">cells, mean ± sd</th></tr></thead><tbody>{"".join(rows)}</tbody></table></div>'
    )


def _image_table(report: DayReport) -> str:
    images = report.images
    grouped = bool(report.group_names)
    stamp = _clock(report)
    rows = []
    for row in images.itertuples(index=False):
        cls = "failed" if row.status != "ok" else ("flagged" if row.flags else "clean")
        name = escape(str(row.display))
        if row.overlay_href:
            name = f'<a href="{escape(row.overlay_href)}">{name}</a>'
        rows.append(
            f'<tr class="{cls}"><td>{row.local_time.strftime(stamp)}</td><td>{name}</td>'
            + (f"<td>{escape(str(row.group))}</td>" if grouped else "")
            + f'<td class="n">{_num(row.cell_count, 0)}</td>'
            f'<td class="n">{_area(row)}</td><td class="n">{_percent(row.confluence)}</td>'
            f"<td>{_flags_html(row._asdict())}</td><td>{escape(str(row.status))}</td></tr>"
        )
    head = ["time", "image"] + (["group"] if grouped else []) + ["cells"]
    head += ["mean area", "confluence", "QC flags", "status"]
    header = "".join(f"<th>{h}</th>" for h in head)
    is_open = " open" if len(images) <= OPEN_TABLE_MAX else ""
    return (
        f"<h2>Images</h2><details{is_open}><summary>All {len(images):,} images in acquisition"
        ' order (click a name for its overlay)</summary><input type="checkbox" id="only">'
        ' <label for="only">only flagged</label><div class="scroll"><table id="images">'
        f"<thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table></div></details>"
    )


def _flags_html(row: pd.Series | dict) -> str:
    html = "".join(
        f'<span class="flag {"failed" if f == FAILED else ""}">{escape(f)}</span>'
        for f in row["flags"]
    )
    error = row.get("error")
    if FAILED in row["flags"] and isinstance(error, str) and error:
        short = error if len(error) <= 160 else error[:157] + "…"
        html += f'<div class="err" title="{escape(error)}">{escape(short)}</div>'
    if UNFAMILIAR in row["flags"]:
        value = pd.to_numeric(row.get("familiarity"), errors="coerce")
        shown = "—" if pd.isna(value) else f"{float(value):.3g}"
        html += f'<div class="err">{escape(UNFAMILIAR_MESSAGE)} (familiarity {shown})</div>'
    return html


def _models(images: pd.DataFrame) -> str:
    used = (
        images.fillna({"model": "—", "settings_hash": "—"})
        .groupby(["model", "settings_hash"], sort=True)
        .size()
    )
    rows = "".join(
        f'<tr><td>{escape(str(m))}</td><td><code>{escape(str(h))}</code></td><td class="n">{n}'
        "</td></tr>"
        for (m, h), n in used.items()
    )
    return (
        '<h2>Models and settings</h2><table id="models"><thead><tr><th>model</th>'
        f'<th>settings hash</th><th class="n">images</th></tr></thead><tbody>{rows}</tbody></table>'
    )


def _legend(report: DayReport) -> str:
    t = report.thresholds
    items = [
        f"<b>unfamiliar</b>: {escape(UNFAMILIAR_MESSAGE)}. The image looks unlike the "
        f"images the model was trained on (familiarity below {t.familiarity_min:g}; "
        "docs/familiarity.md): inverted contrast, heavy blur, cells of a size it cannot "
        "reach, or a network unsure of what it found",
        "<b>empty</b>: no cells found",
        f"<b>saturated</b>: more than {t.saturated_max_fraction:.1%} of pixels at the "
        "camera's maximum",
        f"<b>out of focus</b>: sharpness below {t.focus_min_ratio:.0%} of the day's median",
        f"<b>high / low count</b>: more than {t.outlier_k:g} robust SD from the median of its "
        f"group (or of the day when the group has fewer than {t.min_reference_n} images)",
    ]
    measured = [c for c in ("saturated_fraction", "focus_score") if c in report.images]
    if not all(report.images[c].notna().any() for c in measured) or len(measured) < 2:
        items.append("saturation and focus are checked only when the ledger records them")
    return '<h2>QC flags</h2><ul class="note">' + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def _clock(report: DayReport) -> str:
    """Time of day, with the zone's abbreviation on days when 02:30 can happen twice."""
    return "%H:%M:%S %Z" if report.clock_change else "%H:%M:%S"


def _area(row: object) -> str:
    um2 = getattr(row, "mean_area_um2", None)
    if um2 is not None and pd.notna(um2) and str(um2) != "":
        return f"{float(um2):,.1f} µm²"
    px = getattr(row, "mean_area_px", None)
    return f"{float(px):,.1f} px" if px is not None and pd.notna(px) else "—"


def _percent(value: object) -> str:
    number = pd.to_numeric(value, errors="coerce")
    return "—" if pd.isna(number) else f"{100 * float(number):.1f} %"


def _num(value: object, digits: int) -> str:
    number = pd.to_numeric(value, errors="coerce")
    return "—" if pd.isna(number) else f"{float(number):,.{digits}f}"
