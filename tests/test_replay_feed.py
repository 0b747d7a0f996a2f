"""The replay feed: bars are visible only once they have ended, and reading past the clock raises in the feed.

The spike tests plant a price spike after the clock in the bars the feed reads (a ``BarStore`` built here, the
way a CSV would be) and run the real tool gate, market service, indicators and context over it.
"""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta
from decimal import Decimal

import numpy as np
import pytest

from replay.clock import HKT, ClockError, ReplayClock
from replay.feed import (
    DailyBar,
    LookaheadError,
    ReplayFeed,
    SessionBars,
    SyntheticStore,
    epoch,
    sessions_before,
)

DAY = date(2026, 9, 8)  # a Tuesday; seed 42 has a momentum entry at 13:00 on it
SYMBOL = "HK.00883"


def at(hhmm: str, day: date = DAY) -> datetime:
    return datetime.combine(day, datetime.strptime(hhmm, "%H:%M").time(), HKT)


class SpikedStore:
    """The synthetic market with every bar of ``symbol`` starting at or after ``after`` lifted by ``factor``."""

    def __init__(self, base: SyntheticStore, symbol: str | None, after: datetime, factor: float) -> None:
        self._base, self._symbol, self._after, self._factor = base, symbol, epoch(after), factor

    def instruments(self):
        return self._base.instruments()

    def _lifted(self, symbol: str, day: date) -> SessionBars | None:
        """The session's bars with the spike, or None when the spike does not touch them."""
        bars = self._base.session(symbol, day)
        if bars is None or (self._symbol is not None and symbol != self._symbol):
            return None
        late = bars.starts >= self._after
        if not late.any():
            return None
        lift = np.where(late, self._factor, 1.0)
        o, h, lo, c = (np.rint(a * lift).astype(np.int64) for a in (bars.open, bars.high, bars.low, bars.close))
        high, low = np.maximum(h, np.maximum(o, c)), np.minimum(lo, np.minimum(o, c))
        return SessionBars(bars.starts, o, high, low, c, bars.volume * np.where(late, 7, 1))

    def session(self, symbol: str, day: date) -> SessionBars | None:
        lifted = self._lifted(symbol, day)
        return lifted if lifted is not None else self._base.session(symbol, day)

    def daily(self, symbol: str, day: date) -> DailyBar | None:
        bars = self._lifted(symbol, day)
        if bars is None:
            return self._base.daily(symbol, day)
        return DailyBar(
            int(bars.open[0]), int(bars.high.max()), int(bars.low.min()), int(bars.close[-1]), int(bars.volume.sum())
        )

    def news(self, symbol: str, day: date):
        return self._base.news(symbol, day)


# --------------------------------------------------------------------------------------------- visibility


def test_a_minute_bar_is_visible_only_once_it_has_ended() -> None:
    clock = ReplayClock(at("10:00"))
    feed = ReplayFeed(SyntheticStore(42), clock)
    bars = feed.klines(SYMBOL, "1m", 5)
    assert bars[-1].time == at("09:59")  # the 10:00 bar has not ended at 10:00:00
    clock.advance_to(at("10:00") + timedelta(seconds=59))
    assert feed.klines(SYMBOL, "1m", 1)[-1].time == at("09:59")
    clock.advance_to(at("10:01"))
    assert feed.klines(SYMBOL, "1m", 1)[-1].time == at("10:00")


def test_at_the_open_today_has_no_bars_and_the_quote_is_yesterdays_close() -> None:
    feed = ReplayFeed(SyntheticStore(42), ReplayClock(at("09:30")))
    quote = feed.snapshots([SYMBOL])[0]
    yesterday = SyntheticStore(42).daily(SYMBOL, sessions_before(DAY, 1)[0])
    assert quote.last_price == Decimal(yesterday.close) / 1000 and quote.volume == 0 and quote.open_price is None
    assert feed.klines(SYMBOL, "1d", 3)[-1].time.date() < DAY  # no daily bar for today yet


def test_todays_daily_bar_is_the_partial_day_so_far() -> None:
    feed = ReplayFeed(SyntheticStore(42), ReplayClock(at("10:30")))
    minutes = feed.klines(SYMBOL, "1m", 60)  # 09:30..10:29
    today = feed.klines(SYMBOL, "1d", 1)[0]
    assert today.time.date() == DAY
    assert today.high == max(b.high for b in minutes) and today.low == min(b.low for b in minutes)
    assert today.close == minutes[-1].close and today.volume == sum(b.volume for b in minutes)
    whole = SyntheticStore(42).daily(SYMBOL, DAY)
    assert today.volume < whole.volume  # not the whole day's bar


def test_intraday_bars_never_span_lunch_and_the_open_bucket_holds_only_ended_minutes() -> None:
    feed = ReplayFeed(SyntheticStore(42), ReplayClock(at("13:03")))
    bars = feed.klines(SYMBOL, "5m", 4)
    assert [b.time for b in bars] == [at("11:45"), at("11:50"), at("11:55"), at("13:00")]
    assert bars[-1].volume == sum(b.volume for b in feed.klines(SYMBOL, "1m", 3))  # 13:00, 13:01, 13:02


