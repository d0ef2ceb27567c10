"""Beyond one Mac: an mlx.launch group, and replicas behind nginx.

Run everything: python -m pytest -q test_lem_serve.py testing/
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import lem_serve
from testing.group import ServedGroup, alive, free_port
from testing.tiny_model import build_tiny_model

from testing.checks import (
    ADD, ASK_WEATHER, LONG_CONTEXT, PERSON, PROMPTS, ROOT, WEATHER, answer, assert_openai_error, at,
    body_for, final_choice, hang_up, health, metric, open_stream, post, post_bytes,
    read_first_text_event, request, run_concurrently, running_server, schema_format, scrape,
    sse_events, start_process, wait_until,
)

pytestmark = pytest.mark.group


# ---------------------------------------------------------------------------
# Beyond one Mac: a model sharded over an mlx.launch group; replicas behind nginx
# ---------------------------------------------------------------------------

UNENDING = LONG_CONTEXT // 2   # max_tokens no machine generates within a test (the long model allows it)

STALL_TIMEOUT = 8              # --timeout of the stall test's group: no step or sync may take longer

LONG = ("--max-tokens", str(UNENDING))  # command-line flags that let requests ask for UNENDING

FINISHING = 40                 # max_tokens any machine generates within the 30 s drain, sharded on loopback too


def events_within(response, seconds: float) -> list:
    """The rest of an SSE stream, which must end within `seconds` (a hang fails the test, not the run)."""
    result = []
    reader = threading.Thread(target=lambda: result.append(sse_events(response)), daemon=True)
    reader.start()
    reader.join(seconds)
    if reader.is_alive():
        response.fp.raw._sock.shutdown(socket.SHUT_RDWR)
        raise AssertionError(f"the stream did not end within {seconds:g} s")
    return result[0]


def tokens_stop_growing(server, settle: float = 0.3) -> bool:
    """The server's count of sampled tokens holds still for `settle` s (one step in hand may finish first)."""
    for _ in range(3):
        before = metric(scrape(server), "lem_tokens_generated_total")
        time.sleep(settle)
        if metric(scrape(server), "lem_tokens_generated_total") == before:
            return True
    return False

HELD_BODY = json.dumps({"prompt": "x", "max_tokens": 2}).encode()


def hold_request_open(server) -> socket.socket:
    """A POST whose body has not all arrived: a request in flight until finish_held_request."""
    before = metric(scrape(server), "lem_in_flight_requests")
    sock = socket.create_connection(server.server_address[:2], timeout=60)
    sock.sendall(post_bytes("/v1/completions", HELD_BODY)[:-len(HELD_BODY) + 1])
    assert wait_until(lambda: metric(scrape(server), "lem_in_flight_requests") > before)
    return sock


def finish_held_request(sock: socket.socket) -> int:
    """Send the rest of the held body; return the status of the answer."""
    with sock:
        sock.sendall(HELD_BODY[1:])
        response = http.client.HTTPResponse(sock)
        response.begin()
        response.read()
        return response.status


@pytest.fixture(scope="module")
def sharded(long_model_dir):
    """lem-serve on two ranks of one mlx.launch group (tensor parallel), rank 0 on a loopback port."""
    with ServedGroup(long_model_dir, *LONG, "--max-requests", "12") as group:
        yield group.wait_ready()


@pytest.fixture(scope="module")
def alone(long_model, long_model_dir):
    """The same model in one process: the answers the group must give, token for token."""
    with running_server(long_model, long_model_dir, max_requests=12, max_tokens=UNENDING) as srv:
        yield srv


def sharded_cases(alone) -> list[tuple[str, dict]]:
    """Requests that use every generation feature, each in one request."""
    text = post(alone, "completions", prompt=PROMPTS[2], max_tokens=60, temperature=0)["choices"][0]["text"]
    forced = {"type": "function", "function": {"name": "add"}}
    return [
        ("chat", dict(stream=True, max_tokens=40, temperature=0)),
        ("completions", dict(prompt=PROMPTS[0], stream=True, max_tokens=40, temperature=0)),
        ("chat", dict(messages=[{"role": "user", "content": "Tell me about the sea"}], max_tokens=40, temperature=0)),
        ("completions", dict(prompt=PROMPTS[1], max_tokens=40, temperature=0)),
        ("completions", dict(prompt=PROMPTS[2], max_tokens=60, temperature=0, stop=text[20:23])),
        ("chat", dict(max_tokens=60, temperature=0, response_format=schema_format(PERSON))),
        ("chat", dict(messages=ASK_WEATHER, tools=[WEATHER, ADD], tool_choice=forced, max_tokens=60, temperature=0)),
        ("chat", dict(max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)),
        ("completions", dict(prompt=PROMPTS[3], max_tokens=30, temperature=0, presence_penalty=1.5,
                             frequency_penalty=0.5, repetition_penalty=1.3, logit_bias={"100": 5})),
        ("completions", dict(prompt=PROMPTS[0], max_tokens=30, temperature=1.0, top_p=0.9, seed=7)),
    ]


