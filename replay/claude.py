"""Claude in a replay: the real ``ClaudeBrain`` behind a response cache and, with ``--anonymize``, aliases.

``ReplayBrain`` is a ``brain.Brain``. For each turn (and each lesson review, through ``send``) it builds the exact
request ``ClaudeBrain`` would send, replaces (with ``--anonymize``) every symbol and company name by a stable
alias, and looks the request's SHA-256 up in ``model_response_cache`` (replay database): a hit is replayed at no
cost, a miss is sent through the SDK and stored. The reply's tool inputs and text are mapped back to real symbols
before the tool loop sees them, so the gate, safety and broker work on real symbols; the next request is
anonymized again from scratch, so the model never sees a real symbol or name, however the conversation grew.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from brain import ClaudeBrain, Turn, Usage


class Aliases:
    """Stable aliases: ``HK.00700`` -> ``STOCK001``, its name -> ``Company 001`` (sorted by symbol)."""

    def __init__(self, names: dict[str, str]) -> None:
        self.forward: dict[str, str] = {}
        for i, symbol in enumerate(sorted(names), start=1):
            self.forward[symbol] = f"STOCK{i:03d}"
            if names[symbol].strip():
                self.forward[names[symbol].strip()] = f"Company {i:03d}"
        self.back = {alias: real for real, alias in self.forward.items() if real.startswith("HK.")}
        self._out = _replacer(self.forward)
        self._in = _replacer(self.back)

    def hide(self, value: Any) -> Any:
        return _walk(value, self._out)

    def reveal(self, value: Any) -> Any:
        return _walk(value, self._in)


def _replacer(table: dict[str, str]) -> Any:
    if not table:
        return lambda text: text
    pattern = re.compile("|".join(re.escape(k) for k in sorted(table, key=len, reverse=True)))
    return lambda text: pattern.sub(lambda m: table[m.group(0)], text)


def _walk(value: Any, replace: Any) -> Any:
    if isinstance(value, str):
        return replace(value)
    if isinstance(value, list):
        return [_walk(v, replace) for v in value]
    if isinstance(value, dict):
        return {k: _walk(v, replace) for k, v in value.items()}
    return value


def request_key(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


class ReplayBrain:
    """A cached (and optionally anonymizing) Claude for replays. ``hits``/``misses`` count turns."""

    name = "claude"

    def __init__(self, inner: ClaudeBrain, cache: psycopg.Connection[Any], aliases: Aliases | None = None) -> None:
        self._inner = inner
        self._cache = cache
        self._aliases = aliases
        self.model = inner.model
        self.hits = 0
        self.misses = 0

    def next_turn(self, messages: list[dict[str, Any]]) -> Turn:
        return self.send(self._inner.request(messages))

    def send(self, body: dict[str, Any]) -> Turn:
        """One request, cached (and anonymized) like a turn: the tool loop's turns and the lesson review's call
        (``reflection.review_if_due``) both come through here."""
        if self._aliases is not None:
            body = self._aliases.hide(body)
        key = request_key(body)
        row = self._cache.execute(
            "SELECT response FROM model_response_cache WHERE request_sha256 = %s", (key,)
        ).fetchone()
        if row is not None:
            self.hits += 1
            stored = row[0]
            turn = Turn(content=stored["content"], stop_reason=stored["stop_reason"], usage=Usage())  # free
        else:
            self.misses += 1
            turn = self._inner.send(body)
            u = turn.usage
            stored = {
                "content": turn.content,
                "stop_reason": turn.stop_reason,
                "usage": [u.input_tokens, u.output_tokens, u.cache_read_tokens, u.cache_write_tokens],
            }
            self._cache.execute(
                "INSERT INTO model_response_cache (request_sha256, model, response) VALUES (%s, %s, %s) "
                "ON CONFLICT (request_sha256) DO NOTHING",
                (key, self.model, Jsonb(stored)),
            )
        if self._aliases is None:
            return turn
        return Turn(content=self._aliases.reveal(turn.content), stop_reason=turn.stop_reason, usage=turn.usage)
