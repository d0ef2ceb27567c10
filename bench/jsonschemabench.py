#!/usr/bin/env python3
"""Structured output on JSONSchemaBench's development sample: coverage, compliance, compile time, speed.

For each schema of ../shared/jsonschemabench/dev-sample.jsonl (300 real-world schemas, 30 per subset;
see its README for source and citation) the server either refuses it with a 400 naming what it does not
enforce, or answers; every answer is checked by the `jsonschema` validator with format checking on.
Printed per subset:

    declared coverage   schemas accepted (not refused)
    compliance          outputs that validate, of those that finished ("length" ones are counted apart)
    compile p50/p95     compile_schema() plus the first token mask on the model's vocabulary, in process

then constrained vs unconstrained decode tok/s (bench.py's structured test, interleaved, median ratio).

    python bench/jsonschemabench.py                      # tiny random-weight model, 2 seeds per schema
    python bench/jsonschemabench.py --model smollm2 --compile-only   # compile times on SmolLM2's 49k vocabulary
    python bench/jsonschemabench.py --per-subset 5 --seeds 1         # a quick slice

Sampling is at temperature 0.8 (seed = run index), so outputs wander over the schema as a real model's would.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as core  # noqa: E402  (bench/bench.py: servers, models, statistics)

ROOT = core.ROOT
sys.path.insert(0, str(ROOT))
import lem_serve  # noqa: E402
from testing.schemas import validation_errors  # noqa: E402

# ../shared beside the repository (CI); a worktree one level deeper looks one level up too.
SAMPLE = next((p / "shared" / "jsonschemabench" / "dev-sample.jsonl" for p in (ROOT.parent, ROOT.parent.parent)
               if (p / "shared" / "jsonschemabench").is_dir()), ROOT.parent / "shared" / "jsonschemabench" / "dev-sample.jsonl")
PROMPT = [{"role": "user", "content": "Answer with one JSON value that fits the schema."}]


def load_sample(path: Path = SAMPLE, per_subset: int | None = None) -> list[dict]:
    """The sample's rows ({"subset", "id", "schema"}), the first `per_subset` of each subset if given."""
    rows, seen = [], collections.Counter()
    for line in path.read_text().splitlines():
        row = json.loads(line)
        seen[row["subset"]] += 1
        if per_subset is None or seen[row["subset"]] <= per_subset:
            rows.append(row)
    return rows


def ask(port: int, schema: dict, seed: int, max_tokens: int, temperature: float = 0.8) -> tuple[int, dict]:
    """(HTTP status, JSON body) of one chat completion constrained by `schema`."""
    body = {"messages": PROMPT, "max_tokens": max_tokens, "temperature": temperature, "seed": seed,
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=core.REQUEST_TIMEOUT)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def judge(port: int, row: dict, seeds: int, max_tokens: int) -> dict:
    """One schema's verdict: refused (with the message), or its outputs counted valid / invalid / length."""
    out = {"subset": row["subset"], "id": row["id"], "valid": 0, "invalid": 0, "length": 0, "errors": []}
    for seed in range(seeds):
        status, body = ask(port, row["schema"], seed, max_tokens)
        if status == 400:
            return out | {"refused": body["error"]["message"]}
        if status != 200:
            return out | {"server_error": f"HTTP {status}: {json.dumps(body)[:200]}"}
        choice = body["choices"][0]
        if choice["finish_reason"] == "length":
            out["length"] += 1
            continue
        try:
            errors = validation_errors(json.loads(choice["message"]["content"]), row["schema"])
        except ValueError as exc:
            errors = [f"not JSON: {exc}"]
        out["invalid" if errors else "valid"] += 1
        out["errors"] += errors[:2]
    return out


