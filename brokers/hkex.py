"""HKEX exchange rules as pure functions: symbols, the dated spread table (ticks), board lots, costs.

No I/O and no clock reads: every function takes what it needs (including the date) as arguments, so the
arithmetic is tested without a broker. The broker adapters look the per-stock facts up (lot size, the
snapshot's ``price_spread``) and pass them in.

Sources: HKEX Rules of the Exchange, Schedule "Spread Table" (Part A, equities); HKEX "Reduction of Minimum
Spreads" (Phase 1 in force from 2025-08-04); HKEX/SFC/AFRC fee schedules; Stamp Duty Ordinance (0.1 % per
side since 2023-11-17).
"""

from __future__ import annotations

import re
from datetime import date
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_UP, Decimal, InvalidOperation
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict

from brokers.base import OrderPreview, Side

# --------------------------------------------------------------------------------------------------------------
# Symbols
# --------------------------------------------------------------------------------------------------------------

MARKET_PREFIX = "HK."
_ACCEPTED_FORMS = "'700', '0700', '00700', 'HK.00700', 'hk.700' or '700.HK' (1 to 5 digits, not 0)"
_PREFIXED = re.compile(r"^HK\.([0-9]+)$")
_SUFFIXED = re.compile(r"^([0-9]+)\.HK$")
_BARE = re.compile(r"^[0-9]+$")
_OTHER_MARKET = re.compile(r"^([A-Z]+)\.|\.([A-Z]+)$")


def normalize_symbol(text: str) -> str:
    """Return the canonical ``HK.00700`` form of a Hong Kong stock code written any common way.

    Raises ValueError naming the accepted forms for empty text, non-digits, more than 5 digits, code 0 and
    symbols of other markets (``US.AAPL``, ``SH.600000``).
    """
    if not isinstance(text, str):
        raise ValueError(f"Symbol must be text, got {text!r} ({type(text).__name__}). Use {_ACCEPTED_FORMS}.")
    cleaned = text.strip().upper()
    if not cleaned:
        raise ValueError(f"Symbol is empty. Use {_ACCEPTED_FORMS}.")
    match = _PREFIXED.match(cleaned) or _SUFFIXED.match(cleaned)
    if match:
        digits = match.group(1)
    elif _BARE.match(cleaned):
        digits = cleaned
    else:
        other = _OTHER_MARKET.search(cleaned)
        if other and (other.group(1) or other.group(2)) != "HK":
            market = other.group(1) or other.group(2)
            raise ValueError(
                f"Symbol {text!r} is on market {market!r}; this agent trades Hong Kong stocks only. "
                f"Use {_ACCEPTED_FORMS}."
            )
        raise ValueError(f"Symbol {text!r} is not a Hong Kong stock code. Use {_ACCEPTED_FORMS}.")
    if len(digits) > 5:
        raise ValueError(f"Symbol {text!r} has {len(digits)} digits; HKEX codes have at most 5. Use {_ACCEPTED_FORMS}.")
    if int(digits) == 0:
        raise ValueError(f"Symbol {text!r} is code 0, which is not a listed stock. Use {_ACCEPTED_FORMS}.")
    return f"{MARKET_PREFIX}{int(digits):05d}"


def short_symbol(symbol: str) -> str:
    """Return the short code people write: ``HK.00700`` -> ``0700``, ``HK.09988`` -> ``9988``, ``HK.80737`` stays.

    Four digits, zero-padded; five when the code needs them. Accepts any form ``normalize_symbol`` accepts.
    """
    code = normalize_symbol(symbol)[len(MARKET_PREFIX) :]
    return code[1:] if code.startswith("0") else code


# --------------------------------------------------------------------------------------------------------------
# Spread table (tick sizes)
# --------------------------------------------------------------------------------------------------------------


class SpreadBand(NamedTuple):
    """One row of the spread table: prices *over* the previous row's ``upper`` *up to and including* ``upper``."""

    upper: Decimal
    tick: Decimal


MIN_PRICE = Decimal("0.01")  # the lowest price the spread table allows
MAX_PRICE = Decimal("9995")  # the highest (the last band ends at 9,995)

_D = Decimal

