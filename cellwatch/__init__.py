"""cellwatch: turn every new microscope image into a cell count.

The Python API is three functions over the same code the ``cellwatch`` command, the
daemon and the napari plugin run: :func:`load_model`, :func:`count` (an array in, a
:class:`Result` out) and :func:`count_file` (a file in, one :class:`Result` per scene).
Nothing is written to disk unless asked for. Importing :mod:`cellwatch` is cheap: the
network's framework loads with the first model.
"""

from __future__ import annotations

__all__ = ["Result", "__version__", "count", "count_file", "load_model"]

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from cellwatch.config import Config
    from cellwatch.model import LoadedModel
    from cellwatch.pipeline import Segmenter

__version__ = "0.1.0"


@dataclass(frozen=True)
class Result:
    """One image counted.

    Attributes
    ----------
    labels : numpy.ndarray
        int32 label image, the input's shape: 0 is background, cells are 1..n.
    cells : pandas.DataFrame
        One row per cell: centroid, area, perimeter, diameter, eccentricity, mean
        intensity (and the same in µm when the pixel size is known).
    row : dict
        The fields of the image's ledger row: ``cell_count``, ``mean_area_px``,
        ``confluence``, ``scale``, ``familiarity``, ``focus_score``, ``model``,
        ``settings_hash`` and the others ``ledger.csv`` has; for :func:`count_file` also
        ``image``, ``scene`` and ``sha256``.
    """

    labels: np.ndarray
    cells: pd.DataFrame
    row: dict[str, Any] = field(default_factory=dict)

    @property
    def cell_count(self) -> int:
        """How many cells were found."""
        return int(self.row["cell_count"])


def load_model(
    path: str | Path | None = None, config: Config | str | Path | None = None
) -> LoadedModel:
    """Load a cellwatch model (a ``.keras`` file and its card, ``NAME.json``), ready to run
    on the runtime the settings choose (``inference.runtime``: OpenVINO on a CPU, Keras on a
    GPU), as ``cellwatch predict`` and the service load it.

    Parameters
    ----------
    path : str or pathlib.Path, optional
        The ``.keras`` file; the config's ``model.path`` (the bundled nucleus model) when
        omitted.
    config : Config, str or pathlib.Path, optional
        Settings, or the path of a ``config.yaml``: the ``inference`` section chooses the
        runtime and precision.

    Returns
    -------
    LoadedModel
        The network with its card; pass it to :func:`count` and :func:`count_file` to load
        it once for many images.

    Raises
    ------
    cellwatch.errors.ModelError
        The file is missing, is not a Keras 3 model, or does not give cellwatch's outputs.

    Examples
    --------
    >>> import cellwatch
    >>> model = cellwatch.load_model()
    >>> model.classes  # background, interior, boundary
    3
    """
    from cellwatch.config import override
    from cellwatch.runtime import load

    settings = _config(config)
    if path is not None:
        settings = override(settings, **{"model.path": str(path)})
    return load(settings)


def count(
    image: np.ndarray,
    model: LoadedModel | str | Path | None = None,
    config: Config | str | Path | None = None,
) -> Result:
    """Count the cells in one 2-D image.

    Parameters
    ----------
    image : numpy.ndarray
        One channel, one plane: ``(height, width)``, any numeric type, raw pixels
        (cellwatch normalizes them as it does for files).
    model : LoadedModel, str or pathlib.Path, optional
        A model from :func:`load_model`, or the path of one; by default the config's
        ``model.path`` (the bundled model).
    config : Config, str or pathlib.Path, optional
        Settings, or the path of a ``config.yaml``; by default cellwatch's defaults. The
        pixel size comes from ``scale.pixel_size_um`` (an array carries none).

    Returns
    -------
    Result
        The labels, the per-cell table and the ledger row's fields.

    Raises
    ------
    cellwatch.errors.BadInputError
        ``image`` is not 2-D.

    Examples
    --------
    >>> import numpy as np
    >>> import cellwatch
    >>> yx = np.mgrid[:128, :128]
    >>> image = np.full((128, 128), 100, np.uint16)
    >>> for y, x in [(30, 30), (30, 90), (90, 60)]:  # three nuclei, 20 px across
    ...     image[(yx[0] - y) ** 2 + (yx[1] - x) ** 2 < 100] = 3000
    >>> result = cellwatch.count(image)
    >>> result.cell_count, result.labels.shape, len(result.cells)
    (3, (128, 128), 3)
    """
    import numpy as np

    from cellwatch.pipeline import count_pixels

    config = _config(config)
    segmenter = _segmenter(model, config)
    counted = count_pixels(np.asarray(image), config.scale.pixel_size_um, segmenter)
    row = {**_identity(segmenter), **counted.fields, "status": "ok"}
    return Result(counted.labels, counted.cells, row)


