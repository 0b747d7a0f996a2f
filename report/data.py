"""Every figure of the report, computed from the journal tables: SQL to read, pure Python to compute.

Nothing here knows which database it reads: the functions take a psycopg connection, so the same code reads
the live journal and a replay run (its own schema ``run_<id>`` in the replay database ``catalyst_replay``, put
first on the connection's search path by ``report.cli``). Times come back as aware datetimes and are shown
in Hong Kong time; money stays ``Decimal``.

Definitions (the page states them too):

- a *round trip* is a symbol going from flat to long and back to flat, built from the filled quantities and
  average fill prices of the ``orders`` table, oldest fill first; its fees are the HKEX costs of each fill
  (``brokers.hkex.trading_costs`` with the broker's commission), its P&L is sells minus buys minus fees;
- *R* is that net P&L divided by the risk taken at entry: quantity x (entry price - the entry order's stop);
- *P&L* is the sum of the round trips closed in the period (realized, net of fees); *return* divides it by the
  first start-of-day equity of the period; *max drawdown* is the deepest fall from a peak of that realized
  equity curve (start-of-day equity plus closed round trips, in exit order);
- *fees* are the costs of every fill in the period; *blocked calls* are tool calls journalled as not allowed.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
from psycopg.rows import dict_row

from brokers import hkex
from config.errors import ConfigError

HKT = ZoneInfo("Asia/Hong_Kong")
MAX_SPAN_DAYS = 366
PERIOD_HELP = "write today, YYYY-MM-DD, FROM..TO (e.g. 2026-11-02..2026-11-27) or replay:RUN_ID"
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


class PeriodError(ConfigError):
    """The report's PERIOD (or the replay run it names) is wrong: fix the command line. Exit code 2."""


# --------------------------------------------------------------------------------------------------- period


@dataclass(frozen=True)
class Period:
    """What the report covers: trading dates ``start``..``end`` (inclusive), or a replay run."""

    start: date | None
    end: date | None
    run_id: str | None = None

    @property
    def is_replay(self) -> bool:
        return self.run_id is not None

    @property
    def label(self) -> str:
        dates = "" if self.start is None or self.end is None else _span_text(self.start, self.end)
        if self.run_id is not None:
            return f"replay run {self.run_id}" + (f" ({dates})" if dates else "")
        return dates

    @property
    def slug(self) -> str:
        """For the default file name."""
        if self.run_id is not None:
            return "replay-" + re.sub(r"[^A-Za-z0-9_-]", "_", self.run_id)
        assert self.start is not None and self.end is not None
        return f"{self.start}" if self.start == self.end else f"{self.start}_{self.end}"


def _span_text(start: date, end: date) -> str:
    return f"{start}" if start == end else f"{start} to {end}"


def _parse_date(text: str, whole: str) -> date:
    if not _DATE.match(text):
        raise PeriodError(f"--report {whole!r}: {text!r} is not a date in the form YYYY-MM-DD; {PERIOD_HELP}.")
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise PeriodError(f"--report {whole!r}: {text!r} is not a valid date ({exc}); {PERIOD_HELP}.") from None


def parse_period(text: str | None, today: date) -> Period:
    """``today`` | ``YYYY-MM-DD`` | ``FROM..TO`` | ``replay:RUN_ID`` → Period. Raises ``PeriodError`` (exit 2)."""
    raw = (text or "today").strip()
    if raw.lower() == "today":
        return Period(today, today)
    if raw.lower().startswith("replay:"):
        run_id = raw.split(":", 1)[1].strip()
        if not _RUN_ID.match(run_id):
            raise PeriodError(
                f"--report {raw!r}: the replay run id is missing or has characters a run id never has; write "
                "replay:RUN_ID with the id that agent.py --replay printed."
            )
        return Period(None, None, run_id=run_id)
    if ".." in raw:
        first, _, last = raw.partition("..")
        start, end = _parse_date(first.strip(), raw), _parse_date(last.strip(), raw)
        if start > end:
            raise PeriodError(f"--report {raw!r}: the period starts after it ends; write FROM..TO with FROM <= TO.")
        if (end - start).days >= MAX_SPAN_DAYS:
            raise PeriodError(
                f"--report {raw!r} spans {(end - start).days + 1} days; a report covers at most {MAX_SPAN_DAYS} "
                "days. Split it into shorter periods."
            )
    else:
        start = end = _parse_date(raw, raw)
    if end > today:
        raise PeriodError(
            f"--report {raw!r} reaches {end}, which is after today ({today}); nothing is journalled for the future."
        )
    return Period(start, end)


