"""Journal backups and restore: ``pg_dump`` custom-format files under ``var/backups/`` (DESIGN.md §7).

A backup is written to a hidden temporary file next to its final name, checked with ``pg_restore --list``
(it must list the data of the journal's core tables), fsynced and only then renamed: a file called
``journal-YYYYMMDDTHHMMSSZ.dump`` is always complete and readable. Retention keeps the newest backup of each of
the last ``backup.keep_daily`` days and of each of the last ``backup.keep_weekly`` ISO weeks (Hong Kong dates);
other ``journal-*.dump`` files are deleted, nothing else in the folder is touched.

A restore replaces the journal's ``public`` schema with the dump's in ONE transaction (``psql
--single-transaction`` over ``pg_restore``'s script): it either happens completely or not at all. It refuses a
journal that holds data unless ``--force``, and then first writes a verified ``pre-restore-…dump`` of what it
replaces. It refuses while an agent run holds an account lock.

The binaries are ``backup.pg_bin_dir`` if set, else the ones bundled with ``pgserver`` (PostgreSQL 16; they
can dump older servers too). The password of ``DATABASE_URL`` reaches them through ``PGPASSWORD``, never on a
command line, and never in a message.

CLI (the scripts ``scripts/backup.sh`` and ``scripts/restore.sh`` call it)::

    python -m data.backup backup [--dir DIR]
    python -m data.backup restore FILE [--force]
    python -m data.backup list
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Iterable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import NamedTuple
from zoneinfo import ZoneInfo

import psycopg
import structlog
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pydantic import BaseModel, ConfigDict

from config.errors import AgentError, ConfigError
from config.settings import Secrets, Settings

log = structlog.get_logger(__name__)

HKT = ZoneInfo("Asia/Hong_Kong")
BACKUP_PREFIX = "journal-"
PRE_RESTORE_PREFIX = "pre-restore-"
SUFFIX = ".dump"
_STAMP_FORMAT = "%Y%m%dT%H%M%SZ"
_BACKUP_NAME = re.compile(r"^journal-(\d{8}T\d{6}Z)\.dump$")
# A dump that lacks the data of these is not a journal backup (wrong database, or a never-migrated one).
REQUIRED_TABLES: tuple[str, ...] = ("schema_migrations", "cycles", "orders", "protective_stops")
# Shown in messages: what a journal holds that matters most.
SUMMARY_TABLES: tuple[str, ...] = ("cycles", "orders", "protective_stops", "equity_snapshots")
_MAX_TOOL_OUTPUT = 600


class BackupError(AgentError):
    """A backup or restore failed. Nothing was replaced; the message says what to fix before running it again."""

    exit_code = 1


class RestoreRefused(ConfigError):
    """The restore was refused before anything changed (the journal has data, or an agent run is active)."""


class PgTools(NamedTuple):
    pg_dump: Path
    pg_restore: Path
    psql: Path


class BackupResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: Path
    size_bytes: int
    tables: list[str]
    deleted: list[Path] = []


class RestoreResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    source: Path
    replaced_backup: Path | None
    row_counts: dict[str, int]


# ------------------------------------------------------------------------------------------------ helpers


def bundled_bin_dir() -> Path:
    """The ``bin`` folder of the PostgreSQL that ships inside the ``pgserver`` package (not imported)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "The pgserver package is not installed, so there is no bundled pg_dump. Install the requirements "
            "(pip install -r requirements.txt) or set backup.pg_bin_dir to a folder holding pg_dump."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def pg_tools(settings: Settings) -> PgTools:
    """pg_dump, pg_restore and psql from ``backup.pg_bin_dir`` or pgserver. ``ConfigError`` if one is missing."""
    configured = settings.backup.pg_bin_dir
    folder = settings.resolve(configured) if configured is not None else bundled_bin_dir()
    found = []
    for name in PgTools._fields:
        path = folder / name
        if not (path.is_file() and os.access(path, os.X_OK)):
            where = "backup.pg_bin_dir" if configured is not None else "the pgserver package"
            raise ConfigError(
                f"{name} was not found (or is not executable) in {folder}, from {where}. Set backup.pg_bin_dir "
                "to the bin folder of a PostgreSQL client at least as new as the journal's server "
                "(e.g. /usr/lib/postgresql/16/bin)."
            )
        found.append(path)
    return PgTools(*found)


