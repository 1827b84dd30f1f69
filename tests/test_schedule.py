from __future__ import annotations

from datetime import UTC, date, datetime

from cellwatch.service.schedule import ReportSchedule


def test_today_is_refreshed_every_interval_and_yesterday_after_midnight():
    schedule = ReportSchedule("Europe/Berlin", interval_s=600)
    evening = datetime(2026, 11, 27, 22, 0, tzinfo=UTC)  # 23:00 in Berlin
    assert schedule.due(evening, 0.0) == (date(2026, 11, 26), date(2026, 11, 27))
    assert schedule.due(evening, 599.0) is None
    assert schedule.due(evening, 600.0) == (date(2026, 11, 27), date(2026, 11, 27))
    # 23:30 UTC is already the 28th in Berlin: the 27th is finished off with the new day
    after_midnight = datetime(2026, 11, 27, 23, 30, tzinfo=UTC)
    assert schedule.due(after_midnight, 700.0) == (date(2026, 11, 27), date(2026, 11, 28))
    assert schedule.due(after_midnight, 800.0) is None
