"""Cells of any size: the size estimate's pyramid keeps the first level whose size the next
level confirms, and the bundled model counts synthetic nuclei of 6, 40 and 150 px at the
zoom that brings them to its training size."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import DATA, discs, save_threshold_model
from scipy import ndimage as ndi

from cellwatch import scale as scale_module
from cellwatch.config import Config, load_config, override
from cellwatch.errors import ConfigError
from cellwatch.model import load_model, write_card
from cellwatch.pipeline import Segmenter, process_image, read
from cellwatch.scale import (
    PYRAMID,
    Reading,
    choose_reading,
    choose_scale,
    diameter_range,
    is_close,
    large_nuclei_growth,
    single_cells,
    typical_diameter,
    working_diameter,
)
from cellwatch.storage import imageio
from cellwatch.training import matching
from cellwatch.training.targets import as_instances


def test_pieces_of_large_nuclei_lose_to_the_level_that_sees_them_whole():
    # 90 px nuclei: at 1 and ½ the network finds pieces of about its own size (20 px),
    # whose size in the image's pixels doubles as the zoom halves; from ¼ on, whole nuclei.
    readings = [Reading(1.0, 21.0), Reading(0.5, 43.0), Reading(0.25, 96.0), Reading(0.125, 103.0)]
    assert choose_reading(readings) == Reading(0.25, 96.0)
    assert choose_reading(readings[::-1]) == Reading(0.25, 96.0)  # any order
    # nuclei the network sees whole at its own scale: the first level, confirmed
    assert choose_reading([Reading(1.0, 45.0), Reading(0.5, 49.0)]) == Reading(1.0, 45.0)


def test_without_confirmation_the_largest_zoom_is_kept():
    assert choose_reading([]) is None
    assert choose_reading([Reading(1.0, 6.0)]) == Reading(1.0, 6.0)  # small nuclei
    # levels that are not neighbours (½ found too few cells) confirm nothing
    assert choose_reading([Reading(1.0, 30.0), Reading(0.25, 31.0)]) == Reading(1.0, 30.0)
    assert choose_reading([Reading(1.0, 20.0), Reading(0.5, 40.0)]) == Reading(1.0, 20.0)
    with pytest.raises(ValueError, match="agreement"):
        choose_reading([Reading(1.0, 6.0)], agreement=1.0)


def test_the_pyramid_reaches_nuclei_of_250_px_within_the_default_bounds():
    settings = Config().scale
    working = load_model().working_diameter_px  # the bundled model's
    assert min(PYRAMID) * 250 <= working  # the smallest level shows them at the model's size
    assert settings.min_scale <= working / 250


@pytest.mark.parametrize(
    ("settings", "image_pixel_size_um", "zoom"),
    [
        ({"diameter_px": 30.0}, None, 0.5),  # 30 px cells brought to 15
        ({}, 0.5, 0.75),  # cells 20 px across at 0.5 µm (the card) are 15 at 0.667 µm
        ({"scale": 2.0}, None, 2.0),  # a forced zoom is the zoom
    ],
)
def test_cells_reach_the_network_at_the_working_diameter(
    tmp_path, settings, image_pixel_size_um, zoom
):
    # trained at 20 px, measured to count as well at 15 (the card's working_diameter_px)
    path = save_threshold_model(tmp_path / "working.keras")
    write_card(path, {"diameter_px": 20.0, "working_diameter_px": 15.0, "pixel_size_um": 0.5})
    model = load_model(path)
    assert (model.diameter_px, model.working_diameter_px) == (20.0, 15.0)
    config = Config(scale=dataclasses.replace(Config().scale, **settings))
    image, _ = discs((96, 96), [(48, 48)], 15)
    result = Segmenter(config, model).segment(image, pixel_size_um=image_pixel_size_um)
    assert result.scale.scale == pytest.approx(zoom)


def nuclei(diameter: float, per_side: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An 8-bit image of ``per_side``² separate nuclei of ``diameter`` px on a dark
    background, and their labels. Each nucleus has its own brightness, a grainy texture
    (a tenth of its size) and three dark nucleoli, as real ones do: a network shown large
    ones at its own training size sees holes and edges inside them."""
    rng = np.random.default_rng(seed)
    pitch = round(diameter * 1.5) + 4
    side = pitch * per_side
    yy, xx = np.mgrid[:side, :side]
    labels = np.zeros((side, side), np.int32)
    dark = np.zeros((side, side), bool)
    radius = diameter / 2
    for k in range(per_side**2):
        cy = (k // per_side) * pitch + pitch // 2 + rng.integers(-2, 3)
        cx = (k % per_side) * pitch + pitch // 2 + rng.integers(-2, 3)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = k + 1
        for _ in range(3):
            angle, off = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.55) * radius
            hole = (yy - cy - off * np.sin(angle)) ** 2 + (xx - cx - off * np.cos(angle)) ** 2
            dark |= hole <= (0.15 * radius) ** 2
    brightness = rng.uniform(120, 200, per_side**2 + 1)
    grain = ndi.gaussian_filter(rng.normal(0, 1, (side, side)), max(1.0, diameter / 12))
    grain /= grain.std()
    inside = labels > 0
    image = brightness[labels] * (1 + 0.3 * grain) * np.where(dark, 0.35, 1.0) * inside + 12
    image = ndi.gaussian_filter(image, max(1.0, diameter / 40)) + rng.normal(0, 3, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), labels


