"""Interactive Brokers end to end: ``IbkrClient`` through the real ``ib_async`` client and the fake IB Gateway's
TWS API socket protocol, with a REAL-kind ``SimBroker`` (stop orders rest at the broker) behind the fake.

The agent's own paths run in-process (the executor, the guard, reconciliation), as in ``test_real_stops.py``;
``agent.py --broker ibkr`` runs as a subprocess for the dry run and the failure exits.
"""

from __future__ import annotations

import faulthandler
import socket
import uuid
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import structlog
import yaml

from brokers import hkex
from brokers.base import OrderRequest, OrderStatus, OrderType, Side
from brokers.ibkr import IbkrClient
from brokers.sim import AccountKind, SimBroker, SimExchange
from config.errors import BrokerTemporaryError, BrokerUnavailable, ConfigError, OrderRejected
from config.settings import IbkrSettings, Settings
from data.database import Journal, OrderIntent
from tests.agent_runner import IN_SESSION, run_agent
from tests.fakes.ibgateway import FakeIBGateway

# A failure inside the fake gateway's threads fails the test (it would otherwise only drop the connection).
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")

HKT = ZoneInfo("Asia/Hong_Kong")
START = datetime(2026, 11, 20, 10, 15, 20, tzinfo=HKT)  # a Friday, continuous morning session
TENCENT = "HK.00700"  # lot 100


