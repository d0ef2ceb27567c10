"""lem-serve: an OpenAI-compatible inference server for MLX models, in one file.

Serves one MLX / Hugging Face model over HTTP:

    POST /v1/chat/completions   chat, streaming (Server-Sent Events) or not
    POST /v1/completions        plain text completion, streaming or not
    POST /v1/messages           Anthropic's Messages API (Claude Code), streaming or not
    POST /v1/messages/count_tokens   the prompt's token count, as a create would report it
    POST /v1/responses          OpenAI's Responses API (Codex), streaming or not
    POST /v1/embeddings         vectors from the model, or from a second --embedding-model
    GET  /v1/responses/ID       a response kept with store: true (bounded, in memory)
    GET  /v1/models[/ID]        the one model, in OpenAI's shape or (anthropic-version) Anthropic's
    GET  /healthz               liveness and load, 503 once the engine has died
    GET  /metrics               Prometheus text: requests, tokens, latency, memory
    GET  /  and  /chat.js       a small chat page for the browser

Run it:

    pip install -r requirements.txt
    python lem_serve.py --model-path ./model          # http://127.0.0.1:8090/

and point the `openai` SDK at it with base_url="http://127.0.0.1:8090/v1", the
`anthropic` SDK or Claude Code at http://127.0.0.1:8090, Codex at .../v1 with
wire_api = "responses".

Security: the server binds to loopback unless told otherwise. Anyone who can
reach the port can run the model; before binding to another interface set
--api-key (or LEM_API_KEY, it covers /v1/* and /metrics; clients send it as
'Authorization: Bearer KEY' or 'x-api-key: KEY') and put it behind
TLS. On loopback it answers only to loopback Host names (DNS rebinding);
browser pages from other origins are refused unless --allowed-origins lists
them. It never reads a file from disk on a client's behalf.

Layout, each section calling only the ones above it: defaults; settings and
CLI; errors; structured output; request; prompt and sampling; group; engine;
dialects, one subsection each (what they share; OpenAI chat/completions;
Anthropic messages; OpenAI Responses; models, embeddings, and each endpoint's
writer); metrics; handler; server and main().
"""

from __future__ import annotations

import argparse
import array
import base64
import codecs
import collections
import contextlib
import copy
import dataclasses
import functools
import hashlib
import hmac
import html
import http.server
import importlib.util
import io
import itertools
import json
import logging
import math
import os
import platform
import pickle
import queue
import re
import secrets
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
import zlib
from dataclasses import dataclass
from fractions import Fraction
from http import HTTPStatus
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, NoReturn

try:
    from re import _parser as sre   # the stdlib's regex parser (Python 3.11+)
except ImportError:   # before 3.11 (this file still runs far enough there to say it needs 3.11)
    import sre_parse as sre

# MLX is imported inside the engine functions, not here: --threads must reach
# the numeric libraries' thread pools through the environment before MLX loads.

__version__ = "0.1.0"


# ---------------------------------------------------------------------------
# Defaults: every tunable in one place
# ---------------------------------------------------------------------------

DEFAULT_BIND = "127.0.0.1:8090"   # HOST:PORT to listen on; loopback unless asked
DEFAULT_THREADS = 0               # CPU threads for numeric libraries; 0 = all cores, else 1..cores
DEFAULT_MAX_TOKENS = 4096         # default and ceiling for a request's max_tokens; >= 1
DEFAULT_TIMEOUT = 300             # seconds one request may take, prompt included; > 0
DEFAULT_MAX_REQUESTS = 4          # requests generating at once in one batch (more wait in the queue); >= 1
DEFAULT_QUEUE_TIMEOUT = 60        # seconds a request may wait for a slot and KV room before its 429; 0 = 429 at once
DEFAULT_MAX_CONTEXT = 0           # chat window: other messages kept besides system ones, in whole turns; 0 = all
BATCH_RESERVE_TOKENS = 8192       # default prompt cache budget: KV tokens per slot left to the running batch (<= half of KV memory)
DEFAULT_PROMPT_CACHE_DISK_BYTES = 16 << 30  # --prompt-cache-dir: bytes of saved prefixes kept on disk, oldest out first
PROMPT_CACHE_SAVE_TOKENS = 1024   # --prompt-cache-dir: a new prefix at least this long is written at once (others at shutdown)
DEFAULT_LOG_LEVEL = "info"        # debug, info, warning or error
DEFAULT_REASONING_FORMAT = "auto" # auto: a thinking model's reasoning leaves the reply's text; none: tags stay inline
REASONING_PROMPT_TAIL = 64        # prompt tokens searched for a thinking block the template opened
FORCED_CALL_THINKING_SHARE = 0.5  # of a forced tool call's max_tokens (less the call's markers), what its reasoning may use (0-1)
DEFAULT_NUM_DRAFT_TOKENS = 3      # tokens a --draft-model proposes per step; >= 1
DEFAULT_KV_GROUP_SIZE = 64        # --kv-bits quantization group size (mlx_lm's); 32, 64 or 128
DEFAULT_QUANTIZED_KV_START = 5000 # --kv-bits: tokens of context kept exact before the cache is quantized (mlx_lm's); >= 0
PROMPT_CACHE_MAX_ENTRIES = 64     # finished requests whose KV cache is kept (the byte budget binds first)
DEFAULT_MAX_EMBEDDING_TOKENS = 8192  # tokens one embeddings input may have (less if the model's context is shorter); >= 1
MAX_EMBEDDING_INPUTS = 2048       # inputs in one embeddings request, as OpenAI allows
EMBEDDING_BATCH_TOKENS = 4096     # padded tokens (rows x longest row) per embedding forward pass; a longer input runs alone
MAX_BODY_BYTES = 8 * 1024 * 1024  # largest request body accepted; bigger gets 413
MAX_STOP_STRINGS = 4              # stop strings per request, as OpenAI allows
MAX_STOP_CHARS = 1000             # characters per stop string; longer is a 400
MAX_STOP_SEQUENCES = 64           # Anthropic stop_sequences per request (its API takes more than OpenAI's 4)
DEFAULT_RESPONSE_STORE_COUNT = 256      # Responses kept for previous_response_id and GET (store: true); 0 = none
DEFAULT_RESPONSE_STORE_BYTES = 64 << 20 # bytes of JSON those kept responses may hold in all; oldest go first
THINKING_MIN_BUDGET = 1024        # Anthropic's smallest thinking.budget_tokens; it must also be below max_tokens
RAW_ARGUMENTS_KEY = "input"       # a tool call's arguments that are no JSON object are wrapped under this key
MAX_TOP_LOGPROBS_CHAT = 20        # chat top_logprobs ceiling, as OpenAI allows
MAX_LOGPROBS_COMPLETIONS = 5      # completions logprobs ceiling, as OpenAI allows
JSON_MAX_DIGITS = 15              # digits per part of a constrained number (float precision; keeps output finite)
JSON_MAX_WHITESPACE = 24          # whitespace characters between two JSON tokens of constrained output (newlines, indents)
JSON_MAX_NESTING = 16             # arrays/objects nested in free JSON (json_object, schemas without a type)
SCHEMA_MAX_DEPTH = 64             # nesting a schema may have; more is a 400
SCHEMA_MAX_REFS = 8               # $ref hops on one path; a recursive schema is unrolled this deep, then ends
SCHEMA_MAX_BRANCHES = 16          # alternatives one not/if/dependencies keyword may expand into; more is a 400
SCHEMA_MAX_MIN_COUNT = 1000       # largest minLength, minItems, minProperties, minContains (1-10**5); more is a 400
SCHEMA_MAX_MIN_TEXT = 100000      # characters of a schema's shortest value (nested minimums multiply; 10**4-10**6;
                                  # more is a 400)
REGEX_MAX_STATES = 5000           # NFA states of one pattern or format once repeats are expanded; more is a 400
REGEX_MAX_SEARCH = 10000          # DFA states, or (state, length) pairs under minLength, one search for a shortest
                                  # completion visits (at compile: past it a 400; while decoding: a state past it
                                  # counts as dead, so output stays valid)
JSON_MASK_CACHE_STATES = 1024     # token masks cached per constraint (vocab bytes each; one per state seen)
JSON_CONSTRAINT_CACHE = 16        # compiled constraints kept across requests (same schema: warm masks)
SOCKET_TIMEOUT = 30.0             # seconds a socket read or write may stall before the connection is dropped
POLL_SECONDS = 0.05               # how often a waiting handler checks its client, clock and engine
KEEPALIVE_SECONDS = 5.0           # silence on a stream before an SSE comment is sent to keep proxies open
SHUTDOWN_GRACE_SECONDS = 30.0     # on SIGINT/SIGTERM, how long in-flight requests get to finish
PREFILL_STEP_TOKENS = 2048        # prompt tokens per forward pass; cancellation is checked between passes
HEARTBEAT_SECONDS = 1.0           # sharded: an idle rank 0 tells the other ranks it is alive this often; > 0
LIFELINE_SECONDS = 10.0           # sharded: how long the ranks may take to connect their lifelines at start
RETRY_AFTER_SECONDS = 1           # Retry-After sent with 429 while no slot has freed yet to estimate from
RETRY_AFTER_MAX_SECONDS = 60      # the longest Retry-After estimated from how fast slots free
RELEASES_REMEMBERED = 32          # slot releases the Retry-After estimate looks back on
HEADER_TIMEOUT = 10.0             # seconds from waiting for a request to having its headers; then the connection is dropped
BODY_TIMEOUT = 60.0               # seconds a request body may take to arrive in full; slower gets 408
MAX_CONNECTIONS = 256             # connections served at once (one thread each); more are closed on accept; >= 1
MAX_JSON_DEPTH = 64               # nesting of arrays and objects in a request body; deeper gets 400
DEFAULT_ALLOWED_ORIGINS = ""      # comma-separated browser origins allowed cross-origin (CORS); "" = none, "*" = any
CORS_MAX_AGE_SECONDS = 600        # how long a browser may cache a CORS preflight answer
WINDOW_HEADER = "X-Lem-Messages-Dropped"  # chat responses: how many leading non-system messages the window left out
LOOPBACK_HOST_NAMES = ("localhost", "127.0.0.1", "::1")  # Host header names accepted when bound to loopback
METRICS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)  # histogram bounds, seconds

log = logging.getLogger("lem_serve")


# ---------------------------------------------------------------------------
# Settings and CLI
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    """Everything the command line decides, validated."""

    model_path: str
    host: str = "127.0.0.1"
    port: int = 8090
    threads: int = DEFAULT_THREADS
    max_tokens: int = DEFAULT_MAX_TOKENS
    timeout: float = DEFAULT_TIMEOUT
    max_requests: int = DEFAULT_MAX_REQUESTS
    queue_timeout: float = DEFAULT_QUEUE_TIMEOUT  # seconds a request waits for admission before 429; 0: at once
    max_context: int = DEFAULT_MAX_CONTEXT
    api_key: str | None = None
    model_name: str = ""
    prompt_cache_bytes: int | None = None  # None: sized from the machine and the model (plan_memory)
    memory_bytes: int | None = None        # what weights + KV may take in all; None: the machine's (machine_memory)
    prompt_cache_dir: str | None = None    # where prefixes are saved to outlive a restart; None: memory only
    prompt_cache_disk_bytes: int = DEFAULT_PROMPT_CACHE_DISK_BYTES
    log_level: str = DEFAULT_LOG_LEVEL
    allowed_origins: tuple[str, ...] = ()  # browser origins served cross-origin; "*" = any
    sampling: dict = dataclasses.field(default_factory=dict)  # defaults for unset sampling fields (sampling_defaults)
    chat_template: str | None = None     # replaces the model's chat template (the template's text)
    chat_template_args: dict = dataclasses.field(default_factory=dict)  # keyword arguments every template call gets
    adapter_path: str | None = None      # LoRA/DoRA adapters trained with mlx_lm.lora
    trust_remote_code: bool = False      # let the tokenizer run code shipped with the model
    reasoning_format: str = DEFAULT_REASONING_FORMAT  # "auto": reasoning split out of the reply; "none": tags inline
    draft_model: str | None = None       # a small model of the same tokenizer, for speculative decoding
    num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS
    kv_bits: int | None = None           # quantize the KV cache to 4 or 8 bits; None: full precision
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START
    pipeline: bool = False                 # sharded: split the model's layers over the ranks, not each layer
    embedding_model: str | None = None     # a second model that serves /v1/embeddings; None: the chat model does
    max_embedding_tokens: int = DEFAULT_MAX_EMBEDDING_TOKENS  # tokens per embeddings input
    response_store_count: int = DEFAULT_RESPONSE_STORE_COUNT  # /v1/responses kept for previous_response_id
    response_store_bytes: int = DEFAULT_RESPONSE_STORE_BYTES

    @property
    def is_loopback(self) -> bool:
        """True when only this machine can reach the listening socket."""
        return self.host in ("localhost", "::1") or self.host.startswith("127.")


def parse_bind(value: str) -> tuple[str, int]:
    """Split HOST:PORT (IPv6 as [::1]:PORT); raise ValueError when malformed."""
    host, sep, port = value.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ValueError(f"--bind wants HOST:PORT, got {value!r}")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def parse_origins(value: str) -> tuple[str, ...]:
    """Split a comma-separated origin list; raise ValueError on an entry that is not one.

    An origin is scheme://host[:port] exactly as a browser sends it in the
    Origin header (no path, no trailing slash), or "*" for any origin.
    """
    origins = tuple(o.strip().rstrip("/") for o in value.split(",") if o.strip())
    for origin in origins:
        scheme, sep, rest = origin.partition("://")
        if origin != "*" and (not sep or scheme not in ("http", "https") or not rest or "/" in rest):
            raise ValueError(f"--allowed-origins wants scheme://host[:port] entries or *, got {origin!r}")
    return origins


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        number = int(text)
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {number}")
        return number
    parse.__name__ = f"integer >= {minimum}"
    return parse


def _between(low: float, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        number = float(text)
        if not low <= number <= high:  # NaN fails too
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {text}")
        return number
    parse.__name__ = f"number between {low} and {high}"
    return parse


def parse_bytes(text: str) -> int:
    """A byte count such as 1073741824, 512M or 2G (powers of 1024)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B")
    scale = units.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in units else text
    if not (number.isascii() and number.isdigit()):
        raise argparse.ArgumentTypeError(f"wants a byte count such as 1073741824, 512M or 2G, got {text!r}")
    return int(number) * scale


def parse_bytes_or_auto(text: str) -> int | None:
    """parse_bytes, or None for "auto"."""
    return None if text.strip().lower() == "auto" else parse_bytes(text)


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, except that a bad command line is one line on stderr and exit 2.

    argparse's own error() prints the whole usage block first; a script or a
    service manager's log is easier to read with just the reason.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see --help)\n")


def add_serving_flags(p: argparse.ArgumentParser) -> None:
    """Flags for what is served and to whom: the model, the socket, request limits, the key."""
    p.add_argument("--model-path", required=True, help="local MLX/Hugging Face model folder, or a Hub repo id")
    p.add_argument("--bind", default=DEFAULT_BIND, help="HOST:PORT to listen on (default %(default)s)")
    p.add_argument("--threads", type=_at_least(0), default=DEFAULT_THREADS, help="CPU threads for numeric libraries, 0 = all")
    p.add_argument("--max-tokens", type=_at_least(1), default=DEFAULT_MAX_TOKENS, help="default and ceiling for max_tokens")
    p.add_argument("--timeout", type=_at_least(1), default=DEFAULT_TIMEOUT, help="seconds one request may take")
    p.add_argument("--max-requests", type=_at_least(1), help=f"requests generating at once, batched (default "
                   f"{DEFAULT_MAX_REQUESTS}; 1 with --draft-model or --kv-bits); more wait in the queue")
    p.add_argument("--queue-timeout", type=_at_least(0), default=DEFAULT_QUEUE_TIMEOUT,
                   help="seconds a request waits for a slot and memory before it gets 429 (default %(default)s); "
                        "0 = 429 at once")
    p.add_argument("--max-context", type=_at_least(0), default=DEFAULT_MAX_CONTEXT, help="chat messages kept (sliding window), 0 = all")
    p.add_argument("--api-key", default=os.environ.get("LEM_API_KEY") or None, help="require 'Authorization: Bearer KEY' on /v1/* and /metrics (default: env LEM_API_KEY)")
    p.add_argument("--model-name", default="", help="model id shown to clients (default: the model folder's name)")


def add_memory_flags(p: argparse.ArgumentParser) -> None:
    """Flags for memory (weights, KV caches, the prompt cache in memory and on disk), logs and origins."""
    p.add_argument("--prompt-cache-bytes", type=parse_bytes_or_auto, default=None,
                   help="bytes of KV cache kept for prompt-prefix reuse, e.g. 512M or 2G; 0 = off; default auto: "
                        "the memory left after the weights and a reserve for the running batch")
    p.add_argument("--memory-bytes", type=parse_bytes,
                   help="memory the model's weights and KV caches may take in all (default: Metal's recommended "
                        "working set, else physical memory)")
    p.add_argument("--prompt-cache-dir", help="folder where cached prefixes are saved, to be reused after a restart")
    p.add_argument("--prompt-cache-disk-bytes", type=parse_bytes, default=DEFAULT_PROMPT_CACHE_DISK_BYTES,
                   help="bytes of saved prefixes kept in --prompt-cache-dir, oldest out first (default 16G)")
    p.add_argument("--log-level", default=DEFAULT_LOG_LEVEL, choices=["debug", "info", "warning", "error"])
    p.add_argument("--allowed-origins", default=DEFAULT_ALLOWED_ORIGINS,
                   help="comma-separated browser origins (e.g. http://localhost:3000) allowed to call this server "
                        "cross-origin, or * for any; default: none (cross-origin browser requests get 403)")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """Flags for how the model runs: sampling defaults, templates, adapters, drafts, KV bits, embeddings."""
    p.add_argument("--temp", type=_between(0, 2), help="default temperature, 0 to 2 (default: the model's "
                                                         "generation_config.json, else 1)")
    p.add_argument("--top-p", type=_between(0, 1), help="default top_p, 0 to 1 (default: generation_config.json, else 1)")
    p.add_argument("--top-k", type=_at_least(0), help="default top_k (default: generation_config.json, else 0 = off)")
    p.add_argument("--min-p", type=_between(0, 1), help="default min_p, 0 to 1 (default: generation_config.json, "
                                                         "else 0 = off)")
    p.add_argument("--chat-template", help="a Jinja chat template, or a file holding one, to use instead of the model's")
    p.add_argument("--chat-template-args", type=parse_template_args, default={},
                   help="""JSON object of arguments for every chat template call, e.g. '{"enable_thinking": false}'""")
    p.add_argument("--adapter-path", help="folder of LoRA/DoRA adapters trained with mlx_lm.lora")
    p.add_argument("--trust-remote-code", action="store_true", help="let the tokenizer run code shipped with the model")
    p.add_argument("--draft-model", help="a small model with the same tokenizer for speculative decoding "
                                         "(serves one request at a time: --max-requests 1)")
    p.add_argument("--num-draft-tokens", type=_at_least(1), default=DEFAULT_NUM_DRAFT_TOKENS,
                   help="tokens the draft model proposes per step (default %(default)s)")
    p.add_argument("--kv-bits", type=int, choices=[4, 8], help="quantize the KV cache to 4 or 8 bits "
                   "(serves one request at a time: --max-requests 1)")
    p.add_argument("--kv-group-size", type=int, choices=[32, 64, 128], default=DEFAULT_KV_GROUP_SIZE,
                   help="group size of the quantized KV cache (default %(default)s)")
    p.add_argument("--quantized-kv-start", type=_at_least(0), default=DEFAULT_QUANTIZED_KV_START,
                   help="context tokens kept exact before the KV cache is quantized (default %(default)s)")
    p.add_argument("--reasoning-format", choices=["auto", "none"], default=DEFAULT_REASONING_FORMAT,
                   help="auto: a thinking model's reasoning goes to reasoning_content (and thinking blocks), "
                        "not the reply's text; none: the raw <think> tags stay in the text")
    p.add_argument("--embedding-model", help="a model folder (e.g. Qwen3-Embedding) that serves /v1/embeddings, "
                                             "loaded beside the chat model; default: the chat model serves them")
    p.add_argument("--max-embedding-tokens", type=_at_least(1), default=DEFAULT_MAX_EMBEDDING_TOKENS,
                   help="tokens one /v1/embeddings input may have (default %(default)s, or the model's context if less)")
    p.add_argument("--response-store-count", type=_at_least(0), default=DEFAULT_RESPONSE_STORE_COUNT,
                   help="/v1/responses made with store: true kept in memory for previous_response_id and "
                        "GET /v1/responses/ID (default %(default)s; 0 = none)")
    p.add_argument("--response-store-bytes", type=parse_bytes, default=DEFAULT_RESPONSE_STORE_BYTES,
                   help="bytes those kept responses may hold in all, e.g. 64M; the oldest go first (default 64M)")
    p.add_argument("--pipeline", action="store_true",
                   help="under mlx.launch: shard the model by layers (pipeline parallel) instead of within each layer")


def build_arg_parser() -> argparse.ArgumentParser:
    """The command line; names and defaults are part of the contract (--help lists them in this order)."""
    p = OneLineArgumentParser(prog="lem_serve.py", description=__doc__.splitlines()[0])
    add_serving_flags(p)
    add_memory_flags(p)
    add_model_flags(p)
    return p


# Chat template arguments the server itself sets; a client may not (chat_template would let it run its own template).
TEMPLATE_RESERVED = frozenset({"conversation", "messages", "tools", "documents", "add_generation_prompt",
                               "continue_final_message", "tokenize", "return_dict", "return_tensors", "padding",
                               "truncation", "max_length", "chat_template", "tokenizer_kwargs"})


def parse_template_args(text: str) -> dict:
    """--chat-template-args: a JSON object of chat template arguments the server does not set itself."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"wants a JSON object, got {text!r}: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"wants a JSON object, got {text!r}")
    if set(value) & TEMPLATE_RESERVED:
        raise argparse.ArgumentTypeError(f"sets {sorted(set(value) & TEMPLATE_RESERVED)[0]!r}, which the server sets itself")
    return value


def read_chat_template(value: str | None) -> str | None:
    """--chat-template: a file's text when it names a file, else the template itself."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if "\n" not in value and "{" not in value and path.is_file():
        return path.read_text(encoding="utf-8")
    if "{" not in value:
        raise ValueError(f"--chat-template wants a Jinja template or a file holding one; {value!r} is neither")
    return value


def sampling_flags(args: argparse.Namespace) -> dict:
    """The sampling defaults the command line sets: {field: value} for the flags given."""
    given = {"temperature": args.temp, "top_p": args.top_p, "top_k": args.top_k, "min_p": args.min_p}
    return {name: value for name, value in given.items() if value is not None}


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Parse argv into Settings; a bad command line exits 2 with one line on stderr."""
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    try:
        host, port = parse_bind(args.bind)
        origins = parse_origins(args.allowed_origins)
        template = read_chat_template(args.chat_template)
        solo = bool(args.draft_model or args.kv_bits)
        if solo and args.max_requests not in (None, 1):
            raise ValueError("--draft-model and --kv-bits serve one request at a time: use --max-requests 1")
        if args.prompt_cache_dir is not None:
            check_cache_dir(Path(args.prompt_cache_dir))
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    model_name = args.model_name or default_model_name(args.model_path)
    return Settings(
        model_path=args.model_path, host=host, port=port, threads=args.threads,
        max_tokens=args.max_tokens, timeout=float(args.timeout),
        max_requests=args.max_requests or (1 if solo else DEFAULT_MAX_REQUESTS), queue_timeout=float(args.queue_timeout),
        memory_bytes=args.memory_bytes, prompt_cache_dir=args.prompt_cache_dir,
        prompt_cache_disk_bytes=args.prompt_cache_disk_bytes,
        max_context=args.max_context, api_key=args.api_key, model_name=model_name,
        prompt_cache_bytes=args.prompt_cache_bytes, log_level=args.log_level, allowed_origins=origins,
        sampling=sampling_flags(args), chat_template=template, chat_template_args=args.chat_template_args,
        adapter_path=args.adapter_path, trust_remote_code=args.trust_remote_code,
        reasoning_format=args.reasoning_format, draft_model=args.draft_model,
        num_draft_tokens=args.num_draft_tokens, kv_bits=args.kv_bits, kv_group_size=args.kv_group_size,
        quantized_kv_start=args.quantized_kv_start,
        pipeline=args.pipeline, response_store_count=args.response_store_count,
        response_store_bytes=args.response_store_bytes, embedding_model=args.embedding_model,
        max_embedding_tokens=args.max_embedding_tokens,
    )


def check_cache_dir(folder: Path) -> None:
    """Create --prompt-cache-dir if needed; raise ValueError when it cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".lem-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"--prompt-cache-dir {str(folder)!r} cannot be written: {exc.strerror or exc}") from None


def runtime_problem() -> str | None:
    """What to install before this file can serve, in one line; None when all is there.

    This file parses on old Pythons so that it can say so: mlx-lm needs 3.11,
    and macOS's own python3 is 3.9.
    """
    if sys.version_info < (3, 11):
        return (f"lem_serve: needs Python 3.11 or newer, this is {platform.python_version()} ({sys.executable}); "
                "on a Mac: brew install python@3.12 (or uv python install 3.12), then python3.12 -m venv .venv "
                "&& . .venv/bin/activate && pip install -r requirements.txt")
    missing = [name for name in ("mlx", "mlx_lm") if importlib.util.find_spec(name) is None]
    if missing:
        return (f"lem_serve: {' and '.join(missing)} not installed in {sys.executable}; run: pip install -r "
                "requirements.txt (on Linux: pip install 'mlx[cpu]' mlx-lm; with an NVIDIA GPU: "
                "pip install 'mlx[cuda]' mlx-lm)")
    return None


def default_model_name(model_path: str) -> str:
    """A local folder's own name, or a Hub repo id as given."""
    path = Path(model_path)
    return path.resolve().name if path.exists() else model_path


def apply_thread_cap(threads: int) -> None:
    """Cap the numeric libraries' CPU thread pools; call before MLX is imported."""
    if threads <= 0:
        return
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
        os.environ[var] = str(threads)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

# Anthropic's error type for each status; other 4xx are invalid_request_error, other 5xx api_error.
ANTHROPIC_ERROR_TYPES = {
    HTTPStatus.BAD_REQUEST: "invalid_request_error", HTTPStatus.UNAUTHORIZED: "authentication_error",
    HTTPStatus.FORBIDDEN: "permission_error", HTTPStatus.NOT_FOUND: "not_found_error",
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: "request_too_large", HTTPStatus.TOO_MANY_REQUESTS: "rate_limit_error",
    HTTPStatus.GATEWAY_TIMEOUT: "timeout_error",
}


class APIError(Exception):
    """A failure to report to the client, in the shape of the API it called.

    Raise it anywhere below the handler; the handler catches it once per
    request and renders OpenAI's {"error": {"message", "type", "param",
    "code"}} (`body`), or Anthropic's {"type": "error", "error": {"type",
    "message"}} (`anthropic_body`) on /v1/messages.
    """

    def __init__(self, status: HTTPStatus, type: str, message: str,
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.type = type
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        """The JSON body OpenAI clients expect."""
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}

    def anthropic_error(self) -> dict:
        """Anthropic's error object {"type", "message"} (a stream's error event carries it alone);
        the type follows from the status."""
        fallback = "invalid_request_error" if self.status < 500 else "api_error"
        kind = ANTHROPIC_ERROR_TYPES.get(self.status, fallback)
        return {"type": kind, "message": self.message}

    def anthropic_body(self, request_id: str | None) -> dict:
        """The JSON body Anthropic clients expect: the envelope, its error object and the request's id."""
        return {"type": "error", "error": self.anthropic_error(), "request_id": request_id}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 for a request that is malformed or out of range."""
    return APIError(HTTPStatus.BAD_REQUEST, "invalid_request_error", message, param, code)


def server_busy(retry_after: int = RETRY_AFTER_SECONDS, waited: float = 0) -> APIError:
    """The 429 for a request that found no slot and KV memory in time; Retry-After says when to retry."""
    wait = f" within {waited:g} s (--queue-timeout)" if waited else ""
    return APIError(HTTPStatus.TOO_MANY_REQUESTS, "rate_limit_error",
                    f"server busy: no generation slot and memory for this request came free{wait}, retry shortly",
                    code="server_busy", headers={"Retry-After": str(retry_after)})


def request_timed_out(seconds: float) -> APIError:
    """The 504 for a request that ran past the server's --timeout (prompt included)."""
    return APIError(HTTPStatus.GATEWAY_TIMEOUT, "timeout_error",
                    f"request took longer than the server's {seconds:g} s limit", code="timeout")


def engine_unavailable() -> APIError:
    """The 503 once the engine thread has died: every later request gets it until a restart."""
    return APIError(HTTPStatus.SERVICE_UNAVAILABLE, "server_error",
                    "the generation engine has stopped; restart the server", code="engine_unavailable")


def internal_error() -> APIError:
    """The 500 for an unexpected failure while generating; the details go to the log, not the client."""
    return APIError(HTTPStatus.INTERNAL_SERVER_ERROR, "server_error",
                    "internal error while generating; see the server log", code="internal_error")


class ClientGone(Exception):
    """The client closed its connection; nothing more can be written to it."""


# ---------------------------------------------------------------------------
# Structured output: JSON Schema compiled to a character automaton, lifted to token masks
# ---------------------------------------------------------------------------

# -- JSON Schema, compiled to a character automaton ----------------------------
# compile_schema() turns a schema into pieces: Literals (enum, const, true/false/null, keys), Leaf (a Regex over
# a string's decoded characters with lengths, or over a number's text), Container (objects, arrays) and Union
# (anyOf). json_advance() runs them over text as a pushdown automaton: a state is a tuple of stacks, one per live
# anyOf branch, of Frames (innermost last); it hashes, so token masks are cached per state. A piece has frame(ex),
# its value's first frame under an exclusion `ex` (texts it may not be: unique items, extra keys); step(frame, ch)
# -> frame tuples that replace it (() pops it; led by REFEED: pushed, the new top takes `ch`); done(frame): the
# value is complete (its parent may take `ch`); finish(frame): a short text completing it; min_text, the shortest.

JSON_WHITESPACE = " \t\n\r"
REFEED = "refeed"

# Patterns are ECMAScript's, read by re's parser (sre) into an NFA, then lazily a DFA. \d \w \s '.' are (narrow, wide)
# sets (what ECMAScript and re both match, what either may): classes take narrow, [^...] wide; negated parts, reversed.
ESCAPE = r"\\(?:x[\da-fA-F]{2}|u[\da-fA-F]{4}|0\d?|.|$)"
GOOD_ESCAPE = re.compile(r"\\([dDwWsSbtnvfr0]|x..|u....|[^\dA-Za-z])", re.S)   # what both dialects read alike
ECMA_TOKEN = re.compile(rf"(\[\^?\]?)((?:\\.|[^\\\]])*)\]|{ESCAPE}|\(\?(?:<[\w$]+>|[:=!])?|\{{,|.", re.S)
CLASS_ITEM = re.compile(rf"({ESCAPE}|[^\\])-({ESCAPE}|[^\\])|{ESCAPE}|.", re.S)   # a range or one character
REFUSED_TOKENS = {"(?": "lookbehind (?<=...) and inline flags (?...) are not supported", "[": "unbalanced '['",
                  "\\b": "the escape \\b is not supported",
                  "{,": "'{,' is a literal to ECMAScript but a repeat to Python's re (validators): write \\{, or {0,n}"}
DOT = [(sre.NEGATE, None), *((sre.LITERAL, code) for code in (10, 13, 0x2028, 0x2029))]   # ECMAScript's; re's: [:2]
SHORTHANDS = {"DIGIT": ("0-9", "\\d"), "WORD": ("0-9A-Za-z_", "\\w"), "SPACE": ("\\t-\\r ", "\\s\\ufeff")}
SAMPLE_CODES = [*range(48, 58), *range(97, 123), *range(65, 91), *range(32, 127), *range(0, 32), *range(127, 0x250),
                0x660, 0x2028, 0x2029, 0x3000, 0xfeff, 0x4e00, 0x1f600]
ANYTHING = (sre.MAX_REPEAT, (0, sre.MAXREPEAT, [(sre.IN, [(sre.NEGATE, None)])]))


def regex_items(pattern: str | tuple, search: bool, negated: bool) -> list[tuple[list, bool]]:
    """(re's parse items, negated) for one part: the pattern (searched: anywhere), then its leading lookaheads as
    parts the text must (not) start with. A ValueError names what ECMAScript and re read apart, or re cannot read
    (backreferences, \\b, \\A, "{,", lookbehind, inline flags)."""
    if not isinstance(pattern, str):
        return [([("multiples", pattern)], negated)]
    if bad := [text for text in re.findall(ESCAPE, pattern, re.S) if not GOOD_ESCAPE.fullmatch(text)]:
        raise ValueError(f"the escape {bad[0]} is not supported")
    out = []
    for token in ECMA_TOKEN.finditer(pattern):
        if token[0] in REFUSED_TOKENS:
            raise ValueError(REFUSED_TOKENS[token[0]])
        out.append(token[1] or ("(" if token[0].startswith("(?<") else token[0]))   # names may repeat
        for item in CLASS_ITEM.finditer(token[2] or ""):
            ends = [item[1], item[2]] if item[1] else [item[0]]
            dash = "\\-" if any(re.fullmatch(r"\\[dDwWsS]", end) for end in ends) else "-"
            out.append(dash.join(end if end[0] == "\\" else re.escape(end) for end in ends))
        out.append("]" * (token[1] is not None))
    try:
        items = list(sre.parse("".join(out)))
    except (re.error, OverflowError) as exc:
        raise ValueError(str(exc)) from None
    looks, start = [], (sre.AT, sre.AT_BEGINNING)
    while not negated and items[:1] == [start] and items[1:2] and items[1][0] in (sre.ASSERT, sre.ASSERT_NOT):
        op, (_, body) = items.pop(1)
        looks.append(([start, *body, ANYTHING], op is sre.ASSERT_NOT))
    if search and items and items[-1][0] is sre.ASSERT:   # a trailing (?=...): part of what is searched
        items[-1] = (sre.SUBPATTERN, (None, 0, 0, items[-1][1][1]))
    return [([ANYTHING, *items, ANYTHING] if search else items, negated)] + looks


class Regex:
    """Regular expressions that must all match, as one lazy DFA over character classes (ids: the sets a character is
    in). `parts`: (pattern, search[, negated]), searched anywhere (`pattern`) or matched whole (formats). A state is
    a frozenset of NFA states, ~s for s reached through a '$' (no more characters); None is dead."""

    def __init__(self, parts: tuple):
        self.source, self.edges, self.charsets, self.parts, self.owner = parts, [], {}, [], []
        for pattern, search, *negated in parts:   # (pattern, search[, negated: must not match])
            for items, negated in regex_items(pattern, search, negated == [True]):
                self.wide, first = negated, self._new()   # a part that must not match reads its sets widely
                self.parts.append((first, self._build(items, first), negated))
        self.needed = {i for i, part in enumerate(self.parts) if not part[2]}   # the parts that must match
        self.start = self._closure({first for first, _, _ in self.parts}, True)
        self.class_ids, self.sigs, self.moves, self.longer = {}, [], {}, {}   # char -> id -> signature; 2 caches
        edges = [c for _, ranges, _ in self.charsets for lo, hi in ranges for c in (lo - 1, lo, hi, hi + 1)]
        self.reps = {}   # class id -> a character of it, the first in a sample covering every set's edges
        for ch in [chr(c) for c in SAMPLE_CODES + edges if 0 <= c <= 0x10ffff and not 0xd800 <= c <= 0xdfff]:
            self.reps.setdefault(self.class_id(ch), ch)
        if self.shortest(self.start) is None:
            raise ValueError("the pattern matches nothing" if self._tail(self.start, True) else   # disjoint() reads it
                             f"no match within {REGEX_MAX_SEARCH} states of its automaton")

    def __reduce__(self) -> tuple:   # a constraint travels pickled to other ranks (GroupLink): `is ANY_TEXT` holds
        return shared_regex, (self.source,)

    def _new(self, sources: list[int] = (), key: Any = None) -> int:
        """A new NFA state of the part being built, with edges from `sources` (`key`: a charset, None, "^", "$")."""
        if len(self.edges) >= REGEX_MAX_STATES:
            raise ValueError(f"the pattern is too large (over {REGEX_MAX_STATES} states once repeats are expanded)")
        for state in sources:
            self.edges[state].append((key, len(self.edges)))
        self.edges.append([])
        self.owner.append(len(self.parts))
        return len(self.edges) - 1

    def _build(self, items: list, state: int) -> int:
        """The NFA for re's parse `items` from `state`; returns its final state."""
        for op, arg in items:
            if op in (sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN):
                state = self._new([state], self._charset(op, arg))
            elif op is sre.AT and arg in (sre.AT_BEGINNING, sre.AT_END):
                state = self._new([state], "^" if arg is sre.AT_BEGINNING else "$")
            elif op is sre.SUBPATTERN:
                state = self._build(arg[-1], state)
            elif op is sre.BRANCH:
                state = self._new([self._build(branch, state) for branch in arg[1]])
            elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT):   # lazy or not, the same strings
                low, high, item = arg
                ends = [state] * (low == 0)
                for copy in range(1, (low if high == sre.MAXREPEAT else high) + 1):
                    state = self._build(item, state)
                    ends += [state] * (copy >= low)
                state = self._new(ends)
                if high == sre.MAXREPEAT:
                    self.edges[self._build(item, state)].append((None, state))
            elif op == "multiples":
                state = self._multiples(state, *arg)
            else:
                raise ValueError("lookahead is supported after a leading '^' outside 'not', and (?=...) at the end"
                                 if op in (sre.ASSERT, sre.ASSERT_NOT) else f"{op} is not supported")
        return state

    def _charset(self, op: Any, arg: Any) -> int:
        """The index of the set (negated, ranges, tests) one LITERAL, NOT_LITERAL, ANY or IN item matches."""
        if op is sre.ANY:
            arg = DOT[:2] if self.wide else DOT
        elif op is not sre.IN:
            arg = [(sre.NEGATE, None)] * (op is sre.NOT_LITERAL) + [(sre.LITERAL, arg)]
        negated = arg[:1] == [(sre.NEGATE, None)]
        ranges = tuple((v, v) if kind is sre.LITERAL else v for kind, v in arg if kind in (sre.LITERAL, sre.RANGE))
        names = [(v.name.split("_")[-1], "_NOT_" in v.name) for kind, v in arg if kind is sre.CATEGORY]
        tests = tuple(re.compile(f"[{'^' * no}{SHORTHANDS[name][(no != negated) != self.wide]}]").fullmatch
                      for name, no in names)
        return self.charsets.setdefault((negated, ranges, tests), len(self.charsets))

    def _multiples(self, state: int, step: int, scale: int) -> int:
        """Decimals (maybe negative) that are multiples of step * 10**-scale: their digits' remainder as states."""
        whole, end = [self._new() for _ in range(step)], self._new()
        frac = [[self._new() for _ in range(step)] for _ in range(scale + 2)]   # by fraction digits, capped
        digit, dot = [self._charset(sre.LITERAL, c) for c in range(48, 58)], self._charset(sre.LITERAL, 46)
        self.edges[state] += [(None, whole[0]), (self._charset(sre.LITERAL, 45), whole[0])]
        for r in range(step):
            self.edges[whole[r]] += [(digit[d], whole[(10 * r + d) % step]) for d in range(10)] + [(dot, frac[0][r])]
            self.edges[whole[r]] += [(None, end)] * (r * 10 ** scale % step == 0)
            for j in range(scale + 2):  # past `scale` fraction digits, only zeros
                self.edges[frac[j][r]] += [(None, end)] * (j > 0 and r * 10 ** max(scale - j, 0) % step == 0)
                self.edges[frac[j][r]] += [(digit[d], frac[j + 1][(10 * r + d) % step]) for d in range(10)] \
                    if j < scale else [(digit[0], frac[scale + 1][r])]
        return end

    def _closure(self, states: set, at_start: bool = False) -> frozenset:
        """States reached without a character: '^' only at the start; after '$' (as ~s) nothing more may come."""
        todo, seen = list(states), set(states)
        for mark in todo:
            for key, target in self.edges[max(mark, ~mark)]:
                nxt = ~target if mark < 0 or key == "$" else target
                if (key in (None, "$") or key == "^" and at_start) and nxt not in seen and target not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return frozenset(s for s in seen if s >= 0 or ~s not in seen)

    def class_id(self, ch: str) -> int:
        """The id of the class of characters that behave like `ch` everywhere in this regex."""
        if ch not in self.class_ids:
            sig = sum(1 << i for i, (negated, ranges, tests) in enumerate(self.charsets)
                      if (any(lo <= ord(ch) <= hi for lo, hi in ranges) or any(t(ch) for t in tests)) != negated)
            self.sigs += [sig] * (sig not in self.sigs)   # threads racing here may add a sig twice: index() takes one
            self.class_ids[ch] = self.sigs.index(sig)
        return self.class_ids[ch]

    def _move(self, state: frozenset, cid: int) -> frozenset | None:
        if (state, cid) not in self.moves:   # dead once a part that must match has no state left
            targets = {t for s in state if s >= 0 for key, t in self.edges[s]
                       if isinstance(key, int) and self.sigs[cid] >> key & 1}
            alive = self.needed <= {self.owner[t] for t in targets}
            self.moves[state, cid] = self._closure(targets) if alive else None
        return self.moves[state, cid]

    def matches(self, text: str) -> bool:
        """Whether the whole of `text` is a match."""
        state = functools.reduce(lambda s, ch: s if s is None else self._move(s, self.class_id(ch)), text, self.start)
        return state is not None and self.accepts(state)

    def accepts(self, state: frozenset) -> bool:
        """Whether `state` ends a match."""
        return all((final in state or ~final in state) != negated for _, final, negated in self.parts)

    def _tail(self, state: frozenset, proof: bool = False) -> str | bool | None:
        """A shortest text that takes `state` to a match (breadth first over class representatives), or None;
        `proof`: instead, whether the search ran out of states without one (no match is proven)."""
        seen, queue = {state}, [(state, "")]
        for current, text in queue:
            if self.accepts(current) or len(seen) > REGEX_MAX_SEARCH:   # (a|b)*a(a|b){25}: 2**25 states
                break
            for cid, ch in self.reps.items():
                if (nxt := self._move(current, cid)) is not None and nxt not in seen:
                    seen.add(nxt)
                    queue.append((nxt, text + ch))
        if proof:
            return not self.accepts(current) and len(seen) <= REGEX_MAX_SEARCH
        return text if self.accepts(current) else None

    def shortest(self, state: frozenset, at_least: int = 0, text: bool = True, longer: dict | None = None):
        """A shortest text of at least `at_least` characters from `state` to a match (of equals, the first by class
        ids), or (`text` false) its length; None if none, or past REGEX_MAX_SEARCH (state, characters left) pairs not
        in `longer` (given {}: a verdict no earlier call changes). Linear: forward the new pairs, back their steps."""
        if longer is None and len(longer := self.longer) > 4 * REGEX_MAX_SEARCH:
            longer = self.longer = {}   # bounded memory; a thread still using the old dict goes on with it
        todo, pairs = [state], []
        for left in range(at_least, -1, -1):
            if not (todo := [s for s in dict.fromkeys(todo) if (s, left) not in longer]):
                break
            pairs += [(s, left) for s in todo]
            if len(pairs) > REGEX_MAX_SEARCH:
                return None
            todo = [t for s in todo for cid in self.reps if (t := self._move(s, cid)) is not None]
        for s, left in reversed(pairs):   # (length, character, next state); at 0 left: (length, the text, None)
            steps = [(longer[t, left - 1][0] + 1, ch, t) for cid, ch in self.reps.items()
                     if (t := self._move(s, cid)) is not None and longer[t, left - 1]] if left else \
                [(len(tail), tail, None)] if (tail := self._tail(s)) is not None else []
            longer[s, left] = min(steps, key=lambda step: step[0], default=None)
        if (best := longer[state, at_least]) is None or not text:
            return best and best[0]
        pieces = []
        for left in range(at_least, -1, -1):
            _, piece, state = longer[state, left]
            pieces.append(piece)
        return "".join(pieces)


@functools.lru_cache(maxsize=256)
def shared_regex(parts: tuple) -> Regex:
    """The compiled Regex for `parts`, shared across requests (and, unpickled, across ranks)."""
    return Regex(parts)


def regex_for(pattern: str | tuple, search: bool = True, also: tuple = ()) -> Regex:
    """The shared Regex for a pattern (and the (pattern, search) pairs `also`)."""
    return shared_regex(((pattern, search),) + also)


ANY_TEXT = regex_for("")   # an empty pattern matches every string


# Numbers as regexes: JSON number syntax intersected with the minimum's, the maximum's (digit by digit, as llama.cpp
# does; leading zeros may pass, the syntax refuses them) and multipleOf's. Fraction digits compare as text: "25" < "3".
def number_bound(x: Fraction, strict: bool, least: bool) -> str:
    """Decimals >= x (least) or <= x, strictly if asked (rounded inward to JSON_MAX_DIGITS decimals)."""
    unit, sign = 10 ** JSON_MAX_DIGITS, "" if least else "-"   # y <= x as -y >= -x
    x = min(max(x if least else -x, -unit), unit)   # also past the largest number the syntax allows
    strict, x = strict and x * unit % 1 == 0, Fraction(math.ceil(x * unit), unit)   # strict only if x is kept
    up = x > 0 or x == 0 and strict   # then y >= x, else y >= 0 or -y with y <= -x: compare magnitudes
    whole, fraction = divmod(int(abs(x) * unit), unit)
    k, digits = len(str(whole)), str(whole) + str(fraction).rjust(JSON_MAX_DIGITS, "0").rstrip("0")
    other = f"[1-9]\\d{{{k},}}(\\.\\d+)?" if up else f"\\d{{1,{k - 1}}}(\\.\\d+)?" if k > 1 else None   # other lengths
    def tails(t: str, k: int) -> str | None:
        """Magnitudes' tails with k integer digits to go (k < 0: in the fraction), >= t (up) or <= t."""
        if k == 0:
            rest = tails(t, -1)
            return rest and f"(\\.{rest})" + "?" * (not up or not t and not strict)
        if not t:
            return ("\\d*[1-9]\\d*" if strict else "\\d*") if up else (None if strict else "0*")
        first, deeper, tail = int(t[0]), tails(t[1:], k - 1), f"\\d{{{k - 1}}}(\\.\\d+)?" if k > 0 else "\\d*"
        alts = [f"[{first + 1}-9]{tail}"] * (up and first < 9) + [f"[0-{first - 1}]{tail}"] * (not up and first > 0)
        alts += [""] * (not up and k < 0) + ([t[0] + deeper] if deeper is not None else [])
        return f"({'|'.join(alts)})" if alts else None
    magnitude = "|".join(filter(None, (tails(digits, k), other)))
    return f"{sign}({magnitude})" if up else f"({sign}\\d+(\\.\\d+)?|{'-' * least}({magnitude}))"


def number_regex(integer: bool, low: Fraction | None = None, high: Fraction | None = None, low_open: bool = False,
                 high_open: bool = False, step: int = 1, scale: int = 0, excluded: tuple = ()) -> Regex:
    """A JSON number's text as a Regex: integer or decimal, within bounds, a multiple of step * 10**-scale,
    none of the `excluded` patterns. Bounded numbers are written without exponent."""
    digits = JSON_MAX_DIGITS - 1
    syntax = rf"0|-?[1-9]\d{{0,{digits}}}" if integer else rf"-?(0|[1-9]\d{{0,{digits}}})(\.\d{{1,{digits + 1}}})?"
    parts = [(number_bound(x, is_open, least), False)
             for x, is_open, least in ((low, low_open, True), (high, high_open, False)) if x is not None]
    parts += [(pattern, False, True) for pattern in excluded] + [((step, scale), False)] * (step > 1 or scale > 0)
    return regex_for(syntax + r"([eE][+-]?\d{1,2})?" * (not parts and not integer), False, tuple(parts))


class Cache(dict):
    """At most `limit` entries, the oldest out first: every cache of this section. Handler threads and the
    engine share them: eviction and insertion hold a lock; `make` runs outside it (a miss may be made twice)."""

    def __init__(self, limit: int):   # dict.__new__ made it, empty
        self.limit, self.lock = limit, threading.Lock()

    def __reduce__(self) -> tuple:
        return Cache, (self.limit,)   # pickled (to other ranks, see GroupLink) empty, without the lock

    def get_or(self, key: Any, make: Callable[[], Any]) -> Any:
        """The value under `key`, made and kept if missing."""
        if (value := self.get(key, self)) is self:
            value = make()
            with self.lock:
                while self and len(self) >= self.limit:
                    self.pop(next(iter(self)), None)
                self[key] = value
        return value


class Piece:
    """A compiled schema node, compared by identity. `alternatives`: the pieces its value may be (a Union's
    list); `slack`: the longest text one token can commit the output to inside it (a key, a value's min_text)."""

    min_text, slack = "", 0

    @functools.cached_property
    def alternatives(self) -> tuple:
        return (self,)

    @staticmethod
    def _slack_of(nodes: Any, keys: Any = ()) -> int:   # of a piece holding `nodes` (and `keys`, JSON texts)
        return max([0] + [len(key) + 2 for key in keys] + [max(n.slack, len(n.min_text) + 1) for n in nodes])


class Frame(NamedTuple):
    """Where a piece's value is: for a leaf, `at` its regex state, `phase` "^" (before the quote), "" (in it), '"'
    (closed) or an escape so far ("\\u12"); for a container, `at` its next slot (in colon and item: the key's, or
    len(slots) + j for extra value j), `phase` ^ (before it), open, comma, key (on top), colon, item or value."""

    piece: Any
    phase: str
    at: Any
    count: int                   # a leaf's characters so far; a container's members, capped where more no longer matter
    ex: frozenset | None         # texts a leaf may not be (None: no exclusion), a container's members may not repeat
    spaces: int = 0              # a container's whitespace since the last token
    text: str | None = None      # a leaf's raw text so far, kept under an exclusion (always for Literals)

    def add(self, ch: str, phase: str = "", at: Any = None) -> Frame:
        """A leaf's frame after raw character `ch`, in `phase`, one character further at regex state `at` if given."""
        return Frame(self.piece, phase, self.at if at is None else at, self.count + (at is not None), self.ex, 0,
                     None if self.text is None else self.text + ch)


class Literals(Piece):
    """One of a fixed set of JSON texts: enum, const, true/false/null, object keys, tool-call markers."""

    def __init__(self, texts):
        self.texts = tuple(dict.fromkeys(texts))
        self.min_text = min(self.texts, key=len)

    def frame(self, ex: frozenset | None = None) -> Frame:
        """The frame before the first character."""
        return Frame(self, "", None, 0, ex, 0, "")

    def _open(self, text: str, ex: frozenset | None) -> Iterator[str]:
        """The texts that begin with `text` and are not excluded."""
        return (t for t in self.texts if t.startswith(text) and (ex is None or t not in ex))

    def step(self, frame: Frame, ch: str) -> list:
        """The frames after `ch`."""
        return [(frame.add(ch),)] if any(self._open(frame.text + ch, frame.ex)) else []

    def done(self, frame: Frame) -> bool:
        return frame.text in self.texts and (frame.ex is None or frame.text not in frame.ex)

    def finish(self, frame: Frame) -> str | None:
        """The rest of a shortest text the frame may become; None when every one is excluded."""
        return min((t[len(frame.text):] for t in self._open(frame.text, frame.ex)), key=len, default=None)


class Leaf(Piece):
    """A value whose text matches `regex` with min_len to max_len characters: a JSON string (`quoted`: the regex runs
    over its decoded characters; under an exclusion, no escapes) or a number (its raw text). `by_text`: one spelling."""

    ESCAPE = re.compile(r'\\(["\\/bfnrt]|u(?![dD][89a-fA-F])[0-9a-fA-F]{0,4})?')   # so far; no surrogates
    LETTERS = '"0"\\/bfnrtu'   # what may end a quote or go on with an escape, in the order finish() tries
    PLAIN = re.compile(r'[^"\\\x00-\x1f]*').fullmatch   # what a JSON string holds as it is (no escape needed)

    def __init__(self, regex: Regex, min_len: int = 0, max_len: int | None = None, quoted: bool = True,
                 by_text: bool = True):
        self.regex, self.min_len, self.max_len, self.quoted, self.by_text = regex, min_len, max_len, quoted, by_text
        self.limit = math.inf if max_len is None else max_len
        if not self.fits(regex.start, 0, True):   # fresh: no earlier request changes the verdict
            raise ValueError(f"no string has this pattern or format and these lengths ({REGEX_MAX_SEARCH} steps)")
        self.min_text = self.finish(self.frame())

    def frame(self, ex: frozenset | None = None) -> Frame:
        """The frame before the first character (a string's: before its opening quote)."""
        return Frame(self, "^" * self.quoted, self.regex.start, 0, ex, 0, None if ex is None else "")

    def step(self, frame: Frame, ch: str) -> list:
        """The frames after `ch` (none once a string is closed)."""
        escape = frame.phase
        if escape == "^":
            return [(frame.add(ch),)] if ch == '"' else []
        if escape == "" and (not self.quoted or ch not in '"\\'):
            return self._take(frame, ch, None if ch < " " and self.quoted else ch)
        if escape == "" and ch == '"':
            return [(frame.add(ch, '"'),)] * self.done(frame, ch)
        escape += ch   # a backslash, then a letter whose character fits, or u (where any may) and four hex digits
        inside, any_char = frame._replace(phase=escape), self.regex is ANY_TEXT and frame.count < self.limit
        if frame.ex is not None or not self.ESCAPE.fullmatch(escape) or escape == "\\u" and not any_char:
            return []
        if len(escape) == 6 or len(escape) == 2 and ch != "u":
            return self._take(frame, ch, json.loads(f'"{escape}"'))
        return [(inside,)] if escape != "\\" or any(self.step(inside, c) for c in self.LETTERS) else []

    def _take(self, frame: Frame, ch: str, decoded: str | None) -> list:
        """The frame after one more (decoded) character, if the value can still be completed (not excluded)."""
        if decoded is None or (dfa := self.regex._move(frame.at, self.regex.class_id(decoded))) is None:
            return []
        after = frame.add(ch, "", dfa)
        ex = after.ex if after.ex and any(f.startswith(after.text) for f in after.ex) else None   # else none bites
        return [(after,)] * (self.complete(dfa, after.count, after.text, ex) is not None if ex else
                             self.fits(dfa, after.count))

    def fits(self, dfa: frozenset, count: int, fresh: bool = False) -> bool:
        """Whether a text completes the value from `dfa` after `count` characters, within min_len and max_len."""
        size = self.regex.shortest(dfa, max(self.min_len - count, 0), False, {} if fresh else None)
        return size is not None and count + size <= self.limit

    @functools.lru_cache(maxsize=JSON_MASK_CACHE_STATES * 4)   # every leaf's, shared; thread-safe
    def complete(self, dfa: frozenset, count: int, text: str | None = "", ex: frozenset | None = None) -> str | None:
        """A shortest text (decoded) that completes the value from `dfa` after `count` characters, or None; under
        an exclusion `ex`, one of plain characters (no escapes) whose raw text (`text` + it) is not excluded. Breadth
        first, len(ex) + 1 texts kept per state, the first layer and those from min_len on completed by shortest()."""
        layer, keep, quote, plain = {dfa: [""]}, len(ex or ()) + 1, '"' * self.quoted, self.quoted and ex is not None
        reach = max(self.min_len - count, len(self.regex.shortest(dfa) or "")) + 32   # a few past the shortest
        for size in range(int(min(self.limit - count, reach)) + 1):
            ends = [t + end for state, tails in layer.items() if not 0 < size < self.min_len - count
                    and (end := self.regex.shortest(state, max(self.min_len - count - size, 0))) is not None
                    for t in tails]
            if ends := [e for e in ends if count + len(e) <= self.limit and (not plain or self.PLAIN(e)) and
                        (not ex or text + e + quote not in ex)]:
                return min(ends, key=len)
            nxt: dict = {}
            for (state, tails), (cid, ch) in itertools.product(layer.items(), self.regex.reps.items()):
                if (not plain or self.PLAIN(ch)) and (after := self.regex._move(state, cid)) is not None:
                    kept = nxt.setdefault(after, [])
                    kept += [t + ch for t in tails[:keep - len(kept)]]
            layer = nxt
        return None

    def done(self, frame: Frame, quote: str = "") -> bool:
        """Whether the value is complete; given a closing `quote`, whether it may come (length, match, exclusion)."""
        if self.quoted and not quote:
            return frame.phase == '"'
        ends = frame.count >= self.min_len and self.regex.accepts(frame.at)
        return ends and (frame.ex is None or frame.text + quote not in frame.ex)

    def finish(self, frame: Frame) -> str | None:
        """A shortest text that completes the value; None when every one is excluded."""
        if self.done(frame):
            return ""
        for ch in self.LETTERS if frame.phase else ():   # open the string, or go on with its escape
            if frames := self.step(frame, ch):
                rest = self.finish(frames[0][0])
                return None if rest is None else ch + rest
        content = self.complete(frame.at, frame.count, frame.text, frame.ex)
        return None if content is None else json.dumps(content, ensure_ascii=False)[1:] if self.quoted else content

    def move_class(self, at: tuple, key: str) -> tuple | None:
        """(dfa, count) after a character of class id ord(`key`), if the value can still be completed."""
        nxt = self.regex._move(at[0], ord(key))
        return (nxt, at[1] + 1) if nxt is not None and self.fits(nxt, at[1] + 1) else None

    def key(self, frame: Frame, reach: int) -> tuple:
        """The frame with its count reduced to what can matter within `reach` characters (mask caching)."""
        room = self.limit - frame.count
        return frame._replace(count=(min(frame.count, self.min_len), min(room, reach + len(self.regex.edges))))


class Union(Piece):
    """anyOf (and oneOf, type lists): a value matching any of the alternatives."""

    def __init__(self, alternatives):
        self.alternatives = tuple(a for alt in alternatives for a in alt.alternatives)
        self.min_text = min((a.min_text for a in self.alternatives), key=len)
        self.slack = self._slack_of(self.alternatives)


def first_text(node: Piece, forbidden: frozenset) -> str | None:
    """A shortest complete text of `node` (a leaf or a union of them) that is not forbidden; None if none."""
    texts = (alt.finish(alt.frame(forbidden)) for alt in node.alternatives)
    return min((t for t in texts if t is not None), key=len, default=None)


def union(alternatives: list) -> Piece | None:
    """The union of the satisfiable alternatives (None stands for one that is not): None, one piece, or a Union."""
    alternatives = [a for a in alternatives if a is not None]
    return Union(alternatives) if len(alternatives) > 1 else alternatives[0] if alternatives else None


class Container(Piece):
    """A JSON object: `slots` (name, node, required) in order, each at most once, then extra members; `low` to `high`
    members. Extra keys are `key` leaves, not a slot's, `banned` or earlier name; their value: values[indices of the
    `patterns` (patternProperties) the key matches] (() for additionalProperties; none: no extra keys). An array
    (Array): slots in order, then items of values[()], `unique` ones excluding those before. Bracketless: a document."""

    def __init__(self, slots: tuple, values: dict, low: int = 0, high: int | None = None, key: Piece | None = None,
                 banned: tuple = (), patterns: tuple = (), unique: bool = False, brackets: str = "{}"):
        self.brackets, self.slots, self.values, self.low, self.high = brackets, slots, values, low, high
        self.keyed, self.patterns, self.unique, self.extras = brackets == "{}", patterns, unique, list(values)
        self.key = (key or ANY_STRING) if self.keyed and values else None
        self.names = [json.dumps(name, ensure_ascii=False) for name, _, _ in slots] if self.keyed else []
        self.forbidden = frozenset(self.names) | {json.dumps(name, ensure_ascii=False) for name in banned}
        self.required_from = [sum(req for _, _, req in slots[j:]) for j in range(len(slots) + 1)]
        self.fixed = [req or not self.keyed for _, _, req in slots]   # slots that may not be skipped
        self.cap, self.memo = low if high is None else high, Cache(JSON_MASK_CACHE_STATES)   # key pieces
        self.members = [node for _, node, _ in slots] + list(values.values())   # by slot, then extra ones
        tail = self.finish(self.frame(), SCHEMA_MAX_MIN_TEXT)
        if tail is None:
            raise ValueError("no object has these properties within minProperties/maxProperties" if self.keyed
                             else "no array has these items within minItems/maxItems (and uniqueItems)")
        self.min_text = brackets[:1] + tail
        self.slack = self._slack_of(self.members, self.names)

    def frame(self, ex: frozenset | None = None) -> Frame:
        """The frame before the opening bracket."""
        return Frame(self, "^", 0, 0, frozenset(), 0)

    def step(self, frame: Frame, ch: str) -> list:
        """The frames after `ch`: brackets, whitespace, commas, colons; a key or a value pushed to take `ch`."""
        _, phase, at, count, seen, spaces, _ = frame
        if ch in JSON_WHITESPACE and phase != "^" and (self.brackets or phase != "value"):
            return [(frame._replace(spaces=spaces + 1),)] if spaces < JSON_MAX_WHITESPACE else []
        if (phase, ch) in (("^", self.brackets[:1]), ("colon", ":")):   # the opening bracket; a key's colon
            return [(Frame(self, "open" if phase == "^" else "item", at, count, seen, 0),)]
        if phase == "item" or phase in ("open", "comma") and not self.keyed and ch != self.brackets[1:] and \
                any(self._choices(at, count)):   # an array's next item
            node, nxt = self.members[at], min(at + 1, len(self.slots))
            after = Frame(self, "value", nxt, min(count + 1, self.cap), seen, 0)
            return [(REFEED, after, alt.frame(seen if self.unique else None)) for alt in node.alternatives]
        if ch == self.brackets[1:] and phase in ("open", "value"):
            return [()] if self.required_from[at] == 0 and count >= self.low else []
        if not (ch == "," and phase == "value" or ch == '"' and phase in ("open", "comma")):
            return []
        slots, extra = self._choices(at, count)
        if ch == ",":   # if a member may follow (an array's next unique item: one not written yet)
            more = (slots or extra) and (not self.unique or first_text(self.members[at], seen) is not None)
            return [(Frame(self, "comma", at, count, seen, 0),)] * bool(more)
        keys = [(self.memo.get_or(slots, lambda: Literals(self.names[j] for j in slots)), None)] if slots else []
        keys += [(self.key, self.forbidden | seen)] * extra   # a declared name, or an extra key
        return [(REFEED, Frame(self, "key", at, count, seen, 0), piece.frame(ex)) for piece, ex in keys]

    def done(self, frame: Frame) -> bool:
        return not self.brackets and frame.phase == "value"

    def _choices(self, at: int, count: int) -> tuple[tuple[int, ...], bool]:
        """(slots that may come next, whether an extra member may), leaving room for low and high."""
        high = math.inf if self.high is None else self.high
        end = next((j + 1 for j in range(at, len(self.slots)) if self.fixed[j]), len(self.slots))   # to a fixed one
        chosen = tuple(j for j in range(at, end) if count + 1 + self.required_from[j + 1] <= high
                       and (self.extras or len(self.slots) - j - 1 >= self.low - count - 1))
        return (chosen, bool(self.extras) and not any(self.fixed[at:])) if count < high else ((), False)

    def child_done(self, frame: Frame, child: tuple) -> Frame | None:
        """A key written: its slot, or an extra key's value (None: no value may follow it); an item: seen."""
        if frame.phase != "key":
            return frame._replace(ex=frame.ex | {child.text}) if self.unique else frame
        if child.piece is not self.key:
            return frame._replace(phase="colon", at=self.names.index(child.text))
        slot = self._slot(child.text)
        return None if slot is None else frame._replace(phase="colon", at=len(self.slots) + slot,
                                                        ex=frame.ex | {child.text})

    def _slot(self, text: str) -> int | None:
        """Which extra value an extra key's text (quoted, unescaped) takes; None: no value may follow it."""
        matched = tuple(i for i, regex in enumerate(self.patterns) if regex.matches(text[1:-1]))
        return self.extras.index(matched) if matched in self.values else None

    def finish(self, frame: Frame, limit: float = math.inf) -> str | None:
        """The shortest text that closes the container from `frame`: the members it still needs, then its bracket
        (a ValueError past `limit` characters)."""
        _, phase, at, count, seen, _, _ = frame
        parts, sep, must = [], "," * (phase == "value"), phase == "comma"
        if phase in ("colon", "item"):   # key `at` written: its value first
            parts, sep = [":" * (phase == "colon") + self.members[at].min_text], ","
            at, count = min(at + 1, len(self.slots)), min(count + 1, self.cap)
        while must or self.required_from[at] or count < self.low:
            declared, extra = self._choices(at, count)
            key, j = "", at   # an array's next item; an object's required member, or its first optional one
            if self.keyed and declared and (self.fixed[declared[-1]] or not extra):
                key = self.names[(j := declared[-1] if self.fixed[declared[-1]] else declared[0])] + ":"
            elif self.keyed and extra:
                key = first_text(self.key, self.forbidden | seen)
                if key is None or (slot := self._slot(key)) is None:
                    return None
                j, seen, key = len(self.slots) + slot, seen | {key}, key + ":"
            elif not (declared or extra):
                return None
            node, at = self.members[j], min(j + 1, len(self.slots))
            value = first_text(node, seen) if self.unique else node.min_text
            if value is None:
                return None
            parts.append(sep + key + value)
            if (limit := limit - len(parts[-1])) < 0:   # nested minimums multiply
                raise ValueError(f"minItems/minProperties: the shortest value is over {SCHEMA_MAX_MIN_TEXT} characters")
            sep, must, count, seen = ",", False, min(count + 1, self.cap), seen | {value} if self.unique else seen
        return "".join(parts) + self.brackets[1:]


Object = Container   # Object(props, values, min_props, max_props, key, banned, patterns)


def Array(prefix: tuple, items: Piece | None, min_items: int = 0, max_items: int | None = None, unique: bool = False):
    """A JSON array (a Container): `prefix` items (nodes) then `items` ones (None: no more), min_items to max_items."""
    return Container(tuple((None, node, False) for node in prefix), {} if items is None else {(): items},
                     min_items, max_items, unique=unique, brackets="[]")


def json_start(node: Piece) -> tuple:
    """The automaton's start state: a document (a bracketless array) of one JSON value for `node`."""
    return ((Frame(Container(((None, node, False),), {}, 1, 1, brackets=""), "item", 0, 0, frozenset()),),)


def json_advance(state: tuple, text: str) -> tuple:
    """The state after `text`; () once no stack can take it."""
    for ch in text:
        state = tuple(dict.fromkeys(nxt for stack in state for nxt in _step(stack, ch)))
    return state


def _settle(stack: tuple | None) -> tuple | None:
    """The stack with its complete top values taken off, each by its parent; None once a parent refuses one."""
    while stack and stack[-1][0].done(stack[-1]):
        rest, parent = stack[:-1], stack[-2][0].child_done(stack[-2], stack[-1]) if len(stack) > 1 else None
        stack = rest and parent and rest[:-1] + (parent,)
    return stack


def _step(stack: tuple, ch: str) -> list[tuple]:
    """The stacks after `ch`: its top frame's (a frame pushed takes `ch` in turn), and its parent's once it is done."""
    top, out = stack[-1], []
    for frames in top[0].step(top, ch):
        if frames and frames[0] is REFEED:
            out += _step(stack[:-1] + frames[1:], ch)
        else:
            out.append(stack[:-1] + frames)
    if top[0].done(top) and (parent := _settle(stack)):   # a parent done too (the document) takes nothing more
        out += _step(parent, ch)
    return out


def json_complete(state: tuple) -> bool:
    """True when the text so far is a whole match (a trailing number may still go on)."""
    return any(_settle(stack) == () for stack in state)


def json_closing_text(state: tuple) -> str | None:
    """A shortest text completing `state`: per stack, finish the top frame, settle, repeat (checked by stepping)."""
    closings = []
    for stack in state:
        texts = []
        while (stack := _settle(stack)) and (text := stack[-1][0].finish(stack[-1])) is not None:
            texts.append(text)   # then the stack once `text` closed its top frame, if it did
            after = (s for s in map(_settle, json_advance((stack,), text)) if s is not None and len(s) < len(stack))
            stack = next(after, None)
        closings += ["".join(texts)] * (stack == ())
    return min(closings, key=len, default=None)


# -- JSON Schema keywords -------------------------------------------------------

SCHEMA_KEYWORDS = {"type", "enum", "const", "!enum", "anyOf", "oneOf", "allOf", "$ref", "not", "if", "then", "else"}
# Keywords that constrain and are not enforced: a 400 naming them. Any other keyword is ignored, as validators do.
SCHEMA_REFUSED = {"unevaluatedProperties", "unevaluatedItems", "$dynamicRef", "$recursiveRef", "extends", "disallow",
                  "divisibleBy"}
# The other keywords enforced, by the type they constrain (without "type"); "!enum", "!pattern": what `not` leaves.
KEYWORD_TYPES = {"object": {"properties", "required", "additionalProperties", "minProperties", "dependentSchemas",
                            "patternProperties", "propertyNames", "dependencies", "dependentRequired", "maxProperties"},
                 "array": {"items", "prefixItems", "additionalItems", "minItems", "maxItems", "uniqueItems", "contains",
                           "minContains", "maxContains"},
                 "string": {"minLength", "maxLength", "pattern", "format", "!pattern"},
                 "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}}
SCHEMA_KEYWORDS |= set().union(*KEYWORD_TYPES.values())
COUNTS = {word for word in SCHEMA_KEYWORDS if word[:3] in ("min", "max") and word[3:] != "imum"}   # minLength...
# `not` of a bound holds beyond it, within its type: minimum 5 as exclusiveMaximum 5, minLength 2 as maxLength 1.
NEGATED_BOUNDS = {"minimum": "exclusiveMaximum", "maximum": "exclusiveMinimum", "minLength": "maxLength",
                  "minItems": "maxItems", "minProperties": "maxProperties"}
NEGATED_BOUNDS |= {v: k for k, v in NEGATED_BOUNDS.items()}
DEPENDENCIES = ("dependencies", "dependentRequired", "dependentSchemas")   # a key's presence asks for more
_OCTET = r"(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_H16 = r"[0-9A-Fa-f]{1,4}"
_YEAR = r"([1-9]\d{3}|0[1-9]\d\d|00[1-9]\d|000[1-9])"
_DATE = (rf"({_YEAR}-((0[13578]|1[02])-(0[1-9]|[12]\d|3[01])|(0[469]|11)-(0[1-9]|[12]\d|30)|02-(0[1-9]|1\d|2[0-8]))"
         r"|(\d\d(0[48]|[2468][048]|[13579][26])|(0[48]|[2468][048]|[13579][26])00)-02-29)")
_TIME = r"([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d{1,9})?(Z|[+-]([01]\d|2[0-3]):[0-5]\d)"
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_PCHAR = r"([A-Za-z0-9._~!$&'()*+,;=:@-]|%[0-9A-Fa-f]{2})"
_HOURS = r"T(\d+H(\d+M)?(\d+(\.\d+)?S)?|\d+M(\d+(\.\d+)?S)?|\d+(\.\d+)?S)"
_TAIL = rf"(\?({_PCHAR}|[/?])*)?(#({_PCHAR}|[/?])*)?"   # a URI's query and fragment
_URI = rf"[A-Za-z][A-Za-z0-9+.-]*://([A-Za-z0-9._~!$&'()*+,;=-]|%[0-9A-Fa-f]{{2}})*(:\d{{1,5}})?(/{_PCHAR}*)*{_TAIL}"
# A relative reference has no scheme and does not start with "//" (which would make an authority of it).
_RELATIVE = rf"(/({_PCHAR}+(/{_PCHAR}*)*)?|([A-Za-z0-9._~!$&'()*+,;=@-]|%[0-9A-Fa-f]{{2}})+(/{_PCHAR}*)*)?{_TAIL}"
_EMAIL = rf"[A-Za-z0-9_%+-]+(\.[A-Za-z0-9_%+-]+)*@({_LABEL}\.)+[A-Za-z]{{2,63}}"
# `format` values enforced, as regular expressions matched in full (IRIs, IDN addresses: their ASCII subsets).
FORMATS = {
    "date": _DATE, "time": _TIME, "date-time": f"{_DATE}T{_TIME}",
    "duration": rf"P((\d+Y(\d+M)?(\d+D)?|\d+M(\d+D)?|\d+D)({_HOURS})?|{_HOURS}|\d+W)",
    "email": _EMAIL, "idn-email": _EMAIL, "uri": _URI, "iri": _URI,
    "uri-reference": f"{_URI}|{_RELATIVE}", "iri-reference": f"{_URI}|{_RELATIVE}",
    "uuid": r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}", "ipv4": rf"{_OCTET}(\.{_OCTET}){{3}}",
    "ipv6": "|".join([rf"({_H16}:){{7}}{_H16}", rf"({_H16}:){{1,7}}:", rf"({_H16}:){{1,6}}:{_H16}",
                      rf":((:{_H16}){{1,7}}|:)"] + [rf"({_H16}:){{1,{n}}}(:{_H16}){{1,{7 - n}}}" for n in range(1, 6)]),
    "hostname": rf"({_LABEL}\.)*[A-Za-z]([A-Za-z0-9-]{{0,61}}[A-Za-z0-9])?",
    "idn-hostname": r"([A-Za-z0-9]{1,20}(-[A-Za-z0-9]{1,20}){0,2}\.)*[A-Za-z]{1,20}",
    "json-pointer": r"(/([^~/]|~[01])*)*", "relative-json-pointer": r"(0|[1-9]\d*)(#|(/([^~/]|~[01])*)*)",
    "regex": r"\^?[^\\\[\](){}*+?|^$]*\$?",   # a literal text: every such string compiles
    "uri-template": r"([A-Za-z0-9._~!$&'()*+,;=:@/?#-]|%[0-9A-Fa-f]{2}|\{[A-Za-z0-9_]+(,[A-Za-z0-9_]+)*\})*"}
HOSTNAME_MAX_LENGTH = 253
JSON_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
_canonical = functools.partial(json.dumps, sort_keys=True)


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def _kinds(value: Any) -> set:
    kinds = {k for k in _as_list(value) if isinstance(k, str)}
    return kinds | {"integer"} if "number" in kinds else kinds


def accepts_text(node: Piece, text: str) -> bool:
    """Whether the automaton for `node` takes `text` as a whole value."""
    return json_complete(json_advance(json_start(node), text))


# allOf: how two different values of a keyword combine (False: no value fits; None or an error: they cannot).
SCHEMA_MERGE = {
    "type": lambda a, b: [k for k in JSON_TYPES if k in _kinds(a) & _kinds(b) and not
                          (k == "integer" and "number" in _kinds(a) & _kinds(b))] or False,
    "enum": lambda a, b: [v for v in a if _canonical(v) in set(map(_canonical, b))] or False,
    "pattern": lambda a, b: _as_list(a) + _as_list(b), "not": lambda a, b: {"anyOf": [a, b]},   # all must hold
    "properties": lambda a, b: {**a, **{k: {"allOf": [a[k], v]} if k in a else v for k, v in b.items()}},
    **dict.fromkeys(("anyOf", "oneOf"), lambda a, b: None if len(a) * len(b) > SCHEMA_MAX_BRANCHES else
                    [{"allOf": [x, y]} for x in a for y in b]),   # one alternative per pair, a few at most
    **dict.fromkeys(("!enum", "!pattern", "allOf", "required"), lambda a, b: a + b),
    **{word: max if word.startswith("min") else min for word in ("minimum", "maximum", *COUNTS)},
    **dict.fromkeys(("items", "additionalItems", "additionalProperties", "propertyNames"),
                    lambda a, b: {"allOf": [a, b]}),
    **dict.fromkeys((*DEPENDENCIES, "patternProperties"), lambda a, b: None if a.keys() & b.keys() else {**a, **b})}
# What a keyword's value must be where it is enforced (else a 400 naming it): (what, test).
SCHEMA_VALUES = {
    **dict.fromkeys(COUNTS, ("a non-negative integer", lambda v: type(v) in (int, float) and v >= 0 and v % 1 == 0)),
    **dict.fromkeys({word for word in COUNTS if word[:3] == "min"}, (f"an integer from 0 to {SCHEMA_MAX_MIN_COUNT}",
        lambda v: type(v) in (int, float) and v % 1 == 0 and 0 <= v <= SCHEMA_MAX_MIN_COUNT)),   # an output that long
    **dict.fromkeys(("minimum", "maximum"), ("a number", lambda v: type(v) in (int, float) and
                                             abs(v) <= sys.float_info.max)),
    **dict.fromkeys(("exclusiveMinimum", "exclusiveMaximum"), ("a number or a boolean", lambda v: type(v) in (
        bool, int, float) and abs(v) <= sys.float_info.max)),   # finite, and within a float's range
    "multipleOf": ("a positive number", lambda v: type(v) in (int, float) and 0 < v < math.inf),
    "pattern": ("a string", lambda v: all(isinstance(p, str) for p in _as_list(v))),
    "properties": ("an object", lambda v: isinstance(v, dict)),
    "patternProperties": ("an object of at most 6 patterns", lambda v: isinstance(v, dict) and len(v) <= 6),
    "required": ("a list of names", lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v)),
    "prefixItems": ("a list of schemas", lambda v: isinstance(v, list))}
ANY_STRING, ANY_NUMBER = Leaf(ANY_TEXT), Leaf(number_regex(False), quoted=False, by_text=False)
BOOLEAN, NULL = Literals(("true", "false")), Literals(("null",))
ANY_VALUE = Union([ANY_STRING, ANY_NUMBER, BOOLEAN, NULL])   # then arrays and objects, JSON_MAX_NESTING deep
for _ in range(JSON_MAX_NESTING):
    ANY_OBJECT = Object((), {(): ANY_VALUE})
    ANY_VALUE = Union([ANY_STRING, ANY_NUMBER, BOOLEAN, NULL, ANY_OBJECT, Array((), ANY_VALUE)])


class SchemaCompiler:
    """One JSON Schema to pieces, or a 400 naming what it cannot enforce; None is no value (false, a cut $ref)."""

    def __init__(self, root: dict, param: str):
        self.root, self.param, self.memo = root, param, {}   # memo: (id, $ref hops left) -> (schema, piece)

    def fail(self, message: str) -> APIError:
        return invalid(f"'{self.param}': {message}", self.param)

    def _names(self, schema: dict) -> list:
        return schema["required"] if SCHEMA_VALUES["required"][1](schema.get("required")) else []

    def _values(self, schema: dict) -> list:
        values = schema["enum"] if "enum" in schema else [schema["const"]] if "const" in schema else []
        return values if isinstance(values, list) else []

    def _string_parts(self, schema: dict) -> list:
        """A string schema's patterns, format and exclusions as Regex parts (all hold), a positive one first."""
        parts = [(p, True) for p in _as_list(schema.get("pattern", [])) if isinstance(p, str)]
        parts += [(FORMATS[form], False)] if isinstance(form := schema.get("format"), str) and form in FORMATS else []
        parts += [(p, True, True) for p in schema.get("!pattern", [])]
        excluded = [re.escape(v) for v in schema.get("!enum", []) if isinstance(v, str)]
        parts += [("|".join(excluded), False, True)] if excluded else []
        return parts if parts and len(parts[0]) == 2 else [("", True)] + parts

    def _held(self, one: dict, other: dict) -> dict:
        """allOf: a copy of `one` with the properties only it declares held to other's additionalProperties."""
        extra, mine, theirs = other.get("additionalProperties", True), one.get("properties"), self.declared(other)
        if extra is True or not isinstance(mine, dict) or other.get("patternProperties"):
            return dict(one)
        return {**one, "properties": {k: v if k in theirs else {"allOf": [v, extra]} for k, v in mine.items()}}

    def compile(self, schema: Any, refs: int = SCHEMA_MAX_REFS, depth: int = 0) -> Piece | None:
        """The piece for `schema`, None when no value satisfies it; `refs`: $ref hops left on this path."""
        if depth > SCHEMA_MAX_DEPTH:
            raise self.fail(f"the schema nests deeper than {SCHEMA_MAX_DEPTH} levels")
        if (id(schema), refs) not in self.memo:   # memo by the schema and by its flat form: shared $ref targets
            flat, left = self.flat(schema, refs)
            if (id(flat), left) not in self.memo:
                try:
                    self.memo[id(flat), left] = (flat, None if flat is False else self._compile(flat, left, depth))
                except ValueError as exc:   # the pieces' own: no object, array or string fits
                    raise self.fail(str(exc)) from None
            self.memo[id(schema), refs] = (schema, self.memo[id(flat), left][1])
        return self.memo[id(schema), refs][1]

    def flat(self, schema: Any, refs: int = SCHEMA_MAX_REFS) -> tuple[Any, int]:
        """(`schema` with its top-level $ref and allOf merged in, or False when no value fits; $ref hops left)."""
        if not isinstance(schema, (bool, dict)):
            raise self.fail(f"a JSON Schema must be an object, got {json.dumps(schema)[:60]}")
        refs -= isinstance(schema, dict) and "$ref" in schema
        if isinstance(schema, bool) or refs < 0 or not {"$ref", "allOf"} & schema.keys():
            return ({} if schema is True else schema) if refs >= 0 else False, refs
        out, left = {k: v for k, v in schema.items() if k in SCHEMA_KEYWORDS or k in SCHEMA_REFUSED}, refs
        parts = [self.resolve(out.pop("$ref"))] if "$ref" in out else []
        for part, hops in (self.flat(part, refs) for part in parts + self.list_of(out.pop("allOf", [{}]), "allOf")):
            out, left = self.merge(out, part), min(left, hops)
        return out, left

    def resolve(self, ref: Any) -> Any:
        """The subschema a local $ref names: a JSON pointer ("#/$defs/Name") or an anchor ($anchor, $id, id)."""
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise self.fail(f"only local $ref such as '#/$defs/Name' is supported, got {json.dumps(ref)[:60]}")
        todo, target = [self.root], self.root if ref[1:2] in ("", "/") else None
        while target is None and todo:   # an anchor: the first subschema naming it, depth first
            node = todo.pop()
            target = node if isinstance(node, dict) and ref in (node.get("$id"), node.get("id"),
                                                                f"#{node.get('$anchor', '')}") else None
            todo += reversed(node.values() if isinstance(node, dict) else node if isinstance(node, list) else [])
        for part in ref[2:].split("/") if ref[1:2] == "/" else []:
            target = target.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(target, dict) else None
        if target is None:
            raise self.fail(f"$ref {ref!r} points at nothing")
        return target

    def list_of(self, value: Any, word: str) -> list:
        if not isinstance(value, list) or not value:
            raise self.fail(f"'{word}' must be a non-empty list")
        return value

    def merge(self, a: Any, b: Any) -> Any:
        """allOf: one schema holding both (False: none fits; see SCHEMA_MERGE) or a 400; b's $ref is left to flat()."""
        if a is False or b is False or b is True or b == {} or a is True or a == {}:
            return False if a is False or b is False else a if b is True or b == {} else b
        if not isinstance(a, dict) or not isinstance(b, dict):
            raise self.fail("allOf parts must be schemas (objects)")
        if "$ref" in b:
            return {**a, "allOf": [*a.get("allOf", []), b]}
        out = self._held(a, b)
        for key, value in self._held(b, a).items():
            if key in out and key in SCHEMA_KEYWORDS and _canonical(out[key]) != _canonical(value):
                try:
                    value = SCHEMA_MERGE[key](out[key], value)
                except (KeyError, TypeError, AttributeError):
                    value = None
                if value is None:
                    raise self.fail(f"allOf parts with different {key!r} cannot be merged")
                if value is False:
                    return False
            out[key] = value
        return out

    def negate(self, schema: Any, hops: int = 0) -> list:
        """`not`: alternatives, one of which a value takes to fail `schema` (one keyword failing), or a 400."""
        schema, out = self.flat(schema)[0], []   # its $ref and allOf merged in
        if schema is False or hops > SCHEMA_MAX_DEPTH:   # too deep: no alternative, which keeps output valid
            return [{}] if schema is False else [False]
        for word, value in schema.items():
            if word in ("anyOf", "oneOf"):   # none of them: each part fails
                out.append({"allOf": [{"anyOf": self.negate(part, hops + 1)} for part in self.list_of(value, word)]})
            elif word == "type":
                out.append({"type": [k for k in JSON_TYPES if not _kinds(k) & _kinds(value)]})   # none of k's values
            elif word in ("enum", "const") or word == "pattern" and isinstance(value, str):
                excluded = self.list_of(value, word) if word == "enum" else [value]
                out.append({"!pattern" if word == "pattern" else "!enum": excluded})
            elif word == "required" and isinstance(value, list):
                out += [{"properties": {name: False}} for name in self._names(schema)]
            elif word == "properties" and isinstance(value, dict):
                out += [{"required": [name], "properties": {name: {"not": sub}}} for name, sub in value.items()]
            elif word in NEGATED_BOUNDS and type(value) in (int, float):   # a count shifts by one: maxLength 1, not 2
                kind = next(k for k, words in KEYWORD_TYPES.items() if word in words)
                value += 0 if kind == "number" else 1 if word.startswith("max") else -1
                out += [{"type": kind, NEGATED_BOUNDS[word]: value}] if kind == "number" or value >= 0 else []
            elif word in SCHEMA_KEYWORDS:
                raise self.fail("JSON Schema keyword 'not' is enforced only over type, enum, const, pattern, required, "
                                f"properties, bounds, lengths, anyOf and allOf, not {word!r}")
        return out or [False]

    def _compile(self, schema: dict, refs: int, depth: int) -> Piece | None:
        for word in sorted(schema.keys() & SCHEMA_REFUSED)[:1]:
            raise self.fail(f"JSON Schema keyword {word!r} is not supported (the README lists those enforced)")
        schema, used, cases = {k: v for k, v in schema.items() if k in SCHEMA_KEYWORDS}, DEPENDENCIES, None
        if "anyOf" in schema or "oneOf" in schema:   # alternatives (anyOf, oneOf, not, if, dependencies): a union
            used = ("anyOf" if "anyOf" in schema else "oneOf",)
            cases = self.list_of(schema[used[0]], used[0])
        elif "not" in schema:
            used, cases = ("not",), self.negate(schema["not"])
        elif "if" in schema:
            used, cases = ("if", "then", "else"), [{"allOf": [schema["if"], schema.get("then", {})]},
                                                   {"allOf": [{"not": schema["if"]}, schema.get("else", {})]}]
        elif needs := [(k, v) for w in DEPENDENCIES if isinstance(d := schema.get(w), dict) for k, v in d.items()]:
            cases = [{"allOf": [{"anyOf": [{"properties": {k: False}}, {"allOf": [{"required": [k]}, {"required": need}
                     if isinstance(need, list) else need]}]} for k, need in needs]}]   # absent, or with what it needs
        if cases is not None:
            return self.any_of({k: v for k, v in schema.items() if k not in used}, cases, "oneOf" in used, refs, depth)
        kind = schema.get("type", [k for k, words in KEYWORD_TYPES.items() if words & set(schema)])
        if "enum" in schema or "const" in schema or kind in ("boolean", "null"):
            return self.literals(schema, refs, depth)
        if isinstance(kind, list):
            return union([self.compile({**schema, "type": k}, refs, depth) for k in kind]) if kind else ANY_VALUE
        family = "number" if kind == "integer" else kind
        if family not in ("string", "number", "object", "array"):
            raise self.fail(f"unknown JSON Schema type {json.dumps(kind)[:40]}")
        for word in schema.keys() & KEYWORD_TYPES[family] & SCHEMA_VALUES.keys():   # the values its type enforces
            if not SCHEMA_VALUES[word][1](schema[word]):
                raise self.fail(f"{word!r} must be {SCHEMA_VALUES[word][0]}")
        return getattr(self, family)({k: int(v) if k in COUNTS else v for k, v in schema.items()}, refs, depth)

    def any_of(self, base: dict, cases: list, one: bool, refs: int, depth: int) -> Piece | None:
        """The union of `cases` with `base`, oneOf's (`one`) kept apart; a case that fails is left out (all: a 400)."""
        parts, alternatives, errors = [self.merge(base, case) for case in cases] if one else cases, [], []
        for i, part in enumerate(parts):
            try:
                narrowed = part if one else self.merge(base, part)
                for j, other in enumerate(parts if one else ()):
                    narrowed = narrowed if i == j else self.exclude(narrowed, other, i, j)
                alternatives.append(self.compile(narrowed, refs, depth))
            except APIError as exc:
                errors.append(exc)
                if one and "oneOf" in exc.message:
                    raise
        if errors and union(alternatives) is None:
            raise errors[0]
        return union(alternatives)

    def exclude(self, part: Any, other: Any, i: int, j: int) -> Any:
        """`part` narrowed by the cheapest patch that keeps it from matching `other` (oneOf branches i, j), or a 400."""
        part, other = self.flat(part)[0], self.flat(other)[0]
        if part is False or other is False:
            return part
        mine, theirs, first = self.types(part, True), self.types(other, False), self._string_parts(other)[0]
        patches = [{}] + ([{"type": sorted(mine - theirs)}] if mine and theirs and mine - theirs else [])
        if mine == {"string"} and first[0]:   # patches, cheapest first: none, a type, a pattern, then by keys
            patches.append({"!pattern": [first[0] if first[1] else f"^(?:{first[0]})$"]})
        props, theirs, names = self.declared(part), self.declared(other), self._names(other)
        patches += [{"properties": {name: False}} for name in names if name not in self._names(part)]
        patches += [{"required": [name]} for name in props if name in theirs]
        # Last: it may leave part nothing to write (or, where `not` cannot hold theirs, fail to compile: left out).
        for patch in patches + [{"properties": {name: {"not": theirs[name]}}} for name in names if name in theirs]:
            with contextlib.suppress(APIError):
                if self.disjoint(narrowed := self.merge(part, patch), other):
                    return narrowed
        raise self.fail(f"oneOf branches {i} and {j} can both match one value, and this server cannot make the "
                        "output match exactly one (give them a distinguishing key, type or const)")

    def declared(self, schema: dict, name: str | None = None, produced: bool = False) -> Any:
        """properties ({} if none), or what `name`'s value is held to (True: a pattern may; `produced`: as written)."""
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        if name is None or name in props or schema.get("patternProperties"):
            return props if name is None else props.get(name, True)
        return schema.get("additionalProperties", not (produced and props) or name in self._names(schema))

    def types(self, schema: dict, produced: bool) -> set:
        """The JSON types of values `schema` lets through (empty: unknown); `produced`: of the values written for it."""
        if values := self._values(schema):   # by JSON Schema's names: an integral number is an integer
            return {{bool: "boolean", type(None): "null", dict: "object", list: "array", str: "string"}.get(
                type(v), "integer" if type(v) in (int, float) and v % 1 == 0 else "number") for v in values}
        given = "type" in schema or produced and not {"anyOf", "oneOf", "not", "if"} & set(schema)
        return _kinds(given and schema.get("type", [k for k, words in KEYWORD_TYPES.items() if words & set(schema)]))

    def disjoint(self, part: Any, other: Any, hops: int = 0) -> bool:
        """Whether no value written for `part` satisfies `other`: by types, values, `not`, strings or required keys."""
        part, other = self.flat(part)[0], self.flat(other)[0]
        if part is False or other is False or hops > SCHEMA_MAX_DEPTH:
            return part is False or other is False
        mine, theirs = self.types(part, True), self.types(other, False)
        values, allowed = self._values(part), self._values(other)
        if mine and theirs and not mine & theirs or values and allowed and not any(v in allowed for v in values) or \
                "not" in part and _canonical(self.flat(part["not"])[0]) == _canonical(other):   # part negates other
            return True
        if mine == {"string"}:   # disjoint when the Regex of both matches nothing (too large or unreadable: unknown)
            try:
                return shared_regex(tuple(self._string_parts(part) + self._string_parts(other))) is None
            except ValueError as exc:
                return str(exc).startswith("the pattern matches nothing")
        return mine in (set(), {"object"}) and any(self.disjoint(self.declared(part, name, True), self.declared(
            other, name), hops + 1) for name in dict.fromkeys(self._names(part) + self._names(other)))

    def literals(self, schema: dict, refs: int, depth: int) -> Literals | None:
        """enum/const (or true/false, null): the listed values that also fit the rest of the schema."""
        given = "enum" in schema or "const" in schema
        values = (self.list_of(schema["enum"], "enum") if "enum" in schema else [schema["const"]]) if given else \
            [True, False] if schema["type"] == "boolean" else [None]
        texts = [json.dumps(v, ensure_ascii=False, separators=(",", ":")) for v in values
                 if ("const" not in schema or _canonical(v) == _canonical(schema["const"])) and
                 not any(v == w and isinstance(v, bool) == isinstance(w, bool) for w in schema.get("!enum", []))]
        rest = {k: v for k, v in schema.items() if k not in ("enum", "const", "!enum")} if given else {}
        node = self.compile(rest, refs, depth) if rest else None
        texts = [t for t in texts if not rest or node is not None and accepts_text(node, t)]
        return Literals(texts) if texts else None

    def string(self, schema: dict, refs: int, depth: int) -> Leaf:
        """A string matching its patterns, format and lengths, none of the values `not` excludes."""
        high, form, parts = schema.get("maxLength"), schema.get("format"), tuple(self._string_parts(schema))
        if form in ("hostname", "idn-hostname"):
            high = min(HOSTNAME_MAX_LENGTH if high is None else high, HOSTNAME_MAX_LENGTH)
        try:
            return Leaf(ANY_TEXT if parts == (("", True),) else shared_regex(parts), schema.get("minLength", 0), high)
        except ValueError as exc:
            what = f"'pattern' {schema['pattern']!r}" if "pattern" in schema else "'format'/'minLength'/'maxLength'"
            raise self.fail(f"{what}: {exc}") from None

    def number(self, schema: dict, refs: int, depth: int) -> Leaf:
        """A number (an integer if so typed) within its bounds, a multiple of multipleOf, none `not` excludes."""
        exact, bounds = Fraction(str(schema.get("multipleOf", 1))), []
        # Validators divide floats (7.77 / 0.01 is not whole), so a step no float holds (0.01, not 0.5) takes integers.
        integer = schema["type"] == "integer" or "multipleOf" in schema and \
            (exact.denominator == 1 or Fraction(float(exact)) != exact)
        scale = 0 if integer else next(k for k in range(JSON_MAX_DIGITS + 1) if (exact * 10 ** k).denominator == 1)
        for inclusive, exclusive, tighter in (("minimum", "exclusiveMinimum", max),
                                              ("maximum", "exclusiveMaximum", min)):
            draft4 = isinstance(schema.get(exclusive), bool)   # exclusiveMinimum: true makes minimum exclusive
            found = [(Fraction(str(schema[word])), is_open) for word, is_open in
                     [(inclusive, draft4 and schema[exclusive])] + [(exclusive, True)] * (not draft4) if word in schema]
            bounds.append(tighter(found, key=lambda b: (b[0], b[1] == (tighter is max)), default=(None, False)))
        excluded = [v for v in schema.get("!enum", []) if type(v) in (int, float)]
        if any("e" in repr(v).lower() for v in excluded):
            raise self.fail(f"'not' excludes one of {excluded!r}, a number this server cannot exclude")
        excluded = ["-?" * (v == 0) + re.escape(str(int(v))) + r"(\.0+)?" if v % 1 == 0
                    else re.escape(repr(v)) + "0*" for v in excluded]   # every way this server writes it: 3, 3.0...
        (low, low_open), (high, high_open) = bounds
        try:
            return Leaf(number_regex(integer, low, high, low_open, high_open, exact.numerator if integer else int(
                exact * 10 ** scale), scale, tuple(excluded)), quoted=False, by_text=integer)   # a number's raw text
        except ValueError:
            raise self.fail("no number is within minimum/maximum and a multiple of multipleOf (and this server "
                            f"writes one as a regular expression of at most {REGEX_MAX_STATES} states)") from None

    def object(self, schema: dict, refs: int, depth: int) -> Piece | None:
        """properties and required keys in order (undeclared ones take any value), then keys that patternProperties
        or additionalProperties allow (without either, none), all under propertyNames."""
        properties, patterns = schema.get("properties", {}), schema.get("patternProperties", {})
        try:
            regexes = [regex_for(p) for p in patterns]
        except ValueError as exc:
            raise self.fail(f"'patternProperties': {exc}") from None
        extra, required = schema.get("additionalProperties", None if properties or patterns else True), \
            schema.get("required", [])
        names, props, banned = self.keys(schema.get("propertyNames", True), [], depth), [], []
        for name in dict.fromkeys([*properties, *required]):
            matched = [sub for p, sub in zip(regexes, patterns.values()) if p.matches(name)]
            named = names is ANY_STRING or names is not None and accepts_text(names, json.dumps(name))
            node = self.compile({"allOf": [properties.get(name, True if extra is None else extra), *matched]}, refs,
                                depth + 1) if named else None
            if node is None and name in required:
                return None
            props.append((name, node, name in required)) if node is not None else banned.append(name)
        # An other key's value: by the patterns it matches (indices), or additionalProperties' (()).
        values = {(): None if extra in (None, False) else self.compile(extra, refs, depth + 1)}
        subs = list(patterns.items())
        for chosen in itertools.chain(*(itertools.combinations(range(len(subs)), n + 1) for n in range(len(subs)))):
            with contextlib.suppress(ValueError):  # when one key can match them all
                if chosen[:-1] in values and shared_regex(tuple((subs[i][0], True) for i in chosen)):
                    values[chosen] = self.compile({"allOf": [subs[i][1] for i in chosen]}, refs, depth + 1)
        key = self.keys(schema.get("propertyNames", True), list(patterns) * (extra in (None, False)), depth)
        return Object(tuple(props), {k: v for k, v in values.items() if v is not None} if key else {},
                      schema.get("minProperties", 0), schema.get("maxProperties"), key, tuple(banned), tuple(regexes))

    def keys(self, names: Any, patterns: list, depth: int) -> Piece | None:
        """The key leaf for propertyNames and one of `patterns`: ANY_STRING when they allow any, None if none."""
        if names in (True, {}) and not patterns:
            return ANY_STRING
        either = [{"pattern": "|".join(f"(?:{p})" for p in patterns)}] if patterns else []
        node = self.compile({"allOf": [{"type": "string"}, names, *either]}, SCHEMA_MAX_REFS, depth + 1)
        if node is not None and not isinstance(node, (Leaf, Literals)):
            raise self.fail("'propertyNames' is enforced as a string schema (pattern, lengths, format, enum)")
        return node

    def array(self, schema: dict, refs: int, depth: int) -> Piece | None:
        """prefixItems (or a list of items) in their order, then items; contains and uniqueItems."""
        items, prefix = schema.get("items"), schema.get("prefixItems", [])
        if isinstance(items, list):  # draft-07 tuples: items as a list, then additionalItems
            prefix, items = items, schema.get("additionalItems")
        low, high = schema.get("minItems", 0), schema.get("maxItems")
        if "contains" in schema:   # the first minContains items match it; under maxContains, no other item does
            least, most, must = schema.get("minContains", 1), schema.get("maxContains"), schema["contains"]
            if most is not None and most < least:
                raise self.fail("'maxContains' is below 'minContains'")
            other, slots = True if items is None else items, range(max(least, len(prefix)))
            prefix = [{"allOf": [prefix[i] if i < len(prefix) else other, must if i < least else {"not": must}]}
                      if i < least or most is not None else prefix[i] for i in slots]
            items, low = other if most is None else {"allOf": [other, {"not": must}]}, max(low, least)
        nodes = list(itertools.takewhile(lambda n: n is not None, (self.compile(s, refs, depth + 1) for s in prefix)))
        if len(nodes) < len(prefix):  # no value fits the next position: the array ends before it
            high, items = len(nodes) if high is None else min(high, len(nodes)), False
        rest = self.compile(items if items is not None else not prefix or low > len(prefix), refs, depth + 1)
        if schema.get("uniqueItems") is True:
            # Each item as one leaf whose values' JSON texts are their identity (see Array); False if none.
            leaves = [n and Literals(t for a in n.alternatives for t in a.texts) if n is None or all(
                isinstance(a, Literals) for a in n.alternatives) else n if isinstance(n, Leaf) and n.by_text else False
                for n in nodes + [rest]]
            if False not in leaves:
                return Array(tuple(leaves[:-1]), leaves[-1], low, high, True)
            if low > 1:
                raise self.fail("'uniqueItems' is enforced over strings, integers and enum/const/boolean/null items")
            high = 1 if high is None else min(high, 1)   # one item is unique whatever it is
        return Array(tuple(nodes), rest, low, high)


def compile_schema(schema: Any, root: Any, param: str) -> Piece:
    """Compile a JSON Schema (the keywords in SCHEMA_KEYWORDS) or raise a 400 naming `param`."""
    try:
        node = SchemaCompiler(root if isinstance(root, dict) else {}, param).compile(schema)
    except RecursionError:
        raise invalid(f"'{param}': the schema nests too deeply for this server", param) from None
    if node is None:
        raise invalid(f"'{param}': no JSON value satisfies this schema as this server enforces it (its oneOf "
                      f"branches kept apart, its recursion cut at {SCHEMA_MAX_REFS} levels of $ref)", param)
    return node


@dataclass(frozen=True)
class Constraint:
    """Output the engine must produce: JSON text matching `node`."""

    node: Piece
    key: str                  # canonical JSON of the schema: equal keys share cached token masks


JSON_OBJECT = Constraint(ANY_OBJECT, "json_object")   # response_format json_object, and a lazy call's arguments


def schema_constraint(schema: Any, param: str) -> Constraint:
    """A JSON Schema as a constraint (compile_schema: a 400 naming `param` if it cannot be enforced)."""
    return Constraint(compile_schema(schema, schema, param), json.dumps(schema, sort_keys=True))


# -- JSON-constrained decoding: the automaton lifted to tokens
# A token may follow a state when the automaton takes its whole text. Masks walk a trie of the token texts, and
# inside strings a trie of the plain tokens over the string regex's class ids; they are cached per state, a
# string's count reduced to what can matter within one token (Leaf.key), so long strings reuse them.

class TokenTable:
    """A vocabulary's token texts indexed for constrained decoding, without special tokens and parts of characters.
    `plain` tokens hold only ordinary string characters (Leaf.PLAIN); the others are `marked`."""

    def __init__(self, tokenizer: Any):
        self.size, self.eos = len(tokenizer), sorted(tokenizer.eos_token_ids)
        self.texts = token_texts(tokenizer, self.size)
        usable = [(text, token) for token, text in enumerate(self.texts) if text]
        self.tokens = self.trie((text, [token]) for text, token in usable)
        self.plain = [(text, token) for text, token in usable if Leaf.PLAIN(text)]
        self.marked = [(token, text) for text, token in usable if not Leaf.PLAIN(text)]
        self.reach = max((len(text) for text, _ in usable), default=1)   # the longest token, in characters
        self.class_tries = Cache(JSON_CONSTRAINT_CACHE * 4)

    @staticmethod
    def trie(pairs: Any) -> dict:
        """A trie of (key, token ids) pairs: char -> child; "" -> the ids whose key ends there."""
        root: dict = {}
        for key, ids in pairs:
            functools.reduce(lambda node, ch: node.setdefault(ch, {}), key, root).setdefault("", []).extend(ids)
        return root

    @staticmethod
    def walk(node: dict, state: Any, move: Callable) -> list[int]:
        """The ids of the trie's keys that `move(state, char)` takes whole, depth first (a falsy state is dead)."""
        ids, todo = [], [(node, state)]
        while todo:
            node, state = todo.pop()
            for ch, child in node.items():
                if ch and (after := move(state, ch)):
                    ids.extend(child.get("", ()))
                    todo.append((child, after))
        return ids

    def class_trie(self, regex: Regex) -> dict:
        """The plain tokens as a trie over `regex`'s class ids (chr(id) for each character); cached."""
        def build() -> dict:
            classes = str.maketrans({ch: chr(regex.class_id(ch)) for ch in {c for text, _ in self.plain for c in text}})
            return self.trie((text.translate(classes), [token]) for text, token in self.plain)
        return self.class_tries.get_or(regex, build)


def token_texts(tokenizer: Any, size: int) -> list[str | None]:
    """Each token id's text as it reads inside a sequence (after an anchor token: SentencePiece's leading space
    kept); None for unusable ones."""
    head = tokenizer.decode([anchor := tokenizer.encode("a", add_special_tokens=False)[-1]])
    special = set(getattr(tokenizer, "all_special_ids", ())) | set(tokenizer.eos_token_ids)
    decoded = tokenizer.batch_decode([[anchor, token] for token in range(size)])
    return [text[len(head):] if token not in special and text.startswith(head) and "\ufffd" not in text
            else None for token, text in enumerate(decoded)]


_TOKEN_TABLES = Cache(4)   # by tokenizer id; an entry holds its tokenizer, so the id stays that tokenizer's
_CONSTRAINTS = Cache(JSON_CONSTRAINT_CACHE)


def token_table(tokenizer: Any) -> TokenTable:
    """The tokenizer's TokenTable, built on first use (about a second for 50k tokens)."""
    return _TOKEN_TABLES.get_or(id(tokenizer), lambda: (tokenizer, TokenTable(tokenizer)))[1]


class JsonMasks:
    """Which tokens may come next in each automaton state of one constraint, and how to close (cached).
    JsonConstraint starts closing `slack` tokens early: a token may commit the output to that much (Piece.slack)."""

    def __init__(self, table: TokenTable, start: tuple):
        self.table, self.start, self.slack = table, start, 2 * start[0][0].piece.slots[0][1].slack   # its value's
        self.masks, self.closings, self.plains = (Cache(JSON_MASK_CACHE_STATES) for _ in range(3))

    def key(self, state: tuple) -> tuple:
        """The state as the cache sees it: a top Leaf frame reduced by Leaf.key (leaves are always on top)."""
        return tuple(stack[:-1] + (stack[-1][0].key(stack[-1], self.table.reach),)
                     if stack and isinstance(stack[-1][0], Leaf) else stack for stack in state)

    def allowed(self, state: tuple, width: int) -> Any:
        """A boolean mx.array over `width` logits: the tokens that keep `state` alive."""
        return self.masks.get_or(self.key(state), lambda: self._build(state, width))

    def closing(self, state: tuple) -> list[int] | None:
        """The tokens that spell a shortest closing text from `state`, each the longest that fits (cached)."""
        return self.closings.get_or(self.key(state), lambda: self._spell(json_closing_text(state)))

    def _spell(self, text: str | None) -> list[int] | None:
        ids, table = [], self.table
        while text:  # the longest token that starts the rest (of equals, the lowest id)
            fits = table.walk(table.tokens, (text,), lambda rest, ch: (rest[0][1:],) if rest[0][:1] == ch else None)
            if not fits:
                return None  # no token spells the next character
            ids.append(max(fits, key=lambda token: (len(table.texts[token]), -token)))
            text = text[len(table.texts[ids[-1]]):]
        return None if text is None else ids

    def _build(self, state: tuple, width: int) -> Any:
        table, ids, walk, plain = self.table, [], [], self.ids_mask([], width)
        for stack in state:
            top = stack[-1]
            leaf = top[0] if isinstance(top[0], Leaf) and top[0].quoted and top.phase == "" else None
            if leaf and (top.ex is None or leaf.max_len is None and leaf.regex is ANY_TEXT):
                # Inside a string a plain token stays there: the regex and the length alone decide it.
                plain = plain | self.plains.get_or(leaf.key(top, table.reach)[:4], lambda: self.ids_mask(table.walk(
                    table.class_trie(leaf.regex), (top.at, top.count), leaf.move_class), table.size))
                ids += [t for t, text in table.marked if json_advance((stack,), text)]
            else:
                walk.append(stack)
        ids += table.walk(table.tokens, tuple(walk), json_advance) if walk else []
        return plain | self.ids_mask(ids + table.eos * json_complete(state), width)

    @staticmethod
    def ids_mask(ids: list[int], width: int) -> Any:
        """A boolean mask over `width` logits, true at `ids`."""
        import mlx.core as mx
        mask = mx.zeros((width + 1,), dtype=mx.bool_)   # one more, so the index list is never empty
        mask[mx.array([t for t in ids if t < width] + [width])] = True
        return mask[:width]


def masked(logits: Any, mask: Any) -> Any:
    """`logits` with -inf wherever the boolean `mask` is false."""
    import mlx.core as mx
    return mx.where(mask, logits, mx.array(-math.inf, dtype=logits.dtype))


def json_constraint(constraint: Constraint, tokenizer: Any, budget: int) -> JsonConstraint:
    """The logits processor that forces the constraint's JSON within `budget` tokens (masks shared per schema)."""
    return JsonConstraint(_CONSTRAINTS.get_or((id(tokenizer), constraint.key), lambda: JsonMasks(
        token_table(tokenizer), json_start(constraint.node))), budget)


class JsonConstraint:
    """A logits processor (one call per token, mlx_lm's) that lets through only tokens keeping the output valid JSON.
    When the tokens left just suffice to spell the shortest closing text, it spells it; then only end-of-sequence."""

    stateful = True   # follows the tokens sampled so far, one call per token

    def __init__(self, masks: JsonMasks, budget: int):
        self.masks, self.state, self.left = masks, masks.start, budget   # left: tokens still to sample, this one too
        self.started, self.plan = False, None   # plan: the closing tokens still to come, once closing

    def __call__(self, tokens: Any, logits: Any) -> Any:
        masks, width = self.masks, logits.shape[-1]
        if self.started:
            token = int(tokens[-1].item())
            text = masks.table.texts[token] if token < len(masks.table.texts) else None
            self.state, self.plan = json_advance(self.state, text) if text else (), self.plan and self.plan[1:]
        if self.plan is None and not json_complete(self.state):
            plan = masks.closing(self.state)
            self.plan = plan if plan is not None and len(plan) + 1 + masks.slack >= self.left else None
        self.started, self.left = True, self.left - 1
        # Dead, or closed: only end-of-sequence; closing: the plan's next token; else what keeps the state alive.
        ids = masks.table.eos if not self.state or self.plan == [] else self.plan and self.plan[:1]
        return masked(logits, masks.allowed(self.state, width) if ids is None else masks.ids_mask(ids, width))


# ---------------------------------------------------------------------------
# Request: every body parsed once into the one request type
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ToolCallRule:
    """Tool calls whose arguments the engine holds to a schema, written in the model's own call syntax.

    forced (tool_choice "required" or a named function): the reply is one call, among `calls`. Lazy (a
    tool with "strict": true under "auto"): text stays free until the model opens a call; from its start
    marker on, the call names one of `calls` and its arguments follow that tool's constraint (a strict
    tool's schema; any JSON object for the others).
    """

    calls: tuple[tuple[str, Constraint], ...]   # (tool name, its arguments' constraint)
    forced: bool
    # (tool name, its parameters schema; None: not held to it), for formats whose arguments are not one JSON
    # object (ChatFormat.pairs): these hold each argument's value to its own schema instead.
    schemas: tuple[tuple[str, dict | None], ...] = ()


def parameters_of(tool: dict) -> dict:
    """A function tool's parameters schema (an object of any properties when it has none)."""
    return tool["function"].get("parameters") or {"type": "object"}


def tool_call_rule(tools: tuple[dict, ...], forced: list[str], choice: str) -> ToolCallRule | None:
    """The rule for a request's tools: forced among `forced`, lazy when some tool is strict, else None."""
    if forced:
        chosen = [t for name in forced for t in tools if t["function"]["name"] == name]
        return ToolCallRule(tuple((t["function"]["name"], arguments_constraint(t)) for t in chosen), forced=True,
                            schemas=tuple((t["function"]["name"], parameters_of(t)) for t in chosen))
    if choice != "auto" or not any(t["function"].get("strict") is True for t in tools):
        return None
    strict = [t["function"].get("strict") is True for t in tools]
    return ToolCallRule(tuple((t["function"]["name"], arguments_constraint(t) if held else JSON_OBJECT)
                              for t, held in zip(tools, strict)), forced=False,
                        schemas=tuple((t["function"]["name"], parameters_of(t) if held else None)
                                      for t, held in zip(tools, strict)))


def arguments_constraint(tool: dict) -> Constraint:
    """A function tool's arguments as a constraint: its parameters schema (a 400 naming 'tools' if unenforceable)."""
    return schema_constraint(parameters_of(tool), "tools")


@dataclass(frozen=True)
class Check:
    """One row of the validation table: a field, its JSON types and its range."""

    field: str
    types: tuple[type, ...]
    rule: str                                   # how the error message states the contract
    ok: Callable[[Any], bool] = lambda value: True


def _is_stop(value: Any) -> bool:
    stops = [value] if isinstance(value, str) else value
    return (0 < len(stops) <= MAX_STOP_STRINGS
            and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops))


def _is_logit_bias(value: dict) -> bool:
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and -100 <= v <= 100
    # isascii: str.isdigit() also accepts digits such as "²" that int() refuses.
    return all(k.isascii() and k.isdigit() and number(v) for k, v in value.items())


# Fields shared by both endpoints. A null value counts as absent.
COMMON_CHECKS = (
    Check("model", (str,), "a string"),
    Check("stream", (bool,), "a boolean"),
    Check("stream_options", (dict,), "an object"),
    Check("max_tokens", (int,), "an integer >= 1", lambda v: v >= 1),
    Check("max_completion_tokens", (int,), "an integer >= 1", lambda v: v >= 1),
    Check("temperature", (int, float), "a number between 0 and 2", lambda v: 0 <= v <= 2),
    Check("top_p", (int, float), "a number between 0 and 1", lambda v: 0 <= v <= 1),
    Check("stop", (str, list), f"a string or a list of 1 to {MAX_STOP_STRINGS} strings, each 1 to "
          f"{MAX_STOP_CHARS} characters long", _is_stop),
    Check("n", (int,), "an integer >= 1 (choices; each takes a generation slot)", lambda v: v >= 1),
    Check("top_k", (int,), "an integer >= 0 (0 = no limit)", lambda v: v >= 0),
    Check("min_p", (int, float), "a number between 0 and 1", lambda v: 0 <= v <= 1),
    Check("seed", (int,), "an integer"),
    Check("presence_penalty", (int, float), "a number between -2 and 2", lambda v: -2 <= v <= 2),
    Check("frequency_penalty", (int, float), "a number between -2 and 2", lambda v: -2 <= v <= 2),
    Check("repetition_penalty", (int, float), "a number > 0 (1 = off)", lambda v: v > 0),
    Check("logit_bias", (dict,), "an object mapping token ids to numbers between -100 and 100", _is_logit_bias),
    Check("response_format", (dict,), 'an object such as {"type": "json_object"}'),
)


def common_checks(*fields: str) -> tuple[Check, ...]:
    """The rows of COMMON_CHECKS for these fields: a field the dialects share means the same there."""
    return tuple(check for check in COMMON_CHECKS if check.field in fields)

# Known fields that would change the result and are not implemented yet:
# refused by name rather than silently ignored. The value shown is the one
# that is harmless to accept.
UNSUPPORTED_FIELDS = {
    "function_call": (None, "none", "auto"),
    "echo": (None, False), "suffix": (None, ""), "best_of": (None, 1),
    "functions": (None, []),
}


@dataclass(frozen=True)
class GenerationRequest:
    """One validated generation body, whichever API it came through.

    The dialects (/v1/messages, /v1/responses) are parsed into the same
    normalised chat messages and OpenAI-shaped tools as /v1/chat/completions,
    so everything below the parsers serves them alike.
    """

    endpoint: str                                # "chat", "completions", "messages" (Anthropic) or "responses"
    messages: tuple[dict, ...] = ()              # chat-like: normalised {"role", "content"} dicts
    prompt: str | tuple[int, ...] = ""           # completions: text or token ids
    stream: bool = False
    include_usage: bool = False
    max_tokens: int = DEFAULT_MAX_TOKENS
    max_tokens_given: bool = False               # the client chose it and it must fit (the dialects' is trimmed)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                               # 0: no limit
    min_p: float = 0.0
    seed: int | None = None                      # the sampler's own random key; None: the global one
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0              # mlx_lm's multiplicative penalty; 1: off
    logit_bias: tuple[tuple[int, float], ...] = ()
    stop: tuple[str, ...] = ()
    logprobs: int | None = None                  # alternatives reported per token; None: no logprobs
    constraint: Constraint | None = None         # output forced to match a JSON schema (response_format)
    tools: tuple[dict, ...] = ()                 # chat-like: OpenAI tool definitions, for the chat template
    tool_choice: str = "none"                    # none, auto or required (a named function is required + tool_rule)
    tool_rule: ToolCallRule | None = None        # tool calls held to their schemas: forced, or lazy for strict tools
    one_call: bool = False                       # at most one tool call (parallel_tool_calls false): others dropped
    max_context: int = 0                         # chat: messages kept by the window (chat_window); 0 = all
    template_args: dict = dataclasses.field(default_factory=dict)  # chat: extra chat template arguments
    prefill: bool = False                        # chat: the reply continues the last (assistant) message's text
    split_reasoning: bool = False                # a thinking model's reasoning leaves the text (ReasoningSplitter)
    n: int = 1                                   # choices, decoded together, each in a slot of its own
    show_reasoning: bool = True                  # reasoning reaches the client (the dialects: when asked for)
    thinking_budget: int = 0                     # reasoning tokens before the server closes the block; 0: no limit
    echo: dict = dataclasses.field(default_factory=dict)        # request fields a dialect's reply repeats back
    tool_kinds: dict = dataclasses.field(default_factory=dict)  # Responses: rendered tool name -> its kind and namespace


def decode_json_body(raw: bytes) -> dict:
    """Parse a request body as a JSON object or raise a 400."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise invalid(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise invalid("request body must be a JSON object")
    return body


def run_checks(body: dict, checks: tuple[Check, ...]) -> None:
    """Apply the validation table; raise a 400 naming the first bad field."""
    for check in checks:
        value = body.get(check.field)
        if value is None:
            continue
        # bool is an int in Python but not in JSON: true is no max_tokens.
        type_ok = isinstance(value, check.types) and (bool in check.types or not isinstance(value, bool))
        if isinstance(value, float) and not math.isfinite(value):
            type_ok = False
        if not type_ok or not check.ok(value):
            raise invalid(f"'{check.field}' must be {check.rule}, got {json.dumps(value)[:80]}", check.field)
    for field, harmless in UNSUPPORTED_FIELDS.items():
        if field in body and body[field] not in harmless:
            raise invalid(f"'{field}' is not supported by this server", field, "unsupported_parameter")


def template_args(body: dict, settings: Settings) -> dict:
    """Chat template arguments: --chat-template-args, then chat_template_kwargs, then reasoning_effort."""
    args = {**settings.chat_template_args, **(body.get("chat_template_kwargs") or {})}
    if body.get("reasoning_effort") is not None:  # templates that take it (gpt-oss) read it; others ignore it
        args["reasoning_effort"] = body["reasoning_effort"]
    return args


def logprobs_wanted(endpoint: str, body: dict) -> int | None:
    """How many alternatives to report per token (chat top_logprobs, completions logprobs), or None."""
    if endpoint == "completions":
        return body.get("logprobs")
    if body.get("top_logprobs") is not None and not body.get("logprobs"):
        raise invalid("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (body.get("top_logprobs") or 0) if body.get("logprobs") else None


def sampling_fields(body: dict, defaults: dict) -> dict:
    """The sampling parameters of a checked body; absent or null ones take `defaults`, then OpenAI's.

    `defaults` is Settings.sampling: --temp and friends over the model's
    generation_config.json.
    """
    def given(field: str, default: Any) -> Any:
        value = body.get(field)
        value = defaults.get(field) if value is None else value
        return default if value is None else value

    bias = given("logit_bias", {})
    return {"temperature": float(given("temperature", 1.0)), "top_p": float(given("top_p", 1.0)),
            "top_k": given("top_k", 0), "min_p": float(given("min_p", 0.0)), "seed": body.get("seed"),
            "presence_penalty": float(given("presence_penalty", 0.0)),
            "frequency_penalty": float(given("frequency_penalty", 0.0)),
            "repetition_penalty": float(given("repetition_penalty", 1.0)),
            "logit_bias": tuple(sorted((int(k), float(v)) for k, v in bias.items()))}


def tool_arguments(value: Any, schema: dict | None = None) -> dict:
    """A tool call's arguments as a JSON object, whatever a model or a client wrote.

    JSON text of an object is decoded; anything else (other JSON, or text
    that is no JSON at all, such as `ls -la`) is wrapped: under the schema's
    one property when it has exactly one, else under RAW_ARGUMENTS_KEY. So
    arguments going out are always a JSON object, and replayed ones parse.
    """
    parsed = value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
    if isinstance(parsed, dict):
        return parsed
    names = list((schema or {}).get("properties") or {}) if isinstance(schema, dict) else []
    return {names[0] if len(names) == 1 else RAW_ARGUMENTS_KEY: parsed}


def output_fields(endpoint: str, body: dict, format_param: str = "response_format") -> dict:
    """response_format and (chat-like) tools, in chat's shapes: the constraint on the output and the tools offered."""
    constraint = parse_response_format(body.get("response_format"), format_param)
    if endpoint == "completions" or not body.get("tools"):
        if body.get("tool_choice") not in (None, "none", "auto") and endpoint != "completions":
            raise invalid("'tool_choice' needs a non-empty 'tools' list", "tool_choice")
        return {"constraint": constraint}
    tools = tuple(parse_tool(tool, i) for i, tool in enumerate(body["tools"]))
    choice, forced = parse_tool_choice(body.get("tool_choice"), tools)
    if forced and constraint is not None:
        raise invalid(f"'{format_param}' and a required 'tool_choice' cannot both constrain the output",
                      format_param)
    return {"constraint": constraint, "tools": tools, "tool_choice": choice,
            "tool_rule": tool_call_rule(tools, forced, choice), "one_call": body.get("parallel_tool_calls") is False}


def parse_tool(tool: Any, index: int) -> dict:
    """One OpenAI function tool, checked; returned as given (the chat template reads it)."""
    param = f"tools[{index}]"
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict):
        raise invalid(f"'{param}' must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}", param)
    if not isinstance(function.get("name"), str) or not function["name"]:
        raise invalid(f"'{param}.function.name' must be a non-empty string", f"{param}.function.name")
    if not isinstance(function.get("parameters", {}), dict):
        raise invalid(f"'{param}.function.parameters' must be a JSON Schema object", f"{param}.function.parameters")
    return tool


def parse_tool_choice(choice: Any, tools: tuple[dict, ...]) -> tuple[str, list[str]]:
    """(none/auto/required, the names a call is forced among: empty unless required or named)."""
    names = [t["function"]["name"] for t in tools]
    if choice is None or choice in ("none", "auto"):
        return choice or "auto", []
    if choice == "required":
        return "required", names
    name = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
        raise invalid("'tool_choice' must be \"none\", \"auto\", \"required\" or "
                      "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
    if name not in names:
        raise invalid(f"'tool_choice' names the tool {name[:80]!r}, which is not among the tools "
                      f"({', '.join(names)[:300]})", "tool_choice")
    return "required", [name]


def parse_response_format(value: dict | None, param: str = "response_format") -> Constraint | None:
    """response_format: text (no constraint), json_object, or json_schema (errors name `param`)."""
    kind = (value or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT
    spec = value.get("json_schema")
    if kind != "json_schema" or not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise invalid(f"'{param}' must be {{\"type\": \"text\"}}, {{\"type\": \"json_object\"}} or "
                      "{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}", param)
    return schema_constraint(spec["schema"], param)


MEDIA_PARTS = ("image_url", "input_image", "input_audio", "input_file", "file", "image", "document")


def chat_window(messages: tuple[dict, ...], keep: int) -> tuple[tuple[dict, ...], int]:
    """(the messages the model sees under a window of `keep`, how many were left out).

    The window works in whole turns, a turn being a user message and every
    assistant and tool message after it: system messages always stay, the
    last turn always stays however long it is, and older turns go, oldest
    first, until at most `keep` other messages remain. So the kept part never
    starts with an assistant or tool message (templates that need user and
    assistant to alternate would refuse it) and a tool call never loses its
    results. The messages left out are always the first non-system ones.
    keep 0 keeps all; a conversation without a user message is kept whole.
    """
    others = [i for i, m in enumerate(messages) if m["role"] != "system"]
    if keep <= 0 or len(others) <= keep:
        return messages, 0
    turns = [n for n, i in enumerate(others) if messages[i]["role"] == "user"]
    if not turns:
        return messages, 0
    first = next((n for n in turns if len(others) - n <= keep), turns[-1])
    start = others[first]
    return tuple(m for i, m in enumerate(messages) if i >= start or m["role"] == "system"), first


# -- /v1/embeddings: OpenAI's shapes, checked before any model is involved

EMBEDDING_FORMATS = ("float", "base64")
EMBEDDING_CHECKS = (
    Check("model", (str,), "a string"),
    Check("user", (str,), "a string"),
    Check("encoding_format", (str,), f"one of {', '.join(map(repr, EMBEDDING_FORMATS))}",
          lambda v: v in EMBEDDING_FORMATS),
    Check("dimensions", (int,), "an integer >= 1", lambda v: v >= 1),
)
INPUT_RULE = (f"a non-empty string, a list of 1 to {MAX_EMBEDDING_INPUTS} non-empty strings, a non-empty list of "
              "token ids, or a list of such lists")


@dataclass(frozen=True)
class EmbeddingRequest:
    """One validated /v1/embeddings body: each input is text or token ids, in the client's order."""

    inputs: tuple[str | tuple[int, ...], ...]
    encoding_format: str = "float"          # "float": JSON numbers; "base64": little-endian float32 bytes
    dimensions: int | None = None           # keep the first `dimensions` components (then re-normalize)

    @property
    def n(self) -> int:
        """One result however many inputs (the handler counts one finish per choice)."""
        return 1


def parse_embedding_request(body: dict) -> EmbeddingRequest:
    """Validate a decoded /v1/embeddings body; model-dependent limits come later (embedding_inputs)."""
    run_checks(body, EMBEDDING_CHECKS)
    return EmbeddingRequest(embedding_input(body.get("input")), body.get("encoding_format") or "float",
                            body.get("dimensions"))


def embedding_input(value: Any) -> tuple[str | tuple[int, ...], ...]:
    """OpenAI's four input shapes as a tuple of inputs, or a 400 naming what is wrong."""
    def token_ids(item: Any) -> bool:
        return (isinstance(item, list) and len(item) > 0
                and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in item))

    if isinstance(value, str) and value:
        return (value,)
    if token_ids(value):
        return (tuple(value),)
    if isinstance(value, list) and 0 < len(value) <= MAX_EMBEDDING_INPUTS:
        if all(isinstance(item, str) and item for item in value):
            return tuple(value)
        if all(token_ids(item) for item in value):
            return tuple(tuple(item) for item in value)
    got = f"a list of {len(value)} inputs" if isinstance(value, list) and len(value) > MAX_EMBEDDING_INPUTS \
        else json.dumps(value)[:80]
    raise invalid(f"'input' must be {INPUT_RULE}; got {got}", "input")


# ---------------------------------------------------------------------------
# Prompt and sampling: models, chat templates, tool-call and reasoning parsers, the window
# ---------------------------------------------------------------------------

@dataclass
class Model:
    """A loaded model with what the server needs to know about it."""

    model: Any
    tokenizer: Any
    context_length: int | None   # tokens the model was trained for, when its config says
    vocab_size: int              # rows of the embedding table: the first token id out of range
    token_bytes: list[bytes] | None = None  # each token id's own bytes (token_bytes_of); None: decode instead
    sampling: dict = dataclasses.field(default_factory=dict)  # the model folder's recommended sampling
    solo: "SoloOptions | None" = None  # generate one sequence at a time, this way (draft model, quantized cache)
    embedder: "Embedder | None" = None  # what serves /v1/embeddings; None: nothing can


def load_model(settings: Settings, group: Any = None) -> Model:
    """Load the model named by settings.model_path, with its adapters and template (raises on failure).

    In an mlx.launch group (`group`, see join_group) each rank loads only its
    shard with mlx_lm's sharded_load: tensor parallel (every layer split over
    the ranks), or pipeline parallel (the layers divided among them) with
    settings.pipeline, where the model's mlx_lm code supports it. Adapters,
    a draft model and a quantized cache are single-process only (mlx_lm's
    sharded_load takes no adapters; SoloBatch sends no ops).
    """
    apply_thread_cap(settings.threads)
    import mlx.core as mx
    tokenizer_config: dict[str, Any] = {"trust_remote_code": settings.trust_remote_code}
    if settings.chat_template is not None:
        tokenizer_config["chat_template"] = settings.chat_template
    if group is None:
        import mlx_lm
        model, tokenizer, config = mlx_lm.load(settings.model_path, tokenizer_config=tokenizer_config,
                                               adapter_path=settings.adapter_path, return_config=True,
                                               trust_remote_code=settings.trust_remote_code)
    else:
        from mlx_lm.utils import sharded_load
        if settings.adapter_path or settings.draft_model or settings.kv_bits or settings.prompt_cache_dir:
            raise ValueError("--adapter-path, --draft-model, --kv-bits and --prompt-cache-dir are not supported in a "
                             "sharded group")
        model, tokenizer, config = sharded_load(
            settings.model_path, pipeline_group=group if settings.pipeline else None,
            tensor_group=None if settings.pipeline else group, return_config=True,
            tokenizer_config=tokenizer_config, trust_remote_code=settings.trust_remote_code)
    # Adapter weights arrive unevaluated, tied to this thread's stream; the engine thread has its own.
    mx.eval(model.parameters())
    loaded = Model(model, tokenizer, context_length_of(config), vocab_size_of(model, tokenizer),
                   token_bytes_of(tokenizer), recommended_sampling(Path(settings.model_path)),
                   solo_options(settings, model, tokenizer))
    return dataclasses.replace(loaded, embedder=load_embedder(settings, loaded, group))


@dataclass(frozen=True)
class SoloOptions:
    """What makes the engine generate one sequence at a time (SoloBatch), and how."""

    draft: Any = None                 # the draft model for speculative decoding, or None
    num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS
    kv_bits: int | None = None
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START


def solo_options(settings: Settings, model: Any, tokenizer: Any) -> SoloOptions | None:
    """SoloOptions for --draft-model / --kv-bits, loading the draft; None when neither is set."""
    if settings.draft_model is None and settings.kv_bits is None:
        return None
    args = getattr(model, "args", None)
    head = getattr(args, "head_dim", None) or getattr(args, "hidden_size", 0) // max(getattr(args, "num_attention_heads", 1), 1)
    if settings.kv_bits is not None and head % settings.kv_group_size:
        raise ValueError(f"--kv-group-size {settings.kv_group_size} must divide the model's attention head size ({head})")
    draft = None
    if settings.draft_model is not None:
        import mlx.core as mx
        import mlx_lm
        draft, draft_tokenizer = mlx_lm.load(settings.draft_model)
        mx.eval(draft.parameters())
        if draft_tokenizer.vocab_size != tokenizer.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({draft_tokenizer.vocab_size} tokens) is not the "
                             f"model's ({tokenizer.vocab_size})")
    return SoloOptions(draft, settings.num_draft_tokens, settings.kv_bits, settings.kv_group_size,
                       settings.quantized_kv_start)


def recommended_sampling(folder: Path) -> dict:
    """The sampling settings a model folder's generation_config.json recommends, as request fields.

    As vLLM does, `do_sample` is not consulted: a model that recommends a
    temperature gets it. Values out of the ranges a request may ask for are
    ignored, with a warning.
    """
    try:
        config = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    ranges = {"temperature": (0, 2), "top_p": (0, 1), "top_k": (0, math.inf), "min_p": (0, 1),
              "repetition_penalty": (1e-9, math.inf)}
    found = {}
    for name, (low, high) in ranges.items():
        value = config.get(name) if isinstance(config, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high:
            found[name] = int(value) if name == "top_k" else float(value)
        elif value is not None:
            log.warning("generation_config.json: ignoring %s=%r (out of range)", name, value)
    return found


def vocab_size_of(model: Any, tokenizer: Any) -> int:
    """Rows of the model's embedding table (a padded vocabulary can exceed the tokenizer's)."""
    size = getattr(getattr(model, "args", None), "vocab_size", None)
    if isinstance(size, int) and size > 0:
        return size
    return int(tokenizer.vocab_size)


def token_bytes_of(tokenizer: Any) -> list[bytes] | None:
    """Each token id's own UTF-8 bytes, read off the tokenizer's byte map; None when it has none.

    A token may hold part of a character (emoji, most CJK): only its bytes say
    what it is, since decoding it alone gives U+FFFD. Byte-level BPE (GPT-2,
    Llama 3, Qwen) spells each byte as one character; SentencePiece spells a
    space as U+2581 and raw bytes as <0xNN>. mlx_lm chooses its streaming
    detokenizer by the same test, so its token map is what is read here.
    """
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer
    detokenizer = tokenizer.detokenizer
    if isinstance(detokenizer, SPMStreamingDetokenizer):
        return [piece.replace("\u2581".encode(), b" ") for piece in detokenizer.tokenmap]
    if not isinstance(detokenizer, BPEStreamingDetokenizer):
        return None
    table = gpt2_byte_values()
    return [b"".join(bytes([table[ch]]) if ch in table else ch.encode() for ch in piece)
            for piece in detokenizer.tokenmap]


def gpt2_byte_values() -> dict[str, int]:
    """Byte-level BPE's alphabet: the character that stands for each byte value.

    GPT-2's scheme: printable Latin-1 bytes stand for themselves, the other 68
    (controls, space, soft hyphen...) for U+0100 onwards, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


def context_length_of(config: dict) -> int | None:
    """The model's context window from its config.json, if it states one."""
    for key in ("max_position_embeddings", "max_sequence_length", "seq_length", "n_ctx"):
        value = config.get(key) or config.get("text_config", {}).get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


# Chat formats: how each family of chat templates writes tool calls, keyed by
# what its template contains. mlx_lm's own parser serves every family it reads
# right (Qwen, GLM, Kimi, MiniMax, Gemma...); the table holds the rest, and how
# each family writes a call whose arguments are forced (json_constraint).


@dataclass(frozen=True)
class ChatFormat:
    """How one family of chat templates writes its tool calls.

    `starts` open a call; `end` closes it ("": a call runs to the next start
    or the end of the reply, whose end-of-turn token is not text). `leading`
    open a call only as the first thing in a reply, and stay part of it
    (Llama 3's bare JSON). `parse(body, tools)` is one call's text ->
    {"name", "arguments"[, "id"]} or a list of them; it raises on anything
    else. `write(name)` is how the family writes a call to `name`: the text
    before its arguments JSON and the text after (None: no JSON form).
    `harmony`: OpenAI's channel format (gpt-oss), read by HarmonyScanner.
    `answer`: the text that opens the final answer, where the format marks
    it (harmony's final channel): constrained JSON output is written after it.
    `heads`: how a call's head reads from where the last call's arguments
    ended (what may come between, the name in group "name", an id in group
    "id"), up to the "{" its arguments start with: a streamed reply sends
    the arguments as the model writes them (CallStreamer). `pairs`: how a
    family whose arguments are key/value pairs, not one JSON object, writes
    a call (GLM, MiniMax); such a format has no `write`.
    """

    name: str
    starts: tuple[str, ...] = ()
    end: str = ""
    parse: Callable[[str, Any], Any] | None = None
    write: Callable[[str], tuple[str, str]] | None = None
    leading: tuple[str, ...] = ()
    harmony: bool = False
    answer: str = ""
    heads: tuple[re.Pattern, ...] = ()
    pairs: "PairSyntax | None" = None


@dataclass(frozen=True)
class PairSyntax:
    """How a family writes a call whose arguments are key/value pairs rather than one JSON object.

    A call reads `head` ({name} filled in), then for each argument `key` ({key} filled in), its value and
    `after`, `sep` between arguments, then `tail`. A value is raw text (between `quote`s) where `raw(schema)`
    says the family's parser keeps it as a string, else its JSON text, which that parser reads back as
    itself where `json(schema)` holds. A raw value holds none of `closers` (they would end it, or the call,
    early), no blank at either end (parsers strip them), and is none of `reserved` (texts, in any case,
    that its parser reads otherwise).
    """

    head: str
    key: str
    after: str
    tail: str
    closers: tuple[str, ...]
    raw: Callable[[dict], bool]
    json: Callable[[dict], bool] = lambda schema: True
    reserved: tuple[str, ...] = ()
    sep: str = ""
    quote: str = ""
    sign: str = ""          # what the chat template contains where this is its family's syntax (one parser, two)
    nullable: bool = False  # a string-or-null value is written raw (its parser reads the text as one of them)


@dataclass(frozen=True)
class PairPlan:
    """One tool's call in a PairSyntax: its head, its arguments in order with their values' constraints, its tail."""

    head: str
    params: tuple[tuple[str, Constraint, bool, str], ...]   # (text before the value, its constraint, required, after)
    tail: str


# A property's value schema as each family's parser decides how to read the value's text.
def minimax_types(schema: dict) -> set[str]:
    """The types MiniMax-M2's parser reads a parameter's value as (its own rule: type, enum, anyOf...)."""
    from mlx_lm.tool_parsers.minimax_m2 import _extract_types_from_schema
    return set(_extract_types_from_schema(schema))


def untyped_strings(schema: dict) -> bool:
    """Whether a schema with no type allows only strings (by enum or const): Qwen3-Coder keeps such values as text."""
    values = schema.get("enum", [schema["const"]] if "const" in schema else None)
    return "type" not in schema and isinstance(values, list) and all(isinstance(v, str) for v in values)


GLM_PAIRS = PairSyntax("<tool_call>{name}\n", "<arg_key>{key}</arg_key>\n<arg_value>", "</arg_value>\n",
                       "</tool_call>", ("</arg_value>", "</tool_call>"),
                       raw=lambda schema: schema.get("type") == "string")   # its parser's own test
GLM47_PAIRS = dataclasses.replace(GLM_PAIRS, head="<tool_call>{name}", key="<arg_key>{key}</arg_key><arg_value>",
                                  after="</arg_value>", sign="</arg_key><arg_value>")   # GLM-4.7: no newlines
MINIMAX_PAIRS = PairSyntax(
    '<minimax:tool_call>\n<invoke name="{name}">\n', '<parameter name="{key}">', "</parameter>\n",
    "</invoke>\n</minimax:tool_call>", ("</parameter>", "</invoke>", "</minimax:tool_call>"),
    raw=lambda schema: minimax_types(schema) == {"string"},
    json=lambda schema: "string" not in minimax_types(schema) and len(minimax_types(schema) - {"null"}) <= 1,
    reserved=("null",), nullable=True)
QWEN3_CODER_PAIRS = PairSyntax(
    "<tool_call>\n<function={name}>\n", "<parameter={key}>\n", "\n</parameter>\n", "</function>\n</tool_call>",
    ("</parameter>", "</function>", "</tool_call>"),
    raw=lambda schema: schema.get("type") == "string" or untyped_strings(schema),
    json=lambda schema: schema.get("type") in ("integer", "number", "boolean", "object", "array"), reserved=("null",))
# Gemma 4's parser (parse_gemma_call) quotes bare keys anywhere in the text: JSON values only where they hold no string.
GEMMA_PAIRS = PairSyntax("<|tool_call>call:{name}{{", "{key}:", "", "}<tool_call|>", ('<|"|>', "<tool_call|>"),
                         raw=lambda schema: schema.get("type") == "string" or untyped_strings(schema),
                         json=lambda schema: schema.get("type") in ("integer", "number", "boolean"), sep=",",
                         quote='<|"|>', nullable=True)
# Parameters schemas a PairPlan enforces: properties, required and what does not constrain.
PAIR_SCHEMA_KEYS = {"type", "properties", "required", "additionalProperties", "title", "description", "$schema",
                    "$id", "$defs", "definitions", "default", "examples", "$comment"}
# What Python's str.strip() takes off (the parsers strip raw values): a raw value neither starts nor ends with it.
STRIPPED = "[\\t-\\r\\x1c-\\x20\\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]"

# Any text ([\s\S] would miss the blanks only one of ECMAScript and Python has).
ANY_CHARACTERS = "(?:.|[\\n\\r\\u2028\\u2029])*"


def pair_plan(syntax: PairSyntax, name: str, schema: dict) -> PairPlan:
    """A tool's call in `syntax`, each argument held to its property's schema; ValueError naming what cannot be.

    Arguments come in the schema's order, the required ones always; an optional one whose value the
    family cannot write is left out, a required one is the error.
    """
    extra = sorted(set(schema) - PAIR_SCHEMA_KEYS)
    if extra or schema.get("type", "object") != "object":
        raise ValueError(f"its parameters use {', '.join(extra) or 'a type other than object'}, which key/value "
                         "arguments cannot hold to")
    properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    required = [key for key in schema.get("required") or () if isinstance(key, str)]
    params = []
    for key in list(properties) + [key for key in required if key not in properties]:
        value = properties.get(key, schema.get("additionalProperties", {}))
        try:
            if re.search(r'[<>"\s{}\[\],:]', key) or not isinstance(value, dict):
                raise ValueError("its name or its schema cannot be written in this syntax")
            raw, written = written_as(syntax, value)
            quote = syntax.quote * raw
            params.append((syntax.key.format(key=key) + quote, pair_value(syntax, raw, written, schema),
                           key in required, quote + syntax.after))
        except (ValueError, APIError) as exc:   # compile_schema's 400 names the schema's own problem
            if key in required:
                raise ValueError(f"its parameter {key!r} cannot be enforced: {exc}") from None
    return PairPlan(syntax.head.format(name=name), tuple(params), syntax.tail)


def written_as(syntax: PairSyntax, schema: dict) -> tuple[bool, dict]:
    """(raw, the schema the value's text follows): how `syntax` writes a value of `schema`; ValueError if it cannot."""
    if syntax.raw(schema) or syntax.json(schema):
        return syntax.raw(schema), schema
    branches, types = schema.get("anyOf", schema.get("oneOf")), schema.get("type")
    if isinstance(branches, list) and len(branches) == 2 and {"type": "null"} in branches:
        string = branches[1 - branches.index({"type": "null"})]   # Pydantic's Optional[str]
    else:
        string = {**schema, "type": "string"} if isinstance(types, list) and sorted(types) == ["null", "string"] else {}
    if syntax.nullable and isinstance(string, dict) and string.get("type") == "string":
        return True, string   # its parser reads null (MiniMax), or any text as a string (Gemma)
    raise ValueError("its parser reads this schema's values by a rule of its own")


def pair_value(syntax: PairSyntax, raw: bool, schema: dict, root: dict) -> Constraint:
    """One argument's value in `syntax`: raw text or JSON text matching `schema` (ValueError if it cannot be)."""
    node = compile_schema(schema, root, "tools")
    key = json.dumps([syntax.closers, raw, schema, root.get("$defs"), root.get("definitions")], sort_keys=True)
    if not raw:
        return Constraint(node, key)
    if isinstance(node, Literals):
        texts = [text for text in map(json.loads, node.texts) if isinstance(text, str) and raw_text_fits(syntax, text)]
        if not texts:
            raise ValueError("none of its values can be written raw")
        return Constraint(Literals(texts), key)
    if not isinstance(node, Leaf) or not node.quoted:
        raise ValueError("its values cannot be written as raw text")
    banned = tuple((re.escape(closer), True, True) for closer in syntax.closers) + tuple(
        ("".join(f"[{ch.lower()}{ch.upper()}]" for ch in word), False, True) for word in syntax.reserved)
    edges = (f"{STRIPPED}{ANY_CHARACTERS}|{ANY_CHARACTERS}{STRIPPED}", False, True)
    try:
        # At least one character (a decision): no family parser is tested on an empty raw value, so none is written.
        return Constraint(Leaf(shared_regex(node.regex.source + banned + (edges,)), max(node.min_len, 1),
                               node.max_len, quoted=False), key)
    except ValueError:
        raise ValueError(f"its values would hold {' or '.join(syntax.closers)}, which end a raw value, or start "
                         "or end with a blank, which the parser strips") from None


@functools.lru_cache(maxsize=64)
def cached_pair_plan(syntax: PairSyntax, name: str, schema: str) -> PairPlan:
    """pair_plan for a schema given as its canonical JSON text, kept: the request checks it, the engine runs it."""
    return pair_plan(syntax, name, json.loads(schema))


def raw_text_fits(syntax: PairSyntax, text: str) -> bool:
    """Whether `text`, written raw, reads back as itself (and is not empty: see pair_value)."""
    return (bool(text) and text == text.strip() and not any(closer in text for closer in syntax.closers)
            and text.lower() not in syntax.reserved)


# A call written as a JSON object {"name": ..., "arguments" (or Llama's "parameters"): {...}}, one of a list.
JSON_CALL_HEAD = re.compile(r'[\s\[\];,}]*\{\s*"name"\s*:\s*"(?P<name>[^"\\]+)"\s*,'
                            r'\s*"(?:arguments|parameters)"\s*:\s*(?=\{)')


def json_objects(text: str) -> list[Any]:
    """The JSON values written one after another in `text` (blanks, ';' or ',' between); raises if any is not."""
    decoder, values, at = json.JSONDecoder(), [], 0
    while (at := len(text) - len(text[at:].lstrip(" \t\r\n;,"))) < len(text):
        value, at = decoder.raw_decode(text, at)
        values.append(value)
    return values


def parse_llama_calls(body: str, tools: Any = None) -> list[dict]:
    """Llama 3.x: {"name": ..., "parameters": {...}} (after <|python_tag|> or as the whole reply), one or more."""
    calls = []
    for value in json_objects(body):
        arguments = value.get("parameters", value.get("arguments")) if isinstance(value, dict) else None
        if not isinstance(value.get("name") if isinstance(value, dict) else None, str) or not isinstance(arguments, dict):
            raise ValueError(f"not a Llama tool call: {body[:200]!r}")
        calls.append({"name": value["name"], "arguments": arguments})
    if not calls:
        raise ValueError("no tool call")
    return calls


DEEPSEEK_CALL = re.compile(r"<｜tool▁call▁begin｜>(?:(\w+)<｜tool▁sep｜>([^\n<]+)\n```(?:json)?\n(.*?)\n```|"
                           r"([^<]+?)<｜tool▁sep｜>(.*?))<｜tool▁call▁end｜>", re.S)


def parse_deepseek_calls(body: str, tools: Any = None) -> list[dict]:
    """DeepSeek's calls block: R1's `function<｜tool▁sep｜>NAME\\n```json\\n{...}\\n```` or V3.1's `NAME<｜tool▁sep｜>{...}`.

    The R1 distills' template never closes a lone call, so a call whose end
    marker is missing (the reply ended) still counts.
    """
    if "<｜tool▁call▁end｜>" not in body.rstrip()[-len("<｜tool▁call▁end｜>"):]:
        body += "<｜tool▁call▁end｜>"
    calls = [{"name": (match[2] or match[4]).strip(), "arguments": json.loads(match[3] or match[5])}
             for match in DEEPSEEK_CALL.finditer(body)]
    if not calls:
        raise ValueError(f"not a DeepSeek tool call: {body[:200]!r}")
    return calls


MISTRAL_CALL = re.compile(r"\s*([\w.-]+)(?:\[CALL_ID\](\w+))?\[ARGS\]")
MISTRAL_HEAD = re.compile(r"\s*(?P<name>[\w.-]+)(?:\[CALL_ID\](?P<id>\w+))?\[ARGS\]\s*(?=\{)")
DEEPSEEK_R1_HEAD = re.compile(r"(?:\s|```|<｜tool▁call▁end｜>)*<｜tool▁call▁begin｜>\w+<｜tool▁sep｜>"
                              r"(?P<name>[^\n<]+)\n```(?:json)?\n\s*(?=\{)")
DEEPSEEK_HEAD = re.compile(r"(?:\s|<｜tool▁call▁end｜>)*<｜tool▁call▁begin｜>(?P<name>[^<]+?)<｜tool▁sep｜>\s*(?=\{)")


def parse_mistral_call(body: str, tools: Any = None) -> Any:
    """Mistral: `name[ARGS]{...}`, Mistral Small 3.2's `name[CALL_ID]id[ARGS]{...}`, or the older JSON list."""
    if body.lstrip().startswith("["):
        from mlx_lm.tool_parsers import mistral
        return mistral.parse_tool_call(body, tools)
    match = MISTRAL_CALL.match(body)
    if match is None:
        raise ValueError(f"not a Mistral tool call: {body[:200]!r}")
    arguments, = json_objects(body[match.end():])
    call = {"name": match[1], "arguments": arguments}
    return {**call, "id": match[2]} if match[2] else call


GEMMA_CALL = re.compile(r"\s*call:(?P<name>[^{\s]+)(?P<arguments>\{.*\})\s*", re.S)
GEMMA_STRING = re.compile(r'<\|"\|>(.*?)<\|"\|>', re.S)                   # Gemma 4 quotes strings so
GEMMA_KEY = re.compile(r'([{,]\s*)([^\s{}\[\],:"][^{}\[\],:"]*?)\s*:')    # and leaves keys bare


def parse_gemma_call(body: str, tools: Any = None) -> dict:
    """Gemma 4: `call:NAME{key:value,...}`, strings between <|"|> marks, keys bare. mlx_lm's parser
    takes only \\w+ keys and [\\w-]+ names, so a key such as "file-path" or a name such as
    "files.read" loses the call; here a key is whatever comes before its colon."""
    match = GEMMA_CALL.fullmatch(body)
    if match is None:
        raise ValueError(f"not a Gemma tool call: {body[:200]!r}")
    strings: list[str] = []

    def hold(found: re.Match) -> str:
        strings.append(found[1])
        return f'"\x00{len(strings) - 1}"'
    text = GEMMA_KEY.sub(lambda m: f"{m[1]}{json.dumps(m[2])}:", GEMMA_STRING.sub(hold, match["arguments"]))
    text = re.sub(r'"\x00(\d+)"', lambda m: json.dumps(strings[int(m[1])], ensure_ascii=False), text)
    return {"name": match["name"], "arguments": json.loads(text)}


def mistral_call_id() -> str:
    """A call id as Mistral Small 3.2's template demands: nine letters and digits."""
    return uuid.uuid4().hex[:9]


# (what the chat template contains, its format); the first match wins, and a
# template none matches gets mlx_lm's parser (chat_format_of).
CHAT_FORMATS: tuple[tuple[tuple[str, ...], ChatFormat], ...] = (
    (("<|channel|>analysis",), ChatFormat(
        "harmony", harmony=True, answer="<|channel|>final<|message|>",
        write=lambda name: (f"<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>", "<|call|>"))),
    (("<｜tool▁calls▁begin｜>", "```json"), ChatFormat(
        "deepseek-r1", starts=("<｜tool▁calls▁begin｜>",), end="<｜tool▁calls▁end｜>", parse=parse_deepseek_calls,
        heads=(DEEPSEEK_R1_HEAD,),
        write=lambda name: (f"<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\n```json\n",
                            "\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>"))),
    (("<｜tool▁calls▁begin｜>",), ChatFormat(
        "deepseek-v3.1", starts=("<｜tool▁calls▁begin｜>",), end="<｜tool▁calls▁end｜>", parse=parse_deepseek_calls,
        heads=(DEEPSEEK_HEAD,),
        write=lambda name: (f"<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>{name}<｜tool▁sep｜>",
                            "<｜tool▁call▁end｜><｜tool▁calls▁end｜>"))),
    (("[TOOL_CALLS]", "[CALL_ID]"), ChatFormat(
        "mistral-3.2", starts=("[TOOL_CALLS]",), parse=parse_mistral_call, heads=(MISTRAL_HEAD, JSON_CALL_HEAD),
        write=lambda name: (f"[TOOL_CALLS]{name}[CALL_ID]{mistral_call_id()}[ARGS]", ""))),
    (("[TOOL_CALLS]",), ChatFormat(
        "mistral", starts=("[TOOL_CALLS]",), parse=parse_mistral_call, heads=(MISTRAL_HEAD, JSON_CALL_HEAD),
        write=lambda name: (f"[TOOL_CALLS]{name}[ARGS]", ""))),
    (("<TOOLCALL>[",), ChatFormat(
        "nemotron", starts=("<TOOLCALL>",), end="</TOOLCALL>", parse=parse_mistral_call,   # a JSON list of calls
        heads=(JSON_CALL_HEAD,),
        write=lambda name: (f'<TOOLCALL>[{{"name": {json.dumps(name)}, "arguments": ', "}]</TOOLCALL>"))),
    (("<|tool_call>call:",), ChatFormat(
        "gemma4", starts=("<|tool_call>",), end="<tool_call|>", parse=parse_gemma_call, pairs=GEMMA_PAIRS)),
    (('{"name": function name, "parameters"',), ChatFormat(
        "llama3", starts=("<|python_tag|>",), leading=("{",), parse=parse_llama_calls, heads=(JSON_CALL_HEAD,),
        write=lambda name: (f'{{"name": {json.dumps(name)}, "parameters": ', "}"))),
)


def chat_format_of(tokenizer: Any) -> ChatFormat | None:
    """The tool-call format of the model's chat template: the table's, else mlx_lm's parser's, else None."""
    template = getattr(tokenizer, "chat_template", None)
    return _chat_format(template if isinstance(template, str) else "", getattr(tokenizer, "tool_call_start", None),
                        getattr(tokenizer, "tool_call_end", None), getattr(tokenizer, "tool_parser", None))


KIMI_HEAD = re.compile(r"(?:\s|<\|tool_call_end\|>)*<\|tool_call_begin\|>\s*"
                       r"(?P<id>(?:functions\.)?(?P<name>[^<]+?):\d+)\s*<\|tool_call_argument_begin\|>\s*(?=\{)")
# How the families mlx_lm parses write a forced call, by the parser's module: JSON arguments as
# (write(start marker, end marker, name) -> (before, after), heads), key/value pairs as the first PairSyntax
# whose sign the template contains.
MLX_CALLS = {
    "json_tools": (lambda start, end, name: (f'{start}\n{{"name": {json.dumps(name)}, "arguments": ', f"}}\n{end}"),
                   (JSON_CALL_HEAD,)),   # Qwen's <tool_call>{JSON}
    "kimi_k2": (lambda start, end, name: (f"{start}<|tool_call_begin|>functions.{name}:0<|tool_call_argument_begin|>",
                                          f"<|tool_call_end|>{end}"), (KIMI_HEAD,)),
    "glm47": (GLM47_PAIRS, GLM_PAIRS),
    "minimax_m2": (MINIMAX_PAIRS,),
    "qwen3_coder": (QWEN3_CODER_PAIRS,),
}


@functools.lru_cache(maxsize=16)
def _chat_format(template: str, start: str | None, end: str | None, parser: Any) -> ChatFormat | None:
    for signs, found in CHAT_FORMATS:
        if all(sign in template for sign in signs):
            return found
    if not start or parser is None:
        return None
    name = getattr(parser, "__module__", "").rpartition(".")[2]
    calls = MLX_CALLS.get(name, ())
    if not calls or isinstance(calls[0], PairSyntax):
        pairs = next((syntax for syntax in calls if syntax.sign in template), None)
        return ChatFormat(name, starts=(start,), end=end or "", parse=parser, pairs=pairs)
    write, heads = calls
    return ChatFormat(name, starts=(start,), end=end or "", parse=parser, heads=heads,
                      write=lambda tool: write(start, end or "", tool))


def template_messages(messages: list[dict], template: str) -> list[dict]:
    """The messages as this chat template expects them.

    Reasoning sent back (reasoning_content) is also harmony's `thinking`.
    A template that demands alternating roles gets consecutive plain
    messages of one role merged with a blank line (Codex sends system
    prompt, developer message, then user), as peers do; one that demands
    nine-character call ids (Mistral Small 3.2) gets each id mapped to one;
    one that joins a call's arguments to strings (DeepSeek's) gets them as
    JSON text; one that reads tool results only as `tool_responses` on the
    calling message (Gemma 4's first template) gets them so.
    """
    if "tool_responses" in template and "tool_call_id" not in template:
        messages = tool_results_folded(messages)
    out: list[dict] = []
    for message in messages:
        message = dict(message)
        if "reasoning_content" in message and "<|channel|>" in template:
            message["thinking"] = message["reasoning_content"]
        if "length 9" in template:
            message = nine_character_ids(message)
        if message.get("tool_calls") and re.search(r"\[['\"]arguments['\"]\]\s*\+", template):  # DeepSeek's
            message["tool_calls"] = [call_with_text_arguments(call) for call in message["tool_calls"]]
        plain = not message.get("tool_calls") and message["role"] != "tool"
        if ("must alternate" in template and plain and out and out[-1]["role"] == message["role"]
                and not out[-1].get("tool_calls") and isinstance(message["content"], str)
                and isinstance(out[-1]["content"], str)):
            out[-1] = {**out[-1], "content": f"{out[-1]['content']}\n\n{message['content']}"}
            continue
        out.append(message)
    return out


def tool_results_folded(messages: list[dict]) -> list[dict]:
    """Tool results as Gemma 4's first template reads them: each a `tool_responses` entry ({"name",
    "response"}) on the assistant message whose calls it answers, and the reply after them that same
    message's content (the model's turn goes on after a result), as Google's prompt-formatting guide
    shows it and llama.cpp sends it. Fed as role "tool" it would render as a turn of its own."""
    out: list[dict] = []
    for message in messages:
        last = out[-1] if out else {}
        if message["role"] == "tool" and last.get("tool_calls"):
            calls, answered = last["tool_calls"], last.get("tool_responses", [])
            name = next((c["function"]["name"] for c in calls if c.get("id") == message.get("tool_call_id")),
                        calls[min(len(answered), len(calls) - 1)]["function"]["name"])
            out[-1] = {**last, "tool_responses": [*answered, {"name": name, "response": message["content"]}]}
        elif (message["role"] == "assistant" and last.get("tool_responses") and not message.get("tool_calls")
              and not last.get("content")):
            out[-1] = {**last, "content": message["content"]}
        else:
            out.append(message)
    return out


def call_with_text_arguments(call: dict) -> dict:
    """A tool call whose arguments are JSON text, for templates that join them to strings (DeepSeek's)."""
    arguments = call["function"].get("arguments")
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {**call, "function": {**call["function"], "arguments": text}}


def nine_character_ids(message: dict) -> dict:
    """A message whose call ids are nine letters and digits, each id always mapped to the same one."""
    def nine(call_id: Any) -> Any:
        return call_id if not isinstance(call_id, str) or re.fullmatch(r"[A-Za-z0-9]{9}", call_id) else \
            uuid.uuid5(uuid.NAMESPACE_URL, call_id).hex[:9]
    if "tool_call_id" in message:
        message["tool_call_id"] = nine(message["tool_call_id"])
    if message.get("tool_calls"):
        message["tool_calls"] = [{**call, "id": nine(call.get("id"))} for call in message["tool_calls"]]
    return message


# -- memory: what the weights leave for KV caches, shared by the prompt cache and the running batch

def machine_memory() -> tuple[int, str]:
    """(bytes the server may use in all, where the figure comes from).

    On Apple silicon, Metal's recommended working set: beyond it the GPU's
    memory is paged and generation slows to a crawl. Elsewhere physical memory.
    """
    import mlx.core as mx
    with contextlib.suppress(Exception):
        if mx.metal.is_available():
            info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
            if info.get("max_recommended_working_set_size"):
                return int(info["max_recommended_working_set_size"]), "Metal's recommended working set"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical memory"


def weights_bytes(model: Model) -> int:
    """Bytes of the loaded weights (the model's, a draft model's and an --embedding-model's)."""
    from mlx.utils import tree_flatten
    parts = [model.model] + ([model.solo.draft] if model.solo is not None and model.solo.draft is not None else [])
    if model.embedder is not None and model.embedder.name is not None:  # named: a second model, not the chat model's
        parts.append(model.embedder.model)
    return sum(value.nbytes for part in parts for _, value in tree_flatten(part.parameters()))


def kv_token_bytes(model: Model) -> int:
    """KV-cache bytes one token of context takes in this model, from its config (--kv-bits included).

    Keys and values of every layer: 2 x layers x KV heads x head size
    elements, in the activations' dtype (read off a floating-point weight or
    a quantized layer's scales), or at --kv-bits with a scale and a bias per
    group. Layers with a sliding window or recurrent state take less than
    this in long contexts: the figure is an upper bound.
    """
    args = getattr(model.model, "args", None)
    text = getattr(args, "text_config", None)
    args = text if isinstance(text, dict) and text else vars(args) if args is not None else {}
    heads = args.get("num_attention_heads") or 1
    kv_heads = args.get("num_key_value_heads") or heads
    head = args.get("head_dim") or args.get("hidden_size", 0) // heads
    layers = len(getattr(model.model, "layers", ())) or args.get("num_hidden_layers", 0)
    elements = 2 * layers * kv_heads * head
    dtype = activation_bytes(model.model)
    solo = model.solo
    if solo is not None and solo.kv_bits is not None:
        return math.ceil(elements * (solo.kv_bits / 8 + 2 * dtype / solo.kv_group_size))
    return elements * dtype


def activation_bytes(module: Any) -> int:
    """Bytes per element of the model's activations: its first floating-point weight's (2 when unknown)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    for _, value in tree_flatten(module.parameters()):
        if value.dtype in (mx.float16, mx.bfloat16, mx.float32):
            return value.dtype.size
    return 2


@dataclass(frozen=True)
class MemoryPlan:
    """How the server's memory is divided: weights, then KV caches (prompt cache + running batch).

    The running batch may use all of `kv_bytes` for its worst case (prompt +
    max_tokens of every admitted request); the prompt cache keeps at most
    `prompt_cache_bytes`, and never more than the running batch leaves.
    """

    memory_bytes: int       # weights + KV may take this much in all
    source: str             # where memory_bytes comes from
    weights_bytes: int
    token_bytes: int        # KV bytes per token of context
    prompt_cache_bytes: int

    @property
    def kv_bytes(self) -> int:
        """Bytes left for KV caches (batch and prompt cache) once the weights are in; never negative."""
        return max(self.memory_bytes - self.weights_bytes, 0)

    def tokens(self, nbytes: int) -> int:
        """Tokens of this model's context that `nbytes` of KV cache hold."""
        return nbytes // max(self.token_bytes, 1)


def plan_memory(settings: Settings, model: Model) -> MemoryPlan:
    """Size memory for this model on this machine, warning about figures larger than there is.

    The default prompt cache budget is the KV memory less a reserve for the
    running batch (BATCH_RESERVE_TOKENS per slot), never less than half of
    it: the running batch takes what more it needs from the cache anyway.
    """
    memory, source = machine_memory()
    if settings.memory_bytes is not None:
        if settings.memory_bytes > memory:
            log.warning("--memory-bytes %d is more than this machine's %s (%d bytes): using %d", settings.memory_bytes,
                        source, memory, memory)
        else:
            memory, source = settings.memory_bytes, "--memory-bytes"
    weights, token = weights_bytes(model), max(kv_token_bytes(model), 1)
    kv = max(memory - weights, 0)
    if kv < BATCH_RESERVE_TOKENS * token:
        log.warning("the weights (%d bytes) leave %d of the %d bytes of %s for KV caches: under %d tokens of "
                    "context; longer requests will be refused", weights, kv, memory, source, BATCH_RESERVE_TOKENS)
    cache = settings.prompt_cache_bytes
    if cache is None:
        cache = kv - min(kv // 2, settings.max_requests * BATCH_RESERVE_TOKENS * token)
    elif cache > kv:
        log.warning("--prompt-cache-bytes %d is more than the %d bytes the weights leave of %s: using %d",
                    cache, kv, source, kv)
        cache = kv
    return MemoryPlan(memory, source, weights, token, cache)


def render_prompt(request: GenerationRequest, model: Model) -> tuple[list[int], int]:
    """(the prompt's token ids, chat messages the window left out).

    Chat goes through the chat template, after the window; text is encoded.
    Runs in the handler thread, before admission, so that a prompt the
    template refuses or that cannot fit is a 400 even while every slot is busy.
    """
    if request.endpoint == "completions":
        return completion_prompt(request.prompt, model), 0
    tokenizer = model.tokenizer
    kept, dropped = chat_window(request.messages, request.max_context)
    messages = neutralize_billing_header([dict(m) for m in kept])
    if not getattr(tokenizer, "has_chat_template", False):
        turns = messages[:-1] if request.prefill else messages
        text = "".join(f"{m['role']}: {m['content']}\n" for m in turns) + "assistant:"
        return tokenizer.encode(text + (f" {messages[-1]['content']}" if request.prefill else "")), dropped
    tools = check_tool_support(request, tokenizer)
    template = getattr(tokenizer, "chat_template", None)
    template = template if isinstance(template, str) else ""
    try:
        if request.prefill:
            return prefill_prompt(tokenizer, messages, tools, request.template_args, template), dropped
        messages = template_messages(messages, template)
        ids = list(tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True,
                                                 **request.template_args))
        return with_model_turn(ids, tokenizer, template), dropped
    except APIError:
        raise
    except Exception as exc:  # the template rejected the conversation (roles, order)
        window = (f" (the --max-context {request.max_context} window left out the first {dropped} "
                  f"messages; raise it or send fewer)" if dropped else "")
        raise invalid(f"the model's chat template rejected these messages{window}: {exc}", "messages") from None


def with_model_turn(ids: list[int], tokenizer: Any, template: str) -> list[int]:
    """The prompt with Gemma 4's model-turn header added where its templates leave it out: after tool
    results whose calling message also had text, that text closes the turn (<turn|>) and no generation
    prompt follows, so the reply would start outside any turn. llama.cpp adds the header too."""
    if "<|turn>model\\n" not in template or not tokenizer.decode(ids[-4:]).endswith("<turn|>\n"):
        return ids
    return ids + tokenizer.encode("<|turn>model\n", add_special_tokens=False)


# Put after a continued assistant message's text: the prompt is the rendered conversation up to it, so the
# template's end of turn (and whatever it does after the text) is cut off, wherever the template puts the text.
PREFILL_MARK = "\u2060<lem-serve:prefill-end>\u2060"


def prefill_prompt(tokenizer: Any, messages: list[dict], tools: list[dict] | None, args: dict,
                   template: str) -> list[int]:
    """The token ids of `messages` rendered without a generation prompt, cut at PREFILL_MARK (put after the
    last message's text), so that the reply continues that text; a 400 when the template drops it.

    A reply with reasoning and no text yet (cut while thinking) goes on
    thinking where the template renders its reasoning; where it does not,
    it answers after it. Encoded as apply_chat_template(tokenize=True)
    encodes: no special tokens added.
    """
    last = messages[-1]
    fields = ("reasoning_content", "content") if last.get("reasoning_content") and not last["content"] else ("content",)
    for field in fields:
        marked = template_messages(messages[:-1] + [{**last, field: last[field] + PREFILL_MARK}], template)
        text = tokenizer.apply_chat_template(marked, tools=tools, add_generation_prompt=False, tokenize=False, **args)
        if text.count(PREFILL_MARK) == 1:
            return tokenizer.encode(text[:text.index(PREFILL_MARK)], add_special_tokens=False)
    raise invalid("this model's chat template does not render the last assistant message's text as sent, "
                  "so it cannot be continued; end with a user message", f"messages[{len(messages) - 1}]")


# Claude Code (2.1.x) opens its system prompt with a line whose cch= value (and cc_version's suffix) are hashes
# that change with every request; left alone, no two requests would share more than a few prompt tokens.
BILLING_HEADER = re.compile(r"\Ax-anthropic-billing-header:[^\n]*")
BILLING_NONCES = ((re.compile(r"\bcch=[0-9a-fA-F]+"), "cch=00000"),
                  (re.compile(r"\b(cc_version=\d+\.\d+\.\d+)\.[0-9a-fA-F]+\b"), r"\1"))


def neutralize_billing_header(messages: list[dict]) -> list[dict]:
    """The messages with the nonces of a Claude Code billing header, at the start of the first system message, fixed.

    The line means nothing to the model; with fixed values every request of
    a session renders the same prefix, which the prompt cache can reuse.
    """
    first = messages[0] if messages else None
    if first is None or first.get("role") != "system" or not isinstance(first.get("content"), str):
        return messages
    header = BILLING_HEADER.match(first["content"])
    if header is None:
        return messages
    line = header.group()
    for pattern, fixed in BILLING_NONCES:
        line = pattern.sub(fixed, line)
    return [{**first, "content": line + first["content"][header.end():]}] + messages[1:]


def completion_prompt(prompt: str | tuple[int, ...], model: Model) -> list[int]:
    """A completions prompt's token ids; an empty one starts from the start-of-text token.

    The BOS rule is mlx_lm.generate's: add BOS unless the text already has it.
    A model cannot run on no tokens at all, so an empty prompt becomes BOS, or
    the end-of-text token for models without one, which is what OpenAI's
    completions do with "".
    """
    if isinstance(prompt, tuple):
        return list(prompt)
    tokenizer = model.tokenizer
    bos = tokenizer.bos_token
    tokens = tokenizer.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos))
    if not tokens:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        tokens = [start]
    return tokens


def check_tool_support(request: GenerationRequest, tokenizer: Any) -> list[dict] | None:
    """The tools to show the chat template, or a 400 when this model cannot call them."""
    if not request.tools or request.tool_choice == "none":
        return None
    form = chat_format_of(tokenizer)
    if form is None:
        raise invalid("this model has no tool-call format that the server can parse; send no 'tools'", "tools")
    rule = request.tool_rule
    if rule is not None and form.write is None and form.pairs is None:
        what, param = ("a required 'tool_choice'", "tool_choice") if rule.forced else ("a strict tool", "tools")
        raise invalid(f"{what} needs a model whose tool-call format the server can write (the README lists them); "
                      f"this model's calls are {form.name}'s", param)
    for name, schema in rule.schemas if rule is not None and form.pairs is not None else ():
        try:
            cached_pair_plan(form.pairs, name, json.dumps(schema)) if schema is not None else None
        except ValueError as exc:
            raise invalid(f"the tool {name!r} cannot be held to its schema in {form.name}'s call syntax, whose "
                          f"arguments are key/value pairs: {exc}", "tools") from None
    return list(request.tools)


def call_opening(form: ChatFormat) -> str:
    """The text that opens every call of `form`: its start marker, else what comes before the tool's name."""
    before = form.write("lem_probe")[0] if form.write else form.pairs.head.format(name="lem_probe")
    marker = next((m for m in form.starts if before.startswith(m)), None)
    return marker if marker is not None else before[:before.index("lem_probe")].rstrip('"')


PROMPT_PARAMS = {"chat": "messages", "completions": "prompt", "messages": "messages", "responses": "input"}


def fit_to_context(prompt_tokens: int, request: GenerationRequest, model: Model) -> int:
    """The token budget for this request, or a 400 when the prompt cannot fit.

    The wording is Anthropic's, which clients (Claude Code) recognise to
    compact their context. A budget the client did not insist on
    (max_tokens_given false: a default, or a dialect's clamped ceiling) is
    trimmed to the room left.
    """
    limit = model.context_length
    if limit is None:
        return request.max_tokens
    if prompt_tokens >= limit:
        raise invalid(f"prompt is too long: {prompt_tokens} tokens > {limit - 1} maximum (this model's context is "
                      f"{limit} tokens)", PROMPT_PARAMS[request.endpoint], "context_length_exceeded")
    room = limit - prompt_tokens
    if request.max_tokens_given and request.max_tokens > room:
        raise invalid(f"{prompt_tokens} prompt tokens + max_tokens {request.max_tokens} exceed this model's "
                      f"context of {limit} tokens", "max_tokens", "context_length_exceeded")
    return min(request.max_tokens, room)


def model_identity(settings: Settings, model: Model) -> str:
    """A digest of what a saved KV cache depends on: the model's files (weights, config, tokenizer),
    adapters and draft model, the chat template in use, and the KV cache settings."""
    digest = hashlib.sha256()
    for name in (settings.model_path, settings.adapter_path, settings.draft_model):
        folder = local_folder(name)
        digest.update(repr(name if folder is None else "folder").encode())
        for path in sorted(folder.iterdir()) if folder is not None else []:
            if path.is_file():
                digest.update(path.name.encode() + file_digest(path))
    digest.update(repr(getattr(model.tokenizer, "chat_template", None)).encode())
    digest.update(repr((settings.kv_bits, settings.kv_group_size, settings.quantized_kv_start)).encode())
    return digest.hexdigest()


def local_folder(name: str | None) -> Path | None:
    """A model's folder on this machine: the path itself, or a Hub repo id's snapshot in the local
    Hugging Face cache (the revision mlx_lm.load found there); None when there is neither."""
    if not name:
        return None
    if Path(name).is_dir():
        return Path(name)
    with contextlib.suppress(Exception):  # not a repo id, or not downloaded: no files to go by
        from mlx_lm.utils import hf_repo_to_path
        return hf_repo_to_path(name)
    return None


def file_digest(path: Path, span: int = 1 << 20) -> bytes:
    """A file's size and a digest of its first and last MiB: cheap on 16 GB of weights, and any
    re-download, re-quantization or edit changes one of them."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(span))
        f.seek(max(size - span, 0))
        digest.update(f.read(span))
    return digest.digest()


def fit_to_memory(prompt_tokens: int, budget: int, request: GenerationRequest, plan: MemoryPlan) -> int:
    """The token budget whose worst-case KV cache (n x (prompt + budget)) fits in KV memory, or a 400.

    A request that could never fit, even alone, is refused naming the limit;
    a budget the client did not insist on is trimmed to what fits, as
    fit_to_context does with the context.
    """
    room = plan.tokens(plan.kv_bytes) // request.n
    where = (f"{plan.kv_bytes} bytes of KV memory ({plan.source} {plan.memory_bytes} less {plan.weights_bytes} "
             f"of weights), {room} tokens at {plan.token_bytes} bytes each")
    if prompt_tokens >= room:
        raise invalid(f"prompt is too long for this server's memory: {prompt_tokens} tokens x {request.n} choices > "
                      f"{where}", PROMPT_PARAMS[request.endpoint], "context_length_exceeded")
    if request.max_tokens_given and prompt_tokens + budget > room:
        raise invalid(f"{prompt_tokens} prompt tokens + max_tokens {budget} (x {request.n} choices) do not fit in "
                      f"{where}", "max_tokens", "context_length_exceeded")
    return min(budget, room - prompt_tokens)


def kv_reservation(prompt_tokens: int, budget: int, request: GenerationRequest, plan: MemoryPlan) -> int:
    """Bytes of KV cache a request may grow to: every choice's prompt and full budget."""
    return request.n * (prompt_tokens + budget) * plan.token_bytes


def check_token_ids(request: GenerationRequest, model: Model) -> None:
    """A 400 when the prompt or logit_bias names a token id outside the model's vocabulary.

    MLX does not bounds-check: an embedding lookup past the table reads
    arbitrary memory (a segfault, seen with {"prompt": [999999999]}).
    """
    size = model.vocab_size
    if isinstance(request.prompt, tuple) and max(request.prompt) >= size:
        raise invalid(f"'prompt' holds token id {max(request.prompt)}; this model's token ids are "
                      f"0 to {size - 1}", "prompt")
    for token, _bias in request.logit_bias:
        if token >= size:
            raise invalid(f"'logit_bias' names token id {token}; this model's ids run from 0 to {size - 1}",
                          "logit_bias")

# -- Embeddings: a model's final hidden states, pooled into one vector per input

POOLING_MODES = {"lasttoken": "last_token", "mean": "mean", "mean_tokens": "mean", "cls": "cls", "cls_token": "cls"}


@dataclass(frozen=True)
class Embedder:
    """What serves /v1/embeddings: a model's inner network and how its hidden states become vectors."""

    model: Any                  # token ids (rows, length) -> final hidden states (rows, length, width), after the final norm
    tokenizer: Any
    name: str | None            # the model id in replies; None: the chat model's (--model-name)
    pooling: str                # "last_token", "mean" or "cls"
    normalize: bool             # L2-normalize the pooled vectors
    dimensions: int             # the width of its vectors
    context_length: int | None  # tokens the model was trained for, when its config says
    vocab_size: int             # the first token id out of range
    prompts: dict = dataclasses.field(default_factory=dict)  # the model card's instruction prefixes, by name

    def max_tokens(self, limit: int) -> int:
        """Tokens one input may have: `limit` (--max-embedding-tokens), or the model's context if shorter."""
        return min(limit, self.context_length or limit)


def load_embedder(settings: Settings, model: Model, group: Any = None) -> Embedder | None:
    """The embedder: --embedding-model's (raises when it cannot serve), else the chat model's (None if it cannot).

    In a group the chat model's forward pass needs every rank, which only
    follow generation: there only an --embedding-model (loaded by rank 0) serves.
    """
    if settings.embedding_model is None:
        if group is not None:
            return None
        try:
            return make_embedder(model.model, model.tokenizer, Path(settings.model_path), None,
                                 model.context_length, model.vocab_size)
        except ValueError as exc:
            log.warning("the model cannot serve /v1/embeddings: %s", exc)
            return None
    if group is not None and group.rank() != 0:
        return None
    import mlx.core as mx
    import mlx_lm
    path = settings.embedding_model
    try:
        network, tokenizer, config = mlx_lm.load(path, return_config=True,
                                                 tokenizer_config={"trust_remote_code": settings.trust_remote_code})
        mx.eval(network.parameters())
        return make_embedder(network, tokenizer, Path(path), default_model_name(path), context_length_of(config),
                             vocab_size_of(network, tokenizer))
    except Exception as exc:  # main() names the chat model's path: say which model failed
        raise ValueError(f"--embedding-model {path!r}: {exc}") from None


def make_embedder(network: Any, tokenizer: Any, folder: Path, name: str | None, context: int | None,
                  vocab_size: int) -> Embedder:
    """An Embedder over an mlx_lm model, pooled as its folder's sentence-transformers files say (raises ValueError)."""
    import mlx.core as mx
    inner = hidden_state_model(network)
    pooling, normalize, prompts = sentence_transformers_config(folder)
    probe = inner(mx.array([[0]]))  # its width, and proof that it runs on token ids alone
    if probe.ndim != 3:
        raise ValueError(f"its inner model returns an array of shape {probe.shape}, not hidden states")
    log.info("embeddings: %s, %s pooling, %snormalized, %d dimensions%s", name or "the chat model", pooling,
             "" if normalize else "not ", probe.shape[-1], f", prompts {sorted(prompts)}" if prompts else "")
    return Embedder(inner, tokenizer, name, pooling, normalize, probe.shape[-1], context, vocab_size, prompts)


def hidden_state_model(network: Any) -> Any:
    """The module of an mlx_lm model that returns its final hidden states (its __call__ returns logits).

    mlx_lm's decoders keep it as `model` (llama, qwen2/3, mistral...), or
    as `language_model.model` where a vision tower sits beside it.
    """
    for inner in (getattr(network, "model", None), getattr(getattr(network, "language_model", None), "model", None)):
        if callable(inner) and hasattr(inner, "layers"):
            return inner
    raise ValueError(f"{type(network).__module__} has no inner model that returns hidden states")


def sentence_transformers_config(folder: Path) -> tuple[str, bool, dict]:
    """(pooling, normalize, prompts) from a sentence-transformers model folder; ("last_token", True, {}) without one.

    modules.json lists the modules: the Pooling one's config.json names the
    mode, and vectors are L2-normalized only if a Normalize module follows,
    as sentence-transformers computes them. config_sentence_transformers.json
    holds the instruction prefixes (e.g. "query") that clients prepend.
    Raises ValueError for modules or modes this server cannot run.
    """
    prompts = read_json_file(folder / "config_sentence_transformers.json").get("prompts")
    prompts = {k: v for k, v in prompts.items() if isinstance(v, str) and v} if isinstance(prompts, dict) else {}
    if not (folder / "modules.json").is_file():
        return "last_token", True, prompts
    modules = read_json_file(folder / "modules.json", [])
    kinds = {str(m.get("type", "")).rsplit(".", 1)[-1]: str(m.get("path", "")) for m in modules if isinstance(m, dict)}
    if set(kinds) - {"Transformer", "Pooling", "Normalize"}:
        raise ValueError(f"{folder / 'modules.json'} lists {sorted(set(kinds) - {'Transformer', 'Pooling', 'Normalize'})}; "
                         "only Transformer, Pooling and Normalize are run here")
    pooling = "last_token"
    if "Pooling" in kinds:
        pooling = pooling_mode(read_json_file(folder / kinds["Pooling"] / "config.json"), folder / kinds["Pooling"])
    return pooling, "Normalize" in kinds, prompts


def pooling_mode(config: dict, where: Path) -> str:
    """The one pooling mode a sentence-transformers Pooling config turns on ("pooling_mode" or the flags)."""
    mode = config.get("pooling_mode")
    names = [mode] if isinstance(mode, str) else [
        key.removeprefix("pooling_mode_") for key, on in config.items() if key.startswith("pooling_mode_") and on is True]
    if len(names) != 1 or names[0] not in POOLING_MODES:
        raise ValueError(f"{where}/config.json asks for pooling {names}; this server pools by one of lasttoken, mean, cls")
    return POOLING_MODES[names[0]]


def read_json_file(path: Path, missing: Any = None) -> Any:
    """A JSON file's value; `missing` (default {}) when there is no such file. Raises ValueError when malformed."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {} if missing is None else missing
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None


def embedding_inputs(request: EmbeddingRequest, embedder: Embedder, max_tokens: int) -> list[list[int]]:
    """Each input's token ids, or a 400 for an id out of range, one over `max_tokens`, or too many dimensions.

    Text is encoded as sentence-transformers does (with the tokenizer's
    special tokens); token ids are taken as they are.
    """
    rows = []
    for i, item in enumerate(request.inputs):
        tokens = list(item) if isinstance(item, tuple) else list(embedder.tokenizer.encode(item))
        where = "'input'" if len(request.inputs) == 1 else f"'input[{i}]'"
        if not tokens:
            raise invalid(f"{where} encodes to no tokens", "input")
        if max(tokens) >= embedder.vocab_size:
            raise invalid(f"{where} holds token id {max(tokens)}; this model's token ids are 0 to "
                          f"{embedder.vocab_size - 1}", "input")
        if len(tokens) > max_tokens:
            raise invalid(f"{where} is {len(tokens)} tokens; this server embeds at most {max_tokens} per "
                          "input (the model's context or --max-embedding-tokens)", "input", "context_length_exceeded")
        rows.append(tokens)
    if request.dimensions is not None and request.dimensions > embedder.dimensions:
        raise invalid(f"'dimensions' is {request.dimensions}; this model's vectors have {embedder.dimensions}",
                      "dimensions")
    return rows


@dataclass(eq=False)
class EmbeddingJob:
    """One admitted embeddings request, shared by its handler and the engine.

    The engine puts ("embeddings", [vector per input, in order], [], 0) then
    ("finish", "stop", [], 0); or ("finish", "cancelled", ...) once the
    handler has set `cancelled` or the deadline passed; or ("error", APIError, [], 0).
    """

    inputs: list[list[int]]
    request: EmbeddingRequest
    embedder: Embedder
    deadline: float
    events: queue.SimpleQueue = dataclasses.field(default_factory=queue.SimpleQueue)   # C-level: cheaper per token
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    passes: list = dataclasses.field(default_factory=list)   # the engine's: input indexes of each pass still to run
    vectors: list = dataclasses.field(default_factory=list)  # the engine's: each input's vector once computed

    def __post_init__(self) -> None:
        self.vectors = [None] * len(self.inputs)

    def should_stop(self) -> bool:
        """True once the client left or the deadline passed."""
        return self.cancelled.is_set() or time.monotonic() > self.deadline


def embedding_batches(lengths: list[int], budget: int = EMBEDDING_BATCH_TOKENS) -> list[list[int]]:
    """The inputs' indexes grouped into forward passes of at most `budget` padded tokens, shortest first."""
    batches: list[list[int]] = [[]]
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if batches[-1] and (len(batches[-1]) + 1) * lengths[i] > budget:  # sorted: lengths[i] is the longest
            batches.append([])
        batches[-1].append(i)
    return batches if batches[0] else []


def embed_rows(embedder: Embedder, rows: list[list[int]], dimensions: int | None) -> list[list[float]]:
    """One padded forward pass: each row's pooled vector (its first `dimensions`, then normalized), as floats.

    Rows are padded on the right. The model's causal mask keeps every real
    token from seeing the padding after it, and positions start at 0 as
    they do alone, so each row's hidden states equal its unbatched pass's
    (left padding would need an attention mask and shifted positions, which
    mlx_lm's models do not take). Pooling reads each row's own positions only.
    """
    import mlx.core as mx
    lengths = [len(row) for row in rows]
    width = max(lengths)
    tokens = mx.array([row + [0] * (width - len(row)) for row in rows])
    pooled = pool(embedder.model(tokens).astype(mx.float32), mx.array(lengths), embedder.pooling)
    pooled = pooled[:, :dimensions] if dimensions else pooled
    if embedder.normalize:
        pooled = pooled / mx.maximum(mx.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    return pooled.tolist()


def pool(hidden: Any, lengths: Any, pooling: str) -> Any:
    """(rows, length, width) hidden states -> (rows, width): a row's last real token, its mean, or its first."""
    import mlx.core as mx
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last_token":
        return hidden[mx.arange(hidden.shape[0]), lengths - 1]
    mask = (mx.arange(hidden.shape[1])[None, :] < lengths[:, None]).astype(hidden.dtype)
    return (hidden * mask[..., None]).sum(axis=1) / lengths[:, None].astype(hidden.dtype)


@dataclass(frozen=True)
class Sampling:
    """How one job picks its tokens, in mlx_lm's calling convention.

    `sampler(logprobs) -> token ids` and `processor(tokens, logits) -> logits`
    are what generate_step and BatchGenerator.insert take per sequence.
    Processors with a true `stateful` attribute count on being called exactly
    once per generated token, in order (speculative decoding would break that).
    """

    sampler: Callable[[Any], Any]
    logits_processors: list[Callable[[Any, Any], Any]]


def make_sampling(request: GenerationRequest, model: Model, budget: int | None = None,
                  prompt: list[int] = ()) -> Sampling:
    """Build one job's sampler and logits processors; call in the engine thread.

    `budget` is the job's token limit (request.max_tokens when None); JSON
    constraints use it to close their output in time. `prompt` (its token
    ids) says whether the template opened a thinking block.
    """
    from mlx_lm.sample_utils import make_logits_processors
    processors = make_logits_processors(
        logit_bias=dict(request.logit_bias) or None,
        repetition_penalty=request.repetition_penalty if request.repetition_penalty != 1 else None)
    if request.presence_penalty or request.frequency_penalty:
        processors.append(openai_penalties(request.presence_penalty, request.frequency_penalty))
    if request.thinking_budget and getattr(model.tokenizer, "has_thinking", False):
        opened = think_opened(model.tokenizer, prompt)
        processors.append(ThinkingBudget(model.tokenizer, request.thinking_budget, opened))
    if request.constraint is not None:  # last: it masks what the others produced
        processors.append(answer_constraint(request, model, budget or request.max_tokens, prompt))
    elif request.tool_rule is not None:
        processors.append(ToolCallConstraint(request.tool_rule, model, budget or request.max_tokens,
                                             think_opened(model.tokenizer, prompt, request.prefill)))
    return Sampling(make_token_sampler(request), processors)


class ThinkingBudget:
    """A logits processor that closes the reasoning once it has used `budget` tokens (Anthropic's
    thinking.budget_tokens): the think-end marker's tokens are forced then, and the reply goes on
    after it. Every thinking block of the reply counts against the one budget."""

    stateful = True   # follows the tokens sampled so far, one call per token

    def __init__(self, tokenizer: Any, budget: int, thinking: bool):
        self.start, self.end = list(tokenizer.think_start_tokens), list(tokenizer.think_end_tokens)
        self.budget, self.thinking, self.used = budget, thinking, 0
        self.recent: list[int] = []   # the last tokens, where the markers are looked for
        self.forcing = 0              # how many of the end marker's tokens were forced so far
        self.started = False

    def __call__(self, tokens: Any, logits: Any) -> Any:
        if self.started:
            self._advance(int(tokens[-1].item()))
        self.started = True
        if self.thinking and (self.forcing or self.used >= self.budget):
            self.forcing += 1
            return masked(logits, JsonMasks.ids_mask([self.end[self.forcing - 1]], logits.shape[-1]))
        return logits

    def _advance(self, token: int) -> None:
        self.recent = (self.recent + [token])[-max(len(self.start), len(self.end)):]
        self.used += self.thinking
        if self.thinking and self.recent[-len(self.end):] == self.end:
            self.thinking, self.forcing = False, 0
        elif not self.thinking and self.recent[-len(self.start):] == self.start:
            self.thinking = True


def answer_constraint(request: GenerationRequest, model: Model, budget: int, prompt: list[int]) -> Callable:
    """response_format's processor: the JSON is the reply's answer, so it comes after the reasoning a
    chat template opened and behind the format's answer header (ChatFormat.answer: harmony's final channel)."""
    chat = request.endpoint != "completions"
    form = chat_format_of(model.tokenizer) if chat else None
    header, thinking = (form.answer if form else ""), chat and think_opened(model.tokenizer, prompt, request.prefill)
    if not header and not thinking:
        return json_constraint(request.constraint, model.tokenizer, budget)
    rule = ToolCallRule((("", request.constraint),), forced=True)
    return ToolCallConstraint(rule, model, budget, thinking, write=lambda _name: (header, ""))


def literal_tokens(tokenizer: Any, text: str) -> list[int]:
    """The token ids that spell `text` (special tokens such as a call's markers included); ValueError if none do."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if tokenizer.decode(ids) != text:  # a tokenizer that adds a prefix space (SentencePiece) or normalises
        raise ValueError(f"this tokenizer cannot spell {text!r} exactly")
    return ids


@functools.lru_cache(maxsize=4)
def blank_led(table: TokenTable) -> list[int]:
    """The tokens whose text starts with JSON whitespace."""
    return [token for token, text in enumerate(table.texts) if text and text[0] in JSON_WHITESPACE]


class ToolCallConstraint:
    """A logits processor that writes tool calls in the model's own syntax, arguments held to their schemas.

    Composed over json_constraint(), whose internals it does not see, it alternates two phases: a head,
    where the tokens of one of a few literal texts are forced (a call's opening as the chat format writes
    it, ChatFormat.write, the tool's name chosen among the rule's; an argument's key; the call's tail),
    and a value, run by a constraint (the chosen tool's arguments; in a key/value format, ChatFormat.pairs,
    one argument's value, raw text or JSON by its own schema: PairPlan). A value ends when its constraint
    is complete, which it says by allowing end-of-sequence: that token is swapped for the first tokens of
    the texts that may follow. So a string argument holding the end marker cannot end the call.

    Forced: the reply is one call. When the prompt opened a thinking block,
    the reasoning stays free (never ended by end-of-sequence) until the model
    closes it or FORCED_CALL_THINKING_SHARE of the budget is spent, when the
    block is closed for it; the call comes after. Lazy (strict tools): text
    is free; each time the model writes the start marker outside reasoning,
    that call is constrained to its end, and the text after it is free again.
    A response_format's JSON is written by it too (answer_constraint), as one
    forced call with no name, opened by the format's answer header.
    """

    stateful = True   # follows the tokens sampled so far, one call per token

    def __init__(self, rule: ToolCallRule, model: Model, budget: int, thinking: bool,
                 write: Callable[[str], tuple[str, str]] | None = None):
        tokenizer = model.tokenizer
        self.rule, self.model, form = rule, model, chat_format_of(tokenizer)
        self.write = write or form.write    # how a call (or, for response_format, the answer) is written
        self.pairs = None if write else form.pairs   # a key/value format: each held tool's PairPlan
        self.plans = {name: cached_pair_plan(self.pairs, name, json.dumps(schema))
                      for name, schema in rule.schemas if schema is not None} if self.pairs else {}
        self.opening = "" if rule.forced else call_opening(form)  # what a lazy constraint waits for
        self.eos = sorted(tokenizer.eos_token_ids)
        self.think = (tokenizer.think_start, tokenizer.think_end) if getattr(tokenizer, "has_thinking", False) else None
        self.thinking = thinking and self.think is not None   # now inside a thinking block
        self.left = budget                  # tokens still to be sampled, this one included
        self.reserve = 0                    # forced, while thinking: the tokens left when the block is closed
        self.recent = ""                    # the free text's last characters, where markers are looked for
        self.phase = "free"                 # free, head, arguments or done
        self.heads: dict[Any, list[int]] = {}   # head phase: each text's tokens, while still possible
        self.tails: dict[str, list[int]] = {}   # each tool's tail tokens (JSON arguments)
        self.matched = 0                    # head phase: tokens of it written so far
        self.next: dict[Any, list[int]] = {}    # arguments phase, once the value is whole: the texts that may follow
        self.at: int | str = ""             # arguments phase: whose value it is (an argument's index, or a tool)
        self.spelled: dict[str, list[int]] = {}   # texts' token ids, as literal_tokens spells them
        self.plan: PairPlan | None = None   # the chosen tool's, in a key/value format
        self.value: Constraint | None = None    # arguments phase: the value's constraint
        self.after = 0                      # arguments phase: the tokens the call needs after the value
        self.arguments: Any = None          # arguments phase: the value's JSON constraint, once started
        self.complete = False               # arguments phase: the value is whole (what follows may start)
        self.started = False
        if rule.forced and not self.thinking:
            self._open("")
        elif rule.forced:   # the call's own tokens, then the rest shared between reasoning and arguments
            fixed = max(len(head) + len(tail) + (self._rest(self.plans[name], -1) if name in self.plans else 0)
                        for name, (head, tail) in self._calls(self.think[1] + "\n\n").items())
            self.reserve = fixed + int((budget - fixed) * (1 - FORCED_CALL_THINKING_SHARE))

    def _spell(self, text: str) -> list[int]:
        if text not in self.spelled:
            self.spelled[text] = literal_tokens(self.model.tokenizer, text) if text else []
        return self.spelled[text]

    def _calls(self, lead: str, skip: int = 0) -> dict[str, tuple[list[int], list[int]]]:
        """Each tool's (opening after `lead`, tail) as token ids (a key/value call's tail comes with its arguments)."""
        calls = {}
        for name, _ in self.rule.calls:
            before, after = (self.pairs.head.format(name=name), "") if self.pairs else self.write(name)
            calls[name] = (self._spell(lead + before[skip:]), self._spell(after))
        return calls

    def _open(self, lead: str, skip: int = 0) -> None:
        """Enter the head phase: `lead`, then each tool's opening less its first `skip` characters, to choose among."""
        calls = self._calls(lead, skip)
        self.tails = {name: tail for name, (_, tail) in calls.items()}
        self._offer({name: head for name, (head, _) in calls.items()})

    def _offer(self, options: dict[Any, list[int]]) -> None:
        self.heads, self.phase, self.matched = options, "head", 0
        done = [key for key, head in options.items() if not head]
        if done:   # nothing to write before the JSON (response_format's plain answer)
            self._choose(done[0])

    def _choose(self, key: Any) -> None:
        """Go on once the text `key` stands for is written: a tool's opening, an argument's key (its index) or
        the tail (None)."""
        if key is None:
            self._free() if not self.rule.forced else setattr(self, "phase", "done")
        elif isinstance(key, int):
            self._value(self.plan.params[key][1], key, self._rest(self.plan, key))
        elif not self.pairs:
            self._value(dict(self.rule.calls)[key], key, len(self.tails[key]))
        elif key in self.plans:
            self.plan = self.plans[key]
            self._offer(self._options(-1))
        else:   # a tool not held to its schema (lazy): its arguments are the model's own
            self._free()

    def _value(self, value: Constraint, at: int | str, cost: int) -> None:
        """Enter the arguments phase: `value` (argument `at`, or tool `at`'s JSON arguments), then what may follow
        it, which takes `cost` tokens at least to end the call."""
        self.phase, self.value, self.at, self.after = "arguments", value, at, cost
        self.arguments, self.complete = None, False

    def _following(self) -> dict[Any, list[int]]:
        """The texts that may follow the value now: the tool's tail (JSON), or _options (key/value)."""
        if isinstance(self.at, int):
            return self._options(self.at)
        return {None: self.tails[self.at]} if self.tails.get(self.at) else {}

    def _options(self, at: int) -> dict[Any, list[int]]:
        """After argument `at` (-1: none yet), the texts that may come next: a later argument's key, up to the
        first required one, or the tail once none is left; those the budget cannot finish are dropped."""
        params, after = self.plan.params, self.plan.params[at][3] if at >= 0 else ""
        options: dict[Any, list[int]] = {}
        for index in range(at + 1, len(params)):
            options[index] = self._spell(after + self.pairs.sep * (at >= 0) + params[index][0])
            if params[index][2]:
                break
        else:
            options[None] = self._spell(after + self.plan.tail)
        fits = {key: ids for key, ids in options.items() if key is None or len(ids) + self._least(key) < self.left}
        return fits or dict(list(options.items())[-1:])   # out of room: the way to the end that takes least

    def _least(self, index: int) -> int:
        """The fewest tokens argument `index`'s value and what must follow it take."""
        return len(self.plan.params[index][1].node.min_text) + 1 + self._rest(self.plan, index)

    def _rest(self, plan: PairPlan, at: int) -> int:
        """The fewest tokens that end a call after argument `at`: the required arguments left, then the tail."""
        texts = [plan.params[at][3] + self.pairs.sep] * (at >= 0) + [
            text for before, _, required, after in plan.params[at + 1:] if required
            for text in (before, after + self.pairs.sep)] + [plan.tail]
        values = sum(len(value.node.min_text) + 1 for _, value, required, _ in plan.params[at + 1:] if required)
        return sum(len(self._spell(text)) for text in texts) + values

    def __call__(self, tokens: Any, logits: Any) -> Any:
        if self.started:
            self._advance(int(tokens[-1].item()))
        self.started = True
        if self.phase == "free" and self.rule.forced and self.left <= self.reserve:
            self._open(self.think[1] + "\n\n")   # the reasoning had its share: close it
        self.left -= 1
        if self.phase == "free":
            return self._without(logits, self.eos) if self.rule.forced else logits
        if self.phase == "head":
            return self._only(logits, {ids[self.matched] for ids in self.heads.values()})
        if self.phase == "arguments":
            return self._arguments(tokens, logits)
        return self._only(logits, set(self.eos))  # done with the forced call

    def _arguments(self, tokens: Any, logits: Any) -> Any:
        import mlx.core as mx
        first = self.arguments is None
        if first:
            self.arguments = json_constraint(self.value, self.model.tokenizer, max(self.left + 1 - self.after, 1))
        held = self.arguments(tokens, logits)
        if first and self.plan is not None:   # JSON lets blanks lead a value; key/value parsers keep them
            held = masked(held, ~JsonMasks.ids_mask(blank_led(token_table(self.model.tokenizer)), logits.shape[-1]))
        allowed = held > -math.inf
        eos = JsonMasks.ids_mask(self.eos, logits.shape[-1])
        self.complete = bool(mx.any(allowed & eos).item())
        if not self.complete:
            return held
        self.next = self._following()
        if not self.next:   # the call ends with its arguments
            if self.rule.forced:
                return held
            self._free()
            return logits
        firsts = JsonMasks.ids_mask(sorted({ids[0] for ids in self.next.values()}), logits.shape[-1])
        if self.left <= self.after:   # a value that could go on (raw text, a number) ends while the call still can
            return masked(logits, firsts)
        return masked(logits, (allowed & ~eos) | firsts)

    def _advance(self, token: int) -> None:
        """Follow the token just sampled."""
        if self.phase == "free":
            self._watch(token_bytes(self.model, token).decode("utf-8", "ignore"))
            return
        if self.phase == "arguments" and self.complete and any(ids[0] == token for ids in self.next.values()):
            self.phase, self.heads, self.matched = "head", self.next, 0
        if self.phase == "head":
            self.heads = {k: ids for k, ids in self.heads.items()
                          if len(ids) > self.matched and ids[self.matched] == token}
            self.matched += 1
            done = [k for k, ids in self.heads.items() if len(ids) == self.matched]
            if done:
                self._choose(done[0])

    def _watch(self, text: str) -> None:
        """Free text: look for the end of reasoning (forced) or a call's start outside reasoning (lazy)."""
        keep = max([len(self.opening)] + [len(marker) for marker in self.think or ()])
        self.recent = (self.recent + text)[-keep:]
        if self.thinking and self.recent.endswith(self.think[1]):
            self.thinking = False
            if self.rule.forced:
                self._open("\n\n")
        elif self.think and not self.thinking and self.recent.endswith(self.think[0]):
            self.thinking = True
        elif not self.thinking and not self.rule.forced and self.recent.endswith(self.opening):
            self._open("", len(self.opening))

    def _free(self) -> None:
        self.phase, self.recent = "free", ""

    @staticmethod
    def _only(logits: Any, ids: set[int]) -> Any:
        return masked(logits, JsonMasks.ids_mask(sorted(ids), logits.shape[-1]))

    @staticmethod
    def _without(logits: Any, ids: list[int]) -> Any:
        return masked(logits, ~JsonMasks.ids_mask(ids, logits.shape[-1]))


def make_token_sampler(request: GenerationRequest) -> Callable[[Any], Any]:
    """A sampler for the request's temperature/top_p/top_k/min_p and seed.

    A seeded sampler carries its own random key, split once per token, so its
    draws do not depend on what else the engine samples (other requests in a
    batch included): same seed, same request, same tokens.
    """
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, categorical_sampling, greedy_sampler

    temperature, top_p, top_k, min_p = request.temperature, request.top_p, request.top_k, request.min_p
    if temperature == 0 or top_p == 0:  # top_p 0 keeps only the top token: greedy
        return greedy_sampler
    key = None if request.seed is None else mx.random.key(request.seed % 2**64)

    def sampler(logprobs: Any) -> Any:
        nonlocal key
        if 0 < top_p < 1:
            logprobs = apply_top_p(logprobs, top_p)
        if min_p > 0:
            logprobs = apply_min_p(logprobs, min_p)
        if 0 < top_k < logprobs.shape[-1]:  # a k as large as the vocabulary limits nothing
            logprobs = apply_top_k(logprobs, top_k)
        if key is None:
            return categorical_sampling(logprobs, temperature)
        key, draw = mx.random.split(key)
        return mx.random.categorical(logprobs * (1 / temperature), key=draw)
    return sampler


def openai_penalties(presence: float, frequency: float) -> Callable[[Any, Any], Any]:
    """OpenAI's presence and frequency penalties as a logits processor.

    As OpenAI defines them, they count the tokens generated so far (not the
    prompt): logit[j] -= frequency * count[j] + presence * (count[j] > 0).
    """
    import mlx.core as mx
    counts = None

    def processor(tokens: Any, logits: Any) -> Any:
        nonlocal counts
        if counts is None:  # first call: tokens[-1] is the prompt's last token, not a generated one
            counts = mx.zeros((logits.shape[-1],), dtype=mx.float32)
        else:
            counts = counts.at[tokens[-1:]].add(1.0)
        penalty = frequency * counts + presence * (counts > 0)
        return (logits - penalty).astype(logits.dtype)
    processor.stateful = True
    return processor


def token_logprobs(model: Model, token: int, logprobs: Any, top_n: int) -> dict:
    """One token's entry in OpenAI's chat logprobs shape, as plain Python values.

    `logprobs` is the step's log-probability vector (an mx.array over the
    vocabulary); this runs in the engine thread, where MLX lives. Log
    probabilities of -inf (tokens a constraint forbids) are reported as -9999.0,
    as OpenAI does, since JSON has no infinity. "bytes" are the token's own
    bytes, so the entries' bytes joined are the text's; a token holding part
    of a character shows its bytes in "token" as \\xNN escapes, as DeepSeek does.
    """
    import mlx.core as mx

    def entry(token_id: int, value: float) -> dict:
        raw = token_bytes(model, token_id)
        return {"token": raw.decode("utf-8", "backslashreplace"), "logprob": max(value, -9999.0),
                "bytes": list(raw)}

    chosen = entry(token, logprobs[token].item())
    chosen["top_logprobs"] = []
    if top_n > 0:
        best = mx.argpartition(-logprobs, kth=top_n - 1)[:top_n]
        values = logprobs[best].tolist()
        ranked = sorted(zip(best.tolist(), values), key=lambda pair: -pair[1])
        chosen["top_logprobs"] = [entry(i, v) for i, v in ranked]
    return chosen


def token_bytes(model: Model, token: int) -> bytes:
    """One token id's bytes: from the byte map, else by decoding it alone (U+FFFD for part of a character)."""
    if model.token_bytes is not None:
        return model.token_bytes[token] if token < len(model.token_bytes) else b""
    return model.tokenizer.decode([token]).encode("utf-8")


class TextStream:
    """A sequence's generated token ids turned into text as they come, never splitting a character.

    With a byte map (token_bytes_of) the text is exactly the bytes the tokens
    spell where they follow the prompt: a first token " Paris" keeps its
    space, so a completion's prompt + text is the document. Without one,
    mlx_lm's streaming detokenizer decodes. `trim_space` drops one leading
    space of the text: chat replies do, as mlx_lm and Hugging Face decode a
    reply on its own (SentencePiece models start most replies with one).
    """

    def __init__(self, model: Model, trim_space: bool):
        self.model = model
        self.detokenizer = None if model.token_bytes is not None else model.tokenizer.detokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.trim_space = trim_space

    def add(self, token: int) -> str:
        """The text that token completes (empty while a character is still partial)."""
        if self.detokenizer is None:
            return self._trim(self.utf8.decode(token_bytes(self.model, token)))
        self.detokenizer.add_token(token)
        return self._trim(self.detokenizer.last_segment)

    def finish(self) -> str:
        """Text still held at the end (an unfinished character becomes U+FFFD)."""
        if self.detokenizer is None:
            return self._trim(self.utf8.decode(b"", final=True))
        self.detokenizer.finalize()
        return self._trim(self.detokenizer.last_segment)

    def _trim(self, text: str) -> str:
        if self.trim_space and text:
            self.trim_space = False
            return text[1:] if text[0] == " " else text
        return text


def partial_marker_length(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that could be the start of one of `markers`.

    Streaming holds that much back until the next piece shows whether a
    tool-call tag really follows. Quadratic in a marker's length, which is
    fine for the model's own few-character tags; client-chosen stop strings
    go through StopScanner's linear matcher instead.
    """
    return max((n for m in markers for n in range(1, len(m)) if text.endswith(m[:n])), default=0)


class StopScanner:
    """Cuts generated text at the first stop string, never emitting part of one.

    Each stop string is matched as the text streams in, by the Knuth-Morris-Pratt
    automaton: per character, amortised constant work per stop string, however
    long the stop strings are. Text that might be the start of a stop string
    is held back until the next piece shows whether it is.
    """

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.fallbacks = [kmp_fallbacks(stop) for stop in stops]
        self.matched = [0] * len(stops)   # per stop: its longest prefix the text now ends with
        self.held = ""
        self.hit: str | None = None   # the stop string that was reached, once one is

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was reached)."""
        if not self.stops:
            return text, False
        buffer = self.held + text
        for at, ch in enumerate(text, start=len(self.held)):
            ends = [stop for k, stop in enumerate(self.stops) if self._step(k, ch) == len(stop)]
            if ends:  # the longest stop ending here starts first
                self.held, self.hit = "", max(ends, key=len)
                return buffer[:at + 1 - len(self.hit)], True
        keep = max(self.matched)
        self.held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[:len(buffer) - keep], False

    def _step(self, k: int, ch: str) -> int:
        stop, fallback, matched = self.stops[k], self.fallbacks[k], self.matched[k]
        while matched and (matched == len(stop) or stop[matched] != ch):
            matched = fallback[matched - 1]
        self.matched[k] = matched = matched + (stop[matched] == ch)
        return matched

    def flush(self) -> str:
        """Text still held back once generation ends without a stop string."""
        text, self.held = self.held, ""
        return text


class ReasoningSplitter:
    """Splits a thinking model's reply into reasoning and text at its markers, as the text streams in.

    What lies between the model's think_start and think_end markers is
    reasoning; the markers themselves go. A reply whose prompt opened the
    block (DeepSeek-R1, Qwen3) starts inside it, and a block still open at
    the end stays reasoning. An end marker outside reasoning that ends the
    reply (Gemma 4 may close a thought it never opened there) is dropped; one
    that text follows is text (an answer may quote "</think>"). Whitespace at the start of each part is dropped:
    models write "</think>\\n\\n" before the answer. Text that might be the
    start of a marker is held back until the next piece shows whether it is.
    """

    def __init__(self, start: str, end: str, inside: bool):
        self.markers = (start, end)
        self.inside = inside
        self.held = ""
        self.fresh = True   # nothing of the current part out yet

    def feed(self, text: str, final: bool = False) -> list[tuple[str, str]]:
        """The (kind, text) pieces safe to emit, kind "reasoning" or "text"; `final` flushes."""
        self.held += text
        out: list[tuple[str, str]] = []
        keep = None
        while (found := self._next_marker()) is not None:
            at, marker = found
            rest = self.held[at + len(marker):]
            stray = marker != self.markers[self.inside]
            if stray and not rest.strip() and not final:
                keep = len(self.held) - at   # held: dropped if the reply ends here, shown if text follows
                break
            self._take(out, self.held[:at + len(marker) * (stray and bool(rest.strip()))])
            self.held = rest
            if not stray:
                self.inside, self.fresh = not self.inside, True
        if keep is None:
            keep = 0 if final else partial_marker_length(self.held, self.markers[self.inside:])
        self._take(out, self.held[:len(self.held) - keep])
        self.held = self.held[len(self.held) - keep:]
        return out

    def _next_marker(self) -> tuple[int, str] | None:
        """(where, which) of the first marker in the held text that matters: the one that switches, or
        outside reasoning an end marker; None if neither is there."""
        found = [(at, m) for m in self.markers[self.inside:] if (at := self.held.find(m)) >= 0]
        return min(found) if found else None

    def _take(self, out: list, text: str) -> None:
        if self.fresh:
            text = text.lstrip()
            self.fresh = not text
        if text:
            out.append(("reasoning" if self.inside else "text", text))


def reasoning_splitter(request: GenerationRequest, model: Model, prompt: list[int]) -> ReasoningSplitter | None:
    """The splitter for a request to a thinking model, or None (no markers, or --reasoning-format none)."""
    tokenizer = model.tokenizer
    if not request.split_reasoning or not getattr(tokenizer, "has_thinking", False):
        return None
    return ReasoningSplitter(tokenizer.think_start, tokenizer.think_end, inside=think_opened(tokenizer, prompt, request.prefill))


def think_opened(tokenizer: Any, prompt: list[int], prefill: bool = False) -> bool:
    """Whether the prompt ends inside a thinking block the template opened (DeepSeek-R1, Qwen3), or, for
    a `prefill`, inside the reasoning it continues (which may be long: the whole prompt is searched)."""
    if not prompt or not getattr(tokenizer, "has_thinking", False):
        return False
    tail = 0 if prefill else max(len(prompt) - REASONING_PROMPT_TAIL, 0)  # a block the template opened is at the end
    return tokenizer.rfind_think_start(prompt, start=tail) > tokenizer.rfind_think_end(prompt, start=tail)


HARMONY_ENDS = ("<|end|>", "<|call|>", "<|return|>", "<|start|>")  # what ends a message's body
HARMONY_HEADS = ("<|channel|>", "<|start|>")                        # what a message's header starts with


class HarmonyChannels:
    """Which of a harmony reply's (gpt-oss) tokens are reasoning, for usage: those inside an `analysis`
    message, from its <|message|> to its end marker (both counted, as a thinking block's markers are).
    The split itself is HarmonyScanner's, in the dialects; this only follows the channel."""

    def __init__(self):
        self.header, self.inside = "", False   # the header read since the last message ended

    def feed(self, text: str) -> None:
        """Follow one token's text."""
        for piece in re.split(r"(<\|[a-z]+\|>)", text):
            if piece in HARMONY_ENDS:
                self.header, self.inside = piece, False
            elif piece == "<|message|>" and not self.inside:
                self.inside = "<|channel|>analysis" in self.header.replace(" ", "")
            elif not self.inside:
                self.header += piece


def harmony_channels(request: GenerationRequest, model: Model) -> HarmonyChannels | None:
    """The channel follower for a chat reply of a harmony model, else None."""
    form = chat_format_of(model.tokenizer) if request.endpoint != "completions" else None
    return HarmonyChannels() if form is not None and form.harmony else None


def kmp_fallbacks(pattern: str) -> list[int]:
    """KMP's failure function: for each prefix, the length of its longest proper border."""
    fallback, border = [0] * len(pattern), 0
    for i in range(1, len(pattern)):
        while border and pattern[i] != pattern[border]:
            border = fallback[border - 1]
        border += pattern[i] == pattern[border]
        fallback[i] = border
    return fallback


def new_id(prefix: str) -> str:
    """A fresh id for a response or an item, in the API's style ("chatcmpl-...", "msg_...")."""
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def openai_tool_call(call: dict, tools: list[dict] = ()) -> dict:
    """A parsed call ({"name", "arguments"}) in OpenAI's tool_calls shape: arguments as the JSON text of an
    object, repaired or wrapped by tool_arguments when the model wrote something else."""
    schema = next((t["function"].get("parameters") for t in tools if t["function"]["name"] == call["name"]), None)
    arguments = json.dumps(tool_arguments(call.get("arguments", {}), schema), ensure_ascii=False)
    return {"id": call.get("id") or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": arguments}}


class HeldTextScanner:
    """The streaming loop the reply scanners share: text arrives in `held`, `_step` takes one piece
    of it at a time (False once the rest must wait for more text), `_finish` takes what is left
    once generation ends. Pieces are ("text" | "reasoning", str), ("calls", [OpenAI-shaped calls])
    and, when live, a streamed call's ("call_start", {"id", "name"}) and ("call_args", str) before
    its "calls".
    """

    held: str

    def feed(self, text: str) -> list[tuple[str, Any]]:
        """The pieces safe to emit, in order."""
        self.held += text
        out: list[tuple[str, Any]] = []
        while self._step(out):
            pass
        return out

    def flush(self) -> list[tuple[str, Any]]:
        """What is still held once generation ends."""
        out: list[tuple[str, Any]] = []
        self._finish(out)
        self.held = ""
        return out

    def _step(self, out: list) -> bool:
        raise NotImplementedError

    def _finish(self, out: list) -> None:
        raise NotImplementedError


class CallStreamer:
    """A streamed call's arguments, handed out as the model writes them.

    Fed the open call's text as it grows (only text that cannot hold an end
    marker), it finds each call's head (ChatFormat.heads: its name, and
    that its arguments open with "{"), then yields ("call_start", {"id",
    "name"}) and ("call_args", piece) events, the pieces the JSON object's
    text from its "{" to the matching "}" exactly, nothing around it.
    Arguments that do not open with "{" (a string to be wrapped) are never
    streamed: such a call comes whole when it closes. `settle` makes the
    parsed calls agree with what was streamed: same ids, and the streamed
    text as the final arguments wherever it decodes to the same object.
    """

    def __init__(self, heads: tuple[re.Pattern, ...], name: str = ""):
        self.heads, self.name = heads, name   # `name`: the call's, where the heads have no "name" group
        self.at = 0                        # how far the call's text was read
        self.streamed: list[dict] = []     # {"id", "name", "raw", "done"} per call streamed
        self.depth, self.quoted, self.escaped = 0, False, False

    def feed(self, out: list, text: str) -> None:
        """Read the call's text so far (a longer prefix each time); add the events it makes to `out`."""
        while self.at < len(text):
            if not self.streamed or self.streamed[-1]["done"]:
                head = next((m for m in (h.match(text, self.at) for h in self.heads) if m), None)
                if head is None:
                    return
                groups = head.groupdict()
                call = {"id": groups.get("id") or new_id("call_"), "name": groups.get("name", self.name).strip(),
                        "raw": "", "done": False}
                self.streamed.append(call)
                self.at, self.depth = head.end(), 0
                out.append(("call_start", {"id": call["id"], "name": call["name"]}))
            self._arguments(out, text)

    def _arguments(self, out: list, text: str) -> None:
        """Take the arguments' characters up to their closing brace (or the text's end)."""
        start, at = self.at, self.at
        while at < len(text) and not self.streamed[-1]["done"]:
            ch = text[at]
            if self.escaped:
                self.escaped = False
            elif self.quoted:
                self.escaped, self.quoted = ch == "\\", ch != '"'
            else:
                self.quoted = ch == '"'
                self.depth += (ch in "{[") - (ch in "}]")
                self.streamed[-1]["done"] = self.depth == 0
            at += 1
        self.at = at
        if at > start:
            self.streamed[-1]["raw"] += text[start:at]
            out.append(("call_args", text[start:at]))

    def settle(self, calls: list[dict], tools: list[dict]) -> list[dict]:
        """The parsed calls (OpenAI's shape) under the streamed ids and text; a streamed call the parser
        missed (cut off, say) keeps what was streamed, wrapped by openai_tool_call if it is no object."""
        settled = []
        for i, sent in enumerate(self.streamed):
            call = calls[i] if i < len(calls) else openai_tool_call(
                {"name": sent["name"], "arguments": sent["raw"]}, tools)
            try:
                same = json.loads(sent["raw"]) == json.loads(call["function"]["arguments"])
            except ValueError:
                same = False
            function = {**call["function"], "arguments": sent["raw"]} if same else call["function"]
            settled.append({**call, "id": sent["id"], "function": function})
        return settled + calls[len(self.streamed):]


class ToolCallScanner(HeldTextScanner):
    """Splits a chat reply into content and tool calls, as the text streams in.

    Text from one of the format's start markers to its end marker is a call,
    parsed with the format's parser (mlx_lm's where it reads the family
    right); a format without an end marker runs a call to the next start or
    the reply's end. Text that might be the start of a marker is held back,
    so a streaming client never sees half of one; blanks around calls go. A
    call that does not parse is passed on as content rather than lost. In a
    format whose calls carry JSON arguments (ChatFormat.write), a marker
    inside one of their strings (a command that prints "</tool_call>") is
    part of the call, not its end. `live` (a stream) also sends a call's
    arguments as they come, where the format has heads (CallStreamer).
    """

    def __init__(self, form: ChatFormat, tools: list[dict]):
        self.form, self.tools = form, tools
        self.held = ""
        self.opened: str | None = None   # the start marker of the call being read, if one is open
        self.fresh = True                # no text of the reply out yet: a leading marker may open a call
        self.scanned, self.quoted, self.escaped = 0, False, False   # how far the open call was read
        self.live = False                # stream arguments as they come
        self.streamer: CallStreamer | None = None   # the open call's, when live

    def _finish(self, out: list) -> None:
        """A call without its end marker is parsed if it can be; other held text is content."""
        if self.opened is not None:
            self._close(out, self.held, "")
        elif self.held.strip():
            out.append(("text", self.held.lstrip() if self.fresh else self.held))
        self.opened = None

    def _step(self, out: list) -> bool:
        """Take one marker's worth of the held text; False once the rest must wait for more."""
        form = self.form
        if self.opened is None:
            self.scanned, self.quoted, self.escaped = 0, False, False
            head = self.held.lstrip() if self.fresh else self.held
            lead = next((m for m in form.leading if head.startswith(m)), None) if self.fresh else None
            if lead is not None:
                self.held, self.opened = head, ""
                return True
            at, marker = min(((self.held.find(m), m) for m in form.starts if m in self.held), default=(-1, ""))
            hold = partial_marker_length(self.held, form.starts + (form.leading if self.fresh else ()))
            if self.fresh and (not head or any(m.startswith(head) for m in form.leading)):
                return False
            self._text(out, self.held[:at] if at >= 0 else self.held[:len(self.held) - hold])
            self.held = self.held[at + len(marker):] if at >= 0 else self.held[len(self.held) - hold:]
            self.opened = marker if at >= 0 else None
            return at >= 0
        at = self._end_at((form.end,) if form.end else form.starts)
        if self.live and form.heads and form.write is not None:
            self.streamer = self.streamer or CallStreamer(form.heads)
            self.streamer.feed(out, self.held[:at] if at >= 0 else self.held[:self.scanned])
        if at < 0:
            return False
        self._close(out, self.held[:at], form.end)
        self.held = self.held[at + len(form.end):]
        return True

    def _end_at(self, ends: tuple[str, ...]) -> int:
        """Where the open call ends in the held text: at one of `ends`, outside JSON strings if
        the format writes JSON arguments; -1 if not yet."""
        held = self.held
        if self.form.write is None:
            return min((held.find(m) for m in ends if m in held), default=-1)
        at, longest = self.scanned, max(map(len, ends), default=0)
        while at < len(held):
            ch = held[at]
            if self.escaped:
                self.escaped = False
            elif self.quoted:
                self.escaped, self.quoted = ch == "\\", ch != '"'
            elif any(held.startswith(m, at) for m in ends):
                break
            elif len(held) - at < longest and any(m.startswith(held[at:]) for m in ends):
                self.scanned = at
                return -1   # maybe a marker: wait for more text
            else:
                self.quoted = ch == '"'
            at += 1
        self.scanned = at
        return at if at < len(held) else -1

    def _text(self, out: list, text: str) -> None:
        if self.fresh:
            text = text.lstrip()
            self.fresh = not text
        if text:
            out.append(("text", text))

    def _close(self, out: list, body: str, end: str) -> None:
        """End the open call (at `end`): its calls, or its text as content when it does not parse."""
        marker, self.opened = self.opened, None
        calls = self._parse(body)
        if self.streamer is not None and self.streamer.streamed:
            calls = self.streamer.settle(calls, self.tools)
        self.streamer = None
        if calls:
            out.append(("calls", calls))
            self.fresh = True   # blanks after a call are not content
        else:
            self._text(out, f"{marker}{body}{end}")

    def _parse(self, body: str) -> list[dict]:
        try:
            parsed = self.form.parse(body, self.tools)
        except Exception as exc:  # parsers raise what they like on malformed calls
            log.warning("could not parse a tool call (%r): %r", exc, body[:200])
            return []
        return [openai_tool_call(call, self.tools) for call in (parsed if isinstance(parsed, list) else [parsed])
                if isinstance(call, dict) and isinstance(call.get("name"), str)]


HARMONY_HEAD = re.compile(r"\s*(?=\{)")   # a call's body is its arguments; its name is in the header


class HarmonyScanner(HeldTextScanner):
    """Reads OpenAI's harmony format (gpt-oss) as it streams: channel `analysis` is reasoning, `final`
    text, `commentary` addressed `to=functions.NAME` a call to NAME (its body the JSON arguments), and
    `commentary` to no one (a preamble) text. A reply that opens with no channel header is text.
    """

    def __init__(self, tools: list[dict]):
        self.tools = tools
        self.held = ""
        self.kind: str | None = None    # the open message's kind: "reasoning", "text", "call"; None: in a header
        self.name = ""                  # the open call's function name
        self.body = ""                  # the open call's arguments so far
        self.started = False            # a header or text came
        self.live = False               # stream a call's arguments as they come
        self.streamer: CallStreamer | None = None   # the open call's, when live

    def _finish(self, out: list) -> None:
        """Whatever message is open ends with the reply (its <|call|> or <|return|> is not text)."""
        if self.kind is not None:
            self._body(out, self.held)
            self._close(out)

    def _step(self, out: list) -> bool:
        if self.kind is None:
            if not self.started and self.held and not any(
                    h.startswith(self.held[:len(h)]) for h in HARMONY_HEADS):
                self.kind, self.started = "text", True   # no header: a plain reply
                return True
            at = self.held.find("<|message|>")
            if at < 0:
                return False
            self._open(self.held[:at])
            self.held = self.held[at + len("<|message|>"):]
            return True
        at, marker = min(((self.held.find(m), m) for m in HARMONY_ENDS if m in self.held), default=(-1, ""))
        hold = 0 if at >= 0 else partial_marker_length(self.held, HARMONY_ENDS)
        self._body(out, self.held[:at] if at >= 0 else self.held[:len(self.held) - hold])
        self.held = self.held[at + len(marker) * (marker != "<|start|>"):] if at >= 0 else self.held[len(self.held) - hold:]
        if at >= 0:
            self._close(out)
        return at >= 0

    def _open(self, header: str) -> None:
        channel = re.search(r"<\|channel\|>\s*(\w+)", header)
        recipient = re.search(r"to=functions\.([^\s<]+)", header)
        self.started, self.body = True, ""
        if recipient:
            self.kind, self.name = "call", recipient[1]
            self.streamer = CallStreamer((HARMONY_HEAD,), self.name) if self.live else None
        else:
            self.kind = "reasoning" if channel and channel[1] == "analysis" else "text"

    def _body(self, out: list, text: str) -> None:
        if self.kind == "call":
            self.body += text
            if self.streamer is not None:
                self.streamer.feed(out, self.body)
        elif text:
            out.append((self.kind, text))

    def _close(self, out: list) -> None:
        if self.kind == "call":
            calls = [openai_tool_call({"name": self.name, "arguments": self.body.strip()}, self.tools)]
            out.append(("calls", self.streamer.settle(calls, self.tools) if self.streamer else calls))
        self.kind, self.streamer = None, None


def tool_scanner(request: GenerationRequest, tokenizer: Any) -> ToolCallScanner | HarmonyScanner | None:
    """The scanner for a chat reply: calls when tools were offered; harmony's channels always (but raw)."""
    if request.endpoint == "completions":
        return None
    form = chat_format_of(tokenizer)
    tools = list(request.tools) if request.tools and request.tool_choice != "none" else []
    if form is not None and form.harmony and request.split_reasoning:
        return HarmonyScanner(tools)
    return ToolCallScanner(form, tools) if form is not None and tools and not form.harmony else None


# ---------------------------------------------------------------------------
# Group: ranks of an mlx.launch group (fenced: a single process never enters it)
# ---------------------------------------------------------------------------

# -- one model over several machines ---------------------------------------------
#
# Under mlx.launch every rank holds a shard of the model, and every model call
# is a collective: all ranks must run the same BatchGenerator steps on the same
# sequences. Rank 0, which alone speaks HTTP, runs each change to its batch
# and records it as an op; before each step it sends the ops to the other
# ranks, which replay them in the same order. One process runs the same code
# with nothing to send.

@dataclass(frozen=True)
class Insert:
    """Op: start sequence `uid` on `prompt`, its first `cached` tokens from the prompt cache.

    `entries`: what the prompt cache held after rank 0 made room for the
    running batch, just before its fetch.
    """

    uid: int
    prompt: list[int]
    cached: int
    max_tokens: int
    request: GenerationRequest   # the sampling settings; rank 0 has filled in the seed
    entries: int | None = None


@dataclass(frozen=True)
class Remove:
    """Op: drop sequences before they finished (stop string, cancelled, timed out, client gone)."""

    uids: tuple[int, ...]


@dataclass(frozen=True)
class Keep:
    """Op: put the KV cache sequence `uid` left behind into the prompt cache, which then holds `entries`.

    `kept`: the tokens of it kept (fewer when it was cut to fit; 0: none).
    """

    uid: int
    entries: int
    kept: int


class GroupFailure(RuntimeError):
    """The ranks of a group can no longer run in step: one died, stalled or diverged."""


class GroupLink:
    """Rank 0's channel to the other ranks of an mlx.launch group, over mx.distributed.

    Every rank calls `share` once per engine loop, on the stream the model's
    own collectives use, so both stay in one order. Rank 0 sends the ops it
    ran since the last call, its flags (STEP: one batch step follows;
    SHUTDOWN: the group stops) and a check of the tokens its last step
    sampled; the others receive them and, in the same collective, tell rank
    0 whether a signal asked them to stop. It is all_sum throughout, the
    others adding zeros: a header of four int32 (payload bytes, flags, stop
    votes, token check), then the pickled ops when there are any, so a step
    in which nothing changed costs one all_sum of 16 bytes. The ranks trust
    each other: their link must be private (Thunderbolt, a private network),
    as mx.distributed's own traffic must be.

    When every rank has a lifeline (Lifelines), the shares travel on them
    instead: rank 0 writes one frame (the same header, then the payload) to
    each lifeline and goes on, and each other rank's engine reads its own,
    blocking while the group is idle (EOF: rank 0 has died); a rank's stop
    vote is one byte back. No collective
    runs between two steps, so the next step's work, which BatchGenerator
    starts before it returns a step's tokens, is not waited for in between
    (a collective on the model's stream would wait for it), and rank 0's
    per-step bookkeeping overlaps it, as in one process. The model's own
    collectives keep the ranks in step: rank 0 is at most one share ahead.

    Without lifelines everywhere, the shares are all_sums; then, while the
    group is idle (the last share asked for no step), a rank waiting in a
    collective would spin (MLX's backends poll), so rank 0 rings a doorbell,
    a byte on each lifeline, before the next share, and a rank with a
    lifeline blocks on it until then instead.
    """

    STEP, SHUTDOWN = 1, 2
    FRAME = struct.Struct("<Iii")   # a share on a lifeline: payload bytes, flags, token check
    VOTE = b"S"                     # another rank to rank 0, on its lifeline: a signal asked it to stop

    def __init__(self, group: Any):
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        self.stop_voted = False   # not rank 0: a signal asked this rank to stop
        self.bells: dict[int, socket.socket] = {}   # lifelines (Lifelines.sockets), which carry the doorbells
        self.rung = threading.Semaphore(0)          # not rank 0: doorbells received and not yet answered
        self.idle = False                           # the last share asked for no step
        self.framed = False                         # every rank has a lifeline: shares travel on them
        self.votes: set[int] = set()                # rank 0, framed: ranks that voted to stop
        self.vote_sent = False

    def use_lifelines(self, sockets: dict[int, socket.socket]) -> None:
        """Take the lifelines; if every rank has its own (agreed in one all_sum), shares travel on them."""
        import mlx.core as mx
        self.bells = sockets
        complete = len(sockets) == (self.size - 1 if self.rank == 0 else 1)
        agreed = mx.distributed.all_sum(mx.array([int(complete)]), group=self.group).item()
        self.framed = agreed == self.size

    def received(self, rank: int, data: bytes) -> None:
        """Bytes came in on the lifeline to `rank`: votes (at rank 0) or doorbells (elsewhere)."""
        if self.rank == 0:
            if self.VOTE in data:
                self.votes.add(rank)
        else:
            self.heard(len(data))

    def ring(self) -> None:
        """Rank 0: tell every rank with a lifeline that a share is coming."""
        for sock in list(self.bells.values()):
            with contextlib.suppress(OSError):  # a lost rank: its lifeline's watcher says so
                sock.sendall(b"\x01")

    def heard(self, count: int) -> None:
        """Another rank: `count` doorbells came in on the lifeline."""
        for _ in range(count):
            self.rung.release()

    def share(self, ops: list, flags: int, check: int, stream: Any) -> tuple[list, int, int, int]:
        """(ops, flags, token check) as rank 0 sent them, with how many other ranks vote to stop."""
        import mlx.core as mx
        leader = self.rank == 0
        payload = pickle.dumps(ops, protocol=pickle.HIGHEST_PROTOCOL) if leader and ops else b""
        if len(payload) >= 2**31:
            raise GroupFailure(f"one step's changes take {len(payload)} bytes, over the 2 GiB a step can send")
        if self.framed:
            return self._share_framed(ops, payload, flags, check)
        header = [len(payload), flags, 0, check] if leader else [0, 0, int(self.stop_voted), 0]
        if self.idle and leader:  # the others may be blocked on their lifelines: wake them
            self.ring()
        elif self.idle and self.bells:
            self.rung.acquire()
        with mx.stream(stream):
            size, flags, votes, check = mx.distributed.all_sum(
                mx.array(header, dtype=mx.int32), group=self.group).tolist()
            self.idle = not flags & (self.STEP | self.SHUTDOWN)
            if not size:
                return [], flags, votes, check
            data = mx.array(payload) if leader else mx.zeros((size,), dtype=mx.uint8)
            data = mx.distributed.all_sum(data, group=self.group)
            mx.eval(data)
        return (ops if leader else pickle.loads(memoryview(data))), flags, votes, check

    def _share_framed(self, ops: list, payload: bytes, flags: int, check: int) -> tuple[list, int, int, int]:
        """share() on the lifelines: rank 0 writes its frame and goes on; the others wait for theirs."""
        if self.rank == 0:
            frame = self.FRAME.pack(len(payload), flags, check) + payload
            for rank, sock in list(self.bells.items()):
                try:
                    sock.sendall(frame)
                except OSError as exc:
                    raise GroupFailure(f"rank {rank}'s lifeline failed: {exc}") from None
            return ops, flags, len(self.votes), check
        if self.stop_voted and not self.vote_sent:
            with contextlib.suppress(OSError):  # a lost rank 0: its lifeline's watcher says so
                self.bells[0].sendall(self.VOTE)
            self.vote_sent = True
        size, flags, check = self.FRAME.unpack(self._read(self.FRAME.size))
        return (pickle.loads(self._read(size)) if size else []), flags, 0, check

    def _read(self, count: int) -> bytes:
        """Not rank 0, framed: the next `count` bytes from rank 0's lifeline, waiting for them."""
        data = bytearray()
        while len(data) < count:
            try:
                piece = self.bells[0].recv(count - len(data))
            except OSError:
                piece = b""
            if not piece:
                raise GroupFailure("rank 0's process has ended (its lifeline closed)")
            data += piece
        return bytes(data)


def token_check(responses: list) -> int:
    """A short digest of the tokens one batch step sampled, for the ranks to compare."""
    return sum(r.uid * 1_000_003 + r.token for r in responses) % 2**31


def rank0_address() -> str | None:
    """Rank 0's IP address as mlx.launch gave it to the ring (MLX_HOSTFILE) or jaccl backend; None if unknown."""
    coordinator = os.environ.get("MLX_JACCL_COORDINATOR", "")
    if coordinator:
        return coordinator.rpartition(":")[0].strip("[]") or None
    try:
        with open(os.environ["MLX_HOSTFILE"], encoding="utf-8") as hostfile:
            return json.load(hostfile)[0][0].rpartition(":")[0].strip("[]") or None
    except (KeyError, OSError, ValueError, IndexError, TypeError, AttributeError):
        return None


class Lifelines:
    """An idle TCP connection between rank 0 and each other rank: EOF says a rank's process has ended.

    MLX does not always report a lost peer: a collective can wait forever
    after the other process has died (mlx#3862, mlx#4278). However a process
    ends, the operating system closes its sockets, so the other end of its
    lifeline reads EOF at once. Rank 0 listens on its address from
    mlx.launch's host list, on a port it shares in one all_sum at start, and
    each other rank connects and names itself. Best effort: a rank that
    cannot connect (a firewall) goes without, and the watchdog still covers it.
    """

    def __init__(self, link: GroupLink):
        import mlx.core as mx
        self.link = link
        self.sockets: dict[int, socket.socket] = {}   # the other end's rank -> its lifeline
        host = rank0_address()
        listener = self._listen(host) if link.rank == 0 and host else None
        port = listener.getsockname()[1] if listener else 0
        port = int(mx.distributed.all_sum(mx.array([port]), group=link.group).item())
        if listener is not None:
            with listener:
                self._accept(listener)
        elif link.rank != 0 and port and host:
            self._connect(host, port)

    def wait_for_loss(self) -> str | None:
        """Block until a lifeline breaks and say whose process ended; None at once when there are none.

        Bytes that come in meanwhile go to GroupLink.received (shares, votes, doorbells).
        """
        ranks = {sock: rank for rank, sock in self.sockets.items()}
        while ranks:
            readable, _, _ = select.select(list(ranks), [], [])
            for sock in readable:
                try:
                    data = sock.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    return f"rank {ranks[sock]}'s process has ended (its lifeline closed)"
                self.link.received(ranks[sock], data)
        return None

    def _listen(self, host: str) -> socket.socket | None:
        try:
            return socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        except OSError as exc:
            log.warning("no lifelines (cannot listen on %s: %s): a dead rank is noticed only after --timeout", host, exc)
            return None

    def _accept(self, listener: socket.socket) -> None:
        deadline = time.monotonic() + LIFELINE_SECONDS
        while len(self.sockets) < self.link.size - 1 and (left := deadline - time.monotonic()) > 0:
            listener.settimeout(left)
            try:
                conn, _address = listener.accept()
                conn.settimeout(left)
                hello = conn.recv(64).decode("ascii", "replace").split()
            except OSError:
                continue
            rank = int(hello[2]) if hello[:2] == ["lem-serve", "rank"] and hello[2:3] and hello[2].isdigit() else 0
            if 0 < rank < self.link.size:
                conn.settimeout(None)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # shares are small writes: no Nagle delay
                self.sockets[rank] = conn
            else:
                conn.close()
        missing = sorted(set(range(1, self.link.size)) - set(self.sockets))
        if missing:
            log.warning("no lifeline from rank(s) %s: their death is noticed only after --timeout", missing)

    def _connect(self, host: str, port: int) -> None:
        try:
            conn = socket.create_connection((host, port), timeout=LIFELINE_SECONDS)
            conn.sendall(b"lem-serve rank %d\n" % self.link.rank)
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sockets[0] = conn
        except OSError as exc:
            log.warning("no lifeline to rank 0 (%s): its death is noticed only after --timeout", exc)


def join_group(settings: Settings) -> Any:
    """This process's mx.distributed group when mlx.launch started several; None when it runs alone.

    Call before anything else imports MLX (it honours --threads first).
    """
    apply_thread_cap(settings.threads)
    import mlx.core as mx
    group = mx.distributed.init()
    return group if group.size() > 1 else None


def quiet_launcher(pid: int) -> bool:
    """Lower the CPU priority of our parent when it is mlx.launch (nice 19, idle class on Linux); True when it was.

    mlx.launch's output relay busy-polls: it selects its ranks' stdin pipes for writing, which are always
    writable, and its own stdin at end of file, so an idle 2-rank group burns 1-1.7 cores in the launcher
    (mlx 0.32). On a laptop-sized core count that is time the ranks' decode loses. A user's process may
    always lower its own processes' priority. Nice 19 is not enough on Linux: the scheduler may let a running
    nice-19 thread keep the core to the end of its slice (EEVDF's run to parity) while a rank thread that a
    collective woke waits, and a decode step wakes them at every layer (bench/RESULTS-sharded.md). A
    SCHED_IDLE thread gives way at once. Each thread is set on its own on Linux (where nice and policy are
    per thread); elsewhere the process's nice value covers them.
    """
    try:
        if sys.platform.startswith("linux"):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().decode(errors="replace").split("\0")
            threads = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        else:
            command = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True,
                                     timeout=5).stdout.split()
            threads = [pid]
        if not any(os.path.basename(arg) == "mlx.launch" or arg.endswith("_distributed_utils/launch.py")
                   or arg == "mlx._distributed_utils.launch" for arg in command[:3]):   # the program, not its arguments
            return False
        for thread in threads:
            os.setpriority(os.PRIO_PROCESS, thread, 19)
            with contextlib.suppress(OSError, AttributeError):   # not Linux, or refused: nice 19 stays
                os.sched_setscheduler(thread, os.SCHED_IDLE, os.sched_param(0))
    except (OSError, subprocess.SubprocessError):
        return False   # gone, or not ours to renice: only speed is at stake
    logging.info("mlx.launch (pid %d) busy-polls its ranks' pipes; its priority is lowered to nice 19%s", pid,
                 " and the idle class" if hasattr(os, "SCHED_IDLE") else "")
    return True


# ---------------------------------------------------------------------------
# Engine: one thread that owns MLX, continuous batching, the prompt cache
# ---------------------------------------------------------------------------

@dataclass(eq=False)
class Job:
    """One admitted request's generation, shared by its handler and the engine.

    The engine puts events on `events`, each (kind, value, logprobs, choice):
    ("text", str, [token_logprobs dicts], i) and ("reasoning", str, [...], i)
    pieces of choice i (the lists empty unless logprobs were asked for), one
    ("finish", reason, [], i) for each of the request's n choices, or an
    ("error", APIError, [], 0) that ends them all. The handler sets
    `cancelled` when the client leaves or the deadline passes.
    """

    prompt: list[int]
    request: GenerationRequest
    max_tokens: int
    deadline: float
    events: queue.SimpleQueue = dataclasses.field(default_factory=queue.SimpleQueue)   # C-level: cheaper per token
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    admitted: threading.Event = dataclasses.field(default_factory=threading.Event)  # set once cached_tokens is known
    completion_tokens: int = 0
    reasoning_tokens: int = 0               # of completion_tokens, those sampled inside a thinking block
    cached_tokens: int = 0                  # prompt tokens served from the prompt cache
    first_token_at: float | None = None
    stop_string: str | None = None          # the stop string that ended generation, if one did
    kv_bytes: int = 0                       # KV memory reserved for it at admission (all its choices)

    @property
    def prompt_tokens(self) -> int:
        """The prompt's length in tokens, as usage reports it."""
        return len(self.prompt)

    def should_stop(self) -> bool:
        """True once the client left or the deadline passed."""
        return self.cancelled.is_set() or time.monotonic() > self.deadline


@dataclass(eq=False)
class Sequence:
    """The engine's private state for one job inside the running batch."""

    job: Job
    text: TextStream
    stops: StopScanner
    reasoning: ReasoningSplitter | None = None
    channels: HarmonyChannels | None = None    # a harmony reply's, to count its reasoning tokens
    choice: int = 0                            # its index among the request's n choices
    logprobs: list = dataclasses.field(default_factory=list)  # entries of tokens whose text is not out yet


def common_prefix(a: Any, b: Any) -> int:
    """How many leading tokens two token arrays (array.array("i")) share.

    A binary search over their bytes: each comparison is one memcmp in C, so a
    30k-token prefix costs about 15 of them instead of a Python loop per token.
    """
    n = min(len(a), len(b))
    width = a.itemsize
    left, right = a[:n].tobytes(), b[:n].tobytes()
    if left == right:
        return n
    same, differs = 0, n  # a[:same] == b[:same] and a[:differs] != b[:differs]
    while differs - same > 1:
        mid = (same + differs) // 2
        if left[:mid * width] == right[:mid * width]:
            same = mid
        else:
            differs = mid
    return same


def cache_length(cache: list) -> int:
    """Tokens a model's KV cache holds (its first layer's offset)."""
    return int(getattr(cache[0], "offset", 0)) if cache else 0


def cut_cache(cache: list, tokens: int) -> list | None:
    """A copy of a KV cache holding only its first `tokens` tokens, in fresh arrays; None when it cannot be cut.

    mlx_lm's trim_prompt_cache only moves a cache's offset: the arrays, and
    their memory, stay whole. Here the keys and values themselves are
    sliced and copied (mx.contiguous copies a slice into an array of its own
    size), so the rest is freed once the original goes. Full-precision and
    quantized caches (--kv-bits) can be cut; a sliding-window cache that has
    wrapped, or a recurrent layer's state, hold no prefix to cut to: None.
    """
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache, QuantizedKVCache
    if tokens <= 0 or not all(type(c) in (KVCache, QuantizedKVCache) and c.keys is not None for c in cache):
        return None

    def cut(x: Any) -> Any:
        return type(x)(cut(part) for part in x) if isinstance(x, (tuple, list)) else mx.contiguous(x[..., :tokens, :])

    pieces = []
    for layer in cache:
        piece = copy.copy(layer)
        piece.keys, piece.values = cut(layer.keys), cut(layer.values)
        piece.offset = min(tokens, layer.offset)
        pieces.append(piece)
    mx.eval([[p.keys, p.values] for p in pieces])
    return pieces


def cache_nbytes(cache: list) -> int:
    """Bytes a model's per-layer KV cache holds (the sum over its layers)."""
    return sum(c.nbytes for c in cache)


def cache_capacity(cache: list) -> int:
    """Tokens a KV cache's arrays have room for (its offset when they are not plain keys and values)."""
    keys = getattr(cache[0], "keys", None) if cache else None
    keys = keys[0] if isinstance(keys, (tuple, list)) and keys else keys  # quantized: (data, scales, biases)
    return int(keys.shape[-2]) if hasattr(keys, "shape") and len(keys.shape) == 4 else cache_length(cache)


@dataclass(eq=False)
class CacheEntry:
    """One kept KV cache and the tokens it holds."""

    tokens: Any          # array.array("i"): compact, hashable by .tobytes()
    cache: list
    nbytes: int


class PromptCache:
    """KV caches of finished requests, reused for prompts that share a prefix.

    Entries are kept least recently used first; the byte budget is the
    smaller of `max_bytes` and the room the running batch leaves (`room` at
    each store). Storing evicts whole entries, least recently used first, and
    an entry larger than the budget on its own is cut to its longest prefix
    that fits (cut_cache frees the rest), so a long agent prompt keeps the
    part that fits instead of nothing. A fetched prefix always leaves at
    least one prompt token to run. Only the engine thread calls it.
    """

    def __init__(self, max_bytes: int):
        self.entries: dict[bytes, CacheEntry] = {}   # in LRU order: oldest first
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.stored: list[CacheEntry] = []  # entries store() has kept since the last look (CacheFolder saves them)
        self.hits = self.misses = self.evictions = self.trims = 0

    def fetch(self, prompt: list[int]) -> tuple[list | None, int]:
        """(a KV cache holding the longest cached prefix the prompt can use, its length) or (None, 0)."""
        from mlx_lm.models.cache import can_trim_prompt_cache
        wanted = array.array("i", prompt)
        best, usable = None, 0
        for entry in self.entries.values():
            shared = min(common_prefix(entry.tokens, wanted), len(prompt) - 1)
            if shared > usable and (shared == len(entry.tokens) or can_trim_prompt_cache(entry.cache)):
                best, usable = entry, shared
        self.hits += best is not None
        self.misses += best is None
        if best is None:
            return None, 0
        self._touch(best)
        return self._prefix(best, usable), usable

    def store(self, tokens: list[int], cache: list, room: int | None = None, entries: int | None = None,
              kept: int | None = None) -> tuple[int, int]:
        """Keep `cache` (the KV of `tokens`); return (entries held now, tokens of this one kept, 0 if none).

        Alone and on rank 0 the cache is held to min(max_bytes, room). A
        group's other ranks pass rank 0's figures instead, `entries` and
        `kept`, and follow them: evicting least recently used first and cutting
        the same prefix, they drop exactly what rank 0 dropped, whatever their
        shard's bytes (pipeline stages hold different numbers of layers).
        """
        length = min(len(tokens), cache_length(cache))
        if cache_capacity(cache) > length:  # generate_step's buffers grow 256 tokens at a time: free the slack
            cache = cut_cache(cache, length) or cache
        limit = self.max_bytes if room is None else min(self.max_bytes, max(room, 0))
        entry = CacheEntry(array.array("i", tokens[:length]), cache, cache_nbytes(cache))
        self._drop(self.entries.pop(entry.tokens.tobytes(), None))
        self._drop_prefixes_of(entry)
        self._add(entry)
        if entries is None:
            self.fit(limit, PROMPT_CACHE_MAX_ENTRIES, keep=entry)
            kept = self._cut_to(entry, limit)
        else:
            self.fit(entries=entries + (kept == 0), keep=entry)
            kept = self._cut_to(entry, kept=kept)
        if kept:
            self.stored.append(next(reversed(self.entries.values())))
        return len(self.entries), kept

    def fit(self, limit: int | None = None, entries: int | None = None, keep: CacheEntry | None = None) -> int:
        """Evict least recently used entries, never `keep`, to at most `limit` bytes and `entries` entries.

        Returns the entries left.
        """
        for key, entry in list(self.entries.items()):
            if (limit is None or self.nbytes <= limit) and (entries is None or len(self.entries) <= entries):
                break
            if entry is not keep:
                self._drop(self.entries.pop(key))
                self.evictions += 1
        return len(self.entries)

    def stats(self) -> dict:
        """The cache's counters for /healthz and /metrics: entries, bytes, tokens, hits, misses, evictions, trims."""
        return {"prompt_cache_entries": len(self.entries), "prompt_cache_bytes": self.nbytes,
                "prompt_cache_tokens": sum(len(e.tokens) for e in self.entries.values()),
                "prompt_cache_hits": self.hits, "prompt_cache_misses": self.misses,
                "prompt_cache_evictions": self.evictions, "prompt_cache_trims": self.trims}

    def _cut_to(self, entry: CacheEntry, limit: int | None = None, kept: int | None = None) -> int:
        """Cut an entry to `kept` tokens, or to the most that fit in `limit` bytes; its tokens kept (0: dropped)."""
        length = len(entry.tokens)
        if kept is None:
            if entry.nbytes <= limit:
                return length
            kept = limit * length // max(entry.nbytes, 1)  # bytes grow linearly with tokens
        if kept >= length:
            return length
        self._drop(self.entries.pop(entry.tokens.tobytes()))
        cut = cut_cache(entry.cache, kept)
        if cut is None:  # nothing to cut it to, or a cache that holds no prefix (see cut_cache): it goes
            self.evictions += 1
            return 0
        self.trims += 1
        self._add(CacheEntry(entry.tokens[:kept], cut, cache_nbytes(cut)))
        return kept

    def _prefix(self, entry: CacheEntry, tokens: int) -> list:
        """A cache of the entry's first `tokens` tokens for a new sequence (which must not change the entry's)."""
        from mlx_lm.models.cache import trim_prompt_cache
        cut = cut_cache(entry.cache, tokens)  # fresh arrays: MLX's a[i] = x rewrites the array object a in place
        if cut is not None:
            return cut
        cache = copy.deepcopy(entry.cache)
        trim_prompt_cache(cache, len(entry.tokens) - tokens)
        return cache

    def _drop_prefixes_of(self, entry: CacheEntry) -> None:
        """A new entry holds its prefixes' KV too: drop them (their memory is wasted)."""
        from mlx_lm.models.cache import can_trim_prompt_cache
        if not can_trim_prompt_cache(entry.cache):
            return
        for key, other in list(self.entries.items()):
            if len(other.tokens) < len(entry.tokens) and common_prefix(other.tokens, entry.tokens) == len(other.tokens):
                self._drop(self.entries.pop(key))

    def _touch(self, entry: CacheEntry) -> None:
        key = entry.tokens.tobytes()
        self.entries[key] = self.entries.pop(key)

    def _add(self, entry: CacheEntry) -> None:
        self.entries[entry.tokens.tobytes()] = entry
        self.nbytes += entry.nbytes

    def _drop(self, entry: CacheEntry | None) -> None:
        if entry is not None:
            self.nbytes -= entry.nbytes


class CacheFolder:
    """--prompt-cache-dir: prompt cache entries as safetensors files (mlx_lm's save_prompt_cache), so a
    restart finds the prefixes it had.

    Files are named for the model's identity (model_identity) and their
    tokens, which their metadata holds too. A new entry of at least
    PROMPT_CACHE_SAVE_TOKENS is written once the batch is idle, every other
    entry at a graceful shutdown; files beyond the disk budget go, oldest
    first. A file that cannot be read, or whose identity is not this
    model's, is skipped with a warning. Only the engine thread calls it: the
    arrays belong to its MLX stream.
    """

    PREFIX = "lem-prompt-"

    def __init__(self, folder: Path, identity: str, max_bytes: int):
        self.folder, self.identity, self.max_bytes = folder, identity, max_bytes
        self.saved: dict[bytes, tuple[Any, Path]] = {}  # entry key -> (its tokens, its file)
        self.pending: dict[bytes, CacheEntry] = {}      # long new entries to write when the batch is idle

    def restore(self, cache: PromptCache) -> int:
        """Load this model's newest files that fit the cache's budget into it; the entries restored."""
        files = sorted(self.folder.glob(f"{self.PREFIX}{self.identity[:16]}-*.safetensors"),
                       key=lambda p: p.stat().st_mtime, reverse=True)
        chosen, total = [], 0
        for path in files:  # the newest always: store() cuts it to the budget if it must
            if total >= cache.max_bytes:
                break
            chosen.append(path)
            total += path.stat().st_size
        restored = 0
        for path in reversed(chosen):  # oldest first: the newest ends up most recently used
            restored += self._restore_one(path, cache)
        return restored

    def offer(self, entries: list[CacheEntry]) -> None:
        """Entries the prompt cache has just kept: the long ones are written when the batch is idle."""
        for entry in entries:
            if len(entry.tokens) >= PROMPT_CACHE_SAVE_TOKENS:
                self.pending[entry.tokens.tobytes()] = entry

    def save_pending(self, cache: PromptCache, more: Callable[[], bool]) -> None:
        """Write pending entries still in the cache, one at a time while `more()` says the batch is idle."""
        while self.pending and more():
            key, entry = self.pending.popitem()
            if cache.entries.get(key) is entry:
                self._save(entry)

    def save_all(self, cache: PromptCache) -> None:
        """Write the entries not on disk yet, most recently used first, while they fit the disk budget (shutdown)."""
        self.pending.clear()
        used = sum(p.stat().st_size for p in self.folder.glob(f"{self.PREFIX}*.safetensors"))
        for key, entry in reversed(list(cache.entries.items())):
            if key not in self.saved and used + entry.nbytes <= self.max_bytes:
                self._save(entry)
                used += entry.nbytes

    def _save(self, entry: CacheEntry) -> None:
        from mlx_lm.models.cache import save_prompt_cache
        key = entry.tokens.tobytes()
        path = self.folder / f"{self.PREFIX}{self.identity[:16]}-{hashlib.sha256(key).hexdigest()[:16]}.safetensors"
        partial = self.folder / f".partial-{path.name}"  # never globbed: a crash mid-write leaves no half file
        try:
            save_prompt_cache(str(partial), entry.cache, {"identity": self.identity,
                                                          "tokens": json.dumps(entry.tokens.tolist())})
            os.replace(partial, path)
        except Exception as exc:
            log.warning("could not save a prompt cache entry to %s: %s", self.folder, exc)
            with contextlib.suppress(OSError):
                partial.unlink()
            return
        self.saved[key] = (entry.tokens, path)
        for other, (tokens, old) in list(self.saved.items()):  # files of its prefixes hold nothing more
            if len(tokens) < len(entry.tokens) and common_prefix(tokens, entry.tokens) == len(tokens):
                self._remove(other, old)
        self._hold_to_budget()

    def _hold_to_budget(self) -> None:
        files = sorted(self.folder.glob(f"{self.PREFIX}*.safetensors"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        for path in files[:-1]:  # the newest always stays
            if total <= self.max_bytes:
                break
            total -= path.stat().st_size
            self._remove(next((k for k, (_, p) in self.saved.items() if p == path), None), path)

    def _remove(self, key: bytes | None, path: Path) -> None:
        self.saved.pop(key, None)
        with contextlib.suppress(OSError):
            path.unlink()

    def _restore_one(self, path: Path, cache: PromptCache) -> int:
        import mlx.core as mx
        from mlx.utils import tree_flatten
        from mlx_lm.models.cache import load_prompt_cache
        try:
            layers, metadata = load_prompt_cache(str(path), return_metadata=True)
            if metadata.get("identity") != self.identity:
                raise ValueError("it was saved for another model or other settings")
            tokens = json.loads(metadata["tokens"])
            if not tokens or cache_length(layers) != len(tokens):
                raise ValueError("its tokens and its KV cache disagree")
            mx.eval([v for c in layers for _, v in tree_flatten(c.state) if isinstance(v, mx.array)])  # a truncated file fails here
        except Exception as exc:
            log.warning("skipping saved prompt cache %s: %s", path.name, " ".join(str(exc).split())[:300])
            return 0
        cache.store(tokens, layers)
        cache.stored.clear()
        saved = array.array("i", tokens)
        self.saved[saved.tobytes()] = (saved, path)
        return 1


@dataclass
class SoloResponse:
    """One generated token, shaped as BatchGenerator reports it (the engine reads these fields)."""

    uid: int
    token: int
    logprobs: Any
    finish_reason: str | None
    prompt_cache: list | None = None
    all_tokens: list[int] | None = None


class CacheParts(list):
    """A model's KV caches then its draft's, one list; its slices write back to it.

    mlx_lm's generators quantize a KV cache (--kv-bits) by replacing its
    entries in the list they were given (`cache[i] = quantized`), and
    speculative_generate_step first slices its list into the model's and the
    draft's parts. A plain list's slice is a copy: the quantized caches would
    never reach the list the prompt cache keeps, which would hold the stale
    full-precision ones. A slice of this list is a CacheSlice instead.
    """

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            return CacheSlice(self, range(len(self))[key])
        return super().__getitem__(key)


class CacheSlice(list):
    """Part of a CacheParts: an entry set here is set there too."""

    def __init__(self, whole: CacheParts, indices: range):
        super().__init__(list.__getitem__(whole, i) for i in indices)
        self.whole, self.indices = whole, indices

    def __setitem__(self, index: Any, value: Any) -> None:
        super().__setitem__(index, value)
        list.__setitem__(self.whole, self.indices[index], value)


@dataclass(eq=False)
class SoloSequence:
    """The sequence a SoloBatch is generating."""

    uid: int
    prompt: list[int]            # every prompt token, the cached prefix included
    steps: Iterator[tuple]       # mlx_lm's generator: (token, logprobs[, from_draft])
    cache: list
    max_tokens: int
    generated: list[int] = dataclasses.field(default_factory=list)


class SoloBatch:
    """BatchGenerator's interface over mlx_lm's one-sequence generators.

    A draft model (speculative decoding) and a quantized KV cache are what
    BatchGenerator cannot do, so they go through generate_step or
    speculative_generate_step, one sequence at a time. --max-requests must be
    1 with them, so a second inserted sequence never has to wait for long.
    Requests whose logits processors keep state (JSON constraints, OpenAI
    penalties) are decoded without the draft: speculation calls processors
    for tokens it then rejects.
    """

    def __init__(self, model: Model, stop_tokens: set[int], drafts: dict):
        self.model, self.options, self.stop_tokens = model, model.solo, stop_tokens
        self.drafts = drafts    # the engine's counters: draft tokens "proposed" and "accepted"
        self.waiting: list[tuple] = []
        self.current: SoloSequence | None = None
        self.uids = itertools.count()

    def insert(self, prompts: list[list[int]], max_tokens: list[int], caches: list, all_tokens: list[list[int]],
               samplers: list, logits_processors: list) -> list[int]:
        """Queue sequences (BatchGenerator's arguments); return their uids."""
        uids = []
        for i, prompt in enumerate(prompts):
            uids.append(next(self.uids))
            self.waiting.append((uids[-1], prompt, max_tokens[i], caches[i], all_tokens[i], samplers[i],
                                 logits_processors[i]))
        return uids

    def next(self) -> tuple[list, list[SoloResponse]]:
        """One token of the current sequence (starting the next waiting one when there is none)."""
        if self.current is None:
            if not self.waiting:
                return [], []
            self.current = self._start(*self.waiting.pop(0))
        sequence = self.current
        token, logprobs, *drafted = next(sequence.steps)
        self.drafts["accepted"] += bool(drafted and drafted[0])
        sequence.generated.append(int(token))
        finish = ("stop" if token in self.stop_tokens
                  else "length" if len(sequence.generated) >= sequence.max_tokens else None)
        if finish is None:
            return [], [SoloResponse(sequence.uid, int(token), logprobs, None)]
        self.current = None
        tokens, cache = self._settle(sequence)
        return [], [SoloResponse(sequence.uid, int(token), logprobs, finish, cache, tokens)]

    def remove(self, uids: list[int], return_prompt_caches: bool = False) -> dict:
        """Drop sequences; {uid: (cache, tokens)} of the running one when asked (for the prompt cache)."""
        self.waiting = [w for w in self.waiting if w[0] not in uids]
        if self.current is None or self.current.uid not in uids:
            return {}
        sequence, self.current = self.current, None
        tokens, cache = self._settle(sequence)
        return {sequence.uid: (cache, tokens)} if return_prompt_caches else {}

    def close(self) -> None:
        """Forget every waiting and current sequence; the engine calls it when it stops."""
        self.waiting, self.current = [], None

    def _start(self, uid: int, prompt: list[int], max_tokens: int, cache: list | None, prefix: list[int],
               sampler: Any, processors: list) -> SoloSequence:
        import mlx.core as mx
        from mlx_lm.generate import generate_step, speculative_generate_step
        from mlx_lm.models.cache import make_prompt_cache
        options, model = self.options, self.model.model
        kv = {"kv_bits": options.kv_bits, "kv_group_size": options.kv_group_size,
              "quantized_kv_start": options.quantized_kv_start}
        draft = None if any(getattr(p, "stateful", False) for p in processors) else options.draft
        if cache is None:
            cache = make_prompt_cache(model) + (make_prompt_cache(options.draft) if options.draft else [])
        cache = CacheParts(cache)
        common = {"max_tokens": max_tokens, "sampler": sampler, "logits_processors": processors,
                  "prefill_step_size": PREFILL_STEP_TOKENS, **kv}
        if draft is None:
            steps = generate_step(mx.array(prompt), model, prompt_cache=cache[:len(model.layers)], **common)
        else:
            steps = self._counted(speculative_generate_step(mx.array(prompt), model, draft, prompt_cache=cache,
                                                            num_draft_tokens=options.num_draft_tokens, **common),
                                  max_tokens)
        return SoloSequence(uid, list(prefix) + list(prompt), steps, cache, max_tokens)

    def _counted(self, steps: Iterator[tuple], max_tokens: int) -> Iterator[tuple]:
        """Speculative steps, counting proposals as mlx_lm makes them.

        Each verification step proposes min(num_draft_tokens, tokens left)
        and ends with the model's own token (or at the budget).
        """
        produced, step_open = 0, False
        for token, logprobs, from_draft in steps:
            if not step_open:
                self.drafts["proposed"] += min(self.options.num_draft_tokens, max_tokens - produced)
            step_open = from_draft
            produced += 1
            yield token, logprobs, from_draft

    def _settle(self, sequence: SoloSequence) -> tuple[list[int], list]:
        """(tokens, cache) with every cache part holding exactly those tokens, for the prompt cache.

        The generators run ahead (the next token is computed before this one
        is yielded; speculation drafts beyond what it accepts), so each part
        is trimmed back to the tokens both the client and the cache agree on.
        """
        from mlx_lm.models.cache import trim_prompt_cache
        with contextlib.suppress(Exception):
            sequence.steps.close()
        tokens = sequence.prompt + sequence.generated
        layers = len(self.model.model.layers)
        parts = [sequence.cache[:layers], sequence.cache[layers:]]
        kept = min([len(tokens)] + [part[0].offset for part in parts if part])
        for part in parts:
            if part and part[0].offset > kept:
                trim_prompt_cache(part, part[0].offset - kept)
        return tokens[:kept], list(sequence.cache)


class KVLedger:
    """KV memory and the part of it admitted requests have reserved (their worst case); thread-safe.

    The admission queue reserves before a request joins the batch and gives
    back when it leaves; the engine holds the prompt cache to what is left.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.reserved = 0
        self.lock = threading.Lock()

    def reserve(self, nbytes: int) -> bool:
        """Reserve `nbytes` if they fit beside the reservations held; True when they did."""
        with self.lock:
            if self.reserved + nbytes > self.limit:
                return False
            self.reserved += nbytes
            return True

    def release(self, nbytes: int) -> None:
        """Give back nbytes that reserve() granted, when the sequence that held them ends (exactly once)."""
        with self.lock:
            self.reserved -= nbytes

    def room(self) -> int:
        """Bytes no request has reserved: what the prompt cache may hold now."""
        return self.limit - self.reserved


class Batch:
    """The running batch as every rank holds it: mlx_lm's BatchGenerator and the prompt cache.

    It changes only through `insert`, `remove` and `step`; a sequence that
    leaves hands its KV cache to the prompt cache. Alone, they just run. In a
    group, rank 0 runs them and records each as an op (Insert, Remove, Keep);
    `sync` sends the ops to the other ranks, whose `follow` replays them, so
    every rank inserts the same prompts with the same settings, steps with
    the others and evicts the same cache entries. Only the engine thread uses it.
    """

    def __init__(self, model: Model, max_batch: int, prompt_cache: PromptCache | None, link: GroupLink | None,
                 drafts: dict | None = None, room: Callable[[int | None], int | None] = lambda uid: None):
        from mlx_lm.generate import BatchGenerator
        eos = model.tokenizer.eos_token_ids
        self.model = model
        self.prompt_cache = prompt_cache
        self.room = room    # room(uid leaving or None): bytes the running batch leaves the prompt cache; None: no limit
        self.link = link
        self.records = link is not None and link.rank == 0    # rank 0 of a group: record ops
        self.follows = link is not None and link.rank != 0    # another rank: replay them
        if model.solo is not None:  # a draft model or a quantized cache: mlx_lm's one-sequence generators
            self.generator = SoloBatch(model, set(eos), drafts if drafts is not None else {"proposed": 0, "accepted": 0})
        else:
            self.generator = BatchGenerator(model.model, stop_tokens=[[t] for t in eos],
                                            completion_batch_size=max_batch, prefill_batch_size=max_batch,
                                            prefill_step_size=PREFILL_STEP_TOKENS)
        self.ops: list = []                  # rank 0: ops run since the last sync
        self.check = 0                       # token_check of the last step, until the next sync
        self.parked: dict[int, tuple] = {}   # other ranks: caches of sequences that left, until rank 0's Keep

    def insert(self, prompt: list[int], max_tokens: int, request: GenerationRequest,
               cached: int | None = None, entries: int | None = None) -> tuple[int, int]:
        """Start one sequence from its longest cached prefix; return (its uid, tokens taken from the cache).

        Then the prompt cache gives the running batch its room (the batch now
        holds this sequence's reservation too, which covers the prefix it
        took). A rank replaying rank 0's Insert passes rank 0's `cached` and
        `entries`: finding another length means the ranks' caches have diverged.
        """
        cache, found = None, 0
        if self.prompt_cache is not None:
            cache, found = self.prompt_cache.fetch(prompt)
            room = self.room(None) if entries is None else None
            entries = self.prompt_cache.fit(room, entries)
        if cached is not None and found != cached:
            raise GroupFailure(f"rank 0 found {cached} cached prompt tokens, this rank {found}")
        sampling = make_sampling(request, self.model, max_tokens, prompt)
        (uid,) = self.generator.insert([prompt[found:]], max_tokens=[max_tokens], caches=[cache],
                                       all_tokens=[prompt[:found]], samplers=[sampling.sampler],
                                       logits_processors=[sampling.logits_processors])
        self._record(Insert(uid, prompt, found, max_tokens, request, entries))
        return uid, found

    def remove(self, uids: list[int]) -> None:
        """Drop sequences that have not finished; their KV caches go to the prompt cache."""
        caches = self.generator.remove(uids, return_prompt_caches=self.prompt_cache is not None)
        self._record(Remove(tuple(uids)))
        for uid, (cache, tokens) in caches.items():
            self._left(uid, tokens, cache)

    def step(self) -> list:
        """One BatchGenerator step: its responses, one new token per generating sequence."""
        _prompt_progress, responses = self.generator.next()
        self.check = token_check(responses) if self.link is not None else 0
        for response in responses:
            if response.finish_reason is not None:  # the generator has let the sequence go
                self._left(response.uid, response.all_tokens, response.prompt_cache)
        return responses

    def sync(self, step: bool, shutdown: bool = False) -> int:
        """Rank 0: send the ops run since the last sync and what comes next; return the stop votes.

        Alone there is nothing to send: 0 at once.
        """
        if self.link is None:
            return 0
        flags = (GroupLink.STEP if step else 0) | (GroupLink.SHUTDOWN if shutdown else 0)
        ops, self.ops, check, self.check = self.ops, [], self.check, 0
        return self.link.share(ops, flags, check, self.generator.stream)[2]

    def follow(self) -> tuple[bool, bool]:
        """Another rank: replay rank 0's next ops; return (a step follows, the group stops).

        Rank 0's check of the tokens its last step sampled must equal this
        rank's: a rank that samples differently feeds its shard other tokens.
        """
        ops, flags, _votes, check = self.link.share([], 0, 0, self.generator.stream)
        if check != self.check:
            raise GroupFailure("rank 0 sampled other tokens than this rank in the last step")
        self.check = 0
        for op in ops:
            self._replay(op)
        self.parked.clear()  # caches rank 0 did not keep: its Keeps come in the first sync after the step
        return bool(flags & GroupLink.STEP), bool(flags & GroupLink.SHUTDOWN)

    def close(self) -> None:
        """Close mlx_lm's BatchGenerator; the engine calls it when it stops, and the batch is not used after."""
        self.generator.close()

    def _replay(self, op: Any) -> None:
        if isinstance(op, Insert):
            uid, _cached = self.insert(op.prompt, op.max_tokens, op.request, cached=op.cached, entries=op.entries)
            if uid != op.uid:
                raise GroupFailure(f"rank 0 started sequence {op.uid}, this rank {uid}")
        elif isinstance(op, Remove):
            self.remove(list(op.uids))
        elif isinstance(op, Keep) and op.uid in self.parked:
            tokens, cache = self.parked.pop(op.uid)
            self.prompt_cache.store(tokens, cache, entries=op.entries, kept=op.kept)
        else:
            raise GroupFailure(f"rank 0 sent {op!r}, which this rank's batch cannot follow")

    def _left(self, uid: int, tokens: list[int] | None, cache: list | None) -> None:
        """A sequence left the batch: keep its KV cache for later prompts that share a prefix.

        Rank 0 decides what the prompt cache keeps; the other ranks park the
        cache until rank 0's Keep says how many entries remain.
        """
        if self.prompt_cache is None or not tokens or not cache:
            return
        if self.follows:
            self.parked[uid] = (tokens, cache)
            return
        entries, kept = self.prompt_cache.store(tokens, cache, self.room(uid))
        self._record(Keep(uid, entries, kept))

    def _record(self, op: Any) -> None:
        if self.records:
            self.ops.append(op)


class Engine:
    """The one thread that runs MLX; handler threads talk to it through Jobs.

    Admitted jobs join one running batch (continuous batching with mlx_lm's
    BatchGenerator): a job that arrives mid-generation starts at the next
    step and a finished one leaves without stopping the others. An exception
    inside a step fails the jobs in that batch and the engine goes on with a
    fresh batch; if the thread itself dies, `alive` turns false and every
    waiting job gets an engine_unavailable error.

    In an mlx.launch group (`group`), rank 0's engine runs the jobs and the
    other ranks' engines follow its batch (see Batch). There any failure is
    the group's: an exception in a step, a lost rank, or a step or sync that
    lasts past `stall_seconds` (a watchdog thread notices, since the engine
    thread may be stuck in a collective) turns `alive` false for good and
    sets `finished`, and main() exits non-zero.
    """

    def __init__(self, model: Model, max_batch: int = 1, prompt_cache_bytes: int = 0,
                 group: Any = None, stall_seconds: float = DEFAULT_TIMEOUT, ledger: KVLedger | None = None,
                 folder: CacheFolder | None = None):
        self.model = model
        self.max_batch = max_batch
        self.prompt_cache = PromptCache(prompt_cache_bytes) if prompt_cache_bytes > 0 else None
        self.ledger = ledger   # None: the prompt cache is held to its own budget only
        self.folder = folder if self.prompt_cache is not None else None   # --prompt-cache-dir
        self.link = GroupLink(group) if group is not None else None
        self.stall_seconds = stall_seconds
        self.inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="lem-engine", daemon=True)
        self.failure: BaseException | None = None
        self.finished = threading.Event()          # the loop has ended: stopped, or failed
        self.started = threading.Event()           # the loop runs (saved prefixes restored), or the thread ended
        self.drain_requested = threading.Event()   # rank 0: another rank was asked to stop the group
        self.running: dict[int, Sequence] = {}     # the batch's uids -> their jobs (rank 0 and alone)
        self.warming: dict[int, Job] = {}          # uids of one-token warm-ups -> jobs whose n choices wait on them
        self.embedding: collections.deque[EmbeddingJob] = collections.deque()  # embeddings jobs with passes left
        self.batch: Batch | None = None
        self.progress_at = time.monotonic()        # when the last step or sync ended, for the watchdog
        self.sent_ahead = False                    # rank 0: the next step's share went out early (_send_ahead)
        self.tokens_generated = 0  # every token sampled since start, for health and tests
        self.drafts = {"proposed": 0, "accepted": 0}  # speculative decoding's draft tokens (SoloBatch)
        self._stats: dict = {}

    @property
    def rank(self) -> int:
        """This process's rank in an mlx.launch group; 0 when it serves alone."""
        return self.link.rank if self.link else 0

    @property
    def world_size(self) -> int:
        """Processes in the group; 1 when it serves alone."""
        return self.link.size if self.link else 1

    def start(self) -> None:
        """Start the engine thread; call once, after the model is loaded."""
        self.thread.start()

    @property
    def alive(self) -> bool:
        """Whether the engine thread runs and has not failed (/healthz answers 503 once it is not)."""
        return self.thread.is_alive() and self.failure is None

    def stats(self) -> dict:
        """Counters for /healthz and /metrics: tokens sampled and prompt-cache use."""
        cache = self._stats or dict.fromkeys(PromptCache(0).stats(), 0)
        return {"tokens_generated": self.tokens_generated, "draft_tokens_proposed": self.drafts["proposed"],
                "draft_tokens_accepted": self.drafts["accepted"], **cache}

    def submit(self, job: Job) -> None:
        """Queue a job; raise 503 at once if the engine is dead."""
        if not self.alive:
            raise engine_unavailable()
        self.inbox.put(job)

    def stop(self) -> None:
        """Ask the thread to exit at its next step (in a group, the other ranks with it)."""
        self.inbox.put(None)

    # -- the loop ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            if self.link is not None:
                self._guard_group()
            if self.rank == 0:
                self._loop()
            else:
                self._follow()
        except BaseException as exc:  # the thread is dying: say so, fail everyone waiting
            self.failure = self.failure or exc
            log.critical("generation engine died: %r", exc, exc_info=exc)
            self._fail_waiting()
        finally:
            self.finished.set()
            self.started.set()

    def _loop(self) -> None:
        self.batch = self._new_batch()
        self._restore_saved()
        self.started.set()
        while True:
            busy = bool(self.running or self.warming or self.embedding)
            if not busy and self.folder is not None:  # idle: write new long prefixes to disk, until a job comes
                self.folder.save_pending(self.prompt_cache, self.inbox.empty)
            for job in [] if self.sent_ahead else self._take_jobs(block=not busy):   # none may change this step
                if job is None:
                    self.batch.sync(step=False, shutdown=True)
                    self.batch.close()
                    if self.folder is not None:
                        self.folder.save_all(self.prompt_cache)
                    return
                if isinstance(job, EmbeddingJob):
                    job.passes = embedding_batches([len(tokens) for tokens in job.inputs])
                    self.embedding.append(job)
                else:
                    self._insert(job)
            step = bool(self.running or self.warming)
            if not self.sent_ahead and self.batch.sync(step):
                self.drain_requested.set()
            self.sent_ahead = False
            self.progress_at = time.monotonic()
            if self.embedding:
                self._embed_pass()
            if step:
                self._step_or_recover()
                self.progress_at = time.monotonic()

    def _follow(self) -> None:
        """Another rank of a group: change and step the batch as rank 0 says, until it shuts down."""
        self.batch = self._new_batch()
        while True:
            step, shutdown = self.batch.follow()
            self.progress_at = time.monotonic()
            if shutdown:
                self.batch.close()
                return
            if step:
                self.tokens_generated += len(self.batch.step())
                self.progress_at = time.monotonic()

    def _guard_group(self) -> None:
        """Start the two threads that notice a failed group while the engine thread may be stuck.

        The engine thread can wait forever in a collective that a lost rank
        will never join, so failures are declared from outside it: `alive`
        turns false (requests get 503, /healthz says error) and `finished`
        wakes main(), which exits non-zero.
        """
        lifelines = Lifelines(self.link)
        self.link.use_lifelines(lifelines.sockets)
        self.progress_at = time.monotonic()
        threading.Thread(target=self._watch_progress, name="lem-watchdog", daemon=True).start()
        if self.rank == 0 or not self.link.framed:  # framed, another rank's engine reads its lifeline itself
            threading.Thread(target=self._watch_lifelines, args=(lifelines,), name="lem-lifelines",
                             daemon=True).start()

    def _watch_progress(self) -> None:
        """A step or sync lasting past stall_seconds (--timeout) means a rank has died or stalled."""
        while not self.finished.wait(HEARTBEAT_SECONDS / 4):
            stalled = time.monotonic() - self.progress_at
            if stalled > self.stall_seconds:
                self._fail_group(GroupFailure(f"no step or sync with the other ranks completed in {stalled:.0f} s "
                                              "(--timeout): a rank has died or stalled"))

    def _watch_lifelines(self, lifelines: Lifelines) -> None:
        """A lifeline that breaks means a rank's process has ended, unless the group is shutting down."""
        lost = lifelines.wait_for_loss()
        # The other ranks end their processes after a clean shutdown too: give ours time to finish first.
        if lost is not None and not self.finished.wait(2 * HEARTBEAT_SECONDS):
            self._fail_group(GroupFailure(lost))

    def _fail_group(self, failure: GroupFailure) -> None:
        if not self.finished.is_set():
            self.failure = failure
            log.critical("%s", failure)
            self._fail_waiting()
            self.finished.set()

    def _new_batch(self) -> Batch:
        return Batch(self.model, self.max_batch, self.prompt_cache, self.link, self.drafts, self._cache_room)

    def _cache_room(self, uid: int | None) -> int | None:
        """Bytes the prompt cache may hold now: what admitted requests have not reserved, plus the share
        of sequence `uid`, whose KV is the one moving into the cache; None without a ledger."""
        if self.ledger is None:
            return None
        job = self.running[uid].job if uid in self.running else self.warming.get(uid)
        return self.ledger.room() + (job.kv_bytes // job.request.n if job is not None else 0)

    def _take_jobs(self, block: bool) -> list[Job | None]:
        """New jobs: wait for one when idle (in a group, one heartbeat at most), else take what has arrived."""
        jobs = []
        if block:
            with contextlib.suppress(queue.Empty):
                jobs.append(self.inbox.get(timeout=HEARTBEAT_SECONDS if self.link else None))
        with contextlib.suppress(queue.Empty):   # _fail_group may drain from another thread at the same time
            while not self.inbox.empty():   # no exception raised on every step
                jobs.append(self.inbox.get_nowait())
        return jobs

    def _fail_waiting(self) -> None:
        for job in self._take_jobs(block=False):
            if job is not None:
                job.events.put(("error", engine_unavailable(), [], 0))

    def _insert(self, job: Job) -> None:
        """Add a job's choices to the batch, each starting from the longest cached prefix.

        Several choices share their prompt's KV cache: a one-token warm-up
        runs the prompt once and leaves it in the prompt cache, and the
        choices then start from it, each running only the prompt's last
        token. Without a prompt cache they prefill side by side in the batch.
        """
        if job.should_stop():
            job.events.put(("finish", "cancelled", [], 0))
            return
        if job.request.n > 1 and self.prompt_cache is not None:
            uid = self._start(job, 1, job.request)
            if uid is not None:
                self.warming[uid] = job
            return
        self._start_choices(job)

    def _embed_pass(self) -> None:
        """One forward pass of the oldest embeddings job, between two generation steps.

        Passes and generation steps alternate, so a long embeddings request
        delays streams by one pass at a time, not by all of it. A job that was
        cancelled or ran out of time ends before its next pass; a failure
        (out of memory, say) fails that job only.
        """
        job = self.embedding[0]
        if job.should_stop():
            self.embedding.popleft()
            job.events.put(("finish", "cancelled", [], 0))
            return
        rows = job.passes.pop(0)
        try:
            pooled = embed_rows(job.embedder, [job.inputs[i] for i in rows], job.request.dimensions)
        except Exception as exc:
            log.error("embedding failed: %r", exc, exc_info=exc)
            self.embedding.popleft()
            job.events.put(("error", internal_error(), [], 0))
            return
        for i, vector in zip(rows, pooled):
            job.vectors[i] = vector
        if not job.passes:
            self.embedding.popleft()
            job.events.put(("embeddings", job.vectors, [], 0))
            job.events.put(("finish", "stop", [], 0))

    def _start_choices(self, job: Job) -> None:
        """Start the job's n choices; seeded choices after the first take seed + i, so they differ."""
        for i in range(job.request.n):
            request = job.request
            if i and request.seed is not None:
                request = dataclasses.replace(request, seed=request.seed + i)
            uid = self._start(job, job.max_tokens, request, measure=job.request.n == 1)
            if uid is None:
                return
            trim_space = job.request.endpoint != "completions"
            self.running[uid] = Sequence(job, TextStream(self.model, trim_space), StopScanner(job.request.stop),
                                         reasoning_splitter(job.request, self.model, job.prompt),
                                         harmony_channels(job.request, self.model), choice=i)

    def _start(self, job: Job, max_tokens: int, request: GenerationRequest, measure: bool = True) -> int | None:
        """Insert one sequence of `job` into the batch; its uid, or None after reporting the failure.

        `measure`: this insert's cache hit is the job's cached_tokens (a warm-up's, or a lone choice's).
        """
        if self.link is not None:
            # The Insert carries the settings the other ranks sample with, not the prompt's text
            # again; and every rank must draw the same tokens, so rank 0 picks the seed.
            seed = secrets.randbits(63) if request.seed is None else request.seed
            request = dataclasses.replace(request, messages=(), prompt="", tools=(), seed=seed)
        try:
            uid, cached = self.batch.insert(job.prompt, max_tokens, request)
        except Exception as exc:
            log.error("could not start generation: %r", exc, exc_info=exc)
            job.events.put(("error", internal_error(), [], 0))
            return None
        finally:
            self._note_cache()
        if measure:
            job.cached_tokens = cached
        job.admitted.set()
        return uid

    def _step_or_recover(self) -> None:
        """One step. Alone, a failure (out of memory, say) fails this batch's jobs and a fresh batch goes on."""
        try:
            self._step()
        except Exception as exc:
            if self.link is not None:
                raise  # the ranks may no longer hold the same batch: the group cannot go on
            log.error("generation failed: %r", exc, exc_info=exc)
            for job in [s.job for s in self.running.values()] + list(self.warming.values()):
                job.events.put(("error", internal_error(), [], 0))
            self.running.clear()
            self.warming.clear()
            self.batch.close()
            self.batch = self._new_batch()

    def _step(self) -> None:
        """One batch step: route each new token, then drop what has ended."""
        leaving, finished = [], False
        responses = self.batch.step()
        ahead = self._send_ahead(responses)
        for response in responses:
            finished |= response.finish_reason is not None   # the batch has handed its cache to the prompt cache
            if response.uid in self.warming:  # the warm-up token is not the job's: its prompt is cached now
                self._start_choices(self.warming.pop(response.uid))
                continue
            sequence = self.running.get(response.uid)
            if sequence is None:
                continue
            reason = self._on_token(sequence, response)
            if reason is None:
                continue
            sequence.job.stop_string = sequence.stops.hit
            sequence.job.events.put(("finish", reason, [], sequence.choice))
            del self.running[response.uid]
            if response.finish_reason is None:  # a stop string: the batch still holds it
                leaving.append(response.uid)
        jobs = {} if ahead else {uid: s.job for uid, s in self.running.items()} | self.warming
        for uid, job in jobs.items():
            if job.should_stop():  # client gone or deadline passed, even mid-prompt (ahead: at the next step)
                sequence = self.running.pop(uid, None)
                self.warming.pop(uid, None)
                job.events.put(("finish", "cancelled", [], sequence.choice if sequence else 0))
                leaving.append(uid)
        if leaving:
            self.batch.remove(leaving)
        if leaving or finished:  # the prompt cache changes only when a sequence leaves (or, in _start, joins)
            self._note_cache()

    def _send_ahead(self, responses: list) -> bool:
        """Rank 0 of a group: share the next step now, before this step's tokens become text, when nothing can
        change the batch before it; True when it did (the loop then neither syncs nor takes jobs until that step).

        Nothing can when no sequence ended, none can meet a stop string, none was cancelled or ran out of time,
        and no job or embedding waits. The other ranks then build the next step while rank 0 detokenizes and
        hands out events, instead of a lifeline frame after all of that (raw mlx_lm's ranks never wait so).
        """
        if self.link is None or self.rank != 0 or self.warming or self.embedding or not self.inbox.empty():
            return False
        if any(r.finish_reason is not None for r in responses):
            return False
        if any(s.job.request.stop or s.job.should_stop() for s in self.running.values()):
            return False
        if self.batch.sync(step=True):
            self.drain_requested.set()
        self.sent_ahead = True
        return True

    def _on_token(self, sequence: Sequence, response: Any) -> str | None:
        """Account for and detokenize one token; return a finish reason or None."""
        job = sequence.job
        if job.first_token_at is None:
            job.first_token_at = time.monotonic()
        job.completion_tokens += 1
        self.tokens_generated += 1
        if response.finish_reason == "stop":  # an end-of-sequence token: not part of the text
            return self._flush(sequence, "stop")
        if job.request.logprobs is not None:
            sequence.logprobs.append(token_logprobs(self.model, response.token, response.logprobs,
                                                   job.request.logprobs))
        text = sequence.text.add(response.token)
        thinking = self._thinking(sequence)
        if response.finish_reason == "length":
            reason = self._flush(sequence, "length", text)
        else:
            reason = "stop" if self._route(sequence, text) else None
        if sequence.channels is not None:
            sequence.channels.feed(text)
        # A token counts as reasoning if it began or ended inside the block (so do both markers).
        job.reasoning_tokens += thinking or self._thinking(sequence)
        return reason

    @staticmethod
    def _thinking(sequence: Sequence) -> bool:
        """Whether the sequence's text is inside reasoning now (a thinking block, harmony's analysis)."""
        return any(part is not None and part.inside for part in (sequence.reasoning, sequence.channels))

    @staticmethod
    def _route(sequence: Sequence, text: str, final: bool = False) -> bool:
        """Send text on as events: reasoning as it is, the rest through the stop scanner.

        Returns True once a stop string is reached (stop strings apply to the
        reply's text, not to reasoning). `final` flushes what is held back.
        """
        split = sequence.reasoning
        for kind, piece in split.feed(text, final) if split is not None else [("text", text)]:
            if kind == "text":
                piece, stopped = sequence.stops.feed(piece)
                if stopped:
                    Engine._emit(sequence, kind, piece)
                    return True
            Engine._emit(sequence, kind, piece)
        if final:
            Engine._emit(sequence, "text", sequence.stops.flush())
        return False

    @staticmethod
    def _emit(sequence: Sequence, kind: str, text: str) -> None:
        """Send a text or reasoning piece with the logprobs of the tokens it completes."""
        if text:
            sequence.job.events.put((kind, text, sequence.logprobs, sequence.choice))
            sequence.logprobs = []

    @staticmethod
    def _flush(sequence: Sequence, reason: str, text: str = "") -> str:
        """Emit `text` and what the text stream, the splitter and the stop scanner still hold."""
        return "stop" if Engine._route(sequence, text + sequence.text.finish(), final=True) else reason

    def _note_cache(self) -> None:
        # A snapshot other threads may read without touching the cache itself.
        if self.prompt_cache is not None:
            self._stats = self.prompt_cache.stats()
            fresh, self.prompt_cache.stored = self.prompt_cache.stored, []
            if self.folder is not None:
                self.folder.offer(fresh)

    def _restore_saved(self) -> None:
        """--prompt-cache-dir: load the prefixes a previous run saved (requests wait in the inbox meanwhile)."""
        if self.folder is None:
            return
        started = time.monotonic()
        restored = self.folder.restore(self.prompt_cache)
        self._note_cache()
        log.info("prompt cache: restored %d saved entries (%d tokens) from %s in %.1f s", restored,
                 self._stats["prompt_cache_tokens"], self.folder.folder, time.monotonic() - started)


# ---------------------------------------------------------------------------
# Dialects: what they share (block separator, usage, logprobs, SSE)
# ---------------------------------------------------------------------------

# -- The agents' dialects: Anthropic Messages and OpenAI Responses -----------------
#
# Each dialect is one parser that builds the GenerationRequest chat builds:
# normalised chat messages and OpenAI-shaped tools and tool_choice, then the
# same output_fields() and sampling_fields(). Agents manage their own context
# (Claude Code compacts it), so the chat window never cuts these conversations
# (max_context stays 0), and a max_tokens above the server's limit is clamped,
# not refused: agents ask for large ceilings (Claude Code sends 32000 or more).

BLOCK_SEPARATOR = "\n"   # between the text blocks of one Anthropic message or Responses item: separate units


def usage_of(job: Job) -> dict:
    """OpenAI's usage object for a finished job."""
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens,
            "total_tokens": job.prompt_tokens + job.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": job.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": job.reasoning_tokens}}


class TextOffsets:
    """Where each token starts in the generated text, in characters, counted from the tokens' bytes.

    A token that begins inside a character (the second half of an emoji, say)
    starts at that character's index, so every offset indexes the text.
    """

    def __init__(self):
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.chars = 0   # whole characters the bytes so far make

    def next(self, raw: list[int]) -> int:
        """The offset of the token with these bytes; the tokens must come in order."""
        at = self.chars
        self.chars += len(self.utf8.decode(bytes(raw)))
        return at


def logprobs_object(endpoint: str, entries: list[dict] | None, offsets: TextOffsets | None = None) -> dict | None:
    """A choice's "logprobs" in the endpoint's OpenAI shape; None when not asked for.

    `entries` come from token_logprobs (chat's shape already); completions get
    the legacy parallel lists, text offsets counted by `offsets` (a stream
    passes the same one for all its chunks).
    """
    if entries is None:
        return None
    if endpoint == "chat":
        return {"content": entries, "refusal": None}
    offsets = offsets or TextOffsets()
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{**{t["token"]: t["logprob"] for t in e["top_logprobs"]}, e["token"]: e["logprob"]}
                             for e in entries],
            "text_offset": [offsets.next(e["bytes"]) for e in entries]}


def sse_event(payload: dict | str, event: str | None = None) -> bytes:
    """One Server-Sent Event carrying JSON (or the literal [DONE]), named `event` when given."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    name = f"event: {event}\n" if event else ""
    return f"{name}data: {data}\n\n".encode()


SSE_KEEPALIVE = b": keepalive\n\n"
SSE_DONE = sse_event("[DONE]")


class Writer:
    """Writes one request's reply in the shapes of the API it came through.

    The handler has one streaming loop and one non-streaming path for every
    endpoint, and both talk to a Writer; each API is one subclass. Engine
    events go through `event` (streaming) or the whole text through `reply`
    (not streaming); both split tool calls out with the request's
    ToolCallScanner, then call the subclass's `text`, `call_start`,
    `call_args`, `call_end` and `finish` (which return SSE bytes) or `body`
    (which returns the JSON). A call streams as its start, pieces of its
    arguments (whose concatenation is its final arguments), its end.
    """

    keepalive = SSE_KEEPALIVE   # what a stream sends after KEEPALIVE_SECONDS of silence
    opens_when_admitted = False  # hold opening() until the engine has taken the job (its usage is then known)

    def __init__(self, job: Job, model: str, scanner: ToolCallScanner | None):
        self.job, self.request, self.model, self.scanner = job, job.request, model, scanner
        self.created = int(time.time())
        self.calls_sent = 0      # tool calls streamed so far (started)
        self.live_call: dict | None = None   # the call being streamed: {"id", "name", "sent"}
        self.closed: set[str] = set()        # ids of the calls streamed to their end
        self.first_call: str | None = None   # the id of the reply's first call (one_call keeps only it)
        self.dropping = False                # a call after the first is streaming: one_call drops it

    def event(self, kind: str, value: str, logprobs: list[dict] = (), choice: int = 0) -> bytes:
        """The bytes one engine event becomes: reasoning, text, tool calls (via the scanner), at the end the finish.

        `choice` is the event's choice (ChoicesWriter routes by it; one choice has index 0).
        """
        if kind == "reasoning":  # a dialect shows it only when asked (a template may think regardless)
            return self.reasoning(value) if self.request.show_reasoning else b""
        pieces = [("text", value)] if kind == "text" else []
        if self.scanner is not None:
            self.scanner.live = True   # a stream: arguments go out as they come
            pieces = self._one_call(self.scanner.feed(value) if kind == "text" else self.scanner.flush())
        out, logprobs = [], list(logprobs)
        for piece, content in pieces:
            if piece == "reasoning":
                out.append(self.reasoning(content) if self.request.show_reasoning else b"")
            elif piece == "text" and (content or logprobs):
                out.append(self.text(content, logprobs))
                logprobs = []   # a token's logprobs go with the first text it ends in
            elif piece == "call_start":
                out.append(self._call_start(content))
            elif piece == "call_args":
                out.append(self._call_args(content))
            elif piece == "calls":
                out.append(self._calls(content))
        if logprobs:
            out.append(self.text("", logprobs))
        if kind != "text":
            out.append(self.finish(value))
        return b"".join(out)

    def reply(self, results: list[tuple[str, str, list[dict], str]]) -> dict:
        """The non-streaming response body from each choice's (text, finish reason, logprobs, reasoning)."""
        text, reason, logprobs, reasoning = results[0]
        reasoning = reasoning if self.request.show_reasoning else ""
        calls = []
        if self.scanner is not None:
            parts = {"text": [], "reasoning": [reasoning], "calls": []}
            for piece, content in self._one_call(self.scanner.feed(text) + self.scanner.flush()):
                parts[piece] += content if piece == "calls" else [content]
            text, calls = "".join(parts["text"]), parts["calls"]
            reasoning = "".join(parts["reasoning"]) if self.request.show_reasoning else ""
        return self.body(text, calls, reason, logprobs, reasoning)

    def _one_call(self, pieces: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        """The scanner's pieces, where the request allows one tool call (parallel_tool_calls false,
        disable_parallel_tool_use), without any call after the first; all of them otherwise."""
        if not self.request.one_call:
            return pieces
        kept = []
        for piece, content in pieces:
            if piece == "call_start":
                self.first_call = self.first_call or content["id"]
                self.dropping = content["id"] != self.first_call
            elif piece == "calls":
                self.first_call = self.first_call or content[0]["id"]
                content = [call for call in content if call["id"] == self.first_call]
            if not (self.dropping and piece in ("call_start", "call_args")) and content != []:
                kept.append((piece, content))
        return kept

    def _call_start(self, call: dict) -> bytes:
        """Open a streamed call ({"id", "name"}); one still open (its arguments complete) ends as sent."""
        out = b""
        if self.live_call is not None:
            live = self.live_call
            out = self._call_end({"id": live["id"], "type": "function",
                                  "function": {"name": live["name"], "arguments": live["sent"]}})
        self.live_call = {**call, "sent": ""}
        self.calls_sent += 1
        return out + self.call_start(call["id"], call["name"])

    def _call_args(self, text: str) -> bytes:
        self.live_call["sent"] += text
        return self.call_args(text)

    def _call_end(self, call: dict) -> bytes:
        self.closed.add(call["id"])
        self.live_call = None
        return self.call_end(call)

    def _calls(self, calls: list[dict]) -> bytes:
        """Finish the calls the scanner closed: a streamed one gets the rest of its arguments, others
        stream whole. (Arguments that differ from what was streamed, a cut-off call's, keep what was sent.)"""
        out = []
        for call in (c for c in calls if c["id"] not in self.closed):
            if self.live_call is None or self.live_call["id"] != call["id"]:
                out.append(self._call_start({"id": call["id"], "name": call["function"]["name"]}))
            arguments, sent = call["function"]["arguments"], self.live_call["sent"]
            if arguments.startswith(sent) and arguments != sent:
                out.append(self._call_args(arguments[len(sent):]))
            out.append(self._call_end(call))
        return b"".join(out)

    def opening(self) -> bytes:
        """What a stream starts with, before any generated text."""
        return b""

    def reasoning(self, text: str) -> bytes:
        """A piece of a thinking model's reasoning (it comes before the text)."""
        raise NotImplementedError

    def text(self, text: str, logprobs: list[dict]) -> bytes:
        """SSE bytes for text the model generated (with its tokens' logprobs, when asked); subclasses write it."""
        raise NotImplementedError

    def call_start(self, call_id: str, name: str) -> bytes:
        """A tool call opens: its id and function name."""
        raise NotImplementedError

    def call_args(self, text: str) -> bytes:
        """A piece of the open call's arguments (JSON text)."""
        raise NotImplementedError

    def call_end(self, call: dict) -> bytes:
        """The open call ends; `call` is the whole call in OpenAI's shape."""
        raise NotImplementedError

    def finish(self, reason: str) -> bytes:
        """The end of a stream that went well: finish reason, usage, the closing events."""
        raise NotImplementedError

    def failure(self, error: APIError) -> bytes:
        """The end of a stream that failed after its headers went out."""
        raise NotImplementedError

    def body(self, text: str, calls: list[dict], reason: str, logprobs: list[dict], reasoning: str) -> dict:
        """The non-streaming JSON response from the text, tool calls, finish reason, logprobs and reasoning."""
        raise NotImplementedError


# ---------------------------------------------------------------------------
# Dialects: OpenAI chat/completions (/v1/chat/completions, /v1/completions)
# ---------------------------------------------------------------------------

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
CHAT_CHECKS = COMMON_CHECKS + (
    Check("messages", (list,), "a non-empty list of messages", lambda v: len(v) > 0),
    Check("logprobs", (bool,), "a boolean"),
    Check("tools", (list,), 'a list of {"type": "function", "function": {"name": ..., "parameters": {...}}} objects'),
    Check("tool_choice", (str, dict), '"none", "auto", "required" or {"type": "function", "function": {"name": ...}}'),
    Check("continue_final_message", (bool,), "a boolean"),
    Check("add_generation_prompt", (bool,), "a boolean"),
    Check("top_logprobs", (int,), f"an integer between 0 and {MAX_TOP_LOGPROBS_CHAT}",
          lambda v: 0 <= v <= MAX_TOP_LOGPROBS_CHAT),
    Check("chat_template_kwargs", (dict,), "an object of chat template arguments, such as {\"enable_thinking\": false}",
          lambda v: not set(v) & TEMPLATE_RESERVED),
    Check("reasoning_effort", (str,), "a string such as \"low\", \"medium\" or \"high\""),
)
COMPLETION_CHECKS = COMMON_CHECKS + (
    Check("prompt", (str, list), "a string, a list holding one string, or a list of token ids"),
    Check("logprobs", (int,), f"an integer between 0 and {MAX_LOGPROBS_COMPLETIONS}",
          lambda v: 0 <= v <= MAX_LOGPROBS_COMPLETIONS),
)


def parse_generation_request(endpoint: str, body: dict, settings: Settings) -> GenerationRequest:
    """Validate a decoded body for `endpoint` ("chat" or "completions")."""
    run_checks(body, CHAT_CHECKS if endpoint == "chat" else COMPLETION_CHECKS)
    if endpoint == "chat":
        if "messages" not in body or body["messages"] is None:
            raise invalid("'messages' is required", "messages")
        messages = tuple(parse_message(m, i) for i, m in enumerate(body["messages"]))
        fields = {"messages": messages, "prefill": chat_prefill(body, messages),
                  "max_context": settings.max_context, "template_args": template_args(body, settings),
                  "split_reasoning": settings.reasoning_format != "none"}
    else:
        if body.get("prompt") is None:
            raise invalid("'prompt' is required", "prompt")
        fields = {"prompt": parse_prompt(body["prompt"])}
    asked = body.get("max_completion_tokens") or body.get("max_tokens")
    if asked is not None and asked > settings.max_tokens:
        raise invalid(f"'max_tokens' is {asked}, above this server's limit of {settings.max_tokens}", "max_tokens")
    stop = body.get("stop") or ()
    options = body.get("stream_options") or {}
    n = body.get("n") or 1
    if n > settings.max_requests:
        raise invalid(f"'n' is {n}; each choice takes a generation slot and this server has "
                      f"{settings.max_requests} (--max-requests)", "n")
    return GenerationRequest(
        endpoint=endpoint, **fields, n=n,
        stream=bool(body.get("stream")),
        include_usage=bool(options.get("include_usage")),
        max_tokens=asked or settings.max_tokens, max_tokens_given=asked is not None,
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
        logprobs=logprobs_wanted(endpoint, body),
        **output_fields(endpoint, body),
        **sampling_fields(body, settings.sampling),
    )


def chat_prefill(body: dict, messages: tuple[dict, ...]) -> bool:
    """Whether a chat request continues its last message: one from the assistant (llama-server's rule).

    vLLM's fields choose too: continue_final_message true asks for it (and
    needs such a message), add_generation_prompt true or
    continue_final_message false ask for a new reply after it instead.
    """
    wanted, fresh = body.get("continue_final_message"), body.get("add_generation_prompt")
    if wanted and fresh:
        raise invalid("'continue_final_message' and 'add_generation_prompt' cannot both be true",
                      "continue_final_message")
    last = messages[-1] if messages else {}
    continuable = last.get("role") == "assistant" and not last.get("tool_calls")
    if wanted and not continuable:
        raise invalid("'continue_final_message' needs a last assistant message without tool calls",
                      "continue_final_message")
    return continuable and wanted is not False and not fresh


def chat_role(role: str) -> str:
    """A message's role as the chat template takes it: OpenAI's "developer" is the system role."""
    return "system" if role == "developer" else role


def parse_message(message: Any, index: int) -> dict:
    """Normalise one chat message to {"role", "content"[, "name", ...]}."""
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise invalid(f"{param} must be an object with 'role' and 'content'", param)
    role = message.get("role")
    if role not in CHAT_ROLES:
        raise invalid(f"{param}.role must be one of {', '.join(CHAT_ROLES)}, got {json.dumps(role)}", f"{param}.role")
    normal = {"role": chat_role(role),
              "content": parse_content(message.get("content"), f"{param}.content",
                                       optional=role == "assistant" and bool(message.get("tool_calls")))}
    for key in ("name", "tool_call_id"):
        if message.get(key) is not None:
            normal[key] = message[key]
    reasoning = message.get("reasoning_content", message.get("reasoning"))
    if role == "assistant" and reasoning is not None:  # sent back with its reasoning: templates that render it get it
        normal["reasoning_content"] = parse_content(reasoning, f"{param}.reasoning_content")
    if message.get("tool_calls"):
        normal["tool_calls"] = parse_tool_calls(message["tool_calls"], f"{param}.tool_calls")
    return normal


def parse_tool_calls(calls: Any, param: str) -> list[dict]:
    """An assistant message's tool_calls, arguments decoded to objects.

    OpenAI sends arguments as a JSON string; chat templates (Qwen's, say)
    write them with `tojson`, which would quote a string a second time.
    """
    if not isinstance(calls, list):
        raise invalid(f"'{param}' must be a list of tool calls", param)
    out = []
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise invalid(f"'{param}[{i}]' must be {{\"type\": \"function\", \"function\": {{\"name\", "
                          f"\"arguments\"}}}}", param)
        # Replayed history is taken as sent: arguments that are no JSON object (a model's own slip, sent
        # back by the agent) are wrapped as the server wraps them on the way out, never a 400.
        arguments = tool_arguments(function.get("arguments") or "{}")
        out.append({**call, "function": {**function, "arguments": arguments}})
    return out


def parse_content(content: Any, param: str, optional: bool = False, text_types: tuple[str, ...] = ("text",),
                  separator: str = "") -> str:
    """A message's content as text: a string, or a list of text parts joined by `separator`.

    `text_types` are the part types that carry text in the calling API
    (chat's "text"; the Responses API's "input_text" and "output_text").
    """
    if content is None and optional:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"{param} must be a string or a list of content parts", param)
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in text_types:
            if kind in MEDIA_PARTS:
                raise invalid(f"{param}[{i}] is a part of type {kind!r}; this server serves text models only", param)
            raise invalid(f"{param}[{i}] must be a {{\"type\": \"{text_types[0]}\", \"text\": ...}} part", param)
        if not isinstance(part.get("text"), str):
            raise invalid(f"{param}[{i}].text must be a string", param)
        texts.append(part["text"])
    return separator.join(texts)


def parse_prompt(prompt: Any) -> str | tuple[int, ...]:
    """A completions prompt: a string, [string], or a list of token ids."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if prompt and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
        return tuple(prompt)
    raise invalid("'prompt' must be a string, a list holding one string, or a non-empty list of token ids", "prompt")


class ChatWriter(Writer):
    """OpenAI's /v1/chat/completions and /v1/completions: a choice; a stream of data-only chunks and [DONE]."""

    def __init__(self, job: Job, model: str, scanner: ToolCallScanner | None, index: int = 0,
                 head: dict | None = None, ends: bool = True):
        super().__init__(job, model, scanner)
        self.chat = self.request.endpoint == "chat"
        self.index = index             # this choice's index
        self.ends = ends               # its finish ends the stream (usage, [DONE]); not so among several choices
        self.offsets = TextOffsets()   # for completions' text_offset across chunks
        self.head = head or {"id": new_id("chatcmpl-" if self.chat else "cmpl-"),
                             "object": "chat.completion.chunk" if self.chat else "text_completion",
                             "created": self.created, "model": model}

    def _chunk(self, choice: dict | None, **extra: Any) -> bytes:
        return sse_event({**self.head, "choices": [choice] if choice else [], **extra})

    def _choice(self, delta: dict | None = None, text: str = "", logprobs: dict | None = None,
                finish_reason: str | None = None) -> dict:
        content = {"delta": delta or {}} if self.chat else {"text": text}
        return {"index": self.index, **content, "logprobs": logprobs, "finish_reason": finish_reason}

    def opening(self) -> bytes:
        """Chat opens with the assistant role and empty content; completions with nothing."""
        return self._chunk(self._choice({"role": "assistant", "content": ""})) if self.chat else b""

    def reasoning(self, text: str) -> bytes:
        """A chat chunk carrying reasoning under both names clients read: DeepSeek's and llama-server's,
        and vLLM's, OpenRouter's and mlx_lm's."""
        return self._chunk(self._choice({"reasoning_content": text, "reasoning": text}))

    def text(self, text: str, logprobs: list[dict]) -> bytes:
        """A chunk carrying one piece of generated text (and its tokens' logprobs, when asked)."""
        wanted = self.request.logprobs is not None
        lp = logprobs_object(self.request.endpoint, logprobs, self.offsets) if wanted else None
        return self._chunk(self._choice({"content": text}, text, lp))

    def call_start(self, call_id: str, name: str) -> bytes:
        """A chunk opening a tool call (numbered in the order they came): id, name, no arguments yet."""
        delta = {"index": self.calls_sent - 1, "id": call_id, "type": "function",
                 "function": {"name": name, "arguments": ""}}
        return self._chunk(self._choice({"tool_calls": [delta]}))

    def call_args(self, text: str) -> bytes:
        """A chunk carrying a piece of the open call's arguments."""
        return self._chunk(self._choice({"tool_calls": [{"index": self.calls_sent - 1,
                                                         "function": {"arguments": text}}]}))

    def call_end(self, call: dict) -> bytes:
        """Nothing: a chat stream has no event for a call's end."""
        return b""

    def finish(self, reason: str) -> bytes:
        """The finish chunk (a reply that made tool calls finishes as "tool_calls"), usage when asked, [DONE]."""
        if self.calls_sent and reason == "stop":
            reason = "tool_calls"
        return self._chunk(self._choice(finish_reason=reason)) + (self.ending() if self.ends else b"")

    def ending(self) -> bytes:
        """What ends the stream once every choice has finished: the usage chunk when asked, then [DONE]."""
        return (self._chunk(None, usage=usage_of(self.job)) if self.request.include_usage else b"") + SSE_DONE

    def failure(self, error: APIError) -> bytes:
        """A failure after the stream's headers: OpenAI's error object as one event, then [DONE]."""
        return sse_event(error.body()) + SSE_DONE

    def body(self, text: str, calls: list[dict], reason: str, logprobs: list[dict], reasoning: str) -> dict:
        """A chat.completion (tool calls and reasoning in the message) or a text_completion."""
        endpoint = self.request.endpoint
        lp = logprobs_object(endpoint, logprobs if self.request.logprobs is not None else None)
        if not self.chat:
            choice = {"index": self.index, "text": text, "logprobs": lp, "finish_reason": reason}
            return {**self.head, "object": "text_completion", "choices": [choice], "usage": usage_of(self.job)}
        message = {"role": "assistant", "content": text}
        if calls:
            message = {"role": "assistant", "content": text if text.strip() else None, "tool_calls": list(calls)}
            reason = "tool_calls" if reason == "stop" else reason
        if reasoning:
            message.update(reasoning_content=reasoning, reasoning=reasoning)
        choice = {"index": self.index, "message": message, "logprobs": lp, "finish_reason": reason}
        return {**self.head, "object": "chat.completion", "choices": [choice], "usage": usage_of(self.job)}


class ChoicesWriter(Writer):
    """A chat or completions request's n choices: one ChatWriter per choice, their chunks one stream.

    The choices share the stream's id; each streams and finishes on its own
    (its `index` in every chunk), and the usage chunk and [DONE] come once,
    after the last finish. Usage sums the choices' tokens, the prompt once.
    """

    def __init__(self, writers: list[ChatWriter]):
        super().__init__(writers[0].job, writers[0].model, None)
        self.writers = writers
        self.finished = 0

    def opening(self) -> bytes:
        """Every choice's opening, in choice order."""
        return b"".join(writer.opening() for writer in self.writers)

    def event(self, kind: str, value: str, logprobs: list[dict] = (), choice: int = 0) -> bytes:
        """The event routed to its choice's writer; the stream's end goes out after the last choice finishes."""
        out = self.writers[choice].event(kind, value, logprobs)
        self.finished += kind == "finish"
        return out + (self.writers[0].ending() if kind == "finish" and self.finished == len(self.writers) else b"")

    def failure(self, error: APIError) -> bytes:
        """A failure ends the whole stream once, through the first choice's writer."""
        return self.writers[0].failure(error)

    def reply(self, results: list[tuple[str, str, list[dict], str]]) -> dict:
        """The non-streaming body: each choice written by its own writer, merged into one choices list."""
        bodies = [writer.reply([result]) for writer, result in zip(self.writers, results)]
        return {**bodies[0], "choices": [body["choices"][0] for body in bodies]}


# ---------------------------------------------------------------------------
# Dialects: Anthropic messages (/v1/messages)
# ---------------------------------------------------------------------------

MESSAGES_CHECKS = common_checks("model", "stream", "max_tokens", "top_p", "top_k") + (
    Check("messages", (list,), "a non-empty list of messages", lambda v: len(v) > 0),
    Check("system", (str, list), "a string or a list of text blocks"),
    Check("stop_sequences", (list,), f"a list of up to {MAX_STOP_SEQUENCES} strings, each 1 to {MAX_STOP_CHARS} "
          "characters long", lambda v: len(v) <= MAX_STOP_SEQUENCES and all(
              isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in v)),
    Check("temperature", (int, float), "a number between 0 and 1", lambda v: 0 <= v <= 1),  # Anthropic's range
    Check("tools", (list,), 'a list of {"name": ..., "input_schema": {...}} objects'),
    Check("tool_choice", (dict,), '{"type": "auto"}, {"type": "any"}, {"type": "tool", "name": ...} or {"type": "none"}'),
    Check("thinking", (dict,), '{"type": "enabled", "budget_tokens": N}, {"type": "adaptive"} or {"type": "disabled"}'),
)
ANTHROPIC_ROLES = ("user", "assistant", "system")   # Claude Code sends "system" messages mid-conversation
REPLAYED_BLOCKS = ("thinking", "redacted_thinking")  # earlier reasoning sent back: thinking reaches the template
THINKING_ON = ("enabled", "adaptive")                # thinking types that ask for thinking blocks


def parse_messages_request(body: dict, settings: Settings, counting: bool = False) -> GenerationRequest:
    """Validate an Anthropic /v1/messages body; for count_tokens (`counting`) max_tokens may be absent."""
    run_checks(body, MESSAGES_CHECKS)
    if body.get("messages") is None:
        raise invalid("'messages' is required", "messages")
    if body.get("max_tokens") is None and not counting:
        raise invalid("'max_tokens' is required", "max_tokens")
    tools = body.get("tools") or []
    catalog = {t["function"]["name"]: t for t in dialect_tools(tools, "input_schema", anthropic_served, deferred=True)}
    messages, seen_calls = anthropic_system(body.get("system")), set()
    for i, message in enumerate(body["messages"]):
        messages += anthropic_message(message, i, seen_calls, catalog)
    prefill = messages[-1]["role"] == "assistant"
    if prefill:
        anthropic_prefill(messages[-1], body, f"messages[{len(body['messages']) - 1}]")
    choice = body.get("tool_choice")
    fields = {"tools": dialect_tools(tools, "input_schema", anthropic_served),
              "tool_choice": anthropic_tool_choice(choice),
              "parallel_tool_calls": not (isinstance(choice, dict) and choice.get("disable_parallel_tool_use") is True)}
    thinking = anthropic_thinking(body.get("thinking"), body.get("max_tokens"))
    return GenerationRequest(
        endpoint="messages", messages=tuple(messages), prefill=prefill, stream=bool(body.get("stream")),
        max_tokens=min(body.get("max_tokens") or settings.max_tokens, settings.max_tokens),
        stop=tuple(body.get("stop_sequences") or ()),
        template_args=template_args({"chat_template_kwargs": None if thinking else {"enable_thinking": False}},
                                    settings),
        split_reasoning=settings.reasoning_format != "none", show_reasoning=thinking,
        thinking_budget=body["thinking"].get("budget_tokens") or 0 if thinking else 0,
        **output_fields("messages", fields),
        **sampling_fields({field: body.get(field) for field in ("temperature", "top_p", "top_k")}, settings.sampling))


def anthropic_prefill(last: dict, body: dict, param: str) -> None:
    """Refuse a prefill (a last assistant message) that Anthropic's API refuses: with tool use, with
    thinking on, or ending in whitespace; the reply continues its text and holds only what follows."""
    if last.get("tool_calls"):
        raise invalid("a final assistant message with tool_use blocks needs their tool_result; a prefill "
                      "is text only", param)
    if ((body.get("thinking") or {}).get("type")) in THINKING_ON:
        raise invalid("a prefilled final assistant message is not supported with thinking on", param)
    if last["content"] != last["content"].rstrip():
        raise invalid("final assistant content cannot end with trailing whitespace", param)


def anthropic_served(tool: dict) -> bool:
    """Anthropic's client tools (no type, or "custom"); server tools (web search...) are the API's own."""
    return tool.get("type") in (None, "custom")


def anthropic_thinking(thinking: dict | None, max_tokens: int | None) -> bool:
    """Whether the request asked for thinking blocks; a budget Anthropic would refuse is a 400.

    Absent or {"type": "disabled"}: no thinking (the template is asked not to
    think, and what a model thinks anyway is not shown). {"type": "enabled"}
    needs budget_tokens >= THINKING_MIN_BUDGET and below max_tokens.
    """
    kind = (thinking or {}).get("type")
    if kind in (None, "disabled"):
        return False
    if kind not in THINKING_ON:
        raise invalid("'thinking.type' must be \"enabled\", \"adaptive\" or \"disabled\"", "thinking.type")
    budget = thinking.get("budget_tokens")
    if kind == "enabled":
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < THINKING_MIN_BUDGET:
            raise invalid(f"'thinking.budget_tokens' must be an integer >= {THINKING_MIN_BUDGET}",
                          "thinking.budget_tokens")
        if max_tokens is not None and budget >= max_tokens:
            raise invalid(f"'max_tokens' must be greater than 'thinking.budget_tokens' ({budget})", "max_tokens")
    return True


def anthropic_system(system: str | list | None) -> list[dict]:
    """The top-level system prompt (a string or text blocks) as a leading system message, if there is one."""
    if not system:
        return []
    return [{"role": "system", "content": parse_content(system, "system", separator=BLOCK_SEPARATOR)}]


def anthropic_message(message: Any, index: int, seen_calls: set, catalog: dict[str, dict]) -> list[dict]:
    """One Anthropic message as chat messages: its tool_result blocks as "tool" messages, then the rest.

    Text blocks (and documents with a text source) are joined; an
    assistant's tool_use blocks become its tool_calls, their ids added to
    `seen_calls`, which a tool_result must answer; replayed thinking blocks
    its reasoning_content; images and other documents are refused (text models only).
    `catalog` holds every declared tool by name, for tool_reference blocks.
    """
    param = f"messages[{index}]"
    if not isinstance(message, dict) or message.get("role") not in ANTHROPIC_ROLES:
        raise invalid(f"{param} must be an object with 'role' (user or assistant) and 'content'", param)
    role, content = message["role"], message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise invalid(f"{param}.content must be a string or a list of content blocks", f"{param}.content")
    texts, calls, results, thoughts = [], [], [], []
    for i, block in enumerate(content):
        where = f"{param}.content[{i}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "document" and document_text(block) is not None:
            texts.append(document_text(block))
        elif kind == "tool_use" and role == "assistant":
            calls.append(anthropic_tool_use(block, where))
            seen_calls.add(calls[-1]["id"])
        elif kind == "tool_result" and role == "user":
            results.append(anthropic_tool_result(block, where, seen_calls, catalog))
        elif kind == "thinking" and role == "assistant" and isinstance(block.get("thinking"), str):
            thoughts.append(block["thinking"])
        elif kind in MEDIA_PARTS:
            raise invalid(f"{where} is a block of type {kind!r}; this server serves text models only (a document "
                          "needs a text source)", where)
        elif kind not in REPLAYED_BLOCKS:
            raise invalid(f"{where}: a {role} message cannot hold a {json.dumps(kind)[:40]} block; this server takes "
                          "text, document (text source), tool_use (assistant), tool_result (user), thinking and "
                          "redacted_thinking", where)
    rest = {"role": role, "content": BLOCK_SEPARATOR.join(texts)}
    if thoughts:   # replayed reasoning: templates that render it get it, as from chat's reasoning_content
        rest["reasoning_content"] = "\n\n".join(thoughts)
    if calls:
        rest["tool_calls"] = calls
    return results + ([rest] if texts or calls or not results else [])


def document_text(block: dict) -> str | None:
    """A document block's text when its source is plain text ("text") or text blocks ("content"), else None."""
    source = block.get("source") if isinstance(block.get("source"), dict) else {}
    if source.get("type") == "text" and isinstance(source.get("data"), str):
        text = source["data"]
    elif source.get("type") == "content" and isinstance(source.get("content"), (str, list)):
        try:
            text = parse_content(source["content"], "source.content", separator=BLOCK_SEPARATOR)
        except APIError:
            return None
    else:
        return None
    title = block.get("title")
    return f"{title}\n{text}" if isinstance(title, str) and title else text


def anthropic_tool_use(block: dict, param: str) -> dict:
    """An assistant's tool_use block as an OpenAI tool call, arguments as an object (for the chat template)."""
    if not isinstance(block.get("name"), str) or not isinstance(block.get("id"), str):
        raise invalid(f"{param} must be {{\"type\": \"tool_use\", \"id\": ..., \"name\": ..., \"input\": {{...}}}}", param)
    return {"id": block["id"], "type": "function",
            "function": {"name": block["name"], "arguments": tool_arguments(block.get("input") or {})}}


def anthropic_tool_result(block: dict, param: str, seen_calls: set, catalog: dict[str, dict]) -> dict:
    """A user's tool_result block as a "tool" message; a failed call's result says it is an error.

    It must answer a tool_use sent earlier, as Anthropic requires. Its
    tool_reference blocks (Claude Code's ToolSearch loading a deferred tool)
    become the referenced tool's definition, as text where the result stands.
    """
    if not isinstance(block.get("tool_use_id"), str):
        raise invalid(f"{param}.tool_use_id must be a string", param)
    if block["tool_use_id"] not in seen_calls:
        raise invalid(f"{param}.tool_use_id {block['tool_use_id'][:80]!r} answers no tool_use block of an earlier "
                      "assistant message", f"{param}.tool_use_id")
    content = block.get("content")
    if isinstance(content, list):
        content = [tool_result_part(part, catalog, f"{param}.content[{i}]") for i, part in enumerate(content)]
    text = "" if content is None else parse_content(content, f"{param}.content", separator=BLOCK_SEPARATOR)
    return {"role": "tool", "tool_call_id": block["tool_use_id"],
            "content": f"Error: {text}" if block.get("is_error") else text}


def tool_result_part(part: Any, catalog: dict[str, dict], param: str) -> Any:
    """A tool_result's block as a text block where it holds text: a tool_reference becomes the definition
    of the tool it names, a document its text; other blocks are left for parse_content to judge."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "document" and document_text(part) is not None:
        return {"type": "text", "text": document_text(part)}
    if kind != "tool_reference":
        return part
    tool = catalog.get(part.get("tool_name"))
    if tool is None:
        raise invalid(f"{param} references tool {json.dumps(part.get('tool_name'))[:80]}, which 'tools' does not "
                      "declare", param)
    return {"type": "text", "text": "Tool loaded: " + json.dumps(tool["function"], ensure_ascii=False)}


def anthropic_tool_choice(choice: dict | None) -> str | dict | None:
    """Anthropic's tool_choice in chat's terms: auto, any (= required), tool (one named function), none."""
    kind = None if choice is None else choice.get("type")
    if kind in (None, "auto", "none"):
        return kind
    if kind == "any":
        return "required"
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise invalid("'tool_choice' must be {\"type\": \"auto\"}, {\"type\": \"any\"}, {\"type\": \"tool\", \"name\": ...} "
                  "or {\"type\": \"none\"}", "tool_choice")


def dialect_tools(tools: list, schema_field: str, served: Callable[[dict], bool], deferred: bool = False) -> list[dict]:
    """A dialect's tool list as OpenAI function tools.

    Tools that `served` turns down (hosted web search, shells: things a
    local model cannot run) are skipped, not refused: agents send them on
    every request. Each kept tool has a name and, under `schema_field`, a
    JSON Schema for its arguments. Tools marked defer_loading are left out
    unless `deferred` (they reach the model through a tool_reference).
    """
    out = []
    for i, tool in enumerate(tools):
        param = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise invalid(f"'{param}' must be an object", param)
        if not served(tool) or (tool.get("defer_loading") is True and not deferred):
            continue
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise invalid(f"'{param}.name' must be a non-empty string", f"{param}.name")
        schema = tool.get(schema_field)
        if schema is not None and not isinstance(schema, dict):
            raise invalid(f"'{param}.{schema_field}' must be a JSON Schema object", f"{param}.{schema_field}")
        function = {"name": tool["name"], "parameters": schema or {"type": "object", "properties": {}}}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        if tool.get("strict") is True:  # both dialects mark a tool strict as chat does (ToolCallRule)
            function["strict"] = True
        out.append({"type": "function", "function": function})
    return out


def anthropic_usage(job: Job) -> dict:
    """Anthropic's usage: input_tokens counts only the prompt tokens not read from the cache.

    input_tokens + cache_read_input_tokens is the whole prompt (what
    count_tokens returns), as Anthropic counts it. Every prompt is cached
    without asking, so nothing is reported as a cache write.
    """
    return {"input_tokens": job.prompt_tokens - job.cached_tokens, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": job.cached_tokens, "output_tokens": job.completion_tokens}


def tool_use_block(call: dict) -> dict:
    """A parsed tool call (OpenAI's shape, arguments as JSON text) as Anthropic's tool_use block."""
    try:
        arguments = json.loads(call["function"]["arguments"])
    except ValueError:
        arguments = None
    return {"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
            "input": arguments if isinstance(arguments, dict) else {}}


SIGNATURE_KEY = secrets.token_bytes(32)   # signs this process's thinking blocks; a restart makes new ones


def thinking_signature(text: str) -> str:
    """The signature of a thinking block, opaque as Anthropic's: an HMAC of its text, in base64."""
    return base64.b64encode(hmac.new(SIGNATURE_KEY, text.encode(), "sha256").digest()).decode()


class MessagesWriter(Writer):
    """Anthropic's /v1/messages: a message of content blocks; a stream of named events.

    A stream is message_start (and a ping), then per content block
    content_block_start, its deltas and content_block_stop, then
    message_delta (stop reason, final usage) and message_stop. Another kind
    of block is one more `_start` with its own delta type.
    """

    keepalive = sse_event({"type": "ping"}, "ping")
    opens_when_admitted = True   # message_start carries the prompt's cache use, known once the engine takes the job

    def __init__(self, job: Job, model: str, scanner: ToolCallScanner | None):
        super().__init__(job, model, scanner)
        self.id = new_id("msg_")
        self.blocks = 0                      # content blocks started so far
        self.open_block: str | None = None   # the type of the block being streamed, if one is open
        self.thought = ""                    # the open thinking block's text, for its signature

    def _event(self, name: str, **fields: Any) -> bytes:
        return sse_event({"type": name, **fields}, name)

    def _start(self, block: dict) -> bytes:
        """Close the open block, if any, and open `block` as the next one."""
        out = self._stop()
        self.open_block, self.blocks = block["type"], self.blocks + 1
        return out + self._event("content_block_start", index=self.blocks - 1, content_block=block)

    def _stop(self) -> bytes:
        if self.open_block is None:
            return b""
        # A thinking block ends with its signature, as Anthropic's do.
        signed = (self._delta({"type": "signature_delta", "signature": thinking_signature(self.thought)})
                  if self.open_block == "thinking" else b"")
        self.open_block = None
        return signed + self._event("content_block_stop", index=self.blocks - 1)

    def _delta(self, delta: dict) -> bytes:
        return self._event("content_block_delta", index=self.blocks - 1, delta=delta)

    def opening(self) -> bytes:
        """message_start (with the prompt's usage), then a ping so the SDK sees the stream alive."""
        return self._event("message_start", message=self._message([], None, None)) + self.keepalive

    def reasoning(self, text: str) -> bytes:
        """A thinking block's delta; opens the block first when another one is open."""
        opening = b"" if self.open_block == "thinking" else self._start({"type": "thinking", "thinking": "",
                                                                          "signature": ""})
        self.thought = text if opening else self.thought + text
        return opening + self._delta({"type": "thinking_delta", "thinking": text})

    def text(self, text: str, logprobs: list[dict]) -> bytes:
        """A text block's delta; opens the block first when another one is open."""
        opening = b"" if self.open_block == "text" else self._start({"type": "text", "text": ""})
        return opening + self._delta({"type": "text_delta", "text": text})

    def call_start(self, call_id: str, name: str) -> bytes:
        """A tool_use block opens, its input empty: it comes as input_json_delta pieces."""
        return self._start({"type": "tool_use", "id": call_id, "name": name, "input": {}})

    def call_args(self, text: str) -> bytes:
        """A piece of the tool_use block's input, as the model writes it."""
        return self._delta({"type": "input_json_delta", "partial_json": text})

    def call_end(self, call: dict) -> bytes:
        """The tool_use block closes."""
        return self._stop()

    def finish(self, reason: str) -> bytes:
        """Closes the open block, then message_delta (stop reason, usage) and message_stop."""
        stop_reason, stop_sequence = self._stop_reason(reason, self.calls_sent > 0)
        return (self._stop() + self._event("message_delta", usage=anthropic_usage(self.job),
                                           delta={"stop_reason": stop_reason, "stop_sequence": stop_sequence})
                + self._event("message_stop"))

    def failure(self, error: APIError) -> bytes:
        """A failure after the headers: Anthropic's error event, with the same error object as a 4xx/5xx body."""
        return self._event("error", error=error.anthropic_error())

    def body(self, text: str, calls: list[dict], reason: str, logprobs: list[dict], reasoning: str) -> dict:
        """The non-streaming message: thinking (signed), text and tool_use blocks, stop reason and usage."""
        content = [{"type": "thinking", "thinking": reasoning, "signature": thinking_signature(reasoning)}] \
            if reasoning else []
        content += [{"type": "text", "text": text}] if text.strip() or (text and not calls) else []
        content += [tool_use_block(call) for call in calls]
        return self._message(content, *self._stop_reason(reason, bool(calls)))

    def _message(self, content: list[dict], stop_reason: str | None, stop_sequence: str | None) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": stop_reason, "stop_sequence": stop_sequence, "usage": anthropic_usage(self.job)}

    def _stop_reason(self, reason: str, called: bool) -> tuple[str, str | None]:
        """(stop_reason, stop_sequence): the token budget, a stop sequence, a tool call, or the model's own end."""
        if reason == "length":
            return "max_tokens", None
        if self.job.stop_string is not None:
            return "stop_sequence", self.job.stop_string
        return ("tool_use" if called else "end_turn"), None


# ---------------------------------------------------------------------------
# Dialects: OpenAI Responses (/v1/responses)
# ---------------------------------------------------------------------------

RESPONSES_CHECKS = common_checks("model", "stream", "temperature", "top_p") + (
    Check("input", (str, list), "a string or a non-empty list of input items",
          lambda v: isinstance(v, str) or len(v) > 0),
    Check("instructions", (str,), "a string"),
    Check("max_output_tokens", (int,), "an integer >= 1", lambda v: v >= 1),
    Check("tools", (list,), 'a list of tools such as {"type": "function", "name": ..., "parameters": {...}}'),
    Check("tool_choice", (str, dict), '"none", "auto", "required" or {"type": "function", "name": ...}'),
    Check("parallel_tool_calls", (bool,), "a boolean"),
    Check("text", (dict,), 'an object such as {"format": {"type": "text"}}'),
    Check("metadata", (dict,), "an object of up to 16 string values",
          lambda v: len(v) <= 16 and all(isinstance(x, str) for x in v.values())),
    Check("store", (bool,), "a boolean"),
    Check("previous_response_id", (str,), "the id of a response made with store: true"),
    Check("reasoning", (dict,), 'an object such as {"effort": "low"}'),
)
# Fields that need state this server does not keep: refused by name.
STATEFUL_FIELDS = {"conversation": None, "background": False}
RESPONSES_ROLES = ("user", "assistant", "system", "developer")
RESPONSES_TEXT_PARTS = ("input_text", "output_text", "text")
# Tools the API runs itself: a local model cannot, so they are left out of the prompt (and named once in the log).
HOSTED_TOOLS = ("web_search", "web_search_preview", "web_search_2025_08_26", "web_search_preview_2025_03_11",
                "file_search", "computer_use_preview", "computer", "code_interpreter", "image_generation", "mcp",
                "local_shell", "shell", "apply_patch", "tool_search")
CUSTOM_TOOL_PARAMETERS = {"type": "object", "properties": {RAW_ARGUMENTS_KEY: {"type": "string"}},
                          "required": [RAW_ARGUMENTS_KEY]}  # a freeform tool, rendered as a function of one string
NAMESPACE_SEPARATOR = "__"   # a namespace's tool is rendered as NAMESPACE__NAME
_hosted_logged: set = set()  # hosted tool types already named in the log


def parse_responses_request(body: dict, settings: Settings, previous: list[dict] | None = None) -> GenerationRequest:
    """Validate an OpenAI /v1/responses body. `previous` is the conversation of previous_response_id
    (the handler looks it up in the store), else the whole conversation is in `input`."""
    run_checks(body, RESPONSES_CHECKS)
    for field, harmless in STATEFUL_FIELDS.items():
        if body.get(field) not in (None, harmless):
            raise invalid(f"'{field}' is not supported: this server keeps no conversations or background jobs; "
                          "send the conversation in 'input' or chain responses with previous_response_id", field,
                          "unsupported_parameter")
    if body.get("input") is None:
        raise invalid("'input' is required", "input")
    tools, kinds = responses_tools(body.get("tools") or [])
    messages = [{"role": "system", "content": body["instructions"]}] if body.get("instructions") else []
    messages += (previous or []) + responses_input(body["input"], kinds)
    fields = {"tools": tools, "tool_choice": responses_tool_choice(body.get("tool_choice"), kinds),
              "response_format": responses_format((body.get("text") or {}).get("format")),
              "parallel_tool_calls": body.get("parallel_tool_calls")}
    effort = (body.get("reasoning") or {}).get("effort")
    args = {"reasoning_effort": effort} if isinstance(effort, str) else {}
    last = messages[-1] if messages else {}
    if effort == "none":  # asked not to reason: templates that can switch thinking off do
        args["chat_template_kwargs"] = {"enable_thinking": False}
    return GenerationRequest(
        endpoint="responses", messages=tuple(messages), stream=bool(body.get("stream")),
        prefill=last.get("role") == "assistant" and not last.get("tool_calls"),
        max_tokens=min(body.get("max_output_tokens") or settings.max_tokens, settings.max_tokens),
        template_args=template_args(args, settings), split_reasoning=settings.reasoning_format != "none",
        show_reasoning=effort != "none", echo=responses_echo(body), tool_kinds=kinds,
        **output_fields("responses", fields, "text.format"),
        **sampling_fields({field: body.get(field) for field in ("temperature", "top_p")}, settings.sampling))


def responses_echo(body: dict) -> dict:
    """What the response object repeats of the request, as OpenAI's does."""
    text = body.get("text") if isinstance(body.get("text"), dict) else {}
    return {"instructions": body.get("instructions"), "metadata": body.get("metadata") or {},
            "text": {"format": text.get("format") or {"type": "text"}, "verbosity": text.get("verbosity") or "medium"},
            "tool_choice": body.get("tool_choice") or "auto", "parallel_tool_calls": body.get("parallel_tool_calls",
                                                                                             True) is not False,
            "store": body.get("store") is not False, "previous_response_id": body.get("previous_response_id"),
            "tools": [t for t in body.get("tools") or [] if isinstance(t, dict)],
            "reasoning": body.get("reasoning")}


def responses_tools(tools: list) -> tuple[list[dict], dict]:
    """The Responses tools as function tools, and each rendered name's kind and namespace.

    function tools are kept; custom (freeform) tools become functions of one
    string; a namespace's tools are flattened to NAMESPACE__NAME; hosted
    tools (web search, file search, computer use...) are left out and named
    once in the log.
    """
    out, kinds = [], {}
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        group = tool.get("tools") if kind == "namespace" else [tool]
        if kind == "namespace" and not (isinstance(group, list) and isinstance(tool.get("name"), str)):
            raise invalid(f"'tools[{i}]' must be {{\"type\": \"namespace\", \"name\": ..., \"tools\": [...]}}",
                          f"tools[{i}]")
        for j, member in enumerate(group):
            param = f"tools[{i}]" + (f".tools[{j}]" if kind == "namespace" else "")
            member_kind = member.get("type") if isinstance(member, dict) else None
            if member_kind not in ("function", "custom"):
                if member_kind in HOSTED_TOOLS and member_kind not in _hosted_logged:
                    _hosted_logged.add(member_kind)
                    log.info("tools of type %r are run by OpenAI's servers, not this one: left out of the prompt",
                             member_kind)
                elif not isinstance(member, dict):
                    raise invalid(f"'{param}' must be an object", param)
                continue
            schema = CUSTOM_TOOL_PARAMETERS if member_kind == "custom" else member.get("parameters")
            # No tool_search here to load a deferred tool later: every tool is rendered from the start.
            (function,) = dialect_tools([{**member, "parameters": schema}], "parameters", lambda t: True, deferred=True)
            name = function["function"]["name"]
            rendered = f"{tool['name']}{NAMESPACE_SEPARATOR}{name}" if kind == "namespace" else name
            function["function"]["name"] = rendered
            kinds[rendered] = {"kind": member_kind, "name": name, "namespace": tool["name"] if kind == "namespace"
                               else None}
            out.append(function)
    return out, kinds


def responses_input(items: str | list, kinds: dict | None = None) -> list[dict]:
    """Input items as chat messages: messages, function and custom tool calls (joined to their assistant
    turn), their outputs. Reasoning items sent back become the next assistant turn's reasoning_content; other kinds are refused."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict] = []
    thoughts: list[str] = []   # reasoning items not yet given to an assistant turn
    for i, item in enumerate(items):
        param = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            messages.append(responses_message(item, param))
        elif kind in ("function_call", "custom_tool_call"):
            call = responses_call(item, param, kind)
            if messages and messages[-1]["role"] == "assistant":
                messages[-1]["tool_calls"] = messages[-1].get("tool_calls", []) + [call]
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "reasoning":
            thoughts.append(reasoning_item_text(item))
        elif kind in ("function_call_output", "custom_tool_call_output"):
            messages.append(responses_call_output(item, param))
        else:
            raise invalid(f"{param} is a {json.dumps(kind)[:40]} item; this server takes message, function_call, "
                          "custom_tool_call, their outputs, and reasoning items", param)
        if thoughts and kind != "reasoning" and messages[-1]["role"] == "assistant":
            messages[-1].setdefault("reasoning_content", "\n\n".join(thoughts))
            thoughts = []
    return messages


def reasoning_item_text(item: dict) -> str:
    """A reasoning item's text: its reasoning_text parts, else its summary (encrypted content is not ours to read)."""
    def texts(parts: Any, kind: str) -> list[str]:
        return [p["text"] for p in parts or () if isinstance(p, dict) and p.get("type") == kind
                and isinstance(p.get("text"), str)]
    return "\n\n".join(texts(item.get("content"), "reasoning_text") or texts(item.get("summary"), "summary_text"))


def responses_call(item: dict, param: str, kind: str) -> dict:
    """A replayed function_call or custom_tool_call item as a chat tool call, named as the tools render it."""
    name = item.get("name")
    if isinstance(name, str) and isinstance(item.get("namespace"), str):
        name = f"{item['namespace']}{NAMESPACE_SEPARATOR}{name}"
    arguments = item.get("arguments")
    if kind == "custom_tool_call":
        arguments = {RAW_ARGUMENTS_KEY: item.get("input") if isinstance(item.get("input"), str) else ""}
    return parse_tool_calls([{"id": item.get("call_id"), "type": "function", "function": {
        "name": name, "arguments": arguments}}], param)[0]


def responses_message(item: dict, param: str) -> dict:
    """A message item; a developer message is a system message, as in chat."""
    role = item.get("role")
    if role not in RESPONSES_ROLES:
        raise invalid(f"{param}.role must be one of {', '.join(RESPONSES_ROLES)}, got {json.dumps(role)[:40]}",
                      f"{param}.role")
    content = parse_content(item.get("content"), f"{param}.content", text_types=RESPONSES_TEXT_PARTS,
                            separator=BLOCK_SEPARATOR)
    return {"role": chat_role(role), "content": content}


def responses_call_output(item: dict, param: str) -> dict:
    """A function_call_output (or custom_tool_call_output) item as a "tool" message answering its call_id."""
    if not isinstance(item.get("call_id"), str):
        raise invalid(f"{param}.call_id must be a string", f"{param}.call_id")
    output = item.get("output")
    text = parse_content("" if output is None else output, f"{param}.output", text_types=RESPONSES_TEXT_PARTS,
                         separator=BLOCK_SEPARATOR)
    return {"role": "tool", "tool_call_id": item["call_id"], "content": text}


def responses_tool_choice(choice: str | dict | None, kinds: dict) -> str | dict | None:
    """The Responses tool_choice in chat's terms ({"type": "function" or "custom", "name"} names one tool).

    Forcing a hosted tool, which this server cannot run, is a 400 naming it.
    """
    if choice is None or choice in ("none", "auto", "required"):
        return choice
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind in HOSTED_TOOLS:
        raise invalid(f"'tool_choice' forces the hosted tool {kind!r}, which OpenAI's servers run and this server "
                      "cannot; offer it without forcing it", "tool_choice")
    if kind in ("function", "custom") and isinstance(choice.get("name"), str):
        name = choice["name"]
        if isinstance(choice.get("namespace"), str):
            name = f"{choice['namespace']}{NAMESPACE_SEPARATOR}{name}"
        return {"type": "function", "function": {"name": name}}
    raise invalid("'tool_choice' must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"name\": ...}",
                  "tool_choice")


def responses_format(value: Any) -> dict | None:
    """text.format in chat's response_format shape: text, json_object or json_schema (name and schema inline)."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind == "json_schema" and isinstance(value.get("schema"), dict):
        return {"type": "json_schema", "json_schema": {"name": value.get("name"), "schema": value["schema"]}}
    raise invalid("'text.format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                  "{\"type\": \"json_schema\", \"name\": ..., \"schema\": {...}}", "text.format")


def responses_usage(job: Job) -> dict:
    """The Responses API's usage: input_tokens is the whole prompt, cached_tokens the part reused."""
    return {"input_tokens": job.prompt_tokens,
            "input_tokens_details": {"cached_tokens": job.cached_tokens, "cache_write_tokens": 0},
            "output_tokens": job.completion_tokens, "output_tokens_details": {"reasoning_tokens": job.reasoning_tokens},
            "total_tokens": job.prompt_tokens + job.completion_tokens}


def output_text_part(text: str) -> dict:
    """A Responses output_text content part holding text (no annotations or logprobs)."""
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(text: str, status: str = "completed") -> dict:
    """An assistant message output item holding `text` (no content part yet while in progress)."""
    content = [output_text_part(text)] if status != "in_progress" else []
    return {"id": new_id("msg_"), "type": "message", "status": status, "role": "assistant", "content": content}


def reasoning_item(text: str, status: str = "completed") -> dict:
    """A reasoning output item: the model's reasoning as one reasoning_text part (none yet while in progress)."""
    content = [{"type": "reasoning_text", "text": text}] if status != "in_progress" else []
    return {"id": new_id("rs_"), "type": "reasoning", "summary": [], "content": content, "status": status}


def function_call_item(call: dict, kinds: dict) -> dict:
    """A parsed tool call (OpenAI chat's shape) as a function_call output item, or a custom_tool_call one
    (its raw input) for a custom tool; a namespace's tool under its own name and namespace."""
    rendered, arguments = call["function"]["name"], call["function"]["arguments"]
    kind = kinds.get(rendered) or {"kind": "function", "name": rendered, "namespace": None}
    named = {"name": kind["name"], **({"namespace": kind["namespace"]} if kind["namespace"] else {})}
    if kind["kind"] == "custom":
        parsed = json.loads(arguments)
        raw = parsed[RAW_ARGUMENTS_KEY] if list(parsed) == [RAW_ARGUMENTS_KEY] and isinstance(
            parsed[RAW_ARGUMENTS_KEY], str) else arguments
        return {"id": new_id("ctc_"), "type": "custom_tool_call", "call_id": call["id"], **named, "input": raw}
    return {"id": new_id("fc_"), "type": "function_call", "status": "completed", "call_id": call["id"],
            **named, "arguments": arguments}


def response_error(error: APIError) -> dict:
    """A failure as the Responses API's error object: its code is one of that API's codes."""
    code = "rate_limit_exceeded" if error.status == HTTPStatus.TOO_MANY_REQUESTS else "server_error"
    return {"code": code, "message": error.message}


class ResponsesWriter(Writer):
    """OpenAI's /v1/responses: a response of output items; a stream of typed events with sequence numbers.

    A stream is response.created and response.in_progress, then each output
    item between response.output_item.added and response.output_item.done
    (a message's text as one output_text part; a function call's arguments,
    a custom tool call's input), then response.completed, or
    response.incomplete when the token budget ran out (the item it cut is
    "incomplete" too). The finished response is kept in `final` (for the store).
    """

    def __init__(self, job: Job, model: str, scanner: ToolCallScanner | None):
        super().__init__(job, model, scanner)
        self.id = new_id("resp_")
        self.sequence = 0
        self.output: list[dict] = []         # items finished so far
        self.message: dict | None = None     # the message item being streamed, if one is open
        self.message_text = ""
        self.thought: dict | None = None     # the reasoning item being streamed, if one is open
        self.thought_text = ""
        self.live_item: dict | None = None   # the function_call item being streamed, if one is open
        self.final: dict | None = None       # the response once it completed or ran out of budget

    def _event(self, kind: str, **fields: Any) -> bytes:
        self.sequence += 1
        return sse_event({"type": kind, "sequence_number": self.sequence - 1, **fields}, kind)

    def opening(self) -> bytes:
        """response.created and response.in_progress, both with the response still in progress."""
        response = self._response("in_progress", [])
        return self._event("response.created", response=response) + self._event("response.in_progress", response=response)

    def reasoning(self, text: str) -> bytes:
        """A reasoning item's text delta; adds the item first when none is open."""
        out = b""
        if self.thought is None:
            self.thought, self.thought_text = reasoning_item("", "in_progress"), ""
            out = self._event("response.output_item.added", output_index=len(self.output), item=self.thought)
        self.thought_text += text
        return out + self._event("response.reasoning_text.delta", item_id=self.thought["id"],
                                 output_index=len(self.output), content_index=0, delta=text)

    def _close_reasoning(self, status: str = "completed") -> bytes:
        if self.thought is None:
            return b""
        item = {**self.thought, "status": status, "content": [{"type": "reasoning_text", "text": self.thought_text}]}
        where = {"item_id": item["id"], "output_index": len(self.output), "content_index": 0}
        self.output.append(item)
        self.thought = None
        return (self._event("response.reasoning_text.done", **where, text=self.thought_text)
                + self._event("response.output_item.done", output_index=where["output_index"], item=item))

    def text(self, text: str, logprobs: list[dict]) -> bytes:
        """An output_text delta; closes open reasoning and adds the message item and part first."""
        out = self._close_reasoning()
        if self.message is None:
            self.message, self.message_text = message_item("", "in_progress"), ""
            out += (self._event("response.output_item.added", output_index=len(self.output), item=self.message)
                    + self._event("response.content_part.added", **self._where(), part=output_text_part("")))
        self.message_text += text
        return out + self._event("response.output_text.delta", **self._where(), delta=text, logprobs=[])

    def _where(self) -> dict:
        return {"item_id": self.message["id"], "output_index": len(self.output), "content_index": 0}

    def _close_message(self, status: str = "completed") -> bytes:
        if self.message is None:
            return b""
        where, part = self._where(), output_text_part(self.message_text)
        item = {**self.message, "status": status, "content": [part]}
        self.output.append(item)
        self.message = None
        return (self._event("response.output_text.done", **where, text=part["text"], logprobs=[])
                + self._event("response.content_part.done", **where, part=part)
                + self._event("response.output_item.done", output_index=where["output_index"], item=item))

    def call_start(self, call_id: str, name: str) -> bytes:
        """A function_call item opens (in progress); a custom tool's call waits for its end (its input is
        raw text, not the JSON the model writes)."""
        out = self._close_reasoning() + self._close_message()
        item = function_call_item({"id": call_id, "function": {"name": name, "arguments": "{}"}},
                                  self.request.tool_kinds)
        self.live_item = {**item, "status": "in_progress", "arguments": ""} if item["type"] == "function_call" else None
        if self.live_item is None:
            return out
        return out + self._event("response.output_item.added", output_index=len(self.output), item=self.live_item)

    def call_args(self, text: str) -> bytes:
        """A function_call_arguments.delta of the open item (nothing for a custom tool's call)."""
        if self.live_item is None:
            return b""
        return self._event("response.function_call_arguments.delta", item_id=self.live_item["id"],
                           output_index=len(self.output), delta=text)

    def call_end(self, call: dict) -> bytes:
        """The call's item done (function_call_arguments.done first); a custom tool's call, whole."""
        item, live, self.live_item = function_call_item(call, self.request.tool_kinds), self.live_item, None
        where = {"item_id": live["id"] if live else item["id"], "output_index": len(self.output)}
        item["id"] = where["item_id"]
        out = []
        if live is None:   # a custom tool's call, whole
            out += [self._event("response.output_item.added", output_index=where["output_index"],
                                item={**item, "input": ""}),
                    self._event("response.custom_tool_call_input.delta", **where, delta=item["input"]),
                    self._event("response.custom_tool_call_input.done", **where, input=item["input"])]
        else:
            out.append(self._event("response.function_call_arguments.done", **where, arguments=item["arguments"]))
        self.output.append(item)
        return b"".join(out) + self._event("response.output_item.done", output_index=where["output_index"], item=item)

    def finish(self, reason: str) -> bytes:
        """Closes open items, then response.completed (or response.incomplete when cut by max_output_tokens)."""
        status = "incomplete" if reason == "length" else "completed"
        out = self._close_reasoning(status) + self._close_message(status)
        self.final = self._response(status, self.output)
        return out + self._event(f"response.{status}", response=self.final)

    def failure(self, error: APIError) -> bytes:
        """A failure after the headers: response.failed, holding the output so far and the error."""
        return self._event("response.failed", response=self._response("failed", self.output, response_error(error)))

    def body(self, text: str, calls: list[dict], reason: str, logprobs: list[dict], reasoning: str) -> dict:
        """The non-streaming response: reasoning, message and call items; kept in self.final for the store."""
        status = "incomplete" if reason == "length" else "completed"
        shows_text = bool(text.strip() or (text and not calls))
        cut = "incomplete" if status == "incomplete" and not calls else "completed"  # the last item is the one cut
        output = [reasoning_item(reasoning, cut if not shows_text else "completed")] if reasoning else []
        output += [message_item(text, cut)] if shows_text else []
        output += [function_call_item(call, self.request.tool_kinds) for call in calls]
        self.final = self._response(status, output)
        return self.final

    def _response(self, status: str, output: list[dict], error: dict | None = None) -> dict:
        """The response object; usage once generation has ended, incomplete_details when the budget ran out.

        It repeats the request's instructions, metadata, text, tools,
        tool_choice and parallel_tool_calls, as OpenAI's does.
        """
        request, ended = self.request, status in ("completed", "incomplete")
        echo = {"instructions": None, "metadata": {}, "text": {"format": {"type": "text"}}, "tool_choice": "auto",
                "parallel_tool_calls": True, "previous_response_id": None, "reasoning": None, "tools": [],
                **{k: v for k, v in request.echo.items() if k != "store"}}  # the SDK's Response has no store
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status, "error": error,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                **echo, "model": self.model, "output": output,
                "completed_at": int(time.time()) if status == "completed" else None,
                "temperature": request.temperature, "top_p": request.top_p, "max_output_tokens": request.max_tokens,
                "usage": responses_usage(self.job) if ended else None}


def responses_conversation(request: GenerationRequest, response: dict) -> list[dict]:
    """What a later request's previous_response_id continues: this request's messages and the response's
    output, as chat messages; the instructions are left out (a later request gives its own, as OpenAI's do)."""
    messages = list(request.messages[1:] if request.echo.get("instructions") else request.messages)
    return messages + responses_input(response["output"], request.tool_kinds)


class ResponseStore:
    """The /v1/responses made with store: true, newest kept, bounded by count and by bytes of JSON.

    Each entry is the response object (for GET /v1/responses/ID) and the
    conversation it ended (for previous_response_id). What no longer fits
    is evicted oldest first; a response too big for the whole budget is not kept.
    """

    def __init__(self, max_count: int, max_bytes: int):
        self.max_count, self.max_bytes = max_count, max_bytes
        self.entries: dict[str, tuple[dict, int]] = {}   # id -> (entry, size), oldest first
        self.bytes = 0
        self.lock = threading.Lock()

    def put(self, response: dict, conversation: list[dict]) -> None:
        """Keep a response and its conversation (store: true) within the count and byte bounds, oldest out first."""
        entry = {"response": response, "conversation": conversation}
        size = len(json.dumps(entry, ensure_ascii=False).encode())
        if self.max_count == 0 or size > self.max_bytes:
            return
        with self.lock:
            self.entries[response["id"]] = (entry, size)
            self.bytes += size
            while len(self.entries) > self.max_count or self.bytes > self.max_bytes:
                self.bytes -= self.entries.pop(next(iter(self.entries)))[1]   # the oldest

    def get(self, response_id: str, param: str | None = None) -> dict:
        """The entry kept for `response_id`; a 404 in OpenAI's envelope when it is unknown or was evicted."""
        with self.lock:
            kept = self.entries.get(response_id)
        if kept is None:
            raise APIError(HTTPStatus.NOT_FOUND, "invalid_request_error",
                           f"no response with id {response_id[:100]!r} is kept here: it was made with store: false, "
                           "evicted (--response-store-count, --response-store-bytes) or never existed", param,
                           "response_not_found")
        return kept[0]


# ---------------------------------------------------------------------------
# Dialects: models, embeddings, and each endpoint's writer
# ---------------------------------------------------------------------------

def model_capabilities(model: Any) -> tuple[bool, bool]:
    """(whether the model thinks, whether it calls tools), as its chat template and tokenizer tell."""
    tokenizer = model.tokenizer
    form = chat_format_of(tokenizer)
    return bool(getattr(tokenizer, "has_thinking", False) or form is not None and form.harmony), form is not None


def anthropic_model_info(settings: Settings, context: int, reasons: bool, tools: bool, created: int) -> dict:
    """The served model as Anthropic's ModelInfo: context window, output ceiling and capabilities.

    Anthropic's capability list has no tool-use entry (all its models call
    tools), so whether this one does goes in an extra `tool_use` entry.
    """
    no, yes = {"supported": False}, {"supported": True}
    thinking = {"supported": reasons, "types": {"enabled": {"supported": reasons}, "adaptive": {"supported": reasons},
                                                "disabled": yes, "between_tools": no}}
    capabilities = {"batch": no, "citations": no, "code_execution": no, "context_management": no,
                    "effort": {"supported": False, "low": no, "medium": no, "high": no, "max": no},
                    "image_input": no, "pdf_input": no, "server_tools": {"supported": False, "code_execution": no,
                                                                           "web_search": no},
                    "structured_outputs": yes, "thinking": thinking, "tool_use": {"supported": tools}}
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))
    return {"type": "model", "id": settings.model_name, "display_name": settings.model_name, "created_at": stamp,
            "lifecycle": "active", "max_input_tokens": context, "max_tokens": settings.max_tokens,
            "capabilities": capabilities}


def embeddings_reply(vectors: list[list[float]], request: EmbeddingRequest, model_name: str, tokens: int) -> dict:
    """OpenAI's embeddings list: one entry per input, indexed in input order."""
    return {"object": "list", "model": model_name,
            "data": [{"object": "embedding", "index": i, "embedding": encode_embedding(vector, request.encoding_format)}
                     for i, vector in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def encode_embedding(vector: list[float], encoding_format: str) -> list[float] | str:
    """The vector as JSON numbers, or as base64 of its little-endian float32 bytes (what the openai SDK asks for)."""
    if encoding_format == "float":
        return vector
    packed = array.array("f", vector)
    if sys.byteorder == "big":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


WRITERS: dict[str, type[Writer]] = {"chat": ChatWriter, "completions": ChatWriter,
                                    "messages": MessagesWriter, "responses": ResponsesWriter}


def writer_for(job: Job, model_name: str, tokenizer: Any) -> Writer:
    """The Writer for a job's API; for n > 1 choices (chat, completions), a ChoicesWriter."""
    request = job.request
    if request.n == 1:
        return WRITERS[request.endpoint](job, model_name, tool_scanner(request, tokenizer))
    first = ChatWriter(job, model_name, tool_scanner(request, tokenizer), ends=False)
    return ChoicesWriter([first] + [ChatWriter(job, model_name, tool_scanner(request, tokenizer), index=i,
                                               head=first.head, ends=False) for i in range(1, request.n)])


# ---------------------------------------------------------------------------
# Metrics: counters and histograms, written as Prometheus text by hand
# ---------------------------------------------------------------------------

class Histogram:
    """Observations counted into cumulative buckets, with their sum, as Prometheus keeps them."""

    def __init__(self, bounds: tuple[float, ...] = METRICS_BUCKETS):
        self.bounds = bounds
        self.counts = [0] * len(bounds)   # counts[i]: observations <= bounds[i]
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Count one observation in its bucket and the running sum."""
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def samples(self, labels: dict[str, str]) -> list[tuple[str, dict[str, str], float]]:
        """(suffix, labels, value) rows: one per bucket, then +Inf, _sum and _count."""
        rows = [("_bucket", {**labels, "le": f"{bound:g}"}, count) for bound, count in zip(self.bounds, self.counts)]
        return rows + [("_bucket", {**labels, "le": "+Inf"}, self.count),
                       ("_sum", labels, self.sum), ("_count", labels, self.count)]


@dataclass
class Family:
    """One metric family: its name, type, help line and samples (suffix, labels, value)."""

    name: str
    type: str
    help: str
    samples: list[tuple[str, dict[str, str], float]]


def prometheus_text(families: list[Family]) -> str:
    """The text exposition format (version 0.0.4) for these families."""
    lines = []
    for family in families:
        lines += [f"# HELP {family.name} {family.help}", f"# TYPE {family.name} {family.type}"]
        for suffix, labels, value in family.samples:
            label_text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
            lines.append(f"{family.name}{suffix}{'{' + label_text + '}' if labels else ''} {_number(value)}")
    return "\n".join(lines) + "\n"


def gauge(name: str, kind: str, help: str, value: float) -> Family:
    """A family of one unlabelled sample (a gauge, or a counter kept elsewhere)."""
    return Family(name, kind, help, [("", {}, value)])


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def resident_memory_bytes() -> int:
    """This process's resident set size now (Linux), else its peak (macOS, via getrusage)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes, Linux KiB


class Metrics:
    """The server's counters and histograms; every method is safe from any thread.

    Labels come only from fixed sets (route paths, status codes, drop
    reasons), never from raw request text, so a hostile client cannot grow
    the number of series.
    """

    DROP_REASONS = ("header_timeout", "body_timeout", "write_stall", "client_gone", "too_many_connections")

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}
        self.durations: dict[str, Histogram] = {}
        self.time_to_first_token: dict[str, Histogram] = {}
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.gate_rejections = 0
        self.embedding_inputs = 0
        self.embedding_tokens = 0
        self.drops = dict.fromkeys(self.DROP_REASONS, 0)

    def record_request(self, endpoint: str, status: str, seconds: float) -> None:
        """Count one answered request by endpoint and status, and observe its duration."""
        with self.lock:
            self.requests[endpoint, status] = self.requests.get((endpoint, status), 0) + 1
            self.durations.setdefault(endpoint, Histogram()).observe(seconds)

    def record_generation(self, endpoint: str, prompt_tokens: int, cached_tokens: int, completion_tokens: int,
                          first_token_seconds: float | None) -> None:
        """Add one generation request's token counts and time to first token."""
        with self.lock:
            self.prompt_tokens += prompt_tokens
            self.cached_tokens += cached_tokens
            self.completion_tokens += completion_tokens
            if first_token_seconds is not None:
                self.time_to_first_token.setdefault(endpoint, Histogram()).observe(first_token_seconds)

    def record_embeddings(self, inputs: int, tokens: int) -> None:
        """Add one answered embeddings request's inputs and tokens."""
        with self.lock:
            self.embedding_inputs += inputs
            self.embedding_tokens += tokens

    def record_rejection(self) -> None:
        """Count one request the admission queue refused (its 429)."""
        with self.lock:
            self.gate_rejections += 1

    def record_drop(self, reason: str) -> None:
        """Count one exchange that ended without a full response, by reason (client_gone, write_stall, ...)."""
        with self.lock:
            self.drops[reason] += 1

    def families(self) -> list[Family]:
        """A consistent snapshot of everything counted here."""
        with self.lock:
            return [
                Family("lem_requests_total", "counter", "HTTP requests answered, by endpoint and status code "
                       "(499: the client left before a response)",
                       [("", {"endpoint": e, "code": c}, n) for (e, c), n in sorted(self.requests.items())]),
                Family("lem_request_duration_seconds", "histogram", "Time from request headers to the last byte, by endpoint.",
                       [row for e, h in sorted(self.durations.items()) for row in h.samples({"endpoint": e})]),
                Family("lem_time_to_first_token_seconds", "histogram", "Time from request headers to the first generated token.",
                       [row for e, h in sorted(self.time_to_first_token.items()) for row in h.samples({"endpoint": e})]),
                Family("lem_prompt_tokens_total", "counter", "Prompt tokens of admitted generation requests.",
                       [("", {}, self.prompt_tokens)]),
                Family("lem_cached_prompt_tokens_total", "counter", "Prompt tokens served from the prompt cache "
                       "instead of being computed.", [("", {}, self.cached_tokens)]),
                Family("lem_completion_tokens_total", "counter", "Tokens generated for clients.",
                       [("", {}, self.completion_tokens)]),
                Family("lem_embedding_inputs_total", "counter", "Inputs embedded for /v1/embeddings.",
                       [("", {}, self.embedding_inputs)]),
                Family("lem_embedding_tokens_total", "counter", "Tokens of the inputs embedded for /v1/embeddings.",
                       [("", {}, self.embedding_tokens)]),
                Family("lem_gate_rejections_total", "counter", "Generation requests refused with 429 because every slot was taken.",
                       [("", {}, self.gate_rejections)]),
                Family("lem_connections_dropped_total", "counter", "Connections cut by the server, by reason.",
                       [("", {"reason": r}, n) for r, n in self.drops.items()]),
            ]


# ---------------------------------------------------------------------------
# Handler: the HTTP handler
# ---------------------------------------------------------------------------

def client_gone(sock: socket.socket) -> bool:
    """True when the peer has closed or reset the connection."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class DeadlineReader(io.RawIOBase):
    """A socket's read side that gives up at a deadline, however slowly bytes trickle in.

    The socket timeout only bounds one stall, so a client sending a byte every
    few seconds (slowloris) would never trip it. The handler calls `start`
    before a request line and again before a body; each read then waits only
    for the time left, and raises TimeoutError once it is gone.
    """

    def __init__(self, sock: socket.socket):
        super().__init__()
        self.sock = sock
        self.deadline: float | None = None
        self.received = 0          # bytes read since the last start()
        self.timed_out = False     # the last start()'s deadline (or a stall) was hit

    def start(self, seconds: float) -> None:
        """Begin a read window: reads fail with TimeoutError once `seconds` from now have passed."""
        self.deadline = time.monotonic() + seconds
        self.received = 0
        self.timed_out = False

    def readable(self) -> bool:
        """Always readable (io.RawIOBase asks)."""
        return True

    def readinto(self, buffer: Any) -> int:
        """Read into buffer, waiting at most until the deadline; TimeoutError when it passes."""
        wait = SOCKET_TIMEOUT
        if self.deadline is not None:
            wait = min(wait, self.deadline - time.monotonic())
        try:
            if wait <= 0:
                raise TimeoutError("read deadline passed")
            self.sock.settimeout(wait)
            count = self.sock.recv_into(buffer)
        except TimeoutError:
            self.timed_out = True
            raise
        finally:
            with contextlib.suppress(OSError):
                self.sock.settimeout(SOCKET_TIMEOUT)  # writes keep the plain stall limit
        self.received += count
        return count


_SURROGATE = re.compile("[\ud800-\udfff]")  # after json.loads, a surrogate left in a str is a lone one


def check_json_value(value: Any) -> None:
    """Raise a 400 for JSON nested past MAX_JSON_DEPTH or holding a lone UTF-16 surrogate.

    Both parse, but deep nesting can exhaust the stack of code that recurses
    (chat templates, json.dumps) and a lone surrogate ("\\ud800") cannot be
    encoded as UTF-8, so a tokenizer or a response writer would fail on it.
    """
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                raise invalid("request body holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape "
                              "without its pair); text must be valid Unicode")
        elif isinstance(item, (list, dict)):
            if depth > MAX_JSON_DEPTH:
                raise invalid(f"request body nests arrays or objects deeper than {MAX_JSON_DEPTH} levels")
            stack.extend((child, depth + 1) for child in (item if isinstance(item, list) else [*item, *item.values()]))


def gunzip_body(raw: bytes, limit: int) -> bytes:
    """A gzip-encoded request body, inflated; a 413 once it would pass `limit` bytes (a zip bomb stops there)."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        body = inflater.decompress(raw, limit + 1)
    except zlib.error as exc:
        raise invalid(f"request body is not valid gzip: {exc}") from None
    if len(body) > limit:
        raise APIError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "invalid_request_error",
                       f"request body inflates to more than {limit} bytes, the limit", code="body_too_large")
    if not inflater.eof:
        raise invalid("request body is truncated gzip")
    return body


def host_name(header: str) -> str:
    """The name in a Host header: lower-case, without port, brackets or trailing dot."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0].rstrip(".") if ":" in header else header.rstrip(".")


class Handler(http.server.BaseHTTPRequestHandler):
    """One HTTP connection. do_* dispatch to one small method per route.

    Every failure is an APIError rendered once in `_dispatch`; handler state
    is only what the HTTP exchange itself needs (status sent, tokens used).
    """

    server: "LemServer"
    protocol_version = "HTTP/1.1"
    server_version = f"lem-serve/{__version__}"
    # A malformed request line still gets a status line back, never an HTTP/0.9 bare body.
    default_request_version = "HTTP/1.0"
    # Exchange state that send_error may read before any route has run.
    status_sent: int | None = None
    body_read = False
    cors_origin: str | None = None
    request_id: str | None = None

    GET_ROUTES = {"/": "page", "/chat.js": "chat_js", "/healthz": "healthz", "/metrics": "metrics",
                  "/v1/models": "models"}
    POST_ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/messages": "messages",
                   "/v1/messages/count_tokens": "count_tokens", "/v1/responses": "responses",
                   "/v1/embeddings": "embeddings"}
    PREFIX_ROUTES = {"/v1/models/": "model", "/v1/responses/": "stored_response"}   # GET /v1/models/ID ...
    ANTHROPIC_PATHS = ("/v1/messages", "/v1/messages/")   # the path, or a prefix: errors there are Anthropic's
    PREFLIGHT_ROUTES = dict.fromkeys([*GET_ROUTES, *POST_ROUTES], "preflight")

    @property
    def timeout(self) -> float:
        """The socket's stall limit, read when each connection starts (tests lower it)."""
        return SOCKET_TIMEOUT

    def setup(self) -> None:
        """http.server's setup, with rfile replaced by a reader that enforces the header and body deadlines."""
        super().setup()
        self.rfile.close()  # replaced by a reader that enforces HEADER_TIMEOUT and BODY_TIMEOUT
        self.reader = DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self.reader)

    def handle_one_request(self) -> None:
        """Read and answer one request; a client too slow to send its headers is dropped."""
        self.reader.start(HEADER_TIMEOUT)
        self.dispatched = False
        super().handle_one_request()
        if self.reader.timed_out and not self.dispatched and self.reader.received:
            # An idle keep-alive connection (nothing received) closes quietly; a partial request is a drop.
            log.info("dropped %s: request headers incomplete after %g s", self.client_address[0], HEADER_TIMEOUT)
            self.server.metrics.record_drop("header_timeout")

    def do_GET(self) -> None:
        """Route a GET by GET_ROUTES."""
        self._dispatch(self.GET_ROUTES)

    def do_POST(self) -> None:
        """Route a POST by POST_ROUTES."""
        self._dispatch(self.POST_ROUTES)

    def do_HEAD(self) -> None:
        """Route a HEAD as its GET (the body is not written)."""
        self._dispatch(self.GET_ROUTES)

    def do_OPTIONS(self) -> None:
        """Answer a CORS preflight for a known path."""
        self._dispatch(self.PREFLIGHT_ROUTES)

    def do_PUT(self) -> None:
        """No route takes PUT: a known path answers 405 with Allow, an unknown one 404."""
        self._dispatch({})

    do_DELETE = do_PATCH = do_PUT

    # -- dispatch and the one error path -----------------------------------

    def _dispatch(self, routes: dict[str, str]) -> None:
        # Per-exchange state: one handler object serves every request of a keep-alive connection.
        self.dispatched = True
        self.started = time.monotonic()
        self.status_sent = None
        self.counted = False
        # A body that no route reads would be parsed as the next request: such a connection is not reused.
        self.body_read = (self.headers.get("Transfer-Encoding") is None
                          and self.headers.get("Content-Length", "0").strip() == "0")
        self.log_tokens = (0, 0)
        self.cors_origin = None
        self.route_path = self.path.split("?", 1)[0]
        self.request_id = new_id("req_")
        with self.server.exchange():
            try:
                if self.server.stopping:
                    self._close_after_response()
                path = self.route_path
                self._check_host()
                self._check_origin()
                name = routes.get(path) or self._prefix_route(routes, path)
                if name is None:
                    self._refuse_route(path)
                if name != "preflight" and (path.startswith("/v1/") or path == "/metrics"):
                    self._authorize()
                getattr(self, "route_" + name)()
            except APIError as exc:
                self._send_error(exc)
            except ClientGone as exc:
                self._close_after_response()
                self.server.metrics.record_drop(exc.args[0] if exc.args else "client_gone")
            except TimeoutError:  # a response write stalled past SOCKET_TIMEOUT
                self._close_after_response()
                self.server.metrics.record_drop("write_stall")
            except (BrokenPipeError, ConnectionResetError):
                self._close_after_response()
                self.server.metrics.record_drop("client_gone")
            except Exception as exc:
                log.error("unhandled error on %s %s: %r", self.command, self.path, exc, exc_info=exc)
                self._send_error(internal_error())
            finally:
                self._log_request()
                self._record_request()

    def _prefix_route(self, routes: dict[str, str], path: str) -> str | None:
        """The route of a path that names one resource (/v1/models/ID), its id in self.resource_id."""
        prefix = next((p for p in self.PREFIX_ROUTES if path.startswith(p) and len(path) > len(p)), None)
        if prefix is None or routes not in (self.GET_ROUTES, self.PREFLIGHT_ROUTES):
            return None
        self.resource_id = urllib.parse.unquote(path[len(prefix):])
        return "preflight" if routes is self.PREFLIGHT_ROUTES else self.PREFIX_ROUTES[prefix]

    @classmethod
    def methods_for(cls, path: str) -> list[str]:
        """The methods a known path answers (OPTIONS aside); empty for an unknown path."""
        if any(path.startswith(p) and len(path) > len(p) for p in cls.PREFIX_ROUTES):
            return ["GET"]
        return [m for m, table in (("GET", cls.GET_ROUTES), ("POST", cls.POST_ROUTES)) if path in table]

    def _refuse_route(self, path: str) -> None:
        allowed = self.methods_for(path)
        if allowed:
            raise APIError(HTTPStatus.METHOD_NOT_ALLOWED, "invalid_request_error",
                           f"{self.command} is not allowed on {path}; use {' or '.join(allowed)}",
                           code="method_not_allowed", headers={"Allow": ", ".join(allowed)})
        raise APIError(HTTPStatus.NOT_FOUND, "invalid_request_error",
                       f"no such endpoint: {self.command} {path}", code="not_found")

    def _check_host(self) -> None:
        """When bound to loopback, answer only to loopback names: a DNS-rebinding page sends its own."""
        hosts = self.headers.get_all("Host") or []
        if len(hosts) > 1:
            raise invalid("more than one Host header")
        settings = self.server.settings
        if hosts and settings.is_loopback and host_name(hosts[0]) not in (*LOOPBACK_HOST_NAMES, settings.host):
            raise APIError(HTTPStatus.MISDIRECTED_REQUEST, "invalid_request_error",
                           f"Host {hosts[0][:100]!r} is not this server: bound to loopback, it answers only to "
                           "localhost, 127.0.0.1 and [::1]", code="host_not_allowed")

    def _check_origin(self) -> None:
        """Refuse what a web page on another origin sends, unless --allowed-origins lists it.

        Same-origin requests (the chat page) and clients that send no Origin
        (SDKs, curl) pass. Refusing, not just withholding CORS headers, keeps a
        foreign page from spending the model with requests it cannot read.
        """
        origin = self.headers.get("Origin")
        if origin is None:
            return
        allowed = self.server.settings.allowed_origins
        if "*" in allowed or origin in allowed:
            self.cors_origin = origin
            return
        if origin.partition("://")[2].lower() == (self.headers.get("Host") or "").strip().lower():
            return
        raise APIError(HTTPStatus.FORBIDDEN, "invalid_request_error",
                       f"origin {origin[:100]!r} may not call this server; list it in --allowed-origins",
                       code="origin_not_allowed")

    def _authorize(self) -> None:
        """With --api-key, require it as 'Authorization: Bearer KEY' (OpenAI) or 'x-api-key: KEY' (Anthropic)."""
        key = self.server.settings.api_key
        if key is None:
            return
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        offered = [token if scheme.lower() == "bearer" else None, self.headers.get("x-api-key")]
        if not any(given is not None and hmac.compare_digest(given.strip().encode(), key.encode()) for given in offered):
            raise APIError(HTTPStatus.UNAUTHORIZED, "authentication_error",
                           "missing or wrong API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer", "x-should-retry": "false"})

    def parse_request(self) -> bool:
        """http.server's request-line and header parsing, refusing HTTP/0.9 with 505."""
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9":
            self.send_error(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, "HTTP/0.9 is not supported")
            return False
        return True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (bad request line or headers, unknown method) as JSON errors."""
        if self.request_version == "HTTP/0.9":  # http.server would then omit the status line and headers
            self.request_version = "HTTP/1.0"
        status = HTTPStatus(code)
        self._close_after_response()
        self.body_read = False
        error = APIError(status, "invalid_request_error", message or status.phrase,
                         code=status.phrase.lower().replace(" ", "_").replace("-", "_"))
        # The path is known only when the request line parsed (command set); else it may be the last request's.
        self.route_path = self.path.split("?", 1)[0] if self.command else ""
        self.request_id = new_id("req_")
        self.counted = True  # counted here, under "other", before the reply leaves
        self.server.metrics.record_request("other", str(int(status)), 0.0)
        self._send_json(self._error_body(error), status)

    def _send_error(self, error: APIError) -> None:
        if self.status_sent is not None:  # a response is under way: just end it
            self._close_after_response()
            return
        self._close_after_response(unless_body_read=True)
        self._send_json(self._error_body(error), error.status, error.headers)

    def _close_after_response(self, unless_body_read: bool = False) -> None:
        """The one place that ends this connection after the response, for any of: the server is
        stopping; the client went away or a write stalled; http.server refused the request; a response
        broke off; a stream (no length: its end is the connection's end); or, with unless_body_read,
        only when the request's body was left unread, since it would be parsed as the next request."""
        if not (unless_body_read and self.body_read):
            self.close_connection = True

    def _error_body(self, error: APIError) -> dict:
        """The error in the envelope of the API that was called: Anthropic's under /v1/messages (and on
        /v1/models when the client sent anthropic-version), else OpenAI's."""
        if self._anthropic():
            return error.anthropic_body(getattr(self, "request_id", None))
        return error.body()

    def _anthropic(self) -> bool:
        """Whether this exchange speaks Anthropic's API: its paths, or the model list asked by its SDK."""
        path = self.route_path
        if path == "/v1/models" or path.startswith("/v1/models/"):
            headers = getattr(self, "headers", None)   # none yet when http.server refuses the headers themselves
            return headers is not None and headers.get("anthropic-version") is not None
        return path == self.ANTHROPIC_PATHS[0] or path.startswith(self.ANTHROPIC_PATHS[1])

    # -- plain responses ----------------------------------------------------

    def _send_bytes(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self._close_after_response(unless_body_read=True)
        self.send_response(status)
        self.status_sent = int(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self._send_common_headers()
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self._record_request()
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_common_headers(self) -> None:
        """Headers every response carries: nosniff, the request's id (in the called API's header), and CORS
        for an allowed origin."""
        self.send_header("X-Content-Type-Options", "nosniff")
        if getattr(self, "request_id", None) and self.route_path.startswith("/v1/"):
            self.send_header("request-id" if self._anthropic() else "x-request-id", self.request_id)
        if self.server.settings.allowed_origins:
            self.send_header("Vary", "Origin")
        if self.cors_origin is not None:
            self.send_header("Access-Control-Allow-Origin", self.cors_origin)
            self.send_header("Access-Control-Expose-Headers", f"Retry-After, {WINDOW_HEADER}, x-request-id, request-id")

    def _send_json(self, payload: dict, status: int = HTTPStatus.OK, headers: dict[str, str] | None = None) -> None:
        try:
            body = json.dumps(payload, ensure_ascii=False).encode()
        except UnicodeEncodeError:  # a lone surrogate (in an exception's text, say): send it escaped
            body = json.dumps(payload).encode()
        self._send_bytes(status, body, "application/json", headers)

    # -- GET routes ---------------------------------------------------------

    def route_page(self) -> None:
        """GET /: the chat page, under PAGE_CSP."""
        self._send_bytes(HTTPStatus.OK, self.server.page_html, "text/html; charset=utf-8",
                         {"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"})

    def route_chat_js(self) -> None:
        """GET /chat.js: the page's script."""
        self._send_bytes(HTTPStatus.OK, self.server.chat_js, "text/javascript; charset=utf-8",
                         {"Cache-Control": "no-cache"})

    def route_healthz(self) -> None:
        """GET /healthz: liveness and load; 503 once the engine has died."""
        health = self.server.health()
        ok = health["status"] == "ok"
        self._send_json(health, HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE)

    def route_metrics(self) -> None:
        """GET /metrics: Prometheus text, never cached."""
        self._send_bytes(HTTPStatus.OK, self.server.metrics_text().encode(), "text/plain; version=0.0.4; charset=utf-8",
                         {"Cache-Control": "no-store"})

    def route_preflight(self) -> None:
        """OPTIONS: the methods a path takes, plus CORS grants when the origin is allowed.

        An Origin that is neither allowed nor this server's own was refused
        with 403 by _check_origin before this runs.
        """
        methods = ", ".join(self.methods_for(self.route_path) + ["OPTIONS"])
        self.send_response(HTTPStatus.NO_CONTENT)
        self.status_sent = HTTPStatus.NO_CONTENT
        self.send_header("Allow", methods)
        self._send_common_headers()
        if self.cors_origin is not None:
            asked = self.headers.get("Access-Control-Request-Headers", "")
            plain = re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~ ,-]{1,1000}", asked)  # header names only
            self.send_header("Access-Control-Allow-Methods", methods)
            self.send_header("Access-Control-Allow-Headers", asked if plain else "Authorization, Content-Type, X-Api-Key")
            self.send_header("Access-Control-Max-Age", str(CORS_MAX_AGE_SECONDS))
        if not self.body_read:
            self._close_after_response()
            self.send_header("Connection", "close")
        self._record_request()
        self.end_headers()

    def route_models(self) -> None:
        """The one model, in Anthropic's list shape when its SDK asks (anthropic-version), else OpenAI's."""
        info = self._model_info()
        if self._anthropic():
            self._send_json({"data": [info], "first_id": info["id"], "last_id": info["id"], "has_more": False})
        else:
            self._send_json({"object": "list", "data": [info]})

    def route_model(self) -> None:
        """GET /v1/models/ID: the served model by its id; another id is a 404."""
        if self.resource_id != self.server.settings.model_name:
            raise APIError(HTTPStatus.NOT_FOUND, "invalid_request_error",
                           f"model {self.resource_id[:100]!r} is not served here; GET /v1/models lists the one that "
                           "is", "model", "model_not_found")
        self._send_json(self._model_info())

    def _model_info(self) -> dict:
        """The served model: context window, output ceiling, whether it thinks and calls tools."""
        server, model = self.server, self.server.model
        reasons, tools = model_capabilities(model)
        if self._anthropic():
            return anthropic_model_info(server.settings, model.context_length, reasons, tools, server.created)
        return {"id": server.settings.model_name, "object": "model", "created": server.created,
                "owned_by": "lem-serve", "context_length": model.context_length,
                "max_output_tokens": server.settings.max_tokens,
                "capabilities": {"reasoning": reasons, "tool_calling": tools}}

    def route_stored_response(self) -> None:
        """GET /v1/responses/ID: a response kept by the store (store: true); unknown or evicted is a 404."""
        self._send_json(self.server.responses.get(self.resource_id)["response"])

    # -- POST routes --------------------------------------------------------

    def route_chat(self) -> None:
        """POST /v1/chat/completions: parse, then generate (streaming or not)."""
        self._generate(parse_generation_request("chat", self._read_json(), self.server.settings))

    def route_completions(self) -> None:
        """POST /v1/completions: parse, then generate (streaming or not)."""
        self._generate(parse_generation_request("completions", self._read_json(), self.server.settings))

    def route_messages(self) -> None:
        """POST /v1/messages: Anthropic's body parsed into the one request type, then generated."""
        self._generate(parse_messages_request(self._read_json(), self.server.settings))

    def route_responses(self) -> None:
        """POST /v1/responses: a stored previous_response_id's conversation comes first, then generate."""
        body = self._read_json()
        previous = None
        if isinstance(body.get("previous_response_id"), str):
            previous = self.server.responses.get(body["previous_response_id"], "previous_response_id")["conversation"]
        self._generate(parse_responses_request(body, self.server.settings, previous))

    def route_count_tokens(self) -> None:
        """Anthropic's count_tokens: the prompt's length as a create would see it; no slot, no engine."""
        request = parse_messages_request(self._read_json(), self.server.settings, counting=True)
        prompt, _ = render_prompt(request, self.server.model)
        self._send_json({"input_tokens": len(prompt)})

    def route_embeddings(self) -> None:
        """OpenAI's embeddings: inputs encoded and checked here, then admitted and run on the engine thread."""
        server = self.server
        request = parse_embedding_request(self._read_json())
        embedder = server.model.embedder
        if embedder is None:
            raise invalid("this server's model cannot serve embeddings (see the server log); start it with "
                          "--embedding-model PATH", "model", "model_not_supported")
        inputs = embedding_inputs(request, embedder, embedder.max_tokens(server.settings.max_embedding_tokens))
        tokens = sum(map(len, inputs))
        if not server.engine.alive:
            raise engine_unavailable()
        with server.admit(1, gone=lambda: client_gone(self.connection)) as slot:
            job = EmbeddingJob(inputs, request, embedder, time.monotonic() + server.settings.timeout)
            server.engine.submit(job)
            vectors: list = []
            try:
                for kind, value, *_ in self._events(job, slot):
                    if kind == "error":
                        raise value
                    if kind == "embeddings":
                        vectors = value
            finally:
                job.cancelled.set()  # the engine skips its remaining passes
                self.log_tokens = (tokens, 0)
        server.metrics.record_embeddings(len(inputs), tokens)
        self._send_json(embeddings_reply(vectors, request, embedder.name or server.settings.model_name, tokens))

    def _generate(self, request: GenerationRequest) -> None:
        """Render and fit the prompt, admit through the gate, run a Job and write its result.

        Everything that needs no engine runs before admission, so a bad
        request is a 400 even while every slot is taken.
        """
        server = self.server
        check_token_ids(request, server.model)
        prompt, dropped = render_prompt(request, server.model)
        budget = fit_to_memory(len(prompt), fit_to_context(len(prompt), request, server.model), request, server.memory)
        if not server.engine.alive:
            raise engine_unavailable()
        headers = {WINDOW_HEADER: str(dropped)} if request.endpoint == "chat" else {}
        kv_bytes = kv_reservation(len(prompt), budget, request, server.memory)
        with server.admit(request.n, kv_bytes, gone=lambda: client_gone(self.connection)) as slot:
            job = Job(prompt, request, budget, time.monotonic() + server.settings.timeout, kv_bytes=kv_bytes)
            server.engine.submit(job)
            writer = writer_for(job, server.settings.model_name, server.model.tokenizer)
            try:
                if request.stream:
                    self._write_stream(job, slot, writer, headers)
                else:
                    self._write_completion(job, slot, writer, headers)
            finally:
                job.cancelled.set()  # whatever ended the exchange, the engine stops on its next step
                self.log_tokens = (job.prompt_tokens, job.completion_tokens)
                first = None if job.first_token_at is None else job.first_token_at - self.started
                server.metrics.record_generation(self.route_path, job.prompt_tokens, job.cached_tokens,
                                                 job.completion_tokens, first)
        final = getattr(writer, "final", None)
        if final is not None and request.echo.get("store"):
            server.responses.put(final, responses_conversation(request, final))

    def _read_json(self) -> dict:
        """The body as a JSON object that later layers can take: bounded nesting, valid Unicode."""
        raw = self._read_body()
        try:
            body = decode_json_body(raw)
        except RecursionError:
            raise invalid(f"request body nests arrays or objects deeper than {MAX_JSON_DEPTH} levels") from None
        check_json_value(body)
        return body

    def _read_body(self) -> bytes:
        """The request body, read within BODY_TIMEOUT; only Content-Length framing is accepted."""
        if self.headers.get("Transfer-Encoding") is not None:
            raise APIError(HTTPStatus.LENGTH_REQUIRED, "invalid_request_error",
                           "chunked (Transfer-Encoding) request bodies are not supported; send Content-Length",
                           code="length_required")
        lengths = {value.strip() for value in self.headers.get_all("Content-Length") or []}
        length = lengths.pop() if len(lengths) == 1 else ""
        # isascii: "²" and other Unicode digits pass isdigit() but not int().
        if not (length.isascii() and length.isdigit()):
            raise APIError(HTTPStatus.LENGTH_REQUIRED, "invalid_request_error",
                           "one valid Content-Length header is required", code="length_required")
        if int(length) > MAX_BODY_BYTES:
            raise APIError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "invalid_request_error",
                           f"request body is {int(length)} bytes; the limit is {MAX_BODY_BYTES}",
                           code="body_too_large")
        self.reader.start(BODY_TIMEOUT)
        try:
            body = self.rfile.read(int(length))
        except TimeoutError:
            self.server.metrics.record_drop("body_timeout")
            raise APIError(HTTPStatus.REQUEST_TIMEOUT, "invalid_request_error",
                           f"the request body did not arrive within {BODY_TIMEOUT:g} s",
                           code="request_timeout") from None
        if len(body) < int(length):
            raise ClientGone
        self.body_read = True
        encoding = (self.headers.get("Content-Encoding") or "identity").strip().lower()
        if encoding == "gzip":
            return gunzip_body(body, MAX_BODY_BYTES)
        if encoding != "identity":
            raise APIError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "invalid_request_error",
                           f"Content-Encoding {encoding[:40]!r} is not supported; send gzip or none",
                           code="unsupported_encoding")
        return body

    def _events(self, job: Job, slot: "Admission", on_idle: Callable[[], None] = lambda: None) -> Iterator[tuple]:
        """Yield job events until its last (every choice's finish, or an error); watch the client,
        clock and engine meanwhile.

        The slots are given back as soon as the engine is done with the job, before
        the last bytes go out, so a client that sends its next request the moment
        it has read this response never finds its own slot still taken.
        """
        engine, timeout = self.server.engine, self.server.settings.timeout
        finished, looked = 0, time.monotonic()
        while True:
            try:
                event = job.events.get(timeout=POLL_SECONDS)
            except queue.Empty:
                event = None
            if event is None or time.monotonic() - looked >= POLL_SECONDS:  # not a select() per token: as often
                looked = time.monotonic()                                     # as a waiting handler looks
                if client_gone(self.connection):
                    raise ClientGone
            if event is None:
                if time.monotonic() > job.deadline:
                    raise request_timed_out(timeout)
                if not engine.alive:
                    raise engine_unavailable()
                on_idle()
                continue
            kind = event[0]
            finished += kind == "finish"
            last = kind == "error" or finished == job.request.n
            if last:
                slot.release()
            if kind == "finish" and event[1] == "cancelled":  # the engine noticed the deadline first
                raise request_timed_out(timeout)
            yield event
            if last:
                return

    def _write_completion(self, job: Job, slot: "Admission", writer: Writer, headers: dict[str, str]) -> None:
        """Wait for the whole generation, then send the writer's JSON body."""
        choices = [([], [], [], ["stop"]) for _ in range(job.request.n)]  # text, reasoning, logprobs, finish
        for kind, value, logprobs, choice in self._events(job, slot):
            if kind == "error":
                raise value
            text, reasoning, entries, finish = choices[choice]
            if kind == "text":
                text.append(value)
                entries += logprobs
            elif kind == "reasoning":
                reasoning.append(value)
            else:
                finish[0] = value
        results = [("".join(text), finish[0], entries, "".join(reasoning)) for text, reasoning, entries, finish in choices]
        self._send_json(writer.reply(results), headers=headers)

    def _write_stream(self, job: Job, slot: "Admission", writer: Writer, headers: dict[str, str]) -> None:
        """Stream the writer's events as the engine's come in; an error after the headers becomes an event."""
        self._start_stream(headers)
        last_write = [time.monotonic()]

        def write(data: bytes) -> None:
            if data:
                self._write_raw(data)
                last_write[0] = time.monotonic()

        opened = [not writer.opens_when_admitted]

        def open_stream(now: bool = False) -> None:
            if not opened[0] and (now or job.admitted.is_set()):
                opened[0] = True
                write(writer.opening())

        def keepalive() -> None:
            open_stream()
            if time.monotonic() - last_write[0] >= KEEPALIVE_SECONDS:
                write(writer.keepalive if opened[0] else SSE_KEEPALIVE)

        try:
            if opened[0]:
                write(writer.opening())
            for kind, value, *extra in self._events(job, slot, keepalive):
                if kind == "error":
                    raise value
                open_stream(now=True)
                if not slot.held:  # the last event: counted before it leaves, as a plain response is
                    self._record_request()
                write(writer.event(kind, value, *extra))
        except APIError as exc:  # headers are out: the error becomes an event
            self.status_sent = int(exc.status)
            self._record_request()
            write(writer.failure(exc))

    def _start_stream(self, headers: dict[str, str]) -> None:
        self.send_response(HTTPStatus.OK)
        self.status_sent = HTTPStatus.OK
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Accel-Buffering", "no")
        for name, value in headers.items():
            self.send_header(name, value)
        self._send_common_headers()
        # No length is known ahead, so the end of the stream is the end of the connection.
        self.send_header("Connection", "close")
        self._close_after_response()
        self.end_headers()
        self.wfile.flush()

    def _write_raw(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except TimeoutError:  # the client stopped reading and its socket buffer is full
            raise ClientGone("write_stall") from None
        except (BrokenPipeError, ConnectionResetError, OSError):
            raise ClientGone from None

    # -- logging -------------------------------------------------------------

    def _log_request(self) -> None:
        prompt, completion = self.log_tokens
        log.info("%s %s %s prompt=%d completion=%d %.3fs", self.command, self.route_path,
                 self.status_sent or "-", prompt, completion, time.monotonic() - self.started)

    def log_message(self, format: str, *args: Any) -> None:
        # http.server's own lines (bad request lines, timeouts) go to debug;
        # every answered request gets one line from _log_request instead.
        """http.server's own lines (bad request lines, timeouts) at debug level."""
        log.debug("%s " + format, self.address_string(), *args)

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        """Nothing: every answered request gets one line from _log_request instead."""
        pass

    def _record_request(self) -> None:
        # Once per exchange, before its last byte leaves (a plain reply before its headers, a stream before its
        # last event), so a client that scrapes /metrics after reading its reply finds it counted.
        if self.counted:
            return
        self.counted = True
        path = self.route_path
        endpoint = path if path in self.PREFLIGHT_ROUTES else "other"  # raw paths would let clients mint series
        code = str(self.status_sent) if self.status_sent is not None else "499"
        self.server.metrics.record_request(endpoint, code, time.monotonic() - self.started)


PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")


# ---------------------------------------------------------------------------
# Server and main()
# ---------------------------------------------------------------------------

class LemServer(http.server.ThreadingHTTPServer):
    """The HTTP server: one loaded model, one engine, one admission gate.

    `start()` listens and serves on a background thread and returns once
    ready; `stop()` stops accepting, lets in-flight requests finish and closes.
    """

    daemon_threads = True
    allow_reuse_address = True
    # stop() waits for requests in flight, not for idle keep-alive connections to time out.
    block_on_close = False

    def __init__(self, settings: Settings, model: Model, static_dir: Path | None = None, group: Any = None):
        # Unset sampling fields take the command line's defaults, else the model folder's.
        self.settings = settings = dataclasses.replace(settings, sampling={**model.sampling, **settings.sampling})
        self.model = model
        self.memory = plan = plan_memory(settings, model)
        self.ledger = KVLedger(plan.kv_bytes)
        folder = None
        if settings.prompt_cache_dir is not None:
            folder = CacheFolder(Path(settings.prompt_cache_dir), model_identity(settings, model),
                                 settings.prompt_cache_disk_bytes)
        self.engine = Engine(model, settings.max_requests, plan.prompt_cache_bytes,
                             group=group, stall_seconds=settings.timeout, ledger=self.ledger, folder=folder)
        self.gate = threading.BoundedSemaphore(settings.max_requests)
        self.queue = AdmissionQueue(self.gate, self.ledger)
        log_memory_plan(plan, settings)
        self.active = 0           # generation slots taken
        self.in_flight = 0        # requests of any kind between their headers and their last byte
        self.connections = 0      # client connections open, each with its thread
        self.stopping = False
        self.active_lock = threading.Lock()
        self.idle = threading.Condition(self.active_lock)
        self.metrics = Metrics()
        self.responses = ResponseStore(settings.response_store_count, settings.response_store_bytes)
        self.created = int(time.time())
        self.started_at = time.monotonic()
        self.ready = threading.Event()
        self.page_html, self.chat_js = load_page(static_dir or Path(__file__).resolve().parent, settings)
        if ":" in settings.host:
            self.address_family = socket.AF_INET6
        super().__init__((settings.host, settings.port), Handler)

    @property
    def url(self) -> str:
        """The base URL clients use, with an IPv6 host in brackets."""
        host, port = self.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    def admit(self, slots: int = 1, kv_bytes: int = 0, gone: Callable[[], bool] = lambda: False) -> "Admission":
        """A context holding `slots` generation slots (one per choice) and `kv_bytes` of KV memory.

        Waits its turn up to --queue-timeout (AdmissionQueue.enter), then
        raises 429; raises ClientGone when `gone()` says the client left.
        """
        try:
            self.queue.enter(slots, kv_bytes, self.settings.queue_timeout, gone)
        except APIError:
            self.metrics.record_rejection()
            raise
        return Admission(self, slots, kv_bytes)

    @contextlib.contextmanager
    def exchange(self) -> Iterator[None]:
        """Count one request in flight, from its headers to its last byte, for stop() to wait on."""
        with self.idle:
            self.in_flight += 1
        try:
            yield
        finally:
            with self.idle:
                self.in_flight -= 1
                self.idle.notify_all()

    def metrics_text(self) -> str:
        """The /metrics body: the request counters plus the server's and engine's state now."""
        stats = self.engine.stats()
        return prometheus_text(self.metrics.families() + [
            gauge("lem_active_requests", "gauge", "Generation requests holding a slot.", self.active),
            gauge("lem_max_requests", "gauge", "Generation slots (--max-requests).", self.settings.max_requests),
            gauge("lem_in_flight_requests", "gauge", "HTTP requests being answered, of any kind.", self.in_flight),
            gauge("lem_open_connections", "gauge", "Client connections open.", self.connections),
            gauge("lem_tokens_generated_total", "counter", "Tokens sampled by the engine since start.",
                  stats["tokens_generated"]),
            gauge("lem_draft_tokens_proposed_total", "counter", "Tokens the --draft-model proposed.",
                  stats["draft_tokens_proposed"]),
            gauge("lem_draft_tokens_accepted_total", "counter", "Proposed draft tokens the model accepted.",
                  stats["draft_tokens_accepted"]),
            *self.memory_families(stats),
            gauge("lem_engine_up", "gauge", "1 while the generation engine runs, 0 once it has died.",
                  int(self.engine.alive)),
            gauge("lem_world_size", "gauge", "Processes the model is sharded over (mlx.launch ranks); 1 alone.",
                  self.engine.world_size),
            gauge("lem_rank", "gauge", "This process's rank in its group (the one serving HTTP is 0).", self.engine.rank),
            gauge("process_resident_memory_bytes", "gauge", "Resident memory of this process (peak on macOS).",
                  resident_memory_bytes()),
            gauge("lem_threads", "gauge", "Python threads alive in this process.", threading.active_count()),
            gauge("lem_uptime_seconds", "gauge", "Seconds since the server started.",
                  round(time.monotonic() - self.started_at, 3)),
        ])

    def memory_families(self, stats: dict) -> list[Family]:
        """The prompt cache's, the admission queue's and the KV memory's figures for /metrics."""
        return [
            gauge("lem_prompt_cache_hits_total", "counter", "Prompts that reused cached state.", stats["prompt_cache_hits"]),
            gauge("lem_prompt_cache_misses_total", "counter", "Prompts computed from scratch.", stats["prompt_cache_misses"]),
            gauge("lem_prompt_cache_entries", "gauge", "Entries in the prompt cache.", stats["prompt_cache_entries"]),
            gauge("lem_prompt_cache_bytes", "gauge", "Memory held by the prompt cache.", stats["prompt_cache_bytes"]),
            gauge("lem_prompt_cache_tokens", "gauge", "Tokens whose KV the prompt cache holds.",
                  stats["prompt_cache_tokens"]),
            gauge("lem_prompt_cache_budget_bytes", "gauge", "Most the prompt cache may hold (less while the running "
                  "batch needs the room).", self.memory.prompt_cache_bytes),
            gauge("lem_prompt_cache_evictions_total", "counter", "Prompt cache entries evicted, least recently used "
                  "first.", stats["prompt_cache_evictions"]),
            gauge("lem_prompt_cache_trims_total", "counter", "Prompt cache entries cut to their longest prefix that "
                  "fits the budget.", stats["prompt_cache_trims"]),
            gauge("lem_waiting_requests", "gauge", "Generation requests waiting in the admission queue.",
                  self.queue.waiting),
            gauge("lem_kv_reserved_bytes", "gauge", "KV memory reserved by admitted requests (prompt + max tokens "
                  "each).", self.ledger.reserved),
            gauge("lem_kv_memory_bytes", "gauge", "KV memory: the memory budget less the weights.", self.memory.kv_bytes),
        ]

    # -- connections: one thread each, at most MAX_CONNECTIONS ----------------

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Take a connection place, or refuse the connection (socketserver then closes it)."""
        with self.active_lock:
            admitted = self.connections < MAX_CONNECTIONS
            self.connections += admitted
        if not admitted:
            self.metrics.record_drop("too_many_connections")
            log.debug("refused a connection from %s: %d open", client_address[0], MAX_CONNECTIONS)
        return admitted

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start the connection's thread; if that fails, give its place under the cap back."""
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: nothing else will give the place back
            self._connection_closed()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Serve one connection on its thread, then count it closed, whatever happened."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connection_closed()

    def _connection_closed(self) -> None:
        with self.active_lock:
            self.connections -= 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection failed outside any request: resets are routine, anything else is a bug."""
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            log.debug("connection from %s ended: %r", client_address[0], exc)
        else:
            log.error("error on connection from %s: %r", client_address[0], exc, exc_info=exc)

    def health(self) -> dict:
        """The /healthz body; status "error" once the engine has died."""
        settings = self.settings
        engine = self.engine.stats()
        return {"status": "ok" if self.engine.alive else "error", "model": settings.model_name,
                "world_size": self.engine.world_size, "rank": self.engine.rank, "sharding": self.sharding,
                "uptime_seconds": int(time.monotonic() - self.started_at), "active_requests": self.active,
                "max_requests": settings.max_requests, "waiting_requests": self.queue.waiting, "max_threads": settings.threads or os.cpu_count(),
                "max_tokens": settings.max_tokens, "max_context": settings.max_context,
                "context_length": self.model.context_length, "sampling_defaults": settings.sampling,
                "thinking": bool(getattr(self.model.tokenizer, "has_thinking", False)),
                "speculative": self.speculative_health(engine), "embeddings": self.embeddings_health(),
                "prompt_cache": {"entries": engine["prompt_cache_entries"], "bytes": engine["prompt_cache_bytes"],
                                 "hits": engine["prompt_cache_hits"], "misses": engine["prompt_cache_misses"]}}

    def embeddings_health(self) -> dict | None:
        """What serves /v1/embeddings, for /healthz (the prompts are the instruction prefixes clients prepend)."""
        embedder = self.model.embedder
        if embedder is None:
            return None
        return {"model": embedder.name or self.settings.model_name, "pooling": embedder.pooling,
                "normalized": embedder.normalize, "dimensions": embedder.dimensions,
                "max_tokens": embedder.max_tokens(self.settings.max_embedding_tokens), "prompts": embedder.prompts}

    def speculative_health(self, engine: dict) -> dict | None:
        """Speculative decoding's figures for /healthz; None without a --draft-model."""
        if self.model.solo is None or self.model.solo.draft is None:
            return None
        proposed, accepted = engine["draft_tokens_proposed"], engine["draft_tokens_accepted"]
        return {"num_draft_tokens": self.model.solo.num_draft_tokens, "draft_tokens_proposed": proposed,
                "draft_tokens_accepted": accepted, "acceptance_rate": round(accepted / proposed, 4) if proposed else None}
    @property
    def sharding(self) -> str:
        """How the model is split over the group's ranks: none, tensor or pipeline."""
        if self.engine.world_size == 1:
            return "none"
        return "pipeline" if self.settings.pipeline else "tensor"

    def start(self) -> "LemServer":
        """Start the engine and serve on a background thread; return when ready."""
        self.engine.start()
        self.engine.started.wait()  # with --prompt-cache-dir, once the saved prefixes are back
        threading.Thread(target=self._serve, name="lem-http", daemon=True).start()
        self.ready.wait()
        return self

    def _serve(self) -> None:
        self.ready.set()
        self.serve_forever(poll_interval=0.1)

    def stop(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> bool:
        """Stop accepting, wait up to `grace` s for in-flight requests, close.

        Returns True when every request finished in time. A request counts
        until its last byte is written, not just until its slot is free.
        The listening socket closes first, so new connections are refused at
        once (a load balancer tries another replica) rather than left waiting.
        """
        self.stopping = True
        self.shutdown()
        self.socket.close()
        drained = self.wait_idle(grace)
        self.engine.stop()
        if self.engine.failure is None:  # a failed group's engine may be stuck in a collective for good
            self.engine.thread.join(timeout=5 + SHUTDOWN_GRACE_SECONDS * (self.engine.folder is not None))
        self.server_close()
        return drained


    def wait_idle(self, grace: float) -> bool:
        """Wait up to `grace` s for a moment with no request in flight; True if one came."""
        with self.idle:
            # A request holding a slot is in flight too, so this also waits for every slot.
            return self.idle.wait_for(lambda: self.in_flight == 0, timeout=grace)


class AdmissionQueue:
    """Requests waiting for generation slots and KV memory, admitted in arrival order.

    A slot is a permit of the server's BoundedSemaphore (--max-requests); the
    memory is the request's worst-case KV cache, reserved in the KVLedger so
    that the running batch never outgrows the machine. A request takes both
    at once, only when every earlier one has, and waits for them up to
    --queue-timeout seconds (0: not at all); then it gets 429 with a
    Retry-After estimated from how fast slots have been freed.
    """

    def __init__(self, gate: threading.BoundedSemaphore, ledger: KVLedger):
        self.gate, self.ledger = gate, ledger
        self.changed = threading.Condition()
        self.line: collections.deque = collections.deque()   # tickets of waiting requests, first come first
        self.releases: collections.deque = collections.deque(maxlen=RELEASES_REMEMBERED)  # when slots came free

    @property
    def waiting(self) -> int:
        """How many requests wait for a slot now."""
        return len(self.line)

    def enter(self, slots: int, kv_bytes: int, timeout: float, gone: Callable[[], bool]) -> None:
        """Take `slots` permits and reserve `kv_bytes`, waiting behind earlier arrivals up to `timeout` s.

        Raises server_busy (429) when the time is up and ClientGone as soon as
        `gone()` says the client has left; either way its place in line goes.
        """
        ticket = object()
        deadline = time.monotonic() + timeout
        with self.changed:
            self.line.append(ticket)
            try:
                while not (self.line[0] is ticket and self._take(slots, kv_bytes)):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise server_busy(self.retry_after(slots), timeout)
                    self.changed.wait(min(left, POLL_SECONDS))
                    if gone():
                        raise ClientGone
            finally:
                self.line.remove(ticket)
                self.changed.notify_all()

    def release(self, slots: int, kv_bytes: int) -> None:
        """Give back what enter() took; the next in line may go."""
        for _ in range(slots):
            self.gate.release()
        self.ledger.release(kv_bytes)
        with self.changed:
            self.releases.append(time.monotonic())
            self.changed.notify_all()

    def retry_after(self, slots: int) -> int:
        """Seconds until `slots` more slots are likely free, at the rate slots have been freed lately."""
        times = list(self.releases)
        if len(times) < 2 or times[-1] <= times[0]:
            return RETRY_AFTER_SECONDS
        rate = (len(times) - 1) / (times[-1] - times[0])
        return int(min(RETRY_AFTER_MAX_SECONDS, max(RETRY_AFTER_SECONDS, math.ceil((len(self.line) + slots) / rate))))

    def _take(self, slots: int, kv_bytes: int) -> bool:
        taken = 0
        while taken < slots and self.gate.acquire(blocking=False):
            taken += 1
        if taken == slots and self.ledger.reserve(kv_bytes):
            return True
        for _ in range(taken):
            self.gate.release()
        return False


class Admission:
    """Holds `slots` permits of the server's gate and `kv_bytes` of KV memory until released (at most once)."""

    def __init__(self, server: LemServer, slots: int = 1, kv_bytes: int = 0):
        self.server = server
        self.slots = slots
        self.kv_bytes = kv_bytes
        self.held = True
        with server.active_lock:
            server.active += slots

    def __enter__(self) -> "Admission":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def release(self) -> None:
        """Give the permit back; later calls do nothing."""
        server = self.server
        with server.idle:
            if not self.held:
                return
            self.held = False
            server.active -= self.slots
            server.idle.notify_all()
        server.queue.release(self.slots, self.kv_bytes)


def log_memory_plan(plan: MemoryPlan, settings: Settings) -> None:
    """One startup line: memory, weights, KV per token, and the prompt cache budget in bytes and tokens."""
    log.info("memory: %d bytes (%s), weights %d, KV %d bytes/token%s: prompt cache budget %d bytes = %d tokens; "
             "running batch up to %d bytes = %d tokens", plan.memory_bytes, plan.source, plan.weights_bytes,
             plan.token_bytes, f" (--kv-bits {settings.kv_bits})" if settings.kv_bits else "",
             plan.prompt_cache_bytes, plan.tokens(plan.prompt_cache_bytes), plan.kv_bytes, plan.tokens(plan.kv_bytes))


def load_page(folder: Path, settings: Settings) -> tuple[bytes, bytes]:
    """chat.html with the model name and token limit filled in, and chat.js."""
    try:
        page = (folder / "chat.html").read_text(encoding="utf-8")
        script = (folder / "chat.js").read_bytes()
    except OSError:
        page = "<!doctype html><title>lem-serve</title><p>chat.html is missing beside lem_serve.py.</p>"
        script = b""
    page = (page.replace("{{MODEL_NAME}}", html.escape(settings.model_name))
                .replace("{{MAX_TOKENS}}", str(settings.max_tokens)))
    return page.encode("utf-8"), script


def main(argv: list[str] | None = None) -> int:
    """Run the server until SIGINT/SIGTERM; return the process exit code.

    Under mlx.launch every rank runs this: each loads its shard of the model,
    rank 0 serves HTTP (serve) and the others run the engine only (follow).
    """
    settings = parse_settings(argv)
    group = join_group(settings)
    rank, size = (group.rank(), group.size()) if group is not None else (0, 1)
    where = f"rank {rank}/{size} " if group is not None else ""
    logging.basicConfig(level=settings.log_level.upper(), format=f"%(asctime)s {where}%(levelname)s %(message)s")
    if group is not None:
        quiet_launcher(os.getppid())
    if settings.pipeline and group is None:
        print("lem_serve: --pipeline shards the model over the processes of an mlx.launch group; "
              "this one runs alone", file=sys.stderr)
        return 2
    if settings.draft_model or settings.kv_bits:
        log.info("--draft-model and --kv-bits generate one sequence at a time: --max-requests 1, others queue")
    if rank == 0 and not settings.is_loopback and not settings.api_key:
        log.warning("listening on %s without --api-key: anyone who can reach this port can use the model",
                    settings.host)
    try:
        model = load_model(settings, group)
    except Exception as exc:
        reason = " ".join(str(exc).split())  # one line, whatever the loader's message looks like
        print(f"lem_serve: {where}cannot load model from {settings.model_path!r}: {reason}", file=sys.stderr)
        return 2
    return serve(settings, model, group) if rank == 0 else follow(settings, model, group)


def on_stop_signals(handler: Callable[[int], None], group: Any) -> None:
    """Call handler(signum) on SIGINT and SIGTERM, and in a group on SIGHUP too.

    A rank that mlx.launch started over ssh gets SIGHUP when its session ends.
    """
    signals = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGHUP,) if group is not None else ())
    for sig in signals:
        signal.signal(sig, lambda signum, _frame: handler(signum))


def serve(settings: Settings, model: Model, group: Any) -> int:
    """Rank 0 (or a lone process): serve HTTP until a signal, a stop vote or the group's failure."""
    try:
        server = LemServer(settings, model, group=group)
    except OSError as exc:
        print(f"lem_serve: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    stop_requested = threading.Event()
    on_stop_signals(lambda _signum: stop_requested.set(), group)
    server.start()
    engine = server.engine
    log.info("lem-serve %s serving %s on %s (max_requests=%d, max_tokens=%d%s)", __version__,
             settings.model_name, server.url, settings.max_requests, settings.max_tokens,
             f", {server.sharding} parallel over {engine.world_size} ranks" if group is not None else "")
    while not stop_requested.wait(POLL_SECONDS * 5):
        if group is not None and (engine.failure is not None or engine.drain_requested.is_set()):
            break
    return shut_down(server, group)


def shut_down(server: LemServer, group: Any) -> int:
    """Drain and close the server; the exit code: 1 when its group has failed, else 0.

    A failed group's rank 0 keeps answering (503, /healthz error) until the
    requests in flight have ended, then stops at once.
    """
    def failed() -> bool:
        return group is not None and server.engine.failure is not None

    if failed():
        log.critical("the group has failed: answering 503 until requests in flight have ended")
        drained = server.wait_idle(SHUTDOWN_GRACE_SECONDS)
        server.stop(grace=0)
    else:
        log.info("shutting down: waiting up to %.0f s for %d in-flight request(s)",
                 SHUTDOWN_GRACE_SECONDS, server.in_flight)
        drained = server.stop()
    if failed():
        log.critical("the group has failed (%s): exiting 1 so that a supervisor restarts it", server.engine.failure)
        return 1
    log.info("stopped %s", "cleanly" if drained else "with requests still running")
    return 0


def follow(settings: Settings, model: Model, group: Any) -> int:
    """Another rank: run the engine as rank 0 directs until it shuts the group down or the group fails.

    A signal here does not stop this rank on its own (rank 0 would be left
    mid-step): it asks rank 0 to drain the whole group.
    """
    engine = Engine(model, settings.max_requests, plan_memory(settings, model).prompt_cache_bytes, group=group,
                    stall_seconds=settings.timeout)

    def vote(signum: int) -> None:
        log.info("%s: asking rank 0 to drain the group", signal.Signals(signum).name)
        engine.link.stop_voted = True

    on_stop_signals(vote, group)
    engine.start()
    log.info("lem-serve %s holding its shard of %s for rank 0", __version__, settings.model_name)
    while not engine.finished.wait(POLL_SECONDS * 5):
        pass
    if engine.failure is not None:
        log.critical("the group has failed (%s): exiting 1 so that a supervisor restarts it", engine.failure)
        return 1
    log.info("stopped cleanly")
    return 0


if __name__ == "__main__":
    if (problem := runtime_problem()) is not None:
        print(problem, file=sys.stderr)
        sys.exit(2)
    exit_code = main()
    logging.shutdown()
    with contextlib.suppress(OSError):  # under mlx.launch, the launcher reading our output may be gone
        sys.stdout.flush()
        sys.stderr.flush()
    # Leave without interpreter finalization: once MLX has generated, its C++
    # worker threads abort the process ("terminate called without an active
    # exception", exit 134) if static destructors run while they are joinable.
    os._exit(exit_code)