def count_file(
    path: str | Path,
    model: LoadedModel | str | Path | None = None,
    config: Config | str | Path | None = None,
    *,
    out_dir: str | Path | None = None,
) -> list[Result]:
    """Count the cells in an image file: one :class:`Result` per scene (position) of a
    microscope file of several, else one.

    The file is read as the daemon reads it: the config's ``input`` settings pick the
    channel and reduce a Z stack, and the pixel size comes from the file unless
    ``scale.pixel_size_um`` sets one.

    Parameters
    ----------
    path : str or pathlib.Path
        A TIFF, PNG or JPEG, or a CZI, ND2 or LIF file when its extra is installed.
    model, config
        As for :func:`count`.
    out_dir : str or pathlib.Path, optional
        When given, each scene's label image (and overlay, as ``output.overlays`` says) is
        written to ``labels/`` (and ``overlays/``) there, as ``cellwatch predict`` writes
        them, and the row names the files. Nothing is written otherwise.

    Returns
    -------
    list of Result
        In scene order; each row also names the ``image``, its ``scene`` (None for a
        file of one image) and the file's ``sha256``.

    Raises
    ------
    cellwatch.errors.BadInputError
        The file cannot be read as an image (the message says why).

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> import tifffile
    >>> import cellwatch
    >>> yx = np.mgrid[:96, :96]
    >>> image = np.full((96, 96), 100, np.uint16)
    >>> image[(yx[0] - 48) ** 2 + (yx[1] - 48) ** 2 < 100] = 3000
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     tifffile.imwrite(f"{folder}/one.tif", image)
    ...     [result.cell_count for result in cellwatch.count_file(f"{folder}/one.tif")]
    [1]
    """
    from cellwatch.pipeline import count_pixels, files_writer, read, scenes_of
    from cellwatch.storage import imageio

    segmenter = _segmenter(model, _config(config))
    # a model taught on a stain reads that stain unless the config names a channel
    config, path = segmenter.config, Path(path)
    results = []
    for scene in scenes_of(path):
        data = read(path, config, scene)
        pixel_size = config.scale.pixel_size_um or data.pixel_size_um
        writing = None
        if out_dir is not None:
            name, watch = imageio.stem(path, scene), segmenter.stopwatch
            writing = files_writer(name, data.pixels, Path(out_dir), config, watch)
        counted = count_pixels(data.pixels, pixel_size, segmenter, writing=writing)
        row = {
            "image": str(path),
            "sha256": imageio.sha256_file(path),
            **_identity(segmenter),
            "scene": scene,
            "channel": data.channel,
            **counted.fields,
            "status": "ok",
        }
        results.append(Result(counted.labels, counted.cells, row))
    return results


# --- one model and one segmenter for many calls ----------------------------------------------

_LOCK = threading.Lock()
_MODELS: dict[str, LoadedModel] = {}  # models count() loaded by path, kept for the next call
_SEGMENTERS: dict[tuple[int, str], Segmenter] = {}  # by model and settings


def _config(config: Config | str | Path | None) -> Config:
    from cellwatch.config import Config, load_config
    from cellwatch.runtime import resolve

    # the runtime and precision that will run, as the command records them in the hash
    return resolve(config if isinstance(config, Config) else load_config(config))


def _segmenter(model: LoadedModel | str | Path | None, config: Config) -> Segmenter:
    """A segmenter for ``model`` (loaded once per path) and ``config`` with the input the
    model's card names (:func:`cellwatch.config.with_card_input`), made once: making one
    compiles the network's function, which takes longer than counting a small image."""
    from cellwatch.config import with_card_input
    from cellwatch.pipeline import Segmenter

    with _LOCK:
        if model is None or isinstance(model, str | Path):
            path = model if model is not None else config.model.path
            key = str(Path(path).resolve()) if path else "<bundled>"
            key += f" on {config.inference.runtime} {config.inference.precision}"
            if key not in _MODELS:
                _MODELS[key] = load_model(path, config)
            model = _MODELS[key]
        config = with_card_input(config, model.card)
        cached = _SEGMENTERS.get((id(model), config.settings_hash()))
        if cached is None or cached.model is not model or cached.config != config:
            cached = Segmenter(config, model)
            _SEGMENTERS[(id(model), config.settings_hash())] = cached
        return cached


def _identity(segmenter: Segmenter) -> dict[str, str]:
    """The row's fields that say what counted: the model and a hash of the settings."""
    return {"model": segmenter.model.label, "settings_hash": segmenter.config.settings_hash()}
