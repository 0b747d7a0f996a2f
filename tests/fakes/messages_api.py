"""A local Anthropic Messages API server on 127.0.0.1 for exercising the real `anthropic` SDK in tests.

The SDK talks to it through `base_url` (or `ANTHROPIC_BASE_URL`); it speaks plain HTTP/1.0 (one request per
connection, so no keep-alive races) from a stdlib `ThreadingHTTPServer` in a background thread.

Script the assistant's turns with `enqueue()` (message dicts built with `message()`, `text()`, `tool_use()`,
or a callable), `enqueue_error()`, `enqueue_delay()` and `enqueue_disconnect()`. Each `POST /v1/messages`
that passes validation takes the next scripted item; once the script is exhausted the `responder` given to
the constructor answers, or a plain `end_turn` text "(script finished)". A request that fails validation is
answered 400 `invalid_request_error` (as the real API would) and consumes nothing from the script.

Token accounting (`usage` of every reply, unless the scripted reply fixes it):

- Every cacheable block is estimated at ceil(UTF-8 bytes of its compact, key-sorted JSON / 4) tokens, with
  `cache_control` left out. Blocks are taken in the API's cache order: each tool in `tools`, then each
  `system` block (a string is one block), then each content block of each message (string content is one
  text block). The request's input size is the sum over all blocks.
- Breakpoints are the blocks carrying `cache_control`, plus the last block when the request has the
  top-level `cache_control` (automatic caching). A breakpoint whose prefix is below `min_cacheable_tokens`
  (default 0; the real API's minimum is 1024 for Sonnet) is ignored.
- Cache entries are keyed by the model and the hash of the whole serialized prefix up to a breakpoint. A
  request reads the longest previously written prefix found at one of its breakpoints or up to
  `cache_lookback_blocks` (20, as the real API) blocks before one: `cache_read_input_tokens` is that prefix's
  size. Everything after it up to the last breakpoint is `cache_creation_input_tokens` (split into
  `cache_creation.ephemeral_5m_input_tokens` / `ephemeral_1h_input_tokens` by each breakpoint's `ttl`), and
  the rest after the last breakpoint is `input_tokens`. After a successful reply, the prefix at every
  breakpoint is written to the cache. Entries never expire; `clear_cache()` forgets them.
- `output_tokens` is ceil(bytes of the reply's content JSON / 4).
- Unlike the real API, `tool_choice`, `thinking` and other parameters do not invalidate cached prefixes.

`POST /v1/messages/count_tokens` answers `{"input_tokens": N}` with N the same block-sum estimate.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, NamedTuple, Self
from urllib.parse import urlsplit

JSON = dict[str, Any]

MESSAGES_PATH = "/v1/messages"
COUNT_TOKENS_PATH = "/v1/messages/count_tokens"
SCRIPT_FINISHED_TEXT = "(script finished)"
DELAYED_REPLY_TEXT = "(delayed reply)"
MAX_DELAY_S = 30.0
MAX_CACHE_BREAKPOINTS = 4
_TOOL_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
_CONTENT_BLOCK_TYPES = frozenset(
    {
        "text",
        "image",
        "document",
        "search_result",
        "tool_use",
        "tool_result",
        "thinking",
        "redacted_thinking",
        "server_tool_use",
        "web_search_tool_result",
    }
)
_USAGE_FIELDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


# --------------------------------------------------------------------------------------------------------------
# Reply builders


def text(value: str) -> JSON:
    """Build a `text` content block."""
    return {"type": "text", "text": value}


def tool_use(name: str, input: Any, id: str | None = None) -> JSON:
    """Build a `tool_use` content block; `input` is sent as given (a non-object reaches the SDK unchanged)."""
    return {"type": "tool_use", "id": id or f"toolu_{uuid.uuid4().hex[:24]}", "name": name, "input": input}


def message(
    content_blocks: Iterable[JSON | str], stop_reason: str | None = None, usage: dict[str, int] | None = None
) -> JSON:
    """Build a scripted assistant message; strings become text blocks.

    `stop_reason` defaults to `tool_use` when any block is a tool_use, else `end_turn`. `usage`, when given,
    is returned verbatim (missing fields are 0) instead of the simulated accounting.
    """
    content = [text(block) if isinstance(block, str) else block for block in content_blocks]
    reply: JSON = {"content": content}
    if stop_reason is not None:
        reply["stop_reason"] = stop_reason
    if usage is not None:
        reply["usage"] = dict(usage)
    return reply


@dataclass(frozen=True)
class ErrorReply:
    """A scripted API error: HTTP status, error type (e.g. `overloaded_error`), message and extra headers."""

    status: int
    error_type: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)


def error_reply(status: int, error_type: str, message: str, headers: dict[str, str] | None = None) -> ErrorReply:
    """Build an `ErrorReply`; retryable statuses (408, 409, 429, 5xx) get `retry-after-ms: 10` unless `headers`
    is given, because the SDK ignores `retry-after: 0` and would back off 0.5-1 s instead."""
    if headers is None:
        headers = {"retry-after-ms": "10"} if status in (408, 409, 429) or status >= 500 else {}
    return ErrorReply(status=status, error_type=error_type, message=message, headers=dict(headers))


Responder = Callable[[JSON], JSON | ErrorReply]
Reply = JSON | Responder


@dataclass(frozen=True)
class _Delay:
    seconds: float
    reply: Reply | None


@dataclass(frozen=True)
class _Disconnect:
    pass


_ScriptItem = Reply | ErrorReply | _Delay | _Disconnect


# --------------------------------------------------------------------------------------------------------------
# Recording


class ToolResult(NamedTuple):
    """One `tool_result` block as the agent sent it; `content` is parsed JSON when the text was JSON."""

    tool_use_id: str
    content: Any
    is_error: bool


@dataclass
class RecordedRequest:
    """One HTTP request the fake received and its answer (`status` None until answered, 0 when dropped)."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: Any
    status: int | None = None
    response: JSON | None = None


