"""``agent.py --report`` and ``--digest`` end to end: a day journalled by real ``agent.py`` runs (Claude against
the local Messages API server, the rules brain, the guard) on the sim exchange and a real PostgreSQL, then the
page parsed back and every figure compared with one computed here straight from the journal and the paper
account. The digest goes through a real SMTP server (aiosmtpd) on loopback.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg import sql
from psycopg.conninfo import make_conninfo
from pydantic import SecretStr

from brokers import hkex
from brokers.sim import SimBroker
from config.settings import Secrets, Settings
from data.database import Journal
from replay.clock import HKT
from replay.journal import ReplayJournal
from report.data import PeriodError, parse_period
from tests.agent_runner import run_agent, sim_at
from tests.fakes.messages_api import FakeMessagesAPI, message, text, tool_use
from tests.report_page import money, parse_page, percent, table_column
from tests.test_alerts import closed_port, smtp_server  # noqa: F401  (smtp_server is a fixture)

DAY = "2026-11-20"
XSS = "<img src=x onerror=alert(1)>"
COMMISSION, MIN_COMMISSION = Decimal("0.0003"), Decimal(3)  # the shipped sim settings
STARTING_CASH = Decimal(1_000_000)


def at(hhmm: str) -> str:
    return f"{DAY}T{hhmm}:00+08:00"


# ------------------------------------------------------------------------------------------ building a day


def claude_morning(fake_api: FakeMessagesAPI) -> None:
    """10:15: Claude checks and buys 100 HK.00700, tries an unapproved 9988 (refused), explains itself."""
    q = sim_at(at("10:15")).quote("HK.00700")
    entry = q.ask_price or q.last_price
    stop, target = (
        (entry * Decimal("0.97")).quantize(Decimal("0.1")),
        (entry * Decimal("1.08")).quantize(Decimal("0.1")),
    )
    trade = {"symbol": "700", "side": "buy", "quantity": 100}
    fake_api.enqueue(
        message([tool_use("get_portfolio", {}, id="t1")]),
        message(
            [
                tool_use(
                    "check_risk",
                    {**trade, "entry_price": float(entry), "stop_loss": float(stop), "take_profit": float(target)},
                    id="t2",
                ),
                tool_use(
                    "execute_trade",
                    {
                        "symbol": "9988",
                        "side": "buy",
                        "quantity": 100,
                        "limit_price": 100,
                        "stop_loss": 95,
                        "take_profit": 120,
                    },
                    id="t3",
                ),
            ]
        ),
        message(
            [
                tool_use(
                    "execute_trade",
                    {
                        **trade,
                        "order_type": "limit",
                        "limit_price": float(entry),
                        "stop_loss": float(stop),
                        "take_profit": float(target),
                        "reason": "breakout on volume",
                    },
                    id="t4",
                ),
                tool_use(
                    "log_decision",
                    {"decision": "buy HK.00700", "reasoning": f"{XSS} breakout above resistance", "confidence": 0.7},
                    id="t5",
                ),
            ]
        ),
        message([text("Bought 100 HK.00700.")]),
    )


@pytest.fixture
def known_day(project_env: dict[str, str], fake_api: FakeMessagesAPI, journal: Journal) -> dict[str, str]:
    """A trading day: a Claude cycle at 10:15, a rules cycle at 13:05, the guard flattening at 15:52."""
    claude_morning(fake_api)
    run = run_agent("--broker", "sim", "--brain", "claude", "--now", at("10:15"), env={**project_env, **fake_api.env()})
    assert run.returncode == 0, run.output
    run = run_agent("--broker", "sim", "--brain", "rules", "--now", at("13:05"), env=project_env)
    assert run.returncode == 0, run.output
    run = run_agent("--guard", "--broker", "sim", "--now", at("15:52"), env=project_env)
    assert run.returncode == 0, run.output
    return project_env


def report(env: dict[str, str], out: Path, *args: str, now: str = at("17:00")):
    run = run_agent("--report", *args, "--out", str(out), "--now", now, env=env)
    assert run.returncode == 0, run.output
    assert run.stdout.strip() == str(out.resolve())
    return out.read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------- figures computed here


def expected_figures(database_url: str, state_file: Path) -> dict[str, Any]:
    """The day's figures from the orders, cycles, tool_calls and equity rows, and the paper account's cash."""
    with psycopg.connect(database_url) as conn:
        fills = conn.execute(
            "SELECT symbol, side, filled_quantity, avg_fill_price, stop_loss, filled_at FROM orders "
            "WHERE filled_quantity > 0 ORDER BY filled_at, id"
        ).fetchall()
        blocked = conn.execute("SELECT count(*) FROM tool_calls WHERE NOT allowed").fetchone()[0]
        cost = conn.execute("SELECT sum(cost_usd) FROM cycles").fetchone()[0]
        cycles = conn.execute("SELECT count(*) FROM cycles").fetchone()[0]
        start = conn.execute("SELECT equity FROM equity_snapshots WHERE kind = 'start_of_day'").fetchone()[0]
    by_symbol: dict[str, dict[str, Any]] = defaultdict(lambda: {"buy": [], "sell": []})
    fees = Decimal(0)
    for symbol, side, quantity, price, stop, filled_at in fills:
        cost_of_fill = hkex.trading_costs(price * quantity, COMMISSION, MIN_COMMISSION).total
        fees += cost_of_fill
        by_symbol[symbol][side].append((quantity, price, stop, filled_at, cost_of_fill))
    trips = {}
    for symbol, sides in by_symbol.items():
        bought = sum(q for q, *_ in sides["buy"])
        assert bought == sum(q for q, *_ in sides["sell"]), f"{symbol} is not flat"
        pnl = (
            sum(q * p for q, p, *_ in sides["sell"])
            - sum(q * p for q, p, *_ in sides["buy"])
            - sum(c for *_, c in sides["buy"] + sides["sell"])
        )
        entry = sum(q * p for q, p, *_ in sides["buy"]) / bought
        stop = sides["buy"][0][2]
        trips[symbol] = {"pnl": pnl, "r": pnl / (bought * (entry - stop)), "exit": max(t for *_, t, _ in sides["sell"])}
    equity, peak, deepest = start, start, Decimal(0)
    for trip in sorted(trips.values(), key=lambda t: t["exit"]):
        equity += trip["pnl"]
        peak = max(peak, equity)
        deepest = max(deepest, (peak - equity) / peak)
    pnl = sum((t["pnl"] for t in trips.values()), Decimal(0))
    broker = SimBroker(sim_at(at("16:30"), state_file))  # the paper account the agent traded
    assert broker.positions() == [], "the guard flattened everything"
    return {
        "trips": trips,
        "pnl": pnl,
        "cash_change": broker.account().cash - STARTING_CASH,
        "fees": fees,
        "start": start,
        "return": pnl / start,
        "max_drawdown": deepest,
        "wins": sum(1 for t in trips.values() if t["pnl"] > 0),
        "avg_r": sum(t["r"] for t in trips.values()) / len(trips),
        "blocked": blocked,
        "cost": cost,
        "cycles": cycles,
    }


def one_decimal_pct(fraction: Decimal | float) -> Decimal:
    return Decimal(f"{float(fraction) * 100:.1f}")


# -------------------------------------------------------------------------------------------------- tests


def test_the_page_shows_the_figures_of_the_journal_for_a_known_day(
    known_day: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    html = report(known_day, tmp_path / "day.html", DAY)
    page = parse_page(html)
    want = expected_figures(database_url, tmp_path / "var" / "sim" / "state.json")
    f = page.figures

    assert len(want["trips"]) >= 1 and "HK.00700" in want["trips"]
    assert want["pnl"] == want["cash_change"], "P&L from the orders equals what the paper account's cash says"
    assert money(f["pnl_hkd"]) == want["pnl"].quantize(Decimal("0.01"))
    assert money(f["fees_hkd"]) == want["fees"]
    assert money(f["starting_equity"]) == want["start"].quantize(Decimal("0.01"))
    assert percent(f["return"]) == one_decimal_pct(want["return"])
    assert percent(f["max_drawdown"]) == one_decimal_pct(want["max_drawdown"])
    assert int(f["round_trips"]) == len(want["trips"])
    assert percent(f["win_rate"]) == one_decimal_pct(Decimal(want["wins"]) / len(want["trips"]))
    assert f["avg_r"] == f"{float(want['avg_r']):.2f} R"
    assert int(f["blocked_calls"]) == want["blocked"] >= 1
    assert Decimal(f["model_cost_usd"].lstrip("$")) == want["cost"].quantize(Decimal("0.0001")) > 0

    # The trades table: one row per round trip, each with the P&L computed here.
    symbols = table_column(page, "trades-table", "Symbol")
    assert sorted(symbols) == sorted(want["trips"])
    for symbol, pnl in zip(symbols, table_column(page, "trades-table", "P&L"), strict=True):
        assert money(pnl) == want["trips"][symbol]["pnl"].quantize(Decimal("0.01")), symbol
    assert all(
        reason == "flatten before the close" or reason for reason in table_column(page, "trades-table", "Exit reason")
    )
    # The reasoning journalled with the 700 entry, as text.
    row = symbols.index("HK.00700")
    assert XSS in page.reasoning[row] and "breakout on volume" in page.reasoning[row]

    # Charts: equity, drawdown, and one price chart per trade, each with drawn paths.
    kinds = [c["data-chart"] for c in page.charts]
    assert kinds.count("equity") == 1 and kinds.count("drawdown") == 1
    assert sorted(c["data-symbol"] for c in page.charts if c["data-chart"] == "trade") == sorted(want["trips"])
    assert all(page.chart_paths[i] > 0 for i in range(len(page.charts)))

    # Cycles, refusals and alerts.
    assert len(page.tables["cycles-table"]) - 1 == want["cycles"]
    refused = page.tables["refusals-table"][1:]
    assert any("check_risk_first" in r[3] and "symbol=9988" in r[5] for r in refused), refused
    assert "guard_action" in table_column(page, "alerts-table", "Event")

    # Self-contained: no script, no external reference; times in HKT.
    assert "<script" not in html.lower() and "http://" not in html.replace("http://www.w3.org", "")
    assert "https://" not in html
    assert "HKT" in html and at("10:15")[:10] + " 10:15" in html


def test_untrusted_reasoning_is_text_never_markup(known_day: dict[str, str], tmp_path: Path) -> None:
    html = report(known_day, tmp_path / "day.html", DAY)
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<img" not in html  # the page itself has no image element at all
    assert "img" not in parse_page(html).tags
    assert "script-src" not in html and "default-src 'none'" in html  # CSP: no script may run


def test_an_empty_journal_gives_a_sensible_page(project_env: dict[str, str], tmp_path: Path) -> None:
    html = report(project_env, tmp_path / "empty.html", DAY)
    page = parse_page(html)
    assert money(page.figures["pnl_hkd"]) == 0
    assert page.figures["round_trips"] == "0" and page.figures["blocked_calls"] == "0"
    assert page.figures["win_rate"] == "n/a" and page.figures["return"] == "n/a"
    assert page.figures["model_cost_usd"] == "$0.0000"
    for empty in ("No round trips were closed", "No cycle ran", "refused nothing", "No alerts", "Flat"):
        assert empty in html


def test_a_day_without_trades_gives_a_sensible_page(project_env: dict[str, str], tmp_path: Path) -> None:
    assert run_agent("--broker", "sim", "--brain", "rules", "--now", at("12:30"), env=project_env).returncode == 0
    html = report(project_env, tmp_path / "lunch.html")  # PERIOD omitted: today (the --now date)
    page = parse_page(html)
    assert page.figures["round_trips"] == "0" and money(page.figures["pnl_hkd"]) == 0
    (cycle,) = page.tables["cycles-table"][1:]
    assert cycle[3] == "skipped" and "lunch" in cycle[-1].lower()
    assert "No round trips were closed" in html


def test_the_default_path_is_under_reports(project_env: dict[str, str], tmp_path: Path) -> None:
    run = run_agent("--report", "2026-11-02..2026-11-20", "--now", at("17:00"), env=project_env, cwd=tmp_path)
    assert run.returncode == 0, run.output
    path = Path(run.stdout.strip())
    try:
        assert path.name == "report-2026-11-02_2026-11-20.html" and path.parent.name == "reports"
        assert "2026-11-02 to 2026-11-20" in path.read_text(encoding="utf-8")
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.parametrize(
    ("period", "message"),
    [
        ("yesterday", "is not a date in the form YYYY-MM-DD"),
        ("2026-13-01", "is not a valid date"),
        ("2026-11-20..2026-11-02", "starts after it ends"),
        ("2026-11-02..", "is not a date"),
        ("2024-01-01..2026-11-20", "a report covers at most 366 days"),
        ("2026-12-01", "after today (2026-11-20)"),
        ("replay:", "replay run id is missing"),
        ("replay:a b", "replay run id is missing"),
    ],
)
def test_bad_periods_are_refused_with_what_to_write(period: str, message: str) -> None:
    with pytest.raises(PeriodError, match=re.escape(message)) as caught:
        parse_period(period, date(2026, 11, 20))
    assert caught.value.exit_code == 2


def test_periods_that_parse() -> None:
    today = date(2026, 11, 20)
    assert parse_period(None, today).label == "2026-11-20"
    assert parse_period("today", today).start == today
    p = parse_period(" 2026-11-02..2026-11-20 ", today)
    assert (p.start, p.end, p.slug) == (date(2026, 11, 2), today, "2026-11-02_2026-11-20")
    assert parse_period("replay:20261120-abc", today).run_id == "20261120-abc"


def test_a_bad_period_exits_2_and_changes_nothing(project_env: dict[str, str], tmp_path: Path) -> None:
    run = run_agent("--report", "2026-02-30", "--out", str(tmp_path / "x.html"), "--now", at("17:00"), env=project_env)
    assert run.returncode == 2, run.output
    assert "'2026-02-30' is not a valid date" in run.stderr and "replay:RUN_ID" in run.stderr
    assert not (tmp_path / "x.html").exists()


def test_an_unknown_replay_run_exits_2(project_env: dict[str, str], postgres_admin_dsn: str, tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    run = run_agent("--report", "replay:nope", "--out", str(out), "--now", at("17:00"), env=project_env)
    assert run.returncode == 2, run.output
    assert "no replay database 'catalyst_replay'" in run.stderr and "agent.py --replay" in run.stderr
    with replay_database(postgres_admin_dsn) as runs:
        known = runs.create("rules", "synthetic")
        run = run_agent("--report", "replay:nope", "--out", str(out), "--now", at("17:00"), env=project_env)
        assert run.returncode == 2, run.output
        assert "no replay run with that id" in run.stderr and f"recent runs: {known.run_id}" in run.stderr
        known.close()
        with psycopg.connect(runs.dsn, autocommit=True) as conn:  # a run whose journal schema is gone
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(known.schema)))
        run = run_agent("--report", f"replay:{known.run_id}", "--out", str(out), "--now", at("17:00"), env=project_env)
    assert run.returncode == 2, run.output
    assert f"journal schema {known.schema} is not in 'catalyst_replay'" in run.stderr
    assert not out.exists()


class replay_database:
    """``catalyst_replay`` on the test server, dropped on exit; ``create`` registers a run the way the replay mode
    does (``replay.journal.ReplayJournal``: a ``replay_runs`` row and the run's own journal schema)."""

    def __init__(self, admin_dsn: str) -> None:
        self.admin = admin_dsn
        self.dsn = make_conninfo(admin_dsn, dbname="catalyst_replay")
        self.opened: list[ReplayJournal] = []

    def create(self, brain: str, feed: str, **config: Any) -> ReplayJournal:
        settings, secrets = Settings(), Secrets(database_url=SecretStr(self.admin))
        run = ReplayJournal.create(settings, secrets, first=date(2026, 11, 19), last=date(2026, 11, 20), brain=brain,
                                   feed=feed, config=config)  # fmt: skip
        self.opened.append(run)
        return run

    def __enter__(self) -> replay_database:
        with psycopg.connect(self.admin, autocommit=True) as conn:
            conn.execute("DROP DATABASE IF EXISTS catalyst_replay WITH (FORCE)")
        return self

    def __exit__(self, *exc: object) -> None:
        for run in self.opened:
            run.close()
        with psycopg.connect(self.admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier("catalyst_replay")))


