"""Tests for brokers/sim.py: the deterministic HKEX paper market and the paper account on it."""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import exchange_calendars
import pytest

from brokers import hkex
from brokers.base import (
    Bar,
    Broker,
    MarketData,
    MarketPhase,
    Order,
    OrderRequest,
    OrderStatus,
    OrderType,
    Side,
)
from brokers.sim import HISTORY_SESSIONS, MOMENTUM_PER_DAY, STATE_VERSION, AccountKind, SimBroker, SimExchange
from config.errors import ConfigError, OrderRejected

HK = ZoneInfo("Asia/Hong_Kong")
D = Decimal
DAY = date(2025, 11, 20)  # a normal Thursday session
SEED = 42
START_CASH = D(1_000_000)


def at(day: date, hour: int, minute: int = 0, second: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute, second, tzinfo=HK)


class ManualClock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def make(
    now: datetime,
    seed: int = SEED,
    state_file: Path | None = None,
    cash: Decimal = START_CASH,
    kind: AccountKind = AccountKind.PAPER,
) -> tuple[ManualClock, SimExchange, SimBroker]:
    clock = ManualClock(now)
    exchange = SimExchange(seed, clock, state_file, cash, 0.0003, D(3))
    return clock, exchange, SimBroker(exchange, account_kind=kind)


def request(
    symbol: str, side: Side, quantity: int, limit: Decimal | str | None = None, **extra: object
) -> OrderRequest:
    order_type = extra.pop("order_type", OrderType.LIMIT if limit is not None else OrderType.MARKET)
    aux = extra.pop("aux", None)
    return OrderRequest(
        client_order_id=str(extra.pop("client_order_id", f"t-{symbol}-{side.value}-{quantity}")),
        symbol=symbol,
        side=side,
        quantity=quantity,
        order_type=order_type,  # type: ignore[arg-type]
        limit_price=D(limit) if limit is not None else None,
        aux_price=D(str(aux)) if aux is not None else None,
    )


def stop(
    symbol: str, quantity: int, trigger: Decimal | str, limit: Decimal | str | None = None, **extra: object
) -> OrderRequest:
    """A protective SELL stop (STOP_LIMIT when ``limit`` is given)."""
    order_type = OrderType.STOP_LIMIT if limit is not None else OrderType.STOP
    return request(symbol, Side.SELL, quantity, limit, order_type=order_type, aux=trigger, **extra)


def account_snapshot(broker: SimBroker) -> tuple[object, ...]:
    return (broker.account(), tuple(broker.positions()), tuple(broker.orders()))


# ------------------------------------------------------------------------------------------------------ protocols


def test_implements_the_runtime_checkable_protocols() -> None:
    _, exchange, broker = make(at(DAY, 10))
    assert isinstance(exchange, MarketData)
    assert isinstance(broker, Broker)
    assert exchange.market_state() is None  # the calendar decides; the sim has no opinion


def test_naive_clock_is_refused() -> None:
    exchange = SimExchange(SEED, lambda: datetime(2025, 11, 20, 10, 0), None, D(1_000_000), 0.0003, D(3))
    with pytest.raises(ValueError, match="naive datetime"):
        exchange.snapshots(["700"])


# -------------------------------------------------------------------------------------------------- determinism


def test_same_seed_and_clock_give_the_same_market() -> None:
    _, first, _ = make(at(DAY, 10, 17, 30))
    _, second, _ = make(at(DAY, 10, 17, 30))
    symbols = first.index_constituents("ALL")
    assert first.snapshots(symbols) == second.snapshots(symbols)
    for timeframe in ("1m", "15m", "1d"):
        assert first.klines("0700", timeframe, 50) == second.klines("HK.00700", timeframe, 50)
    since = at(DAY, 0) - timedelta(days=7)
    assert first.news("700", since) == second.news("700", since)


def test_a_different_seed_gives_a_different_market() -> None:
    _, first, _ = make(at(DAY, 10, 17))
    _, other, _ = make(at(DAY, 10, 17), seed=SEED + 1)
    symbols = first.index_constituents("ALL")
    prices = {q.symbol: q.last_price for q in first.snapshots(symbols)}
    other_prices = {q.symbol: q.last_price for q in other.snapshots(symbols)}
    assert sum(prices[s] != other_prices[s] for s in symbols) > len(symbols) // 2
    assert first.klines("700", "1d", 20) != other.klines("700", "1d", 20)


def test_printed_bars_never_change_when_the_clock_moves_on() -> None:
    clock, exchange, _ = make(at(DAY, 10, 15, 30))
    early = exchange.klines("9988", "1m", 400)
    early_quote = exchange.quote("9988")
    clock.now = at(DAY, 15, 0)
    late = exchange.klines("9988", "1m", 400)
    today_early = [b for b in early if b.time.date() == DAY]
    today_late = [b for b in late if b.time.date() == DAY]
    assert len(today_early) == 46  # 09:30 ... 10:15 inclusive (the bar in progress is included)
    assert today_late[: len(today_early)] == today_early
    assert early_quote.last_price == today_early[-1].close  # the quote at t is the bar at t


# ---------------------------------------------------------------------------------------------- universe and grid

REAL_LOTS = {
    "HK.00700": 100,  # Tencent
    "HK.00005": 400,  # HSBC
    "HK.00939": 1000,  # CCB
    "HK.01299": 200,  # AIA
    "HK.09988": 100,  # Alibaba
    "HK.09618": 50,  # JD.com
    "HK.00941": 500,  # China Mobile
    "HK.00857": 2000,  # PetroChina
}


def test_universe_has_real_board_lots_and_index_subsets() -> None:
    _, exchange, _ = make(at(DAY, 10))
    every = exchange.index_constituents("ALL")
    assert len(every) >= 30 and len(set(every)) == len(every)
    quotes = {q.symbol: q for q in exchange.snapshots(every)}
    for symbol, lot in REAL_LOTS.items():
        assert quotes[symbol].lot_size == lot
    hsi, hscei, hstech = (set(exchange.index_constituents(name)) for name in ("HSI", "hscei", "HSTECH"))
    assert hsi | hscei | hstech == set(every)
    assert "HK.00700" in hstech and "HK.00005" not in hstech and "HK.00005" in hsi
    with pytest.raises(ValueError, match="HSI, HSCEI, HSTECH or ALL"):
        exchange.index_constituents("SPX")


def test_snapshots_omit_unknown_and_malformed_symbols() -> None:
    _, exchange, _ = make(at(DAY, 10))
    quotes = exchange.snapshots(["700", "HK.00001", "HK.08888", "US.AAPL", "nonsense"])
    assert [q.symbol for q in quotes] == ["HK.00700", "HK.00001"]
    with pytest.raises(ValueError, match="not listed on the sim exchange"):
        exchange.klines("8888", "1d", 5)


