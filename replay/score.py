"""The score of a replay: metrics, the equity series and every round trip; a console table and the JSON file.

Computed after the run from the replay broker's fills and the run's own journal (orders for stops and exit
reasons, decisions for the reasoning). The benchmark reads the whole period's bars: it is scored after the
fact and feeds no decision.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

from brokers.base import Side
from config.settings import Settings
from replay.feed import BarStore

TRADING_DAYS_PER_YEAR = 252


@dataclass
class Trade:
    symbol: str
    quantity: int
    entry_time: Any
    entry_price: Decimal
    exit_time: Any | None
    exit_price: Decimal | None
    pnl_hkd: Decimal
    r_multiple: float | None
    exit_reason: str
    reasoning: str


@dataclass
class Report:
    run_id: int
    first: date
    last: date
    brain: str
    feed: str
    in_sample_for_model: bool
    metrics: dict[str, Any]
    equity: list[dict[str, Any]]
    trades: list[Trade] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    benchmark_label: str = ""  # what the benchmark return is of (kept in the run's register for --report)


def in_sample(settings: Settings, brain: str, first: date) -> bool:
    """Whether the model may have seen some of these days in training: a Claude replay that starts on or before
    its model's ``claude.knowledge_cutoff`` (no configured cutoff counts as in-sample). Rules learned nothing."""
    if brain != "claude":
        return False
    cutoff = settings.claude.knowledge_cutoff.get(settings.claude.model)
    return cutoff is None or first <= cutoff


def benchmark_return(store: BarStore, first: date, last: date, symbol: str) -> tuple[float | None, str]:
    """Buy at the first day's open, sell at the last day's close: ``symbol`` if the data has it, else equal weight."""
    from replay.feed import sessions_between

    days = sessions_between(first, last)

    def one(s: str) -> float | None:
        start = store.daily(s, days[0])
        end = store.daily(s, days[-1])
        if start is None or end is None or start.open <= 0:
            return None
        return end.close / start.open - 1.0

    if symbol in store.instruments():
        value = one(symbol)
        if value is not None:
            return value, f"{symbol} buy-and-hold"
    values = [v for s, info in store.instruments().items() if info.is_equity and (v := one(s)) is not None]
    if not values:
        return None, "no benchmark data"
    return sum(values) / len(values), f"equal-weight buy-and-hold of {len(values)} symbols"


def round_trips(run: Any) -> list[Trade]:
    """FIFO round trips from the replay broker's fills: a trip opens when a position opens and closes when flat."""
    journal = run.journal.journal
    orders: dict[str, Any] = {}
    for day, _equity in run.closes:
        for row in journal.orders_on(day):
            orders[row.client_order_id] = row
    reasoning_of: dict[int, str] = {}

    def reasoning(cycle: int | None) -> str:
        """The last decision's reasoning of the cycle that opened a trade (read once per cycle)."""
        if cycle is None:
            return ""
        if cycle not in reasoning_of:
            decisions = journal.decisions(cycle)
            reasoning_of[cycle] = decisions[-1].reasoning if decisions else ""
        return reasoning_of[cycle]

    trades: list[Trade] = []
    open_trips: dict[str, dict[str, Any]] = {}
    for fill in run.broker.state.fills:
        row = orders.get(fill.client_order_id or "")
        trip = open_trips.get(fill.symbol)
        if fill.side is Side.BUY:
            if trip is None:
                trip = open_trips[fill.symbol] = {
                    "quantity": 0, "cost": Decimal(0), "fees": Decimal(0), "time": fill.time, "stop": None,
                    "sold": 0, "proceeds": Decimal(0), "cycle": None,
                }  # fmt: skip
                if row is not None:
                    trip["stop"], trip["cycle"] = row.stop_loss, row.cycle_id
            trip["quantity"] += fill.quantity
            trip["cost"] += fill.price * fill.quantity
            trip["fees"] += fill.costs
            continue
        if trip is None:
            continue  # a sell of something the replay never bought cannot happen (long only): nothing to pair
        trip["sold"] += fill.quantity
        trip["proceeds"] += fill.price * fill.quantity
        trip["fees"] += fill.costs
        if trip["sold"] < trip["quantity"]:
            continue
        del open_trips[fill.symbol]
        quantity = trip["quantity"]
        entry = (trip["cost"] / quantity).quantize(Decimal("0.001"))
        exit_price = (trip["proceeds"] / quantity).quantize(Decimal("0.001"))
        pnl = (trip["proceeds"] - trip["cost"] - trip["fees"]).quantize(Decimal("0.01"))
        risk = (entry - trip["stop"]) * quantity if trip["stop"] is not None and trip["stop"] < entry else None
        cycle = trip["cycle"]
        trades.append(
            Trade(
                symbol=fill.symbol,
                quantity=quantity,
                entry_time=trip["time"],
                entry_price=entry,
                exit_time=fill.time,
                exit_price=exit_price,
                pnl_hkd=pnl,
                r_multiple=round(float(pnl / risk), 3) if risk else None,
                exit_reason=(row.reason or "") if row is not None else "",
                reasoning=reasoning(cycle),
            )
        )
    for symbol, trip in open_trips.items():  # still held when the replay ended: marked at the last price
        held = trip["quantity"] - trip["sold"]
        last = run.broker.feed.last_price(symbol) or Decimal(0)
        entry = (trip["cost"] / trip["quantity"]).quantize(Decimal("0.001"))
        pnl = (trip["proceeds"] + last * held - trip["cost"] - trip["fees"]).quantize(Decimal("0.01"))
        cycle = trip["cycle"]
        trades.append(
            Trade(
                symbol=symbol,
                quantity=trip["quantity"],
                entry_time=trip["time"],
                entry_price=entry,
                exit_time=None,
                exit_price=None,
                pnl_hkd=pnl,
                r_multiple=None,
                exit_reason=f"open at the end of the replay ({held} shares marked at {last})",
                reasoning=reasoning(cycle),
            )
        )
    return trades


