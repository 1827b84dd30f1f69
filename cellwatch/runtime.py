"""Which engine runs the network, at which precision, with which cache.

The one module of the image path that imports TensorFlow, Keras or OpenVINO to run a
network. ``inference.runtime: auto`` runs OpenVINO on a CPU and Keras on a GPU
(:func:`choose_runtime`). For OpenVINO the ``.keras`` model is converted once into an
OpenVINO IR kept in ``inference.cache_dir`` under the model's hash, the precision and the
OpenVINO version (:func:`cached_ir`); later runs read the IR and the model card and never
import TensorFlow. A cache entry whose files do not match the hashes recorded when it was
written is rebuilt, never trusted. int8 is quantized while converting (NNCF, imported then
only), calibrated on the tiles stored beside the model (:func:`calibration_path`).
"""

from __future__ import annotations

__all__ = [
    "PRECISIONS",
    "RUNTIMES",
    "cached_ir",
    "calibration_path",
    "choose_precision",
    "choose_runtime",
    "cpu_has_bf16",
    "default_cache_dir",
    "describe",
    "keras_predict_fn",
    "load",
    "read_calibration",
    "resolve",
]

import dataclasses
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cellwatch import ov_graph
from cellwatch.config import Config
from cellwatch.errors import ModelError
from cellwatch.model import BUNDLED_MODEL, LoadedModel, read_card, visible_gpus
from cellwatch.storage.imageio import sha256_file

log = logging.getLogger(__name__)

RUNTIMES = ("openvino", "keras")
PRECISIONS = ("f32", "bf16", "int8")
#: ``precision: auto`` runs bf16 only when the model card records a ``val`` accuracy
#: measured at bf16 within this of f32's; int8 may be offered once within INT8_MAX_LOSS.
BF16_MAX_LOSS = 0.003
INT8_MAX_LOSS = 0.005
ENTRY_FORMAT = 1  # bump when what an entry holds changes: old entries are then rebuilt
OV_PRECISION_HINT = {"f32": "f32", "bf16": "bf16", "int8": "f32"}

#: Input shapes whose prepared kernels and buffers OpenVINO's CPU plugin keeps (least
#: recently used first out). Tiles shrink to fit each image and the zoom is chosen per
#: image, so a daemon meets new tile shapes for months; OpenVINO's default keeps 5,000,
#: about 2.5 MB each for the default U-Net (``benchmarks/shape_cache.py``), and the RSS
#: of a daemon rose with every new shape. 32 holds the shapes of the images in hand
#: (``tiling.images_at_once``) many times over.
OV_SHAPE_CACHE = 32

PredictFn = Callable[[np.ndarray], np.ndarray]


# --- choosing -------------------------------------------------------------------------


