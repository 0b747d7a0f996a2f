"""``FutuClient``: the ``Broker`` and ``MarketData`` protocols over futu-api and a Futu/Moomoo OpenD gateway.

The only module that imports ``futu`` (lazily, so ``agent.py --help`` stays fast). Futu's field names stay in
this file: every call site turns futu's ``(ret_code, data)`` into our models or into our errors, once:

- ``BrokerTemporaryError``: timeouts, disconnects, rate limits, "busy". Reads and cancels are retried (tenacity,
  a few attempts, short waits); after a rate-limit reply the limiter waits out the window.
- ``BrokerRequestRefused``: OpenD answered no for a reason that will not change (unknown security, no right or
  quota, unsupported request, invalid parameter, any other refusal): raised after one request, never retried.
- ``OrderRejected``: the broker (or our pre-flight check of lot size and tick) refused an order.
- ``BrokerUnavailable``: OpenD cannot be reached; raised within ``connect_timeout_s``, never an endless retry.
- ``OrderStateUnknown``: ``place_order`` failed in a way that may have reached the broker, and the order could
  not be found by its ``client_order_id`` (carried in Futu's ``remark``).

``place_order`` is never retried. Every trade call passes ``trd_env`` and the account id resolved once at
connect time (futu defaults to REAL and to "the first account" otherwise).

Futu quirks handled here (futu-api 10.x):
- Context constructors retry forever when OpenD is down or silent: a TCP reachability check comes first; the
  quote context connects asynchronously and is polled, the trade context's constructor (which has no async
  option) runs in a helper thread that we stop waiting for after ``connect_timeout_s``.
- A dropped connection is not left to futu's 6-second reconnect timer: the next call closes the context and
  opens a new one (reachability check first, so a vanished OpenD becomes ``BrokerUnavailable``).
- futu 10.x re-reads the account list before every trade call even when given ``acc_id``; we still pass it so
  the call can never land on another account, and answer futu's check for that account from the list read at
  connect time (``_pin_account``), which saves one request per trade call.
- Importing ``futu`` replaces the SIGINT handler with one that calls ``os._exit(0)``; we restore ours.
- futu logs to stdout; its console log is switched off (our structlog lines are the record).
- A sync query waits forever for a reconnecting context unless ``set_sync_query_connect_timeout`` is set; its
  reply timeout is the private ``_query_timeout`` (12 s by default), set to ``request_timeout_s``.
- Futu labels intraday K-lines by the bar's end time (``10:31`` is the 10:30-10:31 bar); ``Bar.time`` is the
  start, so intraday bars are shifted back by one interval.
"""

from __future__ import annotations

import math
import re
import signal
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Mapping
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

