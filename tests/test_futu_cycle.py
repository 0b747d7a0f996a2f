"""A whole cycle through the real futu-api client: ``agent.py --broker futu`` against the fake OpenD."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from brokers.sim import SimBroker, SimExchange
from data.database import Journal
from tests.agent_runner import IN_SESSION, run_agent
from tests.fakes.opend import (
    QOT_GET_PLATE_SECURITY,
    QOT_GET_SECURITY_SNAPSHOT,
    QOT_REQUEST_HISTORY_KL,
    TRD_PLACE_ORDER,
    FakeOpenD,
)

NOW = datetime.fromisoformat(IN_SESSION)
DAILY = 2  # Qot_Common.KLType_Day


@pytest.fixture
def opend() -> Iterator[FakeOpenD]:
    exchange = SimExchange(seed=42, clock=lambda: NOW, state_file=None, starting_cash=Decimal(1_000_000))
    with FakeOpenD(exchange, SimBroker(exchange)) as fake:
        yield fake


@pytest.fixture
def futu_env(project_env: dict[str, str], opend: FakeOpenD, settings_file: Path) -> dict[str, str]:
    data = yaml.safe_load(settings_file.read_text())
    data["broker"]["futu"]["connect_timeout_s"] = 5
    settings_file.write_text(yaml.safe_dump(data))
    return dict(project_env, OPEND_HOST="127.0.0.1", OPEND_PORT=str(opend.port))


def test_rules_cycle_through_opend_places_a_simulate_order_with_our_remark(
    futu_env: dict[str, str], opend: FakeOpenD, journal: Journal
) -> None:
    run = run_agent("--broker", "futu", "--brain", "rules", "--now", IN_SESSION, env=futu_env)
    assert run.returncode == 0, run.output
    (cycle,) = journal.cycles_on(date(2026, 11, 20))
    assert (cycle.status, cycle.broker) == ("ok", "futu")
    journalled = journal.orders_on(date(2026, 11, 20))
    assert journalled, "the rules should fire at 10:15 on this seed"
    placed = opend.requests_for(TRD_PLACE_ORDER)
    assert len(placed) == len(journalled)
    for request, row in zip(placed, journalled, strict=True):
        c2s = request.get("c2s", request)
        assert c2s["header"]["trdEnv"] in (0, "0")  # TrdEnv.SIMULATE on the wire
        assert c2s["remark"] == row.client_order_id
        assert row.status in ("filled", "submitted") and row.broker_order_id
    # The scan reads all constituents in one snapshot request, never one per stock.
    sizes = [len(r.get("securityList", [])) for r in opend.requests_for(QOT_GET_SECURITY_SNAPSHOT)]
    assert max(sizes) >= 25, sizes
    first_daily = [r for r in opend.requests_for(QOT_REQUEST_HISTORY_KL) if r.get("klType") == DAILY]
    assert first_daily, opend.requests_for(QOT_REQUEST_HISTORY_KL)[:2]
    # Daily K-lines went into the PostgreSQL cache: the next cycle asks the gateway for none of them again.
    before = opend.count(QOT_REQUEST_HISTORY_KL)
    plates_first = opend.count(QOT_GET_PLATE_SECURITY)
    assert plates_first >= 1
    run = run_agent("--broker", "futu", "--brain", "rules", "--dry-run", "--now", IN_SESSION, env=futu_env)
    assert run.returncode == 0, run.output
    later = opend.requests_for(QOT_REQUEST_HISTORY_KL)[before:]
    assert [r for r in later if r.get("klType") == DAILY] == [], later
    # Index constituents are read once a day too.
    assert opend.count(QOT_GET_PLATE_SECURITY) == plates_first


def test_opend_down_exits_3_quickly_with_what_to_do(project_env: dict[str, str], settings_file: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(project_env, OPEND_HOST="127.0.0.1", OPEND_PORT=str(port))
    run = run_agent("--broker", "futu", "--brain", "rules", "--now", IN_SESSION, env=env)
    assert run.returncode == 3, run.output
    assert "docker compose -f docker-compose.opend.yml up -d" in run.output
