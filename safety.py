"""The risk gate: pure functions of (tool call, state, limits) → verdict. No I/O, no clock reads.

Every rule of the owner's documents is a small named function returning ``None`` (passed) or a
``RuleFailure`` with the numbers. ``evaluate_*`` pick the rules for a tool and return a ``Verdict``.
The caller (``tool_executor.ToolGate``) builds ``RiskState`` from the broker, the market and the journal,
and journals every verdict. Nothing here reads free text (news, names, reasons): rule 18.

Prices are judged as they would be sent: the limit rounded onto the HKEX tick grid by side (a buy down, a
sell up), a market buy at the ask (the last price when there is no ask), a market sell at the bid. A buy's
stop loss and take profit are rounded down: more risk and less reward than asked, never the other way, and
those rounded values are what ``tool_executor`` stores. A value exactly at a limit passes (≤ / ≥ as
docs/safety.md says). Thresholds are compared as ``Decimal`` so 0.10 means exactly 10 %.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, time
from decimal import Decimal
from typing import Any, Literal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field

from brokers import hkex
from brokers.base import Account, Order, Position, Quote, Side
from config.settings import ClaudeSettings, RiskSettings

HKT = ZoneInfo("Asia/Hong_Kong")

# The continuous-trading windows of every HKEX trading day (half days keep only the first). The caller's
# calendar decides holidays and half days; this is a second, independent check on the clock (rule 1).
CONTINUOUS_WINDOWS: tuple[tuple[time, time], ...] = ((time(9, 30), time(12, 0)), (time(13, 0), time(16, 0)))

# --------------------------------------------------------------------------------------------- models


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RuleFailure(_Frozen):
    rule: str
    message: str


class Approval(_Frozen):
    """A ``check_risk`` that approved a trade earlier in this cycle (prices tick-rounded)."""

    symbol: str
    side: Side
    quantity: int
    entry_price: Decimal
    stop_loss: Decimal
    take_profit: Decimal | None


class TradeProposal(_Frozen):
    """A trade in canonical form: symbol normalised, prices as given (rounding happens in the rules)."""

    symbol: str
    side: Side
    quantity: int
    order_type: Literal["limit", "market"] = "limit"
    entry_price: Decimal | None  # limit price, or None for a market order (ask / bid / last is used)
    stop_loss: Decimal | None
    take_profit: Decimal | None


class RiskState(_Frozen):
    """Everything the rules may look at, gathered by the caller for one tool call.

    ``positions`` are the broker's longs; ``sellable_quantity`` may or may not already exclude shares in
    open sell orders (brokers differ), so the rules use the smaller of it and quantity − open sells.
    ``account.cash`` is taken as not yet reduced by open buy orders; their value is reserved here.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    now: datetime
    is_continuous: bool
    minutes_to_close: float | None = None  # to the end of the current continuous session (12:00 or 16:00)
    market_description: str = ""
    account: Account
    positions: dict[str, Position] = Field(default_factory=dict)
    open_orders: list[Order] = Field(default_factory=list)
    quote: Quote | None = None  # the quote of the symbol in question, None if the symbol is unknown
    trades_today: int = 0
    start_of_day_equity: Decimal | None = None
    halt_reason: str | None = None  # kill switch (file or journal flag), daily-loss halt, unknown orders
    approvals: list[Approval] = Field(default_factory=list)
    alerts_this_cycle: int = 0
    commission_pct: Decimal = Decimal("0.0003")  # the broker's, for the cash check
    min_commission_hkd: Decimal = Decimal(3)
    allow_delayed_data: bool = False  # broker.ibkr.allow_delayed_data: entries on a delayed quote are allowed


class Verdict(_Frozen):
    allowed: bool
    failures: list[RuleFailure] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    max_quantity: int | None = None
    rounded: dict[str, str] = Field(default_factory=dict)  # tick-rounded prices, as strings

    @property
    def reason(self) -> str:
        """One line naming every failed rule, for ``tool_calls.reason`` and the log."""
        if self.allowed:
            return "allowed" + (f" ({'; '.join(self.notes)})" if self.notes else "")
        return "; ".join(f"{f.rule}: {f.message}" for f in self.failures)

    def to_result(self) -> dict[str, Any]:
        """The compact JSON the model receives."""
        out: dict[str, Any] = {"approved": self.allowed}
        if self.failures:
            out["failed_rules"] = [{"rule": f.rule, "why": f.message} for f in self.failures]
        if self.max_quantity is not None:
            out["max_quantity"] = self.max_quantity
        if self.rounded:
            out["rounded"] = self.rounded
        if self.notes:
            out["notes"] = self.notes
        return out


ALLOWED = Verdict(allowed=True)


def _dec(value: float | Decimal) -> Decimal:
    """A setting as an exact Decimal: 0.1 stays 0.1 (no binary float noise at the edge of a limit)."""
    return value if isinstance(value, Decimal) else Decimal(str(value))


