"""What a person at the console sees when a run fails for a known reason (exit 2, 3, 5): what happened and what
to do, no traceback. The traceback stays in the JSON log file, and ``-v`` or ``CATALYST_RAISE=1`` shows it.

Real ``agent.py`` processes, as cron starts them.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import yaml

from data.database import Journal
from tests.agent_runner import IN_SESSION, AgentRun, run_agent


def logged_events(log_dir: Path, event: str) -> list[dict]:
    """Every JSON line with this event name in the run's log files."""
    found = []
    for path in sorted(log_dir.glob("agent-*.log")):
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if record.get("event") == event:
                found.append(record)
    return found


def assert_clean_console(run: AgentRun, code: int, message: str) -> None:
    assert run.returncode == code, run.output
    assert message in run.output, run.output
    assert "Traceback" not in run.output, run.output
    assert 'File "' not in run.output, run.output  # no frame lines either


def test_bad_now_prints_the_message_and_logs_the_traceback(project_env: dict[str, str], tmp_path: Path) -> None:
    run = run_agent("--broker", "sim", "--brain", "rules", "--now", "tomorrow-ish", env=project_env)
    assert_clean_console(run, 2, "--now 'tomorrow-ish' is not an ISO-8601 time; write e.g. 2026-11-20T10:15:00+08:00")
    (failed,) = logged_events(tmp_path / "logs", "run_failed")  # the settings' log folder, though --now failed
    assert failed["exit_code"] == 2 and failed["error_class"] == "ConfigError"
    assert failed["traceback"].startswith("Traceback (most recent call last)")
    assert "parse_now" in failed["traceback"]
    assert "file_only" not in failed


def test_verbose_and_catalyst_raise_show_the_traceback_on_the_console(project_env: dict[str, str]) -> None:
    verbose = run_agent("-v", "--broker", "sim", "--brain", "rules", "--now", "tomorrow-ish", env=project_env)
    assert verbose.returncode == 2, verbose.output
    assert "Traceback (most recent call last)" in verbose.output and "parse_now" in verbose.output
    raised = run_agent(
        "--broker", "sim", "--brain", "rules", "--now", "tomorrow-ish", env={**project_env, "CATALYST_RAISE": "1"}
    )
    assert "Traceback (most recent call last)" in raised.output and "ConfigError" in raised.output


def test_invalid_setting_prints_the_key_and_logs_the_traceback(
    project_env: dict[str, str], settings_file: Path, tmp_path: Path
) -> None:
    data = yaml.safe_load(settings_file.read_text())
    data["risk"]["max_position_pct"] = 3
    settings_file.write_text(yaml.safe_dump(data))
    run = run_agent("--dry-run", "--brain", "rules", "--now", IN_SESSION, env=project_env)
    assert_clean_console(run, 2, "risk.max_position_pct = 3")
    (failed,) = logged_events(tmp_path / "logs", "run_failed")  # agent.log_dir is read although risk is invalid
    assert "load_settings" in failed["traceback"]


def test_opend_down_prints_what_to_do_and_logs_the_traceback(project_env: dict[str, str], tmp_path: Path) -> None:
    with socket.socket() as s:  # a loopback port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(project_env, OPEND_HOST="127.0.0.1", OPEND_PORT=str(port))
    run = run_agent("--broker", "futu", "--brain", "rules", "--now", IN_SESSION, env=env)
    assert_clean_console(run, 3, "docker compose -f docker-compose.opend.yml up -d")
    (failed,) = logged_events(tmp_path / "logs", "run_failed")
    assert failed["error_class"] == "BrokerUnavailable" and "check_reachable" in failed["traceback"]


def test_lock_held_prints_who_holds_it_and_logs_the_traceback(
    project_env: dict[str, str], journal: Journal, tmp_path: Path
) -> None:
    assert journal.try_lock("sim:sim", "a test holding the account") is None  # same database as the agent's
    run = run_agent("--dry-run", "--broker", "sim", "--brain", "rules", "--now", IN_SESSION, env=project_env)
    assert_clean_console(run, 5, "holds the lock for sim:sim: a test holding the account")
    (held,) = logged_events(tmp_path / "logs", "lock_held")
    assert "LockHeld" in held["traceback"]
