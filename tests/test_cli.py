"""End-to-end tests through the real command line."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tifffile
from conftest import DATA, discs

from cellwatch.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cellwatch", *args], capture_output=True, text=True, timeout=600
    )


def test_quiet_keeps_tensorflows_start_up_lines_out_on_the_keras_runtime(threshold_model, tmp_path):
    """The OpenVINO runtime imports no TensorFlow; on Keras, --quiet hides its C++ lines."""
    image, _ = discs((64, 64), [(30, 30)], 10)
    tifffile.imwrite(tmp_path / "a.tif", image)
    config = tmp_path / "keras.yaml"
    config.write_text("inference:\n  runtime: keras\n")
    argv = ["predict", str(tmp_path / "a.tif"), "--out", str(tmp_path / "out"), "--quiet"]
    done = run_cli(*argv, "--model", str(threshold_model), "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert "absl::InitializeLog" not in done.stderr, done.stderr
    assert not re.search(r"^[IWEF]\d{4} ", done.stderr, re.MULTILINE), done.stderr
    assert pd.read_csv(tmp_path / "out" / "ledger.csv")["cell_count"].tolist() == [1]


def test_predict_exit_status_and_ledger(threshold_model, tmp_path):
    inbox = tmp_path / "in"
    (inbox / "sub").mkdir(parents=True)
    image, _ = discs((120, 160), [(30, 30), (30, 100), (90, 60)], 10)
    tifffile.imwrite(inbox / "a.tif", image)
    tifffile.imwrite(inbox / "sub" / "b.tif", image[:, :80])
    out = tmp_path / "out"
    done = run_cli(
        "predict", str(inbox), "--out", str(out), "--model", str(threshold_model), "--quiet"
    )
    assert done.returncode == 0, done.stderr
    assert "absl::InitializeLog" not in done.stderr, done.stderr  # --quiet: no C++ chatter
    assert not re.search(r"^[IWEF]\d{4} ", done.stderr, re.MULTILINE), done.stderr
    ledger = pd.read_csv(out / "ledger.csv")
    assert list(ledger["cell_count"]) == [3, 2]
    assert set(ledger["status"]) == {"ok"}

    (inbox / "broken.tif").write_bytes(b"II*\x00garbage")
    done = run_cli(
        "predict", str(inbox), "--out", str(out), "--model", str(threshold_model), "--quiet"
    )
    assert done.returncode == 1
    text = (out / "ledger.csv").read_text()
    assert text.count("processed_at,") == 1  # header once, rows appended
    ledger = pd.read_csv(out / "ledger.csv")
    assert len(ledger) == 3  # a.tif and b.tif have their rows already: not counted twice
    failed = ledger[ledger["status"] == "failed"]
    assert len(failed) == 1 and "broken.tif" in failed["error"].iloc[0]


def test_report_out_is_the_results_folder_predict_wrote(threshold_model, tmp_path):
    """`predict imgs --out out` then `report --out out`: the report reads out/ledger.csv."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    image, _ = discs((120, 160), [(30, 30), (30, 100), (90, 60)], 10)
    tifffile.imwrite(imgs / "a.tif", image)
    tifffile.imwrite(imgs / "b.tif", image[:, :80])
    out = tmp_path / "out"
    done = run_cli("predict", str(imgs), "--out", str(out), "--model", str(threshold_model))
    assert done.returncode == 0, done.stderr
    rows = pd.read_csv(out / "ledger.csv")
    day = pd.to_datetime(rows["processed_at"], utc=True, format="ISO8601").dt.date
    assert day.nunique() == 1  # images written a moment ago: one UTC day
    # Run from an empty folder, so output.dir's default (results/) does not exist there.
    done = subprocess.run(
        [sys.executable, "-m", "cellwatch", "report", "--out", "out", "--date", str(day[0])],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "no ledger" not in done.stderr
    assert done.stdout.split() == [f"out/reports/{day[0]}.html"]
    table = pd.read_csv(out / "reports" / f"{day[0]}.csv")
    assert sorted(table["cell_count"]) == [2, 3]
    page = (out / "reports" / f"{day[0]}.html").read_text(encoding="utf-8")
    assert 'id="n-cells">5<' in page


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["predict", "nowhere/", "--model", "MODEL"], "nowhere does not exist"),
        (["predict", "IMG", "--model", "missing.keras"], "no model file at missing.keras"),
        (
            ["predict", "IMG", "--model", "MODEL", "--config", "BADCONFIG"],
            "unknown key 'tiling.size'",
        ),
    ],
)
def test_usage_and_config_errors_exit_2(threshold_model, tmp_path, capsys, args, message):
    image, _ = discs((64, 64), [(32, 32)], 8)
    tifffile.imwrite(tmp_path / "img.tif", image)
    (tmp_path / "bad.yaml").write_text("tiling:\n  size: 3\n")
    subs = {
        "MODEL": str(threshold_model),
        "IMG": str(tmp_path / "img.tif"),
        "BADCONFIG": str(tmp_path / "bad.yaml"),
    }
    code = main([subs.get(a, a) for a in args] + ["--out", str(tmp_path / "o")])
    assert code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(not DATA.exists(), reason="shared data not present")