@pytest.mark.parametrize(
    "now",
    [
        at(DAY, 10, 17, 30),  # continuous trading, after Phase 1 (bars span the old and new tables below)
        at(date(2025, 9, 15), 14, 2),  # 150 sessions back reach April 2025: both spread tables in the history
    ],
)
def test_every_quote_and_bar_is_on_the_tick_grid(now: datetime) -> None:
    _, exchange, _ = make(now)
    for quote in exchange.snapshots(exchange.index_constituents("ALL")):
        for price in (quote.last_price, quote.open_price, quote.high_price, quote.low_price, quote.prev_close):
            assert price is not None and hkex.is_on_tick(price, now.date()), (quote.symbol, price)
        assert quote.price_spread == hkex.tick_size(quote.last_price, now.date())
        assert quote.low_price <= quote.last_price <= quote.high_price  # type: ignore[operator]
        for timeframe, count in (("1d", 200), ("1m", 400), ("1h", 30)):
            bars = exchange.klines(quote.symbol, timeframe, count)
            for bar in bars:
                assert bar.low <= min(bar.open, bar.close) and max(bar.open, bar.close) <= bar.high
                assert bar.volume > 0
                for price in (bar.open, bar.high, bar.low, bar.close):
                    assert hkex.is_on_tick(price, bar.time.date()), (quote.symbol, timeframe, bar)


def test_history_uses_the_spread_table_of_each_day() -> None:
    # Galaxy (0027) trades around HK$38: on the old 0.05 grid before 2025-08-04, the new 0.02 grid after.
    _, exchange, _ = make(at(date(2025, 9, 15), 16, 30))
    bars = exchange.klines("0027", "1d", HISTORY_SESSIONS)
    before = [b for b in bars if b.time.date() < date(2025, 8, 4)]
    after = [b for b in bars if b.time.date() >= date(2025, 8, 4)]
    assert before and after
    assert all(b.close % D("0.05") == 0 for b in before if D(20) < b.close <= D(50))
    assert any(b.close % D("0.05") != 0 for b in after if D(20) < b.close <= D(50))


def test_daily_history_is_150_xhkg_sessions_plus_today() -> None:
    _, exchange, _ = make(at(DAY, 11, 0))
    bars = exchange.klines("700", "1d", 1000)
    assert len(bars) == HISTORY_SESSIONS + 1
    days = [b.time.date() for b in bars]
    sessions = {ts.date() for ts in exchange_calendars.get_calendar("XHKG").sessions}
    assert set(days) <= sessions and days == sorted(days) and days[-1] == DAY
    assert date(2025, 10, 1) not in days  # National Day holiday
    assert date(2025, 10, 7) not in days  # the day after Mid-Autumn Festival
    assert all(d.weekday() < 5 for d in days)
    assert bars[-1].time == at(DAY, 0)
    assert exchange.klines("700", "1d", 3) == bars[-3:]


def test_before_the_open_there_is_no_bar_for_today() -> None:
    _, exchange, _ = make(at(DAY, 9, 15))
    assert exchange.klines("700", "1d", 1)[0].time.date() == date(2025, 11, 19)
    assert exchange.klines("700", "1m", 1)[0].time == at(date(2025, 11, 19), 15, 59)


def test_intraday_timeframes_aggregate_the_minutes() -> None:
    _, exchange, _ = make(at(DAY, 16, 30))
    minutes = [b for b in exchange.klines("1299", "1m", 330) if b.time.date() == DAY]
    assert len(minutes) == 330  # 150 morning + 180 afternoon minutes
    assert minutes[0].time == at(DAY, 9, 30) and minutes[-1].time == at(DAY, 15, 59)
    assert not [b for b in minutes if at(DAY, 12) <= b.time < at(DAY, 13)]  # no bars at lunch
    hours = [b for b in exchange.klines("1299", "1h", 6)]
    assert [b.time for b in hours] == [
        at(DAY, h, m) for h, m in ((9, 30), (10, 30), (11, 30), (13, 0), (14, 0), (15, 0))
    ]
    fives = exchange.klines("1299", "5m", 66)
    assert len(fives) == 66 and fives[0].time == at(DAY, 9, 30)
    for bucket in fives:
        inside = [m for m in minutes if bucket.time <= m.time < bucket.time + timedelta(minutes=5)]
        assert len(inside) == 5
        assert bucket.open == inside[0].open and bucket.close == inside[-1].close
        assert bucket.high == max(m.high for m in inside) and bucket.low == min(m.low for m in inside)
        assert bucket.volume == sum(m.volume for m in inside)
    daily = exchange.klines("1299", "1d", 1)[0]
    assert daily.volume == sum(m.volume for m in minutes) and daily.close == minutes[-1].close
    assert daily.high == max(m.high for m in minutes) and daily.open == minutes[0].open


def test_intraday_klines_reach_into_previous_sessions() -> None:
    _, exchange, _ = make(at(DAY, 9, 45))
    bars = exchange.klines("700", "15m", 30)
    assert len(bars) == 30
    assert bars[-1].time == at(DAY, 9, 45)  # the bar in progress
    assert bars[-2].time == at(DAY, 9, 30)
    assert bars[-3].time == at(date(2025, 11, 19), 15, 45)  # yesterday's last bar
    assert [b.time for b in bars] == sorted(b.time for b in bars)


def test_half_day_has_a_morning_only() -> None:
    half_day = date(2025, 12, 24)  # Christmas Eve
    _, exchange, _ = make(at(half_day, 15, 0))
    today = [b for b in exchange.klines("700", "1m", 400) if b.time.date() == half_day]
    assert len(today) == 150 and today[-1].time == at(half_day, 11, 59)
    assert exchange.quote("700").last_price == today[-1].close
    assert exchange.calendar_phase() is MarketPhase.CLOSED


@pytest.mark.parametrize(
    ("now", "phase"),
    [
        (at(DAY, 8, 0), MarketPhase.CLOSED),  # before the pre-opening session
        (at(DAY, 9, 10), MarketPhase.PRE_OPEN),  # auction
        (at(DAY, 9, 30), MarketPhase.MORNING),  # first continuous minute
        (at(DAY, 12, 0), MarketPhase.LUNCH),  # 12:00 is lunch
        (at(DAY, 13, 0), MarketPhase.AFTERNOON),  # reopened
        (at(DAY, 16, 5), MarketPhase.CLOSING_AUCTION),  # closing auction
        (at(date(2025, 11, 22), 10, 0), MarketPhase.CLOSED),  # Saturday
    ],
)
def test_calendar_phase(now: datetime, phase: MarketPhase) -> None:
    _, exchange, _ = make(now)
    assert exchange.calendar_phase() is phase


