"""Broker-side protective stops in a REAL account, end to end: ``FutuClient`` (REAL, unlocked) through the real
futu-api client, the fake OpenD's wire protocol, and a REAL-flavoured ``SimBroker`` behind it.

This is the path the agent takes after an entry fills in a REAL account: place a STOP sell with its trigger in
``aux_price``, find it again among the open orders (the guard's check that it still exists), cancel it (how a
test makes it "vanish"), and see it fill when the market trades through the trigger.
"""

from __future__ import annotations

import faulthandler
from collections.abc import Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from pydantic import SecretStr

from brokers import hkex
from brokers.base import OrderRequest, OrderStatus, OrderType, Side
from brokers.futu import FutuClient, RateLimiter
from brokers.sim import AccountKind, SimBroker, SimExchange
from config.errors import OrderRejected
from config.settings import FutuSettings
from tests.fakes.opend import TRD_MODIFY_ORDER, TRD_PLACE_ORDER, FakeOpenD

HKT = ZoneInfo("Asia/Hong_Kong")
START = datetime(2026, 11, 20, 10, 15, 20, tzinfo=HKT)  # a Friday, continuous morning session
TENCENT = "HK.00700"  # lot 100
PASSWORD = "s3cret-pin"


class Clock:
    """One clock for the exchange, the fake and the client, moved by hand."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


class FakeTime:
    """A monotonic clock whose ``sleep`` only advances it, so the client's rate limiter never waits for real."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.0)


