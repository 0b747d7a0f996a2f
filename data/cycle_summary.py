"""The cycle summary journalled in ``cycles.summary``: facts from code first, then the brain's own words.

The model's last text can claim what did not happen (a position after a refused ``execute_trade``). The
summary therefore starts with what the journal and the broker say — orders placed, filled and refused, the
positions and their stops after the cycle — and only then quotes the brain, marked as its own words. The report
and the digest read this text; it is plain text (the model's words are untrusted data, never markup).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import structlog

from brokers.base import OrderStatus, Position
from data.database import OrderRow, StopRow, ToolCallRow

if TYPE_CHECKING:
    from tool_executor import CycleContext

log = structlog.get_logger()

TRADE_TOOLS = frozenset({"execute_trade", "close_position", "close_all"})
MAX_ITEMS = 8  # per list; the rest are counted, not named
MAX_REASON_CHARS = 160
MAX_NOTE_CHARS = 1200

_ORDER_STATE: dict[OrderStatus, str] = {
    OrderStatus.PENDING: "not confirmed by the broker",
    OrderStatus.SUBMITTED: "working",
    OrderStatus.PARTIALLY_FILLED: "partially filled",
    OrderStatus.FILLED: "filled",
    OrderStatus.CANCELLED: "cancelled",
    OrderStatus.UNKNOWN: "fate unknown (entries blocked until reconciled)",
}


def _num(value: Decimal) -> str:
    return format(value.normalize(), "f")


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _listed(items: list[str]) -> str:
    shown = "; ".join(items[:MAX_ITEMS])
    return shown + (f"; and {len(items) - MAX_ITEMS} more" if len(items) > MAX_ITEMS else "")


def _order_text(order: OrderRow) -> str:
    price = f" @ {_num(order.limit_price)}" if order.limit_price is not None else f" {order.order_type.value}"
    state = _ORDER_STATE.get(order.status, "")
    text = f"{order.side.value.upper()} {order.quantity} {order.symbol}{price}" + (f": {state}" if state else "")
    if order.filled_quantity and order.avg_fill_price is not None:
        text += f" {order.filled_quantity} @ {_num(order.avg_fill_price)}"
    return text


def _call_text(call: ToolCallRow) -> str:
    """``execute_trade BUY 100 700`` from the call's input as the model wrote it."""
    args = call.input if isinstance(call.input, dict) else {}
    parts = [call.name]
    if args.get("side"):
        parts.append(str(args["side"]).upper())
    if args.get("quantity") is not None:
        parts.append(str(args["quantity"]))
    if args.get("symbol"):
        parts.append(str(args["symbol"]))
    return " ".join(parts)


def _failure_reason(call: ToolCallRow) -> str:
    if not call.allowed:
        return f"refused: {call.reason or 'no reason recorded'}"
    error = call.result.get("error") if isinstance(call.result, dict) else None
    return f"failed: {error or call.reason or 'no reason recorded'}"


def _position_text(position: Position, stop: StopRow | None) -> str:
    text = f"{position.symbol} {position.quantity} @ {_num(position.avg_cost)}"
    if stop is None:
        return text + " (no stop on record)"
    guard = ", broker-side stop" if stop.broker_stop_order_id else ""
    target = f", take-profit {_num(stop.take_profit)}" if stop.take_profit is not None else ""
    return text + f" (stop {_num(stop.stop_loss)}{target}{guard})"


def compose_summary(
    *,
    orders: Sequence[OrderRow],
    calls: Sequence[ToolCallRow],
    positions: Mapping[str, Position] | None,
    stops: Mapping[str, StopRow],
    note: str,
    note_label: str = "Model's note",
    stopped_by: str = "end_turn",
    positions_error: str | None = None,
) -> str:
    """The summary text from the cycle's journalled orders and trade tool calls and the positions after it.

    ``positions`` None means they could not be read (``positions_error`` says why). Pure: no I/O.
    """
    facts: list[str] = []
    if stopped_by != "end_turn":
        facts.append(f"[stopped: {stopped_by}]")
    dry = [o for o in orders if o.status is OrderStatus.DRY_RUN]
    placed = [o for o in orders if o.status not in (OrderStatus.DRY_RUN, OrderStatus.REJECTED)]
    filled = [o for o in placed if o.filled_quantity > 0]
    if placed:
        facts.append(
            f"Orders placed: {len(placed)}, filled: {len(filled)} "
            f"({', '.join(sorted({o.symbol for o in filled})) or 'none'}): {_listed([_order_text(o) for o in placed])}."
        )
    else:
        facts.append("No order was placed.")
    if dry:
        facts.append(f"Dry run, journalled but not sent: {len(dry)}: {_listed([_order_text(o) for o in dry])}.")
    refused = [c for c in calls if c.name in TRADE_TOOLS and c.is_error]
    if refused:
        items = [f"{_call_text(c)} {_clip(_failure_reason(c), MAX_REASON_CHARS)}" for c in refused]
        facts.append(f"Refused: {len(refused)}: {_listed(items)}.")
    else:
        facts.append("Refused: none.")
    if positions is None:
        facts.append(f"Positions after the cycle: not read ({_clip(positions_error or 'unknown error', 160)}).")
    elif positions:
        items = [_position_text(p, stops.get(symbol)) for symbol, p in sorted(positions.items())]
        facts.append(f"Positions after the cycle: {len(positions)}: {_listed(items)}.")
    else:
        facts.append("Positions after the cycle: none.")
    words = _clip(note, MAX_NOTE_CHARS) if note.strip() else "(none)"
    return " ".join(facts) + f" {note_label} (its own words, not checked): {words}"


def summarize_cycle(ctx: CycleContext, *, note: str, stopped_by: str, note_label: str = "Model's note") -> str:
    """Read the cycle's facts (journal, then the broker's positions as they stand now) and compose the summary."""
    journal = ctx.journal
    orders = [o for o in journal.orders_on(ctx.trading_date) if o.cycle_id == ctx.cycle_id]
    calls = journal.tool_calls(ctx.cycle_id) if ctx.cycle_id is not None else []
    positions: dict[str, Any] | None
    error = None
    try:
        positions = dict(ctx.view.positions_now())  # what the broker holds now, not before the cycle acted
    except Exception as exc:  # a summary must not fail the cycle it describes
        positions, error = None, f"{type(exc).__name__}: {exc}"
        log.warning("summary_positions_unread", error=error)
    return compose_summary(
        orders=orders,
        calls=calls,
        positions=positions,
        stops=journal.protective_stops(),
        note=note,
        note_label=note_label,
        stopped_by=stopped_by,
        positions_error=error,
    )