# ------------------------------------------------------------------------------------------- frozen quotes


def test_quote_is_frozen_outside_continuous_trading() -> None:
    clock, exchange, _ = make(at(DAY, 9, 15))
    yesterday_close = make(at(date(2025, 11, 19), 17, 0))[1].quote("700").last_price

    pre_open = exchange.quote("700")
    assert pre_open.last_price == pre_open.prev_close == yesterday_close
    assert pre_open.volume == 0 and pre_open.volume_ratio is None and pre_open.open_price is None

    clock.now = at(DAY, 12, 30)
    lunch = exchange.quote("700")
    morning = [b for b in exchange.klines("700", "1m", 150) if b.time.date() == DAY]
    assert morning[-1].time == at(DAY, 11, 59) and lunch.last_price == morning[-1].close
    clock.now = at(DAY, 12, 59, 59)
    assert exchange.quote("700").last_price == lunch.last_price

    clock.now = at(DAY, 16, 30)
    after = exchange.quote("700")
    assert after.last_price == exchange.klines("700", "1d", 1)[0].close
    clock.now = at(date(2025, 11, 22), 11, 0)  # Saturday shows Friday's close
    friday = make(at(date(2025, 11, 21), 18, 0))[1].quote("700")
    assert exchange.quote("700").last_price == friday.last_price


def test_momentum_stocks_appear_every_day() -> None:
    start = date(2025, 11, 17)
    days = [start + timedelta(days=i) for i in range(5)]  # Monday to Friday
    for day in days:
        _, exchange, _ = make(at(day, 10, 30))
        quotes = exchange.snapshots(exchange.index_constituents("ALL"))
        movers = [
            q
            for q in quotes
            if q.volume_ratio is not None
            and q.volume_ratio > 1.5
            and q.prev_close is not None
            and q.last_price > q.prev_close * D("1.01")
        ]
        assert 1 <= len(movers) <= 6, (day, [(q.symbol, q.volume_ratio) for q in movers])
        # The day's momentum stocks each got a pre-open headline, and each of them is a mover.
        storied = {q.symbol for q in quotes if any("jumps" in n.title for n in exchange.news(q.symbol, at(day, 0)))}
        assert len(storied) == MOMENTUM_PER_DAY
        assert storied <= {q.symbol for q in movers}


def test_news_is_deterministic_windowed_and_newest_first() -> None:
    _, exchange, _ = make(at(DAY, 10, 0))
    since = at(DAY, 10) - timedelta(days=5)
    items = exchange.news("HK.00005", since)
    assert items
    assert all(since <= item.published_at <= at(DAY, 10) for item in items)
    assert [i.published_at for i in items] == sorted((i.published_at for i in items), reverse=True)
    assert all(item.symbol == "HK.00005" and "HSBC" in item.title for item in items)
    assert exchange.news("8888", since) == []
    assert exchange.news("5", at(DAY, 10) - timedelta(days=400)) == exchange.news("5", at(DAY, 10) - timedelta(days=30))


# ----------------------------------------------------------------------------------------------------- orders


def test_marketable_limit_buy_fills_at_once_and_books_costs() -> None:
    _, exchange, broker = make(at(DAY, 10, 5))
    price = exchange.quote("700").last_price
    order = broker.place_order(request("700", Side.BUY, 200, price + D("5.00"), client_order_id="buy-1"))
    assert order.status is OrderStatus.FILLED and order.filled_quantity == 200
    assert order.avg_fill_price == price  # fills at the current price, not the (higher) limit
    gross = price * 200
    costs = hkex.trading_costs(gross, D("0.0003"), D(3)).total
    account = broker.account()
    assert account.cash == D(1_000_000) - gross - costs
    assert account.equity == account.cash + gross and account.is_paper
    [position] = broker.positions()
    assert (position.symbol, position.quantity, position.sellable_quantity) == ("HK.00700", 200, 200)
    assert position.avg_cost == price and position.unrealized_pnl == 0
    assert broker.find_order("buy-1") == order
    assert broker.find_order("nope") is None
    assert broker.open_orders() == []


def test_market_orders_fill_at_the_current_price_and_round_trip_costs_both_sides() -> None:
    clock, exchange, broker = make(at(DAY, 10, 5))
    buy_price = exchange.quote("0005").last_price
    broker.place_order(request("0005", Side.BUY, 800))
    clock.now = at(DAY, 14, 40)
    sell_price = exchange.quote("0005").last_price
    sold = broker.place_order(request("0005", Side.SELL, 800, client_order_id="sell-all"))
    assert sold.status is OrderStatus.FILLED and sold.avg_fill_price == sell_price
    buy_costs = hkex.trading_costs(buy_price * 800, D("0.0003"), D(3)).total
    sell_costs = hkex.trading_costs(sell_price * 800, D("0.0003"), D(3)).total
    expected = D(1_000_000) - buy_price * 800 - buy_costs + sell_price * 800 - sell_costs
    assert broker.account().cash == expected
    assert broker.positions() == []


def _first_touch(symbol: str, placed: datetime, side: Side, minutes: int = 90) -> tuple[Decimal, Bar]:
    """The price a resting order placed at ``placed`` would first trade at, read from a later view of the market."""
    _, future, _ = make(at(placed.date(), 16, 30))
    later = [
        b
        for b in future.klines(symbol, "1m", 400)
        if placed < b.time <= placed + timedelta(minutes=minutes) and b.time.date() == placed.date()
    ]
    target = min(b.low for b in later) if side is Side.BUY else max(b.high for b in later)
    touch = next(b for b in later if (b.low <= target if side is Side.BUY else b.high >= target))
    return target, touch