@dataclass(frozen=True)
class Scope:
    """The rows a report reads: trading dates ``start``..``end`` (a replay run's journal is its own schema)."""

    start: date
    end: date

    @property
    def window(self) -> tuple[datetime, datetime]:
        """[start 00:00 HKT, the day after end 00:00 HKT)."""
        return (
            datetime.combine(self.start, time(0), HKT),
            datetime.combine(self.end + timedelta(days=1), time(0), HKT),
        )

    def params(self) -> dict[str, Any]:
        lo, hi = self.window
        return {"start": self.start, "end": self.end, "lo": lo, "hi": hi}


_CYCLES_IN_SCOPE = "SELECT id FROM cycles WHERE trading_date BETWEEN %(start)s AND %(end)s"

# Tool calls and alerts are stamped by the database clock. A run with --now (the sim) or a replay (its own clock)
# does not move that clock, so a stamp outside its cycle's run time is replaced by the cycle's start.
_STAMP = (
    "CASE WHEN c.id IS NULL OR {row}.created_at BETWEEN c.started_at - interval '1 minute' "
    "AND COALESCE(c.finished_at, c.started_at) + interval '10 minutes' THEN {row}.created_at ELSE c.started_at END"
)


# ---------------------------------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Fill:
    """One order's filled part, as journalled."""

    client_order_id: str
    cycle_id: int | None
    symbol: str
    side: str
    quantity: int
    price: Decimal
    at: datetime
    stop_loss: Decimal | None
    take_profit: Decimal | None
    reason: str | None
    fees: Decimal = Decimal(0)


@dataclass(frozen=True)
class RoundTrip:
    symbol: str
    quantity: int
    entry_time: datetime
    entry_price: Decimal
    exit_time: datetime
    exit_price: Decimal
    stop_loss: Decimal | None
    take_profit: Decimal | None
    gross_pnl: Decimal
    fees: Decimal
    pnl: Decimal
    r_multiple: float | None
    exit_reason: str
    entry_reason: str
    entry_cycle_id: int | None
    reasoning: tuple[str, ...] = ()

    @property
    def is_win(self) -> bool:
        return self.pnl > 0


@dataclass(frozen=True)
class OpenPosition:
    symbol: str
    quantity: int
    entry_price: Decimal
    entry_time: datetime
    stop_loss: Decimal | None
    take_profit: Decimal | None
    stop_source: str  # "protective_stops" (journalled now) or "entry order"


@dataclass(frozen=True)
class CycleLine:
    id: int
    run_id: str
    started_at: datetime
    mode: str
    broker: str
    brain: str
    model: str | None
    status: str
    iterations: int
    tool_calls: int
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    cost_usd: Decimal
    summary: str

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.cache_read_tokens + self.cache_write_tokens + self.output_tokens

    @property
    def cache_share(self) -> float | None:
        """The share of input tokens read from the prompt cache."""
        total_in = self.input_tokens + self.cache_read_tokens + self.cache_write_tokens
        return None if total_in == 0 else self.cache_read_tokens / total_in


@dataclass(frozen=True)
class Refusal:
    at: datetime
    cycle_id: int
    tool: str
    rules: tuple[tuple[str, str], ...]  # (rule, why)
    numbers: tuple[tuple[str, str], ...]  # (field, value) from the call's input
    reason: str


@dataclass(frozen=True)
class AlertLine:
    at: datetime
    priority: str
    event: str
    subject: str
    message: str
    sent: bool
    error: str | None


@dataclass(frozen=True)
class EquityPoint:
    at: datetime
    equity: Decimal


@dataclass(frozen=True)
class ReplayRun:
    """A row of the replay database's ``replay_runs`` register (``replay.journal``)."""

    id: str
    start: date | None
    end: date | None
    brain: str
    feed: str
    metrics: dict[str, Any]
    settings: dict[str, Any]
    schema: str | None = None  # the run's own journal schema, run_<id>
    status: str = ""  # running | ok | error | stopped

    @property
    def in_sample_for_model(self) -> bool | None:
        """As the replay recorded it; None for a run that did not (or a rules run: no model to remember)."""
        for source in (self.metrics, self.settings):
            value = source.get("in_sample_for_model")
            if isinstance(value, bool):
                return value
        return None

    @property
    def metric(self) -> dict[str, float | None]:
        """The replay's own numeric score (``--json`` metrics), None where it did not record one."""
        return {k: (float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None)
                for k, v in self.metrics.items()}  # fmt: skip


