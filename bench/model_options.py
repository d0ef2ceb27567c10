#!/usr/bin/env python3
"""Benchmark the model options: speculative decoding and a quantized KV cache.

Both servers get the same flags and the same greedy chat prompts:

1. Speculative decoding (``--draft-model``, ``--num-draft-tokens 3``):
   streaming decode tokens/s of lem-serve and mlx_lm.server, each with the
   draft and without it, and lem-serve's draft acceptance rate (from
   /healthz). Two drafts: the model itself ("agreeing": every draft token is
   accepted, so the row shows what the mechanism costs and saves at best) and
   a random model of the tiny shape with the same tokenizer ("disagreeing":
   almost nothing is accepted, the worst case). Random-weight models have no
   honest "small draft of a big model" pair; see bench/README.md for what to
   expect with real ones.
2. Quantized KV cache (``--kv-bits 8`` and ``4``, ``--quantized-kv-start 0``)
   against full precision: KV bytes per token of context, read from
   lem-serve's prompt cache (/healthz ``prompt_cache.bytes`` over the tokens
   it holds), and each server's peak resident memory growth (VmHWM) over a
   long prompt, per token. Decode tokens/s for both servers too.

Run (from the repository root, venv active; ~10 minutes on 2 cores):

    python bench/model_options.py            # the "small" random-weight model
    python bench/model_options.py --quick    # fewer, shorter repetitions

Read the ratios, not the absolute numbers: the machine is shared and noisy.
Results go to bench/results/model_options.{json,md}.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as core  # noqa: E402  (bench/bench.py: servers, streaming, models)

ROOT = core.ROOT
sys.path.insert(0, str(ROOT))
from testing.tiny_model import build_tiny_model  # noqa: E402

DRAFT_TOKENS = 3


def health(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/healthz")
    body = json.loads(conn.getresponse().read())
    conn.close()
    return body


def peak_rss(server: core.ServerProcess) -> int:
    """The server process's peak resident memory (VmHWM), in bytes."""
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def lem(model: Path, tag: str, *flags: str) -> core.ServerProcess:
    port = core.free_port()
    argv = [sys.executable, str(ROOT / "lem_serve.py"), "--model-path", str(model), "--bind", f"127.0.0.1:{port}",
            "--max-requests", "1", "--timeout", str(core.REQUEST_TIMEOUT), "--log-level", "warning", *flags]
    return core.ServerProcess(core.LEM, argv, "/healthz", core.RESULTS / "logs" / f"options-{tag}-lem.log")


