"""An in-process HKEX paper exchange: ``SimExchange`` (market data) and ``SimBroker`` (a paper account).

The market is synthetic but shaped like the real one: about 30 Hang Seng Index constituents at late-2025
price levels with their real board lots, the XHKG calendar (holidays, half days, the lunch break), the dated
HKEX spread table, and HKEX costs. Everything is a pure function of ``(seed, symbol, date)``:

* **Same seed + same clock -> same market.** A minute bar never changes once it has printed, whatever time the
  clock says later, so an order resting at 10:05 fills against the same prices a 10:30 run sees.
* **Daily levels** follow a mean-reverting random walk around each stock's reference price (so prices stay
  realistic for years). **Intraday**, each session is a bridge from its open to its close with a U-shaped
  volume profile, one bar per minute of continuous trading (09:30-12:00, 13:00-16:00; mornings only on
  half days). Bar times are bar starts, Asia/Hong_Kong.
* **Momentum**: on every trading day three stocks (chosen from the seed and the date) gap up, rise mostly in
  the morning and trade 2.5-4x their usual volume, so a momentum scan has something to find. ``volume_ratio``
  is Futu's "volume ratio": today's volume per elapsed minute over the last five sessions' volume per minute.
* **Quote at time t** is the minute bar containing t. Outside continuous trading it is frozen: before the
  open it shows the previous close, at lunch the 12:00 price, after the close the close.
* **History**: 150 sessions before the clock's date, for daily and intraday K-lines alike.

``SimBroker`` is a paper account on this market: whole lots, prices on the tick grid, no shorting, cash checks
with costs from ``brokers.hkex.trading_costs``. Marketable orders fill at once at the current price; other
limit orders rest and fill when a later call sees a minute bar trade through them; unfilled orders expire at
the close (HKEX orders are day orders). With a ``state_file`` the account, orders and test knobs persist
(atomic JSON, file-locked) so separate cron runs share one continuous paper account.

``SimBroker(exchange, account_kind="real")`` behaves like a Futu REAL account instead: its id is
``SIM-REAL-<seed>``, ``account().is_paper`` is False, and it accepts broker-side protective SELL stops
(``STOP``: trigger ``aux_price``, then a market sell; ``STOP_LIMIT``: trigger, then a limit sell at
``limit_price``). A stop rests (status submitted) and reserves its shares like a resting sell; it triggers on the
first minute bar after the placing minute whose low reaches the trigger and fills at the trigger, or at that
bar's open when the bar opened below it (a gap fills worse, as a market order would). Stops are day orders like
every sim order (``FutuClient`` sends ``TimeInForce.DAY`` too): one still resting at the close expires, so a
position carried overnight needs its stop re-armed. The state file records the account kind; a file written for
one kind refuses to open as the other (``ConfigError``).

Partial fills: ``limit_next_fill(n)`` makes the next fill book at most ``n`` shares; the rest of that order keeps
working (status partially_filled) and fills on later bars like any resting limit. Real exchanges fill in pieces;
this lets the agent's handling of partly filled entries and sells be exercised.

The account's previous-close equity (``Account.prev_close_equity``) is what a broker reports as the day's
opening balance: cash and holdings as they stood after the previous session, valued at that session's close.
The sim records it on the first call of each day, after settling what the previous day's resting orders did.

Test knobs on ``SimExchange`` (persisted): ``apply_shock``, ``set_suspended``, ``set_delisted``,
``fail_next_order``, ``limit_next_fill``.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import functools
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

import exchange_calendars
import numpy as np

from brokers import hkex
from brokers.base import (
    Account,
    Bar,
    Clock,
    MarketPhase,
    MarketState,
    NewsItem,
    Order,
    OrderPreview,
    OrderRequest,
    OrderStatus,
    OrderType,
    Position,
    Quote,
    Side,
)
from config.errors import ConfigError, OrderRejected

HK_TZ = ZoneInfo("Asia/Hong_Kong")
HISTORY_SESSIONS = 150  # sessions of history before the clock's date (daily and intraday K-lines)
MOMENTUM_PER_DAY = 3  # stocks that show a momentum move on each trading day
TIMEFRAME_MINUTES: dict[str, int | None] = {"1m": 1, "5m": 5, "15m": 15, "1h": 60, "1d": None}
INDEXES = ("HSI", "HSCEI", "HSTECH")
STATE_VERSION = 2  # 2 added account_kind; version 1 files (paper only) still load, as paper accounts
NEWS_LOOKBACK_DAYS = 30  # news() never reaches further back than this
DONE_ORDER_RETENTION_DAYS = 30  # finished orders older than this are dropped from the state file

_MINUTE = timedelta(minutes=1)
_CENT = Decimal("0.01")
_STOP_TYPES = frozenset({OrderType.STOP, OrderType.STOP_LIMIT})


class AccountKind(StrEnum):
    """Which Futu account a ``SimBroker`` imitates: paper (SIMULATE, no stop orders) or REAL (stop orders)."""

    PAPER = "paper"
    REAL = "real"


# ==============================================================================================================
# The universe
# ==============================================================================================================


class Instrument(NamedTuple):
    """One listed stock of the sim. ``reference_price`` is the level prices revert to (late 2025)."""

    symbol: str
    name: str
    lot_size: int
    reference_price: float
    avg_daily_volume: int  # shares
    daily_volatility: float  # standard deviation of daily log returns
    indexes: frozenset[str]


def _instrument(code: str, name: str, lot: int, price: float, volume_m: float, vol: float, *extra: str) -> Instrument:
    return Instrument(
        symbol=hkex.normalize_symbol(code),
        name=name,
        lot_size=lot,
        reference_price=price,
        avg_daily_volume=int(volume_m * 1_000_000),
        daily_volatility=vol,
        indexes=frozenset(("HSI", *extra)),
    )


_TECH = ("HSCEI", "HSTECH")

# Board lots are the real ones (the live snapshot's lot_size is the truth). Order is part of the seed's meaning:
# append new stocks at the end, or every seed's market changes. Index membership is a plausible subset for the
# sim (all are HSI constituents; HSCEI/HSTECH membership changes quarterly), not an authoritative list.
UNIVERSE: tuple[Instrument, ...] = (
    _instrument("0700", "Tencent Holdings", 100, 620.0, 16, 0.022, *_TECH),
    _instrument("0005", "HSBC Holdings", 400, 110.0, 20, 0.012),
    _instrument("0939", "China Construction Bank", 1000, 7.6, 250, 0.013, "HSCEI"),
    _instrument("1299", "AIA Group", 200, 78.0, 25, 0.017),
    _instrument("9988", "Alibaba Group", 100, 155.0, 80, 0.030, *_TECH),
    _instrument("3690", "Meituan", 100, 100.0, 40, 0.030, *_TECH),
    _instrument("0388", "Hong Kong Exchanges and Clearing", 100, 410.0, 8, 0.018),
    _instrument("1810", "Xiaomi Corporation", 200, 42.0, 150, 0.030, *_TECH),
    _instrument("0941", "China Mobile", 500, 86.0, 15, 0.011, "HSCEI"),
    _instrument("1398", "Industrial and Commercial Bank of China", 1000, 6.1, 300, 0.012, "HSCEI"),
    _instrument("3988", "Bank of China", 1000, 4.5, 350, 0.012, "HSCEI"),
    _instrument("2318", "Ping An Insurance", 500, 57.0, 40, 0.020, "HSCEI"),
    _instrument("0883", "CNOOC", 1000, 20.5, 60, 0.018, "HSCEI"),
    _instrument("0001", "CK Hutchison Holdings", 500, 55.0, 6, 0.015),
    _instrument("0016", "Sun Hung Kai Properties", 500, 98.0, 4, 0.015),
    _instrument("0011", "Hang Seng Bank", 100, 150.0, 5, 0.010),
    _instrument("0002", "CLP Holdings", 500, 67.0, 4, 0.009),
    _instrument("0003", "Hong Kong and China Gas", 1000, 7.3, 20, 0.011),
    _instrument("0027", "Galaxy Entertainment", 1000, 38.0, 15, 0.022),
    _instrument("1024", "Kuaishou Technology", 100, 66.0, 25, 0.030, *_TECH),
    _instrument("9618", "JD.com", 50, 120.0, 15, 0.026, *_TECH),
    _instrument("9999", "NetEase", 100, 210.0, 8, 0.022, *_TECH),
    _instrument("2020", "ANTA Sports Products", 200, 88.0, 8, 0.022, "HSCEI"),
    _instrument("0175", "Geely Automobile", 1000, 17.0, 60, 0.028, "HSCEI"),
    _instrument("1211", "BYD Company", 500, 97.0, 20, 0.026, "HSCEI"),
    _instrument("2269", "WuXi Biologics", 500, 33.0, 40, 0.030, "HSCEI"),
    _instrument("0688", "China Overseas Land & Investment", 500, 13.5, 25, 0.020, "HSCEI"),
    _instrument("0857", "PetroChina", 2000, 8.2, 150, 0.016, "HSCEI"),
    _instrument("0386", "Sinopec", 2000, 4.4, 120, 0.014, "HSCEI"),
    _instrument("2628", "China Life Insurance", 1000, 27.0, 40, 0.022, "HSCEI"),
)
_INDEX_OF: dict[str, int] = {inst.symbol: i for i, inst in enumerate(UNIVERSE)}


# ==============================================================================================================
# Calendar (XHKG via exchange_calendars)
# ==============================================================================================================


class _Calendar(NamedTuple):
    sessions: list[date]
    position: dict[date, int]
    segments: dict[date, tuple[tuple[datetime, datetime], ...]]  # continuous-trading segments, HK time


@functools.cache
def _calendar() -> _Calendar:
    schedule = exchange_calendars.get_calendar("XHKG").schedule
    sessions: list[date] = []
    segments: dict[date, tuple[tuple[datetime, datetime], ...]] = {}
    for row in schedule.itertuples():
        day = row.Index.date()
        opens = row.open.tz_convert(HK_TZ).to_pydatetime()
        closes = row.close.tz_convert(HK_TZ).to_pydatetime()
        if row.break_start is not None and not _is_nat(row.break_start):
            break_start = row.break_start.tz_convert(HK_TZ).to_pydatetime()
            break_end = row.break_end.tz_convert(HK_TZ).to_pydatetime()
            segments[day] = ((opens, break_start), (break_end, closes))
        else:  # half day: morning only
            segments[day] = ((opens, closes),)
        sessions.append(day)
    return _Calendar(sessions, {day: i for i, day in enumerate(sessions)}, segments)


def _is_nat(value: Any) -> bool:
    return bool(value != value)  # NaT is not equal to itself


def _session_minutes(day: date) -> int:
    return sum(int((end - start) / _MINUTE) for start, end in _calendar().segments[day])


@functools.lru_cache(maxsize=512)
def _bar_starts(day: date) -> tuple[tuple[datetime, ...], np.ndarray]:
    """Start times of the session's one-minute bars, and the same as epoch seconds."""
    starts: list[datetime] = []
    for start, end in _calendar().segments[day]:
        minute = start
        while minute < end:
            starts.append(minute)
            minute += _MINUTE
    epochs = np.array([int(s.timestamp()) for s in starts], dtype=np.int64)
    epochs.setflags(write=False)
    return tuple(starts), epochs


