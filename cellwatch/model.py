"""The U-Net: building, saving with its model card, and loading safely.

Model contract: a Keras 3 ``.keras`` file whose input is ``(batch, tile, tile, 1)``
normalized float32 and whose output is ``(batch, tile, tile, C)`` probabilities, with
C = 3 (background, interior, boundary), C = 4 (the same and a seed map, the inner
distance: 1 at each cell's centre, falling to 0 at its outline; the card says
``"seed_map": "inner_distance"``) or C = 1 (foreground). Beside it, ``<name>.json``
is the model card: how it was trained, the cell diameter (pixels) it was trained at and,
where measured, the one it is run at (``working_diameter_px``), which prediction uses to
rescale images, and the context (receptive field) the network needs,
which tiling uses to choose the overlap (:func:`measure_receptive_field`; measured once,
when the card lacks it).
"""

from __future__ import annotations

__all__ = [
    "BUNDLED_MODEL",
    "MIN_KERAS",
    "LoadedModel",
    "build_seed_unet",
    "build_unet",
    "card_path",
    "choose_backend",
    "device_name",
    "load_model",
    "measure_receptive_field",
    "model_label",
    "pooling_grid",
    "read_card",
    "visible_gpus",
    "with_seed_head",
    "write_card",
]

import json
import os
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from cellwatch.errors import ModelError
from cellwatch.storage.imageio import sha256_file

MIN_KERAS = (3, 14)
BUNDLED_MODEL = Path(__file__).parent / "models" / "cellwatch-nuclei.keras"
RF_TOLERANCE = 1e-3  # output change (probabilities) below which context no longer counts
RF_PROBE_PX = 512  # side of the first probe image; doubled while the field reaches its edge
RF_MAX_PROBE_PX = 2048
SEED_MAPS = ("inner_distance",)  # what a fourth output channel may hold


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to predict, with what the ledger records about it."""

    network: Any  # keras.Model
    name: str
    sha256: str
    classes: int
    diameter_px: float | None  # cell diameter the model was trained at, if known
    pixel_size_um: float | None
    card: dict[str, Any]
    grid_px: int = 1  # the pooling grid: tile origins on multiples of it see the same phase
    input_px: int | None = None  # the side of the input, when the network fixes it
    runtime: str = "keras"  # what runs the network: "keras" or "openvino" (cellwatch.runtime)
    precision: str = "f32"  # "f32", "bf16" or "int8"
    augment: bool = False  # average the network's answers over 8 flips and rotations

    @cached_property
    def context_px(self) -> int | None:
        """The receptive-field radius the network needs (see :func:`measure_receptive_field`):
        from the model card, else measured now, once. None for a network of fixed input
        size."""
        recorded = self.card.get("receptive_field")
        if isinstance(recorded, dict) and isinstance(recorded.get("radius_px"), int):
            return int(recorded["radius_px"])
        if self.runtime != "keras":  # its cache entry put what it measured in the card
            return None
        measured = measure_receptive_field(self.network, diameter_px=self.diameter_px)
        return None if measured is None else int(measured["radius_px"])

    @property
    def working_diameter_px(self) -> float | None:
        """The cell diameter images are zoomed to for the network: the card's
        ``working_diameter_px`` when it records one (a size measured to count as well for
        fewer pixels; within the ±40 % scale jitter the model was trained with), else the
        ``diameter_px`` it was trained at."""
        return _positive(self.card.get("working_diameter_px")) or self.diameter_px

    @property
    def working_pixel_size_um(self) -> float | None:
        """The pixel size (µm) at which cells have :attr:`working_diameter_px`: the card's
        ``pixel_size_um`` (at which they have ``diameter_px``), scaled alike."""
        trained, working = self.diameter_px, self.working_diameter_px
        if self.pixel_size_um is None or trained is None or working is None:
            return self.pixel_size_um
        return self.pixel_size_um * trained / working

    @property
    def seed_map(self) -> str | None:
        """What the fourth output channel holds (``"inner_distance"``), or None when the
        model has no seed head."""
        return "inner_distance" if self.classes == 4 else None

    @property
    def label(self) -> str:
        """``name@hash`` as written in the ledger's ``model`` column."""
        return f"{self.name}@{self.sha256[:12]}"


