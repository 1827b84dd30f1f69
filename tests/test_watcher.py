"""Finding files: globs, the stability rule with a fake clock and stat, completeness
checks, hints from events, and the real watchdog observer."""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
from conftest import ome_header, write_pages
from PIL import Image

from cellwatch.config import WatchConfig
from cellwatch.service.jobs import FileVersion
from cellwatch.service.watcher import (
    Stability,
    Watcher,
    incomplete_reason,
    looks_complete,
    matches,
    refusal,
    start_observer,
)
from cellwatch.storage.imageio import sha256_file

INCLUDE = WatchConfig().include
EXCLUDE = WatchConfig().exclude


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeStat:
    """os.stat, except for files given a size and mtime by the test."""

    def __init__(self) -> None:
        self.fake: dict[str, tuple[int, int]] = {}
        self.calls = 0

    def __call__(self, path):
        self.calls += 1
        real = os.stat(path)
        if os.fspath(path) in self.fake:
            size, mtime = self.fake[os.fspath(path)]
            return SimpleNamespace(st_mode=real.st_mode, st_size=size, st_mtime_ns=mtime)
        return real


def tiff_bytes(shape=(32, 32)) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.full(shape, 7, np.uint8))
    return buffer.getvalue()


class Harness:
    def __init__(self, tmp_path: Path, **settings) -> None:
        self.inbox = tmp_path / "inbox"
        self.inbox.mkdir()
        self.clock = Clock()
        self.stat = FakeStat()
        self.known: set[tuple[str, int, int]] = set()
        self.ready: list[FileVersion] = []
        self.probed: list[Path] = []
        self.hashed: list[Path] = []
        self.complete = True
        defaults = dict(stable_time_s=1.0, rescan_interval_s=3600.0, incomplete_timeout_s=5.0)
        self.watcher = Watcher(
            self.inbox,
            WatchConfig(**{**defaults, **settings}),
            is_known=lambda *key: key in self.known,
            on_stable=self.ready.extend,
            skip=[self.inbox / ".state", self.inbox / "results" / "labels"],
            stat=self.stat,
            clock=self.clock,
            probe=self.probe,
            hasher=self.hash,
        )

    def probe(self, path: Path) -> bool:
        self.probed.append(path)
        return self.complete

    def hash(self, path: Path) -> str:
        self.hashed.append(path)
        return sha256_file(path)

    def write(self, rel: str, data: bytes = b"x" * 10) -> Path:
        path = self.inbox / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def step(self, advance: float = 0.0) -> list[str]:
        self.clock.now += advance
        return [v.rel_path for v in self.watcher.step()]


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


# --- globs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rel", "expected"),
    [
        ("a.tif", True),
        ("A.TIF", True),
        ("day1/well B2.tiff", True),
        ("a.png", True),
        ("a.tif.part", False),
        ("a.tmp", False),
        ("~a.tif", False),
        (".a.tif", False),
        ("._a.tif", False),  # macOS resource fork on a share
        (".hidden/a.tif", False),  # nothing inside a hidden folder
        ("notes.txt", False),
        ("a.vsi", False),  # Olympus VSI: not read (CZI, ND2, LIF: tests/test_formats.py)
    ],
)
def test_matches_default_globs(rel: str, expected: bool):
    assert matches(rel, INCLUDE, EXCLUDE) is expected


# --- the stability rule -----------------------------------------------------------------


def test_stability_counts_time_since_the_last_change():
    s = Stability()
    assert s.observe("a", 10, 1, now=0.0) == 0.0
    assert s.observe("a", 10, 1, now=1.5) == 1.5
    assert s.observe("a", 20, 1, now=2.0) == 0.0  # grew: start again
    assert s.observe("a", 20, 2, now=2.5) == 0.0  # written again, same size
    assert s.observe("a", 20, 2, now=4.0) == 1.5
    s.forget("a")
    assert "a" not in s and len(s) == 0


def test_stability_asks_the_completeness_check_once_per_version():
    s, calls = Stability(), []
    s.observe("a", 10, 1, now=0.0)
    check = lambda: calls.append(1) or False  # noqa: E731
    assert not s.complete("a", check) and not s.complete("a", check)
    s.observe("a", 11, 1, now=1.0)
    s.complete("a", check)
    assert len(calls) == 2


def test_backlog_is_found_and_handed_on_after_the_stable_time(h: Harness):
    h.write("a.tif")
    h.write("day2/b.tif")
    assert h.step() == []  # found by the start-up rescan, not yet stable
    assert h.step(0.9) == []
    assert sorted(h.step(0.2)) == ["a.tif", "day2/b.tif"]
    assert h.step(5.0) == []  # handed on once
    [a] = [v for v in h.ready if v.rel_path == "a.tif"]
    assert (a.size, a.sha256) == (10, sha256_file(h.inbox / "a.tif"))


