"""Orders and stops over their whole life (issue 9), end to end through ``agent.py`` as cron runs it.

The simulated exchange runs as a REAL-style account (``broker.sim.account_kind: real``): protective stops are
broker-side STOP orders that reserve their shares, as in a Futu REAL account. Each test names the defect of the
review it pins. After every step the protection invariant is checked from the outside, re-derived here from the
broker's own books (not from the code under test):

    every held position has exactly one live broker-side stop, covering exactly the held quantity not already
    being sold by another working sell (whole lots), its trigger on the tick grid, its id in the journal.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from brokers import hkex
from brokers.base import OrderRequest, OrderStatus, OrderType, Side
from brokers.sim import AccountKind, SimBroker, SimExchange
from config.settings import PROJECT_ROOT
from data.database import Journal, OrderIntent
from tests.agent_runner import AGENT, AgentRun, run_agent, sim_at
from tests.fakes.messages_api import FakeMessagesAPI, message, text, tool_use

DAY = "2026-11-20"  # a Friday
DATE = date.fromisoformat(DAY)
TENCENT, HSBC, AIA = "HK.00700", "HK.00005", "HK.01299"
SINCE = datetime(2026, 11, 1).astimezone()


def at(hhmm: str) -> str:
    return f"{DAY}T{hhmm}:00+08:00"


# ------------------------------------------------------------------------------------------------ helpers


def make_real(settings_file: Path) -> None:
    """Run the sim as a REAL-style account (broker-side stops), as the owner would from the settings."""
    data = yaml.safe_load(settings_file.read_text(encoding="utf-8"))
    data["broker"]["sim"]["account_kind"] = "real"
    settings_file.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def state_of(tmp_path: Path) -> Path:
    return tmp_path / "var" / "sim" / "state.json"


def broker(state: Path, when: str, kind: str = "real") -> SimBroker:
    return SimBroker(sim_at(when, state), account_kind=kind)


def exchange(state: Path, when: str) -> SimExchange:
    return sim_at(when, state)


def trade(state: Path, when: str, symbol: str, side: str, quantity: int, *, offset: str = "0") -> dict:
    """A check_risk / execute_trade pair's arguments: limit at the touch (moved by ``offset`` of the price),
    stop 3 % under and target 8 % over the entry, all on the grid."""
    q = exchange(state, when).quote(symbol)
    touch = (q.ask_price if side == "buy" else q.bid_price) or q.last_price
    limit = hkex.round_to_tick(touch * (1 + Decimal(offset)), Side.BUY if side == "buy" else Side.SELL, DATE)
    stop = hkex.round_to_tick(limit * Decimal("0.97"), Side.BUY, DATE)
    target = hkex.round_to_tick(limit * Decimal("1.08"), Side.SELL, DATE)
    return {
        "symbol": symbol,
        "side": side,
        "quantity": quantity,
        "limit_price": float(limit),
        "stop_loss": float(stop),
        "take_profit": float(target),
    }


def checked(args: dict) -> list[dict]:
    """check_risk then execute_trade of the same proposal, as the model is told to do."""
    risk = {k: v for k, v in args.items() if k != "limit_price"} | {"entry_price": args["limit_price"]}
    return [tool_use("check_risk", risk), tool_use("execute_trade", {**args, "reason": "test"})]


def claude_cycle(fake_api: FakeMessagesAPI, env: dict[str, str], when: str, *calls: dict) -> AgentRun:
    """One trading cycle whose model makes ``calls`` one per turn, then ends its turn."""
    fake_api.enqueue(*[message([call]) for call in calls], message([text("Done.")]))
    run = run_agent("--broker", "sim", "--brain", "claude", "--now", when, env={**env, **fake_api.env()})
    assert run.returncode in (0, 4), run.output
    return run


def guard(env: dict[str, str], when: str) -> AgentRun:
    run = run_agent("--guard", "--broker", "sim", "--now", when, env=env)
    assert run.returncode == 0, run.output
    return run


def tool_results(journal: Journal) -> list[tuple[str, bool, bool]]:
    """(tool, allowed, is_error) of every tool call of the day's cycles, in order."""
    out = []
    for cycle in journal.cycles_on(DATE):
        out += [(c.name, c.allowed, c.is_error) for c in journal.tool_calls(cycle.id)]
    return out


