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
    with pytest.raises(ModelError, match=r"no model file at .*gone\.keras"):
        load_engine(missing)


def test_with_dask_workers_a_file_that_is_no_keras_model_is_refused(tmp_path: Path):
    """The daemon checks the archive before it hands a new model to the workers on SIGHUP,
    so a half-copied file keeps the old model rather than failing every image."""
    import zipfile

    config = override(Config(), **{"compute.workers": 2})
    half = tmp_path / "half.keras"
    half.write_bytes(BUNDLED_MODEL.read_bytes()[:100_000])
    with pytest.raises(ModelError, match=r"half\.keras is not a Keras model file.*copied whole"):
        load_engine(override(config, **{"model.path": str(half)}))
    other = tmp_path / "other.keras"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("notes.txt", "not a model")
    with pytest.raises(ModelError, match=r"other\.keras is a zip archive but not a Keras model"):
        load_engine(override(config, **{"model.path": str(other)}))


def test_compute_settings_stay_those_the_daemon_started_with():
    running = override(Config(), **{"compute.workers": 2})
    new = override(Config(), **{"compute.workers": 4, "watch.max_attempts": 5})
    kept = override_compute(new, running)
    assert kept.compute == running.compute and kept.watch.max_attempts == 5


def test_the_daemon_counts_the_channel_its_model_was_taught_on(tmp_path: Path):
    """A fine-tuned model's card names its input (``hematoxylin``); the daemon's engine and
    its Dask tasks count that plane unless the config names a channel."""
    import json
    import shutil

    model = tmp_path / "he.keras"
    shutil.copy(BUNDLED_MODEL, model)
    card = json.loads(BUNDLED_MODEL.with_suffix(".json").read_text())
    model.with_suffix(".json").write_text(json.dumps({**card, "input": {"channel": "hematoxylin"}}))
    on_dask = override(Config(), **{"model.path": str(model), "compute.workers": 2})
    assert load_engine(on_dask).config.input.channel == "hematoxylin"
    named = override(on_dask, **{"input.channel": "gray"})
    assert load_engine(named).config.input.channel == "gray"
