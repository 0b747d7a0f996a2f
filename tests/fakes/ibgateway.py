"""A fake IB Gateway on loopback that speaks the TWS API socket protocol to the real ``ib_async`` client.

Wire format (ib_async ``client.py`` / ``decoder.py``): the client opens with ``b"API\\0"`` and a length-prefixed
``v157..178`` version range; the fake answers ``<server version>\\0<connection time>\\0``. Every later message
is a 4-byte big-endian length followed by NUL-terminated text fields, the first being the message id. The
fake announces server version 176 (IB Gateway 10.19-10.30 era) and encodes each message with exactly the
fields ``ib_async``'s decoder reads at that version.

The fake is backed by our own ``SimExchange`` and a REAL-kind ``SimBroker`` (broker-side stop orders), as
``tests/fakes/opend.py`` backs Futu: it translates messages to and from ``brokers.base`` models. What IB does
above a plain order book the fake does itself:

- ``transmit=False`` orders wait until an order with ``transmit=True`` in the same family arrives (brackets).
- Bracket children rest as ``PreSubmitted`` until their parent has filled; then the stop child goes to the
  sim as a resting STOP sell and the take-profit child is watched by the fake (it "fills" when the last price
  reaches its limit, by a limit sell sent to the sim).
- One-cancels-all: when one order of an OCA group fills, the fake cancels the rest; cancelling a parent
  cancels its children.

Knobs: ``silent`` (accept TCP, never answer the handshake), ``delayed`` (market data type 3 with the delayed
tick types 66-76 and error 10167), ``vanish(perm_id)`` (an order disappears at the broker, as if cancelled in
TWS), ``connectivity(code)`` (push 1100 / 1101 / 1102), ``fail_next_order(code, text)``,
``fail_next_request(msg_id, code, text, times)`` (error replies to reads) and ``swallow_next_order()`` (a
placeOrder that is never answered). Streaming requests with generic tick 165 get tick 21 (the average daily
volume: the mean of the previous 20 daily bars; IB's is a 90-day mean).

Every request is recorded as its field list in ``requests``.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import struct
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from brokers import hkex
from brokers.base import Order, OrderRequest, OrderStatus, OrderType, Side
from brokers.sim import SimBroker, SimExchange
from config.errors import OrderRejected

HKT = ZoneInfo("Asia/Hong_Kong")
SERVER_VERSION = 176
UNSET_DOUBLE = 1.7976931348623157e308
UNSET_INTEGER = 2**31 - 1
CON_ID_BASE = 100_000_000  # conId = base + the HK stock code

# Informational messages a real gateway sends on every connect (ib_async treats 2100-2199 as warnings).
CONNECT_NOTICES = (
    (2104, "Market data farm connection is OK:hfarm"),
    (2106, "HMDS data farm connection is OK:hkhmds"),
    (2158, "Sec-def data farm connection is OK:secdefhk"),
)
CONNECTIVITY_TEXT = {
    1100: "Connectivity between IB and Trader Workstation has been lost.",
    1101: "Connectivity between IB and Trader Workstation has been restored - data lost.",
    1102: "Connectivity between IB and Trader Workstation has been restored - data maintained.",
}
BAR_SIZES = {"1 min": "1m", "5 mins": "5m", "15 mins": "15m", "1 hour": "1h", "1 day": "1d"}
LIVE_TICKS = {"bid": 1, "ask": 2, "last": 4, "high": 6, "low": 7, "close": 9, "open": 14, "volume": 8}
DELAYED_TICKS = {"bid": 66, "ask": 67, "last": 68, "high": 72, "low": 73, "close": 75, "open": 76, "volume": 74}
IB_ORDER_TYPE = {
    OrderType.LIMIT: "LMT",
    OrderType.MARKET: "MKT",
    OrderType.STOP: "STP",
    OrderType.STOP_LIMIT: "STP LMT",
}
OUR_ORDER_TYPE = {v: k for k, v in IB_ORDER_TYPE.items()}


def encode(*fields: Any) -> bytes:
    """One TWS API message: 4-byte big-endian length, then each field as text followed by NUL."""
    parts = []
    for value in fields:
        if value is None:
            text = ""
        elif isinstance(value, bool):
            text = "1" if value else "0"
        elif isinstance(value, float) and value == UNSET_DOUBLE:
            text = ""
        else:
            text = str(value)
        parts.append(text.encode() + b"\0")
    body = b"".join(parts)
    return struct.pack(">I", len(body)) + body


@dataclass(eq=False)  # identity: one object per order, usable in sets and dict keys
class IbOrder:
    """An order as the fake gateway keeps it (IB's view: ids, family, OCA, status, fills)."""

    order_id: int
    perm_id: int
    client_id: int
    symbol: str
    action: str  # BUY / SELL
    quantity: int
    order_type: str  # LMT / MKT / STP / STP LMT
    lmt_price: float | None
    aux_price: float | None
    tif: str
    oca_group: str
    oca_type: int
    order_ref: str
    parent_id: int
    transmit: bool
    account: str
    status: str = "PreSubmitted"
    filled: int = 0
    avg_price: float = 0.0
    sim_id: str | None = None  # the SimBroker order carrying it, once sent
    why: str = ""
    reported_filled: int = 0  # executions already reported
    executions: list[tuple[str, int, float, datetime]] = field(default_factory=list)

    @property
    def is_done(self) -> bool:
        return self.status in ("Filled", "Cancelled", "ApiCancelled", "Inactive")


class _Fields:
    """A cursor over a request's fields."""

    def __init__(self, fields: list[str]) -> None:
        self.fields = fields
        self.i = 0

    def next(self) -> str:
        value = self.fields[self.i] if self.i < len(self.fields) else ""
        self.i += 1
        return value

    def skip(self, n: int) -> None:
        self.i += n

    def contract(self) -> dict[str, str]:
        keys = ["conId", "symbol", "secType", "lastTrade", "strike", "right", "multiplier", "exchange"]
        keys += ["primaryExchange", "currency", "localSymbol", "tradingClass"]
        return {k: self.next() for k in keys}


def _float(text: str) -> float | None:
    return float(text) if text not in ("", None) else None


class FakeIBGateway:
    """Serve ``exchange`` and ``broker`` (a REAL-kind SimBroker) at 127.0.0.1:<port> over the TWS API."""

    def __init__(
        self,
        exchange: SimExchange,
        broker: SimBroker,
        *,
        account: str = "DU1234567",
        accounts: list[str] | None = None,
        silent: bool = False,
        delayed: bool = False,
    ) -> None:
        if broker.is_paper:
            raise ValueError("FakeIBGateway needs a REAL-kind SimBroker: IBKR accounts (paper too) have stop orders")
        self.exchange = exchange
        self.broker = broker
        self.account = account
        self.accounts = accounts or [account]
        self.silent = silent
        self.delayed = delayed
        self.requests: list[list[str]] = []
        self.orders: dict[int, IbOrder] = {}  # by perm_id
        self._held: list[IbOrder] = []  # transmit=False orders waiting for their family's last order
        self._perm_ids = itertools.count(900_001)
        self._exec_ids = itertools.count(1)
        self._next_valid_id = 1
        self._fail_next: tuple[int, str] | None = None
        self._fail_requests: dict[int, list[tuple[int, str]]] = {}
        self._swallow_orders = 0
        self._lock = threading.RLock()
        self._conns: list[socket.socket] = []
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(8)
        self.port: int = self._server.getsockname()[1]
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="fake-ibgateway", daemon=True)

    # ------------------------------------------------------------------------------------------------ lifecycle

    def __enter__(self) -> FakeIBGateway:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._server.close()
        for conn in list(self._conns):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                conn.close()

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), name="fake-ibgateway-conn", daemon=True).start()

    # ------------------------------------------------------------------------------------------------ knobs

    def vanish(self, perm_id: int) -> None:
        """The order disappears at the broker (cancelled in TWS, expired): cancelled, its client told."""
        with self._lock:
            order = self.orders[perm_id]
            if order.sim_id is not None:
                with contextlib.suppress(OrderRejected):
                    self.broker.cancel_order(order.sim_id)
            order.status = "Cancelled"
            self._broadcast_status(order)

    def connectivity(self, code: int) -> None:
        """Push a connectivity message (1100 lost, 1101 restored with data lost, 1102 restored) to every client."""
        self._broadcast(encode(4, 2, -1, code, CONNECTIVITY_TEXT[code], ""))

    def fail_next_order(self, code: int, text: str) -> None:
        """Answer the next placeOrder with this error instead of accepting it."""
        self._fail_next = (code, text)

    def fail_next_request(self, msg_id: int, code: int, text: str, times: int = 1) -> None:
        """Answer the next ``times`` requests of message ``msg_id`` (20 historical data, 9 contract details ...)
        with error ``code`` for their request id instead of data."""
        self._fail_requests.setdefault(msg_id, []).extend([(code, text)] * times)

    def swallow_next_order(self) -> None:
        """Take the next placeOrder and never answer it (a gateway that hangs after receiving an order)."""
        self._swallow_orders += 1

    def order_by_ref(self, order_ref: str) -> IbOrder | None:
        with self._lock:
            found = [o for o in self.orders.values() if o.order_ref == order_ref]
            return found[-1] if found else None

    # ------------------------------------------------------------------------------------------------ serving

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        try:
            handshake = self._recv_exact(conn, 4)
            if handshake != b"API\0":
                return
            size = struct.unpack(">I", self._recv_exact(conn, 4))[0]
            self._recv_exact(conn, size)  # "v157..178"
            if self.silent:
                while not self._stopped.is_set() and conn.recv(4096):
                    pass
                return
            now = self.exchange.now()
            conn.sendall(encode(SERVER_VERSION, now.strftime("%Y%m%d %H:%M:%S HKT")))
            while not self._stopped.is_set():
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buffer += chunk
                while len(buffer) >= 4:
                    size = struct.unpack(">I", buffer[:4])[0]
                    if len(buffer) < 4 + size:
                        break
                    body, buffer = buffer[4 : 4 + size], buffer[4 + size :]
                    fields = body.decode().split("\0")[:-1]
                    with self._lock:
                        self.requests.append(fields)
                        self._sync()
                        self._handle(conn, fields)
        except OSError:
            return
        finally:
            with contextlib.suppress(ValueError):
                self._conns.remove(conn)
            with contextlib.suppress(OSError):
                conn.close()

    @staticmethod
    def _recv_exact(conn: socket.socket, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = conn.recv(size - len(data))
            if not chunk:
                raise OSError("client closed")
            data += chunk
        return data

    def _broadcast(self, message: bytes) -> None:
        for conn in list(self._conns):
            with contextlib.suppress(OSError):
                conn.sendall(message)

    def _handle(self, conn: socket.socket, fields: list[str]) -> None:
        msg_id = int(fields[0])
        send = conn.sendall
        failures = self._fail_requests.get(msg_id)
        if failures:
            code, text = failures.pop(0)
            req_id = fields[1] if msg_id == 20 else fields[2]
            send(encode(4, 2, req_id, code, text, ""))
            return
        if msg_id == 3 and self._swallow_orders:
            self._swallow_orders -= 1
            return
        if msg_id == 71:  # startApi
            send(encode(9, 1, self._next_valid_id))
            send(encode(15, 1, ",".join(self.accounts)))
            for code, text in CONNECT_NOTICES:
                send(encode(4, 2, -1, code, text, ""))
        elif msg_id == 8:  # reqIds
            send(encode(9, 1, self._next_valid_id))
        elif msg_id == 17:  # reqManagedAccts
            send(encode(15, 1, ",".join(self.accounts)))
        elif msg_id == 49:  # reqCurrentTime
            send(encode(49, 1, int(self.exchange.now().timestamp())))
        elif msg_id == 61:  # reqPositions
            for position in self.broker.positions():
                send(
                    encode(61, 3, self.account, *self._contract(position.symbol), position.quantity, position.avg_cost)
                )
            send(encode(62, 1))
        elif msg_id in (5, 16):  # reqOpenOrders / reqAllOpenOrders
            for order in self.orders.values():
                if not order.is_done:
                    send(self._open_order(order))
                    send(self._order_status(order))
            send(encode(53, 1))
        elif msg_id == 99:  # reqCompletedOrders
            for order in self.orders.values():
                if order.is_done:
                    send(self._completed_order(order))
            send(encode(102))
        elif msg_id == 6:  # reqAccountUpdates
            account = fields[3] or self.account
            if fields[2] in ("1", "True"):
                for key, value in self._account_values():
                    send(encode(6, 2, key, value, "HKD", account))
                for position in self.broker.positions():
                    send(
                        encode(
                            7, 8, *self._portfolio_contract(position.symbol), position.quantity, position.last_price,
                            position.market_value, position.avg_cost, position.unrealized_pnl, 0, account,
                        )
                    )  # fmt: skip
                send(encode(8, 1, self.exchange.now().strftime("%H:%M")))
                send(encode(54, 1, account))
        elif msg_id == 76:  # reqAccountUpdatesMulti
            req_id, account = fields[2], fields[3] or self.account
            for key, value in self._account_values():
                send(encode(73, 1, req_id, account, "", key, value, "HKD"))
            send(encode(74, 1, req_id))
        elif msg_id == 7:  # reqExecutions
            req_id = fields[2]
            for order in self.orders.values():
                for exec_id, shares, price, at in order.executions:
                    send(self._exec_details(req_id, order, exec_id, shares, price, at))
            send(encode(55, 1, req_id))
        elif msg_id == 9:  # reqContractDetails
            self._contract_details(send, fields)
        elif msg_id == 59:  # reqMarketDataType: answered per request below
            pass
        elif msg_id == 1:  # reqMktData
            self._market_data(send, fields)
        elif msg_id == 2:  # cancelMktData
            pass
        elif msg_id == 20:  # reqHistoricalData
            self._historical(send, fields)
        elif msg_id == 3:  # placeOrder
            self._place(send, fields)
        elif msg_id == 4:  # cancelOrder
            self._cancel(send, int(fields[2]))
        # anything else (reqAutoOpenOrders, setServerLogLevel ...) needs no answer

    # ------------------------------------------------------------------------------------------------ contracts

    def _code(self, symbol: str) -> str:
        return symbol.removeprefix("HK.").lstrip("0") or "0"

    def _symbol_of(self, ib_symbol: str) -> str | None:
        try:
            symbol = hkex.normalize_symbol(f"{ib_symbol}.HK")
        except ValueError:
            return None
        return symbol if self.exchange.instrument(symbol) is not None else None

    def _contract(self, symbol: str) -> tuple[Any, ...]:
        """conId symbol secType lastTrade strike right multiplier exchange currency localSymbol tradingClass."""
        code = self._code(symbol)
        return (CON_ID_BASE + int(code), code, "STK", "", 0.0, "", "", "SEHK", "HKD", code, code)

    def _portfolio_contract(self, symbol: str) -> tuple[Any, ...]:
        """As ``updatePortfolio`` lists it: primaryExchange instead of exchange."""
        return self._contract(symbol)

    def _contract_details(self, send: Any, fields: list[str]) -> None:
        cursor = _Fields(fields)
        cursor.skip(2)
        req_id = cursor.next()
        contract = cursor.contract()
        symbol = self._symbol_of(contract["symbol"]) if contract["secType"] in ("STK", "") else None
        if contract["conId"] not in ("", "0") and symbol is None:
            con_id = int(contract["conId"]) - CON_ID_BASE
            symbol = self._symbol_of(str(con_id))
        if symbol is None or contract["exchange"] not in ("SEHK", "SMART", ""):
            send(encode(4, 2, req_id, 200, "No security definition has been found for the request", ""))
            return
        inst = self.exchange.instrument(symbol)
        assert inst is not None
        code = self._code(symbol)
        tick = hkex.tick_size(Decimal(str(inst.reference_price)), self.exchange.now().date())
        send(
            encode(
                10, req_id, code, "STK", "", 0.0, "", "SEHK", "HKD", code, code, code, CON_ID_BASE + int(code),
                float(tick), "", "ACTIVETIM,LMT,MKT,STP,STP LMT,OCA", "SEHK", 1, 0, inst.name, "SEHK", "",
                "", "", "", "Asia/Hong_Kong", "", "", "", "", 0,  # ... numSecIds = 0
                "1", "", "", "1313", "", "COMMON", inst.lot_size, inst.lot_size, inst.lot_size,
            )
        )  # fmt: skip
        send(encode(52, 1, req_id))

    # ------------------------------------------------------------------------------------------------ market data

    def _market_data(self, send: Any, fields: list[str]) -> None:
        cursor = _Fields(fields)
        cursor.skip(2)
        req_id = cursor.next()
        contract = cursor.contract()
        symbol = self._symbol_of(contract["symbol"])
        if symbol is None and contract["conId"] not in ("", "0"):
            symbol = self._symbol_of(str(int(contract["conId"]) - CON_ID_BASE))
        if symbol is None:
            send(encode(4, 2, req_id, 200, "No security definition has been found for the request", ""))
            return
        cursor.next()  # deltaNeutralContract present (False)
        generic, snapshot = cursor.next(), cursor.next() in ("1", "True")
        quote = self.exchange.snapshots([symbol])[0]
        ticks = DELAYED_TICKS if self.delayed else LIVE_TICKS
        if self.delayed:
            send(
                encode(
                    4, 2, req_id, 10167,
                    "Requested market data is not subscribed. Displaying delayed market data.", "",
                )
            )  # fmt: skip
        send(encode(58, 1, req_id, 3 if self.delayed else 1))
        prices = {
            "bid": quote.bid_price,
            "ask": quote.ask_price,
            "last": quote.last_price,
            "high": quote.high_price,
            "low": quote.low_price,
            "close": quote.prev_close,
            "open": quote.open_price,
        }
        for name, price in prices.items():
            if price is not None:
                size = 1000 if name in ("bid", "ask", "last") else 0
                send(encode(1, 6, req_id, ticks[name], price, size, 0))
        send(encode(2, 6, req_id, ticks["volume"], quote.volume))
        if "165" in generic.split(","):  # Misc. Stats: tick 21, the average daily volume (IB: 90 days; here 20)
            history = self.exchange.klines(symbol, "1d", 21)[:-1]
            if history:
                send(encode(2, 6, req_id, 21, sum(bar.volume for bar in history) // len(history)))
        if snapshot:
            send(encode(57, 1, req_id))  # a streaming request runs until cancelMktData

    def _historical(self, send: Any, fields: list[str]) -> None:
        cursor = _Fields(fields)
        cursor.skip(1)
        req_id = cursor.next()
        contract = cursor.contract()
        cursor.next()  # includeExpired
        cursor.next()  # endDateTime ("" = now)
        bar_size = cursor.next()
        duration = cursor.next()
        cursor.next()  # useRTH
        cursor.next()  # whatToShow
        format_date = cursor.next()
        symbol = self._symbol_of(contract["symbol"])
        timeframe = BAR_SIZES.get(bar_size)
        if symbol is None or timeframe is None:
            send(encode(4, 2, req_id, 162, f"Historical Market Data Service error message:invalid {bar_size!r}", ""))
            return
        amount, unit = duration.split()
        days = int(amount) * {"S": 1 / 86400, "D": 1, "W": 7, "M": 31, "Y": 365}[unit]
        per_day = {"1m": 330, "5m": 66, "15m": 22, "1h": 6, "1d": 1}[timeframe]
        count = max(1, int(days * 5 / 7 * per_day))
        bars = self.exchange.klines(symbol, timeframe, count)
        now = self.exchange.now()
        rows: list[Any] = []
        for bar in bars:
            if timeframe == "1d":
                stamp = bar.time.strftime("%Y%m%d")
            elif format_date == "2":
                stamp = str(int(bar.time.timestamp()))
            else:
                stamp = bar.time.strftime("%Y%m%d %H:%M:%S Asia/Hong_Kong")
            rows += [stamp, bar.open, bar.high, bar.low, bar.close, bar.volume, bar.close, 1]
        start = (now - timedelta(days=days)).strftime("%Y%m%d %H:%M:%S")
        send(encode(17, req_id, start, now.strftime("%Y%m%d %H:%M:%S"), len(bars), *rows))

    # ------------------------------------------------------------------------------------------------ account

    def _account_values(self) -> list[tuple[str, Any]]:
        account = self.broker.account()
        return [
            ("AccountType", "INDIVIDUAL"),
            ("NetLiquidation", account.equity),
            ("TotalCashValue", account.cash),
            ("GrossPositionValue", account.market_value),
            ("BuyingPower", account.buying_power),
            ("AvailableFunds", account.buying_power),
        ]

    # ------------------------------------------------------------------------------------------------ orders

    def _place(self, send: Any, fields: list[str]) -> None:
        cursor = _Fields(fields)
        cursor.skip(1)
        order_id = int(cursor.next())
        contract = cursor.contract()
        cursor.skip(2)  # secIdType, secId
        action, quantity, order_type = cursor.next(), cursor.next(), cursor.next()
        lmt, aux, tif, oca_group, account = cursor.next(), cursor.next(), cursor.next(), cursor.next(), cursor.next()
        cursor.skip(2)  # openClose, origin
        order_ref, transmit, parent_id = cursor.next(), cursor.next(), cursor.next()
        cursor.skip(6)  # blockOrder sweepToFill displaySize triggerMethod outsideRth hidden
        cursor.skip(8)  # "" discretionaryAmt goodAfterTime goodTillDate faGroup faMethod faPercentage faProfile
        cursor.skip(4)  # modelCode shortSaleSlot designatedLocation exemptCode
        oca_type = cursor.next()
        cursor.skip(18)  # rule80A ... deltaNeutralOrderType
        cursor.next()  # deltaNeutralAuxPrice
        cursor.skip(7)  # continuousUpdate referencePriceType trailStopPrice trailingPercent scale x3
        cursor.skip(4)  # scaleTable activeStartTime activeStopTime hedgeType
        cursor.skip(4)  # optOutSmartRouting clearingAccount clearingIntent notHeld
        cursor.next()  # deltaNeutralContract present (False)
        cursor.next()  # algoStrategy (empty)
        cursor.next()  # algoId
        what_if = cursor.next() in ("1", "True")
        symbol = self._symbol_of(contract["symbol"])
        if symbol is None:
            send(encode(4, 2, order_id, 200, "No security definition has been found for the request", ""))
            return
        self._next_valid_id = max(self._next_valid_id, order_id + 1)
        if what_if:
            self._what_if(send, order_id, symbol, action, int(float(quantity)), order_type, _float(lmt))
            return
        if self._fail_next is not None:
            code, text = self._fail_next
            self._fail_next = None
            send(encode(4, 2, order_id, code, text, ""))
            return
        order = IbOrder(
            order_id=order_id,
            perm_id=next(self._perm_ids),
            client_id=0,
            symbol=symbol,
            action=action,
            quantity=int(float(quantity)),
            order_type=order_type,
            lmt_price=_float(lmt),
            aux_price=_float(aux),
            tif=tif or "DAY",
            oca_group=oca_group,
            oca_type=int(oca_type or 0),
            order_ref=order_ref,
            parent_id=int(parent_id or 0),
            transmit=transmit in ("1", "True"),
            account=account or self.account,
        )
        order.client_id = self._client_id_of(send)
        if not order.transmit:  # IB keeps it untransmitted (no acknowledgement) until its family's last order
            self._held.append(order)
            return
        family = [o for o in self._held if order.parent_id and o.order_id == order.parent_id]
        family += [o for o in self._held if order.parent_id and o.parent_id == order.parent_id]
        self._held = [o for o in self._held if o not in family]
        for member in [*sorted(family, key=lambda o: o.order_id), order]:
            self.orders[member.perm_id] = member
            self._submit(member)
        self._sync()
        for member in [*sorted(family, key=lambda o: o.order_id), order]:
            send(self._open_order(member))
            send(self._order_status(member))

    def _client_id_of(self, send: Any) -> int:
        for fields in reversed(self.requests):
            if fields and fields[0] == "71":
                return int(fields[2])
        return 0

    def _submit(self, order: IbOrder) -> None:
        """Send a transmitted order to the sim, unless it is a child waiting for its parent to fill."""
        parent = self._by_order_id(order.parent_id) if order.parent_id else None
        if parent is not None and parent.status != "Filled":
            order.status = "PreSubmitted"
            return
        if order.order_type == "LMT" and order.action == "SELL" and order.oca_group:
            order.status = "Submitted"  # a take-profit: the fake watches the price (see _sync)
            return
        request = OrderRequest(
            client_order_id=order.order_ref or f"ib-{order.perm_id}",
            symbol=order.symbol,
            side=Side.BUY if order.action == "BUY" else Side.SELL,
            quantity=order.quantity,
            order_type=OUR_ORDER_TYPE.get(order.order_type, OrderType.LIMIT),
            limit_price=Decimal(str(order.lmt_price)) if order.lmt_price is not None else None,
            aux_price=Decimal(str(order.aux_price)) if order.aux_price is not None else None,
        )
        try:
            placed = self.broker.place_order(request)
        except OrderRejected as exc:
            order.status = "Cancelled"
            order.why = str(exc)
            self._broadcast(encode(4, 2, order.order_id, 201, f"Order rejected - reason:{exc}", ""))
            return
        order.sim_id = placed.broker_order_id
        order.status = "Submitted"
        self._apply(order, placed)

    def _by_order_id(self, order_id: int) -> IbOrder | None:
        for order in self.orders.values():
            if order.order_id == order_id:
                return order
        return None

    def _apply(self, order: IbOrder, sim: Order) -> bool:
        """Copy the sim order's state onto ``order``; True when something changed."""
        before = (order.status, order.filled)
        if sim.filled_quantity > order.filled:
            shares = sim.filled_quantity - order.filled
            price = float(sim.avg_fill_price or 0)
            order.executions.append((f"0001f4e8.{next(self._exec_ids):08d}.01.01", shares, price, sim.updated_at))
            order.filled = sim.filled_quantity
            order.avg_price = price
        if sim.status is OrderStatus.FILLED:
            order.status = "Filled"
        elif sim.status in (OrderStatus.CANCELLED, OrderStatus.REJECTED):
            order.status = "Cancelled"
            order.why = sim.message
        return before != (order.status, order.filled)

    def _sync(self) -> None:
        """Bring every order up to date with the sim, activate children, apply OCA and take-profits."""
        changed: list[IbOrder] = []
        for order in list(self.orders.values()):
            if order.is_done:
                continue
            if order.sim_id is not None:
                sim = next((o for o in self.broker.orders() if o.broker_order_id == order.sim_id), None)
                if sim is not None and self._apply(order, sim):
                    changed.append(order)
        for order in list(self.orders.values()):  # children whose parent has filled start working
            if order.status == "PreSubmitted" and order.parent_id:
                parent = self._by_order_id(order.parent_id)
                if parent is not None and parent.status == "Filled":
                    self._submit(order)
                    changed.append(order)
                elif parent is not None and parent.status == "Cancelled":
                    order.status = "Cancelled"
                    changed.append(order)
        for order in list(self.orders.values()):  # take-profits: a limit sell the fake watches
            if order.is_done or order.sim_id is not None or order.status != "Submitted":
                continue
            last = self.exchange.snapshots([order.symbol])[0].last_price
            if order.lmt_price is not None and last >= Decimal(str(order.lmt_price)):
                for sibling in self._oca_siblings(order):
                    self._cancel_quietly(sibling)
                    changed.append(sibling)
                order.order_type = "LMT"
                self._submit_take_profit(order)
                changed.append(order)
        for order in list(self.orders.values()):  # one-cancels-all
            if order.status == "Filled" and order.oca_group:
                for sibling in self._oca_siblings(order):
                    self._cancel_quietly(sibling)
                    changed.append(sibling)
        for order in dict.fromkeys(changed):
            self._broadcast_status(order)

    def _submit_take_profit(self, order: IbOrder) -> None:
        request = OrderRequest(
            client_order_id=order.order_ref or f"ib-{order.perm_id}",
            symbol=order.symbol,
            side=Side.SELL,
            quantity=order.quantity,
            order_type=OrderType.LIMIT,
            limit_price=Decimal(str(order.lmt_price)),
        )
        try:
            placed = self.broker.place_order(request)
        except OrderRejected as exc:
            order.status = "Cancelled"
            order.why = str(exc)
            return
        order.sim_id = placed.broker_order_id
        self._apply(order, placed)

    def _oca_siblings(self, order: IbOrder) -> list[IbOrder]:
        return [
            o for o in self.orders.values()
            if o is not order and o.oca_group == order.oca_group and not o.is_done
        ]  # fmt: skip

    def _cancel_quietly(self, order: IbOrder) -> None:
        if order.sim_id is not None:
            with contextlib.suppress(OrderRejected):
                self.broker.cancel_order(order.sim_id)
            sim = next((o for o in self.broker.orders() if o.broker_order_id == order.sim_id), None)
            if sim is not None:
                self._apply(order, sim)
        if not order.is_done:
            order.status = "Cancelled"

    def _cancel(self, send: Any, order_id: int) -> None:
        order = self._by_order_id(order_id)
        if order is None or order.is_done:
            state = "unknown" if order is None else order.status.lower()
            send(encode(4, 2, order_id, 10148, f"OrderId {order_id} that needs to be cancelled cannot be cancelled, "
                        f"state: {state}.", ""))  # fmt: skip
            return
        self._cancel_quietly(order)
        children = [o for o in self.orders.values() if o.parent_id == order.order_id and not o.is_done]
        for child in children:
            self._cancel_quietly(child)
        for member in [order, *children]:
            self._broadcast_status(member)
            if member.status == "Cancelled":
                self._broadcast(encode(4, 2, member.order_id, 202, "Order Canceled - reason:", ""))

    def _what_if(
        self, send: Any, order_id: int, symbol: str, action: str, quantity: int, order_type: str, lmt: float | None
    ) -> None:
        price = Decimal(str(lmt)) if lmt is not None else self.exchange.snapshots([symbol])[0].last_price
        preview = self.broker.preview_order(
            OrderRequest(
                client_order_id=f"whatif-{order_id}",
                symbol=symbol,
                side=Side.BUY if action == "BUY" else Side.SELL,
                quantity=quantity,
                order_type=OrderType.LIMIT,
                limit_price=price,
            )
        )
        equity = self.broker.account().equity
        commission = max(self.exchange.min_commission, (preview.gross_value * self.exchange.commission_pct)).quantize(
            Decimal("0.01")
        )
        order = IbOrder(
            order_id=order_id, perm_id=0, client_id=0, symbol=symbol, action=action, quantity=quantity,
            order_type=order_type, lmt_price=lmt, aux_price=None, tif="DAY", oca_group="", oca_type=0,
            order_ref="", parent_id=0, transmit=True, account=self.account, status="PreSubmitted",
        )  # fmt: skip
        margin = preview.gross_value  # a cash account: the full value
        state = {
            "initMarginBefore": 0, "maintMarginBefore": 0, "equityWithLoanBefore": equity,
            "initMarginChange": margin, "maintMarginChange": margin, "equityWithLoanChange": -commission,
            "initMarginAfter": margin, "maintMarginAfter": margin, "equityWithLoanAfter": equity - commission,
            "commission": commission, "minCommission": UNSET_DOUBLE, "maxCommission": UNSET_DOUBLE,
            "commissionCurrency": "HKD",
        }  # fmt: skip
        send(self._open_order(order, what_if=True, state=state))

    # ------------------------------------------------------------------------------------------------ messages

    def _broadcast_status(self, order: IbOrder) -> None:
        self._broadcast(self._open_order(order))
        self._broadcast(self._order_status(order))
        while order.reported_filled < len(order.executions):
            exec_id, shares, price, at = order.executions[order.reported_filled]
            order.reported_filled += 1
            self._broadcast(self._exec_details(-1, order, exec_id, shares, price, at))
            self._broadcast(encode(59, 1, exec_id, 18.0, "HKD", UNSET_DOUBLE, UNSET_DOUBLE, ""))

    def _order_status(self, order: IbOrder) -> bytes:
        return encode(
            3, order.order_id, order.status, order.filled, order.quantity - order.filled, order.avg_price,
            order.perm_id, order.parent_id, order.avg_price, order.client_id, "", 0.0,
        )  # fmt: skip

    def _exec_details(
        self, req_id: Any, order: IbOrder, exec_id: str, shares: int, price: float, at: datetime
    ) -> bytes:
        cum = sum(e[1] for e in order.executions[: order.executions.index((exec_id, shares, price, at)) + 1])
        return encode(
            11, req_id, order.order_id, *self._contract(order.symbol)[:7], "SEHK", "HKD",
            *self._contract(order.symbol)[9:], exec_id, at.astimezone(HKT).strftime("%Y%m%d %H:%M:%S Asia/Hong_Kong"),
            order.account, "SEHK", "BOT" if order.action == "BUY" else "SLD", shares, price, order.perm_id,
            order.client_id, 0, cum, order.avg_price, order.order_ref, "", "", "", 1,
        )  # fmt: skip

    def _order_core(self, order: IbOrder) -> list[Any]:
        """The fields shared by openOrder (after orderId) and completedOrder, up to faPercentage."""
        return [
            *self._contract(order.symbol), order.action, order.quantity, order.order_type,
            order.lmt_price if order.lmt_price is not None else UNSET_DOUBLE,
            order.aux_price if order.aux_price is not None else UNSET_DOUBLE,
            order.tif, order.oca_group, order.account, "", 0, order.order_ref,
        ]  # fmt: skip

    def _open_order(self, order: IbOrder, *, what_if: bool = False, state: dict[str, Any] | None = None) -> bytes:
        s = state or {}
        margin = [s.get(k, UNSET_DOUBLE) for k in (
            "initMarginBefore", "maintMarginBefore", "equityWithLoanBefore", "initMarginChange", "maintMarginChange",
            "equityWithLoanChange", "initMarginAfter", "maintMarginAfter", "equityWithLoanAfter", "commission",
            "minCommission", "maxCommission",
        )]  # fmt: skip
        fields: list[Any] = [5, order.order_id, *self._order_core(order)]
        fields += [order.client_id, order.perm_id, 0, 0, 0.0, "", "", "", "", "", ""]  # ... faProfile (< 177)
        fields += [
            "",
            "",
            "",
            UNSET_DOUBLE,
            "",
            0,
            "",
            "",
            0,
            UNSET_DOUBLE,
            UNSET_DOUBLE,
            UNSET_DOUBLE,
            UNSET_DOUBLE,
            UNSET_DOUBLE,
            0,
            0,
            0,
            0,
            UNSET_INTEGER,
            order.oca_type,
            0,
            0,
            UNSET_DOUBLE,
            order.parent_id,
            0,
            UNSET_DOUBLE,
            UNSET_INTEGER,
            "",
            UNSET_DOUBLE,
        ]  # modelCode ... deltaNeutralAuxPrice
        fields += [
            0,
            UNSET_INTEGER,
            UNSET_DOUBLE,
            UNSET_DOUBLE,
            UNSET_DOUBLE,
            UNSET_INTEGER,
            "",
        ]  # ... comboLegsDescrip
        fields += [0, 0, 0]  # comboLegs, orderComboLegs, smartComboRoutingParams
        fields += [UNSET_INTEGER, UNSET_INTEGER, ""]  # scaleInitLevelSize, scaleSubsLevelSize, scalePriceIncrement
        fields += [""]  # hedgeType
        fields += [0, "", "", 0, 0]  # optOutSmartRouting clearingAccount clearingIntent notHeld dncPresent
        fields += [""]  # algoStrategy
        fields += [0, what_if, order.status if not what_if else "PreSubmitted", *margin]
        fields += [s.get("commissionCurrency", ""), order.why, 0, 0]  # ... warningText randomizeSize randomizePrice
        fields += [0]  # conditions
        fields += ["", UNSET_DOUBLE, UNSET_DOUBLE, UNSET_DOUBLE, UNSET_DOUBLE, UNSET_DOUBLE, UNSET_DOUBLE, 0]
        fields += ["", "", "", UNSET_DOUBLE, 0, 0, UNSET_DOUBLE, 0]  # softDollarTier x3 ... usePriceMgmtAlgo
        fields += [UNSET_INTEGER, 0, 0]  # duration (>= 159), postToAts (>= 160), autoCancelParent (>= 162)
        fields += [UNSET_INTEGER, UNSET_INTEGER, UNSET_DOUBLE, UNSET_DOUBLE, UNSET_DOUBLE]  # >= 170
        return encode(*fields)

    def _completed_order(self, order: IbOrder) -> bytes:
        parent = self._by_order_id(order.parent_id) if order.parent_id else None
        fields: list[Any] = [101, *self._order_core(order)]
        fields += [order.perm_id, 0, 0, 0.0, "", "", "", "", ""]  # permId ... faProfile (< 177)
        fields += [
            "",
            "",
            "",
            UNSET_DOUBLE,
            "",
            0,
            "",
            "",
            UNSET_DOUBLE,
            UNSET_DOUBLE,
            UNSET_DOUBLE,
            UNSET_DOUBLE,
            UNSET_DOUBLE,
            UNSET_INTEGER,
            0,
            0,
            UNSET_INTEGER,
            order.oca_type,
            0,
            UNSET_DOUBLE,
            UNSET_INTEGER,
            "",
            UNSET_DOUBLE,
        ]  # modelCode ... deltaNeutralAuxPrice
        fields += [0, UNSET_INTEGER, UNSET_DOUBLE, UNSET_DOUBLE, ""]  # ... comboLegsDescrip
        fields += [0, 0, 0]
        fields += [UNSET_INTEGER, UNSET_INTEGER, ""]
        fields += [""]  # hedgeType
        fields += ["", "", 0, 0]  # clearingAccount clearingIntent notHeld dncPresent
        fields += [""]  # algoStrategy
        fields += [0, order.status, 0, 0]  # solicited status randomizeSize randomizePrice
        fields += [0]  # conditions
        completed = self.exchange.now().strftime("%Y%m%d %H:%M:%S HKT")
        fields += [
            UNSET_DOUBLE, UNSET_DOUBLE, UNSET_DOUBLE, 0, 0, "", order.filled, 0, 0, "", 0, 0,
            parent.perm_id if parent is not None else 0, completed, order.status if not order.why else order.why,
        ]  # fmt: skip
        fields += [UNSET_INTEGER, UNSET_INTEGER, UNSET_DOUBLE, UNSET_DOUBLE, UNSET_DOUBLE]  # >= 170
        return encode(*fields)
