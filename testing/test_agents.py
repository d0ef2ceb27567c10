"""The agents' surface: Anthropic Messages and OpenAI Responses through their SDKs, and Claude Code and Codex headless.

Run everything: python -m pytest -q test_lem_serve.py testing/
"""

from __future__ import annotations

import dataclasses
import functools
import http.client
import json
import logging
import os
import re
import socket
from pathlib import Path

import pytest

import lem_serve
from testing.tiny_model import (CHAT_TEMPLATE, THINK_END, THINK_START, THINKING_TEMPLATE,
                                SPECIAL_TOKENS, TOOL_TOKENS, build_parrot_model, build_tiny_model, with_chat_template,
                                with_context_length)

from testing.checks import (
    ADD, AGENT_ASK, AGENT_KEY, AGENT_MAX_TOKENS, AGENT_TIMEOUT, ANSWER, ASK_WEATHER, CODEX_CONFIG,
    DIALECTS, DIRECT, ENDPOINTS, FAMILIES, FAMILY_EXPECTED, FAMILY_MARKERS, HELLO, LONG_BUDGET,
    LONG_CONTEXT, PERSON, QWEN_CALL, ROOT, Reply, TEMPLATES, THINKING, WEATHER, agent_cli, answer,
    ask, assert_anthropic_error, assert_only_successes, assert_openai_error, assert_valid, body_for,
    connect, endless, family_body, hang_up, health, metric, mlx_reference, open_stream, path_of,
    post, read_first_text_event, reply_parts, request, run_agent, running_server, said,
    schema_format, scrape, stream, streamed_parts, streamed_text, text_of, wait_until,
)

pytestmark = pytest.mark.agents


# ---------------------------------------------------------------------------
# The agents' dialects: Anthropic Messages (/v1/messages) and OpenAI Responses (/v1/responses)
# ---------------------------------------------------------------------------

@pytest.fixture
def anthropic_client(server):
    anthropic = pytest.importorskip("anthropic")
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def as_anthropic_tool(tool: dict) -> dict:
    """A chat tool (WEATHER, ADD) as Anthropic declares tools."""
    function = tool["function"]
    described = {"description": function["description"]} if "description" in function else {}
    return {"name": function["name"], **described, "input_schema": function["parameters"]}


def as_responses_tool(tool: dict) -> dict:
    """A chat tool (WEATHER, ADD) as the Responses API declares tools."""
    return {"type": "function", **tool["function"]}


def named_events(server, endpoint: str, **fields) -> list[tuple[str, dict | str]]:
    """Stream a dialect request to its end: (event name, JSON data) pairs, and (":", line) for comments."""
    conn = connect(server)
    conn.request("POST", path_of(endpoint), json.dumps(body_for(endpoint, stream=True, **fields)))
    response = conn.getresponse()
    assert response.status == 200, response.read()[:300]
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events, name = [], None
    try:
        for line in iter(response.readline, b""):
            line = line.decode().rstrip("\n")
            if line.startswith(":"):
                events.append((":", line))
            elif line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[len("data: "):])))
                name = None
    finally:
        conn.close()
    return events


def data_of(events: list[tuple]) -> list[dict]:
    """The JSON payloads of named events, comments left out."""
    return [data for name, data in events if name != ":"]


def chat_prompt(model, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    return model.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True)

TERSE = "You are terse."

GREEDY = {"temperature": 0}  # the anthropic SDK (2.x) no longer takes sampling parameters; the API still does


def test_messages_greedy_equals_mlx_lm_generate(server, model, anthropic_client):
    system = [{"type": "text", "text": TERSE, "cache_control": {"type": "ephemeral"}}]
    message = anthropic_client.messages.create(
        model="claude-any", max_tokens=30, system=system, messages=HELLO, metadata={"user_id": "u"},
        extra_headers={"anthropic-beta": "interleaved-thinking-2025-05-14"}, extra_query={"beta": "true"},
        thinking={"type": "adaptive"}, service_tier="auto", output_config={"effort": "low"},
        extra_body={"temperature": 0, "context_management": {"edits": []}})
    prompt = chat_prompt(model, [{"role": "system", "content": TERSE}, *HELLO])
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == mlx_reference(model, prompt, 30)
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == "tiny" and message.stop_reason == "max_tokens" and message.stop_sequence is None
    usage = message.usage
    assert usage.input_tokens + usage.cache_read_input_tokens == len(prompt) and usage.cache_creation_input_tokens == 0
    assert usage.output_tokens == 30


def test_responses_greedy_equals_mlx_lm_generate(server, model, openai_client):
    response = openai_client.responses.create(model="tiny", instructions=TERSE, input=HELLO, max_output_tokens=30,
                                              temperature=0, store=False, include=["reasoning.encrypted_content"],
                                              reasoning={"summary": "auto"}, prompt_cache_key="k", truncation="auto",
                                              extra_body={"client_metadata": {"a": "b"}})
    prompt = chat_prompt(model, [{"role": "system", "content": TERSE}, *HELLO])
    assert response.output_text == mlx_reference(model, prompt, 30)
    assert response.id.startswith("resp_") and response.object == "response" and response.model == "tiny"
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    (item,) = response.output
    assert item.type == "message" and item.role == "assistant" and item.status == "incomplete" and item.id.startswith("msg_")
    usage = response.usage
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (len(prompt), 30, len(prompt) + 30)
    assert 0 <= usage.input_tokens_details.cached_tokens < len(prompt)


def test_messages_stream_events_come_in_anthropic_order(server):
    whole = post(server, "messages", max_tokens=12, temperature=0)
    events = named_events(server, "messages", max_tokens=12, temperature=0)
    names = [name for name, _ in events if name not in (":", "ping")]
    assert [name for name, _ in events][:2] == ["message_start", "ping"]
    assert names[:2] == ["message_start", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[2:-3]) == {"content_block_delta"}
    assert all(data["type"] == name for name, data in events if name != ":")
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["id"].startswith("msg_")
    assert all(data["index"] == 0 for name, data in events if name.startswith("content_block"))
    delta = next(data for name, data in events if name == "message_delta")
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    usage = delta["usage"]
    assert usage["output_tokens"] == 12
    assert usage["input_tokens"] + usage["cache_read_input_tokens"] == whole["usage"]["input_tokens"] + \
        whole["usage"]["cache_read_input_tokens"]
    assert streamed_text("messages", data_of(events)) == text_of("messages", whole)


