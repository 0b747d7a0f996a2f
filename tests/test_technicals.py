"""Technicals on constructed series (closed-form and hand-computed values), and the MarketService layer
(quotes, scan, K-line cache, technicals) against the real SimExchange."""

from __future__ import annotations

import math
from collections import Counter
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from brokers.base import Bar, MarketState, NewsItem, Quote
from brokers.sim import SimExchange
from config.errors import JournalError
from data.database import Journal, PgKlineCache
from data.market import (
    SCAN_MAX_LIMIT,
    KlineCache,
    MarketService,
    MemoryKlineCache,
    UnknownSymbol,
    compute_technicals,
    scan_score,
    volume_ratio,
)

HKT = ZoneInfo("Asia/Hong_Kong")
T0 = datetime(2026, 6, 1, tzinfo=HKT)


def make_bars(
    closes: list[float],
    spread: float = 0.05,
    volumes: list[int] | None = None,
) -> list[Bar]:
    """Daily bars around ``closes``: open at the previous close, high/low ``spread`` beyond the body."""
    bars = []
    for i, close in enumerate(closes):
        open_ = closes[i - 1] if i else close
        bars.append(
            Bar(
                time=T0 + timedelta(days=i),
                open=Decimal(str(round(open_, 4))),
                high=Decimal(str(round(max(open_, close) + spread, 4))),
                low=Decimal(str(round(min(open_, close) - spread, 4))),
                close=Decimal(str(round(close, 4))),
                volume=volumes[i] if volumes else 1000,
            )
        )
    return bars


# --------------------------------------------------------------------------------------------------------------
# Pure computation
# --------------------------------------------------------------------------------------------------------------


def test_linear_ramp_matches_closed_form_values() -> None:
    # closes 10.0, 10.1, ... 21.9. On a straight line an N-period SMA lags by (N-1)/2 steps, and TA-Lib's EMA
    # (seeded with the SMA) sits exactly on that fixed point, so EMA = SMA; MACD = EMA12 - EMA26 = (25-11)/2 steps.
    closes = [10 + 0.1 * t for t in range(120)]
    bars = make_bars(closes, spread=0.0)
    # With open = previous close and no wicks, each bar's true range is the 0.1 step.
    t = compute_technicals("HK.00700", "1d", bars)
    assert t.last_price == pytest.approx(21.9)
    assert t.sma_9 == pytest.approx(21.9 - 0.4)
    assert t.sma_20 == pytest.approx(21.9 - 0.95)
    assert t.sma_50 == pytest.approx(21.9 - 2.45)
    assert t.ema_9 == pytest.approx(21.5)
    assert t.ema_20 == pytest.approx(20.95)
    assert t.ema_50 == pytest.approx(19.45)
    assert t.macd == pytest.approx(0.7)
    assert t.macd_signal == pytest.approx(0.7)
    assert t.macd_hist == pytest.approx(0.0, abs=1e-4)
    assert t.rsi_14 == 100.0  # no down closes at all
    assert t.atr_14 == pytest.approx(0.1)
    assert t.atr_pct == pytest.approx(round(0.1 / 21.9 * 100, 2))
    assert t.bars == 120 and t.as_of == bars[-1].time


def test_atr_with_wicks_takes_the_gap_to_the_previous_close() -> None:
    # high = c + 0.05, low = c - 0.05 with a 0.1 step: the true range is high - previous close = 0.15.
    closes = [10 + 0.1 * t for t in range(40)]
    bars = [
        Bar(
            time=T0 + timedelta(days=i),
            open=Decimal(str(round(c, 2))),
            high=Decimal(str(round(c + 0.05, 3))),
            low=Decimal(str(round(c - 0.05, 3))),
            close=Decimal(str(round(c, 2))),
            volume=1,
        )
        for i, c in enumerate(closes)
    ]
    assert compute_technicals("HK.00700", "1d", bars).atr_14 == pytest.approx(0.15)


