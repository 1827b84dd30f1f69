"""The daemon's folders and engine (:mod:`cellwatch.service.engine`); no TensorFlow."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from cellwatch.config import Config, override
from cellwatch.errors import ConfigError, ModelError
from cellwatch.model import BUNDLED_MODEL, model_label
from cellwatch.service.engine import Engine, Paths, load_engine, override_compute, stopwatch_of
from cellwatch.service.jobs import DB_NAME


def test_paths_are_made_absolute_and_name_the_files(tmp_path: Path, monkeypatch):
    (tmp_path / "inbox").mkdir()
    monkeypatch.chdir(tmp_path)
    config = override(Config(), **{"watch.inbox": "inbox", "output.dir": "out"})
    paths = Paths.of(config)
    assert paths.inbox == tmp_path / "inbox" and paths.out == tmp_path / "out"
    assert paths.state == tmp_path / "out" / ".state"
    assert paths.ledger == tmp_path / "out" / "ledger.csv"
    assert paths.cells == tmp_path / "out" / "cells.csv"
    assert paths.db == paths.state / DB_NAME


def test_a_missing_inbox_is_named_with_the_fix(tmp_path: Path):
    config = override(Config(), **{"watch.inbox": str(tmp_path / "nowhere")})
    with pytest.raises(ConfigError, match=r"nowhere does not exist.*--inbox / watch.inbox"):
        Paths.of(config)


def test_model_label_comes_from_the_segmenter_unless_named():
    segmenter = SimpleNamespace(model=SimpleNamespace(label="unet@abc"), stopwatch="sw")
    here = Engine(Config(), segmenter)
    assert here.model_label == "unet@abc" and stopwatch_of(here) == "sw"
    on_dask = Engine(Config(), None, label="unet@def")
    assert on_dask.model_label == "unet@def" and stopwatch_of(on_dask) is None


def test_with_dask_workers_the_engine_only_names_the_model(tmp_path: Path):
    """The workers load the network; this process hashes the file and loads nothing."""
    config = override(Config(), **{"compute.workers": 2})
    engine = load_engine(config)
    assert engine.segmenter is None and engine.model_label == model_label(BUNDLED_MODEL)
    gone = tmp_path / "gone.keras"
    gone.write_bytes(b"a model")
    missing = override(config, **{"model.path": str(gone)})
    gone.unlink()  # after the check at load time, before the daemon starts
    with pytest.raises(ModelError, match="cannot read model file"):
        load_engine(missing)


def test_compute_settings_stay_those_the_daemon_started_with():
    running = override(Config(), **{"compute.workers": 2})
    new = override(Config(), **{"compute.workers": 4, "watch.max_attempts": 5})
    kept = override_compute(new, running)
    assert kept.compute == running.compute and kept.watch.max_attempts == 5
