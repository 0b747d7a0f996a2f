"""The journalled cycle summary states the facts from code before the model's words, which are marked as its own.

Real ``agent.py`` processes with the Claude brain against the local Messages API server, the sim exchange and a
real journal.
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from pathlib import Path

from data.database import Journal
from tests.agent_runner import IN_SESSION, run_agent, sim_at
from tests.fakes.messages_api import FakeMessagesAPI, message, text, tool_use

NOTE = "Model's note (its own words, not checked): "


def plain(value: Decimal) -> str:
    """A price as the summary writes it: no exponent, no trailing zeros."""
    return format(value.normalize(), "f")


def facts_and_note(summary: str | None) -> tuple[str, str]:
    assert summary is not None and NOTE in summary, summary
    facts, note = summary.split(NOTE, 1)
    return facts, note


def test_a_refused_trade_is_summarised_as_no_order_whatever_the_model_claims(
    project_env: dict[str, str], journal: Journal, fake_api: FakeMessagesAPI
) -> None:
    claim = "Opened one new position in 700: bought 100 shares, protective stop at 470.4."
    fake_api.enqueue(
        # No check_risk first: the gate refuses the trade.
        message(
            [
                tool_use(
                    "execute_trade",
                    {
                        "symbol": "700",
                        "side": "buy",
                        "quantity": 100,
                        "limit_price": 480,
                        "stop_loss": 470.4,
                        "take_profit": 520,
                    },
                    id="t1",
                )
            ]
        ),
        message([text(claim)]),
    )
    run = run_agent("--broker", "sim", "--brain", "claude", "--now", IN_SESSION, env={**project_env, **fake_api.env()})
    assert run.returncode == 0, run.output
    (refused,) = fake_api.tool_results(1)
    assert refused.is_error

    (cycle,) = journal.cycles_on(date(2026, 11, 20))
    facts, note = facts_and_note(cycle.summary)
    assert facts.startswith("No order was placed. "), facts
    assert "Refused: 1: execute_trade BUY 100 700 refused: check_risk_first" in facts
    assert facts.endswith("Positions after the cycle: none. "), facts
    assert "470.4" not in facts and "position in 700" not in facts  # the claim is only in the model's part
    assert note == claim
    assert journal.orders_on(date(2026, 11, 20)) == []
    assert "No order was placed." in run.output  # the same summary is printed at the end of the run


def test_a_filled_trade_is_summarised_with_its_fill_and_the_stop_it_lives_under(
    project_env: dict[str, str], journal: Journal, fake_api: FakeMessagesAPI, settings_file: Path
) -> None:
    q = sim_at(IN_SESSION).quote("HK.00700")
    entry = q.ask_price or q.last_price
    stop = (entry * Decimal("0.97")).quantize(Decimal("0.1"))
    target = (entry * Decimal("1.08")).quantize(Decimal("0.1"))
    trade = {"symbol": "700", "side": "buy", "quantity": 100, "stop_loss": float(stop), "take_profit": float(target)}
    fake_api.enqueue(
        message([tool_use("check_risk", {**trade, "entry_price": float(entry)}, id="t1")]),
        message([tool_use("execute_trade", {**trade, "limit_price": float(entry)}, id="t2")]),
        message([text("Nothing bought today.")]),  # wrong, and kept only as the model's words
    )
    run = run_agent("--broker", "sim", "--brain", "claude", "--now", IN_SESSION, env={**project_env, **fake_api.env()})
    assert run.returncode == 0, run.output

    (cycle,) = journal.cycles_on(date(2026, 11, 20))
    facts, note = facts_and_note(cycle.summary)
    (order,) = journal.orders_on(date(2026, 11, 20))
    assert order.status == "filled" and order.avg_fill_price is not None
    assert facts.startswith(
        f"Orders placed: 1, filled: 1 (HK.00700): BUY 100 HK.00700 @ {plain(entry)}: "
        f"filled 100 @ {plain(order.avg_fill_price)}."
    ), facts
    assert "Refused: none." in facts
    position = journal.protective_stops()["HK.00700"]
    assert "Positions after the cycle: 1: HK.00700 100 @ " in facts
    assert f"(stop {plain(position.stop_loss)}, take-profit {plain(target)})" in facts
    assert note == "Nothing bought today."