@dataclass(frozen=True)
class Headline:
    starting_equity: Decimal | None
    pnl_hkd: Decimal
    return_frac: float | None
    max_drawdown_frac: float | None
    max_drawdown_hkd: Decimal
    round_trips: int
    wins: int
    win_rate: float | None
    avg_r: float | None
    fees_hkd: Decimal
    blocked_calls: int
    model_cost_usd: Decimal
    input_tokens: int
    output_tokens: int


@dataclass
class ReportData:
    period: Period
    scope: Scope
    generated_at: datetime
    headline: Headline
    trades: list[RoundTrip]
    open_positions: list[OpenPosition]
    cycles: list[CycleLine]
    refusals: list[Refusal]
    alerts: list[AlertLine]
    equity_curve: list[EquityPoint]  # realized: start-of-day equity plus closed round trips
    equity_snapshots: list[EquityPoint]  # as the broker reported them at each cycle
    replay: ReplayRun | None = None
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------- reading


def _rows(conn: psycopg.Connection[Any], query: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query, params)  # type: ignore[arg-type]  # constant SQL, values as parameters
        return cur.fetchall()


def _hkt(value: datetime) -> datetime:
    return value.astimezone(HKT)


def read_fills(conn: psycopg.Connection[Any], scope: Scope) -> list[Fill]:
    """Every filled quantity journalled up to the end of the scope, oldest fill first (earlier days included,
    so a position bought before the period and sold in it is still a round trip)."""
    rows = _rows(
        conn,
        "SELECT client_order_id, cycle_id, symbol, side, filled_quantity, avg_fill_price, stop_loss, take_profit, "
        "reason, COALESCE(filled_at, updated_at) AS at FROM orders "
        "WHERE filled_quantity > 0 AND avg_fill_price IS NOT NULL AND status <> 'dry_run' "
        "AND trading_date <= %(end)s "
        "ORDER BY COALESCE(filled_at, updated_at), id",
        scope.params(),
    )
    return [
        Fill(
            client_order_id=r["client_order_id"],
            cycle_id=r["cycle_id"],
            symbol=r["symbol"],
            side=r["side"],
            quantity=int(r["filled_quantity"]),
            price=Decimal(r["avg_fill_price"]),
            at=_hkt(r["at"]),
            stop_loss=r["stop_loss"],
            take_profit=r["take_profit"],
            reason=r["reason"],
        )
        for r in rows
    ]


def read_cycles(conn: psycopg.Connection[Any], scope: Scope) -> list[CycleLine]:
    rows = _rows(
        conn,
        "SELECT c.*, (SELECT count(*) FROM tool_calls t WHERE t.cycle_id = c.id) AS n_calls FROM cycles c "
        f"WHERE c.id IN ({_CYCLES_IN_SCOPE}) ORDER BY c.started_at, c.id",
        scope.params(),
    )
    return [
        CycleLine(
            id=r["id"],
            run_id=r["run_id"],
            started_at=_hkt(r["started_at"]),
            mode=r["mode"],
            broker=r["broker"],
            brain=r["brain"],
            model=r["model"],
            status=r["status"],
            iterations=r["iterations"],
            tool_calls=int(r["n_calls"]),
            input_tokens=int(r["input_tokens"]),
            output_tokens=int(r["output_tokens"]),
            cache_read_tokens=int(r["cache_read_tokens"]),
            cache_write_tokens=int(r["cache_write_tokens"]),
            cost_usd=Decimal(r["cost_usd"]),
            summary=(r["summary"] or r["error"] or "").strip(),
        )
        for r in rows
    ]


_NUMBER_FIELDS = ("symbol", "side", "quantity", "entry_price", "limit_price", "stop_loss", "take_profit", "order_type")


def _rules_of(result: Any, reason: str) -> tuple[tuple[str, str], ...]:
    """The failed rules of a refused call: from the verdict the model received, else parsed from the reason."""
    if isinstance(result, dict) and isinstance(result.get("failed_rules"), list):
        rules = [
            (str(f.get("rule", "?")), str(f.get("why", ""))) for f in result["failed_rules"] if isinstance(f, dict)
        ]
        if rules:
            return tuple(rules)
    parts = []
    for piece in reason.split("; "):
        rule, sep, why = piece.partition(": ")
        parts.append((rule, why) if sep and re.fullmatch(r"[a-z_]+", rule) else ("", piece))
    return tuple(parts)