def model_label(path: str | Path | None = None) -> str:
    """``name@hash`` of a model file as :attr:`LoadedModel.label` gives it, without loading
    the network (what a driver that leaves the network to its workers records)."""
    path = Path(path) if path is not None else BUNDLED_MODEL
    try:
        return f"{path.stem}@{sha256_file(path)[:12]}"
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc.strerror or exc}") from exc


def visible_gpus(
    environ: Mapping[str, str] | None = None, proc: Path = Path("/proc/driver/nvidia/gpus")
) -> int:
    """How many NVIDIA GPUs this process may use, without loading a framework: the GPUs the
    driver lists, or as many as ``CUDA_VISIBLE_DEVICES`` names."""
    environ = os.environ if environ is None else environ
    try:
        present = len(list(proc.iterdir()))
    except OSError:
        present = 0
    chosen = environ.get("CUDA_VISIBLE_DEVICES")
    if chosen is None or not present:
        return present
    names = [d for d in chosen.split(",") if d.strip() and d.strip() != "-1"]
    return min(present, len(names))


def choose_backend(environ: MutableMapping[str, str] | None = None) -> str | None:
    """Pick the Keras backend before Keras is imported: JAX when a GPU is visible, JAX with
    CUDA is installed (``pip install 'cellwatch[gpu]'``) and the user did not set
    ``KERAS_BACKEND``. Returns the backend chosen, or None when left as it was."""
    import importlib.util

    environ = os.environ if environ is None else environ
    if environ.get("KERAS_BACKEND") or not visible_gpus(environ):
        return None
    cuda_plugin = ("jax_cuda12_plugin", "jax_cuda13_plugin")
    if importlib.util.find_spec("jax") is None or not any(
        importlib.util.find_spec(name) for name in cuda_plugin
    ):
        return None
    environ["KERAS_BACKEND"] = "jax"
    return "jax"


def device_name() -> str:
    """What the network runs on in this process, e.g. ``gpu:0 NVIDIA H100 (jax)``."""
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "jax":
            import jax

            d = jax.devices()[0]
            return f"{d.platform}:{d.id} {getattr(d, 'device_kind', '')} (jax)".replace("  ", " ")
        if backend == "tensorflow":
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU")
            if gpus:
                name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "")
                return f"gpu:0 {name} (tensorflow)".strip()
            return "cpu (tensorflow)"
        if backend == "torch":
            import torch

            if torch.cuda.is_available():
                return f"gpu:0 {torch.cuda.get_device_name(0)} (torch)"
            return "cpu (torch)"
    except Exception as exc:  # a device query must never stop the counting
        return f"unknown ({backend}: {exc})"
    return f"cpu ({backend})"


def card_path(model_path: Path) -> Path:
    """Where a model's card lives: beside it, ``NAME.json`` for ``NAME.keras``."""
    return model_path.with_suffix(".json")


def load_model(path: str | Path | None = None) -> LoadedModel:
    """Load a ``.keras`` model in safe mode (no Lambda layers) with its model card."""
    import keras

    path = Path(path) if path is not None else BUNDLED_MODEL
    version = tuple(int(p) for p in keras.__version__.split(".")[:2])
    if version < MIN_KERAS:
        raise ModelError(
            f"Keras {keras.__version__} is too old to load models safely; "
            f"install keras>={'.'.join(map(str, MIN_KERAS))}"
        )
    if not path.is_file():
        bundled = " (the bundled model is missing: reinstall cellwatch)"
        hint = bundled if path == BUNDLED_MODEL else ""
        raise ModelError(f"no model file at {path}{hint}; pass --model PATH to a .keras file")
    if path.suffix != ".keras":
        raise ModelError(f"{path} is not a Keras 3 model: expected a .keras file")
    try:
        network = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # keras raises many types; all mean the same to the user
        raise ModelError(f"cannot load model {path}: {exc}") from exc
    return model_from_network(network, path, read_card(path))


