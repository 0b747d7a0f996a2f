"""The gate's own guarantees, in process: the real ``ToolGate`` with the real journal (PostgreSQL), the real
market and news services, and a broker that is either the simulated exchange or the real futu-api client
talking to the fake OpenD.

Each test pins one guarantee that a one-line change in ``tool_executor.py`` would break without any other test
noticing (issue 10): no verdict means no permission, an approval authorises one execution, names and news reach
the model marked untrusted and cleaned, ``close_position`` sells whole lots, and a REAL account's own
broker-side stop does not count as "shares already being sold".
"""

from __future__ import annotations

import faulthandler
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import structlog

import agent
from brokers import hkex
from brokers.base import OrderRequest, OrderStatus, OrderType, Side
from brokers.futu import FutuClient, RateLimiter
from brokers.sim import AccountKind, SimBroker, SimExchange
from config.settings import FutuSettings, Settings
from data.alerts import Alerter
from data.database import Journal
from tests.fakes.hostile_market import HOSTILE_NAME, INJECTED_HEADLINE, HostileMarket
from tests.fakes.opend import (
    GET_GLOBAL_STATE,
    QOT_GET_SECURITY_SNAPSHOT,
    TRD_GET_FUNDS,
    TRD_PLACE_ORDER,
    FakeOpenD,
)
from tool_executor import UNTRUSTED_NOTE, CycleContext, ToolGate

HKT = ZoneInfo("Asia/Hong_Kong")
NOW = datetime(2026, 11, 20, 10, 15, 20, tzinfo=HKT)  # a Friday, continuous morning session
TENCENT = "HK.00700"  # lot 100


