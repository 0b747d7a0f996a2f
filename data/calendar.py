"""The HKEX (XHKG) calendar and the market's status at a moment: sessions, half days, the lunch break, auctions.

``exchange_calendars``' XHKG calendar is loaded once per process; ``market_status(now)`` is pure given ``now``
(and, optionally, the broker's own market state), with the lunch break and the auctions the library's own
``next_open`` does not model. All times are Asia/Hong_Kong.
"""

from __future__ import annotations

import bisect
import warnings
from datetime import date, datetime, time, timedelta
from functools import cache
from typing import NamedTuple
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict

from brokers.base import MarketPhase, MarketState
from config.errors import AgentError

HKT = ZoneInfo("Asia/Hong_Kong")

PRE_OPEN_MINUTES = 30  # pre-opening session 09:00-09:30 (auction, not continuous trading)
CLOSING_AUCTION_MINUTES = 10  # closing auction session 16:00 to a random close between 16:08 and 16:10

CONTINUOUS_PHASES: frozenset[MarketPhase] = frozenset({MarketPhase.MORNING, MarketPhase.AFTERNOON})


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CalendarRangeError(AgentError, ValueError):
    """A time lies outside the years the XHKG calendar covers. Check the clock or ``--now``; else upgrade it."""


class Session(NamedTuple):
    """One XHKG trading day, times in HKT. Half days have no break and close at 12:00."""

    day: date
    pre_open: datetime
    open: datetime
    break_start: datetime | None
    break_end: datetime | None
    close: datetime
    auction_end: datetime

    @property
    def is_half_day(self) -> bool:
        return self.break_start is None

    def continuous_windows(self) -> list[tuple[datetime, datetime]]:
        """The continuous-trading windows of the day, ``[start, end)``."""
        if self.break_start is None or self.break_end is None:
            return [(self.open, self.close)]
        return [(self.open, self.break_start), (self.break_end, self.close)]


def _to_hkt(ts: object) -> datetime | None:
    # pandas Timestamps (UTC) -> zoneinfo-aware datetimes; NaT -> None.
    if ts is None or ts != ts:  # NaT compares unequal to itself
        return None
    return datetime.fromtimestamp(ts.timestamp(), HKT)  # type: ignore[attr-defined]


class _Calendar:
    """The XHKG sessions as plain Python values, for fast and pure look-ups."""

    def __init__(self, sessions: list[Session]) -> None:
        self.sessions = sessions
        self.days = [s.day for s in sessions]
        self.by_day = {s.day: s for s in sessions}
        self.first = self.days[0]
        self.last = self.days[-1]

    def check_covered(self, when: datetime, what: str) -> None:
        day = when.astimezone(HKT).date()
        if not self.first <= day <= self.last:
            raise CalendarRangeError(
                f"Cannot {what} at {when.astimezone(HKT):%Y-%m-%d %H:%M} HKT: the exchange_calendars XHKG "
                f"calendar covers {self.first} to {self.last} only (it reaches about one year past the day "
                f"the process loaded it). Check the system clock or the --now value; if the date is right, "
                f"restart the process or upgrade exchange-calendars."
            )

    def session(self, day: date) -> Session | None:
        return self.by_day.get(day)

    def next_session(self, day: date, what: str) -> Session:
        """The first session strictly after ``day``."""
        index = bisect.bisect_right(self.days, day)
        if index >= len(self.days):
            raise CalendarRangeError(
                f"Cannot {what}: the next HKEX trading day after {day} is beyond the end of the exchange_calendars "
                f"XHKG calendar ({self.last}). Restart the process or upgrade exchange-calendars."
            )
        return self.sessions[index]

    def previous_session(self, day: date) -> Session | None:
        """The last session strictly before ``day``, or None before the calendar's start."""
        index = bisect.bisect_left(self.days, day)
        return self.sessions[index - 1] if index > 0 else None

    def sessions_through(self, day: date, count: int) -> list[Session]:
        """The last ``count`` sessions on or before ``day``, oldest first."""
        index = bisect.bisect_right(self.days, day)
        return self.sessions[max(0, index - count) : index]