# --------------------------------------------------------------------------------------- reading past it


def test_reading_past_the_clock_raises_in_the_feed() -> None:
    clock = ReplayClock(at("11:00"))
    feed = ReplayFeed(SyntheticStore(42), clock)
    with pytest.raises(LookaheadError, match="Look-ahead refused"):
        feed.session_bars(SYMBOL, DAY, until=at("11:01"))
    with pytest.raises(LookaheadError, match="Look-ahead refused"):
        list(feed.bars_between(SYMBOL, at("10:00"), at("15:00")))
    with pytest.raises(LookaheadError, match="Look-ahead refused"):
        feed.session_bars(SYMBOL, DAY + timedelta(days=1), until=at("11:00"))
    with pytest.raises(LookaheadError):
        feed._daily(SYMBOL, DAY + timedelta(days=1))
    # Up to the clock is fine, and ends with the last bar that ended before it.
    last = list(feed.bars_between(SYMBOL, at("10:00")))[-1][1]
    assert datetime.fromtimestamp(int(last.starts[-1]), HKT) == at("10:59")


def test_the_replay_clock_only_moves_forward() -> None:
    clock = ReplayClock(at("11:00"))
    with pytest.raises(ClockError, match="cannot go back"):
        clock.advance_to(at("10:59"))
    with pytest.raises(ClockError, match="timezone-aware"):
        clock.advance_to(datetime(2026, 9, 8, 12, 0))


def test_news_published_after_the_clock_is_not_visible() -> None:
    store = SyntheticStore(42)
    items = [i for s in store.instruments() for i in store.news(s, DAY)]
    later = min((i for i in items if i.published_at.hour >= 11), key=lambda i: i.published_at)
    feed = ReplayFeed(store, ReplayClock(later.published_at - timedelta(minutes=1)))
    assert later.url not in {i.url for i in feed.news(later.symbol, later.published_at - timedelta(days=1))}
    feed = ReplayFeed(store, ReplayClock(later.published_at))
    assert later.url in {i.url for i in feed.news(later.symbol, later.published_at - timedelta(days=1))}


# --------------------------------------------------------------------------------------- the planted spike


def _context(journal, feed, clock):
    import agent
    from config.settings import Settings
    from data.alerts import Alerter
    from replay.broker import ReplayBroker

    settings = Settings()
    settings = settings.model_copy(update={"broker": settings.broker.model_copy(update={"name": "sim"})})
    broker = ReplayBroker(
        feed, clock, starting_cash=Decimal(1_000_000), commission_pct=0.0003, min_commission=Decimal(3)
    )
    run = agent.Run(run_id="spiketest0001", journal=journal, alerter=Alerter(settings.alerts, None, journal))
    run.cycle_id = agent.begin_cycle(run, settings, "trade", clock(), broker_name="replay")
    return agent, agent.make_context(settings, run, broker, feed, clock, dry_run=False)


def _everything_the_model_can_read(journal, store, now: datetime) -> list[str]:
    from tool_executor import ToolGate

    clock = ReplayClock(now)
    feed = ReplayFeed(store, clock)
    agent, ctx = _context(journal, feed, clock)
    gate = ToolGate(ctx)
    calls = [
        ("scan_market", {"index": "ALL", "limit": 50}),
        ("get_quote", {"symbol": SYMBOL}),
        ("get_technicals", {"symbol": SYMBOL, "timeframe": "1d"}),
        ("get_technicals", {"symbol": SYMBOL, "timeframe": "5m"}),
        ("get_technicals", {"symbol": SYMBOL, "timeframe": "1m"}),
        ("detect_patterns", {"symbol": SYMBOL, "timeframe": "5m"}),
        ("detect_patterns", {"symbol": SYMBOL, "timeframe": "1d"}),
        ("get_news", {"symbol": SYMBOL, "hours": 24}),
        ("get_portfolio", {}),
    ]
    out = [json.dumps(gate.handle(name, args).result, sort_keys=True, default=str) for name, args in calls]
    out.append(agent.build_first_message(ctx, ctx.market_status(), "normal", None).replace(ctx.run_id[:12], "RUN"))
    return out


def test_a_spike_planted_after_the_clock_reaches_no_tool_result_context_or_indicator(journal) -> None:
    base = SyntheticStore(42)
    now = at("11:00")
    spiked = SpikedStore(base, SYMBOL, after=now, factor=1.8)
    clean_reads = _everything_the_model_can_read(journal, base, now)
    spiked_reads = _everything_the_model_can_read(journal, spiked, now)
    assert spiked_reads == clean_reads  # every tool result, indicator and context line is the same
    spike_price = Decimal(int(spiked.session(SYMBOL, DAY).high.max())) / 1000
    assert not any(str(spike_price) in text for text in spiked_reads)
    # The control: one minute later the spike's first bar has ended and the same reads do show it.
    later_reads = _everything_the_model_can_read(journal, spiked, now + timedelta(minutes=1))
    assert later_reads[1] != _everything_the_model_can_read(journal, base, now + timedelta(minutes=1))[1]
