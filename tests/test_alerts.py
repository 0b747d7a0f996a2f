"""Alerts against a real SMTP server on loopback (aiosmtpd), journalled in a real PostgreSQL database.

The server runs on 127.0.0.1 with an ephemeral port. STARTTLS uses a throwaway self-signed certificate made by
the ``openssl`` command line for this session; the Alerter is given an ``ssl_context`` that trusts it.
"""

from __future__ import annotations

import email
import email.policy
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from pydantic import SecretStr

from config.settings import PROJECT_ROOT, AlertSettings
from data.alerts import Alerter, AlertOutcome
from data.database import Journal

USER = "catalyst-bot"
PASSWORD = "pa55-Wörd-never-logged"  # a test credential for the loopback server
# smtplib cannot encode a non-ASCII password, so the Alerter sends those as UTF-8 AUTH PLAIN itself; an ASCII one
# goes through smtplib's own login negotiation. Both paths are exercised.
PASSWORDS = [
    pytest.param(PASSWORD, id="non-ascii-password"),
    pytest.param("Ascii-0nly-pa55word", id="ascii-password"),
]
SINCE = datetime(2000, 1, 1, tzinfo=UTC)


# ------------------------------------------------------------------------------------------ the SMTP server


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    tls: bool
    authenticated: bool


@dataclass
class RecordingHandler:
    """Keeps every accepted message; optionally refuses recipients like a strict relay would."""

    refuse_rcpt: str | None = None
    password: str = PASSWORD
    received: list[Received] = field(default_factory=list)
    logins: list[str] = field(default_factory=list)

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any) -> str:
        if self.refuse_rcpt:
            return self.refuse_rcpt
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        # SMTP carries CRLF line ends; compare bodies as the sender wrote them.
        message = email.message_from_bytes(envelope.content.replace(b"\r\n", b"\n"), policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        self.received.append(
            Received(
                mail_from=envelope.mail_from,
                rcpt_tos=list(envelope.rcpt_tos),
                message=message,
                tls=session.ssl is not None,
                authenticated=bool(session.authenticated),
            )
        )
        return "250 Message accepted for delivery"

    def authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        self.logins.append(auth_data.login.decode())
        ok = auth_data.login.decode() == USER and auth_data.password.decode() == self.password
        return AuthResult(success=ok, handled=False)


class LoopbackController(Controller):
    """aiosmtpd's threaded controller on a socket bound before start, so the ephemeral port is known."""

    def __init__(self, handler: Any, **smtp_parameters: Any) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        port = self._sock.getsockname()[1]
        super().__init__(
            handler, hostname="127.0.0.1", port=port, ready_timeout=30, server_hostname="localhost", **smtp_parameters
        )

    def _create_server(self) -> Any:
        return self.loop.create_server(self._factory_invoker, sock=self._sock, ssl=self.ssl_context)


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(certificate, key) of a throwaway self-signed certificate for 127.0.0.1 and localhost."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a test certificate (apt-get install openssl)")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,digitalSignature,keyCertSign"],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key


@pytest.fixture
def server_tls_context(tls_files: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*tls_files)
    return context


@pytest.fixture
def trusting_context(tls_files: tuple[Path, Path]) -> ssl.SSLContext:
    """A client context that verifies the server against the throwaway certificate (host name included)."""
    return ssl.create_default_context(cafile=str(tls_files[0]))


@pytest.fixture
def smtp_server() -> Iterator[Callable[..., tuple[LoopbackController, RecordingHandler]]]:
    """Call it (with aiosmtpd SMTP parameters) to start a server; every one started is stopped afterwards."""
    started: list[LoopbackController] = []

    def start(handler: RecordingHandler | None = None, **smtp_parameters: Any) -> tuple[LoopbackController, Any]:
        handler = handler or RecordingHandler()
        controller = LoopbackController(handler, **smtp_parameters)
        controller.start()
        started.append(controller)
        return controller, handler

    yield start
    for controller in started:
        controller.stop()


def alert_settings(port: int, **overrides: Any) -> AlertSettings:
    values: dict[str, Any] = {
        "email": "owner@example.test",
        "sender": "catalyst@example.test",
        "smtp_host": "127.0.0.1",
        "smtp_port": port,
        "starttls": False,
        "timeout_s": 20,
    }
    return AlertSettings(**(values | overrides))


