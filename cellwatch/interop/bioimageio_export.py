"""``cellwatch export``: a cellwatch model as a bioimage.io model package (format 0.5).

The package is built with ``bioimageio.spec``'s own model classes and written with its
``save_bioimageio_package`` (nothing here writes YAML), and holds:

- ``rdf.yaml``: one input tensor ``image`` (batch, y, x, one channel) with ``scale_range``
  preprocessing at the model card's percentiles, as cellwatch normalizes images (then
  ``scale_linear`` 1 − x for a model taught on dark cells, which sees them inverted); one
  output tensor ``probabilities`` (batch, y, x, one channel per class) with the halo, the
  context each output edge needs (:func:`halo_px`);
- weights as ONNX (converted with tf2onnx through Keras' own exporter; runs in deepImageJ,
  ilastik and bioimageio.core without TensorFlow) and as the Keras 3 file itself;
- a test input and output computed by cellwatch: a sample image brought to the model's
  cell size by cellwatch's own scale step, and the network's answer on it after
  cellwatch's normalization;
- the model card's description, training data and citations, and a README.

Needs ``pip install 'cellwatch[bioimageio]'``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import replace
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from cellwatch.config import Config, TilingConfig, load_config, with_card_input
from cellwatch.errors import ConfigError, ModelError
from cellwatch.model import LoadedModel, load_model
from cellwatch.postprocess import outline_growth, peak_threshold
from cellwatch.storage import imageio
from cellwatch.tiling import DEFAULT_OVERLAP

__all__ = ["SAMPLE", "add_arguments", "export_model", "halo_px", "run", "test_tensors"]

log = logging.getLogger("cellwatch.export")

#: A fluorescence image of nuclei (BBBC038 / 2018 Data Science Bowl, CC0) for the test
#: tensors when no ``--sample`` is given.
SAMPLE = Path(__file__).parent / "data" / "nuclei-sample.tif"
TEST_SIDE = 256  # the test input's side, in pixels at the model's scale (at most)
ONNX_OPSET = 15  # read by the ONNX Runtime versions deepImageJ and ilastik ship
ONNX_ATOL = 1e-4  # the ONNX weights must give the Keras weights' probabilities this closely
INPUT_ID, OUTPUT_ID = "image", "probabilities"
DEFAULT_CITE = (
    {
        "text": "Ronneberger, Fischer & Brox. U-Net: Convolutional Networks for Biomedical "
        "Image Segmentation. MICCAI 2015.",
        "doi": "10.1007/978-3-319-24574-4_28",
    },
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``cellwatch export``."""
    parser.add_argument(
        "--model", type=Path, help="model file (.keras); default: model.path, or the bundled model"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="the package to write (PACKAGE.zip)"
    )
    parser.add_argument(
        "--sample",
        type=Path,
        help="an image of the kind the model counts, for the test tensors and the cover "
        "(default: a nuclei image shipped with cellwatch)",
    )
    parser.add_argument("--config", type=Path, help="configuration file (YAML)")


def run(args: argparse.Namespace) -> int:
    """``cellwatch export``: write the package; 0 on success."""
    config = load_config(args.config)
    model = args.model or (Path(config.model.path) if config.model.path else None)
    out = export_model(model, args.out, sample=args.sample, config=config)
    print(f"wrote {out}; check it with: bioimageio test {out}")
    return 0


def halo_px(card: Mapping[str, Any], tiling: TilingConfig) -> int:
    """Pixels of context each edge of the output needs: the model card's ``halo_px``, else
    the radius of the receptive field it records (``receptive_field.radius_px``, as
    :func:`cellwatch.model.measure_receptive_field` measures it and ``cellwatch train``
    writes it; or half a ``receptive_field_px``); otherwise half a fixed tiling overlap,
    the margin that tiling discards at each tile's edge (seams fall in the middle of the
    overlap), or half :data:`cellwatch.tiling.DEFAULT_OVERLAP` with ``overlap: auto``."""
    field = card.get("receptive_field")
    radius = field.get("radius_px") if isinstance(field, Mapping) else None
    for value, divisor in (
        (card.get("halo_px"), 1),
        (radius, 1),
        (card.get("receptive_field_px"), 2),
    ):
        if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
            return int(np.ceil(value / divisor))
    overlap = DEFAULT_OVERLAP if tiling.overlap == "auto" else tiling.overlap
    return overlap // 2


