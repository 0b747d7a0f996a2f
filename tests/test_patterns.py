"""Chart-pattern detectors, candlesticks and swing lows on constructed series; the patterns tool on the sim."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from brokers.sim import SimExchange
from data.market import (
    PATTERN_DETECTORS,
    MarketService,
    Ohlcv,
    PatternHit,
    detect_abcd,
    detect_breakout,
    detect_bull_flag,
    detect_candlesticks,
    detect_consolidation,
    detect_cup_and_handle,
    swing_low,
)

HKT = ZoneInfo("Asia/Hong_Kong")
Detector = Callable[..., PatternHit | None]


def from_closes(closes: Sequence[float], wick: float = 0.1, volumes: Sequence[float] | None = None) -> Ohlcv:
    """Bars that open at the previous close, with ``wick`` above and below the body."""
    c = np.asarray(closes, dtype=np.float64)
    o = np.concatenate([[c[0]], c[:-1]])
    v = np.asarray(volumes if volumes is not None else [1000.0] * len(c), dtype=np.float64)
    return Ohlcv(o, np.maximum(o, c) + wick, np.minimum(o, c) - wick, c, v)


def flat_base(n: int, level: float, amplitude: float, seed: int) -> list[float]:
    return list(level + np.random.default_rng(seed).uniform(-amplitude, amplitude, n))


def random_walk(seed: int, n: int = 120, drift: float = 0.0) -> Ohlcv:
    """A geometric random walk with lognormal volume: no pattern by construction."""
    rng = np.random.default_rng(seed)
    c = 100 * np.exp(np.cumsum(rng.normal(drift, 0.005, n)))
    o = np.concatenate([[100.0], c[:-1]])
    h = np.maximum(o, c) * (1 + np.abs(rng.normal(0, 0.002, n)))
    lo = np.minimum(o, c) * (1 - np.abs(rng.normal(0, 0.002, n)))
    return Ohlcv(o, h, lo, c, rng.lognormal(10, 0.3, n))


def downtrend(n: int = 120) -> Ohlcv:
    """A steady decline with small regular bounces and even volume."""
    closes = [100 - 0.3 * i + (0.15 if i % 3 == 0 else 0.0) for i in range(n)]
    return from_closes(closes, wick=0.1)


# --------------------------------------------------------------------------------------------------------------
# Series that contain each pattern
# --------------------------------------------------------------------------------------------------------------


def bull_flag_series() -> Ohlcv:
    base = flat_base(30, 100, 0.3, seed=1)
    pole = [100.5, 102, 103.5, 105, 106.5, 108]  # +8 in 6 bars on heavy volume
    flag = [107.6, 107.3, 107.5, 107.1, 106.9, 107.2]  # drifts sideways-down in the pole's top quarter, quietly
    return from_closes(base + pole + flag, volumes=[1000] * 30 + [3000] * 6 + [800] * 6)


def test_bull_flag_detected_with_its_levels() -> None:
    data = bull_flag_series()
    hit = detect_bull_flag(*data)
    assert hit is not None and hit.name == "bull_flag" and hit.direction == "bullish"
    assert hit.levels["pole_high"] == pytest.approx(108.1)  # top close 108 + wick
    assert hit.levels["breakout_level"] == pytest.approx(float(data.high[-6:].max()))  # the flag's highest high
    assert hit.levels["pivot_low"] == pytest.approx(106.8)  # lowest low of the flag
    pole = hit.levels["pole_high"] - hit.levels["pole_low"]
    assert 8 <= pole <= 8.6
    assert hit.levels["target"] == pytest.approx(hit.levels["breakout_level"] + pole, abs=1e-3)
    assert hit.confidence >= 0.7  # volume dried up in the flag and it retraced little
    assert "volume drying up" in hit.note


def test_bull_flag_not_detected_when_the_flag_gives_back_most_of_the_pole() -> None:
    base = flat_base(30, 100, 0.3, seed=1)
    pole = [100.5, 102, 103.5, 105, 106.5, 108]
    collapse = [106.5, 105, 103.8, 103, 102.6, 102.8]  # more than half the pole is gone
    assert detect_bull_flag(*from_closes(base + pole + collapse)) is None


def breakout_series(last_volume: float = 3000) -> Ohlcv:
    base = flat_base(40, 100, 0.5, seed=2)  # highs up to ~100.6
    return from_closes([*base, 101.2], volumes=[1000] * 40 + [last_volume])


def test_breakout_detected_with_its_levels() -> None:
    data = breakout_series()
    hit = detect_breakout(*data)
    assert hit is not None and hit.name == "breakout" and hit.direction == "bullish"
    prior_high = float(data.high[-21:-1].max())
    assert hit.levels["breakout_level"] == pytest.approx(prior_high, abs=1e-4)
    assert hit.levels["base_low"] == pytest.approx(float(data.low[-21:-1].min()), abs=1e-4)
    assert hit.levels["target"] == pytest.approx(2 * prior_high - hit.levels["base_low"], abs=1e-3)
    assert hit.levels["pivot_low"] < hit.levels["breakout_level"]
    assert "3.0x volume" in hit.note


def test_breakout_without_volume_is_not_a_breakout() -> None:
    assert detect_breakout(*breakout_series(last_volume=1100)) is None


def test_breakout_that_failed_back_into_the_range_is_not_reported() -> None:
    data = breakout_series()
    data = from_closes([*data.close, 100.0], volumes=[*data.volume, 1000])  # next bar closes back inside the old range
    assert detect_breakout(*data) is None


def consolidation_series() -> Ohlcv:
    rng = np.random.default_rng(3)
    advance = list(90 + np.cumsum(rng.normal(0.4, 1.0, 40)))  # volatile climb
    box = list(advance[-1] + rng.uniform(-0.15, 0.15, 15))  # then 15 tight bars
    return from_closes(advance + box, wick=0.1)


def test_consolidation_detected_with_its_box() -> None:
    data = consolidation_series()
    hit = detect_consolidation(*data)
    assert hit is not None and hit.name == "consolidation"
    assert hit.direction == "bullish"  # it follows an advance
    box_high, box_low = hit.levels["breakout_level"], hit.levels["pivot_low"]
    assert box_high - box_low < 2.0
    assert box_low <= float(data.close[-15:].min()) and box_high >= float(data.close[-15:].max())
    assert hit.levels["target"] == pytest.approx(2 * box_high - box_low, abs=1e-3)


def test_consolidation_not_detected_while_volatility_stays_the_same() -> None:
    rng = np.random.default_rng(3)
    closes = list(100 + np.cumsum(rng.normal(0, 1.0, 80)))  # same bar size throughout
    assert detect_consolidation(*from_closes(closes)) is None


def abcd_series(pullback_low: float = 105.4) -> Ohlcv:
    base = flat_base(20, 100, 0.3, seed=4)
    a_to_b = [100.0, 101.5, 103, 104.5, 106, 107.5, 109]  # A ~99.9 -> B 109.1, fast, on volume
    b_to_c = [108.2, 107.3, 106.6, 105.8, pullback_low]  # pullback to a higher low C
    c_up = [106.0, 106.8, 107.4]  # turning up from C
    return from_closes(base + a_to_b + b_to_c + c_up, volumes=[1000] * 20 + [3000] * 7 + [1200] * 5 + [1500] * 3)


def test_abcd_detected_with_its_points() -> None:
    hit = detect_abcd(*abcd_series())
    assert hit is not None and hit.name == "abcd" and hit.direction == "bullish"
    assert hit.levels["b"] == pytest.approx(109.1)
    assert hit.levels["c"] == pytest.approx(105.3)
    assert hit.levels["a"] == pytest.approx(99.9, abs=0.05)  # the foot of the surge, not an older dip
    assert hit.levels["breakout_level"] == hit.levels["b"] and hit.levels["pivot_low"] == hit.levels["c"]
    leg = hit.levels["b"] - hit.levels["a"]
    assert hit.levels["target"] == pytest.approx(hit.levels["c"] + leg, abs=1e-3)  # CD = AB
    assert "buy above B" in hit.note


def test_abcd_not_detected_when_the_pullback_erases_the_surge() -> None:
    # C at ~100.5 retraces over 90 % of AB: that is a failed move, not a higher low.
    base = flat_base(20, 100, 0.3, seed=4)
    closes = [*base, 100.0, 101.5, 103, 104.5, 106, 107.5, 109, 107, 105, 103, 101.5, 100.6, 101.6, 102.5, 103.2]
    assert detect_abcd(*from_closes(closes)) is None


def cup_and_handle_series() -> Ohlcv:
    lead = list(np.linspace(92, 110, 15))  # the advance into the left rim
    cup = list(100 + 10 * np.linspace(-1, 1, 41) ** 2)  # a rounded U from 110 down to 100 and back
    handle = [109.0, 108.2, 107.6, 107.9, 108.3]  # a shallow, quiet dip under the rim
    closes = np.array(lead + cup + handle) + np.random.default_rng(5).uniform(-0.15, 0.15, 61)
    return from_closes(closes, wick=0.3, volumes=[1000] * 56 + [600] * 5)


def test_cup_and_handle_detected_with_its_levels() -> None:
    data = cup_and_handle_series()
    hit = detect_cup_and_handle(*data)
    assert hit is not None and hit.name == "cup_and_handle" and hit.direction == "bullish"
    assert hit.levels["cup_low"] == pytest.approx(float(data.low[15:56].min()))
    assert 109.5 <= hit.levels["left_rim"] <= 111 and 109.5 <= hit.levels["breakout_level"] <= 111
    assert 107 <= hit.levels["pivot_low"] <= 108  # the handle's low
    depth = min(hit.levels["left_rim"], hit.levels["breakout_level"]) - hit.levels["cup_low"]
    assert hit.levels["target"] == pytest.approx(hit.levels["breakout_level"] + depth, abs=1e-3)


def test_v_shaped_drop_and_recovery_is_not_a_cup() -> None:
    lead = list(np.linspace(92, 110, 15))
    v_shape = list(110 - 10 * (1 - np.abs(np.linspace(-1, 1, 41))))  # straight down, straight up
    handle = [109.0, 108.2, 107.6, 107.9, 108.3]
    closes = np.array(lead + v_shape + handle) + np.random.default_rng(5).uniform(-0.15, 0.15, 61)
    assert detect_cup_and_handle(*from_closes(closes, wick=0.3)) is None


# --------------------------------------------------------------------------------------------------------------
# Series that contain none of them
# --------------------------------------------------------------------------------------------------------------

DETECTORS = [pytest.param(detector, id=detector.__name__) for detector in PATTERN_DETECTORS]


@pytest.mark.parametrize("detector", DETECTORS)
def test_random_walk_with_fixed_seed_is_not_a_pattern(detector: Detector) -> None:
    assert detector(*random_walk(seed=7)) is None


@pytest.mark.parametrize("detector", DETECTORS)
def test_downtrend_is_not_a_pattern(detector: Detector) -> None:
    assert detector(*downtrend()) is None


@pytest.mark.parametrize("detector", DETECTORS)
def test_detectors_rarely_fire_on_random_walks(detector: Detector) -> None:
    # A detector that fires on noise is worthless to the model; allow the odd lookalike, not a habit.
    fired = sum(detector(*random_walk(seed)) is not None for seed in range(100))
    assert fired <= 10


@pytest.mark.parametrize("detector", DETECTORS)
def test_detectors_return_none_on_too_little_or_flat_data(detector: Detector) -> None:
    assert detector(*from_closes([100.0] * 5)) is None
    flat = Ohlcv(*(np.full(60, 100.0) for _ in range(4)), np.full(60, 1000.0))
    assert detector(*flat) is None


def test_each_constructed_pattern_is_found_by_its_own_detector() -> None:
    series = {
        "bull_flag": bull_flag_series(),
        "breakout": breakout_series(),
        "consolidation": consolidation_series(),
        "abcd": abcd_series(),
        "cup_and_handle": cup_and_handle_series(),
    }
    for name, data in series.items():
        hits = [hit for detector in PATTERN_DETECTORS if (hit := detector(*data)) is not None]
        assert name in {hit.name for hit in hits}, name
        assert all(0 <= hit.confidence <= 1 for hit in hits)


def test_mismatched_array_lengths_are_refused() -> None:
    o, h, lo, c, v = bull_flag_series()
    with pytest.raises(ValueError, match="same length"):
        detect_bull_flag(o, h, lo, c[:-1], v)


# --------------------------------------------------------------------------------------------------------------
# Candlesticks (TA-Lib)
# --------------------------------------------------------------------------------------------------------------


def falling_bars() -> tuple[list[float], list[float], list[float], list[float], float]:
    o: list[float] = []
    h: list[float] = []
    lo: list[float] = []
    c: list[float] = []
    price = 100.0
    for _ in range(12):  # 12 bearish bars, each one point lower
        o.append(price)
        c.append(price - 1)
        h.append(price + 0.2)
        lo.append(price - 1.2)
        price -= 1
    return o, h, lo, c, price


def test_hammer_after_a_decline_fires_bullish() -> None:
    o, h, lo, c, price = falling_bars()
    # small body at the top, long lower shadow, almost no upper shadow
    o.append(price - 0.3)
    c.append(price - 0.1)
    h.append(price - 0.05)
    lo.append(price - 2.5)
    hits = detect_candlesticks(*(np.array(x) for x in (o, h, lo, c)))
    assert {"name": "hammer", "direction": "bullish", "bars_ago": 0} in [hit.model_dump() for hit in hits]


def test_bullish_engulfing_fires_and_carries_its_sign() -> None:
    o, h, lo, c, price = falling_bars()
    o.append(price - 0.2)  # opens below the last close, closes above the last open
    c.append(price + 1.3)
    h.append(price + 1.4)
    lo.append(price - 0.3)
    hits = detect_candlesticks(*(np.array(x) for x in (o, h, lo, c)))
    assert {"name": "engulfing", "direction": "bullish", "bars_ago": 0} in [hit.model_dump() for hit in hits]


def test_bearish_engulfing_after_a_rise_is_bearish() -> None:
    o, h, lo, c = [], [], [], []
    price = 100.0
    for _ in range(12):
        o.append(price)
        c.append(price + 1)
        h.append(price + 1.2)
        lo.append(price - 0.2)
        price += 1
    o.append(price + 0.2)
    c.append(price - 1.3)
    h.append(price + 0.3)
    lo.append(price - 1.4)
    hits = detect_candlesticks(*(np.array(x) for x in (o, h, lo, c)))
    assert {"name": "engulfing", "direction": "bearish", "bars_ago": 0} in [hit.model_dump() for hit in hits]


def test_quiet_identical_bars_fire_no_reversal_pattern() -> None:
    n = 20
    hits = detect_candlesticks(np.full(n, 100.0), np.full(n, 101.0), np.full(n, 99.5), np.full(n, 100.8))
    assert not {"hammer", "engulfing", "morning_star", "evening_star"} & {hit.name for hit in hits}


def test_candlesticks_only_look_at_recent_bars() -> None:
    o, h, lo, c, price = falling_bars()
    o.append(price - 0.3)
    c.append(price - 0.1)
    h.append(price - 0.05)
    lo.append(price - 2.5)
    for _ in range(5):  # five more ordinary bars push the hammer out of the window
        last = c[-1]
        o.append(last)
        c.append(last + 0.1)
        h.append(last + 0.3)
        lo.append(last - 0.2)
    hits = detect_candlesticks(*(np.array(x) for x in (o, h, lo, c)), recent=3)
    assert "hammer" not in {hit.name for hit in hits}
    assert all(hit.bars_ago < 3 for hit in hits)


# --------------------------------------------------------------------------------------------------------------
# Swing lows
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lows", "expected"),
    [
        # two swing lows (3.0 at index 2, 4.5 at index 7): the most recent one that still holds wins
        ([5, 4, 3, 4, 5, 6, 5, 4.5, 5, 6, 7], 4.5),
        # the last bar undercut 4.5 (and cannot be a swing itself yet): fall back to 3.0
        ([5, 4, 3, 4, 5, 6, 5, 4.5, 5, 6, 4.4], 3.0),
        # a steady fall has no swing low
        ([10, 9, 8, 7, 6, 5, 4, 3], None),
        # too short to have bars on both sides
        ([5, 4], None),
    ],
)
def test_swing_low(lows: list[float], expected: float | None) -> None:
    assert swing_low(np.array(lows, dtype=float), lookback=20) == expected


def test_swing_low_respects_the_lookback() -> None:
    lows = [5, 4, 3, 4, 5] + [6 + 0.1 * i for i in range(30)]  # the only swing low is 30+ bars back
    assert swing_low(lows, lookback=20) is None
    assert swing_low(lows, lookback=40) == 3.0


# --------------------------------------------------------------------------------------------------------------
# The patterns tool against the real SimExchange
# --------------------------------------------------------------------------------------------------------------


def test_patterns_report_on_sim_bars_is_compact_and_consistent() -> None:
    now = datetime(2026, 11, 20, 10, 15, tzinfo=HKT)
    sim = SimExchange(seed=42, clock=lambda: now)
    service = MarketService(sim, lambda: now)
    report = service.patterns("700", "5m")
    bars = sim.klines("HK.00700", "5m", 120)
    assert report.symbol == "HK.00700" and report.timeframe == "5m"
    assert report.bars == len(bars) and report.as_of == bars[-1].time
    assert report.last_price == float(bars[-1].close)
    if report.swing_low is not None:
        assert report.swing_low <= min(float(b.low) for b in bars[-3:])
    assert len(report.model_dump_json()) < 4000  # no raw K-line arrays reach the model
    daily = service.patterns("9988", "1d")
    assert daily.timeframe == "1d" and daily.bars == 120
