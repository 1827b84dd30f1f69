"""``cellwatch finetune`` on a tiny U-Net and 4 small corrected images, and ``cellwatch
models`` listing what it made. Each run is a few seconds of training."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import discs

from cellwatch import familiarity
from cellwatch.cli import main
from cellwatch.model import build_unet, read_card, write_card
from cellwatch.runtime import choose_precision
from cellwatch.training import averaging, crops, judge, shapes
from cellwatch.training import finetune as tuning
from cellwatch.training.finetune import FinetuneSettings, Refused, holdout_split
from cellwatch.training.provenance import new_card
from cellwatch.training.registry import list_models

RGB_NUCLEUS, RGB_GLASS = np.array([70, 40, 140]), np.array([250, 250, 250])


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small untrained three-class U-Net with a card (cells 14 px across)."""
    path = tmp_path_factory.mktemp("base") / "tiny.keras"
    build_unet(2, 4, 3).save(path)
    fluorescence = {"brightness": [0.5] * len(familiarity.TAILS)}  # refs of another modality
    write_card(path, {"name": "tiny", "diameter_px": 14.0, familiarity.CARD_KEY: fluorescence})
    return path


def corrections(root: Path, n: int = 4) -> Path:
    """``n`` RGB brightfield images of purple nuclei on glass, and their masks."""
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        _, labels = discs((64, 64), [tuple(rng.integers(10, 54, 2)) for _ in range(4)], 7)
        rgb = np.where((labels > 0)[..., None], RGB_NUCLEUS, RGB_GLASS).astype(np.uint8)
        tifffile.imwrite(root / "images" / f"c{i}.tif", rgb, photometric="rgb")
        tifffile.imwrite(root / "masks" / f"c{i}.tif", labels.astype(np.uint16))
    return root


def scores(accuracy: float) -> dict[str, float]:
    return {
        "accuracy_0.5": accuracy,
        "f1_0.5": accuracy,
        "pixel_dice": 0.5,
        "count_mape_percent": 9.0,
    }


