"""Helpers the test files share: raw HTTP, SSE parsing, references and checks.

Run everything: python -m pytest -q test_lem_serve.py testing/
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import re
import socket
import string
import subprocess
import sys
import threading
import time
import types
import urllib.request
from pathlib import Path

import pytest

import lem_serve
from testing.schemas import validation_errors


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent

ARTIFACTS = ROOT / "artifacts"  # screenshots from the browser tests (not committed)

ENDPOINTS = ("chat", "completions")

DIALECTS = ("messages", "responses")  # the agents' APIs: Anthropic Messages, OpenAI Responses

PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "messages": "/v1/messages",
         "responses": "/v1/responses"}

HELLO = [{"role": "user", "content": "Hello there, how are you?"}]


# ---------------------------------------------------------------------------
# Fixtures: one model per run, servers on port 0
# ---------------------------------------------------------------------------

LONG_CONTEXT = 1 << 20  # tokens: no machine generates this many within a test's deadline

SHORT_CONTEXT = 64  # tokens: a context smaller than the server's default max_tokens

# What the parrot model says after any prompt ending in a newline, then <|im_end|>: a leading
# space, then characters of 1, 4 and 3 bytes spelled by single-byte tokens (partial characters).
PARROT_SCRIPT = " Paris😊漢字!"

PARROT_PROMPT = "The capital of France is\n"   # completions: ends in a newline, as the parrot needs


@contextlib.contextmanager
def running_server(model, model_dir, **overrides):
    """A real LemServer on a free loopback port, stopped (drained) on exit."""
    settings = lem_serve.Settings(**{"model_path": str(model_dir), "port": 0, "model_name": "tiny", **overrides})
    server = lem_serve.LemServer(settings, model).start()
    try:
        yield server
    finally:
        server.stop(grace=10)

# max_tokens of a reply that streams for as long as a test needs: on any machine, only a hang-up or a deadline ends it
LONG_BUDGET = LONG_CONTEXT // 2


def endless(model: lem_serve.Model, endpoint: str = "chat") -> dict:
    """Fields that make a request to the long model generate until stopped from outside (hang-up, deadline).

    The tiny model never picks end-of-sequence greedily; the bias keeps sampling from it too. The
    dialects have no logit_bias: sampling picks end-of-sequence there ~2e-7 per token (see tiny_model).
    """
    if endpoint in DIALECTS:
        return {"max_tokens": LONG_BUDGET}
    return {"max_tokens": LONG_BUDGET, "logit_bias": {str(t): -100 for t in sorted(model.tokenizer.eos_token_ids)}}


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


def wait_until(predicate, timeout: float = 120.0, interval: float = 0.02) -> bool:
    """Whether predicate() became true. The timeout only bounds a failing test: it is far above what
    any machine, fast or slow, needs for a passing one, so no verdict depends on machine speed."""
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
# The OpenAI request surface: sampling, logprobs, JSON output, tools
# ---------------------------------------------------------------------------

def post(server, endpoint: str, **fields) -> dict:
    reply = request(server, "POST", path_of(endpoint), body_for(endpoint, **fields))
    assert reply.status == 200, reply.raw[:300]
    return reply.json()

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

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                   "required": ["city"]}}}

ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                                  "required": ["a", "b"]}}}

ASK_WEATHER = [{"role": "user", "content": "Weather in Paris?"}]


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


def ask(prompt: str) -> list[dict]:
    """A chat of one user message."""
    return [{"role": "user", "content": prompt}]


# ---------------------------------------------------------------------------
# Real sessions: the prompt cache's budget, the admission queue, memory (issue 21)
# ---------------------------------------------------------------------------

def waiting(srv) -> int:
    return int(metric(scrape(srv), "lem_waiting_requests"))


# ---------------------------------------------------------------------------
# Model options: chat templates and their arguments, sampling defaults, adapters
# ---------------------------------------------------------------------------

# The thinking parrot: its template opens <think> unless enable_thinking is false; after the open
# block it reasons (a tool-call marker included), closes the block and answers; without it, it
# answers directly.
THINKING = "Plan<tool_call>x</tool_call>"

ANSWER = "Answer!"

DIRECT = "Direct reply"


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
        "reasoning_call": "<think>\nLet me think.\n</think>\n\n" + family_calls(QWEN_CALL, "", WEATHER_CALL),
        "quoted_end": "<think>\nLet me think.\n</think>\n\nSplit the reply on </think> once."}),
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

KIMI_THINKING_CALLS = "<|tool_calls_section_begin|>" + "".join(
    KIMI_CALL.replace(":0", f":{i}").format(name, json.dumps(args)) for i, (name, args) in enumerate(
        (WEATHER_CALL, TIME_CALL))) + "<|tool_calls_section_end|>"

FAMILIES["kimi-k2-thinking"] = ("moonshotai-Kimi-K2-Thinking.jinja", {
    "tokens": FAMILIES["kimi-k2"][1]["tokens"] + ("<think>", "</think>"), "end": "<|im_end|>"}, {
    "plain": "<think></think>Hello there.", "reasoning": "<think>Let me think.</think>Paris.",
    "call": "<think></think>" + FAMILIES["kimi-k2"][2]["call"], "parallel": "<think></think>" + KIMI_THINKING_CALLS,
    "reasoning_call": "<think>Let me think.</think>" + FAMILIES["kimi-k2"][2]["call"]})

GLM47_CALL = "<tool_call>{}<arg_key>{}</arg_key><arg_value>{}</arg_value></tool_call>"

GLM47_WEATHER, GLM47_TIME = (GLM47_CALL.format("get_weather", "city", "Paris"),
                              GLM47_CALL.format("get_time", "zone", "CET"))

# The generation prompt opens the think block (<|assistant|><think>): every reply starts inside it.
FAMILIES["glm-4.7"] = ("zai-org-GLM-4.7-Flash.jinja", {
    "tokens": FAMILIES["glm-4.6"][1]["tokens"] + ("<|observation|>", "<tool_response>", "</tool_response>"),
    "end": "<|endoftext|>", "eos": ("<|user|>", "<|observation|>")}, {
    "plain": "</think>Hello there.", "reasoning": "Let me think.</think>Paris.", "call": "</think>" + GLM47_WEATHER,
    "parallel": "</think>" + GLM47_WEATHER + GLM47_TIME, "reasoning_call": "Let me think.</think>" + GLM47_WEATHER,
    "typed_call": "</think><tool_call>get_forecast<arg_key>city</arg_key><arg_value>Paris</arg_value><arg_key>days"
                  '</arg_key><arg_value>3</arg_value><arg_key>hourly</arg_key><arg_value>true</arg_value><arg_key>tags'
                  '</arg_key><arg_value>["a", "b"]</arg_value></tool_call>'})

CODER_CALL = "<tool_call>\n<function={}>\n<parameter={}>\n{}\n</parameter>\n</function>\n</tool_call>"

# A call whose arguments are not all strings: families that write values as bare text (XML-like, Gemma's) read
# them back by the tool's schema.
FORECAST_ARGS = {"city": "Paris", "days": 3, "hourly": True, "tags": ["a", "b"]}

FAMILIES["qwen3-coder"] = ("Qwen-Qwen3-Coder-30B-A3B-Instruct.jinja", {
    "tokens": ("<|im_start|>", "<tool_call>", "</tool_call>"), "end": "<|im_end|>"}, {
    "plain": "Hello there.", "call": CODER_CALL.format("get_weather", "city", "Paris"),
    "parallel": CODER_CALL.format("get_weather", "city", "Paris") + "\n" + CODER_CALL.format("get_time", "zone", "CET"),
    "typed_call": "<tool_call>\n<function=get_forecast>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>"
                  "\n3\n</parameter>\n<parameter=hourly>\ntrue\n</parameter>\n<parameter=tags>\n[\"a\", \"b\"]"
                  "\n</parameter>\n</function>\n</tool_call>"})

# Nemotron 3 Nano writes Qwen3-Coder's calls (mlx_lm infers qwen3_coder), after a think block its generation
# prompt opens (<think>\n): every reply starts inside it.
NEMOTRON3_WEATHER, NEMOTRON3_TIME = (CODER_CALL.format("get_weather", "city", "Paris"),
                                      CODER_CALL.format("get_time", "zone", "CET"))

FAMILIES["nemotron-3-nano"] = ("NVIDIA-Nemotron-3-Nano-30B-A3B.jinja", {
    "tokens": ("<|im_start|>", "<think>", "</think>", "<tool_call>", "</tool_call>"), "end": "<|im_end|>"}, {
    "plain": "</think>\nHello there.", "reasoning": "Let me think.\n</think>\nParis.",
    "call": "</think>\n" + NEMOTRON3_WEATHER, "parallel": "</think>\n" + NEMOTRON3_WEATHER + "\n" + NEMOTRON3_TIME,
    "reasoning_call": "Let me think.\n</think>\n" + NEMOTRON3_WEATHER,
    "typed_call": "</think>\n" + FAMILIES["qwen3-coder"][2]["typed_call"]})

GEMMA_CALL = '<|tool_call>call:{}{{{}:<|"|>{}<|"|>}}<tool_call|>'

GEMMA_WEATHER, GEMMA_TIME = (GEMMA_CALL.format("get_weather", "city", "Paris"),
                              GEMMA_CALL.format("get_time", "zone", "CET"))

# Thinking on (mlx_lm turns it on where the vocabulary has the markers): <|think|> in the system turn, and
# the reply opens its own thought channel.
FAMILIES["gemma-4"] = ("google-gemma-4-31B-it.jinja", {
    "tokens": ("<|turn>", "<|think|>", "<|channel>", "<channel|>", "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>",
               "<|tool_response>", "<tool_response|>", '<|"|>'),
    "end": "<turn|>", "eos": ("<|tool_response>",), "bos": "<bos>", "template_args": {"enable_thinking": True}}, {
    "plain": "Hello there.", "reasoning": "<|channel>thought\nLet me think.<channel|>Paris.", "call": GEMMA_WEATHER,
    "parallel": GEMMA_WEATHER + GEMMA_TIME,
    "reasoning_call": "<|channel>thought\nLet me think.<channel|>" + GEMMA_WEATHER,
    "odd_call": '<|tool_call>call:files.read{file-path:<|"|>a, b<|"|>,opts:{dry-run:true}}<tool_call|>',
    "stray_end": "Paris.<|channel>thought\n<channel|><channel|>",   # as llama.cpp saw Gemma 4 end some answers
    "typed_call": '<|tool_call>call:get_forecast{city:<|"|>Paris<|"|>,days:3,hourly:true,'
                  'tags:[<|"|>a<|"|>,<|"|>b<|"|>]}<tool_call|>'})

# Gemma 4's template as first released: it reads tool results only as `tool_responses` on the calling message.
FAMILIES["gemma-4-april"] = ("google-gemma-4-31B-it-2026-04-02.jinja", *FAMILIES["gemma-4"][1:])

# A call whose name and keys are not \w+ (mlx_lm's Gemma 4 parser loses it), in the families that write one.
FAMILY_EXPECTED["quoted_end"] = ("Split the reply on </think> once.", "Let me think.", [])   # an answer may quote it
FAMILY_EXPECTED["stray_end"] = ("Paris.", "", [])   # a thought closed that was never opened: no marker shown

FAMILY_EXPECTED["typed_call"] = ("", "", [("get_forecast", FORECAST_ARGS)])

FAMILY_EXPECTED["odd_call"] = ("", "", [("files.read", {"file-path": "a, b", "opts": {"dry-run": True}})])

FAMILY_TOOLS = [{"name": "get_weather", "description": "The weather in a city",
                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
                {"name": "get_time", "description": "The time in a zone",
                 "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}},
                {"name": "get_forecast", "description": "The forecast for a city", "parameters": {
                    "type": "object", "required": ["city"], "properties": {
                        "city": {"type": "string"}, "days": {"type": "integer"}, "hourly": {"type": "boolean"},
                        "tags": {"type": "array", "items": {"type": "string"}}}}}]


def dialect_tools_for(endpoint: str) -> list[dict]:
    """FAMILY_TOOLS in the endpoint's own shape."""
    if endpoint == "messages":
        return [{"name": t["name"], "description": t["description"], "input_schema": t["parameters"]}
                for t in FAMILY_TOOLS]
    if endpoint == "responses":
        return [{"type": "function", **t} for t in FAMILY_TOOLS]
    return [{"type": "function", "function": t} for t in FAMILY_TOOLS]


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
                  "<|tool_call", "<|tool_calls_section", "TOOLCALL", "commentary", "<arg_", "<function=",
                  "<parameter=", "tool_call>", "tool_call|>", "<|channel>", "<channel|>", '<|"|>', "call:", "<|turn>")


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


