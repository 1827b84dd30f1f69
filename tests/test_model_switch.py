"""Switching the service's model with ``systemctl reload`` (SIGHUP), end to end.

A real ``cellwatch watch`` process counts a stream of images while its configuration's
``model:`` changes to a model that counts differently; every image gets exactly one row,
counted with the old model before the switch and with the new one after it, in the same
process. A new model that is missing or cannot be loaded keeps the old one counting.
"""

from __future__ import annotations

import shutil
import signal
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import tifffile
import yaml
from conftest import discs, save_threshold_model
from test_daemon import (
    NotifySocket,
    by_image,
    check_files_whole,
    fake_engine,
    status_json,
    write_config,
)
from test_daemon import run_cellwatch as run_cellwatch  # a fixture

from cellwatch.config import Config, load_config, override
from cellwatch.service import daemon, status
from cellwatch.service.daemon import Daemon
from cellwatch.service.engine import Engine
from cellwatch.service.local_runner import LocalRunner
from cellwatch.service.sdnotify import Notifier

STREAM_MAX = 600  # images written one after another while the model switches, at most
COUNTED_BEFORE = 3  # the SIGHUP comes once this many of them are counted...
WRITTEN_AFTER = 5  # ...and the stream stops once this many are written after READY


def write_two_cells(path: Path) -> Path:
    """One bright cell and one dim one: the model that calls pixels above half the range
    "cell" counts 2, the one with its threshold at 0.85 counts only the bright one."""
    bright, _ = discs((64, 64), [(18, 18)], 6, value=200)
    dim, _ = discs((64, 64), [(44, 44)], 6, value=140)
    tmp = path.with_name(path.name + ".part")
    tifffile.imwrite(tmp, np.maximum(bright, dim))
    tmp.rename(path)  # whole at once: the watcher never sees half a file
    return path


def reload(cw, config: Path, model: Path, **tiling: int) -> None:
    """Point ``model.path`` at ``model`` (and change ``tiling``), SIGHUP, wait for READY."""
    settings = yaml.safe_load(config.read_text())
    settings["model"]["path"] = str(model)
    settings["tiling"].update(tiling)
    config.write_text(yaml.safe_dump(settings))
    mark = len(cw.notify.poll())
    cw.proc.send_signal(signal.SIGHUP)
    reloading = cw.notify.wait_for("RELOADING=1", after=mark, timeout=60)
    cw.notify.wait_for("READY=1", after=reloading, timeout=60)