def test_growing_file_is_never_read(h: Harness):
    path = h.write("slow.tif")
    key = os.fspath(path)
    for second in range(10):  # grows a little every half second, for five seconds
        h.stat.fake[key] = (100 * (second + 1), second)
        assert h.step(0.5) == []
    assert h.probed == [] and h.hashed == []  # not even the header was looked at
    del h.stat.fake[key]  # the writer is done: real size and time from now on
    assert h.step(0.5) == []
    assert h.step(1.0) == ["slow.tif"]
    assert h.hashed == [path]


def test_incomplete_file_waits_then_is_handed_on_to_fail(h: Harness):
    h.complete = False
    h.write("corrupt.tif")
    h.step()
    assert h.step(1.5) == []  # stable but incomplete: the writer may only have paused
    assert h.step(3.0) == []
    assert h.step(2.0) == ["corrupt.tif"]  # 6.5 s > 1 + 5: give up waiting; it will fail
    assert len(h.probed) == 1  # probed once: the file did not change meanwhile


def test_incomplete_file_that_is_finished_later_is_handed_on_complete(h: Harness):
    h.complete = False
    path = h.write("paused.tif", b"part")
    h.step()
    h.step(1.5)
    h.complete = True
    path.write_bytes(b"part and the rest")
    assert h.step(0.1) == []
    assert h.step(1.0) == ["paused.tif"]
    assert h.ready[0].size == len(b"part and the rest")


def test_known_excluded_and_skipped_files_are_ignored(h: Harness):
    h.write("done.tif")
    h.known.add(("done.tif", 10, os.stat(h.inbox / "done.tif").st_mtime_ns))
    h.write("x.tif.part")
    h.write("notes.txt")
    h.write(".state/jobs.tif")
    h.write("results/labels/a.tif")  # cellwatch's own output, when it lives in the inbox
    h.write("results/keep.tif")
    h.step()
    assert h.step(2.0) == ["results/keep.tif"]


def test_file_deleted_before_stable_is_forgotten(h: Harness):
    path = h.write("a.tif")
    h.step()
    path.unlink()
    assert h.step(2.0) == []
    assert h.watcher.pending() == 0


def test_file_changed_while_hashed_waits_again(h: Harness):
    path = h.write("a.tif")

    def hash_and_append(p: Path) -> str:
        digest = sha256_file(p)
        with p.open("ab") as f:
            f.write(b"more")
        return digest

    h.watcher.hasher = hash_and_append
    h.step()
    assert h.step(1.5) == []
    h.watcher.hasher = h.hash
    assert h.step(1.5) == ["a.tif"]
    assert h.ready[0].sha256 == sha256_file(path)


def test_unreadable_file_still_becomes_a_job(h: Harness):
    h.write("secret.tif")

    def refuse(path: Path) -> str:
        raise PermissionError(13, "Permission denied", str(path))

    h.watcher.hasher = refuse
    h.step()
    assert h.step(1.5) == ["secret.tif"]  # so that its failed row says "permission denied"
    assert h.ready[0].sha256.startswith("unreadable-")


# --- what anyone who can write to the inbox may put there --------------------------------


def secret_image(tmp_path: Path) -> Path:
    """An image outside the inbox that the service user can read."""
    path = tmp_path / "elsewhere" / "private.tif"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(tiff_bytes())
    return path


def test_link_out_of_the_inbox_is_handed_on_at_once_and_never_opened(h: Harness, tmp_path):
    secret = secret_image(tmp_path)
    (h.inbox / "a.tif").symlink_to(secret)
    (h.inbox / "day2").mkdir()
    (h.inbox / "day2" / "b.tif").symlink_to("../../elsewhere/private.tif")
    assert sorted(h.step()) == ["a.tif", "day2/b.tif"]  # a link is whole once it exists
    assert h.probed == [] and h.hashed == []
    assert all(v.sha256.startswith("unreadable-link-") for v in h.ready)
    [a] = [v for v in h.ready if v.rel_path == "a.tif"]
    assert (a.size, a.mtime_ns) == (len(str(secret)), os.lstat(h.inbox / "a.tif").st_mtime_ns)
    h.known.update((v.rel_path, v.size, v.mtime_ns) for v in h.ready)
    h.watcher.rescan(h.clock.now)
    assert h.step(5.0) == [] and h.watcher.pending() == 0  # known now: handed on once


