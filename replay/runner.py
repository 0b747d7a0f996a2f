"""``agent.py --replay FROM..TO``: the XHKG schedule of past days, driven through the agent's own cycle and guard.

For each trading day: a trading cycle at the open (09:30) and at the end of the lunch break (13:00, not on half
days), a guard pass every 5 minutes of continuous trading in between, and an equity mark at the close. Each pass
goes through ``agent.begin_cycle`` and ``agent.dispatch`` — the functions a cron run uses — with a
``ReplayClock``, a ``ReplayFeed`` and a ``ReplayBroker`` injected instead of the wall clock and OpenD. Nothing
here opens the live journal for writing, takes the account lock, reads the simulator's state file, sends an
e-mail or connects to OpenD.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import structlog

from config.errors import ConfigError
from config.settings import Secrets, Settings
from replay.broker import ReplayBroker
from replay.clock import HKT, ReplayClock
from replay.feed import BarStore, LookaheadError, ReplayFeed, SyntheticStore, sessions_between

GUARD_EVERY = timedelta(minutes=5)
log = structlog.get_logger("replay")


class MissingData(ConfigError):
    """The recorded history lacks symbols or days the replay needs. Import or fetch them (scripts/history.py)."""


@dataclass(frozen=True)
class ReplayOptions:
    first: date
    last: date
    brain: str
    feed: str
    seed: int
    compare: str | None = None
    anonymize: bool = False
    max_cost_usd: float | None = None
    json_path: Path | None = None
    reflection: bool | None = None  # --reflection on|off for a Claude replay; None: reflection.enabled


def parse_range(text: str) -> tuple[date, date]:
    """``FROM..TO`` (ISO dates, inclusive). Raises ConfigError saying how to write it."""
    parts = text.split("..")
    try:
        if len(parts) != 2:
            raise ValueError
        first, last = date.fromisoformat(parts[0].strip()), date.fromisoformat(parts[1].strip())
    except ValueError:
        raise ConfigError(
            f"--replay {text!r} is not a date range; write FROM..TO, e.g. --replay 2026-10-05..2026-10-30"
        ) from None
    if last < first:
        raise ConfigError(f"--replay {text}: the range ends before it starts; write the earlier date first.")
    return first, last


def schedule(day: date) -> list[tuple[datetime, str]]:
    """The passes cron would run on ``day``: ``trade`` at each window's start, ``guard`` every 5 minutes after."""
    from data.calendar import trading_session

    session = trading_session(day)
    if session is None:
        return []
    passes: list[tuple[datetime, str]] = []
    for start, end in session.continuous_windows():
        passes.append((start, "trade"))
        when = start + GUARD_EVERY
        while when < end:
            passes.append((when, "guard"))
            when += GUARD_EVERY
    return passes


def replay_settings(settings: Settings, brain: str, run_id: int, reflection: bool | None = None) -> Settings:
    """The settings a replay's passes see: the chosen brain, in-memory K-line caches (broker ``sim``), no e-mail,
    a kill-switch file of the run's own that never exists (the live HALT file governs live trading only), and
    ``--reflection on|off`` as ``reflection.enabled`` (lessons live in the run's own schema, dated by its clock)."""
    enabled = settings.reflection.enabled if reflection is None else reflection
    return settings.model_copy(
        update={
            "agent": settings.agent.model_copy(update={"brain": brain}),
            "reflection": settings.reflection.model_copy(update={"enabled": enabled}),
            "broker": settings.broker.model_copy(update={"name": "sim"}),
            "alerts": settings.alerts.model_copy(update={"smtp_host": "", "email": ""}),
            "risk": settings.risk.model_copy(update={"halt_file": Path(f"var/replay/run-{run_id}/HALT")}),
        }
    )