def test_sighup_switches_the_model_at_the_next_image(run_cellwatch, tmp_path: Path):
    alpha = save_threshold_model(tmp_path / "alpha.keras")
    beta = save_threshold_model(tmp_path / "beta.keras", threshold=0.85)
    config = write_config(tmp_path / "config.yaml", alpha)
    cw = run_cellwatch(config)
    cw.start()
    pid = cw.proc.pid

    # a new model that is missing, then one that is no model: the old one keeps counting
    reload(cw, config, tmp_path / "missing.keras")
    write_two_cells(cw.inbox / "probe-missing.tif")
    reload(cw, config, Path(shutil.copy(tmp_path / "config.yaml", tmp_path / "broken.keras")))
    write_two_cells(cw.inbox / "probe-broken.tif")
    rows = by_image(cw.wait_rows(lambda rows: len(rows) == 2))
    for name in ("probe-missing.tif", "probe-broken.tif"):
        assert rows[name][0]["model"].startswith("alpha@"), rows[name]
        assert rows[name][0]["cell_count"] == "2"
    failed = [line for line in cw.log().splitlines() if "reload failed" in line]
    assert len(failed) == 2, failed
    for line, model, why in zip(
        failed,
        ("missing.keras", "broken.keras"),
        ("no model file", "not a Keras model file"),
        strict=True,
    ):
        assert why in line and str(tmp_path / model) in line, line
        assert "Still counting with model alpha@" in line and f"fix {config} " in line, line
    report = status_json(["--config", str(config), "--out", str(cw.out)])
    assert report["model"].startswith("alpha@") and report["daemon"]["pid"] == pid
    assert "failed (" in report["last_reload"] and "broken.keras" in report["last_reload"]
    assert report["last_reload"].endswith(f"still counting with model {report['model']}")

    # a stream of images; the model switches (and a setting changes) in the middle of it
    written: list[tuple[str, float]] = []
    enough = threading.Event()

    def stream() -> None:
        for i in range(STREAM_MAX):
            write_two_cells(cw.inbox / f"img-{i:03d}.tif")
            written.append((f"img-{i:03d}.tif", time.monotonic()))
            if enough.wait(0.15):
                return

    writer = threading.Thread(target=stream)
    writer.start()
    try:
        cw.wait_rows(lambda rows: len(rows) >= 2 + COUNTED_BEFORE)
        reload(cw, config, beta, overlap=12)
        ready = time.monotonic()
        while len([at for _, at in written if at > ready]) < WRITTEN_AFTER:
            assert writer.is_alive(), f"the reload took longer than {STREAM_MAX} images"
            time.sleep(0.05)
    finally:
        enough.set()
        writer.join()
    n_stream = len(written)
    rows = cw.wait_rows(lambda rows: len(rows) == 2 + n_stream)
    time.sleep(1.0)  # room for a duplicate to show up, were there one
    rows = cw.rows()
    assert len(rows) == 2 + n_stream
    images = by_image(rows)
    assert set(images) == {"probe-missing.tif", "probe-broken.tif", *(n for n, _ in written)}
    assert all(len(found) == 1 for found in images.values()), "an image has two rows"
    assert all(row["status"] == "ok" for row in rows)

    # in the order they were recorded: old model, then new, and each counts as it should
    stream_rows = [row for row in rows if row["image"].rsplit("/", 1)[-1].startswith("img-")]
    models = [row["model"].split("@")[0] for row in stream_rows]
    switch = models.index("beta")
    assert switch >= COUNTED_BEFORE, models
    assert models == ["alpha"] * switch + ["beta"] * (n_stream - switch), models
    for row in stream_rows:
        assert row["cell_count"] == ("2" if row["model"].startswith("alpha@") else "1"), row
    before, after = stream_rows[switch - 1], stream_rows[switch]
    assert before["settings_hash"] != after["settings_hash"]
    assert len({row["settings_hash"] for row in stream_rows[switch:]}) == 1
    assert len({row["model"] for row in stream_rows[switch:]}) == 1
    # written after the daemon said READY again: counted with the new model
    late = [name for name, at in written if at > ready]
    assert late and all(images[name][0]["model"].startswith("beta@") for name in late)

    # the same process all along, and `cellwatch status` names the model in use
    assert cw.proc.poll() is None
    report = status_json(["--config", str(config), "--out", str(cw.out)])
    assert report["daemon"]["pid"] == pid and report["model"] == after["model"]
    assert (
        f"ok; model switched from {before['model']} to {after['model']}; settings hash "
        in (report["last_reload"])
    )
    text = status.format_text(report)
    assert f"model       {after['model']}\n  last reload " in text
    assert f"model switched from {before['model']} to {after['model']}" in cw.log()

    # the daemon's own daily report marks the switch (the test config keeps UTC)
    page = cw.out / "reports" / f"{datetime.now(UTC).date().isoformat()}.html"
    marker = f"Model switched from {before['model']} to {after['model']} at "
    deadline = time.monotonic() + 30
    while not (page.exists() and marker in page.read_text(encoding="utf-8")):
        assert time.monotonic() < deadline, "the daily report does not mark the switch"
        time.sleep(0.2)

    assert cw.stop() == 0
    assert "Traceback" not in cw.log()
    check_files_whole(cw.out)


def test_a_slow_reload_keeps_the_watchdog_fed_and_the_old_model_counting(
    tmp_path: Path, monkeypatch
):
    """The new model loads in a thread of its own: systemd keeps hearing WATCHDOG=1 between
    RELOADING=1 and READY=1, and the worker counts with the old model until the new one is
    ready (in process, with a fake model that takes a second to load)."""
    (tmp_path / "inbox").mkdir()
    config = load_config(write_config(tmp_path / "c.yaml", None))
    config = override(
        config, **{"watch.inbox": str(tmp_path / "inbox"), "output.dir": str(tmp_path / "out")}
    )
    loads: list[str] = []

    def slow_engine(config: Config) -> Engine:
        loads.append("new" if loads else "old")
        if loads[-1] == "new":
            time.sleep(1.0)
        return fake_engine(config, f"{loads[-1]}@0123")

    seen: list[tuple[float, str]] = []  # what the worker would count with, over time

    def work(runner: LocalRunner) -> None:
        while not runner.stop.wait(0.02):
            seen.append((time.monotonic(), runner.engine.model_label))

    monkeypatch.setattr(daemon, "load_engine", slow_engine)
    monkeypatch.setattr(LocalRunner, "run", work)
    notify = NotifySocket()
    server = Daemon(lambda: config, Notifier({"NOTIFY_SOCKET": notify.name,
                                              "WATCHDOG_USEC": "100000"}))  # fmt: skip

    def drive() -> None:
        notify.wait_for("READY=1", timeout=30)
        server._reload_requested = True  # as the SIGHUP handler does
        notify.wait_for("READY=1", after=notify.wait_for("RELOADING=1", timeout=30), timeout=30)
        server._stop_requested = True

    driver = threading.Thread(target=drive)
    driver.start()
    try:
        assert server.serve() == 0
    finally:
        driver.join()
        notify.close()
    lines = [m.split("\n")[0] for m in notify.poll()]
    reloading = lines.index("RELOADING=1")
    ready = lines.index("READY=1", reloading)
    assert lines[reloading + 1 : ready].count("WATCHDOG=1") >= 5, lines[reloading:ready]
    assert loads == ["old", "new"]
    labels = [label for _, label in seen]
    switch = labels.index("new@0123")
    assert switch > 0 and set(labels[:switch]) == {"old@0123"}
    assert set(labels[switch:]) == {"new@0123"}
