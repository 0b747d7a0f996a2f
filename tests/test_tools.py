"""The tool catalogue: schemas generated from the models, inputs validated into clear errors."""

from __future__ import annotations

from decimal import Decimal

import pytest

import tools


def test_twelve_tools_with_the_owner_names_and_required_inputs() -> None:
    by_name = {t["name"]: t for t in tools.TOOLS}
    assert list(by_name) == [
        "scan_market",
        "get_quote",
        "get_technicals",
        "detect_patterns",
        "get_news",
        "check_risk",
        "get_portfolio",
        "execute_trade",
        "close_position",
        "close_all",
        "send_alert",
        "log_decision",
    ]
    required = {name: set(t["input_schema"].get("required", [])) for name, t in by_name.items()}
    assert required["check_risk"] == {"symbol", "side", "quantity", "entry_price", "stop_loss"}
    assert required["execute_trade"] == {"symbol", "side", "quantity", "stop_loss", "take_profit"}
    assert required["close_position"] == {"symbol", "reason"}
    assert required["send_alert"] == {"subject", "message"}
    assert required["log_decision"] == {"decision", "reasoning"}
    assert required["scan_market"] == set() and required["get_portfolio"] == set()


def test_schemas_are_generated_from_the_models() -> None:
    for spec, tool in zip(tools.SPECS, tools.TOOLS, strict=True):
        schema = tool["input_schema"]
        assert schema["type"] == "object"
        assert set(schema["properties"]) == set(spec.input_model.model_fields)
        assert "title" not in str(schema)  # titles are stripped: they cost tokens
        assert schema.get("additionalProperties") is False


@pytest.mark.parametrize("written", ["700", "0700", "00700", "HK.00700", " hk.700 "])
def test_symbols_are_accepted_in_every_common_form(written: str) -> None:
    args = tools.parse_tool_input("get_quote", {"symbol": written})
    assert args.symbol == "HK.00700"


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        ("nope", {}, r"Unknown tool 'nope'. Available tools: scan_market"),  # unknown tool
        ("get_quote", "HK.00700", r"must be a JSON object"),  # non-object input arrives as a string
        ("get_quote", ["700"], r"must be a JSON object"),  # a list is not an object either
        ("get_quote", {}, r"symbol: Field required"),  # missing required field
        ("get_quote", {"symbol": "AAPL"}, r"symbol: Value error, Symbol 'AAPL' is not a Hong Kong"),
        ("check_risk", {"symbol": "700", "side": "short", "quantity": 100, "entry_price": 1, "stop_loss": 1}, "side"),
        ("check_risk", {"symbol": "700", "side": "buy", "quantity": 0, "entry_price": 1, "stop_loss": 1}, "quantity"),
        (
            "check_risk",
            {"symbol": "700", "side": "buy", "quantity": -100, "entry_price": 1, "stop_loss": 1},
            "quantity",
        ),
        (
            "check_risk",
            {"symbol": "700", "side": "buy", "quantity": 100, "entry_price": -5, "stop_loss": 1},
            "entry_price",
        ),
        ("log_decision", {"decision": "buy", "reasoning": "x", "confidence": 7}, r"confidence: Input should be less"),
        ("get_portfolio", {"extra": 1}, r"extra: Extra inputs are not permitted"),  # typos fail loudly
    ],
)
def test_invalid_input_becomes_a_clear_error(name: str, raw: object, message: str) -> None:
    with pytest.raises(tools.ToolInputError, match=message):
        tools.parse_tool_input(name, raw)


def test_prices_become_decimals() -> None:
    args = tools.parse_tool_input(
        "execute_trade",
        {"symbol": "5", "side": "buy", "quantity": 400, "limit_price": 98.35, "stop_loss": 95.1, "take_profit": 105},
    )
    assert args.limit_price == Decimal("98.35") and args.order_type == "limit"
    assert args.symbol == "HK.00005"