@pytest.fixture(autouse=True)
def hang_guard() -> Iterator[None]:
    faulthandler.dump_traceback_later(60, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def real_exchange(clock: Clock) -> SimExchange:
    return SimExchange(seed=3, clock=clock)


@pytest.fixture
def real_broker(real_exchange: SimExchange) -> SimBroker:
    return SimBroker(real_exchange, account_kind=AccountKind.REAL)


@pytest.fixture
def fake(clock: Clock, real_exchange: SimExchange, real_broker: SimBroker) -> Iterator[FakeOpenD]:
    paper = SimExchange(seed=3, clock=clock)
    with FakeOpenD(
        real_exchange, SimBroker(paper), real_broker=real_broker, clock=clock, trade_password=PASSWORD
    ) as server:
        yield server


@pytest.fixture
def client(fake: FakeOpenD, clock: Clock) -> Iterator[FutuClient]:
    fake_time = FakeTime()
    settings = FutuSettings(host="127.0.0.1", port=fake.port, connect_timeout_s=5, request_timeout_s=5, trd_env="REAL")
    futu_client = FutuClient(
        settings,
        live_confirmed=True,
        trade_password=SecretStr(PASSWORD),
        clock=clock,
        limiter=RateLimiter(monotonic=fake_time.monotonic, sleep=fake_time.sleep, margin_s=0),
        sleep=fake_time.sleep,
    )
    try:
        yield futu_client
    finally:
        futu_client.close()


def buy_tencent(client: FutuClient, exchange: SimExchange, quantity: int = 300) -> None:
    ask = exchange.quote(TENCENT).ask_price
    assert ask is not None
    entry = OrderRequest(client_order_id="entry", symbol=TENCENT, side=Side.BUY, quantity=quantity, limit_price=ask)
    assert client.place_order(entry).status is OrderStatus.FILLED


def trigger_under(exchange: SimExchange, factor: str) -> Decimal:
    return hkex.round_to_tick(exchange.quote(TENCENT).last_price * Decimal(factor), Side.BUY, START.date())


def test_real_stop_round_trips_through_futu_api_and_cancels(
    client: FutuClient, fake: FakeOpenD, real_exchange: SimExchange, real_broker: SimBroker
) -> None:
    assert (client.is_paper, client.account().is_paper) == (False, False)
    buy_tencent(client, real_exchange)
    trigger = trigger_under(real_exchange, "0.95")
    request = OrderRequest(
        client_order_id="stop-1",
        symbol=TENCENT,
        side=Side.SELL,
        quantity=300,
        order_type=OrderType.STOP,
        aux_price=trigger,
    )
    placed = client.place_stop_order(request)
    assert (placed.status, placed.order_type, placed.aux_price) == (OrderStatus.SUBMITTED, OrderType.STOP, trigger)
    assert (placed.client_order_id, placed.symbol, placed.side, placed.quantity) == ("stop-1", TENCENT, Side.SELL, 300)
    sent = fake.requests_for(TRD_PLACE_ORDER)[-1]
    assert (sent["orderType"], Decimal(str(sent["auxPrice"])), sent["remark"]) == (10, trigger, "stop-1")  # Stop

    # The guard's check: the stop is among the open orders, with its type and trigger, and it holds the shares.
    [listed] = [o for o in client.open_orders() if o.client_order_id == "stop-1"]
    assert (listed.broker_order_id, listed.order_type, listed.aux_price) == (
        placed.broker_order_id,
        OrderType.STOP,
        trigger,
    )
    assert listed.status is OrderStatus.SUBMITTED and listed.limit_price is None
    assert [o.broker_order_id for o in real_broker.open_orders()] == [placed.broker_order_id]
    [position] = client.positions()
    assert (position.quantity, position.sellable_quantity) == (300, 0)

    # The stop "vanishes": cancelled at the broker, it is gone from the open orders and the shares are free.
    cancelled = client.cancel_order(placed.broker_order_id)
    assert cancelled.status is OrderStatus.CANCELLED and cancelled.order_type is OrderType.STOP
    assert fake.count(TRD_MODIFY_ORDER) == 1
    assert client.open_orders() == [] and real_broker.open_orders() == []
    assert client.positions()[0].sellable_quantity == 300
    assert client.find_order("stop-1") == cancelled  # still findable by its remark, as cancelled


def test_real_stop_limit_round_trips_with_both_prices(
    client: FutuClient, fake: FakeOpenD, real_exchange: SimExchange
) -> None:
    buy_tencent(client, real_exchange, quantity=100)
    trigger, limit = trigger_under(real_exchange, "0.95"), trigger_under(real_exchange, "0.94")
    request = OrderRequest(
        client_order_id="stop-limit-1",
        symbol=TENCENT,
        side=Side.SELL,
        quantity=100,
        order_type=OrderType.STOP_LIMIT,
        limit_price=limit,
        aux_price=trigger,
    )
    placed = client.place_stop_order(request)
    [listed] = client.open_orders()
    assert (listed.broker_order_id, listed.order_type) == (placed.broker_order_id, OrderType.STOP_LIMIT)
    assert (listed.aux_price, listed.limit_price) == (trigger, limit)
    sent = fake.requests_for(TRD_PLACE_ORDER)[-1]
    assert (sent["orderType"], Decimal(str(sent["price"])), Decimal(str(sent["auxPrice"]))) == (11, limit, trigger)


def test_real_stop_fills_when_the_market_trades_through_it(
    client: FutuClient, clock: Clock, real_exchange: SimExchange
) -> None:
    buy_tencent(client, real_exchange)
    trigger = trigger_under(real_exchange, "0.97")
    request = OrderRequest(
        client_order_id="stop-2",
        symbol=TENCENT,
        side=Side.SELL,
        quantity=300,
        order_type=OrderType.STOP,
        aux_price=trigger,
    )
    client.place_stop_order(request)
    real_exchange.apply_shock(TENCENT, -0.10)  # the market drops through the trigger
    clock.now = START + timedelta(minutes=1)  # the next minute bar triggers the stop
    filled = client.find_order("stop-2")
    assert filled is not None and filled.status is OrderStatus.FILLED and filled.filled_quantity == 300
    assert filled.avg_fill_price is not None and filled.avg_fill_price <= trigger
    assert client.open_orders() == [] and client.positions() == []


def test_real_stop_above_the_market_comes_back_as_a_clear_rejection(
    client: FutuClient, fake: FakeOpenD, real_exchange: SimExchange, real_broker: SimBroker
) -> None:
    buy_tencent(client, real_exchange, quantity=100)
    last = real_exchange.quote(TENCENT).last_price
    request = OrderRequest(
        client_order_id="stop-too-high",
        symbol=TENCENT,
        side=Side.SELL,
        quantity=100,
        order_type=OrderType.STOP,
        aux_price=last,
    )
    with pytest.raises(OrderRejected, match=r"broker rejected it .*the stop would trigger at once") as info:
        client.place_stop_order(request)
    assert "No order was sent" in str(info.value)
    assert fake.count(TRD_PLACE_ORDER) == 2  # entry + the refused stop; the refusal was not retried
    assert real_broker.open_orders() == [] and client.positions()[0].sellable_quantity == 100


# ---------------------------------------------------------------------------------------------------------------
# The agent's own path in a REAL account: the executor arms the stop after the entry fills; the guard finds a
# vanished stop and re-arms it. Our code runs in-process (the REAL switch refuses --now on the command line),
# against the real futu-api client and the fake OpenD.


def agent_run(journal, settings, mode: str):
    import uuid

    from agent import Run
    from data.alerts import Alerter

    run = Run(run_id=uuid.uuid4().hex, journal=journal)
    run.cycle_id = journal.start_cycle(
        run_id=run.run_id, mode=mode, broker="futu", brain="none", model=None, started_at=START,
        trading_date=START.date(),
    )  # fmt: skip
    run.alerter = Alerter(settings.alerts, None, journal)
    return run


def test_the_agent_arms_a_broker_stop_after_an_entry_and_the_guard_rearms_a_vanished_one(
    client: FutuClient, real_exchange: SimExchange, real_broker: SimBroker, clock: Clock, journal
) -> None:
    import structlog

    import agent
    from config.settings import Settings
    from tool_executor import ToolGate

    settings = Settings.model_validate({"broker": {"name": "futu", "futu": {"trd_env": "REAL"}}})
    log = structlog.get_logger("test")
    run = agent_run(journal, settings, "trade")
    ctx = agent.make_context(settings, run, client, client, clock, dry_run=False)
    gate = ToolGate(ctx)
    quote = real_exchange.quote(TENCENT)
    entry = quote.ask_price
    stop = hkex.round_to_tick(entry * Decimal("0.97"), Side.BUY, START.date())
    target = hkex.round_to_tick(entry * Decimal("1.08"), Side.SELL, START.date())
    trade = {"symbol": "700", "side": "buy", "quantity": 100, "stop_loss": float(stop), "take_profit": float(target)}
    approved = gate.handle("check_risk", {**trade, "entry_price": float(entry)})
    assert approved.allowed, approved.result
    placed = gate.handle("execute_trade", {**trade, "limit_price": float(entry)})
    assert placed.allowed and not placed.is_error, placed.result

    armed = journal.protective_stops()[TENCENT]
    assert armed.broker_stop_order_id
    (stop_order,) = [o for o in real_broker.open_orders() if o.order_type is OrderType.STOP]
    assert (stop_order.aux_price, stop_order.quantity) == (stop, 100)
    assert stop_order.broker_order_id == armed.broker_stop_order_id

    # The stop vanishes at the broker (cancelled in the app, expired...): the guard puts it back.
    real_broker.cancel_order(stop_order.broker_order_id)
    clock.now += timedelta(minutes=5)
    guard_run = agent_run(journal, settings, "guard")
    assert agent.run_guard(settings, guard_run, client, client, clock, log) == agent.EXIT_OK
    (rearmed,) = [o for o in real_broker.open_orders() if o.order_type is OrderType.STOP]
    assert rearmed.broker_order_id != stop_order.broker_order_id and rearmed.aux_price == stop
    assert journal.protective_stops()[TENCENT].broker_stop_order_id == rearmed.broker_order_id
    assert "broker stop re-armed" in (journal.get_cycle(guard_run.cycle_id).summary or "")
    assert "guard_action" in [a.event for a in journal.alerts_since(START - timedelta(days=1))]

    # Closing the position cancels the broker stop first, so the two can never both sell.
    closed = gate.handle("close_position", {"symbol": "700", "reason": "done"})
    assert not closed.is_error, closed.result
    assert [o for o in real_broker.open_orders() if o.order_type is OrderType.STOP] == []
    assert real_broker.positions() == []