def stops_at_broker(b: SimBroker, symbol: str | None = None) -> list:
    return [
        o
        for o in b.open_orders()
        if o.order_type in (OrderType.STOP, OrderType.STOP_LIMIT) and (symbol is None or o.symbol == symbol)
    ]


def assert_protected(b: SimBroker, journal: Journal) -> None:
    """The protection invariant, re-derived from the broker's books and the journal."""
    positions = {p.symbol: p for p in b.positions()}
    orders = b.open_orders()
    rows = journal.protective_stops()
    stops = stops_at_broker(b)
    for order in stops:
        assert order.symbol in positions, f"stop {order.broker_order_id} on {order.symbol} protects nothing"
    for symbol, position in positions.items():
        mine = [o for o in stops if o.symbol == symbol]
        being_sold = sum(
            o.quantity - o.filled_quantity for o in orders if o.symbol == symbol and o.side == "sell" and o not in mine
        )
        lot = b.exchange.instrument(symbol).lot_size
        wanted = hkex.floor_to_lots(max(position.quantity - being_sold, 0), lot)
        row = rows.get(symbol)
        assert row is not None, f"{symbol} is held but the journal has no stop for it"
        assert row.quantity == position.quantity, (row, position)
        if wanted == 0 or position.last_price <= row.stop_loss:  # nothing free, or the guard's to close
            assert mine == [], (symbol, mine)
            continue
        assert len(mine) == 1, f"{symbol}: {len(mine)} live stops: {mine}"
        (stop,) = mine
        assert stop.quantity - stop.filled_quantity == wanted, (symbol, stop.quantity, wanted)
        assert hkex.is_on_tick(stop.aux_price, DATE) and stop.aux_price == row.stop_loss, (stop, row)
        assert row.broker_stop_order_id == stop.broker_order_id, (row, stop)


@pytest.fixture
def real_env(project_env: dict[str, str], settings_file: Path) -> dict[str, str]:
    make_real(settings_file)
    return project_env


# ------------------------------------------------------------------------------------------------ defects


def test_1_an_add_on_replaces_the_stop_with_one_for_the_whole_position(
    real_env: dict[str, str], journal: Journal, fake_api: FakeMessagesAPI, tmp_path: Path
) -> None:
    state = state_of(tmp_path)
    claude_cycle(fake_api, real_env, at("10:15"), *checked(trade(state, at("10:15"), TENCENT, "buy", 100)))
    b = broker(state, at("10:15"))
    (first,) = stops_at_broker(b, TENCENT)
    assert first.quantity == 100
    assert_protected(b, journal)

    claude_cycle(fake_api, real_env, at("10:30"), *checked(trade(state, at("10:30"), TENCENT, "buy", 100)))
    b = broker(state, at("10:30"))
    assert b.positions()[0].quantity == 200
    (second,) = stops_at_broker(b, TENCENT)  # exactly one: the first was cancelled, not orphaned
    assert second.quantity == 200 and second.broker_order_id != first.broker_order_id
    assert b.exchange._state.orders and b.find_order(first.client_order_id).status is OrderStatus.CANCELLED
    assert journal.get_order(first.client_order_id).status is OrderStatus.CANCELLED
    assert_protected(b, journal)

    claude_cycle(fake_api, real_env, at("10:45"), tool_use("close_position", {"symbol": "700", "reason": "done"}))
    b = broker(state, at("10:45"))
    assert b.positions() == [] and stops_at_broker(b) == []  # all 200 sold: nothing locked by a stray stop
    assert TENCENT not in journal.protective_stops()
    assert all(allowed and not error for _, allowed, error in tool_results(journal)), tool_results(journal)


