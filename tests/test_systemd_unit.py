"""The systemd units in systemd/: valid, hardened (``systemd-analyze security``), and the
daemon really counting images under every setting of cellwatch.service.

The last test boots systemd in a throw-away container (``systemd-nspawn``, the host's
/usr with an empty root) and runs the unmodified unit file there. It needs root and
systemd-nspawn (Debian: systemd-container), and is skipped where the container cannot
start (an unprivileged CI runner, say).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import uuid
from pathlib import Path

import pytest
import tifffile
import yaml
from conftest import discs

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "cellwatch.service"
WORKER_UNIT = REPO / "systemd" / "cellwatch-worker@.service"
CELLWATCH = Path(sys.executable).with_name("cellwatch")
MAX_EXPOSURE = 3.0  # `systemd-analyze security`: well-hardened services rate 2–3
UNITS = pytest.mark.parametrize("source", [UNIT, WORKER_UNIT], ids=["daemon", "worker"])


def systemd_analyze() -> str:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (the systemd package; CI installs it)")
    return analyze


@UNITS
def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path, source: Path):
    analyze = systemd_analyze()
    # verify insists that ExecStart's program exists: point it at this environment's
    text = source.read_text()
    for program in ("/opt/cellwatch/venv/bin/cellwatch", "/opt/cellwatch/venv/bin/dask"):
        text = text.replace(program, str(CELLWATCH))
    unit = tmp_path / source.name
    unit.write_text(text)
    result = subprocess.run([analyze, "verify", unit], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert source.name not in result.stderr, result.stderr  # unknown keys are only warnings
    for needed in ("Restart=", "ProtectSystem=strict", "NoNewPrivileges=yes",
                   "StateDirectory=", "MemoryMax=", "DeviceAllow=char-nvidia", "UMask=0027",
                   "CacheDirectory=cellwatch", "XDG_CACHE_HOME=/var/cache"):  # fmt: skip
        assert needed in text
    if source == UNIT:
        assert all(needed in text for needed in ("Type=notify", "WatchdogSec=", "ExecReload="))
    # the JIT compilers of oneDNN and XLA need writable, executable memory: a comment says so
    assert "\nMemoryDenyWriteExecute=" not in text and "JIT" in text


def _setting(text: str, key: str) -> str:
    found = re.findall(rf"^{key}=(.*)$", text, re.MULTILINE)
    return found[-1].strip() if found else ""


@pytest.mark.parametrize(
    ("source", "clean_exit_restarts"),
    [(UNIT, False), (WORKER_UNIT, True)],
    ids=["daemon", "worker"],
)
def test_which_exits_systemd_restarts(source: Path, clean_exit_restarts: bool):
    """Both restart after a crash. The worker also after exit status 0: `dask worker` ends
    with 0 when its scheduler goes away, and must be there when the scheduler is back; the
    daemon's 0 is a requested stop."""
    text = source.read_text()
    restart, forced = _setting(text, "Restart"), _setting(text, "RestartForceExitStatus").split()
    assert restart in ("on-failure", "always"), restart
    assert (restart == "always" or "0" in forced) is clean_exit_restarts, (restart, forced)
    assert _setting(text, "RestartSec"), "a restart needs a pause: no busy loop"