def test_sharded_group_serves_on_rank_0_and_answers_like_one_process(sharded, alone):
    body = health(sharded)
    assert (body["status"], body["world_size"], body["rank"], body["sharding"]) == ("ok", 2, 0, "tensor")
    assert (health(alone)["world_size"], health(alone)["sharding"]) == (1, "none")
    samples = scrape(sharded)
    assert metric(samples, "lem_world_size") == 2 and metric(samples, "lem_rank") == 0
    cases = sharded_cases(alone)
    expected = [answer(alone, endpoint, fields) for endpoint, fields in cases]
    got = run_concurrently(*[lambda c=c: answer(sharded, *c) for c in cases])
    for case, want, have in zip(cases, expected, got):
        assert have.pop("logprobs", []) == pytest.approx(want.pop("logprobs", []), abs=1e-3), case
        assert have == want, case
    assert expected[4]["finish"] == "stop" and expected[6]["calls"] and expected[7]["logprob tokens"]
    out = sharded.output()  # one HTTP server, on rank 0; rank 1 holds its shard
    assert out.count(" on http://") == 1 and f"rank 0/2 INFO lem-serve {lem_serve.__version__} serving" in out
    assert "rank 1/2 INFO lem-serve" in out and "holding its shard" in out


def test_sharded_prompt_cache_serves_a_follow_up_turn(sharded, alone):
    history = [{"role": "system", "content": "You are a helpful assistant."},
               {"role": "user", "content": "Tell me a story about " + " ".join(f"w{i}" for i in range(150))}]
    first = post(sharded, "chat", messages=history, max_tokens=20, temperature=0)
    history += [first["choices"][0]["message"], {"role": "user", "content": "And then?"}]
    follow = post(sharded, "chat", messages=history, max_tokens=20, temperature=0)
    assert follow["usage"]["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"] - 1
    assert follow["choices"][0]["message"] == post(alone, "chat", messages=history, max_tokens=20,
                                                   temperature=0)["choices"][0]["message"]
    assert health(sharded)["prompt_cache"]["hits"] >= 1


def test_sharded_unseeded_sampling_agrees_on_every_rank(sharded):
    # The ranks compare what each step sampled; ranks drawing different tokens would fail the group.
    replies = run_concurrently(*[lambda p=p: post(sharded, "completions", prompt=p, max_tokens=60, temperature=1.0)
                                 for p in PROMPTS[:3]])
    assert [r["usage"]["completion_tokens"] for r in replies] == [60, 60, 60]
    assert health(sharded)["status"] == "ok"


def test_sharded_client_leaving_mid_stream_stops_generation(sharded):
    conn, response = open_stream(sharded, "completions", prompt=PROMPTS[1], max_tokens=UNENDING)
    read_first_text_event(response)
    hang_up(conn, response)
    assert wait_until(lambda: health(sharded)["active_requests"] == 0)

    assert tokens_stop_growing(sharded)
    assert post(sharded, "completions", max_tokens=3)["usage"]["completion_tokens"] == 3