def _max_drawdown(values: list[float]) -> float:
    peak, worst = -math.inf, 0.0
    for value in values:
        peak = max(peak, value)
        if peak > 0:
            worst = max(worst, (peak - value) / peak)
    return worst


def _sharpe(daily: list[float]) -> float | None:
    if len(daily) < 2:
        return None
    mean = sum(daily) / len(daily)
    var = sum((r - mean) ** 2 for r in daily) / (len(daily) - 1)
    if var <= 0:
        return None
    return mean / math.sqrt(var) * math.sqrt(TRADING_DAYS_PER_YEAR)


def blocked_by_rule(run: Any) -> dict[str, int]:
    """Refused tool calls of the run, counted per safety rule (or per refusal reason when no rule is named)."""
    counts: dict[str, int] = {}
    for cycle_id in run.cycles:
        for call in run.journal.journal.tool_calls(cycle_id):
            if call.allowed:
                continue
            rules = [f.get("rule") for f in (call.result or {}).get("failed_rules", []) if isinstance(f, dict)]
            for rule in rules or [(call.reason or "refused").split(":")[0]]:
                counts[rule] = counts.get(rule, 0) + 1
    return dict(sorted(counts.items()))


def usage(run: Any) -> tuple[int, int, float]:
    """Model tokens in, out, and dollars of the run's trading cycles."""
    tokens_in = tokens_out = 0
    cost = 0.0
    for cycle_id in run.cycles:
        row = run.journal.journal.get_cycle(cycle_id)
        if row is not None:
            tokens_in += row.input_tokens + row.cache_read_tokens + row.cache_write_tokens
            tokens_out += row.output_tokens
            cost += float(row.cost_usd)
    return tokens_in, tokens_out, cost


def score_run(run: Any, store: BarStore, options: Any, settings: Settings) -> Report:
    start = float(run.starting_cash)
    marks = [float(e) for _t, e, _mv in run.equity]
    final = marks[-1] if marks else start
    total = final / start - 1.0
    bench, bench_label = benchmark_return(store, options.first, options.last, settings.replay.benchmark)
    closes = [start] + [float(e) for _d, e in run.closes]
    daily = [b / a - 1.0 for a, b in itertools.pairwise(closes) if a > 0]
    trades = round_trips(run)
    closed = [t for t in trades if t.exit_time is not None]  # the round trips; open ones are listed, not scored
    wins = [float(t.pnl_hkd) for t in closed if t.pnl_hkd > 0]
    losses = [float(t.pnl_hkd) for t in closed if t.pnl_hkd <= 0]
    rs = [t.r_multiple for t in closed if t.r_multiple is not None]
    exposure = [float(mv) / float(e) for _t, e, mv in run.equity if e > 0]
    tokens_in, tokens_out, cost = usage(run)
    metrics = {
        "total_return": round(total, 6),
        "benchmark_return": round(bench, 6) if bench is not None else None,
        "excess_return": round(total - bench, 6) if bench is not None else None,
        "max_drawdown": round(_max_drawdown([start, *marks]), 6),
        "sharpe": round(s, 4) if (s := _sharpe(daily)) is not None else None,
        "win_rate": round(len(wins) / len(closed), 4) if closed else None,
        "profit_factor": round(sum(wins) / -sum(losses), 4) if losses and sum(losses) < 0 else None,
        "avg_r": round(sum(rs) / len(rs), 4) if rs else None,
        "round_trips": len(closed),
        "fees_hkd": float(run.broker.state.fees),
        "exposure": round(sum(exposure) / len(exposure), 4) if exposure else 0.0,
        "blocked_by_rule": blocked_by_rule(run),
        "input_tokens": tokens_in,
        "output_tokens": tokens_out,
        "model_cost_usd": round(cost, 4),
        "wall_s": round(run.wall_s, 2),
    }
    equity = [{"time": t.isoformat(), "equity_hkd": float(e)} for t, e, _mv in run.equity]
    return Report(
        run_id=run.run_id,
        first=options.first,
        last=options.last,
        brain=run.brain,
        feed=options.feed,
        in_sample_for_model=in_sample(settings, run.brain, options.first),
        metrics=metrics,
        equity=equity,
        trades=trades,
        errors=list(run.errors),
        benchmark_label=bench_label,
    )