def export_model(
    model_path: Path | None,
    out: Path,
    *,
    sample: Path | None = None,
    config: Config | None = None,
) -> Path:
    """Write ``model_path`` (the bundled model when None) as a bioimage.io package.

    Parameters
    ----------
    model_path : Path or None
        A ``.keras`` model with its card beside it.
    out : Path
        The ``.zip`` to write.
    sample : Path, optional
        The image the test tensors come from (:data:`SAMPLE` by default).
    config : Config, optional
        Settings for reading and scaling the sample; the defaults when None.

    Returns
    -------
    Path
        ``out``.

    Raises
    ------
    ConfigError
        When ``out`` is not a ``.zip`` path or the export libraries are missing.
    ModelError
        When the model cannot be converted faithfully to ONNX.
    """
    out = Path(out)
    if out.suffix.lower() != ".zip":
        raise ConfigError(f"--out {out}: a bioimage.io package is a .zip file; name it PACKAGE.zip")
    try:
        from bioimageio.spec import save_bioimageio_package
    except ImportError as exc:
        raise ConfigError(
            "exporting needs bioimageio.spec, tf2onnx and onnxruntime: "
            "pip install 'cellwatch[bioimageio]'"
        ) from exc
    config = config or Config()
    model = load_model(model_path)
    # a model taught on dark cells sees its input inverted (the card says so); the package
    # must then invert too
    inverted = bool(with_card_input(config, model.card).input.invert)
    config = replace(config, input=replace(config.input, invert=inverted))
    if inverted and sample is None:
        raise ConfigError(
            f"{model.name} was taught on dark cells on a light background (brightfield) and "
            "the bundled sample shows fluorescent nuclei: give one of the images it counts "
            "with --sample for the package's test input"
        )
    with tempfile.TemporaryDirectory(prefix="cellwatch-export-") as tmp:
        folder = Path(tmp)
        test_input, test_output = test_tensors(model, config, sample or SAMPLE)
        np.save(folder / "test_input.npy", test_input)
        np.save(folder / "test_output.npy", test_output)
        onnx = _to_onnx(model, folder / f"{model.name}.onnx")
        _check_onnx(onnx, _normalized(test_input, model, config), test_output)
        keras_file = folder / f"{model.name}.keras"
        shutil.copyfile(model_path or _bundled(), keras_file)
        (folder / "README.md").write_text(_documentation(model, config), encoding="utf-8")
        descr = _description(model, config, folder, onnx, keras_file, test_input, test_output)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_bioimageio_package(descr, output_path=out)
    log.info("wrote %s", out)
    return out


