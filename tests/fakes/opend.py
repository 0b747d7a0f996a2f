"""A fake Futu OpenD on loopback that speaks Futu's wire protocol to the real ``futu-api`` client.

Wire format (DESIGN.md §6): a 44-byte header ``"<1s1sI2B2I20s8s"`` (``b"F"``, ``b"T"``, proto_id, format 0 =
protobuf, version 0, serial_no, body_len, SHA1(body), 8 reserved bytes) followed by a protobuf body built from
futu's own ``*_pb2`` modules. Replies echo the request's proto_id and serial_no. Encryption is not supported:
clients must run with ``SysConfig.enable_proto_encrypt(False)`` (the default).

The fake is backed by our own ``MarketData`` and ``Broker`` implementations (in tests: ``SimExchange`` and
``SimBroker``); it only translates protobuf to and from ``brokers.base`` models. Knobs inject the failures the
adapter must survive: error replies, rate-limit replies, stalled replies, dropped connections.

Every request is recorded as ``(proto_id, c2s_dict)`` where ``c2s_dict`` is ``MessageToDict(request.c2s)``
(protobuf JSON names; 64-bit integers appear as strings).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import socket
import struct
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from importlib import import_module
from typing import Any
from zoneinfo import ZoneInfo

from google.protobuf.json_format import MessageToDict

from brokers.base import (
    Broker,
    Clock,
    MarketData,
    MarketPhase,
    Order,
    OrderRequest,
    OrderStatus,
    OrderType,
    Quote,
    Side,
)
from config.errors import OrderRejected

HKT = ZoneInfo("Asia/Hong_Kong")
HEADER = struct.Struct("<1s1sI2B2I20s8s")

# Proto ids served, and the futu pb module holding their Request/Response messages.
INIT_CONNECT = 1001
GET_GLOBAL_STATE = 1002
KEEP_ALIVE = 1004
TRD_GET_ACC_LIST = 2001
TRD_UNLOCK_TRADE = 2005
TRD_SUB_ACC_PUSH = 2008
TRD_GET_FUNDS = 2101
TRD_GET_POSITION_LIST = 2102
TRD_GET_ORDER_LIST = 2201
TRD_PLACE_ORDER = 2202
TRD_MODIFY_ORDER = 2205
TRD_UPDATE_ORDER = 2208
TRD_GET_HISTORY_ORDER_LIST = 2221
QOT_REQUEST_HISTORY_KL = 3103
QOT_REQUEST_HISTORY_KL_QUOTA = 3104
QOT_GET_SECURITY_SNAPSHOT = 3203
QOT_GET_PLATE_SECURITY = 3205
QOT_GET_MARKET_STATE = 3223
QOT_GET_SEARCH_NEWS = 3263

PB_MODULES: dict[int, str] = {
    INIT_CONNECT: "InitConnect",
    GET_GLOBAL_STATE: "GetGlobalState",
    KEEP_ALIVE: "KeepAlive",
    TRD_GET_ACC_LIST: "Trd_GetAccList",
    TRD_UNLOCK_TRADE: "Trd_UnlockTrade",
    TRD_SUB_ACC_PUSH: "Trd_SubAccPush",
    TRD_GET_FUNDS: "Trd_GetFunds",
    TRD_GET_POSITION_LIST: "Trd_GetPositionList",
    TRD_GET_ORDER_LIST: "Trd_GetOrderList",
    TRD_PLACE_ORDER: "Trd_PlaceOrder",
    TRD_MODIFY_ORDER: "Trd_ModifyOrder",
    TRD_GET_HISTORY_ORDER_LIST: "Trd_GetHistoryOrderList",
    QOT_REQUEST_HISTORY_KL: "Qot_RequestHistoryKL",
    QOT_REQUEST_HISTORY_KL_QUOTA: "Qot_RequestHistoryKLQuota",
    QOT_GET_SECURITY_SNAPSHOT: "Qot_GetSecuritySnapshot",
    QOT_GET_PLATE_SECURITY: "Qot_GetPlateSecurity",
    QOT_GET_MARKET_STATE: "Qot_GetMarketState",
    QOT_GET_SEARCH_NEWS: "Qot_GetSearchNews",
}

# A representative rate-limit reply. OpenD answers retType -1 with a text; the exact wording is not
# documented, so the adapter matches on keywords ("frequen", "too many", 频率 ...) rather than this string.
RATE_LIMIT_MSG = "Request frequency too high: at most {limit} requests per 30 seconds for this interface (频率太高)"

# OpenD's refusals that asking again cannot change, as users of real OpenD have reported them (futu-api passes
# only ``retMsg`` on; ``retType`` is -1, or -500 "RetType_Invalid" for a malformed request). Sources: py-futu-api
# issues #3 (行情权限不足), #130 ("No right to subscribe 00700"), #81 (缺少必要的参数: securityFirm), futuquant
# issue #160 ("Unknow stock01835", OpenD's spelling). The "quota" and "unsupported" wordings are
# representative, not quoted.
REFUSALS: dict[str, tuple[int, str]] = {
    "unknown_security": (-1, "Unknow stock{code}"),
    "unknown_security_zh": (-1, "未知股票"),
    "no_permission": (-1, "No right to subscribe {code}"),
    "no_permission_zh": (-1, "行情权限不足"),
    "quota": (-1, "历史K线额度不足"),
    "invalid_parameter": (-500, "缺少必要的参数: securityFirm"),
    "unsupported": (-1, "This protocol is not supported by this OpenD version"),
}

# Futu enum numbers (Qot_Common / Trd_Common protos).
QOT_MARKET_HK = 1
TRD_SEC_MARKET_HK = 1
TRD_MARKET_HK = 1
TRD_ENV_SIMULATE = 0
TRD_ENV_REAL = 1
CURRENCY_HKD = 1
SECURITY_TYPE_EQTY = 3
SECURITY_TYPE_TRUST = 4
SECURITY_FIRM_FUTU_SECURITIES = 1
MODIFY_OP_NORMAL = 1
MODIFY_OP_CANCEL = 2

PHASE_TO_QOT_MARKET_STATE: dict[MarketPhase, int] = {
    MarketPhase.CLOSED: 6,  # QotMarketState_Closed
    MarketPhase.PRE_OPEN: 1,  # QotMarketState_Auction
    MarketPhase.MORNING: 3,
    MarketPhase.LUNCH: 4,  # QotMarketState_Rest
    MarketPhase.AFTERNOON: 5,
    MarketPhase.CLOSING_AUCTION: 19,  # QotMarketState_HkCas
}

KL_TYPE_TO_TIMEFRAME: dict[int, str] = {1: "1m", 6: "5m", 7: "15m", 9: "1h", 2: "1d"}
TIMEFRAME_MINUTES: dict[str, int] = {"1m": 1, "5m": 5, "15m": 15, "1h": 60}
BARS_PER_DAY: dict[str, int] = {"1m": 331, "5m": 67, "15m": 23, "1h": 7, "1d": 1}

# Index plates: the codes Futu uses for the Hang Seng family.
PLATE_TO_INDEX: dict[str, str] = {"800000": "HSI", "800100": "HSCEI", "800700": "HSTECH"}

ORDER_TYPE_TO_FUTU: dict[OrderType, int] = {
    OrderType.LIMIT: 1,  # OrderType_Normal
    OrderType.MARKET: 2,
    OrderType.STOP: 10,
    OrderType.STOP_LIMIT: 11,
}
FUTU_TO_ORDER_TYPE = {v: k for k, v in ORDER_TYPE_TO_FUTU.items()}
SIDE_TO_FUTU: dict[Side, int] = {Side.BUY: 1, Side.SELL: 2}
FUTU_TO_SIDE = {v: k for k, v in SIDE_TO_FUTU.items()}


def _futu_order_status(order: Order) -> int:
    """Trd_Common.OrderStatus for one of our orders."""
    status = order.status
    if status in (OrderStatus.PENDING, OrderStatus.SUBMITTED, OrderStatus.DRY_RUN):
        return 5  # Submitted
    if status is OrderStatus.PARTIALLY_FILLED:
        return 10  # Filled_Part
    if status is OrderStatus.FILLED:
        return 11  # Filled_All
    if status is OrderStatus.CANCELLED:
        return 14 if order.filled_quantity > 0 else 15  # Cancelled_Part / Cancelled_All
    if status is OrderStatus.REJECTED:
        return 21  # Failed
    return -1  # Unknown


def _hkt_text(moment: datetime) -> str:
    return moment.astimezone(HKT).strftime("%Y-%m-%d %H:%M:%S")


def _parse_hkt(text: str) -> datetime:
    text = text.strip()
    for fmt in ("%Y-%m-%d %H:%M:%S.%f", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d"):
        try:
            return datetime.strptime(text, fmt).replace(tzinfo=HKT)
        except ValueError:
            continue
    raise ValueError(f"unparseable time {text!r}")


def _hk_code(symbol: str) -> str:
    """``HK.00700`` -> ``00700``."""
    return symbol.split(".", 1)[1] if symbol.startswith("HK.") else symbol


def _decimal(value: float) -> Decimal:
    return Decimal(repr(float(value)))


@dataclass
class _Fault:
    kind: str  # fail | rate_limit | stall | drop
    ret_type: int = -1
    msg: str = ""
    seconds: float | None = None
    perform: bool = True


@dataclass
class _Connection:
    conn_id: int
    sock: socket.socket
    peer: tuple[str, int]
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    alive: bool = True
    initialised: bool = False


@dataclass
class _OrderRecord:
    order_id: int
    trd_env: int
    order: Order


class FakeOpenD:
    """A Futu OpenD stand-in on 127.0.0.1 (ephemeral port), one thread per client connection."""

    SIM_ACC_ID = 18_000_001
    REAL_ACC_ID = 28_000_001
    LOGIN_USER_ID = 7_700_700

    def __init__(
        self,
        market: MarketData | None = None,
        broker: Broker | None = None,
        *,
        real_broker: Broker | None = None,
        clock: Clock | None = None,
        trade_password: str = "",
        keep_alive_interval_s: int = 10,
        server_version: int = 902,
    ) -> None:
        self.market = market
        self.broker = broker
        self.real_broker = real_broker
        self._clock = clock or (lambda: datetime.now(HKT))
        self._trade_pwd_md5 = hashlib.md5(trade_password.encode()).hexdigest() if trade_password else ""
        self.keep_alive_interval_s = keep_alive_interval_s
        self.server_version = server_version
        self.unlocked = False

        self._lock = threading.RLock()  # guards state and the backing broker/market (not thread-safe)
        self._requests: list[tuple[int, dict[str, Any]]] = []
        self._faults: dict[int, deque[_Fault]] = defaultdict(deque)
        self._connections: dict[int, _Connection] = {}
        self._conn_ids = itertools.count(5_000_001)
        self._order_ids = itertools.count(1)
        self._orders: dict[str, _OrderRecord] = {}  # broker_order_id -> record
        self._timers: list[threading.Timer] = []
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self.errors: list[str] = []  # internal errors of the fake itself (a test should see none)
        # Historical K-line quota: distinct stocks per 30 days, as OpenD counts it. A history request for a stock
        # not yet counted is refused once the quota is used up.
        self.history_quota = 100
        self.history_codes: dict[str, datetime] = {}  # code -> when it was first fetched in this window
        self.refuse_history_for: set[str] = set()  # symbols (HK.00700) whose history requests fail, as on a fault
        self.accepted_connections = 0

        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self.host, self.port = self._server.getsockname()[:2]
        self._started = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FakeOpenD:
        if self._started:
            return self
        self._started = True
        self._server.listen(16)
        self._server.settimeout(0.1)
        thread = threading.Thread(target=self._accept_loop, name="fake-opend-accept", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop listening, close every client connection and cancel delayed replies."""
        self._stopping.set()
        with self._lock:
            timers, self._timers = self._timers, []
        for timer in timers:
            timer.cancel()
        self.drop_connections()
        with contextlib.suppress(OSError):
            self._server.close()
        for thread in list(self._threads):
            if thread is not threading.current_thread():
                thread.join(timeout=2)

    def __enter__(self) -> FakeOpenD:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ inspection

    @property
    def requests(self) -> list[tuple[int, dict[str, Any]]]:
        with self._lock:
            return list(self._requests)

    def requests_for(self, proto_id: int) -> list[dict[str, Any]]:
        return [c2s for pid, c2s in self.requests if pid == proto_id]

    def count(self, proto_id: int) -> int:
        return len(self.requests_for(proto_id))

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    @property
    def active_connections(self) -> int:
        with self._lock:
            return sum(1 for conn in self._connections.values() if conn.alive)

    # ------------------------------------------------------------------ fault injection

    def fail_next(self, proto_id: int, ret_type: int = -1, msg: str = "fake OpenD failure") -> None:
        """The next request of this proto gets an error reply; nothing is performed."""
        with self._lock:
            self._faults[proto_id].append(_Fault("fail", ret_type=ret_type, msg=msg))

    def refuse_next(self, proto_id: int, reason: str, code: str = "00700") -> None:
        """The next request of this proto gets one of OpenD's permanent refusals (``REFUSALS``); nothing is done."""
        ret_type, msg = REFUSALS[reason]
        self.fail_next(proto_id, ret_type=ret_type, msg=msg.format(code=code))

    def rate_limit_next(self, proto_id: int, n: int = 1) -> None:
        """The next ``n`` requests of this proto get Futu's rate-limit error; nothing is performed."""
        with self._lock:
            for _ in range(n):
                self._faults[proto_id].append(_Fault("rate_limit"))

    def stall_next(self, proto_id: int, seconds: float | None = None) -> None:
        """Perform the next request of this proto but answer only after ``seconds`` (``None``: never)."""
        with self._lock:
            self._faults[proto_id].append(_Fault("stall", seconds=seconds))

    def drop_next(self, proto_id: int, *, perform: bool = True) -> None:
        """Close the connection when the next request of this proto arrives (after performing it if asked)."""
        with self._lock:
            self._faults[proto_id].append(_Fault("drop", perform=perform))

    def drop_connections(self) -> None:
        """Close every client socket, as an OpenD restart would."""
        with self._lock:
            conns = list(self._connections.values())
        for conn in conns:
            self._close(conn)

    # ------------------------------------------------------------------ orders known to the fake

    def orders(self, trd_env: int = TRD_ENV_SIMULATE) -> list[Order]:
        """Every order the fake has seen for that environment, refreshed from the backing broker."""
        with self._lock:
            return [rec.order for rec in self._refreshed_records(trd_env)]

    # ------------------------------------------------------------------ network

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, peer = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(conn_id=next(self._conn_ids), sock=sock, peer=peer)
            with self._lock:
                self._connections[conn.conn_id] = conn
                self.accepted_connections += 1
            thread = threading.Thread(target=self._serve, args=(conn,), name=f"fake-opend-{conn.conn_id}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _close(self, conn: _Connection) -> None:
        conn.alive = False
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            conn.sock.close()
        with self._lock:
            self._connections.pop(conn.conn_id, None)

    def _recv_exact(self, conn: _Connection, size: int) -> bytes | None:
        chunks = bytearray()
        while len(chunks) < size:
            try:
                chunk = conn.sock.recv(size - len(chunks))
            except OSError:
                return None
            if not chunk:
                return None
            chunks.extend(chunk)
        return bytes(chunks)

    def _serve(self, conn: _Connection) -> None:
        try:
            while conn.alive and not self._stopping.is_set():
                head = self._recv_exact(conn, HEADER.size)
                if head is None:
                    break
                h1, h2, proto_id, fmt, _ver, serial_no, body_len, sha, _reserved = HEADER.unpack(head)
                body = self._recv_exact(conn, body_len) if body_len else b""
                if body is None:
                    break
                if (h1, h2) != (b"F", b"T") or hashlib.sha1(body).digest() != sha:
                    self._record_error(f"bad packet on conn {conn.conn_id}: proto={proto_id} (header or SHA1)")
                    break
                if fmt != 0:
                    self._record_error(f"proto {proto_id}: only protobuf (format 0) is supported, got {fmt}")
                    break
                self._handle(conn, proto_id, serial_no, body)
        finally:
            self._close(conn)

    def _send(self, conn: _Connection, proto_id: int, serial_no: int, response: Any) -> None:
        body = response.SerializeToString()
        head = HEADER.pack(b"F", b"T", proto_id, 0, 0, serial_no, len(body), hashlib.sha1(body).digest(), bytes(8))
        with conn.send_lock:
            if not conn.alive:
                return
            try:
                conn.sock.sendall(head + body)
            except OSError:
                conn.alive = False

    def _record_error(self, text: str) -> None:
        with self._lock:
            self.errors.append(text)

    # ------------------------------------------------------------------ dispatch

    def _handle(self, conn: _Connection, proto_id: int, serial_no: int, body: bytes) -> None:
        module_name = PB_MODULES.get(proto_id)
        if module_name is None:
            with self._lock:
                self._requests.append((proto_id, {}))
            self._record_error(f"proto {proto_id} is not served by FakeOpenD")
            return
        module = import_module(f"futu.common.pb.{module_name}_pb2")
        request = module.Request()
        request.ParseFromString(body)
        c2s = MessageToDict(request.c2s)
        with self._lock:
            self._requests.append((proto_id, c2s))
            fault = self._faults[proto_id].popleft() if self._faults[proto_id] else None

        response = module.Response()
        if fault is not None and fault.kind == "fail":
            response.retType = fault.ret_type
            response.retMsg = fault.msg
            self._send(conn, proto_id, serial_no, response)
            return
        if fault is not None and fault.kind == "rate_limit":
            response.retType = -1
            response.retMsg = RATE_LIMIT_MSG.format(limit=_documented_limit(proto_id))
            self._send(conn, proto_id, serial_no, response)
            return
        if fault is not None and fault.kind == "drop" and not fault.perform:
            self._close(conn)
            return

        handler = getattr(self, f"_h_{module_name.lower()}")
        try:
            with self._lock:
                handler(conn, request.c2s, response)
            response.retType = 0
        except OrderRejected as exc:
            response.Clear()
            response.retType = -1
            response.retMsg = str(exc)
        except _Refused as exc:
            response.Clear()
            response.retType = -1
            response.retMsg = str(exc)
        except Exception as exc:  # a bug in the fake or its backing: visible to the test through .errors
            self._record_error(f"proto {proto_id}: {type(exc).__name__}: {exc}")
            response.Clear()
            response.retType = -1
            response.retMsg = f"FakeOpenD internal error: {exc}"

        if fault is not None and fault.kind == "drop":
            self._close(conn)
            return
        if fault is not None and fault.kind == "stall":
            if fault.seconds is not None:
                timer = threading.Timer(fault.seconds, self._send, args=(conn, proto_id, serial_no, response))
                timer.daemon = True
                with self._lock:
                    self._timers.append(timer)
                timer.start()
            return
        self._send(conn, proto_id, serial_no, response)

    # ------------------------------------------------------------------ system protos

    def _h_initconnect(self, conn: _Connection, c2s: Any, response: Any) -> None:
        if c2s.HasField("packetEncAlgo") and c2s.packetEncAlgo not in (-1,):
            raise _Refused("FakeOpenD does not support encryption; call SysConfig.enable_proto_encrypt(False)")
        conn.initialised = True
        s2c = response.s2c
        s2c.serverVer = self.server_version
        s2c.loginUserID = self.LOGIN_USER_ID
        s2c.connID = conn.conn_id
        s2c.connAESKey = "0123456789ABCDEF"  # unused without encryption, but required
        s2c.keepAliveInterval = self.keep_alive_interval_s

    def _h_keepalive(self, conn: _Connection, c2s: Any, response: Any) -> None:
        response.s2c.time = int(time.time())

    def _h_getglobalstate(self, conn: _Connection, c2s: Any, response: Any) -> None:
        s2c = response.s2c
        s2c.marketHK = self._qot_market_state()
        closed = PHASE_TO_QOT_MARKET_STATE[MarketPhase.CLOSED]
        s2c.marketUS = closed
        s2c.marketSH = closed
        s2c.marketSZ = closed
        s2c.marketHKFuture = closed
        s2c.qotLogined = True
        s2c.trdLogined = True
        s2c.serverVer = self.server_version
        s2c.serverBuildNo = 1
        s2c.time = int(self._clock().timestamp())
        s2c.localTime = self._clock().timestamp()
        s2c.connID = conn.conn_id

    def _qot_market_state(self) -> int:
        if self.market is None:
            return 0  # QotMarketState_None
        state = self.market.market_state()
        if state is not None:
            return PHASE_TO_QOT_MARKET_STATE[state.phase]
        calendar_phase = getattr(self.market, "calendar_phase", None)  # SimExchange: the XHKG calendar decides
        if calendar_phase is not None:
            return PHASE_TO_QOT_MARKET_STATE[calendar_phase()]
        return 0

    # ------------------------------------------------------------------ quote protos

    def _require_market(self) -> MarketData:
        if self.market is None:
            raise _Refused("FakeOpenD was started without a market data backend")
        return self.market

    def _h_qot_getsecuritysnapshot(self, conn: _Connection, c2s: Any, response: Any) -> None:
        market = self._require_market()
        symbols = [f"HK.{sec.code}" for sec in c2s.securityList if sec.market == QOT_MARKET_HK]
        for quote in market.snapshots(symbols):
            snap = response.s2c.snapshotList.add()
            _fill_snapshot(snap.basic, quote)
            if quote.is_equity:
                _fill_equity_ex_data(snap.equityExData)

    def _h_qot_getmarketstate(self, conn: _Connection, c2s: Any, response: Any) -> None:
        state = self._qot_market_state()
        for sec in c2s.securityList:
            info = response.s2c.marketInfoList.add()
            info.security.market = sec.market
            info.security.code = sec.code
            info.name = sec.code
            info.marketState = state

    def _h_qot_requesthistorykl(self, conn: _Connection, c2s: Any, response: Any) -> None:
        market = self._require_market()
        timeframe = KL_TYPE_TO_TIMEFRAME.get(c2s.klType)
        if timeframe is None:
            raise _Refused(f"FakeOpenD serves K-line types {sorted(KL_TYPE_TO_TIMEFRAME)}, not {c2s.klType}")
        symbol = f"HK.{c2s.security.code}"
        if symbol in self.refuse_history_for:
            raise _Refused(f"history K-line request for {symbol} failed (injected by refuse_history_for)")
        if symbol not in self.history_codes:
            if len(self.history_codes) >= self.history_quota:
                raise _Refused(f"historical K-line quota used up ({self.history_quota} stocks per 30 days)")
            self.history_codes[symbol] = self._clock()
        begin = _parse_hkt(c2s.beginTime)
        end = _parse_hkt(c2s.endTime)
        now = self._clock()
        days = max(1, (min(end, now) - begin).days + 2)
        wanted = min(20_000, BARS_PER_DAY[timeframe] * days)
        step = timedelta(minutes=TIMEFRAME_MINUTES.get(timeframe, 0))
        rows = []
        for bar in market.klines(symbol, timeframe, wanted):
            # Futu labels intraday bars by their end time, daily bars by the date at 00:00.
            key_time = bar.time + step if timeframe != "1d" else bar.time
            if begin <= key_time <= end:
                rows.append((key_time, bar))
        offset = int(c2s.nextReqKey.decode()) if c2s.HasField("nextReqKey") else 0
        limit = c2s.maxAckKLNum if c2s.HasField("maxAckKLNum") and c2s.maxAckKLNum > 0 else len(rows)
        page = rows[offset : offset + limit]
        s2c = response.s2c
        s2c.security.market = c2s.security.market
        s2c.security.code = c2s.security.code
        s2c.name = c2s.security.code
        prev_close: Decimal | None = rows[offset - 1][1].close if offset > 0 else None
        for key_time, bar in page:
            kl = s2c.klList.add()
            kl.time = _hkt_text(key_time)
            kl.isBlank = False
            kl.openPrice = float(bar.open)
            kl.highPrice = float(bar.high)
            kl.lowPrice = float(bar.low)
            kl.closePrice = float(bar.close)
            kl.volume = bar.volume
            kl.turnover = float(bar.close * bar.volume)
            kl.lastClosePrice = float(prev_close) if prev_close is not None else 0.0
            kl.timestamp = key_time.timestamp()
            prev_close = bar.close
        if offset + limit < len(rows):
            s2c.nextReqKey = str(offset + limit).encode()

    def _h_qot_requesthistoryklquota(self, conn: _Connection, c2s: Any, response: Any) -> None:
        s2c = response.s2c
        s2c.usedQuota = len(self.history_codes)
        s2c.remainQuota = max(0, self.history_quota - len(self.history_codes))
        if c2s.HasField("bGetDetail") and c2s.bGetDetail:
            for symbol, when in self.history_codes.items():
                item = s2c.detailList.add()
                item.security.market = QOT_MARKET_HK
                item.security.code = symbol[3:]
                item.name = symbol[3:]
                item.requestTime = _hkt_text(when)
                item.requestTimeStamp = int(when.timestamp())

    def _h_qot_getplatesecurity(self, conn: _Connection, c2s: Any, response: Any) -> None:
        market = self._require_market()
        index = PLATE_TO_INDEX.get(c2s.plate.code)
        if index is None:
            raise _Refused(f"Unknown plate HK.{c2s.plate.code} (FakeOpenD knows {sorted(PLATE_TO_INDEX)})")
        symbols = market.index_constituents(index)
        quotes = {q.symbol: q for q in market.snapshots(symbols)}
        for symbol in symbols:
            quote = quotes.get(symbol)
            info = response.s2c.staticInfoList.add()
            basic = info.basic
            basic.security.market = QOT_MARKET_HK
            basic.security.code = _hk_code(symbol)
            basic.id = int(_hk_code(symbol))
            basic.lotSize = quote.lot_size if quote else 100
            basic.secType = SECURITY_TYPE_EQTY
            basic.name = quote.name if quote else symbol
            basic.listTime = "2000-01-03"

    def _h_qot_getsearchnews(self, conn: _Connection, c2s: Any, response: Any) -> None:
        market = self._require_market()
        keyword = c2s.keyword.strip().upper().removeprefix("HK.").removesuffix(".HK")
        if not keyword.isdigit():
            return  # the fake only finds news by stock code
        symbol = f"HK.{int(keyword):05d}"
        items = market.news(symbol, self._clock() - timedelta(days=30))
        items = sorted(items, key=lambda item: item.published_at, reverse=True)
        limit = c2s.max_count if c2s.HasField("max_count") and c2s.max_count > 0 else len(items)
        for item in items[:limit]:
            news = response.s2c.search_news_list.add()
            news.title = item.title
            news.news_sub_type = 1  # NEWS
            news.source = item.source
            news.publish_time = str(int(item.published_at.timestamp()))
            news.related_securities.append(f"{_hk_code(item.symbol)}.HK")
            if item.url:
                news.url = item.url

    # ------------------------------------------------------------------ trade protos

    def _accounts(self) -> list[tuple[int, int]]:
        accounts = []
        if self.broker is not None:
            accounts.append((TRD_ENV_SIMULATE, self.SIM_ACC_ID))
        if self.real_broker is not None:
            accounts.append((TRD_ENV_REAL, self.REAL_ACC_ID))
        return accounts

    def _broker_for(self, header: Any) -> Broker:
        if (header.trdEnv, header.accID) not in self._accounts():
            raise _Refused(f"Nonexisting acc_id {header.accID} for trd_env {header.trdEnv}")
        broker = self.broker if header.trdEnv == TRD_ENV_SIMULATE else self.real_broker
        assert broker is not None
        return broker

    @staticmethod
    def _echo_header(target: Any, header: Any) -> None:
        target.trdEnv = header.trdEnv
        target.accID = header.accID
        target.trdMarket = header.trdMarket

    def _h_trd_getacclist(self, conn: _Connection, c2s: Any, response: Any) -> None:
        for trd_env, acc_id in self._accounts():
            acc = response.s2c.accList.add()
            acc.trdEnv = trd_env
            acc.accID = acc_id
            acc.trdMarketAuthList.append(TRD_MARKET_HK)
            acc.accType = 1 if trd_env == TRD_ENV_SIMULATE else 2  # cash / margin
            acc.securityFirm = SECURITY_FIRM_FUTU_SECURITIES
            acc.accStatus = 0  # active
            if trd_env == TRD_ENV_SIMULATE:
                acc.simAccType = 1  # stock
            else:
                acc.cardNum = "1001100120012001"
                acc.uniCardNum = "1001100120012001"

    def _h_trd_unlocktrade(self, conn: _Connection, c2s: Any, response: Any) -> None:
        if not c2s.unlock:
            self.unlocked = False
            return
        if not self._trade_pwd_md5 or c2s.pwdMD5 != self._trade_pwd_md5:
            raise _Refused("Unlock failed: the trade password is incorrect")
        self.unlocked = True

    def _h_trd_subaccpush(self, conn: _Connection, c2s: Any, response: Any) -> None:
        return None

    def _h_trd_getfunds(self, conn: _Connection, c2s: Any, response: Any) -> None:
        account = self._broker_for(c2s.header).account()
        self._echo_header(response.s2c.header, c2s.header)
        funds = response.s2c.funds
        funds.power = float(account.buying_power)
        funds.totalAssets = float(account.equity)
        funds.cash = float(account.cash)
        funds.marketVal = float(account.market_value)
        funds.frozenCash = 0.0
        funds.debtCash = 0.0
        funds.avlWithdrawalCash = float(account.cash)
        funds.currency = CURRENCY_HKD
        funds.availableFunds = float(account.cash)
        funds.securitiesAssets = float(account.equity)

    def _h_trd_getpositionlist(self, conn: _Connection, c2s: Any, response: Any) -> None:
        broker = self._broker_for(c2s.header)
        self._echo_header(response.s2c.header, c2s.header)
        codes = set(c2s.filterConditions.codeList) if c2s.HasField("filterConditions") else set()
        for i, position in enumerate(broker.positions(), start=1):
            if codes and _hk_code(position.symbol) not in codes:
                continue
            pos = response.s2c.positionList.add()
            pos.positionID = i
            pos.positionSide = 0  # long
            pos.code = _hk_code(position.symbol)
            pos.name = position.name or position.symbol
            pos.qty = float(position.quantity)
            pos.canSellQty = float(position.sellable_quantity)
            pos.price = float(position.last_price)
            pos.costPrice = float(position.avg_cost)
            pos.averageCostPrice = float(position.avg_cost)
            pos.val = float(position.market_value)
            pos.plVal = float(position.unrealized_pnl)
            pos.unrealizedPL = float(position.unrealized_pnl)
            cost = position.avg_cost * position.quantity
            if cost:
                pos.plRatio = float(position.unrealized_pnl / cost)
            pos.secMarket = TRD_SEC_MARKET_HK
            pos.trdMarket = TRD_MARKET_HK
            pos.currency = CURRENCY_HKD

    def _refreshed_records(self, trd_env: int) -> list[_OrderRecord]:
        broker = self.broker if trd_env == TRD_ENV_SIMULATE else self.real_broker
        if broker is None:
            return []
        all_orders = getattr(broker, "orders", None)  # SimBroker lists every order; the protocol only open ones
        known = all_orders() if all_orders is not None else broker.open_orders()
        for order in known:  # orders the broker knew before the fake saw them (an earlier run, a restart)
            if order.broker_order_id not in self._orders:
                self._orders[order.broker_order_id] = _OrderRecord(next(self._order_ids), trd_env, order)
        records = [rec for rec in self._orders.values() if rec.trd_env == trd_env]
        for rec in records:
            if rec.order.client_order_id and not rec.order.is_done:
                fresh = broker.find_order(rec.order.client_order_id)
                if fresh is not None:
                    rec.order = fresh
        return records

    def _fill_order(self, target: Any, rec: _OrderRecord) -> None:
        order = rec.order
        target.trdSide = SIDE_TO_FUTU[order.side]
        target.orderType = ORDER_TYPE_TO_FUTU[order.order_type]
        target.orderStatus = _futu_order_status(order)
        target.orderID = rec.order_id
        target.orderIDEx = order.broker_order_id
        target.code = _hk_code(order.symbol)
        target.name = order.symbol
        target.qty = float(order.quantity)
        if order.limit_price is not None:
            target.price = float(order.limit_price)
        target.createTime = _hkt_text(order.created_at)
        target.updateTime = _hkt_text(order.updated_at)
        target.createTimestamp = order.created_at.timestamp()
        target.updateTimestamp = order.updated_at.timestamp()
        target.fillQty = float(order.filled_quantity)
        target.fillAvgPrice = float(order.avg_fill_price) if order.avg_fill_price is not None else 0.0
        target.lastErrMsg = order.message
        target.secMarket = TRD_SEC_MARKET_HK
        if order.client_order_id:
            target.remark = order.client_order_id
        if order.aux_price is not None:
            target.auxPrice = float(order.aux_price)
        target.timeInForce = 0  # DAY
        target.currency = CURRENCY_HKD
        target.trdMarket = TRD_MARKET_HK

    def _list_orders(self, c2s: Any, response: Any, *, history: bool) -> None:
        self._broker_for(c2s.header)
        self._echo_header(response.s2c.header, c2s.header)
        cond = c2s.filterConditions
        ids = set(cond.orderIDExList)
        codes = set(cond.codeList)
        statuses = set(c2s.filterStatusList)
        begin = _parse_hkt(cond.beginTime) if cond.beginTime else None
        end = _parse_hkt(cond.endTime) if cond.endTime else None
        today = self._clock().astimezone(HKT).date()
        for rec in self._refreshed_records(c2s.header.trdEnv):
            order = rec.order
            created = order.created_at.astimezone(HKT)
            if not history and created.date() != today:
                continue  # Trd_GetOrderList covers today's orders only
            if ids and order.broker_order_id not in ids:
                continue
            if codes and _hk_code(order.symbol) not in codes:
                continue
            if statuses and _futu_order_status(order) not in statuses:
                continue
            if (begin and created < begin) or (end and created > end):
                continue
            self._fill_order(response.s2c.orderList.add(), rec)

    def _h_trd_getorderlist(self, conn: _Connection, c2s: Any, response: Any) -> None:
        self._list_orders(c2s, response, history=False)

    def _h_trd_gethistoryorderlist(self, conn: _Connection, c2s: Any, response: Any) -> None:
        self._list_orders(c2s, response, history=True)

    def _h_trd_placeorder(self, conn: _Connection, c2s: Any, response: Any) -> None:
        broker = self._broker_for(c2s.header)
        if c2s.header.trdEnv == TRD_ENV_REAL and not self.unlocked:
            raise _Refused("Trading is locked: unlock trade (Trd_UnlockTrade) before placing REAL orders")
        if c2s.secMarket != TRD_SEC_MARKET_HK:
            raise _Refused(f"FakeOpenD trades HK securities only (secMarket={c2s.secMarket})")
        order_type = FUTU_TO_ORDER_TYPE.get(c2s.orderType)
        side = FUTU_TO_SIDE.get(c2s.trdSide)
        if order_type is None or side is None:
            raise _Refused(f"Unsupported order type {c2s.orderType} / side {c2s.trdSide}")
        if c2s.header.trdEnv == TRD_ENV_SIMULATE and order_type in (OrderType.STOP, OrderType.STOP_LIMIT):
            raise _Refused("Paper trading does not support this order type (only limit and market orders)")
        if c2s.qty != int(c2s.qty):
            raise _Refused(f"Quantity {c2s.qty} is not a whole number of shares")
        client_order_id = c2s.remark if c2s.HasField("remark") and c2s.remark else f"fake-{next(self._order_ids)}"
        request = OrderRequest(
            client_order_id=client_order_id,
            symbol=f"HK.{c2s.code}",
            side=side,
            quantity=int(c2s.qty),
            order_type=order_type,
            limit_price=_decimal(c2s.price) if order_type in (OrderType.LIMIT, OrderType.STOP_LIMIT) else None,
            aux_price=_decimal(c2s.auxPrice) if c2s.HasField("auxPrice") else None,
        )
        order = broker.place_order(request)
        rec = _OrderRecord(next(self._order_ids), c2s.header.trdEnv, order)
        self._orders[order.broker_order_id] = rec
        self._echo_header(response.s2c.header, c2s.header)
        response.s2c.orderID = rec.order_id
        response.s2c.orderIDEx = order.broker_order_id

    def _h_trd_modifyorder(self, conn: _Connection, c2s: Any, response: Any) -> None:
        broker = self._broker_for(c2s.header)
        if c2s.header.trdEnv == TRD_ENV_REAL and not self.unlocked:
            raise _Refused("Trading is locked: unlock trade (Trd_UnlockTrade) before modifying REAL orders")
        if c2s.modifyOrderOp != MODIFY_OP_CANCEL:
            raise _Refused(f"FakeOpenD supports cancel only (modifyOrderOp={c2s.modifyOrderOp})")
        self._echo_header(response.s2c.header, c2s.header)
        if c2s.forAll:
            for order in broker.open_orders():
                broker.cancel_order(order.broker_order_id)
            response.s2c.orderID = 0
            return
        order_id = c2s.orderIDEx
        rec = self._orders.get(order_id)
        if rec is None:
            raise _Refused(f"Order {order_id} does not exist")
        if rec.order.client_order_id:
            fresh = broker.find_order(rec.order.client_order_id)
            rec.order = fresh or rec.order
        if rec.order.is_done:
            raise _Refused(f"Order {order_id} cannot be cancelled: it is already {rec.order.status.value}")
        rec.order = broker.cancel_order(order_id)
        response.s2c.orderID = rec.order_id
        response.s2c.orderIDEx = order_id


class _Refused(Exception):
    """A request the fake OpenD answers with retType -1 and this text."""


def _documented_limit(proto_id: int) -> int:
    return {
        QOT_GET_SECURITY_SNAPSHOT: 60,
        QOT_REQUEST_HISTORY_KL: 60,
        TRD_PLACE_ORDER: 15,
        TRD_MODIFY_ORDER: 20,
    }.get(proto_id, 10)


def _fill_snapshot(basic: Any, quote: Quote) -> None:
    """Fill Qot_GetSecuritySnapshot.SnapshotBasicData (every required field) from one of our quotes."""
    last = quote.last_price
    basic.security.market = QOT_MARKET_HK
    basic.security.code = _hk_code(quote.symbol)
    basic.name = quote.name or quote.symbol
    basic.type = SECURITY_TYPE_EQTY if quote.is_equity else SECURITY_TYPE_TRUST
    basic.isSuspend = quote.suspended
    basic.listTime = "2000-01-03"
    basic.lotSize = quote.lot_size
    basic.priceSpread = float(quote.price_spread) if quote.price_spread is not None else 0.0
    basic.updateTime = _hkt_text(quote.updated_at)
    basic.updateTimestamp = quote.updated_at.timestamp()
    basic.highPrice = float(quote.high_price if quote.high_price is not None else last)
    basic.openPrice = float(quote.open_price if quote.open_price is not None else last)
    basic.lowPrice = float(quote.low_price if quote.low_price is not None else last)
    basic.lastClosePrice = float(quote.prev_close if quote.prev_close is not None else last)
    basic.curPrice = float(last)
    basic.volume = quote.volume
    basic.turnover = float(quote.turnover)
    basic.turnoverRate = 0.0
    if quote.ask_price is not None:
        basic.askPrice = float(quote.ask_price)
    if quote.bid_price is not None:
        basic.bidPrice = float(quote.bid_price)
    if quote.volume_ratio is not None:
        basic.volumeRatio = quote.volume_ratio


def _fill_equity_ex_data(ex: Any) -> None:
    """Equity extras are required as a block; the fake has no fundamentals, so they are zero."""
    for name in (
        "issuedShares",
        "outstandingShares",
    ):
        setattr(ex, name, 0)
    for name in (
        "issuedMarketVal",
        "netAsset",
        "netProfit",
        "earningsPershare",
        "outstandingMarketVal",
        "netAssetPershare",
        "eyRate",
        "peRate",
        "pbRate",
        "peTTMRate",
    ):
        setattr(ex, name, 0.0)