@pytest.fixture(scope="module")
def bundled() -> Segmenter:
    return Segmenter(Config(), load_model())


@pytest.mark.parametrize(("diameter", "per_side"), [(6, 8), (40, 4), (150, 3)])
def test_nuclei_of_any_size_are_counted_at_the_right_scale(bundled, diameter, per_side):
    image, truth = nuclei(diameter, per_side)
    result = bundled.segment(image)
    assert result.scale.source == "estimated"
    # the size found is the nuclei's, and the zoom the one it asks for, within the 15 % at
    # which the estimate stops refining (an image's edges shift a small one by ~10 %)
    assert result.scale.diameter_px == pytest.approx(diameter, rel=0.2), result.scale
    target = bundled.model.working_diameter_px
    growth = large_nuclei_growth(bundled.config.scale, bundled.model.card)
    wanted = working_diameter(result.scale.diameter_px, target, growth) / result.scale.diameter_px
    assert is_close(result.scale.scale, wanted), result.scale
    assert result.labels.max() == truth.max()


@pytest.mark.parametrize("zoom", [1, 4])
def test_debris_is_dropped_at_any_magnification(sized_threshold_model, zoom):
    # four cells of 20 px and a speck of 3×3 px (under min_cell_area_px, 12), all zoomed:
    # at 4× the speck covers 144 of the image's pixels, but the network sees it 3×3 again
    centres = [(40 * zoom, 40 * zoom), (40 * zoom, 120 * zoom), (120 * zoom, 40 * zoom)]
    centres.append((120 * zoom, 120 * zoom))
    image, truth = discs((160 * zoom, 160 * zoom), centres, 10 * zoom)
    image[80 * zoom : 83 * zoom, 80 * zoom : 83 * zoom] = 200
    result = Segmenter(Config(), load_model(sized_threshold_model)).segment(image)
    assert result.scale.scale == pytest.approx(1 / zoom, rel=0.15)
    assert result.labels.max() == truth.max() == 4


ND2 = DATA.parent / "vendor" / "example-multichannel.nd2"  # PBMC, DAPI nuclei ~20 px


def never_estimate() -> float | None:
    raise AssertionError("the estimate ran although the scale was known")


@pytest.mark.parametrize(
    ("settings", "image_pixel_size_um", "source", "diameter_px"),
    [
        ({"nucleus_diameter_um": 6.5}, 0.325, "pixel_size", 20.0),  # the file's pixel size
        ({"nucleus_diameter_um": 6.5, "pixel_size_um": 0.65}, 0.325, "pixel_size", 10.0),
        ({"nucleus_diameter_um": 6.5, "diameter_px": 30.0}, 0.325, "config", 30.0),
        ({}, 0.325, "estimated", 16.0),  # no nucleus size: the pixel size alone says nothing
        ({"nucleus_diameter_um": 6.5}, None, "estimated", 16.0),  # no pixel size: estimated
    ],
)
def test_a_known_nucleus_size_and_pixel_size_set_the_scale(
    settings, image_pixel_size_um, source, diameter_px
):
    choice = choose_scale(
        dataclasses.replace(Config().scale, **settings),
        model_diameter_px=20.0,
        model_pixel_size_um=None,
        image_pixel_size_um=image_pixel_size_um,
        estimate_diameter=(lambda: 16.0) if source == "estimated" else never_estimate,
    )
    assert (choice.source, choice.diameter_px) == (source, pytest.approx(diameter_px))
    assert choice.scale == pytest.approx(20.0 / diameter_px)