# --------------------------------------------------------------------------------------------------------------
# Token estimates and the prompt cache simulation


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def estimate_tokens(value: Any) -> int:
    """Estimate tokens of a JSON value: ceil(UTF-8 bytes of its compact key-sorted JSON / 4), at least 1."""
    return max(1, math.ceil(len(_canonical(value)) / 4))


def _without_cache_control(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_cache_control(v) for k, v in value.items() if k != "cache_control"}
    if isinstance(value, list):
        return [_without_cache_control(v) for v in value]
    return value


@dataclass(frozen=True)
class _Block:
    key: bytes
    tokens: int
    cache_control: JSON | None


def _cache_blocks(body: JSON) -> list[_Block]:
    """The request's cacheable blocks in cache order: tools, system, then message content."""
    tagged: list[tuple[list[Any], Any]] = [(["tool"], tool) for tool in body.get("tools") or []]
    system = body.get("system")
    system_blocks = [text(system)] if isinstance(system, str) else list(system or [])
    tagged += [(["system"], block) for block in system_blocks]
    for msg in body.get("messages") or []:
        content = msg.get("content")
        blocks = [text(content)] if isinstance(content, str) else list(content or [])
        tagged += [(["message", msg.get("role")], block) for block in blocks]
    result = []
    for tag, block in tagged:
        stripped = _without_cache_control(block)
        cache_control = block.get("cache_control") if isinstance(block, dict) else None
        result.append(
            _Block(key=_canonical([*tag, stripped]), tokens=estimate_tokens(stripped), cache_control=cache_control)
        )
    return result


class CacheUsage(NamedTuple):
    """How one request's input splits between fresh input, cache writes and cache reads (all in tokens)."""

    input_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    ephemeral_5m_input_tokens: int
    ephemeral_1h_input_tokens: int


