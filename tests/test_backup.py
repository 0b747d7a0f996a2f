"""Journal backups and restore, end to end: real ``agent.py`` runs against the simulated exchange, the real
``scripts/backup.sh`` / ``scripts/restore.sh`` (pg_dump, pg_restore and psql bundled with pgserver) and a real
PostgreSQL; failure alerts go to a real SMTP server on loopback."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
import yaml
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from brokers.sim import SimBroker
from config.settings import PROJECT_ROOT, load_settings
from data.backup import apply_retention, backup_name, backups_to_keep, pg_tools, verify_dump
from data.database import Journal
from tests.agent_runner import run_agent, sim_at
from tests.pg import stop_embedded_server, traversable_tempdir
from tests.test_alerts import SINCE, LoopbackController, RecordingHandler, cli_env

BACKUP = PROJECT_ROOT / "scripts" / "backup.sh"
RESTORE = PROJECT_ROOT / "scripts" / "restore.sh"
DAY = date(2026, 11, 20)
NAME = re.compile(r"^journal-\d{8}T\d{6}Z\.dump$")


def at(hhmm: str) -> str:
    return f"{DAY}T{hhmm}:00+08:00"


def script(path: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(path), *args], env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)


def set_backup_dir(settings_file: Path, folder: Path) -> None:
    data = yaml.safe_load(settings_file.read_text(encoding="utf-8"))
    data["backup"]["dir"] = str(folder)
    settings_file.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


@pytest.fixture
def backups(settings_file: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "backups"
    set_backup_dir(settings_file, folder)
    return folder


@pytest.fixture
def smtp() -> Iterator[tuple[LoopbackController, RecordingHandler]]:
    handler = RecordingHandler()
    controller = LoopbackController(handler)
    controller.start()
    yield controller, handler
    controller.stop()


def recreate_empty(admin_dsn: str, database_url: str) -> None:
    """The journal is lost: drop its database and create an empty one under the same name."""
    name = conninfo_to_dict(database_url)["dbname"]
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))


def snapshot(database_url: str) -> tuple[dict[str, tuple[str, str, int]], dict[str, tuple[Decimal, str]], int]:
    """(orders by client id: (symbol, status, qty), stops by symbol: (stop, source), number of cycles)."""
    with Journal.connect(database_url) as journal:
        orders = {o.client_order_id: (o.symbol, o.status.value, o.quantity) for o in journal.orders_on(DAY)}
        stops = {s: (row.stop_loss, row.source) for s, row in journal.protective_stops().items()}
        return orders, stops, len(journal.cycles_on(DAY))


# ------------------------------------------------------------------------------------------ the acceptance


def test_backup_drop_restore_and_the_next_cycle_places_nothing_twice_and_the_guard_knows_the_stops(
    project_env: dict[str, str], database_url: str, postgres_admin_dsn: str, backups: Path, tmp_path: Path
) -> None:
    state = tmp_path / "var" / "sim" / "state.json"
    first = run_agent("--broker", "sim", "--brain", "rules", "--now", at("10:15"), env=project_env)
    assert first.returncode == 0, first.output
    guard = run_agent("--guard", "--broker", "sim", "--now", at("10:20"), env=project_env)
    assert guard.returncode == 0, guard.output
    orders, stops, cycles = snapshot(database_url)
    bought = {symbol for symbol, status, _ in orders.values() if status == "filled"}
    assert bought and set(stops) == bought and cycles == 2, (orders, stops)  # precondition: a journal worth keeping
    assert all(source == "entry" for _, source in stops.values())

    made = script(BACKUP, env=project_env)

    assert made.returncode == 0, made.stdout + made.stderr
    (dump,) = backups.iterdir()  # no temporary file left beside it
    assert NAME.match(dump.name) and "verified" in made.stdout
    assert {"orders", "protective_stops", "cycles"} <= set(verify_dump(dump, pg_tools(load_settings())))

    recreate_empty(postgres_admin_dsn, database_url)
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone() == (0,)

    restored = script(RESTORE, str(dump), env=project_env)

    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert f"restored {dump}" in restored.stdout
    assert snapshot(database_url) == (orders, stops, cycles)

    at_broker_before = SimBroker(sim_at(at("10:45"), state)).orders()
    nxt = run_agent("--broker", "sim", "--brain", "rules", "--now", at("10:45"), env=project_env)
    assert nxt.returncode == 0, nxt.output
    at_broker = SimBroker(sim_at(at("10:45"), state)).orders()
    ids = [o.client_order_id for o in at_broker]
    assert len(ids) == len(set(ids))  # nothing sent twice
    buys = [o.symbol for o in at_broker if o.side == "buy"]
    assert all(buys.count(symbol) == 1 for symbol in bought), buys  # nothing bought again
    assert {o.client_order_id for o in at_broker_before} <= set(ids)
    after_orders, after_stops, _ = snapshot(database_url)
    assert all(after_orders[cid] == row for cid, row in orders.items())  # the journal still knows every order
    assert {s: after_stops[s] for s in stops} == stops  # same stops, not re-adopted under a default
    with Journal.connect(database_url) as journal:
        assert "reconciliation_mismatch" not in [a.event for a in journal.alerts_since(SINCE)]

    # The guard enforces the restored stop: a drop through it closes the position.
    symbol = sorted(bought)[0]
    SimBroker(sim_at(at("10:45"), state)).exchange.apply_shock(symbol, -0.15)
    enforced = run_agent("--guard", "--broker", "sim", "--now", at("10:50"), env=project_env)
    assert enforced.returncode == 0, enforced.output
    assert symbol not in {p.symbol for p in SimBroker(sim_at(at("10:50"), state)).positions()}
    with Journal.connect(database_url) as journal:
        guard_cycles = [c for c in journal.cycles_on(DAY) if c.mode == "guard"]
        assert "stop loss" in (guard_cycles[-1].summary or ""), guard_cycles[-1].summary
        assert symbol not in journal.protective_stops()


# -------------------------------------------------------------------------------------------- refusals


def test_restore_refuses_a_journal_with_data_and_with_force_keeps_a_dump_of_it_first(
    project_env: dict[str, str], journal: Journal, database_url: str, backups: Path
) -> None:
    journal.upsert_protective_stop("HK.00700", quantity=100, entry_price=Decimal(400), stop_loss=Decimal(380))
    assert script(BACKUP, env=project_env).returncode == 0
    (dump,) = backups.iterdir()
    journal.upsert_protective_stop("HK.00005", quantity=400, entry_price=Decimal(60), stop_loss=Decimal(57))

    refused = script(RESTORE, str(dump), env=project_env)

    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "restore refused" in refused.stderr and "is not empty (0 cycles, 0 orders, 2 protective_stops" in (
        refused.stderr
    )
    assert "--force" in refused.stderr
    assert set(journal.protective_stops()) == {"HK.00700", "HK.00005"}  # nothing changed
    assert list(backups.iterdir()) == [dump]

    forced = script(RESTORE, str(dump), "--force", env=project_env)

    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert set(journal.protective_stops()) == {"HK.00700"}  # the journal is the backup's again
    (saved,) = backups.glob("pre-restore-*.dump")
    assert f"saved to {saved}" in forced.stdout
    # ... and what it replaced comes back; that restore keeps its own pre-restore dump beside the first one,
    # never over it, even within the same second (the file being restored must not be overwritten).
    assert script(RESTORE, str(saved), "--force", env=project_env).returncode == 0
    assert saved.exists() and len(list(backups.glob("pre-restore-*.dump"))) == 2
    assert set(journal.protective_stops()) == {"HK.00700", "HK.00005"}


def test_restore_refuses_while_an_agent_run_holds_the_account_lock(
    project_env: dict[str, str], journal: Journal, database_url: str, backups: Path
) -> None:
    assert script(BACKUP, env=project_env).returncode == 0
    (dump,) = backups.iterdir()
    with Journal.connect(database_url) as agent:
        assert agent.try_lock("sim:sim", "trade run abc pid 4242") is None

        refused = script(RESTORE, str(dump), "--force", env=project_env)

    assert refused.returncode == 2
    assert "An agent run is using the journal" in refused.stderr and "trade run abc pid 4242" in refused.stderr
    assert list(backups.iterdir()) == [dump]  # not even the pre-restore dump was written


def test_restore_refuses_a_missing_file_and_a_file_that_is_not_a_dump(
    project_env: dict[str, str], journal: Journal, tmp_path: Path
) -> None:
    journal.upsert_protective_stop("HK.00700", quantity=100, entry_price=Decimal(400), stop_loss=Decimal(380))
    missing = script(RESTORE, str(tmp_path / "nope.dump"), env=project_env)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    junk = tmp_path / "junk.dump"
    junk.write_text("not a dump\n")
    bad = script(RESTORE, str(junk), "--force", env=project_env)
    assert bad.returncode == 1 and f"Could not read the dump {junk}: pg_restore exited 1" in bad.stderr
    assert set(journal.protective_stops()) == {"HK.00700"}
    usage = script(RESTORE, env=project_env)
    assert usage.returncode == 2 and "which backup?" in usage.stderr


# ------------------------------------------------------------------------------------------- failures


def test_a_backup_into_an_unwritable_folder_fails_loudly_and_alerts(
    project_env: dict[str, str],
    journal: Journal,
    settings_file: Path,
    tmp_path: Path,
    smtp: tuple[LoopbackController, RecordingHandler],
) -> None:
    controller, handler = smtp
    env = cli_env(project_env, settings_file, controller.port)
    blocker = tmp_path / "a-file"
    blocker.write_text("a regular file: nothing can be created under it, not even by root\n")
    set_backup_dir(settings_file, blocker / "backups")

    result = script(BACKUP, env=env)

    assert result.returncode == 1
    assert f"backup FAILED: Could not create the backup folder {blocker / 'backups'}: Not a directory" in (
        result.stderr
    )
    assert "(alert sent)" in result.stderr
    (mail,) = handler.received
    assert mail.message["Subject"] == "[CATALYST HIGH] Journal backup failed"
    assert "Could not create the backup folder" in mail.message.get_content()
    assert [(a.event, a.priority, a.sent) for a in journal.alerts_since(SINCE)] == [("backup_failed", "high", True)]


def test_a_failing_pg_dump_leaves_no_file_and_alerts(
    project_env: dict[str, str], database_url: str, backups: Path, smtp: tuple[LoopbackController, RecordingHandler]
) -> None:
    controller, handler = smtp
    env = cli_env(project_env, Path(project_env["CATALYST_CONFIG"]), controller.port)
    params = conninfo_to_dict(database_url)
    env["DATABASE_URL"] = f"{database_url.replace(params['dbname'], 'no_such_journal')}"

    result = script(BACKUP, env=env)

    assert result.returncode == 1
    assert "Could not dump the journal" in result.stderr and "pg_dump exited 1" in result.stderr
    assert 'database "no_such_journal" does not exist' in result.stderr
    assert list(backups.iterdir()) == []  # no partial file, no half-written dump under a final name
    assert [m.message["Subject"] for m in handler.received] == ["[CATALYST HIGH] Journal backup failed"]


def test_an_empty_database_is_not_taken_for_a_journal_backup(project_env: dict[str, str], backups: Path) -> None:
    result = script(BACKUP, env=project_env)  # the database exists but the agent never ran against it

    assert result.returncode == 1
    assert "holds no data for schema_migrations, cycles, orders, protective_stops" in result.stderr
    assert "(alert NOT sent: alerts are not configured" in result.stderr
    assert list(backups.iterdir()) == []


def test_the_embedded_server_is_backed_up_and_restored_with_its_own_tools(
    settings_file: Path, tmp_path: Path, clean_project_env: None
) -> None:
    folder = traversable_tempdir("catalyst-backup-test-")
    data = yaml.safe_load(settings_file.read_text(encoding="utf-8"))
    data["database"]["embedded_dir"] = str(folder / "pg")
    data["backup"]["dir"] = str(tmp_path / "backups")
    settings_file.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    env = dict(os.environ, CATALYST_CONFIG=str(settings_file))
    try:
        run = run_agent("--dry-run", "--broker", "sim", "--brain", "rules", "--now", at("10:15"), env=env)
        assert run.returncode == 0, run.output

        made = script(BACKUP, env=env)
        assert made.returncode == 0, made.stdout + made.stderr
        (dump,) = (tmp_path / "backups").iterdir()

        refused = script(RESTORE, str(dump), env=env)
        assert refused.returncode == 2 and "is not empty (1 cycles" in refused.stderr
        forced = script(RESTORE, str(dump), "--force", env=env)
        assert forced.returncode == 0, forced.stdout + forced.stderr
        assert "(1 cycles, " in forced.stdout
    finally:
        stop_embedded_server(folder / "pg")
        subprocess.run(["rm", "-rf", str(folder)], check=False)


# ------------------------------------------------------------------------------------------- retention


def hkt(day: str, hhmm: str = "16:30") -> datetime:
    return datetime.fromisoformat(f"{day}T{hhmm}:00+08:00").astimezone(UTC)


def test_retention_keeps_the_newest_of_each_recent_day_and_week() -> None:
    # Nightly backups for 60 days (Nov 2026 back into September), plus a second one on the last day.
    nightly = [hkt("2026-11-20") - timedelta(days=n) for n in range(60)]
    extra = hkt("2026-11-20", "18:00")

    keep = backups_to_keep([*nightly, extra], keep_daily=14, keep_weekly=8)

    assert extra in keep and hkt("2026-11-20") not in keep  # the newest of the day, not both
    daily = {hkt("2026-11-20") - timedelta(days=n) for n in range(1, 14)} | {extra}
    assert daily <= keep  # 14 days
    weekly = keep - daily
    # The newest of each of the 8 latest ISO weeks: the three latest weeks are inside the 14 days already; the
    # other five are their Sundays (the newest backup of a week that ended).
    assert sorted(s.astimezone(UTC).date() for s in weekly) == [
        date(2026, 10, 4), date(2026, 10, 11), date(2026, 10, 18), date(2026, 10, 25), date(2026, 11, 1),
    ]  # fmt: skip
    assert len(keep) == 14 + 5


@pytest.mark.parametrize(
    ("keep_daily", "keep_weekly", "kept"),
    [
        (1, 0, 1),  # only the newest
        (3, 0, 3),  # three days
        (1, 2, 2),  # the newest, and the newest of the week before
        (60, 0, 10),  # more days wanted than there are backups: all of them
    ],
)
def test_retention_table(keep_daily: int, keep_weekly: int, kept: int) -> None:
    stamps = [hkt("2026-11-20") - timedelta(days=n) for n in range(10)]  # Fri 20 back to Wed 11
    assert len(backups_to_keep(stamps, keep_daily, keep_weekly)) == kept


def test_apply_retention_deletes_only_old_journal_backups(tmp_path: Path) -> None:
    stamps = [hkt("2026-11-20") - timedelta(days=n) for n in range(30)]
    for stamp in stamps:
        (tmp_path / backup_name(stamp)).write_bytes(b"")
    others = ["pre-restore-20260101T000000Z.dump", "notes.txt", ".journal-20261120T083000Z.dump.partial"]
    for name in others:
        (tmp_path / name).write_text("keep me")

    deleted = apply_retention(tmp_path, keep_daily=7, keep_weekly=3)

    remaining = {p.name for p in tmp_path.iterdir()}
    assert set(others) <= remaining
    kept = sorted(remaining - set(others))
    assert kept == sorted(backup_name(s) for s in backups_to_keep(stamps, 7, 3))
    assert len(kept) == 7 + 1  # a week of nightlies (Sat 14 - Fri 20), plus Sunday 8 for the week before
    assert len(deleted) == 30 - len(kept)
