"""``FutuClient`` through the real futu-api client against ``FakeOpenD`` backed by ``SimExchange``.

The exchange clock is fixed at Friday 2026-11-20 10:15 HKT (continuous morning trading). Rate-limit windows
and retry waits run on a fake monotonic clock whose ``sleep`` only advances time, so nothing waits for real;
a faulthandler deadline turns any hang into a failure.
"""

from __future__ import annotations

import faulthandler
import hashlib
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pydantic import SecretStr

from brokers import hkex
from brokers.base import Broker, MarketData, MarketPhase, Order, OrderRequest, OrderStatus, OrderType, Side
from brokers.futu import FUTU_LIMITS, FutuClient, Limit, RateLimiter
from brokers.futu_failures import Failure, classify_failure
from brokers.sim import SimBroker, SimExchange
from config.errors import (
    BrokerRequestRefused,
    BrokerTemporaryError,
    BrokerUnavailable,
    ConfigError,
    OrderRejected,
    OrderStateUnknown,
)
from config.settings import PROJECT_ROOT, FutuSettings
from tests.fakes.opend import (
    INIT_CONNECT,
    QOT_GET_SECURITY_SNAPSHOT,
    QOT_REQUEST_HISTORY_KL,
    TRD_GET_ACC_LIST,
    TRD_GET_FUNDS,
    TRD_GET_ORDER_LIST,
    TRD_GET_POSITION_LIST,
    TRD_MODIFY_ORDER,
    TRD_PLACE_ORDER,
    TRD_UNLOCK_TRADE,
    FakeOpenD,
)

HKT = ZoneInfo("Asia/Hong_Kong")
NOW = datetime(2026, 11, 20, 10, 15, tzinfo=HKT)
TENCENT = "HK.00700"  # lot 100, tick 0.50 around 600
HSBC = "HK.00005"  # lot 400


def clock() -> datetime:
    return NOW


class FakeTime:
    """A monotonic clock whose ``sleep`` advances it instantly, recording every wait."""

    def __init__(self) -> None:
        self.now = 1_000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += max(seconds, 0.0)