def journal_dsn(settings: Settings, secrets: Secrets) -> str:
    """``DATABASE_URL``, or the embedded server's DSN (starting it if it is not running)."""
    if secrets.database_url is not None:
        return secrets.database_url.get_secret_value()
    from data.database import embedded_server_dsn

    return embedded_server_dsn(settings)


def _client_args(dsn: str) -> tuple[str, dict[str, str]]:
    """(a conninfo without the password, the environment for a libpq client carrying it in PGPASSWORD)."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        raise ConfigError(
            "DATABASE_URL is not a valid PostgreSQL connection string; write it as "
            "postgresql://user:password@host:port/dbname."
        ) from None
    password = params.pop("password", None)
    env = dict(os.environ)
    if password:  # otherwise libpq's own sources (PGPASSWORD, ~/.pgpass) apply as usual
        env["PGPASSWORD"] = str(password)
    env.setdefault("PGCONNECT_TIMEOUT", "10")
    return make_conninfo("", **{k: v for k, v in params.items() if v is not None}), env


def _describe(dsn: str) -> str:
    from data.database import redact_dsn

    return redact_dsn(dsn)


def _tail(text: str, secret_dsn: str | None = None) -> str:
    """The end of a tool's output, on one line, without the DSN's password."""
    if secret_dsn:
        password = conninfo_to_dict(secret_dsn).get("password")
        if password:
            text = text.replace(str(password), "***")
    text = " ".join(text.split())
    return text[-_MAX_TOOL_OUTPUT:] if text else "(no output)"


def _run(args: list[str], *, env: dict[str, str] | None, timeout_s: float, what: str, dsn: str | None = None) -> str:
    """Run a PostgreSQL client tool; ``BackupError`` with its own words if it fails or hangs."""
    try:
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise BackupError(f"Could not {what}: {Path(args[0]).name} did not finish within {timeout_s:.0f} s.") from None
    except OSError as exc:
        raise BackupError(f"Could not {what}: {Path(args[0]).name} could not be started: {exc}.") from None
    if done.returncode != 0:
        raise BackupError(f"Could not {what}: {Path(args[0]).name} exited {done.returncode}: {_tail(done.stderr, dsn)}")
    return done.stdout


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def backup_name(now: datetime, prefix: str = BACKUP_PREFIX) -> str:
    """``journal-20261120T083000Z.dump`` for ``now`` (UTC, to the second)."""
    return f"{prefix}{now.astimezone(UTC).strftime(_STAMP_FORMAT)}{SUFFIX}"


def backup_time(name: str) -> datetime | None:
    """The time in a ``journal-…dump`` name, or None for any other file name."""
    match = _BACKUP_NAME.match(name)
    if match is None:
        return None
    try:
        return datetime.strptime(match.group(1), _STAMP_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------------- backup


def verify_dump(path: Path, tools: PgTools, timeout_s: float = 300) -> list[str]:
    """The tables whose data ``pg_restore --list`` finds in ``path``; ``BackupError`` if unreadable or not a journal."""
    listing = _run(
        [str(tools.pg_restore), "--list", str(path)], env=None, timeout_s=timeout_s, what=f"read the dump {path}"
    )
    tables = sorted(
        {
            parts[parts.index("DATA") + 2]
            for line in listing.splitlines()
            if not line.startswith(";") and "TABLE DATA" in line
            for parts in [line.split()]
            if len(parts) > parts.index("DATA") + 2
        }
    )
    missing = [t for t in REQUIRED_TABLES if t not in tables]
    if missing:
        raise BackupError(
            f"The dump {path} is readable but holds no data for {', '.join(missing)}: it is not a journal backup "
            "(is DATABASE_URL the journal, and has the agent run at least once against it?)."
        )
    return tables


def dump_journal(dsn: str, dest: Path, tools: PgTools, timeout_s: float) -> BackupResult:
    """``pg_dump -Fc`` to a temporary file beside ``dest``, verify, fsync, rename: ``dest`` is complete or absent."""
    folder = dest.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BackupError(
            f"Could not create the backup folder {folder}: {exc.strerror or exc}. No backup was written. "
            "Set backup.dir to a writable folder (or fix the permissions) and run scripts/backup.sh again."
        ) from None
    partial = folder / f".{dest.name}.partial"
    conninfo, env = _client_args(dsn)
    try:
        _run(
            [str(tools.pg_dump), "--format=custom", "--no-owner", "--no-privileges", f"--file={partial}",
             f"--dbname={conninfo}"],
            env=env, timeout_s=timeout_s, what=f"dump the journal at {_describe(dsn)} into {folder}", dsn=dsn,
        )  # fmt: skip
        tables = verify_dump(partial, tools)
        with open(partial, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, dest)
        _fsync_dir(folder)
    except OSError as exc:
        raise BackupError(
            f"Could not write the backup {dest}: {exc.strerror or exc}. No backup was written; free space or fix "
            "the folder, then run scripts/backup.sh again."
        ) from None
    finally:
        partial.unlink(missing_ok=True)
    return BackupResult(path=dest, size_bytes=dest.stat().st_size, tables=tables)


def backups_to_keep(stamps: Iterable[datetime], keep_daily: int, keep_weekly: int) -> set[datetime]:
    """The newest backup of each of the ``keep_daily`` latest days and ``keep_weekly`` latest ISO weeks (HKT)."""
    keep: set[datetime] = set()
    days: list[date] = []
    weeks: list[tuple[int, int]] = []
    for stamp in sorted(stamps, reverse=True):
        day = stamp.astimezone(HKT).date()
        if day not in days:
            days.append(day)
            if len(days) <= keep_daily:
                keep.add(stamp)
        week = day.isocalendar()[:2]
        if week not in weeks:
            weeks.append(week)
            if len(weeks) <= keep_weekly:
                keep.add(stamp)
    return keep


def apply_retention(folder: Path, keep_daily: int, keep_weekly: int) -> list[Path]:
    """Delete the ``journal-*.dump`` files retention does not keep; return them. Other files stay."""
    if not folder.is_dir():
        return []
    backups = {p: t for p in folder.iterdir() if p.is_file() and (t := backup_time(p.name)) is not None}
    keep = backups_to_keep(backups.values(), keep_daily, keep_weekly)
    deleted = []
    for path, stamp in sorted(backups.items(), key=lambda item: item[1]):
        if stamp not in keep:
            path.unlink(missing_ok=True)
            deleted.append(path)
    return deleted


def backup_folder(settings: Settings, override: Path | None = None) -> Path:
    return settings.resolve(override or settings.backup.dir)


def run_backup(
    settings: Settings, secrets: Secrets, now: datetime, *, folder: Path | None = None, prefix: str = BACKUP_PREFIX
) -> BackupResult:
    """Back the journal up into ``folder`` (default ``backup.dir``); apply retention to regular backups."""
    target = backup_folder(settings, folder)
    tools = pg_tools(settings)
    dsn = journal_dsn(settings, secrets)
    path = target / backup_name(now, prefix)
    if prefix != BACKUP_PREFIX:  # a pre-restore dump is the only copy of what a restore replaced: never overwrite one
        count = 2
        while path.exists():
            path = target / backup_name(now, prefix).replace(SUFFIX, f"-{count}{SUFFIX}")
            count += 1
    result = dump_journal(dsn, path, tools, settings.backup.timeout_s)
    deleted: list[Path] = []
    if prefix == BACKUP_PREFIX:
        deleted = apply_retention(target, settings.backup.keep_daily, settings.backup.keep_weekly)
    log.info(
        "backup_written",
        path=str(result.path),
        size_bytes=result.size_bytes,
        tables=len(result.tables),
        deleted=[p.name for p in deleted],
    )
    return result.model_copy(update={"deleted": deleted})


# ------------------------------------------------------------------------------------------------ restore


def row_counts(dsn: str) -> dict[str, int]:
    """Rows per table of the journal's ``public`` schema (``schema_migrations`` included)."""
    from data.database import JournalError, _scrub

    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            tables = [
                r[0]
                for r in conn.execute(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
                ).fetchall()
            ]
            counts = {}
            for table in tables:
                query = sql.SQL("SELECT count(*) FROM public.{}").format(sql.Identifier(table))
                row = conn.execute(query).fetchone()
                counts[table] = int(row[0]) if row else 0
            return counts
    except psycopg.Error as exc:
        raise JournalError(
            f"Could not read the journal at {_describe(dsn)}: {_scrub(str(exc), dsn)} Nothing was restored."
        ) from None


