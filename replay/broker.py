"""A paper account for replays (``brokers.base.Broker``) whose fills do not flatter.

An order decided at time t (the replay clock when ``place_order`` is called) fills only against minute bars that
start at or after t, read through ``ReplayFeed.bars_between`` (so never past the clock):

* MARKET: the next bar's open, ``slippage_ticks`` against us.
* a marketable LIMIT (a buy at or above the last price, a sell at or below it): the next bar's open with slippage
  if that is within the limit; otherwise it rests.
* a resting LIMIT: fills only when a later bar trades *through* it (a buy when a bar's low is below the limit, a
  sell when a bar's high is above it), at the limit, or at that bar's open when the bar opened beyond it.
* STOP (a protective sell; the REAL-style ``place_stop_order``): on the first bar whose low reaches the trigger, at
  the trigger or at that bar's open when it gapped below, with slippage.
* Orders are day orders: one not filled by the session's close expires (cancelled).

HKEX rules come from ``brokers.hkex``: whole board lots, the dated tick grid (slippage moves along it), and the
costs of each side. Long only: a sell can only reduce a position. Fills happen when the account is next read
after the clock has moved, exactly as a live account learns of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import NamedTuple

from brokers import hkex
from brokers.base import Account, Clock, Order, OrderPreview, OrderRequest, OrderStatus, OrderType, Position, Side
from config.errors import OrderRejected
from data.calendar import _calendar as _xhkg
from replay.feed import HKT, ReplayFeed, SessionBars, milli_to_price

_CENT = Decimal("0.01")
_STOPS = frozenset({OrderType.STOP, OrderType.STOP_LIMIT})


class Fill(NamedTuple):
    """One execution, for the score: when, what, at what price, and its costs (HKD)."""

    time: datetime
    client_order_id: str | None
    symbol: str
    side: Side
    quantity: int
    price: Decimal
    costs: Decimal


@dataclass
class _Holding:
    quantity: int
    avg_cost: Decimal


@dataclass
class _Working:
    order: Order
    marketable: bool  # at placement: may take the next bar's open
    expires_at: datetime
    seen_through: datetime | None = None  # bars up to here were already checked
    bars_seen: bool = False  # a marketable order takes only the first bar after it was placed


@dataclass
class ReplayAccount:
    cash: Decimal
    holdings: dict[str, _Holding] = field(default_factory=dict)
    orders: list[Order] = field(default_factory=list)
    working: dict[str, _Working] = field(default_factory=dict)
    fills: list[Fill] = field(default_factory=list)
    fees: Decimal = Decimal(0)


def shift_ticks(price: Decimal, ticks: int, side: Side, on: date) -> Decimal:
    """``price`` moved ``ticks`` steps along the HKEX grid against the given side (a buy pays up, a sell gets less)."""
    for _ in range(ticks):
        if side is Side.BUY:
            if price >= hkex.MAX_PRICE:
                break
            price = price + hkex.tick_size(price, on, Side.SELL)
        else:
            if price <= hkex.MIN_PRICE:
                break
            price = price - hkex.tick_size(price, on, Side.BUY)
    return price


class ReplayBroker:
    """The ``Broker`` protocol over a ``ReplayFeed``. A paper-style account: the guard enforces journal stops."""

    def __init__(
        self,
        feed: ReplayFeed,
        clock: Clock,
        *,
        starting_cash: Decimal,
        commission_pct: Decimal | float,
        min_commission: Decimal,
        slippage_ticks: int = 1,
    ) -> None:
        if slippage_ticks < 0:
            raise ValueError(f"slippage_ticks must be 0 or more, got {slippage_ticks}.")
        self.feed = feed
        self._clock = clock
        self.commission_pct = Decimal(str(commission_pct))
        self.min_commission = Decimal(str(min_commission))
        self.slippage_ticks = slippage_ticks
        self.state = ReplayAccount(cash=Decimal(starting_cash).quantize(_CENT))
        self._next_id = 1

    # --- reads ------------------------------------------------------------------------------------------------

    def account(self) -> Account:
        self.settle()
        positions = self._positions()
        market_value = sum((p.market_value for p in positions), Decimal(0))
        return Account(
            account_id="REPLAY",
            is_paper=True,
            cash=self.state.cash,
            equity=(self.state.cash + market_value).quantize(_CENT),
            market_value=market_value.quantize(_CENT),
            buying_power=(self.state.cash - self._reserved_cash()).quantize(_CENT),
        )

    def positions(self) -> list[Position]:
        self.settle()
        return self._positions()

    def open_orders(self) -> list[Order]:
        self.settle()
        return [w.order for w in self.state.working.values()]

    def find_order(self, client_order_id: str) -> Order | None:
        self.settle()
        for order in reversed(self.state.orders):
            if order.client_order_id == client_order_id:
                return order
        return None

    def preview_order(self, request: OrderRequest) -> OrderPreview:
        price = request.limit_price or self.feed.last_price(request.symbol)
        if price is None:
            raise OrderRejected(
                f"Could not preview {request.symbol}: the replay has no data for it.", code="unknown_symbol"
            )
        return hkex.order_preview(
            request.symbol, request.side, request.quantity, price, self.commission_pct, self.min_commission
        )

    # --- writes -----------------------------------------------------------------------------------------------

    def place_order(self, request: OrderRequest) -> Order:
        """Accept a valid order as working (it fills against later bars). Raises OrderRejected, changing nothing."""
        self.settle()
        now = self._clock()
        info = self.feed.instrument(request.symbol)
        what = f"{request.order_type.value} {request.side.value.upper()} {request.quantity} {request.symbol}"
        if request.limit_price is not None:
            what += f" @ {request.limit_price}"

        def reject(reason: str, code: str) -> OrderRejected:
            return OrderRejected(f"Could not place {what}: {reason}. No order was sent.", code=code)

        if info is None:
            raise reject("the replay's market data has no such symbol", "unknown_symbol")
        session = _xhkg().session(now.date())
        if session is None or not any(start <= now < end for start, end in session.continuous_windows()):
            raise reject("the market is not in continuous trading at the replay clock", "market_closed")
        if not hkex.is_whole_lots(request.quantity, info.lot_size):
            raise reject(f"quantity must be a multiple of the {info.lot_size}-share board lot", "odd_lot")
        last = self.feed.last_price(info.symbol)
        if last is None:
            raise reject("there is no price for it yet", "no_price")
        limit = request.limit_price if request.order_type in (OrderType.LIMIT, OrderType.STOP_LIMIT) else None
        if request.order_type in (OrderType.LIMIT, OrderType.STOP_LIMIT):
            if limit is None:
                raise reject("a limit order needs a limit price", "missing_price")
            if not hkex.is_on_tick(limit, now.date()):
                raise reject(f"price {limit} is not on the HKEX tick grid", "off_tick")
        if request.order_type in _STOPS and (
            request.side is not Side.SELL or request.aux_price is None or request.aux_price >= last
        ):
            raise reject("a stop must be a SELL with a trigger below the last price", "bad_stop")
        if request.side is Side.BUY:
            check = limit if limit is not None else last
            gross = check * request.quantity
            needed = gross + self._costs(gross)
            available = self.state.cash - self._reserved_cash()
            if needed > available:
                raise reject(f"needs HK${needed:.2f} but buying power is HK${available:.2f}", "insufficient_cash")
        else:
            held = self.state.holdings.get(info.symbol)
            sellable = (held.quantity if held else 0) - self._pending_sell(info.symbol)
            if request.quantity > sellable:
                raise reject(
                    f"only {sellable} shares are sellable; short selling is not allowed", "insufficient_position"
                )
        order = Order(
            broker_order_id=f"R{self._next_id:08d}",
            client_order_id=request.client_order_id,
            symbol=info.symbol,
            side=request.side,
            quantity=request.quantity,
            order_type=request.order_type,
            limit_price=limit,
            aux_price=request.aux_price if request.order_type in _STOPS else None,
            status=OrderStatus.SUBMITTED,
            created_at=now,
            updated_at=now,
        )
        self._next_id += 1
        marketable = request.order_type is OrderType.MARKET or (
            limit is not None
            and request.order_type is OrderType.LIMIT
            and (limit >= last if request.side is Side.BUY else limit <= last)
        )
        self.state.orders.append(order)
        self.state.working[order.broker_order_id] = _Working(order, marketable, session.close)
        return order

    def place_stop_order(self, request: OrderRequest) -> Order:
        """A protective STOP sell (fills at the trigger or a worse gap open)."""
        if request.order_type not in _STOPS:
            raise OrderRejected(f"Could not place {request.order_type.value} as a stop order. No order was sent.")
        return self.place_order(request)

    def cancel_order(self, broker_order_id: str) -> Order:
        self.settle()
        working = self.state.working.pop(broker_order_id, None)
        if working is None:
            raise OrderRejected(f"Could not cancel order {broker_order_id}: it is not working. Nothing changed.")
        return self._replace(
            working.order, status=OrderStatus.CANCELLED, at=self._clock(), message="cancelled by request"
        )

    def close(self) -> None:
        """Nothing to release."""

    # --- fills ------------------------------------------------------------------------------------------------

    def settle(self) -> None:
        """Fill or expire working orders against the bars that have ended since they were last checked."""
        now = self._clock()
        for order_id in list(self.state.working):
            working = self.state.working[order_id]
            end = min(now, working.expires_at)
            self._try_fill(working, end)
            if order_id in self.state.working and now >= working.expires_at:
                del self.state.working[order_id]
                self._replace(
                    working.order,
                    status=OrderStatus.CANCELLED,
                    at=working.expires_at,
                    message=f"Expired unfilled at the close of {working.expires_at.date()} (HKEX day order).",
                )

    def _try_fill(self, working: _Working, end: datetime) -> None:
        order = working.order
        start = working.seen_through or order.created_at
        if end <= start:
            return
        for day, bars in self.feed.bars_between(order.symbol, start, end):
            for i in range(len(bars)):
                price = self._fill_price(order, working.marketable and not working.bars_seen, bars, i, day)
                working.bars_seen = True
                # The next look starts after this bar (a bar boundary, never the clock: a bar in progress now
                # must still be seen once it has ended).
                working.seen_through = datetime.fromtimestamp(int(bars.starts[i]) + 60, HKT)
                if price is None:
                    continue
                at = datetime.fromtimestamp(int(bars.starts[i]), HKT)
                if self._book(order, price, at):
                    del self.state.working[order.broker_order_id]
                    return

    def _fill_price(self, order: Order, takes_open: bool, bars: SessionBars, i: int, day: date) -> Decimal | None:
        """The price ``order`` fills at on bar ``i``, or None when that bar does not fill it."""
        open_, low, high = (milli_to_price(int(a[i])) for a in (bars.open, bars.low, bars.high))
        slip = self.slippage_ticks
        if order.order_type is OrderType.MARKET:
            return shift_ticks(open_, slip, order.side, day)
        if order.order_type in _STOPS:
            assert order.aux_price is not None
            if low > order.aux_price:
                return None
            return shift_ticks(min(open_, order.aux_price), slip, Side.SELL, day)
        limit = order.limit_price
        assert limit is not None
        if takes_open:
            slipped = shift_ticks(open_, slip, order.side, day)
            if (slipped <= limit) if order.side is Side.BUY else (slipped >= limit):
                return slipped
        if order.side is Side.BUY and low < limit:
            return min(open_, limit)
        if order.side is Side.SELL and high > limit:
            return max(open_, limit)
        return None

    def _book(self, order: Order, price: Decimal, at: datetime) -> bool:
        gross = (price * order.quantity).quantize(_CENT)
        costs = self._costs(gross)
        holding = self.state.holdings.get(order.symbol)
        if order.side is Side.BUY:
            if gross + costs > self.state.cash:
                return False  # the cash went elsewhere: it keeps working until it expires
            self.state.cash = (self.state.cash - gross - costs).quantize(_CENT)
            if holding is None:
                self.state.holdings[order.symbol] = _Holding(order.quantity, price)
            else:
                quantity = holding.quantity + order.quantity
                holding.avg_cost = ((holding.avg_cost * holding.quantity + gross) / quantity).quantize(
                    Decimal("0.0001")
                )
                holding.quantity = quantity
        else:
            assert holding is not None and holding.quantity >= order.quantity
            self.state.cash = (self.state.cash + gross - costs).quantize(_CENT)
            holding.quantity -= order.quantity
            if holding.quantity == 0:
                del self.state.holdings[order.symbol]
        self.state.fees += costs
        self.state.fills.append(Fill(at, order.client_order_id, order.symbol, order.side, order.quantity, price, costs))
        self._replace(order, status=OrderStatus.FILLED, at=at, filled=order.quantity, price=price)
        return True

    def _replace(
        self,
        order: Order,
        *,
        status: OrderStatus,
        at: datetime,
        message: str = "",
        filled: int = 0,
        price: Decimal | None = None,
    ) -> Order:
        updated = order.model_copy(
            update={
                "status": status,
                "updated_at": at,
                "message": message,
                "filled_quantity": filled,
                "avg_fill_price": price,
            }
        )
        for i, existing in enumerate(self.state.orders):
            if existing.broker_order_id == order.broker_order_id:
                self.state.orders[i] = updated
        return updated

    # --- helpers ----------------------------------------------------------------------------------------------

    def _costs(self, gross: Decimal) -> Decimal:
        return hkex.trading_costs(gross, self.commission_pct, self.min_commission).total

    def _reserved_cash(self) -> Decimal:
        total = Decimal(0)
        for working in self.state.working.values():
            order = working.order
            if order.side is Side.BUY:
                price = order.limit_price or self.feed.last_price(order.symbol) or Decimal(0)
                gross = price * order.quantity
                total += gross + self._costs(gross)
        return total

    def _pending_sell(self, symbol: str) -> int:
        return sum(
            w.order.quantity
            for w in self.state.working.values()
            if w.order.side is Side.SELL and w.order.symbol == symbol
        )

    def _positions(self) -> list[Position]:
        result = []
        for symbol, holding in sorted(self.state.holdings.items()):
            info = self.feed.instrument(symbol)
            last = self.feed.last_price(symbol) or holding.avg_cost
            sellable = holding.quantity - self._pending_sell(symbol)
            name = info.name if info else ""
            result.append(Position.valued_at(symbol, name, holding.quantity, sellable, holding.avg_cost, last))
        return result