def test_rsi_matches_wilder_by_hand() -> None:
    # 14 changes: ten of +1, four of -0.5 -> first RSI = 100 * (10/14) / (10/14 + 2/14) = 83.33
    changes = [1, 1, -0.5, 1, 1, 1, -0.5, 1, 1, -0.5, 1, 1, 1, -0.5]
    closes = [20.0]
    for change in changes:
        closes.append(closes[-1] + change)
    assert compute_technicals("HK.00700", "1d", make_bars(closes)).rsi_14 == 83.33
    # one more change of -1: Wilder smoothing, avg = (prev * 13 + this) / 14
    closes.append(closes[-1] - 1)
    gain = (10 / 14 * 13 + 0) / 14
    loss = (2 / 14 * 13 + 1) / 14
    assert compute_technicals("HK.00700", "1d", make_bars(closes)).rsi_14 == round(100 * gain / (gain + loss), 2)


def test_short_history_gives_none_not_nan() -> None:
    bars = make_bars([10 + 0.1 * t for t in range(10)])
    t = compute_technicals("HK.00700", "5m", bars)
    assert t.sma_9 == pytest.approx(10.5)  # 9 bars are enough for SMA 9
    for name in ("sma_20", "sma_50", "ema_20", "ema_50", "rsi_14", "macd", "macd_signal", "macd_hist", "atr_14"):
        assert getattr(t, name) is None, name
    assert t.atr_pct is None
    for value in t.model_dump().values():
        assert not (isinstance(value, float) and math.isnan(value))
    assert "NaN" not in t.model_dump_json()
    assert not any("sma50" in word or "sma20" in word for word in t.trend)


def test_no_bars_at_all_gives_an_empty_report() -> None:
    t = compute_technicals("HK.00700", "1d", [])
    assert t.bars == 0 and t.as_of is None and t.last_price is None and t.rsi_14 is None and t.trend == []


def test_prices_are_rounded_to_three_decimals_and_sub_dollar_to_four() -> None:
    t = compute_technicals("HK.00700", "1d", make_bars([10 + t / 7 for t in range(60)]))
    assert t.sma_20 == round(t.sma_20 or 0, 3) and t.sma_20 != round(t.sma_20 or 0, 2)
    penny = compute_technicals("HK.00001", "1d", make_bars([0.5 + t / 7000 for t in range(60)], spread=0.001))
    assert penny.sma_20 == round(penny.sma_20 or 0, 4) and penny.sma_20 != round(penny.sma_20 or 0, 3)
    assert penny.rsi_14 == round(penny.rsi_14 or 0, 2)


@pytest.mark.parametrize(
    ("direction", "expected", "absent"),
    [
        (
            1,
            {"above_sma20", "above_sma50", "sma20_above_sma50", "ema9_above_ema20", "rsi_overbought", "uptrend"},
            "downtrend",
        ),
        (
            -1,
            {"below_sma20", "below_sma50", "sma20_below_sma50", "ema9_below_ema20", "rsi_oversold", "downtrend"},
            "uptrend",
        ),
    ],
)
def test_trend_words(direction: int, expected: set[str], absent: str) -> None:
    closes = [50 + direction * 0.2 * t for t in range(80)]
    t = compute_technicals("HK.00700", "1d", make_bars(closes))
    assert expected <= set(t.trend)
    assert absent not in t.trend


def test_volume_ratio_uses_exactly_the_previous_20_days() -> None:
    prior = [1_000_000] * 5 + [1000] * 20  # the five big old days are outside the 20-day window
    assert volume_ratio(3000, prior) == 3.0
    assert volume_ratio(1500, [1000] * 19 + [2000]) == pytest.approx(1500 / 1050, abs=0.005)
    assert volume_ratio(3000, [1000] * 19) is None  # not enough history
    assert volume_ratio(None, prior) is None
    assert volume_ratio(3000, [0] * 20) is None
    t = compute_technicals("HK.00700", "1d", make_bars([10.0] * 30), today_volume=4500, prior_daily_volumes=prior)
    assert t.volume_ratio == 4.5
    assert "high_volume" in t.trend