# ------------------------------------------------------------------------------------- risk figures


def _pnl_fraction(state: RiskState) -> Decimal | None:
    base = state.start_of_day_equity
    if base is None or base <= 0:
        return None
    return (state.account.equity - base) / base


def daily_pnl_pct(state: RiskState) -> float | None:
    """Equity now vs the start-of-day snapshot, as a fraction (−0.02 = down 2 %); None without a snapshot."""
    pnl = _pnl_fraction(state)
    return None if pnl is None else float(pnl)


def risk_mode(state: RiskState, limits: RiskSettings) -> Literal["normal", "warning", "halted"]:
    """Daily-loss mode: rule 13 (warning at ≤ −warning_loss_pct) and rule 14 (halted at ≤ −max_daily_loss_pct)."""
    pnl = _pnl_fraction(state)
    if pnl is None:
        return "normal"
    if pnl <= -_dec(limits.max_daily_loss_pct):
        return "halted"
    if pnl <= -_dec(limits.warning_loss_pct):
        return "warning"
    return "normal"


def position_cap_pct(state: RiskState, limits: RiskSettings) -> Decimal:
    """Max share of equity per position; halved in warning mode (rule 13)."""
    cap = _dec(limits.max_position_pct)
    return cap / 2 if risk_mode(state, limits) == "warning" else cap


def _band(price: Decimal, ladder: tuple[hkex.SpreadBand, ...]) -> int | None:
    """The index of the spread-table band holding ``price``; None above the table (no valid price there)."""
    return next((index for index, band in enumerate(ladder) if price <= band.upper), None)


def _quote_tick(price: Decimal, state: RiskState) -> Decimal | None:
    """The snapshot's ``price_spread`` when it applies to ``price``, else None (use the dated table).

    It applies only inside the spread-table band of the last price: the broker reports the tick *at the
    market*, and a stop or target 10 % away may sit in another band (49.56 on a 0.05 tick would be 49.55,
    which is not a valid 0.02-band price). A last price exactly on a band boundary is ambiguous (the tick
    above or below?), so the table is used there too, and so it is for a price (or a last price) above the
    table: the table's own rules judge those, as without a snapshot. Minimum-spread reductions only make the
    grid finer, so a price on the table's grid is always valid.
    """
    q = state.quote
    if q is None or q.price_spread is None or q.price_spread <= 0 or q.last_price <= 0:
        return None
    ladder = hkex.spread_table(state.now.date())
    index = _band(q.last_price, ladder)
    if index is None or q.last_price == ladder[index].upper or _band(price, ladder) != index:
        return None
    return q.price_spread


def round_price(price: Decimal, side: Side, state: RiskState) -> Decimal | None:
    """``price`` on the tick grid (a buy rounds down, a sell up), or None if no valid HKEX price exists."""
    try:
        return hkex.round_to_tick(price, side, state.now.date(), tick=_quote_tick(price, state))
    except ValueError:  # outside 0.01-9995, or rounds out of it
        return None


def market_price(side: Side, state: RiskState) -> Decimal | None:
    """What a market order is judged at: the ask for a buy, the bid for a sell, else the last price."""
    q = state.quote
    if q is None:
        return None
    touch = q.ask_price if side == Side.BUY else q.bid_price
    if touch is not None and touch > 0:
        return touch
    return q.last_price if q.last_price > 0 else None


def entry_price_of(proposal: TradeProposal, state: RiskState) -> Decimal | None:
    """The price a trade is judged at: the limit rounded by side, or the market price (see ``market_price``).

    A limit order without a price is judged at the market price so the verdict still shows every number;
    ``rule_limit_price`` refuses it.
    """
    if proposal.order_type == "market" or proposal.entry_price is None:
        return market_price(proposal.side, state)
    return round_price(proposal.entry_price, proposal.side, state)


def _protective_prices(p: TradeProposal, s: RiskState) -> tuple[Decimal | None, Decimal | None]:
    """A buy's stop and target on the grid, both rounded down (conservative); None when missing or invalid."""
    stop = round_price(p.stop_loss, Side.BUY, s) if p.stop_loss is not None else None
    target = round_price(p.take_profit, Side.BUY, s) if p.take_profit is not None else None
    return stop, target


def _remaining(order: Order) -> int:
    return max(order.quantity - order.filled_quantity, 0)


def _held(state: RiskState, symbol: str) -> int:
    position = state.positions.get(symbol)
    return position.quantity if position is not None and position.quantity > 0 else 0


def _pending_buy_quantity(state: RiskState, symbol: str) -> int:
    return sum(_remaining(o) for o in state.open_orders if o.symbol == symbol and o.side == Side.BUY and o.is_active)