class Clock:
    """One clock for the exchange, the fake and the client, moved by hand."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(autouse=True)
def hang_guard() -> Iterator[None]:
    faulthandler.dump_traceback_later(120, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def exchange(clock: Clock) -> SimExchange:
    return SimExchange(seed=3, clock=clock)


@pytest.fixture
def sim(exchange: SimExchange) -> SimBroker:
    return SimBroker(exchange, account_kind=AccountKind.REAL)


@pytest.fixture
def gateway(exchange: SimExchange, sim: SimBroker) -> Iterator[FakeIBGateway]:
    with FakeIBGateway(exchange, sim) as fake:
        yield fake


def ibkr_settings(port: int, **extra: object) -> IbkrSettings:
    return IbkrSettings.model_validate({"port": port, "connect_timeout_s": 5, "request_timeout_s": 5, **extra})


@pytest.fixture
def client(gateway: FakeIBGateway, clock: Clock) -> Iterator[IbkrClient]:
    with IbkrClient(ibkr_settings(gateway.port), clock=clock, sleep=lambda s: None) as ib:
        yield ib


def agent_settings(port: int, **ibkr: object) -> Settings:
    return Settings.model_validate({"broker": {"name": "ibkr", "ibkr": {"port": port, **ibkr}}})


def agent_run(journal: Journal, settings: Settings, mode: str):
    from agent import Run
    from data.alerts import Alerter

    run = Run(run_id=uuid.uuid4().hex, journal=journal)
    run.cycle_id = journal.start_cycle(
        run_id=run.run_id, mode=mode, broker="ibkr", brain="none", model=None, started_at=START,
        trading_date=START.date(),
    )  # fmt: skip
    run.alerter = Alerter(settings.alerts, None, journal)
    return run


def gate_for(journal: Journal, client: IbkrClient, clock: Clock, settings: Settings):
    import agent
    from tool_executor import ToolGate

    ctx = agent.make_context(settings, agent_run(journal, settings, "trade"), client, client, clock, dry_run=False)
    return ToolGate(ctx)


def bracket_trade(exchange: SimExchange) -> tuple[dict[str, object], Decimal, Decimal, Decimal]:
    entry = exchange.quote(TENCENT).ask_price
    assert entry is not None
    stop = hkex.round_to_tick(entry * Decimal("0.97"), Side.BUY, START.date())
    target = hkex.round_to_tick(entry * Decimal("1.08"), Side.SELL, START.date())
    trade = {"symbol": "700", "side": "buy", "quantity": 100, "stop_loss": float(stop), "take_profit": float(target)}
    return trade, entry, stop, target


def enter_with_bracket(gate, exchange: SimExchange) -> tuple[Decimal, Decimal]:
    trade, entry, stop, target = bracket_trade(exchange)
    approved = gate.handle("check_risk", {**trade, "entry_price": float(entry)})
    assert approved.allowed, approved.result
    placed = gate.handle("execute_trade", {**trade, "limit_price": float(entry)})
    assert placed.allowed and not placed.is_error, placed.result
    return stop, target


# ------------------------------------------------------------------------------------------------ connect, reads


def test_connect_answers_every_startup_request_and_reads_the_paper_account(
    gateway: FakeIBGateway, client: IbkrClient, sim: SimBroker
) -> None:
    # ib_async's own startup: positions, open orders, completed orders, account updates (+ multi), executions.
    sent = {fields[0] for fields in gateway.requests}
    assert {"71", "61", "5", "99", "6", "76", "7"} <= sent, sent
    assert (client.account_id, client.is_paper) == ("DU1234567", True)
    account = client.account()
    assert (account.account_id, account.is_paper, account.currency) == ("DU1234567", True, "HKD")
    assert account.cash == account.equity == Decimal("1000000.00")
    assert client.positions() == []

    sim.place_order(
        OrderRequest(client_order_id="seed", symbol=TENCENT, side=Side.BUY, quantity=200, order_type=OrderType.MARKET)
    )
    (held,) = client.positions()
    assert (held.symbol, held.quantity, held.sellable_quantity) == (TENCENT, 200, 200)
    assert client.account().market_value == held.market_value > 0


def test_quotes_carry_the_lot_size_from_the_contract_details_and_bars_their_start_time(
    gateway: FakeIBGateway, client: IbkrClient, exchange: SimExchange
) -> None:
    (quote,) = client.snapshots([TENCENT, "HK.89999"])  # a stock IB does not know is left out
    expected = exchange.quote(TENCENT)
    assert (quote.symbol, quote.lot_size, quote.last_price, quote.delayed) == (TENCENT, 100, expected.last_price, False)
    assert quote.prev_close == expected.prev_close
    assert quote.volume_ratio is not None and quote.volume_ratio > 0  # from IB's average-volume tick (165/21)
    assert [f for f in gateway.requests if f[0] == "1"][-1][16:18] == ["165", "0"]  # streaming, generic 165
    bars = client.klines(TENCENT, "5m", 4)
    assert [b.time for b in bars] == [b.time for b in exchange.klines(TENCENT, "5m", 4)]
    assert all(b.time.tzinfo is not None for b in bars)


def test_a_live_account_needs_trading_mode_live_and_the_live_flag(exchange: SimExchange, sim: SimBroker) -> None:
    with FakeIBGateway(exchange, sim, account="U7654321") as live:
        with pytest.raises(ConfigError, match=r"U7654321 is a live .*trading_mode: live and --live"):
            IbkrClient(ibkr_settings(live.port))
        with pytest.raises(ConfigError, match="--live"):
            IbkrClient(ibkr_settings(live.port, trading_mode="live"))
        with IbkrClient(ibkr_settings(live.port, trading_mode="live"), live_confirmed=True) as ib:
            assert (ib.account_id, ib.is_paper) == ("U7654321", False)
    wrong_mode = pytest.raises(ConfigError, match="trading_mode is live but the gateway is logged in to paper")
    with FakeIBGateway(exchange, sim) as paper, wrong_mode:
        IbkrClient(ibkr_settings(paper.port, trading_mode="live"), live_confirmed=True)


def test_connectivity_lost_makes_reads_temporary_failures_until_restored(
    gateway: FakeIBGateway, client: IbkrClient
) -> None:
    gateway.connectivity(1100)
    with pytest.raises(BrokerTemporaryError, match="lost its connection to IBKR's servers"):
        client.account()  # retried, then raised: no attempt can succeed until 1101/1102
    gateway.connectivity(1102)
    client._ib.sleep(0.1)  # let the pushed message in (it arrives between requests)
    assert client.account().account_id == "DU1234567"


def test_a_broker_rejection_is_order_rejected_and_off_grid_prices_never_leave(
    gateway: FakeIBGateway, client: IbkrClient
) -> None:
    gateway.fail_next_order(201, "Order rejected - reason:insufficient buying power")
    request = OrderRequest(client_order_id="CI-rej", symbol=TENCENT, side=Side.BUY, quantity=100, limit_price=None)
    with pytest.raises(OrderRejected, match="limit price"):
        client.place_order(request)  # a limit without price: refused before anything is sent
    price = client.snapshots([TENCENT])[0].last_price
    with pytest.raises(OrderRejected, match="insufficient buying power"):
        client.place_order(request.model_copy(update={"limit_price": price}))
    with pytest.raises(OrderRejected, match="not on the HKEX tick grid"):
        client.place_order(request.model_copy(update={"limit_price": price + Decimal("0.01")}))
    with pytest.raises(OrderRejected, match="multiple of the 100-share lot"):
        client.place_order(request.model_copy(update={"limit_price": price, "quantity": 150}))


# ------------------------------------------------------------------------------------------------ brackets


def test_a_bracket_entry_fills_with_its_children_resting_and_the_stop_child_is_the_position_stop(
    gateway: FakeIBGateway, client: IbkrClient, exchange: SimExchange, sim: SimBroker, clock: Clock, journal: Journal
) -> None:
    gate = gate_for(journal, client, clock, agent_settings(gateway.port))
    stop, target = enter_with_bracket(gate, exchange)

    (row,) = journal.orders_on(START.date())
    parent = gateway.order_by_ref(row.client_order_id)
    take_profit = gateway.order_by_ref(f"{row.client_order_id}-tp")
    stop_child = gateway.order_by_ref(f"{row.client_order_id}-sl")
    assert parent is not None and take_profit is not None and stop_child is not None
    assert (row.status, row.broker_order_id) == (OrderStatus.FILLED, str(parent.perm_id))
    assert (parent.status, take_profit.status, stop_child.status) == ("Filled", "Submitted", "Submitted")
    assert take_profit.parent_id == stop_child.parent_id == parent.order_id
    assert take_profit.oca_group == stop_child.oca_group != ""
    assert (take_profit.lmt_price, stop_child.aux_price) == (float(target), float(stop))
    # Exactly one stop rests at the broker, and it is the child: the executor did not add a second one.
    (resting,) = [o for o in sim.open_orders() if o.order_type is OrderType.STOP]
    assert (resting.quantity, resting.aux_price) == (100, stop)
    assert journal.protective_stops()[TENCENT].broker_stop_order_id == str(stop_child.perm_id)
    placed = [f for f in gateway.requests if f[0] == "3"]
    assert len(placed) == 3, placed
    assert [f[27] for f in placed] == ["0", "0", "1"]  # transmit: only the last (the stop) sends the family
    # Our own view says the same.
    children = {o.client_order_id: o for o in client.open_orders()}
    assert set(children) == {f"{row.client_order_id}-tp", f"{row.client_order_id}-sl"}
    assert {o.parent_order_id for o in children.values()} == {str(parent.perm_id)}


def test_the_guard_rearms_a_vanished_stop_child_in_the_take_profits_oca_group(
    gateway: FakeIBGateway, client: IbkrClient, exchange: SimExchange, sim: SimBroker, clock: Clock, journal: Journal
) -> None:
    import agent

    settings = agent_settings(gateway.port)
    gate = gate_for(journal, client, clock, settings)
    stop, _ = enter_with_bracket(gate, exchange)
    (row,) = journal.orders_on(START.date())
    stop_child = gateway.order_by_ref(f"{row.client_order_id}-sl")
    take_profit = gateway.order_by_ref(f"{row.client_order_id}-tp")
    assert stop_child is not None and take_profit is not None

    gateway.vanish(stop_child.perm_id)  # cancelled in TWS, say
    clock.now += timedelta(minutes=5)
    guard_run = agent_run(journal, settings, "guard")
    assert agent.run_guard(settings, guard_run, client, client, clock, structlog.get_logger("test")) == agent.EXIT_OK

    rearmed = [o for o in gateway.orders.values() if o.order_type == "STP" and not o.is_done]
    assert len(rearmed) == 1 and rearmed[0].perm_id != stop_child.perm_id
    assert (rearmed[0].aux_price, rearmed[0].quantity) == (float(stop), 100)
    assert rearmed[0].oca_group == take_profit.oca_group  # only one of the two can ever sell
    assert take_profit.status == "Submitted"
    assert journal.protective_stops()[TENCENT].broker_stop_order_id == str(rearmed[0].perm_id)
    assert "broker stop re-armed" in (journal.get_cycle(guard_run.cycle_id).summary or "")
    assert len([o for o in sim.open_orders() if o.order_type is OrderType.STOP]) == 1


def test_closing_a_position_cancels_its_bracket_children_first(
    gateway: FakeIBGateway, client: IbkrClient, exchange: SimExchange, sim: SimBroker, clock: Clock, journal: Journal
) -> None:
    gate = gate_for(journal, client, clock, agent_settings(gateway.port))
    enter_with_bracket(gate, exchange)
    (row,) = journal.orders_on(START.date())

    closed = gate.handle("close_position", {"symbol": "700", "reason": "done"})
    assert closed.allowed and not closed.is_error, closed.result
    for suffix in ("-tp", "-sl"):
        child = gateway.order_by_ref(f"{row.client_order_id}{suffix}")
        assert child is not None and child.status == "Cancelled", suffix
    assert sim.positions() == [] and sim.open_orders() == []
    sells = [f for f in gateway.requests if f[0] == "3" and f[16] == "SELL" and f[18] == "MKT"]
    cancels = [i for i, f in enumerate(gateway.requests) if f[0] == "4"]
    assert len(sells) == 1 and len(cancels) == 2
    assert max(cancels) < gateway.requests.index(sells[0])  # the children were cancelled before the sell
    assert client.open_orders() == []


def test_a_partly_filled_bracket_entry_gets_a_stop_for_the_shares_held_in_the_take_profits_oca_group(
    gateway: FakeIBGateway, client: IbkrClient, exchange: SimExchange, sim: SimBroker, clock: Clock, journal: Journal
) -> None:
    import agent

    settings = agent_settings(gateway.port)
    gate = gate_for(journal, client, clock, settings)
    trade, entry, stop, _ = bracket_trade(exchange)
    trade["quantity"] = 200
    exchange.limit_next_fill(100)
    assert gate.handle("check_risk", {**trade, "entry_price": float(entry)}).allowed
    placed = gate.handle("execute_trade", {**trade, "limit_price": float(entry)})
    assert not placed.is_error and placed.result["status"] == "partially_filled", placed.result
    (row,) = [o for o in journal.orders_on(START.date()) if o.side is Side.BUY]
    take_profit = gateway.order_by_ref(f"{row.client_order_id}-tp")
    assert take_profit is not None and take_profit.status == "PreSubmitted"  # children wait for the parent

    # The 100 shares held are protected now, by one stop that shares the take-profit's OCA group.
    (resting,) = [o for o in sim.open_orders() if o.order_type is OrderType.STOP]
    assert (resting.quantity, resting.aux_price) == (100, stop)
    live = [o for o in gateway.orders.values() if o.order_type == "STP" and not o.is_done]
    assert len(live) == 1 and live[0].oca_group == take_profit.oca_group

    # The rest of the entry fills; the guard resizes the stop to the whole position.
    parent = gateway.order_by_ref(row.client_order_id)
    assert parent is not None
    sim.cancel_order(parent.sim_id or "")
    sim.place_order(
        OrderRequest(client_order_id="rest", symbol=TENCENT, side=Side.BUY, quantity=100, order_type=OrderType.MARKET)
    )
    clock.now += timedelta(minutes=5)
    guard_run = agent_run(journal, settings, "guard")
    assert agent.run_guard(settings, guard_run, client, client, clock, structlog.get_logger("test")) == agent.EXIT_OK
    (resting,) = [o for o in sim.open_orders() if o.order_type is OrderType.STOP]
    assert (resting.quantity, resting.aux_price) == (200, stop)
    assert journal.protective_stops()[TENCENT].broker_stop_order_id is not None


# ------------------------------------------------------------------------------------------------ recovery


def test_reconciliation_after_a_crash_finds_a_sent_order_by_its_order_ref_and_keeps_an_unsent_one_blocking(
    gateway: FakeIBGateway, client: IbkrClient, exchange: SimExchange, sim: SimBroker, clock: Clock, journal: Journal
) -> None:
    import agent

    price = exchange.quote(TENCENT).ask_price
    assert price is not None

    def journalled(client_order_id: str) -> OrderRequest:
        request = OrderRequest(
            client_order_id=client_order_id, symbol=TENCENT, side=Side.BUY, quantity=100, limit_price=price
        )
        journal.insert_order(
            OrderIntent(
                client_order_id=client_order_id, cycle_id=None, symbol=TENCENT, side=Side.BUY, quantity=100,
                order_type=OrderType.LIMIT, limit_price=price, stop_loss=None, take_profit=None,
                status=OrderStatus.PENDING, reason="test", trading_date=START.date(),
            )
        )  # fmt: skip
        return request

    sent = journalled("CI-crash-sent")
    client.place_order(sent)  # reached IB; the process died before it journalled the answer
    journalled("CI-crash-unsent")  # the process died between the journal write and placeOrder
    client.close()

    settings = agent_settings(gateway.port)
    with IbkrClient(ibkr_settings(gateway.port), clock=clock, sleep=lambda s: None) as fresh:
        run = agent_run(journal, settings, "trade")
        ctx = agent.make_context(settings, run, fresh, fresh, clock, dry_run=False)
        unresolved = agent.reconcile_orders(ctx, structlog.get_logger("test"))
    assert unresolved == ["CI-crash-unsent"]  # today it may still surface: entries stay blocked
    found = journal.get_order("CI-crash-sent")
    assert found is not None
    assert (found.status, found.filled_quantity) == (OrderStatus.FILLED, 100)
    assert found.broker_order_id == str(gateway.order_by_ref("CI-crash-sent").perm_id)  # type: ignore[union-attr]
    at_broker = sim.find_order("CI-crash-sent")
    assert at_broker is not None and found.avg_fill_price == at_broker.avg_fill_price  # from IB's executions


# ------------------------------------------------------------------------------------------------ delayed data


def test_entries_are_refused_on_delayed_data_unless_allowed(
    exchange: SimExchange, sim: SimBroker, clock: Clock, journal: Journal
) -> None:
    with (
        FakeIBGateway(exchange, sim, delayed=True) as delayed,
        IbkrClient(ibkr_settings(delayed.port), clock=clock, sleep=lambda s: None) as ib,
    ):
        (quote,) = ib.snapshots([TENCENT])
        assert quote.delayed is True
        trade, entry, _, _ = bracket_trade(exchange)
        refused = gate_for(journal, ib, clock, agent_settings(delayed.port)).handle(
            "check_risk", {**trade, "entry_price": float(entry)}
        )
        assert not refused.allowed
        assert "delayed" in refused.reason or "delayed" in str(refused.result)
        allowed = gate_for(journal, ib, clock, agent_settings(delayed.port, allow_delayed_data=True)).handle(
            "check_risk", {**trade, "entry_price": float(entry)}
        )
        assert allowed.allowed, allowed.result
        gate = gate_for(journal, ib, clock, agent_settings(delayed.port))
        assert gate.handle("get_quote", {"symbol": "700"}).result["delayed"] is True


# ------------------------------------------------------------------------------------------------ gateway down


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_silent_gateway_is_broker_unavailable_within_the_connect_timeout(
    exchange: SimExchange, sim: SimBroker
) -> None:
    handshake = pytest.raises(BrokerUnavailable, match="did not complete the API handshake within 1 s")
    with FakeIBGateway(exchange, sim, silent=True) as silent, handshake:
        IbkrClient(ibkr_settings(silent.port, connect_timeout_s=1))
    with pytest.raises(BrokerUnavailable, match=r"not reachable at 127.0.0.1:\d+ \(connection refused\)"):
        IbkrClient(ibkr_settings(free_port()))


@pytest.fixture
def ibkr_env(project_env: dict[str, str], settings_file: Path, exchange: SimExchange) -> dict[str, str]:
    data = yaml.safe_load(settings_file.read_text())
    data["broker"]["ibkr"]["connect_timeout_s"] = 2
    data["broker"]["ibkr"]["universe"] = [inst.symbol for inst in exchange.instruments()]
    settings_file.write_text(yaml.safe_dump(data))
    return dict(project_env)


def test_gateway_down_or_silent_exits_3_with_what_to_do(ibkr_env: dict[str, str], sim: SimBroker) -> None:
    env = dict(ibkr_env, IB_HOST="127.0.0.1", IB_PORT=str(free_port()))
    run = run_agent("--broker", "ibkr", "--brain", "rules", "--dry-run", "--now", IN_SESSION, env=env)
    assert run.returncode == 3, run.output
    assert "docker compose -f docker-compose.ibgateway.yml up -d" in run.output
    with FakeIBGateway(sim.exchange, sim, silent=True) as silent:
        env = dict(ibkr_env, IB_HOST="127.0.0.1", IB_PORT=str(silent.port))
        run = run_agent("--broker", "ibkr", "--brain", "rules", "--dry-run", "--now", IN_SESSION, env=env)
    assert run.returncode == 3, run.output
    assert "did not complete the API handshake" in run.output


def test_agent_dry_run_against_the_fake_gateway_end_to_end(ibkr_env: dict[str, str], journal: Journal) -> None:
    moment = datetime.fromisoformat(IN_SESSION)
    exchange = SimExchange(seed=42, clock=lambda: moment, starting_cash=Decimal(1_000_000))
    with FakeIBGateway(exchange, SimBroker(exchange, account_kind=AccountKind.REAL)) as fake:
        env = dict(ibkr_env, IB_HOST="127.0.0.1", IB_PORT=str(fake.port))
        run = run_agent("--broker", "ibkr", "--brain", "rules", "--dry-run", "--now", IN_SESSION, env=env)
        assert run.returncode == 0, run.output
        assert [f for f in fake.requests if f[0] == "3"] == []  # a dry run sends no order
        assert any(f[0] == "1" for f in fake.requests)  # it read quotes through the gateway
    (cycle,) = journal.cycles_on(date(2026, 11, 20))
    assert (cycle.status, cycle.broker, cycle.mode) == ("ok", "ibkr", "dry_run")
    # The scan ranked broker.ibkr.universe through IB snapshots (volume ratios from IB's average volume tick),
    # and the rules fired: their entries are journalled as dry runs, never sent.
    scan = [line for line in run.output.splitlines() if "tool=scan_market" in line]
    assert scan and "is_error=False" in scan[0], run.output
    orders = journal.orders_on(date(2026, 11, 20))
    assert orders, run.output
    assert {o.status for o in orders} == {OrderStatus.DRY_RUN}


# ------------------------------------------------------------------------------------------------ ops files

COMPOSE = Path(__file__).resolve().parent.parent / "docker-compose.ibgateway.yml"


def test_the_ib_gateway_compose_file_publishes_on_loopback_only_and_takes_credentials_from_env() -> None:
    import re

    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    gateway = compose["services"]["ibgateway"]
    assert gateway["ports"] and all(str(p).startswith("127.0.0.1:") for p in gateway["ports"]), gateway["ports"]
    assert gateway.get("network_mode") != "host"
    for key in ("TWS_USERID", "TWS_PASSWORD"):
        assert re.fullmatch(rf"\$\{{{key}:\?[^}}]*\}}", str(gateway["environment"][key])), key
    assert "env_file" not in gateway and gateway["restart"] == "unless-stopped"
    used = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", COMPOSE.read_text(encoding="utf-8")))
    example = (COMPOSE.parent / ".env.example").read_text(encoding="utf-8")
    documented = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", example, re.MULTILINE))
    assert used <= documented, used - documented


def test_the_health_check_learns_broker_ibkr(
    project_env: dict[str, str], exchange: SimExchange, sim: SimBroker, tmp_path: Path
) -> None:
    import subprocess

    script = Path(__file__).resolve().parent.parent / "scripts" / "health_check.sh"
    env = project_env | {
        "IB_HOST": "127.0.0.1",
        "CATALYST_PYTHON": __import__("sys").executable,
        "CATALYST_HEALTH_STATE_DIR": str(tmp_path / "state"),
        "CATALYST_HEALTH_LOG": str(tmp_path / "health.log"),
        "CATALYST_HEALTH_WAIT_S": "0",
        "CATALYST_OPEND_RESTART_CMD": f"echo restart >> {tmp_path / 'restarts'}",
        "CATALYST_MISSED_RUN_CMD": "true",
        "CATALYST_DISK_CHECK_CMD": "echo 'enough free disk'",
    }
    with FakeIBGateway(exchange, sim) as fake:
        done = subprocess.run(
            [str(script), "--broker", "ibkr"], env=env | {"IB_PORT": str(fake.port)}, capture_output=True, text=True,
            timeout=180, check=False,
        )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"endpoint=127.0.0.1:{fake.port}" in done.stdout and "all checks passed" in done.stdout
    assert "status=healthy" in done.stdout and not (tmp_path / "restarts").exists()
    bad = subprocess.run(
        [str(script), "--broker", "schwab"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert bad.returncode == 2 and "--broker must be futu or ibkr" in bad.stderr


def test_a_claude_cycle_on_delayed_data_is_told_so_and_cannot_enter(
    ibkr_env: dict[str, str], journal: Journal, fake_api
) -> None:
    from tests.fakes.messages_api import message, text, tool_use

    moment = datetime.fromisoformat(IN_SESSION)
    exchange = SimExchange(seed=42, clock=lambda: moment, starting_cash=Decimal(1_000_000))
    quote = exchange.quote(TENCENT)
    entry = quote.ask_price or quote.last_price
    stop = hkex.round_to_tick(entry * Decimal("0.97"), Side.BUY, moment.date())
    target = hkex.round_to_tick(entry * Decimal("1.08"), Side.SELL, moment.date())
    trade = {"symbol": "700", "side": "buy", "quantity": 100, "stop_loss": float(stop), "take_profit": float(target)}
    fake_api.enqueue(
        message([tool_use("get_quote", {"symbol": "700"}, id="q1")]),
        message([tool_use("check_risk", {**trade, "entry_price": float(entry)}, id="c1")]),
        message([text("Data is delayed; no entry.")]),
    )
    with FakeIBGateway(exchange, SimBroker(exchange, account_kind=AccountKind.REAL), delayed=True) as fake:
        env = dict(ibkr_env, IB_HOST="127.0.0.1", IB_PORT=str(fake.port), **fake_api.env())
        run = run_agent("--broker", "ibkr", "--brain", "claude", "--now", IN_SESSION, env=env)
        assert run.returncode == 0, run.output
        assert [f for f in fake.requests if f[0] == "3"] == []
    context = fake_api.message_requests[0].body["messages"][0]["content"]
    assert "Market data: IBKR is sending DELAYED quotes" in context and "entries on them are refused" in context
    (quoted,) = fake_api.tool_results(1)
    assert quoted.content["delayed"] is True
    (checked,) = fake_api.tool_results(2)
    assert checked.content["approved"] is False and "delayed" in str(checked.content)
    assert journal.orders_on(date(2026, 11, 20)) == []


# ------------------------------------------------------------------------------------------------ error table

PACING = "Historical Market Data Service error message:API historical data query cancelled: pacing violation"


@pytest.mark.parametrize(
    ("msg_id", "code", "text", "call", "error", "attempts"),
    [
        # pacing: gets better by itself -> temporary, the read is retried (3 attempts), then raised
        (20, 162, PACING, lambda c: c.klines(TENCENT, "1d", 5), BrokerTemporaryError, 3),
        # no market data permission: asking again gives the same answer -> refused at once, one attempt
        (20, 354, "Requested market data is not subscribed.", lambda c: c.klines(TENCENT, "1d", 5), "refused", 1),
        # an unknown contract: a quote is left out, not an error (as with Futu)
        (9, 200, "No security definition has been found for the request", lambda c: c.snapshots([TENCENT]), None, 1),
    ],
)
def test_each_gateway_failure_becomes_our_error_type_and_only_temporary_reads_retry(
    gateway: FakeIBGateway, client: IbkrClient, msg_id: int, code: int, text: str, call, error, attempts: int
) -> None:
    from config.errors import BrokerRequestRefused

    if msg_id == 20:
        client._contract(TENCENT)  # contract details first, so only the historical request fails
    before = len([f for f in gateway.requests if f[0] == str(msg_id)])
    gateway.fail_next_request(msg_id, code, text, times=attempts)
    if error is None:
        assert call(client) == []
    else:
        expected = BrokerRequestRefused if error == "refused" else error
        with pytest.raises(expected, match=f"code {code}"):
            call(client)
    assert len([f for f in gateway.requests if f[0] == str(msg_id)]) - before == attempts


def test_an_order_the_gateway_never_acknowledges_is_looked_up_once_and_never_resent(
    exchange: SimExchange, sim: SimBroker, clock: Clock
) -> None:
    from config.errors import OrderStateUnknown

    with (
        FakeIBGateway(exchange, sim) as gateway,
        IbkrClient(ibkr_settings(gateway.port, request_timeout_s=1), clock=clock, sleep=lambda s: None) as ib,
    ):
        price = ib.snapshots([TENCENT])[0].last_price
        gateway.swallow_next_order()
        request = OrderRequest(
            client_order_id="CI-hang", symbol=TENCENT, side=Side.BUY, quantity=100, limit_price=price
        )
        with pytest.raises(OrderStateUnknown, match="no order with orderRef CI-hang is listed yet"):
            ib.place_order(request)
        assert len([f for f in gateway.requests if f[0] == "3"]) == 1  # placement is never retried
        assert any(f[0] == "99" for f in gateway.requests[-4:])  # it looked among completed orders too


@pytest.mark.parametrize(
    ("clock_time", "minutes"),
    [
        ("09:15", 0),  # pre-open auction: no continuous trading yet
        ("09:30", 0),
        ("10:15", 45),
        ("12:30", 150),  # lunch: the whole morning, nothing more
        ("13:30", 180),
        ("16:05", 330),  # closing auction: the full day
    ],
)
def test_continuous_minutes_elapsed(clock_time: str, minutes: int) -> None:
    from brokers.ibkr import continuous_minutes_elapsed

    hour, minute = map(int, clock_time.split(":"))
    assert continuous_minutes_elapsed(START.replace(hour=hour, minute=minute)) == minutes


def test_volume_pace_ratio_compares_volume_per_minute_with_the_average_day() -> None:
    from brokers.ibkr import volume_pace_ratio

    at_1015 = START.replace(hour=10, minute=15)  # 45 of 330 minutes
    assert volume_pace_ratio(45_000, 330_000, at_1015) == 1.0  # on pace
    assert volume_pace_ratio(90_000, 330_000, at_1015) == 2.0  # twice the usual pace
    assert volume_pace_ratio(90_000, 0, at_1015) is None  # no average: no ratio
    assert volume_pace_ratio(90_000, 330_000, START.replace(hour=9, minute=20)) is None  # before the open