import structlog
from pydantic import SecretStr
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from brokers import gateway, hkex
from brokers.base import (
    Account,
    Bar,
    Clock,
    MarketPhase,
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
from brokers.futu_failures import HINTS, TEMPORARY, UNCERTAIN, Failure, classify_failure
from config.errors import (
    AgentError,
    BrokerRequestRefused,
    BrokerTemporaryError,
    BrokerUnavailable,
    ConfigError,
    OrderRejected,
    OrderStateUnknown,
)
from config.settings import FutuSettings

HKT = ZoneInfo("Asia/Hong_Kong")
log = structlog.get_logger()

MAX_SNAPSHOT_CODES = 400  # per Qot_GetSecuritySnapshot request
INDEX_PLATES: dict[str, str] = {"HSI": "HK.800000", "HSCEI": "HK.800100", "HSTECH": "HK.800700"}
TIMEFRAMES: dict[str, tuple[str, int]] = {  # ours -> (futu KLType name, minutes per bar; 0 for daily)
    "1m": ("K_1M", 1),
    "5m": ("K_5M", 5),
    "15m": ("K_15M", 15),
    "1h": ("K_60M", 60),
    "1d": ("K_DAY", 0),
}
_BARS_PER_DAY = {"1m": 330, "5m": 66, "15m": 22, "1h": 6, "1d": 1}

# ---------------------------------------------------------------------------------------------------------------
# Rate limiting
# ---------------------------------------------------------------------------------------------------------------


class Limit(NamedTuple):
    """At most ``max_requests`` per ``window_s`` (a sliding window, as OpenD counts), ``min_interval_s`` apart."""

    max_requests: int
    window_s: float = 30.0
    min_interval_s: float = 0.0


# Futu's documented limits per 30 s ("the first request and the (n+1)th must be more than 30 s apart").
FUTU_LIMITS: dict[str, Limit] = {
    "snapshot": Limit(60),
    "history_kline": Limit(60),
    "place_order": Limit(15, min_interval_s=0.02),  # per account
    "modify_order": Limit(20, min_interval_s=0.04),
    "funds": Limit(10),
    "positions": Limit(10),
    "orders": Limit(10),
    "history_orders": Limit(10),
    "plate_stock": Limit(10),
    "market_state": Limit(10),
    "news": Limit(10),  # undocumented; kept conservative
}


class RateLimiter:
    """Paces calls per endpoint so OpenD never has to refuse them. Clock and sleep are injectable for tests."""

    def __init__(
        self,
        limits: Mapping[str, Limit] = FUTU_LIMITS,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        margin_s: float = 0.1,
    ) -> None:
        self._limits = dict(limits)
        self._monotonic = monotonic
        self._sleep = sleep
        self._margin_s = margin_s
        self._history: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def _delay(self, endpoint: str, limit: Limit, now: float) -> float:
        history = self._history[endpoint]
        window = limit.window_s + self._margin_s
        while history and now - history[0] >= window:
            history.popleft()
        delay = 0.0
        if len(history) >= limit.max_requests:
            delay = history[-limit.max_requests] + window - now
        if history and limit.min_interval_s:
            delay = max(delay, history[-1] + limit.min_interval_s - now)
        return delay

    def acquire(self, endpoint: str) -> float:
        """Wait until ``endpoint`` may be called, record the call, and return the seconds waited."""
        limit = self._limits.get(endpoint)
        if limit is None:
            return 0.0
        waited = 0.0
        while True:
            with self._lock:
                now = self._monotonic()
                delay = self._delay(endpoint, limit, now)
                if delay <= 0:
                    self._history[endpoint].append(now)
                    return waited
            self._sleep(delay)
            waited += delay

    def note(self, endpoint: str) -> None:
        """Record a call made on our behalf without waiting (futu's own follow-up queries)."""
        if endpoint in self._limits:
            with self._lock:
                self._history[endpoint].append(self._monotonic())

    def saturate(self, endpoint: str) -> None:
        """OpenD said "too frequent": treat the window as full from now, so the next call waits it out."""
        limit = self._limits.get(endpoint)
        if limit is None:
            return
        with self._lock:
            now = self._monotonic()
            self._history[endpoint] = deque([now] * limit.max_requests)


# ---------------------------------------------------------------------------------------------------------------
# Futu values -> ours
# ---------------------------------------------------------------------------------------------------------------

FUTU_ORDER_STATUS: dict[str, OrderStatus] = {
    "UNSUBMITTED": OrderStatus.SUBMITTED,
    "WAITING_SUBMIT": OrderStatus.SUBMITTED,
    "SUBMITTING": OrderStatus.SUBMITTED,
    "SUBMITTED": OrderStatus.SUBMITTED,
    "FILLED_PART": OrderStatus.PARTIALLY_FILLED,
    "CANCELLING_PART": OrderStatus.PARTIALLY_FILLED,  # still working until the cancel lands
    "CANCELLING_ALL": OrderStatus.SUBMITTED,
    "FILLED_ALL": OrderStatus.FILLED,
    "CANCELLED_PART": OrderStatus.CANCELLED,
    "CANCELLED_ALL": OrderStatus.CANCELLED,
    "DELETED": OrderStatus.CANCELLED,
    "DISABLED": OrderStatus.CANCELLED,
    "SUBMIT_FAILED": OrderStatus.REJECTED,
    "FAILED": OrderStatus.REJECTED,
    "TIMEOUT": OrderStatus.UNKNOWN,  # Futu: "processing timed out, result unknown"
    "FILL_CANCELLED": OrderStatus.UNKNOWN,  # a fill was reversed: needs a human look
}
FUTU_ORDER_TYPE: dict[str, OrderType] = {
    "NORMAL": OrderType.LIMIT,  # HK enhanced limit order
    "ABSOLUTE_LIMIT": OrderType.LIMIT,
    "SPECIAL_LIMIT": OrderType.LIMIT,
    "SPECIAL_LIMIT_ALL": OrderType.LIMIT,
    "AUCTION_LIMIT": OrderType.LIMIT,
    "MARKET": OrderType.MARKET,
    "AUCTION": OrderType.MARKET,
    "STOP": OrderType.STOP,
    "STOP_LIMIT": OrderType.STOP_LIMIT,
}
OUR_ORDER_TYPE_TO_FUTU: dict[OrderType, str] = {
    OrderType.LIMIT: "NORMAL",
    OrderType.MARKET: "MARKET",
    OrderType.STOP: "STOP",
    OrderType.STOP_LIMIT: "STOP_LIMIT",
}
FUTU_MARKET_PHASE: dict[str, MarketPhase] = {
    "NONE": MarketPhase.CLOSED,
    "CLOSED": MarketPhase.CLOSED,
    "AUCTION": MarketPhase.PRE_OPEN,
    "WAITING_OPEN": MarketPhase.PRE_OPEN,
    "MORNING": MarketPhase.MORNING,
    "REST": MarketPhase.LUNCH,
    "AFTERNOON": MarketPhase.AFTERNOON,
    "HK_CAS": MarketPhase.CLOSING_AUCTION,
}


def _missing(value: Any) -> bool:
    if value is None or value == "N/A" or value == "":
        return True
    return isinstance(value, float) and math.isnan(value)


def _dec(value: Any) -> Decimal | None:
    """A futu number (float, possibly 'N/A' or NaN) as Decimal, via ``str`` so 312.4 stays 312.4."""
    if _missing(value):
        return None
    return Decimal(str(value))


def _dec0(value: Any) -> Decimal:
    result = _dec(value)
    return result if result is not None else Decimal(0)


def _positive(value: Any) -> Decimal | None:
    """Prices Futu reports as 0 when it has none."""
    result = _dec(value)
    return result if result is not None and result > 0 else None


def _int(value: Any) -> int:
    return 0 if _missing(value) else int(float(value))


def _text(value: Any) -> str:
    return "" if _missing(value) else str(value)


def parse_futu_time(text: str) -> datetime:
    """Futu's HK times are naive Hong Kong time strings: ``2026-11-20 10:15:00`` (maybe with ``.123``)."""
    text = text.strip()
    for fmt in ("%Y-%m-%d %H:%M:%S.%f", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d"):
        try:
            return datetime.strptime(text, fmt).replace(tzinfo=HKT)
        except ValueError:
            continue
    raise ValueError(f"Futu time {text!r} is not in the form YYYY-MM-DD HH:MM:SS")


def _parse_news_time(value: Any) -> datetime | None:
    """``publish_time`` is documented as a timestamp string; accept epoch seconds/ms and date-time text."""
    text = _text(value).strip()
    if not text:
        return None
    if re.fullmatch(r"\d+(\.\d+)?", text):
        stamp = float(text)
        if stamp > 1e11:  # milliseconds
            stamp /= 1000
        return datetime.fromtimestamp(stamp, HKT)
    try:
        return parse_futu_time(text)
    except ValueError:
        return None


def _bars_from_frame(frame: Any, minutes: int) -> list[Bar]:
    """Futu K-line rows as bars stamped at their START (Futu labels intraday bars by their end)."""
    step = timedelta(minutes=minutes)
    bars = []
    for row in _rows(frame):
        labelled = parse_futu_time(_text(row.get("time_key")))
        bars.append(
            Bar(
                time=labelled - step if minutes else labelled,
                open=_dec0(row.get("open")),
                high=_dec0(row.get("high")),
                low=_dec0(row.get("low")),
                close=_dec0(row.get("close")),
                volume=_int(row.get("volume")),
            )
        )
    return bars


def _rows(data: Any) -> list[dict[str, Any]]:
    """futu's pandas DataFrame as plain records (empty when futu returned no frame)."""
    to_dict = getattr(data, "to_dict", None)
    return to_dict("records") if to_dict is not None else []


def _loggable(data: Any) -> Any:
    """The reply for the debug log: every row, without the dozens of columns futu fills with N/A or NaN."""
    if hasattr(data, "to_dict"):
        return [{k: v for k, v in row.items() if not _missing(v)} for row in data.to_dict("records")]
    if isinstance(data, tuple):
        return [_loggable(item) for item in data]
    return data if isinstance(data, (str, int, float, bool, type(None), list, dict)) else repr(data)


_OPEND_HINT = (
    "Start it with `docker compose -f docker-compose.opend.yml up -d`, then run `python scripts/test_connection.py`."
)


def check_reachable(host: str, port: int, timeout_s: float) -> None:
    """Raise ``BrokerUnavailable`` unless OpenD accepts TCP connections at ``host:port`` within ``timeout_s``."""
    gateway.check_reachable("OpenD", host, port, timeout_s, _OPEND_HINT)


def import_futu() -> Any:
    """Import futu without letting it take over Ctrl-C (it installs a handler that calls ``os._exit(0)``)."""
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if on_main_thread else None
    import futu

    if on_main_thread and previous is not None:
        signal.signal(signal.SIGINT, previous)
    futu.SysConfig.enable_console_log(False)
    futu.SysConfig.set_all_thread_daemon(True)
    futu.SysConfig.enable_proto_encrypt(False)
    return futu


# ---------------------------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------------------------


class FutuClient:
    """Trading and market data through OpenD. Connects in the constructor (bounded by ``connect_timeout_s``).

    ``trd_env`` is SIMULATE unless ``settings.trd_env`` is REAL *and* ``live_confirmed`` is True. The trade
    password is used only for REAL (``unlock_trade``); pass ``None`` in dry runs so it is never loaded.
    """

    def __init__(
        self,
        settings: FutuSettings,
        *,
        trade_password: SecretStr | None = None,
        live_confirmed: bool = False,
        commission_pct: Decimal | float = Decimal("0.0003"),
        min_commission_hkd: Decimal = Decimal(3),
        clock: Clock | None = None,
        limiter: RateLimiter | None = None,
        sleep: Callable[[float], None] = time.sleep,
        retry_attempts: int = 3,
        retry_wait_s: float = 0.5,
        quote_only: bool = False,
    ) -> None:
        if settings.trd_env == "REAL" and not live_confirmed:
            raise ConfigError(
                "broker.futu.trd_env is REAL but live trading was not confirmed. Pass --live on the command line "
                "to trade real money, or set broker.futu.trd_env: SIMULATE for the paper account."
            )
        self.settings = settings
        self.trd_env: str = settings.trd_env
        self.is_paper = self.trd_env == "SIMULATE"
        self._password = trade_password if not self.is_paper else None
        self._commission_pct = commission_pct
        self._min_commission = min_commission_hkd
        self._clock: Clock = clock or (lambda: datetime.now(HKT))
        self._sleep = sleep
        self._limiter = limiter or RateLimiter(sleep=sleep)
        self._retry_attempts = max(1, retry_attempts)
        self._retry_wait_s = retry_wait_s
        self._lock = threading.RLock()
        self._closed = False
        self._quote_ctx: Any = None
        self._trade_ctx: Any = None
        self.account_id: int | None = None
        self._account_auth: list[str] = []  # the account's market list, as futu's own check would find it

        check_reachable(settings.host, settings.port, settings.connect_timeout_s)
        self._futu = import_futu()
        try:
            self._quote_ctx = self._open_quote_context()
            # quote_only (the history fetch): market data only, no trade context is ever opened.
            self._trade_ctx = None if quote_only else self._open_trade_context()
        except BaseException:
            self.close()
            raise
        log.info("futu_connected", host=settings.host, port=settings.port, trd_env=self.trd_env, acc_id=self.account_id)

    # ----------------------------------------------------------------------------------------------- connection

    def __enter__(self) -> FutuClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close both OpenD connections. Safe to call twice."""
        with self._lock:
            self._closed = True
            for ctx in (self._quote_ctx, self._trade_ctx):
                if ctx is not None:
                    try:
                        ctx.close()
                    except Exception as exc:  # closing must never hide the error that led here
                        log.warning("futu_close_failed", error=str(exc))
            self._quote_ctx = None
            self._trade_ctx = None

    def _open_context(self, factory: Callable[[], Any], what: str) -> Any:
        """Run a futu context constructor (the trade context has no async option), but stop waiting after
        ``connect_timeout_s``.

        The constructor retries forever in its own loop when OpenD accepts TCP but never completes InitConnect;
        it then keeps trying in a daemon thread, and closes the context itself if it ever succeeds.
        """
        timeout = self.settings.connect_timeout_s
        host, port = self.settings.host, self.settings.port
        box: dict[str, Any] = {}
        done = threading.Event()
        guard = threading.Lock()
        abandoned = False

        def run() -> None:
            try:
                ctx = factory()
            except BaseException as exc:
                box["error"] = exc
                done.set()
                return
            with guard:
                if abandoned:
                    ctx.close()
                    return
                box["ctx"] = ctx
                done.set()

        threading.Thread(target=run, name=f"futu-connect-{what}", daemon=True).start()
        if not done.wait(timeout):
            with guard:
                if not done.is_set():
                    abandoned = True
            if abandoned:
                raise BrokerUnavailable(
                    f"OpenD at {host}:{port} accepted the connection but did not complete the {what} handshake "
                    f"within {timeout:g} s (is it logged in?). {_OPEND_HINT} No order was sent."
                )
        if "error" in box:
            raise BrokerUnavailable(
                f"Could not open the futu {what} context at {host}:{port}: {box['error']}."
            ) from box["error"]
        return self._configure(box["ctx"])

    def _open_quote_context(self) -> Any:
        """The quote context connects asynchronously, so a silent OpenD is abandoned cleanly by ``close()``."""
        futu = self._futu
        host, port, timeout = self.settings.host, self.settings.port, self.settings.connect_timeout_s
        ctx = futu.OpenQuoteContext(host=host, port=port, is_async_connect=True)
        deadline = time.monotonic() + timeout
        pause = threading.Event()
        while ctx.status != futu.ContextStatus.READY:
            if time.monotonic() >= deadline:
                ctx.close()
                raise BrokerUnavailable(
                    f"OpenD at {host}:{port} accepted the connection but did not complete the quote handshake "
                    f"within {timeout:g} s (is it logged in?). {_OPEND_HINT} No order was sent."
                )
            pause.wait(0.01)  # real time on purpose: the injected sleep may be a test clock
        return self._configure(ctx)

    def _configure(self, ctx: Any) -> Any:
        ctx.set_sync_query_connect_timeout(self.settings.request_timeout_s)
        if hasattr(ctx, "_query_timeout"):  # futu's reply timeout (12 s by default); no public setter in 10.x
            ctx._query_timeout = self.settings.request_timeout_s
        return ctx

    def _open_trade_context(self) -> Any:
        futu = self._futu
        host, port, firm = self.settings.host, self.settings.port, self.settings.security_firm
        if not futu.SecurityFirm.if_has_key(firm):
            raise ConfigError(
                f"broker.futu.security_firm is {firm!r}, which futu does not know. "
                f"Use one of {futu.SecurityFirm.get_all_keys()}."
            )
        ctx = self._open_context(
            lambda: futu.OpenSecTradeContext(
                filter_trdmarket=futu.TrdMarket.HK, host=host, port=port, security_firm=firm
            ),
            "trade",
        )
        try:
            if self.account_id is None:
                self.account_id = self._resolve_account(ctx)
            self._pin_account(ctx)
            if not self.is_paper and self._password is not None:
                self._unlock(ctx)
            elif not self.is_paper:
                log.warning("futu_trade_locked", reason="no trade password given: REAL orders will be refused")
        except BaseException:
            ctx.close()
            raise
        return ctx

    def _resolve_account(self, ctx: Any) -> int:
        """The first active HK-authorised account of our trd_env, looked up once and passed on every call."""
        data = self._attempt(ctx, "acc_list", "get the account list", ctx.get_acc_list)
        rows = _rows(data)
        for row in rows:
            auth = row.get("trdmarket_auth") or []
            if row.get("trd_env") == self.trd_env and "HK" in auth and row.get("acc_status") != "DISABLED":
                self._account_auth = list(auth)
                return int(row["acc_id"])
        seen = ", ".join(f"{row.get('acc_id')} ({row.get('trd_env')}, {row.get('trdmarket_auth')})" for row in rows)
        kind = "paper (SIMULATE)" if self.is_paper else "REAL"
        raise ConfigError(
            f"OpenD lists no active {kind} account with HK trading (accounts: {seen or 'none'}). Log OpenD in with "
            f"an account that can trade Hong Kong stocks, or check broker.futu.security_firm "
            f"({self.settings.security_firm})."
        )

    def _pin_account(self, ctx: Any) -> None:
        """Answer futu's per-call account check from the account resolved at connect time.

        futu 10.x calls ``get_acc_list`` (one more OpenD request, limited to 10 per 30 s) before every trade call,
        even when given ``acc_id``, only to look up the account's market list again. For our own
        ``(trd_env, acc_id)`` that answer cannot change within a run; any other pair still goes to futu's check.
        """
        original = getattr(ctx, "_check_acc_id_and_acc_index", None)
        if original is None or self.account_id is None or not self._account_auth:
            return  # another futu version: keep its behaviour (one extra request per trade call)
        futu = self._futu
        env = futu.TrdEnv.REAL if self.trd_env == "REAL" else futu.TrdEnv.SIMULATE
        acc_id, auth = self.account_id, list(self._account_auth)

        def check(trd_env: Any, requested: Any, acc_index: Any) -> tuple[Any, str, Any, list[str]]:
            if trd_env == env and requested == acc_id:
                return futu.RET_OK, "", acc_id, auth
            return original(trd_env, requested, acc_index)

        ctx._check_acc_id_and_acc_index = check

    def _unlock(self, ctx: Any) -> None:
        assert self._password is not None
        password = self._password.get_secret_value()
        ret, data = ctx.unlock_trade(password=password)
        log.debug("futu_response", call="unlock_trade", ret_code=ret)  # never the password
        if ret == self._futu.RET_OK:
            return
        text = str(data)
        if classify_failure(text) in TEMPORARY:
            raise BrokerTemporaryError(f"Could not unlock REAL trading: {text}. Try again shortly.", code="unlock")
        raise ConfigError(f"OpenD refused to unlock REAL trading: {text}. Check FUTU_TRADE_PWD.")

    def _context(self, kind: str) -> Any:
        """The quote or trade context, reopened first if its connection dropped."""
        with self._lock:
            if self._closed:
                raise AgentError("FutuClient is closed; create a new one to talk to OpenD again.")
            ctx = self._quote_ctx if kind == "quote" else self._trade_ctx
            if ctx is not None and ctx.status == self._futu.ContextStatus.READY:
                return ctx
            log.warning("futu_reconnecting", context=kind, status=getattr(ctx, "status", None))
            if ctx is not None:
                ctx.close()
            check_reachable(self.settings.host, self.settings.port, self.settings.connect_timeout_s)
            if kind == "quote":
                self._quote_ctx = ctx = self._open_quote_context()
            else:
                self._trade_ctx = ctx = self._open_trade_context()
            return ctx

    # ------------------------------------------------------------------------------------------ calling futu

    def _attempt(self, ctx: Any, endpoint: str, what: str, call: Callable[[], tuple[Any, ...]]) -> Any:
        """One futu call: pace it, run it, log the reply, return ``data``.

        Raises ``BrokerTemporaryError`` for what can get better (retried by ``_read``) and ``BrokerRequestRefused``
        for an answer that will not change (never retried).
        """
        self._limiter.acquire(endpoint)
        try:
            result = call()
        except Exception as exc:  # futu raises for some transport states instead of returning an error
            raise BrokerTemporaryError(f"Futu {what} failed: {type(exc).__name__}: {exc}.", code="exception") from exc
        ret, data = result[0], result[1]
        log.debug("futu_response", call=what, endpoint=endpoint, ret_code=ret, data=_loggable(data))
        if ret == self._futu.RET_OK:
            return result[1] if len(result) == 2 else result[1:]
        text = str(data)
        kind = classify_failure(text)
        if kind is Failure.RATE_LIMITED:
            self._limiter.saturate(endpoint)
        hint = HINTS[kind].format(timeout_s=self.settings.request_timeout_s)
        if kind in TEMPORARY:
            raise BrokerTemporaryError(f"Futu {what} failed: {text} ({hint}).", code=kind.value)
        log.warning("futu_request_refused", call=what, reason=kind.value, error=text)
        raise BrokerRequestRefused(
            f"Futu {what} was refused: {text} ({hint}). Not retried: asking again will get the same answer.",
            code=kind.value,
        )

    def _read(self, kind: str, endpoint: str, what: str, call: Callable[[Any], tuple[Any, ...]]) -> Any:
        """A retried read (or cancel): up to ``retry_attempts`` tries, only on ``BrokerTemporaryError``."""
        retrying = Retrying(
            stop=stop_after_attempt(self._retry_attempts),
            wait=wait_exponential(multiplier=self._retry_wait_s, min=self._retry_wait_s, max=8 * self._retry_wait_s),
            retry=retry_if_exception_type(BrokerTemporaryError),
            sleep=self._sleep,
            reraise=True,
            before_sleep=lambda state: log.warning(
                "futu_call_retried",
                call=what,
                attempt=state.attempt_number,
                error=str(state.outcome.exception()) if state.outcome else "",
            ),
        )
        for attempt in retrying:
            with attempt:
                ctx = self._context(kind)
                return self._attempt(ctx, endpoint, what, lambda ctx=ctx: call(ctx))
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

    def _trade_kwargs(self) -> dict[str, Any]:
        env = self._futu.TrdEnv.REAL if self.trd_env == "REAL" else self._futu.TrdEnv.SIMULATE
        return {"trd_env": env, "acc_id": self.account_id}

    # ------------------------------------------------------------------------------------------ Broker: reads

    def account(self) -> Account:
        data = self._read(
            "trade",
            "funds",
            "accinfo_query (funds)",
            lambda ctx: ctx.accinfo_query(currency=self._futu.Currency.HKD, **self._trade_kwargs()),
        )
        rows = _rows(data)
        if not rows:
            raise BrokerTemporaryError("Futu accinfo_query returned no funds row; try again.", code="empty")
        row = rows[0]
        return Account(
            account_id=str(self.account_id),
            is_paper=self.is_paper,
            cash=_dec0(row.get("cash")),
            equity=_dec0(row.get("total_assets")),
            market_value=_dec0(row.get("market_val")),
            buying_power=_dec0(row.get("power")),
            currency="HKD",
        )

    def positions(self) -> list[Position]:
        data = self._read(
            "trade",
            "positions",
            "position_list_query",
            lambda ctx: ctx.position_list_query(
                position_market=self._futu.TrdMarket.HK, currency=self._futu.Currency.HKD, **self._trade_kwargs()
            ),
        )
        positions = []
        for row in _rows(data):
            code = _text(row.get("code"))
            quantity = _int(row.get("qty"))
            if not code.startswith("HK.") or quantity == 0:
                continue
            avg_cost = _dec(row.get("average_cost")) or _dec0(row.get("cost_price"))
            pnl = _dec(row.get("unrealized_pl"))
            positions.append(
                Position(
                    symbol=code,
                    name=_text(row.get("stock_name")),
                    quantity=quantity,
                    sellable_quantity=_int(row.get("can_sell_qty")),
                    avg_cost=avg_cost,
                    last_price=_dec0(row.get("nominal_price")),
                    market_value=_dec0(row.get("market_val")),
                    unrealized_pnl=pnl if pnl is not None else _dec0(row.get("pl_val")),
                )
            )
        return positions

    def _today_orders(self, order_id: str = "") -> list[Order]:
        data = self._read(
            "trade",
            "orders",
            "order_list_query",
            lambda ctx: ctx.order_list_query(order_id=order_id, **self._trade_kwargs()),
        )
        return [self._order_from_row(row) for row in _rows(data) if _text(row.get("code")).startswith("HK.")]

    def _history_orders(self) -> list[Order]:
        data = self._read(
            "trade",
            "history_orders",
            "history_order_list_query",
            lambda ctx: ctx.history_order_list_query(**self._trade_kwargs()),
        )
        return [self._order_from_row(row) for row in _rows(data) if _text(row.get("code")).startswith("HK.")]

    def open_orders(self) -> list[Order]:
        return [order for order in self._today_orders() if order.is_active]

    def find_order(self, client_order_id: str) -> Order | None:
        """The order whose remark is ``client_order_id``: today's orders first, then Futu's order history."""
        for source in (self._today_orders, self._history_orders):
            matches = [order for order in source() if order.client_order_id == client_order_id]
            if matches:
                return max(matches, key=lambda order: order.created_at)
        return None

    def _find_by_id(self, broker_order_id: str) -> Order | None:
        for order in self._today_orders(order_id=broker_order_id):
            if order.broker_order_id == broker_order_id:
                return order
        for order in self._history_orders():
            if order.broker_order_id == broker_order_id:
                return order
        return None

    def _order_from_row(self, row: Mapping[str, Any]) -> Order:
        futu_status = _text(row.get("order_status"))
        status = FUTU_ORDER_STATUS.get(futu_status, OrderStatus.UNKNOWN)
        futu_type = _text(row.get("order_type"))
        order_type = FUTU_ORDER_TYPE.get(futu_type, OrderType.LIMIT)
        side = Side.BUY if _text(row.get("trd_side")) in ("BUY", "BUY_BACK") else Side.SELL
        created = parse_futu_time(_text(row.get("create_time")))
        updated_text = _text(row.get("updated_time"))
        message = _text(row.get("last_err_msg"))
        if futu_type and futu_type not in FUTU_ORDER_TYPE:
            message = f"{message} (Futu order type {futu_type})".strip()
        return Order(
            broker_order_id=_text(row.get("order_id")),
            client_order_id=_text(row.get("remark")) or None,
            symbol=_text(row.get("code")),
            side=side,
            quantity=_int(row.get("qty")),
            order_type=order_type,
            limit_price=_positive(row.get("price")) if order_type in (OrderType.LIMIT, OrderType.STOP_LIMIT) else None,
            aux_price=_positive(row.get("aux_price")),
            status=status,
            filled_quantity=_int(row.get("dealt_qty")),
            avg_fill_price=_positive(row.get("dealt_avg_price")),
            created_at=created,
            updated_at=parse_futu_time(updated_text) if updated_text else created,
            message=message,
        )

    # ------------------------------------------------------------------------------------------ Broker: orders

    def preview_order(self, request: OrderRequest) -> OrderPreview:
        """What the order would cost (HKEX statutory charges + commission), from its limit or the last price."""
        price = request.limit_price
        if price is None or request.order_type in (OrderType.MARKET, OrderType.STOP):
            quotes = self.snapshots([request.symbol])
            if not quotes:
                raise OrderRejected(
                    f"Could not preview {request.describe()}: no quote for {request.symbol} (unknown symbol?).",
                    code="unknown_symbol",
                )
            price = quotes[0].last_price
        return hkex.order_preview(
            request.symbol, request.side, request.quantity, price, self._commission_pct, self._min_commission
        )

    def _check_order(self, request: OrderRequest) -> Quote:
        """Refuse, before anything is sent, an order OpenD would refuse: lots, ticks, types, paper limits."""
        describe = f"Could not place {request.describe()}"
        try:
            symbol = hkex.normalize_symbol(request.symbol)
        except ValueError as exc:
            raise OrderRejected(f"{describe}: {exc} No order was sent.", code="bad_symbol") from exc
        if symbol != request.symbol:
            raise OrderRejected(
                f"{describe}: symbols must be in the canonical form {symbol}. No order was sent.", code="bad_symbol"
            )
        if len(request.client_order_id.encode("utf-8")) > 64:
            raise OrderRejected(
                f"{describe}: client_order_id {request.client_order_id!r} is longer than Futu's 64-byte remark. "
                "No order was sent.",
                code="bad_remark",
            )
        if request.order_type in (OrderType.STOP, OrderType.STOP_LIMIT):
            if self.is_paper:
                raise OrderRejected(
                    f"{describe}: Futu paper trading has no stop orders (only limit and market). The guard enforces "
                    "stops in paper. No order was sent.",
                    code="no_paper_stops",
                )
            if request.aux_price is None:
                raise OrderRejected(
                    f"{describe}: a stop order needs a trigger price. No order was sent.", code="no_aux"
                )
        if request.order_type in (OrderType.LIMIT, OrderType.STOP_LIMIT) and (
            request.limit_price is None or request.limit_price <= 0
        ):
            raise OrderRejected(
                f"{describe}: a limit order needs a positive limit price. No order was sent.", code="no_price"
            )
        try:
            quotes = self.snapshots([symbol])
        except BrokerTemporaryError as exc:
            raise BrokerTemporaryError(
                f"{describe}: could not read {symbol}'s lot size and tick first ({exc}). No order was sent.",
                code=exc.code,
            ) from exc
        except BrokerRequestRefused as exc:
            raise OrderRejected(
                f"{describe}: could not read {symbol}'s lot size and tick first ({exc}). No order was sent.",
                code=exc.code,
            ) from exc
        if not quotes:
            raise OrderRejected(
                f"{describe}: OpenD knows no security {symbol}. No order was sent.", code="unknown_symbol"
            )
        quote = quotes[0]
        if quote.suspended:
            raise OrderRejected(f"{describe}: {symbol} is suspended from trading. No order was sent.", code="suspended")
        if not hkex.is_whole_lots(request.quantity, quote.lot_size):
            raise OrderRejected(
                f"{describe}: quantity must be a multiple of the {quote.lot_size}-share lot "
                f"(nearest: {hkex.floor_to_lots(request.quantity, quote.lot_size)}). No order was sent.",
                code="odd_lot",
            )
        today = self._clock().astimezone(HKT).date()
        for label, price in (("limit price", request.limit_price), ("trigger price", request.aux_price)):
            if price is None or request.order_type is OrderType.MARKET:
                continue
            if not self._is_valid_price(price, today, quote.price_spread):
                raise OrderRejected(
                    f"{describe}: {label} {price} is not on the HKEX tick grid "
                    f"(a valid {request.side.value} price is {self._nearest_tick(price, request.side, today)}). "
                    "No order was sent.",
                    code="off_tick",
                )
        return quote

    @staticmethod
    def _is_valid_price(price: Decimal, on: date, spread: Decimal | None) -> bool:
        # The dated table decides; the snapshot's spread is accepted too, in case HKEX changed the table.
        return hkex.is_on_tick(price, on) or (spread is not None and hkex.is_on_tick(price, on, tick=spread))

    @staticmethod
    def _nearest_tick(price: Decimal, side: Side, on: date) -> str:
        try:
            return str(hkex.round_to_tick(price, side, on))
        except ValueError:
            return "none (outside the HKEX price range)"

    def place_order(self, request: OrderRequest) -> Order:
        """Send one order (remark = client_order_id). Never retried.

        On a failure the order is looked up by its remark before anything is reported: found -> returned;
        a definite refusal -> ``OrderRejected``; an uncertain outcome and no order found (or no lookup possible)
        -> ``OrderStateUnknown``.
        """
        quote = self._check_order(request)
        describe = f"Could not place {request.describe()}"
        futu = self._futu
        ctx = self._context("trade")  # reconnects first if needed: nothing has been sent yet
        price = request.limit_price if request.order_type in (OrderType.LIMIT, OrderType.STOP_LIMIT) else None
        kwargs = {
            "price": float(price if price is not None else quote.last_price),  # futu wants a price even for market
            "qty": float(request.quantity),
            "code": request.symbol,
            "trd_side": futu.TrdSide.BUY if request.side is Side.BUY else futu.TrdSide.SELL,
            "order_type": getattr(futu.OrderType, OUR_ORDER_TYPE_TO_FUTU[request.order_type]),
            "remark": request.client_order_id,
            "time_in_force": futu.TimeInForce.DAY,
            "aux_price": float(request.aux_price) if request.aux_price is not None else None,
            **self._trade_kwargs(),
        }
        log.info(
            "order_sending", client_order_id=request.client_order_id, order=request.describe(), trd_env=self.trd_env
        )
        try:
            data = self._attempt(ctx, "place_order", "place_order", lambda: ctx.place_order(**kwargs))
        except (BrokerTemporaryError, BrokerRequestRefused) as exc:
            return self._after_failed_placement(request, describe, exc)
        self._limiter.note("orders")  # futu follows every placement with its own order_list_query
        rows = _rows(data)
        if rows and not _missing(rows[0].get("order_status")) and not _missing(rows[0].get("code")):
            order = self._order_from_row(rows[0])
            if order.client_order_id is None:
                order = order.model_copy(update={"client_order_id": request.client_order_id})
        else:  # futu could not read the order back; it was accepted under this id
            order_id = _text(rows[0].get("order_id")) if rows else ""
            now = self._clock()
            order = Order(
                broker_order_id=order_id,
                client_order_id=request.client_order_id,
                symbol=request.symbol,
                side=request.side,
                quantity=request.quantity,
                order_type=request.order_type,
                limit_price=price,
                aux_price=request.aux_price,
                status=OrderStatus.SUBMITTED,
                created_at=now,
                updated_at=now,
            )
        log.info(
            "order_submitted",
            client_order_id=request.client_order_id,
            broker_order_id=order.broker_order_id,
            status=order.status.value,
        )
        return order

    def _after_failed_placement(
        self, request: OrderRequest, describe: str, exc: BrokerTemporaryError | BrokerRequestRefused
    ) -> Order:
        kind = Failure(exc.code) if exc.code in {f.value for f in Failure} else Failure.DISCONNECTED
        try:
            found = self.find_order(request.client_order_id)
        except AgentError as lookup_exc:
            log.error("order_lookup_failed", client_order_id=request.client_order_id, error=str(lookup_exc))
            if kind in UNCERTAIN or exc.code == "exception":
                raise OrderStateUnknown(
                    f"{describe}: the request failed ({exc}) and the order could not be looked up by its client "
                    f"order id {request.client_order_id} ({lookup_exc}). It may or may not be at the broker: "
                    "reconcile (run --guard or check the Futu app) before any new entry."
                ) from exc
            found = None
        if found is not None:
            log.warning(
                "order_found_after_error",
                client_order_id=request.client_order_id,
                broker_order_id=found.broker_order_id,
                error=str(exc),
            )
            return found
        if kind is Failure.RATE_LIMITED:
            raise OrderRejected(
                f"{describe}: OpenD refused it for too many orders in 30 s (rate limit: {exc}). No order was sent; "
                "wait 30 s before placing another.",
                code=kind.value,
            ) from exc
        if kind not in UNCERTAIN:  # OpenD answered no (busy, refused, unknown stock...): nothing was placed
            raise OrderRejected(f"{describe}: broker rejected it ({exc}). No order was sent.", code=kind.value) from exc
        raise OrderStateUnknown(
            f"{describe}: the request failed ({exc}) and no order with client order id {request.client_order_id} "
            "is listed yet. It may still reach the broker: reconcile (run --guard or check the Futu app) before "
            "any new entry."
        ) from exc

    def place_stop_order(self, request: OrderRequest) -> Order:
        """A broker-side protective STOP / STOP_LIMIT (REAL accounts only; paper has no stop orders)."""
        if request.order_type not in (OrderType.STOP, OrderType.STOP_LIMIT):
            raise OrderRejected(
                f"Could not place {request.describe()} as a stop order: its type must be stop or stop_limit. "
                "No order was sent.",
                code="not_a_stop",
            )
        return self.place_order(request)

    def cancel_order(self, broker_order_id: str) -> Order:
        """Cancel one order and return it as the broker now reports it (retried on temporary failures)."""
        futu = self._futu
        try:
            self._read(
                "trade",
                "modify_order",
                f"modify_order (cancel {broker_order_id})",
                lambda ctx: ctx.modify_order(futu.ModifyOrderOp.CANCEL, broker_order_id, 0, 0, **self._trade_kwargs()),
            )
        except BrokerRequestRefused as exc:
            current = self._find_by_id(broker_order_id)
            if current is not None and current.is_done:
                return current  # already filled or cancelled: nothing left to cancel
            raise OrderRejected(
                f"Could not cancel order {broker_order_id}: broker refused ({exc}).", code=exc.code
            ) from exc
        order = self._find_by_id(broker_order_id)
        if order is None:
            raise BrokerTemporaryError(
                f"Cancelled order {broker_order_id}, but it is not in today's or the historical order list; "
                "check it in the Futu app.",
                code="missing",
            )
        log.info("order_cancelled", broker_order_id=broker_order_id, status=order.status.value)
        return order

    # ------------------------------------------------------------------------------------------ MarketData

    def snapshots(self, symbols: list[str]) -> list[Quote]:
        """Quotes in batches of up to 400 codes per request. Unknown symbols are omitted."""
        codes = list(dict.fromkeys(symbols))
        quotes: list[Quote] = []
        for start in range(0, len(codes), MAX_SNAPSHOT_CODES):
            batch = codes[start : start + MAX_SNAPSHOT_CODES]
            data = self._read(
                "quote",
                "snapshot",
                f"get_market_snapshot ({len(batch)} codes)",
                lambda ctx, batch=batch: ctx.get_market_snapshot(batch),
            )
            for row in _rows(data):
                quote = self._quote_from_row(row)
                if quote is not None:
                    quotes.append(quote)
        return quotes

    @staticmethod
    def _quote_from_row(row: Mapping[str, Any]) -> Quote | None:
        lot_size = _int(row.get("lot_size"))
        last = _dec(row.get("last_price"))
        if lot_size <= 0 or last is None:
            log.warning(
                "futu_snapshot_skipped", code=row.get("code"), lot_size=lot_size, last_price=row.get("last_price")
            )
            return None
        ratio = row.get("volume_ratio")
        return Quote(
            symbol=_text(row.get("code")),
            name=_text(row.get("name")),
            last_price=last,
            open_price=_positive(row.get("open_price")),
            high_price=_positive(row.get("high_price")),
            low_price=_positive(row.get("low_price")),
            prev_close=_positive(row.get("prev_close_price")),
            bid_price=_positive(row.get("bid_price")),
            ask_price=_positive(row.get("ask_price")),
            volume=_int(row.get("volume")),
            turnover=_dec0(row.get("turnover")),
            volume_ratio=None if _missing(ratio) else float(ratio),
            lot_size=lot_size,
            price_spread=_positive(row.get("price_spread")),
            suspended=bool(row.get("suspension")) and not _missing(row.get("suspension")),
            is_equity=bool(row.get("equity_valid")) and not _missing(row.get("equity_valid")),
            updated_at=parse_futu_time(_text(row.get("update_time"))),
        )

    def klines(self, symbol: str, timeframe: str, count: int) -> list[Bar]:
        """The last ``count`` bars up to now, oldest first, via ``request_history_kline`` (paged by futu)."""
        if timeframe not in TIMEFRAMES:
            raise ValueError(f"Timeframe {timeframe!r} is not one of {', '.join(TIMEFRAMES)}.")
        if count <= 0:
            return []
        kl_type, minutes = TIMEFRAMES[timeframe]
        now = self._clock().astimezone(HKT)
        # Futu pages forward from ``start``, so ask for a window just wide enough and keep the newest bars.
        # Every extra intraday day costs hundreds of bars (pages), so the holiday allowance is smaller there.
        trading_days = math.ceil(count / _BARS_PER_DAY[timeframe]) + 1
        calendar_days = math.ceil(trading_days * 7 / 5) + (10 if minutes == 0 else 5)
        start = (now - timedelta(days=calendar_days)).date().isoformat()
        end = now.date().isoformat()
        futu = self._futu
        data = self._read(
            "quote",
            "history_kline",
            f"request_history_kline ({symbol} {timeframe})",
            lambda ctx: ctx.request_history_kline(
                symbol,
                start=start,
                end=end,
                ktype=getattr(futu.KLType, kl_type),
                autype=futu.AuType.QFQ,
                max_count=None,
            ),
        )
        frame = data[0] if isinstance(data, tuple) else data
        return _bars_from_frame(frame, minutes)[-count:]

    def history_quota(self) -> tuple[int, int, list[str]]:
        """The historical K-line quota: (used, remaining, codes already counted in the current 30-day window)."""
        data = self._read(
            "quote",
            "history_quota",
            "get_history_kl_quota",
            lambda ctx: ctx.get_history_kl_quota(get_detail=True),
        )
        used, remaining, detail = data
        return int(used), int(remaining), [str(item["code"]) for item in detail]

    def history_page(
        self, symbol: str, timeframe: str, first: date, last: date, page_key: Any = None, page_size: int = 1000
    ) -> tuple[list[Bar], Any]:
        """One page of unadjusted bars of ``first..last`` (bar times are bar STARTS: Futu's end labels converted),
        and the key of the next page (None after the last)."""
        kl_type, minutes = TIMEFRAMES[timeframe]
        futu = self._futu
        data = self._read(
            "quote",
            "history_kline",
            f"request_history_kline ({symbol} {timeframe} {first}..{last})",
            lambda ctx: ctx.request_history_kline(
                symbol,
                start=first.isoformat(),
                end=last.isoformat(),
                ktype=getattr(futu.KLType, kl_type),
                autype=futu.AuType.NONE,
                max_count=page_size,
                page_req_key=page_key,
            ),
        )
        frame, next_key = data if isinstance(data, tuple) else (data, None)
        return _bars_from_frame(frame, minutes), next_key

    def index_constituents(self, index: str) -> list[str]:
        """Constituents of HSI, HSCEI, HSTECH (Futu index plates HK.800000/800100/800700) or ALL (their union)."""
        name = index.strip().upper()
        names = list(INDEX_PLATES) if name == "ALL" else [name]
        unknown = [n for n in names if n not in INDEX_PLATES]
        if unknown:
            raise ValueError(f"Index {index!r} is not one of HSI, HSCEI, HSTECH, ALL.")
        symbols: dict[str, None] = {}
        for n in names:
            plate = INDEX_PLATES[n]
            data = self._read(
                "quote",
                "plate_stock",
                f"get_plate_stock ({plate} {n})",
                lambda ctx, plate=plate: ctx.get_plate_stock(plate),
            )
            for row in _rows(data):
                code = _text(row.get("code"))
                if code.startswith("HK."):
                    symbols[code] = None
        return list(symbols)

    def news(self, symbol: str, since: datetime) -> list[NewsItem]:
        """Futu's news search for the stock code, newest first, published at or after ``since``."""
        code = symbol.removeprefix("HK.")
        data = self._read(
            "quote", "news", f"get_search_news ({symbol})", lambda ctx: ctx.get_search_news(code, max_count=50)
        )
        wanted = {f"{code}.HK", symbol, f"{int(code)}.HK" if code.isdigit() else code}
        items = []
        for row in _rows(data):
            related = row.get("related_securities") or []
            if related and not wanted.intersection(related):
                continue
            published = _parse_news_time(row.get("publish_time"))
            if published is None or published < since:
                continue
            items.append(
                NewsItem(
                    symbol=symbol,
                    published_at=published,
                    title=_text(row.get("title")),
                    source=_text(row.get("source")),
                    url=_text(row.get("url")),
                )
            )
        return sorted(items, key=lambda item: item.published_at, reverse=True)

    def gateway_state(self) -> dict[str, str]:
        """OpenD's global state in our words (for the connection test): HK market, logins, server version."""
        data = self._read("quote", "global_state", "get_global_state", lambda ctx: ctx.get_global_state())
        if not isinstance(data, dict):
            return {}
        keys = ("market_hk", "qot_logined", "trd_logined", "server_ver", "server_build_no", "program_status_type")
        return {key: _text(data.get(key)) for key in keys if key in data}

    def accounts(self) -> list[dict[str, str]]:
        """Every trading account OpenD sees: id, paper/real, markets and status (for the connection test)."""
        data = self._read("trade", "acc_list", "get the account list", lambda ctx: ctx.get_acc_list())
        return [
            {
                "acc_id": str(row.get("acc_id")),
                "trd_env": _text(row.get("trd_env")),
                "markets": ",".join(str(m) for m in (row.get("trdmarket_auth") or [])),
                "status": _text(row.get("acc_status")),
                "in_use": "yes" if str(row.get("acc_id")) == str(self.account_id) else "",
            }
            for row in _rows(data)
        ]

    def market_state(self) -> MarketState | None:
        """OpenD's view of the HK market (``get_global_state``), or None for a state we do not know."""
        data = self._read("quote", "global_state", "get_global_state", lambda ctx: ctx.get_global_state())
        raw = _text(data.get("market_hk")) if isinstance(data, dict) else ""
        phase = FUTU_MARKET_PHASE.get(raw)
        if phase is None:
            log.warning("futu_market_state_unknown", market_hk=raw)
            return None
        return MarketState(phase=phase, raw=raw, checked_at=self._clock())
