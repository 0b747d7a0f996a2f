"""Alerts: e-mail through SMTP (STARTTLS), every attempt journalled in ``alerts``.

A failed send never breaks a cycle: ``Alerter.send`` returns an ``AlertOutcome`` instead of raising.

Shell scripts alert through the same path with the small CLI::

    python -m data.alerts --subject "OpenD down" --message "..." --priority high --event health_check

which exits 0 when the e-mail went out and 1 when it did not (2: bad arguments or settings).
"""

from __future__ import annotations

import argparse
import base64
import smtplib
import ssl
import sys
from collections.abc import Sequence
from datetime import datetime
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Literal, Protocol
from zoneinfo import ZoneInfo

import structlog
from pydantic import BaseModel, ConfigDict, SecretStr

from config.settings import AlertSettings

log = structlog.get_logger(__name__)

Priority = Literal["low", "normal", "high"]
PRIORITIES: tuple[str, ...] = ("low", "normal", "high")

# X-Priority (1 highest .. 5 lowest) and Importance are what mail clients read to flag a message.
_PRIORITY_HEADERS: dict[str, tuple[str, str]] = {
    "high": ("1 (Highest)", "high"),
    "normal": ("3 (Normal)", "normal"),
    "low": ("5 (Lowest)", "low"),
}
_MAX_ERROR_CHARS = 500


class AlertJournal(Protocol):
    def record_alert(
        self,
        cycle_id: int | None,
        subject: str,
        message: str,
        priority: str,
        event: str,
        sent: bool,
        error: str | None,
    ) -> object: ...


class Attachment(BaseModel):
    """A file sent with an alert (the daily digest attaches its report)."""

    model_config = ConfigDict(frozen=True)

    filename: str
    content: bytes
    mime_type: str = "application/octet-stream"
    charset: str | None = None  # for text/* content, e.g. "utf-8"


class AlertOutcome(BaseModel):
    model_config = ConfigDict(frozen=True)

    sent: bool
    error: str | None = None


class Alerter:
    """Sends one e-mail per alert. Configured by ``alerts:`` settings and ``SMTP_PASS`` from the environment.

    ``ssl_context`` is for tests (trusting a throwaway CA); by default the system's trust store verifies the
    server's certificate and host name.
    """

    def __init__(
        self,
        settings: AlertSettings,
        password: SecretStr | None,
        journal: AlertJournal | None,
        *,
        tag: str = "CATALYST",
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._settings = settings
        self._password = password
        self._journal = journal
        self._tag = tag
        self._ssl_context = ssl_context
        self.cycle_id: int | None = None

    @property
    def is_configured(self) -> bool:
        return bool(self._settings.smtp_host and self._settings.email)

    def send(
        self,
        subject: str,
        message: str,
        *,
        priority: Priority = "normal",
        event: str = "agent",
        html: str | None = None,
        attachments: Sequence[Attachment] = (),
    ) -> AlertOutcome:
        """Send and journal. Returns whether it went out; never raises for SMTP or journal trouble.

        ``message`` is the plain-text body (and what the journal keeps); ``html`` an optional HTML alternative.
        """
        if priority not in PRIORITIES:
            priority = "normal"
        try:
            outcome = self._deliver(subject, message, priority, html, attachments)
        except Exception as exc:  # an alert must never break the caller, whatever went wrong
            outcome = AlertOutcome(sent=False, error=self._clean(f"unexpected {type(exc).__name__}: {exc}"))
        log.info(
            "alert_sent" if outcome.sent else "alert_not_sent",
            subject=subject,
            priority=priority,
            alert_event=event,
            smtp_host=self._settings.smtp_host or None,
            error=outcome.error,
        )
        if self._journal is not None:
            try:
                self._journal.record_alert(
                    self.cycle_id, subject, message, priority, event, outcome.sent, outcome.error
                )
            except Exception as exc:  # the journal being down must not hide the alert's own outcome
                log.error("alert_journal_failed", subject=subject, error=self._clean(str(exc)))
        return outcome

    def _deliver(
        self, subject: str, message: str, priority: str, html: str | None = None, attachments: Sequence[Attachment] = ()
    ) -> AlertOutcome:
        s = self._settings
        if not self.is_configured:
            return AlertOutcome(
                sent=False,
                error="alerts are not configured: alerts.smtp_host and alerts.email are empty "
                "(set SMTP_HOST and ALERT_EMAIL in the environment)",
            )
        if s.smtp_user and self._password is None:
            return AlertOutcome(
                sent=False,
                error=f"alerts.smtp_user is {s.smtp_user!r} but SMTP_PASS is not set in the environment; "
                "set SMTP_PASS, or clear SMTP_USER for a server that needs no login",
            )
        if s.smtp_user and not s.starttls:
            return AlertOutcome(
                sent=False,
                error=f"refusing to send the SMTP password to {s.smtp_host}:{s.smtp_port} without encryption "
                "(alerts.starttls is false); set alerts.starttls: true",
            )
        mail = self._compose(subject, message, priority)
        if html is not None:
            mail.add_alternative(html, subtype="html")
        for item in attachments:
            maintype, _, subtype = item.mime_type.partition("/")
            mail.add_attachment(
                item.content,
                maintype=maintype,
                subtype=subtype or "octet-stream",
                filename=item.filename,
                params={"charset": item.charset} if item.charset else {},
            )
        try:
            with smtplib.SMTP(s.smtp_host, s.smtp_port, timeout=s.timeout_s) as smtp:
                if s.starttls:
                    smtp.starttls(context=self._ssl_context or ssl.create_default_context())
                if s.smtp_user and self._password is not None:
                    _login(smtp, s.smtp_user, self._password.get_secret_value())
                smtp.send_message(mail)
        except (OSError, smtplib.SMTPException, ssl.SSLError) as exc:
            where = f"{s.smtp_host}:{s.smtp_port}"
            return AlertOutcome(sent=False, error=self._clean(f"SMTP to {where} failed: {type(exc).__name__}: {exc}"))
        return AlertOutcome(sent=True)

    def _compose(self, subject: str, message: str, priority: str) -> EmailMessage:
        s = self._settings
        mail = EmailMessage()
        mail["Subject"] = f"[{self._tag}{' HIGH' if priority == 'high' else ''}] {subject}"
        mail["From"] = s.sender
        mail["To"] = s.email
        mail["Date"] = formatdate(localtime=False)
        domain = s.sender.rpartition("@")[2] or None
        mail["Message-ID"] = make_msgid("catalyst", domain=domain)
        x_priority, importance = _PRIORITY_HEADERS[priority]
        mail["X-Priority"] = x_priority
        mail["Importance"] = importance
        mail.set_content(message)
        return mail

    def _clean(self, text: str) -> str:
        """An error text fit for the journal and the log: never the password, never unbounded."""
        if self._password is not None:
            secret = self._password.get_secret_value()
            if secret:
                text = text.replace(secret, "REDACTED")
        return text[:_MAX_ERROR_CHARS]


def _login(smtp: smtplib.SMTP, user: str, password: str) -> None:
    """``smtp.login``, except that non-ASCII credentials (which smtplib cannot encode) go as UTF-8 AUTH PLAIN."""
    if user.isascii() and password.isascii():
        smtp.login(user, password)
        return
    smtp.ehlo_or_helo_if_needed()
    if "PLAIN" not in smtp.esmtp_features.get("auth", "").upper().split():
        raise smtplib.SMTPException(
            "the SMTP user or password has non-ASCII characters, which only AUTH PLAIN can carry (RFC 4616), "
            "and the server does not offer AUTH PLAIN"
        )
    token = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode()).decode("ascii")
    code, reply = smtp.docmd("AUTH", f"PLAIN {token}")
    if code != 235:
        raise smtplib.SMTPAuthenticationError(code, reply)


