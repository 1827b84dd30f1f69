"""The seed head: a learned inner-distance map beside the three classes, whose peaks seed
the cells, so touching nuclei with no gap between them still come out as two."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import discs
from scipy import ndimage as ndi
from test_train import TINY, make_dataset, train

from cellwatch.config import Config, load_config
from cellwatch.errors import ConfigError, ModelError
from cellwatch.model import build_unet, load_model, with_seed_head, write_card
from cellwatch.pipeline import Segmenter
from cellwatch.postprocess import labels_from_probabilities
from cellwatch.preprocess import normalize
from cellwatch.training import matching
from cellwatch.training.targets import inner_distance
from cellwatch.training.train import (
    Sample,
    make_losses,
    random_crop,
    random_crop_maps,
    targets,
)

POST = Config().postprocess  # the configured thresholds, as the pipeline uses them


def touching_discs(shape=(48, 72), centres=((24, 24), (24, 46)), radius=12.0) -> np.ndarray:
    """Two discs of radius 12 whose centres are 22 px apart: they share a stretch of
    outline with no background between them (the overlap goes to the first)."""
    _, labels = discs(shape, list(centres), radius)
    first = discs(shape, [centres[0]], radius)[1] > 0
    labels[first] = 1
    return labels


def clump_probabilities(truth: np.ndarray) -> np.ndarray:
    """Three-class maps that see one clump: confident interior over both cells and
    boundary only around the clump's outside, none where the cells touch."""
    inside = truth > 0
    outline = inside & ~ndi.binary_erosion(inside)
    probs = np.zeros((*truth.shape, 3), np.float32)
    probs[..., 0] = ~inside
    probs[..., 1] = inside & ~outline
    probs[..., 2] = outline
    return probs


# --- the target -----------------------------------------------------------------------


def test_inner_distance_is_one_at_each_centre_and_low_where_cells_touch():
    truth = touching_discs()
    distance = inner_distance(truth)
    assert distance.dtype == np.float32
    assert distance[truth == 0].max() == 0.0
    for cell in (1, 2):  # normalized per cell
        assert distance[truth == cell].max() == 1.0
        assert distance[truth == cell].min() > 0.0
    assert distance[24, 24] > 0.9 and distance[24, 46] > 0.9
    left = (truth == 1) & (np.roll(truth, -1, axis=1) == 2)  # pixels where 1 meets 2
    assert left.any() and distance[left].max() <= 1 / 10  # the rim: 1 / depth
    # a small and a large cell both reach 1: the map does not depend on size
    _, sizes = discs((80, 80), [(20, 20), (50, 50)], 6)
    _, big = discs((80, 80), [(50, 50)], 25)
    sizes[big > 0] = 2
    d = inner_distance(sizes)
    assert d[sizes == 1].max() == 1.0 and d[sizes == 2].max() == 1.0


def test_inner_distance_ignores_gaps_in_label_ids():
    labels = np.zeros((9, 9), np.int32)
    labels[1:4, 1:4], labels[5:8, 5:8] = 3, 70
    d = inner_distance(labels)
    assert d[2, 2] == 1.0 and d[6, 6] == 1.0 and d[1, 1] == 0.5


