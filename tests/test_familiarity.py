"""Familiarity: the signals, the score, its column in the ledger, the report's
``unfamiliar`` flag and the daemon's warning."""

from __future__ import annotations

import logging
import shutil
import threading
from datetime import UTC, date, datetime
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from conftest import DATA, discs
from scipy import ndimage as ndi
from skimage.measure import regionprops_table

from cellwatch import familiarity
from cellwatch.config import Config, ReportConfig, override
from cellwatch.errors import ModelError
from cellwatch.familiarity import Reference, measure, reference_from_card, score
from cellwatch.model import BUNDLED_MODEL, load_model, read_card, write_card
from cellwatch.pipeline import ImageResult, Segmenter, process_image
from cellwatch.preprocess import Normalization
from cellwatch.reporting.qc import (
    EMPTY,
    UNFAMILIAR,
    UNFAMILIAR_MESSAGE,
    QcThresholds,
    flag_images,
)
from cellwatch.reporting.report import build_reports
from cellwatch.service.engine import Engine, Paths
from cellwatch.service.jobs import FileVersion, JobQueue
from cellwatch.service.local_runner import LocalRunner
from cellwatch.service.recorder import Recorder
from cellwatch.storage import imageio, ledger

SAMPLES = Path(__file__).resolve().parents[1] / "samples"

# --- the signals ------------------------------------------------------------------------


def disc_field(seed: int, radius: float = 8.0) -> tuple[np.ndarray, np.ndarray]:
    """Bright discs with noise on a dark background (a fluorescence image) and labels."""
    rng = np.random.default_rng(seed)
    centres = [(y, x) for y in range(20, 236, 36) for x in range(20, 236, 36)]
    centres = [(y + int(rng.integers(-4, 5)), x + int(rng.integers(-4, 5))) for y, x in centres]
    image, labels = discs((256, 256), centres, radius, value=180, background=15)
    noisy = image + rng.normal(0, 4, image.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8), labels


def signals_of(
    image: np.ndarray, labels: np.ndarray, scale: float = 1.0
) -> familiarity.Familiarity:
    return measure(
        image,
        labels,
        Normalization.of(image),
        scale=scale,
        confidence=0.7,
        at_bound=False,
        reference={},
    )


def test_inverted_images_are_bright_and_blurred_ones_have_blurred_edges():
    image, labels = disc_field(0, radius=10)
    sharp = signals_of(image, labels)
    inverted = signals_of(255 - image, labels)
    blurred = signals_of(ndi.gaussian_filter(image.astype(np.float32), 3.0), labels)
    assert sharp.brightness < 0.1 < 0.9 < inverted.brightness
    assert sharp.edge_blur_px < 0.8
    assert blurred.edge_blur_px == pytest.approx(3.0, rel=0.15)
    assert sharp.confidence == 0.7
    assert sharp.score is None  # no reference: nothing to compare with


def test_edge_blur_is_measured_at_the_networks_scale():
    image, labels = disc_field(1, radius=10)
    image = ndi.gaussian_filter(image.astype(np.float32), 2.0)
    at = {scale: signals_of(image, labels, scale).edge_blur_px for scale in (1.0, 2.0)}
    assert at[1.0] == pytest.approx(2.0, rel=0.15)
    assert at[2.0] == pytest.approx(4.0, rel=0.15)


def test_no_cells_leave_only_the_brightness():
    image = np.full((64, 64), 10, np.uint8)
    found = signals_of(image, np.zeros(image.shape, np.int32))
    assert found.edge_blur_px is None and found.brightness == 0.0


def test_core_share_counts_sure_interior_pixels_of_cells_only():
    plane = np.array([[np.nan, 0.99, 0.5], [0.98, np.nan, 0.1]], np.float32)
    assert familiarity.core_share(plane) == pytest.approx(0.5)
    assert familiarity.core_share(np.full((3, 3), np.nan, np.float32)) is None