def test_tensors(model: LoadedModel, config: Config, sample: Path) -> tuple[np.ndarray, np.ndarray]:
    """The test input (raw intensities at the model's scale, float32, ``(1, y, x, 1)``)
    and the probabilities the network gives for it after cellwatch's normalization.

    The sample is brought to the model's cell size as cellwatch would (the scale the
    pipeline chooses for it: configured, from the pixel size, or estimated), and its
    centre is cut to a square that the network's input sizes allow.
    """
    from cellwatch.pipeline import Segmenter
    from cellwatch.preprocess import finite_float32, rescale

    pixels = imageio.read_image(sample, channel=config.input.channel, stack=config.input.stack,
                                plane=config.input.plane).pixels  # fmt: skip
    segmenter = Segmenter(config, model)
    scale = segmenter.segment(pixels, config.scale.pixel_size_um).scale.scale
    scaled = rescale(finite_float32(pixels), scale)
    step, fixed = _size_rule(model)
    side = fixed or min(TEST_SIDE, min(scaled.shape) // step * step)
    if side < _min_side(model, config) or min(scaled.shape) < side:
        raise ConfigError(
            f"{sample} is {scaled.shape[0]}×{scaled.shape[1]} pixels at the model's scale "
            f"(zoom {scale:.2f}); the test input needs {max(side, _min_side(model, config))}×"
            f"{max(side, _min_side(model, config))}: give a larger --sample"
        )
    y0, x0 = (scaled.shape[0] - side) // 2, (scaled.shape[1] - side) // 2
    crop = np.ascontiguousarray(scaled[y0 : y0 + side, x0 : x0 + side], dtype=np.float32)
    test_input = crop[None, ..., None]
    batch = _normalized(test_input, model, config)
    test_output = np.asarray(model.network.predict_on_batch(batch), dtype=np.float32)
    return test_input, test_output


def _normalized(test_input: np.ndarray, model: LoadedModel, config: Config) -> np.ndarray:
    from cellwatch.preprocess import Normalization

    low, high = _percentiles(model, config)
    plane = test_input[0, ..., 0]
    normalization = Normalization.of(plane, low, high, invert=bool(config.input.invert))
    return normalization.apply(plane)[None, ..., None]


def _percentiles(model: LoadedModel, config: Config) -> tuple[float, float]:
    """The model card's normalization percentiles (those it was trained with), else the
    configuration's."""
    card = model.card.get("normalize") or {}
    low = card.get("low_percentile", config.normalize.low_percentile)
    high = card.get("high_percentile", config.normalize.high_percentile)
    return float(low), float(high)


def _size_rule(model: LoadedModel) -> tuple[int, int | None]:
    """(step, fixed side): input sides must be multiples of ``step`` (a U-Net halves them
    ``depth`` times), or exactly ``fixed`` for a network built for one tile size."""
    shape = tuple(model.network.input_shape)
    if shape[1] is not None and shape[2] is not None:
        return int(shape[1]), int(shape[1])
    settings = model.card.get("settings") or {}
    depth = settings.get("depth", 4) if model.card.get("architecture", "unet") == "unet" else 4
    return 2 ** int(depth), None


def _min_side(model: LoadedModel, config: Config) -> int:
    """The smallest input side: a multiple of the step with room for both halos."""
    step, fixed = _size_rule(model)
    if fixed:
        return fixed
    halo = halo_px(model.card, config.tiling)
    return (2 * halo // step + 1) * step


def _to_onnx(model: LoadedModel, path: Path) -> Path:
    import keras

    spec = keras.InputSpec(shape=(None, None, None, 1), dtype="float32", name=INPUT_ID)
    try:
        with warnings.catch_warnings():
            # Keras' tf2onnx patch probes numpy for np.object, which numpy 2 warns about
            warnings.simplefilter("ignore", FutureWarning)
            model.network.export(
                str(path),
                format="onnx",
                verbose=False,
                input_signature=[spec],
                opset_version=ONNX_OPSET,
            )
    except ImportError as exc:
        raise ConfigError(
            f"converting to ONNX needs tf2onnx ({exc}): pip install 'cellwatch[bioimageio]'"
        ) from exc
    except Exception as exc:  # the converter raises many types; all mean the same here
        raise ModelError(f"cannot convert {model.name} to ONNX: {exc}") from exc
    return path


def _check_onnx(path: Path, batch: np.ndarray, expected: np.ndarray) -> None:
    """The ONNX weights, run by ONNX Runtime, must answer as the Keras weights do."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (found,) = session.run(None, {session.get_inputs()[0].name: batch})
    worst = float(np.abs(found - expected).max())
    if not worst <= ONNX_ATOL:
        raise ModelError(
            f"the ONNX conversion of the model differs from it by up to {worst:.2g} "
            f"(allowed {ONNX_ATOL}); the package was not written"
        )


def _description(
    model: LoadedModel,
    config: Config,
    folder: Path,
    onnx: Path,
    keras_file: Path,
    test_input: np.ndarray,
    test_output: np.ndarray,
) -> Any:
    from bioimageio.spec.model import v0_5 as bio

    card = model.card
    low, high = _percentiles(model, config)
    step, fixed = _size_rule(model)
    size = fixed or bio.ParameterizedSize(min=_min_side(model, config), step=step)
    halo = halo_px(card, config.tiling)
    classes = _channel_names(model)
    space_in = [bio.SpaceInputAxis(id=bio.AxisId(a), size=size) for a in ("y", "x")]
    space_out = [
        bio.SpaceOutputAxisWithHalo(
            id=bio.AxisId(a),
            size=bio.SizeReference(tensor_id=bio.TensorId(INPUT_ID), axis_id=bio.AxisId(a)),
            halo=halo,
        )
        for a in ("y", "x")
    ]
    image = bio.InputTensorDescr(
        id=bio.TensorId(INPUT_ID),
        description="one gray (single-channel) image, raw intensities, cells at the model's size",
        axes=[bio.BatchAxis(), *space_in, bio.ChannelAxis(channel_names=[bio.Identifier("gray")])],
        test_tensor=bio.FileDescr(source=folder / "test_input.npy"),
        sample_tensor=bio.FileDescr(source=_tiff(folder / "sample_input.tif", test_input)),
        preprocessing=_preprocessing(bio, low, high, inverted=bool(config.input.invert)),
    )
    probabilities = bio.OutputTensorDescr(
        id=bio.TensorId(OUTPUT_ID),
        description=(
            "the probability of each class at each pixel: " + ", ".join(classes)
            if not model.seed_map  # the spec allows 128 characters
            else f"class probabilities ({', '.join(classes[:-1])}) and the seed map "
            f"{classes[-1]}: 1 at cell centres, 0 at outlines"
        ),
        axes=[
            bio.BatchAxis(),
            *space_out,
            bio.ChannelAxis(channel_names=[bio.Identifier(c) for c in classes]),
        ],
        test_tensor=bio.FileDescr(source=folder / "test_output.npy"),
        sample_tensor=bio.FileDescr(source=_tiff(folder / "sample_output.tif", test_output)),
    )
    # the spec's own cover: the test input and output side by side
    covers = bio.generate_covers([(image, test_input)], [(probabilities, test_output)])
    import keras

    # the backend that loaded and checked these weights here (a .keras file runs on any)
    backend = keras.backend.backend()
    backend_version = str(importlib.import_module(backend).__version__)
    return bio.ModelDescr(
        name=_name(model),
        description=_summary(model),
        authors=[bio.Author(**a) for a in card.get("authors") or [{"name": "cellwatch"}]],
        cite=[bio.CiteEntry(**c) for c in card.get("cite") or DEFAULT_CITE],
        license=bio.LicenseId(str(card.get("license", "MIT"))),
        tags=["nuclei", "fluorescence", "segmentation", "unet", "2d", "cellwatch"],
        documentation=bio.FileDescr(source=folder / "README.md"),
        covers=covers,
        inputs=[image],
        outputs=[probabilities],
        training_data=_training_data(card),
        weights=bio.WeightsDescr(
            keras_v3=bio.KerasV3WeightsDescr(
                source=keras_file,
                keras_version=installed_version("keras"),
                backend=(backend, backend_version),
            ),
            onnx=bio.OnnxWeightsDescr(source=onnx, opset_version=ONNX_OPSET, parent="keras_v3"),
        ),
        config=bio.Config(
            bioimageio=bio.BioimageioConfig(),
            **{"cellwatch": _cellwatch_config(model, config, halo, test_input.shape[1])},  # type: ignore[arg-type]
        ),
    )


def _training_data(card: Mapping[str, Any]) -> Any:
    data = card.get("data")
    if not isinstance(data, Mapping) or not data.get("source"):
        return None
    from bioimageio.spec.dataset.v0_3 import DatasetDescr
    from bioimageio.spec.generic.v0_3 import Author, CiteEntry

    counts = ", ".join(
        f"{data[k]} {k.split('_')[0]} images" for k in ("train_images", "val_images") if k in data
    )
    return DatasetDescr(
        name=str(data.get("name") or "training data of " + str(card.get("name", "the model"))),
        description=str(data["source"]) + (f" ({counts})" if counts else ""),
        authors=[Author(**a) for a in data.get("authors") or [{"name": "unknown"}]],
        cite=[CiteEntry(**c) for c in data.get("cite") or DEFAULT_CITE],
        license=data.get("license"),
    )


def _name(model: LoadedModel) -> str:
    name = str(model.card.get("title") or model.name)
    return name if "cellwatch" in name.lower() else f"cellwatch {name}"


def _tiff(path: Path, array: np.ndarray) -> Path:
    tifffile.imwrite(path, array)
    return path


def _preprocessing(bio: Any, low: float, high: float, *, inverted: bool) -> list[Any]:
    """``scale_range`` over the percentiles cellwatch maps to 0 and 1; for an inverted
    model, those of the negated image: the ``100 - high`` and ``100 - low`` percentiles
    to 0 and 1, then ``1 - x`` (``scale_linear``), as :class:`Normalization` does."""
    if not inverted:
        return [_scale_range(bio, low, high)]
    flip = bio.ScaleLinearDescr(kwargs=bio.ScaleLinearKwargs(gain=-1.0, offset=1.0))
    return [_scale_range(bio, 100 - high, 100 - low), flip]


def _scale_range(bio: Any, low: float, high: float) -> Any:
    axes = [bio.AxisId("y"), bio.AxisId("x")]
    kwargs = bio.ScaleRangeKwargs(axes=axes, min_percentile=low, max_percentile=high)
    return bio.ScaleRangeDescr(kwargs=kwargs)


def _channel_names(model: LoadedModel) -> list[str]:
    """One name per output channel: the card's classes, and the seed map's name after
    them for a model with a seed head (four channels)."""
    classes = [str(c) for c in model.card.get("classes") or []]
    if model.seed_map and len(classes) == model.classes - 1:
        classes.append(model.seed_map)
    if len(classes) != model.classes:
        classes = [f"class{i}" for i in range(model.classes)]
    return classes


def _summary(model: LoadedModel) -> str:
    card = model.card
    if card.get("description"):
        return str(card["description"])
    diameter = f", cells about {model.diameter_px:g} px across" if model.diameter_px else ""
    return f"cellwatch U-Net {model.name}: per-pixel class probabilities{diameter}."


def _cellwatch_config(model: LoadedModel, config: Config, halo: int, side: int) -> dict[str, Any]:
    """What cellwatch knows that the tensors do not say: the scale and how labels are made."""
    p = config.postprocess
    return {
        "model": model.label,
        "diameter_px": model.diameter_px,
        "pixel_size_um": model.pixel_size_um,
        "halo_px": halo,
        "test_input_side_px": side,
        "postprocess": {
            "interior_threshold": p.interior_threshold,
            "foreground_threshold": p.foreground_threshold,
            "split_threshold": p.split_threshold,
            "split_min_area_px": p.split_min_area_px,
            "min_cell_area_px": p.min_cell_area_px,
            "peak_threshold": peak_threshold(p.peak_threshold, model.card),
            "outline_growth_px": outline_growth(p.outline_growth_px, model.card),
            **(
                {
                    "distance_threshold": p.distance_threshold,
                    "distance_split_threshold": p.distance_split_threshold,
                }
                if model.seed_map
                else {}
            ),
        },
    }


def _documentation(model: LoadedModel, config: Config) -> str:
    card, (low, high) = model.card, _percentiles(model, config)
    classes = card.get("classes") or []
    diameter = (
        f"Nuclei should be about **{model.diameter_px:g} pixels across**, the size it was "
        "trained at: zoom your images so that they are (cellwatch does this itself)."
        if model.diameter_px
        else "The model card records no training cell size."
    )
    data = card.get("data") or {}
    metrics = (card.get("metrics") or {}).get("evaluate_val") or {}
    lines = [
        f"# {_name(model)}",
        "",
        _summary(model),
        "",
        "Exported by `cellwatch export` from " + f"`{model.label}` (name@sha256).",
        "",
        "## Input",
        "",
        "One gray image (`image`: batch, y, x, 1 channel). Intensities are mapped so that "
        + (
            f"the {low:g}th and {high:g}th percentiles become 0 and 1 (`scale_range`). "
            if not config.input.invert
            else f"the {100 - high:g}th and {100 - low:g}th percentiles become 1 and 0 "
            "(`scale_range`, then `scale_linear` 1 − x): the model was taught on cells "
            "darker than their background, and sees them bright. "
        )
        + diameter,
        "",
        "## Output",
        "",
        "`probabilities`: for each pixel the softmax probability of "
        + (", ".join(f"`{c}`" for c in classes) or "each class")
        + ". cellwatch turns these into one label per cell: each connected interior (above "
        "`interior_threshold`) seeds a cell, grown by watershed over the foreground (one "
        "minus background above `foreground_threshold`); a cell whose interior never "
        "reaches `peak_threshold` is dropped, and outlines are grown by "
        "`outline_growth_px` (network pixels); the settings are in "
        "`config.cellwatch.postprocess` of `rdf.yaml`."
        + (
            f" The last channel, `{model.seed_map}`, is a seed map (sigmoid: 1 at each "
            "cell's centre, falling to 0 at its outline and where cells touch); for this "
            "model each connected part above `distance_threshold` seeds a cell instead, "
            "flooded over the seed map within the foreground."
            if model.seed_map
            else ""
        ),
        "",
        "## Training data",
        "",
        str(data.get("source") or "not recorded in the model card"),
    ]
    if metrics:
        lines += [
            "",
            "## Validation",
            "",
            f"On the validation images ({data.get('val_images', '?')}), with cellwatch's "
            f"post-processing: accuracy at IoU 0.5 {metrics.get('accuracy_0.5')}, F1 at IoU 0.5 "
            f"{metrics.get('f1_0.5')}, count error {metrics.get('count_mape_percent')} % "
            "(mean absolute percentage).",
        ]
    return "\n".join(lines) + "\n"


def _bundled() -> Path:
    from cellwatch.model import BUNDLED_MODEL

    return BUNDLED_MODEL