@functools.lru_cache(maxsize=512)
def _bucket_keys(day: date, minutes: int) -> np.ndarray:
    """For each minute bar of ``day``, the index of its ``minutes``-long bucket (buckets never span lunch)."""
    keys: list[int] = []
    bucket = -1
    for start, end in _calendar().segments[day]:
        count = int((end - start) / _MINUTE)
        for offset in range(count):
            if offset % minutes == 0:
                bucket += 1
            keys.append(bucket)
    result = np.array(keys, dtype=np.int64)
    result.setflags(write=False)
    return result


class _Moment(NamedTuple):
    """Where the clock stands: the session whose bars the market shows and how many of them have started."""

    day: date
    bars: int  # 0 = before that session's open
    continuous: bool  # inside continuous trading (a bar is printing now)


def _moment(now: datetime) -> _Moment:
    cal = _calendar()
    today = now.date()
    if today in cal.segments:
        count = 0
        for start, end in cal.segments[today]:
            if now >= end:
                count += int((end - start) / _MINUTE)
                continue
            if now >= start:
                return _Moment(today, count + int((now - start) / _MINUTE) + 1, True)
            return _Moment(today, count, False)
        return _Moment(today, count, False)
    return _Moment(_previous_session(today), _session_minutes(_previous_session(today)), False)


def _check_in_calendar(day: date) -> None:
    cal = _calendar()
    first, last = cal.sessions[0], cal.sessions[-1]
    if not (first + timedelta(days=400) <= day <= last):
        raise ValueError(
            f"The sim's clock date {day} is outside the XHKG calendar the sim can model "
            f"({first + timedelta(days=400)} to {last}); set the clock to a date in that range."
        )


def _previous_session(day: date) -> date:
    cal = _calendar()
    i = bisect.bisect_left(cal.sessions, day)
    return cal.sessions[i - 1]


def _sessions_before(day: date, count: int) -> list[date]:
    cal = _calendar()
    i = bisect.bisect_left(cal.sessions, day)
    return cal.sessions[max(0, i - count) : i]


def _first_close_after(moment: datetime) -> datetime:
    """The close of the first session that closes after ``moment`` (when a day order placed then expires)."""
    cal = _calendar()
    for day in cal.sessions[bisect.bisect_left(cal.sessions, moment.date()) :]:
        close = cal.segments[day][-1][1]
        if close > moment:
            return close
    return datetime.max.replace(tzinfo=HK_TZ)  # past the calendar's end: never expires


def phase_at(now: datetime) -> MarketPhase:
    """The market phase at ``now`` according to the XHKG calendar (auctions included)."""
    now = now.astimezone(HK_TZ)
    segments = _calendar().segments.get(now.date())
    if not segments:
        return MarketPhase.CLOSED
    first_open, last_close = segments[0][0], segments[-1][1]
    if first_open - timedelta(minutes=30) <= now < first_open:
        return MarketPhase.PRE_OPEN
    for i, (start, end) in enumerate(segments):
        if start <= now < end:
            return MarketPhase.MORNING if i == 0 else MarketPhase.AFTERNOON
    if len(segments) == 2 and segments[0][1] <= now < segments[1][0]:
        return MarketPhase.LUNCH
    if last_close <= now < last_close + timedelta(minutes=10):
        return MarketPhase.CLOSING_AUCTION
    return MarketPhase.CLOSED


# ==============================================================================================================
# Price model (pure functions of seed, symbol and date; cached per process)
# ==============================================================================================================

_REVERSION = 0.97  # daily level x_t = sum_k 0.97^k r_(t-k): mean-reverting around the reference price
_KERNEL_SESSIONS = 120  # 0.97^120 ~ 2.6 %: older returns no longer matter
_MOMENTUM_FADE = 0.85  # momentum jumps fade faster (~15 %/day), so they do not lift the long-run level
_GAP_SCALE = 0.3  # overnight gap, in daily volatilities
_INTRADAY_SCALE = 0.6  # intraday wander around the open->close line, in daily volatilities


class _Days(NamedTuple):
    """Per-session, per-symbol daily anchors for one seed: shape (sessions, symbols)."""

    open: np.ndarray  # unrounded
    close: np.ndarray
    momentum: np.ndarray  # bool
    volume: np.ndarray  # target daily volume (shares)


@functools.lru_cache(maxsize=512)
def _month_block(seed: int, year: int, month: int) -> np.ndarray:
    # Random numbers for every day of one month and every symbol, shape (6, 31, N): rows 0, 1, 4 standard
    # normal, rows 2, 3, 5 uniform. Month blocks keep the market random-access by date without seeding a
    # generator per day.
    rng = np.random.default_rng([seed, year, month, 0xDA1])
    block = rng.random((6, 31, len(UNIVERSE)))
    block[[0, 1, 4]] = rng.standard_normal((3, 31, len(UNIVERSE)))
    return block