@cache
def _calendar() -> _Calendar:
    # Imported here: exchange_calendars is slow to import and only needed once per process.
    import exchange_calendars

    with warnings.catch_warnings():
        # exchange_calendars still uses pandas APIs that pandas 3 deprecates: noise in our logs, not our bug.
        warnings.simplefilter("ignore", DeprecationWarning)
        schedule = exchange_calendars.get_calendar("XHKG").schedule
    sessions = []
    for day, row in zip(schedule.index, schedule.itertuples(index=False), strict=True):
        open_ = _to_hkt(row.open)
        close = _to_hkt(row.close)
        assert open_ is not None and close is not None  # every session has both
        sessions.append(
            Session(
                day=day.date(),
                pre_open=open_ - timedelta(minutes=PRE_OPEN_MINUTES),
                open=open_,
                break_start=_to_hkt(row.break_start),
                break_end=_to_hkt(row.break_end),
                close=close,
                auction_end=close + timedelta(minutes=CLOSING_AUCTION_MINUTES),
            )
        )
    return _Calendar(sessions)


def calendar_range() -> tuple[date, date]:
    """The first and last session date of the loaded XHKG calendar."""
    calendar = _calendar()
    return calendar.first, calendar.last


def trading_session(day: date) -> Session | None:
    """The XHKG session on ``day``, or None for weekends and holidays. Raises CalendarRangeError outside it."""
    calendar = _calendar()
    calendar.check_covered(datetime.combine(day, time(12), HKT), "look up the HKEX session")
    return calendar.session(day)


def last_completed_session(now: datetime) -> date | None:
    """The latest session whose closing auction has ended by ``now`` (its daily bar is final)."""
    now = _require_aware(now, "now")
    calendar = _calendar()
    calendar.check_covered(now, "find the last completed HKEX session")
    today = calendar.session(now.date())
    if today is not None and now >= today.auction_end:
        return today.day
    previous = calendar.previous_session(now.date())
    return previous.day if previous is not None else None