# ------------------------------------------------------------------------------------------------------- CLI

EPILOG = """\
exit codes:
  0  the e-mail was sent
  1  it was not sent (the reason is printed; the attempt is journalled when the journal is reachable)
  2  bad arguments or settings

The settings come from --config, $CATALYST_CONFIG or config/settings.yaml (section alerts:); SMTP_PASS from the
environment. The journal is DATABASE_URL or the embedded server; if it is down the alert is still sent.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m data.alerts",
        description="Send one alert e-mail through the agent's own alert path and journal it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--subject", required=True, help="subject line (tagged [CATALYST] or [CATALYST HIGH])")
    parser.add_argument("--message", required=True, help="body text; '-' reads it from standard input")
    parser.add_argument("--priority", choices=PRIORITIES, default="normal", help="default: normal")
    parser.add_argument("--event", default="script", help="what raised it, e.g. health_check (default: script)")
    parser.add_argument("--config", metavar="PATH", help="settings file (default: $CATALYST_CONFIG or built-in)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Send one alert from the command line. Returns the exit code."""
    args = parse_args(argv)
    from config.errors import ConfigError
    from config.logs import configure_logging
    from config.settings import Secrets, load_settings

    message = sys.stdin.read() if args.message == "-" else args.message
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"alert not sent: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.resolve(settings.agent.log_dir), datetime.now(ZoneInfo("Asia/Hong_Kong")))
    secrets = Secrets.from_env()
    journal = None
    try:
        from data.database import Journal

        journal = Journal.open(settings, secrets)
    except Exception as exc:  # best effort: an unreachable journal must not silence the alert
        print(f"warning: the journal is unavailable, so this alert will not be journalled: {exc}", file=sys.stderr)
    try:
        alerter = Alerter(settings.alerts, secrets.smtp_password, journal)
        outcome = alerter.send(args.subject, message, priority=args.priority, event=args.event)
    finally:
        if journal is not None:
            journal.close()
    if outcome.sent:
        print(f"alert sent to {settings.alerts.email}: {args.subject}")
        return 0
    print(f"alert not sent: {outcome.error}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
