"""Market data for a replay that cannot be read past the replay clock.

A ``BarStore`` holds whole sessions of one-minute bars (and daily bars for history); it knows the future and is
seen by nothing but ``ReplayFeed``. ``ReplayFeed`` is the ``brokers.base.MarketData`` the cycle's
``MarketService``, ``NewsService`` and the replay broker read through. Every read is cut at the replay clock:
a minute bar is visible only once it has **ended** (start + 1 min <= clock), today's daily bar is built from
the visible minute bars (the partial day so far), and news is visible from its publication time. Asking the
feed for a moment after the clock (``session_bars(..., until=later)``, ``bars_between(..., end=later)``, a day
after today) raises ``LookaheadError`` in the feed itself, whatever the caller meant.

Prices inside the store are integers in milli-HKD (HKEX prices have at most three decimals); the feed hands out
``Decimal`` like every other source.

Stores: ``SyntheticStore`` (the simulator's market, ``brokers.sim``, offline) and ``MemoryStore`` (whatever was
loaded into it: the recorded history of ``market_bars``, see ``replay.history``, or a test's bars).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import NamedTuple, Protocol
from zoneinfo import ZoneInfo

import numpy as np

from brokers import hkex
from brokers.base import Bar, Clock, MarketState, NewsItem, Quote, Side
from config.errors import AgentError
from data.calendar import _calendar as _xhkg

HKT = ZoneInfo("Asia/Hong_Kong")
_MINUTE_S = 60
TIMEFRAME_MINUTES: dict[str, int | None] = {"1m": 1, "5m": 5, "15m": 15, "1h": 60, "1d": None}
INDEXES = ("HSI", "HSCEI", "HSTECH", "ALL")
NEWS_LOOKBACK_DAYS = 30
_CENT = Decimal("0.01")


class LookaheadError(AgentError):
    """Code asked the replay feed for market data after the replay clock. A bug in the caller: never caught."""


class InstrumentInfo(NamedTuple):
    symbol: str
    name: str
    lot_size: int
    indexes: frozenset[str] = frozenset()  # empty: a member of every index the feed is asked for
    is_equity: bool = True


class SessionBars(NamedTuple):
    """One-minute bars of one symbol and session (or a slice of them): start epochs, milli-HKD prices, shares."""

    starts: np.ndarray
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray

    def __len__(self) -> int:  # type: ignore[override]
        return int(self.starts.size)

    def take(self, index: slice | np.ndarray) -> SessionBars:
        return SessionBars(*(array[index] for array in self))


class DailyBar(NamedTuple):
    open: int
    high: int
    low: int
    close: int
    volume: int


class BarStore(Protocol):
    """The whole recorded (or generated) history. Only ``ReplayFeed`` may read it."""

    def instruments(self) -> dict[str, InstrumentInfo]: ...

    def session(self, symbol: str, day: date) -> SessionBars | None:
        """The whole session's minute bars, oldest first; None when nothing is recorded for that day."""
        ...

    def daily(self, symbol: str, day: date) -> DailyBar | None: ...

    def news(self, symbol: str, day: date) -> list[NewsItem]: ...


def milli_to_price(milli: int) -> Decimal:
    value = Decimal(int(milli)).scaleb(-3)
    return value.quantize(_CENT) if milli % 10 == 0 else value.quantize(Decimal("0.001"))


def price_to_milli(price: Decimal | float | str) -> int:
    return int((Decimal(str(price)) * 1000).to_integral_value())


def epoch(when: datetime) -> int:
    return int(when.timestamp())


# ------------------------------------------------------------------------------------------------ stores


class SyntheticStore:
    """The simulator's deterministic market (``brokers.sim``) for a seed, without its paper account or state file."""

    def __init__(self, seed: int) -> None:
        from brokers import sim

        self.seed = int(seed)
        self._sim = sim
        # A SimExchange without a state file only for its news generator: no account is opened, no file written.
        self._exchange = sim.SimExchange(seed=self.seed, clock=lambda: datetime.now(HKT))
        self._instruments = {
            inst.symbol: InstrumentInfo(inst.symbol, inst.name, inst.lot_size, inst.indexes) for inst in sim.UNIVERSE
        }

    def instruments(self) -> dict[str, InstrumentInfo]:
        return self._instruments

    def session(self, symbol: str, day: date) -> SessionBars | None:
        index = self._sim._INDEX_OF.get(symbol)
        if index is None or day not in self._sim._calendar().segments:
            return None
        bars = self._sim._session_bars(self.seed, index, day)
        _, starts = self._sim._bar_starts(day)
        return SessionBars(starts, bars.open, bars.high, bars.low, bars.close, bars.volume)

    def daily(self, symbol: str, day: date) -> DailyBar | None:
        index = self._sim._INDEX_OF.get(symbol)
        if index is None or day not in self._sim._calendar().segments:
            return None
        return DailyBar(*self._sim._session_summary(self.seed, index, day))

    def news(self, symbol: str, day: date) -> list[NewsItem]:
        index = self._sim._INDEX_OF.get(symbol)
        if index is None:
            return []
        return self._exchange._news_of_day(self._sim.UNIVERSE[index], day)


