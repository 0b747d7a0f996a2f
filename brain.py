"""Who decides. ``ClaudeBrain`` (anthropic SDK) and ``RulesBrain`` (deterministic momentum policy).

Both answer one question in the Messages API shape: given the conversation so far, what is the next
assistant turn? So ``run_tool_loop`` is the same for both: it calls the brain, passes every tool_use through
the gate (validate → safety → execute → journal), answers each with a tool_result, and stops on end_turn or
when a cycle budget is reached.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Decimal
from pathlib import Path
from string import Template
from typing import Any, Protocol

import structlog
from pydantic import SecretStr

import safety
from config.errors import ConfigError, ModelAPIError, ModelUnavailable
from config.settings import PROJECT_ROOT, ClaudeSettings, ModelPrice, RiskSettings, Settings

log = structlog.get_logger(__name__)

SYSTEM_PROMPT_PATH = PROJECT_ROOT / "config" / "prompts" / "system.md"


# ------------------------------------------------------------------------------------------- usage


@dataclass
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0

    @property
    def total_input(self) -> int:
        return self.input_tokens + self.cache_read_tokens + self.cache_write_tokens

    def add(self, other: Usage) -> None:
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cache_read_tokens += other.cache_read_tokens
        self.cache_write_tokens += other.cache_write_tokens

    def cost_usd(self, price: ModelPrice | None) -> float:
        """USD for these tokens at a per-million price; 0 when the model has no price (rules brain)."""
        if price is None:
            return 0.0
        return (
            self.input_tokens * price.input
            + self.output_tokens * price.output
            + self.cache_read_tokens * price.cache_read
            + self.cache_write_tokens * price.cache_write
        ) / 1_000_000


@dataclass(frozen=True)
class Turn:
    """One assistant message: content blocks (dicts in the Messages API shape), stop reason, usage."""

    content: list[dict[str, Any]]
    stop_reason: str
    usage: Usage = field(default_factory=Usage)


class Brain(Protocol):
    name: str
    model: str

    def next_turn(self, messages: list[dict[str, Any]]) -> Turn: ...


# ------------------------------------------------------------------------------------ system prompt


def system_prompt(settings: Settings, path: Path = SYSTEM_PROMPT_PATH) -> str:
    """The static system prompt with the configured limits filled in (no timestamps: it is cached)."""
    r = settings.risk
    values = {
        "max_positions": r.max_positions,
        "max_position_pct": f"{r.max_position_pct:.0%}",
        "max_daily_loss_pct": f"{r.max_daily_loss_pct:.1%}",
        "warning_loss_pct": f"{r.warning_loss_pct:.1%}",
        "max_daily_trades": r.max_daily_trades,
        "min_risk_reward": f"{r.min_risk_reward:g}",
        "max_stop_pct": f"{r.max_stop_pct:.0%}",
        "max_order_value_hkd": f"{r.max_order_value_hkd:,.0f}",
        "max_price_deviation_pct": f"{r.max_price_deviation_pct:.0%}",
        "approval_price_tolerance_pct": f"{r.approval_price_tolerance_pct:.1%}",
        "no_entry_minutes_before_close": r.no_entry_minutes_before_close,
        "max_alerts_per_cycle": r.max_alerts_per_cycle,
        "max_alert_chars": r.max_alert_chars,
    }
    try:
        return Template(path.read_text(encoding="utf-8")).substitute(values)
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError(f"System prompt {path} could not be prepared: {exc}") from exc


# ------------------------------------------------------------------------------------------- Claude


CACHE_MARKER: dict[str, str] = {"type": "ephemeral"}


def build_request(
    model: str, max_tokens: int, tools: list[dict[str, Any]], system: str, messages: list[dict[str, Any]], caching: bool
) -> dict[str, Any]:
    """The Messages API request body. Tools and system are a static prefix with a breakpoint on the last tool
    and on the system block; the top-level ``cache_control`` caches the growing conversation automatically."""
    system_blocks: list[dict[str, Any]] = [{"type": "text", "text": system}]
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "messages": messages}
    if caching:
        tools = [*tools[:-1], {**tools[-1], "cache_control": CACHE_MARKER}] if tools else tools
        system_blocks = [{**system_blocks[0], "cache_control": CACHE_MARKER}]
        body["cache_control"] = CACHE_MARKER
    body["system"] = system_blocks
    body["tools"] = tools
    return body


class ClaudeBrain:
    """The anthropic SDK's Messages API. The SDK retries 408/409/429/5xx/529 itself; no second retry layer."""

    name = "claude"

    def __init__(self, settings: Settings, api_key: SecretStr | None, tools: list[dict[str, Any]]) -> None:
        if api_key is None:
            raise ConfigError(
                "ANTHROPIC_API_KEY is not set. Export it (it is read from the environment only), "
                "or run offline with --brain rules."
            )
        import anthropic  # lazy: --help and the guard never pay for it

        self._anthropic = anthropic
        self._settings = settings.claude
        self.model = settings.claude.model
        self._system = system_prompt(settings)
        self._tools = tools
        # base_url comes from ANTHROPIC_BASE_URL, read by the SDK itself.
        self._client = anthropic.Anthropic(
            api_key=api_key.get_secret_value(), timeout=settings.claude.request_timeout_s, max_retries=3
        )

    def request(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        """The exact request body for a turn (used by the benchmark to measure what is sent)."""
        return build_request(
            self.model, self._settings.max_tokens, self._tools, self._system, messages, self._settings.prompt_caching
        )

    def next_turn(self, messages: list[dict[str, Any]]) -> Turn:
        return self.send(self.request(messages))

    def send(self, body: dict[str, Any]) -> Turn:
        """One Messages API call with ``body`` as ``request`` builds it (the tool loop's turns, the lesson review;
        the replay's response cache wraps this)."""
        try:
            response = self._client.messages.create(**body)
        except self._anthropic.APIConnectionError as exc:  # includes timeouts, after the SDK's own retries
            raise ModelUnavailable(f"Claude API unreachable after the SDK's retries: {exc}. No tool was run.") from exc
        except self._anthropic.APIStatusError as exc:
            raise ModelAPIError(f"Claude API answered {exc.status_code}: {exc.message}") from exc
        u = response.usage
        usage = Usage(
            input_tokens=u.input_tokens or 0,
            output_tokens=u.output_tokens or 0,
            cache_read_tokens=getattr(u, "cache_read_input_tokens", 0) or 0,
            cache_write_tokens=getattr(u, "cache_creation_input_tokens", 0) or 0,
        )
        content = [block.model_dump(mode="json", exclude_none=True) for block in response.content]
        return Turn(content=content, stop_reason=response.stop_reason or "end_turn", usage=usage)


# -------------------------------------------------------------------------------------------- rules

Call = tuple[str, dict[str, Any]]
Policy = Generator[list[Call], list[Any], str]


class RulesBrain:
    """The owner's entry criteria, applied deterministically through the same tools and the same gate:
    scan → quote → technicals → patterns → news → check_risk → execute_trade. Never reads a result it
    did not ask for; the safety layer still has the last word."""

    name = "rules"
    model = "rules-v1"

    def __init__(self, risk: RiskSettings, scan_limit: int = 10, max_candidates: int = 5) -> None:
        self._risk = risk
        self._scan_limit = scan_limit
        self._max_candidates = max_candidates
        self._policy: Policy | None = None
        self._pending: list[str] = []

    def next_turn(self, messages: list[dict[str, Any]]) -> Turn:
        try:
            if self._policy is None:
                self._policy = self._decide()
                calls = next(self._policy)
            else:
                calls = self._policy.send(self._results(messages))
        except StopIteration as done:
            return Turn(content=[{"type": "text", "text": str(done.value)}], stop_reason="end_turn")
        blocks = []
        self._pending = []
        for name, args in calls:
            tool_id = f"toolu_rules_{uuid.uuid4().hex[:16]}"
            self._pending.append(tool_id)
            blocks.append({"type": "tool_use", "id": tool_id, "name": name, "input": args})
        return Turn(content=blocks, stop_reason="tool_use")

    def _results(self, messages: list[dict[str, Any]]) -> list[Any]:
        blocks = messages[-1]["content"] if messages else []
        by_id = {b["tool_use_id"]: b for b in blocks if isinstance(b, dict) and b.get("type") == "tool_result"}
        out = []
        for tool_id in self._pending:
            block = by_id.get(tool_id, {})
            try:
                value = json.loads(block.get("content") or "null")
            except (TypeError, json.JSONDecodeError):
                value = None
            out.append({"error": value} if block.get("is_error") else value)
        return out

    def _decide(self) -> Policy:
        risk = self._risk
        (portfolio,) = yield [("get_portfolio", {})]
        portfolio = portfolio or {}
        held = {p["symbol"] for p in portfolio.get("positions", [])}
        slots = risk.max_positions - len(held) - len(portfolio.get("open_orders", []))
        equity = Decimal(str(portfolio.get("equity", 0)))
        if slots <= 0:
            yield [("log_decision", {"decision": "hold", "reasoning": f"{len(held)} positions: no free slot"})]
            return "No free position slot; holding."
        (scan,) = yield [("scan_market", {"index": "ALL", "limit": self._scan_limit})]
        candidates = [
            c
            for c in (scan or {}).get("candidates", [])
            if c.get("symbol") not in held and (c.get("volume_ratio") or 0) > 1.5 and (c.get("change_pct") or 0) > 0
        ][: self._max_candidates]
        entered: list[str] = []
        skipped: list[str] = []
        for c in candidates:
            if len(entered) >= slots:
                break
            symbol = c["symbol"]
            quote, tech, pats, news = yield [
                ("get_quote", {"symbol": symbol}),
                ("get_technicals", {"symbol": symbol, "timeframe": "1d"}),
                ("detect_patterns", {"symbol": symbol, "timeframe": "5m"}),
                ("get_news", {"symbol": symbol, "hours": 24}),
            ]
            why_not = entry_criteria_failure(quote, tech, pats, news)
            if why_not:
                skipped.append(f"{symbol}: {why_not}")
                continue
            plan = plan_entry(quote, tech, pats, equity, risk)
            if plan is None:
                skipped.append(f"{symbol}: no sensible stop/size")
                continue
            (verdict,) = yield [("check_risk", plan.check_risk_args())]
            if not (verdict or {}).get("approved"):
                max_qty = int((verdict or {}).get("max_quantity") or 0)
                lot = int(quote["lot_size"])
                if 0 < max_qty < plan.quantity and max_qty % lot == 0:
                    plan = plan.with_quantity(max_qty)
                    (verdict,) = yield [("check_risk", plan.check_risk_args())]
            if not (verdict or {}).get("approved"):
                rules = ", ".join(f["rule"] for f in (verdict or {}).get("failed_rules", [])) or "error"
                skipped.append(f"{symbol}: check_risk refused ({rules})")
                continue
            (order,) = yield [("execute_trade", plan.execute_args())]
            if isinstance(order, dict) and order.get("status") in {
                "filled",
                "submitted",
                "partially_filled",
                "dry_run",
            }:
                entered.append(f"{symbol} {plan.quantity}@{plan.entry} stop {plan.stop} target {plan.target}")
            else:
                skipped.append(f"{symbol}: order not placed")
        summary = f"Entered {len(entered)}: {'; '.join(entered) or 'none'}. Skipped: {'; '.join(skipped) or 'none'}."
        yield [
            (
                "log_decision",
                {"decision": "enter" if entered else "no_trade", "reasoning": summary[:4000], "confidence": 0.6},
            )
        ]
        return summary


def _num(d: Any, *keys: str) -> float | None:
    """The first numeric value found under ``keys`` in a result dict."""
    if not isinstance(d, dict):
        return None
    for key in keys:
        value = d.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def entry_criteria_failure(quote: Any, tech: Any, pats: Any, news: Any) -> str | None:
    """The owner's entry criteria; returns why not, or None when every one holds."""
    if not isinstance(quote, dict) or "error" in quote or not isinstance(tech, dict) or "error" in tech:
        return "no quote or technicals"
    # The quote's ratio compares today's pace with the recent average at the same time of day, so it is
    # meaningful at 09:45; the daily-bar ratio only becomes comparable near the close.
    volume_ratio = _num(quote, "volume_ratio") or _num(tech, "volume_ratio")
    if volume_ratio is None or volume_ratio <= 1.5:
        return f"volume ratio {volume_ratio} not > 1.5"
    rsi = _num(tech, "rsi_14", "rsi")
    if rsi is None or not 40 <= rsi <= 70:
        return f"RSI {rsi} outside 40-70"
    hits = [p for p in (pats or {}).get("patterns", []) if p.get("direction") in ("bullish", None)]
    if not hits:
        return "no bullish pattern"
    report = (news or {}).get("report", {}) if isinstance(news, dict) else {}
    if report.get("sentiment") == "negative":
        return "news sentiment negative"
    return None


@dataclass(frozen=True)
class EntryPlan:
    symbol: str
    quantity: int
    entry: Decimal
    stop: Decimal
    target: Decimal

    def check_risk_args(self) -> dict[str, Any]:
        return {
            "symbol": self.symbol,
            "side": "buy",
            "quantity": self.quantity,
            "entry_price": float(self.entry),
            "stop_loss": float(self.stop),
            "take_profit": float(self.target),
        }

    def execute_args(self) -> dict[str, Any]:
        return {
            "symbol": self.symbol,
            "side": "buy",
            "quantity": self.quantity,
            "order_type": "limit",
            "limit_price": float(self.entry),
            "stop_loss": float(self.stop),
            "take_profit": float(self.target),
            "reason": "rules: momentum entry (volume, RSI, pattern, news)",
        }

    def with_quantity(self, quantity: int) -> EntryPlan:
        return EntryPlan(self.symbol, quantity, self.entry, self.stop, self.target)


def plan_entry(
    quote: dict[str, Any], tech: dict[str, Any], pats: Any, equity: Decimal, risk: RiskSettings
) -> EntryPlan | None:
    """Entry at the ask, stop below the recent swing low (or 2×ATR), target ≥ 2.5× risk, size within the cap."""
    from brokers import hkex
    from brokers.base import Side

    price = Decimal(str(quote.get("ask_price") or quote["last_price"]))
    tick = Decimal(str(quote["price_spread"])) if quote.get("price_spread") else None
    today = _quote_date(quote)
    entry = hkex.round_to_tick(price, Side.BUY, today, tick=tick)
    swing = _num(pats, "swing_low")
    atr = _num(tech, "atr_14", "atr")
    candidates = []
    if swing is not None and 0 < swing < float(entry):
        candidates.append(Decimal(str(swing)) - (tick or Decimal("0.01")))
    if atr:
        candidates.append(entry - Decimal(str(atr)) * 2)
    if not candidates:
        return None
    floor = entry * (1 - Decimal(str(risk.max_stop_pct)) * Decimal("0.9"))
    stop = hkex.round_to_tick(max(max(candidates), floor), Side.BUY, today, tick=tick)
    if stop >= entry:
        return None
    ratio = Decimal(str(max(risk.min_risk_reward, 2.0) + 0.5))
    target = hkex.round_to_tick(entry + (entry - stop) * ratio, Side.SELL, today, tick=tick)
    lot = int(quote["lot_size"])
    budget = min(equity * Decimal(str(risk.max_position_pct)) * Decimal("0.9"), risk.max_order_value_hkd)
    lots = int((budget / (entry * lot)).to_integral_value(rounding=ROUND_DOWN))
    if lots < 1:
        return None
    return EntryPlan(quote["symbol"], lots * lot, entry, stop, target)


def _quote_date(quote: dict[str, Any]):
    from datetime import date, datetime

    stamp = quote.get("updated_at")
    try:
        return datetime.fromisoformat(stamp).date() if isinstance(stamp, str) else date.today()
    except ValueError:
        return date.today()


# --------------------------------------------------------------------------------------------- loop


@dataclass
class LoopResult:
    iterations: int = 0
    tool_calls: int = 0
    usage: Usage = field(default_factory=Usage)
    cost_usd: float = 0.0
    final_text: str = ""
    stopped_by: str = "end_turn"  # end_turn | budget: … | max_tokens
    messages: list[dict[str, Any]] = field(default_factory=list)


class Gate(Protocol):
    def handle(self, name: str, raw_input: Any) -> Any: ...

    def refuse(self, name: str, raw_input: Any, reason: str) -> Any: ...


def run_tool_loop(
    brain: Brain,
    gate: Gate,
    first_message: str,
    limits: ClaudeSettings,
    *,
    cost_before_today: float = 0.0,
    on_turn: Callable[[int, Turn], None] | None = None,
    result: LoopResult | None = None,
) -> LoopResult:
    """The hand-written tool loop: every tool_use answered, every call through the gate, budgets enforced.

    Pass ``result`` to keep what was spent so far even if the loop raises (the caller journals it)."""
    price = limits.prices.get(brain.model)
    result = result if result is not None else LoopResult()
    result.messages = [{"role": "user", "content": first_message}]
    while True:
        spent = safety.CycleUsage(
            iterations=result.iterations,
            tool_calls=result.tool_calls,
            input_tokens=result.usage.total_input,
            cost_usd_today=cost_before_today + result.cost_usd,
        )
        breach = safety.budget_breach(spent, limits)
        if breach:
            result.stopped_by = f"budget: {breach}"
            log.warning("budget_reached", reason=breach)
            return result
        turn = brain.next_turn(result.messages)
        result.iterations += 1
        result.usage.add(turn.usage)
        result.cost_usd = result.usage.cost_usd(price)
        if on_turn is not None:
            on_turn(result.iterations, turn)
        result.messages.append({"role": "assistant", "content": turn.content})
        texts = [b.get("text", "") for b in turn.content if b.get("type") == "text"]
        if texts:
            result.final_text = "\n".join(t for t in texts if t)
        tool_uses = [b for b in turn.content if b.get("type") == "tool_use"]
        if not tool_uses:
            result.stopped_by = turn.stop_reason
            return result
        answers = []
        for block in tool_uses:
            if result.tool_calls >= limits.max_tool_calls:
                outcome = gate.refuse(
                    block.get("name", ""), block.get("input"), f"tool-call budget reached ({limits.max_tool_calls})"
                )
            else:
                outcome = gate.handle(block.get("name", ""), block.get("input"))
            result.tool_calls += 1
            answers.append(
                {
                    "type": "tool_result",
                    "tool_use_id": block["id"],
                    "content": json.dumps(outcome.result, separators=(",", ":"), default=str),
                    "is_error": outcome.is_error,
                }
            )
        result.messages.append({"role": "user", "content": answers})
