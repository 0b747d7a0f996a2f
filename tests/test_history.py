"""Market history: CSV import (good file, each refusal, idempotent re-import), ``list``, and a recorded replay."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import date, datetime
from pathlib import Path

import psycopg
import pytest
import yaml
from psycopg import sql

from config.settings import PROJECT_ROOT
from data.database import Journal
from data.history import HistoryImportError, store_file
from replay.feed import HKT, SyntheticStore, sessions_before
from tests.agent_runner import run_agent

HISTORY = PROJECT_ROOT / "scripts" / "history.py"
HEADER = "symbol,time,open,high,low,close,volume,lot_size,name"
GOOD = [
    "700,2026-09-08 09:30,600.5,601,600,600.5,12000,100,Tencent",
    "0700.HK,2026-09-08 09:31:00,600.5,602,600.5,601.5,9000,,",
    "HK.00700,2026-09-08T01:32:00+00:00,601.5,601.5,600,600,8000,,",  # 09:32 HKT, written in UTC
]


def write(tmp_path: Path, rows: list[str], header: str = HEADER, name: str | None = None) -> Path:
    path = tmp_path / (name or f"bars-{uuid.uuid4().hex[:6]}.csv")
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def conn(journal: Journal, database_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url, autocommit=True) as connection:
        yield connection


def count(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT count(*) FROM market_bars").fetchone()[0]


def history(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HISTORY), *args], env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=240
    )


def test_import_stores_a_good_file_once_and_list_shows_its_coverage(
    project_env: dict[str, str], journal: Journal, database_url: str, tmp_path: Path
) -> None:
    path = write(tmp_path, GOOD)
    first = history("import", str(path), env=project_env)
    assert first.returncode == 0, first.stderr
    assert "3 rows, 3 new, 0 already stored (HK.00700)" in first.stdout
    again = history("import", str(path), env=project_env)
    assert again.returncode == 0 and "3 rows, 0 new, 3 already stored" in again.stdout  # idempotent
    with psycopg.connect(database_url) as c:
        rows = c.execute("SELECT symbol, bar_start, close FROM market_bars ORDER BY bar_start").fetchall()
        assert [r[0] for r in rows] == ["HK.00700"] * 3  # three spellings, one symbol
        assert rows[2][1] == datetime(2026, 9, 8, 9, 32, tzinfo=HKT)  # the bar's start, Hong Kong time
        assert c.execute("SELECT name, lot_size FROM instruments").fetchall() == [("Tencent", 100)]
    listed = history("list", env=project_env)
    assert listed.returncode == 0
    assert "HK.00700   1m  2026-09-08 2026-09-08     1  0" in listed.stdout


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ("700,2026-09-08 09:33,600,599,601,600,100,100,", "high 599 is below low 601"),
        ("700,2026-09-08 09:33,0,1,0,1,100,100,", "open 0 is not a positive price"),
        ("700,2026-09-08 12:30,600,601,600,600,100,100,", "outside continuous trading on 2026-09-08"),  # lunch
        ("700,2026-09-08 16:05,600,601,600,600,100,100,", "outside continuous trading"),  # closing auction
        ("700,2026-09-06 10:00,600,601,600,600,100,100,", "2026-09-06 is not an XHKG trading day"),  # Sunday
        ("700,yesterday,600,601,600,600,100,100,", "is not YYYY-MM-DD HH:MM"),
        ("US.AAPL,2026-09-08 10:00,1,1,1,1,1,1,", "this agent trades Hong Kong stocks only"),
        ("5,2026-09-08 10:00,60,61,60,60,100,,", "HK.00005 has no known lot size"),
    ],
)
def test_a_bad_row_refuses_the_whole_file_with_file_line_and_reason(
    conn: psycopg.Connection, tmp_path: Path, row: str, reason: str
) -> None:
    path = write(tmp_path, [GOOD[0], row])  # a good row first: it must not be stored either
    with pytest.raises(HistoryImportError, match=rf"{path.name}, line 3: .*{reason}.*Nothing") as refused:
        store_file(conn, path)
    assert "Nothing" in str(refused.value)
    assert count(conn) == 0 and conn.execute("SELECT count(*) FROM instruments").fetchone()[0] == 0


def test_a_row_contradicting_a_stored_bar_refuses_the_file(conn: psycopg.Connection, tmp_path: Path) -> None:
    store_file(conn, write(tmp_path, GOOD))
    changed = write(
        tmp_path, ["700,2026-09-08 10:00,600,601,600,600,5,,", "700,2026-09-08 09:30,600.5,601,600,600.6,12000,,"]
    )
    with pytest.raises(
        HistoryImportError, match=r"line 3: contradicts the stored 1m bar of HK.00700 at 2026-09-08 09:30"
    ):
        store_file(conn, changed)
    assert count(conn) == 3  # the file's good 10:00 row was not stored either


def test_a_header_without_the_required_columns_is_refused(conn: psycopg.Connection, tmp_path: Path) -> None:
    path = write(tmp_path, ["700,2026-09-08 09:30,600,601,600,600"], header="symbol,time,open,high,low,close,volume_x")
    with pytest.raises(HistoryImportError, match=r"line 1: missing column\(s\) volume; unknown column\(s\) volume_x"):
        store_file(conn, path)


def test_the_script_exits_2_on_a_refused_file_and_names_it(project_env: dict[str, str], tmp_path: Path) -> None:
    bad = write(tmp_path, ["700,2026-09-08 12:30,600,601,600,600,100,100,"], name="lunch.csv")
    done = history("import", str(bad), env=project_env)
    assert done.returncode == 2 and "REFUSED" in done.stderr and "lunch.csv, line 2" in done.stderr


# ----------------------------------------------------------------------------------------- recorded replay

DAY = date(2026, 9, 8)
SYMBOLS = ("HK.00883", "HK.00700", "HK.01398")


def synthetic_csv(path: Path, days: list[date]) -> Path:
    """The simulator's bars for a few symbols, written as a CSV the way an owner's export would look."""
    store = SyntheticStore(42)
    with path.open("w", newline="", encoding="utf-8") as handle:
        out = csv.writer(handle)
        out.writerow(["time", "symbol", "timeframe", "open", "high", "low", "close", "volume", "lot_size", "name"])
        for symbol in SYMBOLS:
            info = store.instruments()[symbol]
            for day in sessions_before(DAY, 40):
                d = store.daily(symbol, day)
                out.writerow(
                    [day.isoformat(), symbol, "1d", *(x / 1000 for x in d[:4]), d.volume, info.lot_size, info.name]
                )
            for day in days:
                bars = store.session(symbol, day)
                for i in range(len(bars)):
                    start = datetime.fromtimestamp(int(bars.starts[i]), HKT)
                    prices = (int(bars.open[i]), int(bars.high[i]), int(bars.low[i]), int(bars.close[i]))
                    out.writerow(
                        [
                            f"{start:%Y-%m-%d %H:%M}",
                            symbol,
                            "1m",
                            *(p / 1000 for p in prices),
                            int(bars.volume[i]),
                            "",
                            "",
                        ]
                    )
    return path


@pytest.fixture
def recorded_env(project_env: dict[str, str], settings_file: Path, postgres_admin_dsn: str) -> Iterator[dict[str, str]]:
    name = f"test_replay_{uuid.uuid4().hex[:16]}"
    data = yaml.safe_load(settings_file.read_text(encoding="utf-8"))
    data["replay"]["database"] = name
    settings_file.write_text(yaml.safe_dump(data), encoding="utf-8")
    yield project_env
    with psycopg.connect(postgres_admin_dsn, autocommit=True) as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def test_a_recorded_replay_runs_on_imported_bars_and_names_missing_days(
    recorded_env: dict[str, str], tmp_path: Path
) -> None:
    path = synthetic_csv(tmp_path / "export.csv", [*sessions_before(DAY, 3), DAY])
    imported = history("import", str(path), env=recorded_env)
    assert imported.returncode == 0, imported.stderr
    out = tmp_path / "score.json"
    run = run_agent(
        "--replay", f"{DAY}..{DAY}", "--brain", "rules", "--feed", "recorded", "--json", str(out), env=recorded_env
    )
    assert run.returncode == 0, run.output
    document = json.loads(out.read_text(encoding="utf-8"))
    assert document["feed"] == "recorded"
    assert [t["symbol"] for t in document["trades"]] == ["HK.00883"]  # the same entry as on the synthetic feed
    assert document["metrics"]["benchmark_return"] is not None  # no HK.02800 here: the equal-weight universe
    missing = run_agent("--replay", f"{DAY}..2026-09-09", "--brain", "rules", "--feed", "recorded", env=recorded_env)
    assert missing.returncode == 2
    for symbol in SYMBOLS:
        assert f"{symbol}: 2026-09-09" in missing.output
