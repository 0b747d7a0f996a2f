"""The fake Messages API driven by the real anthropic SDK over loopback HTTP."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest
from anthropic.types import TextBlock, ToolUseBlock

from tests.fakes.messages_api import (
    SCRIPT_FINISHED_TEXT,
    FakeMessagesAPI,
    ToolResult,
    error_reply,
    estimate_tokens,
    message,
    text,
    tool_use,
)

MODEL = "claude-sonnet-4-6"
QUOTE_TOOL = {
    "name": "get_quote",
    "description": "Latest quote for one HKEX symbol.",
    "input_schema": {"type": "object", "properties": {"symbol": {"type": "string"}}, "required": ["symbol"]},
}
SYSTEM_PROMPT = "You trade HKEX stocks. " * 40


@pytest.fixture
def fake() -> Iterator[FakeMessagesAPI]:
    with FakeMessagesAPI() as server:
        yield server


def make_client(fake: FakeMessagesAPI, *, max_retries: int = 0, timeout: float = 30.0) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key="test-key", base_url=fake.base_url, max_retries=max_retries, timeout=timeout)


def tool_turn(tool_id: str, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A conversation where the assistant called get_quote once and the user turn holds `results`."""
    return [
        {"role": "user", "content": "Check 700."},
        {"role": "assistant", "content": [tool_use("get_quote", {"symbol": "HK.00700"}, id=tool_id)]},
        {"role": "user", "content": results},
    ]


def raw_post(fake: FakeMessagesAPI, path: str, body: Any, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """POST without the SDK, to control headers exactly."""
    request = urllib.request.Request(
        fake.base_url + path, data=json.dumps(body).encode(), headers={"content-type": "application/json", **headers}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_scripted_tool_use_is_parsed_by_the_sdk_into_a_tool_use_block(fake: FakeMessagesAPI) -> None:
    fake.enqueue(message([text("Looking."), tool_use("get_quote", {"symbol": "HK.00700"}, id="toolu_1")]))

    reply = make_client(fake).messages.create(
        model=MODEL, max_tokens=256, tools=[QUOTE_TOOL], messages=[{"role": "user", "content": "Check 700."}]
    )

    assert isinstance(reply.content[0], TextBlock)
    block = reply.content[1]
    assert isinstance(block, ToolUseBlock)
    assert (block.id, block.name, block.input) == ("toolu_1", "get_quote", {"symbol": "HK.00700"})
    assert reply.stop_reason == "tool_use"
    assert reply.model == MODEL
    assert reply.id.startswith("msg_")
    assert reply.usage.input_tokens > 0 and reply.usage.output_tokens > 0
    recorded = fake.last_request
    assert recorded.headers["authorization"] == "Bearer test-key"
    assert recorded.body["tools"] == [QUOTE_TOOL]


def test_a_tool_input_that_is_not_an_object_reaches_the_caller_as_a_string(fake: FakeMessagesAPI) -> None:
    fake.enqueue(message([tool_use("get_quote", '{"symbol": "HK.00700"', id="toolu_bad")]))

    reply = make_client(fake).messages.create(
        model=MODEL, max_tokens=256, tools=[QUOTE_TOOL], messages=[{"role": "user", "content": "Check 700."}]
    )

    assert reply.content[0].input == '{"symbol": "HK.00700"'


def test_the_sdk_retries_an_overloaded_error_and_then_succeeds(fake: FakeMessagesAPI) -> None:
    fake.enqueue_error(529, "overloaded_error", "Overloaded")
    fake.enqueue(message(["Recovered."]))

    reply = make_client(fake, max_retries=2).messages.create(
        model=MODEL, max_tokens=64, messages=[{"role": "user", "content": "Hi"}]
    )

    assert reply.content[0].text == "Recovered."
    assert [r.status for r in fake.requests] == [529, 200]
    assert [r.headers["x-stainless-retry-count"] for r in fake.requests] == ["0", "1"]


def test_an_error_marked_not_retryable_reaches_the_caller_as_the_matching_sdk_error(fake: FakeMessagesAPI) -> None:
    fake.enqueue_error(429, "rate_limit_error", "slow down", headers={"x-should-retry": "false"})

    with pytest.raises(anthropic.RateLimitError, match="slow down"):
        make_client(fake, max_retries=2).messages.create(
            model=MODEL, max_tokens=64, messages=[{"role": "user", "content": "Hi"}]
        )
    assert len(fake.requests) == 1


def test_a_tool_use_without_its_tool_result_is_rejected_with_bad_request(fake: FakeMessagesAPI) -> None:
    fake.enqueue(message(["never sent"]))
    messages = tool_turn("toolu_1", [text("here is something else")])

    with pytest.raises(anthropic.BadRequestError, match=r"messages\.1: `tool_use` ids were found without .*toolu_1"):
        make_client(fake).messages.create(model=MODEL, max_tokens=64, tools=[QUOTE_TOOL], messages=messages)
    assert fake.remaining == 1  # a rejected request consumes nothing from the script


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        # the conversation must open with the user
        ([{"role": "assistant", "content": "Hello"}], r"messages\.0\.role: the first message must use the `user`"),
        # two user turns in a row
        (
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            r"messages\.1\.role: roles must alternate",
        ),
        # a tool_result after other content in the answering message
        (
            tool_turn("toolu_1", [text("note"), {"type": "tool_result", "tool_use_id": "toolu_1", "content": "{}"}]),
            r"messages\.2\.content\.0: .*`tool_result` blocks must come first",
        ),
        # a tool_result answering an id the assistant never used
        (
            tool_turn("toolu_1", [{"type": "tool_result", "tool_use_id": "toolu_other", "content": "{}"}]),
            r"unexpected `tool_use_id` found in `tool_result` blocks: toolu_other",
        ),
        # an empty text block
        ([{"role": "user", "content": [text("")]}], r"text content blocks must be non-empty"),
    ],
)
def test_malformed_conversations_are_rejected_like_the_real_api(
    fake: FakeMessagesAPI, messages: list[dict[str, Any]], expected: str
) -> None:
    with pytest.raises(anthropic.BadRequestError, match=expected):
        make_client(fake).messages.create(model=MODEL, max_tokens=64, tools=[QUOTE_TOOL], messages=messages)


