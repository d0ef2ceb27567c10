#!/usr/bin/env python3
"""Benchmark lem-serve in one process against the same model sharded over two ranks.

Two ranks are started the way users start them, ``mlx.launch -n 2 --backend
ring``, here both on this machine over loopback. What it measures, on the same
model folder, greedy, chat template applied:

1. Single stream: decode tok/s and time to first token (TTFT) of
   * lem-serve in one process,
   * lem-serve over two ranks (tensor parallel; rank 0 serves HTTP),
   * raw mlx_lm ``stream_generate``, one process (bench.py's raw worker) and
     sharded over two ranks (``sharded_load``), no server: the ratio lem/raw
     of each shows what lem-serve adds on top, sharded or not; and raw over two
     ranks once more with its mlx.launch reniced as lem-serve's ranks renice
     theirs (quiet_launcher: nice 19 and, on Linux, the idle class, since the
     launcher's relay threads busy-poll), so the sharded ratio can be read
     like for like too. Every group gets an open pipe on stdin (the raw
     workers' requests; an unused one for lem-serve, as a terminal would be).
   * lem-serve and raw over two ranks once more without mlx.launch (bash
     starts both ranks with the ring's environment): what each adds with no
     launcher in the way, the cleanest like-for-like ratio.
   All seven are started, then measured in turns, repetition by repetition,
   each resumed (SIGCONT) for its turn while the others stay paused
   (SIGSTOP): an idle group is not idle here (mlx.launch's I/O loop and the
   ring backend's wait spin; the script reports how much CPU they take).
   Medians of the repetitions.
2. Concurrency 4: aggregate tok/s and TTFT p50 of the two lem-serves.
   Beside tok/s, CPU time per generated token, which the box's other load
   distorts far less than wall time: each rank's process (every thread,
   ended ones too, from /proc), the same without the ring backend's busy
   wait (its receive thread spins on a non-blocking recv for as long as a
   collective waits for the other rank, so it grows with wall time; it is
   the rank's thread with the most system time), mlx.launch's, and the
   HTTP client's (this script reading lem-serve's SSE). Linux only.
3. The cost of one engine step's sync when nothing changed: rank 0's
   ``GroupLink.share`` of no ops (one all_sum of 16 bytes), against a bare
   all_sum of the same 16 bytes, and the share of one Insert op carrying a
   1,000-token prompt; then the same two shares on the lifelines (what the
   engine uses when every rank has one: a write on rank 0). Median
   microseconds over 500 calls after a warm-up.

Run it (from the repository root, venv active):

    python bench/bench_sharded.py              # tiny and small, ~10 min on 2 cores
    python bench/bench_sharded.py --quick      # tiny only, fewer repetitions, ~3 min

Results go to bench/results/sharded.json and .md, and (not with --quick) to
bench/RESULTS-sharded.md. This machine has 2 cores shared by both ranks and
their loopback socket; read the ratios, and see deploy/README.md "What to expect"
for what to expect from Macs linked by Thunderbolt.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench  # noqa: E402  (the single-process benchmark's helpers)
from testing.group import free_port_run, launcher  # noqa: E402

ROOT = bench.ROOT
RESULTS = bench.RESULTS
ONE, GROUP = "lem-serve, 1 process", "lem-serve, 2 ranks"
RAW1, RAW2 = "raw mlx_lm, 1 process", "raw mlx_lm, 2 ranks"
RAW2N = "raw mlx_lm, 2 ranks, launcher reniced"   # raw given lem-serve's quiet_launcher(), for a like-for-like ratio
GROUPD, RAW2D = "lem-serve, 2 ranks, no launcher", "raw mlx_lm, 2 ranks, no launcher"   # ranks started directly
SHARE_CALLS = 500
CPU_COLUMNS = ("rank 0", "rank 0 less ring wait", "rank 1", "rank 1 less ring wait", "mlx.launch", "client")


def direct(command: list[str], tag: str) -> list[str]:
    """Two ranks of `command` without mlx.launch: bash starts both with the ring backend's environment (the
    host list, MLX_RANK) and copies its stdin to both, as mlx.launch does; rank 1's stdout is dropped."""
    port = free_port_run(2)
    hosts = RESULTS / "logs" / f"{tag}-hosts.json"
    hosts.parent.mkdir(parents=True, exist_ok=True)
    hosts.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    rank = [f"MLX_RANK={r} MLX_HOSTFILE={shlex.quote(str(hosts))} {shlex.join(command)}" for r in (0, 1)]
    return ["bash", "-c", f"tee >({rank[1]} >/dev/null) | {rank[0]}"]