@functools.lru_cache(maxsize=4)
def _days(seed: int) -> _Days:
    sessions = _calendar().sessions
    n = len(UNIVERSE)
    draws = np.empty((6, len(sessions), n))
    for i, day in enumerate(sessions):
        draws[:, i, :] = _month_block(seed, day.year, day.month)[:, day.day - 1, :]
    z_return, z_gap, rank, size, z_volume, volume_boost = draws
    sigma = np.array([inst.daily_volatility for inst in UNIVERSE])
    momentum = np.zeros((len(sessions), n), dtype=bool)
    top = np.argsort(rank, axis=1)[:, :MOMENTUM_PER_DAY]
    np.put_along_axis(momentum, top, True, axis=1)

    returns = np.where(momentum, 0.0, z_return * sigma)
    jumps = np.where(momentum, 0.03 + 0.04 * size, 0.0)  # the momentum day's rise: +3 % to +7 %
    gaps = np.where(momentum, 0.003 + 0.009 * size, z_gap * sigma * _GAP_SCALE)
    level = np.zeros_like(returns)
    for k in range(_KERNEL_SESSIONS):
        # A truncated sum (not a recursion), so a session's level never depends on where the calendar starts.
        level[k:] += (_REVERSION**k) * returns[: len(sessions) - k] + (_MOMENTUM_FADE**k) * jumps[: len(sessions) - k]
    reference = np.array([inst.reference_price for inst in UNIVERSE])
    close = reference * np.exp(level)
    previous_close = np.vstack([close[:1], close[:-1]])
    open_ = previous_close * np.exp(gaps)
    adv = np.array([inst.avg_daily_volume for inst in UNIVERSE], dtype=float)
    volume = adv * np.exp(0.25 * z_volume - 0.03) * np.where(momentum, 2.5 + 1.5 * volume_boost, 1.0)
    for array in (open_, close, momentum, volume):
        array.setflags(write=False)
    return _Days(open_, close, momentum, volume)


class _Ladder(NamedTuple):
    uppers: np.ndarray  # band upper bounds, milli-HKD
    ticks: np.ndarray  # band ticks, milli-HKD


@functools.lru_cache(maxsize=8)
def _ladder(table: tuple[hkex.SpreadBand, ...]) -> _Ladder:
    return _Ladder(
        np.array([int(band.upper * 1000) for band in table], dtype=np.int64),
        np.array([int(band.tick * 1000) for band in table], dtype=np.int64),
    )


def _to_grid(prices: np.ndarray, day: date, mode: str) -> np.ndarray:
    """Round float HKD prices onto the spread-table grid of ``day``; returns milli-HKD integers.

    ``mode`` is ``nearest``, ``up`` or ``down``. Band boundaries are multiples of both neighbouring ticks, so
    rounding within the price's own band always lands on a valid price.
    """
    ladder = _ladder(hkex.spread_table(day))
    milli = np.clip(np.asarray(prices, dtype=float) * 1000.0, 10.0, float(ladder.uppers[-1]))
    band = np.minimum(np.searchsorted(ladder.uppers, milli, side="left"), len(ladder.uppers) - 1)
    tick = ladder.ticks[band]
    steps = milli / tick
    if mode == "up":
        steps = np.ceil(steps - 1e-9)
    elif mode == "down":
        steps = np.floor(steps + 1e-9)
    else:
        steps = np.rint(steps)
    return (steps * tick).astype(np.int64)


class _Bars(NamedTuple):
    """One session's one-minute bars: prices in milli-HKD, volume in shares."""

    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray


@functools.lru_cache(maxsize=2048)
def _session_bars(seed: int, index: int, day: date) -> _Bars:
    """The unshocked one-minute bars of one stock for one whole session."""
    cal = _calendar()
    position = cal.position[day]
    anchors = _days(seed)
    day_open = float(anchors.open[position, index])
    day_close = float(anchors.close[position, index])
    momentum = bool(anchors.momentum[position, index])
    total_volume = float(anchors.volume[position, index])
    inst = UNIVERSE[index]
    count = _session_minutes(day)

    rng = np.random.default_rng([seed, int(inst.symbol[3:]), day.toordinal(), 0xB4A])
    step = inst.daily_volatility * _INTRADAY_SCALE / np.sqrt(count)
    walk = np.cumsum(rng.standard_normal(count) * step)
    tau = np.arange(1, count + 1) / count
    bridge = walk - tau * walk[-1]
    shape = 1.0 - (1.0 - tau) ** 3 if momentum else tau  # momentum: most of the rise comes early
    log_close = np.log(day_open) + (np.log(day_close) - np.log(day_open)) * shape + bridge
    closes = _to_grid(np.exp(log_close), day, "nearest")
    opens = np.concatenate([_to_grid(np.array([day_open]), day, "nearest"), closes[:-1]])
    wick = np.abs(rng.standard_normal((2, count))) * step * 0.5
    top = np.maximum(opens, closes) / 1000.0 * (1.0 + wick[0])
    bottom = np.minimum(opens, closes) / 1000.0 * (1.0 - wick[1])
    highs = np.maximum(_to_grid(top, day, "up"), np.maximum(opens, closes))
    lows = np.minimum(_to_grid(bottom, day, "down"), np.minimum(opens, closes))

    minute = np.arange(count)
    profile = 1.0 + 0.5 * np.exp(-minute / 15.0) + 0.4 * np.exp(-(count - 1 - minute) / 15.0)
    if momentum:
        profile = profile * (1.0 + 2.0 * (1.0 - tau) ** 2)  # the volume comes with the early move
    profile = profile * np.exp(0.35 * rng.standard_normal(count))
    volumes = np.maximum(np.rint(profile / profile.sum() * total_volume), 1).astype(np.int64)
    bars = _Bars(opens, highs, lows, closes, volumes)
    for array in bars:
        array.setflags(write=False)
    return bars


@functools.lru_cache(maxsize=65536)
def _session_summary(seed: int, index: int, day: date) -> tuple[int, int, int, int, int]:
    """Open, high, low, close (milli-HKD) and volume of one unshocked whole session."""
    bars = _session_bars(seed, index, day)
    return (int(bars.open[0]), int(bars.high.max()), int(bars.low.min()), int(bars.close[-1]), int(bars.volume.sum()))


def _milli_to_decimal(milli: int) -> Decimal:
    value = Decimal(int(milli)).scaleb(-3)
    return value.quantize(_CENT) if milli % 10 == 0 else value.quantize(Decimal("0.001"))


# ==============================================================================================================
# News templates
# ==============================================================================================================

_POSITIVE = (
    ("{name} shares rise after quarterly results beat estimates", "Revenue and profit came in above consensus."),
    ("{name} announces share buyback programme", "The board approved repurchases of up to 10% of issued shares."),
    ("Broker upgrades {name} to Buy, lifts target price", "The analyst cites improving margins and demand."),
    ("{name} reports strong monthly operating data", "Volumes grew at a double-digit pace year on year."),
)
_NEGATIVE = (
    ("{name} slips after issuing a profit warning", "The company expects first-half profit to fall sharply."),
    ("Regulators open review into {name} business practices", "The company says it is cooperating fully."),
    ("Broker downgrades {name} to Sell on valuation", "The analyst sees limited upside after the recent run."),
    ("{name} misses revenue forecasts as demand softens", "Management cut its full-year guidance."),
)
_NEUTRAL = (
    ("{name} to hold annual general meeting next month", "The notice lists the usual resolutions."),
    ("{name} announces changes to its board of directors", "An independent non-executive director retires."),
    ("{name} publishes monthly return of equity issuer", "No change in issued shares was reported."),
    ("{name} schedules results announcement date", "The board will meet to approve the results."),
)
_MOMENTUM_NEWS = (
    "{name} jumps as investors cheer surprise guidance upgrade",
    "The company raised its full-year outlook before the open; trading volume surged.",
)


# ==============================================================================================================
# Persistent state
# ==============================================================================================================


class _Shock(NamedTuple):
    symbol: str | None  # None = every symbol
    pct: float  # fraction: -0.05 moves prices 5 % down
    at: datetime


@dataclass
class _Holding:
    quantity: int
    avg_cost: Decimal


