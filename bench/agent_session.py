#!/usr/bin/env python3
"""An agent session, turn by turn: lem-serve against mlx_lm.server with the same prompt cache budget.

A coding agent resends the same long prefix (instructions and tool
definitions) every turn, plus the growing conversation. This replays the
real first request of the pinned Claude Code and Codex CLIs (captured by the
agent tests with LEM_CAPTURE_DIR set, scrubbed, in bench/agent_requests/) as
a session of TURNS turns (each turn: the history, the model's last answer and
a tool result) on bench.py's "agent" model (the tiny sizes with a 4,096-token
vocabulary and a 1M-token context), through streaming chat completions with
`tools`, greedy, and records each turn's TTFT and cached prompt tokens, for
lem-serve and mlx_lm.server with the same `--prompt-cache-bytes`, two budgets:
"roomy" (the session fits) and "tight" (3/4 of the first turn's KV: the
session never fits whole, which is where a cache that drops an over-budget
entry reuses nothing and one that keeps the longest prefix that fits still
reuses most of it), then after a restart: both servers are stopped (SIGTERM)
and started again, lem-serve with the same `--prompt-cache-dir`, and the next
turn is sent.

Both servers get the same chat-completions request: mlx_lm.server speaks
neither /v1/messages nor /v1/responses, so each capture is converted
(system blocks and developer messages into the system message, later system
text into the user turn it follows, tools into functions; Codex's namespaced
tools flattened, its web_search dropped).

The goal (issue 21): from turn 2 on, >= 95% of the prompt reused, also after a
restart. Prompt processing on this 2-core CPU is slow, so the ratios and
cached-token counts carry over to a real 8B model, the absolute times do not.
Results: bench/results/agent_session.json and bench/RESULTS-agent-session.md.

    python bench/agent_session.py                # ~10 minutes on 2 cores
    python bench/agent_session.py --quick        # Codex's capture only, 3 turns; publishes nothing
    LEM_CAPTURE_DIR=/tmp/cap python -m pytest -q test_lem_serve.py -k answers_headless
    python bench/agent_session.py --import /tmp/cap   # scrub and store new captures
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as b  # noqa: E402  (the shared server and sample machinery)

sys.path.insert(0, str(b.ROOT))
import lem_serve  # noqa: E402

TURNS = 5
ANSWER_TOKENS = 16       # max_tokens of each turn
BUDGET = 64 << 20        # --prompt-cache-bytes of both servers: the whole session fits
TOOL_RESULT = "Tool result: 3 files changed, 2 tests failed in tests/test_parser.py. " + b.FILLER
REQUESTS = b.ROOT / "bench" / "agent_requests"
AGENT_PACKAGES = {"v1-messages.json": ("claude-code", "@anthropic-ai/claude-code"),
                  "v1-responses.json": ("codex", "@openai/codex")}
# What ties a capture to the machine and the run: the test's temporary folders, ids and metadata.
SCRUB = ((re.compile(r"/tmp/pytest-of-[^/]+/pytest-\d+/[^/\s\"`<]+"), "/home/user"),
         (re.compile(r"-tmp-pytest-of-[\w-]+?-pytest-\d+-[\w-]+?-(work|home)\b"), r"-home-user-\1"),
         (re.compile(r"OS Version: [^\n\\]+"), "OS Version: Linux"))
DROPPED_FIELDS = ("metadata", "client_metadata", "prompt_cache_key")


def import_captures(folder: Path) -> None:
    """Scrub the bodies the agent tests captured into `folder` and store them as bench/agent_requests/<cli>-<version>.json."""
    REQUESTS.mkdir(parents=True, exist_ok=True)
    for name, (cli, package) in AGENT_PACKAGES.items():
        if not (folder / name).is_file():
            continue
        version = json.loads((b.ROOT / "testing" / "agents" / "node_modules" / package / "package.json")
                             .read_text())["version"]
        body = json.loads((folder / name).read_text())
        for field in DROPPED_FIELDS:
            body.pop(field, None)
        text = json.dumps(body, indent=1, ensure_ascii=False)
        for pattern, replacement in SCRUB:
            text = pattern.sub(replacement, text)
        (REQUESTS / f"{cli}-{version}.json").write_text(text + "\n", encoding="utf-8")
        b.progress(f"stored {cli} {version}: {len(text)} bytes")


def block_text(content) -> str:
    """The text of an Anthropic or Responses content (a string or a list of text blocks)."""
    if isinstance(content, str):
        return content
    return "\n".join(part.get("text", "") for part in content if part.get("type") in ("text", "input_text", "output_text"))


def function_tool(name: str, description: str, parameters: dict) -> dict:
    return {"type": "function", "function": {"name": name, "description": description or "", "parameters": parameters}}


def chat_from_messages(body: dict) -> tuple[list[dict], list[dict]]:
    """(chat messages, chat tools) of an Anthropic /v1/messages body."""
    system = body.get("system") or ""
    messages = [{"role": "system", "content": block_text(system)}] if system else []
    for message in body["messages"]:
        text = block_text(message["content"])
        if message["role"] == "system" and messages and messages[-1]["role"] == "user":
            messages[-1]["content"] += "\n\n" + text  # chat templates take a system message only first
        else:
            messages.append({"role": message["role"], "content": text})
    tools = [function_tool(t["name"], t.get("description"), t["input_schema"]) for t in body.get("tools") or []
             if "input_schema" in t]
    return messages, tools


def chat_from_responses(body: dict) -> tuple[list[dict], list[dict]]:
    """(chat messages, chat tools) of an OpenAI /v1/responses body."""
    messages = [{"role": "system", "content": body["instructions"]}] if body.get("instructions") else []
    for item in body["input"]:
        role, text = item.get("role"), block_text(item.get("content") or "")
        if role in ("developer", "system") and all(m["role"] == "system" for m in messages):
            if messages:
                messages[0]["content"] += "\n\n" + text
            else:
                messages.append({"role": "system", "content": text})
        elif messages and messages[-1]["role"] == "user" and role in ("user", "developer", "system"):
            messages[-1]["content"] += "\n\n" + text
        else:
            messages.append({"role": "user" if role in ("developer", "system") else role, "content": text})
    tools = []
    for tool in body.get("tools") or []:
        for part in tool.get("tools", [tool]) if tool["type"] == "namespace" else [tool]:
            if part.get("type") == "function":
                name = f"{tool['name']}.{part['name']}" if tool["type"] == "namespace" else part["name"]
                tools.append(function_tool(name, part.get("description"), part["parameters"]))
    return messages, tools


def captured_sessions() -> dict[str, tuple[list[dict], list[dict]]]:
    """{"<cli> <version>": (messages, tools)} of every stored capture, converted to chat completions."""
    sessions = {}
    for path in sorted(REQUESTS.glob("*.json")):
        body = json.loads(path.read_text(encoding="utf-8"))
        convert = chat_from_responses if "input" in body else chat_from_messages
        cli, _, version = path.stem.rpartition("-")
        sessions[f"{cli} {version}"] = convert(body)
    if not sessions:
        raise SystemExit(f"no captured agent requests in {REQUESTS}; see this script's docstring")
    return sessions


def kv_bytes_per_token(path: Path) -> int:
    """The agent model's KV bytes per token, as lem-serve computes it from the config."""
    return lem_serve.kv_token_bytes(lem_serve.load_model(lem_serve.Settings(model_path=str(path))))