def model_from_network(network: Any, path: Path, card: dict[str, Any]) -> LoadedModel:
    """A model ready to predict from a network in memory, saved at ``path`` with ``card``."""
    classes = _check_contract(network, path)
    seed_map = card.get("seed_map")
    if classes == 4 and seed_map not in (None, *SEED_MAPS):
        raise ModelError(
            f"{path}: the model card names a seed map {seed_map!r} that this version of "
            f"cellwatch cannot use (it knows {', '.join(SEED_MAPS)}); update cellwatch"
        )
    if classes != 4 and seed_map is not None:
        raise ModelError(
            f"{path}: the model card names a seed map {seed_map!r}, but the model gives "
            f"{classes} output channels, not 4; the card belongs to another model"
        )
    return LoadedModel(
        network=network,
        name=path.stem,
        sha256=sha256_file(path),
        classes=classes,
        diameter_px=_positive(card.get("diameter_px")),
        pixel_size_um=_positive(card.get("pixel_size_um")),
        card=card,
        grid_px=pooling_grid(network),
        input_px=_fixed_side(network),
    )


def read_card(model_path: Path) -> dict[str, Any]:
    """The model's card (its settings, data and metrics), or ``{}`` when it has none."""
    path = card_path(model_path)
    if not path.exists():
        return {}
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"model card {path} is unreadable: {exc}") from exc
    if not isinstance(card, dict):
        raise ModelError(f"model card {path} must be a JSON object")
    return card


