#!/usr/bin/env python3
"""Benchmark one trading cycle: time outside the model, gateway requests, tokens sent to the model, start-up.

Everything runs offline on loopback, as in the tests: the real ``agent.py`` process (``--broker futu --brain
claude``) talks to the fake OpenD (``tests/fakes/opend.py``, backed by the simulated exchange frozen at
2026-11-20 10:15 HKT) through the real futu-api, to the fake Messages API (``tests/fakes/messages_api.py``)
through the real anthropic SDK, and to a real PostgreSQL (embedded ``pgserver`` in a temporary folder, or a
new database on ``DATABASE_URL`` when that is set).

The model's side is scripted: a realistic 12-tool-call cycle in 8 turns (get_portfolio; scan_market ALL;
quote, technicals, patterns and news of the top candidate; quote, technicals and patterns of the second;
check_risk; execute_trade; log_decision; a final summary). The script reads the tool results it was sent, so
its check_risk and execute_trade are real, sized and on the tick grid.

How each figure is measured:

- cycle wall time: the whole ``agent.py`` process, spawn to exit (cron pays all of it), median of N cycles;
  also split, from the cycle's own log lines, into start-up (spawn -> ``run_started``), the cycle
  (``run_started`` -> ``cycle_finished``) and exit.
- model wait: measured on the fake Messages API's side, per request, from the parsed request line to the last
  byte of the reply, summed over the cycle. The fake answers at once, so this is almost only its own
  validation and cache accounting; the SDK's client-side work (serialising, connecting) counts as agent time.
  "overhead outside the model" = wall time - model wait.
- gateway requests: every request the fake OpenD received during the cycle, by Futu proto id (connection
  handshakes included and shown). By default the model answers at once, so the short-lived quote cache is as
  effective as it can be; with a real model's seconds per turn (``--think-ms``), quotes older than the TTL are
  read again.
- tokens: bytes of the request bodies sent to /v1/messages, and the fake's token estimate (UTF-8 bytes / 4 per
  block) with its prompt-cache accounting. The cache is cleared before every cycle: real cycles run hours
  apart, past the cache's 5-minute lifetime. "Under cache breakpoints" = (cache read + cache write) / all input.
- guard pass and ``--help``: whole processes, median of a few runs.
- start-up imports: one extra run each of the cycle, the guard and ``--help`` under ``python -X importtime``,
  module self times summed per top-level package (importtime itself slows imports down a little).

``--naive`` runs the same cycles a second time, in a fresh database and exchange, with prompt caching off and
(when the settings have ``agent.market_batching``) one gateway request per symbol, no quote, market-state or
constituent cache; it prints every figure next to its naive value and the ratio. Improvements outside the
market data layer (the account id pinned once per run, fewer account reads) are in both runs.

    python scripts/bench.py                 # 5 cycles
    python scripts/bench.py --naive         # and the naive comparison
    python scripts/bench.py --cycles 1 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_DOWN, Decimal
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from tests.pg import stop_embedded_server, traversable_tempdir  # noqa: E402 - after the path is set

AGENT = PROJECT_ROOT / "agent.py"
NOW_TEXT = "2026-11-20T10:15:00+08:00"  # a Friday in continuous trading (the sim and the calendar agree)
EXPECTED_TOOL_CALLS = 12
MIN_CACHEABLE_TOKENS = 1024  # the real API's minimum cacheable prefix for Sonnet
RUN_TIMEOUT_S = 180  # guards against a hang, not slowness

TARGETS = {
    "overhead_ms": 300.0,
    "gateway_requests": 15,
    "cached_share_pct": 70.0,
    "guard_ms": 2000.0,
    "help_ms": 500.0,
}

# Futu proto ids (the fake OpenD serves these) and the names printed for them.
PROTO_NAMES: dict[int, str] = {
    1001: "init_connect",
    1002: "global_state",
    1004: "keep_alive",
    2001: "acc_list",
    2005: "unlock_trade",
    2008: "sub_acc_push",
    2101: "funds",
    2102: "positions",
    2201: "orders",
    2202: "place_order",
    2205: "modify_order",
    2221: "history_orders",
    3103: "history_kline",
    3203: "snapshot",
    3205: "plate_stock",
    3223: "market_state",
    3263: "news",
}
HANDSHAKES = frozenset({"init_connect", "keep_alive"})
KL_DAILY = 2  # Qot_Common.KLType_Day

PROJECT_ENV_VARS = (
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_BASE_URL",
    "DATABASE_URL",
    "OPEND_HOST",
    "OPEND_PORT",
    "FUTU_TRADE_PWD",
    "CATALYST_CONFIG",
    "CATALYST_RAISE",
    "SMTP_HOST",
    "SMTP_PORT",
    "SMTP_USER",
    "SMTP_PASS",
    "SMTP_PASSWORD",
    "ALERT_EMAIL",
    "ALERT_FROM",
)


class BenchError(RuntimeError):
    """The benchmark could not run (an agent run failed, PostgreSQL did not start ...). The text says which."""


# ==============================================================================================================
# The scripted model
# ==============================================================================================================


def _conversation(messages: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], Any]]:
    """(tool name, input, parsed result) of every answered tool call so far, in order."""
    calls: dict[str, tuple[str, dict[str, Any]]] = {}
    order: list[str] = []
    results: dict[str, Any] = {}
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for block in content:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "tool_use":
                calls[block["id"]] = (block["name"], block.get("input") or {})
                order.append(block["id"])
            elif block.get("type") == "tool_result":
                raw = block.get("content")
                if isinstance(raw, list):  # [{"type": "text", "text": ...}]
                    raw = "".join(b.get("text", "") for b in raw if isinstance(b, dict))
                try:
                    results[block["tool_use_id"]] = json.loads(raw) if isinstance(raw, str) else raw
                except ValueError:
                    results[block["tool_use_id"]] = raw
    return [(calls[i][0], calls[i][1], results.get(i)) for i in order if i in results]


class ScriptedTrader:
    """Claude's half of a realistic cycle, decided from the request alone (an SDK retry gets the same turn).

    Turns: portfolio; scan; four reads of candidate A; three of candidate B; check_risk A; execute_trade A;
    log_decision; a closing summary. 12 tool calls in 8 model requests.
    """

    def __init__(self, think_s: float = 0.0) -> None:
        self._ids = 0
        self._lock = threading.Lock()
        self._think_s = think_s  # how long the "model" takes per turn (0: answers at once)

    def _id(self) -> str:
        with self._lock:
            self._ids += 1
            return f"toolu_bench_{self._ids:06d}_{uuid.uuid4().hex[:8]}"

    def _turn(self, prose: str, *calls: tuple[str, dict[str, Any]]) -> dict[str, Any]:
        content: list[dict[str, Any]] = [{"type": "text", "text": prose}]
        content += [{"type": "tool_use", "id": self._id(), "name": name, "input": args} for name, args in calls]
        return {"content": content, "stop_reason": "tool_use" if calls else "end_turn"}

    def _end(self, prose: str) -> dict[str, Any]:
        return self._turn(prose)

    def __call__(self, body: dict[str, Any]) -> dict[str, Any]:
        if self._think_s > 0:
            time.sleep(self._think_s)
        messages = body.get("messages") or []
        step = sum(1 for m in messages if m.get("role") == "assistant")
        done = _conversation(messages)
        by_name: dict[str, list[tuple[dict[str, Any], Any]]] = {}
        for name, args, result in done:
            by_name.setdefault(name, []).append((args, result))
        if step == 0:
            return self._turn(
                "Starting the cycle: first the account, cash and open positions, so sizing respects the caps.",
                ("get_portfolio", {}),
            )
        if step == 1:
            return self._turn(
                "Account read. Scanning all three Hang Seng indexes for momentum with volume confirmation.",
                ("scan_market", {"index": "ALL", "limit": 10}),
            )
        scan = (by_name.get("scan_market") or [({}, None)])[-1][1]
        candidates = [c["symbol"] for c in (scan or {}).get("candidates", []) if isinstance(c, dict)]
        if len(candidates) < 2:
            return self._end(f"(bench script) the scan gave fewer than two candidates: {scan!r}; stopping.")
        a, b = candidates[0], candidates[1]
        if step == 2:
            return self._turn(
                f"{a} ranks first on momentum and volume. Checking its quote, daily technicals, 5-minute patterns "
                "and the last day's news before deciding.",
                ("get_quote", {"symbol": a}),
                ("get_technicals", {"symbol": a, "timeframe": "1d"}),
                ("detect_patterns", {"symbol": a, "timeframe": "5m"}),
                ("get_news", {"symbol": a, "hours": 24}),
            )
        if step == 3:
            return self._turn(
                f"{a} looks constructive. Comparing with the runner-up {b} before committing capital.",
                ("get_quote", {"symbol": b}),
                ("get_technicals", {"symbol": b, "timeframe": "1d"}),
                ("detect_patterns", {"symbol": b, "timeframe": "5m"}),
            )
        plan = self._plan(a, by_name)
        if plan is None:
            return self._end(f"(bench script) no usable quote or technicals for {a}; stopping.")
        if step == 4:
            return self._turn(
                f"{a} has the stronger setup. Asking the risk gate about {plan['quantity']} shares at "
                f"{plan['entry_price']} with the stop at {plan['stop_loss']} and the target at {plan['take_profit']}.",
                ("check_risk", {"symbol": a, "side": "buy", **plan}),
            )
        verdict = (by_name.get("check_risk") or [({}, None)])[-1][1]
        approved = isinstance(verdict, dict) and verdict.get("approved") is True
        if approved and "execute_trade" not in by_name:
            return self._turn(
                "Approved. Placing the limit order at the approved entry with the same stop and target.",
                (
                    "execute_trade",
                    {
                        "symbol": a,
                        "side": "buy",
                        "quantity": plan["quantity"],
                        "order_type": "limit",
                        "limit_price": plan["entry_price"],
                        "stop_loss": plan["stop_loss"],
                        "take_profit": plan["take_profit"],
                        "reason": "bench: momentum with volume, constructive daily trend",
                    },
                ),
            )
        if "log_decision" not in by_name:
            order = (by_name.get("execute_trade") or [({}, None)])[-1][1]
            status = order.get("status") if isinstance(order, dict) else "not placed"
            return self._turn(
                "Recording the decision and the reasoning for the journal.",
                (
                    "log_decision",
                    {
                        "decision": f"buy {a}" if approved else "no_trade",
                        "reasoning": f"{a}: scan leader with volume; {b} weaker. Order status: {status}. "
                        f"Risk verdict: {'approved' if approved else verdict}.",
                        "confidence": 0.6,
                    },
                ),
            )
        return self._end(f"Cycle done: analysed {a} and {b}; {'bought ' + a if approved else 'no trade'}.")

    @staticmethod
    def _plan(symbol: str, by_name: dict[str, list[tuple[dict[str, Any], Any]]]) -> dict[str, Any] | None:
        """Entry at the ask, stop 2 ATR below (at most 8 %), target 2.5x the risk, about HK$25,000 of stock."""
        from brokers.base import Side
        from brokers.hkex import round_to_tick

        quote = next((r for a, r in by_name.get("get_quote", []) if a.get("symbol") == symbol), None)
        tech = next((r for a, r in by_name.get("get_technicals", []) if a.get("symbol") == symbol), None)
        if not isinstance(quote, dict) or not isinstance(tech, dict) or "error" in quote:
            return None
        day = datetime.fromisoformat(NOW_TEXT).date()
        tick = Decimal(str(quote["price_spread"])) if quote.get("price_spread") else None
        entry = round_to_tick(Decimal(str(quote.get("ask_price") or quote["last_price"])), Side.BUY, day, tick=tick)
        atr = Decimal(str(tech.get("atr_14") or 0)) or entry * Decimal("0.02")
        risk = min(atr * 2, entry * Decimal("0.08"))
        stop = round_to_tick(entry - risk, Side.BUY, day, tick=tick)
        target = round_to_tick(entry + (entry - stop) * Decimal("2.5"), Side.SELL, day, tick=tick)
        lot = int(quote["lot_size"])
        lots = max(1, int((Decimal(25_000) / (entry * lot)).to_integral_value(rounding=ROUND_DOWN)))
        return {
            "quantity": lots * lot,
            "entry_price": float(entry),
            "stop_loss": float(stop),
            "take_profit": float(target),
        }


def timed_messages_api(responder: Any) -> Any:
    """A FakeMessagesAPI that also records how long it took to answer each request (its side of the wait)."""
    from tests.fakes.messages_api import FakeMessagesAPI

    class TimedMessagesAPI(FakeMessagesAPI):
        def __init__(self) -> None:
            super().__init__(responder=responder, strict_tools=True, min_cacheable_tokens=MIN_CACHEABLE_TOKENS)
            self.answer_s: list[float] = []  # one per handled request, in order of completion
            self._timing_lock = threading.Lock()

        def _handle(self, handler: Any) -> None:
            started = time.perf_counter()
            try:
                super()._handle(handler)
            finally:
                with self._timing_lock:
                    self.answer_s.append(time.perf_counter() - started)

    return TimedMessagesAPI()


# ==============================================================================================================
# PostgreSQL and the workspace
# ==============================================================================================================


class Workspace:
    """A temporary folder and a PostgreSQL server whose databases are created per benchmark mode."""

    def __init__(self, keep: bool = False) -> None:
        self.keep = keep
        self.folder = traversable_tempdir("catalyst-bench-")
        self._server: Any = None
        self._admin_dsn = os.environ.get("DATABASE_URL") or None
        self._created: list[str] = []

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def admin_dsn(self) -> str:
        if self._admin_dsn is not None:
            return self._admin_dsn
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver

            try:
                self._server = pgserver.get_server(self.folder / "pg", cleanup_mode="stop")
            except Exception as exc:
                raise BenchError(
                    f"Could not start the embedded PostgreSQL in {self.folder / 'pg'}: {type(exc).__name__}: {exc}. "
                    "Set DATABASE_URL to a server whose user may CREATE DATABASE instead."
                ) from exc
        self._admin_dsn = str(self._server.get_uri("postgres"))
        return self._admin_dsn

    def new_database(self) -> str:
        """A fresh database, migrated, as a DSN."""
        import psycopg
        from psycopg import sql
        from psycopg.conninfo import make_conninfo

        from data.database import Journal

        admin = self.admin_dsn()
        name = f"catalyst_bench_{uuid.uuid4().hex[:12]}"
        try:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
        except psycopg.Error as exc:
            raise BenchError(
                f"Could not create the benchmark database {name}: {exc}. The DATABASE_URL user needs CREATEDB."
            ) from exc
        self._created.append(name)
        dsn = make_conninfo(admin, dbname=name)
        journal = Journal.connect(dsn)  # a deployed agent finds its schema in place: migrate before timing
        try:
            journal.migrate()
        finally:
            journal.close()
        return dsn

    def close(self) -> None:
        import psycopg
        from psycopg import sql

        if self._admin_dsn is not None and self._server is None:  # an outside server: drop what we created
            for name in self._created:
                with contextlib.suppress(psycopg.Error), psycopg.connect(self._admin_dsn, autocommit=True) as conn:
                    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        if self._server is not None:
            with contextlib.suppress(Exception):
                self._server.cleanup()
            stop_embedded_server(self.folder / "pg")
        if not self.keep:
            shutil.rmtree(self.folder, ignore_errors=True)


# ==============================================================================================================
# Running the agent
# ==============================================================================================================


def naive_market_supported() -> bool:
    """Whether the settings have the switch for one-request-per-symbol market data (``agent.market_batching``)."""
    from config.settings import AgentSettings

    return "market_batching" in AgentSettings.model_fields


def write_settings(folder: Path, naive: bool, quote_ttl_s: float | None = None) -> Path:
    """A copy of config/settings.yaml with every path inside ``folder``; naive: no prompt caching, no batching.

    ``quote_ttl_s`` sets ``agent.quote_ttl_s`` of the optimised run (BenchError when the settings lack it).
    """
    import yaml

    from config.settings import DEFAULT_SETTINGS_PATH, AgentSettings

    data = yaml.safe_load(DEFAULT_SETTINGS_PATH.read_text(encoding="utf-8"))
    data["broker"]["sim"]["state_file"] = str(folder / "var" / "sim" / "state.json")
    data["broker"]["futu"]["connect_timeout_s"] = 5
    data["database"]["embedded_dir"] = str(folder / "var" / "pg")
    data["agent"]["log_dir"] = str(folder / "logs")
    data["risk"]["halt_file"] = str(folder / "HALT")
    if naive:
        data["claude"]["prompt_caching"] = False
        fields = AgentSettings.model_fields
        if "market_batching" in fields:
            data["agent"]["market_batching"] = False
        if "quote_ttl_s" in fields:
            data["agent"]["quote_ttl_s"] = 0
    elif quote_ttl_s is not None:
        if "quote_ttl_s" not in AgentSettings.model_fields:
            raise BenchError("--quote-ttl-s needs the agent.quote_ttl_s setting, which config/settings.py lacks.")
        data["agent"]["quote_ttl_s"] = quote_ttl_s
    path = folder / "settings.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def base_env() -> dict[str, str]:
    """The caller's environment without any project variable (no real key, database or gateway leaks in)."""
    return {k: v for k, v in os.environ.items() if k not in PROJECT_ENV_VARS}