# --- the score ----------------------------------------------------------------------------


def test_reference_tails_follow_the_training_images():
    samples = np.linspace(0.0, 1.0, 1001)  # brightness: high values are unusual
    ref = Reference.of("brightness", samples)
    assert ref.values[0] == pytest.approx(0.995) and ref.values[-1] == pytest.approx(0.5)
    assert ref.tail(0.95) == pytest.approx(0.05, abs=1e-3)
    assert ref.tail(0.2) == 0.5
    # beyond the training images: an exponential tail, falling as fast as from the 0.5 % to
    # the 2 % quantile (familiarity.TAIL_FIT; 0.995 to 0.98: 4× over 0.015)
    assert familiarity.TAIL_FIT == (0.005, 0.02)
    assert ref.tail(1.0) == pytest.approx(0.005 * 4 ** (-0.005 / 0.015), rel=1e-3)
    assert ref.tail(1.5) == pytest.approx(0.005 * 4 ** (-0.505 / 0.015), rel=1e-3)
    low = Reference.of("confidence", samples)  # confidence: low values are unusual
    assert low.values[0] == pytest.approx(0.005)
    assert low.tail(0.01) == pytest.approx(0.01, abs=1e-3) and low.tail(0.9) == 0.5
    assert score({"confidence": 0.01, "brightness": 0.2}, reference={"confidence": low}) == (
        pytest.approx(0.02, abs=2e-3)
    )


def test_score_is_the_lowest_signal_and_zero_at_a_scale_bound():
    refs = {name: Reference.of(name, np.linspace(0.0, 1.0, 101)) for name in familiarity.SIGNALS}
    typical = {"brightness": 0.2, "edge_blur_px": 0.3, "confidence": 0.9}
    assert score(typical, reference=refs) == 1.0
    assert 0.0 <= score({**typical, "edge_blur_px": 0.97}, reference=refs) == pytest.approx(0.06)
    assert score({**typical, "confidence": 0.02, "brightness": 0.99}, reference=refs) == (
        pytest.approx(0.02)
    )
    assert score({**typical, "edge_blur_px": None}, reference=refs) == 1.0
    assert score({**typical, "edge_blur_px": 100.0}, reference=refs) == 0.0
    assert score(typical, at_bound=True, reference=refs) == 0.0


def test_scores_stay_between_0_and_1():
    rng = np.random.default_rng(3)
    refs = {name: Reference.of(name, rng.normal(0.5, 0.2, 200)) for name in familiarity.SIGNALS}
    values = [
        score(dict(zip(familiarity.SIGNALS, rng.normal(0.5, 3.0, 3), strict=True)), reference=refs)
        for _ in range(500)
    ]
    assert min(values) >= 0.0 and max(values) <= 1.0
    assert min(values) == 0.0 and max(values) == 1.0  # both ends are reached
    assert score({}, reference=refs) == 1.0  # nothing to compare: no sign of trouble


def test_card_references_are_checked():
    assert reference_from_card({}) == {}
    values = [0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.03]
    refs = reference_from_card({familiarity.CARD_KEY: {"brightness": values}})
    assert refs["brightness"].values == tuple(values)
    with pytest.raises(ValueError, match="unknown signal 'darkness'"):
        reference_from_card({familiarity.CARD_KEY: {"darkness": values}})
    with pytest.raises(ValueError, match="must hold 7 numbers"):
        reference_from_card({familiarity.CARD_KEY: {"brightness": [0.5]}})
    with pytest.raises(ValueError, match="from the most unusual value towards the median"):
        reference_from_card({familiarity.CARD_KEY: {"brightness": values[::-1]}})


def test_the_bundled_model_card_has_references_for_the_chosen_signals():
    refs = reference_from_card(read_card(BUNDLED_MODEL))
    assert refs and set(refs) <= set(familiarity.SIGNALS)


# --- through the pipeline -----------------------------------------------------------------


