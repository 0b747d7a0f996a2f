"""The recorded feed's bars: ``market_bars`` and ``instruments`` loaded (read-only) into a ``MemoryStore``.

Loads the replay days plus the history the tools look back over (daily bars for ~200 sessions, minute bars for
the 3 sessions before), and refuses to start when a symbol lacks minute bars on a replay day, listing them.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import date, datetime, time
from typing import Any

import numpy as np

from config.settings import Secrets, Settings
from replay.feed import (
    HKT,
    DailyBar,
    InstrumentInfo,
    MemoryStore,
    SessionBars,
    price_to_milli,
    sessions_before,
    sessions_between,
)

DAILY_LOOKBACK_SESSIONS = 200
MINUTE_LOOKBACK_SESSIONS = 3


def load_recorded(settings: Settings, secrets: Secrets, first: date, last: date) -> MemoryStore:
    """The recorded history for ``first..last``. Raises MissingData naming every missing symbol/day."""
    from data.history import missing_sessions
    from replay.journal import open_history_reader
    from replay.runner import MissingData

    days = sessions_between(first, last)
    with open_history_reader(settings, secrets) as conn:
        if conn.execute("SELECT to_regclass('market_bars')").fetchone()[0] is None:
            raise MissingData(
                "No market history is stored yet. Import CSV files (python scripts/history.py import FILE.csv) or "
                "fetch from OpenD (python scripts/history.py fetch ...), or run with --feed synthetic."
            )
        instruments = {
            symbol: InstrumentInfo(symbol, name, lot)
            for symbol, name, lot in conn.execute("SELECT symbol, name, lot_size FROM instruments ORDER BY symbol")
        }
        minute_from = sessions_before(first, MINUTE_LOOKBACK_SESSIONS)[0]
        daily_from = sessions_before(first, DAILY_LOOKBACK_SESSIONS)[0]
        symbols = [
            s
            for (s,) in conn.execute(
                "SELECT DISTINCT symbol FROM market_bars WHERE timeframe = '1m' AND bar_start >= %s AND bar_start < %s",
                (_start(first), _end(last)),
            )
            if s in instruments
        ]
        if not symbols:
            raise MissingData(
                f"No recorded minute bars between {first} and {last}. Run python scripts/history.py list to see what "
                "is stored; import or fetch those days, or run with --feed synthetic."
            )
        missing = missing_sessions(conn, symbols, days)
        if missing:
            lines = [f"{s}: {', '.join(d.isoformat() for d in ds)}" for s, ds in sorted(missing.items())]
            raise MissingData(
                "The recorded history lacks minute bars the replay needs (symbol: days):\n  "
                + "\n  ".join(lines)
                + "\nImport or fetch them (scripts/history.py), or shorten the range."
            )
        store = MemoryStore({s: instruments[s] for s in symbols})
        _load_minutes(conn, store, symbols, minute_from, last)
        for symbol, day, o, h, lo, c, v in conn.execute(
            "SELECT symbol, (bar_start AT TIME ZONE 'Asia/Hong_Kong')::date, open, high, low, close, volume "
            "FROM market_bars WHERE timeframe = '1d' AND symbol = ANY(%s) AND bar_start >= %s AND bar_start < %s",
            (symbols, _start(daily_from), _end(last)),
        ):
            store.put_daily(symbol, day, DailyBar(*(_milli(x) for x in (o, h, lo, c)), int(v)))
    return store


def _start(day: date) -> datetime:
    return datetime.combine(day, time(0), HKT)


def _end(day: date) -> datetime:
    return datetime.combine(day, time(23, 59, 59), HKT)


def _milli(value: Any) -> int:
    return price_to_milli(value)


def _load_minutes(conn: Any, store: MemoryStore, symbols: list[str], first: date, last: date) -> None:
    rows: dict[tuple[str, date], list[tuple[int, int, int, int, int, int]]] = defaultdict(list)
    for symbol, start, o, h, lo, c, v in conn.execute(
        "SELECT symbol, bar_start, open, high, low, close, volume FROM market_bars WHERE timeframe = '1m' "
        "AND symbol = ANY(%s) AND bar_start >= %s AND bar_start < %s ORDER BY symbol, bar_start",
        (symbols, _start(first), _end(last)),
    ):
        when = start.astimezone(HKT)
        rows[(symbol, when.date())].append((int(when.timestamp()), _milli(o), _milli(h), _milli(lo), _milli(c), int(v)))
    for (symbol, day), bars in rows.items():
        array = np.array(bars, dtype=np.int64)
        store.put_session(symbol, day, SessionBars(*(array[:, k].copy() for k in range(6))))
