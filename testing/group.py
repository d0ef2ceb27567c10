"""Run lem-serve as an mlx.launch group on loopback, for the tests and benchmarks.

``mlx.launch -n N --backend ring`` starts N copies of ``lem_serve.py`` on this
machine, each a rank of one ``mx.distributed`` group talking over loopback
sockets: rank 0 serves HTTP and every rank holds a shard of the model.

    with ServedGroup(model_dir, "--max-requests", "4") as group:
        urlopen(group.url + "/healthz")
        os.kill(group.rank_pid(1), signal.SIGSTOP)

The launcher runs in its own session (process group), so a test can signal
the whole group at once, as a terminal's Ctrl-C or a supervisor would.
Everything the ranks and the launcher print is collected in ``lines``.
"""

from __future__ import annotations

import http.client
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 180  # seconds for N processes to import MLX and load their shards on a busy 2-core machine


def launcher() -> str:
    """The mlx.launch script of the running Python's environment."""
    beside = Path(sys.executable).with_name("mlx.launch")
    found = str(beside) if beside.exists() else shutil.which("mlx.launch")
    if not found:
        raise RuntimeError("mlx.launch is not installed (pip install mlx)")
    return found


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port that nothing on loopback uses now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def free_port_run(count: int) -> int:
    """The first of `count` consecutive free ports (the ring backend takes one per rank)."""
    for _ in range(200):
        start = random.randrange(20000, 60000 - count)
        if all(port_is_free(start + i) for i in range(count)):
            return start
    raise RuntimeError(f"no {count} consecutive free ports found")


def children_of(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def environ_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


class ServedGroup:
    """lem_serve.py under ``mlx.launch -n ranks --backend ring``, rank 0 on a free loopback port."""

    def __init__(self, model_dir: Path, *args: str, ranks: int = 2, port: int | None = None):
        self.port = port or free_port()
        self.ranks = ranks
        self.lines: list[str] = []
        command = [launcher(), "-n", str(ranks), "--backend", "ring", "--verbose",
                   "--starting-port", str(free_port_run(ranks)), "--python", sys.executable,
                   str(ROOT / "lem_serve.py"), "--model-path", str(model_dir),
                   "--bind", f"127.0.0.1:{self.port}", *args]
        self.process = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, errors="replace",
                                        start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def server_address(self) -> tuple[str, int]:
        """Rank 0's HTTP address, as http.server names its own."""
        return "127.0.0.1", self.port

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def output_to_end(self, timeout: float = 30) -> str:
        """All the group's output, once its launcher has exited and the pipe is read to its end."""
        self._reader.join(timeout)
        return self.output()

    def wait_ready(self, timeout: float = START_TIMEOUT) -> "ServedGroup":
        """Return once rank 0 answers /healthz; raise with the group's output if it never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the group did not come up within {timeout:.0f} s:\n{self.output()[-4000:]}")

    def rank_pid(self, rank: int) -> int:
        """The process id of one rank (mlx.launch sets MLX_RANK in each rank's environment)."""
        for pid in children_of(self.process.pid):
            if environ_of(pid).get("MLX_RANK") == str(rank):
                return pid
        raise RuntimeError(f"rank {rank} is not running:\n{self.output()[-2000:]}")

    def wait_for(self, text: str, timeout: float) -> bool:
        """True once a line containing `text` has been printed, within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return True
            time.sleep(0.05)
        return any(text in line for line in self.lines)

    def signal_all(self, sig: int) -> None:
        """Send `sig` to every process of the group, the launcher included (like Ctrl-C)."""
        os.killpg(self.process.pid, sig)

    def close(self) -> None:
        """Kill whatever is left of the group (stopped processes included) and reap the launcher."""
        pids = [self.process.pid, *children_of(self.process.pid)]
        for pid in pids:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        self._reader.join(timeout=5)

    def __enter__(self) -> "ServedGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
