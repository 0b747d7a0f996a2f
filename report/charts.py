"""The report's charts, drawn by matplotlib (Agg) and embedded as inline SVG: no script, no network.

Text stays text in the SVG (``svg.fonttype: none``), which keeps a month's page small. Only numbers, times and
symbols we validated reach a chart; untrusted text (names, model output) never does.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import matplotlib

matplotlib.use("Agg")

import matplotlib.dates as mdates
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter

from brokers.base import Bar
from report.data import EquityPoint, RoundTrip

HKT = ZoneInfo("Asia/Hong_Kong")
EQUITY_COLOUR = "#1f5fa8"
BENCHMARK_COLOUR = "#9a9a9a"
DRAWDOWN_COLOUR = "#c0392b"
PRICE_COLOUR = "#34495e"
ENTRY_COLOUR = "#1e8449"
EXIT_COLOUR = "#8e44ad"
STOP_COLOUR = "#c0392b"
TARGET_COLOUR = "#1e8449"

_RC = {
    "svg.fonttype": "none",
    "font.size": 9,
    "font.family": "sans-serif",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e5e5e5",
    "grid.linewidth": 0.6,
    "path.simplify": True,
}


_PATH_DATA = re.compile(r'\bd="([^"]*)"')
_LONG_DECIMAL = re.compile(r"(\d+\.\d)\d+")


def _svg(fig: Any) -> str:
    """The figure as an ``<svg>`` element (no XML prolog, no doctype), then closed.

    Path coordinates are cut to a tenth of a point (invisible at the zoom a report is read at), which keeps a
    busy month's page to a few MB.
    """
    buffer = io.StringIO()
    fig.savefig(
        buffer,
        format="svg",
        bbox_inches="tight",
        metadata={"Date": None, "Creator": None, "Format": None, "Type": None},
    )
    plt.close(fig)
    text = buffer.getvalue()
    text = _PATH_DATA.sub(lambda m: 'd="' + " ".join(_LONG_DECIMAL.sub(r"\1", m.group(1)).split()) + '"', text)
    return text[text.index("<svg") :]


def _hkd_axis(value: float, _pos: int) -> str:
    return f"{value:,.0f}"


def _time_axis(ax: Any, times: Sequence[datetime]) -> None:
    if not times:
        return
    span = max(times) - min(times)
    fmt = "%H:%M" if span.days < 1 else "%m-%d"
    ax.xaxis.set_major_formatter(mdates.DateFormatter(fmt, tz=HKT))
    ax.xaxis.set_major_locator(mdates.AutoDateLocator(tz=HKT, minticks=3, maxticks=8))


def equity_chart(
    curve: Sequence[EquityPoint],
    snapshots: Sequence[EquityPoint],
    benchmark_label: str,
    benchmark: Sequence[tuple[datetime, float]],
    base: Decimal | None,
) -> str:
    """Closed-trade equity (steps) against the benchmark scaled to the same start, with the broker's readings."""
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(8.6, 2.8))
        times = [p.at for p in curve]
        ax.step(times, [float(p.equity) for p in curve], where="post", color=EQUITY_COLOUR, lw=1.8,
                label="equity (closed trades, net of fees)")  # fmt: skip
        if benchmark and base:
            b_times = [t for t, _ in benchmark]
            ax.plot(b_times, [float(base) * (1 + r) for _, r in benchmark], color=BENCHMARK_COLOUR, lw=1.2,
                    label=benchmark_label)  # fmt: skip
            times += b_times
        if snapshots:
            ax.plot([p.at for p in snapshots], [float(p.equity) for p in snapshots], "o", ms=3.5,
                    color="#e67e22", label="equity reported by the broker at each cycle")  # fmt: skip
            times += [p.at for p in snapshots]
        ax.yaxis.set_major_formatter(FuncFormatter(_hkd_axis))
        ax.set_ylabel("HKD")
        _time_axis(ax, times)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
        return _svg(fig)


def drawdown_chart(points: Sequence[tuple[datetime, Decimal, float | None]]) -> str:
    """Distance below the running peak of the closed-trade equity, in % of the peak (HKD when no base)."""
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(8.6, 1.8))
        times = [t for t, _, _ in points]
        as_pct = all(f is not None for _, _, f in points)
        values = [-(f or 0.0) * 100 if as_pct else -float(b) for _, b, f in points]
        ax.fill_between(times, values, 0, step="post", color=DRAWDOWN_COLOUR, alpha=0.35, lw=0)
        ax.step(times, values, where="post", color=DRAWDOWN_COLOUR, lw=1.2)
        ax.set_ylabel("% below peak" if as_pct else "HKD below peak")
        if not as_pct:
            ax.yaxis.set_major_formatter(FuncFormatter(_hkd_axis))
        _time_axis(ax, times)
        return _svg(fig)


def trade_chart(trade: RoundTrip, bars: Sequence[Bar]) -> str:
    """Minute bars around one round trip (close line, high-low band) with entry, stop, take-profit and exit."""
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(5.2, 2.4))
        times = [b.time for b in bars]
        ax.fill_between(times, [float(b.low) for b in bars], [float(b.high) for b in bars],
                        color=PRICE_COLOUR, alpha=0.15, lw=0)  # fmt: skip
        ax.plot(times, [float(b.close) for b in bars], color=PRICE_COLOUR, lw=1.0, label="close (1-minute bars)")
        if trade.stop_loss is not None:
            ax.axhline(float(trade.stop_loss), color=STOP_COLOUR, ls="--", lw=1, label=f"stop {trade.stop_loss}")
        if trade.take_profit is not None:
            ax.axhline(float(trade.take_profit), color=TARGET_COLOUR, ls="--", lw=1,
                       label=f"take profit {trade.take_profit}")  # fmt: skip
        ax.plot([trade.entry_time], [float(trade.entry_price)], "^", ms=9, color=ENTRY_COLOUR,
                label=f"entry {trade.entry_price:.3f}")  # fmt: skip
        ax.plot([trade.exit_time], [float(trade.exit_price)], "v", ms=9, color=EXIT_COLOUR,
                label=f"exit {trade.exit_price:.3f}")  # fmt: skip
        ax.set_title(trade.symbol, fontsize=9, loc="left")
        _time_axis(ax, [*times, trade.entry_time, trade.exit_time])
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
        return _svg(fig)
