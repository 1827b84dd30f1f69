"""``cellwatch predict`` run twice counts each image once: a re-run skips what has a row for
the same content and settings, resumes after ``kill -9``, and ``--again`` counts anew.
Real ``cellwatch predict`` subprocesses throughout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import tifffile
import yaml
from conftest import discs


def predict(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None):
    return subprocess.run(
        [sys.executable, "-m", "cellwatch", "predict", *args, "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def images(folder: Path, n: int, size: int = 96) -> list[Path]:
    """``n`` different images of bright discs (image i has i % 3 + 1 discs)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        centres = [(20, 20), (20, 70), (70, 45)][: i % 3 + 1]
        image, _ = discs((size, size + i), centres, 8)
        paths.append(folder / f"img{i:02d}.tif")
        tifffile.imwrite(paths[-1], image)
    return paths


def ledger(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "ledger.csv")


def once_each(out: Path, paths: list[Path]) -> None:
    rows = ledger(out)
    assert sorted(rows["image"]) == sorted(str(p.resolve()) for p in paths), rows["image"]
    assert set(rows["status"]) == {"ok"}


def test_rerun_counts_only_what_has_no_row_and_again_counts_all(threshold_model, tmp_path):
    paths = images(tmp_path / "in", 3)
    out = tmp_path / "out"
    model = ("--model", str(threshold_model), "--out", str(out))
    assert predict(str(tmp_path / "in"), *model).returncode == 0
    once_each(out, paths)

    paths += images(tmp_path / "more", 1)  # one new image beside the three counted
    (tmp_path / "in" / "copy").mkdir()
    copy = tmp_path / "in" / "copy" / "img00.tif"  # same content, another file: its own row
    copy.write_bytes(paths[0].read_bytes())
    done = predict(str(tmp_path / "in"), str(tmp_path / "more"), *model)
    assert done.returncode == 0, done.stderr
    assert "3 of 5 images already have a row" in done.stderr, done.stderr
    assert "2 of 2 images counted" in done.stderr, done.stderr
    once_each(out, [*paths, copy])

    # other settings (the hash differs): counted again, as a new measurement
    config = tmp_path / "other.yaml"
    config.write_text(yaml.safe_dump({"postprocess": {"min_cell_area_px": 5}}))
    done = predict(str(paths[0]), *model, "--config", str(config))
    assert done.returncode == 0 and "1 of 1 images counted" in done.stderr, done.stderr
    assert len(ledger(out)) == 6

    done = predict(str(tmp_path / "in"), *model, "--again")
    assert done.returncode == 0 and "4 of 4 images counted" in done.stderr, done.stderr
    rows = ledger(out)
    assert len(rows) == 10 and rows["job_id"].nunique() == 10
    # and a plain re-run after --again counts nothing more
    done = predict(str(tmp_path / "in"), *model)
    assert done.returncode == 0 and "4 of 4 images already have a row" in done.stderr
    assert len(ledger(out)) == 10


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_stopped_mid_run_then_rerun_counts_each_image_exactly_once(threshold_model, tmp_path, sig):
    paths = images(tmp_path / "in", 40, size=160)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "cellwatch", "predict", str(tmp_path / "in"), "--quiet"]
    command += ["--model", str(threshold_model), "--out", str(out)]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C reaches it even when this test runs where SIGINT is ignored (a background job)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        text = (out / "ledger.csv").read_text() if (out / "ledger.csv").exists() else ""
        if text.count("\n") >= 3:  # the header and two rows
            break
        time.sleep(0.01)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL, "predict ended before it could be killed"
    else:
        assert proc.returncode == 130, stderr
        assert "run the same command again to count the rest" in stderr, stderr
    done_before = len(ledger(out))
    assert 2 <= done_before < len(paths)

    done = predict(str(tmp_path / "in"), "--model", str(threshold_model), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert f"{len(paths) - done_before} of {len(paths) - done_before} images counted" in (
        done.stderr
    ), done.stderr
    once_each(out, paths)


def test_killed_between_its_row_and_its_job_resumes_without_a_second_row(threshold_model, tmp_path):
    """``kill -9`` in the narrowest window: the rows of the first group of images (two at
    once here) are in the ledger, their jobs still running in the queue."""
    paths = images(tmp_path / "in", 4)
    out = tmp_path / "out"
    config = tmp_path / "two.yaml"
    config.write_text("tiling:\n  images_at_once: 2\n")
    args = (str(tmp_path / "in"), "--model", str(threshold_model), "--out", str(out))
    args += ("--config", str(config))
    done = predict(*args, env={"CELLWATCH_CRASH_AT": "after-ledger:1"})
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert len(ledger(out)) == 2
    done = predict(*args)
    assert done.returncode == 0 and "2 of 2 images counted" in done.stderr, done.stderr
    once_each(out, paths)


def test_paths_are_recorded_alike_in_process_and_on_dask(threshold_model, tmp_path):
    """Relative inputs: both ways record the absolute, resolved path, so a run on Dask
    after one in this process finds the same jobs and counts nothing twice."""
    paths = images(tmp_path / "in", 2)
    (tmp_path / "link").symlink_to(tmp_path / "in")
    out = tmp_path / "out"
    model = ("--model", str(threshold_model), "--out", str(out))
    done = predict("link", *model, "--workers", "0", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    once_each(out, paths)

    done = predict("in", *model, "--workers", "1", cwd=tmp_path)
    assert done.returncode == 0 and "2 of 2 images already have a row" in done.stderr, done.stderr
    assert len(ledger(out)) == 2

    done = predict("link", *model, "--workers", "1", "--again", cwd=tmp_path)
    assert done.returncode == 0 and "2 of 2 images counted" in done.stderr, done.stderr
    rows = ledger(out)
    assert len(rows) == 4
    first, second = rows.iloc[:2], rows.iloc[2:]
    assert sorted(first["image"]) == sorted(second["image"]) == sorted(str(p) for p in paths)


def test_a_second_run_into_the_same_results_folder_at_once_is_refused(tmp_path):
    from cellwatch.config import Config, override
    from cellwatch.errors import ConfigError
    from cellwatch.service.rerun import PredictJobs

    config = override(Config(), **{"output.dir": str(tmp_path / "out")})
    first = PredictJobs(config)
    with pytest.raises(ConfigError, match="another `cellwatch predict` is writing to"):
        PredictJobs(config)
    first.close()
    PredictJobs(config).close()  # free again once the first has ended