def test_crops_carry_the_whole_images_distance_and_draw_the_same_crops():
    """A cell cut by the crop keeps its own centre (the map is made on the whole image,
    not on the crop), and a run with the head sees the very crops a run without it does."""
    _, labels = discs((96, 96), [(30, 30), (30, 52), (70, 60)], 11)
    image = (labels > 0).astype(np.float32)
    distance = inner_distance(labels)
    plain = Sample("s", image, labels, 1.0)
    headed = Sample("s", image, labels, 1.0, distance)
    for seed in range(5):
        x0, y0 = random_crop(plain, np.random.default_rng(seed), 40, augment=True)
        x1, y1, d1 = random_crop_maps(headed, np.random.default_rng(seed), 40, augment=True)
        np.testing.assert_array_equal(x0, x1)
        np.testing.assert_array_equal(y0, y1)
        assert d1.shape == y1.shape and (d1[y1 == 0] < 0.5).all()
    # without augmentation the crop is a plain window: the map is the window of the whole
    # image's map, also for a cell the window cuts (a disc wider than the crop)
    _, big = discs((96, 96), [(48, 48)], 30)
    ramp = np.arange(96 * 96, dtype=np.float32).reshape(96, 96)  # finds the window
    whole = inner_distance(big)
    sample = Sample("big", ramp, big, 1.0, whole)
    for seed in range(3):
        crop_image, _, crop_distance = random_crop_maps(
            sample, np.random.default_rng(seed), 40, augment=False
        )
        y, x = divmod(int(crop_image[0, 0]), 96)
        np.testing.assert_array_equal(crop_image, ramp[y : y + 40, x : x + 40])
        np.testing.assert_allclose(crop_distance, whole[y : y + 40, x : x + 40], atol=1e-6)


def test_targets_and_loss_carry_the_distance_channel():
    truth = touching_discs()
    distance = inner_distance(truth)
    y = targets(truth, 3, distance=distance)
    assert y.shape == (*truth.shape, 4)
    np.testing.assert_array_equal(y[..., 3], distance)
    np.testing.assert_array_equal(y[..., :3], targets(truth, 3))
    weighted = targets(truth, 3, 5.0, distance=distance)
    assert weighted.shape == (*truth.shape, 5) and weighted[..., 4].max() == 5.0
    loss, dice = make_losses("ce+dice", seed_head=True)
    plain_loss, plain_dice = make_losses("ce+dice")
    good = y.copy()
    good[..., :3] = np.clip(good[..., :3], 1e-4, 1)
    wrong = good.copy()
    wrong[..., 3] = 1 - wrong[..., 3]
    assert float(loss(y[None], wrong[None])) > float(loss(y[None], good[None])) + 1
    # the classes' part is the loss without a head, and the dice metric ignores the head
    classes_only = float(plain_loss(y[None, ..., :3], good[None, ..., :3]))
    seed_part = float(loss(y[None], good[None])) - classes_only
    assert 0 < seed_part < 1  # soft targets: binary cross-entropy of a perfect map > 0
    assert float(dice(y[None], wrong[None])) == pytest.approx(
        float(plain_dice(y[None, ..., :3], good[None, ..., :3]))
    )
    weighted_loss, _ = make_losses("ce", weighted=True, seed_head=True)
    assert np.isfinite(float(weighted_loss(weighted[None], good[None])))


# --- the model ------------------------------------------------------------------------


def test_a_seed_head_keeps_the_models_three_class_output():
    network = build_unet(depth=2, filters=4)
    headed = with_seed_head(network, seed=0)
    x = np.random.default_rng(0).random((1, 32, 32, 1), dtype=np.float32)
    before = np.asarray(network(x))
    after = np.asarray(headed(x))
    assert after.shape == (1, 32, 32, 4)
    np.testing.assert_allclose(after[..., :3], before, atol=1e-6)
    assert ((after[..., 3] > 0) & (after[..., 3] < 1)).all()
    assert build_unet(depth=2, filters=4, seed_head=True).output_shape[-1] == 4
    with pytest.raises(ModelError, match="three classes"):
        with_seed_head(build_unet(depth=2, filters=4, classes=1))


def save_seed_model(
    path: Path,
    *,
    seed_head: bool = True,
    card: dict | None = None,
    seed_weights: tuple[float, float] = (20.0, -14.0),
) -> Path:
    """Hand-set 1×1 weights: the classes call every pixel brighter than 0.2 (normalized)
    interior, so two touching bright discs are one clump to them; the seed channel
    rises with the intensity (0.5 at 0.7), so a dimmer seam between the discs is a
    valley in the seed map. With ``seed_head=False``, the same classes alone."""
    import keras
    from keras import layers

    inputs = keras.Input((None, None, 1))
    classes = layers.Conv2D(3, 1, activation="softmax", name="classes")
    out = classes(inputs)
    classes.set_weights([np.array([[[[-100.0, 100.0, 0.0]]]]), np.array([20.0, -20.0, -50.0])])
    if seed_head:
        distance = layers.Conv2D(1, 1, activation="sigmoid", name="inner_distance")
        out = layers.Concatenate(name="probabilities")([out, distance(inputs)])
        distance.set_weights([np.array([[[[seed_weights[0]]]]]), np.array([seed_weights[1]])])
    keras.Model(inputs, out).save(path)
    if card is None:
        card = {"name": path.stem, **({"seed_map": "inner_distance"} if seed_head else {})}
    write_card(path, card)
    return path