class MemoryStore:
    """Bars held in dictionaries: recorded history loaded from the journal, or bars a test builds."""

    def __init__(self, instruments: dict[str, InstrumentInfo]) -> None:
        self._instruments = dict(instruments)
        self._sessions: dict[tuple[str, date], SessionBars] = {}
        self._daily: dict[tuple[str, date], DailyBar] = {}
        self._news: dict[tuple[str, date], list[NewsItem]] = {}

    def instruments(self) -> dict[str, InstrumentInfo]:
        return self._instruments

    def put_session(self, symbol: str, day: date, bars: SessionBars) -> None:
        order = np.argsort(bars.starts, kind="stable")
        self._sessions[(symbol, day)] = bars.take(order)

    def put_daily(self, symbol: str, day: date, bar: DailyBar) -> None:
        self._daily[(symbol, day)] = bar

    def put_news(self, symbol: str, day: date, items: Sequence[NewsItem]) -> None:
        self._news[(symbol, day)] = list(items)

    def session(self, symbol: str, day: date) -> SessionBars | None:
        return self._sessions.get((symbol, day))

    def daily(self, symbol: str, day: date) -> DailyBar | None:
        bar = self._daily.get((symbol, day))
        if bar is not None:
            return bar
        bars = self._sessions.get((symbol, day))
        if bars is None or not len(bars):
            return None
        return _summary(bars)

    def news(self, symbol: str, day: date) -> list[NewsItem]:
        return list(self._news.get((symbol, day), []))

    def days(self, symbol: str) -> list[date]:
        """Sessions with minute or daily bars for ``symbol``, oldest first."""
        found = {d for s, d in self._sessions if s == symbol} | {d for s, d in self._daily if s == symbol}
        return sorted(found)

    @classmethod
    def copy_of(cls, store: BarStore, symbols: Sequence[str], days: Sequence[date]) -> MemoryStore:
        """The bars of ``symbols`` on ``days`` copied out of another store (a test edits the copy)."""
        copy = cls({s: store.instruments()[s] for s in symbols})
        for symbol in symbols:
            for day in days:
                bars = store.session(symbol, day)
                if bars is not None:
                    copy.put_session(symbol, day, SessionBars(*(np.array(a, copy=True) for a in bars)))
                daily = store.daily(symbol, day)
                if daily is not None:
                    copy.put_daily(symbol, day, daily)
                copy.put_news(symbol, day, store.news(symbol, day))
        return copy


def _summary(bars: SessionBars) -> DailyBar:
    return DailyBar(
        int(bars.open[0]), int(bars.high.max()), int(bars.low.min()), int(bars.close[-1]), int(bars.volume.sum())
    )


# ------------------------------------------------------------------------------------------------ calendar


def sessions_between(first: date, last: date) -> list[date]:
    """XHKG trading days from ``first`` to ``last`` inclusive."""
    days = _xhkg().days
    return days[bisect.bisect_left(days, first) : bisect.bisect_right(days, last)]


def sessions_before(day: date, count: int) -> list[date]:
    """The ``count`` XHKG trading days strictly before ``day``, oldest first."""
    days = _xhkg().days
    index = bisect.bisect_left(days, day)
    return days[max(0, index - count) : index]


def _segments(day: date) -> list[tuple[int, int]]:
    session = _xhkg().session(day)
    if session is None:
        return []
    return [(epoch(start), epoch(end)) for start, end in session.continuous_windows()]


def continuous_minutes(day: date, until: datetime | None = None) -> int:
    """Minutes of continuous trading on ``day`` (up to ``until``)."""
    cut = epoch(until) if until is not None else None
    total = 0
    for start, end in _segments(day):
        stop = end if cut is None else min(end, cut)
        total += max(0, stop - start) // _MINUTE_S
    return total


# ------------------------------------------------------------------------------------------------ the feed