def read_refusals(conn: psycopg.Connection[Any], scope: Scope) -> list[Refusal]:
    rows = _rows(
        conn,
        f"SELECT t.cycle_id, t.name, t.input, t.reason, t.result, {_STAMP.format(row='t')} AS at FROM tool_calls t "
        "JOIN cycles c ON c.id = t.cycle_id "
        f"WHERE NOT t.allowed AND t.cycle_id IN ({_CYCLES_IN_SCOPE}) ORDER BY c.started_at, t.cycle_id, t.seq",
        scope.params(),
    )
    out = []
    for r in rows:
        data = r["input"] if isinstance(r["input"], dict) else {}
        numbers = tuple((k, str(data[k])) for k in _NUMBER_FIELDS if data.get(k) is not None)
        reason = r["reason"] or ""
        out.append(
            Refusal(
                at=_hkt(r["at"]),
                cycle_id=r["cycle_id"],
                tool=r["name"],
                rules=_rules_of(r["result"], reason),
                numbers=numbers,
                reason=reason,
            )
        )
    return out


def read_alerts(conn: psycopg.Connection[Any], scope: Scope) -> list[AlertLine]:
    rows = _rows(
        conn,
        # An alert belongs to the period through its cycle (alerts are stamped with the wall clock, which a
        # --now run does not move); alerts raised outside any cycle (scripts) by their time.
        f"SELECT a.*, {_STAMP.format(row='a')} AS at FROM alerts a LEFT JOIN cycles c ON c.id = a.cycle_id "
        f"WHERE a.cycle_id IN ({_CYCLES_IN_SCOPE}) "
        "OR (a.cycle_id IS NULL AND a.created_at >= %(lo)s AND a.created_at < %(hi)s) "
        "ORDER BY COALESCE(c.started_at, a.created_at), a.id",
        scope.params(),
    )
    return [
        AlertLine(
            at=_hkt(r["at"]),
            priority=r["priority"],
            event=r["event"] or "",
            subject=r["subject"],
            message=r["message"],
            sent=bool(r["sent"]),
            error=r["error"],
        )
        for r in rows
    ]


def read_equity(conn: psycopg.Connection[Any], scope: Scope) -> tuple[Decimal | None, list[EquityPoint]]:
    """(the first start-of-day equity of the period, every equity reading of the period in time order)."""
    rows = _rows(
        conn,
        "SELECT kind, equity, taken_at FROM equity_snapshots WHERE trading_date BETWEEN %(start)s AND %(end)s "
        "ORDER BY taken_at, id",
        scope.params(),
    )
    start = next((Decimal(r["equity"]) for r in rows if r["kind"] == "start_of_day"), None)
    return start, [EquityPoint(_hkt(r["taken_at"]), Decimal(r["equity"])) for r in rows]


def read_decisions(conn: psycopg.Connection[Any], cycle_ids: Sequence[int]) -> dict[int, list[tuple[str, str]]]:
    """cycle id → [(decision, reasoning)] in journal order."""
    if not cycle_ids:
        return {}
    rows = _rows(
        conn,
        "SELECT cycle_id, decision, reasoning FROM decisions WHERE cycle_id = ANY(%(ids)s) ORDER BY id",
        {"ids": list(cycle_ids)},
    )
    out: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for r in rows:
        out[r["cycle_id"]].append((r["decision"], r["reasoning"]))
    return dict(out)


def read_stops(conn: psycopg.Connection[Any]) -> dict[str, tuple[Decimal, Decimal | None]]:
    """symbol → (stop, take profit) as journalled now."""
    rows = _rows(conn, "SELECT symbol, stop_loss, take_profit FROM protective_stops", {})
    return {r["symbol"]: (Decimal(r["stop_loss"]), r["take_profit"]) for r in rows}


def table_exists(conn: psycopg.Connection[Any], name: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s)", (name,)).fetchone()
    return row is not None and row[0] is not None


def read_replay_run(conn: psycopg.Connection[Any], run_id: str) -> ReplayRun | None:
    rows = _rows(conn, "SELECT id::text AS id, from_date, to_date, brain, feed, status, schema_name, settings, "
                 "metrics FROM replay_runs WHERE id::text = %(id)s", {"id": run_id})  # fmt: skip
    if not rows:
        return None
    r = rows[0]
    return ReplayRun(
        id=r["id"],
        start=_as_date(r["from_date"]),
        end=_as_date(r["to_date"]),
        brain=str(r["brain"] or ""),
        feed=str(r["feed"] or ""),
        metrics=r["metrics"] if isinstance(r["metrics"], dict) else {},
        settings=r["settings"] if isinstance(r["settings"], dict) else {},
        schema=r["schema_name"],
        status=str(r["status"] or ""),
    )


