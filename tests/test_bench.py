"""``scripts/bench.py`` end to end: one cycle and its naive twin; every figure line is printed with sane numbers.

No timing is asserted (the machine may be slow and busy): only that each figure exists, parses and is
consistent with the others.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from config.settings import PROJECT_ROOT

BENCH = PROJECT_ROOT / "scripts" / "bench.py"

FIGURES = (
    "tool calls per cycle",
    "cycle wall time",
    "model wait",
    "cycle overhead outside the model",
    "cycle overhead outside the model, in process",
    "tool loop overhead outside the model",
    "gateway requests per cycle",
    "gateway requests by kind",
    "gateway requests by kind, naive",
    "daily K-line requests",
    "snapshot requests per cycle",
    "bytes sent to the model per cycle",
    "estimated tokens sent to the model per cycle",
    "share of input tokens under cache breakpoints",
    "model cost per cycle at list prices",
    "guard pass wall time",
    "agent.py --help wall time",
    "start-up imports (python -X importtime, one extra run each, ms)",
    "replay",
)


def number(text: str, pattern: str) -> float:
    """The number captured by ``pattern`` (thousands separators allowed) in ``text``."""
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not found in {text!r}"
    return float(match.group(1).replace(",", ""))


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory, postgres_admin_dsn: str) -> tuple[dict[str, str], dict]:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "OPEND_", "CATALYST_"))}
    env["DATABASE_URL"] = postgres_admin_dsn  # the session's server: the bench creates and drops its databases
    args = ["--cycles", "1", "--naive", "--guard-runs", "1", "--help-runs", "1", "--json", str(out), "-q"]
    args += ["--replay-days", "1"]
    done = subprocess.run(
        [sys.executable, str(BENCH), *args],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=900,  # a hang guard, not a speed requirement
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines: dict[str, str] = {}
    for line in done.stdout.splitlines():
        label, sep, rest = line.partition(": ")
        if sep:
            lines[label] = rest
    return lines, json.loads(Path(out).read_text())


def test_every_figure_is_printed(bench_run: tuple[dict[str, str], dict]) -> None:
    lines, _ = bench_run
    missing = [label for label in FIGURES if label not in lines]
    assert not missing, f"missing figure lines {missing}; got {sorted(lines)}"


def test_the_scripted_cycle_ran_whole_in_both_modes(bench_run: tuple[dict[str, str], dict]) -> None:
    lines, data = bench_run
    assert number(lines["tool calls per cycle"], r"^(\d+) in") == 12
    assert number(lines["tool calls per cycle"], r"in (\d+) model requests") == 8
    assert number(lines["tool calls per cycle"], r"(\d+) order\(s\) placed") == 1
    assert number(lines["tool calls per cycle"], r"\[naive (\d+)\]") == 12
    assert len(data["optimised"]["cycles"]) == 1 and len(data["naive"]["cycles"]) == 1


def test_times_are_positive_and_add_up(bench_run: tuple[dict[str, str], dict]) -> None:
    lines, data = bench_run
    wall = number(lines["cycle wall time"], r"^([\d,]+) ms")
    parts = [
        number(lines["cycle wall time"], r"start-up ([\d,]+)"),
        number(lines["cycle wall time"], r"cycle ([\d,]+)"),
    ]
    assert wall > 0 and all(0 < part < wall for part in parts)
    wait = number(lines["model wait"], r"^([\d,]+) ms")
    overhead = number(lines["cycle overhead outside the model"], r"^([\d,]+) ms")
    assert 0 <= wait < wall and 0 < overhead <= wall
    assert abs(overhead - (wall - wait)) <= 2  # rounding of the printed values
    cycle = data["optimised"]["cycles"][0]
    assert cycle["model_wait_ms"] >= 0 and cycle["startup_ms"] > 0 and cycle["in_cycle_ms"] > 0
    assert 0 < cycle["loop_overhead_ms"] < cycle["in_cycle_overhead_ms"]  # the loop is part of the cycle
    assert number(lines["guard pass wall time"], r"^([\d,]+) ms") > 0
    assert number(lines["agent.py --help wall time"], r"^([\d,]+) ms") > 0
    for target_line in (
        "cycle overhead outside the model",
        "tool loop overhead outside the model",
        "guard pass wall time",
        "agent.py --help wall time",
    ):
        assert re.search(r"target <= \d+ ms: (met|NOT met)$", lines[target_line]), lines[target_line]


def test_gateway_requests_are_counted_by_kind(bench_run: tuple[dict[str, str], dict]) -> None:
    lines, data = bench_run
    total = number(lines["gateway requests per cycle"], r"^(\d+) median")
    kinds = {name: float(count) for name, count in re.findall(r"([a-z_]+) ([\d.]+)", lines["gateway requests by kind"])}
    assert sum(kinds.values()) == total  # one cycle: the medians are that cycle's counts
    assert kinds["place_order"] == 1 and kinds["snapshot"] >= 1 and kinds["plate_stock"] >= 1
    cycle = data["optimised"]["cycles"][0]
    assert max(cycle["snapshot_codes"]) >= 25  # the scan asked for the whole index in one request
    assert number(lines["guard pass wall time"], r"; ([\d.]+) gateway requests") > 0
    naive = data["naive"]
    if naive["naive_market"]:  # the settings have the switch: one request per symbol in the naive run
        assert naive["cycles"][0]["gateway"]["snapshot"] > cycle["gateway"]["snapshot"]
        assert number(lines["gateway requests per cycle"], r"\[naive (\d+)") > total


def test_tokens_and_prompt_caching(bench_run: tuple[dict[str, str], dict]) -> None:
    lines, _ = bench_run
    sent = number(lines["bytes sent to the model per cycle"], r"^([\d,]+) median")
    tokens_in = number(lines["estimated tokens sent to the model per cycle"], r"^([\d,]+) input")
    tokens_out = number(lines["estimated tokens sent to the model per cycle"], r"([\d,]+) output")
    assert sent > 0 and tokens_out > 0
    assert sent / 6 < tokens_in < sent  # about 4 bytes per token
    share = number(lines["share of input tokens under cache breakpoints"], r"^([\d.]+) %")
    read = number(lines["share of input tokens under cache breakpoints"], r"read from the cache ([\d.]+) %")
    assert 0 < read <= share <= 100
    assert number(lines["share of input tokens under cache breakpoints"], r"\[naive ([\d.]+) %\]") == 0
    cost = number(lines["model cost per cycle at list prices"], r"^\$([\d.]+)")
    naive_cost = number(lines["model cost per cycle at list prices"], r"\[naive \$([\d.]+)")
    assert 0 < cost < naive_cost  # cached prefixes are billed at a tenth of the input price


def test_import_profiles_name_the_packages(bench_run: tuple[dict[str, str], dict]) -> None:
    lines, data = bench_run
    profiles = data["imports"]
    assert set(profiles) == {"cycle", "guard", "--help"}
    assert "anthropic" in profiles["cycle"]["by_package"]  # the Claude cycle needs the SDK ...
    assert "anthropic" not in profiles["guard"]["by_package"]  # ... the guard pass never loads it,
    assert "talib" not in profiles["guard"]["by_package"]  # nor TA-Lib (the guard computes no indicator)
    assert profiles["--help"]["total_ms"] < profiles["guard"]["total_ms"]
    assert "cycle" in lines["start-up imports (python -X importtime, one extra run each, ms)"]


def test_the_replay_figure_compares_one_process_with_separate_processes(bench_run: tuple[dict[str, str], dict]) -> None:
    lines, data = bench_run
    line = lines["replay"]
    assert line.startswith("1 trading day(s) x 30 symbols") and "(targets apply to 21 days)" in line
    replay = data["replay"]
    assert (replay["cycles"], replay["guards"]) == (2, 64)  # 09:30 and 13:00; every 5 min of continuous trading
    assert replay["wall_s"] > 0 and replay["peak_mb"] > 0 and replay["separate_s"] > 0
    assert number(line, r"~([\d,]+) s \(cycle") == round(replay["separate_s"])
