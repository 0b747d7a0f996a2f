"""Replay fills that do not flatter: an order decided at t fills against bars after t, with slippage and costs.

Each test writes the few bars that matter into a ``MemoryStore`` (flat HK$10.00 otherwise) and moves the
replay clock as the runner would.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from decimal import Decimal

import numpy as np
import pytest

from brokers import hkex
from brokers.base import OrderRequest, OrderStatus, OrderType, Side
from config.errors import OrderRejected
from replay.broker import ReplayBroker
from replay.clock import HKT, ReplayClock
from replay.feed import DailyBar, InstrumentInfo, MemoryStore, ReplayFeed, SessionBars, epoch, sessions_before
from replay.feed import _segments as segments

DAY = date(2026, 9, 8)
SYM = "HK.00883"
LOT = 1000
CASH = Decimal(1_000_000)


def at(hhmm: str) -> datetime:
    return datetime.combine(DAY, datetime.strptime(hhmm, "%H:%M").time(), HKT)


def flat_day() -> dict[int, list[int]]:
    """Minute bar start epoch -> [open, high, low, close] in milli-HKD, all HK$10.00."""
    bars = {}
    for start, end in segments(DAY):
        for t in range(start, end, 60):
            bars[t] = [10_000, 10_000, 10_000, 10_000]
    return bars


def market(edits: dict[str, tuple[int, int, int, int]] | None = None) -> MemoryStore:
    store = MemoryStore({SYM: InstrumentInfo(SYM, "CNOOC", LOT)})
    bars = flat_day()
    for hhmm, ohlc in (edits or {}).items():
        bars[epoch(at(hhmm))] = list(ohlc)
    starts = np.array(sorted(bars), dtype=np.int64)
    o, h, lo, c = (np.array([bars[t][k] for t in starts], dtype=np.int64) for k in range(4))
    store.put_session(SYM, DAY, SessionBars(starts, o, h, lo, c, np.full(starts.size, 5_000, dtype=np.int64)))
    for day in sessions_before(DAY, 5):
        store.put_daily(SYM, day, DailyBar(10_000, 10_000, 10_000, 10_000, 1_000_000))
    return store


def account(store: MemoryStore, now: str, slippage_ticks: int = 1) -> tuple[ReplayBroker, ReplayClock]:
    clock = ReplayClock(at(now))
    feed = ReplayFeed(store, clock)
    broker = ReplayBroker(
        feed, clock, starting_cash=CASH, commission_pct=0.0003, min_commission=Decimal(3), slippage_ticks=slippage_ticks
    )
    return broker, clock


def order(
    side: Side, quantity: int = LOT, limit: str | None = None, kind: OrderType = OrderType.LIMIT, aux: str | None = None
):
    return OrderRequest(
        client_order_id=f"t-{side.value}-{limit}-{kind.value}",
        symbol=SYM,
        side=side,
        quantity=quantity,
        order_type=kind,
        limit_price=Decimal(limit) if limit else None,
        aux_price=Decimal(aux) if aux else None,
    )


def status(broker: ReplayBroker, client_order_id: str):
    found = broker.find_order(client_order_id)
    assert found is not None
    return found


def test_a_marketable_limit_fills_at_the_next_bars_open_plus_slippage_and_only_once_that_bar_ended() -> None:
    store = market({"10:00": (10_020, 10_050, 10_000, 10_040)})
    broker, clock = account(store, "10:00")
    placed = broker.place_order(order(Side.BUY, limit="10.10"))
    assert placed.status is OrderStatus.SUBMITTED  # decided at 10:00: nothing after 10:00 has happened yet
    clock.advance_to(at("10:00") + timedelta(seconds=59))
    assert status(broker, placed.client_order_id).status is OrderStatus.SUBMITTED
    clock.advance_to(at("10:01"))
    filled = status(broker, placed.client_order_id)
    assert filled.status is OrderStatus.FILLED and filled.avg_fill_price == Decimal("10.03")  # 10.02 + 1 tick
    costs = hkex.trading_costs(Decimal("10030.00"), Decimal("0.0003"), Decimal(3)).total
    assert broker.account().cash == CASH - Decimal("10030.00") - costs
    assert broker.state.fills[0].time == at("10:00")


def test_a_bar_before_the_decision_never_fills_an_order() -> None:
    store = market({"09:59": (10_000, 10_000, 9_000, 10_000)})  # a deep dip one minute before the order
    broker, clock = account(store, "10:00")
    placed = broker.place_order(order(Side.BUY, limit="9.50"))
    clock.advance_to(at("11:00"))
    assert status(broker, placed.client_order_id).status is OrderStatus.SUBMITTED


def test_a_marketable_limit_whose_next_open_is_beyond_it_rests_and_fills_only_when_traded_through() -> None:
    store = market(
        {
            "10:00": (10_050, 10_060, 10_030, 10_040),  # opens above the 10.00 limit: no fill at the open
            "10:05": (10_010, 10_020, 10_000, 10_010),  # touches 10.00 only: not traded through
            "10:20": (10_020, 10_020, 9_990, 10_000),  # trades through: fills at the limit
        }
    )
    store_bars = store.session(SYM, DAY)
    assert store_bars is not None
    broker, clock = account(store, "10:00")
    placed = broker.place_order(order(Side.BUY, limit="10.00"))  # last is 10.00: marketable when decided
    clock.advance_to(at("10:10"))
    assert status(broker, placed.client_order_id).status is OrderStatus.SUBMITTED
    clock.advance_to(at("10:30"))
    filled = status(broker, placed.client_order_id)
    assert filled.status is OrderStatus.FILLED and filled.avg_fill_price == Decimal("10.00")
    assert broker.state.fills[0].time == at("10:20")


def test_a_market_sell_fills_at_the_next_open_less_slippage() -> None:
    store = market({"10:05": (9_950, 9_960, 9_900, 9_920)})
    broker, clock = account(store, "10:00", slippage_ticks=2)
    broker.place_order(order(Side.BUY, limit="10.10"))
    clock.advance_to(at("10:05"))
    sell = broker.place_order(order(Side.SELL, kind=OrderType.MARKET))
    clock.advance_to(at("10:06"))
    assert status(broker, sell.client_order_id).avg_fill_price == Decimal("9.93")  # 9.95 - 2 ticks


@pytest.mark.parametrize(
    ("bar", "expected"),
    [
        ((9_700, 9_800, 9_450, 9_600), "9.49"),  # trades down through the 9.50 trigger: the trigger, less a tick
        ((9_300, 9_400, 9_200, 9_350), "9.29"),  # gaps below the trigger: the (worse) open, less a tick
    ],
)
def test_a_stop_fills_at_the_stop_or_a_worse_gap_open(bar: tuple[int, int, int, int], expected: str) -> None:
    store = market({"10:30": bar})
    broker, clock = account(store, "10:00")
    broker.place_order(order(Side.BUY, limit="10.10"))
    clock.advance_to(at("10:05"))
    stop = broker.place_stop_order(order(Side.SELL, kind=OrderType.STOP, aux="9.50"))
    clock.advance_to(at("11:00"))
    filled = status(broker, stop.client_order_id)
    assert filled.status is OrderStatus.FILLED and filled.avg_fill_price == Decimal(expected)


def test_an_order_not_filled_by_the_close_expires() -> None:
    broker, clock = account(market(), "15:00")
    placed = broker.place_order(order(Side.BUY, limit="9.00"))
    clock.advance_to(at("15:59"))
    assert status(broker, placed.client_order_id).status is OrderStatus.SUBMITTED
    clock.advance_to(at("16:00"))
    expired = status(broker, placed.client_order_id)
    assert expired.status is OrderStatus.CANCELLED and "Expired unfilled at the close" in expired.message
    assert broker.open_orders() == [] and broker.account().buying_power == CASH


@pytest.mark.parametrize(
    ("request_", "match"),
    [
        (order(Side.BUY, quantity=1500, limit="10.00"), "multiple of the 1000-share board lot"),  # odd lot
        (order(Side.BUY, limit="10.005"), "not on the HKEX tick grid"),  # off the grid
        (order(Side.SELL, limit="10.00"), "short selling is not allowed"),  # nothing held
        (order(Side.BUY, quantity=200_000, limit="10.00"), "buying power"),  # HK$2m > HK$1m
        (order(Side.SELL, kind=OrderType.STOP, aux="10.50"), "trigger below the last price"),  # stop above market
    ],
)
def test_orders_breaking_hkex_rules_are_rejected_and_change_nothing(request_: OrderRequest, match: str) -> None:
    broker, _clock = account(market(), "10:00")
    with pytest.raises(OrderRejected, match=match):
        broker.place_order(request_)
    assert broker.state.orders == [] and broker.account().cash == CASH


def test_orders_outside_continuous_trading_are_rejected() -> None:
    broker, _clock = account(market(), "12:30")
    with pytest.raises(OrderRejected, match="not in continuous trading"):
        broker.place_order(order(Side.BUY, limit="10.00"))


def test_a_position_still_open_at_the_end_is_listed_with_its_mark_but_not_scored_as_a_round_trip(journal) -> None:
    from types import SimpleNamespace

    from replay import score
    from replay.runner import ReplayRun

    store = market({"10:00": (10_000, 10_000, 10_000, 10_000), "15:58": (10_500, 10_500, 10_500, 10_500)})
    broker, clock = account(store, "10:00", slippage_ticks=0)
    broker.place_order(order(Side.BUY, quantity=2 * LOT, limit="10.10"))
    clock.advance_to(at("15:59"))
    run = ReplayRun(1, "rules", "rules-v1", "run_1", CASH, broker=broker, journal=SimpleNamespace(journal=journal))
    run.closes = [(DAY, broker.account().equity)]
    (trade,) = score.round_trips(run)
    assert trade.exit_time is None and trade.exit_price is None and "open at the end" in trade.exit_reason
    fees = broker.state.fees
    assert trade.pnl_hkd == (Decimal("10.50") - Decimal("10.00")) * 2 * LOT - fees
    assert (
        score.report_json(score.Report(1, DAY, DAY, "rules", "synthetic", False, {}, [], [trade]))["trades"][0][
            "exit_time"
        ]
        is None
    )