def recent_replay_runs(conn: psycopg.Connection[Any], limit: int = 5) -> list[str]:
    rows = _rows(conn, "SELECT id::text AS id FROM replay_runs ORDER BY started_at DESC LIMIT %(n)s", {"n": limit})
    return [r["id"] for r in rows]


def _as_date(value: Any) -> date | None:
    if isinstance(value, datetime):
        return value.astimezone(HKT).date()
    if isinstance(value, date):
        return value
    if isinstance(value, str) and _DATE.match(value[:10]):
        return date.fromisoformat(value[:10])
    return None


# ---------------------------------------------------------------------------------------------- computing


def with_fees(fills: Sequence[Fill], commission_pct: Decimal, min_commission: Decimal) -> list[Fill]:
    """Each fill with its HKEX costs (one side: commission, stamp duty, levies, fees)."""
    return [
        replace(f, fees=hkex.trading_costs(f.price * f.quantity, commission_pct, min_commission).total) for f in fills
    ]


def _weighted(fills: Sequence[Fill]) -> Decimal:
    quantity = sum(f.quantity for f in fills)
    return sum((f.price * f.quantity for f in fills), Decimal(0)) / quantity


def build_round_trips(fills: Sequence[Fill]) -> tuple[list[RoundTrip], list[OpenPosition]]:
    """Round trips (flat → long → flat) in exit order, and what is still held at the end.

    A sell with nothing held before it (history older than the journal) is ignored.
    """
    held: dict[str, int] = defaultdict(int)
    buys: dict[str, list[Fill]] = defaultdict(list)
    sells: dict[str, list[Fill]] = defaultdict(list)
    trips: list[RoundTrip] = []
    for fill in fills:
        symbol = fill.symbol
        if fill.side == "buy":
            buys[symbol].append(fill)
            held[symbol] += fill.quantity
            continue
        if held[symbol] <= 0:
            continue
        sold = min(fill.quantity, held[symbol])
        sells[symbol].append(fill if sold == fill.quantity else replace(fill, quantity=sold))
        held[symbol] -= sold
        if held[symbol] == 0:
            trips.append(_close_trip(buys.pop(symbol), sells.pop(symbol)))
    open_positions = [
        OpenPosition(
            symbol=symbol,
            quantity=held[symbol],
            entry_price=_weighted(buys[symbol]),
            entry_time=buys[symbol][0].at,
            stop_loss=buys[symbol][0].stop_loss,
            take_profit=buys[symbol][0].take_profit,
            stop_source="entry order",
        )
        for symbol in sorted(held)
        if held[symbol] > 0
    ]
    return trips, open_positions


def _close_trip(buys: list[Fill], sells: list[Fill]) -> RoundTrip:
    first = buys[0]
    quantity = sum(f.quantity for f in buys)
    entry, exit_ = _weighted(buys), _weighted(sells)
    bought = sum((f.price * f.quantity for f in buys), Decimal(0))
    gross = sum((f.price * f.quantity for f in sells), Decimal(0)) - bought
    fees = sum((f.fees for f in (*buys, *sells)), Decimal(0))
    pnl = gross - fees
    stop = first.stop_loss
    risk = (entry - stop) * quantity if stop is not None and stop < entry else None
    return RoundTrip(
        symbol=first.symbol,
        quantity=quantity,
        entry_time=first.at,
        entry_price=entry,
        exit_time=sells[-1].at,
        exit_price=exit_,
        stop_loss=stop,
        take_profit=first.take_profit,
        gross_pnl=gross,
        fees=fees,
        pnl=pnl,
        r_multiple=float(pnl / risk) if risk else None,
        exit_reason=sells[-1].reason or "",
        entry_reason=first.reason or "",
        entry_cycle_id=first.cycle_id,
    )


def _mentions(text: str, symbol: str) -> bool:
    short = hkex.short_symbol(symbol) if symbol.startswith("HK.") else symbol
    digits = short.lstrip("0") or "0"
    return symbol in text or re.search(rf"(?<!\d)0*{re.escape(digits)}(?!\d)", text) is not None


def reasoning_for(trip: RoundTrip, decisions: dict[int, list[tuple[str, str]]]) -> tuple[str, ...]:
    """The decisions journalled in the entry's cycle: those naming the symbol, else all of them."""
    rows = decisions.get(trip.entry_cycle_id or -1, [])
    texts = [f"{d}: {r}" if r else d for d, r in rows]
    named = [t for t in texts if _mentions(t, trip.symbol)]
    return tuple(named or texts)