def active_locks(dsn: str) -> list[str]:
    """Who holds an advisory lock on this database from another session (a running agent), as text."""
    from data.database import JournalError, _scrub

    try:
        return _active_locks(dsn)
    except psycopg.Error as exc:
        raise JournalError(
            f"Could not read the journal at {_describe(dsn)}: {_scrub(str(exc), dsn)} Nothing was restored."
        ) from None


def _active_locks(dsn: str) -> list[str]:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        held = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid <> pg_backend_pid() "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ).fetchone()
        if not held or not held[0]:
            return []
        has_table = conn.execute("SELECT to_regclass('public.instance_locks')").fetchone()
        if has_table and has_table[0]:
            rows = conn.execute("SELECT key, holder FROM instance_locks ORDER BY started_at DESC").fetchall()
            if rows:
                return [f"{key}: {holder}" for key, holder in rows[:3]]
        return [f"{held[0]} advisory lock(s) held by other sessions"]


def _summary(counts: dict[str, int]) -> str:
    return ", ".join(f"{counts.get(t, 0)} {t}" for t in SUMMARY_TABLES)


# Everything in ``public`` goes, then the dump recreates it; both inside psql's single transaction.
_EMPTY_PUBLIC_SCHEMA = """\
\\set ON_ERROR_STOP on
DROP SCHEMA IF EXISTS public CASCADE;
CREATE SCHEMA public;
"""


