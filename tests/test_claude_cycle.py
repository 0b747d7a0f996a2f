"""The Claude loop end to end: the real anthropic SDK in a real ``agent.py`` process against the local
Messages API server, the sim exchange and a real journal."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest

from brokers.sim import SimBroker
from data.database import Journal
from tests.agent_runner import IN_SESSION, run_agent, sim_at
from tests.fakes.messages_api import FakeMessagesAPI, message, text, tool_use


def test_claude_loop_journals_every_call_with_its_verdict(
    project_env: dict[str, str], journal: Journal, fake_api: FakeMessagesAPI, settings_file: Path
) -> None:
    q = sim_at(IN_SESSION).quote("HK.00700")
    entry = q.ask_price or q.last_price
    stop, target = (
        (entry * Decimal("0.97")).quantize(Decimal("0.1")),
        (entry * Decimal("1.08")).quantize(Decimal("0.1")),
    )
    trade = {"symbol": "700", "side": "buy", "quantity": 100}
    prices = {"entry_price": float(entry), "stop_loss": float(stop), "take_profit": float(target)}
    order = {"order_type": "limit", "limit_price": float(entry), "stop_loss": float(stop), "take_profit": float(target)}
    other = {"symbol": "9988", "side": "buy", "quantity": 100}
    fake_api.enqueue(
        message([text("Looking at the account."), tool_use("get_portfolio", {}, id="t1")]),
        message(
            [
                tool_use("check_risk", {**trade, **prices}, id="t2"),
                # Blocked by safety: no check_risk approved this one.
                tool_use("execute_trade", {**other, "limit_price": 100, "stop_loss": 95, "take_profit": 120}, id="t3"),
                # Invalid input: a plain string, not an object.
                tool_use("get_quote", "HK.00700", id="t4"),
            ]
        ),
        message([tool_use("execute_trade", {**trade, **order}, id="t5")]),
        message([text("Bought 100 HK.00700 with a stop; done.")]),
    )
    env = {**project_env, **fake_api.env()}
    run = run_agent("--broker", "sim", "--brain", "claude", "--now", IN_SESSION, env=env)
    assert run.returncode == 0, run.output

    # What the Messages API received: the static prefix, and one tool_result per tool_use with is_error.
    requests = fake_api.message_requests
    assert len(requests) == 4
    first = requests[0].body
    assert first["model"] == "claude-sonnet-5-5"
    assert first["tools"][-1]["cache_control"] == {"type": "ephemeral"}
    assert first["system"][0]["cache_control"] == {"type": "ephemeral"}
    assert "Trading cycle" in first["messages"][0]["content"]
    results = {r.tool_use_id: r for r in fake_api.tool_results(2)}
    assert results["t2"].is_error is False and results["t2"].content["approved"] is True
    assert results["t3"].is_error is True and "check_risk_first" in str(results["t3"].content)
    assert results["t4"].is_error is True and "must be a JSON object" in results["t4"].content["error"]
    (placed,) = fake_api.tool_results(3)
    assert placed.is_error is False and placed.content["status"] == "filled", placed.content

    # What the journal holds.
    (cycle,) = journal.cycles_on(date(2026, 11, 20))
    assert (cycle.status, cycle.brain, cycle.model, cycle.iterations) == ("ok", "claude", "claude-sonnet-5-5", 4)
    assert cycle.output_tokens > 0 and cycle.cache_write_tokens > 0 and cycle.cache_read_tokens > 0
    usage = fake_api.total_usage()  # what the server reported, summed over the four calls
    assert (cycle.input_tokens, cycle.output_tokens) == (usage["input_tokens"], usage["output_tokens"])
    assert (cycle.cache_read_tokens, cycle.cache_write_tokens) == (
        usage["cache_read_input_tokens"],
        usage["cache_creation_input_tokens"],
    )
    expected_cost = (
        usage["input_tokens"] * 3.0
        + usage["output_tokens"] * 15.0
        + usage["cache_read_input_tokens"] * 0.30
        + usage["cache_creation_input_tokens"] * 3.75
    ) / 1_000_000
    assert float(cycle.cost_usd) == pytest.approx(expected_cost, rel=1e-9)
    assert "Bought 100 HK.00700" in (cycle.summary or "")
    calls = journal.tool_calls(cycle.id)
    assert [(c.name, c.allowed, c.is_error) for c in calls] == [
        ("get_portfolio", True, False),
        ("check_risk", True, False),
        ("execute_trade", False, True),
        ("get_quote", False, True),
        ("execute_trade", True, False),
    ]
    assert "check_risk_first" in (calls[2].reason or "")
    assert calls[3].input == "HK.00700" and calls[3].reason == "invalid input"
    (order,) = journal.orders_on(date(2026, 11, 20))
    assert (order.symbol, order.side, order.quantity, order.status) == ("HK.00700", "buy", 100, "filled")
    assert order.client_order_id.startswith("CI-20261120-")
    stops = journal.protective_stops()
    assert stops["HK.00700"].stop_loss == stop and stops["HK.00700"].take_profit == target

    # The order really reached the simulated exchange (the state file is the exchange's book).
    broker = SimBroker(sim_at(IN_SESSION, settings_file.parent / "var" / "sim" / "state.json"))
    (at_exchange,) = [o for o in broker.orders() if o.client_order_id == order.client_order_id]
    assert (at_exchange.status, at_exchange.filled_quantity) == ("filled", 100)
    assert [(p.symbol, p.quantity) for p in broker.positions()] == [("HK.00700", 100)]


def test_model_api_failure_marks_the_cycle_error(
    project_env: dict[str, str], journal: Journal, fake_api: FakeMessagesAPI
) -> None:
    fake_api.enqueue_error(400, "invalid_request_error", "model: not a model id")
    env = {**project_env, **fake_api.env()}
    run = run_agent("--broker", "sim", "--brain", "claude", "--now", IN_SESSION, env=env)
    assert run.returncode == 1, run.output
    assert "run_failed" in run.output and "not a model id" in run.output
    (cycle,) = journal.cycles_on(date(2026, 11, 20))
    assert cycle.status == "error" and "ModelAPIError" in (cycle.error or "")


def test_cost_accounting_adds_up_for_known_usage(
    project_env: dict[str, str], journal: Journal, fake_api: FakeMessagesAPI
) -> None:
    usages = [
        {"input_tokens": 1200, "output_tokens": 150, "cache_creation_input_tokens": 3000, "cache_read_input_tokens": 0},
        {"input_tokens": 400, "output_tokens": 90, "cache_creation_input_tokens": 500, "cache_read_input_tokens": 3000},
        {"input_tokens": 300, "output_tokens": 60, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 3500},
    ]
    fake_api.enqueue(
        message([tool_use("get_portfolio", {}, id="u1")], usage=usages[0]),
        message([tool_use("log_decision", {"decision": "hold", "reasoning": "nothing"}, id="u2")], usage=usages[1]),
        message([text("Done.")], usage=usages[2]),
    )
    run = run_agent("--broker", "sim", "--brain", "claude", "--now", IN_SESSION, env={**project_env, **fake_api.env()})
    assert run.returncode == 0, run.output
    (cycle,) = journal.cycles_on(date(2026, 11, 20))
    assert (cycle.input_tokens, cycle.output_tokens, cycle.cache_write_tokens, cycle.cache_read_tokens) == (
        1900,
        300,
        3500,
        6500,
    )
    # claude-sonnet-5-5 at $3 in, $15 out, $0.30 cache read, $3.75 cache write per million tokens:
    expected = (1900 * 3.00 + 300 * 15.00 + 6500 * 0.30 + 3500 * 3.75) / 1_000_000
    assert float(cycle.cost_usd) == pytest.approx(expected, abs=1e-9)  # 0.0277725 USD


def test_the_static_prefix_carries_the_cache_breakpoints() -> None:
    import json

    import tools
    from brain import build_request, system_prompt
    from config.settings import load_settings

    settings = load_settings(env={})
    system = system_prompt(settings)
    messages = [{"role": "user", "content": "context"}]
    body = build_request("claude-sonnet-5-5", 4096, tools.TOOLS, system, messages, caching=True)
    marked_tools = [t["name"] for t in body["tools"] if "cache_control" in t]
    assert marked_tools == ["log_decision"]  # only the last tool: one breakpoint covers them all
    assert body["system"] == [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}]
    assert body["cache_control"] == {"type": "ephemeral"}  # the growing conversation is cached automatically
    assert "cache_control" not in json.dumps(body["messages"])
    # The prefix is static: no clock, no account data; and long enough to be cached (>= 1024 tokens).
    assert "2026" not in system and "HK$1,000,000" not in system
    assert (len(json.dumps(tools.TOOLS)) + len(system)) / 4 > 1024
    off = build_request("claude-sonnet-5-5", 4096, tools.TOOLS, system, messages, caching=False)
    assert "cache_control" not in json.dumps(off)
    assert tools.TOOLS[-1].get("cache_control") is None  # the shared catalogue itself is never mutated


def test_tokens_spent_before_a_failure_still_count(
    project_env: dict[str, str], journal: Journal, fake_api: FakeMessagesAPI
) -> None:
    usage = {"input_tokens": 1000, "output_tokens": 100, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
    fake_api.enqueue(message([tool_use("get_portfolio", {}, id="f1")], usage=usage))
    fake_api.enqueue_error(400, "invalid_request_error", "something went wrong")
    run = run_agent("--broker", "sim", "--brain", "claude", "--now", IN_SESSION, env={**project_env, **fake_api.env()})
    assert run.returncode == 1, run.output
    (cycle,) = journal.cycles_on(date(2026, 11, 20))
    assert cycle.status == "error" and (cycle.input_tokens, cycle.output_tokens, cycle.iterations) == (1000, 100, 1)
    assert float(cycle.cost_usd) == pytest.approx((1000 * 3.0 + 100 * 15.0) / 1_000_000)