def run_agent(argv: list, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], cwd=cwd, env={"PATH": os.environ["PATH"], **env}, text=True,
                          capture_output=True, stdin=subprocess.DEVNULL, timeout=AGENT_TIMEOUT)


def assert_only_successes(srv, path: str) -> None:
    """Every request the agent made on `path` was answered 200 (no 4xx/5xx it had to retry past)."""
    assert wait_until(lambda: srv.in_flight == 0)
    codes = {labels: value for (name, labels), value in scrape(srv, {"x-api-key": AGENT_KEY}).items()
             if name == "lem_requests_total" and f'endpoint="{path}"' in labels}
    assert codes and all('code="200"' in labels for labels in codes), codes

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
# The chat page in a real browser (Playwright driving Debian's Chromium)
# ---------------------------------------------------------------------------

def health_at(base: str) -> dict:
    """GET /healthz of the server at a base URL such as http://127.0.0.1:PORT."""
    with urllib.request.urlopen(base + "/healthz", timeout=5) as response:
        return json.loads(response.read())


def wait_idle(base: str, seconds: float = 120.0) -> float:
    """Wait until the server at `base` reports no active request; return the seconds it took."""
    started = time.monotonic()
    assert wait_until(lambda: health_at(base)["active_requests"] == 0, timeout=seconds), f"{base} still busy"
    return time.monotonic() - started