# Part A spread table (equities, REITs and other applicable securities), in force for many years before 2025.
_LADDER_BEFORE_2025_08_04: tuple[SpreadBand, ...] = (
    SpreadBand(_D("0.25"), _D("0.001")),
    SpreadBand(_D("0.50"), _D("0.005")),
    SpreadBand(_D("10.00"), _D("0.01")),
    SpreadBand(_D("20.00"), _D("0.02")),
    SpreadBand(_D("100.00"), _D("0.05")),
    SpreadBand(_D("200.00"), _D("0.10")),
    SpreadBand(_D("500.00"), _D("0.20")),
    SpreadBand(_D("1000.00"), _D("0.50")),
    SpreadBand(_D("2000.00"), _D("1.00")),
    SpreadBand(_D("5000.00"), _D("2.00")),
    SpreadBand(_D("9995.00"), _D("5.00")),
)

# Reduction of Minimum Spreads, Phase 1 (from Monday 2025-08-04): 10-20 0.02 -> 0.01; 20-50 0.05 -> 0.02
# (which splits the old 20-100 band at 50). Excludes ETPs, debt securities and structured products, which
# this agent does not trade.
_LADDER_FROM_2025_08_04: tuple[SpreadBand, ...] = (
    SpreadBand(_D("0.25"), _D("0.001")),
    SpreadBand(_D("0.50"), _D("0.005")),
    SpreadBand(_D("10.00"), _D("0.01")),
    SpreadBand(_D("20.00"), _D("0.01")),
    SpreadBand(_D("50.00"), _D("0.02")),
    SpreadBand(_D("100.00"), _D("0.05")),
    SpreadBand(_D("200.00"), _D("0.10")),
    SpreadBand(_D("500.00"), _D("0.20")),
    SpreadBand(_D("1000.00"), _D("0.50")),
    SpreadBand(_D("2000.00"), _D("1.00")),
    SpreadBand(_D("5000.00"), _D("2.00")),
    SpreadBand(_D("9995.00"), _D("5.00")),
)

SPREAD_TABLES: tuple[tuple[date, tuple[SpreadBand, ...]], ...] = (
    (date.min, _LADDER_BEFORE_2025_08_04),
    (date(2025, 8, 4), _LADDER_FROM_2025_08_04),
    # Phase 2 (0.50-10.00: 0.01 -> 0.005) was announced for around mid-2026; add its ladder here with the
    # effective date once HKEX confirms it. Until then the broker snapshot's price_spread wins (see round_to_tick).
)
"""The spread table as dated data, oldest first: each ladder is in force from its date until the next one."""


def spread_table(on: date) -> tuple[SpreadBand, ...]:
    """The ladder of spread bands in force on ``on``."""
    current = SPREAD_TABLES[0][1]
    for effective, ladder in SPREAD_TABLES:
        if effective <= on:
            current = ladder
        else:
            break
    return current


def to_decimal(value: Decimal | int | float | str, what: str = "value") -> Decimal:
    """Convert a price/amount to a finite ``Decimal``; floats go through ``str`` so 0.1 stays 0.1."""
    try:
        result = value if isinstance(value, Decimal) else Decimal(str(value))
    except (InvalidOperation, ValueError) as exc:
        raise ValueError(f"{what} {value!r} is not a number.") from exc
    if not result.is_finite():
        raise ValueError(f"{what} {value!r} is not a finite number.")
    return result


def _band_index(price: Decimal, ladder: tuple[SpreadBand, ...]) -> int:
    # "Over X to Y": a price exactly on a boundary belongs to the lower band.
    for index, band in enumerate(ladder):
        if price <= band.upper:
            return index
    return len(ladder) - 1


def _check_price_range(price: Decimal, what: str) -> None:
    if price < MIN_PRICE or price > MAX_PRICE:
        raise ValueError(
            f"{what} {price} is outside the HKEX spread table ({MIN_PRICE} to {MAX_PRICE}); no order can use it."
        )


