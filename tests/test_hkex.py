"""Tests for brokers/hkex.py: symbols, the dated spread table, board lots and costs (pure rules, no fixtures)."""

from __future__ import annotations

import itertools
from datetime import date
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from brokers import hkex
from brokers.base import Side

D = Decimal
OLD = date(2025, 8, 1)  # Friday before Phase 1: the old table
NEW = date(2025, 8, 4)  # Monday Phase 1 took effect


# ----------------------------------------------------------------------------------------------------------- symbols


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("700", "HK.00700"),  # bare code as people say it
        ("0700", "HK.00700"),  # the 4-digit form on screens
        ("00700", "HK.00700"),  # the 5-digit exchange form
        ("HK.00700", "HK.00700"),  # already canonical (Futu's form)
        ("hk.700", "HK.00700"),  # lower-case prefix, short code
        ("700.HK", "HK.00700"),  # Yahoo-style suffix
        ("0700.hk", "HK.00700"),  # lower-case suffix
        (" 0700 ", "HK.00700"),  # surrounding spaces
        ("5", "HK.00005"),  # one digit
        ("9988", "HK.09988"),  # four significant digits
        ("80737", "HK.80737"),  # five significant digits
    ],
)
def test_normalize_symbol_accepts_common_forms(text: str, expected: str) -> None:
    assert hkex.normalize_symbol(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),  # nothing typed
        ("   ", "empty"),  # only spaces
        ("TCEHY", "not a Hong Kong stock code"),  # a ticker, not digits
        ("07OO", "not a Hong Kong stock code"),  # letter O instead of zero
        ("HK.ABC", "not a Hong Kong stock code"),  # HK prefix but no digits
        ("123456", "6 digits"),  # too long for HKEX
        ("HK.000700", "6 digits"),  # too long even if zero-padded
        ("0", "code 0"),  # zero is not a listed stock
        ("HK.00000", "code 0"),  # zero in canonical form
        ("US.AAPL", "market 'US'"),  # another market's prefix
        ("SH.600000", "market 'SH'"),  # Shanghai A share
        ("700.US", "market 'US'"),  # another market's suffix
        ("-700", "not a Hong Kong stock code"),  # a sign is not a digit
    ],
)
def test_normalize_symbol_rejects_with_accepted_forms(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        hkex.normalize_symbol(text)
    assert "'HK.00700'" in str(info.value)  # the message says which forms are accepted


@pytest.mark.parametrize(
    ("symbol", "expected"),
    [
        ("HK.00700", "0700"),  # 4-digit padded form people use
        ("HK.00005", "0005"),  # keeps the padding to 4 digits
        ("HK.09988", "9988"),  # drops the fifth (leading zero) digit
        ("HK.80737", "80737"),  # five significant digits stay
        ("700", "0700"),  # any accepted form works
    ],
)
def test_short_symbol(symbol: str, expected: str) -> None:
    assert hkex.short_symbol(symbol) == expected


# ----------------------------------------------------------------------------------------------------- spread table


@pytest.mark.parametrize(
    ("price", "on", "side", "expected"),
    [
        ("0.01", OLD, None, "0.001"),  # the lowest price
        ("0.25", OLD, None, "0.001"),  # 0.25 belongs to "0.01 to 0.25"
        ("0.25", OLD, Side.BUY, "0.001"),  # step down from 0.25 is 0.249
        ("0.25", OLD, Side.SELL, "0.005"),  # step up from 0.25 is 0.255
        ("0.255", OLD, None, "0.005"),  # "over 0.25 to 0.50"
        ("0.50", OLD, None, "0.005"),  # upper edge of that band
        ("0.50", OLD, Side.SELL, "0.01"),  # step up to 0.51
        ("0.51", OLD, None, "0.01"),  # "over 0.50 to 10.00"
        ("10.00", OLD, None, "0.01"),  # 10.00 belongs to the lower band
        ("10.00", OLD, Side.BUY, "0.01"),  # step down to 9.99
        ("10.00", OLD, Side.SELL, "0.02"),  # step up to 10.02 (old table)
        ("10.02", OLD, None, "0.02"),  # "over 10 to 20", old table
        ("20.00", OLD, None, "0.02"),  # top of the old 10-20 band
        ("20.00", OLD, Side.SELL, "0.05"),  # step up to 20.05 (old 20-100 band)
        ("20.05", OLD, None, "0.05"),  # old "over 20 to 100"
        ("50.00", OLD, None, "0.05"),  # no band edge at 50 in the old table
        ("50.00", OLD, Side.SELL, "0.05"),  # ... so stepping up is still 0.05
        ("100.00", OLD, Side.SELL, "0.10"),  # step up into "over 100 to 200"
        ("100.10", OLD, None, "0.10"),  # inside 100-200
        ("200.00", OLD, None, "0.10"),  # top of 100-200
        ("200.20", OLD, None, "0.20"),  # inside 200-500
        ("500.00", OLD, Side.SELL, "0.50"),  # step up into 500-1000
        ("1000.00", OLD, None, "0.50"),  # top of 500-1000
        ("1001.00", OLD, None, "1.00"),  # inside 1000-2000
        ("2000.00", OLD, Side.SELL, "2.00"),  # step up into 2000-5000
        ("5000.00", OLD, None, "2.00"),  # top of 2000-5000
        ("5005.00", OLD, None, "5.00"),  # inside 5000-9995
        ("9995.00", OLD, None, "5.00"),  # the highest price
        ("9995.00", OLD, Side.SELL, "5.00"),  # no step above the top: the band's own tick
        ("10.00", NEW, Side.SELL, "0.01"),  # Phase 1: 10-20 is now 0.01
        ("10.01", NEW, None, "0.01"),  # a price only the new table allows
        ("15.00", NEW, None, "0.01"),  # middle of 10-20, new
        ("20.00", NEW, None, "0.01"),  # top of 10-20, new
        ("20.00", NEW, Side.SELL, "0.02"),  # step up into new 20-50
        ("20.02", NEW, None, "0.02"),  # new "over 20 to 50"
        ("50.00", NEW, None, "0.02"),  # top of new 20-50
        ("50.00", NEW, Side.BUY, "0.02"),  # step down to 49.98
        ("50.00", NEW, Side.SELL, "0.05"),  # step up into 50-100
        ("50.05", NEW, None, "0.05"),  # new "over 50 to 100"
        ("100.00", NEW, None, "0.05"),  # unchanged above 50
        ("5.00", NEW, None, "0.01"),  # 0.50-10 unchanged by Phase 1
        ("15.00", date(2025, 8, 3), None, "0.02"),  # Sunday before Phase 1: still the old table
    ],
)
def test_tick_size_at_and_around_band_edges(price: str, on: date, side: Side | None, expected: str) -> None:
    assert hkex.tick_size(D(price), on, side) == D(expected)


@pytest.mark.parametrize(
    "price",
    [
        "0.009",  # below the lowest price
        "0",  # zero
        "-1",  # negative
        "9995.01",  # above the highest price
    ],
)
def test_tick_size_outside_the_table_raises(price: str) -> None:
    with pytest.raises(ValueError, match="outside the HKEX spread table"):
        hkex.tick_size(D(price), NEW)


def test_spread_tables_are_dated_and_ordered() -> None:
    dates = [effective for effective, _ in hkex.SPREAD_TABLES]
    assert dates == sorted(dates)
    assert hkex.spread_table(date(2025, 8, 3)) != hkex.spread_table(date(2025, 8, 4))
    for _, ladder in hkex.SPREAD_TABLES:
        uppers = [band.upper for band in ladder]
        assert uppers == sorted(uppers) and uppers[-1] == hkex.MAX_PRICE
        for lower, upper in itertools.pairwise(ladder):
            # Every boundary is on both neighbouring grids, which is what makes rounding inside a band safe.
            assert lower.upper % lower.tick == 0 and lower.upper % upper.tick == 0


@pytest.mark.parametrize(
    ("price", "side", "on", "tick", "expected"),
    [
        ("312.43", Side.BUY, NEW, None, "312.40"),  # buy rounds down (0.20 band)
        ("312.43", Side.SELL, NEW, None, "312.60"),  # sell rounds up
        ("312.40", Side.BUY, NEW, None, "312.40"),  # already on the grid: unchanged
        ("312.40", Side.SELL, NEW, None, "312.40"),  # already on the grid: unchanged
        ("10.01", Side.BUY, OLD, None, "10.00"),  # old 0.02 band: down to the boundary
        ("10.01", Side.SELL, OLD, None, "10.02"),  # old 0.02 band: up
        ("10.01", Side.BUY, NEW, None, "10.01"),  # on the new 0.01 grid
        ("20.03", Side.BUY, OLD, None, "20.00"),  # old 0.05 band rounds down to 20.00
        ("20.03", Side.SELL, OLD, None, "20.05"),  # ... and up to 20.05
        ("20.03", Side.BUY, NEW, None, "20.02"),  # new 0.02 band
        ("20.03", Side.SELL, NEW, None, "20.04"),  # new 0.02 band
        ("49.99", Side.SELL, NEW, None, "50.00"),  # up onto the 50 boundary
        ("50.01", Side.BUY, NEW, None, "50.00"),  # down onto the 50 boundary from the 0.05 band
        ("50.01", Side.SELL, NEW, None, "50.05"),  # up inside the 0.05 band
        ("0.2501", Side.SELL, NEW, None, "0.255"),  # just above 0.25: 0.005 grid
        ("0.0100", Side.BUY, NEW, None, "0.010"),  # the minimum price itself
        ("0.004", Side.SELL, NEW, None, "0.01"),  # below the minimum: a sell rounds up to 0.01
        ("12000", Side.BUY, NEW, None, "9995.00"),  # above the maximum: a buy rounds down to 9995
        ("5.003", Side.BUY, NEW, "0.005", "5.000"),  # broker tick (Phase 2 style) preferred over the table
        ("5.003", Side.SELL, NEW, "0.005", "5.005"),  # same, rounding up
        ("612.30", Side.SELL, NEW, "0.50", "612.50"),  # snapshot's price_spread
    ],
)
def test_round_to_tick(price: str, side: Side, on: date, tick: str | None, expected: str) -> None:
    result = hkex.round_to_tick(D(price), side, on, D(tick) if tick else None)
    assert result == D(expected)
    assert str(result) == expected  # shown with the tick's decimals


@pytest.mark.parametrize(
    ("price", "side", "tick", "message"),
    [
        ("0.005", Side.BUY, None, "outside the HKEX spread table"),  # no valid price at or below it
        ("0", Side.SELL, None, "must be positive"),  # not a price
        ("9995.5", Side.SELL, None, "outside the HKEX spread table"),  # no valid price at or above it
        ("10", Side.BUY, "0", "tick must be positive"),  # a zero tick from a bad snapshot
        ("0.004", Side.BUY, "0.01", "rounds to 0.00"),  # broker tick rounds a buy to nothing
    ],
)
def test_round_to_tick_refuses_impossible_prices(price: str, side: Side, tick: str | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        hkex.round_to_tick(D(price), side, NEW, D(tick) if tick else None)


@pytest.mark.parametrize(
    ("price", "on", "tick", "expected"),
    [
        ("312.40", NEW, None, True),  # on the 0.20 grid
        ("312.50", NEW, None, False),  # off the 0.20 grid
        ("10.01", NEW, None, True),  # valid after Phase 1
        ("10.01", OLD, None, False),  # not valid before it
        ("25.02", NEW, None, True),  # new 0.02 grid
        ("25.02", OLD, None, False),  # old 0.05 grid
        ("20.00", OLD, None, True),  # a boundary is always valid
        ("0.001", NEW, None, False),  # below the minimum price
        ("10000", NEW, None, False),  # above the maximum price
        ("9995", NEW, None, True),  # the maximum price itself is a price
        ("0.01", NEW, None, True),  # and so is the minimum
        ("5.005", NEW, None, False),  # Phase 2 price, not in our table yet
        ("5.005", NEW, "0.005", True),  # ... but valid when the broker says the tick is 0.005
    ],
)
def test_is_on_tick(price: str, on: date, tick: str | None, expected: bool) -> None:
    assert hkex.is_on_tick(D(price), on, D(tick) if tick else None) is expected


# -------------------------------------------------------------------------------------------------- property tests

_prices = st.decimals(min_value=D("0.01"), max_value=D("9995"), places=4, allow_nan=False, allow_infinity=False)
_dates = st.sampled_from([date(2024, 1, 2), OLD, NEW, date(2026, 1, 5)])
_sides = st.sampled_from([Side.BUY, Side.SELL])


@given(price=_prices, on=_dates, side=_sides)
def test_rounded_price_is_on_the_grid(price: Decimal, on: date, side: Side) -> None:
    assert hkex.is_on_tick(hkex.round_to_tick(price, side, on), on)


@given(price=_prices, on=_dates)
def test_buy_rounds_down_and_sell_rounds_up_never_crossing(price: Decimal, on: date) -> None:
    buy = hkex.round_to_tick(price, Side.BUY, on)
    sell = hkex.round_to_tick(price, Side.SELL, on)
    assert buy <= price <= sell
    # Nearest on each side: no valid price lies strictly between the rounded price and the input.
    if buy < price:
        assert buy + hkex.tick_size(buy, on, Side.SELL) > price
    if sell > price:
        assert sell - hkex.tick_size(sell, on, Side.BUY) < price


@given(price=_prices, on=_dates, side=_sides)
def test_rounding_is_idempotent(price: Decimal, on: date, side: Side) -> None:
    once = hkex.round_to_tick(price, side, on)
    assert hkex.round_to_tick(once, side, on) == once
    assert hkex.round_to_tick(once, Side.BUY if side is Side.SELL else Side.SELL, on) == once


# ------------------------------------------------------------------------------------------------------ board lots


@pytest.mark.parametrize(
    ("quantity", "lot", "whole", "floored"),
    [
        (100, 100, True, 100),  # one lot of Tencent
        (250, 100, False, 200),  # two and a half lots
        (99, 100, False, 0),  # less than a lot
        (0, 100, False, 0),  # nothing is not an order
        (400, 400, True, 400),  # one lot of HSBC
        (1200, 400, True, 1200),  # three lots
        (50, 50, True, 50),  # JD's 50-share lot
        (3999, 2000, False, 2000),  # PetroChina, just short of two lots
        (-100, 100, False, None),  # negative quantities are not share counts
    ],
)
def test_board_lots(quantity: int, lot: int, whole: bool, floored: int | None) -> None:
    assert hkex.is_whole_lots(quantity, lot) is whole
    if floored is None:
        with pytest.raises(ValueError, match="negative"):
            hkex.floor_to_lots(quantity, lot)
    else:
        assert hkex.floor_to_lots(quantity, lot) == floored


@pytest.mark.parametrize("lot", [0, -100])
def test_board_lot_must_be_positive(lot: int) -> None:
    with pytest.raises(ValueError, match="Board lot size must be a positive"):
        hkex.is_whole_lots(100, lot)
    with pytest.raises(ValueError, match="Board lot size must be a positive"):
        hkex.floor_to_lots(100, lot)


# ----------------------------------------------------------------------------------------------------------- costs


def test_costs_worked_example() -> None:
    # BUY (or SELL) 100 Tencent at 612.50 = HK$61,250.00 with 0.03 % commission, minimum HK$3:
    #   commission     61,250 x 0.0003    = 18.375   -> 18.38
    #   stamp duty     61,250 x 0.001     = 61.25    -> 62 (rounded UP to a whole dollar)
    #   SFC levy       61,250 x 0.000027  = 1.65375  -> 1.65
    #   AFRC levy      61,250 x 0.0000015 = 0.091875 -> 0.09
    #   trading fee    61,250 x 0.0000565 = 3.460625 -> 3.46
    #   settlement fee 61,250 x 0.000042  = 2.5725   -> 2.57
    #   total                                           88.15
    costs = hkex.trading_costs(D("61250.00"), 0.0003, D(3))
    assert costs == hkex.CostBreakdown(
        gross_value=D("61250.00"),
        commission=D("18.38"),
        stamp_duty=D("62"),
        sfc_levy=D("1.65"),
        afrc_levy=D("0.09"),
        trading_fee=D("3.46"),
        settlement_fee=D("2.57"),
        total=D("88.15"),
    )


@pytest.mark.parametrize(
    ("gross", "pct", "minimum", "field", "expected"),
    [
        ("1000.00", "0.0003", "3", "commission", "3.00"),  # 0.30 commission lifted to the HK$3 minimum
        ("1000.00", "0.0003", "3", "stamp_duty", "1"),  # exactly HK$1.00 of stamp duty
        ("1000.01", "0.0003", "3", "stamp_duty", "2"),  # one cent more rounds stamp duty UP to HK$2
        ("0.50", "0.0003", "3", "stamp_duty", "1"),  # any trade pays at least HK$1 stamp duty
        ("100000", "0", "0", "commission", "0.00"),  # commission-free broker
        ("100000", "0", "0", "total", "112.70"),  # statutory only: 100 + 2.70 + 0.15 + 5.65 + 4.20
        ("0", "0.0003", "3", "total", "0.00"),  # nothing traded, nothing charged
    ],
)
def test_cost_components(gross: str, pct: str, minimum: str, field: str, expected: str) -> None:
    costs = hkex.trading_costs(D(gross), D(pct), D(minimum))
    assert getattr(costs, field) == D(expected)


def test_costs_are_the_same_float_or_decimal_rate_and_frozen() -> None:
    by_float = hkex.trading_costs(D("61250"), 0.0003, D(3))
    by_decimal = hkex.trading_costs(D("61250"), D("0.0003"), D(3))
    assert by_float == by_decimal
    with pytest.raises(ValueError):  # pydantic frozen model
        by_float.total = D(0)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("gross", "pct", "minimum"),
    [
        ("-1", "0.0003", "3"),  # negative trade value
        ("100", "-0.1", "3"),  # negative commission rate
        ("100", "0.0003", "-3"),  # negative minimum
    ],
)
def test_costs_reject_negative_inputs(gross: str, pct: str, minimum: str) -> None:
    with pytest.raises(ValueError, match="negative"):
        hkex.trading_costs(D(gross), D(pct), D(minimum))


def test_settlement_is_t_plus_2() -> None:
    assert hkex.SETTLEMENT_DAYS == 2


# ------------------------------------------------------------------------------- edges the mutation run found
# Each row below failed to be noticed by the tables above when one line of hkex.py was changed (see
# docs/mutation.md). The messages are part of the contract: they name what was wrong.


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: hkex.normalize_symbol(700), "Symbol must be text, got 700 (int). Use '700'"),  # not a string
        (lambda: hkex.tick_size("abc", NEW), "Price 'abc' is not a number."),  # not a number
        (lambda: hkex.tick_size(D("0.001"), NEW), "Price 0.001 is outside the HKEX spread table"),  # too low
        (lambda: hkex.round_to_tick("abc", Side.BUY, NEW), "Price 'abc' is not a number."),
        (lambda: hkex.round_to_tick(D(10), Side.BUY, NEW, "x"), "Tick 'x' is not a number."),  # a bad snapshot
        (lambda: hkex.is_on_tick(D(10), NEW, "x"), "Tick 'x' is not a number."),
        (lambda: hkex.trading_costs("x", D(0), D(0)), "Gross value 'x' is not a number."),
        (lambda: hkex.trading_costs(D(1), "x", D(0)), "Commission rate 'x' is not a number."),
        (lambda: hkex.trading_costs(D(1), D(0), "x"), "Minimum commission 'x' is not a number."),
        (lambda: hkex.to_decimal("inf", "Price"), "Price 'inf' is not a finite number."),
        (lambda: hkex.to_decimal("x"), "value 'x' is not a number."),  # the default label
        (lambda: hkex.round_to_tick(D("9995.5"), Side.SELL, NEW), "SELL price 9995.5 is outside the HKEX spread"),
        (lambda: hkex.round_to_tick(D("0.005"), Side.BUY, NEW), "BUY price 0.005 is outside the HKEX spread"),
        (lambda: hkex.round_to_tick(D("0.004"), Side.BUY, NEW, D("0.01")), "BUY price 0.004 rounds to 0.00, outside"),
    ],
)
def test_errors_name_what_was_wrong(call, message: str) -> None:
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize(
    ("price", "tick", "expected"),
    [
        ("abc", None, False),  # not a number is not a valid price
        ("10", "0", False),  # a zero tick from a bad snapshot validates nothing
        ("10", "-0.01", False),  # nor does a negative one
    ],
)
def test_is_on_tick_is_false_for_what_is_not_a_price(price: str, tick: str | None, expected: bool) -> None:
    assert hkex.is_on_tick(price, NEW, D(tick) if tick else None) is expected


