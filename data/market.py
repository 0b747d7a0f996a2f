"""Market data for the tools: quotes, scans, cached K-lines, technicals and patterns.

Layers, bottom up:

- the XHKG calendar and ``market_status(now)`` live in ``data.calendar``;
- pure computations over numpy arrays: ``compute_technicals``, the chart-pattern detectors
  (``detect_bull_flag`` ...), ``detect_candlesticks`` and ``swing_low``;
- ``MarketService``: what the tool executor calls. It talks to a ``brokers.base.MarketData`` source, batches
  snapshot requests, reuses a snapshot for a few seconds (``quote_ttl_s``), reads index constituents once per
  run, caches K-lines in process and (optionally) in a persistent ``KlineCache``, and returns small frozen
  models: the model never receives raw K-line arrays.

All times are Asia/Hong_Kong. Quote prices stay ``Decimal``; indicator values are rounded floats.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Sequence
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

import numpy as np
import structlog
from pydantic import BaseModel, ConfigDict, Field

from brokers.base import Bar, Clock, MarketData, MarketState, Quote
from brokers.hkex import normalize_symbol
from data.calendar import (
    HKT,
    _calendar,
    last_completed_session,
)

log = structlog.get_logger(__name__)


TIMEFRAMES: dict[str, timedelta] = {
    "1m": timedelta(minutes=1),
    "5m": timedelta(minutes=5),
    "15m": timedelta(minutes=15),
    "1h": timedelta(hours=1),
    "1d": timedelta(days=1),
}
INDEXES: tuple[str, ...] = ("HSI", "HSCEI", "HSTECH", "ALL")
MAX_KLINE_COUNT = 1000
HISTORY_BARS = 120  # bars fetched for technicals/patterns: enough for SMA50 and a converged EMA50/MACD
SCAN_MAX_LIMIT = 50


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class UnknownSymbol(ValueError):
    """The market data source has no such stock. Check the code (``700``, ``HK.00700``) and ask again."""

    def __init__(self, message: str, *, symbols: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.symbols = list(symbols)


class NoMarketData(ValueError):
    """The source returned no bars for a symbol (new listing, long suspension). Nothing can be computed."""


# ==============================================================================================================
# Models returned to the tools
# ==============================================================================================================


class ScanRow(_Frozen):
    """One scan candidate. ``name`` is outside text (data, not instructions)."""

    rank: int
    symbol: str
    name: str
    last_price: Decimal
    change_pct: float  # vs previous close, percent
    volume_ratio: float | None
    turnover: Decimal
    lot_size: int
    score: float


class Technicals(_Frozen):
    """Indicator values at the latest bar. Prices in HKD, rounded; None where history is too short."""

    symbol: str
    timeframe: str
    as_of: datetime | None
    bars: int
    last_price: float | None
    rsi_14: float | None
    macd: float | None
    macd_signal: float | None
    macd_hist: float | None
    sma_9: float | None
    sma_20: float | None
    sma_50: float | None
    ema_9: float | None
    ema_20: float | None
    ema_50: float | None
    atr_14: float | None
    atr_pct: float | None  # ATR as percent of the last price
    volume_ratio: float | None  # today's volume so far vs the mean of the previous 20 daily volumes
    volume_pace_ratio: float | None  # the broker's time-adjusted ratio: volume per elapsed minute vs recent days
    trend: list[str]


Direction = Literal["bullish", "bearish", "neutral"]


class CandleHit(_Frozen):
    """A TA-Lib candlestick pattern that fired on one of the last bars (0 = the latest)."""

    name: str
    direction: Direction
    bars_ago: int


class PatternHit(_Frozen):
    """A chart pattern found by one of our detectors, with the price levels that define it."""

    name: str
    direction: Direction
    confidence: float = Field(ge=0, le=1)
    levels: dict[str, float]  # e.g. breakout_level, pivot_low, target
    note: str = ""


class PatternReport(_Frozen):
    """Candlesticks and chart patterns on the recent bars of one symbol."""

    symbol: str
    timeframe: str
    as_of: datetime | None
    bars: int
    last_price: float | None
    candlesticks: list[CandleHit]
    patterns: list[PatternHit]
    swing_low: float | None  # most recent swing low not undercut since (a natural stop reference)


# ==============================================================================================================
# Pure computations
# ==============================================================================================================


class Ohlcv(NamedTuple):
    """Bars as float64 numpy arrays (what TA-Lib and the detectors take)."""

    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray


def bars_to_arrays(bars: Sequence[Bar]) -> Ohlcv:
    """Turn bars (oldest first) into float64 arrays."""
    return Ohlcv(
        np.array([float(b.open) for b in bars], dtype=np.float64),
        np.array([float(b.high) for b in bars], dtype=np.float64),
        np.array([float(b.low) for b in bars], dtype=np.float64),
        np.array([float(b.close) for b in bars], dtype=np.float64),
        np.array([float(b.volume) for b in bars], dtype=np.float64),
    )


def _talib() -> Any:
    # Imported when first used: TA-Lib (which imports pandas) costs start-up time the guard pass never needs.
    import talib

    return talib


def _num(value: object, digits: int) -> float | None:
    if value is None:
        return None
    number = float(value)  # type: ignore[arg-type]
    if not math.isfinite(number):
        return None
    return round(number, digits)


def _price_digits(reference: float | None) -> int:
    # HK prices have at most 3 decimals (tick 0.001 under 0.25); keep one more for sub-dollar stocks' averages.
    return 4 if reference is not None and reference < 1 else 3


def _last(values: np.ndarray) -> float | None:
    return float(values[-1]) if len(values) and math.isfinite(values[-1]) else None


def volume_ratio(today_volume: int | None, prior_daily_volumes: Sequence[int], days: int = 20) -> float | None:
    """``today_volume`` over the mean of the last ``days`` prior daily volumes; None without enough history."""
    if today_volume is None or len(prior_daily_volumes) < days:
        return None
    mean = float(np.mean(np.asarray(prior_daily_volumes[-days:], dtype=np.float64)))
    if mean <= 0:
        return None
    return round(today_volume / mean, 2)


def compute_technicals(
    symbol: str,
    timeframe: str,
    bars: Sequence[Bar],
    last_price: Decimal | float | None = None,
    today_volume: int | None = None,
    prior_daily_volumes: Sequence[int] = (),
    volume_pace_ratio: float | None = None,
) -> Technicals:
    """Indicators at the latest of ``bars`` (oldest first). ``last_price`` defaults to the last close.

    RSI 14, MACD 12/26/9, SMA and EMA 9/20/50, ATR 14 (TA-Lib, default Wilder/EMA seeding). Values that need
    more history than given are None. ``prior_daily_volumes`` are the completed daily volumes before today;
    ``volume_pace_ratio`` is passed through (the quote's ``volume_ratio``: intraday, today's volume so far is
    naturally below a full day's, the pace ratio is not).
    """
    data = bars_to_arrays(bars)
    close = data.close
    last = float(last_price) if last_price is not None else _last(close)
    digits = _price_digits(last)
    values: dict[str, float | None] = {}
    if len(close):
        talib = _talib()
        values["rsi_14"] = _num(_last(talib.RSI(close, timeperiod=14)), 2)
        macd, signal, hist = talib.MACD(close, fastperiod=12, slowperiod=26, signalperiod=9)
        values["macd"] = _num(_last(macd), 4)
        values["macd_signal"] = _num(_last(signal), 4)
        values["macd_hist"] = _num(_last(hist), 4)
        for period in (9, 20, 50):
            values[f"sma_{period}"] = _num(_last(talib.SMA(close, timeperiod=period)), digits)
            values[f"ema_{period}"] = _num(_last(talib.EMA(close, timeperiod=period)), digits)
        values["atr_14"] = _num(_last(talib.ATR(data.high, data.low, close, timeperiod=14)), digits)
    atr = values.get("atr_14")
    technicals = Technicals(
        symbol=symbol,
        timeframe=timeframe,
        as_of=bars[-1].time if bars else None,
        bars=len(bars),
        last_price=_num(last, digits),
        rsi_14=values.get("rsi_14"),
        macd=values.get("macd"),
        macd_signal=values.get("macd_signal"),
        macd_hist=values.get("macd_hist"),
        sma_9=values.get("sma_9"),
        sma_20=values.get("sma_20"),
        sma_50=values.get("sma_50"),
        ema_9=values.get("ema_9"),
        ema_20=values.get("ema_20"),
        ema_50=values.get("ema_50"),
        atr_14=atr,
        atr_pct=_num(atr / last * 100, 2) if atr is not None and last else None,
        volume_ratio=volume_ratio(today_volume, prior_daily_volumes),
        volume_pace_ratio=_num(volume_pace_ratio, 2),
        trend=[],
    )
    return technicals.model_copy(update={"trend": trend_words(technicals)})


def trend_words(t: Technicals) -> list[str]:
    """Short words summarising where price stands against its averages and momentum."""
    words: list[str] = []
    price = t.last_price
    if price is not None:
        for name, level in (("sma20", t.sma_20), ("sma50", t.sma_50)):
            if level is not None:
                words.append(f"above_{name}" if price > level else f"below_{name}")
    if t.sma_20 is not None and t.sma_50 is not None:
        words.append("sma20_above_sma50" if t.sma_20 > t.sma_50 else "sma20_below_sma50")
    if t.ema_9 is not None and t.ema_20 is not None:
        words.append("ema9_above_ema20" if t.ema_9 > t.ema_20 else "ema9_below_ema20")
    if t.macd is not None and t.macd_signal is not None:
        words.append("macd_above_signal" if t.macd > t.macd_signal else "macd_below_signal")
    if t.rsi_14 is not None:
        if t.rsi_14 >= 70:
            words.append("rsi_overbought")
        elif t.rsi_14 <= 30:
            words.append("rsi_oversold")
    if price is not None and t.sma_20 is not None and t.sma_50 is not None:
        if price > t.sma_20 > t.sma_50:
            words.append("uptrend")
        elif price < t.sma_20 < t.sma_50:
            words.append("downtrend")
    if max(t.volume_ratio or 0.0, t.volume_pace_ratio or 0.0) >= 1.5:
        words.append("high_volume")
    return words


def scan_score(change_pct: float, volume_ratio: float | None) -> float:
    """Momentum amplified by volume: ``m * (1 + v)`` in [-2, 2].

    ``m`` is the move vs the previous close, saturating at ±5 %; ``v`` is 0 at normal volume (ratio ≤ 1) and
    reaches 1 at 4x normal (log2 scale), so heavy volume at most doubles the momentum score. An unknown
    volume ratio counts as normal.
    """
    momentum = max(-1.0, min(1.0, change_pct / 5.0))
    ratio = volume_ratio if volume_ratio is not None and volume_ratio > 0 else 1.0
    boost = max(0.0, min(1.0, math.log2(ratio) / 2.0))
    return round(momentum * (1.0 + boost), 4)


# --- candlesticks ---------------------------------------------------------------------------------------------

# (our name, TA-Lib function name): looked up when used, so importing this module does not import TA-Lib.
_CANDLESTICKS: tuple[tuple[str, str], ...] = (
    ("hammer", "CDLHAMMER"),
    ("inverted_hammer", "CDLINVERTEDHAMMER"),
    ("engulfing", "CDLENGULFING"),
    ("harami", "CDLHARAMI"),
    ("piercing", "CDLPIERCING"),
    ("dark_cloud_cover", "CDLDARKCLOUDCOVER"),
    ("morning_star", "CDLMORNINGSTAR"),
    ("evening_star", "CDLEVENINGSTAR"),
    ("shooting_star", "CDLSHOOTINGSTAR"),
    ("hanging_man", "CDLHANGINGMAN"),
    ("three_white_soldiers", "CDL3WHITESOLDIERS"),
    ("three_black_crows", "CDL3BLACKCROWS"),
    ("doji", "CDLDOJI"),
)
_NEUTRAL_CANDLES = frozenset({"doji"})  # TA-Lib reports +100 for a doji, which is indecision, not a signal


def detect_candlesticks(
    opens: np.ndarray, highs: np.ndarray, lows: np.ndarray, closes: np.ndarray, recent: int = 3
) -> list[CandleHit]:
    """The curated TA-Lib candlestick patterns that fired on the last ``recent`` bars, newest first."""
    o, h, lo, c = (np.asarray(a, dtype=np.float64) for a in (opens, highs, lows, closes))
    hits: list[CandleHit] = []
    if len(c) == 0:
        return hits
    talib = _talib()
    for name, function in _CANDLESTICKS:
        output = getattr(talib, function)(o, h, lo, c)
        for bars_ago in range(min(recent, len(c))):
            value = int(output[len(c) - 1 - bars_ago])
            if value == 0:
                continue
            if name in _NEUTRAL_CANDLES:
                direction: Direction = "neutral"
            else:
                direction = "bullish" if value > 0 else "bearish"
            hits.append(CandleHit(name=name, direction=direction, bars_ago=bars_ago))
    hits.sort(key=lambda hit: hit.bars_ago)
    return hits


# --- chart-pattern helpers ------------------------------------------------------------------------------------


def _bar_unit(highs: np.ndarray, lows: np.ndarray) -> float:
    """The typical bar size (median high-low range), the yardstick all detectors measure moves in."""
    ranges = highs - lows
    unit = float(np.median(ranges)) if len(ranges) else 0.0
    if unit <= 0 and len(ranges):
        unit = float(np.mean(ranges))
    return unit


def _as_arrays(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    converted = tuple(np.asarray(a, dtype=np.float64) for a in arrays)
    lengths = {len(a) for a in converted}
    if len(lengths) > 1:
        raise ValueError(f"open/high/low/close/volume arrays must have the same length, got {sorted(lengths)}")
    return converted


def _volume_dried_up(volumes: np.ndarray, busy: slice, quiet: slice, factor: float = 0.8) -> bool | None:
    """True when the quiet part traded less per bar than the busy part; None when volume is unknown."""
    busy_v, quiet_v = volumes[busy], volumes[quiet]
    if len(busy_v) == 0 or len(quiet_v) == 0 or busy_v.sum() <= 0:
        return None
    return float(quiet_v.mean()) < factor * float(busy_v.mean())


def _run_start(lows: np.ndarray, low_i: int, high_i: int, tolerance: float) -> int:
    """Where the climb from the low at ``low_i`` to ``high_i`` really starts: the last bar still near that low.

    A rally out of a flat base would otherwise be measured from an older dip in the base, making it look
    longer and slower than it was.
    """
    near = np.flatnonzero(lows[low_i:high_i] <= lows[low_i] + tolerance)
    return low_i + int(near[-1]) if len(near) else low_i


def _r(value: float) -> float:
    return round(float(value), 4)


def swing_low(lows: np.ndarray | Sequence[float], lookback: int = 20, strength: int = 2) -> float | None:
    """The most recent swing low within the last ``lookback`` bars that no later bar has undercut.

    A swing low is a bar whose low is below the ``strength`` bars before it and not above the ``strength``
    bars after it (so the last ``strength`` bars cannot be one yet). None when there is none: a stop should
    then come from elsewhere (e.g. ATR).
    """
    values = np.asarray(lows, dtype=np.float64)
    n = len(values)
    first = max(strength, n - lookback)
    for i in range(n - 1 - strength, first - 1, -1):
        before = values[i - strength : i]
        after = values[i + 1 : i + 1 + strength]
        if values[i] < before.min() and values[i] <= after.min() and values[i] <= values[i + 1 :].min():
            return float(values[i])
    return None


def _zigzag(highs: np.ndarray, lows: np.ndarray, threshold: float) -> tuple[list[tuple[int, float, int]], int]:
    """Alternating swing points: (index, price, +1 for a high / -1 for a low), plus the current leg's direction.

    A swing is confirmed once price reverses from it by ``threshold``. The last element is the current
    extreme of the leg in progress (not yet confirmed).
    """
    n = len(highs)
    pivots: list[tuple[int, float, int]] = []
    if n < 2 or threshold <= 0:
        return pivots, 0
    hi_i = lo_i = 0
    direction = 0
    ext = 0
    for i in range(1, n):
        if direction == 0:
            if highs[i] > highs[hi_i]:
                hi_i = i
            if lows[i] < lows[lo_i]:
                lo_i = i
            if highs[hi_i] - lows[lo_i] >= threshold and hi_i != lo_i:
                if hi_i > lo_i:
                    pivots.append((lo_i, float(lows[lo_i]), -1))
                    direction, ext = 1, hi_i
                else:
                    pivots.append((hi_i, float(highs[hi_i]), 1))
                    direction, ext = -1, lo_i
        elif direction == 1:
            if highs[i] >= highs[ext]:
                ext = i
            elif highs[ext] - lows[i] >= threshold:
                pivots.append((ext, float(highs[ext]), 1))
                direction, ext = -1, i
        else:
            if lows[i] <= lows[ext]:
                ext = i
            elif highs[i] - lows[ext] >= threshold:
                pivots.append((ext, float(lows[ext]), -1))
                direction, ext = 1, i
    if direction == 1:
        pivots.append((ext, float(highs[ext]), 1))
    elif direction == -1:
        pivots.append((ext, float(lows[ext]), -1))
    return pivots, direction


# --- detectors ------------------------------------------------------------------------------------------------
# Each takes open/high/low/close/volume arrays (oldest first) and returns a PatternHit or None. Moves are
# measured in "units" of the typical bar range so the same rules work on 1m bars and on daily bars.


def detect_bull_flag(
    opens: np.ndarray, highs: np.ndarray, lows: np.ndarray, closes: np.ndarray, volumes: np.ndarray
) -> PatternHit | None:
    """A steep rise (the pole) then 3-15 quiet bars holding its upper half (the flag); entry over the flag."""
    _o, h, lo, c, v = _as_arrays(opens, highs, lows, closes, volumes)
    n = len(c)
    if n < 12:
        return None
    unit = _bar_unit(h, lo)
    if unit <= 0:
        return None
    recent = max(0, n - 16)
    top = recent + int(np.argmax(h[recent:]))  # the pole's top: the highest high of the last 16 bars
    flag_len = n - 1 - top
    if not 3 <= flag_len <= 15 or top < 3:
        return None
    start = max(0, top - 20)
    lowest = start + int(np.argmin(lo[start : top - 2]))
    base = _run_start(lo, lowest, top - 2, unit)  # the pole's foot, at least 3 bars before the top
    pole_bars = top - base
    pole = float(h[top] - lo[base])
    if pole < 5 * unit or pole / pole_bars < 0.8 * unit or flag_len > max(6, 3 * pole_bars):
        return None
    if np.mean(np.diff(c[base : top + 1]) > 0) < 0.6:  # the pole must be mostly rising closes
        return None
    flag = slice(top + 1, n)
    flag_low = float(lo[flag].min())
    flag_high = float(h[flag].max())
    retrace = (float(h[top]) - flag_low) / pole
    if retrace > 0.5:
        return None
    slope = float(np.polyfit(np.arange(flag_len), c[flag], 1)[0])
    if slope > 0.25 * unit:  # still climbing: that is the pole continuing, not a flag
        return None
    if flag_high - flag_low > 0.6 * pole:
        return None
    quiet = _volume_dried_up(v, slice(base + 1, top + 1), flag)
    confidence = (
        0.5 + (0.2 if quiet else 0.0) + (0.15 if retrace <= 0.382 else 0.0) + (0.15 if pole >= 8 * unit else 0.0)
    )
    breakout = flag_high
    return PatternHit(
        name="bull_flag",
        direction="bullish",
        confidence=round(min(confidence, 1.0), 2),
        levels={
            "breakout_level": _r(breakout),
            "pivot_low": _r(flag_low),
            "pole_low": _r(lo[base]),
            "pole_high": _r(h[top]),
            "target": _r(breakout + pole),
        },
        note=(
            f"pole {lo[base]:.3f}->{h[top]:.3f} over {pole_bars} bars, flag {flag_len} bars retracing "
            f"{retrace:.0%}{', volume drying up' if quiet else ''}"
        ),
    )


def detect_breakout(
    opens: np.ndarray,
    highs: np.ndarray,
    lows: np.ndarray,
    closes: np.ndarray,
    volumes: np.ndarray,
    lookback: int = 20,
    min_volume_ratio: float = 1.5,
) -> PatternHit | None:
    """One of the last 3 bars closed above the prior ``lookback``-bar high on heavy volume, and price holds it."""
    _o, h, lo, c, v = _as_arrays(opens, highs, lows, closes, volumes)
    n = len(c)
    if n < lookback + 1:
        return None
    unit = _bar_unit(h, lo)
    if unit <= 0:
        return None
    for bars_ago in range(0, 3):
        j = n - 1 - bars_ago
        if j < lookback:
            break
        window = slice(j - lookback, j)
        level = float(h[window].max())
        if c[j] <= level:
            continue
        mean_volume = float(v[window].mean())
        if mean_volume <= 0:
            continue
        ratio = float(v[j]) / mean_volume
        if ratio < min_volume_ratio or c[-1] <= level:
            continue
        base_low = float(lo[window].min())
        extension = (float(c[-1]) - level) / unit
        strong_close = (c[j] - lo[j]) >= 0.7 * (h[j] - lo[j]) if h[j] > lo[j] else True
        confidence = 0.45 + min(0.25, (ratio - min_volume_ratio) * 0.15) + (0.15 if strong_close else 0.0)
        confidence += 0.15 if level - base_low <= 8 * unit else 0.0  # a tight base breaks out more cleanly
        if extension > 3:
            confidence -= 0.2  # already far above the level: chasing
        pivot_low = float(lo[max(0, j - 2) :].min())
        return PatternHit(
            name="breakout",
            direction="bullish",
            confidence=round(max(0.05, min(confidence, 1.0)), 2),
            levels={
                "breakout_level": _r(level),
                "pivot_low": _r(pivot_low),
                "base_low": _r(base_low),
                "target": _r(level + (level - base_low)),
            },
            note=(
                f"closed {c[j]:.3f} above the {lookback}-bar high {level:.3f} {bars_ago} bar(s) ago on "
                f"{ratio:.1f}x volume"
            ),
        )
    return None


def detect_consolidation(
    opens: np.ndarray, highs: np.ndarray, lows: np.ndarray, closes: np.ndarray, volumes: np.ndarray
) -> PatternHit | None:
    """The last 10-30 bars sit in a tight, flat box with bar ranges shrinking against the bars before."""
    _o, h, lo, c, _v = _as_arrays(opens, highs, lows, closes, volumes)
    n = len(c)
    true_range = _talib().TRANGE(h, lo, c)
    for width in range(30, 9, -1):  # the longest box that qualifies
        if n < width + 10:
            continue
        box = slice(n - width, n)
        prior = slice(max(1, n - 3 * width), n - width)  # TRANGE is NaN at index 0
        prior_atr = float(np.nanmean(true_range[prior]))
        box_atr = float(np.nanmean(true_range[box]))
        if not prior_atr > 0:
            continue
        box_high, box_low = float(h[box].max()), float(lo[box].min())
        height = box_high - box_low
        drift = abs(float(c[-1] - c[n - width]))
        if box_atr > 0.65 * prior_atr or height > 3 * prior_atr or drift > 0.5 * height:
            continue
        advance = float(c[n - width] - c[prior.start])
        direction: Direction = "bullish" if advance >= 3 * prior_atr else "neutral"
        confidence = 0.5 + (0.2 if box_atr <= 0.5 * prior_atr else 0.0) + (0.15 if width >= 15 else 0.0)
        confidence += 0.15 if direction == "bullish" else 0.0
        return PatternHit(
            name="consolidation",
            direction=direction,
            confidence=round(min(confidence, 1.0), 2),
            levels={
                "breakout_level": _r(box_high),
                "pivot_low": _r(box_low),
                "target": _r(box_high + height),
            },
            note=(
                f"{width} bars in {box_low:.3f}-{box_high:.3f}, bar range {box_atr / prior_atr:.0%} of the "
                f"bars before{', after an advance' if direction == 'bullish' else ''}"
            ),
        )
    return None


def detect_abcd(
    opens: np.ndarray, highs: np.ndarray, lows: np.ndarray, closes: np.ndarray, volumes: np.ndarray
) -> PatternHit | None:
    """Momentum ABCD: a surge A->B to a new high, a pullback to a higher low C, and price turning up from C.

    The entry is a break above B (the D leg), the stop below C, the target C + (B - A) (CD = AB).
    """
    _o, h, lo, c, v = _as_arrays(opens, highs, lows, closes, volumes)
    n = len(c)
    if n < 12:
        return None
    unit = _bar_unit(h, lo)
    if unit <= 0:
        return None
    pivots, direction = _zigzag(h, lo, 2.5 * unit)
    if direction != 1 or len(pivots) < 4:
        return None
    (a_i, a, a_kind), (b_i, b, b_kind), (c_i, c_low, c_kind), _current = pivots[-4:]
    if (a_kind, b_kind, c_kind) != (-1, 1, -1):
        return None
    a_i = _run_start(lo, a_i, b_i, unit)
    a = float(lo[a_i])
    leg = b - a
    if leg < 5 * unit or leg / max(1, b_i - a_i) < 0.7 * unit:  # A->B must be a strong, fast move
        return None
    if b < float(h[max(0, a_i - 20) : b_i + 1].max()):  # B must be a fresh high, not below earlier highs
        return None
    retrace = (b - c_low) / leg
    if not 0.3 <= retrace <= 0.75 or c_i - b_i < 2:
        return None
    if n - 1 - c_i > 15:  # C must be recent: the pattern is about the move starting now
        return None
    last = float(c[-1])
    if last <= c_low or last > b + 0.5 * leg:
        return None
    triggered = last > b
    quiet = _volume_dried_up(v, slice(a_i + 1, b_i + 1), slice(b_i + 1, c_i + 1))
    confidence = 0.45 + (0.2 if 0.382 <= retrace <= 0.618 else 0.0) + (0.15 if quiet else 0.0)
    confidence += 0.15 if triggered else 0.0
    target = c_low + leg
    return PatternHit(
        name="abcd",
        direction="bullish",
        confidence=round(min(confidence, 1.0), 2),
        levels={
            "a": _r(a),
            "b": _r(b),
            "c": _r(c_low),
            "breakout_level": _r(b),
            "pivot_low": _r(c_low),
            "target": _r(target),
        },
        note=(
            f"A {a:.3f} -> B {b:.3f} -> C {c_low:.3f} ({retrace:.0%} pullback); "
            f"{'broke above B' if triggered else 'buy above B'}, stop below C, D target {target:.3f}"
        ),
    )


def detect_cup_and_handle(
    opens: np.ndarray, highs: np.ndarray, lows: np.ndarray, closes: np.ndarray, volumes: np.ndarray
) -> PatternHit | None:
    """A rounded U between two similar highs (the cup), then a shallow pullback (the handle) under the rim."""
    _o, h, lo, c, v = _as_arrays(opens, highs, lows, closes, volumes)
    n = len(c)
    if n < 25:
        return None
    unit = _bar_unit(h, lo)
    if unit <= 0:
        return None
    best: PatternHit | None = None
    best_score = -1.0
    for handle_len in range(2, 16):
        right = n - 1 - handle_len
        if right < 20:
            break
        handle = slice(right + 1, n)
        if h[handle].max() > h[right]:  # the right rim must be the high since the cup
            continue
        for left in range(max(0, right - 120), right - 15):
            rim = min(float(h[left]), float(h[right]))
            cup = slice(left + 1, right)
            bottom_i = left + 1 + int(np.argmin(lo[cup]))
            depth = rim - float(lo[bottom_i])
            if depth < 6 * unit or abs(float(h[left] - h[right])) > 0.15 * depth:
                continue
            if h[cup].max() > rim + 0.05 * depth:  # nothing inside the cup pokes above the rims
                continue
            width = right - left
            if not 0.25 <= (bottom_i - left) / width <= 0.75:
                continue
            # Rounded, not a V: closes follow a parabola and spend time near the bottom.
            x = np.arange(left, right + 1, dtype=np.float64)
            coefficients, residuals, *_ = np.polyfit(x, c[left : right + 1], 2, full=True)
            total = float(np.sum((c[left : right + 1] - c[left : right + 1].mean()) ** 2))
            r_squared = 1 - float(residuals[0]) / total if len(residuals) and total > 0 else 0.0
            near_bottom = int(np.sum(lo[cup] <= lo[bottom_i] + 0.25 * depth))
            if coefficients[0] <= 0 or r_squared < 0.75 or near_bottom < max(3, 0.35 * width):
                continue
            handle_low = float(lo[handle].min())
            handle_drop = (float(h[right]) - handle_low) / depth
            if not 0.08 <= handle_drop <= 0.5 or handle_len > max(3, width // 2):
                continue
            if float(c[-1]) > float(h[right]):
                continue  # already broke out: that is detect_breakout's business
            quiet = _volume_dried_up(v, cup, handle)
            confidence = 0.45 + 0.25 * (r_squared - 0.75) / 0.25 + (0.15 if quiet else 0.0)
            confidence += 0.15 if handle_drop <= 0.33 else 0.0
            score = r_squared + 0.01 * width
            if score > best_score:
                best_score = score
                breakout = float(h[right])
                best = PatternHit(
                    name="cup_and_handle",
                    direction="bullish",
                    confidence=round(max(0.05, min(confidence, 1.0)), 2),
                    levels={
                        "left_rim": _r(h[left]),
                        "cup_low": _r(lo[bottom_i]),
                        "breakout_level": _r(breakout),
                        "pivot_low": _r(handle_low),
                        "target": _r(breakout + depth),
                    },
                    note=(
                        f"cup {width} bars deep {depth:.3f} (fit R2 {r_squared:.2f}), handle {handle_len} bars "
                        f"retracing {handle_drop:.0%} of the depth"
                    ),
                )
    return best


PATTERN_DETECTORS: tuple[Callable[..., PatternHit | None], ...] = (
    detect_bull_flag,
    detect_breakout,
    detect_consolidation,
    detect_abcd,
    detect_cup_and_handle,
)


def detect_chart_patterns(data: Ohlcv) -> list[PatternHit]:
    """Run every detector; the hits, most confident first."""
    hits = [hit for detector in PATTERN_DETECTORS if (hit := detector(*data)) is not None]
    return sorted(hits, key=lambda hit: -hit.confidence)


# ==============================================================================================================
# The service the tools call
# ==============================================================================================================


@runtime_checkable
class KlineCache(Protocol):
    """A persistent store of completed K-line bars (PostgreSQL in production). Completed bars never change."""

    def get(self, symbol: str, timeframe: str, since: datetime) -> list[Bar] | None:
        """Stored bars of ``symbol``/``timeframe`` with ``time >= since``, oldest first; None if none stored."""
        ...

    def put(self, symbol: str, timeframe: str, bars: list[Bar]) -> None:
        """Store completed bars, replacing any stored bar with the same ``time``."""
        ...


class ConstituentCache(Protocol):
    """A persistent store of index constituents per trading day (PostgreSQL in production)."""

    def get(self, index_name: str, trading_date: date) -> list[str] | None: ...

    def put(self, index_name: str, trading_date: date, symbols: Sequence[str]) -> None: ...


class MemoryKlineCache:
    """A ``KlineCache`` in a dict: for the simulator, dry runs and tests (nothing survives the process)."""

    def __init__(self) -> None:
        self._bars: dict[tuple[str, str], dict[datetime, Bar]] = {}

    def get(self, symbol: str, timeframe: str, since: datetime) -> list[Bar] | None:
        """Stored bars with ``time >= since``, oldest first; None if none stored."""
        stored = self._bars.get((symbol, timeframe))
        if not stored:
            return None
        return [stored[t] for t in sorted(stored) if t >= since]

    def put(self, symbol: str, timeframe: str, bars: list[Bar]) -> None:
        """Store bars, replacing any with the same ``time``."""
        self._bars.setdefault((symbol, timeframe), {}).update((bar.time, bar) for bar in bars)


class _Cached(NamedTuple):
    fetched_at: datetime
    bars: tuple[Bar, ...]
    whole_history: bool  # the source had fewer bars than asked: there is nothing older
    through: date | None = None  # daily only: the last completed session these bars run up to


def _bar_day(bar: Bar) -> date:
    return bar.time.astimezone(HKT).date()


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")


def _clean_name(name: str, limit: int = 60) -> str:
    # Stock names come from outside: no control or bidi characters, bounded length.
    return _CONTROL.sub(" ", name).strip()[:limit]


class MarketService:
    """Quotes, scans, K-lines, technicals and patterns over a ``MarketData`` source, with caching.

    Gateway requests are the scarce resource (Futu counts them per 30 s, and history K-lines per stock per 30
    days), so the service batches and remembers:

    - quotes: every snapshot it reads (a scan's included) is kept for ``quote_ttl_s`` seconds and served again
      within that time, so ``get_quote`` after ``scan_market``, or the quote behind technicals and the risk
      check, costs no request. A quote older than the TTL is never served; ``quote(..., fresh=True)`` and
      ``invalidate()`` force a new read. ``quote_ttl_s=0`` turns the cache off.
    - the broker's market state: kept for the same TTL.
    - index constituents: read once per service (one process run); they change a few times a year.
    - daily K-lines: in process and in the persistent ``KlineCache``; intraday bars for ``intraday_ttl_s``.

    ``batch=False`` is the naive mode the benchmark compares against: one source request per symbol and no
    constituent cache. Nothing else should use it.
    """

    def __init__(
        self,
        source: MarketData,
        clock: Clock,
        kline_cache: KlineCache | None = None,
        *,
        intraday_ttl_s: float = 60.0,
        quote_ttl_s: float = 5.0,
        batch: bool = True,
        constituent_cache: ConstituentCache | None = None,
    ) -> None:
        if quote_ttl_s < 0 or intraday_ttl_s < 0:
            raise ValueError(
                f"MarketService TTLs must be >= 0 seconds (quote_ttl_s={quote_ttl_s}, intraday_ttl_s={intraday_ttl_s})."
            )
        self._source = source
        self._clock = clock
        self._kline_cache = kline_cache
        self._intraday_ttl = timedelta(seconds=intraday_ttl_s)
        self._quote_ttl = timedelta(seconds=quote_ttl_s)
        self._batch = batch
        self._constituent_cache = constituent_cache if batch else None
        self._memory: dict[tuple[str, str], _Cached] = {}
        self._quotes: dict[str, tuple[datetime, Quote]] = {}
        self._state: tuple[datetime, MarketState | None] | None = None
        self._constituents: dict[str, tuple[str, ...]] = {}

    # --- quotes -----------------------------------------------------------------------------------------------

    def quote(self, symbol: str, *, fresh: bool = False) -> Quote:
        """The latest snapshot of one symbol (any accepted form), at most ``quote_ttl_s`` old; ``fresh`` reads it
        from the source whatever the cache holds. Raises UnknownSymbol."""
        return self.quotes([symbol], fresh=fresh)[0]

    def quotes(self, symbols: Sequence[str], *, fresh: bool = False) -> list[Quote]:
        """Snapshots of many symbols in the order asked (duplicates once): cached ones within the TTL, the rest
        in one source call (unless ``fresh``, which reads them all). Raises UnknownSymbol naming the missing."""
        wanted: list[str] = []
        for text in symbols:
            symbol = _normalize(text)
            if symbol not in wanted:
                wanted.append(symbol)
        if not wanted:
            return []
        now = self._clock()
        found: dict[str, Quote] = {}
        for symbol in wanted:
            hit = None if fresh else self._cached_quote(symbol, now)
            if hit is not None:
                found[symbol] = hit
        to_read = [symbol for symbol in wanted if symbol not in found]
        if to_read:
            found.update(self._read_quotes(to_read, now))
        missing = [symbol for symbol in wanted if symbol not in found]
        if missing:
            raise UnknownSymbol(
                f"No quote for {', '.join(missing)}: the market data source does not know "
                f"{'this symbol' if len(missing) == 1 else 'these symbols'} (not listed, delisted or mistyped). "
                f"Check the stock code and ask again.",
                symbols=missing,
            )
        return [found[symbol] for symbol in wanted]

    def invalidate(self, symbols: Sequence[str] | None = None) -> None:
        """Forget cached quotes (all, or only ``symbols``) and the broker's market state: the next read asks the
        source. Call it after anything that may have moved the market for us, e.g. an order fill."""
        self._state = None
        if symbols is None:
            self._quotes.clear()
            return
        for text in symbols:
            with contextlib.suppress(UnknownSymbol):
                self._quotes.pop(_normalize(text), None)

    def _is_fresh(self, fetched_at: datetime, now: datetime) -> bool:
        # A clock that went backwards (NTP step) makes the entry stale rather than younger.
        return fetched_at <= now < fetched_at + self._quote_ttl

    def _cached_quote(self, symbol: str, now: datetime) -> Quote | None:
        entry = self._quotes.get(symbol)
        if entry is None or not self._is_fresh(entry[0], now):
            return None
        return entry[1]

    def _read_quotes(self, symbols: list[str], now: datetime) -> dict[str, Quote]:
        """Ask the source (one call, or one per symbol in naive mode) and remember what came back.

        The entries are stamped with the time the request was made, so their age is never understated.
        """
        if self._batch:
            quotes = self._source.snapshots(symbols)
        else:
            quotes = [quote for symbol in symbols for quote in self._source.snapshots([symbol])]
        # Names come from outside: every quote this service hands out carries a cleaned one (get_quote, scans,
        # the risk state), not only the scan's rows.
        found = {
            quote.symbol: quote
            if quote.name == _clean_name(quote.name)
            else quote.model_copy(update={"name": _clean_name(quote.name)})
            for quote in quotes
        }
        if self._quote_ttl > timedelta(0):
            for symbol, quote in found.items():
                self._quotes[symbol] = (now, quote)
        return found

    # --- market state -----------------------------------------------------------------------------------------

    def market_state(self) -> MarketState | None:
        """The broker's market phase (``MarketData.market_state``), read at most once per ``quote_ttl_s``."""
        now = self._clock()
        if self._state is not None and self._is_fresh(self._state[0], now):
            return self._state[1]
        state = self._source.market_state()
        if self._quote_ttl > timedelta(0):
            self._state = (now, state)
        return state

    # --- scan -------------------------------------------------------------------------------------------------

    def index_constituents(self, index: str) -> list[str]:
        """The symbols of ``index`` (HSI, HSCEI, HSTECH or ALL), read from the source once per service."""
        name = index.strip().upper()
        if name not in INDEXES:
            raise ValueError(f"Cannot scan index {index!r}: choose one of {', '.join(INDEXES)}.")
        cached = self._constituents.get(name)
        if cached is None:
            cached = self._stored_constituents(name)
        if cached is None:
            cached = tuple(dict.fromkeys(self._source.index_constituents(name)))
            if self._constituent_cache is not None and cached:
                try:
                    self._constituent_cache.put(name, self._clock().date(), cached)
                except Exception as exc:  # a cache that fails must not fail the scan
                    log.warning("constituent_cache_failed", index=name, error=str(exc))
        if self._batch:
            self._constituents[name] = cached
        return list(cached)

    def _stored_constituents(self, name: str) -> tuple[str, ...] | None:
        """Today's constituents from the persistent cache (they change quarterly; read once a day)."""
        if self._constituent_cache is None:
            return None
        try:
            stored = self._constituent_cache.get(name, self._clock().date())
        except Exception as exc:
            log.warning("constituent_cache_failed", index=name, error=str(exc))
            return None
        return tuple(stored) if stored else None

    def scan(self, index: str = "HSI", limit: int = 10) -> list[ScanRow]:
        """The index's tradable constituents ranked by ``scan_score``; ``limit`` is capped to 1..50.

        A scan always reads fresh snapshots (one request for the whole index) and leaves them in the quote
        cache, so the quotes the model asks for next cost nothing within the TTL.
        """
        constituents = self.index_constituents(index)
        limit = max(1, min(SCAN_MAX_LIMIT, int(limit)))
        if not constituents:
            return []
        rows: list[tuple[float, Quote, float]] = []
        for quote in self._read_quotes(constituents, self._clock()).values():
            if quote.suspended or not quote.is_equity or quote.last_price <= 0:
                continue
            change_pct = 0.0
            if quote.prev_close is not None and quote.prev_close > 0:
                change_pct = float((quote.last_price - quote.prev_close) / quote.prev_close * 100)
            rows.append((scan_score(change_pct, quote.volume_ratio), quote, change_pct))
        rows.sort(key=lambda row: (-row[0], -row[1].turnover, row[1].symbol))
        return [
            ScanRow(
                rank=rank,
                symbol=quote.symbol,
                name=_clean_name(quote.name),
                last_price=quote.last_price,
                change_pct=round(change_pct, 2),
                volume_ratio=_num(quote.volume_ratio, 2),
                turnover=quote.turnover,
                lot_size=quote.lot_size,
                score=score,
            )
            for rank, (score, quote, change_pct) in enumerate(rows[:limit], start=1)
        ]

    # --- K-lines ----------------------------------------------------------------------------------------------

    def klines(self, symbol: str, timeframe: str, count: int) -> list[Bar]:
        """The last ``count`` bars (oldest first), from the caches when they can answer.

        Daily history comes from the in-process cache or the persistent ``KlineCache`` once it reaches the
        last completed session; today's bar is then built from the latest quote. Intraday bars are cached in
        process for ``intraday_ttl_s``.
        """
        symbol = _normalize(symbol)
        _check_timeframe(timeframe)
        if not 1 <= count <= MAX_KLINE_COUNT:
            raise ValueError(f"Cannot fetch {count} {timeframe} bars of {symbol}: count must be 1..{MAX_KLINE_COUNT}.")
        if timeframe == "1d":
            completed, live = self._daily(symbol, count)
            bars = [*completed, live] if live is not None else list(completed)
            return bars[-count:]
        return self._intraday(symbol, timeframe, count)

    def _intraday(self, symbol: str, timeframe: str, count: int) -> list[Bar]:
        now = self._clock()
        key = (symbol, timeframe)
        cached = self._memory.get(key)
        if (
            cached is not None
            and cached.fetched_at <= now < cached.fetched_at + self._intraday_ttl
            and (len(cached.bars) >= count or cached.whole_history)
        ):
            return list(cached.bars[-count:])
        bars = self._source.klines(symbol, timeframe, count)
        self._memory[key] = _Cached(now, tuple(bars), len(bars) < count)
        return list(bars)

    def _daily(self, symbol: str, count: int, quote: Quote | None = None) -> tuple[tuple[Bar, ...], Bar | None]:
        """Completed daily bars (up to ``count``) and today's bar in progress, if any."""
        now = self._clock()
        through = last_completed_session(now)
        calendar = _calendar()
        today = calendar.session(now.astimezone(HKT).date())
        in_progress = today is not None and (through is None or today.day > through) and now >= today.pre_open
        key = (symbol, "1d")

        completed: tuple[Bar, ...] | None = None
        cached = self._memory.get(key)
        if cached is not None and cached.through == through and (len(cached.bars) >= count or cached.whole_history):
            completed = cached.bars
        elif self._kline_cache is not None and through is not None:
            completed = self._from_persistent(symbol, count, through)
            if completed is not None:
                self._memory[key] = _Cached(now, completed, False, through)

        live: Bar | None = None
        if completed is None:
            fetched = self._source.klines(symbol, "1d", count + 1)  # +1: the last may be today's, unfinished
            done = tuple(bar for bar in fetched if through is not None and _bar_day(bar) <= through)
            rest = [bar for bar in fetched if through is None or _bar_day(bar) > through]
            if in_progress and rest and today is not None and _bar_day(rest[-1]) == today.day:
                live = rest[-1]
            self._memory[key] = _Cached(now, done, len(fetched) < count + 1, through)
            if self._kline_cache is not None and done:
                try:
                    self._kline_cache.put(symbol, "1d", list(done))
                except Exception as exc:  # a cache is an optimisation: never fail a read because of it
                    log.warning("kline_cache_put_failed", symbol=symbol, timeframe="1d", error=str(exc))
            completed = done
        if live is None and in_progress and today is not None:
            live = _live_daily_bar(quote or self.quote(symbol), today.day)
        return completed[-count:], live

    def _from_persistent(self, symbol: str, count: int, through: date) -> tuple[Bar, ...] | None:
        assert self._kline_cache is not None
        sessions = _calendar().sessions_through(through, count)
        since = datetime.combine(sessions[0].day, time(0), HKT)
        try:
            stored = self._kline_cache.get(symbol, "1d", since) or []
        except Exception as exc:  # fall back to the source, as on a miss
            log.warning("kline_cache_get_failed", symbol=symbol, timeframe="1d", error=str(exc))
            return None
        by_day = {
            _bar_day(bar): bar.model_copy(update={"time": bar.time.astimezone(HKT)})
            for bar in stored
            if since.date() <= _bar_day(bar) <= through
        }
        bars = tuple(by_day[day] for day in sorted(by_day))
        # A hit needs the history to reach the last completed session with no gaps (one bar per session).
        if len(bars) >= count and _bar_day(bars[-1]) == through:
            return bars
        return None

    # --- analysis ---------------------------------------------------------------------------------------------

    def technicals(self, symbol: str, timeframe: str = "1d") -> Technicals:
        """RSI, MACD, SMAs/EMAs, ATR and the 20-day volume ratio of ``symbol`` on ``timeframe`` bars."""
        symbol = _normalize(symbol)
        _check_timeframe(timeframe)
        quote = self.quote(symbol)
        completed, live = self._daily(symbol, HISTORY_BARS, quote)
        if timeframe == "1d":
            bars = [*completed, live] if live is not None else list(completed)
        else:
            bars = self.klines(symbol, timeframe, HISTORY_BARS)
        if not bars:
            raise NoMarketData(
                f"No {timeframe} K-line bars for {symbol}: the source returned none (new listing or long "
                f"suspension). Technicals cannot be computed; use get_quote instead."
            )
        quote_day = _session_of(quote.updated_at)
        prior = [bar.volume for bar in completed if _bar_day(bar) < quote_day]
        return compute_technicals(
            symbol, timeframe, bars, quote.last_price, quote.volume, prior, volume_pace_ratio=quote.volume_ratio
        )

    def patterns(self, symbol: str, timeframe: str = "5m") -> PatternReport:
        """TA-Lib candlesticks on the last 3 bars plus our chart-pattern detectors, on ``timeframe`` bars."""
        symbol = _normalize(symbol)
        _check_timeframe(timeframe)
        bars = self.klines(symbol, timeframe, HISTORY_BARS)
        if not bars:
            raise NoMarketData(
                f"No {timeframe} K-line bars for {symbol}: the source returned none (new listing or long "
                f"suspension). Patterns cannot be detected."
            )
        data = bars_to_arrays(bars)
        last = float(data.close[-1])
        low = swing_low(data.low, lookback=30)
        return PatternReport(
            symbol=symbol,
            timeframe=timeframe,
            as_of=bars[-1].time,
            bars=len(bars),
            last_price=_num(last, _price_digits(last)),
            candlesticks=detect_candlesticks(data.open, data.high, data.low, data.close),
            patterns=detect_chart_patterns(data),
            swing_low=_num(low, _price_digits(last)),
        )


def _session_of(when: datetime) -> date:
    """The session a quote taken at ``when`` belongs to: that day's, or the last one before a closed day."""
    calendar = _calendar()
    day = when.astimezone(HKT).date()
    if calendar.session(day) is not None:
        return day
    previous = calendar.previous_session(day)
    return previous.day if previous is not None else day


def _live_daily_bar(quote: Quote, day: date) -> Bar | None:
    """Today's daily bar so far, from a snapshot taken today (None before the first trade)."""
    if quote.updated_at.astimezone(HKT).date() != day or quote.volume <= 0:
        return None
    if quote.open_price is None or quote.high_price is None or quote.low_price is None:
        return None
    return Bar(
        time=datetime.combine(day, time(0), HKT),
        open=quote.open_price,
        high=quote.high_price,
        low=quote.low_price,
        close=quote.last_price,
        volume=quote.volume,
    )


def _normalize(text: str) -> str:
    try:
        return normalize_symbol(text)
    except ValueError as exc:
        raise UnknownSymbol(str(exc), symbols=[str(text)]) from exc


def _check_timeframe(timeframe: str) -> None:
    if timeframe not in TIMEFRAMES:
        raise ValueError(f"Unknown timeframe {timeframe!r}: use one of {', '.join(TIMEFRAMES)}.")
