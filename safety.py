"""The risk gate: pure functions of (tool call, state, limits) → verdict. No I/O, no clock reads.

Every rule of the owner's documents is a small named function returning ``None`` (passed) or a
``RuleFailure`` with the numbers. ``evaluate`` picks the rules for a tool and returns a ``Verdict``.
The caller (``tool_executor.ToolGate``) builds ``RiskState`` from the broker, the market and the journal,
and journals every verdict. Nothing here reads free text (news, names, reasons): rule 18.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from decimal import ROUND_DOWN, Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from brokers import hkex
from brokers.base import Account, Order, Position, Quote, Side
from config.settings import ClaudeSettings, RiskSettings

# --------------------------------------------------------------------------------------------- models


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RuleFailure(_Frozen):
    rule: str
    message: str


class Approval(_Frozen):
    """A ``check_risk`` that approved a trade earlier in this cycle."""

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
    entry_price: Decimal | None  # limit price, or None for a market order (the last price is used)
    stop_loss: Decimal | None
    take_profit: Decimal | None


class RiskState(_Frozen):
    """Everything the rules may look at, gathered by the caller for one tool call."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    now: datetime
    is_continuous: bool
    minutes_to_close: float | None = None
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

# ------------------------------------------------------------------------------------- risk figures


def daily_pnl_pct(state: RiskState) -> float | None:
    """Equity now vs the start-of-day snapshot, as a fraction (−0.02 = down 2 %)."""
    base = state.start_of_day_equity
    if base is None or base <= 0:
        return None
    return float((state.account.equity - base) / base)


def risk_mode(state: RiskState, limits: RiskSettings) -> Literal["normal", "warning", "halted"]:
    """Daily-loss mode: rule 13 (warning) and rule 14 (halted)."""
    pnl = daily_pnl_pct(state)
    if pnl is not None and pnl <= -limits.max_daily_loss_pct:
        return "halted"
    if pnl is not None and pnl <= -limits.warning_loss_pct:
        return "warning"
    return "normal"


def position_cap_pct(state: RiskState, limits: RiskSettings) -> float:
    """Max share of equity per position; halved in warning mode (rule 13)."""
    cap = limits.max_position_pct
    return cap / 2 if risk_mode(state, limits) == "warning" else cap


def entry_price_of(proposal: TradeProposal, state: RiskState) -> Decimal | None:
    """The price an entry is judged at: the limit, rounded by side, or the last price for a market order."""
    if proposal.order_type == "market" or proposal.entry_price is None:
        if state.quote is None:
            return None
        return state.quote.ask_price or state.quote.last_price
    return round_price(proposal.entry_price, proposal.side, state)


def round_price(price: Decimal, side: Side, state: RiskState) -> Decimal:
    tick = state.quote.price_spread if state.quote is not None else None
    return hkex.round_to_tick(price, side, state.now.date(), tick=tick)


def _floor_lots(quantity_float: Decimal, lot: int) -> int:
    if quantity_float <= 0:
        return 0
    return int((quantity_float / lot).to_integral_value(rounding=ROUND_DOWN)) * lot


def max_entry_quantity(price: Decimal, state: RiskState, limits: RiskSettings) -> int:
    """The largest whole-lot buy the position cap, the order cap and the cash allow."""
    if state.quote is None or price <= 0:
        return 0
    lot = state.quote.lot_size
    held = state.positions.get(state.quote.symbol)
    held_value = (held.quantity * price) if held else Decimal(0)
    cap_value = state.account.equity * Decimal(str(position_cap_pct(state, limits))) - held_value
    # Leave room for costs (stamp duty 0.1 %, fees, commission): 0.5 % is ample.
    cash_value = state.account.cash / Decimal("1.005")
    limit_value = min(cap_value, cash_value, limits.max_order_value_hkd)
    return _floor_lots(limit_value / price, lot)


# ------------------------------------------------------------------------------------------- rules
# Each takes (proposal, state, limits) and returns a failure or None. Names are journalled.

Rule = Callable[[TradeProposal, RiskState, RiskSettings], "RuleFailure | None"]