@dataclass
class ReplayRun:
    """What one replay produced, for the score."""

    run_id: int
    brain: str
    model: str | None
    schema: str
    starting_cash: Decimal
    equity: list[tuple[datetime, Decimal, Decimal]] = field(default_factory=list)  # time, equity, market value
    closes: list[tuple[date, Decimal]] = field(default_factory=list)  # equity at each day's close
    broker: ReplayBroker | None = None
    journal: Any = None
    cycles: list[int] = field(default_factory=list)  # trading-cycle ids (guard passes have no tool calls)
    errors: list[str] = field(default_factory=list)
    stopped: str | None = None
    claude: Any = None  # the ReplayBrain (cache hits and misses) of a Claude run
    wall_s: float = 0.0


def run_days(
    settings: Settings,
    secrets: Secrets,
    store: BarStore,
    options: ReplayOptions,
    brain: str,
    *,
    progress: Callable[[str], None] | None = None,
) -> ReplayRun:
    """Replay ``options.first..last`` with ``brain`` into a new run of the replay database; return what it did."""
    import agent
    from data.alerts import Alerter
    from replay.journal import ReplayJournal
    from replay.score import in_sample

    started = time.perf_counter()
    days = sessions_between(options.first, options.last)
    config = {
        "seed": options.seed,
        "slippage_ticks": settings.replay.slippage_ticks,
        "model": settings.claude.model if brain == "claude" else "rules-v1",
        "in_sample_for_model": in_sample(settings, brain, options.first),  # shown by --report replay:ID
        "benchmark": settings.replay.benchmark,
        "reflection": (settings.reflection.enabled if options.reflection is None else options.reflection)
        if brain == "claude"
        else None,  # the rules brain has no reflection
    }
    rj = ReplayJournal.create(
        settings, secrets, first=options.first, last=options.last, brain=brain, feed=options.feed, config=config
    )
    rsettings = replay_settings(settings, brain, rj.run_id, options.reflection if brain == "claude" else None)
    clock = ReplayClock(datetime.combine(days[0], datetime.min.time(), HKT))
    feed = ReplayFeed(store, clock, benchmark=settings.replay.benchmark)
    sim = settings.broker.sim
    broker = ReplayBroker(
        feed,
        clock,
        starting_cash=sim.starting_cash_hkd,
        commission_pct=sim.commission_pct,
        min_commission=sim.min_commission_hkd,
        slippage_ticks=settings.replay.slippage_ticks,
    )
    model = settings.claude.model if brain == "claude" else "rules-v1"
    result = ReplayRun(rj.run_id, brain, model, rj.schema, sim.starting_cash_hkd, broker=broker, journal=rj)
    alerter = Alerter(rsettings.alerts, None, rj.journal)
    claude = make_claude(rsettings, secrets, rj, store, options) if brain == "claude" else None
    result.claude = claude
    status = "ok"
    n = 0
    try:
        for day in days:
            if claude is not None and budget_spent(rj, options):
                result.stopped = (
                    f"--max-cost-usd {options.max_cost_usd:g} reached (${_spent_usd(rj):.4f} "
                    f"spent) before {day}; the days before it are scored"
                )
                break
            for when, mode in schedule(day):
                clock.advance_to(when)
                n += 1
                pass_settings = rsettings
                if claude is not None and mode == "trade":
                    pass_settings = with_cost_cap(rsettings, rj, options, day)
                run = agent.Run(run_id=f"p{n:06d}-replay{rj.run_id}", journal=rj.journal, alerter=alerter)
                run.brain = claude if mode == "trade" else None
                run.cycle_id = agent.begin_cycle(run, pass_settings, mode, when, broker_name="replay")
                alerter.cycle_id = run.cycle_id
                if mode == "trade":
                    result.cycles.append(run.cycle_id)
                try:
                    agent.dispatch(pass_settings, secrets, run, broker, feed, clock, mode, log)
                except LookaheadError:
                    raise  # a bug in the code that asked, never a market event: stop the replay
                except Exception as exc:
                    # A live run would exit 1 and cron would start the next one: journal it and go on.
                    message = f"{type(exc).__name__}: {exc}"
                    result.errors.append(f"{when:%Y-%m-%d %H:%M} {mode}: {message}")
                    rj.journal.finish_cycle(run.cycle_id, status="error", finished_at=clock(), error=message[:2000])
                    log.error("replay_pass_failed", at=when.isoformat(), mode=mode, error=message)
                account = broker.account()
                result.equity.append((when, account.equity, account.market_value))
            session_close = _close_of(day)
            clock.advance_to(session_close)
            account = broker.account()  # settles the last bars and expires the day's orders
            result.equity.append((session_close, account.equity, account.market_value))
            result.closes.append((day, account.equity))
            if progress is not None:
                from replay.score import usage

                tokens_in, tokens_out, dollars = usage(result)
                projected = ""
                if claude is not None and result.cycles:  # the estimate, refined by what the cycles so far cost
                    total_cycles = sum(1 for d in days for _w, m in schedule(d) if m == "trade")
                    projected = f"  (~${dollars / len(result.cycles) * total_cycles:.2f} projected for the run)"
                progress(
                    f"{day}  {brain:<6} fills {len(broker.state.fills):>3}  equity HK${account.equity:>14,.2f}  "
                    f"tokens {tokens_in + tokens_out:>9,}  ${dollars:.4f}{projected}  errors {len(result.errors)}"
                )
    except BaseException:
        status = "error"
        raise
    finally:
        result.wall_s = time.perf_counter() - started
        if status == "error":
            rj.finish("error", {}, datetime.now(HKT))
    return result


