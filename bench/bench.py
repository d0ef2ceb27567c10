#!/usr/bin/env python3
"""Benchmark lem-serve against mlx_lm.server and raw mlx_lm, on one model folder.

What it measures (every system gets the same chat prompts, greedy decoding and
the same max_tokens; prompts go through the model's chat template):

1. Single stream: streaming tokens/s of
   * lem-serve (``lem_serve.py``, a subprocess, streaming SSE),
   * mlx_lm.server (``python -m mlx_lm server``, a subprocess, streaming SSE),
   * raw ``mlx_lm.stream_generate``: the library called directly, no HTTP, in
     a worker subprocess started like the servers (see raw_worker() for why).
   "decode tok/s" is (completion tokens - 1) / (last token - first token): the
   generation rate, prompt processing excluded.  "e2e tok/s" is completion
   tokens / (request sent -> generation ended), prompt included.  Prompts
   differ from their first message on, so the servers' prompt caches cannot
   skip the prompt (raw mlx_lm has none).  A repetition counts only when all
   three produced the same number of tokens.
2. Concurrency 1, 4 and 8: aggregate completion tokens/s (all tokens / wall
   time from the first request sent to the last token) and time to first
   token (TTFT, request sent -> first content chunk) p50/p95, for lem-serve,
   mlx_lm.server and raw ``mlx_lm`` batch generation (the loop of
   ``mlx_lm.batch_generate``, timed per token, same prompts and max_tokens).
   The HTTP clients are threads using http.client, all released together.
3. Multi-turn prompt cache: a chat with a long history (~2,000 tokens on the
   tiny model, ~400 on "small" whose prompt processing is slow on CPU) plus a
   new user message, TTFT "cold" (first time the server
   sees it) vs "cached" (the same history + the model's answer + a new user
   message: a real follow-up).  lem-serve runs with ``--max-context 0`` (its
   sliding window would otherwise drop the history) and its default prompt
   cache; mlx_lm.server with its default prompt cache.
4. Structured output (lem-serve alone, SmolLM2 and tiny): the same chat
   prompt with and without ``response_format`` json_schema for a
   Pydantic-shaped schema (testing/schemas.py's Person), greedy; decode tok/s
   of each, interleaved, and their ratio (target >= 0.80).  "first-request
   cost" is how much longer the first constrained request takes than the
   median warm one (same greedy tokens): building the token table and masks.
5. Agent-shaped turns (``--agent``): what Claude Code and Codex send every
   turn, a ~20,000-token prefix of instructions and tool definitions, then a
   short task; TTFT of turn 1 "cold" and of turn 2 (the same prefix, the
   answer and a new message) "cached", lem-serve against mlx_lm.server on the
   same chat completion (tools in the request's ``tools``).  It uses its own
   model, "agent": the tiny sizes with a 4,096-token vocabulary and a 1M-token
   context (the tiny test model's context is 4,096 tokens).

Run it (from the repository root, venv active):

    python bench/bench.py                  # tiny + small models, ~10 min on 2 cores
    python bench/bench.py --quick          # both models, small sizes, ~2 min
    python bench/bench.py --model small    # one model: tiny, small or a folder
    python bench/bench.py --smollm2        # also the real SmolLM2-135M (4-bit)
    python bench/bench.py --agent          # only the agent-shaped case, ~10 min on 2 cores
    python bench/bench.py --structured smollm2   # only test 4, on one model; publishes nothing

The random-weight test models are built once into bench/results/models/.
Results go to bench/results/ (bench.json, bench.md, bench.png, server logs)
and the markdown tables also to bench/RESULTS.md, the chart to bench/chart.png
(not with --quick).

How to read it: this machine is shared and noisy, so look at the ratios, not
the absolute numbers.  Systems are interleaved repetition by repetition (the
order rotating) so that load changes hit all of them alike; a ratio is the
median of the per-repetition ratios.  "lem/raw" near 1.00 means the server
adds next to nothing on top of mlx_lm itself; "lem/mlx_lm.server" > 1 means
lem-serve is faster.  Load averages at start and end are recorded in the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MODELS = RESULTS / "models"
LEM = "lem-serve"
MLX_SERVER = "mlx_lm.server"
RAW = "raw mlx_lm"
SYSTEMS = (LEM, MLX_SERVER, RAW)
START_TIMEOUT = 300      # seconds a server may take to load its model
REQUEST_TIMEOUT = 900    # seconds one streamed request may take (slow prefill on CPU)

# Prose to fill the multi-turn history with: words that any of the models'
# tokenizers split into ordinary tokens.
FILLER = (
    "The server answers requests from clients over HTTP and streams tokens as "
    "they are generated. Good tests are small, fast and repeatable. The quick "
    "brown fox jumps over the lazy dog while the weather stays sunny and warm. "
)


# ---------------------------------------------------------------------------
# Plans: how much of each test to run per model
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """Sizes of each test for one model (chosen so a full run fits ~10 min)."""

    single_tokens: int = 256             # max_tokens of the single-stream test
    single_reps: int = 5                 # measured repetitions (after one warm-up)
    levels: tuple[int, ...] = (1, 4, 8)  # concurrency levels
    conc_tokens: int = 128               # max_tokens per request under concurrency
    conc_rounds: int = 2                 # repetitions of each concurrency level
    history_tokens: int = 2000           # multi-turn history length; 0 skips the test
    cache_reps: int = 3                  # fresh conversations in the cache test
    cache_tokens: int = 16               # max_tokens of each turn in the cache test
    structured_reps: int = 0             # repetitions of the structured-output test; 0 skips it
    structured_tokens: int = 256         # max_tokens there (room for the model's own answer)


PLANS = {
    # tiny generates ~1,000 tok/s, so a request lasts well under a second:
    # many repetitions to get a median through the noise.
    "tiny": Plan(single_reps=10, conc_rounds=3, structured_reps=5),
    # Prompt processing on this CPU runs at ~15-40 tokens/s for "small", so
    # its prompts and histories are kept short to fit the time budget.
    "small": Plan(single_tokens=128, single_reps=5, conc_tokens=64, conc_rounds=2,
                  history_tokens=300, cache_reps=2, cache_tokens=8),
    # The real model: ~7 tok/s here and ~12 prompt tokens/s, so a short row.
    "smollm2": Plan(single_tokens=48, single_reps=3, levels=(4,), conc_tokens=24,
                    conc_rounds=2, history_tokens=0, cache_reps=0, structured_reps=3),
}
QUICK = dict(single_tokens=64, single_reps=3, levels=(1, 4), conc_tokens=16, conc_rounds=1, structured_reps=2,
             history_tokens=1000, cache_reps=1, cache_tokens=8)


def plan_for(name: str, quick: bool) -> Plan:
    """The plan of a model name (a folder gets the "small" plan), shrunk for --quick."""
    plan = PLANS.get(name, PLANS["small"])
    if not quick:
        return plan
    shrunk = {k: min(v, getattr(plan, k)) for k, v in QUICK.items() if k != "levels"}
    shrunk["levels"] = tuple(l for l in plan.levels if l in QUICK["levels"]) or plan.levels
    return replace(plan, **shrunk)


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------

def median(values: list[float]) -> float | None:
    """Median, or None for no data."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def percentile(values: list[float], q: float) -> float | None:
    """q-th percentile (0..100) with linear interpolation, or None for no data."""
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    pos = (len(values) - 1) * q / 100
    low, high = int(pos), min(int(pos) + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (pos - low)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing."""
    return a / b if a is not None and b else None


def rotated(items: tuple, by: int) -> tuple:
    """items rotated left by `by`: the run order changes each repetition."""
    by %= len(items)
    return items[by:] + items[:by]


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------

AGENT_MODEL = "agent"        # the agent case's model: tiny sizes, 4,096-token vocabulary, 1M-token context
AGENT_PREFIX_TOKENS = 20_000  # instructions + tool definitions, as a coding agent resends every turn
AGENT_REPS = 3                # fresh prefixes per system
AGENT_TOKENS = 16             # max_tokens of each turn


def prepare_model(name: str) -> Path:
    """The folder of model `name` (tiny, small, smollm2, agent or a path), built once."""
    if name not in PLANS and name != AGENT_MODEL:
        path = Path(name).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise SystemExit(f"bench: {name!r} is not tiny, small or a model folder")
        return path
    path = MODELS / name
    if (path / "config.json").is_file():
        return path
    print(f"building model {name} into {path} ...", flush=True)
    if name == "smollm2":
        command = [sys.executable, str(ROOT / "tools" / "gguf_to_mlx.py"), "--smollm2", str(path)]
    elif name == AGENT_MODEL:
        command = [sys.executable, str(ROOT / "testing" / "tiny_model.py"), str(path), "--preset", "tiny",
                   "--vocab-size", "4096", "--max-position-embeddings", str(1 << 20)]
    else:
        command = [sys.executable, str(ROOT / "testing" / "tiny_model.py"), str(path), "--preset", name]
    subprocess.run(command, check=True, cwd=ROOT)
    return path


def model_label(name: str, path: Path) -> str:
    """A short description of the model for the tables."""
    config = json.loads((path / "config.json").read_text())
    sizes = f"hidden {config.get('hidden_size')}, {config.get('num_hidden_layers')} layers"
    quant = config.get("quantization")
    bits = f", {quant.get('bits')}-bit" if isinstance(quant, dict) and quant.get("bits") else ""
    return f"{name} ({sizes}{bits})"


# ---------------------------------------------------------------------------
# Server subprocesses
# ---------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def lem_supports(flag: str) -> bool:
    """Whether this checkout's lem_serve.py has a command-line flag (it changes)."""
    text = (ROOT / "lem_serve.py").read_text(encoding="utf-8")
    return f'"{flag}"' in text


class ServerProcess:
    """One HTTP server subprocess: started in its own session, always killed."""

    stdin = None   # what its stdin is (subprocess's stdin argument); None: this script's own

    def __init__(self, name: str, argv: list[str], health_path: str, log_path: Path):
        self.name, self.argv, self.health_path, self.log_path = name, argv, health_path, log_path
        self.port = int(argv[argv.index("--port") + 1]) if "--port" in argv else \
            int(argv[argv.index("--bind") + 1].rsplit(":", 1)[1])
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ServerProcess":
        """Launch and wait until the health endpoint answers 200."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        # A session of its own, so stop() can signal the server and any child it spawns.
        self.proc = subprocess.Popen(self.argv, stdin=self.stdin, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            if self._healthy():
                return self
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} not ready after {START_TIMEOUT} s; see {self.log_path}")

    def _healthy(self) -> bool:
        """True once the health endpoint answers 200."""
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            conn.request("GET", self.health_path)
            ok = conn.getresponse().status == 200
            conn.close()
            return ok
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL it if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


def lem_server(model: Path, tag: str, max_requests: int) -> ServerProcess:
    """lem-serve with as many slots as the top concurrency and no sliding window."""
    port = free_port()
    argv = [sys.executable, str(ROOT / "lem_serve.py"), "--model-path", str(model),
            "--bind", f"127.0.0.1:{port}", "--max-requests", str(max_requests),
            "--max-context", "0", "--log-level", "warning"]
    return ServerProcess(LEM, argv, "/healthz", RESULTS / "logs" / f"{tag}-lem-serve.log")


def mlx_server(model: Path, tag: str) -> ServerProcess:
    """mlx_lm.server with its defaults (batching and prompt cache on)."""
    port = free_port()
    argv = [sys.executable, "-m", "mlx_lm", "server", "--model", str(model),
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "WARNING"]
    return ServerProcess(MLX_SERVER, argv, "/health", RESULTS / "logs" / f"{tag}-mlx_lm.server.log")


# ---------------------------------------------------------------------------
# One measured generation
# ---------------------------------------------------------------------------

@dataclass
class Sample:
    """Timings of one generation, all from time.perf_counter()."""

    sent: float
    first: float | None = None       # first content (server) / first token (raw)
    end: float | None = None         # generation finished
    tokens: int = 0                  # completion tokens
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    text: str = ""
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.first - self.sent if self.first is not None else None

    @property
    def decode_tps(self) -> float | None:
        """Generation rate: tokens after the first over the time they took."""
        if self.first is None or self.end is None or self.tokens < 2 or self.end <= self.first:
            return None
        return (self.tokens - 1) / (self.end - self.first)

    @property
    def e2e_tps(self) -> float | None:
        return self.tokens / (self.end - self.sent) if self.end and self.tokens else None


def stream_chat(port: int, messages: list[dict], max_tokens: int, **fields) -> Sample:
    """POST a streaming chat completion (with `fields` added) and time its chunks."""
    body = json.dumps({"messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
                       "stream": True, "stream_options": {"include_usage": True}, **fields})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT)
    sample = Sample(sent=time.perf_counter())
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            sample.error = f"HTTP {response.status}: {response.read()[:200]!r}"
            return sample
        read_events(response, sample)
    except OSError as exc:
        sample.error = repr(exc)
    finally:
        conn.close()
    return sample


def read_events(response: http.client.HTTPResponse, sample: Sample) -> None:
    """Consume an SSE stream into `sample`: first/last content times, usage, text."""
    pieces = []
    for raw in iter(response.readline, b""):
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        event = json.loads(data)
        now = time.perf_counter()
        for choice in event.get("choices") or []:
            content = (choice.get("delta") or {}).get("content")
            if content:
                pieces.append(content)
                sample.first = sample.first or now
                sample.end = now
            if choice.get("finish_reason"):
                sample.end = now
        usage = event.get("usage")
        if usage:
            sample.tokens = usage.get("completion_tokens") or 0
            sample.prompt_tokens = usage.get("prompt_tokens")
            sample.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    sample.text = "".join(pieces)
    if sample.tokens == 0 and not sample.error:
        sample.error = "no usage chunk in the stream"


def raw_stream(model, tokenizer, messages: list[dict], max_tokens: int) -> dict:
    """mlx_lm.stream_generate, greedy (its default sampler); times relative to the call."""
    import mlx_lm
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    sent, first, end, response = time.perf_counter(), None, None, None
    for response in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
        now = time.perf_counter()
        if response.text and first is None:
            first = now
        end = now
    return relative(sent, first, end, response.generation_tokens if response else 0, len(prompt))


def raw_batch(model, tokenizer, conversations: list[list[dict]], max_tokens: int) -> list[dict]:
    """mlx_lm.batch_generate's loop (BatchGenerator, same defaults), timed per token."""
    from mlx_lm.generate import BatchGenerator
    prompts = [tokenizer.apply_chat_template(m, add_generation_prompt=True) for m in conversations]
    sent = time.perf_counter()
    gen = BatchGenerator(model, stop_tokens=[[t] for t in tokenizer.eos_token_ids])
    uids = gen.insert(prompts, [max_tokens] * len(prompts))
    first, end, tokens = {}, {}, dict.fromkeys(uids, 0)
    try:
        while responses := gen.next_generated():
            now = time.perf_counter()
            for r in responses:
                first.setdefault(r.uid, now)
                if r.finish_reason != "stop":  # an EOS token is not part of the completion
                    tokens[r.uid] += 1
                if r.finish_reason is not None:
                    end[r.uid] = now
    finally:
        gen.close()
    return [relative(sent, first.get(u), end.get(u), tokens[u], len(p)) for u, p in zip(uids, prompts)]


def relative(sent: float, first: float | None, end: float | None, tokens: int, prompt_tokens: int) -> dict:
    """A raw result as seconds since the request, to cross the process boundary."""
    return {"first": None if first is None else first - sent, "end": None if end is None else end - sent,
            "tokens": tokens, "prompt_tokens": prompt_tokens}


def raw_worker(model_path: str) -> None:
    """The raw mlx_lm side, in its own process: JSON requests on stdin, answers on stdout.

    Raw generation runs in a subprocess started exactly like the servers (its
    own session) because Linux schedules each session as one group
    (sched_autogroup): in-process, raw mlx_lm shared the benchmark's group and
    ran up to 2x slower than the servers whenever the machine was loaded.
    """
    import mlx_lm
    model, tokenizer = mlx_lm.load(model_path)
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing but answers on the real stdout
    out.write(WORKER_READY + "\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        if op == "stream":
            answer = raw_stream(model, tokenizer, request["messages"], request["max_tokens"])
        elif op == "batch":
            answer = raw_batch(model, tokenizer, request["conversations"], request["max_tokens"])
        else:  # "count": prompt tokens of a chat, to size the multi-turn history
            answer = len(tokenizer.apply_chat_template(request["messages"], add_generation_prompt=True))
        out.write(json.dumps(answer) + "\n")
        out.flush()
    out.close()
    # Skip interpreter finalization: MLX's worker threads can abort it (exit 134).
    os._exit(0)


WORKER_READY = "raw-worker-ready"


class RawWorker:
    """The bench's handle on the raw_worker subprocess."""

    name = RAW

    def __init__(self, model: Path, tag: str):
        self.argv = [sys.executable, str(Path(__file__).resolve()), "--raw-worker", str(model)]
        self.log_path = RESULTS / "logs" / f"{tag}-raw.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "RawWorker":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=log, cwd=ROOT, text=True, start_new_session=True)
        if self.proc.stdout.readline().strip() != WORKER_READY:
            raise RuntimeError(f"raw worker failed to start; see {self.log_path}")
        return self

    def call(self, **request):
        """Send one request, wait for its answer."""
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"raw worker died; see {self.log_path}")
        return json.loads(line)

    def stream(self, messages: list[dict], max_tokens: int) -> "Sample":
        return to_sample(self.call(op="stream", messages=messages, max_tokens=max_tokens))

    def batch(self, conversations: list[list[dict]], max_tokens: int) -> list["Sample"]:
        answers = self.call(op="batch", conversations=conversations, max_tokens=max_tokens)
        return [to_sample(a) for a in answers]

    def count(self, messages: list[dict]) -> int:
        return self.call(op="count", messages=messages)

    def stop(self) -> None:
        """Close its stdin (it exits), kill it if it does not."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)


def to_sample(answer: dict) -> "Sample":
    """A raw worker's answer as a Sample (sent at 0)."""
    return Sample(sent=0.0, first=answer["first"], end=answer["end"], tokens=answer["tokens"],
                  prompt_tokens=answer["prompt_tokens"])


def run_concurrent(port: int, conversations: list[list[dict]], max_tokens: int) -> list[Sample]:
    """One streaming request per conversation, all sent at once from threads."""
    samples: list[Sample | None] = [None] * len(conversations)
    barrier = threading.Barrier(len(conversations))

    def client(i: int) -> None:
        barrier.wait()
        samples[i] = stream_chat(port, conversations[i], max_tokens)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(conversations))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return samples