def test_file_swapped_for_a_link_out_while_it_settles_is_not_opened(h: Harness, tmp_path):
    path = h.write("a.tif")
    h.step()
    path.unlink()
    path.symlink_to(secret_image(tmp_path))
    assert h.step(1.5) == ["a.tif"]
    assert h.probed == [] and h.hashed == []
    assert h.ready[0].sha256.startswith("unreadable-link-")


def test_links_are_followed_when_the_settings_say_so(tmp_path: Path):
    h = Harness(tmp_path, follow_symlinks=True)
    secret = secret_image(tmp_path)
    (h.inbox / "a.tif").symlink_to(secret)
    assert h.step() == []  # an ordinary candidate: it has to be stable first
    assert h.step(1.5) == ["a.tif"]
    assert h.hashed == [h.inbox / "a.tif"]
    assert h.ready[0].sha256 == sha256_file(secret)


def test_link_to_a_file_inside_the_inbox_is_counted_like_a_file(h: Harness):
    h.write("day1/real.tif")
    (h.inbox / "alias.tif").symlink_to("day1/real.tif")
    h.step()
    assert sorted(h.step(1.5)) == ["alias.tif", "day1/real.tif"]
    assert h.ready[0].sha256 == h.ready[1].sha256 == sha256_file(h.inbox / "day1/real.tif")


def test_fifo_is_logged_once_and_never_opened(tmp_path: Path, caplog):
    h = Harness(tmp_path, rescan_interval_s=1.0)
    os.mkfifo(h.inbox / "pipe.tif")
    os.mkfifo(h.inbox / "pipe.txt")  # not an image name: not cellwatch's business
    (h.inbox / "via-link.tif").symlink_to("pipe.tif")
    h.write("after.tif")
    h.step()
    h.watcher.hint(str(h.inbox / "pipe.tif"))
    assert h.step(1.5) == ["after.tif"]  # the FIFO holds nothing up
    h.known.update((v.rel_path, v.size, v.mtime_ns) for v in h.ready)
    for _ in range(3):  # more rescans find the FIFO again: still one message each
        assert h.step(1.5) == []
    assert h.probed == [h.inbox / "after.tif"] and h.hashed == [h.inbox / "after.tif"]
    assert h.watcher.pending() == 0
    fifo_lines = sorted(r.message for r in caplog.records if "FIFO" in r.message)
    assert fifo_lines == [
        f"{h.inbox / name} is a FIFO (named pipe), not a regular file; cellwatch never opens "
        "it (opening a FIFO waits forever) and it gets no row"
        for name in ("pipe.tif", "via-link.tif")
    ]


def test_refusal_names_the_file_and_says_why(tmp_path: Path):
    inbox = tmp_path / "inbox"
    (inbox / "day1").mkdir(parents=True)
    (inbox / "day1" / "real.tif").write_bytes(b"x")
    secret = secret_image(tmp_path)
    (inbox / "out.tif").symlink_to(secret)
    (inbox / "in.tif").symlink_to("day1/real.tif")
    (inbox / "linked").symlink_to(secret.parent, target_is_directory=True)
    os.mkfifo(inbox / "pipe.tif")

    def why(rel: str, follow: bool = False) -> str | None:
        return refusal(inbox, rel, follow_symlinks=follow)

    assert why("day1/real.tif") is None and why("in.tif") is None
    assert why("gone.tif") is None  # the image reader says "does not exist"
    assert why("out.tif") == (
        f"{inbox / 'out.tif'} is a symbolic link to {secret}, outside the inbox; cellwatch "
        "did not read it (watch.follow_symlinks is false). Copy the image itself into the inbox"
    )
    assert "reached through a linked folder" in why("linked/private.tif")
    assert why("out.tif", follow=True) is None
    assert why("linked/private.tif", follow=True) is None
    assert (
        why("pipe.tif")
        == f"{inbox / 'pipe.tif'} is a FIFO (named pipe), not a regular file; it was not opened"
    )
    assert "is a folder" in why("day1")


def test_hints_find_new_files_between_rescans(h: Harness):
    h.step()  # the start-up rescan: empty inbox
    path = h.write("new.tif")
    folder = h.inbox / "moved-in"
    folder.mkdir()
    (folder / "b.tif").write_bytes(b"y")
    assert h.step(1.0) == []  # no rescan due, no hint: not seen
    h.watcher.hint(str(path))
    h.watcher.hint(str(folder))  # a folder moved in: its files are looked at
    h.watcher.hint("/somewhere/else.tif")  # outside the inbox: ignored
    h.watcher.hint(str(h.inbox / "gone.tif"))  # vanished already: ignored
    assert h.step() == []
    assert sorted(h.step(1.0)) == ["moved-in/b.tif", "new.tif"]