@pytest.fixture(autouse=True)
def hang_guard() -> Iterator[None]:
    faulthandler.dump_traceback_later(60, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def exchange() -> SimExchange:
    return SimExchange(seed=3, clock=clock)


@pytest.fixture
def broker(exchange: SimExchange) -> SimBroker:
    return SimBroker(exchange)


@pytest.fixture
def fake(exchange: SimExchange, broker: SimBroker) -> Iterator[FakeOpenD]:
    with FakeOpenD(exchange, broker, clock=clock) as server:
        yield server


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


def settings_for(port: int, **overrides: Any) -> FutuSettings:
    values: dict[str, Any] = {"host": "127.0.0.1", "port": port, "connect_timeout_s": 5, "request_timeout_s": 5}
    values.update(overrides)
    return FutuSettings(**values)


@pytest.fixture
def connect(fake: FakeOpenD, fake_time: FakeTime) -> Iterator[Callable[..., FutuClient]]:
    """Build FutuClients on the fake (closed after the test); keyword arguments go to the constructor."""
    clients: list[FutuClient] = []

    def make(settings: FutuSettings | None = None, **kwargs: Any) -> FutuClient:
        client = FutuClient(
            settings or settings_for(fake.port),
            clock=clock,
            limiter=RateLimiter(monotonic=fake_time.monotonic, sleep=fake_time.sleep, margin_s=0),
            sleep=fake_time.sleep,
            **kwargs,
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def client(connect: Callable[..., FutuClient]) -> FutuClient:
    return connect()


def limit_request(client_order_id: str, price: Decimal, quantity: int = 100, side: Side = Side.BUY) -> OrderRequest:
    return OrderRequest(
        client_order_id=client_order_id, symbol=TENCENT, side=side, quantity=quantity, limit_price=price
    )


def resting_price(exchange: SimExchange) -> Decimal:
    """A BUY limit 10 % under the market, on the tick grid: it rests."""
    last = exchange.quote(TENCENT).last_price
    return hkex.round_to_tick(last * Decimal("0.9"), Side.BUY, NOW.date())


def marketable_price(exchange: SimExchange) -> Decimal:
    ask = exchange.quote(TENCENT).ask_price
    assert ask is not None
    return ask


# --------------------------------------------------------------------------------------------- connect & reads


def test_client_implements_both_protocols_and_resolves_the_paper_account(client: FutuClient) -> None:
    assert isinstance(client, Broker)
    assert isinstance(client, MarketData)
    assert client.trd_env == "SIMULATE" and client.is_paper
    assert client.account_id == FakeOpenD.SIM_ACC_ID


def test_account_matches_the_paper_account(client: FutuClient, broker: SimBroker) -> None:
    account = client.account()
    expected = broker.account()
    assert account.account_id == str(FakeOpenD.SIM_ACC_ID)
    assert account.is_paper
    assert (account.cash, account.equity, account.market_value, account.buying_power) == (
        expected.cash,
        expected.equity,
        expected.market_value,
        expected.buying_power,
    )


def test_snapshots_of_several_symbols_take_one_request(
    client: FutuClient, fake: FakeOpenD, exchange: SimExchange
) -> None:
    symbols = [TENCENT, HSBC, "HK.00939", "HK.01299", "HK.09988", "HK.99999"]  # the last one is not listed
    quotes = client.snapshots(symbols)
    assert quotes == exchange.snapshots(symbols)
    assert [q.lot_size for q in quotes] == [100, 400, 1000, 200, 100]
    (request,) = fake.requests_for(QOT_GET_SECURITY_SNAPSHOT)
    assert [s["code"] for s in request["securityList"]] == [s.removeprefix("HK.") for s in symbols]


def test_snapshots_are_batched_400_codes_per_request(
    client: FutuClient, fake: FakeOpenD, exchange: SimExchange
) -> None:
    symbols = [f"HK.{i:05d}" for i in range(1, 402)]  # the sim lists a few of these, e.g. 00005 and 00388
    quotes = client.snapshots(symbols)
    sizes = [len(r["securityList"]) for r in fake.requests_for(QOT_GET_SECURITY_SNAPSHOT)]
    assert sizes == [400, 1]
    assert quotes == exchange.snapshots(symbols)
    assert len(quotes) >= 10


@pytest.mark.parametrize("timeframe", ["1m", "5m", "15m", "1h", "1d"])
def test_klines_match_the_exchange_bars(client: FutuClient, exchange: SimExchange, timeframe: str) -> None:
    # Futu labels intraday bars by their end; Bar.time is the start. Equality proves the shift round-trips.
    bars = client.klines(TENCENT, timeframe, 40)
    assert bars == exchange.klines(TENCENT, timeframe, 40)
    assert len(bars) == 40


def test_kline_requests_go_through_request_history_kline(client: FutuClient, fake: FakeOpenD) -> None:
    client.klines(HSBC, "1d", 10)
    requests = fake.requests_for(QOT_REQUEST_HISTORY_KL)
    assert len(requests) == 1
    assert requests[0]["klType"] == 2 and requests[0]["security"] == {"market": 1, "code": "00005"}


def test_index_constituents_news_and_market_state(client: FutuClient, exchange: SimExchange) -> None:
    assert client.index_constituents("HSTECH") == exchange.index_constituents("HSTECH")
    assert client.index_constituents("hsi") == exchange.index_constituents("HSI")
    assert set(client.index_constituents("ALL")) == set(exchange.index_constituents("ALL"))
    since = NOW - timedelta(days=7)
    news = client.news(TENCENT, since)
    expected = exchange.news(TENCENT, since)
    assert [(n.published_at, n.title, n.url) for n in news] == [(n.published_at, n.title, n.url) for n in expected]
    assert news, "the sim publishes news every few days"
    state = client.market_state()
    assert state is not None and state.phase is MarketPhase.MORNING and state.raw == "MORNING"


def test_unknown_index_is_refused(client: FutuClient) -> None:
    with pytest.raises(ValueError, match="HSI, HSCEI, HSTECH, ALL"):
        client.index_constituents("SPX")


# --------------------------------------------------------------------------------------------- orders


def test_marketable_limit_fills_and_becomes_a_position(
    client: FutuClient, fake: FakeOpenD, exchange: SimExchange, broker: SimBroker
) -> None:
    price = marketable_price(exchange)
    order = client.place_order(limit_request("cyc1-buy-1", price, quantity=200))
    assert order.status is OrderStatus.FILLED
    assert (order.filled_quantity, order.client_order_id, order.symbol) == (200, "cyc1-buy-1", TENCENT)
    assert order.avg_fill_price == exchange.quote(TENCENT).last_price
    assert client.positions() == broker.positions()
    assert client.positions()[0].quantity == 200
    assert client.account().cash == broker.account().cash
    (sent,) = fake.requests_for(TRD_PLACE_ORDER)
    assert sent["remark"] == "cyc1-buy-1"
    assert (sent["code"], sent["qty"], sent["price"], sent["trdSide"], sent["orderType"]) == (
        "00700",
        200.0,
        float(price),
        1,
        1,
    )


def test_every_trade_request_names_the_paper_env_and_the_resolved_account(
    client: FutuClient, fake: FakeOpenD, exchange: SimExchange
) -> None:
    client.account()
    client.positions()
    order = client.place_order(limit_request("cyc1-rest-1", resting_price(exchange)))
    client.open_orders()
    client.cancel_order(order.broker_order_id)
    for proto in (TRD_GET_FUNDS, TRD_GET_POSITION_LIST, TRD_GET_ORDER_LIST, TRD_PLACE_ORDER, TRD_MODIFY_ORDER):
        requests = fake.requests_for(proto)
        assert requests, proto
        for request in requests:
            assert request["header"]["trdEnv"] == 0, (proto, request)  # TrdEnv_Simulate, never the default REAL
            assert request["header"]["accID"] == str(FakeOpenD.SIM_ACC_ID), (proto, request)


def test_resting_limit_is_listed_then_cancelled(client: FutuClient, exchange: SimExchange, broker: SimBroker) -> None:
    price = resting_price(exchange)
    order = client.place_order(limit_request("cyc1-rest-2", price))
    assert order.status is OrderStatus.SUBMITTED and order.limit_price == price
    assert [o.broker_order_id for o in client.open_orders()] == [order.broker_order_id]
    cancelled = client.cancel_order(order.broker_order_id)
    assert cancelled.status is OrderStatus.CANCELLED
    assert cancelled.broker_order_id == order.broker_order_id
    assert client.open_orders() == []
    assert broker.open_orders() == []


def test_cancelling_a_filled_order_returns_it_as_it_is(client: FutuClient, exchange: SimExchange) -> None:
    filled = client.place_order(limit_request("cyc1-buy-2", marketable_price(exchange)))
    assert client.cancel_order(filled.broker_order_id).status is OrderStatus.FILLED


def test_a_new_client_finds_the_order_placed_before_a_crash(
    connect: Callable[..., FutuClient], fake: FakeOpenD, exchange: SimExchange
) -> None:
    first = connect()
    placed = first.place_order(limit_request("cyc7-entry-HK.00700", resting_price(exchange)))
    # The first process dies here without cleaning up; a restarted agent connects afresh.
    second = connect()
    found = second.find_order("cyc7-entry-HK.00700")
    assert found is not None
    assert (found.broker_order_id, found.status, found.limit_price) == (
        placed.broker_order_id,
        OrderStatus.SUBMITTED,
        placed.limit_price,
    )
    assert second.find_order("cyc7-never-sent") is None
    assert fake.count(TRD_PLACE_ORDER) == 1


@pytest.mark.parametrize(
    ("quantity", "price", "message"),
    [
        (150, Decimal("500.0"), r"quantity must be a multiple of the 100-share lot \(nearest: 100\)"),  # odd lot
        (100, Decimal("500.3"), r"limit price 500\.3 is not on the HKEX tick grid .*500\.0"),  # 0.50 tick at 500
        (100, Decimal("0"), r"needs a positive limit price"),
    ],
)
def test_odd_lots_and_off_tick_prices_are_refused_before_sending(
    client: FutuClient, fake: FakeOpenD, quantity: int, price: Decimal, message: str
) -> None:
    request = OrderRequest(
        client_order_id="cyc1-bad", symbol=TENCENT, side=Side.BUY, quantity=quantity, limit_price=price
    )
    with pytest.raises(OrderRejected, match=message) as caught:
        client.place_order(request)
    assert str(caught.value).startswith(f"Could not place limit BUY {quantity} HK.00700 @ {price}: ")
    assert str(caught.value).endswith("No order was sent.")
    assert fake.count(TRD_PLACE_ORDER) == 0


def test_exchange_rejection_becomes_order_rejected_with_the_brokers_reason(
    client: FutuClient, fake: FakeOpenD, exchange: SimExchange, broker: SimBroker
) -> None:
    too_big = limit_request("cyc1-huge", marketable_price(exchange), quantity=100_000)  # ~HK$60m, cash is HK$1m
    with pytest.raises(
        OrderRejected, match=r"limit BUY 100000 HK\.00700 .*broker rejected it .*buying power"
    ) as caught:
        client.place_order(too_big)
    assert "No order was sent." in str(caught.value)
    assert fake.count(TRD_PLACE_ORDER) == 1
    assert broker.orders() == []


def test_paper_account_refuses_stop_orders_before_sending(client: FutuClient, fake: FakeOpenD) -> None:
    stop = OrderRequest(
        client_order_id="cyc1-stop",
        symbol=TENCENT,
        side=Side.SELL,
        quantity=100,
        order_type=OrderType.STOP,
        aux_price=Decimal("580.0"),
    )
    with pytest.raises(OrderRejected, match="paper trading has no stop orders"):
        client.place_stop_order(stop)
    assert fake.count(TRD_PLACE_ORDER) == 0


def test_preview_uses_hkex_costs(client: FutuClient, exchange: SimExchange, broker: SimBroker) -> None:
    request = limit_request("cyc1-preview", Decimal("600.0"), quantity=300)
    preview = client.preview_order(request)
    costs = hkex.trading_costs(Decimal("180000.0"), Decimal("0.0003"), Decimal(3)).total
    assert (preview.gross_value, preview.costs, preview.net_cash_change) == (
        Decimal("180000.0"),
        costs,
        -(Decimal("180000.0") + costs),
    )
    assert preview == broker.preview_order(request)  # same rules as the paper exchange


# --------------------------------------------------------------------------------------------- failures


def test_rate_limited_read_waits_out_the_window_and_succeeds(
    client: FutuClient, fake: FakeOpenD, fake_time: FakeTime
) -> None:
    fake.rate_limit_next(QOT_GET_SECURITY_SNAPSHOT)
    quotes = client.snapshots([TENCENT])
    assert [q.symbol for q in quotes] == [TENCENT]
    assert fake.count(QOT_GET_SECURITY_SNAPSHOT) == 2
    # The retry's own short wait plus the limiter's wait add up to the whole 30 s window.
    assert sum(fake_time.sleeps) >= FUTU_LIMITS["snapshot"].window_s


def test_rate_limited_placement_is_not_resent(
    client: FutuClient, fake: FakeOpenD, exchange: SimExchange, broker: SimBroker
) -> None:
    first = client.place_order(limit_request("cyc1-a", marketable_price(exchange)))
    fake.rate_limit_next(TRD_PLACE_ORDER)
    with pytest.raises(OrderRejected, match=r"rate limit.*No order was sent; wait 30 s") as caught:
        client.place_order(limit_request("cyc1-b", marketable_price(exchange)))
    assert caught.value.code == Failure.RATE_LIMITED.value
    assert fake.count(TRD_PLACE_ORDER) == 2  # one success, one refusal, no blind resend
    assert [o.client_order_id for o in broker.orders()] == [first.client_order_id]


def test_dropped_connection_is_reopened_on_the_next_call(
    client: FutuClient, fake: FakeOpenD, exchange: SimExchange
) -> None:
    client.account()
    handshakes = fake.count(INIT_CONNECT)
    fake.drop_connections()
    assert client.snapshots([HSBC])[0].lot_size == 400
    assert client.account().is_paper
    order = client.place_order(limit_request("cyc1-after-drop", marketable_price(exchange)))
    assert order.status is OrderStatus.FILLED
    assert fake.count(INIT_CONNECT) == handshakes + 2  # quote and trade contexts each reconnected once


def test_opend_gone_mid_run_raises_broker_unavailable(client: FutuClient, fake: FakeOpenD) -> None:
    client.account()
    fake.stop()
    with pytest.raises(BrokerUnavailable, match=rf"OpenD is not reachable at 127\.0\.0\.1:{fake.port}"):
        client.account()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_opend_down_raises_broker_unavailable_with_instructions() -> None:
    port = _free_port()
    expected = (
        rf"^OpenD is not reachable at 127\.0\.0\.1:{port} \(connection refused\)\. Start it with "
        r"`docker compose -f docker-compose\.opend\.yml up -d`, then run `python scripts/test_connection\.py`\. "
        r"No order was sent\.$"
    )
    with pytest.raises(BrokerUnavailable, match=expected):
        FutuClient(settings_for(port, connect_timeout_s=1), clock=clock)


def test_opend_that_never_answers_the_handshake_is_abandoned(fake: FakeOpenD) -> None:
    fake.stall_next(INIT_CONNECT, None)
    with pytest.raises(BrokerUnavailable, match=r"did not complete the quote handshake within 0\.5 s"):
        FutuClient(settings_for(fake.port, connect_timeout_s=0.5), clock=clock)


def test_real_trading_needs_live_confirmation(fake: FakeOpenD) -> None:
    with pytest.raises(ConfigError, match=r"trd_env is REAL but live trading was not confirmed\. Pass --live"):
        FutuClient(settings_for(fake.port, trd_env="REAL"), clock=clock)
    assert fake.accepted_connections == 0  # refused before touching OpenD


@pytest.fixture
def real_fake(exchange: SimExchange) -> Iterator[tuple[FakeOpenD, SimBroker]]:
    """An OpenD with a paper and a REAL account (each backed by its own sim account)."""
    real_exchange = SimExchange(seed=3, clock=clock)
    real_broker = SimBroker(real_exchange)
    with FakeOpenD(
        exchange, SimBroker(exchange), real_broker=real_broker, clock=clock, trade_password="s3cret-pin"
    ) as server:
        yield server, real_broker


def test_real_account_is_unlocked_and_used_when_confirmed(real_fake: tuple[FakeOpenD, SimBroker]) -> None:
    fake, real_broker = real_fake
    client = FutuClient(
        settings_for(fake.port, trd_env="REAL"),
        live_confirmed=True,
        trade_password=SecretStr("s3cret-pin"),
        clock=clock,
    )
    try:
        assert (client.trd_env, client.is_paper, client.account_id) == ("REAL", False, FakeOpenD.REAL_ACC_ID)
        assert fake.unlocked
        (unlock,) = fake.requests_for(TRD_UNLOCK_TRADE)
        assert unlock["pwdMD5"] == hashlib.md5(b"s3cret-pin").hexdigest()
        assert "s3cret-pin" not in repr(fake.requests)
        price = real_broker.exchange.quote(TENCENT).ask_price
        assert price is not None
        order = client.place_order(limit_request("real-1", price))
        assert order.status is OrderStatus.FILLED
        assert [o.client_order_id for o in real_broker.orders()] == ["real-1"]
        (sent,) = fake.requests_for(TRD_PLACE_ORDER)
        header = sent["header"]
        assert (header["trdEnv"], header["accID"], header["trdMarket"]) == (1, str(FakeOpenD.REAL_ACC_ID), 1)
    finally:
        client.close()


def test_real_stop_order_is_sent_with_its_trigger(real_fake: tuple[FakeOpenD, SimBroker]) -> None:
    fake, _ = real_fake
    client = FutuClient(
        settings_for(fake.port, trd_env="REAL"),
        live_confirmed=True,
        trade_password=SecretStr("s3cret-pin"),
        clock=clock,
    )
    stop = OrderRequest(
        client_order_id="real-stop",
        symbol=TENCENT,
        side=Side.SELL,
        quantity=100,
        order_type=OrderType.STOP,
        aux_price=Decimal("550.0"),
    )
    try:
        # The sim behind the fake's REAL account has no stop orders, so it refuses; what matters is what was sent.
        with pytest.raises(OrderRejected, match="not supported by paper accounts"):
            client.place_stop_order(stop)
    finally:
        client.close()
    (sent,) = fake.requests_for(TRD_PLACE_ORDER)
    assert (sent["orderType"], sent["auxPrice"], sent["remark"]) == (10, 550.0, "real-stop")  # OrderType_Stop


def test_wrong_trade_password_is_a_config_error(real_fake: tuple[FakeOpenD, SimBroker]) -> None:
    fake, _ = real_fake
    with pytest.raises(ConfigError, match=r"OpenD refused to unlock REAL trading: .*Check FUTU_TRADE_PWD"):
        FutuClient(
            settings_for(fake.port, trd_env="REAL"), live_confirmed=True, trade_password=SecretStr("wrong"), clock=clock
        )


# --------------------------------------------------------------------------------------------- error table


@dataclass(frozen=True)
class Case:
    name: str
    arm: Callable[[FakeOpenD], None]
    act: Callable[[FutuClient, SimExchange], Any]
    error: type[Exception] | None
    proto: int
    sent: int  # requests of ``proto`` that reached OpenD
    orders_at_exchange: int | None = None  # for placements
    request_timeout_s: float = 5.0  # short where the test waits for a reply that never comes


def _times(n: int, arm: Callable[[FakeOpenD], None]) -> Callable[[FakeOpenD], None]:
    def arm_n(fake: FakeOpenD) -> None:
        for _ in range(n):
            arm(fake)

    return arm_n


def _place(client: FutuClient, exchange: SimExchange) -> Order:
    return client.place_order(limit_request("table-1", marketable_price(exchange)))


def _place_and_cancel(client: FutuClient, exchange: SimExchange) -> Order:
    order = client.place_order(limit_request("table-2", resting_price(exchange)))
    return client.cancel_order(order.broker_order_id)


def _stall_then_lookups_fail(fake: FakeOpenD) -> None:
    fake.stall_next(TRD_PLACE_ORDER, None)
    for _ in range(3):
        fake.fail_next(TRD_GET_ORDER_LIST, msg="Network timeout")


ERROR_TABLE = [
    # reads: retried on every temporary failure, then succeed
    Case(
        "read, timeout", lambda f: f.fail_next(3203, msg="Timeout"), lambda c, e: c.snapshots([TENCENT]), None, 3203, 2
    ),
    Case("read, rate limit", lambda f: f.rate_limit_next(2101), lambda c, e: c.account(), None, 2101, 2),
    Case("read, disconnect", lambda f: f.drop_next(2201, perform=False), lambda c, e: c.open_orders(), None, 2201, 2),
    # reads: a temporary failure on every attempt surfaces as BrokerTemporaryError after 3 tries
    Case(
        "read, persistent timeout",
        _times(3, lambda f: f.fail_next(2102, msg="NN_ProtoRet_TimeOut")),
        lambda c, e: c.positions(),
        BrokerTemporaryError,
        2102,
        3,
    ),
    # reads: an answer that cannot change is raised after one request, never retried
    Case(
        "read, no right",
        lambda f: f.refuse_next(2102, "no_permission_zh"),
        lambda c, e: c.positions(),
        BrokerRequestRefused,
        2102,
        1,
    ),
    Case(
        "read, unknown stock",
        lambda f: f.refuse_next(3203, "unknown_security"),
        lambda c, e: c.snapshots([TENCENT]),
        BrokerRequestRefused,
        3203,
        1,
    ),
    Case(
        "read, K-line quota",
        lambda f: f.refuse_next(3103, "quota"),
        lambda c, e: c.klines(TENCENT, "1d", 20),
        BrokerRequestRefused,
        3103,
        1,
    ),
    Case(
        "read, invalid parameter",
        lambda f: f.refuse_next(2101, "invalid_parameter"),
        lambda c, e: c.account(),
        BrokerRequestRefused,
        2101,
        1,
    ),
    Case(
        "read, unsupported",
        lambda f: f.refuse_next(1002, "unsupported"),
        lambda c, e: c.market_state(),
        BrokerRequestRefused,
        1002,
        1,
    ),
    Case(
        "read, unknown refusal",
        lambda f: f.fail_next(2201, msg="Account frozen"),
        lambda c, e: c.open_orders(),
        BrokerRequestRefused,
        2201,
        1,
    ),
    # the read before a placement is refused: the order is refused, nothing is sent
    Case(
        "place, quote refused first", lambda f: f.refuse_next(3203, "no_permission"), _place, OrderRejected, 3203, 1, 0
    ),
    # cancels are retried like reads
    Case("cancel, rate limit", lambda f: f.rate_limit_next(2205), _place_and_cancel, None, 2205, 2),
    Case(
        "cancel, refused",
        lambda f: f.fail_next(2205, msg="Order cannot be modified"),
        _place_and_cancel,
        OrderRejected,
        2205,
        1,
    ),
    # placements are never retried
    Case("place, rate limit", lambda f: f.rate_limit_next(2202), _place, OrderRejected, 2202, 1, 0),
    Case(
        "place, broker refusal",
        lambda f: f.fail_next(2202, msg="Order price deviates too much from the market"),
        _place,
        OrderRejected,
        2202,
        1,
        0,
    ),
    Case("place, reply never comes", lambda f: f.stall_next(2202, None), _place, None, 2202, 1, 1, 1.0),
    Case("place, link drops after", lambda f: f.drop_next(2202, perform=True), _place, None, 2202, 1, 1),
    Case("place, link drops before", lambda f: f.drop_next(2202, perform=False), _place, OrderStateUnknown, 2202, 1, 0),
    Case("place, no reply, lookup fails", _stall_then_lookups_fail, _place, OrderStateUnknown, 2202, 1, 1, 1.0),
]


@pytest.mark.parametrize("case", ERROR_TABLE, ids=[case.name for case in ERROR_TABLE])
def test_each_failure_becomes_the_right_error_and_only_reads_retry(
    case: Case, connect: Callable[..., FutuClient], fake: FakeOpenD, exchange: SimExchange, broker: SimBroker
) -> None:
    client = connect(settings_for(fake.port, request_timeout_s=case.request_timeout_s))
    case.arm(fake)
    if case.error is None:
        result = case.act(client, exchange)
        if isinstance(result, Order) and case.proto == TRD_PLACE_ORDER:
            assert result.client_order_id == "table-1"  # found by its remark after the failed call
            assert result.broker_order_id == broker.orders()[0].broker_order_id
    else:
        with pytest.raises(case.error):
            case.act(client, exchange)
    assert fake.count(case.proto) == case.sent
    if case.orders_at_exchange is not None:
        assert len(broker.orders()) == case.orders_at_exchange
    assert fake.errors == []


def test_a_refusal_that_cannot_change_is_raised_once_with_its_reason(
    client: FutuClient, fake: FakeOpenD, fake_time: FakeTime
) -> None:
    fake.refuse_next(QOT_GET_SECURITY_SNAPSHOT, "unknown_security", code="09999")
    fake_time.sleeps.clear()
    with pytest.raises(BrokerRequestRefused, match=r"Unknow stock09999 \(OpenD does not know this security") as caught:
        client.snapshots(["HK.09999"])
    assert caught.value.code == Failure.UNKNOWN_SECURITY.value
    assert "Not retried: asking again will get the same answer" in str(caught.value)
    assert fake.count(QOT_GET_SECURITY_SNAPSHOT) == 1
    assert fake_time.sleeps == []  # no back-off either: the call failed at once
    assert client.snapshots([TENCENT])[0].symbol == TENCENT  # the client still works


def test_uncertain_placement_message_says_to_reconcile(
    client: FutuClient, fake: FakeOpenD, exchange: SimExchange
) -> None:
    fake.drop_next(TRD_PLACE_ORDER, perform=False)
    with pytest.raises(OrderStateUnknown, match=r"may still reach the broker: reconcile .* before any new entry"):
        _place(client, exchange)


# --------------------------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("Request frequency too high", Failure.RATE_LIMITED),  # the fake's wording
        ("请求频率太高，请稍后再试", Failure.RATE_LIMITED),  # OpenD answers in Chinese for Chinese-language clients
        ("Too many requests", Failure.RATE_LIMITED),
        ("PacketErr.Timeout", Failure.TIMEOUT),  # futu's own reply timeout
        ("Connect timeout", Failure.TIMEOUT),  # futu gave up waiting for a reconnect
        ("Disconnect", Failure.DISCONNECTED),  # futu: the link dropped with the request in flight
        ("Connection closed", Failure.DISCONNECTED),
        ("Context status bad", Failure.DISCONNECTED),
        ("NN_ProtoRet_TimeOut", Failure.TIMEOUT),  # OpenD's own timeout answer (py-futu-api #9, #234)
        ("系统繁忙，请稍后重试", Failure.BUSY),
        ("Unknow stock01835", Failure.UNKNOWN_SECURITY),  # OpenD's spelling (futuquant #160)
        ("未知股票", Failure.UNKNOWN_SECURITY),
        ("No right to subscribe 00700", Failure.NO_PERMISSION),  # py-futu-api #130
        ("行情权限不足", Failure.NO_PERMISSION),  # py-futu-api #3
        ("无权限订阅US.GOOG的行情，请检查美国市场股票行情权限", Failure.NO_PERMISSION),  # py-futu-api #230
        ("历史K线额度不足", Failure.NO_PERMISSION),
        ("This protocol is not supported by this OpenD version", Failure.UNSUPPORTED),
        ("缺少必要的参数: securityFirm", Failure.INVALID_PARAMETER),  # py-futu-api #81
        ("ERROR. format of code 00700 is wrong. (US.AAPL, HK.00700, SZ.000001)", Failure.INVALID_PARAMETER),
        ("Insufficient buying power", Failure.REFUSED),
        ("", Failure.REFUSED),
    ],
)
def test_failure_texts_are_classified(text: str, kind: Failure) -> None:
    assert classify_failure(text) is kind