def write_card(model_path: Path, card: dict[str, Any]) -> Path:
    """Write the card beside the model, atomically; returns its path."""
    path = card_path(model_path)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(
        json.dumps(card, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8"
    )
    os.replace(tmp, path)
    return path


def _check_contract(network: Any, path: Path) -> int:
    in_shape = tuple(network.input_shape)
    out_shape = tuple(network.output_shape)
    if len(in_shape) != 4 or in_shape[-1] != 1:
        raise ModelError(f"{path}: input must be (batch, height, width, 1), got {in_shape}")
    if len(out_shape) != 4 or out_shape[-1] not in (1, 3, 4):
        raise ModelError(
            f"{path}: output must be (batch, height, width, 1, 3 or 4), got {out_shape}"
        )
    return int(out_shape[-1])


def _fixed_side(network: Any) -> int | None:
    height, width = tuple(network.input_shape)[1:3]
    return int(height) if height is not None and height == width else None


def _positive(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and value > 0 else None


# --- the context a network needs ------------------------------------------------------


def pooling_grid(network: Any) -> int:
    """The product of the strides of the network's downsampling layers (poolings, strided
    convolutions): 2**depth for a U-Net. Tiles whose origins are multiples of it meet
    every pooling at the same phase as the whole image does. (With parallel downsampling
    branches this is a multiple of the true grid, which serves as well.)"""
    grid = 1
    for layer in network.layers:
        if hasattr(layer, "layers"):  # a nested model
            grid *= pooling_grid(layer)
            continue
        strides = getattr(layer, "strides", None)
        if isinstance(strides, tuple | list) and "Transpose" not in type(layer).__name__:
            grid *= max(int(s) for s in strides)
    return grid


def measure_receptive_field(
    network: Any,
    *,
    tolerance: float = RF_TOLERANCE,
    diameter_px: float | None = None,
) -> dict[str, Any] | None:
    """The effective receptive-field radius: how far from a tile edge a pixel must lie for
    its probabilities to be those of the whole image, to ``tolerance``.

    Measured as tiling meets it: the network runs on a probe image and on each half of it
    (cut on the pooling grid), and the radius is one more than the farthest distance from
    the cut at which a half's output differs from the whole's by ``tolerance`` or more
    (any class, any position along the cut). The probe is synthetic nuclei: blurred discs
    of about the model's cell diameter on a dim, noisy background, two of them, as on
    featureless input (zeros, uniform noise) the field looks far smaller than on cells.
    The probe is enlarged while the field reaches its edge. For the bundled U-Net this
    takes a few seconds on two CPU cores; ``cellwatch train`` records the result in the card.

    Returns the card entry ``{"radius_px", "tolerance", "grid_px", "probe_px", "method"}``,
    or None for a network whose input size is fixed (it cannot be cut).
    """
    import keras

    if any(d is not None for d in tuple(network.input_shape)[1:3]):
        return None
    grid = pooling_grid(network)
    size = -(-max(RF_PROBE_PX, 2 * grid) // (2 * grid)) * 2 * grid

    def predict(image: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(image, dtype=np.float32)[None, ..., None]
        return np.asarray(keras.ops.convert_to_numpy(network(batch, training=False)))[0]

    while True:
        profile = np.zeros(size // 2)
        for seed in (0, 1):
            probe = _probe_nuclei(size, diameter_px or 20.0, seed)
            profile = np.maximum(profile, _edge_effect(predict, probe))
        over = np.flatnonzero(profile >= tolerance)
        radius = int(over[-1]) + 1 if over.size else 0
        if radius < size // 2 or size >= RF_MAX_PROBE_PX:
            break
        size *= 2
    return {
        "radius_px": radius,
        "tolerance": tolerance,
        "grid_px": grid,
        "probe_px": size,
        "method": "largest distance from a cut edge at which a half of a synthetic-nuclei "
        "probe changes the output by the tolerance, plus one",
    }


def _edge_effect(predict: Callable[[np.ndarray], np.ndarray], probe: np.ndarray) -> np.ndarray:
    """``out[d]``: the largest change of any output at distance ``d`` from a cut edge,
    when the network sees one half of ``probe`` (cut across the middle of either axis)
    instead of all of it. ``predict`` maps an ``(H, W)`` image to ``(H, W, C)``."""
    half = probe.shape[0] // 2
    whole = predict(probe)
    profile = np.zeros(half)
    for axis in (0, 1):
        for first in (True, False):
            part: list[slice] = [slice(None), slice(None)]
            part[axis] = slice(0, half) if first else slice(half, 2 * half)
            change = np.abs(predict(probe[tuple(part)]) - whole[tuple(part)])
            by_distance = change.max(axis=(1 - axis, 2))
            profile = np.maximum(profile, by_distance[::-1] if first else by_distance)
    return profile


def _probe_nuclei(size: int, diameter: float, seed: int) -> np.ndarray:
    """A normalized image of soft discs covering about half of it, brightness varying."""
    rng = np.random.default_rng(seed)
    image = rng.normal(0.05, 0.02, (size, size))
    count = int(0.5 * size * size / (np.pi * (diameter / 2) ** 2))
    reach = int(np.ceil(0.65 * diameter)) + 12  # the sigmoid edge is < 1e-5 beyond
    for cy, cx, scale, brightness in zip(
        *rng.uniform(0, size, (2, count)),
        rng.uniform(0.6, 1.3, count),
        rng.uniform(0.3, 1.0, count),
        strict=True,
    ):
        y0, x0 = max(0, int(cy) - reach), max(0, int(cx) - reach)
        yy, xx = np.ogrid[y0 : min(size, int(cy) + reach), x0 : min(size, int(cx) + reach)]
        edge = np.hypot(yy - cy, xx - cx) - scale * diameter / 2
        image[yy, xx] += brightness / (1 + np.exp(np.clip(edge, -50, 50)))
    return np.clip(image, 0, 1.2).astype(np.float32)


# --- architectures --------------------------------------------------------------------


def build_unet(
    depth: int = 4,
    filters: int = 16,
    classes: int = 3,
    name: str = "unet",
    *,
    seed_head: bool = False,
) -> Any:
    """A classic U-Net: two 3×3 conv + batch norm + ReLU per level, max-pool down,
    2×2 transposed conv up, skip concatenations, softmax (or sigmoid for one class).
    With ``seed_head`` (three classes only) a fourth output channel learns the inner
    distance (:func:`with_seed_head`)."""
    import keras
    from keras import layers

    def block(x: Any, n: int) -> Any:
        for _ in range(2):
            x = layers.Conv2D(n, 3, padding="same", use_bias=False)(x)
            x = layers.BatchNormalization()(x)
            x = layers.ReLU()(x)
        return x

    inputs = keras.Input((None, None, 1), name="image")
    x, skips = inputs, []
    for level in range(depth):
        x = block(x, filters * 2**level)
        skips.append(x)
        x = layers.MaxPooling2D(2)(x)
    x = block(x, filters * 2**depth)
    for level in reversed(range(depth)):
        x = layers.Conv2DTranspose(filters * 2**level, 2, strides=2, padding="same")(x)
        x = layers.Concatenate()([x, skips[level]])
        x = block(x, filters * 2**level)
    activation = "sigmoid" if classes == 1 else "softmax"
    outputs = layers.Conv2D(
        classes, 1, activation=activation, dtype="float32", name="probabilities"
    )(x)
    network = keras.Model(inputs, outputs, name=name)
    return with_seed_head(network) if seed_head else network


def with_seed_head(network: Any, seed: int | None = None) -> Any:
    """``network`` (a three-class model) with a seed head beside its last layer.

    The last layer, a 1×1 softmax convolution to three classes, is kept (its weights
    copied into a layer named ``classes``); a new 1×1 sigmoid convolution over the same
    features (``inner_distance``, freshly initialised with ``seed``) learns the inner
    distance (:func:`cellwatch.training.targets.inner_distance`). The two are
    concatenated into one four-channel output named ``probabilities``, so tiling and
    stitching carry the seed map like the classes. The trunk's layers are shared, with
    their weights: fine-tuning ``--from`` a trained model starts from what it knows.

    Raises
    ------
    ModelError
        When the network does not end in a convolution to three classes.
    """
    import keras
    from keras import layers

    last = network.layers[-1]
    if not isinstance(last, layers.Conv2D) or last.filters != 3 or last.kernel_size != (1, 1):
        raise ModelError(
            "a seed head is added beside a model's last layer, a 1×1 convolution to three "
            f"classes; {network.name} ends in {type(last).__name__} with "
            f"{network.output_shape[-1]} output channels"
        )
    features = last.input
    classes = layers.Conv2D(3, 1, activation="softmax", dtype="float32", name="classes")
    distance = layers.Conv2D(
        1,
        1,
        activation="sigmoid",
        dtype="float32",
        name="inner_distance",
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
    )
    outputs = layers.Concatenate(dtype="float32", name="probabilities")(
        [classes(features), distance(features)]
    )
    headed = keras.Model(network.input, outputs, name=network.name)
    classes.set_weights(last.get_weights())
    return headed


def build_seed_unet(filters: int = 64, tile: int = 256, name: str = "seed") -> Any:
    """The encoder-decoder U-Net of the notebook cellwatch grew from: eight 4×4 stride-2
    convolutions with LeakyReLU and batch norm down to 1×1, mirrored 2×2 transposed
    convolutions (dropout on the first three), skip concatenations, sigmoid output."""
    import keras
    from keras import layers

    widths = [filters * m for m in (1, 2, 4, 8, 8, 8, 8, 8)]
    inputs = keras.Input((tile, tile, 1), name="image")
    x, skips = inputs, []
    for i, n in enumerate(widths):
        x = layers.Conv2D(n, 4, strides=2, padding="same", use_bias=False)(x)
        if i > 0:
            x = layers.BatchNormalization()(x)
        x = layers.LeakyReLU(0.2)(x)
        skips.append(x)
    for i, n in enumerate(reversed(widths[:-1])):
        x = layers.Conv2DTranspose(n, 2, strides=2, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        if i < 3:
            x = layers.Dropout(0.5)(x)
        x = layers.ReLU()(x)
        x = layers.Concatenate()([x, skips[-(i + 2)]])
    outputs = layers.Conv2DTranspose(
        1, 2, strides=2, padding="same", activation="sigmoid", dtype="float32", name="probabilities"
    )(x)
    return keras.Model(inputs, outputs, name=name)
