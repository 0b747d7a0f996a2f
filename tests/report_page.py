"""Read a report page back (``html.parser``): headline figures, table cells, charts, and numbers in our formats."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal
from html.parser import HTMLParser


@dataclass
class Page:
    figures: dict[str, str] = field(default_factory=dict)  # data-figure → text
    tables: dict[str, list[list[str]]] = field(default_factory=dict)  # table id → rows of cell texts
    charts: list[dict[str, str]] = field(default_factory=list)  # <figure data-chart> attributes
    chart_paths: dict[int, int] = field(default_factory=dict)  # chart index → <path> elements inside it
    no_chart: list[str] = field(default_factory=list)  # texts of the "shown without a chart" notes
    tags: list[str] = field(default_factory=list)  # every start tag, in order
    reasoning: list[str] = field(default_factory=list)  # text of each reasoning cell


class _Parser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.page = Page()
        self._figure: str | None = None
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._chart: int | None = None
        self._no_chart: list[str] | None = None
        self._reasoning: list[str] | None = None
        self._depth_reasoning = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.page.tags.append(tag)
        if "data-figure" in a:
            self._figure = a["data-figure"]
            self.page.figures[self._figure] = ""
        if tag == "table" and a.get("id"):
            self._table = a["id"]
            self.page.tables[self._table] = []
        if tag == "tr" and self._table:
            self._row = []
        if tag in ("td", "th") and self._row is not None:
            self._cell = []
            if "reasoning" in a.get("class", "").split():
                self._reasoning = []
        if tag == "figure" and "data-chart" in a:
            self.page.charts.append(a)
            self._chart = len(self.page.charts) - 1
            self.page.chart_paths[self._chart] = 0
        if tag == "path" and self._chart is not None:
            self.page.chart_paths[self._chart] += 1
        if tag == "p" and "no-chart" in a.get("class", "").split():
            self._no_chart = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "dd" or (tag == "td" and self._figure):
            self._figure = None
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
            if self._reasoning is not None:
                self.page.reasoning.append("".join(self._reasoning))
                self._reasoning = None
        if tag == "tr" and self._row is not None and self._table:
            self.page.tables[self._table].append(self._row)
            self._row = None
        if tag == "table":
            self._table = None
        if tag == "figure":
            self._chart = None
        if tag == "p" and self._no_chart is not None:
            self.page.no_chart.append(" ".join("".join(self._no_chart).split()))
            self._no_chart = None

    def handle_data(self, data: str) -> None:
        if self._figure is not None:
            self.page.figures[self._figure] += data
        if self._cell is not None:
            self._cell.append(data)
        if self._reasoning is not None:
            self._reasoning.append(data)
        if self._no_chart is not None:
            self._no_chart.append(data)


def parse_page(html: str) -> Page:
    parser = _Parser()
    parser.feed(html)
    parser.close()
    page = parser.page
    page.figures = {k: " ".join(v.split()) for k, v in page.figures.items()}
    return page


_HKD = re.compile(r"^(-?)HK\$(\d{1,3}(?:,\d{3})*)\.(\d{2})$")
_PCT = re.compile(r"^(-?\d+)\.(\d)%$")


def money(text: str) -> Decimal:
    """``HK$1,234.56`` / ``-HK$1,234.56`` → Decimal; anything else (no separators, no cents) fails."""
    match = _HKD.match(text)
    assert match, f"{text!r} is not HKD with thousands separators and cents"
    sign, whole, cents = match.groups()
    value = Decimal(whole.replace(",", "") + "." + cents)
    return -value if sign else value


def percent(text: str) -> Decimal:
    """``12.3%`` → Decimal('12.3'); exactly one decimal is required."""
    assert _PCT.match(text), f"{text!r} is not a percentage with one decimal"
    return Decimal(text[:-1])


def table_column(page: Page, table: str, header: str) -> list[str]:
    rows = page.tables[table]
    index = rows[0].index(header)
    return [row[index] for row in rows[1:]]
