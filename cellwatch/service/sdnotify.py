"""Tell systemd how the daemon is doing (``sd_notify``), with no extra dependency.

systemd passes a unix datagram socket in ``NOTIFY_SOCKET`` (a path, or ``@name`` in the
abstract namespace); each message is a few ``KEY=value`` lines: ``READY=1`` once the
service works, ``WATCHDOG=1`` as a heartbeat, ``RELOADING=1`` / ``STOPPING=1``, and
``STATUS=`` text that ``systemctl status`` shows. Outside systemd there is no socket and
every call does nothing, so the daemon runs the same from a terminal.
"""

from __future__ import annotations

__all__ = ["Notifier", "watchdog_interval"]

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("cellwatch.service.sdnotify")


class Notifier:
    """Sends notifications to the socket named in ``environ["NOTIFY_SOCKET"]``, if any.

    Parameters
    ----------
    environ : mapping, optional
        The environment to read (``os.environ`` by default); tests pass a dict.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval_s = watchdog_interval(env)
        self._warned = False

    @property
    def enabled(self) -> bool:
        """True when systemd gave a notification socket (NOTIFY_SOCKET)."""
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send ``KEY=value`` lines as one datagram; True if it was sent.

        A failure is logged once and otherwise ignored: losing a status line must never
        stop the daemon.
        """
        if self.address is None:
            return False
        message = "\n".join(line.replace("\n", " ") for line in lines).encode()
        kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        try:
            with socket.socket(socket.AF_UNIX, kind) as sock:
                # never blocks: if the listener's queue is full the message is dropped
                sock.sendto(message, self.address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd at %s: %s", self.address, exc.strerror or exc)
            return False
        return True

    def status(self, text: str) -> bool:
        """Set the one-line status ``systemctl status cellwatch`` shows."""
        return self.send(f"STATUS={text}")


def watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``WATCHDOG_USEC``, as systemd
    recommends; None when no watchdog is asked for, or it is meant for another process."""
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2e6


def _address(value: str) -> str | None:
    """The socket address for ``NOTIFY_SOCKET``: a path, or ``@name`` → abstract ``\\0name``."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # unset, or a kind of socket (vsock) cellwatch does not speak
