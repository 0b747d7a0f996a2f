"""Price bars for the report's charts: minute bars around each trade and the benchmark.

Sources, asked in order until one answers:

- ``JournalBars``: the journal's own stores: ``kline_cache`` (what the agent cached while trading) and the
  recorded-history table (``market_bars``), of the journal reported on and, for a replay of recorded history,
  of the live journal that holds that history;
- ``SimBars``: the simulated exchange's bars, deterministic from its seed, for days traded on the sim broker.
  Shocks a test or demo applied to the paper account are included by reading a *copy* of its state file: the
  report never changes the paper account.

The report never connects to OpenD: a Futu trade whose bars are in neither store is shown without a chart,
and the page says so.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

import psycopg
import structlog

from brokers.base import Bar

log = structlog.get_logger(__name__)

BENCHMARK_SYMBOL = "HK.02800"  # Tracker Fund of Hong Kong (tracks the Hang Seng Index)
_TIME_COLUMNS = ("bar_time", "bar_start", "start_time", "start", "time", "ts")
_BARS_PER_DAY = {"1m": 330, "5m": 66, "15m": 22, "1h": 6, "1d": 1}
_MAX_SESSIONS = 150  # the sim keeps this much history before its clock


class BarSource(Protocol):
    name: str

    def bars(self, symbol: str, timeframe: str, start: datetime, end: datetime) -> list[Bar]:
        """Bars of ``symbol`` starting in [start, end), oldest first; [] when this source has none."""
        ...


class JournalBars:
    """Bars stored in a journal database (live or replay)."""

    name = "journal"

    def __init__(self, conn: psycopg.Connection[Any], *, owns_connection: bool = False) -> None:
        self._conn = conn
        self._owns = owns_connection  # closed with the source (the live journal's, read for a recorded replay)
        found = conn.execute("SELECT to_regclass('kline_cache')").fetchone()
        self._has_cache = found is not None and found[0] is not None  # a journal never migrated has neither table
        self._recorded = self._recorded_table()

    def close(self) -> None:
        if self._owns:
            self._conn.close()

    def _recorded_table(self) -> tuple[str, str] | None:
        """(table, time column) of a recorded-history table, if this database has one."""
        row = self._conn.execute("SELECT to_regclass('market_bars')").fetchone()
        if row is None or row[0] is None:
            return None
        columns = {
            r[0]
            for r in self._conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'market_bars'"
            ).fetchall()
        }
        needed = {"symbol", "timeframe", "open", "high", "low", "close"}
        time_column = next((c for c in _TIME_COLUMNS if c in columns), None)
        if not needed <= columns or time_column is None:
            log.warning("recorded_bars_unreadable", columns=sorted(columns))
            return None
        return "market_bars", time_column

    def bars(self, symbol: str, timeframe: str, start: datetime, end: datetime) -> list[Bar]:
        queries = []
        if self._has_cache:
            queries.append(
                psycopg.sql.SQL(
                    "SELECT bar_time, open, high, low, close, volume FROM kline_cache "
                    "WHERE symbol = %s AND timeframe = %s AND bar_time >= %s AND bar_time < %s ORDER BY bar_time"
                )
            )
        if self._recorded is not None:
            table, column = self._recorded
            queries.append(
                psycopg.sql.SQL(
                    "SELECT {col}, open, high, low, close, COALESCE(volume, 0) FROM {table} "
                    "WHERE symbol = %s AND timeframe = %s AND {col} >= %s AND {col} < %s ORDER BY {col}"
                ).format(col=psycopg.sql.Identifier(column), table=psycopg.sql.Identifier(table))
            )
        for query in queries:
            rows = self._conn.execute(query, (symbol, timeframe, start, end)).fetchall()
            if rows:
                return [
                    Bar(time=t, open=Decimal(o), high=Decimal(h), low=Decimal(lo), close=Decimal(c), volume=int(v))
                    for t, o, h, lo, c, v in rows
                ]
        return []


class SimBars:
    """The simulated exchange's bars (seeded), as the sim broker showed them to the agent."""

    name = "sim"

    def __init__(self, seed: int, state_file: Path | None = None) -> None:
        self._seed = seed
        self._folder = tempfile.TemporaryDirectory(prefix="catalyst-report-")
        self._state_copy: Path | None = None
        if state_file is not None and state_file.is_file():
            self._state_copy = Path(self._folder.name) / "state.json"
            shutil.copyfile(state_file, self._state_copy)

    def close(self) -> None:
        self._folder.cleanup()

    def bars(self, symbol: str, timeframe: str, start: datetime, end: datetime) -> list[Bar]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from brokers.sim import SimExchange

        moment = end - timedelta(seconds=1)
        days = (end.date() - start.date()).days + 1
        count = min(_BARS_PER_DAY.get(timeframe, 330) * min(days, _MAX_SESSIONS), 60_000)
        try:
            exchange = SimExchange(seed=self._seed, clock=lambda: moment, state_file=self._state_copy)
            bars = exchange.klines(symbol, timeframe, count)
        except Exception as exc:  # an unlisted symbol or a date outside the calendar: no bars, no error
            log.debug("sim_bars_unavailable", symbol=symbol, error=str(exc))
            return []
        return [b for b in bars if start <= b.time < end]

    def universe(self) -> list[str]:
        from brokers.sim import UNIVERSE

        return [inst.symbol for inst in UNIVERSE]


class ChainBars:
    """The first source that has bars for a request."""

    def __init__(self, sources: Sequence[BarSource]) -> None:
        self.sources = list(sources)

    @property
    def name(self) -> str:
        return "+".join(s.name for s in self.sources) or "none"

    def bars(self, symbol: str, timeframe: str, start: datetime, end: datetime) -> list[Bar]:
        for source in self.sources:
            found = source.bars(symbol, timeframe, start, end)
            if found:
                return found
        return []

    def close(self) -> None:
        for source in self.sources:
            closer = getattr(source, "close", None)
            if closer is not None:
                with contextlib.suppress(Exception):
                    closer()


def benchmark_series(
    source: ChainBars, start: datetime, end: datetime, timeframe: str
) -> tuple[str, list[tuple[datetime, float]]]:
    """(what it is, [(time, return since the start as a fraction)]) or ("", []) without data.

    The Tracker Fund when any source has it; otherwise, on the simulated market, an equal-weight buy-and-hold
    of the sim's whole universe.
    """
    bars = source.bars(BENCHMARK_SYMBOL, timeframe, start, end)
    if len(bars) >= 2:
        base = float(bars[0].open)
        return f"Tracker Fund {BENCHMARK_SYMBOL} buy-and-hold", [(b.time, float(b.close) / base - 1) for b in bars]
    sim = next((s for s in source.sources if isinstance(s, SimBars)), None)
    if sim is None:
        return "", []
    per_symbol: list[dict[datetime, float]] = []
    for symbol in sim.universe():
        got = sim.bars(symbol, timeframe, start, end)
        if len(got) >= 2:
            base = float(got[0].open)
            per_symbol.append({b.time: float(b.close) / base - 1 for b in got})
    if not per_symbol:
        return "", []
    common = sorted(set.intersection(*(set(d) for d in per_symbol)))
    series = [(t, sum(d[t] for d in per_symbol) / len(per_symbol)) for t in common]
    return f"equal-weight buy-and-hold of the simulated market's {len(per_symbol)} stocks", series