@dataclass
class _State:
    cash: Decimal
    positions: dict[str, _Holding] = field(default_factory=dict)
    orders: list[Order] = field(default_factory=list)
    next_order_id: int = 1
    shocks: list[_Shock] = field(default_factory=list)
    suspended: set[str] = field(default_factory=set)
    fail_next: str | None = None
    account_kind: AccountKind | None = None  # None until a SimBroker opens the account
    delisted: set[str] = field(default_factory=set)
    fill_cap: int | None = None  # the next fill books at most this many shares (limit_next_fill)
    day_start: tuple[date, Decimal] | None = None  # (date, equity at the previous close), rolled on a new day

    def to_json(self, seed: int) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "seed": seed,
            "account_kind": self.account_kind.value if self.account_kind is not None else None,
            "cash": str(self.cash),
            "positions": {
                symbol: {"quantity": h.quantity, "avg_cost": str(h.avg_cost)} for symbol, h in self.positions.items()
            },
            "orders": [order.model_dump(mode="json") for order in self.orders],
            "next_order_id": self.next_order_id,
            "shocks": [{"symbol": s.symbol, "pct": s.pct, "at": s.at.isoformat()} for s in self.shocks],
            "suspended": sorted(self.suspended),
            "fail_next_order": self.fail_next,
            "delisted": sorted(self.delisted),
            "fill_cap": self.fill_cap,
            "day_start": None
            if self.day_start is None
            else {"date": self.day_start[0].isoformat(), "equity": str(self.day_start[1])},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], path: Path) -> _State:
        version = data.get("version")
        if version not in (1, STATE_VERSION):
            raise ConfigError(
                f"Sim state file {path} has version {version!r}; this code reads versions 1 and {STATE_VERSION}. "
                "Move the file away to start a fresh paper account."
            )
        try:
            # Version 1 was written before REAL-flavoured accounts existed: it is a paper account.
            kind = data.get("account_kind") if version == STATE_VERSION else AccountKind.PAPER.value
            return cls(
                account_kind=AccountKind(kind) if kind is not None else None,
                cash=Decimal(data["cash"]),
                positions={
                    symbol: _Holding(int(h["quantity"]), Decimal(h["avg_cost"]))
                    for symbol, h in data.get("positions", {}).items()
                },
                orders=[Order.model_validate(order) for order in data.get("orders", [])],
                next_order_id=int(data.get("next_order_id", 1)),
                shocks=[
                    _Shock(s["symbol"], float(s["pct"]), datetime.fromisoformat(s["at"]))
                    for s in data.get("shocks", [])
                ],
                suspended=set(data.get("suspended", [])),
                fail_next=data.get("fail_next_order"),
                delisted=set(data.get("delisted", [])),
                fill_cap=int(data["fill_cap"]) if data.get("fill_cap") is not None else None,
                day_start=(
                    (date.fromisoformat(data["day_start"]["date"]), Decimal(data["day_start"]["equity"]))
                    if data.get("day_start")
                    else None
                ),
            )
        except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
            raise ConfigError(
                f"Sim state file {path} is damaged ({type(exc).__name__}: {exc}). "
                "Move it away to start a fresh paper account."
            ) from exc


# ==============================================================================================================
# SimExchange
# ==============================================================================================================