def _reserved_cash(state: RiskState) -> Decimal:
    """Cash that open buy orders will use: their unfilled value at the limit, plus costs.

    A pending market buy has no limit; it is valued at the quote's last price when it is the symbol in
    question, else not at all (market orders fill at once; a resting one is rare).
    """
    total = Decimal(0)
    for o in state.open_orders:
        if o.side != Side.BUY or not o.is_active or _remaining(o) == 0:
            continue
        price = o.limit_price
        if price is None and state.quote is not None and state.quote.symbol == o.symbol:
            price = state.quote.last_price
        if price is None or price <= 0:
            continue
        value = _remaining(o) * price
        total += value + hkex.trading_costs(value, state.commission_pct, state.min_commission_hkd).total
    return total


def sellable_quantity(state: RiskState, symbol: str) -> int:
    """How many shares of ``symbol`` may still be sold: min(sellable, held − open sells), never below 0.

    The minimum covers both broker conventions for ``sellable_quantity`` (open sells already deducted or
    not), so pending sells always reserve their shares and nothing can be sold twice (rule 12).
    """
    position = state.positions.get(symbol)
    if position is None or position.quantity <= 0:
        return 0
    open_sells = sum(
        _remaining(o) for o in state.open_orders if o.symbol == symbol and o.side == Side.SELL and o.is_active
    )
    return max(min(position.sellable_quantity, position.quantity - open_sells), 0)


def _cash_needed(quantity: int, price: Decimal, state: RiskState) -> Decimal:
    value = quantity * price
    return value + hkex.trading_costs(value, state.commission_pct, state.min_commission_hkd).total


