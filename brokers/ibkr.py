"""``IbkrClient``: the ``Broker`` and ``MarketData`` protocols over ``ib_async`` and an IB Gateway (or TWS).

The only module that imports ``ib_async`` (lazily, so ``agent.py --help`` stays fast). IB's names stay in this
file: every call turns ib_async's objects and exceptions into our models and errors, once:

- ``BrokerUnavailable``: nothing accepts TCP at the gateway's port, or it accepts but does not complete the API
  handshake within ``connect_timeout_s`` (a gateway still logging in, a client id in use). Never an endless wait.
- ``BrokerTemporaryError``: no answer within ``request_timeout_s`` (ib_async's own default waits forever),
  a dropped socket, the gateway's link to IBKR lost (1100) until restored (1101/1102), pacing (code 162 "pacing
  violation", 420, 100). Reads and cancels are retried (tenacity, a few attempts); orders never.
- ``BrokerRequestRefused``: IB answered no for a reason asking again will not change (200 unknown contract,
  354/10089/10090 no market data permission, 321 invalid request...).
- ``OrderRejected``: IB (or our pre-flight check of lot size and tick) refused an order; nothing works for it.
- ``OrderStateUnknown``: the order was sent, no acknowledgement came, and it cannot be found by its ``orderRef``.

Informational codes (2104, 2106, 2158 and the rest of 2100-2199) and 10167 (delayed data shown) are logged at
debug level, never treated as failures.

IB specifics handled here:
- HK stocks are ``Stock("700", "SEHK", "HKD")``; the board lot comes from the contract details
  (``sizeIncrement``, else ``minSize``). Prices are checked against the dated HKEX tick table (``brokers.hkex``),
  not IB's market rule: the table is the exchange's rule and is what the rest of the agent rounds to.
- Our ``client_order_id`` travels as IB's ``orderRef``; ``broker_order_id`` is IB's ``permId`` (stable across
  sessions and client ids; the session-local ``orderId`` is not).
- Entries go out as a native bracket: the parent limit (``transmit=False``), the take-profit limit and the stop
  (``transmit=True``, sent last, so nothing works until the whole family has arrived). The children share an
  OCA group (``ocaType`` 2: a fill reduces the siblings, with overfill protection), so at most one of them sells.
- Snapshots carry no volume ratio: it is computed from IB's average daily volume (generic tick 165, one short
  streaming request per symbol per day) and the minutes of continuous trading elapsed.
- Without a market data subscription IB sends delayed data (market data type 3, ticks 66-76): every quote says
  ``delayed=True``; ``safety`` refuses entries on it unless ``broker.ibkr.allow_delayed_data`` is set.
- IB paper accounts (ids starting ``D``: ``DU…``) accept stop and bracket orders, so ``has_stop_orders`` is True
  and the protection invariant runs with broker-side stops there too.
- ib_async is asyncio underneath; this client uses its blocking calls from one thread, and every wait is bounded.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from datetime import date, datetime
from decimal import Decimal
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import structlog
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from brokers import gateway, hkex
from brokers.base import (
    Account,
    Bar,
    Clock,
    MarketState,
    NewsItem,
    Order,
    OrderPreview,
    OrderRequest,
    OrderStatus,
    OrderType,
    Position,
    Quote,
    Side,
)
from config.errors import (
    AgentError,
    BrokerRequestRefused,
    BrokerTemporaryError,
    BrokerUnavailable,
    ConfigError,
    OrderRejected,
    OrderStateUnknown,
)
from config.settings import IbkrSettings

HKT = ZoneInfo("Asia/Hong_Kong")
log = structlog.get_logger()
T = TypeVar("T")

# IB order states -> ours (ib_async.OrderStatus names).
IB_ORDER_STATUS: dict[str, OrderStatus] = {
    "PendingSubmit": OrderStatus.SUBMITTED,
    "ApiPending": OrderStatus.SUBMITTED,
    "PreSubmitted": OrderStatus.SUBMITTED,  # accepted, waiting (a bracket child before its parent fills)
    "Submitted": OrderStatus.SUBMITTED,
    "PendingCancel": OrderStatus.SUBMITTED,  # still working until the cancel lands
    "ValidationError": OrderStatus.SUBMITTED,  # ib_async's mark for a warning on a live order
    "ApiUpdate": OrderStatus.SUBMITTED,
    "Filled": OrderStatus.FILLED,
    "Cancelled": OrderStatus.CANCELLED,
    "ApiCancelled": OrderStatus.CANCELLED,
    "Inactive": OrderStatus.REJECTED,  # IB will not work it (rejected, or held outside its hours)
}
IB_ORDER_TYPE: dict[str, OrderType] = {
    "LMT": OrderType.LIMIT,
    "MKT": OrderType.MARKET,
    "STP": OrderType.STOP,
    "STP LMT": OrderType.STOP_LIMIT,
}
BAR_SIZES: dict[str, tuple[str, int]] = {  # ours -> (IB bar size, bars per HK trading day)
    "1m": ("1 min", 330),
    "5m": ("5 mins", 66),
    "15m": ("15 mins", 22),
    "1h": ("1 hour", 6),
    "1d": ("1 day", 1),
}
DELAYED_DATA_TYPES = frozenset({3, 4})  # delayed, delayed-frozen
AVERAGE_VOLUME_TICKS = "165"  # generic tick list "Misc. Stats": tick 21, the average daily volume
HK_CONTINUOUS_MINUTES = 330  # 09:30-12:00 and 13:00-16:00
STREAMING_BATCH = 50
CONNECTIVITY_LOST = frozenset({1100, 2110})
CONNECTIVITY_RESTORED = frozenset({1101, 1102})
NOTICE_CODES = frozenset({10167, 10168, 399, 202})  # delayed data shown, order cancelled notice, order warnings
TEMPORARY_CODES = frozenset({100, 420, 504, 1100, 2110, 10182})  # + any "pacing violation" (162 ...)
UNCERTAIN_ORDER_CODES = frozenset({504, 1100})
OCA_REDUCE_WITH_BLOCK = 2


def _is_notice(code: int) -> bool:
    return code in NOTICE_CODES or 2100 <= code < 2200


_GATEWAY_HINT = (
    "Start it with `docker compose -f docker-compose.ibgateway.yml up -d`, wait for the login to finish, then run "
    "`python scripts/test_connection.py --broker ibkr`."
)


def check_reachable(host: str, port: int, timeout_s: float) -> None:
    """Raise ``BrokerUnavailable`` unless IB Gateway accepts TCP connections at ``host:port`` within ``timeout_s``."""
    gateway.check_reachable("IB Gateway", host, port, timeout_s, _GATEWAY_HINT)


def ib_symbol(symbol: str) -> str:
    """``HK.00700`` -> IB's SEHK symbol ``700``."""
    return str(int(hkex.normalize_symbol(symbol).removeprefix(hkex.MARKET_PREFIX)))