def group_server(model: Path, tag: str, max_requests: int, launched: bool = True) -> bench.ServerProcess:
    """lem-serve under mlx.launch -n 2 --backend ring on loopback (or its two ranks started directly); rank 0
    serves HTTP."""
    port = bench.free_port()
    command = [sys.executable, str(ROOT / "lem_serve.py"), "--model-path", str(model),
               "--bind", f"127.0.0.1:{port}", "--max-requests", str(max_requests), "--max-context", "0",
               "--log-level", "warning"]
    argv = [launcher(), "-n", "2", "--backend", "ring", "--starting-port", str(free_port_run(2)),
            "--python", *command]
    server = bench.ServerProcess(GROUP if launched else GROUPD, argv, "/healthz",
                                 RESULTS / "logs" / f"{tag}-lem-serve-2-ranks{'' if launched else '-direct'}.log")
    server.argv = argv if launched else direct(command, f"{tag}-lem")
    # An open pipe on stdin, as the raw workers have (and a terminal gives): at end of file (/dev/null, the
    # bench run without a terminal) mlx.launch's main loop busy-polls it, one more spinning thread than raw's.
    server.stdin = subprocess.PIPE
    return server


def run_worker(ranks: int, *args: str) -> dict:
    """This script in worker mode, alone or under mlx.launch; rank 0's JSON answer."""
    me = [str(Path(__file__).resolve()), *args]
    argv = ([launcher(), "-n", str(ranks), "--backend", "ring", "--starting-port", str(free_port_run(ranks)),
             "--python", sys.executable, *me] if ranks > 1 else [sys.executable, *me])
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=1800,
                         start_new_session=True)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"worker {args} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")


class RawGroupWorker(bench.RawWorker):
    """bench.py's raw mlx_lm worker, sharded over two ranks with sharded_load.

    mlx.launch hands its stdin to every rank, so all ranks read each request
    and generate together; only rank 0 answers on stdout.
    """

    def __init__(self, model: Path, tag: str, renice: bool = False, launched: bool = True):
        super().__init__(model, tag)
        self.name = (RAW2N if renice else RAW2) if launched else RAW2D
        command = [sys.executable, str(Path(__file__).resolve()), "--raw-worker", str(model)]
        command += ["--renice"] if renice else []
        self.argv = ([launcher(), "-n", "2", "--backend", "ring", "--starting-port", str(free_port_run(2)),
                      "--python", *command] if launched else direct(command, f"{tag}-raw"))
        self.log_path = RESULTS / "logs" / f"{tag}-raw-2-ranks{'-reniced' * renice}{'' if launched else '-direct'}.log"


