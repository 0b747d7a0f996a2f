"""``scripts/history.py fetch``: recorded bars from OpenD into ``market_bars``, within the quota, resumable.

Futu's historical K-line quota counts distinct stocks per 30 days; a stock already counted in the window is
free to fetch again. The fetch reads the quota first, says how much it will use, and fetches only the stocks
that fit, stopping before it would run out. Requests are paced by the client's rate limiter (60 per 30 s).
Each (symbol, timeframe) range is stored in one transaction together with its days in ``history_fetches``, so
an interrupted fetch resumes with the first range it had not finished. Futu labels bars by their end; the
client converts them to bar starts. Minute bars outside continuous trading (Futu's closing-auction bar) are
not stored: the replay trades continuous sessions only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Protocol

import psycopg

from brokers.base import Bar, Quote
from data.calendar import _calendar as _xhkg

PAGE_SIZE = 1000


class HistoryClient(Protocol):
    """What the fetch needs from the gateway (``brokers.futu.FutuClient``)."""

    def history_quota(self) -> tuple[int, int, list[str]]: ...

    def history_page(
        self, symbol: str, timeframe: str, first: date, last: date, page_key: Any = None, page_size: int = PAGE_SIZE
    ) -> tuple[list[Bar], Any]: ...

    def snapshots(self, symbols: list[str]) -> list[Quote]: ...


@dataclass
class FetchResult:
    fetched: list[str] = field(default_factory=list)  # "HK.00700 1m" ranges completed in this run
    skipped: list[str] = field(default_factory=list)  # already fetched before (resume)
    over_quota: list[str] = field(default_factory=list)  # symbols left out to stay within the quota
    bars: int = 0


def _done_days(conn: psycopg.Connection[Any], symbol: str, timeframe: str, days: Sequence[date]) -> set[date]:
    rows = conn.execute(
        "SELECT day FROM history_fetches WHERE symbol = %s AND timeframe = %s AND day = ANY(%s)",
        (symbol, timeframe, list(days)),
    ).fetchall()
    return {r[0] for r in rows}


def _in_session(bar: Bar, timeframe: str) -> bool:
    session = _xhkg().session(bar.time.date())
    if session is None:
        return False
    if timeframe == "1d":
        return True
    return any(start <= bar.time < end for start, end in session.continuous_windows())


def fetch(
    conn: psycopg.Connection[Any],
    client: HistoryClient,
    symbols: Sequence[str],
    first: date,
    last: date,
    timeframes: Sequence[str],
    *,
    say: Callable[[str], None] = print,
) -> FetchResult:
    """Fetch ``symbols`` x ``timeframes`` over ``first..last`` (XHKG days), skipping ranges already fetched."""
    days = [d for d in _xhkg().days if first <= d <= last]
    result = FetchResult()
    todo: list[tuple[str, str, list[date]]] = []
    for symbol in symbols:
        for timeframe in timeframes:
            done = _done_days(conn, symbol, timeframe, days)
            missing = [d for d in days if d not in done]
            if missing:
                todo.append((symbol, timeframe, missing))
            else:
                result.skipped.append(f"{symbol} {timeframe}")
    if result.skipped:
        say(f"already fetched (skipped): {', '.join(result.skipped)}")
    if not todo:
        say("nothing to fetch: every range is already stored")
        return result
    used, remaining, counted = client.history_quota()
    needing = list(dict.fromkeys(s for s, _tf, _d in todo))
    new = [s for s in needing if s not in counted]
    allowed_new = new[:remaining]
    result.over_quota = new[remaining:]
    say(
        f"history quota: {used} used, {remaining} left; this fetch needs {len(new)} new stock(s) "
        f"({len(needing) - len(new)} already counted in the 30-day window)"
        + (f"; {len(result.over_quota)} will NOT be fetched to stay within the quota" if result.over_quota else "")
    )
    allowed = set(allowed_new) | (set(needing) - set(new))
    todo = [item for item in todo if item[0] in allowed]
    quotes = {q.symbol: q for q in client.snapshots(sorted(allowed))}
    for index, (symbol, timeframe, missing) in enumerate(todo, start=1):
        bars: list[Bar] = []
        page_key: Any = None
        pages = 0
        while True:
            page, page_key = client.history_page(symbol, timeframe, missing[0], missing[-1], page_key, PAGE_SIZE)
            bars.extend(page)
            pages += 1
            if not page_key:
                break
        kept = [b for b in bars if _in_session(b, timeframe) and b.time.date() in set(missing)]
        with conn.transaction():
            quote = quotes.get(symbol)
            if quote is not None:
                conn.execute(
                    "INSERT INTO instruments (symbol, name, lot_size) VALUES (%s, %s, %s) ON CONFLICT (symbol) DO "
                    "UPDATE SET lot_size = EXCLUDED.lot_size, name = EXCLUDED.name, updated_at = now()",
                    (symbol, quote.name, quote.lot_size),
                )
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO market_bars (symbol, timeframe, bar_start, open, high, low, close, volume, source) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, 'futu') ON CONFLICT (symbol, timeframe, bar_start) "
                    "DO NOTHING",
                    [(symbol, timeframe, b.time, b.open, b.high, b.low, b.close, b.volume) for b in kept],
                )
            per_day: dict[date, int] = {d: 0 for d in missing}
            for bar in kept:
                per_day[bar.time.date()] += 1
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO history_fetches (symbol, timeframe, day, bars) VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT (symbol, timeframe, day) DO UPDATE SET bars = EXCLUDED.bars, fetched_at = now()",
                    [(symbol, timeframe, d, n) for d, n in per_day.items()],
                )
        result.fetched.append(f"{symbol} {timeframe}")
        result.bars += len(kept)
        say(
            f"[{index}/{len(todo)}] {symbol} {timeframe} {missing[0]}..{missing[-1]}: {len(kept)} bars in "
            f"{pages} page(s)"
        )
    return result
