"""The skips CI allows, in one place; under CI every other skip fails the run.

A test that skips because something it needs is missing proves nothing, and CI installs
everything the tests need (``.ci/run``: the ``test`` extra, chromium, systemd, prometheus,
xvfb). Only what CI cannot give may skip there: root (or its absence), and a display.
With ``CI`` set in the environment (``.ci/run`` sets it), a skip whose test and reason
match no entry below makes pytest exit with status 1 and list it.
"""

from __future__ import annotations

import os
import re

import pytest

#: (test id pattern, skip reason pattern, why CI may skip it), searched with re.search.
ALLOWED = [
    (r"test_systemd_unit\.py::test_daemon_counts_images_under_the_hardened_unit",
     r"needs root and systemd-nspawn|systemd-nspawn cannot run a container here",
     "root only: the container needs root and a runner that may start one"),
    (r"test_distributed\.py::test_folder_check_names_the_folder_a_worker_cannot_see",
     r"this user can write anywhere", "as root, permissions stop nothing"),
    (r"test_ledger\.py::test_files_are_unchanged_on_a_full_tmpfs",
     r"cannot mount a tmpfs without privileges", "mounting needs root or user namespaces"),
    (r"test_disk_full\.py::test_a_full_results_disk_pauses_and_every_image_gets_one_ok_row",
     r"cannot mount a tmpfs without privileges", "mounting needs root or user namespaces"),
    (r"test_napari_reader\.py::test_a_real_napari_viewer_opens_a_results_folder",
     r"xvfb-run is not installed", "no display"),
]  # fmt: skip

_skipped: list[tuple[str, str]] = []


def allowed(nodeid: str, reason: str) -> bool:
    """Whether CI may skip test ``nodeid`` for ``reason``."""
    return any(re.search(t, nodeid) and re.search(r, reason) for t, r, _ in ALLOWED)


def _note(report: pytest.CollectReport | pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        _skipped.append((report.nodeid, reason.removeprefix("Skipped: ")))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _note(report)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _note(report)  # a whole module skipped (pytest.importorskip at its top)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not os.environ.get("CI"):
        return
    unexpected = [(n, r) for n, r in _skipped if not allowed(n, r)]
    if unexpected:
        lines = [f"  {nodeid}: {reason}" for nodeid, reason in unexpected]
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        text = "\n".join(
            [f"{len(unexpected)} skip(s) CI does not allow (tests/allowed_skips.py):", *lines]
        )
        if reporter is not None:
            reporter.write_line(text, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
