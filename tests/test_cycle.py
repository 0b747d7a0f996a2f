"""Whole cycles as cron runs them: ``python agent.py …`` in a subprocess, a real journal, the sim exchange."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from data.database import Journal
from tests.agent_runner import IN_SESSION, run_agent


def only_cycle(journal: Journal, date: str):
    from datetime import date as _date

    cycles = journal.cycles_on(_date.fromisoformat(date))
    assert len(cycles) == 1, cycles
    return cycles[0]


def test_help_explains_every_flag() -> None:
    import subprocess
    import sys

    from tests.agent_runner import AGENT

    out = subprocess.run([sys.executable, str(AGENT), "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--dry-run", "--guard", "--broker", "--brain", "--config", "--now", "--live"):
        assert flag in out
    assert "exit codes" in out and "5  another instance holds the account lock" in out


def test_dry_run_cycle_with_rules_brain_journals_every_call(project_env: dict[str, str], journal: Journal) -> None:
    run = run_agent("--dry-run", "--broker", "sim", "--brain", "rules", "--now", IN_SESSION, env=project_env)
    assert run.returncode == 0, run.output
    cycle = only_cycle(journal, "2026-11-20")
    assert (cycle.mode, cycle.status, cycle.broker, cycle.brain) == ("dry_run", "ok", "sim", "rules")
    calls = journal.tool_calls(cycle.id)
    names = [c.name for c in calls]
    assert names[:2] == ["get_portfolio", "scan_market"]
    assert names[-1] == "log_decision"
    assert [c.seq for c in calls] == list(range(1, len(calls) + 1))
    assert all(c.reason for c in calls)
    # At 10:15 on this seed the momentum rules fire; a dry run sends nothing: every order row is dry_run.
    orders = journal.orders_on(cycle.trading_date)
    assert orders and all(o.status == "dry_run" for o in orders)
    assert len(orders) == names.count("execute_trade")
    # Every execution was allowed, and an allowed check_risk of the same symbol came before it.
    trades = [c for c in calls if c.name == "execute_trade"]
    assert trades and all(c.allowed and not c.is_error for c in trades), trades
    for trade in trades:
        assert any(
            c.name == "check_risk" and c.allowed and c.seq < trade.seq and c.input["symbol"] == trade.input["symbol"]
            for c in calls
        ), trade
    assert "order_dry_run" in run.output
    # The readable account on the console.
    assert "context_built" in run.output and "cycle_finished" in run.output


@pytest.mark.parametrize(
    ("now", "why"),
    [
        ("2026-11-22T10:15:00+08:00", "Sunday"),
        ("2026-11-20T12:30:00+08:00", "lunch break"),
        ("2026-12-25T10:15:00+08:00", "Christmas holiday"),
        ("2026-11-20T09:15:00+08:00", "pre-opening auction"),
        ("2026-12-24T13:30:00+08:00", "half day afternoon"),
    ],
)
def test_market_closed_skips_without_a_model_call(
    project_env: dict[str, str], journal: Journal, now: str, why: str
) -> None:
    # --brain claude with no API key: any attempt to build the brain would fail with exit 2.
    run = run_agent("--broker", "sim", "--brain", "claude", "--now", now, env=project_env)
    assert run.returncode == 0, run.output
    assert "market_closed" in run.output
    cycle = only_cycle(journal, now[:10])
    assert cycle.status == "skipped" and cycle.iterations == 0
    assert journal.tool_calls(cycle.id) == []


def test_bad_setting_exits_2_and_names_the_key(project_env: dict[str, str], settings_file: Path) -> None:
    data = yaml.safe_load(settings_file.read_text())
    data["risk"]["max_position_pct"] = 3
    settings_file.write_text(yaml.safe_dump(data))
    run = run_agent("--dry-run", "--brain", "rules", "--now", IN_SESSION, env=project_env)
    assert run.returncode == 2, run.output
    assert "risk.max_position_pct = 3" in run.output


def test_claude_without_api_key_exits_2_with_what_to_do(project_env: dict[str, str]) -> None:
    run = run_agent("--dry-run", "--broker", "sim", "--brain", "claude", "--now", IN_SESSION, env=project_env)
    assert run.returncode == 2, run.output
    assert "ANTHROPIC_API_KEY is not set" in run.output and "--brain rules" in run.output


def test_now_is_refused_when_a_real_account_could_be_reached(project_env: dict[str, str], settings_file: Path) -> None:
    data = yaml.safe_load(settings_file.read_text())
    data["broker"]["name"] = "futu"
    data["broker"]["futu"]["trd_env"] = "REAL"
    settings_file.write_text(yaml.safe_dump(data))
    run = run_agent("--brain", "rules", "--live", "--now", IN_SESSION, env=project_env)
    assert run.returncode == 2, run.output
    assert "--now is refused" in run.output


def test_real_account_needs_live_flag(project_env: dict[str, str], settings_file: Path) -> None:
    data = yaml.safe_load(settings_file.read_text())
    data["broker"]["name"] = "futu"
    data["broker"]["futu"]["trd_env"] = "REAL"
    settings_file.write_text(yaml.safe_dump(data))
    run = run_agent("--brain", "rules", env=project_env)
    assert run.returncode == 2, run.output
    assert "--live was not given" in run.output


def test_journal_goes_to_database_url(project_env: dict[str, str], journal: Journal, tmp_path: Path) -> None:
    """With DATABASE_URL set, nothing is written to an embedded server (its folder is never created)."""
    run = run_agent("--dry-run", "--broker", "sim", "--brain", "rules", "--now", IN_SESSION, env=project_env)
    assert run.returncode == 0, run.output
    assert len(journal.cycles_on(__import__("datetime").date(2026, 11, 20))) == 1
    assert not (tmp_path / "var" / "pg").exists()


def test_log_file_is_json_lines_without_secrets(project_env: dict[str, str], tmp_path: Path) -> None:
    import json

    env = dict(project_env, ANTHROPIC_API_KEY="sk-ant-do-not-log-me", FUTU_TRADE_PWD="918273")
    run = run_agent("--dry-run", "--broker", "sim", "--brain", "rules", "--now", IN_SESSION, "-v", env=env)
    assert run.returncode == 0, run.output
    log_file = tmp_path / "logs" / "agent-20261120.log"
    lines = log_file.read_text().splitlines()
    events = [json.loads(line) for line in lines]
    assert {"run_started", "context_built", "cycle_finished"} <= {e["event"] for e in events}
    text = log_file.read_text() + run.output
    assert "sk-ant-do-not-log-me" not in text and "918273" not in text


def test_check_reports_a_missed_cycle_once(project_env: dict[str, str], journal: Journal) -> None:
    # 09:30 ran (a cycle at 09:31); 13:00 did not. At 13:30 the check says so and alerts, once.
    run = run_agent("--dry-run", "--broker", "sim", "--brain", "rules", "--now", "2026-11-20T09:31:00+08:00",
                    env=project_env)  # fmt: skip
    assert run.returncode == 0, run.output
    first = run_agent("--check", "--now", "2026-11-20T11:00:00+08:00", env=project_env)
    assert first.returncode == 0, first.output
    missed = run_agent("--check", "--now", "2026-11-20T13:30:00+08:00", env=project_env)
    assert missed.returncode == 1 and "missed scheduled cycle(s) at 13:00 HKT" in missed.output
    again = run_agent("--check", "--now", "2026-11-20T13:45:00+08:00", env=project_env)
    assert again.returncode == 1
    events = [a.event for a in journal.alerts_since(__import__("datetime").datetime(2026, 11, 1).astimezone())]
    assert events.count("missed_run") == 1
    sunday = run_agent("--check", "--now", "2026-11-22T13:30:00+08:00", env=project_env)
    assert sunday.returncode == 0, sunday.output


def test_missed_cycles_rule_table() -> None:
    from datetime import datetime, timedelta
    from zoneinfo import ZoneInfo

    from agent import missed_cycles

    hkt = ZoneInfo("Asia/Hong_Kong")
    nine30, one = datetime(2026, 11, 20, 9, 30, tzinfo=hkt), datetime(2026, 11, 20, 13, 0, tzinfo=hkt)
    cases = [
        (nine30 + timedelta(minutes=10), [], []),  # still within the grace period: not missed yet
        (nine30 + timedelta(minutes=16), [], [nine30]),  # past the grace with no cycle: missed
        (nine30 + timedelta(minutes=16), [nine30 + timedelta(minutes=1)], []),  # ran a minute late: fine
        (nine30 + timedelta(minutes=16), [nine30 - timedelta(minutes=4)], []),  # cron slightly early: fine
        (one + timedelta(hours=1), [nine30], [one]),  # the afternoon cycle did not run
        (
            one + timedelta(hours=1),
            [nine30 + timedelta(hours=2)],
            [nine30, one],
        ),  # a stray 11:30 run counts for neither
    ]
    for now, started, expected in cases:
        assert missed_cycles(now, [nine30, one], started) == expected, (now, started)
