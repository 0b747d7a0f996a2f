"""``agent.py --report [PERIOD] [--out PATH]`` and ``agent.py --digest``: build the page, write it, mail it.

The report reads the journal only (never the broker): the live journal, or for ``replay:RUN_ID`` the run's own
schema (``replay_runs.schema_name``, ``run_<id>``) in the replay database on the same server (``replay.database``,
``catalyst_replay`` by default). Its connection is read-only.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import structlog
from markupsafe import Markup
from psycopg import sql
from psycopg.conninfo import make_conninfo

from config.errors import JournalError
from config.settings import Secrets, Settings
from report import charts
from report.bars import ChainBars, JournalBars, SimBars, benchmark_series
from report.data import (
    Period,
    PeriodError,
    ReplayRun,
    ReportData,
    Scope,
    drawdowns,
    load_report,
    parse_period,
    read_replay_run,
    recent_replay_runs,
    table_exists,
)
from report.render import Charts, TradeView, hkd, render_digest, render_page

log = structlog.get_logger(__name__)

DEFAULT_REPLAY_DATABASE = "catalyst_replay"
REPORTS_DIR = Path("reports")
TRADE_WINDOW = timedelta(minutes=30)  # minute bars shown before the entry and after the exit
MAX_TRADE_CHARTS = 150  # keeps a busy month's page to a few MB


@dataclass(frozen=True)
class Written:
    path: Path
    data: ReportData
    charts: Charts
    html: str


def journal_dsn(settings: Settings, secrets: Secrets) -> str:
    """The live journal's DSN: ``DATABASE_URL`` or the embedded server (started if needed)."""
    if secrets.database_url is not None:
        return secrets.database_url.get_secret_value()
    from data.database import embedded_server_dsn

    return embedded_server_dsn(settings)


def replay_database(settings: Settings) -> str:
    return settings.replay.database or DEFAULT_REPLAY_DATABASE


def _read_only(dsn: str) -> psycopg.Connection[Any]:
    from data.database import redact_dsn

    try:
        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
        conn.execute("SET TIME ZONE 'Asia/Hong_Kong'")
        conn.execute("SET default_transaction_read_only = on")
    except psycopg.Error as exc:
        raise JournalError(
            f"Could not open the journal at {redact_dsn(dsn)} for the report: {type(exc).__name__}. Check that "
            "the server is running and DATABASE_URL is right."
        ) from None
    return conn


def open_live(settings: Settings, secrets: Secrets) -> psycopg.Connection[Any]:
    """A read-only connection to the live journal, migrated first so an empty journal reads as empty."""
    from data.database import Journal

    dsn = journal_dsn(settings, secrets)
    with Journal.connect(dsn) as journal:
        journal.migrate()
    return _read_only(dsn)


def open_replay(settings: Settings, secrets: Secrets, run_id: str) -> tuple[psycopg.Connection[Any], ReplayRun]:
    """A read-only connection to the replay run's own journal schema, and the run's register row.

    ``PeriodError`` (exit 2) if the database, the run or its schema is missing."""
    dsn = journal_dsn(settings, secrets)
    name = replay_database(settings)
    with _read_only(dsn) as admin:
        exists = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    if exists is None:
        raise PeriodError(
            f"--report replay:{run_id}: there is no replay database {name!r} on the journal's server, so no replay "
            "has run here yet. Run one first (python agent.py --replay FROM..TO), then report on the run id it prints."
        )
    conn = _read_only(make_conninfo(dsn, dbname=name))
    try:
        if not table_exists(conn, "replay_runs"):
            raise PeriodError(
                f"--report replay:{run_id}: the database {name!r} has no replay_runs table; it was not made by "
                "agent.py --replay. Run a replay first."
            )
        run = read_replay_run(conn, run_id)
        if run is None:
            recent = recent_replay_runs(conn)
            known = f"recent runs: {', '.join(recent)}" if recent else "it holds no run yet"
            raise PeriodError(f"--report replay:{run_id}: no replay run with that id in {name!r} ({known}).")
        if run.start is None or run.end is None:
            raise PeriodError(f"--report replay:{run_id}: the run has no from/to dates recorded; it cannot be shown.")
        found = conn.execute("SELECT to_regnamespace(%s)", (run.schema or "",)).fetchone()
        if not run.schema or found is None or found[0] is None:
            raise PeriodError(
                f"--report replay:{run_id}: the run's journal schema {run.schema or '(none recorded)'} is not in "
                f"{name!r} (the run failed before it was set up, or the schema was dropped). Report on another run "
                f"({', '.join(recent_replay_runs(conn))}) or replay those days again."
            )
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(run.schema)))  # the run's tables only
    except BaseException:
        conn.close()
        raise
    return conn, run


