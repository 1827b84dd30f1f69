"""Find new image files in the inbox and hand each on once it is complete.

Two sources feed one list of candidate files. File-system events (a watchdog observer:
created, moved into place, closed after writing) are only hints: an event can be dropped
(inotify queue overflow), a network share fires none, and an exception in a handler kills
the observer thread, so the handler only enqueues a path. A periodic rescan of the whole
inbox is the source of truth; the first one, at start-up, picks up the backlog.

A candidate is handed on when its size and modification time have not changed for
``watch.stable_time_s`` (measured on this machine's monotonic clock, so a share with a
skewed clock does not matter) and it looks like a complete image (:func:`looks_complete`).
A file that stays stable but incomplete is handed on after ``watch.incomplete_timeout_s``
more, so a corrupt file still gets its ``failed`` ledger row. Only then is it hashed: a file
that is still growing is never read, except for the few header bytes the check needs.
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import os
import queue
import stat as stat_module
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellwatch.config import WatchConfig
from cellwatch.service.jobs import FileVersion
from cellwatch.storage import vendor
from cellwatch.storage.imageio import sha256_file

log = logging.getLogger("cellwatch.watch")

StatFn = Callable[[str | os.PathLike[str]], os.stat_result]


def matches(rel_path: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    """True if a file (path relative to the inbox, "/"-separated) should be counted.

    The name must match an ``include`` glob; neither it nor any folder above it may match
    an ``exclude`` glob. Case is ignored (microscopes write ``.TIF`` as often as ``.tif``).
    """
    parts = rel_path.split("/")
    return not any(_match(part, exclude) for part in parts) and _match(parts[-1], include)


def _match(name: str, patterns: Sequence[str]) -> bool:
    name = name.lower()
    return any(fnmatch.fnmatchcase(name, pattern.lower()) for pattern in patterns)


def looks_complete(path: Path) -> bool:
    """True if the file looks like a whole image: a TIFF whose pixel data all lies inside
    the file, a PNG ending in its ``IEND`` chunk, a JPEG ending in its end-of-image marker,
    a CZI, ND2 or LIF file that its bioio reader opens whole (:func:`vendor.opens_whole`).
    Other types (and unreadable files) are left to the image reader to judge."""
    name = path.name.lower()
    try:
        size = path.stat().st_size
        if size == 0:
            return False
        if name.endswith((".tif", ".tiff")):
            return _tiff_complete(path, size)
        if name.endswith(".png"):
            return _tail(path, 12)[4:8] == b"IEND"
        if name.endswith((".jpg", ".jpeg")):
            return _tail(path, 2) == b"\xff\xd9"
        if vendor.is_vendor(path):  # the microscope formats: the reader's own check
            return vendor.opens_whole(path)
    except OSError:
        return False
    return True


def _tiff_complete(path: Path, size: int) -> bool:
    import tifffile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with tifffile.TiffFile(path) as tif:
                if len(tif.pages) == 0:
                    return False
                for page in tif.pages:
                    ends = zip(page.dataoffsets, page.databytecounts, strict=False)
                    if any(offset + count > size for offset, count in ends):
                        return False
        except Exception:  # tifffile raises many types for a half-written file
            return False
    return True


def _tail(path: Path, n: int) -> bytes:
    with path.open("rb") as handle:
        handle.seek(max(0, path.stat().st_size - n))
        return handle.read(n)


@dataclass
class _Candidate:
    size: int
    mtime_ns: int
    since: float  # clock time this size and modification time were first seen
    complete: bool | None = None  # looks_complete() for this size and time, once asked


class Stability:
    """How long each candidate file has kept the same size and modification time."""

    def __init__(self) -> None:
        self._files: dict[str, _Candidate] = {}

    def observe(self, key: str, size: int, mtime_ns: int, now: float) -> float:
        """Record the file's current size and time; return seconds they have not changed."""
        seen = self._files.get(key)
        if seen is None or (seen.size, seen.mtime_ns) != (size, mtime_ns):
            self._files[key] = _Candidate(size, mtime_ns, now)
            return 0.0
        return now - seen.since

    def complete(self, key: str, check: Callable[[], bool]) -> bool:
        """``check()``, asked once per size and modification time of the file."""
        seen = self._files[key]
        if seen.complete is None:
            seen.complete = check()
        return seen.complete

    def forget(self, key: str) -> None:
        self._files.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._files

    def __len__(self) -> int:
        return len(self._files)

    def files(self) -> list[str]:
        """The candidates, as a list (a copy: forgetting one while looping is safe)."""
        return list(self._files)


