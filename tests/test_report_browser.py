"""The report page in a real browser (opt-in: ``pytest -m browser``; needs Debian's ``chromium`` package).

Headless Chromium opens the page from a file, with no network: the charts must have drawn (their SVG boxes have
a size, and the equity line's colour is on the screenshot), nothing may reach the console, and no script may
exist to run. ``CATALYST_SCREENSHOT=path`` also saves the screenshot there (docs/report-screenshot.png is made
this way).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from report.charts import EQUITY_COLOUR
from tests.chromium import Chromium, find_chromium
from tests.test_report import DAY, XSS, known_day, report  # noqa: F401  (known_day is a fixture)

pytestmark = pytest.mark.browser

CHARTS = """Array.from(document.querySelectorAll('figure[data-chart] svg')).map(s => {
  const box = s.getBoundingClientRect();
  return [s.closest('figure').dataset.chart, Math.round(box.width), Math.round(box.height),
          s.querySelectorAll('path').length];
})"""


@pytest.fixture
def chromium() -> Chromium:
    binary = find_chromium()
    if binary is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium)")
    with Chromium(binary) as browser:
        yield browser


def test_the_console_check_catches_an_error(chromium: Chromium, tmp_path: Path) -> None:
    """The check below would see a console error, a blocked script and a failed load (a test that can fail)."""
    page = tmp_path / "control.html"
    page.write_text("<!DOCTYPE html><p>x</p><script>console.error('control-error')</script>", encoding="utf-8")
    chromium.open(page.as_uri())
    assert any("control-error" in e for e in chromium.console_errors())


def test_the_report_draws_its_charts_without_console_errors(
    chromium: Chromium,
    known_day: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    html = report(known_day, tmp_path / "day.html", DAY)
    session = chromium.open((tmp_path / "day.html").as_uri())

    charts = chromium.evaluate(session, CHARTS)
    kinds = [c[0] for c in charts]
    assert kinds.count("equity") == 1 and kinds.count("drawdown") == 1 and "trade" in kinds
    assert all(width > 200 and height > 80 and paths > 0 for _, width, height, paths in charts), charts
    assert chromium.evaluate(session, "document.scripts.length") == 0
    assert chromium.evaluate(session, "document.images.length") == 0  # the reasoning's <img> stayed text
    assert XSS in chromium.evaluate(session, "document.querySelector('#trades-table').innerText")
    assert chromium.console_errors() == []

    shot = tmp_path / "report.png"
    chromium.screenshot(session, shot)
    image = Image.open(shot).convert("RGB")
    target = tuple(int(EQUITY_COLOUR[i : i + 2], 16) for i in (1, 3, 5))
    pixels, colour = image.tobytes(), bytes(target)
    drawn = sum(1 for i in range(0, len(pixels), 3) if pixels[i : i + 3] == colour)
    assert drawn > 100, "the equity line is on the screen"
    if os.environ.get("CATALYST_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["CATALYST_SCREENSHOT"])
    assert "<script" not in html
