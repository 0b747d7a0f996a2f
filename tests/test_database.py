"""The PostgreSQL journal against a real server: one fresh database per test (see conftest.py)."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from pydantic import SecretStr
from structlog.testing import capture_logs

from brokers.base import Bar, OrderStatus, OrderType, Side
from config.errors import ConfigError, JournalError
from config.settings import PROJECT_ROOT, DatabaseSettings, Secrets, Settings
from data.database import (
    Journal,
    OrderIntent,
    PgKlineCache,
    advisory_key,
    discover_migrations,
    redact_dsn,
)
from tests.pg import stop_embedded_server, traversable_tempdir

HK = ZoneInfo("Asia/Hong_Kong")
DAY = date(2026, 11, 20)
T0 = datetime(2026, 11, 20, 9, 35, tzinfo=HK)

# The table contract (DESIGN.md §2 and the journal brief): every table and every column, by name.
CONTRACT: dict[str, set[str]] = {
    "cycles": {
        "id", "run_id", "trading_date", "started_at", "finished_at", "mode", "broker", "brain", "model", "status",
        "summary", "error", "iterations", "input_tokens", "output_tokens", "cache_read_tokens",
        "cache_write_tokens", "cost_usd",
    },
    "tool_calls": {
        "id", "cycle_id", "seq", "name", "input", "allowed", "reason", "result", "is_error", "duration_ms",
        "created_at",
    },
    "orders": {
        "id", "client_order_id", "cycle_id", "symbol", "side", "quantity", "order_type", "limit_price",
        "stop_loss", "take_profit", "status", "broker_order_id", "filled_quantity", "avg_fill_price", "reason",
        "created_at", "updated_at", "submitted_at", "filled_at", "trading_date",
    },
    "protective_stops": {
        "symbol", "quantity", "entry_price", "stop_loss", "take_profit", "broker_stop_order_id", "source",
        "cycle_id", "created_at", "updated_at",
    },
    "decisions": {"id", "cycle_id", "decision", "reasoning", "confidence", "created_at"},
    "equity_snapshots": {"id", "trading_date", "kind", "equity", "cash", "taken_at"},
    "alerts": {"id", "cycle_id", "subject", "message", "priority", "event", "sent", "error", "created_at"},
    "control_flags": {"name", "value", "set_at", "set_by"},
    "kline_cache": {"symbol", "timeframe", "bar_time", "open", "high", "low", "close", "volume"},
    "index_constituents": {"index_name", "trading_date", "symbols", "fetched_at"},
    "instance_locks": {"key", "holder", "started_at"},
    "lesson_reviews": {
        "id", "cycle_id", "created_at", "status", "trade_ids", "model", "input_tokens", "output_tokens",
        "cache_read_tokens", "cache_write_tokens", "cost_usd", "discarded", "error",
    },
    "lessons": {
        "id", "review_id", "created_at", "text", "setup", "trade_ids", "confidence", "active", "review_cost_usd",
        "updated_at",
    },
    "schema_migrations": {"name", "applied_at"},
    # Market history and replays (DESIGN.md section 7; migration 006).
    "instruments": {"symbol", "name", "lot_size", "updated_at"},
    "market_bars": {
        "symbol", "timeframe", "bar_start", "open", "high", "low", "close", "volume", "turnover", "source",
        "imported_at",
    },
    "history_fetches": {"symbol", "timeframe", "day", "bars", "fetched_at"},
    "replay_runs": {
        "id", "started_at", "finished_at", "from_date", "to_date", "brain", "feed", "status", "schema_name",
        "settings", "metrics",
    },
    "model_response_cache": {"request_sha256", "model", "response", "created_at"},
}  # fmt: skip


def schema_of(dsn: str) -> dict[str, list[tuple[str, ...]]]:
    """Columns (with types, nullability, defaults), constraints and indexes of the public schema."""
    with psycopg.connect(dsn) as conn:
        columns = conn.execute(
            "SELECT table_name, column_name, data_type, is_nullable, coalesce(column_default, '') "
            "FROM information_schema.columns WHERE table_schema = 'public' ORDER BY 1, 2"
        ).fetchall()
        constraints = conn.execute(
            "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2"
        ).fetchall()
        indexes = conn.execute(
            "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1, 2"
        ).fetchall()
    return {"columns": columns, "constraints": constraints, "indexes": indexes}


def new_cycle(journal: Journal, *, mode: str = "trade", started_at: datetime = T0, day: date = DAY) -> int:
    return journal.start_cycle(
        run_id=f"run-{started_at:%H%M%S}",
        mode=mode,  # type: ignore[arg-type]
        broker="sim",
        brain="rules",
        model=None,
        started_at=started_at,
        trading_date=day,
    )


def intent(
    client_order_id: str, cycle_id: int, *, status: OrderStatus = OrderStatus.PENDING, **kw: object
) -> OrderIntent:
    values: dict[str, object] = {
        "client_order_id": client_order_id,
        "cycle_id": cycle_id,
        "symbol": "HK.00700",
        "side": Side.BUY,
        "quantity": 100,
        "order_type": OrderType.LIMIT,
        "limit_price": Decimal("312.40"),
        "stop_loss": Decimal("300.00"),
        "take_profit": Decimal("340.00"),
        "status": status,
        "reason": "breakout above VWAP",
        "trading_date": DAY,
    }
    values.update(kw)
    return OrderIntent.model_validate(values)


# ---- migrations ------------------------------------------------------------------------------------------------


def test_migrations_are_recorded_in_order_and_a_second_run_applies_nothing(database_url: str) -> None:
    names = [m.name for m in discover_migrations()]
    assert names == sorted(names) and names[0] == "001_initial"
    with Journal.connect(database_url) as journal:
        assert journal.applied_migrations() == []
        assert journal.migrate() == names
        before = schema_of(database_url)
        assert journal.migrate() == []
        assert journal.applied_migrations() == names
    with Journal.connect(database_url) as again:
        assert again.migrate() == []
    assert schema_of(database_url) == before


def test_an_old_database_and_a_fresh_one_reach_the_same_schema(database_factory: Callable[[], str]) -> None:
    old_url, fresh_url = database_factory(), database_factory()
    names = [m.name for m in discover_migrations()]
    with Journal.connect(old_url) as old:
        assert old.migrate("001_initial") == ["001_initial"]
        assert "kline_cache" not in {t for t, *_ in schema_of(old_url)["columns"]}
        assert old.migrate() == names[1:]
    with Journal.connect(fresh_url) as fresh:
        assert fresh.migrate() == names
    assert schema_of(old_url) == schema_of(fresh_url)


def test_concurrent_migrators_apply_each_migration_once(database_url: str) -> None:
    journals = [Journal.connect(database_url) for _ in range(3)]
    barrier = threading.Barrier(len(journals))
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def run(journal: Journal) -> None:
        barrier.wait()
        try:
            results.append(journal.migrate())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(j,)) for j in journals]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for j in journals:
        j.close()
    assert errors == []
    applied = sorted(name for result in results for name in result)
    assert applied == [m.name for m in discover_migrations()]
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone() == (len(applied),)


def test_a_failing_migration_is_rolled_back_whole_and_not_recorded(database_url: str, tmp_path: Path) -> None:
    (tmp_path / "001_first.sql").write_text("CREATE TABLE first_table (id int);")
    (tmp_path / "002_broken.sql").write_text("CREATE TABLE half_done (id int);\nCREATE TABLE oops (id nosuchtype);")
    with Journal.connect(database_url) as journal:
        with pytest.raises(JournalError, match=r"Migration 002_broken .* failed and was rolled back: .*nosuchtype"):
            journal.migrate(folder=tmp_path)
        assert journal.applied_migrations() == ["001_first"]
    tables = {t for t, *_ in schema_of(database_url)["columns"]}
    assert "first_table" in tables
    assert "half_done" not in tables


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (["001_ok.sql", "1_short.sql"], r"1_short.sql is misnamed"),  # number must have three digits
        (["001_ok.sql", "001_again.sql"], r"share the number 001"),  # two files, one number
    ],
)
def test_migration_folder_mistakes_are_refused(tmp_path: Path, files: list[str], message: str) -> None:
    for name in files:
        (tmp_path / name).write_text("SELECT 1;")
    with pytest.raises(JournalError, match=message):
        discover_migrations(tmp_path)


def test_every_contract_table_exists_with_its_columns(journal: Journal, database_url: str) -> None:
    columns: dict[str, set[str]] = {}
    for table, column, *_ in schema_of(database_url)["columns"]:
        columns.setdefault(table, set()).add(column)
    assert columns == CONTRACT


def test_money_columns_are_numeric_and_times_timestamptz(journal: Journal, database_url: str) -> None:
    types = {(t, c): dt for t, c, dt, *_ in schema_of(database_url)["columns"]}
    money = [("orders", "limit_price"), ("orders", "avg_fill_price"), ("cycles", "cost_usd")]
    money += [("equity_snapshots", "equity"), ("protective_stops", "stop_loss"), ("kline_cache", "close")]
    for key in money:
        assert types[key] == "numeric", key
    for key in [("cycles", "started_at"), ("orders", "created_at"), ("kline_cache", "bar_time")]:
        assert types[key] == "timestamp with time zone", key


# ---- cycles and tool calls -------------------------------------------------------------------------------------


def test_cycle_is_started_running_and_finished_with_usage(journal: Journal) -> None:
    cycle_id = new_cycle(journal)
    row = journal.get_cycle(cycle_id)
    assert row is not None and row.status == "running" and row.finished_at is None
    journal.finish_cycle(
        cycle_id,
        status="ok",
        finished_at=T0 + timedelta(minutes=2),
        summary="bought 100 HK.00700",
        iterations=4,
        input_tokens=12_000,
        output_tokens=800,
        cache_read_tokens=9_000,
        cache_write_tokens=3_000,
        cost_usd=0.0621,
    )
    row = journal.get_cycle(cycle_id)
    assert row is not None
    assert (row.status, row.summary, row.iterations, row.input_tokens, row.cache_write_tokens) == (
        "ok", "bought 100 HK.00700", 4, 12_000, 3_000,
    )  # fmt: skip
    assert row.cost_usd == Decimal("0.0621")
    assert row.finished_at == T0 + timedelta(minutes=2)
    assert journal.get_cycle(cycle_id + 1000) is None


def test_cycles_on_a_date_and_cost_since(journal: Journal) -> None:
    first = new_cycle(journal, started_at=T0)
    second = new_cycle(journal, mode="guard", started_at=T0 + timedelta(hours=1))
    other_day = new_cycle(journal, started_at=T0 - timedelta(days=1), day=DAY - timedelta(days=1))
    for cycle_id, cost in ((first, 0.25), (second, 0.0), (other_day, 1.5)):
        journal.finish_cycle(cycle_id, status="ok", finished_at=T0 + timedelta(hours=2), cost_usd=cost)
    assert [c.id for c in journal.cycles_on(DAY)] == [first, second]
    assert journal.cost_usd_since(T0) == pytest.approx(0.25)
    assert journal.cost_usd_since(T0 - timedelta(days=2)) == pytest.approx(1.75)
    assert journal.cost_usd_since(T0 + timedelta(days=1)) == 0.0


def test_cycle_mistakes_raise_journal_errors(journal: Journal) -> None:
    with pytest.raises(JournalError, match=r"start a live cycle .*cycles_mode_check"):
        new_cycle(journal, mode="live")
    with pytest.raises(JournalError, match=r"could not finish cycle 4242: there is no cycle with that id"):
        journal.finish_cycle(4242, status="ok", finished_at=T0)


def test_tool_calls_store_objects_plain_strings_and_awkward_values_as_jsonb(
    journal: Journal, database_url: str
) -> None:
    cycle_id = new_cycle(journal)
    journal.record_tool_call(
        cycle_id, 0, "get_quote", {"symbol": "700"}, True, None, {"last": Decimal("312.4"), "ratio": float("nan")},
        False, 12,
    )  # fmt: skip
    journal.record_tool_call(
        cycle_id, 1, "execute_trade", "buy 100 tencent", False, "input is not an object", {"error": "bad input"},
        True, 0,
    )  # fmt: skip
    journal.record_tool_call(cycle_id, 2, "get_news", {"symbol": "HK.00700"}, True, None, ["nul\x00byte"], False, 3)
    calls = journal.tool_calls(cycle_id)
    assert [c.seq for c in calls] == [0, 1, 2]
    assert calls[0].input == {"symbol": "700"}
    assert calls[0].result == {"last": "312.4", "ratio": None}
    assert calls[1].input == "buy 100 tencent"
    assert (calls[1].allowed, calls[1].reason, calls[1].is_error) == (False, "input is not an object", True)
    assert calls[2].result == ["nulbyte"]
    with psycopg.connect(database_url) as conn:
        kinds = conn.execute("SELECT jsonb_typeof(input) FROM tool_calls ORDER BY seq").fetchall()
    assert kinds == [("object",), ("string",), ("object",)]


def test_a_tool_call_seq_is_unique_per_cycle(journal: Journal) -> None:
    cycle_id = new_cycle(journal)
    journal.record_tool_call(cycle_id, 0, "get_portfolio", {}, True, None, {}, False, 1)
    with pytest.raises(
        JournalError, match=r"record tool call #0 \(get_portfolio\) of cycle .*tool_calls_cycle_seq_key"
    ):
        journal.record_tool_call(cycle_id, 0, "get_portfolio", {}, True, None, {}, False, 1)


# ---- orders ----------------------------------------------------------------------------------------------------


def test_an_order_intent_is_committed_before_the_method_returns(journal: Journal, database_url: str) -> None:
    cycle_id = new_cycle(journal)
    row = journal.insert_order(intent("c-1", cycle_id, created_at=T0))
    assert (row.status, row.symbol, row.side, row.limit_price, row.filled_quantity) == (
        OrderStatus.PENDING, "HK.00700", Side.BUY, Decimal("312.40"), 0,
    )  # fmt: skip
    # Another connection (as a crash-restarted agent would) sees it at once.
    with psycopg.connect(database_url) as other:
        seen = other.execute("SELECT status, quantity FROM orders WHERE client_order_id = 'c-1'").fetchone()
    assert seen == ("pending", 100)


def test_order_updates_keep_unset_fields_and_stamp_submission_and_fill(journal: Journal) -> None:
    cycle_id = new_cycle(journal)
    journal.insert_order(intent("c-2", cycle_id, created_at=T0))
    submitted = journal.update_order("c-2", status="submitted", broker_order_id="F-77", at=T0 + timedelta(seconds=1))
    assert (submitted.status, submitted.broker_order_id) == (OrderStatus.SUBMITTED, "F-77")
    assert submitted.submitted_at == T0 + timedelta(seconds=1) and submitted.filled_at is None
    filled = journal.update_order(
        "c-2",
        status=OrderStatus.FILLED,
        filled_quantity=100,
        avg_fill_price=Decimal("312.2"),
        at=T0 + timedelta(seconds=5),
    )
    assert (filled.status, filled.broker_order_id, filled.filled_quantity, filled.avg_fill_price) == (
        OrderStatus.FILLED, "F-77", 100, Decimal("312.2"),
    )  # fmt: skip
    assert filled.submitted_at == T0 + timedelta(seconds=1)  # the first acknowledgement is kept
    assert filled.filled_at == filled.updated_at == T0 + timedelta(seconds=5)
    assert filled.reason == "breakout above VWAP"
    assert journal.get_order("c-2") == filled
    assert journal.get_order("nope") is None


def test_a_duplicate_client_order_id_is_refused_clearly(journal: Journal) -> None:
    cycle_id = new_cycle(journal)
    journal.insert_order(intent("dup-1", cycle_id))
    with pytest.raises(
        JournalError, match=r"order dup-1: an order with that client_order_id is already in the journal"
    ):
        journal.insert_order(intent("dup-1", cycle_id, quantity=200))
    assert [o.quantity for o in journal.orders_on(DAY)] == [100]


def test_updating_an_order_that_was_never_journalled_fails(journal: Journal) -> None:
    with pytest.raises(JournalError, match=r"update order ghost to filled: no order with that client_order_id"):
        journal.update_order("ghost", status="filled", at=T0)


def test_order_intents_only_start_as_pending_or_dry_run() -> None:
    with pytest.raises(ValueError, match="status"):
        intent("c-x", 1, status=OrderStatus.FILLED)


def test_unresolved_orders_and_daily_trade_count(journal: Journal) -> None:
    cycle_id = new_cycle(journal)
    outcomes = {
        "pending": OrderStatus.PENDING,
        "submitted": OrderStatus.SUBMITTED,
        "partial": OrderStatus.PARTIALLY_FILLED,
        "unknown": OrderStatus.UNKNOWN,
        "filled": OrderStatus.FILLED,
        "cancelled": OrderStatus.CANCELLED,
        "rejected": OrderStatus.REJECTED,
    }
    for n, (cid, status) in enumerate(outcomes.items()):
        journal.insert_order(intent(cid, cycle_id, created_at=T0 + timedelta(seconds=n)))
        if status is not OrderStatus.PENDING:
            journal.update_order(cid, status=status, at=T0 + timedelta(seconds=n))
    journal.insert_order(intent("dry-1", cycle_id, status=OrderStatus.DRY_RUN))
    journal.insert_order(intent("dry-2", cycle_id, status=OrderStatus.DRY_RUN, side=Side.SELL))
    journal.insert_order(intent("yesterday", cycle_id, trading_date=DAY - timedelta(days=1)))

    unresolved = [o.client_order_id for o in journal.unresolved_orders()]
    assert sorted(unresolved) == ["partial", "pending", "submitted", "unknown", "yesterday"]
    assert all(o.is_unresolved for o in journal.unresolved_orders())
    # Reached (or may have reached) the broker today: pending, submitted, partial, unknown, filled, cancelled.
    assert journal.count_trades_on(DAY) == 6
    assert journal.count_trades_on(DAY - timedelta(days=1)) == 1
    assert journal.count_trades_on(DAY + timedelta(days=1)) == 0
    assert len(journal.orders_on(DAY)) == 9


# ---- stops, decisions, alerts, equity, flags ---------------------------------------------------------------------


def test_protective_stops_upsert_replace_and_delete(journal: Journal) -> None:
    cycle_id = new_cycle(journal)
    first = journal.upsert_protective_stop(
        "HK.00700", quantity=100, entry_price=Decimal("312.4"), stop_loss=Decimal("300"),
        take_profit=Decimal("340"), source="entry", cycle_id=cycle_id, at=T0,
    )  # fmt: skip
    journal.upsert_protective_stop(
        "HK.00005", quantity=400, entry_price=Decimal("60.1"), stop_loss=Decimal("57.1"), source="adopted", at=T0
    )
    moved = journal.upsert_protective_stop(
        "HK.00700", quantity=100, entry_price=Decimal("312.4"), stop_loss=Decimal("310"),
        take_profit=Decimal("340"), broker_stop_order_id="S-9", source="entry", cycle_id=cycle_id,
        at=T0 + timedelta(minutes=30),
    )  # fmt: skip
    assert moved.created_at == first.created_at == T0
    assert moved.updated_at == T0 + timedelta(minutes=30)
    stops = journal.protective_stops()
    assert set(stops) == {"HK.00700", "HK.00005"}
    assert (stops["HK.00700"].stop_loss, stops["HK.00700"].broker_stop_order_id) == (Decimal("310"), "S-9")
    assert (stops["HK.00005"].source, stops["HK.00005"].take_profit) == ("adopted", None)
    assert journal.delete_protective_stop("HK.00700") is True
    assert journal.delete_protective_stop("HK.00700") is False
    assert set(journal.protective_stops()) == {"HK.00005"}


def test_decisions_and_alerts_are_recorded(journal: Journal) -> None:
    cycle_id = new_cycle(journal)
    journal.record_decision(cycle_id, "hold", "no setup with 2:1 reward:risk", 0.6)
    journal.record_decision(cycle_id, "buy HK.00700", "breakout", None)
    assert [(d.decision, d.confidence) for d in journal.decisions(cycle_id)] == [
        ("hold", 0.6),
        ("buy HK.00700", None),
    ]
    journal.record_alert(cycle_id, "old", "x", "low", None, True, None, at=T0 - timedelta(hours=1))
    journal.record_alert(
        cycle_id, "Daily loss limit", "closing all", "high", "daily_loss_limit", False, "no SMTP", at=T0
    )
    alerts = journal.alerts_since(T0)
    assert [(a.subject, a.priority, a.event, a.sent, a.error) for a in alerts] == [
        ("Daily loss limit", "high", "daily_loss_limit", False, "no SMTP")
    ]


def test_start_of_day_equity_first_snapshot_wins(journal: Journal) -> None:
    assert journal.start_of_day_equity(DAY) is None
    assert journal.record_equity_snapshot(DAY, "start_of_day", Decimal("1000000.00"), Decimal("1000000"), T0)
    assert not journal.record_equity_snapshot(
        DAY, "start_of_day", Decimal("990000"), Decimal("5"), T0 + timedelta(hours=1)
    )
    assert journal.record_equity_snapshot(DAY, "cycle", Decimal("995000.5"), None, T0 + timedelta(hours=1))
    assert journal.record_equity_snapshot(DAY, "cycle", Decimal("994000"), None, T0 + timedelta(hours=2))
    assert journal.start_of_day_equity(DAY) == Decimal("1000000.00")
    assert journal.start_of_day_equity(DAY + timedelta(days=1)) is None
    assert [s.kind for s in journal.equity_snapshots(DAY)] == ["start_of_day", "cycle", "cycle"]


def test_control_flags_set_replace_and_clear(journal: Journal) -> None:
    assert journal.get_flag("halt") is None
    journal.set_flag("halt", "manual stop: broker maintenance", "ops@desk", at=T0)
    journal.set_flag("halt", "daily loss limit", "guard", at=T0 + timedelta(hours=1))
    assert journal.get_flag("halt") == "daily loss limit"
    row = journal.get_flag_row("halt")
    assert row is not None and (row.set_by, row.set_at) == ("guard", T0 + timedelta(hours=1))
    assert journal.clear_flag("halt") is True
    assert journal.clear_flag("halt") is False
    assert journal.get_flag("halt") is None


# ---- K-line cache ----------------------------------------------------------------------------------------------


def bar(minute: int, close: str, volume: int = 1000) -> Bar:
    c = Decimal(close)
    return Bar(time=T0 + timedelta(minutes=minute), open=c, high=c + 1, low=c - 1, close=c, volume=volume)


def test_kline_cache_round_trip_upsert_and_since(journal: Journal) -> None:
    cache = PgKlineCache(journal)
    assert cache.get("HK.00700", "1m", T0) == []
    cache.put("HK.00700", "1m", [bar(2, "312.6"), bar(0, "312.4"), bar(1, "312.5")])
    cache.put("HK.00700", "5m", [bar(0, "999")])
    cache.put("HK.00700", "1m", [bar(2, "313.0", volume=5000)])  # the still-open bar refreshed
    cache.put("HK.00700", "1m", [])
    bars = cache.get("HK.00700", "1m", T0)
    assert bars == [bar(0, "312.4"), bar(1, "312.5"), bar(2, "313.0", volume=5000)]
    assert all(b.time.utcoffset() == timedelta(hours=8) for b in bars)
    assert cache.get("HK.00700", "1m", T0 + timedelta(minutes=1)) == bars[1:]
    assert cache.get("HK.00005", "1m", T0) == []
    assert cache.get("HK.00700", "5m", T0) == [bar(0, "999")]


# ---- one agent per account --------------------------------------------------------------------------------------


def test_account_lock_is_exclusive_and_names_its_holder(journal: Journal, database_url: str) -> None:
    assert journal.try_lock("futu:SIMULATE:123", "agent.py pid 11 run r-1") is None
    assert journal.try_lock("futu:SIMULATE:123", "agent.py pid 11 run r-1") is None  # re-entry is harmless
    with Journal.connect(database_url) as second:
        held = second.try_lock("futu:SIMULATE:123", "agent.py --guard pid 12")
        assert held is not None and held.startswith("agent.py pid 11 run r-1 (since ")
        assert second.try_lock("futu:SIMULATE:456", "agent.py --guard pid 12") is None  # another account is free
        assert journal.unlock("futu:SIMULATE:123") is True
        assert second.try_lock("futu:SIMULATE:123", "agent.py --guard pid 12") is None
        assert journal.try_lock("futu:SIMULATE:123", "agent.py pid 13").startswith("agent.py --guard pid 12")  # type: ignore[union-attr]


def wait_until_backend_gone(dsn: str, pid: int) -> None:
    """Block until the server has ended backend ``pid`` (it does so shortly after its client vanishes)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(600):
            if conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone() is None:
                return
            time.sleep(0.1)
    raise AssertionError(f"backend {pid} still exists a minute after its process exited")