_EPOCH = datetime(2000, 1, 1, tzinfo=HKT)


def _spent_usd(rj: Any) -> float:
    """Model dollars of the run so far, from its journal."""
    return rj.journal.cost_usd_since(_EPOCH)


def budget_spent(rj: Any, options: ReplayOptions) -> bool:
    return options.max_cost_usd is not None and _spent_usd(rj) >= options.max_cost_usd


def with_cost_cap(settings: Settings, rj: Any, options: ReplayOptions, day: date) -> Settings:
    """The settings for one Claude cycle: the loop's daily budget shrunk so the whole replay stays within
    ``--max-cost-usd`` (the loop checks it before every request, so one request can overshoot)."""
    if options.max_cost_usd is None:
        return settings
    before_today = _spent_usd(rj) - rj.journal.cost_usd_since(datetime.combine(day, datetime.min.time(), HKT))
    cap = max(1e-9, min(settings.claude.max_cost_usd_per_day, options.max_cost_usd - before_today))
    return settings.model_copy(update={"claude": settings.claude.model_copy(update={"max_cost_usd_per_day": cap})})


def make_claude(settings: Settings, secrets: Secrets, rj: Any, store: BarStore, options: ReplayOptions) -> Any:
    """The real ClaudeBrain behind the replay's response cache (and aliases with ``--anonymize``)."""
    import tools
    from brain import ClaudeBrain
    from replay.claude import Aliases, ReplayBrain

    inner = ClaudeBrain(settings, secrets.anthropic_api_key, tools.TOOLS)
    aliases = None
    if options.anonymize:
        aliases = Aliases({s: info.name for s, info in store.instruments().items()})
    return ReplayBrain(inner, rj.register, aliases)


def cost_estimate(settings: Settings, days: list[date]) -> str:
    """What a Claude replay may cost before it starts: cycles x the per-cycle caps, at the model's price."""
    cycles = sum(1 for day in days for _when, mode in schedule(day) if mode == "trade")
    price = settings.claude.prices.get(settings.claude.model)
    if price is None:
        return f"{cycles} Claude cycles; no price configured for {settings.claude.model}: cost unknown"
    c = settings.claude
    per_cycle = (c.max_input_tokens_per_cycle * price.input + c.max_iterations * c.max_tokens * price.output) / 1e6
    return (
        f"{cycles} Claude cycles; at most ${cycles * per_cycle:,.2f} if every cycle used its whole budget "
        f"(claude.max_input_tokens_per_cycle, max_iterations x max_tokens), usually far less; cached requests are free"
    )


