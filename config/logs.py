"""Logging: structlog, JSON lines to ``logs/agent-YYYYMMDD.log`` (Hong Kong date), readable lines on the console.

Secrets never reach a log line: values under secret-looking keys are replaced, and anything that looks like
an API key or a DSN password is scrubbed from every string.
"""

from __future__ import annotations

import logging
import re
import sys
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import structlog

HKT = ZoneInfo("Asia/Hong_Kong")
REDACTED = "REDACTED"
_SECRET_KEYS = re.compile(r"(pass(word|wd)?|secret|api_?key|token|authorization|pwd)$", re.IGNORECASE)
_SECRET_VALUES = (
    (re.compile(r"sk-ant-[A-Za-z0-9_\-]+"), REDACTED),
    (re.compile(r"(postgres(?:ql)?://[^:/@\s]*:)[^@\s]*@"), r"\1" + REDACTED + "@"),
    (re.compile(r"(password=)\S+", re.IGNORECASE), r"\1" + REDACTED),
)


def scrub(text: str) -> str:
    """Remove API keys and DSN passwords from a string."""
    for pattern, replacement in _SECRET_VALUES:
        text = pattern.sub(replacement, text)
    return text


def _redact(value: Any, key: str = "") -> Any:
    if key and _SECRET_KEYS.search(key) and value not in (None, "", False):
        return REDACTED
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {k: _redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(v) for v in value]
    return value


def redact_processor(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    return {k: _redact(v, k) for k, v in event_dict.items()}


def _console_fields(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """The console is for a person: drop the per-run context fields every line repeats (the file keeps them)."""
    for key in ("run_id", "mode"):
        event_dict.pop(key, None)
    stamp = event_dict.get("timestamp")
    if isinstance(stamp, str) and "T" in stamp:
        event_dict["timestamp"] = stamp.replace("T", " ")[:19]
    return event_dict


def log_path(log_dir: Path, now: datetime) -> Path:
    """``logs/agent-YYYYMMDD.log`` with the Hong Kong date of ``now``."""
    return log_dir / f"agent-{now.astimezone(HKT):%Y%m%d}.log"


def configure_logging(log_dir: Path | None, now: datetime, *, verbose: bool = False) -> Path | None:
    """Set up structlog once per process. Returns the log file path (None: console only)."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=False),
        redact_processor,
    ]
    handlers: list[logging.Handler] = []
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                _console_fields,
                structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty(), pad_event_to=22, sort_keys=False),
            ],
            foreign_pre_chain=shared,
        )
    )
    console.setLevel(logging.DEBUG if verbose else logging.INFO)
    handlers.append(console)
    path: Path | None = None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        path = log_path(log_dir, now)
        file_handler = logging.FileHandler(path, encoding="utf-8")
        file_handler.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                processors=[
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info,
                    structlog.processors.JSONRenderer(default=str),
                ],
                foreign_pre_chain=shared,
            )
        )
        file_handler.setLevel(logging.DEBUG)
        handlers.append(file_handler)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    for noisy in ("httpx", "httpcore", "httpx2", "httpcore2", "anthropic", "futu", "urllib3", "pgserver"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    return path
