"""The replay database: ``replay.database`` (default ``catalyst_replay``) on the live journal's server.

Its ``public`` schema holds the ``replay_runs`` register; each run writes its ordinary journal tables (cycles,
tool calls, orders, stops, decisions, equity) into its own schema ``run_<id>``, migrated like the live journal,
so the same ``Journal`` queries work on it and two runs of the same days never share a start-of-day baseline or
a protective stop. The live journal is never opened for writing: recorded history is read through a separate
read-only connection (``open_history_reader``).
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from config.errors import ConfigError, JournalError
from config.settings import Secrets, Settings
from data.database import Journal, _ensure_database, embedded_server_dsn
from data.database import _jsonb as jsonb


def live_dsn(settings: Settings, secrets: Secrets) -> str:
    """The live journal's DSN (``DATABASE_URL`` or the embedded server)."""
    if secrets.database_url is not None:
        return secrets.database_url.get_secret_value()
    return embedded_server_dsn(settings)


def replay_dsn(settings: Settings, secrets: Secrets) -> str:
    """The replay database's DSN on the same server, created on first use. Refuses the live journal's name."""
    name = settings.replay.database
    if secrets.database_url is None:
        from data.database import EMBEDDED_DB_NAME

        if name == EMBEDDED_DB_NAME:
            raise ConfigError(f"replay.database is {name!r}, the live journal's database: choose another name.")
        return embedded_server_dsn(settings, dbname=name)
    live = secrets.database_url.get_secret_value()
    if conninfo_to_dict(live).get("dbname") == name:
        raise ConfigError(
            f"replay.database is {name!r}, the database DATABASE_URL points at (the live journal). "
            "A replay must never write there: set replay.database to another name."
        )
    _ensure_database(make_conninfo(live, dbname="postgres"), name)
    return make_conninfo(live, dbname=name)


class ReplayJournal:
    """The register row of one run (``replay_runs``) and a ``Journal`` on the run's own schema."""

    def __init__(self, register: psycopg.Connection[Any], journal: Journal, run_id: int, schema: str) -> None:
        self.register = register
        self.journal = journal
        self.run_id = run_id
        self.schema = schema

    @classmethod
    def create(
        cls,
        settings: Settings,
        secrets: Secrets,
        *,
        first: date,
        last: date,
        brain: str,
        feed: str,
        config: dict[str, Any],
    ) -> ReplayJournal:
        """Register a run in ``replay_runs`` and open a freshly migrated schema for its journal."""
        dsn = replay_dsn(settings, secrets)
        with Journal.connect(dsn) as public:
            public.migrate()  # the register (and, unused there, the ordinary tables) in the public schema
        try:
            register = psycopg.connect(dsn, autocommit=True)
        except psycopg.Error as exc:
            raise JournalError(f"Could not open the replay database {settings.replay.database}: {exc}") from None
        try:
            row = register.execute(
                "INSERT INTO replay_runs (from_date, to_date, brain, feed, settings) VALUES (%s, %s, %s, %s, %s) "
                "RETURNING id",
                (first, last, brain, feed, jsonb(config)),
            ).fetchone()
            assert row is not None
            run_id = int(row[0])
            schema = f"run_{run_id}"
            register.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
            register.execute("UPDATE replay_runs SET schema_name = %s WHERE id = %s", (schema, run_id))
            journal = Journal.connect(make_conninfo(dsn, options=f"-c search_path={schema}"))
            journal.migrate()
        except psycopg.Error as exc:
            register.close()
            raise JournalError(f"Could not set up the replay run's journal: {exc}") from None
        except BaseException:
            register.close()
            raise
        return cls(register, journal, run_id, schema)

    def finish(
        self, status: str, metrics: dict[str, Any], finished_at: datetime, notes: dict[str, Any] | None = None
    ) -> None:
        """Close the register row with the run's outcome and score; ``notes`` join its ``settings`` (e.g. what the
        benchmark was), for ``--report replay:ID``."""
        try:
            self.register.execute(
                "UPDATE replay_runs SET status = %s, metrics = %s, finished_at = %s, settings = settings || %s "
                "WHERE id = %s",
                (status, jsonb(metrics), finished_at, jsonb(notes or {}), self.run_id),
            )
        except psycopg.Error as exc:
            raise JournalError(f"Could not record the outcome of replay run {self.run_id}: {exc}") from None

    def close(self) -> None:
        self.journal.close()
        self.register.close()


def open_history_reader(settings: Settings, secrets: Secrets) -> psycopg.Connection[Any]:
    """A read-only connection to the live journal's database, for ``market_bars`` and ``instruments``."""
    dsn = make_conninfo(live_dsn(settings, secrets), options="-c default_transaction_read_only=on")
    try:
        return psycopg.connect(dsn, autocommit=True)
    except psycopg.Error as exc:
        raise ConfigError(f"Could not open the market history (live journal database) read-only: {exc}") from None
