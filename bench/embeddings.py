#!/usr/bin/env python3
"""Benchmark /v1/embeddings against the same forward pass done directly with mlx-lm.

For 1, 16 and 256 inputs of 64 tokens each, the same token ids go

* to lem-serve's POST /v1/embeddings (a server subprocess, token-id input,
  base64 vectors as the openai SDK asks for them), timed from request to
  the last byte of the reply; and
* straight through mlx-lm in this process: one padded forward pass of the
  model's inner network (its final hidden states), last-token pooling and
  L2 normalization, evaluated: what the server computes, with no HTTP.

The two alternate, request by request, so that a shared machine's load
falls on both alike. Reported: the median seconds of each, embeddings per
second, and the ratio (lem-serve's embeddings/s over direct mlx-lm's; 1.0 =
no overhead). The model is testing/tiny_model.py's random-weight Qwen2
(hidden 64, 2 layers, a 512-token vocabulary), built once: on Linux's
mlx[cpu], whose BLAS is a single-threaded reference one, 256 x 64 tokens of
anything larger take minutes a pass. Any model folder can be given instead.

Run (from the repository root, venv active; about two minutes on 2 shared cores):

    python bench/embeddings.py                  # the built model
    python bench/embeddings.py --model PATH     # another model folder
    python bench/embeddings.py --quick          # fewer repetitions

Results go to bench/results/embeddings.{json,md}.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as core  # noqa: E402  (bench/bench.py: server subprocesses, paths)

ROOT = core.ROOT
sys.path.insert(0, str(ROOT))
from testing.tiny_model import build_tiny_model  # noqa: E402

INPUT_TOKENS = 64
SIZES = (1, 16, 256)
REPS = {1: 31, 16: 9, 256: 5}           # timed requests per size (after one warm-up each)
QUICK_REPS = {1: 7, 16: 3, 256: 1}


def prepare_model(path: str | None) -> Path:
    """The model folder to embed with: the one given, or the benchmark's own, built once."""
    if path:
        return Path(path).expanduser().resolve()
    folder = core.MODELS / "embeddings"
    if not (folder / "config.json").is_file():
        print(f"building the benchmark model into {folder} ...", flush=True)
        build_tiny_model(folder)
    return folder


def token_rows(count: int, vocab: int, seed: int) -> list[list[int]]:
    """`count` inputs of INPUT_TOKENS ordinary token ids (the top of the vocabulary holds special tokens)."""
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab - 64) for _ in range(INPUT_TOKENS)] for _ in range(count)]


def direct(inner, rows: list[list[int]]) -> float:
    """Seconds for the forward pass, pooling and normalization done directly with mlx-lm."""
    import mlx.core as mx
    started = time.perf_counter()
    hidden = inner(mx.array(rows)).astype(mx.float32)
    pooled = hidden[:, -1]  # every row is INPUT_TOKENS long: its last token is the last position
    mx.eval(pooled / mx.linalg.norm(pooled, axis=-1, keepdims=True))
    return time.perf_counter() - started


def served(port: int, rows: list[list[int]]) -> float:
    """Seconds for one /v1/embeddings request of these token ids, to the last byte of the reply."""
    body = json.dumps({"input": rows, "encoding_format": "base64"})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=core.REQUEST_TIMEOUT)
    started = time.perf_counter()
    conn.request("POST", "/v1/embeddings", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    payload = response.read()
    elapsed = time.perf_counter() - started
    conn.close()
    if response.status != 200 or len(json.loads(payload)["data"]) != len(rows):
        raise RuntimeError(f"lem-serve answered {response.status}: {payload[:300]!r}")
    return elapsed


def measure(inner, port: int, vocab: int, reps: dict) -> list[dict]:
    """Per size: both sides' median seconds, embeddings/s and the ratio, alternating which goes first."""
    rows_out = []
    for size in SIZES:
        rows = token_rows(size, vocab, seed=size)
        direct(inner, rows), served(port, rows)  # warm-up: first-call costs on both sides
        times = {"direct": [], "lem": []}
        for rep in range(reps[size]):
            order = (("direct", lambda: direct(inner, rows)), ("lem", lambda: served(port, rows)))
            for name, run in order if rep % 2 == 0 else order[::-1]:
                times[name].append(run())
        d, s = statistics.median(times["direct"]), statistics.median(times["lem"])
        rows_out.append({"inputs": size, "reps": reps[size], "direct_s": d, "lem_s": s,
                         "direct_per_s": size / d, "lem_per_s": size / s, "ratio": d / s})
        print(f"{size:4d} inputs: direct {d * 1000:8.1f} ms, lem-serve {s * 1000:8.1f} ms, ratio {d / s:.2f}", flush=True)
    return rows_out


def markdown(results: list[dict], label: str) -> str:
    lines = [f"Embeddings of {INPUT_TOKENS}-token inputs, {label}: medians; ratio = lem-serve's embeddings/s "
             "over direct mlx-lm's.", "",
             "| inputs | direct mlx-lm | lem-serve | direct emb/s | lem-serve emb/s | ratio |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['inputs']} | {r['direct_s'] * 1000:.1f} ms | {r['lem_s'] * 1000:.1f} ms | "
                     f"{r['direct_per_s']:.1f} | {r['lem_per_s']:.1f} | {r['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model folder (default: the tiny random-weight Qwen2)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args(argv)
    folder = prepare_model(args.model)
    import mlx.core as mx
    import mlx_lm
    sys.path.insert(0, str(ROOT))
    from lem_serve import hidden_state_model, vocab_size_of
    network, tokenizer = mlx_lm.load(str(folder))
    mx.eval(network.parameters())
    port = core.free_port()
    server = core.ServerProcess(core.LEM, [sys.executable, str(ROOT / "lem_serve.py"), "--model-path", str(folder),
                                           "--bind", f"127.0.0.1:{port}", "--max-requests", "1",
                                           "--timeout", str(core.REQUEST_TIMEOUT), "--log-level", "warning"],
                                "/healthz", core.RESULTS / "logs" / "embeddings-lem.log")
    try:
        server.start()
        results = measure(hidden_state_model(network), port, vocab_size_of(network, tokenizer),
                          QUICK_REPS if args.quick else REPS)
    finally:
        server.stop()
    label = core.model_label("embeddings" if not args.model else folder.name, folder)
    core.RESULTS.mkdir(parents=True, exist_ok=True)
    (core.RESULTS / "embeddings.json").write_text(json.dumps({"model": label, "results": results}, indent=2))
    (core.RESULTS / "embeddings.md").write_text(markdown(results, label))
    print(markdown(results, label))
    return 0


if __name__ == "__main__":
    sys.exit(main())
