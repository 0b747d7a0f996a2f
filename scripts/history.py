#!/usr/bin/env python3
"""Market history for replays, in the journal's ``market_bars`` and ``instruments`` tables.

    python scripts/history.py import FILE.csv [FILE ...]     # CSV bars (README "Replay" for the columns)
    python scripts/history.py fetch --symbols 700,5 --from 2026-09-01 --to 2026-09-30 [--timeframe 1m,1d]
                                                            # from OpenD (quote data only), within the quota
    python scripts/history.py list                          # coverage per symbol: first/last day, gaps

Exit codes: 0 done, 2 a file was refused (the message names file, line and reason; nothing of it was stored)
or bad arguments, 3 OpenD unreachable or failing (a rerun resumes where the fetch stopped), 4 some symbols were
left out to stay within the history quota, 1 unexpected error.
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config", metavar="PATH", help="settings file (default: $CATALYST_CONFIG or config/settings.yaml)"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="store CSV bars (each file all or nothing)")
    imp.add_argument("files", nargs="+", type=Path, metavar="FILE.csv")
    fetch = commands.add_parser("fetch", help="bars from OpenD (request_history_kline), resumable")
    fetch.add_argument("--symbols", required=True, help="comma-separated, any spelling: 700,0005,HK.09988")
    fetch.add_argument("--from", dest="first", required=True, type=date.fromisoformat, metavar="YYYY-MM-DD")
    fetch.add_argument("--to", dest="last", required=True, type=date.fromisoformat, metavar="YYYY-MM-DD")
    fetch.add_argument("--timeframe", default="1m,1d", help="1m, 1d or both (default 1m,1d)")
    commands.add_parser("list", help="coverage per symbol and timeframe")
    return parser.parse_args(argv)


def connect(config: str | None) -> Any:
    """A connection to the live journal's database, migrated (the history tables live there)."""
    import psycopg

    from config.settings import Secrets, load_settings
    from data.database import Journal
    from replay.journal import live_dsn

    settings = load_settings(config)
    secrets = Secrets.from_env()
    dsn = live_dsn(settings, secrets)
    with Journal.connect(dsn) as journal:
        journal.migrate()
    return psycopg.connect(dsn, autocommit=True)


def run_import(conn: Any, files: list[Path]) -> int:
    from data.history import HistoryImportError, store_file

    refused = 0
    for path in files:
        try:
            result = store_file(conn, path)
        except HistoryImportError as exc:
            refused += 1
            print(f"REFUSED {exc}", file=sys.stderr)
            continue
        print(
            f"{path}: {result.rows} rows, {result.inserted} new, {result.unchanged} already stored "
            f"({', '.join(result.symbols)})"
        )
    return 2 if refused else 0


def run_fetch(conn: Any, args: argparse.Namespace) -> int:
    from brokers.futu import FutuClient
    from brokers.hkex import normalize_symbol
    from config.errors import AgentError, BrokerRequestRefused, BrokerTemporaryError, BrokerUnavailable
    from config.settings import load_settings
    from data.history_fetch import fetch

    try:
        symbols = list(dict.fromkeys(normalize_symbol(s) for s in args.symbols.split(",") if s.strip()))
    except ValueError as exc:
        print(f"error: --symbols: {exc}", file=sys.stderr)
        return 2
    timeframes = [t.strip() for t in args.timeframe.split(",") if t.strip()]
    if not symbols or not timeframes or any(t not in ("1m", "1d") for t in timeframes) or args.last < args.first:
        print("error: give --symbols, --timeframe 1m and/or 1d, and --from on or before --to", file=sys.stderr)
        return 2
    settings = load_settings(args.config)
    try:
        client = FutuClient(settings.broker.futu, quote_only=True)
    except AgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    try:
        result = fetch(conn, client, symbols, args.first, args.last, timeframes, say=lambda t: print(t, flush=True))
    except (BrokerTemporaryError, BrokerUnavailable) as exc:
        print(f"error: {exc} What was fetched is stored; run the same command again to resume.", file=sys.stderr)
        return 3
    except BrokerRequestRefused as exc:  # OpenD refused one request outright (the futu client no longer retries it)
        print(
            f"error: {exc} What was fetched is stored; fix the cause (or leave that symbol out), then run the same "
            "command again to resume.",
            file=sys.stderr,
        )
        return 3
    finally:
        client.close()
    print(f"done: {len(result.fetched)} range(s), {result.bars} bars stored")
    if result.over_quota:
        print(
            f"NOT fetched (history quota): {', '.join(result.over_quota)}. The quota counts stocks per 30 days; "
            "fetch them when it frees up.",
            file=sys.stderr,
        )
        return 4
    return 0


def run_list(conn: Any) -> int:
    from data.history import coverage

    rows = coverage(conn)
    if not rows:
        print("No market history stored. Import CSV files: python scripts/history.py import FILE.csv")
        return 0
    print(f"{'symbol':<10} {'tf':<3} {'first':<10} {'last':<10} {'days':>5}  missing sessions")
    for row in rows:
        shown = ", ".join(d.isoformat() for d in row.missing[:8]) + (" ..." if len(row.missing) > 8 else "")
        print(
            f"{row.symbol:<10} {row.timeframe:<3} {row.first} {row.last} {row.days:>5}  "
            f"{len(row.missing)}{': ' + shown if row.missing else ''}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import logging
    from datetime import datetime

    from config.errors import AgentError
    from config.logs import configure_logging

    configure_logging(None, datetime.now().astimezone())  # console only (stderr); this script prints its own lines
    logging.getLogger().setLevel(logging.WARNING)

    try:
        conn = connect(args.config)
    except AgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    with conn:
        if args.command == "import":
            return run_import(conn, args.files)
        if args.command == "fetch":
            return run_fetch(conn, args)
        return run_list(conn)


if __name__ == "__main__":
    sys.exit(main())