def aggregate_tps(samples: list[Sample]) -> float | None:
    """All completion tokens over the wall time from first send to last token."""
    ends = [s.end for s in samples if s.end]
    if not ends or any(s.error for s in samples):
        return None
    return sum(s.tokens for s in samples) / (max(ends) - min(s.sent for s in samples))


# ---------------------------------------------------------------------------
# The three tests
# ---------------------------------------------------------------------------

def story_prompt(i: int) -> list[dict]:
    """A distinct short chat prompt: i differs per repetition or per client."""
    # The number opens the system message, so two prompts share only the
    # template's first few tokens: a server's prompt cache cannot skip the
    # prompt, and raw mlx_lm (which has no cache) is compared like for like.
    return [{"role": "system", "content": f"{i + 1}. You are a helpful assistant."},
            {"role": "user", "content": "Write a long story about a fox and a crow."}]


class Runner:
    """Runs the tests for one model against its two servers and the raw model."""

    def __init__(self, plan: Plan, raw: RawWorker, ports: dict[str, int], path: Path):
        self.plan, self.raw, self.ports, self.path = plan, raw, ports, path

    def one(self, system: str, messages: list[dict], max_tokens: int) -> Sample:
        """One single-stream generation on `system`."""
        if system == RAW:
            return self.raw.stream(messages, max_tokens)
        return stream_chat(self.ports[system], messages, max_tokens)

    def many(self, system: str, conversations: list[list[dict]], max_tokens: int) -> list[Sample]:
        """Concurrent generations on `system`."""
        if system == RAW:
            return self.raw.batch(conversations, max_tokens)
        return run_concurrent(self.ports[system], conversations, max_tokens)

    def warm_up(self) -> None:
        """Load, compile and fill caches everywhere, so no first-call cost is measured."""
        for system in SYSTEMS:
            self.one(system, story_prompt(90_000), 8)
            self.many(system, [story_prompt(90_001 + i) for i in range(2)], 4)

    def single_stream(self) -> dict:
        """Test 1: interleaved repetitions, each with a fresh prompt."""
        plan, reps = self.plan, []
        for rep in range(plan.single_reps):
            messages = story_prompt(rep)
            row = {s: self.one(s, messages, plan.single_tokens) for s in rotated(SYSTEMS, rep)}
            counts = {s: row[s].tokens for s in SYSTEMS}
            valid = len(set(counts.values())) == 1 and not any(row[s].error for s in SYSTEMS)
            reps.append({"valid": valid, "tokens": counts,
                         **{s: summary(row[s]) for s in SYSTEMS}})
            progress(f"  single rep {rep + 1}/{plan.single_reps}: " + ", ".join(
                f"{s} {fmt(row[s].decode_tps)} tok/s ({row[s].tokens} tok)" for s in SYSTEMS)
                + ("" if valid else "  [token counts differ: excluded]"))
        return summarize_single(reps)

    def concurrency(self) -> dict:
        """Test 2: each level `conc_rounds` times, systems interleaved."""
        plan, out = self.plan, {}
        runs = {(level, s): [] for level in plan.levels for s in SYSTEMS}
        step = 0
        for rnd in range(plan.conc_rounds):
            for level in plan.levels:
                # Never a prompt a server has seen before: its prompt cache would skip the work.
                conversations = [story_prompt(10_000 * (rnd + 1) + 100 * level + i) for i in range(level)]
                for system in rotated(SYSTEMS, step):
                    samples = self.many(system, conversations, plan.conc_tokens)
                    runs[(level, system)].append(samples)
                    progress(f"  c={level} round {rnd + 1}: {system} {fmt(aggregate_tps(samples))} tok/s, "
                             f"TTFT p50 {fmt_ms(median([s.ttft for s in samples]))}")
                step += 1
        for level in plan.levels:
            out[str(level)] = {s: summarize_level(runs[(level, s)], level * plan.conc_tokens)
                               for s in SYSTEMS}
        return out

    def prompt_cache(self) -> dict:
        """Test 3: cold vs follow-up TTFT on a long, fresh conversation per repetition."""
        plan = self.plan
        rows = {LEM: [], MLX_SERVER: []}
        for rep in range(plan.cache_reps):
            for system in rotated((LEM, MLX_SERVER), rep):
                # A fresh tag per conversation, so no server has seen its prefix.
                history = build_history(self.raw.count, plan.history_tokens, uuid.uuid4().hex[:8])
                rows[system].append(self.follow_up(system, history))
                r = rows[system][-1]
                progress(f"  cache rep {rep + 1}: {system} cold {fmt_ms(r['cold_ttft'])} "
                         f"cached {fmt_ms(r['cached_ttft'])} (cached tokens {r['cached_tokens']})")
        return {s: summarize_cache(rows[s]) for s in rows} | {
            "history_tokens": self.raw.count(build_history(self.raw.count, plan.history_tokens, "00000000"))}

    def follow_up(self, system: str, history: list[dict]) -> dict:
        """Turn 1 on a new history (cold), then the follow-up turn (cached)."""
        first_turn = history + [{"role": "user", "content": "Summarise our conversation so far."}]
        return two_turns(self.ports[system], first_turn, "Thanks. And in one word?", self.plan.cache_tokens)


