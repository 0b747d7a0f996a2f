"""The daily-loss path end to end: a morning loss past the limit makes the next cycle close everything by
code, block entries, alert, and exit 4 — without asking the model anything."""

from __future__ import annotations

from datetime import date, datetime
from pathlib import Path

from brokers.sim import SimBroker
from data.database import Journal
from tests.agent_runner import IN_SESSION, run_agent, sim_at
from tests.fakes.messages_api import FakeMessagesAPI, message, text, tool_use

LATER = "2026-11-20T10:45:00+08:00"


def buy_in_morning(fake_api: FakeMessagesAPI, env: dict[str, str], state_file: Path, quantity: int) -> None:
    q = sim_at(IN_SESSION, state_file).quote("HK.00700")
    px = float(q.ask_price or q.last_price)
    trade = {"symbol": "700", "side": "buy", "quantity": quantity}
    prices = {"stop_loss": round(px * 0.95, 1), "take_profit": round(px * 1.15, 1)}
    fake_api.enqueue(
        message([tool_use("check_risk", {**trade, "entry_price": px, **prices}, id="m1")]),
        message([tool_use("execute_trade", {**trade, "limit_price": px, **prices}, id="m2")]),
        message([text("Bought.")]),
    )
    run = run_agent("--broker", "sim", "--brain", "claude", "--now", IN_SESSION, env=env)
    assert run.returncode == 0, run.output


def test_loss_past_the_limit_closes_everything_by_code_and_exits_4(
    project_env: dict[str, str], journal: Journal, fake_api: FakeMessagesAPI, tmp_path: Path
) -> None:
    env = {**project_env, **fake_api.env()}
    state_file = tmp_path / "var" / "sim" / "state.json"
    buy_in_morning(fake_api, env, state_file, quantity=300)  # ~HK$195k of 0700: under the 20 % cap
    assert SimBroker(sim_at(IN_SESSION, state_file)).positions()[0].quantity == 300
    requests_before = len(fake_api.message_requests)

    # The stock falls 15 %: about -2.9 % of equity, past the 2 % limit.
    sim_at(IN_SESSION, state_file).apply_shock("HK.00700", -0.15)
    run = run_agent("--broker", "sim", "--brain", "claude", "--now", LATER, env=env)
    assert run.returncode == 4, run.output
    assert "daily_loss_halt" in run.output

    assert len(fake_api.message_requests) == requests_before  # no model call at all
    broker = SimBroker(sim_at(LATER, state_file))
    assert broker.positions() == []  # closed by code
    cycles = journal.cycles_on(date(2026, 11, 20))
    assert [c.status for c in cycles] == ["ok", "halted"]
    assert "daily loss" in (cycles[1].summary or "")
    orders = journal.orders_on(date(2026, 11, 20))
    assert [(o.side, o.quantity, o.status) for o in orders] == [("buy", 300, "filled"), ("sell", 300, "filled")]
    alerts = journal.alerts_since(datetime(2026, 11, 1).astimezone())
    assert "daily_loss_limit" in [a.event for a in alerts]

    # The next cycle the same day is still halted, closes nothing more and alerts no more.
    run = run_agent("--broker", "sim", "--brain", "claude", "--now", "2026-11-20T11:15:00+08:00", env=env)
    assert run.returncode == 4, run.output
    assert len(journal.orders_on(date(2026, 11, 20))) == 2
    assert [a.event for a in journal.alerts_since(datetime(2026, 11, 1).astimezone())].count("daily_loss_limit") == 1
    assert len(fake_api.message_requests) == requests_before


def test_loss_past_the_warning_halves_the_cap_and_alerts_once(
    project_env: dict[str, str], journal: Journal, fake_api: FakeMessagesAPI, tmp_path: Path
) -> None:
    env = {**project_env, **fake_api.env()}
    state_file = tmp_path / "var" / "sim" / "state.json"
    buy_in_morning(fake_api, env, state_file, quantity=300)
    sim_at(IN_SESSION, state_file).apply_shock("HK.00700", -0.09)  # about -1.7 %: warning, not halt
    fake_api.enqueue(message([text("Careful today.")]))
    run = run_agent("--broker", "sim", "--brain", "claude", "--now", LATER, env=env)
    assert run.returncode == 0, run.output
    context = fake_api.message_requests[-1].body["messages"][0]["content"]
    assert "Risk mode: warning (position cap halved)" in context
    events = [a.event for a in journal.alerts_since(datetime(2026, 11, 1).astimezone())]
    assert events.count("daily_loss_warning") == 1

    # A later cycle the same day is still in warning mode, and does not alert again.
    fake_api.enqueue(message([text("Still careful.")]))
    run = run_agent("--broker", "sim", "--brain", "claude", "--now", "2026-11-20T11:15:00+08:00", env=env)
    assert run.returncode == 0, run.output
    context = fake_api.message_requests[-1].body["messages"][0]["content"]
    assert "Risk mode: warning (position cap halved)" in context
    events = [a.event for a in journal.alerts_since(datetime(2026, 11, 1).astimezone())]
    assert events.count("daily_loss_warning") == 1


def test_kill_switch_file_halts_without_a_model_call(
    project_env: dict[str, str], journal: Journal, fake_api: FakeMessagesAPI, tmp_path: Path
) -> None:
    (tmp_path / "HALT").write_text("owner on holiday\n")
    env = {**project_env, **fake_api.env()}
    run = run_agent("--broker", "sim", "--brain", "claude", "--now", IN_SESSION, env=env)
    assert run.returncode == 4, run.output
    assert "kill switch file" in run.output
    assert fake_api.message_requests == []
    (cycle,) = journal.cycles_on(date(2026, 11, 20))
    assert cycle.status == "halted"


def test_kill_switch_journal_flag_halts_too(
    project_env: dict[str, str], journal: Journal, fake_api: FakeMessagesAPI
) -> None:
    journal.set_flag("halt", "stopped by the owner", "owner")
    env = {**project_env, **fake_api.env()}
    run = run_agent("--broker", "sim", "--brain", "claude", "--now", IN_SESSION, env=env)
    assert run.returncode == 4, run.output
    assert fake_api.message_requests == []