def test_scan_score_is_momentum_amplified_by_volume() -> None:
    assert scan_score(0.0, 5.0) == 0.0  # no move, no score, whatever the volume
    assert scan_score(2.5, 1.0) == 0.5
    assert scan_score(2.5, 4.0) == 1.0  # 4x volume doubles it
    assert scan_score(2.5, 16.0) == 1.0  # and no more
    assert scan_score(10.0, 1.0) == 1.0  # momentum saturates at 5 %
    assert scan_score(-3.0, 4.0) < scan_score(-3.0, 1.0) < 0  # heavy selling ranks lowest
    assert scan_score(2.5, None) == scan_score(2.5, 1.0)


# --------------------------------------------------------------------------------------------------------------
# The service against the real SimExchange
# --------------------------------------------------------------------------------------------------------------


class MutableClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class CountingSource:
    """A real SimExchange with a tally of the requests the service makes to it."""

    def __init__(self, inner: SimExchange) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()
        self.snapshot_sizes: list[int] = []

    def snapshots(self, symbols: list[str]) -> list[Quote]:
        self.calls["snapshots"] += 1
        self.snapshot_sizes.append(len(symbols))
        return self.inner.snapshots(symbols)

    def klines(self, symbol: str, timeframe: str, count: int) -> list[Bar]:
        self.calls["klines"] += 1
        return self.inner.klines(symbol, timeframe, count)

    def index_constituents(self, index: str) -> list[str]:
        self.calls["index_constituents"] += 1
        return self.inner.index_constituents(index)

    def news(self, symbol: str, since: datetime) -> list[NewsItem]:
        self.calls["news"] += 1
        return self.inner.news(symbol, since)

    def market_state(self) -> MarketState | None:
        self.calls["market_state"] += 1
        return self.inner.market_state()


FRIDAY_MORNING = datetime(2026, 11, 20, 10, 15, tzinfo=HKT)
SATURDAY = datetime(2026, 11, 21, 10, 0, tzinfo=HKT)


def make_service(
    now: datetime, cache: KlineCache | None = None, **options: Any
) -> tuple[MarketService, CountingSource, MutableClock]:
    clock = MutableClock(now)
    source = CountingSource(SimExchange(seed=42, clock=clock))
    return MarketService(source, clock, cache, **options), source, clock


def test_quotes_for_many_symbols_make_exactly_one_snapshot_call() -> None:
    service, source, _ = make_service(FRIDAY_MORNING)
    asked = ["700", "0005", "HK.09988", "9988", "1810.HK", "939", "1299", "388"]
    quotes = service.quotes(asked)
    assert source.calls["snapshots"] == 1
    assert source.snapshot_sizes == [7]  # the duplicate 9988 is asked once
    assert [q.symbol for q in quotes] == [
        "HK.00700",
        "HK.00005",
        "HK.09988",
        "HK.01810",
        "HK.00939",
        "HK.01299",
        "HK.00388",
    ]


def test_quote_of_an_unknown_symbol_is_a_clear_error() -> None:
    service, _, _ = make_service(FRIDAY_MORNING)
    with pytest.raises(UnknownSymbol, match=r"No quote for HK\.08888") as caught:
        service.quotes(["700", "8888"])
    assert caught.value.symbols == ["HK.08888"]
    with pytest.raises(UnknownSymbol, match="not a Hong Kong stock code"):
        service.quote("TENCENT")
    assert isinstance(caught.value, ValueError)


