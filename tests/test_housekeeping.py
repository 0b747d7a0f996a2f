"""Log retention, size rotation and the free-disk checks: real files, real ``agent.py`` runs, the real health
check script; "low disk" is a threshold set above the machine's real free space, never a faked measurement."""

from __future__ import annotations

import gzip
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

import pytest
import yaml

from config.settings import PROJECT_ROOT
from data.database import Journal
from data.housekeeping import MB, apply_log_retention, rotate_by_size
from tests.agent_runner import IN_SESSION, run_agent
from tests.test_alerts import SINCE, LoopbackController, RecordingHandler, cli_env
from tests.test_scripts import Health, tcp_server  # noqa: F401  (tcp_server is a fixture)

TODAY = date(2026, 11, 20)


def edit_settings(settings_file: Path, section: str, **values: object) -> None:
    data = yaml.safe_load(settings_file.read_text(encoding="utf-8"))
    data[section].update(values)
    settings_file.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def more_than_free_mb(path: Path) -> int:
    """A threshold this machine's disk cannot meet: its real free space plus a terabyte."""
    return shutil.disk_usage(path).free // MB + 1_000_000


@pytest.fixture
def smtp() -> Iterator[tuple[LoopbackController, RecordingHandler]]:
    handler = RecordingHandler()
    controller = LoopbackController(handler)
    controller.start()
    yield controller, handler
    controller.stop()


# ------------------------------------------------------------------------------------------ a full disk


def test_a_full_disk_fails_the_cycle_before_any_order_or_journal_row_and_alerts(
    project_env: dict[str, str],
    journal: Journal,
    settings_file: Path,
    tmp_path: Path,
    smtp: tuple[LoopbackController, RecordingHandler],
) -> None:
    controller, handler = smtp
    env = cli_env(project_env, settings_file, controller.port)
    edit_settings(settings_file, "housekeeping", min_free_disk_mb=more_than_free_mb(tmp_path))

    run = run_agent("--broker", "sim", "--brain", "rules", "--now", IN_SESSION, env=env)

    assert run.returncode == 1, run.output
    assert "DiskSpaceLow: Not starting the trade cycle:" in run.output
    assert "below housekeeping.min_free_disk_mb" in run.output and "No order was sent" in run.output
    assert journal.cycles_on(TODAY) == [] and journal.orders_on(TODAY) == []
    assert not (tmp_path / "var" / "sim" / "state.json").exists()  # the simulated broker was never opened
    assert [m.message["Subject"] for m in handler.received] == ["[CATALYST HIGH] Cycle failed"]
    assert "Not starting the trade cycle" in handler.received[0].message.get_content()

    edit_settings(settings_file, "housekeeping", min_free_disk_mb=1)  # space freed: the next cycle runs
    again = run_agent("--broker", "sim", "--brain", "rules", "--now", IN_SESSION, env=env)
    assert again.returncode == 0, again.output
    assert [c.status for c in journal.cycles_on(TODAY)] == ["ok"]


def test_the_guard_still_runs_on_a_low_disk_and_says_so(
    project_env: dict[str, str], journal: Journal, settings_file: Path, tmp_path: Path
) -> None:
    edit_settings(settings_file, "housekeeping", min_free_disk_mb=more_than_free_mb(tmp_path))

    run = run_agent("--guard", "--broker", "sim", "--now", IN_SESSION, env=project_env)

    assert run.returncode == 0, run.output
    assert "disk_space_low" in run.output
    assert [c.mode for c in journal.cycles_on(TODAY)] == ["guard"]


# ------------------------------------------------------------------------------------------ log retention


def write_log(folder: Path, day: date, text: str) -> Path:
    path = folder / f"agent-{day:%Y%m%d}.log"
    path.write_text(text, encoding="utf-8")
    return path