def test_limiter_allows_the_documented_burst_then_waits_out_the_window() -> None:
    t = FakeTime()
    limiter = RateLimiter({"snapshot": Limit(60)}, monotonic=t.monotonic, sleep=t.sleep, margin_s=0)
    assert [limiter.acquire("snapshot") for _ in range(60)] == [0.0] * 60
    t.now += 10
    assert limiter.acquire("snapshot") == pytest.approx(20.0)  # the 61st: 30 s after the first
    assert limiter.acquire("unlisted") == 0.0


def test_limiter_spaces_orders_and_honours_a_broker_refusal() -> None:
    t = FakeTime()
    limiter = RateLimiter(
        {"place_order": Limit(15, min_interval_s=0.02)}, monotonic=t.monotonic, sleep=t.sleep, margin_s=0
    )
    assert limiter.acquire("place_order") == 0.0
    assert limiter.acquire("place_order") == pytest.approx(0.02)
    limiter.saturate("place_order")  # OpenD said "too frequent" anyway
    assert limiter.acquire("place_order") == pytest.approx(30.0)


def test_limiter_counts_calls_made_on_our_behalf() -> None:
    t = FakeTime()
    limiter = RateLimiter({"orders": Limit(2)}, monotonic=t.monotonic, sleep=t.sleep, margin_s=0)
    limiter.note("orders")
    limiter.note("orders")
    assert limiter.acquire("orders") == pytest.approx(30.0)


