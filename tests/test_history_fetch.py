"""``scripts/history.py fetch`` through the real futu-api against the fake OpenD: paging, the end-label
conversion, the quota stop, and resuming an interrupted fetch."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
import yaml

from brokers.sim import SimExchange
from config.settings import PROJECT_ROOT
from data.database import Journal
from replay.clock import HKT
from tests.fakes.opend import QOT_REQUEST_HISTORY_KL, QOT_REQUEST_HISTORY_KL_QUOTA, FakeOpenD

HISTORY = PROJECT_ROOT / "scripts" / "history.py"
NOW = datetime(2026, 9, 11, 17, 0, tzinfo=HKT)  # after Friday's close


@pytest.fixture
def opend() -> Iterator[FakeOpenD]:
    exchange = SimExchange(seed=42, clock=lambda: NOW, state_file=None, starting_cash=Decimal(1_000_000))
    with FakeOpenD(exchange, clock=lambda: NOW) as fake:
        yield fake
    assert fake.errors == []


@pytest.fixture
def env(project_env: dict[str, str], opend: FakeOpenD, settings_file: Path, journal: Journal) -> dict[str, str]:
    data = yaml.safe_load(settings_file.read_text())
    data["broker"]["futu"]["connect_timeout_s"] = 5
    settings_file.write_text(yaml.safe_dump(data))
    return dict(project_env, OPEND_HOST="127.0.0.1", OPEND_PORT=str(opend.port))


def fetch(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HISTORY), "fetch", *args], env=env, cwd=PROJECT_ROOT, capture_output=True, text=True,
        timeout=240,
    )  # fmt: skip


def codes(opend: FakeOpenD) -> list[str]:
    return [c2s["security"]["code"] for c2s in opend.requests_for(QOT_REQUEST_HISTORY_KL)]


def test_fetch_pages_through_a_range_and_stores_bar_starts(
    env: dict[str, str], opend: FakeOpenD, database_url: str
) -> None:
    done = fetch(env, "--symbols", "700", "--from", "2026-09-07", "--to", "2026-09-10", "--timeframe", "1m")
    assert done.returncode == 0, done.stderr
    assert "history quota: 0 used, 100 left; this fetch needs 1 new stock(s)" in done.stdout
    assert "HK.00700 1m 2026-09-07..2026-09-10: 1320 bars in 2 page(s)" in done.stdout
    requests = opend.requests_for(QOT_REQUEST_HISTORY_KL)
    assert len(requests) == 2 and "nextReqKey" not in requests[0] and "nextReqKey" in requests[1]
    assert opend.count(QOT_REQUEST_HISTORY_KL_QUOTA) == 1
    with psycopg.connect(database_url) as conn:
        first, last, n = conn.execute(
            "SELECT min(bar_start), max(bar_start), count(*) FROM market_bars WHERE symbol = 'HK.00700'"
        ).fetchone()
        # Futu labels the 09:30-09:31 bar 09:31 and the last one 16:00: stored by their starts.
        assert (first, last, n) == (
            datetime(2026, 9, 7, 9, 30, tzinfo=HKT),
            datetime(2026, 9, 10, 15, 59, tzinfo=HKT),
            1320,
        )
        assert conn.execute("SELECT name, lot_size FROM instruments").fetchall() == [("Tencent Holdings", 100)]
    again = fetch(env, "--symbols", "700", "--from", "2026-09-07", "--to", "2026-09-10", "--timeframe", "1m")
    assert again.returncode == 0 and "nothing to fetch" in again.stdout and len(codes(opend)) == 2


def test_fetch_stops_before_the_quota_runs_out(env: dict[str, str], opend: FakeOpenD) -> None:
    opend.history_quota = 2
    done = fetch(env, "--symbols", "700,5,939", "--from", "2026-09-09", "--to", "2026-09-10", "--timeframe", "1d")
    assert done.returncode == 4, done.stdout + done.stderr
    assert "needs 3 new stock(s)" in done.stdout and "1 will NOT be fetched" in done.stdout
    assert "NOT fetched (history quota): HK.00939" in done.stderr
    assert sorted(set(codes(opend))) == ["00005", "00700"]  # 939 was never asked for
    # A stock already counted in the 30-day window is free: more days of 700 fit though the quota is used up.
    more = fetch(env, "--symbols", "700", "--from", "2026-09-07", "--to", "2026-09-10", "--timeframe", "1d")
    assert more.returncode == 0 and "0 left; this fetch needs 0 new stock(s) (1 already counted" in more.stdout


def test_an_interrupted_fetch_resumes_where_it_stopped(
    env: dict[str, str], opend: FakeOpenD, database_url: str
) -> None:
    opend.refuse_history_for = {"HK.00939"}
    args = ("--symbols", "700,939,5", "--from", "2026-09-09", "--to", "2026-09-10", "--timeframe", "1m,1d")
    broken = fetch(env, *args)
    assert broken.returncode == 3 and "run the same command again to resume" in broken.stderr
    assert "HK.00700 1d" in broken.stdout and "HK.00005" not in broken.stdout
    opend.refuse_history_for = set()
    opend.clear_requests()
    resumed = fetch(env, *args)
    assert resumed.returncode == 0, resumed.stderr
    assert "already fetched (skipped): HK.00700 1m, HK.00700 1d" in resumed.stdout
    assert "00700" not in codes(opend) and sorted(set(codes(opend))) == ["00005", "00939"]
    with psycopg.connect(database_url) as conn:
        counts = dict(conn.execute("SELECT symbol, count(*) FROM market_bars WHERE timeframe = '1m' GROUP BY symbol"))
    assert counts == {"HK.00700": 660, "HK.00939": 660, "HK.00005": 660}