@pytest.mark.skipif(not DATA.exists(), reason="shared data not present")
def test_the_real_nd2_scale_from_its_pixel_size_and_the_nucleus_size(tmp_path):
    config = override(Config(), **{"input.channel": "DAPI", "scale.nucleus_diameter_um": 6.5})
    row = process_image(
        ND2, config=config, segmenter=bundled_with(config), out_dir=tmp_path, job_id="nd2"
    ).row
    assert row["status"] == "ok" and row["scale_source"] == "pixel_size"
    assert row["pixel_size_um"] == pytest.approx(0.3234, abs=1e-4)
    assert row["diameter_px"] == pytest.approx(6.5 / 0.3234, rel=1e-3)


@pytest.mark.skipif(not DATA.exists(), reason="shared data not present")
def test_the_estimate_on_few_dim_sparse_nuclei_does_not_settle_on_specks():
    # the real ND2's DAPI channel: 8 dim nuclei ~20 px across among bright specks of 2-5 px
    config = override(Config(), **{"input.channel": "DAPI"})
    image = read(ND2, config)
    assert image.pixel_size_um is not None  # known, but no nucleus size is configured
    choice = bundled_with(config).segment(image.pixels, image.pixel_size_um).scale
    assert choice.source == "estimated" and 15.0 <= choice.diameter_px <= 26.0


def test_specks_and_clumps_are_not_single_cells():
    specks_and_nuclei = np.array([2.0, 3, 4, 4, 5, 5, 6, 7, 18, 20, 21, 22, 25])
    assert typical_diameter_of(specks_and_nuclei) == pytest.approx(21.0)
    assert single_cells(np.array([6.0, 7, 8]), np.ones(3)).tolist() == [6.0, 7.0, 8.0]


def test_with_the_clump_rule_on_waisted_objects_are_left_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # five round nuclei of 16 px (solidity 0.92) and five pairs of touching ones (0.84,
    # equivalent diameter 22 px), which raise the median when they count
    labels = np.zeros((80, 500), np.int32)
    yy, xx = np.mgrid[:80, :500]
    for i in range(5):
        labels[(yy - 20) ** 2 + (xx - 20 - 40 * i) ** 2 <= 64] = i + 1
        for dx in (0, 15):
            labels[(yy - 60) ** 2 + (xx - 20 - 90 * i - dx) ** 2 <= 64] = i + 6
    single = np.sqrt(4 * np.count_nonzero(labels == 1) / np.pi)
    assert typical_diameter(labels) > single + 2  # the clump rule is off by default
    monkeypatch.setattr(scale_module, "SOLIDITY_MIN", 0.9)
    assert typical_diameter(labels) == pytest.approx(single)


def typical_diameter_of(diameters: np.ndarray) -> float | None:
    """:func:`typical_diameter` of separate discs of these diameters."""
    side = int(sum(diameters) + 4 * len(diameters) + 8)
    labels = np.zeros((64, side), np.int32)
    yy, xx = np.mgrid[:64, :side]
    x = 4.0
    for i, d in enumerate(diameters, start=1):
        labels[(yy - 32) ** 2 + (xx - x - d / 2) ** 2 <= (d / 2) ** 2] = i
        x += d + 4
    found = typical_diameter(labels)
    return None if found is None else round(found)


def bundled_with(config: Config) -> Segmenter:
    return Segmenter(config, load_model(config.model.path))


