"""The PostgreSQL journal: cycles, tool calls, orders, stops, decisions, equity, alerts, flags, K-line cache.

psycopg 3 with parameters only. The connection runs in autocommit, so every write is durable when the
method returns: an order intent is committed before the broker sees it. Migrations are the numbered SQL
files in ``data/migrations/``; each runs once in its own transaction and is recorded in ``schema_migrations``.

Where the server comes from: ``DATABASE_URL`` when set, otherwise an embedded PostgreSQL (the ``pgserver``
package) in ``settings.database.embedded_dir``, left running between runs so the next cron run reuses it.
DSNs are redacted (``redact_dsn``) in every message and log line.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import subprocess
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from enum import Enum
from pathlib import Path
from typing import Any, Literal, TypeVar

import psycopg
import structlog
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import kwargs_row
from psycopg.types.json import Jsonb
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from brokers.base import Bar, OrderStatus, OrderType, Side
from config.errors import ConfigError, JournalError
from config.settings import Secrets, Settings

log = structlog.get_logger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
EMBEDDED_DB_NAME = "catalyst"
EMBEDDED_SYSTEM_USER = "pgserver"  # pgserver runs postgres as this user when we are root
CONNECT_TIMEOUT_S = 10

# Two-int advisory keys and one-bigint keys are separate key spaces in PostgreSQL, so the migration lock can
# never collide with an account lock. 0x43415441 is "CATA".
_MIGRATION_LOCK = (0x43415441, 1)

_MIGRATION_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+$")

CycleMode = Literal["trade", "dry_run", "guard"]
CycleStatus = Literal["running", "ok", "error", "skipped", "halted"]
SnapshotKind = Literal["start_of_day", "cycle"]

UNRESOLVED_STATUSES: frozenset[OrderStatus] = frozenset(
    {OrderStatus.PENDING, OrderStatus.SUBMITTED, OrderStatus.PARTIALLY_FILLED, OrderStatus.UNKNOWN}
)
# Orders that never reached the broker, so they do not count against the daily trade limit.
NOT_TRADED_STATUSES: frozenset[OrderStatus] = frozenset({OrderStatus.DRY_RUN, OrderStatus.REJECTED})


# --------------------------------------------------------------------------------------------------------------
# Rows and inputs


class _Row(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CycleRow(_Row):
    id: int
    run_id: str
    trading_date: date
    started_at: datetime
    finished_at: datetime | None
    mode: CycleMode
    broker: str
    brain: str
    model: str | None
    status: CycleStatus
    summary: str | None
    error: str | None
    iterations: int
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    cost_usd: Decimal


class ToolCallRow(_Row):
    id: int
    cycle_id: int
    seq: int
    name: str
    input: Any
    allowed: bool
    reason: str | None
    result: Any
    is_error: bool
    duration_ms: int | None
    created_at: datetime


class OrderIntent(_Row):
    """An order as we mean to send it, journalled before the broker call (``Journal.insert_order``)."""

    client_order_id: str = Field(min_length=1, max_length=64)
    cycle_id: int | None
    symbol: str
    side: Side
    quantity: int = Field(gt=0)
    order_type: OrderType = OrderType.LIMIT
    limit_price: Decimal | None = None
    stop_loss: Decimal | None = None
    take_profit: Decimal | None = None
    status: Literal[OrderStatus.PENDING, OrderStatus.DRY_RUN] = OrderStatus.PENDING
    reason: str | None = None
    trading_date: date
    created_at: datetime | None = None  # None: the database clock


class OrderRow(_Row):
    id: int
    client_order_id: str
    cycle_id: int | None
    symbol: str
    side: Side
    quantity: int
    order_type: OrderType
    limit_price: Decimal | None
    stop_loss: Decimal | None
    take_profit: Decimal | None
    status: OrderStatus
    broker_order_id: str | None
    filled_quantity: int
    avg_fill_price: Decimal | None
    reason: str | None
    trading_date: date
    created_at: datetime
    updated_at: datetime
    submitted_at: datetime | None
    filled_at: datetime | None

    @property
    def is_unresolved(self) -> bool:
        return self.status in UNRESOLVED_STATUSES


class StopRow(_Row):
    symbol: str
    quantity: int
    entry_price: Decimal
    stop_loss: Decimal
    take_profit: Decimal | None
    broker_stop_order_id: str | None
    source: str
    cycle_id: int | None
    created_at: datetime
    updated_at: datetime


class DecisionRow(_Row):
    id: int
    cycle_id: int | None
    decision: str
    reasoning: str
    confidence: float | None
    created_at: datetime


class AlertRow(_Row):
    id: int
    cycle_id: int | None
    subject: str
    message: str
    priority: str
    event: str | None
    sent: bool
    error: str | None
    created_at: datetime


class EquitySnapshotRow(_Row):
    id: int
    trading_date: date
    kind: SnapshotKind
    equity: Decimal
    cash: Decimal | None
    taken_at: datetime


class FlagRow(_Row):
    name: str
    value: str
    set_at: datetime
    set_by: str


@dataclass(frozen=True)
class Migration:
    number: int
    name: str  # file stem, e.g. "001_initial": what schema_migrations records
    path: Path

    def read_sql(self) -> str:
        return self.path.read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------------------------
# DSN redaction


_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_KV_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s'&]+)", re.IGNORECASE)
REDACTED = "***"


def redact_dsn(dsn: str | SecretStr) -> str:
    """The connection string with any password replaced by ``***``, for messages and logs."""
    text = dsn.get_secret_value() if isinstance(dsn, SecretStr) else dsn
    match = _URL_SCHEME.match(text)
    if match:
        prefix, rest = text[: match.end()], text[match.end() :]
        query_at = rest.find("?")
        authority = rest if query_at < 0 else rest[:query_at]
        at = authority.rfind("@")
        if at >= 0:
            userinfo = authority[:at]
            if ":" in userinfo:
                user = userinfo.split(":", 1)[0]
                rest = f"{user}:{REDACTED}{rest[at:]}"
        text = prefix + rest
    return _KV_PASSWORD.sub(lambda m: m.group(1) + REDACTED, text)


def _password_of(dsn: str) -> str | None:
    try:
        return conninfo_to_dict(dsn).get("password") or None
    except psycopg.Error:
        return None


def _scrub(text: str, dsn: str) -> str:
    """Remove the DSN's password from a message (a driver error might echo it) and flatten it to one line."""
    password = _password_of(dsn)
    if password:
        text = text.replace(password, REDACTED)
    text = redact_dsn(text)
    return " ".join(text.split())