def tick_size(price: Decimal, on: date, side: Side | None = None) -> Decimal:
    """The minimum price step at ``price`` on date ``on`` per the dated HKEX spread table.

    Bands are "over X up to and including Y", so a boundary price (10.00, 20.00, ...) belongs to the lower band
    and ``side=None`` returns that band's tick (10.00 -> 0.01). ``side`` asks for the step in the direction that
    side rounds, which differs only on a boundary: BUY is the step *down* (10.00 -> 9.99: 0.01), SELL the step
    *up* (old table: 10.00 -> 10.02: 0.02). At the table's ends there is no further step; the band's own tick
    is returned. Raises ValueError outside 0.01-9995.
    """
    price = to_decimal(price, "Price")
    _check_price_range(price, "Price")
    ladder = spread_table(on)
    index = _band_index(price, ladder)
    if side is Side.SELL and price == ladder[index].upper and index + 1 < len(ladder):
        return ladder[index + 1].tick
    return ladder[index].tick


def _quantize_like(value: Decimal, tick: Decimal) -> Decimal:
    # Show prices with the tick's decimals (312.40 for a 0.20 tick), never with float noise.
    return value.quantize(tick if tick.as_tuple().exponent < 0 else Decimal(1))


def round_to_tick(price: Decimal, side: Side, on: date, tick: Decimal | None = None) -> Decimal:
    """Round ``price`` onto the tick grid: BUY rounds down, SELL rounds up, so neither pays more than asked.

    ``tick`` is the broker snapshot's ``price_spread``: when given it is preferred over the table (the broker
    knows spread-table changes this module may not yet), so pass it only for prices in the same band as the
    quote it came from (near the market). Without it the dated table for ``on`` is used. A price already on
    the grid is returned unchanged (idempotent). Raises ValueError when no valid price exists on that side
    (a BUY below 0.01, a SELL above 9995) or for a non-positive ``tick``.
    """
    price = to_decimal(price, "Price")
    if price <= 0:
        raise ValueError(f"Cannot round price {price} to a tick: prices must be positive.")
    rounding = ROUND_FLOOR if side is Side.BUY else ROUND_CEILING
    if tick is not None:
        tick = to_decimal(tick, "Tick")
        if tick <= 0:
            raise ValueError(f"Cannot round {price} with tick {tick}: the tick must be positive.")
    else:
        if side is Side.BUY and price > MAX_PRICE:
            return MAX_PRICE.quantize(Decimal("0.01"))
        if side is Side.SELL and price < MIN_PRICE:
            return MIN_PRICE
        _check_price_range(price, f"{side.value.upper()} price")
        tick = spread_table(on)[_band_index(price, spread_table(on))].tick
    # Boundaries are multiples of both neighbouring ticks, so rounding inside the price's own band stays valid.
    steps = (price / tick).to_integral_value(rounding=rounding)
    result = _quantize_like(steps * tick, tick)
    if result < MIN_PRICE or result > MAX_PRICE:
        raise ValueError(
            f"{side.value.upper()} price {price} rounds to {result}, outside the HKEX price range "
            f"{MIN_PRICE}-{MAX_PRICE}; no valid price exists on that side."
        )
    return result


def is_on_tick(price: Decimal, on: date, tick: Decimal | None = None) -> bool:
    """True when ``price`` is a valid HKEX price on ``on``: inside 0.01-9995 and a multiple of its band's tick.

    ``tick`` (the snapshot's ``price_spread``) replaces the table's tick when given, as in ``round_to_tick``.
    """
    try:
        price = to_decimal(price, "Price")
    except ValueError:
        return False
    if price < MIN_PRICE or price > MAX_PRICE:
        return False
    step = to_decimal(tick, "Tick") if tick is not None else tick_size(price, on)
    if step <= 0:
        return False
    return price % step == 0


# --------------------------------------------------------------------------------------------------------------
# Board lots
# --------------------------------------------------------------------------------------------------------------


def _check_lot(lot_size: int) -> None:
    if lot_size <= 0:
        raise ValueError(f"Board lot size must be a positive number of shares, got {lot_size}.")


def is_whole_lots(quantity: int, lot_size: int) -> bool:
    """True when ``quantity`` is a positive whole number of board lots (odd lots need a separate market)."""
    _check_lot(lot_size)
    return quantity > 0 and quantity % lot_size == 0