def choose_runtime(requested: str, *, gpus: int | None = None) -> str:
    """``openvino`` or ``keras`` for ``inference.runtime``: ``auto`` is Keras where a GPU is
    visible (``gpus``, counted by :func:`cellwatch.model.visible_gpus` when None) or
    OpenVINO is not installed, OpenVINO on a CPU."""
    if requested != "auto":
        return requested
    gpus = visible_gpus() if gpus is None else gpus
    if gpus or importlib.util.find_spec("openvino") is None:
        return "keras"
    return "openvino"


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX), read from
    ``/proc/cpuinfo`` (False where it cannot be read)."""
    try:
        flags = cpuinfo.read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_precision(
    requested: str,
    runtime: str,
    card: Mapping[str, Any],
    *,
    bf16_cpu: bool | None = None,
    measuring: bool = False,
) -> str:
    """The precision that runs: ``f32`` for Keras; for OpenVINO ``auto`` is bf16 where the
    CPU has it and the card's ``precision_check`` shows ``val`` accuracy within
    :data:`BF16_MAX_LOSS` of f32, else f32 (never int8). int8 runs where the card shows it
    within :data:`INT8_MAX_LOSS` of f32, or when ``measuring`` (``cellwatch evaluate``,
    benchmarks: how the card gets its figure).

    Raises
    ------
    ModelError
        When bf16 or int8 is asked of Keras, or int8 of a model whose card does not show
        it close enough to f32.
    """
    if runtime == "keras":
        if requested in ("auto", "f32"):
            return "f32"
        raise ModelError(
            f"inference.precision {requested} needs inference.runtime openvino; "
            "the Keras runtime runs f32 (set precision to auto or f32)"
        )
    if requested == "f32":
        return "f32"
    bf16_cpu = cpu_has_bf16() if bf16_cpu is None else bf16_cpu
    if requested == "auto":
        return "bf16" if bf16_cpu and _loss(card, "bf16") <= BF16_MAX_LOSS else "f32"
    if requested == "bf16":
        return "bf16"  # OpenVINO emulates it where the CPU lacks it: slower, same answers
    loss = _loss(card, "int8")
    if measuring or loss <= INT8_MAX_LOSS:
        return "int8"
    name = card.get("name", "this model")
    if loss == float("inf"):
        why = (
            f"the card of {name} records no int8 accuracy on validation images "
            "(precision_check); measure it with cellwatch evaluate --runtime openvino "
            "--precision int8 and add it to the card (docs/speed.md)"
        )
    else:
        why = (
            f"{name} lost {loss:.4f} accuracy@0.5 against f32 on validation images at int8 "
            f"(its card's precision_check), more than the {INT8_MAX_LOSS} allowed"
        )
    raise ModelError(f"inference.precision int8 is not offered: {why}; use auto, f32 or bf16")


def _loss(card: Mapping[str, Any], precision: str) -> float:
    """Accuracy lost at ``precision`` against f32, from the card (inf when not measured)."""
    check = card.get("precision_check")
    if not isinstance(check, Mapping):
        return float("inf")
    f32, other = check.get("f32"), check.get(precision)
    try:
        return float(f32["accuracy_0.5"]) - float(other["accuracy_0.5"])  # type: ignore[index]
    except (TypeError, KeyError, ValueError):
        return float("inf")


def resolve(config: Config, *, gpus: int | None = None, measuring: bool = False) -> Config:
    """``config`` with ``inference.runtime`` and ``inference.precision`` as they will run
    (no ``auto``), so the settings hash says what produced a row (``measuring``: as for
    :func:`choose_precision`)."""
    inference = config.inference
    runtime = choose_runtime(inference.runtime, gpus=gpus)
    card = read_card(Path(config.model.path) if config.model.path else BUNDLED_MODEL)
    precision = choose_precision(inference.precision, runtime, card, measuring=measuring)
    chosen = dataclasses.replace(inference, runtime=runtime, precision=precision)
    return dataclasses.replace(config, inference=chosen)


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CACHE_HOME/cellwatch``, else ``~/.cache/cellwatch``."""
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cellwatch"


def describe(model: LoadedModel) -> str:
    """The runtime and precision a model runs with, for logs and status: ``openvino bf16``."""
    return f"{model.runtime} {model.precision}"


def _openvino() -> Any:
    """The ``openvino`` module, imported without its usage reports: OpenVINO's converter
    sends events to Intel (Google Analytics) on import unless the user opted out, and a
    lab PC counting cells should not; without ``openvino_telemetry`` it uses its stub."""
    import sys

    sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]
    import openvino

    return openvino


# --- loading --------------------------------------------------------------------------


def load(config: Config, *, measuring: bool = False) -> LoadedModel:
    """The model of ``config``, ready to predict with the runtime and precision that
    :func:`resolve` chooses. OpenVINO reads the cached IR (converting it first, once)."""
    config = resolve(config, measuring=measuring)
    path = Path(config.model.path) if config.model.path else BUNDLED_MODEL
    inference = config.inference
    if inference.runtime == "keras":
        from cellwatch.model import load_model

        return dataclasses.replace(load_model(path), augment=inference.augment)
    cache = Path(inference.cache_dir) if inference.cache_dir else default_cache_dir()
    folder, entry = cached_ir(path, inference.precision, cache)
    model = _compiled(folder, entry, inference.precision)
    card = read_card(path)
    card.setdefault("receptive_field", entry.get("receptive_field"))
    log.info("model %s runs on openvino %s (%s)", path.name, inference.precision, folder)
    return LoadedModel(
        network=model,
        name=path.stem,
        sha256=entry["model_sha256"],
        classes=int(entry["classes"]),
        diameter_px=_positive(card.get("diameter_px")),
        pixel_size_um=_positive(card.get("pixel_size_um")),
        card=card,
        grid_px=int(entry["grid_px"]),
        input_px=entry["input_px"],
        runtime="openvino",
        precision=inference.precision,
        augment=inference.augment,
    )