class ReplayFeed:
    """``MarketData`` over a ``BarStore`` that sees only what had happened by the replay clock.

    ``benchmark`` names a symbol to report as not an equity (the Tracker Fund), so a scan never picks it.
    """

    def __init__(self, store: BarStore, clock: Clock, *, benchmark: str | None = None) -> None:
        self._store = store
        self._clock = clock
        self._instruments = store.instruments()
        self._benchmark = benchmark

    # --- the gate every read goes through ------------------------------------------------------------------

    def now(self) -> datetime:
        return self._clock().astimezone(HKT)

    def _check(self, until: datetime, what: str) -> datetime:
        now = self.now()
        if until > now:
            raise LookaheadError(
                f"Look-ahead refused: {what} up to {until.astimezone(HKT).isoformat()} was asked while the replay "
                f"clock reads {now.isoformat()}. Market data after the clock does not exist in a replay."
            )
        return until

    def session_bars(self, symbol: str, day: date, until: datetime | None = None) -> SessionBars | None:
        """The minute bars of ``symbol`` on ``day`` that had ended by ``until`` (default: the clock).

        Raises LookaheadError when ``until`` is after the clock or ``day`` after the clock's date.
        """
        until = self._check(until or self.now(), f"{symbol} minute bars of {day}")
        if day > until.date():
            raise LookaheadError(
                f"Look-ahead refused: {symbol} bars of {day} were asked while the replay clock reads "
                f"{self.now().isoformat()}."
            )
        bars = self._store.session(symbol, day)
        if bars is None:
            return None
        visible = int(np.searchsorted(bars.starts + _MINUTE_S, epoch(until), side="right"))
        return bars if visible == len(bars) else bars.take(slice(0, visible))

    def bars_between(
        self, symbol: str, start: datetime, end: datetime | None = None
    ) -> Iterator[tuple[date, SessionBars]]:
        """Per session, the minute bars starting at or after ``start`` and ended by ``end`` (default: the clock).

        The replay broker fills orders against these. Raises LookaheadError when ``end`` is after the clock.
        """
        end = self._check(end or self.now(), f"{symbol} bars after {start.isoformat()}")
        for day in sessions_between(start.astimezone(HKT).date(), end.date()):
            bars = self.session_bars(symbol, day, end)
            if bars is None or not len(bars):
                continue
            first = int(np.searchsorted(bars.starts, epoch(start), side="left"))
            if first < len(bars):
                yield day, bars.take(slice(first, None))

    def _daily(self, symbol: str, day: date) -> DailyBar | None:
        now = self.now()
        if day > now.date():
            raise LookaheadError(f"Look-ahead refused: the {day} daily bar of {symbol} was asked at {now.isoformat()}.")
        session = _xhkg().session(day)
        if session is not None and now < session.close:
            bars = self.session_bars(symbol, day)  # today: the partial day so far
            return _summary(bars) if bars is not None and len(bars) else None
        return self._store.daily(symbol, day)

    # --- MarketData ------------------------------------------------------------------------------------------

    def instrument(self, symbol: str) -> InstrumentInfo | None:
        try:
            return self._instruments.get(hkex.normalize_symbol(symbol))
        except ValueError:
            return None

    def snapshots(self, symbols: list[str]) -> list[Quote]:
        """Quotes at the clock from the minute bars ended by then; unknown symbols are omitted."""
        quotes = []
        for symbol in symbols:
            info = self.instrument(symbol)
            if info is not None:
                quote = self._quote(info)
                if quote is not None:
                    quotes.append(quote)
        return quotes

    def last_price(self, symbol: str) -> Decimal | None:
        """The last traded price at the clock (the last ended minute bar, else the previous close)."""
        info = self.instrument(symbol)
        quote = self._quote(info) if info is not None else None
        return quote.last_price if quote is not None else None

    def _previous_close(self, symbol: str, day: date) -> int | None:
        for previous in reversed(sessions_before(day, 10)):
            bar = self._store.daily(symbol, previous)
            if bar is not None:
                return bar.close
        return None

    def _quote(self, info: InstrumentInfo) -> Quote | None:
        now = self.now()
        symbol = info.symbol
        today = now.date()
        session = _xhkg().session(today)
        bars = self.session_bars(symbol, today) if session is not None else None
        prev_close = self._previous_close(symbol, today)
        open_price = high = low = None
        volume = 0
        turnover = Decimal(0)
        volume_ratio: float | None = None
        if bars is not None and len(bars):
            last = int(bars.close[-1])
            open_price, high, low = (milli_to_price(int(x)) for x in (bars.open[0], bars.high.max(), bars.low.min()))
            volume = int(bars.volume.sum())
            turnover = (Decimal(int((bars.volume * bars.close).sum())) / 1000).quantize(_CENT)
            elapsed = max(1, continuous_minutes(today, now))
            past = [d for d in sessions_before(today, 5) if self._store.daily(symbol, d) is not None]
            past_volume = sum(self._store.daily(symbol, d).volume for d in past)  # type: ignore[union-attr]
            past_minutes = sum(continuous_minutes(d) for d in past)
            if past_volume > 0 and past_minutes > 0:
                volume_ratio = round(volume / (past_volume / past_minutes * elapsed), 2)
        elif prev_close is not None:
            last = prev_close
        else:
            return None
        last_price = milli_to_price(last)
        ask = last_price + hkex.tick_size(last_price, today, Side.SELL) if last_price < hkex.MAX_PRICE else None
        return Quote(
            symbol=symbol,
            name=info.name,
            last_price=last_price,
            open_price=open_price,
            high_price=high,
            low_price=low,
            prev_close=milli_to_price(prev_close) if prev_close is not None else None,
            bid_price=last_price,
            ask_price=ask,
            volume=volume,
            turnover=turnover,
            volume_ratio=volume_ratio,
            lot_size=info.lot_size,
            price_spread=hkex.tick_size(last_price, today),
            suspended=False,
            is_equity=info.is_equity and symbol != self._benchmark,
            updated_at=now,
        )

    def klines(self, symbol: str, timeframe: str, count: int) -> list[Bar]:
        """The last ``count`` bars ended by the clock, oldest first (today's daily/intraday bar: so far)."""
        info = self.instrument(symbol)
        if info is None:
            raise ValueError(f"Symbol {symbol!r} is not in the replay's market data.")
        if timeframe not in TIMEFRAME_MINUTES:
            raise ValueError(f"Timeframe {timeframe!r} is not supported; use one of {', '.join(TIMEFRAME_MINUTES)}.")
        if count <= 0:
            raise ValueError(f"K-line count must be positive, got {count}.")
        now = self.now()
        today = now.date()
        days = sessions_before(today, max(2 * count, count + 20))
        if _xhkg().session(today) is not None:
            days.append(today)
        minutes = TIMEFRAME_MINUTES[timeframe]
        if minutes is None:
            bars = []
            for day in days:
                daily = self._daily(info.symbol, day)
                if daily is not None:
                    bars.append(_daily_to_bar(day, daily))
            return bars[-count:]
        collected: list[Bar] = []
        for day in reversed(days):
            session = self.session_bars(info.symbol, day)
            if session is not None and len(session):
                collected[:0] = _aggregate(day, session, minutes)
            if len(collected) >= count:
                break
        return collected[-count:]

    def index_constituents(self, index: str) -> list[str]:
        name = index.strip().upper()
        if name not in INDEXES:
            raise ValueError(f"Index {index!r} is not known; use one of {', '.join(INDEXES)}.")
        return [
            s
            for s, info in self._instruments.items()
            if info.is_equity and s != self._benchmark and (name == "ALL" or not info.indexes or name in info.indexes)
        ]

    def news(self, symbol: str, since: datetime) -> list[NewsItem]:
        """Headlines published between ``since`` and the clock, newest first."""
        info = self.instrument(symbol)
        if info is None:
            return []
        now = self.now()
        start = max(since.astimezone(HKT), now - timedelta(days=NEWS_LOOKBACK_DAYS))
        items: list[NewsItem] = []
        day = start.date()
        while day <= now.date():
            items.extend(i for i in self._store.news(info.symbol, day) if start <= i.published_at <= now)
            day += timedelta(days=1)
        items.sort(key=lambda item: item.published_at, reverse=True)
        return items

    def market_state(self) -> MarketState | None:
        """None: the XHKG calendar decides, as for the simulator."""
        return None