def two_turns(port: int, first_turn: list[dict], next_message: str, max_tokens: int,
              tools: list[dict] | None = None) -> dict:
    """Turn 1 (cold), then turn 2: turn 1, its answer and `next_message` (its prefix cached)."""
    fields = {"tools": tools} if tools else {}
    cold = stream_chat(port, first_turn, max_tokens, **fields)
    second_turn = first_turn + [{"role": "assistant", "content": cold.text}, {"role": "user", "content": next_message}]
    cached = stream_chat(port, second_turn, max_tokens, **fields)
    return {"cold_ttft": cold.ttft, "cached_ttft": cached.ttft, "prompt_tokens": cached.prompt_tokens,
            "cached_tokens": cached.cached_tokens, "error": cold.error or cached.error}


    def structured(self) -> dict:
        """Test 4: the same prompt constrained by a Pydantic-shaped schema and not, on lem-serve."""
        return structured_test(self.ports[LEM], self.plan) | {"mask_cost": mask_cost(self.path)}


STRUCTURED_PROMPT = [{"role": "user", "content": "Describe a person as JSON: id, name, email, age, birth date, "
                      "last update, wake-up time, role, tags, address, two scores and a lucky number."}]


def person_schema() -> dict:
    """testing/schemas.py's Person: what Pydantic's model_json_schema() writes for a typical model."""
    sys.path.insert(0, str(ROOT))
    from testing.schemas import PYDANTIC
    return PYDANTIC["person"]


