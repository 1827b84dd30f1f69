"""The ledger and cell table: every append lands whole or not at all."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from cellwatch.errors import TransientError
from cellwatch.storage import ledger

HERE = Path(__file__).resolve().parent
ROW = {"processed_at": "2026-03-02T12:00:00+00:00", "image": "/in/a.tif", "status": "ok"}


def three_rows(path: Path) -> bytes:
    ledger.append_rows(path, [{**ROW, "cell_count": n} for n in (1, 2, 3)])
    return path.read_bytes()


def test_a_short_write_then_a_full_disk_leaves_the_file_as_it_was(tmp_path):
    path = tmp_path / "ledger.csv"
    before = three_rows(path)
    calls = []

    def half_then_full(fd: int, data: bytes) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return os.write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(TransientError, match=r"ledger\.csv .*No space left on device; disk full"):
        ledger.append_rows(path, [{**ROW, "cell_count": 4}], write=half_then_full)
    assert len(calls) == 2  # the rest was tried, as POSIX asks after a short write
    assert path.read_bytes() == before
    ledger.append_rows(path, [{**ROW, "cell_count": 5}])  # the next append is clean
    assert list(pd.read_csv(path)["cell_count"]) == [1, 2, 3, 5]


def test_a_write_that_stops_taking_bytes_is_an_error(tmp_path):
    path = tmp_path / "cells.csv"
    ledger.append_rows(path, [{"image": "a", "label": 1}], ledger.CELL_COLUMNS)
    before = path.read_bytes()
    taken = iter([10])

    def half_then_nothing(fd: int, data: bytes) -> int:
        return os.write(fd, bytes(data[: next(taken, 0)]))

    rows = [{"image": "b", "label": n} for n in range(100)]
    with pytest.raises(TransientError, match=r"cells\.csv .*accepted none .*the file is unchanged"):
        ledger.append_rows(path, rows, ledger.CELL_COLUMNS, write=half_then_nothing)
    assert path.read_bytes() == before


def test_short_writes_that_progress_write_everything(tmp_path):
    path = tmp_path / "ledger.csv"

    def half(fd: int, data: bytes) -> int:
        return os.write(fd, bytes(data[: max(1, len(data) // 2)]))

    ledger.append_rows(path, [{**ROW, "cell_count": n} for n in range(20)], write=half)
    assert list(pd.read_csv(path)["cell_count"]) == list(range(20))


def test_a_torn_last_line_is_cut_before_appending_and_by_repair(tmp_path):
    path = tmp_path / "ledger.csv"
    before = three_rows(path)
    path.write_bytes(before + b"2026-03-02T13:00:00+00:00,/in/torn")  # a crash mid-line
    ledger.append_rows(path, [{**ROW, "cell_count": 4}])
    assert list(pd.read_csv(path)["cell_count"]) == [1, 2, 3, 4]
    path.write_bytes(before + b"2026-03-02T13:00:00+00:00,/in/torn")
    assert ledger.repair(path) is True
    assert path.read_bytes() == before
    assert ledger.repair(path) is False
    assert ledger.repair(tmp_path / "missing.csv") is False


def test_a_torn_header_alone_is_replaced(tmp_path):
    path = tmp_path / "ledger.csv"
    path.write_bytes(b"processed_at,ima")
    ledger.append_rows(path, [ROW])
    assert list(pd.read_csv(path)["image"]) == ["/in/a.tif"]


def _full_disk_run(mode: str, out: Path, prefix: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), *sys.path])}
    done = subprocess.run(
        [*prefix, sys.executable, str(HERE / "full_disk_writer.py"), mode, str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _check_nothing_changed(results: dict, raised: str = "TransientError") -> None:
    """``raised``: DiskFullError (a TransientError) when the disk is full, so the daemon
    pauses rather than spend attempts; TransientError for a file-size limit."""
    assert results.pop("left_over") == []
    for name, result in results.items():
        assert result["raised"] == raised, f"{name}: {result}"
        assert "disk full?" in result["error"], result["error"]
        assert result["after"] == result["before"], f"{name} changed: {result}"


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_files_are_unchanged_when_the_file_size_limit_is_reached(tmp_path):
    """RLIMIT_FSIZE: the kernel takes part of a write (a short write), then refuses."""
    _check_nothing_changed(_full_disk_run("rlimit", tmp_path, []))


def test_files_are_unchanged_on_a_full_tmpfs(tmp_path):
    """A real full file system: a 256 KiB tmpfs in a private mount namespace, filled up."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare command; the RLIMIT_FSIZE test covers short writes")
    mount = tmp_path / "small"
    mount.mkdir()
    command = f"mount -t tmpfs -o size=256k tmpfs {mount}"
    probe = subprocess.run(["unshare", "-rm", *command.split()], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs without privileges here ({probe.stderr.strip()}); "
            "the RLIMIT_FSIZE test covers short writes"
        )
    script = f'{command} && exec "$@"'
    results = _full_disk_run("tmpfs", mount, ["unshare", "-rm", "sh", "-c", script, "sh"])
    _check_nothing_changed(results, "DiskFullError")


def test_read_parses_each_column_as_its_declared_type(tmp_path):
    """One table says each column's type: a text column of digits (a job id "007", a
    scene "1") stays text, a number column is a number."""
    path = tmp_path / "ledger.csv"
    row = {name: "007" if kind is str else "7" for name, kind in ledger.COLUMN_TYPES.items()}
    ledger.append_rows(path, [row])
    back = ledger.read(path)
    assert tuple(back.columns) == ledger.COLUMNS
    for name, kind in ledger.COLUMN_TYPES.items():
        value = back.loc[0, name]
        if kind is str:
            assert value == "007", f"{name} read as {value!r}: a text column parsed as a number"
        else:
            assert value == 7.0 and back[name].dtype.kind in "if", f"{name} read as {value!r}"
    assert {n for n, k in ledger.COLUMN_TYPES.items() if k is str} == ledger.TEXT_COLUMNS