def test_2_flatten_close_all_and_the_daily_loss_halt_cancel_working_entries(
    project_env: dict[str, str], journal: Journal, fake_api: FakeMessagesAPI, tmp_path: Path
) -> None:
    state = state_of(tmp_path)
    # A resting buy 2.5 % under the market (it does not fill before the flatten on this seed).
    resting = trade(state, at("15:40"), TENCENT, "buy", 100, offset="-0.025")
    claude_cycle(fake_api, project_env, at("15:40"), *checked(resting))
    (entry,) = broker(state, at("15:50"), "paper").open_orders()
    assert entry.side == "buy" and entry.status is OrderStatus.SUBMITTED

    run = guard(project_env, at("15:52"))  # the pre-close flatten
    assert broker(state, at("15:52"), "paper").open_orders() == []
    assert journal.get_order(entry.client_order_id).status is OrderStatus.CANCELLED
    assert TENCENT not in journal.protective_stops()  # its entry will never fill: nothing to protect
    assert "cancelled entry" in (journal.cycles_on(DATE)[-1].summary or ""), run.output


def test_2_close_all_cancels_a_working_entry_before_selling(
    real_env: dict[str, str], journal: Journal, fake_api: FakeMessagesAPI, tmp_path: Path
) -> None:
    state = state_of(tmp_path)
    claude_cycle(
        fake_api,
        real_env,
        at("10:15"),
        *checked(trade(state, at("10:15"), TENCENT, "buy", 100)),
        *checked(trade(state, at("10:15"), AIA, "buy", 400, offset="-0.025")),
    )
    b = broker(state, at("10:16"))
    assert [o.side for o in b.open_orders() if o.order_type is OrderType.LIMIT] == ["buy"]  # the resting AIA buy
    claude_cycle(fake_api, real_env, at("10:20"), tool_use("close_all", {"reason": "risk off"}))
    b = broker(state, at("10:20"))
    assert b.positions() == [] and b.open_orders() == []
    aia = [o for o in journal.orders_on(DATE) if o.symbol == AIA]
    assert [o.status for o in aia] == [OrderStatus.CANCELLED]


def test_2_the_daily_loss_halt_cancels_a_working_entry(
    project_env: dict[str, str], journal: Journal, fake_api: FakeMessagesAPI, tmp_path: Path
) -> None:
    state = state_of(tmp_path)
    claude_cycle(
        fake_api,
        project_env,
        at("10:15"),
        *checked(trade(state, at("10:15"), TENCENT, "buy", 300)),
        *checked(trade(state, at("10:15"), AIA, "buy", 400, offset="-0.025")),
    )
    exchange(state, at("10:16")).apply_shock(TENCENT, -0.15)  # about -2.9 % of equity: past the 2 % limit
    run = claude_cycle(fake_api, project_env, at("10:45"))
    assert run.returncode == 4, run.output
    b = broker(state, at("10:45"), "paper")
    assert b.positions() == [] and b.open_orders() == []  # the resting buy cannot fill after the halt
    assert [o.status for o in journal.orders_on(DATE) if o.symbol == AIA] == [OrderStatus.CANCELLED]


def test_3_a_partial_sell_leaves_the_rest_under_a_stop(
    real_env: dict[str, str], journal: Journal, fake_api: FakeMessagesAPI, tmp_path: Path
) -> None:
    state = state_of(tmp_path)
    claude_cycle(fake_api, real_env, at("10:15"), *checked(trade(state, at("10:15"), TENCENT, "buy", 200)))
    # Sell half with a resting limit 1.5 % over the market (a take-profit the model sets itself).
    claude_cycle(
        fake_api, real_env, at("10:30"), *checked(trade(state, at("10:30"), TENCENT, "sell", 100, offset="0.015"))
    )
    b = broker(state, at("10:30"))
    (sell,) = [o for o in b.open_orders() if o.order_type is OrderType.LIMIT]
    assert (sell.side, sell.quantity, sell.status) == ("sell", 100, OrderStatus.SUBMITTED)
    (stop,) = stops_at_broker(b, TENCENT)
    assert stop.quantity == 100  # the other 100 are the limit sell's
    assert not [o for o in journal.orders_on(DATE) if o.status is OrderStatus.REJECTED]
    assert_protected(b, journal)
    guard(real_env, at("10:35"))  # a guard pass keeps it as it is: no rejected re-arm on every pass
    guard(real_env, at("10:40"))
    assert not [o for o in journal.orders_on(DATE) if o.status is OrderStatus.REJECTED]
    assert_protected(broker(state, at("10:40")), journal)