def test_resting_limit_buy_fills_when_a_later_bar_trades_through_it() -> None:
    placed = at(DAY, 10, 0, 20)
    clock, exchange, broker = make(placed)
    for symbol in exchange.index_constituents("ALL"):
        target, touch = _first_touch(symbol, placed, Side.BUY)
        if target < exchange.quote(symbol).last_price and touch.time > placed + timedelta(minutes=2):
            break
    else:  # pragma: no cover - the market for seed 42 has such a dip
        pytest.fail("no symbol dipped after 10:00")
    lot = exchange.instrument(symbol).lot_size  # type: ignore[union-attr]
    order = broker.place_order(request(symbol, Side.BUY, lot, target, client_order_id="dip"))
    assert order.status is OrderStatus.SUBMITTED
    reserved = broker.account()
    assert reserved.buying_power < reserved.cash  # the resting buy holds cash back

    clock.now = touch.time - timedelta(seconds=1)  # the minute before the touching bar
    assert broker.find_order("dip").status is OrderStatus.SUBMITTED  # type: ignore[union-attr]
    assert broker.positions() == []

    clock.now = touch.time + timedelta(seconds=5)
    filled = broker.find_order("dip")
    assert filled is not None and filled.status is OrderStatus.FILLED
    assert filled.avg_fill_price is not None and filled.avg_fill_price <= target
    assert filled.updated_at == touch.time
    [position] = broker.positions()
    assert position.quantity == lot and position.avg_cost == filled.avg_fill_price
    costs = hkex.trading_costs(filled.avg_fill_price * lot, D("0.0003"), D(3)).total
    assert broker.account().cash == D(1_000_000) - filled.avg_fill_price * lot - costs


def test_resting_limit_sell_fills_on_a_later_high() -> None:
    placed = at(DAY, 13, 30, 10)
    clock, exchange, broker = make(placed)
    broker.place_order(request("1810", Side.BUY, 400))  # two lots of Xiaomi
    target, touch = _first_touch("1810", placed, Side.SELL)
    if target <= exchange.quote("1810").last_price:  # pragma: no cover - depends on seed
        pytest.skip("price only fell after 13:30 for this seed")
    order = broker.place_order(request("1810", Side.SELL, 200, target, client_order_id="take-profit"))
    assert order.status is OrderStatus.SUBMITTED
    [position] = broker.positions()
    assert position.quantity == 400 and position.sellable_quantity == 200  # the resting sell holds 200
    with pytest.raises(OrderRejected, match="only 200 shares are sellable"):
        broker.place_order(request("1810", Side.SELL, 400, target))
    clock.now = touch.time + timedelta(seconds=30)
    assert broker.find_order("take-profit").status is OrderStatus.FILLED  # type: ignore[union-attr]
    [position] = broker.positions()
    assert position.quantity == position.sellable_quantity == 200


def test_unfilled_orders_expire_at_the_close() -> None:
    clock, exchange, broker = make(at(DAY, 10, 0))
    far_below = hkex.round_to_tick(exchange.quote("700").last_price * D("0.5"), Side.BUY, DAY)
    order = broker.place_order(request("700", Side.BUY, 100, far_below))
    clock.now = at(DAY, 15, 59)
    assert broker.open_orders() == [order]
    clock.now = at(DAY, 16, 0, 1)
    [expired] = broker.orders()
    assert expired.status is OrderStatus.CANCELLED and "Expired unfilled" in expired.message
    assert broker.open_orders() == [] and broker.account().buying_power == broker.account().cash


def test_limit_order_at_lunch_rests_and_fills_from_the_afternoon_open() -> None:
    clock, exchange, broker = make(at(DAY, 12, 30))
    lunch_price = exchange.quote("3690").last_price
    limit = hkex.round_to_tick(lunch_price * D("1.02"), Side.BUY, DAY)
    order = broker.place_order(request("3690", Side.BUY, 100, limit, client_order_id="lunch"))
    assert order.status is OrderStatus.SUBMITTED  # no trading at lunch, even for a marketable limit
    with pytest.raises(OrderRejected, match="market orders need continuous trading and the market is lunch"):
        broker.place_order(request("3690", Side.BUY, 100))
    clock.now = at(DAY, 13, 10)
    filled = broker.find_order("lunch")
    assert filled is not None and filled.status is OrderStatus.FILLED
    assert filled.updated_at >= at(DAY, 13, 0) and filled.avg_fill_price <= limit  # type: ignore[operator]


def test_cancel_order() -> None:
    _, exchange, broker = make(at(DAY, 10, 0))
    far_below = hkex.round_to_tick(exchange.quote("388").last_price * D("0.8"), Side.BUY, DAY)
    order = broker.place_order(request("388", Side.BUY, 100, far_below))
    cancelled = broker.cancel_order(order.broker_order_id)
    assert cancelled.status is OrderStatus.CANCELLED and cancelled.broker_order_id == order.broker_order_id
    assert broker.open_orders() == []
    with pytest.raises(OrderRejected, match="already cancelled"):
        broker.cancel_order(order.broker_order_id)
    filled = broker.place_order(request("388", Side.BUY, 100))
    with pytest.raises(OrderRejected, match="already filled"):
        broker.cancel_order(filled.broker_order_id)
    with pytest.raises(OrderRejected, match="no such order"):
        broker.cancel_order("SIM99999999")


def test_preview_order_costs() -> None:
    _, exchange, broker = make(at(DAY, 10, 0))
    preview = broker.preview_order(request("2318", Side.BUY, 500, "55.00"))
    costs = hkex.trading_costs(D("27500.00"), D("0.0003"), D(3)).total
    assert (preview.gross_value, preview.costs, preview.net_cash_change) == (D("27500.00"), costs, -(D(27500) + costs))
    market = broker.preview_order(request("2318", Side.SELL, 500))
    assert market.price == exchange.quote("2318").last_price
    assert market.net_cash_change == market.gross_value - market.costs
    assert broker.orders() == []  # nothing sent


@pytest.mark.parametrize(
    ("order", "message"),
    [
        (request("700", Side.BUY, 150, "600.00"), "multiple of the 100-share board lot"),  # odd lot
        (request("5", Side.BUY, 100, "100.00"), "multiple of the 400-share board lot"),  # HSBC lot is 400
        (request("700", Side.BUY, 100, "600.10"), "not on the HKEX tick grid"),  # off tick (0.50 band)
        (request("27", Side.BUY, 1000, "38.05"), "valid neighbours: 38.04 and 38.06"),  # new 0.02 grid
        (request("700", Side.BUY, 10_000, "600.00"), "buying power"),  # HK$6m > HK$1m cash
        (request("700", Side.SELL, 100, "600.00"), "only 0 shares are sellable"),  # short sale
        (request("8888", Side.BUY, 100, "1.00"), "does not list"),  # unknown symbol
        (request("700", Side.BUY, 100, "600.00", order_type=OrderType.STOP), "not supported"),  # paper: no stops
        (stop("700", 100, "500.00"), "stop orders are not supported by paper accounts"),  # not even sell stops
        (stop("700", 100, "500.00", "499.50"), "stop_limit orders are not supported by paper"),  # nor stop-limits
        (request("700", Side.BUY, 100, None, order_type=OrderType.LIMIT), "needs a limit price"),  # no price
    ],
)
def test_rejections_leave_the_account_unchanged(order: OrderRequest, message: str, tmp_path: Path) -> None:
    state = tmp_path / "sim.json"
    _, _, broker = make(at(DAY, 10, 0), state_file=state)
    before = account_snapshot(broker)
    file_before = state.read_bytes()
    with pytest.raises(OrderRejected, match=message) as info:
        broker.place_order(order)
    assert "No order was sent" in str(info.value) and info.value.code
    assert account_snapshot(broker) == before
    assert state.read_bytes() == file_before


