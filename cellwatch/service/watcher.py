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

Anyone who runs the microscope can write the inbox, so nothing in it is opened before its
type is known. A symbolic link that leads outside the inbox is not followed unless
``watch.follow_symlinks`` is true: it is handed on at once, unread, and gets a ``failed`` row
(:func:`refusal`). A FIFO, socket or device is logged once and never opened (opening a FIFO
waits for a writer forever).
"""

from __future__ import annotations

__all__ = [
    "Stability",
    "Watcher",
    "incomplete_reason",
    "looks_complete",
    "matches",
    "refusal",
    "start_observer",
]

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
from cellwatch.storage.imageio import sha256_file, tiff_incomplete

log = logging.getLogger("cellwatch.watch")

StatFn = Callable[[str | os.PathLike[str]], os.stat_result]

# What the watcher found at a path: a regular file, a real folder, something that is not a
# regular file, a link leading outside the inbox (not followed), or a linked folder (ignored).
_FILE, _FOLDER, _SPECIAL, _OUTSIDE, _IGNORE = "file", "folder", "special", "outside", "ignore"


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


def refusal(inbox: Path, rel: str, *, follow_symlinks: bool) -> str | None:
    """Why the daemon must not open the file ``rel`` of the inbox, or None if it may.

    Refused: a path that leads outside the inbox through a symbolic link (the file itself
    or a folder above it) while ``follow_symlinks`` is false, and anything that is not a
    regular file. Only link targets and file types are looked at, never the content. A
    file that is gone or cannot be looked at is not refused: the image reader then says
    what is wrong in its own words.
    """
    path = Path(inbox) / rel
    try:
        if not follow_symlinks and not _inside(path, inbox):
            return _outside_message(path)
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if not stat_module.S_ISREG(mode):
        return f"{path} is {_file_kind(mode)}, not a regular file; it was not opened"
    return None


def _inside(path: str | Path, inbox: str | Path) -> bool:
    """True if ``path``, with every symbolic link on the way resolved, lies in ``inbox``."""
    root = os.path.realpath(inbox)
    return os.path.commonpath([root, os.path.realpath(path)]) == root


def _outside_message(path: Path) -> str:
    try:
        what = f"a symbolic link to {os.readlink(path)}"
    except OSError:  # not a link itself: a folder above it is one
        what = "reached through a linked folder"
    return (
        f"{path} is {what}, outside the inbox; cellwatch did not read it "
        "(watch.follow_symlinks is false). Copy the image itself into the inbox"
    )


def _file_kind(mode: int) -> str:
    kinds = (
        (stat_module.S_ISFIFO, "a FIFO (named pipe)"),
        (stat_module.S_ISSOCK, "a socket"),
        (stat_module.S_ISCHR, "a character device"),
        (stat_module.S_ISBLK, "a block device"),
        (stat_module.S_ISDIR, "a folder"),
    )
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def looks_complete(path: Path) -> bool:
    """True if the file looks like a whole image (see :func:`incomplete_reason`)."""
    return incomplete_reason(path) is None


def incomplete_reason(path: Path) -> str | None:
    """Why the file does not look like a whole image yet, or None if it does.

    A TIFF must have all its pages and their pixel data, and as many planes as its OME-XML
    or ImageJ header declares (:func:`~cellwatch.storage.imageio.tiff_incomplete`); a PNG
    must end in its ``IEND`` chunk, a JPEG in its end-of-image marker, and a CZI, ND2 or LIF
    file must open whole in its bioio reader (:func:`~cellwatch.storage.vendor.opens_whole`).
    Other types are left to the image reader to judge. Reads headers only, never the pixels.
    """
    name = path.name.lower()
    try:
        size = path.stat().st_size
        if size == 0:
            return "it is empty"
        if name.endswith((".tif", ".tiff")):
            return _tiff_incomplete(path, size)
        if name.endswith(".png") and _tail(path, 12)[4:8] != b"IEND":
            return "it does not end in the PNG end chunk"
        if name.endswith((".jpg", ".jpeg")) and _tail(path, 2) != b"\xff\xd9":
            return "it does not end in the JPEG end marker"
        if vendor.is_vendor(path) and not vendor.opens_whole(path):  # the reader's own check
            return "its reader cannot open it whole yet"
    except OSError as exc:
        return f"it cannot be read ({_readable(exc)})"
    return None


def _tiff_incomplete(path: Path, size: int) -> str | None:
    import tifffile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with tifffile.TiffFile(path) as tif:
                return tiff_incomplete(tif, size)
        except Exception as exc:  # tifffile raises many types for a half-written file
            return f"it is not a readable TIFF yet ({exc})"


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
        """Stop tracking a file (it vanished, or became a job)."""
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
    stat, lstat, clock, probe, hasher
        Seams for tests: ``os.stat``, ``os.lstat``, ``time.monotonic``,
        :func:`looks_complete`, :func:`~cellwatch.storage.imageio.sha256_file`.
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
        lstat: StatFn = os.lstat,
        clock: Callable[[], float] = time.monotonic,
        probe: Callable[[Path], bool] = looks_complete,
        hasher: Callable[[Path], str] = sha256_file,
    ) -> None:
        self.inbox = Path(inbox)
        self.settings = settings
        self.is_known, self.on_stable = is_known, on_stable
        self.stat, self.lstat, self.clock = stat, lstat, clock
        self.probe, self.hasher = probe, hasher
        self._skip = {os.path.realpath(p) for p in skip}
        self._hints: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._stability = Stability()
        self._outside: dict[str, FileVersion] = {}  # links out of the inbox, handed on unread
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
        return len(self._stability) + len(self._outside)

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
        for rel, kind, st in self._walk(self.inbox):
            self._consider(rel, kind, st, now)

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
                kind, st = self._look(path)
            except OSError:
                continue  # gone again: nothing to do
            if kind == _FOLDER and not self._skipped(path):
                for sub_rel, sub_kind, sub_st in self._walk(Path(path)):
                    self._consider(sub_rel, sub_kind, sub_st, now)
            elif kind in (_FILE, _SPECIAL, _OUTSIDE):
                self._consider(Path(rel).as_posix(), kind, st, now)

    def _look(self, path: str | Path, *, linked: bool | None = None) -> tuple[str, os.stat_result]:
        """What ``path`` is, and its stat (the link's own for a link that is not followed).
        Nothing is opened. ``linked``: whether it is a symbolic link, when already known."""
        if linked is None:
            linked = stat_module.S_ISLNK(self.lstat(path).st_mode)
        if linked and not self.settings.follow_symlinks and not _inside(path, self.inbox):
            return _OUTSIDE, self.lstat(path)
        st = self.stat(path)
        if stat_module.S_ISDIR(st.st_mode):
            return (_IGNORE if linked else _FOLDER), st  # links into folders are not walked
        return (_FILE if stat_module.S_ISREG(st.st_mode) else _SPECIAL), st

    def _consider(self, rel: str, kind: str, st: os.stat_result, now: float) -> None:
        if rel in self._stability or rel in self._outside:
            return  # already a candidate: the stability check looks at it every step
        if not matches(rel, self.settings.include, self.settings.exclude):
            return
        if kind == _SPECIAL:
            self._warn_once(
                rel,
                f"{self.inbox / rel} is {_file_kind(st.st_mode)}, not a regular file; "
                "cellwatch never opens it (opening a FIFO waits forever) and it gets no row",
            )
            return
        if self.is_known(rel, st.st_size, st.st_mtime_ns):
            return
        if kind == _OUTSIDE:  # a link is whole once it exists: no need to wait
            digest = f"unreadable-link-{st.st_size}-{st.st_mtime_ns}"
            self._outside[rel] = FileVersion(rel, st.st_size, st.st_mtime_ns, digest)
            return
        self._stability.observe(rel, st.st_size, st.st_mtime_ns, now)

    def _check_candidates(self) -> list[FileVersion]:
        s = self.settings
        ready = []
        for rel in self._stability.files():
            path = self.inbox / rel
            try:
                kind, st = self._look(path)
            except FileNotFoundError:
                self._stability.forget(rel)  # renamed or deleted before it was complete
                continue
            except OSError as exc:
                self._warn_once(rel, f"cannot look at {path}: {_readable(exc)}; will try again")
                continue
            if kind != _FILE:  # replaced by a link, a FIFO or a folder while we waited
                self._stability.forget(rel)
                if kind in (_SPECIAL, _OUTSIDE):
                    self._consider(rel, kind, st, self.clock())
                continue
            waited = self._stability.observe(rel, st.st_size, st.st_mtime_ns, self.clock())
            if waited < s.stable_time_s:
                continue
            if not self._stability.complete(rel, lambda p=path: self.probe(p)):
                if waited < s.stable_time_s + s.incomplete_timeout_s:
                    continue
                log.warning(
                    "%s has not become a complete image in %.0f s (%s); recording it as failed",
                    path,
                    waited,
                    incomplete_reason(path),
                )
            version = self._version(rel, path, st)
            if version is not None:
                self._stability.forget(rel)
                ready.append(version)
        ready.extend(self._outside.values())  # links out of the inbox: handed on unread
        self._outside.clear()
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

    def _walk(self, top: Path) -> Iterator[tuple[str, str, os.stat_result]]:
        """(relative path, kind, stat) of everything under ``top`` that is not a folder,
        skipped folders left out; linked folders are not walked into."""
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
                        continue
                    kind, st = self._look(entry.path, linked=entry.is_symlink())
                except OSError:
                    continue  # vanished while we looked
                if kind in (_FILE, _SPECIAL, _OUTSIDE):
                    yield Path(os.path.relpath(entry.path, self.inbox)).as_posix(), kind, st

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