def test_account_lock_dies_with_the_process_that_held_it(database_url: str, journal: Journal) -> None:
    script = (
        "import os, sys\n"
        "from data.database import Journal\n"
        "j = Journal.connect(sys.argv[1])\n"
        "assert j.try_lock('sim:paper', 'agent.py pid 99') is None\n"
        "print(j._conn.info.backend_pid, flush=True)\n"
        "os._exit(0)  # dies without unlock or close\n"
    )
    crashed = subprocess.run(
        [sys.executable, "-c", script, database_url], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
    )
    wait_until_backend_gone(database_url, int(crashed.stdout.split()[-1]))
    assert journal.try_lock("sim:paper", "agent.py pid 100") is None
    with Journal.connect(database_url) as third:
        assert third.try_lock("sim:paper", "agent.py pid 101") == (
            f"agent.py pid 100 (since {_lock_started_at(database_url, 'sim:paper')})"
        )


def _lock_started_at(dsn: str, key: str) -> str:
    with psycopg.connect(dsn) as conn:
        conn.execute("SET TIME ZONE 'Asia/Hong_Kong'")
        row = conn.execute("SELECT started_at FROM instance_locks WHERE key = %s", (key,)).fetchone()
    assert row is not None
    return row[0].isoformat(timespec="seconds")