@dataclass
class ProcessRun:
    returncode: int
    wall_s: float
    output: str
    log_lines: list[dict[str, Any]]
    started_at: datetime  # local wall clock at spawn, comparable with the log's timestamps


def run_process(args: list[str], env: dict[str, str], log_dir: Path | None = None) -> ProcessRun:
    """Run ``python ARGS`` from the project folder; the new JSON log lines it wrote come back parsed."""
    offsets: dict[Path, int] = {}
    if log_dir is not None and log_dir.exists():
        offsets = {p: p.stat().st_size for p in log_dir.glob("agent-*.log")}
    started_at = datetime.now()
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, *args],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    wall = time.perf_counter() - t0
    lines: list[dict[str, Any]] = []
    if log_dir is not None and log_dir.exists():
        for path in sorted(log_dir.glob("agent-*.log")):
            with path.open(encoding="utf-8") as handle:
                handle.seek(offsets.get(path, 0))
                for raw in handle:
                    with contextlib.suppress(ValueError):
                        lines.append(json.loads(raw))
    return ProcessRun(done.returncode, wall, done.stdout + done.stderr, lines, started_at)


def _event_time(lines: list[dict[str, Any]], event: str) -> datetime | None:
    for line in lines:
        if line.get("event") == event and isinstance(line.get("timestamp"), str):
            with contextlib.suppress(ValueError):
                return datetime.fromisoformat(line["timestamp"])
    return None


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# ==============================================================================================================
# Measurements
# ==============================================================================================================