@pytest.mark.parametrize(
    ("importer", "keeps_handler"),
    [
        ("from brokers.futu import import_futu; import_futu()", True),
        ("import futu", False),  # control: futu alone installs a handler that calls os._exit(0)
    ],
)
def test_importing_futu_through_the_adapter_keeps_ctrl_c(importer: str, keeps_handler: bool) -> None:
    code = f"import signal; {importer}; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip().splitlines()[-1] == str(keeps_handler)


def test_the_account_list_is_read_at_connect_only_not_before_every_trade_call(
    client: FutuClient, fake: FakeOpenD, exchange: SimExchange
) -> None:
    before = fake.count(TRD_GET_ACC_LIST)
    client.account()
    client.positions()
    client.open_orders()
    order = client.place_order(limit_request("CI-pin-1", marketable_price(exchange)))
    assert order.status is OrderStatus.FILLED
    assert fake.count(TRD_GET_ACC_LIST) == before  # futu 10.x alone asks again before each of these calls
    placed = fake.requests_for(TRD_PLACE_ORDER)[-1]["header"]
    assert int(placed["accID"]) == FakeOpenD.SIM_ACC_ID and int(placed.get("trdEnv", 0)) == 0  # SIMULATE
    # After a dropped connection the new trade context is pinned again (its own connect reads the list once).
    fake.drop_connections()
    client.account()
    reconnected = fake.count(TRD_GET_ACC_LIST)
    client.positions()
    client.account()
    assert fake.count(TRD_GET_ACC_LIST) == reconnected