def test_a_sell_at_the_5000_boundary_steps_up_into_the_last_band() -> None:
    assert hkex.tick_size(D(5000), NEW, Side.SELL) == D(5)  # 5000 -> 5005, the 9995 band's tick
    assert hkex.tick_size(D(9995), NEW, Side.SELL) == D(5)  # the table's end: no band above


def test_a_whole_number_broker_tick_rounds_to_whole_dollars() -> None:
    assert hkex.round_to_tick(D("1234.5"), Side.BUY, NEW, D(1)) == D(1234)
    assert hkex.round_to_tick(D("1234.5"), Side.SELL, NEW, 1) == D(1235)


@pytest.mark.parametrize(
    ("quantity", "lot", "whole", "floored"),
    [
        (1, 1, True, 1),  # a one-share lot (some warrants and high-priced stocks) is a valid lot
        (7, 1, True, 7),  # any count of one-share lots is whole
    ],
)
def test_one_share_lots(quantity: int, lot: int, whole: bool, floored: int) -> None:
    assert hkex.is_whole_lots(quantity, lot) is whole
    assert hkex.floor_to_lots(quantity, lot) == floored


def test_cents_round_half_up_not_half_even() -> None:
    # 10,000 x 0.00125 % = 0.125: half up gives 0.13 (half even would give 0.12).
    assert hkex.trading_costs(D(10_000), D("0.0000125"), D(0)).commission == D("0.13")


