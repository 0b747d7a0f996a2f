"""The report's arithmetic as tables (pure functions), and journals written through ``data.database`` that the
sim cannot produce: a Futu day without cached bars, then with them, and a busy month's page size."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from pydantic import SecretStr

from brokers import hkex
from brokers.base import Bar, OrderStatus, OrderType, Side
from config.settings import Secrets, Settings
from data.database import Journal, OrderIntent
from report.cli import write_report
from report.data import EquityPoint, Fill, Period, _rules_of, build_round_trips, drawdowns, with_fees
from tests.report_page import money, parse_page

HKT = ZoneInfo("Asia/Hong_Kong")
D = Decimal


def t(hhmm: str, day: str = "2026-11-20") -> datetime:
    return datetime.fromisoformat(f"{day}T{hhmm}:00+08:00")


def fill(side: str, quantity: int, price: str, hhmm: str, symbol: str = "HK.00700", stop: str | None = "95") -> Fill:
    return Fill(f"{side}-{hhmm}", 1, symbol, side, quantity, D(price), t(hhmm), D(stop) if stop else None, None, "r")


# ---------------------------------------------------------------------------------------------- pure rules


@pytest.mark.parametrize(
    ("fills", "trips", "held"),
    [
        # one buy, one sell: entry 100, exit 110, 100 shares
        ([fill("buy", 100, "100", "10:00"), fill("sell", 100, "110", "11:00")], [(100, D(100), D(110))], {}),
        # scaling in and out: weighted prices, one round trip when flat again
        (
            [
                fill("buy", 100, "100", "10:00"),
                fill("buy", 100, "104", "10:30"),
                fill("sell", 50, "110", "11:00"),
                fill("sell", 150, "106", "11:30"),
            ],
            [(200, D(102), D(107))],
            {},
        ),
        # a sell with nothing held before it (older than the journal) is not a round trip
        ([fill("sell", 100, "110", "09:45"), fill("buy", 100, "100", "10:00")], [], {"HK.00700": 100}),
        # a partial exit leaves the rest open
        ([fill("buy", 300, "100", "10:00"), fill("sell", 100, "101", "11:00")], [], {"HK.00700": 200}),
        # two symbols interleaved
        (
            [
                fill("buy", 100, "100", "10:00"),
                fill("buy", 400, "50", "10:05", "HK.00005"),
                fill("sell", 400, "49", "10:10", "HK.00005"),
                fill("sell", 100, "99", "10:20"),
            ],
            [(400, D(50), D(49)), (100, D(100), D(99))],
            {},
        ),
    ],
)
def test_round_trips_from_fills(fills: list[Fill], trips: list[tuple[int, Decimal, Decimal]], held: dict) -> None:
    got, still_open = build_round_trips(with_fees(fills, D("0.0003"), D(3)))
    assert [(r.quantity, r.entry_price, r.exit_price) for r in got] == trips
    assert {p.symbol: p.quantity for p in still_open} == held


def test_pnl_fees_and_r_of_a_round_trip() -> None:
    (trip,), _ = build_round_trips(
        with_fees([fill("buy", 100, "100", "10:00"), fill("sell", 100, "110", "11:00")], D("0.0003"), D(3))
    )
    fees = hkex.trading_costs(D(10000), D("0.0003"), D(3)).total + hkex.trading_costs(D(11000), D("0.0003"), D(3)).total
    assert trip.fees == fees
    assert trip.pnl == D(1000) - fees
    assert trip.r_multiple == pytest.approx(float((D(1000) - fees) / (100 * (D(100) - D(95)))))


@pytest.mark.parametrize("stop", [None, "100", "105"])  # none, at the entry, above it: no risk, so no R
def test_no_r_without_a_stop_below_the_entry(stop: str | None) -> None:
    (trip,), _ = build_round_trips([fill("buy", 100, "100", "10:00", stop=stop), fill("sell", 100, "90", "11:00")])
    assert trip.r_multiple is None


def test_drawdown_is_measured_from_the_running_peak() -> None:
    points = [EquityPoint(t("10:00"), D(v)) for v in (100, 110, 99, 120, 108)]
    dd = drawdowns(points)
    assert [below for _, below, _ in dd] == [D(0), D(0), D(11), D(0), D(12)]
    assert max(f for _, _, f in dd if f is not None) == pytest.approx(0.1)  # 11 / 110 beats 12 / 120


@pytest.mark.parametrize(
    ("result", "reason", "rules"),
    [
        ({"failed_rules": [{"rule": "board_lot", "why": "not a whole lot"}]}, "x", (("board_lot", "not a whole lot"),)),
        (None, "cash: no cash; daily_trades: 10 of 10", (("cash", "no cash"), ("daily_trades", "10 of 10"))),
        (None, "invalid input", (("", "invalid input"),)),  # not a rule: shown as the reason
    ],
)  # fmt: skip
def test_refused_rules_come_from_the_verdict_or_the_reason(result: object, reason: str, rules: tuple) -> None:
    assert _rules_of(result, reason) == rules


# ------------------------------------------------------------------------------- journals written directly


def journal_trip(
    journal: Journal, cycle: int, symbol: str, quantity: int, prices: tuple[str, str, str], times: tuple[datetime, ...]
) -> None:
    """A filled entry (with its stop) and a filled exit, written as the executor writes them."""
    entry, exit_, stop = (D(p) for p in prices)
    for side, price, at in ((Side.BUY, entry, times[0]), (Side.SELL, exit_, times[1])):
        coid = f"CI-{symbol}-{side.value}-{at:%Y%m%d%H%M}"
        journal.insert_order(
            OrderIntent(
                client_order_id=coid, cycle_id=cycle, symbol=symbol, side=side, quantity=quantity,
                order_type=OrderType.LIMIT if side == Side.BUY else OrderType.MARKET,
                limit_price=entry if side == Side.BUY else None, stop_loss=stop if side == Side.BUY else None,
                take_profit=entry * D("1.05") if side == Side.BUY else None,
                reason="entry" if side == Side.BUY else "stop loss hit", trading_date=at.date(), created_at=at,
            )
        )  # fmt: skip
        journal.update_order(coid, status=OrderStatus.FILLED, filled_quantity=quantity, avg_fill_price=price, at=at)


def futu_cycle(journal: Journal, at: datetime) -> int:
    cycle = journal.start_cycle(run_id=f"r{at:%m%d%H%M}", mode="trade", broker="futu", brain="claude",
                                model="claude-sonnet-5-5", started_at=at, trading_date=at.date())  # fmt: skip
    journal.finish_cycle(cycle, status="ok", finished_at=at + timedelta(minutes=1), summary="done", cost_usd=0.02)
    return cycle


def minute_bars(start: datetime, count: int, price: str) -> list[Bar]:
    p = D(price)
    return [Bar(time=start + timedelta(minutes=i), open=p, high=p + 1, low=p - 1, close=p, volume=1000)
            for i in range(count)]  # fmt: skip


def test_a_trade_without_bars_is_shown_without_a_chart_and_says_so(
    journal: Journal, database_url: str, tmp_path: Path
) -> None:
    cycle = futu_cycle(journal, t("10:00"))
    journal.record_decision(cycle, "buy HK.00700", "momentum", 0.6)
    journal_trip(journal, cycle, "HK.00700", 100, ("400", "390", "392"), (t("10:01"), t("11:00")))
    secrets = Secrets(database_url=SecretStr(database_url))
    out = tmp_path / "futu.html"

    page = parse_page(write_report(Period(date(2026, 11, 20), date(2026, 11, 20)), Settings(), secrets, t("17:00"),
                                   str(out)).html)  # fmt: skip
    assert page.figures["round_trips"] == "1"
    fees = hkex.trading_costs(D(40000), D("0.0003"), D(3)).total + hkex.trading_costs(D(39000), D("0.0003"), D(3)).total
    assert money(page.figures["pnl_hkd"]) == D(-1000) - fees
    assert [c["data-chart"] for c in page.charts] == ["equity", "drawdown"]
    (note,) = page.no_chart
    assert "HK.00700" in note and "no minute bars" in note and "shown without a chart" in note

    journal.put_klines("HK.00700", "1m", minute_bars(t("09:30"), 150, "395"))  # what the cache would hold
    page = parse_page(write_report(Period(date(2026, 11, 20), date(2026, 11, 20)), Settings(), secrets, t("17:00"),
                                   str(out)).html)  # fmt: skip
    assert page.no_chart == [] and [c["data-symbol"] for c in page.charts if c["data-chart"] == "trade"] == ["HK.00700"]


def test_a_busy_month_stays_a_few_megabytes(journal: Journal, database_url: str, tmp_path: Path) -> None:
    days = [date(2026, 11, 2) + timedelta(days=i) for i in range(28)]
    days = [d for d in days if d.weekday() < 5][:20]
    symbols = ["HK.00700", "HK.00005", "HK.09988", "HK.01299", "HK.00388", "HK.03690", "HK.01810", "HK.00941"]
    for day in days:
        cycle = futu_cycle(journal, datetime.combine(day, datetime.min.time(), HKT) + timedelta(hours=9, minutes=30))
        for i, symbol in enumerate(symbols):
            start = datetime.combine(day, datetime.min.time(), HKT) + timedelta(hours=9, minutes=35 + 10 * i)
            journal_trip(journal, cycle, symbol, 100, ("100", "101" if i % 2 else "99", "97"),
                         (start, start + timedelta(minutes=60)))  # fmt: skip
            journal.put_klines(symbol, "1m", minute_bars(start - timedelta(minutes=30), 120, "100"))
    out = tmp_path / "month.html"
    evening = datetime.combine(days[-1], datetime.min.time(), HKT) + timedelta(hours=17)
    secrets = Secrets(database_url=SecretStr(database_url))
    written = write_report(Period(days[0], days[-1]), Settings(), secrets, evening, str(out))
    page = parse_page(written.html)
    assert page.figures["round_trips"] == str(len(days) * len(symbols)) == "160"
    print(f"a month of {len(days) * len(symbols)} round trips: {out.stat().st_size:,} bytes")
    assert out.stat().st_size < 5_000_000, f"{out.stat().st_size:,} bytes"
    assert len([c for c in page.charts if c["data-chart"] == "trade"]) == 150  # the rest say why they have none
    assert len(page.no_chart) == 10 and all("only the first 150" in n for n in page.no_chart)