def stored(cid: str, title: str, *messages: dict, updated: int = 0) -> dict:
    """A conversation as the page stores it."""
    return {"id": cid, "title": title, "created": updated, "updated": updated, "messages": list(messages)}


def said(role: str, content: str, **fields) -> dict:
    """A stored message; replies default to finished."""
    return {"role": role, "content": content, **({"status": "done"} if role == "assistant" else {}), **fields}


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


def post_bytes(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s"
            % (path.encode(), extra, len(body), body))


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

    assert wait_until(up) and process.poll() is None, process.stderr.read() if process.poll() is not None else ""
    return process, f"127.0.0.1:{port}"


# ---------------------------------------------------------------------------
# Beyond one Mac: a model sharded over an mlx.launch group; replicas behind nginx
# ---------------------------------------------------------------------------

def at(address: str) -> types.SimpleNamespace:
    """What request() and scrape() take, for the server at HOST:PORT (a process from start_process)."""
    host, port = address.rsplit(":", 1)
    return types.SimpleNamespace(server_address=(host, int(port)))


def final_choice(events: list) -> dict:
    return [e for e in events if isinstance(e, dict) and e.get("choices")][-1]["choices"][0]


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


# Characters a random walk through the automaton picks from: JSON's punctuation, digits, escapes, letters,
# a non-ASCII letter, an Arabic-Indic digit and a no-break space (where ECMAScript and re disagree).
WALK_ALPHABET = list('{}[],:" \n\t0123456789-.eE+\\@/_%~?#=&$é٣\u00a0') + list(string.ascii_letters)


def automaton_walks(node: lem_serve.Piece, rng: random.Random, count: int, steps: int = 150):
    """(text, problem) for `count` random walks through `node`'s automaton, each closed by its closing text:
    what any sampler could write. `problem` is None, or says where the automaton left no way on."""
    start = lem_serve.json_start(node)
    for _ in range(count):
        state, text, stuck = start, "", False
        for _ in range(rng.randrange(steps)):
            if lem_serve.json_complete(state) and rng.random() < 0.1:
                break
            options = [ch for ch in WALK_ALPHABET if lem_serve.json_advance(state, ch)]
            if not options:
                stuck = not lem_serve.json_complete(state)
                break
            ch = rng.choice(options)
            state, text = lem_serve.json_advance(state, ch), text + ch
        if stuck:
            yield text, f"dead end after {text!r}"
            continue
        closing = lem_serve.json_closing_text(state)
        if closing is None or not lem_serve.json_complete(lem_serve.json_advance(state, closing)):
            yield text, f"no closing text after {text!r}"
            continue
        yield text + closing, None
