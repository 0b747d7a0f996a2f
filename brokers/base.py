"""The broker contract: a ``Broker`` protocol, a ``MarketData`` protocol and the models they exchange.

Models are frozen pydantic records in our own words. Money and prices are ``Decimal`` (HKD), quantities
are whole shares, symbols are always the canonical ``HK.00700`` form (see ``brokers.hkex.normalize_symbol``),
times are timezone-aware. Futu field names never appear here.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field


class Side(StrEnum):
    BUY = "buy"
    SELL = "sell"


class OrderType(StrEnum):
    LIMIT = "limit"
    MARKET = "market"
    STOP = "stop"  # real accounts only (Futu STOP with aux_price)
    STOP_LIMIT = "stop_limit"


class OrderStatus(StrEnum):
    PENDING = "pending"  # journalled, not yet acknowledged by the broker
    SUBMITTED = "submitted"
    PARTIALLY_FILLED = "partially_filled"
    FILLED = "filled"
    CANCELLED = "cancelled"
    REJECTED = "rejected"
    DRY_RUN = "dry_run"
    UNKNOWN = "unknown"  # fate could not be established; blocks entries until resolved


# Order states grouped once, so no code compares status strings inline.
DONE_STATUSES: frozenset[OrderStatus] = frozenset(
    {OrderStatus.FILLED, OrderStatus.CANCELLED, OrderStatus.REJECTED, OrderStatus.DRY_RUN}
)
ACTIVE_STATUSES: frozenset[OrderStatus] = frozenset(
    {OrderStatus.PENDING, OrderStatus.SUBMITTED, OrderStatus.PARTIALLY_FILLED}
)

Clock = Callable[[], datetime]
"""Returns the current time (timezone-aware). Injected everywhere so a run can be replayed at any time."""


class MarketPhase(StrEnum):
    """What the exchange is doing right now (our words, mapped from calendar and broker)."""

    CLOSED = "closed"  # non-trading day, before pre-open or after the closing auction
    PRE_OPEN = "pre_open"  # 09:00-09:30 auction
    MORNING = "morning"  # continuous 09:30-12:00
    LUNCH = "lunch"  # 12:00-13:00
    AFTERNOON = "afternoon"  # continuous 13:00-16:00
    CLOSING_AUCTION = "closing_auction"  # 16:00-16:10


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Quote(_Frozen):
    """A snapshot of one stock."""

    symbol: str
    name: str = ""
    last_price: Decimal
    open_price: Decimal | None = None
    high_price: Decimal | None = None
    low_price: Decimal | None = None
    prev_close: Decimal | None = None
    bid_price: Decimal | None = None
    ask_price: Decimal | None = None
    volume: int = 0
    turnover: Decimal = Decimal(0)
    volume_ratio: float | None = None  # today's volume pace vs the recent average (Futu's "volume ratio")
    lot_size: int = Field(gt=0)
    price_spread: Decimal | None = None  # the tick at the current price, as the broker reports it
    suspended: bool = False
    is_equity: bool = True
    # True when the source sent delayed (not real-time) prices: IBKR without a market-data subscription sends
    # 15-minute-old data. Entries are refused on it unless broker.ibkr.allow_delayed_data is set.
    delayed: bool = False
    updated_at: datetime


class Bar(_Frozen):
    """One K-line bar. ``time`` is the bar's start for intraday bars and the session date at 00:00 for daily."""

    time: datetime
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: int


class Account(_Frozen):
    """Cash and equity of the trading account, HKD."""

    account_id: str
    is_paper: bool
    cash: Decimal
    equity: Decimal  # total assets: cash + market value of positions
    market_value: Decimal
    buying_power: Decimal
    currency: str = "HKD"
    # Equity at the previous session's close, as the broker reports it (the day's opening balance); None when
    # the broker does not say (Futu's funds query has no such field). The daily loss baseline prefers it.
    prev_close_equity: Decimal | None = None


class Position(_Frozen):
    symbol: str
    name: str = ""
    quantity: int
    sellable_quantity: int
    avg_cost: Decimal
    last_price: Decimal
    market_value: Decimal
    unrealized_pnl: Decimal

    @classmethod
    def valued_at(
        cls, symbol: str, name: str, quantity: int, sellable: int, avg_cost: Decimal, last: Decimal
    ) -> Position:
        """A holding valued at ``last``: market value and unrealized P&L to the cent (the simulated accounts)."""
        cent = Decimal("0.01")
        return cls(
            symbol=symbol,
            name=name,
            quantity=quantity,
            sellable_quantity=sellable,
            avg_cost=avg_cost,
            last_price=last,
            market_value=(last * quantity).quantize(cent),
            unrealized_pnl=((last - avg_cost) * quantity).quantize(cent),
        )