def test_oversell_is_rejected_but_selling_the_holding_works() -> None:
    _, _, broker = make(at(DAY, 10, 0))
    broker.place_order(request("939", Side.BUY, 2000))
    before = account_snapshot(broker)
    with pytest.raises(OrderRejected, match="only 2000 shares are sellable"):
        broker.place_order(request("939", Side.SELL, 3000))
    assert account_snapshot(broker) == before
    assert broker.place_order(request("939", Side.SELL, 2000)).status is OrderStatus.FILLED


def test_second_resting_buy_cannot_spend_reserved_cash() -> None:
    _, exchange, broker = make(at(DAY, 10, 0), cash=D(100_000))
    below = hkex.round_to_tick(exchange.quote("700").last_price * D("0.9"), Side.BUY, DAY)
    broker.place_order(request("700", Side.BUY, 100, below))  # ~HK$60k reserved
    with pytest.raises(OrderRejected, match="buying power"):
        broker.place_order(request("700", Side.BUY, 100, below))


def test_suspended_symbol_rejects_orders_and_resting_orders_wait() -> None:
    clock, exchange, broker = make(at(DAY, 10, 0))
    exchange.set_suspended("1211", True)
    assert exchange.quote("1211").suspended
    with pytest.raises(OrderRejected, match="suspended"):
        broker.place_order(request("1211", Side.BUY, 500))
    exchange.set_suspended("1211", False)
    assert not exchange.quote("1211").suspended
    above = hkex.round_to_tick(exchange.quote("1211").last_price * D("0.99"), Side.BUY, DAY)
    order = broker.place_order(request("1211", Side.BUY, 500, above, client_order_id="wait"))
    exchange.set_suspended("1211", True)
    clock.now = at(DAY, 15, 59)
    assert broker.find_order("wait") == order  # a suspended stock does not trade


def test_fail_next_order_rejects_once() -> None:
    _, exchange, broker = make(at(DAY, 10, 0))
    exchange.fail_next_order("gateway said no")
    with pytest.raises(OrderRejected, match="gateway said no") as info:
        broker.place_order(request("700", Side.BUY, 100))
    assert info.value.code == "injected" and broker.orders() == []
    assert broker.place_order(request("700", Side.BUY, 100)).status is OrderStatus.FILLED


# ------------------------------------------------------------------------------------------------------ shocks


def test_shock_moves_quotes_bars_and_equity() -> None:
    clock, exchange, broker = make(at(DAY, 10, 0))
    broker.place_order(request("700", Side.BUY, 1000))
    before = broker.account()
    price = exchange.quote("700").last_price
    exchange.apply_shock("700", -0.10)
    shocked = exchange.quote("700").last_price
    assert shocked == hkex.round_to_tick(price * D("0.9"), Side.BUY, DAY) or shocked == hkex.round_to_tick(
        price * D("0.9"), Side.SELL, DAY
    )
    after = broker.account()
    assert after.cash == before.cash
    assert after.equity - before.equity == (shocked - price) * 1000  # about -HK$66,000
    [position] = broker.positions()
    assert position.last_price == shocked and position.unrealized_pnl < 0
    clock.now = at(DAY, 11, 0)  # later bars carry the shock too
    unshocked_view = make(at(DAY, 11, 0))[1]
    ratio = exchange.quote("700").last_price / unshocked_view.quote("700").last_price
    assert D("0.89") < ratio < D("0.91")
    assert exchange.klines("700", "1m", 1)[0].close == exchange.quote("700").last_price
    earlier = [b for b in exchange.klines("700", "1m", 120) if b.time < at(DAY, 9, 59)]
    assert earlier == [b for b in unshocked_view.klines("700", "1m", 120) if b.time < at(DAY, 9, 59)]


def test_market_wide_shock_moves_every_symbol() -> None:
    _, exchange, _ = make(at(DAY, 16, 30))  # after the close: quotes move at once
    symbols = exchange.index_constituents("ALL")
    before = {q.symbol: q.last_price for q in exchange.snapshots(symbols)}
    exchange.apply_shock(None, 0.05)
    for quote in exchange.snapshots(symbols):
        assert quote.last_price > before[quote.symbol]
        assert hkex.is_on_tick(quote.last_price, DAY)
    with pytest.raises(ValueError, match="fraction"):
        exchange.apply_shock(None, -1.5)


# ------------------------------------------------------------------------------------------------- persistence


def test_state_persists_across_instances(tmp_path: Path) -> None:
    state = tmp_path / "var" / "sim" / "state.json"
    _, exchange, broker = make(at(DAY, 10, 0), state_file=state)
    broker.place_order(request("700", Side.BUY, 300, client_order_id="first"))
    far_below = hkex.round_to_tick(exchange.quote("5").last_price * D("0.8"), Side.BUY, DAY)
    resting = broker.place_order(request("5", Side.BUY, 400, far_below, client_order_id="resting"))
    exchange.apply_shock("700", -0.05)
    exchange.set_suspended("2020", True)
    exchange.fail_next_order("injected by the first run")
    saved = json.loads(state.read_text())
    assert saved["version"] == STATE_VERSION == 2 and saved["seed"] == SEED and saved["account_kind"] == "paper"

    # A later cron run: a new process, the same file, the same clock.
    _, reopened, broker2 = make(at(DAY, 10, 0), state_file=state, cash=D(5))
    assert broker2.account() == broker.account()  # cash from the file, not the constructor
    assert broker2.positions() == broker.positions()
    assert broker2.find_order("first") == broker.find_order("first")
    assert broker2.open_orders() == [resting]
    assert reopened.quote("700").last_price == exchange.quote("700").last_price  # the shock survived
    assert reopened.quote("2020").suspended
    with pytest.raises(OrderRejected, match="injected by the first run"):
        broker2.place_order(request("700", Side.BUY, 100))
    # The first instance sees what the second changed (the armed failure was consumed).
    assert broker.place_order(request("700", Side.BUY, 100)).status is OrderStatus.FILLED
    assert len(broker2.positions()) == 1 and broker2.positions()[0].quantity == 400

    broker2.cancel_order(resting.broker_order_id)
    assert broker.open_orders() == []


