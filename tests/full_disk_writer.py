"""Run cellwatch's writes against a file system that is really full; print what happened.

Used by ``tests/test_ledger.py`` in a child process, because the limits it sets apply to
the whole process::

    python full_disk_writer.py rlimit DIR   # RLIMIT_FSIZE: each file may not grow
    python full_disk_writer.py tmpfs DIR    # DIR is a small tmpfs: fill it, then write

Each write of the ledger, the cell table, a label image, an overlay and a report page must
raise ``TransientError`` and leave its file exactly as it was. Prints one JSON object:
``{name: {"raised": class name | None, "error": str | None, "before": [size, sha256],
"after": [size, sha256]}}`` and ``"left_over"``: temporary files still there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import resource
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cellwatch.reporting import report
from cellwatch.storage import imageio, ledger, overlay


def fingerprint(path: Path) -> list[object]:
    data = path.read_bytes() if path.exists() else b""
    return [len(data), hashlib.sha256(data).hexdigest()]


def main(mode: str, out: Path) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write(), not a killed process
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 65535, (256, 256), dtype=np.uint16)  # incompressible
    row = {"processed_at": "2026-03-02T12:00:00+00:00", "image": "/in/a.tif", "status": "ok"}
    cell = {"image": "/in/a.tif", "job_id": "j", "label": 1, "area_px": 10}
    paths = {
        "ledger": out / "ledger.csv",
        "cells": out / "cells.csv",
        "labels": out / "labels" / "a.tif",
        "overlay": out / "overlays" / "a.png",
        "report": out / "reports" / "2026-03-02.html",
    }
    ledger.append_rows(paths["ledger"], [row] * 3)
    ledger.append_rows(paths["cells"], [cell] * 50, ledger.CELL_COLUMNS)
    for name in ("labels", "overlay", "report"):
        paths[name].parent.mkdir(parents=True, exist_ok=True)
        paths[name].write_bytes(b"the previous version")
    big_row = {**row, "error": "x" * 20_000}
    writes: dict[str, Callable[[], object]] = {
        "ledger": lambda: ledger.append_rows(paths["ledger"], [big_row]),
        "cells": lambda: ledger.append_rows(paths["cells"], [cell] * 2000, ledger.CELL_COLUMNS),
        "labels": lambda: imageio.write_labels(paths["labels"], noise),
        "overlay": lambda: overlay.write_overlay(paths["overlay"], noise, noise),
        "report": lambda: report._write_atomic(paths["report"], "x" * 100_000),
    }
    if mode == "tmpfs":
        fill(out / "filler")
    results = {}
    for name, write in writes.items():
        before = fingerprint(paths[name])
        raised = error = None
        limit = before[0] + 100 if mode == "rlimit" else None
        with file_size_limit(limit):
            try:
                write()
            except Exception as exc:  # the test wants TransientError; show whatever it was
                raised, error = type(exc).__name__, str(exc)
        after = fingerprint(paths[name])
        results[name] = {"raised": raised, "error": error, "before": before, "after": after}
    results["left_over"] = sorted(
        str(p.relative_to(out)) for p in out.rglob("*.tmp")
    )  # temporary files must not stay behind
    print(json.dumps(results))


@contextlib.contextmanager
def file_size_limit(limit: int | None):
    if limit is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def fill(path: Path) -> None:
    """Take every free block of the file system ``path`` is on."""
    with path.open("wb", buffering=0) as handle:
        block = b"\0" * 4096
        with contextlib.suppress(OSError):
            while True:
                handle.write(block)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