def replayed_cycle(run: ReplayJournal, hhmm: str, summary: str) -> int:
    cycle = run.journal.start_cycle(
        run_id=f"p000001-replay{run.run_id}", mode="trade", broker="replay", brain="claude", model="m",
        started_at=datetime.fromisoformat(at(hhmm)), trading_date=date(2026, 11, 20),
    )  # fmt: skip
    run.journal.record_decision(cycle, "buy HK.00005", "replayed decision", 0.5)
    run.journal.finish_cycle(cycle, status="ok", finished_at=datetime.fromisoformat(at(hhmm)), summary=summary)
    return cycle


def test_a_replay_run_is_reported_from_its_own_schema(
    project_env: dict[str, str], postgres_admin_dsn: str, tmp_path: Path
) -> None:
    with replay_database(postgres_admin_dsn) as runs:
        first = runs.create("claude", "recorded", in_sample_for_model=True)
        other = runs.create("rules", "synthetic", in_sample_for_model=False)  # the same days, another run
        replayed_cycle(first, "10:15", "replayed")
        replayed_cycle(other, "10:20", "the other run")
        first.finish("ok", {"benchmark_return": 0.0123, "total_return": 0.0456, "max_drawdown": 0.0078},
                     datetime.now(HKT), {"benchmark_label": "HK.02800 buy-and-hold"})  # fmt: skip
        html = report(project_env, tmp_path / "replay.html", f"replay:{first.run_id}")
        other_html = report(project_env, tmp_path / "other.html", f"replay:{other.run_id}")
    page = parse_page(html)
    assert page.figures["in_sample"] == "in-sample for the model"
    assert page.figures["benchmark_return"] == "1.2%"
    assert (page.figures["replay_total_return"], page.figures["replay_max_drawdown"]) == ("4.6%", "0.8%")
    assert "HK.02800 buy-and-hold over the replayed days, as the replay scored it" in html
    (row,) = page.tables["cycles-table"][1:]  # only this run's cycle, not the other run's of the same day
    assert row[-1] == "replayed"
    assert f"replay run {first.run_id} (2026-11-19 to 2026-11-20)" in html
    other_page = parse_page(other_html)
    assert [r[-1] for r in other_page.tables["cycles-table"][1:]] == ["the other run"]
    assert other_page.figures["in_sample"] == "not applicable (rules brain)"
    assert "had not finished when this page was made" in other_html  # its register row still says running


