"""int8: quantized while the model is converted, calibrated on tiles kept beside the model,
offered only where the model card shows it within 0.005 of f32 on ``val``."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import discs

from cellwatch.config import Config, override
from cellwatch.errors import ModelError
from cellwatch.model import BUNDLED_MODEL, read_card, write_card
from cellwatch.runtime import (
    INT8_MAX_LOSS,
    _openvino,
    cached_ir,
    calibration_path,
    choose_precision,
    read_calibration,
    resolve,
)
from cellwatch.training.calibration import pack_tiles, write_calibration

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dsb2018-fluo"


def measured(f32: float, **others: float) -> dict:
    return {
        "name": "tiny",
        "precision_check": {
            name: {"accuracy_0.5": value} for name, value in {"f32": f32, **others}.items()
        },
    }


@pytest.fixture(scope="module")
def tiny_unet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three convolutions (the first and last stay f32, the middle one is quantized), with
    a calibration set of random tiles of two sizes beside it."""
    import keras
    from keras import layers

    path = tmp_path_factory.mktemp("tiny") / "tiny.keras"
    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 1))
    x = layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    outputs = layers.Conv2D(3, 1, activation="softmax", name="probabilities")(x)
    keras.Model(inputs, outputs).save(path)
    write_card(path, {"name": "tiny", "diameter_px": None})
    rng = np.random.default_rng(0)
    batches = [rng.random((1, s, s, 1), dtype=np.float32) for s in (32, 48) for _ in range(4)]
    np.savez_compressed(calibration_path(path), **pack_tiles(batches))
    return path


def test_int8_runs_only_where_the_card_shows_it_close_to_f32():
    close = measured(0.862, int8=0.862 - INT8_MAX_LOSS + 0.001)
    far = measured(0.862, int8=0.852)
    assert choose_precision("int8", "openvino", close) == "int8"
    with pytest.raises(ModelError, match=r"tiny lost 0\.0100 accuracy@0\.5 .* 0\.005 allowed"):
        choose_precision("int8", "openvino", far)
    with pytest.raises(ModelError, match="records no int8 accuracy on validation images"):
        choose_precision("int8", "openvino", measured(0.862, bf16=0.862))
    # measuring it (cellwatch evaluate) is how a card gets its figure
    assert choose_precision("int8", "openvino", far, measuring=True) == "int8"
    # auto never picks int8, however close
    perfect = measured(0.862, bf16=0.850, int8=0.862)
    assert choose_precision("auto", "openvino", perfect, bf16_cpu=True) == "f32"
    with pytest.raises(ModelError, match=r"needs inference\.runtime openvino"):
        choose_precision("int8", "keras", close)


def test_calibration_tiles_round_trip_at_8_bits(tmp_path):
    rng = np.random.default_rng(1)
    batches = [rng.normal(0.3, 0.4, (2, 24, 40, 1)).astype(np.float32), np.zeros((1, 16, 16, 1))]
    path = tmp_path / "m.calibration.npz"
    np.savez_compressed(path, **pack_tiles(batches))
    tiles = read_calibration(path)
    originals = [tile for batch in batches for tile in batch]
    assert [t.shape for t in tiles] == [(1, *o.shape) for o in originals]
    for tile, original in zip(tiles, originals, strict=True):
        step = (original.max() - original.min()) / 255
        np.testing.assert_allclose(tile[0], original, atol=step / 2 + 1e-6)
        assert tile.dtype == np.float32


def test_the_tiny_model_is_quantized_with_its_first_and_last_convolutions_f32(tiny_unet, tmp_path):
    cache = tmp_path / "cache"
    folder, entry = cached_ir(tiny_unet, "int8", cache)
    f32_folder, _ = cached_ir(tiny_unet, "f32", cache)
    assert folder != f32_folder and "-int8-" in folder.name
    assert entry["quantization"]["calibration_tiles"] == 8
    assert len(entry["quantization"]["kept_f32"]) == 2

    ov = _openvino()
    core = ov.Core()
    ops = [op.get_type_name() for op in core.read_model(folder / "model.xml").get_ordered_ops()]
    assert "FakeQuantize" in ops  # the middle convolution runs at int8
    batch = np.random.default_rng(2).random((1, 40, 40, 1), dtype=np.float32)
    outs = [
        core.compile_model(core.read_model(f / "model.xml"), "CPU").create_infer_request()
        for f in (folder, f32_folder)
    ]
    int8, f32 = (np.array(r.infer({0: batch})[0]) for r in outs)
    assert np.abs(int8 - f32).max() < 0.05
    assert not np.array_equal(int8, f32)


