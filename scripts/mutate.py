#!/usr/bin/env python3
"""Mutation testing of the safety code: break one line at a time, rerun the fast tests, count what survives.

Runs ``mutmut`` (configured in ``pyproject.toml`` under ``[tool.mutmut]``) over ``safety.py``,
``brokers/hkex.py`` and the gate/approval part of ``tool_executor.py`` with the fast tests that cover them,
then prints one score line per file and every surviving mutant. Known equivalent mutants (they change the
text, not the behaviour) are listed in ``docs/mutation.md`` and subtracted in the score.

The gate tests need PostgreSQL: one embedded server is started for the whole run (or ``DATABASE_URL`` is used
when set), so that each mutant does not start its own.

    python scripts/mutate.py                       # everything (long: many minutes on 2 cores)
    python scripts/mutate.py --only brokers/hkex.py  # one file
    python scripts/mutate.py --report              # print the score of the last run again
    python scripts/mutate.py --clean               # forget earlier results (mutants/) first
    python scripts/mutate.py --only safety.py --rerun  # after adding tests: only what survived last time

The chosen mutants are always run again; mutants/ keeps the results of files not run this time for --report.
A source file changed since the last run is copied and mutated afresh.

Exit 0 when no mutant survived outside the documented equivalent ones, 1 otherwise, 2 on a setup error.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Which functions are mutated, per file (mutmut's mutant-name globs). In tool_executor.py only the gate and the
# approval, untrusted-text and close code: the rest of that file (journalling and logging arguments, order
# plumbing) is covered by the end-to-end tests, which are too slow to rerun once per mutant.
TARGETS: dict[str, list[str]] = {
    "safety.py": ["safety.x*"],
    "brokers/hkex.py": ["brokers.hkex.x*"],
    "tool_executor.py": [
        "tool_executor.xǁToolGateǁ_run__*",  # no verdict means no permission; one approval, one execution
        "tool_executor.xǁToolGateǁverdict__*",  # which rules judge which tool
        "tool_executor.x_untrusted_names__*",  # names travel as name_untrusted
        "tool_executor.xǁToolExecutorǁget_news__*",  # news wrapped as untrusted
        "tool_executor.xǁToolExecutorǁget_quote__*",
        "tool_executor.xǁToolExecutorǁscan_market__*",
        "tool_executor.x_close_position__*",  # whole lots, the broker stop cancelled first
        "tool_executor.x__without_protective_stops__*",  # a REAL account's own stop frees its shares
    ],
}
EQUIVALENT_DOC = ROOT / "docs" / "mutation.md"
# A mutant whose tests run past mutmut's CPU limit (an endless loop, say) is detected too: it counts as killed
# and is shown under its own status in the per-file line.
KILLED = {"killed", "caught by type check", "timeout"}


def equivalent_mutants() -> set[str]:
    """Mutant names listed as equivalent in docs/mutation.md (lines like ``- `safety.x_foo__mutmut_3`: why``)."""
    if not EQUIVALENT_DOC.exists():
        return set()
    return set(re.findall(r"^- `([\w.ǁ]+__mutmut_\d+)`", EQUIVALENT_DOC.read_text(encoding="utf-8"), re.M))


def start_database() -> tuple[str, Path | None]:
    """A PostgreSQL URL for the run: ``DATABASE_URL`` if set, else a fresh embedded server (and its folder)."""
    if os.environ.get("DATABASE_URL"):
        return os.environ["DATABASE_URL"], None
    from tests.pg import traversable_tempdir

    folder = traversable_tempdir("catalyst-mutate-pg-")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

        server = pgserver.get_server(folder / "data", cleanup_mode=None)
    return server.get_uri("postgres"), folder


def stop_database(folder: Path | None) -> None:
    if folder is None:
        return
    from tests.pg import stop_embedded_server

    stop_embedded_server(folder / "data")
    shutil.rmtree(folder, ignore_errors=True)


def statuses(files: list[str]) -> dict[str, dict[str, str]]:
    """{file: {mutant name: status}} from mutmut's result files, for the chosen functions only."""
    from mutmut.stats import status_by_exit_code

    out: dict[str, dict[str, str]] = {}
    for file in files:
        meta = ROOT / "mutants" / (file + ".meta")
        if not meta.exists():
            continue
        codes = json.loads(meta.read_text(encoding="utf-8")).get("exit_code_by_key", {})
        chosen = [re.compile(_glob_to_regex(g)) for g in TARGETS[file]]
        out[file] = {
            name: status_by_exit_code[code] for name, code in codes.items() if any(p.match(name) for p in chosen)
        }
    return out


def _glob_to_regex(glob: str) -> str:
    return "^" + re.escape(glob).replace(r"\*", ".*") + "$"


def report(files: list[str]) -> int:
    """Print the score per file and the survivors; 0 if every survivor is a documented equivalent."""
    equivalent = equivalent_mutants()
    undocumented = 0
    total_killed = total_scored = 0
    for file, by_name in statuses(files).items():
        counts = Counter(by_name.values())
        eq = {n for n, s in by_name.items() if s != "killed" and n in equivalent}
        survivors = sorted(n for n, s in by_name.items() if s not in KILLED and n not in eq)
        killed = sum(counts[s] for s in KILLED)
        scored = len(by_name) - len(eq)
        total_killed += killed
        total_scored += scored
        score = 100.0 * killed / scored if scored else 100.0
        detail = ", ".join(f"{status} {n}" for status, n in sorted(counts.items()))
        print(f"{file}: {killed}/{scored} mutants killed ({score:.1f} %), {len(eq)} equivalent; {detail}")
        for name in survivors:
            print(f"    {by_name[name]}: {name}   (mutmut show {name})")
        undocumented += len(survivors)
    if total_scored:
        print(f"mutation score: {100.0 * total_killed / total_scored:.1f} % ({total_killed}/{total_scored})")
    return 0 if undocumented == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=sorted(TARGETS), help="mutate only this file")
    parser.add_argument("--report", action="store_true", help="only print the score of the last run")
    parser.add_argument("--clean", action="store_true", help="delete mutants/ first (mutmut's copy and results)")
    parser.add_argument(
        "--rerun", action="store_true", help="run again only the mutants the last run did not kill (after new tests)"
    )
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args(argv)
    files = args.only or list(TARGETS)
    if args.report:
        return report(files)
    mutmut = Path(sys.executable).with_name("mutmut")
    if not mutmut.exists():
        print(f"mutmut is not installed in {mutmut.parent}: run `make venv` (it is in requirements-dev.txt).")
        return 2
    if args.clean:
        shutil.rmtree(ROOT / "mutants", ignore_errors=True)
    url, folder = start_database()
    try:
        env = {**os.environ, "DATABASE_URL": url}
        names = [glob for file in files for glob in TARGETS[file]]
        if args.rerun:
            names = [n for by_name in statuses(files).values() for n, st in by_name.items() if st not in KILLED]
            if not names:
                print("Nothing to run again: every chosen mutant was killed in the last run.")
                return report(files)
        command = [str(mutmut), "run", "--max-children", str(args.max_children), *names]
        done = subprocess.run(command, cwd=ROOT, env=env, check=False)
    finally:
        stop_database(folder)
    if done.returncode != 0:
        print(f"mutmut run exited {done.returncode}; the score below covers what it finished.")
    return report(files)


if __name__ == "__main__":
    sys.exit(main())