class Watcher:
    """Candidates from events and rescans, handed on once stable and complete.

    Parameters
    ----------
    inbox : Path
        The folder the microscope writes to (watched recursively, never written to).
    settings : WatchConfig
        Globs and timings; :meth:`update` swaps them on a configuration reload.
    is_known : callable
        ``is_known(rel_path, size, mtime_ns)``: True if a job already covers the file.
    on_stable : callable
        Receives the list of files that became ready in one :meth:`step`.
    skip : paths
        Folders under the inbox never to look into (cellwatch's own output and state).
    stat, clock, probe, hasher
        Seams for tests: ``os.stat``, ``time.monotonic``, :func:`looks_complete`,
        :func:`~cellwatch.storage.imageio.sha256_file`.
    """

    def __init__(
        self,
        inbox: Path,
        settings: WatchConfig,
        *,
        is_known: Callable[[str, int, int], bool],
        on_stable: Callable[[list[FileVersion]], None],
        skip: Iterable[Path] = (),
        stat: StatFn = os.stat,
        clock: Callable[[], float] = time.monotonic,
        probe: Callable[[Path], bool] = looks_complete,
        hasher: Callable[[Path], str] = sha256_file,
    ) -> None:
        self.inbox = Path(inbox)
        self.settings = settings
        self.is_known, self.on_stable = is_known, on_stable
        self.stat, self.clock, self.probe, self.hasher = stat, clock, probe, hasher
        self._skip = {os.path.realpath(p) for p in skip}
        self._hints: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._stability = Stability()
        self._next_rescan = clock()  # the first step rescans: that finds the backlog
        self._problems: set[str] = set()  # paths already warned about, to warn once

    @property
    def tick(self) -> float:
        """Seconds between steps: a fraction of the stable time, at most a quarter second."""
        return min(0.25, max(0.02, self.settings.stable_time_s / 4))

    def hint(self, path: str) -> None:
        """Note that ``path`` may have changed. Safe to call from any thread."""
        self._hints.put(path)

    def update(self, settings: WatchConfig) -> None:
        """Use new globs and timings from the next step on."""
        self.settings = settings

    def pending(self) -> int:
        """Candidate files not handed on yet."""
        return len(self._stability)

    def step(self) -> list[FileVersion]:
        """Take hints, rescan when due, and hand on the files that became ready."""
        now = self.clock()
        self._take_hints(now)
        if now >= self._next_rescan:
            self.rescan(now)
            self._next_rescan = now + self.settings.rescan_interval_s
        ready = self._check_candidates()
        if ready:
            self.on_stable(ready)
        return ready

    def rescan(self, now: float) -> None:
        """Look at every file in the inbox."""
        for rel, st in self._walk(self.inbox):
            self._consider(rel, st, now)

    def run(self, stop: threading.Event) -> None:
        """Step until ``stop`` is set, with a watchdog observer sending hints."""
        observer = self._start_observer()
        next_check = self.clock() + self.settings.rescan_interval_s
        try:
            while not stop.wait(self.tick):
                self.step()
                if self.clock() >= next_check:
                    next_check = self.clock() + self.settings.rescan_interval_s
                    if observer is not None and not observer.is_alive():
                        log.warning("file events stopped; restarting the observer")
                        observer = self._start_observer()
        finally:
            if observer is not None:
                observer.stop()
                observer.join(timeout=10)

    # --- internals ----------------------------------------------------------------------

    def _take_hints(self, now: float) -> None:
        paths: set[str] = set()
        while True:
            try:
                paths.add(self._hints.get_nowait())
            except queue.Empty:
                break
        for path in paths:
            rel = os.path.relpath(path, self.inbox)
            if rel == os.curdir:
                self.rescan(now)
                continue
            if rel.startswith(os.pardir):
                continue
            try:
                st = self.stat(path)
            except OSError:
                continue  # gone again: nothing to do
            if stat_module.S_ISDIR(st.st_mode) and not self._skipped(path):
                for sub_rel, sub_st in self._walk(Path(path)):
                    self._consider(sub_rel, sub_st, now)
            elif stat_module.S_ISREG(st.st_mode):
                self._consider(Path(rel).as_posix(), st, now)

    def _consider(self, rel: str, st: os.stat_result, now: float) -> None:
        if rel in self._stability:
            return  # already a candidate: the stability check looks at it every step
        if not matches(rel, self.settings.include, self.settings.exclude):
            return
        if self.is_known(rel, st.st_size, st.st_mtime_ns):
            return
        self._stability.observe(rel, st.st_size, st.st_mtime_ns, now)

    def _check_candidates(self) -> list[FileVersion]:
        s = self.settings
        ready = []
        for rel in self._stability.files():
            path = self.inbox / rel
            try:
                st = self.stat(path)
            except FileNotFoundError:
                self._stability.forget(rel)  # renamed or deleted before it was complete
                continue
            except OSError as exc:
                self._warn_once(rel, f"cannot look at {path}: {_readable(exc)}; will try again")
                continue
            waited = self._stability.observe(rel, st.st_size, st.st_mtime_ns, self.clock())
            if waited < s.stable_time_s:
                continue
            if not self._stability.complete(rel, lambda p=path: self.probe(p)):
                if waited < s.stable_time_s + s.incomplete_timeout_s:
                    continue
                log.warning(
                    "%s has not become a complete image in %.0f s; recording it as failed",
                    path,
                    waited,
                )
            version = self._version(rel, path, st)
            if version is not None:
                self._stability.forget(rel)
                ready.append(version)
        return sorted(ready, key=lambda v: (v.mtime_ns, v.rel_path))  # acquisition order

    def _version(self, rel: str, path: Path, st: os.stat_result) -> FileVersion | None:
        """The file's identity, hashed now; None if it changed meanwhile or cannot be read
        yet. A file we may not read still becomes a job, so its row says why it failed."""
        try:
            digest = self.hasher(path)
            after = self.stat(path)
        except FileNotFoundError:
            self._stability.forget(rel)
            return None
        except PermissionError:
            digest, after = f"unreadable-{st.st_size}-{st.st_mtime_ns}", st
        except OSError as exc:
            self._warn_once(rel, f"cannot read {path}: {_readable(exc)}; will try again")
            return None
        if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            self._stability.observe(rel, after.st_size, after.st_mtime_ns, self.clock())
            return None
        self._problems.discard(rel)
        return FileVersion(rel, st.st_size, st.st_mtime_ns, digest)

    def _walk(self, top: Path) -> Iterator[tuple[str, os.stat_result]]:
        """(relative path, stat) of the regular files under ``top``, skipped folders left out."""
        folders = [top]
        while folders:
            folder = folders.pop()
            try:
                with os.scandir(folder) as entries:
                    listing = list(entries)
            except OSError as exc:
                if folder == self.inbox:
                    self._warn_once(
                        str(folder),
                        f"cannot list the inbox {folder}: {_readable(exc)}; "
                        "looking again at the next rescan",
                    )
                elif not isinstance(exc, FileNotFoundError):
                    self._warn_once(str(folder), f"cannot list {folder}: {_readable(exc)}")
                continue
            if folder == self.inbox:
                self._problems.discard(str(folder))
            for entry in listing:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if not _match(entry.name, self.settings.exclude) and not self._skipped(
                            entry.path
                        ):
                            folders.append(Path(entry.path))
                    elif entry.is_file():
                        rel = Path(os.path.relpath(entry.path, self.inbox)).as_posix()
                        yield rel, self.stat(entry.path)
                except OSError:
                    continue  # vanished while we looked

    def _skipped(self, path: str | Path) -> bool:
        return os.path.realpath(path) in self._skip

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._problems:
            self._problems.add(key)
            log.warning("%s", message)

    def _start_observer(self) -> Any:
        return start_observer(
            self.inbox,
            self.hint,
            polling=self.settings.polling,
            interval_s=max(1.0, self.settings.stable_time_s),
        )