def test_nothing_traded_pays_no_stamp_duty() -> None:
    costs = hkex.trading_costs(D(0), D("0.0003"), D(3))
    assert (costs.stamp_duty, costs.commission, costs.total) == (D(0), D(0), D(0))


def test_rounded_prices_carry_the_ticks_decimals() -> None:
    # 0.01 is on the grid: a sell keeps it, shown with the 0.001 tick's three decimals like any price there.
    assert str(hkex.round_to_tick(D("0.01"), Side.SELL, NEW)) == "0.010"
    assert str(hkex.round_to_tick(D("312.3"), Side.BUY, NEW)) == "312.20"


@pytest.mark.parametrize(
    ("side", "quantity", "price", "sign"),
    [(Side.BUY, 100, Decimal("649.5"), -1), (Side.SELL, 400, Decimal("106.6"), 1), (Side.BUY, 3, Decimal("0.333"), -1)],
)
def test_order_preview_is_gross_in_cents_with_one_sides_costs_and_the_cash_it_moves(
    side: Side, quantity: int, price: Decimal, sign: int
) -> None:
    preview = hkex.order_preview("HK.00700", side, quantity, price, Decimal("0.0003"), Decimal(3))
    gross = (price * quantity).quantize(Decimal("0.01"))
    costs = hkex.trading_costs(gross, Decimal("0.0003"), Decimal(3)).total
    assert (preview.symbol, preview.side, preview.quantity, preview.price) == ("HK.00700", side, quantity, price)
    assert preview.gross_value == gross and preview.costs == costs and costs > 0
    # A buy takes the value plus its costs out of cash; a sell brings the value less its costs in.
    assert preview.net_cash_change == sign * gross - costs
