#!/usr/bin/env python3
"""Structured output without a model: the verdict to keep green while changing the automaton.

For every schema of JSONSchemaBench's development sample (../shared/jsonschemabench/, see
jsonschemabench.py), compile it with this repository's lem_serve.py, then take random walks through the
automaton (any character a sampler could pick) and validate each closed text with jsonschema. About 20 s.

    python bench/schema_oracle.py                   # compare with bench/schema_oracle_baseline.json
    python bench/schema_oracle.py --write-baseline  # record a new baseline (after a deliberate change)

Prints accepted, refused, invalid walks or dead ends, crashes, and every schema whose verdict changed.
"""
import argparse
import json
import os
import random
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import lem_serve  # noqa: E402
from testing.checks import automaton_walks  # noqa: E402
from testing.schemas import validation_errors  # noqa: E402

SAMPLE = next((p / "shared" / "jsonschemabench" / "dev-sample.jsonl" for p in (ROOT.parent, ROOT.parent.parent)
               if (p / "shared" / "jsonschemabench").is_dir()), ROOT.parent / "shared" / "jsonschemabench" / "dev-sample.jsonl")
BASE = Path(__file__).resolve().parent / "schema_oracle_baseline.json"
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--write-baseline", action="store_true")
    ap.add_argument("--walks", type=int, default=4)
    ap.add_argument("--only", default=None, help="subset name or row index")
    args = ap.parse_args()
    rows = [json.loads(l) for l in open(SAMPLE)]
    results, bad, t0 = {}, 0, time.time()
    for i, row in enumerate(rows):
        if args.only and args.only not in (row["subset"], str(i)):
            continue
        key = f"{i}:{row['subset']}"
        schema = row["schema"]
        try:
            node = lem_serve.compile_schema(schema, schema, "x")
        except lem_serve.APIError as exc:
            results[key] = "refused: " + exc.message[:160]
            continue
        except Exception as exc:
            results[key] = "CRASH: " + repr(exc)[:160]
            traceback.print_exc()
            continue
        results[key] = "accepted"
        for text, problem in automaton_walks(node, random.Random(i), args.walks):
            if problem is None:
                try:
                    errs = validation_errors(json.loads(text), schema)
                except Exception as exc:
                    errs = [f"not JSON: {exc}"]
                problem = errs[0] if errs else None
            if problem:
                bad += 1
                results[key] = "INVALID"
                print(f"INVALID {key}: {str(problem)[:120]} :: {text[:200]!r}")
                break
    acc = sum(v in ("accepted", "INVALID") for v in results.values())
    print(f"{len(results)} schemas: {acc} accepted ({100*acc/max(len(results),1):.1f}%), "
          f"{sum(v.startswith('refused') for v in results.values())} refused, {bad} with an invalid walk or dead end, "
          f"{sum(v.startswith('CRASH') for v in results.values())} crashes, {time.time()-t0:.0f} s")
    if args.write_baseline:
        json.dump(results, open(BASE, "w"), indent=0)
        return
    base = json.load(open(BASE))
    for k, v in results.items():
        b = base.get(k)
        if (b == "accepted") != (v == "accepted"):
            print(f"CHANGED {k}: {b} -> {v}")


if __name__ == "__main__":
    main()
