"""market_status: the HKEX trading day from the XHKG calendar, cross-checked with the broker's state."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from brokers.base import MarketPhase, MarketState
from data.calendar import CalendarRangeError, calendar_range, last_completed_session, market_status, trading_session

HKT = ZoneInfo("Asia/Hong_Kong")


def hkt(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=HKT)


CLOSED, PRE, AM, LUNCH, PM, AUCTION = (
    MarketPhase.CLOSED,
    MarketPhase.PRE_OPEN,
    MarketPhase.MORNING,
    MarketPhase.LUNCH,
    MarketPhase.AFTERNOON,
    MarketPhase.CLOSING_AUCTION,
)

# (now HKT, phase, is_continuous, session_close, next_open, is_trading_day, is_half_day)
# 2026-11-20 is a normal Friday; the next trading day is Monday 2026-11-23.
TABLE = [
    # before the pre-opening session: closed, the day's open is next
    ("2026-11-20 08:30", CLOSED, False, None, "2026-11-20 09:30", True, False),
    # pre-opening auction is not continuous trading
    ("2026-11-20 09:15", PRE, False, None, "2026-11-20 09:30", True, False),
    # 09:30 sharp is the first minute of continuous trading; the next start is the afternoon's
    ("2026-11-20 09:30", AM, True, "2026-11-20 12:00", "2026-11-20 13:00", True, False),
    ("2026-11-20 10:15", AM, True, "2026-11-20 12:00", "2026-11-20 13:00", True, False),
    ("2026-11-20 11:59", AM, True, "2026-11-20 12:00", "2026-11-20 13:00", True, False),
    # 12:00 sharp: lunch has started
    ("2026-11-20 12:00", LUNCH, False, None, "2026-11-20 13:00", True, False),
    # the trap: exchange_calendars' next_open says Monday 09:30 here; the answer is 13:00 today
    ("2026-11-20 12:30", LUNCH, False, None, "2026-11-20 13:00", True, False),
    ("2026-11-20 13:00", PM, True, "2026-11-20 16:00", "2026-11-23 09:30", True, False),
    ("2026-11-20 15:55", PM, True, "2026-11-20 16:00", "2026-11-23 09:30", True, False),
    # closing auction 16:00-16:10 is not continuous trading
    ("2026-11-20 16:00", AUCTION, False, None, "2026-11-23 09:30", True, False),
    ("2026-11-20 16:05", AUCTION, False, None, "2026-11-23 09:30", True, False),
    ("2026-11-20 16:30", CLOSED, False, None, "2026-11-23 09:30", True, False),
    # weekend
    ("2026-11-21 10:00", CLOSED, False, None, "2026-11-23 09:30", False, False),
    ("2026-11-22 10:00", CLOSED, False, None, "2026-11-23 09:30", False, False),
    # Christmas Day (Fri); 26th is a Saturday, so Monday 28th trades
    ("2026-12-25 10:00", CLOSED, False, None, "2026-12-28 09:30", False, False),
    # New Year's Day 2026 (Thu)
    ("2026-01-01 10:00", CLOSED, False, None, "2026-01-02 09:30", False, False),
    # Lunar New Year 2026: 17-19 Feb closed, trading resumes Fri 20 Feb
    ("2026-02-17 10:00", CLOSED, False, None, "2026-02-20 09:30", False, False),
    # Lunar New Year's Eve (Mon 16 Feb): half day, morning only, the 12:00 end is the close
    ("2026-02-16 10:00", AM, True, "2026-02-16 12:00", "2026-02-20 09:30", True, True),
    ("2026-02-16 12:05", AUCTION, False, None, "2026-02-20 09:30", True, True),
    # Christmas Eve: half day
    ("2026-12-24 10:00", AM, True, "2026-12-24 12:00", "2026-12-28 09:30", True, True),
    ("2026-12-24 13:30", CLOSED, False, None, "2026-12-28 09:30", True, True),
    # New Year's Eve: half day; New Year's Day 2027 is closed, the next open is Mon 4 Jan
    ("2026-12-31 11:00", AM, True, "2026-12-31 12:00", "2027-01-04 09:30", True, True),
]


@pytest.mark.parametrize(("now", "phase", "continuous", "close", "next_open", "trading_day", "half_day"), TABLE)
def test_market_status_table(
    now: str,
    phase: MarketPhase,
    continuous: bool,
    close: str | None,
    next_open: str,
    trading_day: bool,
    half_day: bool,
) -> None:
    status = market_status(hkt(now))
    assert status.phase is phase
    assert status.is_continuous is continuous
    assert status.session_close == (hkt(close) if close else None)
    assert status.next_open == hkt(next_open)
    assert status.is_trading_day is trading_day
    assert status.is_half_day is half_day
    assert status.broker_phase is None and status.disagreement is None
    if close:
        assert status.minutes_to_close == pytest.approx((hkt(close) - hkt(now)).total_seconds() / 60)
    else:
        assert status.minutes_to_close is None
    assert status.description.startswith("HKEX")


def test_description_is_a_short_sentence_naming_what_matters() -> None:
    assert "13:00" in market_status(hkt("2026-11-20 12:30")).description
    assert "Saturday" in market_status(hkt("2026-11-21 10:00")).description
    assert "holiday" in market_status(hkt("2026-12-25 10:00")).description
    morning = market_status(hkt("2026-11-20 10:15")).description
    assert "105 min" in morning and "lunch" in morning
    assert "half day" in market_status(hkt("2026-12-24 10:00")).description


def test_now_in_another_timezone_is_converted_to_hong_kong() -> None:
    status = market_status(datetime(2026, 11, 20, 2, 15, tzinfo=UTC))  # 10:15 HKT
    assert status.phase is MarketPhase.MORNING
    assert status.now == hkt("2026-11-20 10:15")
    assert status.now.tzinfo == HKT


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="has no timezone"):
        market_status(datetime(2026, 11, 20, 10, 15))


def test_now_past_the_calendar_end_is_a_clear_error() -> None:
    _, last = calendar_range()
    with pytest.raises(CalendarRangeError, match=r"XHKG calendar covers .* only"):
        market_status(datetime.combine(last + timedelta(days=30), datetime.min.time(), HKT))
    # On the last covered day after the close, the next open is unknown: also an error, not a guess.
    with pytest.raises(CalendarRangeError, match="beyond the end"):
        market_status(datetime.combine(last, datetime.min.time(), HKT).replace(hour=17))


def _broker(phase: MarketPhase, at: str) -> MarketState:
    return MarketState(phase=phase, raw=phase.value.upper(), checked_at=hkt(at))


def test_broker_agreeing_is_recorded_without_disagreement() -> None:
    status = market_status(hkt("2026-11-20 10:15"), _broker(AM, "2026-11-20 10:15"))
    assert status.is_continuous
    assert status.broker_phase == "morning"
    assert status.disagreement is None


def test_broker_says_not_trading_while_calendar_says_continuous_is_conservative() -> None:
    # E.g. an unscheduled closure the calendar does not know of.
    status = market_status(hkt("2026-11-20 10:15"), _broker(CLOSED, "2026-11-20 10:14"))
    assert not status.is_continuous
    assert status.phase is MarketPhase.CLOSED  # the phase agrees with is_continuous
    assert status.session_close is None and status.minutes_to_close is None
    assert status.disagreement is not None
    assert "calendar says morning, broker says closed" in status.disagreement
    assert "not continuous" in status.description


def test_broker_says_trading_while_calendar_says_lunch_stays_closed() -> None:
    status = market_status(hkt("2026-11-20 12:30"), _broker(PM, "2026-11-20 12:30"))
    assert not status.is_continuous
    assert status.phase is MarketPhase.LUNCH
    assert status.broker_phase == "afternoon"
    assert "calendar says lunch, broker says afternoon" in (status.disagreement or "")
    assert status.next_open == hkt("2026-11-20 13:00")


def test_broker_and_calendar_both_not_continuous_but_different_phase_is_recorded() -> None:
    status = market_status(hkt("2026-11-20 16:05"), _broker(CLOSED, "2026-11-20 16:05"))
    assert not status.is_continuous
    assert status.phase is MarketPhase.CLOSING_AUCTION
    assert status.disagreement is not None


def test_market_status_is_frozen() -> None:
    status = market_status(hkt("2026-11-20 10:15"))
    with pytest.raises(Exception, match="frozen"):
        status.is_continuous = False  # type: ignore[misc]


# (now HKT, last session whose daily bar is final)
COMPLETED = [
    ("2026-11-20 10:15", "2026-11-19"),  # today's bar is still forming
    ("2026-11-20 16:05", "2026-11-19"),  # closing auction: not final yet
    ("2026-11-20 16:10", "2026-11-20"),  # auction over
    ("2026-11-22 10:00", "2026-11-20"),  # Sunday
    ("2026-02-20 09:00", "2026-02-16"),  # after Lunar New Year: the half day was the last session
]


@pytest.mark.parametrize(("now", "expected"), COMPLETED)
def test_last_completed_session(now: str, expected: str) -> None:
    assert last_completed_session(hkt(now)) == datetime.fromisoformat(expected).date()


def test_trading_session_half_day_has_no_break() -> None:
    eve = trading_session(hkt("2026-12-24 00:00").date())
    assert eve is not None and eve.is_half_day
    assert eve.continuous_windows() == [(hkt("2026-12-24 09:30"), hkt("2026-12-24 12:00"))]
    assert trading_session(hkt("2026-12-25 00:00").date()) is None