@dataclass
class CycleFigures:
    wall_ms: float
    model_wait_ms: float
    startup_ms: float | None
    in_cycle_ms: float | None
    loop_ms: float | None  # brain_ready -> cycle_finished: the tool loop, after start-up and imports
    gateway: Counter[str]
    history_daily: int
    snapshot_codes: list[int]
    model_requests: int
    bytes_sent: int
    tokens_in: int
    cache_read: int
    cache_write: int
    tokens_out: int
    cost_usd: float
    tool_calls: int
    orders: int

    @property
    def overhead_ms(self) -> float:
        return self.wall_ms - self.model_wait_ms

    @property
    def in_cycle_overhead_ms(self) -> float | None:
        return None if self.in_cycle_ms is None else self.in_cycle_ms - self.model_wait_ms

    @property
    def loop_overhead_ms(self) -> float | None:
        return None if self.loop_ms is None else self.loop_ms - self.model_wait_ms

    @property
    def gateway_total(self) -> int:
        return sum(self.gateway.values())

    @property
    def gateway_requests(self) -> int:
        """Requests other than connection handshakes (InitConnect, KeepAlive)."""
        return sum(n for name, n in self.gateway.items() if name not in HANDSHAKES)


@dataclass
class ModeResult:
    name: str
    cycles: list[CycleFigures] = field(default_factory=list)
    guard_ms: list[float] = field(default_factory=list)
    guard_gateway: list[Counter[str]] = field(default_factory=list)
    naive_market: bool = False
    imports: dict[str, ImportProfile] = field(default_factory=dict)

    def median(self, attr: str) -> float:
        values = [getattr(c, attr) for c in self.cycles]
        values = [v for v in values if v is not None]
        return float(statistics.median(values)) if values else float("nan")

    def median_snapshots(self) -> float:
        return float(statistics.median(c.gateway.get("snapshot", 0) for c in self.cycles))

    def gateway_by_kind(self) -> dict[str, float]:
        names = sorted({n for c in self.cycles for n in c.gateway})
        return {n: float(statistics.median(c.gateway.get(n, 0) for c in self.cycles)) for n in names}


