"""The fake OpenD speaks Futu's wire protocol well enough for the real futu-api client.

Every test starts the fake before any futu context (futu's constructors retry forever when nothing listens),
closes contexts in ``finally`` and runs under a hard faulthandler deadline, so a hang fails loudly instead of
blocking the suite.
"""

from __future__ import annotations

import faulthandler
import hashlib
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from brokers.sim import SimBroker, SimExchange
from tests.fakes.opend import (
    GET_GLOBAL_STATE,
    INIT_CONNECT,
    QOT_GET_SECURITY_SNAPSHOT,
    TRD_GET_ACC_LIST,
    FakeOpenD,
)

HKT = ZoneInfo("Asia/Hong_Kong")
NOW = datetime(2026, 11, 20, 10, 15, tzinfo=HKT)  # a Friday, continuous morning session
HEADER = struct.Struct("<1s1sI2B2I20s8s")


@pytest.fixture(autouse=True)
def hang_guard() -> Iterator[None]:
    """Dump every thread's stack and exit if a test hangs (futu reconnects forever when misused)."""
    faulthandler.dump_traceback_later(60, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def futu() -> Any:
    # Through the adapter's importer: a bare ``import futu`` would make Ctrl-C end the test session with exit 0.
    from brokers.futu import import_futu

    return import_futu()


@pytest.fixture
def exchange() -> SimExchange:
    return SimExchange(seed=11, clock=lambda: NOW)


@pytest.fixture
def fake(exchange: SimExchange) -> Iterator[FakeOpenD]:
    with FakeOpenD(exchange, SimBroker(exchange), clock=lambda: NOW) as server:
        yield server


def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    """Poll without depending on timing for correctness: the bound only turns a hang into a failure."""
    done = threading.Event()
    for _ in range(int(timeout_s / 0.01)):
        if predicate():
            return True
        done.wait(0.01)
    return predicate()


def test_real_contexts_connect_query_and_close(futu: Any, fake: FakeOpenD) -> None:
    quote_ctx = trade_ctx = None
    try:
        quote_ctx = futu.OpenQuoteContext(host="127.0.0.1", port=fake.port)
        trade_ctx = futu.OpenSecTradeContext(filter_trdmarket=futu.TrdMarket.HK, host="127.0.0.1", port=fake.port)

        ret, state = quote_ctx.get_global_state()
        assert ret == futu.RET_OK, state
        assert state["market_hk"] == "MORNING"  # 10:15 HKT on a trading day, from the XHKG calendar
        assert state["qot_logined"] and state["trd_logined"]

        ret, accounts = trade_ctx.get_acc_list()
        assert ret == futu.RET_OK, accounts
        rows = accounts.to_dict("records")
        assert [(r["acc_id"], r["trd_env"], r["trdmarket_auth"]) for r in rows] == [
            (FakeOpenD.SIM_ACC_ID, "SIMULATE", ["HK"])
        ]
        assert fake.active_connections == 2  # futu opens one connection per context
    finally:
        for ctx in (quote_ctx, trade_ctx):
            if ctx is not None:
                ctx.close()
    assert wait_until(lambda: fake.active_connections == 0), "contexts did not close their connections"
    assert fake.count(INIT_CONNECT) == 2
    assert fake.count(GET_GLOBAL_STATE) == 1
    assert fake.count(TRD_GET_ACC_LIST) >= 1
    assert fake.errors == []


def test_snapshot_of_several_codes_has_the_exchange_lots_and_prices(
    futu: Any, fake: FakeOpenD, exchange: SimExchange
) -> None:
    codes = ["HK.00700", "HK.00005", "HK.00939", "HK.02318"]
    ctx = None
    try:
        ctx = futu.OpenQuoteContext(host="127.0.0.1", port=fake.port)
        ret, frame = ctx.get_market_snapshot(codes)
        assert ret == futu.RET_OK, frame
    finally:
        if ctx is not None:
            ctx.close()
    rows = {row["code"]: row for row in frame.to_dict("records")}
    expected = {q.symbol: q for q in exchange.snapshots(codes)}
    assert set(rows) == set(codes)
    for code in codes:
        assert rows[code]["lot_size"] == expected[code].lot_size
        assert Decimal(str(rows[code]["last_price"])) == expected[code].last_price
        assert Decimal(str(rows[code]["price_spread"])) == expected[code].price_spread
        assert rows[code]["update_time"] == "2026-11-20 10:15:00"
    assert {rows[c]["lot_size"] for c in codes} == {100, 400, 1000, 500}  # board lots differ per stock
    (request,) = fake.requests_for(QOT_GET_SECURITY_SNAPSHOT)  # one request for all four codes
    assert request["securityList"] == [{"market": 1, "code": c.removeprefix("HK.")} for c in codes]


def _packet(proto_id: int, serial_no: int, body: bytes, *, sha: bytes | None = None) -> bytes:
    digest = hashlib.sha1(body).digest() if sha is None else sha
    return HEADER.pack(b"F", b"T", proto_id, 0, 0, serial_no, len(body), digest, bytes(8)) + body


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def test_reply_echoes_proto_and_serial_and_carries_the_body_sha1(futu: Any, fake: FakeOpenD) -> None:
    from futu.common.pb import InitConnect_pb2

    request = InitConnect_pb2.Request()
    request.c2s.clientVer = 300
    request.c2s.clientID = "wire-test"
    request.c2s.packetEncAlgo = -1
    with socket.create_connection(("127.0.0.1", fake.port), timeout=5) as sock:
        sock.sendall(_packet(INIT_CONNECT, 424242, request.SerializeToString()))
        head = _recv_exact(sock, HEADER.size)
        h1, h2, proto_id, fmt, ver, serial_no, body_len, sha, reserved = HEADER.unpack(head)
        body = _recv_exact(sock, body_len)
    assert (h1, h2, proto_id, fmt, ver, serial_no, reserved) == (b"F", b"T", INIT_CONNECT, 0, 0, 424242, bytes(8))
    assert hashlib.sha1(body).digest() == sha
    response = InitConnect_pb2.Response()
    response.ParseFromString(body)
    assert response.retType == 0
    assert response.s2c.keepAliveInterval == fake.keep_alive_interval_s
    assert len(response.s2c.connAESKey) == 16
    assert fake.requests_for(INIT_CONNECT)[0]["clientID"] == "wire-test"


def test_packet_with_a_wrong_sha1_is_refused_and_the_connection_closed(futu: Any, fake: FakeOpenD) -> None:
    from futu.common.pb import KeepAlive_pb2

    request = KeepAlive_pb2.Request()
    request.c2s.time = 1
    with socket.create_connection(("127.0.0.1", fake.port), timeout=5) as sock:
        sock.sendall(_packet(1004, 7, request.SerializeToString(), sha=bytes(20)))
        assert sock.recv(1) == b""  # closed without a reply
    assert fake.count(1004) == 0
    assert any("bad packet" in error for error in fake.errors)


def test_fault_knobs_reach_the_real_client(futu: Any, fake: FakeOpenD) -> None:
    ctx = None
    try:
        ctx = futu.OpenQuoteContext(host="127.0.0.1", port=fake.port)
        fake.fail_next(QOT_GET_SECURITY_SNAPSHOT, msg="injected failure")
        fake.rate_limit_next(QOT_GET_SECURITY_SNAPSHOT)
        first = ctx.get_market_snapshot(["HK.00700"])
        second = ctx.get_market_snapshot(["HK.00700"])
        third = ctx.get_market_snapshot(["HK.00700"])
    finally:
        if ctx is not None:
            ctx.close()
    assert first == (futu.RET_ERROR, "injected failure")
    assert second[0] == futu.RET_ERROR and "frequency" in second[1]
    assert third[0] == futu.RET_OK and list(third[1]["code"]) == ["HK.00700"]
    assert fake.count(QOT_GET_SECURITY_SNAPSHOT) == 3


def test_stall_performs_the_request_but_answers_late(futu: Any, fake: FakeOpenD) -> None:
    ctx = None
    try:
        ctx = futu.OpenQuoteContext(host="127.0.0.1", port=fake.port)
        fake.stall_next(QOT_GET_SECURITY_SNAPSHOT, seconds=0.3)
        ret, frame = ctx.get_market_snapshot(["HK.00005"])  # futu waits (12 s by default) for the late reply
    finally:
        if ctx is not None:
            ctx.close()
    assert ret == futu.RET_OK, frame
    assert list(frame["lot_size"]) == [400]


def test_drop_connections_closes_every_client_socket(futu: Any, fake: FakeOpenD) -> None:
    ctx = None
    try:
        ctx = futu.OpenQuoteContext(host="127.0.0.1", port=fake.port)
        assert fake.active_connections == 1
        fake.drop_connections()
        assert fake.active_connections == 0
        assert wait_until(lambda: ctx.status != futu.ContextStatus.READY), "futu did not notice the dropped link"
    finally:
        if ctx is not None:
            ctx.close()