def test_a_nucleus_size_must_be_positive(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("scale:\n  nucleus_diameter_um: 0\n")
    with pytest.raises(ConfigError, match=r"scale\.nucleus_diameter_um.*must be positive"):
        load_config(path)


def test_large_nuclei_are_zoomed_down_less_the_larger_the_growth():
    target = 20.0
    for diameter in (4.0, 12.0, 20.0):  # small nuclei reach the model at its size, any growth
        assert {working_diameter(diameter, target, g) for g in (0.0, 0.5, 1.0)} == {target}
    assert working_diameter(45.0, target, 0.0) == target  # growth 0: as before
    assert working_diameter(45.0, target, 0.5) == pytest.approx(30.0)
    assert working_diameter(30.0, target, 1.0) == pytest.approx(30.0)  # not zoomed down
    assert working_diameter(300.0, target, 1.0) == 2 * target  # never past twice the target
    sizes = np.geomspace(5, 400, 60)
    for growth in (0.0, 0.3, 0.5, 0.75, 1.0):
        working = np.array([working_diameter(d, target, growth) for d in sizes])
        zoom = working / sizes
        assert np.all(np.diff(working) >= 0)  # larger nuclei never reach it smaller ...
        assert np.all(np.diff(zoom) <= 1e-12)  # ... nor zoomed less
        assert np.all((working >= target) & (working <= 2 * target))
    with pytest.raises(ValueError, match="growth"):
        working_diameter(45.0, target, 1.5)


def test_the_growth_comes_from_the_config_else_the_card_and_applies_to_known_sizes():
    settings = Config().scale
    assert large_nuclei_growth(settings, {}) == 0.0
    assert large_nuclei_growth(settings, {"large_nuclei_growth": 0.5}) == 0.5
    assert large_nuclei_growth(settings, {"large_nuclei_growth": "big"}) == 0.0
    mine = dataclasses.replace(settings, large_nuclei_growth=0.25)
    assert large_nuclei_growth(mine, {"large_nuclei_growth": 0.5}) == 0.25
    for extra, source in [
        ({"diameter_px": 45.0}, "config"),
        ({"nucleus_diameter_um": 4.5, "pixel_size_um": 0.1}, "pixel_size"),
        ({}, "estimated"),
    ]:
        choice = choose_scale(
            dataclasses.replace(settings, **extra),
            model_diameter_px=20.0,
            model_pixel_size_um=None,
            image_pixel_size_um=None,
            estimate_diameter=lambda: 45.0,
            growth=0.5,
        )
        assert (choice.source, choice.diameter_px) == (source, pytest.approx(45.0))
        assert choice.scale == pytest.approx(30.0 / 45.0)  # 45 px nuclei brought to 30
    forced = dataclasses.replace(settings, scale=0.4)  # an explicit zoom stays as it is
    choice = choose_scale(
        forced,
        model_diameter_px=20.0,
        model_pixel_size_um=None,
        image_pixel_size_um=None,
        estimate_diameter=never_estimate,
        growth=0.5,
    )
    assert choice.scale == 0.4


@pytest.mark.parametrize("growth", [-0.1, 1.5])
def test_a_growth_outside_0_to_1_is_refused(tmp_path, growth):
    path = tmp_path / "config.yaml"
    path.write_text(f"scale:\n  large_nuclei_growth: {growth}\n")
    with pytest.raises(ConfigError, match="large_nuclei_growth"):
        load_config(path)


@pytest.mark.skipif(not DATA.exists(), reason="shared data not present")
def test_a_field_of_touching_large_nuclei_counts_better_zoomed_down_less():
    # a held-out Data Science Bowl field (val): 28 touching nuclei, median 43 px, estimated
    # at 47 px; zoomed all the way to the model's 20 px, small neighbours shrink to specks
    # and touching pairs merge (24 counted, 21 matched at IoU 0.5)
    name = "3441821ebea0.tif"
    truth = as_instances(imageio.read_image(DATA / "val" / "masks" / name).pixels)
    pixels = imageio.read_image(DATA / "val" / "images" / name).pixels
    model = load_model()
    assert large_nuclei_growth(Config().scale, model.card) == 0.0  # the default: as before
    found = {}
    for growth in (None, 0.5):  # the default; the growth cross-validation chose on train
        config = override(Config(), **{"scale.large_nuclei_growth": growth})
        result = Segmenter(config, model).segment(pixels)
        at_half = matching.match(truth, result.labels, thresholds=(0.5,))[0]
        found[growth] = (int(result.labels.max()), at_half.tp, result.scale.scale)
    true_count = int(truth.max())
    (before, matched_before, zoom_before), (now, matched_now, zoom_now) = found.values()
    assert zoom_now > zoom_before * 1.3, found  # zoomed down less
    assert abs(now - true_count) < abs(before - true_count), found
    assert matched_now > matched_before, found


def test_an_estimate_outside_the_corrections_range_is_brought_to_its_nearest_end():
    settings = Config().scale
    card = {"corrections_diameter_px": {"low": 17.0, "median": 24.0, "high": 41.5}}
    assert diameter_range(settings, card) == (17.0, 41.5)

    def choice(estimate: float, extra: dict | None = None) -> scale_module.ScaleChoice:
        mine = dataclasses.replace(settings, **(extra or {}))
        return choose_scale(
            mine,
            model_diameter_px=20.0,
            model_pixel_size_um=None,
            image_pixel_size_um=None,
            estimate_diameter=lambda: estimate,
            diameter_range=diameter_range(mine, card),
        )

    # 15 px nuclei merged into blobs at the pyramid's small zooms, read as 102 px
    assert (choice(102.0).diameter_px, choice(102.0).scale) == (41.5, pytest.approx(20 / 41.5))
    assert choice(6.0).diameter_px == 17.0  # large nuclei broken into pieces
    assert choice(30.0).diameter_px == 30.0  # within the range: as estimated
    assert choice(102.0).source == "estimated"
    # a size the config gives is taken as it is; the config's range wins over the card's
    assert choice(102.0, {"diameter_px": 60.0}).diameter_px == 60.0
    assert choice(102.0, {"diameter_range_px": (10.0, 80.0)}).diameter_px == 80.0
    assert choice(102.0, {"diameter_range_px": False}).diameter_px == 102.0


def test_without_corrections_in_the_card_the_estimate_is_as_before():
    settings = Config().scale
    assert diameter_range(settings, load_model().card) is None  # the bundled model
    for card in ({}, {"corrections_diameter_px": {"low": 0, "high": 5}}, {"large": 1}):
        assert diameter_range(settings, {"corrections_diameter_px": "x"} | card) is None


def test_the_range_is_checked_and_changes_the_settings_hash(tmp_path):
    path = tmp_path / "config.yaml"
    hashes = set()
    for value in ("null", "false", "[12, 45]", "[12, 50]"):
        path.write_text(f"scale:\n  diameter_range_px: {value}\n")
        hashes.add(load_config(path).settings_hash())
    assert len(hashes) == 4
    path.write_text("scale:\n  diameter_range_px: off\n")  # YAML's off is false
    assert load_config(path).scale.diameter_range_px is False
    path.write_text("scale:\n  diameter_range_px: [12, 50]\n")
    assert load_config(path).scale.diameter_range_px == (12.0, 50.0)
    for bad in ("[45, 12]", "[12]", "[0, 12]", "big", "0", "true"):
        path.write_text(f"scale:\n  diameter_range_px: {bad}\n")
        with pytest.raises(ConfigError, match="diameter_range_px"):
            load_config(path)


def test_a_fine_tuned_models_range_sets_the_zoom_of_an_image_it_misjudges(
    tmp_path, sized_threshold_model
):
    # discs of 40 px; the corrections' nuclei were 10 to 20 px: the estimate (40 px) is
    # brought to 20 px, and the image is counted at its own scale instead of halved
    image, _ = discs((200, 200), [(50, 50), (50, 150), (150, 50), (150, 150)], 20)
    plain = Segmenter(Config(), load_model(sized_threshold_model)).segment(image).scale
    assert plain.diameter_px == pytest.approx(40, rel=0.1)
    tuned = tmp_path / "tuned.keras"
    tuned.write_bytes(sized_threshold_model.read_bytes())
    card = load_model(sized_threshold_model).card
    write_card(tuned, card | {"corrections_diameter_px": {"low": 10.0, "high": 20.0}})
    chosen = Segmenter(Config(), load_model(tuned)).segment(image).scale
    assert (chosen.diameter_px, chosen.scale) == (20.0, 1.0)
