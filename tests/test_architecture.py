"""The rules of ../shared/ARCHITECTURE.md, checked by reading every import in the package.

Each module belongs to one part; a part may import only itself and the parts listed for it
in ``MAY_IMPORT``. Imports inside functions and under ``TYPE_CHECKING`` count too: a
circle closed lazily is still a circle, and a reader cannot tell which line is safe.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cellwatch"

IMAGE_PATH = {
    "batching",
    "familiarity",
    "measure",
    "model",
    "pipeline",
    "postprocess",
    "preprocess",
    "quality",
    "scale",
    "tiling",
    "timing",
}

#: What each part may import besides itself. The service writes daily reports, so it may
#: call reporting; nothing else crosses between the parts beside each other. Interop
#: (napari reader, bioimage.io export) stands beside reporting: it reads results and models.
MAY_IMPORT: dict[str, set[str]] = {
    "settings": set(),
    "storage": {"settings"},
    "image path": {"settings", "storage"},
    "reporting": {"settings", "storage", "image path"},
    "training": {"settings", "storage", "image path"},
    "interop": {"settings", "storage", "image path"},
    "service": {"settings", "storage", "image path", "reporting"},
    "bench": {"settings", "storage", "image path", "training", "service"},
    "face": {
        "settings",
        "storage",
        "image path",
        "reporting",
        "training",
        "service",
        "bench",
        "interop",
    },
}

#: Modules that may append to ledger.csv and cells.csv: the drivers.
LEDGER_WRITERS = {"cellwatch.service.driver"}


def part_of(module: str) -> str:
    """The part a module of the package belongs to, from its dotted name."""
    parts = module.split(".")
    if parts[0] != "cellwatch":
        raise ValueError(f"{module} is not in the package")
    if len(parts) == 1 or parts[1] in ("config", "errors"):
        return "settings"
    if parts[1] in ("cli", "__main__"):
        return "face"
    if parts[1] in ("storage", "service", "reporting", "training", "interop"):
        return parts[1]
    if parts[1] == "bench":
        return "bench"
    if parts[1] in IMAGE_PATH:
        return "image path"
    raise ValueError(
        f"cellwatch.{parts[1]} belongs to no part: add it to a subpackage, or to IMAGE_PATH "
        "in tests/test_architecture.py if it is a stage of one image's path"
    )


def module_name(path: Path, package: Path = PACKAGE) -> str:
    rel = path.relative_to(package.parent).with_suffix("")
    names = list(rel.parts)
    if names[-1] == "__init__":
        names.pop()
    return ".".join(names)


def imports_of(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, module) for every ``cellwatch`` import in a file, wherever it stands."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path, root)
    package = here.rsplit(".", 1)[0] if path.name != "__init__.py" else here
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("cellwatch")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")
                base = ".".join(anchor[: len(anchor) - node.level + 1] + ([base] if base else []))
            if not base.startswith("cellwatch"):
                continue
            if base == "cellwatch":  # "from cellwatch import cli": each name is a module
                found += [(node.lineno, f"cellwatch.{a.name}") for a in node.names]
            elif base in ("cellwatch.storage", "cellwatch.service", "cellwatch.reporting",
                          "cellwatch.training", "cellwatch.interop"):  # fmt: skip
                found += [(node.lineno, f"{base}.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, base))
    return found


def violations(package: Path = PACKAGE) -> list[str]:
    """Every import that breaks a rule, as 'file:line: what' lines."""
    found = []
    for path in sorted(package.rglob("*.py")):
        mine = part_of(module_name(path, package))
        for line, target in imports_of(path, package):
            if target == "cellwatch.__version__":
                continue
            theirs = part_of(target)
            if theirs != mine and theirs not in MAY_IMPORT[mine]:
                found.append(
                    f"{path.relative_to(package.parent)}:{line}: {mine} imports {theirs} ({target})"
                )
    return found


def ledger_writers(package: Path = PACKAGE) -> set[str]:
    """Modules that call ``append_rows``, the one function that appends to the ledger files."""
    writers = set()
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                fn = node.func
                name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
                if name == "append_rows":
                    writers.add(module_name(path, package))
    return writers


#: The daemon's rooms, one job each, and the service modules each may import. The runners
#: compose the recorder and never import each other; only the recorder hands rows to the
#: driver; the engine and the recorder know nothing of the threads that use them.
SERVICE_ROOMS: dict[str, set[str]] = {
    "daemon": {  # the daemon's life: start-up, signals, reload, heartbeat, reports
        "dask_runner", "engine", "jobs", "local_runner", "metrics", "recorder", "schedule",
        "sdnotify", "watcher", "cluster",
    },
    "engine": {"jobs", "cluster"},  # the folders, the settings and the loaded model
    "recorder": {"driver", "engine", "jobs", "metrics", "watcher"},  # the exactly-once gate
    "local_runner": {"crash", "engine", "jobs", "memory", "recorder"},  # the network here
    "dask_runner": {"cluster", "crash", "engine", "jobs", "recorder", "worker"},  # on Dask
}  # fmt: skip

#: Modules over MAX_LINES today, each to be split by its own change; the list may only shrink.
TOO_LONG_TODAY = {"bench.py", "pipeline.py", "storage/imageio.py", "tiling.py", "training/train.py"}
MAX_LINES = 600


def service_imports(room: str, package: Path = PACKAGE) -> set[str]:
    """The service modules that ``cellwatch/service/<room>.py`` imports."""
    found = {target for _, target in imports_of(package / "service" / f"{room}.py", package)}
    prefix = "cellwatch.service."
    return {t.removeprefix(prefix).split(".")[0] for t in found if t.startswith(prefix)}


def too_long(package: Path = PACKAGE) -> set[str]:
    """Modules of the package over :data:`MAX_LINES` lines."""
    return {
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if len(path.read_text().splitlines()) > MAX_LINES
    }


@pytest.mark.parametrize("room", sorted(SERVICE_ROOMS))
def test_each_room_of_the_service_imports_only_what_its_job_needs(room):
    assert service_imports(room) <= SERVICE_ROOMS[room]


def test_the_runners_compose_the_recorder_rather_than_inherit_a_worker():
    import ast

    for room in ("local_runner", "dask_runner"):
        tree = ast.parse((PACKAGE / "service" / f"{room}.py").read_text())
        bases = [b for node in ast.walk(tree) if isinstance(node, ast.ClassDef) for b in node.bases]
        assert bases == [], f"service/{room}.py: a class with a base class"


def test_a_room_reaching_into_another_is_caught(tmp_path):
    """The check itself: a Dask runner that borrows the local runner breaks its room."""
    import shutil

    copy = tmp_path / "cellwatch"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("models", "__pycache__"))
    target = copy / "service" / "dask_runner.py"
    target.write_text(
        target.read_text() + "\n\nfrom cellwatch.service.local_runner import LocalRunner\n"
    )
    assert "local_runner" in service_imports("dask_runner", copy)
    assert not service_imports("dask_runner", copy) <= SERVICE_ROOMS["dask_runner"]


def test_no_module_is_over_600_lines():
    assert too_long() <= TOO_LONG_TODAY, "split the module into rooms of one job each"
    assert too_long() >= TOO_LONG_TODAY, "a module is short enough now: take it off the list"


def test_every_import_keeps_the_rules():
    assert violations() == []


def test_only_the_driver_appends_to_the_ledger():
    assert ledger_writers() == LEDGER_WRITERS


def test_every_module_belongs_to_a_part():
    for path in PACKAGE.rglob("*.py"):
        part_of(module_name(path))


@pytest.mark.parametrize(
    ("module", "line", "part"),
    [
        ("service/daemon.py", "from cellwatch.cli import config_from_args", "face"),
        ("service/recorder.py", "from cellwatch.cli import main", "face"),
        ("service/local_runner.py", "from cellwatch.training import train", "training"),
        ("service/dask_runner.py", "from cellwatch.interop import napari_reader", "interop"),
        ("config.py", "from cellwatch.reporting.report import check_settings", "reporting"),
        ("storage/imageio.py", "from cellwatch.preprocess import normalize", "image path"),
        ("measure.py", "from cellwatch.training.targets import three_class", "training"),
        ("pipeline.py", "from cellwatch import bench", "bench"),
        ("interop/napari_reader.py", "from cellwatch.service import daemon", "service"),
        ("storage/ledger.py", "from cellwatch.interop import napari_reader", "interop"),
        ("training/evaluate.py", "from cellwatch.service import daemon", "service"),
    ],
)
def test_a_broken_rule_is_caught(tmp_path, module, line, part):
    """The check itself: a copy of the package with one forbidden import fails it."""
    import shutil

    copy = tmp_path / "cellwatch"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("models", "__pycache__"))
    target = copy / module
    target.write_text(target.read_text() + f"\n\ndef _broken() -> None:\n    {line}\n")
    found = violations(copy)
    assert len(found) == 1 and f"imports {part}" in found[0], found


def test_status_and_report_help_do_not_import_keras(tmp_path):
    """Start-up cost: the commands that need no network must not load a deep-learning
    framework (several seconds and hundreds of MB)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from cellwatch.cli import main\n"
        f"for argv in (['status', '--out', {str(tmp_path)!r}], ['report', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = [m for m in ('tensorflow', 'keras', 'jax', 'torch', 'distributed') if m in sys.modules]\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "HEAVY=\n" in run.stdout, run.stdout[-500:] + run.stderr[-2000:]