def test_tool_results_exposes_the_answers_with_json_content_parsed(fake: FakeMessagesAPI) -> None:
    results = [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": '{"price": "312.40"}'},
        {"type": "tool_result", "tool_use_id": "toolu_2", "content": [text("not json")], "is_error": True},
    ]
    messages = [
        {"role": "user", "content": "Check 700 and 5."},
        {
            "role": "assistant",
            "content": [
                tool_use("get_quote", {"symbol": "HK.00700"}, id="toolu_1"),
                tool_use("get_quote", {"symbol": "HK.00005"}, id="toolu_2"),
            ],
        },
        {"role": "user", "content": results},
    ]

    reply = make_client(fake).messages.create(model=MODEL, max_tokens=64, tools=[QUOTE_TOOL], messages=messages)

    assert reply.content[0].text == SCRIPT_FINISHED_TEXT
    assert reply.stop_reason == "end_turn"
    assert fake.tool_results(0) == [
        ToolResult("toolu_1", {"price": "312.40"}, False),
        ToolResult("toolu_2", "not json", True),
    ]


def test_a_repeated_cached_prefix_is_read_from_the_cache(fake: FakeMessagesAPI) -> None:
    client = make_client(fake)
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 64,
        "tools": [{**QUOTE_TOOL, "cache_control": {"type": "ephemeral"}}],
        "system": [{"type": "text", "text": SYSTEM_PROMPT, "cache_control": {"type": "ephemeral"}}],
    }

    first = client.messages.create(**kwargs, messages=[{"role": "user", "content": "Cycle 1 context."}]).usage
    second = client.messages.create(**kwargs, messages=[{"role": "user", "content": "Cycle 2, other context."}]).usage

    prefix = estimate_tokens(QUOTE_TOOL) + estimate_tokens(text(SYSTEM_PROMPT))
    assert (first.cache_creation_input_tokens, first.cache_read_input_tokens) == (prefix, 0)
    assert (second.cache_creation_input_tokens, second.cache_read_input_tokens) == (0, prefix)
    assert second.input_tokens == estimate_tokens(text("Cycle 2, other context."))