def run_mode(
    workspace: Workspace,
    *,
    naive: bool,
    cycles: int,
    guard_runs: int,
    echo: bool,
    profile_imports: bool = False,
    think_s: float = 0.0,
    quote_ttl_s: float | None = None,
) -> ModeResult:
    """N cycles (and, for the optimised mode, guard passes) against fresh fakes and a fresh database."""
    from brokers.sim import SimBroker, SimExchange
    from data.database import Journal
    from tests.fakes.opend import FakeOpenD

    name = "naive" if naive else "optimised"
    folder = workspace.folder / name
    folder.mkdir(parents=True, exist_ok=True)
    settings_path = write_settings(folder, naive, quote_ttl_s)
    dsn = workspace.new_database()
    now = datetime.fromisoformat(NOW_TEXT)
    exchange = SimExchange(seed=42, clock=lambda: now, state_file=None, starting_cash=Decimal(1_000_000))
    result = ModeResult(name=name, naive_market=naive and naive_market_supported())
    api = timed_messages_api(ScriptedTrader(think_s))
    with FakeOpenD(exchange, SimBroker(exchange), clock=lambda: now) as opend, api:
        env = base_env()
        env.update(
            OPEND_HOST="127.0.0.1",
            OPEND_PORT=str(opend.port),
            ANTHROPIC_BASE_URL=api.base_url,
            ANTHROPIC_API_KEY="bench-key-not-secret",
            DATABASE_URL=dsn,
            CATALYST_CONFIG=str(settings_path),
        )
        journal = Journal.connect(dsn)
        try:
            for i in range(cycles):
                api.clear_cache()  # real cycles are hours apart: the 5-minute prompt cache has expired
                opend.clear_requests()
                first_request = len(api.message_requests)
                first_timing = len(api.answer_s)
                run = run_process(
                    [str(AGENT), "--broker", "futu", "--brain", "claude", "--now", NOW_TEXT], env, folder / "logs"
                )
                if run.returncode != 0:
                    raise BenchError(
                        f"{name} cycle {i + 1}: agent.py exited {run.returncode}. Its output ends:\n{_tail(run.output)}"
                    )
                figures = _cycle_figures(run, opend, api, journal, first_request, first_timing)
                result.cycles.append(figures)
                if echo:
                    print(
                        f"  {name} cycle {i + 1}: {figures.wall_ms:.0f} ms, {figures.gateway_requests} gateway "
                        f"requests, {figures.tool_calls} tool calls, {figures.orders} order(s)",
                        file=sys.stderr,
                        flush=True,
                    )
            if not naive:
                for _ in range(guard_runs):
                    opend.clear_requests()
                    run = run_process(
                        [str(AGENT), "--guard", "--broker", "futu", "--now", NOW_TEXT], env, folder / "logs"
                    )
                    if run.returncode != 0:
                        raise BenchError(f"guard pass: agent.py exited {run.returncode}:\n{_tail(run.output)}")
                    result.guard_ms.append(run.wall_s * 1000)
                    result.guard_gateway.append(_gateway_counts(opend))
            if profile_imports:  # after the timed runs: these runs are slower and their figures are not used
                cycle_args = [str(AGENT), "--broker", "futu", "--brain", "claude", "--now", NOW_TEXT]
                result.imports["cycle"] = import_profile(cycle_args, env)
                result.imports["guard"] = import_profile(
                    [str(AGENT), "--guard", "--broker", "futu", "--now", NOW_TEXT], env
                )
        finally:
            journal.close()
        if opend.errors:
            raise BenchError(f"the fake OpenD reported internal errors: {opend.errors[:3]}")
    return result


