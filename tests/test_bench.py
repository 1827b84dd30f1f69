"""The benchmark runs and reports every figure; the fast paths it measures keep results."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import discs
from skimage.segmentation import relabel_sequential, watershed

from cellwatch.bench import command, inputs, network
from cellwatch.bench.report import format_comparison
from cellwatch.cli import main
from cellwatch.config import Config, override
from cellwatch.errors import ConfigError
from cellwatch.model import load_model
from cellwatch.pipeline import Segmenter, process_image, process_images
from cellwatch.postprocess import tidy, watershed_by_part


def test_quick_bench_reports_every_figure(tmp_path, capsys):
    out = tmp_path / "bench.json"
    out.write_text(json.dumps({"machine": {}, "total_s": 12345.0}))  # an earlier run
    args = ["bench", "--quick", "--json", str(out), "--compare", str(out)]
    assert main([*args, "--out", str(tmp_path / "w")]) == 0
    report = json.loads(out.read_text())
    assert report["peak"]["best_gflops"] > 0
    assert report["models"]["default"]["gflop_per_tile"] > 0
    for case in ("default", "default_one_tile", "default_xla", "seed"):
        assert report["network"][case]["tiles_per_s"] > 0
    for workload in ("mosaic", "burst"):
        for run in ("default", "seed", "naive"):
            figures = report["workloads"][workload][run]
            assert figures["mp_per_s"] > 0 and figures["cells"] >= 0
            assert {"read", "inference", "postprocess", "measure", "write"} <= set(
                figures["stage_share"]
            )
            assert 0 <= figures["non_network_share"] <= 1
    for case in ("big_image", "big_image_default_config"):
        figures = report["memory"][case]
        assert figures["peak_rss_mb"] > figures["ready_rss_mb"] * 0.5
        assert f"{case}_peak_rss_mb" in report["targets"]
    assert report["memory"]["big_image"]["scale"] == 1.0
    assert "growth_mb" in report["memory"]["backlog"]
    assert {"non_network_share_mosaic", "network_share_of_peak", "total_s"} <= set(
        report["targets"]
    )
    printed = capsys.readouterr().out
    assert "targets:" in printed
    assert "1.234e+04 →" in printed  # compared with the file as it was before the run
    comparison = format_comparison(report, report)
    assert "×1.00" in comparison and "workloads.mosaic.default.mp_per_s" in comparison


def test_a_trained_seed_model_is_benchmarked_when_given(tmp_path):
    from cellwatch.model import build_seed_unet

    trained = tmp_path / "my-seed.keras"
    build_seed_unet(filters=4).save(trained)
    models = network.prepare_models(tmp_path / "m", None, inputs.QUICK, bundled=False, seed=trained)
    assert models["seed"]["path"] == trained
    assert models["seed"]["about"]["model"] == f"{trained} (trained)"
    assert models["seed"]["flops_per_tile"] > 0
    untrained = network.prepare_models(tmp_path / "u", None, inputs.QUICK, bundled=False)
    assert untrained["seed"]["about"]["model"].startswith("untrained")


def test_sizes_flag_is_checked():
    assert command._sizes(inputs.Sizes(), "mosaic=1024, burst=3").mosaic == 1024
    with pytest.raises(ConfigError, match="known name"):
        command._sizes(inputs.Sizes(), "mosiac=1024")


def test_conv_flops_are_counted_from_layer_shapes(tmp_path):
    import keras

    inputs = keras.Input((None, None, 1))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = keras.layers.Conv2DTranspose(2, 2, strides=2, padding="same")(x)
    path = tmp_path / "tiny.keras"
    keras.Model(inputs, x).save(path)
    expected = 2 * 16 * 16 * 9 * 1 * 4 + 2 * 16 * 16 * 4 * 4 * 2
    assert network.conv_flops_per_tile(path, 16) == expected


# --- the fast paths give the results of the straightforward ones -------------------------


@pytest.mark.parametrize("seed", range(6))
def test_watershed_by_part_equals_watershed_of_the_whole_image(seed):
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    depth = ndi.gaussian_filter(rng.random((120, 150)), 3).astype(np.float32)
    mask = depth > np.quantile(depth, 0.4)
    seeds, _ = ndi.label(depth > np.quantile(depth, 0.8))
    expected = watershed(depth, seeds, mask=mask | (seeds > 0))
    got = watershed_by_part(depth, seeds, mask | (seeds > 0))
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(
        watershed_by_part(-depth, seeds, mask | (seeds > 0), negate=True), expected
    )


@pytest.mark.parametrize("min_area", [0, 1, 5, 40])
def test_tidy_equals_relabel_sequential(min_area):
    rng = np.random.default_rng(min_area)
    labels = rng.integers(0, 30, (50, 60)).astype(np.int32) * 3
    expected = labels.copy()
    if min_area > 1:
        counts = np.bincount(labels.ravel())
        expected[(counts < min_area)[labels] & (labels > 0)] = 0
    expected = relabel_sequential(expected)[0]
    np.testing.assert_array_equal(tidy(labels, min_area), expected)
    sparse = np.array([[0, 10**9], [5, 5]], np.int64)
    assert tidy(sparse, 0).tolist() == [[0, 2], [1, 1]]
    assert tidy(np.zeros((3, 3), np.int32), 5).max() == 0


@pytest.mark.parametrize("scale", [None, 1.6], ids=["own-scale", "zoomed"])
def test_process_images_gives_what_process_image_gives(threshold_model, tmp_path, scale):
    paths = []
    for i, (shape, radius) in enumerate([((64, 64), 8), ((300, 200), 10), ((40, 90), 6)] * 3):
        image, _ = discs(shape, [(shape[0] // 2, shape[1] // 2), (10, 10)], radius)
        paths.append(tmp_path / "in" / f"img{i}.tif")
        paths[-1].parent.mkdir(exist_ok=True)
        tifffile.imwrite(paths[-1], image)
    (tmp_path / "in" / "broken.tif").write_text("not an image")
    paths.insert(4, tmp_path / "in" / "broken.tif")
    config = override(
        Config(), **{"tiling.tile_size": 64, "tiling.overlap": 16, "scale.scale": scale}
    )
    segmenter = Segmenter(config, load_model(threshold_model))
    ids = [f"j{i}" for i in range(len(paths))]
    one = [
        process_image(p, config=config, segmenter=segmenter, out_dir=tmp_path / "a", job_id=j)
        for p, j in zip(paths, ids, strict=True)
    ]
    many = process_images(
        paths, config=config, segmenter=segmenter, out_dir=tmp_path / "b", job_ids=ids
    )
    volatile = {"duration_s", "processed_at", "labels", "overlay", "error"}
    for a, b in zip(one, many, strict=True):
        assert {k: v for k, v in a.row.items() if k not in volatile} == {
            k: v for k, v in b.row.items() if k not in volatile
        }
        assert a.cells.equals(b.cells)
    assert [r.row["status"] for r in many].count("failed") == 1
    assert {r.row.get("scale") for r in many if r.row["status"] == "ok"} == {scale or 1.0}
    assert [r.row.get("cell_count") for r in many if r.row["status"] == "ok"] == [2] * 9


@pytest.mark.skipif(
    importlib.util.find_spec("setuptools") is None, reason="building a wheel needs setuptools"
)
def test_bench_runs_from_an_installed_wheel_without_the_shared_data(tmp_path):
    """A user's ``pip install cellwatch`` has no ``../shared``: bench falls back to
    synthetic nuclei and still measures every workload it was asked for."""
    repo = Path(__file__).resolve().parents[1]
    source, wheels, site = tmp_path / "source", tmp_path / "wheels", tmp_path / "site"
    # Build from a copy: setuptools leaves a build/ folder beside the sources it builds.
    shutil.copytree(
        repo,
        source,
        ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "tests", "docs", "samples"),
    )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, source],
        check=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("cellwatch-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", site, wheel], check=True)
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "cellwatch",
            "bench",
            "--quick",
            "--skip",
            "seed,naive,memory,backlog",
            "--json",
            out,
        ],
        cwd=tmp_path,  # not the checkout: only the installed package can be imported
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["data"].startswith("synthetic discs"), report["data"]
    assert report["package"].startswith(str(site)), report["package"]
    assert report["workloads"]["mosaic"]["default"]["mp_per_s"] > 0