def test_the_model_is_told_a_refused_read_is_not_worth_asking_again(
    connect: Callable[..., FutuClient], fake: FakeOpenD, journal: Any
) -> None:
    """Through the gate the model uses: one request reaches OpenD, and the tool error says not to retry."""
    import uuid

    import agent
    from config.settings import Settings
    from data.alerts import Alerter
    from tool_executor import ToolGate

    settings = Settings.model_validate({"broker": {"name": "futu"}})
    client = connect()
    run = agent.Run(run_id=uuid.uuid4().hex, journal=journal)
    run.cycle_id = journal.start_cycle(
        run_id=run.run_id, mode="trade", broker="futu", brain="claude", model=None, started_at=NOW,
        trading_date=NOW.date(),
    )  # fmt: skip
    run.alerter = Alerter(settings.alerts, None, journal)
    gate = ToolGate(agent.make_context(settings, run, client, client, clock, dry_run=False))
    fake.clear_requests()
    fake.refuse_next(QOT_GET_SECURITY_SNAPSHOT, "no_permission_zh")
    outcome = gate.handle("get_quote", {"symbol": "700"})
    assert outcome.is_error and outcome.allowed
    assert "行情权限不足" in outcome.result["error"] and "no right or quota" in outcome.result["error"]
    assert outcome.result["retry"].startswith("no: the same request gets the same answer")
    assert fake.count(QOT_GET_SECURITY_SNAPSHOT) == 1
    (call,) = journal.tool_calls(run.cycle_id)
    assert call.reason == "failed: BrokerRequestRefused" and call.is_error