def test_resting_order_fills_in_a_later_run(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    _, exchange, broker = make(at(DAY, 10, 0), state_file=state)
    price = exchange.quote("941").last_price
    limit = hkex.round_to_tick(price * D("0.999"), Side.BUY, DAY)
    target, _ = _first_touch("941", at(DAY, 10, 0), Side.BUY, minutes=300)
    order = broker.place_order(request("941", Side.BUY, 500, max(limit, target), client_order_id="later"))
    if order.status is OrderStatus.FILLED:  # pragma: no cover - marketable by chance
        pytest.skip("order was marketable for this seed")
    _, _, later_run = make(at(DAY, 15, 30), state_file=state)
    filled = later_run.find_order("later")
    assert filled is not None and filled.status is OrderStatus.FILLED
    assert [p.symbol for p in later_run.positions()] == ["HK.00941"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"version": 99, "cash": "1"}', "has version 99"),  # written by a future version
        ("{not json", "Could not read sim state file"),  # truncated or corrupt
        ('{"version": 1}', "is damaged"),  # required key missing
        ('{"version": 2, "cash": "1", "account_kind": "margin"}', "is damaged"),  # no such account kind
        ("[]", "does not hold a JSON object"),  # wrong shape
    ],
)
def test_unreadable_state_file_is_a_config_error(tmp_path: Path, content: str, message: str) -> None:
    state = tmp_path / "state.json"
    state.write_text(content)
    with pytest.raises(ConfigError, match=message):
        make(at(DAY, 10, 0), state_file=state)


def test_fresh_state_file_is_written_at_construction(tmp_path: Path) -> None:
    state = tmp_path / "new" / "state.json"
    make(at(DAY, 10, 0), state_file=state, cash=D(250_000))
    saved = json.loads(state.read_text())
    assert saved["cash"] == "250000.00" and saved["orders"] == [] and saved["positions"] == {}
    assert [p.name for p in state.parent.iterdir() if p.suffix == ".tmp"] == []  # atomic write left no temp file