def _positive(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and value > 0 else None


def _compiled(folder: Path, entry: Mapping[str, Any], precision: str) -> Any:
    ov = _openvino()

    core = ov.Core()
    network = core.read_model(folder / "model.xml")
    rewritten = ov_graph.faster(network, ov.opset13)
    log.debug("network rewritten for the CPU: %s", ", ".join(rewritten) or "nothing")
    hint = OV_PRECISION_HINT[precision]
    try:
        return core.compile_model(
            network,
            "CPU",
            {"INFERENCE_PRECISION_HINT": hint, "CPU_RUNTIME_CACHE_CAPACITY": OV_SHAPE_CACHE},
        )
    except RuntimeError as exc:
        raise ModelError(f"OpenVINO cannot compile {folder / 'model.xml'}: {exc}") from exc


def cached_ir(
    model_path: Path, precision: str, cache_dir: Path, *, convert: Callable[..., Any] | None = None
) -> tuple[Path, dict[str, Any]]:
    """The cache folder holding ``model_path`` as OpenVINO IR for ``precision``, and its
    ``entry.json``: converted now when absent or damaged (files that do not match the
    hashes written with them), in a private folder renamed into place, so a reader never
    sees half an entry."""
    ov = _openvino()

    if not model_path.is_file():
        raise ModelError(f"no model file at {model_path}; pass --model PATH to a .keras file")
    digest = sha256_file(model_path)
    version = ov.get_version().split("-")[0]
    ir_precision = "int8" if precision == "int8" else "f32"  # bf16: a hint on the f32 IR
    folder = cache_dir / f"{model_path.stem}-{digest[:16]}-{ir_precision}-ov{version}"
    calibration = None
    if ir_precision == "int8":
        calibration = _calibration_digest(model_path)  # new tiles: a new conversion
    entry = _valid_entry(folder, digest, calibration)
    if entry is not None:
        return folder, entry
    if folder.exists():
        log.warning("cache entry %s is damaged: converting the model again", folder)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=cache_dir))
    except OSError as exc:
        raise ModelError(
            f"cannot write the model cache in {cache_dir}: {exc.strerror or exc}; set "
            "inference.cache_dir to a writable folder"
        ) from exc
    try:
        entry = (convert or _convert)(model_path, staging, ir_precision)
        entry.update(format=ENTRY_FORMAT, model_sha256=digest, openvino=version)
        entry.update(calibration_sha256=calibration)
        entry["files"] = {name: sha256_file(staging / name) for name in ("model.xml", "model.bin")}
        (staging / "entry.json").write_text(json.dumps(entry, indent=1), encoding="utf-8")
        shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(staging, folder)
        except OSError:  # another process put its copy there first: use that one
            if _valid_entry(folder, digest, calibration) is None:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    found = _valid_entry(folder, digest, calibration)
    if found is None:
        raise ModelError(f"the converted model in {folder} does not read back; delete it")
    return folder, found


def calibration_path(model_path: Path) -> Path:
    """Where a model's int8 calibration tiles live: ``NAME.calibration.npz`` beside
    ``NAME.keras`` (written by ``python -m cellwatch.training.calibration``)."""
    return model_path.with_name(model_path.stem + ".calibration.npz")


def _calibration_digest(model_path: Path) -> str:
    path = calibration_path(model_path)
    if not path.is_file():
        raise ModelError(
            f"inference.precision int8 needs calibration tiles beside the model, {path}, "
            "and there are none; make them from the model's training images with "
            f"python -m cellwatch.training.calibration --model {model_path} --images "
            "TRAIN_IMAGES, or use precision auto, f32 or bf16"
        )
    return sha256_file(path)


def read_calibration(path: Path) -> list[np.ndarray]:
    """The calibration tiles stored at ``path``, each a float32 batch ``(1, H, W, C)``."""
    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as data:
            pixels, shapes = data["pixels"], data["shapes"]
            low, high = data["low"], data["high"]
        sizes = [int(np.prod(shape)) for shape in shapes]
        if not sizes or sum(sizes) != pixels.size or not len(low) == len(high) == len(sizes):
            raise ValueError("its tiles, shapes and ranges do not agree")
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
        raise ModelError(
            f"cannot read the int8 calibration tiles {path}: {exc}; make them again with "
            "python -m cellwatch.training.calibration"
        ) from exc
    tiles, at = [], 0
    for shape, size, lo, hi in zip(shapes, sizes, low, high, strict=True):
        plane = pixels[at : at + size].reshape(1, *shape).astype(np.float32)
        tiles.append(lo + plane * np.float32((hi - lo) / 255))
        at += size
    return tiles


