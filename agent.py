#!/usr/bin/env python3
"""Catalyst International: one HKEX trading cycle (or one guard pass), then exit.

The composition root: parses flags, loads settings, opens journal, broker and market data, runs the cycle,
and exits with a code that says what happened (DESIGN.md §2). Heavy libraries are imported lazily so
``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

HKT = ZoneInfo("Asia/Hong_Kong")

EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_BROKER, EXIT_HALTED, EXIT_LOCKED = 0, 1, 2, 3, 4, 5

EPILOG = """\
exit codes:
  0  done (including "market closed, nothing to do")
  1  unexpected error (see the run_failed line in logs/agent-YYYYMMDD.log)
  2  bad configuration (the message names the setting)
  3  broker/gateway unreachable (start OpenD: docker compose -f docker-compose.opend.yml up -d)
  4  halted by a risk limit or the kill switch (entries blocked; exits still run)
  5  another instance holds the account lock

environment:
  ANTHROPIC_API_KEY, ANTHROPIC_BASE_URL   Claude (the key is only read from the environment)
  DATABASE_URL                            journal server; unset = embedded PostgreSQL in var/pg
  OPEND_HOST, OPEND_PORT, FUTU_TRADE_PWD  Futu OpenD gateway (password used for REAL accounts only)
  CATALYST_CONFIG                         settings file (default config/settings.yaml)
  SMTP_HOST, SMTP_PORT, SMTP_USER, SMTP_PASS, ALERT_EMAIL   alerts

examples:
  python agent.py --dry-run --broker sim --brain rules --now 2026-11-20T10:15:00+08:00
  python agent.py                  # one cycle with the configured broker and Claude
  python agent.py --guard          # stops, take-profits, time stops, daily loss limit; no model
  python agent.py --check          # did today's scheduled cycles run? (alerts once per missed cycle)
  python agent.py --lessons        # what the agent learned from its trades; --lessons disable ID
  python agent.py --report 2026-11-02..2026-11-27 --out month.html   # an HTML report of a period
  python agent.py --replay 2026-09-01..2026-09-29 --brain rules --json score.json   # past days, scored
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="agent.py",
        description=(
            "Run one HKEX trading cycle: read account and market, let the brain decide through tool calls, "
            "pass every call through the safety layer, execute what is allowed, journal everything, exit."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--dry-run",
        action="store_true",
        help="full cycle with real reads, but orders are only journalled (status dry_run), never sent",
    )
    mode.add_argument(
        "--guard",
        action="store_true",
        help="no model: reconcile, enforce stops/take-profits/time stops and the daily loss limit, exit",
    )
    mode.add_argument(
        "--check",
        action="store_true",
        help="no broker, no model: alert if a scheduled cycle (09:30, 13:00 HKT) did not run today; "
        "exit 0 if none was missed, 1 if one was",
    )
    mode.add_argument(
        "--lessons",
        nargs="*",
        metavar="disable|enable ID",
        help="list the lessons the agent wrote about its own trades; 'disable ID' / 'enable ID' toggles one",
    )
    mode.add_argument(
        "--report",
        nargs="?",
        const="today",
        metavar="PERIOD",
        help="no broker, no model: write one self-contained HTML report of what the agent did and print its path; "
        "PERIOD is today (default), YYYY-MM-DD, FROM..TO or replay:RUN_ID",
    )
    mode.add_argument(
        "--digest",
        action="store_true",
        help="today's report by e-mail (headline numbers, trades, refusals; the page attached), for cron after "
        "the close",
    )
    parser.add_argument("--out", metavar="PATH", help="where --report/--digest writes the page (default reports/)")
    mode.add_argument(
        "--replay",
        metavar="FROM..TO",
        help="run the agent over past XHKG trading days (e.g. 2026-10-05..2026-10-30) with a replay clock, feed "
        "and broker, in its own database; prints the score (README 'Replay')",
    )
    parser.add_argument("--broker", choices=["futu", "ibkr", "sim"], help="override broker.name from the settings")
    parser.add_argument("--brain", choices=["claude", "rules"], help="override agent.brain from the settings")
    parser.add_argument(
        "--config", metavar="PATH", help="settings file (default: $CATALYST_CONFIG or config/settings.yaml)"
    )
    parser.add_argument(
        "--now",
        metavar="ISO-8601",
        help="run as if the clock read this time, e.g. 2026-11-20T10:15:00+08:00 (sim broker or paper trading "
        "only; refused for REAL accounts)",
    )
    parser.add_argument(
        "--live",
        action="store_true",
        help="confirm trading a REAL account (needs broker.futu.trd_env: REAL or broker.ibkr.trading_mode: live "
        "too; paper is the default)",
    )
    replay = parser.add_argument_group("replay (with --replay)")
    replay.add_argument("--feed", choices=["recorded", "synthetic"], help="override replay.feed from the settings")
    replay.add_argument("--compare", choices=["rules"], help="also run the rules brain on the same days, side by side")
    replay.add_argument("--anonymize", action="store_true", help="hide symbols and names from the model")
    replay.add_argument(
        "--reflection", choices=["on", "off"], help="lessons in a Claude replay (default reflection.enabled)"
    )
    replay.add_argument("--seed", type=int, metavar="N", help="synthetic market seed (default broker.sim.seed)")
    replay.add_argument("--max-cost-usd", type=float, metavar="X", help="stop a Claude replay before it spends more")
    replay.add_argument("--json", metavar="PATH", help="write the score as JSON (DESIGN.md section 7)")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug lines on the console too, and the traceback of a failure (always in the log file; "
        "CATALYST_RAISE=1 re-raises it)",
    )
    return parser.parse_args(argv)


