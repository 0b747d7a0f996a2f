"""Jinja2 templates → the report page and the digest bodies.

HTML templates are autoescaped: every value from the journal (model reasoning, summaries, alert texts,
symbols) is escaped, so ``<img src=x onerror=alert(1)>`` shows as those characters and runs nothing. Only the
SVG that ``report.charts`` drew is marked safe. The page also carries a Content-Security-Policy that allows no
script and no network request at all. Plain-text templates (the digest's text part) are not escaped: they are
never read as markup.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from report.data import ReportData, RoundTrip

HKT = ZoneInfo("Asia/Hong_Kong")
TEMPLATES = Path(__file__).resolve().parent / "templates"


def hkd(value: Decimal | float | int | None, places: int = 2) -> str:
    """HK$1,234.56 (-HK$1,234.56 for a loss); n/a for None."""
    if value is None:
        return "n/a"
    amount = Decimal(str(value)) if not isinstance(value, Decimal) else value
    sign = "-" if amount < 0 else ""
    return f"{sign}HK${abs(amount):,.{places}f}"


def pct(value: float | None) -> str:
    """A fraction as a percentage with one decimal: 0.0123 → 1.2%."""
    return "n/a" if value is None else f"{value * 100:.1f}%"


def usd(value: Decimal | float | None) -> str:
    return "n/a" if value is None else f"${float(value):,.4f}"


def num(value: int | None) -> str:
    return "n/a" if value is None else f"{value:,}"


def price(value: Decimal | float | None) -> str:
    return "n/a" if value is None else f"{Decimal(str(value)):,.3f}"


def hkt(value: datetime | None, fmt: str = "%Y-%m-%d %H:%M") -> str:
    """A time in Hong Kong time (the page header says HKT once)."""
    return "" if value is None else value.astimezone(HKT).strftime(fmt)


def r_multiple(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} R"


_FILTERS: dict[str, Any] = {"hkd": hkd, "pct": pct, "usd": usd, "num": num, "price": price, "hkt": hkt,
                            "r": r_multiple}  # fmt: skip


def _environment(autoescape: bool) -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(["html"], default_for_string=True) if autoescape else False,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(_FILTERS)
    return env


HTML = _environment(autoescape=True)
TEXT = _environment(autoescape=False)


@dataclass
class TradeView:
    trade: RoundTrip
    chart: Markup | None  # our own SVG
    no_chart_reason: str = ""


@dataclass
class Charts:
    equity: Markup | None = None
    drawdown: Markup | None = None
    benchmark_label: str = ""
    benchmark_return: float | None = None
    trades: list[TradeView] = field(default_factory=list)
    bar_source: str = ""


def render_page(data: ReportData, charts: Charts) -> str:
    """The whole self-contained HTML page."""
    return HTML.get_template("report.html").render(d=data, h=data.headline, c=charts, title=title_of(data))


def title_of(data: ReportData) -> str:
    return f"Catalyst International: {data.period.label}"


def render_digest(data: ReportData, charts: Charts) -> tuple[str, str]:
    """(plain text, HTML) bodies of the digest e-mail: headline numbers, trades and refusals."""
    context = {"d": data, "h": data.headline, "c": charts, "title": title_of(data)}
    return TEXT.get_template("digest.txt").render(**context), HTML.get_template("digest.html").render(**context)
