"""Failures from outside, with real processes: the journal down, the model API failing, two instances."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest
import yaml
from aiosmtpd.controller import Controller

from data.database import Journal
from tests.agent_runner import AGENT, IN_SESSION, run_agent
from tests.fakes.messages_api import FakeMessagesAPI, message, text


class Inbox:
    """An aiosmtpd handler that keeps what it receives."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(envelope.content.decode("utf-8", "replace"))
        return "250 OK"


@pytest.fixture
def smtp_inbox(settings_file: Path) -> Iterator[Inbox]:
    """A real SMTP server on loopback; the test's settings send alerts to it (no STARTTLS)."""
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        data = yaml.safe_load(settings_file.read_text())
        data["alerts"].update(
            smtp_host="127.0.0.1", smtp_port=controller.port, starttls=False,
            email="owner@example.com",
        )  # fmt: skip
        settings_file.write_text(yaml.safe_dump(data))
        yield inbox
    finally:
        controller.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_journal_unreachable_exits_with_an_alert_and_no_order(
    project_env: dict[str, str], smtp_inbox: Inbox, tmp_path: Path
) -> None:
    env = dict(project_env, DATABASE_URL=f"postgresql://catalyst:s3cret-pw@127.0.0.1:{free_port()}/catalyst")
    run = run_agent("--broker", "sim", "--brain", "rules", "--now", IN_SESSION, env=env)
    assert run.returncode == 1, run.output
    assert "Could not connect to the PostgreSQL journal" in run.output
    assert "s3cret-pw" not in run.output
    assert len(smtp_inbox.messages) == 1 and "Cycle failed" in smtp_inbox.messages[0]
    assert "s3cret-pw" not in smtp_inbox.messages[0]
    assert not (tmp_path / "var" / "sim" / "state.json").exists()  # the exchange was never even opened


def test_model_api_overloaded_then_timing_out_ends_the_cycle_as_error(
    project_env: dict[str, str], journal: Journal, settings_file: Path
) -> None:
    data = yaml.safe_load(settings_file.read_text())
    data["claude"]["request_timeout_s"] = 1
    settings_file.write_text(yaml.safe_dump(data))
    with FakeMessagesAPI() as api:
        api.enqueue_error(529, "overloaded_error", "Overloaded")
        for _ in range(4):  # the SDK's first try after the 529 and its retries all time out
            api.enqueue_delay(5)
        run = run_agent("--broker", "sim", "--brain", "claude", "--now", IN_SESSION, env={**project_env, **api.env()})
        attempts = len(api.requests)
    assert run.returncode == 1, run.output
    assert "ModelUnavailable" in run.output
    assert attempts >= 2  # the 529 was retried by the SDK itself
    (cycle,) = journal.cycles_on(date(2026, 11, 20))
    assert cycle.status == "error" and "Claude API unreachable" in (cycle.error or "")
    assert journal.orders_on(date(2026, 11, 20)) == []


def test_two_agents_started_together_one_runs_the_other_exits_5(project_env: dict[str, str], journal: Journal) -> None:
    import threading

    second_done = threading.Event()

    def hold_until_the_second_agent_is_done(_body: dict) -> dict:
        second_done.wait(timeout=120)  # the first agent sits in its model call, holding the lock
        return message([text("Nothing to do.")])

    with FakeMessagesAPI() as api:
        api.enqueue(hold_until_the_second_agent_is_done)
        env = {**project_env, **api.env()}
        first = subprocess.Popen(
            [sys.executable, str(AGENT), "--broker", "sim", "--brain", "claude", "--now", IN_SESSION],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while not api.requests and first.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)  # the first agent holds the lock once it talks to the model
            assert api.requests, "the first agent never reached the model"
            second = run_agent("--dry-run", "--broker", "sim", "--brain", "rules", "--now", IN_SESSION, env=env)
            second_done.set()
            out, _ = first.communicate(timeout=120)
        finally:
            second_done.set()
            if first.poll() is None:
                first.kill()
    assert second.returncode == 5, second.output
    assert "holds the lock for sim:sim" in second.output and "since" in second.output
    assert first.returncode == 0, out
    cycles = journal.cycles_on(date(2026, 11, 20))
    assert [c.mode for c in cycles] == ["trade"]  # the second never started a cycle