def floor_to_lots(quantity: int, lot_size: int) -> int:
    """The largest whole-lot quantity not above ``quantity`` (0 when less than one lot)."""
    _check_lot(lot_size)
    if quantity < 0:
        raise ValueError(f"Quantity {quantity} is negative; quantities are share counts (>= 0).")
    return (quantity // lot_size) * lot_size


# --------------------------------------------------------------------------------------------------------------
# Costs and settlement
# --------------------------------------------------------------------------------------------------------------

# T+2 via CCASS. Settlement does not restrict selling in Hong Kong: shares bought today can be sold today.
SETTLEMENT_DAYS = 2

# Charged on each side of a trade (buyer and seller alike), as fractions of the consideration.
STAMP_DUTY_RATE = Decimal("0.001")  # 0.1 % since 2023-11-17, rounded UP to the next whole HK$1
SFC_LEVY_RATE = Decimal("0.000027")  # 0.0027 %
AFRC_LEVY_RATE = Decimal("0.0000015")  # 0.00015 % (Accounting and Financial Reporting Council)
TRADING_FEE_RATE = Decimal("0.0000565")  # 0.00565 % HKEX trading fee
SETTLEMENT_FEE_RATE = Decimal("0.000042")  # 0.0042 % HKSCC stock settlement fee (no minimum/maximum since 2025)

_CENT = Decimal("0.01")


class CostBreakdown(BaseModel):
    """What one side of a trade costs, HKD. Money is in cents except stamp duty (whole dollars)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    gross_value: Decimal
    commission: Decimal
    stamp_duty: Decimal
    sfc_levy: Decimal
    afrc_levy: Decimal
    trading_fee: Decimal
    settlement_fee: Decimal
    total: Decimal


def _cents(value: Decimal) -> Decimal:
    return value.quantize(_CENT, rounding=ROUND_HALF_UP)


def trading_costs(gross_value: Decimal, commission_pct: Decimal | float, min_commission: Decimal) -> CostBreakdown:
    """The costs of one side of a trade worth ``gross_value`` HKD (quantity x price).

    ``commission_pct`` is a fraction (0.0003 = 0.03 %); the commission is at least ``min_commission``
    (none for a zero-value trade). Statutory charges are the same for buyer and seller.
    """
    gross = to_decimal(gross_value, "Gross value")
    pct = to_decimal(commission_pct, "Commission rate")
    minimum = to_decimal(min_commission, "Minimum commission")
    if gross < 0:
        raise ValueError(f"Gross value {gross} is negative; pass quantity x price (always >= 0).")
    if pct < 0 or minimum < 0:
        raise ValueError(f"Commission rate {pct} and minimum {minimum} must not be negative.")
    if gross == 0:
        zero = Decimal("0.00")
        return CostBreakdown(
            gross_value=gross,
            commission=zero,
            stamp_duty=Decimal(0),
            sfc_levy=zero,
            afrc_levy=zero,
            trading_fee=zero,
            settlement_fee=zero,
            total=zero,
        )
    commission = _cents(max(gross * pct, minimum))
    stamp_duty = (gross * STAMP_DUTY_RATE).to_integral_value(rounding=ROUND_CEILING)
    sfc_levy = _cents(gross * SFC_LEVY_RATE)
    afrc_levy = _cents(gross * AFRC_LEVY_RATE)
    trading_fee = _cents(gross * TRADING_FEE_RATE)
    settlement_fee = _cents(gross * SETTLEMENT_FEE_RATE)
    total = _cents(commission + stamp_duty + sfc_levy + afrc_levy + trading_fee + settlement_fee)
    return CostBreakdown(
        gross_value=gross,
        commission=commission,
        stamp_duty=stamp_duty,
        sfc_levy=sfc_levy,
        afrc_levy=afrc_levy,
        trading_fee=trading_fee,
        settlement_fee=settlement_fee,
        total=total,
    )


def order_preview(
    symbol: str, side: Side, quantity: int, price: Decimal, commission_pct: Decimal, min_commission: Decimal
) -> OrderPreview:
    """What an order of ``quantity`` at ``price`` would cost one side (gross, HKEX charges plus commission, and
    the net change of cash: negative for a buy). The one formula every broker's ``preview_order`` uses."""
    gross = (price * quantity).quantize(Decimal("0.01"))
    costs = trading_costs(gross, commission_pct, min_commission).total
    net = -(gross + costs) if side is Side.BUY else gross - costs
    return OrderPreview(
        symbol=symbol, side=side, quantity=quantity, price=price, gross_value=gross, costs=costs, net_cash_change=net
    )
