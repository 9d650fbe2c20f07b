"""What the benchmark scripts share: starting pinned processes on loopback ports, stopping them, wrk.

A port already taken is an error, not something to wait for: a stray mock upstream from an earlier run
would otherwise answer in place of the one started with this run's settings.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: The shared harness (mock upstream, wrk script); SHARED_BENCH points elsewhere (a git worktree).
SHARED = Path(os.environ.get("SHARED_BENCH") or HERE.parent.parent / "shared" / "bench")
#: A Python with aiohttp for the shared mock upstream (the LiteLLM venv setup-peers.sh makes has it).
MOCK_PY = os.environ.get("MOCK_PY", "/tmp/peers/litellm-venv/bin/python")


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
        return True
    except OSError:
        return False


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(port):
            return
        time.sleep(0.1)
    raise SystemExit(f"port {port} never opened")


def start(
    cmd: list[str], cpu: int, port: int, env: dict[str, str] | None = None, *, quiet: bool = True
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` pinned to ``cpu`` in its own session and wait for it to listen on ``port``.

    ``quiet=False`` lets its stderr through (a profile it prints)."""
    if port_open(port):
        raise SystemExit(f"port {port} is already taken: stop whatever listens there first")
    proc = subprocess.Popen(
        ["taskset", "-c", str(cpu), *cmd],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL if quiet else None,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    wait_port(port)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_mock(env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """The shared harness's mock upstream on 127.0.0.1:9100, pinned to CPU 1."""
    return start([MOCK_PY, str(SHARED / "mock_upstream.py"), "9100"], 1, 9100, env)


def wrk(port: int, seconds: int, conns: int) -> dict[str, float]:
    """One wrk run (on CPU 1) of the shared harness's request: req/s, p50 ms, total requests."""
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency",
         "-s", str(SHARED / "post.lua"), f"http://127.0.0.1:{port}/v1/chat/completions"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"^\s*50%\s+([\d.]+)(\w+)", out, re.M)
    total = re.search(r"(\d+) requests in", out)
    if rps is None or p50 is None or total is None:
        raise SystemExit(f"wrk got no answers from port {port}:\n{out}")
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p50.group(2)]
    return {"rps": float(rps.group(1)), "p50": float(p50.group(1)) * scale, "requests": float(total.group(1))}


def wrk_start(port: int, seconds: int, conns: int) -> subprocess.Popen[bytes]:
    """The same wrk run in the background (its output discarded): load while something else measures."""
    return subprocess.Popen(
        ["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", f"-d{seconds}s",
         "-s", str(SHARED / "post.lua"), f"http://127.0.0.1:{port}/v1/chat/completions"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