def rule_trading_hours(p: TradeProposal, s: RiskState, lim: RiskSettings) -> RuleFailure | None:
    """Rule 1: orders only in continuous trading; no new entries close to a session's end."""
    if not s.is_continuous:
        return RuleFailure(
            rule="trading_hours",
            message=f"market is not in continuous trading at {s.now:%H:%M} HKT ({s.market_description or 'closed'})",
        )
    is_entry = p.side == Side.BUY
    if is_entry and s.minutes_to_close is not None and s.minutes_to_close < lim.no_entry_minutes_before_close:
        return RuleFailure(
            rule="trading_hours",
            message=(
                f"no new entries in the last {lim.no_entry_minutes_before_close} min of a session "
                f"({s.minutes_to_close:.0f} min left)"
            ),
        )
    return None


def rule_symbol_tradable(p: TradeProposal, s: RiskState, lim: RiskSettings) -> RuleFailure | None:
    """Rule 11: the symbol exists, is an HK equity and is not suspended."""
    q = s.quote
    if q is None:
        return RuleFailure(rule="symbol", message=f"{p.symbol} is not a known HKEX security")
    if not q.is_equity:
        return RuleFailure(rule="symbol", message=f"{p.symbol} is not an equity")
    if q.suspended:
        return RuleFailure(rule="symbol", message=f"{p.symbol} is suspended")
    if q.last_price <= 0:
        return RuleFailure(rule="symbol", message=f"{p.symbol} has no valid last price")
    return None


def rule_stop_loss(p: TradeProposal, s: RiskState, lim: RiskSettings) -> RuleFailure | None:
    """Rule 3: a buy needs stop_loss < entry < take_profit, and the stop no further than max_stop_pct."""
    if p.side != Side.BUY:
        return None
    entry = entry_price_of(p, s)
    if p.stop_loss is None:
        return RuleFailure(rule="stop_loss", message="a stop loss is required on every entry")
    if entry is None:
        return None  # reported by rule_symbol_tradable
    if p.stop_loss >= entry:
        return RuleFailure(rule="stop_loss", message=f"stop {p.stop_loss} must be below the entry {entry} for a buy")
    if p.take_profit is None:
        return RuleFailure(rule="stop_loss", message="a take profit is required on every entry")
    if p.take_profit <= entry:
        return RuleFailure(rule="stop_loss", message=f"take profit {p.take_profit} must be above the entry {entry}")
    distance = (entry - p.stop_loss) / entry
    if distance > Decimal(str(lim.max_stop_pct)):
        return RuleFailure(
            rule="stop_loss",
            message=f"stop is {distance:.2%} below entry; the maximum is {lim.max_stop_pct:.2%}",
        )
    return None


def rule_reward_risk(p: TradeProposal, s: RiskState, lim: RiskSettings) -> RuleFailure | None:
    """Rule 4: (take_profit − entry) / (entry − stop) on tick-rounded prices ≥ min_risk_reward."""
    if p.side != Side.BUY or p.stop_loss is None or p.take_profit is None:
        return None
    entry = entry_price_of(p, s)
    if entry is None:
        return None
    # Conservative rounding: the stop and the target both round down (more risk, less reward).
    stop = round_price(p.stop_loss, Side.BUY, s)
    target = round_price(p.take_profit, Side.BUY, s)
    risk, reward = entry - stop, target - entry
    if risk <= 0 or reward <= 0:
        return None  # rule_stop_loss reports the wrong side
    ratio = reward / risk
    if ratio < Decimal(str(lim.min_risk_reward)):
        return RuleFailure(
            rule="reward_risk",
            message=(
                f"reward:risk is {ratio:.2f} (entry {entry}, stop {stop}, target {target}); "
                f"minimum {lim.min_risk_reward:.2f}"
            ),
        )
    return None


def rule_board_lots(p: TradeProposal, s: RiskState, lim: RiskSettings) -> RuleFailure | None:
    """Rule 5: quantity > 0 and a whole number of the stock's board lots (from the quote)."""
    if p.quantity <= 0:
        return RuleFailure(rule="board_lot", message=f"quantity must be positive, got {p.quantity}")
    if s.quote is None:
        return None
    if not hkex.is_whole_lots(p.quantity, s.quote.lot_size):
        lot = s.quote.lot_size
        return RuleFailure(
            rule="board_lot",
            message=f"{p.quantity} is not a whole number of {lot}-share lots (nearest: {hkex.floor_to_lots(p.quantity, lot)})",
        )
    return None


