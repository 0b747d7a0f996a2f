"""Housekeeping: log retention, size rotation of ``cron.log``/``health.log``, and free disk space.

- ``logs/agent-YYYYMMDD.log`` older than ``housekeeping.compress_logs_after_days`` (by the Hong Kong date in
  the name) are gzipped, and deleted (plain or gzipped) after ``delete_logs_after_days``. Today's log is never
  touched.
- ``cron.log`` and ``health.log`` (in ``agent.log_dir``) rotate past ``rotate_log_mb``: ``cron.log`` becomes
  ``cron.log.1``, older ones ``cron.log.2.gz`` … up to ``rotated_logs_kept``. ``.1`` stays plain because the
  process that wrote the last lines may still hold it open (the cron lines append with ``>>``).
- Free disk: a trading cycle refuses to start below ``min_free_disk_mb`` on a filesystem it writes to (logs,
  the embedded journal, the sim account, backups) — before any order, never half-way through journalling
  one. The guard pass only warns: it reduces risk, and its write-ahead journal row still comes before any
  order. The health check alerts below ``warn_free_disk_mb`` (``--disk``).

CLI::

    python -m data.housekeeping              # retention and rotation (nightly from cron)
    python -m data.housekeeping --disk       # free disk report; exit 1 below housekeeping.warn_free_disk_mb
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import shutil
import sys
from datetime import date, datetime
from pathlib import Path
from typing import NamedTuple
from zoneinfo import ZoneInfo

import structlog
from pydantic import BaseModel, ConfigDict

from config.errors import AgentError, ConfigError
from config.settings import Secrets, Settings

log = structlog.get_logger(__name__)

HKT = ZoneInfo("Asia/Hong_Kong")
MB = 1024 * 1024
ROTATED_LOGS: tuple[str, ...] = ("cron.log", "health.log")
_AGENT_LOG = re.compile(r"^agent-(\d{8})\.log(\.gz)?$")


class DiskSpaceLow(AgentError):
    """Too little free disk to journal safely. Nothing was sent; free space and the next run proceeds."""

    exit_code = 1


class DiskSpace(NamedTuple):
    path: Path  # the first watched path on this filesystem
    free_bytes: int

    @property
    def free_mb(self) -> int:
        return self.free_bytes // MB


class LogRetention(BaseModel):
    model_config = ConfigDict(frozen=True)

    compressed: list[Path] = []
    deleted: list[Path] = []
    rotated: list[Path] = []


# ------------------------------------------------------------------------------------------------ disk


def watched_paths(settings: Settings, secrets: Secrets) -> list[Path]:
    """The folders the agent writes to on this machine."""
    paths = [settings.resolve(settings.agent.log_dir), settings.resolve(settings.backup.dir)]
    if secrets.database_url is None:
        paths.append(settings.resolve(settings.database.embedded_dir))
    if settings.broker.name == "sim":
        paths.append(settings.resolve(settings.broker.sim.state_file).parent)
    return paths


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (a folder not created yet lives on its parent's filesystem)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def free_space(paths: list[Path]) -> list[DiskSpace]:
    """Free bytes (for an unprivileged user) of each distinct filesystem holding one of ``paths``."""
    seen: dict[int, DiskSpace] = {}
    for path in paths:
        existing = _existing(path)
        device = existing.stat().st_dev
        if device not in seen:
            seen[device] = DiskSpace(path, shutil.disk_usage(existing).free)
    return list(seen.values())


def _describe(spaces: list[DiskSpace]) -> str:
    return "; ".join(f"{d.free_mb:,} MB free on the filesystem of {d.path}" for d in spaces)


def check_disk_before_run(settings: Settings, secrets: Secrets, mode: str) -> None:
    """Pre-flight, once at the start of a run: ``DiskSpaceLow`` for a trading cycle below the threshold.

    A guard pass only logs ``disk_space_low``: it closes positions, and refusing it would leave stops unenforced.
    """
    threshold_mb = settings.housekeeping.min_free_disk_mb
    if threshold_mb <= 0:
        return
    low = [d for d in free_space(watched_paths(settings, secrets)) if d.free_bytes < threshold_mb * MB]
    if not low:
        return
    if mode == "guard":
        log.warning("disk_space_low", free=_describe(low), threshold_mb=threshold_mb)
        return
    raise DiskSpaceLow(
        f"Not starting the {mode} cycle: {_describe(low)}, below housekeeping.min_free_disk_mb ({threshold_mb:,} MB). "
        "No order was sent and nothing was journalled. Free disk space (old logs: python -m data.housekeeping; "
        "old backups in the backup folder) and the next cycle runs normally."
    )


# ------------------------------------------------------------------------------------------------ logs


def _gzip(source: Path, dest: Path) -> None:
    """Compress ``source`` into ``dest`` atomically (temporary file, fsync, rename); ``source`` is kept."""
    partial = dest.with_name(f".{dest.name}.partial")
    try:
        with open(source, "rb") as raw, open(partial, "wb") as out:
            with gzip.GzipFile(filename=source.name, mode="wb", fileobj=out) as packed:
                shutil.copyfileobj(raw, packed)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)


def log_date(name: str) -> date | None:
    """The date of ``agent-YYYYMMDD.log[.gz]``, or None for any other name."""
    match = _AGENT_LOG.match(name)
    if match is None:
        return None
    try:
        return datetime.strptime(match.group(1), "%Y%m%d").date()
    except ValueError:
        return None


def apply_log_retention(log_dir: Path, today: date, compress_after_days: int, delete_after_days: int) -> LogRetention:
    """Gzip agent logs older than ``compress_after_days``, delete those older than ``delete_after_days``."""
    compressed: list[Path] = []
    deleted: list[Path] = []
    if not log_dir.is_dir():
        return LogRetention()
    for path in sorted(log_dir.iterdir()):
        day = log_date(path.name)
        if day is None or not path.is_file():
            continue
        age_days = (today - day).days
        if age_days > delete_after_days:
            path.unlink(missing_ok=True)
            deleted.append(path)
        elif age_days > compress_after_days and path.suffix == ".log":
            dest = path.with_name(path.name + ".gz")
            _gzip(path, dest)
            path.unlink()
            compressed.append(dest)
    return LogRetention(compressed=compressed, deleted=deleted)


def rotate_by_size(path: Path, max_bytes: int, keep: int) -> bool:
    """Rotate ``path`` if it is larger than ``max_bytes``: ``.1`` plain, ``.2.gz`` … ``.{keep}.gz``. True if rotated."""
    if not path.is_file() or path.stat().st_size <= max_bytes:
        return False

    def numbered(n: int) -> Path:
        return path.with_name(f"{path.name}.{n}" + ("" if n == 1 else ".gz"))

    if keep >= 2:
        numbered(keep).unlink(missing_ok=True)
    for n in range(keep - 1, 1, -1):
        if numbered(n).exists():
            os.replace(numbered(n), numbered(n + 1))
    first = numbered(1)
    if first.exists():
        if keep >= 2:
            _gzip(first, numbered(2))
        first.unlink()
    os.replace(path, first)
    return True


def run_housekeeping(settings: Settings, today: date, rotate: list[Path] | None = None) -> LogRetention:
    """Log retention in ``agent.log_dir`` and size rotation of ``rotate`` (default: its cron.log, health.log)."""
    h = settings.housekeeping
    log_dir = settings.resolve(settings.agent.log_dir)
    result = apply_log_retention(log_dir, today, h.compress_logs_after_days, h.delete_logs_after_days)
    files = rotate if rotate is not None else [log_dir / name for name in ROTATED_LOGS]
    rotated = [p for p in files if rotate_by_size(p, int(h.rotate_log_mb * MB), h.rotated_logs_kept)]
    log.info(
        "housekeeping_done",
        compressed=[p.name for p in result.compressed],
        deleted=[p.name for p in result.deleted],
        rotated=[str(p) for p in rotated],
    )
    return result.model_copy(update={"rotated": rotated})


# ------------------------------------------------------------------------------------------------ CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m data.housekeeping",
        description="Compress and delete old agent logs, rotate cron.log and health.log by size, or report free disk.",
        epilog="exit codes: 0 done (or enough disk), 1 disk below housekeeping.warn_free_disk_mb or a failure, "
        "2 bad settings",
    )
    parser.add_argument("--config", metavar="PATH", help="settings file (default: $CATALYST_CONFIG or built-in)")
    parser.add_argument("--disk", action="store_true", help="only report free disk space (the health check)")
    parser.add_argument(
        "--rotate",
        action="append",
        type=Path,
        metavar="FILE",
        help="rotate FILE by size (default: cron.log, health.log)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the housekeeping CLI. Returns the exit code."""
    args = parse_args(argv)
    from config.settings import load_settings

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"housekeeping: {exc}", file=sys.stderr)
        return 2
    secrets = Secrets.from_env()
    if args.disk:
        threshold_mb = settings.housekeeping.warn_free_disk_mb
        spaces = free_space(watched_paths(settings, secrets))
        lowest = min(spaces, key=lambda d: d.free_bytes)
        below = lowest.free_bytes < threshold_mb * MB
        print(f"{_describe([lowest])} (threshold {threshold_mb:,} MB){': LOW' if below else ''}")
        return 1 if below else 0
    from config.logs import configure_logging

    now = datetime.now(HKT)
    configure_logging(settings.resolve(settings.agent.log_dir), now)
    try:
        result = run_housekeeping(settings, now.date(), args.rotate)
    except OSError as exc:
        print(f"housekeeping failed: {exc}", file=sys.stderr)
        return 1
    print(
        f"housekeeping: {len(result.compressed)} log(s) compressed, {len(result.deleted)} deleted, "
        f"{len(result.rotated)} rotated"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
