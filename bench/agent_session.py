#!/usr/bin/env python3
"""An agent session, turn by turn: lem-serve against mlx_lm.server with the same prompt cache budget.

A coding agent resends the same long prefix (instructions and tool
definitions) every turn, plus the growing conversation. This runs one such
session of TURNS turns (each turn: the history, the model's last answer and a
tool result) on bench.py's "agent" model (the tiny sizes with a 4,096-token
vocabulary and a 1M-token context), through streaming chat completions with
`tools`, greedy, and records each turn's TTFT and cached prompt tokens, for:

* lem-serve and mlx_lm.server with the same `--prompt-cache-bytes`, two budgets:
  "roomy" (the whole session fits) and "tight" (3/4 of the first turn's KV:
  the session never fits whole, which is where a cache that drops an
  over-budget entry reuses nothing and one that keeps the longest prefix that
  fits still reuses most of it);
* after a restart: both servers are stopped (SIGTERM) and started again, lem-serve
  with the same `--prompt-cache-dir`, and the next turn is sent.

The goal (issue 21): from turn 2 on, >= 95% of the prompt reused, also after a
restart. A fresh prefix per run keeps the two servers from seeing each other's.
Prompt processing on this 2-core CPU is slow (~150 tokens/s), so the prefix is
PREFIX_TOKENS long; the ratios and cached-token counts carry over to longer
prompts, the absolute times do not. Results: bench/results/agent_session.json
and bench/RESULTS-agent-session.md.

    python bench/agent_session.py            # ~5 minutes on 2 cores
    python bench/agent_session.py --quick    # the shortest prefix (~5,000 tokens), 3 turns
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as b  # noqa: E402  (the shared server and sample machinery)

sys.path.insert(0, str(b.ROOT))
import lem_serve  # noqa: E402

PREFIX_TOKENS = 8000     # instructions + tool definitions (24 of them take ~5,000 alone)
TURNS = 5
ANSWER_TOKENS = 16       # max_tokens of each turn
TOOL_RESULT = "Tool result: 3 files changed, 2 tests failed in tests/test_parser.py. " + b.FILLER


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


def session(process: b.ServerProcess, prefix: dict, tools: list[dict], turns: int) -> list[dict]:
    """`turns` turns, then a restart of the same server and one more turn (the last row)."""
    messages, rows = [prefix, {"role": "user", "content": b.AGENT_TASKS[0]}], []
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
    target, turns = (1000, 3) if quick else (PREFIX_TOKENS, TURNS)
    per_token = kv_bytes_per_token(path)
    counter = lem_process(path, 1 << 20, Path(tempfile.mkdtemp()), "count")
    counter.start()
    try:
        count = b.lem_count_tokens(counter.port)
        prefixes = {name: b.agent_prefix(count, target, uuid.uuid4().hex[:8]) for name in
                    [f"{budget}-{system}" for budget in ("roomy", "tight") for system in (b.LEM, b.MLX_SERVER)]}
        first_turn = count(*next(iter(prefixes.values())))
    finally:
        counter.stop()
    budgets = {"roomy": 64 << 20, "tight": first_turn * per_token * 3 // 4}
    report = {"prefix_tokens": first_turn, "turns": turns, "kv_bytes_per_token": per_token, "budgets": budgets,
              "environment": b.environment(), "runs": {}}
    for budget_name, budget in budgets.items():
        b.progress(f"\n== {budget_name} budget: {budget} bytes ({budget // per_token} tokens of KV)")
        with tempfile.TemporaryDirectory(prefix="lem-session-") as folder:
            for system in (b.LEM, b.MLX_SERVER):
                process = (lem_process(path, budget, Path(folder), budget_name) if system == b.LEM
                           else mlx_process(path, budget, budget_name))
                prefix, tools = prefixes[f"{budget_name}-{system}"]
                report["runs"][f"{budget_name}/{system}"] = session(process, prefix, tools, turns)
    return report


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"`python bench/agent_session.py` on {env.get('date', '')}: {env.get('platform', '')}, "
             f"{env.get('cpus', '')} CPUs, mlx {env.get('mlx', '')}, mlx-lm {env.get('mlx_lm', '')}.", "",
             "### An agent session, turn by turn", "",
             f"A {report['prefix_tokens']}-token first turn (instructions, 24 tool definitions and a task), then "
             f"{report['turns'] - 1} more turns (the answer and a tool result each), then a restart of the server "
             "and one more turn; streaming chat completions with `tools`, greedy, "
             f"{report['kv_bytes_per_token']} bytes of KV per token. Cells: TTFT, cached / prompt tokens.", ""]
    turns = report["turns"]
    header = [f"turn {i + 1}" for i in range(turns)] + ["after restart"]
    lines += ["| budget | system | " + " | ".join(header) + " |", "|---|---|" + "---:|" * len(header)]
    for key, rows in report["runs"].items():
        budget, system = key.split("/")
        cells = [f"{b.fmt_ms(r['ttft'])}, {r['cached']}/{r['prompt']}" if not r["error"] else r["error"][:40]
                 for r in rows]
        lines.append(f"| {budget} ({report['budgets'][budget]} B) | {system} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 1,000-token prefix and 3 turns; publishes nothing")
    args = parser.parse_args(argv)
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