def closed_port() -> tuple[socket.socket, int]:
    """A socket bound but not listening: connections to its port are refused, and no one else can take it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock, sock.getsockname()[1]


def only_alert(journal: Journal) -> Any:
    rows = journal.alerts_since(SINCE)
    assert len(rows) == 1, rows
    return rows[0]


# ---------------------------------------------------------------------------------------------- delivery


@pytest.mark.parametrize(
    ("priority", "subject_tag", "x_priority"),
    [
        ("high", "[CATALYST HIGH] ", "1 (Highest)"),  # high is flagged in the subject and the headers
        ("normal", "[CATALYST] ", "3 (Normal)"),
        ("low", "[CATALYST] ", "5 (Lowest)"),
    ],
)
def test_a_message_is_delivered_tagged_with_its_body_intact_and_journalled(
    smtp_server: Any, journal: Journal, priority: str, subject_tag: str, x_priority: str
) -> None:
    controller, handler = smtp_server()
    body = "Daily P&L -2.10% is past the -2.0% limit.\nClosed 3 position(s): 00700, 00005, 09988 — entries blocked."
    alerter = Alerter(alert_settings(controller.port), None, journal)

    outcome = alerter.send("Daily loss limit", body, priority=priority, event="daily_loss_limit")  # type: ignore[arg-type]

    assert outcome == AlertOutcome(sent=True)
    assert len(handler.received) == 1
    got = handler.received[0]
    assert got.mail_from == "catalyst@example.test"
    assert got.rcpt_tos == ["owner@example.test"]
    assert got.message["Subject"] == f"{subject_tag}Daily loss limit"
    assert got.message["X-Priority"] == x_priority
    assert got.message["Importance"] == priority
    assert got.message["Date"] and got.message["Message-ID"]
    assert got.message.get_content().rstrip("\n") == body
    assert not got.tls and not got.authenticated
    row = only_alert(journal)
    assert (row.subject, row.message, row.priority, row.event, row.sent, row.error) == (
        "Daily loss limit",
        body,
        priority,
        "daily_loss_limit",
        True,
        None,
    )


def test_the_cycle_id_goes_into_the_journal_row(smtp_server: Any, journal: Journal) -> None:
    controller, _ = smtp_server()
    cycle_id = journal.start_cycle(
        run_id="r1", mode="guard", broker="sim", brain="none", model=None,
        started_at=datetime(2026, 11, 20, 2, 0, tzinfo=UTC), trading_date=datetime(2026, 11, 20).date(),
    )  # fmt: skip
    alerter = Alerter(alert_settings(controller.port), None, journal)
    alerter.cycle_id = cycle_id

    assert alerter.send("Guard closed positions", "00700: stop hit", event="guard_action").sent

    assert only_alert(journal).cycle_id == cycle_id


@pytest.mark.parametrize("password", PASSWORDS)
def test_starttls_and_login_with_smtp_user_and_password(
    smtp_server: Any,
    journal: Journal,
    server_tls_context: ssl.SSLContext,
    trusting_context: ssl.SSLContext,
    password: str,
) -> None:
    handler = RecordingHandler(password=password)
    controller, _ = smtp_server(
        handler,
        tls_context=server_tls_context,
        require_starttls=True,
        authenticator=handler.authenticate,
        auth_required=True,
    )
    settings = alert_settings(controller.port, starttls=True, smtp_user=USER)
    alerter = Alerter(settings, SecretStr(password), journal, ssl_context=trusting_context)

    with structlog.testing.capture_logs() as logs:
        outcome = alerter.send("Cycle failed", "BrokerUnavailable: OpenD is not reachable", priority="high")

    assert outcome == AlertOutcome(sent=True)
    assert handler.logins == [USER]
    assert len(handler.received) == 1
    assert handler.received[0].tls, "the message must travel after STARTTLS"
    assert handler.received[0].authenticated
    assert password not in repr(only_alert(journal).model_dump())
    assert password not in repr(logs)


def test_starttls_verifies_the_server_certificate_by_default(
    smtp_server: Any, journal: Journal, server_tls_context: ssl.SSLContext
) -> None:
    # The default context trusts the system store only, so a self-signed certificate must be refused.
    controller, handler = smtp_server(tls_context=server_tls_context, require_starttls=True)
    alerter = Alerter(alert_settings(controller.port, starttls=True), None, journal)

    outcome = alerter.send("Cycle failed", "body", priority="high")

    assert not outcome.sent
    assert outcome.error is not None and "CERTIFICATE_VERIFY_FAILED" in outcome.error
    assert handler.received == []
    row = only_alert(journal)
    assert row.sent is False and row.error == outcome.error


def test_a_server_that_requires_starttls_refuses_plain_text(
    smtp_server: Any, journal: Journal, server_tls_context: ssl.SSLContext
) -> None:
    controller, handler = smtp_server(tls_context=server_tls_context, require_starttls=True)
    alerter = Alerter(alert_settings(controller.port, starttls=False), None, journal)

    outcome = alerter.send("Cycle failed", "body")

    assert not outcome.sent
    assert outcome.error is not None and "530" in outcome.error and "STARTTLS" in outcome.error
    assert handler.received == []


# ----------------------------------------------------------------------------------------------- failures


@pytest.mark.parametrize("password", PASSWORDS)
def test_a_wrong_password_is_not_sent_and_never_appears_in_journal_or_logs(
    smtp_server: Any,
    journal: Journal,
    server_tls_context: ssl.SSLContext,
    trusting_context: ssl.SSLContext,
    password: str,
) -> None:
    handler = RecordingHandler(password=password)
    controller, _ = smtp_server(
        handler, tls_context=server_tls_context, require_starttls=True, authenticator=handler.authenticate,
        auth_required=True,
    )  # fmt: skip
    wrong = "wrong-" + password
    settings = alert_settings(controller.port, starttls=True, smtp_user=USER)
    alerter = Alerter(settings, SecretStr(wrong), journal, ssl_context=trusting_context)

    with structlog.testing.capture_logs() as logs:
        outcome = alerter.send("Cycle failed", "body", priority="high", event="cycle_error")

    assert not outcome.sent
    assert outcome.error is not None and "SMTPAuthenticationError" in outcome.error and "535" in outcome.error
    assert f"127.0.0.1:{controller.port}" in outcome.error
    assert handler.received == []
    row = only_alert(journal)
    assert (row.sent, row.error, row.event) == (False, outcome.error, "cycle_error")
    for text in (repr(row.model_dump()), repr(logs)):
        assert wrong not in text and password not in text
    assert [entry["event"] for entry in logs] == ["alert_not_sent"]


def test_a_server_that_refuses_the_recipient_gives_not_sent(smtp_server: Any, journal: Journal) -> None:
    controller, handler = smtp_server(RecordingHandler(refuse_rcpt="550 5.7.1 relaying denied"))
    alerter = Alerter(alert_settings(controller.port), None, journal)

    outcome = alerter.send("Trading halted", "kill switch")

    assert not outcome.sent
    assert outcome.error is not None and "550" in outcome.error and "relaying denied" in outcome.error
    assert handler.received == []
    row = only_alert(journal)
    assert (row.subject, row.sent, row.error) == ("Trading halted", False, outcome.error)


def test_nothing_listening_gives_not_sent_without_raising(journal: Journal) -> None:
    sock, port = closed_port()
    with sock:
        outcome = Alerter(alert_settings(port), None, journal).send("Cycle failed", "body", priority="high")

    assert not outcome.sent
    assert outcome.error is not None
    assert "ConnectionRefusedError" in outcome.error and f"127.0.0.1:{port}" in outcome.error
    assert only_alert(journal).sent is False


def test_unconfigured_alerts_are_journalled_as_not_sent(journal: Journal) -> None:
    outcome = Alerter(AlertSettings(), None, journal).send("Cycle failed", "body")

    assert not outcome.sent
    assert outcome.error is not None and "SMTP_HOST" in outcome.error and "ALERT_EMAIL" in outcome.error
    assert only_alert(journal).error == outcome.error


def test_a_user_without_smtp_pass_is_refused_before_connecting(smtp_server: Any, journal: Journal) -> None:
    controller, handler = smtp_server()
    outcome = Alerter(alert_settings(controller.port, smtp_user=USER, starttls=True), None, journal).send("S", "M")

    assert not outcome.sent
    assert outcome.error is not None and "SMTP_PASS" in outcome.error and USER in outcome.error
    assert handler.received == []


def test_the_password_is_never_sent_without_starttls(smtp_server: Any, journal: Journal) -> None:
    handler = RecordingHandler()
    controller, _ = smtp_server(handler, authenticator=handler.authenticate, auth_require_tls=False)
    settings = alert_settings(controller.port, smtp_user=USER, starttls=False)

    outcome = Alerter(settings, SecretStr(PASSWORD), journal).send("S", "M")

    assert not outcome.sent
    assert outcome.error is not None and "alerts.starttls" in outcome.error
    assert handler.logins == [] and handler.received == []


def test_a_journal_that_is_down_does_not_stop_the_alert(smtp_server: Any, database_url: str) -> None:
    controller, handler = smtp_server()
    broken = Journal.connect(database_url)  # not migrated: there is no alerts table to write to
    try:
        with structlog.testing.capture_logs() as logs:
            outcome = Alerter(alert_settings(controller.port), None, broken).send("Cycle failed", "body")
    finally:
        broken.close()

    assert outcome == AlertOutcome(sent=True)
    assert len(handler.received) == 1
    assert [entry["event"] for entry in logs] == ["alert_sent", "alert_journal_failed"]


# ----------------------------------------------------------------------------------------------------- CLI


def run_cli(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "data.alerts", *args],
        cwd=PROJECT_ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def cli_env(project_env: dict[str, str], settings_file: Path, port: int, **alerts: Any) -> dict[str, str]:
    """``project_env`` with the settings' alerts section pointed at the loopback server."""
    data = yaml.safe_load(settings_file.read_text(encoding="utf-8"))
    data["alerts"] = {
        "email": "owner@example.test",
        "sender": "catalyst@example.test",
        "smtp_host": "127.0.0.1",
        "smtp_port": port,
        "starttls": False,
        "timeout_s": 20,
    } | alerts
    settings_file.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return project_env