def test_scan_ranks_by_score_and_respects_the_limit() -> None:
    service, source, _ = make_service(FRIDAY_MORNING)
    rows = service.scan("HSI", limit=5)
    assert source.calls["snapshots"] == 1
    assert len(rows) == 5
    assert [row.rank for row in rows] == [1, 2, 3, 4, 5]
    assert [row.score for row in rows] == sorted((row.score for row in rows), reverse=True)
    # Every row's score is the published formula of its own quote, and nothing left out beats the last row.
    everything = service.scan("HSI", limit=50)
    for row in everything:
        quote = source.inner.quote(row.symbol)
        assert quote.prev_close is not None
        change_pct = float((quote.last_price - quote.prev_close) / quote.prev_close * 100)
        assert row.score == scan_score(change_pct, quote.volume_ratio)
        assert row.change_pct == round(change_pct, 2)
    assert rows == everything[:5]
    assert len(everything) == len(source.inner.index_constituents("HSI"))


def test_scan_limit_is_capped_and_the_index_is_respected() -> None:
    service, source, _ = make_service(FRIDAY_MORNING)
    assert len(service.scan("HSI", limit=0)) == 1
    assert len(service.scan("ALL", limit=10_000)) <= SCAN_MAX_LIMIT
    tech = service.scan("hstech", limit=50)
    assert {row.symbol for row in tech} == set(source.inner.index_constituents("HSTECH"))
    with pytest.raises(ValueError, match="choose one of HSI, HSCEI, HSTECH, ALL"):
        service.scan("NASDAQ")


def test_scan_excludes_suspended_stocks() -> None:
    service, source, _ = make_service(FRIDAY_MORNING)
    top = service.scan("HSI", limit=1)[0].symbol
    source.inner.set_suspended(top, True)
    assert top not in {row.symbol for row in service.scan("HSI", limit=50)}


def test_daily_kline_cache_hit_avoids_a_second_source_request() -> None:
    cache = MemoryKlineCache()
    service, source, _ = make_service(SATURDAY, cache)
    first = service.klines("700", "1d", 60)
    assert source.calls["klines"] == 1
    assert service.klines("0700", "1d", 60) == first
    assert service.klines("HK.00700", "1d", 30) == first[-30:]
    assert source.calls["klines"] == 1
    assert source.calls["snapshots"] == 0  # the market is closed: no bar in progress to complete

    # A new process (new service) with the same persistent cache asks the source nothing.
    again, fresh_source, _ = make_service(SATURDAY, cache)
    assert again.klines("700", "1d", 60) == first
    assert fresh_source.calls["klines"] == 0
    assert first == source.inner.klines("HK.00700", "1d", 60)


def test_daily_cache_during_trading_completes_today_from_the_quote() -> None:
    cache = MemoryKlineCache()
    service, _, _ = make_service(FRIDAY_MORNING, cache)
    first = service.klines("700", "1d", 40)
    assert first[-1].time.date() == FRIDAY_MORNING.date()  # today's bar, still forming
    # Only completed sessions were stored: today's bar is not final.
    stored = cache.get("HK.00700", "1d", FRIDAY_MORNING - timedelta(days=90)) or []
    assert stored and stored[-1].time.date() < FRIDAY_MORNING.date()

    fresh, fresh_source, _ = make_service(FRIDAY_MORNING, cache)
    second = fresh.klines("700", "1d", 40)
    assert fresh_source.calls["klines"] == 0
    assert second == first  # today's bar rebuilt from the snapshot matches the source's own
    assert fresh_source.calls["snapshots"] == 1


def test_daily_cache_is_refreshed_once_a_new_session_completes() -> None:
    service, source, clock = make_service(SATURDAY)
    service.klines("700", "1d", 20)
    clock.now = datetime(2026, 11, 23, 17, 0, tzinfo=HKT)  # Monday after the close: a new final bar exists
    bars = service.klines("700", "1d", 20)
    assert source.calls["klines"] == 2
    assert bars[-1].time.date() == clock.now.date()


