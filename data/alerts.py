"""Alerts: e-mail through SMTP (STARTTLS), every attempt journalled in ``alerts``.

A failed send never breaks a cycle."""

from __future__ import annotations

import smtplib
import ssl
from email.message import EmailMessage
from typing import Literal, Protocol

import structlog
from pydantic import BaseModel, ConfigDict, SecretStr

from config.settings import AlertSettings

log = structlog.get_logger(__name__)

Priority = Literal["low", "normal", "high"]


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
    ) -> None: ...


class AlertOutcome(BaseModel):
    model_config = ConfigDict(frozen=True)

    sent: bool
    error: str | None = None


class Alerter:
    """Sends one e-mail per alert. Configured by ``alerts:`` settings and ``SMTP_PASS`` from the environment."""

    def __init__(
        self,
        settings: AlertSettings,
        password: SecretStr | None,
        journal: AlertJournal | None,
        *,
        tag: str = "CATALYST",
    ) -> None:
        self._settings = settings
        self._password = password
        self._journal = journal
        self._tag = tag
        self.cycle_id: int | None = None

    @property
    def is_configured(self) -> bool:
        return bool(self._settings.smtp_host and self._settings.email)

    def send(self, subject: str, message: str, *, priority: Priority = "normal", event: str = "agent") -> AlertOutcome:
        """Send and journal. Returns whether it went out; never raises for SMTP trouble."""
        outcome = self._deliver(subject, message, priority)
        log.info(
            "alert_sent" if outcome.sent else "alert_not_sent",
            subject=subject,
            priority=priority,
            alert_event=event,
            error=outcome.error,
        )
        if self._journal is not None:
            try:
                self._journal.record_alert(
                    self.cycle_id, subject, message, priority, event, outcome.sent, outcome.error
                )
            except Exception as exc:  # the journal being down must not hide the alert's own outcome
                log.error("alert_journal_failed", error=str(exc))
        return outcome

    def _deliver(self, subject: str, message: str, priority: Priority) -> AlertOutcome:
        s = self._settings
        if not self.is_configured:
            return AlertOutcome(sent=False, error="alerts are not configured (set SMTP_HOST and ALERT_EMAIL)")
        mail = EmailMessage()
        mail["Subject"] = f"[{self._tag}{' HIGH' if priority == 'high' else ''}] {subject}"
        mail["From"] = s.sender
        mail["To"] = s.email
        mail.set_content(message)
        try:
            with smtplib.SMTP(s.smtp_host, s.smtp_port, timeout=s.timeout_s) as smtp:
                if s.starttls:
                    smtp.starttls(context=ssl.create_default_context())
                if s.smtp_user and self._password is not None:
                    smtp.login(s.smtp_user, self._password.get_secret_value())
                smtp.send_message(mail)
        except (OSError, smtplib.SMTPException, ssl.SSLError) as exc:
            # str(exc) of smtplib errors never contains the password; keep the class for the reader.
            return AlertOutcome(sent=False, error=f"{type(exc).__name__}: {exc}"[:500])
        return AlertOutcome(sent=True)