def _quantized(ir: Any, model_path: Path) -> tuple[Any, dict[str, Any]]:
    """``ir`` quantized to int8 by NNCF on the model's calibration tiles, its first and
    last convolutions kept in f32 (the input's and the probabilities' fine steps)."""
    try:
        import nncf
    except ImportError as exc:
        raise ModelError(
            "inference.precision int8 needs the nncf package to convert the model once: "
            "pip install nncf"
        ) from exc

    tiles = read_calibration(calibration_path(model_path))
    convs = [
        op.get_friendly_name()
        for op in ir.get_ordered_ops()
        if op.get_type_name() in ("Convolution", "ConvolutionBackpropData")
    ]
    kept = sorted({convs[0], convs[-1]}) if len(convs) > 1 else []
    ignored = nncf.IgnoredScope(names=kept)
    quantized = nncf.quantize(
        ir, nncf.Dataset(tiles), subset_size=len(tiles), ignored_scope=ignored
    )
    record = {"nncf": nncf.__version__, "calibration_tiles": len(tiles), "kept_f32": kept}
    return quantized, record


def _valid_entry(folder: Path, digest: str, calibration: str | None) -> dict[str, Any] | None:
    """The entry's record when every file matches its hash (and an int8 entry was
    calibrated on the tiles beside the model now), else None."""
    try:
        entry = json.loads((folder / "entry.json").read_text(encoding="utf-8"))
        files = entry["files"]
        if entry.get("format") != ENTRY_FORMAT or entry.get("model_sha256") != digest:
            return None
        if entry.get("calibration_sha256") != calibration:
            return None
        if set(files) != {"model.xml", "model.bin"}:
            return None
        if any(sha256_file(folder / name) != want for name, want in files.items()):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return dict(entry)


def _convert(model_path: Path, folder: Path, precision: str) -> dict[str, Any]:
    """Convert a ``.keras`` model to OpenVINO IR in ``folder`` (this imports TensorFlow);
    returns what the cached path needs that only the Keras model can tell."""
    ov = _openvino()

    from cellwatch.model import load_model, measure_receptive_field

    loaded = load_model(model_path)
    network = loaded.network
    graph = _tf_graph(network)
    ir = ov.convert_model(graph)
    quantization = None
    if precision == "int8":
        ir, quantization = _quantized(ir, model_path)
    ov.save_model(ir, folder / "model.xml", compress_to_fp16=False)
    recorded = loaded.card.get("receptive_field")
    if not (isinstance(recorded, dict) and isinstance(recorded.get("radius_px"), int)):
        recorded = measure_receptive_field(network, diameter_px=loaded.diameter_px)
    return {
        "classes": loaded.classes,
        "grid_px": loaded.grid_px,
        "input_px": loaded.input_px,
        "receptive_field": recorded,
        "seed_map": loaded.seed_map,
        "quantization": quantization,
    }


def _tf_graph(network: Any) -> Any:
    import tensorflow as tf

    net = network  # OpenVINO folds the batch norms itself
    shape = [None, *tuple(network.input_shape)[1:]]
    spec = tf.TensorSpec(shape, tf.float32)
    return tf.function(lambda x: net(x, training=False)).get_concrete_function(spec)


# --- predicting -----------------------------------------------------------------------


def predict_fn(model: LoadedModel) -> PredictFn:
    """A function mapping a fixed-shape batch to float32 probabilities (averaged over the
    8 flips and rotations of each tile when the model is to ``augment``)."""
    if model.runtime == "openvino":
        fn = _openvino_predict_fn(model.network)
    else:
        fn = keras_predict_fn(model.network)
    return augmented(fn) if model.augment else fn


def augmented(fn: PredictFn) -> PredictFn:
    """``fn`` averaged over the 8 symmetries of the square (test-time augmentation): each
    rotated or flipped batch is predicted and turned back before it is added."""

    def predict(batch: np.ndarray) -> np.ndarray:
        total = np.zeros((*batch.shape[:3], 0), np.float32)
        for turns in range(4):
            for flip in (False, True):
                view = np.rot90(batch, turns, axes=(1, 2))
                view = view[:, :, ::-1] if flip else view
                out = np.asarray(fn(np.ascontiguousarray(view)), dtype=np.float32)
                out = out[:, :, ::-1] if flip else out
                out = np.rot90(out, -turns, axes=(1, 2))
                total = out.copy() if total.shape[-1] == 0 else total + out
        return total / 8

    return predict