def lem_process(path: Path, budget: int, folder: Path, tag: str) -> b.ServerProcess:
    port = b.free_port()
    argv = [sys.executable, str(b.ROOT / "lem_serve.py"), "--model-path", str(path), "--bind", f"127.0.0.1:{port}",
            "--prompt-cache-bytes", str(budget), "--prompt-cache-dir", str(folder), "--log-level", "warning"]
    return b.ServerProcess(b.LEM, argv, "/healthz", b.RESULTS / "logs" / f"session-{tag}-lem-serve.log")


def mlx_process(path: Path, budget: int, tag: str) -> b.ServerProcess:
    port = b.free_port()
    argv = [sys.executable, "-m", "mlx_lm", "server", "--model", str(path), "--host", "127.0.0.1",
            "--port", str(port), "--prompt-cache-bytes", str(budget), "--log-level", "WARNING"]
    return b.ServerProcess(b.MLX_SERVER, argv, "/health", b.RESULTS / "logs" / f"session-{tag}-mlx_lm.server.log")


def turn(port: int, messages: list[dict], tools: list[dict]) -> tuple[dict, str]:
    """One streamed turn: ({ttft, prompt, cached, error}, the answer's text)."""
    sample = b.stream_chat(port, messages, ANSWER_TOKENS, tools=tools)
    return ({"ttft": sample.ttft, "prompt": sample.prompt_tokens, "cached": sample.cached_tokens,
             "error": sample.error}, sample.text)


def session(process: b.ServerProcess, first: list[dict], tools: list[dict], turns: int) -> list[dict]:
    """`turns` turns from the captured first request, then a restart of the same server and one more turn (the last row)."""
    messages, rows = [dict(m) for m in first], []
    process.start()
    try:
        for i in range(turns + 1):
            if i == turns:  # the restart: a graceful stop (lem-serve saves its cache), then a fresh process
                process.stop()
                process.start()
            row, answer = turn(process.port, messages, tools)
            rows.append(row)
            b.progress(f"  {process.name} turn {i + 1}{' (after restart)' if i == turns else ''}: "
                       f"TTFT {b.fmt_ms(row['ttft'])}, cached {row['cached']} of {row['prompt']}"
                       f"{' ' + row['error'] if row['error'] else ''}")
            messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": f"{TOOL_RESULT} ({i})"}]
    finally:
        process.stop()
    return rows