def test_cli_sends_journals_and_exits_0(
    smtp_server: Any, journal: Journal, project_env: dict[str, str], settings_file: Path
) -> None:
    controller, handler = smtp_server()
    env = cli_env(project_env, settings_file, controller.port)

    result = run_cli(
        env, "--subject", "OpenD down", "--message", "-", "--priority", "high", "--event", "health_check",
        stdin="127.0.0.1:11111 refused after a restart\n",
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert "alert sent to owner@example.test" in result.stdout
    assert len(handler.received) == 1
    assert handler.received[0].message["Subject"] == "[CATALYST HIGH] OpenD down"
    assert handler.received[0].message.get_content() == "127.0.0.1:11111 refused after a restart\n"
    row = only_alert(journal)
    assert (row.subject, row.priority, row.event, row.sent, row.cycle_id) == (
        "OpenD down",
        "high",
        "health_check",
        True,
        None,
    )


def test_cli_exits_1_and_journals_when_the_alert_cannot_go_out(
    journal: Journal, project_env: dict[str, str], settings_file: Path
) -> None:
    sock, port = closed_port()
    with sock:
        env = cli_env(project_env, settings_file, port, smtp_user=USER, starttls=False)
        env["SMTP_PASS"] = PASSWORD
        result = run_cli(env, "--subject", "Missed run", "--message", "no cycle at 09:30", "--event", "missed_run")

    assert result.returncode == 1
    assert "alert not sent" in result.stderr and "alerts.starttls" in result.stderr
    row = only_alert(journal)
    assert (row.subject, row.sent, row.event) == ("Missed run", False, "missed_run")
    log_text = "".join(p.read_text(encoding="utf-8") for p in (settings_file.parent / "logs").glob("*.log"))
    assert "alert_not_sent" in log_text
    for text in (result.stdout, result.stderr, log_text, repr(row.model_dump())):
        assert PASSWORD not in text


def test_cli_still_sends_when_the_journal_is_down(
    smtp_server: Any, project_env: dict[str, str], settings_file: Path
) -> None:
    controller, handler = smtp_server()
    sock, dead_port = closed_port()
    with sock:
        env = cli_env(project_env, settings_file, controller.port)
        env["DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:{dead_port}/catalyst?connect_timeout=5"
        result = run_cli(env, "--subject", "OpenD down", "--message", "gateway restarted, still down")

    assert result.returncode == 0, result.stderr
    assert "journal is unavailable" in result.stderr
    assert len(handler.received) == 1


def test_cli_rejects_bad_arguments_and_settings(project_env: dict[str, str], tmp_path: Path) -> None:
    assert run_cli(project_env, "--subject", "x").returncode == 2  # --message is required
    assert run_cli(project_env, "--subject", "x", "--message", "y", "--priority", "urgent").returncode == 2
    env = project_env | {"CATALYST_CONFIG": str(tmp_path / "missing.yaml")}
    result = run_cli(env, "--subject", "x", "--message", "y")
    assert result.returncode == 2
    assert "missing.yaml does not exist" in result.stderr