PERSON_ANSWER = {"id": "123e4567-e89b-12d3-a456-426614174000", "name": "John Smith", "email": "john.smith@example.com",
                 "age": 42, "height_m": 1.82, "born": "1981-04-12", "updated": "2024-05-06T07:08:09Z",
                 "wake_up": "07:30:00Z", "role": "user", "tags": ["friendly", "tall"],
                 "address": {"street": "1 Main Street", "city": "Springfield", "postcode": "12345", "country": "US"},
                 "scores": [3, 4.5], "lucky": 21}


def mask_cost(model_path: Path) -> dict:
    """What the constraint itself costs, model aside: lem_serve's JsonConstraint stepped over a pretty-printed
    Person answer in this process, once cold (token table, then every mask built) and once warm (cached)."""
    sys.path.insert(0, str(ROOT))
    import mlx.core as mx
    import lem_serve
    from mlx_lm.tokenizer_utils import load
    tokenizer = load(model_path)
    started = time.perf_counter()
    table = lem_serve.token_table(tokenizer)
    out = {"token_table_s": time.perf_counter() - started}
    constraint = lem_serve.parse_response_format({"type": "json_schema",
                                                  "json_schema": {"name": "person", "schema": person_schema()}})
    ids = tokenizer.encode(json.dumps(PERSON_ANSWER, indent=2), add_special_tokens=False) + table.eos[:1]
    for run in ("cold", "warm"):
        processor = lem_serve.json_constraint(constraint, tokenizer, 10 * len(ids))
        logits, steps = mx.zeros((1, table.size)), []
        for previous, token in zip([0] + ids, ids):
            begun = time.perf_counter()
            masked = processor(mx.array([previous]), logits)
            mx.eval(masked)
            steps.append(time.perf_counter() - begun)
            if masked[0, token].item() != 0:
                raise RuntimeError(f"the constraint refused {tokenizer.decode([token])!r}")
        out[run] = {"steps": len(steps), "total_s": sum(steps), "median_ms": 1000 * median(steps)}
    out["states"] = len(processor.masks.masks)
    return out