def with_references(model: Path, tmp_path: Path) -> Path:
    """A copy of ``model`` whose card says its training images had medians of 0 to 0.3
    and edges blurred by 0 to 2.5 px."""
    copy = tmp_path / model.name
    shutil.copy(model, copy)
    card = read_card(model)
    card[familiarity.CARD_KEY] = {
        "brightness": list(Reference.of("brightness", np.linspace(0, 0.3, 50)).values),
        "edge_blur_px": list(Reference.of("edge_blur_px", np.linspace(0, 2.5, 50)).values),
    }
    write_card(copy, card)
    return copy


def test_pipeline_rows_carry_familiarity(tmp_path, threshold_model):
    model = load_model(with_references(threshold_model, tmp_path))
    segmenter = Segmenter(Config(), model)
    image, labels = disc_field(99)
    sharp = segmenter.segment(image)
    assert sharp.labels.max() == labels.max()
    assert sharp.familiarity.confidence == 1.0  # the threshold model is always sure
    assert sharp.familiarity.score == 1.0
    limit = Config().report.familiarity_min
    inverted = segmenter.segment(255 - image)
    assert inverted.familiarity.score < limit
    blurred = segmenter.segment(ndi.gaussian_filter(image, 5.0))
    assert blurred.familiarity.edge_blur_px > 2.5 and blurred.familiarity.score < limit
    imageio.write_labels(tmp_path / "in" / "a.tif", image.astype(np.uint16))
    row = process_image(
        tmp_path / "in" / "a.tif",
        config=Config(),
        segmenter=segmenter,
        out_dir=tmp_path / "out",
        job_id="a",
    ).row
    assert row["status"] == "ok" and row["familiarity"] == 1.0
    bare = Segmenter(Config(), load_model(threshold_model))  # no references in its card
    assert bare.segment(image).familiarity.score is None


def test_an_estimate_stuck_at_a_scale_bound_is_unfamiliar(tmp_path, sized_threshold_model):
    model = with_references(sized_threshold_model, tmp_path)
    jitter = np.random.default_rng(0).integers(-3, 4, size=(64, 2))  # a lattice is a pattern
    centres = [(y, x) for y in range(8, 128, 16) for x in range(8, 128, 16)]
    image, _ = discs(
        (128, 128), [(y + a, x + b) for (y, x), (a, b) in zip(centres, jitter, strict=True)], 2.5
    )
    config = override(Config(), **{"scale.max_scale": 2.0})
    result = Segmenter(config, load_model(model)).segment(image)  # 5 px cells need a zoom of 4
    assert result.scale.scale == 2.0 and result.familiarity.at_bound
    assert result.familiarity.score == 0.0
    free = Segmenter(Config(), load_model(model)).segment(image)
    assert not free.familiarity.at_bound and free.familiarity.score > 0.0


def test_a_bad_card_reference_is_a_model_error(tmp_path, threshold_model):
    copy = tmp_path / "bad.keras"
    shutil.copy(threshold_model, copy)
    write_card(copy, {familiarity.CARD_KEY: {"brightness": [1, 2]}})
    with pytest.raises(ModelError, match="bad: the model card's familiarity_reference"):
        Segmenter(Config(), load_model(copy))


def versions(name: str) -> dict[str, np.ndarray]:
    """A real fluorescence image (from val) as it is, inverted and blurred heavily (sigma a
    quarter of its nuclei's median diameter, as benchmarks/familiarity.py blurs)."""
    pixels = imageio.read_image(SAMPLES / "images" / name).pixels
    diameter = {"a65bbfc5673e.tif": 29.0, "2c83c86dd4e5.tif": 27.0}[name]  # samples/README.md
    return {
        "as is": pixels,
        "inverted": (np.iinfo(pixels.dtype).max - pixels).astype(pixels.dtype),
        "blurred": ndi.gaussian_filter(pixels.astype(np.float32), diameter / 4),
    }


@pytest.fixture(scope="module")
def bundled() -> Segmenter:
    return Segmenter(Config(), load_model())