# ----------------------------------------------------------------------------------------------- digest


def mail_settings(settings_file: Path, port: int | None) -> None:
    data = yaml.safe_load(settings_file.read_text(encoding="utf-8"))
    data["alerts"] = (
        {"email": "owner@example.test", "sender": "catalyst@example.test", "smtp_host": "127.0.0.1",
         "smtp_port": port, "starttls": False, "timeout_s": 20}
        if port is not None else {"email": "", "smtp_host": ""}
    )  # fmt: skip
    settings_file.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def test_the_digest_mails_the_day_with_the_report_attached(
    known_day: dict[str, str],
    database_url: str,
    settings_file: Path,
    tmp_path: Path,
    smtp_server: Callable[..., Any],  # noqa: F811
    journal: Journal,
) -> None:
    controller, handler = smtp_server()
    mail_settings(settings_file, controller.port)
    out = tmp_path / "digest.html"
    run = run_agent("--digest", "--out", str(out), "--now", at("16:20"), env=known_day)
    assert run.returncode == 0, run.output
    assert "digest sent to owner@example.test" in run.stdout

    (received,) = handler.received
    mail = received.message
    assert mail["Subject"].startswith("[CATALYST] Daily digest 2026-11-20: P&L ")
    plain = mail.get_body(preferencelist=("plain",)).get_content()
    rich = mail.get_body(preferencelist=("html",)).get_content()
    (attachment,) = list(mail.iter_attachments())
    assert attachment.get_filename() == "digest.html" and attachment.get_content_type() == "text/html"
    attached = attachment.get_content()
    assert attached == out.read_text(encoding="utf-8")
    page = parse_page(attached)
    want = expected_figures(database_url, tmp_path / "var" / "sim" / "state.json")
    assert money(page.figures["pnl_hkd"]) == want["pnl"].quantize(Decimal("0.01"))
    assert page.figures["pnl_hkd"] in plain and page.figures["pnl_hkd"] in rich
    assert parse_page(rich).figures["round_trips"] == str(len(want["trips"]))
    for symbol in want["trips"]:
        assert symbol in plain and symbol in rich
    assert "check_risk_first" in plain and "check_risk_first" in rich
    assert "&lt;img" not in plain  # the text part is plain text, not escaped markup
    (row,) = [a for a in journal.alerts_since(datetime(2026, 1, 1).astimezone()) if a.event == "digest"]
    assert row.sent and row.subject.startswith("Daily digest 2026-11-20")


