"""Nothing lost or sent twice: crashes and gateway failures around ``place_order``, with real processes,
the real futu-api client and the fake OpenD."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from brokers.sim import SimBroker, SimExchange
from data.database import Journal
from tests.agent_runner import AGENT, IN_SESSION, run_agent
from tests.fakes.opend import TRD_PLACE_ORDER, FakeOpenD

NOW = datetime.fromisoformat(IN_SESSION)
TODAY = date(2026, 11, 20)


@pytest.fixture
def exchange() -> SimExchange:
    return SimExchange(seed=42, clock=lambda: NOW, state_file=None, starting_cash=Decimal(1_000_000))


@pytest.fixture
def opend(exchange: SimExchange) -> Iterator[FakeOpenD]:
    with FakeOpenD(exchange, SimBroker(exchange)) as fake:
        yield fake


@pytest.fixture
def futu_env(project_env: dict[str, str], opend: FakeOpenD, settings_file: Path) -> dict[str, str]:
    data = yaml.safe_load(settings_file.read_text())
    data["broker"]["futu"].update(connect_timeout_s=5, request_timeout_s=3)
    settings_file.write_text(yaml.safe_dump(data))
    return dict(project_env, OPEND_HOST="127.0.0.1", OPEND_PORT=str(opend.port))


def wait_for(predicate, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_sigkill_between_journal_write_and_broker_answer_never_duplicates(
    futu_env: dict[str, str], opend: FakeOpenD, exchange: SimExchange, journal: Journal, settings_file: Path
) -> None:
    data = yaml.safe_load(settings_file.read_text())
    data["broker"]["futu"]["request_timeout_s"] = 120  # the agent is still waiting when it is killed
    settings_file.write_text(yaml.safe_dump(data))
    opend.stall_next(TRD_PLACE_ORDER, None)  # the order reaches the exchange; the answer never comes back
    agent = subprocess.Popen(
        [sys.executable, str(AGENT), "--broker", "futu", "--brain", "rules", "--now", IN_SESSION],
        env=futu_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: opend.count(TRD_PLACE_ORDER) >= 1 or agent.poll() is not None, "the first place_order")
        assert agent.poll() is None, "the agent should still be waiting for the broker's answer"
        (row,) = journal.orders_on(TODAY)
        assert row.status == "pending"  # written before the broker saw it
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait(timeout=30)
    finally:
        if agent.poll() is None:
            agent.kill()
    at_exchange = [o for o in SimBroker(exchange).orders() if o.client_order_id == row.client_order_id]
    assert len(at_exchange) == 1  # it did reach the exchange

    data["broker"]["futu"]["request_timeout_s"] = 3
    settings_file.write_text(yaml.safe_dump(data))
    # The next run (here the guard) reconciles before anything else: the order is found by its remark.
    run = run_agent("--guard", "--broker", "futu", "--now", IN_SESSION, env=futu_env)
    assert run.returncode == 0, run.output
    settled = journal.get_order(row.client_order_id)
    assert settled is not None and settled.status == "filled" and settled.broker_order_id
    assert "order_reconciled" in run.output

    # And a full cycle afterwards does not buy the same thing again.
    run = run_agent("--broker", "futu", "--brain", "rules", "--now", IN_SESSION, env=futu_env)
    assert run.returncode == 0, run.output
    symbols = [o.symbol for o in journal.orders_on(TODAY) if o.side == "buy"]
    assert symbols.count(row.symbol) == 1
    assert len([o for o in SimBroker(exchange).orders() if o.symbol == row.symbol and o.side == "buy"]) == 1


def test_place_order_timeout_with_the_order_at_the_broker_is_found_not_resent(
    futu_env: dict[str, str], opend: FakeOpenD, exchange: SimExchange, journal: Journal
) -> None:
    opend.stall_next(TRD_PLACE_ORDER, 30)  # answered far too late: the client times out
    run = run_agent("--broker", "futu", "--brain", "rules", "--now", IN_SESSION, env=futu_env)
    assert run.returncode == 0, run.output
    orders = journal.orders_on(TODAY)
    assert orders
    first = orders[0]
    assert first.status == "filled", first
    at_exchange = [o for o in SimBroker(exchange).orders() if o.client_order_id == first.client_order_id]
    assert len(at_exchange) == 1
    assert opend.count(TRD_PLACE_ORDER) == len(orders)  # nothing was sent twice


def test_unknown_order_blocks_entries_until_resolved(
    futu_env: dict[str, str], opend: FakeOpenD, journal: Journal
) -> None:
    """A pending order the broker has never heard of is ambiguous: no new entries, an alert."""
    from brokers.base import OrderStatus, Side
    from data.database import OrderIntent

    journal.insert_order(
        OrderIntent(client_order_id="CI-lost-1", cycle_id=None, symbol="HK.00700", side=Side.BUY, quantity=100,
                    limit_price=Decimal("600"), status=OrderStatus.PENDING, trading_date=TODAY)
    )  # fmt: skip
    run = run_agent("--broker", "futu", "--brain", "rules", "--now", IN_SESSION, env=futu_env)
    assert run.returncode == 0, run.output
    assert opend.count(TRD_PLACE_ORDER) == 0
    (cycle,) = journal.cycles_on(TODAY)
    calls = journal.tool_calls(cycle.id)
    checks = [c for c in calls if c.name == "check_risk"]
    assert checks and all(not c.allowed and "unknown fate" in (c.reason or "") for c in checks)
    assert all(not c.allowed for c in calls if c.name == "execute_trade")
    assert "order_unknown" in [a.event for a in journal.alerts_since(datetime(2026, 11, 1).astimezone())]


def test_gateway_drops_the_connection_mid_cycle(
    futu_env: dict[str, str], opend: FakeOpenD, exchange: SimExchange, journal: Journal
) -> None:
    from tests.fakes.opend import QOT_REQUEST_HISTORY_KL

    opend.drop_next(QOT_REQUEST_HISTORY_KL, perform=False)  # the first K-line request loses the connection
    run = run_agent("--broker", "futu", "--brain", "rules", "--now", IN_SESSION, env=futu_env)
    assert run.returncode == 0, run.output
    (cycle,) = journal.cycles_on(TODAY)
    assert cycle.status == "ok"
    assert "futu_reconnecting" in run.output
    # The cycle went on after the reconnect and ordered; whatever it ordered is at the exchange exactly once.
    rows = journal.orders_on(TODAY)
    assert rows, "the cycle should still have placed its orders after reconnecting"
    for row in rows:
        assert len([o for o in SimBroker(exchange).orders() if o.client_order_id == row.client_order_id]) == 1
    assert opend.count(TRD_PLACE_ORDER) == len(rows)


def test_an_order_the_broker_never_saw_is_settled_the_next_day(
    futu_env: dict[str, str], opend: FakeOpenD, journal: Journal
) -> None:
    """Yesterday's pending order that the broker's whole history does not know never reached it: cancelled."""
    from brokers.base import OrderStatus, Side
    from data.database import OrderIntent

    yesterday = date(2026, 11, 19)
    journal.insert_order(
        OrderIntent(client_order_id="CI-lost-yesterday", cycle_id=None, symbol="HK.00700", side=Side.BUY,
                    quantity=100, limit_price=Decimal("600"), status=OrderStatus.PENDING, trading_date=yesterday)
    )  # fmt: skip
    run = run_agent("--broker", "futu", "--brain", "rules", "--now", IN_SESSION, env=futu_env)
    assert run.returncode == 0, run.output
    settled = journal.get_order("CI-lost-yesterday")
    assert (
        settled is not None and settled.status == "cancelled" and "never reached the broker" in (settled.reason or "")
    )
    assert opend.count(TRD_PLACE_ORDER) >= 1  # entries were not blocked by it