def test_open_with_database_url_connects_and_migrates(database_url: str) -> None:
    with Journal.open(Settings(), Secrets(database_url=SecretStr(database_url))) as journal:
        assert journal.applied_migrations() == [m.name for m in discover_migrations()]


def test_advisory_key_is_a_stable_signed_64_bit_number() -> None:
    key = advisory_key("futu:REAL:281756457887247")
    assert key == advisory_key("futu:REAL:281756457887247")
    assert -(2**63) <= key < 2**63
    assert key != advisory_key("futu:REAL:281756457887248")


# ---- connection, redaction, embedded server ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dsn", "redacted"),
    [
        ("postgresql://bot:s3cret@db.example:5432/catalyst", "postgresql://bot:***@db.example:5432/catalyst"),
        # '@' and '/' inside the password
        ("postgres://bot:p@ss/w:rd@10.0.0.5/x?sslmode=require", "postgres://bot:***@10.0.0.5/x?sslmode=require"),
        ("postgresql://bot@db/x", "postgresql://bot@db/x"),  # no password: unchanged
        ("postgresql:///catalyst?host=/var/run/pg", "postgresql:///catalyst?host=/var/run/pg"),  # socket, no user
        ("postgresql://db/x?user=bot&password=s3cret&sslmode=require", "postgresql://db/x?user=bot&password=***&sslmode=require"),
        ("host=db port=5433 user=bot password=s3cret dbname=x", "host=db port=5433 user=bot password=*** dbname=x"),
        ("host=db password='two words' dbname=x", "host=db password=*** dbname=x"),  # quoted key/value
        ("host=db PASSWORD = s3cret", "host=db PASSWORD = ***"),
    ],
)  # fmt: skip
def test_redact_dsn(dsn: str, redacted: str) -> None:
    assert redact_dsn(dsn) == redacted
    assert redact_dsn(SecretStr(dsn)) == redacted


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections (bound but not listening, so nothing else can take it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


def test_unreachable_database_url_raises_journal_error_naming_host_and_port(closed_port: int) -> None:
    secrets = Secrets(database_url=SecretStr(f"postgresql://catalyst:Hunter2-secret@127.0.0.1:{closed_port}/journal"))
    with capture_logs() as logs, pytest.raises(JournalError) as caught:
        Journal.open(Settings(), secrets)
    message = str(caught.value)
    assert f"host 127.0.0.1 port {closed_port} (database journal, user catalyst)" in message
    assert "unset DATABASE_URL to use the embedded server" in message
    chain = [caught.value, caught.value.__cause__, caught.value.__context__]
    assert all("Hunter2-secret" not in repr(e) for e in chain)
    assert "Hunter2-secret" not in json.dumps(logs, default=str)


def test_unparseable_dsn_is_a_journal_error_without_the_password() -> None:
    with pytest.raises(JournalError, match="is not a valid PostgreSQL connection string") as caught:
        Journal.connect("host=db password=Hunter2-secret dbname")
    assert "Hunter2-secret" not in str(caught.value)


def test_connecting_logs_the_dsn_redacted(database_url: str) -> None:
    params = conninfo_to_dict(database_url)
    with capture_logs() as logs, Journal.connect(database_url) as journal:
        pass
    assert journal.closed
    connected = [e for e in logs if e["event"] == "journal_connected"]
    assert connected and connected[0]["dsn"] == redact_dsn(database_url)
    assert params["dbname"] in connected[0]["dsn"]


@pytest.fixture
def embedded_dir() -> Iterator[Path]:
    folder = traversable_tempdir("catalyst-embedded-")
    yield folder / "pg"
    stop_embedded_server(folder / "pg")
    subprocess.run(["rm", "-rf", str(folder)], check=False)


def test_without_database_url_the_embedded_server_is_used_and_outlives_the_process(embedded_dir: Path) -> None:
    settings = Settings(database=DatabaseSettings(embedded_dir=embedded_dir))
    script = (
        "import sys; from pathlib import Path\n"
        "from config.settings import Settings, DatabaseSettings, Secrets\n"
        "from data.database import Journal\n"
        "j = Journal.open(Settings(database=DatabaseSettings(embedded_dir=Path(sys.argv[1]))), Secrets.from_env({}))\n"
        "print(j.applied_migrations()); j.set_flag('halt', 'from the first run', 'test'); j.close()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    first = subprocess.run(
        [sys.executable, "-c", script, str(embedded_dir)], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True
    )
    assert first.returncode == 0, first.stderr
    assert "001_initial" in first.stdout

    # The first process has exited; its server is still up (cleanup_mode=None) and this run reuses it.
    postmaster = (embedded_dir / "postmaster.pid").read_text().splitlines()
    assert Path(f"/proc/{postmaster[0]}").exists()
    with Journal.open(settings, Secrets.from_env({})) as journal:
        assert journal.migrate() == []
        assert journal.get_flag("halt") == "from the first run"
        params = conninfo_to_dict(journal.dsn_redacted)
        assert (params["dbname"], params["host"]) == ("catalyst", str(embedded_dir))
    assert (embedded_dir / "postmaster.pid").read_text().splitlines()[0] == postmaster[0]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0, reason="the pgserver system user is used only as root")
