"""Fixtures shared by the whole suite.

- Every test starts with the project's environment variables cleared (``DATABASE_URL`` is read once, at
  session start, to choose the test server).
- PostgreSQL is real: the server in ``DATABASE_URL`` if it was set when the session started (its user needs
  CREATEDB), else one embedded ``pgserver`` for the session. Each test that asks for ``database_url`` or
  ``journal`` gets its own fresh database, dropped afterwards.
- ``settings_file`` / ``project_env`` let a test run ``agent.py`` as a subprocess without touching the
  repository's ``var/``, ``logs/`` or ``HALT``.
"""

from __future__ import annotations

import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import yaml
from psycopg import sql
from psycopg.conninfo import make_conninfo

from config.settings import DEFAULT_SETTINGS_PATH
from data.database import Journal
from tests.fakes.messages_api import FakeMessagesAPI
from tests.pg import stop_embedded_server, traversable_tempdir

PROJECT_ENV_VARS = (
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_BASE_URL",
    "DATABASE_URL",
    "OPEND_HOST",
    "OPEND_PORT",
    "FUTU_TRADE_PWD",
    "CATALYST_CONFIG",
    "SMTP_HOST",
    "SMTP_PORT",
    "SMTP_USER",
    "SMTP_PASS",
    "SMTP_PASSWORD",
    "ALERT_EMAIL",
    "ALERT_FROM",
)

# Captured at import, before any fixture clears the environment.
SESSION_DATABASE_URL: str | None = os.environ.get("DATABASE_URL") or None


@pytest.fixture(autouse=True)
def clean_project_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's or CI's project settings, keys or database."""
    for name in PROJECT_ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def postgres_admin_dsn() -> Iterator[str]:
    """A DSN with the right to create databases, on the session's PostgreSQL server."""
    if SESSION_DATABASE_URL:
        yield SESSION_DATABASE_URL
        return
    folder = traversable_tempdir("catalyst-test-pg-")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

        server = pgserver.get_server(folder / "data", cleanup_mode="stop")
    try:
        yield server.get_uri("postgres")
    finally:
        server.cleanup()
        stop_embedded_server(folder / "data")
        shutil.rmtree(folder, ignore_errors=True)


def _drop_database(admin_dsn: str, name: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def database_factory(postgres_admin_dsn: str) -> Iterator[Callable[[], str]]:
    """Call it to get the DSN of a new empty database; all of them are dropped after the test."""
    created: list[str] = []

    def create() -> str:
        name = f"test_{uuid.uuid4().hex}"
        with psycopg.connect(postgres_admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
        created.append(name)
        return make_conninfo(postgres_admin_dsn, dbname=name)

    yield create
    for name in created:
        _drop_database(postgres_admin_dsn, name)


@pytest.fixture
def database_url(database_factory: Callable[[], str]) -> str:
    """A fresh, empty database for this test only (not migrated)."""
    return database_factory()


@pytest.fixture
def journal(database_url: str) -> Iterator[Journal]:
    """A migrated journal on this test's own database."""
    journal = Journal.connect(database_url)
    journal.migrate()
    yield journal
    journal.close()


@pytest.fixture
def settings_file(tmp_path: Path) -> Path:
    """A copy of config/settings.yaml whose state, data, log and halt paths all point into ``tmp_path``."""
    data = yaml.safe_load(DEFAULT_SETTINGS_PATH.read_text(encoding="utf-8"))
    data["broker"]["sim"]["state_file"] = str(tmp_path / "var" / "sim" / "state.json")
    data["database"]["embedded_dir"] = str(tmp_path / "var" / "pg")
    data["agent"]["log_dir"] = str(tmp_path / "logs")
    data["risk"]["halt_file"] = str(tmp_path / "HALT")
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture
def project_env(clean_project_env: None, database_url: str, settings_file: Path) -> dict[str, str]:
    """Environment for ``subprocess.run([sys.executable, "agent.py", ...], env=project_env, cwd=PROJECT_ROOT)``:
    this test's database and settings file, and none of the developer's project variables."""
    env = dict(os.environ)
    env["DATABASE_URL"] = database_url
    env["CATALYST_CONFIG"] = str(settings_file)
    return env


@pytest.fixture
def fake_api() -> Iterator[FakeMessagesAPI]:
    """A local Messages API server for the real anthropic SDK (``fake_api.env()`` points a process at it)."""
    with FakeMessagesAPI() as api:
        yield api