@pytest.fixture(autouse=True)
def hang_guard() -> Iterator[None]:
    faulthandler.dump_traceback_later(120, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


class FakeTime:
    """A monotonic clock whose ``sleep`` only advances it: rate limits and retry waits never wait for real."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.0)


def clock() -> datetime:
    return NOW


def new_context(journal: Journal, settings: Settings, broker: Any, source: Any) -> CycleContext:
    """A cycle's context exactly as ``agent.py`` builds it (``make_context``), on this test's journal."""
    run = agent.Run(run_id=uuid.uuid4().hex, journal=journal)
    run.cycle_id = journal.start_cycle(
        run_id=run.run_id, mode="trade", broker=settings.broker.name, brain="claude", model=None, started_at=NOW,
        trading_date=NOW.date(),
    )  # fmt: skip
    run.alerter = Alerter(settings.alerts, None, journal)
    return agent.make_context(settings, run, broker, source, clock, dry_run=False)


@dataclass
class Sim:
    exchange: SimExchange
    broker: SimBroker
    gate: ToolGate
    journal: Journal

    def holding(self, symbol: str) -> int:
        return sum(p.quantity for p in self.broker.positions() if p.symbol == symbol)


def sim_gate(journal: Journal, tmp_path: Path, *, kind: AccountKind = AccountKind.PAPER) -> Sim:
    exchange = SimExchange(seed=42, clock=clock, state_file=tmp_path / "sim.json", starting_cash=Decimal(1_000_000))
    broker = SimBroker(exchange, account_kind=kind)
    settings = Settings.model_validate({"broker": {"name": "sim"}})
    return Sim(exchange, broker, ToolGate(new_context(journal, settings, broker, exchange)), journal)


def entry_of(exchange: SimExchange, quantity: int = 100) -> dict[str, Any]:
    """A buy of ``quantity`` HK.00700 at the ask that every rule allows: stop 3 % below, target 8 % above."""
    ask = exchange.quote(TENCENT).ask_price
    assert ask is not None
    stop = hkex.round_to_tick(ask * Decimal("0.97"), Side.BUY, NOW.date())
    target = hkex.round_to_tick(ask * Decimal("1.08"), Side.BUY, NOW.date())
    prices = {"stop_loss": float(stop), "take_profit": float(target), "price": float(ask)}
    return {"symbol": "700", "side": "buy", "quantity": quantity, **prices}


def check(trade: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in trade.items() if k != "price"} | {"entry_price": trade["price"]}


def execute(trade: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in trade.items() if k != "price"} | {"limit_price": trade["price"]}


# ------------------------------------------------------------------------------------------------------ futu


@pytest.fixture
def exchange() -> SimExchange:
    return SimExchange(seed=42, clock=clock, starting_cash=Decimal(1_000_000))


@pytest.fixture
def opend(exchange: SimExchange) -> Iterator[FakeOpenD]:
    """The fake OpenD serving a hostile market (names and a headline that try to steer the model)."""
    with FakeOpenD(HostileMarket(exchange), SimBroker(exchange), clock=clock) as fake:
        yield fake


@pytest.fixture
def futu_gate(opend: FakeOpenD, journal: Journal) -> Iterator[ToolGate]:
    fake_time = FakeTime()
    client = FutuClient(
        FutuSettings(host="127.0.0.1", port=opend.port, connect_timeout_s=5, request_timeout_s=5),
        clock=clock,
        limiter=RateLimiter(monotonic=fake_time.monotonic, sleep=fake_time.sleep, margin_s=0),
        sleep=fake_time.sleep,
        retry_attempts=1,
    )
    settings = Settings.model_validate({"broker": {"name": "futu"}})
    try:
        yield ToolGate(new_context(journal, settings, client, client))
    finally:
        client.close()


# ------------------------------------------------------------------------------ item 1: no verdict, no tool

BUY = {"symbol": "700", "side": "buy", "quantity": 100}


@pytest.mark.parametrize(
    ("tool", "raw"),
    [
        ("close_position", {"symbol": "700", "reason": "take the money"}),  # would sell the position
        ("close_all", {"reason": "panic"}),  # would sell everything
        ("send_alert", {"subject": "s", "message": "m"}),  # would e-mail (and journal) an alert
        ("execute_trade", {**BUY, "limit_price": 600, "stop_loss": 590, "take_profit": 650}),
        ("check_risk", {**BUY, "entry_price": 600, "stop_loss": 590, "take_profit": 650}),
    ],
)
def test_a_call_the_rules_could_not_judge_is_refused_and_runs_nothing(
    futu_gate: ToolGate, opend: FakeOpenD, exchange: SimExchange, journal: Journal, tool: str, raw: dict[str, Any]
) -> None:
    SimBroker(exchange).place_order(
        OrderRequest(client_order_id="held", symbol=TENCENT, side=Side.BUY, quantity=200, order_type=OrderType.MARKET)
    )
    opend.fail_next(TRD_GET_FUNDS, msg="funds query failed")  # the account cannot be read: no risk state
    placed_before = opend.count(TRD_PLACE_ORDER)

    with structlog.testing.capture_logs() as logs:
        outcome = futu_gate.handle(tool, raw)

    assert (outcome.allowed, outcome.is_error) == (False, True)
    assert outcome.reason == "no verdict: BrokerRequestRefused"  # the kind of failure, for the journal
    # ... and the operator's log names the tool and the failure.
    (failed,) = [e for e in logs if e["event"] == "verdict_failed"]
    assert failed["log_level"] == "error" and failed["tool"] == tool and "funds query failed" in failed["error"]
    assert f"could not judge {tool}" in outcome.result["error"] and "funds query failed" in outcome.result["error"]
    assert opend.count(TRD_PLACE_ORDER) == placed_before  # nothing reached the broker
    assert [(p.symbol, p.quantity) for p in SimBroker(exchange).positions()] == [(TENCENT, 200)]
    assert journal.orders_on(NOW.date()) == []
    assert journal.alerts_since(datetime(2026, 11, 1, tzinfo=HKT)) == []
    assert futu_gate.ctx.approvals == []
    (row,) = journal.tool_calls(futu_gate.ctx.cycle_id)
    assert (row.name, row.allowed, row.is_error) == (tool, False, True) and row.reason == outcome.reason


def test_a_market_status_that_cannot_be_read_refuses_the_call_too(futu_gate: ToolGate, opend: FakeOpenD) -> None:
    opend.fail_next(GET_GLOBAL_STATE, msg="global state unavailable")
    outcome = futu_gate.handle("close_all", {"reason": "panic"})
    assert (outcome.allowed, outcome.is_error) == (False, True) and outcome.reason.startswith("no verdict")


# --------------------------------------------------------------------- a tool that ran and failed says why


def test_a_tool_that_ran_and_failed_tells_the_model_why_and_whether_to_ask_again(
    futu_gate: ToolGate, opend: FakeOpenD
) -> None:
    unknown = futu_gate.handle("get_quote", {"symbol": "99999"})
    assert (unknown.allowed, unknown.is_error, unknown.reason) == (True, True, "failed: UnknownSymbol")
    assert list(unknown.result) == ["error"] and "HK.99999" in unknown.result["error"]

    opend.refuse_next(QOT_GET_SECURITY_SNAPSHOT, "no_permission_zh")  # an answer that will not change
    refused = futu_gate.handle("get_quote", {"symbol": "700"})
    assert (refused.allowed, refused.is_error, refused.reason) == (True, True, "failed: BrokerRequestRefused")
    assert list(refused.result) == ["error", "retry"] and "no right or quota" in refused.result["error"]
    assert refused.result["retry"] == "no: the same request gets the same answer; do not ask again"


# ------------------------------------------------------------------------- item 3: untrusted names and news


def test_quote_names_reach_the_model_only_as_untrusted_data(futu_gate: ToolGate) -> None:
    outcome = futu_gate.handle("get_quote", {"symbol": "700"})
    assert outcome.allowed and not outcome.is_error, outcome.result
    assert "name" not in outcome.result
    name = outcome.result["name_untrusted"]  # the text as data under an untrusted key, cleaned like a scan's
    assert name.isprintable() and "\x1b" not in name and "\u202e" not in name and "\u200b" not in name
    assert name.startswith("TENCENT [31m") and len(name) == 60 and HOSTILE_NAME.startswith("TENCENT")
    assert outcome.result["symbol"] == TENCENT


def test_scan_names_are_untrusted_cleaned_and_bounded(futu_gate: ToolGate) -> None:
    outcome = futu_gate.handle("scan_market", {"index": "HSI", "limit": 5})
    assert outcome.allowed and not outcome.is_error, outcome.result
    assert outcome.result["index"] == "HSI"  # the model is told which index it scanned
    candidates = outcome.result["candidates"]
    assert len(candidates) == 5
    for row in candidates:
        assert "name" not in row
        name = row["name_untrusted"]
        assert name.isprintable() and "\x1b" not in name and "\u202e" not in name and "\u200b" not in name
        assert name.startswith("TENCENT [31m") and len(name) == 60  # cut to 60 characters


def test_news_is_wrapped_as_untrusted_and_the_injection_stays_data(futu_gate: ToolGate) -> None:
    outcome = futu_gate.handle("get_news", {"symbol": "700", "hours": 24})
    assert outcome.allowed and not outcome.is_error, outcome.result
    assert set(outcome.result) == {"untrusted", "note", "report"}
    assert outcome.result["untrusted"] is True and outcome.result["note"] == UNTRUSTED_NOTE
    report = outcome.result["report"]
    assert report["untrusted"] is True and report["symbol"] == TENCENT
    assert INJECTED_HEADLINE in [item["title"] for item in report["items"]]
    recent = futu_gate.handle("get_news", {"symbol": "700", "hours": 6})
    assert recent.result["report"]["hours"] == 6  # the window the model asked for, not the default day

    # The model "obeys" the headline: the rules do not.
    obey = {"symbol": "700", "side": "buy", "quantity": 1_000_000, "order_type": "market",
            "stop_loss": 1, "take_profit": 10_000}  # fmt: skip
    refused = futu_gate.handle("execute_trade", obey)
    assert (refused.allowed, refused.is_error) == (False, True)
    assert "check_risk_first" in refused.reason and "position_size" in refused.reason


# ----------------------------------------------------------------------- item 2: one approval, one execution


def test_an_approval_authorises_one_execution_not_a_series(journal: Journal, tmp_path: Path) -> None:
    sim = sim_gate(journal, tmp_path)
    trade = entry_of(sim.exchange)
    approved = sim.gate.handle("check_risk", check(trade))
    assert approved.allowed and approved.result["approved"] is True, approved.result
    assert len(sim.gate.ctx.approvals) == 1

    first = sim.gate.handle("execute_trade", execute(trade))
    assert first.allowed and not first.is_error and first.result["status"] == "filled", first.result
    assert sim.gate.ctx.approvals == []  # used up

    again = sim.gate.handle("execute_trade", execute(trade))  # the very same trade, without a new check_risk
    assert (again.allowed, again.is_error) == (False, True)
    assert again.reason.startswith("check_risk_first: call check_risk for this buy of HK.00700 first")
    assert again.result["error"] == "execute_trade blocked by the risk rules"
    assert sim.holding(TENCENT) == 100
    assert [o.quantity for o in journal.orders_on(NOW.date())] == [100]

    # A new approval allows one more.
    assert sim.gate.handle("check_risk", check(trade)).allowed
    assert sim.gate.handle("execute_trade", execute(trade)).allowed
    assert sim.holding(TENCENT) == 200


def test_an_approval_for_more_is_still_one_execution(journal: Journal, tmp_path: Path) -> None:
    sim = sim_gate(journal, tmp_path)
    big = entry_of(sim.exchange, quantity=300)
    assert sim.gate.handle("check_risk", check(big)).allowed
    small = {**big, "quantity": 100}
    assert sim.gate.handle("execute_trade", execute(small)).allowed  # less than approved: fine
    second = sim.gate.handle("execute_trade", execute(small))  # the rest of the approval is gone
    assert not second.allowed and "check_risk_first" in second.reason
    assert sim.holding(TENCENT) == 100


def test_only_the_approval_used_is_consumed(journal: Journal, tmp_path: Path) -> None:
    sim = sim_gate(journal, tmp_path)
    tencent = entry_of(sim.exchange)
    assert sim.gate.handle("check_risk", check(tencent)).allowed
    assert sim.gate.handle("check_risk", check({**tencent, "quantity": 200})).allowed
    assert len(sim.gate.ctx.approvals) == 2
    assert sim.gate.handle("execute_trade", execute({**tencent, "quantity": 200})).allowed
    (left,) = sim.gate.ctx.approvals
    assert left.quantity == 100
    assert sim.gate.handle("execute_trade", execute(tencent)).allowed  # the other approval still stands
    assert sim.holding(TENCENT) == 300


def test_a_refused_check_risk_approves_nothing(journal: Journal, tmp_path: Path) -> None:
    sim = sim_gate(journal, tmp_path)
    trade = entry_of(sim.exchange)
    bad = {**trade, "stop_loss": trade["price"] * 1.02}  # stop above the entry
    refused = sim.gate.handle("check_risk", check(bad))
    # A refusal is an answer, not an error: the model reads the failed rules.
    assert (refused.allowed, refused.is_error, refused.result["approved"]) == (False, False, False)
    assert [r["rule"] for r in refused.result["failed_rules"]] == ["stop_loss"]
    assert sim.gate.ctx.approvals == []
    blocked = sim.gate.handle("execute_trade", execute(bad))
    assert not blocked.allowed and blocked.reason.startswith("check_risk_first")
    assert blocked.result["approved"] is False and blocked.result["failed_rules"][0]["rule"] == "check_risk_first"
    assert sim.broker.orders() == []


# ------------------------------------------------------------------------ item 6: close_position, whole lots


def odd_lot_holding(tmp_path: Path, quantity: int) -> None:
    """Give the paper account ``quantity`` HK.00700 (e.g. after a bonus issue): written into the exchange's book."""
    exchange = SimExchange(seed=42, clock=clock, state_file=tmp_path / "sim.json", starting_cash=Decimal(1_000_000))
    SimBroker(exchange)  # opens the account and writes the book
    book = json.loads((tmp_path / "sim.json").read_text())
    book["positions"][TENCENT] = {"quantity": quantity, "avg_cost": "600"}
    (tmp_path / "sim.json").write_text(json.dumps(book))


def test_close_position_sells_the_whole_lots_and_leaves_the_odd_lot(journal: Journal, tmp_path: Path) -> None:
    odd_lot_holding(tmp_path, 250)
    sim = sim_gate(journal, tmp_path)
    assert sim.holding(TENCENT) == 250
    outcome = sim.gate.handle("close_position", {"symbol": "700", "reason": "done for the day"})
    assert outcome.allowed and not outcome.is_error, outcome.result
    assert (outcome.result["quantity"], outcome.result["status"]) == (200, "filled")
    assert "50 odd-lot share(s) of HK.00700 stay" in outcome.reason
    assert sim.holding(TENCENT) == 50
    (sell,) = journal.orders_on(NOW.date())
    assert (sell.side, sell.quantity, sell.status, sell.order_type) == ("sell", 200, "filled", "market")


def test_close_position_of_less_than_a_lot_sends_nothing(journal: Journal, tmp_path: Path) -> None:
    odd_lot_holding(tmp_path, 50)
    sim = sim_gate(journal, tmp_path)
    outcome = sim.gate.handle("close_position", {"symbol": "700", "reason": "done"})
    assert outcome.is_error and not outcome.allowed
    assert sim.holding(TENCENT) == 50 and journal.orders_on(NOW.date()) == []


# --------------------------------------------------------------- a REAL account's own stop frees its shares


def test_a_real_accounts_own_stop_does_not_block_selling_the_position(journal: Journal, tmp_path: Path) -> None:
    sim = sim_gate(journal, tmp_path, kind=AccountKind.REAL)
    trade = entry_of(sim.exchange)
    assert sim.gate.handle("check_risk", check(trade)).allowed
    assert sim.gate.handle("execute_trade", execute(trade)).allowed
    (stop,) = [o for o in sim.broker.open_orders() if o.order_type is OrderType.STOP]
    assert stop.quantity == 100 and stop.side is Side.SELL  # the broker-side stop holds the shares

    bid = sim.exchange.quote(TENCENT).bid_price
    sell = {"symbol": "700", "side": "sell", "quantity": 100}
    approved = sim.gate.handle("check_risk", {**sell, "entry_price": float(bid), "stop_loss": 1})
    assert approved.allowed and approved.result["max_quantity"] == 100, approved.result
    done = sim.gate.handle("execute_trade", {**sell, "limit_price": float(bid), "stop_loss": 1, "take_profit": 1})
    assert done.allowed and not done.is_error, done.result
    assert sim.holding(TENCENT) == 0
    assert [o for o in sim.broker.open_orders() if o.order_type is OrderType.STOP] == []


def test_a_real_accounts_own_stop_frees_its_shares_but_a_working_sell_of_the_model_does_not(
    journal: Journal, tmp_path: Path
) -> None:
    sim = sim_gate(journal, tmp_path, kind=AccountKind.REAL)
    trade = entry_of(sim.exchange, quantity=200)
    assert sim.gate.handle("check_risk", check(trade)).allowed
    assert sim.gate.handle("execute_trade", execute(trade)).allowed
    # The model offers half the position above the market: the sell rests, the stop shrinks to the other half.
    ask = sim.exchange.quote(TENCENT).ask_price
    assert ask is not None
    above = float(hkex.round_to_tick(ask * Decimal("1.02"), Side.SELL, NOW.date()))
    half = {"symbol": "700", "side": "sell", "quantity": 100, "stop_loss": 1, "take_profit": 1}
    assert sim.gate.handle("check_risk", {**half, "entry_price": above}).allowed
    assert sim.gate.handle("execute_trade", {**half, "limit_price": above}).allowed
    working = sorted((o.order_type, o.quantity) for o in sim.broker.open_orders())
    assert working == [(OrderType.LIMIT, 100), (OrderType.STOP, 100)]

    bid = float(sim.exchange.quote(TENCENT).bid_price or 0)
    everything = sim.gate.handle("check_risk", {**half, "quantity": 200, "entry_price": bid})
    assert not everything.allowed and "no_short" in everything.reason  # the working sell keeps its 100
    rest = sim.gate.handle("check_risk", {**half, "entry_price": bid})
    assert rest.allowed and rest.result["max_quantity"] == 100, rest.result  # the stop's 100 are free to sell


def test_close_all_in_continuous_trading_closes_every_position(journal: Journal, tmp_path: Path) -> None:
    sim = sim_gate(journal, tmp_path)
    trade = entry_of(sim.exchange)
    assert sim.gate.handle("check_risk", check(trade)).allowed
    assert sim.gate.handle("execute_trade", execute(trade)).allowed
    assert sim.holding(TENCENT) == 100
    outcome = sim.gate.handle("close_all", {"reason": "the model wants out"})
    assert outcome.allowed and not outcome.is_error, outcome.result
    assert [(o["symbol"], o["quantity"]) for o in outcome.result["closed"]] == [(TENCENT, 100)]
    assert sim.holding(TENCENT) == 0


# --------------------------------------------------------------------------------------- the gate's plumbing


def test_every_call_is_journalled_in_order_with_its_verdict(journal: Journal, tmp_path: Path) -> None:
    sim = sim_gate(journal, tmp_path)
    sim.gate.handle("get_portfolio", {})
    sim.gate.handle("get_quote", "HK.00700")  # not an object
    sim.gate.handle("get_quote", {"symbol": "99999"})  # unknown symbol: the tool ran and failed
    sim.gate.refuse("get_portfolio", {}, "budget: tool-call budget reached (40/40)")
    rows = journal.tool_calls(sim.gate.ctx.cycle_id)
    assert [(r.seq, r.name, r.allowed, r.is_error) for r in rows] == [
        (1, "get_portfolio", True, False),
        (2, "get_quote", False, True),
        (3, "get_quote", True, True),
        (4, "get_portfolio", False, True),
    ]
    assert [r.reason for r in rows] == [
        "allowed",
        "invalid input",
        "failed: UnknownSymbol",
        "budget: tool-call budget reached (40/40)",
    ]
    assert rows[0].result["cash"] == 1_000_000 and rows[0].result["account"] == "paper"
    assert "must be a JSON object" in rows[1].result["error"]
    assert rows[3].result == {"error": "not run: budget: tool-call budget reached (40/40)"}


def test_the_alert_budget_counts_the_alerts_of_this_cycle(journal: Journal, tmp_path: Path) -> None:
    sim = sim_gate(journal, tmp_path)
    limit = sim.gate.ctx.settings.risk.max_alerts_per_cycle
    for i in range(limit):
        assert sim.gate.handle("send_alert", {"subject": f"s{i}", "message": "m"}).allowed
    over = sim.gate.handle("send_alert", {"subject": "one more", "message": "m"})
    assert not over.allowed and over.reason.startswith("alert_budget")
    assert len(journal.alerts_since(datetime(2026, 11, 1, tzinfo=HKT))) == limit


def test_entries_are_refused_while_halted_and_the_count_of_trades_is_read(journal: Journal, tmp_path: Path) -> None:
    sim = sim_gate(journal, tmp_path)
    trade = entry_of(sim.exchange)
    sim.gate.ctx.halt_reason = "kill switch file HALT exists"
    halted = sim.gate.handle("check_risk", check(trade))
    assert not halted.allowed and halted.reason.startswith("halted: entries are blocked: kill switch file HALT")
    sim.gate.ctx.halt_reason = None
    for _ in range(sim.gate.ctx.settings.risk.max_daily_trades):
        journal.insert_order(_earlier_order(journal))
    full = sim.gate.handle("check_risk", check(trade))
    assert not full.allowed and "daily_trades" in full.reason


def _earlier_order(journal: Journal):
    from data.database import OrderIntent

    return OrderIntent(
        client_order_id=f"earlier-{uuid.uuid4().hex[:8]}", cycle_id=None, symbol="HK.00005", side=Side.BUY,
        quantity=400, limit_price=Decimal("60"), status=OrderStatus.PENDING, trading_date=NOW.date(),
    )  # fmt: skip


# ------------------------------------------------------------ close_position as the guard and close_all call it


def test_a_closed_position_drops_its_stop_and_journals_why(journal: Journal, tmp_path: Path) -> None:
    sim = sim_gate(journal, tmp_path)
    trade = entry_of(sim.exchange)
    assert sim.gate.handle("check_risk", check(trade)).allowed
    assert sim.gate.handle("execute_trade", execute(trade)).allowed
    assert TENCENT in journal.protective_stops()
    closed = sim.gate.handle("close_position", {"symbol": "700", "reason": "target met early"})
    assert closed.allowed and closed.result["status"] == "filled", closed.result
    assert TENCENT not in journal.protective_stops()  # nothing left to protect
    sell = next(o for o in journal.orders_on(NOW.date()) if o.side == "sell")
    assert (sell.quantity, sell.reason) == (100, "target met early")


def test_closing_in_a_real_account_cancels_the_broker_stop_first(journal: Journal, tmp_path: Path) -> None:
    sim = sim_gate(journal, tmp_path, kind=AccountKind.REAL)
    trade = entry_of(sim.exchange)
    assert sim.gate.handle("check_risk", check(trade)).allowed
    assert sim.gate.handle("execute_trade", execute(trade)).allowed
    assert [o.order_type for o in sim.broker.open_orders()] == [OrderType.STOP]
    closed = sim.gate.handle("close_position", {"symbol": "700", "reason": "done"})
    assert closed.allowed and not closed.is_error and closed.result["status"] == "filled", closed.result
    assert sim.broker.open_orders() == [] and sim.holding(TENCENT) == 0


@pytest.mark.parametrize(
    ("held", "in_open_sell", "message"),
    [
        (0, 0, "Could not close HK.00700: no sellable position. No order was sent."),  # nothing held
        (100, 100, "Could not close HK.00700: no sellable position. No order was sent."),  # all being sold
        (
            1,
            0,
            "Could not close HK.00700: 1 shares are less than one board lot (100); odd lots trade only on the "
            "odd-lot market. No order was sent.",
        ),
        (
            50,
            0,
            "Could not close HK.00700: 50 shares are less than one board lot (100); odd lots trade only on the "
            "odd-lot market. No order was sent.",
        ),
    ],
)
def test_close_position_without_a_whole_lot_to_sell_refuses_clearly(
    journal: Journal, tmp_path: Path, held: int, in_open_sell: int, message: str
) -> None:
    """``close_position`` as the guard and ``close_all`` call it (no verdict in front): it refuses by itself."""
    from config.errors import OrderRejected
    from tool_executor import close_position

    if held:
        odd_lot_holding(tmp_path, held)
    sim = sim_gate(journal, tmp_path)
    if in_open_sell:
        ask = sim.exchange.quote(TENCENT).ask_price
        above = hkex.round_to_tick(ask * Decimal("1.05"), Side.SELL, NOW.date())
        resting = OrderRequest(
            client_order_id="resting", symbol=TENCENT, side=Side.SELL, quantity=in_open_sell, limit_price=above
        )
        assert sim.broker.place_order(resting).status is OrderStatus.SUBMITTED
    with pytest.raises(OrderRejected) as info:
        close_position(sim.gate.ctx, TENCENT, "guard: stop hit")
    assert str(info.value) == message
    assert journal.orders_on(NOW.date()) == []


def test_close_all_goes_on_when_a_held_stock_has_no_quote(journal: Journal) -> None:
    """A feed that lost one held stock's quote: that close fails as a broker refusal (no order sent), and
    ``close_all`` (as the daily-loss halt and the model call it) still closes the others."""
    from tests.fakes.hostile_market import QuotelessMarket
    from tool_executor import close_all

    exchange = SimExchange(seed=42, clock=clock, starting_cash=Decimal(1_000_000))
    broker = SimBroker(exchange)
    for symbol, quantity in ((TENCENT, 200), ("HK.00005", 400)):
        buy = OrderRequest(client_order_id=f"held-{symbol}", symbol=symbol, side=Side.BUY, quantity=quantity,
                           order_type=OrderType.MARKET)  # fmt: skip
        assert broker.place_order(buy).status is OrderStatus.FILLED
    fake_time = FakeTime()
    with FakeOpenD(QuotelessMarket(exchange, {TENCENT}), broker, clock=clock) as opend:
        client = FutuClient(
            FutuSettings(host="127.0.0.1", port=opend.port, connect_timeout_s=5, request_timeout_s=5),
            clock=clock,
            limiter=RateLimiter(monotonic=fake_time.monotonic, sleep=fake_time.sleep, margin_s=0),
            sleep=fake_time.sleep,
        )
        try:
            ctx = new_context(journal, Settings.model_validate({"broker": {"name": "futu"}}), client, client)
            assert ctx.view.quote(TENCENT) is None
            orders = close_all(ctx, "daily loss limit")
        finally:
            client.close()
    assert [(o.symbol, o.quantity, o.status) for o in orders] == [("HK.00005", 400, OrderStatus.FILLED)]
    assert [(p.symbol, p.quantity) for p in broker.positions()] == [(TENCENT, 200)]