@pytest.mark.parametrize("name", ["a65bbfc5673e.tif", "2c83c86dd4e5.tif"])
def test_real_images_are_familiar_and_inverted_or_blurred_ones_are_not(bundled, name):
    limit = Config().report.familiarity_min
    found = {k: bundled.segment(v).familiarity for k, v in versions(name).items()}
    assert found["as is"].score >= 100 * limit, found["as is"]  # well inside
    assert found["inverted"].score < limit, found["inverted"]
    assert found["blurred"].score < limit, found["blurred"]


# --- the ledger, the report and the daemon --------------------------------------------------


def test_familiarity_follows_scene_in_the_ledger_and_old_ledgers_get_it(tmp_path):
    at = ledger.COLUMNS.index("familiarity")
    assert ledger.COLUMNS[at - 1 : at + 1] == ("scene", "familiarity")
    old_columns = ledger.COLUMNS[:at]  # as the cellwatch of the scene column wrote it
    path = tmp_path / "results" / "ledger.csv"
    row = {"processed_at": "2026-11-27T10:00:00+00:00", "image": "a.tif", "status": "ok",
           "cell_count": 12, "job_id": "a"}  # fmt: skip
    old_text = ",".join(old_columns) + "\n" + ledger.format_rows([row], old_columns)
    path.parent.mkdir()
    path.write_text(old_text)
    assert ledger.read(path)["familiarity"].isna().all()  # read as it is: the column, empty
    ledger.append_rows(path, [{**row, "image": "b.tif", "job_id": "b", "familiarity": 0.0}])
    header, first, _ = path.read_text().splitlines()
    assert tuple(header.split(",")) == ledger.COLUMNS
    assert first == old_text.splitlines()[1]  # the old row, unchanged
    table = ledger.read(path)
    assert table["image"].tolist() == ["a.tif", "b.tif"]
    assert table["job_id"].tolist() == ["a", "b"]
    assert table["familiarity"].isna().tolist() == [True, False]
    assert table["familiarity"].iloc[1] == 0.0
    build_reports(path, tmp_path / "results", start=date(2026, 11, 27), end=date(2026, 11, 27))
    day = pd.read_csv(tmp_path / "results/reports/2026-11-27.csv", keep_default_na=False)
    assert day["qc_flags"].tolist() == ["", UNFAMILIAR]  # the old row is not flagged


def test_report_flags_unfamiliar_images(tmp_path):
    path = tmp_path / "results" / "ledger.csv"
    rows = [
        {
            "processed_at": f"2026-11-27T10:0{i}:00+00:00",
            "image": f"{i}.tif",
            "status": "ok",
            "cell_count": 50,
            "job_id": str(i),
            "familiarity": f,
        }
        for i, f in enumerate([0.9, 0.00099, 0.001, None, 0.0])
    ]
    rows.append({**rows[0], "processed_at": "2026-11-27T11:00:00+00:00", "image": "x.tif",
                 "job_id": "x", "status": "failed", "cell_count": None, "familiarity": 0.0})  # fmt: skip
    ledger.append_rows(path, rows)
    build_reports(path, tmp_path / "results", start=date(2026, 11, 27), end=date(2026, 11, 27))
    day = pd.read_csv(tmp_path / "results/reports/2026-11-27.csv", keep_default_na=False)
    assert day["qc_flags"].tolist() == ["", UNFAMILIAR, "", "", UNFAMILIAR, "failed"]
    page = (tmp_path / "results/reports/2026-11-27.html").read_text(encoding="utf-8")
    assert page.count(f"{UNFAMILIAR_MESSAGE} (familiarity") == 2 * 2  # "check these" + table
    assert "(familiarity 0.00099)" in page and "(familiarity 0)" in page
    flags, _ = flag_images(
        ledger.read(path), pd.Series([""] * 6), QcThresholds(familiarity_min=0.5)
    )
    assert [UNFAMILIAR in f for f in flags] == [False, True, True, False, True, False]
    off, _ = flag_images(ledger.read(path), pd.Series([""] * 6), QcThresholds(familiarity_min=0))
    assert not any(UNFAMILIAR in f for f in off)


