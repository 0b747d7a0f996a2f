"""Whole replays: the agent's own cycle and guard over a past day, scored, deterministic, without look-ahead,
and isolated from the live journal, the account lock, the sim's state file, the kill switch and OpenD."""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Iterator
from datetime import date, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg import sql
from psycopg.conninfo import make_conninfo
from pydantic import SecretStr

from config.settings import Secrets, Settings
from data.database import Journal
from replay import score
from replay.clock import HKT
from replay.feed import SyntheticStore
from replay.runner import ReplayOptions, run_days
from tests.agent_runner import run_agent
from tests.test_replay_feed import SpikedStore

DAY = date(2026, 9, 8)  # seed 42: a momentum entry at 13:00 (HK.00883), a take-profit exit at 14:40
T = datetime(2026, 9, 8, 14, 0, tzinfo=HKT)


@pytest.fixture
def replay_db(postgres_admin_dsn: str) -> Iterator[str]:
    """A replay database name of this test's own, dropped afterwards."""
    name = f"test_replay_{uuid.uuid4().hex[:16]}"
    yield name
    with psycopg.connect(postgres_admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def replay(database_url: str, replay_db: str, store: Any, brain: str = "rules") -> tuple[Any, score.Report]:
    settings = Settings()
    settings = settings.model_copy(update={"replay": settings.replay.model_copy(update={"database": replay_db})})
    secrets = Secrets(database_url=SecretStr(database_url))
    options = ReplayOptions(first=DAY, last=DAY, brain=brain, feed="synthetic", seed=42)
    run = run_days(settings, secrets, store, options, brain)
    report = score.score_run(run, store, options, settings)
    return run, report


def journal_rows(run: Any, before: datetime | None = None) -> dict[str, list[Any]]:
    """What the run decided: tool calls (with results), orders as intended, decisions; optionally before a time."""
    conn = run.journal.journal._conn
    cut = before or datetime(2100, 1, 1, tzinfo=HKT)
    calls = conn.execute(
        "SELECT c.started_at, t.seq, t.name, t.input, t.allowed, t.reason, t.result FROM tool_calls t "
        "JOIN cycles c ON c.id = t.cycle_id WHERE c.started_at < %s ORDER BY c.started_at, t.seq",
        (cut,),
    ).fetchall()
    orders = conn.execute(
        "SELECT c.started_at, o.client_order_id, o.symbol, o.side, o.quantity, o.order_type, o.limit_price, "
        "o.stop_loss, o.take_profit, o.reason FROM orders o JOIN cycles c ON c.id = o.cycle_id "
        "WHERE c.started_at < %s ORDER BY o.id",
        (cut,),
    ).fetchall()
    decisions = conn.execute(
        "SELECT c.started_at, d.decision, d.reasoning FROM decisions d JOIN cycles c ON c.id = d.cycle_id "
        "WHERE c.started_at < %s ORDER BY d.id",
        (cut,),
    ).fetchall()
    return {"tool_calls": calls, "orders": orders, "decisions": decisions}


def comparable(report: score.Report) -> dict[str, Any]:
    out = copy.deepcopy(score.report_json(report))
    out.pop("run_id")
    out["metrics"].pop("wall_s")
    return out


def test_the_rules_brain_replays_identically_with_the_same_feed_and_seed(database_url: str, replay_db: str) -> None:
    first_run, first = replay(database_url, replay_db, SyntheticStore(42))
    second_run, second = replay(database_url, replay_db, SyntheticStore(42))
    assert first.run_id != second.run_id  # two runs, two schemas of the replay database
    assert comparable(first) == comparable(second)
    assert journal_rows(first_run) == journal_rows(second_run)
    # The day has something to compare: an entry and its exit, scored.
    assert first.metrics["round_trips"] == 1 and first.trades[0].symbol == "HK.00883"
    assert first.trades[0].entry_time == datetime(2026, 9, 8, 13, 0, tzinfo=HKT)  # the bar after the 13:00 decision
    assert first.trades[0].r_multiple is not None and first.trades[0].reasoning.startswith("Entered 1")
    other_seed = SyntheticStore(7)
    _, different = replay(database_url, replay_db, other_seed)
    assert comparable(different) != comparable(first)


def test_changing_every_bar_after_t_leaves_every_decision_and_order_before_t_identical(
    database_url: str, replay_db: str
) -> None:
    base_run, base = replay(database_url, replay_db, SyntheticStore(42))
    changed_run, changed = replay(database_url, replay_db, SpikedStore(SyntheticStore(42), None, after=T, factor=0.93))
    before_base, before_changed = journal_rows(base_run, T), journal_rows(changed_run, T)
    assert before_base["orders"], "the day must have an order before T for this test to mean anything"
    assert before_changed == before_base
    equity_before = [e for e in base.equity if datetime.fromisoformat(e["time"]) < T]
    assert changed.equity[: len(equity_before)] == equity_before
    # The control: after T the changed bars do change what happened (a 7 % drop stops the trade out).
    assert comparable(changed)["trades"] != comparable(base)["trades"]


@pytest.fixture
def isolated_env(project_env: dict[str, str], settings_file: Path, replay_db: str, tmp_path: Path) -> dict[str, str]:
    data = yaml.safe_load(settings_file.read_text(encoding="utf-8"))
    data["replay"]["database"] = replay_db
    data["broker"]["name"] = "futu"  # the configured broker is Futu: a replay must still never reach OpenD
    settings_file.write_text(yaml.safe_dump(data), encoding="utf-8")
    (tmp_path / "HALT").write_text("halted for live trading\n", encoding="utf-8")
    env = dict(project_env)
    env["OPEND_HOST"], env["OPEND_PORT"] = "127.0.0.1", "9"  # nothing listens there
    return env


def test_a_replay_never_touches_the_live_journal_lock_state_file_kill_switch_or_opend(
    isolated_env: dict[str, str], journal: Journal, settings_file: Path, replay_db: str, tmp_path: Path,
    postgres_admin_dsn: str,
) -> None:  # fmt: skip
    for key in ("sim:sim", "futu:SIMULATE"):
        assert journal.try_lock(key, "the live agent, in this test") is None  # held by "the live agent"
    out = tmp_path / "score.json"
    result = run_agent("--replay", f"{DAY}..{DAY}", "--brain", "rules", "--json", str(out), env=isolated_env)
    assert result.returncode == 0, result.output
    assert "total return" in result.stdout and "round trips" in result.stdout
    assert journal.cycles_on(DAY) == [] and journal.orders_on(DAY) == []  # the live journal saw nothing
    assert not (tmp_path / "var" / "sim" / "state.json").exists()
    document = json.loads(out.read_text(encoding="utf-8"))
    assert set(document) == {
        "run_id",
        "from",
        "to",
        "brain",
        "feed",
        "in_sample_for_model",
        "metrics",
        "equity",
        "trades",
    }
    assert document["in_sample_for_model"] is False and document["metrics"]["round_trips"] == 1  # HALT ignored
    assert set(document["metrics"]) == set(score.LABELS)
    assert document["equity"][0]["time"].endswith("+08:00")
    with psycopg.connect(make_conninfo(postgres_admin_dsn, dbname=replay_db), autocommit=True) as conn:
        status, schema, metrics = conn.execute(
            "SELECT status, schema_name, metrics FROM replay_runs WHERE id = %s", (document["run_id"],)
        ).fetchone()
        assert (status, metrics["round_trips"]) == ("ok", 1)
        brokers = conn.execute(
            sql.SQL("SELECT DISTINCT broker FROM {}.cycles").format(sql.Identifier(schema))
        ).fetchall()
        assert brokers == [("replay",)]


@pytest.mark.parametrize(
    ("range_", "message"),
    [
        ("2026-09-10..2026-09-01", "ends before it starts"),
        ("last week", "is not a date range"),
        ("2026-10-01..2026-10-01", "no XHKG trading day"),  # National Day
        ("2099-01-05..2099-01-06", "past days only"),
    ],
)
def test_a_bad_replay_range_exits_2_with_what_to_do(project_env: dict[str, str], range_: str, message: str) -> None:
    result = run_agent("--replay", range_, "--brain", "rules", env=project_env)
    assert result.returncode == 2 and message in result.output, result.output
