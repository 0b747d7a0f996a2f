"""Settings: ``config/settings.yaml`` with ``${ENV}`` interpolation, validated by pydantic models.

Precedence: command-line overrides (applied by ``agent.py``) > the YAML file (whose values may pull from the
environment) > the defaults below. Secrets are never read from YAML: they come from the environment only
(``Secrets.from_env``) and are ``SecretStr``, so printing settings never shows them.
"""

from __future__ import annotations

import os
import re
from datetime import date, time
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from config.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SETTINGS_PATH = PROJECT_ROOT / "config" / "settings.yaml"

Fraction = Annotated[float, Field(gt=0, le=1)]
PositiveInt = Annotated[int, Field(gt=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExchangeSettings(_Section):
    code: Literal["HKEX"] = "HKEX"
    calendar: Literal["XHKG"] = "XHKG"
    currency: Literal["HKD"] = "HKD"
    timezone: Literal["Asia/Hong_Kong"] = "Asia/Hong_Kong"
    morning_open: time = time(9, 30)
    morning_close: time = time(12, 0)
    afternoon_open: time = time(13, 0)
    afternoon_close: time = time(16, 0)


class FutuSettings(_Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 11111
    trd_env: Literal["SIMULATE", "REAL"] = "SIMULATE"
    security_firm: str = "FUTUSECURITIES"
    connect_timeout_s: Annotated[float, Field(gt=0, le=120)] = 10
    request_timeout_s: Annotated[float, Field(gt=0, le=300)] = 15
    commission_pct: Annotated[float, Field(ge=0, lt=0.01)] = 0.0003  # the broker's, for cost previews
    min_commission_hkd: Annotated[Decimal, Field(ge=0)] = Decimal(3)


class SimSettings(_Section):
    seed: int = 42
    state_file: Path = Path("var/sim/state.json")
    starting_cash_hkd: Annotated[Decimal, Field(gt=0)] = Decimal(1_000_000)
    commission_pct: Annotated[float, Field(ge=0, lt=0.01)] = 0.0003
    min_commission_hkd: Annotated[Decimal, Field(ge=0)] = Decimal(3)
    # paper: a Futu-like paper account (the guard enforces journal stops); real: a REAL-style account with
    # broker-side stop orders, so real-account paths run end to end. The sim cannot move money either way.
    account_kind: Literal["paper", "real"] = "paper"


class IbkrSettings(_Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 4002  # IB Gateway paper; 4001 is live
    client_id: Annotated[int, Field(ge=0, le=2**31 - 1)] = 17
    account: str = ""  # empty: the gateway's only account; required when it manages several
    trading_mode: Literal["paper", "live"] = "paper"  # live also needs --live on the command line
    allow_delayed_data: bool = False  # entries on delayed (15-minute-old) quotes; exits are always allowed
    connect_timeout_s: Annotated[float, Field(gt=0, le=120)] = 10
    request_timeout_s: Annotated[float, Field(gt=0, le=300)] = 15
    commission_pct: Annotated[float, Field(ge=0, lt=0.01)] = 0.0008  # IBKR HK tiered, for cost previews
    min_commission_hkd: Annotated[Decimal, Field(ge=0)] = Decimal(18)
    # IB's API has no index membership lists: scan_market ranks these symbols for every index on IBKR.
    universe: list[str] = []

    @field_validator("universe")
    @classmethod
    def _symbols(cls, value: list[str]) -> list[str]:
        from brokers.hkex import normalize_symbol

        return list(dict.fromkeys(normalize_symbol(text) for text in value))

    @field_validator("account")
    @classmethod
    def _account_id(cls, value: str) -> str:
        if value and not re.fullmatch(r"[A-Z]{1,3}\d{3,12}", value):
            raise ValueError(f"{value!r} is not an IBKR account id (like U1234567 or DU1234567)")
        return value


class BrokerSettings(_Section):
    name: Literal["futu", "sim", "ibkr"] = "sim"
    futu: FutuSettings = FutuSettings()
    sim: SimSettings = SimSettings()
    ibkr: IbkrSettings = IbkrSettings()

    @property
    def commission(self) -> tuple[Decimal, Decimal]:
        """(commission fraction, minimum HKD) of the broker in use."""
        active = {"futu": self.futu, "ibkr": self.ibkr}.get(self.name, self.sim)
        return Decimal(str(active.commission_pct)), active.min_commission_hkd


class RiskSettings(_Section):
    max_positions: PositiveInt = 5
    max_position_pct: Fraction = 0.20
    warning_loss_pct: Fraction = 0.015  # before max_daily_loss_pct: its validator compares the two
    max_daily_loss_pct: Fraction = 0.02
    max_daily_trades: PositiveInt = 10
    min_risk_reward: Annotated[float, Field(ge=0.5, le=20)] = 2.0
    max_stop_pct: Fraction = 0.10
    max_order_value_hkd: Annotated[Decimal, Field(gt=0)] = Decimal(250_000)
    max_price_deviation_pct: Fraction = 0.03
    approval_price_tolerance_pct: Fraction = 0.005
    no_entry_minutes_before_close: Annotated[int, Field(ge=0, le=120)] = 10
    time_stop_before_lunch: bool = True
    time_stop_minutes_before_lunch: Annotated[int, Field(ge=1, le=60)] = 5
    flatten_before_close: bool = True
    flatten_minutes_before_close: Annotated[int, Field(ge=1, le=60)] = 10
    flat_threshold_pct: Fraction = 0.003
    default_stop_pct: Fraction = 0.05
    halt_file: Path = Path("HALT")
    max_alerts_per_cycle: PositiveInt = 5
    max_alert_chars: Annotated[int, Field(ge=100, le=20_000)] = 2000

    @field_validator("max_daily_loss_pct")
    @classmethod
    def _loss_limit_above_warning(cls, v: float, info: Any) -> float:
        warning = info.data.get("warning_loss_pct")
        if warning is not None and v <= warning:
            raise ValueError(f"must be greater than risk.warning_loss_pct ({warning})")
        return v


class ModelPrice(_Section):
    """USD per million tokens."""

    input: Annotated[float, Field(ge=0)]
    output: Annotated[float, Field(ge=0)]
    cache_read: Annotated[float, Field(ge=0)]
    cache_write: Annotated[float, Field(ge=0)]


class ClaudeSettings(_Section):
    model: str = "claude-sonnet-5-5"
    max_tokens: Annotated[int, Field(ge=256, le=64_000)] = 4096
    max_iterations: Annotated[int, Field(ge=1, le=100)] = 20
    max_tool_calls: Annotated[int, Field(ge=1, le=500)] = 40
    max_input_tokens_per_cycle: PositiveInt = 400_000
    max_cost_usd_per_day: Annotated[float, Field(gt=0)] = 5.0
    request_timeout_s: Annotated[float, Field(gt=0, le=600)] = 120
    prompt_caching: bool = True
    prices: dict[str, ModelPrice] = Field(default_factory=dict)
    # Per model id: the last day its training data may cover. A replay of days before it is "in-sample".
    knowledge_cutoff: dict[str, date] = Field(default_factory=dict)

    @field_validator("model")
    @classmethod
    def _known_model_id(cls, v: str) -> str:
        if v.endswith("-20250514") and "sonnet-4-5" in v:
            raise ValueError("claude-sonnet-4-5-20250514 never existed; use a current id such as claude-sonnet-5-5")
        return v


class AlertSettings(_Section):
    email: str = ""
    sender: str = "catalyst@localhost"
    smtp_host: str = ""
    smtp_port: Annotated[int, Field(ge=1, le=65535)] = 587
    smtp_user: str = ""
    starttls: bool = True
    timeout_s: Annotated[float, Field(gt=0, le=120)] = 10


class DatabaseSettings(_Section):
    embedded_dir: Path = Path("var/pg")


class BackupSettings(_Section):
    """Journal backups (``scripts/backup.sh``): pg_dump custom-format files, verified, with retention."""

    dir: Path = Path("var/backups")
    keep_daily: Annotated[int, Field(ge=1, le=366)] = 14  # the newest backup of each of the last N days
    keep_weekly: Annotated[int, Field(ge=0, le=520)] = 8  # ... and of each of the last N ISO weeks
    pg_bin_dir: Path | None = None  # pg_dump, pg_restore, psql; None = the ones bundled with pgserver
    timeout_s: Annotated[float, Field(gt=0, le=86_400)] = 1800


class HousekeepingSettings(_Section):
    """Log retention (``python -m data.housekeeping``, nightly) and the free-disk thresholds."""

    compress_logs_after_days: Annotated[int, Field(ge=1, le=3650)] = 7  # agent-YYYYMMDD.log -> .log.gz
    delete_logs_after_days: Annotated[int, Field(ge=2, le=3650)] = 90
    rotate_log_mb: Annotated[float, Field(gt=0, le=10_000)] = 10  # cron.log, health.log
    rotated_logs_kept: Annotated[int, Field(ge=1, le=100)] = 5
    min_free_disk_mb: Annotated[int, Field(ge=0)] = 500  # below this a trading cycle refuses to start
    warn_free_disk_mb: Annotated[int, Field(ge=0)] = 2048  # below this the health check alerts

    @field_validator("delete_logs_after_days")
    @classmethod
    def _delete_after_compress(cls, v: int, info: Any) -> int:
        compress = info.data.get("compress_logs_after_days")
        if compress is not None and v <= compress:
            raise ValueError(f"must be greater than housekeeping.compress_logs_after_days ({compress})")
        return v


class AgentSettings(_Section):
    brain: Literal["claude", "rules"] = "claude"
    scan_limit: Annotated[int, Field(ge=1, le=50)] = 10
    log_dir: Path = Path("logs")
    quote_ttl_s: Annotated[float, Field(ge=0, le=60)] = 5.0  # reuse a snapshot this long; 0 = always ask
    market_batching: bool = True  # false = one gateway request per symbol: the benchmark's naive mode only
    # A trading cycle that finds a guard pass holding the account lock waits this long for it (a guard pass
    # takes about a second); a guard never waits, and a cycle never waits for another cycle.
    lock_wait_s: Annotated[float, Field(ge=0, le=300)] = 60.0


class ReflectionSettings(_Section):
    """Lessons from closed trades (Claude brain only; advisory text, never read by safety.py)."""

    enabled: bool = True
    every_trades: Annotated[int, Field(ge=1, le=100)] = 5  # closed round trips between two reviews
    max_lessons: Annotated[int, Field(ge=0, le=10)] = 5  # newest active lessons in a cycle's first message


class ReplaySettings(_Section):
    """``agent.py --replay``: its own database on the journal's server, and how fills are made."""

    database: Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_]{0,62}$")] = "catalyst_replay"
    feed: Literal["recorded", "synthetic"] = "synthetic"
    slippage_ticks: Annotated[int, Field(ge=0, le=20)] = 1  # each market/marketable fill, against us
    benchmark: str = "HK.02800"  # buy-and-hold benchmark when the data has it (else the equal-weight universe)


class Settings(_Section):
    exchange: ExchangeSettings = ExchangeSettings()
    broker: BrokerSettings = BrokerSettings()
    risk: RiskSettings = RiskSettings()
    claude: ClaudeSettings = ClaudeSettings()
    alerts: AlertSettings = AlertSettings()
    database: DatabaseSettings = DatabaseSettings()
    agent: AgentSettings = AgentSettings()
    backup: BackupSettings = BackupSettings()
    housekeeping: HousekeepingSettings = HousekeepingSettings()
    reflection: ReflectionSettings = ReflectionSettings()
    replay: ReplaySettings = ReplaySettings()
    source: Path | None = Field(default=None, exclude=True)

    def resolve(self, path: Path) -> Path:
        """A settings path made absolute against the project folder."""
        return path if path.is_absolute() else PROJECT_ROOT / path

    def redacted(self) -> dict[str, Any]:
        """The settings as plain data for the start-up log (there are no secrets in them by construction)."""
        return self.model_dump(mode="json")


class Secrets(BaseModel):
    """Secrets from the environment only. Printing this shows ``**********``."""

    model_config = ConfigDict(frozen=True)

    anthropic_api_key: SecretStr | None = None
    futu_trade_pwd: SecretStr | None = None
    smtp_password: SecretStr | None = None
    database_url: SecretStr | None = None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Secrets:
        env = dict(os.environ) if env is None else env

        def get(name: str) -> SecretStr | None:
            value = env.get(name, "")
            return SecretStr(value) if value else None

        return cls(
            anthropic_api_key=get("ANTHROPIC_API_KEY"),
            futu_trade_pwd=get("FUTU_TRADE_PWD"),
            smtp_password=get("SMTP_PASS") or get("SMTP_PASSWORD"),
            database_url=get("DATABASE_URL"),
        )


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str], key: str = "") -> Any:
    """Replace ``${NAME}`` / ``${NAME:-default}`` in every string of a parsed YAML tree."""
    if isinstance(value, dict):
        return {k: interpolate(v, env, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, f"{key}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env and env[name] != "":
            return env[name]
        if default is not None:
            return default
        raise ConfigError(
            f"Setting {key} refers to ${{{name}}}, but the environment variable {name} is not set. "
            f"Set it, or write ${{{name}:-default}} in the settings file."
        )

    replaced = _ENV_REF.sub(substitute, value)
    # A value that was only a reference takes YAML's typing (so port: ${OPEND_PORT:-11111} is an int).
    if replaced != value and _ENV_REF.fullmatch(value.strip()):
        try:
            return yaml.safe_load(replaced) if replaced.strip() else ""
        except yaml.YAMLError:
            return replaced
    return replaced


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown setting (check the spelling; allowed keys are listed in config/settings.py)"
    if error["type"] == "missing":
        return f"{key}: required but missing"
    shown = repr(error.get("input"))
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return f"{key} = {shown}: {error['msg']}"


def load_settings(
    path: Path | str | None = None,
    *,
    env: dict[str, str] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> Settings:
    """Read, interpolate and validate the settings file. Raises ``ConfigError`` naming the key and value."""
    env = dict(os.environ) if env is None else env
    path = Path(path or env.get("CATALYST_CONFIG") or DEFAULT_SETTINGS_PATH)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"Settings file {path} does not exist. Pass --config PATH or set CATALYST_CONFIG.") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"Settings file {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"Settings file {path} must hold a mapping of sections, not {type(raw).__name__}.")
    data = interpolate(raw, env)
    for section, values in (overrides or {}).items():
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise ConfigError(f"{path}: section {section} must be a mapping.")
        data[section] = {**data[section], **values}
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        raise ConfigError(f"Invalid settings in {path}: {problems}") from None
    return settings.model_copy(update={"source": path})