def test_reload_sends_sighup_to_the_daemon():
    """`systemctl reload cellwatch` must reach the daemon as SIGHUP (it re-reads the
    configuration and switches the model at the next image); a unit without ExecReload
    would refuse the reload, and one that restarted instead would drop the images in hand."""
    text = UNIT.read_text()
    assert _setting(text, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert _setting(text, "Type") == "notify"  # RELOADING=1 … READY=1 tell systemd when done


@UNITS
def test_unit_exposure_is_at_most_3(source: Path):
    analyze = systemd_analyze()
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", source.name],
        capture_output=True,
        text=True,
        cwd=source.parent,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert found, f"no exposure level in the output:\n{result.stdout}\n{result.stderr}"
    exposure = float(found[1])
    assert exposure <= MAX_EXPOSURE, (
        f"{source.name} rates {exposure} (at most {MAX_EXPOSURE} allowed):\n{result.stdout}"
    )


# --- the daemon under the unit, in a container ----------------------------------------


def free_id() -> int:
    """A user and group id no account on this machine has."""
    return next(i for i in range(64990, 65500) if not _taken(i))


def _taken(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


class Container:
    """systemd as PID 1 of a container holding the host's /usr, the unit, a stand-in for
    /opt/cellwatch/venv (this checkout and this environment's packages) and the folders
    the unit names. Its journal is written to a folder here, and read with journalctl."""

    def __init__(self, tmp: Path, model: Path) -> None:
        self.tmp, self.uid = tmp, free_id()
        self.inbox, self.results = tmp / "inbox", tmp / "results"
        self.elsewhere = tmp / "elsewhere"  # mounted at /srv/elsewhere, outside the inbox
        self.journal = tmp / "journal"
        for folder in (self.inbox, self.elsewhere, self.journal, tmp / "bin", tmp / "model"):
            folder.mkdir(mode=0o755)
        for file in model.parent.glob(model.stem + ".*"):  # pytest's folders are private
            shutil.copy(file, tmp / "model")
        self.results.mkdir(mode=0o750)
        os.chown(self.results, self.uid, self.uid)
        os.chmod(self.results, 0o2750)  # as docs/daemon.md says: setgid, group-readable
        self.console = tmp / "console.log"
        self.name = f"cellwatch-test-{uuid.uuid4().hex[:8]}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._files(model)

    def _files(self, model: Path) -> None:
        tmp = self.tmp
        users = Path("/etc/passwd").read_text()
        groups = Path("/etc/group").read_text()
        (tmp / "passwd").write_text(
            users + f"cellwatch:x:{self.uid}:{self.uid}::/var/lib/cellwatch:/usr/sbin/nologin\n"
        )
        (tmp / "group").write_text(groups + f"cellwatch:x:{self.uid}:\n")
        launcher = tmp / "bin" / "cellwatch"
        launcher.write_text(
            "#!/bin/sh\n"
            "export LD_LIBRARY_PATH=/opt/python/lib\n"
            "export PYTHONPATH=/opt/cellwatch/src:/opt/cellwatch/site-packages\n"
            f'exec /opt/python/bin/python{sys.version_info.major}.{sys.version_info.minor} -m cellwatch "$@"\n'
        )
        launcher.chmod(0o755)
        settings = {
            "model": {"path": "/opt/model/" + model.name},
            "output": {"dir": "/srv/microscope/results"},
            "tiling": {"tile_size": 64, "overlap": 8, "batch_size": 8},
            "watch": {"inbox": "/srv/microscope/inbox", "stable_time_s": 0.5,
                      "rescan_interval_s": 2.0, "incomplete_timeout_s": 2.0},
            "report": {"refresh_interval_s": 1.0},
        }  # fmt: skip
        (tmp / "config.yaml").write_text(yaml.safe_dump(settings))
        self.binds = [
            ("--bind-ro", tmp / "passwd", "/etc/passwd"),
            ("--bind-ro", tmp / "group", "/etc/group"),
            ("--bind-ro", UNIT, "/etc/systemd/system/cellwatch.service"),
            ("--bind-ro", tmp / "config.yaml", "/etc/cellwatch/config.yaml"),
            ("--bind-ro", tmp / "bin", "/opt/cellwatch/venv/bin"),
            ("--bind-ro", Path(sys.base_prefix), "/opt/python"),
            ("--bind-ro", REPO, "/opt/cellwatch/src"),
            ("--bind-ro", Path(sysconfig.get_paths()["purelib"]), "/opt/cellwatch/site-packages"),
            ("--bind-ro", tmp / "model", "/opt/model"),
            ("--bind-ro", self.elsewhere, "/srv/elsewhere"),
            ("--bind", self.inbox, "/srv/microscope/inbox"),
            ("--bind", self.results, "/srv/microscope/results"),
            ("--bind", self.journal, "/var/log/journal"),
        ]

    def start(self) -> None:
        command = [
            "systemd-nspawn", "--quiet", "--directory=/", "--volatile=yes",
            f"--machine={self.name}", "--register=no", "--keep-unit", "--console=pipe",
            "--kill-signal=SIGRTMIN+3",  # what stops systemd in order (SIGTERM does not)
            *(f"{option}={source}:{target}" for option, source, target in self.binds),
            "/lib/systemd/systemd", "--unit=cellwatch.service",
        ]  # fmt: skip
        with self.console.open("wb") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)

    def log(self) -> str:
        """What nspawn printed, then the container's journal."""
        journal = subprocess.run(
            ["journalctl", f"--directory={self.journal}", "--no-pager", "--quiet"],
            capture_output=True,
            text=True,
            errors="replace",
        )
        return self.console.read_text(errors="replace") + journal.stdout

    def wait_for(self, text: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in (log := self.log()):
            if "cellwatch.service: Main process exited" in log:
                raise AssertionError(f"cellwatch failed under the unit:\n{log[-8000:]}")
            if self.proc is not None and self.proc.poll() is not None:
                if "Started cellwatch.service" not in self.log():  # the container, not us
                    pytest.skip(f"systemd-nspawn cannot run a container here:\n{self.log()}")
                raise AssertionError(f"the container stopped:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} in {timeout} s:\n{self.log()[-5000:]}")
            time.sleep(0.2)

    def service_status(self) -> dict[str, str]:
        """/proc/PID/status of the daemon, seen from outside the container."""
        for status in Path("/proc").glob("[0-9]*/status"):
            try:
                fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines())
                command = (status.parent / "cmdline").read_bytes()
            except (OSError, ValueError):
                continue
            if fields["Uid"].split()[0] == str(self.uid) and b"cellwatch\0watch" in command:
                return {key: value.strip() for key, value in fields.items()}
        raise AssertionError("no cellwatch process running as the unit's user")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # nspawn passes on --kill-signal: a poweroff
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)


