"""``--reflection on|off`` in a Claude replay, end to end: real ``agent.py --replay`` processes, the real anthropic
SDK against the local Messages API server (a scripted model and a scripted lesson review), the replay database.

The same two days run with lessons and without. With them, the first round trip (bought at Tuesday's open,
flattened before its close) is reviewed in Wednesday's first cycle, at the replay clock; the lesson lands in the
run's own schema, dated by that clock, and reaches the first message of Wednesday's cycles only. Without them,
nothing is reviewed and no lesson is shown. The live journal never sees a review or a lesson."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg import sql
from psycopg.conninfo import make_conninfo

from data.database import Journal
from reflection import LESSONS_HEADING, REVIEW_TOOL_NAME, LessonStore
from replay.clock import HKT
from tests.agent_runner import run_agent
from tests.fakes.messages_api import FakeMessagesAPI, message, text, tool_use

DAYS = "2026-09-08..2026-09-09"
DAY1, DAY2 = "2026-09-08", "2026-09-09"
REVIEW_AT = datetime(2026, 9, 9, 9, 30, tzinfo=HKT)  # Wednesday's first cycle: the first one after the trip closed
LESSON = "Entries at the open were flattened at the close without reaching the target: size smaller at the open."


def is_review(body: dict[str, Any]) -> bool:
    return [t["name"] for t in body.get("tools", [])] == [REVIEW_TOOL_NAME]


def reviewed_trades(body: dict[str, Any]) -> list[dict[str, Any]]:
    content = body["messages"][0]["content"]
    return json.loads(content[content.index("\n") + 1 :])


def first_user_text(body: dict[str, Any]) -> str:
    content = body["messages"][0]["content"]
    return content if isinstance(content, str) else json.dumps(content)


def trader(body: dict[str, Any]) -> dict[str, Any]:
    """A scripted model. Review: one lesson on the trades it was given. Cycle: portfolio and a quote of HK.00700;
    when flat, buy 100 through check_risk and execute_trade (3% stop, 8% target); then done."""
    if is_review(body):
        ids = [t["trade_id"] for t in reviewed_trades(body)]
        lesson = {"text": LESSON, "setup": "open entries", "trade_ids": ids, "confidence": 0.5}
        return message([tool_use(REVIEW_TOOL_NAME, {"lessons": [lesson]})])
    messages = body["messages"]
    turn = sum(1 for m in messages if m["role"] == "assistant")
    tag = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:12]
    if turn == 0:
        return message([tool_use("get_portfolio", {}, id=f"tp{tag}"),
                        tool_use("get_quote", {"symbol": "HK.00700"}, id=f"tq{tag}")])  # fmt: skip
    if turn == 1:
        results = {b["tool_use_id"][:2]: json.loads(b["content"]) for b in messages[-1]["content"]}
        if results["tp"].get("positions"):
            return message([tool_use("log_decision", {"decision": "hold", "reasoning": "already in 0700"},
                                     id=f"td{tag}")])  # fmt: skip
        quote = results["tq"]
        entry = float(quote.get("ask_price") or quote["last_price"])
        trade = {"symbol": "HK.00700", "side": "buy", "quantity": 100}
        prices = {"stop_loss": round(entry * 0.97, 1), "take_profit": round(entry * 1.08, 1)}
        return message(
            [
                tool_use("log_decision", {"decision": "enter", "reasoning": "0700 at the open", "confidence": 0.5},
                         id=f"td{tag}"),
                tool_use("check_risk", {**trade, "entry_price": entry, **prices}, id=f"tc{tag}"),
                tool_use("execute_trade", {**trade, "order_type": "limit", "limit_price": entry, **prices},
                         id=f"te{tag}"),
            ]
        )  # fmt: skip
    return message([text("Done for this cycle.")])


@pytest.fixture
def api() -> Iterator[FakeMessagesAPI]:
    with FakeMessagesAPI(responder=trader) as fake:
        yield fake


@pytest.fixture
def replay_db(postgres_admin_dsn: str, settings_file: Path) -> Iterator[str]:
    """A replay database of this test's own; a review after every round trip."""
    name = f"test_replay_{uuid.uuid4().hex[:16]}"
    data = yaml.safe_load(settings_file.read_text(encoding="utf-8"))
    data["replay"]["database"] = name
    data["reflection"]["every_trades"] = 1
    settings_file.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    yield name
    with psycopg.connect(postgres_admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def replay(env: dict[str, str], api: FakeMessagesAPI, reflection: str, out: Path) -> tuple[dict[str, Any], list[Any]]:
    """Run the two days with ``--reflection``; return the score and the API requests this run made."""
    before = len(api.message_requests)
    run = run_agent("--replay", DAYS, "--brain", "claude", "--reflection", reflection, "--json", str(out), env=env)
    assert run.returncode == 0, run.output
    return json.loads(out.read_text(encoding="utf-8")), [r.body for r in api.message_requests[before:]]


def run_schema(admin_dsn: str, database: str, run_id: int) -> Journal:
    with psycopg.connect(make_conninfo(admin_dsn, dbname=database), autocommit=True) as conn:
        row = conn.execute("SELECT schema_name, settings FROM replay_runs WHERE id = %s", (run_id,)).fetchone()
    assert row is not None
    return Journal.connect(make_conninfo(admin_dsn, dbname=database, options=f"-c search_path={row[0]}"))


def cycle_day(body: dict[str, Any]) -> str:
    found = re.search(r"Time: (\d{4}-\d{2}-\d{2}) \d{2}:\d{2} HKT", first_user_text(body))
    assert found, "the cycle's first message names its time"
    return found.group(1)


def test_a_claude_replay_with_and_without_lessons_on_the_same_days(
    project_env: dict[str, str], api: FakeMessagesAPI, replay_db: str, postgres_admin_dsn: str, tmp_path: Path,
    journal: Journal,
) -> None:  # fmt: skip
    env = {**project_env, **api.env()}
    on, on_requests = replay(env, api, "on", tmp_path / "on.json")
    assert on["metrics"]["round_trips"] >= 1
    first_trip = on["trades"][0]
    assert first_trip["entry_time"].startswith(DAY1) and first_trip["exit_time"].startswith(DAY1)

    # One review, in Wednesday's first cycle, of Tuesday's trip only: what had closed by the replay clock.
    reviews = [b for b in on_requests if is_review(b)]
    assert len(reviews) == 1
    trades = reviewed_trades(reviews[0])
    assert [t["symbol"] for t in trades] == ["HK.00700"]
    assert all(datetime.fromisoformat(t["exit"]["time"]) <= REVIEW_AT for t in trades)
    assert all(t["entry"]["time"].startswith(DAY1) for t in trades)

    # The review and its lesson are in the run's own schema, dated by the replay clock, not the wall clock.
    with run_schema(postgres_admin_dsn, replay_db, on["run_id"]) as rj:
        store = LessonStore(rj)
        (review,) = store.reviews()
        (lesson,) = store.lessons()
        review_cycle = rj.get_cycle(review.cycle_id)
        assert review_cycle is not None and review_cycle.started_at == REVIEW_AT and review_cycle.mode == "trade"
        assert review.status == "ok" and review.trade_ids == [t["trade_id"] for t in trades]
        assert review.created_at == REVIEW_AT and lesson.created_at == REVIEW_AT
        assert lesson.text == LESSON and lesson.trade_ids == review.trade_ids
        assert float(review.cost_usd) > 0  # counted like any other call

    # The lesson reaches the first message of Wednesday's cycles, never Tuesday's, never the system prefix.
    cycles = [b for b in on_requests if not is_review(b)]
    with_lesson = {cycle_day(b) for b in cycles if LESSONS_HEADING in first_user_text(b)}
    assert with_lesson == {DAY2}
    assert all(LESSON in first_user_text(b) for b in cycles if cycle_day(b) == DAY2)
    assert not any(LESSON in json.dumps(b["system"]) for b in cycles)

    # The same days without lessons: no review, no lesson shown, none stored in that run's schema (the first run's
    # lesson, in the same replay database, stays in its own schema). Tuesday is the same conversation as before,
    # so it came from the response cache: only Wednesday's requests reached the API.
    off, off_requests = replay(env, api, "off", tmp_path / "off.json")
    assert off["run_id"] != on["run_id"]
    assert not any(is_review(b) for b in off_requests)
    assert not any(LESSONS_HEADING in first_user_text(b) for b in off_requests)
    assert off_requests and {cycle_day(b) for b in off_requests} == {DAY2}
    assert off["trades"][0] == first_trip  # Tuesday traded identically
    with run_schema(postgres_admin_dsn, replay_db, off["run_id"]) as rj:
        assert LessonStore(rj).reviews() == [] and LessonStore(rj).lessons() == []

    # The live journal never saw any of it.
    assert LessonStore(journal).reviews() == [] and LessonStore(journal).lessons() == []
    assert journal.cycles_on(datetime(2026, 9, 9).date()) == []


def test_reflection_is_refused_for_the_rules_brain(project_env: dict[str, str]) -> None:
    run = run_agent("--replay", DAYS, "--brain", "rules", "--reflection", "on", env=project_env)
    assert run.returncode == 2, run.output
    assert "--reflection applies to Claude replays" in run.stderr and "--brain claude" in run.stderr
