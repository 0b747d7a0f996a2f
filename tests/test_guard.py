"""The guard pass (``agent.py --guard``): no model; stops, take-profits, time stops, adoption — as cron runs it.

Positions are opened directly at the simulated exchange (the outside world), with the stop the agent would
have journalled, then the guard runs as a real process at a later time.
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from pathlib import Path

from brokers import hkex
from brokers.base import OrderRequest, OrderType, Side
from brokers.sim import SimBroker
from data.database import Journal
from tests.agent_runner import run_agent, sim_at

DAY = "2026-11-20"
DATE = date.fromisoformat(DAY)


def at(hhmm: str) -> str:
    return f"{DAY}T{hhmm}:00+08:00"


def broker_at(state_file: Path, when: str) -> SimBroker:
    return SimBroker(sim_at(when, state_file))


def buy(state_file: Path, when: str, symbol: str, quantity: int) -> Decimal:
    broker = broker_at(state_file, when)
    order = broker.place_order(
        OrderRequest(client_order_id=f"setup-{symbol}", symbol=symbol, side=Side.BUY, quantity=quantity,
                     order_type=OrderType.MARKET)
    )  # fmt: skip
    assert order.status == "filled"
    return order.avg_fill_price


def guard(env: dict[str, str], when: str):
    run = run_agent("--guard", "--broker", "sim", "--now", when, env=env)
    assert run.returncode == 0, run.output
    return run


def last_guard_cycle(journal: Journal):
    cycles = [c for c in journal.cycles_on(date.fromisoformat(DAY)) if c.mode == "guard"]
    assert cycles
    return cycles[-1]


def test_a_price_through_the_stop_closes_the_position(
    project_env: dict[str, str], journal: Journal, tmp_path: Path
) -> None:
    state = tmp_path / "var" / "sim" / "state.json"
    fill = buy(state, at("10:15"), "HK.00700", 200)
    journal.upsert_protective_stop("HK.00700", quantity=200, entry_price=fill, stop_loss=fill * Decimal("0.97"),
                                   take_profit=fill * Decimal("1.10"))  # fmt: skip
    guard(project_env, at("10:20"))  # nothing happens while the price is above the stop
    assert broker_at(state, at("10:20")).positions()[0].quantity == 200
    assert "no action" in (last_guard_cycle(journal).summary or "")

    broker_at(state, at("10:20")).exchange.apply_shock("HK.00700", -0.06)
    run = guard(project_env, at("10:25"))
    assert broker_at(state, at("10:25")).positions() == []
    cycle = last_guard_cycle(journal)
    assert cycle.status == "ok" and "stop loss" in (cycle.summary or ""), cycle.summary
    (sell,) = [o for o in journal.orders_on(date.fromisoformat(DAY)) if o.side == "sell"]
    assert (sell.quantity, sell.status, sell.order_type) == (200, "filled", "market")
    assert "HK.00700" not in journal.protective_stops()
    assert "guard_action" in [a.event for a in journal.alerts_since(datetime(2026, 11, 1).astimezone())]
    assert "guard_finished" in run.output


def test_take_profit_reached_closes_the_position(project_env: dict[str, str], journal: Journal, tmp_path: Path) -> None:
    state = tmp_path / "var" / "sim" / "state.json"
    fill = buy(state, at("10:15"), "HK.00005", 400)
    journal.upsert_protective_stop("HK.00005", quantity=400, entry_price=fill, stop_loss=fill * Decimal("0.95"),
                                   take_profit=fill * Decimal("1.04"))  # fmt: skip
    broker_at(state, at("10:15")).exchange.apply_shock("HK.00005", 0.08)
    guard(project_env, at("10:30"))
    assert broker_at(state, at("10:30")).positions() == []
    assert "take profit" in (last_guard_cycle(journal).summary or "")


def test_a_flat_position_is_closed_before_lunch(project_env: dict[str, str], journal: Journal, tmp_path: Path) -> None:
    state = tmp_path / "var" / "sim" / "state.json"
    fill = buy(state, at("11:55"), "HK.00941", 500)
    last = broker_at(state, at("11:57")).exchange.quote("HK.00941").last_price
    assert abs(last - fill) / fill < Decimal("0.003"), "precondition: the position is flat"
    journal.upsert_protective_stop("HK.00941", quantity=500, entry_price=fill, stop_loss=fill * Decimal("0.95"),
                                   take_profit=fill * Decimal("1.10"))  # fmt: skip
    guard(project_env, at("11:50"))  # before the time stop's window: untouched
    assert broker_at(state, at("11:57")).positions()
    guard(project_env, at("11:57"))
    assert broker_at(state, at("11:57")).positions() == []
    assert "time stop" in (last_guard_cycle(journal).summary or "")


def test_everything_is_flat_after_the_pre_close_flatten(
    project_env: dict[str, str], journal: Journal, tmp_path: Path
) -> None:
    state = tmp_path / "var" / "sim" / "state.json"
    for symbol, qty in (("HK.00700", 100), ("HK.00005", 400), ("HK.01299", 200)):
        fill = buy(state, at("14:00"), symbol, qty)
        journal.upsert_protective_stop(symbol, quantity=qty, entry_price=fill, stop_loss=fill * Decimal("0.9"),
                                       take_profit=fill * Decimal("1.2"))  # fmt: skip
    guard(project_env, at("15:30"))
    assert len(broker_at(state, at("15:30")).positions()) == 3
    guard(project_env, at("15:52"))
    assert broker_at(state, at("15:52")).positions() == []
    assert (last_guard_cycle(journal).summary or "").count("flatten before the close") == 3
    assert journal.protective_stops() == {}


def test_a_position_the_journal_does_not_know_is_adopted_with_a_default_stop(
    project_env: dict[str, str], journal: Journal, tmp_path: Path
) -> None:
    state = tmp_path / "var" / "sim" / "state.json"
    fill = buy(state, at("10:15"), "HK.01299", 200)  # e.g. bought by hand in the app
    guard(project_env, at("10:20"))
    stop = journal.protective_stops()["HK.01299"]
    # 5 % under cost, rounded up onto the tick grid (a REAL account's broker stop would be refused off it).
    assert stop.source == "adopted" and stop.stop_loss == hkex.round_to_tick(fill * Decimal("0.95"), Side.SELL, DATE)
    assert hkex.is_on_tick(stop.stop_loss, DATE) and stop.stop_loss >= fill * Decimal("0.95")
    assert "reconciliation_mismatch" in [a.event for a in journal.alerts_since(datetime(2026, 11, 1).astimezone())]
    assert broker_at(state, at("10:20")).positions()  # adopted, not sold


def test_guard_outside_trading_hours_does_nothing(project_env: dict[str, str], journal: Journal) -> None:
    run = guard(project_env, at("12:30"))
    assert "nothing to enforce" in run.output
    assert last_guard_cycle(journal).status == "ok"


def test_a_dry_run_never_writes_stops_for_the_real_account(
    project_env: dict[str, str], journal: Journal, tmp_path: Path
) -> None:
    state = tmp_path / "var" / "sim" / "state.json"
    buy(state, at("10:00"), "HK.01299", 200)  # a position the journal does not know
    run = run_agent("--dry-run", "--broker", "sim", "--brain", "rules", "--now", at("10:15"), env=project_env)
    assert run.returncode == 0, run.output
    assert "positions_without_stop" in run.output
    assert journal.protective_stops() == {}  # neither adopted nor the dry-run entries' stops
    assert all(o.status == "dry_run" for o in journal.orders_on(date.fromisoformat(DAY)))


def test_the_kill_switch_leaves_the_guard_enforcing_exits(
    project_env: dict[str, str], journal: Journal, tmp_path: Path
) -> None:
    """HALT blocks entries; a position whose stop is hit is still closed by the guard (README, docs/safety.md)."""
    state = tmp_path / "var" / "sim" / "state.json"
    fill = buy(state, at("10:15"), "HK.00700", 200)
    journal.upsert_protective_stop("HK.00700", quantity=200, entry_price=fill, stop_loss=fill * Decimal("0.97"),
                                   take_profit=fill * Decimal("1.10"))  # fmt: skip
    (tmp_path / "HALT").write_text("owner on holiday\n")
    journal.set_flag("halt", "stopped by the owner", "owner")
    broker_at(state, at("10:20")).exchange.apply_shock("HK.00700", -0.06)

    guard(project_env, at("10:25"))  # exit 0: the guard is not halted by the kill switch
    assert broker_at(state, at("10:25")).positions() == []
    cycle = last_guard_cycle(journal)
    assert cycle.status == "ok" and "stop loss" in (cycle.summary or ""), cycle.summary
    (sell,) = [o for o in journal.orders_on(date.fromisoformat(DAY)) if o.side == "sell"]
    assert (sell.quantity, sell.status) == (200, "filled")

    # The kill switch was in force all along: a trading cycle at the same moment is halted.
    run = run_agent("--broker", "sim", "--brain", "rules", "--now", at("10:25"), env=project_env)
    assert run.returncode == 4 and "kill switch file" in run.output, run.output
