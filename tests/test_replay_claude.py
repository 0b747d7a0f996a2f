"""Claude replays through the real anthropic SDK against the local Messages API server: the response cache,
the cost stop, ``--anonymize`` and the "in-sample for the model" label."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg import sql
from pydantic import SecretStr

from brokers.sim import UNIVERSE
from config.settings import Secrets, Settings, load_settings
from replay import score
from replay.feed import SyntheticStore
from replay.runner import ReplayOptions, run_days
from tests.agent_runner import run_agent
from tests.fakes.messages_api import FakeMessagesAPI, message, text, tool_use

DAY = date(2026, 9, 8)


def analyst(body: dict[str, Any]) -> dict[str, Any]:
    """A scripted model: portfolio and scan, then a quote of the top candidate and a decision, then done."""
    messages = body["messages"]
    turn = sum(1 for m in messages if m["role"] == "assistant")
    tag = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:12]
    if turn == 0:
        return message(
            [text("Checking."), tool_use("get_portfolio", {}, id=f"tp{tag}"),
             tool_use("scan_market", {"index": "ALL", "limit": 5}, id=f"ts{tag}")]
        )  # fmt: skip
    if turn == 1:
        results = {b["tool_use_id"][:2]: json.loads(b["content"]) for b in messages[-1]["content"]}
        top = results["ts"]["candidates"][0]["symbol"]
        decision = {"decision": "no_trade", "reasoning": f"watching {top}"}
        return message(
            [tool_use("get_quote", {"symbol": top}, id=f"tq{tag}"), tool_use("log_decision", decision, id=f"td{tag}")]
        )
    return message([text("Done for this cycle.")])


@pytest.fixture
def api() -> Iterator[FakeMessagesAPI]:
    with FakeMessagesAPI(responder=analyst) as fake:
        yield fake


@pytest.fixture
def replay_db(postgres_admin_dsn: str) -> Iterator[str]:
    name = f"test_replay_{uuid.uuid4().hex[:16]}"
    yield name
    with psycopg.connect(postgres_admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def claude_replay(
    monkeypatch: pytest.MonkeyPatch, api: FakeMessagesAPI, database_url: str, replay_db: str, **options: Any
) -> tuple[Any, score.Report]:
    monkeypatch.setenv("ANTHROPIC_BASE_URL", api.base_url)
    settings = load_settings()  # the shipped settings: their model prices make the cost real
    settings = settings.model_copy(
        update={
            "replay": settings.replay.model_copy(update={"database": replay_db}),
            "claude": settings.claude.model_copy(
                update={"knowledge_cutoff": {settings.claude.model: date(2026, 1, 31)}}
            ),
        }
    )
    secrets = Secrets(database_url=SecretStr(database_url), anthropic_api_key=SecretStr("test-key"))
    opts = ReplayOptions(first=DAY, last=options.pop("last", DAY), brain="claude", feed="synthetic", seed=42, **options)
    store = SyntheticStore(42)
    run = run_days(settings, secrets, store, opts, "claude")
    return run, score.score_run(run, store, opts, settings)


def test_a_claude_replay_is_cached_by_request_so_a_rerun_is_free_and_identical(
    monkeypatch: pytest.MonkeyPatch, api: FakeMessagesAPI, database_url: str, replay_db: str
) -> None:
    first_run, first = claude_replay(monkeypatch, api, database_url, replay_db)
    sent = len(api.message_requests)
    assert sent == 6 and first_run.claude.misses == 6  # two cycles (09:30, 13:00) of three turns
    assert first.metrics["input_tokens"] > 0 and first.metrics["model_cost_usd"] > 0
    assert first.in_sample_for_model is False  # after the configured knowledge cutoff
    second_run, second = claude_replay(monkeypatch, api, database_url, replay_db)
    assert len(api.message_requests) == sent  # nothing new reached the API
    assert (second_run.claude.hits, second_run.claude.misses) == (6, 0)
    assert second.metrics["model_cost_usd"] == 0 and second.equity == first.equity
    decisions = [d.reasoning for c in first_run.cycles for d in first_run.journal.journal.decisions(c)]
    again = [d.reasoning for c in second_run.cycles for d in second_run.journal.journal.decisions(c)]
    assert decisions == again and decisions[0].startswith("watching HK.")


def test_anonymize_keeps_every_real_symbol_and_name_from_the_model(
    monkeypatch: pytest.MonkeyPatch, api: FakeMessagesAPI, database_url: str, replay_db: str
) -> None:
    run, _report = claude_replay(monkeypatch, api, database_url, replay_db, anonymize=True)
    bodies = [json.dumps(r.body, ensure_ascii=False) for r in api.message_requests]
    assert len(bodies) == 6
    for inst in UNIVERSE:
        for secret in (inst.symbol, inst.name):
            assert not any(secret in body for body in bodies), secret
    assert any("STOCK0" in body for body in bodies) and any("Company 0" in body for body in bodies)
    # The model's alias was mapped back before the gate: the journal has the real symbol, quoted for real.
    calls = [t for c in run.cycles for t in run.journal.journal.tool_calls(c) if t.name == "get_quote"]
    assert calls and all(t.input["symbol"].startswith("HK.") and not t.is_error for t in calls)
    decisions = [d.reasoning for c in run.cycles for d in run.journal.journal.decisions(c)]
    assert decisions[0].startswith("watching HK.")


def test_max_cost_stops_the_replay_cleanly_and_scores_what_ran(
    monkeypatch: pytest.MonkeyPatch, api: FakeMessagesAPI, database_url: str, replay_db: str
) -> None:
    run, report = claude_replay(monkeypatch, api, database_url, replay_db, last=date(2026, 9, 10), max_cost_usd=0.01)
    assert (
        run.stopped is not None and "--max-cost-usd 0.01 reached" in run.stopped and "before 2026-09-09" in run.stopped
    )
    assert [d for d, _e in run.closes] == [DAY]  # the later days were not run
    # The loop checks the budget before each request: the first request spent past it, nothing more was sent.
    assert len(api.message_requests) == 1
    assert report.metrics["model_cost_usd"] > 0.01 and report.equity


def test_a_replay_before_the_models_knowledge_cutoff_is_labelled_in_sample() -> None:
    settings = Settings()
    model = settings.claude.model
    settings = settings.model_copy(
        update={"claude": settings.claude.model_copy(update={"knowledge_cutoff": {model: date(2026, 9, 30)}})}
    )
    assert score.in_sample(settings, "claude", DAY) is True
    assert score.in_sample(settings, "claude", date(2026, 10, 5)) is False
    assert score.in_sample(settings, "rules", DAY) is False
    assert score.in_sample(Settings(), "claude", DAY) is True  # no cutoff configured: assume it knows
    report = score.Report(1, DAY, DAY, "claude", "synthetic", True, {}, [], [], [])
    assert "IN-SAMPLE FOR THE MODEL" in score.render_table(report)
    assert score.report_json(report)["in_sample_for_model"] is True


def test_compare_rules_runs_both_brains_on_the_same_days_side_by_side(
    project_env: dict[str, str], fake_api: FakeMessagesAPI, settings_file: Path, replay_db: str, tmp_path: Path
) -> None:
    data = yaml.safe_load(settings_file.read_text(encoding="utf-8"))
    data["replay"]["database"] = replay_db
    settings_file.write_text(yaml.safe_dump(data), encoding="utf-8")
    out = tmp_path / "score.json"
    env = {**project_env, **fake_api.env()}
    args = ("--replay", f"{DAY}..{DAY}", "--brain", "claude", "--compare", "rules", "--json", str(out))
    run = run_agent(*args, env=env)
    assert run.returncode == 0, run.output
    assert "Claude cycles; at most $" in run.stderr  # the estimate, before it starts
    assert "projected for the run" in run.stderr  # and refined from the cycles' real cost as it goes
    assert "IN-SAMPLE FOR THE MODEL" in run.stderr and "IN-SAMPLE FOR THE MODEL" in run.stdout  # no cutoff set
    header = next(line for line in run.stdout.splitlines() if "(run " in line)
    assert "claude (run" in header and "rules (run" in header
    document = json.loads(out.read_text(encoding="utf-8"))
    assert document["brain"] == "claude" and document["in_sample_for_model"] is True
    compare = document["compare"]
    assert compare["brain"] == "rules" and compare["in_sample_for_model"] is False and "compare" not in compare
    assert set(compare) == set(document) - {"compare"}
    assert compare["metrics"]["round_trips"] == 1 and document["metrics"]["round_trips"] == 0  # this model idles