@pytest.fixture
def quick_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip the pipeline's scoring and familiarity where a test is about something else
    (the first test scores for real)."""
    for module in (tuning, judge):  # before/after, and the checkpoints
        monkeypatch.setattr(module, "score_model", lambda model_path, pairs, channel: scores(0.5))
    monkeypatch.setattr(tuning, "familiarity_references", lambda model_path, images, channel: {})
    monkeypatch.setattr(shapes, "measure_growth", lambda model_path, pairs, channel: {"chosen": 0})


def test_holdout_keeps_one_image_from_four_on_and_none_below():
    pairs = [(Path(f"i{i}"), Path(f"m{i}")) for i in range(20)]
    assert [len(p) for p in holdout_split(pairs[:3], 0.25, 0)] == [3, 0]
    assert [len(p) for p in holdout_split(pairs[:4], 0.25, 0)] == [3, 1]
    train, held = holdout_split(pairs, 0.25, 0)
    assert len(held) == 5 and not set(train) & set(held) and len(train) + len(held) == 20


def test_finetune_writes_model_card_with_provenance_and_before_after(
    tmp_path, tiny_base, capsys, monkeypatch
):
    folder = corrections(tmp_path / "corrections")
    out = tmp_path / "models" / "mine.keras"
    code = main(
        [
            "finetune", "--corrections", str(folder), "--out", str(out), "--from", str(tiny_base),
            "--minutes", "0.05", "--channel", "hematoxylin", "--crop", "32", "--force",
        ]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "| accuracy@0.5 |" in printed and "saved" in printed
    assert "nuclei in the corrections: 13 to 14 px across (median 14)" in printed
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["input"] == {"channel": "hematoxylin", "invert": False} and card["name"] == "mine"
    assert card["finetune"]["polarity"] == {
        "dark": 0,
        "measured": 3,
        "measured_on": "training corrections",
    }
    assert "brighter in 3); the model sees the plane as it is (--invert auto" in printed
    assert card.get(familiarity.CARD_KEY, {}).get("brightness") != [0.5] * len(familiarity.TAILS)
    tuned = card["finetune"]
    assert tuned["base"]["sha256"] == hashlib.sha256(tiny_base.read_bytes()).hexdigest()
    assert tuned["budget_minutes"] == 0.05 and "--minutes 0.05" in tuned["command"]
    assert tuned["steps"] >= 1 and not tuned["interrupted"]
    assert len(tuned["corrections"]) == 4
    assert sum(c["held_out"] for c in tuned["corrections"]) == 1
    first = tuned["corrections"][0]
    image = folder / "images" / Path(first["image"]).name
    assert first["image_sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    assert set(tuned["scores"]) == {"on", "images", "base", "new"}
    assert tuned["scores"]["on"] == "held-out corrections" and len(tuned["scores"]["images"]) == 1
    assert 0 <= tuned["scores"]["new"]["accuracy_0.5"] <= 1
    growth = tuned["outline_growth"]  # measured on the 3 training corrections, not the held-out
    assert (
        card["outline_growth_px"] == growth["chosen"] == shapes.for_unseen(growth["fits_training"])
    )
    assert len(growth["on"]) == 3 and tuned["scores"]["images"][0] not in growth["on"]
    assert set(growth["scores"]) == {f"{g:g}" for g in shapes.CANDIDATES}
    assert f"outlines grown by {growth['chosen']:g} px" in printed

    # a second fine-tune from that model keeps the input it names, without --channel
    again = tmp_path / "models" / "again.keras"
    for module in (tuning, judge):  # before/after, and the checkpoints
        monkeypatch.setattr(module, "score_model", lambda model_path, pairs, channel: scores(0.5))
    settings = FinetuneSettings(minutes=0.02, crop=32)
    card = tuning.finetune(
        tuning.find_pairs(folder / "images", folder / "masks"),
        again,
        settings,
        base=out,
        force=True,
    )
    assert card["input"] == {"channel": "hematoxylin", "invert": False}

    listed = {e.path.name: e for e in list_models(tmp_path / "models")}
    assert set(listed) == {"mine.keras", "again.keras"}
    mine = listed["mine.keras"]
    assert mine.base.startswith("tiny@") and mine.corrections == 4 and mine.channel == "hematoxylin"
    assert mine.after == tuned["scores"]["new"]["accuracy_0.5"]
    assert main(["models", "--dir", str(tmp_path / "models")]) == 0
    table = capsys.readouterr().out
    assert "mine.keras" in table and "tiny@" in table and "hematoxylin" in table


def test_a_worse_model_is_refused_unless_forced(tmp_path, tiny_base, monkeypatch, quick_scores):
    folder = corrections(tmp_path / "corrections")
    pairs = tuning.find_pairs(folder / "images", folder / "masks")
    judged = {}

    def fake_score(model_path, pairs, channel):  # the base scores 0.5, any new model 0.2
        judged[model_path.name] = len(pairs)
        return scores(0.5 if model_path == tiny_base else 0.2)

    for module in (tuning, judge):  # before/after, and the checkpoints
        monkeypatch.setattr(module, "score_model", fake_score)
    out = tmp_path / "worse.keras"
    settings = FinetuneSettings(minutes=0.02, crop=32)
    with pytest.raises(Refused, match=r"accuracy@0.5 0.200 < 0.500.*--force"):
        tuning.finetune(pairs, out, settings, base=tiny_base, channel="hematoxylin")
    # both on the one held-out image (and the checkpoints on it while training)
    assert judged["tiny.keras"] == 1 and judged["worse.keras"] == 1
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert out.with_suffix(".refused.keras").exists()
    assert list_models(tmp_path)[0].refused


def test_the_model_kept_is_the_best_held_out_score_not_the_last(
    tmp_path, tiny_base, monkeypatch, quick_scores
):
    folder = corrections(tmp_path / "corrections")
    pairs = tuning.find_pairs(folder / "images", folder / "masks")
    checkpoints = []  # (the file's sha256, its accuracy) of each checkpoint scored

    def fake_score(model_path, pairs, channel):
        if ".candidate" not in model_path.name:
            return scores(0.1)
        accuracy = [0.3, 0.6, 0.4][len(checkpoints)]
        checkpoints.append((hashlib.sha256(model_path.read_bytes()).hexdigest(), accuracy))
        return scores(accuracy)

    for module in (tuning, judge):  # before/after, and the checkpoints
        monkeypatch.setattr(module, "score_model", fake_score)
    out = tmp_path / "best.keras"
    settings = FinetuneSettings(minutes=5, max_steps=6, crop=32, keep="score", score_every=2)
    card = tuning.finetune(pairs, out, settings, base=tiny_base, channel="hematoxylin")
    assert [c["step"] for c in card["finetune"]["checkpoints"]] == [2, 4, 6]
    assert card["finetune"]["kept_step"] == 4 and card["finetune"]["steps"] == 6
    assert card["finetune"]["settings"]["ema"] == 0  # checkpoints judged by score: no average
    assert hashlib.sha256(out.read_bytes()).hexdigest() == checkpoints[1][0]
    assert len({digest for digest, _ in checkpoints}) == 3  # three different models
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.json", "best.keras", "corrections"]


def test_the_command_exits_1_and_says_why_when_refused(tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise Refused("the new model finds fewer cells correctly than its base")

    monkeypatch.setattr(tuning, "finetune", refuse)
    folder = corrections(tmp_path / "corrections")
    command = ["finetune", "--corrections", str(folder), "--out", str(tmp_path / "m.keras")]
    assert main(command) == 1
    assert "cellwatch: the new model finds fewer cells correctly" in capsys.readouterr().err
    assert main([*command, "--minutes", "0"]) == 2  # a budget of nothing is a usage error


@pytest.mark.parametrize(
    ("keep", "ema"), [("loss", 0.99), ("loss", 0.0), ("score", 0.99), ("last", 0.99), ("last", 0)]
)
def test_ctrl_c_keeps_the_best_model_so_far(
    tmp_path, tiny_base, monkeypatch, quick_scores, keep, ema
):
    import keras

    folder = corrections(tmp_path / "corrections")
    pairs = tuning.find_pairs(folder / "images", folder / "masks")
    real_budget = tuning._budget

    def interrupting_budget(settings, clock):
        budget = real_budget(settings, clock)

        class CtrlC(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                if epoch == 2:
                    raise KeyboardInterrupt

        interrupting_budget.ctrl_c = CtrlC()
        return budget

    monkeypatch.setattr(tuning, "_budget", interrupting_budget)
    real_fit = keras.Model.fit

    def fit_with_ctrl_c(self, *args, callbacks=(), **kwargs):
        return real_fit(self, *args, callbacks=[*callbacks, interrupting_budget.ctrl_c], **kwargs)

    monkeypatch.setattr(keras.Model, "fit", fit_with_ctrl_c)
    out = tmp_path / "stopped.keras"
    # keep="score": stopped before its first scoring (every 50 steps), the model as it
    # stopped is scored and kept
    settings = FinetuneSettings(minutes=5, crop=32, steps_per_epoch=2, keep=keep, ema=ema)
    card = tuning.finetune(pairs, out, settings, base=tiny_base, channel="hematoxylin", force=True)
    assert card["finetune"]["interrupted"] and card["finetune"]["steps"] == 4
    if keep == "score":
        assert [c["step"] for c in card["finetune"]["checkpoints"]] == [4]
    assert out.exists() and not out.with_suffix(".training.keras").exists()


def test_models_names_a_missing_folder(tmp_path, capsys):
    assert main(["models", "--dir", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_frozen_encoder_and_bf16_copies_of_the_base(tiny_base):
    import keras

    frozen = tuning._trainable_copy(tiny_base, FinetuneSettings(freeze_encoder=True))
    trainable = {layer.name for layer in frozen.layers if layer.trainable and layer.weights}
    first_up = next(
        i for i, la in enumerate(frozen.layers) if "transpose" in type(la).__name__.lower()
    )
    assert not any(la.trainable for la in frozen.layers[:first_up] if la.weights)
    assert "probabilities" in trainable and len(frozen.trainable_weights) < len(frozen.weights)

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        half = tuning._trainable_copy(tiny_base, FinetuneSettings(bf16=True))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    full = keras.saving.load_model(tiny_base, compile=False)
    assert half.layers[1].compute_dtype == "bfloat16" and half.output.dtype == "float32"
    assert judge.with_dtype(full, "float32") is full  # nothing to rebuild
    back = judge.with_dtype(half, "float32")
    assert {la.compute_dtype for la in back.layers[1:]} == {"float32"}
    x = np.random.default_rng(0).random((1, 32, 32, 1), dtype=np.float32)
    np.testing.assert_allclose(half.predict(x, verbose=0), full.predict(x, verbose=0), atol=0.05)


def test_stain_jitter_lets_eosin_leak_into_the_hematoxylin_plane(tmp_path):
    from skimage.color import hed2rgb

    from cellwatch.training.crops import (
        TrainSettings,
        crop_batches,
        load_sample,
        random_crop_maps,
        stain_jittered,
    )

    _, labels = discs((96, 96), [(30, 30), (60, 64), (70, 25)], 8)
    hed = np.zeros((96, 96, 3))
    hed[..., 0] = np.where(labels > 0, 0.08, 0.0)  # hematoxylin in the nuclei
    hed[..., 1] = np.where(np.arange(96)[None, :] < 48, 0.15, 0.0)  # eosin on the left half
    rgb = (np.clip(hed2rgb(hed), 0, 1) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "he.tif", rgb, photometric="rgb")
    tifffile.imwrite(tmp_path / "mask.tif", labels.astype(np.uint16))
    still = TrainSettings(diameter_px=16.0)
    jittered = TrainSettings(diameter_px=16.0, stain_jitter=0.2)
    plain = load_sample(tmp_path / "he.tif", tmp_path / "mask.tif", still, channel="hematoxylin")
    sample = load_sample(tmp_path / "he.tif", tmp_path / "mask.tif", jittered, channel="eosin")
    assert plain.stains is None and sample.stains is not None and sample.stain == 1
    sample = load_sample(
        tmp_path / "he.tif", tmp_path / "mask.tif", jittered, channel="hematoxylin"
    )
    assert sample.stains.shape == (*sample.image.shape, 3) and sample.stain == 0
    np.testing.assert_allclose(sample.image, plain.image)  # what is counted stays the same

    rng = np.random.default_rng(0)
    background = sample.labels == 0
    left = background & (np.arange(sample.image.shape[1])[None, :] < sample.image.shape[1] / 2)
    right = background & ~left
    seen = [stain_jittered(sample, rng, 0.2, (1.0, 99.8)) for _ in range(8)]
    # the eosin half's background changes from draw to draw, the unstained half's does not
    assert np.std([v[left].mean() for v in seen]) > 5 * np.std([v[right].mean() for v in seen])
    assert all(np.corrcoef(v.ravel(), sample.image.ravel())[0, 1] > 0.8 for v in seen)

    # no jitter: the same random numbers and crops as a sample without stains
    a = random_crop_maps(sample, np.random.default_rng(3), 32, augment=True)
    b = random_crop_maps(plain, np.random.default_rng(3), 32, augment=True)
    np.testing.assert_array_equal(a[0], b[0])
    # and the recipe's stain_jitter reaches the training batches
    x_still = crop_batches([sample], still, 3, seed=0)[0][0]
    x_jittered = crop_batches([sample], jittered, 3, seed=0)[0][0]
    assert not np.allclose(x_still, x_jittered)


def test_warmup_raises_the_learning_rate_linearly_then_follows_the_cosine(tiny_base):
    import keras

    def rates(settings: FinetuneSettings, steps: int) -> list[float]:
        network = keras.saving.load_model(tiny_base, compile=False)
        network.compile(optimizer=keras.optimizers.Adam(settings.learning_rate), loss="mse")
        budget = tuning._budget(settings, lambda: 0.0)  # a clock that stands still
        budget.set_model(network)
        seen = []
        for step in range(steps):
            budget.on_train_batch_begin(step)
            seen.append(float(network.optimizer.learning_rate.numpy()))
            budget.on_train_batch_end(step)
        return seen

    plain = FinetuneSettings(learning_rate=1e-3, max_steps=100, warmup_steps=0)
    cosine = rates(plain, 8)
    warmed = rates(replace(plain, warmup_steps=4), 8)
    assert cosine[0] == pytest.approx(1e-3) and cosine[7] < cosine[0]
    assert warmed[:4] == pytest.approx(
        [c * k / 4 for c, k in zip(cosine[:4], (1, 2, 3, 4), strict=True)]
    )
    assert warmed[4:] == pytest.approx(cosine[4:])


@pytest.fixture
def finetune_command(tmp_path, monkeypatch):
    """``cellwatch finetune`` on a folder of corrections, with the fine-tune replaced by
    one that records the settings the command made (``seen["settings"]``) and refuses."""
    seen = {}

    def record(pairs, out, settings, **kwargs):
        seen["settings"] = settings
        raise Refused("recorded")

    monkeypatch.setattr(tuning, "finetune", record)
    folder = corrections(tmp_path / "corrections")
    command = ["finetune", "--corrections", str(folder), "--out", str(tmp_path / "m.keras")]
    return command, seen


def test_the_command_passes_warmup_and_holdout_and_checks_them(finetune_command, capsys):
    command, seen = finetune_command
    assert main([*command, "--warmup-steps", "50", "--holdout", "0.25"]) == 1
    assert seen["settings"].warmup_steps == 50 and seen["settings"].holdout == 0.25
    pairs = [(Path(f"i{i}"), Path(f"m{i}")) for i in range(8)]
    assert [len(p) for p in holdout_split(pairs, seen["settings"].holdout, 0)] == [6, 2]
    assert [len(p) for p in holdout_split(pairs, FinetuneSettings.holdout, 0)] == [7, 1]
    assert [len(p) for p in holdout_split(pairs[:4], FinetuneSettings.holdout, 0)] == [3, 1]
    capsys.readouterr()
    assert main([*command, "--holdout", "1"]) == 2
    assert "--holdout" in capsys.readouterr().err
    assert main([*command, "--warmup-steps", "-1"]) == 2


def test_the_card_records_the_corrections_nuclei_sizes(tmp_path, tiny_base, quick_scores):
    folder = tmp_path / "corrections"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    centres = [(16, 16), (16, 48), (48, 16), (48, 48)]
    for name, radius in [("small", 4), ("mid", 6), ("large", 9), ("empty", 0)]:
        _, labels = discs((64, 64), centres if radius else [], radius)
        rgb = np.where((labels > 0)[..., None], RGB_NUCLEUS, RGB_GLASS).astype(np.uint8)
        tifffile.imwrite(folder / "images" / f"{name}.tif", rgb, photometric="rgb")
        tifffile.imwrite(folder / "masks" / f"{name}.tif", labels.astype(np.uint16))
    pairs = tuning.find_pairs(folder / "images", folder / "masks")
    sizes = shapes.corrections_diameters(pairs)
    assert sizes is not None and sizes["images"] == 3  # background only: no size
    disc = {
        r: np.sqrt(4 * np.count_nonzero(discs((64, 64), [(32, 32)], r)[1]) / np.pi)
        for r in (4, 6, 9)
    }
    assert (sizes["low"], sizes["median"], sizes["high"]) == pytest.approx(
        (disc[4], disc[6], disc[9]), abs=0.01
    )
    assert shapes.corrections_diameters(pairs[:1]) is None  # "empty" sorts first

    settings = FinetuneSettings(minutes=0.01, crop=32)
    out = tmp_path / "mine.keras"
    card = tuning.finetune(pairs, out, settings, base=tiny_base, channel="hematoxylin", force=True)
    assert card["corrections_diameter_px"] == sizes
    assert json.loads(out.with_suffix(".json").read_text())["corrections_diameter_px"] == sizes
    # fine-tuned again on other corrections: their sizes, not the base's
    base_card = json.loads(out.with_suffix(".json").read_text())
    recipe, reads = asdict(settings), {"channel": None, "invert": False}
    again = new_card(
        out,
        base_card,
        tmp_path / "b.keras",
        recipe,
        reads=reads,
        command="",
        pairs=pairs[1:2],
        held=[],
    )
    assert again["corrections_diameter_px"]["low"] == again["corrections_diameter_px"]["high"]
    again = new_card(
        out,
        base_card,
        tmp_path / "c.keras",
        recipe,
        reads=reads,
        command="",
        pairs=pairs[:1],
        held=[],
    )
    assert "corrections_diameter_px" not in again


def test_the_outline_growth_is_measured_on_training_corrections_or_given(
    tmp_path, tiny_base, quick_scores, monkeypatch
):
    folder = corrections(tmp_path / "c")
    pairs = tuning.find_pairs(folder / "images", folder / "masks")
    asked: list[list[str]] = []
    counted_with: list[dict] = []

    def measured(model_path, pairs, channel):
        asked.append([image.name for image, _ in pairs])
        counted_with.append(read_card(model_path))  # what counting the model reads
        return {"chosen": 0.75, "scores": {}}

    monkeypatch.setattr(shapes, "measure_growth", measured)
    settings = FinetuneSettings(minutes=0.01, crop=32)
    out = tmp_path / "mine.keras"
    card = tuning.finetune(pairs, out, settings, base=tiny_base, channel="hematoxylin", force=True)
    held = [Path(c["image"]).name for c in card["finetune"]["corrections"] if c["held_out"]]
    assert card["outline_growth_px"] == 0.75 and read_card(out)["outline_growth_px"] == 0.75
    assert len(asked) == 1 and len(asked[0]) == 3 and held[0] not in asked[0]
    # measured through the new model as it will count: its own card (scale, input, peak
    # threshold), with no growth yet
    seen = counted_with[0]
    assert seen["input"] == card["input"] and seen["diameter_px"] == card["diameter_px"]
    assert seen["peak_threshold"] == card["peak_threshold"] == 0.95
    assert "outline_growth_px" not in seen
    # given: written as it is, nothing measured; and never inherited from the base
    given = replace(settings, outline_growth=1.5)
    card = tuning.finetune(pairs, tmp_path / "b.keras", given, base=out, force=True)
    assert card["outline_growth_px"] == 1.5 and "outline_growth" not in card["finetune"]
    assert len(asked) == 1
    # nor the precision check of the base's weights: auto runs these at f32
    checked = {**read_card(out), "precision_check": {"f32": {"accuracy_0.5": 0.8}}}
    reads = {"channel": None, "invert": False}
    again = new_card(
        out,
        checked,
        tmp_path / "c.keras",
        asdict(settings),
        reads=reads,
        command="",
        pairs=pairs,
        held=[],
    )
    assert "outline_growth_px" not in again and "precision_check" not in again
    assert choose_precision("auto", "openvino", again, bf16_cpu=True) == "f32"


def test_weight_averaging_saves_the_average_and_leaves_the_trained_weights(tmp_path, tiny_base):
    import keras

    network = keras.saving.load_model(tiny_base, compile=False)
    network.compile(optimizer="adam", loss="mse")
    x = np.random.default_rng(0).random((2, 32, 32, 1), np.float32)
    y = np.full((2, 32, 32, 3), 1 / 3, np.float32)
    work = tmp_path / "work.keras"
    callback = averaging.averaging(work, 0.75, (x, y), batch_size=2)
    callback.set_model(network)
    base = [v.numpy().copy() for v in network.trainable_variables]
    callback.on_train_begin()
    steps = []
    for step in range(2):  # two "steps" of training: every weight moves by a known amount
        for variable in network.trainable_variables:
            variable.assign(variable.numpy() + 1.0)
        steps.append([v.numpy().copy() for v in network.trainable_variables])
        callback.on_train_batch_end(step)
    expected = [
        0.75 * (0.75 * b + 0.25 * s1) + 0.25 * s2 for b, s1, s2 in zip(base, *steps, strict=True)
    ]
    callback.on_epoch_end(0)
    assert callback.history and callback.history[0][0] == 2
    for variable, last in zip(network.trainable_variables, steps[-1], strict=True):
        np.testing.assert_array_equal(variable.numpy(), last)  # training goes on unchanged
    saved = keras.saving.load_model(work, compile=False)
    for variable, average in zip(saved.trainable_variables, expected, strict=True):
        np.testing.assert_allclose(variable.numpy(), average, rtol=1e-6)
    # a worse average is not saved over the best; nothing new to judge: not judged again
    work.unlink()
    callback.best = -1.0
    callback.on_train_batch_end(2)
    callback.on_epoch_end(1)
    callback.on_train_end()
    assert not work.exists() and [s for s, _ in callback.history] == [2, 3]


def averaged_finetune(tmp_path, tiny_base, monkeypatch, keep):
    """A 12-step fine-tune (ema 0.9, an epoch of 5 steps) keeping ``keep``; (card, model
    path, the averaging callbacks it made)."""
    folder = corrections(tmp_path / "corrections")
    pairs = tuning.find_pairs(folder / "images", folder / "masks")
    made = []

    def spy(*args, **kwargs):
        made.append(averaging.averaging(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(tuning, "averaging", spy)
    settings = FinetuneSettings(
        minutes=1, max_steps=12, crop=32, steps_per_epoch=5, ema=0.9, keep=keep
    )
    out = tmp_path / f"{keep}.keras"
    card = tuning.finetune(pairs, out, settings, base=tiny_base, channel="hematoxylin", force=True)
    return card, out, made


def test_finetune_with_weight_averaging_records_it(tmp_path, tiny_base, quick_scores, monkeypatch):
    card, out, made = averaged_finetune(tmp_path, tiny_base, monkeypatch, keep="loss")
    assert out.exists() and card["finetune"]["settings"]["ema"] == 0.9
    assert card["finetune"]["steps"] == 12
    # the average was judged at each epoch's end and at the last step
    assert len(made) == 1 and [step for step, _ in made[0].history] == [5, 10, 12]


def test_keep_last_saves_the_average_as_training_ended_unjudged(
    tmp_path, tiny_base, quick_scores, monkeypatch
):
    import keras

    card, out, made = averaged_finetune(tmp_path, tiny_base, monkeypatch, keep="last")
    assert card["finetune"]["steps"] == 12 and card["finetune"]["settings"]["keep"] == "last"
    assert len(made) == 1 and made[0].history == []  # no held-out loss judged anything
    saved = keras.saving.load_model(out, compile=False)
    for variable, average in zip(saved.trainable_variables, made[0].average, strict=True):
        np.testing.assert_array_equal(variable.numpy(), average)  # the average at step 12


def test_the_command_passes_ema_and_checks_it(finetune_command, capsys):
    command, seen = finetune_command
    assert main(command) == 1 and seen["settings"].ema == 0.99  # the default
    assert seen["settings"].keep == "last"  # the default: the average as training ended
    assert seen["settings"].holdout == 0.125  # the default: 1 of 8 corrections held out
    assert main([*command, "--ema", "0"]) == 1 and seen["settings"].ema == 0
    assert main([*command, "--ema", "0.99"]) == 1 and seen["settings"].ema == 0.99
    capsys.readouterr()
    assert main([*command, "--ema", "1"]) == 2
    assert "--ema" in capsys.readouterr().err
    assert main([*command, "--ema", "0.99", "--keep", "score"]) == 2
    assert "--keep last or loss" in capsys.readouterr().err
    assert main([*command, "--keep", "last"]) == 1 and seen["settings"].keep == "last"


def test_the_command_passes_the_peak_threshold_and_checks_it(finetune_command, capsys):
    command, seen = finetune_command
    assert main(command) == 1 and seen["settings"].peak_threshold == 0.95  # the default
    assert main([*command, "--peak-threshold", "0"]) == 1
    assert seen["settings"].peak_threshold == 0.0
    capsys.readouterr()
    assert main([*command, "--peak-threshold", "1"]) == 2
    assert "--peak-threshold" in capsys.readouterr().err


def test_the_command_passes_the_outline_growth_and_checks_it(finetune_command, capsys):
    command, seen = finetune_command
    assert main(command) == 1 and seen["settings"].outline_growth is None  # measured
    assert main([*command, "--outline-growth", "1.5"]) == 1
    assert seen["settings"].outline_growth == 1.5
    capsys.readouterr()
    assert main([*command, "--outline-growth", "9"]) == 2
    assert "--outline-growth" in capsys.readouterr().err


def test_contact_weight_weighs_the_loss_where_cells_meet(
    tmp_path, tiny_base, quick_scores, monkeypatch
):
    """Pairs of touching nuclei: the crops trained on carry a weight channel, 5 where the
    two meet and 1 elsewhere, and the loss takes it (an unweighted loss cannot fit 4
    target channels to 3 outputs); the held-out crops of ``keep="loss"`` carry it too."""
    root = tmp_path / "corrections"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(4):  # two discs of radius 7 whose centres are 14 px apart: they touch
        _, labels = discs((64, 64), [(32, 18 + i), (32, 32 + i)], 7)
        rgb = np.where((labels > 0)[..., None], RGB_NUCLEUS, RGB_GLASS).astype(np.uint8)
        tifffile.imwrite(root / "images" / f"c{i}.tif", rgb, photometric="rgb")
        tifffile.imwrite(root / "masks" / f"c{i}.tif", labels.astype(np.uint16))
    pairs = tuning.find_pairs(root / "images", root / "masks")
    seen = []
    real_targets = crops.targets

    def targets(*args, **kwargs):  # every crop's targets, trained on or held out
        seen.append(real_targets(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(crops, "targets", targets)
    for keep in ("last", "loss"):
        settings = FinetuneSettings(minutes=1, max_steps=4, crop=32, contact_weight=5, keep=keep)
        out = tmp_path / f"{keep}.keras"
        card = tuning.finetune(
            pairs, out, settings, base=tiny_base, channel="hematoxylin", force=True
        )
        assert out.exists() and card["finetune"]["settings"]["contact_weight"] == 5
    assert len(seen) > 4 and all(y.shape[-1] == 4 for y in seen)  # 3 classes and the weight
    weights = np.concatenate([y[..., 3].ravel() for y in seen])
    assert set(np.unique(weights)) == {1.0, 5.0}


def test_the_command_passes_the_contact_weight_and_checks_it(finetune_command, capsys):
    command, seen = finetune_command
    assert main(command) == 1 and seen["settings"].contact_weight == 1  # the default: none
    assert main([*command, "--contact-weight", "5"]) == 1
    assert seen["settings"].contact_weight == 5
    capsys.readouterr()
    assert main([*command, "--contact-weight", "0"]) == 2
    assert "--contact-weight" in capsys.readouterr().err


def test_dark_cells_are_taught_and_counted_inverted(tmp_path, tiny_base, quick_scores, monkeypatch):
    """Gray corrections of dark nuclei on a light background: with --invert auto (the
    default) the card says the model sees them inverted, and the crops it trains on show the
    nuclei bright; with --invert no the plane stays as it is."""
    folder = corrections(tmp_path / "rgb")
    gray = tmp_path / "gray"
    for kind in ("images", "masks"):
        (gray / kind).mkdir(parents=True)
    for image in sorted((folder / "images").iterdir()):  # the luminance: dark nuclei
        rgb = tifffile.imread(image)
        tifffile.imwrite(gray / "images" / image.name, rgb.mean(axis=-1).astype(np.uint8))
        (gray / "masks" / image.name).write_bytes((folder / "masks" / image.name).read_bytes())
    pairs = tuning.find_pairs(gray / "images", gray / "masks")
    loaded = []
    real_load = crops.load_sample

    def load_sample(*args, **kwargs):
        loaded.append(real_load(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(tuning, "load_sample", load_sample)
    said = []
    settings = FinetuneSettings(minutes=0.01, crop=32)  # --invert auto, the default
    card = tuning.finetune(pairs, tmp_path / "bf.keras", settings, base=tiny_base, say=said.append)
    assert card["input"] == {"channel": None, "invert": True}
    assert card["finetune"]["polarity"]["dark"] == card["finetune"]["polarity"]["measured"] == 3
    assert any("darker than their background in 3 of 3" in line for line in said)

    def nuclei_brighter(sample: crops.Sample) -> bool:
        cells = sample.labels > 0
        return sample.image[cells].mean() > sample.image[~cells].mean()

    assert loaded and all(s.inverted and nuclei_brighter(s) for s in loaded)
    loaded.clear()
    kept = replace(settings, invert=False)
    card = tuning.finetune(pairs, tmp_path / "as-is.keras", kept, base=tiny_base, say=said.append)
    assert card["input"]["invert"] is False
    assert any("as it is (--invert no: input.invert false)" in line for line in said)
    assert loaded and not any(s.inverted or nuclei_brighter(s) for s in loaded)


def test_the_command_passes_invert(finetune_command, capsys):
    command, seen = finetune_command
    assert main(command) == 1 and seen["settings"].invert is None  # the default: auto
    assert main([*command, "--invert", "yes"]) == 1 and seen["settings"].invert is True
    assert main([*command, "--invert", "no"]) == 1 and seen["settings"].invert is False
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        main([*command, "--invert", "maybe"])
    assert refused.value.code == 2 and "--invert" in capsys.readouterr().err