def test_as_root_an_embedded_dir_behind_a_closed_folder_is_a_config_error(tmp_path: Path) -> None:
    closed = tmp_path / "closed"
    closed.mkdir()
    closed.chmod(0o700)
    settings = Settings(database=DatabaseSettings(embedded_dir=closed / "var" / "pg"))
    with pytest.raises(ConfigError, match=r"system user 'pgserver', which cannot enter .* \(mode 0700\)") as caught:
        Journal.open(settings, Secrets())
    assert "set DATABASE_URL" in str(caught.value)
    assert stat.S_IMODE(closed.stat().st_mode) == 0o700  # untouched: pgserver would have opened it up
    assert not (closed / "var").exists()


def test_index_constituents_are_stored_per_day(journal: Journal) -> None:
    from datetime import date

    from data.database import PgConstituentCache

    cache = PgConstituentCache(journal)
    day = date(2026, 11, 20)
    assert cache.get("HSI", day) is None
    cache.put("HSI", day, ["HK.00700", "HK.00005"])
    cache.put("HSI", day, ["HK.00700", "HK.00005", "HK.00939"])  # replaced, not duplicated
    assert cache.get("HSI", day) == ["HK.00700", "HK.00005", "HK.00939"]
    assert cache.get("HSI", date(2026, 11, 23)) is None  # read again on the next trading day
    assert cache.get("HSTECH", day) is None