class PromptCacheSimulator:
    """Simulates the Messages API prompt cache (see the module docstring for the exact rules). Thread-safe."""

    def __init__(self, *, min_cacheable_tokens: int = 0, lookback_blocks: int = 20) -> None:
        self.min_cacheable_tokens = min_cacheable_tokens
        self.lookback_blocks = lookback_blocks
        self._entries: set[str] = set()
        self._lock = threading.Lock()

    def clear(self) -> None:
        """Forget every cached prefix."""
        with self._lock:
            self._entries.clear()

    def measure(self, body: JSON, *, write: bool) -> CacheUsage:
        """Split the input of `body` into input / cache creation / cache read; with `write`, cache its prefixes."""
        blocks = _cache_blocks(body)
        if body.get("cache_control") and blocks and blocks[-1].cache_control is None:
            last = blocks[-1]
            blocks[-1] = _Block(key=last.key, tokens=last.tokens, cache_control=body["cache_control"])
        running = hashlib.sha256(_canonical(["model", body.get("model")]))
        hashes: list[str] = []
        cumulative: list[int] = []
        total = 0
        for block in blocks:
            running.update(block.key + b"\x1e")
            hashes.append(running.hexdigest())
            total += block.tokens
            cumulative.append(total)
        breakpoints = [
            i
            for i, b in enumerate(blocks)
            if b.cache_control is not None and cumulative[i] >= self.min_cacheable_tokens
        ]
        if not breakpoints:
            return CacheUsage(total, 0, 0, 0, 0)
        with self._lock:
            read_at = -1
            for bp in breakpoints:
                for pos in range(bp, max(-1, bp - self.lookback_blocks - 1), -1):
                    if hashes[pos] in self._entries:
                        read_at = max(read_at, pos)
                        break
            if write:
                self._entries.update(hashes[bp] for bp in breakpoints)
        by_ttl = {"5m": 0, "1h": 0}
        covered = cumulative[read_at] if read_at >= 0 else 0
        for bp in breakpoints:
            if cumulative[bp] > covered:
                ttl = (blocks[bp].cache_control or {}).get("ttl", "5m")
                by_ttl["1h" if ttl == "1h" else "5m"] += cumulative[bp] - covered
                covered = cumulative[bp]
        last_bp = breakpoints[-1]
        read = cumulative[read_at] if read_at >= 0 else 0
        return CacheUsage(
            input_tokens=total - cumulative[last_bp],
            cache_creation_input_tokens=cumulative[last_bp] - read,
            cache_read_input_tokens=read,
            ephemeral_5m_input_tokens=by_ttl["5m"],
            ephemeral_1h_input_tokens=by_ttl["1h"],
        )


# --------------------------------------------------------------------------------------------------------------
# Request validation, worded like the real API


def _count_breakpoints(body: JSON) -> int:
    count = 1 if body.get("cache_control") else 0
    for block in _iter_top_level_blocks(body):
        if isinstance(block, dict) and block.get("cache_control"):
            count += 1
    return count


def _iter_top_level_blocks(body: JSON) -> Iterable[Any]:
    yield from body.get("tools") or []
    if isinstance(body.get("system"), list):
        yield from body["system"]
    for msg in body.get("messages") or []:
        if isinstance(msg, dict) and isinstance(msg.get("content"), list):
            yield from msg["content"]


def _validate_tools(body: JSON) -> str | None:
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        return f"tools: Input should be a valid list, got {type(tools).__name__}"
    names: set[str] = set()
    for k, tool in enumerate(tools):
        if not isinstance(tool, dict):
            return f"tools.{k}: Input should be an object"
        name = tool.get("name")
        if not isinstance(name, str) or not _TOOL_NAME_RE.match(name):
            return f"tools.{k}.name: String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$', got {name!r}"
        if name in names:
            return f"tools: Tool names must be unique; {name!r} appears more than once"
        names.add(name)
        if "type" in tool and tool["type"] not in (None, "custom"):
            continue  # server tools (web_search etc.) carry no input_schema
        schema = tool.get("input_schema")
        if not isinstance(schema, dict):
            return f"tools.{k}.input_schema: Field required"
        if schema.get("type") != "object":
            return f"tools.{k}.input_schema.type: Input should be 'object', got {schema.get('type')!r}"
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "tool" and choice.get("name") not in names:
        return f"tool_choice.name: tool {choice.get('name')!r} is not in tools ({sorted(names)})"
    return None


def _validate_system(body: JSON) -> str | None:
    system = body.get("system")
    if system is None or isinstance(system, str):
        return None
    if not isinstance(system, list):
        return f"system: Input should be a string or a list of text blocks, got {type(system).__name__}"
    for k, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text":
            return f"system.{k}: Input should be a text block {{'type': 'text', 'text': ...}}, got {block!r}"
        if not isinstance(block.get("text"), str) or not block["text"]:
            return f"system.{k}.text: text content blocks must be non-empty"
    return None