def _gateway_counts(opend: Any) -> Counter[str]:
    return Counter(PROTO_NAMES.get(pid, f"proto_{pid}") for pid, _ in opend.requests)


def _cycle_figures(
    run: ProcessRun, opend: Any, api: Any, journal: Any, first_request: int, first_timing: int
) -> CycleFigures:
    from tests.fakes.opend import QOT_GET_SECURITY_SNAPSHOT, QOT_REQUEST_HISTORY_KL

    requests = api.message_requests[first_request:]
    model_wait = sum(api.answer_s[first_timing:])
    usage = Counter[str]()
    sent = 0
    for record in requests:
        sent += int(record.headers.get("content-length") or 0)
        if record.status == 200 and record.response:
            for key, value in record.response["usage"].items():
                if isinstance(value, int):
                    usage[key] += value
    started = _event_time(run.log_lines, "run_started")
    finished = _event_time(run.log_lines, "cycle_finished")
    startup = (started - run.started_at).total_seconds() * 1000 if started else None
    in_cycle = (finished - started).total_seconds() * 1000 if started and finished else None
    ready = _event_time(run.log_lines, "brain_ready")
    loop = (finished - ready).total_seconds() * 1000 if ready and finished else None
    cycle_line = next((line for line in run.log_lines if line.get("event") == "cycle_finished"), {})
    cycle_row = journal.cycles_on(datetime.fromisoformat(NOW_TEXT).date())[-1]
    if cycle_row.status != "ok":
        raise BenchError(f"the cycle ended {cycle_row.status}: {cycle_row.error or cycle_row.summary}")
    history = opend.requests_for(QOT_REQUEST_HISTORY_KL)
    return CycleFigures(
        wall_ms=run.wall_s * 1000,
        model_wait_ms=model_wait * 1000,
        startup_ms=startup,
        in_cycle_ms=in_cycle,
        loop_ms=loop,
        gateway=_gateway_counts(opend),
        history_daily=sum(1 for r in history if int(r.get("klType", 0)) == KL_DAILY),
        snapshot_codes=[len(r.get("securityList", [])) for r in opend.requests_for(QOT_GET_SECURITY_SNAPSHOT)],
        model_requests=len(requests),
        bytes_sent=sent,
        tokens_in=usage["input_tokens"],
        cache_read=usage["cache_read_input_tokens"],
        cache_write=usage["cache_creation_input_tokens"],
        tokens_out=usage["output_tokens"],
        cost_usd=float(cycle_row.cost_usd or 0),
        tool_calls=int(cycle_line.get("tool_calls") or 0),
        orders=int(cycle_line.get("orders") or 0),
    )


def time_help(runs: int) -> list[float]:
    walls = []
    for _ in range(runs):
        run = run_process([str(AGENT), "--help"], base_env())
        if run.returncode != 0:
            raise BenchError(f"agent.py --help exited {run.returncode}:\n{_tail(run.output)}")
        walls.append(run.wall_s * 1000)
    return walls


@dataclass
class ImportProfile:
    """``python -X importtime``: the summed self time of every module, grouped by top-level package."""

    total_ms: float
    by_package: dict[str, float]

    def top(self, n: int = 6) -> str:
        ranked = sorted(self.by_package.items(), key=lambda item: -item[1])[:n]
        return ", ".join(f"{name} {ms:,.0f}" for name, ms in ranked)


_IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)")


def import_profile(args: list[str], env: dict[str, str]) -> ImportProfile:
    """Run ``python -X importtime ARGS`` once and sum its per-module self times (microseconds -> ms)."""
    run = run_process(["-X", "importtime", *args], env)
    if run.returncode != 0:
        raise BenchError(f"python -X importtime {' '.join(args)} exited {run.returncode}:\n{_tail(run.output)}")
    by_package: Counter[str] = Counter()
    for line in run.output.splitlines():
        match = _IMPORT_LINE.match(line)
        if match:
            by_package[match.group(2).split(".")[0]] += int(match.group(1)) / 1000
    return ImportProfile(sum(by_package.values()), dict(by_package))


# ==============================================================================================================
# Report
# ==============================================================================================================


def _ratio(ours: float, naive: float, better: str) -> str:
    """'3.2x fewer' when ours is smaller, '1.4x more' when larger, 'same' within 5 %."""
    if not (ours > 0 and naive > 0):
        return "n/a"
    ratio = naive / ours
    if abs(ratio - 1) < 0.05:
        return "same"
    return f"{ratio:.1f}x {better}" if ratio > 1 else f"{1 / ratio:.1f}x more"