def test_intraday_klines_are_cached_for_the_ttl_only() -> None:
    service, source, clock = make_service(FRIDAY_MORNING)
    first = service.klines("700", "5m", 50)
    assert service.klines("700", "5m", 20) == first[-20:]
    assert source.calls["klines"] == 1
    clock.now = FRIDAY_MORNING + timedelta(minutes=5)
    later = service.klines("700", "5m", 50)
    assert source.calls["klines"] == 2
    assert later[-1].time > first[-1].time


def test_service_technicals_volume_ratio_against_the_previous_20_sessions() -> None:
    service, source, _ = make_service(FRIDAY_MORNING)
    quote = source.inner.quote("HK.00700")
    daily = source.inner.klines("HK.00700", "1d", 21)
    assert daily[-1].time.date() == FRIDAY_MORNING.date()  # the last one is today's, excluded from the mean
    mean = sum(bar.volume for bar in daily[:-1]) / 20
    t = service.technicals("700")
    assert t.volume_ratio == round(quote.volume / mean, 2)
    assert t.volume_pace_ratio == quote.volume_ratio
    assert t.last_price == float(quote.last_price)
    assert t.timeframe == "1d" and t.bars >= 100
    assert t.rsi_14 is not None and 0 <= t.rsi_14 <= 100
    assert t.sma_50 is not None and t.ema_50 is not None and t.atr_14 is not None


def test_service_technicals_on_a_weekend_compare_the_last_session_with_the_20_before() -> None:
    service, source, _ = make_service(SATURDAY)
    daily = source.inner.klines("HK.00700", "1d", 21)  # ends with Friday, complete
    mean = sum(bar.volume for bar in daily[:-1]) / 20
    t = service.technicals("700")
    assert t.volume_ratio == round(daily[-1].volume / mean, 2)


def test_service_technicals_intraday_timeframe() -> None:
    service, _, _ = make_service(FRIDAY_MORNING)
    t = service.technicals("9988", "15m")
    assert t.timeframe == "15m"
    assert t.as_of is not None and t.as_of <= FRIDAY_MORNING
    with pytest.raises(ValueError, match="Unknown timeframe '2h'"):
        service.technicals("9988", "2h")


def test_daily_cache_on_the_real_postgres_journal(journal: Journal) -> None:
    cache = PgKlineCache(journal)
    service, source, _ = make_service(SATURDAY, cache)
    first = service.klines("700", "1d", 60)
    assert source.calls["klines"] == 1
    fresh, fresh_source, _ = make_service(SATURDAY, cache)
    again = fresh.klines("700", "1d", 60)
    assert fresh_source.calls["klines"] == 0
    assert again == first
    assert all(bar.time.tzinfo == HKT and bar.time.hour == 0 for bar in again)  # session dates, in HKT


class BrokenCache:
    """A persistent cache whose database is down."""

    def get(self, symbol: str, timeframe: str, since: datetime) -> list[Bar] | None:
        raise JournalError("could not read kline_cache: connection refused")

    def put(self, symbol: str, timeframe: str, bars: list[Bar]) -> None:
        raise JournalError("could not write kline_cache: connection refused")


def test_a_failing_persistent_cache_falls_back_to_the_source() -> None:
    service, source, _ = make_service(SATURDAY, BrokenCache())
    bars = service.klines("700", "1d", 30)
    assert len(bars) == 30 and source.calls["klines"] == 1
    fresh, fresh_source, _ = make_service(SATURDAY, BrokenCache())
    assert fresh.klines("700", "1d", 30) == bars
    assert fresh_source.calls["klines"] == 1


# --------------------------------------------------------------------------------------------------------------
# The short-lived quote cache (fake clock: nothing sleeps)
# --------------------------------------------------------------------------------------------------------------


def test_a_second_quote_within_the_ttl_asks_the_source_nothing() -> None:
    service, source, clock = make_service(FRIDAY_MORNING, quote_ttl_s=5)
    first = service.quote("700")
    clock.now = FRIDAY_MORNING + timedelta(seconds=4.9)
    assert service.quote("HK.00700") is first
    assert service.quotes(["0700", "700"]) == [first]
    assert source.calls["snapshots"] == 1