def _validate_block(where: str, role: str, block: Any, seen_tool_ids: set[str]) -> str | None:
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        return f"{where}: each content block must be an object with a 'type', got {block!r}"
    btype = block["type"]
    if btype not in _CONTENT_BLOCK_TYPES:
        return f"{where}: Input tag {btype!r} found using 'type' does not match any of the expected tags"
    if btype == "text" and (not isinstance(block.get("text"), str) or not block["text"]):
        return f"{where}: text content blocks must be non-empty"
    if btype == "tool_use":
        if role != "assistant":
            return f"{where}: `tool_use` blocks can only be in `assistant` messages"
        tool_id = block.get("id")
        if not isinstance(tool_id, str) or not tool_id:
            return f"{where}.id: Field required"
        if not isinstance(block.get("name"), str):
            return f"{where}.name: Field required"
        if "input" not in block:
            return f"{where}.input: Field required"
        if tool_id in seen_tool_ids:
            return f"{where}: `tool_use` ids must be unique; {tool_id!r} is used more than once"
        seen_tool_ids.add(tool_id)
    if btype == "tool_result":
        if role != "user":
            return f"{where}: `tool_result` blocks can only be in `user` messages"
        if not isinstance(block.get("tool_use_id"), str):
            return f"{where}.tool_use_id: Field required"
        content = block.get("content")
        if content is not None and not isinstance(content, str | list):
            return f"{where}.content: Input should be a string or a list of content blocks"
    return None


def _validate_messages(messages: list[Any]) -> str | None:
    pending_ids: list[str] = []  # tool_use ids of the previous assistant message
    seen_tool_ids: set[str] = set()
    for i, msg in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(msg, dict):
            return f"{where}: Input should be an object with 'role' and 'content'"
        role = msg.get("role")
        if role not in ("user", "assistant"):
            return f"{where}.role: Input should be 'user' or 'assistant', got {role!r}"
        if i == 0 and role != "user":
            return f"{where}.role: the first message must use the `user` role, got {role!r}"
        if i > 0 and role == messages[i - 1].get("role"):
            return (
                f"{where}.role: roles must alternate between `user` and `assistant`; messages.{i - 1} is also {role!r}"
            )
        content = msg.get("content")
        if not isinstance(content, str | list):
            return f"{where}.content: Input should be a string or a list of content blocks, got {content!r}"
        is_final_assistant = i == len(messages) - 1 and role == "assistant"
        if not content and not is_final_assistant:
            return f"{where}: all messages must have non-empty content except for the optional final assistant message"
        blocks = [text(content)] if isinstance(content, str) else content
        for j, block in enumerate(blocks):
            if isinstance(content, str) and not content:
                break
            error = _validate_block(f"{where}.content.{j}", role, block, seen_tool_ids)
            if error:
                return error
        result_positions = [j for j, b in enumerate(blocks) if b.get("type") == "tool_result"]
        for j in result_positions:
            tool_use_id = blocks[j]["tool_use_id"]
            if tool_use_id not in pending_ids:
                return (
                    f"{where}.content.{j}: unexpected `tool_use_id` found in `tool_result` blocks: {tool_use_id}. "
                    "Each `tool_result` block must have a corresponding `tool_use` block in the previous message."
                )
        if pending_ids:
            if result_positions != list(range(len(result_positions))):
                first_other = next(j for j in range(len(blocks)) if j not in result_positions)
                return (
                    f"{where}.content.{first_other}: in a user message answering `tool_use` blocks, all "
                    "`tool_result` blocks must come first, before any other content"
                )
            answered = {blocks[j]["tool_use_id"] for j in result_positions}
            missing = [tool_id for tool_id in pending_ids if tool_id not in answered]
            if missing:
                return (
                    f"messages.{i - 1}: `tool_use` ids were found without `tool_result` blocks immediately after: "
                    f"{', '.join(missing)}. Each `tool_use` block must have a corresponding `tool_result` block "
                    "in the next message."
                )
        pending_ids = [b["id"] for b in blocks if role == "assistant" and b.get("type") == "tool_use"]
    if pending_ids:
        return (
            f"messages.{len(messages) - 1}: `tool_use` ids were found without `tool_result` blocks immediately "
            f"after: {', '.join(pending_ids)}. Each `tool_use` block must have a corresponding `tool_result` "
            "block in the next message."
        )
    return None