def our_symbol(ib_code: str) -> str:
    """IB's SEHK symbol ``700`` -> ``HK.00700``."""
    return hkex.normalize_symbol(ib_code)


def is_paper_account(account_id: str) -> bool:
    """IBKR paper accounts are the ``D…`` ids (``DU1234567``; ``DF…`` for advisors)."""
    return account_id.upper().startswith("D")


def _num(value: Any) -> Decimal | None:
    """An IB float (NaN, 0 or the 'unset' max double when missing) as Decimal."""
    if value is None:
        return None
    number = float(value)
    if math.isnan(number) or number <= 0 or number >= 1e300:
        return None
    return Decimal(str(number))


def continuous_minutes_elapsed(now: datetime) -> int:
    """Minutes of continuous trading so far on a full HK trading day at ``now`` (0 before 09:30, 330 after 16:00)."""
    t = now.astimezone(HKT)
    minute = t.hour * 60 + t.minute
    morning = min(max(minute - (9 * 60 + 30), 0), 150)
    afternoon = min(max(minute - 13 * 60, 0), 180)
    return morning + afternoon


def volume_pace_ratio(volume: float, average_daily_volume: float, now: datetime) -> float | None:
    """Today's volume per minute of continuous trading vs the average day's (Futu's "volume ratio" idea).

    None before the first minute or without an average. On a half day the minutes are those of a full day's
    clock, so the ratio errs low (never flatters a stock).
    """
    minutes = continuous_minutes_elapsed(now)
    if minutes <= 0 or not average_daily_volume or average_daily_volume != average_daily_volume:
        return None
    return round(volume / minutes / (average_daily_volume / HK_CONTINUOUS_MINUTES), 2)