def _naive(value: float | None, shown: str, ours: float, better: str) -> str:
    if value is None:
        return ""
    return f"  [naive {shown}, {_ratio(ours, value, better)}]"


def _target(met: bool, text: str) -> str:
    return f"  target {text}: {'met' if met else 'NOT met'}"


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def report(
    opt: ModeResult,
    naive: ModeResult | None,
    help_ms: list[float],
    imports: dict[str, ImportProfile] | None = None,
    think_ms: float = 0,
) -> list[str]:
    """The figure lines, one per figure; the smoke test finds them by the label before the first colon."""
    n = len(opt.cycles)
    lines = [
        f"Catalyst benchmark: {n} cycle(s) of agent.py --broker futu --brain claude at {NOW_TEXT}: fake OpenD "
        "(real futu-api), fake Messages API (real anthropic SDK), real PostgreSQL; scripted model, "
        f"{EXPECTED_TOOL_CALLS} tool calls per cycle"
        + (f", {think_ms:,.0f} ms per model turn" if think_ms else ", instant model turns"),
    ]
    if naive is not None:
        market = (
            "one gateway request per symbol, no quote or constituent cache"
            if naive.naive_market
            else "market data NOT naive: the settings have no agent.market_batching switch yet"
        )
        lines.append(f"naive comparison: same cycles with prompt caching off; {market}")

    def nv(attr: str) -> float | None:
        return None if naive is None else naive.median(attr)

    lines.append(
        f"tool calls per cycle: {opt.median('tool_calls'):.0f} in {opt.median('model_requests'):.0f} model requests, "
        f"{opt.median('orders'):.0f} order(s) placed"
        + (f"  [naive {nv('tool_calls'):.0f}]" if naive is not None else "")
    )
    wall, startup, in_cycle = opt.median("wall_ms"), opt.median("startup_ms"), opt.median("in_cycle_ms")
    naive_wall = nv("wall_ms")
    lines.append(
        f"cycle wall time: {wall:,.0f} ms median, whole agent.py process (start-up {startup:,.0f} + cycle "
        f"{in_cycle:,.0f} + exit {wall - startup - in_cycle:,.0f})"
        + _naive(naive_wall, f"{naive_wall:,.0f} ms" if naive_wall else "", wall, "less")
    )
    wait, naive_wait = opt.median("model_wait_ms"), nv("model_wait_ms")
    lines.append(
        f"model wait: {wait:,.0f} ms median (fake Messages API, server side)"
        + _naive(naive_wait, f"{naive_wait:,.0f} ms" if naive_wait else "", wait, "less")
    )
    overhead, naive_overhead = opt.median("overhead_ms"), nv("overhead_ms")
    lines.append(
        f"cycle overhead outside the model: {overhead:,.0f} ms median, whole process"
        + _naive(naive_overhead, f"{naive_overhead:,.0f} ms" if naive_overhead else "", overhead, "less")
        + _target(overhead <= TARGETS["overhead_ms"], f"<= {TARGETS['overhead_ms']:.0f} ms")
    )
    inner, naive_inner = opt.median("in_cycle_overhead_ms"), nv("in_cycle_overhead_ms")
    cycle_imports = (imports or {}).get("cycle")
    lines.append(
        f"cycle overhead outside the model, in process: {inner:,.0f} ms median (run_started -> cycle_finished"
        + (
            f"; the process spends about {cycle_imports.total_ms:,.0f} ms importing, last line)"
            if cycle_imports
            else ")"
        )
        + _naive(naive_inner, f"{naive_inner:,.0f} ms" if naive_inner else "", inner, "less")
        + _target(inner <= TARGETS["overhead_ms"], f"<= {TARGETS['overhead_ms']:.0f} ms")
    )
    loop, naive_loop = opt.median("loop_overhead_ms"), nv("loop_overhead_ms")
    lines.append(
        f"tool loop overhead outside the model: {loop:,.0f} ms median (brain_ready -> cycle_finished minus the model "
        "wait: every tool call with its safety verdict, gateway requests and journal writes, after start-up)"
        + _naive(naive_loop, f"{naive_loop:,.0f} ms" if naive_loop else "", loop, "less")
        + _target(loop <= TARGETS["overhead_ms"], f"<= {TARGETS['overhead_ms']:.0f} ms")
    )
    requests, naive_requests = opt.median("gateway_requests"), nv("gateway_requests")
    handshakes = opt.median("gateway_total") - requests
    lines.append(
        f"gateway requests per cycle: {requests:.0f} median (+{handshakes:.0f} connection handshakes)"
        + _naive(naive_requests, f"{naive_requests:.0f}" if naive_requests else "", requests, "fewer")
        + _target(requests <= TARGETS["gateway_requests"], f"<= {TARGETS['gateway_requests']}")
    )
    for label, result in (("", opt), (", naive", naive)):
        if result is not None:
            kinds = result.gateway_by_kind()
            lines.append(
                f"gateway requests by kind{label}: "
                + ", ".join(f"{k} {v:g}" for k, v in kinds.items() if k not in HANDSHAKES)
            )
    later = [c.history_daily for c in opt.cycles[1:]]
    lines.append(
        f"daily K-line requests: {opt.cycles[0].history_daily} in the first cycle, "
        + (f"{_median(later):g} in later cycles (median, PostgreSQL K-line cache)" if later else "no later cycle")
        + f"; the first cycle made {opt.cycles[0].gateway_requests} gateway requests in all"
    )
    largest = _median([max(c.snapshot_codes) if c.snapshot_codes else 0 for c in opt.cycles])
    lines.append(
        f"snapshot requests per cycle: {opt.median_snapshots():g} median, the scan's carrying {largest:g} codes"
        + (f"  [naive {naive.median_snapshots():g}]" if naive is not None else "")
    )
    sent, naive_sent = opt.median("bytes_sent"), nv("bytes_sent")
    lines.append(
        f"bytes sent to the model per cycle: {sent:,.0f} median"
        + _naive(naive_sent, f"{naive_sent:,.0f}" if naive_sent else "", sent, "less")
    )
    tokens = _median([c.tokens_in + c.cache_read + c.cache_write for c in opt.cycles])
    naive_tokens = _median([c.tokens_in + c.cache_read + c.cache_write for c in naive.cycles]) if naive else None
    lines.append(
        f"estimated tokens sent to the model per cycle: {tokens:,.0f} input, {opt.median('tokens_out'):,.0f} output "
        "(median)" + _naive(naive_tokens, f"{naive_tokens:,.0f}" if naive_tokens else "", tokens, "less")
    )
    share, read_share = _cache_shares(opt)
    lines.append(
        f"share of input tokens under cache breakpoints: {share:.1f} % (read from the cache {read_share:.1f} %, "
        f"written {share - read_share:.1f} %)"
        + (f"  [naive {_cache_shares(naive)[0]:.1f} %]" if naive is not None else "")
        + _target(share >= TARGETS["cached_share_pct"], f">= {TARGETS['cached_share_pct']:.0f} %")
    )
    cost, naive_cost = opt.median("cost_usd"), nv("cost_usd")
    lines.append(
        f"model cost per cycle at list prices: ${cost:.4f} median"
        + _naive(naive_cost, f"${naive_cost:.4f}" if naive_cost else "", cost, "less")
    )
    guard = _median(opt.guard_ms)
    guard_requests = _median([sum(n for k, n in c.items() if k not in HANDSHAKES) for c in opt.guard_gateway])
    lines.append(
        f"guard pass wall time: {guard:,.0f} ms median of {len(opt.guard_ms)}, whole process; "
        f"{guard_requests:g} gateway requests"
        + _target(guard <= TARGETS["guard_ms"], f"<= {TARGETS['guard_ms']:.0f} ms")
    )
    help_median = _median(help_ms)
    lines.append(
        f"agent.py --help wall time: {help_median:,.0f} ms median of {len(help_ms)}"
        + _target(help_median <= TARGETS["help_ms"], f"<= {TARGETS['help_ms']:.0f} ms")
    )
    if imports:
        lines.append(
            "start-up imports (python -X importtime, one extra run each, ms): "
            + "; ".join(f"{name} {p.total_ms:,.0f} [{p.top()}]" for name, p in imports.items())
        )
    return lines