def seam_image(truth: np.ndarray) -> np.ndarray:
    """Bright discs, brightest at their centres, dimmer (but well above the background)
    where they touch: what a stained clump of two nuclei looks like."""
    return np.where(truth > 0, 90 + 160 * inner_distance(truth), 5).astype(np.uint8)


def test_pipeline_splits_touching_cells_on_the_seed_map(tmp_path):
    truth = touching_discs()
    image = seam_image(truth)
    model = load_model(save_seed_model(tmp_path / "seeded.keras"))
    assert model.classes == 4 and model.seed_map == "inner_distance"
    result = Segmenter(Config(), model).segment(image)
    assert result.labels.max() == 2
    [at] = matching.match(truth, result.labels, thresholds=(0.7,))
    assert at.tp == 2
    # the same classes without the head (today's three-class path) see one clump
    plain = load_model(save_seed_model(tmp_path / "plain.keras", seed_head=False))
    assert plain.classes == 3
    assert Segmenter(Config(), plain).segment(image).labels.max() == 1


def test_pipeline_tiles_carry_the_seed_map(tmp_path):
    """Many touching pairs over several tiles: each pair still gives two cells."""
    centres, pairs = [], 0
    for cy in range(20, 300, 45):
        for cx in range(20, 300, 70):
            centres += [(cy, cx), (cy, cx + 22)]
            pairs += 1
    truth = np.zeros((320, 330), np.int32)
    for i in range(pairs):
        pair = touching_discs((320, 330), (centres[2 * i], centres[2 * i + 1]))
        truth[pair > 0] = pair[pair > 0] + 2 * i
    model = load_model(save_seed_model(tmp_path / "seeded.keras"))
    config = Config()
    config = dataclasses.replace(
        config, tiling=dataclasses.replace(config.tiling, tile_size=128, overlap=32)
    )
    labels = Segmenter(config, model).segment(seam_image(truth)).labels
    [at] = matching.match(truth, labels, thresholds=(0.7,))
    assert labels.max() == 2 * pairs and at.tp == 2 * pairs


def test_the_size_estimate_reads_the_classes_not_the_seed_map(tmp_path):
    """The seed map is normalized per cell, so at a wrong scale it breaks a large nucleus
    into pieces of the trained size; the estimate labels with the three classes. Here the
    seed map is empty: an estimate that read it would find nothing."""
    path = save_seed_model(
        tmp_path / "blind.keras",
        card={"seed_map": "inner_distance", "diameter_px": 20.0},
        seed_weights=(0.0, -10.0),
    )
    model = load_model(path)
    image, _ = discs((256, 256), [(60, 60), (60, 170), (170, 100), (180, 200)], 20)
    diameter = Segmenter(Config(), model).estimate_diameter(normalize(image))
    assert diameter is not None and diameter == pytest.approx(40, rel=0.1)


def test_a_card_naming_an_unknown_seed_map_is_refused(tmp_path):
    path = save_seed_model(tmp_path / "odd.keras", card={"seed_map": "flows"})
    with pytest.raises(ModelError, match="seed map 'flows'"):
        load_model(path)
    plain = save_seed_model(tmp_path / "plain.keras", seed_head=False)
    write_card(plain, {"seed_map": "inner_distance"})
    with pytest.raises(ModelError, match="not 4"):
        load_model(plain)


# --- post-processing ------------------------------------------------------------------


