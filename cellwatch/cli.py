"""The ``cellwatch`` command: predict, train, finetune, models, evaluate, watch, status, report, export, bench.

Exit status: 0 when everything succeeded, 1 when some images failed (their rows are still
written), 2 for usage, configuration or model errors.
"""

from __future__ import annotations

__all__ = ["main", "progress"]

import argparse
import contextlib
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cellwatch import __version__
from cellwatch.config import Config, check_address, config_from_args, override, with_card_input
from cellwatch.errors import CellwatchError, ClusterError, ConfigError, ModelError, TransientError

if TYPE_CHECKING:
    from cellwatch.pipeline import ImageResult, Segmenter
    from cellwatch.service.rerun import PredictJobs, Run

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2

log = logging.getLogger("cellwatch")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cellwatch`` command line; the exit status (0 ok, 1 some images failed, 2 usage, configuration or model errors)."""
    words = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(only=_command_in(words) or "")
    args = parser.parse_args(words)
    args.command_line = ["cellwatch", *words]
    logging.basicConfig(
        level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
        format="%(levelname)s %(message)s",
    )
    logging.getLogger("tifffile").setLevel(logging.ERROR)  # we report bad files ourselves
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3" if getattr(args, "quiet", False) else "2")
    try:
        return int(args.handler(args))
    except (ConfigError, ModelError, ClusterError) as exc:
        print(f"cellwatch: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CellwatchError as exc:
        print(f"cellwatch: {exc}", file=sys.stderr)
        return EXIT_SOME_FAILED
    except KeyboardInterrupt:
        again = ""
        if args.command == "predict":
            again = "; the rows of the images done are in the ledger: run the same command again to count the rest"
        print(f"cellwatch: interrupted{again}", file=sys.stderr)
        return 130


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Send what native libraries write to file descriptor 2 to /dev/null meanwhile.

    TensorFlow's C++ start-up lines ("oneDNN custom operations are on", "All log messages
    before absl::InitializeLog() …") ignore ``TF_CPP_MIN_LOG_LEVEL``; ``--quiet`` means
    quiet. A Python error raised meanwhile is still shown: it is printed after this ends.
    """
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``cellwatch`` argument parser.

    Parameters
    ----------
    only : str, optional
        Give only this command its arguments (the others are listed with their help line):
        each command's options live in its own module, and importing them all would make
        every command pay for pandas, matplotlib and scikit-image at start. None: all.
    """
    parser = argparse.ArgumentParser(
        prog="cellwatch", description="Count cells in microscope images."
    )
    parser.add_argument("--version", action="version", version=f"cellwatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_line, setup) in COMMANDS.items():
        p = sub.add_parser(name, help=help_line)
        if only is None or only == name:
            setup(p)
    return parser


def _predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="image files or folders")
    _common(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--again",
        action="store_true",
        help="count every image anew, even those the ledger already has a row for with the "
        "same content and settings (default: skip them, and finish what a stopped run left)",
    )
    p.add_argument(
        "--workers",
        type=_workers,
        help="Dask worker processes on this machine: a number (0: in this process) or auto "
        "(default: compute.workers)",
    )
    p.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="an existing Dask scheduler, e.g. tcp://10.0.0.5:8786 (default: compute.scheduler)",
    )
    p.set_defaults(handler=cmd_predict)


def _train_arguments(p: argparse.ArgumentParser) -> None:
    from cellwatch.training import train

    train.add_arguments(p)
    p.set_defaults(handler=train.run)


def _finetune_arguments(p: argparse.ArgumentParser) -> None:
    from cellwatch.training import finetune

    finetune.add_arguments(p)
    p.set_defaults(handler=finetune.run)


def _models_arguments(p: argparse.ArgumentParser) -> None:
    from cellwatch.training import registry

    registry.add_arguments(p)
    p.set_defaults(handler=registry.run)


def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
    from cellwatch.training import evaluate

    evaluate.add_arguments(p)
    p.add_argument("--model", type=Path, help="model file (.keras); default: the bundled model")
    p.add_argument("--config", type=Path, help="configuration file (YAML)")
    p.set_defaults(handler=evaluate.run)


def _report_arguments(p: argparse.ArgumentParser) -> None:
    from cellwatch.reporting import report

    report.add_report_arguments(p)
    p.add_argument("--config", type=Path, help="configuration file (YAML)")
    p.set_defaults(handler=lambda a: report.report_cli(a, config_from_args(a)))


def _watch_arguments(p: argparse.ArgumentParser) -> None:
    from cellwatch.service import daemon

    daemon.add_arguments(p)
    p.set_defaults(handler=daemon.run)


def _status_arguments(p: argparse.ArgumentParser) -> None:
    from cellwatch.service import status

    status.add_arguments(p)
    p.set_defaults(handler=status.run)


def _export_arguments(p: argparse.ArgumentParser) -> None:
    from cellwatch.interop import bioimageio_export

    bioimageio_export.add_arguments(p)
    p.set_defaults(handler=bioimageio_export.run)


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    from cellwatch import bench

    bench.add_arguments(p)
    p.set_defaults(handler=bench.run)


#: Each command: its help line, and what gives it its arguments and handler.
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "predict": ("segment, count and measure cells in images", _predict_arguments),
    "train": ("train or fine-tune a U-Net on images and masks", _train_arguments),
    "finetune": ("fine-tune a model on corrected images, in minutes", _finetune_arguments),
    "models": ("list the models in models.dir with their cards", _models_arguments),
    "evaluate": ("score a model against ground-truth masks", _evaluate_arguments),
    "report": ("write the daily count report", _report_arguments),
    "watch": ("run the daemon: count every new image in the inbox", _watch_arguments),
    "status": ("show the daemon's queue, counts and last error", _status_arguments),
    "export": ("write a model as a bioimage.io package (.zip)", _export_arguments),
    "bench": ("measure speed and memory on this machine", _bench_arguments),
}


def _command_in(argv: Sequence[str]) -> str | None:
    """The command named on the command line (its first word that is one), if any."""
    return next((word for word in argv if word in COMMANDS), None)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, help="output folder (default: output.dir in the config)")
    p.add_argument("--model", type=Path, help="model file (.keras); default: the bundled model")
    p.add_argument("--config", type=Path, help="configuration file (YAML)")


def _workers(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be auto or a number ≥ 0, got {text!r}")
    return value


def cmd_predict(args: argparse.Namespace) -> int:
    """``cellwatch predict``: count the cells in each image, in this process or on Dask workers."""
    from cellwatch.model import BUNDLED_MODEL, choose_backend, read_card
    from cellwatch.service.cluster import uses_dask

    scheduler = getattr(args, "scheduler", None)
    if scheduler is not None:
        check_address(scheduler, "--scheduler")  # blamed on the flag, not on the defaults
    config = override(
        config_from_args(args),
        **{"compute.workers": getattr(args, "workers", None), "compute.scheduler": scheduler},
    )
    config = with_card_input(config, read_card(Path(config.model.path or BUNDLED_MODEL)))
    # one path per file, absolute and resolved, the same in-process and on Dask
    images = list(
        dict.fromkeys(p.resolve() for p in find_images(args.inputs, config.input.extensions))
    )
    if not images:
        raise ConfigError("no images found in " + ", ".join(map(str, args.inputs)))
    choose_backend()
    from cellwatch.service.rerun import PredictJobs

    jobs = PredictJobs(config)  # before the runtime is resolved: the same jobs on Dask
    try:
        run = jobs.plan(images, again=getattr(args, "again", False))
        _tell_plan(run, len(images))
        if not run.images:
            return EXIT_OK
        if uses_dask(config.compute):
            return predict_over_dask(args, config, run, jobs)
        return _predict_here(args, config, run, jobs)
    finally:
        jobs.close()


def _tell_plan(run: Run, found: int) -> None:
    """Say which images this run skips or resumes, and how to count them anew."""
    if run.skipped:
        log.warning(
            "%d of %d images already have a row in the ledger for the same content and "
            "settings: skipped (--again counts them anew)",
            run.skipped,
            found,
        )
    if run.resumed:
        log.info("resuming %d image(s) an earlier run left unfinished", run.resumed)


def _predict_here(args: argparse.Namespace, config: Config, run: Run, jobs: PredictJobs) -> int:
    """``cellwatch predict`` in this process: groups of images share inference batches."""
    from cellwatch.pipeline import Segmenter
    from cellwatch.runtime import describe, load, resolve

    config = resolve(config)  # the runtime and precision that run, in every row's hash
    if args.quiet and config.inference.runtime == "keras":
        with _native_stderr_silenced():
            import keras  # noqa: F401  (TensorFlow's start-up lines, where nobody sees them)
    segmenter = Segmenter(config, load(config))
    if not args.quiet:
        print(f"network: {describe(segmenter.model)}", file=sys.stderr)
    out_dir = jobs.out_dir
    failed = counted = 0  # images: each scene of a file of several counts as one
    # images per group, as the daemon groups them: one is read, labelled and written while
    # the network works on another, and their tiles share inference batches
    size = config.tiling.images_at_once
    groups = [run.images[i : i + size] for i in range(0, len(run.images), size)]
    ids = iter(run.job_ids)
    for paths in progress(groups, enabled=not args.quiet and sys.stderr.isatty()):
        job_ids = [next(ids) for _ in paths]
        jobs.start(job_ids)
        for result in jobs.record(process_group(paths, config, segmenter, out_dir, job_ids)):
            counted += 1
            failed += _tell(result, quiet=args.quiet)
        jobs.finish(job_ids)
    print(
        f"{counted - failed} of {counted} images counted; ledger: {out_dir / 'ledger.csv'}",
        file=sys.stderr,
    )
    return EXIT_SOME_FAILED if failed else EXIT_OK


def _tell(result: ImageResult, *, quiet: bool) -> bool:
    """Log what became of one image; True if it failed."""
    from cellwatch.storage.ledger import row_name

    row = result.row
    if row["status"] != "ok":
        log.warning("%s: %s", row_name(row), row.get("error"))
        return True
    if not quiet:
        log.info("%s: %d cells", row_name(row), row["cell_count"])
    return False


def predict_over_dask(args: argparse.Namespace, config: Config, run: Run, jobs: PredictJobs) -> int:
    """``cellwatch predict`` with Dask workers doing the images; this process records."""
    from cellwatch.service.cluster import Pool
    from cellwatch.service.dask_predict import run_images

    out_dir = jobs.out_dir
    bar = Progress(len(run.images), enabled=not args.quiet and sys.stderr.isatty())
    failed = counted = 0  # images: each scene of a file of several counts as one
    finished: set[str] = set()  # jobs of one image whose row is in

    def on_results(results: list[ImageResult]) -> None:
        nonlocal failed, counted
        new = jobs.record(results)
        counted += len(new)
        failed += sum(_tell(result, quiet=args.quiet) for result in new)
        bar.advance(len(results), Path(results[-1].row["image"]).name)
        ones = [r.row["job_id"] for r in results if r.row.get("scene") is None]
        jobs.finish(ones)
        finished.update(ones)

    flag = getattr(args, "scheduler", None) is not None
    origin = "--scheduler" if flag else f"{config.source}: compute.scheduler"
    jobs.start(run.job_ids)
    with Pool(config.compute, origin=origin) as pool:
        run_images(
            run.images, config, out_dir, on_results=on_results, pool=pool, job_ids=run.job_ids
        )
    jobs.finish(sorted({j for j in run.job_ids if j not in finished}))
    bar.close()
    print(
        f"{counted - failed} of {counted} images counted ({bar.rate():.1f} images/s); "
        f"ledger: {out_dir / 'ledger.csv'}",
        file=sys.stderr,
    )
    return EXIT_SOME_FAILED if failed else EXIT_OK


class Progress:
    """A one-line progress bar on stderr: images done, of how many, and images per second."""

    def __init__(self, total: int, *, enabled: bool, clock: Callable[[], float] = time.monotonic):
        self.total, self.done, self.enabled, self.clock = total, 0, enabled, clock
        self.started = clock()

    def rate(self) -> float:
        """Images per second since the bar began."""
        return self.done / max(self.clock() - self.started, 1e-9)

    def advance(self, n: int, name: str = "") -> None:
        """Count ``n`` more images done and redraw the bar."""
        self.done += n
        if self.enabled:
            filled = int(30 * self.done / max(self.total, 1))
            bar = "#" * filled + "." * (30 - filled)
            line = f"\r[{bar}] {self.done}/{self.total} {self.rate():6.1f} images/s {name[:30]:30}"
            sys.stderr.write(line)
            sys.stderr.flush()

    def close(self) -> None:
        """End the bar's line."""
        if self.enabled:
            sys.stderr.write("\n")