def test_4_a_partly_filled_entry_gets_its_stop_resized_as_the_rest_fills(
    real_env: dict[str, str], journal: Journal, fake_api: FakeMessagesAPI, tmp_path: Path
) -> None:
    state = state_of(tmp_path)
    exchange(state, at("10:15")).limit_next_fill(100)  # the exchange fills 100 of 300 at once
    claude_cycle(
        fake_api, real_env, at("10:15"), *checked(trade(state, at("10:15"), TENCENT, "buy", 300, offset="0.002"))
    )
    b = broker(state, at("10:15"))
    (entry,) = [o for o in b.orders() if o.side == "buy"]
    assert (entry.status, entry.filled_quantity) == (OrderStatus.PARTIALLY_FILLED, 100)
    assert [s.quantity for s in stops_at_broker(b, TENCENT)] == [100]
    assert_protected(b, journal)

    b = broker(state, at("10:20"))  # the rest fills on the next minutes' bars (its limit is over the market)
    assert b.find_order(entry.client_order_id).status is OrderStatus.FILLED
    guard(real_env, at("10:20"))
    b = broker(state, at("10:20"))
    assert [s.quantity for s in stops_at_broker(b, TENCENT)] == [300]
    assert journal.protective_stops()[TENCENT].quantity == 300
    assert_protected(b, journal)


def test_5_an_adopted_position_gets_a_broker_stop_on_the_tick_grid(
    real_env: dict[str, str], journal: Journal, tmp_path: Path
) -> None:
    state = state_of(tmp_path)
    bought = broker(state, at("10:15")).place_order(
        OrderRequest(client_order_id="by-hand", symbol=AIA, side=Side.BUY, quantity=200, order_type=OrderType.MARKET)
    )  # bought by hand in the app; 95 % of its cost is off the tick grid
    assert not hkex.is_on_tick(bought.avg_fill_price * Decimal("0.95"), DATE)
    guard(real_env, at("10:20"))
    guard(real_env, at("10:25"))
    b = broker(state, at("10:25"))
    (stop,) = stops_at_broker(b, AIA)
    assert hkex.is_on_tick(stop.aux_price, DATE) and stop.quantity == 200
    assert journal.protective_stops()[AIA].source == "adopted"
    assert not [o for o in journal.orders_on(DATE) if o.status is OrderStatus.REJECTED]  # never refused
    assert_protected(b, journal)


HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from data.database import Journal
    journal = Journal.connect(sys.argv[1])
    assert journal.try_lock("sim:sim", sys.argv[2]) is None
    print("locked", flush=True)
    sys.stdin.readline()  # held until the test says so (or closes the pipe)
    journal.close()
    """
)


def hold_lock(database_url: str, holder: str) -> subprocess.Popen:
    """Another process holding the account lock (as a running guard or cycle would) until its stdin closes."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, database_url, holder],
        cwd=PROJECT_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    for line in process.stdout:  # the journal logs its connection first
        if line.strip() == "locked":
            return process
    raise AssertionError(f"the lock holder exited ({process.wait()}) without taking the lock")


def release(holder: subprocess.Popen) -> None:
    assert holder.stdin is not None
    holder.stdin.close()
    holder.wait(timeout=60)