def restore_journal(
    settings: Settings, secrets: Secrets, source: Path, now: datetime, *, force: bool = False
) -> RestoreResult:
    """Replace the journal with the dump ``source``; see the module docstring for the refusals."""
    source = source.expanduser()
    if not source.is_file():
        raise ConfigError(f"The backup {source} does not exist (or is not a file). Nothing was restored.")
    tools = pg_tools(settings)
    verify_dump(source, tools)
    dsn = journal_dsn(settings, secrets)
    holders = active_locks(dsn)
    if holders:
        raise RestoreRefused(
            f"An agent run is using the journal at {_describe(dsn)} ({'; '.join(holders)}). Nothing was restored. "
            "Wait for it to finish, or remove the schedule first (scripts/install_cron.sh --uninstall), then retry."
        )
    before = row_counts(dsn)
    has_data = any(n for table, n in before.items() if table != "schema_migrations")
    replaced_backup: Path | None = None
    if has_data and not force:
        raise RestoreRefused(
            f"The journal at {_describe(dsn)} is not empty ({_summary(before)}); restoring {source.name} would "
            "replace it. Nothing was restored. If that is what you want, run again with --force: a dump of the "
            "current journal is written to the backup folder first."
        )
    if has_data:
        replaced_backup = run_backup(settings, secrets, now, prefix=PRE_RESTORE_PREFIX).path
        log.info("journal_saved_before_restore", path=str(replaced_backup))
    conninfo, env = _client_args(dsn)
    script = _run(
        [str(tools.pg_restore), "--no-owner", "--no-privileges", "--file=-", str(source)],
        env=None, timeout_s=settings.backup.timeout_s, what=f"read the dump {source}",
    )  # fmt: skip
    psql = [str(tools.psql), "--no-psqlrc", "--quiet", "--single-transaction", "--set=ON_ERROR_STOP=1",
            "--file=-", f"--dbname={conninfo}"]  # fmt: skip
    try:
        done = subprocess.run(
            psql, input=_EMPTY_PUBLIC_SCHEMA + script, env=env, capture_output=True, text=True,
            timeout=settings.backup.timeout_s, check=False,
        )  # fmt: skip
    except (subprocess.TimeoutExpired, OSError) as exc:
        raise BackupError(f"Could not restore {source}: psql failed to run: {exc}. The journal is unchanged.") from None
    if done.returncode != 0:
        kept = f" The journal before the attempt is also in {replaced_backup}." if replaced_backup else ""
        raise BackupError(
            f"Could not restore {source} into {_describe(dsn)}: psql exited {done.returncode}: "
            f"{_tail(done.stderr, dsn)} The restore ran in one transaction, so the journal is unchanged.{kept}"
        )
    after = row_counts(dsn)
    log.info("journal_restored", source=str(source), replaced_backup=str(replaced_backup or ""), rows=after)
    return RestoreResult(source=source, replaced_backup=replaced_backup, row_counts=after)