def raw_worker(model_path: str, renice: bool) -> None:
    """One rank of the sharded raw worker: bench.raw_worker's protocol, the model from sharded_load;
    with `renice`, mlx.launch is reniced as lem-serve's ranks do it (lem_serve.quiet_launcher)."""
    import mlx.core as mx
    from mlx_lm.utils import sharded_load
    group = mx.distributed.init()
    if renice:
        import lem_serve
        lem_serve.quiet_launcher(os.getppid())
    model, tokenizer = sharded_load(model_path, tensor_group=group)
    out = sys.stdout if group.rank() == 0 else open(os.devnull, "w")
    sys.stdout = sys.stderr
    out.write(bench.WORKER_READY + "\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        out.write(json.dumps(bench.raw_stream(model, tokenizer, request["messages"], request["max_tokens"])) + "\n")
        out.flush()
    os._exit(0)


def share_worker() -> None:
    """Time GroupLink.share on rank 0: no ops, and one Insert of a 1,000-token prompt."""
    import mlx.core as mx
    import lem_serve
    group = mx.distributed.init()
    link = lem_serve.GroupLink(group)
    stream = mx.default_stream(mx.default_device())
    request = lem_serve.GenerationRequest(endpoint="completions", seed=1)  # the Insert carries no prompt text
    insert = [lem_serve.Insert(0, list(range(1000)), 0, 100, request)]

    def timed(call) -> float:
        for _ in range(50):
            call()
        times = []
        for _ in range(SHARE_CALLS):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e6

    leader = group.rank() == 0
    result = {
        "bare all_sum": timed(lambda: mx.distributed.all_sum(mx.zeros((4,), dtype=mx.int32), group=group).tolist()),
        "share, no ops": timed(lambda: link.share([], link.STEP, 0, stream)),
        "share, one Insert (1,000 tokens)": timed(lambda: link.share(insert if leader else [], link.STEP, 0, stream)),
    }
    lifelines = lem_serve.Lifelines(link)  # as the engine does: then shares travel on them
    link.use_lifelines(lifelines.sockets)
    if leader:  # rank 0 watches its lifelines for votes; the others' engines read theirs themselves
        threading.Thread(target=lifelines.wait_for_loss, daemon=True).start()
    if link.framed:  # rank 0 only writes; the others read every frame, so the counts match
        result["share on the lifelines, no ops"] = timed(lambda: link.share([], link.STEP, 0, stream))
        result["share on the lifelines, one Insert"] = timed(lambda: link.share(insert if leader else [], link.STEP,
                                                                                0, stream))
        mx.eval(mx.distributed.all_sum(mx.array([0]), group=group))  # both done before rank 0 exits
    if leader:
        result["insert payload bytes"] = len(__import__("pickle").dumps(insert))
        print("RESULT " + json.dumps(result), flush=True)
    os._exit(0)


@contextlib.contextmanager
def running(process) -> Iterator[None]:
    """Let a paused system run (SIGCONT to its session) for the block, then pause it again (SIGSTOP).

    Only the system being measured runs: an idle group is not idle on a
    shared 2-core machine (see idle_cpu), and would slow the others down.
    """
    os.killpg(process.proc.pid, signal.SIGCONT)
    try:
        yield
    finally:
        os.killpg(process.proc.pid, signal.SIGSTOP)


def processes_of(process) -> dict[str, int]:
    """The processes a system runs, by role: "rank 0", "rank 1" and "mlx.launch" (or "rank 0" alone)."""
    from testing.group import environ_of
    session = process.proc.pid
    found = {}
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            if not entry.name.isdigit() or int((entry / "stat").read_text().rpartition(")")[2].split()[3]) != session:
                continue
            pid, command = int(entry.name), (entry / "cmdline").read_text(errors="replace")
            if "mlx.launch" in command:
                found["mlx.launch"] = pid
            elif "MLX_RANK" in (env := environ_of(pid)) and "python" in (entry / "comm").read_text():
                found[f"rank {env['MLX_RANK']}"] = pid
    return found or {"rank 0": session}


def cpu_seconds(pid: int) -> tuple[float, dict[int, tuple[float, float]]]:
    """CPU seconds of every thread of `pid` so far (ended ones included), and each live thread's (CPU, system)
    seconds, from /proc (Linux)."""
    def times(stat: Path) -> tuple[float, float]:
        fields = stat.read_text().rpartition(")")[2].split()
        user, system = int(fields[11]) / hz, int(fields[12]) / hz   # clock ticks
        return user + system, system
    hz = os.sysconf("SC_CLK_TCK")
    threads = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError):
            threads[int(task.name)] = times(task / "stat")
    return times(Path(f"/proc/{pid}/stat"))[0], threads


def cpu_snapshot(pids: dict[str, int]) -> dict[str, tuple[float, dict]]:
    """cpu_seconds of each process, and this thread's own (the HTTP client's reading, for lem-serve) as "client"."""
    snap = {who: cpu_seconds(pid) for who, pid in pids.items()}
    snap["client"] = (time.thread_time(), {})
    return snap


