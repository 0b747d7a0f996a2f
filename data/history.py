"""Recorded market history in the journal (``market_bars``, ``instruments``): CSV import and coverage.

A CSV file has a header row and, in any order, the columns ``symbol,time,open,high,low,close,volume`` plus
optional ``turnover,timeframe,lot_size,name``. ``symbol`` in any common spelling (``HK.00700``, ``700``,
``0700.HK``); ``timeframe`` ``1m`` (default) or ``1d``; ``time`` the bar's **start** in Hong Kong time
(``YYYY-MM-DD HH:MM[:SS]``, ISO-8601 with an offset, or a date alone for ``1d``); unadjusted HKD.

A file is stored whole or not at all: the first bad row refuses the file with its name, line and reason, and
nothing of it is written. Rows already stored identically are skipped, so re-importing changes nothing.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

import psycopg

from brokers.hkex import normalize_symbol
from config.errors import AgentError
from data.calendar import _calendar as _xhkg

HKT = ZoneInfo("Asia/Hong_Kong")
REQUIRED = ("symbol", "time", "open", "high", "low", "close", "volume")
OPTIONAL = ("turnover", "timeframe", "lot_size", "name")
TIMEFRAMES = ("1m", "1d")


class HistoryImportError(AgentError):
    """A CSV file was refused (its name, line and reason are in the message); nothing of it was stored."""

    exit_code = 2


class BarRow(NamedTuple):
    symbol: str
    timeframe: str
    start: datetime
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: int
    turnover: Decimal | None


@dataclass
class ImportResult:
    path: Path
    rows: int
    inserted: int
    unchanged: int
    symbols: list[str]


def _decimal(text: str, column: str) -> Decimal:
    try:
        value = Decimal(text.strip())
    except (InvalidOperation, AttributeError):
        raise ValueError(f"{column} {text!r} is not a number") from None
    if not value.is_finite():
        raise ValueError(f"{column} {text!r} is not a number")
    return value


def _parse_time(text: str, timeframe: str) -> datetime:
    text = text.strip()
    try:
        if timeframe == "1d" and len(text) == 10:
            return datetime.combine(date.fromisoformat(text), time(0), HKT)
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"time {text!r} is not YYYY-MM-DD HH:MM[:SS] (Hong Kong time), ISO-8601 with an offset, or a date for 1d"
        ) from None
    value = value.replace(tzinfo=HKT) if value.tzinfo is None else value.astimezone(HKT)
    if timeframe == "1d" and value.time() != time(0):
        raise ValueError(f"a 1d bar's time is its session date, got {text!r}")
    return value


def _check_session(start: datetime, timeframe: str) -> None:
    session = _xhkg().session(start.date())
    if session is None:
        raise ValueError(f"{start.date()} is not an XHKG trading day")
    if timeframe == "1m" and not any(s <= start < e for s, e in session.continuous_windows()):
        windows = ", ".join(f"{s:%H:%M}-{e:%H:%M}" for s, e in session.continuous_windows())
        raise ValueError(f"minute bar at {start:%H:%M} is outside continuous trading on {start.date()} ({windows})")
    if timeframe == "1m" and start.second != 0:
        raise ValueError(f"minute bar at {start:%H:%M:%S} does not start on a minute")


def parse_csv(path: Path) -> tuple[list[BarRow], dict[str, tuple[int | None, str | None]]]:
    """Read and check one file: its bars and, per symbol, the lot size and name it gives (if any).

    Raises HistoryImportError naming the file, the line and the reason at the first bad row.
    """
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise HistoryImportError(f"{path}: cannot be read ({exc.strerror}). Nothing was stored.") from None
    with handle:
        reader = csv.DictReader(handle)
        header = [h.strip().lower() for h in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED if c not in header]
        unknown = [c for c in header if c not in REQUIRED + OPTIONAL]
        if missing or unknown:
            problems = []
            if missing:
                problems.append(f"missing column(s) {', '.join(missing)}")
            if unknown:
                problems.append(f"unknown column(s) {', '.join(unknown)}")
            raise HistoryImportError(
                f"{path}, line 1: {'; '.join(problems)}. The header needs {','.join(REQUIRED)} "
                f"(optional {','.join(OPTIONAL)}). Nothing was stored."
            )
        reader.fieldnames = header
        bars: list[BarRow] = []
        meta: dict[str, tuple[int | None, str | None]] = {}
        seen: dict[tuple[str, str, datetime], BarRow] = {}
        for row in reader:
            line = reader.line_num
            try:
                bar, lot, name = _parse_row(row)
            except ValueError as exc:
                raise HistoryImportError(f"{path}, line {line}: {exc}. Nothing of this file was stored.") from None
            key = (bar.symbol, bar.timeframe, bar.start)
            if key in seen and seen[key] != bar:
                raise HistoryImportError(
                    f"{path}, line {line}: a second, different {bar.timeframe} bar for {bar.symbol} at "
                    f"{bar.start:%Y-%m-%d %H:%M}. Nothing of this file was stored."
                )
            seen[key] = bar
            bars.append(bar)
            known_lot, known_name = meta.get(bar.symbol, (None, None))
            if lot is not None and known_lot is not None and lot != known_lot:
                raise HistoryImportError(
                    f"{path}, line {line}: lot_size {lot} for {bar.symbol} contradicts {known_lot} earlier in the "
                    "file. Nothing of this file was stored."
                )
            meta[bar.symbol] = (lot if lot is not None else known_lot, name or known_name)
    return bars, meta


def _parse_row(row: dict[str, Any]) -> tuple[BarRow, int | None, str | None]:
    if None in row:
        raise ValueError("more fields than the header has")
    symbol = normalize_symbol((row.get("symbol") or "").strip())
    timeframe = (row.get("timeframe") or "").strip() or "1m"
    if timeframe not in TIMEFRAMES:
        raise ValueError(f"timeframe {timeframe!r} is not 1m or 1d")
    start = _parse_time(row.get("time") or "", timeframe)
    _check_session(start, timeframe)
    prices = {c: _decimal(row.get(c) or "", c) for c in ("open", "high", "low", "close")}
    for column, value in prices.items():
        if value <= 0:
            raise ValueError(f"{column} {value} is not a positive price")
    if prices["high"] < prices["low"]:
        raise ValueError(f"high {prices['high']} is below low {prices['low']}")
    for column in ("open", "close"):
        if not prices["low"] <= prices[column] <= prices["high"]:
            raise ValueError(f"{column} {prices[column]} is outside the bar's low-high range")
    volume_text = (row.get("volume") or "").strip()
    try:
        volume = int(Decimal(volume_text))
    except (InvalidOperation, ValueError):
        raise ValueError(f"volume {volume_text!r} is not a whole number") from None
    if volume < 0 or Decimal(volume_text) != volume:
        raise ValueError(f"volume {volume_text!r} is not a whole number of shares >= 0")
    turnover_text = (row.get("turnover") or "").strip()
    turnover = _decimal(turnover_text, "turnover") if turnover_text else None
    lot_text = (row.get("lot_size") or "").strip()
    lot: int | None = None
    if lot_text:
        if not lot_text.isdigit() or int(lot_text) <= 0:
            raise ValueError(f"lot_size {lot_text!r} is not a positive whole number")
        lot = int(lot_text)
    name = (row.get("name") or "").strip() or None
    bar = BarRow(
        symbol, timeframe, start, prices["open"], prices["high"], prices["low"], prices["close"], volume, turnover
    )
    return bar, lot, name


def store_file(conn: psycopg.Connection[Any], path: Path, source: str | None = None) -> ImportResult:
    """Check ``path`` and store it in one transaction: all of it or, on any refusal, none of it."""
    bars, meta = parse_csv(path)
    source = source or f"csv:{path.name}"
    with conn.transaction():
        lots = dict(conn.execute("SELECT symbol, lot_size FROM instruments").fetchall())
        for symbol, (lot, _name) in meta.items():
            if lot is None and symbol not in lots:
                line = next(i for i, bar in enumerate(bars, start=2) if bar.symbol == symbol)
                raise HistoryImportError(
                    f"{path}, line {line}: {symbol} has no known lot size. Add a lot_size column (the board lot, "
                    "e.g. 100 for HK.00700) or import a file that has one first. Nothing of this file was stored."
                )
        # Bulk: the file goes to a temporary table, is compared with what is stored in one query, then inserted.
        conn.execute(
            "CREATE TEMP TABLE incoming_bars (line integer, symbol text, timeframe text, bar_start timestamptz, "
            "open numeric, high numeric, low numeric, close numeric, volume bigint, turnover numeric) ON COMMIT DROP"
        )
        with conn.cursor().copy(
            "COPY incoming_bars (line, symbol, timeframe, bar_start, open, high, low, close, volume, turnover) "
            "FROM STDIN"
        ) as copy:
            for line, bar in enumerate(bars, start=2):
                copy.write_row((line, *bar))
        clash = conn.execute(
            "SELECT i.line, i.symbol, i.timeframe, i.bar_start, m.open, m.high, m.low, m.close, m.volume "
            "FROM incoming_bars i JOIN market_bars m USING (symbol, timeframe, bar_start) "
            "WHERE (i.open, i.high, i.low, i.close, i.volume) "
            "IS DISTINCT FROM (m.open, m.high, m.low, m.close, m.volume) "
            "ORDER BY i.line LIMIT 1"
        ).fetchone()
        if clash is not None:
            line, symbol, timeframe, start, *stored = clash
            raise HistoryImportError(
                f"{path}, line {line}: contradicts the stored {timeframe} bar of {symbol} at "
                f"{start.astimezone(HKT):%Y-%m-%d %H:%M} (stored O/H/L/C/V {'/'.join(str(v) for v in stored)}). "
                "Nothing of this file was stored."
            )
        inserted = conn.execute(
            "INSERT INTO market_bars (symbol, timeframe, bar_start, open, high, low, close, volume, turnover, source) "
            "SELECT DISTINCT ON (symbol, timeframe, bar_start) symbol, timeframe, bar_start, open, high, low, close, "
            "volume, turnover, %s FROM incoming_bars ORDER BY symbol, timeframe, bar_start "
            "ON CONFLICT (symbol, timeframe, bar_start) DO NOTHING",
            (source,),
        ).rowcount
        unique = len({(bar.symbol, bar.timeframe, bar.start) for bar in bars})
        unchanged = unique - inserted
        for symbol, (lot, name) in meta.items():
            if lot is not None:
                conn.execute(
                    "INSERT INTO instruments (symbol, name, lot_size) VALUES (%s, %s, %s) ON CONFLICT (symbol) DO "
                    "UPDATE SET lot_size = EXCLUDED.lot_size, name = COALESCE(NULLIF(EXCLUDED.name, ''), "
                    "instruments.name), updated_at = now()",
                    (symbol, name or "", lot),
                )
            elif name:
                conn.execute("UPDATE instruments SET name = %s WHERE symbol = %s", (name, symbol))
    return ImportResult(path, len(bars), inserted, unchanged, sorted(meta))


class Coverage(NamedTuple):
    symbol: str
    timeframe: str
    first: date
    last: date
    days: int
    missing: list[date]


def coverage(conn: psycopg.Connection[Any]) -> list[Coverage]:
    """Per symbol and timeframe: first and last day, days with bars, and the XHKG sessions in between without."""
    rows = conn.execute(
        "SELECT symbol, timeframe, array_agg(DISTINCT (bar_start AT TIME ZONE 'Asia/Hong_Kong')::date) "
        "FROM market_bars GROUP BY symbol, timeframe ORDER BY symbol, timeframe"
    ).fetchall()
    out = []
    for symbol, timeframe, days in rows:
        present = sorted(days)
        sessions = [d for d in _xhkg().days if present[0] <= d <= present[-1]]
        missing = sorted(set(sessions) - set(present))
        out.append(Coverage(symbol, timeframe, present[0], present[-1], len(present), missing))
    return out


def missing_sessions(
    conn: psycopg.Connection[Any], symbols: Sequence[str], days: Iterable[date]
) -> dict[str, list[date]]:
    """Per symbol, the days among ``days`` without any recorded minute bar."""
    wanted = list(days)
    found: dict[str, set[date]] = {s: set() for s in symbols}
    if wanted:
        rows = conn.execute(
            "SELECT DISTINCT symbol, (bar_start AT TIME ZONE 'Asia/Hong_Kong')::date FROM market_bars "
            "WHERE timeframe = '1m' AND symbol = ANY(%s) AND bar_start >= %s AND bar_start < %s",
            (
                list(symbols),
                datetime.combine(min(wanted), time(0), HKT),
                datetime.combine(max(wanted), time(23, 59), HKT),
            ),
        ).fetchall()
        for symbol, day in rows:
            found[symbol].add(day)
    return {s: [d for d in wanted if d not in found[s]] for s in symbols if any(d not in found[s] for d in wanted)}