def _sentence(text: str) -> str:
    """``text`` ending with a full stop (driver messages end in '?', '.' or nothing)."""
    text = text.strip()
    return text if text.endswith((".", "?", "!")) else text + "."


def _describe_target(dsn: str) -> str:
    """``host X port Y (database D, user U)`` from a DSN, for error messages. Never includes the password."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "an unparseable DSN"
    host = params.get("host") or params.get("hostaddr") or os.environ.get("PGHOST") or "the default local socket"
    port = params.get("port") or os.environ.get("PGPORT") or "5432"
    dbname = params.get("dbname") or "(default)"
    user = params.get("user") or "(default)"
    return f"host {host} port {port} (database {dbname}, user {user})"


# --------------------------------------------------------------------------------------------------------------
# JSON for jsonb columns


def _jsonable(value: Any) -> Any:
    """A JSON-safe copy: Decimal and dates as strings, NaN/inf as null, models dumped, NUL characters dropped.

    PostgreSQL's jsonb rejects NaN and ``\\u0000``, and a tool result must never fail to journal because of them.
    """
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, Enum):
        return _jsonable(value.value)
    if isinstance(value, Decimal):
        return str(value) if value.is_finite() else None
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, BaseModel):
        return _jsonable(value.model_dump(mode="json"))
    if isinstance(value, dict):
        return {str(_jsonable(k)): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    return str(value)


def _jsonb(value: Any) -> Jsonb:
    return Jsonb(_jsonable(value), dumps=lambda obj: json.dumps(obj, ensure_ascii=False, allow_nan=False))


# --------------------------------------------------------------------------------------------------------------
# Migrations


def discover_migrations(folder: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The numbered ``NNN_name.sql`` files in order. Raises ``JournalError`` on a misnamed or duplicate number."""
    migrations: list[Migration] = []
    seen: dict[int, str] = {}
    for path in sorted(folder.glob("*.sql")):
        match = _MIGRATION_NAME.match(path.stem)
        if not match:
            raise JournalError(
                f"Migration file {path} is misnamed: migrations must be called NNN_lowercase_name.sql "
                "(three digits, then words joined by underscores). Rename it."
            )
        number = int(match.group(1))
        if number in seen:
            raise JournalError(
                f"Migrations {seen[number]} and {path.stem} in {folder} share the number {number:03d}. "
                "Give the newer one the next free number."
            )
        seen[number] = path.stem
        migrations.append(Migration(number=number, name=path.stem, path=path))
    return sorted(migrations, key=lambda m: m.number)


_BOOTSTRAP = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    name       text        PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


# --------------------------------------------------------------------------------------------------------------
# Embedded server


def _first_blocked_parent(path: Path, uid: int | None, gids: set[int]) -> Path | None:
    """The topmost existing ancestor of ``path`` that the user (uid, gids) cannot enter, or None."""
    for parent in reversed(path.parents):
        try:
            info = parent.stat()
        except FileNotFoundError:
            return None  # the rest will be created by us, traversable
        if uid is not None and info.st_uid == uid:
            bit = stat.S_IXUSR
        elif info.st_gid in gids:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not info.st_mode & bit:
            return parent
    return None


def _system_user_ids(name: str) -> tuple[int | None, set[int]]:
    import grp
    import pwd

    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None, set()  # pgserver will create it with its own group: it counts as "other" everywhere
    gids = {entry.pw_gid} | {g.gr_gid for g in grp.getgrall() if name in g.gr_mem}
    return entry.pw_uid, gids