def test_a_quote_is_never_served_once_the_ttl_has_passed() -> None:
    service, source, clock = make_service(FRIDAY_MORNING, quote_ttl_s=5)
    first = service.quote("700")
    clock.now = FRIDAY_MORNING + timedelta(seconds=5)  # exactly the TTL: already too old
    service.quote("700")
    assert source.calls["snapshots"] == 2
    clock.now = FRIDAY_MORNING + timedelta(minutes=2)  # a later minute bar: the source's new price comes back
    later = service.quote("700")
    assert source.calls["snapshots"] == 3
    assert later == source.inner.quote("HK.00700") and later.updated_at > first.updated_at


def test_a_clock_that_steps_back_makes_the_cached_quote_stale() -> None:
    service, source, clock = make_service(FRIDAY_MORNING, quote_ttl_s=5)
    service.quote("700")
    clock.now = FRIDAY_MORNING - timedelta(seconds=1)
    service.quote("700")
    assert source.calls["snapshots"] == 2


def test_fresh_and_invalidate_force_a_new_read() -> None:
    service, source, _ = make_service(FRIDAY_MORNING, quote_ttl_s=5)
    before = service.quote("700")
    service.quote("5")
    source.inner.apply_shock("HK.00700", -0.05)
    assert service.quote("700") is before  # within the TTL the cache still answers
    shocked = service.quote("700", fresh=True)
    assert shocked.last_price < before.last_price
    assert source.calls["snapshots"] == 3
    service.invalidate(["HK.00005"])
    service.quotes(["700", "5"])  # 700 still cached, 5 forgotten: one request for 5 alone
    assert source.calls["snapshots"] == 4 and source.snapshot_sizes[-1] == 1
    service.invalidate()
    service.quotes(["700", "5"])
    assert source.calls["snapshots"] == 5 and source.snapshot_sizes[-1] == 2


def test_only_the_symbols_not_cached_are_requested_and_in_one_call() -> None:
    service, source, _ = make_service(FRIDAY_MORNING)
    service.quote("700")
    quotes = service.quotes(["700", "5", "9988"])
    assert [q.symbol for q in quotes] == ["HK.00700", "HK.00005", "HK.09988"]
    assert source.snapshot_sizes == [1, 2]


def test_an_unknown_symbol_is_not_cached_and_is_asked_again() -> None:
    service, source, _ = make_service(FRIDAY_MORNING)
    for _ in range(2):
        with pytest.raises(UnknownSymbol, match=r"No quote for HK\.08888"):
            service.quotes(["700", "8888"])
    assert source.snapshot_sizes == [2, 1]  # 700 came from the cache the second time, 8888 was asked again


def test_ttl_zero_turns_the_cache_off() -> None:
    service, source, _ = make_service(FRIDAY_MORNING, quote_ttl_s=0)
    service.quote("700")
    service.quote("700")
    service.market_state()
    service.market_state()
    assert source.calls["snapshots"] == 2 and source.calls["market_state"] == 2
    with pytest.raises(ValueError, match="TTLs must be >= 0 seconds"):
        MarketService(source, MutableClock(FRIDAY_MORNING), quote_ttl_s=-1)


def test_a_scan_reads_fresh_snapshots_and_leaves_them_for_the_quotes_that_follow() -> None:
    service, source, clock = make_service(FRIDAY_MORNING)
    rows = service.scan("HSI", limit=3)
    assert source.calls["snapshots"] == 1
    assert [q.symbol for q in service.quotes([row.symbol for row in rows])] == [row.symbol for row in rows]
    assert source.calls["snapshots"] == 1
    service.scan("HSI", limit=3)  # a scan is a new look at the market: always one request
    assert source.calls["snapshots"] == 2
    clock.now = FRIDAY_MORNING + timedelta(seconds=30)
    service.quote(rows[0].symbol)
    assert source.calls["snapshots"] == 3