def _hints_handler(put: Callable[[str], None]) -> Any:
    """A watchdog event handler that only enqueues paths: it cannot raise, so it cannot
    kill the observer thread, and it never blocks it."""
    from watchdog.events import FileSystemEvent, FileSystemEventHandler

    class Hints(FileSystemEventHandler):
        def dispatch(self, event: FileSystemEvent) -> None:
            path = event.dest_path if event.event_type == "moved" else event.src_path
            put(os.fsdecode(path))

    return Hints()


def start_observer(
    inbox: Path, hint: Callable[[str], None], *, polling: bool = False, interval_s: float = 1.0
) -> Any:
    """A started watchdog observer sending hints for ``inbox``, or None if the system
    refuses one (the periodic rescan then finds new files on its own)."""
    from watchdog import events
    from watchdog.observers import Observer
    from watchdog.observers.polling import PollingObserver

    wanted: list[type[events.FileSystemEvent]] = [
        events.FileCreatedEvent,
        events.FileMovedEvent,
        events.FileClosedEvent,
        events.DirCreatedEvent,
        events.DirMovedEvent,
    ]
    observer = PollingObserver(timeout=interval_s) if polling else Observer()
    try:
        observer.schedule(
            _hints_handler(hint), os.fspath(inbox), recursive=True, event_filter=wanted
        )
        observer.start()
    except OSError as exc:
        log.warning(
            "cannot watch %s for file events (%s); new files are found by the periodic "
            "rescan only. Set watch.polling: true for network shares.",
            inbox,
            _readable(exc),
        )
        return None
    return observer


def _readable(exc: OSError) -> str:
    """An OS error in words a user can act on."""
    if exc.errno == errno.ENOSPC and "inotify" in str(exc).lower():
        return "the inotify watch limit is reached; raise fs.inotify.max_user_watches"
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    if exc.errno == errno.EMFILE:
        return "too many open files or inotify instances; raise fs.inotify.max_user_instances"
    if exc.errno in (errno.ESTALE, errno.EIO, errno.ENOTCONN, errno.EHOSTDOWN):
        return f"the file system is not responding ({exc.strerror}); is the share mounted?"
    return exc.strerror or str(exc)