def rule_position_size(p: TradeProposal, s: RiskState, lim: RiskSettings) -> RuleFailure | None:
    """Rule 6: position value after the order ≤ max_position_pct of equity (halved in warning mode)."""
    if p.side != Side.BUY or s.quote is None:
        return None
    price = entry_price_of(p, s)
    if price is None:
        return None
    held = s.positions.get(p.symbol)
    after = (p.quantity + (held.quantity if held else 0)) * price
    cap_pct = position_cap_pct(s, lim)
    cap = s.account.equity * Decimal(str(cap_pct))
    if after > cap:
        return RuleFailure(
            rule="position_size",
            message=f"position would be HK${after:,.0f}, over {cap_pct:.0%} of equity (HK${cap:,.0f})",
        )
    return None


def rule_max_positions(p: TradeProposal, s: RiskState, lim: RiskSettings) -> RuleFailure | None:
    """Rule 7: open positions + pending entries ≤ max_positions (adding to a holding is not a new one)."""
    if p.side != Side.BUY or p.symbol in s.positions:
        return None
    pending = {o.symbol for o in s.open_orders if o.side == Side.BUY and o.is_active and o.symbol not in s.positions}
    if p.symbol in pending:
        return None
    count = len([pos for pos in s.positions.values() if pos.quantity > 0]) + len(pending)
    if count + 1 > lim.max_positions:
        return RuleFailure(
            rule="max_positions",
            message=f"{count} positions and pending entries already; the maximum is {lim.max_positions}",
        )
    return None


def rule_cash_and_order_value(p: TradeProposal, s: RiskState, lim: RiskSettings) -> RuleFailure | None:
    """Rule 8: cash covers value + costs, and the order value ≤ max_order_value_hkd."""
    if p.side != Side.BUY:
        return None
    price = entry_price_of(p, s)
    if price is None:
        return None
    value = p.quantity * price
    if value > lim.max_order_value_hkd:
        return RuleFailure(
            rule="order_value",
            message=f"order value HK${value:,.0f} is over the HK${lim.max_order_value_hkd:,.0f} limit",
        )
    costs = hkex.trading_costs(value, s.commission_pct, s.min_commission_hkd).total
    if value + costs > s.account.cash:
        return RuleFailure(
            rule="cash",
            message=f"needs HK${value + costs:,.2f} incl. costs; cash is HK${s.account.cash:,.2f}",
        )
    return None


def rule_daily_trades(p: TradeProposal, s: RiskState, lim: RiskSettings) -> RuleFailure | None:
    """Rule 9: trades today (all cycles, dry runs excluded) ≤ max_daily_trades, for entries."""
    if p.side == Side.BUY and s.trades_today >= lim.max_daily_trades:
        return RuleFailure(
            rule="daily_trades",
            message=f"{s.trades_today} trades today; the maximum is {lim.max_daily_trades}",
        )
    return None


def rule_limit_price(p: TradeProposal, s: RiskState, lim: RiskSettings) -> RuleFailure | None:
    """Rule 10: a limit order needs a price within max_price_deviation_pct of the last price."""
    if p.order_type == "market":
        return None
    if p.entry_price is None:
        return RuleFailure(rule="limit_price", message="a limit order needs limit_price")
    if s.quote is None:
        return None
    last = s.quote.last_price
    deviation = abs(p.entry_price - last) / last
    if deviation > Decimal(str(lim.max_price_deviation_pct)):
        return RuleFailure(
            rule="limit_price",
            message=(
                f"limit {p.entry_price} is {deviation:.1%} from the last price {last}; "
                f"the maximum is {lim.max_price_deviation_pct:.1%}"
            ),
        )
    return None


def rule_no_short(p: TradeProposal, s: RiskState, lim: RiskSettings) -> RuleFailure | None:
    """Rule 12: a sell only reduces an existing long, up to its sellable quantity."""
    if p.side != Side.SELL:
        return None
    held = s.positions.get(p.symbol)
    sellable = held.sellable_quantity if held else 0
    reserved = sum(
        o.quantity - o.filled_quantity
        for o in s.open_orders
        if o.symbol == p.symbol and o.side == Side.SELL and o.is_active
    )
    available = max(sellable - reserved, 0)
    if p.quantity > available:
        return RuleFailure(
            rule="no_short",
            message=f"selling {p.quantity} {p.symbol} but only {available} are held and sellable; no shorting",
        )
    return None