def _cache_shares(result: ModeResult) -> tuple[float, float]:
    """(share under cache breakpoints, share read from the cache) of all input tokens, in percent."""
    total = sum(c.tokens_in + c.cache_read + c.cache_write for c in result.cycles)
    if total <= 0:
        return 0.0, 0.0
    cached = sum(c.cache_read + c.cache_write for c in result.cycles)
    read = sum(c.cache_read for c in result.cycles)
    return cached / total * 100, read / total * 100


def as_json(
    opt: ModeResult, naive: ModeResult | None, help_ms: list[float], imports: dict[str, ImportProfile]
) -> dict[str, Any]:
    def mode(result: ModeResult) -> dict[str, Any]:
        return {
            "naive_market": result.naive_market,
            "cycles": [
                {
                    **{k: v for k, v in vars(c).items() if k != "gateway"},
                    "gateway": dict(c.gateway),
                    "overhead_ms": c.overhead_ms,
                    "in_cycle_overhead_ms": c.in_cycle_overhead_ms,
                    "loop_overhead_ms": c.loop_overhead_ms,
                    "gateway_requests": c.gateway_requests,
                }
                for c in result.cycles
            ],
            "guard_ms": result.guard_ms,
            "guard_gateway": [dict(c) for c in result.guard_gateway],
            "cached_share_pct": _cache_shares(result)[0],
        }

    out: dict[str, Any] = {
        "now": NOW_TEXT,
        "targets": TARGETS,
        "optimised": mode(opt),
        "help_ms": help_ms,
        "imports": {name: vars(p) for name, p in imports.items()},
    }
    if naive is not None:
        out["naive"] = mode(naive)
    return out


# ==============================================================================================================
# CLI
# ==============================================================================================================


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=5, help="cycles per mode (default 5)")
    parser.add_argument("--naive", action="store_true", help="also run the naive mode and print ratios")
    parser.add_argument("--guard-runs", type=int, default=3, help="guard passes to time (default 3)")
    parser.add_argument("--help-runs", type=int, default=5, help="agent.py --help runs to time (default 5)")
    parser.add_argument(
        "--think-ms",
        type=float,
        default=0,
        help="the scripted model takes this long per turn (default 0; try 6000 to see the quote TTL expire "
        "between turns as with a real model)",
    )
    parser.add_argument(
        "--quote-ttl-s",
        type=float,
        help="agent.quote_ttl_s for the optimised run (default: the one in config/settings.yaml)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write every measurement as JSON to PATH")
    parser.add_argument(
        "--replay-days", type=int, default=21, help="trading days of the replay figure (default 21; 0 = skip it)"
    )
    parser.add_argument("--no-import-profile", action="store_true", help="skip the extra python -X importtime runs")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, settings)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no per-cycle progress on stderr")
    args = parser.parse_args(argv)
    if args.cycles < 1 or args.guard_runs < 1 or args.help_runs < 1:
        parser.error("--cycles, --guard-runs and --help-runs must be at least 1")
    if not 0 <= args.think_ms <= 30_000:
        parser.error("--think-ms must be between 0 and 30000")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logging()
    try:
        with Workspace(keep=args.keep) as workspace:
            if args.keep:
                print(f"workspace: {workspace.folder}", file=sys.stderr)
            opt = run_mode(
                workspace,
                naive=False,
                cycles=args.cycles,
                guard_runs=args.guard_runs,
                echo=not args.quiet,
                profile_imports=not args.no_import_profile,
                think_s=args.think_ms / 1000,
                quote_ttl_s=args.quote_ttl_s,
            )
            naive = (
                run_mode(
                    workspace,
                    naive=True,
                    cycles=args.cycles,
                    guard_runs=0,
                    echo=not args.quiet,
                    think_s=args.think_ms / 1000,
                )
                if args.naive
                else None
            )
            help_ms = time_help(args.help_runs)
            replay = run_replay(workspace, args.replay_days, echo=not args.quiet) if args.replay_days > 0 else None
            imports = dict(opt.imports)
            if not args.no_import_profile:
                imports["--help"] = import_profile([str(AGENT), "--help"], base_env())
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    for line in report(opt, naive, help_ms, imports, args.think_ms):
        print(line, flush=True)
    if replay is not None:
        print(replay_line(replay), flush=True)
    if args.json:
        document = as_json(opt, naive, help_ms, imports)
        if replay is not None:
            document["replay"] = {**replay.__dict__, "separate_s": replay.separate_s}
        Path(args.json).write_text(json.dumps(document, indent=2, default=str), encoding="utf-8")
    return 0