def validate_request(body: Any, *, count_tokens: bool = False) -> str | None:
    """Check a Messages API request body like the real API; return the error message, or None when valid."""
    if not isinstance(body, dict):
        return f"request body must be a JSON object, got {type(body).__name__}"
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return "model: Field required"
    if not count_tokens:
        max_tokens = body.get("max_tokens")
        if max_tokens is None:
            return "max_tokens: Field required"
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            return f"max_tokens: Input should be an integer >= 1, got {max_tokens!r}"
        if body.get("stream"):
            return (
                "stream: FakeMessagesAPI does not implement streaming and the agent is not meant to stream; "
                "call messages.create without stream=True"
            )
    messages = body.get("messages")
    if messages is None:
        return "messages: Field required"
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required"
    for check in (_validate_system(body), _validate_tools(body), _validate_messages(messages)):
        if check:
            return check
    breakpoints = _count_breakpoints(body)
    if breakpoints > MAX_CACHE_BREAKPOINTS:
        return f"A maximum of {MAX_CACHE_BREAKPOINTS} blocks with cache_control may be provided. Found {breakpoints}."
    return None


# --------------------------------------------------------------------------------------------------------------
# The server


class _ScriptError(Exception):
    """A scripted reply or responder is malformed: a bug in the test, answered 500 with x-should-retry: false."""


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"  # one request per connection: no stale keep-alive sockets between tests

    def do_POST(self) -> None:
        self.server.fake._handle(self)

    def do_GET(self) -> None:
        self.server.fake._handle(self)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeMessagesAPI


class FakeMessagesAPI:
    """A scripted Anthropic Messages API on 127.0.0.1; use as a context manager or call `start()`/`stop()`."""

    message = staticmethod(message)
    text = staticmethod(text)
    tool_use = staticmethod(tool_use)

    def __init__(
        self,
        *,
        responder: Responder | None = None,
        strict_tools: bool = False,
        min_cacheable_tokens: int = 0,
        cache_lookback_blocks: int = 20,
    ) -> None:
        self.responder = responder
        self.strict_tools = strict_tools
        self.cache = PromptCacheSimulator(
            min_cacheable_tokens=min_cacheable_tokens, lookback_blocks=cache_lookback_blocks
        )
        self.requests: list[RecordedRequest] = []
        self.script_errors: list[str] = []
        self._script: deque[_ScriptItem] = deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._counter = 0

    # ---- lifecycle

    def start(self) -> Self:
        """Bind a free port on 127.0.0.1 and serve in a background thread."""
        if self._server is not None:
            raise RuntimeError(f"FakeMessagesAPI is already serving at {self.base_url}; call stop() first")
        self._stopping.clear()
        server = _Server(("127.0.0.1", 0), _Handler)
        server.fake = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-messages-api", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; pending delayed replies are cut short. Safe to call twice."""
        self._stopping.set()
        server, thread = self._server, self._thread
        self._server, self._thread = None, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """`http://127.0.0.1:PORT`, for `anthropic.Anthropic(base_url=...)` or `ANTHROPIC_BASE_URL`."""
        if self._server is None:
            raise RuntimeError("FakeMessagesAPI has no address yet: call start() or use it as a context manager")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def env(self, api_key: str = "test-key") -> dict[str, str]:
        """Environment variables pointing the SDK at this server (for monkeypatch.setenv)."""
        return {"ANTHROPIC_BASE_URL": self.base_url, "ANTHROPIC_API_KEY": api_key}

    # ---- scripting

    def enqueue(self, *replies: Reply) -> None:
        """Queue assistant turns: message dicts (see `message()`) or callables `(request body) -> message dict`."""
        for reply in replies:
            if not callable(reply):
                _check_reply_shape(reply)
        with self._lock:
            self._script.extend(replies)

    def enqueue_error(self, status: int, error_type: str, message: str, headers: dict[str, str] | None = None) -> None:
        """Queue an API error such as (529, 'overloaded_error', 'Overloaded'); see `error_reply()` for headers."""
        with self._lock:
            self._script.append(error_reply(status, error_type, message, headers))

    def enqueue_delay(self, seconds: float, reply: Reply | None = None) -> None:
        """Queue a reply sent only after `seconds` (at most MAX_DELAY_S), to drive client timeouts.

        The delayed request consumes this item alone: a retry by the SDK gets the next item.
        """
        if not 0 <= seconds <= MAX_DELAY_S:
            raise ValueError(f"enqueue_delay({seconds}): delay must be between 0 and {MAX_DELAY_S} s")
        if reply is not None and not callable(reply):
            _check_reply_shape(reply)
        with self._lock:
            self._script.append(_Delay(seconds, reply))

    def enqueue_disconnect(self) -> None:
        """Queue a dropped connection: the next request is read and the socket closed without a reply."""
        with self._lock:
            self._script.append(_Disconnect())

    @property
    def remaining(self) -> int:
        """Number of scripted items not yet consumed."""
        with self._lock:
            return len(self._script)

    def clear_cache(self) -> None:
        """Forget every simulated prompt-cache entry."""
        self.cache.clear()

    # ---- inspection

    @property
    def message_requests(self) -> list[RecordedRequest]:
        """The recorded requests to POST /v1/messages (excluding count_tokens and strays)."""
        return [r for r in list(self.requests) if r.path == MESSAGES_PATH]

    @property
    def last_request(self) -> RecordedRequest:
        """The most recent request of any kind."""
        if not self.requests:
            raise AssertionError("FakeMessagesAPI has received no request yet")
        return self.requests[-1]

    def tool_results(self, i: int = -1) -> list[ToolResult]:
        """The tool_result blocks of the last user message of `requests[i]`, content parsed as JSON if possible."""
        try:
            body = self.requests[i].body
        except IndexError:
            raise AssertionError(f"tool_results({i}): only {len(self.requests)} requests were received") from None
        users = [m for m in (body or {}).get("messages") or [] if m.get("role") == "user"]
        if not users or isinstance(users[-1].get("content"), str):
            return []
        return [
            ToolResult(b["tool_use_id"], _parse_result_content(b.get("content")), bool(b.get("is_error", False)))
            for b in users[-1]["content"]
            if isinstance(b, dict) and b.get("type") == "tool_result"
        ]

    def total_usage(self) -> dict[str, int]:
        """Sum of the four usage counters over every successful /v1/messages reply."""
        totals = dict.fromkeys(_USAGE_FIELDS, 0)
        for record in self.message_requests:
            if record.status == 200 and record.response:
                for key in _USAGE_FIELDS:
                    totals[key] += int(record.response["usage"].get(key) or 0)
        return totals

    # ---- request handling (server threads)

    def _next_id(self, prefix: str) -> str:
        with self._lock:
            self._counter += 1
            return f"{prefix}_fake{self._counter:04d}{uuid.uuid4().hex[:12]}"

    def _handle(self, handler: _Handler) -> None:
        split = urlsplit(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length > 0 else b""
        parse_error = None
        try:
            body = json.loads(raw) if raw else None
        except ValueError as exc:
            body, parse_error = None, f"request body is not valid JSON: {exc}"
        record = RecordedRequest(
            method=handler.command,
            path=split.path,
            query=split.query,
            headers={k.lower(): v for k, v in handler.headers.items()},
            body=body,
        )
        with self._lock:
            self.requests.append(record)

        if handler.command != "POST" or split.path not in (MESSAGES_PATH, COUNT_TOKENS_PATH):
            message_text = (
                f"FakeMessagesAPI serves POST {MESSAGES_PATH} and POST {COUNT_TOKENS_PATH}, "
                f"not {handler.command} {split.path}"
            )
            return self._send_error(handler, record, ErrorReply(404, "not_found_error", message_text))
        if not record.headers.get("authorization") and not record.headers.get("x-api-key"):
            message_text = "no API key: send `x-api-key` or `Authorization: Bearer ...` (set ANTHROPIC_API_KEY)"
            return self._send_error(handler, record, ErrorReply(401, "authentication_error", message_text))
        is_count = split.path == COUNT_TOKENS_PATH
        invalid = parse_error or validate_request(body, count_tokens=is_count)
        if invalid:
            return self._send_error(handler, record, ErrorReply(400, "invalid_request_error", invalid))
        if is_count:
            usage = self.cache.measure(body, write=False)
            total = usage.input_tokens + usage.cache_creation_input_tokens + usage.cache_read_input_tokens
            return self._send(handler, record, 200, {"input_tokens": total})

        with self._lock:
            item: _ScriptItem | None = self._script.popleft() if self._script else None
        if isinstance(item, _Disconnect):
            record.status = 0
            handler.close_connection = True
            return None
        if isinstance(item, _Delay):
            self._stopping.wait(item.seconds)
            item = item.reply if item.reply is not None else message([DELAYED_REPLY_TEXT])
        if isinstance(item, ErrorReply):
            return self._send_error(handler, record, item)
        try:
            reply = self._build_reply(item, body)
        except _ScriptError as exc:
            self.script_errors.append(str(exc))
            error = ErrorReply(500, "api_error", f"FakeMessagesAPI script error: {exc}", {"x-should-retry": "false"})
            return self._send_error(handler, record, error)
        if isinstance(reply, ErrorReply):
            return self._send_error(handler, record, reply)
        return self._send(handler, record, 200, reply)

    def _build_reply(self, item: Reply | None, body: JSON) -> JSON | ErrorReply:
        if item is None:
            item = self.responder if self.responder is not None else message([SCRIPT_FINISHED_TEXT])
        if callable(item):
            try:
                produced = item(copy.deepcopy(body))
            except Exception as exc:
                raise _ScriptError(f"responder {item!r} raised {type(exc).__name__}: {exc}") from exc
            if isinstance(produced, ErrorReply):
                return produced
            item = produced
        try:
            _check_reply_shape(item)
        except ValueError as exc:
            raise _ScriptError(str(exc)) from exc
        reply = copy.deepcopy(item)
        content = reply["content"]
        if self.strict_tools:
            known = {t.get("name") for t in body.get("tools") or []}
            unknown = [b["name"] for b in content if b.get("type") == "tool_use" and b["name"] not in known]
            if unknown:
                raise _ScriptError(
                    f"scripted tool_use names {unknown} are not among the request's tools {sorted(known)}"
                )
        has_tool_use = any(b.get("type") == "tool_use" for b in content)
        cache = self.cache.measure(body, write=True)
        usage: JSON
        if reply.get("usage") is not None:
            usage = {**dict.fromkeys(_USAGE_FIELDS, 0), **reply["usage"]}
        else:
            usage = {
                "input_tokens": cache.input_tokens,
                "output_tokens": estimate_tokens(content),
                "cache_creation_input_tokens": cache.cache_creation_input_tokens,
                "cache_read_input_tokens": cache.cache_read_input_tokens,
                "cache_creation": {
                    "ephemeral_5m_input_tokens": cache.ephemeral_5m_input_tokens,
                    "ephemeral_1h_input_tokens": cache.ephemeral_1h_input_tokens,
                },
                "service_tier": "standard",
            }
        return {
            "id": reply.get("id") or self._next_id("msg"),
            "type": "message",
            "role": "assistant",
            "model": reply.get("model") or body["model"],
            "content": content,
            "stop_reason": reply.get("stop_reason") or ("tool_use" if has_tool_use else "end_turn"),
            "stop_sequence": reply.get("stop_sequence"),
            "usage": usage,
        }

    def _send_error(self, handler: _Handler, record: RecordedRequest, error: ErrorReply) -> None:
        payload = {"type": "error", "error": {"type": error.error_type, "message": error.message}}
        self._send(handler, record, error.status, payload, error.headers)

    def _send(
        self,
        handler: _Handler,
        record: RecordedRequest,
        status: int,
        payload: JSON,
        headers: dict[str, str] | None = None,
    ) -> None:
        request_id = self._next_id("req")
        if status != 200:
            payload = {**payload, "request_id": request_id}
        record.status, record.response = status, payload
        data = json.dumps(payload).encode()
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            handler.send_header("request-id", request_id)
            for name, value in (headers or {}).items():
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up first (its timeout); nothing left to tell it


def _check_reply_shape(reply: Any) -> None:
    """Raise ValueError when a scripted reply is not a message dict with well-formed content blocks."""
    if not isinstance(reply, dict) or not isinstance(reply.get("content"), list):
        raise ValueError(f"a scripted reply must be a dict with a 'content' list (see message()), got {reply!r}")
    for k, block in enumerate(reply["content"]):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise ValueError(f"scripted reply content[{k}] must be a dict with a 'type', got {block!r}")
        if block["type"] == "tool_use" and not all(key in block for key in ("id", "name", "input")):
            raise ValueError(f"scripted reply content[{k}] is a tool_use without id/name/input (use tool_use())")
        if block["type"] == "text" and not isinstance(block.get("text"), str):
            raise ValueError(f"scripted reply content[{k}] is a text block without a 'text' string (use text())")


def _parse_result_content(content: Any) -> Any:
    is_single_block = isinstance(content, list) and len(content) == 1 and isinstance(content[0], dict)
    if is_single_block and content[0].get("type") == "text":
        content = content[0].get("text")
    if isinstance(content, str):
        try:
            return json.loads(content)
        except ValueError:
            return content
    return content