def rule_not_halted(p: TradeProposal, s: RiskState, lim: RiskSettings) -> RuleFailure | None:
    """Rules 14 and 15: a halt (daily loss, kill switch, unresolved order) blocks entries; exits stay allowed."""
    if p.side != Side.BUY:
        return None
    if s.halt_reason:
        return RuleFailure(rule="halted", message=f"entries are blocked: {s.halt_reason}")
    if risk_mode(s, lim) == "halted":
        pnl = daily_pnl_pct(s) or 0.0
        return RuleFailure(
            rule="daily_loss_limit",
            message=f"daily P&L {pnl:.2%} is past the −{lim.max_daily_loss_pct:.1%} limit; entries are blocked",
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
    rule_cash_and_order_value,
    rule_daily_trades,
)
EXIT_RULES: tuple[Rule, ...] = (rule_trading_hours, rule_symbol_tradable, rule_board_lots, rule_no_short)


def _rounded_prices(p: TradeProposal, s: RiskState) -> dict[str, str]:
    if s.quote is None:
        return {}
    out: dict[str, str] = {}
    entry = entry_price_of(p, s)
    if entry is not None:
        out["entry_price"] = str(entry)
    stop_side = Side.BUY if p.side == Side.BUY else Side.SELL
    if p.stop_loss is not None:
        out["stop_loss"] = str(round_price(p.stop_loss, stop_side, s))
    if p.take_profit is not None:
        out["take_profit"] = str(round_price(p.take_profit, stop_side, s))
    return out


def evaluate_trade(p: TradeProposal, s: RiskState, lim: RiskSettings) -> Verdict:
    """Run every rule for a buy (entry) or a sell (exit) and collect all failures, not just the first."""
    rules = ENTRY_RULES if p.side == Side.BUY else EXIT_RULES
    failures = [f for rule in rules if (f := rule(p, s, lim)) is not None]
    notes: list[str] = []
    mode = risk_mode(s, lim)
    if mode == "warning" and p.side == Side.BUY:
        notes.append(f"warning mode: daily loss past {lim.warning_loss_pct:.1%}, position cap halved")
    rounded = _rounded_prices(p, s)
    if p.entry_price is not None and "entry_price" in rounded and Decimal(rounded["entry_price"]) != p.entry_price:
        notes.append(f"entry {p.entry_price} rounded to the tick grid: {rounded['entry_price']}")
    max_qty: int | None = None
    if s.quote is not None:
        if p.side == Side.BUY:
            entry = entry_price_of(p, s)
            max_qty = max_entry_quantity(entry, s, lim) if entry is not None else None
        else:
            held = s.positions.get(p.symbol)
            max_qty = held.sellable_quantity if held else 0
    return Verdict(allowed=not failures, failures=failures, notes=notes, max_quantity=max_qty, rounded=rounded)


