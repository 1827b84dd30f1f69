from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tifffile
from conftest import discs

from cellwatch import familiarity
from cellwatch.cli import main
from cellwatch.config import Config
from cellwatch.errors import ConfigError
from cellwatch.model import load_model
from cellwatch.pipeline import Segmenter
from cellwatch.runtime import predict_fn
from cellwatch.storage.imageio import find_pairs
from cellwatch.training.train import Sample, TrainSettings, crop_batches, random_crop


def make_dataset(root, n=4, binary=False):
    rng = np.random.default_rng(0)
    (root / "image").mkdir(parents=True)
    (root / "image_segment").mkdir()
    for i in range(n):
        centres = [tuple(rng.integers(12, 116, 2)) for _ in range(8)]
        image, labels = discs((128, 128), centres, 7)
        noisy = np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)
        tifffile.imwrite(root / "image" / f"img{i}.tif", noisy)
        mask = (labels > 0).astype(np.uint8) * 255 if binary else labels.astype(np.uint16)
        tifffile.imwrite(root / "image_segment" / f"img{i}.tif", mask)
    return root / "image", root / "image_segment"


def train(images, masks, out, *options: str) -> int:
    """``cellwatch train`` through the real command line."""
    return main(
        ["train", "--images", str(images), "--masks", str(masks), "--out", str(out), *options]
    )


TINY = ("--depth", "2", "--filters", "4", "--crop", "64", "--batch-size", "4")


