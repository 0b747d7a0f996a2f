"""Logging: structlog, JSON lines to ``logs/agent-YYYYMMDD.log`` (Hong Kong date), readable lines on the console.

Secrets never reach a log line: values under secret-looking keys are replaced, and anything that looks like
an API key or a DSN password is scrubbed from every string.

Fields named in an event's ``file_only`` (see ``file_only()``) go to the JSON file but not to the console unless
it is verbose: an expected failure's traceback is for the file, its message is for the person at the console.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping
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


FILE_ONLY = "file_only"


def file_only(*keys: str) -> dict[str, tuple[str, ...]]:
    """Event fields for the log file only, e.g. ``log.error("run_failed", traceback=tb, **file_only("traceback"))``."""
    return {FILE_ONLY: keys}


def _drop_file_only_marker(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    event_dict.pop(FILE_ONLY, None)
    return event_dict


def _console_processor(verbose: bool) -> Any:
    def console_fields(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        """The console is for a person: drop the per-run context fields every line repeats, and the file-only
        fields unless verbose (the file keeps all of them)."""
        hidden = event_dict.pop(FILE_ONLY, ()) or ()
        for key in ("run_id", "mode", *(() if verbose else hidden)):
            event_dict.pop(key, None)
        stamp = event_dict.get("timestamp")
        if isinstance(stamp, str) and "T" in stamp:
            event_dict["timestamp"] = stamp.replace("T", " ")[:19]
        return event_dict

    return console_fields


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
                _console_processor(verbose),
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
                    _drop_file_only_marker,
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


def fallback_log_dir(config_path: str | None = None, env: Mapping[str, str] | None = None) -> Path:
    """The log folder of a run that failed before its settings loaded: the settings file's ``agent.log_dir`` if
    it can be read (another key may be the invalid one), else the default ``logs/``."""
    from config.settings import DEFAULT_SETTINGS_PATH, PROJECT_ROOT, interpolate

    env = os.environ if env is None else env
    default = PROJECT_ROOT / "logs"
    path = Path(config_path or env.get("CATALYST_CONFIG") or DEFAULT_SETTINGS_PATH)
    try:
        import yaml

        agent = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("agent") or {}
        value = interpolate(agent.get("log_dir"), dict(env), "agent.log_dir")
    except Exception:  # unreadable, not YAML, not a mapping, a missing ${VAR}: the default folder
        return default
    if not isinstance(value, str) or not value.strip():
        return default
    folder = Path(value)
    return folder if folder.is_absolute() else PROJECT_ROOT / folder


def ensure_logging(config_path: str | None, now: datetime, *, verbose: bool = False) -> Path | None:
    """Set up logging if nothing has yet (a failure before the settings loaded): file in ``fallback_log_dir``."""
    if structlog.is_configured():
        return None
    try:
        return configure_logging(fallback_log_dir(config_path), now, verbose=verbose)
    except OSError:  # the folder cannot be written: the console still gets the message
        return configure_logging(None, now, verbose=verbose)