class OrderRequest(_Frozen):
    """What we ask the broker to do. ``client_order_id`` travels as Futu's ``remark`` (≤ 64 bytes)."""

    client_order_id: str = Field(min_length=1, max_length=64)
    symbol: str
    side: Side
    quantity: int = Field(gt=0)
    order_type: OrderType = OrderType.LIMIT
    limit_price: Decimal | None = None
    aux_price: Decimal | None = None  # trigger price for STOP / STOP_LIMIT
    # One-cancels-all group (IBKR): the order joins the group of a bracket's surviving children. Brokers
    # without OCA orders (futu, sim) are never sent one: the executor only sets it next to a live OCA sibling.
    oca_group: str | None = None

    def describe(self) -> str:
        """``limit BUY 500 HK.00700 @ 312.40`` (with `` (trigger …)`` for stops), for messages."""
        text = f"{self.order_type.value} {self.side.value.upper()} {self.quantity} {self.symbol}"
        if self.limit_price is not None and self.order_type in (OrderType.LIMIT, OrderType.STOP_LIMIT):
            text += f" @ {self.limit_price}"
        if self.aux_price is not None:
            text += f" (trigger {self.aux_price})"
        return text


class Order(_Frozen):
    """An order as the broker knows it."""

    broker_order_id: str
    client_order_id: str | None = None
    symbol: str
    side: Side
    quantity: int
    order_type: OrderType
    limit_price: Decimal | None = None
    aux_price: Decimal | None = None
    status: OrderStatus
    filled_quantity: int = 0
    avg_fill_price: Decimal | None = None
    created_at: datetime
    updated_at: datetime
    message: str = ""  # broker's reason for a rejection or cancellation
    # Native brackets (IBKR): the children (stop and take-profit) name their parent entry and share an OCA
    # group, so at most one of them sells. Futu and the sim leave both None.
    parent_order_id: str | None = None
    oca_group: str | None = None

    @property
    def is_done(self) -> bool:
        return self.status in DONE_STATUSES

    @property
    def is_active(self) -> bool:
        return self.status in ACTIVE_STATUSES


class OrderPreview(_Frozen):
    """What an order would cost, without sending it."""

    symbol: str
    side: Side
    quantity: int
    price: Decimal
    gross_value: Decimal
    costs: Decimal  # stamp duty, levies, fees, commission (one side)
    net_cash_change: Decimal  # negative for a buy


class NewsItem(_Frozen):
    """A news headline. ``title`` and ``summary`` are untrusted text from outside."""

    symbol: str
    published_at: datetime
    title: str
    summary: str = ""
    source: str = ""
    url: str = ""


class MarketState(_Frozen):
    """The broker's own view of the HK market (cross-checked against the calendar in ``data.market``)."""

    phase: MarketPhase
    raw: str = ""  # the broker's state name, for the log
    checked_at: datetime


@runtime_checkable
class Broker(Protocol):
    """Trading account operations. Implementations: ``FutuClient``, ``IbkrClient``, ``SimBroker``, ``DryRunBroker``."""

    def account(self) -> Account: ...

    def positions(self) -> list[Position]: ...

    def open_orders(self) -> list[Order]: ...

    def preview_order(self, request: OrderRequest) -> OrderPreview: ...

    def place_order(self, request: OrderRequest) -> Order:
        """Send one order. Never retried by the implementation: it is not idempotent."""
        ...

    def cancel_order(self, broker_order_id: str) -> Order: ...

    def find_order(self, client_order_id: str) -> Order | None:
        """Look an order up by our ``client_order_id`` (carried in the remark), today's orders included."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class MarketData(Protocol):
    """Read-only market data. Implementations: the Futu quote context, ``IbkrClient`` and ``SimExchange``."""

    def snapshots(self, symbols: list[str]) -> list[Quote]:
        """Quotes for many symbols in as few requests as the source allows. Unknown symbols are omitted."""
        ...

    def klines(self, symbol: str, timeframe: str, count: int) -> list[Bar]:
        """The last ``count`` bars up to now, oldest first. ``timeframe`` is one of 1m 5m 15m 1h 1d."""
        ...

    def index_constituents(self, index: str) -> list[str]:
        """Symbols in ``HSI``, ``HSCEI``, ``HSTECH`` or ``ALL`` (the union)."""
        ...

    def news(self, symbol: str, since: datetime) -> list[NewsItem]: ...

    def market_state(self) -> MarketState | None:
        """The broker's market phase, or None when the source has no opinion."""
        ...
