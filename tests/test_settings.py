"""Settings: YAML + ${ENV} interpolation into strict pydantic models; errors name the key and value."""

from __future__ import annotations

from pathlib import Path

import pytest

from config.errors import ConfigError
from config.settings import DEFAULT_SETTINGS_PATH, Secrets, interpolate, load_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "settings.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_the_shipped_settings_load_with_safe_defaults() -> None:
    s = load_settings(DEFAULT_SETTINGS_PATH, env={})
    assert s.broker.name == "sim" and s.broker.futu.trd_env == "SIMULATE"
    assert s.risk.max_positions == 5 and s.risk.max_position_pct == 0.20 and s.risk.min_risk_reward == 2.0
    assert s.broker.futu.port == 11111 and s.broker.futu.host == "127.0.0.1"
    assert s.claude.model in s.claude.prices  # the default model has a price, so cost is accounted


def test_env_interpolation_with_defaults_and_types() -> None:
    data = {"futu": {"host": "${OPEND_HOST:-127.0.0.1}", "port": "${OPEND_PORT:-11111}", "x": "a-${NAME}-b"}}
    out = interpolate(data, {"OPEND_PORT": "22222", "NAME": "n"})
    assert out == {"futu": {"host": "127.0.0.1", "port": 22222, "x": "a-n-b"}}


def test_missing_env_without_default_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, "alerts:\n  email: ${ALERT_EMAIL}\n")
    with pytest.raises(ConfigError, match=r"Setting alerts.email refers to \$\{ALERT_EMAIL\}"):
        load_settings(path, env={})


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("risk:\n  max_position_pct: 1.5\n", r"risk.max_position_pct = 1.5: Input should be less than or equal to 1"),
        ("risk:\n  max_positons: 5\n", r"risk.max_positons: unknown setting"),  # a typo fails
        ("broker:\n  name: schwab\n", r"broker.name = 'schwab': Input should be 'futu', 'sim' or 'ibkr'"),
        ("broker:\n  ibkr:\n    account: 1234\n", r"broker.ibkr.account = 1234: Input should be a valid string"),
        ("broker:\n  ibkr:\n    account: X-1\n", r"'X-1' is not an IBKR account id"),
        ("broker:\n  ibkr:\n    trading_mode: real\n", r"Input should be 'paper' or 'live'"),
        ("broker:\n  ibkr:\n    universe: [US.AAPL]\n", r"trades Hong Kong stocks only"),
        ("broker:\n  futu:\n    trd_env: LIVE\n", r"broker.futu.trd_env = 'LIVE'"),
        ("risk:\n  max_daily_loss_pct: 0.01\n", r"risk.max_daily_loss_pct = 0.01: Value error, must be greater than"),
        ("claude:\n  model: claude-sonnet-4-5-20250514\n", r"never existed"),
        ("- a\n- b\n", r"must hold a mapping"),
    ],
)
def test_bad_values_name_key_value_and_rule(tmp_path: Path, yaml_text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(write(tmp_path, yaml_text), env={})


def test_missing_file_says_how_to_point_at_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"does not exist. Pass --config PATH or set CATALYST_CONFIG"):
        load_settings(tmp_path / "nope.yaml", env={})


def test_secrets_come_from_the_environment_and_never_print() -> None:
    secrets = Secrets.from_env({"ANTHROPIC_API_KEY": "sk-ant-secret", "FUTU_TRADE_PWD": "123456"})
    assert secrets.anthropic_api_key is not None
    assert secrets.anthropic_api_key.get_secret_value() == "sk-ant-secret"
    assert "sk-ant-secret" not in repr(secrets) and "123456" not in str(secrets)
    assert Secrets.from_env({}).database_url is None
