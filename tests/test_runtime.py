"""The inference runtime: choosing it, the converted-model cache, and OpenVINO giving the
Keras path's answers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import discs, load_with

from cellwatch.config import Config, override
from cellwatch.errors import ConfigError, ModelError
from cellwatch.model import BUNDLED_MODEL, read_card
from cellwatch.pipeline import Segmenter
from cellwatch.runtime import (
    cached_ir,
    choose_precision,
    choose_runtime,
    cpu_has_bf16,
    default_cache_dir,
    resolve,
)
from cellwatch.training import matching

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "images"


def measured(f32: float, **others: float) -> dict:
    return {
        "precision_check": {
            name: {"accuracy_0.5": value} for name, value in {"f32": f32, **others}.items()
        }
    }


def test_auto_runtime_is_openvino_on_a_cpu_and_keras_on_a_gpu():
    assert choose_runtime("auto", gpus=0) == "openvino"
    assert choose_runtime("auto", gpus=1) == "keras"
    assert choose_runtime("keras", gpus=0) == "keras"
    assert choose_runtime("openvino", gpus=1) == "openvino"


def test_auto_precision_is_bf16_only_where_measured_close_and_the_cpu_has_it():
    close, far = measured(0.862, bf16=0.860), measured(0.862, bf16=0.858)
    assert choose_precision("auto", "openvino", close, bf16_cpu=True) == "bf16"
    assert choose_precision("auto", "openvino", close, bf16_cpu=False) == "f32"
    assert choose_precision("auto", "openvino", far, bf16_cpu=True) == "f32"
    assert choose_precision("auto", "openvino", {}, bf16_cpu=True) == "f32"  # not measured
    assert choose_precision("auto", "keras", close, bf16_cpu=True) == "f32"
    assert choose_precision("bf16", "openvino", {}, bf16_cpu=False) == "bf16"


def test_int8_needs_a_measured_card_and_keras_runs_f32_only():
    with pytest.raises(ModelError, match="int8 is not offered"):
        choose_precision("int8", "openvino", measured(0.862, bf16=0.860))
    with pytest.raises(ModelError, match=r"needs inference\.runtime openvino"):
        choose_precision("bf16", "keras", {})


def test_bf16_is_read_from_the_cpu_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu avx512f avx512_vnni avx512_bf16 sse\n")
    assert cpu_has_bf16(cpuinfo)
    cpuinfo.write_text("flags\t\t: fpu avx2 sse\n")
    assert not cpu_has_bf16(cpuinfo)
    assert not cpu_has_bf16(tmp_path / "missing")


def test_cache_folder_follows_xdg(tmp_path):
    assert default_cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "cellwatch"
    assert default_cache_dir({}) == Path.home() / ".cache" / "cellwatch"


def test_a_bad_runtime_in_the_config_is_named(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("inference:\n  runtime: tensorrt\n")
    from cellwatch.config import load_config

    with pytest.raises(ConfigError, match=r"inference\.runtime must be one of auto, openvino"):
        load_config(path)


def test_the_runtime_and_precision_that_run_are_in_the_settings_hash():
    cpu = resolve(override(Config(), **{"inference.runtime": "auto"}), gpus=0)
    gpu = resolve(override(Config(), **{"inference.runtime": "auto"}), gpus=1)
    assert cpu.inference.runtime == "openvino" and gpu.inference.runtime == "keras"
    assert cpu.settings_hash() != gpu.settings_hash()
    bf16 = override(cpu, **{"inference.precision": "bf16"})
    f32 = override(cpu, **{"inference.precision": "f32"})
    assert bf16.settings_hash() != f32.settings_hash()
    elsewhere = override(f32, **{"inference.cache_dir": "/elsewhere"})
    assert elsewhere.settings_hash() == f32.settings_hash()


def test_the_model_is_converted_once_and_a_damaged_entry_is_rebuilt(threshold_model, tmp_path):
    calls = []

    def convert(*args):
        from cellwatch.runtime import _convert

        calls.append(args)
        return _convert(*args)

    cache = tmp_path / "cache"
    folder, entry = cached_ir(threshold_model, "f32", cache, convert=convert)
    again, _ = cached_ir(threshold_model, "f32", cache, convert=convert)
    assert again == folder and len(calls) == 1
    assert entry["classes"] == 3 and entry["receptive_field"]["radius_px"] <= 2
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no staging left

    weights = folder / "model.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    weights.write_bytes(bytes(data))
    cached_ir(threshold_model, "f32", cache, convert=convert)
    assert len(calls) == 2  # rebuilt, not trusted
    (folder / "entry.json").write_text("{not json")
    cached_ir(threshold_model, "f32", cache, convert=convert)
    assert len(calls) == 3

    changed = tmp_path / "changed.keras"
    changed.write_bytes(threshold_model.read_bytes())
    with open(changed, "ab") as f:
        f.write(b"\0")  # another file: another hash, another entry
    assert cached_ir(changed, "f32", cache, convert=convert)[0] != folder


def test_the_stub_model_counts_discs_through_openvino(threshold_model):
    image, truth = discs((200, 260), [(40, 40), (100, 150), (160, 60)], radius=9)
    model = load_with(threshold_model)
    assert model.runtime == "openvino" and model.context_px is not None
    labels = Segmenter(Config(), model).segment(image).labels
    at = matching.match(truth, labels, thresholds=(0.95,))[0]
    assert at.tp == 3 and at.fp == at.fn == 0


@pytest.fixture(scope="module")
def bundled_both() -> tuple:
    return load_with(None, "keras"), load_with(None, "openvino", "f32")


@pytest.mark.parametrize("name", sorted(p.stem for p in SAMPLES.glob("*.tif")))
def test_openvino_f32_labels_equal_the_keras_labels(bundled_both, name):
    """The bundled U-Net on the sample nuclei, whole pipeline at the default config:
    every cell of the Keras path is found by OpenVINO f32 at IoU ≥ 0.99, and no other."""
    keras_model, ov_model = bundled_both
    raw = tifffile.imread(SAMPLES / f"{name}.tif")
    config = Config()
    expected = Segmenter(config, keras_model).segment(raw).labels
    got = Segmenter(config, ov_model).segment(raw).labels
    assert expected.max() > 20
    at = matching.match(expected, got, thresholds=(0.99,))[0]
    assert at.fp == at.fn == 0, f"{at.fn} of {expected.max()} cells differ at IoU 0.99"


def test_counting_commands_import_no_tensorflow_with_a_warm_cache(threshold_model, tmp_path):
    """``predict``, the daemon's model loading (``watch``), ``status`` and ``report`` with
    OpenVINO: the converted model is read from the cache, TensorFlow and Keras stay out."""
    image, _ = discs((96, 96), [(40, 40)], radius=8)
    tifffile.imwrite(tmp_path / "one.tif", image)
    cached_ir(threshold_model, "f32", Path(default_cache_dir()))  # warm, as after a first run
    code = (
        "import sys\n"
        "from cellwatch.cli import main\n"
        "from cellwatch.config import Config, override\n"
        "from cellwatch.service.daemon import load_engine\n"
        f"model, out = {str(threshold_model)!r}, {str(tmp_path / 'out')!r}\n"
        f"assert main(['predict', {str(tmp_path / 'one.tif')!r}, '--model', model, '--out', "
        "out, '--quiet', '--workers', '0']) == 0\n"
        "engine = load_engine(override(Config(), **{'model.path': model, 'compute.workers': 0}))\n"
        "print('DEVICE=' + engine.device)\n"
        "for argv in (['status', '--out', out], ['report', '--out', out]):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = [m for m in ('tensorflow', 'keras', 'jax', 'torch') if m in sys.modules]\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "HEAVY=\n" in run.stdout, run.stdout[-500:] + run.stderr[-2000:]
    assert "DEVICE=cpu (openvino f32)" in run.stdout


def test_the_bundled_card_records_the_precision_check():
    check = read_card(BUNDLED_MODEL).get("precision_check", {})
    assert {"f32", "bf16"} <= set(check), "measure with benchmarks/precision.py"
    json.dumps(check)  # plain numbers, as the card is written
    assert np.isfinite(check["bf16"]["accuracy_0.5"])


def test_augment_averages_the_eight_symmetries_turned_back():
    """A pointwise network: each of the 8 views, turned back, answers as the plain pass
    does, so the average equals it (a view not turned back would not)."""
    from cellwatch.runtime import augmented

    seen = []

    def rows(batch: np.ndarray) -> np.ndarray:
        seen.append(batch.copy())
        return batch * 2.0

    batch = np.random.default_rng(0).random((2, 32, 48, 1)).astype(np.float32)
    out = augmented(rows)(batch)
    np.testing.assert_allclose(out, batch * 2.0, rtol=1e-6)
    assert len(seen) == 8 and len({v.tobytes() for v in seen}) == 8
    assert {v.shape for v in seen} == {(2, 32, 48, 1), (2, 48, 32, 1)}


def test_augment_is_on_the_model_when_configured(threshold_model):
    on = load_with(threshold_model)
    assert not on.augment
    from cellwatch.runtime import load

    config = override(Config(), **{"model.path": str(threshold_model), "inference.augment": True})
    image, truth = discs((120, 120), [(40, 40), (80, 90)], radius=9)
    assert truth.max() == 2
    model = load(config)
    assert model.augment
    labels = Segmenter(config, model).segment(image).labels
    assert labels.max() == 2


def test_openvino_keeps_a_bounded_number_of_input_shapes(monkeypatch, tmp_path):
    """Tiles fit each image and the zoom is chosen per image, so a daemon meets new input
    shapes for months; OpenVINO's CPU plugin keeps ~2.5 MB per shape it has seen (5,000 by
    default: the daemon's RSS rose with every new shape, ``benchmarks/shape_cache.py``).
    The model is compiled with a bounded cache of shapes."""
    from cellwatch import runtime

    compiled: list[dict] = []

    class Network:
        def get_ordered_ops(self) -> list:
            return []

    class Core:
        def read_model(self, path):
            return Network()

        def compile_model(self, network, device, config):
            compiled.append(dict(config, device=device))
            return object()

    monkeypatch.setattr(
        runtime, "_openvino", lambda: type("ov", (), {"Core": Core, "opset13": None})
    )
    runtime._compiled(tmp_path, {}, "bf16")
    assert compiled == [
        {
            "device": "CPU",
            "INFERENCE_PRECISION_HINT": "bf16",
            "CPU_RUNTIME_CACHE_CAPACITY": runtime.OV_SHAPE_CACHE,
        }
    ]
    assert 8 <= runtime.OV_SHAPE_CACHE <= 64  # the shapes in hand fit; ≤ ~160 MB in all


def test_openvino_accepts_the_shape_cache_setting(threshold_model):
    """The real plugin takes the setting (it refuses names it does not know)."""
    model = load_with(threshold_model)
    assert model.runtime == "openvino"
    out = model.network.create_infer_request().infer({0: np.zeros((1, 32, 48, 1), np.float32)})
    assert out[0].shape == (1, 32, 48, 3)