def realized_curve(start: datetime, base: Decimal, trips: Sequence[RoundTrip]) -> list[EquityPoint]:
    """``base`` at ``start``, then one point per round trip at its exit: the closed-trade equity."""
    points = [EquityPoint(start, base)]
    value = base
    for trip in sorted(trips, key=lambda t: t.exit_time):
        value += trip.pnl
        points.append(EquityPoint(trip.exit_time, value))
    return points


def drawdowns(points: Sequence[EquityPoint]) -> list[tuple[datetime, Decimal, float | None]]:
    """(time, HKD below the running peak, that as a fraction of the peak) per point."""
    out = []
    peak: Decimal | None = None
    for p in points:
        peak = p.equity if peak is None else max(peak, p.equity)
        below = peak - p.equity
        out.append((p.at, below, float(below / peak) if peak > 0 else None))
    return out


def headline(
    trips: Sequence[RoundTrip],
    fills_in_period: Sequence[Fill],
    curve: Sequence[EquityPoint],
    starting_equity: Decimal | None,
    cycles: Sequence[CycleLine],
    refusals: Sequence[Refusal],
) -> Headline:
    pnl = sum((t.pnl for t in trips), Decimal(0))
    dd = drawdowns(curve)
    rs = [t.r_multiple for t in trips if t.r_multiple is not None]
    wins = sum(1 for t in trips if t.is_win)
    fractions = [f for _, _, f in dd if f is not None]
    return Headline(
        starting_equity=starting_equity,
        pnl_hkd=pnl,
        return_frac=float(pnl / starting_equity) if starting_equity else None,
        max_drawdown_frac=max(fractions) if fractions and starting_equity else None,
        max_drawdown_hkd=max((below for _, below, _ in dd), default=Decimal(0)),
        round_trips=len(trips),
        wins=wins,
        win_rate=wins / len(trips) if trips else None,
        avg_r=sum(rs) / len(rs) if rs else None,
        fees_hkd=sum((f.fees for f in fills_in_period), Decimal(0)),
        blocked_calls=len(refusals),
        model_cost_usd=sum((c.cost_usd for c in cycles), Decimal(0)),
        input_tokens=sum(c.input_tokens + c.cache_read_tokens + c.cache_write_tokens for c in cycles),
        output_tokens=sum(c.output_tokens for c in cycles),
    )


def load_report(
    conn: psycopg.Connection[Any],
    period: Period,
    scope: Scope,
    *,
    commission_pct: Decimal,
    min_commission: Decimal,
    now: datetime,
    replay: ReplayRun | None = None,
) -> ReportData:
    """Read the journal behind ``conn`` for ``scope`` and compute every figure of the page."""
    lo, hi = scope.window
    fills = with_fees(read_fills(conn, scope), commission_pct, min_commission)
    all_trips, open_positions = build_round_trips(fills)
    trips = [t for t in all_trips if lo <= t.exit_time < hi]
    cycles = read_cycles(conn, scope)
    refusals = read_refusals(conn, scope)
    decisions = read_decisions(conn, sorted({t.entry_cycle_id for t in trips if t.entry_cycle_id is not None}))
    trips = [replace(t, reasoning=reasoning_for(t, decisions)) for t in trips]
    starting_equity, snapshots = read_equity(conn, scope)
    first_seen = [*(c.started_at for c in cycles), *(p.at for p in snapshots), *(t.entry_time for t in trips)]
    curve_start = min(first_seen) if first_seen else lo
    curve = realized_curve(curve_start, starting_equity or Decimal(0), trips)
    stops = read_stops(conn)
    open_positions = [
        replace(p, stop_loss=stops[p.symbol][0], take_profit=stops[p.symbol][1], stop_source="protective_stops")
        if p.symbol in stops
        else p
        for p in open_positions
    ]
    in_period = [f for f in fills if lo <= f.at < hi]
    return ReportData(
        period=period,
        scope=scope,
        generated_at=now.astimezone(HKT),
        headline=headline(trips, in_period, curve, starting_equity, cycles, refusals),
        trades=trips,
        open_positions=open_positions,
        cycles=cycles,
        refusals=refusals,
        alerts=read_alerts(conn, scope),
        equity_curve=curve,
        equity_snapshots=snapshots,
        replay=replay,
    )