def rule_approved_earlier(p: TradeProposal, s: RiskState, lim: RiskSettings) -> RuleFailure | None:
    """Rule 2: execute_trade needs an approved check_risk for the same symbol/side, ≤ qty, same stop, near entry."""
    entry = entry_price_of(p, s)
    tolerance = Decimal(str(lim.approval_price_tolerance_pct))
    for a in s.approvals:
        if a.symbol != p.symbol or a.side != p.side or p.quantity > a.quantity:
            continue
        if p.side == Side.BUY and (p.stop_loss is None or a.stop_loss != round_price(p.stop_loss, Side.BUY, s)):
            continue
        if entry is not None and abs(entry - a.entry_price) > a.entry_price * tolerance:
            continue
        return None
    same = [a for a in s.approvals if a.symbol == p.symbol and a.side == p.side]
    if not same:
        return RuleFailure(
            rule="check_risk_first",
            message=f"call check_risk for this {p.side.value} of {p.symbol} first; it must approve the trade",
        )
    a = same[-1]
    return RuleFailure(
        rule="check_risk_first",
        message=(
            f"differs from the approved trade (approved {a.quantity} @ {a.entry_price} stop {a.stop_loss}; "
            f"got {p.quantity} @ {entry} stop {p.stop_loss}): quantity may not exceed, stop must match, "
            f"entry within {lim.approval_price_tolerance_pct:.1%}"
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
    """The approval a passing ``check_risk`` grants, on tick-rounded prices."""
    entry = entry_price_of(p, s) or Decimal(0)
    stop = round_price(p.stop_loss, Side.BUY, s) if p.stop_loss is not None else Decimal(0)
    target = round_price(p.take_profit, Side.BUY, s) if p.take_profit is not None else None
    return Approval(
        symbol=p.symbol, side=p.side, quantity=p.quantity, entry_price=entry, stop_loss=stop, take_profit=target
    )


def evaluate_close(symbol: str, s: RiskState, lim: RiskSettings) -> Verdict:
    """``close_position``: in continuous trading, and only a long that exists."""
    held = s.positions.get(symbol)
    if held is None or held.quantity <= 0:
        return Verdict(
            allowed=False, failures=[RuleFailure(rule="no_position", message=f"no open position in {symbol}")]
        )
    p = TradeProposal(
        symbol=symbol, side=Side.SELL, quantity=held.sellable_quantity or held.quantity, order_type="market",
        entry_price=None, stop_loss=None, take_profit=None,
    )  # fmt: skip
    return evaluate_trade(p, s, lim)


def evaluate_close_all(s: RiskState, lim: RiskSettings) -> Verdict:
    """``close_all``: allowed in continuous trading, even when halted."""
    if not s.is_continuous:
        return Verdict(
            allowed=False,
            failures=[
                RuleFailure(rule="trading_hours", message=f"market is not in continuous trading at {s.now:%H:%M} HKT")
            ],
        )
    return ALLOWED


def evaluate_alert(subject: str, message: str, s: RiskState, lim: RiskSettings) -> Verdict:
    """Rule 17: alerts bounded in size and count per cycle."""
    failures = []
    if s.alerts_this_cycle >= lim.max_alerts_per_cycle:
        failures.append(
            RuleFailure(
                rule="alert_budget",
                message=f"{s.alerts_this_cycle} alerts sent this cycle (max {lim.max_alerts_per_cycle})",
            )
        )
    size = len(subject) + len(message)
    if size > lim.max_alert_chars:
        failures.append(
            RuleFailure(rule="alert_size", message=f"alert is {size} characters (max {lim.max_alert_chars})")
        )
    return Verdict(allowed=not failures, failures=failures)


# ------------------------------------------------------------------------------------------- guard


def guard_exits(
    positions: dict[str, Position],
    stops: dict[str, Any],
    quotes: dict[str, Quote],
    status: Any,
    lim: RiskSettings,
) -> list[tuple[str, str]]:
    """The exits the guard must make now: (symbol, reason). ``stops`` rows have stop_loss / take_profit /
    entry_price; ``status`` is a ``data.market.MarketStatus``. Pure: the caller executes."""
    exits: list[tuple[str, str]] = []
    if not status.is_continuous:
        return exits
    minutes_left = status.minutes_to_close if status.minutes_to_close is not None else float("inf")
    last_session = status.phase == "afternoon" or (status.is_half_day and status.phase == "morning")
    for symbol, position in sorted(positions.items()):
        if position.quantity <= 0:
            continue
        quote = quotes.get(symbol)
        last = quote.last_price if quote is not None else position.last_price
        stop = stops.get(symbol)
        if stop is not None and last <= stop.stop_loss:
            exits.append((symbol, f"stop loss {stop.stop_loss} hit (last {last})"))
            continue
        if stop is not None and stop.take_profit is not None and last >= stop.take_profit:
            exits.append((symbol, f"take profit {stop.take_profit} reached (last {last})"))
            continue
        if lim.flatten_before_close and last_session and minutes_left <= lim.flatten_minutes_before_close:
            exits.append((symbol, f"flatten before the close ({minutes_left:.0f} min left)"))
            continue
        if lim.time_stop_before_lunch and status.phase == "morning" and not status.is_half_day:
            if minutes_left <= lim.time_stop_minutes_before_lunch and position.avg_cost > 0:
                move = abs(last - position.avg_cost) / position.avg_cost
                if move < Decimal(str(lim.flat_threshold_pct)):
                    exits.append((symbol, f"time stop: flat ({move:.2%}) before lunch"))
    return exits


# ------------------------------------------------------------------------------------ cycle budgets


class CycleUsage(_Frozen):
    """What a cycle has spent so far (rule 16)."""

    iterations: int = 0
    tool_calls: int = 0
    input_tokens: int = 0  # all input: uncached + cache reads + cache writes
    cost_usd_today: float = 0.0


def budget_breach(u: CycleUsage, limits: ClaudeSettings) -> str | None:
    """The reason the loop must stop now, or None. Checked before every model call."""
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
    "max_entry_quantity",
    "risk_mode",
]