def compile_seconds(model_path: Path, rows: list[dict]) -> dict[str, float]:
    """Per schema id: compile_schema() plus the first token mask, on this model's vocabulary (table built first)."""
    import mlx.core as mx
    model = lem_serve.load_model(lem_serve.Settings(model_path=str(model_path)))
    table = lem_serve.token_table(model.tokenizer)
    times = {}
    for row in rows:
        began = time.perf_counter()
        try:
            node = lem_serve.compile_schema(row["schema"], row["schema"], "response_format")
        except lem_serve.APIError:
            continue
        masks = lem_serve.JsonMasks(table, lem_serve.json_start(node))
        mx.eval(masks.allowed(masks.start, model.vocab_size))
        times[row["id"]] = time.perf_counter() - began
    return times


def report(verdicts: list[dict], times: dict[str, float]) -> list[str]:
    """The per-subset table, as markdown lines."""
    lines = ["| subset | schemas | accepted | outputs valid | length | compile p50 / p95 (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    groups = collections.defaultdict(list)
    for v in verdicts:
        groups[v["subset"]].append(v)
    groups["all"] = verdicts
    for subset, items in sorted(groups.items(), key=lambda kv: (kv[0] == "all", kv[0])):
        accepted = [v for v in items if "refused" not in v and "server_error" not in v]
        valid, invalid = sum(v["valid"] for v in items), sum(v["invalid"] for v in items)
        spent = [times[v["id"]] for v in items if v["id"] in times]
        p50, p95 = core.percentile(spent, 50), core.percentile(spent, 95)
        lines.append(f"| {subset} | {len(items)} | {100 * len(accepted) / len(items):.1f}% | "
                     f"{100 * valid / max(valid + invalid, 1):.2f}% ({valid}/{valid + invalid}) | "
                     f"{sum(v['length'] for v in items)} | {core.fmt(p50, 3)} / {core.fmt(p95, 3)} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny, small, smollm2 or a model folder")
    parser.add_argument("--per-subset", type=int, default=None, help="schemas per subset (default: all 30)")
    parser.add_argument("--seeds", type=int, default=2, help="sampled outputs per schema")
    parser.add_argument("--max-tokens", type=int, default=600)
    parser.add_argument("--compile-only", action="store_true", help="compile times only: no server")
    parser.add_argument("--speed-reps", type=int, default=5, help="constrained/unconstrained pairs; 0 skips")
    args = parser.parse_args(argv)
    if not SAMPLE.is_file():
        raise SystemExit(f"no sample at {SAMPLE}")
    rows = load_sample(per_subset=args.per_subset)
    path = core.prepare_model(args.model)
    times = compile_seconds(path, rows)
    verdicts = [{"subset": r["subset"], "id": r["id"], "valid": 0, "invalid": 0, "length": 0,
                 **({} if r["id"] in times else {"refused": "(compile)"})} for r in rows]
    if not args.compile_only:
        server = core.lem_server(path, "jsonschemabench", 1).start()
        try:
            verdicts = [judge(server.port, row, args.seeds, args.max_tokens) for row in rows]
            speed = core.structured_test(server.port, core.replace(core.plan_for(args.model, False),
                                                                     structured_reps=args.speed_reps)) \
                if args.speed_reps else None
        finally:
            server.stop()
    print(f"model {core.model_label(args.model, path)}; {len(rows)} schemas; {args.seeds} seeds at temperature 0.8")
    print("\n".join(report(verdicts, times)))
    refusals = collections.Counter(v["refused"][:110] for v in verdicts if "refused" in v)
    for message, count in refusals.most_common(12):
        print(f"refused x{count}: {message}")
    for v in verdicts:
        if v["invalid"] or "server_error" in v:
            print("INVALID" if v["invalid"] else "SERVER ERROR", v["subset"], v["id"], v.get("server_error") or v["errors"][:2])
    if not args.compile_only and speed:
        print(f"decode tok/s constrained {core.fmt(speed['constrained']['decode_tps'])}, unconstrained "
              f"{core.fmt(speed['unconstrained']['decode_tps'])}: ratio {core.fmt(speed['ratio'])} (median of pairs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
