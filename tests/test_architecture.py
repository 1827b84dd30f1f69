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

#: The package itself (``cellwatch/__init__.py``) is the public API: it composes the image
#: path and storage, and the face and the parts beside the service may call it.
API = "api"

#: The most lines a module may have: one room, one job.
MAX_LINES = 600

IMAGE_PATH = {
    "batching",
    "familiarity",
    "measure",
    "model",
    "ov_graph",
    "pipeline",
    "segmenter",
    "postprocess",
    "preprocess",
    "quality",
    "runtime",
    "scale",
    "tile_grid",
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
    API: {"settings", "storage", "image path"},
    "reporting": {"settings", "storage", "image path"},
    "training": {"settings", "storage", "image path", API},
    "interop": {"settings", "storage", "image path", API},
    "service": {"settings", "storage", "image path", "reporting", API},
    "bench": {"settings", "storage", "image path", "training", "service", API},
    "face": {
        "settings",
        "storage",
        "image path",
        API,
        "reporting",
        "training",
        "service",
        "bench",
        "interop",
    },
}

#: Modules that may append to ledger.csv and cells.csv: the drivers.
LEDGER_WRITERS = {"cellwatch.service.driver"}


def api_names(package: Path = PACKAGE) -> set[str]:
    """The names ``cellwatch/__init__.py`` lists in ``__all__``, read without importing it."""
    tree = ast.parse((package / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return set(ast.literal_eval(node.value))
    return set()


def part_of(module: str, package: Path = PACKAGE) -> str:
    """The part a module of the package belongs to, from its dotted name."""
    parts = module.split(".")
    if parts[0] != "cellwatch":
        raise ValueError(f"{module} is not in the package")
    if len(parts) == 1 or parts[1] in api_names(package):
        return API
    if parts[1] in ("config", "errors", "formats", "values"):
        return "settings"
    if parts[1] in ("cli", "__main__"):
        return "face"
    if parts[1] in ("storage", "service", "reporting", "training", "interop"):
        return parts[1]
    if parts[1] in ("bench", "bench.py"):
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
        mine = part_of(module_name(path, package), package)
        for line, target in imports_of(path, package):
            if target == "cellwatch.__version__":
                continue
            theirs = part_of(target, package)
            if theirs != mine and theirs not in MAY_IMPORT[mine]:
                found.append(
                    f"{path.relative_to(package.parent)}:{line}: {mine} imports {theirs} ({target})"
                )
    return found


def module_of(target: str, modules: set[str]) -> str:
    """The module an import names: ``cellwatch.pipeline.Segmenter`` is ``cellwatch.pipeline``."""
    while target not in modules and "." in target:
        target = target.rsplit(".", 1)[0]
    return target


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module → the modules of the package it imports (at module level, in functions or
    under ``TYPE_CHECKING``). A package's own ``__init__`` is not counted as imported by
    its modules: Python runs it first, but it imports them lazily, if at all."""
    paths = sorted(package.rglob("*.py"))
    modules = {module_name(p, package) for p in paths}
    graph: dict[str, set[str]] = {}
    for path in paths:
        here = module_name(path, package)
        targets = {module_of(t, modules) for _, t in imports_of(path, package)}
        graph[here] = {t for t in targets if t in modules and t != here}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every group of modules that import each other, directly or round a loop (the
    strongly connected components of more than one module), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def long_modules(package: Path = PACKAGE, limit: int = MAX_LINES) -> dict[str, int]:
    """Modules of more than ``limit`` lines, with their lengths."""
    lengths = {
        str(path.relative_to(package.parent)): len(path.read_text().splitlines())
        for path in sorted(package.rglob("*.py"))
    }
    return {name: n for name, n in lengths.items() if n > limit}


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
        "sdnotify", "watcher", "cluster", "pause",
        "memory",  # its heap trace (CELLWATCH_TRACEMALLOC), a debugging hook of its life
    },
    "engine": {"jobs", "cluster"},  # the folders, the settings and the loaded model
    "recorder": {"driver", "engine", "jobs", "metrics", "watcher", "pause"},  # exactly once
    "local_runner": {"crash", "engine", "jobs", "memory", "recorder", "pause"},  # in-process
    "dask_runner": {"cluster", "crash", "engine", "jobs", "recorder", "worker", "pause"},
    "pause": {"metrics"},  # a full disk: pause, retry, resume
}  # fmt: skip


def service_imports(room: str, package: Path = PACKAGE) -> set[str]:
    """The service modules that ``cellwatch/service/<room>.py`` imports."""
    found = {target for _, target in imports_of(package / "service" / f"{room}.py", package)}
    prefix = "cellwatch.service."
    return {t.removeprefix(prefix).split(".")[0] for t in found if t.startswith(prefix)}


@pytest.mark.parametrize("room", sorted(SERVICE_ROOMS))
def test_each_room_of_the_service_imports_only_what_its_job_needs(room):
    assert service_imports(room) <= SERVICE_ROOMS[room]


def test_the_runners_compose_the_recorder_rather_than_inherit_a_worker():
    import ast

    for room in ("local_runner", "dask_runner"):
        tree = ast.parse((PACKAGE / "service" / f"{room}.py").read_text())
        bases = [
            ast.unparse(b)
            for node in ast.walk(tree)
            if isinstance(node, ast.ClassDef)
            for b in node.bases
        ]
        # a library's hook (a logging filter) is fine; a class of cellwatch's is not
        assert all(b.startswith("logging.") for b in bases), f"service/{room}.py: {bases}"


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


def test_every_import_keeps_the_rules():
    assert violations() == []


def test_only_the_driver_appends_to_the_ledger():
    assert ledger_writers() == LEDGER_WRITERS


def test_every_module_belongs_to_a_part():
    for path in PACKAGE.rglob("*.py"):
        part_of(module_name(path))


@pytest.mark.parametrize(
    ("module", "part"),
    [
        ("cellwatch", API),
        ("cellwatch.count", API),
        ("cellwatch.config", "settings"),
        ("cellwatch.familiarity", "image path"),
        ("cellwatch.quality", "image path"),
        ("cellwatch.reporting.qc", "reporting"),
        ("cellwatch.service.crash", "service"),
        ("cellwatch.storage.pixels", "storage"),
        ("cellwatch.storage.vendor", "storage"),
        ("cellwatch.interop.napari_reader", "interop"),
        ("cellwatch.bench.inputs", "bench"),
    ],
)
def test_the_modules_are_placed(module, part):
    assert part_of(module) == part


def test_no_import_circle():
    """No two modules import each other, directly or round a loop, even lazily."""
    assert circles(import_graph()) == []


def test_a_circle_is_caught(tmp_path):
    """The check itself: the report page importing the report back closes a circle."""
    import shutil

    copy = tmp_path / "cellwatch"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("models", "__pycache__"))
    html = copy / "reporting" / "html.py"
    html.write_text(
        html.read_text() + "\n\ndef _broken() -> None:\n"
        "    from cellwatch.reporting.report import build_reports\n"
    )
    assert circles(import_graph(copy)) == [
        ["cellwatch.reporting.html", "cellwatch.reporting.report"]
    ]


def test_no_module_is_longer_than_a_room():
    """One room, one job: no module of cellwatch/ over MAX_LINES lines."""
    too_long = long_modules()
    assert not too_long, f"modules over {MAX_LINES} lines, to split: {too_long}"


def test_bench_names_no_repository_path():
    """``cellwatch bench`` runs from an installed wheel: it does not reach for files beside
    the package (a checkout's ``shared/`` or ``samples/``)."""
    for path in sorted((PACKAGE / "bench").rglob("*.py")):
        text = path.read_text()
        for hint in ("parents[", "shared/data", '"shared"', "samples/"):
            assert hint not in text, f"{path.name} names a repository path ({hint})"


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
        ("pipeline.py", "from cellwatch.bench.inputs import mosaic", "bench"),
        ("pipeline.py", "from cellwatch import count", API),
        ("storage/imageio.py", "from cellwatch import count_file", API),
        ("config.py", "from cellwatch import load_model", API),
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


#: Where a deep-learning framework may be imported: the inference runtime runs networks;
#: model builds and loads the Keras file; training, export and bench use Keras directly.
FRAMEWORK_IMPORTERS = {
    "openvino": {"cellwatch.runtime"},
    "tensorflow": {
        "cellwatch.runtime",
        "cellwatch.model",
        "cellwatch.bench.command",  # the plain TensorFlow rates cellwatch bench reports
        "cellwatch.bench.network",
        "cellwatch.bench.report",
        "cellwatch.training.train",
        "cellwatch.interop.bioimageio_export",
    },
}


def framework_imports(package: Path = PACKAGE) -> dict[str, set[str]]:
    """For each framework, the modules that import it (anywhere in the file)."""
    found: dict[str, set[str]] = {name: set() for name in FRAMEWORK_IMPORTERS}
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in found:
                    found[top].add(module_name(path, package))
    return found


def test_only_the_runtime_imports_openvino_and_few_import_tensorflow():
    found = framework_imports()
    assert found["openvino"] == FRAMEWORK_IMPORTERS["openvino"]
    assert found["tensorflow"] <= FRAMEWORK_IMPORTERS["tensorflow"], found["tensorflow"]