class IbkrClient:
    """Trading and market data through IB Gateway. Connects in the constructor (bounded by ``connect_timeout_s``).

    A non-paper account needs ``settings.trading_mode == "live"`` *and* ``live_confirmed`` (``--live``).
    """

    has_stop_orders = True  # paper accounts included: IB simulates stops and brackets in paper trading

    def __init__(
        self,
        settings: IbkrSettings,
        *,
        live_confirmed: bool = False,
        clock: Clock | None = None,
        sleep: Callable[[float], None] = time.sleep,
        retry_attempts: int = 3,
        retry_wait_s: float = 0.5,
    ) -> None:
        self.settings = settings
        self._live_confirmed = live_confirmed
        self._clock: Clock = clock or (lambda: datetime.now(HKT))
        self._sleep = sleep
        self._retry_attempts = max(1, retry_attempts)
        self._retry_wait_s = retry_wait_s
        self._contracts: dict[str, Any] = {}  # symbol -> (qualified Stock, ContractDetails)
        self._average_volumes: dict[tuple[str, date], float] = {}  # (symbol, day) -> IB's average daily volume
        self._link_lost: int | None = None  # the 1100-family code while the gateway has no link to IBKR
        self._closed = False
        self.account_id = ""
        self.is_paper = True
        logging.getLogger("ib_async").setLevel(logging.CRITICAL)  # our structlog lines are the record
        import ib_async

        self._ibm = ib_async
        self._ib = ib_async.IB()
        self._ib.RequestTimeout = settings.request_timeout_s
        self._ib.RaiseRequestErrors = True
        self._ib.errorEvent += self._on_error
        self._connect()
        log.info("ibkr_connected", host=settings.host, port=settings.port, account=self.account_id, paper=self.is_paper)

    # ----------------------------------------------------------------------------------------------- connection

    def __enter__(self) -> IbkrClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Disconnect from the gateway. Safe to call twice."""
        self._closed = True
        try:
            self._ib.disconnect()
        except Exception as exc:  # closing must never hide the error that led here
            log.warning("ibkr_close_failed", error=str(exc))

    def _connect(self) -> None:
        s = self.settings
        check_reachable(s.host, s.port, s.connect_timeout_s)
        try:
            self._ib.connect(
                s.host, s.port, clientId=s.client_id, timeout=s.connect_timeout_s, account=s.account,
                raiseSyncErrors=True,
            )  # fmt: skip
        except TimeoutError as exc:
            self._ib.disconnect()
            raise BrokerUnavailable(
                f"IB Gateway at {s.host}:{s.port} accepted the connection but did not complete the API handshake "
                f"within {s.connect_timeout_s:g} s (still logging in? API disabled? client id {s.client_id} in "
                f"use?). {_GATEWAY_HINT} No order was sent."
            ) from exc
        except (ConnectionError, OSError) as exc:
            self._ib.disconnect()
            raise BrokerUnavailable(
                f"IB Gateway at {s.host}:{s.port} dropped the API connection while starting ({exc}). {_GATEWAY_HINT} "
                "No order was sent."
            ) from exc
        try:
            self._resolve_account()
        except BaseException:
            self._ib.disconnect()
            raise
        self._ib.reqMarketDataType(3)  # real-time where subscribed, else delayed (and every quote says which)

    def _resolve_account(self) -> None:
        s = self.settings
        accounts = list(self._ib.managedAccounts())
        if s.account:
            if s.account not in accounts:
                raise ConfigError(
                    f"broker.ibkr.account is {s.account}, but the gateway is logged in to "
                    f"{', '.join(accounts) or 'none'}. Log the gateway in to that account or fix broker.ibkr.account."
                )
            account = s.account
        elif len(accounts) == 1:
            account = accounts[0]
        else:
            raise ConfigError(
                f"The gateway manages several accounts ({', '.join(accounts)}): set broker.ibkr.account to the one "
                "to trade."
            )
        paper = is_paper_account(account)
        if not paper and (s.trading_mode != "live" or not self._live_confirmed):
            raise ConfigError(
                f"IBKR account {account} is a live (real-money) account. Trading it needs broker.ibkr.trading_mode: "
                "live and --live on the command line; log the gateway in to your paper account (DU…) otherwise."
            )
        if paper and s.trading_mode == "live":
            raise ConfigError(
                f"broker.ibkr.trading_mode is live but the gateway is logged in to paper account {account}. Log it in "
                "to the live account (port 4001) or set trading_mode: paper."
            )
        self.account_id, self.is_paper = account, paper

    def _on_error(self, req_id: int, code: int, text: str, contract: Any = None) -> None:
        if code in CONNECTIVITY_LOST:
            self._link_lost = code
            log.warning("ibkr_connectivity_lost", code=code, message=text)
        elif code in CONNECTIVITY_RESTORED:
            self._link_lost = None
            log.warning("ibkr_connectivity_restored", code=code, data_lost=code == 1101, message=text)
            if code == 1101:
                self._contracts.clear()  # "data lost": ask again rather than trust what was cached
        elif _is_notice(code):
            log.debug("ibkr_notice", code=code, req_id=req_id, message=text)
        else:
            log.warning("ibkr_error", code=code, req_id=req_id, message=text)

    def _ensure_connected(self) -> None:
        if self._closed:
            raise AgentError("IbkrClient is closed; create a new one to talk to the gateway again.")
        if not self._ib.isConnected():
            log.warning("ibkr_reconnecting")
            self._ib.disconnect()
            self._connect()
        self._ib.sleep(0)  # take in what the gateway pushed since the last call (1100/1101/1102 among it)
        self._check_link()

    def _check_link(self) -> None:
        if self._link_lost is not None:
            raise BrokerTemporaryError(
                f"IB Gateway has lost its connection to IBKR's servers (code {self._link_lost}); it reconnects by "
                "itself (1101/1102). Try again shortly.",
                code=self._link_lost,
            )

    # ------------------------------------------------------------------------------------------ calling IB

    def _call(self, what: str, call: Callable[[], T]) -> T:
        """One blocking ib_async call, with its failures as our errors (not retried here)."""
        self._ensure_connected()
        timeout = self.settings.request_timeout_s
        try:
            result = call()
        except TimeoutError as exc:
            raise BrokerTemporaryError(f"IBKR {what}: no answer within {timeout:g} s.", code="timeout") from exc
        except ConnectionError as exc:
            raise BrokerTemporaryError(
                f"IBKR {what} failed: the connection to the gateway dropped ({exc}); it is reopened on the next call.",
                code="disconnected",
            ) from exc
        except self._ibm.RequestError as exc:
            code = exc.code
            if code in TEMPORARY_CODES or "pacing" in exc.message.lower():
                raise BrokerTemporaryError(f"IBKR {what} failed: {exc.message} (code {code}).", code=code) from exc
            log.warning("ibkr_request_refused", call=what, code=code, error=exc.message)
            raise BrokerRequestRefused(
                f"IBKR {what} was refused: {exc.message} (code {code}). Not retried: asking again will get the same "
                "answer.",
                code=code,
            ) from exc
        self._check_link()  # the link dropped while we waited: the answer may be the gateway's stale copy
        log.debug("ibkr_response", call=what)
        return result

    def _read(self, what: str, call: Callable[[], T]) -> T:
        """A retried read (or cancel): up to ``retry_attempts`` tries, only on ``BrokerTemporaryError``."""
        retrying = Retrying(
            stop=stop_after_attempt(self._retry_attempts),
            wait=wait_exponential(multiplier=self._retry_wait_s, min=self._retry_wait_s, max=8 * self._retry_wait_s),
            retry=retry_if_exception_type(BrokerTemporaryError),
            sleep=self._sleep,
            reraise=True,
            before_sleep=lambda state: log.warning(
                "ibkr_call_retried",
                call=what,
                attempt=state.attempt_number,
                error=str(state.outcome.exception()) if state.outcome else "",
            ),
        )
        for attempt in retrying:
            with attempt:
                return self._call(what, call)
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

    def _contract(self, symbol: str) -> tuple[Any, Any]:
        """The qualified SEHK stock and its contract details (cached per run)."""
        symbol = hkex.normalize_symbol(symbol)
        cached = self._contracts.get(symbol)
        if cached is not None:
            return cached
        stock = self._ibm.Stock(ib_symbol(symbol), "SEHK", "HKD")
        details = self._read(f"reqContractDetails ({symbol})", lambda: self._ib.reqContractDetails(stock))
        if not details:
            raise BrokerRequestRefused(
                f"IBKR knows no SEHK stock {symbol} (IB symbol {ib_symbol(symbol)}): check the symbol.",
                code=200,
            )
        found = (details[0].contract, details[0])
        self._contracts[symbol] = found
        return found

    def _known_contract(self, symbol: str) -> tuple[Any, Any] | None:
        try:
            return self._contract(symbol)
        except BrokerRequestRefused as exc:
            if exc.code == 200:
                return None
            raise

    @staticmethod
    def lot_size(details: Any) -> int:
        """The board lot from the contract details (IB reports it as the size increment for SEHK stocks)."""
        for value in (getattr(details, "sizeIncrement", None), getattr(details, "minSize", None)):
            number = _num(value)
            if number is not None and number == number.to_integral_value():
                return int(number)
        raise BrokerRequestRefused(
            f"IBKR's contract details for {details.contract.symbol} carry no board lot (sizeIncrement/minSize).",
            code="no_lot",
        )

    # ------------------------------------------------------------------------------------------ Broker: reads

    def _account_values(self) -> dict[str, Decimal]:
        self._read("reqAccountUpdates", lambda: self._ib.reqAccountUpdates(self.account_id))
        values: dict[str, Decimal] = {}
        for item in self._ib.accountValues(self.account_id):
            if item.currency == "HKD":
                try:
                    values[item.tag] = Decimal(item.value)
                except ArithmeticError:
                    continue
        return values

    def account(self) -> Account:
        values = self._account_values()
        missing = [t for t in ("NetLiquidation", "TotalCashValue") if t not in values]
        if missing:
            raise ConfigError(
                f"IBKR account {self.account_id} reports no HKD {', '.join(missing)}: the agent needs an account whose "
                "base currency is HKD."
            )
        equity, cash = values["NetLiquidation"], values["TotalCashValue"]
        return Account(
            account_id=self.account_id,
            is_paper=self.is_paper,
            cash=cash,
            equity=equity,
            market_value=values.get("GrossPositionValue", equity - cash),
            buying_power=values.get("AvailableFunds", values.get("BuyingPower", cash)),
            currency="HKD",
        )

    def positions(self) -> list[Position]:
        self._read("reqAccountUpdates", lambda: self._ib.reqAccountUpdates(self.account_id))
        positions = []
        for item in self._ib.portfolio(self.account_id):
            contract = item.contract
            if contract.secType != "STK" or contract.currency != "HKD" or not item.position:
                continue
            quantity = int(item.position)
            positions.append(
                Position(
                    symbol=our_symbol(contract.symbol),
                    quantity=quantity,
                    sellable_quantity=max(quantity, 0),  # no settlement lock on selling held shares at IB
                    avg_cost=Decimal(str(item.averageCost)),
                    last_price=Decimal(str(item.marketPrice)),
                    market_value=Decimal(str(item.marketValue)),
                    unrealized_pnl=Decimal(str(item.unrealizedPNL)),
                )
            )
        return positions

    def _ours(self, trade: Any) -> bool:
        contract, order = trade.contract, trade.order
        return (
            contract.secType == "STK"
            and contract.currency == "HKD"
            and not order.whatIf
            and order.account in ("", self.account_id)
        )

    def _order_of(self, trade: Any, by_order_id: dict[tuple[int, int], Any] | None = None) -> Order:
        o, st = trade.order, trade.orderStatus
        fills = [f for f in self._ib.fills() if o.permId and f.execution.permId == o.permId]
        filled = max(int(st.filled or 0), int(o.filledQuantity) if o.filledQuantity < 1e300 else 0)
        shares = sum(f.execution.shares for f in fills)
        avg = _num(st.avgFillPrice)
        if avg is None and shares:
            avg = Decimal(str(sum(f.execution.shares * f.execution.price for f in fills) / shares))
        filled = max(filled, int(shares))
        status = IB_ORDER_STATUS.get(st.status, OrderStatus.UNKNOWN)
        if status is OrderStatus.SUBMITTED and filled > 0:
            status = OrderStatus.PARTIALLY_FILLED
        parent: str | None = None
        if o.parentId:
            for other in self._ib.trades():
                if other.order.orderId == o.parentId and other.order.clientId == o.clientId and other.order.permId:
                    parent = str(other.order.permId)
        elif getattr(o, "parentPermId", 0) and o.parentPermId < 2**62:
            parent = str(o.parentPermId)
        errors = [entry for entry in trade.log if entry.errorCode and not _is_notice(entry.errorCode)]
        created = trade.log[0].time.astimezone(HKT) if trade.log else self._clock()
        updated = trade.log[-1].time.astimezone(HKT) if trade.log else created
        return Order(
            broker_order_id=str(o.permId),
            client_order_id=o.orderRef or None,
            symbol=our_symbol(trade.contract.symbol),
            side=Side.BUY if o.action == "BUY" else Side.SELL,
            quantity=int(o.totalQuantity),
            order_type=IB_ORDER_TYPE.get(o.orderType, OrderType.LIMIT),
            limit_price=_num(o.lmtPrice) if o.orderType in ("LMT", "STP LMT") else None,
            aux_price=_num(o.auxPrice),
            status=status,
            filled_quantity=filled,
            avg_fill_price=avg,
            created_at=created,
            updated_at=updated,
            message=(f"{errors[-1].message} (code {errors[-1].errorCode})" if errors else "")[:500],
            parent_order_id=parent,
            oca_group=o.ocaGroup or None,
        )

    def _open_trades(self) -> list[Any]:
        trades = self._read("reqOpenOrders", lambda: self._ib.reqOpenOrders())
        return [t for t in trades if self._ours(t) and t.orderStatus.status not in self._ibm.OrderStatus.DoneStates]

    def open_orders(self) -> list[Order]:
        return [order for order in (self._order_of(t) for t in self._open_trades()) if order.is_active]

    def _all_trades(self) -> list[Any]:
        """Open orders, completed orders and executions of this account, one Trade per permId."""
        self._read("reqOpenOrders", lambda: self._ib.reqOpenOrders())
        completed = self._read("reqCompletedOrders", lambda: self._ib.reqCompletedOrders(apiOnly=True))
        self._read("reqExecutions", lambda: self._ib.reqExecutions())
        by_perm: dict[int, Any] = {}
        for trade in [*completed, *self._ib.trades()]:  # the session's own trade objects win (they have logs)
            if self._ours(trade) and trade.order.permId:
                by_perm[trade.order.permId] = trade
        return list(by_perm.values())

    def find_order(self, client_order_id: str) -> Order | None:
        """The order whose ``orderRef`` is ``client_order_id``, among open and completed orders."""
        matches = [self._order_of(t) for t in self._all_trades() if t.order.orderRef == client_order_id]
        if not matches:
            return None
        return max(matches, key=lambda order: (order.is_active, order.updated_at))

    def _find_by_id(self, broker_order_id: str) -> Order | None:
        for trade in self._all_trades():
            if str(trade.order.permId) == broker_order_id:
                return self._order_of(trade)
        return None

    def _trade_by_perm(self, broker_order_id: str) -> Any | None:
        for trade in self._open_trades():
            if str(trade.order.permId) == broker_order_id:
                return trade
        return None

    # ------------------------------------------------------------------------------------------ Broker: orders

    def preview_order(self, request: OrderRequest) -> OrderPreview:
        """What the order would cost: IB's what-if commission when it answers, else the HKEX table and plan."""
        contract, _ = self._contract(request.symbol)
        price = request.limit_price
        if price is None or request.order_type in (OrderType.MARKET, OrderType.STOP):
            price = self.snapshots([request.symbol])[0].last_price
        gross = price * request.quantity
        commission_pct, min_commission = Decimal(str(self.settings.commission_pct)), self.settings.min_commission_hkd
        costs = hkex.trading_costs(gross, commission_pct, min_commission).total
        probe = self._ibm.LimitOrder(
            request.side.value.upper(), request.quantity, float(price), account=self.account_id
        )
        try:
            state = self._call("whatIfOrder", lambda: self._ib.whatIfOrder(contract, probe))
            commission = _num(getattr(state, "commission", None))
            if commission is not None:  # IB's commission; the statutory charges stay ours (IB's excludes some)
                statutory = hkex.trading_costs(gross, Decimal(0), Decimal(0)).total
                costs = (statutory + commission).quantize(Decimal("0.01"))
        except (BrokerTemporaryError, BrokerRequestRefused) as exc:
            log.info("ibkr_what_if_unavailable", error=str(exc))
        net = -(gross + costs) if request.side is Side.BUY else gross - costs
        return OrderPreview(
            symbol=request.symbol, side=request.side, quantity=request.quantity, price=price, gross_value=gross,
            costs=costs, net_cash_change=net,
        )  # fmt: skip

    def _check_order(self, request: OrderRequest) -> tuple[Any, int]:
        """Refuse, before anything is sent, what IB would refuse: lots, ticks, types. Returns (contract, lot)."""
        describe = f"Could not place {request.describe()}"
        try:
            symbol = hkex.normalize_symbol(request.symbol)
        except ValueError as exc:
            raise OrderRejected(f"{describe}: {exc} No order was sent.", code="bad_symbol") from exc
        if symbol != request.symbol:
            raise OrderRejected(
                f"{describe}: symbols must be in the canonical form {symbol}. No order was sent.", code="bad_symbol"
            )
        if request.order_type in (OrderType.STOP, OrderType.STOP_LIMIT) and request.aux_price is None:
            raise OrderRejected(f"{describe}: a stop order needs a trigger price. No order was sent.", code="no_aux")
        if request.order_type in (OrderType.LIMIT, OrderType.STOP_LIMIT) and (
            request.limit_price is None or request.limit_price <= 0
        ):
            raise OrderRejected(
                f"{describe}: a limit order needs a positive limit price. No order was sent.", code="no_price"
            )
        try:
            found = self._known_contract(symbol)
        except BrokerTemporaryError as exc:
            raise BrokerTemporaryError(
                f"{describe}: could not read {symbol}'s contract details first ({exc}). No order was sent.",
                code=exc.code,
            ) from exc
        except BrokerRequestRefused as exc:
            raise OrderRejected(f"{describe}: {exc} No order was sent.", code=exc.code) from exc
        if found is None:
            raise OrderRejected(f"{describe}: IBKR knows no SEHK stock {symbol}. No order was sent.", code=200)
        contract, details = found
        lot = self.lot_size(details)
        if not hkex.is_whole_lots(request.quantity, lot):
            raise OrderRejected(
                f"{describe}: quantity must be a multiple of the {lot}-share lot "
                f"(nearest: {hkex.floor_to_lots(request.quantity, lot)}). No order was sent.",
                code="odd_lot",
            )
        today = self._clock().astimezone(HKT).date()
        for label, price in (("limit price", request.limit_price), ("trigger price", request.aux_price)):
            if price is not None and request.order_type is not OrderType.MARKET:
                self._check_tick(describe, label, price, request.side, today)
        return contract, lot

    @staticmethod
    def _check_tick(describe: str, label: str, price: Decimal, side: Side, today: date) -> None:
        if hkex.is_on_tick(price, today):
            return
        try:
            nearest = str(hkex.round_to_tick(price, side, today))
        except ValueError:
            nearest = "none (outside the HKEX price range)"
        raise OrderRejected(
            f"{describe}: {label} {price} is not on the HKEX tick grid (a valid {side.value} price is {nearest}). "
            "No order was sent.",
            code="off_tick",
        )

    def _ib_order(self, request: OrderRequest, **extra: Any) -> Any:
        ibm, action = self._ibm, request.side.value.upper()
        common = {"orderRef": request.client_order_id, "account": self.account_id, "tif": "DAY", **extra}
        if request.oca_group:
            common.update(ocaGroup=request.oca_group, ocaType=OCA_REDUCE_WITH_BLOCK)
        if request.order_type is OrderType.MARKET:
            return ibm.MarketOrder(action, request.quantity, **common)
        if request.order_type is OrderType.STOP:
            return ibm.StopOrder(action, request.quantity, float(request.aux_price or 0), **common)
        if request.order_type is OrderType.STOP_LIMIT:
            return ibm.StopLimitOrder(
                action, request.quantity, float(request.limit_price or 0), float(request.aux_price or 0), **common
            )
        return ibm.LimitOrder(action, request.quantity, float(request.limit_price or 0), **common)

    def _send(self, contract: Any, orders: list[Any], request: OrderRequest) -> Order:
        """Send one order or a family (the last one transmits), wait (bounded) for IB's answer, map it."""
        describe = f"Could not place {request.describe()}"
        self._ensure_connected()  # reconnects first if needed: nothing has been sent yet
        log.info("order_sending", client_order_id=request.client_order_id, order=request.describe(), orders=len(orders))
        try:
            trades = [self._ib.placeOrder(contract, order) for order in orders]
        except ConnectionError as exc:
            return self._after_failed_placement(request, describe, exc)
        deadline = time.monotonic() + self.settings.request_timeout_s
        pending = {"PendingSubmit", "ApiPending"}
        while any(t.orderStatus.status in pending or not t.order.permId for t in trades if not t.isDone()):
            if time.monotonic() >= deadline or not self._ib.isConnected():
                return self._after_failed_placement(
                    request, describe, TimeoutError(f"no acknowledgement within {self.settings.request_timeout_s:g} s")
                )
            self._ib.sleep(0.02)
        parent = trades[0]
        order = self._order_of(parent)
        if order.status in (OrderStatus.CANCELLED, OrderStatus.REJECTED) and order.filled_quantity == 0:
            raise OrderRejected(
                f"{describe}: broker rejected it ({order.message or parent.orderStatus.status}). No order is working.",
                code=next((e.errorCode for e in reversed(parent.log) if e.errorCode), parent.orderStatus.status),
            )
        log.info(
            "order_submitted",
            client_order_id=request.client_order_id,
            broker_order_id=order.broker_order_id,
            status=order.status.value,
        )
        return order

    def _after_failed_placement(self, request: OrderRequest, describe: str, exc: Exception) -> Order:
        try:
            found = self.find_order(request.client_order_id)
        except AgentError as lookup_exc:
            raise OrderStateUnknown(
                f"{describe}: the request failed ({exc}) and the order could not be looked up by its orderRef "
                f"{request.client_order_id} ({lookup_exc}). It may or may not be at IBKR: reconcile (run --guard or "
                "check TWS) before any new entry."
            ) from exc
        if found is not None:
            log.warning("order_found_after_error", client_order_id=request.client_order_id, error=str(exc))
            return found
        raise OrderStateUnknown(
            f"{describe}: the request failed ({exc}) and no order with orderRef {request.client_order_id} is listed "
            "yet. It may still reach IBKR: reconcile (run --guard or check TWS) before any new entry."
        ) from exc

    def place_order(self, request: OrderRequest) -> Order:
        """Send one order (orderRef = client_order_id). Never retried."""
        contract, _ = self._check_order(request)
        return self._send(contract, [self._ib_order(request)], request)

    def place_stop_order(self, request: OrderRequest) -> Order:
        """A broker-side protective STOP / STOP_LIMIT sell (joining ``request.oca_group`` when given)."""
        if request.order_type not in (OrderType.STOP, OrderType.STOP_LIMIT):
            raise OrderRejected(
                f"Could not place {request.describe()} as a stop order: its type must be stop or stop_limit. "
                "No order was sent.",
                code="not_a_stop",
            )
        return self.place_order(request)

    def place_bracket_order(self, request: OrderRequest, *, stop_loss: Decimal, take_profit: Decimal) -> Order:
        """The entry as a native bracket: parent, take-profit and stop children in one OCA group, the stop sent
        last (it transmits the family). Returns the parent; the children carry ``<client_order_id>-tp`` / ``-sl``.
        """
        contract, _ = self._check_order(request)
        describe = f"Could not place {request.describe()} with its bracket"
        if request.side is not Side.BUY:
            raise OrderRejected(f"{describe}: brackets protect long entries only. No order was sent.", code="side")
        today = self._clock().astimezone(HKT).date()
        self._check_tick(describe, "stop", stop_loss, Side.SELL, today)
        self._check_tick(describe, "take profit", take_profit, Side.SELL, today)
        group = f"{request.client_order_id}-oca"
        parent = self._ib_order(request, transmit=False)
        parent.orderId = self._ib.client.getReqId()
        child = {
            "parentId": parent.orderId, "ocaGroup": group, "ocaType": OCA_REDUCE_WITH_BLOCK, "account": self.account_id,
            "tif": "DAY",
        }  # fmt: skip
        target = self._ibm.LimitOrder(
            "SELL", request.quantity, float(take_profit), orderRef=f"{request.client_order_id}-tp", transmit=False,
            **child,
        )  # fmt: skip
        stop = self._ibm.StopOrder(
            "SELL", request.quantity, float(stop_loss), orderRef=f"{request.client_order_id}-sl", transmit=True,
            **child,
        )  # fmt: skip
        return self._send(contract, [parent, target, stop], request)

    def cancel_order(self, broker_order_id: str) -> Order:
        """Cancel one order (by permId) and return it as IB now reports it (retried on temporary failures)."""
        trade = self._trade_by_perm(broker_order_id)
        if trade is None:
            current = self._find_by_id(broker_order_id)
            if current is not None and current.is_done:
                return current  # already filled or cancelled: nothing left to cancel
            raise OrderRejected(
                f"Could not cancel order {broker_order_id}: IBKR lists no such working order.", code="unknown_order"
            )
        self._read(f"cancelOrder ({broker_order_id})", lambda: self._ib.cancelOrder(trade.order))
        deadline = time.monotonic() + self.settings.request_timeout_s
        while not trade.isDone() and time.monotonic() < deadline and self._ib.isConnected():
            self._ib.sleep(0.02)
        order = self._order_of(trade)
        log.info("order_cancelled", broker_order_id=broker_order_id, status=order.status.value)
        return order

    # ------------------------------------------------------------------------------------------ MarketData

    def snapshots(self, symbols: list[str]) -> list[Quote]:
        """Snapshot quotes (one request per symbol, answered together). Unknown symbols are omitted."""
        wanted: list[tuple[str, Any, Any]] = []
        for symbol in dict.fromkeys(symbols):
            found = self._known_contract(symbol)
            if found is not None:
                wanted.append((hkex.normalize_symbol(symbol), *found))
        if not wanted:
            return []
        tickers = self._read(
            f"reqTickers ({len(wanted)} symbols)", lambda: self._ib.reqTickers(*(c for _, c, _ in wanted))
        )
        by_con = {t.contract.conId: t for t in tickers}
        averages = self._average_daily_volumes([(symbol, contract) for symbol, contract, _ in wanted])
        quotes = []
        for symbol, contract, details in wanted:
            ticker = by_con.get(contract.conId)
            if ticker is None:
                continue
            last = _num(ticker.last) or _num(ticker.close)
            if last is None:
                log.warning("ibkr_snapshot_skipped", symbol=symbol, reason="no last or close price")
                continue
            volume = ticker.volume if ticker.volume == ticker.volume else 0  # NaN when absent
            quotes.append(
                Quote(
                    symbol=symbol,
                    name=details.longName or "",
                    last_price=last,
                    open_price=_num(ticker.open),
                    high_price=_num(ticker.high),
                    low_price=_num(ticker.low),
                    prev_close=_num(ticker.close),
                    bid_price=_num(ticker.bid),
                    ask_price=_num(ticker.ask),
                    volume=int(volume or 0),
                    volume_ratio=volume_pace_ratio(volume or 0, averages.get(symbol, 0.0), self._clock()),
                    lot_size=self.lot_size(details),
                    is_equity=contract.secType == "STK",
                    delayed=ticker.marketDataType in DELAYED_DATA_TYPES,
                    updated_at=self._clock(),
                )
            )
        return quotes

    def _average_daily_volumes(self, wanted: list[tuple[str, Any]]) -> dict[str, float]:
        """IB's average daily volume per symbol (generic tick 165, tick 21), read once a day per symbol.

        Snapshots cannot carry generic ticks, so this opens short streaming requests and cancels them as soon
        as every average arrived (or after a few seconds: a symbol without one simply has no volume ratio).
        """
        today = self._clock().astimezone(HKT).date()
        missing = [(s, c) for s, c in wanted if (s, today) not in self._average_volumes]
        for start in range(0, len(missing), STREAMING_BATCH):  # IB allows about 100 market data lines at once
            self._read_average_volumes(missing[start : start + STREAMING_BATCH], today)
        return {s: self._average_volumes[(s, today)] for s, _ in wanted if (s, today) in self._average_volumes}

    def _read_average_volumes(self, missing: list[tuple[str, Any]], today: date) -> None:
        if missing:
            self._ensure_connected()
            tickers = [(s, self._ib.reqMktData(c, AVERAGE_VOLUME_TICKS, False, False)) for s, c in missing]
            deadline = time.monotonic() + min(3.0, self.settings.request_timeout_s)
            try:
                while any(t.avVolume != t.avVolume for _, t in tickers) and time.monotonic() < deadline:
                    self._ib.sleep(0.02)  # NaN until the tick arrives
            finally:
                for _, ticker in tickers:
                    self._ib.cancelMktData(ticker.contract)
            for symbol, ticker in tickers:
                if ticker.avVolume == ticker.avVolume and ticker.avVolume > 0:
                    self._average_volumes[(symbol, today)] = float(ticker.avVolume)
                else:
                    log.info("ibkr_average_volume_missing", symbol=symbol)

    def market_data_note(self) -> str | None:
        """For the cycle's context: whether IB sends real-time or delayed quotes (one snapshot to find out)."""
        probe = self.settings.universe[0] if self.settings.universe else "HK.00700"
        try:
            quotes = self.snapshots([probe])
        except AgentError as exc:
            return f"could not tell whether IBKR quotes are real-time ({exc})"
        if not quotes or not quotes[0].delayed:
            return None
        allowed = "allowed (broker.ibkr.allow_delayed_data)" if self.settings.allow_delayed_data else "refused"
        return (
            "IBKR is sending DELAYED quotes (about 15 minutes old; no real-time subscription). Quotes say "
            f"delayed: true; new entries on them are {allowed}."
        )

    def klines(self, symbol: str, timeframe: str, count: int) -> list[Bar]:
        """The last ``count`` bars up to now, oldest first (IB labels bars by their start, as ``Bar`` does)."""
        if timeframe not in BAR_SIZES:
            raise ValueError(f"Timeframe {timeframe!r} is not one of {', '.join(BAR_SIZES)}.")
        if count <= 0:
            return []
        contract, _ = self._contract(symbol)
        bar_size, per_day = BAR_SIZES[timeframe]
        days = math.ceil(count / per_day * 7 / 5) + (10 if timeframe == "1d" else 2)
        duration = f"{days} D" if days <= 365 else f"{math.ceil(days / 365)} Y"
        bars = self._read(
            f"reqHistoricalData ({symbol} {timeframe})",
            lambda: self._ib.reqHistoricalData(
                contract, endDateTime="", durationStr=duration, barSizeSetting=bar_size, whatToShow="TRADES",
                useRTH=True, formatDate=2,
            ),
        )  # fmt: skip
        out = []
        for bar in bars:
            when = bar.date
            stamp = (
                when.astimezone(HKT)
                if isinstance(when, datetime)
                else datetime(when.year, when.month, when.day, tzinfo=HKT)
            )
            out.append(
                Bar(
                    time=stamp,
                    open=Decimal(str(bar.open)),
                    high=Decimal(str(bar.high)),
                    low=Decimal(str(bar.low)),
                    close=Decimal(str(bar.close)),
                    volume=int(bar.volume),
                )
            )
        return out[-count:]

    def index_constituents(self, index: str) -> list[str]:
        """IB's API lists no index members: every index is ``broker.ibkr.universe`` (refused when it is empty)."""
        name = index.strip().upper()
        if name not in ("HSI", "HSCEI", "HSTECH", "ALL"):
            raise ValueError(f"Index {index!r} is not one of HSI, HSCEI, HSTECH, ALL.")
        if not self.settings.universe:
            raise BrokerRequestRefused(
                f"IBKR's API has no list of {name} constituents. Put the symbols to scan in broker.ibkr.universe "
                "(config/settings.yaml).",
                code="no_constituents",
            )
        return list(self.settings.universe)

    def news(self, symbol: str, since: datetime) -> list[NewsItem]:
        """No news: IB's news feeds need separate subscriptions this agent does not use."""
        return []

    def market_state(self) -> MarketState | None:
        """No opinion: IB's API has no market phase call; the XHKG calendar decides."""
        return None

    def accounts(self) -> list[dict[str, str]]:
        """The accounts the gateway manages (for the connection test)."""
        return [
            {
                "account": account,
                "kind": "paper" if is_paper_account(account) else "LIVE",
                "in_use": "yes" if account == self.account_id else "",
            }
            for account in self._ib.managedAccounts()
        ]

    def gateway_state(self) -> dict[str, str]:
        """The gateway's API version and clock (for the connection test)."""
        now = self._read("reqCurrentTime", lambda: self._ib.reqCurrentTime())
        return {"server_version": str(self._ib.client.serverVersion()), "gateway_time": now.isoformat()}