def test_two_touching_discs_with_no_gap_give_two_cells():
    truth = touching_discs()
    three = clump_probabilities(truth)
    merged = labels_from_probabilities(
        three,
        interior_threshold=POST.interior_threshold,
        foreground_threshold=POST.foreground_threshold,
        split_threshold=POST.split_threshold,
        split_min_area=POST.split_min_area_px,
    )
    assert merged.max() == 1  # the three classes alone cannot split them
    # the target itself, smoothed, and as the CPU fine-tune learned it (docs/model.md):
    # about 0.15 on the background and 0.9 at the centres
    exact = inner_distance(truth)
    maps = {
        "target": exact,
        "smoothed": ndi.gaussian_filter(exact, 1.5),
        "learned": 0.15 + 0.75 * ndi.gaussian_filter(exact, 1.5),
    }
    for kind, seed_map in maps.items():
        four = np.concatenate([three, seed_map[..., None]], axis=-1)
        labels = labels_from_probabilities(
            four,
            foreground_threshold=POST.foreground_threshold,
            distance_threshold=POST.distance_threshold,
            distance_split_threshold=POST.distance_split_threshold,
            split_min_area=POST.split_min_area_px,
        )
        assert labels.max() == 2, kind
        [at] = matching.match(truth, labels, thresholds=(0.8,))
        assert at.tp == 2, kind  # each disc found whole, with its own outline


def test_a_lone_disc_stays_one_cell_on_its_seed_map():
    _, truth = discs((40, 40), [(20, 20)], 14)
    four = np.concatenate([clump_probabilities(truth), inner_distance(truth)[..., None]], axis=-1)
    labels = labels_from_probabilities(four, foreground_threshold=0.8, distance_threshold=0.5)
    assert labels.max() == 1


def test_the_seed_map_alone_does_not_make_a_cell_on_the_background():
    """The sigmoid seed map is not exclusive with the background class: a half-trained
    map is high on some backgrounds. Cells lie where the classes see foreground."""
    _, truth = discs((40, 60), [(20, 20)], 12)
    four = np.concatenate([clump_probabilities(truth), inner_distance(truth)[..., None]], -1)
    four[5:15, 40:55, 3] = 0.9  # a bright patch of background in the seed map
    labels = labels_from_probabilities(four, foreground_threshold=0.8, distance_threshold=0.7)
    assert labels.max() == 1 and (labels[5:15, 40:55] == 0).all()


# --- settings and training ------------------------------------------------------------


def test_seed_thresholds_are_validated(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("postprocess:\n  distance_threshold: 0.6\n  distance_split_threshold: 0.5\n")
    with pytest.raises(ConfigError, match="distance_split_threshold"):
        load_config(path)
    path.write_text("postprocess:\n  distance_threshold: 1.5\n")
    with pytest.raises(ConfigError, match="distance_threshold"):
        load_config(path)


def test_train_adds_a_seed_head_to_a_model(tmp_path, capsys):
    images, masks = make_dataset(tmp_path / "data", n=2)
    plain = tmp_path / "plain.keras"
    options = ("--crop", "64", "--batch-size", "2", "--epochs", "1", "--steps", "2")
    assert train(images, masks, plain, *TINY, *options) == 0
    tuned = tmp_path / "tuned.keras"
    assert train(images, masks, tuned, *options, "--from", str(plain), "--seed-head") == 0
    model = load_model(tuned)
    assert model.classes == 4
    card = json.loads(tuned.with_suffix(".json").read_text())
    assert card["seed_map"] == "inner_distance" and card["settings"]["seed_head"]
    assert card["classes"] == ["background", "interior", "boundary"]
    # fine-tuning a seed-head model on: with the flag it trains, without it is refused
    again = tmp_path / "again.keras"
    assert train(images, masks, again, *options, "--from", str(tuned), "--seed-head") == 0
    assert train(images, masks, tmp_path / "x.keras", *options, "--from", str(tuned)) != 0
    assert "4 output channels, but training without --seed-head needs 3" in capsys.readouterr().err