def _close_of(day: date) -> datetime:
    from data.calendar import trading_session

    session = trading_session(day)
    assert session is not None
    return session.close


def build_store(settings: Settings, secrets: Secrets, options: ReplayOptions) -> BarStore:
    """The bars the replay runs on: the simulator's market, or the recorded history (refusing gaps)."""
    if options.feed == "synthetic":
        return SyntheticStore(options.seed)
    from replay.history import load_recorded

    return load_recorded(settings, secrets, options.first, options.last)


def options_from_args(args: argparse.Namespace, settings: Settings) -> ReplayOptions:
    first, last = parse_range(args.replay)
    today = datetime.now(HKT).date()
    if last >= today:
        raise ConfigError(f"--replay {args.replay}: a replay runs past days only; end it before {today}.")
    if not sessions_between(first, last):
        raise ConfigError(f"--replay {args.replay}: there is no XHKG trading day in that range.")
    brain = args.brain or settings.agent.brain
    return ReplayOptions(
        first=first,
        last=last,
        brain=brain,
        feed=args.feed or settings.replay.feed,
        seed=args.seed if args.seed is not None else settings.broker.sim.seed,
        compare=args.compare,
        anonymize=bool(args.anonymize),
        max_cost_usd=args.max_cost_usd,
        json_path=Path(args.json) if args.json else None,
        reflection=None if args.reflection is None else args.reflection == "on",
    )


def replay_main(args: argparse.Namespace, run: Any, settings: Settings, secrets: Secrets) -> int:
    """The ``--replay`` entry point: run, score, print the table, write the JSON. Returns the exit code."""
    from replay import score

    options = options_from_args(args, settings)
    if options.brain != "claude" and (options.anonymize or options.max_cost_usd is not None):
        raise ConfigError("--anonymize and --max-cost-usd apply to Claude replays: add --brain claude.")
    if options.brain != "claude" and options.reflection is not None:
        raise ConfigError(
            "--reflection applies to Claude replays (the rules brain has no lessons): add --brain claude."
        )
    if options.brain == "claude":
        print(cost_estimate(settings, sessions_between(options.first, options.last)), file=sys.stderr)
        if score.in_sample(settings, "claude", options.first):
            print(
                f"NOTE: {options.first}..{options.last} is IN-SAMPLE FOR THE MODEL {settings.claude.model} (on or "
                "before its claude.knowledge_cutoff, or none is configured): it may remember how these days ended.",
                file=sys.stderr,
            )
    if not args.verbose:  # one progress line per day on the console; the passes' lines go to the log file
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.WARNING)
        logging.getLogger().setLevel(logging.INFO)
    structlog.contextvars.bind_contextvars(run_id=run.run_id[:12], mode="replay")
    store = build_store(settings, secrets, options)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    main_run = run_days(settings, secrets, store, options, options.brain, progress=progress)
    report = score.score_run(main_run, store, options, settings)
    compare_report = None
    if options.compare:
        other = run_days(settings, secrets, store, options, options.compare, progress=progress)
        compare_report = score.score_run(other, store, options, settings)
        other.journal.finish(
            "ok", compare_report.metrics, datetime.now(HKT), {"benchmark_label": compare_report.benchmark_label}
        )
        other.journal.close()
    main_run.journal.finish(
        "stopped" if main_run.stopped else "ok", report.metrics, datetime.now(HKT),
        {"benchmark_label": report.benchmark_label, "stopped": main_run.stopped},
    )  # fmt: skip
    main_run.journal.close()
    print(score.render_table(report, compare_report))
    if main_run.stopped:
        print(f"STOPPED: {main_run.stopped}")
    if options.json_path is not None:
        score.write_json(options.json_path, report, compare_report)
        print(f"score written to {options.json_path}")
    return 0