def test_responses_stream_events_come_in_order_with_sequence_numbers(server):
    whole = post(server, "responses", max_tokens=12, temperature=0)
    events = [(name, data) for name, data in named_events(server, "responses", max_tokens=12, temperature=0)
              if name != ":"]
    names = [name for name, _ in events]
    assert names[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert names[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert set(names[4:-4]) == {"response.output_text.delta"}
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    assert all(data["type"] == name for name, data in events)
    created, final = events[0][1]["response"], events[-1][1]["response"]
    assert created["status"] == "in_progress" and created["output"] == [] and created["usage"] is None
    assert final["status"] == "incomplete" and final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["usage"]["output_tokens"] == 12 and final["id"] == created["id"]
    item_id = events[2][1]["item"]["id"]
    assert all(data["item_id"] == item_id for _, data in events[3:-2])
    assert streamed_text("responses", data_of(events)) == text_of("responses", final) == text_of("responses", whole)


def test_sdk_streams_equal_non_streamed(anthropic_client, openai_client):
    whole = anthropic_client.messages.create(model="m", max_tokens=20, extra_body=GREEDY, messages=HELLO)
    with anthropic_client.messages.stream(model="m", max_tokens=20, extra_body=GREEDY, messages=HELLO) as stream_:
        pieces = list(stream_.text_stream)
        final = stream_.get_final_message()
    assert "".join(pieces) == final.content[0].text == whole.content[0].text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 20
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == \
        whole.usage.input_tokens + whole.usage.cache_read_input_tokens
    plain = openai_client.responses.create(model="tiny", input=HELLO, max_output_tokens=20, temperature=0)
    events = list(openai_client.responses.create(model="tiny", input=HELLO, max_output_tokens=20, temperature=0,
                                                 stream=True))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-1].response.output_text == plain.output_text
    assert events[-1].type == "response.incomplete" and events[-1].response.usage.output_tokens == 20


@pytest.mark.parametrize("streaming", [False, True])
def test_messages_stop_sequence_cuts_text_and_is_reported(anthropic_client, streaming):
    full = anthropic_client.messages.create(model="m", max_tokens=60, extra_body=GREEDY, messages=HELLO).content[0].text
    assert len(full) > 20, full
    stop = full[12:15]
    fields = dict(model="m", max_tokens=60, extra_body=GREEDY, messages=HELLO, stop_sequences=["never-seen-zz", stop])
    if streaming:
        with anthropic_client.messages.stream(**fields) as stream_:
            message = stream_.get_final_message()
    else:
        message = anthropic_client.messages.create(**fields)
    assert message.content[0].text == full[:full.index(stop)]
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", stop)


def tool_loop_messages(call_id: str, is_error: bool) -> list[dict]:
    return [*ASK_WEATHER,
            {"role": "assistant", "content": [{"type": "text", "text": "Let me add."},
                                              {"type": "tool_use", "id": call_id, "name": "add", "input": {"a": 1, "b": 2}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call_id, "is_error": is_error,
                                          "content": [{"type": "text", "text": "3"}]},
                                         {"type": "text", "text": "Thanks. And the weather?"}]}]


def test_count_tokens_is_what_a_create_reports(make_server, model):
    anthropic = pytest.importorskip("anthropic")
    tools = [as_anthropic_tool(WEATHER), as_anthropic_tool(ADD)]
    fields = dict(model="m", system="Be brief.", tools=tools, messages=tool_loop_messages("toolu_1", False))
    for cache in (0, 1 << 30):
        srv = make_server(prompt_cache_bytes=cache)
        client = anthropic.Anthropic(base_url=srv.url, api_key="unused", max_retries=0, timeout=60)
        counted = client.messages.count_tokens(**fields).input_tokens
        for _ in range(2):  # the second one reads the cache, when there is one
            usage = client.messages.create(max_tokens=2, **fields).usage
            assert usage.input_tokens + usage.cache_read_input_tokens == counted
        assert (usage.cache_read_input_tokens == counted - 1) if cache else (usage.input_tokens == counted)
    chat = [{"role": "system", "content": "Be brief."}, *ASK_WEATHER,
            {"role": "assistant", "content": "Let me add.", "tool_calls": [
                {"id": "toolu_1", "type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "3"},
            {"role": "user", "content": "Thanks. And the weather?"}]
    assert counted == len(chat_prompt(model, chat, [WEATHER, ADD]))
    failed = client.messages.count_tokens(**{**fields, "messages": tool_loop_messages("toolu_1", True)}).input_tokens
    assert failed > counted  # an error result is marked as one


def test_messages_forced_tool_use_round_trip(anthropic_client):
    tools = [as_anthropic_tool(WEATHER), as_anthropic_tool(ADD),
             {"type": "web_search_20250305", "name": "web_search", "max_uses": 2}]  # a server tool: skipped
    message = anthropic_client.messages.create(model="m", max_tokens=120, tools=tools,
                                               tool_choice={"type": "tool", "name": "add"}, messages=ASK_WEATHER)
    (call,) = message.content
    assert call.type == "tool_use" and call.name == "add" and call.id
    assert message.stop_reason == "tool_use"
    assert_valid(json.dumps(call.input), ADD["function"]["parameters"])
    history = [*ASK_WEATHER, {"role": "assistant", "content": [call.model_dump(exclude_none=True)]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "42"}]}]
    answer = anthropic_client.messages.create(model="m", max_tokens=5, tools=tools, messages=history)
    assert answer.stop_reason == "max_tokens" and answer.content[0].text
    total = lambda usage: usage.input_tokens + usage.cache_read_input_tokens  # noqa: E731
    assert total(answer.usage) > total(message.usage)


def test_messages_required_tool_use_streams_input_json(anthropic_client):
    tools = [as_anthropic_tool(WEATHER), as_anthropic_tool(ADD)]
    for seed_prompt in ("Weather in Paris?", "Add two numbers"):
        with anthropic_client.messages.stream(model="m", max_tokens=120, tools=tools,
                                              tool_choice={"type": "any"},
                                              messages=[{"role": "user", "content": seed_prompt}]) as stream_:
            kinds = [event.type for event in stream_]
            message = stream_.get_final_message()
        (call,) = message.content
        schema = (WEATHER if call.name == "get_weather" else ADD)["function"]["parameters"]
        assert call.type == "tool_use" and message.stop_reason == "tool_use"
        assert_valid(json.dumps(call.input), schema)
        assert "input_json" in kinds and "text" not in kinds


def test_responses_forced_function_call_round_trip(openai_client):
    tools = [as_responses_tool(WEATHER), as_responses_tool(ADD), {"type": "web_search"},
             {"type": "namespace", "name": "agents", "description": "d", "tools": [as_responses_tool(WEATHER)]},
             {"type": "custom", "name": "apply_patch", "description": "patch"}]  # what Codex sends; only functions serve
    response = openai_client.responses.create(model="tiny", input=ASK_WEATHER, tools=tools, max_output_tokens=120,
                                              tool_choice={"type": "function", "name": "add"}, temperature=1.0)
    (call,) = response.output
    assert call.type == "function_call" and call.name == "add" and call.call_id and call.id.startswith("fc_")
    assert response.status == "completed"
    assert_valid(call.arguments, ADD["function"]["parameters"])
    history = [{"type": "reasoning", "id": "rs_1", "summary": []}, *ASK_WEATHER, call.model_dump(exclude_none=True),
               {"type": "function_call_output", "call_id": call.call_id, "output": "42"}]
    follow = openai_client.responses.create(model="tiny", tools=tools, max_output_tokens=5, input=history)
    assert follow.status == "incomplete" and follow.output_text
    assert follow.usage.input_tokens > response.usage.input_tokens


def test_responses_required_function_call_streams_arguments(openai_client):
    tools = [as_responses_tool(WEATHER), as_responses_tool(ADD)]
    events = list(openai_client.responses.create(model="tiny", input=ASK_WEATHER, tools=tools, tool_choice="required",
                                                 max_output_tokens=120, temperature=1.0, stream=True))
    kinds = [event.type for event in events]
    added = kinds.index("response.output_item.added", kinds.index("response.in_progress"))
    deltas = [e.delta for e in events[added + 1:-3]]   # the forced call's arguments, streamed as they are written
    assert kinds[added + 1:] == ["response.function_call_arguments.delta"] * len(deltas) + [
        "response.function_call_arguments.done", "response.output_item.done", "response.completed"] and deltas
    assert "response.output_text.delta" not in kinds
    done = events[-3]
    (call,) = events[-1].response.output
    assert done.arguments == call.arguments == "".join(deltas) and done.item_id == call.id
    schema = (WEATHER if call.name == "get_weather" else ADD)["function"]["parameters"]
    assert_valid(call.arguments, schema)


def test_responses_text_format_json_schema(openai_client):
    response = openai_client.responses.create(
        model="tiny", input=HELLO, max_output_tokens=120, temperature=0,
        text={"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}})
    assert response.status == "completed", response.output_text
    assert_valid(response.output_text, PERSON)

BAD_MESSAGES_BODIES = [
    ("max_tokens missing", {"messages": HELLO}),
    ("messages missing", {"max_tokens": 5}),
    ("messages empty", {"max_tokens": 5, "messages": []}),
    ("max_tokens 0", {"max_tokens": 0, "messages": HELLO}),
    ("temperature 1.5", {"max_tokens": 5, "messages": HELLO, "temperature": 1.5}),
    ("stop_sequences string", {"max_tokens": 5, "messages": HELLO, "stop_sequences": "x"}),
    ("system number", {"max_tokens": 5, "messages": HELLO, "system": 7}),
    ("tool role", {"max_tokens": 5, "messages": [{"role": "tool", "content": "x"}]}),
    ("image block", {"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]}),
    ("document block", {"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}),
    ("tool_use from the user", {"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]}),
    ("tool_result without id", {"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "tool_result"}]}]}),
    ("prefill ending in a space", {"max_tokens": 5, "messages": [*HELLO, {"role": "assistant", "content": "Sure, "}]}),
    ("tool_choice without tools", {"max_tokens": 5, "messages": HELLO, "tool_choice": {"type": "any"}}),
    ("tool_choice unknown tool", {"max_tokens": 5, "messages": HELLO, "tools": [as_anthropic_tool(ADD)],
                                  "tool_choice": {"type": "tool", "name": "nope"}}),
    ("tool_choice shape", {"max_tokens": 5, "messages": HELLO, "tool_choice": {"type": "sometimes"}}),
    ("tool without name", {"max_tokens": 5, "messages": HELLO, "tools": [{"name": ""}]}),
]


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
@pytest.mark.parametrize("case,body", BAD_MESSAGES_BODIES, ids=[case for case, _ in BAD_MESSAGES_BODIES])
def test_bad_messages_bodies_are_anthropic_400s(server, path, case, body):
    if path.endswith("count_tokens") and case == "max_tokens missing":
        assert request(server, "POST", path, body).json() == {"input_tokens": len(chat_prompt(server.model, HELLO))}
        return
    error = assert_anthropic_error(request(server, "POST", path, body), 400, "invalid_request_error")
    if "block" in case and "tool" not in case:
        assert "text models" in error["message"]

BAD_RESPONSES_BODIES = [
    ("input missing", {}, "input"),
    ("input empty", {"input": []}, "input"),
    ("conversation", {"input": "x", "conversation": "conv_1"}, "conversation"),
    ("background", {"input": "x", "background": True}, "background"),
    ("input_image", {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}]},
     "input[0].content"),
    ("item_reference", {"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
    ("role", {"input": [{"role": "wizard", "content": "x"}]}, "input[0].role"),
    ("call output id", {"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
    ("text.format", {"input": "x", "text": {"format": {"type": "xml"}}}, "text.format"),
    ("text.format schema", {"input": "x", "text": {"format": {"type": "json_schema", "name": "s",
                                                             "schema": {"type": "object", "not": {}}}}}, "text.format"),
    ("tool_choice", {"input": "x", "tool_choice": {"type": "web_search"}}, "tool_choice"),
    ("tool_choice without tools", {"input": "x", "tool_choice": "required"}, "tool_choice"),
    ("function without name", {"input": "x", "tools": [{"type": "function", "parameters": {}}]}, "tools[0].name"),
    ("max_output_tokens", {"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ("temperature", {"input": "x", "temperature": 3}, "temperature"),
]


@pytest.mark.parametrize("case,body,param", BAD_RESPONSES_BODIES, ids=[case for case, _, _ in BAD_RESPONSES_BODIES])
def test_bad_responses_bodies_are_openai_400s(server, case, body, param):
    assert_openai_error(request(server, "POST", "/v1/responses", body), 400, param)


def post_raw(srv, path: str, body: bytes, headers: dict[str, str]) -> Reply:
    """A POST whose Content-Length may lie (a huge body announced, none sent)."""
    with socket.create_connection(srv.server_address[:2], timeout=10) as sock:
        head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": "localhost", **headers}.items())
        sock.sendall(f"POST {path} HTTP/1.1\r\n{head}\r\n".encode() + body)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return Reply(response)


def test_errors_before_the_route_come_in_the_callers_envelope(make_long_server):
    srv = make_long_server(api_key="sekret", max_requests=1, queue_timeout=0)
    assert_anthropic_error(request(srv, "POST", "/v1/messages", body_for("messages", max_tokens=2)), 401,
                           "authentication_error")
    assert_anthropic_error(request(srv, "POST", "/v1/messages/count_tokens?beta=true", {"messages": HELLO},
                                   {"x-api-key": "wrong"}), 401, "authentication_error")
    assert_openai_error(request(srv, "POST", "/v1/responses", body_for("responses"), {"x-api-key": "wrong"}), 401,
                        code="invalid_api_key")
    for headers in ({"x-api-key": "sekret"}, {"Authorization": "Bearer sekret"}):
        for endpoint in (*ENDPOINTS, *DIALECTS):
            reply = request(srv, "POST", path_of(endpoint) + "?beta=true", body_for(endpoint, max_tokens=2), headers)
            assert reply.status == 200, (endpoint, headers, reply.raw[:200])
    key = {"x-api-key": "sekret"}
    reply = request(srv, "GET", "/v1/messages", headers=key)
    assert_anthropic_error(reply, 405, "invalid_request_error")
    assert reply.headers["Allow"] == "POST"
    assert_anthropic_error(request(srv, "POST", "/v1/messages/batches", {}, key), 404, "not_found_error")
    huge = {**key, "Content-Length": str(lem_serve.MAX_BODY_BYTES + 1)}
    assert_anthropic_error(post_raw(srv, "/v1/messages", b"", huge), 413, "request_too_large")
    assert_openai_error(post_raw(srv, "/v1/responses", b"", huge), 413, code="body_too_large")
    assert_anthropic_error(request(srv, "POST", "/v1/messages", b"{oops", key), 400, "invalid_request_error")
    conn = connect(srv)
    conn.request("POST", "/v1/messages", json.dumps(body_for("messages", stream=True, **endless(srv.model, "messages"))), key)
    busy = conn.getresponse()
    read_first_text_event(busy)
    refused = request(srv, "POST", "/v1/messages", body_for("messages", max_tokens=1), key)
    assert_anthropic_error(refused, 429, "rate_limit_error")
    assert refused.headers["retry-after"] == "1"
    assert_openai_error(request(srv, "POST", "/v1/responses", body_for("responses", max_tokens=1), key), 429,
                        code="server_busy")
    hang_up(conn, busy)
    assert wait_until(lambda: health(srv)["active_requests"] == 0)


def test_dialect_max_tokens_is_clamped_not_refused(make_server, model):
    small = make_server(max_tokens=7)
    message = post(small, "messages", max_tokens=32000)
    assert message["usage"]["output_tokens"] == 7 and message["stop_reason"] == "max_tokens"
    response = post(small, "responses", max_tokens=32000)
    assert response["usage"]["output_tokens"] == 7 and response["status"] == "incomplete"
    assert response["max_output_tokens"] == 7
    srv = make_server()  # --max-tokens 4096, the whole context: the room left binds
    asking = lambda n: [{"role": "user", "content": " ".join(f"w{i}" for i in range(n))}]  # noqa: E731
    fits, too_many = 1, model.context_length  # words: the longest prompt leaving at most 6 tokens of room
    while too_many - fits > 1:
        middle = (fits + too_many) // 2
        fits, too_many = (middle, too_many) if len(chat_prompt(model, asking(middle))) <= model.context_length - 6 \
            else (fits, middle)
    prompt = len(chat_prompt(model, asking(fits)))
    message = post(srv, "messages", messages=asking(fits), max_tokens=32000)
    assert message["usage"]["output_tokens"] == model.context_length - prompt
    assert message["stop_reason"] == "max_tokens"


@pytest.mark.parametrize("endpoint", DIALECTS)
def test_dialect_stream_past_the_deadline_ends_with_an_error_event(long_model, long_model_dir, endpoint):
    with running_server(long_model, long_model_dir, timeout=1, max_tokens=LONG_CONTEXT // 2) as srv:
        events = data_of(named_events(srv, endpoint, max_tokens=LONG_CONTEXT // 2))
        last = events[-1]
        if endpoint == "messages":
            assert last == {"type": "error", "error": {"type": "timeout_error", "message": last["error"]["message"]}}
            assert "message_stop" not in [event["type"] for event in events]
        else:
            assert last["type"] == "response.failed" and last["response"]["status"] == "failed"
            assert last["response"]["error"]["code"] == "server_error" and last["response"]["usage"] is None
        assert wait_until(lambda: health(srv)["active_requests"] == 0)


def test_metrics_count_the_dialects_per_endpoint(make_server):
    srv = make_server()
    for endpoint in DIALECTS:
        first, second = post(srv, endpoint, max_tokens=3), post(srv, endpoint, max_tokens=3)
    assert request(srv, "POST", "/v1/messages/count_tokens", {"messages": HELLO}).status == 200
    assert request(srv, "POST", "/v1/messages", {"messages": HELLO}).status == 400
    assert wait_until(lambda: srv.in_flight == 0)  # counted once its last byte is out
    samples = scrape(srv)
    for endpoint in DIALECTS:
        assert metric(samples, "lem_requests_total", endpoint=path_of(endpoint), code="200") == 2
        assert metric(samples, "lem_time_to_first_token_seconds_count", endpoint=path_of(endpoint)) == 2
    assert metric(samples, "lem_requests_total", endpoint="/v1/messages/count_tokens", code="200") == 1
    assert metric(samples, "lem_requests_total", endpoint="/v1/messages", code="400") == 1
    cached = second["usage"]["input_tokens_details"]["cached_tokens"]
    assert cached == second["usage"]["input_tokens"] - 1
    assert samples["lem_cached_prompt_tokens_total", ""] >= 2 * cached  # each second request read its first's prefix

PREFILL = [*HELLO, {"role": "assistant", "content": "The answer is"}]  # a reply to continue (a prefill)


def prefill_reference(model, messages: list[dict], max_tokens: int) -> tuple[str, list[int]]:
    """What mlx_lm.generate writes after the conversation rendered up to the end of its last (assistant) text,
    found as transformers' continue_final_message finds it; and that prompt's tokens."""
    import mlx_lm
    text = model.tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    last = messages[-1]["content"]
    cut = text[:text.rindex(last) + len(last)]
    return mlx_lm.generate(model.model, model.tokenizer, cut, max_tokens=max_tokens), model.tokenizer.encode(cut)


def first_visible(text: str) -> str:
    """The first non-space character of the second half of `text` (a stop sequence that cuts it there)."""
    return next(c for c in text[len(text) // 2:] if not c.isspace())


def test_messages_prefill_continues_the_assistant_text(server, model, anthropic_client):
    expected, prompt = prefill_reference(model, PREFILL, 12)
    message = anthropic_client.messages.create(model="m", max_tokens=12, messages=PREFILL, extra_body=GREEDY)
    assert [b.type for b in message.content] == ["text"] and message.content[0].text == expected
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 12
    with anthropic_client.messages.stream(model="m", max_tokens=12, messages=PREFILL, extra_body=GREEDY) as events:
        streamed, final = "".join(events.text_stream), events.get_final_message()
    assert streamed == expected and final.content[0].text == expected
    usage = final.usage  # the second request read the first's prompt from the cache
    assert usage.cache_read_input_tokens == len(prompt) - 1 and usage.input_tokens == 1
    stop = first_visible(expected)
    cut = anthropic_client.messages.create(model="m", max_tokens=12, messages=PREFILL, stop_sequences=[stop],
                                           extra_body=GREEDY)
    assert cut.content[0].text == expected[:expected.index(stop)]
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop


@pytest.mark.parametrize("content, why", [("The answer is ", "trailing whitespace"),
                                          ("The answer is", "thinking")])
def test_messages_prefill_refused_where_anthropic_refuses_it(server, content, why):
    thinking = {"thinking": {"type": "enabled", "budget_tokens": 1024}} if why == "thinking" else {}
    reply = request(server, "POST", "/v1/messages", {"max_tokens": 2000, **thinking, "messages": [
        *HELLO, {"role": "assistant", "content": [{"type": "text", "text": content}]}]})
    assert why in assert_anthropic_error(reply, 400, "invalid_request_error")["message"]


def test_chat_prefill_continues_the_last_assistant_message(server, model, openai_client):
    expected, _ = prefill_reference(model, PREFILL, 12)
    reply = openai_client.chat.completions.create(model="tiny", messages=PREFILL, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "length"
    chunks = openai_client.chat.completions.create(model="tiny", messages=PREFILL, max_tokens=12, temperature=0,
                                                   stream=True, extra_body={"continue_final_message": True})
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    stop = first_visible(expected)
    cut = openai_client.chat.completions.create(model="tiny", messages=PREFILL, max_tokens=12, temperature=0,
                                                stop=[stop])
    assert cut.choices[0].message.content == expected[:expected.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    fresh = openai_client.chat.completions.create(model="tiny", messages=PREFILL, max_tokens=12, temperature=0,
                                                  extra_body={"add_generation_prompt": True})
    assert fresh.choices[0].message.content == mlx_reference(model, chat_prompt(model, PREFILL), 12)
    refused = request(server, "POST", "/v1/chat/completions", {"messages": HELLO, "continue_final_message": True})
    assert "last assistant message" in assert_openai_error(refused, 400, "continue_final_message")["message"]


def test_responses_prefill_continues_the_last_assistant_message(server, model, openai_client):
    expected, _ = prefill_reference(model, PREFILL, 12)
    response = openai_client.responses.create(model="tiny", input=PREFILL, max_output_tokens=12, temperature=0)
    assert response.output_text == expected and response.incomplete_details.reason == "max_output_tokens"


def test_prefill_of_a_reply_cut_while_thinking_goes_on_thinking(thinking_server):
    """A reply with only reasoning (cut while thinking) is continued inside its reasoning, however long it
    is: the thinking parrot says the rest of THINKING after its last token "Plan", then its answer."""
    cut = {"role": "assistant", "content": "", "reasoning_content": "filler words " * 30 + "\nPlan"}
    message = post(thinking_server, "chat", messages=[*HELLO, cut], max_tokens=50)["choices"][0]["message"]
    assert message["reasoning_content"] == THINKING[len("Plan"):] and message["content"] == ANSWER


def test_prefill_cuts_each_family_template_where_transformers_does(family_server):
    """The prompt of a prefill on real templates (thinking ones too) is as long as transformers'
    continue_final_message makes it: cut right after the text, no end of turn."""
    _, _, server, model = family_server
    messages = [{"role": "user", "content": "What now?"}, {"role": "assistant", "content": "The answer is"}]
    counted = request(server, "POST", "/v1/messages/count_tokens", {"messages": messages})
    assert counted.status == 200, counted.raw
    expected = model.tokenizer.apply_chat_template(messages, continue_final_message=True, enable_thinking=False)
    assert counted.json()["input_tokens"] == len(expected)
    assert model.tokenizer.decode(expected).endswith("The answer is")


def test_prefill_refused_where_the_template_drops_the_assistant_text(model, model_dir, tmp_path):
    template = "{% for m in messages %}{% if m.role != 'assistant' %}{{ m.content }}\n{% endif %}{% endfor %}"
    folder = with_chat_template(model_dir, tmp_path / "model", template)
    with running_server(lem_serve.load_model(lem_serve.Settings(model_path=str(folder))), folder) as srv:
        reply = request(srv, "POST", "/v1/messages", {"max_tokens": 5, "messages": PREFILL})
        assert "cannot be continued" in assert_anthropic_error(reply, 400, "invalid_request_error")["message"]
        assert request(srv, "POST", "/v1/messages", {"max_tokens": 5, "messages": HELLO}).status == 200


# ---------------------------------------------------------------------------
# Agent fidelity: the API contracts the SDKs and the agents rely on (issue 23)
# ---------------------------------------------------------------------------

# A scripted model (the parrot): its first reply is a tool call whose arguments are no JSON object
# (a model's slip, one added token), and after a tool result (the template then ends its generation
# prompt with AFTER_TOOL) it answers in text.
AFTER_TOOL = "<after_tool>"

SLIP_ARGUMENTS = "ls -la"

SLIP_BODY = '\n{"name": "add", "arguments": "' + SLIP_ARGUMENTS + '"}\n'

SLIP_REPLY = "Done."

SLIP_TEMPLATE = CHAT_TEMPLATE.replace("""    {{- '<|im_start|>assistant\\n' }}
{%- endif %}""", """    {{- '<|im_start|>assistant\\n' }}
    {%- if messages[-1].role == 'tool' %}{{- '""" + AFTER_TOOL + """' }}{%- endif %}
{%- endif %}""")

assert SLIP_TEMPLATE.count(AFTER_TOOL) == 1, "CHAT_TEMPLATE changed: update SLIP_TEMPLATE"


def build_slip_model(out_dir: Path, **options) -> Path:
    return build_parrot_model(out_dir, {"\n": "<tool_call>" + SLIP_BODY + "</tool_call>", AFTER_TOOL: SLIP_REPLY},
                              extra_tokens=(SLIP_BODY, AFTER_TOOL), chat_template=SLIP_TEMPLATE, **options)


@pytest.fixture(scope="module")
def slip_server(tmp_path_factory):
    folder = build_slip_model(tmp_path_factory.mktemp("models") / "slip")
    with running_server(lem_serve.load_model(lem_serve.Settings(model_path=str(folder))), folder) as srv:
        yield srv


@functools.lru_cache(maxsize=None)
def sdk_type(kind):
    """A pydantic validator for an SDK type (a model class or a union of them), built once per type."""
    pydantic = pytest.importorskip("pydantic")
    return pydantic.TypeAdapter(kind)


def undeclared_fields(value, where: str = "") -> list[str]:
    """Fields of a validated SDK object (recursively) that its type does not declare."""
    found = []
    if hasattr(type(value), "model_fields") and hasattr(value, "model_extra"):
        found += [f"{where}.{name}" for name in (value.model_extra or {})]
        for name in type(value).model_fields:
            found += undeclared_fields(getattr(value, name), f"{where}.{name}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found += undeclared_fields(item, f"{where}[{i}]")
    return found


def strictly(kind, payload: dict | bytes, extras: tuple[str, ...] = ()):
    """`payload` (JSON as the server sent it) validated as `kind` in pydantic's strict mode, and holding
    no field the SDK's type does not declare but those in `extras` (our documented additions)."""
    text = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
    value = sdk_type(kind).validate_json(text, strict=True)
    unknown = [f for f in undeclared_fields(value) if not any(f.endswith(e) for e in extras)]
    assert not unknown, (unknown, text[:500])
    return value


def sse_payloads(reply_raw: bytes) -> list[dict]:
    """The JSON data of each event in a whole SSE body ([DONE] and comments left out)."""
    out = []
    for line in reply_raw.decode().splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[len("data: "):]))
    return out


def anthropic_stream_events(srv, **fields) -> list[dict]:
    """A streamed /v1/messages, each event (pings aside) checked against the SDK's RawMessageStreamEvent."""
    from anthropic.types import RawMessageStreamEvent
    reply = request(srv, "POST", "/v1/messages", {"max_tokens": 30, "messages": HELLO, **fields, "stream": True})
    assert reply.status == 200, reply.raw[:300]
    events = [e for e in sse_payloads(reply.raw) if e["type"] != "ping"]
    for event in events:
        strictly(RawMessageStreamEvent, event)
    return events


def responses_stream_events(srv, **fields) -> list[dict]:
    """A streamed /v1/responses, each event checked against the SDK's ResponseStreamEvent."""
    from openai.types.responses import ResponseStreamEvent
    reply = request(srv, "POST", "/v1/responses", {"input": HELLO, **fields, "stream": True})
    assert reply.status == 200, reply.raw[:300]
    events = sse_payloads(reply.raw)
    for event in events:
        strictly(ResponseStreamEvent, event)
    return events


def requests_answered(srv, path: str, code: str) -> float:
    samples = scrape(srv, {"x-api-key": "sekret"})
    return sum(v for (n, labels), v in samples.items() if n == "lem_requests_total"
               and f'endpoint="{path}"' in labels and f'code="{code}"' in labels)


def test_a_wrong_key_is_final_for_both_sdks(make_server):
    anthropic, openai = pytest.importorskip("anthropic"), pytest.importorskip("openai")
    srv = make_server(api_key="sekret")
    reply = request(srv, "POST", "/v1/messages", body_for("messages", max_tokens=2), {"x-api-key": "wrong"})
    assert_anthropic_error(reply, 401, "authentication_error")
    assert reply.headers["x-should-retry"] == "false"
    reply = request(srv, "POST", "/v1/responses", body_for("responses"), {"Authorization": "Bearer wrong"})
    assert_openai_error(reply, 401, code="invalid_api_key")
    assert reply.headers["x-should-retry"] == "false"
    claude = anthropic.Anthropic(base_url=srv.url, api_key="wrong", max_retries=3, timeout=60)
    with pytest.raises(anthropic.AuthenticationError):
        claude.messages.create(model="m", max_tokens=2, messages=HELLO)
    codex = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=3, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        codex.responses.create(model="m", input="hi", max_output_tokens=2)
    assert wait_until(lambda: srv.in_flight == 0)
    assert requests_answered(srv, "/v1/messages", "401") == 2  # the raw request and the SDK's one: no retries
    assert requests_answered(srv, "/v1/responses", "401") == 2


def test_claude_code_with_a_wrong_key_asks_once_and_says_so(make_server, tmp_path):
    claude = agent_cli("claude")
    srv = make_server(api_key="sekret")
    (tmp_path / "home").mkdir()
    env = {"HOME": tmp_path / "home", "ANTHROPIC_BASE_URL": srv.url, "ANTHROPIC_API_KEY": "sk-wrong",
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
    run = run_agent([claude, "-p", AGENT_ASK], tmp_path, env)
    assert run.returncode != 0
    said = (run.stdout + run.stderr).lower()
    assert "api key" in said or "authentication" in said, (run.stdout[-1000:], run.stderr[-1000:])
    assert wait_until(lambda: srv.in_flight == 0)
    assert requests_answered(srv, "/v1/messages", "401") == 1


def test_codex_with_a_wrong_key_says_so_with_the_request_id(make_server, tmp_path):
    codex = agent_cli("codex")
    srv = make_server(api_key="sekret")
    (tmp_path / "work").mkdir()
    (tmp_path / "config.toml").write_text(CODEX_CONFIG.format(url=srv.url + "/v1"))
    run = run_agent([codex, "exec", "--skip-git-repo-check", AGENT_ASK], tmp_path / "work",
                    {"HOME": tmp_path, "CODEX_HOME": tmp_path, "LEM_API_KEY": "sk-wrong"})
    assert run.returncode != 0
    said = run.stdout + run.stderr
    assert "401" in said and "wrong API key" in said and re.search(r"request id: req_[0-9a-f]{24}", said), said[-1000:]
    assert wait_until(lambda: srv.in_flight == 0)
    # Codex retries a 401 by its own policy (to refresh a ChatGPT login), whatever x-should-retry says.
    assert 1 <= requests_answered(srv, "/v1/responses", "401") <= 6


def test_tool_arguments_that_are_no_json_object_are_wrapped_and_replay(slip_server):
    wrapped = {lem_serve.RAW_ARGUMENTS_KEY: SLIP_ARGUMENTS}
    shell = {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"command": {"type": "string"}}}}}  # one property: the text goes there
    for tool, arguments in ((ADD, wrapped), (shell, {"command": SLIP_ARGUMENTS})):
        message = post(slip_server, "chat", tools=[tool])["choices"][0]["message"]
        (call,) = message["tool_calls"]
        assert json.loads(call["function"]["arguments"]) == arguments
        streamed = [d for e in stream(slip_server, "chat", tools=[tool]) if isinstance(e, dict) and e.get("choices")
                    for d in e["choices"][0]["delta"].get("tool_calls") or []]
        assert json.loads("".join(d["function"].get("arguments") or "" for d in streamed)) == arguments
    response = post(slip_server, "responses", tools=[as_responses_tool(ADD)])
    (item,) = response["output"]
    assert json.loads(item["arguments"]) == wrapped
    message = post(slip_server, "messages", tools=[as_anthropic_tool(ADD)])
    assert message["content"][-1]["input"] == wrapped and message["stop_reason"] == "tool_use"
    # The next turn, with the call sent back as the server wrote it or as the model wrote it: accepted.
    for sent in (item["arguments"], SLIP_ARGUMENTS, '"' + SLIP_ARGUMENTS + '"'):
        history = [*HELLO, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "add", "arguments": sent}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "error: bad arguments"}]
        answer = post(slip_server, "chat", messages=history, tools=[ADD])["choices"][0]["message"]
        assert answer["content"] == SLIP_REPLY
        followed = post(slip_server, "responses", tools=[as_responses_tool(ADD)], input=[
            *HELLO, {**item, "arguments": sent}, {"type": "function_call_output", "call_id": item["call_id"],
                                                  "output": "error: bad arguments"}])
        assert followed["output"][0]["content"][0]["text"] == SLIP_REPLY
    replayed = post(slip_server, "messages", tools=[as_anthropic_tool(ADD)], messages=[
        *HELLO, {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "add", "input": "ls"}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "no"}]}])
    assert replayed["content"] == [{"type": "text", "text": SLIP_REPLY}]


def test_tool_reference_loads_a_deferred_tool(server, model, anthropic_client):
    deferred = {**as_anthropic_tool(WEATHER), "defer_loading": True}
    tools = [as_anthropic_tool(ADD), deferred]
    counted = anthropic_client.messages.count_tokens(model="m", tools=tools, messages=ASK_WEATHER).input_tokens
    assert counted == len(chat_prompt(model, ASK_WEATHER, [ADD]))  # a deferred tool stays out of the prompt
    history = [*ASK_WEATHER,
               {"role": "assistant", "content": [{"type": "tool_use", "id": "s1", "name": "ToolSearch",
                                                  "input": {"query": "weather"}}]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "s1", "content": [
                   {"type": "tool_reference", "tool_name": "get_weather"}]}]}]
    counted = anthropic_client.messages.count_tokens(model="m", tools=tools, messages=history).input_tokens
    loaded = "Tool loaded: " + json.dumps(WEATHER["function"], ensure_ascii=False)
    chat = [*ASK_WEATHER, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "s1", "type": "function", "function": {"name": "ToolSearch", "arguments": {"query": "weather"}}}]},
            {"role": "tool", "tool_call_id": "s1", "content": loaded}]
    assert counted == len(chat_prompt(model, chat, [ADD]))  # its definition stands where the result does
    message = anthropic_client.messages.create(model="m", max_tokens=3, tools=tools, messages=history,
                                               extra_body=GREEDY)
    assert message.usage.output_tokens == 3
    unknown = history[:2] + [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "s1", "content": [
        {"type": "tool_reference", "tool_name": "nope"}]}]}]
    assert_anthropic_error(request(server, "POST", "/v1/messages", {"max_tokens": 3, "tools": tools,
                                                                    "messages": unknown}), 400, "invalid_request_error")


def test_message_start_reports_the_cache_read_the_final_usage_does(make_long_server):
    srv = make_long_server(max_requests=2)
    long_chat = [{"role": "user", "content": " ".join(f"w{i}" for i in range(300))}]
    post(srv, "messages", messages=long_chat, max_tokens=1)
    # Another request keeps the engine stepping, so a job waits a step before the engine takes it.
    busy = open_stream(srv, "chat", messages=[{"role": "user", "content": "x " * 1500}], **endless(srv.model))
    try:
        read_first_text_event(busy[1])
        for _ in range(8):
            events = anthropic_stream_events(srv, messages=long_chat, max_tokens=2)
            start, delta = events[0]["message"]["usage"], events[-2]["usage"]
            assert delta["cache_read_input_tokens"] > 0
            assert (start["cache_read_input_tokens"], start["input_tokens"]) == \
                (delta["cache_read_input_tokens"], delta["input_tokens"])
    finally:
        hang_up(*busy)


def test_thinking_only_when_asked_and_signed(thinking_server):
    anthropic = pytest.importorskip("anthropic")
    client = anthropic.Anthropic(base_url=thinking_server.url, api_key="unused", max_retries=0, timeout=60)
    plain = client.messages.create(model="m", max_tokens=50, messages=HELLO)
    assert [(b.type, b.text) for b in plain.content] == [("text", DIRECT)]  # no thinking parameter: no thinking
    asked = {"type": "enabled", "budget_tokens": 1024}
    message = client.messages.create(model="m", max_tokens=2000, messages=HELLO, thinking=asked)
    thought, answer = message.content
    assert (thought.type, thought.thinking, answer.text) == ("thinking", THINKING, ANSWER)
    assert thought.signature == lem_serve.thinking_signature(THINKING) and len(thought.signature) >= 40
    with client.messages.stream(model="m", max_tokens=2000, messages=HELLO, thinking={"type": "adaptive"}) as s:
        streamed = s.get_final_message()
    assert streamed.content[0].signature == thought.signature and streamed.content[1].text == ANSWER
    for thinking, max_tokens in (({"type": "enabled", "budget_tokens": 2000}, 2000),
                                 ({"type": "enabled", "budget_tokens": 100}, 2000), ({"type": "sometimes"}, 50)):
        with pytest.raises(anthropic.BadRequestError):
            client.messages.create(model="m", max_tokens=max_tokens, messages=HELLO, thinking=thinking)
    reasoned = post(thinking_server, "responses", max_tokens=50)
    assert [item["type"] for item in reasoned["output"]] == ["reasoning", "message"]
    quiet = post(thinking_server, "responses", max_tokens=50, reasoning={"effort": "none"})
    assert [item["type"] for item in quiet["output"]] == ["message"]
    assert quiet["output"][0]["content"][0]["text"] == DIRECT and quiet["reasoning"] == {"effort": "none"}


def test_the_response_object_repeats_the_request(server, openai_client):
    from openai.types.responses import Response
    fields = dict(model="tiny", input=ASK_WEATHER, instructions=TERSE, metadata={"session": "s1"},
                  tools=[as_responses_tool(ADD), as_responses_tool(WEATHER)],
                  tool_choice={"type": "function", "name": "add"}, parallel_tool_calls=False,
                  max_output_tokens=120, temperature=0)
    reply = request(server, "POST", "/v1/responses", fields)
    response = strictly(Response, reply.raw)
    assert response.instructions == TERSE and response.metadata == {"session": "s1"}
    assert response.tool_choice.type == "function" and response.tool_choice.name == "add"
    assert response.parallel_tool_calls is False and response.text.format.type == "text"
    assert response.status == "completed" and response.completed_at >= response.created_at
    assert [t.name for t in response.tools] == ["add", "get_weather"]
    events = responses_stream_events(server, **{**fields, "input": HELLO, "tool_choice": "auto",
                                                "max_output_tokens": 5})
    final = strictly(Response, events[-1]["response"])
    assert final.status == "incomplete" and final.completed_at is None
    (item,) = final.output
    assert item.type == "message" and item.status == "incomplete"
    assert [e["item"]["status"] for e in events if e["type"] == "response.output_item.done"] == ["incomplete"]
    whole = strictly(Response, request(server, "POST", "/v1/responses", {**fields, "input": HELLO,
                                                                          "tool_choice": "auto",
                                                                          "max_output_tokens": 5}).raw)
    assert whole.output[0].status == "incomplete" and whole.output_text == final.output_text


def test_every_api_response_names_its_request(server):
    seen = set()
    for method, path, body, header in (("GET", "/v1/models", None, "x-request-id"),
                                       ("POST", "/v1/chat/completions", body_for("chat", max_tokens=2), "x-request-id"),
                                       ("POST", "/v1/completions", body_for("completions", max_tokens=2), "x-request-id"),
                                       ("POST", "/v1/responses", body_for("responses", max_tokens=2), "x-request-id"),
                                       ("POST", "/v1/responses", body_for("responses", max_tokens=2, stream=True),
                                        "x-request-id"),
                                       ("POST", "/v1/messages", body_for("messages", max_tokens=2), "request-id"),
                                       ("POST", "/v1/messages", body_for("messages", max_tokens=2, stream=True),
                                        "request-id"),
                                       ("POST", "/v1/messages/count_tokens", {"messages": HELLO}, "request-id"),
                                       ("POST", "/v1/responses", {}, "x-request-id")):
        reply = request(server, method, path, body)
        other = "request-id" if header == "x-request-id" else "x-request-id"
        assert reply.headers[header].startswith("req_") and reply.headers[other] is None, (path, reply.headers)
        seen.add(reply.headers[header])
    assert len(seen) == 9
    assert request(server, "GET", "/v1/models", headers={"anthropic-version": "2023-06-01"}).headers["request-id"]


def test_the_model_list_in_both_shapes_with_context_and_capabilities(server, thinking_server):
    anthropic, openai = pytest.importorskip("anthropic"), pytest.importorskip("openai")
    for srv, reasons in ((server, False), (thinking_server, True)):
        claude = anthropic.Anthropic(base_url=srv.url, api_key="unused", max_retries=0)
        (info,) = list(claude.models.list())
        assert (info.id, info.type, info.max_input_tokens, info.max_tokens) == \
            ("tiny", "model", srv.model.context_length, srv.settings.max_tokens)
        assert info.capabilities.thinking.supported is reasons
        assert info.capabilities.model_extra["tool_use"] == {"supported": True}
        assert claude.models.retrieve("tiny") == info
        with pytest.raises(anthropic.NotFoundError):
            claude.models.retrieve("claude-opus")
        codex = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        (model,) = list(codex.models.list())
        extra = model.model_extra
        assert (model.id, extra["context_length"], extra["max_output_tokens"]) == \
            ("tiny", srv.model.context_length, srv.settings.max_tokens)
        assert extra["capabilities"] == {"reasoning": reasons, "tool_calling": True}
        assert codex.models.retrieve("tiny") == model
        with pytest.raises(openai.NotFoundError):
            codex.models.retrieve("gpt-9")
    from anthropic.types import ModelInfo
    from openai.types import Model
    reply = request(server, "GET", "/v1/models", headers={"anthropic-version": "2023-06-01"})
    assert set(reply.json()) == {"data", "first_id", "last_id", "has_more"}
    strictly(ModelInfo, reply.json()["data"][0], extras=(".tool_use",))
    strictly(Model, request(server, "GET", "/v1/models").json()["data"][0],
             extras=(".context_length", ".max_output_tokens", ".capabilities"))


def gzipped(body: dict | bytes) -> bytes:
    import gzip
    return gzip.compress(body if isinstance(body, bytes) else json.dumps(body).encode())


def test_input_hygiene(server, model, anthropic_client):
    call = {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "add", "input": {"a": 1}}]}
    stray = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t9", "content": "3"}]}
    error = assert_anthropic_error(request(server, "POST", "/v1/messages", {
        "max_tokens": 2, "messages": [*HELLO, call, stray]}), 400, "invalid_request_error")
    assert "t9" in error["message"]
    stops = [f"zz{i}" for i in range(5)]
    message = anthropic_client.messages.create(model="m", max_tokens=3, messages=HELLO, stop_sequences=stops)
    assert message.stop_reason == "max_tokens"
    too_many = body_for("messages", max_tokens=2, stop_sequences=[f"s{i}" for i in range(lem_serve.MAX_STOP_SEQUENCES + 1)])
    assert_anthropic_error(request(server, "POST", "/v1/messages", too_many), 400, "invalid_request_error")
    document = {"type": "document", "title": "Notes", "source": {"type": "text", "media_type": "text/plain",
                                                                 "data": "Paris is in France."}}
    counted = anthropic_client.messages.count_tokens(model="m", messages=[{"role": "user", "content": [
        document, {"type": "text", "text": "Where is Paris?"}]}]).input_tokens
    assert counted == len(chat_prompt(model, [{"role": "user", "content": "Notes\nParis is in France.\nWhere is Paris?"}]))
    body = body_for("chat", max_tokens=3, temperature=0)
    plain = request(server, "POST", "/v1/chat/completions", body).json()
    packed = request(server, "POST", "/v1/chat/completions", gzipped(body), {"Content-Encoding": "gzip"})
    assert packed.status == 200 and packed.json()["choices"] == plain["choices"]
    bomb = gzipped(b" " * (lem_serve.MAX_BODY_BYTES + 1))
    assert len(bomb) < lem_serve.MAX_BODY_BYTES // 100
    assert_openai_error(request(server, "POST", "/v1/chat/completions", bomb, {"Content-Encoding": "gzip"}), 413,
                        code="body_too_large")
    assert_anthropic_error(request(server, "POST", "/v1/messages", gzipped(body)[:-9], {"Content-Encoding": "gzip"}),
                           400, "invalid_request_error")
    assert_openai_error(request(server, "POST", "/v1/chat/completions", json.dumps(body).encode(),
                                {"Content-Encoding": "br"}), 415, code="unsupported_encoding")

PATCH_TOOL = {"type": "custom", "name": "apply_patch", "description": "Apply a patch to files"}


def test_codex_tool_kinds(server, model, openai_client, caplog):
    from openai.types.responses import Response
    namespace = {"type": "namespace", "name": "crm", "description": "customers",
                 "tools": [{**as_responses_tool(ADD), "defer_loading": True}]}  # no tool_search: rendered anyway
    tools = [as_responses_tool(WEATHER), PATCH_TOOL, namespace, {"type": "web_search"},
             {"type": "computer_use_preview", "display_width": 1024, "display_height": 768, "environment": "linux"}]
    rendered = [WEATHER, {"type": "function", "function": {"name": "apply_patch", "description": "Apply a patch to files",
                                                           "parameters": lem_serve.CUSTOM_TOOL_PARAMETERS}},
                {"type": "function", "function": {**ADD["function"], "name": "crm__add"}}]
    with caplog.at_level(logging.INFO, logger="lem_serve"):
        for _ in range(2):
            response = strictly(Response, request(server, "POST", "/v1/responses", {
                "input": ASK_WEATHER, "tools": tools, "max_output_tokens": 2}).raw)
    assert response.usage.input_tokens == len(chat_prompt(model, ASK_WEATHER, rendered))  # hosted tools left out
    named = [r.getMessage() for r in caplog.records if "'computer_use_preview'" in r.getMessage()]
    assert len(named) == 1  # named once per process (no other test sends this one)
    patch = strictly(Response, request(server, "POST", "/v1/responses", {
        "input": ASK_WEATHER, "tools": tools, "max_output_tokens": 60, "temperature": 1.0,
        "tool_choice": {"type": "custom", "name": "apply_patch"}}).raw)
    (call,) = patch.output
    assert call.type == "custom_tool_call" and call.name == "apply_patch" and isinstance(call.input, str)
    events = responses_stream_events(server, input=ASK_WEATHER, tools=tools, max_output_tokens=60, temperature=1.0,
                                     tool_choice={"type": "custom", "name": "apply_patch"})
    kinds = [e["type"] for e in events]
    assert "response.custom_tool_call_input.delta" in kinds and "response.custom_tool_call_input.done" in kinds
    grouped = request(server, "POST", "/v1/responses", {"input": ASK_WEATHER, "tools": tools, "max_output_tokens": 60,
                                                        "tool_choice": {"type": "function", "name": "add",
                                                                        "namespace": "crm"}}).json()
    (function,) = grouped["output"]
    assert (function["name"], function["namespace"]) == ("add", "crm")
    assert_valid(function["arguments"], ADD["function"]["parameters"])
    history = [*ASK_WEATHER, call.model_dump(exclude_none=True),
               {"type": "custom_tool_call_output", "call_id": call.call_id, "output": "patched"}, function,
               {"type": "function_call_output", "call_id": function["call_id"], "output": "3"}]
    follow = openai_client.responses.create(model="tiny", input=history, tools=tools, max_output_tokens=2)
    chat = [*ASK_WEATHER, {"role": "assistant", "content": "", "tool_calls": [
        {"id": call.call_id, "type": "function", "function": {"name": "apply_patch", "arguments": {"input": call.input}}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "patched"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": function["call_id"], "type": "function", "function": {
            "name": "crm__add", "arguments": json.loads(function["arguments"])}}]},
        {"role": "tool", "tool_call_id": function["call_id"], "content": "3"}]
    assert follow.usage.input_tokens == len(chat_prompt(model, chat, rendered))
    for choice in ({"type": "web_search"}, {"type": "file_search"}):
        error = assert_openai_error(request(server, "POST", "/v1/responses", {
            "input": "x", "tools": tools, "tool_choice": choice}), 400, "tool_choice")
        assert choice["type"] in error["message"]


def test_stored_responses_chain_and_are_bounded(make_server, model):
    openai = pytest.importorskip("openai")
    srv = make_server(response_store_count=2)
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    first = client.responses.create(model="tiny", instructions=TERSE, input=HELLO, max_output_tokens=4, temperature=0)
    assert client.responses.retrieve(first.id) == first
    second = client.responses.create(model="tiny", previous_response_id=first.id, max_output_tokens=4, temperature=0,
                                     input=[{"role": "user", "content": "And then?"}])
    assert second.previous_response_id == first.id
    whole = [*HELLO, {"role": "assistant", "content": first.output_text}, {"role": "user", "content": "And then?"}]
    assert second.usage.input_tokens == len(chat_prompt(model, whole))  # the first's instructions are not carried
    stream_ = client.responses.create(model="tiny", input=HELLO, max_output_tokens=2, stream=True)
    streamed = [e for e in stream_][-1].response
    assert client.responses.retrieve(streamed.id).output_text == streamed.output_text
    with pytest.raises(openai.NotFoundError) as evicted:  # the oldest of three, with room for two
        client.responses.retrieve(first.id)
    assert evicted.value.body["code"] == "response_not_found"
    unkept = client.responses.create(model="tiny", input=HELLO, max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unkept.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="tiny", input="x", previous_response_id=unkept.id, max_output_tokens=2)
    small = make_server(response_store_bytes=100)  # no response fits: none is kept
    kept = post(small, "responses", max_tokens=2)
    assert_openai_error(request(small, "GET", f"/v1/responses/{kept['id']}"), 404, code="response_not_found")


def test_codex_goes_on_after_its_model_slips_a_tool_call(tmp_path_factory, tmp_path):
    codex = agent_cli("codex")
    folder = build_slip_model(tmp_path_factory.mktemp("models") / "slip-agent", vocab_size=4096,
                              max_position_embeddings=LONG_CONTEXT)
    model = lem_serve.load_model(lem_serve.Settings(model_path=str(folder)))
    with running_server(model, folder, max_tokens=AGENT_MAX_TOKENS, timeout=AGENT_TIMEOUT, max_requests=2,
                        api_key=AGENT_KEY) as srv:
        home, work = tmp_path / "codex-home", tmp_path / "work"
        home.mkdir()
        work.mkdir()
        (home / "config.toml").write_text(CODEX_CONFIG.format(url=srv.url + "/v1"))
        env = {"HOME": home, "CODEX_HOME": home, "LEM_API_KEY": AGENT_KEY}
        run = run_agent([codex, "exec", "--skip-git-repo-check", "--json", AGENT_ASK], work, env)
        assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-2000:])
        events = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
        said = [e["item"]["text"] for e in events if e["type"] == "item.completed"
                and e["item"]["type"] == "agent_message"]
        assert said == [SLIP_REPLY]  # the turn after the slipped call, which Codex sent back as the server wrote it
        assert_only_successes(srv, "/v1/responses")
        assert requests_answered_with(srv, AGENT_KEY, "/v1/responses", "200") == 2


def requests_answered_with(srv, key: str, path: str, code: str) -> float:
    samples = scrape(srv, {"x-api-key": key})
    return sum(v for (n, labels), v in samples.items() if n == "lem_requests_total"
               and f'endpoint="{path}"' in labels and f'code="{code}"' in labels)


def checked_labels(sdk: str, payloads: list[dict], kind) -> set[str]:
    """Each payload validated strictly as `kind`; the labels (sdk:type[:delta type]) of those checked."""
    labels = set()
    for payload in payloads:
        strictly(kind, payload)
        delta = payload.get("delta") if isinstance(payload.get("delta"), dict) else {}
        block = payload.get("content_block") or payload.get("item") or {}
        labels.add(":".join(filter(None, [sdk, payload.get("type"), delta.get("type"), block.get("type")])))
    return labels


def test_sdk_types_strictly_for_every_shape_sent(server, thinking_server, slip_server, long_model, long_model_dir):
    """Every response shape the dialects send, validated strictly by the SDKs' own types: the checklist."""
    from anthropic.types import ErrorResponse, Message, MessageTokensCount, ModelInfo, RawMessageStreamEvent
    from openai.types import Model
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
    from openai.types.shared import ErrorObject
    from openai.types.responses import Response, ResponseStreamEvent
    claude, codex = set(), set()
    tools = [as_anthropic_tool(ADD)]
    for srv, fields in ((server, {}), (server, {"stop_sequences": ["e"]}), (thinking_server, {
            "thinking": {"type": "enabled", "budget_tokens": 1024}, "max_tokens": 2000}),
            (server, {"tools": tools, "tool_choice": {"type": "tool", "name": "add"}, "max_tokens": 200}),
            (slip_server, {"tools": tools})):
        body = {"max_tokens": 30, "messages": HELLO, **fields}
        message = request(srv, "POST", "/v1/messages", body).json()
        claude |= {f"anthropic:message:{'+'.join(b['type'] for b in message['content'])}"}
        strictly(Message, message)
        claude |= checked_labels("anthropic", [e for e in sse_payloads(request(srv, "POST", "/v1/messages", {
            **body, "stream": True}).raw) if e["type"] != "ping"], RawMessageStreamEvent)
    strictly(MessageTokensCount, request(server, "POST", "/v1/messages/count_tokens", {"messages": HELLO}).raw)
    anthropic_models = request(server, "GET", "/v1/models", headers={"anthropic-version": "2023-06-01"}).json()
    strictly(ModelInfo, anthropic_models["data"][0], extras=(".tool_use",))
    for status, body in ((400, {"messages": HELLO}), (404, None)):
        reply = request(server, "POST" if body else "GET", "/v1/messages" if body else "/v1/models/nope", body,
                        {"anthropic-version": "2023-06-01"})
        assert reply.status == status
        strictly(ErrorResponse, reply.raw)
    claude |= {"anthropic:count_tokens", "anthropic:model", "anthropic:error:400", "anthropic:error:404"}
    rtools = [as_responses_tool(ADD), PATCH_TOOL]
    for srv, fields in ((server, {}), (thinking_server, {"max_output_tokens": 50}),
                        (server, {"tools": rtools, "tool_choice": "required", "max_output_tokens": 200}),
                        (server, {"tools": rtools, "tool_choice": {"type": "custom", "name": "apply_patch"},
                                  "max_output_tokens": 200}),
                        (slip_server, {"tools": rtools})):
        body = {"input": HELLO, "max_output_tokens": 5, **fields}
        response = strictly(Response, request(srv, "POST", "/v1/responses", body).raw)
        codex.add(f"openai:response:{response.status}:{'+'.join(item.type for item in response.output)}")
        codex |= checked_labels("openai", sse_payloads(request(srv, "POST", "/v1/responses", {
            **body, "stream": True}).raw), ResponseStreamEvent)
    with running_server(long_model, long_model_dir, timeout=1, max_tokens=LONG_BUDGET) as srv:  # past the deadline
        codex |= checked_labels("openai", sse_payloads(request(srv, "POST", "/v1/responses", {
            "input": HELLO, "max_output_tokens": LONG_BUDGET, "stream": True}).raw)[-1:], ResponseStreamEvent)
        (failed,) = [e for e in sse_payloads(request(srv, "POST", "/v1/messages", {
            "messages": HELLO, "max_tokens": LONG_BUDGET, "stream": True}).raw) if e["type"] == "error"]
        strictly(ErrorResponse, failed)
        claude.add("anthropic:stream-error")
    for status, body in ((400, {"input": []}), (404, None)):
        reply = request(server, "POST" if body else "GET", "/v1/responses" if body else "/v1/responses/resp_x", body)
        assert reply.status == status
        strictly(ErrorObject, reply.json()["error"])
        codex.add(f"openai:error:{status}")
    for srv, fields in ((server, {}), (slip_server, {"tools": [ADD]})):
        strictly(ChatCompletion, request(srv, "POST", "/v1/chat/completions", body_for("chat", max_tokens=5, **fields)).raw,
                 extras=(".reasoning_content", ".reasoning"))
        for chunk in sse_payloads(request(srv, "POST", "/v1/chat/completions", body_for(
                "chat", max_tokens=5, stream=True, stream_options={"include_usage": True}, **fields)).raw):
            strictly(ChatCompletionChunk, chunk)
    strictly(Model, request(server, "GET", "/v1/models").json()["data"][0],
             extras=(".context_length", ".max_output_tokens", ".capabilities"))
    codex |= {"openai:chat.completion", "openai:chat.completion.chunk", "openai:model"}
    assert claude == ANTHROPIC_CHECKLIST, claude ^ ANTHROPIC_CHECKLIST
    assert codex == OPENAI_CHECKLIST, codex ^ OPENAI_CHECKLIST

# A long tool call (a Write of a file), in Qwen's format after a line of text: its arguments must stream
# as the model writes them (issue 23 item 5), not arrive in one piece when the call closes. Written compact,
# so the final arguments equal the streamed pieces only if they are the model's text, not re-encoded JSON.
WRITE_ARGS = {"path": "notes/todo.md", "content": "".join(f"- item {i}: check the {i}th box\n" for i in range(24))}

WRITE_TOOL = {"name": "write_file", "description": "Write a file",
              "parameters": {"type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
                             "required": ["path", "content"]}}

LONG_THOUGHT = "<think>\n" + "step " * 300 + "</think>\n\nParis."   # script 1 of write_server

WRITE_SCRIPT = "I will write it.\n" + QWEN_CALL.format("write_file", json.dumps(WRITE_ARGS, separators=(",", ":")))


@pytest.fixture(scope="module")
def write_server(tmp_path_factory):
    from testing.scripted_model import build_scripted_model
    template, keywords, _ = FAMILIES["qwen3"]
    path = build_scripted_model(tmp_path_factory.mktemp("write") / "qwen3", (TEMPLATES / template).read_text("utf-8"),
                                [WRITE_SCRIPT, LONG_THOUGHT], **keywords)
    with running_server(lem_serve.load_model(lem_serve.Settings(model_path=str(path))), path) as srv:
        yield srv


def write_request(endpoint: str) -> dict:
    """The request whose reply is WRITE_SCRIPT, the write_file tool offered in the endpoint's shape."""
    from testing.scripted_model import trigger
    tool = {"chat": {"type": "function", "function": WRITE_TOOL}, "responses": {"type": "function", **WRITE_TOOL},
            "messages": {"name": WRITE_TOOL["name"], "description": WRITE_TOOL["description"],
                         "input_schema": WRITE_TOOL["parameters"]}}[endpoint]
    thinking = {"thinking": {"type": "enabled", "budget_tokens": 1024}} if endpoint == "messages" else {}
    ask = {"input" if endpoint == "responses" else "messages": [{"role": "user", "content": f"Write it. {trigger(0)}"}]}
    return body_for(endpoint, max_tokens=2000, tools=[tool], **ask, **thinking)   # (Qwen3's template renders the same tail with thinking on)


def argument_deltas_before_close(endpoint: str, events: list[dict]) -> tuple[list[str], str]:
    """(the call's argument pieces sent before its closing event, its final arguments) from a raw stream."""
    pieces, final = [], None
    for event in events:
        if endpoint == "messages":
            if event["type"] == "content_block_delta" and event["delta"]["type"] == "input_json_delta":
                pieces.append(event["delta"]["partial_json"])
            if event["type"] == "content_block_stop" and pieces and final is None:
                final = "".join(pieces)   # Anthropic's final input is what its deltas add up to
        elif endpoint == "responses":
            if event["type"] == "response.function_call_arguments.delta":
                pieces.append(event["delta"])
            if event["type"] == "response.function_call_arguments.done":
                final = event["arguments"]
                break
        else:
            for call in (event["choices"][0]["delta"].get("tool_calls") or []) if event.get("choices") else []:
                pieces += [call["function"]["arguments"]] if call["function"].get("arguments") else []
            if event.get("choices") and event["choices"][0]["finish_reason"]:
                final = "".join(pieces)
                break
    return pieces, final


@pytest.mark.parametrize("endpoint", ["chat", "messages", "responses"])
def test_tool_arguments_stream_as_the_model_writes_them(write_server, endpoint):
    """Raw SSE: the write_file call opens with its name, its arguments come in many pieces before it
    closes, the pieces add up to the final arguments exactly, and no marker shows anywhere."""
    body = write_request(endpoint)
    events = [e for e in sse_payloads(request(write_server, "POST", path_of(endpoint), {**body, "stream": True}).raw)]
    pieces, final = argument_deltas_before_close(endpoint, events)
    assert len(pieces) > 10 and final == "".join(pieces), (endpoint, pieces[:3], final)
    assert json.loads(final) == WRITE_ARGS
    content, _, calls = streamed_parts(endpoint, events)
    assert (content.strip(), calls) == ("I will write it.", [("write_file", WRITE_ARGS)])
    shown = json.dumps(events)
    assert not [m for m in FAMILY_MARKERS if m in shown], shown[:500]
    assert reply_parts(endpoint, request(write_server, "POST", path_of(endpoint), body).json())[2] == calls


def test_sdks_stream_tool_arguments_incrementally(write_server):
    """Through the anthropic and openai SDKs (every event strictly typed): several argument deltas, whose
    accumulation the SDK's own stream helpers turn into the exact final arguments."""
    anthropic, openai = pytest.importorskip("anthropic"), pytest.importorskip("openai")
    events = anthropic_stream_events(write_server, **write_request("messages"))
    assert sum(e["type"] == "content_block_delta" and e["delta"]["type"] == "input_json_delta" for e in events) > 10
    claude = anthropic.Anthropic(base_url=write_server.url, api_key="unused", max_retries=0, timeout=60)
    with claude.messages.stream(model="m", **write_request("messages")) as flow:
        deltas = [e.partial_json for e in flow if e.type == "input_json"]
        message = flow.get_final_message()
    assert len(deltas) > 10 and [b.input for b in message.content if b.type == "tool_use"] == [WRITE_ARGS]
    events = responses_stream_events(write_server, **write_request("responses"))
    assert sum(e["type"] == "response.function_call_arguments.delta" for e in events) > 10
    client = openai.OpenAI(base_url=write_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    with client.responses.stream(model="m", **write_request("responses")) as flow:
        deltas = [e.delta for e in flow if e.type == "response.function_call_arguments.delta"]
        response = flow.get_final_response()
    (call,) = [item for item in response.output if item.type == "function_call"]
    assert len(deltas) > 10 and call.arguments == "".join(deltas) and json.loads(call.arguments) == WRITE_ARGS
    with client.chat.completions.stream(model="m", **write_request("chat")) as flow:
        deltas = [e.arguments_delta for e in flow if e.type == "tool_calls.function.arguments.delta"]
        completion = flow.get_final_completion()
    (call,) = completion.choices[0].message.tool_calls
    assert len(deltas) > 10 and call.function.arguments == "".join(deltas)
    assert json.loads(call.function.arguments) == WRITE_ARGS


@pytest.mark.parametrize("family_server", ["qwen3", "gemma-4", "kimi-k2-thinking", "glm-4.7", "qwen3-coder",
                                          "nemotron-3-nano"], indirect=True)
@pytest.mark.parametrize("endpoint", ["chat", "messages", "responses"])
def test_one_tool_call_when_parallel_calls_are_off(family_server, endpoint):
    """parallel_tool_calls false (chat, responses) or tool_choice.disable_parallel_tool_use (messages): a model
    that writes two calls gets its first through, streamed and not; the second is dropped. Allowed, both come."""
    name, kinds, server, _ = family_server
    body = family_body(endpoint, kinds.index("parallel"))
    single = ({"tool_choice": {"type": "auto", "disable_parallel_tool_use": True}} if endpoint == "messages"
              else {"parallel_tool_calls": False})
    both = FAMILY_EXPECTED["parallel"][2]
    assert reply_parts(endpoint, request(server, "POST", path_of(endpoint), body).json())[2] == both
    payload = request(server, "POST", path_of(endpoint), {**body, **single}).json()
    assert reply_parts(endpoint, payload)[2] == both[:1], payload
    events = stream(server, endpoint, **body, **single)
    assert streamed_parts(endpoint, events)[2] == both[:1]
    if endpoint == "responses":
        assert payload["parallel_tool_calls"] is False


def test_thinking_budget_closes_the_reasoning(write_server):
    """thinking.budget_tokens: a model that would think for 300 words (about 1200 tokens) has its thinking block
    closed once it used the budget (the reply goes on as text); with a larger budget it thinks to its own end."""
    from testing.scripted_model import trigger
    ask = [{"role": "user", "content": f"Think. {trigger(1)}"}]
    for budget, cut in ((1024, True), (1900, False)):
        reply = request(write_server, "POST", "/v1/messages", {"messages": ask, "max_tokens": 2000,
                                                               "thinking": {"type": "enabled", "budget_tokens": budget}})
        content = reply.json()["content"]
        (thought,) = [b["thinking"] for b in content if b["type"] == "thinking"]
        text = "".join(b["text"] for b in content if b["type"] == "text")
        if cut:
            assert 0 < thought.count("step") < 300 and text.lstrip().startswith("step"), (thought[-80:], text[:80])
        else:
            assert thought.count("step") == 300 and text == "Paris."

# Every shape test_sdk_types_strictly_for_every_shape_sent validates: 19 anthropic, 32 openai.
ANTHROPIC_CHECKLIST = {f"anthropic:{name}" for name in (
    "message:text", "message:thinking+text", "message:tool_use", "message_start", "message_delta", "message_stop",
    "content_block_start:text", "content_block_start:thinking", "content_block_start:tool_use", "content_block_stop",
    "content_block_delta:text_delta", "content_block_delta:thinking_delta", "content_block_delta:signature_delta",
    "content_block_delta:input_json_delta", "count_tokens", "model", "error:400", "error:404", "stream-error")}

OPENAI_CHECKLIST = {f"openai:{name}" for name in (
    "response:completed:reasoning+message", "response:incomplete:message", "response:completed:function_call",
    "response:completed:custom_tool_call", "response.created", "response.in_progress", "response.completed",
    "response.incomplete", "response.failed", "response.output_item.added:message",
    "response.output_item.done:message", "response.output_item.added:reasoning", "response.output_item.done:reasoning",
    "response.output_item.added:function_call", "response.output_item.done:function_call",
    "response.output_item.added:custom_tool_call", "response.output_item.done:custom_tool_call",
    "response.content_part.added", "response.content_part.done", "response.output_text.delta",
    "response.output_text.done", "response.reasoning_text.delta", "response.reasoning_text.done",
    "response.function_call_arguments.delta", "response.function_call_arguments.done",
    "response.custom_tool_call_input.delta", "response.custom_tool_call_input.done", "chat.completion",
    "chat.completion.chunk", "model", "error:400", "error:404")}

assert (len(ANTHROPIC_CHECKLIST), len(OPENAI_CHECKLIST)) == (19, 32)


# ---------------------------------------------------------------------------
# The real agents, headless: Claude Code (claude -p) and Codex (codex exec)
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class AgentReply:
    text: str
    prompt_tokens: int
    cached_tokens: int


@pytest.fixture
def agent_server(agent_model_dir, monkeypatch):
    """A server for the agents (API key on) and, in order, each reply it streamed: text and prompt-cache use."""
    replies, pieces = [], {}
    real_event = lem_serve.Writer.event

    def recording(self, kind, value, *extra):  # observes the real writer; changes nothing it does
        if kind == "text":
            pieces.setdefault(id(self), []).append(value)
        else:
            replies.append(AgentReply("".join(pieces.pop(id(self), [])), self.job.prompt_tokens, self.job.cached_tokens))
        return real_event(self, kind, value, *extra)

    monkeypatch.setattr(lem_serve.Writer, "event", recording)
    if os.environ.get("LEM_CAPTURE_DIR"):
        capture_first_requests(monkeypatch, Path(os.environ["LEM_CAPTURE_DIR"]))
    model = lem_serve.load_model(lem_serve.Settings(model_path=str(agent_model_dir)))
    with running_server(model, agent_model_dir, max_tokens=AGENT_MAX_TOKENS, timeout=AGENT_TIMEOUT,
                        max_requests=2, api_key=AGENT_KEY) as srv:
        yield srv, replies


def capture_first_requests(monkeypatch, folder: Path) -> None:
    """Save the first body each agent POSTs to an endpoint, as FOLDER/<endpoint>.json (bench/agent_session.py replays them).

    Set LEM_CAPTURE_DIR to capture; the bodies are saved as read, before the server parses them.
    """
    folder.mkdir(parents=True, exist_ok=True)
    real_read = lem_serve.Handler._read_body

    def reading(self):
        body = real_read(self)
        name = self.path.split("?")[0].strip("/").replace("/", "-") + ".json"
        if self.command == "POST" and not (folder / name).exists():
            (folder / name).write_bytes(body)
        return body

    monkeypatch.setattr(lem_serve.Handler, "_read_body", reading)


def test_claude_code_answers_headless_and_its_second_run_reads_the_cache(agent_server, tmp_path):
    claude = agent_cli("claude")
    srv, replies = agent_server
    (tmp_path / "home").mkdir()
    (tmp_path / "work").mkdir()
    env = {"HOME": tmp_path / "home", "ANTHROPIC_BASE_URL": srv.url, "ANTHROPIC_API_KEY": AGENT_KEY,
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
    first = run_agent([claude, "-p", AGENT_ASK], tmp_path / "work", env)
    assert first.returncode == 0, (first.stdout[-2000:], first.stderr[-2000:])
    assert first.stdout.strip() == replies[-1].text.strip()  # the model's gibberish, as it streamed it
    runs = len(replies)
    second = run_agent([claude, "-p", AGENT_ASK, "--output-format", "json"], tmp_path / "work", env)
    assert second.returncode == 0, (second.stdout[-2000:], second.stderr[-2000:])
    result = json.loads(second.stdout)
    assert result["is_error"] is False and result["result"] == replies[-1].text
    resent = replies[runs]  # the second run's first request: the same 10-20k-token prefix again
    assert resent.prompt_tokens > 5000 and resent.cached_tokens >= 0.9 * resent.prompt_tokens, resent
    assert result["usage"]["cache_read_input_tokens"] >= resent.cached_tokens  # and Claude Code was told so
    assert_only_successes(srv, "/v1/messages")


def test_codex_answers_headless_and_its_second_run_reads_the_cache(agent_server, tmp_path):
    codex = agent_cli("codex")
    srv, replies = agent_server
    home, work = tmp_path / "codex-home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (home / "config.toml").write_text(CODEX_CONFIG.format(url=srv.url + "/v1"))
    env = {"HOME": home, "CODEX_HOME": home, "LEM_API_KEY": AGENT_KEY}
    first = run_agent([codex, "exec", "--skip-git-repo-check", AGENT_ASK], work, env)
    assert first.returncode == 0, (first.stdout[-2000:], first.stderr[-2000:])
    assert first.stdout.strip() == replies[-1].text.strip()
    runs = len(replies)
    second = run_agent([codex, "exec", "--skip-git-repo-check", "--json", AGENT_ASK], work, env)
    assert second.returncode == 0, (second.stdout[-2000:], second.stderr[-2000:])
    events = [json.loads(line) for line in second.stdout.splitlines() if line.startswith("{")]
    said = [e["item"]["text"] for e in events if e["type"] == "item.completed" and e["item"]["type"] == "agent_message"]
    assert said == ([replies[-1].text] if replies[-1].text else [])
    resent = replies[runs]
    assert resent.prompt_tokens > 5000 and resent.cached_tokens >= 0.9 * resent.prompt_tokens, resent
    (usage,) = [e["usage"] for e in events if e["type"] == "turn.completed"]
    assert usage["cached_input_tokens"] >= resent.cached_tokens
    assert_only_successes(srv, "/v1/responses")

# The newer families' real templates under the real agents (issue 22): their system prompts, tool schemas
# (Claude Code's tools, Codex's shell and custom tools) and developer messages render without a 400, and the
# answer Codex prints is the script's text alone, its reasoning apart. (Claude Code puts reminders after the
# prompt in its user message, so the scripted model, which answers right after its trigger, says nothing.)
AGENT_FAMILIES = ["gemma-4", "gemma-4-april", "kimi-k2-thinking", "glm-4.7", "qwen3-coder", "nemotron-3-nano"]


@pytest.mark.parametrize("family_server", AGENT_FAMILIES, indirect=True)
@pytest.mark.parametrize("cli", ["claude", "codex"])
def test_agents_are_served_by_each_family_template(family_server, cli, tmp_path):
    from testing.scripted_model import trigger
    binary = agent_cli(cli)
    name, kinds, server, _ = family_server
    kind = "reasoning" if "reasoning" in kinds else "plain"
    ask, home, work = f"Where? {trigger(kinds.index(kind))}", tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    if cli == "claude":
        env = {"HOME": home, "ANTHROPIC_BASE_URL": server.url, "ANTHROPIC_API_KEY": "unused",
               "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
        run = run_agent([binary, "-p", ask], work, env)
    else:
        (home / "config.toml").write_text(CODEX_CONFIG.format(url=server.url + "/v1"))
        run = run_agent([binary, "exec", "--skip-git-repo-check", ask], work,
                        {"HOME": home, "CODEX_HOME": home, "LEM_API_KEY": "unused"})
    assert run.returncode == 0, (name, run.stdout[-2000:], run.stderr[-2000:])
    assert cli == "claude" or run.stdout.strip() == FAMILY_EXPECTED[kind][0], name
    assert_only_successes(server, "/v1/messages" if cli == "claude" else "/v1/responses")


# ---------------------------------------------------------------------------
# Constrained tool calls (issues 22 and 23): forced calls after the reasoning, ended by their
# constraint; strict tools constrained from the call's start marker on (a lazy grammar)
# ---------------------------------------------------------------------------

SHELL = {"type": "function", "function": {
    "name": "shell", "parameters": {"type": "object", "properties": {"command": {"type": "string"}},
                                    "required": ["command"], "additionalProperties": False}}}

TOOL_SEEDS = 20


@pytest.fixture(scope="module")
def think_tools_server(tmp_path_factory):
    """The random tiny model with a thinking template: its generation prompt opens <think>."""
    root = tmp_path_factory.mktemp("models")
    folder = with_chat_template(build_tiny_model(root / "think-base", extra_tokens=(THINK_START, THINK_END)),
                                root / "think-tools", THINKING_TEMPLATE)
    with running_server(lem_serve.load_model(lem_serve.Settings(model_path=str(folder))), folder) as srv:
        yield srv


def dialect_messages(endpoint: str, messages: list[dict]) -> dict:
    return {"input": messages} if endpoint == "responses" else {"messages": messages}


def forced_call_body(endpoint: str, tools: list[dict], name: str | None) -> dict:
    """Fields forcing a call among `tools` (or of the one `name`) as the endpoint spells tool_choice."""
    if endpoint == "messages":
        return {"tools": [as_anthropic_tool(t) for t in tools],
                "tool_choice": {"type": "tool", "name": name} if name else {"type": "any"}}
    if endpoint == "responses":
        return {"tools": [as_responses_tool(t) for t in tools],
                "tool_choice": {"type": "function", "name": name} if name else "required"}
    return {"tools": tools, "tool_choice": {"type": "function", "function": {"name": name}} if name else "required"}


def calls_and_text(endpoint: str, payload: dict) -> tuple[list[tuple[str, dict]], str]:
    """The (name, arguments) of each tool call in a non-streamed reply, and its text."""
    if endpoint == "messages":
        calls = [(b["name"], b["input"]) for b in payload["content"] if b["type"] == "tool_use"]
    elif endpoint == "responses":
        calls = [(i["name"], json.loads(i["arguments"])) for i in payload["output"] if i["type"] == "function_call"]
    else:
        calls = [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                 for c in payload["choices"][0]["message"].get("tool_calls") or []]
    return calls, text_of(endpoint, payload) or ""


def assert_one_valid_call(endpoint: str, payload: dict, tools: list[dict]) -> dict:
    """The reply is exactly one call of one of `tools`, arguments valid for its schema, and no text; its arguments."""
    calls, text = calls_and_text(endpoint, payload)
    assert len(calls) == 1 and not text, (calls, text)
    name, arguments = calls[0]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert name in schemas, name
    assert_valid(json.dumps(arguments), schemas[name])
    return arguments


@pytest.mark.parametrize("endpoint", ["chat", "messages", "responses"])
@pytest.mark.parametrize("template", ["tools", "think"])
def test_forced_call_succeeds_for_every_seed(server, think_tools_server, endpoint, template):
    srv = server if template == "tools" else think_tools_server
    tools = [SHELL, ADD]

    from concurrent.futures import ThreadPoolExecutor

    def one(seed: int) -> dict:
        fields = forced_call_body(endpoint, tools, None if seed % 2 else "shell")
        return post(srv, endpoint, **dialect_messages(endpoint, ASK_WEATHER), max_tokens=48, temperature=1.0,
                    seed=seed, **fields)
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(one, range(TOOL_SEEDS)))
    for reply in replies:
        assert_one_valid_call(endpoint, reply, tools)
    if template == "think" and endpoint == "chat":  # the model reasoned first, then called
        assert all(r["choices"][0]["message"].get("reasoning_content") for r in replies)

# A free string that starts with the end of a call, as a command that prints it would.
ECHO = {"type": "function", "function": {
    "name": "shell", "parameters": {"type": "object", "properties": {"command": {"type": "string", "pattern": "^echo </tool_call>"}},
                                    "required": ["command"], "additionalProperties": False}}}


def test_forced_call_string_holding_the_end_marker_stays_one_call(server):
    fields = dict(messages=ASK_WEATHER, tools=[ECHO], tool_choice="required", max_tokens=80, temperature=1.0, seed=1)
    (command,) = assert_one_valid_call("chat", post(server, "chat", **fields), [ECHO]).values()
    assert command.startswith("echo </tool_call>")
    events = stream(server, "chat", **fields)
    deltas = [c for e in events if isinstance(e, dict) and e.get("choices") for c in e["choices"][0]["delta"].get("tool_calls") or []]
    assert {d["index"] for d in deltas} == {0}   # one call, its arguments in pieces
    assert json.loads("".join(d["function"].get("arguments") or "" for d in deltas)) == {"command": command}
    assert not streamed_text("chat", events)

# The lazy parrot says some text, opens a call and writes arguments no schema allows.
LAZY_TEXT = "Checking."

LAZY_BAD_CALL = "<tool_call>{bad}</tool_call>"

CITY = {"type": "function", "function": {
    "name": "get_weather", "strict": True, "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
        "additionalProperties": False}}}


@pytest.fixture(scope="module")
def lazy_parrot_server(tmp_path_factory):
    folder = build_parrot_model(tmp_path_factory.mktemp("models") / "lazy", LAZY_TEXT + LAZY_BAD_CALL)
    with running_server(lem_serve.load_model(lem_serve.Settings(model_path=str(folder))), folder) as srv:
        yield srv


def strict_tool(endpoint: str, strict: bool) -> dict:
    """CITY (strict or not) in the endpoint's tool shape."""
    function = {**CITY["function"], "strict": strict}
    tool = {"type": "function", "function": function}
    return {"chat": tool, "messages": {**as_anthropic_tool(tool), "strict": strict},
            "responses": as_responses_tool(tool)}[endpoint]


@pytest.mark.parametrize("endpoint", ["chat", "messages", "responses"])
def test_strict_tool_arguments_follow_the_schema_once_the_call_opens(lazy_parrot_server, endpoint):
    fields = dict(dialect_messages(endpoint, ASK_WEATHER), max_tokens=60, temperature=0)
    strict = post(lazy_parrot_server, endpoint, tools=[strict_tool(endpoint, True)], **fields)
    calls, text = calls_and_text(endpoint, strict)
    assert text == LAZY_TEXT and len(calls) == 1 and calls[0][0] == "get_weather", (text, calls)
    assert_valid(json.dumps(calls[0][1]), CITY["function"]["parameters"])
    loose = post(lazy_parrot_server, endpoint, tools=[strict_tool(endpoint, False)], **fields)
    assert calls_and_text(endpoint, loose) == ([], LAZY_TEXT + LAZY_BAD_CALL)  # not strict: the model's own text


# (The parrot's script follows the prompt's last "\n": GLM's prompts end in <think></think> instead.)
@pytest.mark.parametrize("template, start, end", [
    ("Qwen-Qwen3-Coder-30B-A3B-Instruct.jinja", "<tool_call>", "</tool_call>"),
    ("unsloth-MiniMax-M2.jinja", "<minimax:tool_call>", "</minimax:tool_call>")])
def test_strict_tool_in_key_value_syntax_follows_the_schema_once_the_call_opens(tmp_path, template, start, end):
    markers = tuple(m for m in (start, end) if m not in TOOL_TOKENS)
    parrot = build_parrot_model(tmp_path / "lazy", LAZY_TEXT + start + "{bad}" + end, extra_tokens=markers)
    folder = with_chat_template(parrot, tmp_path / "model", (ROOT / "testing" / "templates" / template).read_text())
    with running_server(lem_serve.load_model(lem_serve.Settings(model_path=str(folder))), folder) as srv:
        for endpoint in ("chat", "messages", "responses"):
            fields = dict(dialect_messages(endpoint, ASK_WEATHER), max_tokens=80, temperature=0)
            calls, text = calls_and_text(endpoint, post(srv, endpoint, tools=[strict_tool(endpoint, True)], **fields))
            assert text == LAZY_TEXT and len(calls) == 1 and calls[0][0] == "get_weather", (text, calls)
            assert_valid(json.dumps(calls[0][1]), CITY["function"]["parameters"])


def test_strict_tool_marker_inside_reasoning_stays_reasoning(thinking_server):
    message = post(thinking_server, "chat", messages=HELLO, max_tokens=50, tools=[CITY])["choices"][0]["message"]
    assert message["content"] == ANSWER and "tool_calls" not in message
    assert message["reasoning_content"] == THINKING

# Each family's real chat template (testing/templates) on the random tiny model: a forced call is
# written as the family writes calls and read back, through all three dialects; a string argument
# holding the family's end marker stays inside the call.
FAMILY_TEMPLATES = sorted(p.name for p in (ROOT / "testing" / "templates").glob("*.jinja"))


@pytest.fixture(scope="module")
def family_base(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "family-base")


def described(tool: dict) -> dict:
    """The tool with a description, which some templates (gpt-oss) require."""
    return {"type": "function", "function": {"description": "A tool.", **tool["function"]}}


@pytest.mark.parametrize("template", FAMILY_TEMPLATES)
def test_forced_call_in_each_familys_own_syntax(family_base, tmp_path, template):
    folder = with_chat_template(family_base, tmp_path / "model", (ROOT / "testing" / "templates" / template).read_text())
    model = lem_serve.load_model(lem_serve.Settings(model_path=str(folder)))
    form = lem_serve.chat_format_of(model.tokenizer)
    tools = [described(SHELL), described(ADD)]
    with running_server(model, folder) as srv:
        for endpoint in ("chat", "messages", "responses"):
            for seed in range(2):
                fields = forced_call_body(endpoint, tools, None if seed else "shell")
                reply = post(srv, endpoint, **dialect_messages(endpoint, ASK_WEATHER), max_tokens=120, temperature=1.0,
                             seed=seed, **fields)
                assert_one_valid_call(endpoint, reply, tools)
        events = stream(srv, "chat", messages=ASK_WEATHER, max_tokens=120, temperature=1.0, seed=5,
                        **forced_call_body("chat", tools, "add"))
        deltas = [c for e in events if isinstance(e, dict) and e.get("choices") for c in e["choices"][0]["delta"].get("tool_calls") or []]
        assert [d["function"]["name"] for d in deltas if d["function"].get("name")] == ["add"]
        assert_valid("".join(d["function"].get("arguments") or "" for d in deltas), ADD["function"]["parameters"])
        assert not streamed_text("chat", events)
        marker = "" if form.harmony else form.end or form.starts[0]  # harmony's calls end at a token, <|call|>
        if not marker.isascii() or not marker:
            return  # DeepSeek's fullwidth markers: the tiny vocabulary has no whole-character token for them
        echo = described({"function": {**ECHO["function"], "parameters": {
            **ECHO["function"]["parameters"],
            "properties": {"command": {"type": "string", "pattern": "^echo " + re.escape(marker)}}}}})
        fields = dict(messages=ASK_WEATHER, tools=[echo], tool_choice="required", max_tokens=200, temperature=1.0, seed=0)
        if form.pairs:   # a raw string value ends at the marker: holding it is refused, saying why
            reply = request(srv, "POST", "/v1/chat/completions", body_for("chat", **fields))
            message = assert_openai_error(reply, 400, "tools")["message"]
            assert "'command' cannot be enforced: its values would hold" in message and marker in message, message
            return
        (command,) = assert_one_valid_call("chat", post(srv, "chat", **fields), [echo]).values()
        assert command.startswith("echo " + marker)


# A tool whose arguments are every kind a key/value call writes: raw strings (lengths, enum, pattern, free: it
# ends only when the constraint ends it; string or null, as Pydantic writes Optional[str]), numbers, booleans,
# and JSON text for arrays and objects; some optional.
PLAN = described({"function": {"name": "plan", "parameters": {
    "type": "object", "required": ["title", "mode", "count", "tags", "code", "note", "label"], "properties": {
        "title": {"type": "string", "minLength": 1, "maxLength": 12}, "mode": {"type": "string", "enum": ["fast", "slow"]},
        "count": {"type": "integer", "minimum": 1, "maximum": 9}, "ratio": {"type": "number", "maximum": 1},
        "dry": {"type": "boolean"}, "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
        "where": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"],
                  "additionalProperties": False},
        "code": {"type": "string", "pattern": "^[A-Z]{3}$"}, "note": {"type": "string"},
        "label": {"anyOf": [{"type": "string", "maxLength": 8}, {"type": "null"}], "default": None}}}}})

# How each family opens a forced call to `plan`, as its template writes calls; the arguments it cannot hold
# to their schemas (Gemma 4's parser rewrites text inside JSON values, so it gets none), made optional.
FORCED_HEADS = {"zai-org-GLM-4.6.jinja": ("<tool_call>plan\n<arg_key>title</arg_key>\n<arg_value>", ()),
                "zai-org-GLM-4.7-Flash.jinja": ("<tool_call>plan<arg_key>title</arg_key><arg_value>", ()),
                "unsloth-MiniMax-M2.jinja": ('<minimax:tool_call>\n<invoke name="plan">\n<parameter name="title">', ()),
                "Qwen-Qwen3-Coder-30B-A3B-Instruct.jinja": ("<tool_call>\n<function=plan>\n<parameter=title>\n",
                                                            ("label",)),   # an untyped value: its parser guesses
                "NVIDIA-Nemotron-3-Nano-30B-A3B.jinja": ("<tool_call>\n<function=plan>\n<parameter=title>\n",
                                                         ("label",)),   # Qwen3-Coder's parser
                "google-gemma-4-31B-it.jinja": ('<|tool_call>call:plan{title:<|"|>', ("tags", "where")),
                "moonshotai-Kimi-K2.jinja": ("<|tool_calls_section_begin|><|tool_call_begin|>functions.plan:0"
                                             "<|tool_call_argument_begin|>", ())}


@pytest.mark.parametrize("template", sorted(FORCED_HEADS))
def test_forced_call_holds_every_argument_in_the_familys_own_syntax(tmp_path, template):
    name = next(name for name, (file, _, _) in FAMILIES.items() if file == template)
    markers = tuple(t for t in FAMILIES[name][1]["tokens"] if "think" not in t)   # each one token, as in the family
    base = build_tiny_model(tmp_path / "base", extra_tokens=tuple(t for t in markers if t not in TOOL_TOKENS + SPECIAL_TOKENS))
    folder = with_chat_template(base, tmp_path / "model", (ROOT / "testing" / "templates" / template).read_text())
    head, unwritable = FORCED_HEADS[template]
    schema = PLAN["function"]["parameters"]
    with running_server(lem_serve.load_model(lem_serve.Settings(model_path=str(folder))), folder) as srv:
        if unwritable:   # required, such an argument is refused by name; optional, it is left out
            reply = request(srv, "POST", "/v1/chat/completions", body_for("chat", tools=[PLAN], tool_choice="required"))
            assert f"parameter {unwritable[0]!r} cannot be enforced" in assert_openai_error(reply, 400, "tools")["message"]
            schema = {**schema, "required": [key for key in schema["required"] if key not in unwritable]}
        tool = {"type": "function", "function": {**PLAN["function"], "parameters": schema}}
        for endpoint in ("chat", "messages", "responses"):
            for seed in range(2):
                fields = dict(dialect_messages(endpoint, ASK_WEATHER), max_tokens=400, temperature=1.0, seed=seed,
                              **forced_call_body(endpoint, [tool], "plan" if seed else None))
                reply = post(srv, endpoint, **fields, **({"logprobs": True} if endpoint == "chat" else {}))
                assert_one_valid_call(endpoint, reply, [tool])
                if endpoint == "chat":   # written as the family writes calls, from its first token, markers as theirs
                    written = [entry["token"] for entry in reply["choices"][0]["logprobs"]["content"]]
                    assert "".join(written).startswith(head), written
                    assert {t for t in markers if t in head} <= set(written), written
                content, _, calls = streamed_parts(endpoint, stream(srv, endpoint, **fields))
                assert not content and [name for name, _ in calls] == ["plan"], (content, calls)
                assert_valid(json.dumps(calls[0][1]), schema)
        if template.startswith("moonshotai"):
            return   # JSON arguments: any schema the server enforces
        for broken, why in (({**schema, "minProperties": 6}, "its parameters use minProperties"),
                            ({**schema, "properties": {**schema["properties"], "title": {"type": "string", "pattern": "^ "}}},
                             "'title' cannot be enforced: its values would hold")):
            bad = {"type": "function", "function": {**PLAN["function"], "parameters": broken}}
            reply = request(srv, "POST", "/v1/chat/completions", body_for("chat", tools=[bad], tool_choice="required"))
            assert why in assert_openai_error(reply, 400, "tools")["message"]
        strict = {"type": "function", "function": {**tool["function"], "strict": True}}   # lazy: held once opened
        assert post(srv, "chat", messages=ASK_WEATHER, tools=[strict], max_tokens=8)["choices"]


def test_structured_output_follows_the_reasoning(think_tools_server):
    schema = ADD["function"]["parameters"]
    for seed in range(TOOL_SEEDS // 4):
        message = post(think_tools_server, "chat", messages=ASK_WEATHER, max_tokens=48, temperature=1.0, seed=seed,
                       response_format=schema_format(schema))["choices"][0]["message"]
        assert message["reasoning_content"]
        assert_valid(message["content"], schema)
    response = post(think_tools_server, "responses", input=ASK_WEATHER, max_tokens=48, temperature=1.0, seed=1,
                    text={"format": {"type": "json_schema", "name": "add", "schema": schema}})
    assert_valid(text_of("responses", response), schema)


def test_structured_output_in_harmonys_final_channel(family_base, tmp_path):
    template = (ROOT / "testing" / "templates" / "openai-gpt-oss-120b.jinja").read_text()
    folder = with_chat_template(family_base, tmp_path / "model", template)
    schema = ADD["function"]["parameters"]
    with running_server(lem_serve.load_model(lem_serve.Settings(model_path=str(folder))), folder) as srv:
        for seed in range(3):
            choice = post(srv, "chat", messages=ASK_WEATHER, max_tokens=60, temperature=1.0, seed=seed, logprobs=True,
                          response_format=schema_format(schema))["choices"][0]
            assert_valid(choice["message"]["content"], schema)
            written = "".join(entry["token"] for entry in choice["logprobs"]["content"])
            assert written.startswith("<|channel|>final<|message|>"), written  # the answer, as gpt-oss writes it


def test_strict_and_forced_calls_need_a_call_syntax_the_server_can_write(model_dir, tmp_path):
    folder = with_context_length(model_dir, tmp_path / "pythonic", 4096)  # a copy, its calls read as [f(a=1)] (LFM2)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tool_parser_type": "pythonic"}))
    with running_server(lem_serve.load_model(lem_serve.Settings(model_path=str(folder))), folder) as srv:
        for fields, param in (({"tool_choice": "required"}, "tool_choice"), ({}, "tools")):
            reply = request(srv, "POST", "/v1/chat/completions", body_for("chat", tools=[CITY], **fields))
            assert "format the server can write" in assert_openai_error(reply, 400, param)["message"]