def _daily_to_bar(day: date, bar: DailyBar) -> Bar:
    return Bar(
        time=datetime.combine(day, time(0), HKT),
        open=milli_to_price(bar.open),
        high=milli_to_price(bar.high),
        low=milli_to_price(bar.low),
        close=milli_to_price(bar.close),
        volume=bar.volume,
    )


def _aggregate(day: date, bars: SessionBars, minutes: int) -> list[Bar]:
    """Minute bars into ``minutes``-long bars that start at 09:30 / 13:00 and never span lunch."""
    if minutes == 1:
        firsts = np.arange(len(bars))
        lasts = firsts
    else:
        keys = np.zeros(len(bars), dtype=np.int64)
        for i, (start, end) in enumerate(_segments(day)):
            inside = (bars.starts >= start) & (bars.starts < end)
            keys[inside] = i * 100_000 + (bars.starts[inside] - start) // (minutes * _MINUTE_S)
        edges = np.flatnonzero(np.diff(keys)) + 1
        firsts = np.concatenate([[0], edges]).astype(np.int64)
        lasts = np.concatenate([edges - 1, [len(bars) - 1]]).astype(np.int64)
    highs = np.maximum.reduceat(bars.high, firsts)
    lows = np.minimum.reduceat(bars.low, firsts)
    volumes = np.add.reduceat(bars.volume, firsts)
    return [
        Bar(
            time=datetime.fromtimestamp(int(bars.starts[first]), HKT),
            open=milli_to_price(int(bars.open[first])),
            high=milli_to_price(int(high)),
            low=milli_to_price(int(low)),
            close=milli_to_price(int(bars.close[last])),
            volume=int(volume),
        )
        for first, last, high, low, volume in zip(firsts, lasts, highs, lows, volumes, strict=True)
    ]