def parse_now(text: str | None) -> datetime | None:
    """``--now`` as an aware datetime (naive times are Hong Kong time)."""
    if text is None:
        return None
    from config.errors import ConfigError

    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--now {text!r} is not an ISO-8601 time; write e.g. 2026-11-20T10:15:00+08:00") from None
    return value if value.tzinfo else value.replace(tzinfo=HKT)


def make_clock(start: datetime | None):
    """The run's clock: real time, or ``--now`` advancing with the real elapsed time."""
    if start is None:
        return lambda: datetime.now(HKT)
    origin = time.monotonic()
    start = start.astimezone(HKT)
    return lambda: start + timedelta(seconds=time.monotonic() - origin)


@dataclass
class Run:
    """What a run opened, so the top level can close and journal it whatever happens."""

    run_id: str
    journal: Any = None
    cycle_id: int | None = None
    broker: Any = None
    alerter: Any = None
    loop: Any = None  # brain.LoopResult of the running cycle: tokens and cost spent so far
    brain: Any = None  # a brain to use instead of the configured one (the replay's cached Claude)
    one_shot: bool = False  # this process runs this one command and exits (agent.py itself, as cron runs it)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = Run(run_id=uuid.uuid4().hex, one_shot=True)
    try:
        return execute(args, run)
    except Exception as exc:  # the one place every failure becomes a line and an exit code
        from config.logs import ensure_logging

        ensure_logging(args.config, datetime.now(HKT), verbose=args.verbose)  # failed before logging was set up
        return fail(exc, run)
    finally:
        close_run(run)


def execute(args: argparse.Namespace, run: Run) -> int:
    from config.errors import ConfigError
    from config.logs import configure_logging
    from config.settings import Secrets, load_settings

    overrides: dict[str, dict[str, Any]] = {}
    if args.broker:
        overrides["broker"] = {"name": args.broker}
    if args.brain:
        overrides["agent"] = {"brain": args.brain}
    settings = load_settings(args.config, overrides=overrides)
    now_override = parse_now(args.now)
    clock = make_clock(now_override)
    log_file = configure_logging(settings.resolve(settings.agent.log_dir), clock(), verbose=args.verbose)

    import structlog

    if args.replay:  # past days with a replay clock, feed and broker, through the same cycle and guard
        from replay.runner import replay_main

        return replay_main(args, run, settings, Secrets.from_env())
    mode = "guard" if args.guard else "dry_run" if args.dry_run else "check" if args.check else "trade"
    mode = "lessons" if args.lessons is not None else mode
    real = settings.broker.name == "futu" and settings.broker.futu.trd_env == "REAL"
    real = real or (settings.broker.name == "ibkr" and settings.broker.ibkr.trading_mode == "live")
    structlog.contextvars.bind_contextvars(run_id=run.run_id[:12], mode="live" if real else "sim")
    log = structlog.get_logger("agent")
    if args.report is not None or args.digest:  # reads the journal only: no broker, no account, no model
        from report.cli import run_digest, run_report

        return (run_report if args.report is not None else run_digest)(args, settings, Secrets.from_env(), clock)
    if args.out is not None:
        raise ConfigError("--out only goes with --report or --digest.")
    if now_override is not None and real:
        raise ConfigError(
            "--now is refused because this run could reach a REAL account (broker.futu.trd_env: REAL or "
            "broker.ibkr.trading_mode: live). Use --broker sim or a paper account to replay a time."
        )
    if real and not args.live:
        raise ConfigError(
            "The settings select a REAL account (broker.futu.trd_env: REAL or broker.ibkr.trading_mode: live) but "
            "--live was not given. Real-money trading needs both; run with --live to confirm, or configure the "
            "paper account."
        )
    secrets = Secrets.from_env()
    log.info(
        "run_started",
        cycle_mode=mode,
        broker=settings.broker.name,
        brain=settings.agent.brain,
        now=clock().isoformat(timespec="seconds"),
        log_file=str(log_file) if log_file else None,
    )
    log.debug("settings_loaded", settings=settings.redacted(), source=str(settings.source))

    if mode == "check":
        return check_schedule(run, settings, secrets, clock, log)
    if mode == "lessons":
        from data.database import Journal
        from reflection import lessons_command, parse_lessons_args

        parse_lessons_args(args.lessons)  # a typo exits 2 before the journal is even opened
        run.journal = Journal.open(settings, secrets)
        return lessons_command(run.journal, args.lessons, sys.stdout)
    return open_and_run(args, run, settings, secrets, clock, mode, log)


# ------------------------------------------------------------------------------------------ missed runs

MISSED_RUN_GRACE = timedelta(minutes=15)


def scheduled_cycles(session: Any) -> list[datetime]:
    """The cron cycles of a trading day: the morning open and, unless a half day, the afternoon open."""
    times = [session.open]
    if session.break_end is not None:
        times.append(session.break_end)
    return times


def missed_cycles(now: datetime, scheduled: list[datetime], started: list[datetime]) -> list[datetime]:
    """Scheduled times, past their grace period, with no cycle started from 5 minutes before to the grace."""
    missed = []
    for due in scheduled:
        if now < due + MISSED_RUN_GRACE:
            continue
        window_start, window_end = due - timedelta(minutes=5), due + MISSED_RUN_GRACE
        if not any(window_start <= t <= window_end for t in started):
            missed.append(due)
    return missed