def test_technicals_and_patterns_reuse_the_quote_the_service_holds() -> None:
    service, source, _ = make_service(FRIDAY_MORNING, MemoryKlineCache())
    service.scan("ALL", limit=5)
    symbol = service.scan("ALL", limit=1)[0].symbol
    before = source.calls["snapshots"]
    service.quote(symbol)
    service.technicals(symbol, "1d")
    service.patterns(symbol, "1d")
    service.patterns(symbol, "5m")
    assert source.calls["snapshots"] == before  # every quote came from the scan's snapshot


def test_index_constituents_are_read_once_per_service() -> None:
    service, source, _ = make_service(FRIDAY_MORNING)
    service.scan("HSI", limit=3)
    service.scan("hsi", limit=10)
    service.scan("ALL", limit=10)
    assert source.calls["index_constituents"] == 2  # HSI once, ALL once
    assert service.index_constituents("HSI") == source.inner.index_constituents("HSI")
    with pytest.raises(ValueError, match="choose one of HSI, HSCEI, HSTECH, ALL"):
        service.index_constituents("NASDAQ")


def test_the_market_state_is_read_at_most_once_per_ttl() -> None:
    service, source, clock = make_service(FRIDAY_MORNING, quote_ttl_s=5)
    assert service.market_state() == source.inner.market_state()
    service.market_state()
    assert source.calls["market_state"] == 1
    clock.now = FRIDAY_MORNING + timedelta(seconds=6)
    service.market_state()
    assert source.calls["market_state"] == 2
    service.invalidate()
    service.market_state()
    assert source.calls["market_state"] == 3


def test_naive_mode_asks_once_per_symbol_and_remembers_nothing() -> None:
    service, source, _ = make_service(FRIDAY_MORNING, quote_ttl_s=0, batch=False)
    quotes = service.quotes(["700", "5", "9988"])
    assert source.snapshot_sizes == [1, 1, 1]
    rows = service.scan("HSI", limit=50)
    constituents = source.inner.index_constituents("HSI")
    assert source.calls["snapshots"] == 3 + len(constituents)
    service.scan("HSI", limit=50)
    assert source.calls["index_constituents"] == 2
    # The same answers as the batched, cached service.
    batched, _, _ = make_service(FRIDAY_MORNING)
    assert batched.quotes(["700", "5", "9988"]) == quotes
    assert batched.scan("HSI", limit=50) == rows


class DictConstituentCache:
    """A dictionary standing in for the PostgreSQL constituent cache (which has its own test)."""

    def __init__(self) -> None:
        self.stored: dict[tuple[str, object], list[str]] = {}

    def get(self, index_name: str, trading_date: object) -> list[str] | None:
        return self.stored.get((index_name, trading_date))

    def put(self, index_name: str, trading_date: object, symbols: list[str]) -> None:
        self.stored[(index_name, trading_date)] = list(symbols)


def test_constituents_are_read_once_a_day_across_runs() -> None:
    cache = DictConstituentCache()
    now = FRIDAY_MORNING
    first = CountingSource(SimExchange(seed=42, clock=lambda: now))
    MarketService(first, lambda: now, constituent_cache=cache).scan("ALL", 5)
    assert first.calls["index_constituents"] == 1
    later = CountingSource(SimExchange(seed=42, clock=lambda: now))  # the afternoon's new process
    rows = MarketService(later, lambda: now, constituent_cache=cache).scan("ALL", 5)
    assert later.calls["index_constituents"] == 0 and len(rows) == 5
    monday = now + timedelta(days=3)
    nextday = CountingSource(SimExchange(seed=42, clock=lambda: monday))
    MarketService(nextday, lambda: monday, constituent_cache=cache).scan("ALL", 5)
    assert nextday.calls["index_constituents"] == 1