def test_6_a_cycle_waits_for_a_guard_holding_the_lock_and_a_guard_yields_at_once(
    project_env: dict[str, str], journal: Journal, database_url: str, tmp_path: Path
) -> None:
    holder = hold_lock(database_url, "guard run abc pid 1")
    cycle = subprocess.Popen(
        [sys.executable, str(AGENT), "--broker", "sim", "--brain", "rules", "--now", at("13:00")],
        env=project_env, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert cycle.stdout is not None
        seen = []
        for line in cycle.stdout:  # the cycle says it waits for the guard; only then does the guard finish
            seen.append(line)
            if "waiting_for_guard" in line:
                break
        release(holder)
        output = "".join(seen) + cycle.stdout.read()
        assert cycle.wait(timeout=240) == 0, output  # the 13:00 cycle ran after the guard, not skipped
    finally:
        if cycle.poll() is None:
            cycle.kill()
        if holder.poll() is None:
            holder.kill()
    assert "waiting_for_guard" in output and "lock_held" not in output
    assert [c.status for c in journal.cycles_on(DATE) if c.mode == "trade"] == ["ok"]

    holder = hold_lock(database_url, "trade run def pid 2")
    try:
        guard_run = run_agent("--guard", "--broker", "sim", "--now", at("13:05"), env=project_env)
        cycle_run = run_agent("--broker", "sim", "--brain", "rules", "--now", at("13:05"), env=project_env)
    finally:
        release(holder)
    assert guard_run.returncode == 5 and "waiting_for_guard" not in guard_run.output  # yields at once
    assert cycle_run.returncode == 5 and "waiting_for_guard" not in cycle_run.output  # never waits for a cycle


def test_7_a_partial_close_keeps_the_rest_under_its_own_stop_and_target(
    real_env: dict[str, str], journal: Journal, fake_api: FakeMessagesAPI, tmp_path: Path
) -> None:
    state = state_of(tmp_path)
    claude_cycle(fake_api, real_env, at("10:15"), *checked(trade(state, at("10:15"), TENCENT, "buy", 200)))
    entry_stop = journal.protective_stops()[TENCENT]
    claude_cycle(
        fake_api, real_env, at("10:30"), *checked(trade(state, at("10:30"), TENCENT, "sell", 100, offset="0.015"))
    )
    # close_position sells what is sellable (100; the other 100 are in the resting limit sell) at the market.
    claude_cycle(fake_api, real_env, at("10:31"), tool_use("close_position", {"symbol": "700", "reason": "trim"}))
    b = broker(state, at("10:31"))
    assert b.positions()[0].quantity == 100
    row = journal.protective_stops()[TENCENT]  # still the entry's stop and target, not a default adoption
    assert (row.source, row.stop_loss, row.take_profit, row.quantity) == (
        "entry",
        entry_stop.stop_loss,
        entry_stop.take_profit,
        100,
    )
    guard(real_env, at("10:35"))
    row = journal.protective_stops()[TENCENT]
    assert (row.source, row.take_profit) == ("entry", entry_stop.take_profit)
    assert "reconciliation_mismatch" not in [a.event for a in journal.alerts_since(SINCE)]
    assert_protected(broker(state, at("10:35")), journal)


def test_8_the_first_run_of_the_day_records_the_baseline_even_when_it_is_the_guard(
    project_env: dict[str, str], journal: Journal, tmp_path: Path
) -> None:
    state = state_of(tmp_path)
    b = broker(state, at("10:00"), "paper")  # the 09:30 cycle failed; a position was opened by hand
    filled = b.place_order(
        OrderRequest(client_order_id="hand", symbol=TENCENT, side=Side.BUY, quantity=300, order_type=OrderType.MARKET)
    )
    journal.upsert_protective_stop(
        TENCENT, quantity=300, entry_price=filled.avg_fill_price, stop_loss=filled.avg_fill_price * Decimal("0.8")
    )
    guard(project_env, at("10:05"))
    assert journal.start_of_day_equity(DATE) == Decimal(1_000_000)  # the previous close: all cash

    exchange(state, at("10:06")).apply_shock(TENCENT, -0.15)  # about -2.9 % of equity, past the 2 % limit
    run = run_agent("--guard", "--broker", "sim", "--now", at("10:10"), env=project_env)
    assert run.returncode == 4, run.output  # the guard enforces the daily-loss limit on the morning's losses
    assert broker(state, at("10:10"), "paper").positions() == []
    assert journal.start_of_day_equity(DATE) == Decimal(1_000_000)  # not re-based by a later run


def test_9_one_unquotable_position_does_not_stop_the_guard_checking_the_others(
    project_env: dict[str, str], journal: Journal, tmp_path: Path
) -> None:
    state = state_of(tmp_path)
    b = broker(state, at("10:00"), "paper")
    for symbol, quantity in ((TENCENT, 100), (HSBC, 400)):
        order = b.place_order(
            OrderRequest(client_order_id=f"h-{symbol}", symbol=symbol, side=Side.BUY, quantity=quantity,
                         order_type=OrderType.MARKET)
        )  # fmt: skip
        journal.upsert_protective_stop(
            symbol, quantity=quantity, entry_price=order.avg_fill_price,
            stop_loss=order.avg_fill_price * Decimal("0.97"), take_profit=order.avg_fill_price * Decimal("1.2"),
        )  # fmt: skip
    ex = exchange(state, at("10:01"))
    ex.set_delisted(TENCENT)  # the market data cannot quote it any more
    ex.apply_shock(HSBC, -0.06)  # HSBC falls through its stop
    guard(project_env, at("10:05"))
    held = {p.symbol for p in broker(state, at("10:05"), "paper").positions()}
    assert held == {TENCENT}  # HSBC was closed; 0700 is still held and reported
    summary = journal.cycles_on(DATE)[-1].summary or ""
    assert "HK.00005: stop loss" in summary and "HK.00700: no quote" in summary, summary
    subjects = [a.subject for a in journal.alerts_since(SINCE)]
    assert "Guard could not quote positions" in subjects and "Guard closed positions" in subjects


def test_a_failed_close_leaves_the_position_under_a_broker_stop(
    real_env: dict[str, str], journal: Journal, fake_api: FakeMessagesAPI, tmp_path: Path
) -> None:
    state = state_of(tmp_path)
    claude_cycle(fake_api, real_env, at("10:15"), *checked(trade(state, at("10:15"), TENCENT, "buy", 100)))
    exchange(state, at("10:16")).fail_next_order("exchange busy")
    claude_cycle(fake_api, real_env, at("10:20"), tool_use("close_position", {"symbol": "700", "reason": "exit"}))
    b = broker(state, at("10:20"))
    assert b.positions()[0].quantity == 100  # the sell was refused ...
    assert [s.quantity for s in stops_at_broker(b, TENCENT)] == [100]  # ... and the stop is back at once
    assert_protected(b, journal)


def test_a_recovered_order_keeps_the_stop_and_target_it_was_sent_with(
    project_env: dict[str, str], journal: Journal, tmp_path: Path
) -> None:
    state = state_of(tmp_path)
    q = exchange(state, at("10:15")).quote(TENCENT)
    stop, target = Decimal("630.0"), Decimal("700.0")
    # The journal row was written, then the process died before it learned the order's fate.
    journal.insert_order(
        OrderIntent(client_order_id="CI-crashed-001", cycle_id=None, symbol=TENCENT, side=Side.BUY, quantity=100,
                    limit_price=q.ask_price, stop_loss=stop, take_profit=target, trading_date=DATE)
    )  # fmt: skip
    broker(state, at("10:15"), "paper").place_order(
        OrderRequest(client_order_id="CI-crashed-001", symbol=TENCENT, side=Side.BUY, quantity=100,
                     limit_price=q.ask_price)
    )  # fmt: skip
    guard(project_env, at("10:20"))
    row = journal.protective_stops()[TENCENT]
    assert (row.stop_loss, row.take_profit, row.source) == (stop, target, "entry")
    assert "reconciliation_mismatch" not in [a.event for a in journal.alerts_since(SINCE)]


def test_the_sim_runs_as_a_real_style_account_from_the_settings_with_now(
    real_env: dict[str, str], journal: Journal, tmp_path: Path
) -> None:
    run = run_agent("--dry-run", "--broker", "sim", "--brain", "rules", "--now", at("10:15"), env=real_env)
    assert run.returncode == 0, run.output
    assert broker(state_of(tmp_path), at("10:15")).account().is_paper is False
    with pytest.raises(Exception, match="real account"):
        SimBroker(sim_at(at("10:15"), state_of(tmp_path)), account_kind=AccountKind.PAPER)