# ==============================================================================================================
# Replay
# ==============================================================================================================

REPLAY_FIRST, REPLAY_LAST = "2026-09-01", "2026-09-29"  # 21 XHKG trading days
REPLAY_TARGET_S, REPLAY_TARGET_MB = 60.0, 1024.0
_PEAK_RSS = (
    "import resource, runpy, sys\n"
    "sys.argv = sys.argv[1:]\n"
    "try:\n"
    "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
    "except SystemExit as done:\n"
    "    code = done.code\n"
    "else:\n"
    "    code = 0\n"
    "print(f'peak_rss_kb={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}', file=sys.stderr)\n"
    "sys.exit(code)\n"
)


@dataclass
class ReplayFigures:
    days: int
    symbols: int
    cycles: int
    guards: int
    wall_s: float
    peak_mb: float
    cycle_process_s: float
    guard_process_s: float

    @property
    def separate_s(self) -> float:
        """The same schedule as one agent.py process per pass, as cron would run it."""
        return self.cycles * self.cycle_process_s + self.guards * self.guard_process_s


def run_replay(workspace: Workspace, days: int, echo: bool) -> ReplayFigures:
    """``agent.py --replay`` over ``days`` synthetic trading days with the rules brain, and one cycle and one
    guard pass run as separate processes at a time of that month, for the comparison."""
    from datetime import date

    import yaml

    from brokers.sim import UNIVERSE
    from replay.feed import sessions_between
    from replay.runner import schedule

    folder = workspace.folder / "replay"
    folder.mkdir(parents=True, exist_ok=True)
    settings = write_settings(folder, naive=False)
    data = yaml.safe_load(settings.read_text(encoding="utf-8"))
    data["replay"]["database"] = f"catalyst_bench_replay_{uuid.uuid4().hex[:8]}"
    settings.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    env = {**base_env(), "DATABASE_URL": workspace.new_database(), "CATALYST_CONFIG": str(settings)}
    span = sessions_between(date.fromisoformat(REPLAY_FIRST), date.fromisoformat(REPLAY_LAST))[: max(1, days)]
    passes = [mode for day in span for _when, mode in schedule(day)]
    if echo:
        print(f"replay: {len(span)} day(s), {len(passes)} passes ...", file=sys.stderr, flush=True)
    args = [
        "-c",
        _PEAK_RSS,
        str(AGENT),
        "--replay",
        f"{span[0]}..{span[-1]}",
        "--brain",
        "rules",
        "--feed",
        "synthetic",
    ]
    run = run_process(args, env)
    if run.returncode != 0:
        raise BenchError(f"agent.py --replay failed (exit {run.returncode}):\n{_tail(run.output)}")
    match = re.search(r"peak_rss_kb=(\d+)", run.output)
    peak_mb = int(match.group(1)) / 1024 if match else float("nan")
    at = f"{span[0]}T13:00:00+08:00"
    cycle = run_process([str(AGENT), "--broker", "sim", "--brain", "rules", "--now", at], env)
    guard = run_process([str(AGENT), "--guard", "--broker", "sim", "--now", at.replace("13:00", "13:05")], env)
    for name, done in (("cycle", cycle), ("guard pass", guard)):
        if done.returncode != 0:
            raise BenchError(f"the separate {name} process failed (exit {done.returncode}):\n{_tail(done.output)}")
    return ReplayFigures(
        days=len(span),
        symbols=len(UNIVERSE),
        cycles=passes.count("trade"),
        guards=passes.count("guard"),
        wall_s=run.wall_s,
        peak_mb=peak_mb,
        cycle_process_s=cycle.wall_s,
        guard_process_s=guard.wall_s,
    )


def replay_line(r: ReplayFigures) -> str:
    full_month = r.days >= 21
    targets = (
        _target(r.wall_s <= REPLAY_TARGET_S, f"{REPLAY_TARGET_S:.0f} s for 21 days")
        + _target(r.peak_mb <= REPLAY_TARGET_MB, "1 GB")
        if full_month
        else "  (targets apply to 21 days)"
    )
    return (
        f"replay: {r.days} trading day(s) x {r.symbols} symbols, 1-minute bars, rules brain, {r.cycles} cycles + "
        f"{r.guards} guard passes: {r.wall_s:,.1f} s wall, peak memory {r.peak_mb:,.0f} MB; the same schedule as "
        f"separate agent.py processes ~{r.separate_s:,.0f} s (cycle {r.cycle_process_s:.1f} s, guard "
        f"{r.guard_process_s:.1f} s each): {_ratio(r.wall_s, r.separate_s, 'faster')}" + targets
    )


def quiet_logging() -> None:
    """The benchmark's own journal connections log nothing (the agent processes log to their own files)."""
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


if __name__ == "__main__":
    sys.exit(main())