def test_a_damaged_int8_entry_or_new_calibration_tiles_convert_again(tiny_unet, tmp_path):
    calls = []

    def convert(*args):
        from cellwatch.runtime import _convert

        calls.append(args)
        return _convert(*args)

    model = tmp_path / "tiny.keras"
    for src in (tiny_unet, tiny_unet.with_suffix(".json"), calibration_path(tiny_unet)):
        shutil.copy(src, tmp_path / src.name)
    cache = tmp_path / "cache"
    folder, _ = cached_ir(model, "int8", cache, convert=convert)
    cached_ir(model, "int8", cache, convert=convert)
    assert len(calls) == 1

    weights = folder / "model.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    cached_ir(model, "int8", cache, convert=convert)
    assert len(calls) == 2  # rebuilt, not trusted

    rng = np.random.default_rng(3)
    np.savez_compressed(
        calibration_path(model), **pack_tiles([rng.random((1, 32, 32, 1), dtype=np.float32)])
    )
    again, entry = cached_ir(model, "int8", cache, convert=convert)
    assert len(calls) == 3 and again == folder
    assert entry["quantization"]["calibration_tiles"] == 1


def test_int8_without_calibration_tiles_says_how_to_make_them(threshold_model, tmp_path):
    with pytest.raises(ModelError, match=r"needs calibration tiles beside the model, .*threshold"):
        cached_ir(threshold_model, "int8", tmp_path / "cache")
    model = tmp_path / "m.keras"
    shutil.copy(threshold_model, model)
    good = tmp_path / "good.npz"
    np.savez_compressed(good, **pack_tiles([np.ones((1, 8, 8, 1), np.float32)]))
    for damaged in (b"not an npz", good.read_bytes()[:-40]):  # garbage; a cut-off copy
        calibration_path(model).write_bytes(damaged)
        with pytest.raises(ModelError, match=r"cannot read the int8 calibration tiles .*m\.calib"):
            cached_ir(model, "int8", tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]


def test_calibration_is_recorded_through_the_pipeline(threshold_model, tmp_path):
    """The tiles written are the ones the network is given: normalized, so the discs are
    near 1 and the background near 0, whatever the 8-bit values were."""
    model = tmp_path / "m.keras"
    shutil.copy(threshold_model, model)
    images = []
    for n in range(2):
        image, _ = discs((96, 128), [(30, 30 + 20 * n), (70, 90)], radius=8, value=90 + 60 * n)
        images.append(tmp_path / f"train{n}.tif")
        tifffile.imwrite(images[-1], image)
    path = write_calibration(model, images)
    assert path == calibration_path(model)
    tiles = read_calibration(path)
    assert tiles and all(t.ndim == 4 and t.shape[-1] == 1 for t in tiles)
    top = max(float(t.max()) for t in tiles)
    assert 0.9 < top < 1.5, top  # normalized, not raw 8-bit pixel values


def test_the_bundled_model_offers_int8_as_measured_and_calibrates_on_train_only():
    card = read_card(BUNDLED_MODEL)
    check = card["precision_check"]
    loss = check["f32"]["accuracy_0.5"] - check["int8"]["accuracy_0.5"]
    config = override(Config(), **{"inference.runtime": "openvino", "inference.precision": "int8"})
    if loss <= INT8_MAX_LOSS:
        assert resolve(config).inference.precision == "int8"
    else:
        with pytest.raises(ModelError, match="int8 is not offered"):
            resolve(config)
    path = calibration_path(BUNDLED_MODEL)
    assert path.stat().st_size < 5_000_000
    with np.load(path) as data:
        names = set(data["images"].tolist())
    assert len(names) >= 20
    if DATA.is_dir():
        assert names <= {p.name for p in (DATA / "train" / "images").iterdir()}
        assert not names & {p.name for p in (DATA / "val" / "images").iterdir()}


def test_int8_counts_with_a_warm_cache_without_tensorflow_or_nncf(tiny_unet, tmp_path):
    """NNCF and TensorFlow are for converting once; counting at int8 reads the cached IR."""
    model = tmp_path / "tiny.keras"
    for src in (tiny_unet, calibration_path(tiny_unet)):
        shutil.copy(src, tmp_path / src.name)
    write_card(model, {"name": "tiny", "diameter_px": None, **measured(0.86, int8=0.859)})
    cache = tmp_path / "cache"
    cached_ir(model, "int8", cache)  # warm, as after a first run
    code = (
        "import sys\n"
        "from cellwatch.config import Config, override\n"
        "from cellwatch.runtime import load\n"
        f"settings = {{'model.path': {str(model)!r}, 'inference.cache_dir': {str(cache)!r},\n"
        "            'inference.runtime': 'openvino', 'inference.precision': 'int8'}\n"
        "print('PRECISION=' + load(override(Config(), **settings)).precision)\n"
        "heavy = [m for m in ('tensorflow', 'keras', 'nncf', 'torch') if m in sys.modules]\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "PRECISION=int8" in run.stdout, run.stdout[-500:] + run.stderr[-2000:]
    assert "HEAVY=\n" in run.stdout, run.stdout[-500:]