# ------------------------------------------------------------------------------------------------ the CLI

EPILOG = """\
exit codes:
  0  done
  1  the backup or restore failed (the message says why; a failed backup also sends a high-priority alert)
  2  bad arguments or settings, or the restore was refused (nothing changed)

The journal is DATABASE_URL or the embedded server (database.embedded_dir). Settings come from --config,
$CATALYST_CONFIG or config/settings.yaml (section backup:).
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m data.backup",
        description="Back up the journal (pg_dump, verified, with retention) or restore it from a backup.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="PATH", help="settings file (default: $CATALYST_CONFIG or built-in)")
    commands = parser.add_subparsers(dest="command", required=True)
    back = commands.add_parser("backup", help="write a verified backup into backup.dir and apply retention")
    back.add_argument("--dir", type=Path, metavar="DIR", help="write into DIR instead of backup.dir")
    restore = commands.add_parser("restore", help="replace the journal with a backup")
    restore.add_argument("file", type=Path, metavar="FILE", help="a .dump file written by the backup")
    restore.add_argument(
        "--force", action="store_true", help="replace a journal that has data (it is dumped to the backup folder first)"
    )
    commands.add_parser("list", help="list the backups in backup.dir, newest first")
    return parser.parse_args(argv)


def _alert_failure(settings: Settings, secrets: Secrets, message: str) -> str:
    """Send the 'backup failed' alert through the agent's own path; return a word for the console."""
    from data.alerts import Alerter

    journal = None
    if secrets.database_url is not None or settings.resolve(settings.database.embedded_dir).exists():
        try:
            from data.database import Journal

            journal = Journal.connect(journal_dsn(settings, secrets))
        except Exception:  # best effort: the journal may be exactly what is broken
            journal = None
    try:
        outcome = Alerter(settings.alerts, secrets.smtp_password, journal).send(
            "Journal backup failed", message, priority="high", event="backup_failed"
        )
    finally:
        if journal is not None:
            journal.close()
    return "alert sent" if outcome.sent else f"alert NOT sent: {outcome.error}"


def main(argv: list[str] | None = None) -> int:
    """Run the backup CLI. Returns the exit code."""
    args = parse_args(argv)
    from config.logs import configure_logging
    from config.settings import load_settings

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"{args.command} failed: {exc}", file=sys.stderr)
        return 2
    now = datetime.now(HKT)
    configure_logging(settings.resolve(settings.agent.log_dir), now)
    secrets = Secrets.from_env()
    if args.command == "list":
        folder = backup_folder(settings)
        files = sorted(folder.glob(f"*{SUFFIX}"), key=lambda p: p.name, reverse=True) if folder.is_dir() else []
        for path in files:
            print(f"{path}  {path.stat().st_size:,} bytes")
        if not files:
            print(f"no backups in {folder}")
        return 0
    if args.command == "backup":
        try:
            result = run_backup(settings, secrets, now, folder=args.dir)
        except Exception as exc:  # any failure must alert: a silent missing backup is found out too late
            message = str(exc) if isinstance(exc, AgentError) else f"{type(exc).__name__}: {exc}"
            log.error("backup_failed", error=message)
            outcome = _alert_failure(settings, secrets, message)
            print(f"backup FAILED: {message} ({outcome})", file=sys.stderr)
            return 2 if isinstance(exc, ConfigError) else 1
        print(f"backup written: {result.path} ({result.size_bytes:,} bytes, {len(result.tables)} tables, verified)")
        for path in result.deleted:
            print(f"retention: deleted {path.name}")
        return 0
    try:
        restored = restore_journal(settings, secrets, args.file, now, force=args.force)
    except AgentError as exc:
        log.error("restore_failed", error=str(exc), refused=isinstance(exc, ConfigError))
        print(f"restore {'refused' if isinstance(exc, ConfigError) else 'FAILED'}: {exc}", file=sys.stderr)
        return exc.exit_code
    if restored.replaced_backup is not None:
        print(f"the journal it replaced was saved to {restored.replaced_backup}")
    print(f"restored {restored.source} ({_summary(restored.row_counts)}); the next run reconciles with the broker")
    return 0


if __name__ == "__main__":
    sys.exit(main())