def _openvino_predict_fn(compiled: Any) -> PredictFn:
    """One infer request, one batch at a time (OpenVINO spreads each over the cores)."""
    request, lock = compiled.create_infer_request(), threading.Lock()

    def predict(batch: np.ndarray) -> np.ndarray:
        with lock:
            out = request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})
            return np.array(out[0], dtype=np.float32)

    return predict


def keras_predict_fn(network: Any) -> PredictFn:
    """A function mapping a fixed-shape batch to probabilities, compiled once.

    On TensorFlow the network is one ``tf.function``, traced once per batch shape, with
    every batch normalization that follows a convolution folded into that
    convolution's kernel and bias (one fused conv + bias + activation instead of four
    passes over the activations: the default U-Net runs about 15-25 % faster; outputs
    agree to ~1e-6, and the unfolded network is used if they do not). XLA
    (``jit_compile``) stays off: on CPU it was about 20 % slower (``cellwatch bench``).
    When an accelerator runs out of memory, the batch is predicted again in halves and
    later batches keep the smaller size, so no work is lost
    (:func:`cellwatch.batching.split_on_out_of_memory`).
    """
    import keras

    from cellwatch.batching import split_on_out_of_memory

    if keras.backend.backend() != "tensorflow":
        # float32 out, also from a mixed-precision network
        return split_on_out_of_memory(
            lambda b: np.asarray(network.predict_on_batch(b), dtype=np.float32)
        )
    import tensorflow as tf

    def graph_of(net: Any) -> PredictFn:
        graph = tf.function(
            lambda x: net(x, training=False), jit_compile=False, reduce_retracing=True
        )
        return lambda batch: graph(batch).numpy()

    plain = graph_of(network)
    try:
        fast = graph_of(_folded(network))
        side = [d or 64 for d in network.input_shape[1:3]]
        probe = np.random.default_rng(0).random((1, *side, 1), dtype=np.float32)
        agree = np.allclose(fast(probe), plain(probe), rtol=0, atol=1e-4)
    except Exception:  # an unusual graph: run it as it is
        agree = False
    return split_on_out_of_memory(fast if agree else plain)


def _folded(net: Any) -> Any:
    """``net`` with each batch norm after a linear conv folded into the conv."""
    import keras

    conv_types = (keras.layers.Conv2D, keras.layers.Conv2DTranspose)
    norms = {}  # conv name -> the batch norm that alone consumes its output
    for layer in net.layers:
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        conv = layer._inbound_nodes[0].input_tensors[0]._keras_history.operation
        if (
            isinstance(conv, conv_types)
            and len(layer._inbound_nodes) == 1
            and len(conv._outbound_nodes) == 1
            and conv.get_config().get("activation") == "linear"
            and conv.data_format == "channels_last"
            and layer.axis in (-1, 3)
        ):
            norms[conv.name] = layer
    if not norms:
        return net
    dropped = {bn.name for bn in norms.values()}
    clones: dict[str, Any] = {}

    def clone(layer: Any) -> Any:
        config = layer.get_config()
        if layer.name in norms:
            config["use_bias"] = True
        clones[layer.name] = layer.__class__.from_config(config)
        return clones[layer.name]

    def call(layer: Any, *args: Any, **kwargs: Any) -> Any:
        return args[0] if layer.name in dropped else layer(*args, **kwargs)

    out = keras.models.clone_model(net, clone_function=clone, call_function=call)
    for layer in net.layers:
        if layer.name in dropped or layer.name not in clones:
            continue
        bn = norms.get(layer.name)
        if bn is None:
            clones[layer.name].set_weights(layer.get_weights())
            continue
        gamma = bn.gamma.numpy() if bn.scale else 1.0
        scale = gamma / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
        shift = bn.beta.numpy() if bn.center else 0.0
        bias = layer.bias.numpy() if layer.use_bias else 0.0
        kernel = layer.kernel.numpy()  # transposed convs keep (kh, kw, out, in)
        kernel = kernel * (scale[:, None] if isinstance(layer, conv_types[1]) else scale)
        new_bias = (bias - bn.moving_mean.numpy()) * scale + shift
        clones[layer.name].set_weights([kernel, new_bias.astype(kernel.dtype)])
    return out


def device_name(model: LoadedModel) -> str:
    """What the network runs on, e.g. ``cpu (openvino bf16)`` or ``gpu:0 NVIDIA H100 (jax)``."""
    if model.runtime == "openvino":
        return f"cpu (openvino {model.precision})"
    from cellwatch.model import device_name as keras_device

    return keras_device()
