"""``BrokerView``: the cycle's reads of the account are reused only while nothing can have changed them.

In process on the simulated exchange (the same account the agent trades in the demo); the broker's
``positions`` reads are counted at the broker.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

from brokers import hkex
from brokers.base import OrderRequest, OrderType, Position, Side
from brokers.sim import SimBroker, SimExchange
from tool_executor import BrokerView

HK = ZoneInfo("Asia/Hong_Kong")
NOW = datetime(2025, 11, 20, 10, 30, tzinfo=HK)  # a Thursday morning session
SYMBOL = "HK.00700"


class CountingSim(SimBroker):
    """The simulated account, counting how often its positions are read."""

    reads = 0

    def positions(self) -> list[Position]:
        self.reads += 1
        return super().positions()


def account(clock: list[datetime] | None = None) -> CountingSim:
    moment = clock if clock is not None else [NOW]
    exchange = SimExchange(42, lambda: moment[0], None, Decimal(1_000_000), 0.0003, Decimal(3))
    return CountingSim(exchange)


def buy(broker: CountingSim, view: BrokerView, quantity: int, limit: Decimal | None = None):
    order = broker.place_order(
        OrderRequest(
            client_order_id=f"T-{quantity}-{limit}",
            symbol=SYMBOL,
            side=Side.BUY,
            quantity=quantity,
            order_type=OrderType.LIMIT if limit is not None else OrderType.MARKET,
            limit_price=limit,
        )
    )
    view.invalidate()  # as every write of the agent does (tool_executor.place_order_write_ahead)
    view.note_order(order)
    return order


def test_a_read_after_the_last_write_is_reused_while_no_order_is_working() -> None:
    broker = account()
    view = BrokerView(broker, market=None)  # type: ignore[arg-type]  # quotes are not asked for here
    assert view.open_orders() == []
    assert view.positions() == {} and broker.reads == 1
    assert view.positions_now() == {} and broker.reads == 1  # nothing written, nothing working: the same read

    filled = buy(broker, view, 100)
    assert not filled.is_active
    assert view.positions()[SYMBOL].quantity == 100 and broker.reads == 2  # the write emptied the cache
    assert view.positions_now()[SYMBOL].quantity == 100 and broker.reads == 2


def test_positions_are_read_again_when_a_working_order_may_have_filled_since() -> None:
    clock = [NOW]
    broker = account(clock)
    view = BrokerView(broker, market=None)  # type: ignore[arg-type]
    view.open_orders()
    last = broker.exchange.quote(SYMBOL).last_price
    resting = buy(broker, view, 100, limit=hkex.round_to_tick(last * Decimal("0.95"), Side.BUY, NOW.date()))
    assert resting.is_active
    assert view.positions() == {} and broker.reads == 1
    broker.exchange.apply_shock(SYMBOL, -0.15)  # the market falls through the limit: the buy fills
    clock[0] = NOW + timedelta(minutes=5)
    assert view.positions_now()[SYMBOL].quantity == 100 and broker.reads == 2
    # Once the fill is known (the open orders read again show nothing working), the read is reused again.
    view.invalidate()
    assert view.open_orders() == []
    assert view.positions_now()[SYMBOL].quantity == 100 and broker.reads == 3
    assert view.positions_now()[SYMBOL].quantity == 100 and broker.reads == 3


def test_without_knowing_the_open_orders_positions_are_read_again() -> None:
    broker = account()
    view = BrokerView(broker, market=None)  # type: ignore[arg-type]
    view.positions()
    view.positions_now()
    assert broker.reads == 2