def test_order_objects_round_trip_through_the_state_file(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    _, _, broker = make(at(DAY, 10, 0), state_file=state)
    placed = broker.place_order(request("9618", Side.BUY, 50))
    stored = [Order.model_validate(o) for o in json.loads(state.read_text())["orders"]]
    assert stored == [placed]


_WORKER = """
import sys
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

from brokers.base import OrderRequest, OrderType, Side
from brokers.sim import SimBroker, SimExchange

now = datetime(2025, 11, 20, 10, 0, tzinfo=ZoneInfo("Asia/Hong_Kong"))
broker = SimBroker(SimExchange(42, lambda: now, Path(sys.argv[1]), Decimal(1_000_000), 0.0003, Decimal(3)))
for i in range(5):
    request = OrderRequest(
        client_order_id=f"{sys.argv[2]}-{i}", symbol="3988", side=Side.BUY, quantity=1000, order_type=OrderType.MARKET
    )
    broker.place_order(request)
"""


def test_separate_processes_share_one_account_without_losing_updates(tmp_path: Path) -> None:
    import subprocess
    import sys

    state = tmp_path / "state.json"
    make(at(DAY, 10, 0), state_file=state)
    root = Path(__file__).resolve().parent.parent
    workers = [
        subprocess.Popen([sys.executable, "-c", _WORKER, str(state), name], cwd=root, env={"PYTHONPATH": str(root)})
        for name in ("cron-a", "cron-b")
    ]
    assert [worker.wait(timeout=120) for worker in workers] == [0, 0]
    _, exchange, broker = make(at(DAY, 10, 0), state_file=state)
    orders = broker.orders()
    assert sorted(o.client_order_id or "" for o in orders) == sorted(
        f"{n}-{i}" for n in ("cron-a", "cron-b") for i in range(5)
    )
    assert len({o.broker_order_id for o in orders}) == 10
    [position] = broker.positions()
    assert position.quantity == 10_000
    price = exchange.quote("3988").last_price
    costs = hkex.trading_costs(price * 1000, D("0.0003"), D(3)).total
    assert broker.account().cash == START_CASH - 10 * (price * 1000 + costs)


# ------------------------------------------------------------------------- REAL-flavoured account: broker stops


def real(now: datetime, **kwargs: object) -> tuple[ManualClock, SimExchange, SimBroker]:
    return make(now, kind=AccountKind.REAL, **kwargs)  # type: ignore[arg-type]


def below(price: Decimal, factor: str) -> Decimal:
    """``price * factor`` rounded down onto the tick grid (a valid sell-stop trigger under ``price``)."""
    return hkex.round_to_tick(price * D(factor), Side.BUY, DAY)


def test_real_flavour_is_a_non_paper_account_with_its_own_id() -> None:
    _, _, paper = make(at(DAY, 10, 0))
    _, _, real_broker = real(at(DAY, 10, 0))
    assert (paper.account_id, paper.is_paper, paper.has_stop_orders) == ("SIM-42", True, False)
    assert (real_broker.account_id, real_broker.is_paper, real_broker.has_stop_orders) == ("SIM-REAL-42", False, True)
    assert paper.account().is_paper and not real_broker.account().is_paper
    assert real_broker.account().account_id == "SIM-REAL-42"
    assert isinstance(real_broker, Broker)
    with pytest.raises(ValueError, match="account kind 'margin' is not known; use 'paper' or 'real'"):
        SimBroker(SimExchange(SEED, ManualClock(at(DAY, 10, 0))), account_kind="margin")


def test_one_exchange_cannot_back_a_paper_and_a_real_account() -> None:
    _, exchange, _ = make(at(DAY, 10, 0))
    assert SimBroker(exchange, account_kind="paper").account_id == "SIM-42"  # another paper view is fine
    with pytest.raises(ConfigError, match=r"holds a paper account .* give each account kind its own SimExchange"):
        SimBroker(exchange, account_kind=AccountKind.REAL)


def test_stop_rests_reserves_its_shares_and_cancel_releases_them() -> None:
    _, exchange, broker = real(at(DAY, 10, 0, 20))
    broker.place_order(request("700", Side.BUY, 300))
    before = broker.account()
    trigger = below(exchange.quote("700").last_price, "0.95")
    placed = broker.place_stop_order(stop("700", 200, trigger, client_order_id="guard-stop"))
    assert (placed.status, placed.order_type, placed.side) == (OrderStatus.SUBMITTED, OrderType.STOP, Side.SELL)
    assert (placed.aux_price, placed.limit_price, placed.filled_quantity) == (trigger, None, 0)
    assert broker.open_orders() == [placed] and broker.find_order("guard-stop") == placed
    assert broker.account() == before  # a resting stop moves no cash and holds no buying power
    [position] = broker.positions()
    assert (position.quantity, position.sellable_quantity) == (300, 100)
    with pytest.raises(OrderRejected, match=r"only 100 shares are sellable \(held 300, 200 in open sell orders\)"):
        broker.place_order(request("700", Side.SELL, 200))
    with pytest.raises(OrderRejected, match="only 100 shares are sellable"):
        broker.place_stop_order(stop("700", 200, trigger, client_order_id="second-stop"))
    assert broker.open_orders() == [placed]

    cancelled = broker.cancel_order(placed.broker_order_id)  # how a test makes a broker stop "vanish"
    assert cancelled.status is OrderStatus.CANCELLED and cancelled.message == "cancelled by request"
    assert (cancelled.order_type, cancelled.aux_price) == (OrderType.STOP, trigger)
    assert broker.open_orders() == []
    assert broker.positions()[0].sellable_quantity == 300
    with pytest.raises(OrderRejected, match="already cancelled"):
        broker.cancel_order(placed.broker_order_id)
    assert broker.place_order(request("700", Side.SELL, 300)).status is OrderStatus.FILLED  # all shares free again


def test_stop_triggers_on_the_first_later_bar_through_it_and_a_gap_fills_at_the_open() -> None:
    clock, exchange, broker = real(at(DAY, 10, 0, 20))
    broker.place_order(request("700", Side.BUY, 300))
    cash_after_buy = broker.account().cash
    trigger = below(exchange.quote("700").last_price, "0.97")
    broker.place_stop_order(stop("700", 300, trigger, client_order_id="stop"))
    exchange.apply_shock("700", -0.10)  # the bar in progress and every later bar drop 10 %
    assert exchange.quote("700").last_price < trigger

    clock.now = at(DAY, 10, 0, 59)  # the placing minute's bar never triggers the order placed in it
    assert broker.find_order("stop").status is OrderStatus.SUBMITTED  # type: ignore[union-attr]
    assert broker.positions()[0].quantity == 300

    clock.now = at(DAY, 10, 1, 5)
    filled = broker.find_order("stop")
    [bar] = [b for b in exchange.klines("700", "1m", 3) if b.time == at(DAY, 10, 1)]
    assert bar.open < trigger  # the shock gapped the 10:01 bar below the trigger ...
    assert filled is not None and filled.status is OrderStatus.FILLED and filled.filled_quantity == 300
    assert filled.avg_fill_price == bar.open  # ... so the market sell fills there, worse than the trigger
    assert filled.updated_at == at(DAY, 10, 1) and filled.order_type is OrderType.STOP
    assert broker.positions() == [] and broker.open_orders() == []
    costs = hkex.trading_costs(bar.open * 300, D("0.0003"), D(3)).total
    assert broker.account().cash == cash_after_buy + bar.open * 300 - costs


def _first_clean_touch(exchange: SimExchange, placed: datetime) -> tuple[str, Decimal, Bar]:
    """A symbol, a trigger under its price at ``placed`` and the first later bar that trades down through it
    after opening above it (so the stop fills exactly at the trigger), read from a later view of the market."""
    _, future, _ = make(at(placed.date(), 16, 30))
    for symbol in exchange.index_constituents("ALL"):
        last = exchange.quote(symbol).last_price
        later = [b for b in future.klines(symbol, "1m", 400) if b.time > placed and b.time.date() == placed.date()]
        lowest_so_far = last
        for i, bar in enumerate(later[:120]):
            if i >= 3 and bar.low < lowest_so_far and bar.open > bar.low:
                return symbol, bar.low, bar
            lowest_so_far = min(lowest_so_far, bar.low)
    pytest.fail("no symbol made a fresh low after 10:00")  # pragma: no cover - the market for seed 42 does


def test_stop_fills_at_its_trigger_when_a_bar_trades_through_it() -> None:
    placed = at(DAY, 10, 0, 20)
    clock, exchange, broker = real(placed)
    symbol, trigger, touch = _first_clean_touch(exchange, placed)
    lot = exchange.instrument(symbol).lot_size  # type: ignore[union-attr]
    broker.place_order(request(symbol, Side.BUY, lot))
    assert trigger < exchange.quote(symbol).last_price
    broker.place_stop_order(stop(symbol, lot, trigger, client_order_id="exact"))

    clock.now = touch.time - timedelta(seconds=1)  # every earlier bar stayed above the trigger
    assert broker.find_order("exact").status is OrderStatus.SUBMITTED  # type: ignore[union-attr]
    clock.now = touch.time + timedelta(seconds=1)
    filled = broker.find_order("exact")
    assert filled is not None and filled.status is OrderStatus.FILLED
    assert (filled.avg_fill_price, filled.updated_at) == (trigger, touch.time)
    assert broker.positions() == []


def test_stop_limit_fills_within_its_limit_or_rests_as_a_limit_sell() -> None:
    clock, exchange, broker = real(at(DAY, 10, 0, 20))
    broker.place_order(request("700", Side.BUY, 300))
    last = exchange.quote("700").last_price
    trigger, tight, loose = below(last, "0.97"), below(last, "0.96"), below(last, "0.85")
    tight_order = broker.place_stop_order(stop("700", 100, trigger, tight, client_order_id="tight"))
    broker.place_stop_order(stop("700", 100, trigger, loose, client_order_id="loose"))
    assert (tight_order.order_type, tight_order.aux_price, tight_order.limit_price) == (
        OrderType.STOP_LIMIT,
        trigger,
        tight,
    )
    exchange.apply_shock("700", -0.10)

    clock.now = at(DAY, 10, 1, 5)
    [gap_bar] = [b for b in exchange.klines("700", "1m", 3) if b.time == at(DAY, 10, 1)]
    assert tight > gap_bar.open >= loose
    loose_fill = broker.find_order("loose")
    assert loose_fill is not None and loose_fill.status is OrderStatus.FILLED
    assert loose_fill.avg_fill_price == gap_bar.open  # inside its limit: sold at the gap
    tight_now = broker.find_order("tight")
    assert tight_now is not None and tight_now.status is OrderStatus.SUBMITTED  # the gap skipped its limit
    assert broker.positions()[0].sellable_quantity == 100  # the triggered stop-limit still holds its shares

    clock.now = at(DAY, 10, 30, 30)
    assert broker.find_order("tight").status is OrderStatus.SUBMITTED  # type: ignore[union-attr]
    exchange.apply_shock("700", 0.12)  # the price comes back above the limit
    clock.now = at(DAY, 10, 31, 5)
    recovered = [b for b in exchange.klines("700", "1m", 40) if b.time > gap_bar.time and b.high >= tight]
    first = recovered[0]
    assert first.time >= at(DAY, 10, 30)  # nothing reached the limit before the recovery
    tight_fill = broker.find_order("tight")
    assert tight_fill is not None and tight_fill.status is OrderStatus.FILLED
    assert tight_fill.avg_fill_price == max(first.open, tight) and tight_fill.updated_at == first.time
    assert broker.positions()[0].quantity == 100 and broker.open_orders() == []


def test_untriggered_stop_expires_at_the_close() -> None:
    clock, exchange, broker = real(at(DAY, 10, 0))
    broker.place_order(request("700", Side.BUY, 100))
    placed = broker.place_stop_order(stop("700", 100, below(exchange.quote("700").last_price, "0.5")))
    clock.now = at(DAY, 15, 59)
    assert broker.open_orders() == [placed]
    clock.now = at(DAY, 16, 0, 1)
    assert broker.open_orders() == []
    expired = broker.find_order(placed.client_order_id or "")
    assert expired is not None and expired.status is OrderStatus.CANCELLED
    assert expired.message.startswith("Stop expired at the close of 2025-11-20 without filling")
    assert broker.positions()[0].sellable_quantity == 100


def _real_rejections() -> list[tuple[str, object, str]]:
    # Each row: (name, how to build the request from the last price of 0700, expected wording).
    return [
        ("trigger at the market", lambda last: stop("700", 100, last), "would trigger at once; set the trigger below"),
        ("trigger above", lambda last: stop("700", 100, last + D(5)), "is at or above the last price"),
        (
            "buy stop",
            lambda last: request("700", Side.BUY, 100, order_type=OrderType.STOP, aux=last + D(5)),
            "buy stops",
        ),
        ("no trigger", lambda last: request("700", Side.SELL, 100, order_type=OrderType.STOP), "needs a trigger price"),
        (
            "off-tick trigger",
            lambda last: stop("700", 100, below(last, "0.9") + D("0.1")),
            "trigger price .* tick grid",
        ),
        ("odd lot", lambda last: stop("700", 150, below(last, "0.9")), "multiple of the 100-share board lot"),
        ("more than held", lambda last: stop("700", 400, below(last, "0.9")), "only 300 shares are sellable"),
        ("nothing held", lambda last: stop("5", 400, D("50.00")), "only 0 shares are sellable"),
        ("limit above trigger", lambda last: stop("700", 100, below(last, "0.9"), last), "at or below its trigger"),
        (
            "stop-limit without a limit",
            lambda last: request("700", Side.SELL, 100, order_type=OrderType.STOP_LIMIT, aux=below(last, "0.9")),
            "a stop_limit order needs a limit price",
        ),
        (
            "off-tick limit",
            lambda last: stop("700", 100, below(last, "0.9"), below(last, "0.8") + D("0.1")),
            r"price \d+\.\d+ is not on the HKEX tick grid",
        ),
    ]


@pytest.mark.parametrize(("name", "build", "message"), _real_rejections(), ids=[r[0] for r in _real_rejections()])
def test_real_stop_rejections_leave_the_account_unchanged(
    name: str, build: object, message: str, tmp_path: Path
) -> None:
    state = tmp_path / "sim.json"
    _, exchange, broker = real(at(DAY, 10, 0), state_file=state)
    broker.place_order(request("700", Side.BUY, 300))
    before = account_snapshot(broker)
    file_before = state.read_bytes()
    order = build(exchange.quote("700").last_price)  # type: ignore[operator]
    with pytest.raises(OrderRejected, match=message) as info:
        broker.place_order(order)
    assert "No order was sent" in str(info.value) and info.value.code
    assert account_snapshot(broker) == before
    assert state.read_bytes() == file_before


def test_place_stop_order_accepts_only_stop_types() -> None:
    _, exchange, broker = real(at(DAY, 10, 0))
    broker.place_order(request("700", Side.BUY, 100))
    with pytest.raises(OrderRejected, match="as a stop order: its type must be stop or stop_limit") as info:
        broker.place_stop_order(request("700", Side.SELL, 100, exchange.quote("700").last_price))
    assert info.value.code == "not_a_stop" and broker.open_orders() == []


def test_stops_persist_and_trigger_across_instances(tmp_path: Path) -> None:
    state = tmp_path / "real.json"
    clock, exchange, broker = real(at(DAY, 10, 0, 20), state_file=state)
    broker.place_order(request("700", Side.BUY, 300))
    trigger = below(exchange.quote("700").last_price, "0.97")
    placed = broker.place_stop_order(stop("700", 300, trigger, client_order_id="kept"))
    saved = json.loads(state.read_text())
    assert saved["account_kind"] == "real"
    [stored] = [o for o in saved["orders"] if o["order_type"] == "stop"]
    assert D(stored["aux_price"]) == trigger and stored["status"] == "submitted"

    # The next cron run: a new process on the same file sees the resting stop and its reservation.
    later_clock, reopened, broker2 = real(at(DAY, 10, 0, 20), state_file=state)
    assert broker2.account_id == "SIM-REAL-42" and broker2.open_orders() == [placed]
    assert broker2.positions() == broker.positions() and broker2.positions()[0].sellable_quantity == 0
    reopened.apply_shock("700", -0.10)
    later_clock.now = at(DAY, 10, 1, 5)
    fill = broker2.find_order("kept")
    assert fill is not None and fill.status is OrderStatus.FILLED and fill.avg_fill_price < trigger  # type: ignore[operator]
    clock.now = at(DAY, 10, 1, 5)
    assert broker.find_order("kept") == fill and broker.positions() == []  # the first instance reads the fill

    with pytest.raises(ConfigError, match=r"holds a real account \(seed 42\); it cannot be opened as a paper"):
        make(at(DAY, 10, 1, 5), state_file=state)


def test_version_1_state_file_loads_as_a_paper_account(tmp_path: Path) -> None:
    state = tmp_path / "v1.json"
    _, _, paper = make(at(DAY, 10, 0), state_file=state)
    paper.place_order(request("700", Side.BUY, 100))
    old = json.loads(state.read_text())
    old["version"] = 1
    del old["account_kind"]  # what the code before REAL-flavoured accounts wrote
    state.write_text(json.dumps(old))

    _, _, reopened = make(at(DAY, 10, 0), state_file=state)
    assert reopened.positions() == paper.positions() and reopened.account().is_paper
    reopened.place_order(request("700", Side.BUY, 100))
    saved = json.loads(state.read_text())
    assert (saved["version"], saved["account_kind"]) == (2, "paper")  # rewritten in the current version
    with pytest.raises(ConfigError, match="holds a paper account"):
        real(at(DAY, 10, 0), state_file=state)