def check_schedule(run: Run, settings: Any, secrets: Any, clock: Any, log: Any) -> int:
    """``--check``: compare today's journal with the calendar; alert once per missed cycle."""
    from data.alerts import Alerter
    from data.calendar import trading_session
    from data.database import Journal

    run.alerter = Alerter(settings.alerts, secrets.smtp_password, None)
    run.journal = Journal.open(settings, secrets)
    run.alerter = Alerter(settings.alerts, secrets.smtp_password, run.journal)
    now = clock()
    session = trading_session(now.date())
    if session is None:
        log.info("schedule_checked", missed=[], note="not a trading day")
        return EXIT_OK
    started = [c.started_at for c in run.journal.cycles_on(now.date()) if c.mode in ("trade", "dry_run")]
    missed = missed_cycles(now, scheduled_cycles(session), started)
    for due in missed:
        flag = f"missed_run_alert:{due:%Y-%m-%d %H:%M}"
        if run.journal.get_flag(flag) is None:
            run.journal.set_flag(flag, "alerted", "check")
            run.alerter.send(
                f"Missed trading cycle at {due:%H:%M} HKT",
                f"No trading cycle started between {due - timedelta(minutes=5):%H:%M} and "
                f"{due + MISSED_RUN_GRACE:%H:%M} HKT on {due:%Y-%m-%d}. Check cron (crontab -l), "
                "logs/cron.log and the gateway.",
                priority="high",
                event="missed_run",
            )
    log.info("schedule_checked", missed=[f"{d:%H:%M}" for d in missed], cycles_today=len(started))
    if missed:
        print(f"missed scheduled cycle(s) at {', '.join(f'{d:%H:%M}' for d in missed)} HKT", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


# ------------------------------------------------------------------------------------------ composition


def build_sources(settings: Any, secrets: Any, clock: Any, live: bool) -> tuple[Any, Any]:
    """(broker, market data source) for the configured broker: the one place that chooses."""
    from decimal import Decimal

    if settings.broker.name == "sim":
        from brokers.sim import SimBroker, SimExchange

        sim = settings.broker.sim
        exchange = SimExchange(
            seed=sim.seed,
            clock=clock,
            state_file=settings.resolve(sim.state_file),
            starting_cash=sim.starting_cash_hkd,
            commission_pct=sim.commission_pct,
            min_commission=sim.min_commission_hkd,
        )
        return SimBroker(exchange, account_kind=sim.account_kind), exchange
    if settings.broker.name == "ibkr":
        from brokers.ibkr import IbkrClient

        ibkr = IbkrClient(settings.broker.ibkr, live_confirmed=live, clock=clock)
        return ibkr, ibkr
    from brokers.futu import FutuClient

    futu = settings.broker.futu
    # The trade password is only handed over for a confirmed REAL run: paper trading never unlocks.
    client = FutuClient(
        futu,
        trade_password=secrets.futu_trade_pwd if (live and futu.trd_env == "REAL") else None,
        live_confirmed=live,
        commission_pct=Decimal(str(futu.commission_pct)),
        min_commission_hkd=futu.min_commission_hkd,
        clock=clock,
    )
    return client, client


def open_and_run(
    args: argparse.Namespace, run: Run, settings: Any, secrets: Any, clock: Any, mode: str, log: Any
) -> int:
    """Open the journal, take the lock, connect, and run one cycle or one guard pass."""
    from brokers.dry_run import DryRunBroker
    from data.alerts import Alerter
    from data.calendar import market_status
    from data.database import Journal

    # An alerter before the journal, so "the journal is down" can itself be alerted.
    run.alerter = Alerter(settings.alerts, secrets.smtp_password, None)
    from data.housekeeping import check_disk_before_run

    check_disk_before_run(settings, secrets, mode)  # a full disk stops a cycle here, before any journal write
    run.journal = Journal.open(settings, secrets)
    run.alerter = Alerter(settings.alerts, secrets.smtp_password, run.journal)
    now = clock()
    status = market_status(now)
    if mode != "guard" and not status.is_continuous:
        cycle_id = begin_cycle(run, settings, mode, now)
        run.journal.finish_cycle(cycle_id, status="skipped", finished_at=clock(), summary=status.description)
        log.info("market_closed", status=status.description, next_open=status.next_open.isoformat(timespec="minutes"))
        return EXIT_OK
    lock_key = f"{settings.broker.name}:{settings.broker.futu.trd_env if settings.broker.name == 'futu' else 'sim'}"
    if settings.broker.name == "ibkr":
        lock_key = f"ibkr:{settings.broker.ibkr.account or settings.broker.ibkr.trading_mode}"
    holder = acquire_account_lock(run.journal, lock_key, mode, run, settings.agent.lock_wait_s, log)
    if holder is not None:
        from config.errors import LockHeld

        raise LockHeld(f"Another agent instance holds the lock for {lock_key}: {holder}. Try again when it finishes.")
    run.cycle_id = begin_cycle(run, settings, mode, now)
    run.alerter.cycle_id = run.cycle_id
    broker, source = build_sources(settings, secrets, clock, args.live)
    run.broker = broker
    if mode == "dry_run":
        broker = DryRunBroker(broker, clock)
    return dispatch(settings, secrets, run, broker, source, clock, mode, log)


def begin_cycle(run: Run, settings: Any, mode: str, now: datetime, broker_name: str | None = None) -> int:
    """Journal the start of a cycle or guard pass; returns its id."""
    brain_name = "none" if mode == "guard" else settings.agent.brain
    model = None if mode == "guard" else (settings.claude.model if brain_name == "claude" else "rules-v1")
    return run.journal.start_cycle(
        run_id=run.run_id, mode=mode, broker=broker_name or settings.broker.name, brain=brain_name, model=model,
        started_at=now, trading_date=now.date(),
    )  # fmt: skip


def dispatch(settings: Any, secrets: Any, run: Run, broker: Any, source: Any, clock: Any, mode: str, log: Any) -> int:
    """One guard pass or one trading cycle against the given clock, broker and market data source.

    The live run and the replay (``replay.runner``) both come through here: only what is injected differs.
    """
    if mode == "guard":
        return run_guard(settings, run, broker, source, clock, log)
    return run_cycle(settings, secrets, run, broker, source, clock, mode, log)


def acquire_account_lock(journal: Any, lock_key: str, mode: str, run: Run, wait_s: float, log: Any) -> str | None:
    """Take the account lock; None when taken, else who holds it.

    A guard never waits (it yields to a running cycle at once: the next pass is 5 minutes away). A trading cycle
    that finds a guard pass holding the lock waits up to ``wait_s`` for it: a guard takes about a second, and
    the cycle must not be lost to it. A cycle never waits for another cycle.
    """
    me = f"{mode} run {run.run_id[:12]} pid {os.getpid()}"
    holder = journal.try_lock(lock_key, me)
    if holder is None or mode == "guard" or not holder.startswith("guard"):
        return holder
    log.info("waiting_for_guard", holder=holder, max_wait_s=wait_s)
    deadline = time.monotonic() + wait_s
    while holder is not None and holder.startswith("guard") and time.monotonic() < deadline:
        time.sleep(0.25)
        holder = journal.try_lock(lock_key, me)
    return holder


# ------------------------------------------------------------------------------------------------ cycle


def make_context(settings: Any, run: Run, broker: Any, source: Any, clock: Any, dry_run: bool) -> Any:
    from data.calendar import market_status
    from data.database import PgConstituentCache, PgKlineCache
    from data.market import MarketService, MemoryKlineCache
    from data.news import NewsService
    from tool_executor import CycleContext

    # Real K-lines are cached in PostgreSQL (Futu's history quota counts stocks per 30 days). The sim's
    # bars depend on its seed, so they are never persisted: a changed seed must not meet stale bars.
    cache = PgKlineCache(run.journal) if settings.broker.name == "futu" else MemoryKlineCache()
    market = MarketService(
        source,
        clock,
        kline_cache=cache,
        quote_ttl_s=settings.agent.quote_ttl_s,
        batch=settings.agent.market_batching,
        constituent_cache=PgConstituentCache(run.journal) if settings.broker.name == "futu" else None,
    )
    return CycleContext(
        settings=settings,
        clock=clock,
        broker=broker,
        market=market,
        news=NewsService(source, clock),
        journal=run.journal,
        alerter=run.alerter,
        cycle_id=run.cycle_id,
        run_id=run.run_id,
        dry_run=dry_run,
        market_status=lambda: market_status(clock(), market.market_state()),
    )


def kill_switch_reason(settings: Any, journal: Any) -> str | None:
    """Rule 15: the HALT file or the journal's ``halt`` flag."""
    halt_file = settings.resolve(settings.risk.halt_file)
    if halt_file.exists():
        return f"kill switch file {halt_file} exists (delete it to resume entries)"
    flag = journal.get_flag("halt")
    if flag:
        return f"kill switch flag set in the journal: {flag} (clear the 'halt' row in control_flags to resume)"
    return None


def reconcile_orders(ctx: Any, log: Any) -> list[str]:
    """Settle orders the journal still thinks are live from the broker's answer; return the unresolved ones."""
    from brokers.base import OrderStatus
    from tool_executor import record_order_state

    unresolved = []
    for row in ctx.journal.unresolved_orders():
        if row.status == OrderStatus.DRY_RUN:
            continue
        try:
            found = ctx.broker.find_order(row.client_order_id)
        except Exception as exc:
            log.warning("reconcile_lookup_failed", client_order_id=row.client_order_id, error=str(exc))
            unresolved.append(row.client_order_id)
            continue
        if found is None:
            if row.status not in (OrderStatus.PENDING, OrderStatus.UNKNOWN):
                continue
            if row.trading_date < ctx.trading_date:
                # The broker's order history (today's and past days') does not have it a session later: it never
                # reached the broker, and HK day orders cannot surface afterwards. Settle it; entries resume.
                ctx.journal.update_order(
                    row.client_order_id,
                    status=OrderStatus.CANCELLED,
                    reason=f"never reached the broker (not in its order history on {ctx.trading_date})",
                    at=ctx.clock(),
                )
                log.warning("order_never_sent", client_order_id=row.client_order_id, status_was=row.status.value)
                continue
            unresolved.append(row.client_order_id)
            continue
        if found.status != row.status or found.filled_quantity != row.filled_quantity:
            record_order_state(ctx, row.client_order_id, found)
            log.info("order_reconciled", client_order_id=row.client_order_id, status=found.status.value)
        if found.status == OrderStatus.UNKNOWN:
            unresolved.append(row.client_order_id)
    return unresolved


@dataclass
class Reconciliation:
    unresolved: list[str]  # client_order_ids whose fate is unknown: entries stay blocked
    adopted: list[str]  # positions the journal did not know, now under a default stop
    rearmed: list[str]  # REAL accounts: broker-side stops placed again


def reconcile(ctx: Any, run: Run, log: Any) -> Reconciliation:
    """Before any decision: settle orders, adopt unknown positions, sync stops, keep every position protected."""
    from decimal import Decimal

    from brokers import hkex
    from brokers.base import OrderStatus, Side
    from tool_executor import ensure_protection, is_working_entry, live_stops, stop_trigger, uses_broker_stops

    journal, risk = ctx.journal, ctx.settings.risk
    unresolved = reconcile_orders(ctx, log)
    ctx.view.invalidate()
    positions = ctx.view.positions()
    stops = journal.protective_stops()
    if ctx.dry_run:  # a dry run reads; adopting positions or dropping stops is for real runs and the guard
        unknown = sorted(set(positions) - set(stops))
        if unknown:
            log.warning("positions_without_stop", positions=unknown, note="a real run or the guard adopts them")
        return Reconciliation(unresolved=unresolved, adopted=[], rearmed=[])
    adopted: list[str] = []
    recovered: list[str] = []
    entries_today = [
        o for o in journal.orders_on(ctx.trading_date)
        if o.side == Side.BUY and o.stop_loss is not None and o.filled_quantity > 0
        and o.status not in (OrderStatus.DRY_RUN, OrderStatus.REJECTED)
    ]  # fmt: skip
    for symbol, position in positions.items():
        stop = stops.get(symbol)
        if stop is None:
            journalled = [o for o in entries_today if o.symbol == symbol]
            if journalled:  # an order whose fate was settled later: it keeps the stop and target it was sent with
                entry = journalled[-1]
                assert entry.stop_loss is not None
                price = stop_trigger(entry.stop_loss, ctx.trading_date)
                journal.upsert_protective_stop(
                    symbol, quantity=position.quantity, entry_price=entry.avg_fill_price or position.avg_cost,
                    stop_loss=price, take_profit=entry.take_profit, source="entry", cycle_id=ctx.cycle_id,
                )  # fmt: skip
                recovered.append(f"{symbol} ({position.quantity}, stop {price}, target {entry.take_profit})")
                continue
            raw = position.avg_cost * (1 - Decimal(str(risk.default_stop_pct)))
            price = stop_trigger(raw, ctx.trading_date) if raw >= hkex.MIN_PRICE else hkex.MIN_PRICE
            journal.upsert_protective_stop(
                symbol, quantity=position.quantity, entry_price=position.avg_cost, stop_loss=price,
                take_profit=None, source="adopted", cycle_id=ctx.cycle_id,
            )  # fmt: skip
            adopted.append(f"{symbol} ({position.quantity} @ {position.avg_cost}, stop {price})")
        elif stop.quantity != position.quantity:
            journal.upsert_protective_stop(
                symbol, quantity=position.quantity, entry_price=stop.entry_price, stop_loss=stop.stop_loss,
                take_profit=stop.take_profit, broker_stop_order_id=stop.broker_stop_order_id, source=stop.source,
                cycle_id=ctx.cycle_id,
            )  # fmt: skip
    working_entries = {o.symbol for o in ctx.view.open_orders() if is_working_entry(o)}
    for symbol in set(stops) - set(positions) - working_entries:
        journal.delete_protective_stop(symbol)  # flat: the stop has nothing left to protect
    if recovered:
        log.warning("positions_recovered", positions=recovered)
    if adopted:
        log.warning("positions_adopted", positions=adopted)
        run.alerter.send(
            "Positions adopted with a default stop",
            "The journal did not know: " + "; ".join(adopted) + f". Each now has a {risk.default_stop_pct:.0%} stop.",
            priority="high",
            event="reconciliation_mismatch",
        )
    rearmed: list[str] = []
    if uses_broker_stops(ctx):
        failures: list[str] = []
        for symbol in sorted(positions):  # each position on its own: one failure does not leave the others bare
            row = journal.protective_stops().get(symbol)
            had = row.broker_stop_order_id if row is not None else None
            vanished = had is not None and had not in {o.broker_order_id for o in live_stops(ctx, symbol)}
            try:
                action = ensure_protection(ctx, symbol)
            except Exception as exc:
                failures.append(f"{symbol}: {exc}")
                log.error("protection_failed", symbol=symbol, error=str(exc))
                continue
            if action == "armed" and vanished:
                rearmed.append(symbol)
        if rearmed:
            run.alerter.send(
                "Broker-side stops re-armed",
                f"The stop orders of {', '.join(rearmed)} had vanished at the broker; they were placed again.",
                priority="high",
                event="guard_action",
            )
        if failures:
            run.alerter.send(
                "Could not protect positions",
                "Broker-side stops could not be checked or placed for: " + "; ".join(failures),
                priority="high",
                event="guard_action",
            )
    return Reconciliation(unresolved=unresolved, adopted=adopted + recovered, rearmed=rearmed)


def record_day_baseline(ctx: Any, log: Any) -> None:
    """The daily loss baseline: written by whichever run comes first on a trading day (cycle or guard), from the
    broker's previous-close equity when it reports one, else the equity the first run sees."""
    account = ctx.view.account()
    baseline = account.prev_close_equity if account.prev_close_equity else account.equity
    if ctx.journal.record_equity_snapshot(ctx.trading_date, "start_of_day", baseline, account.cash, ctx.clock()):
        source = "previous close" if account.prev_close_equity else "first run of the day"
        log.info("day_baseline_recorded", equity=str(baseline), source=source)


def build_first_message(
    ctx: Any, status: Any, risk_mode: str, halt_reason: str | None, data_note: str | None = None
) -> str:
    """The per-run context: everything that changes between runs goes here, never in the cached prefix."""
    import json

    from tool_executor import portfolio_summary

    portfolio = portfolio_summary(ctx)
    trades_today = ctx.journal.count_trades_on(ctx.trading_date)
    r = ctx.settings.risk
    lines = [
        f"# Trading cycle {ctx.run_id[:12]} ({'DRY RUN: orders are journalled, not sent' if ctx.dry_run else 'live'})",
        f"Time: {ctx.clock():%Y-%m-%d %H:%M} HKT ({ctx.clock():%A})",
        f"Market: {status.description}",
        f"Risk mode: {risk_mode}"
        + (" (position cap halved)" if risk_mode == "warning" else "")
        + (f"; ENTRIES BLOCKED: {halt_reason}" if halt_reason else ""),
        f"Trades today: {trades_today} of {r.max_daily_trades}",
        *([f"Market data: {data_note}"] if data_note else []),
        "Portfolio:",
        json.dumps(portfolio, separators=(",", ":"), default=str),
        "",
        "Analyse the market and act on the strategy. Call check_risk before any execute_trade.",
    ]
    return "\n".join(lines)


def run_cycle(settings: Any, secrets: Any, run: Run, broker: Any, source: Any, clock: Any, mode: str, log: Any) -> int:
    import safety
    import tools
    from brain import ClaudeBrain, LoopResult, RulesBrain, run_tool_loop
    from data.cycle_summary import summarize_cycle
    from tool_executor import ToolGate, close_all, risk_state

    ctx = make_context(settings, run, broker, source, clock, dry_run=mode == "dry_run")
    journal = run.journal
    status = ctx.market_status()
    if not status.is_continuous:  # the broker disagreed with the calendar: be conservative
        journal.finish_cycle(run.cycle_id, status="skipped", finished_at=clock(), summary=status.description)
        log.info("market_closed", status=status.description)
        return EXIT_OK
    today = ctx.trading_date
    report = reconcile(ctx, run, log)  # first: it refreshes the broker view, which is then read once
    account = ctx.view.account()
    record_day_baseline(ctx, log)
    journal.record_equity_snapshot(today, "cycle", account.equity, account.cash, clock())
    if report.unresolved:
        ctx.halt_reason = f"{len(report.unresolved)} order(s) with unknown fate: {', '.join(report.unresolved)}"
        run.alerter.send("Unresolved orders block entries", ctx.halt_reason, priority="high", event="order_unknown")
    kill = kill_switch_reason(settings, journal)
    if kill:
        ctx.halt_reason = kill
    state = risk_state(ctx, None)
    mode_now = safety.risk_mode(state, settings.risk)
    pnl = safety.daily_pnl_pct(state)
    log.info(
        "context_built",
        market=status.description,
        equity=str(account.equity),
        cash=str(account.cash),
        positions=len(ctx.view.positions()),
        daily_pnl_pct=round(pnl * 100, 2) if pnl is not None else None,
        risk_mode=mode_now,
        halt=ctx.halt_reason,
    )
    if mode_now == "halted":
        return halt_for_daily_loss(ctx, run, pnl or 0.0, log, close_all)
    if kill:
        journal.finish_cycle(run.cycle_id, status="halted", finished_at=clock(), summary=kill)
        log.warning("kill_switch", reason=kill)
        return EXIT_HALTED
    if mode_now == "warning" and journal.get_flag(f"warning_alert:{today}") is None:
        journal.set_flag(f"warning_alert:{today}", f"{pnl:.4f}", "agent")
        run.alerter.send(
            "Daily loss warning",
            f"Daily P&L {pnl:.2%} is past the -{settings.risk.warning_loss_pct:.1%} warning level; "
            "position cap halved.",
            priority="high",
            event="daily_loss_warning",
        )
    if run.brain is not None:
        brain = run.brain
    elif settings.agent.brain == "claude":
        brain = ClaudeBrain(settings, secrets.anthropic_api_key, tools.TOOLS)
    else:
        brain = RulesBrain(settings.risk, scan_limit=settings.agent.scan_limit)
    if run.one_shot:
        # What this process has loaded by now (the SDK, pandas, futu) lives until it exits: moved out of the
        # cyclic collector's reach, it is not rescanned by every full collection during the tool loop (about
        # 0.1 s each, seen in scripts/bench.py). A process running many cycles (the replay) keeps the default.
        import gc

        gc.freeze()
    gate = ToolGate(ctx)
    log.info("brain_ready", brain=brain.name, model=brain.model)
    note = source.market_data_note() if hasattr(source, "market_data_note") else None  # IBKR: delayed data?
    first_message = build_first_message(ctx, status, mode_now, ctx.halt_reason, note)
    start_of_day = datetime.combine(today, datetime.min.time(), tzinfo=HKT)
    run.loop = LoopResult()
    cost_before_today = journal.cost_usd_since(start_of_day)
    if brain.name == "claude":  # a lesson review if due (its cost lands in run.loop), then the lessons
        from reflection import lessons_for_cycle

        first_message += lessons_for_cycle(ctx, brain, run.loop, cost_before_today=cost_before_today)
    result = run_tool_loop(
        brain,
        gate,
        first_message,
        settings.claude,
        cost_before_today=cost_before_today,
        on_turn=lambda i, turn: (log.info if brain.name == "claude" else log.debug)(
            "model_turn",
            iteration=i,
            stop_reason=turn.stop_reason,
            tool_calls=sum(1 for b in turn.content if b.get("type") == "tool_use"),
            input_tokens=turn.usage.input_tokens,
            cache_read=turn.usage.cache_read_tokens,
            cache_write=turn.usage.cache_write_tokens,
            output_tokens=turn.usage.output_tokens,
        ),
        result=run.loop,
    )
    if result.stopped_by.startswith("budget") and journal.get_flag(f"budget_alert:{today}") is None:
        journal.set_flag(f"budget_alert:{today}", result.stopped_by, "agent")
        run.alerter.send("Cycle budget reached", result.stopped_by, event="budget")
    summary = summarize_cycle(  # facts from the journal and the broker first, then the brain's words, marked
        ctx,
        note=result.final_text or "",
        stopped_by=result.stopped_by,
        note_label="Model's note" if brain.name == "claude" else "Rules brain's note",
    )
    u = result.usage
    journal.finish_cycle(
        run.cycle_id,
        status="ok",
        finished_at=clock(),
        summary=summary,
        iterations=result.iterations,
        input_tokens=u.input_tokens,
        output_tokens=u.output_tokens,
        cache_read_tokens=u.cache_read_tokens,
        cache_write_tokens=u.cache_write_tokens,
        cost_usd=result.cost_usd,
    )
    log.info(
        "cycle_finished",
        iterations=result.iterations,
        tool_calls=result.tool_calls,
        orders=len(ctx.orders_placed),
        stopped_by=result.stopped_by,
        cost_usd=round(result.cost_usd, 4),
        summary=summary,
    )
    return EXIT_OK


def halt_for_daily_loss(ctx: Any, run: Run, pnl: float, log: Any, close_all: Any) -> int:
    """Rule 14: past the daily loss limit, code (not the model) closes everything once, alerts, and exits 4."""
    settings, journal, today = ctx.settings, ctx.journal, ctx.trading_date
    reason = f"daily loss {pnl:.2%} past the -{settings.risk.max_daily_loss_pct:.1%} limit"
    flag = f"daily_loss_close:{today}"
    closed: list[Any] = []
    from tool_executor import is_working_entry

    working = [o for o in ctx.view.open_orders() if is_working_entry(o)]
    if journal.get_flag(flag) is None or ctx.view.positions() or working:
        closed = close_all(ctx, reason)  # cancels working entries first
        journal.set_flag(flag, reason, "agent")
        run.alerter.send(
            "Daily loss limit: all positions closed",
            f"{reason}. Closed {len(closed)} position(s); entries are blocked for the rest of the day.",
            priority="high",
            event="daily_loss_limit",
        )
    summary = f"halted: {reason}; closed {len(closed)} position(s)"
    journal.finish_cycle(run.cycle_id, status="halted", finished_at=ctx.clock(), summary=summary)
    log.warning("daily_loss_halt", reason=reason, closed=len(closed))
    return EXIT_HALTED


# ------------------------------------------------------------------------------------------------ guard


def run_guard(settings: Any, run: Run, broker: Any, source: Any, clock: Any, log: Any) -> int:
    """No model: reconcile, enforce stops / take-profits / time stops / the daily loss limit, exit."""
    import safety
    from data.calendar import trading_session
    from tool_executor import cancel_working_entries, close_all, close_position, risk_state

    ctx = make_context(settings, run, broker, source, clock, dry_run=False)
    journal = run.journal
    status = ctx.market_status()
    report = reconcile(ctx, run, log)
    unresolved = report.unresolved
    if trading_session(ctx.trading_date) is not None:
        record_day_baseline(ctx, log)  # if the morning cycle failed, the guard still starts the day's baseline
    positions = ctx.view.positions()
    if not status.is_continuous:
        summary = f"nothing to enforce: {status.description}"
        journal.finish_cycle(run.cycle_id, status="ok", finished_at=clock(), summary=summary)
        log.info("guard_finished", summary=summary)
        return EXIT_OK
    stops = journal.protective_stops()
    state = risk_state(ctx, None)
    if safety.risk_mode(state, settings.risk) == "halted":
        return halt_for_daily_loss(ctx, run, safety.daily_pnl_pct(state) or 0.0, log, close_all)
    actions = []
    if safety.in_flatten_window(status, settings.risk):  # no entry may still be working in the closing auction
        cancelled = cancel_working_entries(ctx, "before the close")
        actions += [f"cancelled entry {text}" for text in cancelled]
        positions = ctx.view.positions()  # a cancelled entry may have filled in part
    quotes, unquoted = quotes_each(ctx, list(positions))
    for symbol, error in unquoted.items():
        actions.append(f"{symbol}: no quote ({error}); judged on the broker's last price")
    if unquoted:
        run.alerter.send(
            "Guard could not quote positions",
            "; ".join(f"{symbol}: {error}" for symbol, error in unquoted.items())
            + ". The other positions were checked as usual.",
            priority="high",
            event="guard_action",
        )
    exits = safety.guard_exits(positions, stops, quotes, status, settings.risk)
    closes: list[str] = []
    for symbol, reason in exits:  # each on its own: a failed close leaves the others (and its stop) in place
        try:
            order = close_position(ctx, symbol, reason)
            closes.append(f"{symbol}: {reason} -> {order.status.value}")
        except Exception as exc:
            closes.append(f"{symbol}: {reason} -> FAILED {exc}")
            log.error("guard_close_failed", symbol=symbol, error=str(exc))
    if closes:
        run.alerter.send("Guard closed positions", "\n".join(closes), event="guard_action")
    actions += closes
    actions += [f"{symbol}: broker stop re-armed" for symbol in report.rearmed]
    actions += [f"adopted {text}" for text in report.adopted]
    summary = f"{len(positions)} position(s) checked; " + ("; ".join(actions) if actions else "no action")
    if unresolved:
        summary += f"; unresolved orders: {', '.join(unresolved)}"
    journal.finish_cycle(run.cycle_id, status="ok", finished_at=clock(), summary=summary)
    log.info("guard_finished", summary=summary)
    return EXIT_OK


def quotes_each(ctx: Any, symbols: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Quotes for the guard: one request for all, and if that fails, one per symbol, so a position the market
    data cannot quote (delisted, a gateway refusal) does not stop the others being checked."""
    if not symbols:
        return {}, {}
    try:
        return {q.symbol: q for q in ctx.market.quotes(symbols)}, {}
    except Exception as exc:
        import structlog

        structlog.get_logger("agent").warning("guard_batch_quote_failed", error=str(exc))
    quotes: dict[str, Any] = {}
    failed: dict[str, str] = {}
    for symbol in symbols:
        try:
            quotes[symbol] = ctx.market.quotes([symbol])[0]
        except Exception as exc:
            failed[symbol] = str(exc)[:300]
    return quotes, failed


def fail(exc: Exception, run: Run) -> int:
    """One ``run_failed`` line, the cycle marked ``error``, an alert attempted, a distinct exit code."""
    from config.errors import AgentError, BrokerUnavailable, LockHeld
    from config.logs import file_only

    code = exc.exit_code if isinstance(exc, AgentError) else EXIT_ERROR
    message = f"{type(exc).__name__}: {exc}"
    # An expected failure (exit 2-5) is told on the console by its message; its traceback goes to the log file
    # (and to the console with -v). A bug (exit 1) shows it everywhere.
    tb = {"traceback": traceback.format_exc(), **(file_only("traceback") if code != EXIT_ERROR else {})}
    try:
        import structlog

        log = structlog.get_logger("agent")
        if isinstance(exc, LockHeld):  # expected when cron lines meet: no error, no alert
            log.warning("lock_held", error=str(exc), exit_code=code, **tb)
        else:
            log.error("run_failed", error_class=type(exc).__name__, error=str(exc), exit_code=code, **tb)
    except Exception:  # logging itself broke: still say something
        print(f"run_failed: {message}", file=sys.stderr)
    if run.journal is not None and run.cycle_id is not None:
        spent = run.loop  # what the model had cost before the failure still counts toward the daily budget
        try:
            run.journal.finish_cycle(
                run.cycle_id,
                status="halted" if code == EXIT_HALTED else "error",
                finished_at=datetime.now(HKT),
                error=message[:2000],
                summary="failed" if code != EXIT_HALTED else str(exc)[:500],
                iterations=spent.iterations if spent else 0,
                input_tokens=spent.usage.input_tokens if spent else 0,
                output_tokens=spent.usage.output_tokens if spent else 0,
                cache_read_tokens=spent.usage.cache_read_tokens if spent else 0,
                cache_write_tokens=spent.usage.cache_write_tokens if spent else 0,
                cost_usd=spent.cost_usd if spent else 0.0,
            )
        except Exception as journal_exc:
            print(f"could not journal the failure: {journal_exc}", file=sys.stderr)
    if run.alerter is not None and not isinstance(exc, LockHeld) and not _alerted_this_hour(run, exc):
        with contextlib.suppress(Exception):  # an alert failure never hides the original error
            run.alerter.send(
                "Gateway unreachable" if isinstance(exc, BrokerUnavailable) else "Cycle failed",
                message,
                priority="high",
                event="gateway_unreachable" if isinstance(exc, BrokerUnavailable) else "cycle_error",
            )
    if os.environ.get("CATALYST_RAISE") == "1":
        raise exc
    if code == EXIT_ERROR:
        print(f"error: {message}", file=sys.stderr)
    else:
        print(f"{message}", file=sys.stderr)
    return code


def _alerted_this_hour(run: Run, exc: Exception) -> bool:
    """The same failure alerts once an hour, not every 5 minutes of an outage (needs the journal to remember)."""
    if run.journal is None:
        return False
    flag = f"failure_alert:{type(exc).__name__}:{datetime.now(HKT):%Y-%m-%d %H}"
    try:
        if run.journal.get_flag(flag) is not None:
            return True
        run.journal.set_flag(flag, str(exc)[:200], "agent")
    except Exception:
        return False
    return False


def close_run(run: Run) -> None:
    """Disconnect the broker and close the journal (which releases the account lock), whatever happened."""
    for resource in (run.broker, run.journal):
        if resource is not None:
            with contextlib.suppress(Exception):
                resource.close()


if __name__ == "__main__":
    exit_code = main()
    # Everything is closed by now. Freezing the heap lets the interpreter's teardown skip the cyclic garbage
    # collection over every object of every loaded module (anthropic, futu, pandas): about half a second.
    import gc

    gc.freeze()
    sys.exit(exit_code)