def build_charts(data: ReportData, bars: ChainBars) -> Charts:
    """Equity, drawdown, benchmark and one price chart per trade (or the reason it has none)."""
    lo, hi = data.scope.window
    timeframe = "1m" if data.scope.start == data.scope.end else "1d"
    label, series = benchmark_series(bars, lo, hi, timeframe)
    result = Charts(bar_source=bars.name, benchmark_label=label)
    if data.replay is not None and data.replay.metric.get("benchmark_return") is not None:
        result.benchmark_return = data.replay.metric["benchmark_return"]
        recorded = str(data.replay.settings.get("benchmark_label") or "")
        shown = f"; the chart shows {label}" if label and series else ""
        result.benchmark_label = f"{recorded or 'the benchmark'} over the replayed days, as the replay scored it{shown}"
    elif series:
        result.benchmark_return = series[-1][1]
    base = data.headline.starting_equity
    result.equity = Markup(charts.equity_chart(data.equity_curve, data.equity_snapshots, label, series, base))
    result.drawdown = Markup(charts.drawdown_chart(drawdowns(data.equity_curve)))
    for index, trade in enumerate(data.trades):
        if index >= MAX_TRADE_CHARTS:
            result.trades.append(TradeView(trade, None, f"no chart: only the first {MAX_TRADE_CHARTS} trades get one"))
            continue
        start, end = trade.entry_time - TRADE_WINDOW, trade.exit_time + TRADE_WINDOW
        found = bars.bars(trade.symbol, "1m", start, end)
        if len(found) < 2:
            why = (
                f"no minute bars between {start:%Y-%m-%d %H:%M} and {end:%H:%M} HKT in the journal's K-line cache"
                + (" or the simulated market" if any(isinstance(s, SimBars) for s in bars.sources) else "")
                + "; the trade is shown without a chart."
            )
            result.trades.append(TradeView(trade, None, why))
            continue
        result.trades.append(TradeView(trade, Markup(charts.trade_chart(trade, found))))
    return result


def _bar_sources(conn: psycopg.Connection[Any], data: ReportData, settings: Settings, secrets: Secrets) -> ChainBars:
    sources: list[Any] = [JournalBars(conn)]
    sim = settings.broker.sim
    if data.replay is not None:
        if data.replay.feed == "synthetic":
            seed = data.replay.settings.get("seed", sim.seed)
            sources.append(SimBars(int(seed) if isinstance(seed, int) else sim.seed))
        else:  # recorded history lives in the live journal's market_bars: read it read-only
            sources.append(JournalBars(_read_only(journal_dsn(settings, secrets)), owns_connection=True))
    elif any(c.broker == "sim" for c in data.cycles):
        sources.append(SimBars(sim.seed, settings.resolve(sim.state_file)))
    return ChainBars(sources)


def build_report(period: Period, settings: Settings, secrets: Secrets, now: datetime) -> tuple[ReportData, Charts]:
    """Read the journal (live or replay) and compute the page's figures and charts."""
    replay: ReplayRun | None = None
    notes: list[str] = []
    commission_pct, min_commission = settings.broker.commission
    if period.run_id is not None:
        conn, replay = open_replay(settings, secrets, period.run_id)
        assert replay.start is not None and replay.end is not None
        notes.extend(replay_notes(replay))
        period = Period(replay.start, replay.end, run_id=replay.id)
        scope = Scope(replay.start, replay.end)
        sim = settings.broker.sim  # the replay broker charges the simulator's commission, whatever broker is live
        commission_pct, min_commission = Decimal(str(sim.commission_pct)), sim.min_commission_hkd
    else:
        conn = open_live(settings, secrets)
        assert period.start is not None and period.end is not None
        scope = Scope(period.start, period.end)
    bars: ChainBars | None = None
    try:
        data = load_report(conn, period, scope, commission_pct=commission_pct, min_commission=min_commission,
                           now=now, replay=replay)  # fmt: skip
        data.notes.extend(notes)
        bars = _bar_sources(conn, data, settings, secrets)
        return data, build_charts(data, bars)
    except psycopg.Error as exc:
        raise JournalError(f"Could not read the journal for the report of {period.label}: {exc}") from exc
    finally:
        if bars is not None:
            bars.close()
        conn.close()