class SimExchange:
    """A deterministic HKEX market plus the paper account that trades on it (``MarketData`` protocol).

    ``commission_pct`` is a fraction (0.0003 = 0.03 %) with ``min_commission`` HKD per order side. With
    ``state_file`` set, the account, orders, shocks, suspensions and an armed ``fail_next_order`` are loaded
    at construction, re-read when another process changed the file, and saved atomically after every change.
    The account lives here (so several ``SimBroker`` views share it); trade through ``SimBroker``.
    """

    def __init__(
        self,
        seed: int,
        clock: Clock,
        state_file: Path | None = None,
        starting_cash: Decimal = Decimal(1_000_000),
        commission_pct: Decimal | float = Decimal("0.0003"),
        min_commission: Decimal = Decimal(3),
    ) -> None:
        self.seed = int(seed)
        self._clock = clock
        self.state_file = Path(state_file) if state_file is not None else None
        self.starting_cash = hkex.to_decimal(starting_cash, "Starting cash")
        self.commission_pct = hkex.to_decimal(commission_pct, "Commission rate")
        self.min_commission = hkex.to_decimal(min_commission, "Minimum commission")
        self._lock = threading.RLock()
        self._depth = 0
        self._lock_file: Any = None
        self._file_stamp: tuple[int, int, int, int] | None = None
        self._dirty = False
        self._state = _State(cash=self.starting_cash.quantize(_CENT))
        if self.state_file is not None:
            with self._transaction():
                if not self.state_file.exists():
                    self._dirty = True  # write the fresh account so the next process sees it

    # ---------------------------------------------------------------- time and universe

    def now(self) -> datetime:
        """The clock's time in Asia/Hong_Kong. Raises ValueError for a naive datetime or a date outside the calendar."""
        value = self._clock()
        if value.tzinfo is None:
            raise ValueError(f"The sim's clock returned a naive datetime {value!r}; give it a timezone.")
        value = value.astimezone(HK_TZ)
        _check_in_calendar(value.date())
        return value

    def instruments(self) -> list[Instrument]:
        """Every stock the sim lists, in universe order."""
        return list(UNIVERSE)

    def instrument(self, symbol: str) -> Instrument | None:
        """The listed stock for ``symbol`` (any accepted form), or None when the sim does not list it."""
        try:
            index = _INDEX_OF.get(hkex.normalize_symbol(symbol))
        except ValueError:
            return None
        return None if index is None else UNIVERSE[index]

    def calendar_phase(self) -> MarketPhase:
        """The XHKG phase at the clock's time (for fakes that must report a market state)."""
        return phase_at(self.now())

    # ---------------------------------------------------------------- MarketData protocol

    def snapshots(self, symbols: list[str]) -> list[Quote]:
        """Quotes for ``symbols`` in the order given; symbols the sim does not list (or cannot parse) are omitted."""
        now = self.now()
        with self._transaction():
            quotes = []
            for symbol in symbols:
                inst = self.instrument(symbol)
                if inst is not None and inst.symbol not in self._state.delisted:
                    quotes.append(self._quote(inst, now))
            return quotes

    def quote(self, symbol: str) -> Quote:
        """The quote for one symbol. Raises ValueError when the sim does not list it (or it was delisted)."""
        inst = self._require(symbol)
        if inst.symbol in self._state.delisted:
            raise ValueError(f"Symbol {inst.symbol} was delisted from the sim exchange: it has no quote.")
        now = self.now()
        with self._transaction():
            return self._quote(inst, now)

    def klines(self, symbol: str, timeframe: str, count: int) -> list[Bar]:
        """The last ``count`` bars up to now, oldest first, the bar in progress included.

        ``timeframe``: 1m 5m 15m 1h (bars start at 09:30 and 13:00 and never span lunch, so the 11:30 hour bar
        is half an hour) or 1d (bar time = session date 00:00 HKT). History reaches 150 sessions back; asking
        for more returns what exists. Raises ValueError for an unknown symbol or timeframe.
        """
        inst = self._require(symbol)
        if timeframe not in TIMEFRAME_MINUTES:
            raise ValueError(f"Timeframe {timeframe!r} is not supported; use one of {', '.join(TIMEFRAME_MINUTES)}.")
        if count <= 0:
            raise ValueError(f"K-line count must be positive, got {count}.")
        now = self.now()
        with self._transaction():
            moment = _moment(now)
            days = _sessions_before(now.date(), HISTORY_SESSIONS)
            if moment.day == now.date() and moment.bars > 0:
                days.append(moment.day)
            minutes = TIMEFRAME_MINUTES[timeframe]
            if minutes is None:
                return [self._daily_bar(inst, day, now) for day in days[-count:]]
            collected: list[Bar] = []
            for day in reversed(days):
                collected[:0] = self._intraday_bars(inst, day, now, minutes)
                if len(collected) >= count:
                    break
            return collected[-count:]

    def index_constituents(self, index: str) -> list[str]:
        """Symbols in ``HSI``, ``HSCEI``, ``HSTECH`` or ``ALL`` (the union), in universe order."""
        name = index.strip().upper()
        if name == "ALL":
            return [inst.symbol for inst in UNIVERSE]
        if name not in INDEXES:
            raise ValueError(f"Index {index!r} is not known to the sim; use one of {', '.join(INDEXES)} or ALL.")
        return [inst.symbol for inst in UNIVERSE if name in inst.indexes]

    def news(self, symbol: str, since: datetime) -> list[NewsItem]:
        """Synthetic headlines about ``symbol`` published between ``since`` and now, newest first.

        Deterministic per (seed, symbol, day); a momentum day brings a positive headline before the open.
        Reaches back at most 30 days. Unknown symbols have no news.
        """
        inst = self.instrument(symbol)
        if inst is None:
            return []
        if since.tzinfo is None:
            raise ValueError(f"news() needs a timezone-aware 'since', got {since!r}.")
        now = self.now()
        start = max(since.astimezone(HK_TZ), now - timedelta(days=NEWS_LOOKBACK_DAYS))
        items: list[NewsItem] = []
        day = start.date()
        while day <= now.date():
            items.extend(item for item in self._news_of_day(inst, day) if start <= item.published_at <= now)
            day += timedelta(days=1)
        items.sort(key=lambda item: item.published_at, reverse=True)
        return items

    def market_state(self) -> MarketState | None:
        """None: the sim has no opinion of its own; the XHKG calendar decides (see ``calendar_phase``)."""
        return None

    # ---------------------------------------------------------------- test knobs (persisted)

    def apply_shock(self, symbol: str | None, pct: float) -> None:
        """Move the price of ``symbol`` (None = every symbol) by the fraction ``pct`` (-0.05 = 5 % down) from now on.

        Quotes (and so positions and equity) move at once; bars from the one in progress on. Shocks compound.
        """
        if not -1.0 < pct < 10.0:
            raise ValueError(f"Shock {pct!r} is not a fraction between -1 and 10 (-0.05 means 5 % down).")
        target = None if symbol is None else self._require(symbol).symbol
        now = self.now()
        with self._transaction():
            self._state.shocks.append(_Shock(target, float(pct), now))
            self._dirty = True

    def set_suspended(self, symbol: str, suspended: bool) -> None:
        """Mark ``symbol`` suspended (quotes say so, orders are rejected, resting orders do not fill) or resumed."""
        target = self._require(symbol).symbol
        with self._transaction():
            if suspended:
                self._state.suspended.add(target)
            else:
                self._state.suspended.discard(target)
            self._dirty = True

    def set_delisted(self, symbol: str, delisted: bool = True) -> None:
        """Make ``symbol`` unquotable (snapshots omit it, orders are rejected) while positions in it stay held."""
        target = self._require(symbol).symbol
        with self._transaction():
            if delisted:
                self._state.delisted.add(target)
            else:
                self._state.delisted.discard(target)
            self._dirty = True

    def limit_next_fill(self, quantity: int) -> None:
        """Make the next fill (from any process sharing the state file) book at most ``quantity`` shares."""
        if quantity <= 0:
            raise ValueError(f"A fill limit must be a positive number of shares, not {quantity!r}.")
        with self._transaction():
            self._state.fill_cap = int(quantity)
            self._dirty = True

    def fail_next_order(self, message: str) -> None:
        """Make the next ``place_order`` (from any process sharing the state file) raise OrderRejected(message)."""
        with self._transaction():
            self._state.fail_next = message
            self._dirty = True

    # ---------------------------------------------------------------- market internals

    def _require(self, symbol: str) -> Instrument:
        inst = self.instrument(symbol)
        if inst is None:
            listed = ", ".join(hkex.short_symbol(i.symbol) for i in UNIVERSE)
            raise ValueError(f"Symbol {symbol!r} is not listed on the sim exchange; it lists {listed}.")
        return inst

    def _shocks_for(self, symbol: str, now: datetime) -> list[_Shock]:
        return [s for s in self._state.shocks if s.symbol in (None, symbol) and s.at <= now]

    def _bars(self, inst: Instrument, day: date, now: datetime) -> _Bars:
        """A whole session's minute bars with the shocks that apply to them (a shock moves bars ending after it)."""
        bars = _session_bars(self.seed, _INDEX_OF[inst.symbol], day)
        shocks = self._shocks_for(inst.symbol, now)
        if not shocks:
            return bars
        _, starts = _bar_starts(day)
        factor = np.ones(len(starts))
        for shock in shocks:
            factor = factor * np.where(starts + 60 > shock.at.timestamp(), 1.0 + shock.pct, 1.0)
        if np.all(factor == 1.0):
            return bars
        opens = _to_grid(bars.open / 1000.0 * factor, day, "nearest")
        closes = _to_grid(bars.close / 1000.0 * factor, day, "nearest")
        highs = np.maximum(_to_grid(bars.high / 1000.0 * factor, day, "up"), np.maximum(opens, closes))
        lows = np.minimum(_to_grid(bars.low / 1000.0 * factor, day, "down"), np.minimum(opens, closes))
        return _Bars(opens, highs, lows, closes, bars.volume)

    def _last_price_milli(self, inst: Instrument, now: datetime) -> tuple[int, _Moment]:
        moment = _moment(now)
        if moment.bars > 0:
            base = int(_session_bars(self.seed, _INDEX_OF[inst.symbol], moment.day).close[moment.bars - 1])
        else:
            previous = _previous_session(moment.day)
            base = int(_session_bars(self.seed, _INDEX_OF[inst.symbol], previous).close[-1])
        factor = 1.0
        for shock in self._shocks_for(inst.symbol, now):
            factor *= 1.0 + shock.pct
        if factor == 1.0:
            return base, moment
        return int(_to_grid(np.array([base / 1000.0 * factor]), now.date(), "nearest")[0]), moment

    def _quote(self, inst: Instrument, now: datetime) -> Quote:
        last_milli, moment = self._last_price_milli(inst, now)
        last = _milli_to_decimal(last_milli)
        previous_day = _previous_session(moment.day)
        prev_close = _milli_to_decimal(int(self._bars(inst, previous_day, now).close[-1]))
        open_price = high = low = None
        volume = 0
        turnover = Decimal(0)
        volume_ratio: float | None = None
        if moment.bars > 0:
            today = self._bars(inst, moment.day, now)
            k = moment.bars
            open_price = _milli_to_decimal(int(today.open[0]))
            high = _milli_to_decimal(int(today.high[:k].max()))
            low = _milli_to_decimal(int(today.low[:k].min()))
            volume = int(today.volume[:k].sum())
            turnover = (Decimal(int((today.volume[:k] * today.close[:k]).sum())) / 1000).quantize(_CENT)
            past = _sessions_before(moment.day, 5)
            past_volume = sum(_session_summary(self.seed, _INDEX_OF[inst.symbol], d)[4] for d in past)
            past_minutes = sum(_session_minutes(d) for d in past)
            if past_volume > 0:
                volume_ratio = round(volume / (past_volume / past_minutes * k), 2)
        ask = None
        if last < hkex.MAX_PRICE:
            ask = last + hkex.tick_size(last, now.date(), Side.SELL)
        return Quote(
            symbol=inst.symbol,
            name=inst.name,
            last_price=last,
            open_price=open_price,
            high_price=high,
            low_price=low,
            prev_close=prev_close,
            bid_price=last,
            ask_price=ask,
            volume=volume,
            turnover=turnover,
            volume_ratio=volume_ratio,
            lot_size=inst.lot_size,
            price_spread=hkex.tick_size(last, now.date()),
            suspended=inst.symbol in self._state.suspended,
            is_equity=True,
            updated_at=now,
        )

    def _daily_bar(self, inst: Instrument, day: date, now: datetime) -> Bar:
        moment = _moment(now)
        close_time = _calendar().segments[day][-1][1]
        shocked = any(s.at < close_time for s in self._shocks_for(inst.symbol, now))
        complete = day != moment.day or moment.bars == _session_minutes(day)
        if complete and not shocked:
            return self._make_daily(day, *_session_summary(self.seed, _INDEX_OF[inst.symbol], day))
        bars = self._bars(inst, day, now)
        k = moment.bars if day == moment.day else len(bars.close)
        return self._make_daily(
            day,
            int(bars.open[0]),
            int(bars.high[:k].max()),
            int(bars.low[:k].min()),
            int(bars.close[k - 1]),
            int(bars.volume[:k].sum()),
        )

    @staticmethod
    def _make_daily(day: date, open_: int, high: int, low: int, close: int, volume: int) -> Bar:
        return Bar(
            time=datetime.combine(day, time(0, 0), tzinfo=HK_TZ),
            open=_milli_to_decimal(open_),
            high=_milli_to_decimal(high),
            low=_milli_to_decimal(low),
            close=_milli_to_decimal(close),
            volume=volume,
        )

    def _intraday_bars(self, inst: Instrument, day: date, now: datetime, minutes: int) -> list[Bar]:
        bars = self._bars(inst, day, now)
        moment = _moment(now)
        k = moment.bars if day == moment.day else len(bars.close)
        starts, _ = _bar_starts(day)
        keys = _bucket_keys(day, minutes)[:k]
        if k == 0:
            return []
        edges = np.flatnonzero(np.diff(keys)) + 1
        firsts = np.concatenate([[0], edges])
        lasts = np.concatenate([edges - 1, [k - 1]])
        highs = np.maximum.reduceat(bars.high[:k], firsts)
        lows = np.minimum.reduceat(bars.low[:k], firsts)
        volumes = np.add.reduceat(bars.volume[:k], firsts)
        return [
            Bar(
                time=starts[first],
                open=_milli_to_decimal(int(bars.open[first])),
                high=_milli_to_decimal(int(high)),
                low=_milli_to_decimal(int(low)),
                close=_milli_to_decimal(int(bars.close[last])),
                volume=int(volume),
            )
            for first, last, high, low, volume in zip(firsts, lasts, highs, lows, volumes, strict=True)
        ]

    def _news_of_day(self, inst: Instrument, day: date) -> list[NewsItem]:
        code = int(inst.symbol[3:])
        rng = np.random.default_rng([self.seed, code, day.toordinal(), 0x4E5])
        items: list[NewsItem] = []
        position = _calendar().position.get(day)
        if position is not None and _days(self.seed).momentum[position, _INDEX_OF[inst.symbol]]:
            title, summary = _MOMENTUM_NEWS
            items.append(self._news_item(inst, day, time(8, 45), title, summary, "momentum"))
        for n in range(int(rng.integers(0, 3))):
            tone = rng.random()
            pool = _POSITIVE if tone < 0.35 else _NEGATIVE if tone < 0.6 else _NEUTRAL
            title, summary = pool[int(rng.integers(0, len(pool)))]
            minute = int(rng.integers(7 * 60, 22 * 60))
            items.append(self._news_item(inst, day, time(minute // 60, minute % 60), title, summary, str(n)))
        return items

    @staticmethod
    def _news_item(inst: Instrument, day: date, at: time, title: str, summary: str, key: str) -> NewsItem:
        return NewsItem(
            symbol=inst.symbol,
            published_at=datetime.combine(day, at, tzinfo=HK_TZ),
            title=title.format(name=inst.name),
            summary=summary,
            source="SimWire",
            url=f"sim://news/{inst.symbol}/{day.isoformat()}/{key}",
        )

    # ---------------------------------------------------------------- persistence

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """Hold the account (thread lock + file lock), refresh from disk, settle resting orders, save if changed."""
        with self._lock:
            self._depth += 1
            try:
                if self._depth == 1:
                    self._acquire_file()
                    self._reload_if_changed()
                    now = self.now()
                    self._roll_day(now)
                    self._settle_resting(now)
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    try:
                        if self._dirty:
                            self._save()
                    finally:
                        self._release_file()

    def _acquire_file(self) -> None:
        if self.state_file is None:
            return
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.state_file.with_name(self.state_file.name + ".lock"), "a+")  # noqa: SIM115
        fcntl.flock(handle, fcntl.LOCK_EX)
        self._lock_file = handle

    def _release_file(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def _stamp(self) -> tuple[int, int, int, int] | None:
        assert self.state_file is not None
        try:
            info = os.stat(self.state_file)
        except FileNotFoundError:
            return None
        # os.replace gives every save a new inode; with the times and size a change is never missed in practice.
        return (info.st_ino, info.st_mtime_ns, info.st_ctime_ns, info.st_size)

    def _reload_if_changed(self) -> None:
        if self.state_file is None:
            return
        stamp = self._stamp()
        if stamp is None or stamp == self._file_stamp:
            return
        try:
            data = json.loads(self.state_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(
                f"Could not read sim state file {self.state_file} ({exc}). Move it away to start a fresh paper account."
            ) from exc
        if not isinstance(data, dict):
            raise ConfigError(f"Sim state file {self.state_file} does not hold a JSON object. Move it away.")
        self._state = _State.from_json(data, self.state_file)
        self._file_stamp = stamp

    def _save(self) -> None:
        self._dirty = False
        if self.state_file is None:
            return
        cutoff = self.now() - timedelta(days=DONE_ORDER_RETENTION_DAYS)
        self._state.orders = [o for o in self._state.orders if o.is_active or o.updated_at >= cutoff]
        payload = json.dumps(self._state.to_json(self.seed), indent=1, sort_keys=True)
        directory = self.state_file.parent
        fd, temp_name = tempfile.mkstemp(prefix=self.state_file.name + ".", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp_name, self.state_file)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp_name)
            raise
        self._file_stamp = self._stamp()

    # ---------------------------------------------------------------- the paper account (used by SimBroker)

    def _open_account(self, kind: AccountKind) -> None:
        """Bind the account to ``kind`` on first use; refuse to open it as the other kind (ConfigError)."""
        with self._transaction():
            bound = self._state.account_kind
            if bound is None:
                self._state.account_kind = kind
                self._dirty = True
                return
            if bound is kind:
                return
            where = f"Sim state file {self.state_file}" if self.state_file is not None else "This SimExchange"
            fix = (
                "point broker.sim.state_file at another file (or move this one away)"
                if self.state_file is not None
                else "give each account kind its own SimExchange"
            )
            raise ConfigError(
                f"{where} holds a {bound.value} account (seed {self.seed}); it cannot be opened as a {kind.value} "
                f"account, which would mix paper history with broker-side stop orders. Keep account kind "
                f"{bound.value}, or {fix}."
            )

    def _roll_day(self, now: datetime) -> None:
        """On the first call of a day, record the equity at the previous close (after what its orders did)."""
        today = now.date()
        if self._state.day_start is not None and self._state.day_start[0] == today:
            return
        midnight = datetime.combine(today, time(0, 0), tzinfo=HK_TZ)
        self._settle_resting(midnight)
        value = Decimal(0)
        for symbol, holding in self._state.positions.items():
            value += (
                _milli_to_decimal(self._last_price_milli(UNIVERSE[_INDEX_OF[symbol]], midnight)[0]) * holding.quantity
            )
        self._state.day_start = (today, (self._state.cash + value).quantize(_CENT))
        self._dirty = True

    def _costs(self, gross: Decimal) -> hkex.CostBreakdown:
        return hkex.trading_costs(gross, self.commission_pct, self.min_commission)

    def _reserved_cash(self) -> Decimal:
        """Cash held for open buy orders (value at the limit plus costs), so two resting buys cannot overspend."""
        total = Decimal(0)
        for order in self._state.orders:
            if order.is_active and order.side is Side.BUY and order.limit_price is not None:
                gross = order.limit_price * (order.quantity - order.filled_quantity)
                total += gross + self._costs(gross).total
        return total

    def _pending_sell(self, symbol: str) -> int:
        return sum(
            o.quantity - o.filled_quantity
            for o in self._state.orders
            if o.is_active and o.side is Side.SELL and o.symbol == symbol
        )

    def _fill(self, order: Order, price: Decimal, at: datetime) -> Order:
        """Book a fill of what is left of ``order`` at ``price`` (at most ``fill_cap`` shares when a test set one):
        cash, position, and the order's new state (filled, or partially filled with the rest still working)."""
        quantity = order.quantity - order.filled_quantity
        if self._state.fill_cap is not None:
            quantity = min(quantity, self._state.fill_cap)
            self._state.fill_cap = None
        gross = price * quantity
        costs = self._costs(gross).total
        holding = self._state.positions.get(order.symbol)
        if order.side is Side.BUY:
            self._state.cash = (self._state.cash - gross - costs).quantize(_CENT)
            if holding is None:
                self._state.positions[order.symbol] = _Holding(quantity, price)
            else:
                total = holding.quantity + quantity
                average = (holding.avg_cost * holding.quantity + gross) / total
                self._state.positions[order.symbol] = _Holding(total, average.quantize(Decimal("0.0001")))
        else:
            assert holding is not None and holding.quantity >= quantity
            self._state.cash = (self._state.cash + gross - costs).quantize(_CENT)
            if holding.quantity == quantity:
                del self._state.positions[order.symbol]
            else:
                holding.quantity -= quantity
        filled_quantity = order.filled_quantity + quantity
        average_price = (
            price
            if order.filled_quantity == 0 or order.avg_fill_price is None
            else ((order.avg_fill_price * order.filled_quantity + gross) / filled_quantity).quantize(Decimal("0.0001"))
        )
        filled = order.model_copy(
            update={
                "status": OrderStatus.FILLED if filled_quantity == order.quantity else OrderStatus.PARTIALLY_FILLED,
                "filled_quantity": filled_quantity,
                "avg_fill_price": average_price,
                "updated_at": at,
            }
        )
        self._replace_order(filled)
        self._dirty = True
        return filled

    def _replace_order(self, order: Order) -> None:
        for i, existing in enumerate(self._state.orders):
            if existing.broker_order_id == order.broker_order_id:
                self._state.orders[i] = order
                return
        self._state.orders.append(order)

    def _settle_resting(self, now: datetime) -> None:
        """Fill resting limits and triggered stops whose price traded since they were placed; expire day orders."""
        for order in list(self._state.orders):
            if not order.is_active:
                continue
            expiry = _first_close_after(order.created_at)
            window_end = min(now, expiry)
            inst = UNIVERSE[_INDEX_OF[order.symbol]]
            filled = False
            if order.symbol not in self._state.suspended:
                if order.order_type in _STOP_TYPES:
                    filled = self._try_fill_stop(order, inst, window_end, now)
                else:
                    filled = self._try_fill_resting(order, inst, window_end, now)
            if not filled and now >= expiry:
                if order.order_type in _STOP_TYPES:
                    message = (
                        f"Stop expired at the close of {expiry.date()} without filling (day order); "
                        "re-arm it if the position is still held."
                    )
                else:
                    message = f"Expired unfilled at the close of {expiry.date()} (HKEX day order)."
                self._replace_order(
                    order.model_copy(update={"status": OrderStatus.CANCELLED, "updated_at": expiry, "message": message})
                )
                self._dirty = True

    def _eligible_sessions(
        self, order: Order, inst: Instrument, window_end: datetime, now: datetime
    ) -> Iterator[tuple[tuple[datetime, ...], np.ndarray, _Bars]]:
        """Per session, oldest first: bar starts, the indices of bars a resting order may trade on, and the bars.

        Eligible bars start after the minute the order was placed in and no later than ``window_end``, so an
        order never trades on the bar it was placed in (deterministic, whatever the seconds).
        """
        placed = order.updated_at if order.filled_quantity > 0 else order.created_at  # after its last fill
        first_eligible = placed.astimezone(HK_TZ).replace(second=0, microsecond=0) + _MINUTE
        day = first_eligible.date()
        cal = _calendar()
        while day <= window_end.date():
            if day in cal.segments:
                starts, epochs = _bar_starts(day)
                eligible = np.flatnonzero((epochs >= first_eligible.timestamp()) & (epochs <= window_end.timestamp()))
                if eligible.size:
                    yield starts, eligible, self._bars(inst, day, now)
            day += timedelta(days=1)

    def _try_fill_resting(self, order: Order, inst: Instrument, window_end: datetime, now: datetime) -> bool:
        if order.limit_price is None:
            return False  # only limit orders rest; nothing else can be working here
        limit_milli = int(order.limit_price * 1000)
        for starts, eligible, bars in self._eligible_sessions(order, inst, window_end, now):
            if order.side is Side.BUY:
                hits = eligible[bars.low[eligible] <= limit_milli]
            else:
                hits = eligible[bars.high[eligible] >= limit_milli]
            if hits.size:
                i = int(hits[0])
                bar_open = int(bars.open[i])
                # A gap through the limit fills at the (better) opening price of that bar.
                better = bar_open <= limit_milli if order.side is Side.BUY else bar_open >= limit_milli
                price = _milli_to_decimal(bar_open) if better else order.limit_price
                gross = price * (order.quantity - order.filled_quantity)
                if order.side is Side.BUY and gross + self._costs(gross).total > self._state.cash:
                    return False  # cash went elsewhere; the order keeps resting until it expires
                self._fill(order, price, starts[i])
                return True
        return False

    def _try_fill_stop(self, order: Order, inst: Instrument, window_end: datetime, now: datetime) -> bool:
        """A SELL stop: triggers on the first eligible bar whose low reaches ``aux_price``.

        STOP then sells at the trigger, or at the bar's open when the bar opened below it (a gap fills worse).
        STOP_LIMIT then becomes a limit sell at ``limit_price``: it fills at once when that trigger-bar price is at
        or above the limit, otherwise it rests from the next bar on like any limit sell. Triggering is recomputed
        from the printed bars on every call (bars never change once printed), so it needs no stored state.
        """
        assert order.aux_price is not None and order.side is Side.SELL
        trigger_milli = int(order.aux_price * 1000)
        limit_milli = int(order.limit_price * 1000) if order.limit_price is not None else None
        triggered = False
        for starts, eligible, bars in self._eligible_sessions(order, inst, window_end, now):
            candidates = eligible
            if not triggered:
                hits = eligible[bars.low[eligible] <= trigger_milli]
                if not hits.size:
                    continue
                i = int(hits[0])
                price_milli = min(int(bars.open[i]), trigger_milli)
                if limit_milli is None or price_milli >= limit_milli:
                    price = order.aux_price if price_milli == trigger_milli else _milli_to_decimal(price_milli)
                    self._fill(order, price, starts[i])
                    return True
                triggered = True  # a stop-limit whose limit the gap skipped: it now rests as a limit sell
                candidates = eligible[eligible > i]
            assert limit_milli is not None
            hits = candidates[bars.high[candidates] >= limit_milli]
            if hits.size:
                j = int(hits[0])
                bar_open = int(bars.open[j])
                price = _milli_to_decimal(bar_open) if bar_open > limit_milli else order.limit_price
                assert price is not None
                self._fill(order, price, starts[j])
                return True
        return False


# ==============================================================================================================
# SimBroker
# ==============================================================================================================


class SimBroker:
    """The ``Broker`` protocol over a ``SimExchange`` account (HKD, long only, whole lots).

    ``account_kind`` ``"paper"`` (the default) imitates a Futu paper account: limit and market orders only.
    ``"real"`` imitates a REAL account: protective SELL ``STOP`` / ``STOP_LIMIT`` orders rest at the (sim) broker.
    Opening an account as the kind it was not created as raises ConfigError. Raises ValueError for an unknown kind.
    """

    def __init__(self, exchange: SimExchange, *, account_kind: AccountKind | str = AccountKind.PAPER) -> None:
        try:
            kind = AccountKind(account_kind)
        except ValueError as exc:
            raise ValueError(f"Sim account kind {account_kind!r} is not known; use 'paper' or 'real'.") from exc
        self.exchange = exchange
        self.account_kind = kind
        self.is_paper = kind is AccountKind.PAPER
        exchange._open_account(kind)

    @property
    def account_id(self) -> str:
        return f"SIM-{self.exchange.seed}" if self.is_paper else f"SIM-REAL-{self.exchange.seed}"

    @property
    def has_stop_orders(self) -> bool:
        """True when the account accepts broker-side STOP / STOP_LIMIT orders (the REAL flavour)."""
        return not self.is_paper

    def account(self) -> Account:
        """Cash, market value at current quotes, equity = cash + market value, buying power = cash less open buys."""
        ex = self.exchange
        with ex._transaction():
            market_value = sum((p.market_value for p in self._positions()), Decimal(0))
            cash = ex._state.cash
            return Account(
                account_id=self.account_id,
                is_paper=self.is_paper,
                cash=cash,
                equity=(cash + market_value).quantize(_CENT),
                market_value=market_value.quantize(_CENT),
                buying_power=(cash - ex._reserved_cash()).quantize(_CENT),
                prev_close_equity=ex._state.day_start[1] if ex._state.day_start is not None else None,
            )

    def positions(self) -> list[Position]:
        """Open long positions valued at the current quote. ``sellable_quantity`` excludes shares in open sells."""
        with self.exchange._transaction():
            return self._positions()

    def _positions(self) -> list[Position]:
        ex = self.exchange
        now = ex.now()
        result = []
        for symbol, holding in sorted(ex._state.positions.items()):
            inst = UNIVERSE[_INDEX_OF[symbol]]
            last = _milli_to_decimal(ex._last_price_milli(inst, now)[0])
            sellable = holding.quantity - ex._pending_sell(symbol)
            result.append(Position.valued_at(symbol, inst.name, holding.quantity, sellable, holding.avg_cost, last))
        return result

    def open_orders(self) -> list[Order]:
        """Orders still working (resting limits and untriggered or resting stops), oldest first."""
        with self.exchange._transaction():
            return [o for o in self.exchange._state.orders if o.is_active]

    def orders(self) -> list[Order]:
        """Every order the account remembers (the last 30 days of finished ones and all working ones), oldest first."""
        with self.exchange._transaction():
            return list(self.exchange._state.orders)

    def find_order(self, client_order_id: str) -> Order | None:
        """The most recent order carrying ``client_order_id`` (the remark), or None."""
        with self.exchange._transaction():
            for order in reversed(self.exchange._state.orders):
                if order.client_order_id == client_order_id:
                    return order
            return None

    def preview_order(self, request: OrderRequest) -> OrderPreview:
        """What the order would cost at its limit price (MARKET: the current price). Sends and checks nothing."""
        ex = self.exchange
        inst = ex.instrument(request.symbol)
        if inst is None:
            raise OrderRejected(
                f"Could not preview {request.side.value.upper()} {request.quantity} {request.symbol}: "
                "the sim exchange does not list that symbol.",
                code="unknown_symbol",
            )
        with ex._transaction():
            price = request.limit_price
            if request.order_type is OrderType.MARKET or price is None:
                price = _milli_to_decimal(ex._last_price_milli(inst, ex.now())[0])
            return hkex.order_preview(
                inst.symbol, request.side, request.quantity, price, ex.commission_pct, ex.min_commission
            )

    def place_order(self, request: OrderRequest) -> Order:
        """Validate and send one order; marketable ones fill at once at the current price, others rest.

        Raises OrderRejected (nothing changes) for: an armed ``fail_next_order``, an unknown or suspended symbol,
        STOP/STOP_LIMIT on a paper account (paper supports LIMIT and MARKET only), odd lots, a missing or off-tick
        limit, a MARKET order outside continuous trading, too little buying power (value + costs), or selling more
        than the sellable quantity (no shorting). On a REAL-flavoured account a stop must be a SELL with an on-tick
        trigger (``aux_price``) below the last price (at or above it would trigger at once), and a STOP_LIMIT's
        limit must be on the tick grid and at or below its trigger. Stops never fill at placement: they rest.
        """
        ex = self.exchange
        is_stop = request.order_type in _STOP_TYPES
        with ex._transaction():
            now = ex.now()
            inst = ex.instrument(request.symbol)
            symbol = inst.symbol if inst is not None else request.symbol
            price_text = f" @ {request.limit_price}" if request.limit_price is not None else ""
            if request.order_type is OrderType.STOP:
                price_text = ""  # a plain stop has no limit: it becomes a market sell
            if is_stop and request.aux_price is not None:
                price_text += f" (trigger {request.aux_price})"
            what = f"{request.order_type.value} {request.side.value.upper()} {request.quantity} {symbol}{price_text}"

            def reject(reason: str, code: str) -> OrderRejected:
                return OrderRejected(f"Could not place {what}: {reason}. No order was sent.", code=code)

            def check_tick(label: str, price: Decimal) -> None:
                if hkex.is_on_tick(price, now.date()):
                    return
                try:
                    down = hkex.round_to_tick(price, Side.BUY, now.date())
                    up = hkex.round_to_tick(price, Side.SELL, now.date())
                    hint = f"valid neighbours: {down} and {up}"
                except ValueError:
                    hint = f"valid prices are {hkex.MIN_PRICE} to {hkex.MAX_PRICE}"
                raise reject(f"{label} {price} is not on the HKEX tick grid ({hint})", "off_tick")

            if ex._state.fail_next is not None:
                message = ex._state.fail_next
                ex._state.fail_next = None
                ex._dirty = True
                raise reject(f"broker rejected it ({message}; injected by fail_next_order)", "injected")
            if inst is None:
                raise reject("the sim exchange does not list that symbol", "unknown_symbol")
            if inst.symbol in ex._state.suspended:
                raise reject(f"{inst.symbol} is suspended from trading", "suspended")
            if inst.symbol in ex._state.delisted:
                raise reject(f"{inst.symbol} is delisted (it has no market)", "delisted")
            if is_stop and self.is_paper:
                raise reject(
                    f"{request.order_type.value} orders are not supported by paper accounts (use limit or market; "
                    "the guard enforces stops in paper)",
                    "unsupported_order_type",
                )
            if is_stop and request.side is Side.BUY:
                raise reject(
                    "buy stops are not supported by the sim (stops here only protect long positions: "
                    "use a SELL stop below the market)",
                    "unsupported_order_type",
                )
            if not hkex.is_whole_lots(request.quantity, inst.lot_size):
                raise reject(
                    f"quantity must be a multiple of the {inst.lot_size}-share board lot "
                    f"(nearest: {hkex.floor_to_lots(request.quantity, inst.lot_size)})",
                    "odd_lot",
                )
            last_milli, moment = ex._last_price_milli(inst, now)
            last = _milli_to_decimal(last_milli)
            has_limit = request.order_type in (OrderType.LIMIT, OrderType.STOP_LIMIT)
            limit = request.limit_price if has_limit else None
            aux = request.aux_price if is_stop else None
            if has_limit:
                if limit is None:
                    raise reject(f"a {request.order_type.value} order needs a limit price", "missing_price")
                check_tick("price", limit)
            if is_stop:
                if aux is None:
                    raise reject("a stop order needs a trigger price (aux_price)", "missing_trigger")
                check_tick("trigger price", aux)
                if aux >= last:
                    raise reject(
                        f"the trigger {aux} is at or above the last price {last}, so the stop would trigger at once; "
                        f"set the trigger below {last}, or sell with a market or limit order to exit now",
                        "trigger_at_market",
                    )
                if limit is not None and limit > aux:
                    raise reject(
                        f"the limit {limit} is above the trigger {aux}; a sell stop-limit's limit must be at or "
                        "below its trigger (it is the lowest price the triggered sell may accept)",
                        "limit_above_trigger",
                    )
            elif request.order_type is OrderType.MARKET and not moment.continuous:
                raise reject(
                    f"market orders need continuous trading and the market is {phase_at(now).value}", "market_closed"
                )
            marketable = (
                not is_stop
                and moment.continuous
                and (limit is None or (limit >= last if request.side is Side.BUY else limit <= last))
            )
            check_price = limit if limit is not None else last
            if request.side is Side.BUY:
                gross = check_price * request.quantity
                needed = gross + ex._costs(gross).total
                available = ex._state.cash - ex._reserved_cash()
                if needed > available:
                    raise reject(
                        f"needs HK${needed.quantize(_CENT)} (value plus costs) but buying power is "
                        f"HK${available.quantize(_CENT)}",
                        "insufficient_cash",
                    )
            else:
                # Resting sells and stops hold their shares, so a stop and a take-profit cannot both sell them.
                holding = ex._state.positions.get(inst.symbol)
                sellable = (holding.quantity if holding else 0) - ex._pending_sell(inst.symbol)
                if request.quantity > sellable:
                    raise reject(
                        f"only {sellable} shares are sellable (held {holding.quantity if holding else 0}, "
                        f"{ex._pending_sell(inst.symbol)} in open sell orders); short selling is not allowed",
                        "insufficient_position",
                    )
            order = Order(
                broker_order_id=f"SIM{ex._state.next_order_id:08d}",
                client_order_id=request.client_order_id,
                symbol=inst.symbol,
                side=request.side,
                quantity=request.quantity,
                order_type=request.order_type,
                limit_price=limit,
                aux_price=aux,
                status=OrderStatus.SUBMITTED,
                created_at=now,
                updated_at=now,
            )
            ex._state.next_order_id += 1
            ex._state.orders.append(order)
            ex._dirty = True
            if marketable:
                return ex._fill(order, last, now)
            return order

    def place_stop_order(self, request: OrderRequest) -> Order:
        """Place a broker-side protective STOP / STOP_LIMIT sell (REAL-flavoured accounts; as ``FutuClient``'s).

        Raises OrderRejected when ``request`` is not a stop type or ``place_order`` refuses it.
        """
        if request.order_type not in _STOP_TYPES:
            raise OrderRejected(
                f"Could not place {request.order_type.value} {request.side.value.upper()} {request.quantity} "
                f"{request.symbol} as a stop order: its type must be stop or stop_limit. No order was sent.",
                code="not_a_stop",
            )
        return self.place_order(request)

    def cancel_order(self, broker_order_id: str) -> Order:
        """Cancel a working order. Raises OrderRejected when it is unknown or already filled/cancelled."""
        ex = self.exchange
        with ex._transaction():
            for order in ex._state.orders:
                if order.broker_order_id != broker_order_id:
                    continue
                if order.is_done:
                    raise OrderRejected(
                        f"Could not cancel order {broker_order_id} ({order.side.value.upper()} {order.quantity} "
                        f"{order.symbol}): it is already {order.status.value}. Nothing changed.",
                        code="already_done",
                    )
                cancelled = order.model_copy(
                    update={"status": OrderStatus.CANCELLED, "updated_at": ex.now(), "message": "cancelled by request"}
                )
                ex._replace_order(cancelled)
                ex._dirty = True
                return cancelled
            raise OrderRejected(
                f"Could not cancel order {broker_order_id}: the sim account has no such order. "
                "Check the id with open_orders().",
                code="unknown_order",
            )

    def close(self) -> None:
        """Nothing to release: state is saved after every change."""