def test_periodic_rescan_finds_files_whose_events_were_lost(tmp_path: Path):
    h = Harness(tmp_path, rescan_interval_s=10.0)
    h.step()
    h.write("a.tif")
    assert h.step(5.0) == []
    assert h.step(5.0) == []  # the rescan at 10 s finds it
    assert h.step(1.0) == ["a.tif"]


def test_missing_inbox_is_a_warning_not_a_crash(tmp_path: Path, caplog):
    h = Harness(tmp_path)
    h.inbox.rmdir()
    assert h.step() == []
    assert "cannot list the inbox" in caplog.text


def test_tick_follows_the_stable_time():
    inbox = Path(".")
    fast = Watcher(inbox, WatchConfig(stable_time_s=0.2), is_known=bool, on_stable=print)
    slow = Watcher(inbox, WatchConfig(stable_time_s=5), is_known=bool, on_stable=print)
    assert fast.tick == pytest.approx(0.05) and slow.tick == 0.25


# --- completeness -----------------------------------------------------------------------


def encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16), 9, np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [
        ("a.tif", tiff_bytes(), True),
        ("a.tif", tiff_bytes()[:-100], False),  # pixel data cut short
        ("a.tif", tiff_bytes()[:6], False),  # header cut short
        ("a.tif", b"", False),
        ("a.tif", b"this is not a tiff at all", False),
        ("a.tif", b"II*\x00" + bytes(range(256)) * 4, False),  # TIFF magic, garbage after
        ("a.png", encoded("PNG"), True),
        ("a.png", encoded("PNG")[:-12], False),
        ("a.jpg", encoded("JPEG"), True),
        ("a.jpg", encoded("JPEG")[:-2], False),
        ("a.vsi", b"anything", True),  # unknown type: the reader decides
    ],
)
def test_looks_complete(tmp_path: Path, name: str, data: bytes, expected: bool):
    path = tmp_path / name
    path.write_bytes(data)
    assert looks_complete(path) is expected


def test_a_stack_is_complete_only_with_all_its_declared_planes(tmp_path: Path):
    planes = np.zeros((3, 32, 32), np.uint16)
    path = tmp_path / "z.ome.tif"
    with path.open("wb") as fh:
        pages = write_pages(fh, planes, ome_header(planes))
        assert next(pages) == 1
        assert incomplete_reason(path) == (
            "it has 1 of the 3 planes its OME-XML declares (SizeZ 3 × SizeC 1 × SizeT 1)"
        )
        seen = [(1, looks_complete(path))] + [(n, looks_complete(path)) for n in pages]
    assert seen == [(1, False), (2, False), (3, True)]
    assert incomplete_reason(path) is None


def test_looks_complete_of_a_missing_file_is_false(tmp_path: Path):
    assert not looks_complete(tmp_path / "gone.tif")


def test_sha256_of_empty_file(tmp_path: Path):
    (tmp_path / "e").write_bytes(b"")
    assert sha256_file(tmp_path / "e").startswith("e3b0c442")


# --- the real observer ------------------------------------------------------------------


def wait_until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("polling", [False, True])
def test_observer_sends_hints_for_created_and_moved_files(tmp_path: Path, polling: bool):
    inbox, outside = tmp_path / "inbox", tmp_path / "outside"
    inbox.mkdir()
    outside.mkdir()
    hints: list[str] = []
    observer = start_observer(inbox, hints.append, polling=polling, interval_s=0.1)
    try:
        (inbox / "a.tif").write_bytes(b"a")
        (outside / "b.tif").write_bytes(b"b")
        os.rename(outside / "b.tif", inbox / "b.tif")
        (inbox / "c.tif.part").write_bytes(b"c")
        os.rename(inbox / "c.tif.part", inbox / "c.tif")
        expected = {str(inbox / name) for name in ("a.tif", "b.tif", "c.tif")}
        assert wait_until(lambda: expected <= set(hints)), hints
    finally:
        observer.stop()
        observer.join()


def test_run_hands_on_a_new_file_and_stops(tmp_path: Path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    ready: list[FileVersion] = []
    watcher = Watcher(
        inbox,
        WatchConfig(stable_time_s=0.1, rescan_interval_s=3600),
        is_known=lambda *key: False,
        on_stable=ready.extend,
    )
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,))
    thread.start()
    try:
        time.sleep(0.2)  # past the start-up rescan: only the event can find the file
        (inbox / "a.tif").write_bytes(tiff_bytes())
        assert wait_until(lambda: len(ready) == 1)
    finally:
        stop.set()
        thread.join()
    assert ready[0].rel_path == "a.tif"