def test_daemon_warns_once_per_local_day(tmp_path, caplog):
    paths = Paths(tmp_path / "inbox", tmp_path / "out", tmp_path / "state")
    paths.inbox.mkdir()
    familiar = {"a.tif": 0.9, "b.tif": 0.0, "c.tif": 0.0005, "d.tif": 0.5, "e.tif": 0.0}

    def pipeline(paths_, *, config, segmenter, out_dir, job_ids, scenes):
        return [
            ImageResult(
                {
                    "image": str(p),
                    "job_id": j,
                    "status": "ok",
                    "cell_count": 3,
                    "scene": s,
                    "familiarity": familiar[p.name],
                }
            )
            for p, j, s in zip(paths_, job_ids, scenes, strict=True)
        ]

    # Europe/Berlin: 23:30 UTC on the 27th is already the 28th there
    now = {"t": datetime(2026, 11, 27, 12, 0, tzinfo=UTC)}
    config = override(Config(), **{"report.timezone": "Europe/Berlin"})
    engine = Engine(config, SimpleNamespace(model=SimpleNamespace(label="m@1"), stopwatch=None))
    caplog.set_level(logging.WARNING, logger="cellwatch")
    with JobQueue(paths.db) as queue:
        recorder = Recorder(paths, {}, scenes=lambda path: [None], clock=lambda: now["t"])
        worker = LocalRunner(paths, engine, recorder, stop=threading.Event(),
                             wake=threading.Event(), process=pipeline)  # fmt: skip
        for name, at in [("a.tif", 12), ("b.tif", 13), ("c.tif", 14), ("d.tif", 22), ("e.tif", 23)]:
            now["t"] = now["t"].replace(hour=at, minute=30)
            (paths.inbox / name).write_bytes(name.encode())
            queue.add([FileVersion(name, 1, 1, f"sha-{name}")])
            assert worker.work(queue)
    warnings = [r.getMessage() for r in caplog.records if UNFAMILIAR_MESSAGE in r.getMessage()]
    assert [w.split(":")[0] for w in warnings] == [
        str(paths.inbox / "b.tif"),  # the first of the 27th (Berlin)
        str(paths.inbox / "e.tif"),  # the first of the 28th: c.tif was the 27th's second
    ]
    assert "(familiarity 0, below report.familiarity_min 0.001)" in warnings[0]
    assert ledger.read(paths.ledger)["familiarity"].tolist() == [0.9, 0.0, 0.0005, 0.5, 0.0]


def non_cell_patterns(side: int = 384, seed: int = 0) -> dict[str, np.ndarray]:
    """Fields a microscope can show that hold no cells, as 16-bit images: interference
    rings (two ring spacings), stripes (straight and slanted), checkerboards (two square
    sizes)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:side, :side].astype(np.float64)
    radius2 = (y - side * 0.4) ** 2 + (x - side * 0.55) ** 2
    fields = {
        "interference rings": 0.5 + 0.5 * np.cos(radius2 / (side * 6.0)),
        "fine interference rings": 0.5 + 0.5 * np.cos(np.sqrt(radius2) * 2 * np.pi / 24),
        "stripes": 0.5 + 0.5 * np.sin(x * 2 * np.pi / 30),
        "slanted stripes": 0.5 + 0.5 * np.sin((x + y) * 2 * np.pi / 40),
        "checkerboard": ((y // 20 + x // 20) % 2).astype(np.float64),
        "large checkerboard": ((y // 48 + x // 48) % 2).astype(np.float64),
    }
    return {
        name: (1000 * (field + rng.normal(0, 0.03, field.shape)) + 200).astype(np.uint16)
        for name, field in fields.items()
    }


def empty_wells(side: int = 384, seed: int = 0) -> dict[str, np.ndarray]:
    """Empty wells: photon noise over a vignetted or a sloping background."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:side, :side].astype(np.float64)
    vignette = np.exp(-((y - 0.4 * side) ** 2 + (x - 0.6 * side) ** 2) / (2 * (0.6 * side) ** 2))
    return {
        "dim vignetted well": rng.poisson(20 * vignette + 5).astype(np.uint16),
        "well with a gradient": rng.poisson(30 * x / side + 10).astype(np.uint16),
        "bright vignetted well": rng.poisson(500 * vignette + 100).astype(np.uint16),
    }