def cpu_spent(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds each process spent between two snapshots; for each rank of a group also without the ring's
    busy wait: the thread that spent the most system time is the ring backend's receive thread, which spins
    (mostly in recv) for as long as a collective waits on the other rank, CPU that grows with wall time."""
    out = {}
    group = len([who for who in after if who.startswith("rank")]) > 1
    for who, (total, threads) in after.items():
        out[who] = total - before[who][0]
        spent = {tid: (cpu - before[who][1][tid][0], system - before[who][1][tid][1])
                 for tid, (cpu, system) in threads.items() if tid in before[who][1]}
        if group and who.startswith("rank") and spent:
            out[f"{who} less ring wait"] = out[who] - max(spent.values(), key=lambda t: t[1])[0]
    return out


def cpu_per_token(spent: list[dict[str, float]], tokens: int) -> dict[str, float]:
    """Milliseconds of CPU per generated token over all repetitions: their CPU summed over their tokens summed
    (/proc counts in clock ticks, 10 ms: one request of a tiny model spends only a few)."""
    return {who: 1e3 * sum(s.get(who, 0.0) for s in spent) / max(tokens, 1) for who in spent[0]} if spent else {}


def single_stream(systems: dict, tokens: int, reps: int) -> dict:
    """Single streams, interleaved system by system each repetition; medians of decode tok/s and TTFT."""
    samples = {name: [] for name in systems}
    cpu = {name: [] for name in systems}
    pids = {name: processes_of(process) for name, (process, _stream) in systems.items()}
    for rep in range(reps + 1):  # the first round is a warm-up
        for name in bench.rotated(tuple(systems), rep):
            process, stream = systems[name]
            with running(process):
                before = cpu_snapshot(pids[name])
                sample = stream(bench.story_prompt(rep), tokens)
                after = cpu_snapshot(pids[name])
            if sample.error:
                raise RuntimeError(f"{name}: {sample.error}")
            if rep:
                samples[name].append(sample)
                cpu[name].append(cpu_spent(before, after))
    return {name: {"decode_tps": bench.median([s.decode_tps for s in got]), "each": [s.decode_tps for s in got],
                   "ttft": bench.median([s.ttft for s in got]), "tokens": got[0].tokens,
                   "cpu_ms_per_token": cpu_per_token(cpu[name], sum(s.tokens for s in got))}
            for name, got in samples.items()}


def paired(single: dict, a: str, b: str) -> list[float]:
    """a/b decode tok/s repetition by repetition: the two ran minutes apart at most, under the same load."""
    return sorted(x / y for x, y in zip(single[a]["each"], single[b]["each"]) if x and y)


def concurrent(servers: dict, tokens: int, rounds: int, level: int = 4) -> dict:
    """`level` streams at once against each server: aggregate tok/s and TTFT p50 (medians of rounds)."""
    result = {name: {"tps": [], "ttft": []} for name in servers}
    for rnd in range(rounds):
        for name in bench.rotated(tuple(servers), rnd):
            conversations = [bench.story_prompt(100 * (rnd + 1) + i) for i in range(level)]
            with running(servers[name]):
                samples = bench.run_concurrent(servers[name].port, conversations, tokens)
            result[name]["tps"].append(bench.aggregate_tps(samples))
            result[name]["ttft"].append(bench.percentile([s.ttft for s in samples], 50))
    return {name: {"tps": bench.median(r["tps"]), "ttft_p50": bench.median(r["ttft"])} for name, r in result.items()}


def idle_cpu(server: bench.ServerProcess, seconds: float = 5.0) -> dict:
    """CPU share (1.0 = one core) each process of an idle group uses: the launcher and its ranks."""
    pids = processes_of(server)
    with running(server):
        time.sleep(1.0)
        before = {who: cpu_seconds(pid)[0] for who, pid in pids.items()}
        time.sleep(seconds)
        after = {who: cpu_seconds(pid)[0] for who, pid in pids.items()}
    return {who: (after[who] - before[who]) / seconds for who in sorted(pids)}


def started(make, tries: int = 3):
    """make() started; on a failed start made again (with new ports: a ring port picked at random can be taken
    by someone's ephemeral port before the group binds it)."""
    for attempt in range(tries):
        process = make()
        try:
            return process.start() or process
        except RuntimeError as exc:
            process.stop()
            if attempt == tries - 1:
                raise
            bench.progress(f"{process.name} did not start ({exc}); again")


def bench_model(name: str, quick: bool) -> dict:
    """The lem-serves and raw workers, started in turn, then measured turn by turn."""
    path = bench.prepare_model(name)
    tokens, reps = (64, 3) if quick else (128, 5)
    if name == "small":
        tokens, reps = (32, 2) if quick else (64, 5)
    result = {"model": bench.model_label(name, path), "tokens": tokens, "reps": reps}
    makers = {ONE: lambda: bench.lem_server(path, f"{name}-sharded", 4), RAW1: lambda: bench.RawWorker(path, name),
              GROUP: lambda: group_server(path, name, 4), RAW2: lambda: RawGroupWorker(path, name),
              RAW2N: lambda: RawGroupWorker(path, name, renice=True),
              GROUPD: lambda: group_server(path, name, 4, launched=False),
              RAW2D: lambda: RawGroupWorker(path, name, launched=False)}
    processes = {}
    try:
        for system, make in makers.items():
            processes[system] = started(make)
            os.killpg(processes[system].proc.pid, signal.SIGSTOP)
        systems = {system: (process, process.stream if system in (RAW1, RAW2, RAW2N, RAW2D) else
                            lambda m, t, port=process.port: bench.stream_chat(port, m, t))
                   for system, process in processes.items()}
        bench.progress(f"{name}: single stream, {reps} repetitions of {tokens} tokens")
        result["single"] = single_stream(systems, tokens, reps)
        bench.progress(f"{name}: 4 concurrent streams")
        result["concurrent"] = concurrent({s: processes[s] for s in (ONE, GROUP)}, tokens // 2, 1 if quick else 2)
        result["idle_cpu"] = idle_cpu(processes[GROUP])
    finally:
        for process in processes.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.proc.pid, signal.SIGCONT)
            process.stop()
    return result


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"`python bench/bench_sharded.py{' --quick' if report['quick'] else ''}` on {env['date']}: "
             f"{env['platform']}, {env['cpus']} CPUs, mlx {env['mlx']}, mlx-lm {env['mlx_lm']}. Load average "
             f"{env['load_start']:.1f} at start, {env['load_end']:.1f} at end. Both ranks share this machine's "
             "cores and talk over loopback (ring backend).", ""]
    share = report["share"]
    lines += ["Per-step sync on rank 0 (median of 500 calls):", "",
              "| call | µs |", "|---|---:|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in share.items() if k != "insert payload bytes"]
    lines += ["", f"(the Insert's pickled payload: {share['insert payload bytes']} bytes)", ""]
    for result in report["models"]:
        single, conc = result["single"], result["concurrent"]
        lines += [f"#### {result['model']}", "",
                  f"Single stream, {result['tokens']} tokens, medians of {result['reps']}:", "",
                  "| system | decode tok/s | TTFT |", "|---|---:|---:|"]
        for name in (ONE, GROUP, RAW1, RAW2, RAW2N, GROUPD, RAW2D):
            lines.append(f"| {name} | {bench.fmt(single[name]['decode_tps'])} | {bench.fmt_ms(single[name]['ttft'])} |")
        lines += ["", "CPU per generated token, ms (all repetitions' CPU over their tokens, prompt included; "
                  "\"less ring wait\": without the ring backend's busy-waiting receive thread; client: this script "
                  "reading the SSE):", "",
                  "| system | " + " | ".join(CPU_COLUMNS) + " |", "|---|" + "---:|" * len(CPU_COLUMNS)]
        for name in (ONE, GROUP, RAW1, RAW2, RAW2N, GROUPD, RAW2D):
            got = single[name].get("cpu_ms_per_token", {})
            lines.append(f"| {name} | " + " | ".join(f"{got[c]:.2f}" if c in got else "" for c in CPU_COLUMNS) + " |")
        tps = {name: single[name]["decode_tps"] for name in single}
        lines += ["", f"**2 ranks / 1 process: {bench.fmt_ratio(bench.ratio(tps[GROUP], tps[ONE]))} decode; "
                  f"lem/raw: {bench.fmt_ratio(bench.ratio(tps[ONE], tps[RAW1]))} in one process, "
                  f"{bench.fmt_ratio(bench.ratio(tps[GROUP], tps[RAW2]))} over two ranks "
                  f"({bench.fmt_ratio(bench.ratio(tps[GROUP], tps[RAW2N]))} against raw with its launcher reniced too).**",
                  "", f"Like for like, repetition by repetition (lem-serve / raw, both launchers reniced): "
                  + ", ".join(bench.fmt_ratio(r) for r in paired(single, GROUP, RAW2N))
                  + f"; median {bench.fmt_ratio(bench.median(paired(single, GROUP, RAW2N)))}. "
                  f"Without mlx.launch (both ranks started directly): lem/raw "
                  f"{bench.fmt_ratio(bench.ratio(tps[GROUPD], tps[RAW2D]))}; repetition by repetition "
                  + ", ".join(bench.fmt_ratio(r) for r in paired(single, GROUPD, RAW2D)) + ".",
                  "",
                  "4 concurrent streams: aggregate tok/s, TTFT p50:", "", "| system | tok/s | TTFT p50 |", "|---|---:|---:|"]
        for name in (ONE, GROUP):
            lines.append(f"| {name} | {bench.fmt(conc[name]['tps'])} | {bench.fmt_ms(conc[name]['ttft_p50'])} |")
        idle = ", ".join(f"{who} {share:.2f}" for who, share in result["idle_cpu"].items())
        lines += ["", f"CPU used by the idle two-rank group, in cores: {idle}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only, fewer repetitions")
    parser.add_argument("--raw-worker", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--share-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--renice", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.raw_worker:
        raw_worker(args.raw_worker, args.renice)
    if args.share_worker:
        share_worker()
    env = bench.environment()
    env["load_start"] = os.getloadavg()[0]
    bench.progress("per-step sync cost between two ranks")
    report = {"quick": args.quick, "environment": env, "share": run_worker(2, "--share-worker"), "models": []}
    for name in ("tiny",) if args.quick else ("tiny", "small"):
        report["models"].append(bench_model(name, args.quick))
    env["load_end"] = os.getloadavg()[0]
    text = markdown(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sharded.json").write_text(json.dumps(report, indent=2))
    (RESULTS / "sharded.md").write_text(text)
    if not args.quick:
        (ROOT / "bench" / "RESULTS-sharded.md").write_text("## Sharded over two ranks\n\n" + text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