def test_train_tiny_model_loss_falls_and_model_predicts(tmp_path):
    images, masks = make_dataset(tmp_path / "data", binary=True)
    out = tmp_path / "tiny.keras"
    options = ("--epochs", "5", "--steps", "8", "--learning-rate", "0.01", "--diameter", "14")
    assert train(images, masks, out, *TINY, *options) == 0
    with out.with_suffix(".history.csv").open() as handle:
        losses = [float(row["loss"]) for row in csv.DictReader(handle)]
    assert len(losses) == 5 and min(losses[-2:]) < losses[0]  # one noisy epoch may not fall
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["diameter_px"] == 14 and card["settings"]["depth"] == 2
    assert card["receptive_field"]["grid_px"] == 4  # depth 2
    assert 0 < card["receptive_field"]["radius_px"] < 64
    assert "--diameter 14" in card["command"]
    # its own training images are what its familiarity compares with: each row gets one
    brightness = card[familiarity.CARD_KEY]["brightness"]
    assert len(brightness) == len(familiarity.TAILS) and brightness[0] >= brightness[-1]
    image = tifffile.imread(images / "img0.tif")
    seen = Segmenter(Config(), load_model(out)).segment(image).familiarity
    assert seen.score is not None and 0 <= seen.score <= 1
    assert out.with_suffix(".loss.png").exists()
    assert out.stat().st_size < out.with_suffix(".last.keras").stat().st_size  # no optimizer state
    model = load_model(out)
    probs = predict_fn(model)(np.zeros((2, 64, 64, 1), np.float32))
    assert probs.shape == (2, 64, 64, 3)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-4)

    # resume continues from the last checkpoint; fine-tuning starts from the saved model
    assert train(images, masks, out, *TINY, "--epochs", "6", "--steps", "2", "--resume") == 0
    with out.with_suffix(".history.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 6
    tuned = tmp_path / "tuned.keras"
    assert (
        train(
            images,
            masks,
            tuned,
            "--from",
            str(out),
            "--crop",
            "64",
            "--epochs",
            "1",
            "--steps",
            "2",
            "--contact-weight",
            "5",
        )
        == 0
    )
    assert load_model(tuned).classes == 3
    assert json.loads(tuned.with_suffix(".json").read_text())["settings"]["contact_weight"] == 5


def test_contact_band_marks_where_cells_meet_and_nowhere_else():
    from cellwatch.training.targets import contact_band

    labels = np.zeros((20, 40), np.int32)
    labels[5:15, 2:10] = 1  # alone
    labels[5:15, 14:20] = 2  # touches 3
    labels[5:15, 20:26] = 3
    labels[5:15, 28:36] = 4  # two background pixels from 3
    band = contact_band(labels)
    assert not band[:, :12].any()  # the lone cell
    assert band[5:15, 18:22].all() and not band[:, 14:17].any()  # two pixels each side of 2|3
    assert band[5:15, 26:28].all()  # the gap between 3 and 4, background included
    assert not band[:3].any() and not band[17:].any()
    assert not contact_band(np.zeros((5, 5), np.int32)).any()


def test_weighted_cross_entropy_scales_with_the_weight_channel():
    from cellwatch.training.train import make_losses, targets

    labels = np.zeros((16, 16), np.int32)
    labels[2:8, 2:8], labels[2:8, 8:14] = 1, 2
    plain = targets(labels, 3)
    weighted = targets(labels, 3, contact_weight=4.0)
    assert weighted.shape == (16, 16, 4)
    np.testing.assert_array_equal(weighted[..., :3], plain)
    assert set(np.unique(weighted[..., 3])) == {1.0, 4.0}
    rng = np.random.default_rng(0)
    pred = rng.dirichlet([1, 1, 1], (1, 16, 16)).astype(np.float32)
    loss, dice = make_losses("ce+dice")
    loss_w, dice_w = make_losses("ce+dice", weighted=True)
    ones = np.concatenate([plain, np.ones((16, 16, 1), np.float32)], axis=-1)
    same = float(loss_w(ones[None], pred))
    assert same == pytest.approx(float(loss(plain[None], pred)), rel=1e-5)
    assert float(loss_w(weighted[None], pred)) > same
    assert float(dice_w(weighted[None], pred)) == pytest.approx(float(dice(plain[None], pred)))


def test_train_seed_architecture(tmp_path):
    images, masks = make_dataset(tmp_path / "data", n=2)
    out = tmp_path / "seed.keras"
    assert (
        train(
            images,
            masks,
            out,
            "--arch",
            "seed",
            "--batch-size",
            "1",
            "--epochs",
            "1",
            "--steps",
            "1",
        )
        == 0
    )
    model = load_model(out)
    assert model.classes == 1
    assert json.loads(out.with_suffix(".json").read_text())["architecture"] == "seed"


def test_unpaired_files_are_named(tmp_path):
    images, masks = make_dataset(tmp_path / "data", n=2)
    (images / "extra.tif").write_bytes((images / "img0.tif").read_bytes())
    (masks / "img1.tif").unlink()
    with pytest.raises(ConfigError, match=r"images without a mask: extra, img1"):
        find_pairs(images, masks)
    assert train(images, masks, tmp_path / "m.keras") == 2


def test_crops_keep_image_and_labels_aligned():
    rng = np.random.default_rng(3)
    image, labels = discs((90, 70), [(30, 30), (60, 40)], 9)
    sample = Sample("x", image.astype(np.float32) / 200, labels, 1.0)
    for _ in range(20):
        crop_image, crop_labels = random_crop(sample, rng, 64, augment=False)
        assert crop_image.shape == crop_labels.shape == (64, 64)
        assert ((crop_image > 0.5) == (crop_labels > 0)).all()


def test_batches_depend_on_seed_epoch_and_index_only():
    image, labels = discs((90, 70), [(30, 30), (60, 40)], 9)
    samples = [Sample("x", image.astype(np.float32) / 200, labels, 1.0)]
    settings = TrainSettings(crop=32, batch_size=2, steps_per_epoch=3)
    crops = crop_batches(samples, settings, 3, seed=7)
    first = crops[1]
    crops[0]  # drawing another batch first does not change batch 1
    np.testing.assert_array_equal(crops[1][0], first[0])
    # a resumed run starting at epoch 1 draws what the first run draws in its epoch 1
    crops.on_epoch_end()
    resumed = crop_batches(samples, settings, 3, seed=7, first_epoch=1)
    np.testing.assert_array_equal(resumed[1][0], crops[1][0])
    assert not np.array_equal(crops[1][0], first[0])  # a new epoch draws new crops


def test_shot_noise_makes_noisy_normalized_crops_and_leaves_others_as_they_were():
    image, labels = discs((96, 96), [(30, 30), (60, 60)], 12)
    sample = Sample("x", image.astype(np.float32) / image.max(), labels, 1.0)

    def crop(seed: int, share: float) -> tuple[np.ndarray, np.ndarray]:
        return random_crop(sample, np.random.default_rng(seed), 64, True, shot_noise=share)

    # a share of 0 draws nothing more, so a model's documented command keeps its crops
    for seed in range(5):
        plain = random_crop(sample, np.random.default_rng(seed), 64, augment=True)
        np.testing.assert_array_equal(crop(seed, 0.0)[0], plain[0])
    noisy, clean = [crop(seed, 1.0) for seed in range(20)], [crop(seed, 0.0) for seed in range(20)]
    assert all(not np.array_equal(n[0], c[0]) for n, c in zip(noisy, clean, strict=True))
    for image, crop_labels in noisy:  # still normalized, cells still brighter than background
        assert np.isfinite(image).all() and -3 < np.median(image) < 3
        if (crop_labels > 0).any() and (crop_labels == 0).any():
            assert image[crop_labels > 0].mean() > image[crop_labels == 0].mean()


def test_photon_limited_exposure_has_shot_noise():
    from cellwatch.training.train import _photon_limited

    image = np.zeros((200, 200), np.float32)
    image[:, 100:] = 1.0  # the brightest cells: 5–100 photons a pixel
    for seed in range(5):
        photons = _photon_limited(image, np.random.default_rng(seed))
        dark, bright = photons[:, :100], photons[:, 100:]
        assert 5 <= bright.mean() - dark.mean() <= 100
        # Poisson: the variance is the mean, plus at most 2² of read noise
        for part in (dark, bright):
            assert 0.85 * part.mean() < part.var() < 1.15 * part.mean() + 4.5


def test_shot_noise_share_is_checked(tmp_path):
    images, masks = make_dataset(tmp_path / "data")
    assert train(images, masks, tmp_path / "m.keras", *TINY, "--shot-noise", "1.5") == 2


def test_train_writes_the_card_once_with_familiarity_from_the_model_in_memory(
    tmp_path, monkeypatch
):
    """The familiarity references come from the network just trained, not a reload from
    disk, and the card is written once, complete."""
    from cellwatch.training import train as training

    def no_reload(path):
        raise AssertionError(f"train loaded {path} again to measure familiarity")

    written: list[dict] = []
    write_card = training.write_card

    def counting(path, card):
        written.append(dict(card))
        return write_card(path, card)

    monkeypatch.setattr(training, "load_model", no_reload)
    monkeypatch.setattr(training, "write_card", counting)
    images, masks = make_dataset(tmp_path / "data", binary=True)
    out = tmp_path / "once.keras"
    assert train(images, masks, out, *TINY, "--epochs", "1", "--steps", "1") == 0
    assert len(written) == 1 and familiarity.CARD_KEY in written[0]
    assert json.loads(out.with_suffix(".json").read_text())[familiarity.CARD_KEY]