def report_json(report: Report, compare: Report | None = None) -> dict[str, Any]:
    """The ``--json`` document (DESIGN.md section 7): plain numbers, fractions, ISO times with +08:00."""
    out: dict[str, Any] = {
        "run_id": report.run_id,
        "from": report.first.isoformat(),
        "to": report.last.isoformat(),
        "brain": report.brain,
        "feed": report.feed,
        "in_sample_for_model": report.in_sample_for_model,
        "metrics": report.metrics,
        "equity": report.equity,
        "trades": [
            {
                "symbol": t.symbol,
                "quantity": t.quantity,
                "entry_time": t.entry_time.isoformat(),
                "entry_price": float(t.entry_price),
                "exit_time": t.exit_time.isoformat() if t.exit_time else None,
                "exit_price": float(t.exit_price) if t.exit_price is not None else None,
                "pnl_hkd": float(t.pnl_hkd),
                "r_multiple": t.r_multiple,
                "exit_reason": t.exit_reason,
                "reasoning": t.reasoning,
            }
            for t in report.trades
        ],
    }
    if compare is not None:
        out["compare"] = report_json(compare)
    return out


def write_json(path: Path, report: Report, compare: Report | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report_json(report, compare), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "n/a"
    if key in {"total_return", "benchmark_return", "excess_return", "max_drawdown", "win_rate", "exposure"}:
        return f"{value:+.2%}" if key.endswith("return") else f"{value:.2%}"
    if key == "fees_hkd":
        return f"HK${value:,.2f}"
    if key == "model_cost_usd":
        return f"${value:.2f}"
    if key == "blocked_by_rule":
        return ", ".join(f"{k} {v}" for k, v in value.items()) or "none"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


LABELS = {
    "total_return": "total return",
    "benchmark_return": "benchmark return",
    "excess_return": "excess return",
    "max_drawdown": "max drawdown",
    "sharpe": "daily Sharpe (annualised)",
    "win_rate": "win rate",
    "profit_factor": "profit factor",
    "avg_r": "average R",
    "round_trips": "round trips",
    "fees_hkd": "fees",
    "exposure": "exposure (avg share of equity held)",
    "blocked_by_rule": "blocked tool calls",
    "input_tokens": "model input tokens",
    "output_tokens": "model output tokens",
    "model_cost_usd": "model cost",
    "wall_s": "wall time (s)",
}


def render_table(report: Report, compare: Report | None = None) -> str:
    """The console score: one column per brain."""
    reports = [report] + ([compare] if compare is not None else [])
    header = f"{'':<38}" + "".join(f"{r.brain + ' (run ' + str(r.run_id) + ')':>26}" for r in reports)
    lines = [
        f"Replay {report.first}..{report.last}, feed {report.feed}",
        header,
        "-" * len(header),
    ]
    for key, label in LABELS.items():
        lines.append(f"{label:<38}" + "".join(f"{_fmt(key, r.metrics.get(key)):>26}" for r in reports))
    for r in reports:
        if r.in_sample_for_model:
            lines.append(
                f"NOTE: {r.brain} run {r.run_id} is IN-SAMPLE FOR THE MODEL: these days are not after its knowledge "
                "cutoff, so it may remember how they ended. Treat its score as an upper bound."
            )
        if r.errors:
            lines.append(f"{r.brain} run {r.run_id}: {len(r.errors)} pass(es) failed; first: {r.errors[0]}")
    return "\n".join(lines)