def test_predict_all_val_images_outputs_agree(threshold_model, tmp_path):
    out = tmp_path / "out"
    code = main(
        [
            "predict",
            str(DATA / "val" / "images"),
            "--out",
            str(out),
            "--model",
            str(threshold_model),
            "--quiet",
        ]
    )
    assert code == 0
    ledger = pd.read_csv(out / "ledger.csv")
    cells = pd.read_csv(out / "cells.csv")
    assert len(ledger) == 66 and set(ledger["status"]) == {"ok"}
    per_image = cells.groupby("image").size()
    for row in ledger.itertuples():
        labels = tifffile.imread(row.labels)
        assert labels.shape == (row.height, row.width)
        assert len(np.unique(labels[labels > 0])) == row.cell_count == per_image.get(row.image, 0)
        assert (
            out / "overlays" / (labels_stem := row.labels.rsplit("/", 1)[1].replace(".tif", ".png"))
        ).exists(), labels_stem


@pytest.mark.skipif(not DATA.exists(), reason="shared data not present")
def test_evaluate_reports_metrics(threshold_model, tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    for name in sorted(p.name for p in (DATA / "val" / "images").iterdir())[:3]:
        (images / name).write_bytes((DATA / "val" / "images" / name).read_bytes())
        (masks / name).write_bytes((DATA / "val" / "masks" / name).read_bytes())
    done = run_cli(
        "evaluate",
        "--images",
        str(images),
        "--masks",
        str(masks),
        "--model",
        str(threshold_model),
        "--json",
        str(tmp_path / "e.json"),
        "--per-image",
        str(tmp_path / "e.csv"),
    )
    assert done.returncode == 0, done.stderr
    assert "accuracy" in done.stdout and "MAPE" in done.stdout
    summary = json.loads((tmp_path / "e.json").read_text())
    assert summary["images"] == 3
    per_image = pd.read_csv(tmp_path / "e.csv")
    assert len(per_image) == 3
    # the totals are the images' sums, and each true cell is matched or missed, each
    # predicted cell matched or extra: all of it has to agree with the masks and labels
    half = summary["thresholds"]["0.50"]
    tp, fp, fn = (int(per_image[f"{k}_0.5"].sum()) for k in ("tp", "fp", "fn"))
    assert (half["tp"], half["fp"], half["fn"]) == (tp, fp, fn)
    assert tp + fn == per_image["true_count"].sum() and tp + fp == per_image["pred_count"].sum()
    assert half["accuracy"] == pytest.approx(tp / (tp + fp + fn))
    assert tp > 0, "the threshold model finds none of the bright nuclei"


def test_predict_counts_images_in_groups_as_the_daemon_does(threshold_model, tmp_path, monkeypatch):
    """`predict` hands images to the pipeline ``tiling.images_at_once`` at a time, so one
    is read, labelled and written while the network works on another."""
    import cellwatch.cli

    groups: list[int] = []
    real = cellwatch.cli.process_group

    def recording(paths, *args, **kwargs):
        groups.append(len(paths))
        return real(paths, *args, **kwargs)

    monkeypatch.setattr(cellwatch.cli, "process_group", recording)
    image, _ = discs((64, 64), [(30, 30)], 10)
    for i in range(5):
        tifffile.imwrite(tmp_path / f"{i}.tif", image)
    config = tmp_path / "c.yaml"
    config.write_text("tiling:\n  images_at_once: 2\n")
    argv = ["predict", str(tmp_path), "--out", str(tmp_path / "out"), "--quiet"]
    assert main([*argv, "--model", str(threshold_model), "--config", str(config)]) == 0
    assert groups == [2, 2, 1]
    assert pd.read_csv(tmp_path / "out" / "ledger.csv")["cell_count"].tolist() == [1] * 5
