"""When the daemon writes daily reports: today's page every ``report.refresh_interval_s``,
and the previous day's once more just after local midnight, so that it includes the last
images of the day. Pure logic: the caller passes the clocks in."""

from __future__ import annotations

__all__ = ["ReportSchedule"]

from dataclasses import dataclass
from datetime import date, datetime, timedelta

from cellwatch.config import local_today


@dataclass
class ReportSchedule:
    """When the daemon writes reports: the clocks are passed in, so tests control time."""

    timezone: str
    interval_s: float
    _last_run: float | None = None  # monotonic seconds
    _last_day: date | None = None  # local date at the last run

    def due(self, now: datetime, monotonic: float) -> tuple[date, date] | None:
        """The (first, last) local dates to (re)build now, or None if nothing is due.

        The first call covers yesterday too, in case the daemon was down at midnight.
        """
        today = local_today(self.timezone, now)
        if self._last_day is None:
            first = today - timedelta(days=1)
        elif today != self._last_day:
            first = self._last_day
        elif monotonic - (self._last_run or 0.0) >= self.interval_s:
            first = today
        else:
            return None
        self._last_day, self._last_run = today, monotonic
        return first, today
