"""Checks of single setting values that several parts need: a Dask scheduler address, a
time zone and the day in it. Part of the settings: imports nothing of cellwatch but its
errors."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cellwatch.errors import ConfigError

__all__ = ["check_address", "local_today", "tcp_host_port", "time_zone"]

_ADDRESS = re.compile(r"(?P<scheme>tcp|tls|ws|wss|inproc)://(?P<rest>\S+)")
_HOST_PORT = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^:/\s\[\]]+):(?P<port>\d{1,5})/?")


def check_address(address: str, origin: str) -> str:
    """``address`` if it is a whole Dask scheduler address; a :class:`ConfigError` naming
    ``origin`` (the flag or the config key it came from) and the fix when it is not.

    Examples
    --------
    >>> check_address("tcp://10.0.0.5:8786", "--scheduler")
    'tcp://10.0.0.5:8786'
    >>> check_address("10.0.0.5:8786", "--scheduler")
    Traceback (most recent call last):
    ...
    cellwatch.errors.ConfigError: --scheduler must be a Dask scheduler address such as tcp://10.0.0.5:8786 (the scheme tcp:// in front), got '10.0.0.5:8786'
    """
    found = _ADDRESS.fullmatch(address)
    if found is None:
        raise ConfigError(
            f"{origin} must be a Dask scheduler address such as tcp://10.0.0.5:8786 (the "
            f"scheme tcp:// in front), got {address!r}"
        )
    if found["scheme"] != "inproc":
        where = _HOST_PORT.fullmatch(found["rest"])
        if where is None or not 0 < int(where["port"]) < 65536:
            raise ConfigError(
                f"{origin} {address!r} names no port; give the port the scheduler listens on, "
                f"e.g. {found['scheme']}://{found['rest'].split(':')[0].rstrip('/')}:8786 "
                "(`dask scheduler` prints its address when it starts)"
            )
    return address


def tcp_host_port(address: str) -> tuple[str, int] | None:
    """The host and port of a ``tcp://host:port`` address; None for any other.

    Examples
    --------
    >>> tcp_host_port("tcp://[::1]:8786")
    ('::1', 8786)
    """
    found = _ADDRESS.fullmatch(address)
    where = _HOST_PORT.fullmatch(found["rest"]) if found and found["scheme"] == "tcp" else None
    return (where["host"].strip("[]"), int(where["port"])) if where else None


def time_zone(name: str, where: str = "") -> ZoneInfo:
    """The IANA time zone ``report.timezone`` names, in which cellwatch's days begin.

    Examples
    --------
    >>> time_zone("Europe/Berlin").key
    'Europe/Berlin'
    """
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigError(
            f"{where + ': ' if where else ''}report.timezone: unknown time zone {name!r}; "
            "use an IANA name such as 'Europe/Berlin' or 'America/New_York'"
        ) from exc


def local_today(timezone: str, now: datetime | None = None) -> date:
    """Today's date in ``timezone`` (the default day of ``cellwatch report``).

    Examples
    --------
    >>> local_today("Pacific/Auckland", datetime(2026, 3, 28, 12, tzinfo=UTC))
    datetime.date(2026, 3, 29)
    """
    return (now or datetime.now(UTC)).astimezone(time_zone(timezone)).date()