def structured_test(port: int, plan: Plan) -> dict:
    """Constrained vs unconstrained decode tok/s, interleaved, and the first constrained request's extra cost."""
    tokens = plan.structured_tokens
    constrained = {"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": person_schema()}}}
    first = stream_chat(port, STRUCTURED_PROMPT, tokens, **constrained)
    rows = []
    for rep in range(plan.structured_reps):
        pair = {}
        for kind in rotated(("constrained", "unconstrained"), rep):
            pair[kind] = stream_chat(port, STRUCTURED_PROMPT, tokens, **(constrained if kind == "constrained" else {}))
        rows.append({k: summary(v) | {"text": v.text} for k, v in pair.items()})
        progress(f"  structured rep {rep + 1}: " + ", ".join(
            f"{k} {fmt(v.decode_tps)} tok/s ({v.tokens} tok)" for k, v in pair.items()))
    warm = [r["constrained"] for r in rows if r["constrained"]["tokens"] == first.tokens]
    warm_time = median([r["ttft"] + (r["tokens"] - 1) / r["decode_tps"] for r in warm if r["decode_tps"]])
    first_time = first.end - first.sent if first.end else None
    out = {kind: {"decode_tps": median([r[kind]["decode_tps"] for r in rows]),
                  "tokens": median([r[kind]["tokens"] for r in rows]), "text": rows[-1][kind]["text"] if rows else ""}
           for kind in ("constrained", "unconstrained")}
    out["ratio"] = median([ratio(r["constrained"]["decode_tps"], r["unconstrained"]["decode_tps"]) for r in rows])
    out["first_request_s"] = first_time
    out["first_request_extra_s"] = None if warm_time is None or first_time is None else first_time - warm_time
    out["reps"] = rows
    return out


def build_history(count, target_tokens: int, tag: str) -> list[dict]:
    """A system message naming `tag`, then user/assistant turns up to ~target tokens.

    `count(messages)` gives a chat's prompt length in tokens.
    """
    messages = [{"role": "system", "content": f"You are a helpful assistant. Conversation {tag}."}]
    turn = 0
    while count(messages) < target_tokens:
        role = "user" if turn % 2 == 0 else "assistant"
        messages.append({"role": role, "content": f"({turn}) " + FILLER * 2})
        turn += 1
    if messages[-1]["role"] == "user":  # the test appends its own user message
        messages.append({"role": "assistant", "content": "Noted."})
    return messages


def summary(sample: Sample) -> dict:
    """The numbers of one sample worth keeping in the JSON."""
    return {"decode_tps": sample.decode_tps, "e2e_tps": sample.e2e_tps, "ttft": sample.ttft,
            "tokens": sample.tokens, "prompt_tokens": sample.prompt_tokens,
            "cached_tokens": sample.cached_tokens, "error": sample.error}


def summarize_single(reps: list[dict]) -> dict:
    """Medians per system and paired ratios over the valid repetitions."""
    valid = [r for r in reps if r["valid"]]
    out = {"reps": reps, "valid_reps": len(valid)}
    for s in SYSTEMS:
        out[s] = {k: median([r[s][k] for r in valid]) for k in ("decode_tps", "e2e_tps", "ttft")}
        out[s]["tokens"] = valid[0][s]["tokens"] if valid else None
    for other, key in ((RAW, "raw"), (MLX_SERVER, "mlx_server")):
        for metric in ("decode_tps", "e2e_tps"):
            out[f"lem/{key} {metric}"] = median(
                [ratio(r[LEM][metric], r[other][metric]) for r in valid])
    return out


def summarize_level(runs: list[list[Sample]], expected_tokens: int) -> dict:
    """Aggregate tok/s (median over rounds) and TTFT percentiles (pooled)."""
    ttfts = [s.ttft for samples in runs for s in samples]
    tokens = [sum(s.tokens for s in samples) for samples in runs]
    errors = [s.error for samples in runs for s in samples if s.error]
    cached = [s.cached_tokens or 0 for samples in runs for s in samples]
    return {"aggregate_tps": median([aggregate_tps(samples) for samples in runs]),
            "max_cached_tokens": max(cached, default=0),
            "ttft_p50": percentile(ttfts, 50), "ttft_p95": percentile(ttfts, 95),
            "tokens_per_round": tokens, "full_length": all(t == expected_tokens for t in tokens),
            "errors": errors[:3]}


def summarize_cache(rows: list[dict]) -> dict:
    """Median cold and cached TTFT and the speed-up cold/cached."""
    cold, cached = median([r["cold_ttft"] for r in rows]), median([r["cached_ttft"] for r in rows])
    return {"cold_ttft": cold, "cached_ttft": cached, "speedup": ratio(cold, cached),
            "cached_tokens": median([r["cached_tokens"] for r in rows]),
            "prompt_tokens": median([r["prompt_tokens"] for r in rows]), "rows": rows}


# ---------------------------------------------------------------------------
# One model, start to finish
# ---------------------------------------------------------------------------

def bench_model(name: str, plan: Plan) -> dict:
    """Start both servers and the raw worker, run the tests; all of them always stopped."""
    path = prepare_model(name)
    label = model_label(name, path)
    progress(f"\n== {label}: {path}\n   plan: {asdict(plan)}")
    tag = re.sub(r"[^\w.-]", "_", name)
    result = {"model": label, "path": str(path), "plan": asdict(plan)}
    servers = [lem_server(path, tag, max(plan.levels)), mlx_server(path, tag)]
    raw = RawWorker(path, tag)
    try:
        for process in (*servers, raw):  # one at a time, so loading does not slow the others' start
            process.start()
        runner = Runner(plan, raw, {s.name: s.port for s in servers}, path)
        progress("  warming up ...")
        runner.warm_up()
        timed(result, "single", runner.single_stream)
        timed(result, "concurrency", runner.concurrency)
        if plan.history_tokens:
            timed(result, "prompt_cache", runner.prompt_cache)
        if plan.structured_reps:
            timed(result, "structured", runner.structured)
    finally:
        for process in (*servers, raw):
            process.stop()
    return result


def timed(result: dict, key: str, test) -> None:
    """Run one test, store its result and how long it took."""
    started = time.perf_counter()
    result[key] = test()
    result[key + "_seconds"] = round(time.perf_counter() - started, 1)