def run(quick: bool) -> dict:
    path = b.prepare_model(b.AGENT_MODEL)
    sessions = captured_sessions()
    if quick:
        sessions = {name: value for name, value in sessions.items() if name.startswith("codex")}
    turns = 3 if quick else TURNS
    per_token = kv_bytes_per_token(path)
    report = {"turns": turns, "kv_bytes_per_token": per_token, "environment": b.environment(), "runs": {},
              "budgets": {}}
    for agent, (first, tools) in sessions.items():
        b.progress(f"\n== {agent}: {len(first)} messages, {len(tools)} tools")
        for budget_name in ("roomy", "tight"):
            budget = (BUDGET if budget_name == "roomy" else
                      report["runs"][f"{agent}/roomy/{b.LEM}"][0]["prompt"] * per_token * 3 // 4)
            report["budgets"][f"{agent}/{budget_name}"] = budget
            b.progress(f"  {budget_name}: {budget} bytes ({budget // per_token} tokens of KV)")
            with tempfile.TemporaryDirectory(prefix="lem-session-") as folder:
                for system in (b.LEM, b.MLX_SERVER):
                    tag = f"{agent.split()[0]}-{budget_name}"
                    process = (lem_process(path, budget, Path(folder), tag) if system == b.LEM
                               else mlx_process(path, budget, tag))
                    report["runs"][f"{agent}/{budget_name}/{system}"] = session(process, first, tools, turns)
    return report


def reused(rows: list[dict]) -> str:
    """The least share of the prompt read from the cache from turn 2 on (the restart's turn included)."""
    shares = [r["cached"] / r["prompt"] for r in rows[1:] if not r["error"] and r["prompt"]]
    return f"{min(shares):.1%}" if shares and len(shares) == len(rows) - 1 else "-"


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"`python bench/agent_session.py` on {env.get('date', '')}: {env.get('platform', '')}, "
             f"{env.get('cpus', '')} CPUs, mlx {env.get('mlx', '')}, mlx-lm {env.get('mlx_lm', '')}, "
             f"load average at start {', '.join(f'{x:.1f}' for x in env.get('loadavg_start', ()))}.", "",
             "### An agent session, turn by turn, from the agents' real first requests", "",
             "The first request each pinned CLI sent in the agent tests (bench/agent_requests/, converted to chat "
             f"completions), then {report['turns'] - 1} more turns (the answer and a tool result each), then a "
             "restart of the server and one more turn; streaming chat completions with `tools`, greedy, "
             f"{report['kv_bytes_per_token']} bytes of KV per token. Both servers get the same `--prompt-cache-bytes`: "
             "\"roomy\" holds the session, \"tight\" 3/4 of the first turn's KV (the session never fits whole, "
             "so a cache that drops an over-budget entry reuses nothing). Cells: TTFT, cached / prompt tokens; \"reused\": the least share of a prompt "
             "read from the cache from turn 2 on, the restart included.", ""]
    header = [f"turn {i + 1}" for i in range(report["turns"])] + ["after restart", "reused"]
    lines += ["| agent | budget | system | " + " | ".join(header) + " |", "|---|---|---|" + "---:|" * len(header)]
    for key, rows in report["runs"].items():
        agent, budget, system = key.split("/")
        cells = [f"{b.fmt_ms(r['ttft'])}, {r['cached']}/{r['prompt']}" if not r["error"] else r["error"][:40]
                 for r in rows]
        budget_cell = f"{budget} ({report['budgets'][f'{agent}/{budget}']} B)"
        lines.append(f"| {agent} | {budget_cell} | {system} | " + " | ".join(cells) + f" | {reused(rows)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Codex's capture only and 3 turns; publishes nothing")
    parser.add_argument("--import", dest="captures", metavar="DIR", type=Path,
                        help="scrub the bodies the agent tests captured into DIR into bench/agent_requests/ and exit")
    args = parser.parse_args(argv)
    if args.captures:
        import_captures(args.captures)
        return 0
    started = time.monotonic()
    report = run(args.quick)
    report["seconds"] = round(time.monotonic() - started)
    b.RESULTS.mkdir(parents=True, exist_ok=True)
    (b.RESULTS / "agent_session.json").write_text(json.dumps(report, indent=2))
    text = markdown(report)
    print(text)
    if not args.quick:
        (b.ROOT / "bench" / "RESULTS-agent-session.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