def test_pipeline_without_a_group_is_a_one_line_error(model_dir):
    out = subprocess.run([sys.executable, str(ROOT / "lem_serve.py"), "--model-path", str(model_dir), "--pipeline"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--pipeline" in out.stderr and "mlx.launch" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


@pytest.fixture(scope="module")
def three_layer_model_dir(tmp_path_factory) -> Path:
    """The long-context tiny model with three layers (pipeline stages of 2 and 1) and a weight index."""
    import mlx.core as mx
    path = build_tiny_model(tmp_path_factory.mktemp("models") / "three", num_layers=3,
                            max_position_embeddings=LONG_CONTEXT)
    names = mx.load(str(path / "model.safetensors")).keys()  # sharded_load picks a stage's files from the index
    index = {"metadata": {}, "weight_map": {name: "model.safetensors" for name in sorted(names)}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


def test_pipeline_group_evicts_the_cache_entries_rank_0_evicts(three_layer_model_dir):
    # Rank 0 holds two layers, rank 1 one: their KV caches differ in size, and a budget of three
    # of rank 0's entries would hold six of rank 1's. Rank 1 must evict what rank 0 evicts, or a
    # prompt that rank 0 no longer has cached would start from a longer prefix on rank 1.
    entry = 2 * 309 * 2 * 16 * 2 * 4   # rank 0's bytes per prompt: layers x tokens x kv heads x head dim x (k, v) x float32
    model = lem_serve.load_model(lem_serve.Settings(model_path=str(three_layer_model_dir)))
    prompts = [[300 + i] + list(range(10, 310)) for i in range(6)]  # distinct from the first token
    with ServedGroup(three_layer_model_dir, *LONG, "--pipeline", "--prompt-cache-bytes", str(3 * entry + 1000)) as group, \
            running_server(model, three_layer_model_dir) as one:
        group.wait_ready()
        assert health(group)["sharding"] == "pipeline"
        for prompt in prompts + prompts[:2]:  # the first two were evicted by the time they come back
            got, want = (post(srv, "completions", prompt=prompt, max_tokens=8, temperature=0) for srv in (group, one))
            assert got["choices"][0]["text"] == want["choices"][0]["text"]
            assert got["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        cache = health(group)["prompt_cache"]
        assert cache["entries"] == 3 and cache["bytes"] == 3 * entry  # rank 0 holds two of the three layers
        assert cache["misses"] == len(prompts) + 2
        again = post(group, "completions", prompt=prompts[-1], max_tokens=8, temperature=0)
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == len(prompts[-1]) - 1
        assert health(group)["status"] == "ok"


@pytest.mark.parametrize("who", ["every process", "rank 1 alone"])
def test_sigterm_drains_the_group_and_it_exits(long_model_dir, who):
    with ServedGroup(long_model_dir, *LONG, "--max-requests", "4") as group:
        group.wait_ready()
        conn, response = open_stream(group, "completions", prompt=PROMPTS[0], max_tokens=FINISHING, temperature=0)
        read_first_text_event(response)
        ranks = [group.rank_pid(rank) for rank in (0, 1)]
        if who == "every process":  # the launcher too, as Ctrl-C in a terminal or a supervisor's stop does
            group.signal_all(signal.SIGTERM)
        else:
            os.kill(ranks[1], signal.SIGTERM)
        rest = events_within(response, 120)
        assert rest[-1] == "[DONE]" and final_choice(rest)["finish_reason"] == "length"
        assert wait_until(lambda: not any(alive(pid) for pid in ranks)), group.output()[-3000:]
        if who == "rank 1 alone":
            assert group.process.wait(timeout=30) == 0
            out = group.output_to_end()   # the reader may still be behind the launcher's last lines
            assert "rank 1/2 INFO SIGTERM: asking rank 0 to drain the group" in out
            assert "Node with rank 0 completed" in out and "Node with rank 1 completed" in out, out[-3000:]
            assert "exited with code" not in out and out.count("stopped cleanly") == 2


def test_stalled_rank_ends_requests_in_bounded_time_and_exits_nonzero(long_model_dir):
    with ServedGroup(long_model_dir, *LONG, "--max-requests", "4", "--timeout", str(STALL_TIMEOUT)) as group:
        group.wait_ready()
        # While every rank is well, a request past its deadline is a 504 and the group goes on.
        late = request(group, "POST", "/v1/completions", {"prompt": "x", "max_tokens": UNENDING})
        assert_openai_error(late, 504, code="timeout")
        assert health(group)["status"] == "ok"
        conn, response = open_stream(group, "completions", prompt=PROMPTS[0], max_tokens=UNENDING)
        read_first_text_event(response)
        held = hold_request_open(group)
        os.kill(group.rank_pid(1), signal.SIGSTOP)  # rank 0's engine now waits in a collective that never ends
        rest = events_within(response, STALL_TIMEOUT + 30)
        assert rest[-2]["error"]["code"] == "timeout" and rest[-1] == "[DONE]"
        assert wait_until(lambda: request(group, "GET", "/healthz").status == 503, timeout=STALL_TIMEOUT + 30)
        assert health(group)["status"] == "error"
        assert_openai_error(request(group, "POST", "/v1/chat/completions", body_for("chat")), 503,
                            code="engine_unavailable")
        assert finish_held_request(held) == 503
        assert group.wait_for("Node with rank 0 exited with code 1", timeout=60), group.output()[-3000:]
        # mlx.launch may relay rank 0's last lines after its own line above (its idle-class relay threads
        # wait while rank 0 spins in a collective that never ends).
        assert group.wait_for("a rank has died or stalled", timeout=60), group.output()[-3000:]


def test_killed_rank_ends_requests_at_once_and_exits_nonzero(long_model_dir):
    # --timeout stays 300 s: what ends the stream below is the lost rank, not a deadline.
    with ServedGroup(long_model_dir, *LONG, "--max-requests", "4") as group:
        group.wait_ready()
        conn, response = open_stream(group, "completions", prompt=PROMPTS[0], max_tokens=UNENDING)
        read_first_text_event(response)
        held = hold_request_open(group)
        os.kill(group.rank_pid(1), signal.SIGKILL)
        rest = events_within(response, 60)
        assert rest[-1] == "[DONE]" and rest[-2]["error"]["code"] == "engine_unavailable", (rest[-4:], group.output()[-3000:])
        assert finish_held_request(held) == 503
        assert group.wait_for("Node with rank 0 exited with code 1", timeout=60), group.output()[-3000:]
        assert group.wait_for("the group has failed", timeout=60), group.output()[-3000:]   # relayed late, maybe

# -- replicas behind nginx (deploy/nginx-lem-serve.conf) ---------------------------

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


@pytest.fixture(scope="session")
def nginx_binary() -> str:
    """Debian's nginx; missing in CI is a failure, elsewhere a skip."""
    if not os.path.exists(NGINX):
        reason = "nginx is not installed (apt-get install nginx)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return NGINX

NGINX_MAIN = """{user}worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 256; }}
http {{
    log_format upstreams '$request_method $uri $status upstream=$upstream_addr statuses=$upstream_status';
    access_log {dir}/access.log upstreams;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    include {dir}/lem-serve.conf;
}}
"""


@contextlib.contextmanager
def nginx_in_front(nginx: str, replicas: list[str], folder: Path):
    """nginx with the shipped deploy/nginx-lem-serve.conf, pointed at `replicas`, on a free loopback port.

    Only what a machine-wide install would set differently changes: the
    replicas' addresses, the listening address, and where pid, logs and
    temporary files go (this folder, so it runs as any user).
    """
    site = (ROOT / "deploy" / "nginx-lem-serve.conf").read_text()
    addresses = iter(replicas)
    site, servers = re.subn(r"server 127\.0\.0\.1:\d+", lambda _m: f"server {next(addresses)}", site)
    port = free_port()
    site, listens = re.subn(r"listen 8080;", f"listen 127.0.0.1:{port};", site)
    assert (servers, listens) == (len(replicas), 1), "the shipped configuration changed shape"
    (folder / "lem-serve.conf").write_text(site)
    user = "user root;\n" if os.geteuid() == 0 else ""  # as root, workers would otherwise run as nobody
    (folder / "nginx.conf").write_text(NGINX_MAIN.format(user=user, dir=folder))
    process = subprocess.Popen([nginx, "-p", str(folder), "-e", str(folder / "error.log"), "-c", str(folder / "nginx.conf")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    front = at(f"127.0.0.1:{port}")
    front.access_log = folder / "access.log"
    try:
        def up() -> bool:
            with contextlib.suppress(OSError):
                socket.create_connection(front.server_address, timeout=1).close()
                return True
            return process.poll() is not None
        assert wait_until(up) and process.poll() is None, (folder / "error.log").read_text()
        yield front
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextlib.contextmanager
def replicas(model_dir: Path, count: int):
    """`count` lem-serve processes with one generation slot each, 429 at once when busy: [(process, "host:port")]."""
    started = []
    try:
        for _ in range(count):
            started.append(start_process(model_dir, *LONG, "--max-requests", "1", "--queue-timeout", "0"))
        yield started
    finally:
        for process, _address in started:
            process.kill()
            process.wait(timeout=30)


def test_nginx_spreads_requests_over_replicas_and_hides_their_429s(nginx_binary, long_model_dir, tmp_path):
    with replicas(long_model_dir, 2) as ((_, a), (killed, b)), nginx_in_front(nginx_binary, [a, b], tmp_path) as lb:
        # Two requests at once, one slot per replica: both stream, and no 429 reaches the client.
        streams = [open_stream(lb, "completions", prompt=p, max_tokens=UNENDING) for p in PROMPTS[:2]]
        for conn, response in streams:
            assert response.status == 200
            read_first_text_event(response)
        assert [health(at(r))["active_requests"] for r in (a, b)] == [1, 1]
        for conn, response in streams:
            hang_up(conn, response)
        assert wait_until(lambda: [health(at(r))["active_requests"] for r in (a, b)] == [0, 0])
        # A replica kept busy by a client nginx does not see answers 429, which nginx retries on the other.
        conn, response = open_stream(at(a), "completions", prompt=PROMPTS[2], max_tokens=UNENDING)
        read_first_text_event(response)
        for prompt in PROMPTS:
            assert post(lb, "completions", prompt=prompt, max_tokens=5)["usage"]["completion_tokens"] == 5
        assert metric(scrape(at(a)), "lem_gate_rejections_total") >= 1
        assert "statuses=429, 200" in lb.access_log.read_text()
        hang_up(conn, response)
        # A replica that is gone costs one refused connection, then the next replica answers.
        killed.kill()
        killed.wait(timeout=30)
        for prompt in PROMPTS:
            assert post(lb, "completions", prompt=prompt, max_tokens=5)["usage"]["completion_tokens"] == 5
        assert "statuses=502, 200" in lb.access_log.read_text()


def test_nginx_serves_the_page_health_and_same_origin_calls(nginx_binary, long_model_dir, tmp_path):
    with replicas(long_model_dir, 2) as ((_, a), (_, b)), nginx_in_front(nginx_binary, [a, b], tmp_path) as lb:
        page = request(lb, "GET", "/")
        assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
        assert request(lb, "GET", "/chat.js").status == 200
        assert health(lb)["status"] == "ok"
        # The page calls the API from nginx's own origin, which the replicas (on loopback) accept.
        origin = {"Origin": f"http://127.0.0.1:{lb.server_address[1]}"}
        reply = request(lb, "POST", "/v1/chat/completions", body_for("chat", max_tokens=3), headers=origin)
        assert reply.status == 200, reply.raw[:300]
        foreign = request(lb, "POST", "/v1/chat/completions", body_for("chat", max_tokens=3),
                          headers={"Origin": "http://elsewhere.example"})
        assert_openai_error(foreign, 403, code="origin_not_allowed")
        # Bodies up to lem-serve's own limit pass the proxy (nginx's default limit is 1 MiB).
        big = body_for("completions", max_tokens=1, padding="x" * (lem_serve.MAX_BODY_BYTES - 1000))
        assert request(lb, "POST", "/v1/completions", big).status == 200


def test_nginx_replica_stopped_mid_stream_finishes_it_while_new_requests_go_elsewhere(
        nginx_binary, long_model_dir, tmp_path):
    with replicas(long_model_dir, 2) as started, nginx_in_front(nginx_binary, [a for _, a in started], tmp_path) as lb:
        conn, response = open_stream(lb, "completions", prompt=PROMPTS[0], max_tokens=FINISHING, temperature=0)
        read_first_text_event(response)
        (stopping, address), (_, other) = sorted(started, key=lambda r: -health(at(r[1]))["active_requests"])
        held = hold_request_open(at(address))  # keeps the replica draining until the test lets it go
        stopping.send_signal(signal.SIGTERM)
        rest = events_within(response, 120)
        assert rest[-1] == "[DONE]" and final_choice(rest)["finish_reason"] == "length"
        # Still draining, the stopped replica refuses new connections, so nginx hands them to the other.
        for prompt in PROMPTS:
            assert post(lb, "completions", prompt=prompt, max_tokens=5)["usage"]["completion_tokens"] == 5
        assert "statuses=502, 200" in lb.access_log.read_text()
        assert metric(scrape(at(other)), "lem_requests_total", endpoint="/v1/completions", code="200") == 4
        assert finish_held_request(held) == 200
        assert stopping.wait(timeout=60) == 0 and "stopped cleanly" in stopping.stderr.read()
