"""The daemon's folders and the engine it counts with: the settings and the loaded model.

The engine is one frozen object, replaced whole on SIGHUP; the runners read it once per
group of images, so a group is always counted with one model and one set of settings.
"""

from __future__ import annotations

__all__ = ["Engine", "Paths", "load_engine", "override_compute", "stopwatch_of"]

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellwatch.config import Config, with_card_input
from cellwatch.errors import ConfigError, ModelError
from cellwatch.service.jobs import DB_NAME, state_dir


@dataclass(frozen=True)
class Paths:
    """The folders the daemon works with, made absolute once at start."""

    inbox: Path
    out: Path
    state: Path

    @classmethod
    def of(cls, config: Config) -> Paths:
        """The folders ``config`` names; the inbox must exist."""
        inbox = Path(os.path.abspath(config.watch.inbox))
        if not inbox.is_dir():
            raise ConfigError(
                f"the inbox folder {inbox} does not exist (or is not a folder); create it, "
                "or set --inbox / watch.inbox"
            )
        out = Path(os.path.abspath(config.output.dir))
        return cls(inbox, out, Path(os.path.abspath(state_dir(config))))

    @property
    def ledger(self) -> Path:
        """The ledger, ``OUT/ledger.csv``."""
        return self.out / "ledger.csv"

    @property
    def cells(self) -> Path:
        """The cell table, ``OUT/cells.csv``."""
        return self.out / "cells.csv"

    @property
    def db(self) -> Path:
        """The job database in the state folder."""
        return self.state / DB_NAME


@dataclass(frozen=True)
class Engine:
    """The settings and the loaded model the runners use; replaced whole on SIGHUP."""

    config: Config
    segmenter: Any  # cellwatch.pipeline.Segmenter; None when Dask workers hold the model
    label: str = ""  # the model's name@hash, when there is no segmenter here
    device: str = ""  # what the network runs on in this process

    @property
    def model_label(self) -> str:
        """The model's ``name@hash``, as the ledger's ``model`` column writes it."""
        return self.label or str(self.segmenter.model.label)


def load_engine(config: Config) -> Engine:
    """Load the model and run one dummy batch, so the first image does not pay for graph
    compilation and a broken model fails before the daemon reports READY. With Dask
    workers (``compute``), they load it (:mod:`cellwatch.service.worker`) and this process
    only notes its name and hash."""
    import numpy as np

    from cellwatch.model import BUNDLED_MODEL, choose_backend, model_label, read_card
    from cellwatch.pipeline import Segmenter
    from cellwatch.runtime import device_name, load, resolve
    from cellwatch.service.cluster import uses_dask

    # A model taught on a stain counts that stain unless the config names a channel.
    config = with_card_input(config, read_card(Path(config.model.path or BUNDLED_MODEL)))
    choose_backend()
    _check_archive(config.model.path)  # a clearer message than Keras gives for a bad file
    if uses_dask(config.compute):
        return Engine(config, None, label=model_label(config.model.path))
    config = resolve(config)  # the runtime and precision that run, in every row's hash
    segmenter = Segmenter(config, load(config))
    size, tile = config.tiling.batch_size, segmenter.tiling.tile
    segmenter.predict_batch(np.zeros((size, tile, tile, 1), np.float32))
    return Engine(config, segmenter, device=device_name(segmenter.model))


def _check_archive(path: str | Path | None) -> None:
    """Raise :class:`ModelError` unless ``path`` is a ``.keras`` archive. With Dask the
    workers load the network, so this is what this process checks: a missing, truncated or
    wrong file on SIGHUP keeps the old model (rather than failing every image on the
    workers)."""
    import zipfile

    from cellwatch.model import BUNDLED_MODEL

    path = Path(path) if path is not None else BUNDLED_MODEL
    if not path.is_file():
        raise ModelError(f"no model file at {path}; set model.path to a .keras file")
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
    except (OSError, zipfile.BadZipFile) as exc:
        raise ModelError(
            f"{path} is not a Keras model file (a .keras archive): {exc}; was it copied "
            "whole? Save the model with cellwatch train or keras' model.save"
        ) from exc
    if "config.json" not in names:
        raise ModelError(f"{path} is a zip archive but not a Keras model (no config.json)")


def stopwatch_of(engine: Engine) -> Any:
    """The stopwatch of the pipeline in this process; None when Dask workers run it (their
    stage times come back with each result)."""
    return engine.segmenter.stopwatch if engine.segmenter is not None else None


def override_compute(config: Config, running: Config) -> Config:
    """``config`` with the ``compute`` section of the settings the daemon started with."""
    return dataclasses.replace(config, compute=running.compute)
