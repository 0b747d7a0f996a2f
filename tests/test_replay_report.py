"""The replay and the report together, end to end: ``agent.py --replay`` as a real process writes a run into its
own schema of the replay database, then ``agent.py --report replay:<its id>`` as another process reads it back.
The page is parsed and its headline figures and trades are compared with the replay's own ``--json`` score."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg import sql

from replay.feed import sessions_before
from report.render import pct
from tests.agent_runner import run_agent
from tests.report_page import money, parse_page, percent, table_column
from tests.test_history import DAY as RECORDED_DAY
from tests.test_history import history, synthetic_csv

# Seed 42 (the shipped sim seed): a momentum entry in HK.00883 at 13:00 on 2026-09-08 and a take-profit exit
# at 14:40; the days either side have no trade, so the run starts and ends flat.
FIRST, LAST = "2026-09-07", "2026-09-09"
STARTING_CASH = Decimal(1_000_000)


@pytest.fixture
def replay_db(postgres_admin_dsn: str, settings_file: Path) -> Iterator[str]:
    """A replay database of this test's own (named in the test's settings file), dropped afterwards."""
    name = f"test_replay_{uuid.uuid4().hex[:16]}"
    data = yaml.safe_load(settings_file.read_text(encoding="utf-8"))
    data["replay"]["database"] = name
    settings_file.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    yield name
    with psycopg.connect(postgres_admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def hkt(text: str) -> datetime:
    """A page time (``YYYY-MM-DD HH:MM``, Hong Kong time) or a JSON time (ISO with +08:00) as an aware datetime."""
    value = datetime.fromisoformat(text if "T" in text else text.replace(" ", "T") + "+08:00")
    assert value.tzinfo is not None
    return value


def test_the_report_of_a_replay_run_matches_the_replays_own_score(
    project_env: dict[str, str], replay_db: str, tmp_path: Path
) -> None:
    score_path, page_path = tmp_path / "score.json", tmp_path / "replay.html"
    replay = run_agent("--replay", f"{FIRST}..{LAST}", "--brain", "rules", "--feed", "synthetic", "--json",
                       str(score_path), env=project_env)  # fmt: skip
    assert replay.returncode == 0, replay.output
    score = json.loads(score_path.read_text(encoding="utf-8"))
    metrics = score["metrics"]
    closed = [t for t in score["trades"] if t["exit_time"] is not None]
    assert metrics["round_trips"] == len(closed) >= 1  # the test means something only with a real trade
    assert len(closed) == len(score["trades"])  # flat at the end: nothing is marked, everything is realized

    report = run_agent("--report", f"replay:{score['run_id']}", "--out", str(page_path), env=project_env)
    assert report.returncode == 0, report.output
    assert report.stdout.strip() == str(page_path.resolve())
    html = page_path.read_text(encoding="utf-8")
    page = parse_page(html)
    f = page.figures

    assert f"replay run {score['run_id']} ({FIRST} to {LAST})" in html
    assert "had not finished" not in html and "The headline P&amp;L is realized" in html
    assert f["round_trips"] == str(metrics["round_trips"])
    # Fees: the report prices every fill with brokers.hkex and the simulator's commission, as the replay broker
    # charged them; the score sums what the broker charged. The same number, to the cent.
    assert money(f["fees_hkd"]) == Decimal(str(metrics["fees_hkd"]))
    # P&L: the page's is realized (closed round trips, net of fees); the score's trades carry the same P&L each.
    realized = sum((Decimal(str(t["pnl_hkd"])) for t in closed), Decimal(0))
    assert money(f["pnl_hkd"]) == realized
    # The score's total return marks open positions; with none left it is the realized P&L over the starting cash
    # (rounded to 6 decimals in the JSON: within HK$0.50 on HK$1m).
    assert abs(Decimal(str(metrics["total_return"])) * STARTING_CASH - realized) <= Decimal("0.5")
    assert percent(f["return"]) == (realized / STARTING_CASH * 100).quantize(Decimal("0.1"))
    assert f["starting_equity"] == "HK$1,000,000.00"
    assert f["win_rate"] == pct(metrics["win_rate"])
    assert f["avg_r"] == f"{metrics['avg_r']:.2f} R"
    assert f["blocked_calls"] == str(sum(metrics["blocked_by_rule"].values()))
    assert f["model_cost_usd"] == f"${metrics['model_cost_usd']:,.4f}"
    # The replay's own benchmark and its marked figures, as the run recorded them; the label of a rules run.
    assert f["benchmark_return"] == pct(metrics["benchmark_return"])
    assert "over the replayed days, as the replay scored it" in html
    assert f["replay_total_return"] == pct(metrics["total_return"])
    assert f["replay_max_drawdown"] == pct(metrics["max_drawdown"])
    assert f["in_sample"] == "not applicable (rules brain)"
    # Max drawdown differs by definition: the page's is of the closed-trade equity (one winning trade: none),
    # the score's of the equity marked at every guard pass (the open position dipped before its take-profit).
    assert f["max_drawdown"] == "0.0%" and metrics["max_drawdown"] > 0

    # Every trade, as the score lists it.
    assert table_column(page, "trades-table", "Symbol") == [t["symbol"] for t in closed]
    assert table_column(page, "trades-table", "Qty") == [f"{t['quantity']:,}" for t in closed]
    assert table_column(page, "trades-table", "Entry") == [f"{t['entry_price']:,.3f}" for t in closed]
    assert table_column(page, "trades-table", "Exit") == [f"{t['exit_price']:,.3f}" for t in closed]
    assert [money(p) for p in table_column(page, "trades-table", "P&L")] == [Decimal(str(t["pnl_hkd"])) for t in closed]
    # Times: the score has the start of the bar that filled; the journal (and so the page) the replay clock of the
    # pass that learned of the fill, the next 5-minute pass at most. Both are the replay's times, not the wall's.
    for column, key in (("Entry (HKT)", "entry_time"), ("Exit (HKT)", "exit_time")):
        for shown, trade in zip(table_column(page, "trades-table", column), closed, strict=True):
            assert hkt(trade[key]) <= hkt(shown) <= hkt(trade[key]) + timedelta(minutes=5)
    assert any(t["reasoning"] and t["reasoning"] in " ".join(page.reasoning) for t in closed)

    # Every pass of the run is a cycle of its schema: two trading cycles a day, the guard passes in between.
    modes = table_column(page, "cycles-table", "Mode")
    assert modes.count("trade") == 6 and modes.count("guard") > 6
    times = [hkt(t) for t in table_column(page, "cycles-table", "Time (HKT)")]
    assert min(times).date().isoformat() == FIRST and max(times).date().isoformat() == LAST


def test_report_of_a_second_run_of_the_same_days_shows_only_that_run(
    project_env: dict[str, str], replay_db: str, tmp_path: Path
) -> None:
    """Two replays of one day in one replay database: each page has its own run's cycles and trades only."""
    ids: list[Any] = []
    for seed in ("42", "7"):
        out = tmp_path / f"score-{seed}.json"
        replay = run_agent("--replay", "2026-09-08..2026-09-08", "--brain", "rules", "--seed", seed, "--json",
                           str(out), env=project_env)  # fmt: skip
        assert replay.returncode == 0, replay.output
        ids.append(json.loads(out.read_text(encoding="utf-8")))
    for score in ids:
        page_path = tmp_path / f"page-{score['run_id']}.html"
        report = run_agent("--report", f"replay:{score['run_id']}", "--out", str(page_path), env=project_env)
        assert report.returncode == 0, report.output
        page = parse_page(page_path.read_text(encoding="utf-8"))
        assert page.figures["round_trips"] == str(score["metrics"]["round_trips"])
        assert money(page.figures["fees_hkd"]) == Decimal(str(score["metrics"]["fees_hkd"]))
        shown = table_column(page, "trades-table", "Symbol") if "trades-table" in page.tables else []
        assert shown == [t["symbol"] for t in score["trades"] if t["exit_time"]]
        assert table_column(page, "cycles-table", "Mode").count("trade") == 2  # not four