def test_automatic_caching_reads_the_previous_turn_of_a_growing_conversation(fake: FakeMessagesAPI) -> None:
    client = make_client(fake)
    fake.enqueue(message([tool_use("get_quote", {"symbol": "HK.00700"}, id="toolu_1")]))
    turn1 = [{"role": "user", "content": "Cycle context."}]
    first = client.messages.create(
        model=MODEL, max_tokens=64, system=SYSTEM_PROMPT, messages=turn1, cache_control={"type": "ephemeral"}
    )
    turn2 = [
        *turn1,
        {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": '{"p": 1}'}]},
    ]

    second = client.messages.create(
        model=MODEL, max_tokens=64, system=SYSTEM_PROMPT, messages=turn2, cache_control={"type": "ephemeral"}
    )

    assert fake.last_request.body["cache_control"] == {"type": "ephemeral"}
    whole_first = first.usage.cache_creation_input_tokens
    assert first.usage.cache_read_input_tokens == 0 and first.usage.input_tokens == 0
    assert second.usage.cache_read_input_tokens == whole_first
    assert second.usage.cache_creation_input_tokens > 0
    assert second.usage.input_tokens == 0
    assert fake.total_usage()["cache_read_input_tokens"] == whole_first


def test_a_delay_longer_than_the_client_timeout_raises_api_timeout_error(fake: FakeMessagesAPI) -> None:
    fake.enqueue_delay(10)  # cut short by stop() at fixture teardown

    with pytest.raises(anthropic.APITimeoutError):
        make_client(fake, timeout=0.5).messages.create(
            model=MODEL, max_tokens=64, messages=[{"role": "user", "content": "Hi"}]
        )
    assert len(fake.requests) == 1


def test_a_dropped_connection_raises_api_connection_error(fake: FakeMessagesAPI) -> None:
    fake.enqueue_disconnect()

    with pytest.raises(anthropic.APIConnectionError):
        make_client(fake).messages.create(model=MODEL, max_tokens=64, messages=[{"role": "user", "content": "Hi"}])


def test_a_responder_answers_once_the_script_is_exhausted() -> None:
    def echo(body: dict[str, Any]) -> dict[str, Any]:
        return message([f"you said {body['messages'][-1]['content']}"], usage={"input_tokens": 7, "output_tokens": 3})

    with FakeMessagesAPI(responder=echo) as fake:
        reply = make_client(fake).messages.create(
            model=MODEL, max_tokens=64, messages=[{"role": "user", "content": "ping"}]
        )

    assert reply.content[0].text == "you said ping"
    assert (reply.usage.input_tokens, reply.usage.output_tokens, reply.usage.cache_read_input_tokens) == (7, 3, 0)


def test_a_responder_can_answer_with_an_error() -> None:
    with (
        FakeMessagesAPI(responder=lambda body: error_reply(400, "invalid_request_error", "prompt is too long")) as fake,
        pytest.raises(anthropic.BadRequestError, match="prompt is too long"),
    ):
        make_client(fake).messages.create(model=MODEL, max_tokens=64, messages=[{"role": "user", "content": "x"}])


def test_strict_tools_rejects_a_scripted_call_to_a_tool_the_request_did_not_offer() -> None:
    with FakeMessagesAPI(strict_tools=True) as fake:
        fake.enqueue(message([tool_use("place_order", {"symbol": "HK.00700"})]))
        with pytest.raises(anthropic.InternalServerError, match="not among the request's tools"):
            make_client(fake, max_retries=2).messages.create(
                model=MODEL, max_tokens=64, tools=[QUOTE_TOOL], messages=[{"role": "user", "content": "x"}]
            )

    assert len(fake.requests) == 1  # x-should-retry: false stops the SDK's retries
    assert "place_order" in fake.script_errors[0]


def test_stream_requests_are_refused(fake: FakeMessagesAPI) -> None:
    with pytest.raises(anthropic.BadRequestError, match="does not implement streaming"):
        make_client(fake).messages.create(
            model=MODEL, max_tokens=64, stream=True, messages=[{"role": "user", "content": "x"}]
        )


def test_query_strings_and_count_tokens_are_served(fake: FakeMessagesAPI) -> None:
    body = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]}
    fake.enqueue(message(["beta ok"]))

    status, payload = raw_post(fake, "/v1/messages?beta=true", body, {"x-api-key": "k"})
    count = make_client(fake).messages.count_tokens(
        model=MODEL, system=SYSTEM_PROMPT, messages=[{"role": "user", "content": "x"}]
    )

    assert (status, payload["content"]) == (200, [text("beta ok")])
    assert (fake.requests[0].path, fake.requests[0].query) == ("/v1/messages", "beta=true")
    assert fake.requests[1].path == "/v1/messages/count_tokens"
    assert count.input_tokens == estimate_tokens(text(SYSTEM_PROMPT)) + estimate_tokens(text("x"))


def test_either_api_key_header_is_accepted_and_none_is_refused(fake: FakeMessagesAPI) -> None:
    body = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]}

    assert raw_post(fake, "/v1/messages", body, {"x-api-key": "k"})[0] == 200
    assert raw_post(fake, "/v1/messages", body, {"authorization": "Bearer k"})[0] == 200
    status, payload = raw_post(fake, "/v1/messages", body, {})
    assert status == 401
    assert payload["error"]["type"] == "authentication_error"
    status, payload = raw_post(fake, "/v1/messages", {"model": MODEL, "messages": body["messages"]}, {"x-api-key": "k"})
    assert (status, payload["error"]["message"]) == (400, "max_tokens: Field required")