def progress(text: str) -> None:
    print(text, flush=True)


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


# ---------------------------------------------------------------------------
# The agent-shaped case: a long fixed prefix of instructions and tools, two turns
# ---------------------------------------------------------------------------

def agent_tool(i: int) -> dict:
    """One tool definition in the style coding agents send (a described function, a few typed arguments)."""
    return {"type": "function", "function": {
        "name": f"tool_{i}", "description": f"Tool {i}. " + FILLER,
        "parameters": {"type": "object", "properties": {
            "path": {"type": "string", "description": "An absolute path to the file to work on."},
            "limit": {"type": "integer", "description": "How many lines to read at most."},
            "mode": {"type": "string", "enum": ["read", "write", "append"]}}, "required": ["path"]}}}


def agent_prefix(count_tokens, target_tokens: int, tag: str) -> tuple[dict, list[dict]]:
    """(system message, tools) that together make about `target_tokens` prompt tokens; `tag` opens the system.

    `count_tokens(system, tools)` gives the prompt length of a chat with them.
    """
    tools = [agent_tool(i) for i in range(24)]
    paragraph = "Follow the repository's conventions. Run the tests before you report. " + FILLER
    system = {"role": "system", "content": f"Session {tag}. You are a coding agent.\n"}
    base = count_tokens(system, tools)
    step = count_tokens({"role": "system", "content": system["content"] + paragraph}, tools) - base
    paragraphs = max(0, (target_tokens - base) // max(step, 1))
    return {"role": "system", "content": system["content"] + paragraph * paragraphs}, tools


def lem_count_tokens(port: int):
    """A counter of chat prompt tokens that asks lem-serve's /v1/messages/count_tokens (it renders the same prompt)."""
    def count(system: dict, tools: list[dict]) -> int:
        body = {"system": system["content"], "messages": [{"role": "user", "content": AGENT_TASKS[0]}],
                "tools": [{"name": t["function"]["name"], "description": t["function"]["description"],
                           "input_schema": t["function"]["parameters"]} for t in tools]}
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/messages/count_tokens", json.dumps(body), {"Content-Type": "application/json"})
        tokens = json.loads(conn.getresponse().read())["input_tokens"]
        conn.close()
        return tokens
    return count


AGENT_TASKS = ("The test in tests/test_parser.py fails. Find out why and fix it.",
               "Thanks. Now run the whole test suite and tell me what is left.")


def bench_agent(quick: bool) -> dict:
    """The agent-shaped case on its own model: lem-serve and mlx_lm.server, interleaved, fresh prefixes."""
    path = prepare_model(AGENT_MODEL)
    target, reps = (4000, 1) if quick else (AGENT_PREFIX_TOKENS, AGENT_REPS)
    progress(f"\n== agent-shaped turns: {path}, a {target}-token prefix, {reps} repetition(s)")
    servers = [lem_server(path, AGENT_MODEL, 1), mlx_server(path, AGENT_MODEL)]
    rows = {LEM: [], MLX_SERVER: []}
    try:
        for process in servers:
            process.start()
        ports = {s.name: s.port for s in servers}
        count = lem_count_tokens(ports[LEM])
        for rep in range(reps):
            for system in rotated((LEM, MLX_SERVER), rep):
                prefix, tools = agent_prefix(count, target, uuid.uuid4().hex[:8])  # never seen by either server
                turn = [prefix, {"role": "user", "content": AGENT_TASKS[0]}]
                rows[system].append(two_turns(ports[system], turn, AGENT_TASKS[1], AGENT_TOKENS, tools))
                r = rows[system][-1]
                progress(f"  rep {rep + 1}: {system} cold {fmt_ms(r['cold_ttft'])} cached {fmt_ms(r['cached_ttft'])} "
                         f"(cached {r['cached_tokens']} of {r['prompt_tokens']} tokens){' ' + r['error'] if r['error'] else ''}")
    finally:
        for process in servers:
            process.stop()
    result = {s: summarize_cache(rows[s]) for s in rows}
    result["prefix_tokens"] = target
    result["cold lem/mlx_server"] = ratio(result[MLX_SERVER]["cold_ttft"], result[LEM]["cold_ttft"])
    result["cached lem/mlx_server"] = ratio(result[MLX_SERVER]["cached_ttft"], result[LEM]["cached_ttft"])
    return result


def markdown_agent(result: dict) -> list[str]:
    """The agent-shaped case as a table (speed ratios: mlx_lm.server's TTFT over lem-serve's, > 1 = lem faster)."""
    lines = ["### Agent-shaped turns", "",
             f"A {result['prefix_tokens']}-token prefix (system instructions and 24 tool definitions, as coding "
             "agents resend every turn) + a task, then turn 2 (the answer and a new task); chat completions "
             "with `tools`, greedy, TTFT medians over fresh prefixes.", "",
             *cache_table(result, ("turn 1 (cold)", "turn 2 (cached)"))]
    return lines + ["", f"**lem-serve vs mlx_lm.server (their TTFT / ours): "
                        f"{fmt_ratio(result['cold lem/mlx_server'])} cold, "
                        f"{fmt_ratio(result['cached lem/mlx_server'])} cached.**", ""]


# ---------------------------------------------------------------------------
# Reports: markdown, chart, JSON
# ---------------------------------------------------------------------------

def environment() -> dict:
    """What ran: versions, commit, machine and its load (the noise)."""
    from importlib.metadata import version
    lem_version = re.search(r'__version__ = "([^"]+)"', (ROOT / "lem_serve.py").read_text())
    git = lambda *args: subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "platform": platform.platform(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "mlx": version("mlx"),
            "mlx_lm": version("mlx-lm"), "lem_serve": lem_version.group(1) if lem_version else None,
            "commit": git("rev-parse", "--short", "HEAD"),
            "lem_serve_dirty": bool(git("status", "--porcelain", "lem_serve.py")),
            "lem_prompt_cache": lem_supports("--prompt-cache-bytes"),
            "loadavg_start": os.getloadavg()}


def markdown(report: dict) -> str:
    """The results as markdown tables (for the README)."""
    env = report["env"]
    lines = ["## Benchmarks", "",
             f"`python bench/bench.py{report['argv']}` on {env['date']}: {env['platform']}, "
             f"{env['cpus']} CPUs, mlx {env['mlx']}, mlx-lm {env['mlx_lm']}, lem-serve {env['lem_serve']} "
             f"(commit {env['commit']}{', lem_serve.py modified' if env['lem_serve_dirty'] else ''}). "
             f"Load average {env['loadavg_start'][0]:.1f} at start, {env['loadavg_end'][0]:.1f} at end: "
             "the machine is shared, so read the ratios; absolute numbers move with the load. "
             "Greedy decoding, chat template applied, medians of interleaved repetitions; "
             "a ratio is the median of per-repetition ratios.", ""]
    for result in report["models"]:
        lines += markdown_model(result)
    return "\n".join(lines) + "\n"


def markdown_model(result: dict) -> list[str]:
    """Tables of one model."""
    single, plan = result["single"], result["plan"]
    lines = [f"### {result['model']}", "",
             f"Single stream, {plan['single_tokens']} tokens, {single['valid_reps']}/{plan['single_reps']} "
             "repetitions with equal token counts:", "",
             "| system | decode tok/s | end-to-end tok/s | TTFT |", "|---|---:|---:|---:|"]
    for s in SYSTEMS:
        lines.append(f"| {s} | {fmt(single[s]['decode_tps'])} | {fmt(single[s]['e2e_tps'])} "
                     f"| {fmt_ms(single[s]['ttft'])} |")
    lines += ["", f"**lem/raw: {fmt_ratio(single['lem/raw decode_tps'])} decode, "
              f"{fmt_ratio(single['lem/raw e2e_tps'])} end-to-end; "
              f"lem/mlx_lm.server: {fmt_ratio(single['lem/mlx_server decode_tps'])} decode, "
              f"{fmt_ratio(single['lem/mlx_server e2e_tps'])} end-to-end.**", "",
              f"Concurrent streams, {plan['conc_tokens']} tokens each, {plan['conc_rounds']} round(s) "
              "per level: aggregate tok/s and TTFT p50 / p95:", "",
              "| concurrency | " + " | ".join(SYSTEMS) + " | lem/raw | lem/mlx_lm.server |",
              "|---:|" + "---:|" * (len(SYSTEMS) + 2)]
    for level, row in result["concurrency"].items():
        cells = [f"{fmt(row[s]['aggregate_tps'])} tok/s, {fmt_ms(row[s]['ttft_p50'])} / "
                 f"{fmt_ms(row[s]['ttft_p95'])}" + ("" if row[s]["full_length"] else " (short)")
                 for s in SYSTEMS]
        lines.append(f"| {level} | " + " | ".join(cells) + f" | "
                     f"{fmt_ratio(ratio(row[LEM]['aggregate_tps'], row[RAW]['aggregate_tps']))} | "
                     f"{fmt_ratio(ratio(row[LEM]['aggregate_tps'], row[MLX_SERVER]['aggregate_tps']))} |")
    if "prompt_cache" in result:
        cache = result["prompt_cache"]
        lines += ["", f"Multi-turn prompt cache: a {cache['history_tokens']}-token history + a new message, "
                  "then the follow-up (history + answer + new message); TTFT medians. "
                  "lem-serve runs with `--max-context 0`.", "", *cache_table(cache, ("cold", "follow-up"))]
    if "structured" in result:
        lines += [""] + markdown_structured(result)
    return lines + [""]


def cache_table(cache: dict, turns: tuple[str, str]) -> list[str]:
    """Two turns' TTFT per server (summarize_cache's medians), the speed-up and the cached share."""
    lines = [f"| system | {turns[0]} TTFT | {turns[1]} TTFT | speed-up | cached / prompt tokens |",
             "|---|---:|---:|---:|---:|"]
    for s in (LEM, MLX_SERVER):
        c = cache[s]
        lines.append(f"| {s} | {fmt_ms(c['cold_ttft'])} | {fmt_ms(c['cached_ttft'])} | "
                     f"{fmt_ratio(c['speedup'])} | {fmt(c['cached_tokens'], 0)} / {fmt(c['prompt_tokens'], 0)} |")
    return lines


def markdown_structured(result: dict) -> list[str]:
    """The structured-output row of one model."""
    st = result["structured"]
    c, u = st["constrained"], st["unconstrained"]
    return [f"Structured output (lem-serve, greedy, {len(st['reps'])} interleaved repetitions, a Pydantic-shaped "
            "schema: testing/schemas.py's Person):", "",
            "| | decode tok/s | tokens |", "|---|---:|---:|",
            f"| unconstrained | {fmt(u['decode_tps'])} | {fmt(u['tokens'], 0)} |",
            f"| `response_format` json_schema | {fmt(c['decode_tps'])} | {fmt(c['tokens'], 0)} |", "",
            f"**constrained/unconstrained: {fmt_ratio(st['ratio'])}** (target >= 0.80). The first constrained request "
            f"took {fmt(st['first_request_s'])} s, {fmt(st['first_request_extra_s'])} s more than a warm one with the "
            "same tokens (under load this is within the noise)."] + markdown_mask_cost(st.get("mask_cost"))


def markdown_mask_cost(cost: dict | None) -> list[str]:
    if not cost:
        return []
    cold, warm = cost["cold"], cost["warm"]
    return ["", f"The constraint alone, stepped over a {cold['steps']}-token pretty-printed Person in the benchmark's "
            f"process: token table {fmt(cost['token_table_s'], 2)} s once per model; first request (every mask built, "
            f"{cost['states']} states) {fmt(cold['total_s'], 2)} s, median {fmt(cold['median_ms'], 2)} ms a token; "
            f"warm {fmt(warm['total_s'], 2)} s, median {fmt(warm['median_ms'], 2)} ms a token."]


def chart(report: dict, out: Path) -> None:
    """Grouped bars per model: single-stream tok/s, aggregate tok/s, TTFT p50, cache TTFT."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = report["models"]
    fig, axes = plt.subplots(len(models), 4, figsize=(18, 4.2 * len(models)), squeeze=False)
    colors = {LEM: "tab:green", MLX_SERVER: "tab:blue", RAW: "tab:gray"}
    for row, result in zip(axes, models):
        bars(row[0], ["decode", "end-to-end"], {s: [result["single"][s]["decode_tps"],
             result["single"][s]["e2e_tps"]] for s in SYSTEMS}, colors, "tokens/s",
             f"{result['model']}\nsingle stream")
        levels = list(result["concurrency"])
        conc = result["concurrency"]
        bars(row[1], [f"c={l}" for l in levels], {s: [conc[l][s]["aggregate_tps"] for l in levels]
             for s in SYSTEMS}, colors, "aggregate tokens/s", "concurrent streams: throughput")
        bars(row[2], [f"c={l}" for l in levels], {s: [ms(conc[l][s]["ttft_p50"]) for l in levels]
             for s in SYSTEMS}, colors, "TTFT p50 (ms)", "concurrent streams: time to first token")
        if "prompt_cache" in result:
            cache = result["prompt_cache"]
            bars(row[3], ["cold", "follow-up"], {s: [ms(cache[s]["cold_ttft"]), ms(cache[s]["cached_ttft"])]
                 for s in (LEM, MLX_SERVER)}, colors, "TTFT (ms)",
                 f"multi-turn, {cache['history_tokens']}-token history")
        else:
            row[3].axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def bars(ax, groups: list[str], series: dict[str, list], colors: dict, ylabel: str, title: str) -> None:
    """One grouped bar chart; missing values are left out."""
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        heights = [v or 0 for v in values]
        ax.bar(xs, heights, width, label=name, color=colors[name])
        for x, v in zip(xs, values):
            if v is not None:
                ax.annotate(f"{v:.0f}" if v >= 10 else f"{v:.1f}", (x, v), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)


def print_ratios(report: dict) -> None:
    """The headline: ratios per model, prominently."""
    print("\n" + "=" * 78)
    print("RATIOS (median of per-repetition ratios; > 1.00 means lem-serve is faster)")
    for result in report["models"]:
        single = result["single"]
        print(f"  {result['model']}")
        print(f"    single stream  lem/raw {fmt_ratio(single['lem/raw decode_tps'])} decode "
              f"({fmt_ratio(single['lem/raw e2e_tps'])} e2e)   target >= 0.95")
        print(f"                   lem/mlx_lm.server {fmt_ratio(single['lem/mlx_server decode_tps'])} decode "
              f"({fmt_ratio(single['lem/mlx_server e2e_tps'])} e2e)   target > 1.00")
        for level, row in result["concurrency"].items():
            print(f"    c={level:<3} aggregate  lem/raw "
                  f"{fmt_ratio(ratio(row[LEM]['aggregate_tps'], row[RAW]['aggregate_tps']))}   "
                  f"lem/mlx_lm.server "
                  f"{fmt_ratio(ratio(row[LEM]['aggregate_tps'], row[MLX_SERVER]['aggregate_tps']))}")
        if "prompt_cache" in result:
            cache = result["prompt_cache"]
            print(f"    prompt cache   cold/follow-up TTFT: lem {fmt_ratio(cache[LEM]['speedup'])}, "
                  f"mlx_lm.server {fmt_ratio(cache[MLX_SERVER]['speedup'])}")
        if "structured" in result:
            print(f"    structured     constrained/unconstrained {fmt_ratio(result['structured']['ratio'])}   "
                  f"target >= 0.80; first request +{fmt(result['structured']['first_request_extra_s'])} s")
    print("=" * 78)


def write_reports(report: dict, publish: bool) -> None:
    """bench.json, bench.md, bench.png in bench/results/; bench/RESULTS.md and bench/chart.png if `publish`."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    text = markdown(report)
    (RESULTS / "bench.md").write_text(text)
    chart(report, RESULTS / "bench.png")
    written = f"{RESULTS / 'bench.json'}, bench.md and bench.png"
    if publish:
        (ROOT / "bench" / "RESULTS.md").write_text(text)
        shutil.copyfile(RESULTS / "bench.png", ROOT / "bench" / "chart.png")  # the README shows it
        written += f" and {ROOT / 'bench' / 'RESULTS.md'}, chart.png"
    print("\n" + text)
    print_ratios(report)
    print(f"\nwrote {written}")


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append",
                   help="tiny, small or a model folder; repeatable (default: tiny and small)")
    p.add_argument("--smollm2", action="store_true",
                   help="also the real SmolLM2-135M-Instruct (4-bit), converted with tools/gguf_to_mlx.py")
    p.add_argument("--quick", action="store_true", help="a ~2-minute smoke run")
    p.add_argument("--agent", action="store_true",
                   help="only the agent-shaped case (a 20k-token prefix, two turns); writes bench/RESULTS-agent.md")
    p.add_argument("--structured", metavar="MODEL", help="only the structured-output test on MODEL (lem-serve alone)")
    p.add_argument("--raw-worker", metavar="MODEL", help=argparse.SUPPRESS)  # internal: see raw_worker()
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Benchmark each model in turn, then write and print the reports."""
    args = parse_args(argv)
    if args.raw_worker:
        raw_worker(args.raw_worker)
    # A SIGTERM unwinds through the finally blocks, so the servers are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.agent:
        return run_agent_case(args, argv)
    if args.structured:
        return structured_only(args.structured, args.quick)
    names = args.model or ["tiny", "small"]
    if args.smollm2:
        names.append("smollm2")
    report = {"argv": "".join(" " + a for a in (argv if argv is not None else sys.argv[1:])),
              "env": environment(), "models": []}
    started = time.perf_counter()
    for name in names:
        try:
            report["models"].append(bench_model(name, plan_for(name, args.quick)))
        except (RuntimeError, subprocess.CalledProcessError) as exc:
            print(f"bench: {name}: {exc}", file=sys.stderr)
            if name != "smollm2":  # the real model is optional; the test models are not
                raise
    report["env"]["loadavg_end"] = os.getloadavg()
    report["env"]["seconds"] = round(time.perf_counter() - started, 1)
    write_reports(report, publish=not args.quick)  # a smoke run never replaces the published results
    print(f"total {report['env']['seconds']:.0f} s")
    return 0


def run_agent_case(args: argparse.Namespace, argv: list[str] | None) -> int:
    """--agent: run the agent-shaped case alone and write its report (published unless --quick)."""
    env = environment()
    result = bench_agent(args.quick)
    env["loadavg_end"] = os.getloadavg()
    text = "\n".join([f"`python bench/bench.py{''.join(' ' + a for a in (argv if argv is not None else sys.argv[1:]))}` "
                      f"on {env['date']}: {env['platform']}, {env['cpus']} CPUs, mlx {env['mlx']}, mlx-lm "
                      f"{env['mlx_lm']}, lem-serve {env['lem_serve']} (commit {env['commit']}). Load average "
                      f"{env['loadavg_start'][0]:.1f} at start, {env['loadavg_end'][0]:.1f} at end.", "",
                      *markdown_agent(result)])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "agent.json").write_text(json.dumps({"env": env, "agent": result}, indent=2, default=str) + "\n")
    if not args.quick:
        (ROOT / "bench" / "RESULTS-agent.md").write_text(text)
    print("\n" + text)
    return 0


def structured_only(name: str, quick: bool) -> int:
    """Run test 4 alone on one model; print it and write bench/results/structured.json (nothing published)."""
    path, plan = prepare_model(name), plan_for(name, quick)
    plan = plan if plan.structured_reps else replace(plan, structured_reps=3)
    server = lem_server(path, re.sub(r"[^\w.-]", "_", name), 1)
    try:
        server.start()
        stream_chat(server.port, story_prompt(90_000), 8)  # load and compile before anything is timed
        result = {"model": model_label(name, path),
                  "structured": structured_test(server.port, plan) | {"mask_cost": mask_cost(path)}}
    finally:
        server.stop()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "structured.json").write_text(json.dumps({"env": environment() | {"loadavg_end": os.getloadavg()},
                                                          **result}, indent=2, default=str) + "\n")
    print("\n".join(markdown_structured(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