def max_entry_quantity(price: Decimal, state: RiskState, limits: RiskSettings) -> int:
    """The largest whole-lot buy at ``price`` that the position cap (rule 6), the order-value cap and the
    cash incl. costs (rule 8) allow; 0 when none. Other rules (hours, halts, counts) are not sized here."""
    if state.quote is None or price <= 0:
        return 0
    lot = state.quote.lot_size
    symbol = state.quote.symbol
    already = _held(state, symbol) + _pending_buy_quantity(state, symbol)
    cap_value = state.account.equity * position_cap_pct(state, limits) - already * price
    size_value = min(cap_value, limits.max_order_value_hkd)
    if size_value <= 0:
        return 0
    lots = int(size_value // (price * lot))
    cash = state.account.cash - _reserved_cash(state)
    # Costs grow with the value, so the largest affordable lot count is found by bisection.
    low, high = 0, lots
    while low < high:
        mid = (low + high + 1) // 2
        if _cash_needed(mid * lot, price, state) <= cash:
            low = mid
        else:
            high = mid - 1
    return low * lot


# ------------------------------------------------------------------------------------------- rules
# Each takes (proposal, state, limits) and returns a failure or None. Rule names are journalled.

Rule = Callable[[TradeProposal, RiskState, RiskSettings], "RuleFailure | None"]


def _is_continuous_clock(now: datetime) -> bool:
    local = now.astimezone(HKT) if now.tzinfo is not None else now
    if local.weekday() >= 5:
        return False
    clock = local.time()
    return any(start <= clock < end for start, end in CONTINUOUS_WINDOWS)


def rule_trading_hours(p: TradeProposal, s: RiskState, lim: RiskSettings) -> RuleFailure | None:
    """Rule 1: orders only in continuous trading; no new entries in the last minutes of a session.

    ``is_continuous`` (calendar + broker) is the authority; the clock must also be inside 09:30-12:00 or
    13:00-16:00 on a weekday, so a caller bug cannot open the lunch break. An entry needs a known time to
    the session's close: exactly ``no_entry_minutes_before_close`` left still passes.
    """
    if not s.is_continuous or not _is_continuous_clock(s.now):
        return RuleFailure(
            rule="trading_hours",
            message=(
                f"market is not in continuous trading at {s.now.astimezone(HKT):%a %H:%M} HKT "
                f"({s.market_description or 'closed'}); orders only 09:30-12:00 and 13:00-16:00 on trading days"
            ),
        )
    if p.side != Side.BUY:
        return None
    if s.minutes_to_close is None:
        return RuleFailure(rule="trading_hours", message="time to the session's close is unknown; no new entries")
    if s.minutes_to_close < lim.no_entry_minutes_before_close:
        return RuleFailure(
            rule="trading_hours",
            message=(
                f"no new entries in the last {lim.no_entry_minutes_before_close} min of a session "
                f"({s.minutes_to_close:.1f} min left); exits are still allowed"
            ),
        )
    return None


def rule_symbol_tradable(p: TradeProposal, s: RiskState, lim: RiskSettings) -> RuleFailure | None:
    """Rule 11: the symbol exists, is an HK equity, is not suspended, and (for entries) is quoted in real time."""
    q = s.quote
    if q is None:
        return RuleFailure(rule="symbol", message=f"{p.symbol} is not a known HKEX security (no quote)")
    if q.symbol != p.symbol:
        return RuleFailure(rule="symbol", message=f"the quote is for {q.symbol}, not {p.symbol}; ask again")
    if not q.is_equity:
        return RuleFailure(rule="symbol", message=f"{p.symbol} is not an equity; this agent trades HK stocks only")
    if q.suspended:
        return RuleFailure(rule="symbol", message=f"{p.symbol} is suspended from trading")
    if q.last_price <= 0:
        return RuleFailure(rule="symbol", message=f"{p.symbol} has no valid last price ({q.last_price})")
    if q.delayed and p.side == Side.BUY and not s.allow_delayed_data:
        return RuleFailure(
            rule="symbol",
            message=f"the quote of {p.symbol} is delayed (no real-time market data subscription): the "
            "limit-near-market check is meaningless on an old price, so no entry is allowed "
            "(a human may set broker.ibkr.allow_delayed_data: true)",
        )
    return None


def rule_stop_loss(p: TradeProposal, s: RiskState, lim: RiskSettings) -> RuleFailure | None:
    """Rule 3: a buy needs stop_loss < entry < take_profit (tick-rounded), the stop at most max_stop_pct away."""
    if p.side != Side.BUY:
        return None
    if p.stop_loss is None:
        return RuleFailure(rule="stop_loss", message="a stop loss is required on every entry")
    if p.take_profit is None:
        return RuleFailure(rule="stop_loss", message="a take profit is required on every entry")
    entry = entry_price_of(p, s)
    if entry is None:
        return None  # reported by rule_symbol_tradable / rule_limit_price
    stop, target = _protective_prices(p, s)
    if stop is None:
        return RuleFailure(rule="stop_loss", message=f"stop {p.stop_loss} is not a valid HKEX price (0.01-9995)")
    if target is None:
        return RuleFailure(rule="stop_loss", message=f"take profit {p.take_profit} is not a valid HKEX price")
    if stop >= entry:
        return RuleFailure(rule="stop_loss", message=f"stop {stop} must be below the entry {entry} for a buy")
    if target <= entry:
        return RuleFailure(
            rule="stop_loss", message=f"take profit {target} (tick-rounded) must be above the entry {entry}"
        )
    distance = (entry - stop) / entry
    max_stop = _dec(lim.max_stop_pct)
    if distance > max_stop:
        return RuleFailure(
            rule="stop_loss",
            message=(
                f"stop {stop} is {distance:.2%} below the entry {entry}; the maximum is {max_stop:.2%} "
                f"(stop at least {entry * (1 - max_stop)})"
            ),
        )
    return None


def rule_reward_risk(p: TradeProposal, s: RiskState, lim: RiskSettings) -> RuleFailure | None:
    """Rule 4: (take_profit − entry) / (entry − stop) on tick-rounded prices ≥ min_risk_reward."""
    if p.side != Side.BUY:
        return None
    entry = entry_price_of(p, s)
    stop, target = _protective_prices(p, s)
    if entry is None or stop is None or target is None:
        return None  # rule_stop_loss / rule_symbol_tradable report it
    risk, reward = entry - stop, target - entry
    if risk <= 0 or reward <= 0:
        return None  # rule_stop_loss reports the wrong side on the same rounded prices
    ratio = reward / risk
    minimum = _dec(lim.min_risk_reward)
    if ratio < minimum:
        return RuleFailure(
            rule="reward_risk",
            message=(
                f"reward:risk is {ratio:.2f} (entry {entry}, stop {stop}, target {target}); minimum {minimum:.2f} "
                f"(target at least {entry + risk * minimum})"
            ),
        )
    return None


def rule_board_lots(p: TradeProposal, s: RiskState, lim: RiskSettings) -> RuleFailure | None:
    """Rule 5: quantity > 0 and a whole number of the stock's board lots (from the quote)."""
    if p.quantity <= 0:
        return RuleFailure(rule="board_lot", message=f"quantity must be positive, got {p.quantity}")
    if s.quote is None:
        return None
    lot = s.quote.lot_size
    if not hkex.is_whole_lots(p.quantity, lot):
        nearest = hkex.floor_to_lots(p.quantity, lot)
        hint = f"nearest below: {nearest}" if nearest else f"the minimum is one lot of {lot}"
        return RuleFailure(
            rule="board_lot",
            message=f"{p.quantity} is not a whole number of {lot}-share lots for {p.symbol} ({hint})",
        )
    return None


def rule_position_size(p: TradeProposal, s: RiskState, lim: RiskSettings) -> RuleFailure | None:
    """Rule 6: (held + pending buys + this order) × entry ≤ max_position_pct of equity (halved in warning)."""
    if p.side != Side.BUY or s.quote is None:
        return None
    price = entry_price_of(p, s)
    if price is None:
        return None
    already = _held(s, p.symbol) + _pending_buy_quantity(s, p.symbol)
    after = (p.quantity + already) * price
    cap_pct = position_cap_pct(s, lim)
    cap = s.account.equity * cap_pct
    if after > cap:
        held_note = f" incl. {already} already held or pending" if already else ""
        return RuleFailure(
            rule="position_size",
            message=(
                f"position would be HK${after:,.2f}{held_note}, over {cap_pct:.1%} of equity (HK${cap:,.2f})"
                + (" (warning mode halves the cap)" if risk_mode(s, lim) == "warning" else "")
            ),
        )
    return None


def rule_max_positions(p: TradeProposal, s: RiskState, lim: RiskSettings) -> RuleFailure | None:
    """Rule 7: open positions + pending entries ≤ max_positions after this entry.

    Adding to a holding (or to a pending entry) is not a new position, but it is still refused while the
    count is over the maximum (the limit was lowered, or positions were adopted by the guard).
    """
    if p.side != Side.BUY:
        return None
    held = {symbol for symbol, pos in s.positions.items() if pos.quantity > 0}
    pending = {o.symbol for o in s.open_orders if o.side == Side.BUY and o.is_active} - held
    after = len(held | pending | {p.symbol})
    if after > lim.max_positions:
        new = "adding to a position already over the maximum" if p.symbol in held | pending else "a new one"
        return RuleFailure(
            rule="max_positions",
            message=(
                f"{len(held)} open positions and {len(pending)} pending entries; {new} would make {after}, "
                f"the maximum is {lim.max_positions}"
            ),
        )
    return None


def rule_order_value(p: TradeProposal, s: RiskState, lim: RiskSettings) -> RuleFailure | None:
    """Rule 8a: the order value (quantity × entry) ≤ max_order_value_hkd."""
    if p.side != Side.BUY:
        return None
    price = entry_price_of(p, s)
    if price is None:
        return None
    value = p.quantity * price
    if value > lim.max_order_value_hkd:
        return RuleFailure(
            rule="order_value",
            message=f"order value HK${value:,.2f} is over the HK${lim.max_order_value_hkd:,.2f} limit per order",
        )
    return None


def rule_cash(p: TradeProposal, s: RiskState, lim: RiskSettings) -> RuleFailure | None:
    """Rule 8b: cash, less what open buy orders reserve, covers the order value plus its costs."""
    if p.side != Side.BUY:
        return None
    price = entry_price_of(p, s)
    if price is None or p.quantity <= 0:
        return None
    needed = _cash_needed(p.quantity, price, s)
    reserved = _reserved_cash(s)
    available = s.account.cash - reserved
    if needed > available:
        reserved_note = f" (HK${s.account.cash:,.2f} less HK${reserved:,.2f} for open buys)" if reserved else ""
        return RuleFailure(
            rule="cash",
            message=f"needs HK${needed:,.2f} incl. costs; available cash is HK${available:,.2f}{reserved_note}",
        )
    return None


def rule_daily_trades(p: TradeProposal, s: RiskState, lim: RiskSettings) -> RuleFailure | None:
    """Rule 9: an entry only while trades today (all cycles, dry runs excluded) + 1 ≤ max_daily_trades."""
    if p.side == Side.BUY and s.trades_today >= lim.max_daily_trades:
        return RuleFailure(
            rule="daily_trades",
            message=f"{s.trades_today} trades today; the maximum is {lim.max_daily_trades} (exits stay allowed)",
        )
    return None


def rule_limit_price(p: TradeProposal, s: RiskState, lim: RiskSettings) -> RuleFailure | None:
    """Rule 10: the price sent is a valid tick-rounded price within max_price_deviation_pct of the last price.

    A limit order is judged at its rounded limit; a market buy at the ask (a thin book far from the last
    price is refused). A market sell is never refused for its price: an exit must stay possible.
    """
    if p.order_type == "limit":
        if p.entry_price is None:
            return RuleFailure(rule="limit_price", message="a limit order needs limit_price")
        price = round_price(p.entry_price, p.side, s)
        if price is None:
            return RuleFailure(
                rule="limit_price", message=f"limit {p.entry_price} is not a valid HKEX price (0.01-9995)"
            )
        what = f"limit {price}"
    elif p.side == Side.BUY:
        price = market_price(p.side, s)
        what = f"market buy at the ask {price}"
    else:
        return None
    if s.quote is None or price is None or s.quote.last_price <= 0:
        return None  # rule_symbol_tradable reports it
    last = s.quote.last_price
    deviation = abs(price - last) / last
    maximum = _dec(lim.max_price_deviation_pct)
    if deviation > maximum:
        return RuleFailure(
            rule="limit_price",
            message=(
                f"{what} is {deviation:.2%} from the last price {last}; the maximum is {maximum:.2%} "
                f"({last * (1 - maximum):.3f}-{last * (1 + maximum):.3f})"
            ),
        )
    return None


def rule_no_short(p: TradeProposal, s: RiskState, lim: RiskSettings) -> RuleFailure | None:
    """Rule 12: a sell only reduces an existing long, up to its sellable quantity less open sells."""
    if p.side != Side.SELL:
        return None
    available = sellable_quantity(s, p.symbol)
    if p.quantity > available:
        held = _held(s, p.symbol)
        return RuleFailure(
            rule="no_short",
            message=(
                f"selling {p.quantity} {p.symbol} but only {available} of {held} held are sellable "
                f"(open sell orders reserve the rest); no short selling"
            ),
        )
    return None


def rule_not_halted(p: TradeProposal, s: RiskState, lim: RiskSettings) -> RuleFailure | None:
    """Rules 14 and 15: a halt (daily loss, kill switch, unresolved order) blocks entries; exits stay allowed."""
    if p.side != Side.BUY:
        return None
    if s.halt_reason:
        return RuleFailure(rule="halted", message=f"entries are blocked: {s.halt_reason}; exits are still allowed")
    if risk_mode(s, lim) == "halted":
        pnl = _pnl_fraction(s) or Decimal(0)
        return RuleFailure(
            rule="daily_loss_limit",
            message=(
                f"daily P&L {pnl:.2%} is at or past the −{_dec(lim.max_daily_loss_pct):.2%} limit; "
                f"entries are blocked for the rest of the day"
            ),
        )
    return None


ENTRY_RULES: tuple[Rule, ...] = (
    rule_not_halted,
    rule_trading_hours,
    rule_symbol_tradable,
    rule_board_lots,
    rule_stop_loss,
    rule_reward_risk,
    rule_limit_price,
    rule_position_size,
    rule_max_positions,
    rule_order_value,
    rule_cash,
    rule_daily_trades,
)
EXIT_RULES: tuple[Rule, ...] = (
    rule_trading_hours,
    rule_symbol_tradable,
    rule_board_lots,
    rule_limit_price,
    rule_no_short,
)


def _rounded_prices(p: TradeProposal, s: RiskState) -> dict[str, str]:
    if s.quote is None:
        return {}
    out: dict[str, str] = {}
    entry = entry_price_of(p, s)
    if entry is not None:
        out["entry_price"] = str(entry)
    for name, price in (("stop_loss", p.stop_loss), ("take_profit", p.take_profit)):
        rounded = round_price(price, p.side, s) if price is not None else None
        if rounded is not None:
            out[name] = str(rounded)
    return out


def _rounding_notes(p: TradeProposal, rounded: dict[str, str]) -> list[str]:
    notes = []
    given = {"entry_price": p.entry_price if p.order_type == "limit" else None}
    given |= {"stop_loss": p.stop_loss, "take_profit": p.take_profit}
    for name, value in given.items():
        if value is not None and name in rounded and Decimal(rounded[name]) != value:
            notes.append(f"{name} {value} rounded to the tick grid: {rounded[name]}")
    return notes


def evaluate_trade(p: TradeProposal, s: RiskState, lim: RiskSettings) -> Verdict:
    """``check_risk``: run every rule for a buy (entry) or a sell (exit) and collect all failures.

    ``max_quantity`` is the largest whole-lot size rules 5, 6 and 8 allow at this entry (a buy) or the
    sellable quantity (a sell); ``rounded`` holds the prices as they would be sent and stored.
    """
    rules = ENTRY_RULES if p.side == Side.BUY else EXIT_RULES
    failures = [f for rule in rules if (f := rule(p, s, lim)) is not None]
    notes: list[str] = []
    if p.side == Side.BUY and risk_mode(s, lim) == "warning":
        notes.append(
            f"warning mode: daily loss at or past {_dec(lim.warning_loss_pct):.2%}, position cap halved to "
            f"{position_cap_pct(s, lim):.1%}"
        )
    rounded = _rounded_prices(p, s)
    notes.extend(_rounding_notes(p, rounded))
    max_qty: int | None = None
    if s.quote is not None:
        if p.side == Side.BUY:
            entry = entry_price_of(p, s)
            max_qty = max_entry_quantity(entry, s, lim) if entry is not None else 0
        else:
            max_qty = hkex.floor_to_lots(sellable_quantity(s, p.symbol), s.quote.lot_size)
    return Verdict(allowed=not failures, failures=failures, notes=notes, max_quantity=max_qty, rounded=rounded)


def matching_approval(p: TradeProposal, s: RiskState, lim: RiskSettings) -> Approval | None:
    """The approval (latest first) that covers ``p``: same symbol and side, quantity ≤ approved, the same
    tick-rounded stop (a buy), entry within approval_price_tolerance_pct of the approved entry."""
    entry = entry_price_of(p, s)
    tolerance = _dec(lim.approval_price_tolerance_pct)
    stop = round_price(p.stop_loss, Side.BUY, s) if p.stop_loss is not None else None
    for a in reversed(s.approvals):
        if a.symbol != p.symbol or a.side != p.side or p.quantity > a.quantity:
            continue
        if p.side == Side.BUY and (stop is None or stop != a.stop_loss):
            continue
        if entry is None or abs(entry - a.entry_price) > a.entry_price * tolerance:
            continue
        return a
    return None


def rule_approved_earlier(p: TradeProposal, s: RiskState, lim: RiskSettings) -> RuleFailure | None:
    """Rule 2: execute_trade needs an approved check_risk for the same symbol/side, ≤ qty, same stop, near entry."""
    if matching_approval(p, s, lim) is not None:
        return None
    same = [a for a in s.approvals if a.symbol == p.symbol and a.side == p.side]
    if not same:
        return RuleFailure(
            rule="check_risk_first",
            message=f"call check_risk for this {p.side.value} of {p.symbol} first; it must approve the trade",
        )
    a = same[-1]
    entry = entry_price_of(p, s)
    stop = round_price(p.stop_loss, Side.BUY, s) if p.stop_loss is not None else None
    return RuleFailure(
        rule="check_risk_first",
        message=(
            f"differs from the approved trade (approved {a.quantity} @ {a.entry_price} stop {a.stop_loss}; "
            f"got {p.quantity} @ {entry} stop {stop}): quantity may not exceed, stop must match, "
            f"entry within {_dec(lim.approval_price_tolerance_pct):.2%}; call check_risk again"
        ),
    )


def evaluate_execute(p: TradeProposal, s: RiskState, lim: RiskSettings) -> Verdict:
    """``execute_trade``: the full rule set plus rule 2 (approved by check_risk earlier in the cycle)."""
    verdict = evaluate_trade(p, s, lim)
    approval = rule_approved_earlier(p, s, lim)
    if approval is None:
        return verdict
    return verdict.model_copy(update={"allowed": False, "failures": [approval, *verdict.failures]})


def approval_from(p: TradeProposal, s: RiskState) -> Approval:
    """The approval a passing ``check_risk`` grants, on tick-rounded prices (call it only when allowed)."""
    entry = entry_price_of(p, s) or Decimal(0)
    stop, target = _protective_prices(p, s)
    return Approval(
        symbol=p.symbol,
        side=p.side,
        quantity=p.quantity,
        entry_price=entry,
        stop_loss=stop if stop is not None else Decimal(0),
        take_profit=target,
    )


def evaluate_close(symbol: str, s: RiskState, lim: RiskSettings) -> Verdict:
    """``close_position``: in continuous trading, a long that exists, at the market, whole lots only.

    Judged for the whole-lot part of the sellable quantity (``max_quantity``); odd-lot shares cannot be
    sold on the board-lot market and are named in a note. Halts never block it.
    """
    held = s.positions.get(symbol)
    if held is None or held.quantity <= 0:
        return Verdict(
            allowed=False,
            failures=[RuleFailure(rule="no_position", message=f"no open position in {symbol}; nothing to close")],
        )
    available = sellable_quantity(s, symbol)
    lot = s.quote.lot_size if s.quote is not None else 1
    whole = hkex.floor_to_lots(available, lot)
    p = TradeProposal(
        symbol=symbol, side=Side.SELL, quantity=whole or available or held.quantity, order_type="market",
        entry_price=None, stop_loss=None, take_profit=None,
    )  # fmt: skip
    verdict = evaluate_trade(p, s, lim)
    notes = list(verdict.notes)
    if whole and available > whole:
        notes.append(f"{available - whole} odd-lot share(s) of {symbol} stay: they trade only on the odd-lot market")
    if available < held.quantity:
        notes.append(f"{held.quantity - available} share(s) are already in open sell orders")
    return verdict.model_copy(update={"notes": notes})


def evaluate_close_all(s: RiskState, lim: RiskSettings) -> Verdict:
    """``close_all``: allowed in continuous trading, even when halted (exits are never blocked by a halt)."""
    if not s.is_continuous or not _is_continuous_clock(s.now):
        return Verdict(
            allowed=False,
            failures=[
                RuleFailure(
                    rule="trading_hours",
                    message=(
                        f"market is not in continuous trading at {s.now.astimezone(HKT):%a %H:%M} HKT "
                        f"({s.market_description or 'closed'}); positions can be closed from the next session"
                    ),
                )
            ],
        )
    return ALLOWED


def evaluate_alert(subject: str, message: str, s: RiskState, lim: RiskSettings) -> Verdict:
    """Rule 17: at most max_alerts_per_cycle alerts per cycle, each at most max_alert_chars (subject + body)."""
    failures = []
    if s.alerts_this_cycle >= lim.max_alerts_per_cycle:
        failures.append(
            RuleFailure(
                rule="alert_budget",
                message=f"{s.alerts_this_cycle} alerts sent this cycle already (max {lim.max_alerts_per_cycle})",
            )
        )
    size = len(subject) + len(message)
    if size > lim.max_alert_chars:
        failures.append(
            RuleFailure(
                rule="alert_size",
                message=f"alert is {size} characters (subject + message); the maximum is {lim.max_alert_chars}",
            )
        )
    return Verdict(allowed=not failures, failures=failures)


# ------------------------------------------------------------------------------------------- guard


def in_flatten_window(status: Any, lim: RiskSettings) -> bool:
    """Continuous trading in the day's last session with ``flatten_minutes_before_close`` or less to go: the
    time to be flat, and for no entry to be working (unfilled orders would carry into the closing auction)."""
    if not status.is_continuous or status.minutes_to_close is None:
        return False
    last_session = status.phase == "afternoon" or (status.is_half_day and status.phase == "morning")
    return last_session and status.minutes_to_close <= lim.flatten_minutes_before_close


def guard_exits(
    positions: dict[str, Position],
    stops: dict[str, Any],
    quotes: dict[str, Quote],
    status: Any,
    lim: RiskSettings,
) -> list[tuple[str, str]]:
    """The exits the guard must make now: (symbol, reason), in symbol order. Pure: the caller executes.

    ``stops`` rows have ``stop_loss`` / ``take_profit`` (``data.database.StopRow``); ``status`` is a
    ``data.market.MarketStatus``. In continuous trading only. Per position, first match wins:
    stop hit (last ≤ stop), take profit reached (last ≥ target), flatten before the day's last close
    (afternoon, or the morning of a half day; ≤ flatten_minutes_before_close left), and the time stop
    before lunch (a full day's morning, ≤ time_stop_minutes_before_lunch left, |last − cost| / cost below
    flat_threshold_pct). A missing or zero quote falls back to the position's last price; with no valid
    price at all only the time-based exits apply (a zero price must never trigger a stop).
    """
    exits: list[tuple[str, str]] = []
    if not status.is_continuous:
        return exits
    minutes_left = status.minutes_to_close if status.minutes_to_close is not None else float("inf")
    flatten_now = in_flatten_window(status, lim)
    for symbol, position in sorted(positions.items()):
        if position.quantity <= 0:
            continue
        quote = quotes.get(symbol)
        last = quote.last_price if quote is not None and quote.last_price > 0 else position.last_price
        has_price = last > 0
        stop = stops.get(symbol)
        if has_price and stop is not None and stop.stop_loss is not None and last <= stop.stop_loss:
            exits.append((symbol, f"stop loss {stop.stop_loss} hit (last {last})"))
            continue
        if has_price and stop is not None and stop.take_profit is not None and last >= stop.take_profit:
            exits.append((symbol, f"take profit {stop.take_profit} reached (last {last})"))
            continue
        if lim.flatten_before_close and flatten_now:
            exits.append((symbol, f"flatten before the close ({minutes_left:.1f} min left; no overnight positions)"))
            continue
        if (
            lim.time_stop_before_lunch
            and has_price
            and status.phase == "morning"
            and not status.is_half_day
            and minutes_left <= lim.time_stop_minutes_before_lunch
            and position.avg_cost > 0
        ):
            move = abs(last - position.avg_cost) / position.avg_cost
            if move < _dec(lim.flat_threshold_pct):
                exits.append((symbol, f"time stop: flat ({move:.2%} from cost {position.avg_cost}) before lunch"))
    return exits


# ------------------------------------------------------------------------------------ cycle budgets


class CycleUsage(_Frozen):
    """What a cycle has spent so far (rule 16)."""

    iterations: int = 0
    tool_calls: int = 0
    input_tokens: int = 0  # all input: uncached + cache reads + cache writes
    cost_usd_today: float = 0.0


def budget_breach(u: CycleUsage, limits: ClaudeSettings) -> str | None:
    """The reason the loop must stop now, or None. Checked before every model call: a budget that is used
    up (spent ≥ limit) stops the loop, since the next call could only go past it."""
    if u.iterations >= limits.max_iterations:
        return f"iteration budget reached ({u.iterations}/{limits.max_iterations})"
    if u.tool_calls >= limits.max_tool_calls:
        return f"tool-call budget reached ({u.tool_calls}/{limits.max_tool_calls})"
    if u.input_tokens >= limits.max_input_tokens_per_cycle:
        return f"input-token budget reached ({u.input_tokens}/{limits.max_input_tokens_per_cycle})"
    if u.cost_usd_today >= limits.max_cost_usd_per_day:
        return f"daily cost budget reached (${u.cost_usd_today:.2f}/${limits.max_cost_usd_per_day:.2f})"
    return None


__all__ = [
    "Approval",
    "CycleUsage",
    "RiskState",
    "RuleFailure",
    "TradeProposal",
    "Verdict",
    "approval_from",
    "budget_breach",
    "daily_pnl_pct",
    "evaluate_alert",
    "evaluate_close",
    "evaluate_close_all",
    "evaluate_execute",
    "evaluate_trade",
    "guard_exits",
    "matching_approval",
    "max_entry_quantity",
    "risk_mode",
    "sellable_quantity",
]
