"""Run ``agent.py`` as a real subprocess, the way cron does, and read what it journalled."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path

from brokers.sim import SimExchange
from config.settings import PROJECT_ROOT

AGENT = PROJECT_ROOT / "agent.py"
# A Friday in continuous trading; the sim and the calendar agree it is a normal trading day.
IN_SESSION = "2026-11-20T10:15:00+08:00"


@dataclass(frozen=True)
class AgentRun:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_agent(*args: str, env: dict[str, str], timeout_s: float = 240, cwd: Path = PROJECT_ROOT) -> AgentRun:
    """Run ``python agent.py ARGS`` to completion (a generous timeout guards against a hang, not slowness)."""
    done = subprocess.run(
        [sys.executable, str(AGENT), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    return AgentRun(done.returncode, done.stdout, done.stderr)


def sim_at(now: str, state_file: Path | None = None) -> SimExchange:
    """The deterministic market the agent sees at ``now`` with the shipped sim settings (seed 42, HK$1m).

    With ``state_file`` it is the same paper account too (the agent's book), e.g. to place or shock from a test.
    """
    moment = datetime.fromisoformat(now)
    return SimExchange(seed=42, clock=lambda: moment, state_file=state_file, starting_cash=Decimal(1_000_000))