def _require_aware(value: datetime, name: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(
            f"{name}={value.isoformat()} has no timezone; pass an aware datetime (e.g. with "
            f"ZoneInfo('Asia/Hong_Kong')) so HKEX hours are not guessed."
        )
    return value.astimezone(HKT)


class MarketStatus(_Frozen):
    """Where the HKEX trading day stands at ``now``, from the calendar cross-checked with the broker."""

    now: datetime
    phase: MarketPhase
    is_trading_day: bool
    is_half_day: bool
    is_continuous: bool
    session_close: datetime | None  # end of the current continuous session (12:00 or 16:00), when continuous
    minutes_to_close: float | None
    next_open: datetime  # next start of continuous trading strictly after now
    broker_phase: str | None = None
    disagreement: str | None = None
    description: str


def _calendar_phase(session: Session | None, now: datetime) -> MarketPhase:
    if session is None or now < session.pre_open or now >= session.auction_end:
        return MarketPhase.CLOSED
    if now < session.open:
        return MarketPhase.PRE_OPEN
    if session.break_start is not None and session.break_end is not None:
        if now < session.break_start:
            return MarketPhase.MORNING
        if now < session.break_end:
            return MarketPhase.LUNCH
        if now < session.close:
            return MarketPhase.AFTERNOON
        return MarketPhase.CLOSING_AUCTION
    return MarketPhase.MORNING if now < session.close else MarketPhase.CLOSING_AUCTION


def _fmt_open(when: datetime, now: datetime) -> str:
    if when.date() == now.date():
        return f"{when:%H:%M} today"
    return f"{when:%a %Y-%m-%d %H:%M}"


def market_status(now: datetime, broker_state: MarketState | None = None) -> MarketStatus:
    """The HKEX market status at ``now`` (pure given ``now``), conservative when the broker disagrees.

    ``is_continuous`` is True only when the calendar says continuous trading and, if ``broker_state`` is
    given, the broker says so too; a disagreement is recorded in ``disagreement``. Raises CalendarRangeError
    when ``now`` (or the next trading day) lies outside the loaded calendar, ValueError for a naive ``now``.
    """
    now = _require_aware(now, "now")
    calendar = _calendar()
    what = "tell the HKEX market status"
    calendar.check_covered(now, what)
    session = calendar.session(now.date())
    phase = _calendar_phase(session, now)

    starts = [start for start, _ in session.continuous_windows()] if session else []
    upcoming = [start for start in starts if start > now]
    next_open = upcoming[0] if upcoming else calendar.next_session(now.date(), what).open

    calendar_continuous = phase in CONTINUOUS_PHASES
    broker_phase: str | None = None
    disagreement: str | None = None
    is_continuous = calendar_continuous
    if broker_state is not None:
        broker_phase = broker_state.phase.value
        if broker_state.phase != phase:
            raw = f" (raw {broker_state.raw!r})" if broker_state.raw else ""
            disagreement = (
                f"calendar says {phase.value}, broker says {broker_state.phase.value}{raw} at "
                f"{broker_state.checked_at.astimezone(HKT):%H:%M:%S}"
            )
        broker_continuous = broker_state.phase in CONTINUOUS_PHASES
        is_continuous = calendar_continuous and broker_continuous
        if calendar_continuous and not broker_continuous:
            phase = broker_state.phase  # the broker says we cannot trade: report its phase

    session_close: datetime | None = None
    minutes_to_close: float | None = None
    if is_continuous and session is not None:
        session_close = next(end for start, end in session.continuous_windows() if start <= now < end)
        minutes_to_close = round((session_close - now).total_seconds() / 60, 1)

    description = _describe(now, phase, session, is_continuous, session_close, minutes_to_close, next_open)
    if disagreement:
        verdict = "trading allowed" if is_continuous else "treated as not continuous trading"
        description += f" Broker disagrees ({disagreement}); {verdict}."
    return MarketStatus(
        now=now,
        phase=phase,
        is_trading_day=session is not None,
        is_half_day=bool(session and session.is_half_day),
        is_continuous=is_continuous,
        session_close=session_close,
        minutes_to_close=minutes_to_close,
        next_open=next_open,
        broker_phase=broker_phase,
        disagreement=disagreement,
        description=description,
    )


def _describe(
    now: datetime,
    phase: MarketPhase,
    session: Session | None,
    is_continuous: bool,
    session_close: datetime | None,
    minutes_to_close: float | None,
    next_open: datetime,
) -> str:
    half = " (half day)" if session and session.is_half_day else ""
    resume = f"continuous trading starts {_fmt_open(next_open, now)} HKT"
    if is_continuous and session_close is not None:
        what = "lunch break" if session and session_close == session.break_start else "close"
        return (
            f"HKEX {phase.value} session, continuous trading{half}: {minutes_to_close:g} min to the "
            f"{session_close:%H:%M} {what}."
        )
    if session is None:
        reason = now.strftime("%A") if now.weekday() >= 5 else "a public holiday"
        return f"HKEX closed today ({reason}, not a trading day); {resume}."
    if phase is MarketPhase.PRE_OPEN:
        return f"HKEX pre-opening auction, no continuous trading yet{half}; {resume}."
    if phase is MarketPhase.LUNCH:
        return f"HKEX lunch break, no trading; {resume}."
    if phase is MarketPhase.CLOSING_AUCTION:
        return f"HKEX closing auction, no continuous trading{half}; {resume}."
    if phase in CONTINUOUS_PHASES:  # calendar continuous, but the broker disagreed
        return f"HKEX {phase.value} session by the calendar{half}, but not confirmed as trading; {resume}."
    if now < session.pre_open:
        return f"HKEX not open yet{half}; pre-opening auction at {session.pre_open:%H:%M}, {resume}."
    return f"HKEX closed for the day{half}; {resume}."