def test_the_report_of_a_recorded_replay_charts_its_trades_from_the_recorded_history(
    project_env: dict[str, str], replay_db: str, tmp_path: Path
) -> None:
    """A replay of imported bars: the recorded history is in the live journal (market_bars), the run in the replay
    database; the page draws the trade's minute bars from the history, read-only, and agrees with the score."""
    path = synthetic_csv(tmp_path / "export.csv", [*sessions_before(RECORDED_DAY, 3), RECORDED_DAY])
    imported = history("import", str(path), env=project_env)
    assert imported.returncode == 0, imported.stderr
    score_path, page_path = tmp_path / "score.json", tmp_path / "recorded.html"
    replay = run_agent("--replay", f"{RECORDED_DAY}..{RECORDED_DAY}", "--brain", "rules", "--feed", "recorded",
                       "--json", str(score_path), env=project_env)  # fmt: skip
    assert replay.returncode == 0, replay.output
    score = json.loads(score_path.read_text(encoding="utf-8"))
    assert [t["symbol"] for t in score["trades"]] == ["HK.00883"]
    report = run_agent("--report", f"replay:{score['run_id']}", "--out", str(page_path), env=project_env)
    assert report.returncode == 0, report.output
    page = parse_page(page_path.read_text(encoding="utf-8"))
    assert page.figures["round_trips"] == "1" and page.no_chart == []
    assert money(page.figures["fees_hkd"]) == Decimal(str(score["metrics"]["fees_hkd"]))
    assert money(page.figures["pnl_hkd"]) == Decimal(str(score["trades"][0]["pnl_hkd"]))
    (chart,) = [(i, c) for i, c in enumerate(page.charts) if c.get("data-chart") == "trade"]
    assert chart[1]["data-symbol"] == "HK.00883" and page.chart_paths[chart[0]] > 0