@pytest.fixture(scope="module")
def bundled_segmenter() -> Segmenter:
    config = Config()
    return Segmenter(config, load_model(config.model.path))


def test_a_non_cell_pattern_is_flagged_not_counted(bundled_segmenter):
    limit = ReportConfig().familiarity_min
    for name, image in non_cell_patterns().items():
        found = bundled_segmenter.segment(image).familiarity
        assert found.pattern and found.score is not None and found.score < limit, (name, found)


def test_an_empty_well_is_flagged(bundled_segmenter):
    rows = []
    for image in empty_wells().values():
        result = bundled_segmenter.segment(image)
        rows.append(
            {
                "status": "ok",
                "cell_count": int(result.labels.max()),
                "familiarity": result.familiarity.score,
            }
        )
    images = pd.DataFrame(rows)
    flags, _ = flag_images(images, pd.Series([""] * len(images)), QcThresholds())
    assert all(EMPTY in f or UNFAMILIAR in f for f in flags), list(flags)


@pytest.mark.skipif(not DATA.exists(), reason="shared data not present")
def test_real_nuclei_are_not_a_pattern(bundled_segmenter):
    # val images of three kinds: small sparse, dense, large touching nuclei
    for name in ("0acd2c223d30", "a891bbc89143", "b1a239838c7d"):
        image = imageio.read_image(DATA / "val" / "images" / f"{name}.tif").pixels
        found = bundled_segmenter.segment(image).familiarity
        assert not found.pattern and found.score is not None and found.score > 0, (name, found)
    assert familiarity.periodicity(np.zeros((32, 32))) is None  # one value: nothing repeats


def test_the_median_solidity_of_many_cells_is_that_of_a_spread_of_them():
    # 150 cells: 100 round discs (solidity about 0.9) and 50 bands (ring arcs, about 0.4),
    # every third id a band; the sample keeps the median on the discs' side
    yy, xx = np.mgrid[:32, :32]
    disc = (yy - 16) ** 2 + (xx - 16) ** 2 <= 49
    arc = (np.abs(np.hypot(yy - 16, xx - 16) - 12) <= 1.5) & (yy < 20)
    labels = np.zeros((10 * 32, 15 * 32), np.int32)
    for i in range(150):
        y, x = divmod(i, 15)
        shape = arc if i % 3 == 2 else disc
        labels[y * 32 : (y + 1) * 32, x * 32 : (x + 1) * 32][shape] = i + 1
    whole = float(np.median(regionprops_table(labels, properties=("solidity",))["solidity"]))
    found = familiarity._median_solidity(labels)
    assert found is not None and abs(found - whole) < 0.01 and found > familiarity.SOLIDITY_MIN
    # a window filled by cells (no background pixel) keeps all of them: two Ls of
    # solidity 0.86 and 0.91 (the median of the second alone would be 0.91)
    full = np.full((8, 8), 2, np.int32)
    full[:, :4] = 1
    full[:4, 2:4] = 2
    assert familiarity._median_solidity(full) == pytest.approx((6 / 7 + 10 / 11) / 2)
    assert familiarity._median_solidity(np.ones((8, 8), np.int32)) == 1.0  # one cell
    assert familiarity._median_solidity(np.zeros((8, 8), np.int32)) is None