def _check_traversable(pgdata: Path, settings: Settings) -> None:
    """As root, pgserver runs postgres as the ``pgserver`` user; refuse a data folder it cannot reach.

    pgserver itself would silently ``chmod o+rx`` every parent (``/root`` included). We refuse instead and say
    what to do.
    """
    uid, gids = _system_user_ids(EMBEDDED_SYSTEM_USER)
    blocked = _first_blocked_parent(pgdata, uid, gids)
    if blocked is None:
        return
    mode = stat.S_IMODE(blocked.stat().st_mode)
    where = f"database.embedded_dir in {settings.source}" if settings.source else "database.embedded_dir"
    raise ConfigError(
        f"Cannot use the embedded PostgreSQL in {pgdata}: running as root, it runs as the system user "
        f"'{EMBEDDED_SYSTEM_USER}', which cannot enter {blocked} (mode {mode:04o}). "
        f"Either set DATABASE_URL to a PostgreSQL server, or set {where} to a folder whose parents are all "
        f"traversable by other users (for example /var/lib/catalyst/pg, or `chmod o+x {blocked}` if that is "
        "acceptable), or run the agent as a non-root user."
    )


def _make_parents(pgdata: Path) -> None:
    """Create the data folder's missing parents, each traversable (pgserver needs the parent to exist)."""
    missing = [p for p in reversed(pgdata.parents) if not p.exists()]
    for folder in missing:
        try:
            folder.mkdir()
            folder.chmod(0o755)
        except FileExistsError:
            continue
        except OSError as exc:
            raise ConfigError(
                f"Cannot create {folder} for the embedded PostgreSQL data folder {pgdata}: {exc.strerror}. "
                "Set database.embedded_dir to a writable folder, or set DATABASE_URL."
            ) from exc


def embedded_server_dsn(settings: Settings, *, dbname: str = EMBEDDED_DB_NAME) -> str:
    """Start (or reuse) the embedded PostgreSQL and return a DSN for ``dbname``, creating the database.

    The server is left running when this process exits (pgserver ``cleanup_mode=None``): the next run finds
    it through ``postmaster.pid`` and connects in milliseconds instead of starting it again.
    """
    pgdata = settings.resolve(settings.database.embedded_dir).expanduser().resolve()
    is_root = os.name == "posix" and os.geteuid() == 0
    if is_root:
        _check_traversable(pgdata, settings)
    _make_parents(pgdata)
    if is_root:
        _check_traversable(pgdata, settings)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR under cron
        import pgserver

        try:
            server = pgserver.get_server(pgdata, cleanup_mode=None)
        except (subprocess.SubprocessError, OSError, RuntimeError, AssertionError) as exc:
            raise JournalError(
                f"Could not start the embedded PostgreSQL in {pgdata}: {type(exc).__name__}: {exc}. "
                f"Its log is {pgdata / 'log'}. Fix what it says, or set DATABASE_URL to another server."
            ) from exc
    admin_dsn = server.get_uri("postgres")
    _ensure_database(admin_dsn, dbname)
    log.info("embedded_postgres_ready", data_dir=str(pgdata), database=dbname)
    return server.get_uri(dbname)


def _ensure_database(admin_dsn: str, dbname: str) -> None:
    try:
        with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone()
            if exists is None:
                try:
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
                    log.info("database_created", database=dbname)
                except psycopg.errors.DuplicateDatabase:
                    pass  # another run created it in the meantime
    except psycopg.Error as exc:
        raise JournalError(
            f"Could not create the database {dbname} on the embedded PostgreSQL at {_describe_target(admin_dsn)}: "
            f"{_scrub(str(exc), admin_dsn)}"
        ) from exc