def mlx(model: Path, tag: str, *flags: str) -> core.ServerProcess:
    port = core.free_port()
    argv = [sys.executable, "-m", "mlx_lm", "server", "--model", str(model), "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "WARNING", *flags]
    return core.ServerProcess(core.MLX_SERVER, argv, "/health", core.RESULTS / "logs" / f"options-{tag}-mlx.log")


def decode_rates(server: core.ServerProcess, tokens: int, reps: int) -> list[float]:
    """Streaming decode tok/s of `reps` greedy chats (after one warm-up), each a fresh prompt."""
    rates = []
    for i in range(reps + 1):
        sample = core.stream_chat(server.port, core.story_prompt(i + 100), tokens)
        if sample.error:
            raise RuntimeError(f"{server.name}: {sample.error}")
        if i and sample.decode_tps:
            rates.append(sample.decode_tps)
    return rates


def speculative(model: Path, drafts: dict[str, Path], tokens: int, reps: int) -> list[dict]:
    rows = []
    for label, draft in [("none", None), *drafts.items()]:
        flags = [] if draft is None else ["--draft-model", str(draft), "--num-draft-tokens", str(DRAFT_TOKENS)]
        row = {"draft": label}
        for name, make in (("lem", lem), ("mlx", mlx)):
            server = make(model, f"spec-{label}", *flags).start()
            try:
                row[name] = statistics.median(decode_rates(server, tokens, reps))
                if name == "lem" and draft is not None:
                    row["acceptance"] = health(server.port)["speculative"]["acceptance_rate"]
            finally:
                server.stop()
        rows.append(row)
        core.progress(f"speculative, draft {label}: {row}")
    return rows


def kv_memory(model: Path, context: int, tokens: int, reps: int) -> list[dict]:
    from mlx_lm.utils import load_tokenizer
    tokenizer = load_tokenizer(model)
    rows = []
    history = core.build_history(lambda m: len(tokenizer.apply_chat_template(m, add_generation_prompt=True)),
                                 context, "kv") + [{"role": "user", "content": "Go on."}]
    for bits in (None, 8, 4):
        flags = [] if bits is None else ["--kv-bits", str(bits), "--quantized-kv-start", "0"]
        row = {"kv_bits": bits or 16}
        for name, make in (("lem", lem), ("mlx", mlx)):
            server = make(model, f"kv-{bits}", *flags).start()
            try:
                before = peak_rss(server)
                sample = core.stream_chat(server.port, history, tokens)
                if sample.error:
                    raise RuntimeError(f"{server.name}: {sample.error}")
                row[f"{name}_rss_per_token"] = (peak_rss(server) - before) / max(sample.prompt_tokens or 1, 1)
                if name == "lem":  # the prompt cache now holds exactly this one conversation
                    cache = health(server.port)["prompt_cache"]
                    row["prompt_tokens"] = sample.prompt_tokens
                    row["lem_cache_bytes_per_token"] = cache["bytes"] / max(sample.prompt_tokens + tokens, 1)
                row[f"{name}_decode"] = statistics.median(decode_rates(server, tokens, reps))
            finally:
                server.stop()
        rows.append(row)
        core.progress(f"kv cache, {row['kv_bits']} bits: {row}")
    return rows


def markdown(report: dict) -> str:
    lines = [f"`python bench/model_options.py` on {report['when']}: {report['environment']}. Model: "
             f"{report['model']}; greedy; medians of {report['reps']} repetitions.", "",
             f"Speculative decoding, `--num-draft-tokens {DRAFT_TOKENS}`, {report['tokens']} tokens per chat:", "",
             "| draft | lem-serve tok/s | mlx_lm.server tok/s | lem/mlx_lm.server | lem with/without draft "
             "| acceptance |", "|---|---:|---:|---:|---:|---:|"]
    base = report["speculative"][0]["lem"]
    for row in report["speculative"]:
        lines.append(f"| {row['draft']} | {row['lem']:.1f} | {row['mlx']:.1f} | {row['lem'] / row['mlx']:.2f}x "
                     f"| {row['lem'] / base:.2f}x | {core.fmt(row.get('acceptance'), 2)} |")
    lines += ["", f"Quantized KV cache, `--quantized-kv-start 0`, a {report['kv'][0]['prompt_tokens']}-token prompt:",
              "", "| KV bits | lem KV bytes/token (prompt cache) | lem peak RSS growth/token | mlx_lm.server "
              "peak RSS growth/token | lem decode tok/s | mlx_lm.server decode tok/s |",
              "|---:|---:|---:|---:|---:|---:|"]
    for row in report["kv"]:
        lines.append(f"| {row['kv_bits']} | {row['lem_cache_bytes_per_token']:.0f} | {row['lem_rss_per_token']:.0f} "
                     f"| {row['mlx_rss_per_token']:.0f} | {row['lem_decode']:.1f} | {row['mlx_decode']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter repetitions")
    parser.add_argument("--model", default="small", help="tiny, small or a model folder (default small)")
    args = parser.parse_args(argv)
    tokens, reps, context = (32, 2, 400) if args.quick else (96, 5, 1000)
    model = core.prepare_model(args.model)
    config = json.loads((model / "config.json").read_text())
    stranger = core.MODELS / f"draft-for-{model.name}"
    if not (stranger / "config.json").is_file():
        build_tiny_model(stranger, vocab_size=config["vocab_size"], seed=7)
    env = core.environment()
    report = {"when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "environment": f"{env['platform']}, {env['cpus']} CPUs, mlx {env['mlx']}, mlx-lm {env['mlx_lm']}, "
                             f"commit {env['commit']}, load average {env['loadavg_start'][0]:.1f} at start",
              "model": core.model_label(args.model, model), "tokens": tokens, "reps": reps,
              "speculative": speculative(model, {"agreeing (itself)": model, "disagreeing (random tiny)": stranger},
                                         tokens, reps),
              "kv": kv_memory(model, context, tokens, reps)}
    core.RESULTS.mkdir(parents=True, exist_ok=True)
    (core.RESULTS / "model_options.json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    (core.RESULTS / "model_options.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
