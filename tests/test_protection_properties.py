"""Property (issue 9): on a REAL-style account, whatever the sequence of entries, add-ons, partial fills, partial
sells, closes and guard passes, every position stays under exactly one broker-side stop that covers exactly
what is not already being sold — checked after every step.

It runs in process through the same code cron runs: ``ToolGate`` (safety, executor, write-ahead orders) for the
model's calls and ``agent.run_guard`` for the guard, on a ``SimBroker`` in its REAL flavour and a real journal.
The invariant itself is re-derived from the broker's books in ``tests.test_order_lifecycle.assert_protected``.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import agent
from brokers import hkex
from brokers.base import Side
from brokers.sim import AccountKind, SimBroker, SimExchange
from config.settings import Settings
from data.alerts import Alerter
from data.database import Journal
from tests.test_order_lifecycle import DATE, assert_protected, stops_at_broker
from tool_executor import ToolGate

HKT = ZoneInfo("Asia/Hong_Kong")
START = datetime(2026, 11, 20, 10, 0, tzinfo=HKT)
LAST_STEP = datetime(2026, 11, 20, 11, 45, tzinfo=HKT)  # before the time stop and lunch
SYMBOLS = ("HK.00700", "HK.01299", "HK.00941")  # lots 100, 200, 500

buy = st.tuples(
    st.just("buy"),
    st.sampled_from(SYMBOLS),
    st.sampled_from([1, 2, 2, 3]),  # lots (mostly several, so a part can be sold)
    st.sampled_from(["marketable", "marketable", "resting"]),
    st.booleans(),  # the exchange fills one lot at once and the rest later (a partial fill)
)
# A sell picks one of the held positions (any symbol when flat, which safety refuses: no shorting).
sell = st.tuples(
    st.just("sell"), st.integers(0, 5), st.sampled_from([1, 1, 2]), st.sampled_from(["market", "resting", "resting"])
)
close = st.tuples(st.just("close"), st.sampled_from(SYMBOLS))
wait = st.tuples(st.just("wait"), st.integers(1, 12))  # minutes pass, then the guard runs (as cron would)
steps = st.lists(st.one_of(buy, buy, sell, close, wait, wait), min_size=3, max_size=10)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


class Harness:
    """One REAL-style sim account and journal, driven the way cycles and guard passes drive them."""

    def __init__(self, journal: Journal, stats: Counter) -> None:
        self.clock = Clock()
        self.exchange = SimExchange(seed=42, clock=self.clock)
        self.broker = SimBroker(self.exchange, account_kind=AccountKind.REAL)
        self.journal = journal
        self.stats = stats
        self.settings = Settings.model_validate(
            {"broker": {"name": "sim", "sim": {"account_kind": "real"}}, "risk": {"max_daily_trades": 1000}}
        )
        self.log = structlog.get_logger("property")

    def new_run(self, mode: str) -> agent.Run:
        run = agent.Run(run_id=uuid.uuid4().hex, journal=self.journal)
        run.cycle_id = self.journal.start_cycle(
            run_id=run.run_id, mode=mode, broker="sim", brain="none", model=None, started_at=self.clock(),
            trading_date=DATE,
        )  # fmt: skip
        run.alerter = Alerter(self.settings.alerts, None, self.journal)
        return run

    def gate(self) -> ToolGate:
        """A trading cycle's gate, after the reconciliation every cycle starts with."""
        run = self.new_run("trade")
        ctx = agent.make_context(self.settings, run, self.broker, self.exchange, self.clock, dry_run=False)
        agent.reconcile(ctx, run, self.log)
        return ToolGate(ctx)

    def buy(self, symbol: str, lots: int, kind: str, partial: bool) -> None:
        q = self.exchange.quote(symbol)
        lot = q.lot_size
        touch = q.ask_price or q.last_price
        limit = touch if kind == "marketable" else hkex.round_to_tick(touch * Decimal("0.99"), Side.BUY, DATE)
        held = {p.symbol for p in self.broker.positions()}
        self.stats["add_on" if symbol in held else "entry"] += 1
        if partial and lots > 1 and kind == "marketable":
            self.exchange.limit_next_fill(lot)
            self.stats["partial_fill"] += 1
        self.trade(symbol, "buy", lots * lot, limit, Decimal("0.97"), Decimal("1.08"))
        self.exchange._state.fill_cap = None  # a refused order must not leave the knob armed for a later fill

    def sell(self, pick: int, lots: int, kind: str) -> None:
        held = sorted(p.symbol for p in self.broker.positions())
        symbol = held[pick % len(held)] if held else SYMBOLS[pick % len(SYMBOLS)]
        q = self.exchange.quote(symbol)
        touch = q.bid_price or q.last_price
        limit = touch if kind == "market" else hkex.round_to_tick(touch * Decimal("1.01"), Side.SELL, DATE)
        if any(p.symbol == symbol for p in self.broker.positions()):
            self.stats["partial_sell"] += 1
        self.trade(symbol, "sell", lots * q.lot_size, limit, Decimal("0.97"), Decimal("1.08"))

    def trade(self, symbol: str, side: str, quantity: int, limit: Decimal, stop_f: Decimal, target_f: Decimal) -> None:
        stop = hkex.round_to_tick(limit * stop_f, Side.BUY, DATE)
        target = hkex.round_to_tick(limit * target_f, Side.SELL, DATE)
        args = {"symbol": symbol, "side": side, "quantity": quantity, "stop_loss": float(stop),
                "take_profit": float(target)}  # fmt: skip
        gate = self.gate()
        approved = gate.handle("check_risk", {**args, "entry_price": float(limit)})
        if approved.allowed:
            placed = gate.handle("execute_trade", {**args, "limit_price": float(limit)})
            self.stats["executed" if placed.allowed and not placed.is_error else "refused"] += 1

    def close(self, symbol: str) -> None:
        self.gate().handle("close_position", {"symbol": symbol, "reason": "property step"})

    def wait_and_guard(self, minutes: int) -> None:
        self.clock.now = min(self.clock.now + timedelta(minutes=minutes), LAST_STEP)
        run = self.new_run("guard")
        code = agent.run_guard(self.settings, run, self.broker, self.exchange, self.clock, self.log)
        assert code in (agent.EXIT_OK, agent.EXIT_HALTED)

    def check(self) -> None:
        assert_protected(self.broker, self.journal)
        covered = len(stops_at_broker(self.broker))
        self.stats["stops_checked"] += covered
        if any(o.side == "sell" and o.order_type == "limit" for o in self.broker.open_orders()) and covered:
            self.stats["stop_beside_working_sell"] += 1


def test_every_step_keeps_each_position_under_exactly_one_fitting_broker_stop(
    database_factory: Callable[[], str],
) -> None:
    stats: Counter = Counter()

    @settings(
        max_examples=20,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(steps)
    def run(sequence: list[tuple]) -> None:
        journal = Journal.connect(database_factory())
        journal.migrate()
        try:
            h = Harness(journal, stats)
            for step in sequence:
                kind, *args = step
                if kind == "buy":
                    h.buy(*args)
                elif kind == "sell":
                    h.sell(*args)
                elif kind == "close":
                    h.close(*args)
                else:
                    h.wait_and_guard(*args)
                h.check()
            h.wait_and_guard(5)  # and after the guard's own pass
            h.check()
        finally:
            journal.close()

    run()
    # The property was exercised, not vacuously true: positions with stops, add-ons, partial fills and sells.
    assert stats["stops_checked"] >= 20, stats
    assert min(stats["add_on"], stats["partial_fill"], stats["partial_sell"], stats["executed"]) >= 3, stats
    assert stats["stop_beside_working_sell"] >= 1, stats