def process_group(
    paths: list[Path],
    config: Config,
    segmenter: Segmenter,
    out_dir: Path,
    job_ids: Sequence[str] | None = None,
) -> list[ImageResult]:
    """Process several images together (a file of several scenes gives one result per
    scene). With no daemon here to retry later, a transient fault (a full disk, a share
    gone) becomes a failed row for the file it hit."""
    from cellwatch.pipeline import failed_result, process_images

    job_ids = list(job_ids) if job_ids is not None else [uuid.uuid4().hex for _ in paths]
    try:
        return process_images(
            paths, config=config, segmenter=segmenter, out_dir=out_dir, job_ids=job_ids
        )
    except TransientError:
        pass
    results = []
    for path, job_id in zip(paths, job_ids, strict=True):
        try:
            results += process_images(
                [path], config=config, segmenter=segmenter, out_dir=out_dir, job_ids=[job_id]
            )
        except TransientError as exc:
            label = segmenter.model.label
            results.append(failed_result(path, exc, model=label, config=config, job_id=job_id))
    return results


def find_images(inputs: Iterable[Path], extensions: Sequence[str]) -> Iterator[Path]:
    """Files as given, and the supported images inside folders (recursively, sorted)."""
    from cellwatch.storage.imageio import is_supported

    for item in inputs:
        if item.is_dir():
            yield from sorted(
                p for p in item.rglob("*") if p.is_file() and is_supported(p, extensions)
            )
        elif item.exists():
            yield item
        else:
            raise ConfigError(f"{item} does not exist")


def progress(groups: Sequence[list[Path]], *, enabled: bool) -> Iterator[list[Path]]:
    """Yield groups of images while drawing a one-line progress bar on stderr."""
    bar = Progress(sum(len(g) for g in groups), enabled=enabled)
    for group in groups:
        bar.advance(0, group[0].name)
        yield group
        bar.done += len(group)
    bar.advance(0)
    bar.close()


if __name__ == "__main__":
    sys.exit(main())