def test_daemon_counts_images_under_the_hardened_unit(tmp_path: Path, threshold_model: Path):
    if os.geteuid() != 0 or shutil.which("systemd-nspawn") is None:
        pytest.skip("needs root and systemd-nspawn (Debian: systemd-container)")
    if not Path("/lib/systemd/systemd").exists() or shutil.which("journalctl") is None:
        pytest.skip("systemd is not installed")
    box = Container(tmp_path, threshold_model)
    image, _ = discs((256, 256), [(40, 40), (40, 200), (128, 128), (200, 60)], 12)
    tifffile.imwrite(box.elsewhere / "private.tif", image)
    (box.inbox / "link-out.tif").symlink_to("/srv/elsewhere/private.tif")
    os.mkfifo(box.inbox / "pipe.tif")
    try:
        box.start()
        box.wait_for("Started cellwatch.service")  # Type=notify: READY=1 came through
        status = box.service_status()
        tifffile.imwrite(box.inbox / "A01.tif.part", image)
        os.rename(box.inbox / "A01.tif.part", box.inbox / "A01.tif")
        box.wait_for("A01.tif: 4 cells")
        # the sandbox is really in force: a syscall filter, no privileges, the unit's umask
        assert (status["Seccomp"], status["NoNewPrivs"]) == ("2", "1")
        assert int(status["CapBnd"], 16) == 0 and int(status["CapEff"], 16) == 0
        assert status["Umask"] == "0027"
    finally:
        box.stop()
    log = box.log()
    assert "link-out.tif is a symbolic link to /srv/elsewhere/private.tif, outside the inbox" in log
    assert "pipe.tif is a FIFO (named pipe), not a regular file" in log
    assert "cellwatch.service: Deactivated successfully." in log, log[-5000:]  # exit status 0
    assert "status=31/SYS" not in log  # no system call was refused with a kill
    rows = (box.results / "ledger.csv").read_text()
    assert "/srv/microscope/inbox/A01.tif" in rows and ",4," in rows
    for path in [box.results, *box.results.rglob("*")]:
        st = path.stat()
        assert st.st_mode & 0o007 == 0, f"{path} is world-accessible ({oct(st.st_mode)})"
        assert (st.st_uid, st.st_gid) == (box.uid, box.uid), path
