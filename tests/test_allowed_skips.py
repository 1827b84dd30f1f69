"""Under CI a skip fails the run unless tests/allowed_skips.py allows it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from allowed_skips import allowed

TESTS = Path(__file__).resolve().parent

SKIPPING = """
import pytest

pytest.importorskip("no_such_package_here", reason="a module-wide skip")


def test_x():
    pass
"""

SKIPPING_ONE = """
import pytest


def test_fine():
    pass


def test_hides():
    pytest.skip("something is not installed")
"""


def _pytest(folder: Path, ci: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # napari's and others': not needed here
    if ci:
        env["CI"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "allowed_skips", "-p", "no:cacheprovider",
         "-c", os.devnull, "--rootdir", str(folder), str(folder)],
        capture_output=True, text=True, env=env, cwd=folder, timeout=120,
    )  # fmt: skip


def test_a_skip_ci_does_not_allow_fails_the_run_under_ci(tmp_path: Path):
    (tmp_path / "test_one.py").write_text(SKIPPING_ONE)
    (tmp_path / "test_module.py").write_text(SKIPPING)
    assert _pytest(tmp_path, ci=False).returncode == 0  # on a laptop, skips are skips
    done = _pytest(tmp_path, ci=True)
    assert done.returncode == 1, done.stdout
    assert "2 skip(s) CI does not allow" in done.stdout, done.stdout
    assert "test_hides: something is not installed" in done.stdout
    assert "test_module.py: a module-wide skip" in done.stdout


def test_root_only_and_display_skips_are_allowed():
    assert allowed(
        "tests/test_systemd_unit.py::test_daemon_counts_images_under_the_hardened_unit",
        "needs root and systemd-nspawn (Debian: systemd-container)",
    )
    assert allowed(
        "tests/test_napari_reader.py::test_a_real_napari_viewer_opens_a_results_folder",
        "xvfb-run is not installed (apt-get install xvfb): ...",
    )
    assert not allowed("tests/test_formats.py", "could not import 'pylibCZIrw.czi'")
    assert not allowed(
        "tests/test_napari_reader.py::test_a_real_napari_viewer_opens_a_results_folder",
        "napari with a Qt binding is not installed",
    )