def test_a_failed_digest_is_journalled_and_breaks_nothing(
    project_env: dict[str, str], settings_file: Path, tmp_path: Path, journal: Journal
) -> None:
    sock, port = closed_port()
    with sock:
        mail_settings(settings_file, port)
        run = run_agent("--digest", "--out", str(tmp_path / "d.html"), "--now", at("16:20"), env=project_env)
    assert run.returncode == 0, run.output
    assert "digest not sent" in run.stderr and "ConnectionRefusedError" in run.stderr
    assert (tmp_path / "d.html").exists()
    (row,) = [a for a in journal.alerts_since(datetime(2026, 1, 1).astimezone()) if a.event == "digest"]
    assert not row.sent and "ConnectionRefusedError" in (row.error or "")


def test_without_mail_settings_the_digest_writes_the_report_and_says_so(
    project_env: dict[str, str], settings_file: Path, tmp_path: Path, journal: Journal
) -> None:
    mail_settings(settings_file, None)
    run = run_agent("--digest", "--out", str(tmp_path / "d.html"), "--now", at("16:20"), env=project_env)
    assert run.returncode == 0, run.output
    assert "E-mail is not configured" in run.stdout and str((tmp_path / "d.html").resolve()) in run.stdout
    assert (tmp_path / "d.html").exists()
    assert journal.alerts_since(datetime(2026, 1, 1).astimezone()) == []


def test_no_digest_on_a_day_without_trading(project_env: dict[str, str], tmp_path: Path) -> None:
    run = run_agent(
        "--digest", "--out", str(tmp_path / "d.html"), "--now", "2026-11-22T16:20:00+08:00", env=project_env
    )
    assert run.returncode == 0, run.output
    assert "not an HKEX trading day" in run.stdout and not (tmp_path / "d.html").exists()


def test_help_names_the_report_flags() -> None:
    import subprocess
    import sys

    from tests.agent_runner import AGENT

    out = subprocess.run([sys.executable, str(AGENT), "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--report [PERIOD]", "--digest", "--out PATH", "replay:RUN_ID"):
        assert flag in out


def test_out_goes_only_with_report_or_digest(project_env: dict[str, str], tmp_path: Path) -> None:
    run = run_agent(
        "--guard", "--broker", "sim", "--out", str(tmp_path / "x.html"), "--now", at("10:15"), env=project_env
    )
    assert run.returncode == 2, run.output
    assert "--out only goes with --report or --digest" in run.stderr
    run = run_agent("--report", "--guard", env=project_env)
    assert run.returncode == 2 and "not allowed with argument" in run.stderr