def test_old_agent_logs_are_compressed_then_deleted_and_nothing_else_is_touched(tmp_path: Path) -> None:
    ages = {0: "today", 1: "yesterday", 7: "a week", 8: "eight days", 30: "a month", 90: "ninety", 91: "too old"}
    for age, text in ages.items():
        write_log(tmp_path, TODAY - timedelta(days=age), f'{{"event": "{text}"}}\n')
    old_gz = tmp_path / f"agent-{TODAY - timedelta(days=120):%Y%m%d}.log.gz"
    old_gz.write_bytes(gzip.compress(b"old\n"))
    others = {"cron.log": "cron\n", "agent-notes.log": "mine\n", "health.log": "health\n"}
    for name, text in others.items():
        (tmp_path / name).write_text(text)

    result = apply_log_retention(tmp_path, TODAY, compress_after_days=7, delete_after_days=90)

    names = {p.name for p in tmp_path.iterdir()}
    day = {age: f"agent-{TODAY - timedelta(days=age):%Y%m%d}.log" for age in ages}
    assert {day[0], day[1], day[7]} <= names  # young logs stay plain (7 days old is not "older than 7")
    for age in (8, 30, 90):
        assert day[age] not in names
        assert gzip.decompress((tmp_path / f"{day[age]}.gz").read_bytes()).decode() == f'{{"event": "{ages[age]}"}}\n'
    assert day[91] not in names and old_gz.name not in names
    assert set(others) <= names and not any(n.endswith(".partial") for n in names)
    assert sorted(p.name for p in result.deleted) == sorted([day[91], old_gz.name])
    assert len(result.compressed) == 3


def test_size_rotation_keeps_the_newest_plain_and_older_ones_gzipped_up_to_the_limit(tmp_path: Path) -> None:
    log = tmp_path / "cron.log"
    log.write_text("small\n")
    assert rotate_by_size(log, max_bytes=100, keep=3) is False  # under the size: untouched
    for generation in range(1, 5):
        log.write_text(f"generation {generation}\n" * 20)
        assert rotate_by_size(log, max_bytes=100, keep=3) is True

    assert not log.exists()  # the next cron line creates it again
    assert (tmp_path / "cron.log.1").read_text().startswith("generation 4\n")
    assert gzip.decompress((tmp_path / "cron.log.2.gz").read_bytes()).decode().startswith("generation 3\n")
    assert gzip.decompress((tmp_path / "cron.log.3.gz").read_bytes()).decode().startswith("generation 2\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cron.log.1", "cron.log.2.gz", "cron.log.3.gz"]


def test_the_housekeeping_command_applies_the_settings(settings_file: Path, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    old = write_log(logs, date.today() - timedelta(days=10), "old\n")
    (logs / "health.log").write_text("x" * (2 * MB))
    edit_settings(settings_file, "housekeeping", rotate_log_mb=1)

    done = subprocess.run(
        [sys.executable, "-m", "data.housekeeping", "--config", str(settings_file)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert "1 log(s) compressed, 0 deleted, 1 rotated" in done.stdout
    assert not old.exists() and old.with_name(old.name + ".gz").exists()
    assert (logs / "health.log.1").stat().st_size == 2 * MB and not (logs / "health.log").exists()


def test_bad_retention_settings_are_refused(settings_file: Path) -> None:
    edit_settings(settings_file, "housekeeping", compress_logs_after_days=30, delete_logs_after_days=10)
    done = subprocess.run(
        [sys.executable, "-m", "data.housekeeping", "--config", str(settings_file)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert "housekeeping.delete_logs_after_days = 10: Value error, must be greater than" in done.stderr


# ------------------------------------------------------------------------------------------ health check


def test_the_health_check_reports_free_disk_and_alerts_once_when_it_is_low(
    project_env: dict[str, str],
    settings_file: Path,
    journal: Journal,
    tmp_path: Path,
    tcp_server: int,  # noqa: F811
    smtp: tuple[LoopbackController, RecordingHandler],
) -> None:
    controller, handler = smtp
    cli_env(project_env, settings_file, controller.port)
    check = Health(project_env, tmp_path, tcp_server)
    del check.env["CATALYST_DISK_CHECK_CMD"]  # the real one: python -m data.housekeeping --disk

    healthy = check()

    assert healthy.returncode == 0, healthy.stdout
    assert "alert=none disk=ok" in check.lines[-1] and "MB free on the filesystem of" in check.lines[-1]

    edit_settings(settings_file, "housekeeping", warn_free_disk_mb=more_than_free_mb(tmp_path))
    low = check()

    assert low.returncode == 1
    assert "status=unhealthy opend=ok" in check.lines[-1] and "alert=sent disk=low" in check.lines[-1]
    assert [m.message["Subject"] for m in handler.received] == [
        f"[CATALYST HIGH] Low disk space on {socket.gethostname()}"
    ]
    assert [a.event for a in journal.alerts_since(SINCE)] == ["disk_space"]

    still_low = check()  # five minutes later: no second e-mail within CATALYST_HEALTH_DISK_ALERT_EVERY_S

    assert still_low.returncode == 1 and "alert=none disk=low" in check.lines[-1]
    assert len(handler.received) == 1
