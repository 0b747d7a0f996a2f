"""``scripts/test_connection.py`` against the fake OpenD (and against nothing at all)."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import pytest

from brokers.sim import SimBroker, SimExchange
from config.settings import PROJECT_ROOT
from tests.agent_runner import IN_SESSION
from tests.fakes.opend import FakeOpenD

SCRIPT = PROJECT_ROOT / "scripts" / "test_connection.py"


@pytest.fixture
def opend() -> Iterator[FakeOpenD]:
    now = datetime.fromisoformat(IN_SESSION)
    exchange = SimExchange(seed=42, clock=lambda: now, state_file=None, starting_cash=Decimal(1_000_000))
    with FakeOpenD(exchange, SimBroker(exchange)) as fake:
        yield fake


def run_script(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_every_check_passes_against_a_working_gateway(
    project_env: dict[str, str], opend: FakeOpenD, settings_file: Path
) -> None:
    env = dict(project_env, OPEND_HOST="127.0.0.1", OPEND_PORT=str(opend.port))
    done = run_script(env)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith(("OK", "FAIL"))]
    assert [line.split()[1] for line in lines] == ["connect", "gateway", "accounts", "funds", "positions", "quote"]
    assert all(line.startswith("OK") for line in lines)
    assert "paper" in done.stdout and "HK.00700" in done.stdout and "lot 100" in done.stdout


def test_a_dead_gateway_fails_with_the_reason(project_env: dict[str, str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = run_script(dict(project_env, OPEND_HOST="127.0.0.1", OPEND_PORT=str(port)), "--quick")
    assert done.returncode == 1
    assert "FAIL  connect" in done.stdout and "not reachable" in done.stdout


def test_every_check_passes_against_the_fake_ib_gateway(project_env: dict[str, str]) -> None:
    from brokers.sim import AccountKind
    from tests.fakes.ibgateway import FakeIBGateway

    now = datetime.fromisoformat(IN_SESSION)
    exchange = SimExchange(seed=42, clock=lambda: now, state_file=None, starting_cash=Decimal(1_000_000))
    with FakeIBGateway(exchange, SimBroker(exchange, account_kind=AccountKind.REAL), delayed=True) as fake:
        done = run_script(dict(project_env, IB_HOST="127.0.0.1", IB_PORT=str(fake.port)), "--broker", "ibkr")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith(("OK", "FAIL"))]
    assert [line.split()[1] for line in lines] == ["connect", "gateway", "accounts", "funds", "positions", "quote"]
    assert "DU1234567 paper" in done.stdout and "lot 100" in done.stdout and "DELAYED" in done.stdout
    (start_api,) = [f for f in fake.requests if f[0] == "71"]
    assert start_api[2] == "18"  # the agent's client id (17) + 1: it can run while a cycle is connected


def test_a_dead_ib_gateway_fails_with_what_to_do(project_env: dict[str, str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = run_script(dict(project_env, IB_HOST="127.0.0.1", IB_PORT=str(port)), "--broker", "ibkr", "--quick")
    assert done.returncode == 1
    assert "FAIL  connect" in done.stdout and "docker-compose.ibgateway.yml" in done.stdout