def advisory_key(account_key: str) -> int:
    """A stable signed 64-bit advisory-lock key for an account (the same in every process and version)."""
    digest = hashlib.sha256(f"catalyst-account:{account_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


# --------------------------------------------------------------------------------------------------------------
# The journal

M = TypeVar("M", bound=BaseModel)


class Journal:
    """One autocommit connection to the journal database. Every method raises ``JournalError`` on failure."""

    def __init__(self, conn: psycopg.Connection[Any], dsn: str) -> None:
        self._conn = conn
        self._dsn = dsn
        self.dsn_redacted = redact_dsn(dsn)
        self._held_locks: set[str] = set()

    # ---- lifecycle -------------------------------------------------------------------------------------------

    @classmethod
    def connect(cls, dsn: str | SecretStr) -> Journal:
        """Connect to ``dsn`` (not migrated: call ``migrate()``). ``JournalError`` names host and port on failure."""
        text = dsn.get_secret_value() if isinstance(dsn, SecretStr) else dsn
        try:
            params = conninfo_to_dict(text)
        except psycopg.Error as exc:
            raise JournalError(
                f"The journal DSN {redact_dsn(text)!r} is not a valid PostgreSQL connection string: "
                f"{_sentence(_scrub(str(exc), text))} Write it as postgresql://user:password@host:port/dbname."
            ) from None
        kwargs: dict[str, Any] = {}
        if "connect_timeout" not in params:
            kwargs["connect_timeout"] = CONNECT_TIMEOUT_S
        try:
            conn = psycopg.connect(text, autocommit=True, **kwargs)
        except psycopg.Error as exc:
            # No chained cause: the driver's exception text is not guaranteed to be free of the password.
            raise JournalError(
                f"Could not connect to the PostgreSQL journal at {_describe_target(text)}: "
                f"{_sentence(_scrub(str(exc), text))} Check that the server is running and that DATABASE_URL is right, "
                "or unset DATABASE_URL to use the embedded server."
            ) from None
        try:
            # Timestamps come back in exchange time; stored values are absolute (timestamptz) either way.
            conn.execute("SET TIME ZONE 'Asia/Hong_Kong'")
        except psycopg.Error as exc:
            conn.close()
            raise JournalError(f"Could not configure the journal connection: {_scrub(str(exc), text)}") from None
        journal = cls(conn, text)
        log.info("journal_connected", dsn=journal.dsn_redacted)
        return journal

    @classmethod
    def open(cls, settings: Settings, secrets: Secrets) -> Journal:
        """Connect to ``DATABASE_URL`` or else the embedded server, and apply pending migrations."""
        if secrets.database_url is not None:
            dsn = secrets.database_url.get_secret_value()
        else:
            dsn = embedded_server_dsn(settings)
        journal = cls.connect(dsn)
        try:
            journal.migrate()
        except BaseException:
            journal.close()
            raise
        return journal

    def close(self) -> None:
        """Release account locks and close the connection. Safe to call twice."""
        if self._conn.closed:
            return
        for key in list(self._held_locks):
            with suppress(JournalError):  # closing the connection releases the advisory lock anyway
                self.unlock(key)
        self._conn.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return bool(self._conn.closed)

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Turn driver errors into ``JournalError`` saying what was attempted."""
        try:
            yield
        except psycopg.Error as exc:
            raise JournalError(f"Journal could not {what}: {_scrub(str(exc), self._dsn)}") from exc

    def _one(self, model: type[M], what: str, query: str, params: Sequence[Any] = ()) -> M | None:
        with self._errors(what), self._conn.cursor(row_factory=kwargs_row(model)) as cur:
            cur.execute(query, params)  # type: ignore[arg-type]
            return cur.fetchone()

    def _all(self, model: type[M], what: str, query: str, params: Sequence[Any] = ()) -> list[M]:
        with self._errors(what), self._conn.cursor(row_factory=kwargs_row(model)) as cur:
            cur.execute(query, params)  # type: ignore[arg-type]
            return cur.fetchall()

    def _scalar(self, what: str, query: str, params: Sequence[Any] = ()) -> Any:
        with self._errors(what):
            row = self._conn.execute(query, params).fetchone()  # type: ignore[arg-type]
        return None if row is None else row[0]

    # ---- migrations ------------------------------------------------------------------------------------------

    def applied_migrations(self) -> list[str]:
        """Names recorded in ``schema_migrations``, oldest first (empty on a fresh database)."""
        if self._scalar("look for schema_migrations", "SELECT to_regclass('schema_migrations')") is None:
            return []
        with self._errors("read schema_migrations"):
            rows = self._conn.execute("SELECT name FROM schema_migrations ORDER BY name").fetchall()
        return [r[0] for r in rows]

    def migrate(self, target: str | None = None, *, folder: Path = MIGRATIONS_DIR) -> list[str]:
        """Apply pending migrations in order (up to and including ``target`` if given); return their names.

        Each runs in its own transaction under a transaction-level advisory lock, and re-checks
        ``schema_migrations`` once it holds the lock, so concurrent runs apply each migration exactly once.
        """
        migrations = discover_migrations(folder)
        names = [m.name for m in migrations]
        if target is not None:
            if target not in names:
                raise JournalError(f"No migration named {target!r} in {folder}; known: {', '.join(names)}.")
            migrations = migrations[: names.index(target) + 1]
        already = set(self.applied_migrations())
        unknown = sorted(already - set(names))
        if unknown:
            log.warning("unknown_migrations_applied", names=unknown, hint="the database is newer than this code")
        applied: list[str] = []
        for migration in migrations:
            if migration.name in already:
                continue
            if self._apply(migration):
                applied.append(migration.name)
        if applied:
            log.info("migrations_applied", names=applied, dsn=self.dsn_redacted)
        return applied

    def _apply(self, migration: Migration) -> bool:
        statements = migration.read_sql()
        try:
            with self._conn.transaction():
                self._conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", _MIGRATION_LOCK)
                self._conn.execute(_BOOTSTRAP)
                done = self._conn.execute(
                    "SELECT 1 FROM schema_migrations WHERE name = %s", (migration.name,)
                ).fetchone()
                if done is not None:
                    return False  # another process applied it while we waited for the lock
                self._conn.execute(statements)  # type: ignore[arg-type]  # trusted file, no parameters
                self._conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (migration.name,))
        except psycopg.Error as exc:
            raise JournalError(
                f"Migration {migration.name} ({migration.path}) failed and was rolled back: "
                f"{_sentence(_scrub(str(exc), self._dsn))} The database stays at the previous migration; fix the SQL "
                "or the database and run again."
            ) from exc
        return True

    # ---- cycles ----------------------------------------------------------------------------------------------

    def start_cycle(
        self,
        *,
        run_id: str,
        mode: CycleMode,
        broker: str,
        brain: str,
        model: str | None,
        started_at: datetime,
        trading_date: date,
    ) -> int:
        """Insert a ``running`` cycle and return its id."""
        cycle_id = self._scalar(
            f"start a {mode} cycle for run {run_id}",
            "INSERT INTO cycles (run_id, mode, broker, brain, model, started_at, trading_date, status) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, 'running') RETURNING id",
            (run_id, mode, broker, brain, model, started_at, trading_date),
        )
        return int(cycle_id)

    def finish_cycle(
        self,
        cycle_id: int,
        *,
        status: CycleStatus,
        finished_at: datetime,
        summary: str | None = None,
        error: str | None = None,
        iterations: int = 0,
        input_tokens: int = 0,
        output_tokens: int = 0,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
        cost_usd: float | Decimal = 0.0,
    ) -> None:
        """Close a cycle with its outcome and usage."""
        cost = cost_usd if isinstance(cost_usd, Decimal) else Decimal(repr(float(cost_usd)))
        updated = self._scalar(
            f"finish cycle {cycle_id} as {status}",
            "UPDATE cycles SET status = %s, finished_at = %s, summary = %s, error = %s, iterations = %s, "
            "input_tokens = %s, output_tokens = %s, cache_read_tokens = %s, cache_write_tokens = %s, "
            "cost_usd = %s WHERE id = %s RETURNING id",
            (
                status,
                finished_at,
                summary,
                error,
                iterations,
                input_tokens,
                output_tokens,
                cache_read_tokens,
                cache_write_tokens,
                cost,
                cycle_id,
            ),
        )
        if updated is None:
            raise JournalError(f"Journal could not finish cycle {cycle_id}: there is no cycle with that id.")

    def get_cycle(self, cycle_id: int) -> CycleRow | None:
        return self._one(CycleRow, f"read cycle {cycle_id}", "SELECT * FROM cycles WHERE id = %s", (cycle_id,))

    def cycles_on(self, trading_date: date) -> list[CycleRow]:
        """Cycles of one trading date, oldest first."""
        return self._all(
            CycleRow,
            f"list cycles of {trading_date}",
            "SELECT * FROM cycles WHERE trading_date = %s ORDER BY started_at, id",
            (trading_date,),
        )

    def cost_usd_since(self, since: datetime) -> float:
        """Model spend (USD) of the cycles started at or after ``since``."""
        total = self._scalar(
            f"sum cycle costs since {since.isoformat()}",
            "SELECT COALESCE(SUM(cost_usd), 0) FROM cycles WHERE started_at >= %s",
            (since,),
        )
        return float(total)

    # ---- tool calls ------------------------------------------------------------------------------------------

    def record_tool_call(
        self,
        cycle_id: int,
        seq: int,
        name: str,
        input: Any,
        allowed: bool,
        reason: str | None,
        result: Any,
        is_error: bool,
        duration_ms: int | None,
    ) -> int:
        """Journal one tool call. ``input``/``result`` may be any JSON-able value (a plain string too)."""
        with self._errors(f"record tool call #{seq} ({name}) of cycle {cycle_id}"):
            row = self._conn.execute(
                "INSERT INTO tool_calls (cycle_id, seq, name, input, allowed, reason, result, is_error, duration_ms) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
                (cycle_id, seq, name, _jsonb(input), allowed, reason, _jsonb(result), is_error, duration_ms),
            ).fetchone()
        assert row is not None
        return int(row[0])

    def tool_calls(self, cycle_id: int) -> list[ToolCallRow]:
        return self._all(
            ToolCallRow,
            f"list tool calls of cycle {cycle_id}",
            "SELECT * FROM tool_calls WHERE cycle_id = %s ORDER BY seq",
            (cycle_id,),
        )

    # ---- orders ----------------------------------------------------------------------------------------------

    def insert_order(self, intent: OrderIntent) -> OrderRow:
        """Write an order intent (committed on return). Call it before the broker sees the order.

        Raises ``JournalError`` if the ``client_order_id`` is already journalled: a retry must look the
        order up (``get_order``) rather than insert it again.
        """
        what = f"journal order {intent.client_order_id} ({intent.side} {intent.quantity} {intent.symbol})"
        try:
            row = self._one(
                OrderRow,
                what,
                "INSERT INTO orders (client_order_id, cycle_id, symbol, side, quantity, order_type, limit_price, "
                "stop_loss, take_profit, status, reason, trading_date, created_at, updated_at) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, COALESCE(%s, now()), COALESCE(%s, now())) "
                "RETURNING *",
                (
                    intent.client_order_id,
                    intent.cycle_id,
                    intent.symbol,
                    intent.side.value,
                    intent.quantity,
                    intent.order_type.value,
                    intent.limit_price,
                    intent.stop_loss,
                    intent.take_profit,
                    intent.status.value,
                    intent.reason,
                    intent.trading_date,
                    intent.created_at,
                    intent.created_at,
                ),
            )
        except JournalError as exc:
            if isinstance(exc.__cause__, psycopg.errors.UniqueViolation):
                raise JournalError(
                    f"Could not journal order {intent.client_order_id}: an order with that client_order_id is "
                    "already in the journal (it must be unique). Nothing was sent to the broker; look the "
                    "existing order up with get_order instead of inserting it again."
                ) from exc.__cause__
            raise
        assert row is not None
        return row

    def update_order(
        self,
        client_order_id: str,
        *,
        status: OrderStatus | str,
        broker_order_id: str | None = None,
        filled_quantity: int | None = None,
        avg_fill_price: Decimal | None = None,
        reason: str | None = None,
        at: datetime,
    ) -> OrderRow:
        """Record what the broker said about an order. ``None`` arguments keep the stored value.

        ``submitted_at`` is set the first time the order reaches a broker-side state, ``filled_at`` when filled.
        """
        new_status = OrderStatus(status)
        reached_broker = new_status in {OrderStatus.SUBMITTED, OrderStatus.PARTIALLY_FILLED, OrderStatus.FILLED}
        row = self._one(
            OrderRow,
            f"update order {client_order_id} to {new_status.value}",
            "UPDATE orders SET status = %s, broker_order_id = COALESCE(%s, broker_order_id), "
            "filled_quantity = COALESCE(%s, filled_quantity), avg_fill_price = COALESCE(%s, avg_fill_price), "
            "reason = COALESCE(%s, reason), updated_at = %s, "
            "submitted_at = CASE WHEN %s THEN COALESCE(submitted_at, %s) ELSE submitted_at END, "
            "filled_at = CASE WHEN %s THEN COALESCE(filled_at, %s) ELSE filled_at END "
            "WHERE client_order_id = %s RETURNING *",
            (
                new_status.value,
                broker_order_id,
                filled_quantity,
                avg_fill_price,
                reason,
                at,
                reached_broker,
                at,
                new_status is OrderStatus.FILLED,
                at,
                client_order_id,
            ),
        )
        if row is None:
            raise JournalError(
                f"Journal could not update order {client_order_id} to {new_status.value}: no order with that "
                "client_order_id is journalled. Orders must be inserted (insert_order) before the broker call."
            )
        return row

    def get_order(self, client_order_id: str) -> OrderRow | None:
        return self._one(
            OrderRow,
            f"read order {client_order_id}",
            "SELECT * FROM orders WHERE client_order_id = %s",
            (client_order_id,),
        )

    def orders_on(self, trading_date: date) -> list[OrderRow]:
        """Orders of one trading date, oldest first."""
        return self._all(
            OrderRow,
            f"list orders of {trading_date}",
            "SELECT * FROM orders WHERE trading_date = %s ORDER BY created_at, id",
            (trading_date,),
        )

    def unresolved_orders(self) -> list[OrderRow]:
        """Orders whose fate is open (pending, submitted, partially filled, unknown), oldest first."""
        return self._all(
            OrderRow,
            "list unresolved orders",
            "SELECT * FROM orders WHERE status = ANY(%s) ORDER BY created_at, id",
            ([s.value for s in sorted(UNRESOLVED_STATUSES)],),
        )

    def count_trades_on(self, trading_date: date) -> int:
        """Orders of the date that reached (or may have reached) the broker: all but dry_run and rejected, and
        not the protective stop orders (placed, resized and replaced by code, they are not trades)."""
        count = self._scalar(
            f"count trades of {trading_date}",
            "SELECT count(*) FROM orders WHERE trading_date = %s AND status <> ALL(%s) "
            "AND order_type NOT IN ('stop', 'stop_limit')",
            (trading_date, [s.value for s in sorted(NOT_TRADED_STATUSES)]),
        )
        return int(count)

    # ---- protective stops ------------------------------------------------------------------------------------

    def upsert_protective_stop(
        self,
        symbol: str,
        *,
        quantity: int,
        entry_price: Decimal,
        stop_loss: Decimal,
        take_profit: Decimal | None = None,
        broker_stop_order_id: str | None = None,
        source: str = "entry",
        cycle_id: int | None = None,
        at: datetime | None = None,
    ) -> StopRow:
        """Create or replace the stop a position lives under (``created_at`` survives a replace)."""
        row = self._one(
            StopRow,
            f"save the protective stop of {symbol}",
            "INSERT INTO protective_stops (symbol, quantity, entry_price, stop_loss, take_profit, "
            "broker_stop_order_id, source, cycle_id, created_at, updated_at) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, COALESCE(%s, now()), COALESCE(%s, now())) "
            "ON CONFLICT (symbol) DO UPDATE SET quantity = EXCLUDED.quantity, entry_price = EXCLUDED.entry_price, "
            "stop_loss = EXCLUDED.stop_loss, take_profit = EXCLUDED.take_profit, "
            "broker_stop_order_id = EXCLUDED.broker_stop_order_id, source = EXCLUDED.source, "
            "cycle_id = EXCLUDED.cycle_id, updated_at = EXCLUDED.updated_at RETURNING *",
            (symbol, quantity, entry_price, stop_loss, take_profit, broker_stop_order_id, source, cycle_id, at, at),
        )
        assert row is not None
        return row

    def protective_stops(self) -> dict[str, StopRow]:
        rows = self._all(StopRow, "list protective stops", "SELECT * FROM protective_stops ORDER BY symbol")
        return {r.symbol: r for r in rows}

    def delete_protective_stop(self, symbol: str) -> bool:
        """Forget a position's stop; True if there was one."""
        deleted = self._scalar(
            f"delete the protective stop of {symbol}",
            "DELETE FROM protective_stops WHERE symbol = %s RETURNING symbol",
            (symbol,),
        )
        return deleted is not None

    # ---- decisions, alerts -----------------------------------------------------------------------------------

    def record_decision(self, cycle_id: int | None, decision: str, reasoning: str, confidence: float | None) -> int:
        decision_id = self._scalar(
            f"record a decision of cycle {cycle_id}",
            "INSERT INTO decisions (cycle_id, decision, reasoning, confidence) VALUES (%s, %s, %s, %s) RETURNING id",
            (cycle_id, decision, reasoning, confidence),
        )
        return int(decision_id)

    def decisions(self, cycle_id: int) -> list[DecisionRow]:
        return self._all(
            DecisionRow,
            f"list decisions of cycle {cycle_id}",
            "SELECT * FROM decisions WHERE cycle_id = %s ORDER BY id",
            (cycle_id,),
        )

    def record_alert(
        self,
        cycle_id: int | None,
        subject: str,
        message: str,
        priority: str,
        event: str | None,
        sent: bool,
        error: str | None,
        at: datetime | None = None,
    ) -> int:
        alert_id = self._scalar(
            f"record alert {subject!r}",
            "INSERT INTO alerts (cycle_id, subject, message, priority, event, sent, error, created_at) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, COALESCE(%s, now())) RETURNING id",
            (cycle_id, subject, message, priority, event, sent, error, at),
        )
        return int(alert_id)

    def alerts_since(self, since: datetime) -> list[AlertRow]:
        """Alerts created at or after ``since``, oldest first."""
        return self._all(
            AlertRow,
            f"list alerts since {since.isoformat()}",
            "SELECT * FROM alerts WHERE created_at >= %s ORDER BY created_at, id",
            (since,),
        )

    # ---- equity ----------------------------------------------------------------------------------------------

    def record_equity_snapshot(
        self,
        trading_date: date,
        kind: SnapshotKind,
        equity: Decimal,
        cash: Decimal | None,
        taken_at: datetime,
    ) -> bool:
        """Store an equity reading. A second ``start_of_day`` for a date is ignored (first wins): returns False."""
        if kind == "start_of_day":
            query = (
                "INSERT INTO equity_snapshots (trading_date, kind, equity, cash, taken_at) "
                "VALUES (%s, %s, %s, %s, %s) "
                "ON CONFLICT (trading_date) WHERE kind = 'start_of_day' DO NOTHING RETURNING id"
            )
        else:
            query = (
                "INSERT INTO equity_snapshots (trading_date, kind, equity, cash, taken_at) "
                "VALUES (%s, %s, %s, %s, %s) RETURNING id"
            )
        inserted = self._scalar(
            f"record the {kind} equity of {trading_date}", query, (trading_date, kind, equity, cash, taken_at)
        )
        return inserted is not None

    def start_of_day_equity(self, trading_date: date) -> Decimal | None:
        """The daily P&L baseline of ``trading_date``, or None before the first snapshot of the day."""
        value = self._scalar(
            f"read the start-of-day equity of {trading_date}",
            "SELECT equity FROM equity_snapshots WHERE trading_date = %s AND kind = 'start_of_day'",
            (trading_date,),
        )
        return None if value is None else Decimal(value)

    def equity_snapshots(self, trading_date: date) -> list[EquitySnapshotRow]:
        return self._all(
            EquitySnapshotRow,
            f"list equity snapshots of {trading_date}",
            "SELECT * FROM equity_snapshots WHERE trading_date = %s ORDER BY taken_at, id",
            (trading_date,),
        )

    # ---- control flags (the journal kill switch is the flag 'halt') ------------------------------------------

    def get_flag(self, name: str) -> str | None:
        value = self._scalar(f"read flag {name}", "SELECT value FROM control_flags WHERE name = %s", (name,))
        return None if value is None else str(value)

    def get_flag_row(self, name: str) -> FlagRow | None:
        """The flag with who set it and when."""
        return self._one(FlagRow, f"read flag {name}", "SELECT * FROM control_flags WHERE name = %s", (name,))

    def set_flag(self, name: str, value: str, set_by: str, at: datetime | None = None) -> None:
        with self._errors(f"set flag {name}"):
            self._conn.execute(
                "INSERT INTO control_flags (name, value, set_by, set_at) VALUES (%s, %s, %s, COALESCE(%s, now())) "
                "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value, set_by = EXCLUDED.set_by, "
                "set_at = EXCLUDED.set_at",
                (name, value, set_by, at),
            )

    def clear_flag(self, name: str) -> bool:
        """Remove a flag; True if it was set."""
        deleted = self._scalar(
            f"clear flag {name}", "DELETE FROM control_flags WHERE name = %s RETURNING name", (name,)
        )
        return deleted is not None

    # ---- K-line cache ----------------------------------------------------------------------------------------

    def get_klines(self, symbol: str, timeframe: str, since: datetime) -> list[Bar]:
        """Cached bars of ``symbol``/``timeframe`` starting at or after ``since``, oldest first."""
        with self._errors(f"read cached {timeframe} bars of {symbol}"):
            rows = self._conn.execute(
                "SELECT bar_time, open, high, low, close, volume FROM kline_cache "
                "WHERE symbol = %s AND timeframe = %s AND bar_time >= %s ORDER BY bar_time",
                (symbol, timeframe, since),
            ).fetchall()
        return [Bar(time=t, open=o, high=h, low=lo, close=c, volume=v) for t, o, h, lo, c, v in rows]

    def put_klines(self, symbol: str, timeframe: str, bars: Iterable[Bar]) -> int:
        """Insert or refresh bars (the latest bar of a session changes until it closes). Returns the count."""
        params = [(symbol, timeframe, b.time, b.open, b.high, b.low, b.close, b.volume) for b in bars]
        if not params:
            return 0
        with (
            self._errors(f"cache {len(params)} {timeframe} bars of {symbol}"),
            self._conn.transaction(),
            self._conn.cursor() as cur,
        ):
            cur.executemany(
                "INSERT INTO kline_cache (symbol, timeframe, bar_time, open, high, low, close, volume) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (symbol, timeframe, bar_time) DO UPDATE SET open = EXCLUDED.open, "
                "high = EXCLUDED.high, low = EXCLUDED.low, close = EXCLUDED.close, volume = EXCLUDED.volume",
                params,
            )
        return len(params)

    # ---- index constituents -----------------------------------------------------------------------------------

    def get_constituents(self, index_name: str, trading_date: date) -> list[str] | None:
        """The constituents of ``index_name`` stored for ``trading_date``, or None."""
        value = self._scalar(
            f"read the {index_name} constituents of {trading_date}",
            "SELECT symbols FROM index_constituents WHERE index_name = %s AND trading_date = %s",
            (index_name, trading_date),
        )
        return None if value is None else list(value)

    def put_constituents(self, index_name: str, trading_date: date, symbols: Sequence[str]) -> None:
        """Store (or replace) the constituents of ``index_name`` for ``trading_date``."""
        with self._errors(f"store the {index_name} constituents of {trading_date}"):
            self._conn.execute(
                "INSERT INTO index_constituents (index_name, trading_date, symbols) VALUES (%s, %s, %s) "
                "ON CONFLICT (index_name, trading_date) DO UPDATE SET symbols = EXCLUDED.symbols, fetched_at = now()",
                (index_name, trading_date, list(symbols)),
            )

    # ---- one agent per account -------------------------------------------------------------------------------

    def try_lock(self, account_key: str, holder: str) -> str | None:
        """Take the account's session-level advisory lock. None if taken, else who holds it and since when.

        The lock lives as long as this connection (a crashed process releases it). ``holder`` should say who
        we are, e.g. ``"agent.py --guard pid 4242 run 20260102-0931"``.
        """
        if account_key in self._held_locks:
            return None
        key = advisory_key(account_key)
        acquired = self._scalar(f"lock account {account_key}", "SELECT pg_try_advisory_lock(%s)", (key,))
        if acquired:
            with self._errors(f"record the holder of the lock on account {account_key}"):
                self._conn.execute(
                    "INSERT INTO instance_locks (key, holder, started_at) VALUES (%s, %s, now()) "
                    "ON CONFLICT (key) DO UPDATE SET holder = EXCLUDED.holder, started_at = EXCLUDED.started_at",
                    (account_key, holder),
                )
            self._held_locks.add(account_key)
            log.info("account_lock_acquired", account=account_key, holder=holder)
            return None
        with self._errors(f"read the holder of the lock on account {account_key}"):
            row = self._conn.execute(
                "SELECT holder, started_at FROM instance_locks WHERE key = %s", (account_key,)
            ).fetchone()
        if row is None:
            return "another session (it has not recorded who it is yet)"
        other, started_at = row
        return f"{other} (since {started_at.isoformat(timespec='seconds')})"

    def unlock(self, account_key: str) -> bool:
        """Release an account lock this journal holds; False if it held none."""
        if account_key not in self._held_locks:
            return False
        with self._errors(f"unlock account {account_key}"):
            self._conn.execute("DELETE FROM instance_locks WHERE key = %s", (account_key,))
            self._conn.execute("SELECT pg_advisory_unlock(%s)", (advisory_key(account_key),))
        self._held_locks.discard(account_key)
        return True


class PgConstituentCache:
    """The journal as ``data.market``'s index-constituent cache (``get``/``put``, one entry per day)."""

    def __init__(self, journal: Journal) -> None:
        self._journal = journal

    def get(self, index_name: str, trading_date: date) -> list[str] | None:
        return self._journal.get_constituents(index_name, trading_date)

    def put(self, index_name: str, trading_date: date, symbols: Sequence[str]) -> None:
        self._journal.put_constituents(index_name, trading_date, symbols)


class PgKlineCache:
    """The journal as ``data.market``'s K-line cache (``get``/``put``)."""

    def __init__(self, journal: Journal) -> None:
        self._journal = journal

    def get(self, symbol: str, timeframe: str, since: datetime) -> list[Bar]:
        return self._journal.get_klines(symbol, timeframe, since)

    def put(self, symbol: str, timeframe: str, bars: Sequence[Bar]) -> None:
        self._journal.put_klines(symbol, timeframe, bars)