def replay_notes(run: ReplayRun) -> list[str]:
    """What the page must say about how the run went and how its figures differ from the replay's own score."""
    notes = []
    if run.status == "running":
        notes.append(f"Replay run {run.id} had not finished when this page was made (or it was killed): its days are "
                     "shown as far as they were journalled.")  # fmt: skip
    elif run.status == "error":
        notes.append(f"Replay run {run.id} stopped on an error; the days it journalled are shown.")
    elif run.status == "stopped":
        why = run.settings.get("stopped")
        notes.append(f"Replay run {run.id} was stopped early" + (f": {why}." if why else "."))
    if run.metrics:
        notes.append(
            "The headline P&L is realized (closed round trips, net of fees) and its drawdown is that of the "
            "closed-trade equity; the replay's own score marks open positions and the equity at every guard pass "
            "(shown below as 'replay total return' and 'replay max drawdown'). Fill times are when the journal "
            "learned of the fill (the next pass), the score's are the filling bar's start."
        )
    return notes


def default_path(settings: Settings, period: Period) -> Path:
    return settings.resolve(REPORTS_DIR) / f"report-{period.slug}.html"


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_report(period: Period, settings: Settings, secrets: Secrets, now: datetime, out: str | None) -> Written:
    data, chart_set = build_report(period, settings, secrets, now)
    html = render_page(data, chart_set)
    path = Path(out).expanduser() if out else default_path(settings, data.period)
    if path.is_dir():
        path = path / default_path(settings, data.period).name
    write_atomically(path, html)
    log.info("report_written", path=str(path), period=data.period.label, bytes=len(html.encode()),
             round_trips=data.headline.round_trips)  # fmt: skip
    return Written(path=path.resolve(), data=data, charts=chart_set, html=html)


def run_report(args: Any, settings: Settings, secrets: Secrets, clock: Callable[[], datetime]) -> int:
    """``--report``: write the page and print its path. Exit 0, or 2 for a bad PERIOD (raised)."""
    now = clock()
    period = parse_period(args.report, now.date())
    written = write_report(period, settings, secrets, now, args.out)
    print(written.path)
    return 0


def run_digest(args: Any, settings: Settings, secrets: Secrets, clock: Callable[[], datetime]) -> int:
    """``--digest``: today's report, e-mailed (text and HTML body, the page attached) through the alert path.

    A failed send is journalled in ``alerts`` and reported on stderr; it never fails the run.
    """
    from data.alerts import Alerter, Attachment
    from data.calendar import trading_session
    from data.database import Journal

    now = clock()
    today = now.date()
    if trading_session(today) is None:
        print(f"{today} is not an HKEX trading day: no digest.")
        log.info("digest_skipped", day=str(today), reason="not a trading day")
        return 0
    written = write_report(Period(today, today), settings, secrets, now, args.out)
    if not (settings.alerts.smtp_host and settings.alerts.email):
        print(
            f"E-mail is not configured (set SMTP_HOST and ALERT_EMAIL, see alerts: in the settings), so no digest "
            f"was sent. The report is at {written.path}"
        )
        log.info("digest_not_configured", path=str(written.path))
        return 0
    text, html = render_digest(written.data, written.charts)
    h = written.data.headline
    subject = f"Daily digest {today}: P&L {hkd(h.pnl_hkd)}, {h.round_trips} round trip(s), {h.blocked_calls} refused"
    journal = None
    try:
        journal = Journal.open(settings, secrets)
    except Exception as exc:  # the digest still goes out; its attempt just is not journalled
        print(f"warning: the journal is unavailable, so this digest will not be journalled: {exc}", file=sys.stderr)
    try:
        alerter = Alerter(settings.alerts, secrets.smtp_password, journal)
        attachment = Attachment(
            filename=written.path.name, content=written.html.encode(), mime_type="text/html", charset="utf-8"
        )
        outcome = alerter.send(subject, text, event="digest", html=html, attachments=[attachment])
    finally:
        if journal is not None:
            journal.close()
    if outcome.sent:
        print(f"digest sent to {settings.alerts.email}; the report is at {written.path}")
    else:
        print(f"digest not sent: {outcome.error}. The report is at {written.path}", file=sys.stderr)
    return 0
